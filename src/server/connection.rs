//! One connection, in its own task, read top-down in [`handle`] and [`prepare`]: TLS
//! handshake (bounded by `handshake_timeout`), CONNECT (bounded by `connect_timeout`),
//! admission (`admit.rs`), the session opened and announced (CONNACK), then the session loop
//! until it ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::admit::{self, Accepted};
use super::live::{LiveConn, LiveGuard, Scope};
use super::metered::Metered;
use super::{Shared, Snapshot};
use crate::broker::conn::{self, connect, Revoke};
use crate::broker::session::{Expiry, SessionRef};
use crate::broker::{send, SessionRequest};
use crate::config::Limits;
use crate::metrics::Metrics;
use crate::mqtt::codec::{Connect, PacketReader, Protocol};
use crate::tls::{Handshake, Verdict, HANDSHAKE};

/// Keeps `certmq_connections` right on every exit path.
struct Counted(Arc<Metrics>);

impl Counted {
    fn new(m: Arc<Metrics>) -> Counted {
        m.connections.inc();
        Counted(m)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.connections.dec();
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
    let _counted = Counted::new(shared.metrics.clone());
    // Boxed, and freed at CONNACK: a task's allocation is as large as its future's largest
    // state and is held for the connection's lifetime, and the states before CONNACK (TLS
    // stream before the split, CONNECT, admission, opening) are far larger than what an
    // idle session needs (contract §11 idle memory; heaptrack: tokio's task cell was 9.3
    // KiB per idle connection with them inline).
    let Some(ready) = Box::pin(prepare(tcp, peer, &shared)).await else {
        return;
    };
    let Ready {
        peer,
        mut reader,
        wr,
        open,
    } = ready;
    let feeding = feed(&shared, &open.session);
    let end = conn::serve(
        &shared.broker,
        &open.session,
        open.conn_id,
        &open.device,
        &mut reader,
        wr,
        open.params,
        open.will,
        open.generation,
        conn::Signals {
            shutdown: &shutdown,
            kick: &open.kick,
            revoke: &open.revoke,
        },
    )
    .await;
    drop(feeding);
    tracing::info!(
        %peer,
        device = ?open.device,
        client_id = ?open.client_id,
        reason = ?end.to_string(),
        "session ended"
    );
}

/// Cluster mode: while a persistent session is connected here, its stored messages are
/// pulled from its consumers (docs/cluster.md "Persistent sessions"); dropping the guard
/// stops that.
fn feed(shared: &Arc<Shared>, session: &SessionRef) -> Option<tokio_util::sync::DropGuard> {
    let node = shared.cluster.get()?;
    session.journal()?;
    let stop = CancellationToken::new();
    node.sessions
        .feed(shared.broker.clone(), session.clone(), stop.clone());
    Some(stop.drop_guard())
}

/// A connection through CONNACK, ready for its session loop.
struct Ready<'a> {
    /// The device's address (from the PROXY header when `proxy_protocol` is on).
    peer: SocketAddr,
    reader: PacketReader<ReadHalf<TlsStream<Metered>>>,
    wr: WriteHalf<TlsStream<Metered>>,
    open: Open<'a>,
}

/// Everything up to CONNACK: the PROXY header if configured, the TLS handshake, CONNECT,
/// admission, and the session opened and announced. None when the connection ends before.
async fn prepare(tcp: TcpStream, peer: SocketAddr, shared: &Arc<Shared>) -> Option<Ready<'_>> {
    let snap = shared.snapshot();
    let limits = snap.config.limits.clone();
    let write_limit = Duration::from_secs(limits.connect_timeout);
    let mut tcp = tcp;
    let peer = match snap.config.server.proxy_protocol {
        true => proxied_peer(&mut tcp, peer, limits.handshake_timeout).await?,
        false => peer,
    };
    let tcp = Metered::new(tcp, &shared.metrics);
    let (tls, verdict) = handshake(tcp, peer, &snap, &shared.metrics).await?;
    drop(snap);
    let chain = peer_chain(&tls);
    // Split now: bytes the client pipelined after CONNECT stay in the reader's buffer.
    let (rd, mut wr) = tokio::io::split(tls);
    let mut reader = PacketReader::new(rd, limits.max_packet_size);
    let packet = read_connect(&mut reader, &mut wr, peer, &limits).await?;
    let accepted = match admit::admit(shared, peer, packet, chain, verdict, &limits).await {
        Ok(a) => a,
        Err(ack) => {
            if let Some(ack) = ack {
                let _ = send(&mut wr, &ack, write_limit).await;
            }
            return None;
        }
    };
    let open = open(shared, accepted, &mut wr, &limits, peer).await?;
    Some(Ready {
        peer,
        reader,
        wr,
        open,
    })
}

/// The device's address from the balancer's PROXY header (`proxy_protocol`), read
/// within the handshake timeout; None (logged) when the header is missing or malformed.
async fn proxied_peer(tcp: &mut TcpStream, socket: SocketAddr, limit_s: u64) -> Option<SocketAddr> {
    let limit = Duration::from_secs(limit_s);
    match tokio::time::timeout(limit, super::proxy::read_header(tcp, socket)).await {
        Ok(Ok(peer)) => Some(peer),
        Ok(Err(e)) => {
            tracing::info!(peer = %socket, error = %e, "connection closed before TLS");
            None
        }
        Err(_) => {
            tracing::info!(peer = %socket, timeout_s = limit_s, "no PROXY protocol header in time");
            None
        }
    }
}

/// The TLS handshake under `handshake_timeout` (contract §3 steps 1-4: the verifier logs and
/// counts its own refusals), with the verifier's verdict when it ran (a full handshake;
/// none on resumption). Boxed: the handshake's state (a whole rustls connection
/// mid-handshake) would otherwise be part of this task's allocation for the connection's
/// lifetime (contract §11 idle memory).
async fn handshake(
    tcp: Metered,
    peer: SocketAddr,
    snap: &Snapshot,
    metrics: &Metrics,
) -> Option<(TlsStream<Metered>, Option<Verdict>)> {
    let limit = snap.config.limits.handshake_timeout;
    let scope = Handshake::new(peer);
    let handshake = Box::pin(HANDSHAKE.scope(scope.clone(), snap.acceptor.accept(tcp)));
    match tokio::time::timeout(Duration::from_secs(limit), handshake).await {
        Ok(Ok(tls)) => {
            metrics.handshakes_ok.inc();
            Some((tls, scope.take_verdict()))
        }
        Ok(Err(e)) => {
            metrics.handshakes_failed.inc();
            log_handshake_error(peer, &e, metrics);
            None
        }
        Err(_) => {
            metrics.handshakes_failed.inc();
            tracing::info!(%peer, timeout_s = limit, "TLS handshake timed out");
            None
        }
    }
}

/// The chain the client presented, leaf first.
fn peer_chain(tls: &TlsStream<Metered>) -> Vec<CertificateDer<'static>> {
    tls.get_ref()
        .1
        .peer_certificates()
        .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default()
}

/// The CONNECT, under `connect_timeout`; a CONNECT the codec refused gets the CONNACK due.
async fn read_connect<R, W>(
    reader: &mut PacketReader<R>,
    wr: &mut W,
    peer: SocketAddr,
    limits: &Limits,
) -> Option<Connect>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let limit = Duration::from_secs(limits.connect_timeout);
    match tokio::time::timeout(limit, reader.read_connect()).await {
        Ok(Ok(p)) => Some(p),
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "no valid CONNECT");
            if let Some(ack) = connect::connack_for_codec_error(&e, reader.announced()) {
                let _ = send(wr, &ack, limit).await;
            }
            None
        }
        Err(_) => {
            tracing::info!(%peer, timeout_s = limits.connect_timeout, "no CONNECT in time");
            None
        }
    }
}

/// An opened session, announced and registered for re-checks, ready to serve.
struct Open<'a> {
    session: SessionRef,
    conn_id: u64,
    generation: u64,
    device: crate::identity::DeviceName,
    client_id: String,
    params: conn::Params,
    will: Option<crate::broker::Will>,
    kick: CancellationToken,
    revoke: Arc<Revoke>,
    _live: LiveGuard<'a>,
    /// Stops the expiry watch ([`watch_expiry`]) when the connection ends.
    _expiry: Option<DropGuard>,
}

/// Opens the session, as the cluster holds it (cluster mode), within the device's quota;
/// Err: the CONNACK refusing it.
///
/// Cluster mode: the session is claimed first, before the cluster's copy is read or
/// discarded and before the session's own writes are submitted (opening it submits one):
/// the claim decides which node may write a session's record (docs/cluster.md
/// "Persistent sessions"), so this node holds it by the time they are applied.
async fn open_session(
    shared: &Arc<Shared>,
    (line, req): (
        &admit::DecisionLine,
        &crate::broker::conn::connect::ConnectRequest,
    ),
    request: SessionRequest,
    conn_id: u64,
    kick: &CancellationToken,
    limits: &Limits,
) -> Result<crate::broker::Opened, crate::mqtt::codec::Packet> {
    let persistent = request.expiry != Expiry::OnDisconnect;
    let key = request.key.clone();
    let claimed = admit::claim(shared, line, &key, persistent, req.protocol).await?;
    if let Some(refusal) = admit::resume(shared, line, &request, req.protocol).await {
        return Err(refusal);
    }
    let opened = shared
        .broker
        .open_session(request, conn_id, kick.clone())
        .map_err(|_| {
            let max = limits.max_sessions_per_device;
            admit::refuse_quota(line, shared, req.protocol, max)
        })?;
    if claimed {
        admit::claimed_elsewhere_meanwhile(shared, &key);
    }
    Ok(opened)
}

/// Opens the session (contract §4: keyed by (device, client id); a holder is taken over),
/// sends the CONNACK and registers the connection for re-checks.
async fn open<'a, W: AsyncWrite + Unpin>(
    shared: &'a Arc<Shared>,
    a: Accepted,
    wr: &mut W,
    limits: &Limits,
    peer: SocketAddr,
) -> Option<Open<'a>> {
    let broker = &shared.broker;
    let write_limit = Duration::from_secs(limits.connect_timeout);
    let conn_id = broker.connection_id();
    let kick = CancellationToken::new();
    let device = a.admission.device.clone();
    let request = SessionRequest {
        key: a.key,
        clean_start: a.req.clean_start,
        expiry: a.granted.expiry,
        acl: a.acl,
        max_queued: limits.max_queued_messages,
        max_sessions: limits.max_sessions_per_device,
    };
    let opened = open_session(shared, (&a.line, &a.req), request, conn_id, &kick, limits).await;
    let opened = match opened {
        Ok(o) => o,
        Err(ack) => {
            if let Some(ack) = connect::within_client_max(ack, &a.req) {
                let _ = send(wr, &ack, write_limit).await;
            }
            return None;
        }
    };
    let keep_alive = connect::effective_keep_alive(a.req.keep_alive, limits.max_keep_alive);
    let ack = connect::connack_success(
        &a.req,
        &a.client_id,
        opened.present,
        keep_alive,
        limits.max_inflight,
        limits.max_packet_size,
        a.granted.announce,
    );
    let ack = match ack {
        Ok(ack) => ack,
        Err(refusal) => {
            tracing::info!(%peer, device = ?device, "CONNACK exceeds the client's Maximum Packet Size");
            if let Some(refusal) = refusal {
                let _ = send(wr, &refusal, write_limit).await;
            }
            broker.close_session(&opened.session, conn_id);
            return None;
        }
    };
    if let Err(e) = send(wr, &ack, write_limit).await {
        tracing::info!(%peer, device = ?device, error = %e, "CONNACK not delivered");
        broker.close_session(&opened.session, conn_id);
        return None;
    }
    let params = session_params(&a.req, limits, keep_alive, write_limit);
    let revoke = Arc::new(Revoke::default());
    let live = shared.live.register(
        conn_id,
        LiveConn {
            chain: a.chain.clone(),
            device: device.clone(),
            source: a.admission.source.clone(),
            fingerprint: a.admission.fingerprint,
            session: opened.session.clone(),
            revoke: revoke.clone(),
        },
    );
    recheck_if_changed(shared, &a.config, a.registry_generation, &device).await;
    // Registered above: the watch's re-check finds this connection.
    let expiry = (!a.expires.is_empty()).then(|| {
        let stop = CancellationToken::new();
        let watch = watch_expiry(
            shared.clone(),
            conn_id,
            device.clone(),
            a.expires.clone(),
            stop.clone(),
        );
        tokio::spawn(watch);
        stop.drop_guard()
    });
    Some(Open {
        session: opened.session,
        conn_id,
        generation: opened.generation,
        device,
        client_id: a.client_id.id,
        params,
        will: a.will,
        kick,
        revoke,
        _live: live,
        _expiry: expiry,
    })
}

/// The session loop's parameters, from the CONNECT and the limits.
fn session_params(
    req: &connect::ConnectRequest,
    limits: &Limits,
    keep_alive: u16,
    write_limit: Duration,
) -> conn::Params {
    conn::Params {
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
        client_topic_alias_max: req.topic_alias_max.min(limits.max_server_topic_aliases),
        client_max_packet: req.max_packet_size.map(|m| m as usize),
        write_limit,
        expiry_was_zero: req.protocol == Protocol::V5 && req.session_expiry.unwrap_or(0) == 0,
        max_session_expiry: limits.max_session_expiry,
        problem_info: req.problem_info,
    }
}

/// Called right after the connection joined the live connections. A reload or a registry
/// change between the admission and that registration may have re-checked the live
/// connections without this one (it registered after their copy of the list): decide once
/// more if the config or the registry changed meanwhile. The registry generation read here
/// comes after `register` took the list's lock; a re-check that missed this connection
/// bumped it before taking that lock for its copy, so the bump happens-before this read
/// (`Live::registry_changed`).
async fn recheck_if_changed(
    shared: &Arc<Shared>,
    admitted_under: &Arc<crate::config::Config>,
    registry_generation: u64,
    device: &crate::identity::DeviceName,
) {
    if !Arc::ptr_eq(&shared.snapshot().config, admitted_under) {
        let s = shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let config = s.snapshot().config.clone();
            let scope = Scope::All { revalidate: true };
            s.live.recheck(&config, &s.registry, &s.broker, scope)
        })
        .await;
    } else if shared.live.registry_generation() != registry_generation {
        let s = shared.clone();
        let d = device.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let config = s.snapshot().config.clone();
            s.live
                .recheck(&config, &s.registry, &s.broker, Scope::Device(&d))
        })
        .await;
    }
}

/// Ends a connection whose certificate expires while it is connected (contract §4 "When",
/// §8): at each deadline (seconds, ascending; `admit::expiry_deadlines`) the connection's
/// chain is decided again, as a reload decides it, and a refusal revokes it with the
/// documented reason. Nothing else looks at the clock: without this, a session would
/// outlive its certificate until the next reload or CRL update.
async fn watch_expiry(
    shared: Arc<Shared>,
    conn_id: u64,
    device: crate::identity::DeviceName,
    deadlines: Vec<i64>,
    stop: CancellationToken,
) {
    for deadline in deadlines {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = past(deadline) => {}
        }
        let (s, d) = (shared.clone(), device.clone());
        let checked = tokio::task::spawn_blocking(move || {
            let config = s.snapshot().config.clone();
            let scope = Scope::Connection {
                id: conn_id,
                device: &d,
            };
            s.live.recheck(&config, &s.registry, &s.broker, scope)
        })
        .await;
        match checked {
            Ok(Ok(r)) if r.revoked > 0 => return,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(device = ?device, error = %e, "expiry re-check failed; keeping the session")
            }
            Err(e) => tracing::warn!(device = ?device, error = %e, "expiry re-check task failed"),
        }
    }
}

/// Returns once the wall clock is past `deadline` (seconds; X.509 notAfter is inclusive).
/// Sleeps a minute at most at a time: certificate times are wall-clock times, and a clock
/// step or a suspended host must not postpone the check by the monotonic timer's reckoning.
async fn past(deadline: i64) {
    const STEP: u64 = 60;
    loop {
        let now = crate::cert::now_secs();
        if now > deadline {
            return;
        }
        let left = u64::try_from(deadline - now).unwrap_or(0).saturating_add(1);
        tokio::time::sleep(Duration::from_secs(left.min(STEP))).await;
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
