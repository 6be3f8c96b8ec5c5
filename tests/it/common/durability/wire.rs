//! MQTT packets as raw bytes, both ways, for the durability tests.
//!
//! Why by hand: those tests must control every packet id and every acknowledgement (which
//! PUBLISH was PUBACKed, whether a redelivery carries DUP, a QoS 2 receiver that remembers
//! ids across reconnects), and rumqttc hides exactly those. Only what the tests need is
//! here: CONNECT (3.1.1 and 5 with a session expiry), PUBLISH, SUBSCRIBE, the four
//! acknowledgements and DISCONNECT out; CONNACK, PUBLISH, the acknowledgements, SUBACK
//! and DISCONNECT in.

/// Fixed-header types of the acknowledgements (PUBREL carries its required flags).
pub const PUBACK: u8 = 0x40;
pub const PUBREC: u8 = 0x50;
pub const PUBREL: u8 = 0x62;
pub const PUBCOMP: u8 = 0x70;

/// The Remaining Length varint.
fn remaining_length(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

fn packet(first: u8, body: Vec<u8>) -> Vec<u8> {
    let mut p = vec![first];
    p.extend(remaining_length(body.len()));
    p.extend(body);
    p
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// A CONNECT, keep alive 60 s. `session_expiry` is the MQTT 5 property (None: MQTT 3.1.1).
pub fn connect(client_id: &str, clean: bool, session_expiry: Option<u32>) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, b"MQTT");
    body.push(if session_expiry.is_some() { 5 } else { 4 });
    body.push(if clean { 0x02 } else { 0 });
    body.extend_from_slice(&60u16.to_be_bytes());
    if let Some(secs) = session_expiry {
        body.extend([5, 0x11]);
        body.extend_from_slice(&secs.to_be_bytes());
    }
    string(&mut body, client_id.as_bytes());
    packet(0x10, body)
}

/// A PUBLISH (`pkid` is ignored for QoS 0).
pub fn publish(v5: bool, qos: u8, retain: bool, pkid: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1) | u8::from(retain), body)
}

/// The same PUBLISH marked as a redelivery (DUP).
pub fn publish_dup(v5: bool, qos: u8, pkid: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut p = publish(v5, qos, false, pkid, topic, payload);
    p[0] |= 0x08;
    p
}

/// A SUBSCRIBE for one filter.
pub fn subscribe(v5: bool, pkid: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if v5 {
        body.push(0);
    }
    string(&mut body, filter.as_bytes());
    body.push(qos);
    packet(0x82, body)
}

/// PUBACK / PUBREC / PUBREL / PUBCOMP with success (the same bytes in 3.1.1 and 5).
pub fn ack(kind: u8, pkid: u16) -> Vec<u8> {
    packet(kind, pkid.to_be_bytes().to_vec())
}

/// A normal DISCONNECT (the same bytes in 3.1.1 and 5).
pub fn disconnect() -> Vec<u8> {
    vec![0xe0, 0]
}

/// A packet from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pkt {
    ConnAck {
        present: bool,
        code: u8,
    },
    Publish {
        dup: bool,
        qos: u8,
        retain: bool,
        /// 0 for QoS 0.
        pkid: u16,
        topic: String,
        payload: Vec<u8>,
    },
    /// PUBACK, PUBREC, PUBREL or PUBCOMP (`kind` is the fixed-header byte, flags cleared
    /// except PUBREL's); `reason` is 0 when the packet has none.
    Ack {
        kind: u8,
        pkid: u16,
        reason: u8,
    },
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    Disconnect {
        reason: u8,
    },
    Other(Vec<u8>),
}

/// A cursor over a packet body.
struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("packet too short: need {n}, have {}", self.0.len()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn varint(&mut self) -> Result<usize, String> {
        let mut n = 0usize;
        for shift in 0..4 {
            let b = self.take(1)?[0];
            n |= usize::from(b & 0x7f) << (7 * shift);
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err("varint longer than 4 bytes".into())
    }

    /// Skips an MQTT 5 property block.
    fn properties(&mut self) -> Result<(), String> {
        let n = self.varint()?;
        self.take(n).map(|_| ())
    }
}

/// Parses one whole packet as `common::read_packet` returns it.
pub fn parse(bytes: &[u8], v5: bool) -> Result<Pkt, String> {
    let first = *bytes.first().ok_or("empty packet")?;
    let mut b = Body(&bytes[1..]);
    let len = b.varint()?;
    if b.0.len() != len {
        return Err(format!("remaining length {len} but {} bytes", b.0.len()));
    }
    Ok(match first >> 4 {
        2 => {
            let flags = b.take(1)?[0];
            Pkt::ConnAck {
                present: flags & 1 == 1,
                code: b.take(1)?[0],
            }
        }
        3 => {
            let qos = (first >> 1) & 3;
            let topic_len = usize::from(b.u16()?);
            let topic =
                String::from_utf8(b.take(topic_len)?.to_vec()).map_err(|e| e.to_string())?;
            let pkid = if qos > 0 { b.u16()? } else { 0 };
            if v5 {
                b.properties()?;
            }
            Pkt::Publish {
                dup: first & 0x08 != 0,
                qos,
                retain: first & 1 == 1,
                pkid,
                topic,
                payload: b.0.to_vec(),
            }
        }
        4..=7 => Pkt::Ack {
            kind: if first >> 4 == 6 {
                PUBREL
            } else {
                first & 0xf0
            },
            pkid: b.u16()?,
            reason: b.0.first().copied().unwrap_or(0),
        },
        9 => {
            let pkid = b.u16()?;
            if v5 {
                b.properties()?;
            }
            Pkt::SubAck {
                pkid,
                codes: b.0.to_vec(),
            }
        }
        14 => Pkt::Disconnect {
            reason: b.0.first().copied().unwrap_or(0),
        },
        _ => Pkt::Other(bytes.to_vec()),
    })
}
