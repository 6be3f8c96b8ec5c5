//! The rules of MQTT 3.1.1 and 5.0 that `mqttbytes-ng` 0.7.1 decodes past: U+0000 in a
//! UTF-8 string, a property given twice (the crate keeps the last), property values the
//! specification forbids, packet identifier 0, empty topic filters, wildcards in a Response
//! Topic (docs/contract.md, "MQTT conformance").
//!
//! Two passes, because the crate loses what the first needs: before decoding, a walk over
//! the raw MQTT 5 property blocks (only there is a duplicate still visible, and every
//! string property of every packet is reached by one loop) and over the packet identifier
//! of PUBLISH (the crate refuses id 0 as malformed, where the specification makes it a
//! protocol error); after decoding, the strings outside property blocks, read from the
//! decoded packet. A body too short or otherwise broken for the first pass is left alone:
//! mqttbytes-ng then refuses it with a precise cause.

use mqttbytes_ng::{v4, v5};

use super::frame::{self, variable_byte_integer};
use super::{CodecError, Malformed, Violation};

fn malformed(m: Malformed) -> CodecError {
    CodecError::Malformed(m)
}

fn violation(v: Violation) -> CodecError {
    CodecError::Protocol(v)
}

/// The byte that no UTF-8 encoding of another character contains: U+0000.
fn check_nul(bytes: &[u8], what: &'static str) -> Result<(), CodecError> {
    if bytes.contains(&0) {
        Err(malformed(Malformed::Nul(what)))
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------- before decoding

/// How a property's value is encoded (MQTT 5 §2.2.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Byte,
    TwoBytes,
    FourBytes,
    VariableByteInteger,
    Utf8,
    Binary,
    Pair,
}

/// The name and encoding of a property identifier; None for an identifier MQTT 5 does not
/// define (the decoder refuses it).
fn property(id: u8) -> Option<(&'static str, Kind)> {
    use Kind::*;
    Some(match id {
        0x01 => ("Payload Format Indicator", Byte),
        0x02 => ("Message Expiry Interval", FourBytes),
        0x03 => ("Content Type", Utf8),
        0x08 => ("Response Topic", Utf8),
        0x09 => ("Correlation Data", Binary),
        0x0B => ("Subscription Identifier", VariableByteInteger),
        0x11 => ("Session Expiry Interval", FourBytes),
        0x12 => ("Assigned Client Identifier", Utf8),
        0x13 => ("Server Keep Alive", TwoBytes),
        0x15 => ("Authentication Method", Utf8),
        0x16 => ("Authentication Data", Binary),
        0x17 => ("Request Problem Information", Byte),
        0x18 => ("Will Delay Interval", FourBytes),
        0x19 => ("Request Response Information", Byte),
        0x1A => ("Response Information", Utf8),
        0x1C => ("Server Reference", Utf8),
        0x1F => ("Reason String", Utf8),
        0x21 => ("Receive Maximum", TwoBytes),
        0x22 => ("Topic Alias Maximum", TwoBytes),
        0x23 => ("Topic Alias", TwoBytes),
        0x24 => ("Maximum QoS", Byte),
        0x25 => ("Retain Available", Byte),
        0x26 => ("User Property", Pair),
        0x27 => ("Maximum Packet Size", FourBytes),
        0x28 => ("Wildcard Subscription Available", Byte),
        0x29 => ("Subscription Identifier Available", Byte),
        0x2A => ("Shared Subscription Available", Byte),
        _ => return None,
    })
}

const USER_PROPERTY: u8 = 0x26;
const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
const RESPONSE_TOPIC: u8 = 0x08;

/// Where a property block sits, for the rules that depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Connect,
    Will,
    Publish,
    /// Every other packet a client sends: acknowledgements, SUBSCRIBE, UNSUBSCRIBE,
    /// DISCONNECT, AUTH.
    Other,
}

/// The name MQTT-1.5.4-2 errors give a string property (what a client can look up).
fn string_name(id: u8) -> &'static str {
    match id {
        0x03 => "content type",
        0x08 => "response topic",
        0x12 => "assigned client identifier",
        0x15 => "authentication method",
        0x1A => "response information",
        0x1C => "server reference",
        0x1F => "reason string",
        _ => "user property",
    }
}

/// Walks one property block starting at `bytes[0]` (its Variable Byte Integer length);
/// returns the bytes after it, or None when the block is cut short or holds an unknown
/// identifier (the decoder reports those).
fn scan_properties(bytes: &[u8], block: Block) -> Result<Option<&[u8]>, CodecError> {
    let Some((len, len_len)) = variable_byte_integer(bytes).ok().flatten() else {
        return Ok(None);
    };
    let Some(mut rest) = bytes.get(len_len..len_len + len) else {
        return Ok(None);
    };
    let after = &bytes[len_len + len..];
    // Every identifier is below 64: one bit each.
    let mut seen = 0u64;
    while let [id, tail @ ..] = rest {
        let Some((name, kind)) = property(*id) else {
            return Ok(None);
        };
        let repeatable =
            *id == USER_PROPERTY || (*id == SUBSCRIPTION_IDENTIFIER && block == Block::Publish);
        if seen & (1 << id) != 0 && !repeatable {
            return Err(violation(Violation::DuplicateProperty(name)));
        }
        seen |= 1 << id;
        let Some((value, next)) = split_value(tail, kind) else {
            return Ok(None);
        };
        check_value(*id, name, kind, value, block)?;
        rest = next;
    }
    Ok(Some(after))
}

/// Splits one property value of `kind` off the front of `bytes`: (the value, the rest).
/// For strings and binary data the value is the content without its length; for a user
/// property both strings with their lengths.
fn split_value(bytes: &[u8], kind: Kind) -> Option<(&[u8], &[u8])> {
    let fixed = |n: usize| (bytes.len() >= n).then(|| bytes.split_at(n));
    match kind {
        Kind::Byte => fixed(1),
        Kind::TwoBytes => fixed(2),
        Kind::FourBytes => fixed(4),
        Kind::VariableByteInteger => {
            let (_, len) = variable_byte_integer(bytes).ok().flatten()?;
            Some(bytes.split_at(len))
        }
        Kind::Utf8 | Kind::Binary => {
            let (text, rest) = split_string(bytes)?;
            Some((text, rest))
        }
        Kind::Pair => {
            let (_, rest) = split_string(bytes)?;
            let (_, rest) = split_string(rest)?;
            Some((&bytes[..bytes.len() - rest.len()], rest))
        }
    }
}

/// A two-byte length and that many bytes: (the content, the rest).
fn split_string(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let [high, low, rest @ ..] = bytes else {
        return None;
    };
    let len = usize::from(u16::from_be_bytes([*high, *low]));
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// The rules on one property value.
fn check_value(
    id: u8,
    name: &'static str,
    kind: Kind,
    value: &[u8],
    block: Block,
) -> Result<(), CodecError> {
    match kind {
        // Two strings, each after a length that may hold a zero byte: check the texts.
        Kind::Pair => {
            if let Some((key, rest)) = split_string(value) {
                check_nul(key, string_name(id))?;
                if let Some((text, _)) = split_string(rest) {
                    check_nul(text, string_name(id))?;
                }
            }
        }
        Kind::Utf8 => check_nul(value, string_name(id))?,
        _ => {}
    }
    if id == RESPONSE_TOPIC && value.iter().any(|b| matches!(b, b'+' | b'#')) {
        return Err(malformed(Malformed::ResponseTopicWildcard));
    }
    if block == Block::Connect {
        match (id, value) {
            (0x21, [0, 0]) | (0x27, [0, 0, 0, 0]) => return Err(violation(Violation::Zero(name))),
            (0x17 | 0x19, [v]) if *v > 1 => {
                return Err(violation(Violation::NotABoolean { name, value: *v }))
            }
            _ => {}
        }
    }
    Ok(())
}

/// The property rules of one MQTT 5 packet after CONNECT (`body`: the bytes after the
/// fixed header), and PUBLISH's packet identifier rule.
pub(super) fn before_decode_v5(byte1: u8, body: &[u8]) -> Result<(), CodecError> {
    let packet_type = byte1 >> 4;
    let properties = match packet_type {
        frame::PUBLISH => {
            let Some(rest) = publish_after_topic(byte1, body)? else {
                return Ok(());
            };
            scan_properties(rest, Block::Publish)?;
            return Ok(());
        }
        // Packet id, reason code, then properties when the remaining length says so.
        frame::PUBACK | frame::PUBREC | frame::PUBREL | frame::PUBCOMP => body.get(3..),
        frame::SUBSCRIBE | frame::UNSUBSCRIBE => body.get(2..),
        frame::DISCONNECT | frame::AUTH => body.get(1..),
        _ => None,
    };
    match properties {
        Some(block) if !block.is_empty() => scan_properties(block, Block::Other).map(|_| ()),
        _ => Ok(()),
    }
}

/// The packet identifier rule of PUBLISH in MQTT 3.1.1.
pub(super) fn before_decode_v311(byte1: u8, body: &[u8]) -> Result<(), CodecError> {
    if byte1 >> 4 == frame::PUBLISH {
        publish_after_topic(byte1, body)?;
    }
    Ok(())
}

/// Skips a PUBLISH's topic name and, for QoS 1 and 2, checks and skips its packet
/// identifier: the bytes after them, None when the body is cut short.
fn publish_after_topic(byte1: u8, body: &[u8]) -> Result<Option<&[u8]>, CodecError> {
    let Some((_, rest)) = split_string(body) else {
        return Ok(None);
    };
    if byte1 & 0b0110 == 0 {
        return Ok(Some(rest));
    }
    match rest {
        [0, 0, ..] => Err(violation(Violation::PacketIdZero("PUBLISH"))),
        [_, _, after @ ..] => Ok(Some(after)),
        _ => Ok(None),
    }
}

/// The property rules of an MQTT 5 CONNECT (`body`: the bytes after the fixed header),
/// its CONNECT properties and its will properties.
pub(super) fn before_decode_connect_v5(body: &[u8]) -> Result<(), CodecError> {
    // Protocol name, level, flags and keep alive were read by `frame::connect_protocol`.
    let Some((_, rest)) = split_string(body) else {
        return Ok(());
    };
    let [_level, flags, _, _, rest @ ..] = rest else {
        return Ok(());
    };
    let Some(rest) = scan_properties(rest, Block::Connect)? else {
        return Ok(());
    };
    if flags & 0b0000_0100 != 0 {
        if let Some((_, will)) = split_string(rest) {
            scan_properties(will, Block::Will)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- after decoding

/// The string rules of a decoded MQTT 3.1.1 CONNECT.
pub(super) fn connect_v311(connect: &v4::Connect) -> Result<(), CodecError> {
    check_nul(connect.client_id.as_bytes(), "client identifier")?;
    if let Some(will) = &connect.last_will {
        check_nul(will.topic.as_bytes(), "will topic")?;
    }
    if let Some(login) = &connect.login {
        check_nul(login.username.as_bytes(), "user name")?;
    }
    Ok(())
}

/// The string rules of a decoded MQTT 5 CONNECT (its properties were checked before).
pub(super) fn connect_v5(
    connect: &v5::Connect,
    will: Option<&v5::LastWill>,
    login: Option<&v5::Login>,
) -> Result<(), CodecError> {
    check_nul(connect.client_id.as_bytes(), "client identifier")?;
    if let Some(will) = will {
        check_nul(&will.topic, "will topic")?;
    }
    if let Some(login) = login {
        check_nul(login.username.as_bytes(), "user name")?;
    }
    Ok(())
}

/// A topic filter: not empty (MQTT-4.7.3-1), no NUL.
fn check_filter(filter: &str) -> Result<(), CodecError> {
    if filter.is_empty() {
        return Err(violation(Violation::EmptyTopicFilter));
    }
    check_nul(filter.as_bytes(), "topic filter")
}

/// The string and packet identifier rules of a decoded MQTT 3.1.1 packet.
pub(super) fn packet_v311(packet: &v4::Packet) -> Result<(), CodecError> {
    match packet {
        v4::Packet::Publish(p) => check_nul(p.topic.as_bytes(), "topic name"),
        v4::Packet::Subscribe(s) => {
            check_id(s.pkid, "SUBSCRIBE")?;
            s.filters.iter().try_for_each(|f| check_filter(&f.path))
        }
        v4::Packet::Unsubscribe(u) => {
            check_id(u.pkid, "UNSUBSCRIBE")?;
            u.topics.iter().try_for_each(|f| check_filter(f))
        }
        _ => Ok(()),
    }
}

/// The string and packet identifier rules of a decoded MQTT 5 packet (its properties were
/// checked before).
pub(super) fn packet_v5(packet: &v5::Packet) -> Result<(), CodecError> {
    match packet {
        v5::Packet::Publish(p) => check_nul(&p.topic, "topic name"),
        v5::Packet::Subscribe(s) => {
            check_id(s.pkid, "SUBSCRIBE")?;
            s.filters.iter().try_for_each(|f| check_filter(&f.path))
        }
        v5::Packet::Unsubscribe(u) => {
            check_id(u.pkid, "UNSUBSCRIBE")?;
            u.filters.iter().try_for_each(|f| check_filter(f))
        }
        _ => Ok(()),
    }
}

fn check_id(pkid: u16, packet: &'static str) -> Result<(), CodecError> {
    if pkid == 0 {
        Err(violation(Violation::PacketIdZero(packet)))
    } else {
        Ok(())
    }
}
