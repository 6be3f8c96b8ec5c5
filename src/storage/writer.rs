//! The store's writer thread: the only owner of the SQLite connection after recovery.
//! One transaction per batch of ops, one fsync per commit (group commit).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

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
const GATHER: std::time::Duration = std::time::Duration::from_millis(1);

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
        let work = updates_after_their_enqueue(work);
        let gathered = work.len();
        let work = coalesce(work);
        if !work.is_empty() {
            let started = std::time::Instant::now();
            last = apply(&mut conn, &work, &mut ids).map_err(|e| e.to_string());
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

/// A delivery's group (its Enqueue) is submitted when the publisher's routing ends, so the
/// subscriber's connection can send it and submit `Sent` (even `Released`/`Delivered`)
/// a moment before. Within a batch, such updates are moved right after their Enqueue, so
/// they apply to the row instead of to nothing.
fn updates_after_their_enqueue(work: Vec<Op>) -> Vec<Op> {
    use std::collections::{HashMap, HashSet};
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

/// Drops the ops of deliveries that were queued AND acknowledged within this batch: a
/// subscriber that keeps up acknowledges most messages before their row is even committed,
/// and such a row need never touch the disk. Their barriers still wait for this commit,
/// so an acknowledgement to the publisher still follows everything before it.
fn coalesce(work: Vec<Op>) -> Vec<Op> {
    use std::collections::HashSet;
    let enqueued: HashSet<i64> = work
        .iter()
        .filter_map(|op| match op {
            Op::Enqueue { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    if enqueued.is_empty() {
        return work;
    }
    let done: HashSet<i64> = work
        .iter()
        .filter_map(|op| match op {
            Op::Delivered { id } if enqueued.contains(id) => Some(*id),
            _ => None,
        })
        .collect();
    if done.is_empty() {
        return work;
    }
    work.into_iter()
        .filter(|op| match op {
            Op::Enqueue { id, .. }
            | Op::Sent { id, .. }
            | Op::Released { id }
            | Op::Delivered { id } => !done.contains(id),
            _ => true,
        })
        .collect()
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

fn apply(conn: &mut Connection, ops: &[Op], ids: &mut MessageIds) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for op in ops {
        apply_one(&tx, op, ids)?;
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

fn apply_one(tx: &Transaction<'_>, op: &Op, ids: &mut MessageIds) -> Result<(), rusqlite::Error> {
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
            let message_id = store_message(tx, msg, ids, now)?;
            enqueue(tx, *id, key, message_id, *qos, *retain, sub_ids)?;
        }
        Op::Sent { id, pkid } => {
            tx.prepare_cached("UPDATE queue SET pkid = ?2 WHERE id = ?1")?
                .execute(params![id, pkid])?;
        }
        Op::Released { id } => {
            tx.prepare_cached("UPDATE queue SET released = 1 WHERE id = ?1")?
                .execute(params![id])?;
        }
        Op::Delivered { id } => {
            tx.prepare_cached("DELETE FROM queue WHERE id = ?1")?
                .execute(params![id])?;
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
                apply_one(tx, op, ids)?;
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
