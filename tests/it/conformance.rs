//! Protocol conformance, clause by clause (docs/contract.md §6): what the MQTT 3.1.1 and 5.0
//! specifications say MUST happen, checked byte for byte. Each test sends exact bytes over
//! mutual TLS to a real broker and expects exact bytes back, or the connection closed
//! with nothing more. A test is named after the clause it checks (`mqtt_1_5_4_2_...` is
//! [MQTT-1.5.4-2]); a clause that exists in both versions is one check run twice through
//! [`both!`], `_v311` and `_v5`, since the 3.1.1 number of a clause may differ from its
//! 5.0 number.
//!
//! The bytes are built by hand (`wire.rs`) rather than with a client library: these are
//! packets no library will send (a NUL in a string, a property twice, DUP on QoS 0). Item 7,
//! the topic aliases the broker assigns, is in `aliases.rs`, with the paho-mqtt and
//! `mosquitto_sub` checks.

use std::net::SocketAddr;

use crate::common::coretests::raw::Raw;
use crate::common::coretests::V;
use crate::common::v5tests::{device_client, BACKEND_FLEET};
use crate::common::{Broker, Client, Fixture, WAIT};

mod aliases;
mod wire;

use wire::*;

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
