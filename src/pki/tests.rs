//! What the builder produces, parsed back with x509-parser and verified with webpki (the
//! verifier the broker uses), so that a fixture is known to be what its name says.

use std::net::{IpAddr, Ipv4Addr};

use rcgen::ExtendedKeyUsagePurpose;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use webpki::{
    BorrowedCertRevocationList, CertRevocationList, KeyUsage, RevocationCheckDepth,
    RevocationOptionsBuilder,
};
use x509_parser::certificate::X509Certificate;

use super::*;

/// Verifies `leaf` for `usage` with `anchor` as the only trust anchor, `intermediates` as
/// the rest of the chain sent, and, when `crl_pems` is not empty, revocation of the leaf.
pub(super) fn verify(
    leaf: &[u8],
    anchor: &[u8],
    intermediates: &[&[u8]],
    usage: KeyUsage,
    crl_pems: &[&str],
) -> Result<(), webpki::Error> {
    let anchor_der = CertificateDer::from(anchor);
    let anchors = [webpki::anchor_from_trusted_cert(&anchor_der)?];
    let leaf_der = CertificateDer::from(leaf);
    let end_entity = webpki::EndEntityCert::try_from(&leaf_der)?;
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|d| CertificateDer::from(*d))
        .collect();
    let crl_ders: Vec<CertificateRevocationListDer<'_>> = crl_pems
        .iter()
        .map(|pem| CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).unwrap())
        .collect();
    let crls = crl_ders
        .iter()
        .map(|der| BorrowedCertRevocationList::from_der(der).map(CertRevocationList::from))
        .collect::<Result<Vec<_>, _>>()?;
    let crl_refs: Vec<&CertRevocationList<'_>> = crls.iter().collect();
    let revocation = (!crl_refs.is_empty()).then(|| {
        RevocationOptionsBuilder::new(&crl_refs)
            .unwrap()
            .with_depth(RevocationCheckDepth::EndEntity)
            .build()
    });
    end_entity
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            UnixTime::now(),
            usage,
            revocation,
            None,
        )
        .map(|_| ())
}

pub(super) fn parse(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    assert!(rest.is_empty());
    cert
}

pub(super) fn common_names(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject()
        .iter_common_name()
        .map(|cn| cn.as_str().unwrap().to_owned())
        .collect()
}

/// Big-endian bytes without leading zeros, as DER integers hold a positive serial.
fn minimal_be(serial: u64) -> Vec<u8> {
    let bytes = serial.to_be_bytes();
    let first = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len() - 1);
    bytes[first..].to_vec()
}

fn root() -> Ca {
    Ca::root("Test Root", Validity::days(-1, 30)).unwrap()
}

#[test]
fn leaf_has_zero_one_or_two_common_names() {
    let ca = root();
    for names in [
        vec![],
        vec!["dev-1".to_owned()],
        vec!["dev-1".to_owned(), "admin".to_owned()],
    ] {
        let spec = LeafSpec {
            common_names: names.clone(),
            ..LeafSpec::device("unused")
        };
        let issued = ca.issue(&spec).unwrap();
        assert_eq!(common_names(&parse(&issued.cert_der)), names);
    }
}

#[test]
fn three_common_names_are_refused() {
    let spec = LeafSpec {
        common_names: vec!["a".into(), "b".into(), "c".into()],
        ..LeafSpec::device("unused")
    };
    let err = root().issue(&spec).unwrap_err();
    assert!(
        matches!(err, PkiError::TooManyCommonNames { count: 3 }),
        "{err}"
    );
}

#[test]
fn organization_is_in_the_subject() {
    let spec = LeafSpec {
        organization: Some("Acme".into()),
        ..LeafSpec::device("dev-1")
    };
    let issued = root().issue(&spec).unwrap();
    let cert = parse(&issued.cert_der);
    let orgs: Vec<&str> = cert
        .subject()
        .iter_organization()
        .map(|o| o.as_str().unwrap())
        .collect();
    assert_eq!(orgs, ["Acme"]);
}

#[test]
fn eku_is_written_only_when_asked() {
    let ca = root();
    let with = ca.issue(&LeafSpec::device("dev-1")).unwrap();
    let cert = parse(&with.cert_der);
    let eku = cert.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.client_auth);
    assert!(!eku.value.server_auth);

    let without = ca
        .issue(&LeafSpec {
            eku: None,
            ..LeafSpec::device("dev-1")
        })
        .unwrap();
    assert!(parse(&without.cert_der)
        .extended_key_usage()
        .unwrap()
        .is_none());
}

#[test]
fn validity_dates_are_written_to_the_second() {
    let validity = Validity::days(-10, -1);
    let spec = LeafSpec {
        validity,
        ..LeafSpec::device("dev-1")
    };
    let issued = root().issue(&spec).unwrap();
    let cert = parse(&issued.cert_der);
    assert_eq!(
        cert.validity().not_before.to_datetime(),
        validity.not_before
    );
    assert_eq!(cert.validity().not_after.to_datetime(), validity.not_after);
    assert_eq!(
        validity.not_after - validity.not_before,
        Duration::days(9),
        "days() counts from one instant"
    );
}

#[test]
fn validity_saturates_instead_of_panicking() {
    let validity = Validity::days(i64::MIN, i64::MAX);
    assert!(validity.not_before < validity.not_after);
}

/// (CA flag, path length) from the basic constraints extension, `None` when absent.
fn basic_constraints(der: &[u8]) -> Option<(bool, Option<u32>)> {
    let cert = parse(der);
    let bc = cert.basic_constraints().unwrap()?;
    Some((bc.value.ca, bc.value.path_len_constraint))
}

#[test]
fn ca_flags_and_path_length() {
    let root = root();
    assert_eq!(basic_constraints(&root.cert_der()), Some((true, None)));

    let constrained = root
        .intermediate("Test Devices", Validity::days(-1, 30), Some(0))
        .unwrap();
    assert_eq!(
        basic_constraints(&constrained.cert_der()),
        Some((true, Some(0)))
    );

    let free = root
        .intermediate("Test Other", Validity::days(-1, 30), None)
        .unwrap();
    assert_eq!(basic_constraints(&free.cert_der()), Some((true, None)));

    let leaf = constrained.issue(&LeafSpec::device("dev-1")).unwrap();
    assert_eq!(basic_constraints(&leaf.cert_der), Some((false, None)));

    let ca_leaf = constrained
        .issue(&LeafSpec {
            is_ca: true,
            ..LeafSpec::device("dev-1")
        })
        .unwrap();
    assert_eq!(basic_constraints(&ca_leaf.cert_der), Some((true, None)));
}

#[test]
fn path_length_zero_forbids_a_sub_ca() {
    let root = root();
    let constrained = root
        .intermediate("Test Devices", Validity::days(-1, 30), Some(0))
        .unwrap();
    let sub = constrained
        .intermediate("Test Sub", Validity::days(-1, 30), None)
        .unwrap();
    let leaf = sub.issue(&LeafSpec::device("dev-1")).unwrap();
    let chain = [constrained.cert_der(), sub.cert_der()];
    let chain: Vec<&[u8]> = chain.iter().map(Vec::as_slice).collect();
    let err = verify(
        &leaf.cert_der,
        &root.cert_der(),
        &chain,
        KeyUsage::client_auth(),
        &[],
    )
    .unwrap_err();
    assert_eq!(err, webpki::Error::PathLenConstraintViolated);
}

#[test]
fn serial_is_the_one_asked_for_or_a_positive_derived_one() {
    let ca = root();
    let fixed = ca
        .issue(&LeafSpec {
            serial: Some(4242),
            ..LeafSpec::device("dev-1")
        })
        .unwrap();
    assert_eq!(fixed.serial, 4242);
    assert_eq!(parse(&fixed.cert_der).raw_serial(), minimal_be(4242));

    let derived = ca.issue(&LeafSpec::device("dev-1")).unwrap();
    let other = ca.issue(&LeafSpec::device("dev-1")).unwrap();
    assert_ne!(derived.serial, 0);
    assert_ne!(derived.serial, other.serial);
    assert_eq!(
        parse(&derived.cert_der).raw_serial(),
        minimal_be(derived.serial)
    );
    assert_eq!(parse(&ca.cert_der()).raw_serial(), minimal_be(ca.serial()));
}

#[test]
fn key_is_pkcs8_and_matches_the_certificate() {
    let issued = root().issue(&LeafSpec::device("dev-1")).unwrap();
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    assert!(matches!(key, PrivateKeyDer::Pkcs8(_)));
    let pair = KeyPair::from_pem(&issued.key_pem).unwrap();
    let cert = parse(&issued.cert_der);
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        pair.public_key_raw()
    );
    let pem_der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
    assert_eq!(pem_der.as_ref(), issued.cert_der.as_slice());
}

#[test]
fn leaf_chains_to_its_intermediate_as_sole_anchor() {
    let root = root();
    let devices = root
        .intermediate("Test Devices", Validity::days(-1, 30), Some(0))
        .unwrap();
    let leaf = devices.issue(&LeafSpec::device("dev-1")).unwrap();
    verify(
        &leaf.cert_der,
        &devices.cert_der(),
        &[],
        KeyUsage::client_auth(),
        &[],
    )
    .unwrap();
    // Through the root, the intermediate sent along.
    verify(
        &leaf.cert_der,
        &root.cert_der(),
        &[&devices.cert_der()],
        KeyUsage::client_auth(),
        &[],
    )
    .unwrap();
    // The root's other intermediates are not trusted by trusting this one.
    let other = root
        .intermediate("Test Other", Validity::days(-1, 30), None)
        .unwrap();
    let stranger = other.issue(&LeafSpec::device("dev-2")).unwrap();
    let err = verify(
        &stranger.cert_der,
        &devices.cert_der(),
        &[&other.cert_der()],
        KeyUsage::client_auth(),
        &[],
    )
    .unwrap_err();
    assert_eq!(err, webpki::Error::UnknownIssuer);
}

#[test]
fn fixtures_fail_the_way_their_names_say() {
    let ca = root();
    let anchor = ca.cert_der();
    let check = |spec: LeafSpec| {
        let leaf = ca.issue(&spec).unwrap();
        verify(&leaf.cert_der, &anchor, &[], KeyUsage::client_auth(), &[])
    };
    let expired = check(LeafSpec {
        validity: Validity::days(-10, -1),
        ..LeafSpec::device("dev-1")
    });
    assert!(matches!(expired, Err(webpki::Error::CertExpired { .. })));
    let future = check(LeafSpec {
        validity: Validity::days(1, 10),
        ..LeafSpec::device("dev-1")
    });
    assert!(matches!(future, Err(webpki::Error::CertNotValidYet { .. })));
    let server_eku = check(LeafSpec {
        eku: Some(vec![ExtendedKeyUsagePurpose::ServerAuth]),
        ..LeafSpec::device("dev-1")
    });
    assert!(matches!(
        server_eku,
        Err(webpki::Error::RequiredEkuNotFoundContext(_))
    ));
    let ca_leaf = check(LeafSpec {
        is_ca: true,
        ..LeafSpec::device("dev-1")
    });
    assert_eq!(ca_leaf, Err(webpki::Error::CaUsedAsEndEntity));
    // contract §3: no EKU extension at all is acceptable for a client.
    check(LeafSpec {
        eku: None,
        ..LeafSpec::device("dev-1")
    })
    .unwrap();
}

#[test]
fn self_signed_leaf_is_its_own_issuer() {
    let pinned = self_signed(&LeafSpec::device("meter-7")).unwrap();
    let cert = parse(&pinned.cert_der);
    assert_eq!(cert.subject(), cert.issuer());
    assert_eq!(common_names(&cert), ["meter-7"]);
    let err = verify(
        &pinned.cert_der,
        &root().cert_der(),
        &[],
        KeyUsage::client_auth(),
        &[],
    )
    .unwrap_err();
    assert_eq!(err, webpki::Error::UnknownIssuer);
}

#[test]
fn server_certificate_names_its_hosts() {
    let ca = root();
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let server = ca
        .issue(&LeafSpec::server(&["localhost"], &[localhost]))
        .unwrap();
    let der = CertificateDer::from(server.cert_der.as_slice());
    let end_entity = webpki::EndEntityCert::try_from(&der).unwrap();
    for name in ["localhost", "127.0.0.1"] {
        let name = rustls_pki_types::ServerName::try_from(name).unwrap();
        end_entity.verify_is_valid_for_subject_name(&name).unwrap();
    }
    let other = rustls_pki_types::ServerName::try_from("127.0.0.2").unwrap();
    assert!(end_entity.verify_is_valid_for_subject_name(&other).is_err());
    verify(
        &server.cert_der,
        &ca.cert_der(),
        &[],
        KeyUsage::server_auth(),
        &[],
    )
    .unwrap();
}

#[test]
fn invalid_dns_name_is_an_error_naming_it() {
    let spec = LeafSpec::server(&["bad name\u{e9}"], &[]);
    let err = root().issue(&spec).unwrap_err();
    assert!(err.to_string().contains("bad name"), "{err}");
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn crl_lists_the_serials_and_is_signed_by_the_ca() {
    let ca = root();
    let revoked = ca
        .issue(&LeafSpec {
            serial: Some(7),
            ..LeafSpec::device("dev-1")
        })
        .unwrap();
    let kept = ca.issue(&LeafSpec::device("dev-2")).unwrap();
    let crl_pem = ca.crl(&[7, 99], Validity::days(-1, 7)).unwrap();

    let crl_der = CertificateRevocationListDer::from_pem_slice(crl_pem.as_bytes()).unwrap();
    let (_, crl) = x509_parser::parse_x509_crl(&crl_der).unwrap();
    let serials: Vec<&[u8]> = crl
        .iter_revoked_certificates()
        .map(|r| r.raw_serial())
        .collect();
    assert_eq!(serials, [minimal_be(7), minimal_be(99)]);
    assert_eq!(crl.issuer(), parse(&ca.cert_der()).subject());

    let anchor = ca.cert_der();
    let usage = KeyUsage::client_auth;
    assert_eq!(
        verify(&revoked.cert_der, &anchor, &[], usage(), &[&crl_pem]),
        Err(webpki::Error::CertRevoked)
    );
    verify(&kept.cert_der, &anchor, &[], usage(), &[&crl_pem]).unwrap();

    // A CRL under the same name but another key is rejected: the signature is checked.
    let impostor = Ca::root("Test Root", Validity::days(-1, 30)).unwrap();
    let forged = impostor.crl(&[7], Validity::days(-1, 7)).unwrap();
    assert_eq!(
        verify(&kept.cert_der, &anchor, &[], usage(), &[&forged]),
        Err(webpki::Error::InvalidCrlSignatureForPublicKey)
    );
}

#[test]
fn empty_crl_has_no_entries() {
    let ca = root();
    let validity = Validity::days(-1, 7);
    let crl_pem = ca.crl(&[], validity).unwrap();
    let crl_der = CertificateRevocationListDer::from_pem_slice(crl_pem.as_bytes()).unwrap();
    let (_, crl) = x509_parser::parse_x509_crl(&crl_der).unwrap();
    assert_eq!(crl.iter_revoked_certificates().count(), 0);
    assert_eq!(crl.last_update().to_datetime(), validity.not_before);
    assert_eq!(crl.next_update().unwrap().to_datetime(), validity.not_after);
}

#[test]
fn crl_with_empty_window_is_an_error() {
    let err = root().crl(&[], Validity::days(1, 1)).unwrap_err();
    assert!(matches!(err, PkiError::Generate { .. }), "{err}");
}

#[test]
fn chain_pem_is_leaf_then_intermediates() {
    let root = root();
    let devices = root
        .intermediate("Test Devices", Validity::days(-1, 30), Some(0))
        .unwrap();
    let leaf = devices.issue(&LeafSpec::device("dev-1")).unwrap();
    let chain = leaf.chain_pem(&[&devices]);
    let ders: Vec<CertificateDer<'_>> = CertificateDer::pem_slice_iter(chain.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(ders.len(), 2);
    assert_eq!(ders[0].as_ref(), leaf.cert_der.as_slice());
    assert_eq!(ders[1].as_ref(), devices.cert_der().as_slice());
}

#[test]
fn debug_output_hides_keys() {
    let ca = root();
    let leaf = ca.issue(&LeafSpec::device("dev-1")).unwrap();
    assert!(!format!("{ca:?}").contains("PRIVATE KEY"));
    assert!(!format!("{leaf:?}").contains("PRIVATE KEY"));
    assert!(leaf.key_pem.contains("PRIVATE KEY"));
}
