//! contract §3 steps 2 to 4: which rule, if any, accepts a certificate chain.
//!
//! One function, [`match_chain`], answers the question for the three callers that ask it:
//! the rustls verifier during the handshake (refusals become TLS alerts), the admission at
//! CONNECT (step 8: every connection is checked again against the current config, including
//! resumed TLS sessions, for which rustls skips the verifier), and `certmq explain`, which
//! prints the per-anchor [`ChainReport`].
//!
//! Path validation is delegated to webpki with ONE linear path and ONE anchor at a time as
//! the only trust anchor, which is what makes an intermediate anchor trust exactly its own
//! subtree and not its root's. We add only what webpki leaves out (NOTES.md, contract §3
//! hardening), each where it is done:
//! - bounded work: the chain limits, candidate paths chosen by names and key identifiers,
//!   one signature budget per handshake ([`super::path`]);
//! - the anchor's own validity period and path-length constraint (webpki treats the anchor
//!   as a bare name and key);
//! - the CRLs of every configured anchor that appears on the path, not only the one the
//!   path ends at;
//! - keyUsage and DNS name constraints on the CN (`tls/rules.rs`);
//! - the choice of the nearest anchor, and pinning.
//!
//! Every refusal is classified in one place, [`ChainRefusal::class`]: its stable label
//! (logs, `certmq_auth_refusals_total{reason}`) and the rustls error whose alert the client
//! receives; its `Display` is the sentence operators read in logs and `explain`.

use rustls::CertificateError as C;
use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, UnixTime};
use webpki::{EndEntityCert, KeyUsage, RevocationCheckDepth, RevocationOptionsBuilder};

use super::path::{self, Candidate, SignatureBudget};
use super::rules;
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
    /// No certificate in the chain names this anchor as issuer (by name and, when both
    /// carry one, key identifier): webpki is not even asked.
    #[error("not an issuer of any certificate in the chain (by name and key identifier)")]
    NotInChain,
    #[error("{}", classify_webpki(.0).2)]
    Path(webpki::Error),
    /// A certificate on the path is listed by the CRL of one of these anchors, all of which
    /// appear on the path (contract §3 hardening: every CRL on the path).
    #[error("revoked: listed by the CRL of anchor {}", .by.join(" or "))]
    Revoked { by: Vec<String> },
    #[error("the anchor certificate itself is {0}")]
    AnchorValidity(ValidityError),
    #[error("path has {intermediates} intermediate(s) below the anchor, its pathLenConstraint allows {max}")]
    AnchorPathLen { intermediates: usize, max: u32 },
    #[error(
        "wrong key usage: the client certificate has a keyUsage extension without digitalSignature"
    )]
    LeafKeyUsage,
    #[error("wrong key usage: CA certificate {ca} on the path has a keyUsage extension without keyCertSign, so it may not issue certificates")]
    IssuerKeyUsage { ca: String },
    #[error("name constraints: the common name {cn:?} is not a DNS name that the name constraints of CA {ca} permit")]
    NameConstraint { cn: String, ca: String },
    /// An anchor on the path takes its CRL from a `crl_url` and has none yet (never
    /// fetched, no `crl` file): its certificates cannot be checked for revocation, so they
    /// are refused until the first good fetch (docs/crl.md).
    #[error("the CRL of anchor {anchor} has not been fetched yet from {url}; its certificates cannot be checked for revocation")]
    CrlUnavailable { anchor: String, url: String },
    /// The per-handshake budget ran out before this anchor's paths could be checked.
    #[error("not checked: the chain needs more than the per-handshake budget ({} candidate paths, {} signatures)", path::MAX_CANDIDATE_PATHS, path::SIGNATURE_BUDGET)]
    Budget,
}

/// Why no rule accepted the chain (contract §3 step 4).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChainRefusal {
    #[error("no client certificate")]
    NoCertificate,
    #[error("the client sent {certificates} certificates ({bytes} bytes); at most {} certificates and {} bytes are examined", path::MAX_CHAIN_CERTS, path::MAX_CHAIN_BYTES)]
    TooLong { certificates: usize, bytes: usize },
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
    /// No path validated within the per-handshake budget, and some were never tried.
    #[error("no valid path among those tried; the chain offers more than the per-handshake budget ({} candidate paths, {} signatures)", path::MAX_CANDIDATE_PATHS, path::SIGNATURE_BUDGET)]
    Budget,
}

impl ChainRefusal {
    /// The one classification of a refusal: its short, stable label for metrics and
    /// structured logs, and the certificate error whose TLS alert tells the client why
    /// (contract §3 step 4). `Display` is the sentence.
    pub fn class(&self) -> (&'static str, C) {
        match self {
            ChainRefusal::NoCertificate => ("no_certificate", C::BadEncoding),
            ChainRefusal::TooLong { .. } => ("chain_too_long", C::ApplicationVerificationFailure),
            ChainRefusal::Malformed(_) => ("bad_encoding", C::BadEncoding),
            ChainRefusal::Pinned { error, .. } => validity_class(*error),
            ChainRefusal::NoAnchors | ChainRefusal::UnknownIssuer => {
                ("unknown_issuer", C::UnknownIssuer)
            }
            ChainRefusal::Budget => ("path_budget", C::ApplicationVerificationFailure),
            ChainRefusal::Anchor { failure, .. } => failure.class(),
        }
    }

    /// A short, stable label for metrics and structured logs.
    pub fn label(&self) -> &'static str {
        self.class().0
    }

    /// The rustls error whose alert tells the client why (contract §3 step 4).
    pub fn to_rustls(&self) -> rustls::Error {
        match self {
            ChainRefusal::NoCertificate => rustls::Error::NoCertificatesPresented,
            other => rustls::Error::InvalidCertificate(other.class().1),
        }
    }
}

impl AnchorFailure {
    /// The label and certificate error of this failure, as [`ChainRefusal::class`].
    pub fn class(&self) -> (&'static str, C) {
        match self {
            AnchorFailure::NotInChain => ("unknown_issuer", C::UnknownIssuer),
            AnchorFailure::Path(e) => {
                let (label, error, _) = classify_webpki(e);
                (label, error)
            }
            AnchorFailure::Revoked { .. } => ("revoked", C::Revoked),
            AnchorFailure::AnchorValidity(ValidityError::Expired) => ("anchor_expired", C::Expired),
            AnchorFailure::AnchorValidity(ValidityError::NotYetValid) => {
                ("anchor_expired", C::NotValidYet)
            }
            AnchorFailure::AnchorPathLen { .. } => {
                ("path_constraint", C::ApplicationVerificationFailure)
            }
            AnchorFailure::LeafKeyUsage => ("bad_key_usage", C::InvalidPurpose),
            AnchorFailure::IssuerKeyUsage { .. } => ("issuer_key_usage", C::InvalidPurpose),
            AnchorFailure::NameConstraint { .. } => ("name_constraint", C::NotValidForName),
            AnchorFailure::CrlUnavailable { .. } => ("crl_unavailable", C::UnknownRevocationStatus),
            AnchorFailure::Budget => ("path_budget", C::ApplicationVerificationFailure),
        }
    }
}

fn validity_class(e: ValidityError) -> (&'static str, C) {
    match e {
        ValidityError::Expired => ("expired", C::Expired),
        ValidityError::NotYetValid => ("not_yet_valid", C::NotValidYet),
    }
}

/// How much work one decision took: what the pre-authentication bounds limit, reported
/// so that tests and `explain` can see them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Work {
    /// Certificates and DER bytes the client sent.
    pub certificates: usize,
    pub bytes: usize,
    /// Candidate paths found by names and key identifiers.
    pub candidate_paths: usize,
    /// Candidate paths handed to webpki.
    pub paths_tried: usize,
    /// Signature verifications attempted (certificates and CRLs).
    pub signatures: u32,
    /// A limit stopped the search or the validation before everything was tried.
    pub budget_exhausted: bool,
}

/// Everything [`match_chain`] found out, for `explain`.
#[derive(Debug, Clone)]
pub struct ChainReport {
    pub leaf: Option<CertInfo>,
    /// The pinned device whose certificate has the leaf's fingerprint.
    pub pinned: Option<usize>,
    /// Per anchor in file order: the number of intermediates on the validated path, or why not.
    pub anchors: Vec<Result<usize, AnchorFailure>>,
    pub outcome: Result<Rule, ChainRefusal>,
    pub work: Work,
    /// When no anchor issued the chain: the CAs, nearest to the leaf first, any of which
    /// configured as an anchor would have been this chain's trust anchor, as far as the
    /// chain shows them (the leaf's issuer, then the issuer of each CA certificate the
    /// client sent above it). Empty otherwise.
    pub missing_anchor: Vec<CaName>,
    /// When the chain was accepted: the earliest notAfter (seconds) of the leaf, of every
    /// certificate the client sent and of the chosen anchor (or the pinned leaf's own). Up
    /// to then, time alone cannot change the outcome under the same config: the admission
    /// at CONNECT reuses the verifier's report only before it (contract §3 step 8).
    pub valid_until: Option<i64>,
}

/// A CA named by a certificate it issued: its subject and key identifier, as the
/// issuer and authorityKeyIdentifier of that certificate say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaName {
    pub subject: String,
    /// As `openssl x509 -text` prints a key identifier.
    pub key_id: Option<String>,
}

impl std::fmt::Display for CaName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.subject)?;
        if let Some(id) = &self.key_id {
            write!(f, " (key id {id})")?;
        }
        Ok(())
    }
}

impl ChainReport {
    fn refused(leaf: Option<CertInfo>, refusal: ChainRefusal, work: Work) -> ChainReport {
        ChainReport {
            leaf,
            pinned: None,
            anchors: Vec::new(),
            outcome: Err(refusal),
            work,
            missing_anchor: Vec::new(),
            valid_until: None,
        }
    }
}

/// The issuer of `cert` as a [`CaName`].
fn issuer_of(cert: &CertInfo) -> CaName {
    CaName {
        subject: cert.issuer.clone(),
        key_id: cert.authority_key_id.as_deref().map(crate::cert::key_id),
    }
}

/// See [`ChainReport::missing_anchor`]. Bounded by the chain's length (at most
/// `path::MAX_CHAIN_CERTS`); a root the client sent ends the walk (its issuer is itself).
fn missing_anchor(leaf: &CertInfo, sent: &[Option<CertInfo>]) -> Vec<CaName> {
    if leaf.self_issued {
        return Vec::new();
    }
    let mut out = vec![issuer_of(leaf)];
    let mut current = leaf;
    for _ in 0..sent.len() {
        let above = sent
            .iter()
            .flatten()
            .find(|c| c.is_ca && c.subject_der == current.issuer_der);
        match above {
            Some(ca) if !ca.self_issued => {
                out.push(issuer_of(ca));
                current = ca;
            }
            _ => break,
        }
    }
    out
}

/// Step 3 for every candidate path, shortest first, within one signature budget: for each
/// anchor, the length of a validated path to it, or why none validated.
fn try_paths(
    config: &Config,
    search: &path::Search,
    presented: &Presented<'_>,
    now: UnixTime,
    work: &mut Work,
) -> Vec<Result<usize, AnchorFailure>> {
    let budget = SignatureBudget::new(path::SIGNATURE_BUDGET);
    let metered = path::metered(
        super::provider().signature_verification_algorithms.all,
        &budget,
    );
    let algorithms: Vec<&dyn SignatureVerificationAlgorithm> = metered
        .iter()
        .map(|m| m as &dyn SignatureVerificationAlgorithm)
        .collect();
    let mut results: Vec<Option<Result<usize, AnchorFailure>>> = vec![None; config.anchors.len()];
    for candidate in &search.candidates {
        let slot = &mut results[candidate.anchor];
        // One validated path per anchor is enough: candidates come shortest first.
        if matches!(slot, Some(Ok(_))) {
            continue;
        }
        let result = if budget.exhausted() {
            Err(AnchorFailure::Budget)
        } else {
            work.paths_tried += 1;
            validate(config, candidate, presented, &algorithms, &budget, now)
        };
        if result.is_ok() || slot.is_none() {
            *slot = Some(result);
        }
    }
    work.signatures = budget.spent();
    work.budget_exhausted = search.truncated || budget.exhausted();
    let anchors: Vec<Result<usize, AnchorFailure>> = results
        .into_iter()
        .map(|r| match r {
            Some(r) => r,
            None if search.truncated => Err(AnchorFailure::Budget),
            None => Err(AnchorFailure::NotInChain),
        })
        .collect();
    anchors
}

/// Decides contract §3 steps 2 to 4 for the chain a client sent (leaf first).
pub fn match_chain(config: &Config, chain: &[CertificateDer<'_>], now: UnixTime) -> ChainReport {
    let mut work = Work {
        certificates: chain.len(),
        bytes: chain.iter().map(|c| c.len()).sum(),
        ..Work::default()
    };
    // Bounded work: a longer chain is refused before any of it is parsed.
    if work.certificates > path::MAX_CHAIN_CERTS || work.bytes > path::MAX_CHAIN_BYTES {
        let refusal = ChainRefusal::TooLong {
            certificates: work.certificates,
            bytes: work.bytes,
        };
        return ChainReport::refused(None, refusal, work);
    }
    let Some((leaf_der, intermediates)) = chain.split_first() else {
        return ChainReport::refused(None, ChainRefusal::NoCertificate, work);
    };
    let leaf = match CertInfo::from_der(leaf_der) {
        Ok(l) => l,
        Err(e) => return malformed(e, work),
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
        let valid_until = outcome.is_ok().then_some(leaf.validity.not_after);
        return ChainReport {
            leaf: Some(leaf),
            pinned: Some(i),
            anchors: Vec::new(),
            outcome,
            work,
            missing_anchor: Vec::new(),
            valid_until,
        };
    }
    // Step 3: path validation to each anchor; the nearest wins, then the first in the file.
    let end_entity = match EndEntityCert::try_from(leaf_der) {
        Ok(e) => e,
        Err(e) => {
            let refusal = ChainRefusal::Malformed(classify_webpki(&e).2.into_owned());
            return ChainReport::refused(Some(leaf), refusal, work);
        }
    };
    let presented = Presented {
        leaf: &leaf,
        end_entity: &end_entity,
        cn: crate::identity::common_name(leaf_der).ok(),
        ders: intermediates,
        infos: intermediates
            .iter()
            .map(|d| CertInfo::from_der(d).ok())
            .collect(),
    };
    let anchor_infos: Vec<&CertInfo> = config.anchors.iter().map(|a| &a.info).collect();
    let search = path::candidate_paths(&leaf, &presented.infos, &anchor_infos);
    work.candidate_paths = search.candidates.len();
    let anchors = try_paths(config, &search, &presented, now, &mut work);
    let best = anchors
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().ok().map(|len| (*len, i)))
        .min();
    let outcome = match best {
        Some((_, i)) => Ok(Rule::Anchor(i)),
        None if config.anchors.is_empty() => Err(ChainRefusal::NoAnchors),
        None if work.budget_exhausted => Err(ChainRefusal::Budget),
        None => Err(first_reason(config, &anchors)),
    };
    let missing_anchor = match outcome {
        Err(ChainRefusal::UnknownIssuer | ChainRefusal::NoAnchors) => {
            missing_anchor(&leaf, &presented.infos)
        }
        _ => Vec::new(),
    };
    let valid_until = match outcome {
        Ok(Rule::Anchor(i)) => presented
            .infos
            .iter()
            .flatten()
            .map(|c| c.validity.not_after)
            .chain([
                leaf.validity.not_after,
                config.anchors[i].info.validity.not_after,
            ])
            .min(),
        _ => None,
    };
    ChainReport {
        leaf: Some(leaf),
        pinned: None,
        anchors,
        outcome,
        work,
        missing_anchor,
        valid_until,
    }
}

/// The chain as the client sent it, parsed once for every candidate path.
struct Presented<'a> {
    leaf: &'a CertInfo,
    end_entity: &'a EndEntityCert<'a>,
    /// The leaf's single CN, when it has one (the device name comes from it).
    cn: Option<String>,
    ders: &'a [CertificateDer<'a>],
    /// `ders` parsed; None for what does not parse (never on a candidate path).
    infos: Vec<Option<CertInfo>>,
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

fn malformed(e: CertError, work: Work) -> ChainReport {
    ChainReport::refused(None, ChainRefusal::Malformed(e.to_string()), work)
}

/// Validates one candidate path with its anchor as the only trust anchor; Ok(number of
/// intermediates).
fn validate(
    config: &Config,
    candidate: &Candidate,
    chain: &Presented<'_>,
    algorithms: &[&dyn SignatureVerificationAlgorithm],
    budget: &SignatureBudget,
    now: UnixTime,
) -> Result<usize, AnchorFailure> {
    let anchor: &Anchor = &config.anchors[candidate.anchor];
    let mut path_ders = Vec::with_capacity(candidate.intermediates.len());
    let mut cas: Vec<&CertInfo> = Vec::with_capacity(candidate.intermediates.len() + 1);
    for &i in &candidate.intermediates {
        if let (Some(der), Some(Some(info))) = (chain.ders.get(i), chain.infos.get(i)) {
            path_ders.push(CertificateDer::from(der.as_ref()));
            cas.push(info);
        }
    }
    // Every CRL on the path: the anchor's, and that of any configured anchor whose
    // certificate (same subject and key) is one of the path's intermediates, whichever
    // anchor the path ends at. webpki picks, for each certificate, the CRL of its issuer.
    let on_path: Vec<&Anchor> = config
        .anchors
        .iter()
        .enumerate()
        .filter(|(j, b)| {
            *j == candidate.anchor
                || cas
                    .iter()
                    .any(|c| c.subject_der == b.info.subject_der && c.spki_der == b.info.spki_der)
        })
        .map(|(_, b)| b)
        .collect();
    let crls: Vec<&webpki::CertRevocationList<'_>> = on_path
        .iter()
        .filter_map(|b| b.crl.as_ref().map(|c| &c.list))
        .collect();
    // Certificates below a CA without a configured CRL are not checked (Allow). A CRL past
    // its nextUpdate is still applied (Ignore): a stale CRL must neither unrevoke nor lock
    // out every device (NOTES.md).
    let revocation = RevocationOptionsBuilder::new(&crls).ok().map(|b| {
        b.with_depth(RevocationCheckDepth::Chain)
            .with_status_policy(webpki::UnknownStatusPolicy::Allow)
            .with_expiration_policy(webpki::ExpirationPolicy::Ignore)
            .build()
    });
    chain
        .end_entity
        .verify_for_usage(
            algorithms,
            std::slice::from_ref(&anchor.trust_anchor),
            &path_ders,
            now,
            KeyUsage::client_auth(),
            revocation,
            None,
        )
        .map_err(|e| match e {
            _ if budget.exhausted() => AnchorFailure::Budget,
            webpki::Error::CertRevoked => AnchorFailure::Revoked {
                by: on_path
                    .iter()
                    .filter(|b| b.crl.is_some())
                    .map(|b| b.name.clone())
                    .collect(),
            },
            e => AnchorFailure::Path(e),
        })?;
    // webpki treats the anchor as a bare name and key: check what it does not.
    anchor
        .info
        .validity
        .check(now)
        .map_err(AnchorFailure::AnchorValidity)?;
    // The candidate path is exactly the one webpki validated: no subject repeats on it and
    // no intermediate is named like the anchor (see `path::candidate_paths`).
    let depth = cas.len();
    if let Some(max) = anchor.info.path_len {
        if depth > max as usize {
            return Err(AnchorFailure::AnchorPathLen {
                intermediates: depth,
                max,
            });
        }
    }
    cas.push(&anchor.info);
    rules::key_usage(chain.leaf, &cas)?;
    rules::cn_name_constraints(chain.cn.as_deref(), &cas)?;
    // A valid path is still refused while an anchor on it cannot say what it revoked.
    if let Some(b) = on_path.iter().find(|b| b.crl.is_none()) {
        if let Some(url) = &b.crl_url {
            return Err(AnchorFailure::CrlUnavailable {
                anchor: b.name.clone(),
                url: url.url.clone(),
            });
        }
    }
    Ok(depth)
}

/// The one classifier of webpki errors: the label (metrics, logs), the certificate error
/// whose TLS alert the client receives, and the sentence operators read.
#[allow(deprecated)]
fn classify_webpki(e: &webpki::Error) -> (&'static str, C, std::borrow::Cow<'static, str>) {
    use std::borrow::Cow::Borrowed;
    use webpki::Error as W;
    match e {
        W::UnknownIssuer => (
            "unknown_issuer",
            C::UnknownIssuer,
            Borrowed("unknown issuer (no path to the anchor)"),
        ),
        W::CertExpired { .. } | W::InvalidCertValidity => (
            "expired",
            C::Expired,
            Borrowed("a certificate in the path is expired"),
        ),
        W::CertNotValidYet { .. } => (
            "not_yet_valid",
            C::NotValidYet,
            Borrowed("a certificate in the path is not yet valid"),
        ),
        W::CertRevoked => (
            "revoked",
            C::Revoked,
            Borrowed("revoked by the anchor's CRL"),
        ),
        W::InvalidSignatureForPublicKey => {
            ("bad_signature", C::BadSignature, Borrowed("bad signature"))
        }
        W::RequiredEkuNotFound | W::RequiredEkuNotFoundContext(_) => (
            "bad_key_usage",
            C::InvalidPurpose,
            Borrowed("wrong key usage: the extended key usage does not include clientAuth"),
        ),
        W::CaUsedAsEndEntity => (
            "bad_key_usage",
            C::InvalidPurpose,
            Borrowed("a CA certificate was presented as the client certificate"),
        ),
        W::EndEntityUsedAsCa => (
            "path_constraint",
            C::ApplicationVerificationFailure,
            Borrowed("a non-CA certificate is used as an issuer"),
        ),
        W::PathLenConstraintViolated => (
            "path_constraint",
            C::ApplicationVerificationFailure,
            Borrowed("path length constraint violated"),
        ),
        W::MaximumPathDepthExceeded => (
            "path_constraint",
            C::ApplicationVerificationFailure,
            Borrowed("the path is longer than webpki allows"),
        ),
        W::NameConstraintViolation => (
            "name_constraint",
            C::NotValidForName,
            Borrowed("name constraints violated by a subject alternative name"),
        ),
        W::BadDer | W::BadDerTime | W::TrailingData(_) => (
            "bad_encoding",
            C::BadEncoding,
            Borrowed("a certificate in the path is not valid DER"),
        ),
        other => (
            "invalid_certificate",
            C::ApplicationVerificationFailure,
            std::borrow::Cow::Owned(format!("{other:?}")),
        ),
    }
}
