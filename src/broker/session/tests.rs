use super::*;
use crate::acl::Profile;
use crate::mqtt::codec::QoS;
use bytes::Bytes;

fn session(max_queued: usize) -> SessionRef {
    let key = SessionKey {
        device: DeviceName::parse("dev-1").unwrap(),
        client_id: "c".into(),
    };
    let acl = Arc::new(Profile::builtin_device().for_device("dev-1"));
    Session::create(key, acl, Expiry::Never, max_queued, None)
}

fn delivery(qos: QoS, n: u8) -> Delivery {
    Delivery {
        msg: Arc::new(Message {
            topic: TopicName::parse("devices/dev-1/x").unwrap(),
            payload: Bytes::from(vec![n]),
            qos,
            retain: false,
            props: Default::default(),
            expires_at: None,
            store_id: Default::default(),
        }),
        qos,
        retain: false,
        sub_ids: Vec::new(),
        store_id: None,
    }
}

fn payloads(out: &[Outgoing]) -> Vec<u8> {
    out.iter()
        .filter_map(|o| match o {
            Outgoing::Publish { delivery, .. } => Some(delivery.msg.payload[0]),
            Outgoing::PubRel { .. } => None,
        })
        .collect()
}

#[test]
fn qos0_is_not_kept_for_an_offline_session() {
    let s = session(10);
    assert_eq!(
        s.enqueue(delivery(QoS::AtMostOnce, 1)),
        Enqueued::DroppedOffline
    );
    assert_eq!(s.enqueue(delivery(QoS::AtLeastOnce, 2)), Enqueued::Queued);
    assert_eq!(s.queued_len(), 1);
}

#[test]
fn a_full_queue_drops_qos0_first_then_refuses() {
    let s = session(3);
    s.attach(1, CancellationToken::new());
    assert_eq!(s.enqueue(delivery(QoS::AtMostOnce, 1)), Enqueued::Queued);
    assert_eq!(s.enqueue(delivery(QoS::AtLeastOnce, 2)), Enqueued::Queued);
    assert_eq!(s.enqueue(delivery(QoS::AtLeastOnce, 3)), Enqueued::Queued);
    assert_eq!(
        s.enqueue(delivery(QoS::AtLeastOnce, 4)),
        Enqueued::QueuedDroppedOldQos0
    );
    assert_eq!(
        s.enqueue(delivery(QoS::AtLeastOnce, 5)),
        Enqueued::DroppedFull
    );
    assert_eq!(payloads(&s.next_batch(1, 10, 10)), vec![2, 3, 4]);
}

#[test]
fn window_limits_qos1_and_keeps_order() {
    let s = session(100);
    s.attach(7, CancellationToken::new());
    for n in 1..=5 {
        s.enqueue(delivery(QoS::AtLeastOnce, n));
    }
    s.enqueue(delivery(QoS::AtMostOnce, 6));
    let first = s.next_batch(7, 2, 100);
    assert_eq!(payloads(&first), vec![1, 2]);
    assert!(
        s.next_batch(7, 2, 100).is_empty(),
        "window full, QoS 0 waits behind"
    );
    let Outgoing::Publish { pkid, .. } = first[0] else {
        panic!()
    };
    assert!(s.puback(pkid));
    assert!(!s.puback(pkid), "a second PUBACK is unknown");
    assert_eq!(payloads(&s.next_batch(7, 2, 100)), vec![3]);
    // Another connection id gets nothing.
    assert!(s.next_batch(8, 10, 100).is_empty());
}

#[test]
fn inflight_is_resent_with_dup_after_reattach() {
    let s = session(100);
    s.attach(1, CancellationToken::new());
    s.enqueue(delivery(QoS::ExactlyOnce, 1));
    s.enqueue(delivery(QoS::AtLeastOnce, 2));
    let sent = s.next_batch(1, 10, 10);
    let Outgoing::Publish { pkid: p1, .. } = sent[0] else {
        panic!()
    };
    assert!(s.pubrec(p1, true), "PUBREL due");
    assert!(s.detach(1).is_some());
    let (old, _) = s.attach(2, CancellationToken::new());
    assert!(old.is_none());
    let again = s.resend_inflight(2);
    assert_eq!(again.len(), 2);
    assert!(matches!(again[0], Outgoing::PubRel { pkid } if pkid == p1));
    assert!(matches!(again[1], Outgoing::Publish { dup: true, .. }));
    assert!(s.pubcomp(p1));
    assert!(!s.pubcomp(p1));
}

#[test]
fn takeover_returns_the_old_token_and_old_connection_cannot_detach() {
    let s = session(10);
    let old = CancellationToken::new();
    s.attach(1, old.clone());
    let returned = s
        .attach(2, CancellationToken::new())
        .0
        .expect("previous token");
    returned.cancel();
    assert!(old.is_cancelled());
    assert!(
        s.detach(1).is_none(),
        "the old connection no longer holds the session"
    );
    assert!(s.is_attached(2));
}

#[test]
fn inbound_qos2_ids_are_exactly_once() {
    let s = session(10);
    assert_eq!(s.inbound_qos2_begin(9, None), InboundQos2::New);
    assert_eq!(s.inbound_qos2_begin(9, None), InboundQos2::Duplicate);
    assert!(s.inbound_qos2_release(9));
    assert!(!s.inbound_qos2_release(9));
    assert_eq!(
        s.inbound_qos2_begin(9, None),
        InboundQos2::New,
        "a new exchange may reuse the id"
    );
}

#[test]
fn an_inbound_qos2_id_over_the_limit_is_not_recorded() {
    let s = session(10);
    assert_eq!(s.inbound_qos2_begin(1, Some(1)), InboundQos2::New);
    assert_eq!(s.inbound_qos2_begin(2, Some(1)), InboundQos2::OverLimit);
    // Its resend after the disconnect is a new message, not a duplicate.
    assert_eq!(s.inbound_qos2_begin(1, Some(1)), InboundQos2::Duplicate);
    assert!(s.inbound_qos2_release(1));
    assert_eq!(s.inbound_qos2_begin(2, Some(1)), InboundQos2::New);
}

#[test]
fn packet_ids_skip_ids_in_flight_and_wrap() {
    let s = session(100_000);
    s.attach(1, CancellationToken::new());
    s.enqueue(delivery(QoS::AtLeastOnce, 0));
    let first = s.next_batch(1, 10, 1);
    let Outgoing::Publish { pkid: held, .. } = first[0] else {
        panic!()
    };
    // Cycle through the whole id space while `held` stays in flight.
    for _ in 0..70_000u32 {
        s.enqueue(delivery(QoS::AtLeastOnce, 1));
        let b = s.next_batch(1, 10, 1);
        let Outgoing::Publish { pkid, .. } = b[0] else {
            panic!()
        };
        assert_ne!(pkid, 0);
        assert_ne!(pkid, held);
        assert!(s.puback(pkid));
    }
}

#[test]
fn purge_discards_queued_and_unacknowledged_deliveries_it_may_no_longer_receive() {
    let s = session(10);
    let on = |topic: &str, n: u8| {
        let mut d = delivery(QoS::AtLeastOnce, n);
        Arc::make_mut(&mut d.msg).topic = TopicName::parse(topic).unwrap();
        d
    };
    s.attach(1, CancellationToken::new());
    s.enqueue(on("fleet/a", 1));
    s.enqueue(on("devices/dev-1/x", 2));
    // Both sent: in flight, waiting for PUBACK.
    assert_eq!(payloads(&s.next_batch(1, 10, 10)), [1, 2]);
    s.enqueue(on("fleet/b", 3));
    s.enqueue(on("devices/dev-1/y", 4));
    let allowed = |t: &TopicName| t.as_str().starts_with("devices/dev-1/");
    assert_eq!(s.purge(allowed), 2);
    assert_eq!(s.queued_len(), 1);
    assert_eq!(s.inflight_len(), 1);
    // What remains goes out in order; what was purged is not re-sent on resume.
    let again: Vec<u8> = payloads(&s.resend_inflight(1));
    assert_eq!(again, [2]);
    assert_eq!(payloads(&s.next_batch(1, 10, 10)), [4]);
    assert_eq!(s.purge(allowed), 0);
}

/// contract §9: a connected session with a full queue paces its publishers (the delivery is
/// handed back) while it makes progress, and drops its deliveries once it made none for
/// `stall_timeout`; taking from the queue is progress. Paused time drives the clock.
#[tokio::test(start_paused = true)]
async fn a_full_connected_session_paces_until_it_stalls() {
    let stall = std::time::Duration::from_secs(10);
    let s = session(2);
    s.attach(1, CancellationToken::new());
    for n in 0..2 {
        assert!(matches!(
            s.deliver(delivery(QoS::AtLeastOnce, n), Some(stall)),
            Ok((Enqueued::Queued, _))
        ));
    }
    assert!(!s.has_room());
    // Full, and progress was made at attach: the publisher waits.
    let back = s.deliver(delivery(QoS::AtLeastOnce, 2), Some(stall));
    assert!(back.is_err(), "handed back to wait for room");
    tokio::time::advance(std::time::Duration::from_secs(9)).await;
    assert!(s
        .deliver(delivery(QoS::AtLeastOnce, 2), Some(stall))
        .is_err());
    assert_eq!(
        s.stall_deadline(stall),
        tokio::time::Instant::now() + std::time::Duration::from_secs(1)
    );
    // The connection takes one (progress): room again, and the stall clock restarts.
    assert_eq!(payloads(&s.next_batch(1, 1, 1)), [0]);
    assert!(s.has_room());
    assert!(matches!(
        s.deliver(delivery(QoS::AtLeastOnce, 2), Some(stall)),
        Ok((Enqueued::Queued, _))
    ));
    tokio::time::advance(std::time::Duration::from_secs(10)).await;
    // Full again and no progress for stall_timeout: stalled, dropped, nobody waits.
    assert!(matches!(
        s.deliver(delivery(QoS::AtLeastOnce, 3), Some(stall)),
        Ok((Enqueued::DroppedStalled, _))
    ));
    // Without pacing (an offline session's rule), a full queue of QoS 1 refuses at once.
    assert_eq!(
        s.enqueue(delivery(QoS::AtLeastOnce, 4)),
        Enqueued::DroppedFull
    );
}

/// A publisher waiting for room is woken when the session goes offline (offline sessions
/// pace nobody) and when the queue drains to half.
#[tokio::test(start_paused = true)]
async fn paced_publishers_are_woken_by_room_and_by_detach() {
    let s = session(8);
    s.attach(1, CancellationToken::new());
    for n in 0..7 {
        s.enqueue(delivery(QoS::AtLeastOnce, n));
    }
    let room = s.room();
    tokio::pin!(room);
    room.as_mut().enable();
    // Not full: taking one (6 of 8 left, above half) wakes nobody; nobody waits then.
    s.next_batch(1, 1, 1);
    assert!(futures_poll(room.as_mut()).is_pending());
    s.next_batch(1, 10, 2);
    assert!(futures_poll(room.as_mut()).is_ready(), "woken at half");
    let gone = s.room();
    tokio::pin!(gone);
    gone.as_mut().enable();
    assert!(s.detach(1).is_some());
    assert!(futures_poll(gone.as_mut()).is_ready(), "woken when offline");
}

/// Polls a future once.
fn futures_poll<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    f.poll(&mut cx)
}

/// contract §7: the retained backlog feeds the queue only while it is under half its bound,
/// keeps order across batches, gives back what it could not queue, and a re-subscription
/// with the same filter replaces (never adds to) what waits.
#[test]
fn the_retained_backlog_refills_the_queue_within_its_bound() {
    let s = session(4);
    let (_, _) = s.attach(1, CancellationToken::new());
    let f = TopicFilter::parse("devices/dev-1/#").unwrap();
    s.add_retained(&f, (1..=5).map(|n| delivery(QoS::AtLeastOnce, n)).collect());
    s.add_retained(&f, (1..=5).map(|n| delivery(QoS::AtLeastOnce, n)).collect());
    assert_eq!(s.retained_backlog_len(), 5, "replaced, not added");
    assert!(
        s.take_retained(2, 256).is_none(),
        "only the attached connection"
    );

    let mut got = Vec::new();
    while let Some((filter, batch)) = s.take_retained(1, 256) {
        assert_eq!(filter, f);
        assert!(batch.len() <= 2, "at most half of max_queued");
        let mut batch = batch.into_iter();
        let first = batch.next().unwrap();
        s.untake_retained(filter, batch.collect());
        assert_eq!(s.enqueue(first), Enqueued::Queued);
        let out = s.next_batch(1, 10, 10);
        got.extend(payloads(&out));
        for o in out {
            if let Outgoing::Publish { pkid, .. } = o {
                s.puback(pkid);
            }
        }
    }
    assert_eq!(got, [1, 2, 3, 4, 5]);
    assert_eq!(s.retained_backlog_len(), 0);
    s.add_retained(&f, vec![delivery(QoS::AtLeastOnce, 9)]);
    s.drop_retained(&f);
    assert_eq!(s.retained_backlog_len(), 0);
}

/// A publisher waits only while the queue is full: the first delivery a subscriber takes
/// from a full queue wakes one waiting publisher, even when the queue stays above half
/// (a subscriber whose window then fills takes no more; without this wake-up the
/// publisher waited until the stall deadline although there was room).
#[tokio::test(start_paused = true)]
async fn the_first_room_in_a_full_queue_wakes_a_paced_publisher() {
    let s = session(5);
    s.attach(1, CancellationToken::new());
    for n in 0..5 {
        s.enqueue(delivery(QoS::AtLeastOnce, n));
    }
    assert!(!s.has_room());
    let room = s.room();
    tokio::pin!(room);
    room.as_mut().enable();
    // The subscriber's window admits one more: 4 of 5 left, above half.
    assert_eq!(payloads(&s.next_batch(1, 1, 10)), [0]);
    assert!(
        futures_poll(room.as_mut()).is_ready(),
        "woken by the first room"
    );
}
