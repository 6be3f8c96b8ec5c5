//! contract §1 black-box, the commands that read or change the device registry: `explain`,
//! `devices ...`, and `check` against a registry that holds a pinned name for an anchor.
//! Registries are filled the way they are in production: a real broker (in this process,
//! on 127.0.0.1:0) provisions devices from real TLS connections, and is stopped before the
//! binary runs, so every outcome here is the binary's alone.

use std::collections::BTreeSet;

use crate::common::run::{arg, certmq, Run};
use crate::common::{self_signed, Broker, Fixture, Outcome};
use certmq::cert::Fingerprint;
use certmq::pki::{Ca, Issued, LeafSpec, Validity};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// `certmq ARGS --config <fixture>/certmq.toml`.
fn run(fx: &Fixture, args: &[&str]) -> Run {
    let config = fx.path("certmq.toml");
    let mut all = args.to_vec();
    all.extend(["--config", arg(&config)]);
    certmq(fx.dir.path(), &all)
}

/// Runs a `--json` command that must exit `code`, and parses its stdout.
#[track_caller]
fn json(fx: &Fixture, args: &[&str], code: i32) -> Value {
    let r = run(fx, args);
    assert_eq!(r.code, Some(code), "{r:#?}");
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {r:#?}"))
}

/// Connects each device once through a broker on the fleet anchor (create_devices = true),
/// then stops the broker, which flushes `last_seen_at`.
async fn provision(fx: &Fixture, devices: &[&Issued]) {
    let broker = Broker::start(&fx.path("certmq.toml")).await;
    for dev in devices {
        assert_eq!(
            fx.client(dev).connect_v4(broker.addr, "c", true).await,
            Outcome::Accepted
        );
    }
    broker.stop().await;
}

/// Writes `dev`'s chain (leaf, then the fleet intermediate) and returns the file name.
fn chain_file(fx: &Fixture, name: &str, dev: &Issued) -> String {
    fx.write(name, &dev.chain_pem(&[&fx.fleet]));
    arg(&fx.path(name)).to_owned()
}

#[track_caller]
fn rfc3339(v: &Value) -> OffsetDateTime {
    let s = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    OffsetDateTime::parse(s, &Rfc3339).unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}"))
}

/// Asserts the contract §1 device object: exactly these fields, each of its type.
#[track_caller]
fn assert_device(v: &Value, name: &str, source: &str, cert_der: &[u8], enabled: bool) {
    let keys: BTreeSet<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    let expected = [
        "name",
        "source",
        "fingerprint",
        "enabled",
        // Beyond the contract's list: connected to the running broker (null: none runs).
        "online",
        "not_after",
        "created_at",
        "last_seen_at",
        // Beyond contract §1's list: what the device's sessions could not take (contract §7).
        "dropped_messages",
    ];
    assert_eq!(keys, expected.into_iter().collect(), "{v}");
    assert_eq!(v["name"], name);
    assert_eq!(v["source"], source);
    let fingerprint = v["fingerprint"].as_str().expect("fingerprint string");
    assert_eq!(fingerprint.len(), 64, "{v}");
    assert!(fingerprint
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    assert_eq!(fingerprint, Fingerprint::of(cert_der).to_hex());
    assert_eq!(v["enabled"], enabled);
    let now = OffsetDateTime::now_utc();
    // LeafSpec::device is valid for 365 days from yesterday.
    let days_left = (rfc3339(&v["not_after"]) - now).whole_days();
    assert!((363..=365).contains(&days_left), "{v}");
    assert!(rfc3339(&v["created_at"]) <= now, "{v}");
    if !v["last_seen_at"].is_null() {
        assert!(rfc3339(&v["last_seen_at"]) <= now, "{v}");
    }
}

/// Asserts exit 1 and a single stderr line that names the device.
#[track_caller]
fn assert_unknown_device(r: &Run, name: &str) {
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert_eq!(r.stderr.trim_end().lines().count(), 1, "{r:#?}");
    assert!(r.stderr.contains(&format!("{name:?}")), "{r:#?}");
    assert!(r.stdout.is_empty(), "{r:#?}");
}

// ---------------------------------------------------------------- check vs the registry

#[tokio::test]
async fn check_refuses_a_pinned_name_the_registry_holds_for_an_anchor() {
    let fx = Fixture::new();
    fx.config(&Fixture::fleet_anchor(true));
    provision(&fx, &[&fx.device("dev-001.devices.example.com")]).await;
    fx.write("pinned.pem", &self_signed("dev-001").cert_pem);
    fx.config(&format!(
        "{}\n[[device]]\nname = \"dev-001\"\ncertificate = \"pinned.pem\"\n",
        Fixture::fleet_anchor(true)
    ));

    let refused = run(&fx, &["check"]);
    assert_eq!(refused.code, Some(1), "{refused:#?}");
    let line = refused
        .stderr
        .lines()
        .find(|l| l.contains("device \"dev-001\""))
        .unwrap_or_else(|| panic!("device not named: {refused:#?}"));
    assert!(line.contains(arg(&fx.path("certmq.toml"))), "{line}");
    assert!(
        line.contains("the registry holds this device for anchor \"fleet\"; delete that device first (certmq devices delete dev-001)"),
        "{line}"
    );
    assert!(refused.stdout.is_empty(), "{refused:#?}");

    let deleted = run(&fx, &["devices", "delete", "dev-001"]);
    assert_eq!(deleted.code, Some(0), "{deleted:#?}");
    assert_eq!(deleted.stdout, "device dev-001 deleted\n");
    let ok = run(&fx, &["check"]);
    assert_eq!(ok.code, Some(0), "{ok:#?}");
    assert!(ok.stdout.contains("pinned devices: 1"), "{ok:#?}");
}

// ---------------------------------------------------------------- explain

#[test]
fn explain_accepts_a_chain_under_the_anchor() {
    let fx = Fixture::new();
    fx.config(&Fixture::fleet_anchor(true));
    let dev = fx.device("dev-001.devices.example.com");
    let cert = chain_file(&fx, "dev.pem", &dev);
    let v = json(&fx, &["explain", "--cert", &cert, "--json"], 0);
    assert_eq!(v["decision"], "accept", "{v}");
    assert_eq!(v["device"], "dev-001", "{v}");
    assert_eq!(v["rule"], "anchor:fleet", "{v}");
    let reason = v["reason"].as_str().expect("reason string");
    assert!(reason.contains("provisioned"), "{v}");
}

#[test]
fn explain_prints_numbered_steps() {
    let fx = Fixture::new();
    fx.config(&Fixture::fleet_anchor(true));
    let dev = fx.device("dev-001.devices.example.com");
    let cert = chain_file(&fx, "dev.pem", &dev);
    let r = run(&fx, &["explain", "--cert", &cert]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    let fingerprint = Fingerprint::of(&dev.cert_der).to_hex();
    let expected_starts = [
        "1. certificate: subject CN=dev-001.devices.example.com, issuer CN=Test Fleet CA, fingerprint ",
        "2. pinned: no [[device]] has this fingerprint",
        "3. anchor fleet: valid path with 0 intermediate(s)",
        "   chosen: anchor fleet",
        "5. common name: \"dev-001.devices.example.com\"",
        "6. device name: \"dev-001\"",
        "7. registry: unknown device: would be created",
        "decision: accept as device \"dev-001\" by anchor:fleet",
    ];
    assert_eq!(lines.len(), expected_starts.len(), "{r:#?}");
    for (line, start) in lines.iter().zip(expected_starts) {
        assert!(
            line.starts_with(start),
            "{line:?} should start with {start:?}"
        );
    }
    assert!(lines[0].contains(&fingerprint), "{r:#?}");
}

#[test]
fn explain_rejects_an_unknown_issuer_with_no_rule() {
    let fx = Fixture::new();
    fx.config(&Fixture::fleet_anchor(true));
    let other = Ca::root("Other Root", Validity::days(-1, 365)).unwrap();
    let dev = other
        .issue(&LeafSpec::device("dev-001.devices.example.com"))
        .unwrap();
    fx.write("dev.pem", &dev.cert_pem);
    let cert = arg(&fx.path("dev.pem")).to_owned();
    let v = json(&fx, &["explain", "--cert", &cert, "--json"], 1);
    assert_eq!(v["decision"], "reject", "{v}");
    assert_eq!(v["rule"], Value::Null, "{v}");
    assert_eq!(v["device"], Value::Null, "{v}");
    assert!(
        v["reason"].as_str().unwrap().contains("unknown issuer"),
        "{v}"
    );

    let text = run(&fx, &["explain", "--cert", &cert]);
    assert_eq!(text.code, Some(1), "{text:#?}");
    assert!(
        text.stdout.contains("3. anchor fleet: skipped"),
        "{text:#?}"
    );
    assert!(
        text.stdout.contains("decision: reject (unknown_issuer)"),
        "{text:#?}"
    );
}

#[test]
fn explain_rejects_a_regex_miss_under_the_anchor() {
    let fx = Fixture::new();
    fx.config(&Fixture::fleet_anchor(true));
    let dev = fx.device("dev-001.elsewhere.example.org");
    let cert = chain_file(&fx, "dev.pem", &dev);
    let v = json(&fx, &["explain", "--cert", &cert, "--json"], 1);
    assert_eq!(v["decision"], "reject", "{v}");
    assert_eq!(v["rule"], "anchor:fleet", "{v}");
    assert_eq!(v["device"], Value::Null, "{v}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("cn_regex does not match common name \"dev-001.elsewhere.example.org\""),
        "{v}"
    );
}

#[test]
fn explain_names_the_certificate_file_it_cannot_read() {
    let fx = Fixture::new();
    fx.config(&Fixture::fleet_anchor(true));
    let missing = fx.path("nowhere.pem");
    let r = run(&fx, &["explain", "--cert", arg(&missing), "--json"]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(r.stderr.contains(arg(&missing)), "{r:#?}");
    assert!(r.stdout.is_empty(), "{r:#?}");
}

#[test]
fn explain_changes_nothing_before_the_first_start() {
    let fx = Fixture::new();
    fx.config(&Fixture::fleet_anchor(true));
    let dev = fx.device("dev-new.devices.example.com");
    let cert = chain_file(&fx, "dev.pem", &dev);
    let v = json(&fx, &["explain", "--cert", &cert, "--json"], 0);
    assert_eq!(v["device"], "dev-new", "{v}");
    assert!(
        !fx.data_dir().exists(),
        "explain created {:?}",
        fx.data_dir()
    );
    assert_eq!(
        json(&fx, &["devices", "list", "--json"], 0),
        Value::Array(vec![])
    );
}

#[tokio::test]
async fn explain_reads_the_registry_and_changes_nothing_in_it() {
    let fx = Fixture::new();
    fx.config(&Fixture::fleet_anchor(true));
    let known = fx.device("dev-001.devices.example.com");
    provision(&fx, &[&known]).await;
    let before = json(&fx, &["devices", "list", "--json"], 0);

    // An unknown device under a creating anchor: accepted, yet not created.
    let new = fx.device("dev-002.devices.example.com");
    let cert = chain_file(&fx, "new.pem", &new);
    let v = json(&fx, &["explain", "--cert", &cert, "--json"], 0);
    assert_eq!(v["device"], "dev-002", "{v}");
    assert_eq!(json(&fx, &["devices", "list", "--json"], 0), before);

    // A known device, disabled: refused at the registry, with the device named.
    let cert = chain_file(&fx, "known.pem", &known);
    let v = json(&fx, &["explain", "--cert", &cert, "--json"], 0);
    assert!(v["reason"].as_str().unwrap().contains("known"), "{v}");
    assert_eq!(run(&fx, &["devices", "disable", "dev-001"]).code, Some(0));
    let v = json(&fx, &["explain", "--cert", &cert, "--json"], 1);
    assert_eq!(v["decision"], "reject", "{v}");
    assert_eq!(v["device"], "dev-001", "{v}");
    assert_eq!(v["rule"], "anchor:fleet", "{v}");
    assert_eq!(v["reason"], "device \"dev-001\": device is disabled", "{v}");
}

// ---------------------------------------------------------------- devices

#[tokio::test]
async fn devices_list_show_disable_enable_delete() {
    let fx = Fixture::new();
    let meter = self_signed("meter-7");
    fx.write("meter-7.pem", &meter.cert_pem);
    fx.config(&format!(
        "{}\n[[device]]\nname = \"meter-7\"\ncertificate = \"meter-7.pem\"\n",
        Fixture::fleet_anchor(true)
    ));
    let one = fx.device("dev-001.devices.example.com");
    let two = fx.device("dev-002.devices.example.com");
    provision(&fx, &[&one, &two]).await;

    let list = json(&fx, &["devices", "list", "--json"], 0);
    let rows = list.as_array().expect("array");
    assert_eq!(rows.len(), 3, "{list}");
    assert_device(&rows[0], "dev-001", "fleet", &one.cert_der, true);
    assert_device(&rows[1], "dev-002", "fleet", &two.cert_der, true);
    assert_device(&rows[2], "meter-7", "pinned", &meter.cert_der, true);
    // Provisioned devices connected; the pinned one never did.
    rfc3339(&rows[0]["last_seen_at"]);
    rfc3339(&rows[1]["last_seen_at"]);
    assert_eq!(rows[2]["last_seen_at"], Value::Null, "{list}");

    let text = run(&fx, &["devices", "list"]);
    assert_eq!(text.code, Some(0), "{text:#?}");
    let lines: Vec<&str> = text.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{text:#?}");
    assert!(lines[0].starts_with("NAME"), "{text:#?}");
    assert!(lines[1].starts_with("dev-001 ") && lines[1].contains("enabled"));
    assert!(lines[1].contains(&Fingerprint::of(&one.cert_der).to_hex()));
    assert!(lines[3].starts_with("meter-7 ") && lines[3].contains("never"));

    let show = json(&fx, &["devices", "show", "dev-002", "--json"], 0);
    assert_eq!(show, rows[1]);
    let show = run(&fx, &["devices", "show", "dev-002"]);
    assert_eq!(show.code, Some(0), "{show:#?}");
    assert_eq!(show.stdout.lines().nth(1), Some(lines[2]), "{show:#?}");

    let r = run(&fx, &["devices", "disable", "dev-001"]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (Some(0), "device dev-001 disabled\n")
    );
    let v = json(&fx, &["devices", "show", "dev-001", "--json"], 0);
    assert_device(&v, "dev-001", "fleet", &one.cert_der, false);
    let text = run(&fx, &["devices", "show", "dev-001"]).stdout;
    assert!(text.contains("DISABLED"), "{text}");

    let r = run(&fx, &["devices", "enable", "dev-001"]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (Some(0), "device dev-001 enabled\n")
    );
    let v = json(&fx, &["devices", "show", "dev-001", "--json"], 0);
    assert_device(&v, "dev-001", "fleet", &one.cert_der, true);

    let r = run(&fx, &["devices", "delete", "dev-001"]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (Some(0), "device dev-001 deleted\n")
    );
    let names: Vec<Value> = json(&fx, &["devices", "list", "--json"], 0)
        .as_array()
        .expect("array")
        .iter()
        .map(|d| d["name"].clone())
        .collect();
    assert_eq!(names, ["dev-002", "meter-7"]);
    assert_unknown_device(&run(&fx, &["devices", "show", "dev-001"]), "dev-001");
}

#[test]
fn devices_commands_refuse_an_unknown_name() {
    let fx = Fixture::new();
    fx.config(&Fixture::fleet_anchor(true));
    for args in [
        &["devices", "show", "nobody"][..],
        &["devices", "show", "nobody", "--json"][..],
        &["devices", "disable", "nobody"][..],
        &["devices", "enable", "nobody"][..],
        &["devices", "delete", "nobody"][..],
    ] {
        assert_unknown_device(&run(&fx, args), "nobody");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_and_explain_work_while_the_broker_runs() {
    let fx = Fixture::new();
    fx.config(&Fixture::fleet_anchor(true));
    let dev = fx.device("dev-001.devices.example.com");
    let cert = chain_file(&fx, "dev.pem", &dev);
    let broker = Broker::start(&fx.path("certmq.toml")).await;
    let client = fx.client(&dev);
    assert_eq!(
        client.connect_v4(broker.addr, "c", true).await,
        Outcome::Accepted
    );
    // The binary blocks this thread; the broker keeps running on the other worker.
    let fx = std::sync::Arc::new(fx);
    let cli = fx.clone();
    let (list, explained, disabled) = tokio::task::spawn_blocking(move || {
        (
            json(&cli, &["devices", "list", "--json"], 0),
            json(&cli, &["explain", "--cert", &cert, "--json"], 0),
            run(&cli, &["devices", "disable", "dev-001"]),
        )
    })
    .await
    .unwrap();
    assert_eq!(list[0]["name"], "dev-001", "{list}");
    assert_eq!(explained["decision"], "accept", "{explained}");
    assert_eq!(disabled.code, Some(0), "{disabled:#?}");
    // The running broker reads the registry the binary changed.
    assert_eq!(
        client.connect_v4(broker.addr, "c", true).await,
        Outcome::Refused(5)
    );
    broker.stop().await;
}
