//! The admin HTTP endpoint (contract §10), on `admin_bind` when set: `GET /healthz` and
//! `GET /metrics` (Prometheus text). hyper's HTTP/1 server on its own listener and tasks,
//! off the device path: a slow scraper costs the brokers nothing but its own task.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::metrics::{Format, LiveGauges};
use crate::registry::Source;

/// A request that takes longer than this (headers included) is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A message store that takes longer than this to commit a probe is reported unhealthy.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves admin requests until `shutdown`.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin endpoint listening");
    }
    loop {
        let (tcp, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let stopping = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                let stopping = stopping.clone();
                async move { Ok::<_, Infallible>(respond(req, &shared, &stopping).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(REQUEST_TIMEOUT)
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(tcp), service);
            let _ = tokio::time::timeout(REQUEST_TIMEOUT * 3, conn).await;
        });
    }
}

async fn respond(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    stopping: &CancellationToken,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_owned());
    }
    match req.uri().path() {
        "/healthz" => {
            if stopping.is_cancelled() {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting down\n".to_owned(),
                );
            }
            match healthy(shared).await {
                // Degraded CRLs do not make the broker unhealthy (a restart would not
                // fix them; other anchors and pinned devices work): they are detail lines.
                Ok(()) => {
                    let config = shared.snapshot().config.clone();
                    let mut body = "ok\n".to_owned();
                    for line in shared.crls.health(&config) {
                        body.push_str(&format!("warning: {line}\n"));
                    }
                    text(StatusCode::OK, body)
                }
                Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
            }
        }
        "/metrics" => {
            let accept = req
                .headers()
                .get(hyper::header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let format = Format::from_accept(accept);
            shared.metrics.set_live_gauges(live_gauges(shared));
            let mut r = text(StatusCode::OK, shared.metrics.encode(format));
            if let Ok(v) = format.content_type().parse() {
                r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
            }
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
    }
}

/// What `/metrics` reads from the running broker: sessions, and connections per anchor
/// (every configured anchor listed, 0 included, so a dashboard shows each one).
fn live_gauges(shared: &Shared) -> LiveGauges {
    let config = shared.snapshot().config.clone();
    let mut by_anchor: Vec<(String, i64)> =
        config.anchors.iter().map(|a| (a.name.clone(), 0)).collect();
    let mut pinned = 0;
    for (source, n) in shared.live.by_source() {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        match source {
            Source::Pinned => pinned += n,
            Source::Anchor(name) => match by_anchor.iter_mut().find(|(a, _)| *a == name) {
                Some(slot) => slot.1 += n,
                // An anchor a reload just removed, whose connections are being revoked.
                None => by_anchor.push((name, n)),
            },
        }
    }
    LiveGauges {
        sessions: i64::try_from(shared.broker.session_count()).unwrap_or(i64::MAX),
        by_anchor,
        pinned,
        nats_connected: shared
            .cluster
            .get()
            .map(|n| {
                (
                    n.cluster.node().to_owned(),
                    i64::from(n.cluster.connected()),
                )
            })
            .into_iter()
            .collect(),
    }
}

/// contract §7: healthy only while both databases can commit. The registry must give its write
/// lock (another process, the `certmq devices` CLI, shares it). The message store must
/// commit a probe write through its writer: while commits fail (a full disk) only a real
/// commit can tell whether they work again, and the probe shares the next group commit.
async fn healthy(shared: &Arc<Shared>) -> Result<(), String> {
    // Cluster mode: without NATS no QoS 1/2 message, provisioning or persistent session
    // can be accepted (contract §12), so the node is not healthy.
    if let Some(node) = shared.cluster.get() {
        let cluster = &node.cluster;
        if !cluster.connected() {
            return Err(format!(
                "node {} is not connected to NATS ({})",
                cluster.node(),
                cluster.settings.nats.join(", ")
            ));
        }
    }
    let s = shared.clone();
    match tokio::task::spawn_blocking(move || s.registry.writable()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let path = shared.registry.describe();
            return Err(format!("{path} not writable: {e}"));
        }
        Err(e) => return Err(format!("health check failed: {e}")),
    }
    let Some(journal) = shared.broker.journal() else {
        return Ok(());
    };
    let path = journal.describe();
    match tokio::time::timeout(PROBE_TIMEOUT, journal.probe()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("{path} cannot commit: {e}")),
        Err(_) => Err(format!("{path} did not commit within {PROBE_TIMEOUT:?}")),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}
