//! A minimal MQTT 3.1.1 encoder and decoder: just the packets a load generator sends and
//! reads (CONNECT/CONNACK, PUBLISH/PUBACK, SUBSCRIBE/SUBACK, PINGREQ/PINGRESP, DISCONNECT).
//!
//! Why hand-rolled rather than rumqttc or the broker's own codec: the generator must cost
//! as little CPU as possible on a 2-core machine it shares with the broker under test, so
//! that the figures measure the broker. Encoding appends into a caller's buffer (one write
//! per batch of packets), and decoding hands out PUBLISH payloads as `Bytes` views of the
//! read buffer, without copying.

use bytes::{Buf, Bytes, BytesMut};

/// What the decoder refuses. The broker under test sent bytes that are not MQTT 3.1.1 as we
/// understand it: the run stops, because its counts would be meaningless.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// The Remaining Length field ran past 4 bytes.
    #[error("malformed remaining length")]
    RemainingLength,
    /// A packet shorter than its own fixed fields say.
    #[error("truncated {kind} packet ({len} bytes)")]
    Truncated { kind: &'static str, len: usize },
    /// A PUBLISH with QoS 3.
    #[error("PUBLISH with invalid QoS bits in flags {flags:#04x}")]
    InvalidQos { flags: u8 },
}

/// One packet from the broker. Only the fields the workloads use are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    ConnAck {
        code: u8,
    },
    Publish {
        qos: u8,
        packet_id: u16,
        payload: Bytes,
    },
    /// `reason` is the MQTT 5 reason code (0x00 success; 0x80 and above a refusal such as
    /// 0x97 quota exceeded); a 3.1.1 PUBACK has none and reads as 0x00.
    PubAck {
        packet_id: u16,
        reason: u8,
    },
    SubAck {
        packet_id: u16,
        codes: Vec<u8>,
    },
    PingResp,
    /// Any other packet type (PUBREC, UNSUBACK, ...): counted, never expected here.
    Other {
        packet_type: u8,
    },
}

/// Appends a CONNECT with this client id, keep alive and clean-session flag. No user name:
/// the brokers under test identify the client by its certificate.
pub fn connect(buf: &mut Vec<u8>, client_id: &str, keep_alive_s: u16, clean: bool) {
    let id = client_id.as_bytes();
    let body_len = 10 + 2 + id.len();
    buf.push(0x10);
    remaining_length(buf, body_len);
    buf.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4]);
    buf.push(if clean { 0x02 } else { 0 });
    buf.extend_from_slice(&keep_alive_s.to_be_bytes());
    string(buf, id);
}

/// Appends a PUBLISH. `packet_id` is written only for QoS > 0, as the protocol requires.
pub fn publish(
    buf: &mut Vec<u8>,
    topic: &str,
    qos: u8,
    packet_id: u16,
    retain: bool,
    payload: &[u8],
) {
    let id_len = if qos > 0 { 2 } else { 0 };
    buf.push(0x30 | (qos << 1) | u8::from(retain));
    remaining_length(buf, 2 + topic.len() + id_len + payload.len());
    string(buf, topic.as_bytes());
    if qos > 0 {
        buf.extend_from_slice(&packet_id.to_be_bytes());
    }
    buf.extend_from_slice(payload);
}

/// Appends a PUBACK for a QoS 1 PUBLISH received.
pub fn puback(buf: &mut Vec<u8>, packet_id: u16) {
    buf.extend_from_slice(&[0x40, 2]);
    buf.extend_from_slice(&packet_id.to_be_bytes());
}

/// Appends a SUBSCRIBE to one filter at this maximum QoS.
pub fn subscribe(buf: &mut Vec<u8>, packet_id: u16, filter: &str, qos: u8) {
    buf.push(0x82);
    remaining_length(buf, 2 + 2 + filter.len() + 1);
    buf.extend_from_slice(&packet_id.to_be_bytes());
    string(buf, filter.as_bytes());
    buf.push(qos);
}

/// Appends a PINGREQ (keeps idle connections inside the broker's keep alive).
pub fn pingreq(buf: &mut Vec<u8>) {
    buf.extend_from_slice(&[0xc0, 0]);
}

/// Appends a DISCONNECT: the clean way to leave, so the broker sends no will.
pub fn disconnect(buf: &mut Vec<u8>) {
    buf.extend_from_slice(&[0xe0, 0]);
}

fn string(buf: &mut Vec<u8>, s: &[u8]) {
    // Topic and client-id lengths come from our own options and stay far below 64 KiB;
    // saturating keeps a wrong length impossible to encode silently.
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&s[..usize::from(len)]);
}

fn remaining_length(buf: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.push(byte);
        if len == 0 {
            break;
        }
    }
}

/// Splits packets off a read buffer. Feed it with `buffer()` (e.g. `read_buf`), then call
/// `next` until it returns `None`.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder {
            buf: BytesMut::with_capacity(16 * 1024),
        }
    }

    /// The buffer to read into.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// The next complete packet, or `None` when more bytes are needed.
    pub fn next(&mut self) -> Result<Option<Packet>, MqttError> {
        let Some((header_len, body_len)) = frame_len(&self.buf)? else {
            return Ok(None);
        };
        if self.buf.len() < header_len + body_len {
            self.buf.reserve(header_len + body_len - self.buf.len());
            return Ok(None);
        }
        let first = self.buf[0];
        self.buf.advance(header_len);
        let body = self.buf.split_to(body_len).freeze();
        parse(first, body).map(Some)
    }
}

/// (fixed header length, remaining length) once the header is complete.
fn frame_len(buf: &[u8]) -> Result<Option<(usize, usize)>, MqttError> {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((2 + i, len)));
        }
    }
    Err(MqttError::RemainingLength)
}

fn parse(first: u8, mut body: Bytes) -> Result<Packet, MqttError> {
    let need = |kind: &'static str, body: &Bytes, n: usize| {
        if body.len() < n {
            Err(MqttError::Truncated {
                kind,
                len: body.len(),
            })
        } else {
            Ok(())
        }
    };
    match first >> 4 {
        2 => {
            need("CONNACK", &body, 2)?;
            Ok(Packet::ConnAck { code: body[1] })
        }
        3 => {
            let qos = (first >> 1) & 0x03;
            if qos == 3 {
                return Err(MqttError::InvalidQos { flags: first });
            }
            need("PUBLISH", &body, 2)?;
            let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let id_len = if qos > 0 { 2 } else { 0 };
            need("PUBLISH", &body, 2 + topic_len + id_len)?;
            body.advance(2 + topic_len);
            let packet_id = if qos > 0 { body.get_u16() } else { 0 };
            Ok(Packet::Publish {
                qos,
                packet_id,
                payload: body,
            })
        }
        4 => {
            need("PUBACK", &body, 2)?;
            Ok(Packet::PubAck {
                packet_id: u16::from_be_bytes([body[0], body[1]]),
                reason: body.get(2).copied().unwrap_or(0),
            })
        }
        9 => {
            need("SUBACK", &body, 3)?;
            Ok(Packet::SubAck {
                packet_id: u16::from_be_bytes([body[0], body[1]]),
                codes: body[2..].to_vec(),
            })
        }
        13 => Ok(Packet::PingResp),
        packet_type => Ok(Packet::Other { packet_type }),
    }
}
