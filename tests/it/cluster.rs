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
struct Two {
    _nats: Nats,
    fx: Fixture,
    a: Proc,
    b: Proc,
    backend: crate::common::Client,
}

impl Two {
    async fn start() -> Option<Two> {
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
