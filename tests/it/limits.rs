//! contract §9, limits and hostile input end to end: raw bytes over TLS and plain TCP against a
//! real broker. Each case shows the offender is closed (MQTT 5: with the matching
//! DISCONNECT first) and that the broker keeps serving everyone else.

use std::time::{Duration, Instant};

use crate::common::coretests::raw::{raw_publish, RawConnect};
use crate::common::coretests::V;
use crate::common::v5tests::{
    config_with_limits, connect_packet, device_client, tls_stream, Raw5, BACKEND_FLEET,
};
use crate::common::{Broker, Client, Fixture, WAIT};
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The CONNACK (success, no session) an MQTT 3.1.1 client gets.
const CONNACK_V311: [u8; 4] = [0x20, 0x02, 0x00, 0x00];

/// The upper bound on every timing here, a smoke check that holds on a loaded machine: 10 x
/// the 1 s timeouts, and far below the 60 s ones that "at once" is told apart from. The
/// lower bounds stay exact enough to catch "too early".
const SMOKE_BOUND: Duration = Duration::from_secs(10);

async fn broker_with(fx: &Fixture, limits: &str) -> Broker {
    Broker::start(&config_with_limits(fx, limits, BACKEND_FLEET)).await
}

/// A fresh subscriber and publisher complete a QoS 1 round trip: the broker still serves.
async fn assert_still_serving(fx: &Fixture, broker: &Broker) {
    let mut s = Raw5::open(&device_client(fx, "fresh-s"), broker.addr, "s").await;
    s.sub("alive/t", QoS::AtLeastOnce).await;
    let mut p = Raw5::open(&device_client(fx, "fresh-p"), broker.addr, "p").await;
    p.publish_ok("alive/t", "alive").await;
    assert_eq!(s.next_publish().await.payload, "alive");
}

/// A subscriber and a publisher connected before the abuse, checked after it.
struct Bystanders {
    s: Raw5,
    p: Raw5,
}

impl Bystanders {
    async fn connect(fx: &Fixture, broker: &Broker) -> Bystanders {
        let mut s = Raw5::open(&device_client(fx, "by-s"), broker.addr, "s").await;
        s.sub("by/t", QoS::AtLeastOnce).await;
        let p = Raw5::open(&device_client(fx, "by-p"), broker.addr, "p").await;
        Bystanders { s, p }
    }

    async fn assert_unaffected(&mut self, payload: &str) {
        self.p.publish_ok("by/t", payload.to_owned()).await;
        assert_eq!(self.s.next_publish().await.payload, payload);
    }
}

/// Reads a plain TCP stream until the peer closes it; true if it did within `limit`.
async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> bool {
    let mut sink = Vec::new();
    // A reset counts as closed too: only the timeout means "still open".
    tokio::time::timeout(limit, tcp.read_to_end(&mut sink))
        .await
        .is_ok()
}

// ---------------------------------------------------------------- 1. max_packet_size

#[tokio::test]
async fn packets_over_max_packet_size_close_the_connection() {
    let fx = Fixture::new();
    let broker = broker_with(&fx, "max_packet_size = 1024").await;
    let mut by = Bystanders::connect(&fx, &broker).await;
    let c = device_client(&fx, "dev-1");

    let mut v5 = Raw5::open(&c, broker.addr, "big5").await;
    v5.publish("big/t", QoS::AtMostOnce, false, vec![b'x'; 2000], None)
        .await;
    assert_eq!(v5.expect_disconnect().await, 0x95);

    let bytes = [
        RawConnect::new(V::V4, "big4").bytes(),
        raw_publish(V::V4, "big/t", &[b'x'; 2000], 0, 0, false),
    ]
    .concat();
    let answer = c.raw(broker.addr, &bytes).await.expect("closed");
    assert_eq!(answer, CONNACK_V311, "3.1.1: CONNACK, then closed");

    // Just under the limit is fine.
    by.p.publish_ok("by/t", vec![b'y'; 900]).await;
    assert_eq!(by.s.next_publish().await.payload.len(), 900);
    by.assert_unaffected("after").await;
}

// ---------------------------------------------------------------- 2. huge length first

#[tokio::test]
async fn a_256_mb_length_before_connect_is_closed_at_once() {
    let fx = Fixture::new();
    // A broker that waited for the body would hold the connection for the whole
    // connect_timeout: far longer than the generous bound below.
    let broker = broker_with(&fx, "connect_timeout = 60").await;
    let c = device_client(&fx, "dev-1");
    let start = Instant::now();
    // CONNECT, remaining length 268,435,455 (the largest four-byte length).
    let answer = c
        .raw(broker.addr, &[0x10, 0xff, 0xff, 0xff, 0x7f])
        .await
        .unwrap_or_default();
    assert!(answer.is_empty(), "no CONNACK expected, got {answer:02x?}");
    assert!(
        start.elapsed() < SMOKE_BOUND,
        "closed after {:?}: the broker waited for the body",
        start.elapsed()
    );
    assert_still_serving(&fx, &broker).await;
}

// ---------------------------------------------------------------- 3. malformed packets

#[tokio::test]
async fn malformed_packets_after_connect_close_the_connection() {
    let fx = Fixture::new();
    let broker = broker_with(&fx, "max_inflight = 64").await;
    let mut by = Bystanders::connect(&fx, &broker).await;
    let c = device_client(&fx, "dev-1");
    let cases: [(&str, &[u8]); 6] = [
        (
            "SUBSCRIBE with reserved flags 0000",
            &[0x80, 0x07, 0, 1, 0, 0, 1, b'a', 1],
        ),
        ("PUBREL with reserved flags 0000", &[0x60, 0x02, 0x00, 0x01]),
        ("PINGREQ with remaining length 1", &[0xc0, 0x01, 0x00]),
        (
            "five-byte remaining length",
            &[0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
        ),
        (
            "PUBLISH topic longer than the packet",
            &[0x30, 0x03, 0x00, 0x10, b'a'],
        ),
        ("HTTP garbage", b"GET / HTTP/1.1\r\n\r\n"),
    ];
    for (what, bytes) in cases {
        let mut v5 = Raw5::open(&c, broker.addr, "bad5").await;
        v5.send_raw(bytes).await;
        assert_eq!(v5.expect_disconnect().await, 0x81, "v5: {what}");

        let answer = c
            .raw(
                broker.addr,
                &[&RawConnect::new(V::V4, "bad4").bytes(), bytes].concat(),
            )
            .await
            .expect("closed");
        assert_eq!(answer, CONNACK_V311, "3.1.1: {what}");
    }
    by.assert_unaffected("after").await;
}

// ---------------------------------------------------------------- 4. silent and garbage peers

#[tokio::test]
async fn garbage_instead_of_a_client_hello_is_closed() {
    let fx = Fixture::new();
    let broker = broker_with(&fx, "handshake_timeout = 60").await;
    let mut tcp = TcpStream::connect(broker.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut tcp, SMOKE_BOUND).await,
        "not closed long before the 60 s handshake timeout"
    );
    assert_still_serving(&fx, &broker).await;
}

#[tokio::test]
async fn a_silent_tcp_client_is_closed_after_the_handshake_timeout() {
    let fx = Fixture::new();
    let broker = broker_with(&fx, "handshake_timeout = 1").await;
    let start = Instant::now();
    let mut tcp = TcpStream::connect(broker.addr).await.unwrap();
    assert!(closed_within(&mut tcp, WAIT).await, "never closed");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < SMOKE_BOUND,
        "closed after {took:?}, handshake_timeout is 1 s"
    );
    assert_still_serving(&fx, &broker).await;
}

#[tokio::test]
async fn a_tls_client_without_connect_is_closed_after_the_connect_timeout() {
    let fx = Fixture::new();
    let broker = broker_with(&fx, "connect_timeout = 1").await;
    let c = device_client(&fx, "dev-1");
    let mut tls = tls_stream(&c, broker.addr).await;
    let start = Instant::now();
    let mut sink = Vec::new();
    let read = tokio::time::timeout(WAIT, tls.read_to_end(&mut sink)).await;
    let took = start.elapsed();
    assert!(read.is_ok(), "never closed");
    assert!(sink.is_empty(), "no CONNACK without CONNECT: {sink:02x?}");
    assert!(
        took >= Duration::from_millis(900) && took < SMOKE_BOUND,
        "closed after {took:?}, connect_timeout is 1 s"
    );
    assert_still_serving(&fx, &broker).await;
}

// ---------------------------------------------------------------- 5. max_connections

/// TCP, TLS, CONNECT; true when a CONNACK success came back.
async fn try_connect(c: &Client, broker: &Broker) -> bool {
    match c
        .raw_first_packet(broker.addr, &RawConnect::new(V::V5, "late").bytes())
        .await
    {
        // CONNACK, a one-byte remaining length, flags, reason code 0.
        Ok((packet, _)) => packet.first() == Some(&0x20) && packet.get(3) == Some(&0),
        Err(_) => false,
    }
}

#[tokio::test]
async fn connections_over_max_connections_are_refused_at_once() {
    let fx = Fixture::new();
    // An accepted 4th connection would wait for its ClientHello for the whole
    // handshake_timeout: far longer than the generous bound below.
    let broker = broker_with(&fx, "max_connections = 3\nhandshake_timeout = 60").await;
    let c = device_client(&fx, "dev-1");
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(Raw5::open(&c, broker.addr, &format!("c{i}")).await);
    }
    let mut fourth = TcpStream::connect(broker.addr).await.unwrap();
    assert!(
        closed_within(&mut fourth, SMOKE_BOUND).await,
        "the 4th connection was not closed long before the 60 s handshake timeout"
    );
    assert!(
        !try_connect(&c, &broker).await,
        "a 4th MQTT session was accepted"
    );

    held.pop().expect("one").disconnect().await;
    // The slot is released when the closed connection's task ends: wait for that event.
    let accepted = tokio::time::timeout(WAIT, async {
        loop {
            if try_connect(&c, &broker).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(accepted.is_ok(), "no connection accepted after one closed");
}

// ---------------------------------------------------------------- 6. protocol errors

#[tokio::test]
async fn wildcard_publish_and_second_connect_are_protocol_errors() {
    let fx = Fixture::new();
    let broker = broker_with(&fx, "max_inflight = 64").await;
    let mut by = Bystanders::connect(&fx, &broker).await;
    let c = device_client(&fx, "dev-1");

    for topic in ["wild/+/t", "wild/#"] {
        let mut v5 = Raw5::open(&c, broker.addr, "w5").await;
        v5.publish(topic, QoS::AtMostOnce, false, "x", None).await;
        assert_eq!(v5.expect_disconnect().await, 0x90, "v5 PUBLISH to {topic}");
        let bytes = [
            RawConnect::new(V::V4, "w4").bytes(),
            raw_publish(V::V4, topic, b"x", 0, 0, false),
        ]
        .concat();
        let answer = c.raw(broker.addr, &bytes).await.expect("closed");
        assert_eq!(answer, CONNACK_V311, "3.1.1 PUBLISH to {topic}");
    }

    let mut v5 = Raw5::open(&c, broker.addr, "twice5").await;
    v5.send(Packet::Connect(connect_packet("twice5"), None, None))
        .await;
    assert_eq!(v5.expect_disconnect().await, 0x82, "v5 second CONNECT");
    let bytes = [
        RawConnect::new(V::V4, "twice4").bytes(),
        RawConnect::new(V::V4, "twice4").bytes(),
    ]
    .concat();
    let answer = c.raw(broker.addr, &bytes).await.expect("closed");
    assert_eq!(answer, CONNACK_V311, "3.1.1 second CONNECT");
    by.assert_unaffected("after").await;
}

// ---------------------------------------------------------------- 7. a subscriber that never reads

const BUSY_MESSAGES: usize = 2000;
/// 8 MB in all: more than the kernel buffers between the broker and the stuck client can
/// hold (a 4 MB send buffer at most here, `net.ipv4.tcp_wmem`), so the broker's own queue
/// bound is what is exercised, not the kernel's.
const BUSY_PAYLOAD: usize = 4096;

#[tokio::test]
async fn a_subscriber_that_never_reads_does_not_hold_back_others() {
    let fx = Fixture::new();
    let broker = broker_with(&fx, "max_queued_messages = 100\nconnect_timeout = 2").await;

    // The stuck one: a tiny receive buffer, subscribes QoS 0, then never reads again.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(broker.addr).await.unwrap();
    let (mut stuck, _) = Raw5::connect_tcp(
        &device_client(&fx, "stuck"),
        tcp,
        connect_packet("stuck"),
        None,
    )
    .await;
    stuck.sub("busy/t", QoS::AtMostOnce).await;

    let mut fast = Raw5::open(&device_client(&fx, "fast"), broker.addr, "fast").await;
    fast.sub("busy/t", QoS::AtLeastOnce).await;
    let reader = tokio::spawn(async move {
        let mut next = 0usize;
        while next < BUSY_MESSAGES {
            let p = fast.next_publish().await;
            assert_eq!(&p.payload[..8], &(next as u64).to_be_bytes(), "order");
            next += 1;
        }
        next
    });

    let mut p = Raw5::open(&device_client(&fx, "pub"), broker.addr, "p").await;
    let start = Instant::now();
    for i in 0..BUSY_MESSAGES {
        let mut payload = vec![0u8; BUSY_PAYLOAD];
        payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
        p.publish_ok("busy/t", payload).await;
    }
    let got = tokio::time::timeout(WAIT, reader)
        .await
        .expect("the fast subscriber got everything in time")
        .expect("reader");
    assert_eq!(got, BUSY_MESSAGES);
    let took = start.elapsed();
    eprintln!("{BUSY_MESSAGES} messages in {took:?}");

    let metrics = broker.metrics.render();
    let dropped = metrics
        .lines()
        .filter(|l| l.starts_with("certmq_messages_dropped_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum::<u64>();
    let disconnected = dropped == 0 && {
        // No drop counted: then the bounded write must have ended the stuck connection.
        let mut sink = Vec::new();
        let read = tokio::time::timeout(WAIT, stuck.tls.read_to_end(&mut sink)).await;
        read.is_ok()
    };
    assert!(
        dropped > 0 || disconnected,
        "the stuck subscriber neither lost messages nor was disconnected:\n{metrics}"
    );
}

// ---------------------------------------------------------------- 8. user-property flood

#[tokio::test]
async fn a_user_property_flood_is_handled_cleanly() {
    let fx = Fixture::new();
    let broker = broker_with(&fx, "max_inflight = 64").await;
    let mut s = Raw5::open(&device_client(&fx, "dev-1"), broker.addr, "s").await;
    s.sub("flood/t", QoS::AtLeastOnce).await;
    let mut p = Raw5::open(&device_client(&fx, "dev-2"), broker.addr, "p").await;
    let count = 50_000;
    let props = PublishProperties {
        user_properties: (0..count)
            .map(|i| (format!("k{i}"), "v".to_owned()))
            .collect(),
        ..Default::default()
    };
    let ack = p
        .publish("flood/t", QoS::AtLeastOnce, false, "flood", Some(props))
        .await
        .expect("PUBACK");
    if ack.reason == PubAckReason::Success {
        let got = s.next_publish().await;
        assert_eq!(got.payload, "flood");
        let n = got.properties.map(|p| p.user_properties.len());
        assert_eq!(n, Some(count));
    }
    // Delivered or refused, both connections and the broker go on.
    p.publish_ok("flood/t", "after").await;
    assert_eq!(s.next_publish().await.payload, "after");
    assert_still_serving(&fx, &broker).await;
}
