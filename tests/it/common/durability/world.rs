//! The kill -9 scenarios' world: a config with the fleet anchor and a pinned `backend`,
//! the persistent subscriber `S`, numbered streams from two publishers cut short by
//! SIGKILL, and the final drain up to a marker.

use std::collections::BTreeSet;
use std::path::PathBuf;

use tokio::sync::mpsc;

use super::flows::{publish_numbers, Receiver, MARKER};
use crate::common::coretests::raw::Raw;
use crate::common::ops::{pinned_backend, Proc};
use crate::common::{Client, Fixture, WAIT};

/// The topic every numbered stream goes to; `S` subscribes to `devices/+/t`.
pub fn topic(device: &str) -> String {
    format!("devices/{device}/t")
}

/// A fixture whose config has the fleet anchor (devices `dev-N` provisioned on first
/// connect, `device` ACL) and a pinned `backend` that may subscribe to everything.
pub struct World {
    pub fx: Fixture,
    pub config: PathBuf,
    pub backend: Client,
}

impl World {
    /// `limits` are extra `[limits]` lines (e.g. `max_inflight = 1`).
    pub fn new(limits: &str) -> World {
        let fx = Fixture::new();
        let (section, backend) = pinned_backend(&fx);
        let config = fx.config(&format!(
            "{limits}\n\n{}\n{section}",
            Fixture::fleet_anchor(true)
        ));
        World {
            fx,
            config,
            backend,
        }
    }

    /// A device client `name` under the fleet anchor.
    pub fn device(&self, name: &str) -> Client {
        self.fx
            .client(&self.fx.device(&format!("{name}.devices.example.com")))
    }
}

pub fn seed(default: u64) -> u64 {
    let seed = std::env::var("CERTMQ_DURABILITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    eprintln!("seed {seed} (CERTMQ_DURABILITY_SEED)");
    seed
}

/// The persistent subscriber `S` (MQTT 3.1.1, clean session 0) subscribes to
/// `devices/+/t` and goes offline, so everything after this must be queued durably.
pub async fn create_offline_subscriber(w: &World, broker: &Proc, qos: u8) {
    let (mut s, present) = Raw::connect_session(&w.backend, broker.mqtt, "S", false, None).await;
    assert!(!present);
    assert_eq!(s.subscribe("devices/+/t", qos).await, qos);
    s.disconnect().await;
}

/// Two publishers (dev-1, dev-2) stream `per_publisher` numbered messages each; the broker
/// is SIGKILLed after the `kill_at`-th acknowledgement. Returns what was acknowledged.
pub async fn stream_then_kill(
    w: &World,
    broker: Proc,
    qos: u8,
    first: u32,
    per_publisher: usize,
    kill_at: usize,
) -> BTreeSet<u32> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for (i, dev) in ["dev-1", "dev-2"].into_iter().enumerate() {
        let start = first + (i * per_publisher) as u32;
        let numbers: Vec<u32> = (start..start + per_publisher as u32).collect();
        tasks.push(tokio::spawn(publish_numbers(
            w.device(dev),
            broker.mqtt,
            format!("pub-{dev}"),
            topic(dev),
            qos,
            numbers,
            tx.clone(),
        )));
    }
    drop(tx);
    let mut acked = BTreeSet::new();
    while acked.len() < kill_at {
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(n)) => {
                acked.insert(n);
            }
            Ok(None) => break,
            Err(_) => panic!("no acknowledgement within {WAIT:?}:\n{}", broker.stderr()),
        }
    }
    broker.kill();
    // Acknowledgements already on their way still count: the broker sent them.
    while let Some(n) = rx.recv().await {
        acked.insert(n);
    }
    for t in tasks {
        t.await.expect("publisher task");
    }
    acked
}

/// Publishes the marker from dev-1 (QoS 1, acknowledged).
pub async fn publish_marker(w: &World, broker: &Proc) {
    let (mut p, _) =
        Raw::connect_session(&w.device("dev-1"), broker.mqtt, "marker", true, None).await;
    assert_eq!(
        p.publish_acked(1, false, 1, &topic("dev-1"), MARKER).await,
        0
    );
}

/// Reconnects `S` and drains its session up to the marker.
pub async fn drain_to_marker(w: &World, rx: &mut Receiver) {
    let broker = Proc::start(&w.fx, &w.config).await;
    let (mut s, present) = Raw::connect_session(&w.backend, broker.mqtt, "S", false, None).await;
    assert!(present, "S's session must survive every restart");
    publish_marker(w, &broker).await;
    let marked = rx.run(&mut s, None).await;
    assert_eq!(marked, Ok(true), "draining S:\n{}", broker.stderr());
}
