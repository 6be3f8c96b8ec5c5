//! The broker as a real subprocess for the operations tests (SPEC 1, 8, 10): `certmq serve`
//! started from the built binary, its ports learnt from its own log lines, signals sent
//! with `kill`, the admin endpoint read over plain HTTP/1.1, and raw MQTT 5 over TLS where
//! a test must see the exact DISCONNECT reason code the broker sends.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::{connect_v5_bytes, read_packet, Client, Fixture, WAIT};

/// A TLS connection opened by the raw helpers.
pub type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Writes `certmq.toml` with both listeners on port 0 (the admin endpoint too), so every
/// test has its own ports; `limits` is the body of `[limits]`.
pub fn config_with_limits(fx: &Fixture, limits: &str, body: &str) -> PathBuf {
    let text = format!(
        "[server]\nbind = \"127.0.0.1:0\"\nadmin_bind = \"127.0.0.1:0\"\ncert_chain = \"server.pem\"\nprivate_key = \"server.key\"\ndata_dir = \"data\"\n\n[limits]\n{limits}\n\n{body}\n"
    );
    fx.write("certmq.toml", &text)
}

/// [`config_with_limits`] with short handshake and CONNECT timeouts.
pub fn config(fx: &Fixture, body: &str) -> PathBuf {
    config_with_limits(fx, "handshake_timeout = 5\nconnect_timeout = 5", body)
}

/// A pinned `[[device]]` section.
pub fn pinned(name: &str, file: &str, acl: &str) -> String {
    format!("[[device]]\nname = \"{name}\"\ncertificate = \"{file}\"\nacl = \"{acl}\"\n")
}

/// A profile that may publish and subscribe everywhere.
pub const BACKEND_PROFILE: &str = "[acl.backend]\npublish = [\"#\"]\nsubscribe = [\"#\"]\n";

/// `certmq serve` running as a child process; killed when dropped.
pub struct Proc {
    child: Child,
    /// Lines of the child's stderr, sent by a reader thread; closed at the child's EOF.
    lines: UnboundedReceiver<String>,
    /// Every line received so far, for failure messages and later searches.
    seen: Vec<String>,
    /// `seen[..cursor]` was consumed by earlier waits: a wait never matches an old line.
    cursor: usize,
    pub mqtt: SocketAddr,
    pub admin: SocketAddr,
}

impl Proc {
    /// Starts `certmq serve --config PATH` in the fixture's folder and waits until both
    /// listeners are announced.
    pub async fn start(fx: &Fixture, config: &Path) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_certmq"))
            .args(["serve", "--config"])
            .arg(config)
            .current_dir(fx.dir.path())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn certmq serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = unbounded_channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = Proc {
            child,
            lines,
            seen: Vec::new(),
            cursor: 0,
            mqtt: "0.0.0.0:0".parse().expect("addr"),
            admin: "0.0.0.0:0".parse().expect("addr"),
        };
        // The two announcements come from different tasks: take them in either order.
        let first = p.wait_line_any(&["listening for MQTT over TLS", "admin endpoint listening"]);
        let first = first.await;
        let second = if first.contains("admin endpoint") {
            p.wait_line("listening for MQTT over TLS").await
        } else {
            p.wait_line("admin endpoint listening").await
        };
        for line in [first, second] {
            let addr = addr_field(&line);
            if line.contains("admin endpoint") {
                p.admin = addr;
            } else {
                p.mqtt = addr;
            }
        }
        p
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`HUP`, `TERM`, `INT`) with `kill`, as an operator or systemd does.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed: {status}");
    }

    /// SIGHUP, then the outcome line: `Ok(line)` when the configuration was reloaded,
    /// `Err(line)` when the reload was refused.
    pub async fn reload(&mut self) -> Result<String, String> {
        self.signal("HUP");
        let line = self
            .wait_line_any(&["configuration reloaded", "reload refused"])
            .await;
        if line.contains("configuration reloaded") {
            Ok(line)
        } else {
            Err(line)
        }
    }

    /// Waits (bounded) for the next stderr line containing `needle`.
    pub async fn wait_line(&mut self, needle: &str) -> String {
        self.wait_line_any(&[needle]).await
    }

    /// Waits (bounded) for the next stderr line containing any of `needles`.
    pub async fn wait_line_any(&mut self, needles: &[&str]) -> String {
        let matches = |l: &str| needles.iter().any(|n| l.contains(n));
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(i) = self.seen[self.cursor..].iter().position(|l| matches(l)) {
                let i = self.cursor + i;
                self.cursor = i + 1;
                return self.seen[i].clone();
            }
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => self.seen.push(line),
                Ok(None) => panic!(
                    "certmq exited before logging {needles:?}; stderr:\n{}",
                    self.stderr()
                ),
                // CARGO_TARGET_DIR may be shared between worktrees: a binary built from
                // another branch logs other lines, so name the binary that ran.
                Err(_) => panic!(
                    "no log line with {needles:?} within {WAIT:?} from {}; stderr:\n{}",
                    env!("CARGO_BIN_EXE_certmq"),
                    self.stderr()
                ),
            }
        }
    }

    /// Everything the child wrote to stderr so far (as received).
    pub fn stderr(&self) -> String {
        self.seen.join("\n")
    }

    /// Waits up to `limit` for the child to exit (its stderr reaching EOF) and returns its
    /// status; the rest of its stderr is kept in [`Proc::stderr`].
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let drained = tokio::time::timeout(limit, async {
            while let Some(line) = self.lines.recv().await {
                self.seen.push(line);
            }
        })
        .await;
        assert!(
            drained.is_ok(),
            "certmq still running {limit:?} later; stderr:\n{}",
            self.stderr()
        );
        self.child.wait().expect("wait for certmq")
    }

    /// GET `path` on the admin endpoint.
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await
    }

    /// The value of one metric series (e.g. `certmq_handshakes_total{result="ok"}`).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let (status, body) = self.get("/metrics").await;
        assert_eq!(status, 200, "{body}");
        metric(&body, series)
    }

    /// Polls `/metrics` until `series` has `value`: for counters bumped after the peer has
    /// already seen the outcome (a failed handshake is counted once the alert is sent).
    pub async fn wait_metric(&self, series: &str, value: f64) {
        let mut last = None;
        let reached = tokio::time::timeout(WAIT, async {
            loop {
                last = self.metric(series).await;
                if last == Some(value) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            reached.is_ok(),
            "{series} stayed {last:?}, expected {value}"
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `addr=HOST:PORT` field of a tracing line.
fn addr_field(line: &str) -> SocketAddr {
    // `[log] format = "json"`: one object per line, the address in `fields.addr`.
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        if let Some(addr) = v["fields"]["addr"].as_str().and_then(|a| a.parse().ok()) {
            return addr;
        }
    }
    let start = line.find("addr=").map(|i| i + 5);
    let text = start.map(|s| line[s..].split_whitespace().next().unwrap_or(""));
    text.and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no addr= in {line:?}"))
}

/// A minimal HTTP/1.1 GET: status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr))
        .await
        .expect("admin connect in time")
        .expect("admin connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.expect("write request");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut raw))
        .await
        .expect("admin response in time")
        .expect("read response");
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("header end");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_owned())
}

/// The value of `series` (name with its labels, as exposed) in a Prometheus text body.
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

// ---------------------------------------------------------------- raw MQTT 5

/// Appends an MQTT variable byte integer.
fn put_len(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            return;
        }
    }
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    put_len(&mut p, body.len());
    p.extend_from_slice(body);
    p
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Where the variable header starts: after the type byte and the remaining length.
fn body_start(p: &[u8]) -> usize {
    1 + p[1..].iter().take_while(|b| *b & 0x80 != 0).count() + 1
}

/// Reads an MQTT variable byte integer at `*i`.
fn get_len(p: &[u8], i: &mut usize) -> usize {
    let mut len = 0;
    for shift in 0..4 {
        let b = p[*i];
        *i += 1;
        len |= usize::from(b & 0x7f) << (7 * shift);
        if b & 0x80 == 0 {
            break;
        }
    }
    len
}

/// Reads the next packet within [`WAIT`].
pub async fn next_packet(tls: &mut Tls) -> Vec<u8> {
    tokio::time::timeout(WAIT, read_packet(tls))
        .await
        .expect("a packet in time")
        .expect("a packet")
}

/// Opens TLS with `client`, sends an MQTT 5 CONNECT, and asserts CONNACK success.
pub async fn open_v5(client: &Client, addr: SocketAddr, client_id: &str) -> Tls {
    let (ack, tls) = client
        .raw_first_packet(addr, &connect_v5_bytes(client_id))
        .await
        .expect("TLS and CONNACK");
    assert_eq!(ack[0], 0x20, "CONNACK expected: {ack:02x?}");
    assert_eq!(ack[body_start(&ack) + 1], 0, "CONNACK refused: {ack:02x?}");
    tls
}

/// A DISCONNECT sent by the broker: reason code and reason string (empty when absent).
#[derive(Debug)]
pub struct Disconnect {
    pub code: u8,
    pub reason: String,
}

/// Parses a DISCONNECT packet (MQTT 5).
pub fn parse_disconnect(p: &[u8]) -> Disconnect {
    assert_eq!(p[0], 0xE0, "DISCONNECT expected: {p:02x?}");
    let mut i = body_start(p);
    let code = p.get(i).copied().unwrap_or(0);
    i += 1;
    let mut reason = String::new();
    if i < p.len() {
        let props_len = get_len(p, &mut i);
        let end = i + props_len;
        while i < end {
            let id = p[i];
            i += 1;
            match id {
                0x1F => {
                    let n = usize::from(u16::from_be_bytes([p[i], p[i + 1]]));
                    reason = String::from_utf8_lossy(&p[i + 2..i + 2 + n]).into_owned();
                    i += 2 + n;
                }
                other => panic!("unexpected DISCONNECT property {other:#x}: {p:02x?}"),
            }
        }
    }
    Disconnect { code, reason }
}

/// Waits (within `limit`) for the DISCONNECT the broker sends on this connection.
pub async fn expect_disconnect(tls: &mut Tls, limit: Duration) -> Disconnect {
    let p = tokio::time::timeout(limit, read_packet(tls))
        .await
        .unwrap_or_else(|_| panic!("no DISCONNECT within {limit:?}"))
        .expect("a DISCONNECT packet");
    parse_disconnect(&p)
}

/// PINGREQ, and asserts the next packet is PINGRESP: the connection is alive and served.
pub async fn ping(tls: &mut Tls) {
    tls.write_all(&[0xC0, 0]).await.expect("write PINGREQ");
    tls.flush().await.expect("flush");
    assert_eq!(next_packet(tls).await, [0xD0, 0], "PINGRESP expected");
}

/// SUBSCRIBE (MQTT 5, QoS 0) and the SUBACK reason codes.
pub async fn subscribe_v5(tls: &mut Tls, packet_id: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    body.push(0);
    for f in filters {
        put_str(&mut body, f);
        body.push(0);
    }
    tls.write_all(&packet(0x82, &body)).await.expect("write");
    tls.flush().await.expect("flush");
    let ack = next_packet(tls).await;
    assert_eq!(ack[0], 0x90, "SUBACK expected: {ack:02x?}");
    let mut i = body_start(&ack) + 2;
    let props = get_len(&ack, &mut i);
    ack[i + props..].to_vec()
}

/// PUBLISH (MQTT 5, QoS 0, no properties).
pub async fn publish_v5(tls: &mut Tls, topic: &str, payload: &[u8]) {
    let mut body = Vec::new();
    put_str(&mut body, topic);
    body.push(0);
    body.extend_from_slice(payload);
    tls.write_all(&packet(0x30, &body)).await.expect("write");
    tls.flush().await.expect("flush");
}

/// Reads the next packet, asserts it is a QoS 0 PUBLISH, and returns topic and payload.
pub async fn next_publish_v5(tls: &mut Tls) -> (String, Vec<u8>) {
    let p = next_packet(tls).await;
    assert_eq!(p[0] & 0xF6, 0x30, "QoS 0 PUBLISH expected: {p:02x?}");
    let mut i = body_start(&p);
    let n = usize::from(u16::from_be_bytes([p[i], p[i + 1]]));
    let topic = String::from_utf8_lossy(&p[i + 2..i + 2 + n]).into_owned();
    i += 2 + n;
    let props = get_len(&p, &mut i);
    (topic, p[i + props..].to_vec())
}
