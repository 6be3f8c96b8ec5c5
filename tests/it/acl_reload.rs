//! A reload that narrows a live session's profile leaves nothing flowing that the new
//! profile forbids (contract §4 "Outcomes", §5 "Delivery", §8): not a subscription added by
//! a SUBSCRIBE in progress during the reload, nor a delivery held for a full subscriber.

use std::time::Duration;

use crate::common::coretests::raw::{
    parse, raw_publish, raw_subscribe, raw_subscribe_many, Pkt, Raw, RawConnect,
};
use crate::common::coretests::{Opts, Peer, MARKER, V};
use crate::common::ops::{config, config_with_limits, pinned_backend, Proc};
use crate::common::{read_packet, Fixture, WAIT};

/// The fleet anchor bound to the profile `wide`, whose subscribe patterns are `subscribe`.
fn fleet_wide(subscribe: &str) -> String {
    format!(
        "{}acl = \"wide\"\n\n[acl.wide]\npublish = [\"devices/{{device}}/#\"]\nsubscribe = [{subscribe}]\n",
        Fixture::fleet_anchor(true)
    )
}

const WIDE: &str = "\"fleet/#\", \"devices/{device}/#\"";
const NARROW: &str = "\"devices/{device}/#\"";

/// A SUBSCRIBE is checked against the ACL snapshot taken when its processing starts; a
/// reload's `apply_acl` that runs meanwhile lists the router before the rest of the
/// packet's filters are added. Those must be refused by the ACL in force when each is
/// added, or deliveries through them (never checked again without `deny_subscribe`) keep
/// reaching the device on `fleet/...` after the reload removed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_racing_a_narrowing_reload_keeps_a_forbidden_subscription() {
    const N: usize = 4000;
    let fx = Fixture::new();
    let (backend_section, backend) = pinned_backend(&fx);
    let path = config(&fx, &format!("{}\n{backend_section}", fleet_wide(WIDE)));
    let mut broker = Proc::start(&fx, &path).await;
    let dev = fx.client(&fx.device("d1.devices.example.com"));
    let (mut d, _) =
        Raw::connect_ok(&dev, broker.mqtt, &RawConnect::new(V::V4, "d1-c").bytes()).await;
    let names: Vec<String> = (0..N).map(|i| format!("fleet/{i}")).collect();
    let filters: Vec<(&str, u8)> = names.iter().map(|n| (n.as_str(), 0u8)).collect();
    let packet = raw_subscribe_many(V::V4, 7, &filters);

    // The device re-subscribes back to back until a SUBACK refuses (the new profile).
    let looping = tokio::spawn(async move {
        let mut rounds = 0u32;
        loop {
            d.send(&packet).await;
            match d.try_recv().await.expect("SUBACK") {
                Pkt::SubAck { codes, .. } => {
                    rounds += 1;
                    if codes.contains(&0x80) {
                        return (d, rounds);
                    }
                }
                other => panic!("{other:?}"),
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    config(&fx, &format!("{}\n{backend_section}", fleet_wide(NARROW)));
    broker.reload().await.expect("reload accepted");
    let (mut d, rounds) = tokio::time::timeout(WAIT, looping)
        .await
        .expect("a refused SUBACK after the reload")
        .expect("loop");
    assert!(rounds > 1, "the loop ran");
    let log = broker.stderr();
    assert!(
        log.contains("subscription removed"),
        "the reload pruned: {log}"
    );
    assert_eq!(
        d.subscribe_many(9, &[("devices/d1/#", 0)]).await,
        [0],
        "allowed"
    );

    // Now the backend publishes on every fleet/i, then a marker the device may receive.
    let mut b = Peer::connect(&backend, broker.mqtt, V::V5, "b", &Opts::default()).await;
    let reader = tokio::spawn(async move {
        let mut forbidden = Vec::new();
        loop {
            if let Pkt::Publish { topic, payload, .. } = d.try_recv().await.expect("packet") {
                if payload == MARKER {
                    return forbidden;
                }
                forbidden.push(topic);
            }
        }
    });
    for n in &names {
        b.publish_nowait(n, 0, false, b"after-narrowing").await;
    }
    assert_eq!(b.publish("devices/d1/x", 1, false, MARKER).await, 0);
    let forbidden = tokio::time::timeout(WAIT, reader)
        .await
        .expect("marker")
        .expect("reader");
    assert!(
        forbidden.is_empty(),
        "after the reload narrowed the profile to devices/d1/#, the live session still received {} message(s) on fleet/..., e.g. {:?}",
        forbidden.len(),
        forbidden.first()
    );
}

/// A publisher paced by a full subscriber (contract §9) holds the subscriber's delivery;
/// a reload narrows the subscriber's profile (its queue is purged, its subscription
/// removed), and the held delivery, offered again, must be checked against the new ACL
/// rather than queued: the subscriber may no longer receive its topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_delivery_reaches_a_subscriber_after_its_profile_narrowed() {
    let fx = Fixture::new();
    let (backend_section, backend) = pinned_backend(&fx);
    let limits = "handshake_timeout = 5\nconnect_timeout = 5\nmax_queued_messages = 2\nmax_inflight = 1\nstall_timeout = 4";
    let path = config_with_limits(
        &fx,
        limits,
        &format!("{}\n{backend_section}", fleet_wide(WIDE)),
    );
    let mut broker = Proc::start(&fx, &path).await;
    let dev = fx.client(&fx.device("d1.devices.example.com"));
    let (mut s, _) =
        Raw::connect_ok(&dev, broker.mqtt, &RawConnect::new(V::V4, "d1-c").bytes()).await;
    s.send(&raw_subscribe(V::V4, 1, "fleet/#", 1)).await;
    let ack = s.recv().await;
    assert_eq!(ack[0], 0x90, "{ack:02x?}");
    assert_eq!(ack[4], 1, "granted under the wide profile");

    // The backend publishes 4 QoS 1 messages: 1 in flight to s (never acknowledged), 2
    // queued, the 4th paced (its PUBACK waits).
    let (mut p, _) =
        Raw::connect_ok(&backend, broker.mqtt, &RawConnect::new(V::V4, "p").bytes()).await;
    for i in 1..=4u16 {
        p.send(&raw_publish(
            V::V4,
            &format!("fleet/m{i}"),
            format!("m{i}").as_bytes(),
            1,
            i,
            false,
        ))
        .await;
    }
    for i in 1..=3u16 {
        let a = p.recv().await;
        assert_eq!(a, [0x40, 2, 0, i as u8], "PUBACK {i}");
    }
    // The 4th is paced.
    let held = tokio::time::timeout(Duration::from_millis(300), p.recv_or_closed()).await;
    assert!(held.is_err(), "the 4th PUBACK waits: {held:?}");

    // The operator narrows the profile: fleet/# is no longer allowed to d1.
    config_with_limits(
        &fx,
        limits,
        &format!("{}\n{backend_section}", fleet_wide(NARROW)),
    );
    broker.reload().await.expect("reload accepted");
    let log = broker.stderr();
    assert!(log.contains("subscription removed"), "{log}");

    // Whatever s reads from now on: m1 was written before the reload; anything else on
    // fleet/ arrived after the re-check.
    let mut after = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while let Ok(Ok(bytes)) = tokio::time::timeout_at(deadline, read_packet(s.tls_mut())).await {
        if let Ok(Pkt::Publish { topic, .. }) = parse(&bytes, V::V4) {
            if topic != "fleet/m1" {
                after.push(topic);
            }
        }
    }
    assert!(
        after.is_empty(),
        "delivered after the reload removed fleet/# from d1's profile: {after:?}"
    );
}
