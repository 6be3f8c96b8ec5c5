//! Checks certmq adds on a path webpki has validated, because webpki does not make them
//! (SPEC 3 "Hardening of steps 3-6"). Pure functions over [`CertInfo`].

use super::policy::AnchorFailure;
use crate::cert::CertInfo;

/// keyUsage, which webpki ignores for path validation: a leaf that has the extension must
/// allow digitalSignature (its key signs the TLS handshake); every CA on the path, the
/// anchor included, that has it must allow keyCertSign (else it may not issue
/// certificates, RFC 5280 4.2.1.3). `cas` runs from the leaf's issuer to the anchor.
pub fn key_usage(leaf: &CertInfo, cas: &[&CertInfo]) -> Result<(), AnchorFailure> {
    if leaf.digital_signature == Some(false) {
        return Err(AnchorFailure::LeafKeyUsage);
    }
    match cas.iter().find(|c| matches!(c.key_usage, Some((false, _)))) {
        Some(ca) => Err(AnchorFailure::IssuerKeyUsage {
            ca: ca.subject.clone(),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::{DnsConstraints, Fingerprint, Validity};

    fn ca(key_usage: Option<(bool, bool)>, dns: Option<DnsConstraints>) -> CertInfo {
        CertInfo {
            fingerprint: Fingerprint::of(b"ca"),
            validity: Validity {
                not_before: 0,
                not_after: i64::MAX,
            },
            subject: "CN=Site A CA".to_owned(),
            subject_der: Vec::new(),
            issuer_der: Vec::new(),
            is_ca: true,
            path_len: None,
            key_usage,
            digital_signature: None,
            self_issued: false,
            spki_der: Vec::new(),
            subject_key_id: None,
            authority_key_id: None,
            dns_constraints: dns,
        }
    }

    #[test]
    fn key_usage_of_the_leaf_and_of_every_ca() {
        let mut leaf = ca(None, None);
        leaf.is_ca = false;
        let signing = ca(Some((true, true)), None);
        let no_ku = ca(None, None);
        let not_signing = ca(Some((false, true)), None);
        assert!(key_usage(&leaf, &[&signing, &no_ku]).is_ok());
        assert!(matches!(
            key_usage(&leaf, &[&signing, &not_signing]),
            Err(AnchorFailure::IssuerKeyUsage { .. })
        ));
        leaf.digital_signature = Some(false);
        assert!(matches!(
            key_usage(&leaf, &[&signing]),
            Err(AnchorFailure::LeafKeyUsage)
        ));
        leaf.digital_signature = Some(true);
        assert!(key_usage(&leaf, &[&signing]).is_ok());
    }
}
