//! Which nodes are alive (docs/cluster.md, "Wills of a node that dies"). Each node puts
//! its entry in the `<prefix>_nodes` bucket (node name -> its run and the time) every
//! [`HEARTBEAT`]; every node reads the bucket every [`POLL`] and notes, on its own
//! monotonic clock, when each entry last changed. A run of a node is dead when the node's
//! entry names another run (the node was restarted) or has not changed for
//! [`DEAD_AFTER`]. The clocks of different machines are never compared: only whether an
//! entry's revision moved.
//!
//! A node's claims on sessions are good while its run is alive; once it is dead, the
//! other nodes take over its wills (`wills`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use futures_util::StreamExt;

use super::{Cluster, ClusterError};

/// How often a node refreshes its entry.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A run whose entry did not change for this long is dead: five heartbeats, so that a
/// node busy or briefly cut off from NATS is not taken for dead.
pub const DEAD_AFTER: Duration = Duration::from_secs(10);
/// How often a node reads the other nodes' entries.
pub const POLL: Duration = Duration::from_secs(1);
/// How long one read of the bucket may take.
const READ_LIMIT: Duration = Duration::from_secs(5);
/// How often the bucket is listed for nodes not seen yet (known ones are read directly at
/// every [`POLL`]; a listing costs JetStream a consumer).
const DISCOVER: Duration = Duration::from_secs(10);

/// An entry of the bucket.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Beat {
    run: String,
    /// Unix milliseconds of the writer's clock, for operators reading the bucket; nodes
    /// go by revisions, not by this.
    at: i64,
    /// The run stopped (a graceful shutdown): dead now, without waiting for [`DEAD_AFTER`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    stopped: bool,
}

/// What this node saw of another node's entry.
#[derive(Debug)]
struct Seen {
    /// The run the entry names; None while the entry is missing.
    run: Option<String>,
    revision: u64,
    /// When the entry was first seen with this revision (this node's clock).
    changed: Instant,
}

/// What [`Liveness::verdict`] says of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Alive,
    /// Dead; `since`: when its entry last changed, if this node saw it (the moment it
    /// died, give or take a heartbeat).
    Dead {
        since: Option<Instant>,
    },
}

/// This node's heartbeat and its view of the others.
#[derive(Debug)]
pub struct Liveness {
    store: kv::Store,
    node: String,
    run: String,
    seen: Mutex<HashMap<String, Seen>>,
    /// Runs replaced by a newer run of their node, or stopped: their node, and when
    /// their entry last changed.
    replaced: Mutex<HashMap<String, (String, Instant)>>,
    /// Set by [`Liveness::stop`]: no more heartbeats.
    stopped: std::sync::atomic::AtomicBool,
    /// When the bucket was last listed.
    listed: Mutex<Option<Instant>>,
    /// Told when a heartbeat is written after a gap long enough for the other nodes to
    /// have taken this run for dead.
    gap: tokio::sync::Notify,
}

impl Liveness {
    /// Opens (creating) the bucket, writes this run's first entry (so that it is known
    /// alive before it records anything the others could take over), and keeps it fresh.
    pub async fn start(cluster: &Cluster) -> Result<Arc<Liveness>, ClusterError> {
        let store = super::bucket(
            cluster,
            "nodes",
            1,
            "certmq node heartbeats (docs/cluster.md)",
        )
        .await?;
        let live = Arc::new(Liveness {
            store,
            node: cluster.node().to_owned(),
            run: cluster.run.clone(),
            seen: Mutex::new(HashMap::new()),
            replaced: Mutex::new(HashMap::new()),
            stopped: std::sync::atomic::AtomicBool::new(false),
            listed: Mutex::new(None),
            gap: tokio::sync::Notify::new(),
        });
        live.beat(false)
            .await
            .map_err(|e| ClusterError::jetstream("writing this node's heartbeat", e))?;
        tokio::spawn(live.clone().keep_beating());
        Ok(live)
    }

    async fn beat(&self, stopped: bool) -> Result<u64, String> {
        let value = serde_json::to_vec(&Beat {
            run: self.run.clone(),
            at: crate::cert::now_secs().saturating_mul(1000),
            stopped,
        })
        .unwrap_or_default();
        match tokio::time::timeout(READ_LIMIT, self.store.put(&self.node, value.into())).await {
            Ok(Ok(revision)) => Ok(revision),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {READ_LIMIT:?}")),
        }
    }

    async fn keep_beating(self: Arc<Self>) {
        let mut failing = false;
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            if self.stopped.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            let result = self.beat(false).await;
            if result.is_ok() {
                // Another node may have seen no change for DEAD_AFTER meanwhile.
                if last.elapsed() + HEARTBEAT >= DEAD_AFTER {
                    tracing::warn!(node = %self.node, gap_s = last.elapsed().as_secs(), "no heartbeat for long enough to be taken for dead: checking this node's wills");
                    self.gap.notify_one();
                }
                last = Instant::now();
            }
            match result {
                Ok(_) if failing => {
                    failing = false;
                    tracing::info!(node = %self.node, "heartbeat written again");
                }
                Ok(_) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(node = %self.node, error = %e, dead_after_s = DEAD_AFTER.as_secs(), "heartbeat not written: other nodes take this one for dead if this lasts");
                }
                Err(_) => {}
            }
        }
    }

    /// A graceful stop: no more heartbeats, and a last entry saying this run stopped, so
    /// that the other nodes take over its records at once.
    pub async fn stop(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = self.beat(true).await {
            tracing::warn!(error = %e, dead_after_s = DEAD_AFTER.as_secs(), "this node's stop not written: the other nodes notice it when its heartbeat is stale");
        }
    }

    /// Completes after a heartbeat written following a gap long enough for the other
    /// nodes to have taken this run for dead (and possibly its wills over).
    pub async fn gap_ended(&self) {
        self.gap.notified().await;
    }

    fn seen(&self) -> MutexGuard<'_, HashMap<String, Seen>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn replaced(&self) -> MutexGuard<'_, HashMap<String, (String, Instant)>> {
        self.replaced.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads every known node's entry (a direct read each) and notes what changed; lists
    /// the bucket for nodes not known yet every `DISCOVER`. Err (nothing noted) when the
    /// bucket cannot be read: a node cut off from NATS sees no change, and takes nobody for
    /// dead on that account until it reads again.
    pub async fn poll(&self) -> Result<(), ClusterError> {
        let mut names: Vec<String> = self.seen().keys().cloned().collect();
        let list = self
            .listed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none_or(|at| at.elapsed() >= DISCOVER);
        let read = async {
            if list {
                let mut keys = self.store.keys().await.map_err(|e| e.to_string())?;
                while let Some(key) = keys.next().await {
                    let key = key.map_err(|e| e.to_string())?;
                    if !names.contains(&key) {
                        names.push(key);
                    }
                }
            }
            let mut entries = Vec::new();
            for name in names {
                if let Some(e) = self.store.entry(name).await.map_err(|e| e.to_string())? {
                    entries.push(e);
                }
            }
            Ok::<_, String>(entries)
        };
        let entries = match tokio::time::timeout(READ_LIMIT, read).await {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => return Err(ClusterError::jetstream("reading the node heartbeats", e)),
            Err(_) => {
                return Err(ClusterError::jetstream(
                    "reading the node heartbeats",
                    format!("no answer within {READ_LIMIT:?}"),
                ))
            }
        };
        if list {
            *self.listed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        let now = Instant::now();
        let mut seen = self.seen();
        for entry in entries {
            let beat = match entry.operation {
                kv::Operation::Put => serde_json::from_slice::<Beat>(&entry.value).ok(),
                kv::Operation::Delete | kv::Operation::Purge => None,
            };
            let run = match beat {
                Some(b) if b.stopped => {
                    self.replaced()
                        .entry(b.run)
                        .or_insert_with(|| (entry.key.clone(), now));
                    None
                }
                Some(b) => Some(b.run),
                None => None,
            };
            let fresh = Seen {
                run,
                revision: entry.revision,
                changed: now,
            };
            match seen.get_mut(&entry.key) {
                None => {
                    seen.insert(entry.key, fresh);
                }
                Some(s) if s.run != fresh.run => {
                    if let Some(old) = s.run.take() {
                        tracing::info!(node = %entry.key, run = %old, "a node's run ended (stopped, or replaced by a new one)");
                        self.replaced().insert(old, (entry.key.clone(), s.changed));
                    }
                    *s = fresh;
                }
                Some(s) if s.revision != entry.revision => {
                    s.revision = entry.revision;
                    s.changed = now;
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Whether the run `run` of `node` is alive, as far as this node can tell. A node it
    /// has not seen yet is alive until it has been missing for [`DEAD_AFTER`].
    pub fn verdict(&self, node: &str, run: &str) -> Verdict {
        if run == self.run {
            return Verdict::Alive;
        }
        if let Some((_, at)) = self.replaced().get(run) {
            return Verdict::Dead { since: Some(*at) };
        }
        let mut seen = self.seen();
        let s = seen.entry(node.to_owned()).or_insert_with(|| Seen {
            run: None,
            revision: 0,
            changed: Instant::now(),
        });
        let stale = s.changed.elapsed() > DEAD_AFTER;
        match s.run.as_deref() {
            Some(current) if current == run && stale => Verdict::Dead {
                since: Some(s.changed),
            },
            Some(current) if current == run => Verdict::Alive,
            // The node runs another run now: this one ended before this node saw it.
            Some(_) => Verdict::Dead { since: None },
            None if stale => Verdict::Dead { since: None },
            None => Verdict::Alive,
        }
    }

    /// Whether `run` is the current, fresh run of a node this node has seen (cheap: no
    /// record needs reading to skip its wills).
    pub fn alive_run(&self, run: &str) -> bool {
        run == self.run
            || self
                .seen()
                .values()
                .any(|s| s.run.as_deref() == Some(run) && s.changed.elapsed() <= DEAD_AFTER)
    }

    /// The runs known dead now, as (node, run): stale entries and replaced runs.
    pub fn dead_runs(&self) -> Vec<(String, String)> {
        let mut dead: Vec<(String, String)> = self
            .seen()
            .iter()
            .filter(|(_, s)| s.changed.elapsed() > DEAD_AFTER)
            .filter_map(|(node, s)| Some((node.clone(), s.run.clone()?)))
            .filter(|(_, run)| *run != self.run)
            .collect();
        dead.extend(
            self.replaced()
                .iter()
                .map(|(run, (node, _))| (node.clone(), run.clone())),
        );
        dead
    }
}
