//! The live connections, and how every session is held to the current decision (contract §4
//! "A session lives only as long as its identity", contract §8): after a reload, after a registry
//! change made by the `certmq devices` CLI, and after the broker's own provisioning and
//! rotation writes. Each connection is judged by the one verdict, [`auth::standing`]; a
//! connection that would now be refused is revoked (MQTT 5: DISCONNECT 0x87 with the reason
//! first), the others keep their connection with the current ACL profile, minus the
//! subscriptions it no longer allows. Sessions not connected now are judged by the same
//! function through [`Broker::reauthorize`].
//!
//! Registry changes reach [`Live::recheck`] two ways, with the same semantics: SQLite's
//! `data_version` polled by the server (standalone), or the changes the cluster's KV watch
//! pushes ([`follow`], docs/cluster.md "Registry").

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::CancellationToken;

use rustls_pki_types::{CertificateDer, UnixTime};

use crate::auth::{self, Presenter, Revoked};
use crate::broker::conn::Revoke;
use crate::broker::session::SessionRef;
use crate::broker::Broker;
use crate::cert::Fingerprint;
use crate::config::Config;
use crate::identity::DeviceName;
use crate::registry::{Backend, ChangeFeed, Changes, Device, RegistryError, Source};

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
    conns: Mutex<Conns>,
    /// Bumped by every registry-driven re-check before it copies the list
    /// ([`Live::registry_changed`]). A connection admitted on a registry read that such a
    /// re-check then missed (it registers after the copy) finds the number changed after
    /// registering, and decides once more (connection.rs `open`).
    registry_generation: AtomicU64,
}

/// The admitted connections, and how many each rule admitted (`/metrics`: connections per
/// anchor), kept together under one lock so the counts never drift from the map.
#[derive(Debug, Default)]
struct Conns {
    by_id: HashMap<u64, LiveConn>,
    by_source: HashMap<Source, usize>,
}

impl Conns {
    fn insert(&mut self, id: u64, conn: LiveConn) {
        *self.by_source.entry(conn.source.clone()).or_default() += 1;
        if let Some(old) = self.by_id.insert(id, conn) {
            self.forget(&old.source);
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some(old) = self.by_id.remove(&id) {
            self.forget(&old.source);
        }
    }

    fn forget(&mut self, source: &Source) {
        if let Some(n) = self.by_source.get_mut(source) {
            *n -= 1;
            if *n == 0 {
                self.by_source.remove(source);
            }
        }
    }
}

/// Removes its connection from [`Live`] when the connection task ends.
pub struct LiveGuard<'a> {
    live: &'a Live,
    id: u64,
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.live.lock().remove(self.id);
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
    /// One connection, its chain decided again, once a certificate of its path reached its
    /// notAfter (connection.rs `watch_expiry`): the re-check a reload would make of it.
    /// Offline sessions are not concerned (they present no chain).
    Connection { id: u64, device: &'a DeviceName },
}

impl Live {
    fn lock(&self) -> MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The registry generation: read by a CONNECT before its admission reads the registry,
    /// and again right after [`Live::register`].
    pub fn registry_generation(&self) -> u64 {
        self.registry_generation.load(Ordering::SeqCst)
    }

    /// Says that the registry changed (another process's write seen, a pushed change, the
    /// broker's own provisioning or rotation committed). Called before the re-check it
    /// precedes copies the list, and after the change is visible to registry reads: a
    /// connection either registered before that copy (and is judged by the re-check), or
    /// registers after it and then reads the bumped number (the bump is sequenced before
    /// the copy's lock, which the registration's lock acquires after), so it re-checks
    /// itself. One whose generation read comes after the bump reads the registry after the
    /// change and needs nothing more.
    pub fn registry_changed(&self) {
        self.registry_generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Registers a connection until the guard drops.
    pub fn register(&self, id: u64, conn: LiveConn) -> LiveGuard<'_> {
        self.lock().insert(id, conn);
        LiveGuard { live: self, id }
    }

    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// Admitted connections open now, by the rule that admitted them.
    pub fn by_source(&self) -> Vec<(Source, usize)> {
        self.lock()
            .by_source
            .iter()
            .map(|(s, n)| (s.clone(), *n))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The devices with a live connection, and how many each has (`certmq devices list`'s
    /// online column, through the control socket).
    pub fn online(&self) -> std::collections::BTreeMap<String, u64> {
        let mut out = std::collections::BTreeMap::new();
        for c in self.lock().by_id.values() {
            *out.entry(c.device.as_str().to_owned()).or_insert(0) += 1;
        }
        out
    }

    fn select(&self, scope: Scope<'_>) -> Vec<LiveConn> {
        let conns = self.lock();
        let all = conns.by_id.values();
        match scope {
            Scope::All { .. } => all.cloned().collect(),
            Scope::Device(d) => all.filter(|c| c.device == *d).cloned().collect(),
            Scope::Connection { id, device } => conns
                .by_id
                .get(&id)
                .filter(|c| c.device == *device)
                .cloned()
                .into_iter()
                .collect(),
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
        registry: &dyn Backend,
        broker: &Broker,
        scope: Scope<'_>,
    ) -> Result<Recheck, RegistryError> {
        let rows = Rows::read(registry, scope)?;
        let revalidate = matches!(
            scope,
            Scope::All { revalidate: true } | Scope::Connection { .. }
        );
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
            Scope::Connection { .. } => return Ok(out),
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
    fn read(registry: &dyn Backend, scope: Scope<'_>) -> Result<Rows, RegistryError> {
        Ok(match scope {
            Scope::All { .. } => Rows::All(
                registry
                    .list()?
                    .into_iter()
                    .map(|d| (d.name.clone(), d))
                    .collect(),
            ),
            Scope::Device(d) | Scope::Connection { device: d, .. } => {
                Rows::One(registry.get(d.as_str())?)
            }
        })
    }

    fn get(&self, device: &DeviceName) -> Option<&Device> {
        match self {
            Rows::All(rows) => rows.get(device.as_str()),
            Rows::One(row) => row.as_ref().filter(|r| r.name == device.as_str()),
        }
    }
}

/// Past this many devices changed at once, one re-check of everything is cheaper than one
/// per device.
const MANY_CHANGES: usize = 64;

/// Re-checks sessions as the registry backend pushes changes made by others (cluster mode:
/// another node or `certmq devices` wrote the bucket), until shutdown. Each change is
/// applied like the standalone registry poll applies one: [`Live::recheck`] of the devices
/// concerned; an entry replaced under the same name first forgets the old entry's sessions.
pub async fn follow(
    shared: Arc<super::Shared>,
    feed: Arc<ChangeFeed>,
    shutdown: CancellationToken,
) {
    loop {
        let changes = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = feed.next() => c,
        };
        let s = shared.clone();
        let result = tokio::task::spawn_blocking(move || apply(&s, &changes)).await;
        match result {
            Ok(Ok(r)) if r.revoked + r.sessions_forgotten > 0 => tracing::info!(
                revoked = r.revoked,
                kept = r.kept,
                forgotten = r.sessions_forgotten,
                "registry changed: sessions re-checked"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "registry re-check failed; keeping sessions")
            }
            Err(e) => tracing::warn!(error = %e, "registry re-check task failed"),
        }
    }
}

/// One batch of pushed changes. Blocking: call from `spawn_blocking`.
fn apply(shared: &super::Shared, changes: &Changes) -> Result<Recheck, RegistryError> {
    let config = shared.snapshot().config.clone();
    let registry = shared.registry.as_ref();
    // The mirror already holds these changes (it is updated before they are pushed):
    // connections admitted on the old rows that register after the copies below check
    // themselves again.
    shared.live.registry_changed();
    for name in &changes.replaced {
        if let Ok(device) = DeviceName::parse(name) {
            shared.forget_entry(&device);
        }
    }
    let mut total = Recheck::default();
    if changes.devices.len() + changes.replaced.len() > MANY_CHANGES {
        let scope = Scope::All { revalidate: false };
        return shared
            .live
            .recheck(&config, registry, &shared.broker, scope);
    }
    for name in changes.devices.iter().chain(&changes.replaced) {
        let Ok(device) = DeviceName::parse(name) else {
            continue;
        };
        let r = shared
            .live
            .recheck(&config, registry, &shared.broker, Scope::Device(&device))?;
        total.kept += r.kept;
        total.revoked += r.revoked;
        total.subscriptions_removed += r.subscriptions_removed;
        total.sessions_forgotten += r.sessions_forgotten;
    }
    Ok(total)
}
