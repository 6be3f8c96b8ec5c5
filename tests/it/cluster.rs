//! Cluster mode (contract §12) against a real nats-server with JetStream started by each
//! test, and certmq nodes as subprocesses.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::common::cluster::{node_config, start_node};
use crate::common::coretests::raw::{raw_ack, raw_publish, Raw, RawConnect, PUBACK};
use crate::common::coretests::{Opts, Peer, V};
use crate::common::nats::Nats;
use crate::common::ops::{open_v5, pinned, Proc, BACKEND_PROFILE};
use crate::common::run::{arg, certmq};
use crate::common::{self_signed, Fixture, WAIT};

/// Polls `/healthz` until its status is `want`.
async fn wait_health(node: &Proc, want: u16) -> String {
    let mut last = (0, String::new());
    let reached = tokio::time::timeout(WAIT, async {
        loop {
            last = node.get("/healthz").await;
            if last.0 == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(reached.is_ok(), "healthz never {want}; last {last:?}");
    last.1
}

#[tokio::test]
async fn a_node_is_unhealthy_without_nats_and_recovers_by_itself() {
    let Some(mut nats) = Nats::start() else {
        return;
    };
    let fx = Fixture::new();
    fx.write("backend.pem", &self_signed("backend").cert_pem);
    let node = start_node(
        &fx,
        &nats,
        "a",
        &(pinned("backend", "backend.pem", "backend") + BACKEND_PROFILE),
    )
    .await;
    wait_health(&node, 200).await;
    let series = "certmq_cluster_nats_connected{node=\"a\"}";
    assert_eq!(node.metric(series).await, Some(1.0));
    nats.stop();
    let body = wait_health(&node, 503).await;
    assert!(body.contains("not connected to NATS"), "{body}");
    assert_eq!(node.metric(series).await, Some(0.0));
    nats.restart();
    wait_health(&node, 200).await;
    assert_eq!(node.metric(series).await, Some(1.0));
}

#[tokio::test]
async fn a_node_that_cannot_reach_nats_at_start_exits_naming_it() {
    let Some(mut nats) = Nats::start() else {
        return;
    };
    let url = nats.url();
    nats.stop();
    let fx = Fixture::new();
    fx.write("backend.pem", &self_signed("backend").cert_pem);
    let config = node_config(
        &fx,
        &nats,
        "a",
        &(pinned("backend", "backend.pem", "backend") + BACKEND_PROFILE),
    );
    let out = certmq(fx.dir.path(), &["serve", "--config", arg(&config)]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("cannot join the cluster"), "{out:?}");
    assert!(out.stderr.contains(&url), "{out:?}");
}

#[test]
fn check_reports_every_cluster_problem() {
    let fx = Fixture::new();
    fx.write("backend.pem", &self_signed("backend").cert_pem);
    let text = "[server]\nbind = \"127.0.0.1:0\"\ncert_chain = \"server.pem\"\nprivate_key = \"server.key\"\ndata_dir = \"data\"\n\n[cluster]\nnode = \"a b\"\nnats = [\"http://x\"]\nprefix = \"\"\nreplicas = 7\ncredentials = \"missing.creds\"\n\n[[device]]\nname = \"backend\"\ncertificate = \"backend.pem\"\n";
    let config = fx.write("bad-cluster.toml", text);
    let out = certmq(fx.dir.path(), &["check", "--config", arg(&config)]);
    assert_eq!(out.code, Some(1), "{out:?}");
    for needle in [
        "cluster.node",
        "cluster.prefix",
        "cluster.nats",
        "cluster.replicas",
        "cluster.credentials",
    ] {
        assert!(
            out.stderr.contains(needle) || out.stdout.contains(needle),
            "{needle}: {out:?}"
        );
    }
}

/// Two nodes on one NATS with a pinned `backend` allowed everywhere, and its client.
pub(crate) struct Two {
    pub(crate) _nats: Nats,
    pub(crate) fx: Fixture,
    pub(crate) a: Proc,
    pub(crate) b: Proc,
    pub(crate) backend: crate::common::Client,
}

impl Two {
    pub(crate) async fn start() -> Option<Two> {
        let nats = Nats::start()?;
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
        let b = start_node(&fx, &nats, "b", &body).await;
        Some(Two {
            _nats: nats,
            fx,
            a,
            b,
            backend,
        })
    }
}

/// Publishes QoS 0 probes on node `from` until `sub` (on another node) gets one: core
/// subscriptions reach NATS asynchronously after SUBACK. Drains the probes.
async fn until_routed(from: &mut Peer, sub: &mut Peer, topic: &str) {
    let got = tokio::time::timeout(WAIT, async {
        loop {
            from.publish(topic, 0, false, b"probe").await;
            if let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(200), sub.try_recv()).await
            {
                return;
            }
        }
    })
    .await;
    assert!(
        got.is_ok(),
        "no probe on {topic} crossed nodes within {WAIT:?}"
    );
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), sub.try_recv()).await {
    }
}

#[tokio::test]
async fn messages_cross_nodes_at_every_qos_both_ways() {
    let Some(t) = Two::start().await else { return };
    for v in [V::V4, V::V5] {
        let mut on_a = Peer::connect(
            &t.backend,
            t.a.mqtt,
            v,
            &format!("a-{v:?}"),
            &Opts::default(),
        )
        .await;
        let mut on_b = Peer::connect(
            &t.backend,
            t.b.mqtt,
            v,
            &format!("b-{v:?}"),
            &Opts::default(),
        )
        .await;
        let ta = format!("to-a/{v:?}/#");
        let tb = format!("to-b/{v:?}/#");
        assert_eq!(on_a.subscribe(&ta, 2).await, 2);
        assert_eq!(on_b.subscribe(&tb, 2).await, 2);
        until_routed(&mut on_a, &mut on_b, &format!("to-b/{v:?}/probe")).await;
        until_routed(&mut on_b, &mut on_a, &format!("to-a/{v:?}/probe")).await;
        for qos in 0..=2u8 {
            let payload = format!("q{qos}").into_bytes();
            on_a.publish(&format!("to-b/{v:?}/x"), qos, false, &payload)
                .await;
            let got = on_b.recv().await;
            assert_eq!(
                (got.topic.as_str(), got.qos, &got.payload),
                (format!("to-b/{v:?}/x").as_str(), qos, &payload),
                "a -> b at QoS {qos}"
            );
            on_b.publish(&format!("to-a/{v:?}/y"), qos, false, &payload)
                .await;
            let got = on_a.recv().await;
            assert_eq!(
                (got.topic.as_str(), got.qos, &got.payload),
                (format!("to-a/{v:?}/y").as_str(), qos, &payload),
                "b -> a at QoS {qos}"
            );
        }
    }
    drop(t.fx);
}

#[tokio::test]
async fn a_retained_message_is_seen_from_every_node() {
    let Some(t) = Two::start().await else { return };
    let mut on_a = Peer::connect(&t.backend, t.a.mqtt, V::V5, "pub", &Opts::default()).await;
    on_a.publish("state/lamp", 1, true, b"on").await;
    // A new subscription on the other node gets it as retained.
    let got = tokio::time::timeout(WAIT, async {
        loop {
            let mut on_b =
                Peer::connect(&t.backend, t.b.mqtt, V::V5, "sub", &Opts::default()).await;
            on_b.subscribe("state/#", 1).await;
            if let Ok(Some(m)) =
                tokio::time::timeout(Duration::from_millis(300), on_b.try_recv()).await
            {
                return m;
            }
            on_b.disconnect().await;
        }
    })
    .await
    .expect("the retained message reached node b");
    assert_eq!(
        (got.topic.as_str(), &got.payload[..], got.retain),
        ("state/lamp", &b"on"[..], true)
    );
    // A node started afterwards loads it at start.
    let c = start_node(
        &t.fx,
        &t._nats,
        "c",
        &format!(
            "{}\n{}\n{BACKEND_PROFILE}",
            Fixture::fleet_anchor(true),
            pinned("backend", "backend.pem", "backend")
        ),
    )
    .await;
    let mut on_c = Peer::connect(&t.backend, c.mqtt, V::V4, "sub-c", &Opts::default()).await;
    on_c.subscribe("state/#", 1).await;
    let got = on_c.recv().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..], got.retain),
        ("state/lamp", &b"on"[..], true)
    );
}

/// A connection to the same (device, client id) on another node takes the session over:
/// the first is closed with MQTT 5 DISCONNECT 0x8E within a second.
#[tokio::test]
async fn a_session_taken_over_on_another_node_is_closed_within_a_second() {
    let Some(t) = Two::start().await else { return };
    let mut first = open_v5(&t.backend, t.a.mqtt, "same").await;
    let started = Instant::now();
    let mut second = open_v5(&t.backend, t.b.mqtt, "same").await;
    let gone = first.expect_disconnect(WAIT).await;
    let took = started.elapsed();
    eprintln!("cross-node takeover closed the first connection after {took:?}");
    assert_eq!(gone.code, 0x8E, "{gone:?}");
    assert!(took < Duration::from_secs(1), "taken over after {took:?}");
    second.ping().await;
}

/// Without NATS a node keeps its connections and QoS 0 traffic, refuses what it could not
/// store (QoS 1/2: 0x97) and new persistent sessions (code 3), and recovers by itself.
#[tokio::test]
async fn without_nats_a_node_serves_qos0_locally_and_refuses_what_it_cannot_store() {
    let Some(mut t) = Two::start().await else {
        return;
    };
    let mut sub = open_v5(&t.backend, t.a.mqtt, "sub").await;
    assert_eq!(sub.subscribe("local/#", 1).await, 1);
    let mut publisher = open_v5(&t.backend, t.a.mqtt, "pub").await;
    assert_eq!(
        publisher
            .publish_acked(1, false, 1, "local/before", b"x")
            .await,
        0
    );
    assert_eq!(next_topic(&mut sub).await, "local/before");

    t._nats.stop();
    wait_health(&t.a, 503).await;
    publisher
        .send(&raw_publish(V::V5, "local/zero", b"q0", 0, 0, false))
        .await;
    assert_eq!(next_topic(&mut sub).await, "local/zero");
    // Delivered here, and counted as not forwarded to the other nodes.
    let unforwarded = r#"certmq_messages_dropped_total{reason="cluster_unreachable"}"#;
    assert!(
        t.a.metric(unforwarded).await >= Some(1.0),
        "QoS 0 not forwarded, uncounted"
    );
    assert_eq!(
        publisher
            .publish_acked(1, false, 2, "local/one", b"x")
            .await,
        0x97
    );
    let persistent = RawConnect {
        clean: false,
        ..RawConnect::new(V::V4, "persistent")
    };
    let (_, ack) = Raw::connect(&t.backend, t.a.mqtt, &persistent.bytes()).await;
    assert_eq!(ack, [0x20, 2, 0, 3], "a new persistent session is refused");

    t._nats.restart();
    wait_health(&t.a, 200).await;
    assert_eq!(
        publisher
            .publish_acked(1, false, 3, "local/after", b"x")
            .await,
        0
    );
    assert_eq!(next_topic(&mut sub).await, "local/after");
    drop(t.b);
}

/// The topic of the next PUBLISH at any QoS (acknowledging QoS 1).
async fn next_topic(raw: &mut Raw) -> String {
    let p = raw.next_publish().await;
    if p.qos == 1 {
        raw.send(&raw_ack(PUBACK, p.pkid)).await;
    }
    p.topic
}

/// kill -9 of the publisher's node in the middle of a QoS 1 stream: every message it
/// acknowledged reaches the subscriber on the other node (JetStream held it).
#[tokio::test]
async fn kill_9_of_a_node_loses_nothing_it_acknowledged() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let Some(t) = Two::start().await else { return };
    let mut sub = Peer::connect(&t.backend, t.b.mqtt, V::V5, "sub", &Opts::default()).await;
    assert_eq!(sub.subscribe("stream/#", 1).await, 1);
    let mut probe = Peer::connect(&t.backend, t.a.mqtt, V::V5, "probe", &Opts::default()).await;
    until_routed(&mut probe, &mut sub, "stream/probe").await;
    probe.disconnect().await;

    // Pipelined: PUBLISHes keep going out while PUBACKs come back, so the node is killed
    // with messages in every stage (read, routed, being stored, acknowledged).
    let (first, publisher) = t
        .backend
        .raw_first_packet(t.a.mqtt, &RawConnect::new(V::V5, "pub").bytes())
        .await
        .expect("CONNACK");
    assert_eq!(first[3], 0, "CONNACK {first:02x?}");
    let (mut rd, mut wr) = tokio::io::split(publisher);
    let writer = tokio::spawn(async move {
        for i in 1..=60_000u16 {
            let topic = format!("stream/{i}");
            let mut body = Vec::new();
            body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
            body.extend_from_slice(topic.as_bytes());
            body.extend_from_slice(&i.to_be_bytes());
            body.push(0);
            body.extend_from_slice(b"payload");
            let mut p = vec![0x32, body.len() as u8];
            p.extend(body);
            if wr.write_all(&p).await.is_err() {
                return;
            }
        }
    });
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let (acks, n) = (acked.clone(), count.clone());
    let reader = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4];
        // PUBACK: 0x40, length 2 (or 3/4 with a reason), packet id.
        while rd.read_exact(&mut buf[..2]).await.is_ok() {
            let len = usize::from(buf[1]);
            let mut rest = vec![0u8; len];
            if rd.read_exact(&mut rest).await.is_err() {
                return;
            }
            if buf[0] == 0x40 && rest.get(2).copied().unwrap_or(0) == 0 {
                acks.lock()
                    .unwrap()
                    .push(usize::from(u16::from_be_bytes([rest[0], rest[1]])));
                n.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    while count.load(Ordering::SeqCst) < 500 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    t.a.kill();
    let _ = reader.await;
    writer.abort();
    let acked: Vec<usize> = acked.lock().unwrap().clone();
    assert!(acked.len() >= 500);
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < acked.len() {
        let got = tokio::time::timeout(WAIT, sub.try_recv()).await;
        let Ok(Some(m)) = got else { break };
        if let Some(n) = m
            .topic
            .strip_prefix("stream/")
            .and_then(|n| n.parse::<usize>().ok())
        {
            seen.insert(n);
        }
    }
    let missing: Vec<usize> = acked
        .iter()
        .copied()
        .filter(|n| !seen.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged messages lost: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(20)]
    );
}

/// A shared subscription with members on two nodes: each message reaches exactly one
/// member in the cluster, at QoS 0 and 1.
#[tokio::test]
async fn a_shared_subscription_spans_nodes_and_delivers_each_message_once() {
    let Some(t) = Two::start().await else { return };
    let mut on_a = Peer::connect(&t.backend, t.a.mqtt, V::V5, "member-a", &Opts::default()).await;
    let mut on_b = Peer::connect(&t.backend, t.b.mqtt, V::V5, "member-b", &Opts::default()).await;
    assert_eq!(on_a.subscribe("$share/workers/jobs/#", 1).await, 1);
    assert_eq!(on_b.subscribe("$share/workers/jobs/#", 1).await, 1);
    let mut publisher = Peer::connect(&t.backend, t.a.mqtt, V::V5, "pub", &Opts::default()).await;
    // Both paths (queue group, shared consumer) are set up after SUBACK: probe until a
    // probe of each QoS reaches a member.
    for qos in [0u8, 1] {
        let crossed = tokio::time::timeout(WAIT, async {
            loop {
                publisher.publish("jobs/probe", qos, false, b"probe").await;
                tokio::select! {
                    Some(_) = on_a.try_recv() => return,
                    Some(_) = on_b.try_recv() => return,
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        })
        .await;
        assert!(crossed.is_ok(), "no QoS {qos} probe reached a member");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), on_a.try_recv()).await
    {
    }
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), on_b.try_recv()).await
    {
    }

    const N: usize = 40;
    for qos in [0u8, 1] {
        for i in 0..N {
            publisher
                .publish(&format!("jobs/{qos}/{i}"), qos, false, b"job")
                .await;
        }
    }
    let mut seen: Vec<String> = Vec::new();
    let (mut got_a, mut got_b) = (0, 0);
    while seen.len() < 2 * N {
        tokio::select! {
            Some(m) = on_a.try_recv() => { got_a += 1; seen.push(m.topic); }
            Some(m) = on_b.try_recv() => { got_b += 1; seen.push(m.topic); }
            () = tokio::time::sleep(WAIT) => break,
        }
    }
    // Anything more would be a second copy.
    tokio::select! {
        Some(m) = on_a.try_recv() => seen.push(m.topic),
        Some(m) = on_b.try_recv() => seen.push(m.topic),
        () = tokio::time::sleep(Duration::from_millis(500)) => {}
    }
    eprintln!("shared group across nodes: {got_a} on a, {got_b} on b");
    seen.sort();
    let mut want: Vec<String> = [0u8, 1]
        .iter()
        .flat_map(|q| (0..N).map(move |i| format!("jobs/{q}/{i}")))
        .collect();
    want.sort();
    assert_eq!(seen, want, "every message to exactly one member");
}

// Wills of a node that dies (docs/cluster.md): kill -9 of the node a device with a will is
// connected to; a surviving node publishes the will once the dead node's heartbeat is
// stale (10 s), exactly once, after what remains of its delay, unless the device came
// back first or said goodbye.

use crate::common::coretests::{Msg, WillMsg};

/// The documented bound on a will's latency after its node died: the heartbeat going
/// stale (10 s) and the survivors noticing it (up to 3 s), plus the will's delay. Tests
/// allow twice as much.
const WILL_BOUND: Duration = Duration::from_secs(15);

/// Fleet device `name` connected to `addr` with a QoS 1 will "gone" on
/// `devices/NAME/status` (MQTT 5 with `delay`: a persistent session, so that the delay is
/// not capped by a session ending at once).
async fn with_will(fx: &Fixture, addr: std::net::SocketAddr, v: V, name: &str, delay: u32) -> Peer {
    let creds = fx.client(&fx.device(&format!("{name}.devices.example.com")));
    let opts = Opts {
        clean: delay == 0,
        will: Some(WillMsg {
            topic: format!("devices/{name}/status"),
            payload: b"gone".to_vec(),
            qos: 1,
            retain: false,
            delay,
        }),
    };
    Peer::connect(&creds, addr, v, name, &opts).await
}

/// A backend client on `addr` subscribed to every device's status.
async fn watcher(t: &Two, addr: std::net::SocketAddr, id: &str) -> Peer {
    let mut w = Peer::connect(&t.backend, addr, V::V5, id, &Opts::default()).await;
    assert_eq!(w.subscribe("devices/+/status", 1).await, 1);
    w
}

/// The next PUBLISH within `limit`, if any.
async fn within(peer: &mut Peer, limit: Duration) -> Option<Msg> {
    tokio::time::timeout(limit, peer.try_recv())
        .await
        .ok()
        .flatten()
}

#[tokio::test]
async fn the_will_of_a_device_on_a_killed_node_is_published_by_the_survivor() {
    let Some(t) = Two::start().await else { return };
    let _device = with_will(&t.fx, t.a.mqtt, V::V4, "d1", 0).await;
    let mut on_b = watcher(&t, t.b.mqtt, "watch-b").await;
    let killed = Instant::now();
    t.a.kill();
    let got = within(&mut on_b, 2 * WILL_BOUND)
        .await
        .expect("the will arrived on the surviving node");
    let took = killed.elapsed();
    eprintln!("will of a killed node published after {took:?}");
    assert_eq!(
        (got.topic.as_str(), &got.payload[..], got.qos),
        ("devices/d1/status", &b"gone"[..], 1)
    );
    // Not before the dead node's heartbeat went stale.
    assert!(took >= Duration::from_secs(5), "published after {took:?}");
    assert!(
        within(&mut on_b, Duration::from_secs(2)).await.is_none(),
        "one copy"
    );
    drop(t.b);
}

#[tokio::test]
async fn a_delayed_will_of_a_killed_node_waits_for_its_delay() {
    let Some(t) = Two::start().await else { return };
    let delay = 20;
    let _device = with_will(&t.fx, t.a.mqtt, V::V5, "d2", delay).await;
    let mut on_b = watcher(&t, t.b.mqtt, "watch-b").await;
    let killed = Instant::now();
    t.a.kill();
    let got = within(
        &mut on_b,
        Duration::from_secs(delay.into()) + 2 * WILL_BOUND,
    )
    .await
    .expect("the delayed will arrived on the surviving node");
    let took = killed.elapsed();
    eprintln!("will with a {delay} s delay published {took:?} after its node was killed");
    assert_eq!(got.topic, "devices/d2/status");
    // The delay counts from the node's last heartbeat (at most 2 s before the kill, seen
    // up to 1 s late).
    assert!(took >= Duration::from_secs(15), "published after {took:?}");
    drop(t.b);
}

#[tokio::test]
async fn a_device_back_on_another_node_before_the_delay_passed_has_no_will_published() {
    let Some(mut t) = Two::start().await else {
        return;
    };
    let _device = with_will(&t.fx, t.a.mqtt, V::V5, "d3", 20).await;
    let mut on_b = watcher(&t, t.b.mqtt, "watch-b").await;
    t.a.kill();
    // Back at once, on the surviving node, on the same session.
    let creds = t.fx.client(&t.fx.device("d3.devices.example.com"));
    let back = Opts {
        clean: false,
        will: None,
    };
    let _again = Peer::connect(&creds, t.b.mqtt, V::V5, "d3", &back).await;
    t.b.wait_line("took over the will of a session on a node that died")
        .await;
    t.b.wait_line("will cancelled: the session has a new connection")
        .await;
    assert!(
        within(&mut on_b, Duration::from_secs(2)).await.is_none(),
        "no will once the device is back"
    );
}

#[tokio::test]
async fn a_will_cancelled_by_disconnect_is_not_published_when_its_node_dies() {
    let Some(t) = Two::start().await else { return };
    let quiet = with_will(&t.fx, t.a.mqtt, V::V4, "quiet", 0).await;
    let _kept = with_will(&t.fx, t.a.mqtt, V::V4, "kept", 0).await;
    quiet.disconnect().await;
    let mut on_b = watcher(&t, t.b.mqtt, "watch-b").await;
    t.a.kill();
    // Both records would be taken in one look at the dead node's wills.
    let got = within(&mut on_b, 2 * WILL_BOUND)
        .await
        .expect("the will of the device still connected arrived");
    assert_eq!(got.topic, "devices/kept/status");
    let more = within(&mut on_b, Duration::from_secs(3)).await;
    assert!(more.is_none(), "no other will: {more:?}");
    drop(t.b);
}

#[tokio::test]
async fn two_survivors_publish_each_will_of_a_dead_node_once() {
    let Some(t) = Two::start().await else { return };
    let body = format!(
        "{}\n{}\n{BACKEND_PROFILE}",
        Fixture::fleet_anchor(true),
        pinned("backend", "backend.pem", "backend")
    );
    let c = start_node(&t.fx, &t._nats, "c", &body).await;
    const N: usize = 6;
    let mut devices = Vec::new();
    for i in 0..N {
        devices.push(with_will(&t.fx, t.a.mqtt, V::V4, &format!("m{i}"), 0).await);
    }
    let mut on_b = watcher(&t, t.b.mqtt, "watch-b").await;
    let mut on_c = watcher(&t, c.mqtt, "watch-c").await;
    // Each survivor's copy must be able to reach the other's watcher.
    let mut probe_b = Peer::connect(&t.backend, t.b.mqtt, V::V5, "probe-b", &Opts::default()).await;
    let mut probe_c = Peer::connect(&t.backend, c.mqtt, V::V5, "probe-c", &Opts::default()).await;
    until_routed(&mut probe_b, &mut on_c, "devices/probe/status").await;
    until_routed(&mut probe_c, &mut on_b, "devices/probe/status").await;
    t.a.kill();
    let mut seen_b = Vec::new();
    let mut seen_c = Vec::new();
    // Late probes are not wills.
    let will = |m: Msg| (m.topic != "devices/probe/status").then_some(m.topic);
    let deadline = tokio::time::Instant::now() + 2 * WILL_BOUND;
    while seen_b.len() < N || seen_c.len() < N {
        tokio::select! {
            Some(m) = on_b.try_recv() => seen_b.extend(will(m)),
            Some(m) = on_c.try_recv() => seen_c.extend(will(m)),
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    // A second copy from the other survivor would come within moments.
    let grace = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        tokio::select! {
            Some(m) = on_b.try_recv() => seen_b.extend(will(m)),
            Some(m) = on_c.try_recv() => seen_c.extend(will(m)),
            () = tokio::time::sleep_until(grace) => break,
        }
    }
    let want: Vec<String> = (0..N).map(|i| format!("devices/m{i}/status")).collect();
    seen_b.sort();
    seen_c.sort();
    assert_eq!(seen_b, want, "on b: every will, once");
    assert_eq!(seen_c, want, "on c: every will, once");
    let published = |p: &Proc| {
        p.stderr()
            .matches("published the will of a session on a node that died")
            .count()
    };
    let (by_b, by_c) = (published(&t.b), published(&c));
    eprintln!("wills of the dead node published by b: {by_b}, by c: {by_c}");
    assert_eq!(by_b + by_c, N);
}

#[tokio::test]
async fn a_node_restarted_after_a_crash_has_its_old_wills_published_once() {
    let Some(t) = Two::start().await else { return };
    let _device = with_will(&t.fx, t.a.mqtt, V::V4, "r1", 0).await;
    let mut on_b = watcher(&t, t.b.mqtt, "watch-b").await;
    let killed = Instant::now();
    t.a.kill();
    // The same node again, a new run: the old run is dead at once, for both nodes.
    let config = t.fx.path("certmq-a.toml");
    let again = Proc::start(&t.fx, &config).await;
    let got = within(&mut on_b, 2 * WILL_BOUND)
        .await
        .expect("the old run's will arrived");
    eprintln!(
        "will of a crashed node's earlier run published {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(got.topic, "devices/r1/status");
    let more = within(&mut on_b, Duration::from_secs(3)).await;
    assert!(more.is_none(), "one copy only: {more:?}");
    let published = |p: &Proc| {
        p.stderr()
            .matches("published the will of a session on a node that died")
            .count()
    };
    assert_eq!(published(&again) + published(&t.b), 1);
}

/// The compare-and-set survivors race with: of many nodes erasing one revision of a will
/// record at once, exactly one succeeds, and a revision replaced since is nobody's.
#[tokio::test]
async fn erasing_a_will_record_gives_it_to_exactly_one_of_the_racers() {
    use certmq::cluster::{erasable_bucket, erase, Cluster};
    let Some(nats) = Nats::start() else { return };
    let settings = certmq::config::Cluster {
        node: "racer".into(),
        nats: vec![nats.url()],
        prefix: "race".into(),
        replicas: 1,
        credentials: None,
        tls_ca: None,
    };
    let cluster = Cluster::connect(&settings).await.expect("connected");
    let store = erasable_bucket(&cluster, "wills", "test")
        .await
        .expect("bucket");
    for round in 0..20 {
        let key = format!("k{round}.00");
        let revision = store.put(&key, "v".into()).await.expect("put");
        let racers: Vec<_> = (0..8)
            .map(|_| {
                let (cluster, stream) = (cluster.clone(), store.stream_name.clone());
                tokio::spawn(async move { erase(&cluster, &stream, revision).await })
            })
            .collect();
        let mut won = 0;
        for r in racers {
            if r.await.expect("joined").expect("an answer") {
                won += 1;
            }
        }
        assert_eq!(won, 1, "round {round}");
        assert!(
            store.entry(&key).await.expect("read").is_none(),
            "no marker left"
        );
    }
    let first = store.put("moved.00", "1".into()).await.expect("put");
    store.put("moved.00", "2".into()).await.expect("put");
    assert!(!erase(&cluster, &store.stream_name, first)
        .await
        .expect("an answer"));
    assert!(store.entry("moved.00").await.expect("read").is_some());
}

/// A node stopped gracefully (SIGTERM) publishes no will for the connections it closes
/// (as standalone), and hands the wills still waiting out their delay to the others at
/// once, rather than after its heartbeat goes stale.
#[tokio::test]
async fn a_node_stopped_gracefully_hands_over_its_waiting_wills_at_once() {
    let Some(mut t) = Two::start().await else {
        return;
    };
    let _closed = with_will(&t.fx, t.a.mqtt, V::V4, "closed", 0).await;
    let waiting = with_will(&t.fx, t.a.mqtt, V::V5, "waiting", 3).await;
    let mut on_b = watcher(&t, t.b.mqtt, "watch-b").await;
    // Gone without DISCONNECT: its will waits 3 s on node a.
    waiting.drop_tcp().await;
    let ended = t.a.wait_line("session ended").await;
    assert!(ended.contains("waiting"), "{ended}");
    let stopped = Instant::now();
    t.a.signal("TERM");
    t.a.wait_exit(WAIT).await;
    let got = within(&mut on_b, 2 * WILL_BOUND)
        .await
        .expect("the waiting will arrived");
    let took = stopped.elapsed();
    eprintln!("waiting will of a stopped node published {took:?} after SIGTERM");
    assert_eq!(got.topic, "devices/waiting/status");
    // Not after the 10 s a stale heartbeat takes.
    assert!(took < Duration::from_secs(8), "published after {took:?}");
    let more = within(&mut on_b, Duration::from_secs(3)).await;
    assert!(
        more.is_none(),
        "no will for the closed connection: {more:?}"
    );
}

/// A node frozen for longer than the dead-node bound is taken for dead: the surviving
/// node publishes the wills of its devices (they may still be connected to it: nothing
/// tells a dead node from an unreachable one). Back, the node learns that its records were
/// taken over and does not publish those wills a second time when the connections end.
#[tokio::test]
async fn a_node_taken_for_dead_does_not_publish_the_wills_taken_over_again() {
    let Some(mut t) = Two::start().await else {
        return;
    };
    let device = with_will(&t.fx, t.a.mqtt, V::V4, "frozen", 0).await;
    let mut on_b = watcher(&t, t.b.mqtt, "watch-b").await;
    t.a.signal("STOP");
    t.b.wait_line("published the will of a session on a node that died")
        .await;
    t.a.signal("CONT");
    let got = within(&mut on_b, WAIT).await.expect("the survivor's copy");
    assert_eq!(got.topic, "devices/frozen/status");
    t.a.wait_line("taken over by another node").await;
    // The connection ends now, without DISCONNECT: its will was published already.
    device.drop_tcp().await;
    let ended = tokio::time::timeout(WAIT, async {
        while !t.a.stderr().contains("session ended peer") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the connection never ended:\n{}",
        t.a.stderr()
    );
    let more = within(&mut on_b, Duration::from_secs(2)).await;
    assert!(
        more.is_none(),
        "a second copy: {more:?}; node a:\n{}\nnode b:\n{}",
        t.a.stderr(),
        t.b.stderr()
    );
    assert!(
        t.a.stderr().contains("will not published here"),
        "node a:\n{}",
        t.a.stderr()
    );
}

/// MQTT 5: a new connection for the session before the will delay passed cancels the
/// will, also when it opens on another node than the one the will waits on.
#[tokio::test]
async fn a_delayed_will_is_cancelled_by_a_connection_on_another_node() {
    let Some(mut t) = Two::start().await else {
        return;
    };
    let device = with_will(&t.fx, t.a.mqtt, V::V5, "moved", 4).await;
    let mut on_b = watcher(&t, t.b.mqtt, "watch-b").await;
    device.drop_tcp().await;
    let ended = t.a.wait_line("session ended").await;
    assert!(ended.contains("moved"), "{ended}");
    let creds = t.fx.client(&t.fx.device("moved.devices.example.com"));
    let back = Opts {
        clean: false,
        will: None,
    };
    let _again = Peer::connect(&creds, t.b.mqtt, V::V5, "moved", &back).await;
    t.a.wait_line("will not published here").await;
    let more = within(&mut on_b, Duration::from_secs(3)).await;
    assert!(more.is_none(), "the device is back: {more:?}");
}

/// The example node configs in contrib/cluster/ are valid but for the certificate files
/// an operator puts in /etc/certmq: no unknown key, no bad value.
#[test]
fn the_example_cluster_configs_hold_no_problem_but_the_missing_certificates() {
    let fx = Fixture::new();
    for node in ["a", "b"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("contrib/cluster/certmq-{node}.toml"));
        let out = certmq(fx.dir.path(), &["check", "--config", arg(&path)]);
        assert_eq!(out.code, Some(1), "{out:?}");
        let problems: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.starts_with("  "))
            .filter(|l| !l.contains("/etc/certmq/"))
            .collect();
        assert!(problems.is_empty(), "{problems:#?}");
        assert!(out.stderr.contains("3 problem(s)"), "{out:?}");
    }
}

/// A PUBACK a pipelined QoS 1 publisher saw: packet id, reason, when.
type Ack = (u16, u8, Instant);
type Acks = std::sync::Arc<std::sync::Mutex<Vec<Ack>>>;

/// Waits (bounded) until the acknowledgements seen satisfy `pred`.
async fn until(what: &str, acks: &Acks, pred: impl Fn(&[Ack]) -> bool) {
    let deadline = Instant::now() + WAIT;
    while !pred(&acks.lock().unwrap()) {
        assert!(Instant::now() < deadline, "no {what} within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// NATS stopped (kill -9) and restarted in the middle of a QoS 1 stream from node a to a
/// subscriber on node b: while it is away nothing is acknowledged with success (0x97
/// instead), acknowledgements with success resume within 10 s of its return, and every
/// message acknowledged with success reaches the subscriber.
#[tokio::test]
async fn nats_stopped_and_restarted_under_load_acknowledges_only_what_was_stored() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let Some(mut t) = Two::start().await else {
        return;
    };
    let mut sub = Peer::connect(&t.backend, t.b.mqtt, V::V5, "sub", &Opts::default()).await;
    assert_eq!(sub.subscribe("load/#", 1).await, 1);
    let mut probe = Peer::connect(&t.backend, t.a.mqtt, V::V5, "probe", &Opts::default()).await;
    until_routed(&mut probe, &mut sub, "load/probe").await;

    let (first, publisher) = t
        .backend
        .raw_first_packet(t.a.mqtt, &RawConnect::new(V::V5, "pub").bytes())
        .await
        .expect("CONNACK");
    assert_eq!(first[3], 0, "CONNACK {first:02x?}");
    let (mut rd, mut wr) = tokio::io::split(publisher);
    let stop = Arc::new(AtomicBool::new(false));
    let halt = stop.clone();
    let writer = tokio::spawn(async move {
        for i in 1..=60_000u16 {
            if halt.load(Ordering::SeqCst) {
                return;
            }
            let topic = format!("load/{i}");
            let p = raw_publish(V::V5, &topic, b"payload", 1, i, false);
            if wr.write_all(&p).await.is_err() {
                return;
            }
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let acks: Acks = Arc::default();
    let seen = acks.clone();
    let reader = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut head = [0u8; 2];
        while rd.read_exact(&mut head).await.is_ok() {
            let mut rest = vec![0u8; usize::from(head[1])];
            if rd.read_exact(&mut rest).await.is_err() {
                return;
            }
            if head[0] == PUBACK {
                let pkid = u16::from_be_bytes([rest[0], rest[1]]);
                let reason = rest.get(2).copied().unwrap_or(0);
                seen.lock().unwrap().push((pkid, reason, Instant::now()));
            }
        }
    });
    until("200 acknowledgements", &acks, |a| a.len() >= 200).await;
    t._nats.stop();
    until("refusal while NATS is away", &acks, |a| {
        a.iter().any(|(_, r, _)| *r == 0x97)
    })
    .await;
    let refused_at = acks.lock().unwrap().len();
    t._nats.restart();
    let back = Instant::now();
    until("success after NATS returned", &acks, |a: &[Ack]| {
        a[refused_at..]
            .iter()
            .any(|(_, r, at)| *r == 0 && *at > back)
    })
    .await;
    let recovered = acks.lock().unwrap()[refused_at..]
        .iter()
        .find(|(_, r, at)| *r == 0 && *at > back)
        .map(|(_, _, at)| at.duration_since(back))
        .unwrap();
    eprintln!("QoS 1 acknowledged with success again {recovered:?} after NATS restarted");
    assert!(
        recovered < Duration::from_secs(10),
        "recovered after {recovered:?}"
    );
    let total = acks.lock().unwrap().len();
    until("200 more acknowledgements", &acks, |a: &[Ack]| {
        a.len() >= total + 200
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let _ = writer.await;

    let ok: std::collections::BTreeSet<String> = acks
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, r, _)| *r == 0)
        .map(|(pkid, _, _)| format!("load/{pkid}"))
        .collect();
    let refused = acks
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, r, _)| *r != 0)
        .count();
    let mut got = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok.is_subset(&got) && Instant::now() < deadline {
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(1), sub.try_recv()).await {
            got.insert(m.topic);
        }
    }
    let missing: Vec<&String> = ok.difference(&got).collect();
    eprintln!(
        "{} acknowledged, {refused} refused, {} missing",
        ok.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "{} messages acknowledged with success never arrived: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    reader.abort();
}

/// A subscription to a filter whose NATS subject would be longer than nats-server's
/// `max_control_line` (4,096 bytes) used to be a `SUB` line the server answers with
/// `-ERR 'maximum control line exceeded'` and a close, sent again after every reconnect:
/// the node stayed off NATS. Such a filter now matches messages of its node only, and the
/// node stays healthy and keeps storing QoS 1 messages.
#[tokio::test]
async fn a_filter_too_long_for_a_nats_subject_keeps_the_node_on_nats() {
    let Some(t) = Two::start().await else { return };
    wait_health(&t.b, 200).await;
    let mut long = Peer::connect(&t.backend, t.b.mqtt, V::V5, "long", &Opts::default()).await;
    let filter = format!("long/{}", "x".repeat(5000));
    assert_eq!(long.subscribe(&filter, 0).await, 0);
    let mut statuses = Vec::new();
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        statuses.push(t.b.get("/healthz").await.0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut on_b = Peer::connect(&t.backend, t.b.mqtt, V::V5, "pub-b", &Opts::default()).await;
    let code = on_b.publish("ok/x", 1, false, b"x").await;
    let unhealthy = statuses.iter().filter(|s| **s != 200).count();
    assert!(
        unhealthy == 0 && code == 0,
        "{unhealthy} of {} /healthz samples not 200; QoS 1 PUBLISH on b: {code:#x}\n{}",
        statuses.len(),
        t.b.stderr()
    );
    // Still served on its node: a message on a topic that long is delivered locally.
    let topic = format!("long/{}", "x".repeat(5000));
    assert_eq!(on_b.publish(&topic, 0, false, b"local").await, 0);
    assert_eq!(long.recv().await.topic, topic);
}

/// A message with Message Expiry Interval 1 published on a reaches its subscriber on b:
/// the expiry crosses in whole seconds rounded up, measured from the millisecond.
#[tokio::test]
async fn a_one_second_expiry_crosses_nodes() {
    let Some(t) = Two::start().await else { return };
    let mut sub = Peer::connect(&t.backend, t.b.mqtt, V::V5, "exp-sub", &Opts::default()).await;
    assert_eq!(sub.subscribe("exp/#", 1).await, 1);
    let (mut raw, _) = Raw::connect_ok(
        &t.backend,
        t.a.mqtt,
        &RawConnect::new(V::V5, "exp-pub").bytes(),
    )
    .await;
    let topic = b"exp/one";
    let mut body = vec![0, topic.len() as u8];
    body.extend_from_slice(topic);
    body.extend_from_slice(&[0, 1]); // packet id
    body.extend_from_slice(&[5, 0x02, 0, 0, 0, 1]); // Message Expiry Interval 1
    body.extend_from_slice(b"short-lived");
    let mut pkt = vec![0x32, body.len() as u8];
    pkt.extend_from_slice(&body);
    raw.send(&pkt).await;
    assert_eq!(raw.recv().await[0], PUBACK);
    raw.send(&raw_publish(V::V5, "exp/one", b"marker", 1, 2, false))
        .await;
    assert_eq!(raw.recv().await[0], PUBACK);
    let first = sub.recv().await;
    assert_eq!(
        String::from_utf8_lossy(&first.payload),
        "short-lived",
        "the 1 s message was not delivered on the other node"
    );
}

/// A QoS 1 message on a topic no NATS subject can carry (white space) stays on its node;
/// a persistent session there still gets it (routers otherwise leave persistent sessions
/// to their JetStream consumers, which never see such a topic).
#[tokio::test]
async fn a_topic_that_cannot_cross_nodes_still_reaches_a_persistent_session_on_its_node() {
    let Some(t) = Two::start().await else { return };
    let persistent = Opts {
        clean: false,
        will: None,
    };
    let mut sub = Peer::connect(&t.backend, t.a.mqtt, V::V5, "ws-sub", &persistent).await;
    assert_eq!(sub.subscribe("ws/#", 1).await, 1);
    let mut pa = Peer::connect(&t.backend, t.a.mqtt, V::V5, "ws-pub", &Opts::default()).await;
    assert_eq!(pa.publish("ws/a b", 1, false, b"spaced").await, 0);
    let m = sub.recv().await;
    assert_eq!((m.topic.as_str(), m.qos), ("ws/a b", 1));
}

/// No Local across nodes: a message another node accepted from the connection of
/// (device, client id) is not delivered to a No Local subscription of the session with that
/// key here (the client moved to this node while its message was on the way), as on one
/// node. Driven by a message published straight to NATS with the envelope a node writes,
/// so the move needs no race; a second subscriber shows the message did arrive.
#[tokio::test]
async fn no_local_holds_for_a_message_from_the_same_client_on_another_node() {
    use crate::common::v5tests::Raw5;
    use rumqttc::v5::mqttbytes::v5::Filter;
    use rumqttc::v5::mqttbytes::QoS;
    let Some(t) = Two::start().await else { return };
    let mut own = Raw5::open(&t.backend, t.b.mqtt, "mover").await;
    let mut no_local = Filter::new("nl/#", QoS::AtMostOnce);
    no_local.nolocal = true;
    own.subscribe(vec![no_local], None).await;
    let mut other = Raw5::open(&t.backend, t.b.mqtt, "watcher").await;
    other.sub("nl/#", QoS::AtMostOnce).await;

    let nats = async_nats::connect(t._nats.url()).await.expect("NATS");
    let send = |client: &'static str, payload: &'static str| {
        let nats = nats.clone();
        async move {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Certmq-Node", "elsewhere");
            h.insert("Certmq-Run", "elsewhere-run");
            h.insert("Certmq-Id", payload);
            h.insert("Certmq-Qos", "0");
            h.insert("Certmq-Device", "backend");
            h.insert("Certmq-Client", format!("\"{client}\"").as_str());
            nats.publish_with_headers("certmq.m.nl.x", h, payload.into())
                .await
                .expect("publish");
            nats.flush().await.expect("flush");
        }
    };
    // The core subscription reaches NATS after SUBACK: repeat until the watcher sees one.
    let deadline = Instant::now() + WAIT;
    loop {
        send("someone", "probe").await;
        if let Ok(p) = tokio::time::timeout(Duration::from_millis(300), other.next_publish()).await
        {
            assert_eq!(p.payload, "probe");
            break;
        }
        assert!(Instant::now() < deadline, "no probe reached node b");
    }
    send("mover", "own").await;
    send("someone", "marker").await;
    let seen = other.until_payload(b"marker").await;
    assert!(seen.iter().any(|p| p.payload == "own"), "{seen:?}");
    // The mover gets the probes (from another client) but never its own message.
    let got = own.until_payload(b"marker").await;
    assert!(got.iter().all(|p| p.payload != "own"), "{got:?}");
}

/// A slow but progressing QoS 1 subscriber on b paces b's consumer (docs/cluster.md, "Flow
/// control across nodes") past JetStream's acknowledgement wait (30 s) for the messages
/// pulled behind the one it waits on, which JetStream then sends again; a QoS 2
/// subscriber beside it still gets each message once. Takes about 110 s.
#[tokio::test]
async fn pacing_by_a_slow_subscriber_does_not_duplicate_qos2() {
    use std::collections::HashMap;
    let Some(t) = Two::start().await else { return };
    let mut fast = Peer::connect(&t.backend, t.b.mqtt, V::V5, "fast", &Opts::default()).await;
    assert_eq!(fast.subscribe("dup/#", 2).await, 2);
    let (mut slow, _) = Raw::connect_ok(
        &t.backend,
        t.b.mqtt,
        &RawConnect::new(V::V4, "slow").bytes(),
    )
    .await;
    assert_eq!(slow.subscribe("dup/#", 1).await, 1);
    // Reads every PUBLISH, acknowledges one every 400 ms: never stalled, always full.
    let slow_task = tokio::spawn(async move {
        let mut unacked = std::collections::VecDeque::new();
        for _ in 0..64 {
            unacked.push_back(slow.next_publish().await.pkid);
        }
        loop {
            tokio::time::sleep(Duration::from_millis(400)).await;
            if let Some(p) = unacked.pop_front() {
                slow.send(&raw_ack(PUBACK, p)).await;
            }
            unacked.push_back(slow.next_publish().await.pkid);
        }
    });
    let mut on_a = Peer::connect(&t.backend, t.a.mqtt, V::V5, "pub", &Opts::default()).await;
    const N: usize = 1300;
    for i in 0..N {
        assert_eq!(
            on_a.publish("dup/x", 1, false, format!("m{i}").as_bytes())
                .await,
            0
        );
    }
    let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
    let until = Instant::now() + Duration::from_secs(110);
    while Instant::now() < until {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, fast.try_recv()).await {
            Ok(Some(m)) => {
                let n = seen.entry(m.payload).or_default();
                *n += 1;
                if *n > 1 || seen.len() == N {
                    break;
                }
            }
            _ => break,
        }
    }
    slow_task.abort();
    let dups: Vec<_> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(p, n)| (String::from_utf8_lossy(p).into_owned(), *n))
        .collect();
    assert!(
        dups.is_empty(),
        "{} of {} distinct messages delivered more than once at QoS 2, e.g. {:?}",
        dups.len(),
        seen.len(),
        &dups[..dups.len().min(5)]
    );
}
