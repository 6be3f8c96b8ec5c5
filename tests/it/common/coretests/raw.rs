//! Raw MQTT over TLS for the core tests: packets built and parsed byte by byte, for what
//! no client library does on demand (stop in the middle of a QoS 2 exchange, re-send a
//! PUBLISH with DUP, go silent past the keep alive, send a will the ACL forbids).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::V;
use crate::common::{read_packet, Client, WAIT};

/// A raw MQTT connection over TLS. See the module documentation.
pub struct Raw {
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
}

impl Raw {
    /// Opens TLS, sends `connect` and returns the connection with the broker's first
    /// packet (the CONNACK, or a refusal).
    pub async fn connect(creds: &Client, addr: SocketAddr, connect: &[u8]) -> (Raw, Vec<u8>) {
        let (first, tls) = creds
            .raw_first_packet(addr, connect)
            .await
            .expect("raw connect");
        (Raw { tls }, first)
    }

    /// Connects and asserts a successful CONNACK; returns Session Present.
    pub async fn connect_ok(creds: &Client, addr: SocketAddr, connect: &[u8]) -> (Raw, bool) {
        let (raw, ack) = Raw::connect(creds, addr, connect).await;
        assert_eq!(ack[0], 0x20, "CONNACK expected, got {ack:02x?}");
        assert_eq!(ack[3], 0, "CONNACK code, got {ack:02x?}");
        (raw, ack[2] & 1 == 1)
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.tls.write_all(bytes).await.expect("raw write");
        self.tls.flush().await.expect("raw flush");
    }

    /// The next packet from the broker.
    pub async fn recv(&mut self) -> Vec<u8> {
        tokio::time::timeout(WAIT, read_packet(&mut self.tls))
            .await
            .expect("a packet in time")
            .expect("a packet")
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

impl RawConnect<'_> {
    pub fn bytes(&self) -> Vec<u8> {
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
            match self.session_expiry {
                Some(s) => {
                    b.push(5);
                    b.push(0x11);
                    b.extend_from_slice(&s.to_be_bytes());
                }
                None => b.push(0),
            }
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
    let mut b = Vec::new();
    string(topic.as_bytes(), &mut b);
    if qos > 0 {
        b.extend_from_slice(&pkid.to_be_bytes());
    }
    if v == V::V5 {
        b.push(0);
    }
    b.extend_from_slice(payload);
    packet(0x30 | (qos << 1) | if dup { 0x08 } else { 0 }, &b)
}

/// A SUBSCRIBE to one filter.
pub fn raw_subscribe(v: V, pkid: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut b = pkid.to_be_bytes().to_vec();
    if v == V::V5 {
        b.push(0);
    }
    string(filter.as_bytes(), &mut b);
    b.push(qos);
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
    assert_eq!(p[0] & 0xF0, 0x30, "PUBLISH expected, got {p:02x?}");
    let mut i = 1;
    while p[i] & 0x80 != 0 {
        i += 1;
    }
    i += 1;
    let tlen = usize::from(u16::from_be_bytes([p[i], p[i + 1]]));
    let topic = String::from_utf8(p[i + 2..i + 2 + tlen].to_vec()).expect("utf-8 topic");
    i += 2 + tlen;
    let qos = (p[0] >> 1) & 3;
    let mut pkid = 0;
    if qos > 0 {
        pkid = u16::from_be_bytes([p[i], p[i + 1]]);
        i += 2;
    }
    if v == V::V5 {
        let mut plen = 0usize;
        let mut shift = 0;
        loop {
            let b = p[i];
            i += 1;
            plen |= usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        i += plen;
    }
    RawPublish {
        topic,
        payload: p[i..].to_vec(),
        qos,
        dup: p[0] & 0x08 != 0,
        retain: p[0] & 0x01 != 0,
        pkid,
    }
}
