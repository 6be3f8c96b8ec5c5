//! `connect`: N full mTLS handshakes + CONNECT/CONNACK + DISCONNECT, C at a time.
//!
//! Latency is TCP connect start to CONNACK received: what a device waits before it may
//! publish. The rate is N over the wall time of the whole run, closes included, because
//! a broker also pays for tearing connections down. Connection `i` presents identity `i`,
//! so with `--issuer-cert` every connection is a distinct device.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::conn::Conn;
use super::report::{progress, Latencies, Report, Ticker};
use super::{procfs, Ctx, LoadError};

/// What one worker saw.
struct WorkerResult {
    latencies: Latencies,
    failures: usize,
    first_failure: Option<LoadError>,
}

pub async fn run(ctx: &Arc<Ctx>, n: usize, concurrency: usize) -> Result<Report, LoadError> {
    progress(&format!(
        "connect {}: {n} connections, {concurrency} at a time, to {}",
        ctx.label, ctx.target.addr
    ));
    let cpu_before = ctx.pid.map(procfs::cpu_seconds).transpose()?;
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let ticker = Ticker::start(
        format!("connect {}", ctx.label),
        done.clone(),
        Some(n as u64),
    );
    let start = Instant::now();
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency.min(n.max(1)) {
        let ctx = ctx.clone();
        let next = next.clone();
        let done = done.clone();
        workers.push(tokio::spawn(
            async move { worker(&ctx, n, &next, &done).await },
        ));
    }
    let mut latencies = Latencies::new();
    let mut failures = 0;
    let mut first_failure = None;
    for w in workers {
        let r = w.await?;
        latencies.extend(r.latencies);
        failures += r.failures;
        first_failure = first_failure.or(r.first_failure);
    }
    let elapsed = start.elapsed().as_secs_f64();
    drop(ticker);
    let cpu_after = ctx.pid.map(procfs::cpu_seconds).transpose()?;
    if latencies.len() == 0 {
        if let Some(first) = first_failure {
            return Err(LoadError::AllFailed {
                attempts: n,
                first: Box::new(first),
            });
        }
    }
    if let Some(e) = &first_failure {
        progress(&format!(
            "connect {}: {failures} failed, first: {e}",
            ctx.label
        ));
    }
    let ok = latencies.len();
    let mut report = Report::new("connect", &ctx.label);
    report.push("connections", n as f64);
    report.push("concurrency", concurrency as f64);
    report.push("connected", ok as f64);
    report.push("failed", failures as f64);
    report.push("connects_per_s", ok as f64 / elapsed);
    latencies.report(&mut report, "connect_");
    report.push_connect_cpu(cpu_before, cpu_after, ok);
    Ok(report)
}

async fn worker(ctx: &Ctx, n: usize, next: &AtomicUsize, done: &AtomicU64) -> WorkerResult {
    let mut out = WorkerResult {
        latencies: Latencies::new(),
        failures: 0,
        first_failure: None,
    };
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            return out;
        }
        let identity = ctx.creds.get(i);
        let start = Instant::now();
        match Conn::open(&ctx.target, identity, &format!("bench-conn-{i}")).await {
            Ok(conn) => {
                let latency = start.elapsed();
                out.latencies
                    .push(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
                // A broker may close its side as soon as it reads DISCONNECT, so our
                // close_notify can meet a reset: that is a finished connection, not a
                // failed one.
                let _closed = conn.close(&ctx.target).await;
            }
            Err(e) => {
                out.failures += 1;
                out.first_failure.get_or_insert(e);
            }
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
}
