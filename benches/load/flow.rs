//! `fan-in` (P publishers, 1 subscriber) and `fan-out` (1 publisher, S subscribers).
//!
//! Every payload starts with a [`HEADER`]: its send time (nanoseconds since `Ctx::epoch`),
//! the publisher's index and the message's sequence number from that publisher, all little
//! endian. The subscriber subtracts the send time from its receive time, so latency is end
//! to end through the broker, and marks (publisher, sequence) as seen. A QoS 1 publisher
//! marks each sequence number the broker acknowledged with PUBACK reason 0x00 (a 3.1.1
//! PUBACK has no reason and counts as 0x00; 0x80 and above, e.g. MQTT 5's 0x97 quota
//! exceeded, is a refusal, counted as `rejected`). `acked_lost` is then exact, message by
//! message: acknowledged as a success, never received by a subscriber. Publishers send as fast as the broker takes their bytes (or at
//! `--rate`): QoS 0 in batches of up to [`BATCH`] packets a write, QoS 1 with at most
//! `--window` PUBLISHes awaiting PUBACK. Connections are set up before the clock starts.
//! After the publishing time the run waits (bounded) until every expected message has
//! arrived or arrivals stop for a second, and the delivery rate is computed over first
//! send to last arrival.
//!
//! At saturation a QoS 0 publisher can outrun the subscriber; what the broker then drops
//! shows as `lost` and its queueing shows in the latency: both are results, and the same
//! rule applies to every broker. For QoS 1, `lost` also counts what was sent but never
//! acknowledged; `acked_lost` is the broken promise.
//!
//! Subscribers may connect to another broker than the publishers (`--sub-host`,
//! `--sub-port`: `Ctx::sub_target`), e.g. to another node of a cluster; latency stays exact
//! because both ends still run in this one process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, ReadHalf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use super::cli::Workload;
use super::conn::{write_bounded, Conn};
use super::mqtt::{self, Decoder, Packet};
use super::report::{progress, Latencies, Report, Ticker};
use super::{procfs, Ctx, LoadError};

/// Most packets written in one go by an unpaced publisher: enough to amortise a TLS
/// record and a syscall, few enough that the first packet's timestamp is not stale.
pub const BATCH: usize = 16;

/// Bytes at the start of every payload: send time (u64), publisher index (u32), sequence
/// number (u64).
pub const HEADER: usize = 20;

/// Sequence numbers above this in a received payload are not ours (a foreign message on
/// the topic): ignored rather than sized into a bitmap.
const MAX_SEQ: u64 = 1 << 32;

/// A set of sequence numbers from one publisher, one bit each.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    bits: Vec<u64>,
    count: u64,
}

impl Seen {
    /// Marks `seq`; false when it was marked already (a duplicate).
    pub fn insert(&mut self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        let mask = 1u64 << bit;
        let new = self.bits[word] & mask == 0;
        self.bits[word] |= mask;
        self.count += u64::from(new);
        new
    }

    /// How many sequence numbers are marked.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// How many of these are not in `other`.
    pub fn missing_from(&self, other: &Seen) -> u64 {
        self.bits
            .iter()
            .enumerate()
            .map(|(i, &w)| u64::from((w & !other.bits.get(i).copied().unwrap_or(0)).count_ones()))
            .sum()
    }
}

/// How a flow runs.
#[derive(Debug, Clone)]
pub struct Plan {
    pub workload: Workload,
    pub publishers: usize,
    pub subscribers: usize,
    pub qos: u8,
    pub duration: Duration,
    /// QoS 1 only: PUBLISHes in flight per publisher.
    pub window: usize,
    pub payload: usize,
    /// Messages per second per publisher; `None` = unpaced.
    pub rate: Option<f64>,
    /// PUBLISH with RETAIN set.
    pub retain: bool,
}

struct PubResult {
    sent: u64,
    /// QoS 1: the sequence numbers acknowledged with a success reason.
    acked: Option<Seen>,
    /// QoS 1: PUBACKs with a reason of 0x80 or above.
    rejected: u64,
}

struct SubResult {
    latencies: Latencies,
    received: u64,
    /// Per publisher index: the sequence numbers received.
    seen: Vec<Seen>,
    duplicates: u64,
    last_ns: u64,
}

pub async fn run(ctx: &Arc<Ctx>, plan: &Plan) -> Result<Report, LoadError> {
    let name = format!("{}-qos{}", plan.workload.name(), plan.qos);
    let filter = match plan.workload {
        Workload::FanIn => ctx.topic_template.replace("{device}", "+"),
        _ => ctx.topic_for(&ctx.creds.get(0).device),
    };
    progress(&format!(
        "{name} {}: {} publisher(s) to {}, {} subscriber(s) to {} on {filter:?}, {:?}",
        ctx.label,
        plan.publishers,
        ctx.target.addr,
        plan.subscribers,
        ctx.sub_target.addr,
        plan.duration
    ));
    let mut subs = Vec::with_capacity(plan.subscribers);
    for s in 0..plan.subscribers {
        let mut conn = if ctx.persistent_subscribers {
            // A fresh persistent session per run: nothing queued from an earlier run.
            let run = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            Conn::open_with(
                &ctx.sub_target,
                ctx.sub_creds.get(s),
                &format!("bench-sub-{s}-{run}"),
                false,
            )
            .await?
        } else {
            Conn::open(
                &ctx.sub_target,
                ctx.sub_creds.get(s),
                &format!("bench-sub-{s}"),
            )
            .await?
        };
        conn.subscribe(&ctx.sub_target, &filter, plan.qos).await?;
        subs.push(conn);
    }
    let mut pubs = Vec::with_capacity(plan.publishers);
    for p in 0..plan.publishers {
        let identity = ctx.creds.get(p);
        let conn = Conn::open(&ctx.target, identity, &format!("bench-pub-{p}")).await?;
        pubs.push((conn, ctx.topic_for(&identity.device)));
    }

    let delivered = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let ticker = Ticker::start(
        format!("{name} {} delivered", ctx.label),
        delivered.clone(),
        None,
    );
    let cpu_before = ctx.pid.map(procfs::cpu_seconds).transpose()?;
    let start = Instant::now();
    let start_ns = ctx.now_ns();
    let deadline = start + plan.duration;
    let sub_tasks: Vec<_> = subs
        .into_iter()
        .map(|conn| {
            tokio::spawn(receive(
                ctx.clone(),
                conn,
                plan.publishers,
                delivered.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let pub_tasks: Vec<_> = pubs
        .into_iter()
        .enumerate()
        .map(|(index, (conn, topic))| {
            let (ctx, plan) = (ctx.clone(), plan.clone());
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            tokio::spawn(async move {
                if plan.qos == 0 {
                    publish_qos0(&ctx, conn, &topic, index, &plan, deadline).await
                } else {
                    publish_qos1(&ctx, conn, &topic, index, &plan, deadline).await
                }
            })
        })
        .collect();
    let (mut sent, mut acked, mut rejected) = (0, 0, 0);
    let mut acked_sets = Vec::with_capacity(plan.publishers);
    for t in pub_tasks {
        let r = t.await??;
        sent += r.sent;
        rejected += r.rejected;
        acked += r.acked.as_ref().map_or(r.sent, Seen::count);
        acked_sets.push(r.acked);
    }
    let publish_s = start.elapsed().as_secs_f64();
    let subscribers = plan.subscribers as u64;
    drain(ctx, &delivered, acked * subscribers).await;
    stop.cancel();
    let mut latencies = Latencies::new();
    let (mut received, mut unique, mut duplicates, mut acked_lost) = (0, 0, 0, 0);
    let mut last_ns = start_ns;
    for t in sub_tasks {
        let r = t.await??;
        latencies.extend(r.latencies);
        received += r.received;
        duplicates += r.duplicates;
        unique += r.seen.iter().map(Seen::count).sum::<u64>();
        for (acked, seen) in acked_sets.iter().zip(&r.seen) {
            if let Some(acked) = acked {
                acked_lost += acked.missing_from(seen);
            }
        }
        last_ns = last_ns.max(r.last_ns);
    }
    let cpu_after = ctx.pid.map(procfs::cpu_seconds).transpose()?;
    drop(ticker);

    let mut report = Report::new(&name, &ctx.label);
    report.push("publishers", plan.publishers as f64);
    report.push("subscribers", plan.subscribers as f64);
    report.push("payload_bytes", plan.payload as f64);
    report.push("sent", sent as f64);
    report.push("sent_per_s", sent as f64 / publish_s);
    if plan.qos > 0 {
        report.push("acked", acked as f64);
        report.push("rejected", rejected as f64);
    }
    report.push("delivered", received as f64);
    report.push("duplicates", duplicates as f64);
    report.push("lost", (sent * subscribers).saturating_sub(unique) as f64);
    if plan.qos > 0 {
        report.push("acked_lost", acked_lost as f64);
    }
    let span_s = (last_ns - start_ns) as f64 / 1e9;
    report.push(
        "delivered_per_s",
        if received == 0 {
            0.0
        } else {
            received as f64 / span_s
        },
    );
    latencies.report(&mut report, "latency_");
    if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
        report.push("server_cpu_s", after.0 - before.0);
        report.push(
            "server_cpu_us_per_delivered",
            (after.0 - before.0) * 1e6 / received.max(1) as f64,
        );
    }
    Ok(report)
}

/// Waits until `expected` messages arrived, arrivals stopped for a second, or the
/// target's timeout passed.
async fn drain(ctx: &Ctx, delivered: &AtomicU64, expected: u64) {
    let give_up = Instant::now() + ctx.target.timeout;
    let mut last = delivered.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    while last < expected && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = delivered.load(Ordering::Relaxed);
        if now != last {
            last = now;
            last_change = Instant::now();
        } else if last_change.elapsed() >= Duration::from_secs(1) {
            break;
        }
    }
}

/// Reads until `stop`, acknowledging QoS 1 deliveries after each read.
async fn receive(
    ctx: Arc<Ctx>,
    mut conn: Conn,
    publishers: usize,
    delivered: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Result<SubResult, LoadError> {
    let mut out = SubResult {
        latencies: Latencies::new(),
        received: 0,
        seen: vec![Seen::default(); publishers],
        duplicates: 0,
        last_ns: 0,
    };
    let mut acks = Vec::with_capacity(256);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = conn.fill("receiving") => r?,
        }
        let now = ctx.now_ns();
        let mut batch = 0;
        while let Some(packet) = conn.decoder.next()? {
            if let Packet::Publish {
                qos,
                packet_id,
                payload,
            } = packet
            {
                if let Some((sent, publisher, seq)) = read_header(&payload) {
                    out.latencies.push(now.saturating_sub(sent));
                    if let Some(seen) = out.seen.get_mut(publisher as usize) {
                        if seq < MAX_SEQ && !seen.insert(seq) {
                            out.duplicates += 1;
                        }
                    }
                }
                batch += 1;
                if qos == 1 {
                    mqtt::puback(&mut acks, packet_id);
                }
            }
        }
        if batch > 0 {
            out.received += batch;
            out.last_ns = now;
            delivered.fetch_add(batch, Ordering::Relaxed);
        }
        if !acks.is_empty() {
            conn.write(&ctx.sub_target, &acks).await?;
            acks.clear();
        }
    }
    let _closed = conn.close(&ctx.sub_target).await;
    Ok(out)
}

/// Paces a publisher at `rate` messages per second, or not at all.
struct Pacer(Option<tokio::time::Interval>);

impl Pacer {
    fn new(rate: Option<f64>) -> Pacer {
        Pacer(rate.map(|r| {
            let period = Duration::from_secs_f64(1.0 / r).max(Duration::from_micros(1));
            tokio::time::interval(period)
        }))
    }

    /// Packets per write: one when paced.
    fn batch(&self) -> usize {
        if self.0.is_some() {
            1
        } else {
            BATCH
        }
    }

    async fn wait(&mut self) {
        if let Some(i) = &mut self.0 {
            i.tick().await;
        }
    }
}

/// Writes the [`HEADER`] into `payload` (at least `HEADER` bytes, as the CLI enforces).
fn stamp(payload: &mut [u8], ns: u64, publisher: u32, seq: u64) {
    payload[..8].copy_from_slice(&ns.to_le_bytes());
    payload[8..12].copy_from_slice(&publisher.to_le_bytes());
    payload[12..HEADER].copy_from_slice(&seq.to_le_bytes());
}

/// (send time, publisher, sequence) from a payload's [`HEADER`].
pub fn read_header(payload: &[u8]) -> Option<(u64, u32, u64)> {
    let h = payload.get(..HEADER)?;
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let publisher = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    Some((u64_at(0), publisher, u64_at(12)))
}

async fn publish_qos0(
    ctx: &Ctx,
    mut conn: Conn,
    topic: &str,
    index: u32,
    plan: &Plan,
    deadline: Instant,
) -> Result<PubResult, LoadError> {
    let mut payload = vec![0u8; plan.payload];
    let mut buf = Vec::with_capacity(BATCH * (plan.payload + topic.len() + 8));
    let mut pacer = Pacer::new(plan.rate);
    let mut sent = 0u64;
    while Instant::now() < deadline {
        pacer.wait().await;
        buf.clear();
        let k = pacer.batch();
        for _ in 0..k {
            stamp(&mut payload, ctx.now_ns(), index, sent);
            mqtt::publish(&mut buf, topic, 0, 0, plan.retain, &payload);
            sent += 1;
        }
        conn.write(&ctx.target, &buf).await?;
    }
    let _closed = conn.close(&ctx.target).await;
    Ok(PubResult {
        sent,
        acked: None,
        rejected: 0,
    })
}

async fn publish_qos1(
    ctx: &Ctx,
    conn: Conn,
    topic: &str,
    index: u32,
    plan: &Plan,
    deadline: Instant,
) -> Result<PubResult, LoadError> {
    let (rd, mut wr) = tokio::io::split(conn.stream);
    let window = Arc::new(Semaphore::new(plan.window));
    let answered = Arc::new(AtomicU64::new(0));
    // Packet id -> sequence number of the PUBLISH in flight under it (ids are reused only
    // after 65,535 further messages, far beyond any window).
    let ids: Arc<Vec<AtomicU64>> = Arc::new((0..=u16::MAX).map(|_| AtomicU64::new(0)).collect());
    let stop = CancellationToken::new();
    let reader = tokio::spawn(read_acks(
        rd,
        conn.decoder,
        ids.clone(),
        window.clone(),
        answered.clone(),
        stop.clone(),
    ));
    let mut payload = vec![0u8; plan.payload];
    let mut buf = Vec::with_capacity(BATCH * (plan.payload + topic.len() + 8));
    let mut pacer = Pacer::new(plan.rate);
    let (mut sent, mut packet_id) = (0u64, 0u16);
    while Instant::now() < deadline {
        pacer.wait().await;
        let first = ctx
            .target
            .bounded("PUBACK (window full)", async { Ok(window.acquire().await) })
            .await?;
        // A closed window means the reader stopped: its error is returned below.
        let Ok(first) = first else { break };
        first.forget();
        let mut k = 1;
        while k < pacer.batch() {
            match window.try_acquire() {
                Ok(p) => {
                    p.forget();
                    k += 1;
                }
                Err(_no_permit_now) => break,
            }
        }
        buf.clear();
        for _ in 0..k {
            packet_id = packet_id.checked_add(1).unwrap_or(1);
            ids[usize::from(packet_id)].store(sent, Ordering::Release);
            stamp(&mut payload, ctx.now_ns(), index, sent);
            mqtt::publish(&mut buf, topic, 1, packet_id, plan.retain, &payload);
            sent += 1;
        }
        write_bounded(&ctx.target, &mut wr, &buf).await?;
    }
    let give_up = Instant::now() + ctx.target.timeout;
    while answered.load(Ordering::Relaxed) < sent
        && Instant::now() < give_up
        && !reader.is_finished()
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    let (rd, decoder, acked, rejected) = reader.await??;
    let conn = Conn {
        stream: rd.unsplit(wr),
        decoder,
    };
    let _closed = conn.close(&ctx.target).await;
    Ok(PubResult {
        sent,
        acked: Some(acked),
        rejected,
    })
}

type AckReader = (ReadHalf<TlsStream<TcpStream>>, Decoder, Seen, u64);

/// Reads PUBACKs and reopens the window by one for each; marks the sequence number of each
/// success (reason below 0x80) and counts the refusals. On any failure it closes the window
/// so that the writer stops instead of waiting for acknowledgements.
async fn read_acks(
    mut rd: ReadHalf<TlsStream<TcpStream>>,
    mut decoder: Decoder,
    ids: Arc<Vec<AtomicU64>>,
    window: Arc<Semaphore>,
    answered: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Result<AckReader, LoadError> {
    let mut acked = Seen::default();
    let mut rejected = 0u64;
    let result = loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break Ok(()),
            r = rd.read_buf(decoder.buffer()) => match r {
                Ok(0) => break Err(LoadError::Closed { what: "publishing" }),
                Ok(_) => {}
                Err(source) => break Err(LoadError::Io { what: "reading PUBACKs", source }),
            },
        }
        let mut n = 0;
        let decoded = loop {
            match decoder.next() {
                Ok(Some(Packet::PubAck { packet_id, reason })) => {
                    n += 1;
                    if reason < 0x80 {
                        acked.insert(ids[usize::from(packet_id)].load(Ordering::Acquire));
                    } else {
                        rejected += 1;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break Ok(()),
                Err(e) => break Err(LoadError::Mqtt(e)),
            }
        };
        answered.fetch_add(n as u64, Ordering::Relaxed);
        window.add_permits(n);
        if decoded.is_err() {
            break decoded;
        }
    };
    match result {
        Ok(()) => Ok((rd, decoder, acked, rejected)),
        Err(e) => {
            window.close();
            Err(e)
        }
    }
}
