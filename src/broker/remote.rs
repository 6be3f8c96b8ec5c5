//! The port to other nodes (cluster mode, docs/cluster.md "Routing"): the broker tells a
//! [`Remote`] about every message accepted on this node and about the filters its local
//! sessions subscribe to; the remote side delivers other nodes' messages back through
//! [`Broker::publish_remote`](super::Broker::publish_remote). The broker owns the port
//! and never names the implementation, so the cluster module depends on the broker and
//! not the reverse.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::journal::Commit;
use super::message::Message;
use crate::identity::DeviceName;
use crate::mqtt::topic::Subscription;

/// Completes once the other nodes' shared store holds a message (QoS 1/2, retained).
pub type Stored = oneshot::Receiver<Commit>;

/// The other nodes, as the broker sees them.
pub trait Remote: Send + Sync + std::fmt::Debug + 'static {
    /// A message accepted on this node (after ACL), published by `device` (None: the
    /// broker itself, e.g. a will). Returns what the publisher's acknowledgement must also
    /// wait for: Some for QoS 1/2 and retained messages, which are acknowledged only once
    /// stored for the other nodes; None for QoS 0.
    fn forward(&self, msg: &Arc<Message>, device: Option<&DeviceName>) -> Option<Stored>;

    /// Whether messages to be stored can be taken now. When false (NATS unreachable), a
    /// QoS 1/2 PUBLISH is refused before it is routed, as when the local store fails.
    fn accepting(&self) -> bool;

    /// The first local subscription on `sub` appeared (`added`), or the last one went.
    /// Called in the order the router changed, under the router's lock: implementations
    /// only queue the change.
    fn interest(&self, sub: &Subscription, added: bool);
}
