//! One connection after CONNACK.
//!
//! Scope today (issue 2, the authenticated front door): keep alive enforced at 1.5 times
//! the effective value, PINGREQ answered, DISCONNECT honoured, graceful shutdown announced
//! to MQTT 5 clients (0x8B). Any other packet closes the connection with an MQTT 5
//! DISCONNECT 0x83 (implementation specific error) and a reason string saying publish and
//! subscribe are not available yet: refused clearly, never silently dropped. The session
//! and router of SPEC 4-6 replace this.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::{send, WriteError};
use crate::mqtt::codec::{v4, v5, CodecError, Packet, PacketReader, Protocol};

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum End {
    #[error("client sent DISCONNECT")]
    Disconnect,
    #[error("keep alive expired: no packet for {0:?}")]
    KeepAlive(Duration),
    #[error("broker shutting down")]
    Shutdown,
    #[error("connection closed")]
    Closed(#[source] CodecError),
    #[error("packet not supported yet: {0}")]
    Unsupported(&'static str),
    #[error("write failed")]
    Write(#[source] WriteError),
}

/// Runs the session until it ends. `keep_alive` is the effective value in seconds.
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut PacketReader<S>,
    protocol: Protocol,
    keep_alive: u16,
    shutdown: &CancellationToken,
    write_limit: Duration,
) -> End {
    // MQTT 3.1.1 §3.1.2.10 / 5.0 §3.1.2.10: one and a half times the keep alive.
    let idle_limit = Duration::from_millis(u64::from(keep_alive) * 1500);
    loop {
        let packet = tokio::select! {
            _ = shutdown.cancelled() => {
                if protocol == Protocol::V5 {
                    let bye = disconnect_v5(v5::DisconnectReasonCode::ServerShuttingDown, "server shutting down");
                    let _ = send(conn.get_mut(), &bye, write_limit).await;
                }
                return End::Shutdown;
            }
            r = tokio::time::timeout(idle_limit, conn.read_packet()) => match r {
                Err(_) => {
                    if protocol == Protocol::V5 {
                        let bye = disconnect_v5(v5::DisconnectReasonCode::KeepAliveTimeout, "keep alive timeout");
                        let _ = send(conn.get_mut(), &bye, write_limit).await;
                    }
                    return End::KeepAlive(idle_limit);
                }
                Ok(Err(e)) => {
                    if protocol == Protocol::V5 && !matches!(e, CodecError::Closed | CodecError::Io(_) | CodecError::TruncatedPacket) {
                        let bye = disconnect_v5_code(e.v5_reason_code(), &e.to_string());
                        let _ = send(conn.get_mut(), &bye, write_limit).await;
                    }
                    return End::Closed(e);
                }
                Ok(Ok(p)) => p,
            },
        };
        match packet {
            Packet::V311(v4::Packet::PingReq) => {
                if let Err(e) = send(
                    conn.get_mut(),
                    &Packet::V311(v4::Packet::PingResp),
                    write_limit,
                )
                .await
                {
                    return End::Write(e);
                }
            }
            Packet::V5(v5::Packet::PingReq(_)) => {
                let pong = Packet::V5(v5::Packet::PingResp(v5::PingResp));
                if let Err(e) = send(conn.get_mut(), &pong, write_limit).await {
                    return End::Write(e);
                }
            }
            Packet::V311(v4::Packet::Disconnect) | Packet::V5(v5::Packet::Disconnect(_)) => {
                return End::Disconnect;
            }
            other => {
                let what = packet_name(&other);
                if protocol == Protocol::V5 {
                    let bye = disconnect_v5(
                        v5::DisconnectReasonCode::ImplementationSpecificError,
                        "this broker does not route messages yet: only PINGREQ and DISCONNECT are served",
                    );
                    let _ = send(conn.get_mut(), &bye, write_limit).await;
                }
                return End::Unsupported(what);
            }
        }
    }
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::V311(v4::Packet::Publish(_)) | Packet::V5(v5::Packet::Publish(_)) => "PUBLISH",
        Packet::V311(v4::Packet::Subscribe(_)) | Packet::V5(v5::Packet::Subscribe(_)) => {
            "SUBSCRIBE"
        }
        Packet::V311(v4::Packet::Unsubscribe(_)) | Packet::V5(v5::Packet::Unsubscribe(_)) => {
            "UNSUBSCRIBE"
        }
        _ => "unexpected packet",
    }
}

/// An MQTT 5 DISCONNECT with a reason string.
pub fn disconnect_v5(code: v5::DisconnectReasonCode, reason: &str) -> Packet {
    Packet::V5(v5::Packet::Disconnect(v5::Disconnect {
        reason_code: code,
        properties: Some(v5::DisconnectProperties {
            session_expiry_interval: None,
            reason_string: Some(reason.to_owned()),
            user_properties: Vec::new(),
            server_reference: None,
        }),
    }))
}

/// An MQTT 5 DISCONNECT from a numeric reason code (codec errors carry numbers).
fn disconnect_v5_code(code: u8, reason: &str) -> Packet {
    use v5::DisconnectReasonCode as D;
    let code = match code {
        0x81 => D::MalformedPacket,
        0x82 => D::ProtocolError,
        0x95 => D::PacketTooLarge,
        0x83 => D::ImplementationSpecificError,
        _ => D::UnspecifiedError,
    };
    disconnect_v5(code, reason)
}
