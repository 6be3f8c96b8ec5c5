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
use crate::broker::{connect, send, session};
use crate::cert::now_secs;
use crate::metrics::Metrics;
use crate::mqtt::codec::PacketReader;
use crate::registry::{Admitted, Mode};
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
    let handshake = HANDSHAKE_PEER.scope(peer, snap.acceptor.accept(tcp));
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

    // CONNECT.
    let mut conn = PacketReader::new(tls, limits.max_packet_size);
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
                let _ = send(conn.get_mut(), &ack, write_limit).await;
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
            let _ = send(conn.get_mut(), &ack, write_limit).await;
            return;
        }
    };
    if admission.registry == Admitted::Provisioned {
        metrics.devices_provisioned.fetch_add(1, Ordering::Relaxed);
    }
    shared.registry.touch(admission.device.as_str(), now_secs());

    // Client identifier (SPEC 4).
    let client_id = match connect::client_id(&req) {
        Ok(id) => id,
        Err(why) => {
            tracing::info!(%peer, device = %admission.device, reason = %why, "CONNECT refused");
            let ack = connect::connack_bad_client_id(req.protocol, &why);
            let _ = send(conn.get_mut(), &ack, write_limit).await;
            return;
        }
    };
    let keep_alive = connect::effective_keep_alive(req.keep_alive, limits.max_keep_alive);
    let ack = connect::connack_success(
        &req,
        &client_id,
        keep_alive,
        limits.max_inflight,
        limits.max_packet_size,
    );
    if let Err(e) = send(conn.get_mut(), &ack, write_limit).await {
        tracing::info!(%peer, device = %admission.device, error = %e, "CONNACK not delivered");
        return;
    }
    let end = session::run(&mut conn, req.protocol, keep_alive, &shutdown, write_limit).await;
    tracing::info!(
        %peer,
        device = %admission.device,
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
