//! The survivors' side: every node looks for the records of dead runs, and each record
//! goes to exactly one node, which publishes its will once due (see the module above).
//!
//! When it looks: at start (runs replaced before this node started, its own earlier run
//! among them), whenever a run it had not seen dead is dead, and every [`RESCAN`] in case a
//! takeover failed midway (NATS away).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use tokio::sync::Semaphore;

use super::{device_of, now_ms, Record};
use crate::broker::remote::WillGates;
use crate::broker::Broker;
use crate::cluster::claims::Claims;
use crate::cluster::nodes::{Liveness, Verdict, POLL};
use crate::cluster::{erase, Cluster, ClusterError};

/// How often the whole bucket is looked through, besides when a run dies.
const RESCAN: Duration = Duration::from_secs(60);
/// Takeovers in their network steps at once.
const TAKING: usize = 32;
/// How long one read or write of a takeover may take.
const STEP_LIMIT: Duration = Duration::from_secs(5);
/// How long listing the bucket may take.
const LIST_LIMIT: Duration = Duration::from_secs(60);
/// Tries at removing a held record when its will is due, a second apart.
const DUE_TRIES: u32 = 30;

/// What taking over needs.
pub(in crate::cluster) struct Heir {
    pub cluster: Cluster,
    pub store: kv::Store,
    pub claims: Arc<Claims>,
    pub liveness: Arc<Liveness>,
    pub broker: Arc<Broker>,
    pub gates: WillGates,
}

/// Follows the other nodes for as long as this one runs.
pub(super) async fn run(heir: Arc<Heir>) {
    let permits = Arc::new(Semaphore::new(TAKING));
    let working: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut scanned: HashSet<String> = HashSet::new();
    let mut last_scan: Option<Instant> = None;
    loop {
        if heir.liveness.poll().await.is_ok() {
            let dead = heir.liveness.dead_runs();
            let news: Vec<&(String, String)> = dead
                .iter()
                .filter(|(_, run)| !scanned.contains(run))
                .collect();
            for (node, run) in &news {
                tracing::info!(node = %node, run = %run, "a node is dead: its wills go to the nodes alive");
            }
            if !news.is_empty() || last_scan.is_none_or(|t| t.elapsed() >= RESCAN) {
                match heir.scan(&permits, &working).await {
                    Ok(found) => {
                        if !news.is_empty() || found > 0 {
                            tracing::info!(wills = found, "looked for the wills of dead nodes");
                        }
                        scanned.extend(dead.into_iter().map(|(_, run)| run));
                        last_scan = Some(Instant::now());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot look for the wills of dead nodes; trying again")
                    }
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What [`Heir::take`] found at a key.
enum Found {
    /// A record of a dead run, at this revision; `since`: when that run was last seen.
    Dead {
        revision: u64,
        record: Box<Record>,
        since: Option<Instant>,
    },
    /// Nothing to take (alive, gone, or not readable).
    Nothing,
}

impl Heir {
    /// Lists the bucket and starts a takeover for every record not held by a live run.
    /// Returns how many it started.
    async fn scan(
        self: &Arc<Self>,
        permits: &Arc<Semaphore>,
        working: &Arc<Mutex<HashSet<String>>>,
    ) -> Result<usize, ClusterError> {
        let keys = self.list().await?;
        // After listing: a run writes its heartbeat before any record, so every run that
        // holds a listed record is in this read, and a run not seen is an older one.
        self.liveness.poll().await?;
        let mut started = 0;
        for key in keys {
            let Some((_, run)) = Record::split_key(&key) else {
                continue;
            };
            if self.liveness.alive_run(run) {
                continue;
            }
            if !working
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.clone())
            {
                continue;
            }
            started += 1;
            let (heir, permits, working) = (self.clone(), permits.clone(), working.clone());
            tokio::spawn(async move {
                heir.take(&key, &permits).await;
                working
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&key);
            });
        }
        Ok(started)
    }

    async fn list(&self) -> Result<Vec<String>, ClusterError> {
        let read = async {
            let mut keys = self.store.keys().await.map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            while let Some(key) = keys.next().await {
                out.push(key.map_err(|e| e.to_string())?);
            }
            Ok::<_, String>(out)
        };
        match tokio::time::timeout(LIST_LIMIT, read).await {
            Ok(Ok(keys)) => Ok(keys),
            Ok(Err(e)) => Err(ClusterError::jetstream("listing the wills bucket", e)),
            Err(_) => Err(ClusterError::jetstream(
                "listing the wills bucket",
                format!("no answer within {LIST_LIMIT:?}"),
            )),
        }
    }

    /// Reads the record at `key` and whether its run is dead.
    async fn find(&self, key: &str) -> Found {
        let entry = match tokio::time::timeout(STEP_LIMIT, self.store.entry(key)).await {
            Ok(Ok(Some(e))) if e.operation == kv::Operation::Put => e,
            Ok(Ok(_)) => return Found::Nothing,
            Ok(Err(e)) => {
                tracing::warn!(key, error = %e, "cannot read a will record");
                return Found::Nothing;
            }
            Err(_) => return Found::Nothing,
        };
        let record = match Record::decode(&entry.value) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(key, error = %e, "unreadable will record left as it is");
                return Found::Nothing;
            }
        };
        match self.liveness.verdict(&record.node, &record.run) {
            Verdict::Alive => Found::Nothing,
            Verdict::Dead { since } => Found::Dead {
                revision: entry.revision,
                record: Box::new(record),
                since,
            },
        }
    }

    /// Takes the record at `key` if its run is dead and no other node took it first, then
    /// publishes its will when due.
    async fn take(&self, key: &str, permits: &Semaphore) {
        let Some((claim, _)) = Record::split_key(key) else {
            return;
        };
        let Ok(permit) = permits.acquire().await else {
            return;
        };
        let Found::Dead {
            revision,
            record,
            since,
        } = self.find(key).await
        else {
            return;
        };
        // The compare-and-set: of the nodes racing for this revision, one removes it.
        match self.erase(revision).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(key, error = %e, "cannot take over a will; trying again later");
                return;
            }
        }
        tracing::info!(
            device = ?record.device,
            client_id = ?record.client_id,
            node = %record.origin.node,
            "took over the will of a session on a node that died"
        );
        let wait = remaining(&record, since);
        if wait.is_zero() {
            drop(permit);
            return self.publish(claim, *record).await;
        }
        let held = self.hold(claim, &record, wait).await;
        drop(permit);
        tokio::time::sleep(wait).await;
        if let Some(revision) = held {
            if !self.release(revision).await {
                return;
            }
        }
        self.publish(claim, *record).await
    }

    async fn erase(&self, revision: u64) -> Result<bool, ClusterError> {
        match tokio::time::timeout(
            STEP_LIMIT,
            erase(&self.cluster, &self.store.stream_name, revision),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(ClusterError::jetstream(
                "taking over a will",
                format!("no answer within {STEP_LIMIT:?}"),
            )),
        }
    }

    /// Keeps a taken record under this run while its delay runs, so that if this node
    /// dies too another one takes it on; returns its revision (None: not written, kept
    /// in memory only).
    async fn hold(&self, claim: &str, record: &Record, wait: Duration) -> Option<u64> {
        let mut held = record.clone();
        held.node = self.cluster.node().to_owned();
        held.run = self.cluster.run.clone();
        held.ticket = 0;
        let wait_ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
        let due = now_ms().saturating_add(wait_ms);
        held.ended = Some(due.saturating_sub(i64::from(held.delay) * 1000));
        let key = Record::held_key(claim, &self.cluster.run);
        match tokio::time::timeout(STEP_LIMIT, self.store.put(&key, held.encode())).await {
            Ok(Ok(revision)) => Some(revision),
            Ok(Err(e)) => {
                tracing::warn!(key, error = %e, "a taken will is kept in memory only");
                None
            }
            Err(_) => None,
        }
    }

    /// Removes the held record when its will is due: false when it is no longer there
    /// (another node took it, having taken this one for dead).
    async fn release(&self, revision: u64) -> bool {
        for _ in 0..DUE_TRIES {
            match self.erase(revision).await {
                Ok(removed) => return removed,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot remove a due will's record; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        false
    }

    /// Publishes a taken will unless a connection claimed its session since, or its
    /// device may no longer publish it (this node's registry and config decide).
    async fn publish(&self, claim: &str, record: Record) {
        match tokio::time::timeout(STEP_LIMIT, self.claims.current(claim)).await {
            Ok(Ok(Some((revision, run)))) => {
                let newer = match record.claim {
                    Some(claimed) => revision != claimed,
                    None => run != record.origin.run,
                };
                if newer {
                    tracing::info!(device = ?record.device, client_id = ?record.client_id, "will cancelled: the session has a new connection");
                    return;
                }
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::warn!(device = ?record.device, error = %e, "the session's claim cannot be read; the will is published")
            }
            Err(_) => {
                tracing::warn!(device = ?record.device, "the session's claim cannot be read in time; the will is published")
            }
        }
        let parts = device_of(&record).and_then(|device| {
            let message = record.message.message()?;
            let presenter = record
                .presenter
                .as_ref()
                .map(|p| p.presenter())
                .transpose()?;
            Ok((device, message, presenter))
        });
        let (device, message, presenter) = match parts {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(device = ?record.device, error = %e, "will dropped: its record is damaged");
                return;
            }
        };
        let gate = (self.gates)(&device, presenter.as_ref());
        let verdict = tokio::task::spawn_blocking(move || gate(&message).map(|()| message))
            .await
            .unwrap_or_else(|e| Err(format!("the will check failed: {e}")));
        match verdict {
            Ok(message) => {
                self.broker
                    .publish_orphan_will(&device, std::sync::Arc::new(message));
                tracing::info!(
                    device = ?record.device,
                    client_id = ?record.client_id,
                    node = %record.origin.node,
                    "published the will of a session on a node that died"
                );
            }
            Err(reason) => {
                tracing::warn!(device = ?record.device, reason = ?reason, "will dropped");
                self.broker.metrics.dropped("revoked", 1);
            }
        }
    }
}

/// What remains of a taken will's delay: counted from when its connection ended, or, for
/// a connection its node held until it died, from when that node was last seen.
fn remaining(record: &Record, since: Option<Instant>) -> Duration {
    let delay = Duration::from_secs(u64::from(record.delay));
    match record.ended {
        Some(ended) => {
            let due = ended.saturating_add(i64::from(record.delay) * 1000);
            let left = u64::try_from(due.saturating_sub(now_ms())).unwrap_or(0);
            // Another machine's clock: never more than the whole delay.
            Duration::from_millis(left).min(delay)
        }
        None => delay.saturating_sub(since.map(|s| s.elapsed()).unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_counts_from_the_connections_end_or_the_nodes_last_sign() {
        let mut r = super::super::tests::record();
        r.delay = 30;
        r.ended = Some(now_ms() - 10_000);
        let left = remaining(&r, None);
        assert!(
            left <= Duration::from_secs(20) && left >= Duration::from_secs(19),
            "{left:?}"
        );
        r.ended = Some(now_ms() + 3_600_000);
        assert_eq!(remaining(&r, None), Duration::from_secs(30), "capped");
        r.ended = Some(now_ms() - 60_000);
        assert_eq!(remaining(&r, None), Duration::ZERO);
        r.ended = None;
        let since = Instant::now() - Duration::from_secs(12);
        let left = remaining(&r, Some(since));
        assert!(
            left <= Duration::from_secs(18) && left >= Duration::from_secs(17),
            "{left:?}"
        );
        assert_eq!(remaining(&r, None), Duration::from_secs(30));
    }
}
