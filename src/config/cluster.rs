//! `[cluster]` (contract §12): the NATS JetStream cluster this node shares its state with.
//! Without the table the broker is standalone (SQLite), as before.

use std::path::PathBuf;

use serde::Deserialize;

use super::{Loader, ProblemKind};

/// The most JetStream replicas a stream or bucket can have (NATS' own limit).
const MAX_REPLICAS: usize = 5;

/// A validated `[cluster]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// This node's name: unique in the cluster; in logs, metrics, claims and consumer names.
    pub node: String,
    /// NATS server URLs (`nats://host:port` or `tls://host:port`).
    pub nats: Vec<String>,
    /// Names every subject, stream and bucket certmq uses (see `cluster::Names`).
    pub prefix: String,
    /// JetStream replicas of every stream and bucket certmq creates.
    pub replicas: usize,
    /// A NATS credentials file (JWT + nkey seed), when the servers require one.
    pub credentials: Option<PathBuf>,
    /// A CA certificate (PEM) to verify `tls://` NATS servers with, instead of the
    /// system's roots.
    pub tls_ca: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    node: String,
    nats: Vec<String>,
    #[serde(default = "default_prefix")]
    prefix: String,
    #[serde(default = "default_replicas")]
    replicas: usize,
    credentials: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
}

fn default_prefix() -> String {
    "certmq".to_owned()
}

fn default_replicas() -> usize {
    1
}

/// A name that is one NATS subject token and a valid stream, bucket and consumer name:
/// ASCII letters, digits, `-` and `_`, 1 to 32 characters.
fn token(value: &str) -> bool {
    (1..=32).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Loader {
    pub(super) fn cluster(&mut self, raw: Option<RawCluster>) -> Option<Cluster> {
        let raw = raw?;
        let before = self.problems.len();
        for (field, value) in [("cluster.node", &raw.node), ("cluster.prefix", &raw.prefix)] {
            if !token(value) {
                self.problem(
                    field,
                    ProblemKind::ClusterName {
                        value: value.clone(),
                    },
                );
            }
        }
        if raw.nats.is_empty() {
            self.problem("cluster.nats", ProblemKind::NoNatsServer);
        }
        for url in &raw.nats {
            let scheme_ok = ["nats://", "tls://"]
                .iter()
                .any(|s| url.strip_prefix(s).is_some_and(|rest| !rest.is_empty()));
            if !scheme_ok {
                self.problem("cluster.nats", ProblemKind::NatsUrl { value: url.clone() });
            }
        }
        if !(1..=MAX_REPLICAS).contains(&raw.replicas) {
            self.problem(
                "cluster.replicas",
                ProblemKind::Replicas {
                    value: raw.replicas,
                    max: MAX_REPLICAS,
                },
            );
        }
        let credentials = raw.credentials.map(|p| self.resolve(&p));
        let tls_ca = raw.tls_ca.map(|p| self.resolve(&p));
        for (field, path) in [
            ("cluster.credentials", &credentials),
            ("cluster.tls_ca", &tls_ca),
        ] {
            if let Some(path) = path {
                if let Err(source) = std::fs::metadata(path) {
                    self.problem(
                        field,
                        ProblemKind::Read {
                            path: path.clone(),
                            source,
                        },
                    );
                }
            }
        }
        (self.problems.len() == before).then_some(Cluster {
            node: raw.node,
            nats: raw.nats,
            prefix: raw.prefix,
            replicas: raw.replicas,
            credentials,
            tls_ca,
        })
    }
}
