//! contract §4 and 6, black-box: persistent sessions catching up, clean sessions, session
//! takeover keyed by (device, client id), keep alive at 1.5x, and will messages.

use std::time::{Duration, Instant};

use crate::common::coretests::both_versions;
use crate::common::coretests::raw::{Raw, RawConnect, DISCONNECT, PINGREQ};
use crate::common::coretests::{Msg, Opts, Peer, Setup, WillMsg, MARKER, V};

fn msg(topic: &str, payload: &[u8], qos: u8, retain: bool) -> Msg {
    Msg {
        topic: topic.to_owned(),
        payload: payload.to_vec(),
        qos,
        retain,
        dup: false,
    }
}

fn persistent() -> Opts {
    Opts {
        clean: false,
        will: None,
    }
}

// ---------------------------------------------------------------- persistent sessions

/// Clean session 0, subscribed at QoS 1, then away: QoS 1 and 2 messages published
/// meanwhile arrive in order after the reconnect (session present = 1); QoS 0 is not kept.
async fn persistent_catches_up(v: V) {
    let s = Setup::new().await;
    let dev = s.device("dev-1");
    let mut sub = Peer::connect(&dev, s.addr(), v, "sub", &persistent()).await;
    assert!(!sub.session_present);
    assert_eq!(sub.subscribe("devices/dev-1/#", 1).await, 1);
    sub.disconnect().await;

    let mut backend = s.peer(&s.pinned("backend"), v, "backend").await;
    backend.publish("devices/dev-1/a", 1, false, b"m1").await;
    backend.publish("devices/dev-1/b", 2, false, b"m2").await;
    backend.publish("devices/dev-1/c", 0, false, b"m3").await;
    backend.publish("devices/dev-1/d", 1, false, b"m4").await;
    backend.publish("devices/dev-1/e", 1, false, MARKER).await;

    let mut sub = Peer::connect(&dev, s.addr(), v, "sub", &persistent()).await;
    assert!(sub.session_present, "CONNACK session present = 1");
    assert_eq!(
        sub.recv_until_marker().await,
        vec![
            msg("devices/dev-1/a", b"m1", 1, false),
            msg("devices/dev-1/b", b"m2", 1, false),
            msg("devices/dev-1/d", b"m4", 1, false),
        ],
        "QoS 1 and 2 in order, QoS 0 (m3) dropped while offline"
    );
}

both_versions! {
    #[tokio::test]
    persistent_session_catches_up_v311, persistent_session_catches_up_v5 => persistent_catches_up;
}

/// Reconnecting with clean session 1 discards the old session: session present 0, its
/// queued message and its subscription are gone.
async fn clean_reconnect_discards(v: V) {
    let s = Setup::new().await;
    let dev = s.device("dev-1");
    let mut sub = Peer::connect(&dev, s.addr(), v, "sub", &persistent()).await;
    assert_eq!(sub.subscribe("devices/dev-1/#", 1).await, 1);
    sub.disconnect().await;
    let mut backend = s.peer(&s.pinned("backend"), v, "backend").await;
    backend
        .publish("devices/dev-1/a", 1, false, b"queued")
        .await;

    let mut sub = s.peer(&dev, v, "sub").await;
    assert!(!sub.session_present, "CONNACK session present = 0");
    // Would arrive through the old subscription if it had survived.
    backend
        .publish("devices/dev-1/a", 1, false, b"unsubscribed")
        .await;
    assert_eq!(sub.subscribe("devices/dev-1/#", 1).await, 1);
    backend.publish("devices/dev-1/a", 1, false, MARKER).await;
    assert_eq!(sub.recv_until_marker().await, vec![]);
}

both_versions! {
    #[tokio::test]
    clean_session_reconnect_discards_old_session_v311,
    clean_start_reconnect_discards_old_session_v5 => clean_reconnect_discards;
}

// ---------------------------------------------------------------- takeover

/// A second connection of dev-1 with the same client id closes the first one (clean or
/// resumed session alike) and works itself.
async fn takeover_v311(clean: bool) {
    let s = Setup::new().await;
    let dev = s.device("dev-1");
    let opts = Opts { clean, will: None };
    let mut first = Peer::connect(&dev, s.addr(), V::V4, "same", &opts).await;
    let mut second = Peer::connect(&dev, s.addr(), V::V4, "same", &opts).await;
    assert_eq!(second.session_present, !clean);
    let why = first.closed().await;
    assert!(!why.is_empty());
    assert_eq!(second.subscribe("devices/dev-1/t", 1).await, 1);
    second.publish("devices/dev-1/t", 1, false, MARKER).await;
    assert_eq!(second.recv_until_marker().await, vec![]);
}

#[tokio::test]
async fn same_device_same_client_id_takes_over_v311() {
    takeover_v311(true).await;
}

#[tokio::test]
async fn same_device_same_client_id_takes_over_persistent_session_v311() {
    takeover_v311(false).await;
}

#[tokio::test]
async fn same_device_same_client_id_takes_over_v5_with_disconnect_0x8e() {
    let s = Setup::new().await;
    let dev = s.device("dev-1");
    let connect = RawConnect {
        v: V::V5,
        client_id: "same",
        clean: true,
        keep_alive: 60,
        will: None,
        session_expiry: None,
    }
    .bytes();
    let (mut first, _) = Raw::connect_ok(&dev, s.addr(), &connect).await;
    let mut second = s.peer(&dev, V::V5, "same").await;
    let packets = first.until_closed().await;
    let last = packets.last().expect("a DISCONNECT before the close");
    assert_eq!(last[0], 0xE0, "DISCONNECT, got {packets:02x?}");
    assert_eq!(last[2], 0x8E, "Session taken over, got {last:02x?}");
    assert_eq!(second.subscribe("devices/dev-1/t", 1).await, 1);
    second.publish("devices/dev-1/t", 1, false, MARKER).await;
    assert_eq!(second.recv_until_marker().await, vec![]);
}

/// contract §4: the session key is (device, client id): dev-1 and dev-2 both using "same" stay
/// connected side by side and each gets its own messages.
async fn two_devices_same_client_id(v: V) {
    let s = Setup::new().await;
    let mut one = s.peer(&s.device("dev-1"), v, "same").await;
    assert_eq!(one.subscribe("devices/dev-1/t", 1).await, 1);
    let mut two = s.peer(&s.device("dev-2"), v, "same").await;
    assert_eq!(two.subscribe("devices/dev-2/t", 1).await, 1);
    let mut backend = s.peer(&s.pinned("backend"), v, "backend").await;
    backend.publish("devices/dev-1/t", 1, false, b"for-1").await;
    backend.publish("devices/dev-2/t", 1, false, b"for-2").await;
    backend.publish("devices/dev-1/t", 1, false, MARKER).await;
    backend.publish("devices/dev-2/t", 1, false, MARKER).await;
    assert_eq!(
        one.recv_until_marker().await,
        vec![msg("devices/dev-1/t", b"for-1", 1, false)]
    );
    assert_eq!(
        two.recv_until_marker().await,
        vec![msg("devices/dev-2/t", b"for-2", 1, false)]
    );
}

both_versions! {
    #[tokio::test]
    two_devices_with_one_client_id_do_not_interfere_v311,
    two_devices_with_one_client_id_do_not_interfere_v5 => two_devices_same_client_id;
}

// ---------------------------------------------------------------- keep alive

/// A raw dev-1 connection with keep alive 1 s and a will on `devices/dev-1/status`.
fn keep_alive_1s(v: V) -> Vec<u8> {
    RawConnect {
        v,
        client_id: "ka",
        clean: true,
        keep_alive: 1,
        will: Some(("devices/dev-1/status", b"gone", 1, false)),
        session_expiry: None,
    }
    .bytes()
}

/// A silent client is closed after 1.5 x keep alive (v5: DISCONNECT 0x8D first) and its
/// will is published. The bound on when is a smoke check (not before 1.3 s, within 10 x):
/// the exact deadline is proven on a paused clock in src/broker/conn/tests.rs.
async fn keep_alive_expires(v: V) {
    let s = Setup::new().await;
    let mut sub = s.peer(&s.pinned("backend"), v, "sub").await;
    assert_eq!(sub.subscribe("devices/dev-1/#", 1).await, 1);
    let (mut raw, _) = Raw::connect_ok(&s.device("dev-1"), s.addr(), &keep_alive_1s(v)).await;
    let start = Instant::now();
    let packets = raw.until_closed().await;
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1300) && elapsed < Duration::from_secs(15),
        "closed after {elapsed:?}, expected about 1.5 s"
    );
    match v {
        V::V4 => assert_eq!(packets, Vec::<Vec<u8>>::new()),
        V::V5 => {
            let last = packets.last().expect("a DISCONNECT before the close");
            assert_eq!((last[0], last[2]), (0xE0, 0x8D), "got {packets:02x?}");
        }
    }
    assert_eq!(
        sub.recv().await,
        msg("devices/dev-1/status", b"gone", 1, false)
    );
}

both_versions! {
    #[tokio::test]
    keep_alive_timeout_closes_and_publishes_will_v311,
    keep_alive_timeout_sends_disconnect_0x8d_and_publishes_will_v5 => keep_alive_expires;
}

/// PINGREQ every 400 ms keeps a 1 s keep-alive connection open well past 1.5 s; a normal
/// DISCONNECT then ends it without its will.
#[tokio::test]
async fn pingreq_keeps_the_connection_alive() {
    let s = Setup::new().await;
    let mut sub = s.peer(&s.pinned("backend"), V::V4, "sub").await;
    assert_eq!(sub.subscribe("devices/dev-1/#", 1).await, 1);
    let (mut raw, _) = Raw::connect_ok(&s.device("dev-1"), s.addr(), &keep_alive_1s(V::V4)).await;
    let start = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_millis(400));
    ticks.tick().await;
    while start.elapsed() < Duration::from_millis(2000) {
        ticks.tick().await;
        raw.send(&PINGREQ).await;
        assert_eq!(raw.recv().await, vec![0xD0, 0], "PINGRESP");
    }
    raw.send(&DISCONNECT).await;
    assert_eq!(raw.until_closed().await, Vec::<Vec<u8>>::new());
    let mut backend = s.peer(&s.pinned("backend"), V::V4, "backend").await;
    backend.publish("devices/dev-1/x", 1, false, MARKER).await;
    assert_eq!(sub.recv_until_marker().await, vec![], "no will");
}

// ---------------------------------------------------------------- wills

fn with_will(topic: &str, retain: bool) -> Opts {
    Opts {
        clean: true,
        will: Some(WillMsg {
            topic: topic.to_owned(),
            payload: b"offline".to_vec(),
            qos: 1,
            retain,
            delay: 0,
        }),
    }
}

/// The will is published when the TCP connection drops without DISCONNECT.
async fn will_on_tcp_drop(v: V) {
    let s = Setup::new().await;
    let mut sub = s.peer(&s.pinned("backend"), v, "sub").await;
    assert_eq!(sub.subscribe("devices/dev-1/#", 1).await, 1);
    let opts = with_will("devices/dev-1/status", false);
    let dev = Peer::connect(&s.device("dev-1"), s.addr(), v, "dev", &opts).await;
    dev.drop_tcp().await;
    assert_eq!(
        sub.recv().await,
        msg("devices/dev-1/status", b"offline", 1, false)
    );
}

both_versions! {
    #[tokio::test]
    will_published_on_tcp_drop_v311, will_published_on_tcp_drop_v5 => will_on_tcp_drop;
}

/// A normal DISCONNECT discards the will.
async fn no_will_on_disconnect(v: V) {
    let s = Setup::new().await;
    let mut sub = s.peer(&s.pinned("backend"), v, "sub").await;
    assert_eq!(sub.subscribe("devices/dev-1/#", 1).await, 1);
    let opts = with_will("devices/dev-1/status", false);
    let dev = Peer::connect(&s.device("dev-1"), s.addr(), v, "dev", &opts).await;
    dev.disconnect().await;
    let mut backend = s.peer(&s.pinned("backend"), v, "backend").await;
    backend.publish("devices/dev-1/x", 1, false, MARKER).await;
    assert_eq!(sub.recv_until_marker().await, vec![]);
}

both_versions! {
    #[tokio::test]
    will_not_published_on_normal_disconnect_v311,
    will_not_published_on_normal_disconnect_v5 => no_will_on_disconnect;
}

/// A will with the retain flag is forwarded live with retain 0 (3.1.1) and kept as the
/// retained message: a later subscriber gets it with retain 1.
#[tokio::test]
async fn will_with_retain_flag_is_retained() {
    let s = Setup::new().await;
    let mut live = s.peer(&s.pinned("backend"), V::V4, "live").await;
    assert_eq!(live.subscribe("devices/dev-1/#", 1).await, 1);
    let opts = with_will("devices/dev-1/status", true);
    let dev = Peer::connect(&s.device("dev-1"), s.addr(), V::V4, "dev", &opts).await;
    dev.drop_tcp().await;
    assert_eq!(
        live.recv().await,
        msg("devices/dev-1/status", b"offline", 1, false)
    );
    let mut later = s.peer(&s.pinned("backend"), V::V4, "later").await;
    assert_eq!(later.subscribe("devices/dev-1/status", 1).await, 1);
    assert_eq!(
        later.recv().await,
        msg("devices/dev-1/status", b"offline", 1, true)
    );
}

/// A will on a topic the device may not publish to is refused at CONNECT.
async fn forbidden_will_refused(v: V, code: u8) {
    let s = Setup::new().await;
    let connect = RawConnect {
        v,
        client_id: "dev",
        clean: true,
        keep_alive: 60,
        will: Some(("devices/dev-2/status", b"x", 0, false)),
        session_expiry: None,
    }
    .bytes();
    let (_raw, ack) = Raw::connect(&s.device("dev-1"), s.addr(), &connect).await;
    assert_eq!((ack[0], ack[3]), (0x20, code), "CONNACK, got {ack:02x?}");
}

both_versions! {
    #[tokio::test]
    will_on_forbidden_topic_refused_at_connect_v311,
    will_on_forbidden_topic_refused_at_connect_v5 => |v| {
        let code = match v {
            V::V4 => 5,
            V::V5 => 0x87,
        };
        forbidden_will_refused(v, code)
    };
}
