//! Server topic aliases (docs/contract.md §6): topic aliases the broker assigns towards
//! MQTT 5 clients (MQTT 5 §3.3.2.3.4), byte for byte with the raw client, and with the field's clients:
//! paho-mqtt for Python and `mosquitto_sub -V mqttv5`.

use super::open_broker;
use super::wire::{four, p, prop, publish, subscribe, Connect};
use crate::common::coretests::raw::Raw;
use crate::common::coretests::V;
use crate::common::interop::{
    mosquitto, mosquitto_available, paho_available, run, Creds, Spawned, Version,
};
use crate::common::v5tests::{config_with_limits, device_client, BACKEND_FLEET};
use crate::common::{Broker, Fixture};

fn alias(n: u16) -> Vec<u8> {
    p(prop::TOPIC_ALIAS, &n.to_be_bytes())
}

/// A connection subscribed to `t/#` at QoS 0 that states this Topic Alias Maximum
/// (MQTT 5; None: the property is absent).
async fn alias_subscriber(fx: &Fixture, broker: &Broker, v: V, max: Option<u16>) -> Raw {
    let list = max
        .map(|m| p(prop::TOPIC_ALIAS_MAXIMUM, &m.to_be_bytes()))
        .into_iter()
        .collect();
    let connect = Connect::new(v, b"sub").props(list);
    let (mut raw, _) =
        Raw::connect_ok(&device_client(fx, "dev-1"), broker.addr, &connect.bytes()).await;
    raw.send(&subscribe(v, 1, &[], b"t/#", 0)).await;
    let suback = match v {
        V::V4 => vec![0x90, 0x03, 0x00, 0x01, 0x00],
        V::V5 => vec![0x90, 0x04, 0x00, 0x01, 0x00, 0x00],
    };
    assert_eq!(raw.recv().await, suback);
    raw
}

/// MQTT 5 §3.3.2.3.4: towards a client that states a Topic Alias Maximum, certmq names
/// the topics it delivers most often by alias, within that maximum: a topic seen while an
/// alias is free gets one (sent with the topic, then alone); once all are taken, a topic
/// that has been delivered more often than the least used aliased one takes its alias
/// over (sent with the topic again).
#[tokio::test]
async fn mqtt_3_3_2_3_4_server_assigns_aliases_to_the_most_frequent_topics_v5() {
    let fx = Fixture::new();
    let broker = open_broker(&fx).await;
    let mut raw = alias_subscriber(&fx, &broker, V::V5, Some(2)).await;
    // (topic published, payload, topic sent ("": none), alias sent)
    let steps = [
        ("t/a", "1", "t/a", Some(1)),
        ("t/a", "2", "", Some(1)),
        ("t/b", "3", "t/b", Some(2)),
        // Both aliases taken; t/c (once) is not more frequent than t/b (once).
        ("t/c", "4", "t/c", None),
        ("t/b", "5", "", Some(2)),
        // t/c twice, t/a and t/b twice each: still not more.
        ("t/c", "6", "t/c", None),
        // t/c three times: takes over the lowest of the least used aliases.
        ("t/c", "7", "t/c", Some(1)),
        ("t/c", "8", "", Some(1)),
        // t/a (three times now) takes t/b's alias (twice).
        ("t/a", "9", "t/a", Some(2)),
    ];
    for (topic, payload, sent, alias_sent) in steps {
        let payload = payload.as_bytes();
        raw.send(&publish(V::V5, 0, topic.as_bytes(), 0, &[], payload))
            .await;
        let props: Vec<Vec<u8>> = alias_sent.map(alias).into_iter().collect();
        let expected = publish(V::V5, 0, sent.as_bytes(), 0, &props, payload);
        assert_eq!(
            raw.recv().await,
            expected,
            "delivery of {topic} {payload:?}"
        );
    }
}

/// A client that states Topic Alias Maximum 0, or none (0 is the default), and every MQTT
/// 3.1.1 client, gets every topic in full.
async fn no_aliases(v: V, max: Option<u16>) {
    let fx = Fixture::new();
    let broker = open_broker(&fx).await;
    let mut raw = alias_subscriber(&fx, &broker, v, max).await;
    for payload in [b"1", b"2", b"3"] {
        raw.send(&publish(v, 0, b"t/a", 0, &[], payload)).await;
        assert_eq!(raw.recv().await, publish(v, 0, b"t/a", 0, &[], payload));
    }
}

#[tokio::test]
async fn mqtt_3_3_2_3_4_no_aliases_for_a_client_that_states_0_v5() {
    no_aliases(V::V5, Some(0)).await;
    no_aliases(V::V5, None).await;
}

#[tokio::test]
async fn mqtt_3_3_2_3_4_no_aliases_in_mqtt_3_1_1_v311() {
    no_aliases(V::V4, None).await;
}

/// MQTT 5 §3.3.2.3.4: alias mappings end with the network connection. QoS 1 messages
/// delivered by alias and resent after a reconnect carry their topic again.
#[tokio::test]
async fn mqtt_3_3_2_3_4_aliases_do_not_outlive_the_connection_v5() {
    let fx = Fixture::new();
    let broker = open_broker(&fx).await;
    let client = device_client(&fx, "dev-1");
    let connect = Connect::new(V::V5, b"keep").props(vec![
        p(prop::SESSION_EXPIRY, &four(600)),
        p(prop::TOPIC_ALIAS_MAXIMUM, &[0, 5]),
    ]);
    let (mut raw, _) = Raw::connect_ok(&client, broker.addr, &connect.bytes()).await;
    raw.send(&subscribe(V::V5, 1, &[], b"t/#", 1)).await;
    assert_eq!(raw.recv().await, [0x90, 0x04, 0x00, 0x01, 0x00, 0x01]);
    let publisher = Connect::new(V::V5, b"pub");
    let (mut publisher, _) = Raw::connect_ok(
        &device_client(&fx, "dev-2"),
        broker.addr,
        &publisher.bytes(),
    )
    .await;
    for (pkid, payload) in [(1, b"1"), (2, b"2")] {
        publisher
            .send(&publish(V::V5, 0x02, b"t/q", pkid, &[], payload))
            .await;
        assert_eq!(publisher.recv().await, [0x40, 0x02, 0x00, pkid as u8]);
        let sent: &[u8] = if pkid == 1 { b"t/q" } else { b"" };
        let expected = publish(V::V5, 0x02, sent, pkid, &[alias(1)], payload);
        assert_eq!(raw.recv().await, expected);
    }
    // Gone without acknowledging either, then back: both resent with DUP, the first with
    // its topic (a new mapping), the second by the alias that first one set.
    drop(raw);
    let (mut raw, present) = Raw::connect_ok(&client, broker.addr, &connect.resume().bytes()).await;
    assert!(present, "session resumed");
    assert_eq!(
        raw.recv().await,
        publish(V::V5, 0x0A, b"t/q", 1, &[alias(1)], b"1")
    );
    assert_eq!(
        raw.recv().await,
        publish(V::V5, 0x0A, b"", 2, &[alias(1)], b"2")
    );
}

/// Publishes QoS 1 messages on `topics` (one per payload "0", "1", ...) from a second
/// device, each acknowledged before the next.
async fn publish_sequence(fx: &Fixture, broker: &Broker, topics: &[&str]) {
    let client = device_client(fx, "dev-2");
    let (mut publisher, _) =
        Raw::connect_ok(&client, broker.addr, &Connect::new(V::V5, b"p").bytes()).await;
    for (i, topic) in topics.iter().enumerate() {
        let pkid = u16::try_from(i + 1).expect("few");
        let payload = i.to_string();
        let bytes = publish(V::V5, 0x02, topic.as_bytes(), pkid, &[], payload.as_bytes());
        publisher.send(&bytes).await;
        let ack = [[0x40, 0x02].as_slice(), &pkid.to_be_bytes()].concat();
        assert_eq!(publisher.recv().await, ack);
    }
}

/// Runs `mosquitto_sub -V mqttv5 ARGS -t t/# -F "%t %p"` until it has printed the
/// deliveries of `topics` (after a retained readiness marker), and checks it printed each
/// under its full topic.
async fn mosquitto_sub_receives(fx: &Fixture, broker: &Broker, args: &[&str], topics: &[&str]) {
    let leaf = fx.device("dev-1.devices.example.com");
    let creds = Creds::write(fx, "dev-1", &leaf.chain_pem(&[&fx.fleet]), &leaf.key_pem);
    let port = broker.addr.port();
    let mut retain = mosquitto("mosquitto_pub", port, Version::V5, &creds);
    retain.args(["-r", "-q", "1", "-t", "t/ready", "-m", "ready"]);
    run("mosquitto_pub", retain).await.assert_success();
    let count = (topics.len() + 1).to_string();
    let mut sub = mosquitto("mosquitto_sub", port, Version::V5, &creds);
    sub.args(args)
        .args(["-q", "1", "-t", "t/#", "-C", &count, "-F", "%t %p"]);
    let mut sub = Spawned::spawn("mosquitto_sub", sub);
    assert_eq!(sub.next_line().await, "t/ready ready");
    publish_sequence(fx, broker, topics).await;
    let done = sub.finish().await;
    done.assert_success();
    let expected: Vec<String> = std::iter::once("t/ready ready".to_owned())
        .chain(topics.iter().enumerate().map(|(i, t)| format!("{t} {i}")))
        .collect();
    assert_eq!(done.stdout.lines().collect::<Vec<_>>(), expected, "{done}");
}

/// The version of libmosquitto behind `mosquitto_sub`, as (major, minor).
async fn libmosquitto_version() -> Option<(u32, u32)> {
    let mut help = tokio::process::Command::new("mosquitto_sub");
    help.arg("--help");
    let out = run("mosquitto_sub --help", help).await.output();
    let text = out.split("libmosquitto ").nth(1)?;
    let mut parts = text.split(['.', ' ']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Mosquitto's `mosquitto_sub -V mqttv5` states no Topic Alias Maximum unless told to, and
/// then gets every topic in full. With `-D connect topic-alias-maximum`, libmosquitto 2.0
/// (Debian 12's 2.0.11) takes an alias alone for a protocol error: against such clients
/// `max_server_topic_aliases = 0` keeps them working; libmosquitto 2.1 and later resolve
/// the aliases.
#[tokio::test]
async fn mqtt_3_3_2_3_4_mosquitto_sub_gets_every_topic_in_full_v5() {
    if !mosquitto_available() {
        return;
    }
    let topics = ["t/a", "t/a", "t/b", "t/a"];
    let fx = Fixture::new();
    let broker = open_broker(&fx).await;
    mosquitto_sub_receives(&fx, &broker, &[], &topics).await;
    let ask = ["-D", "connect", "topic-alias-maximum", "4"];
    match libmosquitto_version().await {
        Some(version) if version >= (2, 1) => {
            mosquitto_sub_receives(&fx, &broker, &ask, &topics).await;
        }
        version => eprintln!(
            "libmosquitto {version:?} cannot resolve server topic aliases: checking it with max_server_topic_aliases = 0"
        ),
    }
    let fx = Fixture::new();
    let config = config_with_limits(&fx, "max_server_topic_aliases = 0", BACKEND_FLEET);
    let broker = Broker::start(&config).await;
    mosquitto_sub_receives(&fx, &broker, &ask, &topics).await;
}

/// paho-mqtt 2.x for Python decodes the aliases certmq assigns (it leaves resolving them to
/// the application: the script does it as MQTT 5 defines it), and a paho client stating no
/// Topic Alias Maximum never gets one.
#[tokio::test]
async fn mqtt_3_3_2_3_4_paho_decodes_server_aliases_v5() {
    if !paho_available().await {
        return;
    }
    let fx = Fixture::new();
    let broker = open_broker(&fx).await;
    let leaf = fx.device("dev-1.devices.example.com");
    let creds = Creds::write(&fx, "dev-1", &leaf.chain_pem(&[&fx.fleet]), &leaf.key_pem);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/paho_topic_alias.py");
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(&script)
        .arg("localhost")
        .arg(broker.addr.port().to_string())
        .arg(&creds.cafile)
        .arg(&creds.cert)
        .arg(&creds.key)
        .arg("dev-1");
    // The script bounds itself at 20 s; this bound only catches a hung interpreter.
    let out = Spawned::spawn_with_timeout(
        "paho_topic_alias.py",
        cmd,
        std::time::Duration::from_secs(25),
    )
    .finish()
    .await;
    out.assert_success();
    assert!(out.stdout.contains("paho_topic_alias: ok"), "{out}");
}

/// `max_server_topic_aliases` is bounded: each delivery scans the aliases in use.
#[test]
fn max_server_topic_aliases_is_at_most_256() {
    let fx = Fixture::new();
    for (value, ok) in [(0, true), (256, true), (257, false)] {
        let limits = format!("max_server_topic_aliases = {value}");
        let loaded = certmq::config::Config::load(&config_with_limits(&fx, &limits, BACKEND_FLEET));
        match (loaded, ok) {
            (Ok(c), true) => assert_eq!(c.limits.max_server_topic_aliases, value),
            (Err(e), false) => {
                let text = e.problems[0].to_string();
                assert!(
                    text.ends_with("limits.max_server_topic_aliases: must be at most 256"),
                    "{text}"
                );
            }
            (other, _) => panic!("{value}: {other:?}"),
        }
    }
}
