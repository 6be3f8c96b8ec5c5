//! Cluster mode's device registry (docs/cluster.md, "Registry"): the rows of the
//! standalone `devices` table as values of the JetStream key-value bucket
//! `<prefix>_registry`, one key per device ([`key_of`]), shared by every node and by
//! `certmq devices`.
//!
//! - **Reads are local.** Every node keeps a mirror (`mirror.rs`) of the whole bucket, fed by a KV
//!   watch (`watch.rs`): a CONNECT is decided without a round trip, and a known device
//!   still connects while NATS is unreachable.
//! - **Writes are compare-and-set** on the key's revision (JetStream's expected last
//!   subject sequence): provisioning writes "only if the key has no value", rotation and
//!   every other change "only if the key is still at the revision the decision read". A
//!   writer that loses reads the key again and decides again with the one step-7 function
//!   ([`registry::decide`]), exactly as if the two connections had come one after the
//!   other to one node: two nodes never hold two entries for one name, and an older
//!   certificate can never overwrite a newer one.
//! - **Changes made elsewhere** (another node, the CLI) reach this node's mirror through
//!   the watch and the server's re-check through the [`ChangeFeed`].

mod activity;
mod mirror;
mod port;
mod watch;

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use async_nats::jetstream::kv::{Store, UpdateErrorKind};

pub use activity::TOUCH_INTERVAL;
use activity::{Activity, TOUCH_BATCH};
pub use mirror::{key_of, name_of};
use mirror::{Held, Mirror, Record, Slot};

use super::{Cluster, ClusterError, Names};
use crate::cert::now_secs;
use crate::config::{Cluster as Settings, PinnedDevice};
use crate::registry::{
    self, Admitted, ChangeFeed, Changes, Device, Presented, Refusal, RegistryError, Source,
};

/// How long one read or write of the bucket may take.
const KV_TIMEOUT: Duration = Duration::from_secs(5);
/// Compare-and-set attempts before a write gives up (each lost one re-reads the key).
const ATTEMPTS: usize = 8;

/// The registry of a cluster node (or of `certmq devices` with a `[cluster]` config).
pub struct KvRegistry {
    bucket: String,
    node: String,
    replicas: usize,
    inner: Arc<Inner>,
    attached: OnceLock<Attached>,
    activity: Mutex<Activity>,
    /// The runtime a command-line process made for this registry ([`KvRegistry::open_blocking`]);
    /// last, so that it stops after everything that runs on it.
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for KvRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvRegistry")
            .field("bucket", &self.bucket)
            .field("node", &self.node)
            .field("attached", &self.attached.get().is_some())
            .finish()
    }
}

/// What the watch task shares with the registry.
pub struct Inner {
    /// std Mutex: short lookups and updates, never held across an await.
    mirror: Mutex<Mirror>,
    feed: Arc<ChangeFeed>,
}

impl Inner {
    fn mirror(&self) -> MutexGuard<'_, Mirror> {
        self.mirror.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The bucket once the node has joined the cluster.
struct Attached {
    kv: Store,
    cluster: Cluster,
    /// The runtime the NATS client runs on: the synchronous `registry::Backend` methods wait on it.
    handle: tokio::runtime::Handle,
    watch: tokio::task::JoinHandle<()>,
}

/// What importing one device found.
enum ImportOne {
    Added,
    Present,
    /// The registry holds the name otherwise (in words).
    Conflict(String),
}

/// Why a compare-and-set write did not happen.
enum WriteError {
    /// The key is no longer at the expected revision.
    Conflict,
    Unavailable(String),
}

impl KvRegistry {
    /// The registry of `settings`' bucket, not yet connected: [`KvRegistry::attach`]
    /// reads the bucket; until then every write is refused as unavailable.
    pub fn new(settings: &Settings) -> KvRegistry {
        KvRegistry {
            bucket: Names::new(&settings.prefix).bucket("registry"),
            node: settings.node.clone(),
            replicas: settings.replicas,
            inner: Arc::new(Inner {
                mirror: Mutex::new(Mirror::default()),
                feed: Arc::new(ChangeFeed::default()),
            }),
            attached: OnceLock::new(),
            activity: Mutex::new(Activity::default()),
            runtime: None,
        }
    }

    /// Connects to NATS and reads the bucket: what `certmq devices` uses.
    pub async fn open(settings: &Settings) -> Result<KvRegistry, ClusterError> {
        let cluster = Cluster::connect(settings).await?;
        let registry = KvRegistry::new(settings);
        registry.attach(&cluster).await?;
        Ok(registry)
    }

    /// [`KvRegistry::open`] for a synchronous program (`certmq devices`, `explain`,
    /// `check`): the NATS client runs on `runtime` (multi-threaded), which the registry
    /// keeps. Drop it outside any async context.
    pub fn open_blocking(
        runtime: tokio::runtime::Runtime,
        settings: &Settings,
    ) -> Result<KvRegistry, ClusterError> {
        let mut registry = runtime.block_on(KvRegistry::open(settings))?;
        registry.runtime = Some(runtime);
        Ok(registry)
    }

    /// Opens (creating it if needed) the bucket, reads all of it into the mirror and starts
    /// the watch that keeps the mirror current. Called once.
    pub async fn attach(&self, cluster: &Cluster) -> Result<(), ClusterError> {
        let kv = self.bucket_of(cluster).await?;
        let snapshot = watch::snapshot(&kv)
            .await
            .map_err(|e| ClusterError::jetstream(format!("reading bucket {}", self.bucket), e))?;
        let mut changes = Changes::default();
        self.inner
            .mirror()
            .replace_all(snapshot.rows, snapshot.through, &mut changes);
        let watch = tokio::spawn(watch::follow(
            kv.clone(),
            self.inner.clone(),
            snapshot.watch,
        ));
        let attached = Attached {
            kv,
            cluster: cluster.clone(),
            handle: tokio::runtime::Handle::current(),
            watch,
        };
        if let Err(again) = self.attached.set(attached) {
            again.watch.abort();
        }
        Ok(())
    }

    /// The bucket, created with `replicas` copies if it does not exist (one value per
    /// key: a write's compare-and-set is against the last one).
    async fn bucket_of(&self, cluster: &Cluster) -> Result<Store, ClusterError> {
        crate::cluster::kv_bucket(
            cluster,
            &self.bucket,
            self.replicas,
            1,
            "certmq device registry (docs/cluster.md)",
        )
        .await
    }

    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn attached(&self) -> Result<&Attached, RegistryError> {
        self.attached
            .get()
            .ok_or_else(|| self.unavailable("this node has not joined the cluster yet"))
    }

    fn unavailable(&self, reason: impl Into<String>) -> RegistryError {
        RegistryError::Unavailable {
            bucket: self.bucket.clone(),
            reason: reason.into(),
        }
    }

    /// Runs `f` to completion on the NATS runtime from synchronous code (a blocking task,
    /// or the CLI's main thread).
    fn wait<T>(
        &self,
        f: impl Future<Output = Result<T, RegistryError>>,
    ) -> Result<T, RegistryError> {
        let handle = self.attached()?.handle.clone();
        tokio::task::block_in_place(|| handle.block_on(f))
    }

    /// The mirror's state of `name` (revision 0 and gone when never seen).
    fn held(&self, name: &str) -> Held {
        self.inner.mirror().get(name).cloned().unwrap_or(Held {
            revision: 0,
            slot: Slot::Gone,
        })
    }

    /// Reads `name`'s key from the bucket (after a lost compare-and-set). What it finds is
    /// applied to the mirror like a watch delivery, changes included, so that the watch's
    /// later copy of the same revision (ignored as not newer) loses nothing.
    async fn fresh(&self, att: &Attached, name: &str) -> Result<Held, RegistryError> {
        let entry = tokio::time::timeout(KV_TIMEOUT, att.kv.entry(key_of(name)))
            .await
            .map_err(|_| self.unavailable(format!("no answer within {KV_TIMEOUT:?}")))?
            .map_err(|e| self.unavailable(e.to_string()))?;
        let Some((_, held)) = entry.as_ref().and_then(watch::held_of) else {
            return Ok(Held {
                revision: 0,
                slot: Slot::Gone,
            });
        };
        let mut changes = Changes::default();
        self.inner.mirror().apply(name, held.clone(), &mut changes);
        self.inner.feed.push(changes);
        Ok(held)
    }

    /// Writes `record` under `name` if the key is still at `expected` (0: no value ever).
    async fn put(
        &self,
        att: &Attached,
        name: &str,
        record: &Record,
        expected: u64,
    ) -> Result<u64, WriteError> {
        if !att.cluster.connected() {
            return Err(WriteError::Unavailable(
                "not connected to NATS (provisioning, rotation and registry changes need a compare-and-set write)".to_owned(),
            ));
        }
        let write = att.kv.update(key_of(name), record.to_bytes(), expected);
        match tokio::time::timeout(KV_TIMEOUT, write).await {
            Err(_) => Err(WriteError::Unavailable(format!(
                "no answer from JetStream within {KV_TIMEOUT:?}"
            ))),
            Ok(Err(e)) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                Err(WriteError::Conflict)
            }
            Ok(Err(e)) => Err(WriteError::Unavailable(e.to_string())),
            Ok(Ok(revision)) => {
                // This node's own write: the caller acts on it (a provisioning forgets the
                // name's old sessions, a rotation re-checks), so it is not pushed again.
                let slot = Record::decode(name, &record.to_bytes());
                self.inner
                    .mirror()
                    .apply(name, Held { revision, slot }, &mut Changes::default());
                Ok(revision)
            }
        }
    }

    /// Compare-and-set of one key, retried: `change` gets the current row (None: no device)
    /// and returns the record to write, or None to write nothing. Returns whether it wrote.
    async fn update_row(
        &self,
        name: &str,
        mut change: impl FnMut(Option<(&Device, u64)>) -> Result<Option<Record>, RegistryError>,
    ) -> Result<bool, RegistryError> {
        let att = self.attached()?;
        let mut held = self.held(name);
        for _ in 0..ATTEMPTS {
            let Some(record) = change(row_of(&held, name)?)? else {
                return Ok(false);
            };
            match self.put(att, name, &record, held.revision).await {
                Ok(_) => return Ok(true),
                Err(WriteError::Conflict) => held = self.fresh(att, name).await?,
                Err(WriteError::Unavailable(reason)) => return Err(self.unavailable(reason)),
            }
        }
        Err(RegistryError::Contention {
            name: name.to_owned(),
            attempts: ATTEMPTS,
        })
    }

    /// Step 7 with the write: decided on the mirror's row, written by compare-and-set,
    /// decided again on the fresh row whenever another writer came first.
    async fn admit_commit(
        &self,
        presented: &Presented<'_>,
    ) -> Result<Result<Admitted, Refusal>, RegistryError> {
        let name = presented.name.as_str();
        let mut outcome = None;
        let now = now_secs();
        self.update_row(name, |row| {
            let decided = registry::decide(row.map(|r| r.0), presented);
            let record = match (&decided, row) {
                (Ok(Admitted::Provisioned), _) => Some(Record::of(
                    &provisioned(presented, now),
                    new_entry(),
                    &self.node,
                    now,
                )),
                (Ok(Admitted::Rotated { .. }), Some((device, entry))) => {
                    let mut d = device.clone();
                    d.fingerprint = presented.fingerprint;
                    d.validity = presented.validity;
                    Some(Record::of(&d, entry, &self.node, now))
                }
                _ => None,
            };
            outcome = Some(decided);
            Ok(record)
        })
        .await?;
        if matches!(
            outcome,
            Some(Ok(Admitted::Provisioned | Admitted::Rotated { .. }))
        ) {
            self.activity().written(name, now);
        }
        outcome.ok_or_else(|| self.unavailable("no decision was made"))
    }

    /// Enters one pinned device (missing, or its certificate changed in the config).
    async fn enter_pinned(&self, p: &PinnedDevice) -> Result<(), RegistryError> {
        let now = now_secs();
        self.update_row(p.name.as_str(), |row| {
            Ok(match row {
                // An anchor provisioned the name meanwhile: the next start or reload
                // reports the conflict.
                Some((d, _)) if d.source != Source::Pinned => None,
                Some((d, _)) if d.fingerprint == p.info.fingerprint => None,
                Some((d, entry)) => {
                    let mut d = d.clone();
                    d.fingerprint = p.info.fingerprint;
                    d.validity = p.info.validity;
                    Some(Record::of(&d, entry, &self.node, now))
                }
                None => {
                    let d = Device {
                        name: p.name.to_string(),
                        source: Source::Pinned,
                        fingerprint: p.info.fingerprint,
                        validity: p.info.validity,
                        enabled: true,
                        created_at: now,
                        last_seen_at: None,
                        dropped_messages: 0,
                    };
                    Some(Record::of(&d, new_entry(), &self.node, now))
                }
            })
        })
        .await
        .map(|_| ())
    }

    /// Imports one device unless the key holds one already; says which case it was.
    async fn import_one(&self, d: &Device) -> Result<ImportOne, RegistryError> {
        let now = now_secs();
        let mut result = ImportOne::Added;
        self.update_row(&d.name, |row| {
            Ok(match row {
                Some((h, _)) => {
                    result = if h.source == d.source && h.fingerprint == d.fingerprint {
                        ImportOne::Present
                    } else {
                        ImportOne::Conflict(registry::held_text(h))
                    };
                    None
                }
                None => {
                    result = ImportOne::Added;
                    Some(Record::of(d, new_entry(), &self.node, now))
                }
            })
        })
        .await?;
        Ok(result)
    }

    /// `devices delete`: removes whatever entry the key holds now (not what this process
    /// read at start); [`RegistryError::UnknownDevice`] when there is none.
    async fn remove(&self, name: &str) -> Result<(), RegistryError> {
        let att = self.attached()?;
        if matches!(self.fresh(att, name).await?.slot, Slot::Gone) {
            return Err(RegistryError::UnknownDevice(name.to_owned()));
        }
        if !att.cluster.connected() {
            return Err(self.unavailable("not connected to NATS"));
        }
        tokio::time::timeout(KV_TIMEOUT, att.kv.delete(key_of(name)))
            .await
            .map_err(|_| self.unavailable(format!("no answer within {KV_TIMEOUT:?}")))?
            .map_err(|e| self.unavailable(e.to_string()))
    }

    fn activity(&self) -> MutexGuard<'_, Activity> {
        self.activity.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes due activity records; `all` ignores [`TOUCH_INTERVAL`] (a graceful stop).
    fn flush_activity(&self, all: bool) -> Result<usize, RegistryError> {
        let Ok(att) = self.attached() else {
            return Ok(0);
        };
        // While NATS is away the records wait in memory: nothing to log every second.
        if !att.cluster.connected() {
            return Ok(0);
        }
        let due = self
            .activity()
            .due(now_secs(), all, if all { usize::MAX } else { TOUCH_BATCH });
        if due.is_empty() {
            return Ok(0);
        }
        self.wait(async {
            let mut written = 0;
            let mut due = due.into_iter();
            for (name, pending) in due.by_ref() {
                let result = self
                    .update_row(&name, |row| {
                        Ok(row.map(|(d, entry)| {
                            let mut d = d.clone();
                            d.last_seen_at = d.last_seen_at.max(pending.last_seen);
                            d.dropped_messages = d.dropped_messages.saturating_add(pending.dropped);
                            Record::of(&d, entry, &self.node, now_secs())
                        }))
                    })
                    .await;
                match result {
                    Ok(true) => written += 1,
                    Ok(false) => {}
                    Err(e) => {
                        let mut activity = self.activity();
                        activity.restore(&name, pending);
                        for (name, pending) in due {
                            activity.restore(&name, pending);
                        }
                        return Err(e);
                    }
                }
            }
            Ok(written)
        })
    }
}

impl Drop for KvRegistry {
    fn drop(&mut self) {
        if let Some(att) = self.attached.get() {
            att.watch.abort();
        }
    }
}

/// The row of a held state: None when deleted or never written.
fn row_of<'h>(held: &'h Held, name: &str) -> Result<Option<(&'h Device, u64)>, RegistryError> {
    match &held.slot {
        Slot::Row { device, entry } => Ok(Some((device, *entry))),
        Slot::Gone => Ok(None),
        Slot::Bad(reason) => Err(RegistryError::BadRecord {
            name: name.to_owned(),
            reason: reason.clone(),
        }),
    }
}

/// The row a provisioning creates (the same as SQLite's insert).
fn provisioned(presented: &Presented<'_>, now: i64) -> Device {
    Device {
        name: presented.name.as_str().to_owned(),
        source: presented.source.clone(),
        fingerprint: presented.fingerprint,
        validity: presented.validity,
        enabled: true,
        created_at: now,
        last_seen_at: Some(now),
        dropped_messages: 0,
    }
}

/// An identifier for a new entry: the nanoseconds of its creation. Only equality matters
/// (the same name deleted and created again gets another), and a name is created by one
/// compare-and-set at a time.
fn new_entry() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(1)
}
