//! Set, replace and clear; matching with `+`, `#` and the `$` rule; pruning; a brute-force
//! comparison of `matching` with a naive scan over `filter_matches`.

use std::collections::BTreeMap;

use super::*;
use crate::broker::trie::test_gen::{random_filter, random_topic, XorShift};
use crate::mqtt::topic::filter_matches;

fn topic(s: &str) -> TopicName {
    TopicName::parse(s).unwrap()
}

fn filter(s: &str) -> TopicFilter {
    TopicFilter::parse(s).unwrap()
}

/// The topics (as strings) and messages `filter` finds.
fn found(store: &Retained<u32>, f: &str) -> Vec<(String, u32)> {
    store
        .matching(&filter(f))
        .into_iter()
        .map(|(t, m)| (t.as_str().to_owned(), m))
        .collect()
}

fn pairs(items: &[(&str, u32)]) -> Vec<(String, u32)> {
    items.iter().map(|(t, m)| ((*t).to_owned(), *m)).collect()
}

#[test]
fn set_replace_and_clear() {
    let mut store = Retained::new();
    store.set(&topic("a/b"), Some(1));
    store.set(&topic("a"), Some(2));
    assert_eq!(store.len(), 2);
    store.set(&topic("a/b"), Some(3));
    assert_eq!(store.len(), 2, "replaced, not added");
    assert_eq!(found(&store, "a/b"), pairs(&[("a/b", 3)]));

    store.set(&topic("a/b"), None);
    assert_eq!(store.len(), 1);
    assert!(found(&store, "a/b").is_empty());
    store.set(&topic("a/b"), None);
    store.set(&topic("never/set"), None);
    assert_eq!(store.len(), 1, "clearing nothing changes nothing");
    assert_eq!(found(&store, "a"), pairs(&[("a", 2)]));

    store.set(&topic("a"), None);
    assert!(store.is_empty());
    assert!(store.trie_is_bare(), "{store:?}");
}

#[test]
fn wildcards_match_stored_topics() {
    let mut store = Retained::new();
    for (i, t) in ["a", "a/b", "a/b/c", "a/c", "b/b", "a/", "/b"]
        .into_iter()
        .enumerate()
    {
        store.set(&topic(t), Some(i as u32));
    }
    assert_eq!(
        found(&store, "a/#"),
        pairs(&[("a", 0), ("a/", 5), ("a/b", 1), ("a/b/c", 2), ("a/c", 3)])
    );
    assert_eq!(
        found(&store, "a/+"),
        pairs(&[("a/", 5), ("a/b", 1), ("a/c", 3)])
    );
    assert_eq!(
        found(&store, "+/b"),
        pairs(&[("/b", 6), ("a/b", 1), ("b/b", 4)])
    );
    assert_eq!(found(&store, "+/+/+"), pairs(&[("a/b/c", 2)]));
    assert_eq!(found(&store, "#").len(), 7);
    assert!(found(&store, "a/b/c/d").is_empty());
    assert!(found(&store, "c/#").is_empty());
}

#[test]
fn dollar_topics_are_not_matched_by_leading_wildcards() {
    let mut store = Retained::new();
    store.set(&topic("$SYS/x"), Some(1));
    store.set(&topic("a/x"), Some(2));
    assert_eq!(found(&store, "#"), pairs(&[("a/x", 2)]));
    assert_eq!(found(&store, "+/x"), pairs(&[("a/x", 2)]));
    assert_eq!(found(&store, "$SYS/#"), pairs(&[("$SYS/x", 1)]));
    assert_eq!(found(&store, "$SYS/+"), pairs(&[("$SYS/x", 1)]));
}

#[test]
fn matching_agrees_with_a_naive_scan() {
    let mut rng = XorShift::new(7);
    for round in 0..200 {
        let mut store = Retained::new();
        let mut model: BTreeMap<String, u32> = BTreeMap::new();
        for value in 0..rng.below(40) as u32 {
            let t = random_topic(&mut rng);
            if rng.below(4) == 0 {
                store.set(&t, None);
                model.remove(t.as_str());
            } else {
                store.set(&t, Some(value));
                model.insert(t.as_str().to_owned(), value);
            }
        }
        assert_eq!(store.len(), model.len());
        for _ in 0..30 {
            let f = random_filter(&mut rng);
            let expected: Vec<(String, u32)> = model
                .iter()
                .filter(|(t, _)| filter_matches(&f, t))
                .map(|(t, m)| (t.clone(), *m))
                .collect();
            assert_eq!(found(&store, &f), expected, "round {round}, filter {f}");
        }
    }
}

/// A 65,536-level topic (65,535 bytes of `/`) on a 256 KiB stack.
#[test]
fn deep_topics_need_no_stack() {
    let worker = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(|| {
            let deep = "/".repeat(65_535);
            let mut store = Retained::new();
            store.set(&topic(&deep), Some(1));
            store.set(&topic(&deep[..100]), Some(2));
            assert_eq!(store.matching(&filter("#")).len(), 2);
            assert_eq!(store.matching(&filter(&deep)).len(), 1);
            store.set(&topic(&deep), None);
            assert_eq!(store.len(), 1);
            store.set(&topic(&deep), Some(3));
            drop(store);
        })
        .unwrap();
    worker.join().unwrap();
}

fn device(name: &str) -> DeviceName {
    DeviceName::parse(name).unwrap()
}

/// contract §4: a device holds at most `max` retained topics; replacing its own needs no new
/// slot, clearing (by anyone) frees one, taking over another device's topic moves it.
#[test]
fn owned_topics_count_against_their_last_publisher() {
    let (a, b) = (device("a"), device("b"));
    let mut store = Owned::new(2);
    store.set(&topic("t/1"), Some(1), Some(&a)).unwrap();
    store.set(&topic("t/2"), Some(2), Some(&a)).unwrap();
    store.set(&topic("t/2"), Some(3), Some(&a)).unwrap();
    assert_eq!(
        store.set(&topic("t/3"), Some(4), Some(&a)),
        Err(QuotaExceeded { max: 2 })
    );
    assert_eq!(
        store.get(&topic("t/3")),
        None,
        "a refused message is not kept"
    );
    assert_eq!(store.held_by(&a), 2);

    // b takes t/1 over: a's slot moves to b.
    store.set(&topic("t/1"), Some(5), Some(&b)).unwrap();
    assert_eq!((store.held_by(&a), store.held_by(&b)), (1, 1));
    store.set(&topic("t/3"), Some(6), Some(&a)).unwrap();
    assert_eq!(store.held_by(&a), 2);

    // Clearing frees the owner's slot, whoever clears; clearing is never refused.
    store.set(&topic("t/3"), None, Some(&b)).unwrap();
    assert_eq!((store.held_by(&a), store.held_by(&b)), (1, 1));
    store.set(&topic("nothing/here"), None, Some(&a)).unwrap();
    assert_eq!(store.len(), 2);
    assert_eq!(found_owned(&store, "#"), pairs(&[("t/1", 5), ("t/2", 3)]));
}

/// Restored messages are never refused, and unknown owners count for nobody; a lowered
/// quota stops a device from adding more but takes nothing away.
#[test]
fn restored_and_unowned_messages() {
    let a = device("a");
    let mut store = Owned::new(1);
    store.restore(&topic("t/1"), 1, Some(a.clone()));
    store.restore(&topic("t/2"), 2, Some(a.clone()));
    store.restore(&topic("t/3"), 3, None);
    assert_eq!(store.held_by(&a), 2);
    assert_eq!(
        store.set(&topic("t/4"), Some(4), Some(&a)),
        Err(QuotaExceeded { max: 1 })
    );
    // Its own topic may still be replaced; an unowned one is a new slot for it.
    store.set(&topic("t/1"), Some(5), Some(&a)).unwrap();
    assert!(store.set(&topic("t/3"), Some(6), Some(&a)).is_err());
    store.set(&topic("t/3"), Some(7), None).unwrap();
    store.set_quota(10);
    store.set(&topic("t/4"), Some(8), Some(&a)).unwrap();
    assert_eq!(store.held_by(&a), 3);
}

fn found_owned(store: &Owned<u32>, f: &str) -> Vec<(String, u32)> {
    store
        .matching(&filter(f))
        .into_iter()
        .map(|(t, m)| (t.as_str().to_owned(), m))
        .collect()
}
