//! Wills of a node that dies (docs/cluster.md, "Wills of a node that dies").
//!
//! While a connection with a will is attached, its node keeps the will in the
//! `<prefix>_wills` bucket under `<claim key>.<run>` (the session's claim key, see
//! `claims`, and this process's run), with everything needed to publish it elsewhere: the
//! message, its delay, the session's claim revision, the device and the certificate the
//! connection was admitted with. The record is marked when the connection ends with a
//! delay, and removed when the will is published or cancelled here (`writer`).
//!
//! Every node follows the others' heartbeats (`nodes`). Once a run is dead, the other
//! nodes race for each of its records; removing the record's exact revision is the
//! compare-and-set that gives it to exactly one of them (`heir`). That node waits what
//! remains of the delay (keeping the record under its own run meanwhile, so that its own
//! death passes it on), drops it if a connection claimed the session since, decides the
//! device's standing against its own registry and config, and publishes it.
//!
//! Keys name the run that holds the record, so two nodes never write one key, and a
//! removed record's key is never written again: records are removed by erasing their
//! message (no delete marker), and the bucket holds only live wills.

mod heir;
mod writer;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::claims::{claim_key, Claims};
use super::nodes::Liveness;
use super::{Cluster, ClusterError};
use crate::broker::message::{Forwarded, Message};
use crate::broker::remote::{WillGates, WillKeeper, WillPresenter};
use crate::broker::session::SessionKey;
use crate::broker::{Broker, Will};
use crate::cert::Fingerprint;
use crate::cluster::{hex, unhex};
use crate::identity::DeviceName;
use crate::mqtt::codec::QoS;
use crate::mqtt::topic::TopicName;
use crate::registry::Source;
use rustls_pki_types::CertificateDer;

/// A will as the bucket keeps it (JSON; bytes in hex).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Record {
    /// The node and run holding the record now: the connection's, or the node that took
    /// it over from a dead one.
    node: String,
    run: String,
    /// The node and run the connection was on.
    origin: Origin,
    /// Tells successive connections of one session on the holder apart (0 once taken
    /// over).
    ticket: u64,
    device: String,
    client_id: String,
    /// The revision of the session's claim when the connection opened (None: the claim
    /// could not be written). A claim since is a new connection: it cancels the will.
    claim: Option<u64>,
    /// Seconds the will waits after the connection ended (the session's expiry caps it).
    delay: u32,
    /// When the connection ended (unix milliseconds of the holder's clock); None while it
    /// is attached.
    ended: Option<i64>,
    message: StoredMessage,
    presenter: Option<StoredPresenter>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Origin {
    node: String,
    run: String,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct StoredMessage {
    topic: String,
    payload: String,
    qos: u8,
    retain: bool,
    /// The message expiry deadline, unix seconds.
    expires: Option<i64>,
    payload_format: Option<u8>,
    content_type: Option<String>,
    response_topic: Option<String>,
    correlation_data: Option<String>,
    user_properties: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct StoredPresenter {
    source: String,
    fingerprint: String,
    /// DER, leaf first.
    chain: Vec<String>,
}

/// Unix milliseconds now.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

impl StoredMessage {
    fn of(msg: &Message) -> StoredMessage {
        let expires = msg.expires_at.map(|at| {
            let left = at.saturating_duration_since(Instant::now()).as_secs();
            crate::cert::now_secs().saturating_add(i64::try_from(left).unwrap_or(i64::MAX))
        });
        let p = &msg.props;
        StoredMessage {
            topic: msg.topic.as_str().to_owned(),
            payload: hex(&msg.payload),
            qos: msg.qos as u8,
            retain: msg.retain,
            expires,
            payload_format: p.payload_format_indicator,
            content_type: p.content_type.clone(),
            response_topic: p.response_topic.clone(),
            correlation_data: p.correlation_data.as_deref().map(hex),
            user_properties: p.user_properties.clone(),
        }
    }

    fn message(&self) -> Result<Message, String> {
        let topic = TopicName::parse(&self.topic).map_err(|e| format!("topic: {e}"))?;
        let payload = unhex(&self.payload).ok_or("payload: not hex")?;
        let qos = match self.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            2 => QoS::ExactlyOnce,
            q => return Err(format!("QoS {q}")),
        };
        let correlation_data = match &self.correlation_data {
            None => None,
            Some(h) => Some(Bytes::from(unhex(h).ok_or("correlation data: not hex")?)),
        };
        let expires_at = self.expires.map(|unix| {
            let left = u64::try_from(unix - crate::cert::now_secs()).unwrap_or(0);
            Instant::now() + std::time::Duration::from_secs(left)
        });
        Ok(Message {
            topic,
            payload: Bytes::from(payload),
            qos,
            retain: self.retain,
            props: Forwarded {
                payload_format_indicator: self.payload_format,
                response_topic: self.response_topic.clone(),
                correlation_data,
                user_properties: self.user_properties.clone(),
                content_type: self.content_type.clone(),
            },
            expires_at,
            store_id: Default::default(),
        })
    }
}

impl StoredPresenter {
    fn of(p: &WillPresenter) -> StoredPresenter {
        StoredPresenter {
            source: p.source.as_str().to_owned(),
            fingerprint: p.fingerprint.to_hex(),
            chain: p.chain.iter().map(|c| hex(c)).collect(),
        }
    }

    fn presenter(&self) -> Result<WillPresenter, String> {
        let fingerprint = Fingerprint::from_hex(&self.fingerprint).ok_or("fingerprint: not hex")?;
        let chain = self
            .chain
            .iter()
            .map(|c| unhex(c).map(CertificateDer::from))
            .collect::<Option<Vec<_>>>()
            .ok_or("certificate: not hex")?;
        Ok(WillPresenter {
            source: Source::from_stored(self.source.clone()),
            fingerprint,
            chain: Arc::new(chain),
        })
    }
}

impl Record {
    /// The bucket key of the record of a connection on `run` to the session `claim` (its
    /// claim key).
    fn key(claim: &str, run: &str) -> String {
        format!("{claim}.{run}")
    }

    /// The bucket key of a record `run` took over from a dead node: apart from its own
    /// connections' records, so that neither overwrites the other.
    fn held_key(claim: &str, run: &str) -> String {
        format!("{claim}.{run}.h")
    }

    /// The claim key and run a bucket key names; None for a key certmq did not write.
    fn split_key(key: &str) -> Option<(&str, &str)> {
        let key = key.strip_suffix(".h").unwrap_or(key);
        let (claim, run) = key.split_once('.')?;
        let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
        (hex(claim) && hex(run)).then_some((claim, run))
    }

    fn decode(value: &[u8]) -> Result<Record, String> {
        serde_json::from_slice(value).map_err(|e| e.to_string())
    }

    fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// This node's side of the wills: the broker's [`WillKeeper`], and the survivors' work
/// once [`Wills::inherit`] started it.
#[derive(Debug)]
pub struct Wills {
    cluster: Cluster,
    store: async_nats::jetstream::kv::Store,
    claims: Arc<Claims>,
    liveness: Arc<Liveness>,
    ops: mpsc::UnboundedSender<writer::Op>,
    /// Tickets whose record another node took over (it took this node for dead): their
    /// wills are not published here as well.
    taken: Arc<Mutex<HashSet<u64>>>,
    /// Set by [`Wills::stop`]: the wills still waiting here are the other nodes' now.
    stopped: AtomicBool,
}

impl Wills {
    /// Opens (creating) the buckets, starts this node's heartbeat and the writer of its
    /// records, and attaches itself to the broker as its [`WillKeeper`].
    pub async fn start(
        cluster: &Cluster,
        claims: Arc<Claims>,
        broker: &Broker,
    ) -> Result<Arc<Wills>, ClusterError> {
        let liveness = Liveness::start(cluster).await?;
        let store = super::erasable_bucket(
            cluster,
            "wills",
            "certmq wills of connected devices (docs/cluster.md)",
        )
        .await?;
        let (ops, rx) = mpsc::unbounded_channel();
        let taken = Arc::new(Mutex::new(HashSet::new()));
        tokio::spawn(writer::run(
            writer::Writer {
                cluster: cluster.clone(),
                store: store.clone(),
                taken: taken.clone(),
            },
            rx,
        ));
        let (live, audit) = (liveness.clone(), ops.clone());
        tokio::spawn(async move {
            loop {
                live.gap_ended().await;
                if audit.send(writer::Op::Audit).is_err() {
                    return;
                }
            }
        });
        let wills = Arc::new(Wills {
            cluster: cluster.clone(),
            store,
            claims,
            liveness,
            ops,
            taken,
            stopped: AtomicBool::new(false),
        });
        broker.attach_wills(wills.clone());
        Ok(wills)
    }

    /// Starts taking over the wills of dead nodes, published through `broker` once
    /// `gates` allows them. Called once the registry answers (the check reads it).
    /// Which nodes are alive, as this node tells (heartbeats).
    pub fn liveness(&self) -> Arc<super::nodes::Liveness> {
        self.liveness.clone()
    }

    pub fn inherit(&self, broker: Arc<Broker>, gates: WillGates) {
        let heir = heir::Heir {
            cluster: self.cluster.clone(),
            store: self.store.clone(),
            claims: self.claims.clone(),
            liveness: self.liveness.clone(),
            broker,
            gates,
        };
        tokio::spawn(heir::run(Arc::new(heir)));
    }

    /// A graceful stop, once the connections are closed (their wills cancelled: a node
    /// shutting down publishes none, as standalone): writes what is queued (within
    /// `limit`), then marks this run stopped, so that the other nodes take over at once
    /// the wills still waiting out their delay here.
    pub async fn stop(&self, limit: Duration) {
        self.stopped.store(true, Ordering::Relaxed);
        let (done, flushed) = tokio::sync::oneshot::channel();
        let _ = self.ops.send(writer::Op::Flush(done));
        if tokio::time::timeout(limit, flushed).await.is_err() {
            tracing::warn!("will records not all written at stop");
        }
        self.liveness.stop().await;
    }

    fn taken(&self) -> MutexGuard<'_, HashSet<u64>> {
        self.taken.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_key(&self, key: &SessionKey) -> String {
        Record::key(&claim_key(key), &self.cluster.run)
    }
}

impl WillKeeper for Wills {
    fn will_set(&self, key: &SessionKey, will: &Will, delay: u32) {
        let origin = Origin {
            node: self.cluster.node().to_owned(),
            run: self.cluster.run.clone(),
        };
        let record = Record {
            node: origin.node.clone(),
            run: origin.run.clone(),
            origin,
            ticket: will.ticket(),
            device: key.device.as_str().to_owned(),
            client_id: key.client_id.clone(),
            claim: self.claims.revision(key),
            delay,
            ended: None,
            message: StoredMessage::of(&will.message),
            presenter: will.presenter.as_ref().map(StoredPresenter::of),
        };
        let _ = self.ops.send(writer::Op::Set {
            key: self.record_key(key),
            record: Box::new(record),
        });
    }

    fn will_pending(&self, key: &SessionKey, ticket: u64, delay: u32) {
        let _ = self.ops.send(writer::Op::Pending {
            key: self.record_key(key),
            ticket,
            delay,
            ended: now_ms(),
        });
    }

    fn will_clear(&self, key: &SessionKey, ticket: u64) {
        self.taken().remove(&ticket);
        let _ = self.ops.send(writer::Op::Clear {
            key: self.record_key(key),
            ticket,
        });
    }

    fn will_ours(&self, key: &SessionKey, ticket: u64, delayed: bool) -> bool {
        if self.stopped.load(Ordering::Relaxed) {
            return false;
        }
        let taken = self.taken().contains(&ticket);
        let moved = delayed && self.claims.lost(key);
        !taken && !moved
    }
}

/// The device a record speaks for.
fn device_of(record: &Record) -> Result<DeviceName, String> {
    DeviceName::parse(&record.device).map_err(|e| format!("device: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn record() -> Record {
        let msg = Message {
            topic: TopicName::parse("devices/d1/status").unwrap(),
            payload: Bytes::from_static(b"\x00gone\xff"),
            qos: QoS::AtLeastOnce,
            retain: true,
            props: Forwarded {
                payload_format_indicator: Some(1),
                response_topic: Some("r/\"x\"".into()),
                correlation_data: Some(Bytes::from_static(&[0, 1, 254])),
                user_properties: vec![("k".into(), "v\n".into())],
                content_type: Some("text/plain".into()),
            },
            expires_at: Some(Instant::now() + std::time::Duration::from_secs(100)),
            store_id: Default::default(),
        };
        Record {
            node: "a".into(),
            run: "0123456789abcdef".into(),
            origin: Origin {
                node: "a".into(),
                run: "0123456789abcdef".into(),
            },
            ticket: 7,
            device: "d1".into(),
            client_id: "c".into(),
            claim: Some(42),
            delay: 30,
            ended: None,
            message: StoredMessage::of(&msg),
            presenter: Some(StoredPresenter {
                source: "fleet".into(),
                fingerprint: Fingerprint::of(b"leaf").to_hex(),
                chain: vec![hex(b"leaf"), hex(b"ca")],
            }),
        }
    }

    #[test]
    fn a_will_survives_its_record() {
        let r = record();
        let back = Record::decode(&r.encode()).unwrap();
        assert_eq!(back, r);
        let msg = back.message.message().unwrap();
        assert_eq!(msg.topic.as_str(), "devices/d1/status");
        assert_eq!(&msg.payload[..], b"\x00gone\xff");
        assert_eq!((msg.qos, msg.retain), (QoS::AtLeastOnce, true));
        assert_eq!(
            msg.props.correlation_data.as_deref(),
            Some(&[0u8, 1, 254][..])
        );
        assert_eq!(msg.props.user_properties, vec![("k".into(), "v\n".into())]);
        let left = msg.expires_at.unwrap() - Instant::now();
        assert!(left.as_secs() >= 95 && left.as_secs() <= 100, "{left:?}");
        let p = back.presenter.unwrap().presenter().unwrap();
        assert_eq!(p.source, Source::Anchor("fleet".into()));
        assert_eq!(p.fingerprint, Fingerprint::of(b"leaf"));
        assert_eq!(p.chain[1].as_ref(), b"ca");
    }

    #[test]
    fn keys_name_the_session_and_the_run() {
        let key = Record::key("ab12", "0123456789abcdef");
        assert_eq!(Record::split_key(&key), Some(("ab12", "0123456789abcdef")));
        let held = Record::held_key("ab12", "0123456789abcdef");
        assert_ne!(held, key);
        assert_eq!(Record::split_key(&held), Some(("ab12", "0123456789abcdef")));
        for foreign in ["x", "ab.", ".ab", "ab.cd.ef", "zz.12", "ab.c-d", "ab.h"] {
            assert_eq!(Record::split_key(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn a_damaged_record_is_refused_not_guessed() {
        let mut r = record();
        r.message.payload = "abc".into();
        assert!(r.message.message().is_err());
        let mut r = record();
        r.message.qos = 3;
        assert!(r.message.message().is_err());
        let mut r = record();
        r.message.topic = "a/#".into();
        assert!(r.message.message().is_err());
        assert!(Record::decode(b"{}").is_err());
    }
}
