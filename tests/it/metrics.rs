//! `/metrics` (docs/metrics.md) from a real broker process over real HTTP: the exposition
//! is well formed line by line (a strict parser of the Prometheus text format below, and
//! `promtool check metrics` where it is installed), every series users' alerts know is
//! still there under its exact name, the byte counters and connections per anchor move
//! with real traffic, OpenMetrics is served on request, and every metric the Grafana
//! dashboard in contrib/ queries exists.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::common::crl_server::{Answer, CrlServer};
use crate::common::ops::{config, http_get, metric, open_v5, pinned, Proc};
use crate::common::{self_signed, Fixture};
use certmq::pki::Validity;

/// One sample of the exposition.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text format 0.0.4 strictly: every line is a HELP, a TYPE, a
/// comment or a sample; names, label syntax and escapes, values as the format defines
/// them; each family has exactly one HELP (not empty) and one TYPE before its samples, and
/// its samples are together; counters' samples end in `_total`; no series twice.
fn parse_exposition(body: &str) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    let mut help: HashMap<String, String> = HashMap::new();
    let mut types: HashMap<String, String> = HashMap::new();
    let mut finished: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut series = BTreeSet::new();
    if !body.ends_with('\n') {
        return Err("the body does not end with a newline".into());
    }
    for (i, line) in body.lines().enumerate() {
        let at = |why: &str| format!("line {}: {why}: {line:?}", i + 1);
        if line.is_empty() {
            return Err(at("empty line"));
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let keyword = parts.next().unwrap_or_default();
            if keyword != "HELP" && keyword != "TYPE" {
                continue;
            }
            let name = parts.next().ok_or_else(|| at("no metric name"))?;
            let text = parts.next().ok_or_else(|| at("nothing after the name"))?;
            if !valid_name(name) {
                return Err(at("invalid metric name"));
            }
            if finished.contains(name) {
                return Err(at("family continued after another one"));
            }
            if current.as_deref() != Some(name) {
                if let Some(c) = current.take() {
                    finished.insert(c);
                }
                current = Some(name.to_owned());
            }
            if keyword == "HELP" {
                if text.trim().is_empty() {
                    return Err(at("empty HELP"));
                }
                if help.insert(name.to_owned(), text.to_owned()).is_some() {
                    return Err(at("second HELP"));
                }
            } else {
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&text) {
                    return Err(at("unknown TYPE"));
                }
                if types.insert(name.to_owned(), text.to_owned()).is_some() {
                    return Err(at("second TYPE"));
                }
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let sample = parse_sample(line).map_err(|e| at(&e))?;
        let family = current
            .clone()
            .ok_or_else(|| at("sample before any TYPE"))?;
        if sample.name != family {
            return Err(at(&format!("sample outside its family {family:?}")));
        }
        let kind = types
            .get(&family)
            .ok_or_else(|| at("sample without TYPE"))?;
        if !help.contains_key(&family) {
            return Err(at("sample without HELP"));
        }
        if kind == "counter" && !family.ends_with("_total") {
            return Err(at("counter without _total"));
        }
        if !series.insert(format!("{}{:?}", sample.name, sample.labels)) {
            return Err(at("series exposed twice"));
        }
        samples.push(sample);
    }
    Ok(samples)
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value after the name")?;
    let name = &line[..name_end];
    if !valid_name(name) {
        return Err("invalid metric name".into());
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(b) = rest.strip_prefix('{') {
        let mut i = 0;
        loop {
            if b[i..].starts_with('}') {
                rest = &b[i + 1..];
                break;
            }
            let eq = b[i..].find('=').ok_or("label without =")? + i;
            let key = &b[i..eq];
            if !valid_name(key) || key.contains(':') {
                return Err(format!("invalid label name {key:?}"));
            }
            if !b[eq + 1..].starts_with('"') {
                return Err("label value not quoted".into());
            }
            let mut j = eq + 2;
            let mut value = String::new();
            loop {
                let c = b[j..].chars().next().ok_or("unterminated label value")?;
                j += c.len_utf8();
                match c {
                    '"' => break,
                    '\\' => {
                        let e = b[j..].chars().next().ok_or("unterminated escape")?;
                        j += e.len_utf8();
                        value.push(match e {
                            '\\' => '\\',
                            '"' => '"',
                            'n' => '\n',
                            _ => return Err("invalid escape in a label value".into()),
                        });
                    }
                    '\n' => return Err("newline in a label value".into()),
                    c => value.push(c),
                }
            }
            if labels.insert(key.to_owned(), value).is_some() {
                return Err(format!("label {key:?} twice"));
            }
            if b[j..].starts_with(',') {
                i = j + 1;
            } else if b[j..].starts_with('}') {
                rest = &b[j + 1..];
                break;
            } else {
                return Err("expected , or } after a label".into());
            }
        }
    }
    let mut fields = rest
        .strip_prefix(' ')
        .ok_or("no space before the value")?
        .split(' ');
    let value = fields.next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v
            .parse::<f64>()
            .map_err(|_| format!("invalid value {v:?}"))?,
    };
    if let Some(ts) = fields.next() {
        ts.parse::<i64>().map_err(|_| "invalid timestamp")?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The parser refuses what the format forbids: a test of the test, so that a malformed
/// exposition cannot pass unnoticed.
#[test]
fn the_exposition_parser_refuses_malformed_lines() {
    let good = "# HELP a_total A thing.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\\\\\"} 3\n# HELP g G.\n# TYPE g gauge\ng 1.5\n";
    let parsed = parse_exposition(good).expect("well formed");
    assert_eq!(parsed[0].labels["y"], "q\"\\");
    assert_eq!(parsed[1].value, 1.5);
    for bad in [
        "g 1\n",                                                                // no TYPE
        "# TYPE g gauge\ng 1\n",                                                // no HELP
        "# HELP g \n# TYPE g gauge\ng 1\n",                                     // empty HELP
        "# HELP g G.\n# TYPE g gauge\ng one\n",                                 // value
        "# HELP g G.\n# TYPE g gauge\ng{x=1} 1\n",                              // unquoted label
        "# HELP g G.\n# TYPE g gauge\ng{x=\"\\t\"} 1\n",                        // bad escape
        "# HELP g G.\n# TYPE g gauge\ng{x=\"1\" 1\n",                           // unterminated
        "# HELP g G.\n# TYPE g gauge\ng 1\ng 2\n",                              // twice
        "# HELP c C.\n# TYPE c counter\nc 1\n",                                 // counter name
        "# HELP g G.\n# TYPE g gauge\n# HELP h H.\n# TYPE h gauge\nh 1\ng 1\n", // interleaved
        "# HELP g G.\n# TYPE g gaug\ng 1\n",                                    // type
        "# HELP 1g G.\n# TYPE 1g gauge\n1g 1\n",                                // name
        "# HELP g G.\n# TYPE g gauge\ng 1",                                     // no final newline
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted: {bad:?}");
    }
}

/// Every series `/metrics` had before it moved to prometheus-client, by exact name and
/// labels (users' alerts and dashboards query them).
const SERIES_KEPT: &[&str] = &[
    "certmq_build_info{version=\"0.1.0\"}",
    "certmq_server_certificate_not_after_timestamp_seconds",
    "certmq_crl_next_update_timestamp_seconds{anchor=\"fleet\"}",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_start_time_seconds",
    "certmq_connections",
    "certmq_handshakes_total{result=\"ok\"}",
    "certmq_handshakes_total{result=\"failed\"}",
    "certmq_auth_refusals_total{reason=\"unknown_issuer\"}",
    "certmq_devices_provisioned_total",
    "certmq_messages_received_total",
    "certmq_messages_sent_total",
    "certmq_reloads_total{result=\"ok\"}",
    "certmq_reloads_total{result=\"failed\"}",
    "certmq_last_reload_timestamp_seconds",
    "certmq_last_reload_success",
    "certmq_anchor_not_after_timestamp_seconds{anchor=\"fleet\"}",
    "certmq_messages_dropped_total{reason=\"acl\"}",
    "certmq_sessions",
];

/// A broker with the fleet anchor (CRL file and crl_url), a pinned device, and traffic:
/// an accepted device, a refused stranger, a published message and a denied one.
struct Scene {
    fx: Fixture,
    broker: Proc,
    _crl: CrlServer,
}

async fn scene() -> Scene {
    let fx = Fixture::new();
    let crl = fx.fleet.crl(&[], Validity::days(-1, 7)).expect("CRL");
    fx.write("fleet.crl", &crl);
    let server = CrlServer::start(Answer::Body(crl.into_bytes())).await;
    let meter = self_signed("meter-7");
    fx.write("meter-7.pem", &meter.cert_pem);
    let path = config(
        &fx,
        &format!(
            "{}crl = \"fleet.crl\"\ncrl_url = \"{}\"\n\n{}",
            Fixture::fleet_anchor(true),
            server.url(),
            pinned("meter-7", "meter-7.pem", "device")
        ),
    );
    let broker = Proc::start(&fx, &path).await;
    Scene {
        fx,
        broker,
        _crl: server,
    }
}

#[tokio::test]
async fn the_exposition_is_well_formed_and_keeps_every_series() {
    let Scene { fx, broker, _crl } = scene().await;
    let dev = fx.client(&fx.device("d1.devices.example.com"));
    let mut tls = open_v5(&dev, broker.mqtt, "d1").await;
    use crate::common::coretests::{raw::raw_publish, V};
    tls.send(&raw_publish(V::V5, "devices/d1/x", b"hello", 0, 0, false))
        .await;
    tls.send(&raw_publish(
        V::V5,
        "devices/other/x",
        b"denied",
        0,
        0,
        false,
    ))
    .await;
    tls.ping().await;
    let stranger = fx.client(&self_signed("stranger"));
    let _ = stranger.connect_v5(broker.mqtt, "s").await;
    broker
        .wait_metric("certmq_auth_refusals_total{reason=\"unknown_issuer\"}", 1.0)
        .await;
    broker
        .wait_metric("certmq_messages_dropped_total{reason=\"acl\"}", 1.0)
        .await;
    let (status, body) = broker.get("/metrics").await;
    assert_eq!(status, 200);
    let samples = parse_exposition(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    for series in SERIES_KEPT {
        assert!(metric(&body, series).is_some(), "{series} missing:\n{body}");
    }
    // The received counter counts the accepted message only; bytes moved both ways.
    assert_eq!(metric(&body, "certmq_messages_received_total"), Some(1.0));
    for bytes in ["certmq_received_bytes_total", "certmq_sent_bytes_total"] {
        assert!(
            metric(&body, bytes).unwrap_or(0.0) > 1000.0,
            "{bytes}: {body}"
        );
    }
    assert!(samples.iter().all(|s| s.value.is_finite()), "{body}");
    // `promtool check metrics` (the Prometheus project's own linter) where installed.
    if let Some(out) = promtool(&body) {
        assert!(out.status.success(), "promtool: {out:?}\n{body}");
    }
}

/// Runs `promtool check metrics` on `body`; None when promtool is not installed.
fn promtool(body: &str) -> Option<std::process::Output> {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write to promtool");
    Some(child.wait_with_output().expect("promtool output"))
}

#[tokio::test]
async fn connections_are_counted_per_anchor_and_for_pinned_devices() {
    let Scene { fx, broker, _crl } = scene().await;
    let zero = "certmq_anchor_connections{anchor=\"fleet\"}";
    assert_eq!(broker.metric(zero).await, Some(0.0));
    let d1 = open_v5(
        &fx.client(&fx.device("d1.devices.example.com")),
        broker.mqtt,
        "a",
    )
    .await;
    let d2 = open_v5(
        &fx.client(&fx.device("d2.devices.example.com")),
        broker.mqtt,
        "b",
    )
    .await;
    let meter = self_signed("meter-7");
    // The pinned certificate written by `scene` is a different key pair: re-pin this one.
    fx.write("meter-7.pem", &meter.cert_pem);
    let mut broker = broker;
    broker.reload().await.expect("reloaded");
    let m = open_v5(
        &crate::common::Client::new(&fx, &meter.cert_pem, &meter.key_pem),
        broker.mqtt,
        "m",
    )
    .await;
    broker.wait_metric(zero, 2.0).await;
    broker.wait_metric("certmq_pinned_connections", 1.0).await;
    drop(d1);
    broker.wait_metric(zero, 1.0).await;
    drop((d2, m));
    broker.wait_metric(zero, 0.0).await;
    broker.wait_metric("certmq_pinned_connections", 0.0).await;
}

#[tokio::test]
async fn openmetrics_is_served_when_asked_for() {
    let Scene { broker, _crl, .. } = scene().await;
    let mut tcp = tokio::net::TcpStream::connect(broker.admin)
        .await
        .expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("head");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert!(
        body.contains("# TYPE certmq_messages_received counter\n"),
        "{body}"
    );
    assert!(
        body.contains("certmq_messages_received_total 0\n"),
        "{body}"
    );
    // Without an Accept header: the Prometheus text format.
    let (_, plain) = http_get(broker.admin, "/metrics").await;
    assert!(!plain.contains("# EOF"), "{plain}");
}

/// Every metric the Grafana dashboard in contrib/ queries exists in `/metrics`.
#[tokio::test]
async fn the_grafana_dashboard_queries_only_metrics_that_exist() {
    let Scene { fx, broker, _crl } = scene().await;
    // A refusal, so that the refusal family has a series.
    let _ = fx
        .client(&self_signed("stranger"))
        .connect_v5(broker.mqtt, "s")
        .await;
    broker
        .wait_metric("certmq_auth_refusals_total{reason=\"unknown_issuer\"}", 1.0)
        .await;
    let (_, body) = broker.get("/metrics").await;
    let exposed: BTreeSet<String> = parse_exposition(&body)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|s| s.name)
        .collect();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/grafana-dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut queried = BTreeSet::new();
    for e in &exprs {
        for name in metric_names(e) {
            queried.insert(name);
        }
    }
    let missing: Vec<_> = queried.difference(&exposed).collect();
    assert!(missing.is_empty(), "queried but not exposed: {missing:?}");
    // The dashboard covers what an operator watches.
    for needed in [
        "certmq_connections",
        "certmq_auth_refusals_total",
        "certmq_messages_received_total",
        "certmq_messages_sent_total",
        "certmq_messages_dropped_total",
        "certmq_received_bytes_total",
        "certmq_sent_bytes_total",
        "certmq_last_reload_success",
        "certmq_server_certificate_not_after_timestamp_seconds",
        "certmq_anchor_not_after_timestamp_seconds",
        "certmq_crl_next_update_timestamp_seconds",
        "certmq_anchor_connections",
    ] {
        assert!(
            queried.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
}

/// Every `expr` in a dashboard, at any depth.
fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The metric names in a PromQL expression: identifiers of certmq's and the process
/// families (function names, label names and variables are not).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            if word.starts_with("certmq_") || word.starts_with("process_") {
                names.push(std::mem::take(&mut word));
            }
            word.clear();
        }
    }
    names
}
