//! The topic-level trie shared by the subscription table ([`super::router`]) and the
//! retained messages ([`super::retain`]).
//!
//! Each node is one topic level; exact levels are looked up in a `HashMap`, and the `+`
//! level has its own slot so that routing never hashes it. What a node holds (subscriptions,
//! a retained message) is the caller's payload `V`; the walks that match topics against
//! filters live with the callers, because the router walks a topic through stored filters
//! while the retained store walks a filter through stored topics.
//!
//! Nothing here recurses: a peer can send a 65,535-byte topic of `/` characters, i.e. 65,536
//! levels, and a recursive insert, prune or `Drop` on a tokio worker's 2 MiB stack would take
//! the broker down (contract §9). Walks are loops, pruning is two passes over the path, and
//! [`Node`]'s `Drop` empties the subtree through a heap stack.

use std::collections::HashMap;

/// What a node stores. `is_empty` tells the trie when a node with no children can go.
pub(crate) trait Payload: Default {
    /// True when the payload holds nothing worth keeping the node for.
    fn is_empty(&self) -> bool;
}

impl<T> Payload for Option<T> {
    fn is_empty(&self) -> bool {
        self.is_none()
    }
}

/// The wildcard level that gets its own slot instead of a map entry.
const PLUS: &str = "+";

/// One topic level. The root is a node too (the empty path); it is never pruned.
#[derive(Debug)]
pub(crate) struct Node<V> {
    /// Children by exact level text (an empty string is a valid, distinct level).
    children: HashMap<Box<str>, Node<V>>,
    /// The `+` child, kept out of `children` so a routing step costs one hash, not two.
    plus: Option<Box<Node<V>>>,
    /// What the caller stores at this level.
    value: V,
}

impl<V: Payload> Default for Node<V> {
    fn default() -> Self {
        Self {
            children: HashMap::new(),
            plus: None,
            value: V::default(),
        }
    }
}

impl<V: Payload> Node<V> {
    /// The child for one level: `+` is the wildcard child, anything else an exact child.
    pub(crate) fn child(&self, level: &str) -> Option<&Node<V>> {
        if level == PLUS {
            self.plus.as_deref()
        } else {
            self.children.get(level)
        }
    }

    /// Mutable [`Node::child`].
    fn child_mut(&mut self, level: &str) -> Option<&mut Node<V>> {
        if level == PLUS {
            self.plus.as_deref_mut()
        } else {
            self.children.get_mut(level)
        }
    }

    /// The `+` child, for walks that match a topic level against stored filters.
    pub(crate) fn plus(&self) -> Option<&Node<V>> {
        self.plus.as_deref()
    }

    /// The exact children with their level text, for walks that expand a wildcard over
    /// stored topics. The `+` child is not included.
    pub(crate) fn exact_children(&self) -> impl Iterator<Item = (&str, &Node<V>)> {
        self.children
            .iter()
            .map(|(level, node)| (level.as_ref(), node))
    }

    /// The payload at this level.
    pub(crate) fn value(&self) -> &V {
        &self.value
    }

    /// The node at `path` below this one, if it exists.
    pub(crate) fn find<'p>(&self, path: impl Iterator<Item = &'p str>) -> Option<&Node<V>> {
        let mut node = self;
        for level in path {
            node = node.child(level)?;
        }
        Some(node)
    }

    /// The payload at `path`, if the node exists.
    pub(crate) fn find_mut<'p>(&mut self, path: impl Iterator<Item = &'p str>) -> Option<&mut V> {
        let mut node = self;
        for level in path {
            node = node.child_mut(level)?;
        }
        Some(&mut node.value)
    }

    /// The payload at `path`, creating the missing nodes on the way.
    pub(crate) fn find_or_insert<'p>(&mut self, path: impl Iterator<Item = &'p str>) -> &mut V {
        let mut node = self;
        for level in path {
            node = if level == PLUS {
                node.plus.get_or_insert_with(Box::default)
            } else {
                node.children.entry(level.into()).or_default()
            };
        }
        &mut node.value
    }

    /// Removes the nodes at the end of `path` that no longer hold anything, after the
    /// caller emptied the payload there. Cuts one edge: the highest one under which every
    /// node is either the empty end of `path` or only a way to it.
    pub(crate) fn prune<'p, I>(&mut self, path: I)
    where
        I: Iterator<Item = &'p str> + Clone,
    {
        let Some(depth) = self.prunable_from(path.clone()) else {
            return;
        };
        let mut node = self;
        let mut levels = path;
        for _ in 1..depth {
            let Some(next) = levels.next().and_then(|level| node.child_mut(level)) else {
                return;
            };
            node = next;
        }
        match levels.next() {
            Some(PLUS) => node.plus = None,
            Some(level) => {
                node.children.remove(level);
            }
            None => {}
        }
    }

    /// First pass of [`Node::prune`]: the depth (1 = a child of `self`) of the shallowest
    /// node whose whole subtree along `path` can go, or `None` when the end of `path` must
    /// stay (or does not exist).
    fn prunable_from<'p>(&self, mut path: impl Iterator<Item = &'p str>) -> Option<usize> {
        let mut node = self;
        let mut depth = 0;
        let mut cut = None;
        let mut next_level = path.next();
        while let Some(level) = next_level {
            node = node.child(level)?;
            depth += 1;
            next_level = path.next();
            let branches = node.children.len() + usize::from(node.plus.is_some());
            let only_a_way_through = if next_level.is_some() {
                branches == 1
            } else {
                branches == 0
            };
            if node.value.is_empty() && only_a_way_through {
                cut.get_or_insert(depth);
            } else {
                cut = None;
            }
        }
        cut
    }

    /// True when the node holds nothing and leads nowhere (tests check pruning with it).
    #[cfg(test)]
    pub(crate) fn is_bare(&self) -> bool {
        self.value.is_empty() && self.children.is_empty() && self.plus.is_none()
    }
}

impl<V> Drop for Node<V> {
    /// Detaches descendants onto a heap stack before they drop, so that dropping a
    /// 65,536-level chain costs no stack depth.
    fn drop(&mut self) {
        let mut stack: Vec<Node<V>> = Vec::new();
        take_children(self, &mut stack);
        while let Some(mut node) = stack.pop() {
            take_children(&mut node, &mut stack);
        }
    }
}

/// Moves a node's children (exact and `+`) onto `stack`, leaving it childless.
fn take_children<V>(node: &mut Node<V>, stack: &mut Vec<Node<V>>) {
    stack.extend(node.children.drain().map(|(_, child)| child));
    if let Some(plus) = node.plus.take() {
        stack.push(*plus);
    }
}

#[cfg(test)]
pub(crate) mod test_gen;
#[cfg(test)]
mod tests;
