//! `certmq devices export` / `import`: the registry as one JSON document, to move a
//! standalone SQLite registry into a cluster's bucket (or back). The same for both
//! backends; the format is documented in docs/cluster.md ("Migrating a standalone
//! registry").
//!
//! Every row keeps what the step-7 rules need after the move: the rule it is bound to,
//! the certificate's fingerprint and its notBefore (rotation's rollback protection), and
//! whether it is enabled. A file is read as hostile input: every name passes the identity
//! rules of contract §3 step 6, so a hand-edited `x/#` can never enter the registry.

use serde::{Deserialize, Serialize};

use super::{Device, Source};
use crate::cert::{rfc3339, Fingerprint, Validity};
use crate::identity::DeviceName;

/// The `format` field of an export.
pub const FORMAT: &str = "certmq-registry";
/// The `version` field this certmq writes and reads.
pub const VERSION: u32 = 1;

/// Why an export file cannot be imported.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("not a certmq registry export")]
    Json(#[source] serde_json::Error),
    #[error("format {found:?} is not {FORMAT:?}")]
    Format { found: String },
    #[error("version {found} is not supported (this certmq reads version {VERSION})")]
    Version { found: u32 },
    #[error("device {index}: the name {name:?} is not allowed: {reason}")]
    Name {
        index: usize,
        name: String,
        reason: String,
    },
    #[error("device {name:?}: {field} {value:?} is invalid")]
    Field {
        name: String,
        field: &'static str,
        value: String,
    },
    #[error("device {name:?} appears twice")]
    Duplicate { name: String },
}

/// The whole document.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    format: String,
    version: u32,
    exported_at: String,
    devices: Vec<Row>,
}

/// One device, with times as RFC 3339 (as `devices list --json` prints them).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    name: String,
    source: String,
    fingerprint: String,
    enabled: bool,
    not_before: String,
    not_after: String,
    created_at: String,
    last_seen_at: Option<String>,
    #[serde(default)]
    dropped_messages: u64,
}

/// The export of `devices` (pretty JSON, one device per block).
pub fn export(devices: &[Device], now: i64) -> String {
    let doc = Document {
        format: FORMAT.to_owned(),
        version: VERSION,
        exported_at: rfc3339(now),
        devices: devices
            .iter()
            .map(|d| Row {
                name: d.name.clone(),
                source: d.source.as_str().to_owned(),
                fingerprint: d.fingerprint.to_hex(),
                enabled: d.enabled,
                not_before: rfc3339(d.validity.not_before),
                not_after: rfc3339(d.validity.not_after),
                created_at: rfc3339(d.created_at),
                last_seen_at: d.last_seen_at.map(rfc3339),
                dropped_messages: d.dropped_messages,
            })
            .collect(),
    };
    // A Document of strings, numbers and bools always serializes.
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}

/// Reads an export, checking every row.
pub fn parse(text: &str) -> Result<Vec<Device>, TransferError> {
    let doc: Document = serde_json::from_str(text).map_err(TransferError::Json)?;
    if doc.format != FORMAT {
        return Err(TransferError::Format { found: doc.format });
    }
    if doc.version != VERSION {
        return Err(TransferError::Version { found: doc.version });
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(doc.devices.len());
    for (index, row) in doc.devices.into_iter().enumerate() {
        let device = device(index, row)?;
        if !seen.insert(device.name.clone()) {
            return Err(TransferError::Duplicate { name: device.name });
        }
        out.push(device);
    }
    Ok(out)
}

fn device(index: usize, row: Row) -> Result<Device, TransferError> {
    let name = DeviceName::parse(&row.name).map_err(|e| TransferError::Name {
        index,
        name: row.name.clone(),
        reason: e.to_string(),
    })?;
    let bad = |field: &'static str, value: &str| TransferError::Field {
        name: row.name.clone(),
        field,
        value: value.to_owned(),
    };
    let fingerprint = Fingerprint::from_hex(&row.fingerprint)
        .ok_or_else(|| bad("fingerprint", &row.fingerprint))?;
    // An anchor name is one config `name`: never empty, no control characters.
    if row.source.is_empty() || row.source.chars().any(char::is_control) {
        return Err(bad("source", &row.source));
    }
    let time =
        |field: &'static str, value: &str| parse_time(value).ok_or_else(|| bad(field, value));
    let last_seen_at = match &row.last_seen_at {
        Some(t) => Some(time("last_seen_at", t)?),
        None => None,
    };
    Ok(Device {
        name: name.as_str().to_owned(),
        source: Source::from_stored(row.source.clone()),
        fingerprint,
        validity: Validity {
            not_before: time("not_before", &row.not_before)?,
            not_after: time("not_after", &row.not_after)?,
        },
        enabled: row.enabled,
        created_at: time("created_at", &row.created_at)?,
        last_seen_at,
        dropped_messages: row.dropped_messages,
    })
}

/// Seconds since the epoch from RFC 3339.
fn parse_time(text: &str) -> Option<i64> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str, source: Source) -> Device {
        Device {
            name: name.to_owned(),
            source,
            fingerprint: Fingerprint::of(name.as_bytes()),
            validity: Validity {
                not_before: 1_700_000_000,
                not_after: 1_800_000_000,
            },
            enabled: false,
            created_at: 1_700_000_100,
            last_seen_at: Some(1_700_000_200),
            dropped_messages: 3,
        }
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let devices = vec![
            device("dev-1", Source::Anchor("fleet".into())),
            device("Zähler 7", Source::Pinned),
        ];
        let text = export(&devices, 1_700_000_300);
        assert_eq!(parse(&text).expect("parses"), devices);
    }

    #[test]
    fn hostile_rows_are_refused_naming_them() {
        let ok = export(&[device("dev-1", Source::Anchor("fleet".into()))], 0);
        for (from, to, needle) in [
            ("\"dev-1\"", "\"x/#\"", "not allowed"),
            ("\"dev-1\"", "\"\\u200bdev\"", "not allowed"),
            ("certmq-registry", "other", "format"),
            ("\"version\": 1", "\"version\": 9", "version 9"),
            ("\"fleet\"", "\"\"", "source"),
            ("2023-11-14T22:13:20Z", "yesterday", "not_before"),
        ] {
            let text = ok.replacen(from, to, 1);
            assert_ne!(text, ok, "{from} not found");
            let e = parse(&text).expect_err(needle).to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
        let fp = Fingerprint::of(b"dev-1").to_hex();
        let e = parse(&ok.replacen(&fp, "abc", 1)).expect_err("fingerprint");
        assert!(e.to_string().contains("fingerprint"), "{e}");
        let twice = export(
            &[
                device("dev-1", Source::Pinned),
                device("dev-1", Source::Pinned),
            ],
            0,
        );
        assert!(matches!(
            parse(&twice),
            Err(TransferError::Duplicate { .. })
        ));
    }
}
