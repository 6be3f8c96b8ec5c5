//! The subscription table: who gets a message published on a topic (contract §5, 6).
//!
//! Every PUBLISH goes through [`Router::route`], so it is built for that call: a trie of
//! topic levels (`broker::trie`) walked once per message, costing O(levels ×
//! matching branches) whatever the number of subscriptions; the result is one [`Target`]
//! per session (overlapping subscriptions merged, MQTT 3.1.1 §3.3.5 / 5.0 §3.3.4) plus one
//! per shared group.
//!
//! It is synchronous and does no I/O, so the broker keeps it under a short `std` lock
//! (never held across `.await`). `route` takes `&self` (the shared groups' round-robin
//! cursors are atomics), so routing can run under the read half of an `RwLock` while
//! SUBSCRIBE and UNSUBSCRIBE take the write half.
//!
//! The router is generic over the subscriber key `K` so it does not depend on the session
//! type. It decides *who*; ACL checks on delivery (`DeviceAcl::can_receive`), the
//! `v1/devices/me/` alias and queueing belong to the caller.

mod subs;

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

pub use crate::mqtt::codec::QoS;
use crate::mqtt::topic::{Subscription, TopicName};

use super::trie::Node;
use subs::{Entry, Subs};

/// MQTT 5 Retain Handling (§3.8.3.1): when retained messages are sent on SUBSCRIBE.
/// MQTT 3.1.1 always sends them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetainHandling {
    /// 0: send retained messages at every SUBSCRIBE.
    SendAlways,
    /// 1: send them only when the subscription did not exist before
    /// ([`Router::subscribe`] returns whether it replaced one).
    SendIfNew,
    /// 2: never send retained messages for this subscription.
    Never,
}

/// Per-subscription options (MQTT 5 §3.8.3.1; MQTT 3.1.1 uses qos only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubOptions {
    /// The granted (maximum) QoS for messages delivered through this subscription.
    pub qos: QoS,
    /// Do not deliver the session's own publications through this subscription.
    pub no_local: bool,
    /// Keep the RETAIN flag of forwarded messages instead of clearing it.
    pub retain_as_published: bool,
    /// When retained messages are sent on SUBSCRIBE (used by the session, kept here so
    /// that persisted subscriptions come back whole).
    pub retain_handling: RetainHandling,
    /// MQTT 5 Subscription Identifier, echoed in the PUBLISH packets this subscription
    /// causes.
    pub subscription_id: Option<u32>,
}

impl SubOptions {
    /// The options of an MQTT 3.1.1 subscription, which only carries a QoS.
    pub fn with_qos(qos: QoS) -> Self {
        Self {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::SendAlways,
            subscription_id: None,
        }
    }
}

/// One delivery decided by the router.
///
/// Non-shared subscriptions give one `Target` per session, never more: overlapping
/// subscriptions of one session are merged. A shared group's delivery is a separate
/// `Target`, even when the chosen member also has a non-shared match or is chosen by
/// another group: MQTT 5 §4.8.2 allows the extra copy, and merging it would make the
/// group's QoS and subscription identifier depend on unrelated subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<K> {
    /// The session that receives the message.
    pub key: K,
    /// The maximum of the matching subscriptions' granted QoS; the caller delivers at the
    /// minimum of this and the message's QoS.
    pub qos: QoS,
    /// True if any matching subscription has retain_as_published.
    pub retain_as_published: bool,
    /// The identifiers of all matching subscriptions that have one, each once, for the MQTT
    /// 5 PUBLISH (§3.3.4: their order is not significant).
    pub subscription_ids: Vec<u32>,
}

impl<K> Target<K> {
    /// The delivery for one subscription.
    fn new(key: K, opts: &SubOptions) -> Self {
        Self {
            key,
            qos: opts.qos,
            retain_as_published: opts.retain_as_published,
            subscription_ids: opts.subscription_id.into_iter().collect(),
        }
    }

    /// Folds another matching subscription of the same session into this delivery.
    fn merge(&mut self, opts: &SubOptions) {
        if opts.qos > self.qos {
            self.qos = opts.qos;
        }
        self.retain_as_published |= opts.retain_as_published;
        if let Some(id) = opts.subscription_id {
            if !self.subscription_ids.contains(&id) {
                self.subscription_ids.push(id);
            }
        }
    }
}

/// The subscription table. See the module documentation.
#[derive(Debug)]
pub struct Router<K> {
    /// The trie of filters; each node holds the subscriptions to its filter.
    root: Node<Entry<K>>,
    /// Each session's subscriptions, so that [`Router::remove_all`] and
    /// [`Router::subscriptions_of`] do not scan the trie. The options live only in the trie.
    by_key: HashMap<K, HashSet<Subscription>>,
    /// Number of subscriptions, i.e. the sum of the `by_key` set sizes.
    len: usize,
    /// Cluster mode: how many sessions hold each subscription (filter, with its shared
    /// group), and the changes from none to some and back since the last
    /// [`Router::take_interest_changes`]. None while nobody asks (standalone).
    interest: Option<Interest>,
}

/// See [`Router::track_interest`].
#[derive(Debug, Default)]
struct Interest {
    counts: HashMap<Subscription, usize>,
    changes: Vec<(Subscription, bool)>,
}

impl Interest {
    fn add(&mut self, sub: &Subscription) {
        let n = self.counts.entry(sub.clone()).or_insert(0);
        *n += 1;
        if *n == 1 {
            self.changes.push((sub.clone(), true));
        }
    }

    fn remove(&mut self, sub: &Subscription) {
        if let Some(n) = self.counts.get_mut(sub) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(sub);
                self.changes.push((sub.clone(), false));
            }
        }
    }
}

impl<K: Clone + Eq + Hash> Default for Router<K> {
    fn default() -> Self {
        Self::new()
    }
}

/// A filter split for the trie: the node path, and whether the filter ends with `#` (so it
/// lives in the node's `rest` slot).
struct FilterPath<'a> {
    /// The levels before a trailing `#`.
    levels: Vec<&'a str>,
    /// True when the filter's last level is `#`.
    multi: bool,
    /// The shared group, if any.
    group: Option<&'a str>,
}

impl<'a> FilterPath<'a> {
    /// Splits a subscription into its trie path.
    fn of(sub: &'a Subscription) -> Self {
        let mut levels: Vec<&str> = sub.filter().as_str().split('/').collect();
        let multi = levels.last() == Some(&"#");
        if multi {
            levels.pop();
        }
        let group = match sub {
            Subscription::Plain(_) => None,
            Subscription::Shared { group, .. } => Some(group.as_str()),
        };
        Self {
            levels,
            multi,
            group,
        }
    }

    /// The path as the trie takes it.
    fn iter(&self) -> impl Iterator<Item = &'a str> + Clone + '_ {
        self.levels.iter().copied()
    }
}

impl<K: Clone + Eq + Hash> Router<K> {
    /// An empty table.
    pub fn new() -> Self {
        Self {
            root: Node::default(),
            by_key: HashMap::new(),
            len: 0,
            interest: None,
        }
    }

    /// Starts counting subscribers per subscription (cluster mode): every subscription
    /// held now is reported as a change, and from now on each first subscriber and each
    /// last one leaving.
    pub fn track_interest(&mut self) {
        let mut interest = Interest::default();
        for subs in self.by_key.values() {
            for sub in subs {
                interest.add(sub);
            }
        }
        self.interest = Some(interest);
    }

    /// The interest changes since the last call, in order (empty when not tracking).
    pub fn take_interest_changes(&mut self) -> Vec<(Subscription, bool)> {
        match &mut self.interest {
            Some(i) if !i.changes.is_empty() => std::mem::take(&mut i.changes),
            _ => Vec::new(),
        }
    }

    /// Adds or replaces (same key + same filter string, shared group included) a
    /// subscription. Returns true if it replaced an existing one (MQTT 5 retain handling 1
    /// needs this).
    pub fn subscribe(&mut self, key: &K, sub: &Subscription, opts: SubOptions) -> bool {
        let path = FilterPath::of(sub);
        let entry = self.root.find_or_insert(path.iter());
        let subs: &mut Subs<K> = if path.multi {
            entry.rest.get_or_insert_with(Box::default)
        } else {
            &mut entry.exact
        };
        let replaced = subs.insert(key, path.group, opts);
        if !replaced {
            self.by_key
                .entry(key.clone())
                .or_default()
                .insert(sub.clone());
            self.len += 1;
            if let Some(i) = &mut self.interest {
                i.add(sub);
            }
        }
        replaced
    }

    /// Removes one subscription. Returns true if the subscription existed.
    pub fn unsubscribe(&mut self, key: &K, sub: &Subscription) -> bool {
        let Some(subs) = self.by_key.get_mut(key) else {
            return false;
        };
        if !subs.remove(sub) {
            return false;
        }
        if subs.is_empty() {
            self.by_key.remove(key);
        }
        self.len -= 1;
        self.remove_from_trie(key, sub);
        if let Some(i) = &mut self.interest {
            i.remove(sub);
        }
        true
    }

    /// Removes every subscription of a session (clean session end, session expiry).
    pub fn remove_all(&mut self, key: &K) {
        let Some(subs) = self.by_key.remove(key) else {
            return;
        };
        self.len -= subs.len();
        for sub in &subs {
            self.remove_from_trie(key, sub);
            if let Some(i) = &mut self.interest {
                i.remove(sub);
            }
        }
    }

    /// The subscriptions a session holds with their options (for persistence and for
    /// re-checking ACLs on reload), sorted by filter then group so the order is stable.
    pub fn subscriptions_of(&self, key: &K) -> Vec<(Subscription, SubOptions)> {
        let Some(subs) = self.by_key.get(key) else {
            return Vec::new();
        };
        let mut out: Vec<(Subscription, SubOptions)> = subs
            .iter()
            .filter_map(|sub| {
                let opts = self.options(key, sub)?;
                Some((sub.clone(), opts.clone()))
            })
            .collect();
        out.sort_by(|(a, _), (b, _)| sort_key(a).cmp(&sort_key(b)));
        out
    }

    /// Everyone who must get a message published on `topic` by `publisher` (`None` for a
    /// message from the broker itself, such as a will or a `$SYS` update).
    ///
    /// - non-shared subscriptions: one [`Target`] per session, merged; a subscription with
    ///   no_local is skipped when its session is the publisher;
    /// - shared subscriptions `$share/G/f`: for each group (per filter) exactly one member,
    ///   chosen round-robin among those for which `eligible(key)` is true (the caller
    ///   passes "is connected"); if none is, the next member in rotation anyway (it will
    ///   queue). That delivery is its own `Target` (see [`Target`]);
    /// - `$` topics are not matched by filters whose first level is `+` or `#`.
    ///
    /// The order of the targets is unspecified.
    pub fn route(
        &self,
        topic: &TopicName,
        publisher: Option<&K>,
        eligible: impl Fn(&K) -> bool,
    ) -> Vec<Target<K>> {
        self.route_with(topic, publisher, eligible, true)
    }

    /// [`Router::route`] without the shared groups (cluster mode: a group's member is
    /// chosen cluster-wide, and its deliveries come through [`Router::pick_shared`]).
    pub fn route_plain(&self, topic: &TopicName, publisher: Option<&K>) -> Vec<Target<K>> {
        self.route_with(topic, publisher, |_| true, false)
    }

    /// One member of the shared subscription `sub` (`$share/G/f`), chosen as
    /// [`Router::route`] chooses (round-robin among the eligible, else the next one).
    /// None when this router holds no member of it.
    pub fn pick_shared(
        &self,
        sub: &Subscription,
        eligible: impl Fn(&K) -> bool,
    ) -> Option<Target<K>> {
        let path = FilterPath::of(sub);
        let group = path.group?;
        let entry = self.root.find(path.iter())?.value();
        let subs = if path.multi {
            entry.rest.as_deref()?
        } else {
            &entry.exact
        };
        let (key, opts) = subs.shared.get(group)?.pick(None, &eligible)?;
        Some(Target::new(key.clone(), opts))
    }

    /// [`Router::route`] when its answer depends only on the table: None when a shared
    /// group matches (its member is chosen per message, among those connected with room).
    /// What a publisher may keep for its next message on the same topic, until the table
    /// changes.
    pub fn route_fixed(&self, topic: &TopicName, publisher: Option<&K>) -> Option<Vec<Target<K>>> {
        let matched = self.matching_subs(topic);
        if matched.iter().any(|s| !s.shared.is_empty()) {
            return None;
        }
        Some(self.targets(matched, publisher, |_| true, false))
    }

    fn route_with(
        &self,
        topic: &TopicName,
        publisher: Option<&K>,
        eligible: impl Fn(&K) -> bool,
        shared: bool,
    ) -> Vec<Target<K>> {
        let matched = self.matching_subs(topic);
        self.targets(matched, publisher, eligible, shared)
    }

    /// The targets of the matched nodes (see [`Router::route`]).
    fn targets(
        &self,
        matched: Vec<&Subs<K>>,
        publisher: Option<&K>,
        eligible: impl Fn(&K) -> bool,
        shared: bool,
    ) -> Vec<Target<K>> {
        let plain_nodes = matched.iter().filter(|s| !s.plain.is_empty()).count();
        let capacity = matched.iter().map(|s| s.plain.len() + s.shared.len()).sum();
        let mut targets: Vec<Target<K>> = Vec::with_capacity(capacity);
        let skip = |key: &K, opts: &SubOptions| opts.no_local && publisher == Some(key);
        if plain_nodes <= 1 {
            // One filter matched: its map already holds each session once.
            for subs in &matched {
                for (key, opts) in &subs.plain {
                    if !skip(key, opts) {
                        targets.push(Target::new(key.clone(), opts));
                    }
                }
            }
        } else {
            let mut index: HashMap<&K, usize> = HashMap::with_capacity(capacity);
            for subs in &matched {
                for (key, opts) in &subs.plain {
                    if skip(key, opts) {
                        continue;
                    }
                    match index.get(key) {
                        Some(&at) => targets[at].merge(opts),
                        None => {
                            index.insert(key, targets.len());
                            targets.push(Target::new(key.clone(), opts));
                        }
                    }
                }
            }
        }
        for subs in matched.iter().filter(|_| shared) {
            for group in subs.shared.values() {
                if let Some((key, opts)) = group.pick(publisher, &eligible) {
                    targets.push(Target::new(key.clone(), opts));
                }
            }
        }
        targets
    }

    /// Number of subscriptions (plain and shared) over all sessions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nobody is subscribed to anything.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every node payload whose filter matches `topic`: a walk of the trie with an explicit
    /// stack (no recursion, see `broker::trie`). At the root, a `$` topic skips the
    /// `+` child and the `#` slot.
    fn matching_subs(&self, topic: &TopicName) -> Vec<&Subs<K>> {
        let mut matched = Vec::new();
        let mut stack = vec![(&self.root, topic.as_str().split('/'), topic.is_system())];
        while let Some((node, mut rest, dollar_at_root)) = stack.pop() {
            let entry = node.value();
            let Some(level) = rest.next() else {
                matched.push(&entry.exact);
                if let Some(multi) = &entry.rest {
                    matched.push(multi);
                }
                continue;
            };
            if !dollar_at_root {
                if let Some(multi) = &entry.rest {
                    matched.push(multi);
                }
                if let Some(plus) = node.plus() {
                    stack.push((plus, rest.clone(), false));
                }
            }
            if let Some(child) = node.child(level) {
                stack.push((child, rest, false));
            }
        }
        matched.retain(|subs| !subs.is_empty());
        matched
    }

    /// The stored options of one subscription.
    fn options(&self, key: &K, sub: &Subscription) -> Option<&SubOptions> {
        let path = FilterPath::of(sub);
        let entry = self.root.find(path.iter())?.value();
        let subs = if path.multi {
            entry.rest.as_deref()?
        } else {
            &entry.exact
        };
        subs.get(key, path.group)
    }

    /// Removes one subscription from the trie and prunes the nodes it leaves empty.
    fn remove_from_trie(&mut self, key: &K, sub: &Subscription) {
        let path = FilterPath::of(sub);
        let Some(entry) = self.root.find_mut(path.iter()) else {
            return;
        };
        if path.multi {
            if let Some(multi) = entry.rest.as_mut() {
                multi.remove(key, path.group);
                if multi.is_empty() {
                    entry.rest = None;
                }
            }
        } else {
            entry.exact.remove(key, path.group);
        }
        self.root.prune(path.iter());
    }

    /// True when the trie holds no node besides an empty root (tests check pruning).
    #[cfg(test)]
    fn trie_is_bare(&self) -> bool {
        self.root.is_bare()
    }
}

/// A stable order for [`Router::subscriptions_of`]: by filter, plain before shared, then
/// by group.
fn sort_key(sub: &Subscription) -> (&str, Option<&str>) {
    match sub {
        Subscription::Plain(filter) => (filter.as_str(), None),
        Subscription::Shared { group, filter } => (filter.as_str(), Some(group.as_str())),
    }
}

#[cfg(test)]
mod tests;
