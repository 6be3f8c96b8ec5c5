//! CONNECT admission (contract §3, 4), from the CONNECT packet to a session the broker may
//! open: the decision (first as a dry run), the authentication method, the client id, the
//! will, the session quota, then the registry commit and what it implies (a new entry
//! forgets the name's old sessions; a rotation cuts the superseded certificate). A refusal
//! writes nothing to the registry and is logged and counted here; the caller only sends
//! the CONNACK it gets back.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, UnixTime};

use super::live::Scope;
use super::Shared;
use crate::acl::DeviceAcl;
use crate::auth::{self, Admission, Decision, Presenter};
use crate::broker::conn::connect::{self, ClientId, ConnectRequest};
use crate::broker::expiry::{self, Granted};
use crate::broker::message::Message;
use crate::broker::remote::WillPresenter;
use crate::broker::session::{Expiry, SessionKey};
use crate::broker::{OpenRefused, Will, WillGate};
use crate::cert::{now_secs, Fingerprint};
use crate::config::{Config, Limits};
use crate::identity::DeviceName;
use crate::mqtt::codec::{Connect, Packet, Protocol};
use crate::registry::{Admitted, Mode};
use crate::tls::policy::ChainReport;
use crate::tls::Verdict;

/// An admitted CONNECT: everything opening its session needs.
pub(super) struct Accepted {
    pub req: ConnectRequest,
    pub admission: Admission,
    pub client_id: ClientId,
    pub key: SessionKey,
    pub acl: Arc<DeviceAcl>,
    pub will: Option<Will>,
    pub granted: Granted,
    /// The config it was decided under (a reload meanwhile means deciding once more).
    pub config: Arc<Config>,
    /// The registry generation read before the admission read the registry (a
    /// registry-driven re-check meanwhile means deciding once more: `Live::registry_changed`).
    pub registry_generation: u64,
    pub chain: Arc<Vec<CertificateDer<'static>>>,
    pub line: DecisionLine,
    /// When the connection must have its chain decided again because a certificate of it
    /// expires (seconds, ascending): see [`expiry_deadlines`].
    pub expires: Vec<i64>,
}

/// Why a CONNECT was not admitted: the CONNACK to send, if any (None when the decision
/// itself failed to run). Already logged and counted.
pub(super) type Refusal = Option<Packet>;

/// Decides a CONNECT (contract §3 step 8 and the checks of contract §4-6), committing to the
/// registry only once it is accepted.
///
/// `verdict`: what the TLS verifier decided in this connection's handshake, if it ran
/// (never on resumption); reused for steps 2 to 4 only under the conditions of
/// [`reusable`].
pub(super) async fn admit(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    packet: Connect,
    chain: Vec<CertificateDer<'static>>,
    verdict: Option<Verdict>,
    limits: &Limits,
) -> Result<Accepted, Refusal> {
    let metrics = &shared.metrics;
    let req = ConnectRequest::from_packet(&packet);
    // Before any registry read below: a registry change whose re-check misses this
    // connection bumps it after this read (`Live::registry_changed`).
    let registry_generation = shared.live.registry_generation();
    let config = shared.snapshot().config.clone();
    let chain = Arc::new(chain);
    let verified = reusable(verdict, &config, &chain);
    // A dry run first: every other reason to refuse is known before anything is written.
    let dry = decide(
        shared,
        &config,
        &chain,
        Mode::DryRun,
        peer,
        verified.clone(),
    )
    .await
    .ok_or(None)?;
    let line = DecisionLine::new(peer, &req, &dry, &config);
    let expires = expiry_deadlines(&dry.report);
    let refuse = |label: &'static str, why: &dyn std::fmt::Display, ack: Packet| {
        line.refused(label, why);
        metrics.auth_refused(label);
        connect::within_client_max(ack, &req)
    };
    let refuse_decision =
        |r: &auth::Refused| refuse(r.label(), r, connect::connack_refused(req.protocol, r));
    let admission = match dry.result {
        Ok(a) => a,
        Err(r) => return Err(refuse_decision(&r)),
    };
    let device = admission.device.clone();
    if let Some(method) = &req.authentication_method {
        let why = format!("enhanced authentication {method:?} is not supported");
        let ack = connect::connack_bad_auth_method(method);
        return Err(refuse("bad_authentication_method", &why, ack));
    }
    // Client identifier (contract §4) and will (contract §5, 6).
    let client_id = match connect::client_id(&req) {
        Ok(id) => id,
        Err(why) => {
            let ack = connect::connack_bad_client_id(req.protocol, &why);
            return Err(refuse("bad_client_id", &why, ack));
        }
    };
    let acl = Arc::new(admission.profile.for_device(device.as_str()));
    let mut will = match connect::will(&packet, device.as_str(), &acl) {
        Ok(w) => w,
        Err(why) => {
            let ack = connect::connack_bad_will(req.protocol, &why);
            return Err(refuse("will_not_authorized", &why, ack));
        }
    };
    drop(packet);
    // contract §2: every persistent session expires within `max_session_expiry`.
    let granted = expiry::granted(
        req.protocol,
        req.clean_start,
        req.session_expiry,
        limits.max_session_expiry,
    );
    let key = SessionKey {
        device: device.clone(),
        client_id: client_id.id.clone(),
    };
    if let Some(why) = over_quota(shared, &key, req.clean_start, granted.expiry, limits) {
        return Err(refuse(
            "quota_exceeded",
            &why,
            connect::connack_quota(req.protocol, &why),
        ));
    }
    // Everything else passed: commit what the dry run would write, deciding again in one
    // registry transaction (the registry may have changed meanwhile).
    let admission = if admission.registry == Admitted::Known {
        admission
    } else {
        let decision = decide(shared, &config, &chain, Mode::Commit, peer, verified)
            .await
            .ok_or(None)?;
        match decision.result {
            // The same chain under the same config names the same device.
            Ok(a) => a,
            Err(r) => return Err(refuse_decision(&r)),
        }
    };
    line.accepted(&admission.registry);
    registry_written(shared, &config, &admission).await;
    shared.registry.touch(device.as_str(), now_secs());
    if let Some(w) = will.as_mut() {
        arm_will(shared, w, &admission, &chain);
    }
    Ok(Accepted {
        req,
        admission,
        client_id,
        key,
        acl,
        will,
        granted,
        config,
        registry_generation,
        chain,
        line,
        expires,
    })
}

/// contract §4: a new persistent session beyond `max_sessions_per_device` is refused.
fn over_quota(
    shared: &Shared,
    key: &SessionKey,
    clean_start: bool,
    expiry: Expiry,
    limits: &Limits,
) -> Option<OpenRefused> {
    let max = limits.max_sessions_per_device;
    let persistent = expiry != Expiry::OnDisconnect;
    (!shared.broker.may_open(key, clean_start, persistent, max))
        .then_some(OpenRefused::Quota { max })
}

/// What the broker's own registry write implies for sessions (contract §4).
async fn registry_written(shared: &Arc<Shared>, config: &Arc<Config>, admission: &Admission) {
    let device = admission.device.clone();
    match admission.registry {
        Admitted::Known => {}
        // A new registry entry: whatever was held under this name belonged to a deleted
        // one, connections and sessions alike.
        Admitted::Provisioned => {
            shared.metrics.devices_provisioned.inc();
            let s = shared.clone();
            let _ = tokio::task::spawn_blocking(move || {
                // Committed: a connection admitted on the old rows registering after the
                // copy below checks itself again.
                s.live.registry_changed();
                s.forget_entry(&device)
            })
            .await;
        }
        // Connections still using the superseded certificate are cut now, not at the next
        // registry poll.
        Admitted::Rotated { .. } => {
            let (s, c) = (shared.clone(), config.clone());
            let _ = tokio::task::spawn_blocking(move || {
                // Committed: a connection admitted with the superseded certificate that
                // registers after this re-check's copy checks itself again.
                s.live.registry_changed();
                s.live
                    .recheck(&c, &s.registry, &s.broker, Scope::Device(&device))
            })
            .await;
        }
    }
}

/// The refusal of one persistent session over `max_sessions_per_device` (contract §4), when
/// the broker finds it only while opening the session (a race with another CONNECT).
pub(super) fn refuse_quota(
    line: &DecisionLine,
    shared: &Shared,
    protocol: Protocol,
    max: usize,
) -> Packet {
    let why = OpenRefused::Quota { max };
    line.refused("quota_exceeded", &why);
    shared.metrics.auth_refused("quota_exceeded");
    connect::connack_quota(protocol, &why)
}

/// Cluster mode: claims the session for this node, so that a connection holding it on
/// another node is closed there. A persistent session that cannot be claimed (NATS
/// unreachable) is refused with the CONNACK returned; a clean one stays local to this
/// node (logged). Ok(true): claimed.
pub(super) async fn claim(
    shared: &Shared,
    line: &DecisionLine,
    key: &crate::broker::session::SessionKey,
    persistent: bool,
    protocol: Protocol,
) -> Result<bool, Packet> {
    let Some(node) = shared.cluster.get() else {
        return Ok(false);
    };
    let Err(e) = node.claims.claim(key).await else {
        return Ok(true);
    };
    if !persistent {
        tracing::warn!(device = ?key.device, client_id = ?key.client_id, error = %e, "session not claimed in the cluster: it is local to this node");
        return Ok(false);
    }
    let why = format!("the cluster is unavailable for a persistent session: {e}");
    line.refused("cluster_unavailable", &why);
    shared.metrics.auth_refused("cluster_unavailable");
    Err(connect::connack_unavailable(protocol, &why))
}

/// Cluster mode, right after the session claimed here was opened: a connection on
/// another node that claimed it meanwhile, before it was open, found nothing to close
/// here; it is closed now (as taken over, after its CONNACK).
pub(super) fn claimed_elsewhere_meanwhile(
    shared: &Shared,
    key: &crate::broker::session::SessionKey,
) {
    if let Some(node) = shared.cluster.get() {
        node.claims.enforce_opened(key);
    }
}

/// How long a clean start waits for the cluster to discard the session it held.
const DISCARD_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Cluster mode: makes the session `key` as the cluster holds it available here before it
/// is opened (docs/cluster.md "Persistent sessions"). A resumed persistent session that
/// another node held, or that outlived its node, is read from JetStream; a clean start
/// discards whatever the cluster held under the key. A session that cannot be read
/// (NATS unreachable) is refused with the CONNACK returned. None: go on.
pub(super) async fn resume(
    shared: &Shared,
    line: &DecisionLine,
    request: &crate::broker::SessionRequest,
    protocol: Protocol,
) -> Option<Packet> {
    let node = shared.cluster.get()?;
    let broker = &shared.broker;
    let key = &request.key;
    if request.clean_start {
        // Gone before the CONNACK says so. Without NATS the old session stays where it
        // is (a clean session is then local to this node anyway: `claim`).
        let journal = broker.journal().filter(|j| !j.failing());
        if let (false, Some(journal)) = (broker.has_session(key), journal) {
            if !node.sessions.exists(key).await {
                return None;
            }
            journal.submit(crate::broker::journal::Op::DropSession { key: key.clone() });
            let done = tokio::time::timeout(DISCARD_LIMIT, journal.barrier()).await;
            if !matches!(done, Ok(Ok(()))) {
                tracing::debug!(device = ?key.device, client_id = ?key.client_id, "a clean start could not discard the cluster's session in time");
            }
        }
        return None;
    }
    if request.expiry == Expiry::OnDisconnect || broker.has_session(key) {
        return None;
    }
    match node.sessions.load(key).await {
        Ok(Some(stored)) => {
            broker.adopt(stored, request.acl.clone(), request.max_queued);
            None
        }
        Ok(None) => None,
        Err(e) => {
            let why = format!("the cluster is unavailable for a persistent session: {e}");
            line.refused("cluster_unavailable", &why);
            shared.metrics.auth_refused("cluster_unavailable");
            Some(connect::connack_unavailable(protocol, &why))
        }
    }
}

/// The verifier's report on this connection's chain, when contract §3 step 8 lets the
/// admission reuse it instead of validating the chain again: the verifier ran in this
/// connection's own handshake (a resumed session has no verdict), under the config still
/// in force (a reload or a CRL update swaps the config: the chain is decided again), for
/// this leaf, and no certificate of the path has expired since (`valid_until`). Steps 5
/// to 7 run at CONNECT in every case.
fn reusable(
    verdict: Option<Verdict>,
    config: &Arc<Config>,
    chain: &[CertificateDer<'static>],
) -> Option<ChainReport> {
    let v = verdict?;
    let same_leaf = match (&v.report.leaf, chain.first()) {
        (Some(leaf), Some(der)) => leaf.fingerprint == Fingerprint::of(der),
        _ => false,
    };
    let in_time = v.report.valid_until.is_some_and(|t| now_secs() < t);
    (Arc::ptr_eq(&v.config, config) && same_leaf && in_time && v.report.outcome.is_ok())
        .then_some(v.report)
}

/// When an admitted chain's standing may change with time alone (contract §4 "When"): the
/// report's `valid_until` (the earliest notAfter of the leaf, of every certificate sent and
/// of the anchor), then the leaf's own notAfter if later. The first may belong to an
/// intermediate the chosen path does not need, so a re-check there can keep the connection;
/// an expired leaf is refused on every path, so the second always ends it.
fn expiry_deadlines(report: &ChainReport) -> Vec<i64> {
    let mut out: Vec<i64> = report.valid_until.into_iter().collect();
    if let Some(leaf) = &report.leaf {
        if report.outcome.is_ok() && out.first().is_none_or(|t| *t < leaf.validity.not_after) {
            out.push(leaf.validity.not_after);
        }
    }
    out
}

/// Runs the admission decision off the async workers (it may commit and fsync); None when
/// the task failed (logged).
async fn decide(
    shared: &Arc<Shared>,
    config: &Arc<Config>,
    chain: &Arc<Vec<CertificateDer<'static>>>,
    mode: Mode,
    peer: SocketAddr,
    verified: Option<ChainReport>,
) -> Option<Decision> {
    let (config, registry, chain) = (config.clone(), shared.registry.clone(), chain.clone());
    let decided = tokio::task::spawn_blocking(move || {
        auth::decide_verified(&config, &registry, &chain, UnixTime::now(), mode, verified)
    })
    .await;
    match decided {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::error!(%peer, error = %e, "admission task failed");
            None
        }
    }
}

/// Gives an admitted connection's will its check and the certificate it speaks with.
fn arm_will(
    shared: &Arc<Shared>,
    will: &mut Will,
    admission: &Admission,
    chain: &Arc<Vec<CertificateDer<'static>>>,
) {
    let presenter = WillPresenter {
        source: admission.source.clone(),
        fingerprint: admission.fingerprint,
        chain: chain.clone(),
    };
    will.gate = Some(will_gate(shared, &admission.device, Some(&presenter)));
    will.presenter = Some(presenter);
}

/// The check a delayed will passes when it fires (contract §4): the one verdict, with the
/// chain decided again, and the will's topic under the current profile. Also the check a node
/// makes before publishing the will of a node that died (cluster mode), with the
/// certificate recorded with the will; without one, the device's entry and profile only.
pub(super) fn will_gate(
    shared: &Arc<Shared>,
    device: &DeviceName,
    presenter: Option<&WillPresenter>,
) -> WillGate {
    let shared = shared.clone();
    let device = device.clone();
    let presenter = presenter.cloned();
    Arc::new(move |message: &Message| {
        let config = shared.snapshot().config.clone();
        let row = shared
            .registry
            .get(device.as_str())
            .map_err(|e| format!("the registry cannot answer: {e}"))?;
        let presenter = presenter.as_ref().map(|p| Presenter {
            source: &p.source,
            fingerprint: p.fingerprint,
            chain: &p.chain,
        });
        let profile = auth::standing(
            &config,
            row.as_ref(),
            &device,
            presenter,
            true,
            UnixTime::now(),
        )
        .map_err(|r| r.to_string())?;
        if profile
            .for_device(device.as_str())
            .can_publish(&message.topic)
        {
            Ok(())
        } else {
            Err(format!(
                "topic {:?} is no longer allowed",
                message.topic.as_str()
            ))
        }
    })
}

/// The fields of the one structured line per CONNECT decision (contract §3): every value that
/// comes from the peer (device name, client id, reason) is quoted and escaped.
pub(super) struct DecisionLine {
    peer: SocketAddr,
    fingerprint: String,
    rule: String,
    device: Option<DeviceName>,
    client_id: String,
}

impl DecisionLine {
    fn new(peer: SocketAddr, req: &ConnectRequest, d: &Decision, config: &Config) -> DecisionLine {
        DecisionLine {
            peer,
            fingerprint: d
                .report
                .leaf
                .as_ref()
                .map(|l| l.fingerprint.to_hex())
                .unwrap_or_else(|| "-".to_owned()),
            rule: d.rule_label(config).unwrap_or_else(|| "-".to_owned()),
            device: d.device.clone(),
            client_id: req.client_id.clone(),
        }
    }

    fn device(&self) -> String {
        self.device
            .as_ref()
            .map_or_else(|| "-".to_owned(), |d| d.as_str().to_owned())
    }

    pub(super) fn accepted(&self, admitted: &Admitted) {
        tracing::info!(
            target: "certmq::auth",
            peer = %self.peer,
            fingerprint = %self.fingerprint,
            rule = ?self.rule,
            device = ?self.device(),
            client_id = ?self.client_id,
            result = "accepted",
            reason = ?admitted,
            "accepted at CONNECT"
        );
    }

    pub(super) fn refused(&self, label: &str, why: &dyn std::fmt::Display) {
        let Some(suppressed) = crate::logline::refusal_allowed(self.peer.ip()) else {
            return;
        };
        tracing::warn!(
            target: "certmq::auth",
            peer = %self.peer,
            fingerprint = %self.fingerprint,
            rule = ?self.rule,
            device = ?self.device(),
            client_id = ?self.client_id,
            result = "refused",
            stage = "connect",
            reason = label,
            detail = ?why.to_string(),
            suppressed,
            "refused at CONNECT"
        );
    }
}
