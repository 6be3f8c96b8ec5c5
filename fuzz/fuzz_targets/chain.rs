//! A client's certificate chain, as rustls hands it to the verifier, through the one entry
//! point that decides contract §3 steps 2 to 4: `policy::match_chain` (chain limits, parsing,
//! candidate paths by name and key identifier, webpki per path, key usage, name
//! constraints on the CN, CRLs). It must never panic, and its work stays within the
//! per-handshake budget whatever the bytes.
//!
//! Input framing, so that libFuzzer can grow chains: byte 0 is the number of certificates
//! (mod 11, so chains above the 8-certificate limit occur too); then each certificate is a
//! 2-byte big-endian length and that many bytes. A certificate of exactly 2 bytes starting
//! with 0xFF stands for one of the fixture's real certificates (byte 1 picks which), so
//! real paths and mutated ones mix.

#![no_main]

use std::sync::LazyLock;

use certmq::config::Config;
use certmq::pki::{Ca, LeafSpec, Validity};
use certmq::tls::{path, policy};
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::{CertificateDer, UnixTime};

/// A config with two anchors (root and fleet intermediate, the fleet with a CRL), and the
/// real certificates the input may refer to.
struct World {
    config: Config,
    certs: Vec<Vec<u8>>,
}

static WORLD: LazyLock<World> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("certmq-fuzz-chain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("fuzz dir");
    let root = Ca::root("Fuzz Root CA", Validity::days(-1, 3650)).expect("root");
    let fleet = root
        .intermediate("Fuzz Fleet CA", Validity::days(-1, 3650), None)
        .expect("fleet");
    let sub = fleet
        .intermediate("Fuzz Sub CA", Validity::days(-1, 3650), Some(0))
        .expect("sub");
    let server = root
        .issue(&LeafSpec::server(&["localhost"], &[]))
        .expect("server");
    let device = fleet
        .issue(&LeafSpec::device("dev-1.devices.example.com"))
        .expect("device");
    let deep = sub
        .issue(&LeafSpec::device("dev-2.devices.example.com"))
        .expect("deep device");
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).expect("write");
    write("server.pem", &server.cert_pem);
    write("server.key", &server.key_pem);
    write("root.pem", &root.cert_pem());
    write("fleet.pem", &fleet.cert_pem());
    write(
        "fleet.crl",
        &fleet
            .crl(&[sub.serial()], Validity::days(-1, 30))
            .expect("crl"),
    );
    write(
        "certmq.toml",
        "[server]\nbind = \"127.0.0.1:0\"\ncert_chain = \"server.pem\"\nprivate_key = \"server.key\"\ndata_dir = \"data\"\n\n\
         [[anchor]]\nname = \"root\"\ncertificate = \"root.pem\"\ncn_regex = '^(.+)\\.devices\\.example\\.com$'\n\n\
         [[anchor]]\nname = \"fleet\"\ncertificate = \"fleet.pem\"\ncn_regex = '^(.+)\\.devices\\.example\\.com$'\ncrl = \"fleet.crl\"\n",
    );
    let config = Config::load(&dir.join("certmq.toml")).expect("config");
    World {
        config,
        certs: vec![
            device.cert_der,
            deep.cert_der,
            fleet.cert_der(),
            sub.cert_der(),
            root.cert_der(),
        ],
    }
});

fuzz_target!(|data: &[u8]| {
    let world = &*WORLD;
    let Some((&count, mut rest)) = data.split_first() else {
        return;
    };
    let mut chain: Vec<CertificateDer<'_>> = Vec::new();
    for _ in 0..count % 11 {
        let [hi, lo, tail @ ..] = rest else { break };
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (der, after) = tail.split_at(len);
        rest = after;
        match der {
            [0xff, pick] => chain.push(CertificateDer::from(
                world.certs[usize::from(*pick) % world.certs.len()].as_slice(),
            )),
            _ => chain.push(CertificateDer::from(der)),
        }
    }
    let report = policy::match_chain(&world.config, &chain, UnixTime::now());
    assert!(report.work.signatures <= path::SIGNATURE_BUDGET);
    assert!(report.work.paths_tried <= path::MAX_CANDIDATE_PATHS);
    if let Err(refusal) = &report.outcome {
        let _ = (refusal.label(), refusal.to_rustls(), refusal.to_string());
    }
});
