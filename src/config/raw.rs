//! The TOML layer of the config: the file as written, before any value is checked.
//!
//! serde stops at the first error, so a TOML syntax error or an unknown key would hide every
//! other problem. Here the document is parsed with recovery (every syntax error, each with
//! its line and column), unknown keys are looked up against the tables below (every one,
//! with its line and column, and the known key it most resembles), and each section is
//! deserialized on its own, so a wrong value in one anchor does not hide a missing file
//! in another. The typed structs still deny unknown fields: a key missing from the tables
//! below would show up as an error, never be ignored.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use super::{Limits, Log, ProblemKind};

/// The keys each table may hold.
const TOP_KEYS: &[&str] = &[
    "server", "log", "limits", "anchor", "device", "acl", "cluster",
];
const SERVER_KEYS: &[&str] = &[
    "bind",
    "cert_chain",
    "private_key",
    "data_dir",
    "admin_bind",
    "proxy_protocol",
];
const LOG_KEYS: &[&str] = &["format", "level"];
const LIMITS_KEYS: &[&str] = &[
    "max_connections",
    "max_packet_size",
    "handshake_timeout",
    "connect_timeout",
    "max_inflight",
    "max_queued_messages",
    "max_keep_alive",
    "max_sessions_per_device",
    "stall_timeout",
    "max_session_expiry",
    "max_retained_per_device",
    "max_server_topic_aliases",
];
const ANCHOR_KEYS: &[&str] = &[
    "name",
    "certificate",
    "cn_regex",
    "create_devices",
    "acl",
    "crl",
    "crl_url",
    "crl_refresh",
];
const DEVICE_KEYS: &[&str] = &["name", "certificate", "acl"];
const CLUSTER_KEYS: &[&str] = &[
    "node",
    "nats",
    "prefix",
    "replicas",
    "credentials",
    "tls_ca",
];
const PROFILE_KEYS: &[&str] = &["publish", "subscribe", "deny_publish", "deny_subscribe"];

/// The file's sections, each deserialized on its own. A section that did not deserialize
/// is absent (`server`), left at its defaults (`log`, `limits`), left out (an anchor or a
/// device) or empty (an ACL profile, so that rules naming it do not add a second problem).
pub(super) struct RawConfig {
    pub server: Option<RawServer>,
    pub log: Log,
    pub limits: Limits,
    pub anchor: Vec<RawAnchor>,
    pub device: Vec<RawDevice>,
    pub acl: BTreeMap<String, RawProfile>,
    pub cluster: Option<super::cluster::RawCluster>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub bind: String,
    pub cert_chain: PathBuf,
    pub private_key: PathBuf,
    pub data_dir: PathBuf,
    pub admin_bind: Option<String>,
    #[serde(default)]
    pub proxy_protocol: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnchor {
    pub name: String,
    pub certificate: PathBuf,
    pub cn_regex: String,
    #[serde(default)]
    pub create_devices: bool,
    #[serde(default = "default_profile")]
    pub acl: String,
    pub crl: Option<PathBuf>,
    pub crl_url: Option<String>,
    pub crl_refresh: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDevice {
    pub name: String,
    pub certificate: PathBuf,
    #[serde(default = "default_profile")]
    pub acl: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProfile {
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub deny_publish: Vec<String>,
    #[serde(default)]
    pub deny_subscribe: Vec<String>,
}

fn default_profile() -> String {
    "device".to_owned()
}

/// A problem found in the TOML layer: where (a field name and its line and column) and
/// what.
pub(super) struct TomlProblem {
    /// Byte offset in the file, to report problems in file order.
    pub offset: usize,
    pub field: String,
    pub kind: ProblemKind,
}

/// Reads the document. Syntax errors and unknown keys are all reported; after a syntax
/// error nothing else is (the document's meaning is uncertain), so the result is None.
pub(super) fn parse(text: &str) -> (Option<RawConfig>, Vec<TomlProblem>) {
    let lines = Lines::new(text);
    let mut problems = Vec::new();
    let (mut doc, syntax) = DeTable::parse_recoverable(text);
    for e in &syntax {
        let offset = e.span().map_or(0, |s| s.start);
        problems.push(TomlProblem {
            offset,
            field: lines.at(offset),
            kind: ProblemKind::TomlSyntax {
                message: one_line(e.message()),
            },
        });
    }
    let first_error = problems.iter().map(|p| p.offset).min();
    let mut unknown = Vec::new();
    unknown_keys(doc.get_mut(), &lines, &mut unknown);
    if let Some(first) = first_error {
        // After a syntax error the recovered document may put keys in the wrong table:
        // only the unknown keys before it are certain.
        problems.extend(unknown.into_iter().filter(|p| p.offset < first));
        problems.sort_by_key(|p| p.offset);
        return (None, problems);
    }
    problems.extend(unknown);
    let mut sections = Sections {
        lines: &lines,
        problems: &mut problems,
    };
    let mut doc = doc.into_inner();
    let server = match doc.remove("server") {
        Some(v) => sections.one::<RawServer>("server", v),
        None => {
            sections.problems.push(TomlProblem {
                offset: 0,
                field: "server".to_owned(),
                kind: ProblemKind::MissingTable { table: "server" },
            });
            None
        }
    };
    let log = doc
        .remove("log")
        .and_then(|v| sections.one::<Log>("log", v))
        .unwrap_or_default();
    let limits = doc
        .remove("limits")
        .and_then(|v| sections.one::<Limits>("limits", v))
        .unwrap_or_default();
    let anchor = doc
        .remove("anchor")
        .map(|v| sections.many::<RawAnchor>("anchor", v))
        .unwrap_or_default();
    let device = doc
        .remove("device")
        .map(|v| sections.many::<RawDevice>("device", v))
        .unwrap_or_default();
    let cluster = doc
        .remove("cluster")
        .and_then(|v| sections.one::<super::cluster::RawCluster>("cluster", v));
    let mut acl = BTreeMap::new();
    if let Some(v) = doc.remove("acl") {
        let span = v.span();
        match v.into_inner() {
            DeValue::Table(profiles) => {
                for (name, value) in profiles {
                    let name = name.into_inner().into_owned();
                    let field = format!("acl.{name}");
                    let profile = sections
                        .one::<RawProfile>(&field, value)
                        .unwrap_or_default();
                    acl.insert(name, profile);
                }
            }
            other => sections.not_a(span.start, "acl", "table of profiles", &other),
        }
    }
    problems.sort_by_key(|p| p.offset);
    let raw = RawConfig {
        server,
        log,
        limits,
        anchor,
        device,
        acl,
        cluster,
    };
    (Some(raw), problems)
}

/// Deserializes sections, collecting their problems.
struct Sections<'a> {
    lines: &'a Lines,
    problems: &'a mut Vec<TomlProblem>,
}

impl Sections<'_> {
    fn one<T: for<'de> Deserialize<'de>>(
        &mut self,
        field: &str,
        value: Spanned<DeValue<'_>>,
    ) -> Option<T> {
        let start = value.span().start;
        match T::deserialize(ValueDeserializer::from(value)) {
            Ok(t) => Some(t),
            Err(e) => {
                let offset = e.span().map_or(start, |s| s.start);
                self.problems.push(TomlProblem {
                    offset,
                    field: format!("{field} ({})", self.lines.at(offset)),
                    kind: ProblemKind::TomlValue {
                        message: one_line(e.message()),
                    },
                });
                None
            }
        }
    }

    /// An array of tables (`[[anchor]]`), each element on its own.
    fn many<T: for<'de> Deserialize<'de>>(
        &mut self,
        name: &str,
        value: Spanned<DeValue<'_>>,
    ) -> Vec<T> {
        let start = value.span().start;
        match value.into_inner() {
            DeValue::Array(items) => items
                .into_iter()
                .enumerate()
                .filter_map(|(i, item)| self.one::<T>(&format!("{name}[{i}]"), item))
                .collect(),
            other => {
                self.not_a(start, name, "array of tables ([[...]])", &other);
                Vec::new()
            }
        }
    }

    fn not_a(&mut self, offset: usize, field: &str, expected: &'static str, found: &DeValue<'_>) {
        self.problems.push(TomlProblem {
            offset,
            field: format!("{field} ({})", self.lines.at(offset)),
            kind: ProblemKind::TomlValue {
                message: format!("expected a {expected}, found a {}", found.type_str()),
            },
        });
    }
}

/// Reports and removes every key the schema does not know, at any depth.
fn unknown_keys(doc: &mut DeTable<'_>, lines: &Lines, problems: &mut Vec<TomlProblem>) {
    check_table(doc, "", TOP_KEYS, lines, problems);
    for (key, value) in doc.iter_mut() {
        let key = key.get_ref().as_ref();
        let (known, array) = match key {
            "server" => (SERVER_KEYS, false),
            "log" => (LOG_KEYS, false),
            "limits" => (LIMITS_KEYS, false),
            "anchor" => (ANCHOR_KEYS, true),
            "device" => (DEVICE_KEYS, true),
            "cluster" => (CLUSTER_KEYS, false),
            "acl" => {
                if let DeValue::Table(profiles) = value.get_mut() {
                    for (name, profile) in profiles.iter_mut() {
                        if let DeValue::Table(t) = profile.get_mut() {
                            let path = format!("acl.{}", name.get_ref());
                            check_table(t, &path, PROFILE_KEYS, lines, problems);
                        }
                    }
                }
                continue;
            }
            _ => continue,
        };
        match value.get_mut() {
            DeValue::Table(t) if !array => check_table(t, key, known, lines, problems),
            DeValue::Array(items) if array => {
                for (i, item) in items.iter_mut().enumerate() {
                    if let DeValue::Table(t) = item.get_mut() {
                        check_table(t, &format!("{key}[{i}]"), known, lines, problems);
                    }
                }
            }
            // A wrong shape is reported when the section is deserialized.
            _ => {}
        }
    }
}

/// Reports and removes the keys of `table` that are not in `known`.
fn check_table(
    table: &mut DeTable<'_>,
    path: &str,
    known: &[&'static str],
    lines: &Lines,
    problems: &mut Vec<TomlProblem>,
) {
    let unknown: Vec<(String, usize)> = table
        .keys()
        .filter(|k| !known.contains(&k.get_ref().as_ref()))
        .map(|k| (k.get_ref().to_string(), k.span().start))
        .collect();
    for (key, offset) in unknown {
        table.remove(key.as_str());
        let field = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        problems.push(TomlProblem {
            offset,
            field: format!("{field} ({})", lines.at(offset)),
            kind: ProblemKind::UnknownKey {
                suggestion: closest(&key, known),
                known: known.join(", "),
            },
        });
    }
}

/// The known key `key` is most likely a typo of (at most two edits away).
fn closest(key: &str, known: &[&'static str]) -> Option<&'static str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance (keys are short: the quadratic table is a few hundred cells).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// A message on one line: a config problem is one line of `check`'s output.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Byte offsets to line and column (1-based, columns in characters).
struct Lines {
    /// The byte offset where each line starts.
    starts: Vec<usize>,
    text: String,
}

impl Lines {
    fn new(text: &str) -> Lines {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Lines {
            starts,
            text: text.to_owned(),
        }
    }

    /// "line L, column C" of a byte offset.
    fn at(&self, offset: usize) -> String {
        let offset = offset.min(self.text.len());
        let line = self.starts.partition_point(|s| *s <= offset).max(1);
        let start = self.starts[line - 1];
        let column = self
            .text
            .get(start..offset)
            .map_or(1, |s| s.chars().count() + 1);
        format!("line {line}, column {column}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        parse(text)
            .1
            .into_iter()
            .map(|p| format!("{}: {}", p.field, p.kind))
            .collect()
    }

    #[test]
    fn every_syntax_error_with_its_line_and_column() {
        let p = problems("[server]\nbind = \nx = [1,\n\n[limits]\nmax_connections = 1\n");
        assert!(!p.is_empty(), "{p:?}");
        assert!(p[0].starts_with("line 2, column 8: "), "{p:?}");
    }

    #[test]
    fn every_unknown_key_with_a_suggestion() {
        let text = "[server]\nbind = \"127.0.0.1:1\"\ncert_chain = \"a\"\nprivate_key = \"b\"\ndata_dir = \"d\"\nadmin = \"x\"\n\n[[anchor]]\nname = \"a\"\ncertificate = \"c\"\ncn_regex = \"x\"\ncreate_device = true\n\n[acl.p]\npublsh = []\n\n[limit]\n";
        let p = problems(text);
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(
            p[0].starts_with("server.admin (line 6, column 1): unknown key"),
            "{p:?}"
        );
        assert!(
            p[1].contains("anchor[0].create_device (line 12, column 1)"),
            "{p:?}"
        );
        assert!(p[1].contains("did you mean `create_devices`"), "{p:?}");
        assert!(p[2].contains("acl.p.publsh"), "{p:?}");
        assert!(p[3].starts_with("limit (line 17, column 2)"), "{p:?}");
    }

    #[test]
    fn a_wrong_value_in_one_section_leaves_the_others_parsed() {
        let text = "[server]\nbind = \"127.0.0.1:1\"\ncert_chain = \"a\"\nprivate_key = \"b\"\ndata_dir = \"d\"\n\n[limits]\nmax_connections = \"many\"\n\n[[anchor]]\nname = \"a\"\ncertificate = \"c\"\n\n[[anchor]]\nname = \"b\"\ncertificate = \"c\"\ncn_regex = \"x\"\n";
        let (raw, p) = parse(text);
        let raw = raw.expect("parsed");
        assert!(raw.server.is_some());
        assert_eq!(raw.anchor.len(), 1);
        assert_eq!(
            p.len(),
            2,
            "{:?}",
            p.iter().map(|p| &p.field).collect::<Vec<_>>()
        );
        assert!(p[0].field.starts_with("limits (line 8"), "{}", p[0].field);
        assert!(p[1].field.starts_with("anchor[0]"), "{}", p[1].field);
    }

    #[test]
    fn line_and_column_count_characters() {
        let l = Lines::new("ab\nçd\n");
        assert_eq!(l.at(0), "line 1, column 1");
        assert_eq!(l.at(3), "line 2, column 1");
        assert_eq!(l.at(5), "line 2, column 2");
    }
}
