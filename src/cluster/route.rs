//! Messages between nodes (docs/cluster.md, "Routing"): the broker's [`Remote`] port
//! implemented on NATS.
//!
//! Out: every message accepted on this node is published once, to `<prefix>.m.<subject>`
//! (QoS 0, core NATS) or `<prefix>.q.<subject>` (QoS 1/2, captured by the `<prefix>_msgs`
//! stream); a retained message also goes to `<prefix>.r.<subject>` (the
//! `<prefix>_retained` stream keeps the last per subject). The publisher's PUBACK/PUBREC
//! waits until JetStream acknowledged every stored copy (with `replicas` copies).
//!
//! In, three paths, each delivering through `Broker::publish_remote`, so ACLs, the `me`
//! alias, no local, retain as published and QoS downgrade behave as for local messages:
//! - QoS 0: one core subscription per subscribed filter, reference-counted (the router
//!   reports a filter's first subscriber and its last), on a connection without echo;
//!   overlapping filters can deliver one message twice, so messages carry an id and a
//!   window of recent ids drops the second copy.
//! - QoS 1/2: this node's durable consumer `node-<node>` on `<prefix>_msgs` (every stored
//!   message). A message is acknowledged to JetStream only after the local sessions took
//!   it (and the local store committed it for persistent ones), so a node that crashes
//!   gets it again. A local subscriber with a full queue paces the consumer as it would
//!   pace a local publisher, up to `stall_timeout`.
//! - Retained: an ordered consumer on `<prefix>_retained`, last message per subject then
//!   every change, kept in the local retained store (not routed: the message itself
//!   arrives on one of the paths above).
//!
//! Wire format: the NATS payload is the MQTT payload; headers carry the rest (see
//! `Envelope`). Topics a NATS subject cannot carry (white space, a `*` or `>` level) stay
//! on their node (logged once per topic).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{consumer, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::subject::{filter_to_subjects, subject_to_topic, topic_to_subject};
use super::{Cluster, ClusterError};
use crate::broker::journal::{Commit, CommitError};
use crate::broker::message::{Forwarded, Message};
use crate::broker::remote::{Remote, Stored};
use crate::broker::Broker;
use crate::cluster::{hex, unhex};
use crate::identity::DeviceName;
use crate::mqtt::codec::QoS;
use crate::mqtt::topic::{Subscription, TopicName};

/// Stored messages (QoS 1/2, retained) waiting to be published to JetStream; beyond
/// this they are refused (0x97), never queued without bound.
const OUTBOX: usize = 8192;
/// QoS 0 messages waiting to be published to NATS; beyond this they are not forwarded
/// (counted: `certmq_messages_dropped_total{reason="cluster_backlog"}`). Separate from
/// the stored outbox, so a QoS 0 flood never refuses a QoS 1 message.
const CORE_OUTBOX: usize = 16_384;
/// QoS 0 messages published to NATS per turn of the forwarding task.
const CORE_BATCH: usize = 512;
/// How long a JetStream publish may wait for its acknowledgement.
const STORE_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages a node's consumer may hold unacknowledged (its share of back-pressure).
const MAX_ACK_PENDING: i64 = 1024;
/// After this, JetStream redelivers a message the node did not acknowledge.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// How many recent message ids are remembered to drop duplicate core deliveries.
const RECENT_IDS: usize = 65_536;
/// How long stored messages are kept at most (a node down longer misses them).
const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Header names (documented in docs/cluster.md for NATS-native consumers).
mod header {
    pub const NODE: &str = "Certmq-Node";
    pub const RUN: &str = "Certmq-Run";
    pub const ID: &str = "Certmq-Id";
    pub const QOS: &str = "Certmq-Qos";
    pub const RETAIN: &str = "Certmq-Retain";
    pub const DEVICE: &str = "Certmq-Device";
    pub const CLIENT: &str = "Certmq-Client";
    pub const EXPIRES: &str = "Certmq-Expires";
    pub const PAYLOAD_FORMAT: &str = "Mqtt-Payload-Format";
    pub const CONTENT_TYPE: &str = "Mqtt-Content-Type";
    pub const RESPONSE_TOPIC: &str = "Mqtt-Response-Topic";
    pub const CORRELATION_DATA: &str = "Mqtt-Correlation-Data";
    pub const USER_PROPERTIES: &str = "Mqtt-User-Properties";
}

/// One message on its way out.
struct Outgoing {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    /// Stored (JetStream) or core; with the retained copy's subject, if any.
    durable: bool,
    retained: Option<String>,
    /// Completed with the store's answer, for durable and retained messages.
    done: Option<oneshot::Sender<Commit>>,
}

/// The routing side of a cluster node; implements the broker's [`Remote`] port.
pub struct Fabric {
    cluster: Cluster,
    /// Identifies this process's messages (a restarted node is another run).
    run: String,
    next_id: AtomicU64,
    outbox: mpsc::Sender<Outgoing>,
    core_outbox: mpsc::Sender<Outgoing>,
    metrics: Arc<crate::metrics::Metrics>,
    interest: mpsc::UnboundedSender<(Subscription, bool)>,
    /// Topics already logged as unmappable.
    unmappable: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Fabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fabric")
            .field("node", &self.cluster.node())
            .field("run", &self.run)
            .finish()
    }
}

impl Fabric {
    /// Creates the streams, loads the retained messages into `broker`, starts the
    /// inbound paths and attaches itself to the broker. Called before anything is accepted.
    pub async fn start(cluster: Cluster, broker: Arc<Broker>) -> Result<Arc<Fabric>, ClusterError> {
        ensure_streams(&cluster).await?;
        // Before anything is accepted: a message stored from now on reaches this node.
        node_consumer(&cluster).await?;
        let run = cluster.run.clone();
        let (outbox, out_rx) = mpsc::channel(OUTBOX);
        let (core_outbox, core_rx) = mpsc::channel(CORE_OUTBOX);
        let (interest, interest_rx) = mpsc::unbounded_channel();
        let fabric = Arc::new(Fabric {
            cluster: cluster.clone(),
            run: run.clone(),
            next_id: AtomicU64::new(1),
            outbox,
            core_outbox,
            metrics: broker.metrics.clone(),
            interest,
            unmappable: Mutex::new(HashSet::new()),
        });
        let loaded = load_retained(&cluster, &broker).await?;
        tracing::info!(
            retained = loaded,
            "retained messages loaded from the cluster"
        );
        tokio::spawn(publish_loop(cluster.clone(), out_rx));
        // Unconstrained: a turn drains what waits instead of yielding after tokio's
        // per-turn budget, so the node's busy publishers cannot starve forwarding
        // (docs/cluster.md, "Routing").
        tokio::spawn(tokio::task::unconstrained(core_loop(
            cluster.clone(),
            core_rx,
        )));
        tokio::spawn(core_interest(
            cluster.clone(),
            broker.clone(),
            run.clone(),
            interest_rx,
        ));
        tokio::spawn(durable_inbound(
            cluster.clone(),
            broker.clone(),
            run.clone(),
        ));
        tokio::spawn(retained_inbound(cluster, broker.clone(), run));
        broker.attach_remote(fabric.clone());
        Ok(fabric)
    }

    fn log_unmappable(&self, topic: &str, why: &dyn std::fmt::Display) {
        let mut seen = self.unmappable.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() < 1024 && seen.insert(topic.to_owned()) {
            tracing::warn!(topic = ?topic, reason = %why, "message stays on this node");
        }
    }
}

impl Remote for Fabric {
    fn forward(
        &self,
        msg: &Arc<Message>,
        device: Option<&DeviceName>,
        client_id: Option<&str>,
    ) -> Option<Stored> {
        let subject = match topic_to_subject(msg.topic.as_str()) {
            Ok(s) => s,
            Err(why) => {
                self.log_unmappable(msg.topic.as_str(), &why);
                return None;
            }
        };
        let durable = msg.qos != QoS::AtMostOnce;
        let stored = durable || msg.retain;
        let names = &self.cluster.names;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let out = Outgoing {
            subject: names.message(durable, &subject),
            headers: envelope(msg, (device, client_id), self.cluster.node(), &self.run, id),
            payload: msg.payload.clone(),
            durable,
            retained: msg.retain.then(|| names.retained(&subject)),
            done: None,
        };
        if !stored {
            let reason = if !self.cluster.connected() {
                "cluster_unreachable"
            } else if self.core_outbox.try_send(out).is_err() {
                "cluster_backlog"
            } else {
                return None;
            };
            // Counted like any other message a subscriber did not get; logged at powers
            // of two of the running total.
            let total = self.metrics.count_drop(reason);
            if total.is_power_of_two() {
                tracing::warn!(reason, dropped_so_far = total, topic = ?msg.topic.as_str(), "QoS 0 message not forwarded to the other nodes");
            }
            return None;
        }
        let (tx, rx) = oneshot::channel();
        if !self.cluster.connected() {
            let _ = tx.send(Err(CommitError::Failed("NATS is unreachable".into())));
            return Some(rx);
        }
        let out = Outgoing {
            done: Some(tx),
            ..out
        };
        if let Err(e) = self.outbox.try_send(out) {
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "the NATS outbox is full",
                mpsc::error::TrySendError::Closed(_) => "the NATS publisher stopped",
            };
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Err(CommitError::Failed(why.into())));
            return Some(rx);
        }
        Some(rx)
    }

    fn accepting(&self) -> bool {
        self.cluster.connected()
    }

    fn carries(&self, topic: &str) -> bool {
        super::subject::mappable(topic)
    }

    fn interest(&self, sub: &Subscription, added: bool) {
        let _ = self.interest.send((sub.clone(), added));
    }
}

/// The streams every node relies on, created by whichever node starts first.
async fn ensure_streams(cluster: &Cluster) -> Result<(), ClusterError> {
    let names = &cluster.names;
    let messages = stream::Config {
        name: names.messages_stream(),
        subjects: vec![format!("{}.q.>", names.prefix())],
        // Kept until every node's consumer acknowledged it.
        retention: stream::RetentionPolicy::Interest,
        storage: stream::StorageType::File,
        num_replicas: cluster.replicas(),
        max_age: MAX_AGE,
        ..Default::default()
    };
    let retained = stream::Config {
        name: names.retained_stream(),
        subjects: vec![format!("{}.r.>", names.prefix())],
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        num_replicas: cluster.replicas(),
        ..Default::default()
    };
    for config in [messages, retained] {
        let name = config.name.clone();
        cluster
            .js
            .get_or_create_stream(config)
            .await
            .map_err(|e| ClusterError::jetstream(format!("creating stream {name}"), e))?;
    }
    Ok(())
}

/// Headers for a message (see the `header` names).
/// The wall clock in milliseconds since the Unix epoch (0 before it).
fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn envelope(
    msg: &Message,
    (device, client_id): (Option<&DeviceName>, Option<&str>),
    node: &str,
    run: &str,
    id: u64,
) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::NODE, node);
    h.insert(header::RUN, run);
    h.insert(header::ID, format!("{run}-{id}").as_str());
    h.insert(header::QOS, (msg.qos as u8).to_string().as_str());
    if msg.retain {
        h.insert(header::RETAIN, "1");
    }
    if let Some(d) = device {
        h.insert(header::DEVICE, d.as_str());
    }
    if let Some(c) = client_id {
        h.insert(header::CLIENT, json_string(c).as_str());
    }
    if let Some(at) = msg.expires_at {
        // Whole seconds on the wire, rounded up from the millisecond: rounded down (as
        // both ends did), a message lost up to 2 s of its interval on every other node,
        // and one with an interval of 1 s arrived there already expired. Up, it may live
        // up to a second longer there.
        let left = u64::try_from(at.saturating_duration_since(Instant::now()).as_millis())
            .unwrap_or(u64::MAX);
        let unix = unix_millis().saturating_add(left).div_ceil(1000);
        h.insert(header::EXPIRES, unix.to_string().as_str());
    }
    let p = &msg.props;
    if let Some(f) = p.payload_format_indicator {
        h.insert(header::PAYLOAD_FORMAT, f.to_string().as_str());
    }
    if let Some(t) = &p.content_type {
        h.insert(header::CONTENT_TYPE, json_string(t).as_str());
    }
    if let Some(t) = &p.response_topic {
        h.insert(header::RESPONSE_TOPIC, json_string(t).as_str());
    }
    if let Some(d) = &p.correlation_data {
        h.insert(header::CORRELATION_DATA, hex(d).as_str());
    }
    if !p.user_properties.is_empty() {
        let json = serde_json::to_string(&p.user_properties).unwrap_or_default();
        h.insert(header::USER_PROPERTIES, json.as_str());
    }
    h
}

/// A string as JSON, so that no peer-supplied value can break a header line.
fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// A message from NATS, as the broker takes it.
#[derive(Debug)]
pub(crate) struct Envelope {
    pub msg: Message,
    pub device: Option<DeviceName>,
    /// The publishing connection's client id (for No Local after a session moved).
    pub client_id: Option<String>,
    pub node: String,
    pub run: String,
    pub id: String,
}

impl Envelope {
    /// The publishing connection's session key, when the message says (No Local).
    pub(crate) fn origin(&self) -> Option<crate::broker::session::SessionKey> {
        Some(crate::broker::session::SessionKey {
            device: self.device.clone()?,
            client_id: self.client_id.clone()?,
        })
    }
}

/// Reads a message from NATS; None (logged) when it is not a certmq message.
pub(crate) fn open(
    prefix: &str,
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: Bytes,
) -> Option<Envelope> {
    let headers = headers?;
    let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
    // <prefix>.<class>.<mapped topic>
    let mapped = subject.strip_prefix(prefix)?.get(3..)?;
    let topic = TopicName::parse(&subject_to_topic(mapped)).ok()?;
    let qos = match get(header::QOS)?.as_str() {
        "0" => QoS::AtMostOnce,
        "1" => QoS::AtLeastOnce,
        "2" => QoS::ExactlyOnce,
        _ => return None,
    };
    let json = |name: &str| get(name).and_then(|v| serde_json::from_str::<String>(&v).ok());
    let props = Forwarded {
        payload_format_indicator: get(header::PAYLOAD_FORMAT).and_then(|v| v.parse().ok()),
        response_topic: json(header::RESPONSE_TOPIC),
        correlation_data: get(header::CORRELATION_DATA)
            .and_then(|v| unhex(&v))
            .map(Bytes::from),
        user_properties: get(header::USER_PROPERTIES)
            .and_then(|v| serde_json::from_str(&v).ok())
            .unwrap_or_default(),
        content_type: json(header::CONTENT_TYPE),
    };
    let expires_at = get(header::EXPIRES)
        .and_then(|v| v.parse::<u64>().ok())
        .map(|unix| {
            // Measured from this millisecond, not from the start of this second.
            let left = unix.saturating_mul(1000).saturating_sub(unix_millis());
            Instant::now() + Duration::from_millis(left)
        });
    Some(Envelope {
        msg: Message {
            topic,
            payload,
            qos,
            retain: get(header::RETAIN).as_deref() == Some("1"),
            props,
            expires_at,
            store_id: Default::default(),
        },
        device: get(header::DEVICE).and_then(|d| DeviceName::parse(&d).ok()),
        client_id: json(header::CLIENT),
        node: get(header::NODE).unwrap_or_default(),
        run: get(header::RUN).unwrap_or_default(),
        id: get(header::ID).unwrap_or_default(),
    })
}

/// Publishes the QoS 0 messages the broker forwards, in order, a batch per turn.
async fn core_loop(cluster: Cluster, mut rx: mpsc::Receiver<Outgoing>) {
    let mut batch = Vec::with_capacity(CORE_BATCH);
    while rx.recv_many(&mut batch, CORE_BATCH).await > 0 {
        for out in batch.drain(..) {
            if let Err(e) = cluster
                .client
                .publish_with_headers(out.subject, out.headers, out.payload)
                .await
            {
                tracing::debug!(error = %e, "QoS 0 message not forwarded");
            }
        }
    }
}

/// Publishes what the broker forwards, in order. A stored message's acknowledgement is
/// awaited off this loop, so publishing goes on meanwhile.
async fn publish_loop(cluster: Cluster, mut rx: mpsc::Receiver<Outgoing>) {
    while let Some(out) = rx.recv().await {
        let mut acks = Vec::new();
        let mut failed = None;
        // The message itself: stored (QoS 1/2) or core (retained QoS 0).
        if out.durable {
            match cluster
                .js
                .publish_with_headers(out.subject, out.headers.clone(), out.payload.clone())
                .await
            {
                Ok(ack) => acks.push(ack),
                Err(e) => failed = Some(e.to_string()),
            }
        } else if let Err(e) = cluster
            .client
            .publish_with_headers(out.subject, out.headers.clone(), out.payload.clone())
            .await
        {
            tracing::debug!(error = %e, "retained QoS 0 message not forwarded");
        }
        if let (Some(subject), None) = (out.retained, &failed) {
            match cluster
                .js
                .publish_with_headers(subject, out.headers, out.payload)
                .await
            {
                Ok(ack) => acks.push(ack),
                Err(e) => failed = Some(e.to_string()),
            }
        }
        let Some(done) = out.done else { continue };
        if let Some(e) = failed {
            let _ = done.send(Err(CommitError::Failed(format!("JetStream: {e}"))));
            continue;
        }
        tokio::spawn(async move {
            let mut outcome = Ok(());
            for ack in acks {
                match tokio::time::timeout(STORE_TIMEOUT, ack).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => outcome = Err(CommitError::Failed(format!("JetStream: {e}"))),
                    Err(_) => {
                        outcome = Err(CommitError::Failed(format!(
                            "JetStream did not acknowledge within {STORE_TIMEOUT:?}"
                        )))
                    }
                }
            }
            let _ = done.send(outcome);
        });
    }
}

/// Recent message ids, to drop the second copy a node gets through overlapping filters.
struct Recent {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl Recent {
    fn new() -> Recent {
        Recent {
            set: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// True the first time `id` is seen (within the window).
    fn first(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() == RECENT_IDS {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.set.insert(id.to_owned());
        self.order.push_back(id.to_owned());
        true
    }
}

/// Keeps one core subscription per subscribed filter (QoS 0 path), following the
/// router's interest changes in order.
async fn core_interest(
    cluster: Cluster,
    broker: Arc<Broker>,
    run: String,
    mut changes: mpsc::UnboundedReceiver<(Subscription, bool)>,
) {
    let recent = Arc::new(Mutex::new(Recent::new()));
    let mut subscribed: HashMap<Subscription, Vec<tokio::task::JoinHandle<()>>> = HashMap::new();
    while let Some((sub, added)) = changes.recv().await {
        if !added {
            for task in subscribed.remove(&sub).unwrap_or_default() {
                task.abort();
            }
            continue;
        }
        let filter = match &sub {
            Subscription::Plain(f) => f.as_str(),
            Subscription::Shared { filter, .. } => filter.as_str(),
        };
        let subjects = match filter_to_subjects(filter) {
            Ok(s) => s,
            Err(why) => {
                tracing::warn!(filter = ?filter, reason = %why, "filter matches messages of this node only");
                continue;
            }
        };
        let mut tasks = Vec::new();
        for subject in subjects {
            let core = cluster.names.message(false, &subject);
            let subscribed_core = match &sub {
                Subscription::Plain(_) => cluster.client.subscribe(core.clone()).await,
                Subscription::Shared { group, .. } => {
                    // The group's QoS 1/2 messages: one consumer for the group, pulled by
                    // every node with members, so each goes to one node.
                    tasks.push(tokio::spawn(shared_durable(
                        cluster.clone(),
                        broker.clone(),
                        sub.clone(),
                        subject.clone(),
                    )));
                    let queue = share_name(group, &subject);
                    cluster.client.queue_subscribe(core.clone(), queue).await
                }
            };
            match subscribed_core {
                Ok(s) => tasks.push(tokio::spawn(core_reader(
                    cluster.names.prefix().to_owned(),
                    s,
                    broker.clone(),
                    run.clone(),
                    recent.clone(),
                    sub.clone(),
                ))),
                Err(e) => {
                    tracing::error!(subject = %core, error = %e, "cannot subscribe on NATS")
                }
            }
        }
        subscribed.insert(sub, tasks);
    }
}

async fn core_reader(
    prefix: String,
    mut nats: async_nats::Subscriber,
    broker: Arc<Broker>,
    run: String,
    recent: Arc<Mutex<Recent>>,
    sub: Subscription,
) {
    while let Some(m) = nats.next().await {
        let Some(env) = open(&prefix, m.subject.as_str(), m.headers.as_ref(), m.payload) else {
            continue;
        };
        if let Subscription::Shared { .. } = &sub {
            // A queue group: NATS chose this node, for this node's messages too (local
            // routing leaves shared groups out).
            let _ = broker.publish_shared(Arc::new(env.msg), &sub, false);
            continue;
        }
        if env.run == run {
            continue;
        }
        if !recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .first(&env.id)
        {
            continue;
        }
        // QoS 0: nobody to pace; a full queue drops it, counted as for a local publisher.
        let origin = env.origin();
        let _ = broker.publish_remote(Arc::new(env.msg), origin.as_ref(), false);
    }
}

/// This node's durable consumer on the stored messages (QoS 1/2 path). Retries while
/// NATS is away; the consumer keeps its place, so nothing stored is missed.
async fn durable_inbound(cluster: Cluster, broker: Arc<Broker>, run: String) {
    let name = format!("node-{}", cluster.node());
    loop {
        match consume(&cluster, &broker, &run, &name).await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(consumer = %name, error = %e, "stored-message consumer failed; retrying")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The NATS queue group / consumer name of a shared subscription on one subject: group
/// names may hold characters NATS names cannot, so a digest.
fn share_name(group: &str, subject: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(group.as_bytes());
    ctx.update(&[0]);
    ctx.update(subject.as_bytes());
    let digest = ctx.finish();
    format!("share-{}", hex(&digest.as_ref()[..12]))
}

/// A shared subscription's stored messages: one durable consumer per (group, subject)
/// pulled by every node that has members, so each message reaches one member in the
/// cluster. Runs while this node has members (aborted when the last one leaves).
async fn shared_durable(cluster: Cluster, broker: Arc<Broker>, sub: Subscription, subject: String) {
    let Subscription::Shared { group, .. } = &sub else {
        return;
    };
    let name = share_name(group, &subject);
    loop {
        let consumer = async {
            let stream = cluster
                .js
                .get_stream(cluster.names.messages_stream())
                .await
                .map_err(|e| ClusterError::jetstream("opening the message stream", e))?;
            stream
                .get_or_create_consumer(
                    &name,
                    consumer::pull::Config {
                        durable_name: Some(name.clone()),
                        filter_subject: cluster.names.message(true, &subject),
                        ack_policy: consumer::AckPolicy::Explicit,
                        ack_wait: ACK_WAIT,
                        max_ack_pending: MAX_ACK_PENDING,
                        deliver_policy: consumer::DeliverPolicy::New,
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| ClusterError::jetstream(format!("creating consumer {name}"), e))
        };
        let outcome: Result<(), ClusterError> = async {
            let consumer: consumer::PullConsumer = consumer.await?;
            let mut messages = consumer
                .messages()
                .await
                .map_err(|e| ClusterError::jetstream(format!("reading consumer {name}"), e))?;
            while let Some(m) = messages.next().await {
                let m = m.map_err(|e| ClusterError::jetstream(format!("consumer {name}"), e))?;
                if let Some(env) = open(
                    cluster.names.prefix(),
                    m.subject.as_str(),
                    m.headers.as_ref(),
                    m.payload.clone(),
                ) {
                    take_durable(&broker, env, Some(&sub)).await;
                }
                if let Err(e) = m.ack().await {
                    tracing::warn!(error = %e, "shared message not acknowledged to JetStream; it will come again");
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = outcome {
            tracing::warn!(consumer = %name, error = %e, "shared-subscription consumer failed; retrying");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// This node's durable consumer on the stored messages, created if missing.
async fn node_consumer(cluster: &Cluster) -> Result<consumer::PullConsumer, ClusterError> {
    let name = format!("node-{}", cluster.node());
    let stream = cluster
        .js
        .get_stream(cluster.names.messages_stream())
        .await
        .map_err(|e| ClusterError::jetstream("opening the message stream", e))?;
    stream
        .get_or_create_consumer(
            &name,
            consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: format!("{}.q.>", cluster.names.prefix()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                max_ack_pending: MAX_ACK_PENDING,
                // A new node starts with what is published from now on.
                deliver_policy: consumer::DeliverPolicy::New,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| ClusterError::jetstream(format!("creating consumer {name}"), e))
}

async fn consume(
    cluster: &Cluster,
    broker: &Arc<Broker>,
    run: &str,
    name: &str,
) -> Result<(), ClusterError> {
    let consumer = node_consumer(cluster).await?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| ClusterError::jetstream(format!("reading consumer {name}"), e))?;
    // The stream sequences this node handled lately. A subscriber that is slow but keeps
    // making progress paces this consumer (`take_durable`) past the acknowledgement wait
    // for the messages pulled behind the one it waits on, and JetStream sends those
    // again; a copy of one handled already is acknowledged and not delivered twice (a
    // QoS 2 subscriber beside the slow one got it twice). A window of the last
    // `RECENT_IDS` is far more than can be unacknowledged (`MAX_ACK_PENDING`).
    let mut handled = Recent::new();
    while let Some(m) = messages.next().await {
        let m = m.map_err(|e| ClusterError::jetstream(format!("consumer {name}"), e))?;
        if let Ok(info) = m.info() {
            if !handled.first(&info.stream_sequence.to_string()) {
                tracing::debug!(
                    sequence = info.stream_sequence,
                    "a stored message came again after it was handled; not delivered twice"
                );
                if let Err(e) = m.ack().await {
                    tracing::warn!(error = %e, "stored message not acknowledged to JetStream; it will come again");
                }
                continue;
            }
        }
        let env = open(
            cluster.names.prefix(),
            m.subject.as_str(),
            m.headers.as_ref(),
            m.payload.clone(),
        );
        if let Some(env) = env.filter(|e| e.run != run) {
            take_durable(broker, env, None).await;
        }
        if let Err(e) = m.ack().await {
            tracing::warn!(error = %e, "stored message not acknowledged to JetStream; it will come again");
        }
    }
    Ok(())
}

/// Delivers a stored message to this node's sessions: waits (up to each subscriber's
/// stall deadline) for room in full queues, and for the local commit of what persistent
/// sessions queued, before the caller acknowledges it to JetStream.
async fn take_durable(broker: &Arc<Broker>, env: Envelope, shared: Option<&Subscription>) {
    tracing::trace!(from = %env.node, id = %env.id, topic = ?env.msg.topic.as_str(), "stored message from another node");
    let origin = env.origin();
    let msg = Arc::new(env.msg);
    let mut published = match shared {
        Some(sub) => broker.publish_shared(msg, sub, true),
        None => broker.publish_remote(msg, origin.as_ref(), true),
    };
    let mut waiting = std::mem::take(&mut published.waiting);
    let stall = broker.stall_timeout();
    while let Some((session, delivery)) = waiting.pop() {
        let deadline = session.stall_deadline(stall);
        let mut delivery = delivery;
        loop {
            let room = session.room();
            tokio::pin!(room);
            room.as_mut().enable();
            match broker.offer(&mut published, &session, delivery) {
                Ok(()) => break,
                Err(back) => delivery = back,
            }
            tokio::select! {
                () = room => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }
    if published.durable {
        if let Some(journal) = broker.journal() {
            if let Err(e) = journal.barrier().await {
                tracing::error!(error = %e, "a stored message from another node was not committed locally");
            }
        }
    }
}

/// Loads the last retained message of every subject into the local store (at start,
/// before anything is accepted). Returns how many.
async fn load_retained(cluster: &Cluster, broker: &Arc<Broker>) -> Result<usize, ClusterError> {
    let stream = cluster
        .js
        .get_stream(cluster.names.retained_stream())
        .await
        .map_err(|e| ClusterError::jetstream("opening the retained stream", e))?;
    let mut info = stream.clone();
    let pending = info
        .info()
        .await
        .map_err(|e| ClusterError::jetstream("reading the retained stream", e))?
        .state
        .messages;
    if pending == 0 {
        return Ok(0);
    }
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: format!("{}.r.>", cluster.names.prefix()),
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|e| ClusterError::jetstream("reading the retained stream", e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| ClusterError::jetstream("reading the retained stream", e))?;
    let mut loaded = 0;
    while loaded < pending as usize {
        let next = tokio::time::timeout(STORE_TIMEOUT, messages.next()).await;
        let Ok(Some(Ok(m))) = next else { break };
        let info = m.info().ok().map(|i| i.pending);
        if let Some(env) = open(
            cluster.names.prefix(),
            m.subject.as_str(),
            m.headers.as_ref(),
            m.payload.clone(),
        ) {
            broker.retain_remote(Arc::new(env.msg), env.device.as_ref());
        }
        loaded += 1;
        if info == Some(0) {
            break;
        }
    }
    Ok(loaded)
}

/// Follows retained changes made on other nodes (an ordered consumer from now on).
async fn retained_inbound(cluster: Cluster, broker: Arc<Broker>, run: String) {
    loop {
        let stream = match cluster.js.get_stream(cluster.names.retained_stream()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "retained stream unavailable; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("{}.r.>", cluster.names.prefix()),
                deliver_policy: consumer::DeliverPolicy::New,
                ..Default::default()
            })
            .await;
        let mut messages = match consumer {
            Ok(c) => match c.messages().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "retained consumer failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "retained consumer failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(Ok(m)) = messages.next().await {
            if let Some(env) = open(
                cluster.names.prefix(),
                m.subject.as_str(),
                m.headers.as_ref(),
                m.payload.clone(),
            ) {
                if env.run != run {
                    broker.retain_remote(Arc::new(env.msg), env.device.as_ref());
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_survives_the_envelope() {
        let msg = Message {
            topic: TopicName::parse("a.b/c d").unwrap(),
            payload: Bytes::from_static(b"\x00\xffpayload"),
            qos: QoS::ExactlyOnce,
            retain: true,
            props: Forwarded {
                payload_format_indicator: Some(1),
                response_topic: Some("reply/\r\nX-Injected: 1".into()),
                correlation_data: Some(Bytes::from_static(&[0, 1, 0xfe])),
                user_properties: vec![("k\n".into(), "v: w".into()), ("k\n".into(), "2".into())],
                content_type: Some("application/json".into()),
            },
            expires_at: Some(Instant::now() + Duration::from_secs(100)),
            store_id: Default::default(),
        };
        let device = DeviceName::parse("dev-1").unwrap();
        let headers = envelope(&msg, (Some(&device), Some("c 1")), "a", "run1", 7);
        // The topic with a space is unmappable; use a mappable one for the subject.
        let env = open("p", "p.q.a//b.c", Some(&headers), msg.payload.clone()).unwrap();
        assert_eq!(env.msg.topic.as_str(), "a.b/c");
        assert_eq!(env.msg.payload, msg.payload);
        assert_eq!(env.msg.qos, QoS::ExactlyOnce);
        assert!(env.msg.retain);
        assert_eq!(env.msg.props, msg.props);
        // Rounded up to the second on the wire: up to a second more, never less (but for
        // the time this test takes).
        let left = env.msg.expires_at.unwrap() - Instant::now();
        assert!(
            left <= Duration::from_secs(101) && left >= Duration::from_secs(95),
            "{left:?}"
        );
        assert_eq!(env.device, Some(device));
        assert_eq!(env.client_id.as_deref(), Some("c 1"));
        assert_eq!(
            (env.node.as_str(), env.run.as_str(), env.id.as_str()),
            ("a", "run1", "run1-7")
        );
    }

    #[test]
    fn a_foreign_message_is_ignored() {
        assert!(open("p", "p.m.a", None, Bytes::new()).is_none());
        let mut h = HeaderMap::new();
        h.insert(header::QOS, "3");
        assert!(open("p", "p.m.a", Some(&h), Bytes::new()).is_none());
    }

    #[test]
    fn recent_ids_drop_the_second_copy_within_the_window() {
        let mut r = Recent::new();
        assert!(r.first("a"));
        assert!(!r.first("a"));
        for i in 0..RECENT_IDS {
            r.first(&i.to_string());
        }
        assert!(r.first("a"), "forgotten after the window");
    }
}
