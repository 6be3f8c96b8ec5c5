//! contract §6, MQTT 5 features end to end: a real broker on 127.0.0.1:0 over mutual TLS, a
//! scripted MQTT 5 client (rumqttc's codec, `crate::common::v5tests`) where a test must control
//! every packet, and rumqttc's own event loop where a plain client is enough. Subscription
//! options, shared subscriptions and retain handling are in `mqtt_v5_subscriptions.rs`.
//!
//! Negatives ("never delivered") are shown with a marker: a later message on the same
//! ordered connection whose arrival proves the unwanted one would have come before it.

use std::time::{Duration, Instant};

use crate::common::coretests::raw::{raw_publish, RawConnect};
use crate::common::coretests::V;
use crate::common::v5tests::{
    config_with_limits, connect_packet, device_client, with_expiry, Raw5, BACKEND_FLEET,
};
use crate::common::{Broker, Client, Fixture, WAIT};
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Filter, LastWill, LastWillProperties, Packet, PubAckReason,
    PublishProperties, SubscribeReasonCode, UnsubAckReason,
};
use rumqttc::v5::mqttbytes::QoS;

async fn backend_broker(fx: &Fixture) -> Broker {
    Broker::start(&fx.config(BACKEND_FLEET)).await
}

fn expiry_props(secs: u32) -> PublishProperties {
    PublishProperties {
        message_expiry_interval: Some(secs),
        ..Default::default()
    }
}

fn alias_props(alias: u16) -> PublishProperties {
    PublishProperties {
        topic_alias: Some(alias),
        ..Default::default()
    }
}

// ---------------------------------------------------------------- 1. CONNACK

#[tokio::test]
async fn connack_carries_assigned_id_server_keep_alive_and_limits() {
    let fx = Fixture::new();
    let cfg = config_with_limits(
        &fx,
        "max_keep_alive = 30\nmax_inflight = 7\nmax_packet_size = 4096",
        BACKEND_FLEET,
    );
    let broker = Broker::start(&cfg).await;
    let c = device_client(&fx, "dev-1");

    // Empty client id, keep alive 60 > max_keep_alive.
    let (_a, ack) = Raw5::connect(&c, broker.addr, connect_packet(""), None).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let p = ack.properties.expect("CONNACK properties");
    let assigned = p
        .assigned_client_identifier
        .clone()
        .expect("assigned client id");
    assert!(!assigned.is_empty());
    assert_eq!(p.server_keep_alive, Some(30));
    assert_eq!(p.receive_max, Some(7));
    assert_eq!(p.max_packet_size, Some(4096));
    assert!(matches!(p.topic_alias_max, Some(n) if n >= 1), "{p:?}");

    // A second empty id gets another identifier.
    let (_b, ack) = Raw5::connect(&c, broker.addr, connect_packet(""), None).await;
    let other = ack.properties.and_then(|p| p.assigned_client_identifier);
    assert!(other.is_some_and(|o| o != assigned));

    // A given id is kept, and a keep alive within the limit is not overridden.
    let mut connect = connect_packet("given");
    connect.keep_alive = 20;
    let (_c, ack) = Raw5::connect(&c, broker.addr, connect, None).await;
    let p = ack.properties.expect("CONNACK properties");
    assert_eq!(p.assigned_client_identifier, None);
    assert!(matches!(p.server_keep_alive, None | Some(20)), "{p:?}");
}

// ---------------------------------------------------------------- 2. reason codes

#[tokio::test]
async fn refusals_carry_reason_codes_and_reason_strings() {
    let fx = Fixture::new();
    let broker = Broker::start(&fx.config(&Fixture::fleet_anchor(true))).await;
    let mut d = Raw5::open(&device_client(&fx, "dev-1"), broker.addr, "d").await;

    let ack = d
        .publish("devices/dev-2/x", QoS::AtLeastOnce, false, "no", None)
        .await
        .expect("PUBACK");
    assert_eq!(ack.reason, PubAckReason::NotAuthorized);
    let text = ack.properties.and_then(|p| p.reason_string);
    assert!(
        text.is_some_and(|t| !t.is_empty()),
        "PUBACK 0x87 without a reason string"
    );
    let ok = d
        .publish("devices/dev-1/x", QoS::AtLeastOnce, false, "yes", None)
        .await
        .expect("PUBACK");
    assert_eq!(ok.reason, PubAckReason::Success);

    let ack = d
        .subscribe(
            vec![
                Filter::new("devices/#", QoS::AtLeastOnce),
                Filter::new("devices/dev-1/#", QoS::AtLeastOnce),
            ],
            None,
        )
        .await;
    assert_eq!(
        ack.return_codes,
        vec![
            SubscribeReasonCode::NotAuthorized,
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        ]
    );
    let text = ack.properties.clone().and_then(|p| p.reason_string);
    assert!(
        text.is_some_and(|t| t.contains("devices/#")),
        "SUBACK 0x87 without a reason string: {ack:?}"
    );

    let ack = d
        .unsubscribe(&["devices/dev-1/none", "devices/dev-1/#"])
        .await;
    assert_eq!(
        ack.reasons,
        vec![
            UnsubAckReason::NoSubscriptionExisted,
            UnsubAckReason::Success
        ]
    );
}

// ---------------------------------------------------------------- 3. session expiry

#[tokio::test]
async fn session_with_expiry_survives_a_disconnect() {
    let fx = Fixture::new();
    let broker = backend_broker(&fx).await;
    let sub = device_client(&fx, "dev-1");
    let mut connect = connect_packet("s");
    connect.properties = Some(with_expiry(60));
    let mut s = Raw5::open_with(&sub, broker.addr, connect.clone()).await;
    s.sub("exp/q", QoS::AtLeastOnce).await;
    s.disconnect().await;

    let mut p = Raw5::open(&device_client(&fx, "dev-2"), broker.addr, "p").await;
    p.publish_ok("exp/q", "while-away").await;

    connect.clean_start = false;
    let (mut s, ack) = Raw5::connect(&sub, broker.addr, connect, None).await;
    assert!(ack.session_present);
    assert_eq!(s.next_publish().await.payload, "while-away");
}

#[tokio::test]
async fn session_with_expiry_zero_ends_at_disconnect() {
    let fx = Fixture::new();
    let broker = backend_broker(&fx).await;
    let sub = device_client(&fx, "dev-1");
    let mut connect = connect_packet("s");
    connect.properties = Some(with_expiry(0));
    let mut s = Raw5::open_with(&sub, broker.addr, connect.clone()).await;
    s.sub("exp/q", QoS::AtLeastOnce).await;
    s.disconnect().await;

    let mut p = Raw5::open(&device_client(&fx, "dev-2"), broker.addr, "p").await;
    p.publish_ok("exp/q", "lost").await;

    connect.clean_start = false;
    let (mut s, ack) = Raw5::connect(&sub, broker.addr, connect, None).await;
    assert!(!ack.session_present);
    s.sub("exp/q", QoS::AtLeastOnce).await;
    p.publish_ok("exp/q", "marker").await;
    let got = s.until_payload(b"marker").await;
    assert_eq!(
        got.len(),
        1,
        "a message from the ended session arrived: {got:?}"
    );
}

#[tokio::test]
async fn disconnect_may_not_raise_a_zero_session_expiry() {
    let fx = Fixture::new();
    let broker = backend_broker(&fx).await;
    let c = device_client(&fx, "dev-1");

    let mut zero = Raw5::open(&c, broker.addr, "zero").await;
    zero.send_disconnect_with_expiry(30).await;
    assert_eq!(zero.expect_disconnect().await, 0x82);

    // Lowering a non-zero expiry is allowed: a plain close, no DISCONNECT from the broker.
    let mut connect = connect_packet("ten");
    connect.properties = Some(with_expiry(10));
    let mut ten = Raw5::open_with(&c, broker.addr, connect).await;
    ten.send_disconnect_with_expiry(0).await;
    assert!(ten.until_closed().await.is_empty());
}

// ---------------------------------------------------------------- 4. message expiry

#[tokio::test]
async fn expired_messages_are_not_delivered_and_the_rest_count_down() {
    let fx = Fixture::new();
    let broker = backend_broker(&fx).await;
    let sub = device_client(&fx, "dev-1");
    let mut connect = connect_packet("s");
    connect.properties = Some(with_expiry(60));
    let mut s = Raw5::open_with(&sub, broker.addr, connect.clone()).await;
    s.sub("msg/exp", QoS::AtLeastOnce).await;
    s.disconnect().await;

    let mut p = Raw5::open(&device_client(&fx, "dev-2"), broker.addr, "p").await;
    for (payload, secs) in [("short", 1), ("long", 60)] {
        let ack = p
            .publish(
                "msg/exp",
                QoS::AtLeastOnce,
                false,
                payload,
                Some(expiry_props(secs)),
            )
            .await
            .expect("PUBACK");
        assert_eq!(ack.reason, PubAckReason::Success);
    }
    // The event here is the passing of time itself: let the 1 s expiry elapse.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    p.publish_ok("msg/exp", "marker").await;

    connect.clean_start = false;
    let (mut s, ack) = Raw5::connect(&sub, broker.addr, connect, None).await;
    assert!(ack.session_present);
    let got = s.until_payload(b"marker").await;
    let payloads: Vec<_> = got.iter().map(|p| p.payload.clone()).collect();
    assert_eq!(payloads, ["long", "marker"]);
    let left = got[0]
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval)
        .expect("remaining expiry on the delivered message");
    // 60 s less the 1.2 s and more it waited, rounded up (contract §6).
    assert!(
        (50..=59).contains(&left),
        "remaining expiry {left}, sent 60 over 1.2 s ago"
    );
    let marker_expiry = got[1]
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval);
    assert_eq!(marker_expiry, None);
}

// ---------------------------------------------------------------- 5. topic aliases

#[tokio::test]
async fn topic_alias_set_then_used_delivers_on_the_topic() {
    let fx = Fixture::new();
    let broker = backend_broker(&fx).await;
    let mut s = Raw5::open(&device_client(&fx, "dev-1"), broker.addr, "s").await;
    s.sub("alias/#", QoS::AtLeastOnce).await;
    let mut p = Raw5::open(&device_client(&fx, "dev-2"), broker.addr, "p").await;
    for (topic, payload) in [("alias/one", "first"), ("", "second")] {
        let ack = p
            .publish(
                topic,
                QoS::AtLeastOnce,
                false,
                payload,
                Some(alias_props(3)),
            )
            .await
            .expect("PUBACK");
        assert_eq!(ack.reason, PubAckReason::Success);
    }
    for payload in ["first", "second"] {
        let got = s.next_publish().await;
        assert_eq!(got.payload, payload);
        assert_eq!(got.topic, "alias/one");
        assert_eq!(got.properties.and_then(|p| p.topic_alias), None);
    }
}

#[tokio::test]
async fn invalid_topic_aliases_end_the_connection() {
    let fx = Fixture::new();
    let broker = backend_broker(&fx).await;
    let c = device_client(&fx, "dev-1");
    let (_, ack) = Raw5::connect(&c, broker.addr, connect_packet("probe"), None).await;
    let max = ack
        .properties
        .and_then(|p| p.topic_alias_max)
        .expect("topic alias maximum");

    for (alias, topic, code) in [(0, "a/b", 0x94), (max + 1, "a/b", 0x94), (5, "", 0x82)] {
        let mut p = Raw5::open(&c, broker.addr, "p").await;
        p.send(Packet::Publish(rumqttc::v5::mqttbytes::v5::Publish::new(
            topic,
            QoS::AtMostOnce,
            "x",
            Some(alias_props(alias)),
        )))
        .await;
        assert_eq!(
            p.expect_disconnect().await,
            code,
            "alias {alias} with topic {topic:?}"
        );
    }
}

// ---------------------------------------------------------------- 6. properties

/// A connected rumqttc MQTT 5 client; its event loop is returned for the test to poll.
async fn rumqttc_v5(
    client: &Client,
    port: u16,
    id: &str,
) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
    use rumqttc::v5::{mqttbytes::v5::Packet as P, Event};
    let mut opts = rumqttc::v5::MqttOptions::new(id, "localhost", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(client.tls.clone()),
    ));
    let (c, mut el) = rumqttc::v5::AsyncClient::new(opts, 10);
    tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Incoming(P::ConnAck(_)) = el.poll().await.expect("connect") {
                break;
            }
        }
    })
    .await
    .expect("CONNACK in time");
    (c, el)
}

#[tokio::test]
async fn publish_properties_pass_through_unchanged() {
    use rumqttc::v5::{mqttbytes::v5::Packet as P, Event};
    let fx = Fixture::new();
    let broker = backend_broker(&fx).await;
    let (sub, mut sub_loop) =
        rumqttc_v5(&device_client(&fx, "dev-1"), broker.addr.port(), "s").await;
    sub.subscribe("props/t", QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(WAIT, async {
        while !matches!(
            sub_loop.poll().await.unwrap(),
            Event::Incoming(P::SubAck(_))
        ) {}
    })
    .await
    .expect("SUBACK");

    let sent = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("props/reply".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"\x00\x01corr")),
        user_properties: vec![
            ("b".into(), "2".into()),
            ("a".into(), "1".into()),
            ("b".into(), "3".into()),
        ],
        ..Default::default()
    };
    let (pubc, mut pub_loop) =
        rumqttc_v5(&device_client(&fx, "dev-2"), broker.addr.port(), "p").await;
    pubc.publish_with_properties("props/t", QoS::AtLeastOnce, false, "{}", sent.clone())
        .await
        .unwrap();
    let publisher = tokio::spawn(async move { while pub_loop.poll().await.is_ok() {} });

    let got = tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Incoming(P::Publish(p)) = sub_loop.poll().await.unwrap() {
                break p;
            }
        }
    })
    .await
    .expect("PUBLISH in time");
    publisher.abort();
    assert_eq!(got.payload, "{}");
    assert_eq!(got.properties, Some(sent));
}

// ---------------------------------------------------------------- 13. will delay

fn will_connect(id: &str) -> (rumqttc::v5::mqttbytes::v5::Connect, LastWill) {
    let mut connect = connect_packet(id);
    connect.properties = Some(with_expiry(10));
    let props = LastWillProperties {
        delay_interval: Some(2),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    };
    let will = LastWill::new("will/w", "gone", QoS::AtLeastOnce, false, Some(props));
    (connect, will)
}

#[tokio::test]
async fn delayed_will_is_published_after_the_delay() {
    let fx = Fixture::new();
    let broker = backend_broker(&fx).await;
    let mut s = Raw5::open(&device_client(&fx, "dev-1"), broker.addr, "s").await;
    s.sub("will/#", QoS::AtLeastOnce).await;
    let (connect, will) = will_connect("w");
    let (w, ack) = Raw5::connect(
        &device_client(&fx, "dev-2"),
        broker.addr,
        connect,
        Some(will),
    )
    .await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    drop(w); // TCP closed without DISCONNECT
    let dropped = Instant::now();
    let got = s.next_publish().await;
    assert_eq!(got.payload, "gone");
    // A smoke check (not before 1.5 s, within `next_publish`'s bound): the exact delay is
    // proven on a paused clock in src/broker/conn/tests.rs.
    assert!(
        dropped.elapsed() >= Duration::from_millis(1500),
        "will published after {:?}, before its 2 s delay",
        dropped.elapsed()
    );
}

#[tokio::test]
async fn delayed_will_is_cancelled_by_a_reconnect_within_the_delay() {
    let fx = Fixture::new();
    let broker = backend_broker(&fx).await;
    let mut s = Raw5::open(&device_client(&fx, "dev-1"), broker.addr, "s").await;
    s.sub("will/#", QoS::AtLeastOnce).await;
    let wc = device_client(&fx, "dev-2");
    let (connect, will) = will_connect("w");
    let (w, _) = Raw5::connect(&wc, broker.addr, connect.clone(), Some(will.clone())).await;
    drop(w);
    let mut again = connect;
    again.clean_start = false;
    let (_w, ack) = Raw5::connect(&wc, broker.addr, again, Some(will)).await;
    assert!(ack.session_present);
    // The event is the delay passing without a will: let it elapse, then a marker.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    s.publish_ok("will/w", "marker").await;
    let got = s.until_payload(b"marker").await;
    assert_eq!(got.len(), 1, "the will was published: {got:?}");
}

/// An MQTT 5 CONNECT (clean start, keep alive 60 s) with these CONNECT properties
/// (already encoded).
fn connect_v5_with_props(client_id: &str, props: &[u8]) -> Vec<u8> {
    RawConnect::new(V::V5, client_id).bytes_with_properties(props)
}

#[tokio::test]
async fn enhanced_authentication_is_refused_with_0x8c() {
    let fx = crate::common::Fixture::new();
    let broker =
        crate::common::Broker::start(&fx.config(&crate::common::Fixture::fleet_anchor(true))).await;
    let dev = fx.device("dev-1.devices.example.com");
    // Property 0x15 Authentication Method = "SCRAM-SHA-1".
    let mut props = vec![0x15, 0, 11];
    props.extend_from_slice(b"SCRAM-SHA-1");
    let answer = fx
        .client(&dev)
        .raw(broker.addr, &connect_v5_with_props("c", &props))
        .await
        .unwrap();
    assert_eq!(
        (answer[0], answer[3]),
        (0x20, 0x8C),
        "CONNACK 0x8C: {answer:02x?}"
    );
    assert!(
        String::from_utf8_lossy(&answer).contains("not supported"),
        "{answer:02x?}"
    );
}

#[tokio::test]
async fn request_problem_information_0_suppresses_reason_strings_on_acks() {
    let fx = crate::common::Fixture::new();
    let broker =
        crate::common::Broker::start(&fx.config(&crate::common::Fixture::fleet_anchor(true))).await;
    let dev = fx.device("dev-1.devices.example.com");
    let client = fx.client(&dev);
    for (props, expect_string) in [(vec![0x17, 0], false), (vec![], true)] {
        let (ack, mut tls) = client
            .raw_first_packet(broker.addr, &connect_v5_with_props("c", &props))
            .await
            .unwrap();
        assert_eq!(ack[3], 0, "connected: {ack:02x?}");
        use tokio::io::AsyncWriteExt;
        // A QoS 1 PUBLISH to a topic the device may not use, pkid 1.
        let publish = raw_publish(V::V5, "devices/other/t", b"x", 1, 1, false);
        tls.write_all(&publish).await.unwrap();
        let puback = crate::common::read_packet(&mut tls).await.unwrap();
        assert_eq!(
            (puback[0], puback[4]),
            (0x40, 0x87),
            "PUBACK 0x87: {puback:02x?}"
        );
        assert_eq!(
            puback.contains(&0x1F),
            expect_string,
            "reason string present = {expect_string}: {puback:02x?}"
        );
    }
}
