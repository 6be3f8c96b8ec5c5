//! CONNECT handling: the admission decision (contract §3) and the client identifier rules
//! (contract §4), mapped to CONNACK return codes (MQTT 3.1.1) and reason codes (MQTT 5).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::acl::{self, DeviceAcl};
use crate::auth::Refused;
use crate::broker::message::{Forwarded, Message};
use crate::broker::Will;
use crate::mqtt::codec::{self, v4, v5, CodecError, Connect, Packet, Protocol};
use crate::mqtt::topic::TopicName;

/// Topic aliases a client may set (our Topic Alias Maximum): bounded per connection.
pub const TOPIC_ALIAS_MAX: u16 = 32;

/// What the client asked for in CONNECT, independent of the protocol version.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub protocol: Protocol,
    pub client_id: String,
    /// MQTT 3.1.1 clean session / MQTT 5 clean start.
    pub clean_start: bool,
    /// Seconds; 0 = none.
    pub keep_alive: u16,
    /// MQTT 5 Session Expiry Interval.
    pub session_expiry: Option<u32>,
    /// MQTT 5: how many QoS 1/2 messages the client accepts in flight.
    pub receive_maximum: Option<u16>,
    /// MQTT 5: the largest packet the client accepts.
    pub max_packet_size: Option<u32>,
    /// MQTT 5: how many topic aliases the client accepts from us (absent: 0).
    pub topic_alias_max: u16,
    /// MQTT 5 Request Problem Information (default 1).
    pub problem_info: bool,
    /// MQTT 5 Authentication Method: enhanced authentication, which certmq does not offer.
    pub authentication_method: Option<String>,
}

impl ConnectRequest {
    /// Username and password are ignored (contract §3): identity comes from the certificate.
    pub fn from_packet(connect: &Connect) -> ConnectRequest {
        match connect {
            Connect::V311(c) => ConnectRequest {
                protocol: Protocol::V311,
                client_id: c.client_id.clone(),
                clean_start: c.clean_session,
                keep_alive: c.keep_alive,
                session_expiry: None,
                receive_maximum: None,
                max_packet_size: None,
                topic_alias_max: 0,
                problem_info: true,
                authentication_method: None,
            },
            Connect::V5 { connect: c, .. } => {
                let p = c.properties.as_ref();
                ConnectRequest {
                    protocol: Protocol::V5,
                    client_id: c.client_id.clone(),
                    clean_start: c.clean_start,
                    keep_alive: c.keep_alive,
                    session_expiry: p.and_then(|p| p.session_expiry_interval),
                    receive_maximum: p.and_then(|p| p.receive_maximum),
                    max_packet_size: p.and_then(|p| p.max_packet_size),
                    topic_alias_max: p.and_then(|p| p.topic_alias_max).unwrap_or(0),
                    problem_info: p.and_then(|p| p.request_problem_info) != Some(0),
                    authentication_method: p.and_then(|p| p.authentication_method.clone()),
                }
            }
        }
    }
}

/// Why a will in CONNECT is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WillRefusal {
    #[error("invalid will topic {topic:?}: {reason}")]
    InvalidTopic { topic: String, reason: String },
    #[error("not authorized to publish the will to {0}")]
    NotAuthorized(String),
}

/// The will of a CONNECT, with the `me` alias applied and the publish ACL checked
/// (contract §5, 6): a device learns at CONNECT that its will could never be published.
pub fn will(connect: &Connect, device: &str, acl: &DeviceAcl) -> Result<Option<Will>, WillRefusal> {
    let now = Message::now();
    let (topic, payload, qos, retain, delay, expiry, props) = match connect {
        Connect::V311(c) => match &c.last_will {
            None => return Ok(None),
            Some(w) => (
                w.topic.clone(),
                w.message.clone(),
                w.qos,
                w.retain,
                0,
                None,
                Forwarded::default(),
            ),
        },
        Connect::V5 { will: None, .. } => return Ok(None),
        Connect::V5 { will: Some(w), .. } => {
            let p = w.properties.clone();
            (
                String::from_utf8_lossy(&w.topic).into_owned(),
                w.message.clone(),
                w.qos,
                w.retain,
                p.as_ref().and_then(|p| p.delay_interval).unwrap_or(0),
                p.as_ref().and_then(|p| p.message_expiry_interval),
                p.map(|p| Forwarded {
                    payload_format_indicator: p.payload_format_indicator,
                    response_topic: p.response_topic,
                    correlation_data: p.correlation_data,
                    user_properties: p.user_properties,
                    content_type: p.content_type,
                })
                .unwrap_or_default(),
            )
        }
    };
    let canonical = acl::alias_inbound(&topic, device).unwrap_or(topic);
    let name = TopicName::parse(&canonical).map_err(|e| WillRefusal::InvalidTopic {
        topic: canonical.clone(),
        reason: e.to_string(),
    })?;
    if !acl.can_publish(&name) {
        return Err(WillRefusal::NotAuthorized(canonical));
    }
    let message = Message {
        topic: name,
        payload,
        qos,
        retain,
        props,
        expires_at: Message::deadline(expiry, now),
        store_id: Default::default(),
    };
    Ok(Some(Will::new(message, delay)))
}

/// The CONNACK refusing a will (code 5 / 0x87 for ACL; 0x90 for an invalid topic in v5).
pub fn connack_bad_will(protocol: Protocol, why: &WillRefusal) -> Packet {
    match protocol {
        Protocol::V311 => Packet::V311(v4::Packet::ConnAck(v4::ConnAck::new(
            v4::ConnectReturnCode::NotAuthorized,
            false,
        ))),
        Protocol::V5 => v5_refusal(
            match why {
                WillRefusal::InvalidTopic { .. } => v5::ConnectReturnCode::TopicNameInvalid,
                WillRefusal::NotAuthorized(_) => v5::ConnectReturnCode::NotAuthorized,
            },
            why.to_string(),
        ),
    }
}

/// Why a CONNECT is refused after admission passed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientIdRefusal {
    /// MQTT-3.1.3-8: an empty client id requires clean session in MQTT 3.1.1.
    #[error("an empty client identifier requires clean session = 1")]
    EmptyWithPersistentSession,
}

/// The client identifier the session will use, and whether the broker assigned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientId {
    pub id: String,
    pub assigned: bool,
}

/// contract §4: an empty client id is assigned one; 3.1.1 with clean session 0 is refused.
pub fn client_id(req: &ConnectRequest) -> Result<ClientId, ClientIdRefusal> {
    if !req.client_id.is_empty() {
        return Ok(ClientId {
            id: req.client_id.clone(),
            assigned: false,
        });
    }
    if req.protocol == Protocol::V311 && !req.clean_start {
        return Err(ClientIdRefusal::EmptyWithPersistentSession);
    }
    Ok(ClientId {
        id: assign_id(),
        assigned: true,
    })
}

/// A process-unique identifier. Sessions are keyed by (device, client id), so uniqueness
/// within one device is what matters; the time prefix keeps ids unique across restarts.
fn assign_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    format!("certmq-{t:x}-{n:x}")
}

/// The keep alive the broker enforces, in seconds (contract §6, 9): the client's value capped
/// at `max_keep_alive`. A client asking for none (0) still gets `max_keep_alive`, so that
/// no wait on a peer is unbounded. MQTT 5 clients are told via Server Keep Alive.
pub fn effective_keep_alive(requested: u16, max_keep_alive: u16) -> u16 {
    if requested == 0 || requested > max_keep_alive {
        max_keep_alive
    } else {
        requested
    }
}

/// A CONNACK (or any packet) within the client's Maximum Packet Size: its reason string
/// and user properties left out if need be (MQTT-3.2.2-19/20); None when even that does
/// not fit (a client stating less than 5 bytes), then the connection just closes.
pub fn within_client_max(ack: Packet, req: &ConnectRequest) -> Option<Packet> {
    codec::fit(ack, req.max_packet_size.map(|m| m as usize)).ok()
}

/// A successful CONNACK. `session_expiry`: MQTT 5 Session Expiry Interval to announce
/// when the broker uses less than the client asked for (`broker::expiry::granted`).
///
/// Err when it is larger than the client's Maximum Packet Size (MQTT-3.1.2-24: never sent
/// then): the CONNACK 0x95 "Packet too large" to send instead, if even that fits.
// Built once per connection and sent at once: a large Err costs less than a Box would.
#[allow(clippy::result_large_err)]
pub fn connack_success(
    req: &ConnectRequest,
    id: &ClientId,
    session_present: bool,
    keep_alive: u16,
    receive_maximum: u16,
    max_packet_size: usize,
    session_expiry: Option<u32>,
) -> Result<Packet, Option<Packet>> {
    let ack = match req.protocol {
        Protocol::V311 => Packet::V311(v4::Packet::ConnAck(v4::ConnAck::new(
            v4::ConnectReturnCode::Success,
            session_present,
        ))),
        Protocol::V5 => {
            let properties = v5::ConnAckProperties {
                assigned_client_identifier: id.assigned.then(|| id.id.clone()),
                server_keep_alive: (keep_alive != req.keep_alive).then_some(keep_alive),
                session_expiry_interval: session_expiry,
                receive_max: Some(receive_maximum),
                max_packet_size: u32::try_from(max_packet_size).ok(),
                topic_alias_max: Some(TOPIC_ALIAS_MAX),
                ..codec::empty_connack_properties()
            };
            Packet::V5(v5::Packet::ConnAck(v5::ConnAck {
                session_present,
                code: v5::ConnectReturnCode::Success,
                properties: Some(properties),
            }))
        }
    };
    within_client_max(ack, req).ok_or_else(|| {
        within_client_max(bare_v5_refusal(v5::ConnectReturnCode::PacketTooLarge), req)
    })
}

/// The CONNACK that refuses an admission (contract §3: code 5 / 0x87 with a reason string; a
/// registry that cannot answer is "server unavailable", code 3 / 0x88).
pub fn connack_refused(protocol: Protocol, refused: &Refused) -> Packet {
    let unavailable = matches!(refused, Refused::Store(_));
    match protocol {
        Protocol::V311 => Packet::V311(v4::Packet::ConnAck(v4::ConnAck::new(
            if unavailable {
                v4::ConnectReturnCode::ServiceUnavailable
            } else {
                v4::ConnectReturnCode::NotAuthorized
            },
            false,
        ))),
        Protocol::V5 => v5_refusal(
            if unavailable {
                v5::ConnectReturnCode::ServerUnavailable
            } else {
                v5::ConnectReturnCode::NotAuthorized
            },
            format!("not authorized: {refused}"),
        ),
    }
}

/// The CONNACK for an MQTT 5 CONNECT asking for enhanced authentication (AUTH): 0x8C Bad
/// authentication method. The client certificate is the only authentication certmq takes.
pub fn connack_bad_auth_method(method: &str) -> Packet {
    v5_refusal(
        v5::ConnectReturnCode::BadAuthenticationMethod,
        format!("authentication method {method:?} is not supported: the client certificate authenticates"),
    )
}

/// The CONNACK for a client identifier refusal (3.1.1 code 2; 0x85 in MQTT 5).
pub fn connack_bad_client_id(protocol: Protocol, why: &ClientIdRefusal) -> Packet {
    match protocol {
        Protocol::V311 => Packet::V311(v4::Packet::ConnAck(v4::ConnAck::new(
            v4::ConnectReturnCode::BadClientId,
            false,
        ))),
        Protocol::V5 => v5_refusal(
            v5::ConnectReturnCode::ClientIdentifierNotValid,
            why.to_string(),
        ),
    }
}

/// The CONNACK refusing one persistent session more than `max_sessions_per_device`
/// (contract §4): 3.1.1 return code 3, MQTT 5 0x97 "quota exceeded".
pub fn connack_quota(protocol: Protocol, why: &crate::broker::OpenRefused) -> Packet {
    match protocol {
        Protocol::V311 => Packet::V311(v4::Packet::ConnAck(v4::ConnAck::new(
            v4::ConnectReturnCode::ServiceUnavailable,
            false,
        ))),
        Protocol::V5 => v5_refusal(v5::ConnectReturnCode::QuotaExceeded, why.to_string()),
    }
}

/// The CONNACK for a CONNECT the codec refused, when one is due (docs/contract.md, "MQTT
/// conformance"). An unsupported protocol level is answered in the CONNACK form the
/// client's CONNECT layout shows it parses: 3.1.1 return code 1 (3.1.1 [MQTT-3.1.2-2]; what
/// MQTT 3.1 clients understand too), or 0x84 in MQTT 5 form (MQTT 5 §3.1.2.2). A CONNECT
/// that announced MQTT 5 and is malformed or breaks a rule gets 0x81 or 0x82, as MQTT 5
/// §3.1.4 allows; MQTT 3.1.1 has no return code for those and just closes. None of these
/// carries a reason string: the client's Maximum Packet Size is not known.
pub fn connack_for_codec_error(e: &CodecError, announced: Option<Protocol>) -> Option<Packet> {
    match e {
        CodecError::UnsupportedProtocol {
            form: Protocol::V311,
            ..
        } => Some(Packet::V311(v4::Packet::ConnAck(v4::ConnAck::new(
            v4::ConnectReturnCode::RefusedProtocolVersion,
            false,
        )))),
        CodecError::UnsupportedProtocol { .. } => Some(bare_v5_refusal(
            v5::ConnectReturnCode::UnsupportedProtocolVersion,
        )),
        CodecError::Malformed(_) if announced == Some(Protocol::V5) => {
            Some(bare_v5_refusal(v5::ConnectReturnCode::MalformedPacket))
        }
        CodecError::Protocol(_) if announced == Some(Protocol::V5) => {
            Some(bare_v5_refusal(v5::ConnectReturnCode::ProtocolError))
        }
        _ => None,
    }
}

/// The CONNACK for a CONNECT that needs something unavailable right now (cluster mode:
/// NATS for a persistent session): code 3 / 0x88 with the reason.
pub fn connack_unavailable(protocol: Protocol, reason: &str) -> Packet {
    match protocol {
        Protocol::V311 => Packet::V311(v4::Packet::ConnAck(v4::ConnAck::new(
            v4::ConnectReturnCode::ServiceUnavailable,
            false,
        ))),
        Protocol::V5 => v5_refusal(v5::ConnectReturnCode::ServerUnavailable, reason.to_owned()),
    }
}

/// An MQTT 5 CONNACK with a reason code and no properties (`20 03 00 CODE 00`).
fn bare_v5_refusal(code: v5::ConnectReturnCode) -> Packet {
    Packet::V5(v5::Packet::ConnAck(v5::ConnAck {
        session_present: false,
        code,
        properties: None,
    }))
}

fn v5_refusal(code: v5::ConnectReturnCode, reason: String) -> Packet {
    Packet::V5(v5::Packet::ConnAck(v5::ConnAck {
        session_present: false,
        code,
        properties: Some(v5::ConnAckProperties {
            reason_string: Some(reason),
            ..codec::empty_connack_properties()
        }),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(protocol: Protocol, id: &str, clean: bool) -> ConnectRequest {
        ConnectRequest {
            protocol,
            client_id: id.into(),
            clean_start: clean,
            keep_alive: 60,
            session_expiry: None,
            receive_maximum: None,
            max_packet_size: None,
            topic_alias_max: 0,
            problem_info: true,
            authentication_method: None,
        }
    }

    #[test]
    fn client_id_rules() {
        let given = client_id(&req(Protocol::V311, "abc", false)).unwrap();
        assert_eq!(
            given,
            ClientId {
                id: "abc".into(),
                assigned: false
            }
        );
        assert_eq!(
            client_id(&req(Protocol::V311, "", false)),
            Err(ClientIdRefusal::EmptyWithPersistentSession)
        );
        let a = client_id(&req(Protocol::V311, "", true)).unwrap();
        let b = client_id(&req(Protocol::V5, "", false)).unwrap();
        assert!(a.assigned && b.assigned);
        assert_ne!(a.id, b.id);
    }

    #[test]
    fn keep_alive_is_capped_and_never_unbounded() {
        assert_eq!(effective_keep_alive(60, 3600), 60);
        assert_eq!(effective_keep_alive(0, 3600), 3600);
        assert_eq!(effective_keep_alive(7200, 3600), 3600);
    }
}
