//! The reader over a live stream (`tokio::io::duplex`): how bytes arrive, when the reader
//! gives up, and what a hostile peer can make it buffer.

use std::time::Duration;

use tokio::io::{duplex, AsyncWriteExt, DuplexStream};

use super::tests::{hex, V311_CONNECT, V5_CONNECT};
use super::*;

const PUBLISH: &str = "3016000f646576696365732f6465762d312f7468656c6c6f";
const MAX: usize = 1 << 20;

/// A reader on one end of a pipe, the peer's writing end, with room for big writes.
fn pipe(max_packet_size: usize) -> (PacketReader<DuplexStream>, DuplexStream) {
    let (ours, theirs) = duplex(1 << 16);
    (PacketReader::new(ours, max_packet_size), theirs)
}

/// Fails the test instead of hanging when the reader waits where it should have answered.
async fn soon<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), future)
        .await
        .expect("the reader is stuck")
}

async fn connected(connect: &str) -> (PacketReader<DuplexStream>, DuplexStream) {
    let (mut reader, mut peer) = pipe(MAX);
    peer.write_all(&hex(connect)).await.unwrap();
    soon(reader.read_connect()).await.unwrap();
    (reader, peer)
}

async fn error_after_connect(connect: &str, bytes: &str) -> CodecError {
    let (mut reader, mut peer) = connected(connect).await;
    peer.write_all(&hex(bytes)).await.unwrap();
    soon(reader.read_packet()).await.unwrap_err()
}

async fn connect_error(bytes: &[u8]) -> CodecError {
    let (mut reader, mut peer) = pipe(MAX);
    peer.write_all(bytes).await.unwrap();
    soon(reader.read_connect()).await.unwrap_err()
}

#[tokio::test]
async fn packets_split_byte_by_byte() {
    let (mut reader, mut peer) = pipe(MAX);
    let bytes = [hex(V311_CONNECT), hex(PUBLISH)].concat();
    let writer = tokio::spawn(async move {
        for byte in bytes {
            peer.write_all(&[byte]).await.unwrap();
            tokio::task::yield_now().await;
        }
        peer
    });
    assert!(matches!(
        soon(reader.read_connect()).await.unwrap(),
        Connect::V311(_)
    ));
    assert_eq!(reader.protocol(), Some(Protocol::V311));
    let Packet::V311(v4::Packet::Publish(publish)) = soon(reader.read_packet()).await.unwrap()
    else {
        panic!("not a PUBLISH");
    };
    assert_eq!(&publish.payload[..], b"hello");
    drop(writer.await.unwrap());
    assert!(matches!(
        soon(reader.read_packet()).await,
        Err(CodecError::Closed)
    ));
}

#[tokio::test]
async fn several_packets_in_one_read() {
    let (mut reader, mut peer) = pipe(MAX);
    let v5_publish = hex("3017000f646576696365732f6465762d312f740068656c6c6f");
    let bytes = [hex(V5_CONNECT), v5_publish, hex("c000"), hex("e000")].concat();
    peer.write_all(&bytes).await.unwrap();
    drop(peer);
    assert!(matches!(
        soon(reader.read_connect()).await.unwrap(),
        Connect::V5 { .. }
    ));
    assert!(matches!(
        soon(reader.read_packet()).await.unwrap(),
        Packet::V5(v5::Packet::Publish(_))
    ));
    assert!(matches!(
        soon(reader.read_packet()).await.unwrap(),
        Packet::V5(v5::Packet::PingReq(_))
    ));
    assert!(matches!(
        soon(reader.read_packet()).await.unwrap(),
        Packet::V5(v5::Packet::Disconnect(_))
    ));
    assert!(matches!(
        soon(reader.read_packet()).await,
        Err(CodecError::Closed)
    ));
}

#[tokio::test]
async fn a_256_mb_header_is_refused_from_five_bytes() {
    // The peer keeps the stream open: the answer must come from the header alone.
    let (mut reader, mut peer) = connected(V311_CONNECT).await;
    peer.write_all(&hex("30ffffff7f")).await.unwrap();
    let error = soon(reader.read_packet()).await.unwrap_err();
    assert!(
        matches!(
            error,
            CodecError::PacketTooLarge {
                size: 268_435_460,
                max: MAX
            }
        ),
        "{error:?}"
    );
    assert_eq!(error.v5_reason_code(), 0x95);
    assert!(
        reader.buf.capacity() <= 2 * READ_CHUNK,
        "{}",
        reader.buf.capacity()
    );

    let (mut reader, mut peer) = pipe(MAX);
    peer.write_all(&hex("10ffffff7f")).await.unwrap();
    let error = soon(reader.read_connect()).await.unwrap_err();
    assert!(
        matches!(error, CodecError::PacketTooLarge { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn max_packet_size_counts_the_fixed_header() {
    // 20-byte limit: remaining length 18 + 2 header bytes fits, 19 does not.
    let fits = "3012 0003612f62 0102030405060708090a0b0c0d";
    let too_big = "3013 0003612f62 0102030405060708090a0b0c0d0e";
    let connect = hex(V311_CONNECT);
    // The 25-byte CONNECT fits a limit of exactly 25.
    let mut reader = PacketReader::new(&connect[..], 25);
    reader.read_connect().await.unwrap();
    reader.max_packet_size = 20;
    reader.buf.extend_from_slice(&hex(fits));
    assert!(reader.read_packet().await.is_ok());
    reader.buf.extend_from_slice(&hex(too_big));
    let error = reader.read_packet().await.unwrap_err();
    assert!(
        matches!(error, CodecError::PacketTooLarge { size: 21, max: 20 }),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_claimed_length_is_not_reserved_ahead() {
    let (mut reader, mut peer) = connected(V311_CONNECT).await;
    // Claims 1 MB minus a little, within the limit, then sends 10 bytes and stalls.
    peer.write_all(&hex("30f0ff3f 0003612f62 0102030405"))
        .await
        .unwrap();
    let stalled = tokio::time::timeout(Duration::from_millis(50), reader.read_packet()).await;
    assert!(stalled.is_err(), "{stalled:?}");
    assert!(
        reader.buf.capacity() <= 2 * READ_CHUNK,
        "{}",
        reader.buf.capacity()
    );
}

#[tokio::test]
async fn a_fifth_remaining_length_byte_is_malformed() {
    let error = error_after_connect(V311_CONNECT, "30ffffffff").await;
    assert!(
        matches!(error, CodecError::Malformed(Malformed::RemainingLength)),
        "{error:?}"
    );
    assert_eq!(error.v5_reason_code(), 0x81);
    let error = error_after_connect(V5_CONNECT, "30ffffff8001").await;
    assert!(
        matches!(error, CodecError::Malformed(Malformed::RemainingLength)),
        "{error:?}"
    );
}

#[tokio::test]
async fn end_of_stream_inside_and_between_packets() {
    let (mut reader, mut peer) = pipe(MAX);
    peer.write_all(&hex(&V311_CONNECT[..20])).await.unwrap();
    drop(peer);
    assert!(matches!(
        soon(reader.read_connect()).await,
        Err(CodecError::TruncatedPacket)
    ));

    let (mut reader, peer) = pipe(MAX);
    drop(peer);
    assert!(matches!(
        soon(reader.read_connect()).await,
        Err(CodecError::Closed)
    ));

    let (mut reader, mut peer) = connected(V5_CONNECT).await;
    peer.write_all(&hex("30")).await.unwrap();
    drop(peer);
    assert!(matches!(
        soon(reader.read_packet()).await,
        Err(CodecError::TruncatedPacket)
    ));

    let (mut reader, peer) = connected(V5_CONNECT).await;
    drop(peer);
    assert!(matches!(
        soon(reader.read_packet()).await,
        Err(CodecError::Closed)
    ));
}

#[tokio::test]
async fn garbage_first_packet_is_refused_at_once() {
    let error = connect_error(b"GET / HTTP/1.1\r\n").await;
    assert!(matches!(error, CodecError::NotConnect), "{error:?}");
    assert_eq!(error.v5_reason_code(), 0x82);
    assert!(matches!(
        connect_error(&hex("c000")).await,
        CodecError::NotConnect
    ));
    // CONNECT with flags (a TLS record, 0x16, reads as one), or an unknown protocol name.
    let error = connect_error(&hex("1603")).await;
    assert!(
        matches!(
            error,
            CodecError::Malformed(Malformed::ReservedFlags {
                packet_type: 1,
                flags: 6
            })
        ),
        "{error:?}"
    );
    let error = connect_error(&hex("100c 0004 58595a57 04 02 003c 0000")).await;
    assert!(
        matches!(error, CodecError::Malformed(Malformed::ProtocolName(ref name)) if name == "XYZW"),
        "{error:?}"
    );
    let error = connect_error(&hex("1003 0004 4d")).await;
    assert!(
        matches!(error, CodecError::Malformed(Malformed::ConnectHeader)),
        "{error:?}"
    );
}

#[tokio::test]
async fn second_connect_is_a_protocol_error() {
    let error = error_after_connect(V311_CONNECT, V311_CONNECT).await;
    assert!(matches!(error, CodecError::UnexpectedConnect), "{error:?}");
    assert_eq!(error.v5_reason_code(), 0x82);
    // Decided from the first byte: no need for the rest.
    assert!(matches!(
        error_after_connect(V5_CONNECT, "10").await,
        CodecError::UnexpectedConnect
    ));
}

#[tokio::test]
async fn mqtt_3_1_and_unknown_levels_are_unsupported() {
    // mosquitto_pub -V mqttv31
    let error = connect_error(&hex("101800064d51497364700302003c000a6f6c642d636c69656e74")).await;
    let CodecError::UnsupportedProtocol { name, level, .. } = &error else {
        panic!("{error:?}")
    };
    assert_eq!((name.as_str(), *level), ("MQIsdp", 3));
    assert_eq!(error.v5_reason_code(), 0x84);

    let level_6 = hex("101700044d5154540602003c000b636572746d712d76333131");
    let error = connect_error(&level_6).await;
    let CodecError::UnsupportedProtocol { name, level, .. } = &error else {
        panic!("{error:?}")
    };
    assert_eq!((name.as_str(), *level), ("MQTT", 6));
}

#[tokio::test]
async fn connect_flags_mqttbytes_ignores() {
    // Reserved bit 0 set (flags 0x03).
    let error = connect_error(&hex("101700044d5154540403003c000b636572746d712d76333131")).await;
    assert!(
        matches!(error, CodecError::Malformed(Malformed::ReservedConnectFlag)),
        "{error:?}"
    );
    // 3.1.1: password flag without user name flag (flags 0x42), password "p".
    let error = connect_error(&hex("100f00044d5154540442003c0000 0001 70")).await;
    assert!(
        matches!(
            error,
            CodecError::Malformed(Malformed::PasswordWithoutUserName)
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn reserved_flag_bits_are_malformed() {
    for (connect, packet) in [
        (
            V311_CONNECT,
            "82100001000b646576696365732f2b2f7401".replacen("82", "80", 1),
        ),
        (V311_CONNECT, "60020001".to_string()),
        (
            V311_CONNECT,
            "a30f0002000b646576696365732f2b2f74".to_string(),
        ),
        (V311_CONNECT, "c100".to_string()),
        (V5_CONNECT, "e100".to_string()),
        (V5_CONNECT, "42020001".to_string()),
    ] {
        let error = error_after_connect(connect, &packet).await;
        assert!(
            matches!(
                error,
                CodecError::Malformed(Malformed::ReservedFlags { .. })
            ),
            "{packet}: {error:?}"
        );
    }
    let error = error_after_connect(V311_CONNECT, "f000").await;
    assert!(
        matches!(
            error,
            CodecError::Malformed(Malformed::ReservedPacketType(15))
        ),
        "{error:?}"
    );
    let error = error_after_connect(V5_CONNECT, "0000").await;
    assert!(
        matches!(
            error,
            CodecError::Malformed(Malformed::ReservedPacketType(0))
        ),
        "{error:?}"
    );
    // QoS 3 PUBLISH: left to mqttbytes-ng.
    let error = error_after_connect(V311_CONNECT, "3605 0001 61 0001").await;
    assert!(
        matches!(error, CodecError::Malformed(Malformed::Decode(_))),
        "{error:?}"
    );
}

#[tokio::test]
async fn other_malformed_packets() {
    let cases = [
        // Reserved subscription option bits: 3.1.1 bit 2, MQTT 5 bit 6.
        (V311_CONNECT, "8206 0001 0001 61 05"),
        (V5_CONNECT, "8207 0001 00 0001 61 41"),
        // UNSUBSCRIBE without filters.
        (V311_CONNECT, "a202 0001"),
        (V5_CONNECT, "a203 0001 00"),
        // Fixed lengths: 3.1.1 PUBACK of 3 bytes, PINGREQ with a body.
        (V311_CONNECT, "4003 0001 00"),
        (V5_CONNECT, "c001 00"),
        // MQTT 5 PUBLISH topic that is not UTF-8.
        (V5_CONNECT, "3005 0002 ff fe 00"),
        // A string running past the end of the packet.
        (V311_CONNECT, "3003 0009 61"),
    ];
    for (connect, packet) in cases {
        let error = error_after_connect(connect, packet).await;
        assert!(
            matches!(error, CodecError::Malformed(_)),
            "{packet}: {error:?}"
        );
    }
}

#[tokio::test]
async fn v5_will_topic_must_be_utf8() {
    // Will flag, QoS 0; will properties 0, topic ff, payload empty.
    let error = connect_error(&hex("101300044d5154540506003c00 0000 00 0001ff 0000")).await;
    assert!(
        matches!(error, CodecError::Malformed(Malformed::TopicNotUtf8(_))),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_cancelled_read_loses_no_bytes() {
    let (mut reader, mut peer) = connected(V311_CONNECT).await;
    let publish = hex(PUBLISH);
    let (first, second) = publish.split_at(9);
    peer.write_all(first).await.unwrap();
    tokio::select! {
        packet = reader.read_packet() => panic!("half a packet decoded: {packet:?}"),
        () = tokio::time::sleep(Duration::from_millis(20)) => {}
    }
    peer.write_all(second).await.unwrap();
    let Packet::V311(v4::Packet::Publish(publish)) = soon(reader.read_packet()).await.unwrap()
    else {
        panic!("not a PUBLISH");
    };
    assert_eq!(publish.topic, "devices/dev-1/t");
}

#[tokio::test]
async fn reader_used_out_of_order() {
    let (mut reader, _peer) = pipe(MAX);
    assert!(matches!(
        reader.read_packet().await,
        Err(CodecError::OutOfOrder)
    ));
    let (mut reader, _peer) = connected(V5_CONNECT).await;
    assert!(matches!(
        reader.read_connect().await,
        Err(CodecError::OutOfOrder)
    ));
    assert_eq!(reader.protocol(), Some(Protocol::V5));
}

#[tokio::test]
async fn decoded_payloads_do_not_share_the_read_buffer() {
    let (mut reader, mut peer) = connected(V311_CONNECT).await;
    peer.write_all(&[hex(PUBLISH), hex(PUBLISH)].concat())
        .await
        .unwrap();
    let Packet::V311(v4::Packet::Publish(publish)) = soon(reader.read_packet()).await.unwrap()
    else {
        panic!("not a PUBLISH");
    };
    // Sharing the read buffer's allocation would make the payload not unique.
    assert!(!reader.buf.is_empty());
    assert!(publish.payload.is_unique());
}
