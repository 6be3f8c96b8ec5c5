//! The state of one MQTT session (contract §4): what it waits to send, what is in flight each
//! way, which connection holds it. This is the interface the durability issue backs with
//! SQLite: every change to a session's durable state goes through a method here.
//!
//! A session is keyed by (device, client id), so two devices never share one. It lives in a
//! [`SessionRef`] (an `Arc` compared by a unique id), which is also the router's subscriber
//! key: fan-out reaches the session without a map lookup. The state sits behind a std
//! Mutex held only for queue operations, never across an await; the connection is woken by
//! a `Notify` when something is queued.

use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::journal::{Journal, Op, StoredQueued};
use super::message::Message;
use crate::acl::DeviceAcl;
use crate::identity::DeviceName;
use crate::mqtt::codec::QoS;
use crate::mqtt::topic::{TopicFilter, TopicName};

/// (device, client id): the identity of a session.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey {
    pub device: DeviceName,
    pub client_id: String,
}

/// When a session ends after its connection closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// MQTT 3.1.1 clean session, or MQTT 5 session expiry 0.
    OnDisconnect,
    /// Seconds: the MQTT 5 session expiry interval, or `max_session_expiry` for MQTT 3.1.1
    /// clean session 0 (see `broker::expiry`).
    After(u32),
    /// MQTT 5 0xFFFFFFFF, only when `max_session_expiry` allows it.
    Never,
}

impl Expiry {
    /// From an MQTT 5 Session Expiry Interval.
    pub fn from_v5(interval: u32) -> Expiry {
        match interval {
            0 => Expiry::OnDisconnect,
            u32::MAX => Expiry::Never,
            s => Expiry::After(s),
        }
    }
}

/// A message on its way to one subscriber.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub msg: Arc<Message>,
    /// min(published QoS, granted QoS).
    pub qos: QoS,
    /// The RETAIN flag to send: set for retained messages sent on SUBSCRIBE, and for
    /// live messages on subscriptions with Retain As Published.
    pub retain: bool,
    /// MQTT 5 subscription identifiers of the matching subscriptions.
    pub sub_ids: Vec<u32>,
    /// The row in the message store, for QoS 1/2 deliveries to persistent sessions.
    pub store_id: Option<i64>,
}

/// An outbound QoS 1/2 exchange not yet completed.
#[derive(Debug, Clone)]
enum Flight {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Publish(Delivery),
    /// PUBREL sent, waiting for PUBCOMP (with the store row, if persistent).
    Released(Option<i64>),
}

/// What the connection must write next.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// `pkid` is 0 for QoS 0.
    Publish {
        pkid: u16,
        delivery: Delivery,
        dup: bool,
    },
    PubRel {
        pkid: u16,
    },
}

/// What [`Session::enqueue`] did with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Queued,
    /// QoS 0 for a session with no connection is not kept (as Mosquitto by default).
    DroppedOffline,
    /// The queue was full: its oldest QoS 0 message was dropped to make room.
    QueuedDroppedOldQos0,
    /// The queue was full of QoS 1/2 messages: this one was dropped (an offline session,
    /// or a delivery that may not wait; contract §7).
    DroppedFull,
    /// The queue of a connected session is full and it made no progress for
    /// `stall_timeout`: dropped, and the session paces nobody (contract §9).
    DroppedStalled,
    /// The session's ACL denies the topic (`deny_subscribe` of a broad subscription).
    Denied,
}

/// What [`Session::inbound_qos2_begin`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundQos2 {
    /// A new exchange, recorded: route the message.
    New,
    /// A PUBLISH with an id already open: acknowledge again, do not route again.
    Duplicate,
    /// A new id beyond the limit: nothing was recorded.
    OverLimit,
}

static NEXT_SESSION_ID: AtomicU64 = AtomicU64::new(1);

/// One session.
#[derive(Debug)]
pub struct Session {
    id: u64,
    pub key: SessionKey,
    inner: Mutex<Inner>,
    notify: Notify,
    /// Wakes publishers paced by this session's full queue when it has room again, or when
    /// it goes offline (contract §9 flow control).
    room: Notify,
    /// Mirrors `inner.attached.is_some()` for lock-free checks (shared subscriptions).
    online: AtomicBool,
    /// Mirrors `!inner.aliased.is_empty()`, so that a delivery to a session without
    /// `v1/devices/me` subscriptions takes no lock to learn it (`delivers_aliased`).
    any_aliased: AtomicBool,
    /// See [`Session::acl_epoch`].
    acl_epoch: AtomicU64,
    /// Set when the session ended because its expiry passed: a will due at that same
    /// moment is still published (the session's end is one of its triggers).
    expired: AtomicBool,
    /// Set for persistent sessions: every durable change is submitted here, under the
    /// session lock, so the store sees changes in the order they happened.
    journal: Option<Journal>,
}

#[derive(Debug)]
struct Inner {
    /// Waiting to be sent, in order.
    queue: VecDeque<Delivery>,
    max_queued: usize,
    /// Outbound exchanges in the order their PUBLISH was first sent.
    inflight: VecDeque<(u16, Flight)>,
    next_pkid: u16,
    /// Inbound QoS 2 packet ids between PUBLISH and PUBREL: a duplicate PUBLISH with one of
    /// these ids is acknowledged again but not routed again (exactly once).
    inbound_qos2: HashSet<u16>,
    /// The connection holding the session, and how to close it on takeover.
    attached: Option<(u64, CancellationToken)>,
    /// Bumped on every attach; a will delay or expiry timer fires only for its generation.
    generation: u64,
    expiry: Expiry,
    acl: Arc<DeviceAcl>,
    /// Subscriptions made through `v1/devices/me/...`, in canonical form: deliveries that
    /// match one are sent back under the `me` topic (contract §5).
    aliased: Vec<TopicFilter>,
    /// When the connection last made progress: took deliveries from the queue, or had one
    /// acknowledged (or attached). A full queue with no progress for `stall_timeout` is a
    /// stalled subscriber, which paces nobody (contract §9). tokio's clock, so paused-time tests
    /// can drive it.
    progress: tokio::time::Instant,
    /// The stall of this session was logged (once per stall, not per dropped message).
    stall_logged: bool,
    /// Retained messages matching new subscriptions, not yet in `queue` (contract §7: all are
    /// delivered, however many, without growing `queue` past `max_queued`). One entry per
    /// subscription filter, in SUBSCRIBE order; the connection moves them into `queue` as
    /// it drains ([`Session::take_retained`]). `Arc` references to the retained store's
    /// messages, so a large backlog costs a few words per message. In memory only: a
    /// restart forgets it (the retained messages themselves are durable; re-subscribing
    /// delivers them again).
    retained_backlog: VecDeque<(TopicFilter, VecDeque<Delivery>)>,
}

/// A shared session, compared and hashed by its unique id (the router's key).
#[derive(Debug, Clone)]
pub struct SessionRef(pub Arc<Session>);

impl PartialEq for SessionRef {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}
impl Eq for SessionRef {}
impl Hash for SessionRef {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.id.hash(state);
    }
}
impl PartialOrd for SessionRef {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for SessionRef {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.id.cmp(&other.0.id)
    }
}

impl std::ops::Deref for SessionRef {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.0
    }
}

impl Session {
    /// A new, empty session.
    pub fn create(
        key: SessionKey,
        acl: Arc<DeviceAcl>,
        expiry: Expiry,
        max_queued: usize,
        journal: Option<Journal>,
    ) -> SessionRef {
        SessionRef(Arc::new(Session {
            id: NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed),
            key,
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                max_queued,
                inflight: VecDeque::new(),
                next_pkid: 1,
                inbound_qos2: HashSet::new(),
                attached: None,
                generation: 0,
                expiry,
                acl,
                aliased: Vec::new(),
                progress: tokio::time::Instant::now(),
                stall_logged: false,
                retained_backlog: VecDeque::new(),
            }),
            notify: Notify::new(),
            room: Notify::new(),
            online: AtomicBool::new(false),
            any_aliased: AtomicBool::new(false),
            acl_epoch: AtomicU64::new(0),
            expired: AtomicBool::new(false),
            journal,
        }))
    }

    /// The store, when the session is persistent.
    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    fn submit(&self, op: Op) {
        if let Some(s) = &self.journal {
            s.submit(op);
        }
    }

    fn delivered(&self, id: Option<i64>) {
        if let Some(id) = id {
            self.submit(Op::Delivered { id });
        }
    }

    /// Puts back what the store held for this session (at start, before any connection).
    pub fn restore(&self, queued: Vec<StoredQueued>, inbound: Vec<u16>) {
        let mut inner = self.lock();
        for q in queued {
            let d = Delivery {
                msg: q.msg,
                qos: q.qos,
                retain: q.retain,
                sub_ids: q.sub_ids,
                store_id: Some(q.id),
            };
            match q.pkid {
                Some(pkid) if q.released => inner
                    .inflight
                    .push_back((pkid, Flight::Released(d.store_id))),
                Some(pkid) => inner.inflight.push_back((pkid, Flight::Publish(d))),
                None => inner.queue.push_back(d),
            }
        }
        if let Some(max) = inner.inflight.iter().map(|(p, _)| *p).max() {
            inner.next_pkid = if max == u16::MAX { 1 } else { max + 1 };
        }
        inner.inbound_qos2.extend(inbound);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain data (queues), still consistent
        // enough to keep serving; recover rather than take every publisher down.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The unique id of this session object.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Records that the session ends because its expiry passed.
    pub fn mark_expired(&self) {
        self.expired.store(true, Ordering::Release);
    }

    /// Whether the session ended because its expiry passed.
    pub fn expired(&self) -> bool {
        self.expired.load(Ordering::Acquire)
    }

    /// Whether a connection holds the session.
    pub fn online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }

    /// Wakes the connection when something was queued.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    /// Queues a delivery (contract §6, 9: bounded; QoS 0 dropped first). For a persistent
    /// session a QoS 1/2 delivery is submitted to the store (the caller waits for a barrier
    /// before acknowledging the publisher). Never waits.
    pub fn enqueue(&self, d: Delivery) -> Enqueued {
        match self.deliver(d, None) {
            Ok((outcome, _)) => outcome,
            Err(_) => Enqueued::DroppedFull,
        }
    }

    /// [`Session::enqueue`] for fan-out, under one lock: the ACL's per-message check, the
    /// queue, and whether the queue is now more than half full (the subscriber lags).
    ///
    /// `pace` is the `stall_timeout` of a publisher that may wait (contract §9 flow control):
    /// when this session is connected, its queue full and it made progress within that
    /// time, the delivery is handed back (`Err`) for the publisher to offer again once
    /// [`Session::room`] says there is room. A session that made no progress for longer is
    /// stalled: the delivery is dropped ([`Enqueued::DroppedStalled`]).
    pub fn deliver(
        &self,
        d: Delivery,
        pace: Option<std::time::Duration>,
    ) -> Result<(Enqueued, bool), Delivery> {
        self.deliver_checked(d, pace, false)
    }

    /// [`Session::deliver`] for a delivery handed back earlier (`Err`) and offered again
    /// (contract §8, 9). It was routed through a subscription that a reload may have
    /// removed while it was held, after `purge` emptied the queue of what the new ACL
    /// refuses: so it is checked against the ACL in force now, always, not only for
    /// profiles with `deny_subscribe`. The check is made under the session lock, the one
    /// [`Session::set_acl`] replaces the ACL under: either the new ACL is seen here, or this
    /// delivery is queued before it is set and the `purge` that follows removes it.
    /// Retries are rare (a full queue), so the check is not worth caching by epoch.
    pub fn redeliver(
        &self,
        d: Delivery,
        pace: Option<std::time::Duration>,
    ) -> Result<(Enqueued, bool), Delivery> {
        self.deliver_checked(d, pace, true)
    }

    /// `always_check`: check the ACL even for a profile without `deny_subscribe`.
    fn deliver_checked(
        &self,
        d: Delivery,
        pace: Option<std::time::Duration>,
        always_check: bool,
    ) -> Result<(Enqueued, bool), Delivery> {
        let mut inner = self.lock();
        if (always_check || inner.acl.filters_deliveries()) && !inner.acl.can_receive(&d.msg.topic)
        {
            drop(inner);
            if always_check {
                tracing::info!(
                    device = ?self.key.device,
                    client_id = ?self.key.client_id,
                    topic = ?d.msg.topic.as_str(),
                    "held delivery dropped: no longer allowed"
                );
            }
            return Ok((Enqueued::Denied, false));
        }
        let outcome = inner.push(d, &self.key, self.journal.as_ref(), pace)?;
        let congested = inner.queue.len() * 2 > inner.max_queued;
        let log_stall = outcome == Enqueued::DroppedStalled && !inner.stall_logged;
        inner.stall_logged |= log_stall;
        drop(inner);
        if log_stall {
            tracing::warn!(
                device = ?self.key.device,
                client_id = ?self.key.client_id,
                "subscriber stalled: its queue is full and it made no progress for stall_timeout; its messages are dropped and it paces no publisher"
            );
        }
        if matches!(outcome, Enqueued::Queued | Enqueued::QueuedDroppedOldQos0) {
            self.notify.notify_one();
        }
        Ok((outcome, congested))
    }

    /// After a paced publisher's delivery was taken: wakes the next waiting publisher if
    /// room is left (see `next_batch`), so that no publisher waits while there is room.
    pub fn pass_room(&self) {
        if self.has_room() {
            self.room.notify_one();
        }
    }

    /// Whether the queue has room for one more delivery.
    pub fn has_room(&self) -> bool {
        let inner = self.lock();
        inner.queue.len() < inner.max_queued
    }

    /// How many more deliveries the queue takes now (cluster mode pulls no more than this
    /// from a persistent session's consumers).
    pub fn free_room(&self) -> usize {
        let inner = self.lock();
        inner.max_queued.saturating_sub(inner.queue.len())
    }

    /// When a paced publisher should look again even without a wake-up: the moment this
    /// session would count as stalled.
    pub fn stall_deadline(&self, stall: std::time::Duration) -> tokio::time::Instant {
        self.lock().progress + stall
    }

    /// Woken when the queue has room again or the session goes offline. Enable it
    /// (`Notified::enable`) before checking [`Session::has_room`], so that no wake-up is
    /// missed in between.
    pub fn room(&self) -> tokio::sync::futures::Notified<'_> {
        self.room.notified()
    }

    /// Attaches a connection; returns the token of the connection it takes over, if any,
    /// and the attach generation of this connection (a later attach changes it: a delayed
    /// will of this connection is then cancelled).
    pub fn attach(
        &self,
        conn_id: u64,
        kick: CancellationToken,
    ) -> (Option<CancellationToken>, u64) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.progress = tokio::time::Instant::now();
        inner.stall_logged = false;
        let previous = inner.attached.replace((conn_id, kick)).map(|(_, k)| k);
        self.online.store(true, Ordering::Release);
        (previous, inner.generation)
    }

    /// The token of the connection attached now, if any: cancelling it ends that
    /// connection as taken over, and it then closes the session as any disconnect does
    /// (cluster mode: the session was claimed on another node).
    pub fn attached_token(&self) -> Option<CancellationToken> {
        self.lock().attached.as_ref().map(|(_, k)| k.clone())
    }

    /// Detaches whatever connection holds the session and returns its token, so the
    /// caller can tell it to close (clean-start takeover of a discarded session).
    pub fn kick_out(&self) -> Option<CancellationToken> {
        let mut inner = self.lock();
        self.online.store(false, Ordering::Release);
        let kicked = inner.attached.take().map(|(_, k)| k);
        drop(inner);
        self.room.notify_waiters();
        kicked
    }

    /// Detaches `conn_id` if it still holds the session; true if it did. Returns the
    /// generation at detach time (timers compare it).
    pub fn detach(&self, conn_id: u64) -> Option<u64> {
        let mut inner = self.lock();
        if inner
            .attached
            .as_ref()
            .is_some_and(|(id, _)| *id == conn_id)
        {
            inner.attached = None;
            self.online.store(false, Ordering::Release);
            // Queued QoS 0 messages are not kept for an offline session.
            inner.queue.retain(|d| d.qos != QoS::AtMostOnce);
            let generation = inner.generation;
            drop(inner);
            // Publishers paced by this session stop waiting: offline sessions pace nobody.
            self.room.notify_waiters();
            Some(generation)
        } else {
            None
        }
    }

    /// Whether `conn_id` holds the session.
    pub fn is_attached(&self, conn_id: u64) -> bool {
        self.lock()
            .attached
            .as_ref()
            .is_some_and(|(id, _)| *id == conn_id)
    }

    /// The current attach generation.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    pub fn expiry(&self) -> Expiry {
        self.lock().expiry
    }

    pub fn set_expiry(&self, e: Expiry) {
        self.lock().expiry = e;
    }

    /// The session's ACL (replaced on reload).
    pub fn acl(&self) -> Arc<DeviceAcl> {
        self.lock().acl.clone()
    }

    pub fn set_acl(&self, acl: Arc<DeviceAcl>) {
        let mut inner = self.lock();
        inner.acl = acl;
        self.acl_epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Changes whenever [`Session::set_acl`] gives the session an ACL: a verdict of
    /// [`Session::acl`] cached under one value holds while it stays the same.
    pub fn acl_epoch(&self) -> u64 {
        self.acl_epoch.load(Ordering::Acquire)
    }

    /// Records (or forgets) a subscription made through the `me` alias.
    pub fn set_aliased(&self, filter: &TopicFilter, aliased: bool) {
        let mut inner = self.lock();
        inner.aliased.retain(|f| f != filter);
        if aliased {
            inner.aliased.push(filter.clone());
        }
        self.any_aliased
            .store(!inner.aliased.is_empty(), Ordering::Release);
    }

    /// Whether a delivery on `topic` goes back under the `me` alias.
    pub fn delivers_aliased(&self, topic: &TopicName) -> bool {
        // Asked for every delivery: without aliased subscriptions (most sessions) no lock,
        // which publishers to this session would otherwise contend for.
        if !self.any_aliased.load(Ordering::Acquire) {
            return false;
        }
        let inner = self.lock();
        !inner.aliased.is_empty() && inner.aliased.iter().any(|f| f.matches(topic))
    }

    /// Everything in flight, to send again after a reconnect (PUBLISH with DUP, PUBREL).
    pub fn resend_inflight(&self, conn_id: u64) -> Vec<Outgoing> {
        let inner = self.lock();
        if !inner.holds(conn_id) {
            return Vec::new();
        }
        inner
            .inflight
            .iter()
            .map(|(pkid, f)| match f {
                Flight::Publish(d) => Outgoing::Publish {
                    pkid: *pkid,
                    delivery: d.clone(),
                    dup: true,
                },
                Flight::Released(_) => Outgoing::PubRel { pkid: *pkid },
            })
            .collect()
    }

    /// Takes up to `max` queued deliveries that may be sent now: QoS 0 always, QoS 1/2
    /// while fewer than `window` exchanges are in flight (assigning packet ids). Order is
    /// kept: a QoS 1 message that does not fit blocks those behind it.
    pub fn next_batch(&self, conn_id: u64, window: usize, max: usize) -> Vec<Outgoing> {
        let mut inner = self.lock();
        if !inner.holds(conn_id) {
            return Vec::new();
        }
        let was_full = inner.queue.len() >= inner.max_queued;
        let mut out = Vec::new();
        while out.len() < max {
            let Some(front) = inner.queue.front() else {
                break;
            };
            if front.qos == QoS::AtMostOnce {
                if let Some(d) = inner.queue.pop_front() {
                    out.push(Outgoing::Publish {
                        pkid: 0,
                        delivery: d,
                        dup: false,
                    });
                }
                continue;
            }
            if inner.inflight.len() >= window {
                break;
            }
            let Some(d) = inner.queue.pop_front() else {
                break;
            };
            let pkid = inner.allocate_pkid();
            if let Some(id) = d.store_id {
                self.submit(Op::Sent { id, pkid });
            }
            inner.inflight.push_back((pkid, Flight::Publish(d.clone())));
            out.push(Outgoing::Publish {
                pkid,
                delivery: d,
                dup: false,
            });
        }
        if !out.is_empty() {
            inner.progressed();
            // Paced publishers wait only while the queue is full. Half empty: all of them
            // are woken at once. Room after being full: one is (not every waiting
            // publisher at every message a slow subscriber takes), and a publisher whose
            // retry still finds room passes the wake-up on (`Session::pass_room`).
            let all = inner.queue.len() <= inner.max_queued / 2;
            drop(inner);
            if all {
                self.room.notify_waiters();
            } else if was_full {
                self.room.notify_one();
            }
        }
        out
    }

    /// Whether anything waits in the queue.
    pub fn has_queued(&self) -> bool {
        !self.lock().queue.is_empty()
    }

    /// Number of queued deliveries (tests, metrics).
    pub fn queued_len(&self) -> usize {
        self.lock().queue.len()
    }

    /// PUBACK for an outbound QoS 1 message; false if unknown.
    pub fn puback(&self, pkid: u16) -> bool {
        let mut inner = self.lock();
        match inner.position(pkid) {
            Some(i) if matches!(&inner.inflight[i].1, Flight::Publish(d) if d.qos == QoS::AtLeastOnce) =>
            {
                if let Some((_, Flight::Publish(d))) = inner.inflight.remove(i) {
                    self.delivered(d.store_id);
                }
                inner.progressed();
                true
            }
            _ => false,
        }
    }

    /// PUBREC for an outbound QoS 2 message. `accepted` is false when an MQTT 5 client
    /// answers with an error reason: the exchange ends there. Returns whether a PUBREL is
    /// due (also for a duplicate PUBREC of an already released id).
    pub fn pubrec(&self, pkid: u16, accepted: bool) -> bool {
        let mut inner = self.lock();
        let Some(i) = inner.position(pkid) else {
            return false;
        };
        let id = match &inner.inflight[i].1 {
            Flight::Publish(d) => d.store_id,
            Flight::Released(id) => *id,
        };
        if !accepted {
            inner.inflight.remove(i);
            self.delivered(id);
            return false;
        }
        if let (Some(id), Flight::Publish(_)) = (id, &inner.inflight[i].1) {
            self.submit(Op::Released { id });
        }
        inner.inflight[i].1 = Flight::Released(id);
        true
    }

    /// PUBCOMP ends an outbound QoS 2 exchange; false if unknown.
    pub fn pubcomp(&self, pkid: u16) -> bool {
        let mut inner = self.lock();
        match inner.position(pkid) {
            Some(i) if matches!(inner.inflight[i].1, Flight::Released(_)) => {
                if let Some((_, Flight::Released(id))) = inner.inflight.remove(i) {
                    self.delivered(id);
                }
                inner.progressed();
                true
            }
            _ => false,
        }
    }

    /// Drops an outbound exchange that could not be sent (e.g. larger than the client's
    /// maximum packet size).
    pub fn abandon(&self, pkid: u16) {
        let mut inner = self.lock();
        if let Some(i) = inner.position(pkid) {
            match inner.inflight.remove(i) {
                Some((_, Flight::Publish(d))) => self.delivered(d.store_id),
                Some((_, Flight::Released(id))) => self.delivered(id),
                None => {}
            }
        }
    }

    /// Discards the queued deliveries, and the in-flight ones not yet acknowledged by a
    /// PUBREC, whose topic `keep` refuses (contract §4: what a session may no longer receive);
    /// their store rows go too. Returns how many were discarded.
    pub fn purge(&self, keep: impl Fn(&TopicName) -> bool) -> usize {
        let mut inner = self.lock();
        let mut gone = Vec::new();
        inner.queue.retain(|d| {
            let kept = keep(&d.msg.topic);
            if !kept {
                gone.push(d.store_id);
            }
            kept
        });
        inner.inflight.retain(|(_, f)| match f {
            Flight::Publish(d) if !keep(&d.msg.topic) => {
                gone.push(d.store_id);
                false
            }
            _ => true,
        });
        drop(inner);
        for id in &gone {
            self.delivered(*id);
        }
        gone.len()
    }

    /// Number of outbound exchanges in flight.
    pub fn inflight_len(&self) -> usize {
        self.lock().inflight.len()
    }

    /// An inbound QoS 2 PUBLISH arrived. A new id is recorded only when fewer than `limit`
    /// exchanges are open (contract §7: an id recorded for a message that is then refused would
    /// make its resend look like a duplicate, acknowledged and never delivered); `None`
    /// records without a limit (MQTT 3.1.1 cannot be told one: the packet id space bounds
    /// the set to 65,535 ids).
    pub fn inbound_qos2_begin(&self, pkid: u16, limit: Option<usize>) -> InboundQos2 {
        let mut inner = self.lock();
        if inner.inbound_qos2.contains(&pkid) {
            return InboundQos2::Duplicate;
        }
        if limit.is_some_and(|max| inner.inbound_qos2.len() >= max) {
            return InboundQos2::OverLimit;
        }
        inner.inbound_qos2.insert(pkid);
        InboundQos2::New
    }

    /// Makes a recorded inbound QoS 2 id durable (persistent sessions). Submitted by the
    /// publisher in the same store group as the message's deliveries once they are all
    /// queued, never before them: an id committed without its message would make the
    /// client's resend after a crash look like a duplicate, completed and never delivered.
    pub fn inbound_qos2_persist(&self, pkid: u16) {
        self.submit(Op::InboundBegin {
            key: self.key.clone(),
            pkid,
        });
    }

    /// PUBREL for an inbound QoS 2 exchange; false if the id was unknown. The release is
    /// submitted to the store either way: an unknown id may be the client's retry after a
    /// release whose commit failed, still on disk (a no-op otherwise).
    pub fn inbound_qos2_release(&self, pkid: u16) -> bool {
        let mut inner = self.lock();
        let found = inner.inbound_qos2.remove(&pkid);
        self.submit(Op::InboundRelease {
            key: self.key.clone(),
            pkid,
        });
        found
    }

    /// Inbound QoS 2 exchanges awaiting PUBREL (MQTT 5 Receive Maximum).
    pub fn inbound_qos2_len(&self) -> usize {
        self.lock().inbound_qos2.len()
    }
}

/// The retained backlog (see `Inner::retained_backlog`): kept apart from the queue methods
/// above so that it stays a self-contained addition.
impl Session {
    /// Puts the retained messages matching a new subscription `filter` behind those already
    /// waiting; those an earlier subscription with the same filter left are replaced (a
    /// client re-subscribing in a loop cannot grow the backlog).
    pub fn add_retained(&self, filter: &TopicFilter, deliveries: Vec<Delivery>) {
        let mut inner = self.lock();
        inner.retained_backlog.retain(|(f, _)| f != filter);
        if !deliveries.is_empty() {
            inner
                .retained_backlog
                .push_back((filter.clone(), deliveries.into()));
        }
    }

    /// Forgets the retained messages still waiting for `filter` (UNSUBSCRIBE: no new
    /// messages for it, MQTT-3.10.4-2).
    pub fn drop_retained(&self, filter: &TopicFilter) {
        self.lock().retained_backlog.retain(|(f, _)| f != filter);
    }

    /// Takes, for connection `conn_id`, as many deliveries of the first backlog entry as
    /// fit while the queue holds fewer than `low` (never more than half of `max_queued`, so
    /// that live messages still find room and publishers are not paced by retained
    /// traffic), with the entry's filter. The caller checks they are still due, enqueues
    /// them, and gives back what the queue could not take ([`Session::untake_retained`]).
    pub fn take_retained(&self, conn_id: u64, low: usize) -> Option<(TopicFilter, Vec<Delivery>)> {
        let mut inner = self.lock();
        if inner.retained_backlog.is_empty() || !inner.holds(conn_id) {
            return None;
        }
        let low = low.min(inner.max_queued / 2).max(1);
        let room = low.saturating_sub(inner.queue.len());
        if room == 0 {
            return None;
        }
        let (filter, front) = inner.retained_backlog.front_mut()?;
        let filter = filter.clone();
        let n = room.min(front.len());
        let batch: Vec<Delivery> = front.drain(..n).collect();
        if front.is_empty() {
            inner.retained_backlog.pop_front();
        }
        Some((filter, batch))
    }

    /// Puts deliveries taken by [`Session::take_retained`] back at the front, in order.
    pub fn untake_retained(&self, filter: TopicFilter, deliveries: Vec<Delivery>) {
        if deliveries.is_empty() {
            return;
        }
        let mut inner = self.lock();
        match inner.retained_backlog.front_mut() {
            Some((f, front)) if *f == filter => {
                for d in deliveries.into_iter().rev() {
                    front.push_front(d);
                }
            }
            _ => inner
                .retained_backlog
                .push_front((filter, deliveries.into())),
        }
    }

    /// Retained deliveries waiting in the backlog (tests, metrics).
    pub fn retained_backlog_len(&self) -> usize {
        self.lock()
            .retained_backlog
            .iter()
            .map(|(_, d)| d.len())
            .sum()
    }
}

impl Inner {
    /// Queues a delivery by the bounded-queue policy (contract §6, 9): QoS 0 is not kept offline;
    /// a full queue gives up its oldest QoS 0 message, else refuses. A QoS 1/2 delivery of a
    /// persistent session is submitted to the store here, under the session lock, so the
    /// store sees deliveries in queue order.
    ///
    /// With `pace` (see [`Session::deliver`]), a full queue of a connected session hands
    /// the delivery back while the session makes progress, and drops it once stalled.
    fn push(
        &mut self,
        mut d: Delivery,
        key: &SessionKey,
        journal: Option<&Journal>,
        pace: Option<std::time::Duration>,
    ) -> Result<Enqueued, Delivery> {
        if self.attached.is_none() && d.qos == QoS::AtMostOnce {
            return Ok(Enqueued::DroppedOffline);
        }
        let mut outcome = Enqueued::Queued;
        if self.queue.len() >= self.max_queued {
            if let (Some(stall), true) = (pace, self.attached.is_some()) {
                if self.progress.elapsed() < stall {
                    return Err(d);
                }
                return Ok(Enqueued::DroppedStalled);
            }
            // An offline session's queue holds no QoS 0 (dropped at detach, never queued
            // offline): no scan per message for a full offline queue (it cost a fan-in
            // with a forgotten persistent subscriber 11% of the broker's CPU).
            if self.attached.is_none() {
                return Ok(Enqueued::DroppedFull);
            }
            match self.queue.iter().position(|q| q.qos == QoS::AtMostOnce) {
                Some(i) => {
                    self.queue.remove(i);
                    outcome = Enqueued::QueuedDroppedOldQos0;
                }
                None => return Ok(Enqueued::DroppedFull),
            }
        }
        // A delivery that comes with its id (pulled from a cluster session's consumer) is
        // kept by its consumer, not written again.
        if let (Some(journal), false, None) = (journal, d.qos == QoS::AtMostOnce, d.store_id) {
            let id = journal.next_id();
            d.store_id = Some(id);
            journal.submit(Op::Enqueue {
                id,
                key: key.clone(),
                msg: d.msg.clone(),
                qos: d.qos,
                retain: d.retain,
                sub_ids: d.sub_ids.clone(),
            });
        }
        self.queue.push_back(d);
        Ok(outcome)
    }

    /// The connection made progress: it is not stalled, and a later stall is logged again.
    fn progressed(&mut self) {
        self.progress = tokio::time::Instant::now();
        self.stall_logged = false;
    }

    /// Whether connection `conn_id` holds the session.
    fn holds(&self, conn_id: u64) -> bool {
        self.attached.as_ref().is_some_and(|(id, _)| *id == conn_id)
    }

    fn position(&self, pkid: u16) -> Option<usize> {
        self.inflight.iter().position(|(p, _)| *p == pkid)
    }

    /// The next packet id not in flight (1..=65535). The window is far below 65535, so
    /// this terminates quickly.
    fn allocate_pkid(&mut self) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = if id == u16::MAX { 1 } else { id + 1 };
            if !self.inflight.iter().any(|(p, _)| *p == id) {
                return id;
            }
        }
    }
}

#[cfg(test)]
mod tests;
