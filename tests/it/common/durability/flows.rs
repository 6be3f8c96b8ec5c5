//! The two sides of the kill -9 streams: a publisher that records exactly which numbered
//! messages the broker acknowledged, and a subscriber that follows the MQTT receiver rules
//! (a QoS 2 PUBLISH whose packet id awaits its PUBREL is a duplicate) across reconnects.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;

use tokio::sync::mpsc;

use crate::common::coretests::raw::{
    raw_ack, raw_publish_flags, Pkt, Raw, RawConnect, PUBACK, PUBCOMP, PUBREC, PUBREL,
};
use crate::common::coretests::V;
use crate::common::Client;

/// The payload that ends a drain: published after everything else on the same topic, so
/// when it arrives, everything queued before it has arrived.
pub const MARKER: &[u8] = b"marker";

/// A message number as its payload.
pub fn payload(n: u32) -> Vec<u8> {
    n.to_string().into_bytes()
}

/// Connects (MQTT 3.1.1, clean session) and writes one PUBLISH per number at once
/// (packet id = index + 1), then reads the acknowledgements: each PUBACK, or each PUBREC
/// (answered with PUBREL), sends its message number on `acked`. Ends when every exchange is
/// complete or the broker goes away; a broker killed before CONNACK is not an error.
pub async fn publish_numbers(
    client: Client,
    addr: SocketAddr,
    client_id: String,
    topic: String,
    qos: u8,
    numbers: Vec<u32>,
    acked: mpsc::UnboundedSender<u32>,
) {
    let connect = RawConnect {
        clean: true,
        ..RawConnect::new(V::V4, &client_id)
    }
    .bytes();
    let mut raw = match Raw::try_connect(&client, addr, &connect).await {
        Ok((raw, Pkt::ConnAck { code: 0, .. })) => raw,
        Ok((_, other)) => panic!("{client_id}: expected CONNACK success, got {other:?}"),
        Err(_) => return,
    };
    let mut burst = Vec::new();
    for (i, n) in numbers.iter().enumerate() {
        burst.extend(raw_publish_flags(
            V::V4,
            &topic,
            &payload(*n),
            qos,
            i as u16 + 1,
            false,
            false,
        ));
    }
    if raw.try_send(&burst).await.is_err() {
        return;
    }
    let number = |pkid: u16| numbers[usize::from(pkid) - 1];
    let mut open = numbers.len();
    while open > 0 {
        let Some(p) = raw.recv_or_closed().await else {
            return;
        };
        match p {
            Pkt::Ack {
                kind: PUBACK,
                pkid,
                reason: 0,
            } if qos == 1 => {
                let _ = acked.send(number(pkid));
                open -= 1;
            }
            Pkt::Ack {
                kind: PUBREC,
                pkid,
                reason: 0,
            } if qos == 2 => {
                let _ = acked.send(number(pkid));
                if raw.try_send(&raw_ack(PUBREL, pkid)).await.is_err() {
                    return;
                }
            }
            Pkt::Ack { kind: PUBCOMP, .. } if qos == 2 => open -= 1,
            other => panic!("{client_id}: unexpected {other:?}"),
        }
    }
}

/// A subscriber's client-side session state, kept across its connections.
#[derive(Debug, Default)]
pub struct Receiver {
    /// QoS 2 packet ids received whose PUBREL has not come yet.
    pending: HashSet<u16>,
    /// How many times each message number was received as a new message.
    pub got: BTreeMap<u32, usize>,
    /// QoS 2 redeliveries recognised as duplicates (DUP, id still pending).
    pub duplicates_recognised: usize,
}

impl Receiver {
    /// Reads and acknowledges packets until the [`MARKER`] arrives (Ok(true)) or `stop_after`
    /// new messages were received on this connection (Ok(false)); Err when the connection
    /// ends or stalls first.
    pub async fn run(&mut self, s: &mut Raw, stop_after: Option<usize>) -> Result<bool, String> {
        let mut new = 0;
        loop {
            if stop_after.is_some_and(|m| new >= m) {
                return Ok(false);
            }
            match s.try_recv().await? {
                Pkt::Publish {
                    qos,
                    pkid,
                    dup,
                    payload,
                    ..
                } => {
                    let fresh = match qos {
                        0 => true,
                        1 => {
                            s.try_send(&raw_ack(PUBACK, pkid)).await?;
                            true
                        }
                        _ => {
                            let fresh = self.pending.insert(pkid);
                            if !fresh {
                                if !dup {
                                    return Err(format!(
                                        "QoS 2 PUBLISH {pkid} resent while pending, without DUP"
                                    ));
                                }
                                self.duplicates_recognised += 1;
                            }
                            s.try_send(&raw_ack(PUBREC, pkid)).await?;
                            fresh
                        }
                    };
                    if !fresh {
                        continue;
                    }
                    if payload == MARKER {
                        return Ok(true);
                    }
                    let text = String::from_utf8_lossy(&payload).into_owned();
                    let n = text
                        .parse::<u32>()
                        .map_err(|e| format!("payload {text:?}: {e}"))?;
                    *self.got.entry(n).or_default() += 1;
                    new += 1;
                }
                Pkt::Ack {
                    kind: PUBREL, pkid, ..
                } => {
                    self.pending.remove(&pkid);
                    s.try_send(&raw_ack(PUBCOMP, pkid)).await?;
                }
                other => return Err(format!("unexpected {other:?}")),
            }
        }
    }
}
