//! The MQTT broker core: sessions, routing, retained messages, wills.
//!
//! - [`conn`]: one connection after CONNACK: its loop (keep alive, QoS flows, delivery),
//!   with `conn::publish` and `conn::subscribe` for the inbound packets, and
//!   [`conn::connect`]: CONNECT -> CONNACK codes, client identifier rules (contract §3, 4).
//! - [`session`]: one session's queue and in-flight state (the durability interface).
//! - [`router`]: the subscription table; [`retain`]: retained messages and their owners;
//!   `retained`: the per-device retained quota and the paced retained backlog checks.
//! - [`expiry`]: `max_session_expiry` and the timers that end offline sessions.
//! - [`wire`]: protocol-neutral packets, so the logic is written once for 3.1.1 and 5.
//!
//! Data flow of a PUBLISH: session -> ACL -> [`Broker::publish`] -> router -> each
//! subscriber's bounded queue ([`session::Session::deliver`]; a full queue of a connected
//! subscriber hands the delivery back and the publisher stops reading until it has room)
//! -> that subscriber's connection wakes and writes.
//!
//! Locks: the router and the sessions table are std Mutexes, held for in-memory work
//! only, never across an await. Order: router, then a session's own lock; the sessions
//! table is never held while taking the router.

pub mod conn;
pub mod expiry;
pub mod journal;
pub mod message;
pub mod remote;
pub mod retain;
mod retained;
pub mod router;
pub mod session;
mod trie;
mod wills;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::acl::DeviceAcl;
use crate::identity::DeviceName;
use crate::metrics::Metrics;
use crate::mqtt::codec::{self, CodecError, Packet, QoS};
use crate::mqtt::topic::{Subscription, TopicFilter, TopicName};
use journal::{Journal, Op, Recovered, StoredSession};
use message::Message;
use retain::Owned;
use router::{Router, SubOptions};
use session::{Delivery, Enqueued, Expiry, Session, SessionKey, SessionRef};

/// Why writing to a client failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot encode the packet")]
    Encode(#[source] CodecError),
    #[error("writing to the client failed")]
    Io(#[source] std::io::Error),
    /// contract §9: a client that does not read cannot hold a task forever.
    #[error("the client did not read for {0:?}")]
    Timeout(Duration),
}

/// Writes one packet and flushes, bounded by `limit` (used before the session starts).
pub async fn send<W: AsyncWrite + Unpin>(
    out: &mut W,
    packet: &Packet,
    limit: Duration,
) -> Result<(), WriteError> {
    let mut buf = BytesMut::with_capacity(64);
    codec::encode(packet, &mut buf).map_err(WriteError::Encode)?;
    let write = async {
        out.write_all(&buf).await?;
        out.flush().await
    };
    match tokio::time::timeout(limit, write).await {
        Ok(r) => r.map_err(WriteError::Io),
        Err(_) => Err(WriteError::Timeout(limit)),
    }
}

/// A will message waiting for its connection to end (contract §6).
#[derive(Clone)]
pub struct Will {
    pub message: Message,
    /// MQTT 5 Will Delay Interval, seconds.
    pub delay: u32,
    /// Asked when a will fires (after its delay, or as its connection ends) whether its
    /// device may still publish it (contract §4: dropped if the device is disabled, deleted
    /// or revoked, or the topic is no longer allowed); Err carries the reason for the log.
    /// Blocking: it reads the registry and validates the chain. None: no check beyond the
    /// session's ACL (tests).
    pub gate: Option<WillGate>,
    /// The certificate the connection was admitted with: cluster mode records it with the
    /// will, for the node that publishes it should this one die. None: tests.
    pub presenter: Option<remote::WillPresenter>,
    /// This connection's will among the session's, given by [`Broker::hold_will`] (0: not
    /// held yet). Only the broker sets it.
    ticket: u64,
}

impl Will {
    /// A will as CONNECT carries it: no gate, no presenter, not held yet.
    pub fn new(message: Message, delay: u32) -> Will {
        Will {
            message,
            delay,
            gate: None,
            presenter: None,
            ticket: 0,
        }
    }

    /// See `Will::ticket`.
    pub fn ticket(&self) -> u64 {
        self.ticket
    }
}

/// See [`Will::gate`].
pub type WillGate = Arc<dyn Fn(&Message) -> Result<(), String> + Send + Sync>;

impl std::fmt::Debug for Will {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Will")
            .field("message", &self.message)
            .field("delay", &self.delay)
            .field("gate", &self.gate.is_some())
            .field("presenter", &self.presenter.is_some())
            .field("ticket", &self.ticket)
            .finish()
    }
}

/// The sessions table, with the number of persistent sessions each device holds
/// (`max_sessions_per_device`, contract §4) kept with it so the quota costs no scan.
#[derive(Debug, Default)]
struct Sessions {
    map: HashMap<SessionKey, SessionRef>,
    persistent: HashMap<DeviceName, usize>,
}

impl Sessions {
    fn get(&self, key: &SessionKey) -> Option<&SessionRef> {
        self.map.get(key)
    }

    fn insert(&mut self, session: SessionRef) -> Option<SessionRef> {
        if session.journal().is_some() {
            *self
                .persistent
                .entry(session.key.device.clone())
                .or_default() += 1;
        }
        let old = self.map.insert(session.key.clone(), session);
        if let Some(old) = &old {
            self.uncount(old);
        }
        old
    }

    fn remove(&mut self, key: &SessionKey) -> Option<SessionRef> {
        let old = self.map.remove(key);
        if let Some(old) = &old {
            self.uncount(old);
        }
        old
    }

    fn uncount(&mut self, session: &SessionRef) {
        if session.journal().is_none() {
            return;
        }
        if let Some(n) = self.persistent.get_mut(&session.key.device) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.persistent.remove(&session.key.device);
            }
        }
    }

    /// Persistent sessions of `device`, not counting the one under `key` (it is replaced
    /// or resumed, never added).
    fn persistent_besides(&self, key: &SessionKey) -> usize {
        let held = self.persistent.get(&key.device).copied().unwrap_or(0);
        let own = self.map.get(key).is_some_and(|s| s.journal().is_some());
        held - usize::from(own && held > 0)
    }

    fn of_device(&self, device: &DeviceName) -> Vec<SessionRef> {
        self.map
            .values()
            .filter(|s| s.key.device == *device)
            .cloned()
            .collect()
    }
}

/// Why [`Broker::open_session`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenRefused {
    /// contract §4: one more persistent session than `max_sessions_per_device`.
    #[error("quota exceeded: the device already holds {max} persistent sessions (max_sessions_per_device)")]
    Quota { max: usize },
}

/// The state shared by every session of the broker.
#[derive(Debug)]
pub struct Broker {
    /// Sessions by (device, client id). Held only to look up, insert or remove.
    sessions: Mutex<Sessions>,
    /// Read for every PUBLISH (shared-group cursors are atomics); written by SUBSCRIBE.
    router: RwLock<Router<SessionRef>>,
    /// Read on every SUBSCRIBE, written on retained PUBLISH; with each topic's owner for
    /// `max_retained_per_device` (contract §4).
    retained: RwLock<Owned<Arc<Message>>>,
    pub metrics: Arc<Metrics>,
    next_connection: AtomicU64,
    /// The message store; None only for brokers built without durability (unit tests).
    journal: Option<Journal>,
    /// `[limits] stall_timeout`, seconds (contract §9).
    stall_timeout: AtomicU64,
    /// Cluster mode: the other nodes (set once, before anything is accepted).
    remote: std::sync::OnceLock<Arc<dyn remote::Remote>>,
    /// Cluster mode: where wills are kept for the other nodes (set once, before anything
    /// is accepted).
    wills: std::sync::OnceLock<Arc<dyn remote::WillKeeper>>,
    /// The next [`Will::ticket`](field@Will::ticket).
    next_will: AtomicU64,
    /// Bumped under the router's write lock by every change to it, so that a publisher's
    /// [`RouteCache`] knows when its routing decision is out of date.
    router_generation: AtomicU64,
}

/// A publisher's last routing decision: the topic, the router generation it was made
/// under, and its targets (None: a shared group matched, so each message is routed anew).
/// A device publishes on one topic, message after message: while nobody subscribes or
/// unsubscribes, the walk of the subscription trie (its allocations, its hashing of every
/// level, the router's lock) is done once, not per message. Boxed: an idle connection that
/// never publishes pays one word for it. The sessions it names stay allocated until the
/// publisher's next message replaces it, nothing more (a message only reaches a session
/// through the current router's decision).
#[derive(Debug, Default)]
pub struct RouteCache(Option<Box<CachedRoute>>);

#[derive(Debug)]
struct CachedRoute {
    generation: u64,
    topic: TopicName,
    targets: Option<Vec<router::Target<SessionRef>>>,
}

/// The router's write guard; see [`Broker::router_mut`].
struct RouterGuard<'a> {
    guard: std::sync::RwLockWriteGuard<'a, Router<SessionRef>>,
    remote: Option<&'a Arc<dyn remote::Remote>>,
    /// `Broker::router_generation`.
    generation: &'a AtomicU64,
}

impl std::ops::Deref for RouterGuard<'_> {
    type Target = Router<SessionRef>;
    fn deref(&self) -> &Router<SessionRef> {
        &self.guard
    }
}

impl std::ops::DerefMut for RouterGuard<'_> {
    fn deref_mut(&mut self) -> &mut Router<SessionRef> {
        &mut self.guard
    }
}

impl Drop for RouterGuard<'_> {
    fn drop(&mut self) {
        // Still under the write lock (the guard field drops after this): a reader that
        // holds the read lock sees the generation of the table it reads.
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Some(remote) = self.remote {
            for (sub, added) in self.guard.take_interest_changes() {
                remote.interest(&sub, added);
            }
        }
    }
}

/// What [`Broker::deliver_fed`] did with a message pulled for a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FedOutcome {
    /// In the session's queue: acknowledged to JetStream when the device acknowledges it.
    Queued,
    /// Not for this session (no matching subscription any more, No Local, the ACL):
    /// acknowledge it.
    NotFor,
    /// The session could not take it now (full and stalled): give it back for later.
    Later,
    /// The session is gone from this node or its connection ended: give it back now.
    Gone,
}

/// What [`Broker::publish`] did.
#[derive(Debug, Default)]
pub struct Published {
    /// Sessions the message was queued for.
    pub queued: usize,
    /// Whether it was submitted to the store (persistent subscribers or retained): the
    /// publisher is acknowledged only after [`Journal::barrier`] (contract §7).
    pub durable: bool,
    /// Sessions that could not take it (a full queue of QoS 1/2 messages): counted and
    /// logged; an MQTT 5 publisher whose message no session took gets 0x97 (contract §7).
    pub refused: usize,
    /// An online subscriber's queue is more than half full: the publisher's task should
    /// yield its thread so that the subscriber's task gets to run. Never a wait: a slow
    /// subscriber does not block publishers (contract §9), it only stops being starved.
    pub congested: bool,
    /// Deliveries to connected sessions whose queue is full (contract §9 flow control): the
    /// publisher offers each again ([`Broker::offer`]) once its session has room, and reads
    /// nothing more until then.
    pub waiting: Vec<(SessionRef, Delivery)>,
    /// A retained message over its device's `max_retained_per_device`: not retained, not
    /// routed (counted and logged); an MQTT 5 QoS 1/2 publisher gets 0x97 (contract §4).
    pub retained_refused: bool,
    /// Cluster mode: completes once the message is stored for the other nodes; the
    /// publisher's acknowledgement waits for it too.
    pub remote: Option<remote::Stored>,
}

/// What a CONNECT asks of its session.
pub struct SessionRequest {
    pub key: SessionKey,
    pub clean_start: bool,
    pub expiry: Expiry,
    /// The device's ACL, also used for deliveries (`can_receive`).
    pub acl: Arc<DeviceAcl>,
    /// `max_queued_messages`.
    pub max_queued: usize,
    /// `max_sessions_per_device`.
    pub max_sessions: usize,
}

/// What [`Broker::open_session`] found.
pub struct Opened {
    pub session: SessionRef,
    /// CONNACK Session Present.
    pub present: bool,
    /// This connection's attach generation (for its will delay).
    pub generation: u64,
}

impl Broker {
    pub fn new(metrics: Arc<Metrics>, journal: Option<Journal>) -> Arc<Broker> {
        Arc::new(Broker {
            sessions: Mutex::new(Sessions::default()),
            router: RwLock::new(Router::new()),
            retained: RwLock::new(Owned::new(
                crate::config::Limits::default().max_retained_per_device,
            )),
            metrics,
            next_connection: AtomicU64::new(1),
            journal,
            stall_timeout: AtomicU64::new(crate::config::Limits::default().stall_timeout),
            remote: std::sync::OnceLock::new(),
            wills: std::sync::OnceLock::new(),
            next_will: AtomicU64::new(1),
            router_generation: AtomicU64::new(0),
        })
    }

    /// Cluster mode: whether the other nodes can take messages that must be stored now
    /// (true when standalone).
    pub fn remote_accepting(&self) -> bool {
        self.remote.get().is_none_or(|r| r.accepting())
    }

    /// Cluster mode: attaches the other nodes. From now on every accepted message is
    /// forwarded and subscription interest is reported, starting with what the router
    /// already holds (restored sessions). Only the first call has an effect.
    pub fn attach_remote(&self, remote: Arc<dyn remote::Remote>) {
        let mut router = self.router.write().unwrap_or_else(|p| p.into_inner());
        if self.remote.set(remote.clone()).is_err() {
            return;
        }
        self.router_generation.fetch_add(1, Ordering::AcqRel);
        router.track_interest();
        for (sub, added) in router.take_interest_changes() {
            remote.interest(&sub, added);
        }
    }

    /// Cluster mode: attaches the keeper of wills. Only the first call has an effect.
    pub fn attach_wills(&self, keeper: Arc<dyn remote::WillKeeper>) {
        let _ = self.wills.set(keeper);
    }

    /// The message store.
    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    /// Puts back what the store held (contract §7 recovery): sessions offline with their
    /// subscriptions, queues and in-flight state, and retained messages. `acl_for` gives
    /// each device's current ACL (deliveries to offline sessions are checked against it).
    /// Returns the sessions with an expiry deadline, for [`Broker::schedule_expiry`].
    pub fn restore(
        &self,
        recovered: Recovered,
        acl_for: impl Fn(&DeviceName) -> Arc<DeviceAcl>,
        max_queued: usize,
    ) -> Vec<(SessionRef, i64)> {
        let mut deadlines = Vec::new();
        {
            let mut retained = self.retained.write().unwrap_or_else(|p| p.into_inner());
            for r in recovered.retained {
                retained.restore(&r.msg.topic.clone(), r.msg, r.owner);
            }
        }
        for stored in recovered.sessions {
            let expiry = match stored.expiry {
                None => Expiry::Never,
                Some(s) => Expiry::from_v5(s),
            };
            let session = Session::create(
                stored.key.clone(),
                acl_for(&stored.key.device),
                expiry,
                max_queued,
                self.journal.clone(),
            );
            session.restore(stored.queue, stored.inbound);
            {
                let mut router = self.router_mut();
                for (filter, opts, aliased) in stored.subscriptions {
                    match Subscription::parse(&filter) {
                        Ok(sub) => {
                            router.subscribe(&session, &sub, opts);
                            session.set_aliased(sub.filter(), aliased);
                        }
                        Err(e) => {
                            tracing::warn!(%filter, error = %e, "stored subscription skipped")
                        }
                    }
                }
            }
            if let Some(at) = stored.expires_at {
                deadlines.push((session.clone(), at));
            }
            self.sessions().insert(session);
        }
        deadlines
    }

    /// Ends restored offline sessions at their deadline unless a connection resumes them.
    pub fn schedule_expiry(self: &Arc<Self>, deadlines: Vec<(SessionRef, i64)>) {
        let now = crate::cert::now_secs();
        for (session, at) in deadlines {
            let generation = session.generation();
            let wait = Duration::from_secs(u64::try_from(at - now).unwrap_or(0));
            self.expire_later(session, generation, wait);
        }
    }

    /// The expiry as stored (None = never).
    fn stored_expiry(expiry: Expiry) -> Option<u32> {
        match expiry {
            Expiry::Never => None,
            Expiry::After(s) => Some(s),
            Expiry::OnDisconnect => Some(0),
        }
    }

    fn sessions(&self) -> MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The router for writing. When the guard drops, filters that gained their first or
    /// lost their last subscriber are reported to the remote side (cluster mode), in the
    /// order they changed, still under the lock.
    fn router_mut(&self) -> RouterGuard<'_> {
        RouterGuard {
            guard: self.router.write().unwrap_or_else(|p| p.into_inner()),
            remote: self.remote.get(),
            generation: &self.router_generation,
        }
    }

    /// A process-unique connection id.
    pub fn connection_id(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether opening a session under `key` would stay within `max_sessions` persistent
    /// sessions of its device (contract §4): asked before CONNECT commits anything, so that a
    /// refusal writes nothing; [`Broker::open_session`] enforces it again.
    pub fn may_open(
        &self,
        key: &SessionKey,
        clean_start: bool,
        persistent: bool,
        max: usize,
    ) -> bool {
        if !persistent || self.journal.is_none() {
            return true;
        }
        let sessions = self.sessions();
        let resumed = !clean_start && sessions.get(key).is_some_and(|s| s.journal().is_some());
        resumed || sessions.persistent_besides(key) < max
    }

    /// contract §4: finds or creates the session (device, client id) and attaches the
    /// connection; a connection already holding it is told to close (takeover). Clean
    /// start discards any previous state. A resumed session gets the connection's ACL:
    /// subscriptions it no longer allows are removed and queued messages it may no longer
    /// receive are discarded. A new persistent session beyond the device's quota is refused.
    pub fn open_session(
        &self,
        req: SessionRequest,
        conn_id: u64,
        kick: CancellationToken,
    ) -> Result<Opened, OpenRefused> {
        let SessionRequest {
            key,
            clean_start,
            expiry,
            acl,
            max_queued,
            max_sessions,
        } = req;
        let persistent = expiry != Expiry::OnDisconnect && self.journal.is_some();
        let (session, present, discarded) = {
            let mut sessions = self.sessions();
            match sessions.get(&key).cloned() {
                // A session is resumed as it is; one kept in memory only cannot become
                // persistent in place (it was never written), so it starts over.
                Some(existing) if !clean_start && (existing.journal().is_some() || !persistent) => {
                    (existing, true, None)
                }
                existing => {
                    if persistent && sessions.persistent_besides(&key) >= max_sessions {
                        return Err(OpenRefused::Quota { max: max_sessions });
                    }
                    let store = if persistent {
                        self.journal.clone()
                    } else {
                        None
                    };
                    let fresh =
                        Session::create(key.clone(), acl.clone(), expiry, max_queued, store);
                    sessions.insert(fresh.clone());
                    (fresh, false, existing)
                }
            }
        };
        if let Some(old) = discarded {
            // Take over its connection and forget its subscriptions and stored state.
            if let Some(k) = old.kick_out() {
                k.cancel();
            }
            self.router_mut().remove_all(&old);
            if let Some(journal) = old.journal() {
                journal.submit(Op::DropSession { key: key.clone() });
            }
        }
        if present {
            self.apply_acl(&session, acl);
        } else {
            session.set_acl(acl);
        }
        session.set_expiry(expiry);
        if let Some(journal) = session.journal() {
            journal.submit(Op::Session {
                key,
                expiry: Self::stored_expiry(expiry),
                expires_at: None,
            });
        }
        let (previous, generation) = session.attach(conn_id, kick);
        if let Some(previous) = previous {
            previous.cancel();
        }
        Ok(Opened {
            session,
            present,
            generation,
        })
    }

    /// Whether `session` is still the one registered under its key (not ended, replaced or
    /// forgotten with its device).
    pub fn is_current(&self, session: &SessionRef) -> bool {
        self.sessions()
            .get(&session.key)
            .is_some_and(|s| s == session)
    }

    /// Forgets every session of `device`, in memory and in the store: subscriptions,
    /// queued and in-flight messages, and (through [`Broker::is_current`]) pending wills.
    /// For a device whose registry entry is gone (contract §4): a device created later under
    /// the same name starts empty. Connections still holding one are revoked by the caller.
    pub fn forget_device(&self, device: &DeviceName) -> usize {
        let sessions = self.sessions().of_device(device);
        for s in &sessions {
            self.end_session(s);
        }
        if !sessions.is_empty() {
            tracing::info!(device = ?device, sessions = sessions.len(), "sessions forgotten: the device's registry entry is gone");
        }
        sessions.len()
    }

    /// Applies the current decision to every session held for a device that is not
    /// connected now (contract §4: on restore, reload and registry changes). `verdict` is asked
    /// once per device: Ok gives the ACL (disallowed subscriptions removed, messages it may
    /// no longer receive discarded); an Err whose entry is gone forgets the device's
    /// sessions (connected ones too: their connection is revoked by the caller); any other
    /// Err (disabled, rule removed) leaves them as they are, since the device cannot
    /// connect to use them and CONNECT decides again if it ever does.
    /// `only` limits it to one device's sessions.
    pub fn reauthorize(
        &self,
        only: Option<&DeviceName>,
        verdict: impl Fn(&DeviceName) -> Result<Arc<DeviceAcl>, crate::auth::Revoked>,
    ) -> usize {
        let all: Vec<SessionRef> = match only {
            Some(device) => self.sessions().of_device(device),
            None => self.sessions().map.values().cloned().collect(),
        };
        let mut by_device: HashMap<DeviceName, Vec<SessionRef>> = HashMap::new();
        for s in all {
            by_device.entry(s.key.device.clone()).or_default().push(s);
        }
        let mut forgotten = 0;
        for (device, sessions) in by_device {
            match verdict(&device) {
                Ok(acl) => {
                    for s in sessions.iter().filter(|s| !s.online()) {
                        self.apply_acl(s, acl.clone());
                    }
                }
                Err(revoked) if revoked.entry_gone() => {
                    tracing::info!(device = ?device, reason = ?revoked.to_string(), "forgetting the device's sessions");
                    forgotten += self.forget_device(&device);
                }
                Err(_) => {}
            }
        }
        forgotten
    }

    /// The connection `conn_id` ended: detach it and end the session when its expiry says
    /// so (now, or after the interval unless a connection resumes it).
    pub fn close_session(self: &Arc<Self>, session: &SessionRef, conn_id: u64) {
        let Some(generation) = session.detach(conn_id) else {
            return; // taken over: the new connection owns the session
        };
        if !self.is_current(session) {
            // Forgotten with its device while connected: nothing of it may be written back.
            self.router_mut().remove_all(session);
            return;
        }
        match session.expiry() {
            Expiry::OnDisconnect => self.end_session(session),
            Expiry::Never => {}
            Expiry::After(secs) => {
                if let Some(journal) = session.journal() {
                    journal.submit(Op::Session {
                        key: session.key.clone(),
                        expiry: Some(secs),
                        expires_at: Some(crate::cert::now_secs() + i64::from(secs)),
                    });
                }
                self.expire_later(
                    session.clone(),
                    generation,
                    Duration::from_secs(u64::from(secs)),
                );
            }
        }
    }

    /// Whether a session with this key exists here (connected or not).
    pub fn has_session(&self, key: &SessionKey) -> bool {
        self.sessions().get(key).is_some()
    }

    /// Cluster mode: the session was claimed by a connection on another node. Ends the
    /// connection holding it here (as a takeover: MQTT 5 DISCONNECT 0x8E); true if one did.
    pub fn kick(&self, key: &SessionKey) -> bool {
        let session = self.sessions().get(key).cloned();
        match session.and_then(|s| s.attached_token()) {
            Some(token) => {
                token.cancel();
                true
            }
            None => false,
        }
    }

    /// Removes a session and its subscriptions, if it is still the one registered.
    fn end_session(&self, session: &SessionRef) {
        let mut current = false;
        {
            let mut sessions = self.sessions();
            if sessions.get(&session.key).is_some_and(|s| s == session) {
                sessions.remove(&session.key);
                current = true;
            }
        }
        self.router_mut().remove_all(session);
        if let (true, Some(journal)) = (current, session.journal()) {
            journal.submit(Op::DropSession {
                key: session.key.clone(),
            });
        }
    }

    /// Routes a message to every matching subscription and updates the retained store.
    /// Never blocks: each subscriber's queue is bounded; what a full queue cannot take is
    /// handed back (`pace`) or dropped and counted by policy.
    ///
    /// `pace`: the publisher can wait (contract §9 flow control). Deliveries to connected
    /// sessions whose queue is full come back in [`Published::waiting`], for the publisher to
    /// [`Broker::offer`] again when they have room, before it reads its next message.
    pub fn publish(
        &self,
        msg: Arc<Message>,
        publisher: Option<&SessionRef>,
        pace: bool,
    ) -> Published {
        let owner = publisher.map(|p| &p.key.device);
        self.publish_owned(msg, owner, publisher, pace, None)
    }

    /// [`Broker::publish`] for a connected client, paced, reusing its last routing
    /// decision while it still holds (see [`RouteCache`]).
    pub fn publish_cached(
        &self,
        msg: Arc<Message>,
        publisher: &SessionRef,
        cache: &mut RouteCache,
    ) -> Published {
        let owner = Some(&publisher.key.device);
        self.publish_owned(msg, owner, Some(publisher), true, Some(cache))
    }

    /// Cluster mode: the will of a session `device` held on a node that died, published by
    /// this node for it (docs/cluster.md, "Wills of a node that dies") once the caller
    /// decided the device's standing again. Routed and forwarded as any accepted message; a
    /// retained will counts against the device's retained quota. Nobody waits for it.
    pub fn publish_orphan_will(&self, device: &DeviceName, msg: Arc<Message>) -> Published {
        self.publish_owned(msg, Some(device), None, false, None)
    }

    /// [`Broker::publish`] of a message whose retained copy, if any, counts against
    /// `owner`'s quota.
    fn publish_owned(
        &self,
        msg: Arc<Message>,
        owner: Option<&DeviceName>,
        publisher: Option<&SessionRef>,
        pace: bool,
        cache: Option<&mut RouteCache>,
    ) -> Published {
        self.metrics.messages_received.inc();
        let mut durable = false;
        if msg.retain {
            match self.keep_retained(&msg, owner, publisher) {
                Ok(stored) => durable = stored,
                // contract §4: over the device's quota it is neither retained nor routed.
                Err(_) => {
                    return Published {
                        retained_refused: true,
                        ..Published::default()
                    }
                }
            }
        }
        let mut out = match cache {
            Some(cache) if self.remote.get().is_none() => {
                self.route_cached(&msg, publisher, pace, cache)
            }
            _ => self.route_local(&msg, publisher, pace),
        };
        out.durable |= durable;
        if let Some(remote) = self.remote.get() {
            let client_id = publisher.map(|p| p.key.client_id.as_str());
            out.remote = remote.forward(&msg, owner, client_id);
        }
        out
    }

    /// Cluster mode: a message another node accepted, for this node's sessions only (it
    /// is not forwarded again, and the retained store learns of it separately, through
    /// [`Broker::retain_remote`]). `pace`: as for [`Broker::publish`]. `origin`: the
    /// session (device, client id) of the connection that published it: a session here
    /// under the same key (the client moved to this node since) is its publisher for No
    /// Local, as it would be on one node.
    pub fn publish_remote(
        &self,
        msg: Arc<Message>,
        origin: Option<&SessionKey>,
        pace: bool,
    ) -> Published {
        self.metrics.messages_received.inc();
        let publisher = origin.and_then(|key| self.sessions().get(key).cloned());
        self.route_local(&msg, publisher.as_ref(), pace)
    }

    /// Cluster mode: the retained message (or, with an empty payload, the clearing) of a
    /// topic as another node accepted it; `owner` is the device whose quota it counts
    /// against (checked by that node).
    pub fn retain_remote(&self, msg: Arc<Message>, owner: Option<&DeviceName>) {
        self.keep_retained_from(&msg, owner);
    }

    /// Cluster mode: a message for one member, on this node, of the shared subscription
    /// `sub` (NATS chose this node among those with members).
    pub fn publish_shared(&self, msg: Arc<Message>, sub: &Subscription, pace: bool) -> Published {
        self.metrics.messages_received.inc();
        let target = self
            .router
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .pick_shared(sub, |s| s.online() && s.has_room());
        self.deliver_to(&msg, target.as_slice(), pace)
    }

    /// [`Broker::route_local`] standalone, through the publisher's [`RouteCache`]: the
    /// same targets as routing now, since the router has not changed since they were found.
    fn route_cached(
        &self,
        msg: &Arc<Message>,
        publisher: Option<&SessionRef>,
        pace: bool,
        cache: &mut RouteCache,
    ) -> Published {
        let generation = self.router_generation.load(Ordering::Acquire);
        let fresh = |c: &&CachedRoute| c.generation == generation && c.topic == msg.topic;
        if let Some(c) = cache.0.as_deref().filter(fresh) {
            return match &c.targets {
                Some(targets) => self.deliver_to(msg, targets, pace),
                None => self.route_local(msg, publisher, pace),
            };
        }
        let router = self.router.read().unwrap_or_else(|p| p.into_inner());
        // Stable while the read lock is held: writers bump it under the write lock.
        let generation = self.router_generation.load(Ordering::Acquire);
        let targets = router.route_fixed(&msg.topic, publisher);
        drop(router);
        let c = cache.0.insert(Box::new(CachedRoute {
            generation,
            topic: msg.topic.clone(),
            targets,
        }));
        match &c.targets {
            Some(targets) => self.deliver_to(msg, targets, pace),
            None => self.route_local(msg, publisher, pace),
        }
    }

    /// Routes a message to this node's matching sessions (see [`Broker::publish`]). In
    /// cluster mode shared groups are left out: their member is chosen cluster-wide.
    fn route_local(
        &self,
        msg: &Arc<Message>,
        publisher: Option<&SessionRef>,
        pace: bool,
    ) -> Published {
        let router = self.router.read().unwrap_or_else(|p| p.into_inner());
        let targets = if let Some(remote) = self.remote.get() {
            let mut targets = router.route_plain(&msg.topic, publisher);
            // A persistent session gets its stored messages from its own consumers
            // (`cluster::sessions`), so that they wait in JetStream wherever it resumes;
            // a topic that cannot travel (`Remote::carries`) never reaches a consumer, and
            // is routed here like any other.
            if msg.qos != QoS::AtMostOnce && remote.carries(msg.topic.as_str()) {
                targets.retain(|t| t.qos == QoS::AtMostOnce || t.key.journal().is_none());
            }
            targets
        } else {
            // A shared group's message goes to a connected member with room (contract §9: the
            // group paces as a whole); when none has room, to the next one in rotation.
            router.route(&msg.topic, publisher, |s| s.online() && s.has_room())
        };
        drop(router);
        self.deliver_to(msg, &targets, pace)
    }

    /// Cluster mode: a stored message pulled from one of `session`'s own consumers
    /// (docs/cluster.md "Persistent sessions"), queued with the queue id `id` (its
    /// acknowledgement to JetStream waits for the device's). `own`: the session itself
    /// published it (No Local). Waits while the connected session's queue is full and it
    /// makes progress, as a paced publisher does (contract §9).
    pub async fn deliver_fed(
        &self,
        session: &SessionRef,
        msg: Arc<Message>,
        own: bool,
        id: i64,
        stop: &CancellationToken,
    ) -> FedOutcome {
        let target = self
            .router
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .route_plain(&msg.topic, own.then_some(session))
            .into_iter()
            .find(|t| &t.key == session);
        let Some(t) = target else {
            return FedOutcome::NotFor;
        };
        let qos = min_qos(msg.qos, t.qos);
        if qos == QoS::AtMostOnce {
            return FedOutcome::NotFor;
        }
        let mut delivery = Delivery {
            qos,
            retain: msg.retain && t.retain_as_published,
            sub_ids: t.subscription_ids,
            store_id: Some(id),
            msg: msg.clone(),
        };
        let stall = self.stall_timeout();
        let mut held = false;
        loop {
            if !self.is_current(session) {
                return FedOutcome::Gone;
            }
            let room = session.room();
            tokio::pin!(room);
            room.as_mut().enable();
            // Once handed back, the delivery is checked against the ACL in force when it
            // is offered again: a reload may have removed its subscription meanwhile.
            let offered = if held {
                session.redeliver(delivery, Some(stall))
            } else {
                session.deliver(delivery, Some(stall))
            };
            held = true;
            match offered {
                Ok((outcome, _)) => {
                    return match outcome {
                        Enqueued::Queued | Enqueued::QueuedDroppedOldQos0 => {
                            self.account(&mut Published::default(), session, outcome, &msg, qos);
                            FedOutcome::Queued
                        }
                        Enqueued::Denied => {
                            self.metrics.dropped("acl", 1);
                            FedOutcome::NotFor
                        }
                        Enqueued::DroppedOffline => FedOutcome::Gone,
                        Enqueued::DroppedFull | Enqueued::DroppedStalled => FedOutcome::Later,
                    }
                }
                Err(back) => delivery = back,
            }
            tokio::select! {
                _ = room => {}
                _ = stop.cancelled() => return FedOutcome::Gone,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// The subscriptions a session holds here.
    pub fn subscriptions(&self, session: &SessionRef) -> Vec<(Subscription, SubOptions)> {
        self.router
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .subscriptions_of(session)
    }

    /// Cluster mode: a persistent session read from the other nodes' store, put here
    /// offline as [`Broker::restore`] would (its messages stay in its consumers), unless
    /// this node already holds one under its key.
    pub fn adopt(&self, stored: StoredSession, acl: Arc<DeviceAcl>, max_queued: usize) {
        if self.has_session(&stored.key) {
            return;
        }
        let recovered = Recovered {
            sessions: vec![stored],
            ..Recovered::default()
        };
        self.restore(recovered, |_| acl.clone(), max_queued);
    }

    /// Cluster mode: a connection on another node claimed the persistent session `key`;
    /// it is forgotten here without touching the shared store (the other node holds it
    /// now). A connection still holding it is told to close. True if there was one.
    pub fn release(&self, key: &SessionKey) -> bool {
        let session = {
            let mut sessions = self.sessions();
            match sessions.get(key) {
                Some(s) if s.journal().is_some() => sessions.remove(key),
                _ => None,
            }
        };
        let Some(session) = session else {
            return false;
        };
        if let Some(token) = session.kick_out() {
            token.cancel();
        }
        self.router_mut().remove_all(&session);
        true
    }

    /// Delivers a message to routed targets, each at min(message QoS, granted QoS).
    fn deliver_to(
        &self,
        msg: &Arc<Message>,
        targets: &[router::Target<SessionRef>],
        pace: bool,
    ) -> Published {
        let pace = pace.then(|| self.stall_timeout());
        let mut out = Published::default();
        for t in targets {
            let delivery = Delivery {
                qos: min_qos(msg.qos, t.qos),
                retain: msg.retain && t.retain_as_published,
                sub_ids: t.subscription_ids.clone(),
                store_id: None,
                msg: msg.clone(),
            };
            let qos = delivery.qos;
            match t.key.deliver(delivery, pace) {
                Ok((outcome, lagging)) => {
                    out.congested |= lagging && t.key.online();
                    self.account(&mut out, &t.key, outcome, msg, qos);
                }
                Err(delivery) => out.waiting.push((t.key.clone(), delivery)),
            }
        }
        out
    }

    /// Offers a delivery that found its session's queue full again (contract §9): Err hands it
    /// back while the session still has no room and is not stalled. It is checked against
    /// the session's current ACL ([`Session::redeliver`]): a reload that narrowed the
    /// profile while it was held dropped the subscription it was routed through (§8).
    pub fn offer(
        &self,
        out: &mut Published,
        session: &SessionRef,
        delivery: Delivery,
    ) -> Result<(), Delivery> {
        let msg = delivery.msg.clone();
        let qos = delivery.qos;
        let (outcome, _) = session.redeliver(delivery, Some(self.stall_timeout()))?;
        session.pass_room();
        self.account(out, session, outcome, &msg, qos);
        Ok(())
    }

    /// Counts what one session did with a message delivered at `qos`.
    fn account(
        &self,
        out: &mut Published,
        session: &SessionRef,
        outcome: Enqueued,
        msg: &Message,
        qos: QoS,
    ) {
        let persisted = session.journal().is_some() && qos != QoS::AtMostOnce;
        let reason = match outcome {
            Enqueued::Queued => {
                out.queued += 1;
                out.durable |= persisted;
                return;
            }
            Enqueued::QueuedDroppedOldQos0 => {
                out.queued += 1;
                out.durable |= persisted;
                self.metrics.dropped("queue_full", 1);
                return;
            }
            Enqueued::DroppedOffline => return self.metrics.dropped("offline_qos0", 1),
            Enqueued::Denied => return self.metrics.dropped("acl", 1),
            Enqueued::DroppedFull => "queue_full",
            Enqueued::DroppedStalled => "stalled",
        };
        out.refused += 1;
        self.metrics.device_dropped(session.key.device.as_str());
        // Counted always; logged at powers of two of the running total, so a flood into a
        // full queue does not become a flood of log lines.
        let total = self.metrics.count_drop(reason);
        if total.is_power_of_two() {
            tracing::warn!(
                device = ?session.key.device,
                client_id = ?session.key.client_id,
                reason,
                dropped_so_far = total,
                qos = msg.qos as u8,
                topic = ?msg.topic.as_str(),
                "message dropped: the session cannot take it"
            );
        }
    }

    /// How long a connected subscriber may make no progress before it paces nobody.
    pub fn stall_timeout(&self) -> Duration {
        Duration::from_secs(self.stall_timeout.load(Ordering::Relaxed))
    }

    /// Sets `[limits] stall_timeout` (at start and on reload).
    pub fn set_stall_timeout(&self, secs: u64) {
        self.stall_timeout.store(secs, Ordering::Relaxed);
    }

    /// Adds a subscription; `Some(true)` if it replaced one with the same filter. `aliased`:
    /// made through `v1/devices/me/` (deliveries go back under `me`).
    ///
    /// `None`: the session's ACL in force now does not allow the filter, and nothing was
    /// added. The caller checked an earlier snapshot (one per SUBSCRIBE packet); a reload
    /// may have replaced the ACL since, and its [`Broker::apply_acl`] pruned the session's
    /// subscriptions without this one (contract §8). Checked under the router's write lock,
    /// the lock that pruning lists the subscriptions under, and after taking it: `apply_acl`
    /// sets the ACL (and bumps the session's ACL epoch) before it takes that lock to list.
    /// So either this subscription is added before the listing, which sees it and removes
    /// it if refused, or after the listing, whose lock release happens-before this
    /// acquisition, so that the new ACL is read here. No subscription added under a
    /// replaced ACL survives.
    pub fn subscribe(
        &self,
        session: &SessionRef,
        sub: &Subscription,
        opts: SubOptions,
        aliased: bool,
    ) -> Option<bool> {
        let mut router = self.router_mut();
        if !session.acl().can_subscribe(sub.filter()) {
            return None;
        }
        if let Some(journal) = session.journal() {
            journal.submit(Op::Subscribe {
                key: session.key.clone(),
                filter: subscription_text(sub),
                opts: opts.clone(),
                aliased,
            });
        }
        session.set_aliased(sub.filter(), aliased);
        Some(router.subscribe(session, sub, opts))
    }

    /// Removes a subscription; true if it existed.
    pub fn unsubscribe(&self, session: &SessionRef, sub: &Subscription) -> bool {
        let mut router = self.router_mut();
        if let Some(journal) = session.journal() {
            journal.submit(Op::Unsubscribe {
                key: session.key.clone(),
                filter: subscription_text(sub),
            });
        }
        session.set_aliased(sub.filter(), false);
        router.unsubscribe(session, sub)
    }

    /// Gives a session a new ACL (reload, resume, restore, registry change), removes the
    /// subscriptions it no longer allows and discards the queued and in-flight messages it
    /// may no longer receive (contract §4), logging both. Returns how many subscriptions were
    /// removed.
    pub fn apply_acl(&self, session: &SessionRef, acl: Arc<DeviceAcl>) -> usize {
        session.set_acl(acl.clone());
        let discarded = session.purge(|topic| acl.can_receive(topic));
        if discarded > 0 {
            tracing::info!(device = ?session.key.device, client_id = ?session.key.client_id, discarded, "queued messages discarded: no longer allowed");
            self.metrics.dropped("acl", discarded as u64);
        }
        let mut router = self.router_mut();
        let mut removed = 0;
        for (sub, _) in router.subscriptions_of(session) {
            if !acl.can_subscribe(sub.filter()) {
                router.unsubscribe(session, &sub);
                if let Some(journal) = session.journal() {
                    journal.submit(Op::Unsubscribe {
                        key: session.key.clone(),
                        filter: subscription_text(&sub),
                    });
                }
                tracing::info!(device = ?session.key.device, client_id = ?session.key.client_id, filter = ?sub.filter().as_str(), "subscription removed: no longer allowed");
                removed += 1;
            }
        }
        removed
    }

    /// Retained messages matching a filter, for delivery on SUBSCRIBE.
    pub fn retained_matching(&self, filter: &TopicFilter) -> Vec<(TopicName, Arc<Message>)> {
        self.retained
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .matching(filter)
    }

    /// Publishes a will, now or after its delay unless a connection attaches to the session
    /// first (MQTT 5 §3.1.3.2.2). `generation` is the ending connection's attach generation.
    /// Its topic was checked against the publish ACL at CONNECT; it is checked again here,
    /// since a reload may have narrowed the profile. In cluster mode the will's record is
    /// kept until it is published or cancelled here (`wills.rs`).
    pub fn publish_will(self: &Arc<Self>, session: &SessionRef, will: Will, generation: u64) {
        let delay = Self::will_delay(session, &will);
        let ticket = will.ticket;
        let fire = {
            let broker = self.clone();
            let session = session.clone();
            move |message: Message| {
                if !session.acl().can_publish(&message.topic) {
                    tracing::warn!(device = ?session.key.device, topic = ?message.topic.as_str(), "will dropped: topic not allowed");
                    broker.metrics.dropped("acl", 1);
                    return;
                }
                // Nobody waits for this commit: a will has no publisher to acknowledge.
                // A will has no connection to pace: it never waits.
                broker.publish(Arc::new(message), Some(&session), false);
            }
        };
        if delay == 0 {
            // The gate reads the registry and validates the chain: blocking, so it runs off
            // the async path, in a task of its own, before the will is published. Without
            // it a connection that drops between a `devices disable` / `delete` and the
            // next registry poll (contract §8) would still speak once more, which the
            // session's ACL alone does not prevent.
            let Some(gate) = will.gate.clone() else {
                if self.will_ours(session, ticket, false) {
                    fire(will.message);
                }
                self.will_settled(session, ticket);
                return;
            };
            let broker = self.clone();
            let session = session.clone();
            tokio::spawn(async move {
                if let Some(message) = broker.will_passes(&session, Some(gate), will.message).await
                {
                    if broker.will_ours(&session, ticket, false) {
                        fire(message);
                    }
                }
                broker.will_settled(&session, ticket);
            });
            return;
        }
        self.will_waits(session, ticket, delay);
        let broker = self.clone();
        let session = session.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(u64::from(delay))).await;
            broker
                .fire_delayed_will(&session, will, generation, fire)
                .await;
            broker.will_settled(&session, ticket);
        });
    }

    /// The end of a will's delay: published unless a connection resumed the session, the
    /// session ended otherwise, another node took it over, or its device may no longer
    /// publish it.
    async fn fire_delayed_will(
        &self,
        session: &SessionRef,
        will: Will,
        generation: u64,
        fire: impl FnOnce(Message),
    ) {
        if session.generation() != generation {
            return; // a connection resumed the session: the will is cancelled
        }
        // Ended by a new connection for the client id (clean start) or by forgetting
        // the device: no will (MQTT 5 §3.1.2.5). Ended by its expiry, at the same
        // moment the delay ran out (delay >= expiry): the session's end is a trigger.
        // Asked first: a session released to another node (cluster mode) is no longer
        // current here either, and the log line should say where it went.
        if !self.will_ours(session, will.ticket, true) {
            return;
        }
        if !self.is_current(session) && !session.expired() {
            tracing::info!(device = ?session.key.device, "will dropped: the session ended");
            return;
        }
        let Will { message, gate, .. } = will;
        if let Some(message) = self.will_passes(session, gate, message).await {
            fire(message);
        }
    }

    /// Asks a will's gate, off the async path, whether its device may still publish it;
    /// a refusal is logged and counted. None: dropped.
    async fn will_passes(
        &self,
        session: &SessionRef,
        gate: Option<WillGate>,
        message: Message,
    ) -> Option<Message> {
        let verdict = match gate {
            None => Ok(message),
            Some(gate) => tokio::task::spawn_blocking(move || gate(&message).map(|()| message))
                .await
                .unwrap_or_else(|e| Err(format!("the will check failed: {e}"))),
        };
        match verdict {
            Ok(message) => Some(message),
            Err(reason) => {
                tracing::warn!(device = ?session.key.device, reason = ?reason, "will dropped");
                self.metrics.dropped("revoked", 1);
                None
            }
        }
    }

    /// Number of sessions (tests, metrics).
    pub fn session_count(&self) -> usize {
        self.sessions().map.len()
    }
}

#[cfg(test)]
mod tests;

/// The lower of two QoS levels.
pub fn min_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) {
        a
    } else {
        b
    }
}

/// A subscription as the store keeps it: `$share/GROUP/filter` or the filter.
pub fn subscription_text(sub: &Subscription) -> String {
    match sub {
        Subscription::Plain(f) => f.as_str().to_owned(),
        Subscription::Shared { group, filter } => format!("$share/{group}/{}", filter.as_str()),
    }
}
