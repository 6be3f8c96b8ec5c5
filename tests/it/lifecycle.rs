//! Identity and session lifecycle (contract §3 "Hardening", contract §4 "A session lives only as long
//! as its identity"): a session never outlives the decision that admitted it. Each test
//! reproduces one way a session used to outlive it — a narrowed profile, a deleted device, a
//! deleted pinned name, a rotation, a disabled device's delayed will — against `certmq
//! serve` as a real subprocess, driven as an operator drives it (edit the TOML and SIGHUP,
//! `certmq devices ...`, restart), with real TLS clients. Every wait is for an event.

use std::path::Path;

use crate::common::coretests::both_versions;
use crate::common::coretests::raw::RawConnect;
use crate::common::coretests::{Opts, Peer, WillMsg, MARKER, V};
use crate::common::ops::{config, config_with_limits, open_v5, pinned_backend, Proc};
use crate::common::run::{arg, certmq};
use crate::common::{Fixture, Outcome, WAIT};
use certmq::pki::{Ca, Issued, LeafSpec, Validity};

const NOT_AUTHORIZED_V5: u8 = 0x87;
const QUOTA_EXCEEDED_V5: u8 = 0x97;
const BAD_AUTH_METHOD_V5: u8 = 0x8C;
const SERVER_UNAVAILABLE_V311: u8 = 3;

/// The fleet anchor bound to the profile `wide`, whose subscribe patterns are `subscribe`.
fn fleet_wide(subscribe: &str) -> String {
    format!(
        "{}acl = \"wide\"\n\n[acl.wide]\npublish = [\"devices/{{device}}/#\"]\nsubscribe = [{subscribe}]\n",
        Fixture::fleet_anchor(true)
    )
}

const WIDE: &str = "\"fleet/#\", \"devices/{device}/#\"";
const NARROW: &str = "\"devices/{device}/#\"";

fn persistent() -> Opts {
    Opts {
        clean: false,
        will: None,
    }
}

/// `certmq devices ARGS --config PATH`, asserting exit 0.
fn devices(fx: &Fixture, path: &Path, args: &[&str]) -> String {
    let mut all = vec!["devices"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--config", arg(path)]);
    let run = certmq(fx.dir.path(), &all);
    assert_eq!(run.code, Some(0), "certmq {all:?}: {}", run.stderr);
    run.stdout
}

/// Stops the broker with SIGTERM (graceful: the store is flushed) and starts it again.
async fn restart(fx: &Fixture, path: &Path, broker: &mut Proc) -> Proc {
    broker.signal("TERM");
    let status = broker.wait_exit(WAIT).await;
    assert!(status.success(), "exit status {status}");
    Proc::start(fx, path).await
}

// ------------------------------------------- 1. offline sessions follow the profile

/// A device subscribed to `fleet/#` goes offline with a message queued there; the operator
/// narrows the profile (SIGHUP, or while the broker is down). On resume the device must
/// get neither the queued message nor anything new on `fleet/...`.
async fn narrowed_profile_prunes_the_offline_session(v: V, restart_broker: bool) {
    let fx = Fixture::new();
    let (backend_section, backend) = pinned_backend(&fx);
    let path = config(&fx, &format!("{}\n{backend_section}", fleet_wide(WIDE)));
    let mut broker = Proc::start(&fx, &path).await;
    let dev = fx.client(&fx.device("d1.devices.example.com"));

    let mut d = Peer::connect(&dev, broker.mqtt, v, "d1-c", &persistent()).await;
    assert_eq!(d.subscribe("fleet/#", 1).await, 1);
    assert_eq!(d.subscribe("devices/d1/#", 1).await, 1);
    d.disconnect().await;
    let mut b = Peer::connect(&backend, broker.mqtt, V::V5, "b", &Opts::default()).await;
    assert_eq!(
        b.publish("fleet/cmd", 1, false, b"queued-while-allowed")
            .await,
        0
    );
    drop(b);

    config(&fx, &format!("{}\n{backend_section}", fleet_wide(NARROW)));
    if restart_broker {
        broker = restart(&fx, &path, &mut broker).await;
    } else {
        broker.reload().await.expect("reload accepted");
    }
    // Both logged before the reload's outcome line (or before the listener, at start).
    let log = broker.stderr();
    assert!(log.contains("subscription removed"), "{log}");
    assert!(log.contains("queued messages discarded"), "{log}");

    let mut d = Peer::connect(&dev, broker.mqtt, v, "d1-c", &persistent()).await;
    assert!(d.session_present, "the session itself survives");
    let mut b = Peer::connect(&backend, broker.mqtt, V::V5, "b", &Opts::default()).await;
    assert_eq!(
        b.publish("fleet/cmd", 1, false, b"after-narrowing").await,
        0
    );
    assert_eq!(b.publish("devices/d1/x", 1, false, MARKER).await, 0);
    let got = d.recv_until_marker().await;
    assert!(got.is_empty(), "delivered outside the profile: {got:?}");
}

both_versions! {
    #[tokio::test]
    sighup_narrowing_prunes_offline_session_v311,
    sighup_narrowing_prunes_offline_session_v5
        => |v| narrowed_profile_prunes_the_offline_session(v, false);
}

#[tokio::test]
async fn restart_with_narrowed_profile_prunes_restored_session() {
    narrowed_profile_prunes_the_offline_session(V::V5, true).await;
}

// ------------------------------------------- 2. delete removes the device's sessions

/// A second intermediate anchor `other` naming devices the same way, built-in profile.
fn other_anchor(fx: &Fixture) -> (Ca, String) {
    let other = fx
        .root
        .intermediate("Other Fleet CA", Validity::days(-10, 3650), None)
        .expect("other CA");
    fx.write("other.pem", &other.cert_pem());
    let section = "[[anchor]]\nname = \"other\"\ncertificate = \"other.pem\"\ncn_regex = '^(.+)\\.devices\\.example\\.com$'\ncreate_devices = true\n".to_owned();
    (other, section)
}

async fn delete_removes_sessions(restart_broker: bool) {
    let fx = Fixture::new();
    let (backend_section, backend) = pinned_backend(&fx);
    let (other, other_section) = other_anchor(&fx);
    let path = config(
        &fx,
        &format!("{}\n{other_section}\n{backend_section}", fleet_wide(WIDE)),
    );
    let mut broker = Proc::start(&fx, &path).await;
    let old = fx.client(&fx.device("gw-7.devices.example.com"));
    let mut d = Peer::connect(&old, broker.mqtt, V::V5, "gw", &persistent()).await;
    assert_eq!(d.subscribe("fleet/#", 1).await, 1);
    d.disconnect().await;
    let mut b = Peer::connect(&backend, broker.mqtt, V::V5, "b", &Opts::default()).await;
    assert_eq!(
        b.publish("fleet/cmd", 1, false, b"for-the-old-gw-7").await,
        0
    );
    drop(b);

    if restart_broker {
        broker.signal("TERM");
        assert!(broker.wait_exit(WAIT).await.success());
        devices(&fx, &path, &["delete", "gw-7"]);
        broker = Proc::start(&fx, &path).await;
    } else {
        devices(&fx, &path, &["delete", "gw-7"]);
    }

    // The same name from another anchor, with a narrower profile, and the same client id.
    let newcomer = fx.client(
        &other
            .issue(&LeafSpec::device("gw-7.devices.example.com"))
            .expect("leaf"),
    );
    let mut n = Peer::connect(&newcomer, broker.mqtt, V::V5, "gw", &persistent()).await;
    assert!(!n.session_present, "a device created later starts empty");
    let mut b = Peer::connect(&backend, broker.mqtt, V::V5, "b", &Opts::default()).await;
    assert_eq!(b.publish("fleet/cmd", 1, false, b"fleet-wide").await, 0);
    assert_eq!(b.publish("devices/gw-7/x", 1, false, MARKER).await, 0);
    assert_eq!(n.subscribe("devices/gw-7/#", 1).await, 1);
    assert_eq!(b.publish("devices/gw-7/x", 1, false, MARKER).await, 0);
    let got = n.recv_until_marker().await;
    assert!(
        got.is_empty(),
        "the new gw-7 inherited the old one's session: {got:?}"
    );
}

#[tokio::test]
async fn devices_delete_removes_sessions_of_a_running_broker() {
    delete_removes_sessions(false).await;
}

#[tokio::test]
async fn devices_delete_while_stopped_removes_stored_sessions() {
    delete_removes_sessions(true).await;
}

/// Deleting a connected device closes its connection and forgets its session.
#[tokio::test]
async fn devices_delete_disconnects_and_forgets_the_live_session() {
    let fx = Fixture::new();
    let path = config(&fx, &Fixture::fleet_anchor(true));
    let broker = Proc::start(&fx, &path).await;
    let dev = fx.client(&fx.device("d1.devices.example.com"));
    let mut tls = open_v5(&dev, broker.mqtt, "d1").await;
    assert_eq!(tls.subscribe_many(1, &[("devices/d1/#", 0)]).await, [0]);
    devices(&fx, &path, &["delete", "d1"]);
    let bye = tls.expect_disconnect(WAIT).await;
    assert_eq!(bye.code, NOT_AUTHORIZED_V5, "{bye:?}");
    let again = Peer::connect(&dev, broker.mqtt, V::V5, "d1", &persistent()).await;
    assert!(!again.session_present);
    again.disconnect().await;
}

// ------------------------------------------- 3. a pinned name stays reserved

#[tokio::test]
async fn deleted_pinned_name_cannot_be_squatted() {
    let fx = Fixture::new();
    let (backend_section, backend) = pinned_backend(&fx);
    let path = config(
        &fx,
        &format!("{}\n{backend_section}", Fixture::fleet_anchor(true)),
    );
    let mut broker = Proc::start(&fx, &path).await;
    devices(&fx, &path, &["delete", "backend"]);

    let squatter = fx.client(&fx.device("backend.devices.example.com"));
    assert_eq!(
        squatter.connect_v5(broker.mqtt, "s").await,
        Outcome::Refused(NOT_AUTHORIZED_V5),
        "an anchor certificate provisioned the pinned name"
    );
    let line = broker.wait_line("reserved").await;
    assert!(line.contains("refused"), "{line}");
    assert_eq!(
        backend.connect_v5(broker.mqtt, "b").await,
        Outcome::Accepted
    );
    broker.reload().await.expect("reload accepted");

    // Deleted again while running, then a restart: the row is recreated at start.
    devices(&fx, &path, &["delete", "backend"]);
    let broker = restart(&fx, &path, &mut broker).await;
    let shown = devices(&fx, &path, &["show", "backend", "--json"]);
    assert!(shown.contains("\"source\":\"pinned\""), "{shown}");
    assert_eq!(
        squatter.connect_v5(broker.mqtt, "s").await,
        Outcome::Refused(NOT_AUTHORIZED_V5)
    );
}

// ------------------------------------------- 4. rotation cuts the superseded certificate

fn leaf(ca: &Ca, cn: &str, start_days_ago: i64) -> Issued {
    let mut spec = LeafSpec::device(cn);
    spec.validity = Validity::days(-start_days_ago, 365);
    ca.issue(&spec).expect("leaf")
}

#[tokio::test]
async fn rotation_disconnects_connections_using_the_old_certificate() {
    let fx = Fixture::new();
    let path = config(&fx, &Fixture::fleet_anchor(true));
    let broker = Proc::start(&fx, &path).await;
    let old = fx.client(&leaf(&fx.fleet, "d1.devices.example.com", 5));
    let new = fx.client(&leaf(&fx.fleet, "d1.devices.example.com", 1));
    let mut leaked = open_v5(&old, broker.mqtt, "leaked").await;
    assert_eq!(leaked.subscribe_many(1, &[("devices/d1/#", 0)]).await, [0]);

    assert_eq!(
        new.connect_v5(broker.mqtt, "rotated").await,
        Outcome::Accepted
    );
    let bye = leaked.expect_disconnect(WAIT).await;
    assert_eq!(bye.code, NOT_AUTHORIZED_V5, "{bye:?}");
    assert!(bye.reason.contains("superseded"), "{bye:?}");
    assert_eq!(
        old.connect_v5(broker.mqtt, "leaked").await,
        Outcome::Refused(NOT_AUTHORIZED_V5)
    );
}

// ------------------------------------------- a disabled device's delayed will is dropped

/// A certificate that expires while its connection is open ends the connection (contract §4
/// "When"): at the chain's notAfter the broker decides it again, as a reload would, and
/// revokes it with the documented reason. Nothing else happens meanwhile (no reload, no CRL,
/// no registry write); the wait is generous, debug builds are slow.
#[tokio::test]
async fn a_certificate_expiring_while_connected_ends_the_connection() {
    let fx = Fixture::new();
    let path = config(&fx, &Fixture::fleet_anchor(true));
    let broker = Proc::start(&fx, &path).await;
    let (leaf, not_after) = fx.short_lived_device("d1.devices.example.com", 6);
    let dev = fx.client(&leaf);
    let mut tls = open_v5(&dev, broker.mqtt, "d1").await;
    let bye = tls
        .expect_disconnect(std::time::Duration::from_secs(40))
        .await;
    assert!(
        time::OffsetDateTime::now_utc() > not_after,
        "not before notAfter"
    );
    assert_eq!(bye.code, NOT_AUTHORIZED_V5, "{bye:?}");
    assert!(bye.reason.contains("expired"), "{bye:?}");
    let log = broker.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("session revoked") && l.contains("expired")),
        "{log}"
    );
}

#[tokio::test]
async fn delayed_will_of_a_disabled_device_is_dropped() {
    let fx = Fixture::new();
    let (backend_section, backend) = pinned_backend(&fx);
    let path = config(
        &fx,
        &format!("{}\n{backend_section}", Fixture::fleet_anchor(true)),
    );
    let mut broker = Proc::start(&fx, &path).await;
    let mut b = Peer::connect(&backend, broker.mqtt, V::V5, "b", &Opts::default()).await;
    assert_eq!(b.subscribe("devices/#", 1).await, 1);
    let dev = fx.client(&fx.device("d1.devices.example.com"));
    let opts = Opts {
        clean: false,
        will: Some(WillMsg {
            topic: "devices/d1/status".into(),
            payload: b"offline".to_vec(),
            qos: 1,
            retain: false,
            delay: 2,
        }),
    };
    let d = Peer::connect(&dev, broker.mqtt, V::V5, "d1", &opts).await;
    d.drop_tcp().await;
    devices(&fx, &path, &["disable", "d1"]);
    let line = broker.wait_line("will dropped").await;
    assert!(line.contains("disabled"), "{line}");
    assert_eq!(b.publish("devices/d1/x", 1, false, MARKER).await, 0);
    let got = b.recv_until_marker().await;
    assert!(got.is_empty(), "the will was published: {got:?}");
}

/// A will without delay passes the same gate as a delayed one: a connection that drops
/// between `devices disable` and the next registry poll (500 ms) does not get to speak
/// once more. Should the poll win the race, the connection is revoked without its will:
/// either way nothing is published.
#[tokio::test]
async fn undelayed_will_of_a_disabled_device_is_dropped() {
    let fx = Fixture::new();
    let (backend_section, backend) = pinned_backend(&fx);
    let path = config(
        &fx,
        &format!("{}\n{backend_section}", Fixture::fleet_anchor(true)),
    );
    let broker = Proc::start(&fx, &path).await;
    let mut b = Peer::connect(&backend, broker.mqtt, V::V5, "b", &Opts::default()).await;
    assert_eq!(b.subscribe("devices/#", 1).await, 1);
    let dev = fx.client(&fx.device("d1.devices.example.com"));
    let opts = Opts {
        clean: true,
        will: Some(WillMsg {
            topic: "devices/d1/status".into(),
            payload: b"offline".to_vec(),
            qos: 1,
            retain: false,
            delay: 0,
        }),
    };
    let d = Peer::connect(&dev, broker.mqtt, V::V5, "d1", &opts).await;
    devices(&fx, &path, &["disable", "d1"]);
    d.drop_tcp().await;
    // Past the next poll, so that a will published anyway would be here by now.
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert_eq!(b.publish("devices/d1/x", 1, false, MARKER).await, 0);
    let got = b.recv_until_marker().await;
    assert!(got.is_empty(), "the will was published: {got:?}");
}

// ------------------------------------------- 6. persistent sessions per device

/// An MQTT 5 CONNECT, keep alive 30 s, Session Expiry Interval 600 s, clean start 0.
fn connect_v5_persistent(client_id: &str) -> Vec<u8> {
    RawConnect {
        clean: false,
        keep_alive: 30,
        session_expiry: Some(600),
        ..RawConnect::new(V::V5, client_id)
    }
    .bytes()
}

/// The reason code of the CONNACK in `bytes` (MQTT 5 or 3.1.1: the byte after the flags).
fn connack_code(bytes: &[u8]) -> u8 {
    assert_eq!(bytes.first(), Some(&0x20), "CONNACK expected: {bytes:02x?}");
    bytes[3]
}

#[tokio::test]
async fn one_persistent_session_over_the_quota_is_refused() {
    let fx = Fixture::new();
    let path = config_with_limits(
        &fx,
        "handshake_timeout = 5\nconnect_timeout = 5\nmax_sessions_per_device = 2",
        &Fixture::fleet_anchor(true),
    );
    let broker = Proc::start(&fx, &path).await;
    let dev = fx.client(&fx.device("d1.devices.example.com"));
    for id in ["s1", "s2"] {
        Peer::connect(&dev, broker.mqtt, V::V5, id, &persistent())
            .await
            .disconnect()
            .await;
    }
    let v5 = dev
        .raw(broker.mqtt, &connect_v5_persistent("s3"))
        .await
        .expect("CONNACK");
    assert_eq!(connack_code(&v5), QUOTA_EXCEEDED_V5, "{v5:02x?}");
    assert_eq!(
        dev.connect_v4(broker.mqtt, "s4", false).await,
        Outcome::Refused(SERVER_UNAVAILABLE_V311)
    );
    // Resuming one of the two, and a clean session, are not new persistent sessions.
    let again = Peer::connect(&dev, broker.mqtt, V::V5, "s1", &persistent()).await;
    assert!(again.session_present);
    again.disconnect().await;
    assert_eq!(
        dev.connect_v4(broker.mqtt, "c", true).await,
        Outcome::Accepted
    );
}

// ------------------------------------------- 11. a refused CONNECT writes nothing

#[tokio::test]
async fn refused_connect_neither_provisions_nor_rotates() {
    let fx = Fixture::new();
    let path = config(&fx, &Fixture::fleet_anchor(true));
    let broker = Proc::start(&fx, &path).await;

    // Enhanced authentication (Authentication Method "SCRAM") from a new device.
    let newcomer = fx.client(&fx.device("d9.devices.example.com"));
    let auth = RawConnect {
        keep_alive: 30,
        ..RawConnect::new(V::V5, "d9")
    }
    .bytes_with_properties(&[0x15, 0, 5, b'S', b'C', b'R', b'A', b'M']);
    let ack = newcomer.raw(broker.mqtt, &auth).await.expect("CONNACK");
    assert_eq!(connack_code(&ack), BAD_AUTH_METHOD_V5, "{ack:02x?}");
    let run = certmq(
        fx.dir.path(),
        &["devices", "show", "d9", "--config", arg(&path)],
    );
    assert_eq!(
        run.code,
        Some(1),
        "provisioned by a refused CONNECT: {}",
        run.stdout
    );

    // A will the profile does not allow, from a new device (3.1.1).
    let packet = RawConnect::with_will(V::V4, "d8", "devices/other/will").bytes();
    let d8 = fx.client(&fx.device("d8.devices.example.com"));
    let ack = d8.raw(broker.mqtt, &packet).await.expect("CONNACK");
    assert_eq!(ack, [0x20, 2, 0, 5], "will refused with 5");
    let run = certmq(
        fx.dir.path(),
        &["devices", "show", "d8", "--config", arg(&path)],
    );
    assert_eq!(
        run.code,
        Some(1),
        "provisioned by a refused CONNECT: {}",
        run.stdout
    );

    // A known device's newer certificate in a refused CONNECT does not rotate.
    let first = leaf(&fx.fleet, "d1.devices.example.com", 5);
    assert_eq!(
        fx.client(&first).connect_v5(broker.mqtt, "d1").await,
        Outcome::Accepted
    );
    let newer = fx.client(&leaf(&fx.fleet, "d1.devices.example.com", 1));
    let ack = newer.raw(broker.mqtt, &auth).await.expect("CONNACK");
    assert_eq!(connack_code(&ack), BAD_AUTH_METHOD_V5);
    let shown = devices(&fx, &path, &["show", "d1", "--json"]);
    let fp = certmq::cert::Fingerprint::of(&first.cert_der).to_hex();
    assert!(shown.contains(&fp), "rotated by a refused CONNECT: {shown}");
}

// ------------------------------------------- 10. no peer can forge a log field or line

#[tokio::test]
async fn a_client_id_cannot_forge_log_fields_or_lines() {
    let fx = Fixture::new();
    let path = config(&fx, &Fixture::fleet_anchor(true));
    let mut broker = Proc::start(&fx, &path).await;
    // A refused CONNECT (its will is not allowed) whose client id carries a line break and
    // fields of the decision line.
    let id = "evil\nresult=\"accepted\" device=\"backend\"";
    let packet = RawConnect::with_will(V::V4, id, "devices/other/will").bytes();
    let dev = fx.client(&fx.device("d1.devices.example.com"));
    let ack = dev.raw(broker.mqtt, &packet).await.expect("CONNACK");
    assert_eq!(ack, [0x20, 2, 0, 5]);
    let line = broker.wait_line("refused at CONNECT").await;
    assert!(
        line.contains(r#"client_id="evil\nresult=\"accepted\" device=\"backend\"""#),
        "{line}"
    );
    let log = broker.stderr();
    assert!(
        !log.lines()
            .any(|l| l.starts_with("result=") || l.contains(" result=\"accepted\"")),
        "a forged field or line: {log}"
    );
}

/// contract §3 "Names people can read": a CN whose name part holds a zero-width space (or a
/// bidi override) is refused at CONNECT and provisions nothing, so `devices list` can never
/// show two identical-looking `pump-1` rows.
#[tokio::test]
async fn invisible_characters_in_a_name_are_refused_and_not_provisioned() {
    let fx = Fixture::new();
    let path = config(&fx, &Fixture::fleet_anchor(true));
    let broker = Proc::start(&fx, &path).await;
    let real = fx.client(&fx.device("pump-1.devices.example.com"));
    assert_eq!(real.connect_v5(broker.mqtt, "p").await, Outcome::Accepted);
    for cn in [
        "pump\u{200b}-1.devices.example.com",
        "pump-1\u{202e}.devices.example.com",
        " pump-1.devices.example.com",
    ] {
        let lookalike = fx.client(&fx.device(cn));
        assert_eq!(
            lookalike.connect_v5(broker.mqtt, "p").await,
            Outcome::Refused(NOT_AUTHORIZED_V5),
            "{cn:?}"
        );
    }
    let list = devices(&fx, &path, &["list", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&list).expect("JSON");
    assert_eq!(rows.as_array().map(Vec::len), Some(1), "{list}");
}
