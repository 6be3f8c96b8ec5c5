//! What one trie node of the router holds: the subscriptions of one filter, plain and
//! shared, and the round-robin choice inside a shared group.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::SubOptions;
use crate::broker::trie::Payload;

/// The payload of a router trie node at path `p`: subscriptions to the filter `p` and to
/// the filter `p/#`.
///
/// `p/#` lives on the node of `p` rather than on a `#` child because it matches topics that
/// end at `p` too (`a/#` matches `a`), and because the walk then needs no extra lookup.
#[derive(Debug)]
pub(super) struct Entry<K> {
    /// Subscriptions whose filter ends exactly here.
    pub(super) exact: Subs<K>,
    /// Subscriptions to this path followed by `#`; boxed because most nodes have none.
    pub(super) rest: Option<Box<Subs<K>>>,
}

impl<K> Default for Entry<K> {
    fn default() -> Self {
        Self {
            exact: Subs::default(),
            rest: None,
        }
    }
}

impl<K> Payload for Entry<K> {
    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.rest.is_none()
    }
}

/// The subscriptions to one filter string.
#[derive(Debug)]
pub(super) struct Subs<K> {
    /// Non-shared subscriptions: one per session, so a map keyed by the session.
    pub(super) plain: HashMap<K, SubOptions>,
    /// Shared subscriptions by group name. A group is per filter (MQTT 5 §4.8.2): the same
    /// name on another filter lives on another node and is another group.
    pub(super) shared: HashMap<Box<str>, Group<K>>,
}

impl<K> Default for Subs<K> {
    fn default() -> Self {
        Self {
            plain: HashMap::new(),
            shared: HashMap::new(),
        }
    }
}

impl<K> Subs<K> {
    /// True when no subscription is left.
    pub(super) fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.shared.is_empty()
    }
}

impl<K: Eq + std::hash::Hash + Clone> Subs<K> {
    /// Adds or replaces one subscription; true if it replaced one.
    pub(super) fn insert(&mut self, key: &K, group: Option<&str>, opts: SubOptions) -> bool {
        match group {
            None => self.plain.insert(key.clone(), opts).is_some(),
            Some(group) => self
                .shared
                .entry(group.into())
                .or_default()
                .insert(key, opts),
        }
    }

    /// Removes one subscription; true if it existed. Drops a group left without members.
    pub(super) fn remove(&mut self, key: &K, group: Option<&str>) -> bool {
        match group {
            None => self.plain.remove(key).is_some(),
            Some(group) => {
                let Some(members) = self.shared.get_mut(group) else {
                    return false;
                };
                let removed = members.remove(key);
                if members.members.is_empty() {
                    self.shared.remove(group);
                }
                removed
            }
        }
    }

    /// The options of one subscription, if it exists.
    pub(super) fn get(&self, key: &K, group: Option<&str>) -> Option<&SubOptions> {
        match group {
            None => self.plain.get(key),
            Some(group) => self.shared.get(group)?.get(key),
        }
    }
}

/// The members of one shared group and where round-robin stands.
///
/// Members are a `Vec` in subscription order: the order is what makes round-robin fair,
/// and joins and leaves are rare next to the messages routed, so a linear search there is
/// the right trade.
#[derive(Debug)]
pub(super) struct Group<K> {
    /// Each member session with its subscription options.
    members: Vec<(K, SubOptions)>,
    /// Index (modulo the member count) where the next choice starts. Atomic so that
    /// `Router::route` takes `&self` and routing can run under a shared (read) lock; a
    /// race between two routers only makes the rotation less even, never delivers twice.
    cursor: AtomicUsize,
}

impl<K> Default for Group<K> {
    fn default() -> Self {
        Self {
            members: Vec::new(),
            cursor: AtomicUsize::new(0),
        }
    }
}

impl<K: Eq + Clone> Group<K> {
    /// Adds a member or replaces its options; true if it replaced.
    fn insert(&mut self, key: &K, opts: SubOptions) -> bool {
        match self.members.iter_mut().find(|(member, _)| member == key) {
            Some((_, old)) => {
                *old = opts;
                true
            }
            None => {
                self.members.push((key.clone(), opts));
                false
            }
        }
    }

    /// Removes a member; the cursor moves back with the members after it, so the rotation
    /// continues where it was.
    fn remove(&mut self, key: &K) -> bool {
        let Some(index) = self.members.iter().position(|(member, _)| member == key) else {
            return false;
        };
        self.members.remove(index);
        let cursor = self.cursor.get_mut();
        if *cursor > index {
            *cursor -= 1;
        }
        true
    }

    /// The options of one member.
    fn get(&self, key: &K) -> Option<&SubOptions> {
        self.members
            .iter()
            .find(|(member, _)| member == key)
            .map(|(_, opts)| opts)
    }

    /// The member that gets the next message: the first eligible one from the cursor on,
    /// or, when none is eligible, the first one from the cursor on anyway (it will queue
    /// the message). A member whose subscription has no_local never gets its own session's
    /// message (MQTT 5 makes that combination a protocol error; the session should refuse
    /// it, and the router stays safe if it does not).
    pub(super) fn pick(
        &self,
        publisher: Option<&K>,
        eligible: &impl Fn(&K) -> bool,
    ) -> Option<&(K, SubOptions)> {
        let count = self.members.len();
        if count == 0 {
            return None;
        }
        let start = self.cursor.load(Ordering::Relaxed) % count;
        let mut fallback = None;
        for step in 0..count {
            let index = (start + step) % count;
            let member = &self.members[index];
            let (key, opts) = member;
            if opts.no_local && publisher == Some(key) {
                continue;
            }
            if eligible(key) {
                self.cursor.store(index + 1, Ordering::Relaxed);
                return Some(member);
            }
            fallback.get_or_insert(index);
        }
        let index = fallback?;
        self.cursor.store(index + 1, Ordering::Relaxed);
        self.members.get(index)
    }
}
