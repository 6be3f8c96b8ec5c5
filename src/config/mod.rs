//! The TOML configuration (contract §2), parsed into typed, validated values at the boundary:
//! PEM files loaded, the server key matched to its certificate, anchors turned into webpki
//! trust anchors, regexes compiled, CRLs checked against their anchor, ACL profiles
//! compiled. Everything downstream works with these types and never re-reads a file.
//!
//! Loading collects every problem before failing, because an operator fixing a config wants
//! the whole list at once (`certmq check`), and a reload must be refused as a whole.
//! Unknown keys are errors: a typo such as `create_device = true` or `crls = ...` must not
//! silently change what is trusted.

pub mod crl;
mod raw;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use regex::Regex;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use serde::Deserialize;

use crate::acl::{AclError, Profile};
use crate::cert::{now_secs, CertError, CertInfo, Fingerprint, Validity};
use crate::identity::{DeviceName, NameError};
pub use crl::{Crl, CrlError, CrlUrl};
use raw::{RawAnchor, RawConfig, RawDevice, RawProfile, RawServer};

mod cluster;
pub use cluster::Cluster;

/// The default config path, relative to the working directory (contract §1).
pub const DEFAULT_PATH: &str = "config/certmq.toml";
/// Where a system installation keeps it (the fallback after [`DEFAULT_PATH`], contract §1).
pub const SYSTEM_PATH: &str = "/etc/certmq/certmq.toml";

/// The source name the registry uses for pinned devices; an anchor may not take it.
pub const PINNED_SOURCE: &str = "pinned";

/// One thing wrong with a config file: where (file and field) and what.
#[derive(Debug)]
pub struct Problem {
    /// The config file.
    pub file: PathBuf,
    /// The field, e.g. `anchor[1] "fleet".crl`.
    pub field: String,
    pub kind: ProblemKind,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line per problem, whatever the causes print (regex errors draw a caret
        // under the pattern on lines of their own).
        let mut text = format!("{}: {}: {}", self.file.display(), self.field, self.kind);
        let mut source = std::error::Error::source(&self.kind);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        if text.contains('\n') {
            text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        }
        f.write_str(&text)
    }
}

/// What is wrong, with the underlying cause kept.
#[derive(Debug, thiserror::Error)]
pub enum ProblemKind {
    #[error("invalid log filter {value:?}")]
    LogLevel {
        value: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid TOML: {message}")]
    TomlSyntax { message: String },
    #[error("{message}")]
    TomlValue { message: String },
    #[error("unknown key{}; the keys here are: {known}", suggestion.map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default())]
    UnknownKey {
        suggestion: Option<&'static str>,
        known: String,
    },
    #[error("the [{table}] table is missing")]
    MissingTable { table: &'static str },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds {count} certificates; exactly one is expected")]
    TooManyCertificates { path: PathBuf, count: usize },
    #[error("{path} is not valid PEM")]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path}: certificate cannot be parsed")]
    Certificate {
        path: PathBuf,
        #[source]
        source: CertError,
    },
    #[error("{path} holds no usable private key (PKCS#8, SEC1 or PKCS#1 PEM expected)")]
    Key {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("the private key is not supported")]
    KeyUnsupported(#[source] rustls::Error),
    #[error("the private key does not match the server certificate")]
    KeyMismatch(#[source] rustls::Error),
    #[error("{path} is not a CA certificate (basicConstraints cA is not set)")]
    NotCa { path: PathBuf },
    #[error("{path} is a CA certificate whose keyUsage lacks keyCertSign")]
    NoKeyCertSign { path: PathBuf },
    #[error("not a socket address such as 0.0.0.0:8883: {value:?}")]
    Address {
        value: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error("{value:?} is used more than once")]
    Duplicate { value: String },
    #[error("same certificate as {other}")]
    SameCertificate { other: String },
    #[error(
        "anchor names are 1 to 64 characters from A-Z a-z 0-9 . _ - and not \"pinned\": {value:?}"
    )]
    AnchorName { value: String },
    #[error("invalid device name {value:?}")]
    DeviceName {
        value: String,
        #[source]
        source: NameError,
    },
    #[error("invalid regular expression")]
    Regex(#[source] regex::Error),
    #[error("ACL profile {name:?} is not defined")]
    UnknownProfile { name: String },
    #[error("invalid ACL profile")]
    Acl(#[source] AclError),
    #[error("{path} cannot be used as a trust anchor")]
    AnchorUnusable {
        path: PathBuf,
        #[source]
        source: webpki::Error,
    },
    #[error("{path}")]
    CrlInvalid {
        path: PathBuf,
        #[source]
        source: CrlError,
    },
    #[error("{path}, the last CRL fetched from crl_url, is not usable for this anchor and is ignored (the broker fetches it again)")]
    CrlStoredInvalid {
        path: PathBuf,
        #[source]
        source: CrlError,
    },
    #[error("no CRL fetched from {url} yet: serve fetches it at start, and until one is fetched this anchor accepts no certificate")]
    CrlNotFetched { url: String },
    #[error("invalid crl_url {value:?}: {reason}")]
    CrlUrl { value: String, reason: &'static str },
    #[error(
        "crl_refresh must be between {} and {} seconds, not {value}",
        crl::MIN_REFRESH,
        crl::MAX_REFRESH
    )]
    CrlRefresh { value: u64 },
    #[error("crl_refresh is set without crl_url")]
    CrlRefreshWithoutUrl,
    #[error("{path}: CRL is past its nextUpdate ({next_update}); it is still applied")]
    CrlStale { path: PathBuf, next_update: String },
    #[error("certificate expired on {not_after}")]
    Expired { not_after: String },
    #[error("certificate not valid before {not_before}")]
    NotYetValid { not_before: String },
    #[error("no trust rule is usable: every anchor and pinned certificate is expired, not yet valid, or none is configured")]
    NoUsableRule,
    #[error("{name:?} is pinned here, but the registry holds this device for anchor {source_name:?}; delete that device first (certmq devices delete {name})")]
    PinnedNameTaken { name: String, source_name: String },
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("{value:?} must be 1-32 ASCII letters, digits, '-' or '_'")]
    ClusterName { value: String },
    #[error("at least one NATS server URL is needed")]
    NoNatsServer,
    #[error("{value:?} is not a NATS URL (nats://host:port or tls://host:port)")]
    NatsUrl { value: String },
    #[error("{value} replicas: JetStream allows 1 to {max}")]
    Replicas { value: usize, max: usize },
    #[error("must be at most {max}")]
    TooLarge { max: u64 },
}

/// A config that did not load; the list holds every problem found.
#[derive(Debug, thiserror::Error)]
#[error("{} problem(s) in {}", problems.len(), path.display())]
pub struct ConfigError {
    pub path: PathBuf,
    pub problems: Vec<Problem>,
}

/// `[server]`.
#[derive(Debug)]
pub struct Server {
    pub bind: SocketAddr,
    pub cert_chain_path: PathBuf,
    /// The server certificate, then its intermediates.
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub cert_info: CertInfo,
    pub private_key_path: PathBuf,
    pub private_key: PrivateKeyDer<'static>,
    pub data_dir: PathBuf,
    pub admin_bind: Option<SocketAddr>,
    /// Accept a PROXY protocol v1/v2 header from an L4 balancer before TLS (contract §12),
    /// so logs and refusals name the device's address, not the balancer's.
    pub proxy_protocol: bool,
}

impl Clone for Server {
    fn clone(&self) -> Server {
        Server {
            bind: self.bind,
            cert_chain_path: self.cert_chain_path.clone(),
            cert_chain: self.cert_chain.clone(),
            cert_info: self.cert_info.clone(),
            private_key_path: self.private_key_path.clone(),
            private_key: self.private_key.clone_key(),
            data_dir: self.data_dir.clone(),
            admin_bind: self.admin_bind,
            proxy_protocol: self.proxy_protocol,
        }
    }
}

/// The largest `max_server_topic_aliases`: each delivery to a client with aliases scans
/// them (broker/conn/alias.rs), and a few hundred topics cover a device's own traffic.
pub const MAX_SERVER_TOPIC_ALIASES: u16 = 256;

/// `[limits]`, with contract §2 defaults. Durations are whole seconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_connections: usize,
    pub max_packet_size: usize,
    pub handshake_timeout: u64,
    pub connect_timeout: u64,
    pub max_inflight: u16,
    pub max_queued_messages: usize,
    pub max_keep_alive: u16,
    /// Persistent sessions one device may hold (contract §4): one more is refused at CONNECT.
    pub max_sessions_per_device: usize,
    /// Seconds a connected subscriber with a full queue may make no progress before it
    /// stops pacing publishers (contract §9 flow control).
    pub stall_timeout: u64,
    /// Seconds a persistent session outlives its connection at most: caps the MQTT 5
    /// Session Expiry Interval (0xFFFFFFFF "never" included; CONNACK then announces the
    /// value used) and is the expiry of MQTT 3.1.1 clean-session-0 sessions, which would
    /// otherwise hold their subscriptions and queue forever. 0: no session outlives its
    /// connection; 4294967295: sessions may be kept forever.
    pub max_session_expiry: u32,
    /// Retained topics one device may hold (contract §4): a retained message belongs to the
    /// device that published it last; one more is refused (MQTT 5 QoS 1/2: 0x97) or
    /// dropped and counted. 0: the device may retain nothing.
    pub max_retained_per_device: usize,
    /// Topic aliases certmq assigns towards one MQTT 5 client, at most, and never more
    /// than the client's own Topic Alias Maximum (MQTT 5 §3.3.2.3.4). 0: none, for clients
    /// that state a maximum but cannot resolve server aliases (libmosquitto before 2.1).
    pub max_server_topic_aliases: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 100_000,
            max_packet_size: 1_048_576,
            handshake_timeout: 10,
            connect_timeout: 10,
            max_inflight: 64,
            max_queued_messages: 1000,
            max_keep_alive: 3600,
            max_sessions_per_device: 16,
            stall_timeout: 10,
            max_session_expiry: 604_800,
            max_retained_per_device: 1000,
            max_server_topic_aliases: 64,
        }
    }
}

/// `[[anchor]]`: the certificate-chain strategy.
#[derive(Debug, Clone)]
pub struct Anchor {
    pub name: String,
    pub certificate_path: PathBuf,
    pub der: CertificateDer<'static>,
    pub info: CertInfo,
    /// The anchor as webpki sees it: subject, key and name constraints.
    pub trust_anchor: rustls_pki_types::TrustAnchor<'static>,
    pub cn_regex: Regex,
    pub create_devices: bool,
    pub acl: String,
    /// The CRL in force: from the `crl` file or from `crl_url` (the newer of the two).
    pub crl: Option<Arc<Crl>>,
    /// Where the broker fetches this anchor's CRL (docs/crl.md). While it has none, from
    /// there or from the `crl` file, the anchor accepts no certificate.
    pub crl_url: Option<CrlUrl>,
    /// Seconds between two fetches of `crl_url`.
    pub crl_refresh: u64,
}

/// `[[device]]`: the pinned strategy.
#[derive(Debug, Clone)]
pub struct PinnedDevice {
    pub name: DeviceName,
    pub certificate_path: PathBuf,
    pub info: CertInfo,
    pub acl: String,
}

/// A loaded, validated configuration. Immutable: a reload builds a new one.
#[derive(Debug)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    pub server: Server,
    pub log: Log,
    pub limits: Limits,
    pub anchors: Vec<Anchor>,
    pub devices: Vec<PinnedDevice>,
    /// ACL profiles by name, the built-in `device` included.
    pub acl: BTreeMap<String, Arc<Profile>>,
    /// `[cluster]`: shared state in NATS JetStream; None = standalone (SQLite).
    pub cluster: Option<Cluster>,
    /// Problems that do not stop the broker (expired anchors while others are usable,
    /// stale CRLs); `check` prints them.
    pub warnings: Vec<Problem>,
}

/// The `[server] data_dir` of a config file, resolved against the file's folder, read
/// without validating anything else (`certmq reload` finds its broker with it). None when
/// the file cannot be read or holds no such string.
pub fn data_dir_of(path: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(path).ok()?;
    let value: toml::Table = toml::from_str(&text).ok()?;
    let dir = value.get("server")?.get("data_dir")?.as_str()?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Some(base.join(dir))
}

impl Config {
    /// The expiry dates `/metrics` shows for this config (contract §10): each anchor's
    /// notAfter, each anchor CRL's nextUpdate, the server certificate's notAfter.
    pub fn gauges(&self) -> crate::metrics::ConfigGauges {
        crate::metrics::ConfigGauges {
            anchors: self
                .anchors
                .iter()
                .map(|a| (a.name.clone(), a.info.validity.not_after))
                .collect(),
            crls: self
                .anchors
                .iter()
                .filter_map(|a| Some((a.name.clone(), a.crl.as_ref()?.next_update?)))
                .collect(),
            server_not_after: self
                .server
                .cert_chain
                .first()
                .and_then(|leaf| crate::cert::CertInfo::from_der(leaf).ok())
                .map_or(0, |info| info.validity.not_after),
        }
    }

    /// This config with `crl` in force for the anchor `anchor`, as fetched from `url`
    /// (docs/crl.md). None when the anchor no longer has that `crl_url` (a reload changed
    /// it meanwhile): the CRL is then not applied. Warnings are not carried over: they were
    /// logged when the file was loaded.
    pub fn with_crl(&self, anchor: &str, url: &CrlUrl, crl: Arc<Crl>) -> Option<Config> {
        let i = self
            .anchors
            .iter()
            .position(|a| a.name == anchor && a.crl_url.as_ref() == Some(url))?;
        let mut anchors = self.anchors.clone();
        anchors[i].crl = Some(crl);
        Some(Config {
            path: self.path.clone(),
            server: self.server.clone(),
            log: self.log.clone(),
            limits: self.limits.clone(),
            anchors,
            devices: self.devices.clone(),
            acl: self.acl.clone(),
            cluster: self.cluster.clone(),
            warnings: Vec::new(),
        })
    }

    /// The anchor with this name.
    pub fn anchor(&self, name: &str) -> Option<&Anchor> {
        self.anchors.iter().find(|a| a.name == name)
    }

    /// The pinned device with this name.
    pub fn pinned(&self, name: &str) -> Option<&PinnedDevice> {
        self.devices.iter().find(|d| d.name.as_str() == name)
    }

    /// An ACL profile by name (validated to exist for every rule at load).
    pub fn profile(&self, name: &str) -> Option<&Arc<Profile>> {
        self.acl.get(name)
    }

    /// Loads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut loader = Loader {
            file: path.to_path_buf(),
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            problems: Vec::new(),
            warnings: Vec::new(),
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(source) => {
                loader.problem(
                    "(file)",
                    ProblemKind::Read {
                        path: path.to_path_buf(),
                        source,
                    },
                );
                return Err(loader.into_error());
            }
        };
        let (raw, toml_problems) = raw::parse(&text);
        for p in toml_problems {
            loader.problem(p.field, p.kind);
        }
        match raw {
            Some(raw) => loader.build(raw),
            None => Err(loader.into_error()),
        }
    }
}

/// `[log]` (contract §2): how the broker writes its log. `RUST_LOG`, when set, overrides `level`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub format: LogFormat,
    /// A tracing filter: `info`, `warn`, `certmq=debug,info`...
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

/// One line per event either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `key=value` fields; values a peer chose are quoted and escaped.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// rustls's ClientHello parser warns, on every connection, about what the client got
/// wrong in it: most often an IP address sent as SNI (OpenSSL-based clients such as
/// `mosquitto_pub -h 127.0.0.1` do it; RFC 6066 forbids it and rustls ignores it), or a
/// malformed or repeated server name. Any client can cause these lines at will and the
/// operator can do nothing about them, so that one module is held to errors. A handshake
/// that fails over it is still logged by certmq; other rustls warnings are untouched.
const PEER_TRIGGERED: &str = "rustls::msgs::handshake=error";

/// The tracing filter for a `[log] level` (or `RUST_LOG`) value: the value, plus the hold
/// on rustls's ClientHello remarks unless the value names rustls itself (then it is the
/// operator's choice: `level = "info,rustls=debug"` shows them) or turns logging off (the
/// hold would turn that module's errors back on).
pub fn log_filter(level: &str) -> String {
    if level.contains("rustls") || level.split(',').any(|d| d.trim() == "off") {
        level.to_owned()
    } else if level.trim().is_empty() {
        PEER_TRIGGERED.to_owned()
    } else {
        format!("{level},{PEER_TRIGGERED}")
    }
}

/// The `[log]` table of a config file, read without validating anything else: logging is
/// set up before the config is loaded (so that loading can log). The default when the
/// file cannot be read or the table is invalid (`check` and `serve` then report it).
pub fn log_of(path: &Path) -> Log {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| toml::from_str::<toml::Table>(&text).ok())
        .and_then(|t| t.get("log").cloned())
        .and_then(|v| v.try_into::<Log>().ok())
        .unwrap_or_default()
}

/// Accumulates problems while building a [`Config`].
struct Loader {
    file: PathBuf,
    dir: PathBuf,
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl Loader {
    fn problem(&mut self, field: impl Into<String>, kind: ProblemKind) {
        self.problems.push(Problem {
            file: self.file.clone(),
            field: field.into(),
            kind,
        });
    }

    fn warning(&mut self, field: impl Into<String>, kind: ProblemKind) {
        self.warnings.push(Problem {
            file: self.file.clone(),
            field: field.into(),
            kind,
        });
    }

    fn into_error(self) -> ConfigError {
        ConfigError {
            path: self.file,
            problems: self.problems,
        }
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    fn build(mut self, raw: RawConfig) -> Result<Config, ConfigError> {
        // Where the broker keeps the CRLs it fetched (docs/crl.md).
        let data_dir = raw.server.as_ref().map(|s| self.resolve(&s.data_dir));
        let server = raw.server.and_then(|s| self.server(s));
        if let Err(source) = tracing_subscriber::EnvFilter::try_new(&raw.log.level) {
            self.problem(
                "log.level",
                ProblemKind::LogLevel {
                    value: raw.log.level.clone(),
                    source,
                },
            );
        }
        self.limits(&raw.limits);
        let acl = self.profiles(raw.acl);
        let anchors = self.anchors(raw.anchor, &acl, data_dir.as_deref());
        let devices = self.devices(raw.device, &acl);
        self.usable_rules(&anchors, &devices);
        let cluster = self.cluster(raw.cluster);
        match server {
            Some(server) if self.problems.is_empty() => Ok(Config {
                path: self.file,
                server,
                log: raw.log,
                limits: raw.limits,
                anchors,
                devices,
                acl,
                cluster,
                warnings: self.warnings,
            }),
            _ => Err(self.into_error()),
        }
    }

    fn address(&mut self, field: &str, value: &str) -> Option<SocketAddr> {
        match value.parse() {
            Ok(a) => Some(a),
            Err(source) => {
                self.problem(
                    field,
                    ProblemKind::Address {
                        value: value.to_owned(),
                        source,
                    },
                );
                None
            }
        }
    }

    fn server(&mut self, raw: RawServer) -> Option<Server> {
        let bind = self.address("server.bind", &raw.bind);
        let admin_bind = match raw.admin_bind.as_deref() {
            Some(a) => self.address("server.admin_bind", a),
            None => None,
        };
        let cert_chain_path = self.resolve(&raw.cert_chain);
        let private_key_path = self.resolve(&raw.private_key);
        let cert_chain = self.certificates("server.cert_chain", &cert_chain_path);
        let private_key = match PrivateKeyDer::from_pem_file(&private_key_path) {
            Ok(k) => Some(k),
            Err(source) => {
                self.problem(
                    "server.private_key",
                    ProblemKind::Key {
                        path: private_key_path.clone(),
                        source,
                    },
                );
                None
            }
        };
        let cert_chain = cert_chain?;
        let private_key = private_key?;
        let cert_info = self.cert_info("server.cert_chain", &cert_chain_path, &cert_chain[0])?;
        self.key_matches(&cert_chain, &private_key)?;
        Some(Server {
            bind: bind?,
            cert_chain_path,
            cert_chain,
            cert_info,
            private_key_path,
            private_key,
            data_dir: self.resolve(&raw.data_dir),
            admin_bind,
            proxy_protocol: raw.proxy_protocol,
        })
    }

    fn key_matches(
        &mut self,
        chain: &[CertificateDer<'static>],
        key: &PrivateKeyDer<'static>,
    ) -> Option<()> {
        let provider = crate::cert::provider();
        let signing_key = match provider.key_provider.load_private_key(key.clone_key()) {
            Ok(k) => k,
            Err(e) => {
                self.problem("server.private_key", ProblemKind::KeyUnsupported(e));
                return None;
            }
        };
        let certified = rustls::sign::CertifiedKey::new(chain.to_vec(), signing_key);
        match certified.keys_match() {
            Ok(()) => Some(()),
            Err(e) => {
                self.problem("server.private_key", ProblemKind::KeyMismatch(e));
                None
            }
        }
    }

    fn limits(&mut self, l: &Limits) {
        let checks = [
            ("limits.max_connections", l.max_connections == 0),
            ("limits.max_packet_size", l.max_packet_size < 2),
            ("limits.handshake_timeout", l.handshake_timeout == 0),
            ("limits.connect_timeout", l.connect_timeout == 0),
            ("limits.max_inflight", l.max_inflight == 0),
        ];
        for (field, bad) in checks {
            if bad {
                self.problem(field, ProblemKind::Zero(field));
            }
        }
        // Each delivery to an aliasing client scans its aliases (broker/conn/alias.rs).
        let field = "limits.max_server_topic_aliases";
        let max = MAX_SERVER_TOPIC_ALIASES;
        if l.max_server_topic_aliases > max {
            let max = u64::from(max);
            self.problem(field, ProblemKind::TooLarge { max });
        }
    }

    /// A file's bytes, or a problem naming it.
    fn read(&mut self, field: &str, path: &Path) -> Option<Vec<u8>> {
        match std::fs::read(path) {
            Ok(b) => Some(b),
            Err(source) => {
                self.problem(
                    field,
                    ProblemKind::Read {
                        path: path.to_path_buf(),
                        source,
                    },
                );
                None
            }
        }
    }

    /// All PEM certificates in a file; at least one.
    fn certificates(&mut self, field: &str, path: &Path) -> Option<Vec<CertificateDer<'static>>> {
        let bytes = self.read(field, path)?;
        let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
        match certs {
            Ok(c) if c.is_empty() => {
                self.problem(
                    field,
                    ProblemKind::NoCertificate {
                        path: path.to_path_buf(),
                    },
                );
                None
            }
            Ok(c) => Some(c),
            Err(source) => {
                self.problem(
                    field,
                    ProblemKind::Pem {
                        path: path.to_path_buf(),
                        source,
                    },
                );
                None
            }
        }
    }

    /// Exactly one certificate from a file (anchors and pinned devices).
    fn one_certificate(&mut self, field: &str, path: &Path) -> Option<CertificateDer<'static>> {
        let mut certs = self.certificates(field, path)?;
        if certs.len() > 1 {
            self.problem(
                field,
                ProblemKind::TooManyCertificates {
                    path: path.to_path_buf(),
                    count: certs.len(),
                },
            );
            return None;
        }
        certs.pop()
    }

    fn cert_info(
        &mut self,
        field: &str,
        path: &Path,
        der: &CertificateDer<'_>,
    ) -> Option<CertInfo> {
        match CertInfo::from_der(der) {
            Ok(i) => Some(i),
            Err(source) => {
                self.problem(
                    field,
                    ProblemKind::Certificate {
                        path: path.to_path_buf(),
                        source,
                    },
                );
                None
            }
        }
    }

    fn profiles(&mut self, raw: BTreeMap<String, RawProfile>) -> BTreeMap<String, Arc<Profile>> {
        let mut out = BTreeMap::new();
        out.insert("device".to_owned(), Arc::new(Profile::builtin_device()));
        for (name, p) in raw {
            match Profile::new(&p.publish, &p.subscribe, &p.deny_publish, &p.deny_subscribe) {
                Ok(profile) => {
                    out.insert(name, Arc::new(profile));
                }
                Err(e) => self.problem(format!("acl.{name}"), ProblemKind::Acl(e)),
            }
        }
        out
    }

    fn profile_exists(&mut self, field: &str, name: &str, acl: &BTreeMap<String, Arc<Profile>>) {
        if !acl.contains_key(name) {
            self.problem(
                field,
                ProblemKind::UnknownProfile {
                    name: name.to_owned(),
                },
            );
        }
    }

    /// Reports a rule certificate outside its validity period as a warning; returns whether
    /// the rule is usable now.
    fn usable_now(&mut self, field: &str, validity: &Validity) -> bool {
        match validity.check(UnixTime::now()) {
            Ok(()) => true,
            Err(crate::cert::ValidityError::Expired) => {
                self.warning(
                    field,
                    ProblemKind::Expired {
                        not_after: crate::cert::rfc3339(validity.not_after),
                    },
                );
                false
            }
            Err(crate::cert::ValidityError::NotYetValid) => {
                self.warning(
                    field,
                    ProblemKind::NotYetValid {
                        not_before: crate::cert::rfc3339(validity.not_before),
                    },
                );
                false
            }
        }
    }

    fn anchors(
        &mut self,
        raw: Vec<RawAnchor>,
        acl: &BTreeMap<String, Arc<Profile>>,
        data_dir: Option<&Path>,
    ) -> Vec<Anchor> {
        let mut out: Vec<Anchor> = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut fingerprints: HashMap<Fingerprint, String> = HashMap::new();
        for (i, a) in raw.into_iter().enumerate() {
            let field = format!("anchor[{i}] {:?}", a.name);
            if !valid_anchor_name(&a.name) {
                self.problem(
                    format!("{field}.name"),
                    ProblemKind::AnchorName {
                        value: a.name.clone(),
                    },
                );
            }
            if names.insert(a.name.clone(), i).is_some() {
                self.problem(
                    format!("{field}.name"),
                    ProblemKind::Duplicate {
                        value: a.name.clone(),
                    },
                );
            }
            self.profile_exists(&format!("{field}.acl"), &a.acl, acl);
            let cn_regex = match Regex::new(&a.cn_regex) {
                Ok(r) => Some(r),
                Err(e) => {
                    self.problem(format!("{field}.cn_regex"), ProblemKind::Regex(e));
                    None
                }
            };
            let cert_field = format!("{field}.certificate");
            let certificate_path = self.resolve(&a.certificate);
            let Some(der) = self.one_certificate(&cert_field, &certificate_path) else {
                continue;
            };
            let Some(info) = self.cert_info(&cert_field, &certificate_path, &der) else {
                continue;
            };
            if !info.is_ca {
                self.problem(
                    &cert_field,
                    ProblemKind::NotCa {
                        path: certificate_path.clone(),
                    },
                );
                continue;
            }
            if matches!(info.key_usage, Some((false, _))) {
                self.problem(
                    &cert_field,
                    ProblemKind::NoKeyCertSign {
                        path: certificate_path.clone(),
                    },
                );
            }
            if let Some(other) = fingerprints.insert(info.fingerprint, a.name.clone()) {
                self.problem(
                    &cert_field,
                    ProblemKind::SameCertificate {
                        other: format!("anchor {other:?}"),
                    },
                );
            }
            self.usable_now(&cert_field, &info.validity);
            let trust_anchor = match webpki::anchor_from_trusted_cert(&der) {
                Ok(t) => t.to_owned(),
                Err(source) => {
                    self.problem(
                        &cert_field,
                        ProblemKind::AnchorUnusable {
                            path: certificate_path.clone(),
                            source,
                        },
                    );
                    continue;
                }
            };
            let Some((crl, crl_url, crl_refresh)) =
                self.anchor_crl(&field, &a, &der, &info, data_dir)
            else {
                continue;
            };
            let Some(cn_regex) = cn_regex else { continue };
            out.push(Anchor {
                name: a.name,
                certificate_path,
                der,
                info,
                trust_anchor,
                cn_regex,
                create_devices: a.create_devices,
                acl: a.acl,
                crl: crl.map(Arc::new),
                crl_url,
                crl_refresh,
            });
        }
        out
    }

    /// Loads a CRL file (PEM or DER) and checks that this anchor issued and signed it.
    /// An anchor's CRL in force: from its `crl` file or the copy last fetched from its
    /// `crl_url` (the newer of the two), with the URL and refresh interval. None when the
    /// anchor is unusable (a problem was reported).
    fn anchor_crl(
        &mut self,
        field: &str,
        a: &RawAnchor,
        der: &CertificateDer<'_>,
        info: &CertInfo,
        data_dir: Option<&Path>,
    ) -> Option<(Option<Crl>, Option<CrlUrl>, u64)> {
        let file_crl = match &a.crl {
            Some(p) => {
                let path = self.resolve(p);
                self.crl(&format!("{field}.crl"), &path, der, info)
            }
            None => None,
        };
        if a.crl.is_some() && file_crl.is_none() {
            return None;
        }
        let (crl_url, crl_refresh) = self.crl_source(field, a)?;
        // With crl_url: the copy the broker fetched last, unless the file is newer.
        let fetched = match (&crl_url, data_dir) {
            (Some(url), Some(dir)) => {
                let path = crl::stored_path(dir, &a.name);
                self.stored_crl(&format!("{field}.crl_url"), &path, url, der, info)
            }
            _ => None,
        };
        let crl = match (file_crl, fetched) {
            (Some(f), Some(u)) if f.this_update > u.this_update => Some(f),
            (f, u) => u.or(f),
        };
        if let (Some(url), None) = (&crl_url, &crl) {
            self.warning(
                format!("{field}.crl_url"),
                ProblemKind::CrlNotFetched {
                    url: url.url.clone(),
                },
            );
        }
        Some((crl, crl_url, crl_refresh))
    }

    fn crl(
        &mut self,
        field: &str,
        path: &Path,
        anchor_der: &CertificateDer<'_>,
        anchor: &CertInfo,
    ) -> Option<Crl> {
        let bytes = self.read(field, path)?;
        match crl::verify(&bytes, anchor_der, anchor) {
            Ok(v) => {
                self.stale_warning(field, path, &v);
                Some(v.at(path.to_path_buf(), None))
            }
            Err(source) => {
                self.problem(
                    field,
                    ProblemKind::CrlInvalid {
                        path: path.to_path_buf(),
                        source,
                    },
                );
                None
            }
        }
    }

    /// The last good CRL fetched from `url`, kept in `data_dir` by the broker: a copy
    /// that is missing is not a problem (never fetched yet), one that is not valid for
    /// the anchor (its certificate changed) is a warning and is ignored.
    fn stored_crl(
        &mut self,
        field: &str,
        path: &Path,
        url: &CrlUrl,
        anchor_der: &CertificateDer<'_>,
        anchor: &CertInfo,
    ) -> Option<Crl> {
        let bytes = std::fs::read(path).ok()?;
        match crl::verify(&bytes, anchor_der, anchor) {
            Ok(v) => {
                self.stale_warning(field, path, &v);
                Some(v.at(path.to_path_buf(), Some(url.url.clone())))
            }
            Err(source) => {
                self.warning(
                    field,
                    ProblemKind::CrlStoredInvalid {
                        path: path.to_path_buf(),
                        source,
                    },
                );
                None
            }
        }
    }

    fn stale_warning(&mut self, field: &str, path: &Path, crl: &crl::Verified) {
        if let Some(next) = crl.next_update.filter(|_| crl.is_stale(now_secs())) {
            self.warning(
                field,
                ProblemKind::CrlStale {
                    path: path.to_path_buf(),
                    next_update: crate::cert::rfc3339(next),
                },
            );
        }
    }

    /// `crl_url` and `crl_refresh` of an anchor; None when they are invalid (reported).
    fn crl_source(&mut self, field: &str, a: &RawAnchor) -> Option<(Option<CrlUrl>, u64)> {
        let url = match a.crl_url.as_deref().map(CrlUrl::parse) {
            None => Ok(None),
            Some(Ok(u)) => Ok(Some(u)),
            Some(Err(reason)) => {
                self.problem(
                    format!("{field}.crl_url"),
                    ProblemKind::CrlUrl {
                        value: a.crl_url.clone().unwrap_or_default(),
                        reason,
                    },
                );
                Err(())
            }
        };
        let refresh = match a.crl_refresh {
            Some(_) if a.crl_url.is_none() => Err(ProblemKind::CrlRefreshWithoutUrl),
            Some(r) if !(crl::MIN_REFRESH..=crl::MAX_REFRESH).contains(&r) => {
                Err(ProblemKind::CrlRefresh { value: r })
            }
            Some(r) => Ok(r),
            None => Ok(crl::DEFAULT_REFRESH),
        };
        let refresh = refresh
            .map_err(|kind| self.problem(format!("{field}.crl_refresh"), kind))
            .ok()?;
        Some((url.ok()?, refresh))
    }

    fn devices(
        &mut self,
        raw: Vec<RawDevice>,
        acl: &BTreeMap<String, Arc<Profile>>,
    ) -> Vec<PinnedDevice> {
        let mut out = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut fingerprints: HashMap<Fingerprint, String> = HashMap::new();
        for (i, d) in raw.into_iter().enumerate() {
            let field = format!("device[{i}] {:?}", d.name);
            if names.insert(d.name.clone(), i).is_some() {
                self.problem(
                    format!("{field}.name"),
                    ProblemKind::Duplicate {
                        value: d.name.clone(),
                    },
                );
            }
            let name = match DeviceName::parse(&d.name) {
                Ok(n) => Some(n),
                Err(source) => {
                    self.problem(
                        format!("{field}.name"),
                        ProblemKind::DeviceName {
                            value: d.name.clone(),
                            source,
                        },
                    );
                    None
                }
            };
            self.profile_exists(&format!("{field}.acl"), &d.acl, acl);
            let cert_field = format!("{field}.certificate");
            let certificate_path = self.resolve(&d.certificate);
            let Some(der) = self.one_certificate(&cert_field, &certificate_path) else {
                continue;
            };
            let Some(info) = self.cert_info(&cert_field, &certificate_path, &der) else {
                continue;
            };
            if let Some(other) = fingerprints.insert(info.fingerprint, d.name.clone()) {
                self.problem(
                    &cert_field,
                    ProblemKind::SameCertificate {
                        other: format!("device {other:?}"),
                    },
                );
            }
            self.usable_now(&cert_field, &info.validity);
            let Some(name) = name else { continue };
            out.push(PinnedDevice {
                name,
                certificate_path,
                info,
                acl: d.acl,
            });
        }
        out
    }

    /// contract §2: expired rules are warnings unless no rule at all is usable.
    fn usable_rules(&mut self, anchors: &[Anchor], devices: &[PinnedDevice]) {
        let now = UnixTime::now();
        let usable = anchors.iter().any(|a| a.info.validity.check(now).is_ok())
            || devices.iter().any(|d| d.info.validity.check(now).is_ok());
        if !usable && self.problems.is_empty() {
            // The expiry warnings say which rules are unusable: without them the operator
            // reads only that none is. They become problems so that they are printed.
            let warnings = std::mem::take(&mut self.warnings);
            self.problems.extend(warnings);
            self.problem("anchor/device", ProblemKind::NoUsableRule);
        }
    }
}

/// Anchor names appear in logs, the registry and metric labels: keep them plain.
fn valid_anchor_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != PINNED_SOURCE
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn the_client_hello_remarks_are_held_unless_rustls_is_named() {
        assert_eq!(log_filter("info"), "info,rustls::msgs::handshake=error");
        assert_eq!(
            log_filter("warn,certmq=debug"),
            "warn,certmq=debug,rustls::msgs::handshake=error"
        );
        assert_eq!(log_filter("info,rustls=debug"), "info,rustls=debug");
        assert_eq!(log_filter("off"), "off");
        assert_eq!(log_filter(""), "rustls::msgs::handshake=error");
    }
}
