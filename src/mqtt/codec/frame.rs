//! The fixed header, and the wire rules that `mqttbytes-ng` 0.7.1 does not enforce.
//!
//! We frame packets ourselves instead of letting `mqttbytes-ng` do it because its size
//! limit counts only the remaining length (contract §9 means the whole packet) and because we
//! must refuse a packet from its first byte or its length alone, before buffering its body.
//! The checks here are the ones the MQTT specifications call "malformed" and the crate skips
//! (it masks the bits it does not use): reserved flag bits, fixed remaining lengths, reserved
//! subscription option bits, reserved CONNECT flag.

use bytes::{BufMut, BytesMut};

use super::{CodecError, Malformed, Protocol, Unencodable};

/// Control packet types (MQTT 3.1.1 and 5.0, section 2.1.2), as numbers because we compare
/// them with the high nibble of the first byte before anything is decoded.
pub(super) const CONNECT: u8 = 1;
pub(super) const CONNACK: u8 = 2;
pub(super) const PUBLISH: u8 = 3;
pub(super) const PUBACK: u8 = 4;
pub(super) const PUBREC: u8 = 5;
pub(super) const PUBREL: u8 = 6;
pub(super) const PUBCOMP: u8 = 7;
pub(super) const SUBSCRIBE: u8 = 8;
pub(super) const UNSUBSCRIBE: u8 = 10;
pub(super) const UNSUBACK: u8 = 11;
pub(super) const PINGREQ: u8 = 12;
pub(super) const PINGRESP: u8 = 13;
pub(super) const DISCONNECT: u8 = 14;
pub(super) const AUTH: u8 = 15;

/// The largest value a Variable Byte Integer can carry (four bytes of seven bits).
const MAX_VARIABLE_BYTE_INTEGER: usize = 268_435_455;

/// A parsed fixed header. Kept apart from `mqttbytes-ng`'s own type, whose fields are
/// private, because the reader needs the lengths before the body has arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FixedHeader {
    /// Packet type (high nibble) and flags (low nibble).
    pub byte1: u8,
    /// 1 + the number of bytes of the remaining length (2 to 5).
    pub header_len: usize,
    /// What the peer claims follows the fixed header.
    pub remaining_len: usize,
}

impl FixedHeader {
    pub fn packet_type(&self) -> u8 {
        self.byte1 >> 4
    }

    /// The whole packet: what `max_packet_size` limits.
    pub fn frame_len(&self) -> usize {
        self.header_len + self.remaining_len
    }
}

/// Parses the fixed header at the start of `buf`; `Ok(None)` until enough bytes arrived.
pub(super) fn parse_fixed_header(buf: &[u8]) -> Result<Option<FixedHeader>, Malformed> {
    let Some((&byte1, rest)) = buf.split_first() else {
        return Ok(None);
    };
    Ok(
        variable_byte_integer(rest)?.map(|(remaining_len, len)| FixedHeader {
            byte1,
            header_len: 1 + len,
            remaining_len,
        }),
    )
}

/// Decodes a Variable Byte Integer (section 1.5.5 / 2.2.3): `Ok(None)` when `bytes` ends
/// before its last byte, `Err` when a fourth byte still has the continuation bit.
pub(super) fn variable_byte_integer(bytes: &[u8]) -> Result<Option<(usize, usize)>, Malformed> {
    let mut value = 0usize;
    for (index, &byte) in bytes.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7F) << (7 * index);
        if byte & 0x80 == 0 {
            return Ok(Some((value, index + 1)));
        }
    }
    if bytes.len() >= 4 {
        Err(Malformed::RemainingLength)
    } else {
        Ok(None)
    }
}

/// Appends `value` as a Variable Byte Integer.
pub(super) fn put_variable_byte_integer(
    out: &mut BytesMut,
    value: usize,
) -> Result<(), Unencodable> {
    if value > MAX_VARIABLE_BYTE_INTEGER {
        return Err(Unencodable::TooLong { len: value });
    }
    let mut rest = value;
    loop {
        let byte = (rest % 128) as u8;
        rest /= 128;
        if rest == 0 {
            out.put_u8(byte);
            return Ok(());
        }
        out.put_u8(byte | 0x80);
    }
}

/// The number of bytes `put_variable_byte_integer` writes for `value`.
pub(super) fn variable_byte_integer_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Checks the packet type and the reserved flag bits of a first byte (section 2.1.3 of
/// both versions: PUBREL, SUBSCRIBE and UNSUBSCRIBE carry 0010, PUBLISH its own flags, every
/// other packet 0000; type 0 is reserved, and so is 15 before MQTT 5 named it AUTH).
pub(super) fn check_first_byte(byte1: u8, protocol: Protocol) -> Result<(), Malformed> {
    let packet_type = byte1 >> 4;
    let flags = byte1 & 0x0F;
    let expected = match packet_type {
        0 => return Err(Malformed::ReservedPacketType(0)),
        AUTH if protocol == Protocol::V311 => return Err(Malformed::ReservedPacketType(AUTH)),
        // PUBLISH: DUP, QoS, RETAIN; QoS 3 is refused by mqttbytes-ng (InvalidQoS). DUP
        // marks a redelivery, which a QoS 0 message never is (MQTT-3.3.1-2).
        PUBLISH if flags & 0b1110 == 0b1000 => return Err(Malformed::DupOnQos0),
        PUBLISH => return Ok(()),
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => 0b0010,
        _ => 0,
    };
    if flags == expected {
        Ok(())
    } else {
        Err(Malformed::ReservedFlags { packet_type, flags })
    }
}

/// Checks the packets whose remaining length the specification fixes. mqttbytes-ng ignores
/// trailing bytes there, and reads MQTT 3.1.1 acknowledgements of any length as valid.
pub(super) fn check_remaining_len(
    header: &FixedHeader,
    protocol: Protocol,
) -> Result<(), Malformed> {
    let packet_type = header.packet_type();
    let expected = match (protocol, packet_type) {
        (_, PINGREQ | PINGRESP) => 0,
        (Protocol::V311, DISCONNECT) => 0,
        (Protocol::V311, CONNACK | PUBACK | PUBREC | PUBREL | PUBCOMP | UNSUBACK) => 2,
        _ => return Ok(()),
    };
    if header.remaining_len == expected {
        Ok(())
    } else {
        Err(Malformed::RemainingLengthFixed {
            packet_type,
            expected,
            actual: header.remaining_len,
        })
    }
}

/// Checks the reserved bits of each subscription options byte of a SUBSCRIBE body (the bytes
/// after the fixed header): bits 2-7 in MQTT 3.1.1 (section 3.8.3.1), bits 6-7 in MQTT 5
/// (section 3.8.3.1). mqttbytes-ng masks them away. A body too short to walk is left to
/// mqttbytes-ng, which reports it as malformed with a precise cause.
pub(super) fn check_subscription_options(body: &[u8], protocol: Protocol) -> Result<(), Malformed> {
    let reserved = match protocol {
        Protocol::V311 => 0b1111_1100,
        Protocol::V5 => 0b1100_0000,
    };
    let mut rest = body.get(2..).unwrap_or_default();
    if protocol == Protocol::V5 {
        let Some((properties_len, len)) = variable_byte_integer(rest)? else {
            return Ok(());
        };
        rest = rest.get(len + properties_len..).unwrap_or_default();
    }
    while let [high, low, tail @ ..] = rest {
        let filter_len = usize::from(u16::from_be_bytes([*high, *low]));
        let Some(&options) = tail.get(filter_len) else {
            return Ok(());
        };
        if options & reserved != 0 {
            return Err(Malformed::SubscriptionOptions(options));
        }
        rest = &tail[filter_len + 1..];
    }
    Ok(())
}

/// Reads the protocol name and level that open a CONNECT body and decides the protocol, then
/// checks the connect flags that mqttbytes-ng does not (section 3.1.2.3: the reserved bit;
/// MQTT 3.1.1 only: no password without a user name). We do this ourselves so that MQTT 3.1
/// ("MQIsdp", level 3) and unknown levels become `UnsupportedProtocol`, which the caller
/// answers with a CONNACK, instead of an opaque decoding error.
pub(super) fn connect_protocol(body: &[u8]) -> Result<Protocol, CodecError> {
    let short = || CodecError::Malformed(Malformed::ConnectHeader);
    let [high, low, rest @ ..] = body else {
        return Err(short());
    };
    let name_len = usize::from(u16::from_be_bytes([*high, *low]));
    let name = rest.get(..name_len).ok_or_else(short)?;
    let rest = &rest[name_len..];
    let (&level, rest) = rest.split_first().ok_or_else(short)?;
    let protocol = match (name, level) {
        (b"MQTT", 4) => Protocol::V311,
        (b"MQTT", 5) => Protocol::V5,
        (b"MQTT" | b"MQIsdp", _) => {
            return Err(CodecError::UnsupportedProtocol {
                name: String::from_utf8_lossy(name).into_owned(),
                level,
                form: connect_form(name, level, rest),
            })
        }
        _ => {
            return Err(CodecError::Malformed(Malformed::ProtocolName(
                String::from_utf8_lossy(name).into_owned(),
            )))
        }
    };
    let &flags = rest.first().ok_or_else(short)?;
    if flags & 0b0000_0001 != 0 {
        return Err(CodecError::Malformed(Malformed::ReservedConnectFlag));
    }
    if protocol == Protocol::V311 && flags & 0b1100_0000 == 0b0100_0000 {
        return Err(CodecError::Malformed(Malformed::PasswordWithoutUserName));
    }
    Ok(protocol)
}

/// The CONNACK layout a client whose CONNECT names a protocol level certmq does not speak
/// can parse, judged from the layout of the rest of its CONNECT (`rest`: flags onwards):
/// a property block after the keep alive is MQTT 5's, none is MQTT 3.1.1's (and 3.1's).
/// When both or neither read to the exact end, a level above 5 is taken for a newer MQTT
/// (answered in MQTT 5 form), anything else for an older one (docs/contract.md, "MQTT
/// conformance").
fn connect_form(name: &[u8], level: u8, rest: &[u8]) -> Protocol {
    let [flags, _, _, payload @ ..] = rest else {
        return Protocol::V311;
    };
    match (reads_as_v311(*flags, payload), reads_as_v5(*flags, payload)) {
        (true, false) => Protocol::V311,
        (false, true) => Protocol::V5,
        _ if level > 5 && name == b"MQTT" => Protocol::V5,
        _ => Protocol::V311,
    }
}

/// The payload of a CONNECT in MQTT 3.1.1 layout, read to its exact end: client id, will
/// topic and message, user name, password, as the flags announce them.
fn reads_as_v311(flags: u8, payload: &[u8]) -> bool {
    let mut rest = Some(payload);
    rest = rest.and_then(skip_string);
    if flags & 0b0000_0100 != 0 {
        rest = rest.and_then(skip_string).and_then(skip_string);
    }
    rest = skip_login(flags, rest);
    rest.is_some_and(<[u8]>::is_empty)
}

/// The same in MQTT 5 layout: properties first, and will properties before the will topic.
fn reads_as_v5(flags: u8, payload: &[u8]) -> bool {
    let mut rest = skip_properties(payload).and_then(skip_string);
    if flags & 0b0000_0100 != 0 {
        rest = rest
            .and_then(skip_properties)
            .and_then(skip_string)
            .and_then(skip_string);
    }
    rest = skip_login(flags, rest);
    rest.is_some_and(<[u8]>::is_empty)
}

fn skip_login(flags: u8, mut rest: Option<&[u8]>) -> Option<&[u8]> {
    if flags & 0b1000_0000 != 0 {
        rest = rest.and_then(skip_string);
    }
    if flags & 0b0100_0000 != 0 {
        rest = rest.and_then(skip_string);
    }
    rest
}

/// What follows a two-byte length and that many bytes, if they are there.
fn skip_string(bytes: &[u8]) -> Option<&[u8]> {
    let [high, low, rest @ ..] = bytes else {
        return None;
    };
    rest.get(usize::from(u16::from_be_bytes([*high, *low]))..)
}

/// What follows a property block (Variable Byte Integer length, then the properties).
fn skip_properties(bytes: &[u8]) -> Option<&[u8]> {
    let (len, len_len) = variable_byte_integer(bytes).ok().flatten()?;
    bytes.get(len_len + len..)
}
