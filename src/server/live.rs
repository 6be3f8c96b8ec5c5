//! The live connections, and their re-check (SPEC 8, issue 6): after a reload every
//! session is decided again against the new config, CRLs and registry; after a registry
//! change made by the `certmq devices` CLI, against the registry. A session that would now
//! be refused is revoked (MQTT 5: DISCONNECT 0x87 with the reason first); the others keep
//! their connection with the new ACL profile, minus the subscriptions it no longer allows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::auth;
use crate::broker::session::Revoke;
use crate::broker::state::SessionRef;
use crate::broker::Broker;
use crate::config::Config;
use crate::identity::DeviceName;
use crate::registry::{Admitted, Mode, Registry, Source};
use rustls_pki_types::{CertificateDer, UnixTime};

/// One admitted connection, as the re-check needs it.
#[derive(Debug, Clone)]
pub struct LiveConn {
    /// The chain the device presented (leaf first).
    pub chain: Arc<Vec<CertificateDer<'static>>>,
    pub device: DeviceName,
    pub source: Source,
    pub session: SessionRef,
    pub revoke: Arc<Revoke>,
}

/// Connections by connection id. std Mutex: inserts and removes per connection, and a
/// copy of the list per re-check; never held across an await.
#[derive(Debug, Default)]
pub struct Live {
    conns: Mutex<HashMap<u64, LiveConn>>,
}

/// Removes its connection from [`Live`] when the connection task ends.
pub struct LiveGuard<'a> {
    live: &'a Live,
    id: u64,
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.live.lock().remove(&self.id);
    }
}

/// What a re-check did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recheck {
    pub kept: usize,
    pub revoked: usize,
    pub subscriptions_removed: usize,
}

impl Live {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, LiveConn>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection until the guard drops.
    pub fn register(&self, id: u64, conn: LiveConn) -> LiveGuard<'_> {
        self.lock().insert(id, conn);
        LiveGuard { live: self, id }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn all(&self) -> Vec<LiveConn> {
        self.lock().values().cloned().collect()
    }

    /// Full re-check (after a reload): SPEC 3 steps 2 to 7 against the new config, then the
    /// new ACL profile for those kept. Blocking (chain validation, registry reads).
    pub fn recheck_all(&self, config: &Config, registry: &Registry, broker: &Broker) -> Recheck {
        let mut out = Recheck::default();
        let now = UnixTime::now();
        for c in self.all() {
            let decision = auth::decide(config, registry, &c.chain, now, Mode::DryRun);
            let verdict = match decision.result {
                Err(refused) => Err(refused.to_string()),
                Ok(a) if a.device != c.device => Err(format!(
                    "the certificate now names device {} instead of {}",
                    a.device, c.device
                )),
                // The dry run would create it: the row is gone (deleted while connected).
                Ok(a) if a.registry == Admitted::Provisioned => {
                    Err(format!("device {} was deleted", c.device))
                }
                Ok(a) => Ok(a.profile),
            };
            match verdict {
                Ok(profile) => {
                    out.kept += 1;
                    let acl = Arc::new(profile.for_device(c.device.as_str()));
                    out.subscriptions_removed += broker.apply_acl(&c.session, acl);
                }
                Err(reason) => {
                    out.revoked += 1;
                    tracing::warn!(device = %c.device, %reason, "session revoked after reload");
                    c.revoke.revoke(format!("not authorized: {reason}"));
                }
            }
        }
        out
    }

    /// Registry-only re-check (after the CLI changed the registry): disabled, deleted or
    /// re-bound devices are revoked. Blocking (registry reads).
    pub fn recheck_registry(&self, registry: &Registry) -> Recheck {
        let mut out = Recheck::default();
        for c in self.all() {
            let leaf = c.chain.first().map(|l| crate::cert::Fingerprint::of(l));
            let reason = match registry.get(c.device.as_str()) {
                Err(e) => {
                    tracing::warn!(error = %e, "registry re-check failed; keeping sessions");
                    return out;
                }
                Ok(None) => Some(format!("device {} was deleted", c.device)),
                Ok(Some(d)) if !d.enabled => Some(format!("device {} is disabled", c.device)),
                Ok(Some(d)) if d.source != c.source => {
                    Some(format!("device {} is now bound to {}", c.device, d.source))
                }
                Ok(Some(d)) if Some(d.fingerprint) != leaf => {
                    Some(format!("device {} now uses another certificate", c.device))
                }
                Ok(Some(_)) => None,
            };
            match reason {
                None => out.kept += 1,
                Some(reason) => {
                    out.revoked += 1;
                    tracing::warn!(device = %c.device, %reason, "session revoked after a registry change");
                    c.revoke.revoke(format!("not authorized: {reason}"));
                }
            }
        }
        out
    }
}
