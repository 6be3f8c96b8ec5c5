//! contract §6, MQTT 5 delivery end to end: subscription identifiers, no local, retain as
//! published, retain handling, shared subscriptions with options, and the client's own
//! limits (Receive Maximum, Maximum Packet Size) as the broker must honour them. A real
//! broker over mutual TLS, a scripted MQTT 5 client (`crate::common::v5tests`).
//!
//! Negatives are shown with a marker published after the unwanted message (same ordered
//! connection), or, for the in-flight window, with PINGREQ round trips: everything the
//! broker had decided to send comes before the PINGRESP.

use crate::common::v5tests::{connect_packet, device_client, Raw5, BACKEND_FLEET};
use crate::common::{Broker, Fixture};
use rumqttc::v5::mqttbytes::v5::{
    ConnectProperties, Filter, Packet, Publish, RetainForwardRule, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;

async fn backend_broker(fx: &Fixture) -> Broker {
    Broker::start(&fx.config(BACKEND_FLEET)).await
}

fn filter(path: &str, f: impl FnOnce(&mut Filter)) -> Filter {
    let mut filter = Filter::new(path, QoS::AtLeastOnce);
    f(&mut filter);
    filter
}

fn ids(p: &Publish) -> Vec<usize> {
    let mut ids = p
        .properties
        .as_ref()
        .map(|p| p.subscription_identifiers.clone())
        .unwrap_or_default();
    ids.sort_unstable();
    ids
}

// ---------------------------------------------------------------- 7. subscription ids

#[tokio::test]
async fn deliveries_carry_the_identifiers_of_every_matching_subscription() {
    let fx = Fixture::new();
    let broker = backend_broker(&fx).await;
    let mut s = Raw5::open(&device_client(&fx, "dev-1"), broker.addr, "s").await;
    s.subscribe(vec![Filter::new("ids/#", QoS::AtLeastOnce)], Some(5))
        .await;
    s.subscribe(vec![Filter::new("ids/a", QoS::AtLeastOnce)], Some(7))
        .await;
    s.subscribe(vec![Filter::new("ids/+", QoS::AtMostOnce)], None)
        .await;
    let mut p = Raw5::open(&device_client(&fx, "dev-2"), broker.addr, "p").await;
    p.publish_ok("ids/a", "both").await;
    p.publish_ok("ids/b/c", "one").await;

    let both = s.next_publish().await;
    assert_eq!(both.payload, "both");
    assert_eq!(ids(&both), [5, 7]);
    // Overlapping subscriptions give one delivery at the highest granted QoS.
    assert_eq!(both.qos, QoS::AtLeastOnce);
    let one = s.next_publish().await;
    assert_eq!(one.payload, "one");
    assert_eq!(ids(&one), [5]);
}

// ---------------------------------------------------------------- 8. no local

#[tokio::test]
async fn no_local_skips_own_messages_only() {
    let fx = Fixture::new();
    let broker = backend_broker(&fx).await;
    let mut a = Raw5::open(&device_client(&fx, "dev-1"), broker.addr, "a").await;
    let ack = a
        .subscribe(vec![filter("nl/t", |f| f.nolocal = true)], None)
        .await;
    assert_eq!(
        ack.return_codes,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    // Without no local, a client gets its own messages (the control).
    let mut c = Raw5::open(&device_client(&fx, "dev-3"), broker.addr, "c").await;
    c.sub("nl/t", QoS::AtLeastOnce).await;

    a.publish_ok("nl/t", "own").await;
    let mut b = Raw5::open(&device_client(&fx, "dev-2"), broker.addr, "b").await;
    b.publish_ok("nl/t", "other").await;

    assert_eq!(a.next_publish().await.payload, "other");
    let seen: Vec<_> = c.until_payload(b"other").await;
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].payload, "own");
}

// ---------------------------------------------------------------- 9. retain as published

#[tokio::test]
async fn retain_as_published_keeps_the_flag_on_live_messages() {
    let fx = Fixture::new();
    let broker = backend_broker(&fx).await;
    let mut keep = Raw5::open(&device_client(&fx, "dev-1"), broker.addr, "keep").await;
    keep.subscribe(vec![filter("rap/t", |f| f.preserve_retain = true)], None)
        .await;
    let mut clear = Raw5::open(&device_client(&fx, "dev-2"), broker.addr, "clear").await;
    clear.sub("rap/t", QoS::AtLeastOnce).await;

    let mut p = Raw5::open(&device_client(&fx, "dev-3"), broker.addr, "p").await;
    p.publish("rap/t", QoS::AtLeastOnce, true, "live", None)
        .await
        .expect("PUBACK");
    let kept = keep.next_publish().await;
    assert_eq!(kept.payload, "live");
    assert!(kept.retain, "retain as published must keep RETAIN");
    let cleared = clear.next_publish().await;
    assert_eq!(cleared.payload, "live");
    assert!(!cleared.retain, "a live message is forwarded with RETAIN 0");
}

// ---------------------------------------------------------------- 10. retain handling

/// Subscribes twice with this retain handling; returns how many retained messages each
/// SUBSCRIBE brought (a non-retained marker after each proves the count).
async fn retained_per_subscribe(
    fx: &Fixture,
    broker: &Broker,
    rule: RetainForwardRule,
) -> [usize; 2] {
    let mut s = Raw5::open(&device_client(fx, "dev-1"), broker.addr, "s").await;
    let mut counts = [0; 2];
    for (i, count) in counts.iter_mut().enumerate() {
        let rule = rule.clone();
        s.subscribe(vec![filter("rh/t", |f| f.retain_forward_rule = rule)], None)
            .await;
        let marker = format!("marker-{i}");
        s.publish("rh/t", QoS::AtMostOnce, false, marker.clone(), None)
            .await;
        let got = s.until_payload(marker.as_bytes()).await;
        for p in &got[..got.len() - 1] {
            assert_eq!(p.payload, "kept");
            assert!(p.retain);
        }
        *count = got.len() - 1;
    }
    counts
}

#[tokio::test]
async fn retain_handling_0_1_2() {
    let fx = Fixture::new();
    let broker = backend_broker(&fx).await;
    let mut p = Raw5::open(&device_client(&fx, "dev-2"), broker.addr, "p").await;
    p.publish("rh/t", QoS::AtLeastOnce, true, "kept", None)
        .await
        .expect("PUBACK");
    let every = retained_per_subscribe(&fx, &broker, RetainForwardRule::OnEverySubscribe).await;
    assert_eq!(every, [1, 1], "retain handling 0");
    let new = retained_per_subscribe(&fx, &broker, RetainForwardRule::OnNewSubscribe).await;
    assert_eq!(new, [1, 0], "retain handling 1");
    let never = retained_per_subscribe(&fx, &broker, RetainForwardRule::Never).await;
    assert_eq!(never, [0, 0], "retain handling 2");
}

// ---------------------------------------------------------------- 11. receive maximum

#[tokio::test]
async fn client_receive_maximum_bounds_qos1_in_flight() {
    let fx = Fixture::new();
    let broker = backend_broker(&fx).await;
    let mut connect = connect_packet("s");
    let mut props = ConnectProperties::new();
    props.receive_maximum = Some(2);
    connect.properties = Some(props);
    let mut s = Raw5::open_with(&device_client(&fx, "dev-1"), broker.addr, connect).await;
    s.auto_ack = false;
    s.sub("rm/t", QoS::AtLeastOnce).await;

    let mut p = Raw5::open(&device_client(&fx, "dev-2"), broker.addr, "p").await;
    for i in 0..5 {
        p.publish_ok("rm/t", format!("m{i}")).await;
    }
    // All five are queued for s (each PUBACK came after routing). Two round trips: the
    // broker has sent all it may before the second PINGRESP.
    let mut got = s.ping_collect().await;
    got.extend(s.ping_collect().await);
    let payloads: Vec<_> = got.iter().map(|p| p.payload.clone()).collect();
    assert_eq!(
        payloads,
        ["m0", "m1"],
        "more than Receive Maximum in flight"
    );

    s.ack(got[0].pkid).await;
    let more = s.ping_collect().await;
    let payloads: Vec<_> = more.iter().map(|p| p.payload.clone()).collect();
    assert_eq!(payloads, ["m2"], "one PUBACK frees exactly one slot");
}

// ---------------------------------------------------------------- 12. maximum packet size

#[tokio::test]
async fn messages_above_the_client_maximum_packet_size_are_not_sent() {
    let fx = Fixture::new();
    let broker = backend_broker(&fx).await;
    let mut connect = connect_packet("s");
    let mut props = ConnectProperties::new();
    props.max_packet_size = Some(300);
    connect.properties = Some(props);
    let mut s = Raw5::open_with(&device_client(&fx, "dev-1"), broker.addr, connect).await;
    s.sub("mp/t", QoS::AtLeastOnce).await;

    let mut p = Raw5::open(&device_client(&fx, "dev-2"), broker.addr, "p").await;
    p.publish_ok("mp/t", vec![b'x'; 1000]).await;
    p.publish_ok("mp/t", "small").await;
    let got = s.until_payload(b"small").await;
    assert_eq!(got.len(), 1, "a packet above 300 bytes was sent");
    assert!(
        broker.metrics.render().contains("too_large_for_client"),
        "{}",
        broker.metrics.render()
    );
}

// ---------------------------------------------------------------- 14. shared subscriptions

#[tokio::test]
async fn shared_subscription_delivers_each_message_once_with_its_options() {
    let fx = Fixture::new();
    let broker = backend_broker(&fx).await;
    let mut members = Vec::new();
    for (name, id) in [("dev-1", 11), ("dev-3", 12)] {
        let mut m = Raw5::open(&device_client(&fx, name), broker.addr, "m").await;
        let ack = m
            .subscribe(
                vec![Filter::new("$share/g/sh/t", QoS::AtLeastOnce)],
                Some(id),
            )
            .await;
        assert_eq!(
            ack.return_codes,
            [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
        );
        members.push((m, id));
    }
    let mut p = Raw5::open(&device_client(&fx, "dev-2"), broker.addr, "p").await;
    for i in 0..4 {
        p.publish_ok("sh/t", format!("m{i}")).await;
    }
    // Round robin: one marker for each member, after the messages.
    p.publish_ok("sh/t", "end").await;
    p.publish_ok("sh/t", "end").await;

    let mut seen = Vec::new();
    for (m, id) in &mut members {
        let got = m.until_payload(b"end").await;
        for msg in &got {
            assert_eq!(msg.topic, "sh/t");
            assert_eq!(msg.qos, QoS::AtLeastOnce);
            assert_eq!(ids(msg), [*id]);
        }
        seen.extend(
            got[..got.len() - 1]
                .iter()
                .map(|p| String::from_utf8_lossy(&p.payload).into_owned()),
        );
    }
    seen.sort();
    assert_eq!(seen, ["m0", "m1", "m2", "m3"]);
}

#[tokio::test]
async fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    let fx = Fixture::new();
    let broker = backend_broker(&fx).await;
    let mut s = Raw5::open(&device_client(&fx, "dev-1"), broker.addr, "s").await;
    let mut sub = rumqttc::v5::mqttbytes::v5::Subscribe::new(
        filter("$share/g/sh/t", |f| f.nolocal = true),
        None,
    );
    sub.pkid = 1;
    s.send(Packet::Subscribe(sub)).await;
    assert_eq!(s.expect_disconnect().await, 0x82);
}
