//! The authentication decision, SPEC 3 steps 2 to 7, as one function over a chain, the
//! current config and the registry. The connection calls it at CONNECT for every
//! connection (step 8: also for resumed TLS sessions, where rustls skipped the verifier)
//! and `certmq explain` calls it in dry-run mode, so both always agree.

use std::sync::Arc;

use rustls_pki_types::{CertificateDer, UnixTime};

use crate::acl::Profile;
use crate::cert::Fingerprint;
use crate::config::Config;
use crate::identity::{self, DeviceName, IdentityError};
use crate::registry::{self, Admitted, Mode, Presented, Refusal, Registry, RegistryError, Source};
use crate::tls::policy::{self, ChainRefusal, ChainReport, Rule};

/// An admitted device.
#[derive(Debug, Clone)]
pub struct Admission {
    pub device: DeviceName,
    pub rule: Rule,
    /// `pinned:NAME` or `anchor:NAME`.
    pub rule_label: String,
    /// The ACL profile of the rule (validated to exist at config load).
    pub profile: Arc<Profile>,
    pub fingerprint: Fingerprint,
    pub registry: Admitted,
}

/// Why a chain was refused, by the step that refused it.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Steps 2 to 4 (normally refused during the handshake already).
    #[error(transparent)]
    Chain(ChainRefusal),
    /// Steps 5 and 6.
    #[error("{}", identity_message(.error))]
    Identity {
        anchor: String,
        #[source]
        error: IdentityError,
    },
    /// Step 7.
    #[error("device {device}: {refusal}")]
    Registry { device: String, refusal: Refusal },
    /// The registry could not answer or could not commit (disk full, read-only store).
    #[error("the device registry is unavailable")]
    Store(#[source] RegistryError),
}

impl Refused {
    /// A short, stable label for metrics and structured logs.
    pub fn label(&self) -> &'static str {
        match self {
            Refused::Chain(c) => c.label(),
            Refused::Identity { error, .. } => match error {
                IdentityError::Certificate(_) | IdentityError::TrailingData { .. } => {
                    "bad_encoding"
                }
                IdentityError::NoCommonName => "no_common_name",
                IdentityError::MultipleCommonNames { .. } => "multiple_common_names",
                IdentityError::CommonNameNotUtf8 => "common_name_not_utf8",
                IdentityError::RegexMiss { .. } => "regex_miss",
                IdentityError::InvalidName { .. } => "invalid_name",
            },
            Refused::Registry { refusal, .. } => refusal.label(),
            Refused::Store(_) => "store_unavailable",
        }
    }
}

/// The identity error with its cause inline: NameError explains which rule failed.
fn identity_message(e: &IdentityError) -> String {
    match e {
        IdentityError::InvalidName { name, source } => {
            format!("device name {name:?} from the CN is not allowed: it {source}")
        }
        other => other.to_string(),
    }
}

/// Everything the decision found, for logs and `explain`.
#[derive(Debug)]
pub struct Decision {
    pub report: ChainReport,
    pub cn: Option<String>,
    pub device: Option<DeviceName>,
    pub result: Result<Admission, Refused>,
}

impl Decision {
    /// The rule label, when a rule matched.
    pub fn rule_label(&self, config: &Config) -> Option<String> {
        self.report.outcome.as_ref().ok().map(|r| r.label(config))
    }
}

/// SPEC 3 steps 2 to 7 for `chain` (leaf first). With `Mode::Commit`, provisioning and
/// rotation are committed before this returns; with `Mode::DryRun` nothing is written.
pub fn decide(
    config: &Config,
    registry: &Registry,
    chain: &[CertificateDer<'_>],
    now: UnixTime,
    mode: Mode,
) -> Decision {
    let report = policy::match_chain(config, chain, now);
    let mut decision = Decision {
        cn: None,
        device: None,
        result: Err(Refused::Chain(ChainRefusal::NoCertificate)),
        report,
    };
    let rule = match &decision.report.outcome {
        Ok(rule) => *rule,
        Err(refusal) => {
            decision.result = Err(Refused::Chain(refusal.clone()));
            return decision;
        }
    };
    let Some(leaf) = decision.report.leaf.as_ref() else {
        return decision;
    };
    let (device, source, create, profile_name) = match rule {
        Rule::Pinned(i) => {
            let d = &config.devices[i];
            (d.name.clone(), Source::Pinned, true, d.acl.as_str())
        }
        Rule::Anchor(i) => {
            let a = &config.anchors[i];
            // Steps 5 and 6.
            let leaf_der = chain.first().map(|c| c.as_ref()).unwrap_or_default();
            match identity::common_name(leaf_der) {
                Ok(cn) => {
                    decision.cn = Some(cn.clone());
                    match identity::device_name(&cn, &a.cn_regex) {
                        Ok(name) => (
                            name,
                            Source::Anchor(a.name.clone()),
                            a.create_devices,
                            a.acl.as_str(),
                        ),
                        Err(error) => {
                            decision.result = Err(Refused::Identity {
                                anchor: a.name.clone(),
                                error,
                            });
                            return decision;
                        }
                    }
                }
                Err(error) => {
                    decision.result = Err(Refused::Identity {
                        anchor: a.name.clone(),
                        error,
                    });
                    return decision;
                }
            }
        }
    };
    decision.device = Some(device.clone());
    // Step 7.
    let presented = Presented {
        name: &device,
        source,
        fingerprint: leaf.fingerprint,
        validity: leaf.validity,
        create,
    };
    let outcome = match registry.admit(&presented, mode) {
        Ok(o) => o,
        Err(e) => {
            decision.result = Err(Refused::Store(e));
            return decision;
        }
    };
    let Some(profile) = config.profile(profile_name).cloned() else {
        // Config validation guarantees the profile exists; a missing one refuses, never opens.
        decision.result = Err(Refused::Chain(ChainRefusal::NoAnchors));
        return decision;
    };
    decision.result = match outcome {
        Ok(admitted) => Ok(Admission {
            rule_label: rule.label(config),
            device,
            rule,
            profile,
            fingerprint: leaf.fingerprint,
            registry: admitted,
        }),
        Err(refusal) => Err(Refused::Registry {
            device: device.to_string(),
            refusal,
        }),
    };
    decision
}

/// Re-exported for callers that only need the registry rules' labels.
pub use registry::Refusal as RegistryRefusal;
