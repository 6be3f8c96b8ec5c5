//! Packets to bytes, with the workarounds for what `mqttbytes-ng` 0.7.1 encodes wrongly.
//!
//! - MQTT 5 DISCONNECT: for a reason code without properties it writes a remaining length
//!   of 1 followed by two bytes (`e0 01 8e 00`), which desynchronises the client's stream;
//!   with empty properties it drops the reason code (`e0 00`). We encode DISCONNECT here.
//! - MQTT 5 CONNACK: the 3.1.1-only return codes of its shared enum reach `unreachable!()`.
//!   We map them to their MQTT 5 equivalents before encoding.
//! - Strings longer than 65,535 bytes are written with a truncated `u16` length. A PUBLISH
//!   topic can outgrow that once the `v1/devices/me/` alias is expanded, so we refuse it.
//! - A failed write leaves half a packet in the buffer: we cut the buffer back.
//!
//! It also keeps what the broker sends within the client's Maximum Packet Size where MQTT 5
//! lets a sender shrink a packet ([`fit`]).

use bytes::{BufMut, BytesMut};
use mqttbytes_ng::{v4, v5};

use super::frame::{put_variable_byte_integer, variable_byte_integer_len};
use super::{CodecError, Packet, Protocol, QoS, Unencodable};

/// MQTT 5 property identifiers used by DISCONNECT (section 2.2.2.2).
const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
const SERVER_REFERENCE: u8 = 0x1C;
const REASON_STRING: u8 = 0x1F;
const USER_PROPERTY: u8 = 0x26;

/// Appends `packet` to `out` and returns the number of bytes written; on error `out` is
/// left as it was, so the caller may keep using it for other packets.
pub fn encode(packet: &Packet, out: &mut BytesMut) -> Result<usize, CodecError> {
    let start = out.len();
    let written = match packet {
        Packet::V311(packet) => encode_v4(packet, out),
        Packet::V5(packet) => encode_v5(packet, out),
    };
    if written.is_err() {
        out.truncate(start);
    }
    written.map_err(CodecError::Unencodable)
}

fn encode_v4(packet: &v4::Packet, out: &mut BytesMut) -> Result<usize, Unencodable> {
    if let v4::Packet::Publish(publish) = packet {
        check_string_len(publish.topic.len())?;
    }
    packet.write(out, usize::MAX).map_err(Unencodable::Library)
}

fn encode_v5(packet: &v5::Packet, out: &mut BytesMut) -> Result<usize, Unencodable> {
    match packet {
        v5::Packet::Disconnect(disconnect) => encode_v5_disconnect(disconnect, out),
        v5::Packet::ConnAck(connack) => {
            let code = v5_connack_code(connack.code);
            if code == connack.code {
                packet.write(out, None).map_err(Unencodable::Library)
            } else {
                let mapped = v5::ConnAck {
                    code,
                    ..connack.clone()
                };
                v5::Packet::ConnAck(mapped)
                    .write(out, None)
                    .map_err(Unencodable::Library)
            }
        }
        v5::Packet::Publish(publish) => {
            check_string_len(publish.topic.len())?;
            packet.write(out, None).map_err(Unencodable::Library)
        }
        _ => packet.write(out, None).map_err(Unencodable::Library),
    }
}

/// A PUBLISH without MQTT 5 properties: what almost every delivery is. See
/// [`encode_bare_publish`].
#[derive(Debug, Clone, Copy)]
pub struct BarePublish<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: QoS,
    pub retain: bool,
    pub dup: bool,
    /// Ignored for QoS 0 (no packet identifier on the wire).
    pub pkid: u16,
}

/// Appends a PUBLISH without properties (MQTT 3.1.1, or MQTT 5 with an empty property
/// set) straight from borrowed parts: the delivery hot path. Building an mqttbytes-ng
/// packet instead costs an owned copy of the topic per delivery (a `String` for 3.1.1,
/// `Bytes` for 5), allocated on the subscriber's thread. Same bytes as [`encode`] of the
/// equivalent packet (tested in `tests.rs`). `max`: the peer's Maximum Packet Size; a
/// larger packet is refused and nothing is written. Returns the bytes written.
pub fn encode_bare_publish(
    protocol: Protocol,
    p: &BarePublish<'_>,
    max: Option<usize>,
    out: &mut BytesMut,
) -> Result<usize, CodecError> {
    let topic_len = check_string_len(p.topic.len()).map_err(CodecError::Unencodable)?;
    let pkid_len = if p.qos == QoS::AtMostOnce { 0 } else { 2 };
    let props_len = usize::from(protocol == Protocol::V5);
    let remaining = 2 + p.topic.len() + pkid_len + props_len + p.payload.len();
    let size = 1 + variable_byte_integer_len(remaining) + remaining;
    if let Some(max) = max.filter(|max| size > *max) {
        return Err(CodecError::Unencodable(Unencodable::ExceedsPeerMaximum {
            size,
            max,
        }));
    }
    let byte1 = 0x30 | u8::from(p.dup) << 3 | (p.qos as u8) << 1 | u8::from(p.retain);
    out.reserve(size);
    let start = out.len();
    out.put_u8(byte1);
    if let Err(e) = put_variable_byte_integer(out, remaining) {
        out.truncate(start);
        return Err(CodecError::Unencodable(e));
    }
    out.put_u16(topic_len);
    out.put_slice(p.topic.as_bytes());
    if pkid_len > 0 {
        out.put_u16(p.pkid);
    }
    if props_len > 0 {
        out.put_u8(0);
    }
    out.put_slice(p.payload);
    Ok(size)
}

/// The number of bytes [`encode`] writes for `packet`, without writing it: what a delivery
/// is checked against the client's Maximum Packet Size with (`usize::MAX` for a packet that
/// cannot be encoded).
pub fn encoded_len(packet: &Packet) -> usize {
    match packet {
        Packet::V311(packet) => packet.size(),
        // Encoded here, not by mqttbytes-ng: measured by encoding (rare packets).
        Packet::V5(v5::Packet::Disconnect(_)) => {
            encode(packet, &mut BytesMut::new()).unwrap_or(usize::MAX)
        }
        Packet::V5(packet) => packet.size(),
    }
}

/// Appends `packet` within the peer's Maximum Packet Size `max` (MQTT 5, whole packet),
/// shrunk by [`fit`] when it would exceed it. Returns the bytes written; on error nothing is.
pub fn encode_within(
    packet: &Packet,
    max: Option<usize>,
    out: &mut BytesMut,
) -> Result<usize, CodecError> {
    let written = encode(packet, out)?;
    match max {
        Some(max) if written > max => {
            out.truncate(out.len() - written);
            encode(&fit(packet.clone(), Some(max))?, out)
        }
        _ => Ok(written),
    }
}

/// What a sender may leave out of a packet that would exceed the receiver's Maximum
/// Packet Size, in the order it is left out: the Reason String, then the User Properties
/// (MQTT-3.2.2-19/20 for CONNACK; the same rule in PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK,
/// UNSUBACK, DISCONNECT and AUTH). Nothing else of a packet may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Optional {
    ReasonString,
    UserProperties,
}

/// `packet` as it may be sent to a peer whose Maximum Packet Size is `max`: unchanged when
/// it fits, else without its reason string, else without its user properties too; an
/// error when even that exceeds `max` (a PUBLISH is never shrunk: its properties belong to
/// the message). For packets sent once (CONNACK); [`encode_within`] does this in place.
pub fn fit(packet: Packet, max: Option<usize>) -> Result<Packet, CodecError> {
    let Some(max) = max else {
        return Ok(packet);
    };
    let mut scratch = BytesMut::new();
    let mut packet = packet;
    let mut size = encode(&packet, &mut scratch)?;
    for optional in [Optional::ReasonString, Optional::UserProperties] {
        if size <= max {
            break;
        }
        if leave_out(&mut packet, optional) {
            scratch.clear();
            size = encode(&packet, &mut scratch)?;
        }
    }
    if size <= max {
        Ok(packet)
    } else {
        Err(CodecError::Unencodable(Unencodable::ExceedsPeerMaximum {
            size,
            max,
        }))
    }
}

/// Removes `what` from an MQTT 5 packet's properties; false when it had none. An
/// acknowledgement's property block that ends up empty goes too, so that a PUBACK with
/// reason Success shrinks to its two-byte form.
fn leave_out(packet: &mut Packet, what: Optional) -> bool {
    let Packet::V5(packet) = packet else {
        return false;
    };
    match packet {
        v5::Packet::ConnAck(p) => p
            .properties
            .as_mut()
            .is_some_and(|p| take(&mut p.reason_string, &mut p.user_properties, what)),
        v5::Packet::Disconnect(p) => p
            .properties
            .as_mut()
            .is_some_and(|p| take(&mut p.reason_string, &mut p.user_properties, what)),
        v5::Packet::Auth(p) => p
            .properties
            .as_mut()
            .is_some_and(|p| take(&mut p.reason, &mut p.user_properties, what)),
        v5::Packet::PubAck(p) => ack(&mut p.properties, what),
        v5::Packet::PubRec(p) => ack(&mut p.properties, what),
        v5::Packet::PubRel(p) => ack(&mut p.properties, what),
        v5::Packet::PubComp(p) => ack(&mut p.properties, what),
        v5::Packet::SubAck(p) => ack(&mut p.properties, what),
        v5::Packet::UnsubAck(p) => ack(&mut p.properties, what),
        _ => false,
    }
}

fn take(reason: &mut Option<String>, user: &mut Vec<(String, String)>, what: Optional) -> bool {
    match what {
        Optional::ReasonString => reason.take().is_some(),
        Optional::UserProperties => !std::mem::take(user).is_empty(),
    }
}

/// The properties of the acknowledgements: a reason string and user properties, nothing
/// else, all of it optional.
trait AckProperties {
    fn parts(&mut self) -> (&mut Option<String>, &mut Vec<(String, String)>);
}

macro_rules! ack_properties {
    ($($t:ty),*) => {$(
        impl AckProperties for $t {
            fn parts(&mut self) -> (&mut Option<String>, &mut Vec<(String, String)>) {
                (&mut self.reason_string, &mut self.user_properties)
            }
        }
    )*};
}

ack_properties!(
    v5::PubAckProperties,
    v5::PubRecProperties,
    v5::PubRelProperties,
    v5::PubCompProperties,
    v5::SubAckProperties,
    v5::UnsubAckProperties
);

fn ack<P: AckProperties>(properties: &mut Option<P>, what: Optional) -> bool {
    let Some(p) = properties.as_mut() else {
        return false;
    };
    let (reason, user) = p.parts();
    let changed = take(reason, user, what);
    if reason.is_none() && user.is_empty() {
        *properties = None;
    }
    changed
}

/// The MQTT 5 reason code for a return code that only exists in MQTT 3.1.1 (mqttbytes-ng
/// panics on those); other codes are returned unchanged.
fn v5_connack_code(code: v5::ConnectReturnCode) -> v5::ConnectReturnCode {
    use v5::ConnectReturnCode as Code;
    match code {
        Code::RefusedProtocolVersion => Code::UnsupportedProtocolVersion,
        Code::BadClientId => Code::ClientIdentifierNotValid,
        Code::ServiceUnavailable => Code::ServerUnavailable,
        other => other,
    }
}

/// Encodes an MQTT 5 DISCONNECT (section 3.14): `e0 00` for a normal disconnection without
/// properties, else the reason code and a property length, as every client accepts.
fn encode_v5_disconnect(
    disconnect: &v5::Disconnect,
    out: &mut BytesMut,
) -> Result<usize, Unencodable> {
    let reason = disconnect.reason_code as u8;
    let Some(properties) = &disconnect.properties else {
        if reason == 0 {
            out.put_slice(&[0xE0, 0x00]);
            return Ok(2);
        }
        out.put_slice(&[0xE0, 0x02, reason, 0x00]);
        return Ok(4);
    };
    let mut props = BytesMut::new();
    if let Some(interval) = properties.session_expiry_interval {
        props.put_u8(SESSION_EXPIRY_INTERVAL);
        props.put_u32(interval);
    }
    if let Some(text) = &properties.reason_string {
        props.put_u8(REASON_STRING);
        put_string(&mut props, text)?;
    }
    for (key, value) in &properties.user_properties {
        props.put_u8(USER_PROPERTY);
        put_string(&mut props, key)?;
        put_string(&mut props, value)?;
    }
    if let Some(reference) = &properties.server_reference {
        props.put_u8(SERVER_REFERENCE);
        put_string(&mut props, reference)?;
    }
    let remaining_len = 1 + variable_byte_integer_len(props.len()) + props.len();
    let start = out.len();
    out.put_u8(0xE0);
    put_variable_byte_integer(out, remaining_len)?;
    out.put_u8(reason);
    put_variable_byte_integer(out, props.len())?;
    out.put_slice(&props);
    Ok(out.len() - start)
}

/// Appends a UTF-8 Encoded String (section 1.5.4): a two-byte length, then the bytes.
fn put_string(out: &mut BytesMut, text: &str) -> Result<(), Unencodable> {
    let len = check_string_len(text.len())?;
    out.put_u16(len);
    out.put_slice(text.as_bytes());
    Ok(())
}

fn check_string_len(len: usize) -> Result<u16, Unencodable> {
    u16::try_from(len).map_err(|source| Unencodable::StringTooLong { len, source })
}
