//! Retained messages: the last retained message of each topic, delivered on SUBSCRIBE
//! (SPEC 6; MQTT 3.1.1 §3.3.1.3, 5.0 §3.3.1.3).
//!
//! Stored in the same topic-level trie as the subscriptions (`broker::trie`), but
//! walked the other way: a filter through stored topics. `matching("devices/dev-1/#")`
//! therefore visits only the `devices/dev-1` subtree, not every retained topic, and a `+`
//! level fans out over the children of one node only.
//!
//! Generic over the message type `M` so the broker decides what a message is (payload,
//! QoS, properties, expiry). Synchronous and free of I/O, for the same reason as the
//! router: it sits under a short `std` lock. Durability (SPEC 7) and the MQTT 5 rule that
//! shared subscriptions get no retained messages belong to the caller.

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
    /// retained message of `topic`.
    pub fn set(&mut self, topic: &TopicName, message: Option<M>) {
        let levels = topic.as_str().split('/');
        match message {
            Some(message) => {
                let slot = self.root.find_or_insert(levels);
                if slot.replace((topic.clone(), message)).is_none() {
                    self.len += 1;
                }
            }
            None => {
                let removed = self
                    .root
                    .find_mut(levels.clone())
                    .and_then(Option::take)
                    .is_some();
                if removed {
                    self.len -= 1;
                    self.root.prune(levels);
                }
            }
        }
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
