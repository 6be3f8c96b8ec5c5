//! The authentication decision, contract §3 steps 2 to 7, as one function over a chain, the
//! current config and the registry. The connection calls it at CONNECT for every
//! connection (step 8: also for resumed TLS sessions, where rustls skipped the verifier)
//! and `certmq explain` calls it in dry-run mode, so both always agree.

use std::sync::Arc;

use rustls_pki_types::{CertificateDer, UnixTime};

use crate::acl::Profile;
use crate::cert::Fingerprint;
use crate::config::Config;
use crate::identity::{self, DeviceName, IdentityError};
use crate::registry::{
    self, Admitted, Backend, Device, Mode, Presented, Refusal, RegistryError, Source,
};
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
    /// The rule the registry entry is bound to (pinned or the anchor's name).
    pub source: Source,
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
    #[error("device {device:?}: {refusal}")]
    Registry { device: String, refusal: Refusal },
    /// The registry could not answer or could not commit (disk full, read-only store).
    #[error("the device registry is unavailable: {0}")]
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

/// What steps 2 to 6 make of a chain: the device it names and the rule that names it.
struct Named<'c> {
    device: DeviceName,
    rule: Rule,
    source: Source,
    create: bool,
    profile: &'c str,
}

/// contract §3 steps 2 to 6 for `chain` (leaf first): which rule accepts it and which device it
/// names. No registry: shared by [`decide`] and [`standing`]. `verified`: steps 2 to 4 as
/// the TLS verifier already decided them for this chain under this very `config` (see
/// [`decide_verified`]); None decides them now.
fn identify<'c>(
    config: &'c Config,
    chain: &[CertificateDer<'_>],
    now: UnixTime,
    verified: Option<ChainReport>,
) -> (Decision, Option<Named<'c>>) {
    let report = verified.unwrap_or_else(|| policy::match_chain(config, chain, now));
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
            return (decision, None);
        }
    };
    if decision.report.leaf.is_none() {
        return (decision, None);
    }
    let named = match rule {
        Rule::Pinned(i) => {
            let d = &config.devices[i];
            Named {
                device: d.name.clone(),
                rule,
                source: Source::Pinned,
                create: true,
                profile: d.acl.as_str(),
            }
        }
        Rule::Anchor(i) => {
            let a = &config.anchors[i];
            // Steps 5 and 6.
            let leaf_der = chain.first().map(|c| c.as_ref()).unwrap_or_default();
            let named = identity::common_name(leaf_der).and_then(|cn| {
                let name = identity::device_name(&cn, &a.cn_regex);
                decision.cn = Some(cn);
                name
            });
            match named {
                Ok(device) => Named {
                    device,
                    rule,
                    source: Source::Anchor(a.name.clone()),
                    create: a.create_devices,
                    profile: a.acl.as_str(),
                },
                Err(error) => {
                    decision.result = Err(Refused::Identity {
                        anchor: a.name.clone(),
                        error,
                    });
                    return (decision, None);
                }
            }
        }
    };
    decision.device = Some(named.device.clone());
    (decision, Some(named))
}

/// contract §3 steps 2 to 7 for `chain` (leaf first). With `Mode::Commit`, provisioning and
/// rotation are committed before this returns; with `Mode::DryRun` nothing is written.
/// `registry` is either backend (SQLite, or the cluster's bucket): step 7 is the same.
pub fn decide(
    config: &Config,
    registry: &dyn Backend,
    chain: &[CertificateDer<'_>],
    now: UnixTime,
    mode: Mode,
) -> Decision {
    decide_verified(config, registry, chain, now, mode, None)
}

/// [`decide`], with steps 2 to 4 taken from `verified` when given: the report the TLS
/// verifier reached for this same chain, in this connection's full handshake, under this
/// same `config`, and still within its `valid_until` (contract §3 step 8: the caller
/// passes None for a resumed session or when the config changed since the handshake).
/// Steps 5 to 7 always run.
pub fn decide_verified(
    config: &Config,
    registry: &dyn Backend,
    chain: &[CertificateDer<'_>],
    now: UnixTime,
    mode: Mode,
    verified: Option<ChainReport>,
) -> Decision {
    let (mut decision, named) = identify(config, chain, now, verified);
    let (Some(named), Some(leaf)) = (named, decision.report.leaf.as_ref()) else {
        return decision;
    };
    // Step 7. A pinned name is reserved while its [[device]] entry exists (contract §4).
    let presented = Presented {
        name: &named.device,
        reserved: config.pinned(named.device.as_str()).is_some(),
        source: named.source,
        fingerprint: leaf.fingerprint,
        validity: leaf.validity,
        create: named.create,
    };
    let fingerprint = leaf.fingerprint;
    let outcome = match registry.admit(&presented, mode) {
        Ok(o) => o,
        Err(e) => {
            decision.result = Err(Refused::Store(e));
            return decision;
        }
    };
    let Some(profile) = config.profile(named.profile).cloned() else {
        // Config validation guarantees the profile exists; a missing one refuses, never opens.
        decision.result = Err(Refused::Chain(ChainRefusal::NoAnchors));
        return decision;
    };
    decision.result = match outcome {
        Ok(admitted) => Ok(Admission {
            rule_label: named.rule.label(config),
            source: presented.source,
            device: named.device,
            rule: named.rule,
            profile,
            fingerprint,
            registry: admitted,
        }),
        Err(refusal) => Err(Refused::Registry {
            device: named.device.to_string(),
            refusal,
        }),
    };
    decision
}

/// Why an admitted session may no longer act (contract §4), as [`standing`] finds it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Revoked {
    #[error("device {0:?} was deleted")]
    Deleted(DeviceName),
    #[error("device {0:?} is disabled")]
    Disabled(DeviceName),
    #[error("device {device:?} is now bound to {bound}")]
    Rebound { device: DeviceName, bound: Source },
    #[error("certificate superseded: device {0:?} rotated to another certificate")]
    Superseded(DeviceName),
    #[error("the rule of device {device:?} ({rule}) is no longer in the configuration")]
    RuleRemoved { device: DeviceName, rule: Source },
    /// The chain no longer passes steps 2 to 6 (revoked by a CRL, anchor removed, expired,
    /// or it now names another device).
    #[error("{reason}")]
    Chain { label: &'static str, reason: String },
}

impl Revoked {
    /// A short, stable label for metrics and structured logs.
    pub fn label(&self) -> &'static str {
        match self {
            Revoked::Deleted(_) => "deleted",
            Revoked::Disabled(_) => "disabled",
            Revoked::Rebound { .. } => "bound_elsewhere",
            Revoked::Superseded(_) => "superseded",
            Revoked::RuleRemoved { .. } => "rule_removed",
            Revoked::Chain { label, .. } => label,
        }
    }

    /// Whether the registry entry the session belonged to is gone: its sessions, queued
    /// messages and wills are then forgotten, not merely suspended (contract §4).
    pub fn entry_gone(&self) -> bool {
        matches!(self, Revoked::Deleted(_) | Revoked::Rebound { .. })
    }
}

/// The certificate a connected session was admitted with.
#[derive(Debug, Clone, Copy)]
pub struct Presenter<'a> {
    pub source: &'a Source,
    pub fingerprint: Fingerprint,
    /// Leaf first.
    pub chain: &'a [CertificateDer<'static>],
}

/// The one verdict on an admitted session, now (contract §4 "A session lives only as long as its
/// identity"): may `device` still act, and under which ACL profile? Used for every session
/// at every moment after CONNECT: on resume and restore (no presenter: the session is
/// offline), on reload (`revalidate`: the chain is decided again against the new config and
/// CRLs), on every registry change, and when a delayed will fires.
///
/// `row` is the device's registry row (None: deleted). With a presenter, the row must still
/// be bound to the rule and the certificate the connection was admitted with.
pub fn standing(
    config: &Config,
    row: Option<&Device>,
    device: &DeviceName,
    presenter: Option<Presenter<'_>>,
    revalidate: bool,
    now: UnixTime,
) -> Result<Arc<Profile>, Revoked> {
    let row = row.ok_or_else(|| Revoked::Deleted(device.clone()))?;
    if !row.enabled {
        return Err(Revoked::Disabled(device.clone()));
    }
    if let Some(p) = presenter {
        if row.source != *p.source {
            return Err(Revoked::Rebound {
                device: device.clone(),
                bound: row.source.clone(),
            });
        }
        if row.fingerprint != p.fingerprint {
            return Err(Revoked::Superseded(device.clone()));
        }
        if revalidate {
            let (decision, named) = identify(config, p.chain, now, None);
            match named {
                None => {
                    let refused = match decision.result {
                        Err(r) => r,
                        Ok(_) => Refused::Chain(ChainRefusal::NoCertificate),
                    };
                    return Err(Revoked::Chain {
                        label: refused.label(),
                        reason: refused.to_string(),
                    });
                }
                Some(n) if n.device != *device => {
                    return Err(Revoked::Chain {
                        label: "renamed",
                        reason: format!(
                            "the certificate now names device {:?} instead of {device:?}",
                            n.device
                        ),
                    });
                }
                Some(n) if n.source != row.source => {
                    return Err(Revoked::Rebound {
                        device: device.clone(),
                        bound: n.source,
                    });
                }
                Some(_) => {}
            }
        }
    }
    profile_of(config, &row.source, device)
}

/// The ACL profile of the rule `source` under `config`.
fn profile_of(
    config: &Config,
    source: &Source,
    device: &DeviceName,
) -> Result<Arc<Profile>, Revoked> {
    let name = match source {
        Source::Pinned => config.pinned(device.as_str()).map(|p| p.acl.as_str()),
        Source::Anchor(anchor) => config.anchor(anchor).map(|a| a.acl.as_str()),
    };
    name.and_then(|n| config.profile(n).cloned())
        .ok_or_else(|| Revoked::RuleRemoved {
            device: device.clone(),
            rule: source.clone(),
        })
}

/// Re-exported for callers that only need the registry rules' labels.
pub use registry::Refusal as RegistryRefusal;
