//! One session, one node (docs/cluster.md, "Sessions"): a node that opens a session
//! claims it in the `<prefix>_claims` key-value bucket; every node watches the bucket, and
//! a node holding a session whose claim moved to another node closes its connection
//! there (MQTT 5: DISCONNECT 0x8E "session taken over"), as a second connection on one
//! node takes the session over. The newest claim wins: the bucket orders all claims, and
//! a node only yields to a claim newer than its own.
//!
//! Keys are the SHA-256 of the session key (device, client id) in hex: KV keys allow only
//! a few ASCII characters, and client ids may be any UTF-8.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::StreamExt;

use super::{Cluster, ClusterError};
use crate::broker::session::SessionKey;
use crate::broker::Broker;

/// How long a claim write may take before the CONNECT is refused.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(2);

/// This node's claims and the watch that enforces other nodes' claims.
#[derive(Debug)]
pub struct Claims {
    store: kv::Store,
    node: String,
    run: String,
    /// Sessions this node claimed: claim key -> (session key, revision of our claim).
    held: Mutex<HashMap<String, (SessionKey, u64)>>,
    /// Sessions this node held until a connection on another node claimed them (their
    /// delayed wills are cancelled here); a new claim here takes the key out again.
    lost: Mutex<HashSet<String>>,
    /// Asked which claimed sessions still exist when `held` is pruned.
    broker: Arc<Broker>,
    /// Persistent sessions: released to the node that claimed them.
    sessions: Arc<super::sessions::SessionStore>,
}

/// A claim's value.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Claim {
    node: String,
    run: String,
}

/// The bucket key of a session.
pub fn claim_key(key: &SessionKey) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(key.device.as_str().as_bytes());
    ctx.update(&[0]);
    ctx.update(key.client_id.as_bytes());
    super::hex(ctx.finish().as_ref())
}

impl Claims {
    /// Opens (creating) the bucket and starts watching it; `run` tells this process's
    /// claims from those of an earlier run of the same node.
    pub async fn start(
        cluster: &Cluster,
        broker: Arc<Broker>,
        sessions: Arc<super::sessions::SessionStore>,
    ) -> Result<Arc<Claims>, ClusterError> {
        let store = super::bucket(
            cluster,
            "claims",
            1,
            "certmq session claims (docs/cluster.md)",
        )
        .await?;
        let claims = Arc::new(Claims {
            store,
            node: cluster.node().to_owned(),
            run: cluster.run.clone(),
            held: Mutex::new(HashMap::new()),
            lost: Mutex::new(HashSet::new()),
            broker,
            sessions,
        });
        let watcher = claims.clone();
        let watch = claims
            .store
            .watch_all()
            .await
            .map_err(|e| ClusterError::jetstream("watching the claims bucket", e))?;
        tokio::spawn(async move { watcher.enforce(watch).await });
        Ok(claims)
    }

    /// Claims a session for this node; another node holding it closes it. Err when the
    /// claim could not be written (NATS unreachable or slow).
    pub async fn claim(&self, key: &SessionKey) -> Result<(), ClusterError> {
        let name = claim_key(key);
        let value = serde_json::to_vec(&Claim {
            node: self.node.clone(),
            run: self.run.clone(),
        })
        .unwrap_or_default();
        let put = self.store.put(&name, value.into());
        let revision = match tokio::time::timeout(CLAIM_TIMEOUT, put).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(ClusterError::jetstream("claiming a session", e)),
            Err(_) => {
                return Err(ClusterError::jetstream(
                    "claiming a session",
                    format!("no answer within {CLAIM_TIMEOUT:?}"),
                ))
            }
        };
        // Under the lock of `held`, as the watch takes a claim away (`yield_to`): a newer
        // claim seen meanwhile either finds this one (and is newer than it) or is older.
        let mut held = self.lock();
        self.lost_keys().remove(&name);
        held.insert(name.clone(), (key.clone(), revision));
        // Sessions that ended here need no enforcing any more: forget them once the map
        // is well above the sessions this node holds, so it does not grow with every
        // client id ever seen. Not the one just claimed: its session opens after the claim.
        if held.len() > 2 * self.broker.session_count() + 1024 {
            held.retain(|n, (k, _)| *n == name || self.broker.has_session(k));
        }
        Ok(())
    }

    /// Whether a connection on another node claimed the session with this claim key since
    /// this node claimed it (the watch, or the session writer, saw the newer claim).
    pub fn lost_claim(&self, claim: &str) -> bool {
        self.lost_keys().contains(claim)
    }

    /// Does now what the watch does on seeing it when the session `key`, claimed here,
    /// was claimed on another node before it was opened here: the watch found nothing to
    /// close then. False when this node still holds the claim as far as it knows.
    pub fn enforce_opened(&self, key: &SessionKey) -> bool {
        if !self.lost(key) {
            return false;
        }
        if !self.broker.release(key) {
            self.broker.kick(key);
        } else {
            self.sessions.release(key);
        }
        tracing::info!(device = ?key.device, client_id = ?key.client_id, "session claimed on another node while it was opened here");
        true
    }

    /// The revision of this node's claim on a session, if it holds one.
    pub fn revision(&self, key: &SessionKey) -> Option<u64> {
        self.lock().get(&claim_key(key)).map(|(_, r)| *r)
    }

    /// Whether a connection on another node claimed a session this node held, since.
    pub fn lost(&self, key: &SessionKey) -> bool {
        self.lost_keys().contains(&claim_key(key))
    }

    /// The current claim on a session (by its claim key): its revision and the run of the
    /// node that made it; None when nobody claimed it.
    pub async fn current(&self, claim: &str) -> Result<Option<(u64, String)>, ClusterError> {
        Ok(self
            .holder(claim)
            .await?
            .map(|(revision, claim)| (revision, claim.run)))
    }

    /// Whether this run holds the session with this claim key now, read from the bucket
    /// (not from the watch, which may lag). A newer claim by another run found here is
    /// enforced at once, as the watch will when it gets there: the session is closed and
    /// released on this node.
    pub async fn holds(&self, claim: &str) -> Result<bool, ClusterError> {
        match self.holder(claim).await? {
            Some((_, c)) if c.run == self.run => Ok(true),
            Some((revision, c)) => {
                self.yield_to(claim, revision, &c.node);
                Ok(false)
            }
            None => Ok(false),
        }
    }

    /// The claim on a session as the bucket has it now: its revision and value.
    async fn holder(&self, claim: &str) -> Result<Option<(u64, Claim)>, ClusterError> {
        let read = self.store.entry(claim);
        let entry = match tokio::time::timeout(CLAIM_TIMEOUT, read).await {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => return Err(ClusterError::jetstream("reading a session claim", e)),
            Err(_) => {
                return Err(ClusterError::jetstream(
                    "reading a session claim",
                    format!("no answer within {CLAIM_TIMEOUT:?}"),
                ))
            }
        };
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| {
                // Unreadable: nobody's, so not this run's either.
                let claim = serde_json::from_slice::<Claim>(&e.value).unwrap_or_default();
                (e.revision, claim)
            }))
    }

    fn lost_keys(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (SessionKey, u64)>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Follows the bucket: a newer claim by another node (or an earlier run of this
    /// one) on a session held here takes it away. Re-watches after a NATS outage.
    async fn enforce(self: Arc<Self>, mut watch: kv::Watch) {
        // The last claim seen: a watch resumed after an outage starts right after it, so a
        // claim made meanwhile is not missed.
        let mut last = 0;
        loop {
            while let Some(entry) = watch.next().await {
                let Ok(entry) = entry else { break };
                last = last.max(entry.revision);
                self.on_claim(&entry);
            }
            tracing::warn!(after_revision = last, "claims watch ended; watching again");
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let resumed = if last == 0 {
                    self.store.watch_all().await
                } else {
                    self.store.watch_all_from_revision(last + 1).await
                };
                if let Ok(w) = resumed {
                    watch = w;
                    break;
                }
            }
        }
    }

    fn on_claim(&self, entry: &kv::Entry) {
        if entry.operation != kv::Operation::Put {
            return;
        }
        let Ok(claim) = serde_json::from_slice::<Claim>(&entry.value) else {
            return;
        };
        if claim.run == self.run {
            return;
        }
        self.yield_to(&entry.key, entry.revision, &claim.node);
    }

    /// Another run claimed the session `claim` at `revision` (by a connection on `node`):
    /// if that is newer than this node's claim, the session is no longer this node's.
    fn yield_to(&self, claim: &str, revision: u64, node: &str) {
        let taken = {
            let mut held = self.lock();
            let taken = match held.get(claim) {
                Some((_, ours)) if revision > *ours => held.remove(claim),
                _ => None,
            };
            // Marked under the lock of `held`: see `claim`.
            if taken.is_some() {
                self.lost_keys().insert(claim.to_owned());
            }
            taken
        };
        if let Some((key, _)) = taken {
            // A persistent session moves with the claim: forgotten here, and what this
            // node pulled for it goes back to JetStream for the new holder.
            let released = self.broker.release(&key);
            if released {
                self.sessions.release(&key);
            }
            if released || self.broker.kick(&key) {
                tracing::info!(
                    device = ?key.device,
                    client_id = ?key.client_id,
                    by = %node,
                    "session taken over by a connection on another node"
                );
            }
        }
    }
}
