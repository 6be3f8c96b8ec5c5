//! The timing of one connection, on tokio's paused clock: keep alive, will delay and
//! message expiry, each to the millisecond.
//!
//! The harness ([`Harness`], [`Client`]) is a broker without a message store (sessions in
//! memory), a CONNECT accepted as `server::connection` accepts it (minus TLS and the
//! admission decision: the device name is given, its ACL allows everything), then
//! [`serve`] over an in-memory duplex stream. The client side writes and reads raw MQTT
//! bytes. The runtime starts paused: virtual time moves only when every task waits, straight
//! to the next timer, so a test says "not at 14.999 s, exactly at 15 s" and runs in no real
//! time. The black-box tests (tests/it) check the same behaviours once, over TLS, with
//! generous bounds.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{connect, serve, End, Params, Revoke, Signals};
use crate::acl::{DeviceAcl, Profile};
use crate::broker::router::SubOptions;
use crate::broker::session::{Expiry, SessionKey, SessionRef};
use crate::broker::{expiry, Broker, SessionRequest};
use crate::identity::DeviceName;
use crate::metrics::Metrics;
use crate::mqtt::codec::{PacketReader, Protocol, QoS};
use crate::mqtt::topic::Subscription;

/// `[limits]` of the harness's broker.
const MAX_PACKET: usize = 64 * 1024;
const MAX_KEEP_ALIVE: u16 = 600;
const MAX_INFLIGHT: u16 = 16;
const MAX_QUEUED: usize = 100;
const MAX_SESSION_EXPIRY: u32 = 604_800;
/// `connect_timeout`, which also bounds each write to the client.
const WRITE_LIMIT: Duration = Duration::from_secs(30);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A device ACL that allows every topic: these tests are about time, not authorization.
fn allow_all(device: &str) -> Arc<DeviceAcl> {
    let all = ["#".to_owned()];
    let profile = Profile::new(&all, &all, &[], &[]).expect("a valid profile");
    Arc::new(profile.for_device(device))
}

/// A broker without a message store, and the way in for clients.
struct Harness {
    broker: Arc<Broker>,
}

impl Harness {
    fn new() -> Harness {
        Harness {
            broker: Broker::new(Arc::new(Metrics::default()), None),
        }
    }

    /// Connects as `device` with `connect` and asserts a successful CONNACK. The steps
    /// after TLS and the admission are those of `server::connection`: the CONNECT is read,
    /// its will checked, the session opened, CONNACK sent, and the session served.
    async fn connect(&self, device: &str, connect: &Connect<'_>) -> Client {
        let (client, server) = tokio::io::duplex(MAX_PACKET);
        let (rd, mut wr) = tokio::io::split(client);
        let (server_rd, mut server_wr) = tokio::io::split(server);
        wr.write_all(&connect.bytes()).await.expect("CONNECT sent");

        let mut reader = PacketReader::new(server_rd, MAX_PACKET);
        let packet = reader.read_connect().await.expect("the CONNECT decodes");
        let req = connect::ConnectRequest::from_packet(&packet);
        let granted = expiry::granted(
            req.protocol,
            req.clean_start,
            req.session_expiry,
            MAX_SESSION_EXPIRY,
        );
        let device = DeviceName::parse(device).expect("a valid device name");
        let acl = allow_all(device.as_str());
        let will = connect::will(&packet, device.as_str(), &acl).expect("the will is allowed");
        let client_id = connect::client_id(&req).expect("a valid client id");
        let conn_id = self.broker.connection_id();
        let kick = CancellationToken::new();
        let request = SessionRequest {
            key: SessionKey {
                device: device.clone(),
                client_id: client_id.id.clone(),
            },
            clean_start: req.clean_start,
            expiry: granted.expiry,
            acl,
            max_queued: MAX_QUEUED,
            max_sessions: 16,
        };
        let opened = self
            .broker
            .open_session(request, conn_id, kick.clone())
            .expect("no quota without a store");
        let keep_alive = connect::effective_keep_alive(req.keep_alive, MAX_KEEP_ALIVE);
        let ack = connect::connack_success(
            &req,
            &client_id,
            opened.present,
            keep_alive,
            MAX_INFLIGHT,
            MAX_PACKET,
            granted.announce,
        )
        .expect("a CONNACK that fits");
        crate::broker::send(&mut server_wr, &ack, WRITE_LIMIT)
            .await
            .expect("CONNACK sent");
        let params = Params {
            protocol: req.protocol,
            keep_alive,
            window: usize::from(req.receive_maximum.unwrap_or(u16::MAX).min(MAX_INFLIGHT)),
            receive_max: usize::from(MAX_INFLIGHT),
            topic_alias_max: connect::TOPIC_ALIAS_MAX,
            // No server aliases: the tests read topics from every PUBLISH.
            client_topic_alias_max: 0,
            client_max_packet: None,
            write_limit: WRITE_LIMIT,
            expiry_was_zero: req.protocol == Protocol::V5 && req.session_expiry.unwrap_or(0) == 0,
            max_session_expiry: MAX_SESSION_EXPIRY,
            problem_info: req.problem_info,
        };
        let broker = self.broker.clone();
        let session = opened.session.clone();
        let task = tokio::spawn(async move {
            let shutdown = CancellationToken::new();
            let revoke = Revoke::default();
            let signals = Signals {
                shutdown: &shutdown,
                kick: &kick,
                revoke: &revoke,
            };
            serve(
                &broker,
                &session,
                conn_id,
                &device,
                &mut reader,
                server_wr,
                params,
                will,
                opened.generation,
                signals,
            )
            .await
        });
        let mut client = Client {
            rd,
            wr,
            buf: Vec::new(),
            v5: connect.v5,
            task,
        };
        match client.recv().await {
            Some(In::ConnAck { present, code: 0 }) => assert_eq!(present, opened.present),
            other => panic!("expected CONNACK success, got {other:?}"),
        }
        client
    }

    /// A session of `device` that a connection holds but that takes nothing from its queue
    /// (a subscriber that does not read), subscribed to `filter` at QoS 1.
    fn stuck_subscriber(&self, device: &str, max_queued: usize, filter: &str) -> (SessionRef, u64) {
        let conn_id = self.broker.connection_id();
        let request = SessionRequest {
            key: SessionKey {
                device: DeviceName::parse(device).expect("a valid device name"),
                client_id: "stuck".to_owned(),
            },
            clean_start: true,
            expiry: Expiry::OnDisconnect,
            acl: allow_all(device),
            max_queued,
            max_sessions: 16,
        };
        let opened = self
            .broker
            .open_session(request, conn_id, CancellationToken::new())
            .expect("opened");
        let sub = Subscription::parse(filter).expect("a valid filter");
        self.broker.subscribe(
            &opened.session,
            &sub,
            SubOptions::with_qos(QoS::AtLeastOnce),
            false,
        );
        (opened.session, conn_id)
    }

    /// `certmq_messages_dropped_total{reason}`.
    fn dropped(&self, reason: &str) -> u64 {
        let series = format!("certmq_messages_dropped_total{{reason=\"{reason}\"}} ");
        self.broker
            .metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(&series)?.parse().ok())
            .unwrap_or(0)
    }
}

/// The client end of one connection.
struct Client {
    rd: ReadHalf<DuplexStream>,
    wr: WriteHalf<DuplexStream>,
    /// Bytes read but not yet a whole packet.
    buf: Vec<u8>,
    v5: bool,
    /// The broker's side: `serve`, and how it ended.
    task: JoinHandle<End>,
}

impl Client {
    async fn send(&mut self, bytes: &[u8]) {
        self.wr.write_all(bytes).await.expect("the broker reads");
    }

    /// The next packet from the broker, or None once it closed the connection.
    async fn recv(&mut self) -> Option<In> {
        loop {
            if let Some(frame) = split_frame(&mut self.buf) {
                return Some(In::parse(&frame, self.v5));
            }
            let mut chunk = [0u8; 4096];
            let n = self.rd.read(&mut chunk).await.expect("the duplex reads");
            if n == 0 {
                assert!(self.buf.is_empty(), "a partial packet: {:02x?}", self.buf);
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next packet, which must be a PUBLISH.
    async fn publish_in(&mut self) -> Pub {
        match self.recv().await {
            Some(In::Publish(p)) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// SUBSCRIBE to one filter at QoS 1, and its SUBACK granting it.
    async fn subscribe(&mut self, filter: &str) {
        self.send(&subscribe(self.v5, 1, filter, 1)).await;
        match self.recv().await {
            Some(In::SubAck { pkid: 1, codes }) => assert_eq!(codes, [1]),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// A QoS 1 PUBLISH (`expiry`: MQTT 5 Message Expiry Interval) and its PUBACK.
    async fn publish_acked(&mut self, pkid: u16, topic: &str, payload: &[u8], expiry: Option<u32>) {
        self.send(&publish(self.v5, topic, payload, pkid, expiry))
            .await;
        match self.recv().await {
            Some(In::PubAck { pkid: p, code: 0 }) if p == pkid => {}
            other => panic!("expected PUBACK {pkid}, got {other:?}"),
        }
    }

    /// Asserts that, at this instant, the broker has sent nothing and kept the connection
    /// open. Other tasks get to run first; no time passes.
    async fn assert_quiet(&mut self, when: &str) {
        for _ in 0..64 {
            tokio::task::yield_now().await;
        }
        assert!(self.buf.is_empty(), "{when}: got {:02x?}", self.buf);
        let mut byte = [0u8; 1];
        let mut read = ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(&mut self.rd).poll_read(&mut cx, &mut read) {
            Poll::Pending => {}
            Poll::Ready(Ok(())) if read.filled().is_empty() => {
                panic!("{when}: the broker closed the connection")
            }
            Poll::Ready(r) => panic!("{when}: the broker sent {:02x?} ({r:?})", read.filled()),
        }
        assert!(!self.task.is_finished(), "{when}: the connection ended");
    }

    /// Reads until the broker closes; the packets it sent first, and how `serve` ended.
    async fn until_closed(mut self) -> (Vec<In>, End) {
        let mut packets = Vec::new();
        while let Some(p) = self.recv().await {
            packets.push(p);
        }
        (packets, self.task.await.expect("serve does not panic"))
    }

    /// Closes the connection without DISCONNECT (a device that loses its network), and
    /// waits until the broker's side has ended.
    async fn drop_network(self) -> End {
        let Client { rd, wr, task, .. } = self;
        drop((rd, wr));
        task.await.expect("serve does not panic")
    }
}

/// Splits one whole packet off the front of `buf`.
fn split_frame(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut len = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            let end = 2 + i + len;
            return (buf.len() >= end).then(|| buf.drain(..end).collect());
        }
    }
    panic!("the broker wrote a malformed remaining length: {buf:02x?}")
}

// ---------------------------------------------------------------- packets in

/// A packet from the broker, as far as these tests look at it.
#[derive(Debug, PartialEq, Eq)]
enum In {
    ConnAck { present: bool, code: u8 },
    Publish(Pub),
    PubAck { pkid: u16, code: u8 },
    SubAck { pkid: u16, codes: Vec<u8> },
    PingResp,
    Disconnect { code: u8 },
    Other(Vec<u8>),
}

/// A PUBLISH from the broker.
#[derive(Debug, PartialEq, Eq)]
struct Pub {
    topic: String,
    payload: Vec<u8>,
    qos: u8,
    pkid: u16,
    /// MQTT 5 Message Expiry Interval.
    expiry: Option<u32>,
}

/// A cursor over a packet's variable header and payload.
struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    fn byte(&mut self) -> u8 {
        self.take(1)[0]
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    fn varint(&mut self) -> usize {
        let mut n = 0;
        for shift in 0..4 {
            let b = self.byte();
            n |= usize::from(b & 0x7F) << (7 * shift);
            if b & 0x80 == 0 {
                break;
            }
        }
        n
    }

    fn string(&mut self) -> &'a [u8] {
        let n = usize::from(self.u16());
        self.take(n)
    }

    /// An MQTT 5 property block: the Message Expiry Interval, if there is one.
    fn properties(&mut self) -> Option<u32> {
        let n = self.varint();
        let mut props = Body(self.take(n));
        let mut expiry = None;
        while !props.0.is_empty() {
            match props.byte() {
                0x01 => {
                    props.byte();
                }
                0x02 => expiry = Some(props.u32()),
                0x03 | 0x08 | 0x09 | 0x1F => {
                    props.string();
                }
                0x0B => {
                    props.varint();
                }
                0x23 => {
                    props.u16();
                }
                0x26 => {
                    props.string();
                    props.string();
                }
                other => panic!("a property these tests do not expect: {other:#04x}"),
            }
        }
        expiry
    }
}

impl In {
    fn parse(frame: &[u8], v5: bool) -> In {
        let first = frame[0];
        let mut b = Body(&frame[1..]);
        b.varint();
        match first >> 4 {
            2 => {
                let present = b.byte() & 1 == 1;
                In::ConnAck {
                    present,
                    code: b.byte(),
                }
            }
            3 => {
                let qos = (first >> 1) & 3;
                let topic = String::from_utf8(b.string().to_vec()).expect("a UTF-8 topic");
                let pkid = if qos > 0 { b.u16() } else { 0 };
                let expiry = if v5 { b.properties() } else { None };
                In::Publish(Pub {
                    topic,
                    payload: b.0.to_vec(),
                    qos,
                    pkid,
                    expiry,
                })
            }
            4 => In::PubAck {
                pkid: b.u16(),
                code: b.0.first().copied().unwrap_or(0),
            },
            9 => {
                let pkid = b.u16();
                if v5 {
                    b.properties();
                }
                In::SubAck {
                    pkid,
                    codes: b.0.to_vec(),
                }
            }
            13 => In::PingResp,
            14 => In::Disconnect {
                code: b.0.first().copied().unwrap_or(0),
            },
            _ => In::Other(frame.to_vec()),
        }
    }
}

// ---------------------------------------------------------------- packets out

/// A CONNECT as a client writes it.
struct Connect<'a> {
    v5: bool,
    client_id: &'a str,
    clean: bool,
    keep_alive: u16,
    /// MQTT 5 Session Expiry Interval.
    session_expiry: Option<u32>,
    /// MQTT 5 Receive Maximum.
    receive_maximum: Option<u16>,
    /// A QoS 1 will: topic, payload, MQTT 5 Will Delay Interval.
    will: Option<(&'a str, &'a [u8], u32)>,
}

impl<'a> Connect<'a> {
    /// Clean start, keep alive 60 s, no will.
    fn new(v5: bool, client_id: &'a str) -> Connect<'a> {
        Connect {
            v5,
            client_id,
            clean: true,
            keep_alive: 60,
            session_expiry: None,
            receive_maximum: None,
            will: None,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut flags = if self.clean { 0x02 } else { 0 };
        if self.will.is_some() {
            flags |= 0x04 | (1 << 3);
        }
        let mut b = Vec::new();
        put_str(&mut b, b"MQTT");
        b.push(if self.v5 { 5 } else { 4 });
        b.push(flags);
        b.extend_from_slice(&self.keep_alive.to_be_bytes());
        if self.v5 {
            let mut props = Vec::new();
            if let Some(s) = self.session_expiry {
                props.push(0x11);
                props.extend_from_slice(&s.to_be_bytes());
            }
            if let Some(r) = self.receive_maximum {
                props.push(0x21);
                props.extend_from_slice(&r.to_be_bytes());
            }
            put_varint(&mut b, props.len());
            b.extend_from_slice(&props);
        }
        put_str(&mut b, self.client_id.as_bytes());
        if let Some((topic, payload, delay)) = self.will {
            if self.v5 {
                b.extend_from_slice(&[5, 0x18]);
                b.extend_from_slice(&delay.to_be_bytes());
            }
            put_str(&mut b, topic.as_bytes());
            put_str(&mut b, payload);
        }
        frame(0x10, &b)
    }
}

/// A QoS 1 PUBLISH, with an MQTT 5 Message Expiry Interval if given.
fn publish(v5: bool, topic: &str, payload: &[u8], pkid: u16, expiry: Option<u32>) -> Vec<u8> {
    let mut b = Vec::new();
    put_str(&mut b, topic.as_bytes());
    b.extend_from_slice(&pkid.to_be_bytes());
    if v5 {
        match expiry {
            Some(e) => {
                b.extend_from_slice(&[5, 0x02]);
                b.extend_from_slice(&e.to_be_bytes());
            }
            None => b.push(0),
        }
    }
    b.extend_from_slice(payload);
    frame(0x32, &b)
}

fn subscribe(v5: bool, pkid: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut b = pkid.to_be_bytes().to_vec();
    if v5 {
        b.push(0);
    }
    put_str(&mut b, filter.as_bytes());
    b.push(qos);
    frame(0x82, &b)
}

fn puback(pkid: u16) -> Vec<u8> {
    frame(0x40, &pkid.to_be_bytes())
}

const PINGREQ: [u8; 2] = [0xC0, 0];
const DISCONNECT: [u8; 2] = [0xE0, 0];

fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    put_varint(&mut p, body.len());
    p.extend_from_slice(body);
    p
}

fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let low = (n % 128) as u8;
        n /= 128;
        out.push(if n > 0 { low | 0x80 } else { low });
        if n == 0 {
            return;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    let len = u16::try_from(s.len()).expect("a short string");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s);
}

// ---------------------------------------------------------------- keep alive

/// A silent client is closed at exactly 1.5 x its keep alive, and not a tick before;
/// MQTT 5 gets DISCONNECT 0x8D first.
async fn silent_client_is_closed_at_one_and_a_half_keep_alives(v5: bool, keep_alive: u16) {
    let h = Harness::new();
    let mut c = Connect::new(v5, "c");
    c.keep_alive = keep_alive;
    let mut c = h.connect("dev1", &c).await;
    let start = Instant::now();
    let limit = ms(u64::from(keep_alive) * 1500);
    tokio::time::sleep_until(start + limit - ms(1)).await;
    c.assert_quiet("a tick before 1.5 x keep alive").await;
    let (packets, end) = c.until_closed().await;
    assert_eq!(start.elapsed(), limit, "closed after {:?}", start.elapsed());
    let expected = if v5 {
        vec![In::Disconnect { code: 0x8D }]
    } else {
        Vec::new()
    };
    assert_eq!(packets, expected);
    assert!(matches!(end, End::KeepAlive(d) if d == limit), "{end:?}");
}

#[tokio::test(start_paused = true)]
async fn keep_alive_closes_a_silent_client_at_one_and_a_half_periods_v311() {
    silent_client_is_closed_at_one_and_a_half_keep_alives(false, 10).await;
}

#[tokio::test(start_paused = true)]
async fn keep_alive_closes_a_silent_client_at_one_and_a_half_periods_v5() {
    silent_client_is_closed_at_one_and_a_half_keep_alives(true, 10).await;
}

#[tokio::test(start_paused = true)]
async fn keep_alive_of_an_odd_number_of_seconds_ends_on_the_half_second() {
    silent_client_is_closed_at_one_and_a_half_keep_alives(true, 3).await;
}

/// Keep alive 0 asks for none: the broker still bounds the wait, at `max_keep_alive`.
#[tokio::test(start_paused = true)]
async fn keep_alive_0_gets_max_keep_alive() {
    silent_client_is_closed_at_one_and_a_half_keep_alives_as(0, MAX_KEEP_ALIVE).await;
}

/// Keep alive above `max_keep_alive` is capped to it.
#[tokio::test(start_paused = true)]
async fn keep_alive_above_the_maximum_is_capped() {
    silent_client_is_closed_at_one_and_a_half_keep_alives_as(MAX_KEEP_ALIVE + 1, MAX_KEEP_ALIVE)
        .await;
}

async fn silent_client_is_closed_at_one_and_a_half_keep_alives_as(asked: u16, enforced: u16) {
    let h = Harness::new();
    let mut c = Connect::new(false, "c");
    c.keep_alive = asked;
    let c = h.connect("dev1", &c).await;
    let start = Instant::now();
    let (_, end) = c.until_closed().await;
    let limit = ms(u64::from(enforced) * 1500);
    assert_eq!(start.elapsed(), limit);
    assert!(matches!(end, End::KeepAlive(d) if d == limit), "{end:?}");
}

/// Every packet starts keep alive over: a PINGREQ a second before the deadline moves it
/// to 1.5 x keep alive after that PINGREQ.
#[tokio::test(start_paused = true)]
async fn a_pingreq_before_the_deadline_extends_it() {
    let h = Harness::new();
    let mut c = Connect::new(true, "c");
    c.keep_alive = 10;
    let mut c = h.connect("dev1", &c).await;
    let start = Instant::now();
    tokio::time::sleep_until(start + secs(14)).await;
    c.send(&PINGREQ).await;
    assert_eq!(c.recv().await, Some(In::PingResp));
    let pinged = Instant::now();
    assert_eq!(pinged - start, secs(14), "PINGRESP at once");
    tokio::time::sleep_until(pinged + ms(14_999)).await;
    c.assert_quiet("a tick before 1.5 x keep alive after the PINGREQ")
        .await;
    let (packets, end) = c.until_closed().await;
    assert_eq!(pinged.elapsed(), secs(15));
    assert_eq!(packets, [In::Disconnect { code: 0x8D }]);
    assert!(matches!(end, End::KeepAlive(_)), "{end:?}");
}

/// While a client's message waits for room in a subscriber's queue (flow control: nothing
/// more is read from that client, not even its PINGREQ), keep alive does not run; it
/// starts over once the message is taken.
#[tokio::test(start_paused = true)]
async fn keep_alive_is_suspended_while_the_connection_is_paced() {
    let h = Harness::new();
    h.broker.set_stall_timeout(1000);
    let (stuck, stuck_conn) = h.stuck_subscriber("dev2", 1, "devices/dev1/#");
    let mut c = Connect::new(true, "p");
    c.keep_alive = 10;
    let mut p = h.connect("dev1", &c).await;
    let start = Instant::now();
    p.publish_acked(1, "devices/dev1/t", b"first", None).await;
    // The subscriber's queue is full: the second message is paced, unacknowledged.
    p.send(&publish(true, "devices/dev1/t", b"second", 2, None))
        .await;
    tokio::time::sleep_until(start + secs(100)).await;
    p.assert_quiet("paced for 100 s, keep alive 10 s").await;

    // The subscriber takes its message: the second one gets in, and is acknowledged.
    let taken = stuck.next_batch(stuck_conn, 16, 16);
    assert_eq!(taken.len(), 1);
    assert_eq!(p.recv().await, Some(In::PubAck { pkid: 2, code: 0 }));
    let resumed = Instant::now();
    assert_eq!(resumed - start, secs(100), "acknowledged at once");
    tokio::time::sleep_until(resumed + ms(14_999)).await;
    p.assert_quiet("a tick before 1.5 x keep alive after pacing")
        .await;
    let (packets, end) = p.until_closed().await;
    assert_eq!(resumed.elapsed(), secs(15));
    assert_eq!(packets, [In::Disconnect { code: 0x8D }]);
    assert!(matches!(end, End::KeepAlive(_)), "{end:?}");
}

// ---------------------------------------------------------------- will delay

const WILL_TOPIC: &str = "devices/dev1/status";

/// An MQTT 5 client of dev1 with a will delayed by `delay` and this session expiry.
fn with_will(client_id: &str, delay: u32, session_expiry: u32) -> Connect<'_> {
    let mut c = Connect::new(true, client_id);
    c.session_expiry = Some(session_expiry);
    c.will = Some((WILL_TOPIC, b"gone", delay));
    c
}

/// A subscriber to the will topic.
async fn will_watcher(h: &Harness) -> Client {
    let mut w = h.connect("dev2", &Connect::new(true, "watcher")).await;
    w.subscribe(WILL_TOPIC).await;
    w
}

/// Waits for the will; returns how long after `since` it came.
async fn will_arrives(w: &mut Client, since: Instant) -> Duration {
    let p = w.publish_in().await;
    assert_eq!(
        (p.topic.as_str(), p.payload.as_slice()),
        (WILL_TOPIC, &b"gone"[..])
    );
    since.elapsed()
}

#[tokio::test(start_paused = true)]
async fn a_delayed_will_is_published_after_exactly_the_delay() {
    let h = Harness::new();
    let mut w = will_watcher(&h).await;
    let d = h.connect("dev1", &with_will("d", 5, 60)).await;
    let end = d.drop_network().await;
    assert!(matches!(end, End::Closed(_)), "{end:?}");
    let dropped = Instant::now();
    tokio::time::sleep_until(dropped + ms(4_999)).await;
    w.assert_quiet("a tick before the will delay").await;
    assert_eq!(will_arrives(&mut w, dropped).await, secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_delayed_will_is_not_published_when_the_session_is_resumed_within_the_delay() {
    let h = Harness::new();
    let mut w = will_watcher(&h).await;
    let d = h.connect("dev1", &with_will("d", 5, 60)).await;
    d.drop_network().await;
    let dropped = Instant::now();
    tokio::time::sleep_until(dropped + ms(4_999)).await;
    let mut again = with_will("d", 5, 60);
    again.clean = false;
    let _d = h.connect("dev1", &again).await;
    tokio::time::sleep_until(dropped + secs(60)).await;
    w.assert_quiet("the session was resumed within the delay")
        .await;
}

/// The will is published when the session ends, if that comes before the will delay
/// (MQTT 5 §3.1.3.2.2).
#[tokio::test(start_paused = true)]
async fn a_will_delay_longer_than_the_session_expiry_ends_with_the_session() {
    let h = Harness::new();
    let mut w = will_watcher(&h).await;
    let d = h.connect("dev1", &with_will("d", 30, 10)).await;
    d.drop_network().await;
    let dropped = Instant::now();
    tokio::time::sleep_until(dropped + ms(9_999)).await;
    w.assert_quiet("a tick before the session expiry").await;
    assert_eq!(will_arrives(&mut w, dropped).await, secs(10));
}

// ---------------------------------------------------------------- message expiry

/// How the subscriber of [`queued_for`] falls behind.
#[derive(Clone, Copy)]
enum Behind {
    /// Offline (a persistent session), reconnecting after the wait.
    Offline,
    /// Online with Receive Maximum 1, holding an unacknowledged message until the wait
    /// is over.
    Slow,
}

/// A message with Message Expiry Interval 10 s is queued for a subscriber that is
/// `behind`; after `wait` the subscriber takes its queue. Returns the expiry the message
/// came with, or None when it was not delivered (the next message is a later marker).
async fn queued_for(behind: Behind, wait: Duration) -> (Option<u32>, Harness) {
    const TOPIC: &str = "devices/dev1/t";
    let h = Harness::new();
    let mut c = Connect::new(true, "s");
    c.session_expiry = Some(3600);
    c.receive_maximum = Some(1);
    let mut s = h.connect("dev2", &c).await;
    s.subscribe(TOPIC).await;
    let mut p = h.connect("dev1", &Connect::new(true, "p")).await;
    let held = match behind {
        Behind::Offline => {
            s.send(&DISCONNECT).await;
            let (rest, end) = s.until_closed().await;
            assert!(rest.is_empty() && matches!(end, End::Disconnect { .. }));
            None
        }
        Behind::Slow => {
            p.publish_acked(1, TOPIC, b"held", None).await;
            let held = s.publish_in().await;
            assert_eq!(held.payload, b"held");
            Some((s, held.pkid))
        }
    };
    p.publish_acked(2, TOPIC, b"expiring", Some(10)).await;
    let queued = Instant::now();
    tokio::time::sleep_until(queued + wait).await;
    let mut s = match held {
        None => {
            c.clean = false;
            h.connect("dev2", &c).await
        }
        Some((mut s, pkid)) => {
            s.send(&puback(pkid)).await;
            s
        }
    };
    assert_eq!(queued.elapsed(), wait, "no time passed");
    p.publish_acked(3, TOPIC, b"marker", None).await;
    let first = s.publish_in().await;
    if first.payload == b"marker" {
        return (None, h);
    }
    assert_eq!(first.payload, b"expiring");
    s.send(&puback(first.pkid)).await;
    assert_eq!(s.publish_in().await.payload, b"marker");
    (first.expiry, h)
}

#[tokio::test(start_paused = true)]
async fn message_expiry_is_decremented_by_the_time_queued_offline() {
    assert_eq!(queued_for(Behind::Offline, secs(0)).await.0, Some(10));
    assert_eq!(queued_for(Behind::Offline, secs(4)).await.0, Some(6));
    assert_eq!(queued_for(Behind::Offline, ms(9_999)).await.0, Some(1));
}

#[tokio::test(start_paused = true)]
async fn message_expiry_is_decremented_by_the_time_queued_behind_a_slow_subscriber() {
    assert_eq!(queued_for(Behind::Slow, secs(4)).await.0, Some(6));
    assert_eq!(queued_for(Behind::Slow, ms(9_999)).await.0, Some(1));
}

#[tokio::test(start_paused = true)]
async fn an_expired_message_is_dropped_from_an_offline_session() {
    let (expiry, h) = queued_for(Behind::Offline, secs(10)).await;
    assert_eq!(expiry, None, "delivered at its expiry");
    assert_eq!(h.dropped("expired"), 1);
}

#[tokio::test(start_paused = true)]
async fn an_expired_message_is_dropped_behind_a_slow_subscriber() {
    let (expiry, h) = queued_for(Behind::Slow, secs(10)).await;
    assert_eq!(expiry, None, "delivered at its expiry");
    assert_eq!(h.dropped("expired"), 1);
}
