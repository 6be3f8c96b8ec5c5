//! The protocol-neutral view of packets: the session logic is written once, and this
//! module translates MQTT 3.1.1 and 5.0 packets (mqttbytes-ng types from our codec) into
//! [`Inbound`] events and builds the outbound packets for each protocol.

use bytes::Bytes;

use super::message::Forwarded;
use crate::mqtt::codec::{v4, v5, Packet, Protocol, QoS};

/// Subscription options as requested (MQTT 5 §3.8.3.1; 3.1.1 has the QoS only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedFilter {
    pub filter: String,
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0 send retained, 1 only for a new subscription, 2 never.
    pub retain_handling: u8,
}

/// An inbound PUBLISH.
#[derive(Debug, Clone)]
pub struct InPublish {
    /// Empty when an MQTT 5 client uses a topic alias alone.
    pub topic: String,
    pub qos: QoS,
    pub retain: bool,
    pub dup: bool,
    pub pkid: u16,
    pub payload: Bytes,
    pub topic_alias: Option<u16>,
    pub message_expiry: Option<u32>,
    pub props: Forwarded,
    /// A client must not send subscription identifiers (MQTT-3.3.4-6).
    pub has_subscription_ids: bool,
}

/// What a client sent after CONNECT.
#[derive(Debug, Clone)]
pub enum Inbound {
    Publish(InPublish),
    PubAck(u16),
    /// `accepted` is false for an MQTT 5 reason code >= 0x80.
    PubRec {
        pkid: u16,
        accepted: bool,
    },
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<RequestedFilter>,
        subscription_id: Option<u32>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect {
        /// MQTT 5: 0x04 asks for the will to be published.
        with_will: bool,
        session_expiry: Option<u32>,
    },
    /// A packet a client never sends to a server (CONNACK, SUBACK, AUTH...).
    Unexpected(&'static str),
}

/// Translates a decoded packet.
pub fn inbound(p: Packet) -> Inbound {
    match p {
        Packet::V311(p) => inbound_v311(p),
        Packet::V5(p) => inbound_v5(p),
    }
}

fn inbound_v311(p: v4::Packet) -> Inbound {
    match p {
        v4::Packet::Publish(p) => publish_v311(p),
        v4::Packet::PubAck(a) => Inbound::PubAck(a.pkid),
        v4::Packet::PubRec(a) => Inbound::PubRec {
            pkid: a.pkid,
            accepted: true,
        },
        v4::Packet::PubRel(a) => Inbound::PubRel(a.pkid),
        v4::Packet::PubComp(a) => Inbound::PubComp(a.pkid),
        v4::Packet::Subscribe(s) => subscribe_v311(s),
        v4::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Disconnect => Inbound::Disconnect {
            with_will: false,
            session_expiry: None,
        },
        v4::Packet::Connect(_) => Inbound::Unexpected("CONNECT"),
        v4::Packet::ConnAck(_) => Inbound::Unexpected("CONNACK"),
        v4::Packet::SubAck(_) => Inbound::Unexpected("SUBACK"),
        v4::Packet::UnsubAck(_) => Inbound::Unexpected("UNSUBACK"),
        v4::Packet::PingResp => Inbound::Unexpected("PINGRESP"),
    }
}

fn inbound_v5(p: v5::Packet) -> Inbound {
    match p {
        v5::Packet::Publish(p) => publish_v5(p),
        v5::Packet::PubAck(a) => Inbound::PubAck(a.pkid),
        v5::Packet::PubRec(a) => Inbound::PubRec {
            pkid: a.pkid,
            accepted: matches!(
                a.reason,
                v5::PubRecReason::Success | v5::PubRecReason::NoMatchingSubscribers
            ),
        },
        v5::Packet::PubRel(a) => Inbound::PubRel(a.pkid),
        v5::Packet::PubComp(a) => Inbound::PubComp(a.pkid),
        v5::Packet::Subscribe(s) => subscribe_v5(s),
        v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => Inbound::PingReq,
        v5::Packet::Disconnect(d) => Inbound::Disconnect {
            with_will: d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage,
            session_expiry: d.properties.and_then(|p| p.session_expiry_interval),
        },
        v5::Packet::Connect(..) => Inbound::Unexpected("CONNECT"),
        v5::Packet::ConnAck(_) => Inbound::Unexpected("CONNACK"),
        v5::Packet::SubAck(_) => Inbound::Unexpected("SUBACK"),
        v5::Packet::UnsubAck(_) => Inbound::Unexpected("UNSUBACK"),
        v5::Packet::PingResp(_) => Inbound::Unexpected("PINGRESP"),
        v5::Packet::Auth(_) => Inbound::Unexpected("AUTH"),
    }
}

fn publish_v311(p: v4::Publish) -> Inbound {
    Inbound::Publish(InPublish {
        topic: p.topic,
        qos: p.qos,
        retain: p.retain,
        dup: p.dup,
        pkid: p.pkid,
        payload: p.payload,
        topic_alias: None,
        message_expiry: None,
        props: Forwarded::default(),
        has_subscription_ids: false,
    })
}

fn publish_v5(p: v5::Publish) -> Inbound {
    let props = p.properties.unwrap_or_default();
    Inbound::Publish(InPublish {
        // The codec checked v5 topics are UTF-8.
        topic: String::from_utf8_lossy(&p.topic).into_owned(),
        qos: p.qos,
        retain: p.retain,
        dup: p.dup,
        pkid: p.pkid,
        payload: p.payload,
        topic_alias: props.topic_alias,
        message_expiry: props.message_expiry_interval,
        has_subscription_ids: !props.subscription_identifiers.is_empty(),
        props: Forwarded {
            payload_format_indicator: props.payload_format_indicator,
            response_topic: props.response_topic,
            correlation_data: props.correlation_data,
            user_properties: props.user_properties,
            content_type: props.content_type,
        },
    })
}

fn subscribe_v311(s: v4::Subscribe) -> Inbound {
    let filters = s
        .filters
        .into_iter()
        .map(|f| RequestedFilter {
            filter: f.path,
            qos: f.qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
        })
        .collect();
    Inbound::Subscribe {
        pkid: s.pkid,
        filters,
        subscription_id: None,
    }
}

fn subscribe_v5(s: v5::Subscribe) -> Inbound {
    let subscription_id = s
        .properties
        .as_ref()
        .and_then(|p| p.id)
        .and_then(|id| u32::try_from(id).ok());
    let filters = s
        .filters
        .into_iter()
        .map(|f| RequestedFilter {
            filter: f.path,
            qos: f.qos,
            no_local: f.nolocal,
            retain_as_published: f.preserve_retain,
            retain_handling: match f.retain_forward_rule {
                v5::RetainForwardRule::OnEverySubscribe => 0,
                v5::RetainForwardRule::OnNewSubscribe => 1,
                v5::RetainForwardRule::Never => 2,
            },
        })
        .collect();
    Inbound::Subscribe {
        pkid: s.pkid,
        filters,
        subscription_id,
    }
}

/// How an outbound MQTT 5 PUBLISH names its topic (MQTT 5 §3.3.2.3.4). The alias is
/// chosen per connection by `conn::alias`; MQTT 3.1.1 always sends the topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicRef {
    /// The topic name, no alias.
    Name,
    /// The topic name and an alias: the client maps the alias to this topic from now on.
    Set(u16),
    /// The alias alone, with an empty topic name: a mapping set earlier on this connection.
    Alias(u16),
}

/// An outbound PUBLISH: what one delivery needs, borrowed from the message it carries.
#[derive(Debug, Clone)]
pub struct OutPublish<'a> {
    pub topic: &'a str,
    pub topic_ref: TopicRef,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub dup: bool,
    pub pkid: u16,
    pub props: &'a Forwarded,
    pub message_expiry: Option<u32>,
    /// The identifiers of every matching subscription (MQTT-3.3.4-4), sent in ascending
    /// order so that the same deliveries give the same bytes.
    pub sub_ids: &'a [u32],
}

/// An outbound PUBLISH packet.
pub fn publish(protocol: Protocol, p: &OutPublish<'_>) -> Packet {
    match protocol {
        Protocol::V311 => Packet::V311(v4::Packet::Publish(v4::Publish {
            dup: p.dup,
            qos: p.qos,
            retain: p.retain,
            topic: p.topic.to_owned(),
            pkid: p.pkid,
            payload: p.payload.clone(),
        })),
        Protocol::V5 => {
            let (topic, topic_alias) = match p.topic_ref {
                TopicRef::Name => (Bytes::copy_from_slice(p.topic.as_bytes()), None),
                TopicRef::Set(alias) => (Bytes::copy_from_slice(p.topic.as_bytes()), Some(alias)),
                // No copy of the topic at all: the point of an alias.
                TopicRef::Alias(alias) => (Bytes::new(), Some(alias)),
            };
            let bare = p.props.is_empty()
                && p.message_expiry.is_none()
                && p.sub_ids.is_empty()
                && topic_alias.is_none();
            let properties = (!bare).then(|| {
                let mut ids: Vec<usize> = p.sub_ids.iter().map(|i| *i as usize).collect();
                ids.sort_unstable();
                v5::PublishProperties {
                    payload_format_indicator: p.props.payload_format_indicator,
                    message_expiry_interval: p.message_expiry,
                    topic_alias,
                    response_topic: p.props.response_topic.clone(),
                    correlation_data: p.props.correlation_data.clone(),
                    user_properties: p.props.user_properties.clone(),
                    subscription_identifiers: ids,
                    content_type: p.props.content_type.clone(),
                }
            });
            Packet::V5(v5::Packet::Publish(v5::Publish {
                dup: p.dup,
                qos: p.qos,
                retain: p.retain,
                topic,
                pkid: p.pkid,
                payload: p.payload.clone(),
                properties,
            }))
        }
    }
}

/// Reason of a PUBACK/PUBREC we send (MQTT 5); 3.1.1 acknowledges without a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckReason {
    Success,
    NotAuthorized,
    QuotaExceeded,
    PacketIdInUse,
}

pub fn puback(protocol: Protocol, pkid: u16, reason: AckReason, text: Option<&str>) -> Packet {
    match protocol {
        Protocol::V311 => Packet::V311(v4::Packet::PubAck(v4::PubAck::new(pkid))),
        Protocol::V5 => Packet::V5(v5::Packet::PubAck(v5::PubAck {
            pkid,
            reason: match reason {
                AckReason::Success => v5::PubAckReason::Success,
                AckReason::NotAuthorized => v5::PubAckReason::NotAuthorized,
                AckReason::QuotaExceeded => v5::PubAckReason::QuotaExceeded,
                AckReason::PacketIdInUse => v5::PubAckReason::PacketIdentifierInUse,
            },
            properties: text.map(|t| v5::PubAckProperties {
                reason_string: Some(t.to_owned()),
                user_properties: Vec::new(),
            }),
        })),
    }
}

pub fn pubrec(protocol: Protocol, pkid: u16, reason: AckReason, text: Option<&str>) -> Packet {
    match protocol {
        Protocol::V311 => Packet::V311(v4::Packet::PubRec(v4::PubRec::new(pkid))),
        Protocol::V5 => Packet::V5(v5::Packet::PubRec(v5::PubRec {
            pkid,
            reason: match reason {
                AckReason::Success => v5::PubRecReason::Success,
                AckReason::NotAuthorized => v5::PubRecReason::NotAuthorized,
                AckReason::QuotaExceeded => v5::PubRecReason::QuotaExceeded,
                AckReason::PacketIdInUse => v5::PubRecReason::PacketIdentifierInUse,
            },
            properties: text.map(|t| v5::PubRecProperties {
                reason_string: Some(t.to_owned()),
                user_properties: Vec::new(),
            }),
        })),
    }
}

pub fn pubrel(protocol: Protocol, pkid: u16) -> Packet {
    match protocol {
        Protocol::V311 => Packet::V311(v4::Packet::PubRel(v4::PubRel::new(pkid))),
        Protocol::V5 => Packet::V5(v5::Packet::PubRel(v5::PubRel {
            pkid,
            reason: v5::PubRelReason::Success,
            properties: None,
        })),
    }
}

/// PUBCOMP; `found` is false when the PUBREL named an unknown id (MQTT 5: 0x92).
pub fn pubcomp(protocol: Protocol, pkid: u16, found: bool) -> Packet {
    match protocol {
        Protocol::V311 => Packet::V311(v4::Packet::PubComp(v4::PubComp::new(pkid))),
        Protocol::V5 => Packet::V5(v5::Packet::PubComp(v5::PubComp {
            pkid,
            reason: if found {
                v5::PubCompReason::Success
            } else {
                v5::PubCompReason::PacketIdentifierNotFound
            },
            properties: None,
        })),
    }
}

/// The outcome of one SUBSCRIBE filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubResult {
    Granted(QoS),
    NotAuthorized,
    TopicFilterInvalid,
}

/// SUBACK; `text` is the MQTT 5 reason string, sent when a filter was refused (contract §6).
pub fn suback(protocol: Protocol, pkid: u16, results: &[SubResult], text: Option<&str>) -> Packet {
    match protocol {
        Protocol::V311 => Packet::V311(v4::Packet::SubAck(v4::SubAck::new(
            pkid,
            results
                .iter()
                .map(|r| match r {
                    SubResult::Granted(q) => v4::SubscribeReasonCode::Success(*q),
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        ))),
        Protocol::V5 => Packet::V5(v5::Packet::SubAck(v5::SubAck {
            pkid,
            return_codes: results
                .iter()
                .map(|r| match r {
                    SubResult::Granted(q) => v5::SubscribeReasonCode::Success(*q),
                    SubResult::NotAuthorized => v5::SubscribeReasonCode::NotAuthorized,
                    SubResult::TopicFilterInvalid => v5::SubscribeReasonCode::TopicFilterInvalid,
                })
                .collect(),
            properties: text.map(|t| v5::SubAckProperties {
                reason_string: Some(t.to_owned()),
                user_properties: Vec::new(),
            }),
        })),
    }
}

/// UNSUBACK; `existed` per filter (MQTT 5 reasons 0x00 / 0x11).
pub fn unsuback(protocol: Protocol, pkid: u16, existed: &[bool]) -> Packet {
    match protocol {
        Protocol::V311 => Packet::V311(v4::Packet::UnsubAck(v4::UnsubAck::new(pkid))),
        Protocol::V5 => Packet::V5(v5::Packet::UnsubAck(v5::UnsubAck {
            pkid,
            reasons: existed
                .iter()
                .map(|e| {
                    if *e {
                        v5::UnsubAckReason::Success
                    } else {
                        v5::UnsubAckReason::NoSubscriptionExisted
                    }
                })
                .collect(),
            properties: None,
        })),
    }
}

pub fn pingresp(protocol: Protocol) -> Packet {
    match protocol {
        Protocol::V311 => Packet::V311(v4::Packet::PingResp),
        Protocol::V5 => Packet::V5(v5::Packet::PingResp(v5::PingResp)),
    }
}
