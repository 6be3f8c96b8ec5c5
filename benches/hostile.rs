//! What a hostile client chain costs the broker before authentication (contract §3 "Bounded work
//! before authentication"). Three parts, all with three anchors configured (a root and two
//! intermediates under it, the shape that multiplies webpki's path search):
//!
//! 1. `policy::match_chain` alone (the verifier's work), thread CPU per call, for a
//!    legitimate device chain and for hostile chains from `tests/it/common/hostile.rs`;
//! 2. a whole in-memory TLS 1.3 handshake against certmq's own server config, server side
//!    only, thread CPU, for the same chains;
//! 3. a real broker on loopback (2 worker threads): established clients send PINGREQ every
//!    10 ms while 3 attackers open TLS connections with a hostile chain as fast as they
//!    can; prints the ping round-trip p50/p99/max.
//!
//! `cargo bench --bench hostile [-- SECONDS]` (part 3 runs SECONDS per chain, default 5).
//! CPU time is the thread's own (`/proc/thread-self/schedstat`, a mean over many calls), so
//! other load on the machine changes it little. A benchmark, never a timed test (contract §11).

#[path = "../tests/it/common/hostile.rs"]
#[allow(dead_code)]
mod hostile;

use std::sync::Arc;
use std::time::{Duration, Instant};

use certmq::config::Config;
use certmq::metrics::Metrics;
use certmq::pki::{Ca, LeafSpec, Validity};
use certmq::server::Server;
use certmq::tls::policy;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

fn main() {
    let seconds: u64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let pki = Pki::new();
    let config = Arc::new(Config::load(&pki.config).expect("config"));
    let chains = pki.chains();

    println!("hostile chains, 3 anchors (root + 2 intermediates), ECDSA P-256, ring");
    println!("part 1: policy::match_chain, thread CPU per call");
    for (label, chain) in &chains {
        let (mean, max, outcome) = cpu_per_call(|| {
            let report = policy::match_chain(&config, &chain.certs, UnixTime::now());
            match report.outcome {
                Ok(_) => "accepted".to_owned(),
                Err(e) => e.label().to_owned(),
            }
        });
        println!(
            "  {label:<46} {:>2} certs {:>6} B  cpu mean {mean:>7.3} ms  wall p99 {max:>7.3} ms  -> {outcome}",
            chain.certs.len(),
            chain.bytes()
        );
    }

    println!("part 2: in-memory TLS 1.3 handshake, certmq server config, server thread CPU");
    let metrics = Arc::new(Metrics::default());
    let server_config =
        certmq::tls::server_config(config.clone(), metrics.clone(), None).expect("server config");
    for (label, chain) in &chains {
        let client = client_config(&pki, chain);
        let (mean, max, outcome) = cpu_per_call(|| handshake(&client, &server_config));
        println!("  {label:<46} cpu mean {mean:>7.3} ms  wall p99 {max:>7.3} ms  -> {outcome}");
    }

    println!(
        "part 3: ping round trip of 4 established clients while 3 attackers hammer ({seconds} s)"
    );
    for (label, chain) in chains.iter().filter(|(l, _)| l.starts_with("hostile")) {
        let r = pings_under_attack(&pki, chain, Duration::from_secs(seconds));
        println!(
            "  {label:<46} pings {:>5}  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  attacks {:>6} ({:.0}/s)",
            r.pings, r.p50, r.p99, r.max, r.attacks, r.attacks as f64 / seconds as f64
        );
    }
}

/// The fixture PKI and a config with three anchors, in a temporary folder.
struct Pki {
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
    root: Ca,
    fleet: Ca,
    device: certmq::pki::Issued,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = Ca::root("Bench Root CA", Validity::days(-1, 30)).expect("root");
        let fleet = root
            .intermediate("Bench Fleet CA", Validity::days(-1, 30), None)
            .expect("fleet");
        let plant = root
            .intermediate("Bench Plant CA", Validity::days(-1, 30), None)
            .expect("plant");
        let server = root
            .issue(&LeafSpec::server(
                &["localhost"],
                &["127.0.0.1".parse().expect("ip")],
            ))
            .expect("server");
        let device = fleet
            .issue(&LeafSpec::device("bench-1.devices.example.com"))
            .expect("device");
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).expect("write");
        };
        write("server.pem", &server.cert_pem);
        write("server.key", &server.key_pem);
        write("root.pem", &root.cert_pem());
        write("fleet.pem", &fleet.cert_pem());
        write("plant.pem", &plant.cert_pem());
        let mut cfg = String::from(
            "[server]\nbind = \"127.0.0.1:0\"\ncert_chain = \"server.pem\"\nprivate_key = \"server.key\"\ndata_dir = \"data\"\n\n",
        );
        for name in ["fleet", "plant", "root"] {
            cfg.push_str(&format!(
                "[[anchor]]\nname = \"{name}\"\ncertificate = \"{name}.pem\"\ncn_regex = '^(.+)\\.devices\\.example\\.com$'\ncreate_devices = true\n\n"
            ));
        }
        write("certmq.toml", &cfg);
        Pki {
            config: dir.path().join("certmq.toml"),
            _dir: dir,
            root,
            fleet,
            device,
        }
    }

    fn chains(&self) -> Vec<(String, hostile::HostileChain)> {
        let anchors = ["Bench Fleet CA", "Bench Plant CA", "Bench Root CA"];
        let legit = hostile::HostileChain {
            certs: vec![
                CertificateDer::from(self.device.cert_der.clone()),
                CertificateDer::from(self.fleet.cert_der()),
            ],
            pem: self.device.chain_pem(&[&self.fleet]),
            key_pem: self.device.key_pem.clone(),
        };
        vec![
            ("legit device + fleet intermediate".to_owned(), legit),
            (
                "hostile: 32 same-subject CAs".to_owned(),
                hostile::same_subject_chain(32, &anchors),
            ),
            (
                "hostile: 8 same-subject CAs".to_owned(),
                hostile::same_subject_chain(8, &anchors),
            ),
            (
                "hostile: 8 certs named like the fleet anchor".to_owned(),
                hostile::anchor_named_chain(8, "Bench Fleet CA"),
            ),
            (
                "hostile: 8 certs, 10 paths to the fleet anchor".to_owned(),
                hostile::layered_chain("Bench Fleet CA"),
            ),
        ]
    }
}

/// CPU time of this thread so far.
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map(Duration::from_nanos)
        .unwrap_or_default()
}

/// Runs `f` repeatedly (at least 20 times, up to 2,000 or about 2 s) and returns the
/// mean thread CPU per call and the p99 wall time per call, in ms, and the last outcome.
/// The kernel accounts thread CPU in scheduler ticks here, so only the mean over many
/// calls is meaningful; the wall time of a single-threaded call bounds its CPU per call.
fn cpu_per_call(mut f: impl FnMut() -> String) -> (f64, f64, String) {
    let mut walls = Vec::new();
    let mut outcome = String::new();
    let started = Instant::now();
    let cpu_start = thread_cpu();
    while walls.len() < 20 || (walls.len() < 2000 && started.elapsed() < Duration::from_secs(2)) {
        let t = Instant::now();
        outcome = f();
        walls.push(t.elapsed());
    }
    let cpu = thread_cpu().saturating_sub(cpu_start);
    walls.sort();
    let p99 = walls[(walls.len() * 99 / 100).min(walls.len() - 1)];
    (
        cpu.as_secs_f64() * 1e3 / walls.len() as f64,
        p99.as_secs_f64() * 1e3,
        outcome,
    )
}

fn client_config(pki: &Pki, chain: &hostile::HostileChain) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(pki.root.cert_der()))
        .expect("root");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(
        chain.certs.clone(),
        PrivateKeyDer::from_pem_slice(chain.key_pem.as_bytes()).expect("key"),
    )
    .expect("client auth");
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// One in-memory handshake, run to completion or failure; the outcome in words.
fn handshake(client: &Arc<rustls::ClientConfig>, server: &Arc<rustls::ServerConfig>) -> String {
    let name = ServerName::try_from("localhost").expect("name");
    let mut c = rustls::ClientConnection::new(client.clone(), name).expect("client");
    let mut s = rustls::ServerConnection::new(server.clone()).expect("server");
    let mut buf = Vec::with_capacity(64 * 1024);
    for _ in 0..20 {
        if !c.is_handshaking() && !s.is_handshaking() {
            return "accepted".to_owned();
        }
        buf.clear();
        while c.wants_write() {
            let _ = c.write_tls(&mut buf);
        }
        // read_tls takes at most one buffer's worth per call: feed until all is consumed.
        let mut rd = &buf[..];
        while !rd.is_empty() {
            if s.read_tls(&mut rd).is_err() {
                return "server read failed".to_owned();
            }
            if let Err(e) = s.process_new_packets() {
                return format!("refused: {e}");
            }
        }
        buf.clear();
        while s.wants_write() {
            let _ = s.write_tls(&mut buf);
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            if c.read_tls(&mut rd).is_err() {
                return "client read failed".to_owned();
            }
            if let Err(e) = c.process_new_packets() {
                return format!("client: {e}");
            }
        }
    }
    "stuck".to_owned()
}

struct PingResult {
    pings: usize,
    p50: f64,
    p99: f64,
    max: f64,
    attacks: u64,
}

fn pings_under_attack(pki: &Pki, chain: &hostile::HostileChain, run: Duration) -> PingResult {
    // The broker: its own runtime with 2 workers, as on the 2-core target machine.
    let broker_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("broker runtime");
    let config = Config::load(&pki.config).expect("config");
    let server = Server::new(config).expect("server");
    let listener = broker_rt.block_on(server.bind()).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    broker_rt.spawn(async move {
        let _ = server.run(listener, token).await;
    });

    // The clients: another runtime, so they never share a worker with the broker.
    let clients_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime");
    let good = client_config(
        pki,
        &hostile::HostileChain {
            certs: vec![CertificateDer::from(pki.device.cert_der.clone())],
            pem: pki.device.cert_pem.clone(),
            key_pem: pki.device.key_pem.clone(),
        },
    );
    let bad = client_config(pki, chain);
    let result = clients_rt.block_on(async move {
        let stop = CancellationToken::new();
        let mut pingers = Vec::new();
        for i in 0..4 {
            pingers.push(tokio::spawn(pinger(good.clone(), addr, i, stop.clone())));
        }
        let attacks = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut attackers = Vec::new();
        for _ in 0..3 {
            let (bad, stop, attacks) = (bad.clone(), stop.clone(), attacks.clone());
            attackers.push(tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let _ = attack(&bad, addr).await;
                    attacks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }));
        }
        tokio::time::sleep(run).await;
        stop.cancel();
        let mut rtts = Vec::new();
        for p in pingers {
            rtts.extend(p.await.unwrap_or_default());
        }
        for a in attackers {
            let _ = a.await;
        }
        rtts.sort();
        let at = |q: f64| {
            rtts.get(((rtts.len() as f64 * q) as usize).min(rtts.len().saturating_sub(1)))
                .map(|d| d.as_secs_f64() * 1e3)
                .unwrap_or(f64::NAN)
        };
        PingResult {
            pings: rtts.len(),
            p50: at(0.5),
            p99: at(0.99),
            max: rtts
                .last()
                .map(|d| d.as_secs_f64() * 1e3)
                .unwrap_or(f64::NAN),
            attacks: attacks.load(std::sync::atomic::Ordering::Relaxed),
        }
    });
    shutdown.cancel();
    broker_rt.shutdown_timeout(Duration::from_secs(5));
    result
}

async fn tls(
    config: &Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
}

/// One hostile connection: the handshake, then a read that sees the refusal (TLS 1.3
/// clients learn of a client-certificate refusal only on their first read).
async fn attack(config: &Arc<rustls::ClientConfig>, addr: std::net::SocketAddr) -> Option<()> {
    let mut s = tls(config, addr).await.ok()?;
    let mut b = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;
    Some(())
}

/// An established client: CONNECT, then PINGREQ every 10 ms; the round-trip times.
async fn pinger(
    config: Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
    i: usize,
    stop: CancellationToken,
) -> Vec<Duration> {
    let mut rtts = Vec::new();
    let Ok(mut s) = tls(&config, addr).await else {
        return rtts;
    };
    let id = format!("pinger-{i}");
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut connect = vec![0x10, body.len() as u8];
    connect.extend(body);
    let mut ack = [0u8; 4];
    if s.write_all(&connect).await.is_err() || s.read_exact(&mut ack).await.is_err() {
        return rtts;
    }
    let mut pong = [0u8; 2];
    while !stop.is_cancelled() {
        let t = Instant::now();
        if s.write_all(&[0xc0, 0]).await.is_err() || s.read_exact(&mut pong).await.is_err() {
            break;
        }
        rtts.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rtts
}
