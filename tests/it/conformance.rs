//! Protocol conformance, clause by clause (issue 15): what the MQTT 3.1.1 and 5.0
//! specifications say MUST happen, checked byte for byte. Each test sends exact bytes over
//! mutual TLS to a real broker and expects exact bytes back, or the connection closed
//! with nothing more. A test is named after the clause it checks (`mqtt_1_5_4_2_...` is
//! [MQTT-1.5.4-2]); a clause that exists in both versions is one check run twice through
//! [`both!`], `_v311` and `_v5`, since the 3.1.1 number of a clause may differ from its
//! 5.0 number.
//!
//! The bytes are built here by hand rather than with a client library: these are packets
//! no library will send (a NUL in a string, a property twice, DUP on QoS 0).

use std::net::SocketAddr;

use crate::common::coretests::raw::Raw;
use crate::common::coretests::V;
use crate::common::interop::{
    mosquitto, mosquitto_available, paho_available, run, Creds, Spawned, Version,
};
use crate::common::v5tests::{config_with_limits, device_client, BACKEND_FLEET};
use crate::common::{Broker, Client, Fixture, WAIT};

// ---------------------------------------------------------------- bytes

/// Property identifiers (MQTT 5 §2.2.2.2) the tests use.
mod prop {
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
fn packet(first: u8, parts: &[&[u8]]) -> Vec<u8> {
    let body = parts.concat();
    let mut out = vec![first];
    varint(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

/// One MQTT 5 property: identifier, then its value as given.
fn p(id: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![id];
    out.extend_from_slice(value);
    out
}

/// A string property (or the key of a user property: pass `key` and `value`).
fn ps(id: u8, text: &[u8]) -> Vec<u8> {
    p(id, &string(text))
}

fn user_property(key: &[u8], value: &[u8]) -> Vec<u8> {
    p(prop::USER_PROPERTY, &[string(key), string(value)].concat())
}

/// A property block: Variable Byte Integer length, then the properties.
fn props(list: &[Vec<u8>]) -> Vec<u8> {
    let body = list.concat();
    let mut out = Vec::new();
    varint(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

/// A CONNECT built field by field; MQTT 5 fields are left out for 3.1.1.
#[derive(Clone)]
struct Connect {
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
    fn new(v: V, client_id: &[u8]) -> Connect {
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
    fn resume(mut self) -> Connect {
        self.clean = false;
        self
    }

    fn props(mut self, props: Vec<Vec<u8>>) -> Connect {
        self.props = props;
        self
    }

    fn will(mut self, topic: &[u8], props: Vec<Vec<u8>>) -> Connect {
        self.will = Some((topic.to_vec(), props));
        self
    }

    fn user_name(mut self, name: &[u8]) -> Connect {
        self.user_name = Some(name.to_vec());
        self
    }

    fn level(mut self, level: u8) -> Connect {
        self.level = level;
        self
    }

    fn bytes(&self) -> Vec<u8> {
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
fn publish(
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
fn subscribe(v: V, pkid: u16, props_: &[Vec<u8>], filter: &[u8], options: u8) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if v == V::V5 {
        body.extend(props(props_));
    }
    body.extend(string(filter));
    body.push(options);
    packet(0x82, &[&body])
}

/// An UNSUBSCRIBE with one filter.
fn unsubscribe(v: V, pkid: u16, filter: &[u8]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if v == V::V5 {
        body.push(0);
    }
    body.extend(string(filter));
    packet(0xA2, &[&body])
}

/// What the broker sends when it refuses a CONNECT in MQTT 5: a CONNACK with only a
/// reason code, no properties (the client's limits are unknown when its CONNECT is bad).
fn connack_v5(code: u8) -> Vec<u8> {
    vec![0x20, 0x03, 0x00, code, 0x00]
}

/// An MQTT 5 DISCONNECT with a reason string.
fn disconnect(code: u8, reason: &str) -> Vec<u8> {
    packet(
        0xE0,
        &[
            &[code],
            &props(&[ps(prop::REASON_STRING, reason.as_bytes())]),
        ],
    )
}

// ---------------------------------------------------------------- harness

/// A broker whose fleet devices may publish and subscribe everywhere.
async fn open_broker(fx: &Fixture) -> Broker {
    Broker::start(&fx.config(BACKEND_FLEET)).await
}

/// A broker with the built-in `device` profile: a device may use only its own topics.
async fn device_broker(fx: &Fixture) -> Broker {
    Broker::start(&fx.config(&Fixture::fleet_anchor(true))).await
}

/// Sends `bytes` as the first thing on a new connection; returns everything the broker
/// sent until it closed the connection. A close without TLS close_notify counts as a close:
/// the broker drops a connection it refuses before CONNACK.
async fn answer_to_connect(client: &Client, addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut tls = client.send_raw(addr, bytes).await.expect("TLS and write");
    let mut out = Vec::new();
    let read = tokio::time::timeout(WAIT, tls.read_to_end(&mut out))
        .await
        .unwrap_or_else(|_| panic!("no close within {WAIT:?}; got {out:02x?}"));
    if let Err(e) = read {
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e:?}");
    }
    out
}

/// Connects (CONNACK 0x00), sends `bytes`, returns the packets the broker sent before
/// closing the connection.
async fn answer_after_connack(
    client: &Client,
    addr: SocketAddr,
    connect: &Connect,
    bytes: &[u8],
) -> Vec<Vec<u8>> {
    let (mut raw, _) = Raw::connect_ok(client, addr, &connect.bytes()).await;
    raw.send(bytes).await;
    raw.until_closed().await
}

/// What a protocol violation after CONNACK gets: a close (3.1.1), or a DISCONNECT with
/// this code and reason string, then a close (5).
fn closed_with(v: V, code: u8, reason: &str) -> Vec<Vec<u8>> {
    match v {
        V::V4 => Vec::new(),
        V::V5 => vec![disconnect(code, reason)],
    }
}

/// What a bad CONNECT gets: a close (3.1.1), or a CONNACK with this code then a close (5).
fn refused_with(v: V, code: u8) -> Vec<u8> {
    match v {
        V::V4 => Vec::new(),
        V::V5 => connack_v5(code),
    }
}

/// One check, run for MQTT 3.1.1 and for MQTT 5 under the names of each version's clause.
macro_rules! both {
    ($v311:ident, $v5:ident, $check:ident) => {
        #[tokio::test]
        async fn $v311() {
            $check(V::V4).await
        }

        #[tokio::test]
        async fn $v5() {
            $check(V::V5).await
        }
    };
}

// ---------------------------------------------------------------- 1. U+0000 in a string

/// A CONNECT whose client id, will topic or user name holds a NUL is refused: 3.1.1
/// closes, 5 answers CONNACK 0x81 (Malformed Packet) first.
async fn nul_in_connect(v: V, connect: Connect) {
    let fx = Fixture::new();
    let broker = open_broker(&fx).await;
    let got = answer_to_connect(&device_client(&fx, "dev-1"), broker.addr, &connect.bytes()).await;
    assert_eq!(got, refused_with(v, 0x81), "{v:?}");
}

async fn nul_in_client_id(v: V) {
    nul_in_connect(v, Connect::new(v, b"dev\0one")).await;
}

async fn nul_in_will_topic(v: V) {
    nul_in_connect(v, Connect::new(v, b"c").will(b"will/\0", Vec::new())).await;
}

async fn nul_in_user_name(v: V) {
    nul_in_connect(v, Connect::new(v, b"c").user_name(b"u\0")).await;
}

both!(
    mqtt_1_5_3_2_nul_in_client_id_closes_v311,
    mqtt_1_5_4_2_nul_in_client_id_closes_v5,
    nul_in_client_id
);
both!(
    mqtt_1_5_3_2_nul_in_will_topic_closes_v311,
    mqtt_1_5_4_2_nul_in_will_topic_closes_v5,
    nul_in_will_topic
);
both!(
    mqtt_1_5_3_2_nul_in_user_name_closes_v311,
    mqtt_1_5_4_2_nul_in_user_name_closes_v5,
    nul_in_user_name
);

#[tokio::test]
async fn mqtt_1_5_4_2_nul_in_a_connect_user_property_closes_v5() {
    let connect = Connect::new(V::V5, b"c").props(vec![user_property(b"k", b"v\0")]);
    nul_in_connect(V::V5, connect).await;
}

#[tokio::test]
async fn mqtt_1_5_4_2_nul_in_a_will_content_type_closes_v5() {
    let connect = Connect::new(V::V5, b"c").will(b"w", vec![ps(prop::CONTENT_TYPE, b"\0")]);
    nul_in_connect(V::V5, connect).await;
}

/// A packet after CONNACK with a NUL in one of its strings closes the connection (MQTT 5:
/// DISCONNECT 0x81 naming the string first).
async fn nul_after_connack(v: V, bytes: Vec<u8>, what: &str) {
    let fx = Fixture::new();
    let broker = open_broker(&fx).await;
    let got = answer_after_connack(
        &device_client(&fx, "dev-1"),
        broker.addr,
        &Connect::new(v, b"c"),
        &bytes,
    )
    .await;
    let reason = format!("malformed packet: {what} contains U+0000");
    assert_eq!(got, closed_with(v, 0x81, &reason), "{v:?}");
}

async fn nul_in_topic_name(v: V) {
    nul_after_connack(v, publish(v, 0, b"a/\0", 0, &[], b"x"), "topic name").await;
}

async fn nul_in_topic_filter(v: V) {
    nul_after_connack(v, subscribe(v, 1, &[], b"a/\0", 0), "topic filter").await;
}

async fn nul_in_unsubscribe_filter(v: V) {
    nul_after_connack(v, unsubscribe(v, 1, b"\0"), "topic filter").await;
}

both!(
    mqtt_1_5_3_2_nul_in_topic_name_closes_v311,
    mqtt_1_5_4_2_nul_in_topic_name_closes_v5,
    nul_in_topic_name
);
both!(
    mqtt_1_5_3_2_nul_in_topic_filter_closes_v311,
    mqtt_1_5_4_2_nul_in_topic_filter_closes_v5,
    nul_in_topic_filter
);
both!(
    mqtt_1_5_3_2_nul_in_unsubscribe_filter_closes_v311,
    mqtt_1_5_4_2_nul_in_unsubscribe_filter_closes_v5,
    nul_in_unsubscribe_filter
);

#[tokio::test]
async fn mqtt_1_5_4_2_nul_in_a_user_property_closes_v5() {
    let bytes = publish(V::V5, 0, b"a", 0, &[user_property(b"\0", b"v")], b"x");
    nul_after_connack(V::V5, bytes, "user property").await;
}

#[tokio::test]
async fn mqtt_1_5_4_2_nul_in_a_response_topic_closes_v5() {
    let bytes = publish(
        V::V5,
        0,
        b"a",
        0,
        &[ps(prop::RESPONSE_TOPIC, b"r/\0")],
        b"x",
    );
    nul_after_connack(V::V5, bytes, "response topic").await;
}

#[tokio::test]
async fn mqtt_1_5_4_2_nul_in_a_client_reason_string_closes_v5() {
    // DISCONNECT 0x00 with a reason string holding a NUL.
    let bytes = packet(
        0xE0,
        &[&[0x00], &props(&[ps(prop::REASON_STRING, b"bye\0")])],
    );
    nul_after_connack(V::V5, bytes, "reason string").await;
}

// ---------------------------------------------------------------- 2. empty topic filters

/// An empty topic filter is a protocol error for the whole packet ([MQTT-4.7.3-1]), not a
/// refused filter in SUBACK: 3.1.1 closes, 5 sends DISCONNECT 0x82 first.
async fn empty_filter(v: V, bytes: Vec<u8>) {
    let fx = Fixture::new();
    let broker = open_broker(&fx).await;
    let got = answer_after_connack(
        &device_client(&fx, "dev-1"),
        broker.addr,
        &Connect::new(v, b"c"),
        &bytes,
    )
    .await;
    let reason = "protocol error: empty topic filter";
    assert_eq!(got, closed_with(v, 0x82, reason), "{v:?}");
}

async fn empty_subscribe_filter(v: V) {
    empty_filter(v, subscribe(v, 1, &[], b"", 0)).await;
}

async fn empty_unsubscribe_filter(v: V) {
    empty_filter(v, unsubscribe(v, 1, b"")).await;
}

both!(
    mqtt_4_7_3_1_empty_topic_filter_closes_v311,
    mqtt_4_7_3_1_empty_topic_filter_closes_v5,
    empty_subscribe_filter
);
both!(
    mqtt_4_7_3_1_empty_unsubscribe_filter_closes_v311,
    mqtt_4_7_3_1_empty_unsubscribe_filter_closes_v5,
    empty_unsubscribe_filter
);

// ---------------------------------------------------------------- 3. duplicate properties

/// A CONNECT the broker refuses with an MQTT 5 CONNACK carrying only `code`.
async fn connect_refused_v5(connect: Connect, code: u8) {
    let fx = Fixture::new();
    let broker = open_broker(&fx).await;
    let got = answer_to_connect(&device_client(&fx, "dev-1"), broker.addr, &connect.bytes()).await;
    assert_eq!(got, connack_v5(code));
}

/// A packet after CONNACK that ends the connection with this DISCONNECT (MQTT 5) or a
/// bare close (3.1.1).
async fn ends_with(v: V, bytes: Vec<u8>, code: u8, reason: &str) {
    let fx = Fixture::new();
    let broker = open_broker(&fx).await;
    let client = device_client(&fx, "dev-1");
    let got = answer_after_connack(&client, broker.addr, &Connect::new(v, b"c"), &bytes).await;
    assert_eq!(got, closed_with(v, code, reason), "{v:?}");
}

fn twice(name: &str) -> String {
    format!("protocol error: {name} appears more than once")
}

fn four(n: u32) -> [u8; 4] {
    n.to_be_bytes()
}

#[tokio::test]
async fn mqtt_3_1_2_11_duplicate_connect_property_is_a_protocol_error_v5() {
    let expiry = p(prop::SESSION_EXPIRY, &four(10));
    let connect = Connect::new(V::V5, b"c").props(vec![expiry.clone(), expiry]);
    connect_refused_v5(connect, 0x82).await;
}

#[tokio::test]
async fn mqtt_3_1_3_2_duplicate_will_property_is_a_protocol_error_v5() {
    let delay = p(prop::WILL_DELAY, &four(1));
    let connect = Connect::new(V::V5, b"c").will(b"w", vec![delay.clone(), delay]);
    connect_refused_v5(connect, 0x82).await;
}

#[tokio::test]
async fn mqtt_3_3_2_3_duplicate_publish_property_is_a_protocol_error_v5() {
    let expiry = p(prop::MESSAGE_EXPIRY, &four(10));
    let bytes = publish(V::V5, 0, b"a", 0, &[expiry.clone(), expiry], b"x");
    ends_with(V::V5, bytes, 0x82, &twice("Message Expiry Interval")).await;
}

#[tokio::test]
async fn mqtt_3_8_2_1_2_duplicate_subscription_identifier_is_a_protocol_error_v5() {
    let id = p(prop::SUBSCRIPTION_ID, &[7]);
    let bytes = subscribe(V::V5, 1, &[id.clone(), id], b"a", 0);
    ends_with(V::V5, bytes, 0x82, &twice("Subscription Identifier")).await;
}

#[tokio::test]
async fn mqtt_3_4_2_2_duplicate_puback_reason_string_is_a_protocol_error_v5() {
    let text = ps(prop::REASON_STRING, b"r");
    let bytes = packet(0x40, &[&[0, 1, 0x00], &props(&[text.clone(), text])]);
    ends_with(V::V5, bytes, 0x82, &twice("Reason String")).await;
}

#[tokio::test]
async fn mqtt_3_14_2_2_duplicate_disconnect_property_is_a_protocol_error_v5() {
    let expiry = p(prop::SESSION_EXPIRY, &four(0));
    let bytes = packet(0xE0, &[&[0x00], &props(&[expiry.clone(), expiry])]);
    ends_with(V::V5, bytes, 0x82, &twice("Session Expiry Interval")).await;
}

/// User Property is the one property a client may repeat (MQTT 5 §3.1.2.11.8,
/// §3.3.2.3.7): a CONNECT with two is accepted, and a PUBLISH with two reaches a
/// subscriber with both, in order (MQTT-3.3.2-18).
#[tokio::test]
async fn mqtt_3_3_2_17_user_property_may_repeat_v5() {
    let fx = Fixture::new();
    let broker = open_broker(&fx).await;
    let pair = [user_property(b"k", b"1"), user_property(b"k", b"2")];
    let connect = Connect::new(V::V5, b"c").props(pair.to_vec());
    let (mut raw, _) =
        Raw::connect_ok(&device_client(&fx, "dev-1"), broker.addr, &connect.bytes()).await;
    raw.send(&subscribe(V::V5, 1, &[], b"up", 0)).await;
    assert_eq!(raw.recv().await, [0x90, 0x04, 0x00, 0x01, 0x00, 0x00]);
    raw.send(&publish(V::V5, 0, b"up", 0, &pair, b"x")).await;
    assert_eq!(raw.recv().await, publish(V::V5, 0, b"up", 0, &pair, b"x"));
}

// ---------------------------------------------------------------- 5. sender-side MUSTs

async fn dup_on_qos_0(v: V) {
    let reason = "malformed packet: QoS 0 PUBLISH with DUP set";
    ends_with(v, publish(v, 0x08, b"a", 0, &[], b"x"), 0x81, reason).await;
}

both!(
    mqtt_3_3_1_2_qos_0_with_dup_closes_v311,
    mqtt_3_3_1_2_qos_0_with_dup_closes_v5,
    dup_on_qos_0
);

#[tokio::test]
async fn mqtt_3_3_2_14_response_topic_with_wildcard_closes_v5() {
    let reason = "malformed packet: response topic contains a wildcard";
    for topic in [&b"r/+"[..], b"r/#"] {
        let bytes = publish(V::V5, 0, b"a", 0, &[ps(prop::RESPONSE_TOPIC, topic)], b"x");
        ends_with(V::V5, bytes, 0x81, reason).await;
    }
}

#[tokio::test]
async fn mqtt_3_1_3_2_will_response_topic_with_wildcard_closes_v5() {
    let will = vec![ps(prop::RESPONSE_TOPIC, b"r/#")];
    connect_refused_v5(Connect::new(V::V5, b"c").will(b"w", will), 0x81).await;
}

async fn subscribe_id_0(v: V) {
    let reason = "protocol error: SUBSCRIBE with packet identifier 0";
    ends_with(v, subscribe(v, 0, &[], b"a", 0), 0x82, reason).await;
}

async fn unsubscribe_id_0(v: V) {
    let reason = "protocol error: UNSUBSCRIBE with packet identifier 0";
    ends_with(v, unsubscribe(v, 0, b"a"), 0x82, reason).await;
}

async fn publish_id_0(v: V) {
    let reason = "protocol error: PUBLISH with packet identifier 0";
    for qos in [0x02, 0x04] {
        ends_with(v, publish(v, qos, b"a", 0, &[], b"x"), 0x82, reason).await;
    }
}

both!(
    mqtt_2_3_1_1_subscribe_with_packet_id_0_closes_v311,
    mqtt_2_2_1_3_subscribe_with_packet_id_0_closes_v5,
    subscribe_id_0
);
both!(
    mqtt_2_3_1_1_unsubscribe_with_packet_id_0_closes_v311,
    mqtt_2_2_1_3_unsubscribe_with_packet_id_0_closes_v5,
    unsubscribe_id_0
);
both!(
    mqtt_2_3_1_1_publish_with_packet_id_0_closes_v311,
    mqtt_2_2_1_3_publish_with_packet_id_0_closes_v5,
    publish_id_0
);

#[tokio::test]
async fn mqtt_3_1_2_11_3_receive_maximum_0_is_a_protocol_error_v5() {
    let props = vec![p(prop::RECEIVE_MAXIMUM, &[0, 0])];
    connect_refused_v5(Connect::new(V::V5, b"c").props(props), 0x82).await;
}

#[tokio::test]
async fn mqtt_3_1_2_11_4_maximum_packet_size_0_is_a_protocol_error_v5() {
    let props = vec![p(prop::MAXIMUM_PACKET_SIZE, &four(0))];
    connect_refused_v5(Connect::new(V::V5, b"c").props(props), 0x82).await;
}

// ---------------------------------------------------------------- 6. protocol level

/// A CONNECT with a protocol level certmq does not speak is answered in the CONNACK form
/// its bytes show the client can parse: the 3.1.1 layout gets return code 0x01
/// ([MQTT-3.1.2-2] of 3.1.1), the MQTT 5 layout (a property block) gets 0x84.
#[tokio::test]
async fn mqtt_3_1_2_2_unknown_level_in_v311_form_gets_return_code_1_v311() {
    let fx = Fixture::new();
    let broker = open_broker(&fx).await;
    let client = device_client(&fx, "dev-1");
    for level in [0, 3, 6, 99, 255] {
        for connect in [
            Connect::new(V::V4, b"c").level(level),
            Connect::new(V::V4, b"c")
                .level(level)
                .will(b"w/t", Vec::new()),
            Connect::new(V::V4, b"").level(level).user_name(b"u"),
        ] {
            let got = answer_to_connect(&client, broker.addr, &connect.bytes()).await;
            assert_eq!(got, [0x20, 0x02, 0x00, 0x01], "level {level}");
        }
    }
}

#[tokio::test]
async fn mqtt_3_1_2_2_unknown_level_in_v5_form_gets_0x84_v5() {
    let fx = Fixture::new();
    let broker = open_broker(&fx).await;
    let client = device_client(&fx, "dev-1");
    for level in [0, 3, 6, 99, 255] {
        for connect in [
            Connect::new(V::V5, b"c").level(level),
            Connect::new(V::V5, b"client")
                .level(level)
                .props(vec![p(prop::SESSION_EXPIRY, &four(60))]),
            Connect::new(V::V5, b"c")
                .level(level)
                .will(b"w/t", Vec::new()),
            Connect::new(V::V5, b"").level(level).user_name(b"u"),
        ] {
            let got = answer_to_connect(&client, broker.addr, &connect.bytes()).await;
            assert_eq!(got, connack_v5(0x84), "level {level}");
        }
    }
}

// ---------------------------------------------------------------- 4. Maximum Packet Size

/// The client's Maximum Packet Size for the item 4 tests: room for the success CONNACK
/// and the bare acknowledgements, none for a reason string.
const SMALL: u32 = 30;

/// CONNECT properties stating a Maximum Packet Size, or none.
fn max_packet(max: Option<u32>) -> Vec<Vec<u8>> {
    max.map(|m| p(prop::MAXIMUM_PACKET_SIZE, &four(m)))
        .into_iter()
        .collect()
}

/// `fields` (reason code and the like) then a property block with this reason string,
/// or an empty block when the client's maximum leaves no room for it.
fn with_reason(fields: &[u8], reason: &str, max: Option<u32>) -> Vec<u8> {
    let list = match max {
        Some(_) => Vec::new(),
        None => vec![ps(prop::REASON_STRING, reason.as_bytes())],
    };
    [fields.to_vec(), props(&list)].concat()
}

/// [MQTT-3.2.2-19]: the reason string of a refusing CONNACK is left out when it would
/// make the CONNACK larger than the client's Maximum Packet Size.
#[tokio::test]
async fn mqtt_3_2_2_19_connack_reason_string_respects_maximum_packet_size_v5() {
    let fx = Fixture::new();
    let broker = device_broker(&fx).await;
    let client = device_client(&fx, "dev-1");
    let reason =
        "authentication method \"x\" is not supported: the client certificate authenticates";
    for max in [None, Some(SMALL)] {
        let mut list = max_packet(max);
        list.push(ps(prop::AUTHENTICATION_METHOD, b"x"));
        let connect = Connect::new(V::V5, b"c").props(list);
        let got = answer_to_connect(&client, broker.addr, &connect.bytes()).await;
        let expected = packet(0x20, &[&with_reason(&[0x00, 0x8C], reason, max)]);
        assert_eq!(got, expected, "Maximum Packet Size {max:?}");
    }
}

/// [MQTT-3.4.2-2], [MQTT-3.5.2-2], [MQTT-3.9.2-1], [MQTT-3.14.2-3]: the same for PUBACK,
/// PUBREC, SUBACK and DISCONNECT. (PUBREL, PUBCOMP and UNSUBACK from certmq never carry a
/// reason string or user properties.)
#[tokio::test]
async fn mqtt_3_4_2_2_acknowledgement_reason_strings_respect_maximum_packet_size_v5() {
    let fx = Fixture::new();
    let broker = device_broker(&fx).await;
    let client = device_client(&fx, "dev-1");
    for max in [None, Some(SMALL)] {
        let connect = Connect::new(V::V5, b"c").props(max_packet(max));
        let (mut raw, _) = Raw::connect_ok(&client, broker.addr, &connect.bytes()).await;
        // A publish the device's ACL denies, at QoS 1 then 2.
        raw.send(&publish(V::V5, 0x02, b"other/x", 1, &[], b"x"))
            .await;
        let reason = "not authorized to publish to other/x";
        let puback = packet(0x40, &[&with_reason(&[0, 1, 0x87], reason, max)]);
        assert_eq!(raw.recv().await, puback, "PUBACK, maximum {max:?}");
        raw.send(&publish(V::V5, 0x04, b"other/x", 2, &[], b"x"))
            .await;
        let pubrec = packet(0x50, &[&with_reason(&[0, 2, 0x87], reason, max)]);
        assert_eq!(raw.recv().await, pubrec, "PUBREC, maximum {max:?}");
        // A subscription it denies.
        raw.send(&subscribe(V::V5, 3, &[], b"other/#", 0)).await;
        let reason = "not authorized to subscribe to other/#";
        let suback = packet(0x90, &[&[0, 3], &with_reason(&[], reason, max), &[0x87]]);
        assert_eq!(raw.recv().await, suback, "SUBACK, maximum {max:?}");
        // A protocol error: topic alias 0.
        let alias_0 = publish(
            V::V5,
            0,
            b"devices/dev-1/t",
            0,
            &[p(prop::TOPIC_ALIAS, &[0, 0])],
            b"x",
        );
        raw.send(&alias_0).await;
        let reason = "topic alias 0 outside 1..=32";
        let bye = packet(0xE0, &[&with_reason(&[0x94], reason, max)]);
        assert_eq!(
            raw.until_closed().await,
            [bye],
            "DISCONNECT, maximum {max:?}"
        );
    }
}

/// [MQTT-3.1.2-24]: nothing larger than the client's Maximum Packet Size is sent, the
/// CONNACK included. A success CONNACK that cannot fit (here: 10 bytes, and an assigned
/// client identifier to announce) is replaced by the 5-byte CONNACK 0x95 "Packet too
/// large", then the connection closes.
#[tokio::test]
async fn mqtt_3_1_2_24_a_connack_the_client_cannot_take_is_0x95_v5() {
    let fx = Fixture::new();
    let broker = open_broker(&fx).await;
    let connect = Connect::new(V::V5, b"").props(max_packet(Some(10)));
    let got = answer_to_connect(&device_client(&fx, "dev-1"), broker.addr, &connect.bytes()).await;
    assert_eq!(got, connack_v5(0x95));
}

// ---------------------------------------------------------------- 7. server topic aliases

fn alias(n: u16) -> Vec<u8> {
    p(prop::TOPIC_ALIAS, &n.to_be_bytes())
}

/// A connection subscribed to `t/#` at QoS 0 that states this Topic Alias Maximum
/// (MQTT 5; None: the property is absent).
async fn alias_subscriber(fx: &Fixture, broker: &Broker, v: V, max: Option<u16>) -> Raw {
    let list = max
        .map(|m| p(prop::TOPIC_ALIAS_MAXIMUM, &m.to_be_bytes()))
        .into_iter()
        .collect();
    let connect = Connect::new(v, b"sub").props(list);
    let (mut raw, _) =
        Raw::connect_ok(&device_client(fx, "dev-1"), broker.addr, &connect.bytes()).await;
    raw.send(&subscribe(v, 1, &[], b"t/#", 0)).await;
    let suback = match v {
        V::V4 => vec![0x90, 0x03, 0x00, 0x01, 0x00],
        V::V5 => vec![0x90, 0x04, 0x00, 0x01, 0x00, 0x00],
    };
    assert_eq!(raw.recv().await, suback);
    raw
}

/// MQTT 5 §3.3.2.3.4: towards a client that states a Topic Alias Maximum, certmq names
/// the topics it delivers most often by alias, within that maximum: a topic seen while an
/// alias is free gets one (sent with the topic, then alone); once all are taken, a topic
/// that has been delivered more often than the least used aliased one takes its alias
/// over (sent with the topic again).
#[tokio::test]
async fn mqtt_3_3_2_3_4_server_assigns_aliases_to_the_most_frequent_topics_v5() {
    let fx = Fixture::new();
    let broker = open_broker(&fx).await;
    let mut raw = alias_subscriber(&fx, &broker, V::V5, Some(2)).await;
    // (topic published, payload, topic sent ("": none), alias sent)
    let steps = [
        ("t/a", "1", "t/a", Some(1)),
        ("t/a", "2", "", Some(1)),
        ("t/b", "3", "t/b", Some(2)),
        // Both aliases taken; t/c (once) is not more frequent than t/b (once).
        ("t/c", "4", "t/c", None),
        ("t/b", "5", "", Some(2)),
        // t/c twice, t/a and t/b twice each: still not more.
        ("t/c", "6", "t/c", None),
        // t/c three times: takes over the lowest of the least used aliases.
        ("t/c", "7", "t/c", Some(1)),
        ("t/c", "8", "", Some(1)),
        // t/a (three times now) takes t/b's alias (twice).
        ("t/a", "9", "t/a", Some(2)),
    ];
    for (topic, payload, sent, alias_sent) in steps {
        let payload = payload.as_bytes();
        raw.send(&publish(V::V5, 0, topic.as_bytes(), 0, &[], payload))
            .await;
        let props: Vec<Vec<u8>> = alias_sent.map(alias).into_iter().collect();
        let expected = publish(V::V5, 0, sent.as_bytes(), 0, &props, payload);
        assert_eq!(
            raw.recv().await,
            expected,
            "delivery of {topic} {payload:?}"
        );
    }
}

/// A client that states Topic Alias Maximum 0, or none (0 is the default), and every MQTT
/// 3.1.1 client, gets every topic in full.
async fn no_aliases(v: V, max: Option<u16>) {
    let fx = Fixture::new();
    let broker = open_broker(&fx).await;
    let mut raw = alias_subscriber(&fx, &broker, v, max).await;
    for payload in [b"1", b"2", b"3"] {
        raw.send(&publish(v, 0, b"t/a", 0, &[], payload)).await;
        assert_eq!(raw.recv().await, publish(v, 0, b"t/a", 0, &[], payload));
    }
}

#[tokio::test]
async fn mqtt_3_3_2_3_4_no_aliases_for_a_client_that_states_0_v5() {
    no_aliases(V::V5, Some(0)).await;
    no_aliases(V::V5, None).await;
}

#[tokio::test]
async fn mqtt_3_3_2_3_4_no_aliases_in_mqtt_3_1_1_v311() {
    no_aliases(V::V4, None).await;
}

/// MQTT 5 §3.3.2.3.4: alias mappings end with the network connection. QoS 1 messages
/// delivered by alias and resent after a reconnect carry their topic again.
#[tokio::test]
async fn mqtt_3_3_2_3_4_aliases_do_not_outlive_the_connection_v5() {
    let fx = Fixture::new();
    let broker = open_broker(&fx).await;
    let client = device_client(&fx, "dev-1");
    let connect = Connect::new(V::V5, b"keep").props(vec![
        p(prop::SESSION_EXPIRY, &four(600)),
        p(prop::TOPIC_ALIAS_MAXIMUM, &[0, 5]),
    ]);
    let (mut raw, _) = Raw::connect_ok(&client, broker.addr, &connect.bytes()).await;
    raw.send(&subscribe(V::V5, 1, &[], b"t/#", 1)).await;
    assert_eq!(raw.recv().await, [0x90, 0x04, 0x00, 0x01, 0x00, 0x01]);
    let publisher = Connect::new(V::V5, b"pub");
    let (mut publisher, _) = Raw::connect_ok(
        &device_client(&fx, "dev-2"),
        broker.addr,
        &publisher.bytes(),
    )
    .await;
    for (pkid, payload) in [(1, b"1"), (2, b"2")] {
        publisher
            .send(&publish(V::V5, 0x02, b"t/q", pkid, &[], payload))
            .await;
        assert_eq!(publisher.recv().await, [0x40, 0x02, 0x00, pkid as u8]);
        let sent: &[u8] = if pkid == 1 { b"t/q" } else { b"" };
        let expected = publish(V::V5, 0x02, sent, pkid, &[alias(1)], payload);
        assert_eq!(raw.recv().await, expected);
    }
    // Gone without acknowledging either, then back: both resent with DUP, the first with
    // its topic (a new mapping), the second by the alias that first one set.
    drop(raw);
    let (mut raw, present) = Raw::connect_ok(&client, broker.addr, &connect.resume().bytes()).await;
    assert!(present, "session resumed");
    assert_eq!(
        raw.recv().await,
        publish(V::V5, 0x0A, b"t/q", 1, &[alias(1)], b"1")
    );
    assert_eq!(
        raw.recv().await,
        publish(V::V5, 0x0A, b"", 2, &[alias(1)], b"2")
    );
}

/// Publishes QoS 1 messages on `topics` (one per payload "0", "1", ...) from a second
/// device, each acknowledged before the next.
async fn publish_sequence(fx: &Fixture, broker: &Broker, topics: &[&str]) {
    let client = device_client(fx, "dev-2");
    let (mut publisher, _) =
        Raw::connect_ok(&client, broker.addr, &Connect::new(V::V5, b"p").bytes()).await;
    for (i, topic) in topics.iter().enumerate() {
        let pkid = u16::try_from(i + 1).expect("few");
        let payload = i.to_string();
        let bytes = publish(V::V5, 0x02, topic.as_bytes(), pkid, &[], payload.as_bytes());
        publisher.send(&bytes).await;
        let ack = [[0x40, 0x02].as_slice(), &pkid.to_be_bytes()].concat();
        assert_eq!(publisher.recv().await, ack);
    }
}

/// Runs `mosquitto_sub -V mqttv5 ARGS -t t/# -F "%t %p"` until it has printed the
/// deliveries of `topics` (after a retained readiness marker), and checks it printed each
/// under its full topic.
async fn mosquitto_sub_receives(fx: &Fixture, broker: &Broker, args: &[&str], topics: &[&str]) {
    let leaf = fx.device("dev-1.devices.example.com");
    let creds = Creds::write(fx, "dev-1", &leaf.chain_pem(&[&fx.fleet]), &leaf.key_pem);
    let port = broker.addr.port();
    let mut retain = mosquitto("mosquitto_pub", port, Version::V5, &creds);
    retain.args(["-r", "-q", "1", "-t", "t/ready", "-m", "ready"]);
    run("mosquitto_pub", retain).await.assert_success();
    let count = (topics.len() + 1).to_string();
    let mut sub = mosquitto("mosquitto_sub", port, Version::V5, &creds);
    sub.args(args)
        .args(["-q", "1", "-t", "t/#", "-C", &count, "-F", "%t %p"]);
    let mut sub = Spawned::spawn("mosquitto_sub", sub);
    assert_eq!(sub.next_line().await, "t/ready ready");
    publish_sequence(fx, broker, topics).await;
    let done = sub.finish().await;
    done.assert_success();
    let expected: Vec<String> = std::iter::once("t/ready ready".to_owned())
        .chain(topics.iter().enumerate().map(|(i, t)| format!("{t} {i}")))
        .collect();
    assert_eq!(done.stdout.lines().collect::<Vec<_>>(), expected, "{done}");
}

/// The version of libmosquitto behind `mosquitto_sub`, as (major, minor).
async fn libmosquitto_version() -> Option<(u32, u32)> {
    let mut help = tokio::process::Command::new("mosquitto_sub");
    help.arg("--help");
    let out = run("mosquitto_sub --help", help).await.output();
    let text = out.split("libmosquitto ").nth(1)?;
    let mut parts = text.split(['.', ' ']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Mosquitto's `mosquitto_sub -V mqttv5` states no Topic Alias Maximum unless told to, and
/// then gets every topic in full. With `-D connect topic-alias-maximum`, libmosquitto 2.0
/// (Debian 12's 2.0.11) takes an alias alone for a protocol error: against such clients
/// `max_server_topic_aliases = 0` keeps them working; libmosquitto 2.1 and later resolve
/// the aliases.
#[tokio::test]
async fn mqtt_3_3_2_3_4_mosquitto_sub_gets_every_topic_in_full_v5() {
    if !mosquitto_available() {
        return;
    }
    let topics = ["t/a", "t/a", "t/b", "t/a"];
    let fx = Fixture::new();
    let broker = open_broker(&fx).await;
    mosquitto_sub_receives(&fx, &broker, &[], &topics).await;
    let ask = ["-D", "connect", "topic-alias-maximum", "4"];
    match libmosquitto_version().await {
        Some(version) if version >= (2, 1) => {
            mosquitto_sub_receives(&fx, &broker, &ask, &topics).await;
        }
        version => eprintln!(
            "libmosquitto {version:?} cannot resolve server topic aliases: checking it with max_server_topic_aliases = 0"
        ),
    }
    let fx = Fixture::new();
    let config = config_with_limits(&fx, "max_server_topic_aliases = 0", BACKEND_FLEET);
    let broker = Broker::start(&config).await;
    mosquitto_sub_receives(&fx, &broker, &ask, &topics).await;
}

/// paho-mqtt 2.x for Python decodes the aliases certmq assigns (it leaves resolving them to
/// the application: the script does it as MQTT 5 defines it), and a paho client stating no
/// Topic Alias Maximum never gets one.
#[tokio::test]
async fn mqtt_3_3_2_3_4_paho_decodes_server_aliases_v5() {
    if !paho_available().await {
        return;
    }
    let fx = Fixture::new();
    let broker = open_broker(&fx).await;
    let leaf = fx.device("dev-1.devices.example.com");
    let creds = Creds::write(&fx, "dev-1", &leaf.chain_pem(&[&fx.fleet]), &leaf.key_pem);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/paho_topic_alias.py");
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(&script)
        .arg("localhost")
        .arg(broker.addr.port().to_string())
        .arg(&creds.cafile)
        .arg(&creds.cert)
        .arg(&creds.key)
        .arg("dev-1");
    // The script bounds itself at 20 s; this bound only catches a hung interpreter.
    let out = Spawned::spawn_with_timeout(
        "paho_topic_alias.py",
        cmd,
        std::time::Duration::from_secs(25),
    )
    .finish()
    .await;
    out.assert_success();
    assert!(out.stdout.contains("paho_topic_alias: ok"), "{out}");
}

/// `max_server_topic_aliases` is bounded: each delivery scans the aliases in use.
#[test]
fn max_server_topic_aliases_is_at_most_256() {
    let fx = Fixture::new();
    for (value, ok) in [(0, true), (256, true), (257, false)] {
        let limits = format!("max_server_topic_aliases = {value}");
        let loaded = certmq::config::Config::load(&config_with_limits(&fx, &limits, BACKEND_FLEET));
        match (loaded, ok) {
            (Ok(c), true) => assert_eq!(c.limits.max_server_topic_aliases, value),
            (Err(e), false) => {
                let text = e.problems[0].to_string();
                assert!(
                    text.ends_with("limits.max_server_topic_aliases: must be at most 256"),
                    "{text}"
                );
            }
            (other, _) => panic!("{value}: {other:?}"),
        }
    }
}

// ---------------------------------------------------------------- 8. subscription ids

/// [MQTT-3.3.4-4]: overlapping subscriptions of one session give one copy (at the highest
/// QoS granted, which MQTT 5 §3.3.4 allows), and that copy carries the identifier of every
/// matching subscription that has one (certmq sends them in ascending order).
#[tokio::test]
async fn mqtt_3_3_4_4_one_copy_carries_every_matching_subscription_identifier_v5() {
    let fx = Fixture::new();
    let broker = open_broker(&fx).await;
    let connect = Connect::new(V::V5, b"s");
    let (mut sub, _) =
        Raw::connect_ok(&device_client(&fx, "dev-1"), broker.addr, &connect.bytes()).await;
    let id = |n: &[u8]| p(prop::SUBSCRIPTION_ID, n);
    // (filter, options = QoS, identifier as a Variable Byte Integer; empty: none)
    let subscriptions = [
        ("o/#", 0, vec![3]),
        ("o/+", 2, vec![9]),
        ("o/x", 1, vec![]),
        ("+/x", 0, vec![0xC8, 0x01]), // 200
    ];
    for (pkid, (filter, qos, ident)) in (1u8..).zip(subscriptions) {
        let list: Vec<Vec<u8>> = (!ident.is_empty())
            .then(|| id(&ident))
            .into_iter()
            .collect();
        sub.send(&subscribe(
            V::V5,
            u16::from(pkid),
            &list,
            filter.as_bytes(),
            qos,
        ))
        .await;
        assert_eq!(sub.recv().await, [0x90, 0x04, 0x00, pkid, 0x00, qos]);
    }
    let connect = Connect::new(V::V5, b"p");
    let (mut publisher, _) =
        Raw::connect_ok(&device_client(&fx, "dev-2"), broker.addr, &connect.bytes()).await;
    publisher
        .send(&publish(V::V5, 0x04, b"o/x", 1, &[], b"m"))
        .await;
    assert_eq!(publisher.recv().await, [0x50, 0x02, 0x00, 0x01]);
    publisher.send(&[0x62, 0x02, 0x00, 0x01]).await;
    assert_eq!(publisher.recv().await, [0x70, 0x02, 0x00, 0x01]);
    let ids = [id(&[3]), id(&[9]), id(&[0xC8, 0x01])];
    assert_eq!(
        sub.recv().await,
        publish(V::V5, 0x04, b"o/x", 1, &ids, b"m")
    );
    // A later message on the same connection comes next: no second copy of the first.
    publisher
        .send(&publish(V::V5, 0, b"o/y", 0, &[], b"end"))
        .await;
    let ids = [id(&[3]), id(&[9])];
    assert_eq!(sub.recv().await, publish(V::V5, 0, b"o/y", 0, &ids, b"end"));
}
