//! Checks certmq adds on a path webpki has validated, because webpki does not make them
//! (contract §3 "Hardening of steps 3-6"). Pure functions over [`CertInfo`].

use rustls_pki_types::DnsName;

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

/// DNS name constraints bind the name: the anchor rule takes the device name from the CN,
/// and webpki applies name constraints to SANs only, so a CA constrained to
/// `site-a.example` could otherwise issue a device called `ceo-phone`. When any CA on the
/// path carries dNSName subtrees, the CN must be a DNS name inside all of them.
///
/// `cn` is None when the leaf has no single UTF-8 CN: step 5 refuses that device anyway,
/// with its own reason.
pub fn cn_name_constraints(cn: Option<&str>, cas: &[&CertInfo]) -> Result<(), AnchorFailure> {
    let Some(cn) = cn else { return Ok(()) };
    let is_dns_name = DnsName::try_from(cn).is_ok();
    for ca in cas {
        if let Some(constraints) = &ca.dns_constraints {
            if !is_dns_name || !constraints.permits(cn) {
                return Err(AnchorFailure::NameConstraint {
                    cn: cn.to_owned(),
                    ca: ca.subject.clone(),
                });
            }
        }
    }
    Ok(())
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
            issuer: "CN=Root".to_owned(),
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

    #[test]
    fn the_cn_must_be_a_permitted_dns_name_under_constrained_cas() {
        let site_a = ca(
            None,
            Some(DnsConstraints {
                permitted: vec!["site-a.example".into()],
                excluded: vec![],
            }),
        );
        let free = ca(None, None);
        assert!(cn_name_constraints(Some("meter-1.site-a.example"), &[&site_a, &free]).is_ok());
        assert!(matches!(
            cn_name_constraints(Some("ceo-phone.example"), &[&free, &site_a]),
            Err(AnchorFailure::NameConstraint { .. })
        ));
        assert!(
            cn_name_constraints(Some("meter 1"), &[&site_a]).is_err(),
            "not a DNS name"
        );
        assert!(cn_name_constraints(Some("meter 1"), &[&free]).is_ok());
        assert!(cn_name_constraints(None, &[&site_a]).is_ok());
    }
}
