//! Process-wide counters (SPEC 10). Plain atomics and one short std mutex for the labelled
//! counters: they are bumped on the connection path, so they must never wait on I/O. The
//! admin endpoint renders them in Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

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

    /// Publishes the anchors of the config in force.
    pub fn set_anchor_expiry(&self, config: &crate::config::Config) {
        let list = config
            .anchors
            .iter()
            .map(|a| (a.name.clone(), a.info.validity.not_after))
            .collect();
        if let Ok(mut a) = self.anchors.lock() {
            *a = list;
        }
    }

    /// Refusal counts so far (tests and the admin endpoint).
    pub fn refusals(&self) -> BTreeMap<&'static str, u64> {
        self.refusals.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
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
