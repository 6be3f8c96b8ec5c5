//! Results: named figures, percentiles, the summary table, JSON lines, progress lines.
//!
//! Why figures are named with a unit suffix (`connects_per_s`, `p99_ms`): `compare.sh`
//! joins the results of two brokers by name and divides them, so a name must say what is
//! compared and in which unit, and must be the same for every broker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// One named number of a result.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    pub name: String,
    pub value: f64,
}

/// The result of one workload against one broker.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub workload: String,
    pub broker: String,
    pub figures: Vec<Figure>,
}

impl Report {
    pub fn new(workload: &str, broker: &str) -> Report {
        Report {
            workload: workload.to_owned(),
            broker: broker.to_owned(),
            figures: Vec::new(),
        }
    }

    pub fn push(&mut self, name: &str, value: f64) {
        self.figures.push(Figure {
            name: name.to_owned(),
            value,
        });
    }

    /// The broker's CPU over a connect workload (`before`/`after` from procfs, when
    /// `--pid` was given), in all and per successful connect.
    pub fn push_connect_cpu(
        &mut self,
        before: Option<super::procfs::CpuSeconds>,
        after: Option<super::procfs::CpuSeconds>,
        ok: usize,
    ) {
        if let (Some(before), Some(after)) = (before, after) {
            self.push("server_cpu_s", after.0 - before.0);
            self.push(
                "server_cpu_ms_per_connect",
                (after.0 - before.0) * 1000.0 / ok.max(1) as f64,
            );
        }
    }

    /// One JSON object: `{"workload":..,"broker":..,"figures":{name: value, ..}}`.
    pub fn json(&self) -> String {
        let figures: serde_json::Map<String, serde_json::Value> = self
            .figures
            .iter()
            .map(|f| (f.name.clone(), json_number(f.value)))
            .collect();
        serde_json::json!({
            "workload": self.workload,
            "broker": self.broker,
            "figures": figures,
        })
        .to_string()
    }

    /// A human-readable table, one figure a line.
    pub fn table(&self) -> String {
        let width = self
            .figures
            .iter()
            .map(|f| f.name.len())
            .max()
            .unwrap_or(0)
            .max("figure".len());
        let mut out = format!("{} against {}\n", self.workload, self.broker);
        out.push_str(&format!("  {:<width$}  value\n", "figure"));
        for f in &self.figures {
            out.push_str(&format!(
                "  {:<width$}  {}\n",
                f.name,
                format_value(f.value)
            ));
        }
        out
    }
}

/// NaN and infinities are not JSON numbers: they become null.
fn json_number(v: f64) -> serde_json::Value {
    serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

fn format_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Latency samples in nanoseconds, sorted once for every percentile.
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    samples: Vec<u64>,
    sorted: bool,
}

impl Latencies {
    pub fn new() -> Latencies {
        Latencies::default()
    }

    pub fn push(&mut self, ns: u64) {
        self.samples.push(ns);
        self.sorted = false;
    }

    pub fn extend(&mut self, other: Latencies) {
        self.samples.extend(other.samples);
        self.sorted = false;
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Nearest-rank percentile (`p` in 0..=100) in milliseconds; NaN without samples.
    pub fn percentile_ms(&mut self, p: f64) -> f64 {
        if self.samples.is_empty() {
            return f64::NAN;
        }
        if !self.sorted {
            self.samples.sort_unstable();
            self.sorted = true;
        }
        let n = self.samples.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        self.samples[rank.clamp(1, n) - 1] as f64 / 1e6
    }

    /// Adds `<prefix>p50_ms`, `<prefix>p99_ms` and `<prefix>max_ms` to `report`.
    pub fn report(&mut self, report: &mut Report, prefix: &str) {
        for (p, name) in [(50.0, "p50_ms"), (99.0, "p99_ms"), (100.0, "max_ms")] {
            let v = self.percentile_ms(p);
            report.push(&format!("{prefix}{name}"), v);
        }
    }
}

/// A progress line on stderr (stdout is kept for results).
pub fn progress(line: &str) {
    eprintln!("[load] {line}");
}

/// Prints `label: done/total` every second until dropped.
pub struct Ticker {
    stop: CancellationToken,
}

impl Ticker {
    pub fn start(label: String, done: Arc<AtomicU64>, total: Option<u64>) -> Ticker {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let start = Instant::now();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {
                        let n = done.load(Ordering::Relaxed);
                        let of = total.map(|t| format!("/{t}")).unwrap_or_default();
                        progress(&format!(
                            "{label}: {n}{of} after {:.1} s",
                            start.elapsed().as_secs_f64()
                        ));
                    }
                }
            }
        });
        Ticker { stop }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
