//! A published application message as the broker keeps it: canonical topic (the
//! `v1/devices/me/` alias already applied), payload, QoS, retain, the MQTT 5 properties
//! that travel with it, and its expiry. Shared by every subscriber through an `Arc`, and
//! stored once in the message store however many sessions hold it ([`StoreId`]).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::mqtt::codec::QoS;
use crate::mqtt::topic::TopicName;

/// MQTT 5 properties forwarded to subscribers unchanged (MQTT 5 §3.3.2.3). The topic
/// alias and subscription identifiers are per connection and are not kept here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarded {
    pub payload_format_indicator: Option<u8>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
}

impl Forwarded {
    pub fn is_empty(&self) -> bool {
        *self == Forwarded::default()
    }
}

/// One application message.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: TopicName,
    pub payload: Bytes,
    /// The QoS it was published with; each subscriber gets min(this, granted).
    pub qos: QoS,
    pub retain: bool,
    pub props: Forwarded,
    /// MQTT 5 Message Expiry Interval, as a deadline.
    pub expires_at: Option<Instant>,
    /// Its row in the message store, once stored.
    pub store_id: StoreId,
}

/// A message's identity in the message store: the id of its one row in the `messages`
/// table, which every session's queue row and the retained entry reference. Assigned by
/// the store when it first writes the message, or read back at recovery; it lives in the
/// message itself so that the `Arc` shared by N sessions is written once, not N times.
///
/// A clone is a new message to the store (it may be changed before it is published):
/// cloning gives an unassigned id. Only the `Arc` carries the identity.
#[derive(Debug, Default)]
pub struct StoreId(OnceLock<i64>);

impl StoreId {
    /// The id of a message read back from the store.
    pub fn assigned(id: i64) -> StoreId {
        StoreId(OnceLock::from(id))
    }

    /// The id, assigning `next()` if the message has none yet.
    pub fn get_or_assign(&self, next: impl FnOnce() -> i64) -> i64 {
        *self.0.get_or_init(next)
    }

    /// The id, if the message was stored.
    pub fn get(&self) -> Option<i64> {
        self.0.get().copied()
    }
}

impl Clone for StoreId {
    fn clone(&self) -> StoreId {
        StoreId::default()
    }
}

impl Message {
    /// Whether the message expired (MQTT 5 §3.3.2.3.3: then it is not delivered).
    pub fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| now >= t)
    }

    /// The remaining expiry interval in whole seconds, for the outgoing PUBLISH.
    /// Rounded up: a 10 s message forwarded a millisecond after it arrived still says 10
    /// (rounding down told subscribers 9), and a message about to expire says 1, never 0.
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|t| {
            let left = t.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
        })
    }

    /// The deadline for an expiry interval given in seconds.
    pub fn deadline(interval: Option<u32>, now: Instant) -> Option<Instant> {
        interval.map(|s| now + Duration::from_secs(u64::from(s)))
    }

    /// [`Message::deadline`] from now, reading the clock only when there is an interval.
    pub fn deadline_from_now(interval: Option<u32>) -> Option<Instant> {
        interval.map(|s| Message::now() + Duration::from_secs(u64::from(s)))
    }

    /// The clock message expiry is measured on. Tokio's: outside a test runtime whose
    /// clock is paused it is `Instant::now()`; inside one, expiry follows virtual time as
    /// keep alive and will delays do (the paused-time tests in `broker/conn/tests.rs`).
    pub fn now() -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_remaining_expiry_rounds_up() {
        let now = Instant::now();
        let msg = |left: Duration| Message {
            topic: TopicName::parse("t").unwrap(),
            payload: Bytes::new(),
            qos: QoS::AtMostOnce,
            retain: false,
            props: Forwarded::default(),
            expires_at: Some(now + left),
            store_id: StoreId::default(),
        };
        assert_eq!(
            msg(Duration::from_millis(9_999)).remaining_expiry(now),
            Some(10)
        );
        assert_eq!(msg(Duration::from_secs(10)).remaining_expiry(now), Some(10));
        assert_eq!(
            msg(Duration::from_millis(10_001)).remaining_expiry(now),
            Some(11)
        );
        assert_eq!(msg(Duration::from_millis(1)).remaining_expiry(now), Some(1));
        assert_eq!(msg(Duration::ZERO).remaining_expiry(now), Some(1));
    }
}
