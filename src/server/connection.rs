//! One connection, in its own task: TLS handshake (bounded by `handshake_timeout`), CONNECT
//! (bounded by `connect_timeout`), admission, CONNACK, session.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::auth::{self, Decision, Presenter};
use crate::broker::message::Message;
use crate::broker::session::Revoke;
use crate::broker::state::{Expiry, SessionKey};
use crate::broker::{connect, expiry, send, session, SessionRequest, WillGate};
use crate::cert::now_secs;
use crate::identity::DeviceName;
use crate::metrics::Metrics;
use crate::mqtt::codec::{PacketReader, Protocol};
use crate::registry::{Admitted, Mode};
use crate::server::live::{LiveConn, Scope};
use crate::tls::HANDSHAKE_PEER;

/// Keeps `certmq_connections` right on every exit path.
struct Counted(Arc<Metrics>);

impl Counted {
    fn new(m: Arc<Metrics>) -> Counted {
        m.connections.fetch_add(1, Ordering::Relaxed);
        Counted(m)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one accepted TCP connection until it ends. The permit is the connection's slot
/// under `max_connections`, released when this returns.
pub async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let metrics = shared.metrics.clone();
    let _counted = Counted::new(metrics.clone());
    let snap = shared.snapshot();
    let limits = snap.config.limits.clone();
    let write_limit = Duration::from_secs(limits.connect_timeout);

    // TLS (SPEC 3 step 1-4): the verifier logs and counts its own refusals.
    // Boxed: the handshake's state (a whole rustls connection mid-handshake) would otherwise
    // be part of this task's allocation for the connection's lifetime (SPEC 11 idle memory).
    let handshake = Box::pin(HANDSHAKE_PEER.scope(peer, snap.acceptor.accept(tcp)));
    let tls = match tokio::time::timeout(Duration::from_secs(limits.handshake_timeout), handshake)
        .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            metrics.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            log_handshake_error(peer, &e, &metrics);
            return;
        }
        Err(_) => {
            metrics.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, timeout_s = limits.handshake_timeout, "TLS handshake timed out");
            return;
        }
    };
    metrics.handshakes_ok.fetch_add(1, Ordering::Relaxed);
    drop(snap);
    let chain: Vec<CertificateDer<'static>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();

    // Split now: bytes the client pipelined after CONNECT stay in the reader's buffer.
    let (rd, mut wr) = tokio::io::split(tls);
    let mut conn = PacketReader::new(rd, limits.max_packet_size);
    let packet = match tokio::time::timeout(
        Duration::from_secs(limits.connect_timeout),
        conn.read_connect(),
    )
    .await
    {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "no valid CONNECT");
            if let Some(ack) = connect::connack_for_codec_error(&e) {
                let _ = send(&mut wr, &ack, write_limit).await;
            }
            return;
        }
        Err(_) => {
            tracing::info!(%peer, timeout_s = limits.connect_timeout, "no CONNECT in time");
            return;
        }
    };
    let req = connect::ConnectRequest::from_packet(&packet);

    // Admission against the current config and registry (SPEC 3 step 8), first as a dry
    // run: a CONNECT refused for any reason writes nothing to the registry, so every other
    // reason to refuse is known before provisioning or rotation commits (SPEC 3).
    let snap = shared.snapshot();
    let config = snap.config.clone();
    drop(snap);
    let chain = Arc::new(chain);
    let Some(dry) = admit(&shared, &config, &chain, Mode::DryRun, peer).await else {
        return;
    };
    let line = DecisionLine::new(peer, &req, &dry, &config);
    let admission = match dry.result {
        Ok(a) => a,
        Err(refused) => {
            line.refused(refused.label(), &refused);
            metrics.auth_refused(refused.label());
            let ack = connect::connack_refused(req.protocol, &refused);
            let _ = send(&mut wr, &ack, write_limit).await;
            return;
        }
    };
    let device = admission.device.clone();
    if let Some(method) = &req.authentication_method {
        line.refused(
            "bad_authentication_method",
            &format_args!("enhanced authentication {method:?} is not supported"),
        );
        metrics.auth_refused("bad_authentication_method");
        let ack = connect::connack_bad_auth_method(method);
        let _ = send(&mut wr, &ack, write_limit).await;
        return;
    }
    // Client identifier (SPEC 4) and will (SPEC 5, 6).
    let client_id = match connect::client_id(&req) {
        Ok(id) => id,
        Err(why) => {
            line.refused("bad_client_id", &why);
            let ack = connect::connack_bad_client_id(req.protocol, &why);
            let _ = send(&mut wr, &ack, write_limit).await;
            return;
        }
    };
    let acl = Arc::new(admission.profile.for_device(device.as_str()));
    let mut will = match connect::will(&packet, device.as_str(), &acl) {
        Ok(w) => w,
        Err(why) => {
            line.refused("will_not_authorized", &why);
            metrics.auth_refused("will_not_authorized");
            let ack = connect::connack_bad_will(req.protocol, &why);
            let _ = send(&mut wr, &ack, write_limit).await;
            return;
        }
    };
    drop(packet);
    // SPEC 2: every persistent session expires within `max_session_expiry`.
    let granted = expiry::granted(
        req.protocol,
        req.clean_start,
        req.session_expiry,
        limits.max_session_expiry,
    );
    let expiry = granted.expiry;
    let key = SessionKey {
        device: device.clone(),
        client_id: client_id.id.clone(),
    };
    let broker = shared.broker.clone();
    let quota = limits.max_sessions_per_device;
    let persistent = expiry != Expiry::OnDisconnect;
    if !broker.may_open(&key, req.clean_start, persistent, quota) {
        refuse_quota(&line, &metrics, &mut wr, req.protocol, quota, write_limit).await;
        return;
    }

    // Everything else passed: commit what the dry run would write, deciding again in one
    // registry transaction (the registry may have changed meanwhile).
    let admission = if admission.registry == Admitted::Known {
        admission
    } else {
        let Some(decision) = admit(&shared, &config, &chain, Mode::Commit, peer).await else {
            return;
        };
        match decision.result {
            // The same chain under the same config names the same device.
            Ok(a) => a,
            Err(refused) => {
                line.refused(refused.label(), &refused);
                metrics.auth_refused(refused.label());
                let ack = connect::connack_refused(req.protocol, &refused);
                let _ = send(&mut wr, &ack, write_limit).await;
                return;
            }
        }
    };
    line.accepted(&admission.registry);
    match admission.registry {
        Admitted::Known => {}
        // A new registry entry: whatever was held under this name belonged to a deleted
        // one (SPEC 4), connections and sessions alike.
        Admitted::Provisioned => {
            metrics.devices_provisioned.fetch_add(1, Ordering::Relaxed);
            let s = shared.clone();
            let d = device.clone();
            let _ = tokio::task::spawn_blocking(move || s.forget_entry(&d)).await;
        }
        // The broker's own write: connections still using the superseded certificate are
        // cut now, not at the next registry poll (SPEC 4).
        Admitted::Rotated { .. } => {
            let s = shared.clone();
            let d = device.clone();
            let c = config.clone();
            let _ = tokio::task::spawn_blocking(move || {
                s.live
                    .recheck(&c, &s.registry, &s.broker, Scope::Device(&d))
            })
            .await;
        }
    }
    shared.registry.touch(device.as_str(), now_secs());
    let source = admission.source.clone();
    if let Some(w) = will.as_mut() {
        w.gate = Some(will_gate(&shared, &admission, &chain));
    }

    // The session (SPEC 4): keyed by (device, client id); a holder is taken over.
    let conn_id = broker.connection_id();
    let kick = CancellationToken::new();
    let opened = broker.open_session(
        SessionRequest {
            key,
            clean_start: req.clean_start,
            expiry,
            acl,
            max_queued: limits.max_queued_messages,
            max_sessions: quota,
        },
        conn_id,
        kick.clone(),
    );
    let opened = match opened {
        Ok(o) => o,
        Err(_) => {
            refuse_quota(&line, &metrics, &mut wr, req.protocol, quota, write_limit).await;
            return;
        }
    };
    let keep_alive = connect::effective_keep_alive(req.keep_alive, limits.max_keep_alive);
    let ack = connect::connack_success(
        &req,
        &client_id,
        opened.present,
        keep_alive,
        limits.max_inflight,
        limits.max_packet_size,
        granted.announce,
    );
    if let Err(e) = send(&mut wr, &ack, write_limit).await {
        tracing::info!(%peer, %device, error = %e, "CONNACK not delivered");
        broker.close_session(&opened.session, conn_id);
        return;
    }
    let params = session::Params {
        protocol: req.protocol,
        keep_alive,
        window: usize::from(
            req.receive_maximum
                .unwrap_or(u16::MAX)
                .min(limits.max_inflight)
                .max(1),
        ),
        receive_max: usize::from(limits.max_inflight),
        topic_alias_max: connect::TOPIC_ALIAS_MAX,
        client_max_packet: req.max_packet_size.map(|m| m as usize),
        write_limit,
        expiry_was_zero: req.protocol == Protocol::V5 && req.session_expiry.unwrap_or(0) == 0,
        max_session_expiry: limits.max_session_expiry,
        problem_info: req.problem_info,
    };
    let revoke = Arc::new(Revoke::default());
    let _live = shared.live.register(
        conn_id,
        LiveConn {
            chain: chain.clone(),
            device: device.clone(),
            source,
            fingerprint: admission.fingerprint,
            session: opened.session.clone(),
            revoke: revoke.clone(),
        },
    );
    // A reload between the admission and the registration above would have missed this
    // connection: decide once more if the config changed meanwhile.
    if !Arc::ptr_eq(&shared.snapshot().config, &config) {
        let s = shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let config = s.snapshot().config.clone();
            let scope = Scope::All { revalidate: true };
            s.live.recheck(&config, &s.registry, &s.broker, scope)
        })
        .await;
    }
    let end = session::serve(
        &broker,
        &opened.session,
        conn_id,
        &device,
        &mut conn,
        wr,
        params,
        will,
        opened.generation,
        session::Signals {
            shutdown: &shutdown,
            kick: &kick,
            revoke: &revoke,
        },
    )
    .await;
    tracing::info!(
        %peer,
        device = ?device,
        client_id = ?client_id.id,
        reason = ?end.to_string(),
        "session ended"
    );
}

/// Runs the admission decision off the async workers (it may commit and fsync); None when
/// the task failed (logged).
async fn admit(
    shared: &Arc<Shared>,
    config: &Arc<crate::config::Config>,
    chain: &Arc<Vec<CertificateDer<'static>>>,
    mode: Mode,
    peer: SocketAddr,
) -> Option<Decision> {
    let (config, registry, chain) = (config.clone(), shared.registry.clone(), chain.clone());
    let decided = tokio::task::spawn_blocking(move || {
        auth::decide(&config, &registry, &chain, UnixTime::now(), mode)
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

/// Refuses one persistent session over `max_sessions_per_device` (SPEC 4).
async fn refuse_quota<W: tokio::io::AsyncWrite + Unpin>(
    line: &DecisionLine,
    metrics: &Metrics,
    wr: &mut W,
    protocol: Protocol,
    max: usize,
    write_limit: Duration,
) {
    let why = crate::broker::OpenRefused::Quota { max };
    line.refused("quota_exceeded", &why);
    metrics.auth_refused("quota_exceeded");
    let _ = send(wr, &connect::connack_quota(protocol, &why), write_limit).await;
}

/// The check a delayed will passes when it fires (SPEC 4): the one verdict, with the chain
/// decided again, and the will's topic under the current profile.
fn will_gate(
    shared: &Arc<Shared>,
    admission: &auth::Admission,
    chain: &Arc<Vec<CertificateDer<'static>>>,
) -> WillGate {
    let shared = shared.clone();
    let chain = chain.clone();
    let device = admission.device.clone();
    let source = admission.source.clone();
    let fingerprint = admission.fingerprint;
    Arc::new(move |message: &Message| {
        let config = shared.snapshot().config.clone();
        let row = shared
            .registry
            .get(device.as_str())
            .map_err(|e| format!("the registry cannot answer: {e}"))?;
        let presenter = Presenter {
            source: &source,
            fingerprint,
            chain: &chain,
        };
        let profile = auth::standing(
            &config,
            row.as_ref(),
            &device,
            Some(presenter),
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

/// The fields of the one structured line per CONNECT decision (SPEC 3): every value that
/// comes from the peer (device name, client id, reason) is quoted and escaped.
struct DecisionLine {
    peer: SocketAddr,
    fingerprint: String,
    rule: String,
    device: Option<DeviceName>,
    client_id: String,
}

impl DecisionLine {
    fn new(
        peer: SocketAddr,
        req: &connect::ConnectRequest,
        d: &Decision,
        config: &crate::config::Config,
    ) -> DecisionLine {
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

    fn accepted(&self, admitted: &Admitted) {
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

    fn refused(&self, label: &str, why: &dyn std::fmt::Display) {
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

/// Handshake failures the verifier did not already log (no certificate, TLS protocol
/// errors, peers that hang up).
fn log_handshake_error(peer: SocketAddr, e: &std::io::Error, metrics: &Metrics) {
    let tls_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls_error {
        Some(rustls::Error::InvalidCertificate(_)) => {}
        Some(rustls::Error::NoCertificatesPresented) => {
            metrics.auth_refused("no_certificate");
            let Some(suppressed) = crate::logline::refusal_allowed(peer.ip()) else {
                return;
            };
            tracing::warn!(
                target: "certmq::auth",
                %peer,
                fingerprint = "-",
                rule = "-",
                device = "-",
                result = "refused",
                stage = "tls",
                reason = "no_certificate",
                suppressed,
                "refused at TLS: the client sent no certificate"
            );
        }
        _ => tracing::info!(%peer, error = %e, "TLS handshake failed"),
    }
}
