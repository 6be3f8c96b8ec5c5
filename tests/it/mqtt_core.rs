//! contract §6, black-box: QoS 0, 1 and 2 end to end with their acknowledgement flows,
//! overlapping subscriptions of one session, and QoS 2 exactly-once across a reconnect in
//! the middle of the exchange, both directions. Sessions, keep alive and wills are in
//! `mqtt_core_sessions.rs`; retained messages, wildcards, ACLs, the `me` alias and shared
//! subscriptions in `mqtt_core_routing.rs`.

use crate::common::coretests::both_versions;
use crate::common::coretests::raw::{
    parse_publish, raw_ack, raw_publish, raw_subscribe, Raw, RawConnect, PUBACK, PUBCOMP, PUBREC,
    PUBREL,
};
use crate::common::coretests::{Msg, Peer, Setup, MARKER, V};

/// Asserts a two-byte-id acknowledgement (`first` = its first byte) for `pkid`; an MQTT 5
/// reason code, when present, must be Success.
#[track_caller]
fn assert_ack(p: &[u8], first: u8, pkid: u16) {
    assert_eq!(p[0], first, "packet type, got {p:02x?}");
    assert_eq!(
        u16::from_be_bytes([p[2], p[3]]),
        pkid,
        "packet id, got {p:02x?}"
    );
    if p.len() > 4 {
        assert_eq!(p[4], 0, "reason code, got {p:02x?}");
    }
}

fn msg(topic: &str, payload: &[u8], qos: u8) -> Msg {
    Msg {
        topic: topic.to_owned(),
        payload: payload.to_vec(),
        qos,
        retain: false,
        dup: false,
    }
}

// ---------------------------------------------------------------- QoS 0, 1, 2

/// A device publishes at QoS 0, 1 and 2 (each flow completes: `publish` waits for PUBACK,
/// resp. PUBREC and PUBCOMP); a backend subscribed at QoS 2 gets each message exactly once,
/// topic, payload and QoS intact, in order.
async fn qos_end_to_end(v: V) {
    let s = Setup::new().await;
    let mut sub = s.peer(&s.pinned("backend"), v, "sub").await;
    assert_eq!(sub.subscribe("devices/dev-1/#", 2).await, 2);
    let mut dev = s.peer(&s.device("dev-1"), v, "dev-1").await;
    let binary: Vec<u8> = (0..=255u8).collect();
    let sent: [(&str, &[u8], u8); 3] = [
        ("devices/dev-1/q0", b"zero", 0),
        ("devices/dev-1/q1/temp\u{e9}rature", b"one", 1),
        ("devices/dev-1/q2", &binary, 2),
    ];
    for (topic, payload, qos) in sent {
        assert_eq!(dev.publish(topic, qos, false, payload).await, 0, "{topic}");
    }
    dev.publish("devices/dev-1/end", 1, false, MARKER).await;
    let expected: Vec<Msg> = sent.iter().map(|(t, p, q)| msg(t, p, *q)).collect();
    assert_eq!(sub.recv_until_marker().await, expected);
}

both_versions! {
    #[tokio::test]
    qos_0_1_2_end_to_end_v311, qos_0_1_2_end_to_end_v5 => qos_end_to_end;
}

/// A message is never upgraded: QoS 2 subscription, QoS 1 publish -> QoS 1; QoS 2 publish
/// on a QoS 1 subscription -> QoS 1.
#[tokio::test]
async fn delivery_qos_is_the_lower_of_publish_and_subscription() {
    let s = Setup::new().await;
    let mut sub = s.peer(&s.pinned("backend"), V::V4, "sub").await;
    assert_eq!(sub.subscribe("a/two", 2).await, 2);
    assert_eq!(sub.subscribe("a/one", 1).await, 1);
    let mut publisher = s.peer(&s.pinned("backend"), V::V4, "pub").await;
    publisher.publish("a/two", 1, false, b"q1").await;
    publisher.publish("a/one", 2, false, b"q2").await;
    publisher.publish("a/one", 0, false, MARKER).await;
    assert_eq!(
        sub.recv_until_marker().await,
        vec![msg("a/two", b"q1", 1), msg("a/one", b"q2", 1)]
    );
}

// ---------------------------------------------------------------- overlapping

/// `devices/dev-1/#` at QoS 0 and `devices/dev-1/t` at QoS 2 in one session: a QoS 2
/// message on `devices/dev-1/t` arrives once, at QoS 2.
async fn overlapping_once(v: V) {
    let s = Setup::new().await;
    let mut sub = s.peer(&s.device("dev-1"), v, "sub").await;
    assert_eq!(sub.subscribe("devices/dev-1/#", 0).await, 0);
    assert_eq!(sub.subscribe("devices/dev-1/t", 2).await, 2);
    let mut backend = s.peer(&s.pinned("backend"), v, "backend").await;
    backend.publish("devices/dev-1/t", 2, false, b"x").await;
    backend.publish("devices/dev-1/t", 1, false, MARKER).await;
    assert_eq!(
        sub.recv_until_marker().await,
        vec![msg("devices/dev-1/t", b"x", 2)]
    );
}

both_versions! {
    #[tokio::test]
    overlapping_subscriptions_deliver_once_at_highest_qos_v311,
    overlapping_subscriptions_deliver_once_at_highest_qos_v5 => overlapping_once;
}

// ---------------------------------------------------------------- QoS 2 across a reconnect

fn persistent(v: V, client_id: &str) -> Vec<u8> {
    RawConnect {
        v,
        client_id,
        clean: false,
        keep_alive: 60,
        will: None,
        session_expiry: Some(600),
    }
    .bytes()
}

/// Inbound: PUBLISH QoS 2 pkid 7, PUBREC, TCP dropped; after the reconnect the same
/// PUBLISH again with DUP gets PUBREC again, PUBREL gets PUBCOMP, and the subscriber has
/// the message exactly once.
async fn inbound_qos2_reconnect(v: V) {
    let s = Setup::new().await;
    let mut sub = s.peer(&s.pinned("backend"), v, "sub").await;
    assert_eq!(sub.subscribe("devices/dev-1/#", 2).await, 2);
    let dev = s.device("dev-1");

    let (mut raw, present) = Raw::connect_ok(&dev, s.addr(), &persistent(v, "pub")).await;
    assert!(!present, "a new session");
    raw.send(&raw_publish(v, "devices/dev-1/t", b"once", 2, 7, false))
        .await;
    assert_ack(&raw.recv().await, PUBREC, 7);
    drop(raw);

    let (mut raw, present) = Raw::connect_ok(&dev, s.addr(), &persistent(v, "pub")).await;
    assert!(present, "the session survived the dropped connection");
    raw.send(&raw_publish(v, "devices/dev-1/t", b"once", 2, 7, true))
        .await;
    assert_ack(&raw.recv().await, PUBREC, 7);
    raw.send(&raw_ack(PUBREL, 7)).await;
    assert_ack(&raw.recv().await, PUBCOMP, 7);

    raw.send(&raw_publish(v, "devices/dev-1/t", MARKER, 1, 8, false))
        .await;
    assert_ack(&raw.recv().await, PUBACK, 8);
    assert_eq!(
        sub.recv_until_marker().await,
        vec![msg("devices/dev-1/t", b"once", 2)]
    );
}

both_versions! {
    #[tokio::test]
    qos2_inbound_exactly_once_across_reconnect_v311,
    qos2_inbound_exactly_once_across_reconnect_v5 => inbound_qos2_reconnect;
}

/// A raw persistent subscriber (dev-1, client id "sub") to `devices/dev-1/t` at QoS 2.
async fn raw_subscriber(s: &Setup, v: V) -> Raw {
    let (mut raw, _) = Raw::connect_ok(&s.device("dev-1"), s.addr(), &persistent(v, "sub")).await;
    raw.send(&raw_subscribe(v, 1, "devices/dev-1/t", 2)).await;
    let ack = raw.recv().await;
    assert_eq!(ack[0], 0x90, "SUBACK, got {ack:02x?}");
    assert_eq!(ack.last(), Some(&2), "granted QoS 2, got {ack:02x?}");
    raw
}

async fn reconnect_subscriber(s: &Setup, v: V) -> Raw {
    let (raw, present) = Raw::connect_ok(&s.device("dev-1"), s.addr(), &persistent(v, "sub")).await;
    assert!(present, "session present after the reconnect");
    raw
}

/// The backend publishes a marker at QoS 2; it must be the subscriber's next packet (no
/// further resend came before it), and its flow completes.
async fn marker_is_next(raw: &mut Raw, v: V, backend: &mut Peer) {
    backend.publish("devices/dev-1/t", 2, false, MARKER).await;
    let p = parse_publish(v, &raw.recv().await);
    assert_eq!((p.payload.as_slice(), p.dup), (MARKER, false));
    raw.send(&raw_ack(PUBREC, p.pkid)).await;
    assert_ack(&raw.recv().await, PUBREL, p.pkid);
    raw.send(&raw_ack(PUBCOMP, p.pkid)).await;
}

/// Outbound: the subscriber drops the connection before PUBREC; after reconnecting it gets
/// the same PUBLISH again with DUP, then the flow completes.
async fn outbound_resend_publish(v: V) {
    let s = Setup::new().await;
    let mut raw = raw_subscriber(&s, v).await;
    let mut backend = s.peer(&s.pinned("backend"), v, "backend").await;
    backend.publish("devices/dev-1/t", 2, false, b"q2").await;
    let first = parse_publish(v, &raw.recv().await);
    assert_eq!((first.qos, first.dup), (2, false));
    assert_eq!(first.payload, b"q2");
    drop(raw);

    let mut raw = reconnect_subscriber(&s, v).await;
    let again = parse_publish(v, &raw.recv().await);
    assert!(again.dup, "resent with DUP: {again:?}");
    assert_eq!(
        (
            again.pkid,
            again.qos,
            again.topic.as_str(),
            again.payload.as_slice()
        ),
        (first.pkid, 2, "devices/dev-1/t", b"q2".as_slice())
    );
    raw.send(&raw_ack(PUBREC, again.pkid)).await;
    assert_ack(&raw.recv().await, PUBREL, again.pkid);
    raw.send(&raw_ack(PUBCOMP, again.pkid)).await;
    marker_is_next(&mut raw, v, &mut backend).await;
}

both_versions! {
    #[tokio::test]
    qos2_outbound_publish_resent_with_dup_after_reconnect_v311,
    qos2_outbound_publish_resent_with_dup_after_reconnect_v5 => outbound_resend_publish;
}

/// Outbound: the subscriber sent PUBREC and got PUBREL, then dropped the connection before
/// PUBCOMP; after reconnecting it gets PUBREL again (not the PUBLISH).
async fn outbound_resend_pubrel(v: V) {
    let s = Setup::new().await;
    let mut raw = raw_subscriber(&s, v).await;
    let mut backend = s.peer(&s.pinned("backend"), v, "backend").await;
    backend.publish("devices/dev-1/t", 2, false, b"q2").await;
    let first = parse_publish(v, &raw.recv().await);
    raw.send(&raw_ack(PUBREC, first.pkid)).await;
    assert_ack(&raw.recv().await, PUBREL, first.pkid);
    drop(raw);

    let mut raw = reconnect_subscriber(&s, v).await;
    assert_ack(&raw.recv().await, PUBREL, first.pkid);
    raw.send(&raw_ack(PUBCOMP, first.pkid)).await;
    marker_is_next(&mut raw, v, &mut backend).await;
}

both_versions! {
    #[tokio::test]
    qos2_outbound_pubrel_resent_after_reconnect_v311,
    qos2_outbound_pubrel_resent_after_reconnect_v5 => outbound_resend_pubrel;
}

/// Outbound QoS 1: no PUBACK before the connection dropped, so the PUBLISH comes again
/// with DUP after the reconnect; once PUBACKed it is not sent a third time.
#[tokio::test]
async fn qos1_outbound_publish_resent_with_dup_after_reconnect() {
    let s = Setup::new().await;
    let v = V::V4;
    let mut raw = raw_subscriber(&s, v).await;
    let mut backend = s.peer(&s.pinned("backend"), v, "backend").await;
    backend.publish("devices/dev-1/t", 1, false, b"q1").await;
    let first = parse_publish(v, &raw.recv().await);
    assert_eq!((first.qos, first.dup), (1, false));
    drop(raw);

    let mut raw = reconnect_subscriber(&s, v).await;
    let again = parse_publish(v, &raw.recv().await);
    assert_eq!(
        (again.pkid, again.qos, again.dup, again.payload.as_slice()),
        (first.pkid, 1, true, b"q1".as_slice())
    );
    raw.send(&raw_ack(PUBACK, again.pkid)).await;
    marker_is_next(&mut raw, v, &mut backend).await;
}
