//! Insert, find and prune on the bare trie, including the 65,536-level topic a peer can
//! send.

use super::*;

/// The payload used here: a counter that is "empty" at zero.
#[derive(Debug, Default)]
struct Count(u32);

impl Payload for Count {
    fn is_empty(&self) -> bool {
        self.0 == 0
    }
}

fn levels(path: &str) -> std::str::Split<'_, char> {
    path.split('/')
}

#[test]
fn insert_then_find_exact_and_plus_levels() {
    let mut root: Node<Count> = Node::default();
    root.find_or_insert(levels("a/+/c")).0 = 3;
    assert_eq!(root.find(levels("a/+/c")).map(|n| n.value().0), Some(3));
    assert!(
        root.find(levels("a/b/c")).is_none(),
        "+ is a slot, not a key"
    );
    assert!(root.child("a").and_then(Node::plus).is_some());
    assert_eq!(root.exact_children().count(), 1);
}

#[test]
fn prune_removes_only_the_empty_tail() {
    let mut root: Node<Count> = Node::default();
    root.find_or_insert(levels("a/b/c/d")).0 = 1;
    root.find_or_insert(levels("a/b")).0 = 1;
    root.find_or_insert(levels("a/x")).0 = 1;

    *root.find_mut(levels("a/b/c/d")).unwrap() = Count(0);
    root.prune(levels("a/b/c/d"));
    assert!(root.find(levels("a/b/c")).is_none());
    assert!(
        root.find(levels("a/b")).is_some(),
        "a/b still holds a value"
    );

    *root.find_mut(levels("a/b")).unwrap() = Count(0);
    root.prune(levels("a/b"));
    assert!(root.find(levels("a/b")).is_none());
    assert!(root.find(levels("a/x")).is_some(), "the sibling stays");

    *root.find_mut(levels("a/x")).unwrap() = Count(0);
    root.prune(levels("a/x"));
    assert!(root.is_bare());
}

#[test]
fn prune_keeps_a_node_that_still_has_children_or_a_value() {
    let mut root: Node<Count> = Node::default();
    root.find_or_insert(levels("a/+")).0 = 1;
    root.find_or_insert(levels("a")).0 = 1;
    root.prune(levels("a/+"));
    assert!(
        root.find(levels("a/+")).is_some(),
        "the value was not emptied"
    );
    *root.find_mut(levels("a/+")).unwrap() = Count(0);
    root.prune(levels("a/+"));
    assert!(root.find(levels("a/+")).is_none());
    assert!(root.find(levels("a")).is_some());
}

#[test]
fn prune_of_a_missing_path_changes_nothing() {
    let mut root: Node<Count> = Node::default();
    root.find_or_insert(levels("a")).0 = 1;
    root.prune(levels("a/b/c"));
    root.prune(levels("z"));
    assert_eq!(root.find(levels("a")).map(|n| n.value().0), Some(1));
}

/// A 65,536-level path (a 65,535-byte topic of `/`) on a 256 KiB stack: a recursive
/// insert, prune or drop would overflow it.
#[test]
fn deep_paths_need_no_stack() {
    let worker = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(|| {
            let topic = "/".repeat(65_535);
            let mut root: Node<Count> = Node::default();
            root.find_or_insert(levels(&topic)).0 = 1;
            root.find_or_insert(levels(&topic[..1000])).0 = 1;
            *root.find_mut(levels(&topic)).unwrap() = Count(0);
            root.prune(levels(&topic));
            assert!(root.find(levels(&topic[..1001])).is_none());
            assert!(root.find(levels(&topic[..1000])).is_some());
            root.find_or_insert(levels(&topic)).0 = 1;
            drop(root);
        })
        .unwrap();
    worker.join().unwrap();
}
