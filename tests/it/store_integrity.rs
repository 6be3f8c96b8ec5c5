//! contract §7 "No silent loss", the store's own part: a message reaching many persistent
//! sessions is stored once and comes back once (memory and disk after a restart match
//! those before it), a store written by the previous schema opens with everything it held,
//! a graceful stop leaves self-contained database files, a damaged file is refused at start,
//! and `/healthz` is unhealthy while the message store cannot commit.
//!
//! The broker runs as a real `certmq serve` child process ([`Proc`]): restart memory is
//! the child's own RSS, and a restart is a real one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::coretests::raw::{
    raw_ack, raw_publish, Pkt, Raw, PUBACK, PUBCOMP, PUBREC, PUBREL,
};
use crate::common::coretests::V;
use crate::common::durability::{fill, Tmpfs};
use crate::common::ops::{config_with_limits, pinned_backend, serve_expecting_exit, Proc};
use crate::common::{Client, Fixture, WAIT};

/// How long a graceful stop may take (contract §1: within the grace period).
const STOP: Duration = Duration::from_secs(15);

/// A fixture whose config has the fleet anchor, a pinned `backend` that may publish and
/// subscribe everywhere, the admin endpoint, and `limits`.
struct Site {
    fx: Fixture,
    config: PathBuf,
    backend: Client,
}

impl Site {
    fn new(limits: &str) -> Site {
        let fx = Fixture::new();
        let (section, backend) = pinned_backend(&fx);
        let config = config_with_limits(
            &fx,
            &format!("handshake_timeout = 5\nconnect_timeout = 5\n{limits}"),
            &format!("{}\n{section}", Fixture::fleet_anchor(true)),
        );
        Site {
            fx,
            config,
            backend,
        }
    }

    fn device(&self, name: &str) -> Client {
        self.fx
            .client(&self.fx.device(&format!("{name}.devices.example.com")))
    }

    async fn start(&self) -> Proc {
        Proc::start(&self.fx, &self.config).await
    }

    fn db(&self, file: &str) -> PathBuf {
        self.fx.data_dir().join(file)
    }
}

/// SIGTERM, and the exit status must be success (contract §1).
async fn stop(mut broker: Proc) {
    broker.signal("TERM");
    let status = broker.wait_exit(STOP).await;
    assert!(status.success(), "{status}; stderr:\n{}", broker.stderr());
}

/// The resident set size of a process, from `/proc/PID/status`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
}

/// The size of a stopped broker's database once its write-ahead log is checkpointed into
/// it: what the store really holds, without the log's history of page versions.
fn checkpointed_bytes(db: &Path) -> u64 {
    let c = rusqlite::Connection::open(db).expect("open database");
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .expect("checkpoint");
    drop(c);
    std::fs::metadata(db).expect("database file").len()
}

fn wal(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

/// A numbered payload of `size` bytes: the number, then filler.
fn big_payload(n: usize, size: usize) -> Vec<u8> {
    let mut p = format!("{n:08}:").into_bytes();
    p.resize(size, b'x');
    p
}

/// Receives `count` QoS 1 messages in order on `s`, acknowledging each, and checks they
/// are the numbered payloads `0..count` of `size` bytes.
async fn drain_numbered(s: &mut Raw, who: &str, count: usize, size: usize) {
    for n in 0..count {
        match s.try_recv().await {
            Ok(Pkt::Publish {
                qos: 1,
                pkid,
                payload,
                ..
            }) => {
                assert!(
                    payload == big_payload(n, size),
                    "{who}: message {n} expected, got {:?}",
                    String::from_utf8_lossy(&payload[..payload.len().min(9)])
                );
                s.try_send(&raw_ack(PUBACK, pkid)).await.expect("PUBACK");
            }
            other => panic!("{who}: message {n} of {count} expected, got {other:?}"),
        }
    }
}

/// A count from a database the broker no longer runs on.
fn count(db: &Path, sql: &str) -> i64 {
    let c = rusqlite::Connection::open(db).expect("open database");
    c.query_row(sql, [], |r| r.get(0)).expect(sql)
}

/// contract §7: "a message reaching many sessions is stored once and referenced by each, so
/// memory and disk after a restart match those before it". Twenty offline persistent
/// sessions share a backlog of 16 KiB messages; the broker's RSS and the message store's
/// size after a restart stay close to those before it, every message is still delivered,
/// and once delivered nothing is left in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_memory_and_disk_of_a_fanned_out_backlog() {
    const SESSIONS: usize = 20;
    const MESSAGES: usize = 150;
    const SIZE: usize = 16 * 1024;
    let site = Site::new("max_queued_messages = 100000\nmax_sessions_per_device = 64");
    let broker = site.start().await;
    for i in 0..SESSIONS {
        let (mut s, _) =
            Raw::connect_session(&site.backend, broker.mqtt, &format!("S{i}"), false, None).await;
        assert_eq!(s.subscribe("fan/t", 1).await, 1);
        s.disconnect().await;
    }
    let (mut p, _) = Raw::connect_session(&site.backend, broker.mqtt, "pub", true, None).await;
    for n in 0..MESSAGES {
        let pkid = n as u16 + 1;
        let code = p
            .publish_acked(1, false, pkid, "fan/t", &big_payload(n, SIZE))
            .await;
        assert_eq!(code, 0, "message {n} acknowledged");
    }
    p.disconnect().await;
    let rss_before = rss_kib(broker.pid());
    stop(broker).await;
    let disk = checkpointed_bytes(&site.db("messages.db"));

    let broker = site.start().await;
    let rss_after = rss_kib(broker.pid());
    let payloads = MESSAGES * SIZE;
    eprintln!(
        "{SESSIONS} sessions x {MESSAGES} messages x {SIZE} B ({payloads} B of payloads): \
         RSS before the restart {rss_before} KiB, after {rss_after} KiB; messages.db {disk} B"
    );
    assert!(
        rss_after as f64 <= 1.5 * rss_before as f64,
        "RSS after a restart {rss_after} KiB > 1.5 x {rss_before} KiB before it"
    );
    // Stored once: about one copy of each payload (16 KiB take five 4 KiB overflow
    // pages), not one per session.
    assert!(
        disk <= 2 * payloads as u64 + (1 << 20),
        "messages.db holds {disk} B for {payloads} B of payloads"
    );
    for i in 0..SESSIONS {
        let who = format!("S{i}");
        let (mut s, present) =
            Raw::connect_session(&site.backend, broker.mqtt, &who, false, None).await;
        assert!(present, "{who}: session kept");
        drain_numbered(&mut s, &who, MESSAGES, SIZE).await;
        s.disconnect().await;
    }
    stop(broker).await;
    let db = site.db("messages.db");
    assert_eq!(count(&db, "SELECT count(*) FROM queue"), 0);
    assert_eq!(
        count(&db, "SELECT count(*) FROM messages"),
        0,
        "every message was delivered everywhere: none may stay in the store"
    );
}

/// Copies the committed v1 fixture (see `tests/fixtures/store-v1/README.md`) into the
/// site's data_dir as its message store, beside the registry that goes with it: sessions
/// belong to registry entries (contract §4), so a message store without its registry would
/// rightly start empty. A first run enters the pinned backend and provisions dev-2.
async fn install_v1_fixture(site: &Site) {
    let mut broker = site.start().await;
    let (d2, _) =
        Raw::connect_session(&site.device("dev-2"), broker.mqtt, "provision", true, None).await;
    d2.disconnect().await;
    broker.signal("TERM");
    assert!(broker.wait_exit(WAIT).await.success());
    for file in ["messages.db", "messages.db-wal", "messages.db-shm"] {
        let _ = std::fs::remove_file(site.db(file));
    }
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v1/messages.db");
    std::fs::copy(fixture, site.db("messages.db")).expect("copy the v1 fixture");
}

/// A message store written by the schema-1 broker (queue rows holding their own copy of
/// each message) opens with everything it held: in-flight and released QoS 2 deliveries,
/// queued ones, the retained message and the inbound QoS 2 packet id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_1_message_store_opens_with_everything_it_held() {
    let site = Site::new("");
    install_v1_fixture(&site).await;
    let broker = site.start().await;
    let addr = broker.mqtt;

    // S (MQTT 5, QoS 2): m1 and m3..m5 were sent and not acknowledged (resent with DUP and
    // their packet ids), m2 was PUBRECed (only PUBREL 2 remains), q2-in never sent.
    let (mut s, present) =
        Raw::connect_session(&site.backend, addr, "S", false, Some(u32::MAX)).await;
    assert!(present, "S kept");
    let mut publishes = Vec::new();
    let mut released = Vec::new();
    while publishes.len() < 5 || released.is_empty() {
        match s.try_recv().await.expect("S's redeliveries") {
            Pkt::Publish {
                dup,
                qos: 2,
                pkid,
                payload,
                ..
            } => publishes.push((String::from_utf8(payload).expect("text"), dup, pkid)),
            Pkt::Ack {
                kind: PUBREL, pkid, ..
            } => released.push(pkid),
            other => panic!("S: unexpected {other:?}"),
        }
    }
    assert_eq!(released, [2], "PUBREL for m2");
    let sent: Vec<_> = publishes[..4].to_vec();
    assert_eq!(
        sent,
        [
            ("m1".to_owned(), true, 1),
            ("m3".to_owned(), true, 3),
            ("m4".to_owned(), true, 4),
            ("m5".to_owned(), true, 5)
        ],
        "in-flight deliveries resent with DUP and their packet ids"
    );
    assert_eq!((publishes[4].0.as_str(), publishes[4].1), ("q2-in", false));

    // S2 (3.1.1, QoS 1): everything queued, in order.
    let (mut s2, present) = Raw::connect_session(&site.backend, addr, "S2", false, None).await;
    assert!(present, "S2 kept");
    let mut got = Vec::new();
    while got.len() < 6 {
        match s2.try_recv().await.expect("S2's queue") {
            Pkt::Publish {
                qos: 1,
                pkid,
                payload,
                ..
            } => {
                s2.try_send(&raw_ack(PUBACK, pkid)).await.expect("PUBACK");
                got.push(String::from_utf8(payload).expect("text"));
            }
            other => panic!("S2: unexpected {other:?}"),
        }
    }
    assert_eq!(got, ["m1", "m2", "m3", "m4", "m5", "q2-in"]);

    // The retained message.
    let (mut r, _) = Raw::connect_session(&site.backend, addr, "r", true, None).await;
    assert_eq!(r.subscribe("devices/+/r", 1).await, 1);
    match r.try_recv().await.expect("the retained message") {
        Pkt::Publish {
            retain: true,
            topic,
            payload,
            ..
        } => assert_eq!(
            (topic.as_str(), &payload[..]),
            ("devices/dev-1/r", &b"retained-1"[..])
        ),
        other => panic!("expected the retained message, got {other:?}"),
    }

    // dev-2's inbound QoS 2 id 7: its resent PUBLISH is a duplicate, not routed again.
    let (mut d2, present) =
        Raw::connect_session(&site.device("dev-2"), addr, "d2", false, None).await;
    assert!(present, "d2 kept");
    d2.try_send(&raw_publish(V::V4, "devices/dev-2/t", b"q2-in", 2, 7, true))
        .await
        .expect("resend");
    assert_eq!(
        d2.try_recv().await.expect("PUBREC"),
        Pkt::Ack {
            kind: PUBREC,
            pkid: 7,
            reason: 0
        }
    );
    d2.try_send(&raw_ack(PUBREL, 7)).await.expect("PUBREL");
    assert_eq!(
        d2.try_recv().await.expect("PUBCOMP"),
        Pkt::Ack {
            kind: PUBCOMP,
            pkid: 7,
            reason: 0
        }
    );
    d2.disconnect().await;
    let (mut p, _) = Raw::connect_session(&site.backend, addr, "p", true, None).await;
    assert_eq!(
        p.publish_acked(1, false, 1, "devices/dev-1/t", b"end")
            .await,
        0
    );
    match s2.try_recv().await.expect("the end marker") {
        Pkt::Publish { payload, .. } => assert_eq!(payload, b"end", "q2-in routed twice?"),
        other => panic!("S2: unexpected {other:?}"),
    }
    stop(broker).await;
    assert_eq!(count(&site.db("messages.db"), "PRAGMA user_version"), 2);
}

/// contract §7: "A graceful stop leaves a self-contained database (WAL checkpointed)": after
/// SIGTERM no write-ahead log holds anything, and the two `.db` files alone, copied to a
/// fresh data_dir, are the whole store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_leaves_self_contained_database_files() {
    let site = Site::new("");
    let broker = site.start().await;
    let addr = broker.mqtt;
    let (mut s, _) = Raw::connect_session(&site.backend, addr, "S", false, None).await;
    assert_eq!(s.subscribe("devices/+/t", 1).await, 1);
    s.disconnect().await;
    let (mut p, _) = Raw::connect_session(&site.device("dev-1"), addr, "p", true, None).await;
    for n in 1..=3u16 {
        let payload = format!("q{n}");
        assert_eq!(
            p.publish_acked(1, false, n, "devices/dev-1/t", payload.as_bytes())
                .await,
            0
        );
    }
    assert_eq!(
        p.publish_acked(1, true, 9, "devices/dev-1/r", b"kept")
            .await,
        0
    );
    p.disconnect().await;
    stop(broker).await;

    let data = site.fx.data_dir();
    for file in ["messages.db", "certmq.db"] {
        let log = wal(&data.join(file));
        let len = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        assert_eq!(
            len,
            0,
            "{} holds {len} bytes after a graceful stop",
            log.display()
        );
    }
    let copy = site.fx.path("data.copy");
    std::fs::rename(&data, &copy).expect("move data_dir aside");
    std::fs::create_dir_all(&data).expect("fresh data_dir");
    for file in ["messages.db", "certmq.db"] {
        std::fs::copy(copy.join(file), data.join(file)).expect("copy the .db file alone");
    }
    let broker = site.start().await;
    let (mut s, present) = Raw::connect_session(&site.backend, broker.mqtt, "S", false, None).await;
    assert!(present, "the session is in the copied messages.db");
    for n in 1..=3 {
        match s.try_recv().await.expect("a queued message") {
            Pkt::Publish { pkid, payload, .. } => {
                assert_eq!(payload, format!("q{n}").as_bytes());
                s.try_send(&raw_ack(PUBACK, pkid)).await.expect("PUBACK");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let (mut r, _) = Raw::connect_session(&site.backend, broker.mqtt, "r", true, None).await;
    assert_eq!(r.subscribe("devices/+/r", 1).await, 1);
    match r.try_recv().await.expect("the retained message") {
        Pkt::Publish { payload, .. } => assert_eq!(payload, b"kept"),
        other => panic!("unexpected {other:?}"),
    }
}

/// Frees pages in a stopped broker's database (a table filled and dropped), then breaks the
/// free-page list: the broker need not read those pages to start, so only an integrity
/// check can tell the file is damaged.
fn damage_free_list(db: &Path) {
    {
        let c = rusqlite::Connection::open(db).expect("open");
        c.execute_batch(
            "CREATE TABLE scratch (b BLOB);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 64)
             INSERT INTO scratch SELECT zeroblob(4000) FROM n;
             DROP TABLE scratch;
             PRAGMA wal_checkpoint(TRUNCATE);",
        )
        .expect("free some pages");
    }
    let mut bytes = std::fs::read(db).expect("read");
    let page_size = match u16::from_be_bytes([bytes[16], bytes[17]]) {
        1 => 65_536,
        n => usize::from(n),
    };
    let trunk = u32::from_be_bytes(bytes[32..36].try_into().expect("4 bytes")) as usize;
    assert!(trunk > 0, "{} has free pages", db.display());
    // The trunk page's leaf count, far beyond what a page can hold.
    let at = (trunk - 1) * page_size + 4;
    bytes[at..at + 4].copy_from_slice(&0x00ff_fff0u32.to_be_bytes());
    std::fs::write(db, bytes).expect("write");
}

/// contract §7: a damaged file is never used silently. Each database, damaged where starting
/// does not look, makes `certmq serve` exit 1 naming the file, and the file is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_database_is_refused_at_start_naming_the_file() {
    for file in ["messages.db", "certmq.db"] {
        let site = Site::new("");
        let broker = site.start().await;
        let (mut p, _) =
            Raw::connect_session(&site.device("dev-1"), broker.mqtt, "p", true, None).await;
        assert_eq!(
            p.publish_acked(1, true, 1, "devices/dev-1/r", b"kept")
                .await,
            0
        );
        p.disconnect().await;
        stop(broker).await;
        let path = site.db(file);
        damage_free_list(&path);
        let before = std::fs::read(&path).expect("read");
        let (code, stderr) = serve_expecting_exit(&site.config).await;
        assert_eq!(code, Some(1), "{file}: exit status; stderr:\n{stderr}");
        assert!(
            stderr.contains(&path.display().to_string()) && stderr.contains("quick_check"),
            "{file}: the error names the file and the failed check; stderr:\n{stderr}"
        );
        assert!(
            std::fs::read(&path).expect("read") == before,
            "{file} was changed"
        );
    }
}

/// contract §7: "`/healthz` is unhealthy while either database cannot commit": a full disk makes
/// the message store fail its commits while the registry, only read, still answers; health
/// must say so, and be healthy again once space is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_unhealthy_while_the_message_store_cannot_commit() {
    let site = Site::new("");
    let Some(_mount) = Tmpfs::mount_or_skip(&site.fx.data_dir(), "2m") else {
        return;
    };
    let broker = site.start().await;
    let addr = broker.mqtt;
    let (mut s, _) = Raw::connect_session(&site.backend, addr, "S", false, Some(3600)).await;
    assert_eq!(s.subscribe("devices/+/t", 1).await, 1);
    s.disconnect().await;
    let (mut p, _) = Raw::connect_session(&site.device("dev-1"), addr, "p", true, Some(0)).await;
    assert_eq!(broker.get("/healthz").await.0, 200);

    let filler = site.fx.data_dir().join("filler");
    fill(&filler);
    assert_eq!(
        p.publish_acked(1, false, 1, "devices/dev-1/t", b"refused")
            .await,
        0x97,
        "a full disk refuses QoS 1\n{}",
        broker.stderr()
    );
    let (status, body) = broker.get("/healthz").await;
    assert_eq!(
        status, 503,
        "healthz while messages.db cannot commit: {body}"
    );
    assert!(body.contains("messages.db"), "{body}");

    std::fs::remove_file(&filler).expect("free the space");
    let (status, body) = broker.get("/healthz").await;
    assert_eq!(status, 200, "healthz once commits work again: {body}");
    assert_eq!(
        p.publish_acked(1, false, 2, "devices/dev-1/t", b"kept")
            .await,
        0
    );
}
