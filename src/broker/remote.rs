//! The ports to other nodes (cluster mode): the broker tells a [`Remote`] about every
//! message accepted on this node and about the filters its local sessions subscribe to
//! (docs/cluster.md "Routing"); the remote side delivers other nodes' messages back through
//! [`Broker::publish_remote`](super::Broker::publish_remote). A [`WillKeeper`] keeps the
//! wills of this node's connections where the other nodes find them should this node die
//! (docs/cluster.md "Wills of a node that dies"). The broker owns the ports and never names
//! the implementation, so the cluster module depends on the broker and not the reverse.

use std::sync::Arc;

use tokio::sync::oneshot;

use rustls_pki_types::CertificateDer;

use super::journal::Commit;
use super::message::Message;
use super::session::SessionKey;
use super::{Will, WillGate};
use crate::cert::Fingerprint;
use crate::identity::DeviceName;
use crate::mqtt::topic::Subscription;
use crate::registry::Source;

/// Completes once the other nodes' shared store holds a message (QoS 1/2, retained).
pub type Stored = oneshot::Receiver<Commit>;

/// The other nodes, as the broker sees them.
pub trait Remote: Send + Sync + std::fmt::Debug + 'static {
    /// A message accepted on this node (after ACL), published by `device` through the
    /// connection of `client_id` (None: the broker itself, e.g. a will). Returns what the publisher's acknowledgement must also
    /// wait for: Some for QoS 1/2 and retained messages, which are acknowledged only once
    /// stored for the other nodes; None for QoS 0.
    fn forward(
        &self,
        msg: &Arc<Message>,
        device: Option<&DeviceName>,
        client_id: Option<&str>,
    ) -> Option<Stored>;

    /// Whether messages to be stored can be taken now. When false (NATS unreachable), a
    /// QoS 1/2 PUBLISH is refused before it is routed, as when the local store fails.
    fn accepting(&self) -> bool;

    /// Whether a message on `topic` can travel to the other nodes (and be kept for
    /// persistent sessions there). One that cannot stays on this node, where it is routed
    /// to every matching session, persistent ones included.
    fn carries(&self, topic: &str) -> bool;

    /// The first local subscription on `sub` appeared (`added`), or the last one went.
    /// Called in the order the router changed, under the router's lock: implementations
    /// only queue the change.
    fn interest(&self, sub: &Subscription, added: bool);
}

/// The certificate a will's connection was admitted with (leaf first), and the rule and
/// fingerprint the device's registry entry was bound to then: what a node publishing the
/// will after the connection's node died decides the device's standing from again, as
/// the node itself would have ([`Will::gate`]).
#[derive(Debug, Clone)]
pub struct WillPresenter {
    pub source: Source,
    pub fingerprint: Fingerprint,
    pub chain: Arc<Vec<CertificateDer<'static>>>,
}

/// Builds the check a will of `device` passes before a node publishes it for a node that
/// died: the same verdict as [`Will::gate`], against this node's registry and config.
/// Without a presenter (a will recorded without its certificate), the device's entry and
/// profile only.
pub type WillGates = Arc<dyn Fn(&DeviceName, Option<&WillPresenter>) -> WillGate + Send + Sync>;

/// Where the wills of this node's connections are kept for the other nodes, so that one of
/// them publishes a will if this node dies before it could (cluster mode). Each connection's
/// will carries a ticket ([`Will::ticket`]): successive connections of one session on this
/// node are told apart by it. Implementations only queue the change: these are called from
/// the connection's task and the will timers, never to wait on the network.
pub trait WillKeeper: Send + Sync + std::fmt::Debug + 'static {
    /// A connection with `will` attached to the session `key`; `delay` (seconds) is how
    /// long the will would wait after the connection ends.
    fn will_set(&self, key: &SessionKey, will: &Will, delay: u32);

    /// The connection of `ticket` ended and its will waits `delay` seconds on this node.
    fn will_pending(&self, key: &SessionKey, ticket: u64, delay: u32);

    /// The will of `ticket` was published or cancelled on this node.
    fn will_clear(&self, key: &SessionKey, ticket: u64);

    /// Whether this node may still publish the will of `ticket`: false once another node
    /// took it over (this node was taken for dead), and, for a `delayed` will, once a
    /// connection on another node claimed the session (a new connection before the delay
    /// passed cancels the will).
    fn will_ours(&self, key: &SessionKey, ticket: u64, delayed: bool) -> bool;
}
