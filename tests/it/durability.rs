//! contract §7 end to end: acknowledged means kept. The broker runs as a real `certmq serve`
//! child process and is SIGKILLed (`kill -9`) at seeded pseudo-random points; every
//! message it acknowledged must come out after a restart on the same `data_dir`, QoS 2
//! exactly once, retained messages and provisioned devices included. A full disk refuses
//! what it cannot keep and recovers when space returns; a corrupt or foreign database is a
//! clear startup error that leaves the file alone.
//!
//! Replay a failing run with `CERTMQ_DURABILITY_SEED=<seed printed by the test>`.

use std::collections::BTreeSet;

use crate::common::coretests::both_versions;
use crate::common::coretests::raw::{
    raw_ack, raw_publish, raw_publish_flags, Pkt, Raw, RawConnect, PUBACK, PUBCOMP, PUBREC, PUBREL,
};
use crate::common::coretests::V;
use crate::common::durability::flows::{payload, publish_numbers, Receiver, MARKER};
use crate::common::durability::world::{
    create_offline_subscriber, drain_to_marker, seed, stream_then_kill, topic, World,
};
use crate::common::durability::{fill, Rng, Tmpfs};
use crate::common::ops::{serve_expecting_exit, Proc};
use crate::common::Fixture;
use tokio::sync::mpsc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_every_acknowledged_message_survives_repeated_kill_9() {
    const CYCLES: usize = 20;
    let w = World::new("max_queued_messages = 100000");
    let mut rng = Rng::new(seed(0x00d1_ab1e));
    let mut acked = BTreeSet::new();
    let mut next = 0u32;
    for cycle in 0..CYCLES {
        let broker = Proc::start(&w.fx, &w.config).await;
        if cycle == 0 {
            create_offline_subscriber(&w, &broker, 1).await;
        }
        let per = rng.range(10, 40);
        let kill_at = rng.range(0, 2 * per);
        let got = stream_then_kill(&w, broker, 1, next, per, kill_at).await;
        eprintln!(
            "cycle {cycle}: {} of {} acknowledged (kill after {kill_at})",
            got.len(),
            2 * per
        );
        acked.extend(got);
        next += 2 * per as u32;
    }
    assert!(
        acked.len() >= CYCLES * 5,
        "too few messages were acknowledged for the test to mean much: {}",
        acked.len()
    );
    let mut s = Receiver::default();
    drain_to_marker(&w, &mut s).await;
    let lost: Vec<_> = acked.iter().filter(|n| !s.got.contains_key(n)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost after kill -9: {lost:?}",
        lost.len(),
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_every_acknowledged_message_arrives_exactly_once_across_kill_9() {
    const CYCLES: usize = 8;
    let w = World::new("max_queued_messages = 100000");
    let mut rng = Rng::new(seed(0x0e2a_c71e));
    let mut acked = BTreeSet::new();
    let mut rx = Receiver::default();
    let mut next = 0u32;
    let mut killed_while_draining = 0;
    for cycle in 0..CYCLES {
        let broker = Proc::start(&w.fx, &w.config).await;
        if cycle == 0 {
            create_offline_subscriber(&w, &broker, 2).await;
        }
        let per = rng.range(10, 30);
        if cycle % 2 == 0 {
            let kill_at = rng.range(0, 2 * per);
            acked.extend(stream_then_kill(&w, broker, 2, next, per, kill_at).await);
        } else {
            // S drains while fresh messages arrive; the kill lands in the middle of its
            // PUBLISH / PUBREC / PUBREL / PUBCOMP exchanges.
            let (mut s, present) =
                Raw::connect_session(&w.backend, broker.mqtt, "S", false, None).await;
            assert!(present);
            let stop = rng.range(1, 2 * per);
            let addr = broker.mqtt;
            let (tx, mut acks) = mpsc::unbounded_channel();
            let publisher = tokio::spawn(publish_numbers(
                w.device("dev-1"),
                addr,
                "pub-dev-1".into(),
                topic("dev-1"),
                2,
                (next..next + 2 * per as u32).collect(),
                tx,
            ));
            let reached = rx.run(&mut s, Some(stop)).await;
            assert_eq!(reached, Ok(false), "S draining:\n{}", broker.stderr());
            broker.kill();
            killed_while_draining += 1;
            while let Some(n) = acks.recv().await {
                acked.insert(n);
            }
            publisher.await.expect("publisher task");
        }
        next += 2 * per as u32;
    }
    drain_to_marker(&w, &mut rx).await;
    assert!(killed_while_draining >= 3);
    assert!(acked.len() >= 20, "too few acknowledged: {}", acked.len());
    let lost: Vec<_> = acked.iter().filter(|n| !rx.got.contains_key(n)).collect();
    assert!(
        lost.is_empty(),
        "acknowledged QoS 2 messages lost: {lost:?}"
    );
    let twice: Vec<_> = rx.got.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        twice.is_empty(),
        "QoS 2 messages delivered more than once: {twice:?}"
    );
    eprintln!(
        "{} acknowledged, {} received, {} QoS 2 redeliveries recognised as duplicates",
        acked.len(),
        rx.got.len(),
        rx.duplicates_recognised
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_and_provisioned_devices_survive_kill_9() {
    let fx = Fixture::new();
    let config = fx.config(&Fixture::fleet_anchor(true));
    let dev_r = fx.client(&fx.device("dev-r.devices.example.com"));
    let dev_new = fx.client(&fx.device("dev-new.devices.example.com"));
    let broker = Proc::start(&fx, &config).await;
    let (mut r, _) = Raw::connect_session(&dev_r, broker.mqtt, "r", true, None).await;
    let reason = r
        .publish_acked(1, true, 1, "devices/dev-r/status", b"online")
        .await;
    assert_eq!(reason, 0);
    // Provisioned: the CONNACK came, so the registry row is committed.
    let (_n, _) = Raw::connect_session(&dev_new, broker.mqtt, "n", true, None).await;
    broker.kill();

    // No more provisioning: dev-new must be known from before the kill.
    let config = fx.config(&Fixture::fleet_anchor(false));
    let broker = Proc::start(&fx, &config).await;
    let (_n, _) = Raw::connect_session(&dev_new, broker.mqtt, "n", true, None).await;
    let stranger = fx.client(&fx.device("dev-stranger.devices.example.com"));
    let connect = RawConnect {
        clean: true,
        ..RawConnect::new(V::V4, "x")
    }
    .bytes();
    let (_x, ack) = Raw::try_connect(&stranger, broker.mqtt, &connect)
        .await
        .expect("connect");
    assert_eq!(
        ack,
        Pkt::ConnAck {
            present: false,
            code: 5
        },
        "create_devices = false is in force"
    );
    let (mut s, _) = Raw::connect_session(&dev_r, broker.mqtt, "fresh", true, Some(0)).await;
    assert_eq!(s.subscribe("devices/dev-r/#", 1).await, 1);
    match s.try_recv().await.expect("the retained message") {
        Pkt::Publish {
            retain: true,
            topic,
            payload,
            ..
        } => {
            assert_eq!(topic, "devices/dev-r/status");
            assert_eq!(payload, b"online");
        }
        other => panic!("expected the retained message, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_survive_kill_9_right_after_suback() {
    let w = World::new("");
    let broker = Proc::start(&w.fx, &w.config).await;
    let (mut s, _) = Raw::connect_session(&w.backend, broker.mqtt, "S", false, None).await;
    assert_eq!(s.subscribe("devices/+/t", 1).await, 1);
    broker.kill();
    drop(s);
    let broker = Proc::start(&w.fx, &w.config).await;
    let (mut p, _) = Raw::connect_session(&w.device("dev-1"), broker.mqtt, "p", true, None).await;
    assert_eq!(
        p.publish_acked(1, false, 1, &topic("dev-1"), &payload(1))
            .await,
        0
    );
    // S never subscribes again.
    let (mut s, present) = Raw::connect_session(&w.backend, broker.mqtt, "S", false, None).await;
    assert!(
        present,
        "the session acknowledged by CONNACK and SUBACK is gone"
    );
    assert_eq!(
        p.publish_acked(1, false, 2, &topic("dev-1"), MARKER).await,
        0
    );
    let mut rx = Receiver::default();
    assert_eq!(rx.run(&mut s, None).await, Ok(true));
    assert_eq!(rx.got.keys().copied().collect::<Vec<_>>(), vec![1]);
}

/// With one message in flight (max_inflight = 1): the unacknowledged delivery comes
/// back with DUP and its packet id; the QoS 1 messages queued behind it come back; a QoS 0
/// message queued between them does not (QoS 0 is never persisted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inflight_qos1_is_redelivered_with_dup_and_qos0_is_not_kept() {
    let w = World::new("max_inflight = 1");
    let broker = Proc::start(&w.fx, &w.config).await;
    let (mut s, _) = Raw::connect_session(&w.backend, broker.mqtt, "S", false, None).await;
    assert_eq!(s.subscribe("devices/+/t", 1).await, 1);
    let (mut p, _) = Raw::connect_session(&w.device("dev-1"), broker.mqtt, "p", true, None).await;
    let t = topic("dev-1");
    assert_eq!(p.publish_acked(1, false, 1, &t, &payload(1)).await, 0);
    let first_pkid = match s.try_recv().await.expect("message 1") {
        Pkt::Publish {
            dup: false,
            qos: 1,
            pkid,
            payload: body,
            ..
        } if body == payload(1) => pkid,
        other => panic!("expected message 1, got {other:?}"),
    };
    // Not acknowledged. Behind it, in S's queue: 2 (QoS 1), "qos0" (QoS 0), 3 (QoS 1).
    assert_eq!(p.publish_acked(1, false, 2, &t, &payload(2)).await, 0);
    p.try_send(&raw_publish_flags(V::V4, &t, b"qos0", 0, 0, false, false))
        .await
        .unwrap();
    // PUBACK 3 also says "qos0" was routed and everything before 3 is committed.
    assert_eq!(p.publish_acked(1, false, 3, &t, &payload(3)).await, 0);
    broker.kill();
    drop(s);

    let broker = Proc::start(&w.fx, &w.config).await;
    let (mut s, present) = Raw::connect_session(&w.backend, broker.mqtt, "S", false, None).await;
    assert!(present);
    match s.try_recv().await.expect("message 1 again") {
        Pkt::Publish {
            dup,
            pkid,
            payload: body,
            ..
        } => {
            assert_eq!(body, payload(1));
            assert!(dup, "a redelivery after restart must carry DUP");
            assert_eq!(pkid, first_pkid, "a redelivery keeps its packet id");
        }
        other => panic!("expected message 1 again, got {other:?}"),
    }
    s.try_send(&raw_ack(PUBACK, first_pkid)).await.unwrap();
    let (mut p, _) = Raw::connect_session(&w.device("dev-1"), broker.mqtt, "p", true, None).await;
    assert_eq!(p.publish_acked(1, false, 1, &t, MARKER).await, 0);
    let mut order = Vec::new();
    loop {
        match s.try_recv().await.expect("the rest of S's queue") {
            Pkt::Publish {
                pkid,
                payload: body,
                ..
            } => {
                s.try_send(&raw_ack(PUBACK, pkid)).await.unwrap();
                if body == MARKER {
                    break;
                }
                order.push(String::from_utf8_lossy(&body).into_owned());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(order, ["2", "3"], "QoS 0 must not survive a restart");
}

/// A publisher's QoS 2 packet id between PUBREC and PUBREL is kept across kill -9: the
/// resent PUBLISH (DUP) is acknowledged but not routed a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_qos2_id_survives_kill_9_and_is_not_routed_twice() {
    let w = World::new("");
    let broker = Proc::start(&w.fx, &w.config).await;
    create_offline_subscriber(&w, &broker, 2).await;
    let dev = w.device("dev-1");
    let t = topic("dev-1");
    let (mut p, _) = Raw::connect_session(&dev, broker.mqtt, "p", false, None).await;
    p.try_send(&raw_publish_flags(
        V::V4,
        &t,
        &payload(7),
        2,
        7,
        false,
        false,
    ))
    .await
    .unwrap();
    assert_eq!(
        p.try_recv().await.expect("PUBREC"),
        Pkt::Ack {
            kind: PUBREC,
            pkid: 7,
            reason: 0
        }
    );
    broker.kill();
    drop(p);

    let broker = Proc::start(&w.fx, &w.config).await;
    let (mut p, present) = Raw::connect_session(&dev, broker.mqtt, "p", false, None).await;
    assert!(present);
    p.try_send(&raw_publish(V::V4, &t, &payload(7), 2, 7, true))
        .await
        .unwrap();
    assert!(matches!(
        p.try_recv().await.expect("PUBREC again"),
        Pkt::Ack {
            kind: PUBREC,
            pkid: 7,
            ..
        }
    ));
    p.try_send(&raw_ack(PUBREL, 7)).await.unwrap();
    assert_eq!(
        p.try_recv().await.expect("PUBCOMP"),
        Pkt::Ack {
            kind: PUBCOMP,
            pkid: 7,
            reason: 0
        }
    );
    assert_eq!(p.publish_acked(1, false, 8, &t, MARKER).await, 0);
    let (mut s, _) = Raw::connect_session(&w.backend, broker.mqtt, "S", false, None).await;
    let mut rx = Receiver::default();
    assert_eq!(rx.run(&mut s, None).await, Ok(true));
    assert_eq!(rx.got.get(&7), Some(&1), "{:?}", rx.got);
}

/// contract §7: a full disk refuses new QoS 1/2 messages and provisioning instead of
/// acknowledging them; QoS 0 keeps flowing; space coming back brings the store back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_refuses_what_it_cannot_keep_and_recovers() {
    let w = World::new("");
    let Some(_mount) = mount_or_skip(&w, "2m") else {
        return;
    };
    let broker = Proc::start(&w.fx, &w.config).await;
    let addr = broker.mqtt;
    // A persistent MQTT 5 subscriber (session expiry 1 h), offline.
    let (mut s, _) = Raw::connect_session(&w.backend, addr, "S", false, Some(3600)).await;
    assert_eq!(s.subscribe("devices/+/t", 1).await, 1);
    s.disconnect().await;
    // An online QoS 0 subscriber, and two publishers of a device provisioned before.
    let (mut live, _) = Raw::connect_session(&w.backend, addr, "live", true, None).await;
    assert_eq!(live.subscribe("devices/+/q0", 0).await, 0);
    let dev = w.device("dev-1");
    let (mut p5, _) = Raw::connect_session(&dev, addr, "p5", true, Some(0)).await;
    let (mut p3, _) = Raw::connect_session(&dev, addr, "p3", true, None).await;

    let filler = w.fx.data_dir().join("filler");
    fill(&filler);

    let t = topic("dev-1");
    assert_eq!(
        p5.publish_acked(1, false, 1, &t, &payload(1001)).await,
        0x97,
        "MQTT 5 QoS 1 on a full disk: PUBACK 0x97\n{}",
        broker.stderr()
    );
    p5.try_send(&raw_publish_flags(
        V::V5,
        "devices/dev-1/q0",
        b"still flows",
        0,
        0,
        false,
        false,
    ))
    .await
    .unwrap();
    match live.try_recv().await.expect("QoS 0 delivery") {
        Pkt::Publish { payload, .. } => assert_eq!(payload, b"still flows"),
        other => panic!("expected the QoS 0 message, got {other:?}"),
    }
    p3.try_send(&raw_publish_flags(
        V::V4,
        &t,
        &payload(1002),
        1,
        1,
        false,
        false,
    ))
    .await
    .unwrap();
    assert_eq!(
        p3.recv_or_closed().await,
        None,
        "MQTT 3.1.1 QoS 1 on a full disk: no PUBACK, connection closed"
    );
    let new_v4 = w.device("dev-2");
    let (_c, ack) = Raw::try_connect(
        &new_v4,
        addr,
        &RawConnect {
            clean: true,
            ..RawConnect::new(V::V4, "n")
        }
        .bytes(),
    )
    .await
    .expect("connect");
    assert_eq!(
        ack,
        Pkt::ConnAck {
            present: false,
            code: 3
        },
        "provisioning refused (3.1.1)"
    );
    let new_v5 = w.device("dev-3");
    let (_c, ack) = Raw::try_connect(
        &new_v5,
        addr,
        &RawConnect {
            clean: true,
            session_expiry: Some(0),
            ..RawConnect::new(V::V5, "n")
        }
        .bytes(),
    )
    .await
    .expect("connect");
    assert_eq!(
        ack,
        Pkt::ConnAck {
            present: false,
            code: 0x88
        },
        "provisioning refused (5)"
    );

    std::fs::remove_file(&filler).unwrap();
    assert_eq!(
        p5.publish_acked(1, false, 2, &t, &payload(42)).await,
        0,
        "the store must recover once space is back\n{}",
        broker.stderr()
    );
    let (_c, _) = Raw::connect_session(&new_v4, addr, "n", true, None).await;
    assert_eq!(p5.publish_acked(1, false, 3, &t, MARKER).await, 0);
    let (mut s, present) = Raw::connect_session(&w.backend, addr, "S", false, Some(3600)).await;
    assert!(present);
    let mut rx = Receiver::default();
    assert_eq!(rx.run(&mut s, None).await, Ok(true));
    // 1001 and 1002 were refused: S may or may not get them (QoS 1 allows a message
    // that was never acknowledged to arrive anyway); 42 was acknowledged and must arrive.
    assert!(rx.got.contains_key(&42), "{:?}", rx.got);
}

/// Issue 4: a read-only store. Linux refuses to remount a file system read-only while the
/// broker holds its databases open for writing, so the store is made read-only between two
/// runs: the broker must then refuse to start, naming the file, instead of serving without
/// durability; writable again, it starts and still has what it kept. (A store that stops
/// accepting writes while running is `full_disk_refuses_what_it_cannot_keep_and_recovers`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_store_is_a_clear_startup_error() {
    let w = World::new("");
    let Some(mount) = mount_or_skip(&w, "16m") else {
        return;
    };
    {
        let broker = Proc::start(&w.fx, &w.config).await;
        let dev = w.device("dev-1");
        let (mut p, _) = Raw::connect_session(&dev, broker.mqtt, "p", true, Some(0)).await;
        assert_eq!(
            p.publish_acked(1, true, 1, &topic("dev-1"), &payload(7))
                .await,
            0,
            "retained, acknowledged"
        );
    }
    mount.remount("ro");
    let (code, stderr) = serve_expecting_exit(&w.config).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("certmq.db") || stderr.contains("messages.db"),
        "the error names the database file: {stderr}"
    );
    mount.remount("rw");
    let broker = Proc::start(&w.fx, &w.config).await;
    let (mut s, _) = Raw::connect_session(&w.backend, broker.mqtt, "s", true, None).await;
    assert_eq!(s.subscribe("devices/+/t", 1).await, 1);
    match s.try_recv().await.expect("the retained message") {
        Pkt::Publish { payload: got, .. } => assert_eq!(got, payload(7)),
        other => panic!("expected the retained message, got {other:?}"),
    }
}

/// A tmpfs of `size` on the world's data_dir; None (after saying so) when mounting is not
/// possible and `CERTMQ_SKIP_MOUNT_TESTS` is set, else the test fails: CI runs as root.
fn mount_or_skip(w: &World, size: &str) -> Option<Tmpfs> {
    match Tmpfs::mount(&w.fx.data_dir(), size) {
        Ok(m) => Some(m),
        Err(e) if std::env::var_os("CERTMQ_SKIP_MOUNT_TESTS").is_some() => {
            eprintln!("skipped (CERTMQ_SKIP_MOUNT_TESTS is set): {e}");
            None
        }
        Err(e) => panic!("{e}; this test needs root (set CERTMQ_SKIP_MOUNT_TESTS to skip it)"),
    }
}

/// What a broken database file is made of.
#[derive(Debug, Clone, Copy)]
enum Broken {
    Garbage,
    /// A valid SQLite database of another application.
    Foreign,
}

impl Broken {
    fn write(self, path: &std::path::Path) {
        match self {
            Broken::Garbage => {
                let bytes: Vec<u8> = (0..16_384u32).map(|i| (i * 7 + 13) as u8).collect();
                std::fs::write(path, bytes).unwrap();
            }
            Broken::Foreign => {
                let c = rusqlite::Connection::open(path).unwrap();
                c.execute_batch(
                    "CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT);
                     INSERT INTO orders (item) VALUES ('coffee');",
                )
                .unwrap();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_foreign_database_is_a_clear_startup_error_and_left_alone() {
    for file in ["messages.db", "certmq.db"] {
        for broken in [Broken::Garbage, Broken::Foreign] {
            let fx = Fixture::new();
            let config = fx.config(&Fixture::fleet_anchor(true));
            std::fs::create_dir_all(fx.data_dir()).unwrap();
            let path = fx.data_dir().join(file);
            broken.write(&path);
            let before = std::fs::read(&path).unwrap();
            let (code, stderr) = serve_expecting_exit(&config).await;
            let case = format!("{file} {broken:?}");
            assert_eq!(code, Some(1), "{case}: exit status; stderr:\n{stderr}");
            assert!(
                stderr.contains(&path.display().to_string()),
                "{case}: the error must name the file; stderr:\n{stderr}"
            );
            assert!(
                std::fs::read(&path).unwrap() == before,
                "{case}: the file was changed"
            );
        }
    }
}

/// Once the broker sent PUBREL for a QoS 2 delivery, the subscriber has forgotten the
/// packet id (MQTT receiver rules): a restart must resend PUBREL, never the PUBLISH, which
/// the subscriber would rightly take for a new message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_delivery_released_before_kill_9_is_not_delivered_again() {
    let w = World::new("");
    let broker = Proc::start(&w.fx, &w.config).await;
    let (mut s, _) = Raw::connect_session(&w.backend, broker.mqtt, "S", false, None).await;
    assert_eq!(s.subscribe("devices/+/t", 2).await, 2);
    let (mut p, _) = Raw::connect_session(&w.device("dev-1"), broker.mqtt, "p", true, None).await;
    let t = topic("dev-1");
    assert_eq!(p.publish_acked(2, false, 1, &t, &payload(1)).await, 0);
    let pkid = match s.try_recv().await.expect("the QoS 2 delivery") {
        Pkt::Publish { qos: 2, pkid, .. } => pkid,
        other => panic!("expected the QoS 2 delivery, got {other:?}"),
    };
    s.try_send(&raw_ack(PUBREC, pkid)).await.unwrap();
    assert_eq!(
        s.try_recv().await.expect("PUBREL"),
        Pkt::Ack {
            kind: PUBREL,
            pkid,
            reason: 0
        }
    );
    // S has received message 1 and forgotten its id; no PUBCOMP yet.
    broker.kill();
    drop(s);

    let broker = Proc::start(&w.fx, &w.config).await;
    let (mut s, present) = Raw::connect_session(&w.backend, broker.mqtt, "S", false, None).await;
    assert!(present);
    let (mut p, _) = Raw::connect_session(&w.device("dev-1"), broker.mqtt, "p", true, None).await;
    assert_eq!(p.publish_acked(1, false, 1, &t, MARKER).await, 0);
    let mut rx = Receiver::default();
    rx.got.insert(1, 1);
    assert_eq!(rx.run(&mut s, None).await, Ok(true));
    assert_eq!(rx.got.get(&1), Some(&1), "message 1 was delivered twice");
}

/// After PUBCOMP a publisher may reuse the packet id for a new message: a restart must
/// not take that new message for a duplicate of the completed one (and drop it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_qos2_id_completed_before_kill_9_can_be_reused() {
    let w = World::new("");
    let broker = Proc::start(&w.fx, &w.config).await;
    create_offline_subscriber(&w, &broker, 2).await;
    let dev = w.device("dev-1");
    let t = topic("dev-1");
    let (mut p, _) = Raw::connect_session(&dev, broker.mqtt, "p", false, None).await;
    // PUBLISH, PUBREC, PUBREL, PUBCOMP: the id is free again.
    assert_eq!(p.publish_acked(2, false, 1, &t, &payload(1)).await, 0);
    broker.kill();
    drop(p);

    let broker = Proc::start(&w.fx, &w.config).await;
    let (mut p, present) = Raw::connect_session(&dev, broker.mqtt, "p", false, None).await;
    assert!(present);
    assert_eq!(p.publish_acked(2, false, 1, &t, &payload(2)).await, 0);
    assert_eq!(p.publish_acked(1, false, 2, &t, MARKER).await, 0);
    let (mut s, _) = Raw::connect_session(&w.backend, broker.mqtt, "S", false, None).await;
    let mut rx = Receiver::default();
    assert_eq!(rx.run(&mut s, None).await, Ok(true));
    assert_eq!(
        rx.got.keys().copied().collect::<Vec<_>>(),
        vec![1, 2],
        "a new message reusing a completed packet id was dropped"
    );
}

/// The client side of a persistent QoS 2 publisher, kept across its connections as a
/// client library keeps it (paho resends its whole unfinished backlog after a reconnect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    /// Not sent on any connection yet.
    New,
    /// PUBLISH sent, no PUBREC yet: resent with DUP.
    Sent,
    /// PUBREC received: PUBREL is (re)sent.
    Released,
    /// PUBCOMP received.
    Done,
}

/// contract §7 (the kill -9 loop): a publisher pipelines more QoS 2 messages than the
/// in-flight window (64) — all at once over MQTT 3.1.1, which cannot be told a limit; over
/// MQTT 5 once beyond the Receive Maximum (DISCONNECT 0x93), then within it — and after
/// every kill -9 resends its unfinished backlog. Every message arrives exactly once.
async fn pipelined_qos2_beyond_the_window_across_kill_9(v: V, seed_default: u64) {
    const TOTAL: u16 = 150;
    const WINDOW: usize = 64;
    const KILLS: usize = 4;
    let w = World::new("max_queued_messages = 100000");
    let mut rng = Rng::new(seed(seed_default));
    let mut state = vec![Out::New; usize::from(TOTAL) + 1];
    let v5 = v == V::V5;
    let expiry = v5.then_some(3600);
    let dev = w.device("dev-1");
    let mut kills = 0;
    let mut first = true;
    loop {
        let broker = Proc::start(&w.fx, &w.config).await;
        if first {
            create_offline_subscriber(&w, &broker, 2).await;
        }
        let (mut p, _) = Raw::connect_session(&dev, broker.mqtt, "P", false, expiry).await;
        // What this connection sends first: every unfinished exchange, in order; over
        // MQTT 5 within the window except on the very first connection.
        let limit = if v5 && !first { WINDOW } else { usize::MAX };
        first = false;
        let mut todo: std::collections::VecDeque<u16> = (1..=TOTAL)
            .filter(|&i| state[usize::from(i)] != Out::Done)
            .collect();
        let mut open = 0usize;
        let send_next = |state: &mut Vec<Out>, i: u16| -> Vec<u8> {
            let s = &mut state[usize::from(i)];
            let bytes = match *s {
                Out::Released => raw_ack(PUBREL, i),
                Out::Sent => raw_publish(v, &topic("dev-1"), &payload(u32::from(i)), 2, i, true),
                _ => raw_publish_flags(
                    v,
                    &topic("dev-1"),
                    &payload(u32::from(i)),
                    2,
                    i,
                    false,
                    false,
                ),
            };
            if *s == Out::New {
                *s = Out::Sent;
            }
            bytes
        };
        let mut burst = Vec::new();
        while open < limit {
            let Some(i) = todo.pop_front() else { break };
            burst.extend(send_next(&mut state, i));
            open += 1;
        }
        let kill_after = (kills < KILLS).then(|| rng.range(1, 120));
        let mut events = 0;
        let mut alive = p.try_send(&burst).await.is_ok();
        while alive && open > 0 {
            if kill_after.is_some_and(|k| events >= k) {
                break;
            }
            match p.recv_or_closed().await {
                None | Some(Pkt::Disconnect { .. }) => alive = false,
                Some(Pkt::Ack {
                    kind: PUBREC,
                    pkid,
                    reason,
                }) => {
                    assert_eq!(reason, 0, "PUBREC {pkid}");
                    state[usize::from(pkid)] = Out::Released;
                    events += 1;
                    alive = p.try_send(&raw_ack(PUBREL, pkid)).await.is_ok();
                }
                Some(Pkt::Ack {
                    kind: PUBCOMP,
                    pkid,
                    ..
                }) => {
                    state[usize::from(pkid)] = Out::Done;
                    events += 1;
                    open -= 1;
                    if let Some(i) = todo.pop_front() {
                        open += 1;
                        alive = p.try_send(&send_next(&mut state, i)).await.is_ok();
                    }
                }
                Some(other) => panic!("P: unexpected {other:?}"),
            }
        }
        let done = state.iter().skip(1).all(|s| *s == Out::Done);
        if kill_after.is_some() && !done {
            broker.kill();
            kills += 1;
        } else if done {
            break;
        }
        // Otherwise the connection ended (MQTT 5 over the window): reconnect to the same
        // broker process's successor without a kill.
    }
    assert!(kills >= 1, "the stream finished before any kill");
    let mut s = Receiver::default();
    drain_to_marker(&w, &mut s).await;
    let missing: Vec<u32> = (1..=u32::from(TOTAL))
        .filter(|n| !s.got.contains_key(n))
        .collect();
    assert!(
        missing.is_empty(),
        "completed but never delivered: {missing:?}"
    );
    let twice: Vec<_> = s.got.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
}

both_versions! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    pipelined_qos2_beyond_the_window_across_kill_9_v311,
    pipelined_qos2_beyond_the_window_across_kill_9_v5 => |v| {
        let seed = match v {
            V::V4 => 0x3111_0e2a,
            V::V5 => 0x0005_0e2a,
        };
        pipelined_qos2_beyond_the_window_across_kill_9(v, seed)
    };
}

/// A PUBREL whose release cannot be committed (full disk) must not be
/// answered with PUBCOMP: the client then reuses the id, and after a (graceful) restart
/// the stored id makes the new message a "duplicate", acknowledged and never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubcomp_is_not_sent_when_the_release_cannot_be_committed() {
    let w = World::new("");
    let Some(_mount) = mount_or_skip(&w, "2m") else {
        return;
    };
    let mut broker = Proc::start(&w.fx, &w.config).await;
    create_offline_subscriber(&w, &broker, 2).await;
    let dev = w.device("dev-1");
    let t = topic("dev-1");
    let (mut p, _) = Raw::connect_session(&dev, broker.mqtt, "p", false, None).await;
    p.try_send(&raw_publish_flags(
        V::V4,
        &t,
        &payload(1),
        2,
        1,
        false,
        false,
    ))
    .await
    .unwrap();
    assert!(matches!(
        p.try_recv().await.expect("PUBREC"),
        Pkt::Ack {
            kind: PUBREC,
            pkid: 1,
            ..
        }
    ));
    let filler = w.fx.data_dir().join("filler");
    fill(&filler);
    p.try_send(&raw_ack(PUBREL, 1)).await.unwrap();
    let answer = p.recv_or_closed().await;
    std::fs::remove_file(&filler).unwrap();
    let completed = matches!(
        answer,
        Some(Pkt::Ack {
            kind: PUBCOMP,
            pkid: 1,
            ..
        })
    );
    drop(p);
    // Graceful stop, then start again on the same data_dir.
    broker.signal("TERM");
    broker.wait_exit(std::time::Duration::from_secs(30)).await;
    let broker = Proc::start(&w.fx, &w.config).await;
    let (mut p, present) = Raw::connect_session(&dev, broker.mqtt, "p", false, None).await;
    assert!(present);
    if completed {
        // The client was told id 1 is free: it reuses it for a new message.
        assert_eq!(p.publish_acked(2, false, 1, &t, &payload(2)).await, 0);
    } else {
        // Not completed: the client resends PUBREL, then goes on.
        p.try_send(&raw_ack(PUBREL, 1)).await.unwrap();
        let _ = p.try_recv().await;
        assert_eq!(p.publish_acked(2, false, 1, &t, &payload(2)).await, 0);
    }
    assert_eq!(p.publish_acked(1, false, 2, &t, MARKER).await, 0);
    let (mut s, _) = Raw::connect_session(&w.backend, broker.mqtt, "S", false, None).await;
    let mut rx = Receiver::default();
    assert_eq!(rx.run(&mut s, None).await, Ok(true));
    assert_eq!(
        rx.got.keys().copied().collect::<Vec<_>>(),
        vec![1, 2],
        "PUBCOMP sent on a full disk: {completed}; message 2 (PUBREC'd and PUBCOMP'd) lost\n{}",
        broker.stderr()
    );
}

/// A subscriber's PUBREC whose release cannot be committed (full disk) is not followed by
/// PUBREL: the connection ends and the subscriber keeps the id. Back (disk free again), it
/// gets PUBREL for the same id, completes, and a restart then delivers nothing again. Had
/// PUBREL gone out, the subscriber would have forgotten the id while the disk still held
/// the delivery as unreleased: the restart would resend the PUBLISH, which the subscriber
/// rightly takes for a new message (a QoS 2 duplicate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubrel_is_not_sent_when_the_release_cannot_be_committed() {
    let w = World::new("");
    let Some(_mount) = mount_or_skip(&w, "2m") else {
        return;
    };
    let mut broker = Proc::start(&w.fx, &w.config).await;
    let (mut s, _) = Raw::connect_session(&w.backend, broker.mqtt, "S", false, None).await;
    assert_eq!(s.subscribe("devices/+/t", 2).await, 2);
    let (mut p, _) = Raw::connect_session(&w.device("dev-1"), broker.mqtt, "p", true, None).await;
    let t = topic("dev-1");
    assert_eq!(p.publish_acked(2, false, 1, &t, &payload(1)).await, 0);
    let pkid = match s.try_recv().await.expect("the QoS 2 delivery") {
        Pkt::Publish { qos: 2, pkid, .. } => pkid,
        other => panic!("expected the QoS 2 delivery, got {other:?}"),
    };

    let filler = w.fx.data_dir().join("filler");
    fill(&filler);
    s.try_send(&raw_ack(PUBREC, pkid)).await.unwrap();
    let answer = s.recv_or_closed().await;
    assert_eq!(
        answer, None,
        "PUBREL sent although the release was not stored"
    );
    std::fs::remove_file(&filler).unwrap();

    // Back: the session still holds the exchange as released.
    let (mut s, present) = Raw::connect_session(&w.backend, broker.mqtt, "S", false, None).await;
    assert!(present);
    assert_eq!(
        s.try_recv().await.expect("PUBREL again"),
        Pkt::Ack {
            kind: PUBREL,
            pkid,
            reason: 0
        }
    );
    s.try_send(&raw_ack(PUBCOMP, pkid)).await.unwrap();
    s.disconnect().await;

    broker.signal("TERM");
    broker.wait_exit(std::time::Duration::from_secs(30)).await;
    let broker = Proc::start(&w.fx, &w.config).await;
    let (mut s, present) = Raw::connect_session(&w.backend, broker.mqtt, "S", false, None).await;
    assert!(present);
    let (mut p, _) = Raw::connect_session(&w.device("dev-1"), broker.mqtt, "p", true, None).await;
    assert_eq!(p.publish_acked(1, false, 1, &t, MARKER).await, 0);
    let mut rx = Receiver::default();
    rx.got.insert(1, 1);
    assert_eq!(rx.run(&mut s, None).await, Ok(true));
    assert_eq!(rx.got.get(&1), Some(&1), "message 1 was delivered twice");
}
