//! contract §5 and 6, black-box: retained messages, `+` / `#` wildcards and `$` topics, publish
//! and subscribe ACLs with deny lists, the ThingsBoard `v1/devices/me/` alias both ways,
//! and shared subscriptions.

use std::collections::BTreeSet;

use crate::common::coretests::both_versions;
use crate::common::coretests::{Msg, Peer, Setup, BACKEND_PROFILE, MARKER, V};

fn msg(topic: &str, payload: &[u8], qos: u8, retain: bool) -> Msg {
    Msg {
        topic: topic.to_owned(),
        payload: payload.to_vec(),
        qos,
        retain,
        dup: false,
    }
}

/// What 3.1.1 and MQTT 5 answer to a refused subscription.
fn refused(v: V) -> u8 {
    match v {
        V::V4 => 0x80,
        V::V5 => 0x87,
    }
}

/// What a denied QoS 1 publish is acknowledged with: PUBACK (3.1.1), reason 0x87 (5).
fn denied_ack(v: V) -> u8 {
    match v {
        V::V4 => 0,
        V::V5 => 0x87,
    }
}

// ---------------------------------------------------------------- retained

/// A retained message reaches a later subscriber with the retain flag set.
async fn retained_on_subscribe(v: V) {
    let s = Setup::new().await;
    let mut backend = s.peer(&s.pinned("backend"), v, "backend").await;
    assert_eq!(
        backend.publish("devices/dev-1/state", 1, true, b"on").await,
        0
    );
    let mut dev = s.peer(&s.device("dev-1"), v, "dev").await;
    assert_eq!(dev.subscribe("devices/dev-1/#", 1).await, 1);
    assert_eq!(dev.recv().await, msg("devices/dev-1/state", b"on", 1, true));
}

both_versions! {
    #[tokio::test]
    retained_delivered_on_subscribe_with_retain_flag_v311,
    retained_delivered_on_subscribe_with_retain_flag_v5 => retained_on_subscribe;
}

/// A retained PUBLISH forwarded live to an existing subscriber has retain = 0 (MQTT 3.1.1
/// §3.3.1.3; MQTT 5 without Retain As Published).
async fn live_retained_has_retain_0(v: V) {
    let s = Setup::new().await;
    let mut dev = s.peer(&s.device("dev-1"), v, "dev").await;
    assert_eq!(dev.subscribe("devices/dev-1/#", 1).await, 1);
    let mut backend = s.peer(&s.pinned("backend"), v, "backend").await;
    backend.publish("devices/dev-1/state", 1, true, b"on").await;
    assert_eq!(
        dev.recv().await,
        msg("devices/dev-1/state", b"on", 1, false)
    );
}

both_versions! {
    #[tokio::test]
    live_forwarded_retained_publish_has_retain_0_v311,
    live_forwarded_retained_publish_has_retain_0_v5 => live_retained_has_retain_0;
}

/// An empty retained payload clears the retained message. The later subscriber subscribes
/// to the cleared topic first and to a topic holding a retained marker second: retained
/// messages are queued per SUBSCRIBE in order, so the marker comes after anything left.
async fn empty_payload_clears(v: V) {
    let s = Setup::new().await;
    let mut backend = s.peer(&s.pinned("backend"), v, "backend").await;
    backend.publish("devices/dev-1/state", 1, true, b"on").await;
    backend.publish("devices/dev-1/state", 1, true, b"").await;
    backend.publish("devices/dev-1/zz", 1, true, MARKER).await;
    let mut dev = s.peer(&s.device("dev-1"), v, "dev").await;
    assert_eq!(dev.subscribe("devices/dev-1/state", 1).await, 1);
    assert_eq!(dev.subscribe("devices/dev-1/zz", 1).await, 1);
    assert_eq!(dev.recv_until_marker().await, vec![]);
}

both_versions! {
    #[tokio::test]
    empty_retained_payload_clears_v311, empty_retained_payload_clears_v5 => empty_payload_clears;
}

// ---------------------------------------------------------------- wildcards

#[tokio::test]
async fn plus_and_hash_wildcards() {
    let s = Setup::new().await;
    let backend = s.pinned("backend");
    let mut plus = s.peer(&backend, V::V4, "plus").await;
    assert_eq!(plus.subscribe("devices/+/t", 1).await, 1);
    let mut hash = s.peer(&backend, V::V5, "hash").await;
    assert_eq!(hash.subscribe("devices/dev-1/#", 1).await, 1);
    let mut publisher = s.peer(&backend, V::V4, "pub").await;
    for topic in [
        "devices/dev-1/t",
        "devices/dev-2/t",
        "devices/dev-1/t/x",
        "devices/dev-1",
        "devices/dev-1/a/b",
        "devices/dev-10/t/u",
    ] {
        publisher.publish(topic, 1, false, topic.as_bytes()).await;
    }
    publisher.publish("devices/mark/t", 1, false, MARKER).await;
    publisher
        .publish("devices/dev-1/mark", 1, false, MARKER)
        .await;
    let topics = |got: Vec<Msg>| got.into_iter().map(|m| m.topic).collect::<Vec<_>>();
    assert_eq!(
        topics(plus.recv_until_marker().await),
        ["devices/dev-1/t", "devices/dev-2/t"]
    );
    assert_eq!(
        topics(hash.recv_until_marker().await),
        [
            "devices/dev-1/t",
            "devices/dev-1/t/x",
            "devices/dev-1",
            "devices/dev-1/a/b"
        ]
    );
}

/// `$` topics: a client publish to `$SYS/x` is denied (3.1.1: PUBACKed anyway; 5: 0x87)
/// and reaches neither `#` nor `$SYS/#`; a `$dev/x` message the profile allows reaches
/// `$dev/#` but not `#`; `#` does not cover `$SYS/#`.
async fn dollar_topics(v: V) {
    let profiles = format!(
        "{BACKEND_PROFILE}[acl.dollar]\npublish = [\"#\", \"$dev/#\"]\nsubscribe = [\"#\", \"$dev/#\", \"$SYS/#\"]\n"
    );
    let s = Setup::start(&[("backend", "backend"), ("dollar", "dollar")], &profiles).await;
    let dollar = s.pinned("dollar");
    let mut all = s.peer(&s.pinned("backend"), v, "all").await;
    assert_eq!(all.subscribe("#", 1).await, 1);
    assert_eq!(all.subscribe("$SYS/#", 1).await, refused(v));
    let mut sys = s.peer(&dollar, v, "sys").await;
    assert_eq!(sys.subscribe("$SYS/#", 1).await, 1);
    assert_eq!(sys.subscribe("plain/#", 1).await, 1);
    let mut dev = s.peer(&dollar, v, "dev").await;
    assert_eq!(dev.subscribe("$dev/#", 1).await, 1);
    assert_eq!(dev.subscribe("plain/#", 1).await, 1);

    let mut publisher = s.peer(&dollar, v, "pub").await;
    assert_eq!(
        publisher.publish("$SYS/x", 1, false, b"sys").await,
        denied_ack(v)
    );
    assert_eq!(publisher.publish("$dev/x", 1, false, b"dev").await, 0);
    publisher.publish("plain/m", 1, false, MARKER).await;

    assert_eq!(all.recv_until_marker().await, vec![]);
    assert_eq!(sys.recv_until_marker().await, vec![]);
    assert_eq!(
        dev.recv_until_marker().await,
        vec![msg("$dev/x", b"dev", 1, false)]
    );
}

both_versions! {
    #[tokio::test]
    dollar_topics_not_matched_by_hash_and_sys_publish_denied_v311,
    dollar_topics_not_matched_by_hash_and_sys_publish_denied_v5 => dollar_topics;
}

// ---------------------------------------------------------------- ACL

/// A device's publish outside its tree is acknowledged (3.1.1) or refused with 0x87 (5),
/// at QoS 1 and 2, and never delivered.
async fn publish_outside_tree(v: V) {
    let s = Setup::new().await;
    let mut backend = s.peer(&s.pinned("backend"), v, "backend").await;
    assert_eq!(backend.subscribe("#", 2).await, 2);
    let mut dev = s.peer(&s.device("dev-1"), v, "dev").await;
    assert_eq!(
        dev.publish("devices/dev-2/t", 1, false, b"q1").await,
        denied_ack(v)
    );
    assert_eq!(
        dev.publish("devices/dev-2/t", 2, false, b"q2").await,
        denied_ack(v)
    );
    assert_eq!(
        dev.publish("elsewhere", 1, false, b"q1").await,
        denied_ack(v)
    );
    assert_eq!(dev.publish("devices/dev-1/m", 1, false, MARKER).await, 0);
    assert_eq!(backend.recv_until_marker().await, vec![]);
}

both_versions! {
    #[tokio::test]
    device_publish_outside_its_tree_is_dropped_v311,
    device_publish_outside_its_tree_is_dropped_v5 => publish_outside_tree;
}

/// `devices/#` is refused to dev-1 (0x80 / 0x87) while `devices/dev-1/#` is granted; a
/// message for dev-2 does not reach dev-1.
async fn subscribe_outside_tree(v: V) {
    let s = Setup::new().await;
    let mut dev = s.peer(&s.device("dev-1"), v, "dev").await;
    assert_eq!(dev.subscribe("devices/#", 1).await, refused(v));
    assert_eq!(dev.subscribe("devices/+/t", 1).await, refused(v));
    assert_eq!(dev.subscribe("devices/dev-1/#", 1).await, 1);
    let mut backend = s.peer(&s.pinned("backend"), v, "backend").await;
    backend
        .publish("devices/dev-2/t", 1, false, b"not yours")
        .await;
    backend.publish("devices/dev-1/t", 1, false, MARKER).await;
    assert_eq!(dev.recv_until_marker().await, vec![]);
}

both_versions! {
    #[tokio::test]
    device_subscribe_outside_its_tree_is_refused_v311,
    device_subscribe_outside_its_tree_is_refused_v5 => subscribe_outside_tree;
}

/// `subscribe = ["#"]`, `deny_subscribe = ["admin/#"]`: `#` is granted but `admin/x` is
/// not delivered through it; `admin/#` itself is refused.
async fn deny_subscribe(v: V) {
    let profiles = format!(
        "{BACKEND_PROFILE}[acl.ops]\npublish = [\"#\"]\nsubscribe = [\"#\"]\ndeny_subscribe = [\"admin/#\"]\n"
    );
    let s = Setup::start(&[("backend", "backend"), ("ops", "ops")], &profiles).await;
    let mut ops = s.peer(&s.pinned("ops"), v, "ops").await;
    assert_eq!(ops.subscribe("#", 1).await, 1);
    assert_eq!(ops.subscribe("admin/#", 1).await, refused(v));
    assert_eq!(ops.subscribe("admin/x", 1).await, refused(v));
    let mut backend = s.peer(&s.pinned("backend"), v, "backend").await;
    backend.publish("admin/x", 1, false, b"secret").await;
    backend.publish("other/x", 1, false, b"fine").await;
    backend.publish("other/m", 1, false, MARKER).await;
    assert_eq!(
        ops.recv_until_marker().await,
        vec![msg("other/x", b"fine", 1, false)]
    );
}

both_versions! {
    #[tokio::test]
    deny_subscribe_grants_broad_filter_but_filters_messages_v311,
    deny_subscribe_grants_broad_filter_but_filters_messages_v5 => deny_subscribe;
}

// ---------------------------------------------------------------- v1/devices/me alias

/// dev-1 publishes `v1/devices/me/telemetry`; backends see `v1/devices/dev-1/telemetry`.
async fn alias_inbound(v: V) {
    let s = Setup::new().await;
    let backend = s.pinned("backend");
    let mut by_device = s.peer(&backend, v, "by-device").await;
    assert_eq!(by_device.subscribe("v1/devices/dev-1/#", 1).await, 1);
    let mut by_kind = s.peer(&backend, v, "by-kind").await;
    assert_eq!(by_kind.subscribe("v1/devices/+/telemetry", 1).await, 1);
    let mut dev = s.peer(&s.device("dev-1"), v, "dev").await;
    assert_eq!(
        dev.publish("v1/devices/me/telemetry", 1, false, b"{\"t\":1}")
            .await,
        0
    );
    let expected = msg("v1/devices/dev-1/telemetry", b"{\"t\":1}", 1, false);
    assert_eq!(by_device.recv().await, expected);
    assert_eq!(by_kind.recv().await, expected);
}

both_versions! {
    #[tokio::test]
    me_alias_device_publish_reaches_backend_v311,
    me_alias_device_publish_reaches_backend_v5 => alias_inbound;
}

/// A backend publishes `v1/devices/dev-1/rpc/request/1`; dev-1, subscribed through the
/// alias, receives it as `v1/devices/me/rpc/request/1`. dev-2's request does not reach it.
async fn alias_outbound(v: V) {
    let s = Setup::new().await;
    let mut dev = s.peer(&s.device("dev-1"), v, "dev").await;
    assert_eq!(dev.subscribe("v1/devices/me/rpc/request/+", 1).await, 1);
    let mut backend = s.peer(&s.pinned("backend"), v, "backend").await;
    backend
        .publish("v1/devices/dev-2/rpc/request/1", 1, false, b"other")
        .await;
    backend
        .publish(
            "v1/devices/dev-1/rpc/request/1",
            1,
            false,
            b"{\"m\":\"get\"}",
        )
        .await;
    backend
        .publish("v1/devices/dev-1/rpc/request/2", 1, false, MARKER)
        .await;
    assert_eq!(
        dev.recv_until_marker().await,
        vec![msg(
            "v1/devices/me/rpc/request/1",
            b"{\"m\":\"get\"}",
            1,
            false
        )]
    );
}

both_versions! {
    #[tokio::test]
    me_alias_backend_publish_reaches_device_v311,
    me_alias_backend_publish_reaches_device_v5 => alias_outbound;
}

// ---------------------------------------------------------------- shared subscriptions

/// Three members of `$share/g/devices/+/t` (one per protocol in `members`): each of 30
/// messages goes to exactly one member and every member gets some. Each member also has a
/// plain subscription to `marker/all`, published last, so it has seen all its share once
/// the marker arrives.
async fn shared_group(members: [V; 3]) {
    let s = Setup::new().await;
    let backend = s.pinned("backend");
    let mut peers: Vec<Peer> = Vec::new();
    for (i, v) in members.into_iter().enumerate() {
        let mut p = s.peer(&backend, v, &format!("member-{i}")).await;
        assert_eq!(p.subscribe("$share/g/devices/+/t", 1).await, 1);
        assert_eq!(p.subscribe("marker/all", 1).await, 1);
        peers.push(p);
    }
    let publisher = s.peer(&backend, V::V5, "pub").await;
    for n in 0..30 {
        let topic = format!("devices/dev-{}/t", n % 4);
        publisher
            .publish_nowait(&topic, 1, false, format!("n{n}").as_bytes())
            .await;
    }
    publisher
        .publish_nowait("marker/all", 1, false, MARKER)
        .await;
    let mut seen = BTreeSet::new();
    let mut total = 0;
    for (i, p) in peers.iter_mut().enumerate() {
        let got = p.recv_until_marker().await;
        assert!(!got.is_empty(), "member {i} got none of the 30");
        total += got.len();
        seen.extend(got.into_iter().map(|m| m.payload));
    }
    let expected: BTreeSet<Vec<u8>> = (0..30).map(|n| format!("n{n}").into_bytes()).collect();
    assert_eq!(seen, expected, "every message delivered");
    assert_eq!(total, 30, "each message to exactly one member");
}

#[tokio::test]
async fn shared_subscription_splits_messages_v5() {
    shared_group([V::V5, V::V5, V::V5]).await;
}

#[tokio::test]
async fn shared_subscription_splits_messages_v311() {
    shared_group([V::V4, V::V4, V::V4]).await;
}

#[tokio::test]
async fn shared_subscription_splits_messages_mixed_protocols() {
    shared_group([V::V4, V::V5, V::V4]).await;
}
