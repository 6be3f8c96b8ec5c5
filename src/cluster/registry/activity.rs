//! `last_seen_at` in cluster mode (docs/cluster.md, "last_seen_at"): what a node saw, kept
//! in memory, and written to a device's record at most once per [`TOUCH_INTERVAL`].

/// A node writes a device's `last_seen_at` at most this often: a write per CONNECT would
/// cost the whole cluster a KV write and a watch delivery to every node per connection.
pub const TOUCH_INTERVAL: i64 = 300;
/// Activity records written per flush (one per second), so that a reconnect storm after a
/// restart spreads its writes instead of holding the flusher.
pub const TOUCH_BATCH: usize = 500;

/// `last_seen_at` and drop counts waiting to be written, and when this node last wrote
/// each device's record.
#[derive(Debug, Default)]
pub struct Activity {
    pending: std::collections::HashMap<String, Pending>,
    written: std::collections::HashMap<String, i64>,
    pruned_at: i64,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Pending {
    pub last_seen: Option<i64>,
    pub dropped: u64,
}

impl Activity {
    pub fn pending(&mut self, name: &str) -> &mut Pending {
        self.pending.entry(name.to_owned()).or_default()
    }

    /// This node wrote `name`'s record at `at` (its last_seen_at included).
    pub fn written(&mut self, name: &str, at: i64) {
        self.written.insert(name.to_owned(), at);
    }

    /// Takes up to `max` pending records whose device was not written in the last
    /// [`TOUCH_INTERVAL`] (every one with `all`), marking them written now.
    pub fn due(&mut self, now: i64, all: bool, max: usize) -> Vec<(String, Pending)> {
        if now - self.pruned_at >= TOUCH_INTERVAL {
            self.written.retain(|_, at| now - *at < TOUCH_INTERVAL);
            self.pruned_at = now;
        }
        let names: Vec<String> = self
            .pending
            .keys()
            .filter(|n| {
                all || self
                    .written
                    .get(*n)
                    .is_none_or(|at| now - at >= TOUCH_INTERVAL)
            })
            .take(max)
            .cloned()
            .collect();
        names
            .into_iter()
            .filter_map(|n| {
                let p = self.pending.remove(&n)?;
                self.written.insert(n.clone(), now);
                Some((n, p))
            })
            .collect()
    }

    /// Puts back what could not be written.
    pub fn restore(&mut self, name: &str, p: Pending) {
        let slot = self.pending(name);
        slot.last_seen = slot.last_seen.max(p.last_seen);
        slot.dropped = slot.dropped.saturating_add(p.dropped);
        self.written.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_is_written_at_most_once_per_interval() {
        let mut a = Activity::default();
        a.pending("d").last_seen = Some(100);
        assert_eq!(a.due(100, false, 10).len(), 1, "never written: due at once");
        a.pending("d").last_seen = Some(110);
        assert!(a.due(110, false, 10).is_empty(), "written 10 s ago");
        assert_eq!(a.due(100 + TOUCH_INTERVAL, false, 10).len(), 1);
        a.pending("d").dropped = 3;
        assert_eq!(
            a.due(101 + TOUCH_INTERVAL, true, 10).len(),
            1,
            "a stop writes all"
        );
        for i in 0..5 {
            a.pending(&format!("n{i}")).last_seen = Some(1);
        }
        let taken = a.due(10_000, false, 2);
        assert_eq!(taken.len(), 2, "bounded per flush");
        // A write that failed puts its entry back (which two were taken depends on the
        // map's order: restore one of them, so the count is the same every run).
        a.restore(
            &taken[0].0,
            Pending {
                last_seen: Some(5),
                dropped: 1,
            },
        );
        assert_eq!(
            a.due(10_000, false, 10).len(),
            4,
            "the three left and the restored one are due"
        );
    }
}
