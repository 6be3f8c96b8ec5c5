//! Topic aliases the broker assigns towards one MQTT 5 client (MQTT 5 §3.3.2.3.4), so that
//! the topics it receives most often travel as a two-byte alias instead of their full name.
//!
//! Why this shape:
//! - Within the client's Topic Alias Maximum and `max_server_topic_aliases` (default 64,
//!   at most [`MAX_SERVER_TOPIC_ALIASES`]): a client stating 0 (the default, and every MQTT
//!   3.1.1 client) never gets an alias, and costs nothing here but a branch. The setting
//!   exists for clients that state a maximum but cannot resolve server aliases
//!   (libmosquitto 2.0 refuses an empty topic name; paho-mqtt for Python hands it on).
//! - While an alias is free, a new topic gets one at once (most subscribers see few
//!   topics). Once all are taken, a topic takes over the alias of the least used aliased
//!   topic when it has been delivered more often ("most frequent"). Counting every topic a
//!   `#` subscriber sees would grow without bound, so topics without an alias are counted
//!   by hash in a fixed table with the Space-Saving rule (a new topic replaces the least
//!   counted one and inherits its count as a possible error): no copy of their names, and
//!   a topic only takes over an alias on what it was surely delivered, and only after two
//!   deliveries at least, so a stream of distinct topics never churns the aliases. Counts
//!   are halved every [`AGE_EVERY`] deliveries, so yesterday's busy topic gives way.
//! - A delivery whose topic has an alias (the common case) allocates nothing: a hash, a scan
//!   of the aliases' hashes (contiguous `u64`s), and the PUBLISH then carries no copy of the
//!   topic. Only taking an alias copies the topic, into the slot (whose buffer is reused).
//! - Deciding and recording are two steps ([`OutAliases::choose`], [`OutAliases::confirm`]):
//!   a PUBLISH that is not sent (too large for the client) must not leave the broker
//!   believing the client learnt a mapping.
//! - Mappings live and die with the connection (the client forgets them at a reconnect);
//!   messages resent after a reconnect are aliased afresh.

use std::hash::{BuildHasher, RandomState};

use crate::broker::wire::TopicRef;
use crate::config::MAX_SERVER_TOPIC_ALIASES;

/// Topics without an alias whose counts are kept, at least: with few aliases, a table that
/// small would forget a busy topic between two of its deliveries.
const MIN_CANDIDATES: usize = 16;

/// Deliveries between two halvings of every count.
const AGE_EVERY: u32 = 4096;

/// One alias in use: the topic it names and how often it was delivered (since aging).
/// Its hash is in [`OutAliases::hashes`], at the same index.
#[derive(Debug)]
struct Slot {
    topic: String,
    hits: u32,
}

/// A topic without an alias, known by its hash. `hits - error` is how often it was surely
/// delivered (Space-Saving: `error` is the count it inherited).
#[derive(Debug, Clone, Copy)]
struct Candidate {
    hash: u64,
    hits: u32,
    error: u32,
}

/// What [`OutAliases::choose`] decided for one delivery, to pass to
/// [`OutAliases::confirm`] once the PUBLISH is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    topic_ref: TopicRef,
    hash: u64,
    /// The count the topic brings into its slot when it takes one.
    hits: u32,
}

impl Choice {
    const NAME: Choice = Choice {
        topic_ref: TopicRef::Name,
        hash: 0,
        hits: 0,
    };

    /// How the PUBLISH names its topic.
    pub fn topic_ref(&self) -> TopicRef {
        self.topic_ref
    }
}

/// The aliases of one connection. See the module documentation.
#[derive(Debug)]
pub struct OutAliases {
    /// The aliases this connection may use; 0: none.
    limit: u16,
    /// Alias `n` is `slots[n - 1]`, whose topic's hash is `hashes[n - 1]`: the lookup of
    /// every delivery scans these.
    hashes: Vec<u64>,
    slots: Vec<Slot>,
    candidates: Vec<Candidate>,
    /// Per connection keys: a client cannot aim its topics at one counter.
    hasher: RandomState,
    /// Deliveries since the counts were last halved.
    since_aging: u32,
}

impl OutAliases {
    /// `limit`: the client's Topic Alias Maximum, capped by `max_server_topic_aliases`.
    /// No allocation until the first aliased delivery.
    pub fn new(limit: u16) -> OutAliases {
        OutAliases {
            limit: limit.min(MAX_SERVER_TOPIC_ALIASES),
            hashes: Vec::new(),
            slots: Vec::new(),
            candidates: Vec::new(),
            hasher: RandomState::new(),
            since_aging: 0,
        }
    }

    /// Decides how the next PUBLISH on `topic` names it, and counts the delivery.
    pub fn choose(&mut self, topic: &str) -> Choice {
        if self.limit == 0 {
            return Choice::NAME;
        }
        self.age();
        let hash = self.hasher.hash_one(topic);
        let found = self
            .hashes
            .iter()
            .enumerate()
            .position(|(i, h)| *h == hash && self.slots[i].topic == topic);
        if let Some(i) = found {
            let slot = &mut self.slots[i];
            slot.hits = slot.hits.saturating_add(1);
            return Choice {
                topic_ref: TopicRef::Alias(alias_of(i)),
                hash,
                hits: slot.hits,
            };
        }
        if self.slots.len() < usize::from(self.limit) {
            return Choice {
                topic_ref: TopicRef::Set(alias_of(self.slots.len())),
                hash,
                hits: 1,
            };
        }
        let surely = self.count_candidate(hash);
        // The first of the least used slots, so that ties always pick the lowest alias.
        let least = self
            .slots
            .iter()
            .enumerate()
            .min_by_key(|(i, s)| (s.hits, *i))
            .map(|(i, s)| (i, s.hits));
        // Once is not "frequent": a topic seen once never takes an alias over, however
        // idle the aliased topics (their counts may have aged down to 0).
        match least {
            Some((i, hits)) if surely > hits.max(1) => Choice {
                topic_ref: TopicRef::Set(alias_of(i)),
                hash,
                hits: surely,
            },
            _ => Choice::NAME,
        }
    }

    /// Records that the PUBLISH chosen for `topic` was sent: a new or taken-over alias now
    /// names it for the client.
    pub fn confirm(&mut self, choice: Choice, topic: &str) {
        let TopicRef::Set(alias) = choice.topic_ref else {
            return;
        };
        let i = usize::from(alias - 1);
        if i == self.slots.len() {
            self.hashes.push(choice.hash);
            self.slots.push(Slot {
                topic: topic.to_owned(),
                hits: choice.hits,
            });
            return;
        }
        let (Some(slot), Some(hash)) = (self.slots.get_mut(i), self.hashes.get_mut(i)) else {
            return;
        };
        // The topic that loses its alias is counted from now on as the candidate that
        // took it over was.
        let evicted = Candidate {
            hash: *hash,
            hits: slot.hits,
            error: 0,
        };
        slot.topic.clear();
        slot.topic.push_str(topic);
        slot.hits = choice.hits;
        *hash = choice.hash;
        match self.candidates.iter_mut().find(|c| c.hash == choice.hash) {
            Some(c) => *c = evicted,
            None => self.candidates.push(evicted),
        }
    }

    /// Counts a delivery of a topic without an alias; returns how often it surely was.
    fn count_candidate(&mut self, hash: u64) -> u32 {
        if let Some(c) = self.candidates.iter_mut().find(|c| c.hash == hash) {
            c.hits = c.hits.saturating_add(1);
            return c.hits - c.error;
        }
        if self.candidates.len() < usize::from(self.limit).max(MIN_CANDIDATES) {
            self.candidates.push(Candidate {
                hash,
                hits: 1,
                error: 0,
            });
            return 1;
        }
        if let Some(least) = self.candidates.iter_mut().min_by_key(|c| c.hits) {
            *least = Candidate {
                hash,
                hits: least.hits.saturating_add(1),
                error: least.hits,
            };
        }
        1
    }

    /// Halves every count once per [`AGE_EVERY`] deliveries.
    fn age(&mut self) {
        self.since_aging += 1;
        if self.since_aging < AGE_EVERY {
            return;
        }
        self.since_aging = 0;
        for slot in &mut self.slots {
            slot.hits /= 2;
        }
        for c in &mut self.candidates {
            c.hits /= 2;
            c.error /= 2;
        }
    }
}

/// Alias `index + 1`; `index` is below the limit, a `u16`.
fn alias_of(index: usize) -> u16 {
    u16::try_from(index + 1).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chooses and confirms, as a sent PUBLISH does.
    fn deliver(a: &mut OutAliases, topic: &str) -> TopicRef {
        let choice = a.choose(topic);
        a.confirm(choice, topic);
        choice.topic_ref()
    }

    #[test]
    fn none_without_a_client_maximum() {
        let mut a = OutAliases::new(0);
        for _ in 0..3 {
            assert_eq!(deliver(&mut a, "t"), TopicRef::Name);
        }
        assert!(a.slots.is_empty() && a.candidates.is_empty());
    }

    #[test]
    fn free_aliases_go_to_new_topics_then_are_used_alone() {
        let mut a = OutAliases::new(3);
        assert_eq!(deliver(&mut a, "a"), TopicRef::Set(1));
        assert_eq!(deliver(&mut a, "b"), TopicRef::Set(2));
        assert_eq!(deliver(&mut a, "a"), TopicRef::Alias(1));
        assert_eq!(deliver(&mut a, "b"), TopicRef::Alias(2));
    }

    #[test]
    fn a_choice_not_confirmed_teaches_nothing() {
        let mut a = OutAliases::new(1);
        assert_eq!(a.choose("a").topic_ref(), TopicRef::Set(1));
        // The PUBLISH was not sent: the next one must set the alias again.
        assert_eq!(deliver(&mut a, "a"), TopicRef::Set(1));
        assert_eq!(deliver(&mut a, "a"), TopicRef::Alias(1));
    }

    #[test]
    fn the_limit_is_kept_and_capped() {
        for (limit, kept) in [(5, 5), (u16::MAX, MAX_SERVER_TOPIC_ALIASES)] {
            let mut a = OutAliases::new(limit);
            for i in 0..usize::from(kept) + 10 {
                let r = deliver(&mut a, &format!("t/{i}"));
                if i < usize::from(kept) {
                    assert_eq!(r, TopicRef::Set(alias_of(i)));
                } else {
                    assert_eq!(r, TopicRef::Name);
                }
            }
            assert_eq!(a.slots.len(), usize::from(kept));
        }
    }

    #[test]
    fn distinct_topics_never_churn_the_aliases() {
        let mut a = OutAliases::new(2);
        deliver(&mut a, "hot/1");
        deliver(&mut a, "hot/2");
        // Many more distinct topics than candidates, each once: none is surely more
        // frequent than an aliased topic, however the inherited counts grow.
        for i in 0..10_000 {
            assert_eq!(deliver(&mut a, &format!("cold/{i}")), TopicRef::Name, "{i}");
        }
        assert_eq!(deliver(&mut a, "hot/1"), TopicRef::Alias(1));
        assert!(a.candidates.len() <= MIN_CANDIDATES);
    }

    #[test]
    fn a_topic_that_became_busy_takes_over_an_idle_alias() {
        let mut a = OutAliases::new(1);
        for _ in 0..10 {
            deliver(&mut a, "early");
        }
        let mut took_over = None;
        for i in 0..100 {
            if deliver(&mut a, "late") == TopicRef::Set(1) {
                took_over = Some(i);
                break;
            }
        }
        assert_eq!(
            took_over,
            Some(10),
            "the 11th delivery outnumbers the 10 earlier ones"
        );
        assert_eq!(deliver(&mut a, "late"), TopicRef::Alias(1));
        assert_eq!(deliver(&mut a, "early"), TopicRef::Name);
    }

    #[test]
    fn counts_are_halved_as_time_goes_by() {
        let mut a = OutAliases::new(1);
        for _ in 0..AGE_EVERY - 1 {
            deliver(&mut a, "a");
        }
        assert_eq!(a.slots[0].hits, AGE_EVERY - 1);
        deliver(&mut a, "a");
        assert_eq!(a.slots[0].hits, (AGE_EVERY - 1) / 2 + 1);
    }
}
