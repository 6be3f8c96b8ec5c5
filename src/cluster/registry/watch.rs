//! The KV watch that keeps a node's mirror of the registry bucket: a full snapshot (the
//! last value of every key) at start, then every change as JetStream delivers it, pushed
//! to the server's re-check as [`Changes`].
//!
//! The watch is an ordered JetStream consumer: when the NATS connection drops, the client
//! recreates it after the reconnect from the last revision it delivered, so what changed
//! during the outage arrives then, in order (delete markers included: the bucket keeps the
//! last message of every key). Should the watch itself fail or end, a new snapshot replaces
//! the mirror and the difference is pushed as changes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{Entry, Operation, Store, Watch};
use futures_util::StreamExt;

use super::mirror::{name_of, Held, Record, Slot};
use super::Inner;
use crate::registry::Changes;

/// How long the snapshot may wait for the next value before giving up.
const SNAPSHOT_IDLE: Duration = Duration::from_secs(10);
/// The pause before a new snapshot after the watch failed, doubled up to the maximum.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// A full read of the bucket and the watch that continues after it.
pub struct Snapshot {
    pub rows: HashMap<String, Held>,
    /// The highest revision the snapshot holds.
    pub through: u64,
    pub watch: Watch,
}

/// The state of one KV entry, by device name; None for a key certmq did not write.
pub fn held_of(entry: &Entry) -> Option<(String, Held)> {
    let Some(name) = name_of(&entry.key) else {
        tracing::warn!(key = ?entry.key, bucket = %entry.bucket, "ignoring a key that is not a certmq device");
        return None;
    };
    let slot = match entry.operation {
        Operation::Put => Record::decode(&name, &entry.value),
        Operation::Delete | Operation::Purge => Slot::Gone,
    };
    if let Slot::Bad(why) = &slot {
        tracing::warn!(device = ?name, bucket = %entry.bucket, revision = entry.revision, reason = %why, "unreadable registry record: the device is refused until it is rewritten");
    }
    Some((
        name,
        Held {
            revision: entry.revision,
            slot,
        },
    ))
}

/// Reads the last value of every key, and leaves the watch open after them.
pub async fn snapshot(kv: &Store) -> Result<Snapshot, String> {
    // An empty bucket delivers nothing at all: ask first whether there is anything.
    let status = tokio::time::timeout(SNAPSHOT_IDLE, kv.status())
        .await
        .map_err(|_| "bucket status timed out".to_owned())?
        .map_err(|e| format!("bucket status: {e}"))?;
    let mut watch = tokio::time::timeout(SNAPSHOT_IDLE, kv.watch_with_history(">"))
        .await
        .map_err(|_| "watch creation timed out".to_owned())?
        .map_err(|e| format!("watch: {e}"))?;
    let mut rows = HashMap::new();
    let mut through = 0;
    if status.values() > 0 {
        loop {
            let entry = match tokio::time::timeout(SNAPSHOT_IDLE, watch.next()).await {
                Err(_) => return Err(format!("no registry value within {SNAPSHOT_IDLE:?}")),
                Ok(None) => return Err("the watch ended during the snapshot".to_owned()),
                Ok(Some(Err(e))) => return Err(format!("watch: {e}")),
                Ok(Some(Ok(entry))) => entry,
            };
            through = through.max(entry.revision);
            if let Some((name, held)) = held_of(&entry) {
                rows.insert(name, held);
            }
            if entry.delta == 0 {
                break;
            }
        }
    }
    Ok(Snapshot {
        rows,
        through,
        watch,
    })
}

/// Follows `watch` for as long as the node runs; resyncs from a new snapshot whenever the
/// watch fails.
pub async fn follow(kv: Store, inner: Arc<Inner>, mut watch: Watch) {
    let mut retry = RETRY_FIRST;
    loop {
        let why = apply_until_error(&inner, &mut watch).await;
        tracing::warn!(bucket = %kv.name, reason = %why, "registry watch lost; resyncing");
        loop {
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(RETRY_MAX);
            match snapshot(&kv).await {
                Ok(s) => {
                    let mut changes = Changes::default();
                    inner.mirror().replace_all(s.rows, s.through, &mut changes);
                    tracing::info!(
                        bucket = %kv.name,
                        changed = changes.devices.len(),
                        replaced = changes.replaced.len(),
                        "registry mirror resynced"
                    );
                    inner.feed.push(changes);
                    watch = s.watch;
                    retry = RETRY_FIRST;
                    break;
                }
                Err(e) => {
                    tracing::warn!(bucket = %kv.name, error = %e, "registry resync failed; retrying")
                }
            }
        }
    }
}

/// Applies every entry the watch delivers; returns why it stopped.
async fn apply_until_error(inner: &Inner, watch: &mut Watch) -> String {
    loop {
        match watch.next().await {
            None => return "the watch ended".to_owned(),
            Some(Err(e)) => return e.to_string(),
            Some(Ok(entry)) => {
                let Some((name, held)) = held_of(&entry) else {
                    continue;
                };
                let mut changes = Changes::default();
                inner.mirror().apply(&name, held, &mut changes);
                inner.feed.push(changes);
            }
        }
    }
}
