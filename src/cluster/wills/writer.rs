//! The records of this node's wills, written in the background: the broker's calls only
//! queue a change ([`Op`]); this task keeps, per key, what the bucket should hold and
//! writes it, several keys at a time but one write per key at a time, so a key's writes
//! land in the order they were asked. Changes to a key that arrive while it is being
//! written are folded into its next write (a connection that comes and goes within one
//! write costs one more write, not two). A write that fails (NATS away) is retried every
//! [`RETRY`] until it succeeds or is no longer wanted: memory holds at most one pending
//! value per connection with a will.
//!
//! After this node could not write its heartbeat for long enough to be taken for dead
//! ([`Op::Audit`]), every record it wrote is read back: one that another node took over
//! is marked, so that its will is not published here as well.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::Record;
use crate::cluster::Cluster;

/// How often failed writes are tried again.
const RETRY: Duration = Duration::from_secs(1);
/// Writes in flight at once.
const IN_FLIGHT: usize = 64;
/// How long one write may take.
const WRITE_LIMIT: Duration = Duration::from_secs(5);

/// A change to one of this node's records (keys are `<claim key>.<this run>`).
#[derive(Debug)]
pub(super) enum Op {
    /// A connection with a will attached.
    Set { key: String, record: Box<Record> },
    /// The connection of `ticket` ended at `ended` (unix ms); its will waits `delay` s.
    Pending {
        key: String,
        ticket: u64,
        delay: u32,
        ended: i64,
    },
    /// The will of `ticket` was published or cancelled here.
    Clear { key: String, ticket: u64 },
    /// This node may have been taken for dead: read every record back.
    Audit,
    /// Answer once every change asked so far is written (graceful stop).
    Flush(oneshot::Sender<()>),
}

/// What the writer needs.
pub(super) struct Writer {
    pub cluster: Cluster,
    pub store: kv::Store,
    /// Tickets another node took over (shared with `Wills::will_ours`).
    pub taken: Arc<Mutex<HashSet<u64>>>,
}

/// This node's value in the bucket under one key: its revision and its will's ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Written {
    revision: u64,
    ticket: u64,
}

/// One key's state.
#[derive(Debug, Default)]
struct Slot {
    /// What the bucket should hold: this record, or nothing.
    want: Option<Box<Record>>,
    /// This node's value in the bucket, when known.
    written: Option<Written>,
    /// `want` changed since the last write started.
    dirty: bool,
    /// Read `written` back before the next write ([`Op::Audit`]).
    verify: bool,
    /// A write is in flight.
    busy: bool,
    /// In the queue of keys waiting for a write (once at most).
    queued: bool,
}

/// How a write ended.
#[derive(Debug)]
enum Outcome {
    /// The bucket holds the wanted value (None: nothing).
    Wrote(Option<Written>),
    /// The value of this ticket is no longer this node's: another node took it over.
    Taken(u64),
    /// Not written; `verify` still to do if it was asked.
    Failed { why: String, verify: bool },
}

/// Runs until the broker side goes away.
pub(super) async fn run(writer: Writer, mut ops: mpsc::UnboundedReceiver<Op>) {
    let writer = Arc::new(writer);
    let mut slots: HashMap<String, Slot> = HashMap::new();
    let mut waiting: VecDeque<String> = VecDeque::new();
    let mut tasks: JoinSet<(String, Outcome)> = JoinSet::new();
    let mut retry = tokio::time::interval(RETRY);
    let mut failing = false;
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        tokio::select! {
            op = ops.recv() => {
                match op {
                    None => return,
                    Some(Op::Flush(done)) => flushes.push(done),
                    Some(op) => {
                        for key in apply(&mut slots, op) {
                            enqueue(&mut slots, &mut waiting, key);
                        }
                    }
                }
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                let Ok((key, outcome)) = done else { continue };
                if let Outcome::Failed { why, .. } = &outcome {
                    if !failing {
                        tracing::warn!(error = %why, "will records not written to the cluster; retrying");
                    }
                    failing = true;
                } else {
                    failing = false;
                }
                if settle(&writer, &mut slots, &key, outcome) {
                    enqueue(&mut slots, &mut waiting, key);
                }
            }
            _ = retry.tick() => {
                let due: Vec<String> = slots
                    .iter()
                    .filter(|(_, s)| s.dirty && !s.busy && !s.queued)
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in due {
                    enqueue(&mut slots, &mut waiting, key);
                }
            }
        }
        start(&writer, &mut slots, &mut waiting, &mut tasks);
        if !flushes.is_empty() && slots.values().all(|s| !s.dirty && !s.busy) {
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
        }
    }
}

/// Starts writes for queued keys, up to [`IN_FLIGHT`] at once.
fn start(
    writer: &Arc<Writer>,
    slots: &mut HashMap<String, Slot>,
    waiting: &mut VecDeque<String>,
    tasks: &mut JoinSet<(String, Outcome)>,
) {
    while tasks.len() < IN_FLIGHT {
        let Some(key) = waiting.pop_front() else {
            return;
        };
        let Some(slot) = slots.get_mut(&key) else {
            continue;
        };
        slot.queued = false;
        if slot.busy {
            continue;
        }
        if !slot.dirty {
            if slot.want.is_none() && slot.written.is_none() {
                slots.remove(&key);
            }
            continue;
        }
        slot.busy = true;
        slot.dirty = false;
        let verify = std::mem::take(&mut slot.verify);
        let (want, written, w) = (slot.want.clone(), slot.written, writer.clone());
        tasks.spawn(async move {
            let write = w.write(&key, want, written, verify);
            let outcome = match tokio::time::timeout(WRITE_LIMIT, write).await {
                Ok(o) => o,
                Err(_) => Outcome::Failed {
                    why: format!("no answer within {WRITE_LIMIT:?}"),
                    verify,
                },
            };
            (key, outcome)
        });
    }
}

/// Queues a key for a write unless it is queued already.
fn enqueue(slots: &mut HashMap<String, Slot>, waiting: &mut VecDeque<String>, key: String) {
    if let Some(slot) = slots.get_mut(&key) {
        if !slot.queued {
            slot.queued = true;
            waiting.push_back(key);
        }
    }
}

/// Folds a change into its key's slot; the keys that need a write.
fn apply(slots: &mut HashMap<String, Slot>, op: Op) -> Vec<String> {
    match op {
        Op::Set { key, record } => {
            let slot = slots.entry(key.clone()).or_default();
            slot.want = Some(record);
            slot.dirty = true;
            vec![key]
        }
        Op::Pending {
            key,
            ticket,
            delay,
            ended,
        } => {
            let Some(slot) = slots.get_mut(&key) else {
                return Vec::new();
            };
            let Some(record) = slot.want.as_mut().filter(|r| r.ticket == ticket) else {
                return Vec::new();
            };
            record.ended = Some(ended);
            record.delay = delay;
            slot.dirty = true;
            vec![key]
        }
        Op::Clear { key, ticket } => {
            let Some(slot) = slots.get_mut(&key) else {
                return Vec::new();
            };
            if slot.want.as_ref().is_none_or(|r| r.ticket != ticket) {
                return Vec::new();
            }
            slot.want = None;
            slot.dirty = true;
            vec![key]
        }
        Op::Audit => slots
            .iter_mut()
            .filter(|(_, s)| s.written.is_some())
            .map(|(key, s)| {
                s.verify = true;
                s.dirty = true;
                key.clone()
            })
            .collect(),
        Op::Flush(_) => Vec::new(),
    }
}

/// Applies a finished write to its slot; true when the key needs another write now.
fn settle(writer: &Writer, slots: &mut HashMap<String, Slot>, key: &str, outcome: Outcome) -> bool {
    let Some(slot) = slots.get_mut(key) else {
        return false;
    };
    slot.busy = false;
    match outcome {
        Outcome::Wrote(written) => slot.written = written,
        Outcome::Taken(ticket) => {
            // Marked before it is logged: a connection ending once the line is out must
            // find its will taken (the line is what operators, and the tests, act on).
            writer
                .taken
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(ticket);
            tracing::warn!(key, "a will recorded here was taken over by another node (this node was taken for dead): it is not published here");
            slot.written = None;
            // Written again, it would be published twice.
            if slot.want.as_ref().is_some_and(|r| r.ticket == ticket) {
                slot.want = None;
            }
        }
        // Retried on the next tick.
        Outcome::Failed { verify, .. } => {
            slot.verify |= verify;
            slot.dirty = true;
            return false;
        }
    }
    if slot.dirty {
        return true;
    }
    if slot.want.is_none() && !slot.queued {
        slots.remove(key);
    }
    false
}

impl Writer {
    /// Makes the bucket hold `want` under `key`, knowing this node's value there is
    /// `written` (read back first when `verify`). A record whose connection ended is
    /// updated by compare-and-set, which fails when another node took the record over;
    /// everything else is a plain put.
    async fn write(
        &self,
        key: &str,
        want: Option<Box<Record>>,
        written: Option<Written>,
        verify: bool,
    ) -> Outcome {
        let failed = |e: &dyn std::fmt::Display| Outcome::Failed {
            why: e.to_string(),
            verify,
        };
        let written = match (written, verify) {
            (Some(w), true) => match self.read_back(key, w).await {
                Ok(Some(w)) => Some(w),
                Ok(None) => return Outcome::Taken(w.ticket),
                Err(e) => return failed(&e),
            },
            (w, _) => w,
        };
        match (want, written) {
            (Some(record), Some(w)) if record.ended.is_some() => self.update(key, &record, w).await,
            (Some(record), _) => match self.store.put(key, record.encode()).await {
                Ok(revision) => Outcome::Wrote(Some(Written {
                    revision,
                    ticket: record.ticket,
                })),
                Err(e) => failed(&e),
            },
            (None, Some(w)) => {
                let stream = &self.store.stream_name;
                match crate::cluster::erase(&self.cluster, stream, w.revision).await {
                    // Gone either way: removed now, or taken over by another node.
                    Ok(_) => Outcome::Wrote(None),
                    Err(e) => failed(&e),
                }
            }
            (None, None) => Outcome::Wrote(None),
        }
    }

    /// This node's value under `key` as the bucket holds it: `w` (at the revision the
    /// bucket has, if the answer to a write of it was lost), or None when it is gone or
    /// another node's.
    async fn read_back(&self, key: &str, w: Written) -> Result<Option<Written>, String> {
        let entry = self.store.entry(key).await.map_err(|e| e.to_string())?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .filter(|e| {
                e.revision == w.revision
                    || Record::decode(&e.value)
                        .is_ok_and(|r| r.run == self.cluster.run && r.ticket == w.ticket)
            })
            .map(|e| Written {
                revision: e.revision,
                ticket: w.ticket,
            }))
    }

    async fn update(&self, key: &str, record: &Record, w: Written) -> Outcome {
        use kv::UpdateErrorKind;
        let done = |revision| {
            Outcome::Wrote(Some(Written {
                revision,
                ticket: record.ticket,
            }))
        };
        let failed = |why: String| Outcome::Failed { why, verify: false };
        match self.store.update(key, record.encode(), w.revision).await {
            Ok(revision) => return done(revision),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {}
            Err(e) => return failed(e.to_string()),
        }
        // The value moved: taken over, unless it is still ours at another revision (the
        // answer to an earlier write of ours was lost); then once more at that one.
        match self.read_back(key, w).await {
            Ok(Some(now)) => match self.store.update(key, record.encode(), now.revision).await {
                Ok(revision) => done(revision),
                Err(e) => failed(e.to_string()),
            },
            Ok(None) => Outcome::Taken(w.ticket),
            Err(e) => failed(e),
        }
    }
}
