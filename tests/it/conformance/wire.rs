//! Packets built byte by byte for the conformance tests: the MQTT 3.1.1 and 5.0 encodings
//! (section 1.5 data types, section 2 fixed header and properties), with nothing checked,
//! so a test can build exactly the packet no client library would send.

use crate::common::coretests::V;

/// Property identifiers (MQTT 5 §2.2.2.2) the tests use.
pub(super) mod prop {
    pub const MESSAGE_EXPIRY: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const SUBSCRIPTION_ID: u8 = 0x0B;
    pub const SESSION_EXPIRY: u8 = 0x11;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const WILL_DELAY: u8 = 0x18;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
}

fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A UTF-8 Encoded String or Binary Data: two-byte length, then the bytes.
fn string(s: &[u8]) -> Vec<u8> {
    let mut out = u16::try_from(s.len())
        .expect("short")
        .to_be_bytes()
        .to_vec();
    out.extend_from_slice(s);
    out
}

/// A whole packet: first byte, remaining length, body.
pub(super) fn packet(first: u8, parts: &[&[u8]]) -> Vec<u8> {
    let body = parts.concat();
    let mut out = vec![first];
    varint(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

/// One MQTT 5 property: identifier, then its value as given.
pub(super) fn p(id: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![id];
    out.extend_from_slice(value);
    out
}

/// A string property (or the key of a user property: pass `key` and `value`).
pub(super) fn ps(id: u8, text: &[u8]) -> Vec<u8> {
    p(id, &string(text))
}

pub(super) fn user_property(key: &[u8], value: &[u8]) -> Vec<u8> {
    p(prop::USER_PROPERTY, &[string(key), string(value)].concat())
}

/// A Four Byte Integer property value.
pub(super) fn four(n: u32) -> [u8; 4] {
    n.to_be_bytes()
}

/// A property block: Variable Byte Integer length, then the properties.
pub(super) fn props(list: &[Vec<u8>]) -> Vec<u8> {
    let body = list.concat();
    let mut out = Vec::new();
    varint(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

/// A CONNECT built field by field; MQTT 5 fields are left out for 3.1.1.
#[derive(Clone)]
pub(super) struct Connect {
    v: V,
    /// The protocol level byte (4 or 5, or anything else for item 6).
    level: u8,
    client_id: Vec<u8>,
    props: Vec<Vec<u8>>,
    /// Will topic and will properties (QoS 0, payload "w").
    will: Option<(Vec<u8>, Vec<Vec<u8>>)>,
    user_name: Option<Vec<u8>>,
    /// Clean session (3.1.1) / clean start (5).
    clean: bool,
}

impl Connect {
    pub(super) fn new(v: V, client_id: &[u8]) -> Connect {
        Connect {
            v,
            level: if v == V::V4 { 4 } else { 5 },
            client_id: client_id.to_vec(),
            props: Vec::new(),
            will: None,
            user_name: None,
            clean: true,
        }
    }

    /// Clean start 0: resume the session the client id names.
    pub(super) fn resume(mut self) -> Connect {
        self.clean = false;
        self
    }

    pub(super) fn props(mut self, props: Vec<Vec<u8>>) -> Connect {
        self.props = props;
        self
    }

    pub(super) fn will(mut self, topic: &[u8], props: Vec<Vec<u8>>) -> Connect {
        self.will = Some((topic.to_vec(), props));
        self
    }

    pub(super) fn user_name(mut self, name: &[u8]) -> Connect {
        self.user_name = Some(name.to_vec());
        self
    }

    pub(super) fn level(mut self, level: u8) -> Connect {
        self.level = level;
        self
    }

    pub(super) fn bytes(&self) -> Vec<u8> {
        let mut flags = if self.clean { 0x02 } else { 0 };
        if self.will.is_some() {
            flags |= 0x04;
        }
        if self.user_name.is_some() {
            flags |= 0x80;
        }
        let mut body = string(b"MQTT");
        body.extend_from_slice(&[self.level, flags, 0, 60]);
        if self.v == V::V5 {
            body.extend(props(&self.props));
        }
        body.extend(string(&self.client_id));
        if let Some((topic, will_props)) = &self.will {
            if self.v == V::V5 {
                body.extend(props(will_props));
            }
            body.extend(string(topic));
            body.extend(string(b"w"));
        }
        if let Some(name) = &self.user_name {
            body.extend(string(name));
        }
        packet(0x10, &[&body])
    }
}

/// A PUBLISH: `flags` is the low nibble (DUP, QoS, RETAIN); the packet id is written for
/// QoS 1 and 2; `props` only in MQTT 5.
pub(super) fn publish(
    v: V,
    flags: u8,
    topic: &[u8],
    pkid: u16,
    props_: &[Vec<u8>],
    payload: &[u8],
) -> Vec<u8> {
    let mut body = string(topic);
    if flags & 0x06 != 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    if v == V::V5 {
        body.extend(props(props_));
    }
    body.extend_from_slice(payload);
    packet(0x30 | flags, &[&body])
}

/// A SUBSCRIBE with one filter and its options byte.
pub(super) fn subscribe(
    v: V,
    pkid: u16,
    props_: &[Vec<u8>],
    filter: &[u8],
    options: u8,
) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if v == V::V5 {
        body.extend(props(props_));
    }
    body.extend(string(filter));
    body.push(options);
    packet(0x82, &[&body])
}

/// An UNSUBSCRIBE with one filter.
pub(super) fn unsubscribe(v: V, pkid: u16, filter: &[u8]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if v == V::V5 {
        body.push(0);
    }
    body.extend(string(filter));
    packet(0xA2, &[&body])
}

/// What the broker sends when it refuses a CONNECT in MQTT 5: a CONNACK with only a
/// reason code, no properties (the client's limits are unknown when its CONNECT is bad).
pub(super) fn connack_v5(code: u8) -> Vec<u8> {
    vec![0x20, 0x03, 0x00, code, 0x00]
}

/// An MQTT 5 DISCONNECT with a reason string.
pub(super) fn disconnect(code: u8, reason: &str) -> Vec<u8> {
    packet(
        0xE0,
        &[
            &[code],
            &props(&[ps(prop::REASON_STRING, reason.as_bytes())]),
        ],
    )
}
