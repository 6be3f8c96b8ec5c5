//! Shared test harness: a fixture PKI made with rcgen (via `certmq::pki`), a real broker
//! started in-process on 127.0.0.1:0, and real MQTT clients (rumqttc 3.1.1 and 5) over
//! mutual TLS. Each test gets its own temporary directory, PKI and data_dir, so tests run
//! in parallel.
#![allow(dead_code)]

pub mod cluster;
pub mod coretests;
pub mod crl_server;
pub mod durability;
pub mod hostile;
pub mod interop;
pub mod nats;
pub mod ops;
pub mod run;
pub mod v5tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use certmq::config::Config;
use certmq::metrics::Metrics;
use certmq::pki::{self, Ca, Issued, LeafSpec, Validity};
use certmq::server::Server;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

/// How long a test waits for any one network outcome before failing.
pub const WAIT: Duration = Duration::from_secs(15);

/// A directory with a root CA, a device intermediate (the usual anchor) and a server
/// certificate for localhost / 127.0.0.1 issued by the root.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub root: Ca,
    pub fleet: Ca,
    pub server: Issued,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = Ca::root("Test Root CA", Validity::days(-10, 3650)).expect("root");
        let fleet = root
            .intermediate("Test Fleet CA", Validity::days(-10, 3650), None)
            .expect("fleet");
        let server = root
            .issue(&LeafSpec::server(
                &["localhost"],
                &["127.0.0.1".parse().unwrap()],
            ))
            .expect("server");
        let fx = Fixture {
            dir,
            root,
            fleet,
            server,
        };
        fx.write("server.pem", &fx.server.cert_pem);
        fx.write("server.key", &fx.server.key_pem);
        fx.write("root.pem", &fx.root.cert_pem());
        fx.write("fleet.pem", &fx.fleet.cert_pem());
        fx
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, contents).expect("write fixture file");
        p
    }

    pub fn data_dir(&self) -> PathBuf {
        self.path("data")
    }

    /// Writes `certmq.toml` with the fixture's [server] section and `body` after it.
    pub fn config(&self, body: &str) -> PathBuf {
        let text = format!(
            "[server]\nbind = \"127.0.0.1:0\"\ncert_chain = \"server.pem\"\nprivate_key = \"server.key\"\ndata_dir = \"data\"\n\n[limits]\nhandshake_timeout = 5\nconnect_timeout = 5\n\n{body}\n"
        );
        self.write("certmq.toml", &text)
    }

    /// The usual anchor section: the fleet intermediate, ThingsBoard-style regex.
    pub fn fleet_anchor(create: bool) -> String {
        format!(
            "[[anchor]]\nname = \"fleet\"\ncertificate = \"fleet.pem\"\ncn_regex = '^(.+)\\.devices\\.example\\.com$'\ncreate_devices = {create}\n"
        )
    }

    /// A device certificate under the fleet CA with a CN.
    pub fn device(&self, cn: &str) -> Issued {
        self.fleet
            .issue(&LeafSpec::device(cn))
            .expect("device cert")
    }

    /// A fleet device certificate valid since yesterday and for `seconds` more only, and
    /// its notAfter (on a whole second: certificates carry no fractions).
    pub fn short_lived_device(&self, cn: &str, seconds: i64) -> (Issued, time::OffsetDateTime) {
        let now = time::OffsetDateTime::now_utc();
        let now = now - time::Duration::nanoseconds(i64::from(now.nanosecond()));
        let spec = LeafSpec {
            validity: Validity {
                not_before: now - time::Duration::days(1),
                not_after: now + time::Duration::seconds(seconds),
            },
            ..LeafSpec::device(cn)
        };
        let leaf = self.fleet.issue(&spec).expect("short-lived leaf");
        (leaf, spec.validity.not_after)
    }

    /// A client (chain PEM = leaf then the fleet intermediate).
    pub fn client_with_chain(&self, leaf: &Issued) -> Client {
        Client::new(self, &leaf.chain_pem(&[&self.fleet]), &leaf.key_pem)
    }

    /// A client that sends its leaf alone.
    pub fn client(&self, leaf: &Issued) -> Client {
        Client::new(self, &leaf.cert_pem, &leaf.key_pem)
    }
}

/// A broker running in this process.
pub struct Broker {
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Broker {
    pub async fn start(config: &Path) -> Broker {
        let config = Config::load(config).unwrap_or_else(|e| {
            panic!(
                "config: {e}: {:?}",
                e.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>()
            )
        });
        let server = Server::new(config).expect("server");
        let metrics = server.metrics();
        let listener = server.bind().await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            server.run(listener, token).await.expect("run");
        });
        Broker {
            addr,
            metrics,
            shutdown,
            task: Some(task),
        }
    }

    /// Graceful stop, waiting for the server to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT, t)
                .await
                .expect("stop in time")
                .expect("join");
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// What a connection attempt ended in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// CONNACK success.
    Accepted,
    /// CONNACK with this return code (3.1.1) or reason code (5).
    Refused(u8),
    /// The TLS handshake failed; the text is the client's error (names the alert).
    Tls(String),
}

impl Outcome {
    /// Asserts a TLS-level refusal whose error names `alert` (e.g. "UnknownCA").
    #[track_caller]
    pub fn assert_tls_alert(&self, alert: &str) {
        match self {
            Outcome::Tls(e) => assert!(e.contains(alert), "expected TLS alert {alert}, got: {e}"),
            other => panic!("expected TLS alert {alert}, got {other:?}"),
        }
    }
}

/// TLS client credentials trusting the fixture root.
#[derive(Clone)]
pub struct Client {
    pub tls: Arc<rustls::ClientConfig>,
}

impl Client {
    pub fn new(fx: &Fixture, chain_pem: &str, key_pem: &str) -> Client {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .expect("chain pem");
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key pem");
        Client::from_parts(fx, Some((chain, key)))
    }

    /// A client that sends no certificate at all.
    pub fn anonymous(fx: &Fixture) -> Client {
        Client::from_parts(fx, None)
    }

    fn from_parts(
        fx: &Fixture,
        auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Client {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(fx.root.cert_der()))
            .expect("root");
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
        let tls = match auth {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .expect("client auth"),
            None => builder.with_no_client_auth(),
        };
        Client { tls: Arc::new(tls) }
    }

    /// Connects with MQTT 3.1.1 and returns the outcome; on success the connection is
    /// closed with DISCONNECT.
    pub async fn connect_v4(&self, addr: SocketAddr, client_id: &str, clean: bool) -> Outcome {
        use rumqttc::{ConnectReturnCode as C, ConnectionError, Event, Packet};
        let mut opts = rumqttc::MqttOptions::new(client_id, "localhost", addr.port());
        opts.set_clean_session(clean);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(self.tls.clone()),
        ));
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 10);
        let outcome = tokio::time::timeout(WAIT, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        break if ack.code == C::Success {
                            Outcome::Accepted
                        } else {
                            Outcome::Refused(ack.code as u8)
                        };
                    }
                    Ok(_) => continue,
                    Err(ConnectionError::ConnectionRefused(code)) => {
                        break Outcome::Refused(code as u8)
                    }
                    Err(e) => break Outcome::Tls(format!("{e:?}")),
                }
            }
        })
        .await
        .expect("connect outcome in time");
        if outcome == Outcome::Accepted {
            let _ = client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), eventloop.poll()).await;
        }
        outcome
    }

    /// Connects with MQTT 5 and returns the outcome.
    pub async fn connect_v5(&self, addr: SocketAddr, client_id: &str) -> Outcome {
        use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as C, Packet};
        use rumqttc::v5::{ConnectionError, Event};
        let mut opts = rumqttc::v5::MqttOptions::new(client_id, "localhost", addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(self.tls.clone()),
        ));
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 10);
        let outcome = tokio::time::timeout(WAIT, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        break if ack.code == C::Success {
                            Outcome::Accepted
                        } else {
                            Outcome::Refused(v5_code(ack.code))
                        };
                    }
                    Ok(_) => continue,
                    Err(ConnectionError::ConnectionRefused(code)) => {
                        break Outcome::Refused(v5_code(code))
                    }
                    Err(e) => break Outcome::Tls(format!("{e:?}")),
                }
            }
        })
        .await
        .expect("connect outcome in time");
        if outcome == Outcome::Accepted {
            let _ = client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), eventloop.poll()).await;
        }
        outcome
    }
}

fn v5_code(c: rumqttc::v5::mqttbytes::v5::ConnectReturnCode) -> u8 {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C;
    match c {
        C::Success => 0,
        C::NotAuthorized => 0x87,
        C::ClientIdentifierNotValid => 0x85,
        C::ServerUnavailable => 0x88,
        C::BadUserNamePassword => 0x86,
        C::UnsupportedProtocolVersion => 0x84,
        other => panic!("unexpected v5 CONNACK code {other:?}"),
    }
}

/// Opens the fixture's registry (the broker may be running: SQLite WAL).
pub fn registry(fx: &Fixture) -> certmq::registry::Registry {
    certmq::registry::Registry::open(&fx.data_dir()).expect("registry")
}

/// Issues a self-signed device certificate with this CN.
pub fn self_signed(cn: &str) -> Issued {
    pki::self_signed(&LeafSpec::device(cn)).expect("self-signed")
}

impl Client {
    /// Opens TLS, writes `bytes`, and returns everything the broker sends until it closes
    /// the connection (or `WAIT` passes). For packets no MQTT client library will build.
    pub async fn raw(&self, addr: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>, String> {
        use tokio::io::AsyncReadExt;
        let mut tls = self.send_raw(addr, bytes).await?;
        let mut out = Vec::new();
        match tokio::time::timeout(WAIT, tls.read_to_end(&mut out)).await {
            Ok(Ok(_)) => Ok(out),
            // A close without close_notify after data still counts as the answer.
            Ok(Err(e)) if !out.is_empty() => {
                let _ = e;
                Ok(out)
            }
            Ok(Err(e)) => Err(format!("{e:?}")),
            Err(_) => Err(format!("no close within {WAIT:?}; got {out:02x?}")),
        }
    }
}

impl Client {
    /// Opens TLS, writes `bytes`, and returns the first complete MQTT packet the broker
    /// sends back (the connection stays open until the returned stream is dropped).
    pub async fn raw_first_packet(
        &self,
        addr: SocketAddr,
        bytes: &[u8],
    ) -> Result<
        (
            Vec<u8>,
            tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        ),
        String,
    > {
        let mut tls = self.send_raw(addr, bytes).await?;
        let packet = tokio::time::timeout(WAIT, read_packet(&mut tls))
            .await
            .map_err(|_| "no packet in time".to_owned())??;
        Ok((packet, tls))
    }
}

impl Client {
    /// Opens TLS to the broker as this client and writes `bytes`.
    pub async fn send_raw(
        &self,
        addr: SocketAddr,
        bytes: &[u8],
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
        use tokio::io::AsyncWriteExt;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{e:?}"))?;
        tls.write_all(bytes).await.map_err(|e| format!("{e:?}"))?;
        tls.flush().await.map_err(|e| format!("{e:?}"))?;
        Ok(tls)
    }
}

/// Reads one MQTT packet (fixed header, remaining length, body) from a stream.
pub async fn read_packet<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, String> {
    use tokio::io::AsyncReadExt;
    let mut out = vec![r.read_u8().await.map_err(|e| format!("{e:?}"))?];
    let mut len = 0usize;
    for shift in 0..4 {
        let b = r.read_u8().await.map_err(|e| format!("{e:?}"))?;
        out.push(b);
        len |= ((b & 0x7f) as usize) << (7 * shift);
        if b & 0x80 == 0 {
            break;
        }
    }
    let start = out.len();
    out.resize(start + len, 0);
    r.read_exact(&mut out[start..])
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(out)
}
