//! Hostile client chains for the pre-authentication work bounds (contract §3 "Bounded work
//! before authentication"): certificates that cost nothing to make and, before the
//! hardening, made webpki's path search enumerate permutations of same-named CAs.
//!
//! Shared by `tests/hardening.rs` and `benches/hostile.rs` (included there by `#[path]`),
//! so the benchmark measures exactly what the tests assert on. Only rcgen: no certmq type.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;

/// A chain a client can present: the leaf first, and the PKCS#8 PEM key of the leaf (so a
/// real TLS client can sign its CertificateVerify with it).
pub struct HostileChain {
    pub certs: Vec<CertificateDer<'static>>,
    /// The same certificates as PEM, leaf first.
    pub pem: String,
    pub key_pem: String,
}

impl HostileChain {
    fn new(certs: &[rcgen::Certificate], key_pem: String) -> HostileChain {
        HostileChain {
            certs: certs.iter().map(|c| c.der().clone()).collect(),
            pem: certs.iter().map(|c| c.pem()).collect(),
            key_pem,
        }
    }

    /// Total DER bytes.
    pub fn bytes(&self) -> usize {
        self.certs.iter().map(|c| c.len()).sum()
    }
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// An issuer that signs in the name of `cn` with a fresh key: what an attacker can do
/// without any CA's key. The signatures never verify under the real CA's key.
fn forger(cn: &str) -> Issuer<'static, KeyPair> {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    Issuer::new(params, KeyPair::generate().expect("key"))
}

/// A CA certificate with subject `subject`, issued in the name of `issuer`.
fn bogus_ca(subject: &str, issuer: &str) -> rcgen::Certificate {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.distinguished_name = name(subject);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    params.signed_by(&key, &forger(issuer)).expect("bogus CA")
}

/// A device leaf with this CN, issued in the name of `issuer`.
fn bogus_leaf(cn: &str, issuer: &str) -> (rcgen::Certificate, String) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.distinguished_name = name(cn);
    params.is_ca = IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &forger(issuer)).expect("bogus leaf");
    (cert, key.serialize_pem())
}

/// `n` certificates (`n >= 2`): a leaf issued in the name "Hostile CA", then `n - 1` CA
/// certificates. All but the last `anchors.len()` are named "Hostile CA" and issued by
/// "Hostile CA" (distinct keys, so RFC 4158 loop detection by name and key never stops the
/// permutations); the last ones are named "Hostile CA" and issued in the name of each
/// anchor, so that every anchor is a candidate issuer. Nothing in it validates.
pub fn same_subject_chain(n: usize, anchor_subject_cns: &[&str]) -> HostileChain {
    let (leaf, key_pem) = bogus_leaf("victim.devices.example.com", "Hostile CA");
    let mut certs = vec![leaf];
    let cas = n.saturating_sub(1);
    let to_anchors = anchor_subject_cns.len().min(cas);
    for _ in 0..cas - to_anchors {
        certs.push(bogus_ca("Hostile CA", "Hostile CA"));
    }
    for anchor in anchor_subject_cns.iter().take(to_anchors) {
        certs.push(bogus_ca("Hostile CA", anchor));
    }
    HostileChain::new(&certs, key_pem)
}

/// A chain of `n` certificates that looks like a leaf under an anchor: the leaf is issued
/// in the name of the anchor `anchor_cn`, followed by `n - 1` certificates named like that
/// anchor (forged, each with its own key): every one is a candidate issuer of every other.
pub fn anchor_named_chain(n: usize, anchor_cn: &str) -> HostileChain {
    let (leaf, key_pem) = bogus_leaf("victim.devices.example.com", anchor_cn);
    let mut certs = vec![leaf];
    for _ in 1..n {
        certs.push(bogus_ca(anchor_cn, anchor_cn));
    }
    HostileChain::new(&certs, key_pem)
}

/// Eight certificates offering ten candidate paths to the anchor `anchor_cn`, more than
/// a handshake may try: a leaf issued in the name "Hostile A", two CAs named "Hostile A"
/// issued by "Hostile B", and five named "Hostile B" issued in the anchor's name.
pub fn layered_chain(anchor_cn: &str) -> HostileChain {
    let (leaf, key_pem) = bogus_leaf("victim.devices.example.com", "Hostile A");
    let mut certs = vec![leaf];
    for _ in 0..2 {
        certs.push(bogus_ca("Hostile A", "Hostile B"));
    }
    for _ in 0..5 {
        certs.push(bogus_ca("Hostile B", anchor_cn));
    }
    HostileChain::new(&certs, key_pem)
}
