//! Retained messages: the last retained message of each topic, delivered on SUBSCRIBE
//! (contract §6; MQTT 3.1.1 §3.3.1.3, 5.0 §3.3.1.3).
//!
//! Stored in the same topic-level trie as the subscriptions (`broker::trie`), but
//! walked the other way: a filter through stored topics. `matching("devices/dev-1/#")`
//! therefore visits only the `devices/dev-1` subtree, not every retained topic, and a `+`
//! level fans out over the children of one node only.
//!
//! Generic over the message type `M` so the broker decides what a message is (payload,
//! QoS, properties, expiry). Synchronous and free of I/O, for the same reason as the
//! router: it sits under a short `std` lock. Durability (contract §7) and the MQTT 5 rule that
//! shared subscriptions get no retained messages belong to the caller. [`Owned`] adds who
//! holds each topic, for the per-device quota (contract §4 `max_retained_per_device`).

use std::collections::HashMap;
use std::sync::Arc;

use crate::identity::DeviceName;
use crate::mqtt::topic::{TopicFilter, TopicName};

use super::trie::Node;

/// The retained message of each topic. See the module documentation.
#[derive(Debug)]
pub struct Retained<M> {
    /// One node per topic level; a node holds the topic's retained message, with the full
    /// topic name so that a match can be returned without rebuilding it from the path.
    root: Node<Option<(TopicName, M)>>,
    /// Number of retained messages.
    len: usize,
}

impl<M: Clone> Default for Retained<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M: Clone> Retained<M> {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            root: Node::default(),
            len: 0,
        }
    }

    /// Stores, replaces, or (when `message` is `None`, i.e. an empty payload) clears the
    /// retained message of `topic`. Returns the message it replaced or cleared.
    pub fn set(&mut self, topic: &TopicName, message: Option<M>) -> Option<M> {
        let levels = topic.as_str().split('/');
        match message {
            Some(message) => {
                let slot = self.root.find_or_insert(levels);
                let old = slot.replace((topic.clone(), message));
                if old.is_none() {
                    self.len += 1;
                }
                old.map(|(_, m)| m)
            }
            None => {
                let removed = self.root.find_mut(levels.clone()).and_then(Option::take);
                if removed.is_some() {
                    self.len -= 1;
                    self.root.prune(levels);
                }
                removed.map(|(_, m)| m)
            }
        }
    }

    /// The retained message of `topic`, if any.
    pub fn get(&self, topic: &TopicName) -> Option<&M> {
        self.root
            .find(topic.as_str().split('/'))
            .and_then(|node| node.value().as_ref())
            .map(|(_, m)| m)
    }

    /// Every retained message whose topic matches `filter`, for delivery on SUBSCRIBE,
    /// sorted by topic. A `$` topic is not matched by a filter whose first level is `+` or
    /// `#`, as in [`crate::mqtt::topic::filter_matches`].
    pub fn matching(&self, filter: &TopicFilter) -> Vec<(TopicName, M)> {
        let mut out = Vec::new();
        // (node, the filter levels still to match, whether the node is the root)
        let mut stack = vec![(&self.root, filter.as_str().split('/'), true)];
        while let Some((node, mut rest, at_root)) = stack.pop() {
            match rest.next() {
                None => out.extend(node.value().iter().cloned()),
                Some("#") => collect_subtree(node, at_root, &mut out),
                Some("+") => {
                    for (level, child) in node.exact_children() {
                        if !(at_root && level.starts_with('$')) {
                            stack.push((child, rest.clone(), false));
                        }
                    }
                }
                Some(level) => {
                    if let Some(child) = node.child(level) {
                        stack.push((child, rest, false));
                    }
                }
            }
        }
        out.sort_by(|(a, _), (b, _)| a.cmp(b));
        out
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no message is retained.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when the trie holds no node besides an empty root (tests check pruning).
    #[cfg(test)]
    fn trie_is_bare(&self) -> bool {
        self.root.is_bare()
    }
}

/// Why a retained message was not kept (contract §4 `max_retained_per_device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the device already holds {max} retained topics (max_retained_per_device)")]
pub struct QuotaExceeded {
    pub max: usize,
}

/// The broker's retained messages with their owners (contract §4): a retained message belongs to
/// the device that published it last, and a device holds at most `max` of them. Clearing a
/// topic (empty payload, whoever sends it) frees its owner's slot; replacing one's own
/// topic needs no new slot; taking over another device's topic moves the slot.
///
/// An owner of `None` (a message stored before owners were recorded, or published without
/// a device) counts for nobody. Owners are `Arc`s: `matching` clones entries, and a name
/// per retained message would be an allocation per match.
#[derive(Debug)]
pub struct Owned<M> {
    topics: Retained<(M, Option<Arc<DeviceName>>)>,
    /// Retained topics per owner; devices holding none are absent.
    held: HashMap<DeviceName, usize>,
    max: usize,
}

impl<M: Clone> Owned<M> {
    /// An empty store with a quota of `max` topics per device.
    pub fn new(max: usize) -> Self {
        Self {
            topics: Retained::new(),
            held: HashMap::new(),
            max,
        }
    }

    /// A new quota (reload): devices above it keep what they hold but add nothing.
    pub fn set_quota(&mut self, max: usize) {
        self.max = max;
    }

    /// Stores, replaces or (`None`) clears the retained message of `topic` on behalf of
    /// `owner`, unless that would give `owner` more than its quota of topics. Clearing is
    /// never refused.
    pub fn set(
        &mut self,
        topic: &TopicName,
        message: Option<M>,
        owner: Option<&DeviceName>,
    ) -> Result<(), QuotaExceeded> {
        if let (Some(_), Some(owner)) = (&message, owner) {
            let own = self
                .topics
                .get(topic)
                .is_some_and(|(_, o)| o.as_deref() == Some(owner));
            if !own && self.held_by(owner) >= self.max {
                return Err(QuotaExceeded { max: self.max });
            }
        }
        self.put(topic, message, owner.map(|o| Arc::new(o.clone())));
        Ok(())
    }

    /// Puts back a stored message, never refused: a quota lowered since only stops the
    /// device from adding more.
    pub fn restore(&mut self, topic: &TopicName, message: M, owner: Option<DeviceName>) {
        self.put(topic, Some(message), owner.map(Arc::new));
    }

    fn put(&mut self, topic: &TopicName, message: Option<M>, owner: Option<Arc<DeviceName>>) {
        let entry = message.map(|m| (m, owner));
        let added = entry.as_ref().and_then(|(_, o)| o.clone());
        if let Some((_, Some(previous))) = self.topics.set(topic, entry) {
            if let Some(n) = self.held.get_mut(&*previous) {
                *n -= 1;
                if *n == 0 {
                    self.held.remove(&*previous);
                }
            }
        }
        if let Some(owner) = added {
            *self.held.entry((*owner).clone()).or_default() += 1;
        }
    }

    /// The retained message of `topic`, if any.
    pub fn get(&self, topic: &TopicName) -> Option<&M> {
        self.topics.get(topic).map(|(m, _)| m)
    }

    /// Every retained message whose topic matches `filter`, sorted by topic (see
    /// [`Retained::matching`]).
    pub fn matching(&self, filter: &TopicFilter) -> Vec<(TopicName, M)> {
        self.topics
            .matching(filter)
            .into_iter()
            .map(|(t, (m, _))| (t, m))
            .collect()
    }

    /// Retained topics `device` holds.
    pub fn held_by(&self, device: &DeviceName) -> usize {
        self.held.get(device).copied().unwrap_or(0)
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.topics.len()
    }

    /// True when no message is retained.
    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }
}

/// Everything at and below `start` (`a/#` matches `a` itself), skipping `$` first
/// levels when `start` is the root. An explicit stack: topics can be 65,536 levels deep.
fn collect_subtree<M: Clone>(
    start: &Node<Option<(TopicName, M)>>,
    at_root: bool,
    out: &mut Vec<(TopicName, M)>,
) {
    let mut stack = vec![start];
    let mut first = true;
    while let Some(node) = stack.pop() {
        out.extend(node.value().iter().cloned());
        let skip_dollar = first && at_root;
        first = false;
        stack.extend(
            node.exact_children()
                .filter(|(level, _)| !(skip_dollar && level.starts_with('$')))
                .map(|(_, child)| child),
        );
    }
}

#[cfg(test)]
mod tests;
