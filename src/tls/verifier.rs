//! The rustls client-certificate verifier: contract §3 steps 1 to 4 at handshake time.
//!
//! It composes rather than replaces: the decision is [`policy::match_chain`] (webpki path
//! validation per anchor plus pinning); TLS 1.2/1.3 handshake signatures are checked by
//! rustls' own helpers with the provider's algorithms, exactly as `WebPkiClientVerifier`
//! does. What differs from `WebPkiClientVerifier`, and why:
//! - pinned (often self-signed) certificates are accepted by fingerprint;
//! - each anchor is tried alone, so an intermediate anchor never trusts its root's subtree,
//!   and the nearest anchor is chosen;
//! - the anchor's own validity and pathLenConstraint are checked (webpki does not);
//! - no root hints are sent in the CertificateRequest: a client that filters its
//!   certificate by the hint list would never offer a pinned self-signed certificate.
//!
//! - the work is kept off the tokio workers that serve established sessions
//!   (`block_in_place` on a multi-thread runtime) and at most [`verification_slots`]
//!   chains are verified at once in the process (contract §3: bounded work before
//!   authentication; the work of one verification is bounded in [`super::path`]).
//!
//! A refusal is logged here, once, with the peer address (from the task-local set by the
//! connection task around the handshake), and returned as the rustls error whose alert
//! names the cause (unknown_ca, certificate_expired, certificate_revoked...).

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

use super::policy;
use crate::cert::Fingerprint;
use crate::config::Config;
use crate::metrics::Metrics;

tokio::task_local! {
    /// The handshake being driven by this task: its peer, read by the verifier so that its
    /// refusal log line names the peer, and the slot where it leaves its verdict. Set by
    /// the connection task around `accept`.
    pub static HANDSHAKE: Arc<Handshake>;
}

/// One handshake as its connection task sees it.
#[derive(Debug)]
pub struct Handshake {
    pub peer: SocketAddr,
    /// Set by the verifier when it accepted the chain in this handshake. std Mutex: set
    /// once inside rustls' synchronous callback, taken once after the handshake.
    verdict: Mutex<Option<Verdict>>,
}

impl Handshake {
    pub fn new(peer: SocketAddr) -> Arc<Handshake> {
        Arc::new(Handshake {
            peer,
            verdict: Mutex::new(None),
        })
    }

    /// The verifier's verdict, when it ran in this handshake (never on TLS resumption).
    pub fn take_verdict(&self) -> Option<Verdict> {
        self.verdict
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }
}

/// The chain accepted by the verifier in one full handshake, and the config it was decided
/// under. The admission at CONNECT reuses the report instead of validating the chain
/// again only while that same config is in force and time cannot have changed the outcome
/// (contract §3 step 8: the full re-check stays for resumed sessions, which have no verdict,
/// and after a reload or a CRL update).
#[derive(Debug)]
pub struct Verdict {
    pub config: Arc<Config>,
    pub report: policy::ChainReport,
}

/// Which device, if any, the registry binds to a certificate: a refusal at TLS names it,
/// so that an operator reading "expired" or "unknown issuer" knows whose device it is.
pub trait KnownDevices: Send + Sync + std::fmt::Debug {
    /// The name of the device whose current certificate has `fingerprint`. Blocking (a
    /// registry read): called off the async workers, for logged refusals only.
    fn device_with(&self, fingerprint: &Fingerprint) -> Option<String>;
}

/// Verifies client certificates against one loaded [`Config`]. A reload builds a new one.
#[derive(Debug)]
pub struct DeviceVerifier {
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    known: Option<Arc<dyn KnownDevices>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl DeviceVerifier {
    pub fn new(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        known: Option<Arc<dyn KnownDevices>>,
    ) -> DeviceVerifier {
        DeviceVerifier {
            config,
            metrics,
            known,
            algorithms: super::provider().signature_verification_algorithms,
        }
    }
}

impl DeviceVerifier {
    /// The configured anchors as a refusal line lists them: `fleet,backend`, or `-`.
    fn anchor_names(&self) -> String {
        if self.config.anchors.is_empty() {
            return "-".to_owned();
        }
        self.config
            .anchors
            .iter()
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl ClientCertVerifier for DeviceVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        let report = off_the_workers(|| {
            let _slot = Slot::acquire();
            policy::match_chain(&self.config, &chain, now)
        });
        if report.outcome.is_ok() {
            let verdict = Verdict {
                config: self.config.clone(),
                report,
            };
            // Outside a connection task (in-memory handshakes) nobody takes it.
            let _ = HANDSHAKE.try_with(|h| {
                *h.verdict
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(verdict);
            });
            return Ok(ClientCertVerified::assertion());
        }
        match &report.outcome {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(refusal) => {
                self.metrics.auth_refused(refusal.label());
                let peer = HANDSHAKE.try_with(|h| h.peer).ok();
                // Rate-limited per peer address (contract §10); the metric counts every one.
                let suppressed = match peer {
                    Some(p) => crate::logline::refusal_allowed(p.ip()),
                    None => Some(0),
                };
                if let Some(suppressed) = suppressed {
                    let fingerprint = Fingerprint::of(end_entity);
                    let device = self
                        .known
                        .as_ref()
                        .and_then(|k| off_the_workers(|| k.device_with(&fingerprint)));
                    let issuer = report.leaf.as_ref().map(|l| l.issuer.as_str());
                    // For an unknown issuer, what was configured instead.
                    let anchors = matches!(
                        refusal,
                        policy::ChainRefusal::UnknownIssuer | policy::ChainRefusal::NoAnchors
                    )
                    .then(|| self.anchor_names());
                    tracing::warn!(
                        target: "certmq::auth",
                        peer = %peer.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                        %fingerprint,
                        rule = "-",
                        device = device.as_deref().unwrap_or("-"),
                        result = "refused",
                        stage = "tls",
                        reason = refusal.label(),
                        // Peer-chosen names: recorded as strings, so quoted and escaped.
                        issuer = issuer.unwrap_or("-"),
                        anchors = anchors.as_deref(),
                        detail = ?refusal.to_string(),
                        suppressed,
                        "refused at TLS"
                    );
                }
                Err(refusal.to_rustls())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Runs `f`, which may take a few milliseconds of CPU, without holding up the tasks of
/// established sessions: on a multi-thread runtime the worker hands its other tasks to
/// another thread first (`block_in_place`). On a current-thread runtime (tests, where
/// `block_in_place` would panic) and outside tokio (`explain`), `f` simply runs.
fn off_the_workers<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// How many chains the process verifies at once: half the cores, at least one, so that
/// handshakes (hostile ones included) never take every core from established sessions.
pub fn verification_slots() -> usize {
    static SLOTS: OnceLock<usize> = OnceLock::new();
    *SLOTS.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get().div_ceil(2))
            .unwrap_or(1)
    })
}

/// One of the [`verification_slots`], held while a chain is verified. A std Mutex and
/// Condvar, not a tokio semaphore: the verifier is synchronous (rustls calls it inside
/// `process_new_packets`), and the wait happens off the workers (`off_the_workers`).
/// Each holder releases within one bounded verification, so the wait is short.
struct Slot;

/// Verifications in progress, process-wide (CPU is the process's, whatever the config).
static BUSY: Mutex<usize> = Mutex::new(0);
static FREED: Condvar = Condvar::new();

impl Slot {
    fn acquire() -> Slot {
        let limit = verification_slots();
        let mut busy = BUSY.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        while *busy >= limit {
            busy = FREED
                .wait(busy)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        *busy += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut busy = BUSY.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *busy = busy.saturating_sub(1);
        FREED.notify_one();
    }
}
