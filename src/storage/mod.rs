//! Durable broker state (SPEC 7): retained messages and persistent sessions (their
//! subscriptions, the QoS 1/2 messages queued or in flight for them, the inbound QoS 2
//! packet ids), in `data_dir/messages.db`. Each message is stored once however many
//! sessions hold it, and read back once into one `Arc` they all share (see `schema`).
//!
//! Why a second SQLite file beside the registry's `certmq.db`: SQLite has one writer per
//! database; the message store writes continuously with group commit, while the registry
//! is also written by the `certmq devices` CLI from another process. Separate files keep a
//! CLI command from ever waiting behind a message batch, and vice versa.
//!
//! Group commit: one writer thread owns the connection and applies [`Op`]s in the order
//! they were submitted. It takes every op waiting when it wakes, applies them in ONE
//! transaction and commits (`synchronous = FULL`: one fsync), then completes the
//! [`Store::barrier`]s among them. A publisher's PUBACK/PUBREC waits for a barrier submitted
//! after its ops, so "acknowledged" means "committed", and many publishers share each fsync.
//! The op channel is bounded in practice by the protocol: every op that can be submitted
//! repeatedly by a peer is followed by a barrier its connection waits for (QoS 1/2
//! publishes, retained publishes) or is bounded by the in-flight window (acks).

mod recover;
mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use tokio::sync::oneshot;

pub use recover::{Recovered, StoredQueued, StoredRetained, StoredSession};

use crate::broker::message::Message;
use crate::broker::router::SubOptions;
use crate::broker::session::SessionKey;
use crate::identity::DeviceName;
use crate::mqtt::codec::QoS;

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
    /// SPEC 7: a damaged file is refused at start, never used silently.
    #[error("{path} is damaged (SQLite quick_check: {report}); refusing to use it")]
    Damaged { path: PathBuf, report: String },
    #[error("message store error")]
    Sqlite(#[from] rusqlite::Error),
    #[error("a stored row is corrupt: {0}")]
    Corrupt(String),
    /// A batch failed to commit (disk full, read-only, I/O error): what it held is not durable.
    #[error("the message store could not commit: {0}")]
    CommitFailed(String),
    /// The write-ahead log could not be fully copied into the database file (another
    /// process was reading it).
    #[error("the message store's write-ahead log was not fully checkpointed: {0}")]
    Checkpoint(String),
    #[error("the message store writer has stopped")]
    Stopped,
    #[error("cannot start the message store writer")]
    Thread(#[source] std::io::Error),
}

/// One change to the durable state, applied in submission order.
#[derive(Debug)]
pub enum Op {
    /// Creates or updates a persistent session; `expires_at` is set while it is offline.
    Session {
        key: SessionKey,
        /// MQTT 5 session expiry seconds; None = never.
        expiry: Option<u32>,
        expires_at: Option<i64>,
    },
    /// Removes a session with everything it holds.
    DropSession {
        key: SessionKey,
    },
    Subscribe {
        key: SessionKey,
        /// The subscription as the client wrote it after the alias (`$share/g/f` or `f`).
        filter: String,
        opts: SubOptions,
        aliased: bool,
    },
    Unsubscribe {
        key: SessionKey,
        filter: String,
    },
    /// A delivery queued for a persistent session. The message itself is written once,
    /// by the first op that carries it (its `Arc` remembers its row: `StoreId`).
    Enqueue {
        id: i64,
        key: SessionKey,
        msg: Arc<Message>,
        qos: QoS,
        retain: bool,
        sub_ids: Vec<u32>,
    },
    /// The delivery went out with this packet id (DUP on redelivery after a restart).
    Sent {
        id: i64,
        pkid: u16,
    },
    /// PUBREC received: only PUBREL/PUBCOMP remain.
    Released {
        id: i64,
    },
    /// Acknowledged (PUBACK / PUBCOMP), expired, or dropped.
    Delivered {
        id: i64,
    },
    /// Stores or (None) clears the retained message of a topic.
    Retain {
        topic: String,
        msg: Option<Arc<Message>>,
        /// The device that published it, whose quota it counts against (SPEC 4).
        owner: Option<DeviceName>,
    },
    /// An inbound QoS 2 packet id between PUBLISH and PUBREL.
    InboundBegin {
        key: SessionKey,
        pkid: u16,
    },
    InboundRelease {
        key: SessionKey,
        pkid: u16,
    },
    /// A write that changes nothing durable: it tests whether commits work again after
    /// they failed (disk full), since only a real write can tell.
    Probe,
    /// Ops that must be committed in the same transaction (see [`Store::group`]).
    Group(Vec<Op>),
    /// Completes when everything submitted before it is committed.
    Barrier(oneshot::Sender<Result<(), StoreError>>),
    /// A barrier that then checkpoints the write-ahead log into the database file and
    /// truncates the log, so that the `.db` file alone is the whole store (graceful stop).
    Checkpoint(oneshot::Sender<Result<(), StoreError>>),
}

thread_local! {
    /// The ops of the [`Group`] open on this thread, if any.
    static GROUP: std::cell::RefCell<Option<Vec<Op>>> = const { std::cell::RefCell::new(None) };
}

/// An open group of ops (see [`Store::group`]); submits them as one when dropped.
pub struct Group<'a> {
    store: &'a Store,
    /// Only the outermost guard of nested groups submits.
    outer: bool,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for Group<'_> {
    fn drop(&mut self) {
        if !self.outer {
            return;
        }
        let mut ops = GROUP.with(|g| g.borrow_mut().take()).unwrap_or_default();
        // A lone op needs no group around it.
        if ops.len() > 1 {
            self.store.submit(Op::Group(ops));
        } else if let Some(op) = ops.pop() {
            self.store.submit(op);
        }
    }
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
        let (tx, rx) = mpsc::channel();
        writer::spawn(conn, rx, failing.clone(), max_message_id + 1)?;
        let store = Store {
            inner: Arc::new(Inner {
                path,
                tx,
                next_id: AtomicI64::new(recovered.max_queue_id + 1),
                failing,
            }),
        };
        Ok((store, recovered))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// A fresh id for a queued delivery.
    pub fn next_id(&self) -> i64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Submits an op (applied in order, committed with the next batch). While a
    /// [`Group`] is open on this thread, the op joins the group instead.
    pub fn submit(&self, op: Op) {
        let op = GROUP.with(|g| match g.borrow_mut().as_mut() {
            Some(ops) => {
                ops.push(op);
                None
            }
            None => Some(op),
        });
        if let Some(op) = op {
            // The writer only stops when the store is dropped; an op sent after that is moot.
            let _ = self.inner.tx.send(op);
        }
    }

    /// Opens a group: every op submitted on this thread until the returned guard drops is
    /// committed in one transaction, or not at all (SPEC 7). What needs it: an inbound
    /// QoS 2 packet id must never be durable without the message it stands for (a crash
    /// between two batches would otherwise leave the id, make the client's resend look
    /// like a duplicate, and complete it without delivery), and a message's deliveries
    /// to many sessions go together. The guard is not `Send`: it cannot be held across an
    /// await, so a group is a synchronous stretch of one thread.
    pub fn group(&self) -> Group<'_> {
        let outer = GROUP.with(|g| {
            let mut g = g.borrow_mut();
            if g.is_none() {
                *g = Some(Vec::new());
                true
            } else {
                false
            }
        });
        Group {
            store: self,
            outer,
            _not_send: std::marker::PhantomData,
        }
    }

    /// Waits until everything submitted so far is committed.
    pub async fn barrier(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.submit(Op::Barrier(tx));
        rx.await.unwrap_or(Err(StoreError::Stopped))
    }

    /// A barrier whose completion the caller polls later: lets a connection keep reading
    /// while its messages are being committed (acknowledgements are pipelined).
    pub fn barrier_rx(&self) -> oneshot::Receiver<Result<(), StoreError>> {
        let (tx, rx) = oneshot::channel();
        self.submit(Op::Barrier(tx));
        rx
    }

    /// The same, for blocking callers (shutdown, tests).
    pub fn barrier_blocking(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.submit(Op::Barrier(tx));
        rx.blocking_recv().unwrap_or(Err(StoreError::Stopped))
    }

    /// Commits everything submitted so far, then checkpoints the write-ahead log into
    /// `messages.db` and truncates it (SPEC 7: a graceful stop leaves a self-contained
    /// database). Submitting more afterwards is allowed; it goes to the log again.
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.submit(Op::Checkpoint(tx));
        rx.await.unwrap_or(Err(StoreError::Stopped))
    }

    /// While commits fail: tries one write and waits for it. Ok means the store takes
    /// writes again (and [`Store::failing`] is cleared).
    pub async fn probe(&self) -> Result<(), StoreError> {
        self.submit(Op::Probe);
        self.barrier().await
    }

    /// Whether the last commit failed (SPEC 7: then new QoS 1/2 messages are refused).
    pub fn failing(&self) -> bool {
        self.inner.failing.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests;
