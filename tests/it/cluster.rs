//! Cluster mode (contract §12) against a real nats-server with JetStream started by each
//! test, and certmq nodes as subprocesses.

use std::time::Duration;

use crate::common::cluster::{node_config, start_node};
use crate::common::coretests::{Opts, Peer, V};
use crate::common::nats::Nats;
use crate::common::ops::{pinned, Proc, BACKEND_PROFILE};
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
    nats.stop();
    let body = wait_health(&node, 503).await;
    assert!(body.contains("not connected to NATS"), "{body}");
    nats.restart();
    wait_health(&node, 200).await;
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
