//! Cluster mode (contract §12, docs/cluster.md): several certmq nodes serve one fleet,
//! with every piece of shared state in NATS JetStream. Nodes never talk to each other;
//! each holds one NATS connection.
//!
//! - [`subject`]: MQTT topics and filters as NATS subjects (nats-server's own mapping).
//! - [`Names`]: every subject, stream, bucket and consumer name, derived from `prefix`.
//! - [`Cluster`]: the connection, its JetStream context and its health.
//! - [`registry`]: the device registry in the `<prefix>_registry` key-value bucket.
//! - [`claims`]: one session, one node; [`nodes`]: which nodes are alive; [`wills`]: the
//!   wills of a node that dies, published by another.

pub mod claims;
pub mod nodes;
pub mod registry;
pub mod route;
pub mod sessions;
pub mod subject;
pub mod wills;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;

use crate::config::Cluster as Settings;

/// How often a node looks for persistent sessions left behind by a dead node whose
/// expiry passed (docs/cluster.md "Persistent sessions").
const SESSION_SWEEP: Duration = Duration::from_secs(5);

/// How long the first connection to NATS may take at start.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Failures of the NATS side of a cluster node.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot read the NATS credentials file {path}")]
    Credentials {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to NATS at {servers}")]
    Connect {
        servers: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("JetStream {what} failed: {reason}")]
    JetStream { what: String, reason: String },
}

impl ClusterError {
    /// A JetStream failure with what was being done.
    pub fn jetstream(what: impl Into<String>, reason: impl std::fmt::Display) -> ClusterError {
        ClusterError::JetStream {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}

/// The names certmq uses in NATS, all derived from `[cluster] prefix` so that several
/// fleets can share one NATS system. Subjects (topic = the mapped MQTT topic, see
/// [`subject`]):
/// - `<prefix>.m.<topic>`: QoS 0 messages (core NATS);
/// - `<prefix>.q.<topic>`: QoS 1/2 messages, stored in the `<prefix>_msgs` stream;
/// - `<prefix>.r.<topic>`: retained messages, the last per subject in `<prefix>_retained`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Names {
    pub fn new(prefix: &str) -> Names {
        Names {
            prefix: prefix.to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The subject of a message on `subject` (already mapped) at this QoS class.
    pub fn message(&self, durable: bool, subject: &str) -> String {
        let class = if durable { 'q' } else { 'm' };
        format!("{}.{class}.{subject}", self.prefix)
    }

    /// The subject of the retained message of `subject` (already mapped).
    pub fn retained(&self, subject: &str) -> String {
        format!("{}.r.{subject}", self.prefix)
    }

    /// The stream of QoS 1/2 messages.
    pub fn messages_stream(&self) -> String {
        format!("{}_msgs", self.prefix)
    }

    /// The stream of retained messages.
    pub fn retained_stream(&self) -> String {
        format!("{}_retained", self.prefix)
    }

    /// A key-value bucket, e.g. `registry`, `claims`.
    pub fn bucket(&self, what: &str) -> String {
        format!("{}_{what}", self.prefix)
    }
}

/// A random id for a run of this process (16 hex digits).
fn run_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    // The system's random source failing is no reason to refuse to start: fall back on
    // the clock, which still differs between runs.
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        bytes = nanos.to_be_bytes();
    }
    hex(&bytes)
}

/// Lower-case hex of bytes: keys, run ids and binary header values the cluster writes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of [`hex`] text; None for anything else.
pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Opens the key-value bucket `<prefix>_<what>`, creating it (with `history` values per
/// key and the configured replicas) when no node has yet.
pub async fn bucket(
    cluster: &Cluster,
    what: &str,
    history: i64,
    description: &str,
) -> Result<jetstream::kv::Store, ClusterError> {
    let name = cluster.names.bucket(what);
    kv_bucket(cluster, &name, cluster.replicas(), history, description).await
}

/// Opens the key-value bucket `name`, creating it if missing.
///
/// Created as the stream a key-value bucket is (`KV_<bucket>` on `$KV.<bucket>.>`, the
/// settings `nats kv add` uses) rather than through `create_key_value`: async-nats 0.51
/// first reads the account's JetStream info, which nats-server 2.9 answers without
/// fields that client requires. Every node asks with the same settings, so concurrent
/// creations agree; a bucket created earlier with other settings (replicas changed
/// since) is used as it is, with a warning.
pub async fn kv_bucket(
    cluster: &Cluster,
    name: &str,
    replicas: usize,
    history: i64,
    description: &str,
) -> Result<jetstream::kv::Store, ClusterError> {
    open_kv(cluster, name, replicas, history, description, true).await
}

/// The bucket `<prefix>_<what>` (one value per key) whose keys are removed by erasing
/// their message ([`erase`]) rather than by a delete marker, which a bucket keeps forever:
/// for keys that are never written again once removed (they name a run of a node), so the
/// bucket holds what is live and nothing else.
pub async fn erasable_bucket(
    cluster: &Cluster,
    what: &str,
    description: &str,
) -> Result<jetstream::kv::Store, ClusterError> {
    let name = cluster.names.bucket(what);
    open_kv(cluster, &name, cluster.replicas(), 1, description, false).await
}

/// Removes the message `revision` of the erasable bucket whose stream is `stream` (see
/// [`erasable_bucket`]): Ok(true) when this call removed it, Ok(false) when it was no
/// longer there (replaced, or removed by another node first). This is the compare-and-set
/// that gives a key to exactly one of several nodes racing for it.
pub async fn erase(cluster: &Cluster, stream: &str, revision: u64) -> Result<bool, ClusterError> {
    /// The JetStream API's answer (`success`, or an `error`).
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(default)]
        success: bool,
        error: Option<serde_json::Value>,
    }
    // `no_erase`: the message is removed, not overwritten on disk first.
    let request = serde_json::json!({ "seq": revision, "no_erase": true });
    let answer: Answer = cluster
        .js
        .request(format!("STREAM.MSG.DELETE.{stream}"), &request)
        .await
        .map_err(|e| ClusterError::jetstream(format!("removing a value from {stream}"), e))?;
    Ok(answer.error.is_none() && answer.success)
}

/// Opens (creating) a bucket; `deny_delete` as the stream setting (false for
/// [`erasable_bucket`]).
async fn open_kv(
    cluster: &Cluster,
    name: &str,
    replicas: usize,
    history: i64,
    description: &str,
    deny_delete: bool,
) -> Result<jetstream::kv::Store, ClusterError> {
    use jetstream::stream;
    let config = stream::Config {
        name: format!("KV_{name}"),
        description: Some(description.to_owned()),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: history.max(1),
        storage: stream::StorageType::File,
        num_replicas: replicas,
        allow_rollup: true,
        deny_delete,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    };
    let what = || format!("opening bucket {name}");
    if let Err(created) = cluster.js.create_stream(config).await {
        if let Err(e) = cluster.js.get_stream(format!("KV_{name}")).await {
            return Err(ClusterError::jetstream(what(), format!("{created}; {e}")));
        }
        tracing::debug!(bucket = %name, error = %created, "using the existing bucket as it is");
    }
    cluster
        .js
        .get_key_value(name)
        .await
        .map_err(|e| ClusterError::jetstream(what(), e))
}

/// One node's handle on the cluster: cheap to clone.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub settings: Arc<Settings>,
    pub names: Names,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    /// Whether the NATS connection is up (kept by the client's event callback).
    connected: Arc<AtomicBool>,
    /// This process's run of the node: tells its messages and claims from those of an
    /// earlier run of the same node (random, 16 hex digits).
    pub run: String,
}

/// A node in the cluster: the connection and the parts that use it.
#[derive(Debug)]
pub struct Node {
    pub cluster: Cluster,
    pub claims: Arc<claims::Claims>,
    pub wills: Arc<wills::Wills>,
    pub sessions: Arc<sessions::SessionStore>,
}

impl Node {
    /// Joins: connects, creates what is missing in JetStream, loads the retained
    /// messages, starts routing, the claims watch and the heartbeat, attaches to the
    /// broker. Taking over dead nodes' wills starts later ([`wills::Wills::inherit`]),
    /// once the registry answers.
    pub async fn join(
        settings: &Settings,
        broker: Arc<crate::broker::Broker>,
        sessions: Arc<sessions::SessionStore>,
    ) -> Result<Node, ClusterError> {
        let cluster = Cluster::connect(settings).await?;
        route::Fabric::start(cluster.clone(), broker.clone()).await?;
        // Claims first: the session writer asks them who holds a session.
        let claims = claims::Claims::start(&cluster, broker.clone(), sessions.clone()).await?;
        sessions.start(&cluster, claims.clone()).await?;
        let wills = wills::Wills::start(&cluster, claims.clone(), &broker).await?;
        sessions.sweep(SESSION_SWEEP, wills.liveness());
        Ok(Node {
            cluster,
            claims,
            wills,
            sessions,
        })
    }
}

impl Cluster {
    /// Connects to NATS. The client reconnects by itself for as long as the node runs;
    /// [`Cluster::connected`] says whether it is connected now.
    pub async fn connect(settings: &Settings) -> Result<Cluster, ClusterError> {
        let connected = Arc::new(AtomicBool::new(false));
        let flag = connected.clone();
        let node = settings.node.clone();
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("certmq {}", settings.node))
            .connection_timeout(CONNECT_TIMEOUT)
            // Never give up: the node keeps serving locally and recovers when NATS returns.
            .max_reconnects(None)
            .event_callback(move |event| {
                let flag = flag.clone();
                let node = node.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            flag.store(true, Ordering::Relaxed);
                            tracing::info!(node = %node, "connected to NATS");
                        }
                        async_nats::Event::Disconnected => {
                            flag.store(false, Ordering::Relaxed);
                            tracing::warn!(node = %node, "disconnected from NATS; reconnecting");
                        }
                        other => tracing::info!(node = %node, event = %other, "NATS"),
                    }
                }
            });
        if let Some(path) = &settings.credentials {
            options = options.credentials_file(path).await.map_err(|source| {
                ClusterError::Credentials {
                    path: path.clone(),
                    source,
                }
            })?;
        }
        if let Some(ca) = &settings.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        let servers = settings.nats.join(", ");
        let client = options
            .connect(settings.nats.as_slice())
            .await
            .map_err(|source| ClusterError::Connect { servers, source })?;
        connected.store(true, Ordering::Relaxed);
        let js = jetstream::new(client.clone());
        Ok(Cluster {
            names: Names::new(&settings.prefix),
            settings: Arc::new(settings.clone()),
            client,
            js,
            connected,
            run: run_id(),
        })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.settings.node
    }

    /// Whether the NATS connection is up now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// JetStream replicas for every stream and bucket.
    pub fn replicas(&self) -> usize {
        self.settings.replicas
    }
}
