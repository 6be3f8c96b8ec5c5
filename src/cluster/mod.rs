//! Cluster mode (contract §12, docs/cluster.md): several certmq nodes serve one fleet,
//! with every piece of shared state in NATS JetStream. Nodes never talk to each other;
//! each holds one NATS connection.
//!
//! - [`subject`]: MQTT topics and filters as NATS subjects (nats-server's own mapping).
//! - [`Names`]: every subject, stream, bucket and consumer name, derived from `prefix`.
//! - [`Cluster`]: the connection, its JetStream context and its health.
//! - [`registry`]: the device registry in the `<prefix>_registry` key-value bucket.

pub mod registry;
pub mod subject;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;

use crate::config::Cluster as Settings;

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

/// One node's handle on the cluster: cheap to clone.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub settings: Arc<Settings>,
    pub names: Names,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    /// Whether the NATS connection is up (kept by the client's event callback).
    connected: Arc<AtomicBool>,
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
