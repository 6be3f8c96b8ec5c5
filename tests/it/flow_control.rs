//! Flow control (contract §9): publishers are paced to their consumers, so a subscriber that
//! keeps reading, however slowly, receives every QoS 1/2 message that was acknowledged; a
//! stalled subscriber paces nobody after `stall_timeout`; and a publisher whose messages do
//! not reach a full session is never slowed. A real broker in this process, real TLS, a
//! raw subscriber that reads at its own pace, rumqttc publishers.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::coretests::both_versions;
use crate::common::coretests::raw::{parse_publish, raw_ack, raw_subscribe, Raw, RawConnect};
use crate::common::coretests::raw::{PUBACK, PUBCOMP, PUBREC};
use crate::common::coretests::{Opts, Peer, V};
use crate::common::ops::{config_with_limits, pinned_backend};
use crate::common::{Broker, Client, Fixture, WAIT};

/// A broker whose sessions queue at most `max_queued` messages, with a fleet anchor and a
/// pinned `backend` that may publish and subscribe anywhere.
async fn broker(max_queued: usize, stall_timeout: u64) -> (Fixture, Broker, Client) {
    let fx = Fixture::new();
    let (section, backend) = pinned_backend(&fx);
    let body = format!("{}\n{section}", Fixture::fleet_anchor(true));
    let limits = format!(
        "handshake_timeout = 5\nconnect_timeout = 5\nmax_queued_messages = {max_queued}\nstall_timeout = {stall_timeout}"
    );
    let broker = Broker::start(&config_with_limits(&fx, &limits, &body)).await;
    (fx, broker, backend)
}

/// A raw subscriber (the backend) on `filter` at `qos`.
async fn subscriber(backend: &Client, broker: &Broker, v: V, filter: &str, qos: u8) -> Raw {
    let connect = RawConnect {
        v,
        client_id: "sub",
        clean: true,
        keep_alive: 60,
        will: None,
        session_expiry: None,
    };
    let (mut raw, _) = Raw::connect_ok(backend, broker.addr, &connect.bytes()).await;
    raw.send(&raw_subscribe(v, 1, filter, qos)).await;
    let suback = raw.recv().await;
    assert_eq!(suback[0], 0x90, "SUBACK expected: {suback:02x?}");
    raw
}

/// Reads PUBLISHes slowly (a pause before each acknowledgement) until `count` distinct
/// payloads arrived; completes the QoS 1/2 flows. Returns the payloads.
async fn read_slowly(raw: &mut Raw, v: V, count: usize, pause: Duration) -> BTreeSet<Vec<u8>> {
    let mut got = BTreeSet::new();
    while got.len() < count {
        let p = raw.recv().await;
        match p[0] & 0xF0 {
            0x30 => {
                let publish = parse_publish(v, &p);
                tokio::time::sleep(pause).await;
                match publish.qos {
                    1 => raw.send(&raw_ack(PUBACK, publish.pkid)).await,
                    2 => raw.send(&raw_ack(PUBREC, publish.pkid)).await,
                    _ => {}
                }
                got.insert(publish.payload);
            }
            0x60 => {
                let pkid = u16::from_be_bytes([p[2], p[3]]);
                raw.send(&raw_ack(PUBCOMP, pkid)).await;
            }
            other => panic!("unexpected packet {other:#x}: {p:02x?}"),
        }
    }
    got
}

/// Four publishers, each as fast as its acknowledgements allow, into one subscriber that
/// reads slowly through a queue of 10: every acknowledged message arrives.
async fn slow_reader_gets_everything(v: V, qos: u8) {
    const PUBLISHERS: u8 = 4;
    const EACH: u16 = 60;
    let (fx, broker, backend) = broker(10, 30).await;
    let mut sub = subscriber(&backend, &broker, v, "devices/+/t", qos).await;
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let creds = fx.client(&fx.device(&format!("p{p}.devices.example.com")));
        let mut peer =
            Peer::connect(&creds, broker.addr, v, &format!("p{p}"), &Opts::default()).await;
        tasks.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            for i in 0..EACH {
                let payload = [&[p][..], &i.to_be_bytes()[..]].concat();
                codes.push(
                    peer.publish(&format!("devices/p{p}/t"), qos, false, &payload)
                        .await,
                );
            }
            codes
        }));
    }
    let total = usize::from(PUBLISHERS) * usize::from(EACH);
    let got = tokio::time::timeout(
        WAIT * 4,
        read_slowly(&mut sub, v, total, Duration::from_millis(2)),
    )
    .await
    .expect("every message in time");
    for t in tasks {
        let codes = t.await.expect("publisher");
        assert!(codes.iter().all(|c| *c == 0), "acknowledgements: {codes:?}");
    }
    assert_eq!(got.len(), total);
    assert_eq!(broker.metrics.messages_sent.get() as usize, total);
}

both_versions! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    slow_subscriber_gets_every_qos1_message_v311,
    slow_subscriber_gets_every_qos1_message_v5 => |v| slow_reader_gets_everything(v, 1);
}

both_versions! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    slow_subscriber_gets_every_qos2_message_v311,
    slow_subscriber_gets_every_qos2_message_v5 => |v| slow_reader_gets_everything(v, 2);
}

/// A subscriber that never reads fills its queue and paces its publisher; a publisher to
/// another topic, read by another subscriber, is not slowed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_session_does_not_slow_an_unrelated_publisher() {
    let (fx, broker, backend) = broker(5, 60).await;
    // `stuck` subscribes to topic A and never reads again.
    let _stuck = subscriber(&backend, &broker, V::V5, "devices/pa/#", 1).await;
    let creds_a = fx.client(&fx.device("pa.devices.example.com"));
    let pa = Peer::connect(&creds_a, broker.addr, V::V5, "pa", &Opts::default()).await;
    let paced = tokio::spawn(async move {
        // Enough to fill the subscriber's window (64), its queue (5) and its socket.
        for _ in 0..20_000u32 {
            pa.publish_nowait("devices/pa/t", 1, false, &[0u8; 512])
                .await;
        }
        pa
    });
    // Topic B, read normally.
    let mut reader = Peer::connect(&backend, broker.addr, V::V5, "r", &Opts::default()).await;
    assert_eq!(reader.subscribe("devices/pb/#", 1).await, 1);
    let creds_b = fx.client(&fx.device("pb.devices.example.com"));
    let mut pb = Peer::connect(&creds_b, broker.addr, V::V5, "pb", &Opts::default()).await;
    // Wait until A is really paced: the stuck subscriber's window (64) and queue (5) are
    // full, and one more message waits for room.
    let held = 64 + 5 + 1;
    tokio::time::timeout(WAIT, async {
        while broker.metrics.messages_received.get() < held {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("publisher A got going: {}", broker.metrics.render()));
    for i in 0..100u8 {
        assert_eq!(pb.publish("devices/pb/b", 1, false, &[i]).await, 0);
    }
    for i in 0..100u8 {
        assert_eq!(reader.recv().await.payload, [i]);
    }
    // A is still held: nothing more of it was taken while B went through.
    let received = broker.metrics.messages_received.get();
    assert_eq!(received, held + 100, "publisher A was not paced");
    paced.abort();
}

/// Smoke check of the stall rule with a generous bound (the timing itself is a
/// paused-time unit test in `broker::state`): a subscriber that stops reading paces its
/// publisher only for `stall_timeout`, then its messages are dropped and counted, and
/// the publisher goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_stops_pacing_after_stall_timeout() {
    let (fx, broker, backend) = broker(5, 1).await;
    let _stuck = subscriber(&backend, &broker, V::V5, "devices/p/#", 1).await;
    let creds = fx.client(&fx.device("p.devices.example.com"));
    let mut p = Peer::connect(&creds, broker.addr, V::V5, "p", &Opts::default()).await;
    // The window (64) and the queue (5) fill, then the publisher is paced, then released.
    let mut codes = Vec::new();
    for i in 0..200u8 {
        codes.push(p.publish("devices/p/t", 1, false, &[i]).await);
    }
    assert!(codes.iter().all(|c| *c == 0 || *c == 0x97), "{codes:?}");
    let dropped = crate::common::ops::metric(
        &broker.metrics.render(),
        "certmq_messages_dropped_total{reason=\"stalled\"}",
    );
    assert!(
        dropped.unwrap_or(0.0) > 0.0,
        "drops to the stalled subscriber are counted"
    );
}
