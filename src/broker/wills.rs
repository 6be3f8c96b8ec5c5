//! A will's life beside [`Broker::publish_will`]: its ticket, and in cluster mode its
//! record for the other nodes through the [`WillKeeper`](super::remote::WillKeeper) port
//! (docs/cluster.md, "Wills of a node that dies"): recorded while its connection is
//! attached, marked waiting when the connection ends with a delay, and forgotten once
//! it is published or cancelled here.

use std::sync::atomic::Ordering;

use super::session::{Expiry, SessionRef};
use super::{Broker, Will};

impl Broker {
    /// A connection with `will` attached to `session`: gives the will its ticket and, in
    /// cluster mode, records it for the other nodes.
    pub fn hold_will(&self, session: &SessionRef, will: &mut Will) {
        will.ticket = self.next_will.fetch_add(1, Ordering::Relaxed);
        if let Some(keeper) = self.wills.get() {
            keeper.will_set(&session.key, will, Self::will_delay(session, will));
        }
    }

    /// The connection ended without its will (DISCONNECT, revoked, shutdown): its record
    /// goes.
    pub fn drop_will(&self, session: &SessionRef, will: &Will) {
        self.will_settled(session, will.ticket);
    }

    /// How long a will of `session` waits after its connection ends: its Will Delay
    /// Interval, at most the session's expiry.
    pub(super) fn will_delay(session: &SessionRef, will: &Will) -> u32 {
        match session.expiry() {
            Expiry::OnDisconnect => 0,
            Expiry::After(s) => will.delay.min(s),
            Expiry::Never => will.delay,
        }
    }

    /// The will of `ticket` waits `delay` seconds here.
    pub(super) fn will_waits(&self, session: &SessionRef, ticket: u64, delay: u32) {
        if let Some(keeper) = self.wills.get() {
            keeper.will_pending(&session.key, ticket, delay);
        }
    }

    /// The will of `ticket` was published or cancelled here.
    pub(super) fn will_settled(&self, session: &SessionRef, ticket: u64) {
        if let Some(keeper) = self.wills.get() {
            keeper.will_clear(&session.key, ticket);
        }
    }

    /// Whether this node may still publish the will of `ticket` (always, standalone).
    pub(super) fn will_ours(&self, session: &SessionRef, ticket: u64, delayed: bool) -> bool {
        let ours = self
            .wills
            .get()
            .is_none_or(|k| k.will_ours(&session.key, ticket, delayed));
        if !ours {
            tracing::info!(
                device = ?session.key.device,
                client_id = ?session.key.client_id,
                "will not published here: another node took it over or holds the session"
            );
        }
        ours
    }
}
