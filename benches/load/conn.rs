//! One MQTT 3.1.1 connection over TCP + TLS, with every wait on the broker bounded.
//!
//! Why one small type for every workload: the connect figure must include exactly what a
//! device does (TCP, full mTLS handshake, CONNECT, CONNACK), and the flows and idle
//! connections must be opened the same way so that their setup is comparable too.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::cli::Args;
use super::creds::Identity;
use super::mqtt::{self, Decoder, Packet};
use super::{resolve, LoadError};

/// Keep alive asked for in CONNECT. Long enough that a flow never needs a PINGREQ; idle
/// connections ping at half of it.
pub const KEEP_ALIVE_S: u16 = 60;

/// Where to connect and how long to wait for anything.
pub struct Target {
    pub addr: SocketAddr,
    pub server_name: ServerName<'static>,
    pub timeout: Duration,
    /// Local addresses connections are made from, in turn; empty: the kernel's choice.
    pub sources: Vec<IpAddr>,
    next_source: AtomicUsize,
}

impl Target {
    /// The broker of the publishers (and of every connection of `connect` and `idle`).
    pub fn resolve(args: &Args) -> Result<Target, LoadError> {
        Target::at(&args.host, args.port, args)
    }

    /// The broker of the subscribers: `--sub-host`/`--sub-port` where given, else the
    /// publishers' (one broker, or one cluster node for both sides).
    pub fn resolve_sub(args: &Args) -> Result<Target, LoadError> {
        let host = args.sub_host.as_deref().unwrap_or(&args.host);
        Target::at(host, args.sub_port.unwrap_or(args.port), args)
    }

    fn at(host: &str, port: u16, args: &Args) -> Result<Target, LoadError> {
        let addr = resolve(host, port)?;
        let name = args.server_name.clone().unwrap_or_else(|| host.to_owned());
        let server_name = ServerName::try_from(name.clone())
            .map_err(|source| LoadError::ServerName { name, source })?;
        Ok(Target {
            addr,
            server_name,
            timeout: args.timeout,
            sources: args.source_addrs.clone(),
            next_source: AtomicUsize::new(0),
        })
    }

    /// A TCP connection to the broker, from the next source address if any were given
    /// (bound to port 0: the kernel picks a free port of that address).
    async fn tcp(&self) -> std::io::Result<TcpStream> {
        if self.sources.is_empty() {
            return TcpStream::connect(self.addr).await;
        }
        let i = self.next_source.fetch_add(1, Ordering::Relaxed) % self.sources.len();
        let source = SocketAddr::new(self.sources[i], 0);
        let socket = match source {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.bind(source)?;
        socket.connect(self.addr).await
    }

    /// Awaits `fut` for at most the target's timeout.
    pub async fn bounded<T>(
        &self,
        what: &'static str,
        fut: impl Future<Output = Result<T, LoadError>>,
    ) -> Result<T, LoadError> {
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_elapsed| LoadError::Timeout {
                what,
                after: self.timeout,
            })?
    }
}

/// An open, accepted MQTT connection.
pub struct Conn {
    pub stream: TlsStream<TcpStream>,
    pub decoder: Decoder,
}

impl Conn {
    /// TCP (no Nagle), TLS with `identity`, CONNECT (clean session), CONNACK 0.
    pub async fn open(
        target: &Target,
        identity: &Identity,
        client_id: &str,
    ) -> Result<Conn, LoadError> {
        Conn::open_with(target, identity, client_id, true).await
    }

    /// The same with the clean-session flag given: `false` makes a persistent session,
    /// whose QoS 1 messages a durable broker must store before acknowledging them.
    pub async fn open_with(
        target: &Target,
        identity: &Identity,
        client_id: &str,
        clean: bool,
    ) -> Result<Conn, LoadError> {
        let tcp = target
            .bounded("TCP connect", async {
                target.tcp().await.map_err(|source| LoadError::Io {
                    what: "TCP connect",
                    source,
                })
            })
            .await?;
        tcp.set_nodelay(true).map_err(|source| LoadError::Io {
            what: "set TCP_NODELAY",
            source,
        })?;
        let connector = TlsConnector::from(identity.tls.clone());
        let stream = target
            .bounded("the TLS handshake", async {
                connector
                    .connect(target.server_name.clone(), tcp)
                    .await
                    .map_err(|source| LoadError::Io {
                        what: "TLS handshake",
                        source,
                    })
            })
            .await?;
        let mut conn = Conn {
            stream,
            decoder: Decoder::new(),
        };
        let mut out = Vec::with_capacity(64);
        mqtt::connect(&mut out, client_id, KEEP_ALIVE_S, clean);
        conn.write(target, &out).await?;
        match conn.next(target, "CONNACK").await? {
            Packet::ConnAck { code: 0 } => Ok(conn),
            Packet::ConnAck { code } => Err(LoadError::Refused { code }),
            other => Err(LoadError::Unexpected {
                expected: "CONNACK",
                got: format!("{other:?}"),
            }),
        }
    }

    /// Writes and flushes `bytes` (one or more encoded packets).
    pub async fn write(&mut self, target: &Target, bytes: &[u8]) -> Result<(), LoadError> {
        write_bounded(target, &mut self.stream, bytes).await
    }

    /// The next packet from the broker.
    pub async fn next(&mut self, target: &Target, what: &'static str) -> Result<Packet, LoadError> {
        target
            .bounded(what, async {
                loop {
                    if let Some(p) = self.decoder.next()? {
                        return Ok(p);
                    }
                    self.fill(what).await?;
                }
            })
            .await
    }

    /// Reads once into the decoder (no timeout: callers bound or cancel it).
    pub async fn fill(&mut self, what: &'static str) -> Result<(), LoadError> {
        let n = self
            .stream
            .read_buf(self.decoder.buffer())
            .await
            .map_err(|source| LoadError::Io { what, source })?;
        if n == 0 {
            return Err(LoadError::Closed { what });
        }
        Ok(())
    }

    /// SUBSCRIBE to `filter` and wait for a granting SUBACK.
    pub async fn subscribe(
        &mut self,
        target: &Target,
        filter: &str,
        qos: u8,
    ) -> Result<(), LoadError> {
        let mut out = Vec::with_capacity(16 + filter.len());
        mqtt::subscribe(&mut out, 1, filter, qos);
        self.write(target, &out).await?;
        match self.next(target, "SUBACK").await? {
            Packet::SubAck { codes, .. } => match codes.first() {
                Some(&code) if code <= 2 => Ok(()),
                other => Err(LoadError::SubscribeRefused {
                    filter: filter.to_owned(),
                    code: other.copied().unwrap_or(0x80),
                }),
            },
            other => Err(LoadError::Unexpected {
                expected: "SUBACK",
                got: format!("{other:?}"),
            }),
        }
    }

    /// DISCONNECT, then close TLS (close_notify) and TCP.
    pub async fn close(mut self, target: &Target) -> Result<(), LoadError> {
        let mut out = Vec::with_capacity(2);
        mqtt::disconnect(&mut out);
        self.write(target, &out).await?;
        target
            .bounded("closing", io("shutdown", self.stream.shutdown()))
            .await
    }
}

/// Writes and flushes `bytes` to any half of a stream, bounded by the target's timeout: a
/// broker that stops reading must fail the run, not hang it.
pub async fn write_bounded<W: AsyncWrite + Unpin>(
    target: &Target,
    w: &mut W,
    bytes: &[u8],
) -> Result<(), LoadError> {
    target
        .bounded(
            "a write",
            io("write", async {
                w.write_all(bytes).await?;
                w.flush().await
            }),
        )
        .await
}

/// Awaits an I/O future, naming what was done in its error.
async fn io<T>(
    what: &'static str,
    fut: impl Future<Output = std::io::Result<T>>,
) -> Result<T, LoadError> {
    fut.await.map_err(|source| LoadError::Io { what, source })
}
