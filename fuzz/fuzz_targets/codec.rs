//! Arbitrary bytes as the stream of one connection: the reader must never panic, never wait
//! on a stream that has ended, and whatever it decodes must encode without panicking; encoded
//! within a peer's Maximum Packet Size (the same limit), it must fit or be refused whole, and
//! `encoded_len` must say what `encode` writes.

#![no_main]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Waker};

use bytes::BytesMut;
use certmq::mqtt::codec::{encode, encode_within, encoded_len, PacketReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the packet size limit, so that the limit itself is exercised.
    let Some((&limit, wire)) = data.split_first() else {
        return;
    };
    let max_packet_size = 2 + usize::from(limit) * 64;
    run_to_completion(read_everything(wire, max_packet_size));
});

async fn read_everything(wire: &[u8], max_packet_size: usize) {
    let mut reader = PacketReader::new(wire, max_packet_size);
    if reader.read_connect().await.is_err() {
        return;
    }
    let mut out = BytesMut::new();
    while let Ok(packet) = reader.read_packet().await {
        out.clear();
        // An encoding error is a refusal, not a bug; a panic is a bug.
        if let Ok(written) = encode(&packet, &mut out) {
            assert_eq!(encoded_len(&packet), written, "encoded_len of {packet:?}");
        }
        out.clear();
        match encode_within(&packet, Some(max_packet_size), &mut out) {
            Ok(written) => {
                assert_eq!(written, out.len());
                assert!(written <= max_packet_size, "{written} > {max_packet_size}");
            }
            Err(_) => assert!(out.is_empty(), "a refused packet left bytes behind"),
        }
    }
}

/// Polls once: reading from a byte slice is always ready, so a pending future would mean the
/// reader waits for something that can never come.
fn run_to_completion(future: impl Future<Output = ()>) {
    let mut future = pin!(future);
    let mut context = Context::from_waker(Waker::noop());
    assert!(
        future.as_mut().poll(&mut context).is_ready(),
        "the reader waited on a byte slice"
    );
}
