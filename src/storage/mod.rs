//! Durable broker state (contract §7): retained messages and persistent sessions (their
//! subscriptions, the QoS 1/2 messages queued or in flight for them, the inbound QoS 2
//! packet ids), in `data_dir/messages.db`. Each message is stored once however many
//! sessions hold it, and read back once into one `Arc` they all share (see `schema`).
//!
//! Why a second SQLite file beside the registry's `certmq.db`: SQLite has one writer per
//! database; the message store writes continuously with group commit, while the registry
//! is also written by the `certmq devices` CLI from another process. Separate files keep a
//! CLI command from ever waiting behind a message batch, and vice versa.
//!
//! This is the standalone backend of the broker's durability port
//! (`broker::journal`): it implements [`Backend`] and depends only on the port's plain
//! types. Group commit: one writer thread owns the connection and applies [`Op`]s in the
//! order they were submitted. It takes every op waiting when it wakes, applies them in ONE
//! transaction and commits (`synchronous = FULL`: one fsync), then completes the
//! barriers among them. A publisher's PUBACK/PUBREC waits for a barrier submitted
//! after its ops, so "acknowledged" means "committed", and many publishers share each fsync.
//! The op channel is bounded in practice by the protocol: every op that can be submitted
//! repeatedly by a peer is followed by a barrier its connection waits for (QoS 1/2
//! publishes, retained publishes) or is bounded by the in-flight window (acks).

mod recover;
mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use crate::broker::journal::{Backend, Op, Recovered};

/// The database file inside `data_dir`.
pub const DB_FILE: &str = "messages.db";
/// `PRAGMA application_id` of a certmq message store ("cmqm").
const APPLICATION_ID: i64 = 0x636d_716d;
/// 2: each message stored once (`messages`), referenced by `queue` and `retained`.
const SCHEMA_VERSION: i64 = 2;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the message store {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "{path} is not a certmq message store (application_id {found:#x}); refusing to use it"
    )]
    Foreign { path: PathBuf, found: i64 },
    #[error("{path} has schema version {found}, this certmq knows {SCHEMA_VERSION}")]
    Schema { path: PathBuf, found: i64 },
    /// contract §7: a damaged file is refused at start, never used silently.
    #[error("{path} is damaged (SQLite quick_check: {report}); refusing to use it")]
    Damaged { path: PathBuf, report: String },
    #[error("message store error")]
    Sqlite(#[from] rusqlite::Error),
    #[error("a stored row is corrupt: {0}")]
    Corrupt(String),
    #[error("cannot start the message store writer")]
    Thread(#[source] std::io::Error),
}

/// Handle to the store; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    tx: mpsc::Sender<Op>,
    /// Ids for queued deliveries, assigned without a round trip to the writer.
    next_id: AtomicI64,
    /// Set while commits fail (disk full, read-only): new QoS 1/2 messages are refused.
    failing: Arc<AtomicBool>,
    /// Batches that failed to commit so far (`journal::Epoch`).
    failures: Arc<AtomicU64>,
}

impl Store {
    /// Opens (creating if needed) `data_dir/messages.db`, reads back everything it holds,
    /// and starts the writer thread. A corrupt or foreign file is an error, never replaced.
    pub fn open(data_dir: &Path) -> Result<(Store, Recovered), StoreError> {
        let path = data_dir.join(DB_FILE);
        // Every database error while opening names the file (read-only, corrupt, locked).
        let named = |e: StoreError| match e {
            StoreError::Sqlite(source) => StoreError::Open {
                path: path.clone(),
                source,
            },
            other => other,
        };
        let conn = schema::open(&path).map_err(named)?;
        let (recovered, max_message_id) =
            recover::load(&conn, crate::cert::now_secs()).map_err(named)?;
        let failing = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel();
        writer::spawn(
            conn,
            rx,
            writer::Health {
                failing: failing.clone(),
                failures: failures.clone(),
            },
            max_message_id + 1,
        )?;
        let store = Store {
            inner: Arc::new(Inner {
                path,
                tx,
                next_id: AtomicI64::new(recovered.max_queue_id + 1),
                failing,
                failures,
            }),
        };
        Ok((store, recovered))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

impl Backend for Store {
    fn submit(&self, op: Op) {
        // The writer only stops when the store is dropped; an op sent after that is moot.
        let _ = self.inner.tx.send(op);
    }

    fn next_id(&self) -> i64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn failing(&self) -> bool {
        self.inner.failing.load(Ordering::Relaxed)
    }

    fn failures(&self) -> u64 {
        self.inner.failures.load(Ordering::SeqCst)
    }

    fn describe(&self) -> String {
        self.inner.path.display().to_string()
    }
}

#[cfg(test)]
mod tests;
