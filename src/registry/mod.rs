//! The device registry (contract §3 step 7): which device names exist, which rule each is bound
//! to, the certificate it currently uses, whether it is enabled.
//!
//! The rules live here, as one transaction per admission ([`Registry::admit`]), so that
//! two connections of the same new device cannot both provision it, a certificate from one
//! anchor can never take over a device of another, and rotation is accepted only forwards
//! in time (rollback protection on notBefore). The standalone storage is SQLite
//! (`store.rs`), shared with the `certmq devices` CLI running in another process (WAL mode,
//! busy timeout). Cluster mode stores the same rows in a NATS key-value bucket
//! (`cluster::registry`); both sit behind the [`Backend`] port (`backend.rs`).

mod backend;
mod store;
pub mod transfer;

use std::fmt;

use crate::cert::{Fingerprint, Validity};
use crate::config::PINNED_SOURCE;
use crate::identity::DeviceName;

pub use backend::{Backend, ChangeFeed, Changes, Feed, Imported};
pub use store::{Access, PinnedSync, Registry, RegistryError, DB_FILE};

/// The rule a device is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// A `[[device]]` entry of the config.
    Pinned,
    /// The anchor with this name.
    Anchor(String),
}

impl Source {
    /// As stored and printed: `pinned` or the anchor's name (config forbids an anchor named
    /// `pinned`, so this is unambiguous).
    pub fn as_str(&self) -> &str {
        match self {
            Source::Pinned => PINNED_SOURCE,
            Source::Anchor(name) => name,
        }
    }

    /// From the stored form (see [`Source::as_str`]).
    pub fn from_stored(s: String) -> Source {
        if s == PINNED_SOURCE {
            Source::Pinned
        } else {
            Source::Anchor(s)
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Pinned => f.write_str("pinned"),
            Source::Anchor(name) => write!(f, "anchor {name}"),
        }
    }
}

/// One registry row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub source: Source,
    /// The certificate the device currently uses.
    pub fingerprint: Fingerprint,
    pub validity: Validity,
    pub enabled: bool,
    /// Seconds since the epoch.
    pub created_at: i64,
    pub last_seen_at: Option<i64>,
    /// Messages its sessions could not take (contract §7: a full queue), counted since created.
    pub dropped_messages: u64,
}

/// What the registry holds for a device, in words (an import conflict names it).
pub fn held_text(d: &Device) -> String {
    format!(
        "bound to {}, certificate {}{}",
        d.source,
        d.fingerprint,
        if d.enabled { "" } else { ", disabled" }
    )
}

/// What a connecting device presents to the registry.
#[derive(Debug, Clone)]
pub struct Presented<'a> {
    pub name: &'a DeviceName,
    pub source: Source,
    pub fingerprint: Fingerprint,
    pub validity: Validity,
    /// The anchor's `create_devices` (pinned devices are always (re)entered).
    pub create: bool,
    /// The name belongs to a `[[device]]` entry of the config: no anchor may provision it,
    /// even while its registry row is missing (contract §4: a pinned name is reserved).
    pub reserved: bool,
}

/// Whether [`Registry::admit`] may write (a connection) or only answers (`explain`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Commit,
    DryRun,
}

/// An accepted admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admitted {
    /// Known device, same rule, same certificate.
    Known,
    /// New device, created and committed (or would be, in a dry run).
    Provisioned,
    /// Same rule, newer certificate: the stored certificate was replaced.
    Rotated { previous: Fingerprint },
}

/// A refusal by the registry rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("unknown device and the anchor does not create devices (create_devices = false)")]
    Unknown,
    #[error("device is disabled")]
    Disabled,
    #[error("device is bound to {bound}, not to {presented}")]
    BoundElsewhere { bound: Source, presented: Source },
    #[error(
        "certificate superseded: its notBefore is older than the device's current certificate"
    )]
    Superseded,
    #[error("the name is reserved for a pinned device of the configuration")]
    Reserved,
}

impl Refusal {
    /// A short, stable label for metrics and structured logs.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Unknown => "unknown_device",
            Refusal::Disabled => "disabled",
            Refusal::BoundElsewhere { .. } => "bound_elsewhere",
            Refusal::Superseded => "superseded",
            Refusal::Reserved => "reserved_name",
        }
    }
}

/// Applies the rules of contract §3 step 7 to a stored row (None = unknown name). Pure, so the
/// rules are tested without a database; the store runs it inside one transaction.
pub fn decide(stored: Option<&Device>, presented: &Presented<'_>) -> Result<Admitted, Refusal> {
    let Some(stored) = stored else {
        if presented.reserved && presented.source != Source::Pinned {
            return Err(Refusal::Reserved);
        }
        return if presented.create || presented.source == Source::Pinned {
            Ok(Admitted::Provisioned)
        } else {
            Err(Refusal::Unknown)
        };
    };
    if !stored.enabled {
        return Err(Refusal::Disabled);
    }
    if stored.source != presented.source {
        return Err(Refusal::BoundElsewhere {
            bound: stored.source.clone(),
            presented: presented.source.clone(),
        });
    }
    if stored.fingerprint == presented.fingerprint {
        return Ok(Admitted::Known);
    }
    if presented.source == Source::Pinned {
        // The config is the authority for pinned certificates; the row follows it.
        return Ok(Admitted::Rotated {
            previous: stored.fingerprint,
        });
    }
    if presented.validity.not_before >= stored.validity.not_before {
        Ok(Admitted::Rotated {
            previous: stored.fingerprint,
        })
    } else {
        Err(Refusal::Superseded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(source: Source, fp: u8, not_before: i64, enabled: bool) -> Device {
        Device {
            name: "dev-1".into(),
            source,
            fingerprint: Fingerprint::of(&[fp]),
            validity: Validity {
                not_before,
                not_after: not_before + 1000,
            },
            enabled,
            created_at: 0,
            last_seen_at: None,
            dropped_messages: 0,
        }
    }

    fn presented<'a>(
        name: &'a DeviceName,
        source: Source,
        fp: u8,
        nb: i64,
        create: bool,
    ) -> Presented<'a> {
        Presented {
            name,
            source,
            fingerprint: Fingerprint::of(&[fp]),
            validity: Validity {
                not_before: nb,
                not_after: nb + 1000,
            },
            create,
            reserved: false,
        }
    }

    #[test]
    fn step7_rules() {
        let n = DeviceName::parse("dev-1").unwrap();
        let fleet = || Source::Anchor("fleet".into());
        let other = || Source::Anchor("other".into());
        assert_eq!(
            decide(None, &presented(&n, fleet(), 1, 10, true)),
            Ok(Admitted::Provisioned)
        );
        assert_eq!(
            decide(None, &presented(&n, fleet(), 1, 10, false)),
            Err(Refusal::Unknown)
        );
        assert_eq!(
            decide(None, &presented(&n, Source::Pinned, 1, 10, false)),
            Ok(Admitted::Provisioned)
        );
        let d = device(fleet(), 1, 10, true);
        assert_eq!(
            decide(Some(&d), &presented(&n, fleet(), 1, 10, false)),
            Ok(Admitted::Known)
        );
        assert_eq!(
            decide(Some(&d), &presented(&n, fleet(), 2, 10, false)),
            Ok(Admitted::Rotated {
                previous: d.fingerprint
            })
        );
        assert_eq!(
            decide(Some(&d), &presented(&n, fleet(), 2, 11, false)),
            Ok(Admitted::Rotated {
                previous: d.fingerprint
            })
        );
        assert_eq!(
            decide(Some(&d), &presented(&n, fleet(), 2, 9, false)),
            Err(Refusal::Superseded)
        );
        assert!(matches!(
            decide(Some(&d), &presented(&n, other(), 1, 10, true)),
            Err(Refusal::BoundElsewhere { .. })
        ));
        assert!(matches!(
            decide(Some(&d), &presented(&n, Source::Pinned, 1, 10, true)),
            Err(Refusal::BoundElsewhere { .. })
        ));
        let disabled = device(fleet(), 1, 10, false);
        assert_eq!(
            decide(Some(&disabled), &presented(&n, fleet(), 1, 10, true)),
            Err(Refusal::Disabled)
        );
        let mut squatter = presented(&n, fleet(), 1, 10, true);
        squatter.reserved = true;
        assert_eq!(decide(None, &squatter), Err(Refusal::Reserved));
        let mut owner = presented(&n, Source::Pinned, 1, 10, false);
        owner.reserved = true;
        assert_eq!(decide(None, &owner), Ok(Admitted::Provisioned));
        let pinned = device(Source::Pinned, 1, 10, true);
        assert!(matches!(
            decide(Some(&pinned), &presented(&n, fleet(), 1, 10, true)),
            Err(Refusal::BoundElsewhere { .. })
        ));
    }
}
