//! The store's writer thread: the only owner of the SQLite connection after recovery.
//! One transaction per batch of ops, one fsync per commit (group commit).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, Transaction};

use super::{StoreError, SCHEMA_VERSION};
use crate::broker::journal::{
    CommitError, Forwarded, Message, Op, RetainHandling, SessionKey, SubOptions,
};
use crate::identity::DeviceName;
use crate::mqtt::codec::QoS;

/// The most ops applied in one transaction; more wait for the next one, so one commit
/// never grows without bound.
const MAX_BATCH: usize = 50_000;
/// How long a batch with new deliveries waits for more ops (see `run`). Below one fsync on
/// the disks measured here (about 0.4 ms for a 4 KiB `dd oflag=dsync` write), so it adds
/// little latency, and long enough for a subscriber on the same host to acknowledge.
const GATHER: Duration = Duration::from_millis(1);
/// How long an update that matched no row is kept for its Enqueue (see [`EarlyUpdates`]).
/// Only routing separates the two: the publisher submits the Enqueue when its group closes,
/// at the end of a synchronous stretch of one thread (microseconds; milliseconds under
/// load), and the writer takes ops in submission order, so the Enqueue arrives a batch or
/// two later. A minute is far longer than that, even behind slow fsyncs or a failed
/// commit's 5 s busy timeout. An update still kept after it is one whose row is gone for
/// good (its session dropped or expired, its Enqueue rolled back): it is dropped.
const EARLY_MAX_AGE: Duration = Duration::from_secs(60);
/// The most deliveries with kept updates (some 150 bytes each: about 15 MB at the cap).
/// An update waits only while its Enqueue is on its way, a batch or two, so even at tens
/// of thousands of deliveries a second few are kept at a time; what fills the map beyond
/// that waits for rows that never come, and past the cap the oldest of it goes first.
const EARLY_MAX: usize = 100_000;

/// What the writer tells the rest of the broker about its commits.
pub(super) struct Health {
    /// Set while commits fail, cleared by the next successful one.
    pub failing: Arc<AtomicBool>,
    /// Failed batches so far, incremented before any barrier is answered after the
    /// failure (`journal::Epoch`).
    pub failures: Arc<AtomicU64>,
}

/// Starts the writer thread. `next_message` is the first unused message id.
pub(super) fn spawn(
    conn: Connection,
    rx: mpsc::Receiver<Op>,
    health: Health,
    next_message: i64,
) -> Result<(), StoreError> {
    std::thread::Builder::new()
        .name("certmq-store".into())
        .spawn(move || run(conn, rx, &health, next_message))
        .map(|_| ())
        .map_err(StoreError::Thread)
}

/// Message ids, assigned by the writer (the one thread that stores messages) the first time
/// it writes a message; the id then stays with the message's `Arc` ([`StoreId`]), so every
/// later op for the same message references the same row.
///
/// [`StoreId`]: crate::broker::journal::StoreId
struct MessageIds {
    next: i64,
}

impl MessageIds {
    fn of(&mut self, msg: &Message) -> i64 {
        msg.store_id.get_or_assign(|| {
            let id = self.next;
            self.next += 1;
            id
        })
    }
}

fn run(mut conn: Connection, rx: mpsc::Receiver<Op>, health: &Health, next_message: i64) {
    let mut ids = MessageIds { next: next_message };
    let mut early = EarlyUpdates::default();
    // The outcome of the last batch that wrote something. A batch of barriers alone
    // answers with it: the ops those barriers follow may have gone in that batch (the
    // writer can wake between a connection's ops and its barrier), and a failed commit
    // must never be reported as committed.
    let mut last: Result<(), String> = Ok(());
    while let Ok(first) = rx.recv() {
        let mut ops = vec![first];
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        // Group-commit window: when the batch queues new deliveries, wait briefly for more
        // ops. Online subscribers usually acknowledge within it, and `coalesce` then keeps
        // those rows off the disk entirely; other publishers' messages share the commit.
        // A plain sleep, then a drain: waiting in `recv_timeout` would wake this thread for
        // every op that arrives, thousands of times per window.
        if ops.iter().any(|op| matches!(op, Op::Enqueue { .. })) {
            std::thread::sleep(GATHER);
            while ops.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
        }
        let mut barriers = Vec::new();
        let mut closes = Vec::new();
        let mut work = Vec::with_capacity(ops.len());
        // A group is committed in this batch as a whole: flattened in place.
        let mut flat = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Group(inner) => flat.extend(inner),
                other => flat.push(other),
            }
        }
        for op in flat {
            match op {
                Op::Barrier(b) => barriers.push(b),
                Op::Close(c) => closes.push(c),
                other => work.push(other),
            }
        }
        let gathered = work.len();
        let work = prepare(work, &mut early);
        let started = Instant::now();
        if !work.is_empty() {
            last =
                apply(&mut conn, &work, &mut ids, &mut early, started).map_err(|e| e.to_string());
            tracing::trace!(
                gathered,
                applied = work.len(),
                barriers = barriers.len(),
                commit_us = started.elapsed().as_micros() as u64,
                "store batch"
            );
            match &last {
                Ok(()) => {
                    if health.failing.swap(false, Ordering::Relaxed) {
                        tracing::info!("message store writable again");
                    }
                }
                Err(e) => {
                    health.failures.fetch_add(1, Ordering::SeqCst);
                    health.failing.store(true, Ordering::Relaxed);
                    tracing::error!(error = %e, ops = work.len(), "message store commit failed: these changes are not durable");
                }
            }
        }
        // After the batch, with its start time: an Enqueue in this batch had its chance.
        early.prune(started);
        for b in barriers {
            let _ = b.send(last.clone().map_err(CommitError::Failed));
        }
        if !closes.is_empty() {
            let checkpointed = match &last {
                Ok(()) => checkpoint(&conn),
                Err(e) => Err(CommitError::Failed(e.clone())),
            };
            // Closed before answering: whoever waits on the close may then copy, remove or
            // reopen the files (the last connection's close deletes `-wal` and `-shm`).
            let closed = conn
                .close()
                .map_err(|(_, e)| CommitError::Checkpoint(format!("closing the database: {e}")));
            let outcome = checkpointed.and(closed);
            for c in closes {
                let _ = c.send(outcome.clone());
            }
            return;
        }
    }
}

/// `PRAGMA wal_checkpoint(TRUNCATE)`: copies every committed page from the log into the
/// database file, syncs it, and empties the log. Busy (another process reading the file
/// holds an old snapshot) leaves part of the log in place: reported, nothing is lost.
fn checkpoint(conn: &Connection) -> Result<(), CommitError> {
    let (busy, log, done): (i64, i64, i64) = conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .map_err(|e| CommitError::Checkpoint(e.to_string()))?;
    if busy != 0 {
        return Err(CommitError::Checkpoint(format!(
            "{done} of {log} log pages copied; a reader kept the rest"
        )));
    }
    Ok(())
}

/// Orders and trims a batch's ops before they are applied: see the two steps.
fn prepare(work: Vec<Op>, early: &mut EarlyUpdates) -> Vec<Op> {
    let work = updates_after_their_enqueue(work);
    let (work, coalesced) = coalesce(work);
    // Updates kept for a delivery whose Enqueue coalesce just removed would wait for a row
    // that is never written.
    for id in coalesced {
        early.forget(id);
    }
    work
}

/// A delivery's group (its Enqueue) is submitted when the publisher's routing ends, so the
/// subscriber's connection can send it and submit `Sent` (even `Released`/`Delivered`)
/// a moment before. Within a batch, such updates are moved right after their Enqueue, so
/// they apply to the row instead of to nothing; across batches, [`EarlyUpdates`] keeps them.
fn updates_after_their_enqueue(work: Vec<Op>) -> Vec<Op> {
    let update_id = |op: &Op| match op {
        Op::Sent { id, .. } | Op::Released { id } | Op::Delivered { id } => Some(*id),
        _ => None,
    };
    // Ids updated before their Enqueue in this batch.
    let mut seen_enqueue = HashSet::new();
    let mut early = HashSet::new();
    for op in &work {
        match op {
            Op::Enqueue { id, .. } => {
                seen_enqueue.insert(*id);
            }
            other => {
                if let Some(id) = update_id(other) {
                    if !seen_enqueue.contains(&id) {
                        early.insert(id);
                    }
                }
            }
        }
    }
    let enqueued_later: HashSet<i64> = work
        .iter()
        .filter_map(|op| match op {
            Op::Enqueue { id, .. } if early.contains(id) => Some(*id),
            _ => None,
        })
        .collect();
    if enqueued_later.is_empty() {
        return work;
    }
    let mut held: HashMap<i64, Vec<Op>> = HashMap::new();
    let mut out = Vec::with_capacity(work.len());
    let mut enqueued = HashSet::new();
    for op in work {
        match update_id(&op) {
            Some(id) if enqueued_later.contains(&id) && !enqueued.contains(&id) => {
                held.entry(id).or_default().push(op);
            }
            _ => {
                let after = match &op {
                    Op::Enqueue { id, .. } => {
                        enqueued.insert(*id);
                        held.remove(id)
                    }
                    _ => None,
                };
                out.push(op);
                out.extend(after.into_iter().flatten());
            }
        }
    }
    out
}

/// One change to a queued delivery's row, kept in [`EarlyUpdates`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Update {
    Sent { pkid: u16 },
    Released,
    Delivered,
}

impl Update {
    fn of(op: &Op) -> Option<(i64, Update)> {
        match op {
            Op::Sent { id, pkid } => Some((*id, Update::Sent { pkid: *pkid })),
            Op::Released { id } => Some((*id, Update::Released)),
            Op::Delivered { id } => Some((*id, Update::Delivered)),
            _ => None,
        }
    }

    /// Applies the update; returns how many rows it changed (0: the row is not there).
    fn apply(self, tx: &Transaction<'_>, id: i64) -> Result<usize, rusqlite::Error> {
        match self {
            Update::Sent { pkid } => tx
                .prepare_cached("UPDATE queue SET pkid = ?2 WHERE id = ?1")?
                .execute(params![id, pkid]),
            Update::Released => tx
                .prepare_cached("UPDATE queue SET released = 1 WHERE id = ?1")?
                .execute(params![id]),
            Update::Delivered => tx
                .prepare_cached("DELETE FROM queue WHERE id = ?1")?
                .execute(params![id]),
        }
    }
}

/// Updates (`Sent`, `Released`, `Delivered`) that reached the writer before their
/// delivery's Enqueue, by delivery id, in arrival order. The Enqueue travels in the
/// publisher's group, submitted when routing ends; the subscriber can take the delivery
/// from its in-memory queue, send it and even have it acknowledged before that, and the
/// writer can commit those updates in an earlier batch than the row. Applied then, they
/// change nothing and are lost: an acknowledged delivery comes back after a restart (a
/// second delivery of a QoS 2 message), a packet id already on the wire is not on disk.
/// So an update that changes no row is kept here, and applied right after its Enqueue,
/// in the Enqueue's transaction.
///
/// What is kept follows the transactions: an update kept by a batch that fails is
/// dropped with the rest of that batch (see [`EarlyUpdates::roll_back`]). Updates for a
/// row that is gone for good (a dropped or expired session) are never claimed: they are
/// dropped after [`EARLY_MAX_AGE`], or sooner past [`EARLY_MAX`].
#[derive(Debug, Default)]
struct EarlyUpdates {
    held: HashMap<i64, Held>,
    /// `held` ordered by age, for pruning.
    by_age: BTreeSet<(Instant, i64)>,
    /// How to undo what the current batch kept, should it fail.
    undo: Vec<Undo>,
}

#[derive(Debug)]
struct Held {
    since: Instant,
    updates: Vec<Update>,
}

#[derive(Debug)]
enum Undo {
    /// The batch kept the first update for this id.
    Created(i64),
    /// The batch added to this id's updates, which had this many.
    Grew(i64, usize),
}

impl EarlyUpdates {
    /// Keeps `update` of delivery `id`, whose row is not there (yet).
    fn hold(&mut self, id: i64, update: Update, now: Instant) {
        match self.held.get_mut(&id) {
            Some(h) => {
                self.undo.push(Undo::Grew(id, h.updates.len()));
                h.updates.push(update);
            }
            None => {
                self.undo.push(Undo::Created(id));
                self.held.insert(
                    id,
                    Held {
                        since: now,
                        updates: vec![update],
                    },
                );
                self.by_age.insert((now, id));
            }
        }
    }

    /// Takes the updates kept for `id`, for its Enqueue. Not undone if the batch fails:
    /// that Enqueue is gone for good, and nothing else would claim them.
    fn take(&mut self, id: i64) -> Option<Vec<Update>> {
        let h = self.held.remove(&id)?;
        self.by_age.remove(&(h.since, id));
        Some(h.updates)
    }

    /// Drops what is kept for `id` (its Enqueue will not be written).
    fn forget(&mut self, id: i64) {
        self.take(id);
    }

    /// The batch committed: what it kept stays.
    fn commit(&mut self) {
        self.undo.clear();
    }

    /// The batch failed: what it kept goes, like every other op of it. Undone newest
    /// first, so an id kept, taken and kept again within the batch ends up absent.
    fn roll_back(&mut self) {
        while let Some(u) = self.undo.pop() {
            match u {
                Undo::Created(id) => {
                    self.take(id);
                }
                Undo::Grew(id, len) => {
                    if let Some(h) = self.held.get_mut(&id) {
                        h.updates.truncate(len);
                    }
                }
            }
        }
    }

    /// Drops what was kept before `now - EARLY_MAX_AGE`, then the oldest past
    /// [`EARLY_MAX`]. `now` is a parameter so that tests need not wait.
    fn prune(&mut self, now: Instant) {
        let mut aged = 0usize;
        let mut over = 0usize;
        while let Some(&(since, id)) = self.by_age.first() {
            let old = now.saturating_duration_since(since) > EARLY_MAX_AGE;
            if !old && self.held.len() <= EARLY_MAX {
                break;
            }
            if old {
                aged += 1;
            } else {
                over += 1;
            }
            self.take(id);
        }
        if aged + over > 0 {
            tracing::debug!(
                aged,
                over_cap = over,
                kept = self.held.len(),
                "store: dropped updates whose delivery never reached the store"
            );
        }
    }
}

/// Drops the ops of deliveries that were queued AND acknowledged within this batch: a
/// subscriber that keeps up acknowledges most messages before their row is even committed,
/// and such a row need never touch the disk. Their barriers still wait for this commit,
/// so an acknowledgement to the publisher still follows everything before it. Returns
/// the ops left and the ids of the deliveries dropped: none of their ops is applied, so
/// no update of theirs can reach [`EarlyUpdates`] from this batch.
fn coalesce(work: Vec<Op>) -> (Vec<Op>, HashSet<i64>) {
    let enqueued: HashSet<i64> = work
        .iter()
        .filter_map(|op| match op {
            Op::Enqueue { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    if enqueued.is_empty() {
        return (work, HashSet::new());
    }
    let done: HashSet<i64> = work
        .iter()
        .filter_map(|op| match op {
            Op::Delivered { id } if enqueued.contains(id) => Some(*id),
            _ => None,
        })
        .collect();
    if done.is_empty() {
        return (work, done);
    }
    let work = work
        .into_iter()
        .filter(|op| match op {
            Op::Enqueue { id, .. }
            | Op::Sent { id, .. }
            | Op::Released { id }
            | Op::Delivered { id } => !done.contains(id),
            _ => true,
        })
        .collect();
    (work, done)
}

fn subscribe(
    tx: &Transaction<'_>,
    key: &SessionKey,
    filter: &str,
    opts: &SubOptions,
    aliased: bool,
) -> Result<(), rusqlite::Error> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO subscriptions (device, client_id, filter, qos, no_local,
             retain_as_published, retain_handling, sub_id, aliased)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        key.device.as_str(),
        key.client_id,
        filter,
        opts.qos as u8,
        opts.no_local,
        opts.retain_as_published,
        retain_handling_code(&opts.retain_handling),
        opts.subscription_id,
        aliased
    ])?;
    Ok(())
}

/// Whether the store holds the persistent session `key`.
fn session_exists(tx: &Transaction<'_>, key: &SessionKey) -> Result<bool, rusqlite::Error> {
    tx.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM sessions WHERE device = ?1 AND client_id = ?2)",
    )?
    .query_row(params![key.device.as_str(), key.client_id], |r| r.get(0))
}

fn enqueue(
    tx: &Transaction<'_>,
    id: i64,
    key: &SessionKey,
    message_id: i64,
    qos: QoS,
    retain: bool,
    sub_ids: &[u32],
) -> Result<(), rusqlite::Error> {
    tx.prepare_cached(
        "INSERT INTO queue (id, device, client_id, message_id, qos, retain, sub_ids)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        id,
        key.device.as_str(),
        key.client_id,
        message_id,
        qos as u8,
        retain,
        sub_ids_text(sub_ids),
    ])?;
    Ok(())
}

fn retain(
    tx: &Transaction<'_>,
    topic: &str,
    message_id: i64,
    owner: Option<&DeviceName>,
) -> Result<(), rusqlite::Error> {
    // An upsert, not INSERT OR REPLACE: REPLACE's implicit delete would not fire the
    // trigger that drops the message it replaces.
    tx.prepare_cached(
        "INSERT INTO retained (topic, message_id, owner) VALUES (?1, ?2, ?3)
         ON CONFLICT (topic) DO UPDATE
         SET message_id = excluded.message_id, owner = excluded.owner",
    )?
    .execute(params![topic, message_id, owner.map(|o| o.as_str())])?;
    Ok(())
}

/// Applies `ops` in one transaction. `early` changes with it: what the batch kept there is
/// gone again if the batch fails. `started`: when the batch began (the writer's clock, for
/// [`EarlyUpdates::prune`]).
fn apply(
    conn: &mut Connection,
    ops: &[Op],
    ids: &mut MessageIds,
    early: &mut EarlyUpdates,
    started: Instant,
) -> Result<(), rusqlite::Error> {
    let applied = transaction(conn, ops, ids, early, started);
    match applied {
        Ok(()) => early.commit(),
        Err(_) => early.roll_back(),
    }
    applied
}

fn transaction(
    conn: &mut Connection,
    ops: &[Op],
    ids: &mut MessageIds,
    early: &mut EarlyUpdates,
    started: Instant,
) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for op in ops {
        apply_one(&tx, op, ids, early, started)?;
    }
    tx.commit()
}

/// Writes the message's row unless it is there already (another session's delivery or the
/// retained entry stored it); returns its id.
fn store_message(
    tx: &Transaction<'_>,
    msg: &Message,
    ids: &mut MessageIds,
    now: i64,
) -> Result<i64, rusqlite::Error> {
    let id = ids.of(msg);
    tx.prepare_cached(
        "INSERT OR IGNORE INTO messages (id, topic, payload, qos, retain, props, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        id,
        msg.topic.as_str(),
        &msg.payload[..],
        msg.qos as u8,
        msg.retain,
        props_json(msg),
        expires_at(msg, now)
    ])?;
    Ok(id)
}

fn apply_one(
    tx: &Transaction<'_>,
    op: &Op,
    ids: &mut MessageIds,
    early: &mut EarlyUpdates,
    started: Instant,
) -> Result<(), rusqlite::Error> {
    let now = crate::cert::now_secs();
    match op {
        Op::Session {
            key,
            expiry,
            expires_at,
        } => {
            tx.prepare_cached(
                "INSERT INTO sessions (device, client_id, expiry, expires_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (device, client_id) DO UPDATE SET expiry = excluded.expiry, expires_at = excluded.expires_at",
            )?
            .execute(params![key.device.as_str(), key.client_id, expiry, expires_at])?;
        }
        Op::DropSession { key } => {
            for table in ["sessions", "subscriptions", "queue", "inbound"] {
                tx.prepare_cached(&format!(
                    "DELETE FROM {table} WHERE device = ?1 AND client_id = ?2"
                ))?
                .execute(params![key.device.as_str(), key.client_id])?;
            }
        }
        Op::Subscribe {
            key,
            filter,
            opts,
            aliased,
        } => subscribe(tx, key, filter, opts, *aliased)?,
        Op::Unsubscribe { key, filter } => {
            tx.prepare_cached(
                "DELETE FROM subscriptions WHERE device = ?1 AND client_id = ?2 AND filter = ?3",
            )?
            .execute(params![key.device.as_str(), key.client_id, filter])?;
        }
        Op::Enqueue {
            id,
            key,
            msg,
            qos,
            retain,
            sub_ids,
        } => {
            let kept = early.take(*id).unwrap_or_default();
            // Acknowledged (or dropped) before its row came: neither is written, as in
            // `coalesce`. The message row is not written either; its id is assigned by
            // whichever op stores it.
            if kept.contains(&Update::Delivered) {
                return Ok(());
            }
            // The session ended (a clean start took it over, it expired) while the
            // publisher's group was still open: a row for it would never be read again.
            if !session_exists(tx, key)? {
                return Ok(());
            }
            let message_id = store_message(tx, msg, ids, now)?;
            enqueue(tx, *id, key, message_id, *qos, *retain, sub_ids)?;
            for update in kept {
                update.apply(tx, *id)?;
            }
        }
        Op::Sent { .. } | Op::Released { .. } | Op::Delivered { .. } => {
            if let Some((id, update)) = Update::of(op) {
                // No row: its Enqueue has not reached the writer yet (or the row is gone
                // for good); keep the update for it.
                if update.apply(tx, id)? == 0 {
                    early.hold(id, update, started);
                }
            }
        }
        Op::Retain {
            topic, msg: None, ..
        } => {
            tx.prepare_cached("DELETE FROM retained WHERE topic = ?1")?
                .execute(params![topic])?;
        }
        Op::Retain {
            topic,
            msg: Some(msg),
            owner,
        } => {
            let message_id = store_message(tx, msg, ids, now)?;
            retain(tx, topic, message_id, owner.as_ref())?;
        }
        Op::InboundBegin { key, pkid } => {
            tx.prepare_cached(
                "INSERT OR IGNORE INTO inbound (device, client_id, pkid) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![key.device.as_str(), key.client_id, pkid])?;
        }
        Op::InboundRelease { key, pkid } => {
            tx.prepare_cached(
                "DELETE FROM inbound WHERE device = ?1 AND client_id = ?2 AND pkid = ?3",
            )?
            .execute(params![key.device.as_str(), key.client_id, pkid])?;
        }
        Op::Probe => {
            // Rewriting the header field dirties page 1: the commit must write a frame.
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        Op::Barrier(_) | Op::Close(_) => {}
        // Flattened into the batch before this point; applied in order if one gets here.
        Op::Group(inner) => {
            for op in inner {
                apply_one(tx, op, ids, early, started)?;
            }
        }
    }
    Ok(())
}

fn retain_handling_code(r: &RetainHandling) -> u8 {
    use RetainHandling as R;
    match r {
        R::SendAlways => 0,
        R::SendIfNew => 1,
        R::Never => 2,
    }
}

/// The message's expiry as seconds since the epoch.
fn expires_at(msg: &Message, now: i64) -> Option<i64> {
    let left = msg
        .expires_at?
        .saturating_duration_since(std::time::Instant::now());
    Some(now.saturating_add(i64::try_from(left.as_secs()).unwrap_or(i64::MAX)))
}

fn sub_ids_text(ids: &[u32]) -> String {
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// MQTT 5 properties as JSON (None when there are none).
fn props_json(msg: &Message) -> Option<String> {
    if msg.props.is_empty() {
        return None;
    }
    let p = &msg.props;
    Some(
        serde_json::json!({
            "pfi": p.payload_format_indicator,
            "rt": p.response_topic,
            "cd": p.correlation_data.as_ref().map(|b| b.to_vec()),
            "up": p.user_properties,
            "ct": p.content_type,
        })
        .to_string(),
    )
}

/// Used by recovery to parse what [`props_json`] wrote.
pub(super) fn parse_props(text: &str) -> Result<Forwarded, StoreError> {
    #[derive(serde::Deserialize)]
    struct P {
        pfi: Option<u8>,
        rt: Option<String>,
        cd: Option<Vec<u8>>,
        up: Vec<(String, String)>,
        ct: Option<String>,
    }
    let p: P =
        serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("properties: {e}")))?;
    Ok(Forwarded {
        payload_format_indicator: p.pfi,
        response_topic: p.rt,
        correlation_data: p.cd.map(bytes::Bytes::from),
        user_properties: p.up,
        content_type: p.ct,
    })
}

/// For recovery: the session key of a row.
pub(super) fn key(device: String, client_id: String) -> Result<SessionKey, StoreError> {
    let device = crate::identity::DeviceName::parse(&device)
        .map_err(|e| StoreError::Corrupt(format!("device name {device:?}: {e}")))?;
    Ok(SessionKey { device, client_id })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::journal::Forwarded;
    use crate::mqtt::topic::TopicName;

    /// The session `enqueue_op` queues for.
    fn session_op() -> Op {
        Op::Session {
            key: SessionKey {
                device: DeviceName::parse("backend").unwrap(),
                client_id: "a".into(),
            },
            expiry: None,
            expires_at: None,
        }
    }

    fn enqueue_op(id: i64) -> Op {
        Op::Enqueue {
            id,
            key: SessionKey {
                device: DeviceName::parse("backend").unwrap(),
                client_id: "a".into(),
            },
            msg: Arc::new(Message {
                topic: TopicName::parse("t/1").unwrap(),
                payload: bytes::Bytes::from_static(b"x"),
                qos: QoS::ExactlyOnce,
                retain: false,
                props: Forwarded::default(),
                expires_at: None,
                store_id: Default::default(),
            }),
            qos: QoS::ExactlyOnce,
            retain: false,
            sub_ids: Vec::new(),
        }
    }

    fn kept(early: &EarlyUpdates) -> Vec<(i64, Vec<Update>)> {
        let mut v: Vec<_> = early
            .held
            .iter()
            .map(|(id, h)| (*id, h.updates.clone()))
            .collect();
        v.sort_by_key(|(id, _)| *id);
        assert_eq!(early.by_age.len(), early.held.len(), "age index in step");
        v
    }

    fn queue_ids(conn: &Connection) -> Vec<i64> {
        let mut stmt = conn.prepare("SELECT id FROM queue ORDER BY id").unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap();
        rows.map(|r| r.unwrap()).collect()
    }

    /// An update whose Enqueue never comes (its row was dropped with its session) is kept
    /// for a while, then dropped; past the cap, the oldest go first.
    #[test]
    fn an_update_whose_enqueue_never_comes_is_dropped_after_a_while() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = super::super::schema::open(&dir.path().join("m.db")).unwrap();
        let mut ids = MessageIds { next: 1 };
        let mut early = EarlyUpdates::default();
        let t0 = Instant::now();
        apply(
            &mut conn,
            &[Op::Sent { id: 9, pkid: 1 }, Op::Delivered { id: 9 }],
            &mut ids,
            &mut early,
            t0,
        )
        .unwrap();
        assert_eq!(
            kept(&early),
            [(9, vec![Update::Sent { pkid: 1 }, Update::Delivered])]
        );
        early.prune(t0 + EARLY_MAX_AGE);
        assert_eq!(kept(&early).len(), 1, "not yet");
        early.prune(t0 + EARLY_MAX_AGE + Duration::from_secs(1));
        assert_eq!(kept(&early), []);

        for id in 0..EARLY_MAX as i64 + 3 {
            early.hold(id, Update::Released, t0 + Duration::from_micros(id as u64));
        }
        early.commit();
        early.prune(t0);
        assert_eq!(early.held.len(), EARLY_MAX);
        assert_eq!(early.by_age.len(), EARLY_MAX);
        assert!(
            (0..3).all(|id| !early.held.contains_key(&id)),
            "the oldest go"
        );
        assert!(early.held.contains_key(&3));
    }

    /// A failed batch leaves nothing it kept behind, and what its Enqueues took is gone
    /// with them; what earlier batches kept stays.
    #[test]
    fn a_failed_batch_leaves_no_kept_updates_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = super::super::schema::open(&dir.path().join("m.db")).unwrap();
        let mut ids = MessageIds { next: 1 };
        let mut early = EarlyUpdates::default();
        let t0 = Instant::now();
        apply(
            &mut conn,
            &[
                session_op(),
                enqueue_op(1),
                Op::Sent { id: 10, pkid: 3 },
                Op::Sent { id: 12, pkid: 4 },
            ],
            &mut ids,
            &mut early,
            t0,
        )
        .unwrap();
        let before = kept(&early);
        assert_eq!(
            before,
            [
                (10, vec![Update::Sent { pkid: 3 }]),
                (12, vec![Update::Sent { pkid: 4 }])
            ]
        );
        // Grows 10's, creates 11's, takes 12's; the duplicate row id then fails the batch.
        let failed = apply(
            &mut conn,
            &[
                Op::Released { id: 10 },
                Op::Sent { id: 11, pkid: 5 },
                Op::Delivered { id: 11 },
                enqueue_op(12),
                enqueue_op(1),
            ],
            &mut ids,
            &mut early,
            t0,
        );
        assert!(failed.is_err());
        assert_eq!(kept(&early), [(10, vec![Update::Sent { pkid: 3 }])]);
        assert!(early.undo.is_empty());
        assert_eq!(queue_ids(&conn), [1]);

        // The next batch starts from there.
        apply(&mut conn, &[enqueue_op(10)], &mut ids, &mut early, t0).unwrap();
        assert_eq!(kept(&early), []);
        let pkid: Option<u16> = conn
            .query_row("SELECT pkid FROM queue WHERE id = 10", [], |r| r.get(0))
            .unwrap();
        assert_eq!(pkid, Some(3));
    }

    /// Updates kept for a delivery whose Enqueue and Delivered then share a batch: coalesce
    /// drops the pair, and what was kept goes with it; nothing of the pair is kept.
    #[test]
    fn a_coalesced_delivery_leaves_nothing_kept() {
        let mut early = EarlyUpdates::default();
        let t0 = Instant::now();
        early.hold(5, Update::Sent { pkid: 1 }, t0);
        early.commit();
        let work = prepare(
            vec![
                enqueue_op(5),
                Op::Delivered { id: 5 },
                Op::Delivered { id: 6 },
            ],
            &mut early,
        );
        assert!(matches!(work[..], [Op::Delivered { id: 6 }]), "{work:?}");
        assert_eq!(kept(&early), []);
    }

    /// A kept Delivered: the Enqueue writes nothing, not even the message.
    #[test]
    fn an_enqueue_after_its_delivered_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = super::super::schema::open(&dir.path().join("m.db")).unwrap();
        let mut ids = MessageIds { next: 1 };
        let mut early = EarlyUpdates::default();
        let t0 = Instant::now();
        let ops = [
            session_op(),
            Op::Sent { id: 7, pkid: 2 },
            Op::Delivered { id: 7 },
        ];
        apply(&mut conn, &ops, &mut ids, &mut early, t0).unwrap();
        apply(&mut conn, &[enqueue_op(7)], &mut ids, &mut early, t0).unwrap();
        assert_eq!(kept(&early), []);
        assert_eq!(queue_ids(&conn), Vec::<i64>::new());
        let messages: i64 = conn
            .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
            .unwrap();
        assert_eq!(messages, 0);
    }

    /// An Enqueue for a session the store does not hold (it ended while the publisher's
    /// group was open) writes neither the delivery nor the message.
    #[test]
    fn an_enqueue_for_a_session_that_ended_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = super::super::schema::open(&dir.path().join("m.db")).unwrap();
        let mut ids = MessageIds { next: 1 };
        let mut early = EarlyUpdates::default();
        let t0 = Instant::now();
        apply(&mut conn, &[enqueue_op(8)], &mut ids, &mut early, t0).unwrap();
        assert_eq!(queue_ids(&conn), Vec::<i64>::new());
        let messages: i64 = conn
            .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
            .unwrap();
        assert_eq!(messages, 0);
        // With the session: written.
        apply(
            &mut conn,
            &[session_op(), enqueue_op(9)],
            &mut ids,
            &mut early,
            t0,
        )
        .unwrap();
        assert_eq!(queue_ids(&conn), [9]);
    }
}
