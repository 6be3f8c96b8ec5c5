//! The cluster's device registry (contract §12, docs/cluster.md "Registry"): a real
//! nats-server with JetStream per test, two certmq nodes as subprocesses, and the
//! `certmq devices` CLI with a `[cluster]` config, over real TLS clients.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use certmq::cert::Fingerprint;
use certmq::pki::{Ca, Issued, LeafSpec, Validity};

use crate::common::cluster::start_node;
use crate::common::coretests::raw::{Raw, RawDisconnect};
use crate::common::nats::Nats;
use crate::common::ops::{config, open_v5, Proc};
use crate::common::run::{arg, certmq};
use crate::common::{Fixture, Outcome, WAIT};

const NOT_AUTHORIZED_V5: u8 = 0x87;
const SERVER_UNAVAILABLE_V5: u8 = 0x88;
const SERVER_UNAVAILABLE_V311: u8 = 3;
const PROVISIONED: &str = "certmq_devices_provisioned_total";
/// How long a registry change may take to cut a session on another node before a test
/// fails. The contract says 2 s; the bound is generous for a loaded 2-core machine and
/// the figure measured is printed.
const CUT_BOUND: Duration = Duration::from_secs(5);

/// The fleet anchor and a second anchor, "other", with the same CN regex: one device
/// name can come from either, and a certificate of one may never take over a device of
/// the other.
fn two_anchors(fx: &Fixture) -> (String, Ca) {
    let other = fx
        .root
        .intermediate("Test Other CA", Validity::days(-10, 3650), None)
        .expect("other CA");
    fx.write("other.pem", &other.cert_pem());
    let body = format!(
        "{}\n[[anchor]]\nname = \"other\"\ncertificate = \"other.pem\"\ncn_regex = '^(.+)\\.devices\\.example\\.com$'\ncreate_devices = true\n",
        Fixture::fleet_anchor(true)
    );
    (body, other)
}

/// A device certificate of `ca` whose notBefore is `seconds_ago` before now.
fn leaf(ca: &Ca, cn: &str, seconds_ago: i64) -> Issued {
    let mut spec = LeafSpec::device(cn);
    let now = Validity::days(0, 365);
    spec.validity = Validity {
        not_before: now.not_before - time::Duration::seconds(seconds_ago),
        not_after: now.not_after,
    };
    ca.issue(&spec).expect("leaf")
}

/// `certmq devices ARGS --config PATH`: exit code, stdout, stderr.
fn devices_run(fx: &Fixture, path: &Path, args: &[&str]) -> crate::common::run::Run {
    let mut all = vec!["devices"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--config", arg(path)]);
    certmq(fx.dir.path(), &all)
}

/// `certmq devices ARGS --config PATH`, asserting exit 0; its stdout.
fn devices(fx: &Fixture, path: &Path, args: &[&str]) -> String {
    let run = devices_run(fx, path, args);
    assert_eq!(run.code, Some(0), "certmq devices {args:?}: {run:?}");
    run.stdout
}

/// `devices list --json`.
fn list(fx: &Fixture, path: &Path) -> Vec<serde_json::Value> {
    let out = devices(fx, path, &["list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON list");
    v.as_array().expect("an array").clone()
}

/// `devices show NAME --json`.
fn show(fx: &Fixture, path: &Path, name: &str) -> serde_json::Value {
    serde_json::from_str(&devices(fx, path, &["show", name, "--json"])).expect("JSON device")
}

fn node_config(fx: &Fixture, node: &str) -> PathBuf {
    fx.path(&format!("certmq-{node}.toml"))
}

async fn provisioned(node: &Proc) -> f64 {
    node.metric(PROVISIONED).await.unwrap_or(0.0)
}

async fn refusals(node: &Proc, reason: &str) -> f64 {
    node.metric(&format!(
        "certmq_auth_refusals_total{{reason=\"{reason}\"}}"
    ))
    .await
    .unwrap_or(0.0)
}

/// Polls `/healthz` until its status is `want`.
async fn wait_health(node: &Proc, want: u16) {
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
}

const ROUNDS: usize = 20;

/// Two certificates for one new name, from two anchors, reach two nodes at once: each
/// round exactly one is admitted and provisions the name for its anchor; the other is
/// refused with 0x87 as bound elsewhere (never a second entry, never a takeover).
#[tokio::test]
async fn a_provisioning_race_across_nodes_has_one_winner_and_one_clean_refusal() {
    let Some(nats) = Nats::start() else {
        return;
    };
    let fx = Fixture::new();
    let (body, other) = two_anchors(&fx);
    let a = start_node(&fx, &nats, "a", &body).await;
    let b = start_node(&fx, &nats, "b", &body).await;
    let mut winners = Vec::new();
    for round in 0..ROUNDS {
        let cn = format!("race-{round}.devices.example.com");
        let fleet = fx.client(&fx.device(&cn));
        let rival = fx.client(&other.issue(&LeafSpec::device(&cn)).expect("leaf"));
        // Both orders: the fleet certificate goes to node a in even rounds, to b in odd.
        let ((to_a, anchor_a), (to_b, anchor_b)) = if round % 2 == 0 {
            ((&fleet, "fleet"), (&rival, "other"))
        } else {
            ((&rival, "other"), (&fleet, "fleet"))
        };
        let (at_a, at_b) = tokio::join!(to_a.connect_v5(a.mqtt, "c"), to_b.connect_v5(b.mqtt, "c"));
        let winner = match (&at_a, &at_b) {
            (Outcome::Accepted, Outcome::Refused(NOT_AUTHORIZED_V5)) => ("a", anchor_a),
            (Outcome::Refused(NOT_AUTHORIZED_V5), Outcome::Accepted) => ("b", anchor_b),
            other => panic!("round {round}: not one winner and one refusal: {other:?}"),
        };
        winners.push(winner);
    }
    let entries = list(&fx, &node_config(&fx, "a"));
    for (round, (_, anchor)) in winners.iter().enumerate() {
        let name = format!("race-{round}");
        let held: Vec<_> = entries.iter().filter(|d| d["name"] == name).collect();
        assert_eq!(held.len(), 1, "{name}: {entries:?}");
        assert_eq!(held[0]["source"], *anchor, "{name}: bound to the winner");
    }
    let provisions = provisioned(&a).await + provisioned(&b).await;
    assert_eq!(
        provisions, ROUNDS as f64,
        "exactly one provisioning per round"
    );
    let bound = refusals(&a, "bound_elsewhere").await + refusals(&b, "bound_elsewhere").await;
    assert_eq!(
        bound, ROUNDS as f64,
        "every loser refused as bound elsewhere"
    );
    let won_by_a = winners.iter().filter(|(n, _)| *n == "a").count();
    eprintln!(
        "provisioning race: {ROUNDS} rounds, node a won {won_by_a}, node b won {}",
        ROUNDS - won_by_a
    );
}

/// One certificate for one new name reaches two nodes at once: one provisions, the other
/// loses the compare-and-set, reads the entry and finds the same certificate known. Both
/// connect; the cluster counts one provisioning per name.
#[tokio::test]
async fn the_same_new_device_on_two_nodes_at_once_is_provisioned_once() {
    let Some(nats) = Nats::start() else {
        return;
    };
    let fx = Fixture::new();
    let body = Fixture::fleet_anchor(true);
    let a = start_node(&fx, &nats, "a", &body).await;
    let b = start_node(&fx, &nats, "b", &body).await;
    let mut fingerprints = Vec::new();
    for round in 0..ROUNDS {
        let leaf = fx.device(&format!("twin-{round}.devices.example.com"));
        let client = fx.client(&leaf);
        let (at_a, at_b) = tokio::join!(
            client.connect_v5(a.mqtt, "ca"),
            client.connect_v5(b.mqtt, "cb")
        );
        assert_eq!(
            (&at_a, &at_b),
            (&Outcome::Accepted, &Outcome::Accepted),
            "round {round}"
        );
        fingerprints.push(Fingerprint::of(&leaf.cert_der).to_hex());
    }
    let entries = list(&fx, &node_config(&fx, "b"));
    for (round, fp) in fingerprints.iter().enumerate() {
        let name = format!("twin-{round}");
        let held: Vec<_> = entries.iter().filter(|d| d["name"] == name).collect();
        assert_eq!(held.len(), 1, "{name}: {entries:?}");
        assert_eq!(held[0]["fingerprint"], fp.as_str());
    }
    let (pa, pb) = (provisioned(&a).await, provisioned(&b).await);
    assert_eq!(pa + pb, ROUNDS as f64, "one provisioning per name");
    eprintln!("same-certificate race: {ROUNDS} rounds, node a provisioned {pa}, node b {pb}");
}

/// Runs `certmq devices ARGS` (off the async workers) while waiting for the DISCONNECT of
/// `session`; returns it with the time from the command's start to the DISCONNECT and
/// from the command's exit to the DISCONNECT (zero when it came first).
async fn cut_by_cli(
    fx: &Fixture,
    path: &Path,
    args: &[&str],
    session: &mut Raw,
) -> (RawDisconnect, Duration, Duration) {
    let (dir, path) = (fx.dir.path().to_path_buf(), path.to_path_buf());
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let start = Instant::now();
    let cli = tokio::task::spawn_blocking(move || {
        let mut all: Vec<&str> = vec!["devices"];
        all.extend(args.iter().map(String::as_str));
        all.extend(["--config", arg(&path)]);
        let run = certmq(&dir, &all);
        (run, Instant::now())
    });
    let bye = session
        .expect_disconnect(CUT_BOUND + Duration::from_secs(10))
        .await;
    let cut_at = Instant::now();
    let (run, cli_done) = cli.await.expect("CLI task");
    assert_eq!(run.code, Some(0), "{run:?}");
    (
        bye,
        cut_at - start,
        cut_at.saturating_duration_since(cli_done),
    )
}

/// `certmq devices disable` (and `delete`) through a cluster config, run while the device
/// is connected to another node: the node's KV watch cuts the session.
#[tokio::test]
async fn devices_disable_through_the_cli_cuts_a_session_on_another_node() {
    let Some(nats) = Nats::start() else {
        return;
    };
    let fx = Fixture::new();
    let body = Fixture::fleet_anchor(true);
    let a = start_node(&fx, &nats, "a", &body).await;
    let b = start_node(&fx, &nats, "b", &body).await;
    let cert = fx.device("d1.devices.example.com");
    let dev = fx.client(&cert);
    let mut live = open_v5(&dev, b.mqtt, "d1").await;
    let cli_config = node_config(&fx, "a");

    let (bye, from_start, after_exit) =
        cut_by_cli(&fx, &cli_config, &["disable", "d1"], &mut live).await;
    assert_eq!(bye.code, NOT_AUTHORIZED_V5, "{bye:?}");
    assert!(bye.reason.contains("disabled"), "{bye:?}");
    eprintln!(
        "devices disable -> DISCONNECT on the other node: {from_start:?} from the command's start, {after_exit:?} after it exited"
    );
    assert!(from_start < CUT_BOUND, "{from_start:?}");
    assert_eq!(show(&fx, &cli_config, "d1")["enabled"], false);
    // `explain` with a cluster config consults the bucket too.
    let pem = fx.write("d1.pem", &cert.cert_pem);
    let run = certmq(
        fx.dir.path(),
        &[
            "explain",
            "--cert",
            arg(&pem),
            "--json",
            "--config",
            arg(&cli_config),
        ],
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    let explained: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(explained["reason_code"], "disabled", "{run:?}");
    // Refused on both nodes while disabled, from their mirrors.
    for node in [&a, &b] {
        assert_eq!(
            dev.connect_v5(node.mqtt, "d1").await,
            Outcome::Refused(NOT_AUTHORIZED_V5)
        );
    }

    devices(&fx, &cli_config, &["enable", "d1"]);
    let mut live = tokio::time::timeout(WAIT, async {
        loop {
            if dev.connect_v5(a.mqtt, "probe").await == Outcome::Accepted {
                return open_v5(&dev, a.mqtt, "d1").await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("enabled again on node a");
    live.ping().await;

    // Delete from the other side: the CLI with node b's config, the session on node a.
    let (bye, from_start, _) =
        cut_by_cli(&fx, &node_config(&fx, "b"), &["delete", "d1"], &mut live).await;
    assert_eq!(bye.code, NOT_AUTHORIZED_V5, "{bye:?}");
    assert!(bye.reason.contains("deleted"), "{bye:?}");
    eprintln!("devices delete -> DISCONNECT on the other node: {from_start:?}");
    assert!(from_start < CUT_BOUND, "{from_start:?}");
    let run = devices_run(&fx, &cli_config, &["show", "d1"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    let run = devices_run(&fx, &cli_config, &["disable", "nobody"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("\"nobody\""), "{run:?}");
}

/// A rotation on one node cuts the superseded certificate's session on another, and the
/// old certificate is refused everywhere after. Then two newer certificates race on two
/// nodes, several times: whichever order the writes land in, the entry ends on the newest
/// certificate (an older one never overwrites it).
#[tokio::test]
async fn rotation_on_one_node_cuts_the_superseded_certificate_on_another() {
    let Some(nats) = Nats::start() else {
        return;
    };
    let fx = Fixture::new();
    let body = Fixture::fleet_anchor(true);
    let a = start_node(&fx, &nats, "a", &body).await;
    let b = start_node(&fx, &nats, "b", &body).await;
    let cn = "rot.devices.example.com";
    let old = fx.client(&leaf(&fx.fleet, cn, 40 * 86_400));
    let mut leaked = open_v5(&old, a.mqtt, "old").await;
    let newer = leaf(&fx.fleet, cn, 30 * 86_400);
    assert_eq!(
        fx.client(&newer).connect_v5(b.mqtt, "new").await,
        Outcome::Accepted
    );
    let started = Instant::now();
    let bye = leaked.expect_disconnect(CUT_BOUND).await;
    assert_eq!(bye.code, NOT_AUTHORIZED_V5, "{bye:?}");
    assert!(bye.reason.contains("superseded"), "{bye:?}");
    eprintln!(
        "rotation on node b -> DISCONNECT on node a within {:?} of node b's CONNACK",
        started.elapsed()
    );
    for node in [&a, &b] {
        assert_eq!(
            old.connect_v5(node.mqtt, "old").await,
            Outcome::Refused(NOT_AUTHORIZED_V5)
        );
    }
    let config_a = node_config(&fx, "a");
    assert_eq!(
        show(&fx, &config_a, "rot")["fingerprint"],
        Fingerprint::of(&newer.cert_der).to_hex()
    );

    for round in 0..5i64 {
        // notBefore strictly increasing: each round's pair is newer than what is stored.
        let base = (29 - 2 * round) * 86_400;
        let newest = leaf(&fx.fleet, cn, base - 3600);
        let (older, newest_client) = (fx.client(&leaf(&fx.fleet, cn, base)), fx.client(&newest));
        // (older's outcome, newest's outcome), each order of nodes in turn.
        let (oa, ob) = if round % 2 == 0 {
            tokio::join!(
                older.connect_v5(a.mqtt, "r1"),
                newest_client.connect_v5(b.mqtt, "r2")
            )
        } else {
            let (y, x) = tokio::join!(
                newest_client.connect_v5(a.mqtt, "r2"),
                older.connect_v5(b.mqtt, "r1")
            );
            (x, y)
        };
        assert_eq!(
            ob,
            Outcome::Accepted,
            "round {round}: the newest is admitted"
        );
        assert!(
            matches!(oa, Outcome::Accepted | Outcome::Refused(NOT_AUTHORIZED_V5)),
            "round {round}: {oa:?}"
        );
        assert_eq!(
            show(&fx, &config_a, "rot")["fingerprint"],
            Fingerprint::of(&newest.cert_der).to_hex(),
            "round {round}: the entry holds the newest certificate ({oa:?} for the older)"
        );
    }
    assert_eq!(provisioned(&a).await + provisioned(&b).await, 1.0);
}

/// NATS stops: known devices still connect from each node's mirror; provisioning is
/// refused as server unavailable (v5 0x88, 3.1.1 code 3) with the reason logged; the CLI
/// says it cannot reach NATS. NATS returns: provisioning works again without a restart,
/// and a change made then reaches a session opened during the outage (the watch resumed).
#[tokio::test]
async fn known_devices_connect_without_nats_and_provisioning_waits_for_it() {
    let Some(mut nats) = Nats::start() else {
        return;
    };
    let fx = Fixture::new();
    let body = Fixture::fleet_anchor(true);
    let a = start_node(&fx, &nats, "a", &body).await;
    let mut b = start_node(&fx, &nats, "b", &body).await;
    let known = fx.client(&fx.device("known.devices.example.com"));
    assert_eq!(known.connect_v5(a.mqtt, "k").await, Outcome::Accepted);
    // Node b learns of it through its watch.
    let config_b = node_config(&fx, "b");
    assert_eq!(show(&fx, &config_b, "known")["source"], "fleet");

    nats.stop();
    wait_health(&a, 503).await;
    wait_health(&b, 503).await;
    let mut live = open_v5(&known, b.mqtt, "k").await;
    assert_eq!(
        known.connect_v4(a.mqtt, "k4", true).await,
        Outcome::Accepted
    );
    let new = fx.client(&fx.device("new.devices.example.com"));
    assert_eq!(
        new.connect_v5(b.mqtt, "n").await,
        Outcome::Refused(SERVER_UNAVAILABLE_V5)
    );
    assert_eq!(
        new.connect_v4(b.mqtt, "n4", true).await,
        Outcome::Refused(SERVER_UNAVAILABLE_V311)
    );
    let line = b.wait_line("refused at CONNECT").await;
    assert!(line.contains("store_unavailable"), "{line}");
    assert!(line.contains("not connected to NATS"), "{line}");
    let run = devices_run(&fx, &config_b, &["list"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains(&nats.url()), "{run:?}");

    nats.restart();
    wait_health(&a, 200).await;
    wait_health(&b, 200).await;
    let admitted = tokio::time::timeout(WAIT, async {
        loop {
            match new.connect_v5(b.mqtt, "n").await {
                Outcome::Accepted => return,
                Outcome::Refused(SERVER_UNAVAILABLE_V5) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                other => panic!("{other:?}"),
            }
        }
    })
    .await;
    assert!(admitted.is_ok(), "provisioning never recovered");
    assert_eq!(show(&fx, &config_b, "new")["source"], "fleet");
    live.ping().await;
    let (bye, from_start, _) = cut_by_cli(
        &fx,
        &node_config(&fx, "a"),
        &["disable", "known"],
        &mut live,
    )
    .await;
    assert_eq!(bye.code, NOT_AUTHORIZED_V5, "{bye:?}");
    eprintln!("after the NATS restart, disable -> DISCONNECT: {from_start:?}");
}

/// A standalone SQLite registry moved into the cluster: `devices export`, then `devices
/// import` with a cluster config. The cluster then lists exactly what standalone listed,
/// admits the moved devices as known (no provisioning), refuses the disabled one; a second
/// import changes nothing; a conflicting file is refused as a whole, naming the device.
#[tokio::test]
async fn a_standalone_registry_moves_into_the_cluster_and_back() {
    let Some(nats) = Nats::start() else {
        return;
    };
    let fx = Fixture::new();
    let body = Fixture::fleet_anchor(true);
    let standalone = config(&fx, &body);
    let d1 = fx.client(&fx.device("d1.devices.example.com"));
    let d2 = fx.client(&fx.device("Zähler.7.devices.example.com"));
    {
        let broker = Proc::start(&fx, &standalone).await;
        assert_eq!(d1.connect_v5(broker.mqtt, "d1").await, Outcome::Accepted);
        assert_eq!(d2.connect_v5(broker.mqtt, "d2").await, Outcome::Accepted);
    }
    devices(&fx, &standalone, &["disable", "Zähler.7"]);
    let mut before = list(&fx, &standalone);
    assert_eq!(before.len(), 2, "{before:?}");
    let file = fx.path("registry.json");
    let out = devices(&fx, &standalone, &["export", "--out", arg(&file)]);
    assert!(out.contains("exported 2 devices"), "{out}");
    // d1 last seen long ago, so that its next connection shows in the bucket.
    const LONG_AGO: &str = "2020-01-01T00:00:00Z";
    let text = std::fs::read_to_string(&file).expect("export");
    let mut doc: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let long_ago = |rows: &mut [serde_json::Value]| {
        for d in rows.iter_mut().filter(|d| d["name"] == "d1") {
            d["last_seen_at"] = LONG_AGO.into();
        }
    };
    long_ago(doc["devices"].as_array_mut().expect("devices"));
    long_ago(&mut before);
    std::fs::write(&file, doc.to_string()).expect("rewrite");

    let a = start_node(&fx, &nats, "a", &body).await;
    let cluster = node_config(&fx, "a");
    let out = devices(&fx, &cluster, &["import", arg(&file)]);
    assert!(out.contains("imported 2 devices"), "{out}");
    assert_eq!(
        list(&fx, &cluster),
        before,
        "the cluster lists what standalone did"
    );
    assert_eq!(d1.connect_v5(a.mqtt, "d1").await, Outcome::Accepted);
    assert_eq!(
        d2.connect_v5(a.mqtt, "d2").await,
        Outcome::Refused(NOT_AUTHORIZED_V5)
    );
    assert_eq!(
        provisioned(&a).await,
        0.0,
        "moved devices are known, not new"
    );
    // The node's first sight of d1 is written to the bucket at the next flush.
    let seen = tokio::time::timeout(WAIT, async {
        loop {
            let now = show(&fx, &cluster, "d1")["last_seen_at"].clone();
            if now != LONG_AGO {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("last_seen_at written");
    assert!(seen.is_string(), "{seen}");
    let before: Vec<_> = before
        .into_iter()
        .map(|mut d| {
            if d["name"] == "d1" {
                d["last_seen_at"] = seen.clone();
            }
            d
        })
        .collect();
    let out = devices(&fx, &cluster, &["import", arg(&file)]);
    assert!(
        out.contains("imported 0 devices") && out.contains("2 already present"),
        "{out}"
    );

    // Another certificate for d1, and a new name: refused as a whole, naming d1.
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("export")).expect("JSON");
    let rows = doc["devices"].as_array_mut().expect("devices");
    let d1_row = rows
        .iter_mut()
        .find(|r| r["name"] == "d1")
        .expect("d1 exported");
    let mut extra = d1_row.clone();
    d1_row["fingerprint"] = Fingerprint::of(b"another certificate").to_hex().into();
    extra["name"] = "d9".into();
    rows.push(extra);
    let conflicting = fx.write("conflicting.json", &doc.to_string());
    let run = devices_run(&fx, &cluster, &["import", arg(&conflicting)]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("\"d1\""), "{run:?}");
    assert!(run.stderr.contains("nothing was imported"), "{run:?}");
    assert_eq!(devices_run(&fx, &cluster, &["show", "d9"]).code, Some(1));

    // And back: the cluster's export into a fresh standalone data_dir.
    let back = fx.path("back.json");
    devices(&fx, &cluster, &["export", "--out", arg(&back)]);
    let text = std::fs::read_to_string(&standalone)
        .expect("config")
        .replace("data_dir = \"data\"", "data_dir = \"data-back\"");
    let standalone_back = fx.write("back.toml", &text);
    let out = devices(&fx, &standalone_back, &["import", arg(&back)]);
    assert!(out.contains("imported 2 devices"), "{out}");
    assert_eq!(list(&fx, &standalone_back), before);
}
