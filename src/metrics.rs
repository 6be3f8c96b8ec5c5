//! Process-wide metrics (docs/metrics.md), kept and encoded with `prometheus-client`.
//!
//! The hot path (messages, bytes, drops) is one relaxed atomic add per event: every
//! counter a connection bumps is a `prometheus_client` [`Counter`] (an `Arc<AtomicU64>`)
//! held directly by [`Metrics`], including the labelled ones a busy broker hits per
//! message (`messages_dropped_total{reason="queue_full"}`...), which are created once at
//! start. No lock or allocation is taken per message. Labelled counters of rarer events
//! (refusals by reason, drops for other reasons) take a short read lock per event.
//!
//! Values that live elsewhere (the expiry dates of the config in force, sessions and
//! connections per anchor, CRL fetch state, /proc) are read at scrape time by a
//! [`Collector`]. `/metrics` is served in the Prometheus text format 0.0.4 (what
//! `promtool check metrics` reads), or in OpenMetrics when the scraper asks for it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// The expiry dates of a config, as `/metrics` shows them (built by
/// `Config::gauges`, so that metrics need not know the config).
#[derive(Debug, Default, Clone)]
pub struct ConfigGauges {
    /// Each anchor's certificate notAfter (unix seconds), by anchor name.
    pub anchors: Vec<(String, i64)>,
    /// Each anchor CRL's nextUpdate, for anchors whose CRL has one.
    pub crls: Vec<(String, i64)>,
    /// The server certificate's notAfter; 0 when unreadable.
    pub server_not_after: i64,
}

/// What the admin endpoint reads from the running broker just before encoding.
#[derive(Debug, Default, Clone)]
pub struct LiveGauges {
    /// Sessions held, connected or not.
    pub sessions: i64,
    /// Admitted connections open now, by the anchor that admitted them; every configured
    /// anchor is listed, with 0 when it has none.
    pub by_anchor: Vec<(String, i64)>,
    /// Admitted connections of pinned devices.
    pub pinned: i64,
    /// Cluster mode: this node's name and whether it is connected to NATS (1) or not (0);
    /// empty when standalone (the family is then left out).
    pub nats_connected: Vec<(String, i64)>,
}

/// A label set with one label whose value is fixed at compile time (`reason`, `result`).
type StaticLabel = [(&'static str, &'static str); 1];
/// A label set with one label naming an anchor.
type AnchorLabel = [(&'static str, String); 1];

/// The drop reasons a busy broker may hit for every message: created at start so that
/// counting them never takes a lock.
const HOT_DROP_REASONS: [&str; 3] = ["queue_full", "offline_qos0", "acl"];

/// The broker's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Every family, for encoding. std Mutex: taken by scrapes only, never on the
    /// connection path.
    registry: Mutex<Registry>,
    /// Values read at scrape time (shared with the [`StateCollector`]).
    state: Arc<Mutex<State>>,
    /// Open device connections (TCP accepted and not yet closed).
    pub connections: Gauge,
    pub handshakes_ok: Counter,
    pub handshakes_failed: Counter,
    pub devices_provisioned: Counter,
    pub messages_received: Counter,
    pub messages_sent: Counter,
    /// Bytes read from and written to device connections (TCP payload: TLS records).
    pub bytes_received: Counter,
    pub bytes_sent: Counter,
    refusals: ReasonCounters,
    dropped: ReasonCounters,
    /// Handles into `dropped` for [`HOT_DROP_REASONS`], in that order.
    dropped_hot: [Counter; 3],
    reloads_ok: Counter,
    reloads_failed: Counter,
    /// Seconds since the epoch of the last load of the config (start or reload).
    last_reload_at: Gauge,
    /// 1 if the last load applied, 0 if it was refused.
    last_reload_ok: Gauge,
    /// Failed CRL fetches by anchor (docs/crl.md).
    crl_fetch_failures: Family<AnchorLabel, Counter>,
    /// When each anchor's CRL was last fetched successfully.
    crl_last_success: Family<AnchorLabel, Gauge>,
    /// When this process started, seconds since the epoch.
    started_at: Arc<AtomicI64>,
    /// Messages a device's sessions could not take since the last flush into the registry
    /// (`devices show`). Per device, not a metric label: devices are unbounded.
    device_drops: Mutex<HashMap<String, u64>>,
}

/// Scrape-time values.
#[derive(Debug, Default)]
struct State {
    config: ConfigGauges,
    live: LiveGauges,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// Every family registered, the hot counters created.
    pub fn new() -> Metrics {
        let mut r = Registry::default();
        let build = Info::new([("version", env!("CARGO_PKG_VERSION"))]);
        r.register("certmq_build", "certmq's version; always 1", build);
        let connections = Gauge::default();
        r.register(
            "certmq_connections",
            "open device connections (TCP accepted, not yet closed)",
            connections.clone(),
        );
        let handshakes = Family::<StaticLabel, Counter>::default();
        let handshakes_ok = handshakes.get_or_create_owned(&[("result", "ok")]);
        let handshakes_failed = handshakes.get_or_create_owned(&[("result", "failed")]);
        r.register("certmq_handshakes", "TLS handshakes by result", handshakes);
        let refusals = ReasonCounters::default();
        r.register(
            "certmq_auth_refusals",
            "connections refused, at TLS or at CONNECT, by reason",
            refusals.clone(),
        );
        let devices_provisioned = Counter::default();
        r.register(
            "certmq_devices_provisioned",
            "devices created on their first connection",
            devices_provisioned.clone(),
        );
        let messages_received = Counter::default();
        r.register(
            "certmq_messages_received",
            "PUBLISH packets accepted from clients",
            messages_received.clone(),
        );
        let messages_sent = Counter::default();
        r.register(
            "certmq_messages_sent",
            "PUBLISH packets sent to clients",
            messages_sent.clone(),
        );
        let bytes_received = Counter::default();
        r.register(
            "certmq_received_bytes",
            "bytes read from device connections (TCP payload: TLS records, handshakes included)",
            bytes_received.clone(),
        );
        let bytes_sent = Counter::default();
        r.register(
            "certmq_sent_bytes",
            "bytes written to device connections (TCP payload: TLS records, handshakes included)",
            bytes_sent.clone(),
        );
        let dropped = ReasonCounters::default();
        let dropped_hot = HOT_DROP_REASONS.map(|reason| dropped.get(reason));
        r.register(
            "certmq_messages_dropped",
            "messages a session could not take or may not receive, by reason",
            dropped.clone(),
        );
        let reloads = Family::<StaticLabel, Counter>::default();
        let reloads_ok = reloads.get_or_create_owned(&[("result", "ok")]);
        let reloads_failed = reloads.get_or_create_owned(&[("result", "failed")]);
        r.register("certmq_reloads", "configuration reloads by result", reloads);
        let last_reload_at = Gauge::default();
        r.register(
            "certmq_last_reload_timestamp_seconds",
            "when the configuration was last loaded (start or reload), seconds since the epoch",
            last_reload_at.clone(),
        );
        let last_reload_ok = Gauge::default();
        r.register(
            "certmq_last_reload_success",
            "1 when the last load of the configuration (start or reload) applied, else 0",
            last_reload_ok.clone(),
        );
        let crl_fetch_failures = Family::<AnchorLabel, Counter>::default();
        r.register(
            "certmq_crl_fetch_failures",
            "failed fetches of an anchor's CRL from its crl_url (unreachable, refused, stale or older than the copy in force)",
            crl_fetch_failures.clone(),
        );
        let crl_last_success = Family::<AnchorLabel, Gauge>::default();
        r.register(
            "certmq_crl_last_fetch_success_timestamp_seconds",
            "when an anchor's CRL was last fetched from its crl_url and found good, seconds since the epoch",
            crl_last_success.clone(),
        );
        let state = Arc::new(Mutex::new(State::default()));
        r.register_collector(Box::new(StateCollector(state.clone())));
        let started_at = Arc::new(AtomicI64::new(0));
        r.register_collector(Box::new(ProcessCollector(started_at.clone())));
        Metrics {
            registry: Mutex::new(r),
            state,
            connections,
            handshakes_ok,
            handshakes_failed,
            devices_provisioned,
            messages_received,
            messages_sent,
            bytes_received,
            bytes_sent,
            refusals,
            dropped,
            dropped_hot,
            reloads_ok,
            reloads_failed,
            last_reload_at,
            last_reload_ok,
            crl_fetch_failures,
            crl_last_success,
            started_at,
            device_drops: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a message a session of `device` could not take (contract §7).
    pub fn device_dropped(&self, device: &str) {
        if let Ok(mut m) = self.device_drops.lock() {
            *m.entry(device.to_owned()).or_default() += 1;
        }
    }

    /// The per-device drop counts since the last call.
    pub fn take_device_drops(&self) -> Vec<(String, u64)> {
        self.device_drops
            .lock()
            .map(|mut m| m.drain().collect())
            .unwrap_or_default()
    }

    /// Counts one authentication refusal.
    pub fn auth_refused(&self, reason: &'static str) {
        self.refusals.get(reason).inc();
    }

    /// The counter of drops for `reason`: a lock-free handle for the reasons hit per
    /// message, a short read lock for the others.
    fn drop_counter(&self, reason: &'static str) -> Counter {
        match HOT_DROP_REASONS.iter().position(|r| *r == reason) {
            Some(i) => self.dropped_hot[i].clone(),
            None => self.dropped.get(reason),
        }
    }

    /// Counts messages dropped for a reason.
    pub fn dropped(&self, reason: &'static str, n: u64) {
        match HOT_DROP_REASONS.iter().position(|r| *r == reason) {
            Some(i) => self.dropped_hot[i].inc_by(n),
            None => self.dropped.get(reason).inc_by(n),
        };
    }

    /// Counts one message dropped for `reason` and returns the running total (callers log
    /// at powers of two of it: a flood of drops is not a flood of log lines).
    pub fn count_drop(&self, reason: &'static str) -> u64 {
        self.drop_counter(reason).inc() + 1
    }

    /// Records a reload attempt.
    pub fn reloaded(&self, ok: bool) {
        if ok {
            self.reloads_ok.inc();
        } else {
            self.reloads_failed.inc();
        }
        self.last_reload_at.set(crate::cert::now_secs());
        self.last_reload_ok.set(i64::from(ok));
    }

    /// A successful start counts as a successful load of the config: without it the
    /// usual alert on `certmq_last_reload_success == 0` would fire on every fresh start.
    pub fn started(&self) {
        let now = crate::cert::now_secs();
        self.started_at.store(now, Ordering::Relaxed);
        self.last_reload_at.set(now);
        self.last_reload_ok.set(1);
    }

    /// Publishes the expiry gauges of the config in force (contract §10).
    pub fn set_config_gauges(&self, gauges: ConfigGauges) {
        if let Ok(mut s) = self.state.lock() {
            s.config = gauges;
        }
    }

    /// Publishes what the admin endpoint read from the broker for this scrape.
    pub fn set_live_gauges(&self, live: LiveGauges) {
        if let Ok(mut s) = self.state.lock() {
            s.live = live;
        }
    }

    /// Counts one failed fetch of `anchor`'s CRL.
    pub fn crl_fetch_failed(&self, anchor: &str) {
        self.crl_fetch_failures
            .get_or_create(&[("anchor", anchor.to_owned())])
            .inc();
    }

    /// Records a good fetch of `anchor`'s CRL at `at` (seconds since the epoch).
    pub fn crl_fetched(&self, anchor: &str, at: i64) {
        let label = [("anchor", anchor.to_owned())];
        // The failure series exists from the first fetch on, so that an alert on its
        // increase sees the first failure.
        drop(self.crl_fetch_failures.get_or_create(&label));
        self.crl_last_success.get_or_create(&label).set(at);
    }

    /// Makes `anchor`'s CRL fetch series exist (0 = never fetched) before its first fetch.
    pub fn crl_watched(&self, anchor: &str) {
        let label = [("anchor", anchor.to_owned())];
        drop(self.crl_fetch_failures.get_or_create(&label));
        drop(self.crl_last_success.get_or_create(&label));
    }

    /// Forgets the CRL fetch series of an anchor that no longer has a `crl_url`.
    pub fn crl_unwatched(&self, anchor: &str) {
        let label = [("anchor", anchor.to_owned())];
        self.crl_fetch_failures.remove(&label);
        self.crl_last_success.remove(&label);
    }

    /// Refusal counts so far (tests).
    pub fn refusals(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.refusals.snapshot().into_iter().collect()
    }

    /// The Prometheus text exposition (format 0.0.4): every family with HELP and TYPE.
    pub fn render(&self) -> String {
        self.encode(Format::Prometheus)
    }

    /// The exposition in `format`.
    pub fn encode(&self, format: Format) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing into a String cannot fail; an encoder error would be a bug in a
        // collector, and the scrape then shows what was written before it.
        let _ = match format {
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            }
            Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
        };
        out
    }
}

/// The two text formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4, the default.
    Prometheus,
    /// OpenMetrics 1.0 text, for scrapers that ask for it.
    OpenMetrics,
}

impl Format {
    /// The Content-Type header of the format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// The format a scraper's Accept header asks for: OpenMetrics when it names it.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }
}

/// Counters labelled by one `reason`, created on first use. Unlike a `Family` it can list
/// its counters (tests read the refusals), and it encodes them sorted by reason. std
/// RwLock: a read lock and a scan of a few entries per event, a write lock the first
/// time a reason occurs.
#[derive(Debug, Default, Clone)]
struct ReasonCounters {
    counters: Arc<RwLock<Vec<(&'static str, Counter)>>>,
}

impl ReasonCounters {
    /// The counter for `reason` (a handle sharing its atomic).
    fn get(&self, reason: &'static str) -> Counter {
        if let Some(c) = self
            .counters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(r, _)| *r == reason)
        {
            return c.1.clone();
        }
        let mut all = self.counters.write().unwrap_or_else(|p| p.into_inner());
        if let Some((_, c)) = all.iter().find(|(r, _)| *r == reason) {
            return c.clone();
        }
        let c = Counter::default();
        all.push((reason, c.clone()));
        all.sort_by_key(|(r, _)| *r);
        c
    }

    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        self.counters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(r, c)| (*r, c.get()))
            .collect()
    }
}

impl TypedMetric for ReasonCounters {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for ReasonCounters {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (reason, n) in self.snapshot() {
            ConstCounter::new(n).encode(encoder.encode_family(&[("reason", reason)])?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }

    fn is_empty(&self) -> bool {
        self.counters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }
}

/// Encodes one gauge family from (label value, value) pairs; nothing when empty.
fn gauge_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    values: &[(String, i64)],
) -> Result<(), std::fmt::Error> {
    if values.is_empty() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (value_label, v) in values {
        ConstGauge::new(*v).encode(family.encode_family(&[(label, value_label.as_str())])?)?;
    }
    Ok(())
}

/// Encodes one gauge without labels.
fn gauge<N: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// The values the broker publishes into [`State`], encoded at scrape time.
#[derive(Debug)]
struct StateCollector(Arc<Mutex<State>>);

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (config, live) = match self.0.lock() {
            Ok(s) => (s.config.clone(), s.live.clone()),
            Err(p) => {
                let s = p.into_inner();
                (s.config.clone(), s.live.clone())
            }
        };
        gauge(
            &mut encoder,
            "certmq_server_certificate_not_after_timestamp_seconds",
            "notAfter of the server certificate in force, seconds since the epoch.",
            config.server_not_after,
        )?;
        gauge_family(
            &mut encoder,
            "certmq_anchor_not_after_timestamp_seconds",
            "notAfter of each trust anchor's certificate, seconds since the epoch.",
            "anchor",
            &config.anchors,
        )?;
        gauge_family(
            &mut encoder,
            "certmq_crl_next_update_timestamp_seconds",
            "nextUpdate of the CRL in force for each anchor, seconds since the epoch.",
            "anchor",
            &config.crls,
        )?;
        gauge(
            &mut encoder,
            "certmq_sessions",
            "sessions held, connected or not.",
            live.sessions,
        )?;
        gauge_family(
            &mut encoder,
            "certmq_anchor_connections",
            "admitted device connections open now, by the anchor that admitted them.",
            "anchor",
            &live.by_anchor,
        )?;
        gauge(
            &mut encoder,
            "certmq_pinned_connections",
            "admitted connections of pinned devices open now.",
            live.pinned,
        )?;
        gauge_family(
            &mut encoder,
            "certmq_cluster_nats_connected",
            "cluster mode: 1 while this node is connected to NATS, else 0 (docs/cluster.md).",
            "node",
            &live.nats_connected,
        )
    }
}

/// The standard process metrics, read from /proc (Linux) at scrape time; a family whose
/// source cannot be read is left out.
#[derive(Debug)]
struct ProcessCollector(Arc<AtomicI64>);

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // After the command name in parentheses: field 14 utime, 15 stime (clock ticks).
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().collect())
                .unwrap_or_default();
            let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
            if let (Some(u), Some(s)) = (ticks(11), ticks(12)) {
                // Linux's USER_HZ is 100 on every architecture certmq is built for.
                let cpu = ConstCounter::new((u + s) as f64 / 100.0);
                cpu.encode(encoder.encode_descriptor(
                    "process_cpu_seconds",
                    "user and system CPU time of the broker process.",
                    None,
                    MetricType::Counter,
                )?)?;
            }
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            let rss = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
            if let Some(kib) = rss {
                gauge(
                    &mut encoder,
                    "process_resident_memory_bytes",
                    "resident memory of the broker process.",
                    kib * 1024,
                )?;
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                &mut encoder,
                "process_open_fds",
                "open file descriptors of the broker process.",
                fds.count() as u64,
            )?;
        }
        let started_at = self.0.load(Ordering::Relaxed);
        if started_at > 0 {
            gauge(
                &mut encoder,
                "process_start_time_seconds",
                "when the broker process started, seconds since the epoch.",
                started_at,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_drop_counters_are_the_labelled_series() {
        let m = Metrics::new();
        m.dropped("queue_full", 3);
        assert_eq!(m.count_drop("queue_full"), 4);
        m.dropped("stalled", 2);
        assert_eq!(m.count_drop("stalled"), 3);
        let text = m.render();
        assert!(text.contains("certmq_messages_dropped_total{reason=\"queue_full\"} 4\n"));
        assert!(text.contains("certmq_messages_dropped_total{reason=\"stalled\"} 3\n"));
        assert!(text.contains("certmq_messages_dropped_total{reason=\"acl\"} 0\n"));
    }

    #[test]
    fn openmetrics_on_request() {
        let m = Metrics::new();
        m.messages_received.inc();
        let om = m.encode(Format::OpenMetrics);
        assert!(om.contains("# TYPE certmq_messages_received counter\n"));
        assert!(om.contains("certmq_messages_received_total 1\n"));
        assert!(om.ends_with("# EOF\n"));
        assert_eq!(
            Format::from_accept(Some("application/openmetrics-text;version=1.0.0")),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept(Some("text/plain")), Format::Prometheus);
    }
}
