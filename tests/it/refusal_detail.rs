//! Refusals say enough (contract §1 `explain`, contract §3 step 4, contract §10): for a certificate no
//! anchor issued, `certmq explain` and the auth log line name its issuer and the configured
//! anchors, and `explain` says which anchor would have to be added (subject and key id, as
//! `openssl x509 -text` prints them); a certificate refused at TLS is logged with the name
//! of the device the registry binds it to.

use crate::common::ops::{config, Proc};
use crate::common::run::{arg, certmq};
use crate::common::{self_signed, Fixture, Outcome};
use certmq::cert::{key_id, CertInfo};
use certmq::pki::{Ca, LeafSpec, Validity};

/// A CA under the fixture root that no anchor trusts, and a device under it.
fn stranger_ca(fx: &Fixture) -> Ca {
    fx.root
        .intermediate("Other Fleet CA", Validity::days(-1, 365), None)
        .expect("CA")
}

fn ski(ca: &Ca) -> String {
    let info = CertInfo::from_der(&ca.cert_der()).expect("CA certificate");
    key_id(info.subject_key_id.as_deref().expect("rcgen writes a SKI"))
}

#[test]
fn explain_names_the_issuer_the_anchors_and_the_anchor_to_add() {
    let fx = Fixture::new();
    let path = fx.config(&Fixture::fleet_anchor(true));
    let other = stranger_ca(&fx);
    let dev = other
        .issue(&LeafSpec::device("d1.devices.example.com"))
        .expect("device");
    // The device sends its leaf and the CA above it: the root is then named too.
    let chain = fx.write("chain.pem", &dev.chain_pem(&[&other]));
    let run = certmq(
        fx.dir.path(),
        &["explain", "--config", arg(&path), "--cert", arg(&chain)],
    );
    assert_eq!(run.code, Some(1), "{run:#?}");
    let fleet = ski(&fx.fleet);
    for line in [
        "1. certificate: subject CN=d1.devices.example.com, issuer CN=Other Fleet CA,".to_owned(),
        format!(
            "4. no anchor issued this chain: the certificate was issued by CN=Other Fleet CA (key id {})",
            ski(&other)
        ),
        format!("   configured anchors: fleet = CN=Test Fleet CA (key id {fleet})"),
        format!(
            "   to accept it, add an [[anchor]] whose certificate is CN=Other Fleet CA (key id {}), or one above it that the chain names: CN=Test Root CA (key id {})",
            ski(&other),
            ski(&fx.root)
        ),
    ] {
        assert!(run.stdout.contains(&line), "{line:?} not in:\n{}", run.stdout);
    }
    let run = certmq(
        fx.dir.path(),
        &[
            "explain",
            "--json",
            "--config",
            arg(&path),
            "--cert",
            arg(&chain),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(v["reason_code"], "unknown_issuer");
    assert_eq!(v["issuer"], "CN=Other Fleet CA");
    assert_eq!(v["anchors"][0]["name"], "fleet");
    assert_eq!(v["anchors"][0]["key_id"], fleet.as_str());
    assert_eq!(v["missing_anchor"][0]["subject"], "CN=Other Fleet CA");
    assert_eq!(v["missing_anchor"][0]["key_id"], ski(&other).as_str());
    assert_eq!(v["missing_anchor"][1]["subject"], "CN=Test Root CA");
}

#[test]
fn explain_says_to_pin_a_self_signed_certificate() {
    let fx = Fixture::new();
    let path = fx.config(&Fixture::fleet_anchor(true));
    let meter = self_signed("meter-7");
    let cert = fx.write("meter.pem", &meter.cert_pem);
    let run = certmq(
        fx.dir.path(),
        &["explain", "--config", arg(&path), "--cert", arg(&cert)],
    );
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(
        run.stdout.contains(
            "4. no anchor issued this chain: the certificate is self-signed (CN=meter-7)"
        ),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("to accept it, pin it: a [[device]] entry"),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn the_tls_refusal_line_names_the_issuer_the_anchors_and_the_device() {
    let fx = Fixture::new();
    let d1 = fx.device("d1.devices.example.com");
    let path = config(&fx, &Fixture::fleet_anchor(true));
    let mut broker = Proc::start(&fx, &path).await;
    // A stranger: issuer and anchors named, no device.
    let other = stranger_ca(&fx);
    let stranger = other
        .issue(&LeafSpec::device("s.devices.example.com"))
        .expect("device");
    fx.client(&stranger)
        .connect_v5(broker.mqtt, "s")
        .await
        .assert_tls_alert("UnknownCA");
    let line = broker.wait_line("refused at TLS").await;
    for field in [
        "reason=\"unknown_issuer\"",
        "issuer=\"CN=Other Fleet CA\"",
        "anchors=\"fleet\"",
        "device=\"-\"",
    ] {
        assert!(line.contains(field), "{field} not in {line}");
    }
    // d1 is provisioned, then revoked: its refusal names it.
    assert_eq!(
        fx.client(&d1).connect_v5(broker.mqtt, "d1").await,
        Outcome::Accepted
    );
    fx.write(
        "fleet.crl",
        &fx.fleet
            .crl(&[d1.serial], Validity::days(-1, 30))
            .expect("CRL"),
    );
    config(
        &fx,
        &format!("{}crl = \"fleet.crl\"\n", Fixture::fleet_anchor(true)),
    );
    broker.reload().await.expect("reloaded");
    fx.client(&d1)
        .connect_v5(broker.mqtt, "d1")
        .await
        .assert_tls_alert("CertificateRevoked");
    let line = broker.wait_line("refused at TLS").await;
    for field in [
        "reason=\"revoked\"",
        "device=\"d1\"",
        "issuer=\"CN=Test Fleet CA\"",
    ] {
        assert!(line.contains(field), "{field} not in {line}");
    }
    assert!(!line.contains("anchors="), "{line}");
}
