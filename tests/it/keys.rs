//! contract §2: the server key may be PKCS#8, SEC1 or PKCS#1 PEM. rcgen writes PKCS#8 only, so
//! the other two forms are fixed files (tests/fixtures/keys, made with openssl).

use std::sync::Arc;

use crate::common::{Broker, Fixture, Outcome};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys");

/// A client that trusts the fixture's key-format root and presents a fleet device.
fn client(fx: &Fixture) -> crate::common::Client {
    let dev = fx.device("dev-1.devices.example.com");
    let root = CertificateDer::from_pem_file(format!("{FIXTURES}/root.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(dev.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_slice(dev.key_pem.as_bytes()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    crate::common::Client { tls: Arc::new(tls) }
}

async fn serves_with_key(form: &str, header: &str) {
    let fx = Fixture::new();
    let key = std::fs::read_to_string(format!("{FIXTURES}/server-{form}.key")).unwrap();
    assert!(key.starts_with(header), "fixture is {header}");
    fx.write("server.key", &key);
    fx.write(
        "server.pem",
        &std::fs::read_to_string(format!("{FIXTURES}/server-{form}.pem")).unwrap(),
    );
    let broker = Broker::start(&fx.config(&Fixture::fleet_anchor(true))).await;
    assert_eq!(
        client(&fx).connect_v4(broker.addr, "c", true).await,
        Outcome::Accepted
    );
    assert_eq!(
        client(&fx).connect_v5(broker.addr, "c").await,
        Outcome::Accepted
    );
}

#[tokio::test]
async fn serves_with_a_sec1_ec_key() {
    serves_with_key("sec1", "-----BEGIN EC PRIVATE KEY-----").await;
}

#[tokio::test]
async fn serves_with_a_pkcs1_rsa_key() {
    serves_with_key("pkcs1", "-----BEGIN RSA PRIVATE KEY-----").await;
}

#[test]
fn a_key_of_another_certificate_is_refused() {
    let fx = Fixture::new();
    fx.write(
        "server.key",
        &std::fs::read_to_string(format!("{FIXTURES}/server-pkcs1.key")).unwrap(),
    );
    fx.write(
        "server.pem",
        &std::fs::read_to_string(format!("{FIXTURES}/server-sec1.pem")).unwrap(),
    );
    let err = certmq::config::Config::load(&fx.config(&Fixture::fleet_anchor(true))).unwrap_err();
    let text: Vec<String> = err.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        text.iter()
            .any(|t| t.contains("server.private_key") && t.contains("does not match")),
        "{text:?}"
    );
}
