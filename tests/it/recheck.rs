//! Contract §3 step 8 "every connection is checked", against the connect path's shortcut
//! (docs/architecture.md, "The connect path"): the verdict the TLS verifier reached is
//! reused at CONNECT only when that very handshake ran the verifier under the config
//! still in force. These tests fail if the shortcut is taken anywhere else: after a reload
//! between the handshake and the CONNECT, and on TLS-resumed connections (rustls skips the
//! verifier on resumption), whatever changed since the first connection.

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::common::coretests::raw::RawConnect;
use crate::common::coretests::V;
use crate::common::ops::{config, Proc};
use crate::common::run::{arg, certmq};
use crate::common::{read_packet, Fixture, WAIT};

const ACCEPTED_V4: [u8; 4] = [0x20, 2, 0, 0];
const REFUSED_V4: [u8; 4] = [0x20, 2, 0, 5];

/// An anchor named `other` on the fixture's root CA, first in the file, creating devices
/// with the fleet's CN pattern: a leaf of the fleet CA sent alone does not chain to it,
/// but a verdict reached under the fleet anchor (index 0 there) would name this one.
fn other_anchor() -> String {
    "[[anchor]]\nname = \"other\"\ncertificate = \"root.pem\"\ncn_regex = '^(.+)\\.devices\\.example\\.com$'\ncreate_devices = true\n".to_owned()
}

#[tokio::test]
async fn a_reload_between_handshake_and_connect_decides_again() {
    let fx = Fixture::new();
    let path = config(&fx, &Fixture::fleet_anchor(true));
    let mut broker = Proc::start(&fx, &path).await;
    let client = fx.client(&fx.device("dev-1.devices.example.com"));

    // The handshake completes under the fleet anchor; the CONNECT waits.
    let mut tls = client
        .send_raw(broker.mqtt, &[])
        .await
        .expect("TLS under the fleet anchor");
    assert_eq!(
        tls.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Full)
    );
    // The fleet anchor is removed before the CONNECT arrives.
    config(&fx, &other_anchor());
    broker.reload().await.expect("reload accepted");

    tls.write_all(&RawConnect::new(V::V4, "d").bytes())
        .await
        .expect("CONNECT written");
    let ack = tokio::time::timeout(WAIT, read_packet(&mut tls))
        .await
        .expect("CONNACK in time")
        .expect("CONNACK");
    assert_eq!(
        ack, REFUSED_V4,
        "decided under the config in force at CONNECT, where no anchor issued the leaf"
    );
    let line = broker.wait_line("refused at CONNECT").await;
    assert!(line.contains("unknown_issuer"), "{line}");
}

#[tokio::test]
async fn resumed_tls_of_a_certificate_that_expired_since_is_refused_at_connect() {
    let fx = Fixture::new();
    let path = config(&fx, &Fixture::fleet_anchor(true));
    let broker = Proc::start(&fx, &path).await;
    // Valid for a few more seconds only.
    let (leaf, not_after) = fx.short_lived_device("dev-1.devices.example.com", 4);
    // One ClientConfig for both connections: its session cache holds the ticket.
    let client = fx.client(&leaf);
    let (ack, tls) = client
        .raw_first_packet(broker.mqtt, &RawConnect::new(V::V4, "d").bytes())
        .await
        .expect("TLS and CONNACK while valid");
    assert_eq!(ack, ACCEPTED_V4, "admitted while valid");
    drop(tls);

    // Past notAfter (X.509 times are whole seconds).
    let expired = not_after + time::Duration::seconds(1);
    let wait = (expired - time::OffsetDateTime::now_utc()).whole_milliseconds();
    tokio::time::sleep(Duration::from_millis(wait.max(0) as u64)).await;

    let (ack, tls) = client
        .raw_first_packet(broker.mqtt, &RawConnect::new(V::V4, "d").bytes())
        .await
        .expect("TLS resumes; the refusal is at CONNECT");
    assert_eq!(
        tls.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "the verifier did not run: only the CONNECT admission can refuse"
    );
    assert_eq!(ack, REFUSED_V4, "an expired certificate is refused");
}

#[tokio::test]
async fn resumed_tls_of_a_disabled_device_is_refused_at_connect() {
    let fx = Fixture::new();
    let path = config(&fx, &Fixture::fleet_anchor(true));
    let broker = Proc::start(&fx, &path).await;
    let client = fx.client(&fx.device("dev-1.devices.example.com"));
    let (ack, tls) = client
        .raw_first_packet(broker.mqtt, &RawConnect::new(V::V4, "d").bytes())
        .await
        .expect("TLS and CONNACK");
    assert_eq!(ack, ACCEPTED_V4, "provisioned");
    drop(tls);

    // Another process disables it; the CONNECT right after must see it.
    let run = certmq(
        fx.dir.path(),
        &["devices", "disable", "dev-1", "--config", arg(&path)],
    );
    assert_eq!(run.code, Some(0), "{run:#?}");
    let (ack, tls) = client
        .raw_first_packet(broker.mqtt, &RawConnect::new(V::V4, "d").bytes())
        .await
        .expect("TLS resumes; the refusal is at CONNECT");
    assert_eq!(
        tls.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    assert_eq!(ack, REFUSED_V4, "a disabled device is refused");
}

#[tokio::test]
async fn a_full_handshake_then_connect_is_logged_with_the_documented_fields() {
    let fx = Fixture::new();
    let path = config(&fx, &Fixture::fleet_anchor(true));
    let mut broker = Proc::start(&fx, &path).await;
    let client = fx.client(&fx.device("dev-1.devices.example.com"));
    let (ack, tls) = client
        .raw_first_packet(broker.mqtt, &RawConnect::new(V::V4, "d").bytes())
        .await
        .expect("TLS and CONNACK");
    assert_eq!(ack, ACCEPTED_V4);
    drop(tls);
    let line = broker.wait_line("accepted at CONNECT").await;
    for field in [
        "peer=127.0.0.1:",
        "fingerprint=",
        "rule=\"anchor:fleet\"",
        "device=\"dev-1\"",
        "client_id=\"d\"",
        "result=\"accepted\"",
        "reason=Provisioned",
    ] {
        assert!(line.contains(field), "{field} in {line}");
    }
}
