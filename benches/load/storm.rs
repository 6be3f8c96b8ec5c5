//! `storm`: N known devices reconnect at once, as after a broker restart or a network
//! outage ends (NOTES.md: reconnect storms are a known failure class).
//!
//! First, untimed, every device connects once and disconnects (C at a time): the broker
//! knows it afterwards (a registry entry where there is one) and, with `--resume`, its own
//! client config holds the TLS session the broker gave it. Then, timed, all N connect at
//! the same moment and stay connected until every one is back; a connection that fails is
//! retried (after 50 ms) until the run's deadline, as a device would. Reported: connects/s
//! over the storm, the time until the last device is back, how many TLS handshakes
//! resumed, failed attempts, and the broker's CPU per connect.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conn::Conn;
use super::report::{progress, Latencies, Report, Ticker};
use super::{procfs, Ctx, LoadError};

/// How long a device waits before trying again after a failed attempt.
const RETRY_AFTER: Duration = Duration::from_millis(50);

/// What one device saw in the storm.
struct Back {
    /// Storm start to CONNACK, nanoseconds.
    latency: u64,
    resumed: bool,
    failed_attempts: usize,
    conn: Conn,
}

pub async fn run(ctx: &Arc<Ctx>, n: usize, concurrency: usize) -> Result<Report, LoadError> {
    progress(&format!(
        "storm {}: {n} devices connect once ({concurrency} at a time), then all at once, to {}",
        ctx.label, ctx.target.addr
    ));
    warm_up(ctx, n, concurrency).await?;
    let cpu_before = ctx.pid.map(procfs::cpu_seconds).transpose()?;
    let done = Arc::new(AtomicU64::new(0));
    let ticker = Ticker::start(format!("storm {}", ctx.label), done.clone(), Some(n as u64));
    // The storm's deadline: as long as a single wait may take, twice over, for the last
    // device in the queue.
    let deadline = Instant::now() + ctx.target.timeout * 2;
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let ctx = ctx.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let back = device(&ctx, i, start, deadline).await;
                done.fetch_add(1, Ordering::Relaxed);
                back
            })
        })
        .collect();
    let mut backs = Vec::with_capacity(n);
    let mut first_failure = None;
    for t in tasks {
        match t.await? {
            Ok(b) => backs.push(b),
            Err(e) => {
                first_failure.get_or_insert(e);
            }
        }
    }
    let all_back = start.elapsed().as_secs_f64();
    drop(ticker);
    let cpu_after = ctx.pid.map(procfs::cpu_seconds).transpose()?;
    let last_back_s = backs.iter().map(|b| b.latency).max().unwrap_or(0) as f64 / 1e9;
    let resumed = backs.iter().filter(|b| b.resumed).count();
    let retries: usize = backs.iter().map(|b| b.failed_attempts).sum();
    let mut latencies = Latencies::new();
    let mut conns = Vec::with_capacity(backs.len());
    for b in backs {
        latencies.push(b.latency);
        conns.push(b.conn);
    }
    let ok = conns.len();
    if let Some(e) = &first_failure {
        progress(&format!(
            "storm {}: {} never came back, first: {e}",
            ctx.label,
            n - ok
        ));
    }
    for c in conns {
        let _closed = c.close(&ctx.target).await;
    }
    let mut report = Report::new("storm", &ctx.label);
    report.push("connections", n as f64);
    report.push("connected", ok as f64);
    report.push("failed", (n - ok) as f64);
    report.push("retried_attempts", retries as f64);
    report.push("resumed", resumed as f64);
    report.push("connects_per_s", ok as f64 / last_back_s.max(1e-9));
    report.push("all_back_s", last_back_s);
    report.push("wall_s", all_back);
    latencies.report(&mut report, "back_");
    report.push_connect_cpu(cpu_before, cpu_after, ok);
    Ok(report)
}

/// Every device connects once, C at a time, and disconnects.
async fn warm_up(ctx: &Arc<Ctx>, n: usize, concurrency: usize) -> Result<(), LoadError> {
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..concurrency.min(n.max(1)))
        .map(|_| {
            let (ctx, next) = (ctx.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok::<(), LoadError>(());
                    }
                    let conn = Conn::open(&ctx.target, ctx.creds.get(i), &client_id(i)).await?;
                    let _closed = conn.close(&ctx.target).await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await??;
    }
    Ok(())
}

/// Device `i` connects until it is back (or the deadline passes).
async fn device(ctx: &Ctx, i: usize, start: Instant, deadline: Instant) -> Result<Back, LoadError> {
    let mut failed_attempts = 0;
    loop {
        match Conn::open(&ctx.target, ctx.creds.get(i), &client_id(i)).await {
            Ok(conn) => {
                let latency = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
                let resumed = conn.stream.get_ref().1.handshake_kind()
                    == Some(rustls::HandshakeKind::Resumed);
                return Ok(Back {
                    latency,
                    resumed,
                    failed_attempts,
                    conn,
                });
            }
            Err(e) if Instant::now() + RETRY_AFTER >= deadline => return Err(e),
            Err(_) => {
                failed_attempts += 1;
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    }
}

fn client_id(i: usize) -> String {
    format!("bench-storm-{i}")
}
