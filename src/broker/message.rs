//! A published application message as the broker keeps it: canonical topic (the
//! `v1/devices/me/` alias already applied), payload, QoS, retain, the MQTT 5 properties
//! that travel with it, and its expiry. Shared by every subscriber through an `Arc`.

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
}

impl Message {
    /// Whether the message expired (MQTT 5 §3.3.2.3.3: then it is not delivered).
    pub fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| now >= t)
    }

    /// The remaining expiry interval in whole seconds, for the outgoing PUBLISH.
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|t| {
            let left = t.saturating_duration_since(now);
            u32::try_from(left.as_secs().max(1)).unwrap_or(u32::MAX)
        })
    }

    /// The deadline for an expiry interval given in seconds.
    pub fn deadline(interval: Option<u32>, now: Instant) -> Option<Instant> {
        interval.map(|s| now + Duration::from_secs(u64::from(s)))
    }
}
