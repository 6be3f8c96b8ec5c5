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

/// `a/#` has the consumers `a` and `a.>`, and the filter `a` has `a` too: one durable
/// consumer for both. Removing the filter `a` (UNSUBSCRIBE while offline afterwards, or a
/// QoS 0 SUBSCRIBE replacing it while online) keeps that consumer, so every QoS 1 message
/// `a/#` still matches arrives, online and after a resume on the other node.
#[tokio::test]
async fn removing_one_of_two_overlapping_filters_keeps_what_the_other_receives() {
    use crate::common::coretests::raw::{raw_ack, Pkt, Raw};
    let Some(t) = Two::start().await else { return };
    let mut pb = Peer::connect(&t.backend, t.b.mqtt, V::V4, "pub-ov", &Opts::default()).await;

    // 1. Online: `ov2` replaced by a QoS 0 subscription while `ov2/#` at QoS 1 stays.
    let mut dev = Peer::connect(&t.backend, t.a.mqtt, V::V5, "ov-down", &persistent()).await;
    assert_eq!(dev.subscribe("ov2/#", 1).await, 1);
    assert_eq!(dev.subscribe("ov2", 1).await, 1);
    assert_eq!(dev.subscribe("ov2", 0).await, 0);
    assert_eq!(pb.publish("ov2", 1, false, b"parent").await, 0);
    assert_eq!(pb.publish("ov2/x", 1, false, b"child").await, 0);
    let want2: BTreeSet<String> = ["ov2", "ov2/x"].map(String::from).into();
    let want1: BTreeSet<String> = ["ov1", "ov1/x"].map(String::from).into();
    // Each wait ends with the set complete, or after 8 s: less than JetStream's
    // acknowledgement wait (10 s), so a message that only came back after it (left in a
    // pull request of the node the device left) fails the test.
    let mut got = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while got != want2 {
        match tokio::time::timeout_at(deadline, dev.try_recv()).await {
            Ok(Some(m)) => {
                got.insert(m.topic);
            }
            _ => break,
        }
    }
    let online = got.clone();

    // 2. Offline: `ov1` unsubscribed while `ov1/#` stays; the device resumes on b.
    let (mut raw, _) = Raw::connect_session(&t.backend, t.a.mqtt, "ov-unsub", false, None).await;
    assert_eq!(raw.subscribe("ov1/#", 1).await, 1);
    assert_eq!(raw.subscribe("ov1", 1).await, 1);
    let mut unsub = vec![0xA2, 7, 0, 2, 0, 3];
    unsub.extend_from_slice(b"ov1");
    raw.send(&unsub).await;
    assert!(matches!(raw.try_recv().await, Ok(Pkt::Other(p)) if p[0] == 0xB0));
    raw.disconnect().await;
    assert_eq!(pb.publish("ov1", 1, false, b"parent").await, 0);
    assert_eq!(pb.publish("ov1/x", 1, false, b"child").await, 0);
    let (mut raw, present) =
        Raw::connect_session(&t.backend, t.b.mqtt, "ov-unsub", false, None).await;
    assert!(present);
    let mut offline = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while offline != want1 {
        match tokio::time::timeout_at(deadline, raw.try_recv()).await {
            Ok(Ok(Pkt::Publish { topic, pkid, .. })) => {
                raw.send(&raw_ack(0x40, pkid)).await;
                offline.insert(topic);
            }
            _ => break,
        }
    }
    assert_eq!(
        (online, offline),
        (want2, want1),
        "every QoS 1 message a remaining subscription (`ov2/#`, `ov1/#`) matches"
    );
}

/// One node, no move, no failure: a QoS 2 subscriber whose backlog takes longer to drain
/// than JetStream's acknowledgement wait (10 s), behind a queue of 4, gets every message
/// exactly once. The node pulls no more than the queue takes, and a copy JetStream sends
/// again of a message the session still holds or already acknowledged is not queued.
#[tokio::test]
async fn a_slow_qos2_subscriber_on_one_node_gets_each_message_once() {
    use crate::common::coretests::raw::{raw_ack, Pkt, Raw, PUBCOMP, PUBREC, PUBREL};
    use crate::common::nats::Nats;
    use crate::common::ops::{pinned, Proc, BACKEND_PROFILE};
    use crate::common::{self_signed, Fixture};
    let Some(nats) = Nats::start() else { return };
    let fx = Fixture::new();
    let cert = self_signed("backend");
    fx.write("backend.pem", &cert.cert_pem);
    let backend = crate::common::Client::new(&fx, &cert.cert_pem, &cert.key_pem);
    let text = format!(
        "[server]\nbind = \"127.0.0.1:0\"\nadmin_bind = \"127.0.0.1:0\"\ncert_chain = \"server.pem\"\nprivate_key = \"server.key\"\ndata_dir = \"data-a\"\n\n[limits]\nhandshake_timeout = 5\nconnect_timeout = 5\nmax_inflight = 2\nmax_queued_messages = 4\n\n[cluster]\nnode = \"a\"\nnats = [\"{}\"]\n\n{}\n{}\n{BACKEND_PROFILE}\n",
        nats.url(),
        Fixture::fleet_anchor(true),
        pinned("backend", "backend.pem", "backend")
    );
    let config = fx.write("certmq-a.toml", &text);
    let a = Proc::start(&fx, &config).await;
    let (mut raw, _) = Raw::connect_session(&backend, a.mqtt, "slow", false, None).await;
    assert_eq!(raw.subscribe("slow/#", 2).await, 2);
    let mut p = Peer::connect(&backend, a.mqtt, V::V4, "fast", &Opts::default()).await;
    let total = 40;
    for i in 0..total {
        assert_eq!(p.publish(&format!("slow/{i}"), 2, false, b"m").await, 0);
    }
    let mut got: Vec<String> = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(12), raw.try_recv()).await {
            Ok(Ok(Pkt::Publish {
                topic,
                pkid,
                qos: 2,
                ..
            })) => {
                got.push(topic);
                tokio::time::sleep(Duration::from_millis(500)).await;
                raw.send(&raw_ack(PUBREC, pkid)).await;
            }
            Ok(Ok(Pkt::Ack {
                kind: PUBREL, pkid, ..
            })) => raw.send(&raw_ack(PUBCOMP, pkid)).await,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => break,
        }
    }
    let unique: BTreeSet<&String> = got.iter().collect();
    let twice: BTreeSet<&String> = got
        .iter()
        .filter(|t| got.iter().filter(|u| u == t).count() > 1)
        .collect();
    eprintln!(
        "received {} PUBLISH, {} distinct; twice: {:?}",
        got.len(),
        unique.len(),
        twice
    );
    assert_eq!(unique.len(), total, "every message");
    assert!(
        twice.is_empty(),
        "QoS 2 delivered twice on one node: {twice:?}"
    );
}

/// Every node of a cluster restarts (here its only one): the runs that held its offline
/// sessions ended unseen by any node alive. A session whose expiry (2 s) passed is not
/// resumed (Session Present 0) but discarded, whichever of the resume and the sweep
/// comes first; one nobody comes back for is removed by the sweep on its own.
#[tokio::test]
async fn sessions_of_a_restarted_cluster_expire() {
    use crate::common::cluster::{node_config, start_node};
    use crate::common::coretests::raw::Raw;
    use crate::common::nats::Nats;
    use crate::common::ops::{pinned, Proc, BACKEND_PROFILE};
    use crate::common::{self_signed, Fixture};
    let Some(nats) = Nats::start() else { return };
    let fx = Fixture::new();
    let cert = self_signed("backend");
    fx.write("backend.pem", &cert.cert_pem);
    let backend = crate::common::Client::new(&fx, &cert.cert_pem, &cert.key_pem);
    let body = format!(
        "{}\n{}\n{BACKEND_PROFILE}",
        Fixture::fleet_anchor(true),
        pinned("backend", "backend.pem", "backend")
    );
    let a = start_node(&fx, &nats, "a", &body).await;
    for id in ["brief", "left"] {
        let (mut raw, present) = Raw::connect_session(&backend, a.mqtt, id, false, Some(2)).await;
        assert!(!present);
        assert_eq!(raw.subscribe(&format!("{id}/#"), 1).await, 1);
        raw.disconnect().await;
    }
    let gone = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.kill();
    let a = Proc::start(&fx, &node_config(&fx, &nats, "a", &body)).await;
    // Just past the expiry: most likely before the sweep came to it (the resume
    // discards it then), and the test holds either way.
    tokio::time::sleep_until(gone + Duration::from_secs(3)).await;
    let (_raw, present) = Raw::connect_session(&backend, a.mqtt, "brief", false, Some(2)).await;
    assert!(
        !present,
        "a session whose 2 s expiry passed is resumed:\n{}",
        a.stderr()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !a
        .stderr()
        .lines()
        .any(|l| l.contains("session expired after its node died; removed") && l.contains("left"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the session nobody resumed is not removed within 30 s:\n{}",
            a.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_raw, present) = Raw::connect_session(&backend, a.mqtt, "left", false, Some(2)).await;
    assert!(!present, "the swept session is gone");
    for l in a.stderr().lines().filter(|l| l.contains("session expired")) {
        eprintln!("{l}");
    }
}

/// The claim decides who writes a session's record: a device opens its session on a
/// (whose session writer is busy with another session's long SUBSCRIBE), leaves at once
/// and opens the session on b. a's queued "open" write comes after b claimed the session
/// and wrote the record: it is not written (a no longer holds the claim), so b's later
/// SUBSCRIBE is recorded with its consumer, and a QoS 1 message published after its
/// SUBACK arrives. Before, a's late write marked the record as a's, and b skipped its
/// own writes as "held by another node" while answering SUBACK with success.
#[tokio::test]
async fn a_late_open_write_of_the_previous_node_does_not_strand_the_session() {
    use crate::common::coretests::raw::{raw_ack, raw_subscribe_many, Pkt, Raw, PUBACK};
    let Some(t) = Two::start().await else { return };
    // Keep a's writer busy: 300 filters, each a record update and two consumers.
    let (mut busy, _) = Raw::connect_session(&t.backend, t.a.mqtt, "busy", false, None).await;
    let names: Vec<String> = (0..300).map(|i| format!("busy/{i}/#")).collect();
    let filters: Vec<(&str, u8)> = names.iter().map(|n| (n.as_str(), 1)).collect();
    busy.send(&raw_subscribe_many(V::V4, 7, &filters)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (victim, _) = Raw::connect_session(&t.backend, t.a.mqtt, "victim", false, None).await;
    victim.disconnect().await;
    let (mut victim, _) = Raw::connect_session(&t.backend, t.b.mqtt, "victim", false, None).await;
    // Wait until a's writer is through its backlog (the SUBACK of the 300 filters).
    loop {
        match busy.try_recv().await.expect("SUBACK") {
            Pkt::SubAck { pkid: 7, .. } => break,
            _ => continue,
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(victim.subscribe("vic/#", 1).await, 1);
    let mut pb = Peer::connect(&t.backend, t.b.mqtt, V::V4, "pub-vic", &Opts::default()).await;
    assert_eq!(pb.publish("vic/1", 1, false, b"after SUBACK").await, 0);
    match tokio::time::timeout(Duration::from_secs(5), victim.try_recv()).await {
        Ok(Ok(Pkt::Publish { topic, pkid, .. })) => {
            victim.send(&raw_ack(PUBACK, pkid)).await;
            assert_eq!(topic, "vic/1");
        }
        other => panic!(
            "a QoS 1 message published after a successful SUBACK never arrived ({other:?}):\n--- a\n{}\n--- b\n{}",
            t.a.stderr(),
            t.b.stderr()
        ),
    }
}

/// The `ps-` consumers of persistent sessions on the message stream, by name.
async fn session_consumers(nats: &crate::common::nats::Nats) -> BTreeSet<String> {
    let client = async_nats::connect(nats.url()).await.expect("NATS");
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("certmq_msgs").await.expect("message stream");
    let mut names = stream.consumer_names();
    let mut all = BTreeSet::new();
    while let Some(name) = futures_util::StreamExt::next(&mut names).await {
        let name = name.expect("consumer name");
        if name.starts_with("ps-") {
            all.insert(name);
        }
    }
    all
}

/// A resumed session whose record lists a QoS 1 subscription without its consumer (the
/// consumer was lost: deleted here behind the broker's back, as a failed creation would
/// leave it) gets the consumer created again by the node that pulls it, instead of
/// pulling a consumer that does not exist forever: a message published afterwards
/// arrives.
#[tokio::test]
async fn a_resumed_session_creates_the_consumer_its_subscription_lacks() {
    use crate::common::coretests::raw::{raw_ack, Pkt, Raw, PUBACK};
    let Some(t) = Two::start().await else { return };
    let (mut raw, _) = Raw::connect_session(&t.backend, t.a.mqtt, "lacks", false, None).await;
    assert_eq!(raw.subscribe("lacks/#", 1).await, 1);
    raw.disconnect().await;
    let before = session_consumers(&t._nats).await;
    assert_eq!(before.len(), 2, "`lacks` and `lacks.>`: {before:?}");
    let client = async_nats::connect(t._nats.url()).await.expect("NATS");
    let stream = async_nats::jetstream::new(client)
        .get_stream("certmq_msgs")
        .await
        .expect("message stream");
    for name in &before {
        stream.delete_consumer(name).await.expect("deleted");
    }

    let (mut raw, present) = Raw::connect_session(&t.backend, t.b.mqtt, "lacks", false, None).await;
    assert!(present);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while session_consumers(&t._nats).await != before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lost consumers were not created again:\n--- b\n{}",
            t.b.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut pa = Peer::connect(&t.backend, t.a.mqtt, V::V4, "pub-lacks", &Opts::default()).await;
    assert_eq!(pa.publish("lacks/1", 1, false, b"after").await, 0);
    match tokio::time::timeout(Duration::from_secs(5), raw.try_recv()).await {
        Ok(Ok(Pkt::Publish { topic, pkid, .. })) => {
            raw.send(&raw_ack(PUBACK, pkid)).await;
            assert_eq!(topic, "lacks/1");
        }
        other => panic!("the message never arrived ({other:?})"),
    }
}

/// Removing a session (here a clean start on b) deletes the record only at the revision it
/// read: a connection on a that resumed the session meanwhile, and wrote the record, keeps
/// it, so the session is there when the device comes back. Before, b deleted the record
/// unconditionally after deleting the session's 600 consumers, by which time a had
/// written it: the resumed session's record was gone.
#[tokio::test]
async fn removing_a_session_leaves_a_record_rewritten_meanwhile() {
    use crate::common::coretests::raw::Raw;
    let Some(t) = Two::start().await else { return };
    let (mut dev, _) = Raw::connect_session(&t.backend, t.a.mqtt, "torn", false, None).await;
    let names: Vec<String> = (0..300).map(|i| format!("torn/{i}/#")).collect();
    let filters: Vec<(&str, u8)> = names.iter().map(|n| (n.as_str(), 1)).collect();
    assert_eq!(dev.subscribe_many(7, &filters).await, vec![1; 300]);
    dev.disconnect().await;

    // A clean start on b removes the session (600 consumers, then the record) while the
    // device resumes it on a.
    let (backend, b) = (t.backend.clone(), t.b.mqtt);
    let clean =
        tokio::spawn(async move { Raw::connect_session(&backend, b, "torn", true, None).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (dev, _) = Raw::connect_session(&t.backend, t.a.mqtt, "torn", false, None).await;
    let _ = clean.await;
    // Once b's removal is over (b's writer answered the clean start's barrier).
    tokio::time::sleep(Duration::from_secs(3)).await;
    dev.disconnect().await;
    // On b, which reads the record (a would resume the session it holds in memory).
    let (_dev, present) = Raw::connect_session(&t.backend, t.b.mqtt, "torn", false, None).await;
    assert!(
        present,
        "the session resumed on a was removed by the clean start it came after:\n--- a\n{}\n--- b\n{}",
        t.a.stderr(),
        t.b.stderr()
    );
}
