//! Helpers for the black-box tests of the MQTT broker core (`tests/mqtt_core*.rs`).
//!
//! - [`Setup`]: a broker with the fleet anchor (built-in `device` profile) and pinned
//!   devices with their own profiles (`backend` may do everything).
//! - [`Peer`]: a rumqttc 3.1.1 or 5 client whose event loop runs in its own task and
//!   forwards what arrives into channels, so a test awaits exactly the packet it expects
//!   (bounded by [`WAIT`]) instead of sleeping. Aborting that task drops the TCP
//!   connection without DISCONNECT: an abnormal close, as a crashed device would do.
//! - [`raw::Raw`]: MQTT over TLS byte by byte, for what no client library will do on demand
//!   (stop in the middle of a QoS 2 exchange, re-send a PUBLISH with DUP, go silent).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Broker, Client, Fixture, WAIT};

pub mod raw;

/// The profile of a client that may publish and subscribe everywhere.
pub const BACKEND_PROFILE: &str = "[acl.backend]\npublish = [\"#\"]\nsubscribe = [\"#\"]\n";

/// The payload the tests use as an ordering marker: it is published after whatever must
/// not arrive, so once it is received the unwanted message would already have been seen.
pub const MARKER: &[u8] = b"marker";

/// A running broker with its fixture PKI.
pub struct Setup {
    pub fx: Fixture,
    pub broker: Broker,
}

impl Setup {
    /// The fleet anchor plus a pinned device `backend` with the backend profile.
    pub async fn new() -> Setup {
        Setup::start(&[("backend", "backend")], BACKEND_PROFILE).await
    }

    /// The fleet anchor, pinned devices `(name, acl profile)` (certificates written as
    /// `NAME.pem`) and extra profile sections.
    pub async fn start(pinned: &[(&str, &str)], profiles: &str) -> Setup {
        let fx = Fixture::new();
        let mut cfg = Fixture::fleet_anchor(true);
        for (name, acl) in pinned {
            let cert = super::self_signed(name);
            fx.write(&format!("{name}.pem"), &cert.cert_pem);
            fx.write(&format!("{name}.key"), &cert.key_pem);
            cfg.push_str(&format!(
                "[[device]]\nname = \"{name}\"\ncertificate = \"{name}.pem\"\nacl = \"{acl}\"\n"
            ));
        }
        cfg.push_str(profiles);
        let broker = Broker::start(&fx.config(&cfg)).await;
        Setup { fx, broker }
    }

    pub fn addr(&self) -> SocketAddr {
        self.broker.addr
    }

    /// Credentials of the fleet device `name` (CN `NAME.devices.example.com`).
    pub fn device(&self, name: &str) -> Client {
        let leaf = self.fx.device(&format!("{name}.devices.example.com"));
        self.fx.client(&leaf)
    }

    /// Credentials of a pinned device set up by [`Setup::start`].
    pub fn pinned(&self, name: &str) -> Client {
        let read = |ext: &str| {
            std::fs::read_to_string(self.fx.path(&format!("{name}.{ext}"))).expect("pinned file")
        };
        Client::new(&self.fx, &read("pem"), &read("key"))
    }

    /// Connects a client with default options (clean session, no will).
    pub async fn peer(&self, creds: &Client, v: V, id: &str) -> Peer {
        Peer::connect(creds, self.addr(), v, id, &Opts::default()).await
    }
}

/// The MQTT protocol version a test runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V {
    V4,
    V5,
}

/// Two tests of one body, for MQTT 3.1.1 and for MQTT 5:
///
/// ```ignore
/// both_versions! {
///     #[tokio::test]
///     retained_on_subscribe_v311, retained_on_subscribe_v5 => retained_on_subscribe;
/// }
/// ```
///
/// makes `async fn retained_on_subscribe_v311()`, which awaits `retained_on_subscribe(V::V4)`,
/// and `retained_on_subscribe_v5()` with `V::V5`, both with the attributes given. The body
/// is a function of a [`V`] that returns a future, or a closure for more arguments
/// (`|v| slow_reader(v, 1)`). Both names are written out: a test is found by grepping for
/// its name, the name users and CI filter by.
macro_rules! both_versions {
    ($($(#[$attr:meta])+ $v311:ident, $v5:ident => $body:expr;)+) => {
        $(
            $(#[$attr])+
            async fn $v311() {
                ($body)($crate::common::coretests::V::V4).await;
            }

            $(#[$attr])+
            async fn $v5() {
                ($body)($crate::common::coretests::V::V5).await;
            }
        )+
    };
}
pub(crate) use both_versions;

/// A will message for [`Opts`].
#[derive(Debug, Clone)]
pub struct WillMsg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 Will Delay Interval in seconds (0: none; ignored by 3.1.1).
    pub delay: u32,
}

/// Connection options beyond the client id.
#[derive(Debug, Clone)]
pub struct Opts {
    /// 3.1.1 clean session; MQTT 5 clean start (a persistent v5 session gets a session
    /// expiry of 600 s).
    pub clean: bool,
    pub will: Option<WillMsg>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            clean: true,
            will: None,
        }
    }
}

/// A PUBLISH as a subscriber received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
}

/// Every other packet a [`Peer`] receives, and the end of its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ctl {
    SubAck(Vec<u8>),
    PubAck(u8),
    PubRec(u8),
    PubComp,
    /// The event loop failed: the connection is gone. The text is rumqttc's error.
    Ended(String),
}

enum Handle {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// A connected rumqttc client. See the module documentation.
pub struct Peer {
    client: Handle,
    msgs: mpsc::UnboundedReceiver<Msg>,
    ctl: mpsc::UnboundedReceiver<Ctl>,
    task: JoinHandle<()>,
    /// CONNACK Session Present.
    pub session_present: bool,
}

fn qos4(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn transport(creds: &Client) -> rumqttc::Transport {
    rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(creds.tls.clone()))
}

impl Peer {
    /// Connects and waits for a successful CONNACK (panics on a refusal).
    pub async fn connect(creds: &Client, addr: SocketAddr, v: V, id: &str, opts: &Opts) -> Peer {
        let (msg_tx, msgs) = mpsc::unbounded_channel();
        let (ctl_tx, ctl) = mpsc::unbounded_channel();
        let (client, session_present, task) = match v {
            V::V4 => {
                let (c, present, task) = connect_v4(creds, addr, id, opts, msg_tx, ctl_tx).await;
                (Handle::V4(c), present, task)
            }
            V::V5 => {
                let (c, present, task) = connect_v5(creds, addr, id, opts, msg_tx, ctl_tx).await;
                (Handle::V5(c), present, task)
            }
        };
        Peer {
            client,
            msgs,
            ctl,
            task,
            session_present,
        }
    }

    /// Subscribes to one filter and returns the SUBACK code (granted QoS, or 0x80 / 0x87).
    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> u8 {
        match &self.client {
            Handle::V4(c) => c.subscribe(filter, qos4(qos)).await.expect("subscribe"),
            Handle::V5(c) => c.subscribe(filter, qos5(qos)).await.expect("subscribe"),
        }
        let codes = self
            .wait_ctl(|c| match c {
                Ctl::SubAck(codes) => Some(codes.clone()),
                _ => None,
            })
            .await;
        assert_eq!(codes.len(), 1, "one filter, one SUBACK code: {codes:?}");
        codes[0]
    }

    /// Publishes and waits for the whole acknowledgement flow: nothing for QoS 0, PUBACK
    /// for QoS 1, PUBREC then PUBCOMP for QoS 2. Returns the PUBACK / PUBREC reason code
    /// (always 0 in MQTT 3.1.1).
    pub async fn publish(&mut self, topic: &str, qos: u8, retain: bool, payload: &[u8]) -> u8 {
        self.publish_nowait(topic, qos, retain, payload).await;
        match qos {
            0 => 0,
            1 => {
                self.wait_ctl(|c| match c {
                    Ctl::PubAck(r) => Some(*r),
                    _ => None,
                })
                .await
            }
            _ => {
                let reason = self
                    .wait_ctl(|c| match c {
                        Ctl::PubRec(r) => Some(*r),
                        _ => None,
                    })
                    .await;
                if reason < 0x80 {
                    self.wait_ctl(|c| (*c == Ctl::PubComp).then_some(())).await;
                }
                reason
            }
        }
    }

    /// Queues a PUBLISH without waiting for its acknowledgement.
    pub async fn publish_nowait(&self, topic: &str, qos: u8, retain: bool, payload: &[u8]) {
        match &self.client {
            Handle::V4(c) => c
                .publish(topic, qos4(qos), retain, payload.to_vec())
                .await
                .expect("publish"),
            Handle::V5(c) => c
                .publish(topic, qos5(qos), retain, payload.to_vec())
                .await
                .expect("publish"),
        }
    }

    /// The next PUBLISH received.
    pub async fn recv(&mut self) -> Msg {
        tokio::time::timeout(WAIT, self.msgs.recv())
            .await
            .expect("a PUBLISH in time")
            .expect("event loop still running")
    }

    /// The next PUBLISH, waiting without a bound (wrap it in a timeout); None once the
    /// event loop ended.
    pub async fn try_recv(&mut self) -> Option<Msg> {
        self.msgs.recv().await
    }

    /// Everything received before the next message whose payload is [`MARKER`].
    pub async fn recv_until_marker(&mut self) -> Vec<Msg> {
        let mut before = Vec::new();
        loop {
            let m = self.recv().await;
            if m.payload == MARKER {
                return before;
            }
            before.push(m);
        }
    }

    /// Waits until the broker closes the connection; returns rumqttc's error text.
    pub async fn closed(&mut self) -> String {
        self.wait_ctl(|c| match c {
            Ctl::Ended(e) => Some(e.clone()),
            _ => None,
        })
        .await
    }

    /// A normal DISCONNECT, then waits for the broker to close the connection.
    pub async fn disconnect(mut self) {
        match &self.client {
            Handle::V4(c) => c.disconnect().await.expect("disconnect"),
            Handle::V5(c) => c.disconnect().await.expect("disconnect"),
        }
        self.closed().await;
    }

    /// Closes the TCP connection without DISCONNECT (an abnormal close).
    pub async fn drop_tcp(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }

    /// Waits for a control packet `f` accepts, skipping others; panics if the connection
    /// ends first (unless `f` accepts the end).
    async fn wait_ctl<T>(&mut self, f: impl Fn(&Ctl) -> Option<T>) -> T {
        let ctl = &mut self.ctl;
        tokio::time::timeout(WAIT, async {
            loop {
                let c = ctl.recv().await.expect("event loop task alive");
                if let Some(t) = f(&c) {
                    return t;
                }
                if let Ctl::Ended(e) = c {
                    panic!("connection ended while waiting: {e}");
                }
            }
        })
        .await
        .expect("the expected packet in time")
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect_v4(
    creds: &Client,
    addr: SocketAddr,
    id: &str,
    opts: &Opts,
    msg_tx: mpsc::UnboundedSender<Msg>,
    ctl_tx: mpsc::UnboundedSender<Ctl>,
) -> (rumqttc::AsyncClient, bool, JoinHandle<()>) {
    use rumqttc::{ConnectReturnCode, Event, Packet};
    let mut o = rumqttc::MqttOptions::new(id, "localhost", addr.port());
    o.set_clean_session(opts.clean);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_transport(transport(creds));
    if let Some(w) = &opts.will {
        o.set_last_will(rumqttc::LastWill::new(
            &w.topic,
            w.payload.clone(),
            qos4(w.qos),
            w.retain,
        ));
    }
    let (client, mut el) = rumqttc::AsyncClient::new(o, 100);
    let present = tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    assert_eq!(a.code, ConnectReturnCode::Success, "CONNACK");
                    return a.session_present;
                }
                Ok(_) => {}
                Err(e) => panic!("3.1.1 connect of {id:?} failed: {e:?}"),
            }
        }
    })
    .await
    .expect("CONNACK in time");
    let task = tokio::spawn(async move {
        loop {
            let c = match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = msg_tx.send(Msg {
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                        qos: p.qos as u8,
                        retain: p.retain,
                        dup: p.dup,
                    });
                    continue;
                }
                Ok(Event::Incoming(Packet::SubAck(s))) => Ctl::SubAck(
                    s.return_codes
                        .iter()
                        .map(|c| match c {
                            rumqttc::SubscribeReasonCode::Success(q) => *q as u8,
                            rumqttc::SubscribeReasonCode::Failure => 0x80,
                        })
                        .collect(),
                ),
                Ok(Event::Incoming(Packet::PubAck(_))) => Ctl::PubAck(0),
                Ok(Event::Incoming(Packet::PubRec(_))) => Ctl::PubRec(0),
                Ok(Event::Incoming(Packet::PubComp(_))) => Ctl::PubComp,
                Ok(_) => continue,
                Err(e) => {
                    let _ = ctl_tx.send(Ctl::Ended(format!("{e:?}")));
                    return;
                }
            };
            let _ = ctl_tx.send(c);
        }
    });
    (client, present, task)
}

async fn connect_v5(
    creds: &Client,
    addr: SocketAddr,
    id: &str,
    opts: &Opts,
    msg_tx: mpsc::UnboundedSender<Msg>,
    ctl_tx: mpsc::UnboundedSender<Ctl>,
) -> (rumqttc::v5::AsyncClient, bool, JoinHandle<()>) {
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
    use rumqttc::v5::Event;
    let mut o = rumqttc::v5::MqttOptions::new(id, "localhost", addr.port());
    o.set_clean_start(opts.clean);
    if !opts.clean {
        o.set_session_expiry_interval(Some(600));
    }
    o.set_keep_alive(Duration::from_secs(30));
    o.set_transport(transport(creds));
    if let Some(w) = &opts.will {
        o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
            &w.topic,
            w.payload.clone(),
            qos5(w.qos),
            w.retain,
            (w.delay > 0).then(|| rumqttc::v5::mqttbytes::v5::LastWillProperties {
                delay_interval: Some(w.delay),
                payload_format_indicator: None,
                message_expiry_interval: None,
                content_type: None,
                response_topic: None,
                correlation_data: None,
                user_properties: Vec::new(),
            }),
        ));
    }
    let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 100);
    let present = tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    assert_eq!(a.code, ConnectReturnCode::Success, "CONNACK");
                    return a.session_present;
                }
                Ok(_) => {}
                Err(e) => panic!("MQTT 5 connect of {id:?} failed: {e:?}"),
            }
        }
    })
    .await
    .expect("CONNACK in time");
    let task = tokio::spawn(async move {
        loop {
            let c = match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = msg_tx.send(Msg {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.to_vec(),
                        qos: p.qos as u8,
                        retain: p.retain,
                        dup: p.dup,
                    });
                    continue;
                }
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    Ctl::SubAck(s.return_codes.iter().map(suback_code_v5).collect())
                }
                Ok(Event::Incoming(Packet::PubAck(a))) => Ctl::PubAck(puback_code_v5(&a.reason)),
                Ok(Event::Incoming(Packet::PubRec(a))) => Ctl::PubRec(pubrec_code_v5(&a.reason)),
                Ok(Event::Incoming(Packet::PubComp(_))) => Ctl::PubComp,
                Ok(_) => continue,
                Err(e) => {
                    let _ = ctl_tx.send(Ctl::Ended(format!("{e:?}")));
                    return;
                }
            };
            let _ = ctl_tx.send(c);
        }
    });
    (client, present, task)
}

fn suback_code_v5(c: &rumqttc::v5::mqttbytes::v5::SubscribeReasonCode) -> u8 {
    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as S;
    match c {
        S::Success(q) => *q as u8,
        S::Failure | S::Unspecified => 0x80,
        S::ImplementationSpecific => 0x83,
        S::NotAuthorized => 0x87,
        S::TopicFilterInvalid => 0x8F,
        S::PkidInUse => 0x91,
        S::QuotaExceeded => 0x97,
        S::SharedSubscriptionsNotSupported => 0x9E,
        S::SubscriptionIdNotSupported => 0xA1,
        S::WildcardSubscriptionsNotSupported => 0xA2,
    }
}

fn puback_code_v5(r: &rumqttc::v5::mqttbytes::v5::PubAckReason) -> u8 {
    use rumqttc::v5::mqttbytes::v5::PubAckReason as R;
    match r {
        R::Success => 0,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

fn pubrec_code_v5(r: &rumqttc::v5::mqttbytes::v5::PubRecReason) -> u8 {
    use rumqttc::v5::mqttbytes::v5::PubRecReason as R;
    match r {
        R::Success => 0,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}
