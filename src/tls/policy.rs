//! SPEC 3 steps 2 to 4: which rule, if any, accepts a certificate chain.
//!
//! One function, [`match_chain`], answers the question for the three callers that ask it:
//! the rustls verifier during the handshake (refusals become TLS alerts), the admission at
//! CONNECT (step 8: every connection is checked again against the current config, including
//! resumed TLS sessions, for which rustls skips the verifier), and `certmq explain`, which
//! prints the per-anchor [`ChainReport`].
//!
//! Path validation is delegated to webpki with ONE anchor at a time as the only trust
//! anchor, which is what makes an intermediate anchor trust exactly its own subtree and not
//! its root's. We add only what webpki leaves out (NOTES.md): the anchor's own validity
//! period and path-length constraint, the choice of the nearest anchor, and pinning.

use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::{EndEntityCert, KeyUsage, RevocationCheckDepth, RevocationOptionsBuilder};

use crate::cert::{CertError, CertInfo, ValidityError};
use crate::config::{Anchor, Config, PinnedDevice};

/// The rule that accepted a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Index into `Config::devices`.
    Pinned(usize),
    /// Index into `Config::anchors`.
    Anchor(usize),
}

impl Rule {
    /// `pinned:NAME` or `anchor:NAME`, as logs and `explain --json` print it.
    pub fn label(&self, config: &Config) -> String {
        match *self {
            Rule::Pinned(i) => format!("pinned:{}", config.devices[i].name),
            Rule::Anchor(i) => format!("anchor:{}", config.anchors[i].name),
        }
    }
}

/// Why one anchor did not accept the chain.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AnchorFailure {
    /// No certificate in the chain names this anchor as issuer: webpki is not even asked.
    #[error("not an issuer of any certificate in the chain")]
    NotInChain,
    #[error("{}", describe_webpki(.0))]
    Path(webpki::Error),
    #[error("the anchor certificate itself is {0}")]
    AnchorValidity(ValidityError),
    #[error("path has {intermediates} intermediate(s) below the anchor, its pathLenConstraint allows {max}")]
    AnchorPathLen { intermediates: usize, max: u32 },
}

/// Why no rule accepted the chain (SPEC 3 step 4).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChainRefusal {
    #[error("no client certificate")]
    NoCertificate,
    #[error("client certificate cannot be parsed: {0}")]
    Malformed(String),
    #[error("pinned certificate of {device}: {error}")]
    Pinned {
        device: String,
        error: ValidityError,
    },
    #[error("no trust anchor is configured and the certificate is not pinned")]
    NoAnchors,
    #[error("anchor {anchor}: {failure}")]
    Anchor {
        anchor: String,
        failure: AnchorFailure,
    },
    #[error(
        "unknown issuer: no configured anchor issued this chain and the certificate is not pinned"
    )]
    UnknownIssuer,
}

impl ChainRefusal {
    /// A short, stable label for metrics and structured logs.
    pub fn label(&self) -> &'static str {
        match self {
            ChainRefusal::NoCertificate => "no_certificate",
            ChainRefusal::Malformed(_) => "bad_encoding",
            ChainRefusal::Pinned {
                error: ValidityError::Expired,
                ..
            } => "expired",
            ChainRefusal::Pinned {
                error: ValidityError::NotYetValid,
                ..
            } => "not_yet_valid",
            ChainRefusal::NoAnchors | ChainRefusal::UnknownIssuer => "unknown_issuer",
            ChainRefusal::Anchor { failure, .. } => match failure {
                AnchorFailure::NotInChain => "unknown_issuer",
                AnchorFailure::Path(e) => webpki_label(e),
                AnchorFailure::AnchorValidity(_) => "anchor_expired",
                AnchorFailure::AnchorPathLen { .. } => "path_constraint",
            },
        }
    }

    /// The rustls error whose alert tells the client why (SPEC 3 step 4).
    pub fn to_rustls(&self) -> rustls::Error {
        use rustls::CertificateError as C;
        let e = match self {
            ChainRefusal::NoCertificate => return rustls::Error::NoCertificatesPresented,
            ChainRefusal::Malformed(_) => C::BadEncoding,
            ChainRefusal::Pinned {
                error: ValidityError::Expired,
                ..
            } => C::Expired,
            ChainRefusal::Pinned {
                error: ValidityError::NotYetValid,
                ..
            } => C::NotValidYet,
            ChainRefusal::NoAnchors | ChainRefusal::UnknownIssuer => C::UnknownIssuer,
            ChainRefusal::Anchor { failure, .. } => match failure {
                AnchorFailure::NotInChain => C::UnknownIssuer,
                AnchorFailure::Path(e) => webpki_to_rustls(e),
                AnchorFailure::AnchorValidity(ValidityError::Expired) => C::Expired,
                AnchorFailure::AnchorValidity(ValidityError::NotYetValid) => C::NotValidYet,
                AnchorFailure::AnchorPathLen { .. } => C::ApplicationVerificationFailure,
            },
        };
        rustls::Error::InvalidCertificate(e)
    }
}

/// Everything [`match_chain`] found out, for `explain`.
#[derive(Debug)]
pub struct ChainReport {
    pub leaf: Option<CertInfo>,
    /// The pinned device whose certificate has the leaf's fingerprint.
    pub pinned: Option<usize>,
    /// Per anchor in file order: the number of intermediates on the validated path, or why not.
    pub anchors: Vec<Result<usize, AnchorFailure>>,
    pub outcome: Result<Rule, ChainRefusal>,
}

/// Decides SPEC 3 steps 2 to 4 for the chain a client sent (leaf first).
pub fn match_chain(config: &Config, chain: &[CertificateDer<'_>], now: UnixTime) -> ChainReport {
    let Some((leaf_der, intermediates)) = chain.split_first() else {
        return ChainReport {
            leaf: None,
            pinned: None,
            anchors: Vec::new(),
            outcome: Err(ChainRefusal::NoCertificate),
        };
    };
    let leaf = match CertInfo::from_der(leaf_der) {
        Ok(l) => l,
        Err(e) => return malformed(e),
    };
    // Step 2: a pinned match wins over any anchor.
    if let Some(i) = config
        .devices
        .iter()
        .position(|d: &PinnedDevice| d.info.fingerprint == leaf.fingerprint)
    {
        let outcome = match leaf.validity.check(now) {
            Ok(()) => Ok(Rule::Pinned(i)),
            Err(error) => Err(ChainRefusal::Pinned {
                device: config.devices[i].name.to_string(),
                error,
            }),
        };
        return ChainReport {
            leaf: Some(leaf),
            pinned: Some(i),
            anchors: Vec::new(),
            outcome,
        };
    }
    // Step 3: path validation to each anchor; the nearest wins, then the first in the file.
    let end_entity = match EndEntityCert::try_from(leaf_der) {
        Ok(e) => e,
        Err(e) => return malformed_webpki(leaf, e),
    };
    let issuers = issuer_names(&leaf, intermediates);
    let anchors: Vec<Result<usize, AnchorFailure>> = config
        .anchors
        .iter()
        .map(|anchor| {
            if !issuers
                .iter()
                .any(|i| *i == anchor.info.subject_der.as_slice())
            {
                return Err(AnchorFailure::NotInChain);
            }
            validate_to(anchor, &end_entity, intermediates, now)
        })
        .collect();
    let best = anchors
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().ok().map(|len| (*len, i)))
        .min();
    let outcome = match best {
        Some((_, i)) => Ok(Rule::Anchor(i)),
        None if config.anchors.is_empty() => Err(ChainRefusal::NoAnchors),
        None => Err(first_reason(config, &anchors)),
    };
    ChainReport {
        leaf: Some(leaf),
        pinned: None,
        anchors,
        outcome,
    }
}

/// The most telling refusal: the first anchor that was actually tried, else unknown issuer.
fn first_reason(config: &Config, anchors: &[Result<usize, AnchorFailure>]) -> ChainRefusal {
    anchors
        .iter()
        .zip(&config.anchors)
        .find_map(|(r, a)| match r {
            Err(AnchorFailure::NotInChain) | Ok(_) => None,
            Err(failure) => Some(ChainRefusal::Anchor {
                anchor: a.name.clone(),
                failure: failure.clone(),
            }),
        })
        .unwrap_or(ChainRefusal::UnknownIssuer)
}

fn malformed(e: CertError) -> ChainReport {
    ChainReport {
        leaf: None,
        pinned: None,
        anchors: Vec::new(),
        outcome: Err(ChainRefusal::Malformed(e.to_string())),
    }
}

fn malformed_webpki(leaf: CertInfo, e: webpki::Error) -> ChainReport {
    ChainReport {
        leaf: Some(leaf),
        pinned: None,
        anchors: Vec::new(),
        outcome: Err(ChainRefusal::Malformed(describe_webpki(&e))),
    }
}

/// Issuer names in the chain: an anchor whose subject is none of these cannot be on a path.
fn issuer_names<'a>(leaf: &'a CertInfo, intermediates: &'a [CertificateDer<'_>]) -> Vec<Vec<u8>> {
    let mut out = vec![leaf.issuer_der.clone()];
    for der in intermediates {
        if let Ok(info) = CertInfo::from_der(der) {
            out.push(info.issuer_der);
        }
    }
    out
}

/// Validates the chain with `anchor` as the only trust anchor; Ok(number of intermediates).
fn validate_to(
    anchor: &Anchor,
    end_entity: &EndEntityCert<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<usize, AnchorFailure> {
    let crls;
    let revocation = match &anchor.crl {
        Some(crl) => {
            crls = [&crl.list];
            // Only this anchor's CRL is known: certificates issued lower in the path have
            // no CRL here (Allow). A CRL past its nextUpdate is still applied (Ignore):
            // a stale CRL must neither unrevoke nor lock out every device (NOTES.md).
            RevocationOptionsBuilder::new(&crls).ok().map(|b| {
                b.with_depth(RevocationCheckDepth::Chain)
                    .with_status_policy(webpki::UnknownStatusPolicy::Allow)
                    .with_expiration_policy(webpki::ExpirationPolicy::Ignore)
                    .build()
            })
        }
        None => None,
    };
    let path = end_entity
        .verify_for_usage(
            super::provider().signature_verification_algorithms.all,
            std::slice::from_ref(&anchor.trust_anchor),
            intermediates,
            now,
            KeyUsage::client_auth(),
            revocation,
            None,
        )
        .map_err(AnchorFailure::Path)?;
    // webpki treats the anchor as a bare name and key: check what it does not.
    anchor
        .info
        .validity
        .check(now)
        .map_err(AnchorFailure::AnchorValidity)?;
    let depth = path.intermediate_certificates().count();
    if let Some(max) = anchor.info.path_len {
        if depth > max as usize {
            return Err(AnchorFailure::AnchorPathLen {
                intermediates: depth,
                max,
            });
        }
    }
    Ok(depth)
}

/// An operator-readable sentence for a webpki error.
pub fn describe_webpki(e: &webpki::Error) -> String {
    use webpki::Error as W;
    match e {
        W::UnknownIssuer => "unknown issuer (no path to the anchor)".to_owned(),
        W::CertExpired { .. } | W::InvalidCertValidity => {
            "a certificate in the path is expired".to_owned()
        }
        W::CertNotValidYet { .. } => "a certificate in the path is not yet valid".to_owned(),
        W::CertRevoked => "revoked by the anchor's CRL".to_owned(),
        W::InvalidSignatureForPublicKey => "bad signature".to_owned(),
        W::RequiredEkuNotFoundContext(_) => {
            "wrong key usage: the extended key usage does not include clientAuth".to_owned()
        }
        W::CaUsedAsEndEntity => {
            "a CA certificate was presented as the client certificate".to_owned()
        }
        W::EndEntityUsedAsCa => "a non-CA certificate is used as an issuer".to_owned(),
        W::PathLenConstraintViolated => "path length constraint violated".to_owned(),
        W::NameConstraintViolation => "name constraints violated".to_owned(),
        other => format!("{other:?}"),
    }
}

#[allow(deprecated)]
fn webpki_label(e: &webpki::Error) -> &'static str {
    use webpki::Error as W;
    match e {
        W::UnknownIssuer => "unknown_issuer",
        W::CertExpired { .. } | W::InvalidCertValidity => "expired",
        W::CertNotValidYet { .. } => "not_yet_valid",
        W::CertRevoked => "revoked",
        W::InvalidSignatureForPublicKey => "bad_signature",
        W::RequiredEkuNotFound | W::RequiredEkuNotFoundContext(_) | W::CaUsedAsEndEntity => {
            "bad_key_usage"
        }
        W::EndEntityUsedAsCa
        | W::PathLenConstraintViolated
        | W::NameConstraintViolation
        | W::MaximumPathDepthExceeded => "path_constraint",
        W::BadDer | W::BadDerTime | W::TrailingData(_) => "bad_encoding",
        _ => "invalid_certificate",
    }
}

#[allow(deprecated)]
fn webpki_to_rustls(e: &webpki::Error) -> rustls::CertificateError {
    use rustls::CertificateError as C;
    use webpki::Error as W;
    match e {
        W::UnknownIssuer => C::UnknownIssuer,
        W::CertExpired { .. } | W::InvalidCertValidity => C::Expired,
        W::CertNotValidYet { .. } => C::NotValidYet,
        W::CertRevoked => C::Revoked,
        W::InvalidSignatureForPublicKey => C::BadSignature,
        W::RequiredEkuNotFound | W::RequiredEkuNotFoundContext(_) | W::CaUsedAsEndEntity => {
            C::InvalidPurpose
        }
        W::BadDer | W::BadDerTime | W::TrailingData(_) => C::BadEncoding,
        _ => C::ApplicationVerificationFailure,
    }
}
