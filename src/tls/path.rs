//! Bounded work before authentication (contract §3 hardening): the chain limits, the candidate
//! certification paths, and one signature budget for the whole handshake.
//!
//! Why certmq builds paths itself instead of letting webpki search: given a set of
//! intermediates, webpki explores every ordering of the certificates whose names chain,
//! under its own budget (100 signatures, 200,000 steps) and afresh for every anchor we ask
//! it about. A client can send a few kilobytes of same-named CA certificates with distinct
//! keys and make the broker spend tens of milliseconds of CPU per anchor before anything is
//! authenticated (benches/hostile.rs measured 64 ms for 32 certificates and 3 anchors). Here:
//!
//! - at most [`MAX_CHAIN_CERTS`] certificates and [`MAX_CHAIN_BYTES`] are looked at, and a
//!   longer chain is refused before any of it is parsed;
//! - candidate paths are found by names and key identifiers only (no signature): a
//!   breadth-first walk from the leaf over the presented certificates, never repeating a
//!   subject, ending at each anchor that may have issued the head; at most
//!   [`MAX_CANDIDATE_PATHS`] paths, shortest first, for all anchors together;
//! - webpki then validates exactly one linear path and one anchor per call, and every
//!   signature it checks, over all calls of one handshake, is drawn from one
//!   [`SignatureBudget`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use rustls_pki_types::{AlgorithmIdentifier, InvalidSignature, SignatureVerificationAlgorithm};

use crate::cert::CertInfo;

/// Certificates a client may send (leaf included). Real devices send one to three.
pub const MAX_CHAIN_CERTS: usize = 8;
/// DER bytes of the whole chain a client may send.
pub const MAX_CHAIN_BYTES: usize = 64 * 1024;
/// Candidate paths handed to webpki per handshake, all anchors together. A device chain
/// with a root and its intermediate both configured as anchors needs two.
pub const MAX_CANDIDATE_PATHS: usize = 8;
/// Signature verifications per handshake, all paths and CRLs together (about 60 us each
/// for ECDSA P-256 with ring). The longest legitimate path (7 intermediates) with a CRL
/// for every certificate needs 15.
pub const SIGNATURE_BUDGET: u32 = 24;
/// Partial paths the walk may extend, so that finding candidates is bounded too.
const MAX_SEARCH_STEPS: usize = 64;

/// One linear path: the leaf, the presented intermediates at these indices (leaf side
/// first), then the anchor at index `anchor` in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub anchor: usize,
    pub intermediates: Vec<usize>,
}

/// What the walk found.
#[derive(Debug, Default)]
pub struct Search {
    /// Shortest first; for equal lengths, anchors in file order.
    pub candidates: Vec<Candidate>,
    /// The walk stopped at a limit: some paths were not considered.
    pub truncated: bool,
}

/// Whether `issuer` may have issued `child`, judged before any signature: the names are
/// equal byte for byte and, when both carry key identifiers, so are those.
pub fn may_have_issued(issuer: &CertInfo, child: &CertInfo) -> bool {
    issuer.subject_der == child.issuer_der
        && match (&child.authority_key_id, &issuer.subject_key_id) {
            (Some(aki), Some(ski)) => aki == ski,
            _ => true,
        }
}

/// The candidate paths from `leaf` through `intermediates` (None: did not parse, never on a
/// path) to `anchors`. Breadth first, so the nearest anchors come first.
///
/// A path never holds two certificates with the same subject (RFC 4158 loop prevention,
/// stricter than webpki's name-and-key rule: same-named CAs with fresh keys are exactly
/// the permutations a hostile chain relies on), nor a certificate named like the anchor it
/// ends at (that anchor would already have been a candidate one step earlier). Thanks to
/// both, webpki finds exactly the handed path and no other.
pub fn candidate_paths(
    leaf: &CertInfo,
    intermediates: &[Option<CertInfo>],
    anchors: &[&CertInfo],
) -> Search {
    let mut search = Search::default();
    let mut queue: VecDeque<Vec<usize>> = VecDeque::from([Vec::new()]);
    let mut steps = 0usize;
    while let Some(path) = queue.pop_front() {
        let on_path = |i: usize| intermediates.get(i).and_then(Option::as_ref);
        let head = match path.last() {
            Some(&i) => match on_path(i) {
                Some(info) => info,
                None => continue,
            },
            None => leaf,
        };
        for (a, anchor) in anchors.iter().enumerate() {
            let named_like_anchor = path
                .iter()
                .filter_map(|&i| on_path(i))
                .any(|c| c.subject_der == anchor.subject_der);
            if may_have_issued(anchor, head) && !named_like_anchor {
                if search.candidates.len() == MAX_CANDIDATE_PATHS {
                    search.truncated = true;
                    return search;
                }
                search.candidates.push(Candidate {
                    anchor: a,
                    intermediates: path.clone(),
                });
            }
        }
        if path.len() + 2 > MAX_CHAIN_CERTS {
            continue;
        }
        for (i, next) in intermediates.iter().enumerate() {
            let Some(next) = next else { continue };
            let repeats = next.subject_der == leaf.subject_der
                || path
                    .iter()
                    .filter_map(|&j| on_path(j))
                    .any(|c| c.subject_der == next.subject_der);
            if repeats || !may_have_issued(next, head) {
                continue;
            }
            steps += 1;
            if steps > MAX_SEARCH_STEPS {
                search.truncated = true;
                return search;
            }
            let mut longer = path.clone();
            longer.push(i);
            queue.push_back(longer);
        }
    }
    search
}

/// The signatures one handshake may still verify. Atomics only because webpki wants its
/// algorithms `Sync`; one handshake runs on one thread.
#[derive(Debug)]
pub struct SignatureBudget {
    limit: u32,
    spent: AtomicU32,
    exhausted: AtomicBool,
}

impl SignatureBudget {
    pub fn new(limit: u32) -> SignatureBudget {
        SignatureBudget {
            limit,
            spent: AtomicU32::new(0),
            exhausted: AtomicBool::new(false),
        }
    }

    /// Takes one signature from the budget; false (and exhausted from now on) when none is
    /// left.
    fn take(&self) -> bool {
        let ok = self
            .spent
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_ok();
        if !ok {
            self.exhausted.store(true, Ordering::Relaxed);
        }
        ok
    }

    /// Signatures verified (or attempted) so far.
    pub fn spent(&self) -> u32 {
        self.spent.load(Ordering::Relaxed)
    }

    /// Whether a verification was refused for want of budget.
    pub fn exhausted(&self) -> bool {
        self.exhausted.load(Ordering::Relaxed)
    }
}

/// A provider algorithm that draws on a [`SignatureBudget`] before each verification and
/// fails, as a bad signature would, once it is spent. Handing webpki these instead of the
/// provider's own makes the budget span every webpki call of a handshake.
#[derive(Debug)]
pub struct Metered<'b> {
    inner: &'static dyn SignatureVerificationAlgorithm,
    budget: &'b SignatureBudget,
}

/// The provider's algorithms, metered by `budget`.
pub fn metered<'b>(
    algorithms: &[&'static dyn SignatureVerificationAlgorithm],
    budget: &'b SignatureBudget,
) -> Vec<Metered<'b>> {
    algorithms
        .iter()
        .map(|inner| Metered {
            inner: *inner,
            budget,
        })
        .collect()
}

impl SignatureVerificationAlgorithm for Metered<'_> {
    fn verify_signature(
        &self,
        public_key: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), InvalidSignature> {
        if !self.budget.take() {
            return Err(InvalidSignature);
        }
        self.inner.verify_signature(public_key, message, signature)
    }

    fn public_key_alg_id(&self) -> AlgorithmIdentifier {
        self.inner.public_key_alg_id()
    }

    fn signature_alg_id(&self) -> AlgorithmIdentifier {
        self.inner.signature_alg_id()
    }

    fn fips(&self) -> bool {
        self.inner.fips()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::{Fingerprint, Validity};

    /// A certificate reduced to what the walk reads.
    fn cert(subject: &str, issuer: &str, ski: Option<u8>, aki: Option<u8>) -> CertInfo {
        CertInfo {
            fingerprint: Fingerprint::of(format!("{subject}{issuer}{ski:?}").as_bytes()),
            validity: Validity {
                not_before: 0,
                not_after: i64::MAX,
            },
            subject: subject.to_owned(),
            issuer: issuer.to_owned(),
            subject_der: subject.as_bytes().to_vec(),
            issuer_der: issuer.as_bytes().to_vec(),
            is_ca: true,
            path_len: None,
            key_usage: None,
            digital_signature: None,
            self_issued: subject == issuer,
            spki_der: Vec::new(),
            subject_key_id: ski.map(|k| vec![k]),
            authority_key_id: aki.map(|k| vec![k]),
            dns_constraints: None,
        }
    }

    #[test]
    fn finds_the_nearest_anchor_first() {
        let leaf = cert("leaf", "fleet", None, None);
        let fleet_cert = Some(cert("fleet", "root", None, None));
        let fleet = cert("fleet", "root", None, None);
        let root = cert("root", "root", None, None);
        // The root first in the file: the fleet (no intermediate) still comes first.
        let s = candidate_paths(&leaf, &[fleet_cert], &[&root, &fleet]);
        assert_eq!(
            s.candidates,
            vec![
                Candidate {
                    anchor: 1,
                    intermediates: vec![]
                },
                Candidate {
                    anchor: 0,
                    intermediates: vec![0]
                },
            ]
        );
        assert!(!s.truncated);
    }

    #[test]
    fn key_identifiers_rule_out_a_same_named_issuer() {
        let leaf = cert("leaf", "fleet", None, Some(1));
        let old_key = cert("fleet", "root", Some(2), None);
        let new_key = cert("fleet", "root", Some(1), None);
        let s = candidate_paths(&leaf, &[], &[&old_key, &new_key]);
        assert_eq!(s.candidates.len(), 1);
        assert_eq!(s.candidates[0].anchor, 1);
    }

    #[test]
    fn same_named_certificates_never_chain_to_each_other() {
        // Seven CAs named X issued by X, and one X issued by the anchor: the permutations
        // webpki would have searched are not paths here.
        let leaf = cert("leaf", "X", None, None);
        let mut inter: Vec<Option<CertInfo>> =
            (0..6).map(|_| Some(cert("X", "X", None, None))).collect();
        inter.push(Some(cert("X", "anchor", None, None)));
        let anchor = cert("anchor", "anchor", None, None);
        let s = candidate_paths(&leaf, &inter, &[&anchor]);
        assert_eq!(
            s.candidates,
            vec![Candidate {
                anchor: 0,
                intermediates: vec![6]
            }]
        );
    }

    #[test]
    fn a_path_never_passes_through_a_certificate_named_like_its_anchor() {
        let leaf = cert("leaf", "fleet", None, None);
        let forged: Vec<Option<CertInfo>> = (0..7)
            .map(|_| Some(cert("fleet", "fleet", None, None)))
            .collect();
        let fleet = cert("fleet", "root", None, None);
        let s = candidate_paths(&leaf, &forged, &[&fleet]);
        assert_eq!(
            s.candidates.len(),
            1,
            "only the leaf under the anchor itself"
        );
    }

    #[test]
    fn the_candidates_are_capped_for_all_anchors_together() {
        // Three layers of interchangeable names: 2 x 2 x 3 = 12 paths to one anchor.
        let leaf = cert("leaf", "A", None, None);
        let mut inter = Vec::new();
        for _ in 0..2 {
            inter.push(Some(cert("A", "B", None, None)));
            inter.push(Some(cert("B", "C", None, None)));
        }
        for _ in 0..3 {
            inter.push(Some(cert("C", "anchor", None, None)));
        }
        let anchor = cert("anchor", "anchor", None, None);
        let s = candidate_paths(&leaf, &inter, &[&anchor]);
        assert_eq!(s.candidates.len(), MAX_CANDIDATE_PATHS);
        assert!(s.truncated);
    }

    #[test]
    fn the_budget_stops_at_its_limit() {
        let b = SignatureBudget::new(2);
        assert!(b.take() && b.take());
        assert!(!b.exhausted());
        assert!(!b.take());
        assert!(b.exhausted());
        assert_eq!(b.spent(), 2);
    }
}
