//! The rules of `rules.rs` and `frame::connect_form` at the edges the black-box tests
//! (tests/it/conformance.rs) do not reach: lengths that contain a zero byte, blocks cut
//! short (left to mqttbytes-ng), what may repeat where, and the CONNACK form of an
//! unsupported level.

use super::tests::{hex, V311_CONNECT, V5_CONNECT};
use super::*;

async fn after_connect(connect: &str, packet: &str) -> Result<Packet, CodecError> {
    let bytes = [hex(connect), hex(packet)].concat();
    let mut reader = PacketReader::new(&bytes[..], 1 << 20);
    reader.read_connect().await.unwrap();
    reader.read_packet().await
}

/// A whole packet in hex: the first byte, the remaining length (one or two bytes), `body`.
fn frame(first: u8, body: &str) -> String {
    let len = hex(body).len();
    let length = if len < 128 {
        format!("{len:02x}")
    } else {
        format!("{:02x}{:02x}", (len % 128) | 0x80, len / 128)
    };
    format!("{first:02x}{length}{body}")
}

async fn connect(bytes: &str) -> Result<Connect, CodecError> {
    let bytes = hex(bytes);
    PacketReader::new(&bytes[..], 1 << 20).read_connect().await
}

#[tokio::test]
async fn a_zero_byte_in_a_length_is_not_a_nul() {
    // PUBLISH "a" with a user property whose key is 256 bytes long: its length is 01 00,
    // and the property block is 262 bytes long (86 02).
    let key = "6b".repeat(256);
    let packet = frame(0x30, &format!("0001 61 8602 26 0100 {key} 0001 76 78"));
    let Packet::V5(v5::Packet::Publish(p)) = after_connect(V5_CONNECT, &packet).await.unwrap()
    else {
        panic!("not a PUBLISH");
    };
    assert_eq!(p.properties.unwrap().user_properties[0].1, "v");
}

#[tokio::test]
async fn user_property_repeats_anywhere_subscription_identifier_only_in_publish() {
    // PUBACK with two user properties.
    let puback = frame(0x40, "0001 00 0e 26 0001 6b 0001 31 26 0001 6b 0001 32");
    assert!(after_connect(V5_CONNECT, &puback).await.is_ok());
    // PUBLISH with two subscription identifiers passes the codec: the session refuses a
    // client's identifiers as a protocol error with its own reason (MQTT-3.3.4-6).
    let publish = frame(0x30, "0001 61 04 0b 01 0b 02");
    assert!(after_connect(V5_CONNECT, &publish).await.is_ok());
    // SUBSCRIBE with two: a protocol error naming the property.
    let subscribe = frame(0x82, "0001 04 0b 01 0b 02 0001 61 00");
    let e = after_connect(V5_CONNECT, &subscribe).await.unwrap_err();
    assert_eq!(
        e.reason_string(),
        "protocol error: Subscription Identifier appears more than once"
    );
    assert_eq!(e.v5_reason_code(), 0x82);
}

#[tokio::test]
async fn blocks_cut_short_or_unknown_are_left_to_the_decoder() {
    for body in [
        // Property length 5, one byte of properties.
        "0001 61 05 01",
        // Unknown property 0x7f.
        "0001 61 02 7f 00",
        // A string property whose length runs past the block.
        "0001 61 04 03 0009 61",
    ] {
        let e = after_connect(V5_CONNECT, &frame(0x30, body))
            .await
            .unwrap_err();
        assert!(
            matches!(e, CodecError::Malformed(Malformed::Decode(_))),
            "{body}: {e:?}"
        );
    }
}

#[tokio::test]
async fn request_properties_are_0_or_1() {
    // CONNECT with Request Problem Information 2.
    let e = connect(&frame(0x10, "00044d5154540502003c 02 1702 0001 63"))
        .await
        .unwrap_err();
    assert_eq!(
        e.reason_string(),
        "protocol error: Request Problem Information of 2, which must be 0 or 1"
    );
}

#[tokio::test]
async fn qos_0_dup_is_refused_from_the_first_byte() {
    // Only the first byte and the length arrive: refused without waiting for the body.
    let bytes = [hex(V311_CONNECT), hex("38 10")].concat();
    let mut reader = PacketReader::new(&bytes[..], 1 << 20);
    reader.read_connect().await.unwrap();
    let e = reader.read_packet().await.unwrap_err();
    assert!(
        matches!(e, CodecError::Malformed(Malformed::DupOnQos0)),
        "{e:?}"
    );
}

#[tokio::test]
async fn an_unsupported_level_is_answered_in_the_form_of_its_connect() {
    let form = |e: CodecError| match e {
        CodecError::UnsupportedProtocol { form, .. } => form,
        other => panic!("{other:?}"),
    };
    // mosquitto_pub -V mqttv31: MQTT 3.1.
    let v31 = "101800064d51497364700302003c000a6f6c642d636c69656e74";
    assert_eq!(form(connect(v31).await.unwrap_err()), Protocol::V311);
    // The 3.1.1 and 5 CONNECTs of mosquitto_pub with level 6.
    let v311_form = V311_CONNECT.replacen("4d51545404", "4d51545406", 1);
    assert_eq!(form(connect(&v311_form).await.unwrap_err()), Protocol::V311);
    let v5_form = V5_CONNECT.replacen("4d51545405", "4d51545406", 1);
    assert_eq!(form(connect(&v5_form).await.unwrap_err()), Protocol::V5);
    // Level 7, flags 0: payload 00 00 00 reads as 5 only (no properties, empty client
    // id; as 3.1.1 one byte is left over), 00 00 as 3.1.1 only (empty client id; as 5 the
    // client id length is missing).
    assert_eq!(
        form(
            connect(&frame(0x10, "00044d5154540700003c 000000"))
                .await
                .unwrap_err()
        ),
        Protocol::V5
    );
    assert_eq!(
        form(
            connect(&frame(0x10, "00044d5154540700003c 0000"))
                .await
                .unwrap_err()
        ),
        Protocol::V311
    );
}
