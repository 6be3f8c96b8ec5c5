//! The certmq load generator (contract §11): a plain MQTT 3.1.1 client over tokio-rustls that
//! targets any MQTT-over-TLS broker with client certificates, so that certmq and Mosquitto
//! are measured by the very same client.
//!
//! ```text
//! cli::Args -> run -> creds (identities, issued off the async workers)
//!                  -> connect | storm | flow (fan-in, fan-out) | idle | capacity
//!                     (queued, retained)   each over conn::Conn
//!                  -> report::Report (table or one JSON line)
//! ```
//!
//! The generator shares the machine with the broker, so it is built to be cheap: a
//! hand-rolled codec (`mqtt`), packets batched into one write, latencies kept in a `Vec`
//! and sorted once. It never retries (except `storm`, where a device tries again until it
//! is back, as devices do): a failure is counted and reported, because a broker that
//! refuses work under load is a result too.

pub mod capacity;
pub mod cli;
pub mod conn;
pub mod connect;
pub mod creds;
pub mod flow;
pub mod idle;
pub mod mqtt;
pub mod procfs;
pub mod report;
pub mod storm;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cli::{Args, Workload};
use creds::{Credentials, CredsError};
use report::Report;

/// Why a run failed as a whole. A single connection's failure is a counted figure of the
/// run instead (see each workload); these are the failures that leave nothing to report.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("no client identity: give --cert/--key or --issuer-cert/--issuer-key")]
    NoIdentity,
    #[error(transparent)]
    Creds(#[from] CredsError),
    #[error("cannot resolve {host}:{port}")]
    Resolve {
        host: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("{host}:{port} resolves to no address")]
    NoAddress { host: String, port: u16 },
    #[error("{name:?} is not a valid TLS server name")]
    ServerName {
        name: String,
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer to {what} within {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("the broker closed the connection during {what}")]
    Closed { what: &'static str },
    #[error("the broker sent a malformed packet")]
    Mqtt(#[from] mqtt::MqttError),
    #[error("CONNACK refused the connection with return code {code}")]
    Refused { code: u8 },
    #[error("SUBACK refused {filter:?} (code {code:#04x}): the subscriber identity must be allowed to read it (--sub-cert)")]
    SubscribeRefused { filter: String, code: u8 },
    #[error("expected {expected}, the broker sent {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("could not read {path}")]
    Proc {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no field {field}")]
    ProcFormat { path: String, field: &'static str },
    #[error("{path}: field {field} is not a number")]
    ProcNumber {
        path: String,
        field: &'static str,
        #[source]
        source: std::num::ParseIntError,
    },
    #[error("{need} connections need about {need} file descriptors, the limit is {limit}: raise it with `ulimit -n` before starting the generator")]
    FdLimit { need: usize, limit: u64 },
    #[error("a worker task failed")]
    Join(#[from] tokio::task::JoinError),
    #[error("every one of {attempts} connections failed; the first failure")]
    AllFailed {
        attempts: usize,
        #[source]
        first: Box<LoadError>,
    },
}

/// Everything a workload needs, shared by its tasks.
pub struct Ctx {
    /// Where publishers (connect, idle: every connection) connect.
    pub target: conn::Target,
    /// Where subscribers connect (fan-in, fan-out): `target` unless `--sub-host` or
    /// `--sub-port` names another broker, e.g. another node of a cluster.
    pub sub_target: conn::Target,
    /// Publishers' (connect, idle: every connection's) identities.
    pub creds: Credentials,
    /// Subscribers' identity (fan-in, fan-out).
    pub sub_creds: Credentials,
    /// Subscribers connect with clean session 0 (`--persistent-subscribers`).
    pub persistent_subscribers: bool,
    pub topic_template: String,
    pub label: String,
    pub pid: Option<u32>,
    /// The zero of every timestamp carried in a payload: publishers and subscribers run in
    /// this one process, so a monotonic clock is shared and exact.
    pub epoch: Instant,
}

impl Ctx {
    /// Nanoseconds since `epoch`, as carried in payloads.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The topic a device publishes on.
    pub fn topic_for(&self, device: &str) -> String {
        self.topic_template.replace("{device}", device)
    }
}

/// Runs the workload `args` names and returns its result.
pub async fn run(args: &Args) -> Result<Report, LoadError> {
    let target = conn::Target::resolve(args)?;
    let sub_target = conn::Target::resolve_sub(args)?;
    let source = args.source().ok_or(LoadError::NoIdentity)?;
    let count = match args.workload {
        Workload::Connect => args.connections.unwrap_or(2000),
        Workload::Idle => args.connections.unwrap_or(10_000),
        Workload::Storm => args.connections.unwrap_or(5_000),
        Workload::FanIn => usize::from(args.publishers),
        Workload::FanOut | Workload::Queued | Workload::Retained => 1,
    };
    report::progress(&format!(
        "{} {}: preparing {count} client identit{}",
        args.workload.name(),
        args.label,
        if count == 1 { "y" } else { "ies" }
    ));
    let ca = args.ca.clone();
    let creds = {
        let source = source.clone();
        let ca = ca.clone();
        let resume = args.resume;
        tokio::task::spawn_blocking(move || Credentials::load(&source, &ca, count, resume))
            .await??
    };
    let sub_creds = match args.sub_source() {
        Some(sub) => {
            tokio::task::spawn_blocking(move || Credentials::load(&sub, &ca, 1, false)).await??
        }
        None => creds.clone(),
    };
    let ctx = Arc::new(Ctx {
        target,
        sub_target,
        creds,
        sub_creds,
        persistent_subscribers: args.persistent_subscribers,
        topic_template: args.topic.clone(),
        label: args.label.clone(),
        pid: args.pid,
        epoch: Instant::now(),
    });
    match args.workload {
        Workload::Connect => connect::run(&ctx, count, usize::from(args.concurrency)).await,
        Workload::Storm => storm::run(&ctx, count, usize::from(args.concurrency)).await,
        Workload::Idle => {
            let plan = idle::Plan {
                connections: count,
                concurrency: usize::from(args.concurrency),
                settle: args.settle,
                hold: args.hold,
            };
            idle::run(&ctx, &plan).await
        }
        Workload::Queued | Workload::Retained => {
            let plan = capacity::Plan {
                messages: args.connections.unwrap_or(10_000) as u64,
                payload: usize::from(args.payload),
                settle: args.settle,
            };
            match args.workload {
                Workload::Queued => capacity::queued(&ctx, &plan).await,
                _ => capacity::retained(&ctx, &plan).await,
            }
        }
        Workload::FanIn | Workload::FanOut => {
            let fan_in = args.workload == Workload::FanIn;
            let plan = flow::Plan {
                workload: args.workload,
                publishers: if fan_in {
                    usize::from(args.publishers)
                } else {
                    1
                },
                subscribers: if fan_in {
                    1
                } else {
                    usize::from(args.subscribers)
                },
                qos: args.qos,
                duration: args.duration,
                window: usize::from(args.window),
                payload: usize::from(args.payload),
                rate: (args.rate > 0.0).then_some(args.rate),
                retain: args.retain,
            };
            flow::run(&ctx, &plan).await
        }
    }
}

/// The first address of `host:port`.
fn resolve(host: &str, port: u16) -> Result<SocketAddr, LoadError> {
    (host, port)
        .to_socket_addrs()
        .map_err(|source| LoadError::Resolve {
            host: host.to_owned(),
            port,
            source,
        })?
        .next()
        .ok_or_else(|| LoadError::NoAddress {
            host: host.to_owned(),
            port,
        })
}
