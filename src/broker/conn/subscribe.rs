//! SUBSCRIBE and UNSUBSCRIBE (contract §5, 6): filter validation, the `v1/devices/me/` alias,
//! filter coverage by the subscribe ACL, MQTT 5 subscription options, shared
//! subscriptions, and the retained messages a new subscription receives (all of them,
//! through the session's retained backlog, paced by its queue).

use super::{protocol_error, Conn, End};
use crate::acl;
use crate::broker::journal::Epoch;
use crate::broker::min_qos;
use crate::broker::router::{RetainHandling, SubOptions};
use crate::broker::session::{Delivery, Enqueued};
use crate::broker::wire::{self, RequestedFilter, SubResult};
use crate::mqtt::codec::v5;
use crate::mqtt::topic::{Subscription, TopicFilter};

/// Retained deliveries moved from a session's backlog into its queue at a time: the queue
/// is refilled up to this many (or half of `max_queued_messages`, if less), enough to keep
/// the in-flight window and the out buffer busy between two refills.
const RETAINED_REFILL: usize = 256;

impl Conn<'_> {
    pub(super) async fn on_subscribe(
        &mut self,
        pkid: u16,
        filters: Vec<RequestedFilter>,
        subscription_id: Option<u32>,
    ) -> Result<(), End> {
        if subscription_id == Some(0) {
            return Err(protocol_error(
                v5::DisconnectReasonCode::ProtocolError,
                "subscription identifier 0",
            ));
        }
        let epoch = self.epoch();
        let device_acl = self.session.acl();
        let mut results = Vec::with_capacity(filters.len());
        let mut retained = Vec::new();
        let mut denied = Vec::new();
        for f in filters {
            let Some((sub, aliased)) = self.canonical(&f.filter) else {
                results.push(SubResult::TopicFilterInvalid);
                continue;
            };
            if !device_acl.can_subscribe(sub.filter()) {
                self.log_denied(&f.filter, "subscription denied by ACL");
                results.push(SubResult::NotAuthorized);
                denied.push(f.filter);
                continue;
            }
            let shared = matches!(sub, Subscription::Shared { .. });
            if shared && f.no_local {
                return Err(protocol_error(
                    v5::DisconnectReasonCode::ProtocolError,
                    "No Local on a shared subscription",
                ));
            }
            let retain_handling = match f.retain_handling {
                0 => RetainHandling::SendAlways,
                1 => RetainHandling::SendIfNew,
                _ => RetainHandling::Never,
            };
            let opts = SubOptions {
                qos: f.qos,
                no_local: f.no_local,
                retain_as_published: f.retain_as_published,
                retain_handling,
                subscription_id,
            };
            // The snapshot above may be stale by now: a reload that narrowed the profile
            // meanwhile is seen here (`Broker::subscribe`), and the filter refused.
            let Some(existed) = self.broker.subscribe(self.session, &sub, opts, aliased) else {
                self.log_denied(
                    &f.filter,
                    "subscription denied by ACL: the profile changed during the SUBSCRIBE",
                );
                results.push(SubResult::NotAuthorized);
                denied.push(f.filter);
                continue;
            };
            results.push(SubResult::Granted(f.qos));
            // Retained messages: never for shared subscriptions (MQTT 5 §4.8.2).
            let send_retained = !shared
                && match retain_handling {
                    RetainHandling::SendAlways => true,
                    RetainHandling::SendIfNew => !existed,
                    RetainHandling::Never => false,
                };
            if send_retained {
                let now = crate::broker::message::Message::now();
                let mut matched = Vec::new();
                // The ACL in force now, not the packet's snapshot: a reload during the
                // SUBSCRIBE narrows what its retained messages may show too.
                let acl = self.session.acl();
                for (topic, msg) in self.broker.retained_matching(sub.filter()) {
                    if msg.expired(now) || !acl.can_receive(&topic) {
                        continue;
                    }
                    matched.push(Delivery {
                        qos: min_qos(msg.qos, f.qos),
                        retain: true,
                        sub_ids: subscription_id.into_iter().collect(),
                        store_id: None,
                        msg,
                    });
                }
                retained.push((sub.filter().clone(), matched));
            }
        }
        self.commit_session_change(epoch).await?;
        let text = (!denied.is_empty())
            .then(|| format!("not authorized to subscribe to {}", denied.join(", ")));
        self.send(&wire::suback(
            self.p.protocol,
            pkid,
            &results,
            self.reason(text.as_deref()),
        ))
        .await?;
        // contract §7: every match is delivered, paced by the queue's room (`refill_retained`),
        // however many; the first ones go now, ahead of later live messages.
        for (filter, deliveries) in retained {
            self.session.add_retained(&filter, deliveries);
        }
        self.refill_retained();
        Ok(())
    }

    /// Moves retained deliveries from the session's backlog into its queue while the queue
    /// has room (called whenever the connection looks for something to send). Each is
    /// checked again: one whose topic got a newer retained message meanwhile (delivered to
    /// this subscription live) or was cleared is skipped, as is one the session's current
    /// ACL no longer lets it receive.
    pub(super) fn refill_retained(&self) {
        while let Some((filter, batch)) = self.session.take_retained(self.conn_id, RETAINED_REFILL)
        {
            let acl = self.session.acl();
            let mut queued = false;
            let mut batch = batch.into_iter();
            while let Some(d) = batch.next() {
                if !self.broker.still_retained(&d.msg) || !acl.can_receive(&d.msg.topic) {
                    continue;
                }
                match self.session.enqueue(d.clone()) {
                    Enqueued::Queued | Enqueued::QueuedDroppedOldQos0 => queued = true,
                    Enqueued::DroppedOffline | Enqueued::Denied => {}
                    // Live messages filled the queue meanwhile: the rest waits, none lost.
                    Enqueued::DroppedFull | Enqueued::DroppedStalled => {
                        let rest = std::iter::once(d).chain(batch).collect();
                        self.session.untake_retained(filter, rest);
                        return;
                    }
                }
            }
            if queued {
                return;
            }
            // Everything taken was stale: take the next ones rather than wait for a wake.
        }
    }

    pub(super) async fn on_unsubscribe(
        &mut self,
        pkid: u16,
        filters: Vec<String>,
    ) -> Result<(), End> {
        let epoch = self.epoch();
        let mut existed = Vec::with_capacity(filters.len());
        for f in filters {
            match self.canonical(&f) {
                Some((sub, _)) => {
                    existed.push(self.broker.unsubscribe(self.session, &sub));
                    self.session.drop_retained(sub.filter());
                }
                None => existed.push(false),
            }
        }
        self.commit_session_change(epoch).await?;
        self.send(&wire::unsuback(self.p.protocol, pkid, &existed))
            .await
    }

    /// contract §7: a persistent session's SUBACK / UNSUBACK is sent only once the change is
    /// committed, or a `kill -9` right after it would silently undo what was acknowledged.
    /// A store that cannot commit ends the connection unacknowledged (the client retries).
    ///
    /// A session taken over meanwhile is not acknowledged either: the store skips a change
    /// of a session another node holds now (cluster mode, docs/cluster.md "Persistent
    /// sessions") and releases the session here before answering, so the change is in
    /// neither the session nor its record; the connection ends as taken over.
    async fn commit_session_change(&self, epoch: Option<Epoch>) -> Result<(), End> {
        if self.session.journal().is_none() {
            return Ok(());
        }
        if !self.commit(epoch).await {
            return Err(protocol_error(
                v5::DisconnectReasonCode::QuotaExceeded,
                "the message store cannot record the subscription now",
            ));
        }
        if !self.broker.is_current(self.session) {
            return Err(End::TakenOver);
        }
        Ok(())
    }

    /// The log line of a filter refused by the ACL.
    fn log_denied(&self, filter: &str, what: &'static str) {
        tracing::info!(
            device = ?self.device,
            client_id = ?self.session.key.client_id,
            filter = ?filter,
            "{what}"
        );
    }

    /// Parses a requested filter and applies the `me` alias to its filter part; the flag
    /// says whether the alias applied (deliveries then go back under `me`).
    fn canonical(&self, requested: &str) -> Option<(Subscription, bool)> {
        let sub = Subscription::parse(requested).ok()?;
        let device = self.device.as_str();
        let Some(aliased) = acl::alias_inbound(sub.filter().as_str(), device) else {
            return Some((sub, false));
        };
        let filter = TopicFilter::parse(&aliased).ok()?;
        let sub = match sub {
            Subscription::Plain(_) => Subscription::Plain(filter),
            Subscription::Shared { group, .. } => Subscription::Shared { group, filter },
        };
        Some((sub, true))
    }
}
