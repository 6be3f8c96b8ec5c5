//! Interoperability with the broker's peers in the field: Mosquitto's command-line clients
//! (`mosquitto_pub` / `mosquitto_sub`, MQTT 3.1.1 and 5) and Python's paho-mqtt 2.x,
//! spawned as real programs against a real broker on 127.0.0.1:0 over mutual TLS; and the
//! README's `mosquitto_pub` examples run verbatim against a demo PKI like `certs-example/`.
//!
//! Readiness without sleeps: a subscriber is known to be subscribed when it prints a
//! retained marker published before it started. Absence ("the denied message was not
//! delivered") is shown by a later marker on the same subscription arriving first.
//!
//! Without the clients the tests print "skipped" and pass, unless CI sets
//! `CERTMQ_REQUIRE_MOSQUITTO` / `CERTMQ_REQUIRE_PAHO` (see `crate::common::interop`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::interop::{
    mosquitto, mosquitto_available, paho_available, run, shell_words, Creds, Finished, Spawned,
    Version,
};
use crate::common::{self_signed, Broker, Fixture};
use tokio::process::Command;

/// The repository root: the README and the paho script live there.
fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A broker with the fleet anchor (provisioning on) and a pinned `backend` device that
/// may publish and subscribe everywhere, plus the Mosquitto credentials for `dev-1`.
struct Bench {
    fx: Fixture,
    broker: Broker,
    dev: Creds,
    backend: Creds,
}

impl Bench {
    async fn start() -> Bench {
        let fx = Fixture::new();
        let backend = self_signed("backend");
        let backend = Creds::write(&fx, "backend", &backend.cert_pem, &backend.key_pem);
        let body = format!(
            "{}\n[[device]]\nname = \"backend\"\ncertificate = \"backend.pem\"\nacl = \"backend\"\n\n[acl.backend]\npublish = [\"#\"]\nsubscribe = [\"#\"]\n",
            Fixture::fleet_anchor(true)
        );
        let broker = Broker::start(&fx.config(&body)).await;
        let dev = Bench::device(&fx, "dev-1", "dev-1.devices.example.com");
        Bench {
            fx,
            broker,
            dev,
            backend,
        }
    }

    /// Credentials for a device under the fleet anchor that sends leaf + intermediate.
    fn device(fx: &Fixture, file: &str, cn: &str) -> Creds {
        let leaf = fx.device(cn);
        Creds::write(fx, file, &leaf.chain_pem(&[&fx.fleet]), &leaf.key_pem)
    }

    fn port(&self) -> u16 {
        self.broker.addr.port()
    }

    /// Runs `mosquitto_pub ARGS` to completion.
    async fn publish(&self, creds: &Creds, version: Version, args: &[&str]) -> Finished {
        let mut cmd = mosquitto("mosquitto_pub", self.port(), version, creds);
        cmd.args(args);
        run(&format!("mosquitto_pub {}", args.join(" ")), cmd).await
    }

    /// Publishes a retained QoS 1 message: `mosquitto_pub` returns after the PUBACK, so
    /// the message is stored when this returns.
    async fn retain(&self, creds: &Creds, topic: &str, payload: &str) {
        self.publish(
            creds,
            Version::V311,
            &["-r", "-q", "1", "-t", topic, "-m", payload],
        )
        .await
        .assert_success();
    }

    /// Starts `mosquitto_sub ARGS`; the caller reads its lines.
    fn subscribe(&self, creds: &Creds, version: Version, args: &[&str]) -> Spawned {
        let mut cmd = mosquitto("mosquitto_sub", self.port(), version, creds);
        cmd.args(args);
        Spawned::spawn(&format!("mosquitto_sub {}", args.join(" ")), cmd)
    }
}

/// The lines of `text`, sorted: separate `mosquitto_pub` processes race each other to
/// the broker, so only the set of deliveries is deterministic.
fn sorted_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

// ---------------------------------------------------------------- QoS round trips

/// `mosquitto_sub -q 2` gets QoS 0, 1 and 2 publications of `mosquitto_pub` at their own
/// QoS, and each publisher sees its acknowledgement flow complete.
async fn round_trip(version: Version) {
    let b = Bench::start().await;
    b.retain(&b.dev, "devices/dev-1/ready", "ready").await;
    let mut sub = b.subscribe(
        &b.dev,
        version,
        &[
            "-q",
            "2",
            "-t",
            "devices/dev-1/#",
            "-C",
            "4",
            "-F",
            "%q %r %t %p",
        ],
    );
    assert_eq!(sub.next_line().await, "1 1 devices/dev-1/ready ready");
    for (qos, flow) in [
        ("0", &["sending PUBLISH (d0, q0"][..]),
        ("1", &["received PUBACK (Mid: 1, RC:0)"][..]),
        (
            "2",
            &[
                "received PUBREC (Mid: 1",
                "sending PUBREL (m1)",
                "received PUBCOMP (Mid: 1, RC:0)",
            ][..],
        ),
    ] {
        let topic = format!("devices/dev-1/qos{qos}");
        let payload = format!("m{qos}");
        let out = b
            .publish(
                &b.dev,
                version,
                &["-d", "-q", qos, "-t", &topic, "-m", &payload],
            )
            .await;
        out.assert_success();
        for step in flow {
            assert!(out.stdout.contains(step), "QoS {qos}: no {step:?}:\n{out}");
        }
    }
    let done = sub.finish().await;
    done.assert_success();
    let mut deliveries = sorted_lines(&done.stdout);
    deliveries.retain(|l| !l.ends_with(" ready"));
    assert_eq!(
        deliveries,
        [
            "0 0 devices/dev-1/qos0 m0",
            "1 0 devices/dev-1/qos1 m1",
            "2 0 devices/dev-1/qos2 m2",
        ]
    );
}

#[tokio::test]
async fn mosquitto_qos_0_1_2_round_trip_mqtt_311() {
    if mosquitto_available() {
        round_trip(Version::V311).await;
    }
}

#[tokio::test]
async fn mosquitto_qos_0_1_2_round_trip_mqtt_5() {
    if mosquitto_available() {
        round_trip(Version::V5).await;
    }
}

// ---------------------------------------------------------------- retained

#[tokio::test]
async fn mosquitto_retained_reaches_a_later_subscriber_and_empty_payload_clears_it() {
    if !mosquitto_available() {
        return;
    }
    let b = Bench::start().await;
    b.retain(&b.dev, "devices/dev-1/state", "on").await;
    let mut later = b.subscribe(
        &b.dev,
        Version::V5,
        &["-t", "devices/dev-1/state", "-C", "1", "-F", "%r %t %p"],
    );
    let later = later.finish().await;
    later.assert_success();
    assert_eq!(later.stdout, "1 devices/dev-1/state on\n");

    // Clear it (MQTT 5 publisher), then show that only the marker is still retained: a
    // --retained-only subscriber prints every retained message and exits on the first
    // live one, which is published after the marker was printed.
    b.publish(
        &b.dev,
        Version::V5,
        &["-r", "-q", "1", "-n", "-t", "devices/dev-1/state"],
    )
    .await
    .assert_success();
    b.retain(&b.dev, "devices/dev-1/marker", "m").await;
    let mut sub = b.subscribe(
        &b.dev,
        Version::V311,
        &["--retained-only", "-t", "devices/dev-1/#", "-F", "%r %t %p"],
    );
    assert_eq!(sub.next_line().await, "1 devices/dev-1/marker m");
    b.publish(
        &b.dev,
        Version::V311,
        &["-q", "1", "-t", "devices/dev-1/live", "-m", "x"],
    )
    .await
    .assert_success();
    let done = sub.finish().await;
    done.assert_success();
    assert_eq!(done.stdout, "1 devices/dev-1/marker m\n");
}

// ---------------------------------------------------------------- refusals

#[tokio::test]
async fn mosquitto_untrusted_certificate_fails_the_handshake_with_an_alert() {
    if !mosquitto_available() {
        return;
    }
    let b = Bench::start().await;
    // Self-signed and not pinned: no anchor issued it.
    let stranger = self_signed("dev-9.devices.example.com");
    let stranger = Creds::write(&b.fx, "stranger", &stranger.cert_pem, &stranger.key_pem);
    for version in [Version::V311, Version::V5] {
        // Mosquitto 2.0.11 prints the OpenSSL alert only in its debug log (-d, stdout);
        // without -d it says "The connection was lost".
        let out = b
            .publish(
                &stranger,
                version,
                &["-d", "-q", "1", "-t", "devices/dev-9/x", "-m", "x"],
            )
            .await;
        assert_ne!(out.code, Some(0), "{version:?}: accepted:\n{out}");
        assert!(
            out.output().contains("alert unknown ca"),
            "{version:?}: no unknown_ca alert:\n{out}"
        );
        assert!(
            !out.stdout.contains("received CONNACK"),
            "{version:?}: reached MQTT:\n{out}"
        );
    }
}

#[tokio::test]
async fn mosquitto_refused_at_connect_says_not_authorised() {
    if !mosquitto_available() {
        return;
    }
    let b = Bench::start().await;
    // Trusted chain, but cn_regex does not match: refused at CONNECT (contract §3 step 5).
    let intruder = Bench::device(&b.fx, "intruder", "intruder.example.org");
    let args = ["-q", "1", "-t", "devices/intruder/x", "-m", "x"];
    let v311 = b.publish(&intruder, Version::V311, &args).await;
    assert_eq!(v311.code, Some(5), "CONNACK return code 5:\n{v311}");
    assert!(
        v311.stderr.contains("Connection Refused: not authorised"),
        "{v311}"
    );
    let v5 = b.publish(&intruder, Version::V5, &args).await;
    assert_eq!(v5.code, Some(0x87), "CONNACK reason code 0x87:\n{v5}");
    assert!(v5.stderr.contains("Not authorized"), "{v5}");
}

// ---------------------------------------------------------------- ACLs

#[tokio::test]
async fn mosquitto_v1_devices_me_alias_works_both_ways() {
    if !mosquitto_available() {
        return;
    }
    let b = Bench::start().await;
    // Backend -> device: published under the device's real name, delivered under `me`.
    b.retain(&b.backend, "v1/devices/dev-1/attributes", "ready")
        .await;
    let mut device_sub = b.subscribe(
        &b.dev,
        Version::V5,
        &["-q", "1", "-t", "v1/devices/me/#", "-C", "2", "-F", "%t %p"],
    );
    assert_eq!(
        device_sub.next_line().await,
        "v1/devices/me/attributes ready"
    );
    b.publish(
        &b.backend,
        Version::V5,
        &[
            "-q",
            "1",
            "-t",
            "v1/devices/dev-1/rpc/request/1",
            "-m",
            "reboot",
        ],
    )
    .await
    .assert_success();
    let done = device_sub.finish().await;
    done.assert_success();
    assert_eq!(
        done.stdout,
        "v1/devices/me/attributes ready\nv1/devices/me/rpc/request/1 reboot\n"
    );

    // Device -> backend: published under `me`, delivered under the device's real name.
    let mut backend_sub = b.subscribe(
        &b.backend,
        Version::V311,
        &["-q", "1", "-t", "v1/devices/#", "-C", "2", "-F", "%t %p"],
    );
    assert_eq!(
        backend_sub.next_line().await,
        "v1/devices/dev-1/attributes ready"
    );
    b.publish(
        &b.dev,
        Version::V311,
        &["-q", "1", "-t", "v1/devices/me/telemetry", "-m", "21.5"],
    )
    .await
    .assert_success();
    let done = backend_sub.finish().await;
    done.assert_success();
    assert_eq!(
        done.stdout,
        "v1/devices/dev-1/attributes ready\nv1/devices/dev-1/telemetry 21.5\n"
    );
}

#[tokio::test]
async fn mosquitto_denied_publish_gets_puback_0x87_in_v5_and_is_dropped() {
    if !mosquitto_available() {
        return;
    }
    let b = Bench::start().await;
    b.retain(&b.dev, "devices/dev-1/ready", "ready").await;
    let mut backend_sub = b.subscribe(
        &b.backend,
        Version::V311,
        &["-q", "1", "-t", "devices/#", "-C", "2", "-F", "%t %p"],
    );
    assert_eq!(backend_sub.next_line().await, "devices/dev-1/ready ready");

    let v5 = b
        .publish(
            &b.dev,
            Version::V5,
            &["-d", "-q", "1", "-t", "devices/dev-2/x", "-m", "stolen"],
        )
        .await;
    assert!(
        v5.stdout.contains("received PUBACK (Mid: 1, RC:135)"),
        "no PUBACK 0x87:\n{v5}"
    );
    assert!(v5.stderr.contains("Not authorized"), "{v5}");
    // MQTT 3.1.1 has no reason codes: the denied QoS 1 publish is still acknowledged.
    let v311 = b
        .publish(
            &b.dev,
            Version::V311,
            &["-d", "-q", "1", "-t", "devices/dev-2/y", "-m", "stolen"],
        )
        .await;
    v311.assert_success();
    assert!(v311.stdout.contains("received PUBACK (Mid: 1"), "{v311}");

    b.publish(
        &b.dev,
        Version::V311,
        &["-q", "1", "-t", "devices/dev-1/after", "-m", "marker"],
    )
    .await
    .assert_success();
    let done = backend_sub.finish().await;
    done.assert_success();
    assert_eq!(
        done.stdout, "devices/dev-1/ready ready\ndevices/dev-1/after marker\n",
        "a denied publish was delivered"
    );
}

// ---------------------------------------------------------------- paho-mqtt

#[tokio::test]
async fn paho_mqtt_311_and_5_round_trips() {
    if !paho_available().await {
        return;
    }
    let b = Bench::start().await;
    let script = repo().join("tests/interop/paho_check.py");
    let mut cmd = Command::new("python3");
    cmd.arg(&script)
        .arg("localhost")
        .arg(b.port().to_string())
        .arg(&b.dev.cafile)
        .arg(&b.dev.cert)
        .arg(&b.dev.key)
        .arg("dev-1");
    // The script bounds itself at 20 s; this bound only catches a hung interpreter.
    let out = Spawned::spawn_with_timeout("paho_check.py", cmd, Duration::from_secs(25))
        .finish()
        .await;
    out.assert_success();
    assert!(
        out.stdout.contains("MQTTv311: ok") && out.stdout.contains("MQTTv5: ok"),
        "{out}"
    );
}

// ---------------------------------------------------------------- README

/// The `mosquitto_pub` lines between the README's `ci:mosquitto` markers.
fn readme_examples(readme: &str) -> Vec<String> {
    let start = readme
        .find("<!-- ci:mosquitto -->")
        .expect("README has <!-- ci:mosquitto -->");
    let end = readme[start..]
        .find("<!-- /ci:mosquitto -->")
        .expect("README has <!-- /ci:mosquitto -->");
    readme[start..start + end]
        .lines()
        .filter(|l| l.starts_with("mosquitto_pub "))
        .map(str::to_owned)
        .collect()
}

/// A fresh `certmq demo-pki` PKI in `dir/certs-example` (what the repository's
/// `certs-example/` is), its config listening on 127.0.0.1:0 (data_dir is its `data`
/// folder). The README examples run with `dir` as their working directory, so their
/// `certs-example/...` paths resolve here: nothing in the working tree is read, and an
/// edited `config/certmq.toml` (the README's "Add a trust anchor" recipe) or
/// `certs-example/` cannot break this test. `.ci/run` runs the same examples against the
/// repository's own config and certificates.
fn demo_config(dir: &Path) -> PathBuf {
    let certs = dir.join("certs-example");
    let files = certmq::pki::write_demo(&certs, 30).expect("demo-pki");
    let text = std::fs::read_to_string(&files.config).expect("config");
    let mut binds = 0;
    let rewritten: Vec<String> = text
        .lines()
        .map(|line| {
            if line.starts_with("bind =") {
                binds += 1;
                "bind = \"127.0.0.1:0\"".to_owned()
            } else {
                line.to_owned()
            }
        })
        .collect();
    assert_eq!(binds, 1, "the demo config changed shape");
    std::fs::write(&files.config, rewritten.join("\n") + "\n").expect("write config");
    files.config
}

/// The value after `flag` in a command's words.
fn arg_after<'a>(words: &'a [String], flag: &str) -> &'a str {
    let i = words
        .iter()
        .position(|w| w == flag)
        .unwrap_or_else(|| panic!("no {flag} in {words:?}"));
    words
        .get(i + 1)
        .unwrap_or_else(|| panic!("{flag} without a value in {words:?}"))
}

#[tokio::test]
async fn readme_mosquitto_examples_work_against_a_demo_pki() {
    if !mosquitto_available() {
        return;
    }
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let examples = readme_examples(&readme);
    assert!(!examples.is_empty(), "no mosquitto_pub examples in README");
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(&demo_config(dir.path())).await;
    let port = broker.addr.port();
    let certs = dir.path().join("certs-example");
    let backend = Creds::files(
        &certs.join("root.pem"),
        &certs.join("backend.pem"),
        &certs.join("backend.key"),
    );
    let mut marker = mosquitto("mosquitto_pub", port, Version::V311, &backend);
    marker.args(["-r", "-q", "1", "-t", "ci/ready", "-m", "ready"]);
    run("mosquitto_pub ci/ready", marker).await.assert_success();
    let mut sub = mosquitto("mosquitto_sub", port, Version::V311, &backend);
    let count = (examples.len() + 1).to_string();
    sub.args(["-q", "1", "-t", "ci/ready", "-t", "devices/#"]);
    sub.args(["-t", "v1/devices/#", "-C", &count, "-F", "%t %p"]);
    let mut sub = Spawned::spawn("backend mosquitto_sub", sub);
    assert_eq!(sub.next_line().await, "ci/ready ready");

    let mut expected = Vec::new();
    for example in &examples {
        assert!(example.contains(" -p 8883 "), "no -p 8883 in: {example}");
        let words = shell_words(example);
        expected.push(format!(
            "{} {}",
            arg_after(&words, "-t"),
            arg_after(&words, "-m")
        ));
        let line = example.replace(" -p 8883 ", &format!(" -p {port} "));
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(&line).current_dir(dir.path());
        run(&line, cmd).await.assert_success();
    }
    let done = sub.finish().await;
    done.assert_success();
    let mut got = sorted_lines(&done.stdout);
    got.retain(|l| l != "ci/ready ready");
    expected.sort();
    assert_eq!(got, expected);
}

#[test]
fn shell_words_reads_the_readme_quoting() {
    assert_eq!(
        shell_words(r#"mosquitto_pub -t a/b -m '{"t":21.5}'  -V mqttv5"#),
        [
            "mosquitto_pub",
            "-t",
            "a/b",
            "-m",
            r#"{"t":21.5}"#,
            "-V",
            "mqttv5"
        ]
    );
    assert_eq!(shell_words(r#"x "a b" ''"#), ["x", "a b", ""]);
}
