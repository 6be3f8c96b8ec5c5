//! The message store's file: opening it, checking that it is ours and intact, creating the
//! schema, and bringing an older schema up to date in place.
//!
//! Schema 2 stores each message once. A message fanned out to N persistent sessions is one
//! `messages` row, referenced by N `queue` rows (and by `retained`, when it is the retained
//! message of its topic). A `messages` row lives exactly as long as something references
//! it: the triggers below delete it with its last reference, whichever statement removes
//! that reference (an acknowledgement, a dropped session, an expiry at recovery, a retained
//! message replaced or cleared), so no code path can forget it and the table cannot grow
//! without bound. Schema 1 kept a copy of the message in every queue row: 20 sessions
//! made 20 copies on disk and, after a restart, 20 in memory.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use super::{StoreError, APPLICATION_ID, SCHEMA_VERSION};

/// Tables schema 2 shares with schema 1, unchanged.
const SESSIONS: &str = "
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
    CREATE TABLE inbound (
        device TEXT NOT NULL, client_id TEXT NOT NULL, pkid INTEGER NOT NULL,
        PRIMARY KEY (device, client_id, pkid));";

/// Schema 2's messages and their references. `messages.retain` is the message's own flag
/// (set for a retained publish); `queue.retain` is the flag one delivery is sent with.
/// `queue.message_id` is indexed for the triggers' "any reference left?" lookups.
/// `retained.owner` is the device that published the retained message last, whose
/// `max_retained_per_device` quota it counts against (contract §4); NULL counts for nobody
/// (rows migrated from schema 1, which did not record it).
const MESSAGES: &str = "
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL,
        qos INTEGER NOT NULL, retain INTEGER NOT NULL, props TEXT, expires_at INTEGER);
    CREATE TABLE queue (
        id INTEGER PRIMARY KEY, device TEXT NOT NULL, client_id TEXT NOT NULL,
        message_id INTEGER NOT NULL REFERENCES messages (id),
        qos INTEGER NOT NULL, retain INTEGER NOT NULL, sub_ids TEXT NOT NULL,
        pkid INTEGER, released INTEGER NOT NULL DEFAULT 0);
    CREATE INDEX queue_session ON queue (device, client_id, id);
    CREATE INDEX queue_message ON queue (message_id);
    CREATE TABLE retained (
        topic TEXT PRIMARY KEY,
        message_id INTEGER NOT NULL REFERENCES messages (id),
        owner TEXT);
    CREATE INDEX retained_message ON retained (message_id);
    CREATE TRIGGER queue_unref AFTER DELETE ON queue BEGIN
        DELETE FROM messages WHERE id = OLD.message_id
            AND NOT EXISTS (SELECT 1 FROM queue WHERE message_id = OLD.message_id)
            AND NOT EXISTS (SELECT 1 FROM retained WHERE message_id = OLD.message_id);
    END;
    CREATE TRIGGER retained_unref AFTER DELETE ON retained BEGIN
        DELETE FROM messages WHERE id = OLD.message_id
            AND NOT EXISTS (SELECT 1 FROM queue WHERE message_id = OLD.message_id)
            AND NOT EXISTS (SELECT 1 FROM retained WHERE message_id = OLD.message_id);
    END;
    CREATE TRIGGER retained_replaced AFTER UPDATE OF message_id ON retained
        WHEN OLD.message_id <> NEW.message_id BEGIN
        DELETE FROM messages WHERE id = OLD.message_id
            AND NOT EXISTS (SELECT 1 FROM queue WHERE message_id = OLD.message_id)
            AND NOT EXISTS (SELECT 1 FROM retained WHERE message_id = OLD.message_id);
    END;";

/// Schema 1 -> 2. Each schema-1 queue row becomes one message (its id is the queue row's)
/// and a queue row referencing it; each retained row becomes one message numbered after
/// every queue id, with no known owner (schema 1 did not record who published it: such a
/// message counts against no device's quota until it is replaced). Nothing else changes: sessions, subscriptions, in-flight state
/// (`pkid`, `released`) and inbound ids are kept as they were.
const MIGRATE_1_TO_2: &str = "
    DROP INDEX queue_session;
    ALTER TABLE queue RENAME TO queue_v1;
    ALTER TABLE retained RENAME TO retained_v1;
    {MESSAGES}
    INSERT INTO messages (id, topic, payload, qos, retain, props, expires_at)
        SELECT id, topic, payload, msg_qos, 0, props, expires_at FROM queue_v1;
    INSERT INTO queue (id, device, client_id, message_id, qos, retain, sub_ids, pkid, released)
        SELECT id, device, client_id, id, qos, retain, sub_ids, pkid, released FROM queue_v1;
    INSERT INTO messages (id, topic, payload, qos, retain, props, expires_at)
        SELECT (SELECT coalesce(max(id), 0) FROM queue_v1) + rowid,
               topic, payload, qos, 1, props, expires_at
        FROM retained_v1;
    INSERT INTO retained (topic, message_id)
        SELECT topic, (SELECT coalesce(max(id), 0) FROM queue_v1) + rowid FROM retained_v1;
    DROP TABLE queue_v1;
    DROP TABLE retained_v1;";

/// Opens or creates the database, checks it is ours and intact, and brings its schema up
/// to date.
pub(super) fn open(path: &Path) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        // The registry created data_dir already; this is for a store opened on its own.
        let _ = std::fs::create_dir_all(dir);
    }
    let mut conn = Connection::open(path).map_err(open_err)?;
    let app_id: i64 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(open_err)?;
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
        .map_err(open_err)?;
    if app_id != APPLICATION_ID && (app_id != 0 || tables != 0) {
        return Err(StoreError::Foreign {
            path: path.to_path_buf(),
            found: app_id,
        });
    }
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Before anything is written: a damaged file is refused, never used (contract §7).
    if let Some(report) = crate::sqlite::quick_check(&conn).map_err(open_err)? {
        return Err(StoreError::Damaged {
            path: path.to_path_buf(),
            report,
        });
    }
    let _mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // 16 MiB of page cache and a 16 MiB WAL between checkpoints: the queue table is hot.
    conn.pragma_update(None, "cache_size", -16_384)?;
    conn.pragma_update(None, "wal_autocheckpoint", 4096)?;
    if app_id == 0 {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(SESSIONS)?;
        tx.execute_batch(MESSAGES)?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        return Ok(conn);
    }
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    match version {
        SCHEMA_VERSION => {}
        1 => {
            migrate_1_to_2(&mut conn)?;
            tracing::info!(path = %path.display(), "message store migrated to schema 2 (each message stored once)");
        }
        found => {
            return Err(StoreError::Schema {
                path: path.to_path_buf(),
                found,
            })
        }
    }
    Ok(conn)
}

/// One transaction: a failure (full disk, kill -9) leaves the schema-1 file as it was.
fn migrate_1_to_2(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(&MIGRATE_1_TO_2.replace("{MESSAGES}", MESSAGES))?;
    tx.pragma_update(None, "user_version", 2)?;
    tx.commit()?;
    Ok(())
}
