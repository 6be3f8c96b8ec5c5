//! A scripted MQTT 5 client for the MQTT 5 and hostile-input tests (`tests/mqtt_v5.rs`,
//! `tests/limits.rs`). It speaks over real TLS and encodes and decodes with rumqttc's own
//! MQTT 5 codec (`rumqttc::v5::mqttbytes`, an implementation independent of the broker's
//! mqttbytes-ng), but leaves every step to the test: when to acknowledge, what to send
//! mid-flow, packets no event loop would build (a topic alias never set, a DISCONNECT with
//! a session expiry). rumqttc's event loop acknowledges and reconnects on its own, which
//! hides exactly what these tests look at.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectProperties, ConnectReturnCode, Disconnect, DisconnectProperties,
    DisconnectReasonCode, Filter, LastWill, Packet, PingReq, PubAck, PubAckReason, Publish,
    PublishProperties, SubAck, Subscribe, SubscribeProperties, UnsubAck, Unsubscribe,
};
use rumqttc::v5::mqttbytes::QoS;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{read_packet, Client, Fixture, WAIT};

/// The fleet anchor with an ACL profile that may publish and subscribe everywhere, for
/// tests about MQTT behaviour rather than authorization.
pub const BACKEND_FLEET: &str = "[[anchor]]\nname = \"fleet\"\ncertificate = \"fleet.pem\"\ncn_regex = '^(.+)\\.devices\\.example\\.com$'\ncreate_devices = true\nacl = \"backend\"\n\n[acl.backend]\npublish = [\"#\"]\nsubscribe = [\"#\"]\n";

/// Writes `certmq.toml` with the fixture's [server] section, `limits` as the whole
/// [limits] section (the fixture's 5 s timeouts are added unless `limits` sets them), and
/// `body` after it. `Fixture::config` fixes both timeouts, which some tests must change.
pub fn config_with_limits(fx: &Fixture, limits: &str, body: &str) -> PathBuf {
    let mut section = String::from(limits);
    for key in ["handshake_timeout", "connect_timeout"] {
        if !limits.contains(key) {
            section.push_str(&format!("\n{key} = 5"));
        }
    }
    let text = format!(
        "[server]\nbind = \"127.0.0.1:0\"\ncert_chain = \"server.pem\"\nprivate_key = \"server.key\"\ndata_dir = \"data\"\n\n[limits]\n{section}\n\n{body}\n"
    );
    fx.write("certmq.toml", &text)
}

/// A device certificate `NAME.devices.example.com` and its TLS client.
pub fn device_client(fx: &Fixture, name: &str) -> Client {
    fx.client(&fx.device(&format!("{name}.devices.example.com")))
}

/// Opens TCP and TLS to the broker, nothing more.
pub async fn tls_stream(client: &Client, addr: SocketAddr) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("tcp connect");
    tls_over(client, tcp).await
}

/// Runs the TLS handshake over an open TCP stream.
pub async fn tls_over(client: &Client, tcp: TcpStream) -> TlsStream<TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(client.tls.clone());
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("TLS handshake in time")
        .expect("TLS handshake")
}

/// A CONNECT with clean start, keep alive 60 s and no properties, ready to adjust.
pub fn connect_packet(client_id: &str) -> Connect {
    Connect {
        keep_alive: 60,
        client_id: client_id.to_owned(),
        clean_start: true,
        properties: None,
    }
}

/// Connect properties with only a session expiry interval.
pub fn with_expiry(secs: u32) -> ConnectProperties {
    let mut p = ConnectProperties::new();
    p.session_expiry_interval = Some(secs);
    p
}

/// Decodes one whole packet (as read by `read_packet`) with rumqttc's MQTT 5 codec. The
/// two-byte DISCONNECT `e0 00` is valid MQTT 5 but refused by that codec: handled here.
pub fn decode(bytes: &[u8]) -> Packet {
    if bytes == [0xe0, 0x00] {
        return Packet::Disconnect(Disconnect::new(DisconnectReasonCode::NormalDisconnection));
    }
    let mut buf = BytesMut::from(bytes);
    Packet::read(&mut buf, None)
        .unwrap_or_else(|e| panic!("cannot decode {bytes:02x?} from the broker: {e:?}"))
}

/// The reason code byte of a DISCONNECT, as the wire carries it.
pub fn disconnect_code(d: &Disconnect) -> u8 {
    use DisconnectReasonCode as D;
    match d.reason_code {
        D::NormalDisconnection => 0x00,
        D::UnspecifiedError => 0x80,
        D::MalformedPacket => 0x81,
        D::ProtocolError => 0x82,
        D::ImplementationSpecificError => 0x83,
        D::NotAuthorized => 0x87,
        D::ServerShuttingDown => 0x8B,
        D::KeepAliveTimeout => 0x8D,
        D::SessionTakenOver => 0x8E,
        D::TopicNameInvalid => 0x90,
        D::ReceiveMaximumExceeded => 0x93,
        D::TopicAliasInvalid => 0x94,
        D::PacketTooLarge => 0x95,
        other => panic!("unexpected DISCONNECT reason {other:?}"),
    }
}

/// One scripted MQTT 5 connection over TLS.
pub struct Raw5 {
    pub tls: TlsStream<TcpStream>,
    /// PUBLISHes read while waiting for something else (a SUBACK, a PUBACK), in order.
    pending: VecDeque<Publish>,
    /// Whether `next_publish` acknowledges QoS 1 messages itself.
    pub auto_ack: bool,
    next_pkid: u16,
}

impl Raw5 {
    /// Opens TLS, sends `connect` (and `will`), and returns the connection with the CONNACK.
    pub async fn connect(
        client: &Client,
        addr: SocketAddr,
        connect: Connect,
        will: Option<LastWill>,
    ) -> (Raw5, ConnAck) {
        let tcp = TcpStream::connect(addr).await.expect("tcp connect");
        Raw5::connect_tcp(client, tcp, connect, will).await
    }

    /// As [`Raw5::connect`] over a TCP stream the test prepared (e.g. a tiny receive
    /// buffer).
    pub async fn connect_tcp(
        client: &Client,
        tcp: TcpStream,
        connect: Connect,
        will: Option<LastWill>,
    ) -> (Raw5, ConnAck) {
        let mut raw = Raw5 {
            tls: tls_over(client, tcp).await,
            pending: VecDeque::new(),
            auto_ack: true,
            next_pkid: 1,
        };
        raw.send(Packet::Connect(connect, will, None)).await;
        match raw.recv().await {
            Some(Packet::ConnAck(ack)) => (raw, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// A clean-start connection that must be accepted.
    pub async fn open(client: &Client, addr: SocketAddr, client_id: &str) -> Raw5 {
        Raw5::open_with(client, addr, connect_packet(client_id)).await
    }

    /// A connection with this CONNECT that must be accepted.
    pub async fn open_with(client: &Client, addr: SocketAddr, connect: Connect) -> Raw5 {
        let (raw, ack) = Raw5::connect(client, addr, connect, None).await;
        assert_eq!(ack.code, ConnectReturnCode::Success, "CONNACK {ack:?}");
        raw
    }

    /// Encodes and writes one packet.
    pub async fn send(&mut self, packet: Packet) {
        let mut buf = BytesMut::new();
        packet.write(&mut buf, None).expect("encode");
        self.send_raw(&buf).await;
    }

    /// Writes bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.tls.write_all(bytes).await.expect("write");
        self.tls.flush().await.expect("flush");
    }

    /// The next packet from the broker, or None when it closed the connection. Panics
    /// when nothing happens within `WAIT`.
    pub async fn recv(&mut self) -> Option<Packet> {
        match tokio::time::timeout(WAIT, read_packet(&mut self.tls)).await {
            Ok(Ok(bytes)) => Some(decode(&bytes)),
            Ok(Err(_)) => None,
            Err(_) => panic!("nothing from the broker within {WAIT:?}"),
        }
    }

    /// Reads until the broker closes; returns what came before the close.
    pub async fn until_closed(&mut self) -> Vec<Packet> {
        let mut out = Vec::new();
        while let Some(p) = self.recv().await {
            out.push(p);
        }
        out
    }

    /// Expects the broker to send DISCONNECT and close; returns its reason code byte.
    pub async fn expect_disconnect(&mut self) -> u8 {
        let packets = self.until_closed().await;
        match packets.as_slice() {
            [.., Packet::Disconnect(d)] => disconnect_code(d),
            other => panic!("expected DISCONNECT then close, got {other:?}"),
        }
    }

    fn pkid(&mut self) -> u16 {
        let id = self.next_pkid;
        self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
        id
    }

    /// Reads until a packet other than PUBLISH arrives; PUBLISHes are kept for
    /// `next_publish`.
    async fn next_control(&mut self) -> Packet {
        loop {
            match self.recv().await {
                Some(Packet::Publish(p)) => self.pending.push_back(p),
                Some(other) => return other,
                None => panic!("the broker closed the connection"),
            }
        }
    }

    /// SUBSCRIBE with these filters and subscription identifier; returns the SUBACK.
    pub async fn subscribe(&mut self, filters: Vec<Filter>, id: Option<usize>) -> SubAck {
        let pkid = self.pkid();
        let properties = id.map(|id| SubscribeProperties {
            id: Some(id),
            user_properties: Vec::new(),
        });
        let mut sub = Subscribe::new_many(filters, properties);
        sub.pkid = pkid;
        self.send(Packet::Subscribe(sub)).await;
        match self.next_control().await {
            Packet::SubAck(ack) if ack.pkid == pkid => ack,
            other => panic!("expected SUBACK {pkid}, got {other:?}"),
        }
    }

    /// SUBSCRIBE to one filter that must be granted at `qos`.
    pub async fn sub(&mut self, filter: &str, qos: QoS) {
        let ack = self.subscribe(vec![Filter::new(filter, qos)], None).await;
        assert_eq!(
            ack.return_codes,
            vec![rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(
                qos
            )]
        );
    }

    /// UNSUBSCRIBE; returns the UNSUBACK.
    pub async fn unsubscribe(&mut self, filters: &[&str]) -> UnsubAck {
        let pkid = self.pkid();
        let unsub = Unsubscribe {
            pkid,
            filters: filters.iter().map(|f| f.to_string()).collect(),
            properties: None,
        };
        self.send(Packet::Unsubscribe(unsub)).await;
        match self.next_control().await {
            Packet::UnsubAck(ack) if ack.pkid == pkid => ack,
            other => panic!("expected UNSUBACK {pkid}, got {other:?}"),
        }
    }

    /// PUBLISH; for QoS 1 waits for and returns the PUBACK.
    pub async fn publish(
        &mut self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: impl Into<Bytes>,
        properties: Option<PublishProperties>,
    ) -> Option<PubAck> {
        let mut p = Publish::new(topic, qos, payload, properties);
        p.retain = retain;
        if qos == QoS::AtMostOnce {
            self.send(Packet::Publish(p)).await;
            return None;
        }
        assert_eq!(qos, QoS::AtLeastOnce, "QoS 2 is not scripted here");
        let pkid = self.pkid();
        p.pkid = pkid;
        self.send(Packet::Publish(p)).await;
        match self.next_control().await {
            Packet::PubAck(ack) if ack.pkid == pkid => Some(ack),
            other => panic!("expected PUBACK {pkid}, got {other:?}"),
        }
    }

    /// QoS 1 PUBLISH that must be acknowledged with success.
    pub async fn publish_ok(&mut self, topic: &str, payload: impl Into<Bytes>) {
        let ack = self
            .publish(topic, QoS::AtLeastOnce, false, payload, None)
            .await
            .expect("PUBACK");
        assert_eq!(ack.reason, PubAckReason::Success, "{ack:?}");
    }

    /// The next PUBLISH (acknowledged when `auto_ack` and QoS 1). Panics on any other
    /// packet or a close.
    pub async fn next_publish(&mut self) -> Publish {
        let p = match self.pending.pop_front() {
            Some(p) => p,
            None => match self.recv().await {
                Some(Packet::Publish(p)) => p,
                other => panic!("expected PUBLISH, got {other:?}"),
            },
        };
        if self.auto_ack && p.qos == QoS::AtLeastOnce {
            self.ack(p.pkid).await;
        }
        p
    }

    /// PUBACK for a received QoS 1 message.
    pub async fn ack(&mut self, pkid: u16) {
        self.send(Packet::PubAck(PubAck::new(pkid, None))).await;
    }

    /// PUBLISHes received up to the first one whose payload is `marker` (included).
    pub async fn until_payload(&mut self, marker: &[u8]) -> Vec<Publish> {
        let mut out = Vec::new();
        loop {
            let p = self.next_publish().await;
            let done = p.payload.as_ref() == marker;
            out.push(p);
            if done {
                return out;
            }
        }
    }

    /// PINGREQ, then the PUBLISHes that arrive before the PINGRESP (not acknowledged, not
    /// kept). Everything the broker had decided to send before it read the PINGREQ comes
    /// first on this ordered connection.
    pub async fn ping_collect(&mut self) -> Vec<Publish> {
        self.send(Packet::PingReq(PingReq)).await;
        let mut out: Vec<Publish> = self.pending.drain(..).collect();
        loop {
            match self.recv().await {
                Some(Packet::Publish(p)) => out.push(p),
                Some(Packet::PingResp(_)) => return out,
                other => panic!("expected PUBLISH or PINGRESP, got {other:?}"),
            }
        }
    }

    /// A normal DISCONNECT, then waits for the broker to close.
    pub async fn disconnect(mut self) {
        self.send(Packet::Disconnect(Disconnect::new(
            DisconnectReasonCode::NormalDisconnection,
        )))
        .await;
        let rest = self.until_closed().await;
        assert!(rest.is_empty(), "after DISCONNECT: {rest:?}");
    }

    /// DISCONNECT carrying a session expiry interval.
    pub async fn send_disconnect_with_expiry(&mut self, secs: u32) {
        self.send(Packet::Disconnect(Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
            properties: Some(DisconnectProperties {
                session_expiry_interval: Some(secs),
                reason_string: None,
                user_properties: Vec::new(),
                server_reference: None,
            }),
        }))
        .await;
    }
}
