//! contract §3 end to end: a real broker on 127.0.0.1:0, real MQTT clients (rumqttc) over
//! mutual TLS, one test per acceptance path and per refusal reason, each with its own
//! fixture certificates.

use crate::common::coretests::raw::RawConnect;
use crate::common::coretests::V;
use crate::common::{registry, self_signed, Broker, Client, Fixture, Outcome};
use certmq::pki::{LeafSpec, Validity};
use rcgen::ExtendedKeyUsagePurpose;

const NOT_AUTHORIZED_V4: u8 = 5;
const NOT_AUTHORIZED_V5: u8 = 0x87;

async fn fleet_broker(fx: &Fixture, create: bool) -> Broker {
    Broker::start(&fx.config(&Fixture::fleet_anchor(create))).await
}

// ---------------------------------------------------------------- accepted

#[tokio::test]
async fn accepts_chain_with_intermediate_and_provisions() {
    let fx = Fixture::new();
    let broker = fleet_broker(&fx, true).await;
    let dev = fx.device("dev-001.devices.example.com");
    let out = fx
        .client_with_chain(&dev)
        .connect_v4(broker.addr, "c1", true)
        .await;
    assert_eq!(out, Outcome::Accepted);
    let d = registry(&fx).get("dev-001").unwrap().expect("provisioned");
    assert_eq!(d.source.as_str(), "fleet");
    assert_eq!(d.fingerprint, certmq::cert::Fingerprint::of(&dev.cert_der));
    assert_eq!(broker.metrics.devices_provisioned.get(), 1);
}

#[tokio::test]
async fn accepts_leaf_alone_when_the_anchor_issued_it() {
    let fx = Fixture::new();
    let broker = fleet_broker(&fx, true).await;
    let dev = fx.device("dev-002.devices.example.com");
    assert_eq!(
        fx.client(&dev).connect_v5(broker.addr, "c1").await,
        Outcome::Accepted
    );
}

#[tokio::test]
async fn names_the_device_from_group_one() {
    let fx = Fixture::new();
    let broker = fleet_broker(&fx, true).await;
    let dev = fx.device("sensor-9.devices.example.com");
    assert_eq!(
        fx.client(&dev).connect_v4(broker.addr, "c", true).await,
        Outcome::Accepted
    );
    assert!(registry(&fx).get("sensor-9").unwrap().is_some());
    assert!(registry(&fx)
        .get("sensor-9.devices.example.com")
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn names_the_device_from_the_whole_match_without_a_group() {
    let fx = Fixture::new();
    let cfg = "[[anchor]]\nname = \"fleet\"\ncertificate = \"fleet.pem\"\ncn_regex = 'meter-[0-9]+'\ncreate_devices = true\n";
    let broker = Broker::start(&fx.config(cfg)).await;
    let dev = fx.device("building-a/meter-42/x");
    // The CN holds '/', but the name is only the match: "meter-42".
    assert_eq!(
        fx.client(&dev).connect_v4(broker.addr, "c", true).await,
        Outcome::Accepted
    );
    assert!(registry(&fx).get("meter-42").unwrap().is_some());
}

#[tokio::test]
async fn accepts_a_pinned_self_signed_certificate() {
    let fx = Fixture::new();
    let meter = self_signed("meter-7");
    fx.write("meter-7.pem", &meter.cert_pem);
    let cfg = "[[device]]\nname = \"meter-7\"\ncertificate = \"meter-7.pem\"\n";
    let broker = Broker::start(&fx.config(cfg)).await;
    let client = Client::new(&fx, &meter.cert_pem, &meter.key_pem);
    assert_eq!(
        client.connect_v4(broker.addr, "m", true).await,
        Outcome::Accepted
    );
    assert_eq!(client.connect_v5(broker.addr, "m").await, Outcome::Accepted);
    let d = registry(&fx)
        .get("meter-7")
        .unwrap()
        .expect("pinned device in registry");
    assert_eq!(d.source.as_str(), "pinned");
}

#[tokio::test]
async fn accepts_rotation_and_updates_the_fingerprint() {
    let fx = Fixture::new();
    let broker = fleet_broker(&fx, true).await;
    let mut old = LeafSpec::device("dev-rot.devices.example.com");
    old.validity = Validity::days(-5, 365);
    let old = fx.fleet.issue(&old).unwrap();
    let new = fx.device("dev-rot.devices.example.com");
    assert_eq!(
        fx.client(&old).connect_v4(broker.addr, "c", true).await,
        Outcome::Accepted
    );
    assert_eq!(
        fx.client(&new).connect_v4(broker.addr, "c", true).await,
        Outcome::Accepted
    );
    let d = registry(&fx).get("dev-rot").unwrap().unwrap();
    assert_eq!(d.fingerprint, certmq::cert::Fingerprint::of(&new.cert_der));
}

#[tokio::test]
async fn accepts_a_leaf_without_eku() {
    let fx = Fixture::new();
    let broker = fleet_broker(&fx, true).await;
    let mut spec = LeafSpec::device("no-eku.devices.example.com");
    spec.eku = None;
    let dev = fx.fleet.issue(&spec).unwrap();
    assert_eq!(
        fx.client(&dev).connect_v4(broker.addr, "c", true).await,
        Outcome::Accepted
    );
}

#[tokio::test]
async fn provisioned_device_survives_a_restart() {
    let fx = Fixture::new();
    let dev = fx.device("dev-keep.devices.example.com");
    let broker = fleet_broker(&fx, true).await;
    assert_eq!(
        fx.client(&dev).connect_v4(broker.addr, "c", true).await,
        Outcome::Accepted
    );
    broker.stop().await;
    // Restart with provisioning off: only a device that was kept can connect.
    let broker = fleet_broker(&fx, false).await;
    assert_eq!(
        fx.client(&dev).connect_v4(broker.addr, "c", true).await,
        Outcome::Accepted
    );
    let other = fx.device("dev-new.devices.example.com");
    assert_eq!(
        fx.client(&other).connect_v4(broker.addr, "c", true).await,
        Outcome::Refused(NOT_AUTHORIZED_V4)
    );
}

// ---------------------------------------------------------------- refused at TLS

#[tokio::test]
async fn refuses_no_certificate_at_tls() {
    let fx = Fixture::new();
    let broker = fleet_broker(&fx, true).await;
    Client::anonymous(&fx)
        .connect_v4(broker.addr, "c", true)
        .await
        .assert_tls_alert("CertificateRequired");
    assert_eq!(broker.metrics.refusals().get("no_certificate"), Some(&1));
}

#[tokio::test]
async fn refuses_an_unrelated_ca_at_tls() {
    let fx = Fixture::new();
    let broker = fleet_broker(&fx, true).await;
    let other = certmq::pki::Ca::root("Other Root", Validity::days(-1, 365)).unwrap();
    let dev = other
        .issue(&LeafSpec::device("dev-001.devices.example.com"))
        .unwrap();
    fx.client(&dev)
        .connect_v4(broker.addr, "c", true)
        .await
        .assert_tls_alert("UnknownCA");
    assert_eq!(broker.metrics.refusals().get("unknown_issuer"), Some(&1));
}

#[tokio::test]
async fn refuses_a_certificate_issued_by_the_root_when_only_the_intermediate_is_trusted() {
    let fx = Fixture::new();
    let broker = fleet_broker(&fx, true).await;
    let dev = fx
        .root
        .issue(&LeafSpec::device("dev-001.devices.example.com"))
        .unwrap();
    fx.client(&dev)
        .connect_v4(broker.addr, "c", true)
        .await
        .assert_tls_alert("UnknownCA");
}

#[tokio::test]
async fn refuses_an_expired_leaf_at_tls() {
    let fx = Fixture::new();
    let broker = fleet_broker(&fx, true).await;
    let mut spec = LeafSpec::device("old.devices.example.com");
    spec.validity = Validity::days(-30, -1);
    let dev = fx.fleet.issue(&spec).unwrap();
    fx.client(&dev)
        .connect_v4(broker.addr, "c", true)
        .await
        .assert_tls_alert("CertificateExpired");
    assert_eq!(broker.metrics.refusals().get("expired"), Some(&1));
}

#[tokio::test]
async fn refuses_a_not_yet_valid_leaf_at_tls() {
    let fx = Fixture::new();
    let broker = fleet_broker(&fx, true).await;
    let mut spec = LeafSpec::device("future.devices.example.com");
    spec.validity = Validity::days(2, 30);
    let dev = fx.fleet.issue(&spec).unwrap();
    fx.client(&dev)
        .connect_v4(broker.addr, "c", true)
        .await
        .assert_tls_alert("CertificateExpired");
    assert_eq!(broker.metrics.refusals().get("not_yet_valid"), Some(&1));
}

#[tokio::test]
async fn refuses_an_expired_intermediate_between_leaf_and_anchor() {
    let fx = Fixture::new();
    let broker = fleet_broker(&fx, true).await;
    let sub = fx
        .fleet
        .intermediate("Expired Sub CA", Validity::days(-30, -1), None)
        .unwrap();
    let dev = sub
        .issue(&LeafSpec::device("dev-sub.devices.example.com"))
        .unwrap();
    let client = Client::new(&fx, &dev.chain_pem(&[&sub]), &dev.key_pem);
    client
        .connect_v4(broker.addr, "c", true)
        .await
        .assert_tls_alert("CertificateExpired");
    // The same path with a valid sub-CA is accepted: the refusal is about expiry only.
    let sub_ok = fx
        .fleet
        .intermediate("Valid Sub CA", Validity::days(-1, 30), None)
        .unwrap();
    let dev_ok = sub_ok
        .issue(&LeafSpec::device("dev-sub2.devices.example.com"))
        .unwrap();
    let client = Client::new(&fx, &dev_ok.chain_pem(&[&sub_ok]), &dev_ok.key_pem);
    assert_eq!(
        client.connect_v4(broker.addr, "c", true).await,
        Outcome::Accepted
    );
}

#[tokio::test]
async fn refuses_a_server_auth_only_certificate_at_tls() {
    let fx = Fixture::new();
    let broker = fleet_broker(&fx, true).await;
    let mut spec = LeafSpec::device("srv.devices.example.com");
    spec.eku = Some(vec![ExtendedKeyUsagePurpose::ServerAuth]);
    let dev = fx.fleet.issue(&spec).unwrap();
    fx.client(&dev)
        .connect_v4(broker.addr, "c", true)
        .await
        .assert_tls_alert("UnsupportedCertificate");
    assert_eq!(broker.metrics.refusals().get("bad_key_usage"), Some(&1));
}

#[tokio::test]
async fn refuses_a_revoked_certificate_at_tls() {
    let fx = Fixture::new();
    let dev = fx.device("revoked.devices.example.com");
    let good = fx.device("good.devices.example.com");
    fx.write(
        "fleet.crl",
        &fx.fleet.crl(&[dev.serial], Validity::days(-1, 30)).unwrap(),
    );
    let cfg = format!("{}crl = \"fleet.crl\"\n", Fixture::fleet_anchor(true));
    let broker = Broker::start(&fx.config(&cfg)).await;
    fx.client(&dev)
        .connect_v4(broker.addr, "c", true)
        .await
        .assert_tls_alert("CertificateRevoked");
    assert_eq!(
        fx.client(&good).connect_v4(broker.addr, "c", true).await,
        Outcome::Accepted
    );
}

#[tokio::test]
async fn stale_crl_still_revokes_and_does_not_lock_out_everyone() {
    let fx = Fixture::new();
    let dev = fx.device("revoked.devices.example.com");
    let good = fx.device("good.devices.example.com");
    fx.write(
        "fleet.crl",
        &fx.fleet
            .crl(&[dev.serial], Validity::days(-10, -1))
            .unwrap(),
    );
    let cfg = format!("{}crl = \"fleet.crl\"\n", Fixture::fleet_anchor(true));
    let broker = Broker::start(&fx.config(&cfg)).await;
    fx.client(&dev)
        .connect_v4(broker.addr, "c", true)
        .await
        .assert_tls_alert("CertificateRevoked");
    assert_eq!(
        fx.client(&good).connect_v4(broker.addr, "c", true).await,
        Outcome::Accepted
    );
}

#[tokio::test]
async fn refuses_a_self_signed_certificate_with_the_subject_of_a_pinned_one() {
    let fx = Fixture::new();
    let meter = self_signed("meter-7");
    let impostor = self_signed("meter-7");
    fx.write("meter-7.pem", &meter.cert_pem);
    let cfg = format!(
        "{}[[device]]\nname = \"meter-7\"\ncertificate = \"meter-7.pem\"\n",
        Fixture::fleet_anchor(true)
    );
    let broker = Broker::start(&fx.config(&cfg)).await;
    Client::new(&fx, &impostor.cert_pem, &impostor.key_pem)
        .connect_v4(broker.addr, "c", true)
        .await
        .assert_tls_alert("UnknownCA");
}

#[tokio::test]
async fn refuses_an_expired_pinned_certificate_at_tls() {
    let fx = Fixture::new();
    let mut spec = LeafSpec::device("meter-8");
    spec.validity = Validity::days(-30, -1);
    let meter = certmq::pki::self_signed(&spec).unwrap();
    fx.write("meter-8.pem", &meter.cert_pem);
    let cfg = format!(
        "{}[[device]]\nname = \"meter-8\"\ncertificate = \"meter-8.pem\"\n",
        Fixture::fleet_anchor(true)
    );
    let broker = Broker::start(&fx.config(&cfg)).await;
    Client::new(&fx, &meter.cert_pem, &meter.key_pem)
        .connect_v4(broker.addr, "c", true)
        .await
        .assert_tls_alert("CertificateExpired");
}

// ---------------------------------------------------------------- refused at CONNECT

/// Asserts the CONNECT refusal in both protocol versions.
async fn assert_refused_at_connect(fx: &Fixture, broker: &Broker, client: &Client) {
    assert_eq!(
        client.connect_v4(broker.addr, "c", true).await,
        Outcome::Refused(NOT_AUTHORIZED_V4)
    );
    assert_eq!(
        client.connect_v5(broker.addr, "c").await,
        Outcome::Refused(NOT_AUTHORIZED_V5)
    );
    let _ = fx;
}

#[tokio::test]
async fn refuses_a_regex_miss_at_connect() {
    let fx = Fixture::new();
    let broker = fleet_broker(&fx, true).await;
    let dev = fx.device("dev-001.elsewhere.example.com");
    assert_refused_at_connect(&fx, &broker, &fx.client(&dev)).await;
    assert_eq!(broker.metrics.refusals().get("regex_miss"), Some(&2));
}

#[tokio::test]
async fn refuses_names_with_topic_characters_at_connect() {
    let fx = Fixture::new();
    let broker = fleet_broker(&fx, true).await;
    for cn in [
        "x/#.devices.example.com",
        "a+b.devices.example.com",
        "#.devices.example.com",
        "$SYS.devices.example.com",
    ] {
        let dev = fx.device(cn);
        assert_refused_at_connect(&fx, &broker, &fx.client(&dev)).await;
    }
    assert_eq!(broker.metrics.refusals().get("invalid_name"), Some(&8));
    assert!(
        registry(&fx).list().unwrap().is_empty(),
        "nothing provisioned"
    );
}

#[tokio::test]
async fn refuses_a_certificate_without_cn_at_connect() {
    let fx = Fixture::new();
    let broker = fleet_broker(&fx, true).await;
    let mut spec = LeafSpec::device("unused");
    spec.common_names = vec![];
    spec.organization = Some("No CN Inc".into());
    let dev = fx.fleet.issue(&spec).unwrap();
    assert_refused_at_connect(&fx, &broker, &fx.client(&dev)).await;
    assert_eq!(broker.metrics.refusals().get("no_common_name"), Some(&2));
}

#[tokio::test]
async fn refuses_a_certificate_with_two_cns_at_connect() {
    let fx = Fixture::new();
    let broker = fleet_broker(&fx, true).await;
    let mut spec = LeafSpec::device("a.devices.example.com");
    spec.common_names = vec![
        "a.devices.example.com".into(),
        "b.devices.example.com".into(),
    ];
    let dev = fx.fleet.issue(&spec).unwrap();
    assert_refused_at_connect(&fx, &broker, &fx.client(&dev)).await;
    assert_eq!(
        broker.metrics.refusals().get("multiple_common_names"),
        Some(&2)
    );
}

#[tokio::test]
async fn refuses_an_unknown_device_when_the_anchor_does_not_create() {
    let fx = Fixture::new();
    let broker = fleet_broker(&fx, false).await;
    let dev = fx.device("dev-001.devices.example.com");
    assert_refused_at_connect(&fx, &broker, &fx.client(&dev)).await;
    assert_eq!(broker.metrics.refusals().get("unknown_device"), Some(&2));
    assert!(registry(&fx).get("dev-001").unwrap().is_none());
}

#[tokio::test]
async fn refuses_a_disabled_device_at_connect() {
    let fx = Fixture::new();
    let broker = fleet_broker(&fx, true).await;
    let dev = fx.device("dev-001.devices.example.com");
    assert_eq!(
        fx.client(&dev).connect_v4(broker.addr, "c", true).await,
        Outcome::Accepted
    );
    registry(&fx).set_enabled("dev-001", false).unwrap();
    assert_refused_at_connect(&fx, &broker, &fx.client(&dev)).await;
    assert_eq!(broker.metrics.refusals().get("disabled"), Some(&2));
    registry(&fx).set_enabled("dev-001", true).unwrap();
    assert_eq!(
        fx.client(&dev).connect_v4(broker.addr, "c", true).await,
        Outcome::Accepted
    );
}

#[tokio::test]
async fn refuses_a_cross_anchor_takeover_at_connect() {
    let fx = Fixture::new();
    let other = fx
        .root
        .intermediate("Test Other Fleet CA", Validity::days(-1, 365), None)
        .unwrap();
    fx.write("other.pem", &other.cert_pem());
    let cfg = format!(
        "{}\n[[anchor]]\nname = \"other\"\ncertificate = \"other.pem\"\ncn_regex = '^(.+)\\.devices\\.example\\.com$'\ncreate_devices = true\n",
        Fixture::fleet_anchor(true)
    );
    let broker = Broker::start(&fx.config(&cfg)).await;
    let owner = fx.device("dev-001.devices.example.com");
    assert_eq!(
        fx.client(&owner).connect_v4(broker.addr, "c", true).await,
        Outcome::Accepted
    );
    let thief = other
        .issue(&LeafSpec::device("dev-001.devices.example.com"))
        .unwrap();
    assert_refused_at_connect(&fx, &broker, &fx.client(&thief)).await;
    assert_eq!(broker.metrics.refusals().get("bound_elsewhere"), Some(&2));
    assert_eq!(
        registry(&fx)
            .get("dev-001")
            .unwrap()
            .unwrap()
            .source
            .as_str(),
        "fleet"
    );
}

#[tokio::test]
async fn refuses_a_superseded_certificate_after_rotation() {
    let fx = Fixture::new();
    let broker = fleet_broker(&fx, true).await;
    let mut old = LeafSpec::device("dev-rot.devices.example.com");
    old.validity = Validity::days(-5, 365);
    let old = fx.fleet.issue(&old).unwrap();
    let new = fx.device("dev-rot.devices.example.com");
    assert_eq!(
        fx.client(&old).connect_v4(broker.addr, "c", true).await,
        Outcome::Accepted
    );
    assert_eq!(
        fx.client(&new).connect_v4(broker.addr, "c", true).await,
        Outcome::Accepted
    );
    assert_refused_at_connect(&fx, &broker, &fx.client(&old)).await;
    assert_eq!(broker.metrics.refusals().get("superseded"), Some(&2));
    // The new certificate keeps working.
    assert_eq!(
        fx.client(&new).connect_v5(broker.addr, "c").await,
        Outcome::Accepted
    );
}

#[tokio::test]
async fn a_pinned_match_wins_over_an_anchor() {
    let fx = Fixture::new();
    // A certificate under the fleet anchor, also pinned under another name.
    let dev = fx.device("dev-001.devices.example.com");
    fx.write("pinned.pem", &dev.cert_pem);
    let cfg = format!(
        "{}[[device]]\nname = \"special\"\ncertificate = \"pinned.pem\"\n",
        Fixture::fleet_anchor(true)
    );
    let broker = Broker::start(&fx.config(&cfg)).await;
    assert_eq!(
        fx.client(&dev).connect_v4(broker.addr, "c", true).await,
        Outcome::Accepted
    );
    assert!(registry(&fx).get("dev-001").unwrap().is_none());
    assert_eq!(
        registry(&fx)
            .get("special")
            .unwrap()
            .unwrap()
            .source
            .as_str(),
        "pinned"
    );
}

#[tokio::test]
async fn the_nearest_anchor_wins() {
    let fx = Fixture::new();
    // Anchors: the root (listed first) and the fleet intermediate. A device under the fleet
    // validates to both; the fleet is nearer, so the device is bound to it.
    let cfg = format!(
        "[[anchor]]\nname = \"root\"\ncertificate = \"root.pem\"\ncn_regex = '^(.+)\\.devices\\.example\\.com$'\ncreate_devices = true\n\n{}",
        Fixture::fleet_anchor(true)
    );
    let broker = Broker::start(&fx.config(&cfg)).await;
    let dev = fx.device("near.devices.example.com");
    assert_eq!(
        fx.client_with_chain(&dev)
            .connect_v4(broker.addr, "c", true)
            .await,
        Outcome::Accepted
    );
    assert_eq!(
        registry(&fx).get("near").unwrap().unwrap().source.as_str(),
        "fleet"
    );
}

// ---------------------------------------------------------------- client identifiers

#[tokio::test]
async fn empty_client_id_with_persistent_session_gets_code_2_in_v311() {
    let fx = Fixture::new();
    let broker = fleet_broker(&fx, true).await;
    let dev = fx.device("dev-001.devices.example.com");
    // rumqttc will not even send this CONNECT, so it goes out as raw bytes.
    let answer = fx
        .client(&dev)
        .raw(
            broker.addr,
            &RawConnect {
                clean: false,
                ..RawConnect::new(V::V4, "")
            }
            .bytes(),
        )
        .await
        .unwrap();
    assert_eq!(
        answer,
        vec![0x20, 0x02, 0x00, 0x02],
        "CONNACK return code 2"
    );
    assert_eq!(
        fx.client(&dev).connect_v4(broker.addr, "", true).await,
        Outcome::Accepted
    );
}

#[tokio::test]
async fn v5_refusal_carries_reason_0x87_and_a_reason_string() {
    let fx = Fixture::new();
    let broker = fleet_broker(&fx, false).await;
    let dev = fx.device("dev-001.devices.example.com");
    let answer = fx
        .client(&dev)
        .raw(broker.addr, &RawConnect::new(V::V5, "c1").bytes())
        .await
        .unwrap();
    assert_eq!(&answer[..1], &[0x20], "a CONNACK: {answer:02x?}");
    assert_eq!(answer[3], 0x87, "reason code: {answer:02x?}");
    assert_eq!(
        answer[5], 0x1f,
        "first property is the reason string: {answer:02x?}"
    );
    let text = String::from_utf8_lossy(&answer[8..]);
    assert!(
        text.contains("create_devices = false"),
        "reason string: {text}"
    );
}

#[tokio::test]
async fn v5_empty_client_id_is_assigned_one() {
    let fx = Fixture::new();
    let broker = fleet_broker(&fx, true).await;
    let dev = fx.device("dev-001.devices.example.com");
    let (ack, _conn) = fx
        .client(&dev)
        .raw_first_packet(broker.addr, &RawConnect::new(V::V5, "").bytes())
        .await
        .unwrap();
    assert_eq!(
        (ack[0], ack[3]),
        (0x20, 0x00),
        "successful CONNACK: {ack:02x?}"
    );
    // Property 0x12 (Assigned Client Identifier): a string starting "certmq-".
    let at = ack
        .iter()
        .position(|b| *b == 0x12)
        .expect("assigned client identifier");
    let len = u16::from_be_bytes([ack[at + 1], ack[at + 2]]) as usize;
    let id = std::str::from_utf8(&ack[at + 3..at + 3 + len]).unwrap();
    assert!(id.starts_with("certmq-"), "assigned id {id:?}");
}
