//! The command line: `cargo bench --bench load -- <workload> [options]`.
//!
//! One flat set of options for every workload (each uses the ones that apply), so that a
//! script can pass the same target and identity options to every run and vary only the
//! workload. Durations are parsed into `Duration` here, once.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Parser, ValueEnum};

use super::creds::Source;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// N full mTLS handshakes + CONNECT/CONNACK + DISCONNECT, C at a time.
    Connect,
    /// P publishers, 1 subscriber reading every publisher's topic.
    FanIn,
    /// 1 publisher, S subscribers on its topic.
    FanOut,
    /// N connections opened and held; the broker's RSS before and after.
    Idle,
    /// N devices connect once, then all reconnect at the same moment (with `--resume`,
    /// resuming their TLS sessions); connects/s and the time until all are back.
    Storm,
    /// N QoS 1 messages kept for one offline persistent session; the broker's RSS.
    Queued,
    /// N retained messages, one topic each; the broker's RSS.
    Retained,
}

impl Workload {
    /// The name used on the command line, in tables and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Connect => "connect",
            Workload::FanIn => "fan-in",
            Workload::FanOut => "fan-out",
            Workload::Idle => "idle",
            Workload::Storm => "storm",
            Workload::Queued => "queued",
            Workload::Retained => "retained",
        }
    }
}

/// Load generator for any MQTT-over-TLS broker with client certificates.
#[derive(Debug, Clone, Parser)]
#[command(name = "load", about)]
#[command(group(ArgGroup::new("identity").required(true).args(["cert", "issuer_cert"])))]
pub struct Args {
    #[arg(value_enum)]
    pub workload: Workload,

    /// Broker address (an IP address or a name to resolve).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8883)]
    pub port: u16,
    /// Name the server certificate must carry (default: --host, and --sub-host for the
    /// subscribers when given).
    #[arg(long)]
    pub server_name: Option<String>,
    /// Where the subscribers of fan-in and fan-out connect, when not to the publishers'
    /// broker: another node of a cluster, so that every message crosses between nodes
    /// (default: --host).
    #[arg(long)]
    pub sub_host: Option<String>,
    /// The subscribers' port (default: --port).
    #[arg(long)]
    pub sub_port: Option<u16>,
    /// PEM file of the CA certificate(s) that issued the server certificate.
    #[arg(long)]
    pub ca: PathBuf,

    /// One client chain (leaf first) used by every connection.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// A CA certificate that issues one device certificate per connection
    /// (CN bench-<i>.devices.example.com, ECDSA P-256).
    #[arg(long, requires = "issuer_key")]
    pub issuer_cert: Option<PathBuf>,
    #[arg(long, requires = "issuer_cert")]
    pub issuer_key: Option<PathBuf>,
    /// Keep issued device certificates here and reuse them in later runs.
    #[arg(long, requires = "issuer_cert")]
    pub devices_dir: Option<PathBuf>,
    /// Number of the first issued device: connection i is bench-<offset + i>. Lets a
    /// script measure first contact with devices a broker has never seen.
    #[arg(long, default_value_t = 0, requires = "issuer_cert")]
    pub device_offset: usize,
    /// Subscriber identity for fan-in/fan-out (must be allowed to read the topics;
    /// default: the first publisher's identity).
    #[arg(long, requires = "sub_key")]
    pub sub_cert: Option<PathBuf>,
    #[arg(long, requires = "sub_cert")]
    pub sub_key: Option<PathBuf>,

    /// Subscribers use persistent sessions (clean session 0, a client id unique to this
    /// run): a durable broker then stores every QoS 1 message before its PUBACK.
    #[arg(long)]
    pub persistent_subscribers: bool,

    /// Topic template; {device} is the publishing device's name.
    #[arg(long, default_value = "devices/{device}/bench")]
    pub topic: String,
    /// Broker label in the output.
    #[arg(long, default_value = "broker")]
    pub label: String,
    /// Broker process id: report its CPU time (and RSS for idle) from /proc.
    #[arg(long)]
    pub pid: Option<u32>,

    /// Connections (connect: default 2000; idle: default 10000; storm: devices, default
    /// 5000), or messages (queued, retained: default 10000).
    #[arg(short = 'n', long)]
    pub connections: Option<usize>,
    /// Keep TLS sessions for resumption: each identity has its own client config and
    /// session cache, so a device resumes only its own session. Off by default (every
    /// connection a full handshake).
    #[arg(long)]
    pub resume: bool,
    /// Connections opened at the same time (connect, idle).
    #[arg(short = 'c', long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// Publishers (fan-in).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    pub publishers: u16,
    /// Subscribers (fan-out).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    pub subscribers: u16,
    /// QoS of publications and subscriptions (fan-in, fan-out).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// Seconds of publishing (fan-in, fan-out).
    #[arg(long, default_value = "5", value_parser = parse_secs)]
    pub duration: Duration,
    /// Unacknowledged QoS 1 PUBLISHes allowed per publisher.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    pub window: u16,
    /// Payload bytes; the first 20 carry the send time, the publisher and a sequence
    /// number.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(20..))]
    pub payload: u16,
    /// Messages per second per publisher; 0 = as fast as the broker takes them.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Publish with RETAIN set (fan-in, fan-out): every message replaces its topic's
    /// retained message, which a durable broker stores.
    #[arg(long)]
    pub retain: bool,
    /// Idle, queued, retained: seconds to wait after the last connection opened (the last
    /// PUBACK) before reading the RSS.
    #[arg(long, default_value = "2", value_parser = parse_secs)]
    pub settle: Duration,
    /// Idle: seconds to keep holding the connections after the measurement.
    #[arg(long, default_value = "0", value_parser = parse_secs)]
    pub hold: Duration,
    /// Idle: local addresses to connect from, in turn (e.g. 127.0.0.1,127.0.0.2). One
    /// source address has about 28,000 ephemeral ports (ip_local_port_range) towards one
    /// server port: more idle connections than that need several.
    #[arg(long, value_delimiter = ',')]
    pub source_addrs: Vec<std::net::IpAddr>,
    /// Seconds any single wait on the broker may take.
    #[arg(long, default_value = "15", value_parser = parse_secs)]
    pub timeout: Duration,
    /// One JSON object per result line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    pub bench: bool,
}

impl Args {
    /// Where the publishers' (and connect/idle connections') identities come from.
    pub fn source(&self) -> Option<Source> {
        match (&self.cert, &self.key, &self.issuer_cert, &self.issuer_key) {
            (Some(cert), Some(key), _, _) => Some(Source::Single {
                cert: cert.clone(),
                key: key.clone(),
            }),
            (_, _, Some(cert), Some(key)) => Some(Source::Issuer {
                cert: cert.clone(),
                key: key.clone(),
                devices_dir: self.devices_dir.clone(),
                offset: self.device_offset,
            }),
            _ => None,
        }
    }

    /// The subscribers' identity when one was given.
    pub fn sub_source(&self) -> Option<Source> {
        match (&self.sub_cert, &self.sub_key) {
            (Some(cert), Some(key)) => Some(Source::Single {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number of seconds: {e}"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?} is not a duration: {e}"))
}
