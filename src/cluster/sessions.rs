//! Persistent sessions in JetStream (contract §12, docs/cluster.md "Persistent sessions"):
//! a session that outlives its connection is resumed on whichever node the device
//! reconnects to, after a node crash included, with everything acknowledged to publishers
//! while it was away.
//!
//! - The session's **record** (expiry, subscriptions, which node holds it) is one value in
//!   the bucket `<prefix>_sessions`, keyed by the session's claim key.
//! - Its **pending messages** are the unacknowledged messages of its own durable consumers
//!   on `<prefix>_msgs`: one per subject of its stored-QoS plain subscriptions (`a/#` is
//!   `a` and `a.>`; overlapping filters share a subject's consumer, which goes only when
//!   no subscription needs it any more), as nats-server's MQTT support does. JetStream keeps them while nobody is
//!   connected; whichever node holds the session pulls them ([`SessionStore::feed`]) into
//!   the session's queue, and a message is acknowledged to JetStream only when the device
//!   acknowledged it (PUBACK, PUBCOMP), or it expired or was refused by the ACL.
//!
//! [`SessionStore`] is the broker's durability backend in cluster mode (the
//! `journal::Backend` port): record changes and acknowledgements are ops applied in order
//! by one task, and a barrier completes once every op before it reached JetStream, so a
//! SUBACK means the subscription's consumer exists.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, AckKind};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::claims::{claim_key, Claims};
use super::nodes::{Liveness, Verdict};
use super::{route, subject, Cluster, ClusterError};
use crate::broker::journal::{Backend, CommitError, Op, StoredSession, SubOptions};
use crate::broker::router::RetainHandling;
use crate::broker::session::{SessionKey, SessionRef};
use crate::broker::{Broker, FedOutcome};
use crate::config::Cluster as Settings;
use crate::mqtt::codec::QoS;
use crate::mqtt::topic::Subscription;

/// How long one JetStream request of the writer may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// A pulled message the device has not acknowledged comes again after this long (the
/// node holding it died); the holder keeps it by reporting progress.
const ACK_WAIT: Duration = Duration::from_secs(10);
/// Unacknowledged messages per consumer (the session's queue bounds what is pulled).
const MAX_ACK_PENDING: i64 = 1024;
/// At most this many messages per pull request (fewer when the session's queue has less
/// room).
const MAX_BATCH: usize = 200;
/// How long a pull request waits at JetStream for messages before another is sent.
const PULL_WAIT: Duration = Duration::from_secs(30);
/// A consumer's ack floor is read again once this many acknowledgements above it are
/// kept ([`Acked`]).
const ACKED_PRUNE: usize = 64;
/// At most this many acknowledgements above the floor are kept per consumer, the oldest
/// going first: a bound on memory for a consumer whose floor one message holds down
/// (a copy of a message acknowledged more than this many acknowledgements ago, and still
/// above the floor, would be queued again).
const ACKED_KEPT: usize = 4 * MAX_ACK_PENDING as usize;
/// A message the session could not take (queue full and stalled) comes again after this.
const RETRY_DELAY: Duration = Duration::from_secs(5);
/// How often the sweep reads every record even though no run was seen dying: records of
/// runs that ended unseen (every node restarted) are found at start and then this often.
/// Each scan costs one read per record, on every node.
const FULL_SCAN: Duration = Duration::from_secs(300);

/// A session's record in `<prefix>_sessions`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Record {
    device: String,
    client_id: String,
    /// MQTT 5 session expiry seconds; None = never.
    expiry: Option<u32>,
    /// Set while nobody is connected: when the session ends (seconds since the epoch).
    expires_at: Option<i64>,
    subscriptions: Vec<Sub>,
    /// The node and run that wrote it last (the holder).
    node: String,
    run: String,
}

/// One subscription of a record.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Sub {
    /// As subscribed, after the `me` alias (`$share/g/f` or `f`).
    filter: String,
    qos: u8,
    no_local: bool,
    retain_as_published: bool,
    retain_handling: u8,
    id: Option<u32>,
    aliased: bool,
}

impl Sub {
    fn new(filter: &str, opts: &SubOptions, aliased: bool) -> Sub {
        Sub {
            filter: filter.to_owned(),
            qos: opts.qos as u8,
            no_local: opts.no_local,
            retain_as_published: opts.retain_as_published,
            retain_handling: match opts.retain_handling {
                RetainHandling::SendAlways => 0,
                RetainHandling::SendIfNew => 1,
                RetainHandling::Never => 2,
            },
            id: opts.subscription_id,
            aliased,
        }
    }

    fn options(&self) -> SubOptions {
        SubOptions {
            qos: match self.qos {
                0 => QoS::AtMostOnce,
                1 => QoS::AtLeastOnce,
                _ => QoS::ExactlyOnce,
            },
            no_local: self.no_local,
            retain_as_published: self.retain_as_published,
            retain_handling: match self.retain_handling {
                0 => RetainHandling::SendAlways,
                1 => RetainHandling::SendIfNew,
                _ => RetainHandling::Never,
            },
            subscription_id: self.id,
        }
    }

    /// The NATS subjects of its consumers: none for QoS 0 (nothing to keep) and for
    /// shared subscriptions (their group's consumer keeps them, docs/cluster.md).
    fn stored_subjects(&self) -> Vec<String> {
        if self.qos == 0 {
            return Vec::new();
        }
        match Subscription::parse(&self.filter) {
            Ok(Subscription::Plain(f)) => {
                subject::filter_to_subjects(f.as_str()).unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }
}

/// The subjects whose consumers a session with these subscriptions needs. A consumer is
/// per (session, subject), not per filter: `a/#` (`a`, `a.>`) and `a` share the one for
/// `a`, so what a change may delete is decided by what the remaining subscriptions need.
fn needed_subjects(subs: &[Sub]) -> BTreeSet<String> {
    subs.iter().flat_map(Sub::stored_subjects).collect()
}

/// The consumer changes of a record whose subscriptions went from needing `before` to
/// `after`: `ensure` is created (true), and what is no longer needed deleted (false).
fn consumer_changes(
    before: &BTreeSet<String>,
    after: &[Sub],
    ensure: Vec<String>,
) -> Vec<(String, bool)> {
    let after = needed_subjects(after);
    let mut changes: Vec<(String, bool)> = before
        .difference(&after)
        .map(|s| (s.clone(), false))
        .collect();
    changes.extend(ensure.into_iter().map(|s| (s, true)));
    changes
}

/// The durable consumer of a session's subscription subject.
fn consumer_name(claim: &str, subject: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(claim.as_bytes());
    ctx.update(&[0]);
    ctx.update(subject.as_bytes());
    format!("ps-{}", super::hex(&ctx.finish().as_ref()[..12]))
}

/// A pulled message in a session's queue, until the device acknowledges it.
struct Held {
    claim: String,
    /// The consumer it came through.
    consumer: String,
    seq: u64,
    msg: jetstream::Message,
}

/// What one consumer of a session had acknowledged through this node: a copy of one of
/// these coming again is acknowledged again and dropped, never queued a second time.
///
/// Why copies come again: JetStream redelivers a message whose acknowledgement wait
/// passed, and acknowledgements and deliveries cross on the way (a copy sent just before
/// JetStream processed the acknowledgement). Once the original is acknowledged it is no
/// longer in `held`, so without this a QoS 2 message would reach the device twice on one
/// node with nothing failing. Pulling no more than the session's queue takes
/// ([`Feeder::pull_once`]) makes such copies rare; this makes them harmless.
///
/// Bounded by JetStream's own record: every stream sequence of the consumer at or below
/// its ack floor is acknowledged, so only acknowledgements above the floor as last read
/// are kept (and at most [`ACKED_KEPT`] of them, should one message hold the floor down
/// for long). A redelivery after another node's death is of a message nobody
/// acknowledged: it is in no such set and above the floor, and is delivered.
#[derive(Debug, Default)]
struct Acked {
    /// The consumer's ack floor (a stream sequence) when last read.
    floor: u64,
    /// Stream sequences acknowledged here above `floor`.
    above: BTreeSet<u64>,
    /// How many `above` held after the last read of the floor: it is read again once
    /// that doubled (at least [`ACKED_PRUNE`]).
    after_read: usize,
}

impl Acked {
    fn note(&mut self, seq: u64) {
        if seq <= self.floor {
            return;
        }
        self.above.insert(seq);
        while self.above.len() > ACKED_KEPT {
            self.above.pop_first();
        }
    }

    fn set_floor(&mut self, floor: u64) {
        if floor > self.floor {
            self.floor = floor;
            self.above = self.above.split_off(&floor.saturating_add(1));
        }
        self.after_read = self.above.len();
    }

    fn wants_floor(&self) -> bool {
        let grown = self.after_read.saturating_mul(2).min(ACKED_KEPT);
        self.above.len() >= ACKED_PRUNE.max(grown)
    }
}

/// A change to what a running feeder pulls.
enum Feed {
    /// A consumer (name, subject) was created.
    Add(String, String),
    /// A consumer (name) was deleted.
    Remove(String),
}

/// A session's pulled messages: stream sequence -> (queue id, consumer).
type HeldBy = HashMap<u64, (i64, String)>;

/// What the pulling side and the writer share.
#[derive(Default)]
struct Shared {
    /// Queue id of a pulled delivery -> the message to acknowledge.
    acks: Mutex<HashMap<i64, Held>>,
    /// Per session (claim key): stream sequence -> (queue id, consumer) of what it holds,
    /// so a message delivered again (by a second overlapping consumer, or after the
    /// acknowledgement wait) is not queued twice.
    held: Mutex<HashMap<String, HeldBy>>,
    /// Per session (claim key) and consumer: what this node acknowledged of it.
    /// Locked inside `held` (never the other way round).
    acked: Mutex<HashMap<String, HashMap<String, Acked>>>,
    /// Per session held here and online: its feeder.
    feeders: Mutex<HashMap<String, mpsc::UnboundedSender<Feed>>>,
    /// Sessions released to another node since the writer last looked: it forgets what
    /// it wrote of them.
    released: Mutex<Vec<String>>,
    /// Ops that failed to reach JetStream so far (`journal::Epoch`).
    failures: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// The session `claim` acknowledged stream message `seq` to JetStream through consumer
    /// `consumer` (or is about to).
    fn note_acked(&self, claim: &str, consumer: &str, seq: u64) {
        lock(&self.acked)
            .entry(claim.to_owned())
            .or_default()
            .entry(consumer.to_owned())
            .or_default()
            .note(seq);
    }

    /// Whether the session acknowledged stream message `seq` already: through any of its
    /// consumers (a sequence names one message of the stream), or at or below the ack
    /// floor of `consumer`, the one a copy came through (a floor says nothing of the
    /// messages of another consumer's subjects).
    fn was_acked(&self, claim: &str, consumer: &str, seq: u64) -> bool {
        let acked = lock(&self.acked);
        let Some(session) = acked.get(claim) else {
            return false;
        };
        session.get(consumer).is_some_and(|a| seq <= a.floor)
            || session.values().any(|a| a.above.contains(&seq))
    }

    /// Forgets what the session acknowledged: all of it (`consumer` None: the session left
    /// this node) or one consumer's (deleted: no copy comes through it any more).
    fn forget_acked(&self, claim: &str, consumer: Option<&str>) {
        let mut acked = lock(&self.acked);
        match consumer {
            None => {
                acked.remove(claim);
            }
            Some(name) => {
                if let Some(session) = acked.get_mut(claim) {
                    session.remove(name);
                    if session.is_empty() {
                        acked.remove(claim);
                    }
                }
            }
        }
    }
}

/// The cluster's session store; the broker's durability backend in cluster mode.
pub struct SessionStore {
    bucket_name: String,
    tx: mpsc::UnboundedSender<Op>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Op>>>,
    next_id: AtomicI64,
    shared: Arc<Shared>,
    cluster: OnceLock<Cluster>,
    store: OnceLock<kv::Store>,
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore")
            .field("bucket", &self.bucket_name)
            .finish()
    }
}

impl Backend for SessionStore {
    fn submit(&self, op: Op) {
        // Before the node joined, ops wait in the channel; after the writer stopped
        // (shutdown), a barrier's sender is dropped and its waiter sees `Stopped`.
        let _ = self.tx.send(op);
    }

    fn next_id(&self) -> i64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn failing(&self) -> bool {
        self.cluster.get().is_none_or(|c| !c.connected())
    }

    fn failures(&self) -> u64 {
        self.shared.failures.load(Ordering::SeqCst)
    }

    fn describe(&self) -> String {
        format!("NATS bucket {}", self.bucket_name)
    }
}

impl SessionStore {
    /// The store of a node with these settings; it writes nothing until [`SessionStore::start`].
    pub fn new(settings: &Settings) -> Arc<SessionStore> {
        let (tx, rx) = mpsc::unbounded_channel();
        Arc::new(SessionStore {
            bucket_name: super::Names::new(&settings.prefix).bucket("sessions"),
            tx,
            rx: Mutex::new(Some(rx)),
            next_id: AtomicI64::new(1),
            shared: Arc::default(),
            cluster: OnceLock::new(),
            store: OnceLock::new(),
        })
    }

    /// Opens (creating) the bucket and starts applying ops; `claims` say which node may
    /// write a session's record.
    pub async fn start(
        self: &Arc<Self>,
        cluster: &Cluster,
        claims: Arc<Claims>,
    ) -> Result<(), ClusterError> {
        let store = super::bucket(
            cluster,
            "sessions",
            1,
            "certmq persistent sessions (docs/cluster.md)",
        )
        .await?;
        let stream = cluster
            .js
            .get_stream(cluster.names.messages_stream())
            .await
            .map_err(|e| ClusterError::jetstream("opening the message stream", e))?;
        let _ = self.cluster.set(cluster.clone());
        let _ = self.store.set(store.clone());
        let Some(rx) = lock(&self.rx).take() else {
            return Ok(());
        };
        let writer = Writer {
            cluster: cluster.clone(),
            store,
            stream,
            shared: self.shared.clone(),
            claims,
            records: HashMap::new(),
            failed: None,
        };
        tokio::spawn(writer.run(rx));
        Ok(())
    }

    /// The session `key` as JetStream holds it (subscriptions and expiry; its messages
    /// stay in its consumers), None when there is none.
    ///
    /// A record whose end time (`expires_at`, set while nobody is connected) has passed is
    /// no session: it is not resumed (Session Present 0), whoever held it, and it is
    /// discarded here as the sweep would (record at the revision read, then consumers).
    /// Its holder may be a run nobody saw die (every node restarted), whose sessions the
    /// sweep only finds at its next full scan.
    pub async fn load(&self, key: &SessionKey) -> Result<Option<StoredSession>, ClusterError> {
        let (Some(store), Some(cluster)) = (self.store.get(), self.cluster.get()) else {
            return Err(ClusterError::jetstream(
                "reading a session",
                "not joined yet",
            ));
        };
        let claim = claim_key(key);
        // A record written between the read and the discard (resumed on another node
        // meanwhile) is read again: it may be live now.
        for _ in 0..3 {
            let Some((revision, record)) = read(store, &claim).await? else {
                return Ok(None);
            };
            let now = crate::cert::now_secs();
            if record.expires_at.is_none_or(|at| at > now) {
                let subscriptions = record
                    .subscriptions
                    .iter()
                    .map(|s| (s.filter.clone(), s.options(), s.aliased))
                    .collect();
                return Ok(Some(StoredSession {
                    key: key.clone(),
                    expiry: record.expiry,
                    expires_at: record.expires_at,
                    subscriptions,
                    queue: Vec::new(),
                    inbound: Vec::new(),
                }));
            }
            if discard(cluster, store, &claim, revision, &record).await? {
                tracing::info!(device = %record.device, client_id = %record.client_id, held_by = %record.node, "session expired while nobody held it; discarded instead of resumed");
                return Ok(None);
            }
        }
        Err(ClusterError::jetstream(
            "reading a session",
            "its record kept changing",
        ))
    }

    /// Whether JetStream holds a session under `key` (false when it cannot be read).
    /// Asked by each connection itself, so clean starts do not queue behind the writer.
    pub async fn exists(&self, key: &SessionKey) -> bool {
        let Some(store) = self.store.get() else {
            return false;
        };
        matches!(read(store, &claim_key(key)).await, Ok(Some(_)))
    }

    /// The session `key` was claimed by a connection on another node: what this node
    /// pulled for it and the device did not acknowledge goes back to JetStream at once
    /// (the other node gets it), and its writes stop here.
    pub fn release(&self, key: &SessionKey) {
        let claim = claim_key(key);
        let held = lock(&self.shared.held).remove(&claim).unwrap_or_default();
        let mut acks = lock(&self.shared.acks);
        let back: Vec<Held> = held
            .values()
            .filter_map(|(id, _)| acks.remove(id))
            .collect();
        drop(acks);
        lock(&self.shared.feeders).remove(&claim);
        self.shared.forget_acked(&claim, None);
        lock(&self.shared.released).push(claim);
        if back.is_empty() {
            return;
        }
        tokio::spawn(async move {
            for h in back {
                let _ = h.msg.ack_with(AckKind::Nak(None)).await;
            }
        });
    }

    /// Pulls the session's stored messages into its queue while `stop` is not cancelled
    /// (the connection holding it on this node is open).
    pub fn feed(
        self: &Arc<Self>,
        broker: Arc<Broker>,
        session: SessionRef,
        stop: CancellationToken,
    ) {
        let Some(cluster) = self.cluster.get().cloned() else {
            return;
        };
        let claim = claim_key(&session.key);
        let (tx, mut rx) = mpsc::unbounded_channel();
        lock(&self.shared.feeders).insert(claim.clone(), tx.clone());
        let names: HashMap<String, String> = session_subjects(&broker, &session)
            .into_iter()
            .map(|s| (consumer_name(&claim, &s), s))
            .collect();
        let feeder = Feeder {
            cluster,
            broker,
            session,
            claim: claim.clone(),
            shared: self.shared.clone(),
            store: self.clone(),
        };
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut pulls: HashMap<String, tokio::task::AbortHandle> = HashMap::new();
            for (name, subject) in names {
                let task = tokio::spawn(feeder.clone().pull(name.clone(), subject, stop.clone()));
                pulls.insert(name, task.abort_handle());
            }
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    change = rx.recv() => match change {
                        Some(Feed::Add(name, subject)) => {
                            if let std::collections::hash_map::Entry::Vacant(slot) = pulls.entry(name) {
                                let pull = feeder.clone().pull(slot.key().clone(), subject, stop.clone());
                                slot.insert(tokio::spawn(pull).abort_handle());
                            }
                        }
                        Some(Feed::Remove(name)) => {
                            if let Some(task) = pulls.remove(&name) {
                                task.abort();
                            }
                            shared.forget_acked(&claim, Some(&name));
                        }
                        None => break,
                    },
                }
            }
            // Stopped: each pull ends by itself, giving back what it had pulled and not
            // queued (`give_back`); aborting it would leave that to the acknowledgement wait.
            if !stop.is_cancelled() {
                for task in pulls.values() {
                    task.abort();
                }
            }
            let mut feeders = lock(&shared.feeders);
            if feeders.get(&claim).is_some_and(|t| t.same_channel(&tx)) {
                feeders.remove(&claim);
            }
        });
    }

    /// Sessions whose node died leave their record behind: every `every`, this ends those
    /// whose expiry passed (counted from when their node was found dead, for a session
    /// that was connected then). A scan reads every record, so it runs when a run died
    /// since the last one, when the earliest deadline it found has come, and in full at
    /// start and every `FULL_SCAN` (5 minutes): a run that ended before this one started (every
    /// node restarted) or while this node could not see it is never in
    /// [`Liveness::dead_runs`], yet its records are a dead run's all the same.
    pub fn sweep(self: &Arc<Self>, every: Duration, liveness: Arc<Liveness>) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut known_dead = HashSet::new();
            let mut next: Option<i64> = None;
            let mut last_full: Option<std::time::Instant> = None;
            loop {
                let dead: HashSet<(String, String)> = liveness.dead_runs().into_iter().collect();
                let now = crate::cert::now_secs();
                let full = last_full.is_none_or(|at| at.elapsed() >= FULL_SCAN);
                let due = next.is_some_and(|at| at <= now);
                if full || due || dead != known_dead {
                    // After listing the records: every run that wrote one wrote its
                    // heartbeat before, so one read of the heartbeats tells which are dead.
                    let scan = async {
                        let claims = this.list().await?;
                        liveness.poll().await?;
                        this.sweep_once(claims, &liveness).await
                    };
                    match scan.await {
                        Ok(at) => {
                            known_dead = dead;
                            next = at;
                            if full {
                                last_full = Some(std::time::Instant::now());
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "session sweep failed; next time"),
                    }
                }
                tokio::time::sleep(every).await;
            }
        });
    }

    /// The claim keys of every record.
    async fn list(&self) -> Result<Vec<String>, ClusterError> {
        let Some(store) = self.store.get() else {
            return Ok(Vec::new());
        };
        let mut keys = store
            .keys()
            .await
            .map_err(|e| ClusterError::jetstream("listing sessions", e))?;
        let mut claims = Vec::new();
        while let Some(claim) = keys.next().await {
            claims.push(claim.map_err(|e| ClusterError::jetstream("listing sessions", e))?);
        }
        Ok(claims)
    }

    /// One scan of `claims`; returns the earliest deadline still to come of a dead run's
    /// session.
    async fn sweep_once(
        &self,
        claims: Vec<String>,
        liveness: &Liveness,
    ) -> Result<Option<i64>, ClusterError> {
        let (Some(store), Some(cluster)) = (self.store.get(), self.cluster.get()) else {
            return Ok(None);
        };
        let now = crate::cert::now_secs();
        let mut next = None;
        for claim in claims {
            let Some((revision, mut record)) = read(store, &claim).await? else {
                continue;
            };
            // A live holder ends its sessions itself, at their expiry.
            let orphan = matches!(
                liveness.verdict(&record.node, &record.run),
                Verdict::Dead { .. }
            );
            if !orphan || record.run == cluster.run {
                continue;
            }
            let at = match (record.expires_at, record.expiry) {
                (Some(at), _) => at,
                (None, None) => continue, // never expires
                // Connected when its node died: offline from now on.
                (None, Some(secs)) => {
                    let at = now + i64::from(secs);
                    record.expires_at = Some(at);
                    let value = serde_json::to_vec(&record).unwrap_or_default();
                    if store.update(&claim, value.into(), revision).await.is_err() {
                        continue; // resumed meanwhile, or another node marked it
                    }
                    at
                }
            };
            if at > now {
                next = Some(next.map_or(at, |n: i64| n.min(at)));
                continue;
            }
            if discard(cluster, store, &claim, revision, &record).await? {
                tracing::info!(device = %record.device, client_id = %record.client_id, held_by = %record.node, "session expired after its node died; removed");
            }
        }
        Ok(next)
    }
}

/// Ends a session nobody holds: removes its record at `revision` (compare-and-set: of the
/// nodes sweeping, or a sweep and a resume, exactly one ends it, and a record written
/// since, by a node resuming it, is left alone), then its consumers and with them the
/// messages only they kept. False when the record changed since it was read.
async fn discard(
    cluster: &Cluster,
    store: &kv::Store,
    claim: &str,
    revision: u64,
    record: &Record,
) -> Result<bool, ClusterError> {
    if !remove_record(store, claim, revision).await? {
        return Ok(false);
    }
    // The record is gone, so nobody resumes the session: its consumers can go at leisure.
    let stream = cluster
        .js
        .get_stream(cluster.names.messages_stream())
        .await
        .map_err(|e| ClusterError::jetstream("opening the message stream", e))?;
    for subject in needed_subjects(&record.subscriptions) {
        let _ = stream
            .delete_consumer(&consumer_name(claim, &subject))
            .await;
    }
    Ok(true)
}

/// Removes a record if it is still at `revision`; false when it changed since (written,
/// or removed, by another node).
async fn remove_record(
    store: &kv::Store,
    claim: &str,
    revision: u64,
) -> Result<bool, ClusterError> {
    let delete = store.delete_expect_revision(claim, Some(revision));
    match tokio::time::timeout(STEP_TIMEOUT, delete).await {
        Ok(Ok(())) => Ok(true),
        Ok(Err(e)) => {
            tracing::debug!(claim, error = %e, "session record changed meanwhile; not removed");
            Ok(false)
        }
        Err(_) => Err(ClusterError::jetstream("removing a session", "no answer")),
    }
}

/// The subjects whose consumers `session`'s subscriptions need (in memory: what it was
/// resumed with and subscribed since).
fn session_subjects(broker: &Broker, session: &SessionRef) -> BTreeSet<String> {
    broker
        .subscriptions(session)
        .into_iter()
        .flat_map(|(sub, opts)| {
            let text = crate::broker::subscription_text(&sub);
            Sub::new(&text, &opts, false).stored_subjects()
        })
        .collect()
}

/// Creates the durable consumer `name` of a session's subscription subject (an existing
/// one is kept as it is).
async fn create_consumer(
    cluster: &Cluster,
    stream: &jetstream::stream::Stream,
    name: &str,
    subject: &str,
) -> Result<consumer::PullConsumer, ClusterError> {
    let config = consumer::pull::Config {
        durable_name: Some(name.to_owned()),
        filter_subject: cluster.names.message(true, subject),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        max_ack_pending: MAX_ACK_PENDING,
        // What is published from the SUBSCRIBE on (its SUBACK waits for this).
        deliver_policy: consumer::DeliverPolicy::New,
        ..Default::default()
    };
    let create = stream.get_or_create_consumer::<consumer::pull::Config>(name, config);
    match tokio::time::timeout(STEP_TIMEOUT, create).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(ClusterError::jetstream(
            format!("creating consumer {name}"),
            e,
        )),
        Err(_) => Err(ClusterError::jetstream(
            format!("creating consumer {name}"),
            "no answer",
        )),
    }
}

/// Whether opening a consumer failed because JetStream has no consumer of that name.
fn no_such_consumer(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<jetstream::context::ConsumerInfoError>()
        .is_some_and(|e| e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound)
}

/// Reads a record: its revision and value; None when there is none (or a delete marker).
async fn read(store: &kv::Store, claim: &str) -> Result<Option<(u64, Record)>, ClusterError> {
    let entry = tokio::time::timeout(STEP_TIMEOUT, store.entry(claim))
        .await
        .map_err(|_| ClusterError::jetstream("reading a session", "no answer"))?
        .map_err(|e| ClusterError::jetstream("reading a session", e))?;
    let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
        return Ok(None);
    };
    match serde_json::from_slice::<Record>(&entry.value) {
        Ok(r) => Ok(Some((entry.revision, r))),
        Err(e) => {
            tracing::warn!(claim, error = %e, "unreadable session record; taken as none");
            Ok(None)
        }
    }
}

/// Applies ops in order.
struct Writer {
    cluster: Cluster,
    store: kv::Store,
    stream: jetstream::stream::Stream,
    shared: Arc<Shared>,
    /// Who holds each session: only the holder of its claim writes its record.
    claims: Arc<Claims>,
    /// Sessions this node wrote: their last revision and value.
    records: HashMap<String, (u64, Record)>,
    /// The first failure since the last barrier.
    failed: Option<String>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Op>) {
        while let Some(op) = rx.recv().await {
            for claim in std::mem::take(&mut *lock(&self.shared.released)) {
                self.records.remove(&claim);
            }
            self.apply(op).await;
        }
    }

    async fn apply(&mut self, op: Op) {
        match op {
            Op::Group(ops) => {
                for op in ops {
                    Box::pin(self.apply(op)).await;
                }
            }
            Op::Barrier(tx) | Op::Close(tx) => {
                let outcome = match self.failed.take() {
                    Some(e) => Err(CommitError::Failed(format!("JetStream: {e}"))),
                    None => Ok(()),
                };
                let _ = tx.send(outcome);
            }
            Op::Probe => {
                if !self.cluster.connected() {
                    self.fail("not connected to NATS".into());
                }
            }
            Op::Session {
                key,
                expiry,
                expires_at,
            } => {
                let outcome = self
                    .change(&key, expires_at.is_none(), |r| {
                        r.expiry = expiry;
                        r.expires_at = expires_at;
                        Vec::new()
                    })
                    .await;
                self.settle(outcome);
            }
            Op::DropSession { key } => {
                let outcome = self.drop_session(&key).await;
                self.settle(outcome);
            }
            Op::Subscribe {
                key,
                filter,
                opts,
                aliased,
            } => {
                let sub = Sub::new(&filter, &opts, aliased);
                let outcome = self
                    .change(&key, false, move |r| {
                        let before = needed_subjects(&r.subscriptions);
                        r.subscriptions.retain(|s| s.filter != sub.filter);
                        r.subscriptions.push(sub.clone());
                        // The new subscription's consumers are ensured even when the
                        // subject was needed already (creating an existing one keeps it).
                        consumer_changes(&before, &r.subscriptions, sub.stored_subjects())
                    })
                    .await;
                self.settle(outcome);
            }
            Op::Unsubscribe { key, filter } => {
                let outcome = self
                    .change(&key, false, |r| {
                        let before = needed_subjects(&r.subscriptions);
                        r.subscriptions.retain(|s| s.filter != filter);
                        consumer_changes(&before, &r.subscriptions, Vec::new())
                    })
                    .await;
                self.settle(outcome);
            }
            Op::Delivered { id } => {
                let held = lock(&self.shared.acks).remove(&id);
                if let Some(h) = held {
                    // Noted before it leaves `held`: a copy coming meanwhile finds it in
                    // one or the other. Noted even if the acknowledgement below is lost:
                    // the copy JetStream then sends is acknowledged again, not queued.
                    self.shared.note_acked(&h.claim, &h.consumer, h.seq);
                    if let Some(m) = lock(&self.shared.held).get_mut(&h.claim) {
                        m.remove(&h.seq);
                    }
                    if let Err(e) = h.msg.ack().await {
                        tracing::debug!(error = %e, "acknowledgement to JetStream lost; the message comes again");
                    }
                }
            }
            // What a delivery went out with, QoS 2 progress both ways and retained
            // messages are not kept across nodes (docs/cluster.md, best effort).
            Op::Enqueue { .. }
            | Op::Sent { .. }
            | Op::Released { .. }
            | Op::InboundBegin { .. }
            | Op::InboundRelease { .. }
            | Op::Retain { .. } => {}
        }
    }

    fn settle(&mut self, outcome: Result<(), ClusterError>) {
        if let Err(e) = outcome {
            self.fail(e.to_string());
        }
    }

    fn fail(&mut self, e: String) {
        tracing::warn!(error = %e, "session store write failed");
        self.shared.failures.fetch_add(1, Ordering::SeqCst);
        self.failed.get_or_insert(e);
    }

    /// Changes a record (read first when this node has not written it) and writes it
    /// back conditionally on its revision; `edit` returns the consumers to create (true)
    /// or delete (false). `take`: the session opens here (a missing record is created).
    ///
    /// The session's claim decides who writes, not the record. Ops are applied in order
    /// but after they were submitted, so this node may come to a change (its "open"
    /// included) after a connection on another node claimed the session and wrote the
    /// record; written then, it marked the record as this node's, and the node holding
    /// the claim skipped every later change of its own as "held by another node" while
    /// acknowledging it (its SUBSCRIBE's consumer was never created). So: a node that
    /// knows it lost the claim writes nothing; a record naming another run is written only
    /// if the claim is this run's, read from the claims bucket (only in that case: on the
    /// common path the record names this run), at the revision read, which takes the
    /// record back from a late writer. A change not written answers its barrier Ok: the
    /// only connection waiting for it is one whose session was taken over, and reading
    /// the claim released that session here, so the connection ends without acknowledging
    /// (`Claims::holds`).
    async fn change(
        &mut self,
        key: &SessionKey,
        take: bool,
        edit: impl Fn(&mut Record) -> Vec<(String, bool)>,
    ) -> Result<(), ClusterError> {
        let claim = claim_key(key);
        let mut changes = Vec::new();
        for attempt in 0..4 {
            let current = if self.claims.lost_claim(&claim) {
                None
            } else {
                match self.records.get(&claim) {
                    Some(r) if attempt == 0 => Some(r.clone()),
                    _ => match read(&self.store, &claim).await? {
                        Some(found) if found.1.run == self.cluster.run => Some(found),
                        Some(found) => self.claims.holds(&claim).await?.then_some(found),
                        None if take => Some((0, Record::default())),
                        // Removed since: only opening the session writes it anew. Most
                        // likely a clean start on another node, which claimed it first:
                        // the claim is read to release it here now (`Claims::holds`).
                        None => {
                            self.claims.holds(&claim).await?;
                            None
                        }
                    },
                }
            };
            let Some((revision, mut record)) = current else {
                self.records.remove(&claim);
                tracing::debug!(claim = %claim, "session held by another node now; change not written");
                return Ok(());
            };
            record.device = key.device.as_str().to_owned();
            record.client_id = key.client_id.clone();
            record.node = self.cluster.node().to_owned();
            record.run = self.cluster.run.clone();
            changes = edit(&mut record);
            let value = serde_json::to_vec(&record).unwrap_or_default();
            let write = async {
                if revision == 0 {
                    self.store
                        .create(&claim, value.into())
                        .await
                        .map_err(|e| e.to_string())
                } else {
                    self.store
                        .update(&claim, value.into(), revision)
                        .await
                        .map_err(|e| e.to_string())
                }
            };
            match tokio::time::timeout(STEP_TIMEOUT, write).await {
                Ok(Ok(new)) => {
                    self.records.insert(claim.clone(), (new, record));
                    break;
                }
                Ok(Err(e)) if attempt < 3 && self.cluster.connected() => {
                    tracing::debug!(error = %e, "session record changed meanwhile; reading again");
                }
                Ok(Err(e)) => return Err(ClusterError::jetstream("writing a session", e)),
                Err(_) => return Err(ClusterError::jetstream("writing a session", "no answer")),
            }
        }
        for (subject, create) in changes {
            let name = consumer_name(&claim, &subject);
            if create {
                self.create_consumer(&name, &subject).await?;
            } else {
                let _ = self.stream.delete_consumer(&name).await;
            }
            if let Some(feeder) = lock(&self.shared.feeders).get(&claim) {
                let _ = feeder.send(if create {
                    Feed::Add(name, subject)
                } else {
                    Feed::Remove(name)
                });
            }
        }
        Ok(())
    }

    async fn create_consumer(&self, name: &str, subject: &str) -> Result<(), ClusterError> {
        create_consumer(&self.cluster, &self.stream, name, subject)
            .await
            .map(|_| ())
    }

    /// Removes the session with its consumers (and the messages only they kept).
    async fn drop_session(&mut self, key: &SessionKey) -> Result<(), ClusterError> {
        let claim = claim_key(key);
        // What it held goes with its consumers: nothing to acknowledge any more.
        let held = lock(&self.shared.held).remove(&claim).unwrap_or_default();
        {
            let mut acks = lock(&self.shared.acks);
            for (id, _) in held.values() {
                acks.remove(id);
            }
        }
        self.shared.forget_acked(&claim, None);
        self.records.remove(&claim);
        // As for a change (`Writer::change`), the claim decides: a session claimed on
        // another node since is not this node's to end, and a clean start here, which
        // claimed it first, ends it whoever wrote the record last.
        if self.claims.lost_claim(&claim) {
            tracing::debug!(claim = %claim, "session held by another node now; not removed");
            return Ok(());
        }
        // The record goes first, at the revision read (compare-and-set), then its
        // consumers: a node that claimed the session after this one and wrote the record
        // meanwhile keeps it, and the consumers it needs. (Deleted after the consumers,
        // unconditionally, a record rewritten while they were being deleted went too.)
        for _ in 0..3 {
            let Some((revision, record)) = read(&self.store, &claim).await? else {
                return Ok(());
            };
            if record.run != self.cluster.run && !self.claims.holds(&claim).await? {
                tracing::debug!(claim = %claim, "session held by another node now; not removed");
                return Ok(());
            }
            if !remove_record(&self.store, &claim, revision).await? {
                // Rewritten since it was read: whose it is now is decided again.
                continue;
            }
            for subject in needed_subjects(&record.subscriptions) {
                let _ = self
                    .stream
                    .delete_consumer(&consumer_name(&claim, &subject))
                    .await;
            }
            return Ok(());
        }
        Err(ClusterError::jetstream(
            "removing a session",
            "its record kept changing",
        ))
    }
}

/// The connection ended with a pull request open: what it brings goes back to JetStream at
/// once (negative acknowledgement), for whichever node the device turns to, rather than
/// after the acknowledgement wait. That is what is already here, and what JetStream sends
/// for the request until it expires ([`PULL_WAIT`]): the request stays open at the server
/// after the connection ended, and a message published after the device moved to another
/// node may be sent to it rather than to the new node's request. Read to its end here (by
/// a task of its own, so the stop does not wait), it is handed on at once; dropped, it
/// would reach the other node only after the acknowledgement wait.
async fn give_back(mut batch: consumer::pull::Batch) {
    let drain = async {
        while let Some(next) = batch.next().await {
            if let Ok(m) = next {
                let _ = m.ack_with(AckKind::Nak(None)).await;
            }
        }
    };
    let _ = tokio::time::timeout(PULL_WAIT + STEP_TIMEOUT, drain).await;
}

/// Pulls one online session's consumers.
#[derive(Clone)]
struct Feeder {
    cluster: Cluster,
    broker: Arc<Broker>,
    session: SessionRef,
    claim: String,
    shared: Arc<Shared>,
    store: Arc<SessionStore>,
}

impl Feeder {
    async fn pull(self, name: String, subject: String, stop: CancellationToken) {
        while !stop.is_cancelled() {
            if let Err(e) = self.pull_once(&name, &subject, &stop).await {
                tracing::debug!(consumer = %name, error = %e, "session consumer failed; retrying");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Pulls the consumer `name` while `stop` is not cancelled, no more at a time than the
    /// session's queue has room for.
    ///
    /// Why bounded: JetStream's acknowledgement wait runs from the moment a message is
    /// sent. Pulled in bulk (a client-side buffer of hundreds) ahead of a slow device,
    /// messages waited here unqueued past the wait, JetStream sent them again, and each
    /// copy, arriving after its original had been delivered and acknowledged, was queued a
    /// second time. Pulled by the room in the queue, what arrives is queued at once; a
    /// queued message is held, and a copy of a held message is answered with progress
    /// (which restarts the wait) rather than queued ([`Feeder::take`]). What still comes
    /// twice (a copy crossing its acknowledgement) is caught by [`Acked`].
    async fn pull_once(
        &self,
        name: &str,
        subject: &str,
        stop: &CancellationToken,
    ) -> Result<(), ClusterError> {
        let stream = self
            .cluster
            .js
            .get_stream(self.cluster.names.messages_stream())
            .await
            .map_err(|e| ClusterError::jetstream("opening the message stream", e))?;
        let consumer: consumer::PullConsumer = match stream.get_consumer(name).await {
            Ok(c) => c,
            Err(e) if no_such_consumer(e.as_ref()) => {
                match self.create_missing(&stream, name, subject).await? {
                    Some(c) => c,
                    None => return Ok(()),
                }
            }
            Err(e) => {
                return Err(ClusterError::jetstream(
                    format!("opening consumer {name}"),
                    e,
                ))
            }
        };
        loop {
            let room = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                room = self.room() => room,
            };
            self.read_floor(&consumer, name).await;
            let mut batch = consumer
                .batch()
                .max_messages(room.min(MAX_BATCH))
                .expires(PULL_WAIT)
                .messages()
                .await
                .map_err(|e| ClusterError::jetstream(format!("reading consumer {name}"), e))?;
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => {
                        tokio::spawn(give_back(batch));
                        return Ok(());
                    }
                    next = batch.next() => next,
                };
                let Some(m) = next else { break };
                let m = m.map_err(|e| ClusterError::jetstream(format!("consumer {name}"), e))?;
                self.take(name, m, stop).await;
            }
        }
    }

    /// The consumer `name` of a subject the session's subscriptions need does not exist:
    /// the SUBSCRIBE that recorded the subscription could not create it (the connection
    /// then ended unacknowledged, and the session kept the subscription), or it was lost
    /// since. Pulled as it was, it failed forever and nothing published for the
    /// subscription arrived; it is created here instead, from now on (what was published
    /// while it was missing was kept for nobody). None: not created, no subscription needs
    /// it any more (an UNSUBSCRIBE meanwhile; the feeder is told to stop pulling it).
    ///
    /// Checked again once created: an UNSUBSCRIBE whose deletion of the consumer came
    /// before this creation leaves it needed by nobody, and it is deleted again, lest it
    /// keep messages for nobody until the session ends.
    async fn create_missing(
        &self,
        stream: &jetstream::stream::Stream,
        name: &str,
        subject: &str,
    ) -> Result<Option<consumer::PullConsumer>, ClusterError> {
        if !session_subjects(&self.broker, &self.session).contains(subject) {
            return Ok(None);
        }
        let created = create_consumer(&self.cluster, stream, name, subject).await?;
        if !session_subjects(&self.broker, &self.session).contains(subject) {
            let _ = stream.delete_consumer(name).await;
            return Ok(None);
        }
        tracing::info!(device = %self.session.key.device, client_id = %self.session.key.client_id, consumer = %name, "the consumer of a stored subscription was missing; created again");
        Ok(Some(created))
    }

    /// Waits until the session's queue has room; returns how much.
    async fn room(&self) -> usize {
        loop {
            let woken = self.session.room();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let free = self.session.free_room();
            if free > 0 {
                return free;
            }
            tokio::select! {
                // A paced publisher may wait for the same room: it is told too.
                _ = woken => self.session.pass_room(),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Reads the consumer's ack floor once enough acknowledgements above the last one read
    /// are kept, and forgets those it covers.
    async fn read_floor(&self, consumer: &consumer::PullConsumer, name: &str) {
        let wants = lock(&self.shared.acked)
            .get(&self.claim)
            .and_then(|s| s.get(name))
            .is_some_and(Acked::wants_floor);
        if !wants {
            return;
        }
        match tokio::time::timeout(STEP_TIMEOUT, consumer.get_info()).await {
            Ok(Ok(info)) => {
                if let Some(a) = lock(&self.shared.acked)
                    .get_mut(&self.claim)
                    .and_then(|s| s.get_mut(name))
                {
                    a.set_floor(info.ack_floor.stream_sequence);
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(consumer = %name, error = %e, "ack floor not read; next time")
            }
            Err(_) => tracing::debug!(consumer = %name, "ack floor not read in time; next time"),
        }
    }

    /// Queues one pulled message for the session, or gives it back.
    async fn take(&self, name: &str, m: jetstream::Message, stop: &CancellationToken) {
        let Ok(seq) = m.info().map(|i| i.stream_sequence) else {
            let _ = m.ack().await;
            return;
        };
        let env = route::open(
            self.cluster.names.prefix(),
            m.subject.as_str(),
            m.headers.as_ref(),
            m.payload.clone(),
        );
        let Some(env) = env else {
            let _ = m.ack().await;
            return;
        };
        let id = self.store.next_id();
        // Looked up and taken under one lock: of two copies arriving at once (two
        // overlapping consumers), one is queued.
        let seen = {
            let mut held = lock(&self.shared.held);
            let session = held.entry(self.claim.clone()).or_default();
            match session.get(&seq) {
                Some((_, by)) => Some(by == name),
                None if self.shared.was_acked(&self.claim, name, seq) => Some(false),
                None => {
                    session.insert(seq, (id, name.to_owned()));
                    None
                }
            }
        };
        match seen {
            // Our own copy came again after the acknowledgement wait while the original
            // is still in the queue: it stays there, and JetStream waits again.
            Some(true) => {
                let _ = m.ack_with(AckKind::Progress).await;
                return;
            }
            // Another consumer's copy of a message held, or a copy of one acknowledged
            // already: not needed.
            Some(false) => {
                self.shared.note_acked(&self.claim, name, seq);
                let _ = m.ack().await;
                return;
            }
            None => {}
        }
        let own = env.device.as_ref() == Some(&self.session.key.device)
            && env.client_id.as_deref() == Some(self.session.key.client_id.as_str());
        lock(&self.shared.acks).insert(
            id,
            Held {
                claim: self.claim.clone(),
                consumer: name.to_owned(),
                seq,
                msg: m,
            },
        );
        let outcome = self
            .broker
            .deliver_fed(&self.session, Arc::new(env.msg), own, id, stop)
            .await;
        if outcome == FedOutcome::Queued {
            return;
        }
        let held = lock(&self.shared.acks).remove(&id);
        if let Some(m) = lock(&self.shared.held).get_mut(&self.claim) {
            m.remove(&seq);
        }
        let Some(h) = held else { return };
        let kind = match outcome {
            FedOutcome::Queued | FedOutcome::NotFor => AckKind::Ack,
            FedOutcome::Later => AckKind::Nak(Some(RETRY_DELAY)),
            FedOutcome::Gone => AckKind::Nak(None),
        };
        let _ = h.msg.ack_with(kind).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscription_survives_its_record() {
        let opts = SubOptions {
            qos: QoS::ExactlyOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: RetainHandling::SendIfNew,
            subscription_id: Some(7),
        };
        let sub = Sub::new("a/+/c", &opts, true);
        let json = serde_json::to_string(&sub).unwrap();
        let back: Sub = serde_json::from_str(&json).unwrap();
        assert_eq!(back, sub);
        assert_eq!(back.options(), opts);
        assert!(back.aliased);
    }

    #[test]
    fn only_stored_plain_subscriptions_have_consumers() {
        let at = SubOptions::with_qos;
        assert_eq!(
            Sub::new("a/#", &at(QoS::AtLeastOnce), false).stored_subjects(),
            vec!["a".to_owned(), "a.>".to_owned()]
        );
        assert!(Sub::new("a/#", &at(QoS::AtMostOnce), false)
            .stored_subjects()
            .is_empty());
        assert!(Sub::new("$share/g/a/#", &at(QoS::AtLeastOnce), false)
            .stored_subjects()
            .is_empty());
    }

    #[test]
    fn a_shared_subject_keeps_its_consumer_while_a_subscription_needs_it() {
        let at = SubOptions::with_qos;
        let wide = Sub::new("a/#", &at(QoS::AtLeastOnce), false);
        let narrow = Sub::new("a", &at(QoS::ExactlyOnce), false);
        let before = needed_subjects(&[wide.clone(), narrow.clone()]);
        // Unsubscribing `a`: `a/#` still needs `a`; nothing is deleted.
        assert!(consumer_changes(&before, std::slice::from_ref(&wide), Vec::new()).is_empty());
        // `a` at QoS 0 instead: same.
        let zero = Sub::new("a", &at(QoS::AtMostOnce), false);
        assert!(consumer_changes(&before, &[wide.clone(), zero.clone()], Vec::new()).is_empty());
        // Unsubscribing `a/#` then: only `a.>` goes.
        assert_eq!(
            consumer_changes(&before, std::slice::from_ref(&narrow), Vec::new()),
            vec![("a.>".to_owned(), false)]
        );
        // The last one: `a` goes too.
        let only = needed_subjects(std::slice::from_ref(&narrow));
        assert_eq!(
            consumer_changes(&only, &[zero], Vec::new()),
            vec![("a".to_owned(), false)]
        );
    }

    #[test]
    fn what_a_session_acknowledged_is_known_until_the_floor_covers_it() {
        let shared = Shared::default();
        shared.note_acked("s", "c1", 5);
        shared.note_acked("s", "c1", 7);
        assert!(shared.was_acked("s", "c1", 5));
        // A copy of the same message through an overlapping consumer.
        assert!(shared.was_acked("s", "c2", 7));
        // Never acknowledged here (e.g. pulled by a node that died since): delivered.
        assert!(!shared.was_acked("s", "c1", 6));
        assert!(!shared.was_acked("other", "c1", 5));

        let mut acked = Acked::default();
        for seq in [5, 7, 9] {
            acked.note(seq);
        }
        acked.set_floor(7);
        assert_eq!(acked.above.iter().copied().collect::<Vec<_>>(), vec![9]);
        acked.note(3); // at or below the floor: the floor says it already
        assert_eq!(acked.above.len(), 1);
        // A floor read earlier than the one kept does not take it back.
        acked.set_floor(2);
        assert_eq!(acked.floor, 7);
    }

    #[test]
    fn acknowledgements_kept_above_the_floor_are_bounded() {
        let mut acked = Acked::default();
        for seq in 1..ACKED_PRUNE as u64 {
            acked.note(seq);
        }
        assert!(!acked.wants_floor());
        acked.note(ACKED_PRUNE as u64);
        assert!(acked.wants_floor());
        // One message holds the floor down: read again only once twice as many are kept.
        acked.set_floor(0);
        assert!(!acked.wants_floor());
        for seq in 0..(ACKED_KEPT as u64 * 2) {
            acked.note(1000 + seq);
        }
        assert_eq!(acked.above.len(), ACKED_KEPT);
        assert_eq!(acked.above.first(), Some(&(1000 + ACKED_KEPT as u64)));
        assert!(acked.wants_floor());
    }

    #[test]
    fn consumer_names_are_stable_and_distinct() {
        let a = consumer_name("k1", "a.>");
        assert_eq!(a, consumer_name("k1", "a.>"));
        assert_ne!(a, consumer_name("k1", "a"));
        assert_ne!(a, consumer_name("k2", "a.>"));
        assert!(a.starts_with("ps-") && a.len() == 3 + 24, "{a}");
    }
}
