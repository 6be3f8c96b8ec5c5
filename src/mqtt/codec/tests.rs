//! Exact-byte vectors: what real clients send (captured from mosquitto_pub / mosquitto_sub
//! 2.0.11 against a plain TCP listener) and what the MQTT 3.1.1 and 5.0 specifications say
//! the broker must send back.

use bytes::{Bytes, BytesMut};

use super::*;

/// `mosquitto_pub -V mqttv311 -i certmq-v311` CONNECT.
pub(super) const V311_CONNECT: &str = "101700044d5154540402003c000b636572746d712d76333131";
/// `mosquitto_pub -V mqttv5 -i certmq-v5` CONNECT (Receive Maximum 20).
pub(super) const V5_CONNECT: &str = "101900044d5154540502003c032100140009636572746d712d7635";

pub(super) fn hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

/// Reads a CONNECT then one packet from `connect` + `packet`.
async fn after_connect(connect: &str, packet: &str) -> Result<Packet, CodecError> {
    let bytes = [hex(connect), hex(packet)].concat();
    let mut reader = PacketReader::new(&bytes[..], 1 << 20);
    reader.read_connect().await.unwrap();
    let packet = reader.read_packet().await;
    if packet.is_ok() {
        assert!(matches!(
            reader.read_packet().await,
            Err(CodecError::Closed)
        ));
    }
    packet
}

async fn v311(packet: &str) -> v4::Packet {
    match after_connect(V311_CONNECT, packet).await.unwrap() {
        Packet::V311(packet) => packet,
        other => panic!("not 3.1.1: {other:?}"),
    }
}

async fn v5(packet: &str) -> v5::Packet {
    match after_connect(V5_CONNECT, packet).await.unwrap() {
        Packet::V5(packet) => packet,
        other => panic!("not 5: {other:?}"),
    }
}

async fn connect(bytes: &str) -> Result<Connect, CodecError> {
    let bytes = hex(bytes);
    PacketReader::new(&bytes[..], 1 << 20).read_connect().await
}

fn encoded(packet: Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    let written = encode(&packet, &mut out).unwrap();
    assert_eq!(written, out.len(), "returned size of {packet:?}");
    out.to_vec()
}

#[tokio::test]
async fn mosquitto_v311_connect() {
    let Connect::V311(connect) = connect(V311_CONNECT).await.unwrap() else {
        panic!("not 3.1.1");
    };
    assert_eq!(connect.client_id, "certmq-v311");
    assert_eq!(connect.keep_alive, 60);
    assert!(connect.clean_session);
    assert_eq!((connect.last_will, connect.login), (None, None));
}

#[tokio::test]
async fn mosquitto_v311_connect_with_retained_will() {
    let bytes = "102600044d515454042e003c00087375622d76333131000b646576696365732f772f740003627965";
    let Connect::V311(connect) = connect(bytes).await.unwrap() else {
        panic!("not 3.1.1");
    };
    let will = connect.last_will.unwrap();
    assert_eq!(
        (will.topic.as_str(), &will.message[..]),
        ("devices/w/t", &b"bye"[..])
    );
    assert_eq!((will.qos, will.retain), (QoS::AtLeastOnce, true));
}

#[tokio::test]
async fn mosquitto_v5_connect() {
    let Connect::V5 {
        connect,
        will,
        login,
    } = connect(V5_CONNECT).await.unwrap()
    else {
        panic!("not 5");
    };
    assert_eq!(connect.client_id, "certmq-v5");
    assert!(connect.clean_start);
    assert_eq!(connect.properties.unwrap().receive_maximum, Some(20));
    assert_eq!((will, login), (None, None));
}

#[tokio::test]
async fn mosquitto_v5_connect_with_will_delay_and_session_expiry() {
    let bytes = "103300044d515454050e003c08110000001e21001400067375622d7635\
                 051800000005000b646576696365732f772f740003627965";
    let Connect::V5 { connect, will, .. } = connect(bytes).await.unwrap() else {
        panic!("not 5");
    };
    let properties = connect.properties.unwrap();
    assert_eq!(properties.session_expiry_interval, Some(30));
    let will = will.unwrap();
    assert_eq!(&will.topic[..], b"devices/w/t");
    assert_eq!((will.qos, will.retain), (QoS::AtLeastOnce, false));
    assert_eq!(will.properties.unwrap().delay_interval, Some(5));
}

#[tokio::test]
async fn mosquitto_v311_publish_subscribe_unsubscribe_disconnect() {
    let publish = v311("3016000f646576696365732f6465762d312f7468656c6c6f").await;
    let v4::Packet::Publish(publish) = publish else {
        panic!("{publish:?}")
    };
    assert_eq!(
        (publish.topic.as_str(), &publish.payload[..]),
        ("devices/dev-1/t", &b"hello"[..])
    );
    assert_eq!((publish.qos, publish.pkid), (QoS::AtMostOnce, 0));

    let publish = v311("3218000f646576696365732f6465762d312f74000168656c6c6f").await;
    let v4::Packet::Publish(publish) = publish else {
        panic!("{publish:?}")
    };
    assert_eq!(
        (publish.qos, publish.pkid, &publish.payload[..]),
        (QoS::AtLeastOnce, 1, &b"hello"[..])
    );

    let subscribe = v311("82100001000b646576696365732f2b2f7401").await;
    let v4::Packet::Subscribe(subscribe) = subscribe else {
        panic!("{subscribe:?}")
    };
    assert_eq!(subscribe.pkid, 1);
    assert_eq!(subscribe.filters.len(), 1);
    assert_eq!(
        (subscribe.filters[0].path.as_str(), subscribe.filters[0].qos),
        ("devices/+/t", QoS::AtLeastOnce)
    );

    let unsubscribe = v311("a20f0002000b646576696365732f2b2f74").await;
    assert_eq!(
        unsubscribe,
        v4::Packet::Unsubscribe(v4::Unsubscribe {
            pkid: 2,
            topics: vec!["devices/+/t".into()]
        })
    );

    assert_eq!(v311("e000").await, v4::Packet::Disconnect);
}

#[tokio::test]
async fn mosquitto_v5_publish_with_properties() {
    let publish = v5("3017000f646576696365732f6465762d312f740068656c6c6f").await;
    let v5::Packet::Publish(publish) = publish else {
        panic!("{publish:?}")
    };
    assert_eq!(
        (&publish.topic[..], &publish.payload[..]),
        (&b"devices/dev-1/t"[..], &b"hello"[..])
    );
    assert_eq!(publish.properties, None);

    // -D publish user-property k v -D publish message-expiry-interval 60
    let publish =
        v5("3225000f646576696365732f6465762d312f7400010c2600016b000176020000003c68656c6c6f").await;
    let v5::Packet::Publish(publish) = publish else {
        panic!("{publish:?}")
    };
    assert_eq!(
        (publish.qos, publish.pkid, &publish.payload[..]),
        (QoS::AtLeastOnce, 1, &b"hello"[..])
    );
    let properties = publish.properties.unwrap();
    assert_eq!(
        properties.user_properties,
        vec![("k".to_string(), "v".to_string())]
    );
    assert_eq!(properties.message_expiry_interval, Some(60));
}

#[tokio::test]
async fn mosquitto_v5_subscribe_unsubscribe_disconnect() {
    // -D subscribe user-property a b, QoS 2
    let subscribe = v5("821800010726000161000162000b646576696365732f2b2f7402").await;
    let v5::Packet::Subscribe(subscribe) = subscribe else {
        panic!("{subscribe:?}")
    };
    assert_eq!(subscribe.pkid, 1);
    assert_eq!(
        subscribe.properties.unwrap().user_properties,
        vec![("a".to_string(), "b".to_string())]
    );
    assert_eq!(
        (subscribe.filters[0].path.as_str(), subscribe.filters[0].qos),
        ("devices/+/t", QoS::ExactlyOnce)
    );

    let unsubscribe = v5("a210000200000b646576696365732f2b2f74").await;
    let v5::Packet::Unsubscribe(unsubscribe) = unsubscribe else {
        panic!("{unsubscribe:?}")
    };
    assert_eq!(
        (unsubscribe.pkid, unsubscribe.filters),
        (2, vec!["devices/+/t".to_string()])
    );

    let normal = v5::Packet::Disconnect(v5::Disconnect::new(
        v5::DisconnectReasonCode::NormalDisconnection,
    ));
    assert_eq!(v5("e000").await, normal);
}

#[tokio::test]
async fn v5_subscription_options_from_the_spec() {
    // No Local, Retain As Published, Retain Handling 2 (section 3.8.3.1): 0b0010_1101.
    let subscribe = v5("8209000100 0003612f62 2d").await;
    let v5::Packet::Subscribe(subscribe) = subscribe else {
        panic!("{subscribe:?}")
    };
    let filter = &subscribe.filters[0];
    assert_eq!(
        (filter.qos, filter.nolocal, filter.preserve_retain),
        (QoS::AtLeastOnce, true, true)
    );
    assert_eq!(filter.retain_forward_rule, v5::RetainForwardRule::Never);
}

#[tokio::test]
async fn acknowledgements_and_ping_received() {
    assert_eq!(
        v311("40020001").await,
        v4::Packet::PubAck(v4::PubAck::new(1))
    );
    assert_eq!(
        v311("50020001").await,
        v4::Packet::PubRec(v4::PubRec::new(1))
    );
    assert_eq!(
        v311("62020001").await,
        v4::Packet::PubRel(v4::PubRel::new(1))
    );
    assert_eq!(
        v311("70020001").await,
        v4::Packet::PubComp(v4::PubComp::new(1))
    );
    assert_eq!(v311("c000").await, v4::Packet::PingReq);
    assert_eq!(v5("c000").await, v5::Packet::PingReq(v5::PingReq));

    let v5::Packet::PubAck(puback) = v5("40020001").await else {
        panic!()
    };
    assert_eq!((puback.pkid, puback.reason), (1, v5::PubAckReason::Success));
    // Reason code without property length (section 3.4.2.2).
    let v5::Packet::PubAck(puback) = v5("4003000110").await else {
        panic!()
    };
    assert_eq!(puback.reason, v5::PubAckReason::NoMatchingSubscribers);
    let v5::Packet::PubRec(pubrec) = v5("500400018700").await else {
        panic!()
    };
    assert_eq!(pubrec.reason, v5::PubRecReason::NotAuthorized);
    let v5::Packet::PubRel(pubrel) = v5("6203000192").await else {
        panic!()
    };
    assert_eq!(
        (pubrel.pkid, pubrel.reason),
        (1, v5::PubRelReason::PacketIdentifierNotFound)
    );
    let v5::Packet::PubComp(pubcomp) = v5("70020001").await else {
        panic!()
    };
    assert_eq!(pubcomp.reason, v5::PubCompReason::Success);
}

#[tokio::test]
async fn v5_disconnect_with_reason_and_no_property_length() {
    // "Disconnect with Will Message", Remaining Length 1 (section 3.14.2.2.1): mqttbytes-ng
    // alone refuses it.
    let with_will = v5::Disconnect::new(v5::DisconnectReasonCode::DisconnectWithWillMessage);
    assert_eq!(
        v5("e00104").await,
        v5::Packet::Disconnect(with_will.clone())
    );
    assert_eq!(v5("e0020400").await, v5::Packet::Disconnect(with_will));
    assert!(matches!(
        after_connect(V5_CONNECT, "e00103").await,
        Err(CodecError::Malformed(_))
    ));
}

#[test]
fn connack_sent() {
    let v311 = |code| Packet::V311(v4::Packet::ConnAck(v4::ConnAck::new(code, false)));
    assert_eq!(
        encoded(v311(v4::ConnectReturnCode::Success)),
        hex("20020000")
    );
    assert_eq!(
        encoded(v311(v4::ConnectReturnCode::RefusedProtocolVersion)),
        hex("20020001")
    );
    assert_eq!(
        encoded(v311(v4::ConnectReturnCode::NotAuthorized)),
        hex("20020005")
    );
    let present = v4::ConnAck::new(v4::ConnectReturnCode::Success, true);
    assert_eq!(
        encoded(Packet::V311(v4::Packet::ConnAck(present))),
        hex("20020100")
    );

    let v5 = |code, properties| {
        Packet::V5(v5::Packet::ConnAck(v5::ConnAck {
            session_present: false,
            code,
            properties,
        }))
    };
    assert_eq!(
        encoded(v5(v5::ConnectReturnCode::Success, None)),
        hex("2003000000")
    );
    // mqttbytes-ng panics on 3.1.1-only codes in an MQTT 5 CONNACK; we map them.
    assert_eq!(
        encoded(v5(v5::ConnectReturnCode::RefusedProtocolVersion, None)),
        hex("2003008400")
    );
    assert_eq!(
        encoded(v5(v5::ConnectReturnCode::BadClientId, None)),
        hex("2003008500")
    );
    assert_eq!(
        encoded(v5(v5::ConnectReturnCode::ServiceUnavailable, None)),
        hex("2003008800")
    );

    let mut properties = empty_connack_properties();
    properties.reason_string = Some("no".into());
    properties.assigned_client_identifier = Some("id".into());
    properties.server_keep_alive = Some(60);
    // 20 len | flags | 0x87 | props len | 0x12 "id" | 0x1f "no" | 0x13 60
    let expected = hex("2010 00 87 0d 120002 6964 1f0002 6e6f 13003c");
    assert_eq!(
        encoded(v5(v5::ConnectReturnCode::NotAuthorized, Some(properties))),
        expected
    );
}

#[test]
fn suback_unsuback_sent() {
    let codes = vec![
        v4::SubscribeReasonCode::Success(QoS::AtLeastOnce),
        v4::SubscribeReasonCode::Failure,
    ];
    assert_eq!(
        encoded(Packet::V311(v4::Packet::SubAck(v4::SubAck::new(1, codes)))),
        hex("900400010180")
    );
    assert_eq!(
        encoded(Packet::V311(v4::Packet::UnsubAck(v4::UnsubAck::new(2)))),
        hex("b0020002")
    );

    let codes = vec![
        v5::SubscribeReasonCode::Success(QoS::AtMostOnce),
        v5::SubscribeReasonCode::NotAuthorized,
    ];
    let suback = v5::SubAck {
        pkid: 1,
        return_codes: codes,
        properties: None,
    };
    assert_eq!(
        encoded(Packet::V5(v5::Packet::SubAck(suback))),
        hex("9005000100 0087")
    );
    let reasons = vec![
        v5::UnsubAckReason::Success,
        v5::UnsubAckReason::NoSubscriptionExisted,
    ];
    let unsuback = v5::UnsubAck {
        pkid: 2,
        reasons,
        properties: None,
    };
    assert_eq!(
        encoded(Packet::V5(v5::Packet::UnsubAck(unsuback))),
        hex("b005000200 0011")
    );
}

#[test]
fn publish_and_acknowledgements_sent() {
    let mut publish = v4::Publish::new("a/b", QoS::AtLeastOnce, "x");
    publish.pkid = 10;
    publish.retain = true;
    assert_eq!(
        encoded(Packet::V311(v4::Packet::Publish(publish))),
        hex("3308 0003612f62 000a 78")
    );
    let publish = v4::Publish::new("a/b", QoS::AtMostOnce, "x");
    assert_eq!(
        encoded(Packet::V311(v4::Packet::Publish(publish))),
        hex("3006 0003612f62 78")
    );

    let publish = v5::Publish::new("a/b", QoS::AtMostOnce, Bytes::from_static(b"x"), None);
    assert_eq!(
        encoded(Packet::V5(v5::Packet::Publish(publish))),
        hex("3007 0003612f62 00 78")
    );
    let properties = v5::PublishProperties {
        topic_alias: Some(1),
        subscription_identifiers: vec![200],
        ..Default::default()
    };
    let mut publish = v5::Publish::new(
        "a/b",
        QoS::ExactlyOnce,
        Bytes::from_static(b"x"),
        Some(properties),
    );
    publish.pkid = 7;
    // props: 0x23 0001 (alias), 0x0b c801 (subscription identifier 200)
    assert_eq!(
        encoded(Packet::V5(v5::Packet::Publish(publish))),
        hex("340f 0003612f62 0007 06 230001 0bc801 78")
    );

    assert_eq!(
        encoded(Packet::V311(v4::Packet::PubAck(v4::PubAck::new(1)))),
        hex("40020001")
    );
    assert_eq!(
        encoded(Packet::V311(v4::Packet::PubRec(v4::PubRec::new(1)))),
        hex("50020001")
    );
    assert_eq!(
        encoded(Packet::V311(v4::Packet::PubRel(v4::PubRel::new(1)))),
        hex("62020001")
    );
    assert_eq!(
        encoded(Packet::V311(v4::Packet::PubComp(v4::PubComp::new(1)))),
        hex("70020001")
    );
    assert_eq!(encoded(Packet::V311(v4::Packet::PingResp)), hex("d000"));
    assert_eq!(
        encoded(Packet::V5(v5::Packet::PingResp(v5::PingResp))),
        hex("d000")
    );

    assert_eq!(
        encoded(Packet::V5(v5::Packet::PubAck(v5::PubAck::new(1, None)))),
        hex("40020001")
    );
    let denied = v5::PubAck {
        pkid: 1,
        reason: v5::PubAckReason::NotAuthorized,
        properties: None,
    };
    assert_eq!(
        encoded(Packet::V5(v5::Packet::PubAck(denied))),
        hex("4004000187 00")
    );
    let pubrec = v5::PubRec {
        pkid: 3,
        reason: v5::PubRecReason::Success,
        properties: None,
    };
    assert_eq!(
        encoded(Packet::V5(v5::Packet::PubRec(pubrec))),
        hex("50020003")
    );
    let pubcomp = v5::PubComp {
        pkid: 3,
        reason: v5::PubCompReason::Success,
        properties: None,
    };
    assert_eq!(
        encoded(Packet::V5(v5::Packet::PubComp(pubcomp))),
        hex("70020003")
    );
}

fn v5_disconnect(reason_code: v5::DisconnectReasonCode, reason: Option<&str>) -> Packet {
    let properties = reason.map(|text| v5::DisconnectProperties {
        session_expiry_interval: None,
        reason_string: Some(text.into()),
        user_properties: Vec::new(),
        server_reference: None,
    });
    Packet::V5(v5::Packet::Disconnect(v5::Disconnect {
        reason_code,
        properties,
    }))
}

#[test]
fn v5_disconnect_sent() {
    use v5::DisconnectReasonCode as Code;
    assert_eq!(
        encoded(v5_disconnect(Code::NormalDisconnection, None)),
        hex("e000")
    );
    assert_eq!(
        encoded(v5_disconnect(Code::SessionTakenOver, None)),
        hex("e0028e00")
    );
    // 8B, property length 0x17, 0x1F + "server shutting down" (20 bytes)
    let shutting_down = hex("e019 8b 17 1f0014 736572766572207368757474696e6720646f776e");
    assert_eq!(
        encoded(v5_disconnect(
            Code::ServerShuttingDown,
            Some("server shutting down")
        )),
        shutting_down
    );
    let taken_over = hex("e017 8e 15 1f0012 73657373696f6e2074616b656e206f766572");
    assert_eq!(
        encoded(v5_disconnect(
            Code::SessionTakenOver,
            Some("session taken over")
        )),
        taken_over
    );
    let not_authorized = hex("e013 87 11 1f000e 6e6f7420617574686f72697a6564");
    assert_eq!(
        encoded(v5_disconnect(Code::NotAuthorized, Some("not authorized"))),
        not_authorized
    );
    let empty = v5::DisconnectProperties {
        session_expiry_interval: Some(0),
        reason_string: None,
        user_properties: vec![("k".into(), "v".into())],
        server_reference: None,
    };
    let packet = Packet::V5(v5::Packet::Disconnect(v5::Disconnect {
        reason_code: Code::PacketTooLarge,
        properties: Some(empty),
    }));
    assert_eq!(encoded(packet), hex("e00e 95 0c 1100000000 2600016b000176"));
}

/// Documents the mqttbytes-ng 0.7.1 bug `encode` works around. If this starts failing after
/// an upgrade, the crate was fixed and `encode_v5_disconnect` may go.
#[test]
fn mqttbytes_ng_v5_disconnect_bug_is_still_there() {
    let mut out = BytesMut::new();
    let packet = v5::Packet::Disconnect(v5::Disconnect::new(
        v5::DisconnectReasonCode::SessionTakenOver,
    ));
    packet.write(&mut out, None).unwrap();
    assert_eq!(&out[..], &hex("e0018e00")[..]);
}

#[test]
fn encoded_packets_decode_back() {
    let packets = [
        v5_disconnect(
            v5::DisconnectReasonCode::ServerShuttingDown,
            Some("server shutting down"),
        ),
        v5_disconnect(v5::DisconnectReasonCode::KeepAliveTimeout, None),
        Packet::V5(v5::Packet::Publish(v5::Publish::new(
            "t",
            QoS::AtMostOnce,
            Bytes::from_static(b"p"),
            None,
        ))),
    ];
    for packet in packets {
        let mut out = BytesMut::from(&hex(V5_CONNECT)[..]);
        encode(&packet, &mut out).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let decoded = runtime.block_on(async {
            let mut reader = PacketReader::new(&out[..], 1024);
            reader.read_connect().await.unwrap();
            reader.read_packet().await.unwrap()
        });
        assert_eq!(decoded, packet);
    }
}

#[test]
fn failed_encode_leaves_the_buffer_as_it_was() {
    let mut out = BytesMut::from(&b"kept"[..]);
    // QoS 1 without a packet identifier: mqttbytes-ng writes the header, then refuses.
    let publish = Packet::V311(v4::Packet::Publish(v4::Publish::new(
        "a",
        QoS::AtLeastOnce,
        "x",
    )));
    assert!(matches!(
        encode(&publish, &mut out),
        Err(CodecError::Unencodable(Unencodable::Library(_)))
    ));
    assert_eq!(&out[..], b"kept");

    let long_topic = "t".repeat(70_000);
    let publish = Packet::V5(v5::Packet::Publish(v5::Publish::new(
        long_topic,
        QoS::AtMostOnce,
        Bytes::new(),
        None,
    )));
    let error = encode(&publish, &mut out).unwrap_err();
    assert!(matches!(
        error,
        CodecError::Unencodable(Unencodable::StringTooLong { len: 70_000, .. })
    ));
    assert_eq!(&out[..], b"kept");
}

/// A PUBACK 0x87 with a reason string and one user property (the broker sends none, but
/// `fit` must know what to leave out first).
fn puback_with_extras(reason: v5::PubAckReason) -> Packet {
    Packet::V5(v5::Packet::PubAck(v5::PubAck {
        pkid: 1,
        reason,
        properties: Some(v5::PubAckProperties {
            reason_string: Some("why".into()),
            user_properties: vec![("k".into(), "v".into())],
        }),
    }))
}

#[test]
fn fit_leaves_out_the_reason_string_then_the_user_properties() {
    let full = puback_with_extras(v5::PubAckReason::NotAuthorized);
    // 40 11 0001 87 0d 1f 0003 "why" 26 0001 "k" 0001 "v": 19 bytes.
    assert_eq!(encoded(full.clone()).len(), 19);
    assert_eq!(fit(full.clone(), None).unwrap(), full);
    assert_eq!(fit(full.clone(), Some(19)).unwrap(), full);
    // Without the reason string: 13 bytes.
    let no_reason = fit(full.clone(), Some(18)).unwrap();
    assert_eq!(
        encoded(no_reason),
        hex("400b 0001 87 07 26 0001 6b 0001 76")
    );
    // Without either: the block goes too.
    assert_eq!(
        encoded(fit(full.clone(), Some(12)).unwrap()),
        hex("4004 0001 87 00")
    );
    assert!(matches!(
        fit(full, Some(5)),
        Err(CodecError::Unencodable(Unencodable::ExceedsPeerMaximum {
            size: 6,
            max: 5
        }))
    ));
    // A success PUBACK shrinks to its two-byte form.
    let success = fit(puback_with_extras(v5::PubAckReason::Success), Some(4)).unwrap();
    assert_eq!(encoded(success), hex("4002 0001"));
}

#[test]
fn fit_keeps_what_is_not_optional() {
    // A CONNACK keeps its Receive Maximum; a PUBLISH is never shrunk.
    let connack = Packet::V5(v5::Packet::ConnAck(v5::ConnAck {
        session_present: false,
        code: v5::ConnectReturnCode::Success,
        properties: Some(v5::ConnAckProperties {
            receive_max: Some(10),
            reason_string: Some("a reason".into()),
            ..empty_connack_properties()
        }),
    }));
    assert_eq!(
        encoded(fit(connack, Some(8)).unwrap()),
        hex("2006 0000 03 21000a")
    );
    let publish = Packet::V5(v5::Packet::Publish(v5::Publish::new(
        "topic",
        QoS::AtMostOnce,
        "payload",
        None,
    )));
    assert!(fit(publish, Some(8)).is_err());
}

#[test]
fn encode_within_writes_the_shrunk_packet_or_nothing() {
    let full = puback_with_extras(v5::PubAckReason::NotAuthorized);
    let mut out = BytesMut::from(&b"kept"[..]);
    assert_eq!(encode_within(&full, Some(12), &mut out).unwrap(), 6);
    assert_eq!(&out[4..], hex("4004 0001 87 00"));
    assert!(encode_within(&full, Some(5), &mut out).is_err());
    assert_eq!(out.len(), 10);
    // No limit: as `encode`.
    assert_eq!(encode_within(&full, None, &mut out).unwrap(), 19);
}

#[test]
fn encoded_len_is_what_encode_writes() {
    let mut v311 = v4::Publish::new("a/b", QoS::AtLeastOnce, vec![7u8; 300]);
    v311.pkid = 1;
    let mut v5 = v5::Publish::new(
        "a/b",
        QoS::AtLeastOnce,
        vec![7u8; 200],
        Some(v5::PublishProperties {
            topic_alias: Some(3),
            subscription_identifiers: vec![1, 300],
            ..Default::default()
        }),
    );
    v5.pkid = 2;
    let packets = [
        Packet::V311(v4::Packet::Publish(v311)),
        Packet::V5(v5::Packet::Publish(v5)),
        puback_with_extras(v5::PubAckReason::NotAuthorized),
        Packet::V5(v5::Packet::Disconnect(v5::Disconnect::new(
            v5::DisconnectReasonCode::ProtocolError,
        ))),
    ];
    for packet in packets {
        assert_eq!(
            encoded_len(&packet),
            encoded(packet.clone()).len(),
            "{packet:?}"
        );
    }
}

/// The delivery hot path's PUBLISH encoder writes what mqttbytes-ng writes for the same
/// packet, for both versions, every QoS and flag, and a payload whose remaining length
/// needs two bytes; and it refuses what exceeds the peer's maximum, writing nothing.
#[test]
fn bare_publish_encodes_as_the_library_does() {
    let long = vec![7u8; 300];
    for payload in [&b""[..], &b"hello"[..], &long[..]] {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            for (retain, dup) in [(false, false), (true, false), (false, true), (true, true)] {
                let dup = dup && qos != QoS::AtMostOnce;
                let pkid = if qos == QoS::AtMostOnce { 0 } else { 513 };
                let bare = BarePublish {
                    topic: "devices/dev-1/t",
                    payload,
                    qos,
                    retain,
                    dup,
                    pkid,
                };
                let v4 = Packet::V311(v4::Packet::Publish(v4::Publish {
                    dup,
                    qos,
                    retain,
                    topic: bare.topic.to_owned(),
                    pkid,
                    payload: Bytes::copy_from_slice(payload),
                }));
                let v5 = Packet::V5(v5::Packet::Publish(v5::Publish {
                    dup,
                    qos,
                    retain,
                    topic: Bytes::copy_from_slice(bare.topic.as_bytes()),
                    pkid,
                    payload: Bytes::copy_from_slice(payload),
                    properties: None,
                }));
                for (protocol, packet) in [(Protocol::V311, v4), (Protocol::V5, v5)] {
                    let (mut ours, mut theirs) =
                        (BytesMut::from(&b"x"[..]), BytesMut::from(&b"x"[..]));
                    let n = encode_bare_publish(protocol, &bare, None, &mut ours).unwrap();
                    let m = encode(&packet, &mut theirs).unwrap();
                    assert_eq!((n, &ours[..]), (m, &theirs[..]), "{protocol:?} {qos:?}");
                    let mut refused = BytesMut::from(&b"x"[..]);
                    assert!(
                        encode_bare_publish(protocol, &bare, Some(n - 1), &mut refused).is_err()
                    );
                    assert_eq!(&refused[..], b"x");
                    assert!(encode_bare_publish(protocol, &bare, Some(n), &mut refused).is_ok());
                }
            }
        }
    }
}
