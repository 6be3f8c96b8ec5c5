//! Raw MQTT over TLS: the tests' one hand-written MQTT encoder and decoder, and the client
//! that speaks it. Packets are built and parsed byte by byte, for what no client library
//! does on demand: stop in the middle of a QoS 2 exchange, re-send a PUBLISH with DUP, go
//! silent past the keep alive, send a will the ACL forbids, choose every packet id across a
//! kill -9, send a malformed or exact-protocol packet.
//!
//! - Out: [`RawConnect`], [`raw_publish`] ([`raw_publish_flags`] for RETAIN),
//!   [`raw_subscribe`] ([`raw_subscribe_many`]), [`raw_ack`], [`PINGREQ`], [`DISCONNECT`].
//! - In: [`parse`] (any packet, as [`Pkt`]), [`parse_publish`], [`parse_disconnect`].
//! - [`Raw`]: one connection. `send` and `recv` panic when the broker is gone; `try_send`
//!   and `try_recv` return the error, for tests that kill the broker mid-stream.
//!
//! The MQTT 5 typed client of the MQTT 5 tests (`v5tests::Raw5`) uses rumqttc's codec,
//! an implementation independent of the broker's.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::V;
use crate::common::{read_packet, Client, WAIT};

/// A raw MQTT connection over TLS. See the module documentation.
pub struct Raw {
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    /// The version of the CONNECT sent: how the broker's packets parse.
    v: V,
}

impl Raw {
    /// Opens TLS, sends `connect` and returns the connection with the broker's first
    /// packet (the CONNACK, or a refusal).
    pub async fn connect(creds: &Client, addr: SocketAddr, connect: &[u8]) -> (Raw, Vec<u8>) {
        let (first, tls) = creds
            .raw_first_packet(addr, connect)
            .await
            .expect("raw connect");
        let v = version_of(connect);
        (Raw { tls, v }, first)
    }

    /// Connects and asserts a successful CONNACK; returns Session Present.
    pub async fn connect_ok(creds: &Client, addr: SocketAddr, connect: &[u8]) -> (Raw, bool) {
        let (raw, ack) = Raw::connect(creds, addr, connect).await;
        assert_eq!(ack[0], 0x20, "CONNACK expected, got {ack:02x?}");
        assert_eq!(ack[3], 0, "CONNACK code, got {ack:02x?}");
        (raw, ack[2] & 1 == 1)
    }

    /// As [`Raw::connect`], with the failure (no TLS, no answer) returned and the first
    /// packet parsed.
    pub async fn try_connect(
        creds: &Client,
        addr: SocketAddr,
        connect: &[u8],
    ) -> Result<(Raw, Pkt), String> {
        let (first, tls) = creds.raw_first_packet(addr, connect).await?;
        let v = version_of(connect);
        Ok((Raw { tls, v }, parse(&first, v)?))
    }

    /// Connects with keep alive 60 s, MQTT 5 when `session_expiry` is given (MQTT 3.1.1
    /// otherwise), and insists on CONNACK success; returns Session Present.
    pub async fn connect_session(
        creds: &Client,
        addr: SocketAddr,
        client_id: &str,
        clean: bool,
        session_expiry: Option<u32>,
    ) -> (Raw, bool) {
        let v = if session_expiry.is_some() {
            V::V5
        } else {
            V::V4
        };
        let connect = RawConnect {
            clean,
            session_expiry,
            ..RawConnect::new(v, client_id)
        };
        match Raw::try_connect(creds, addr, &connect.bytes()).await {
            Ok((raw, Pkt::ConnAck { present, code: 0 })) => (raw, present),
            Ok((_, other)) => panic!("{client_id}: expected CONNACK success, got {other:?}"),
            Err(e) => panic!("{client_id}: connect: {e}"),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.tls.write_all(bytes).await.expect("raw write");
        self.tls.flush().await.expect("raw flush");
    }

    /// [`Raw::send`], with a write error returned.
    pub async fn try_send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.tls.write_all(bytes).await.map_err(|e| e.to_string())?;
        self.tls.flush().await.map_err(|e| e.to_string())
    }

    /// The next packet from the broker.
    pub async fn recv(&mut self) -> Vec<u8> {
        tokio::time::timeout(WAIT, read_packet(&mut self.tls))
            .await
            .expect("a packet in time")
            .expect("a packet")
    }

    /// The next packet, parsed; an error when the connection closes or nothing comes
    /// within `WAIT`.
    pub async fn try_recv(&mut self) -> Result<Pkt, String> {
        match tokio::time::timeout(WAIT, read_packet(&mut self.tls)).await {
            Ok(bytes) => parse(&bytes?, self.v),
            Err(_) => Err(format!("no packet within {WAIT:?}")),
        }
    }

    /// The next packet, or None once the broker closed the connection; panics if neither
    /// happens within `WAIT`.
    pub async fn recv_or_closed(&mut self) -> Option<Pkt> {
        match tokio::time::timeout(WAIT, read_packet(&mut self.tls)).await {
            Ok(Ok(bytes)) => Some(parse(&bytes, self.v).expect("parse")),
            Ok(Err(_)) => None,
            Err(_) => panic!("neither a packet nor a close within {WAIT:?}"),
        }
    }

    /// Reads until the broker closes the connection; returns the packets it sent first.
    pub async fn until_closed(&mut self) -> Vec<Vec<u8>> {
        let mut packets = Vec::new();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(WAIT, self.tls.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "the broker closes the connection in time");
        let mut rest = buf.as_slice();
        while !rest.is_empty() {
            let p = split_packet(&mut rest);
            packets.push(p);
        }
        packets
    }

    /// Waits up to `limit` for the DISCONNECT the broker sends on this connection.
    pub async fn expect_disconnect(&mut self, limit: Duration) -> RawDisconnect {
        let p = tokio::time::timeout(limit, read_packet(&mut self.tls))
            .await
            .unwrap_or_else(|_| panic!("no DISCONNECT within {limit:?}"))
            .expect("a DISCONNECT packet");
        parse_disconnect(&p)
    }

    /// DISCONNECT, then waits (bounded) until the broker has closed the connection, so
    /// that the broker has processed everything sent before.
    pub async fn disconnect(mut self) {
        self.send(&DISCONNECT).await;
        if let Some(p) = self.recv_or_closed().await {
            panic!("expected the connection to close after DISCONNECT, got {p:?}");
        }
    }

    /// PINGREQ, and asserts the next packet is PINGRESP: the connection is alive and served.
    pub async fn ping(&mut self) {
        self.send(&PINGREQ).await;
        assert_eq!(self.recv().await, [0xD0, 0], "PINGRESP expected");
    }

    /// SUBSCRIBE to these filters at these QoS; returns the SUBACK's codes. PUBLISHes that
    /// arrive first are skipped.
    pub async fn subscribe_many(&mut self, pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
        self.send(&raw_subscribe_many(self.v, pkid, filters)).await;
        loop {
            match self.try_recv().await.expect("SUBACK") {
                Pkt::SubAck { pkid: p, codes } if p == pkid => return codes,
                Pkt::Publish { .. } => continue,
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }
    }

    /// SUBSCRIBE (packet id 1) to one filter; returns the granted code.
    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> u8 {
        self.subscribe_many(1, &[(filter, qos)]).await[0]
    }

    /// The next packet, which must be a PUBLISH.
    pub async fn next_publish(&mut self) -> RawPublish {
        let p = self.recv().await;
        parse_publish(self.v, &p)
    }

    /// The TLS session (e.g. for the certificate the broker presented).
    pub fn tls(&self) -> &tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        &self.tls
    }

    /// The TLS session for reading directly (e.g. with a deadline, without the panics of
    /// [`Raw::recv`]).
    pub fn tls_mut(&mut self) -> &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        &mut self.tls
    }

    /// Publishes and waits for the PUBACK (QoS 1) or runs PUBREC/PUBREL/PUBCOMP (QoS 2);
    /// returns the PUBACK/PUBREC reason code. Deliveries to this connection in between
    /// are not expected.
    pub async fn publish_acked(
        &mut self,
        qos: u8,
        retain: bool,
        pkid: u16,
        topic: &str,
        payload: &[u8],
    ) -> u8 {
        let packet = raw_publish_flags(self.v, topic, payload, qos, pkid, false, retain);
        self.send(&packet).await;
        let reason = match self.try_recv().await.expect("PUBACK/PUBREC") {
            Pkt::Ack {
                kind,
                pkid: p,
                reason,
            } if p == pkid && (kind == PUBACK || kind == PUBREC) => reason,
            other => panic!("expected the acknowledgement of {pkid}, got {other:?}"),
        };
        if qos == 2 && reason < 0x80 {
            self.send(&raw_ack(PUBREL, pkid)).await;
            match self.try_recv().await.expect("PUBCOMP") {
                Pkt::Ack {
                    kind: PUBCOMP,
                    pkid: p,
                    ..
                } if p == pkid => {}
                other => panic!("expected PUBCOMP {pkid}, got {other:?}"),
            }
        }
        reason
    }
}

/// The version a CONNECT asks for: its protocol level (after the fixed header, the
/// remaining length and the six bytes of the protocol name) is 5 for MQTT 5. Anything
/// else, a malformed CONNECT included, reads as 3.1.1.
fn version_of(connect: &[u8]) -> V {
    let length_bytes = connect
        .iter()
        .skip(1)
        .take_while(|b| *b & 0x80 != 0)
        .count()
        + 1;
    match connect.get(1 + length_bytes + 6) {
        Some(5) => V::V5,
        _ => V::V4,
    }
}

/// Splits one packet off the front of a buffer of whole packets.
fn split_packet(rest: &mut &[u8]) -> Vec<u8> {
    let mut len = 0usize;
    let mut i = 1;
    loop {
        let b = rest[i];
        len |= usize::from(b & 0x7f) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    let (p, tail) = rest.split_at(i + len);
    *rest = tail;
    p.to_vec()
}

// ---------------------------------------------------------------- out

/// Appends an MQTT variable byte integer.
fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    varint(body.len(), &mut p);
    p.extend_from_slice(body);
    p
}

/// A CONNECT built byte by byte.
#[derive(Debug, Clone)]
pub struct RawConnect<'a> {
    pub v: V,
    pub client_id: &'a str,
    pub clean: bool,
    pub keep_alive: u16,
    /// Topic, payload, QoS, retain.
    pub will: Option<(&'a str, &'a [u8], u8, bool)>,
    /// MQTT 5 Session Expiry Interval.
    pub session_expiry: Option<u32>,
}

impl<'a> RawConnect<'a> {
    /// Clean session, keep alive 60 s, no will, no session expiry: adjust the fields.
    pub fn new(v: V, client_id: &'a str) -> RawConnect<'a> {
        RawConnect {
            v,
            client_id,
            clean: true,
            keep_alive: 60,
            will: None,
            session_expiry: None,
        }
    }

    /// [`RawConnect::new`] with a QoS 0 will on `will_topic` (payload "x"): with a topic
    /// the device may not publish to, a CONNECT refused after the admission (3.1.1 code 5,
    /// MQTT 5 0x87).
    pub fn with_will(v: V, client_id: &'a str, will_topic: &'a str) -> RawConnect<'a> {
        RawConnect {
            will: Some((will_topic, b"x", 0, false)),
            ..RawConnect::new(v, client_id)
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.bytes_with_properties(&[])
    }

    /// The CONNECT with more MQTT 5 CONNECT properties (already encoded) after the
    /// Session Expiry Interval. Ignored for 3.1.1.
    pub fn bytes_with_properties(&self, more: &[u8]) -> Vec<u8> {
        let mut flags = if self.clean { 0x02 } else { 0 };
        if let Some((_, _, qos, retain)) = self.will {
            flags |= 0x04 | (qos << 3) | if retain { 0x20 } else { 0 };
        }
        let mut b = Vec::new();
        string(b"MQTT", &mut b);
        b.push(if self.v == V::V4 { 4 } else { 5 });
        b.push(flags);
        b.extend_from_slice(&self.keep_alive.to_be_bytes());
        if self.v == V::V5 {
            let mut props = Vec::new();
            if let Some(s) = self.session_expiry {
                props.push(0x11);
                props.extend_from_slice(&s.to_be_bytes());
            }
            props.extend_from_slice(more);
            varint(props.len(), &mut b);
            b.extend_from_slice(&props);
        }
        string(self.client_id.as_bytes(), &mut b);
        if let Some((topic, payload, _, _)) = self.will {
            if self.v == V::V5 {
                b.push(0); // no will properties
            }
            string(topic.as_bytes(), &mut b);
            string(payload, &mut b);
        }
        packet(0x10, &b)
    }
}

/// A PUBLISH (pkid ignored for QoS 0).
pub fn raw_publish(v: V, topic: &str, payload: &[u8], qos: u8, pkid: u16, dup: bool) -> Vec<u8> {
    raw_publish_flags(v, topic, payload, qos, pkid, dup, false)
}

/// A PUBLISH with every fixed-header flag chosen (pkid ignored for QoS 0; MQTT 5: no
/// properties).
pub fn raw_publish_flags(
    v: V,
    topic: &str,
    payload: &[u8],
    qos: u8,
    pkid: u16,
    dup: bool,
    retain: bool,
) -> Vec<u8> {
    let mut b = Vec::new();
    string(topic.as_bytes(), &mut b);
    if qos > 0 {
        b.extend_from_slice(&pkid.to_be_bytes());
    }
    if v == V::V5 {
        b.push(0);
    }
    b.extend_from_slice(payload);
    let flags = (qos << 1) | if dup { 0x08 } else { 0 } | u8::from(retain);
    packet(0x30 | flags, &b)
}

/// A SUBSCRIBE to one filter.
pub fn raw_subscribe(v: V, pkid: u16, filter: &str, qos: u8) -> Vec<u8> {
    raw_subscribe_many(v, pkid, &[(filter, qos)])
}

/// A SUBSCRIBE to several filters, each with its QoS (MQTT 5: its options byte).
pub fn raw_subscribe_many(v: V, pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut b = pkid.to_be_bytes().to_vec();
    if v == V::V5 {
        b.push(0);
    }
    for (filter, qos) in filters {
        string(filter.as_bytes(), &mut b);
        b.push(*qos);
    }
    packet(0x82, &b)
}

/// PUBACK (0x40), PUBREC (0x50), PUBREL (0x62) or PUBCOMP (0x70) with reason Success:
/// the two-byte form is the same in 3.1.1 and 5.
pub fn raw_ack(first: u8, pkid: u16) -> Vec<u8> {
    packet(first, &pkid.to_be_bytes())
}

pub const PUBACK: u8 = 0x40;
pub const PUBREC: u8 = 0x50;
pub const PUBREL: u8 = 0x62;
pub const PUBCOMP: u8 = 0x70;
pub const PINGREQ: [u8; 2] = [0xC0, 0];
pub const DISCONNECT: [u8; 2] = [0xE0, 0];

// ---------------------------------------------------------------- in

/// A PUBLISH from the broker, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawPublish {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub dup: bool,
    pub retain: bool,
    pub pkid: u16,
}

/// Parses a PUBLISH packet as the broker sent it (panics on anything else).
pub fn parse_publish(v: V, p: &[u8]) -> RawPublish {
    match parse(p, v) {
        Ok(Pkt::Publish {
            dup,
            qos,
            retain,
            pkid,
            topic,
            payload,
        }) => RawPublish {
            topic,
            payload,
            qos,
            dup,
            retain,
            pkid,
        },
        other => panic!("PUBLISH expected, got {other:?} from {p:02x?}"),
    }
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

    /// An MQTT 5 property block, as it stands.
    fn properties(&mut self) -> Result<&'a [u8], String> {
        let n = self.varint()?;
        self.take(n)
    }
}

/// Parses one whole packet as `common::read_packet` returns it, as version `v` lays it out.
pub fn parse(bytes: &[u8], v: V) -> Result<Pkt, String> {
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
            if v == V::V5 {
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
            if v == V::V5 {
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

/// An MQTT 5 DISCONNECT from the broker: reason code and reason string (empty when absent).
#[derive(Debug)]
pub struct RawDisconnect {
    pub code: u8,
    pub reason: String,
}

/// Parses an MQTT 5 DISCONNECT (panics on anything else, or on a property other than the
/// reason string).
pub fn parse_disconnect(p: &[u8]) -> RawDisconnect {
    assert_eq!(p[0], 0xE0, "DISCONNECT expected: {p:02x?}");
    let mut b = Body(&p[1..]);
    b.varint().expect("remaining length");
    let code = b.take(1).map(|c| c[0]).unwrap_or(0);
    let mut reason = String::new();
    if !b.0.is_empty() {
        let mut props = Body(b.properties().expect("DISCONNECT properties"));
        while !props.0.is_empty() {
            match props.take(1).expect("property id")[0] {
                0x1F => {
                    let n = usize::from(props.u16().expect("length"));
                    let text = props.take(n).expect("reason string");
                    reason = String::from_utf8_lossy(text).into_owned();
                }
                other => panic!("unexpected DISCONNECT property {other:#x}: {p:02x?}"),
            }
        }
    }
    RawDisconnect { code, reason }
}
