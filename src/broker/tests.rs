//! The publisher's route cache (`RouteCache`): it must route exactly as the router does
//! now, whatever changed since the last message.

use super::*;
use crate::acl::Profile;
use bytes::Bytes;

fn attached(device: &str) -> SessionRef {
    let key = SessionKey {
        device: DeviceName::parse(device).unwrap(),
        client_id: "c".into(),
    };
    // Sessions of one device subscribe to other devices' topics here: what is tested is
    // the route cache, and `Broker::subscribe` holds every filter to the session's ACL.
    let all = ["#".to_owned()];
    let profile = Profile::new(&all, &all, &[], &[]).expect("a valid profile");
    let acl = Arc::new(profile.for_device(device));
    let session = Session::create(key, acl, Expiry::OnDisconnect, 100, None);
    session.attach(session.id(), CancellationToken::new());
    session
}

fn message(topic: &str) -> Arc<Message> {
    Arc::new(Message {
        topic: TopicName::parse(topic).unwrap(),
        payload: Bytes::from_static(b"m"),
        qos: QoS::AtMostOnce,
        retain: false,
        props: Default::default(),
        expires_at: None,
        store_id: Default::default(),
    })
}

#[test]
fn the_route_cache_follows_every_change_of_the_router() {
    let broker = Broker::new(Arc::new(Metrics::default()), None);
    let publisher = attached("pub");
    let (a, b) = (attached("a"), attached("b"));
    let mut cache = RouteCache::default();
    let topic = "devices/a/t";
    let opts = SubOptions::with_qos(QoS::AtMostOnce);
    let mut publish = || {
        broker
            .publish_cached(message(topic), &publisher, &mut cache)
            .queued
    };

    assert_eq!(publish(), 0, "nobody subscribed yet");
    let plain = Subscription::parse("devices/a/#").unwrap();
    broker.subscribe(&a, &plain, opts.clone(), false);
    assert_eq!(
        publish(),
        1,
        "a subscription after the cached route is seen"
    );
    assert_eq!(publish(), 1, "and kept");
    let shared = Subscription::parse("$share/g/devices/+/t").unwrap();
    broker.subscribe(&a, &shared, opts.clone(), false);
    broker.subscribe(&b, &shared, opts.clone(), false);
    assert_eq!(publish(), 2, "a and one member of the group");
    assert_eq!(publish(), 2);
    let before = (a.queued_len(), b.queued_len());
    for _ in 0..4 {
        publish();
    }
    let grew = (a.queued_len() - before.0, b.queued_len() - before.1);
    assert_eq!(
        grew,
        (6, 2),
        "the group's member is chosen per message, in rotation"
    );
    broker.unsubscribe(&a, &shared);
    broker.unsubscribe(&b, &shared);
    broker.unsubscribe(&a, &plain);
    assert_eq!(
        publish(),
        0,
        "an unsubscribe after the cached route is seen"
    );
    broker.subscribe(&b, &plain, opts, false);
    assert_eq!(publish(), 1);
    assert_eq!(
        broker
            .publish_cached(message("devices/b/t"), &publisher, &mut cache)
            .queued,
        0,
        "another topic is routed anew"
    );
}
