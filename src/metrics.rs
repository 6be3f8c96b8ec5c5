//! Process-wide counters (SPEC 10). Plain atomics and one short std mutex for the labelled
//! counters: they are bumped on the connection path, so they must never wait on I/O. The
//! admin endpoint renders them in Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

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

/// The broker's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Open device connections (TCP accepted and not yet closed).
    pub connections: AtomicI64,
    pub handshakes_ok: AtomicU64,
    pub handshakes_failed: AtomicU64,
    pub devices_provisioned: AtomicU64,
    pub messages_received: AtomicU64,
    pub messages_sent: AtomicU64,
    /// Refusals by reason label (TLS-stage and CONNECT-stage alike). std Mutex: held for a
    /// map update only, never across an await.
    refusals: Mutex<BTreeMap<&'static str, u64>>,
    dropped: Mutex<BTreeMap<&'static str, u64>>,
    dropped_queue_full: AtomicU64,
    dropped_offline_qos0: AtomicU64,
    dropped_acl: AtomicU64,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    /// Seconds since the epoch of the last reload attempt (0 = never).
    last_reload_at: AtomicI64,
    /// 1 if the last reload applied, 0 if it was refused.
    last_reload_ok: AtomicI64,
    /// Each anchor's certificate notAfter, so expiring anchors can be alerted on.
    anchors: Mutex<Vec<(String, i64)>>,
    /// Each anchor's CRL nextUpdate (anchors with a CRL that has one).
    crls: Mutex<Vec<(String, i64)>>,
    /// The server certificate's notAfter (0 until a config is in force).
    server_not_after: AtomicI64,
    /// When this process started, seconds since the epoch.
    started_at: AtomicI64,
    /// Messages a device's sessions could not take since the last flush into the registry
    /// (`devices show`). Per device, not a metric label: devices are unbounded.
    device_drops: Mutex<std::collections::HashMap<String, u64>>,
}

impl Metrics {
    /// Counts a message a session of `device` could not take (SPEC 7).
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
        if let Ok(mut m) = self.refusals.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }

    /// Counts messages dropped for a reason. The reasons a busy broker hits per message
    /// are plain atomics; rarer ones go to the labelled map.
    pub fn dropped(&self, reason: &'static str, n: u64) {
        let hot = match reason {
            "queue_full" => &self.dropped_queue_full,
            "offline_qos0" => &self.dropped_offline_qos0,
            "acl" => &self.dropped_acl,
            _ => {
                if let Ok(mut m) = self.dropped.lock() {
                    *m.entry(reason).or_default() += n;
                }
                return;
            }
        };
        hot.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one message dropped for `reason` and returns the running total (callers log
    /// at powers of two of it: a flood of drops is not a flood of log lines).
    pub fn count_drop(&self, reason: &'static str) -> u64 {
        let hot = match reason {
            "queue_full" => &self.dropped_queue_full,
            "offline_qos0" => &self.dropped_offline_qos0,
            "acl" => &self.dropped_acl,
            _ => {
                return self
                    .dropped
                    .lock()
                    .map(|mut m| {
                        let n = m.entry(reason).or_default();
                        *n += 1;
                        *n
                    })
                    .unwrap_or(0);
            }
        };
        hot.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Records a reload attempt.
    pub fn reloaded(&self, ok: bool) {
        if ok {
            self.reloads_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.reloads_failed.fetch_add(1, Ordering::Relaxed);
        }
        self.last_reload_at
            .store(crate::cert::now_secs(), Ordering::Relaxed);
        self.last_reload_ok.store(i64::from(ok), Ordering::Relaxed);
    }

    /// A successful start counts as a successful load of the config: without it the
    /// usual alert on `certmq_last_reload_success == 0` would fire on every fresh start.
    pub fn started(&self) {
        let now = crate::cert::now_secs();
        self.started_at.store(now, Ordering::Relaxed);
        self.last_reload_at.store(now, Ordering::Relaxed);
        self.last_reload_ok.store(1, Ordering::Relaxed);
    }

    /// Publishes the expiry gauges of the config in force (SPEC 10).
    pub fn set_config_gauges(&self, gauges: ConfigGauges) {
        if let Ok(mut a) = self.anchors.lock() {
            *a = gauges.anchors;
        }
        if let Ok(mut c) = self.crls.lock() {
            *c = gauges.crls;
        }
        self.server_not_after
            .store(gauges.server_not_after, Ordering::Relaxed);
    }

    /// Refusal counts so far (tests and the admin endpoint).
    pub fn refusals(&self) -> BTreeMap<&'static str, u64> {
        self.refusals.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Prometheus text exposition: every metric with its HELP and TYPE lines.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Each family's TYPE line gets its HELP line before it, from one table (`help`).
        for line in self.render_body().lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap_or_default();
                let _ = writeln!(out, "# HELP {name} {}", help(name));
            }
            let _ = writeln!(out, "{line}");
        }
        out
    }

    /// [`Metrics::render`] plus gauges that live elsewhere (name, HELP, value).
    pub fn render_with(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut out = self.render();
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {value}");
        }
        out
    }

    fn render_body(&self) -> String {
        let mut out = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(out, "# TYPE certmq_build_info gauge");
        let _ = writeln!(
            out,
            "certmq_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        let _ = writeln!(
            out,
            "# TYPE certmq_server_certificate_not_after_timestamp_seconds gauge"
        );
        let _ = writeln!(
            out,
            "certmq_server_certificate_not_after_timestamp_seconds {}",
            self.server_not_after.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# TYPE certmq_crl_next_update_timestamp_seconds gauge");
        for (name, next) in self.crls.lock().map(|c| c.clone()).unwrap_or_default() {
            let _ = writeln!(
                out,
                "certmq_crl_next_update_timestamp_seconds{{anchor=\"{name}\"}} {next}"
            );
        }
        process_metrics(&mut out, self.started_at.load(Ordering::Relaxed));
        let _ = writeln!(out, "# TYPE certmq_connections gauge");
        let _ = writeln!(
            out,
            "certmq_connections {}",
            self.connections.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# TYPE certmq_handshakes_total counter");
        let _ = writeln!(
            out,
            "certmq_handshakes_total{{result=\"ok\"}} {}",
            get(&self.handshakes_ok)
        );
        let _ = writeln!(
            out,
            "certmq_handshakes_total{{result=\"failed\"}} {}",
            get(&self.handshakes_failed)
        );
        let _ = writeln!(out, "# TYPE certmq_auth_refusals_total counter");
        for (reason, n) in self.refusals() {
            let _ = writeln!(out, "certmq_auth_refusals_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(out, "# TYPE certmq_devices_provisioned_total counter");
        let _ = writeln!(
            out,
            "certmq_devices_provisioned_total {}",
            get(&self.devices_provisioned)
        );
        let _ = writeln!(out, "# TYPE certmq_messages_received_total counter");
        let _ = writeln!(
            out,
            "certmq_messages_received_total {}",
            get(&self.messages_received)
        );
        let _ = writeln!(out, "# TYPE certmq_messages_sent_total counter");
        let _ = writeln!(
            out,
            "certmq_messages_sent_total {}",
            get(&self.messages_sent)
        );
        let _ = writeln!(out, "# TYPE certmq_reloads_total counter");
        let _ = writeln!(
            out,
            "certmq_reloads_total{{result=\"ok\"}} {}",
            get(&self.reloads_ok)
        );
        let _ = writeln!(
            out,
            "certmq_reloads_total{{result=\"failed\"}} {}",
            get(&self.reloads_failed)
        );
        let _ = writeln!(out, "# TYPE certmq_last_reload_timestamp_seconds gauge");
        let _ = writeln!(
            out,
            "certmq_last_reload_timestamp_seconds {}",
            self.last_reload_at.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# TYPE certmq_last_reload_success gauge");
        let _ = writeln!(
            out,
            "certmq_last_reload_success {}",
            self.last_reload_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE certmq_anchor_not_after_timestamp_seconds gauge"
        );
        let anchors = self.anchors.lock().map(|a| a.clone()).unwrap_or_default();
        for (name, not_after) in anchors {
            let _ = writeln!(
                out,
                "certmq_anchor_not_after_timestamp_seconds{{anchor=\"{name}\"}} {not_after}"
            );
        }
        let _ = writeln!(out, "# TYPE certmq_messages_dropped_total counter");
        let mut dropped = self.dropped.lock().map(|m| m.clone()).unwrap_or_default();
        for (reason, counter) in [
            ("queue_full", &self.dropped_queue_full),
            ("offline_qos0", &self.dropped_offline_qos0),
            ("acl", &self.dropped_acl),
        ] {
            let n = get(counter);
            if n > 0 {
                dropped.insert(reason, n);
            }
        }
        for (reason, n) in dropped {
            let _ = writeln!(
                out,
                "certmq_messages_dropped_total{{reason=\"{reason}\"}} {n}"
            );
        }
        out
    }
}

/// The HELP text of each metric family.
fn help(name: &str) -> &'static str {
    match name {
        "certmq_build_info" => "certmq's version; always 1",
        "certmq_server_certificate_not_after_timestamp_seconds" => {
            "notAfter of the server certificate in force, seconds since the epoch"
        }
        "certmq_crl_next_update_timestamp_seconds" => {
            "nextUpdate of each anchor's CRL, seconds since the epoch"
        }
        "certmq_anchor_not_after_timestamp_seconds" => {
            "notAfter of each trust anchor's certificate, seconds since the epoch"
        }
        "certmq_connections" => "open device connections (TCP accepted, not yet closed)",
        "certmq_handshakes_total" => "TLS handshakes by result",
        "certmq_auth_refusals_total" => "connections refused, at TLS or at CONNECT, by reason",
        "certmq_devices_provisioned_total" => "devices created on their first connection",
        "certmq_messages_received_total" => "PUBLISH packets accepted from clients",
        "certmq_messages_sent_total" => "PUBLISH packets sent to clients",
        "certmq_messages_dropped_total" => {
            "messages a session could not take or may not receive, by reason"
        }
        "certmq_reloads_total" => "configuration reloads by result",
        "certmq_last_reload_timestamp_seconds" => {
            "when the configuration was last loaded (start or reload), seconds since the epoch"
        }
        "certmq_last_reload_success" => {
            "1 when the last load of the configuration (start or reload) applied, else 0"
        }
        "process_cpu_seconds_total" => "user and system CPU time of the broker process",
        "process_resident_memory_bytes" => "resident memory of the broker process",
        "process_open_fds" => "open file descriptors of the broker process",
        "process_start_time_seconds" => "when the broker process started, seconds since the epoch",
        _ => "certmq metric",
    }
}

/// The standard process metrics, read from /proc (Linux); a family whose source cannot be
/// read is left out.
fn process_metrics(out: &mut String, started_at: i64) {
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // After the command name in parentheses: field 14 utime, 15 stime (clock ticks).
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        if let (Some(u), Some(s)) = (ticks(11), ticks(12)) {
            // Linux's USER_HZ is 100 on every architecture certmq is built for.
            let _ = writeln!(out, "# TYPE process_cpu_seconds_total counter");
            let _ = writeln!(out, "process_cpu_seconds_total {}", (u + s) as f64 / 100.0);
        }
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
        if let Some(kib) = rss {
            let _ = writeln!(out, "# TYPE process_resident_memory_bytes gauge");
            let _ = writeln!(out, "process_resident_memory_bytes {}", kib * 1024);
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let _ = writeln!(out, "# TYPE process_open_fds gauge");
        let _ = writeln!(out, "process_open_fds {}", fds.count());
    }
    if started_at > 0 {
        let _ = writeln!(out, "# TYPE process_start_time_seconds gauge");
        let _ = writeln!(out, "process_start_time_seconds {started_at}");
    }
}
