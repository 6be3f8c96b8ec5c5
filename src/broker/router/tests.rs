//! Merging, no_local, the `$` rule, shared groups and the bookkeeping of the subscription
//! table, then a brute-force comparison of `route` with a naive scan over
//! `filter_matches`.

use std::collections::{BTreeMap, HashMap};

use super::*;
use crate::broker::trie::test_gen::{random_filter, random_topic, XorShift};
use crate::mqtt::topic::filter_matches;

fn topic(s: &str) -> TopicName {
    TopicName::parse(s).unwrap()
}

fn sub(s: &str) -> Subscription {
    Subscription::parse(s).unwrap()
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn opts(level: u8) -> SubOptions {
    SubOptions::with_qos(qos(level))
}

fn with_id(level: u8, id: u32) -> SubOptions {
    SubOptions {
        subscription_id: Some(id),
        ..opts(level)
    }
}

fn everyone(_: &u32) -> bool {
    true
}

/// The targets sorted by key, for order-independent comparisons.
fn routed(router: &Router<u32>, t: &str, publisher: Option<u32>) -> Vec<Target<u32>> {
    let mut targets = router.route(&topic(t), publisher.as_ref(), everyone);
    targets.sort_by_key(|target| target.key);
    targets
}

fn keys(targets: &[Target<u32>]) -> Vec<u32> {
    targets.iter().map(|target| target.key).collect()
}

#[test]
fn overlapping_subscriptions_of_one_session_are_merged() {
    let mut router = Router::new();
    router.subscribe(&1, &sub("a/+"), with_id(0, 1));
    router.subscribe(
        &1,
        &sub("a/#"),
        SubOptions {
            retain_as_published: true,
            ..with_id(2, 2)
        },
    );
    router.subscribe(&1, &sub("a/b"), opts(1));
    router.subscribe(&1, &sub("+/b"), with_id(1, 1));
    router.subscribe(&2, &sub("a/b"), opts(1));

    let targets = routed(&router, "a/b", None);
    assert_eq!(keys(&targets), [1, 2], "one delivery per session");
    let mut ids = targets[0].subscription_ids.clone();
    ids.sort_unstable();
    assert_eq!(ids, [1, 2], "every id once");
    assert_eq!(targets[0].qos, QoS::ExactlyOnce);
    assert!(targets[0].retain_as_published);
    assert_eq!(
        targets[1],
        Target {
            key: 2,
            qos: QoS::AtLeastOnce,
            retain_as_published: false,
            subscription_ids: vec![],
        }
    );
}

#[test]
fn merged_qos_is_the_maximum_whatever_the_order() {
    let mut router = Router::new();
    router.subscribe(&1, &sub("x/#"), opts(2));
    router.subscribe(&1, &sub("x/y"), opts(0));
    router.subscribe(&1, &sub("x/+"), opts(1));
    assert_eq!(routed(&router, "x/y", None)[0].qos, QoS::ExactlyOnce);
    router.subscribe(&1, &sub("x/#"), opts(0));
    assert_eq!(routed(&router, "x/y", None)[0].qos, QoS::AtLeastOnce);
}

#[test]
fn no_local_skips_only_the_publishers_own_subscription() {
    let mut router = Router::new();
    let local = SubOptions {
        no_local: true,
        ..opts(1)
    };
    router.subscribe(&1, &sub("a"), local.clone());
    router.subscribe(&2, &sub("a"), local);
    assert_eq!(keys(&routed(&router, "a", Some(1))), [2]);
    assert_eq!(keys(&routed(&router, "a", Some(2))), [1]);
    assert_eq!(keys(&routed(&router, "a", None)), [1, 2]);

    router.subscribe(&1, &sub("#"), with_id(0, 9));
    let targets = routed(&router, "a", Some(1));
    assert_eq!(keys(&targets), [1, 2], "1 still matches through #");
    assert_eq!(targets[0].qos, QoS::AtMostOnce, "only # counts for 1");
    assert_eq!(targets[0].subscription_ids, [9]);
}

#[test]
fn dollar_topics_are_not_matched_by_leading_wildcards() {
    let mut router = Router::new();
    router.subscribe(&1, &sub("#"), opts(0));
    router.subscribe(&2, &sub("+/x"), opts(0));
    router.subscribe(&3, &sub("$SYS/#"), opts(0));
    router.subscribe(&4, &sub("$SYS/+"), opts(0));
    router.subscribe(&5, &sub("+/#"), opts(0));
    router.subscribe(&6, &sub("$share/g/#"), opts(0));
    assert_eq!(keys(&routed(&router, "$SYS/x", None)), [3, 4]);
    assert_eq!(keys(&routed(&router, "a/x", None)), [1, 2, 5, 6]);
    assert_eq!(keys(&routed(&router, "$SYS", None)), [3]);
}

#[test]
fn hash_also_matches_the_parent_level_and_empty_levels_count() {
    let mut router = Router::new();
    router.subscribe(&1, &sub("a/#"), opts(0));
    router.subscribe(&2, &sub("a/+"), opts(0));
    router.subscribe(&3, &sub("/+"), opts(0));
    assert_eq!(keys(&routed(&router, "a", None)), [1]);
    assert_eq!(keys(&routed(&router, "a/", None)), [1, 2]);
    assert_eq!(keys(&routed(&router, "/", None)), [3]);
    assert_eq!(keys(&routed(&router, "a/b/c", None)), [1]);
}

/// How often each key received one of `count` messages on `t`.
fn tally(
    router: &Router<u32>,
    t: &str,
    count: usize,
    eligible: impl Fn(&u32) -> bool,
) -> BTreeMap<u32, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..count {
        let targets = router.route(&topic(t), None, &eligible);
        assert_eq!(targets.len(), 1, "one member per message: {targets:?}");
        *seen.entry(targets[0].key).or_insert(0) += 1;
    }
    seen
}

#[test]
fn a_shared_group_delivers_each_message_to_one_member_round_robin() {
    let mut router = Router::new();
    for key in [1, 2, 3] {
        router.subscribe(&key, &sub("$share/g/t/#"), opts(1));
    }
    let seen = tally(&router, "t/1", 100, everyone);
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
    assert!(
        seen.values().all(|&n| n == 33 || n == 34),
        "round-robin is even: {seen:?}"
    );
}

#[test]
fn two_groups_on_one_filter_each_get_every_message() {
    let mut router = Router::new();
    router.subscribe(&1, &sub("$share/g1/t"), opts(0));
    router.subscribe(&2, &sub("$share/g1/t"), opts(0));
    router.subscribe(&3, &sub("$share/g2/t"), opts(0));
    router.subscribe(&4, &sub("$share/g2/t"), opts(0));
    for _ in 0..10 {
        let got = keys(&routed(&router, "t", None));
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0] == 1 || got[0] == 2);
        assert!(got[1] == 3 || got[1] == 4);
    }
}

#[test]
fn one_group_name_on_two_filters_is_two_groups() {
    let mut router = Router::new();
    router.subscribe(&1, &sub("$share/g/a/#"), opts(0));
    router.subscribe(&2, &sub("$share/g/a/b"), opts(0));
    assert_eq!(keys(&routed(&router, "a/b", None)), [1, 2]);
    assert_eq!(keys(&routed(&router, "a/c", None)), [1]);
}

#[test]
fn offline_members_are_skipped_unless_everyone_is_offline() {
    let mut router = Router::new();
    for key in [1, 2, 3] {
        router.subscribe(&key, &sub("$share/g/t"), opts(1));
    }
    let seen = tally(&router, "t", 10, |key| *key == 2);
    assert_eq!(seen, BTreeMap::from([(2, 10)]));

    let seen = tally(&router, "t", 9, |_| false);
    assert_eq!(seen, BTreeMap::from([(1, 3), (2, 3), (3, 3)]), "rotation");

    let seen = tally(&router, "t", 10, |key| *key != 1);
    assert_eq!(seen, BTreeMap::from([(2, 5), (3, 5)]));
}

#[test]
fn a_shared_delivery_is_separate_from_a_plain_match() {
    let mut router = Router::new();
    router.subscribe(&1, &sub("$share/g/t"), with_id(2, 7));
    router.subscribe(&1, &sub("t"), with_id(0, 8));
    let targets = routed(&router, "t", None);
    assert_eq!(targets.len(), 2);
    let mut pairs: Vec<(u32, QoS)> = targets
        .iter()
        .map(|t| (t.subscription_ids[0], t.qos))
        .collect();
    pairs.sort_by_key(|(id, _)| *id);
    assert_eq!(pairs, [(7, QoS::ExactlyOnce), (8, QoS::AtMostOnce)]);
}

#[test]
fn a_shared_member_with_no_local_never_gets_its_own_message() {
    let mut router = Router::new();
    let local = SubOptions {
        no_local: true,
        ..opts(0)
    };
    router.subscribe(&1, &sub("$share/g/t"), local);
    router.subscribe(&2, &sub("$share/g/t"), opts(0));
    for _ in 0..4 {
        let targets = router.route(&topic("t"), Some(&1), |key| *key == 1);
        assert_eq!(keys(&targets), [2], "1 is skipped even as the fallback");
    }
    router.unsubscribe(&2, &sub("$share/g/t"));
    assert!(router.route(&topic("t"), Some(&1), everyone).is_empty());
}

#[test]
fn leaving_a_group_keeps_the_rotation_going() {
    let mut router = Router::new();
    for key in [1, 2, 3, 4] {
        router.subscribe(&key, &sub("$share/g/t"), opts(0));
    }
    assert_eq!(keys(&routed(&router, "t", None)), [1]);
    assert_eq!(keys(&routed(&router, "t", None)), [2]);
    assert!(router.unsubscribe(&1, &sub("$share/g/t")));
    assert_eq!(keys(&routed(&router, "t", None)), [3], "2 was served last");
    assert_eq!(keys(&routed(&router, "t", None)), [4]);
    assert_eq!(keys(&routed(&router, "t", None)), [2]);
}

#[test]
fn subscribe_reports_replacement_and_replaces_the_options() {
    let mut router = Router::new();
    assert!(!router.subscribe(&1, &sub("a/+"), opts(0)));
    assert!(router.subscribe(&1, &sub("a/+"), with_id(2, 5)));
    assert!(!router.subscribe(&1, &sub("$share/g/a/+"), opts(1)));
    assert!(router.subscribe(&1, &sub("$share/g/a/+"), opts(2)));
    assert!(!router.subscribe(&1, &sub("$share/h/a/+"), opts(1)));
    assert!(!router.subscribe(&2, &sub("a/+"), opts(0)));
    assert_eq!(router.len(), 4);
    assert_eq!(
        router.subscriptions_of(&1),
        [
            (sub("a/+"), with_id(2, 5)),
            (sub("$share/g/a/+"), opts(2)),
            (sub("$share/h/a/+"), opts(1)),
        ]
    );
}

#[test]
fn unsubscribe_removes_one_and_prunes_the_trie() {
    let mut router = Router::new();
    router.subscribe(&1, &sub("a/b/c"), opts(0));
    router.subscribe(&1, &sub("a/#"), opts(0));
    router.subscribe(&2, &sub("$share/g/a/+/c"), opts(0));
    assert!(!router.unsubscribe(&1, &sub("a/b")));
    assert!(!router.unsubscribe(&2, &sub("a/b/c")));
    assert!(!router.unsubscribe(&1, &sub("$share/g/a/+/c")));
    assert!(!router.unsubscribe(&3, &sub("a/#")));

    assert!(router.unsubscribe(&1, &sub("a/b/c")));
    assert!(!router.unsubscribe(&1, &sub("a/b/c")), "only once");
    assert_eq!(keys(&routed(&router, "a/b/c", None)), [1, 2]);
    assert!(router.unsubscribe(&1, &sub("a/#")));
    assert_eq!(keys(&routed(&router, "a/b/c", None)), [2]);
    assert!(router.unsubscribe(&2, &sub("$share/g/a/+/c")));
    assert!(routed(&router, "a/b/c", None).is_empty());
    assert!(router.is_empty());
    assert!(router.trie_is_bare(), "{router:?}");
}

#[test]
fn remove_all_drops_one_session_and_nothing_else() {
    let mut router = Router::new();
    for s in ["a", "a/#", "+/b", "$share/g/a/b", "#"] {
        router.subscribe(&1, &sub(s), opts(0));
    }
    router.subscribe(&2, &sub("a/b"), opts(1));
    router.subscribe(&3, &sub("$share/g/a/b"), opts(0));
    assert_eq!(router.len(), 7);

    router.remove_all(&1);
    assert_eq!(router.len(), 2);
    assert!(router.subscriptions_of(&1).is_empty());
    assert_eq!(keys(&routed(&router, "a/b", None)), [2, 3]);
    assert!(routed(&router, "a", None).is_empty());
    router.remove_all(&1);
    assert_eq!(router.len(), 2);

    router.remove_all(&2);
    router.remove_all(&3);
    assert!(router.trie_is_bare());
}

/// What `route` must return for plain subscriptions, computed from scratch:
/// (key -> (max qos, sorted ids)).
type Naive = BTreeMap<u32, (u8, Vec<u32>)>;

fn naive_route(subs: &HashMap<(u32, String), (u8, u32)>, topic: &TopicName) -> Naive {
    let mut out: Naive = BTreeMap::new();
    for ((key, filter), (level, id)) in subs {
        if filter_matches(filter, topic.as_str()) {
            let entry = out.entry(*key).or_insert((0, Vec::new()));
            entry.0 = entry.0.max(*level);
            entry.1.push(*id);
        }
    }
    for (_, ids) in out.values_mut() {
        ids.sort_unstable();
    }
    out
}

fn as_naive(targets: Vec<Target<u32>>) -> Naive {
    let mut out = BTreeMap::new();
    for mut target in targets {
        target.subscription_ids.sort_unstable();
        let level = target.qos as u8;
        let previous = out.insert(target.key, (level, target.subscription_ids));
        assert!(previous.is_none(), "key {} delivered twice", target.key);
    }
    out
}

#[test]
fn route_agrees_with_a_naive_scan() {
    let mut rng = XorShift::new(0x5eed_cafe);
    for round in 0..200 {
        let mut router = Router::new();
        let mut model: HashMap<(u32, String), (u8, u32)> = HashMap::new();
        let mut next_id = 1;
        for _ in 0..rng.below(40) {
            let key = rng.below(6) as u32;
            let filter = random_filter(&mut rng);
            let level = rng.below(3) as u8;
            if rng.below(5) == 0 {
                let existed = model.remove(&(key, filter.clone())).is_some();
                assert_eq!(router.unsubscribe(&key, &sub(&filter)), existed);
                continue;
            }
            let replaced = model
                .insert((key, filter.clone()), (level, next_id))
                .is_some();
            assert_eq!(
                router.subscribe(&key, &sub(&filter), with_id(level, next_id)),
                replaced
            );
            next_id += 1;
        }
        assert_eq!(router.len(), model.len());
        for _ in 0..30 {
            let t = random_topic(&mut rng);
            let got = as_naive(router.route(&t, None, everyone));
            assert_eq!(
                got,
                naive_route(&model, &t),
                "round {round}, topic {t}, subs {model:?}"
            );
        }
    }
}

#[test]
fn shared_groups_agree_with_a_naive_scan() {
    let mut rng = XorShift::new(42);
    for round in 0..200 {
        let mut router = Router::new();
        // (group, filter) -> members
        let mut groups: HashMap<(String, String), Vec<u32>> = HashMap::new();
        for _ in 0..rng.below(20) {
            let group = rng.pick(&["g", "h"]).to_string();
            let filter = random_filter(&mut rng);
            let key = rng.below(4) as u32;
            router.subscribe(&key, &sub(&format!("$share/{group}/{filter}")), opts(0));
            let members = groups.entry((group, filter)).or_default();
            if !members.contains(&key) {
                members.push(key);
            }
        }
        for _ in 0..30 {
            let t = random_topic(&mut rng);
            let expected: Vec<&Vec<u32>> = groups
                .iter()
                .filter(|((_, filter), _)| filter_matches(filter, t.as_str()))
                .map(|(_, members)| members)
                .collect();
            let got = router.route(&t, None, everyone);
            assert_eq!(got.len(), expected.len(), "round {round}, topic {t}");
            for target in &got {
                assert!(expected.iter().any(|m| m.contains(&target.key)));
            }
        }
    }
}

/// A 65,536-level filter and topic (65,535 bytes of `/`) on a 256 KiB stack.
#[test]
fn deep_filters_and_topics_need_no_stack() {
    let worker = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(|| {
            let deep = "/".repeat(65_535);
            let mut router = Router::new();
            router.subscribe(&1, &sub(&deep), opts(0));
            router.subscribe(&2, &sub(&format!("{}#", &deep[..60_000])), opts(0));
            assert_eq!(keys(&routed(&router, &deep, None)), [1, 2]);
            assert!(router.unsubscribe(&1, &sub(&deep)));
            router.subscribe(&3, &sub(&deep), opts(0));
            drop(router);
        })
        .unwrap();
    worker.join().unwrap();
}
