//! From an authenticated TLS stream to an MQTT session.
//!
//! - [`connect`]: CONNECT -> admission -> CONNACK, client identifier rules (SPEC 3, 4).
//! - [`session`]: the connection after CONNACK: keep alive, PINGREQ, DISCONNECT, shutdown.
//!
//! Every outcome of the protocol is mapped to return/reason codes here and only here.

pub mod connect;
pub mod session;

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::mqtt::codec::{self, CodecError, Packet};

/// Why writing to a client failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot encode the packet")]
    Encode(#[source] CodecError),
    #[error("writing to the client failed")]
    Io(#[source] std::io::Error),
    /// SPEC 9: a client that does not read cannot hold a task forever.
    #[error("the client did not read for {0:?}")]
    Timeout(Duration),
}

/// Writes one packet and flushes, bounded by `limit`.
pub async fn send<W: AsyncWrite + Unpin>(
    out: &mut W,
    packet: &Packet,
    limit: Duration,
) -> Result<(), WriteError> {
    let mut buf = BytesMut::with_capacity(64);
    codec::encode(packet, &mut buf).map_err(WriteError::Encode)?;
    let write = async {
        out.write_all(&buf).await?;
        out.flush().await
    };
    match tokio::time::timeout(limit, write).await {
        Ok(r) => r.map_err(WriteError::Io),
        Err(_) => Err(WriteError::Timeout(limit)),
    }
}
