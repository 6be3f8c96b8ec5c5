//! The ceiling for certmq's connect cost (contract §11): a bare rustls 0.23 (ring) TLS 1.3
//! handshake with client authentication, ECDSA P-256 on both sides, done in memory with
//! no network and no MQTT. Only the server side is timed: `accept` + processing the
//! client's flights, including verifying the client certificate with the same webpki
//! verifier rustls ships (one trust anchor, the leaf alone), which is what certmq's
//! verifier does plus the policy around it.
//!
//! `cargo bench --bench handshake [-- N]` (N handshakes, default 2000). Prints server
//! microseconds per handshake (mean and p50) and handshakes per second per core.

use std::sync::Arc;
use std::time::{Duration, Instant};

use certmq::pki::{Ca, LeafSpec, Validity};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConnection, RootCertStore, ServerConnection};

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let root = Ca::root("Handshake Root", Validity::days(-1, 30)).expect("root");
    let fleet = root
        .intermediate("Handshake Fleet", Validity::days(-1, 30), None)
        .expect("fleet");
    let server = root
        .issue(&LeafSpec::server(
            &["localhost"],
            &["127.0.0.1".parse().expect("ip")],
        ))
        .expect("server cert");
    let device = fleet
        .issue(&LeafSpec::device("bench-1.devices.example.com"))
        .expect("device");

    let mut anchors = RootCertStore::empty();
    anchors
        .add(CertificateDer::from(fleet.cert_der()))
        .expect("anchor");
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(anchors), provider.clone())
        .build()
        .expect("verifier");
    let server_config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from(server.cert_der.clone())],
                PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).expect("key"),
            )
            .expect("server config"),
    );
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(root.cert_der()))
        .expect("root");
    let mut client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from(device.cert_der.clone())],
            PrivateKeyDer::from_pem_slice(device.key_pem.as_bytes()).expect("key"),
        )
        .expect("client config");
    client_config.resumption = rustls::client::Resumption::disabled();
    let client_config = Arc::new(client_config);

    let mut server_times = Vec::with_capacity(n);
    for _ in 0..n {
        server_times.push(handshake(&client_config, &server_config));
    }
    server_times.sort();
    let total: Duration = server_times.iter().sum();
    let mean = total.as_secs_f64() * 1e6 / n as f64;
    let p50 = server_times[n / 2].as_secs_f64() * 1e6;
    println!(
        "bare rustls TLS 1.3 mTLS handshake, ECDSA P-256, ring, server side only, {n} handshakes"
    );
    println!("server_us_per_handshake_mean {mean:.1}");
    println!("server_us_per_handshake_p50 {p50:.1}");
    println!("handshakes_per_s_per_core {:.0}", 1e6 / mean);
}

/// One handshake in memory; returns the time spent in the server.
fn handshake(
    client_config: &Arc<rustls::ClientConfig>,
    server_config: &Arc<rustls::ServerConfig>,
) -> Duration {
    let name = ServerName::try_from("localhost").expect("name");
    let mut client = ClientConnection::new(client_config.clone(), name).expect("client");
    let mut server_time = Duration::ZERO;
    let started = Instant::now();
    let mut server = ServerConnection::new(server_config.clone()).expect("server");
    server_time += started.elapsed();
    let mut buf = Vec::with_capacity(8192);
    while client.is_handshaking() || server.is_handshaking() {
        buf.clear();
        client.write_tls(&mut buf).expect("client write");
        if !buf.is_empty() {
            let t = Instant::now();
            server.read_tls(&mut &buf[..]).expect("server read");
            server.process_new_packets().expect("server handshake");
            server_time += t.elapsed();
        }
        buf.clear();
        let t = Instant::now();
        server.write_tls(&mut buf).expect("server write");
        server_time += t.elapsed();
        if !buf.is_empty() {
            client.read_tls(&mut &buf[..]).expect("client read");
            client.process_new_packets().expect("client handshake");
        }
    }
    server_time
}
