//! `queued` and `retained`: what a stored message costs the broker in resident memory, for
//! the capacity sheet (contract §11 measures idle connections the same way, `idle.rs`).
//!
//! `queued`: one persistent subscriber (clean session 0, the subscriber identity) subscribes
//! at QoS 1 to the first device's topic and goes offline; that device then publishes N QoS 1
//! messages, each acknowledged, which the broker must keep for the offline session. The
//! broker's VmRSS is read before the first PUBLISH and `settle` after the last PUBACK; the
//! subscriber then comes back and reads what was kept (`queued`: a broker that drops at a
//! queue limit must not look cheaper), acknowledging each message.
//!
//! `retained`: the first device publishes N retained QoS 1 messages, each on a topic of its
//! own under its topic (`<topic>/<i>`); VmRSS before and after as above; a subscriber then
//! reads them back with `<topic>/+` at QoS 0 (`retained`: what the broker kept).
//!
//! Both publish in batches of `BATCH` and wait for every PUBACK of a batch before the next,
//! so the broker's own limits on in-flight messages are never what is measured.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conn::Conn;
use super::mqtt::{self, Packet};
use super::report::{progress, Report};
use super::{procfs, Ctx, LoadError};

/// QoS 1 PUBLISHes sent before waiting for their PUBACKs: within MQTT 5's default Receive
/// Maximum of certmq (64) and Mosquitto (20 in flight, the rest queued by the broker).
const BATCH: u16 = 20;

/// How a capacity run goes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub messages: u64,
    pub payload: usize,
    pub settle: Duration,
}

/// `queued`: N messages kept for one offline persistent session.
pub async fn queued(ctx: &Arc<Ctx>, plan: &Plan) -> Result<Report, LoadError> {
    let n = plan.messages;
    let device = &ctx.creds.get(0).device;
    let topic = ctx.topic_for(device);
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let client_id = format!("bench-queued-{run}");
    progress(&format!(
        "queued {}: {n} QoS 1 messages on {topic:?} for an offline session",
        ctx.label
    ));
    let sub_identity = ctx.sub_creds.get(0);
    let mut sub = Conn::open_with(&ctx.target, sub_identity, &client_id, false).await?;
    sub.subscribe(&ctx.target, &topic, 1).await?;
    sub.close(&ctx.target).await?;
    let mut publisher = Conn::open(&ctx.target, ctx.creds.get(0), "bench-queued-pub").await?;
    let (before, after, rejected) =
        measured(ctx, plan, &mut publisher, false, |_| topic.clone()).await?;
    let _closed = publisher.close(&ctx.target).await;

    let mut sub = Conn::open_with(&ctx.target, sub_identity, &client_id, false).await?;
    let kept = drain(ctx, &mut sub, n, true).await?;
    // Clean session 1 then ends the session: nothing stays behind for the next run.
    let _closed = sub.close(&ctx.target).await;
    let gone = Conn::open(&ctx.target, sub_identity, &client_id).await?;
    let _closed = gone.close(&ctx.target).await;

    let mut report = Report::new("queued", &ctx.label);
    push_figures(&mut report, plan, rejected, before, after, "queued", kept);
    Ok(report)
}

/// `retained`: N retained messages, one topic each.
pub async fn retained(ctx: &Arc<Ctx>, plan: &Plan) -> Result<Report, LoadError> {
    let n = plan.messages;
    let device = &ctx.creds.get(0).device;
    let base = ctx.topic_for(device);
    progress(&format!(
        "retained {}: {n} retained QoS 1 messages under {base:?}/",
        ctx.label
    ));
    let mut publisher = Conn::open(&ctx.target, ctx.creds.get(0), "bench-retained-pub").await?;
    let (before, after, rejected) =
        measured(ctx, plan, &mut publisher, true, |i| format!("{base}/{i}")).await?;
    let _closed = publisher.close(&ctx.target).await;

    let mut sub = Conn::open(&ctx.target, ctx.sub_creds.get(0), "bench-retained-sub").await?;
    sub.subscribe(&ctx.target, &format!("{base}/+"), 0).await?;
    let kept = drain(ctx, &mut sub, n, false).await?;
    let _closed = sub.close(&ctx.target).await;

    let mut report = Report::new("retained", &ctx.label);
    push_figures(&mut report, plan, rejected, before, after, "retained", kept);
    Ok(report)
}

fn push_figures(
    report: &mut Report,
    plan: &Plan,
    rejected: u64,
    before: Option<u64>,
    after: Option<u64>,
    kept_name: &str,
    kept: u64,
) {
    report.push("messages", plan.messages as f64);
    report.push("payload_bytes", plan.payload as f64);
    report.push("rejected", rejected as f64);
    report.push(kept_name, kept as f64);
    if let (Some(before), Some(after)) = (before, after) {
        report.push("rss_before_mib", before as f64 / 1024.0);
        report.push("rss_after_mib", after as f64 / 1024.0);
        report.push(
            "rss_bytes_per_message",
            after.saturating_sub(before) as f64 * 1024.0 / kept.max(1) as f64,
        );
    }
}

/// Publishes `plan.messages` QoS 1 messages, message i on `topic_of(i)`, reading the
/// broker's RSS before and `settle` after. Returns (before, after, refused PUBACKs).
async fn measured(
    ctx: &Ctx,
    plan: &Plan,
    conn: &mut Conn,
    retain: bool,
    topic_of: impl Fn(u64) -> String,
) -> Result<(Option<u64>, Option<u64>, u64), LoadError> {
    let before = ctx.pid.map(procfs::rss_kib).transpose()?;
    let payload = vec![b'x'; plan.payload];
    let mut buf = Vec::new();
    let (mut sent, mut rejected) = (0u64, 0u64);
    let start = Instant::now();
    while sent < plan.messages {
        buf.clear();
        let k = u64::from(BATCH).min(plan.messages - sent);
        for id in 1..=k {
            let topic = topic_of(sent + id - 1);
            mqtt::publish(&mut buf, &topic, 1, id as u16, retain, &payload);
        }
        conn.write(&ctx.target, &buf).await?;
        let mut acked = 0;
        while acked < k {
            match conn.next(&ctx.target, "PUBACK").await? {
                Packet::PubAck { reason, .. } => {
                    acked += 1;
                    if reason >= 0x80 {
                        rejected += 1;
                    }
                }
                other => {
                    return Err(LoadError::Unexpected {
                        expected: "PUBACK",
                        got: format!("{other:?}"),
                    })
                }
            }
        }
        sent += k;
    }
    progress(&format!(
        "{} messages acknowledged in {:.1} s",
        sent,
        start.elapsed().as_secs_f64()
    ));
    tokio::time::sleep(plan.settle).await;
    let after = ctx.pid.map(procfs::rss_kib).transpose()?;
    Ok((before, after, rejected))
}

/// Reads PUBLISHes until `expected` arrived or none came for a second; acknowledges QoS 1
/// ones when `ack`. Returns how many arrived.
async fn drain(ctx: &Ctx, conn: &mut Conn, expected: u64, ack: bool) -> Result<u64, LoadError> {
    let mut got = 0u64;
    let mut out = Vec::new();
    loop {
        // What came with the CONNACK or SUBACK is already in the decoder: decode first.
        out.clear();
        while let Some(packet) = conn.decoder.next()? {
            if let Packet::Publish { qos, packet_id, .. } = packet {
                got += 1;
                if ack && qos > 0 {
                    mqtt::puback(&mut out, packet_id);
                }
            }
        }
        if !out.is_empty() {
            conn.write(&ctx.target, &out).await?;
        }
        if got >= expected {
            return Ok(got);
        }
        let quiet = tokio::time::timeout(Duration::from_secs(1), conn.fill("draining")).await;
        match quiet {
            Err(_elapsed) => return Ok(got),
            Ok(r) => r?,
        }
    }
}
