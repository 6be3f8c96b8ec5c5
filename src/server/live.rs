//! The live connections, and how every session is held to the current decision (SPEC 4
//! "A session lives only as long as its identity", SPEC 8): after a reload, after a registry
//! change made by the `certmq devices` CLI, and after the broker's own provisioning and
//! rotation writes. Each connection is judged by the one verdict, [`auth::standing`]; a
//! connection that would now be refused is revoked (MQTT 5: DISCONNECT 0x87 with the reason
//! first), the others keep their connection with the current ACL profile, minus the
//! subscriptions it no longer allows. Sessions not connected now are judged by the same
//! function through [`Broker::reauthorize`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use rustls_pki_types::{CertificateDer, UnixTime};

use crate::auth::{self, Presenter, Revoked};
use crate::broker::conn::Revoke;
use crate::broker::session::SessionRef;
use crate::broker::Broker;
use crate::cert::Fingerprint;
use crate::config::Config;
use crate::identity::DeviceName;
use crate::registry::{Device, Registry, RegistryError, Source};

/// One admitted connection, as the re-check needs it.
#[derive(Debug, Clone)]
pub struct LiveConn {
    /// The chain the device presented (leaf first).
    pub chain: Arc<Vec<CertificateDer<'static>>>,
    pub device: DeviceName,
    /// The rule and certificate it was admitted with: the registry entry must keep both.
    pub source: Source,
    pub fingerprint: Fingerprint,
    pub session: SessionRef,
    pub revoke: Arc<Revoke>,
}

impl LiveConn {
    fn presenter(&self) -> Presenter<'_> {
        Presenter {
            source: &self.source,
            fingerprint: self.fingerprint,
            chain: &self.chain,
        }
    }
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
    /// Sessions forgotten because their device's registry entry is gone.
    pub sessions_forgotten: usize,
}

/// Which connections a re-check looks at, and how deep.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// Every connection and session; `revalidate` decides each chain again (after a
    /// reload: anchors, CRLs and regexes may have changed).
    All { revalidate: bool },
    /// One device, after the broker itself changed its registry row.
    Device(&'a DeviceName),
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

    /// The devices with a live connection, and how many each has (`certmq devices list`'s
    /// online column, through the control socket).
    pub fn online(&self) -> std::collections::BTreeMap<String, u64> {
        let mut out = std::collections::BTreeMap::new();
        for c in self.lock().values() {
            *out.entry(c.device.as_str().to_owned()).or_insert(0) += 1;
        }
        out
    }

    fn select(&self, scope: Scope<'_>) -> Vec<LiveConn> {
        let conns = self.lock();
        match scope {
            Scope::All { .. } => conns.values().cloned().collect(),
            Scope::Device(d) => conns.values().filter(|c| c.device == *d).cloned().collect(),
        }
    }

    /// Revokes every connection of `device` with `reason` (its registry entry is gone).
    pub fn revoke_device(&self, device: &DeviceName, reason: &Revoked) -> usize {
        let conns = self.select(Scope::Device(device));
        for c in &conns {
            revoke(c, reason, "session revoked");
        }
        conns.len()
    }

    /// Holds every connection in `scope`, and every session of the devices concerned, to
    /// the current decision ([`auth::standing`]). Blocking (registry reads, and chain
    /// validation when revalidating): call from `spawn_blocking`.
    pub fn recheck(
        &self,
        config: &Config,
        registry: &Registry,
        broker: &Broker,
        scope: Scope<'_>,
    ) -> Result<Recheck, RegistryError> {
        let rows = Rows::read(registry, scope)?;
        let revalidate = matches!(scope, Scope::All { revalidate: true });
        let now = UnixTime::now();
        let mut out = Recheck::default();
        for c in self.select(scope) {
            let row = rows.get(&c.device);
            match auth::standing(config, row, &c.device, Some(c.presenter()), revalidate, now) {
                Ok(profile) => {
                    out.kept += 1;
                    let acl = Arc::new(profile.for_device(c.device.as_str()));
                    out.subscriptions_removed += broker.apply_acl(&c.session, acl);
                }
                Err(reason) => {
                    out.revoked += 1;
                    revoke(&c, &reason, "session revoked");
                }
            }
        }
        let only = match scope {
            Scope::Device(d) => Some(d),
            Scope::All { .. } => None,
        };
        out.sessions_forgotten = broker.reauthorize(only, |device| {
            auth::standing(config, rows.get(device), device, None, false, now)
                .map(|p| Arc::new(p.for_device(device.as_str())))
        });
        Ok(out)
    }
}

/// Tells one connection it is no longer admitted, and logs why.
fn revoke(c: &LiveConn, reason: &Revoked, what: &str) {
    tracing::warn!(device = ?c.device, reason = reason.label(), detail = ?reason.to_string(), "{what}");
    c.revoke.revoke(format!("not authorized: {reason}"));
}

/// The registry rows a re-check needs, read once.
enum Rows {
    All(HashMap<String, Device>),
    One(Option<Device>),
}

impl Rows {
    fn read(registry: &Registry, scope: Scope<'_>) -> Result<Rows, RegistryError> {
        Ok(match scope {
            Scope::All { .. } => Rows::All(
                registry
                    .list()?
                    .into_iter()
                    .map(|d| (d.name.clone(), d))
                    .collect(),
            ),
            Scope::Device(d) => Rows::One(registry.get(d.as_str())?),
        })
    }

    fn get(&self, device: &DeviceName) -> Option<&Device> {
        match self {
            Rows::All(rows) => rows.get(device.as_str()),
            Rows::One(row) => row.as_ref().filter(|r| r.name == device.as_str()),
        }
    }
}
