//! Arbitrary sequences of MQTT packets from one client whose CONNECT was already accepted,
//! fed to that connection's session loop (`certmq::broker::conn::serve`) over an
//! in-memory duplex stream: PUBLISH at every QoS with DUP, RETAIN and MQTT 5 topic aliases,
//! PUBACK / PUBREC / PUBREL / PUBCOMP with any packet id, SUBSCRIBE / UNSUBSCRIBE (the
//! session's own publishes come back to it), PINGREQ, DISCONNECT and raw bytes, in any
//! order, for MQTT 3.1.1 and 5.
//!
//! The invariant: no panic, no hang, and the connection either keeps serving (a PINGREQ
//! sent after the sequence is answered) or ends with DISCONNECT, a protocol error or a
//! malformed packet; never by keep alive, a write error or anything else.
//!
//! Time is tokio's paused clock: a loop that waits for something that never comes lets the
//! clock jump to the harness's own bound, which fails the run, instead of hanging libFuzzer.
//! The broker has no message store (in-memory sessions only): the commit paths are covered
//! by the integration tests, not here.

#![no_main]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use certmq::acl::Profile;
use certmq::broker::message::Message;
use certmq::broker::conn::{serve, End, Params, Revoke, Signals};
use certmq::broker::session::{Expiry, SessionKey};
use certmq::broker::conn::connect;
use certmq::broker::{Broker, SessionRequest, Will};
use certmq::identity::DeviceName;
use certmq::metrics::Metrics;
use certmq::mqtt::codec::{PacketReader, Protocol, QoS};
use certmq::mqtt::topic::TopicName;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const DEVICE: &str = "dev1";
/// The broker's `max_packet_size` for this connection.
const MAX_PACKET: usize = 4096;
/// Keep alive: long enough that no sequence of `Pause`s reaches it (1.5 x 60 s).
const KEEP_ALIVE: u16 = 60;
/// How long the client waits for the answer to its final PINGREQ (virtual time).
const PING_WAIT: Duration = Duration::from_secs(20);
/// All `Pause`s of one run together, virtual time: with PING_WAIT, less than the 90 s
/// after which keep alive ends a silent connection.
const PAUSE_BUDGET: Duration = Duration::from_secs(60);
/// The whole run, in virtual time: far beyond anything a serving loop needs.
const RUN_LIMIT: Duration = Duration::from_secs(3600);

/// Topics a PUBLISH uses: allowed, denied, the `v1/devices/me` alias, `$SYS`, invalid ones.
const TOPICS: &[&str] = &[
    "devices/dev1/a",
    "devices/dev1/b/c",
    "v1/devices/me/telemetry",
    "v1/devices/dev1/x",
    "devices/dev2/a",
    "$SYS/broker",
    "devices/dev1/+",
    "devices/dev1/#",
    "",
    "devices/dev1/\u{0}",
];

/// Filters a SUBSCRIBE or UNSUBSCRIBE uses: covering, overlapping, shared, denied, invalid.
const FILTERS: &[&str] = &[
    "devices/dev1/#",
    "devices/dev1/+",
    "devices/dev1/a",
    "v1/devices/dev1/#",
    "v1/devices/me/#",
    "$share/g/devices/dev1/#",
    "$share/g/devices/dev1/a",
    "#",
    "devices/#",
    "devices/dev1/#/x",
    "",
    "$share/g",
];

#[derive(Debug, Arbitrary)]
struct Input {
    v5: bool,
    /// Outbound window (the client's Receive Maximum), 1..=16.
    window: u8,
    /// Our Receive Maximum (max_inflight), 1..=16.
    receive_max: u8,
    /// The client's Maximum Packet Size (MQTT 5), if any.
    client_max_packet: Option<u16>,
    /// The client's Topic Alias Maximum (MQTT 5): the aliases the broker may assign.
    client_topic_alias_max: u8,
    expiry_was_zero: bool,
    problem_info: bool,
    /// A will, published unless the connection ends with a plain DISCONNECT.
    will: Option<QoSByte>,
    /// Acknowledge what the broker delivers, as a well-behaved client does.
    auto_ack: bool,
    /// The duplex buffer: small ones split packets and make writes wait.
    duplex_small: bool,
    ops: Vec<Op>,
}

#[derive(Debug, Arbitrary, Clone, Copy)]
struct QoSByte(u8);

impl QoSByte {
    fn bits(self) -> u8 {
        self.0 % 3
    }
    fn qos(self) -> QoS {
        match self.bits() {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Name {
    Known(u8),
    Other(String),
}

impl Name {
    fn pick<'a>(&'a self, list: &'a [&'a str]) -> &'a str {
        match self {
            Name::Known(i) => list[usize::from(*i) % list.len()],
            Name::Other(s) => s,
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Op {
    Publish {
        topic: Name,
        qos: QoSByte,
        dup: bool,
        retain: bool,
        pkid: u16,
        payload: Vec<u8>,
        /// MQTT 5 Topic Alias (0 and > 32 are invalid).
        alias: Option<u8>,
        /// MQTT 5 Message Expiry Interval.
        expiry: Option<u8>,
        /// MQTT 5 properties a client may or may not send.
        props: u8,
    },
    PubAck(u16),
    PubRec(u16, u8),
    PubRel(u16, u8),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<(Name, u8)>,
        sub_id: Option<u16>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<Name>,
    },
    PingReq,
    Disconnect {
        reason: u8,
        session_expiry: Option<u32>,
    },
    /// Any first byte and body, framed with its true length (so that the stream stays in
    /// step and the final PINGREQ is read as a packet of its own).
    Raw(u8, Vec<u8>),
    /// The client does nothing for this many tenths of a second (virtual time).
    Pause(u8),
}

fuzz_target!(|input: Input| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    rt.block_on(async {
        match tokio::time::timeout(RUN_LIMIT, run(input)).await {
            Ok(()) => {}
            Err(_) => panic!("the session did not end within {RUN_LIMIT:?} (virtual time)"),
        }
    });
});

async fn run(input: Input) {
    let protocol = if input.v5 {
        Protocol::V5
    } else {
        Protocol::V311
    };
    let capacity = if input.duplex_small { 61 } else { 64 * 1024 };
    let (client, server) = tokio::io::duplex(capacity);
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (server_rd, server_wr) = tokio::io::split(server);

    // CONNECT is accepted as a real connection accepts it (src/server/connection.rs): the
    // reader decides the protocol from it, then the session is opened and served.
    client_wr
        .write_all(&connect_packet(input.v5))
        .await
        .expect("CONNECT fits the duplex");
    let mut reader = PacketReader::new(server_rd, MAX_PACKET);
    reader.read_connect().await.expect("our CONNECT decodes");

    let broker = Broker::new(Arc::new(Metrics::default()), None);
    let device = DeviceName::parse(DEVICE).expect("a valid device name");
    let acl = Arc::new(Profile::builtin_device().for_device(DEVICE));
    let conn_id = broker.connection_id();
    let kick = CancellationToken::new();
    let opened = broker
        .open_session(
            SessionRequest {
                key: SessionKey {
                    device: device.clone(),
                    client_id: "fuzz".to_owned(),
                },
                clean_start: true,
                expiry: if input.expiry_was_zero || !input.v5 {
                    Expiry::OnDisconnect
                } else {
                    Expiry::After(30)
                },
                acl,
                max_queued: 64,
                max_sessions: 4,
            },
            conn_id,
            kick.clone(),
        )
        .expect("no quota without a store");
    let params = Params {
        protocol,
        keep_alive: KEEP_ALIVE,
        window: usize::from(input.window % 16) + 1,
        receive_max: usize::from(input.receive_max % 16) + 1,
        topic_alias_max: connect::TOPIC_ALIAS_MAX,
        client_max_packet: if input.v5 {
            input.client_max_packet.map(|m| usize::from(m.max(16)))
        } else {
            None
        },
        client_topic_alias_max: if input.v5 {
            u16::from(input.client_topic_alias_max % 8)
        } else {
            0
        },
        write_limit: Duration::from_secs(30),
        expiry_was_zero: input.v5 && input.expiry_was_zero,
        problem_info: input.problem_info,
        max_session_expiry: 604_800,
    };
    let will = input.will.map(|q| {
        let message = Message {
            topic: TopicName::parse("devices/dev1/will").expect("a valid topic"),
            payload: Bytes::from_static(b"gone"),
            qos: q.qos(),
            retain: false,
            props: Default::default(),
            expires_at: None,
            store_id: Default::default(),
        };
        Will::new(message, 0)
    });
    let shutdown = CancellationToken::new();
    let revoke = Revoke::default();

    // The client: one task reads everything the broker writes (so the broker never waits
    // on us), counts PINGRESPs and, with `auto_ack`, acknowledges deliveries through the
    // writer below.
    let pingresps = Arc::new(AtomicUsize::new(0));
    let ping_seen = Arc::new(tokio::sync::Notify::new());
    let closed = Arc::new(AtomicBool::new(false));
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let client_reader = {
        let pingresps = pingresps.clone();
        let ping_seen = ping_seen.clone();
        let closed = closed.clone();
        let v5 = input.v5;
        let auto_ack = input.auto_ack;
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                match client_rd.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                while let Some((first, body, len)) = frame(&buf) {
                    if first >> 4 == 13 {
                        pingresps.fetch_add(1, Ordering::SeqCst);
                        ping_seen.notify_one();
                    }
                    if auto_ack {
                        if let Some(ack) = ack_for(first, &buf[body..len], v5) {
                            let _ = ack_tx.send(ack);
                        }
                    }
                    buf.drain(..len);
                }
            }
            closed.store(true, Ordering::SeqCst);
            ping_seen.notify_one();
        })
    };

    let client_writer = {
        let pingresps = pingresps.clone();
        let ping_seen = ping_seen.clone();
        let closed = closed.clone();
        let v5 = input.v5;
        let ops = input.ops;
        tokio::spawn(async move {
            let mut sent_disconnect = false;
            // Pauses add up to at most PAUSE_BUDGET: with PING_WAIT, still within keep alive.
            let mut paused = Duration::ZERO;
            for op in &ops {
                while let Ok(ack) = ack_rx.try_recv() {
                    if client_wr.write_all(&ack).await.is_err() {
                        return;
                    }
                }
                if let Op::Pause(tenths) = op {
                    let pause = Duration::from_millis(100 * u64::from(*tenths % 50))
                        .min(PAUSE_BUDGET.saturating_sub(paused));
                    paused += pause;
                    tokio::time::sleep(pause).await;
                    continue;
                }
                sent_disconnect |= matches!(op, Op::Disconnect { .. });
                let bytes = encode_op(op, v5);
                if client_wr.write_all(&bytes).await.is_err() {
                    // The broker closed the connection: what it said is checked below.
                    return;
                }
            }
            // Still serving? A PINGREQ must be answered within PING_WAIT, however much the
            // sequence left in flight.
            if !sent_disconnect {
                let before = pingresps.load(Ordering::SeqCst);
                if client_wr.write_all(&[0xC0, 0x00]).await.is_ok() {
                    let answered = tokio::time::timeout(PING_WAIT, async {
                        loop {
                            let notified = ping_seen.notified();
                            if pingresps.load(Ordering::SeqCst) > before
                                || closed.load(Ordering::SeqCst)
                            {
                                return;
                            }
                            notified.await;
                        }
                    })
                    .await;
                    assert!(
                        answered.is_ok(),
                        "a serving connection did not answer PINGREQ within {PING_WAIT:?}"
                    );
                }
            }
            // The client goes away.
            let _ = client_wr.shutdown().await;
        })
    };

    let end = serve(
        &broker,
        &opened.session,
        conn_id,
        &device,
        &mut reader,
        server_wr,
        params,
        will,
        opened.generation,
        Signals {
            shutdown: &shutdown,
            kick: &kick,
            revoke: &revoke,
        },
    )
    .await;
    drop(reader);
    match &end {
        End::Disconnect { .. } | End::Closed(_) | End::Protocol { .. } => {}
        other => panic!("the session ended with {other:?}"),
    }
    if let Err(e) = client_writer.await {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    client_reader
        .await
        .expect("the client reader does not panic");
}

/// One complete packet at the start of `buf`: (first byte, body start, packet length).
fn frame(buf: &[u8]) -> Option<(u8, usize, usize)> {
    let first = *buf.first()?;
    let mut len = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            let body = 2 + i;
            return (buf.len() >= body + len).then_some((first, body, body + len));
        }
    }
    // The broker never writes a malformed length; stop parsing if it did.
    panic!("the broker wrote a malformed remaining length");
}

/// A well-behaved client's answer to a PUBLISH or PUBREL from the broker.
fn ack_for(first: u8, body: &[u8], v5: bool) -> Option<Vec<u8>> {
    match first >> 4 {
        3 => {
            let qos = (first >> 1) & 3;
            if qos == 0 {
                return None;
            }
            let topic_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
            let id = body.get(2 + topic_len..4 + topic_len)?;
            let kind = if qos == 1 { 0x40 } else { 0x50 };
            Some(vec![kind, 2, id[0], id[1]])
        }
        6 => {
            let id = body.get(..2)?;
            let _ = v5;
            Some(vec![0x70, 2, id[0], id[1]])
        }
        _ => None,
    }
}

fn connect_packet(v5: bool) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, "MQTT");
    body.push(if v5 { 5 } else { 4 });
    body.push(0x02); // clean start
    body.extend_from_slice(&KEEP_ALIVE.to_be_bytes());
    if v5 {
        body.push(0); // no properties
    }
    put_str(&mut body, "fuzz");
    packet(0x10, &body)
}

fn encode_op(op: &Op, v5: bool) -> Vec<u8> {
    match op {
        Op::Publish {
            topic,
            qos,
            dup,
            retain,
            pkid,
            payload,
            alias,
            expiry,
            props,
        } => {
            let first = 0x30 | (u8::from(*dup) << 3) | (qos.bits() << 1) | u8::from(*retain);
            let mut body = Vec::new();
            put_str(&mut body, topic.pick(TOPICS));
            if qos.bits() > 0 {
                body.extend_from_slice(&pkid.to_be_bytes());
            }
            if v5 {
                let mut p = Vec::new();
                if let Some(a) = alias {
                    p.push(0x23);
                    p.extend_from_slice(&u16::from(*a % 40).to_be_bytes());
                }
                if let Some(e) = expiry {
                    p.push(0x02);
                    p.extend_from_slice(&u32::from(*e % 4).to_be_bytes());
                }
                if props & 1 != 0 {
                    p.extend_from_slice(&[0x01, 1]); // payload format: UTF-8
                }
                if props & 2 != 0 {
                    p.push(0x08);
                    put_str(&mut p, "devices/dev1/reply");
                }
                if props & 4 != 0 {
                    p.extend_from_slice(&[0x09, 0, 2, 0xAB, 0xCD]);
                }
                if props & 8 != 0 {
                    p.push(0x26);
                    put_str(&mut p, "k");
                    put_str(&mut p, "v");
                }
                if props & 16 != 0 {
                    p.push(0x03);
                    put_str(&mut p, "text/plain");
                }
                if props & 32 != 0 {
                    p.extend_from_slice(&[0x0B, 7]); // a subscription id: a client may not
                }
                put_varint(&mut body, p.len());
                body.extend_from_slice(&p);
            }
            body.extend_from_slice(&payload[..payload.len().min(512)]);
            packet(first, &body)
        }
        Op::PubAck(id) => ack(0x40, *id, None, v5),
        Op::PubRec(id, reason) => ack(0x50, *id, Some(*reason), v5),
        Op::PubRel(id, reason) => ack(0x62, *id, Some(*reason), v5),
        Op::PubComp(id) => ack(0x70, *id, None, v5),
        Op::Subscribe {
            pkid,
            filters,
            sub_id,
        } => {
            let mut body = pkid.to_be_bytes().to_vec();
            if v5 {
                match sub_id {
                    Some(id) => {
                        let mut p = vec![0x0B];
                        put_varint(&mut p, usize::from(*id));
                        put_varint(&mut body, p.len());
                        body.extend_from_slice(&p);
                    }
                    None => body.push(0),
                }
            }
            for (filter, options) in filters.iter().take(8) {
                put_str(&mut body, filter.pick(FILTERS));
                // MQTT 3.1.1: QoS only; MQTT 5: QoS, No Local, RAP, Retain Handling.
                body.push(if v5 { options & 0x3F } else { options % 3 });
            }
            packet(0x82, &body)
        }
        Op::Unsubscribe { pkid, filters } => {
            let mut body = pkid.to_be_bytes().to_vec();
            if v5 {
                body.push(0);
            }
            for filter in filters.iter().take(8) {
                put_str(&mut body, filter.pick(FILTERS));
            }
            packet(0xA2, &body)
        }
        Op::PingReq => vec![0xC0, 0x00],
        Op::Disconnect {
            reason,
            session_expiry,
        } => {
            if !v5 {
                return vec![0xE0, 0x00];
            }
            // 0x00 normal, 0x04 with will, anything else as given.
            let code = match reason % 4 {
                0 => 0x00,
                1 => 0x04,
                2 => 0x80,
                _ => *reason,
            };
            let mut body = vec![code];
            match session_expiry {
                Some(s) => {
                    body.push(5);
                    body.push(0x11);
                    body.extend_from_slice(&s.to_be_bytes());
                }
                None => body.push(0),
            }
            packet(0xE0, &body)
        }
        Op::Raw(first, body) => packet(*first, body),
        Op::Pause(_) => Vec::new(),
    }
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP; MQTT 5 with a reason code when one is given.
fn ack(first: u8, id: u16, reason: Option<u8>, v5: bool) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    if let (true, Some(r)) = (v5, reason) {
        // Success, "no matching packet id", an error, or anything.
        body.push(match r % 4 {
            0 => 0x00,
            1 => 0x92,
            2 => 0x80,
            _ => r,
        });
    }
    packet(first, &body)
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    put_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(usize::from(u16::MAX))];
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}
