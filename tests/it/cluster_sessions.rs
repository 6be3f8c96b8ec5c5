//! Persistent sessions in cluster mode (contract §12, docs/cluster.md "Persistent
//! sessions"): a session resumes on any node, after its node was killed included, with
//! everything acknowledged to publishers while it was away.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::cluster::Two;
use crate::common::coretests::{Msg, Opts, Peer, V};

fn persistent() -> Opts {
    Opts {
        clean: false,
        will: None,
    }
}

/// Receives until `want` distinct topics arrived; returns them and every copy received.
async fn topics(peer: &mut Peer, want: usize) -> (BTreeSet<String>, Vec<Msg>) {
    let mut seen = BTreeSet::new();
    let mut all = Vec::new();
    while seen.len() < want {
        let m = peer.recv().await;
        seen.insert(m.topic.clone());
        all.push(m);
    }
    (seen, all)
}

/// Nothing more arrives within a short while.
async fn quiet(peer: &mut Peer) -> Option<Msg> {
    tokio::time::timeout(Duration::from_millis(700), peer.try_recv())
        .await
        .ok()
        .flatten()
}

#[tokio::test]
async fn a_persistent_session_moves_to_another_node_with_what_was_published_while_away() {
    let Some(t) = Two::start().await else { return };
    for v in [V::V4, V::V5] {
        let id = format!("mover-{v:?}");
        let base = format!("away/{v:?}");
        let mut dev = Peer::connect(&t.backend, t.a.mqtt, v, &id, &persistent()).await;
        assert!(!dev.session_present);
        assert_eq!(dev.subscribe(&format!("{base}/#"), 2).await, 2);
        dev.disconnect().await;

        // Acknowledged on both nodes while the device is away, at QoS 1 and 2.
        let mut pa = Peer::connect(
            &t.backend,
            t.a.mqtt,
            v,
            &format!("pa-{v:?}"),
            &Opts::default(),
        )
        .await;
        let mut pb = Peer::connect(
            &t.backend,
            t.b.mqtt,
            v,
            &format!("pb-{v:?}"),
            &Opts::default(),
        )
        .await;
        let mut want = BTreeSet::new();
        for i in 0..3 {
            let (ta, tb) = (format!("{base}/a{i}"), format!("{base}/b{i}"));
            assert_eq!(pa.publish(&ta, 1, false, b"from a").await, 0);
            assert_eq!(pb.publish(&tb, 2, false, b"from b").await, 0);
            want.insert(ta);
            want.insert(tb);
        }

        let mut dev = Peer::connect(&t.backend, t.b.mqtt, v, &id, &persistent()).await;
        assert!(
            dev.session_present,
            "{v:?}: the session resumes on the other node"
        );
        let (seen, all) = topics(&mut dev, want.len()).await;
        assert_eq!(seen, want, "{v:?}: everything published while away");
        assert_eq!(all.len(), want.len(), "{v:?}: each once: {all:?}");
        assert!(all.iter().all(|m| m.qos >= 1), "{all:?}");

        // The subscription came along: live messages from both nodes reach it on b.
        let live_a = format!("{base}/live-a");
        pa.publish(&live_a, 1, false, b"live").await;
        assert_eq!(dev.recv().await.topic, live_a);
        let live_b = format!("{base}/live-b");
        pb.publish(&live_b, 1, false, b"live").await;
        assert_eq!(dev.recv().await.topic, live_b);
        assert_eq!(quiet(&mut dev).await, None, "{v:?}: nothing twice");

        // Back to the first node: still the same session, nothing left over.
        dev.disconnect().await;
        let back_a = format!("{base}/back");
        pb.publish(&back_a, 1, false, b"back").await;
        let mut dev = Peer::connect(&t.backend, t.a.mqtt, v, &id, &persistent()).await;
        assert!(dev.session_present, "{v:?}: and back to the first node");
        assert_eq!(dev.recv().await.topic, back_a);
        assert_eq!(
            quiet(&mut dev).await,
            None,
            "{v:?}: nothing twice after moving back"
        );
        dev.disconnect().await;
    }
}

#[tokio::test]
async fn a_persistent_session_outlives_the_kill_of_its_node() {
    let Some(t) = Two::start().await else { return };
    let mut dev = Peer::connect(&t.backend, t.a.mqtt, V::V5, "survivor", &persistent()).await;
    assert_eq!(dev.subscribe("crash/#", 1).await, 1);
    t.a.kill();
    let _ = dev.closed().await;

    let mut pb = Peer::connect(&t.backend, t.b.mqtt, V::V4, "pb", &Opts::default()).await;
    let want: BTreeSet<String> = (0..5).map(|i| format!("crash/{i}")).collect();
    for topic in &want {
        assert_eq!(pb.publish(topic, 1, false, b"while a is dead").await, 0);
    }
    let mut dev = Peer::connect(&t.backend, t.b.mqtt, V::V5, "survivor", &persistent()).await;
    assert!(dev.session_present, "resumed on the survivor");
    let (seen, all) = topics(&mut dev, want.len()).await;
    assert_eq!(seen, want);
    assert_eq!(all.len(), want.len(), "each once: {all:?}");
}

#[tokio::test]
async fn a_clean_start_on_another_node_discards_the_session_the_cluster_held() {
    let Some(t) = Two::start().await else { return };
    let mut dev = Peer::connect(&t.backend, t.a.mqtt, V::V5, "fresh", &persistent()).await;
    assert_eq!(dev.subscribe("gone/#", 1).await, 1);
    dev.disconnect().await;
    let clean = Peer::connect(&t.backend, t.b.mqtt, V::V5, "fresh", &Opts::default()).await;
    assert!(!clean.session_present);
    clean.disconnect().await;

    let mut pa = Peer::connect(&t.backend, t.a.mqtt, V::V5, "pa", &Opts::default()).await;
    assert_eq!(pa.publish("gone/1", 1, false, b"nobody").await, 0);
    let mut dev = Peer::connect(&t.backend, t.a.mqtt, V::V5, "fresh", &persistent()).await;
    assert!(
        !dev.session_present,
        "the clean start discarded it in the cluster"
    );
    assert_eq!(quiet(&mut dev).await, None);
}

/// A QoS 1 stream into a persistent subscriber whose node is killed in the middle: the
/// subscriber resumes on the other node and gets every message its publisher had
/// acknowledged, including those the dead node had pulled but not delivered (they come
/// back once JetStream's acknowledgement wait passes).
#[tokio::test]
async fn a_persistent_subscriber_whose_node_is_killed_mid_stream_loses_nothing_acknowledged() {
    let Some(t) = Two::start().await else { return };
    let mut sub = Peer::connect(&t.backend, t.a.mqtt, V::V5, "reader", &persistent()).await;
    assert_eq!(sub.subscribe("feed/#", 1).await, 1);
    let mut publisher =
        Peer::connect(&t.backend, t.b.mqtt, V::V5, "writer", &Opts::default()).await;
    let total = 400usize;
    let mut received = BTreeSet::new();
    for i in 0..total {
        assert_eq!(
            publisher
                .publish(&format!("feed/{i}"), 1, false, b"m")
                .await,
            0
        );
        if i == total / 2 {
            // Some arrived on a; kill it with the rest of the stream still coming.
            while received.len() < 10 {
                received.insert(sub.recv().await.topic);
            }
            t.a.kill();
            break;
        }
    }
    for i in total / 2 + 1..total {
        assert_eq!(
            publisher
                .publish(&format!("feed/{i}"), 1, false, b"m")
                .await,
            0
        );
    }
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(50), sub.try_recv()).await {
        received.insert(m.topic);
    }
    let mut sub = Peer::connect(&t.backend, t.b.mqtt, V::V5, "reader", &persistent()).await;
    assert!(sub.session_present);
    let want: BTreeSet<String> = (0..total).map(|i| format!("feed/{i}")).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while received != want && std::time::Instant::now() < deadline {
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(1), sub.try_recv()).await {
            received.insert(m.topic);
        }
    }
    let missing: Vec<&String> = want.difference(&received).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged messages never arrived: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

/// A persistent session whose node died is ended by a survivor once its expiry passed
/// (counted from the node's death for a session that was connected then).
#[tokio::test]
async fn the_session_of_a_dead_node_expires_on_a_survivor() {
    use crate::common::coretests::raw::Raw;
    let Some(t) = Two::start().await else { return };
    let (mut raw, present) =
        Raw::connect_session(&t.backend, t.a.mqtt, "short", false, Some(2)).await;
    assert!(!present);
    assert_eq!(raw.subscribe("short/#", 1).await, 1);
    t.a.kill();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !t
        .b
        .stderr()
        .contains("session expired after its node died; removed")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "not removed within 60 s:\n{}",
            t.b.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_raw, present) = Raw::connect_session(&t.backend, t.b.mqtt, "short", false, Some(2)).await;
    assert!(!present, "the expired session is gone");
}

/// contract §12: while NATS is away, a persistent session the cluster holds cannot be
/// read, so resuming it on a node that does not hold it is refused as server unavailable
/// (3.1.1 code 3, MQTT 5 0x88) with the reason logged; it is never answered with a fresh
/// session, which would strand what the cluster kept. With NATS back, the same CONNECT
/// resumes the session with the message acknowledged while the device was away.
#[tokio::test]
async fn resuming_a_cluster_session_without_nats_is_refused_until_nats_is_back() {
    use crate::common::coretests::raw::{Pkt, Raw, RawConnect};
    let Some(mut t) = Two::start().await else {
        return;
    };
    let mut pa = Peer::connect(&t.backend, t.a.mqtt, V::V5, "pa", &Opts::default()).await;
    for v in [V::V4, V::V5] {
        let id = format!("held-{v:?}");
        let mut dev = Peer::connect(&t.backend, t.a.mqtt, v, &id, &persistent()).await;
        assert_eq!(dev.subscribe(&format!("held/{v:?}/#"), 1).await, 1);
        dev.disconnect().await;
        assert_eq!(
            pa.publish(&format!("held/{v:?}/kept"), 1, false, b"kept")
                .await,
            0
        );
    }

    t._nats.stop();
    for (v, unavailable) in [(V::V4, 3), (V::V5, 0x88)] {
        let id = format!("held-{v:?}");
        let connect = RawConnect {
            clean: false,
            session_expiry: (v == V::V5).then_some(3600),
            ..RawConnect::new(v, &id)
        };
        match Raw::try_connect(&t.backend, t.b.mqtt, &connect.bytes()).await {
            Ok((_, Pkt::ConnAck { present, code })) => {
                assert_eq!((present, code), (false, unavailable), "{v:?}")
            }
            other => panic!(
                "{v:?}: expected a refusing CONNACK, got {:?}",
                other.map(|(_, p)| p)
            ),
        }
        let line = t.b.wait_line("cluster_unavailable").await;
        assert!(line.contains("persistent session"), "{line}");
    }

    t._nats.restart();
    t.b.wait_line("connected to NATS").await;
    for v in [V::V4, V::V5] {
        let id = format!("held-{v:?}");
        let connect = RawConnect {
            clean: false,
            session_expiry: (v == V::V5).then_some(3600),
            ..RawConnect::new(v, &id)
        };
        // JetStream may still be recovering its streams for a moment after the reconnect:
        // the refusal then stands, and the device tries again.
        let deadline = tokio::time::Instant::now() + crate::common::WAIT;
        let mut raw = loop {
            match Raw::try_connect(&t.backend, t.b.mqtt, &connect.bytes()).await {
                Ok((raw, Pkt::ConnAck { present, code: 0 })) => {
                    assert!(present, "{v:?}: the session the cluster held");
                    break raw;
                }
                Ok((_, Pkt::ConnAck { code, .. })) if code == 3 || code == 0x88 => {}
                other => panic!("{v:?}: unexpected answer {:?}", other.map(|(_, p)| p)),
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{v:?}: still refused after NATS came back"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        match raw.try_recv().await {
            Ok(Pkt::Publish { topic, qos: 1, .. }) => {
                assert_eq!(topic, format!("held/{v:?}/kept"))
            }
            other => panic!("{v:?}: expected the kept message, got {other:?}"),
        }
    }
}
