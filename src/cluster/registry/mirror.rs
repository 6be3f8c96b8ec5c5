//! What one node knows of the registry bucket: every key's last state and revision, fed
//! by the KV watch, by this node's own writes and by fresh reads after a lost
//! compare-and-set. Also how a device name becomes a key and a row becomes a value.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::cert::{Fingerprint, Validity};
use crate::registry::{Changes, Device, Source};

/// The KV key of a device name. Keys may hold only `A-Z a-z 0-9 - _ = . /` and a name may
/// hold any Unicode the identity rules allow, so every byte of the name's UTF-8 other than
/// an ASCII letter, digit, `-` or `_` is written `=XX` (two uppercase hex digits), `=`
/// itself included: `dev-001` stays `dev-001`, `dev.1` is `dev=2E1`, `Zähler` is
/// `Z=C3=A4hler`. One name, one key, and back; no `.`, so a key is one subject token.
pub fn key_of(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

/// The device name of a key written by [`key_of`]; None for anything else.
pub fn name_of(key: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(key.len());
    let mut rest = key.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'=' {
            let hex = tail.get(..2)?;
            if !hex
                .iter()
                .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h))
            {
                return None;
            }
            let byte = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            // Canonical form only: a byte that needs no escape must not be escaped.
            if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
                return None;
            }
            bytes.push(byte);
            rest = &tail[2..];
        } else if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            bytes.push(b);
            rest = tail;
        } else {
            return None;
        }
    }
    String::from_utf8(bytes).ok().filter(|n| !n.is_empty())
}

/// The value of a registry key: the row, as JSON. `entry` tells two entries of one name
/// apart (deleted, then provisioned again); `node` says who wrote it last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    pub source: String,
    pub fingerprint: String,
    pub not_before: i64,
    pub not_after: i64,
    pub enabled: bool,
    pub created_at: i64,
    pub updated_at: i64,
    pub last_seen_at: Option<i64>,
    #[serde(default)]
    pub dropped_messages: u64,
    pub entry: u64,
    pub node: String,
}

impl Record {
    /// A record of `device` for entry `entry`, written by `node` at `now`.
    pub fn of(device: &Device, entry: u64, node: &str, now: i64) -> Record {
        Record {
            name: device.name.clone(),
            source: device.source.as_str().to_owned(),
            fingerprint: device.fingerprint.to_hex(),
            not_before: device.validity.not_before,
            not_after: device.validity.not_after,
            enabled: device.enabled,
            created_at: device.created_at,
            updated_at: now,
            last_seen_at: device.last_seen_at,
            dropped_messages: device.dropped_messages,
            entry,
            node: node.to_owned(),
        }
    }

    pub fn to_bytes(&self) -> bytes::Bytes {
        // A struct of strings and integers always serializes.
        bytes::Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// The state a stored value gives for the key of `name`.
    pub fn decode(name: &str, value: &[u8]) -> Slot {
        let record: Record = match serde_json::from_slice(value) {
            Ok(r) => r,
            Err(e) => return Slot::Bad(format!("not a certmq registry record: {e}")),
        };
        if record.name != name {
            return Slot::Bad(format!("the record names {:?}", record.name));
        }
        let Some(fingerprint) = Fingerprint::from_hex(&record.fingerprint) else {
            return Slot::Bad(format!("invalid fingerprint {:?}", record.fingerprint));
        };
        Slot::Row {
            entry: record.entry,
            device: Device {
                name: record.name,
                source: Source::from_stored(record.source),
                fingerprint,
                validity: Validity {
                    not_before: record.not_before,
                    not_after: record.not_after,
                },
                enabled: record.enabled,
                created_at: record.created_at,
                last_seen_at: record.last_seen_at,
                dropped_messages: record.dropped_messages,
            },
        }
    }
}

/// A key's last known state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    Row {
        device: Device,
        entry: u64,
    },
    /// Deleted (a delete or purge marker).
    Gone,
    /// A value certmq cannot read: the device is neither admitted nor written over.
    Bad(String),
}

/// A state and the revision it was seen at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub revision: u64,
    pub slot: Slot,
}

/// What a key's new state means for the sessions of its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    None,
    /// Re-check them.
    Changed,
    /// Another entry under the same name: forget them.
    Replaced,
}

fn effect(old: Option<&Slot>, new: Option<&Slot>) -> Effect {
    match (old, new) {
        (
            Some(Slot::Row {
                device: a,
                entry: ea,
            }),
            Some(Slot::Row {
                device: b,
                entry: eb,
            }),
        ) => {
            if ea != eb {
                Effect::Replaced
            } else if a.source != b.source
                || a.fingerprint != b.fingerprint
                || a.enabled != b.enabled
            {
                Effect::Changed
            } else {
                // last_seen_at and drop counts only: nothing a session answers to.
                Effect::None
            }
        }
        (None | Some(Slot::Gone), None | Some(Slot::Gone)) => Effect::None,
        _ => Effect::Changed,
    }
}

/// Every key's last known state, by device name. Behind a std Mutex in the registry:
/// lookups and updates are short and never cross an await.
#[derive(Debug, Default)]
pub struct Mirror {
    rows: HashMap<String, Held>,
}

impl Mirror {
    /// The state of `name`, if any was seen.
    pub fn get(&self, name: &str) -> Option<&Held> {
        self.rows.get(name)
    }

    /// Every held state.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Held)> {
        self.rows.iter()
    }

    /// The highest revision held: changes whenever anything newer was applied.
    pub fn high_water(&self) -> u64 {
        self.rows.values().map(|h| h.revision).max().unwrap_or(0)
    }

    /// Applies a state seen at `revision` when it is newer than the one held (the watch
    /// may deliver, after the fact, a revision this node already wrote or read), and
    /// records in `changes` what it means for sessions.
    pub fn apply(&mut self, name: &str, held: Held, changes: &mut Changes) {
        let old = self.rows.get(name);
        if old.is_some_and(|o| o.revision >= held.revision) {
            return;
        }
        match effect(old.map(|o| &o.slot), Some(&held.slot)) {
            Effect::None => {}
            Effect::Changed => {
                changes.devices.insert(name.to_owned());
            }
            Effect::Replaced => {
                changes.replaced.insert(name.to_owned());
            }
        }
        self.rows.insert(name.to_owned(), held);
    }

    /// Replaces everything with a full snapshot of the bucket read up to revision
    /// `through` (a resync after the watch was lost). A key held at a revision above
    /// `through` was written after the snapshot and is kept.
    pub fn replace_all(
        &mut self,
        snapshot: HashMap<String, Held>,
        through: u64,
        changes: &mut Changes,
    ) {
        let mut next = snapshot;
        for (name, old) in &self.rows {
            if old.revision > through && next.get(name).is_none_or(|n| n.revision < old.revision) {
                next.insert(name.clone(), old.clone());
            }
        }
        let names: std::collections::BTreeSet<&String> =
            self.rows.keys().chain(next.keys()).collect();
        for name in names {
            let old = self.rows.get(name).map(|h| &h.slot);
            match effect(old, next.get(name).map(|h| &h.slot)) {
                Effect::None => {}
                Effect::Changed => {
                    changes.devices.insert(name.clone());
                }
                Effect::Replaced => {
                    changes.replaced.insert(name.clone());
                }
            }
        }
        self.rows = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_and_decode_back() {
        for name in [
            "dev-001",
            "dev.1",
            "Zähler 7",
            "a=b",
            "日本語の名前",
            "emoji 🚀",
            "_x_",
            "=3D",
            &"ü".repeat(128),
        ] {
            let key = key_of(name);
            assert!(
                key.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'='),
                "{key}"
            );
            assert_eq!(name_of(&key).as_deref(), Some(name), "{key}");
        }
        assert_eq!(key_of("dev.1"), "dev=2E1");
        assert_eq!(key_of("Zähler"), "Z=C3=A4hler");
        // Not ours, or not canonical: no name.
        for key in ["", "a.b", "=2", "=zz", "=41", "=2e", "=FF", "a b"] {
            assert_eq!(name_of(key), None, "{key}");
        }
    }

    fn row(fp: u8, enabled: bool, entry: u64) -> Slot {
        Slot::Row {
            entry,
            device: Device {
                name: "d".into(),
                source: Source::Anchor("fleet".into()),
                fingerprint: Fingerprint::of(&[fp]),
                validity: Validity {
                    not_before: 1,
                    not_after: 2,
                },
                enabled,
                created_at: 0,
                last_seen_at: None,
                dropped_messages: 0,
            },
        }
    }

    #[test]
    fn older_revisions_are_ignored_and_effects_classified() {
        let mut m = Mirror::default();
        let mut c = Changes::default();
        let held = |revision, slot| Held { revision, slot };
        m.apply("d", held(5, row(1, true, 7)), &mut c);
        assert!(c.devices.contains("d"));
        let mut c = Changes::default();
        m.apply("d", held(4, Slot::Gone), &mut c);
        assert!(c.is_empty(), "an older revision changes nothing");
        assert_eq!(m.get("d").map(|h| h.revision), Some(5));
        let mut with_seen = row(1, true, 7);
        if let Slot::Row { device, .. } = &mut with_seen {
            device.last_seen_at = Some(99);
        }
        m.apply("d", held(6, with_seen), &mut c);
        assert!(
            c.is_empty(),
            "a last_seen_at update is not a change for sessions"
        );
        m.apply("d", held(7, row(1, false, 7)), &mut c);
        assert!(c.devices.contains("d"), "disabled");
        let mut c = Changes::default();
        m.apply("d", held(8, row(2, true, 8)), &mut c);
        assert!(c.replaced.contains("d"), "a new entry: {c:?}");
        let mut c = Changes::default();
        m.apply("d", held(9, Slot::Gone), &mut c);
        assert!(c.devices.contains("d"), "deleted");
    }

    #[test]
    fn a_resync_reports_what_changed_meanwhile() {
        let mut m = Mirror::default();
        let mut c = Changes::default();
        let held = |revision, slot| Held { revision, slot };
        m.apply("kept", held(1, row(1, true, 1)), &mut c);
        m.apply("gone", held(2, row(1, true, 2)), &mut c);
        m.apply("new-entry", held(3, row(1, true, 3)), &mut c);
        m.apply("mine", held(20, row(1, true, 20)), &mut c);
        let snapshot = HashMap::from([
            ("kept".to_owned(), held(1, row(1, true, 1))),
            ("new-entry".to_owned(), held(12, row(1, true, 12))),
            ("born".to_owned(), held(13, row(1, true, 13))),
        ]);
        let mut c = Changes::default();
        m.replace_all(snapshot, 15, &mut c);
        assert_eq!(
            c.devices.iter().map(String::as_str).collect::<Vec<_>>(),
            ["born", "gone"]
        );
        assert_eq!(
            c.replaced.iter().map(String::as_str).collect::<Vec<_>>(),
            ["new-entry"]
        );
        assert!(m.get("gone").is_none());
        assert_eq!(m.get("mine").map(|h| h.revision), Some(20), "written after");
    }
}
