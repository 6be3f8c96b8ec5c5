//! The registry port: one API over the two stores of the devices table, so that the
//! admission (`auth::decide`), the live re-checks (`server::live`) and the `certmq devices`
//! commands never know which one runs (docs/cluster.md, "Registry").
//!
//! - [`Registry`](super::Registry): SQLite in `data_dir`, the standalone default.
//! - `cluster::registry::KvRegistry`: a NATS JetStream key-value bucket shared by every
//!   node of a cluster, read from an in-memory mirror kept by a KV watch.
//!
//! The step-7 rules are not part of a backend: both run the one pure function
//! [`decide`](super::decide) inside their own atomic step (an SQLite transaction; a
//! compare-and-set on the key's revision).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use super::{Admitted, Device, Mode, PinnedSync, Presented, Refusal, Registry, RegistryError};
use crate::config::PinnedDevice;

/// A store of the device registry. Every method is synchronous and may block (a commit
/// waits for fsync; a cluster write for NATS): the server calls them from `spawn_blocking`,
/// except [`Backend::touch`], [`Backend::count_dropped`] and the reads of a backend whose
/// reads are in memory.
pub trait Backend: crate::tls::KnownDevices + Send + Sync {
    /// Contract §3 step 7 for one connection, atomically: with `Mode::Commit`, provisioning and
    /// rotation are stored before this returns; `Mode::DryRun` writes nothing.
    fn admit(
        &self,
        presented: &Presented<'_>,
        mode: Mode,
    ) -> Result<Result<Admitted, Refusal>, RegistryError>;
    /// Enters the config's pinned devices (at start and on reload); see
    /// [`Registry::sync_pinned`].
    fn sync_pinned(&self, pinned: &[PinnedDevice], mode: Mode)
        -> Result<PinnedSync, RegistryError>;
    /// One device.
    fn get(&self, name: &str) -> Result<Option<Device>, RegistryError>;
    /// Every device, by name.
    fn list(&self) -> Result<Vec<Device>, RegistryError>;
    /// `devices enable|disable NAME`; [`RegistryError::UnknownDevice`] when there is none.
    fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), RegistryError>;
    /// `devices delete NAME`; [`RegistryError::UnknownDevice`] when there is none.
    fn delete(&self, name: &str) -> Result<(), RegistryError>;
    /// `devices import`: enters `devices` as they are. Nothing is written when any of them
    /// conflicts with a device already held (same name, another rule or certificate).
    fn import(&self, devices: &[Device]) -> Result<Imported, RegistryError>;
    /// Records a connection time (memory only; written by [`Backend::flush_last_seen`]).
    fn touch(&self, name: &str, at: i64);
    /// Counts messages dropped for a device's sessions (memory only, as `touch`).
    fn count_dropped(&self, name: &str, n: u64);
    /// Writes what `touch` and `count_dropped` collected, as far as this backend's policy
    /// says (docs/cluster.md, "last_seen_at"). Called every second.
    fn flush_last_seen(&self) -> Result<usize, RegistryError>;
    /// How this backend tells the server that another process changed the registry.
    fn feed(&self) -> Feed;
    /// With [`Feed::Poll`]: a number that changes when another process committed.
    fn data_version(&self) -> Result<i64, RegistryError>;
    /// Whether provisioning could be stored now (the health check).
    fn writable(&self) -> Result<(), RegistryError>;
    /// The end of a graceful stop: leaves the store complete and lets it go (SQLite: the
    /// WAL checkpointed, the connection closed; the cluster: pending `last_seen_at` writes
    /// done). Nothing calls the backend afterwards.
    fn close(&self) -> Result<(), RegistryError>;
    /// Where the registry lives, for messages (a file, or a bucket on NATS).
    fn describe(&self) -> String;
}

/// How the server learns of registry changes made elsewhere.
pub enum Feed {
    /// Poll [`Backend::data_version`] (SQLite: another process, the CLI, committed).
    Poll,
    /// The backend pushes what changed as it happens (the cluster's KV watch).
    Push(Arc<ChangeFeed>),
}

/// What an `import` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Imported {
    /// Entered now.
    pub added: Vec<String>,
    /// Already held with the same rule and certificate: left as they are.
    pub present: Vec<String>,
    /// Held with another rule or certificate: (name, what the registry holds). When the
    /// list is found before writing, nothing was written.
    pub conflicts: Vec<(String, String)>,
}

/// Registry changes made by others (another node, the CLI), waiting for the server's
/// re-check. Coalesced: a device changed ten times before the server looks is one entry.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Devices whose row changed in a way that matters to a session: created, deleted,
    /// disabled or enabled, rebound, rotated.
    pub devices: BTreeSet<String>,
    /// Devices whose entry was replaced by a new one under the same name without the
    /// deletion being seen (a resync after an outage): their sessions belong to the old
    /// entry (contract §4) and are forgotten.
    pub replaced: BTreeSet<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty() && self.replaced.is_empty()
    }
}

/// The queue between a backend that pushes changes and the server task that re-checks
/// sessions. std Mutex: pushed and taken in short sections, never across an await; the
/// Notify keeps one wake-up when nobody waits, so no change is missed.
#[derive(Debug, Default)]
pub struct ChangeFeed {
    pending: Mutex<Changes>,
    notify: tokio::sync::Notify,
}

impl ChangeFeed {
    /// Adds changes and wakes the consumer.
    pub fn push(&self, changes: Changes) {
        if changes.is_empty() {
            return;
        }
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.devices.extend(changes.devices);
            pending.replaced.extend(changes.replaced);
        }
        self.notify.notify_one();
    }

    /// Takes what is pending, if anything.
    pub fn take(&self) -> Option<Changes> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        (!pending.is_empty()).then(|| std::mem::take(&mut *pending))
    }

    /// Waits until something is pending and takes it.
    pub async fn next(&self) -> Changes {
        loop {
            if let Some(c) = self.take() {
                return c;
            }
            self.notify.notified().await;
        }
    }
}

/// A shared backend is a backend: the server holds `Arc<dyn Backend>` and passes
/// `&shared.registry` wherever a `&dyn Backend` is asked.
impl<B: crate::tls::KnownDevices + ?Sized> crate::tls::KnownDevices for Arc<B> {
    fn device_with(&self, fingerprint: &crate::cert::Fingerprint) -> Option<String> {
        (**self).device_with(fingerprint)
    }
}

impl<B: Backend + ?Sized> Backend for Arc<B> {
    fn admit(
        &self,
        presented: &Presented<'_>,
        mode: Mode,
    ) -> Result<Result<Admitted, Refusal>, RegistryError> {
        (**self).admit(presented, mode)
    }
    fn sync_pinned(
        &self,
        pinned: &[PinnedDevice],
        mode: Mode,
    ) -> Result<PinnedSync, RegistryError> {
        (**self).sync_pinned(pinned, mode)
    }
    fn get(&self, name: &str) -> Result<Option<Device>, RegistryError> {
        (**self).get(name)
    }
    fn list(&self) -> Result<Vec<Device>, RegistryError> {
        (**self).list()
    }
    fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), RegistryError> {
        (**self).set_enabled(name, enabled)
    }
    fn delete(&self, name: &str) -> Result<(), RegistryError> {
        (**self).delete(name)
    }
    fn import(&self, devices: &[Device]) -> Result<Imported, RegistryError> {
        (**self).import(devices)
    }
    fn touch(&self, name: &str, at: i64) {
        (**self).touch(name, at)
    }
    fn count_dropped(&self, name: &str, n: u64) {
        (**self).count_dropped(name, n)
    }
    fn flush_last_seen(&self) -> Result<usize, RegistryError> {
        (**self).flush_last_seen()
    }
    fn feed(&self) -> Feed {
        (**self).feed()
    }
    fn data_version(&self) -> Result<i64, RegistryError> {
        (**self).data_version()
    }
    fn writable(&self) -> Result<(), RegistryError> {
        (**self).writable()
    }
    fn close(&self) -> Result<(), RegistryError> {
        (**self).close()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

impl Backend for Registry {
    fn admit(
        &self,
        presented: &Presented<'_>,
        mode: Mode,
    ) -> Result<Result<Admitted, Refusal>, RegistryError> {
        Registry::admit(self, presented, mode)
    }

    fn sync_pinned(
        &self,
        pinned: &[PinnedDevice],
        mode: Mode,
    ) -> Result<PinnedSync, RegistryError> {
        Registry::sync_pinned(self, pinned, mode)
    }

    fn get(&self, name: &str) -> Result<Option<Device>, RegistryError> {
        Registry::get(self, name)
    }

    fn list(&self) -> Result<Vec<Device>, RegistryError> {
        Registry::list(self)
    }

    fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), RegistryError> {
        Registry::set_enabled(self, name, enabled)
    }

    fn delete(&self, name: &str) -> Result<(), RegistryError> {
        Registry::delete(self, name)
    }

    fn import(&self, devices: &[Device]) -> Result<Imported, RegistryError> {
        Registry::import(self, devices)
    }

    fn touch(&self, name: &str, at: i64) {
        Registry::touch(self, name, at)
    }

    fn count_dropped(&self, name: &str, n: u64) {
        Registry::count_dropped(self, name, n)
    }

    fn flush_last_seen(&self) -> Result<usize, RegistryError> {
        Registry::flush_last_seen(self)
    }

    fn feed(&self) -> Feed {
        Feed::Poll
    }

    fn data_version(&self) -> Result<i64, RegistryError> {
        Registry::data_version(self)
    }

    fn writable(&self) -> Result<(), RegistryError> {
        Registry::writable(self)
    }

    fn close(&self) -> Result<(), RegistryError> {
        Registry::close(self)
    }

    fn describe(&self) -> String {
        self.path().display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_change_pushed_before_anyone_waits_is_not_lost() {
        let feed = ChangeFeed::default();
        feed.push(Changes {
            devices: BTreeSet::from(["a".to_owned()]),
            ..Changes::default()
        });
        feed.push(Changes {
            devices: BTreeSet::from(["a".to_owned(), "b".to_owned()]),
            replaced: BTreeSet::from(["c".to_owned()]),
        });
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), feed.next())
            .await
            .expect("pending changes are taken at once");
        assert_eq!(got.devices.len(), 2, "coalesced: {got:?}");
        assert_eq!(got.replaced.len(), 1);
        assert!(feed.take().is_none());
        feed.push(Changes::default());
        assert!(feed.take().is_none(), "an empty push is nothing");
    }
}
