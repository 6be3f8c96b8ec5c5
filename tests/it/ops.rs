//! Operations black-box (contract §1, 8, 10): `certmq serve` as a real subprocess, driven the
//! way an operator or systemd drives it — edit the TOML file and send SIGHUP, run
//! `certmq devices ...` next to it, scrape `/metrics`, send SIGTERM — and watched from
//! real TLS clients. Every wait is bounded and waits for an event (a log line, a packet,
//! the child's exit), never for a fixed time.

use std::time::{Duration, Instant};

use crate::common::coretests::raw::{raw_publish, Raw, RawConnect};
use crate::common::coretests::V;
use crate::common::ops::{config, config_with_limits, open_v5, pinned, pinned_backend, Proc};
use crate::common::run::{arg, certmq};
use crate::common::{self_signed, Fixture, Outcome, WAIT};
use certmq::pki::{Issued, Validity};

const NOT_AUTHORIZED_V5: u8 = 0x87;
const SERVER_SHUTTING_DOWN: u8 = 0x8B;

/// Asserts the reconnection of a device the broker no longer admits was refused, at TLS
/// or at CONNECT (3.1.1 return code 5): `raw` is what `Client::raw` returned.
#[track_caller]
fn assert_refused(raw: &Result<Vec<u8>, String>) {
    match raw {
        Err(tls) => assert!(tls.contains("AlertReceived"), "TLS alert expected: {tls}"),
        Ok(bytes) => assert_eq!(bytes, &[0x20, 2, 0, 5], "CONNACK refused (5) expected"),
    }
}

// ---------------------------------------------------------------- SIGHUP: anchors

#[tokio::test]
async fn sighup_adds_an_anchor() {
    let fx = Fixture::new();
    let (backend, _) = pinned_backend(&fx);
    let path = config(&fx, &backend);
    let mut broker = Proc::start(&fx, &path).await;
    let dev = fx.client(&fx.device("dev-1.devices.example.com"));

    dev.connect_v5(broker.mqtt, "d")
        .await
        .assert_tls_alert("UnknownCA");

    config(&fx, &format!("{}\n{backend}", Fixture::fleet_anchor(true)));
    let line = broker.reload().await.expect("reload accepted");
    assert!(line.contains("revoked=0"), "{line}");
    assert_eq!(dev.connect_v5(broker.mqtt, "d").await, Outcome::Accepted);

    assert_eq!(
        broker.metric("certmq_reloads_total{result=\"ok\"}").await,
        Some(1.0)
    );
    assert_eq!(broker.metric("certmq_last_reload_success").await, Some(1.0));
    let not_after = broker
        .metric("certmq_anchor_not_after_timestamp_seconds{anchor=\"fleet\"}")
        .await
        .expect("the new anchor's expiry is exported");
    assert!(not_after > certmq::cert::now_secs() as f64, "{not_after}");
}

#[tokio::test]
async fn sighup_removing_an_anchor_disconnects_its_devices_only() {
    let fx = Fixture::new();
    let (backend, backend_client) = pinned_backend(&fx);
    let path = config(&fx, &format!("{}\n{backend}", Fixture::fleet_anchor(true)));
    let mut broker = Proc::start(&fx, &path).await;
    let dev = fx.client(&fx.device("dev-1.devices.example.com"));
    let mut d = open_v5(&dev, broker.mqtt, "d").await;
    let mut b = open_v5(&backend_client, broker.mqtt, "b").await;

    config(&fx, &backend);
    let line = broker.reload().await.expect("reload accepted");
    assert!(line.contains("revoked=1"), "{line}");
    assert!(line.contains("kept=1"), "{line}");

    let gone = d.expect_disconnect(WAIT).await;
    assert_eq!(gone.code, NOT_AUTHORIZED_V5, "{gone:?}");
    assert!(gone.reason.contains("not authorized"), "{gone:?}");
    // The pinned device is still served, on the same connection.
    b.ping().await;
    assert_eq!(b.subscribe_many(1, &[("t/#", 0)]).await, [0]);
    b.send(&raw_publish(V::V5, "t/after-reload", b"x", 0, 0, false))
        .await;
    let p = b.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), p.payload.as_slice()),
        ("t/after-reload", &b"x"[..])
    );
    // And the removed anchor's device cannot come back.
    dev.connect_v5(broker.mqtt, "d")
        .await
        .assert_tls_alert("UnknownCA");
}

#[tokio::test]
async fn sighup_replaces_the_server_certificate_for_new_connections() {
    let fx = Fixture::new();
    let path = config(&fx, &Fixture::fleet_anchor(true));
    let mut broker = Proc::start(&fx, &path).await;
    let dev = fx.client(&fx.device("dev-1.devices.example.com"));
    let mut before = open_v5(&dev, broker.mqtt, "before").await;
    assert_eq!(server_leaf(&before), fx.server.cert_der);

    let renewed = fx
        .root
        .issue(&certmq::pki::LeafSpec::server(
            &["localhost"],
            &["127.0.0.1".parse().unwrap()],
        ))
        .unwrap();
    fx.write("server.pem", &renewed.cert_pem);
    fx.write("server.key", &renewed.key_pem);
    broker.reload().await.expect("reload accepted");

    let after = open_v5(&dev, broker.mqtt, "after").await;
    assert_eq!(server_leaf(&after), renewed.cert_der);
    // The connection made before the renewal goes on.
    before.ping().await;
}

/// The certificate the broker presented on this connection.
fn server_leaf(raw: &Raw) -> Vec<u8> {
    raw.tls().get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

// ---------------------------------------------------------------- SIGHUP: a broken file

#[tokio::test]
async fn sighup_with_a_broken_config_keeps_the_running_one() {
    let fx = Fixture::new();
    let path = config(&fx, &Fixture::fleet_anchor(true));
    let mut broker = Proc::start(&fx, &path).await;
    let dev = fx.client(&fx.device("dev-1.devices.example.com"));

    // A typo'd key: refused, and the problem names the key.
    config(
        &fx,
        &format!("{}create_device = true\n", Fixture::fleet_anchor(true)),
    );
    let line = broker.reload().await.expect_err("reload refused");
    assert!(line.contains("keeping the running configuration"), "{line}");
    broker.wait_line("create_device").await;
    assert_eq!(dev.connect_v5(broker.mqtt, "d1").await, Outcome::Accepted);
    assert_eq!(
        broker
            .metric("certmq_reloads_total{result=\"failed\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        broker.metric("certmq_reloads_total{result=\"ok\"}").await,
        Some(0.0)
    );
    assert_eq!(broker.metric("certmq_last_reload_success").await, Some(0.0));

    // A missing certificate file: refused, and the problem names the file.
    config(
        &fx,
        &Fixture::fleet_anchor(true).replace("fleet.pem", "missing-ca.pem"),
    );
    broker.reload().await.expect_err("reload refused");
    broker.wait_line("missing-ca.pem").await;
    assert_eq!(dev.connect_v5(broker.mqtt, "d2").await, Outcome::Accepted);
    assert_eq!(
        broker
            .metric("certmq_reloads_total{result=\"failed\"}")
            .await,
        Some(2.0)
    );
    // The old anchor still counts as the one in force.
    assert!(broker
        .metric("certmq_anchor_not_after_timestamp_seconds{anchor=\"fleet\"}")
        .await
        .is_some());
}

// ---------------------------------------------------------------- SIGHUP: CRL

#[tokio::test]
async fn sighup_with_an_updated_crl_revokes_within_a_second() {
    let fx = Fixture::new();
    let a = fx.device("dev-a.devices.example.com");
    let b = fx.device("dev-b.devices.example.com");
    fx.write(
        "fleet.crl",
        &fx.fleet.crl(&[], Validity::days(-1, 30)).unwrap(),
    );
    let path = config(
        &fx,
        &format!("{}crl = \"fleet.crl\"\n", Fixture::fleet_anchor(true)),
    );
    let mut broker = Proc::start(&fx, &path).await;
    let mut conn_a = open_v5(&fx.client(&a), broker.mqtt, "a").await;
    let mut conn_b = open_v5(&fx.client(&b), broker.mqtt, "b").await;

    fx.write(
        "fleet.crl",
        &fx.fleet.crl(&[a.serial], Validity::days(-1, 30)).unwrap(),
    );
    // The guarantee runs from the SIGHUP to the DISCONNECT: the clock starts as kill(2)
    // is called (`signal` starts no process) and stops as the DISCONNECT is read; the
    // read itself may take longer, so that a late revocation is reported with its time.
    let sent = Instant::now();
    broker.signal("HUP");
    let gone = conn_a.expect_disconnect(WAIT).await;
    let took = sent.elapsed();
    assert_eq!(gone.code, NOT_AUTHORIZED_V5, "{gone:?}");
    assert!(gone.reason.contains("revoked"), "{gone:?}");
    assert!(took < Duration::from_secs(1), "revoked after {took:?}");
    let line = broker.wait_line("configuration reloaded").await;
    assert!(line.contains("revoked=1"), "{line}");

    fx.client(&a)
        .connect_v5(broker.mqtt, "a")
        .await
        .assert_tls_alert("CertificateRevoked");
    conn_b.ping().await;
}

// ---------------------------------------------------------------- SIGHUP: ACL profile

#[tokio::test]
async fn sighup_narrowing_the_acl_keeps_the_connection_and_drops_the_subscription() {
    let fx = Fixture::new();
    let profile = |subscribe: &str| {
        format!(
            "{}acl = \"sensors\"\n\n[acl.sensors]\npublish = [\"devices/{{device}}/#\", \"v1/devices/{{device}}/#\"]\nsubscribe = [{subscribe}]\n",
            Fixture::fleet_anchor(true)
        )
    };
    let path = config(
        &fx,
        &profile("\"devices/{device}/#\", \"v1/devices/{device}/#\""),
    );
    let mut broker = Proc::start(&fx, &path).await;
    let dev = fx.client(&fx.device("dev-1.devices.example.com"));
    let mut d = open_v5(&dev, broker.mqtt, "d").await;
    assert_eq!(
        d.subscribe_many(1, &[("devices/dev-1/#", 0), ("v1/devices/dev-1/#", 0)])
            .await,
        [0, 0]
    );
    d.send(&raw_publish(
        V::V5,
        "devices/dev-1/before",
        b"1",
        0,
        0,
        false,
    ))
    .await;
    assert_eq!(d.next_publish().await.topic, "devices/dev-1/before");

    config(&fx, &profile("\"v1/devices/{device}/#\""));
    let line = broker.reload().await.expect("reload accepted");
    assert!(line.contains("kept=1"), "{line}");
    assert!(line.contains("subscriptions_removed=1"), "{line}");

    // Still allowed to publish there, but no longer subscribed: the marker on the topic
    // the new profile allows is the first thing delivered.
    d.send(&raw_publish(
        V::V5,
        "devices/dev-1/after",
        b"2",
        0,
        0,
        false,
    ))
    .await;
    d.send(&raw_publish(
        V::V5,
        "v1/devices/dev-1/marker",
        b"3",
        0,
        0,
        false,
    ))
    .await;
    let p = d.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), p.payload.as_slice()),
        ("v1/devices/dev-1/marker", &b"3"[..])
    );
    // A new subscription follows the new profile too.
    assert_eq!(
        d.subscribe_many(2, &[("devices/dev-1/#", 0)]).await,
        [NOT_AUTHORIZED_V5]
    );
}

// ---------------------------------------------------------------- the devices CLI

#[tokio::test]
async fn devices_disable_and_delete_disconnect_within_two_seconds() {
    let fx = Fixture::new();
    let path = config(&fx, &Fixture::fleet_anchor(true));
    let broker = Proc::start(&fx, &path).await;
    let clients: Vec<_> = (1..=3)
        .map(|i| fx.client(&fx.device(&format!("dev-{i}.devices.example.com"))))
        .collect();
    let mut d1 = open_v5(&clients[0], broker.mqtt, "c").await;
    let mut d2 = open_v5(&clients[1], broker.mqtt, "c").await;
    let mut d3 = open_v5(&clients[2], broker.mqtt, "c").await;
    let devices = |command: &str, name: &str| {
        let run = certmq(
            fx.dir.path(),
            &["devices", command, name, "--config", arg(&path)],
        );
        assert_eq!(run.code, Some(0), "{run:#?}");
    };

    devices("disable", "dev-1");
    let gone = d1.expect_disconnect(Duration::from_secs(2)).await;
    assert_eq!(gone.code, NOT_AUTHORIZED_V5, "{gone:?}");
    assert!(gone.reason.contains("disabled"), "{gone:?}");
    assert_eq!(
        clients[0].connect_v5(broker.mqtt, "c").await,
        Outcome::Refused(NOT_AUTHORIZED_V5)
    );

    devices("delete", "dev-2");
    let gone = d2.expect_disconnect(Duration::from_secs(2)).await;
    assert_eq!(gone.code, NOT_AUTHORIZED_V5, "{gone:?}");
    assert!(gone.reason.contains("deleted"), "{gone:?}");

    // The untouched device kept its connection through both re-checks.
    d3.ping().await;
    devices("enable", "dev-1");
    assert_eq!(
        clients[0].connect_v5(broker.mqtt, "c").await,
        Outcome::Accepted
    );
}

// ---------------------------------------------------------------- resumed TLS sessions

#[tokio::test]
async fn resumed_tls_of_a_removed_pinned_device_is_refused() {
    let fx = Fixture::new();
    let meter = self_signed("meter-7");
    fx.write("meter-7.pem", &meter.cert_pem);
    let fleet = Fixture::fleet_anchor(true);
    let path = config(
        &fx,
        &format!("{fleet}\n{}", pinned("meter-7", "meter-7.pem", "device")),
    );
    let mut broker = Proc::start(&fx, &path).await;
    // One ClientConfig for both connections: its session cache holds the ticket.
    let client = fx.client(&meter);
    let first = client
        .raw(
            broker.mqtt,
            &[RawConnect::new(V::V4, "m").bytes(), vec![0xE0, 0]].concat(),
        )
        .await;
    assert_eq!(first, Ok(vec![0x20, 2, 0, 0]), "admitted while pinned");

    config(&fx, &fleet);
    broker.reload().await.expect("reload accepted");
    let again = client
        .raw(broker.mqtt, &RawConnect::new(V::V4, "m").bytes())
        .await;
    assert_refused(&again);
}

#[tokio::test]
async fn resumed_tls_of_a_deleted_device_is_refused_at_connect() {
    let fx = Fixture::new();
    let leaf = fx.device("dev-1.devices.example.com");
    provision(&fx, &leaf, "dev-1");
    let path = config(&fx, &Fixture::fleet_anchor(false));
    let broker = Proc::start(&fx, &path).await;
    let client = fx.client(&leaf);
    let (ack, tls) = client
        .raw_first_packet(broker.mqtt, &RawConnect::new(V::V4, "d").bytes())
        .await
        .expect("TLS and CONNACK");
    assert_eq!(ack, [0x20, 2, 0, 0], "admitted while registered");
    assert_eq!(
        tls.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Full)
    );
    drop(tls);

    let run = certmq(
        fx.dir.path(),
        &["devices", "delete", "dev-1", "--config", arg(&path)],
    );
    assert_eq!(run.code, Some(0), "{run:#?}");
    // The server config did not change, so TLS resumes and skips the certificate checks:
    // the CONNECT admission alone must refuse (contract §3 step 8).
    let (ack, tls) = client
        .raw_first_packet(broker.mqtt, &RawConnect::new(V::V4, "d").bytes())
        .await
        .expect("TLS completes; the refusal is at CONNECT");
    assert_eq!(
        tls.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "the broker keeps TLS resumption on (src/tls/mod.rs): this test exercises it"
    );
    assert_eq!(ack, [0x20, 2, 0, 5], "CONNACK not authorized");
}

/// Enters `leaf` in the registry as device `name` of the fleet anchor, as its first
/// connection would have, so that a broker with `create_devices = false` knows it.
fn provision(fx: &Fixture, leaf: &Issued, name: &str) {
    use certmq::registry::{Admitted, Mode, Presented, Source};
    let info = certmq::cert::CertInfo::from_der(&leaf.cert_der).unwrap();
    let name = certmq::identity::DeviceName::parse(name).unwrap();
    let presented = Presented {
        name: &name,
        source: Source::Anchor("fleet".to_owned()),
        fingerprint: info.fingerprint,
        validity: info.validity,
        create: true,
        reserved: false,
    };
    let outcome = crate::common::registry(fx)
        .admit(&presented, Mode::Commit)
        .unwrap();
    assert_eq!(outcome, Ok(Admitted::Provisioned));
}

// ---------------------------------------------------------------- admin endpoint

#[tokio::test]
async fn metrics_and_healthz_follow_the_traffic() {
    let fx = Fixture::new();
    let path = config(&fx, &Fixture::fleet_anchor(true));
    let broker = Proc::start(&fx, &path).await;
    let (status, body) = broker.get("/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let m = |s: &'static str| broker.metric(s);
    assert_eq!(m("certmq_connections").await, Some(0.0));
    assert_eq!(m("certmq_handshakes_total{result=\"ok\"}").await, Some(0.0));
    assert_eq!(m("certmq_devices_provisioned_total").await, Some(0.0));

    // Provisioned on its first connection, and still connected.
    let dev = fx.client(&fx.device("dev-1.devices.example.com"));
    let mut d = open_v5(&dev, broker.mqtt, "d").await;
    assert_eq!(m("certmq_connections").await, Some(1.0));
    assert_eq!(m("certmq_handshakes_total{result=\"ok\"}").await, Some(1.0));
    assert_eq!(m("certmq_devices_provisioned_total").await, Some(1.0));

    // Refused at CONNECT: the CN does not match the anchor's regex.
    let stray = fx.client(&fx.device("printer.example.org"));
    assert_eq!(
        stray.connect_v5(broker.mqtt, "s").await,
        Outcome::Refused(0x87)
    );
    assert_eq!(
        m("certmq_auth_refusals_total{reason=\"regex_miss\"}").await,
        Some(1.0)
    );
    assert_eq!(m("certmq_handshakes_total{result=\"ok\"}").await, Some(2.0));

    // Refused at TLS: issued by a CA that is not an anchor.
    let other_ca = fx
        .root
        .intermediate("Other CA", Validity::days(-1, 30), None)
        .unwrap();
    let outsider = other_ca
        .issue(&certmq::pki::LeafSpec::device("x.devices.example.com"))
        .unwrap();
    fx.client(&outsider)
        .connect_v5(broker.mqtt, "x")
        .await
        .assert_tls_alert("UnknownCA");
    broker
        .wait_metric("certmq_handshakes_total{result=\"failed\"}", 1.0)
        .await;
    assert_eq!(
        m("certmq_auth_refusals_total{reason=\"unknown_issuer\"}").await,
        Some(1.0)
    );
    assert_eq!(m("certmq_devices_provisioned_total").await, Some(1.0));

    // One message in, one delivered.
    assert_eq!(d.subscribe_many(1, &[("devices/dev-1/#", 0)]).await, [0]);
    d.send(&raw_publish(V::V5, "devices/dev-1/t", b"m", 0, 0, false))
        .await;
    assert_eq!(d.next_publish().await.topic, "devices/dev-1/t");
    broker
        .wait_metric("certmq_messages_received_total", 1.0)
        .await;
    broker.wait_metric("certmq_messages_sent_total", 1.0).await;

    // The connected device leaves: the gauge comes back to zero.
    drop(d);
    broker.wait_metric("certmq_connections", 0.0).await;
}

// ---------------------------------------------------------------- shutdown

#[tokio::test]
async fn sigterm_disconnects_v5_clients_and_exits_zero() {
    let fx = Fixture::new();
    let path = config(&fx, &Fixture::fleet_anchor(true));
    let mut broker = Proc::start(&fx, &path).await;
    let one = fx.client(&fx.device("dev-1.devices.example.com"));
    let two = fx.client(&fx.device("dev-2.devices.example.com"));
    let mut c1 = open_v5(&one, broker.mqtt, "c1").await;
    let mut c2 = open_v5(&two, broker.mqtt, "c2").await;

    broker.signal("TERM");
    for c in [&mut c1, &mut c2] {
        let bye = c.expect_disconnect(WAIT).await;
        assert_eq!(bye.code, SERVER_SHUTTING_DOWN, "{bye:?}");
        assert_eq!(bye.reason, "server shutting down");
    }
    let status = broker
        .wait_exit(certmq::server::SHUTDOWN_GRACE + Duration::from_secs(2))
        .await;
    assert_eq!(status.code(), Some(0), "{}", broker.stderr());
    assert!(broker.stderr().contains("stopped"), "{}", broker.stderr());
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let fx = Fixture::new();
    // A peer stuck before its TLS handshake holds the graceful stop for up to 60 s.
    let path = config_with_limits(
        &fx,
        "handshake_timeout = 60\nconnect_timeout = 5",
        &Fixture::fleet_anchor(true),
    );
    let mut broker = Proc::start(&fx, &path).await;
    let _silent = std::net::TcpStream::connect(broker.mqtt).unwrap();
    broker.wait_metric("certmq_connections", 1.0).await;

    broker.signal("TERM");
    let line = broker.wait_line(" shutting down connections=").await;
    assert!(line.contains("connections=1"), "{line}");
    broker.signal("TERM");
    let status = broker.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(1), "{}", broker.stderr());
    assert!(
        broker.stderr().contains("second signal: exiting now"),
        "{}",
        broker.stderr()
    );
}

#[tokio::test]
async fn sigint_stops_gracefully_too() {
    let fx = Fixture::new();
    let path = config(&fx, &Fixture::fleet_anchor(true));
    let mut broker = Proc::start(&fx, &path).await;
    let dev = fx.client(&fx.device("dev-1.devices.example.com"));
    let mut c = open_v5(&dev, broker.mqtt, "c").await;

    broker.signal("INT");
    let bye = c.expect_disconnect(WAIT).await;
    assert_eq!(bye.code, SERVER_SHUTTING_DOWN, "{bye:?}");
    let status = broker.wait_exit(certmq::server::SHUTDOWN_GRACE).await;
    assert_eq!(status.code(), Some(0), "{}", broker.stderr());
}
