//! Retained messages at the broker level: the per-device quota on PUBLISH (contract §4
//! `max_retained_per_device`) with its store record, and the checks that pace every
//! matching retained message into a new subscription (contract §7), however many there are.
//!
//! A retained publish over its device's quota is neither retained nor routed to current
//! subscribers. Why not route it as a plain message: an MQTT 5 QoS 1/2 publisher is told
//! 0x97, a failure (MQTT 5 §3.4.2.1), and resends or gives up; had the message been routed
//! anyway, a resend would deliver it twice. And a retained message is the topic's state:
//! routed but not retained, current subscribers would see a state that a subscriber
//! arriving a second later never sees. One rule for every QoS and protocol version keeps
//! the outcome predictable: over the quota, the publish has no effect, and the drop is
//! counted (`certmq_messages_dropped_total{reason="retained_quota"}`) and logged.

use std::sync::Arc;

use super::journal::Op;
use super::message::Message;
use super::retain::QuotaExceeded;
use super::session::SessionRef;
use super::Broker;
use crate::identity::DeviceName;

/// The reason string of the 0x97 acknowledgement of a retained message over the quota.
pub const QUOTA_TEXT: &str = "retained message quota exceeded: the device already holds \
     max_retained_per_device retained topics; clear one with an empty retained message";

impl Broker {
    /// Stores (or, for an empty payload, clears) `msg` as the retained message of its topic,
    /// owned by the publishing device, unless that device already holds its quota of
    /// retained topics: then nothing changes, and the refusal is counted and logged.
    /// Ok(true) when the change went to the store (the publisher's acknowledgement waits
    /// for its commit). `owner` is the publishing device (a will published for a node that
    /// died has no publishing session); `publisher` its session, for the log.
    pub(super) fn keep_retained(
        &self,
        msg: &Arc<Message>,
        owner: Option<&DeviceName>,
        publisher: Option<&SessionRef>,
    ) -> Result<bool, QuotaExceeded> {
        let kept = (!msg.payload.is_empty()).then(|| msg.clone());
        let mut retained = self.retained.write().unwrap_or_else(|p| p.into_inner());
        if let Err(refused) = retained.set(&msg.topic, kept.clone(), owner) {
            drop(retained);
            self.retained_refused(msg, owner, publisher, refused);
            return Err(refused);
        }
        let Some(journal) = &self.journal else {
            return Ok(false);
        };
        // Submitted under the retained lock: store order = memory order per topic.
        journal.submit(Op::Retain {
            topic: msg.topic.as_str().to_owned(),
            owner: kept.as_ref().and(owner.cloned()),
            msg: kept,
        });
        Ok(true)
    }

    /// Cluster mode: the retained message another node accepted (its quota was checked
    /// there). Returns whether it was submitted to the local store.
    pub(super) fn keep_retained_from(
        &self,
        msg: &Arc<Message>,
        owner: Option<&DeviceName>,
    ) -> bool {
        let kept = (!msg.payload.is_empty()).then(|| msg.clone());
        // Never refused here: the origin node checked the quota, and the nodes' views of a
        // device's count can differ for a moment; the origin's decision stands.
        let mut retained = self.retained.write().unwrap_or_else(|p| p.into_inner());
        match &kept {
            Some(m) => retained.restore(&msg.topic, m.clone(), owner.cloned()),
            None => {
                let _ = retained.set(&msg.topic, None, None);
            }
        }
        let Some(journal) = &self.journal else {
            return false;
        };
        journal.submit(Op::Retain {
            topic: msg.topic.as_str().to_owned(),
            owner: kept.as_ref().and(owner.cloned()),
            msg: kept,
        });
        true
    }

    /// Counts a retained message refused over the quota; logged at powers of two of the
    /// running total, so a device retrying in a loop does not flood the log.
    fn retained_refused(
        &self,
        msg: &Message,
        owner: Option<&DeviceName>,
        publisher: Option<&SessionRef>,
        why: QuotaExceeded,
    ) {
        let total = self.metrics.count_drop("retained_quota");
        if total.is_power_of_two() {
            tracing::warn!(
                device = ?owner.map(|d| d.as_str()),
                client_id = ?publisher.map(|p| p.key.client_id.as_str()),
                topic = ?msg.topic.as_str(),
                qos = msg.qos as u8,
                max_retained_per_device = why.max,
                dropped_so_far = total,
                "retained message refused: the device holds its quota of retained topics"
            );
        }
    }

    /// Sets `max_retained_per_device` (at start and on reload). A device above a lowered
    /// quota keeps what it holds and can only replace or clear it.
    pub fn set_retained_quota(&self, max: usize) {
        self.retained
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .set_quota(max);
    }

    /// Whether `msg` is still the retained message of its topic: a retained delivery
    /// waiting in a session's backlog is skipped once a newer retained message replaced it
    /// (that one went to the subscription live) or the topic was cleared.
    pub fn still_retained(&self, msg: &Arc<Message>) -> bool {
        self.retained
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&msg.topic)
            .is_some_and(|current| Arc::ptr_eq(current, msg))
    }
}
