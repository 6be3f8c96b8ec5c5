//! Facts about one X.509 certificate that certmq needs outside path validation: its
//! SHA-256 fingerprint (the pinned strategy and the registry key on it), its validity
//! period, its subject for display, and its CA properties (config validation of anchors).
//!
//! Path validation itself is webpki's job (see `tls::policy`); this module only reads.

use std::fmt;
use std::sync::{Arc, OnceLock};

use ring::digest;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::UnixTime;
use x509_parser::extensions::{GeneralName, GeneralSubtree, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The process's crypto provider (ring): the TLS server, the verifier and the config's
/// key check all use this one.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Why a certificate could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The DER does not parse as an X.509 certificate.
    #[error("not a valid X.509 certificate")]
    Parse(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// Bytes followed the certificate inside its DER blob.
    #[error("{0} unexpected bytes after the certificate")]
    TrailingBytes(usize),
}

/// SHA-256 of a certificate's DER: the identity of a pinned certificate and of the
/// certificate a device is bound to in the registry. A newtype so that a fingerprint is
/// never confused with another hex string, and is always printed in lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Fingerprint of a certificate's DER encoding.
    pub fn of(der: &[u8]) -> Fingerprint {
        let d = digest::digest(&digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }

    /// Parses the lowercase or uppercase hex form (as stored in the registry).
    pub fn from_hex(s: &str) -> Option<Fingerprint> {
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Fingerprint(out))
    }

    /// Lowercase hex, as contract §1 prints it.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.to_hex())
    }
}

/// A validity period in seconds since the Unix epoch. Kept as plain seconds because both
/// the registry (SQLite integers) and rustls (`UnixTime`) speak in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// notBefore, seconds since the epoch (may be negative for very old certificates).
    pub not_before: i64,
    /// notAfter, seconds since the epoch.
    pub not_after: i64,
}

impl Validity {
    /// Where `now` falls relative to the period.
    pub fn check(&self, now: UnixTime) -> Result<(), ValidityError> {
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        if now < self.not_before {
            Err(ValidityError::NotYetValid)
        } else if now > self.not_after {
            Err(ValidityError::Expired)
        } else {
            Ok(())
        }
    }
}

/// The two ways a certificate can be outside its validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ValidityError {
    #[error("certificate expired")]
    Expired,
    #[error("certificate not yet valid")]
    NotYetValid,
}

/// What certmq reads from one certificate, parsed once at load time.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub fingerprint: Fingerprint,
    pub validity: Validity,
    /// The subject as an RFC 4514-style string, for operators.
    pub subject: String,
    /// The issuer, the same way (refusal lines and `explain` name it).
    pub issuer: String,
    /// The raw DER of the subject Name, to compare with issuers byte for byte.
    pub subject_der: Vec<u8>,
    /// The raw DER of the issuer Name.
    pub issuer_der: Vec<u8>,
    /// basicConstraints cA.
    pub is_ca: bool,
    /// basicConstraints pathLenConstraint, when present.
    pub path_len: Option<u32>,
    /// keyUsage, when the extension is present: (keyCertSign, cRLSign).
    pub key_usage: Option<(bool, bool)>,
    /// keyUsage digitalSignature, when the extension is present (a device's TLS key signs
    /// the handshake, so a leaf whose keyUsage lacks it is refused; contract §3 hardening).
    pub digital_signature: Option<bool>,
    /// Whether subject and issuer are the same name (a root or a self-signed leaf).
    pub self_issued: bool,
    /// The DER of the SubjectPublicKeyInfo: with the subject, what identifies a CA when its
    /// certificate shows up inside a client's chain.
    pub spki_der: Vec<u8>,
    /// subjectKeyIdentifier, when present.
    pub subject_key_id: Option<Vec<u8>>,
    /// authorityKeyIdentifier keyIdentifier, when present: with the issuer name, it picks
    /// the candidate issuers of this certificate before any signature is checked.
    pub authority_key_id: Option<Vec<u8>>,
    /// The dNSName subtrees of a nameConstraints extension, when it has any.
    pub dns_constraints: Option<DnsConstraints>,
}

/// The DNS part of a CA's nameConstraints (RFC 5280 4.2.1.10), as written in the
/// certificate. Only what certmq checks itself: webpki applies name constraints to SANs
/// only, never to the Common Name from which an anchor derives the device name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsConstraints {
    /// permittedSubtrees of type dNSName; empty means no DNS restriction.
    pub permitted: Vec<String>,
    /// excludedSubtrees of type dNSName.
    pub excluded: Vec<String>,
}

impl DnsConstraints {
    /// Whether `name` (a DNS name, any case) is inside the subtrees: in no excluded one,
    /// and in a permitted one when there are any. A subtree `example.com` holds
    /// `example.com` and every name under it; `.example.com` only the names under it
    /// (RFC 5280 4.2.1.10 and the reading webpki and OpenSSL share).
    pub fn permits(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let within = |base: &String| dns_within(&name, base);
        !self.excluded.iter().any(within)
            && (self.permitted.is_empty() || self.permitted.iter().any(within))
    }
}

/// `name` is `base` or a name under it (labels compared whole, case-insensitively).
fn dns_within(name: &str, base: &str) -> bool {
    let base = base.trim_end_matches('.').to_ascii_lowercase();
    if base.is_empty() {
        // An empty dNSName constraint matches every name.
        return true;
    }
    if let Some(suffix) = base.strip_prefix('.') {
        return name.len() > suffix.len() + 1
            && name.ends_with(suffix)
            && name.as_bytes()[name.len() - suffix.len() - 1] == b'.';
    }
    name == base
        || (name.len() > base.len()
            && name.ends_with(&base)
            && name.as_bytes()[name.len() - base.len() - 1] == b'.')
}

impl CertInfo {
    /// Reads the facts from a certificate's DER.
    pub fn from_der(der: &[u8]) -> Result<CertInfo, CertError> {
        let (rest, cert) = X509Certificate::from_der(der).map_err(CertError::Parse)?;
        if !rest.is_empty() {
            return Err(CertError::TrailingBytes(rest.len()));
        }
        Ok(Self::from_parsed(der, &cert))
    }

    fn from_parsed(der: &[u8], cert: &X509Certificate<'_>) -> CertInfo {
        let (is_ca, path_len) = match cert.basic_constraints() {
            Ok(Some(bc)) => (bc.value.ca, bc.value.path_len_constraint),
            _ => (false, None),
        };
        let (key_usage, digital_signature) = match cert.key_usage() {
            Ok(Some(ku)) => (
                Some((ku.value.key_cert_sign(), ku.value.crl_sign())),
                Some(ku.value.digital_signature()),
            ),
            _ => (None, None),
        };
        let mut subject_key_id = None;
        let mut authority_key_id = None;
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => subject_key_id = Some(id.0.to_vec()),
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    authority_key_id = aki.key_identifier.as_ref().map(|id| id.0.to_vec());
                }
                _ => {}
            }
        }
        let subject_der = cert.subject().as_raw().to_vec();
        let issuer_der = cert.issuer().as_raw().to_vec();
        CertInfo {
            fingerprint: Fingerprint::of(der),
            validity: Validity {
                not_before: cert.validity().not_before.timestamp(),
                not_after: cert.validity().not_after.timestamp(),
            },
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            self_issued: subject_der == issuer_der,
            subject_der,
            issuer_der,
            is_ca,
            path_len,
            key_usage,
            digital_signature,
            spki_der: cert.public_key().raw.to_vec(),
            subject_key_id,
            authority_key_id,
            dns_constraints: dns_constraints(cert),
        }
    }
}

/// The dNSName subtrees of the certificate's nameConstraints, if it has any. An extension
/// that does not parse is left to webpki, which refuses it on any CA it validates.
fn dns_constraints(cert: &X509Certificate<'_>) -> Option<DnsConstraints> {
    let nc = cert.name_constraints().ok()??;
    let dns = |trees: &Option<Vec<GeneralSubtree<'_>>>| -> Vec<String> {
        trees
            .iter()
            .flatten()
            .filter_map(|t| match t.base {
                GeneralName::DNSName(d) => Some(d.to_owned()),
                _ => None,
            })
            .collect()
    };
    let out = DnsConstraints {
        permitted: dns(&nc.value.permitted_subtrees),
        excluded: dns(&nc.value.excluded_subtrees),
    };
    (!out.permitted.is_empty() || !out.excluded.is_empty()).then_some(out)
}

/// A key identifier as `openssl x509 -text` prints it (`3A:5F:...`), so that operators can
/// compare the two.
pub fn key_id(id: &[u8]) -> String {
    id.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Formats seconds since the epoch as RFC 3339 (UTC), as the CLI and JSON print times.
pub fn rfc3339(secs: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => t
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| secs.to_string()),
        Err(_) => secs.to_string(),
    }
}

/// The current time in seconds since the epoch.
pub fn now_secs() -> i64 {
    i64::try_from(UnixTime::now().as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_hex_round_trip() {
        let f = Fingerprint::of(b"hello");
        let hex = f.to_hex();
        assert_eq!(
            hex,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(Fingerprint::from_hex(&hex), Some(f));
        assert_eq!(Fingerprint::from_hex(&hex.to_uppercase()), Some(f));
        assert_eq!(Fingerprint::from_hex("zz"), None);
        assert_eq!(Fingerprint::from_hex(&"é".repeat(32)), None);
    }

    #[test]
    fn validity_edges() {
        let v = Validity {
            not_before: 100,
            not_after: 200,
        };
        assert_eq!(
            v.check(UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                99
            ))),
            Err(ValidityError::NotYetValid)
        );
        assert_eq!(
            v.check(UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                100
            ))),
            Ok(())
        );
        assert_eq!(
            v.check(UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                200
            ))),
            Ok(())
        );
        assert_eq!(
            v.check(UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                201
            ))),
            Err(ValidityError::Expired)
        );
    }

    #[test]
    fn dns_constraints_match_whole_labels() {
        let c = DnsConstraints {
            permitted: vec!["site-a.example".into(), ".fleet.example".into()],
            excluded: vec!["hq.site-a.example".into()],
        };
        assert!(c.permits("site-a.example"));
        assert!(c.permits("meter-1.site-a.example"));
        assert!(c.permits("METER-1.Site-A.Example."));
        assert!(
            !c.permits("evilsite-a.example"),
            "a label suffix is not a subtree"
        );
        assert!(!c.permits("ceo-phone.example"));
        assert!(
            !c.permits("fleet.example"),
            "a leading dot excludes the base itself"
        );
        assert!(c.permits("x.fleet.example"));
        assert!(!c.permits("hq.site-a.example"));
        assert!(!c.permits("ceo.hq.site-a.example"));
        let only_excluded = DnsConstraints {
            permitted: vec![],
            excluded: vec!["hq.example".into()],
        };
        assert!(only_excluded.permits("plant.example"));
        assert!(!only_excluded.permits("a.hq.example"));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(CertInfo::from_der(b"not a certificate").is_err());
    }
}
