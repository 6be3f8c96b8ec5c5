//! `[log]` (contract §2, 10): JSON lines that every parser reads, one per event, with a peer's
//! values escaped; the level from the file, overridden by `RUST_LOG`; an invalid level is a
//! config problem.

use crate::common::coretests::raw::RawConnect;
use crate::common::coretests::V;
use crate::common::ops::{config, Proc};
use crate::common::run::{arg, certmq};
use crate::common::Fixture;

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_peer_values_escaped() {
    let fx = Fixture::new();
    let path = config(
        &fx,
        &format!(
            "[log]\nformat = \"json\"\nlevel = \"info\"\n\n{}",
            Fixture::fleet_anchor(true)
        ),
    );
    let mut broker = Proc::start(&fx, &path).await;
    // A refused CONNECT whose client id tries to break the line and the object.
    let id = "x\"}\n{\"result\":\"accepted\"";
    let packet = RawConnect::with_will(V::V4, id, "devices/other/will").bytes();
    let dev = fx.client(&fx.device("d1.devices.example.com"));
    assert_eq!(
        dev.raw(broker.mqtt, &packet).await.expect("CONNACK"),
        [0x20, 2, 0, 5]
    );
    broker.wait_line("refused at CONNECT").await;
    broker.signal("TERM");
    assert!(broker.wait_exit(crate::common::WAIT).await.success());
    let mut refusal = None;
    for line in broker.stderr().lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object: {line:?}: {e}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        if v["fields"]["message"] == "refused at CONNECT" {
            refusal = Some(v);
        }
    }
    let refusal = refusal.expect("the refusal line");
    assert_eq!(refusal["fields"]["result"], "refused");
    let client_id = refusal["fields"]["client_id"].as_str().expect("client_id");
    assert!(client_id.contains("x\\\"}\\n{"), "{client_id}");
}

#[tokio::test]
async fn the_level_comes_from_the_file() {
    let fx = Fixture::new();
    // The server and admin announcements only, then warnings and errors.
    let level = "warn,certmq::server=info,certmq::server::admin=info";
    let path = config(
        &fx,
        &format!(
            "[log]\nlevel = \"{level}\"\n\n{}",
            Fixture::fleet_anchor(true)
        ),
    );
    let mut broker = Proc::start(&fx, &path).await;
    let dev = fx.client(&fx.device("d1.devices.example.com"));
    assert_eq!(
        dev.connect_v5(broker.mqtt, "d1").await,
        crate::common::Outcome::Accepted
    );
    let stranger = fx.client(&crate::common::self_signed("stranger"));
    let _ = stranger.connect_v5(broker.mqtt, "s").await;
    broker.wait_line("refused at TLS").await;
    assert!(
        !broker.stderr().contains("accepted at CONNECT"),
        "an info line of certmq::auth was written: {}",
        broker.stderr()
    );
}

/// `RUST_LOG` overrides the file's level.
#[test]
fn rust_log_overrides_the_file() {
    use std::io::BufRead;
    let fx = Fixture::new();
    let path = config(
        &fx,
        &format!("[log]\nlevel = \"off\"\n\n{}", Fixture::fleet_anchor(true)),
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_certmq"))
        .args(["serve", "--config", arg(&path)])
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let announced = loop {
        match rx.recv_timeout(crate::common::WAIT) {
            Ok(line) if line.contains("listening for MQTT over TLS") => break true,
            Ok(_) => continue,
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(announced, "RUST_LOG=info did not override level = \"off\"");
}

#[test]
fn an_invalid_level_is_a_config_problem() {
    let fx = Fixture::new();
    let path = config(
        &fx,
        &format!(
            "[log]\nlevel = \"not a[ level\"\n\n{}",
            Fixture::fleet_anchor(true)
        ),
    );
    let run = certmq(fx.dir.path(), &["check", "--config", arg(&path)]);
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("log.level"), "{}", run.stderr);
}

/// contract §10: `/metrics` has HELP and TYPE lines for every family, before its samples; the
/// expiry gauges, build info and process metrics are there; a fresh start counts as a
/// successful load of the configuration.
#[tokio::test]
async fn metrics_are_complete_and_well_formed() {
    let fx = Fixture::new();
    let crl = fx
        .fleet
        .crl(&[], certmq::pki::Validity::days(-1, 7))
        .expect("CRL");
    fx.write("fleet.crl", &crl);
    let path = config(
        &fx,
        &format!("{}crl = \"fleet.crl\"\n", Fixture::fleet_anchor(true)),
    );
    let broker = Proc::start(&fx, &path).await;
    let (status, body) = broker.get("/metrics").await;
    assert_eq!(status, 200);
    let mut helped = std::collections::HashSet::new();
    let mut typed = std::collections::HashSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().expect("name");
            assert!(rest.len() > name.len() + 1, "empty HELP: {line}");
            helped.insert(name.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().expect("name");
            assert!(helped.contains(name), "TYPE before HELP: {line}");
            typed.insert(name.to_owned());
        } else {
            let name = line.split(['{', ' ']).next().expect("name");
            assert!(typed.contains(name), "a sample without TYPE: {line}");
        }
    }
    for series in [
        "certmq_build_info{version=\"0.1.0\"}",
        "certmq_last_reload_success",
        "certmq_server_certificate_not_after_timestamp_seconds",
        "certmq_anchor_not_after_timestamp_seconds{anchor=\"fleet\"}",
        "certmq_crl_next_update_timestamp_seconds{anchor=\"fleet\"}",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        let v =
            crate::common::ops::metric(&body, series).unwrap_or_else(|| panic!("{series}: {body}"));
        assert!(v > 0.0, "{series} = {v}");
    }
    assert_eq!(
        crate::common::ops::metric(&body, "certmq_last_reload_success"),
        Some(1.0)
    );
    // Counted in 10 ms ticks: a fresh broker may not have used one yet.
    assert!(crate::common::ops::metric(&body, "process_cpu_seconds_total").is_some());
}
