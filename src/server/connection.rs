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
use crate::auth::{self, Decision};
use crate::broker::session::Revoke;
use crate::broker::state::{Expiry, SessionKey};
use crate::broker::{connect, send, session, SessionRequest};
use crate::cert::now_secs;
use crate::metrics::Metrics;
use crate::mqtt::codec::{PacketReader, Protocol};
use crate::registry::Source;
use crate::registry::{Admitted, Mode};
use crate::server::live::LiveConn;
use crate::tls::policy::Rule;
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

    // Admission against the current config and registry (SPEC 3 step 8). Blocking: the
    // registry may commit a provisioning (fsync) before CONNACK.
    let snap = shared.snapshot();
    let config = snap.config.clone();
    let registry = shared.registry.clone();
    let chain = Arc::new(chain);
    let chain_for_recheck = chain.clone();
    let decision = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            auth::decide(&config, &registry, &chain, UnixTime::now(), Mode::Commit)
        })
        .await
    };
    let decision = match decision {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(%peer, error = %e, "admission task failed");
            return;
        }
    };
    log_decision(peer, &req, &decision, &config);
    let admission = match decision.result {
        Ok(a) => a,
        Err(refused) => {
            metrics.auth_refused(refused.label());
            let ack = connect::connack_refused(req.protocol, &refused);
            let _ = send(&mut wr, &ack, write_limit).await;
            return;
        }
    };
    if admission.registry == Admitted::Provisioned {
        metrics.devices_provisioned.fetch_add(1, Ordering::Relaxed);
    }
    shared.registry.touch(admission.device.as_str(), now_secs());
    let device = admission.device.clone();
    let source = match admission.rule {
        Rule::Pinned(_) => Source::Pinned,
        Rule::Anchor(i) => Source::Anchor(config.anchors[i].name.clone()),
    };

    if let Some(method) = &req.authentication_method {
        tracing::info!(%peer, %device, %method, "CONNECT refused: enhanced authentication requested");
        let _ = send(
            &mut wr,
            &connect::connack_bad_auth_method(method),
            write_limit,
        )
        .await;
        return;
    }

    // Client identifier (SPEC 4) and will (SPEC 5, 6).
    let client_id = match connect::client_id(&req) {
        Ok(id) => id,
        Err(why) => {
            tracing::info!(%peer, %device, reason = %why, "CONNECT refused");
            let ack = connect::connack_bad_client_id(req.protocol, &why);
            let _ = send(&mut wr, &ack, write_limit).await;
            return;
        }
    };
    let acl = Arc::new(admission.profile.for_device(device.as_str()));
    let will = match connect::will(&packet, device.as_str(), &acl) {
        Ok(w) => w,
        Err(why) => {
            tracing::info!(%peer, %device, reason = %why, "CONNECT refused");
            metrics.auth_refused("will_not_authorized");
            let ack = connect::connack_bad_will(req.protocol, &why);
            let _ = send(&mut wr, &ack, write_limit).await;
            return;
        }
    };
    drop(packet);

    // The session (SPEC 4): keyed by (device, client id); a holder is taken over.
    let expiry = match req.protocol {
        Protocol::V311 if req.clean_start => Expiry::OnDisconnect,
        Protocol::V311 => Expiry::Never,
        Protocol::V5 => Expiry::from_v5(req.session_expiry.unwrap_or(0)),
    };
    let broker = shared.broker.clone();
    let conn_id = broker.connection_id();
    let kick = CancellationToken::new();
    let key = SessionKey {
        device: device.clone(),
        client_id: client_id.id.clone(),
    };
    let opened = broker.open_session(
        SessionRequest {
            key,
            clean_start: req.clean_start,
            expiry,
            acl,
            max_queued: limits.max_queued_messages,
        },
        conn_id,
        kick.clone(),
    );
    let keep_alive = connect::effective_keep_alive(req.keep_alive, limits.max_keep_alive);
    let ack = connect::connack_success(
        &req,
        &client_id,
        opened.present,
        keep_alive,
        limits.max_inflight,
        limits.max_packet_size,
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
        problem_info: req.problem_info,
    };
    let revoke = Arc::new(Revoke::default());
    let _live = shared.live.register(
        conn_id,
        LiveConn {
            chain: chain_for_recheck,
            device: device.clone(),
            source: source.clone(),
            session: opened.session.clone(),
            revoke: revoke.clone(),
        },
    );
    // A reload between the admission and the registration above would have missed this
    // connection: decide once more if the config changed meanwhile.
    if !Arc::ptr_eq(&shared.snapshot().config, &config) {
        let s = shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let snap = s.snapshot();
            s.live.recheck_all(&snap.config, &s.registry, &s.broker)
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
        %device,
        client_id = %client_id.id,
        reason = %end,
        "session ended"
    );
}

/// One structured line per CONNECT decision (SPEC 3).
fn log_decision(
    peer: SocketAddr,
    req: &connect::ConnectRequest,
    d: &Decision,
    config: &crate::config::Config,
) {
    let fingerprint = d
        .report
        .leaf
        .as_ref()
        .map(|l| l.fingerprint.to_hex())
        .unwrap_or_else(|| "-".to_owned());
    let rule = d.rule_label(config).unwrap_or_else(|| "-".to_owned());
    let device = d
        .device
        .as_ref()
        .map(|n| n.to_string())
        .unwrap_or_else(|| "-".to_owned());
    match &d.result {
        Ok(a) => tracing::info!(
            target: "certmq::auth",
            %peer, %fingerprint, %rule, %device,
            client_id = %req.client_id,
            result = "accepted",
            reason = ?a.registry,
            "accepted at CONNECT"
        ),
        Err(refused) => tracing::warn!(
            target: "certmq::auth",
            %peer, %fingerprint, %rule, %device,
            client_id = %req.client_id,
            result = "refused",
            stage = "connect",
            reason = refused.label(),
            "refused at CONNECT: {refused}"
        ),
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
            tracing::warn!(
                target: "certmq::auth",
                %peer,
                fingerprint = "-",
                rule = "-",
                device = "-",
                result = "refused",
                stage = "tls",
                reason = "no_certificate",
                "refused at TLS: the client sent no certificate"
            );
        }
        _ => tracing::info!(%peer, error = %e, "TLS handshake failed"),
    }
}
