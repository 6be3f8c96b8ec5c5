//! The store against a real SQLite file in a temporary directory: each message stored once
//! and read back into one shared `Arc`, message rows going with their last reference, ids
//! continuing after a restart, a schema-1 file migrated in place, a close that leaves the
//! database file self-contained, updates that reach the writer before the row they change,
//! and barriers answered for the epoch their ops were submitted in.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use rusqlite::Connection;

use super::{Store, DB_FILE};
use crate::broker::journal::{Backend, Forwarded, Message, Op, SessionKey};
use crate::identity::DeviceName;
use crate::mqtt::codec::QoS;
use crate::mqtt::topic::TopicName;

fn key(client_id: &str) -> SessionKey {
    SessionKey {
        device: DeviceName::parse("backend").unwrap(),
        client_id: client_id.to_owned(),
    }
}

fn message(topic: &str, payload: &[u8], retain: bool) -> Arc<Message> {
    Arc::new(Message {
        topic: TopicName::parse(topic).unwrap(),
        payload: Bytes::copy_from_slice(payload),
        qos: QoS::AtLeastOnce,
        retain,
        props: Forwarded::default(),
        expires_at: None,
        store_id: Default::default(),
    })
}

/// Creates sessions `names` (no expiry).
/// Waits until everything submitted to `store` so far is committed, and asserts it was.
fn barrier(store: &Store) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    store.submit(Op::Barrier(tx));
    rx.blocking_recv()
        .expect("writer alive")
        .expect("committed");
}

fn sessions(store: &Store, names: &[&str]) {
    for n in names {
        store.submit(Op::Session {
            key: key(n),
            expiry: None,
            expires_at: None,
        });
    }
}

/// Queues `msg` for `client_id`; returns the queue row id.
fn enqueue(store: &Store, client_id: &str, msg: &Arc<Message>) -> i64 {
    let id = store.next_id();
    store.submit(Op::Enqueue {
        id,
        key: key(client_id),
        msg: msg.clone(),
        qos: QoS::AtLeastOnce,
        retain: false,
        sub_ids: Vec::new(),
    });
    id
}

fn count(dir: &Path, sql: &str) -> i64 {
    let c = Connection::open(dir.join(DB_FILE)).unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

fn messages(dir: &Path) -> i64 {
    count(dir, "SELECT count(*) FROM messages")
}

#[test]
fn a_fanned_out_message_is_stored_once_and_recovered_as_one_arc() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    sessions(&store, &["a", "b", "c"]);
    let m = message("t/1", &[7; 4096], true);
    for s in ["a", "b", "c"] {
        enqueue(&store, s, &m);
    }
    store.submit(Op::Retain {
        topic: "t/1".into(),
        msg: Some(m.clone()),
        owner: None,
    });
    barrier(&store);
    assert_eq!(messages(dir.path()), 1, "one row for four references");
    assert_eq!(count(dir.path(), "SELECT count(*) FROM queue"), 3);
    drop(store);

    let (_store, recovered) = Store::open(dir.path()).unwrap();
    let queued: Vec<_> = recovered
        .sessions
        .iter()
        .map(|s| {
            assert_eq!(s.queue.len(), 1, "{:?}", s.key);
            s.queue[0].msg.clone()
        })
        .collect();
    assert_eq!(queued.len(), 3);
    let retained = &recovered.retained[0].msg;
    for q in &queued {
        assert!(Arc::ptr_eq(q, retained), "one Arc for every reference");
    }
    assert_eq!(&retained.payload[..], &[7; 4096][..]);
    assert!(retained.retain);
    assert_eq!(retained.store_id.get(), m.store_id.get());
}

/// contract §4: the owner of a retained message (its quota) survives a restart, and follows
/// the message when another device replaces it.
#[test]
fn a_retained_message_keeps_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    let owner = |n: &str| Some(DeviceName::parse(n).unwrap());
    for (topic, by) in [("t/1", "dev-1"), ("t/2", "dev-1"), ("t/2", "dev-2")] {
        store.submit(Op::Retain {
            topic: topic.into(),
            msg: Some(message(topic, b"v", true)),
            owner: owner(by),
        });
    }
    store.submit(Op::Retain {
        topic: "t/3".into(),
        msg: Some(message("t/3", b"v", true)),
        owner: None,
    });
    barrier(&store);
    drop(store);
    let (_store, recovered) = Store::open(dir.path()).unwrap();
    let mut got: Vec<_> = recovered
        .retained
        .iter()
        .map(|r| (r.msg.topic.as_str().to_owned(), r.owner.clone()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("t/1".to_owned(), owner("dev-1")),
            ("t/2".to_owned(), owner("dev-2")),
            ("t/3".to_owned(), None)
        ]
    );
}

#[test]
fn a_message_row_goes_with_its_last_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    sessions(&store, &["a", "b"]);

    // Acknowledged by each session in turn, retained meanwhile.
    let m = message("t/1", b"one", true);
    let qa = enqueue(&store, "a", &m);
    let qb = enqueue(&store, "b", &m);
    store.submit(Op::Retain {
        topic: "t/1".into(),
        msg: Some(m.clone()),
        owner: None,
    });
    barrier(&store);
    store.submit(Op::Delivered { id: qa });
    barrier(&store);
    assert_eq!(messages(dir.path()), 1, "b and the retained entry hold it");
    store.submit(Op::Delivered { id: qb });
    barrier(&store);
    assert_eq!(messages(dir.path()), 1, "the retained entry holds it");
    // A new retained message replaces it; clearing the topic drops that one too.
    let m2 = message("t/1", b"two", true);
    store.submit(Op::Retain {
        topic: "t/1".into(),
        msg: Some(m2),
        owner: None,
    });
    barrier(&store);
    assert_eq!(messages(dir.path()), 1, "only the new retained message");
    store.submit(Op::Retain {
        topic: "t/1".into(),
        msg: None,
        owner: None,
    });
    barrier(&store);
    assert_eq!(messages(dir.path()), 0);

    // A session that ends takes its messages with it, unless another still holds them.
    let shared = message("t/2", b"shared", false);
    let own = message("t/2", b"own", false);
    enqueue(&store, "a", &shared);
    enqueue(&store, "a", &own);
    let qb = enqueue(&store, "b", &shared);
    barrier(&store);
    assert_eq!(messages(dir.path()), 2);
    store.submit(Op::DropSession { key: key("a") });
    barrier(&store);
    assert_eq!(messages(dir.path()), 1, "b still holds the shared one");
    // A message acknowledged by one session before another's row was even written is
    // written again by that row.
    store.submit(Op::Delivered { id: qb });
    barrier(&store);
    assert_eq!(messages(dir.path()), 0);
    enqueue(&store, "b", &shared);
    barrier(&store);
    assert_eq!(messages(dir.path()), 1);
    drop(store);
    let (_store, recovered) = Store::open(dir.path()).unwrap();
    let b = recovered
        .sessions
        .iter()
        .find(|s| s.key == key("b"))
        .unwrap();
    assert_eq!(&b.queue[0].msg.payload[..], b"shared");
}

#[test]
fn expired_messages_go_at_recovery_with_their_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    sessions(&store, &["a"]);
    let mut m = (*message("t/1", b"short-lived", false)).clone();
    m.expires_at = Some(std::time::Instant::now());
    enqueue(&store, "a", &Arc::new(m));
    enqueue(&store, "a", &message("t/1", b"kept", false));
    barrier(&store);
    assert_eq!(messages(dir.path()), 2);
    drop(store);
    let later = crate::cert::now_secs() + 2;
    let conn = super::schema::open(&dir.path().join(DB_FILE)).unwrap();
    let (recovered, _) = super::recover::load(&conn, later).unwrap();
    assert_eq!(recovered.sessions[0].queue.len(), 1);
    assert_eq!(&recovered.sessions[0].queue[0].msg.payload[..], b"kept");
    assert_eq!(messages(dir.path()), 1);
}

#[test]
fn message_ids_continue_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    sessions(&store, &["a"]);
    let first = message("t/1", b"first", false);
    enqueue(&store, "a", &first);
    barrier(&store);
    drop(store);
    let (store, recovered) = Store::open(dir.path()).unwrap();
    let second = message("t/1", b"second", false);
    enqueue(&store, "a", &second);
    barrier(&store);
    let kept = &recovered.sessions[0].queue[0].msg;
    assert!(second.store_id.get() > kept.store_id.get());
    assert_eq!(
        messages(dir.path()),
        2,
        "the new message did not overwrite the old"
    );
}

/// Schema 1 exactly as certmq wrote it before schema 2 (commit 76eedf9).
const V1_SCHEMA: &str = "
    BEGIN IMMEDIATE;
    CREATE TABLE sessions (
        device TEXT NOT NULL, client_id TEXT NOT NULL,
        expiry INTEGER, expires_at INTEGER,
        PRIMARY KEY (device, client_id));
    CREATE TABLE subscriptions (
        device TEXT NOT NULL, client_id TEXT NOT NULL, filter TEXT NOT NULL,
        qos INTEGER NOT NULL, no_local INTEGER NOT NULL,
        retain_as_published INTEGER NOT NULL, retain_handling INTEGER NOT NULL,
        sub_id INTEGER, aliased INTEGER NOT NULL,
        PRIMARY KEY (device, client_id, filter));
    CREATE TABLE queue (
        id INTEGER PRIMARY KEY, device TEXT NOT NULL, client_id TEXT NOT NULL,
        topic TEXT NOT NULL, payload BLOB NOT NULL, msg_qos INTEGER NOT NULL,
        qos INTEGER NOT NULL, retain INTEGER NOT NULL, props TEXT,
        expires_at INTEGER, sub_ids TEXT NOT NULL,
        pkid INTEGER, released INTEGER NOT NULL DEFAULT 0);
    CREATE INDEX queue_session ON queue (device, client_id, id);
    CREATE TABLE retained (
        topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL,
        props TEXT, expires_at INTEGER);
    CREATE TABLE inbound (
        device TEXT NOT NULL, client_id TEXT NOT NULL, pkid INTEGER NOT NULL,
        PRIMARY KEY (device, client_id, pkid));
    PRAGMA application_id = 1668116845;
    PRAGMA user_version = 1;
    COMMIT;";

#[test]
fn a_schema_1_store_is_migrated_in_place_keeping_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE);
    let far = crate::cert::now_secs() + 3600;
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch("PRAGMA journal_mode = WAL;").unwrap();
        c.execute_batch(V1_SCHEMA).unwrap();
        let props = r#"{"pfi":1,"rt":"reply/here","cd":[1,2],"up":[["k","v"]],"ct":"text/plain"}"#;
        c.execute_batch(&format!(
            "INSERT INTO sessions VALUES ('backend', 'a', 600, NULL), ('backend', 'b', NULL, NULL);
             INSERT INTO subscriptions VALUES ('backend', 'a', 't/#', 2, 0, 1, 1, 9, 0);
             INSERT INTO queue (id, device, client_id, topic, payload, msg_qos, qos, retain,
                                props, expires_at, sub_ids, pkid, released) VALUES
               (4, 'backend', 'a', 't/1', x'01', 2, 2, 0, '{props}', {far}, '9', 3, 0),
               (5, 'backend', 'b', 't/1', x'01', 2, 1, 0, '{props}', {far}, '', NULL, 0),
               (6, 'backend', 'a', 't/2', x'02', 2, 2, 1, NULL, NULL, '9,10', 4, 1),
               (7, 'backend', 'a', 't/3', x'03', 1, 1, 0, NULL, 1, '', NULL, 0);
             INSERT INTO retained VALUES ('t/r', x'0a', 1, '{props}', NULL), ('t/s', x'0b', 0, NULL, NULL);
             INSERT INTO inbound VALUES ('backend', 'a', 11);"
        ))
        .unwrap();
    }
    let (store, recovered) = Store::open(dir.path()).unwrap();
    assert_eq!(count(dir.path(), "PRAGMA user_version"), 2);
    let a = recovered
        .sessions
        .iter()
        .find(|s| s.key == key("a"))
        .unwrap();
    let b = recovered
        .sessions
        .iter()
        .find(|s| s.key == key("b"))
        .unwrap();
    assert_eq!(a.expiry, Some(600));
    assert_eq!(a.subscriptions.len(), 1);
    assert_eq!(a.inbound, [11]);
    // Row 7 had expired (expires_at 1): gone, with its message.
    let rows: Vec<_> = a
        .queue
        .iter()
        .map(|q| (q.id, q.qos, q.retain, q.sub_ids.clone(), q.pkid, q.released))
        .collect();
    assert_eq!(
        rows,
        [
            (4, QoS::ExactlyOnce, false, vec![9], Some(3), false),
            (6, QoS::ExactlyOnce, true, vec![9, 10], Some(4), true)
        ]
    );
    let m = &a.queue[0].msg;
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("t/1", &[1u8][..]));
    assert_eq!(m.qos, QoS::ExactlyOnce);
    assert!(m.expires_at.is_some());
    let props = &m.props;
    assert_eq!(props.payload_format_indicator, Some(1));
    assert_eq!(props.response_topic.as_deref(), Some("reply/here"));
    assert_eq!(props.correlation_data.as_deref(), Some(&[1u8, 2][..]));
    assert_eq!(props.user_properties, [("k".to_owned(), "v".to_owned())]);
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(b.queue.len(), 1);
    assert_eq!(b.queue[0].msg.props, *props);
    let mut retained: Vec<_> = recovered
        .retained
        .iter()
        .map(|r| &r.msg)
        .map(|m| {
            (
                m.topic.as_str().to_owned(),
                m.payload.to_vec(),
                m.qos,
                m.retain,
            )
        })
        .collect();
    retained.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        retained,
        [
            ("t/r".to_owned(), vec![10], QoS::AtLeastOnce, true),
            ("t/s".to_owned(), vec![11], QoS::AtMostOnce, true)
        ]
    );
    assert!(
        recovered.retained.iter().all(|r| r.owner.is_none()),
        "schema 1 did not record owners: migrated rows count for nobody"
    );
    assert_eq!(recovered.max_queue_id, 6, "row 7 expired");
    // New messages and queue rows never collide with migrated ones.
    let new = message("t/1", b"new", false);
    let id = enqueue(&store, "b", &new);
    barrier(&store);
    assert!(id > 6);
    assert_eq!(
        messages(dir.path()),
        6,
        "3 migrated queued + 2 retained + the new one: none lost or doubled"
    );
    drop(store);
    let (_store, again) = Store::open(dir.path()).unwrap();
    assert_eq!(
        again.sessions.iter().map(|s| s.queue.len()).sum::<usize>(),
        4
    );
}

#[test]
fn a_close_leaves_the_database_file_self_contained_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    sessions(&store, &["a"]);
    enqueue(&store, "a", &message("t/1", &[1; 8192], false));
    barrier(&store);
    let wal = dir.path().join(format!("{DB_FILE}-wal"));
    assert!(std::fs::metadata(&wal).unwrap().len() > 0);
    let (tx, rx) = tokio::sync::oneshot::channel();
    store.submit(Op::Close(tx));
    rx.blocking_recv().unwrap().unwrap();
    // Closed by the time the close is answered: the log and shared-memory files are gone.
    assert!(!wal.exists());
    assert!(!dir.path().join(format!("{DB_FILE}-shm")).exists());
    // Later ops are not applied: their barrier reports the store stopped.
    let (tx, rx) = tokio::sync::oneshot::channel();
    store.submit(Op::Barrier(tx));
    assert!(rx.blocking_recv().is_err());
    // The .db file alone holds the queued message.
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(dir.path().join(DB_FILE), copy.path().join(DB_FILE)).unwrap();
    let (_copy, recovered) = Store::open(copy.path()).unwrap();
    assert_eq!(recovered.sessions[0].queue.len(), 1);
}

/// The writer takes a connection's ops in one batch, that batch fails (here: another
/// process holds the write lock past the busy timeout, standing in for a full disk), and
/// the connection's barrier lands in the next batch, which commits. The barrier alone says
/// Ok; answered for the epoch read before the ops were submitted, it says the ops failed,
/// so the connection never acknowledges what was rolled back.
#[test]
fn a_barrier_after_a_failed_batch_fails_for_the_ops_submitted_before_it() {
    use crate::broker::journal::Journal;
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    sessions(&store, &["a"]);
    barrier(&store);
    let locker = Connection::open(dir.path().join(DB_FILE)).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();

    let journal = Journal::new(Arc::new(store.clone()));
    let epoch = journal.epoch();
    // A retained QoS 1 publish: the PUBACK waits for this.
    journal.submit(Op::Retain {
        topic: "x/1".into(),
        msg: Some(message("x/1", b"lost", true)),
        owner: None,
    });
    // The writer fails that batch after the busy timeout (5 s).
    while store.failures() == 0 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    locker.execute_batch("ROLLBACK").unwrap();
    drop(locker);

    // Another connection's op, then the barrier: a batch that commits.
    sessions(&store, &["b"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let since = rt.block_on(journal.barrier_since(epoch));
    assert_eq!(count(dir.path(), "SELECT count(*) FROM retained"), 0);
    assert!(since.is_err(), "reported {since:?} for a rolled-back op");
    // The barrier by itself answers for its own batch only.
    assert!(rt.block_on(journal.barrier()).is_ok());
    // An epoch read after the failure is not affected by it.
    let later = journal.epoch();
    assert!(rt.block_on(journal.barrier_since(later)).is_ok());
}

/// A QoS 2 delivery whose packet id is committed before its Enqueue reaches the writer:
/// the subscriber's pump submits `Sent` and waits for a barrier before the PUBLISH leaves
/// (conn/mod.rs `pump`), while the publisher's group holding the `Enqueue` is still open
/// (session.rs `enqueue` submits into the thread-local group), so the writer can take the
/// `Sent` in an earlier batch than its row. The packet id must still be on disk once the
/// row is: the PUBLISH left with it, and a restart redelivers with DUP and that id.
#[test]
fn a_packet_id_committed_before_its_enqueue_reached_the_writer_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    sessions(&store, &["a"]);
    barrier(&store);
    let m = message("t/1", b"x", false);
    let id = store.next_id();
    // Subscriber thread: Sent, then the pump's commit barrier, answered Ok.
    store.submit(Op::Sent { id, pkid: 7 });
    barrier(&store);
    // Publisher thread: routing ends, the group with the Enqueue is submitted.
    store.submit(Op::Group(vec![
        Op::Enqueue {
            id,
            key: key("a"),
            msg: m.clone(),
            qos: QoS::ExactlyOnce,
            retain: false,
            sub_ids: Vec::new(),
        },
        Op::Probe,
    ]));
    barrier(&store);
    drop(store);
    let (_store, recovered) = Store::open(dir.path()).unwrap();
    let q = &recovered.sessions[0].queue;
    assert_eq!(q.len(), 1);
    assert_eq!(
        q[0].pkid,
        Some(7),
        "the PUBLISH left with packet id 7 after a barrier said it was committed"
    );
}

/// A QoS 1 delivery acknowledged (PUBACK) by the subscriber before the publisher's group
/// with its Enqueue reached the writer, which took the acknowledgement in an earlier batch:
/// the delivery must stay delivered, not come back as a queued row and be redelivered
/// after a restart.
#[test]
fn a_delivery_acknowledged_before_its_enqueue_reached_the_writer_stays_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    sessions(&store, &["a"]);
    barrier(&store);
    let m = message("t/1", b"x", false);
    let id = store.next_id();
    store.submit(Op::Sent { id, pkid: 1 });
    store.submit(Op::Delivered { id });
    // The writer wakes for these alone (no Enqueue in the batch: no gather window).
    barrier(&store);
    store.submit(Op::Group(vec![Op::Enqueue {
        id,
        key: key("a"),
        msg: m.clone(),
        qos: QoS::AtLeastOnce,
        retain: false,
        sub_ids: Vec::new(),
    }]));
    barrier(&store);
    drop(store);
    let (_store, recovered) = Store::open(dir.path()).unwrap();
    assert!(
        recovered.sessions[0].queue.is_empty(),
        "acknowledged delivery resurrected: {:?}",
        recovered.sessions[0]
            .queue
            .iter()
            .map(|q| q.id)
            .collect::<Vec<_>>()
    );
}

/// Deliveries left for a session the store no longer holds (older versions queued for a
/// session that ended while the message was being routed) are removed at start, and the
/// messages only they referred to with them.
#[test]
fn deliveries_of_a_session_that_is_gone_are_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = Store::open(dir.path()).unwrap();
        sessions(&store, &["a", "b"]);
        enqueue(&store, "a", &message("t/1", b"orphan", false));
        enqueue(&store, "b", &message("t/2", b"kept", false));
        barrier(&store);
    }
    let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
    c.execute("DELETE FROM sessions WHERE client_id = 'a'", [])
        .unwrap();
    drop(c);
    let (_store, recovered) = Store::open(dir.path()).unwrap();
    assert_eq!(recovered.sessions.len(), 1);
    assert_eq!(count(dir.path(), "SELECT count(*) FROM queue"), 1);
    assert_eq!(messages(dir.path()), 1);
}
