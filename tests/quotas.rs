//! Per-device and per-session bounds that must never lose anything silently (SPEC 2, 4, 7):
//! `max_session_expiry` (MQTT 5 expiry capped and announced in CONNACK; MQTT 3.1.1
//! persistent sessions expire too), `max_retained_per_device` (v5 PUBACK 0x97, counted
//! drops otherwise, ownership kept across a restart), and retained messages on SUBSCRIBE
//! delivered in full however many there are, beyond `max_queued_messages`. Real brokers
//! (in-process, or `certmq serve` where a log line is the event to wait for), real TLS.

mod common;

use common::coretests::{Opts, Peer, V};
use common::ops::Proc;
use common::v5tests::{
    config_with_limits, connect_packet, device_client, with_expiry, Raw5, BACKEND_FLEET,
};
use common::{Broker, Fixture};
use rumqttc::v5::mqttbytes::v5::ConnectReturnCode;

fn persistent() -> Opts {
    Opts {
        clean: false,
        will: None,
    }
}

/// MQTT 5 §3.2.2.3.2: a session expiry above `max_session_expiry` (0xFFFFFFFF included) is
/// lowered, and CONNACK says to what; one within the limit is not echoed.
#[tokio::test]
async fn v5_session_expiry_is_capped_and_announced() {
    let fx = Fixture::new();
    let broker = Broker::start(&config_with_limits(
        &fx,
        "max_session_expiry = 60",
        BACKEND_FLEET,
    ))
    .await;
    let client = device_client(&fx, "d1");
    for (asked, announced) in [
        (u32::MAX, Some(60)),
        (600, Some(60)),
        (61, Some(60)),
        (60, None),
        (30, None),
        (0, None),
    ] {
        let mut connect = connect_packet("c");
        connect.properties = Some(with_expiry(asked));
        let (raw, ack) = Raw5::connect(&client, broker.addr, connect, None).await;
        assert_eq!(ack.code, ConnectReturnCode::Success, "{ack:?}");
        let got = ack.properties.and_then(|p| p.session_expiry_interval);
        assert_eq!(got, announced, "asked for {asked}");
        raw.disconnect().await;
    }
}

/// A 3.1.1 clean-session-0 session no longer lives forever: `max_session_expiry` seconds
/// after it went offline it is gone (the broker logs it), and the next CONNECT finds none.
#[tokio::test]
async fn v311_persistent_session_expires_after_max_session_expiry() {
    let fx = Fixture::new();
    let cfg = common::ops::config_with_limits(
        &fx,
        "handshake_timeout = 5\nconnect_timeout = 5\nmax_session_expiry = 2",
        BACKEND_FLEET,
    );
    let mut proc = Proc::start(&fx, &cfg).await;
    let client = device_client(&fx, "d1");
    let mut peer = Peer::connect(&client, proc.mqtt, V::V4, "keeper", &persistent()).await;
    assert!(!peer.session_present);
    assert_eq!(peer.subscribe("devices/d1/#", 1).await, 1);
    peer.disconnect().await;
    let line = proc.wait_line("session expired").await;
    assert!(line.contains("keeper"), "{line}");
    let again = Peer::connect(&client, proc.mqtt, V::V4, "keeper", &persistent()).await;
    assert!(!again.session_present, "the expired session was resumed");
}
