//! contract §3 "Hardening of steps 3-6", end to end: a real broker on 127.0.0.1:0, real TLS
//! clients, certificates built per test. One test per refusal reason; each asserts the TLS
//! alert the client receives and the reason counted in `certmq_auth_refusals_total`.
//!
//! `certmq::pki` builds the usual, well-formed PKI; the hostile properties here (a CA
//! without keyCertSign, name constraints, a leaf without digitalSignature, bogus issuers)
//! are made with rcgen directly, signed by the fixture's CAs.

use crate::common::{hostile, registry, Broker, Client, Fixture, Outcome};
use certmq::pki::{Ca, Issued, LeafSpec, Validity};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, SerialNumber,
};

// ---------------------------------------------------------------- bounded pre-auth work

/// Three anchors (fleet and plant intermediates, and their root), as in benches/hostile.rs.
fn three_anchors(fx: &Fixture) -> std::path::PathBuf {
    let plant = fx
        .root
        .intermediate("Test Plant CA", Validity::days(-1, 365), None)
        .unwrap();
    fx.write("plant.pem", &plant.cert_pem());
    let mut cfg = String::new();
    for name in ["fleet", "plant", "root"] {
        cfg.push_str(&format!(
            "[[anchor]]\nname = \"{name}\"\ncertificate = \"{name}.pem\"\ncn_regex = '^(.+)\\.devices\\.example\\.com$'\ncreate_devices = true\n\n"
        ));
    }
    fx.config(&cfg)
}

const ANCHOR_CNS: [&str; 3] = ["Test Fleet CA", "Test Plant CA", "Test Root CA"];

#[tokio::test]
async fn refuses_a_chain_of_more_than_eight_certificates_before_parsing_it() {
    let fx = Fixture::new();
    let broker = Broker::start(&three_anchors(&fx)).await;
    let chain = hostile::same_subject_chain(9, &ANCHOR_CNS);
    Client::new(&fx, &chain.pem, &chain.key_pem)
        .connect_v4(broker.addr, "c", true)
        .await
        .assert_tls_alert("AccessDenied");
    assert_eq!(broker.metrics.refusals().get("chain_too_long"), Some(&1));
}

#[tokio::test]
async fn refuses_a_chain_offering_more_paths_than_the_budget() {
    let fx = Fixture::new();
    let broker = Broker::start(&three_anchors(&fx)).await;
    let chain = hostile::layered_chain("Test Fleet CA");
    Client::new(&fx, &chain.pem, &chain.key_pem)
        .connect_v4(broker.addr, "c", true)
        .await
        .assert_tls_alert("AccessDenied");
    assert_eq!(broker.metrics.refusals().get("path_budget"), Some(&1));
    let config = certmq::config::Config::load(&fx.path("certmq.toml")).unwrap();
    let report =
        certmq::tls::policy::match_chain(&config, &chain.certs, rustls::pki_types::UnixTime::now());
    let work = &report.work;
    assert!(work.budget_exhausted, "{work:?}");
    assert_eq!(
        work.paths_tried,
        certmq::tls::path::MAX_CANDIDATE_PATHS,
        "{work:?}"
    );
    assert!(
        work.signatures <= certmq::tls::path::SIGNATURE_BUDGET,
        "{work:?}"
    );
}

#[test]
fn a_hostile_chain_of_eight_certificates_does_not_exhaust_path_search() {
    let fx = Fixture::new();
    let config = certmq::config::Config::load(&three_anchors(&fx)).unwrap();
    for (chain, candidates) in [
        // One candidate per anchor: the single CA issued in each anchor's name.
        (hostile::same_subject_chain(8, &ANCHOR_CNS), 3),
        // Only the leaf under the fleet anchor itself: a path never passes through a
        // certificate named like the anchor it ends at.
        (hostile::anchor_named_chain(8, "Test Fleet CA"), 1),
    ] {
        let report = certmq::tls::policy::match_chain(
            &config,
            &chain.certs,
            rustls::pki_types::UnixTime::now(),
        );
        let refusal = report.outcome.expect_err("nothing in it validates");
        // Before the hardening, webpki's own budget ran out (MaximumPathBuildCallsExceeded,
        // "invalid_certificate") after tens of thousands of path-building steps per anchor.
        assert!(
            ["bad_signature", "unknown_issuer"].contains(&refusal.label()),
            "{}: {refusal}",
            refusal.label()
        );
        let work = &report.work;
        assert_eq!(work.candidate_paths, candidates, "{work:?}");
        assert_eq!(work.paths_tried, candidates, "{work:?}");
        // Each path is one linear path: at most its certificates' signatures.
        assert!(work.signatures <= 2 * candidates as u32, "{work:?}");
        assert!(!work.budget_exhausted, "{work:?}");
    }
}

#[test]
fn all_anchors_share_one_budget_of_candidate_paths() {
    let fx = Fixture::new();
    let config = certmq::config::Config::load(&three_anchors(&fx)).unwrap();
    // Eight certificates: a leaf issued in the name "Hostile CA", then seven CAs named
    // "Hostile CA" issued in the names of the three anchors: 7 candidate paths, each costing
    // webpki a signature, all anchors together under one budget.
    let mut cns = Vec::new();
    for i in 0..7 {
        cns.push(ANCHOR_CNS[i % 3]);
    }
    let chain = hostile::same_subject_chain(8, &cns);
    let report =
        certmq::tls::policy::match_chain(&config, &chain.certs, rustls::pki_types::UnixTime::now());
    assert!(report.outcome.is_err());
    let work = &report.work;
    assert_eq!(work.candidate_paths, 7, "{work:?}");
    assert!(
        work.paths_tried <= certmq::tls::path::MAX_CANDIDATE_PATHS,
        "{work:?}"
    );
    assert!(
        work.signatures <= certmq::tls::path::SIGNATURE_BUDGET,
        "{work:?}"
    );
}

// ---------------------------------------------------------------- explain

/// `certmq explain` (the library behind it) on `chain`: the JSON reason code and the text.
fn explain(fx: &Fixture, chain_pem: &str) -> (String, String) {
    use rustls::pki_types::pem::PemObject;
    let config = certmq::config::Config::load(&fx.path("certmq.toml")).unwrap();
    let registry = certmq::registry::Registry::in_memory().unwrap();
    let chain: Vec<rustls::pki_types::CertificateDer<'static>> =
        rustls::pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let d = certmq::cli::explain(&config, &registry, &chain);
    let v = certmq::cli::explain_json(&config, &d);
    assert_eq!(v["decision"], "reject", "{v}");
    (
        v["reason_code"].as_str().unwrap_or_default().to_owned(),
        format!(
            "{}\n{}",
            v["reason"],
            certmq::cli::explain_steps(&config, &d).join("\n")
        ),
    )
}

#[test]
fn explain_names_each_hardening_reason_and_which_certificate() {
    let fx = Fixture::new();
    fx.config(&first_label_anchor());
    let fleet = issuer_of(&fx.fleet);
    let enc_only = leaf(
        &fleet,
        "enc.example",
        vec![KeyUsagePurpose::KeyEncipherment],
    );
    let no_sign = sub_ca(
        &fleet,
        "Not A Signing CA",
        vec![KeyUsagePurpose::DigitalSignature],
        None,
    );
    let under_no_sign = leaf(&no_sign.issuer, "x.example", vec![]);
    let site_a = sub_ca(
        &fleet,
        "Site A CA",
        CA_USAGES.to_vec(),
        Some(dns_permitted(&["site-a.example"])),
    );
    let rogue = leaf(&site_a.issuer, "ceo-phone.example", vec![]);
    let long = hostile::same_subject_chain(9, &["Test Fleet CA"]);
    let layered = hostile::layered_chain("Test Fleet CA");
    for (pem, code, words) in [
        (enc_only.cert_pem.clone(), "bad_key_usage", "the client certificate has a keyUsage extension without digitalSignature"),
        (format!("{}{}", under_no_sign.cert_pem, no_sign.cert_pem), "issuer_key_usage", "CA certificate CN=Not A Signing CA on the path has a keyUsage extension without keyCertSign"),
        (format!("{}{}", rogue.cert_pem, site_a.cert_pem), "name_constraint", "the common name \"ceo-phone.example\" is not a DNS name that the name constraints of CA CN=Site A CA permit"),
        (long.pem.clone(), "chain_too_long", "the client sent 9 certificates"),
        (layered.pem.clone(), "path_budget", "per-handshake budget"),
    ] {
        let (reason_code, text) = explain(&fx, &pem);
        assert_eq!(reason_code, code, "{text}");
        assert!(text.contains(words), "{code}: {text}");
    }
}

// ---------------------------------------------------------------- off the workers

/// The broker's own runtime flavor: the verifier moves its work off the worker with
/// `block_in_place` there (which would panic on the current-thread runtime of the other
/// tests), and both outcomes still reach the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifies_off_the_workers_on_a_multi_thread_runtime() {
    let fx = Fixture::new();
    let broker = Broker::start(&three_anchors(&fx)).await;
    let dev = fx.device("mt-1.devices.example.com");
    assert_eq!(
        fx.client_with_chain(&dev)
            .connect_v4(broker.addr, "c", true)
            .await,
        Outcome::Accepted
    );
    let chain = hostile::same_subject_chain(8, &ANCHOR_CNS);
    Client::new(&fx, &chain.pem, &chain.key_pem)
        .connect_v4(broker.addr, "c", true)
        .await
        .assert_tls_alert("DecryptError");
    assert_eq!(broker.metrics.refusals().get("bad_signature"), Some(&1));
}

// ---------------------------------------------------------------- every CRL on the path

#[tokio::test]
async fn refuses_a_leaf_revoked_by_an_intermediate_anchor_through_the_root_anchor() {
    let fx = Fixture::new();
    let dev = fx.device("revoked.devices.example.com");
    let good = fx.device("good.devices.example.com");
    fx.write(
        "fleet.crl",
        &fx.fleet.crl(&[dev.serial], Validity::days(-1, 30)).unwrap(),
    );
    // The root first in the file, without a CRL; the fleet intermediate with its CRL.
    let cfg = format!(
        "[[anchor]]\nname = \"root\"\ncertificate = \"root.pem\"\ncn_regex = '^(.+)\\.devices\\.example\\.com$'\ncreate_devices = true\n\n{}crl = \"fleet.crl\"\n",
        Fixture::fleet_anchor(true)
    );
    let broker = Broker::start(&fx.config(&cfg)).await;
    // Leaf plus the fleet certificate: a path to the root exists, through the fleet.
    fx.client_with_chain(&dev)
        .connect_v4(broker.addr, "c", true)
        .await
        .assert_tls_alert("CertificateRevoked");
    assert_eq!(broker.metrics.refusals().get("revoked"), Some(&1));
    assert!(registry(&fx).get("revoked").unwrap().is_none());
    // explain names the CRL: the root's path goes through the fleet, whose CRL lists it.
    let (code, text) = explain(&fx, &dev.chain_pem(&[&fx.fleet]));
    assert_eq!(code, "revoked", "{text}");
    assert!(
        text.contains("anchor root: fails [revoked]: revoked: listed by the CRL of anchor fleet"),
        "{text}"
    );
    // Control: an unrevoked sibling is accepted, bound to the nearest anchor.
    assert_eq!(
        fx.client_with_chain(&good)
            .connect_v4(broker.addr, "c", true)
            .await,
        Outcome::Accepted
    );
    assert_eq!(
        registry(&fx).get("good").unwrap().unwrap().source.as_str(),
        "fleet"
    );
}

#[tokio::test]
async fn refuses_a_sub_ca_revoked_by_the_intermediate_anchor_through_the_root_anchor() {
    let fx = Fixture::new();
    let sub = fx
        .fleet
        .intermediate("Revoked Sub CA", Validity::days(-1, 365), None)
        .unwrap();
    let dev = sub
        .issue(&LeafSpec::device("under-sub.devices.example.com"))
        .unwrap();
    fx.write(
        "fleet.crl",
        &fx.fleet
            .crl(&[sub.serial()], Validity::days(-1, 30))
            .unwrap(),
    );
    let cfg = format!(
        "[[anchor]]\nname = \"root\"\ncertificate = \"root.pem\"\ncn_regex = '^(.+)\\.devices\\.example\\.com$'\ncreate_devices = true\n\n{}crl = \"fleet.crl\"\n",
        Fixture::fleet_anchor(true)
    );
    let broker = Broker::start(&fx.config(&cfg)).await;
    Client::new(&fx, &dev.chain_pem(&[&sub, &fx.fleet]), &dev.key_pem)
        .connect_v4(broker.addr, "c", true)
        .await
        .assert_tls_alert("CertificateRevoked");
    assert_eq!(broker.metrics.refusals().get("revoked"), Some(&1));
}

// ---------------------------------------------------------------- hand-made CAs

/// A CA certificate made by hand, with the rcgen issuer that signs under it.
struct HandCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// The rcgen issuer of a fixture CA (its certificate and key, read back from PEM).
fn issuer_of(ca: &Ca) -> Issuer<'static, KeyPair> {
    let key = KeyPair::from_pem(&ca.key_pem()).expect("CA key");
    Issuer::from_ca_cert_pem(&ca.cert_pem(), key).expect("CA issuer")
}

fn serial() -> SerialNumber {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    SerialNumber::from(
        (nanos ^ NEXT.fetch_add(1, Ordering::Relaxed).rotate_left(40)) & 0x7fff_ffff_ffff_ffff,
    )
}

fn window(params: &mut CertificateParams) {
    let v = Validity::days(-1, 365);
    params.not_before = v.not_before;
    params.not_after = v.not_after;
}

/// A sub-CA under `parent` with these key usages and name constraints.
fn sub_ca(
    parent: &Issuer<'_, KeyPair>,
    cn: &str,
    key_usages: Vec<KeyUsagePurpose>,
    constraints: Option<NameConstraints>,
) -> HandCa {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = key_usages;
    params.name_constraints = constraints;
    params.serial_number = Some(serial());
    params.use_authority_key_identifier_extension = true;
    window(&mut params);
    let cert = params.signed_by(&key, parent).expect("sub-CA");
    HandCa {
        cert_pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A device certificate under `issuer`: this CN, these key usages (empty = no keyUsage
/// extension), EKU clientAuth, no SAN.
fn leaf(issuer: &Issuer<'_, KeyPair>, cn: &str, key_usages: Vec<KeyUsagePurpose>) -> Issued {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = key_usages;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let serial = serial();
    params.serial_number = Some(serial.clone());
    params.use_authority_key_identifier_extension = true;
    window(&mut params);
    let cert = params.signed_by(&key, issuer).expect("leaf");
    let bytes = serial.to_bytes();
    let mut n = [0u8; 8];
    n[8 - bytes.len().min(8)..].copy_from_slice(&bytes[bytes.len().saturating_sub(8)..]);
    Issued {
        cert_pem: cert.pem(),
        cert_der: cert.der().to_vec(),
        key_pem: key.serialize_pem(),
        serial: u64::from_be_bytes(n),
    }
}

fn chain_client(fx: &Fixture, leaf: &Issued, cas: &[&str]) -> Client {
    let mut pem = leaf.cert_pem.clone();
    for ca in cas {
        pem.push_str(ca);
    }
    Client::new(fx, &pem, &leaf.key_pem)
}
const CA_USAGES: [KeyUsagePurpose; 3] = [
    KeyUsagePurpose::KeyCertSign,
    KeyUsagePurpose::CrlSign,
    KeyUsagePurpose::DigitalSignature,
];

// ---------------------------------------------------------------- key usage

#[tokio::test]
async fn refuses_a_leaf_whose_key_usage_lacks_digital_signature() {
    let fx = Fixture::new();
    let broker = Broker::start(&fx.config(&Fixture::fleet_anchor(true))).await;
    let fleet = issuer_of(&fx.fleet);
    let bad = leaf(
        &fleet,
        "enc-only.devices.example.com",
        vec![KeyUsagePurpose::KeyEncipherment],
    );
    fx.client(&bad)
        .connect_v4(broker.addr, "c", true)
        .await
        .assert_tls_alert("UnsupportedCertificate");
    assert_eq!(broker.metrics.refusals().get("bad_key_usage"), Some(&1));
    // Controls: digitalSignature present, or no keyUsage extension at all, is accepted.
    for (cn, usages) in [
        (
            "sig.devices.example.com",
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ],
        ),
        ("no-ku.devices.example.com", vec![]),
    ] {
        let good = leaf(&fleet, cn, usages);
        assert_eq!(
            fx.client(&good).connect_v4(broker.addr, "c", true).await,
            Outcome::Accepted,
            "{cn}"
        );
    }
    assert!(registry(&fx).get("enc-only").unwrap().is_none());
}

#[tokio::test]
async fn refuses_a_device_issued_by_a_ca_without_key_cert_sign() {
    let fx = Fixture::new();
    let broker = Broker::start(&fx.config(&Fixture::fleet_anchor(true))).await;
    let fleet = issuer_of(&fx.fleet);
    let no_sign = sub_ca(
        &fleet,
        "Not A Signing CA",
        vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign],
        None,
    );
    let dev = leaf(
        &no_sign.issuer,
        "dev-ku.devices.example.com",
        vec![KeyUsagePurpose::DigitalSignature],
    );
    chain_client(&fx, &dev, &[&no_sign.cert_pem])
        .connect_v4(broker.addr, "c", true)
        .await
        .assert_tls_alert("UnsupportedCertificate");
    assert_eq!(broker.metrics.refusals().get("issuer_key_usage"), Some(&1));
    // Control: the same shape with keyCertSign is accepted.
    let signing = sub_ca(&fleet, "Signing Sub CA", CA_USAGES.to_vec(), None);
    let ok = leaf(
        &signing.issuer,
        "dev-ku2.devices.example.com",
        vec![KeyUsagePurpose::DigitalSignature],
    );
    assert_eq!(
        chain_client(&fx, &ok, &[&signing.cert_pem])
            .connect_v4(broker.addr, "c", true)
            .await,
        Outcome::Accepted
    );
}

fn dns_permitted(names: &[&str]) -> NameConstraints {
    NameConstraints {
        permitted_subtrees: names
            .iter()
            .map(|n| GeneralSubtree::DnsName((*n).to_owned()))
            .collect(),
        excluded_subtrees: Vec::new(),
    }
}

/// The fleet anchor with a regex that takes the first DNS label of any CN.
fn first_label_anchor() -> String {
    "[[anchor]]\nname = \"fleet\"\ncertificate = \"fleet.pem\"\ncn_regex = '^([a-z0-9-]+)'\ncreate_devices = true\n".to_owned()
}

// ---------------------------------------------------------------- name constraints

#[tokio::test]
async fn refuses_a_common_name_outside_the_name_constraints_of_a_sub_ca() {
    let fx = Fixture::new();
    let broker = Broker::start(&fx.config(&first_label_anchor())).await;
    let fleet = issuer_of(&fx.fleet);
    let site_a = sub_ca(
        &fleet,
        "Site A CA",
        CA_USAGES.to_vec(),
        Some(dns_permitted(&["site-a.example"])),
    );
    // The reproduction: permitted site-a.example, leaf CN ceo-phone.example, no SAN.
    let rogue = leaf(
        &site_a.issuer,
        "ceo-phone.example",
        vec![KeyUsagePurpose::DigitalSignature],
    );
    chain_client(&fx, &rogue, &[&site_a.cert_pem])
        .connect_v4(broker.addr, "c", true)
        .await
        .assert_tls_alert("BadCertificate");
    assert_eq!(broker.metrics.refusals().get("name_constraint"), Some(&1));
    // A CN that is not a DNS name at all cannot be inside a DNS subtree either.
    let spaced = leaf(
        &site_a.issuer,
        "meter 1",
        vec![KeyUsagePurpose::DigitalSignature],
    );
    chain_client(&fx, &spaced, &[&site_a.cert_pem])
        .connect_v4(broker.addr, "c", true)
        .await
        .assert_tls_alert("BadCertificate");
    assert_eq!(broker.metrics.refusals().get("name_constraint"), Some(&2));
    // Control: a CN inside the permitted subtree is accepted.
    let meter = leaf(
        &site_a.issuer,
        "meter-1.site-a.example",
        vec![KeyUsagePurpose::DigitalSignature],
    );
    assert_eq!(
        chain_client(&fx, &meter, &[&site_a.cert_pem])
            .connect_v4(broker.addr, "c", true)
            .await,
        Outcome::Accepted
    );
    assert!(registry(&fx).get("ceo-phone").unwrap().is_none());
}

#[tokio::test]
async fn refuses_a_common_name_in_an_excluded_subtree_of_the_anchor() {
    let fx = Fixture::new();
    // The anchor itself carries the constraint (an intermediate under the fixture root).
    let root = issuer_of(&fx.root);
    let anchor = sub_ca(
        &root,
        "Constrained Fleet CA",
        CA_USAGES.to_vec(),
        Some(NameConstraints {
            permitted_subtrees: Vec::new(),
            excluded_subtrees: vec![GeneralSubtree::DnsName("hq.example".to_owned())],
        }),
    );
    fx.write("fleet.pem", &anchor.cert_pem);
    let broker = Broker::start(&fx.config(&first_label_anchor())).await;
    let rogue = leaf(
        &anchor.issuer,
        "ceo-phone.hq.example",
        vec![KeyUsagePurpose::DigitalSignature],
    );
    fx.client(&rogue)
        .connect_v4(broker.addr, "c", true)
        .await
        .assert_tls_alert("BadCertificate");
    assert_eq!(broker.metrics.refusals().get("name_constraint"), Some(&1));
    let meter = leaf(
        &anchor.issuer,
        "meter-2.plant.example",
        vec![KeyUsagePurpose::DigitalSignature],
    );
    assert_eq!(
        fx.client(&meter).connect_v4(broker.addr, "c", true).await,
        Outcome::Accepted
    );
}
