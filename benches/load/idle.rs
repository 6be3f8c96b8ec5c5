//! `idle`: open N connections, hold them, and read the broker's resident memory (VmRSS)
//! before and after: its memory cost per idle TLS connection (contract §11).
//!
//! Each held connection is a task that answers nothing, sends PINGREQ at half the keep
//! alive, and notices when the broker closes it (counted: a broker that sheds idle
//! connections must not look cheaper). The RSS is read `settle` after the last connection
//! opened, so that buffers allocated during the handshakes and freed after are not counted
//! as held. Every connection costs this process a file descriptor, and the broker one
//! more: the soft RLIMIT_NOFILE of both must exceed N (`ulimit -n`; compare.sh raises it).
//! One source address has about 28,000 ports towards one server port: beyond that, give
//! several (`--source-addrs`).
//!
//! The kernel's own cost per connection (socket, inode, file, epoll objects; TCP buffers)
//! is not in any process's RSS: the run also reports the machine-wide change of the slab
//! and of TCP's buffer pages over the same interval, per connection (both ends).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::conn::{Conn, KEEP_ALIVE_S};
use super::mqtt;
use super::report::{progress, Report, Ticker};
use super::{procfs, Ctx, LoadError};

/// File descriptors this process needs besides the connections (stdio, the runtime's
/// epoll and wake-up descriptors, files read while issuing certificates).
const FD_RESERVE: u64 = 64;

/// How an idle run goes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub connections: usize,
    pub concurrency: usize,
    pub settle: Duration,
    pub hold: Duration,
}

pub async fn run(ctx: &Arc<Ctx>, plan: &Plan) -> Result<Report, LoadError> {
    let n = plan.connections;
    let limit = procfs::open_files_limit()?;
    if (n as u64).saturating_add(FD_RESERVE) > limit {
        return Err(LoadError::FdLimit { need: n, limit });
    }
    progress(&format!(
        "idle {}: opening {n} connections, {} at a time",
        ctx.label, plan.concurrency
    ));
    let rss_before = ctx.pid.map(procfs::rss_kib).transpose()?;
    let kernel_before = procfs::kernel_mem()?;
    let next = Arc::new(AtomicUsize::new(0));
    let opened = Arc::new(AtomicU64::new(0));
    let closed_by_broker = Arc::new(AtomicU64::new(0));
    let release = CancellationToken::new();
    let ticker = Ticker::start(
        format!("idle {} opened", ctx.label),
        opened.clone(),
        Some(n as u64),
    );
    let start = Instant::now();
    let mut openers = Vec::with_capacity(plan.concurrency);
    for _ in 0..plan.concurrency.min(n.max(1)) {
        let ctx = ctx.clone();
        let (next, opened) = (next.clone(), opened.clone());
        let (closed, release) = (closed_by_broker.clone(), release.clone());
        openers.push(tokio::spawn(async move {
            opener(ctx, n, next, opened, closed, release).await
        }));
    }
    let mut holders = Vec::with_capacity(n);
    let (mut failures, mut first_failure) = (0usize, None);
    for o in openers {
        let r = o.await?;
        holders.extend(r.holders);
        failures += r.failures;
        first_failure = first_failure.or(r.first_failure);
    }
    let open_s = start.elapsed().as_secs_f64();
    drop(ticker);
    if holders.is_empty() {
        if let Some(first) = first_failure {
            return Err(LoadError::AllFailed {
                attempts: n,
                first: Box::new(first),
            });
        }
    }
    if let Some(e) = &first_failure {
        progress(&format!(
            "idle {}: {failures} failed, first: {e}",
            ctx.label
        ));
    }
    tokio::time::sleep(plan.settle).await;
    let rss_after = ctx.pid.map(procfs::rss_kib).transpose()?;
    let kernel_after = procfs::kernel_mem()?;
    let held = holders.len() as u64 - closed_by_broker.load(Ordering::Relaxed);
    progress(&format!("idle {}: holding {held} connections", ctx.label));
    tokio::time::sleep(plan.hold).await;
    let held_at_end = holders.len() as u64 - closed_by_broker.load(Ordering::Relaxed);
    release.cancel();
    for h in holders {
        h.await?;
    }

    let mut report = Report::new("idle", &ctx.label);
    report.push("connections", n as f64);
    report.push("failed", failures as f64);
    report.push("held", held as f64);
    report.push("held_at_end", held_at_end as f64);
    report.push("open_s", open_s);
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        report.push("rss_before_mib", before as f64 / 1024.0);
        report.push("rss_after_mib", after as f64 / 1024.0);
        report.push(
            "rss_kib_per_connection",
            after.saturating_sub(before) as f64 / held.max(1) as f64,
        );
    }
    // Each connection is two sockets of this kernel on loopback (the generator's and the
    // broker's): the figure per connection covers both ends.
    let held_f = held.max(1) as f64;
    let slab = kernel_after.slab_kib as f64 - kernel_before.slab_kib as f64;
    report.push("kernel_slab_kib_per_connection", slab / held_f);
    let pages = kernel_after.tcp_pages as f64 - kernel_before.tcp_pages as f64;
    report.push("kernel_tcp_buffer_kib_per_connection", pages * 4.0 / held_f);
    Ok(report)
}

struct OpenerResult {
    holders: Vec<JoinHandle<()>>,
    failures: usize,
    first_failure: Option<LoadError>,
}

async fn opener(
    ctx: Arc<Ctx>,
    n: usize,
    next: Arc<AtomicUsize>,
    opened: Arc<AtomicU64>,
    closed_by_broker: Arc<AtomicU64>,
    release: CancellationToken,
) -> OpenerResult {
    let mut out = OpenerResult {
        holders: Vec::new(),
        failures: 0,
        first_failure: None,
    };
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            return out;
        }
        match Conn::open(&ctx.target, ctx.creds.get(i), &format!("bench-idle-{i}")).await {
            Ok(conn) => {
                opened.fetch_add(1, Ordering::Relaxed);
                let ctx = ctx.clone();
                let (closed, release) = (closed_by_broker.clone(), release.clone());
                out.holders
                    .push(tokio::spawn(hold(ctx, conn, closed, release)));
            }
            Err(e) => {
                out.failures += 1;
                out.first_failure.get_or_insert(e);
            }
        }
    }
}

/// Holds one connection until `release`, pinging within the keep alive.
async fn hold(
    ctx: Arc<Ctx>,
    mut conn: Conn,
    closed_by_broker: Arc<AtomicU64>,
    release: CancellationToken,
) {
    let period = Duration::from_secs(u64::from(KEEP_ALIVE_S) / 2);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut pingreq = Vec::with_capacity(2);
    mqtt::pingreq(&mut pingreq);
    loop {
        tokio::select! {
            biased;
            _ = release.cancelled() => {
                let _closed = conn.close(&ctx.target).await;
                return;
            }
            _ = ping.tick() => {
                if conn.write(&ctx.target, &pingreq).await.is_err() {
                    break;
                }
            }
            r = conn.fill("holding") => {
                if r.is_err() {
                    break;
                }
                // PINGRESP is the only packet expected; whatever comes is consumed.
                while let Ok(Some(_packet)) = conn.decoder.next() {}
            }
        }
    }
    closed_by_broker.fetch_add(1, Ordering::Relaxed);
}
