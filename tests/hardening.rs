//! SPEC 3 "Hardening of steps 3-6", end to end: a real broker on 127.0.0.1:0, real TLS
//! clients, certificates built per test. One test per refusal reason; each asserts the TLS
//! alert the client receives and the reason counted in `certmq_auth_refusals_total`.
//!
//! `certmq::pki` builds the usual, well-formed PKI; the hostile properties here (a CA
//! without keyCertSign, name constraints, a leaf without digitalSignature, bogus issuers)
//! are made with rcgen directly, signed by the fixture's CAs.

mod common;

use certmq::pki::{LeafSpec, Validity};
use common::{hostile, registry, Broker, Client, Fixture, Outcome};

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
    fx.config(&Fixture::fleet_anchor(true));
    let long = hostile::same_subject_chain(9, &["Test Fleet CA"]);
    let layered = hostile::layered_chain("Test Fleet CA");
    for (pem, code, words) in [
        (
            long.pem.clone(),
            "chain_too_long",
            "the client sent 9 certificates",
        ),
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
