//! Inbound PUBLISH (contract §5, 6): topic alias resolution (MQTT 5), topic validation, the
//! `v1/devices/me/` alias, the publish ACL, then QoS 0/1/2 with exactly-once inbound
//! (method A: routed on PUBLISH, the packet id remembered until PUBREL, so a resent
//! duplicate is acknowledged but not routed again, also across a reconnect).

use std::sync::Arc;

use super::{protocol_error, Conn, End};
use crate::acl;
use crate::broker::journal::Epoch;
use crate::broker::message::Message;
use crate::broker::session::InboundQos2;
use crate::broker::wire::{self, AckReason, InPublish};
use crate::broker::Published;
use crate::mqtt::codec::{v5, Protocol, QoS};
use crate::mqtt::topic::TopicName;

/// One barrier for two: completes when both have, with the first failure if any.
fn both(a: Option<Barrier>, b: Option<Barrier>) -> Option<Barrier> {
    use crate::broker::journal::CommitError;
    match (a, b) {
        (Some(a), Some(b)) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let a = a.await.unwrap_or(Err(CommitError::Stopped));
                let b = b.await.unwrap_or(Err(CommitError::Stopped));
                let _ = tx.send(a.and(b));
            });
            Some(rx)
        }
        (a, b) => a.or(b),
    }
}

/// A store barrier an acknowledgement waits for.
pub(super) type Barrier = tokio::sync::oneshot::Receiver<crate::broker::journal::Commit>;

/// A PUBACK or PUBREC waiting for its message's commit (contract §7: acknowledged means
/// stored). The loop keeps reading meanwhile; acknowledgements leave in PUBLISH order.
/// A QoS 0 retained message waits here too, with nothing to send: its commit is not
/// awaited one message at a time, but it still counts against the bound on what waits.
pub(super) struct PendingAck {
    /// None when nothing had to be stored (it waits only for those before it).
    pub(super) wait: Option<Barrier>,
    pub(super) qos: QoS,
    pub(super) pkid: u16,
    /// What to send once committed; None for QoS 0.
    pub(super) ack: Option<crate::mqtt::codec::Packet>,
    /// The store's epoch before the message's ops were submitted: a batch that failed
    /// since then fails this acknowledgement too (see `journal::Epoch`).
    pub(super) epoch: Option<Epoch>,
}

impl PendingAck {
    fn new(
        wait: Option<Barrier>,
        qos: QoS,
        pkid: u16,
        ack: crate::mqtt::codec::Packet,
    ) -> PendingAck {
        PendingAck {
            wait,
            qos,
            pkid,
            ack: Some(ack),
            epoch: None,
        }
    }

    /// A QoS 0 message's commit: nothing to send, only something to wait for.
    fn commit_only(wait: Option<Barrier>, epoch: Option<Epoch>) -> PendingAck {
        PendingAck {
            wait,
            qos: QoS::AtMostOnce,
            pkid: 0,
            ack: None,
            epoch,
        }
    }
}

/// What the synchronous part of an inbound PUBLISH decided.
enum Next {
    Duplicate,
    OverLimit,
    /// Not allowed by the ACL (the topic, for the reason string).
    Denied(TopicName),
    /// Routed; and whether it carried a retained payload.
    Routed(Published, bool),
}

/// A routed message some of whose sessions had no room yet (contract §9 flow control), and what
/// its acknowledgement needs once they do.
pub(super) struct Paced {
    /// What routing did so far.
    published: Published,
    /// Deliveries still to offer, each to its session.
    pub(super) waiting: Vec<(
        crate::broker::session::SessionRef,
        crate::broker::session::Delivery,
    )>,
    qos: QoS,
    pkid: u16,
    /// A retained message (with a payload): the retained store took it.
    retained: bool,
    /// The store's epoch before routing (see `PendingAck::epoch`).
    epoch: Option<Epoch>,
}

impl Conn<'_> {
    /// A PUBLISH from the client, top-down: topic (alias, `me`), store health, ACL, the
    /// inbound QoS 2 id and routing (one store group), then acknowledge or wait for room.
    pub(super) async fn on_publish(&mut self, p: InPublish) -> Result<(), End> {
        if p.has_subscription_ids {
            return Err(protocol_error(
                v5::DisconnectReasonCode::ProtocolError,
                "a PUBLISH from a client may not carry subscription identifiers",
            ));
        }
        let mut p = p;
        let topic = self.canonical_topic(&mut p)?;
        // A store that cannot commit refuses new QoS 1/2 messages up front, once a probe
        // write confirms it still cannot (so it recovers when space comes back).
        if p.qos != QoS::AtMostOnce && self.store_refuses().await {
            // In order: everything acknowledged before this refusal goes first.
            Box::pin(self.drain_acks()).await?;
            return Box::pin(self.refuse_unstored(p.qos, p.pkid)).await;
        }
        let allowed = self.may_publish(&topic);
        let (qos, pkid) = (p.qos, p.pkid);
        let epoch = self.broker.journal().map(|j| j.epoch());
        let (mut published, retained) = match self.take(topic, p, allowed) {
            Next::Duplicate => {
                // A duplicate of a PUBLISH already routed: acknowledge only.
                let ack = wire::pubrec(self.p.protocol, pkid, AckReason::Success, None);
                return self
                    .queue_ack(PendingAck::new(None, QoS::ExactlyOnce, pkid, ack))
                    .await;
            }
            Next::OverLimit => {
                return Err(protocol_error(
                    v5::DisconnectReasonCode::ReceiveMaximumExceeded,
                    "more QoS 2 messages in flight than the Receive Maximum",
                ));
            }
            Next::Denied(topic) => {
                let text = format!("not authorized to publish to {topic}");
                return self
                    .acknowledge(qos, pkid, AckReason::NotAuthorized, None, None, Some(&text))
                    .await;
            }
            Next::Routed(published, retained) => (published, retained),
        };
        let waiting = std::mem::take(&mut published.waiting);
        let paced = Paced {
            published,
            waiting,
            qos,
            pkid,
            retained,
            epoch,
        };
        if paced.waiting.is_empty() {
            self.finish_publish(paced).await
        } else {
            // Flow control: nothing more is read from this client until every session the
            // message must reach has room for it (see `Conn::next_event`).
            self.paced = Some(paced);
            Ok(())
        }
    }

    /// The topic the ACL and the router see: the client's alias resolved, then
    /// `v1/devices/me/...` rewritten to `v1/devices/<name>/...`.
    /// The topic is taken out of `p` (no copy per message).
    fn canonical_topic(&mut self, p: &mut InPublish) -> Result<TopicName, End> {
        let invalid = |t: &str, e: &dyn std::fmt::Display| {
            protocol_error(
                v5::DisconnectReasonCode::TopicNameInvalid,
                &format!("invalid topic name {t:?}: {e}"),
            )
        };
        let topic = self.resolve_alias(p)?;
        let name = TopicName::parse_owned(topic).map_err(|(e, t)| invalid(&t, &e))?;
        match acl::alias_inbound(name.as_str(), self.device.as_str()) {
            Some(t) => TopicName::parse(&t).map_err(|e| invalid(&t, &e)),
            None => Ok(name),
        }
    }

    /// Whether the message store is failing and a probe write confirms it, or (cluster
    /// mode) the other nodes cannot store messages now.
    async fn store_refuses(&self) -> bool {
        if !self.broker.remote_accepting() {
            return true;
        }
        match self.broker.journal().filter(|s| s.failing()) {
            // Boxed: a rare path whose state need not live in every connection's task.
            Some(journal) => Box::pin(journal.probe()).await.is_err(),
            None => false,
        }
    }

    /// The session's ACL on this topic; a denial is counted and logged.
    fn may_publish(&mut self, topic: &TopicName) -> bool {
        let epoch = self.session.acl_epoch();
        if self
            .allowed
            .as_ref()
            .is_some_and(|(e, t)| *e == epoch && t == topic)
        {
            return true;
        }
        let allowed = self.session.acl().can_publish(topic);
        if allowed {
            self.allowed = Some((epoch, topic.clone()));
        } else {
            self.broker.metrics.dropped("acl", 1);
            tracing::info!(
                device = ?self.device,
                client_id = ?self.session.key.client_id,
                topic = ?topic.as_str(),
                "publish denied by ACL"
            );
        }
        allowed
    }

    /// Records the inbound QoS 2 id (only when the message is accepted) and routes the
    /// message, in one store group (committed whole or not at all): synchronous, so the
    /// group's guard is gone before any await.
    fn take(&mut self, topic: TopicName, p: InPublish, allowed: bool) -> Next {
        let _group = self.broker.journal().map(|s| s.group());
        let (qos, pkid) = (p.qos, p.pkid);
        // MQTT 5 clients were told our Receive Maximum; 3.1.1 clients cannot be, and lose
        // nothing to it: their reads pause while acknowledgements wait.
        let limit = (self.p.protocol == Protocol::V5).then_some(self.p.receive_max);
        let begin = match qos {
            QoS::ExactlyOnce => self.session.inbound_qos2_begin(pkid, limit),
            _ => InboundQos2::New,
        };
        match begin {
            InboundQos2::Duplicate => Next::Duplicate,
            InboundQos2::OverLimit => Next::OverLimit,
            InboundQos2::New if !allowed => {
                if qos == QoS::ExactlyOnce {
                    self.session.inbound_qos2_persist(pkid);
                }
                Next::Denied(topic)
            }
            InboundQos2::New => {
                let retained = p.retain && !p.payload.is_empty();
                let published = self.route(topic, p);
                if qos == QoS::ExactlyOnce && published.waiting.is_empty() {
                    self.session.inbound_qos2_persist(pkid);
                }
                Next::Routed(published, retained)
            }
        }
    }

    /// Offers the paced message again to the sessions that had no room; acknowledges it
    /// once every one has taken it (or stalled, or gone offline).
    pub(super) async fn retry_paced(&mut self) -> Result<(), End> {
        let Some(mut paced) = self.paced.take() else {
            return Ok(());
        };
        {
            // The last deliveries and the inbound QoS 2 id in one store group. A crash
            // while the message was paced leaves the deliveries queued before without the
            // id: the client's resend is then routed again (a duplicate, never a loss).
            let _group = self.broker.journal().map(|s| s.group());
            let mut still = Vec::new();
            for (session, delivery) in std::mem::take(&mut paced.waiting) {
                if let Err(delivery) = self.broker.offer(&mut paced.published, &session, delivery) {
                    still.push((session, delivery));
                }
            }
            paced.waiting = still;
            if paced.waiting.is_empty() && paced.qos == QoS::ExactlyOnce {
                self.session.inbound_qos2_persist(paced.pkid);
            }
        }
        if paced.waiting.is_empty() {
            self.finish_publish(paced).await
        } else {
            self.paced = Some(paced);
            Ok(())
        }
    }

    /// Acknowledges a routed message: for QoS 1/2 after its commit, and with 0x97 for an
    /// MQTT 5 publisher when sessions matched and none could take it (contract §7, no silent
    /// loss; a 3.1.1 publisher cannot be told, and the drop is counted and logged, per
    /// device in `devices show`).
    async fn finish_publish(&mut self, paced: Paced) -> Result<(), End> {
        let Paced {
            mut published,
            qos,
            pkid,
            retained,
            epoch,
            ..
        } = paced;
        // Cluster mode: stored for the other nodes too before it is acknowledged.
        let remote = published.remote.take();
        if published.retained_refused {
            // contract §4: over the device's max_retained_per_device, neither retained nor
            // routed; an MQTT 5 QoS 1/2 publisher is told (3.1.1 cannot be).
            let reason = match self.p.protocol {
                Protocol::V5 => AckReason::QuotaExceeded,
                Protocol::V311 => AckReason::Success,
            };
            let text = Some(crate::broker::retained::QUOTA_TEXT);
            return self.acknowledge(qos, pkid, reason, None, None, text).await;
        }
        if qos == QoS::AtMostOnce {
            if published.durable {
                // Nothing to acknowledge: waiting here for each commit capped a connection
                // at one retained message per fsync (~400/s). The commit joins the pending
                // acknowledgements instead, so many share one fsync, and reading still
                // pauses while more than `receive_max` wait: a retained QoS 0 flood has
                // back-pressure, at most that many uncommitted messages per connection. A
                // failed commit is logged when it completes.
                let wait = self.broker.journal().map(|s| s.barrier_rx());
                return self
                    .queue_ack(PendingAck::commit_only(both(wait, remote), epoch))
                    .await;
            }
            if remote.is_some() {
                return self.queue_ack(PendingAck::commit_only(remote, None)).await;
            }
            return Ok(());
        }
        let mut wait = if published.durable {
            self.broker.journal().map(|s| s.barrier_rx())
        } else {
            None
        };
        if qos == QoS::ExactlyOnce && wait.is_none() && self.session.journal().is_some() {
            // The inbound id is committed with the message (a restart keeps it).
            wait = self.broker.journal().map(|s| s.barrier_rx());
        }
        // A retained message was taken: by the retained store.
        let nobody = published.queued == 0 && published.refused > 0 && !retained;
        let reason = if nobody && self.p.protocol == Protocol::V5 {
            AckReason::QuotaExceeded
        } else {
            AckReason::Success
        };
        let text = (reason == AckReason::QuotaExceeded)
            .then_some("no subscriber could take the message: their queues are full");
        self.acknowledge(qos, pkid, reason, both(wait, remote), epoch, text)
            .await
    }

    /// Queues the PUBACK (QoS 1) or PUBREC (QoS 2) of a message; nothing for QoS 0. A
    /// PUBREC with an error reason ends an MQTT 5 exchange: no PUBREL follows, so the
    /// inbound id is released.
    async fn acknowledge(
        &mut self,
        qos: QoS,
        pkid: u16,
        reason: AckReason,
        wait: Option<Barrier>,
        epoch: Option<Epoch>,
        text: Option<&str>,
    ) -> Result<(), End> {
        let text = self.reason(text);
        let ack = match qos {
            QoS::AtMostOnce => return Ok(()),
            QoS::AtLeastOnce => wire::puback(self.p.protocol, pkid, reason, text),
            QoS::ExactlyOnce => {
                if reason != AckReason::Success && self.p.protocol == Protocol::V5 {
                    self.session.inbound_qos2_release(pkid);
                }
                wire::pubrec(self.p.protocol, pkid, reason, text)
            }
        };
        let ack = PendingAck {
            epoch,
            ..PendingAck::new(wait, qos, pkid, ack)
        };
        self.queue_ack(ack).await
    }

    /// MQTT 5 §3.3.2.3.4: a topic alias with a topic sets it; an alias alone uses it. The
    /// topic is taken out of `p`.
    fn resolve_alias(&mut self, p: &mut InPublish) -> Result<String, End> {
        use v5::DisconnectReasonCode as D;
        let Some(alias) = p.topic_alias else {
            if p.topic.is_empty() {
                return Err(protocol_error(
                    D::ProtocolError,
                    "empty topic name without a topic alias",
                ));
            }
            return Ok(std::mem::take(&mut p.topic));
        };
        if alias == 0 || alias > self.p.topic_alias_max {
            return Err(protocol_error(
                D::TopicAliasInvalid,
                &format!("topic alias {alias} outside 1..={}", self.p.topic_alias_max),
            ));
        }
        if p.topic.is_empty() {
            self.aliases.get(&alias).cloned().ok_or_else(|| {
                protocol_error(
                    D::ProtocolError,
                    &format!("topic alias {alias} was never set"),
                )
            })
        } else {
            self.aliases.insert(alias, p.topic.clone());
            Ok(std::mem::take(&mut p.topic))
        }
    }

    /// Routes the message. A publisher feeding a subscriber that falls behind yields its
    /// thread (see [`Published::congested`]).
    fn route(&mut self, topic: TopicName, p: InPublish) -> Published {
        let message = Message {
            topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            props: p.props,
            expires_at: Message::deadline_from_now(p.message_expiry),
            store_id: Default::default(),
        };
        self.broker
            .publish_cached(Arc::new(message), self.session, &mut self.routes)
    }

    /// Queues an acknowledgement behind those already waiting (PUBACK and PUBREC go out in
    /// the order of their PUBLISHes, MQTT-4.6.0-2/3), then sends every one that is ready.
    pub(super) async fn queue_ack(&mut self, ack: PendingAck) -> Result<(), End> {
        self.pending.push_back(ack);
        self.send_ready_acks().await
    }

    /// Sends acknowledgements from the front while their commit is done.
    pub(super) async fn send_ready_acks(&mut self) -> Result<(), End> {
        while let Some(front) = self.pending.front_mut() {
            let outcome = match &mut front.wait {
                None => Ok(()),
                Some(rx) => match rx.try_recv() {
                    Ok(r) => r,
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => return Ok(()),
                    Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                        Err(crate::broker::journal::CommitError::Stopped)
                    }
                },
            };
            let Some(done) = self.pending.pop_front() else {
                break;
            };
            self.finish_ack(done, outcome).await?;
        }
        Ok(())
    }

    /// Sends one acknowledgement whose commit finished (or refuses it if it failed).
    pub(super) async fn finish_ack(
        &mut self,
        ack: PendingAck,
        outcome: crate::broker::journal::Commit,
    ) -> Result<(), End> {
        let outcome = match (ack.epoch, self.broker.journal()) {
            (Some(epoch), Some(journal)) => journal.since(epoch, outcome),
            _ => outcome,
        };
        let Some(packet) = &ack.ack else {
            // QoS 0: nobody to tell. The message was routed; only its durability failed.
            if let Err(e) = outcome {
                tracing::error!(device = ?self.device, error = %e, "message not durable");
            }
            return Ok(());
        };
        match outcome {
            Ok(()) => self.send(packet).await,
            Err(e) => {
                tracing::error!(device = ?self.device, error = %e, "message not durable");
                if ack.qos == QoS::ExactlyOnce {
                    self.session.inbound_qos2_release(ack.pkid);
                }
                Box::pin(self.refuse_unstored(ack.qos, ack.pkid)).await
            }
        }
    }

    /// Waits for every queued acknowledgement and sends it.
    pub(super) async fn drain_acks(&mut self) -> Result<(), End> {
        while let Some(mut front) = self.pending.pop_front() {
            let outcome = match front.wait.take() {
                None => Ok(()),
                Some(rx) => rx
                    .await
                    .unwrap_or(Err(crate::broker::journal::CommitError::Stopped)),
            };
            self.finish_ack(front, outcome).await?;
        }
        Ok(())
    }

    /// The store's epoch, read before submitting ops that [`Conn::commit`] then waits for.
    pub(super) fn epoch(&self) -> Option<Epoch> {
        self.broker.journal().map(|j| j.epoch())
    }

    /// Waits for the group commit of what this connection submitted since `epoch` (taken
    /// with [`Conn::epoch`] before submitting); false if it failed, or if any batch failed
    /// since `epoch` (see `journal::Epoch`).
    pub(super) async fn commit(&self, epoch: Option<Epoch>) -> bool {
        let Some(journal) = self.broker.journal() else {
            return true;
        };
        let outcome = journal.barrier().await;
        let outcome = match epoch {
            Some(epoch) => journal.since(epoch, outcome),
            None => outcome,
        };
        match outcome {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(device = ?self.device, error = %e, "message not durable");
                false
            }
        }
    }

    /// contract §7: a QoS 1/2 message the store cannot keep is not acknowledged. MQTT 5 gets
    /// PUBACK/PUBREC 0x97 (quota exceeded) with a reason string; MQTT 3.1.1 has no negative
    /// acknowledgement, so the connection is closed unacknowledged (the client resends).
    async fn refuse_unstored(&mut self, qos: QoS, pkid: u16) -> Result<(), End> {
        self.broker.metrics.dropped("store_unavailable", 1);
        let text = "the message store cannot accept messages now";
        match (self.p.protocol, qos) {
            (Protocol::V5, QoS::AtLeastOnce) => {
                self.send(&wire::puback(
                    self.p.protocol,
                    pkid,
                    AckReason::QuotaExceeded,
                    self.reason(Some(text)),
                ))
                .await
            }
            (Protocol::V5, _) => {
                self.send(&wire::pubrec(
                    self.p.protocol,
                    pkid,
                    AckReason::QuotaExceeded,
                    self.reason(Some(text)),
                ))
                .await
            }
            (Protocol::V311, _) => Err(protocol_error(
                v5::DisconnectReasonCode::QuotaExceeded,
                text,
            )),
        }
    }
}
