//! Per-device and per-session bounds that must never lose anything silently (contract §2, 4, 7):
//! `max_session_expiry` (MQTT 5 expiry capped and announced in CONNACK; MQTT 3.1.1
//! persistent sessions expire too), `max_retained_per_device` (v5 PUBACK 0x97, counted
//! drops otherwise, ownership kept across a restart), and retained messages on SUBSCRIBE
//! delivered in full however many there are, beyond `max_queued_messages`. Real brokers
//! (in-process, or `certmq serve` where a log line is the event to wait for), real TLS.

use std::collections::BTreeSet;

use crate::common::coretests::raw::{raw_publish, Raw, RawConnect, PUBACK};
use crate::common::coretests::{Opts, Peer, MARKER, V};
use crate::common::ops::{metric, Proc};
use crate::common::v5tests::{
    config_with_limits, connect_packet, device_client, with_expiry, Raw5, BACKEND_FLEET,
};
use crate::common::{Broker, Fixture};
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;

const RETAINED_QUOTA: &str = "certmq_messages_dropped_total{reason=\"retained_quota\"}";

fn persistent() -> Opts {
    Opts {
        clean: false,
        will: None,
    }
}

/// The number of retained-quota drops the broker counted.
fn quota_drops(broker: &Broker) -> f64 {
    metric(&broker.metrics.render(), RETAINED_QUOTA).unwrap_or(0.0)
}

/// MQTT 5 §3.2.2.3.2: a session expiry above `max_session_expiry` (0xFFFFFFFF included) is
/// lowered, and CONNACK says to what; one within the limit is not echoed.
#[tokio::test]
async fn v5_session_expiry_is_capped_and_announced() {
    let fx = Fixture::new();
    let broker = Broker::start(&config_with_limits(
        &fx,
        "max_session_expiry = 60",
        BACKEND_FLEET,
    ))
    .await;
    let client = device_client(&fx, "d1");
    for (asked, announced) in [
        (u32::MAX, Some(60)),
        (600, Some(60)),
        (61, Some(60)),
        (60, None),
        (30, None),
        (0, None),
    ] {
        let mut connect = connect_packet("c");
        connect.properties = Some(with_expiry(asked));
        let (raw, ack) = Raw5::connect(&client, broker.addr, connect, None).await;
        assert_eq!(ack.code, ConnectReturnCode::Success, "{ack:?}");
        let got = ack.properties.and_then(|p| p.session_expiry_interval);
        assert_eq!(got, announced, "asked for {asked}");
        raw.disconnect().await;
    }
}

/// A 3.1.1 clean-session-0 session no longer lives forever: `max_session_expiry` seconds
/// after it went offline it is gone (the broker logs it), and the next CONNECT finds none.
#[tokio::test]
async fn v311_persistent_session_expires_after_max_session_expiry() {
    let fx = Fixture::new();
    let cfg = crate::common::ops::config_with_limits(
        &fx,
        "handshake_timeout = 5\nconnect_timeout = 5\nmax_session_expiry = 2",
        BACKEND_FLEET,
    );
    let mut proc = Proc::start(&fx, &cfg).await;
    let client = device_client(&fx, "d1");
    let mut peer = Peer::connect(&client, proc.mqtt, V::V4, "keeper", &persistent()).await;
    assert!(!peer.session_present);
    assert_eq!(peer.subscribe("devices/d1/#", 1).await, 1);
    peer.disconnect().await;
    let line = proc.wait_line("session expired").await;
    assert!(line.contains("keeper"), "{line}");
    let again = Peer::connect(&client, proc.mqtt, V::V4, "keeper", &persistent()).await;
    assert!(!again.session_present, "the expired session was resumed");
}

/// contract §4: a device holds at most `max_retained_per_device` retained topics. One more is
/// refused to an MQTT 5 QoS 1 publisher with 0x97 and a reason string; a QoS 0 one is
/// dropped and counted; neither reaches subscribers. Replacing its own topic and clearing one
/// (which frees the slot) always work.
#[tokio::test]
async fn retained_quota_refuses_v5_and_drops_qos0() {
    let fx = Fixture::new();
    let broker = Broker::start(&config_with_limits(
        &fx,
        "max_retained_per_device = 2",
        BACKEND_FLEET,
    ))
    .await;
    let mut watcher = Raw5::open(&device_client(&fx, "w"), broker.addr, "w").await;
    watcher.sub("r/#", QoS::AtLeastOnce).await;
    let mut d = Raw5::open(&device_client(&fx, "d1"), broker.addr, "p").await;
    for topic in ["r/1", "r/2", "r/2"] {
        let ack = d
            .publish(topic, QoS::AtLeastOnce, true, "v", None)
            .await
            .expect("PUBACK");
        assert_eq!(ack.reason, PubAckReason::Success, "{topic}: {ack:?}");
    }
    let ack = d
        .publish("r/3", QoS::AtLeastOnce, true, "over", None)
        .await
        .expect("PUBACK");
    assert_eq!(ack.reason, PubAckReason::QuotaExceeded, "{ack:?}");
    let text = ack
        .properties
        .and_then(|p| p.reason_string)
        .unwrap_or_default();
    assert!(text.contains("max_retained_per_device"), "{text:?}");
    d.publish("r/4", QoS::AtMostOnce, true, "over", None).await;
    d.publish_ok("r/marker", MARKER.to_vec()).await;
    let seen: Vec<String> = watcher
        .until_payload(MARKER)
        .await
        .into_iter()
        .map(|p| String::from_utf8_lossy(&p.topic).into_owned())
        .collect();
    assert_eq!(
        seen,
        ["r/1", "r/2", "r/2", "r/marker"],
        "refused ones routed"
    );
    assert_eq!(quota_drops(&broker), 2.0);

    // Clearing frees the slot; the refused topic is then taken.
    let ack = d.publish("r/1", QoS::AtLeastOnce, true, "", None).await;
    assert_eq!(ack.expect("PUBACK").reason, PubAckReason::Success);
    let ack = d.publish("r/3", QoS::AtLeastOnce, true, "v3", None).await;
    assert_eq!(ack.expect("PUBACK").reason, PubAckReason::Success);
    let mut fresh = Raw5::open(&device_client(&fx, "f"), broker.addr, "f").await;
    fresh.sub("r/#", QoS::AtMostOnce).await;
    d.publish_ok("r/marker", MARKER.to_vec()).await;
    let retained: BTreeSet<String> = fresh
        .until_payload(MARKER)
        .await
        .into_iter()
        .filter(|p| p.retain)
        .map(|p| String::from_utf8_lossy(&p.topic).into_owned())
        .collect();
    assert_eq!(retained, BTreeSet::from(["r/2".into(), "r/3".into()]));
}

/// MQTT 3.1.1 cannot be told: the message over the quota is acknowledged, not retained, not
/// routed, and counted. The quota is per device: another device still has its own.
#[tokio::test]
async fn retained_quota_drops_v311_and_is_per_device() {
    let fx = Fixture::new();
    let broker = Broker::start(&config_with_limits(
        &fx,
        "max_retained_per_device = 2",
        BACKEND_FLEET,
    ))
    .await;
    let mut e = Peer::connect(
        &device_client(&fx, "e1"),
        broker.addr,
        V::V4,
        "e",
        &Opts::default(),
    )
    .await;
    for topic in ["s/1", "s/2", "s/3"] {
        assert_eq!(e.publish(topic, 1, true, b"v").await, 0);
    }
    assert_eq!(quota_drops(&broker), 1.0);
    let mut other = Peer::connect(
        &device_client(&fx, "e2"),
        broker.addr,
        V::V4,
        "o",
        &Opts::default(),
    )
    .await;
    assert_eq!(other.publish("s/4", 1, true, b"v").await, 0);
    let mut fresh = Peer::connect(
        &device_client(&fx, "f"),
        broker.addr,
        V::V4,
        "f",
        &Opts::default(),
    )
    .await;
    assert_eq!(fresh.subscribe("s/#", 1).await, 1);
    e.publish("s/marker", 1, false, MARKER).await;
    let topics: BTreeSet<String> = fresh
        .recv_until_marker()
        .await
        .into_iter()
        .map(|m| m.topic)
        .collect();
    assert_eq!(
        topics,
        BTreeSet::from(["s/1".into(), "s/2".into(), "s/4".into()])
    );
    assert_eq!(quota_drops(&broker), 1.0);
}

/// The owner of each retained message is stored with it: after a restart the device still
/// holds its slots.
#[tokio::test]
async fn retained_ownership_survives_a_restart() {
    let fx = Fixture::new();
    let cfg = config_with_limits(&fx, "max_retained_per_device = 2", BACKEND_FLEET);
    let broker = Broker::start(&cfg).await;
    let client = device_client(&fx, "d1");
    let mut d = Raw5::open(&client, broker.addr, "p").await;
    for topic in ["r/1", "r/2"] {
        let ack = d.publish(topic, QoS::AtLeastOnce, true, "v", None).await;
        assert_eq!(ack.expect("PUBACK").reason, PubAckReason::Success);
    }
    drop(d);
    broker.stop().await;

    let broker = Broker::start(&cfg).await;
    let mut d = Raw5::open(&client, broker.addr, "p").await;
    let ack = d.publish("r/3", QoS::AtLeastOnce, true, "v", None).await;
    assert_eq!(ack.expect("PUBACK").reason, PubAckReason::QuotaExceeded);
    let ack = d.publish("r/2", QoS::AtLeastOnce, true, "", None).await;
    assert_eq!(ack.expect("PUBACK").reason, PubAckReason::Success);
    let ack = d.publish("r/3", QoS::AtLeastOnce, true, "v", None).await;
    assert_eq!(ack.expect("PUBACK").reason, PubAckReason::Success);
}

/// Retained topics seeded by this many devices, 1,000 each (the default quota).
const SEEDERS: usize = 5;
const PER_SEEDER: usize = 1000;

/// Each seeder pipelines its QoS 1 retained PUBLISHes and waits for every PUBACK.
async fn seed_retained(fx: &Fixture, broker: &Broker) {
    let mut tasks = Vec::new();
    for s in 0..SEEDERS {
        let client = device_client(fx, &format!("seed{s}"));
        let addr = broker.addr;
        tasks.push(tokio::spawn(async move {
            let connect = RawConnect {
                v: V::V4,
                client_id: "seed",
                clean: true,
                keep_alive: 60,
                will: None,
                session_expiry: None,
            };
            let (mut raw, _) = Raw::connect_ok(&client, addr, &connect.bytes()).await;
            let mut burst = Vec::new();
            for i in 0..PER_SEEDER {
                let topic = format!("retained/{s}/{i}");
                let mut p = raw_publish(V::V4, &topic, b"state", 1, i as u16 + 1, false);
                p[0] |= 0x01; // RETAIN
                burst.extend(p);
            }
            raw.send(&burst).await;
            for _ in 0..PER_SEEDER {
                assert_eq!(raw.recv().await[0], PUBACK);
            }
        }));
    }
    for t in tasks {
        t.await.expect("seeder");
    }
}

/// contract §7: "Retained messages matching a new subscription are all delivered, paced by flow
/// control, however many": 5,000 retained topics reach a new `retained/#` subscription of
/// an MQTT 5 and of an MQTT 3.1.1 client, five times `max_queued_messages`.
#[tokio::test]
async fn every_retained_message_reaches_a_new_subscription() {
    let fx = Fixture::new();
    let broker = Broker::start(&config_with_limits(&fx, "", BACKEND_FLEET)).await;
    seed_retained(&fx, &broker).await;
    for (v, qos) in [(V::V5, 1), (V::V4, 1), (V::V5, 0)] {
        let client = device_client(&fx, "reader");
        let mut reader = Peer::connect(&client, broker.addr, v, "reader", &Opts::default()).await;
        assert_eq!(reader.subscribe("retained/#", qos).await, qos);
        let mut topics = BTreeSet::new();
        while topics.len() < SEEDERS * PER_SEEDER {
            let m = reader.recv().await;
            assert!(m.retain, "{m:?}");
            topics.insert(m.topic);
        }
        reader.disconnect().await;
    }
}
