//! The durability port: what the broker asks of a backend that keeps sessions and
//! retained messages across restarts (docs/architecture.md, "Durability").
//!
//! The broker describes every durable change as an [`Op`] and submits it through a
//! [`Journal`]; a [`Backend`] applies the ops in submission order and completes
//! barriers once everything before them is committed. "Acknowledged" means "committed":
//! a PUBACK/PUBREC waits for a barrier submitted after the message's ops. At start the
//! backend hands back what it holds as plain rows ([`Recovered`]).
//!
//! The broker owns this module; a backend depends on it and never the other way round.
//! Today's backend is `storage::Store` (SQLite, one writer thread, group commit); the
//! seam is shaped so that a clustered backend (JetStream) can implement the same trait:
//! ops are per session or per topic, ids are backend-assigned, and grouping is an
//! explicit, synchronous stretch of one thread rather than a transaction object.

use std::fmt;
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::identity::DeviceName;
use crate::mqtt::codec::QoS;

// The vocabulary of the port: a backend stores and returns these plain types.
pub use super::message::{Forwarded, Message, StoreId};
pub use super::router::{RetainHandling, SubOptions};
pub use super::session::SessionKey;

/// Why a barrier did not complete with success.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    /// A batch failed to commit (disk full, read-only, I/O error, backend unreachable):
    /// what it held is not durable.
    #[error("the message store could not commit: {0}")]
    Failed(String),
    /// Committed, but the backend could not compact its log at a graceful stop.
    #[error("the message store's write-ahead log was not fully checkpointed: {0}")]
    Checkpoint(String),
    /// The backend has stopped; nothing more will be committed.
    #[error("the message store writer has stopped")]
    Stopped,
}

/// The completion of a barrier: Ok once everything submitted before it is committed.
pub type Commit = Result<(), CommitError>;

/// The backend's count of failed commits, read before a connection submits the ops an
/// acknowledgement depends on ([`Journal::epoch`]).
///
/// A barrier only answers for its own batch: the writer may take a connection's ops in one
/// batch, fail it, and take the barrier submitted right after them in the next batch, which
/// commits. Answered alone, that barrier would say Ok, and the connection would acknowledge
/// what was rolled back. [`Journal::since`] turns such an Ok into a failure when any batch
/// failed after the epoch. It is conservative: a failure of another connection's batch in
/// that window also counts, so a message that was in fact committed can be refused (the
/// client resends it: a duplicate at worst, never a loss).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch(u64);

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
        /// The device that published it, whose quota it counts against.
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
    /// Ops that must be committed together or not at all (see [`Journal::group`]).
    Group(Vec<Op>),
    /// Completes when everything submitted before it is committed.
    Barrier(oneshot::Sender<Commit>),
    /// The end of a graceful stop: a barrier, then the backend compacts its log and closes
    /// (SQLite: the write-ahead log is checkpointed, so the `.db` file alone is the whole
    /// store, and the connection closed, which removes the `-wal` and `-shm` files). Ops
    /// submitted afterwards are not applied; their barriers complete with
    /// [`CommitError::Stopped`].
    Close(oneshot::Sender<Commit>),
}

/// A delivery read back from the backend; `msg` is shared with every other delivery (and
/// the retained entry) of the same message.
#[derive(Debug, Clone)]
pub struct StoredQueued {
    pub id: i64,
    pub msg: Arc<Message>,
    pub qos: QoS,
    pub retain: bool,
    pub sub_ids: Vec<u32>,
    /// Set once sent: redelivered with DUP and this id.
    pub pkid: Option<u16>,
    /// PUBREC was received: only PUBREL remains.
    pub released: bool,
}

/// A persistent session read back.
#[derive(Debug, Clone)]
pub struct StoredSession {
    pub key: SessionKey,
    /// MQTT 5 session expiry seconds; None = never.
    pub expiry: Option<u32>,
    /// When the session ends if nobody reconnects (seconds since the epoch).
    pub expires_at: Option<i64>,
    /// (filter as subscribed after the alias, options, whether made through `me`).
    pub subscriptions: Vec<(String, SubOptions, bool)>,
    pub queue: Vec<StoredQueued>,
    pub inbound: Vec<u16>,
}

/// A retained message read back, with the device whose quota it counts against (None:
/// unknown, e.g. migrated from an older store).
#[derive(Debug, Clone)]
pub struct StoredRetained {
    pub msg: Arc<Message>,
    pub owner: Option<DeviceName>,
}

/// Everything a backend held at start.
#[derive(Debug, Default)]
pub struct Recovered {
    pub sessions: Vec<StoredSession>,
    pub retained: Vec<StoredRetained>,
    /// The largest queue id in use (new ids continue after it).
    pub max_queue_id: i64,
}

/// A durable backend. Implementations apply ops in submission order and must never
/// complete a barrier before every op submitted ahead of it is durable.
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// Queues an op; it is applied in order and committed with a later batch.
    fn submit(&self, op: Op);
    /// A fresh id for a queued delivery, unique for this backend's lifetime.
    fn next_id(&self) -> i64;
    /// Whether the last commit failed (then new QoS 1/2 messages are refused).
    fn failing(&self) -> bool;
    /// How many batches failed to commit so far; only ever grows. Incremented before any
    /// barrier of the failed batch (or a later one) is answered (see [`Epoch`]).
    fn failures(&self) -> u64;
    /// Where the state lives, for log lines and `/healthz` (a file path, a bucket).
    fn describe(&self) -> String;
}

thread_local! {
    /// The ops of the [`Group`] open on this thread, if any.
    static GROUP: std::cell::RefCell<Option<Vec<Op>>> = const { std::cell::RefCell::new(None) };
}

/// The broker's handle on its backend; cheap to clone. Grouping and barriers are
/// written here once, for every backend.
#[derive(Debug, Clone)]
pub struct Journal {
    backend: Arc<dyn Backend>,
}

/// An open group of ops (see [`Journal::group`]); submits them as one when dropped.
pub struct Group<'a> {
    journal: &'a Journal,
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
            self.journal.backend.submit(Op::Group(ops));
        } else if let Some(op) = ops.pop() {
            self.journal.backend.submit(op);
        }
    }
}

impl Journal {
    pub fn new(backend: Arc<dyn Backend>) -> Journal {
        Journal { backend }
    }

    /// Where the state lives (log lines, `/healthz`).
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// A fresh id for a queued delivery.
    pub fn next_id(&self) -> i64 {
        self.backend.next_id()
    }

    /// Submits an op (applied in order, committed with a later batch). While a [`Group`]
    /// is open on this thread, the op joins the group instead.
    pub fn submit(&self, op: Op) {
        let op = GROUP.with(|g| match g.borrow_mut().as_mut() {
            Some(ops) => {
                ops.push(op);
                None
            }
            None => Some(op),
        });
        if let Some(op) = op {
            self.backend.submit(op);
        }
    }

    /// Opens a group: every op submitted on this thread until the returned guard drops is
    /// committed together, or not at all. What needs it: an inbound QoS 2 packet id must
    /// never be durable without the message it stands for (a crash between two batches
    /// would otherwise leave the id, make the client's resend look like a duplicate, and
    /// complete it without delivery), and a message's deliveries to many sessions go
    /// together. The guard is not `Send`: it cannot be held across an await, so a group
    /// is a synchronous stretch of one thread.
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
            journal: self,
            outer,
            _not_send: std::marker::PhantomData,
        }
    }

    /// Waits until everything submitted so far is committed.
    pub async fn barrier(&self) -> Commit {
        self.barrier_rx().await.unwrap_or(Err(CommitError::Stopped))
    }

    /// A barrier whose completion the caller polls later: lets a connection keep reading
    /// while its messages are being committed (acknowledgements are pipelined).
    pub fn barrier_rx(&self) -> oneshot::Receiver<Commit> {
        let (tx, rx) = oneshot::channel();
        self.submit(Op::Barrier(tx));
        rx
    }

    /// Commits everything submitted so far, compacts the backend's log and closes the
    /// backend (a graceful stop leaves a self-contained database and nothing open): see
    /// [`Op::Close`]. Completes once the backend is closed.
    pub async fn close(&self) -> Commit {
        let (tx, rx) = oneshot::channel();
        self.submit(Op::Close(tx));
        rx.await.unwrap_or(Err(CommitError::Stopped))
    }

    /// While commits fail: tries one write and waits for it. Ok means the backend takes
    /// writes again (and [`Journal::failing`] is cleared).
    pub async fn probe(&self) -> Commit {
        self.submit(Op::Probe);
        self.barrier().await
    }

    /// Whether the last commit failed (new QoS 1/2 messages are then refused).
    pub fn failing(&self) -> bool {
        self.backend.failing()
    }

    /// Read before submitting the ops an acknowledgement depends on; see [`Epoch`].
    pub fn epoch(&self) -> Epoch {
        Epoch(self.backend.failures())
    }

    /// The outcome of a barrier for ops submitted after `epoch`: a failure when the
    /// barrier failed or any batch failed since `epoch` (the ops may have been in it).
    pub fn since(&self, epoch: Epoch, outcome: Commit) -> Commit {
        outcome?;
        let failed = self.backend.failures().saturating_sub(epoch.0);
        if failed > 0 {
            return Err(CommitError::Failed(format!(
                "{failed} commit(s) failed while these changes were pending"
            )));
        }
        Ok(())
    }

    /// [`Journal::barrier`] answered for the ops submitted after `epoch` (see
    /// [`Journal::since`]).
    pub async fn barrier_since(&self, epoch: Epoch) -> Commit {
        let outcome = self.barrier().await;
        self.since(epoch, outcome)
    }
}
