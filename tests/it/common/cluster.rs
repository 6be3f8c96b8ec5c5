//! Cluster-mode fixtures (contract §12): node configs sharing one fixture's PKI, each node
//! with its own data_dir and both listeners on port 0, all pointing at one nats-server.

use std::path::PathBuf;

use super::nats::Nats;
use super::ops::Proc;
use super::Fixture;

/// The body of a node's config: `[server]` (own data_dir), `[limits]`, `[cluster]` for
/// `node` against `nats`, then `body` (anchors, devices, profiles).
pub fn node_config(fx: &Fixture, nats: &Nats, node: &str, body: &str) -> PathBuf {
    node_config_with(fx, nats, node, "", body)
}

/// [`node_config`] with extra `[cluster]` keys (e.g. `prefix = "x"`).
pub fn node_config_with(
    fx: &Fixture,
    nats: &Nats,
    node: &str,
    cluster_extra: &str,
    body: &str,
) -> PathBuf {
    let text = format!(
        "[server]\nbind = \"127.0.0.1:0\"\nadmin_bind = \"127.0.0.1:0\"\ncert_chain = \"server.pem\"\nprivate_key = \"server.key\"\ndata_dir = \"data-{node}\"\n\n[limits]\nhandshake_timeout = 5\nconnect_timeout = 5\n\n[cluster]\nnode = \"{node}\"\nnats = [\"{}\"]\n{cluster_extra}\n\n{body}\n",
        nats.url()
    );
    fx.write(&format!("certmq-{node}.toml"), &text)
}

/// Starts one node as a subprocess.
pub async fn start_node(fx: &Fixture, nats: &Nats, node: &str, body: &str) -> Proc {
    let config = node_config(fx, nats, node, body);
    let proc = Proc::start(fx, &config).await;
    // Logged before the listeners: already among the lines `start` read.
    assert!(
        proc.stderr().contains("joined the cluster"),
        "{}",
        proc.stderr()
    );
    proc
}
