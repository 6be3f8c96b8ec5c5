//! Cluster mode (contract §12) against a real nats-server with JetStream started by each
//! test, and certmq nodes as subprocesses.

use std::time::Duration;

use crate::common::cluster::{node_config, start_node};
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
