//! The registry port (`registry::Backend`) on the cluster's bucket: reads from the mirror,
//! writes by compare-and-set (docs/cluster.md, "Registry").

use super::mirror::{Record, Slot};
use super::{row_of, ImportOne, KvRegistry};
use crate::cert::now_secs;
use crate::config::PinnedDevice;
use crate::registry::{
    self, Admitted, Backend, Device, Feed, Imported, Mode, PinnedSync, Presented, Refusal,
    RegistryError, Source,
};

/// Refused certificates are named by the device they belong to: a scan of the list, which
/// is the in-memory mirror (refusal lines are rate-limited, so this stays rare).
impl crate::tls::KnownDevices for KvRegistry {
    fn device_with(&self, fingerprint: &crate::cert::Fingerprint) -> Option<String> {
        self.list()
            .ok()?
            .into_iter()
            .find(|d| d.fingerprint == *fingerprint)
            .map(|d| d.name)
    }
}

impl Backend for KvRegistry {
    fn admit(
        &self,
        presented: &Presented<'_>,
        mode: Mode,
    ) -> Result<Result<Admitted, Refusal>, RegistryError> {
        let name = presented.name.as_str();
        if mode == Mode::DryRun {
            let held = self.held(name);
            return Ok(registry::decide(
                row_of(&held, name)?.map(|r| r.0),
                presented,
            ));
        }
        self.wait(self.admit_commit(presented))
    }

    fn sync_pinned(
        &self,
        pinned: &[PinnedDevice],
        mode: Mode,
    ) -> Result<PinnedSync, RegistryError> {
        let mut out = PinnedSync::default();
        let mut todo = Vec::new();
        for p in pinned {
            let held = self.held(p.name.as_str());
            match &held.slot {
                Slot::Row { device, .. } => match &device.source {
                    Source::Anchor(anchor) => {
                        out.conflicts.push((p.name.to_string(), anchor.clone()))
                    }
                    Source::Pinned if device.fingerprint != p.info.fingerprint => todo.push(p),
                    Source::Pinned => {}
                },
                Slot::Gone => {
                    out.created.push(p.name.to_string());
                    todo.push(p);
                }
                Slot::Bad(reason) => {
                    return Err(RegistryError::BadRecord {
                        name: p.name.to_string(),
                        reason: reason.clone(),
                    })
                }
            }
        }
        if !out.conflicts.is_empty() || mode == Mode::DryRun || todo.is_empty() {
            return Ok(out);
        }
        self.wait(async {
            for p in todo {
                self.enter_pinned(p).await?;
            }
            Ok(())
        })?;
        Ok(out)
    }

    fn get(&self, name: &str) -> Result<Option<Device>, RegistryError> {
        let held = self.held(name);
        Ok(row_of(&held, name)?.map(|(d, _)| d.clone()))
    }

    fn list(&self) -> Result<Vec<Device>, RegistryError> {
        let mirror = self.inner.mirror();
        let mut out = Vec::new();
        for (name, held) in mirror.iter() {
            if let Some((d, _)) = row_of(held, name)? {
                out.push(d.clone());
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), RegistryError> {
        let now = now_secs();
        self.wait(self.update_row(name, |row| {
            let Some((d, entry)) = row else {
                return Err(RegistryError::UnknownDevice(name.to_owned()));
            };
            let mut d = d.clone();
            d.enabled = enabled;
            Ok(Some(Record::of(&d, entry, &self.node, now)))
        }))
        .map(|_| ())
    }

    fn delete(&self, name: &str) -> Result<(), RegistryError> {
        self.wait(self.remove(name))
    }

    fn import(&self, devices: &[Device]) -> Result<Imported, RegistryError> {
        let mut out = Imported::default();
        for d in devices {
            match row_of(&self.held(&d.name), &d.name) {
                Ok(None) => out.added.push(d.name.clone()),
                Ok(Some((h, _))) if h.source == d.source && h.fingerprint == d.fingerprint => {
                    out.present.push(d.name.clone())
                }
                Ok(Some((h, _))) => out.conflicts.push((d.name.clone(), registry::held_text(h))),
                Err(e) => out.conflicts.push((d.name.clone(), e.to_string())),
            }
        }
        if !out.conflicts.is_empty() {
            out.added.clear();
            return Ok(out);
        }
        // Written one by one: a device provisioned by a node meanwhile is reported as a
        // conflict (or as present), the others are entered.
        let todo: std::collections::HashSet<String> =
            std::mem::take(&mut out.added).into_iter().collect();
        self.wait(async {
            for d in devices.iter().filter(|d| todo.contains(&d.name)) {
                match self.import_one(d).await? {
                    ImportOne::Added => out.added.push(d.name.clone()),
                    ImportOne::Present => out.present.push(d.name.clone()),
                    ImportOne::Conflict(held) => out.conflicts.push((d.name.clone(), held)),
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    fn touch(&self, name: &str, at: i64) {
        let mut activity = self.activity();
        let p = activity.pending(name);
        p.last_seen = p.last_seen.max(Some(at));
    }

    fn count_dropped(&self, name: &str, n: u64) {
        let mut activity = self.activity();
        let p = activity.pending(name);
        p.dropped = p.dropped.saturating_add(n);
    }

    fn flush_last_seen(&self) -> Result<usize, RegistryError> {
        self.flush_activity(false)
    }

    fn feed(&self) -> Feed {
        Feed::Push(self.inner.feed.clone())
    }

    fn data_version(&self) -> Result<i64, RegistryError> {
        Ok(i64::try_from(self.inner.mirror().high_water()).unwrap_or(i64::MAX))
    }

    fn writable(&self) -> Result<(), RegistryError> {
        if self.attached()?.cluster.connected() {
            Ok(())
        } else {
            Err(self.unavailable("not connected to NATS"))
        }
    }

    fn close(&self) -> Result<(), RegistryError> {
        self.flush_activity(true).map(|_| ())
    }

    fn describe(&self) -> String {
        format!("NATS bucket {}", self.bucket)
    }
}
