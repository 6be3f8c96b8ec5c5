//! Message integrity (contract §7 "No silent loss"): an inbound QoS 2 packet id is recorded only
//! for a message the broker accepts, so a client over its Receive Maximum loses nothing.

use crate::common::coretests::both_versions;
use crate::common::coretests::raw::{
    raw_ack, raw_publish, Raw, RawConnect, PUBCOMP, PUBREC, PUBREL,
};
use crate::common::coretests::{Setup, V};
use std::collections::BTreeSet;

const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
/// `max_inflight`, the Receive Maximum the broker announces.
const RECEIVE_MAXIMUM: u16 = 64;
/// One more than that.
const PIPELINED: u16 = RECEIVE_MAXIMUM + 1;

/// After a reconnect: PUBREL for an exchange that got its PUBREC, else the PUBLISH again
/// with DUP.
async fn resend(raw: &mut Raw, v: V, pkid: u16, recorded: &BTreeSet<u16>) {
    if recorded.contains(&pkid) {
        raw.send(&raw_ack(PUBREL, pkid)).await;
    } else {
        let again = raw_publish(v, "devices/d1/t", &pkid.to_be_bytes(), 2, pkid, true);
        raw.send(&again).await;
    }
}

fn connect(v: V) -> Vec<u8> {
    RawConnect {
        v,
        client_id: "p",
        clean: false,
        keep_alive: 30,
        will: None,
        session_expiry: (v == V::V5).then_some(600),
    }
    .bytes()
}

/// The packet id of an acknowledgement (PUBREC, PUBCOMP).
fn ack_pkid(p: &[u8]) -> u16 {
    u16::from_be_bytes([p[2], p[3]])
}

/// Pipelines 65 QoS 2 messages, then completes every exchange the way a client library does
/// after a reconnect (PUBREL for what got a PUBREC, the PUBLISH again with DUP for the rest).
/// The subscriber must receive all 65.
async fn qos2_over_the_window_loses_nothing(v: V) {
    let setup = Setup::new().await;
    let mut sub = setup.peer(&setup.pinned("backend"), V::V5, "sub").await;
    assert_eq!(sub.subscribe("devices/#", 2).await, 2);
    let dev = setup.device("d1");
    let (mut raw, _) = Raw::connect_ok(&dev, setup.addr(), &connect(v)).await;
    let mut burst = Vec::new();
    for i in 1..=PIPELINED {
        burst.extend(raw_publish(
            v,
            "devices/d1/t",
            &i.to_be_bytes(),
            2,
            i,
            false,
        ));
    }
    raw.send(&burst).await;

    let mut recorded = BTreeSet::new();
    let mut completed = BTreeSet::new();
    if v == V::V5 {
        // Over the Receive Maximum: DISCONNECT 0x93, and the extra message is not recorded.
        let packets = raw.until_closed().await;
        let bye = packets.last().expect("a DISCONNECT");
        assert_eq!(bye[0], 0xE0, "{packets:02x?}");
        assert_eq!(bye[2], RECEIVE_MAXIMUM_EXCEEDED);
        recorded.extend(
            packets
                .iter()
                .filter(|p| p[0] == PUBREC)
                .map(|p| ack_pkid(p)),
        );
        let (again, present) = Raw::connect_ok(&dev, setup.addr(), &connect(v)).await;
        assert!(present);
        raw = again;
        // Now within the Receive Maximum, as a client must be: at most 64 open exchanges,
        // the next one sent when one completes.
        let mut next = 1;
        while next <= RECEIVE_MAXIMUM {
            resend(&mut raw, v, next, &recorded).await;
            next += 1;
        }
        while completed.len() < usize::from(PIPELINED) {
            let p = raw.recv().await;
            match p[0] {
                PUBREC => raw.send(&raw_ack(PUBREL, ack_pkid(&p))).await,
                PUBCOMP => {
                    completed.insert(ack_pkid(&p));
                    if next <= PIPELINED {
                        resend(&mut raw, v, next, &recorded).await;
                        next += 1;
                    }
                }
                other => panic!("unexpected packet {other:#x}: {p:02x?}"),
            }
        }
    }
    // MQTT 3.1.1 cannot be told a limit: every message is taken on the first connection.
    while completed.len() < usize::from(PIPELINED) {
        let p = raw.recv().await;
        match p[0] {
            PUBREC => raw.send(&raw_ack(PUBREL, ack_pkid(&p))).await,
            PUBCOMP => {
                completed.insert(ack_pkid(&p));
            }
            other => panic!("unexpected packet {other:#x}: {p:02x?}"),
        }
    }
    let mut got = BTreeSet::new();
    while got.len() < usize::from(PIPELINED) {
        let m = sub.recv().await;
        got.insert(u16::from_be_bytes([m.payload[0], m.payload[1]]));
    }
    assert_eq!(got, (1..=PIPELINED).collect::<BTreeSet<_>>());
}

both_versions! {
    #[tokio::test]
    qos2_over_the_window_v311_is_accepted,
    qos2_over_the_receive_maximum_v5_is_refused_then_delivered
        => qos2_over_the_window_loses_nothing;
}

/// contract §7, no silent loss: a message an offline persistent session cannot queue is not
/// acknowledged as a success to an MQTT 5 publisher (0x97), and every such drop is counted
/// (metric per reason, `devices show` per device), for 3.1.1 publishers too.
#[tokio::test]
async fn a_full_offline_queue_is_never_acknowledged_as_success() {
    use crate::common::coretests::{Opts, Peer};
    use crate::common::ops::{config_with_limits, pinned_backend, Proc};
    use crate::common::run::{arg, certmq};
    use crate::common::Fixture;

    let fx = Fixture::new();
    let (section, backend) = pinned_backend(&fx);
    let body = format!("{}\n{section}", Fixture::fleet_anchor(true));
    let path = config_with_limits(&fx, "max_queued_messages = 3", &body);
    let broker = Proc::start(&fx, &path).await;
    let dev = fx.client(&fx.device("d1.devices.example.com"));
    let persistent = Opts {
        clean: false,
        will: None,
    };
    let mut d = Peer::connect(&dev, broker.mqtt, V::V5, "d1", &persistent).await;
    assert_eq!(d.subscribe("devices/d1/#", 1).await, 1);
    d.disconnect().await;

    let mut b5 = Peer::connect(&backend, broker.mqtt, V::V5, "b5", &Opts::default()).await;
    let mut codes = Vec::new();
    for i in 0..5u8 {
        codes.push(b5.publish("devices/d1/cmd", 1, false, &[i]).await);
    }
    assert_eq!(codes, [0, 0, 0, 0x97, 0x97], "MQTT 5 PUBACK reason codes");
    let mut b4 = Peer::connect(&backend, broker.mqtt, V::V4, "b4", &Opts::default()).await;
    assert_eq!(b4.publish("devices/d1/cmd", 1, false, &[9]).await, 0);
    broker
        .wait_metric("certmq_messages_dropped_total{reason=\"queue_full\"}", 3.0)
        .await;
    let shown = tokio::time::timeout(crate::common::WAIT, async {
        loop {
            let run = certmq(
                fx.dir.path(),
                &["devices", "show", "d1", "--json", "--config", arg(&path)],
            );
            if run.stdout.contains("\"dropped_messages\":3") {
                return run.stdout;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("devices show counts the drops within the flush interval");
    assert!(shown.contains("\"name\":\"d1\""), "{shown}");

    let mut d = Peer::connect(&dev, broker.mqtt, V::V5, "d1", &persistent).await;
    let got: Vec<u8> = [d.recv().await, d.recv().await, d.recv().await]
        .iter()
        .map(|m| m.payload[0])
        .collect();
    assert_eq!(got, [0, 1, 2], "what was acknowledged is what is delivered");
}
