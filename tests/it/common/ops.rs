//! The broker as a real subprocess ([`Proc`]), for the operations tests (contract §1, 8, 10)
//! and the kill -9 durability tests (contract §7): `certmq serve` started from the built binary,
//! its ports learnt from its own log lines, signals sent with kill(2), SIGKILL on drop, and
//! the admin endpoint read over plain HTTP/1.1. MQTT goes through the raw client
//! ([`crate::common::coretests::raw`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::coretests::raw::{Raw, RawConnect};
use super::coretests::V;
use super::{Client, Fixture, WAIT};

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

/// A pinned device `backend` that may publish and subscribe everywhere: writes its
/// self-signed certificate as `backend.pem` and returns its config section (the
/// `[[device]]` entry and [`BACKEND_PROFILE`]) and its client.
pub fn pinned_backend(fx: &Fixture) -> (String, Client) {
    let cert = super::self_signed("backend");
    fx.write("backend.pem", &cert.cert_pem);
    let section = format!(
        "{}\n{BACKEND_PROFILE}",
        pinned("backend", "backend.pem", "backend")
    );
    (section, Client::new(fx, &cert.cert_pem, &cert.key_pem))
}

/// `certmq serve` running as a child process, SIGKILLed when dropped (or by
/// [`Proc::kill`]): a kill cuts it off with no destructor, no final flush and no chance
/// to finish a commit, exactly as a crash does.
pub struct Proc {
    child: Child,
    /// The child's stderr, appended line by line by a reader thread.
    log: Arc<Log>,
    /// Lines before this one were consumed by earlier waits: a wait never matches an old
    /// line.
    cursor: usize,
    pub mqtt: SocketAddr,
    /// The admin endpoint; `0.0.0.0:0` when the config sets no `admin_bind`.
    pub admin: SocketAddr,
}

/// What the reader thread shares with the test.
#[derive(Default)]
struct Log {
    lines: Mutex<Vec<String>>,
    /// Set at the child's EOF, after its last line.
    closed: AtomicBool,
    /// Woken at every line and at EOF.
    changed: tokio::sync::Notify,
}

impl Proc {
    /// Starts `certmq serve --config PATH` in the fixture's folder and waits until its
    /// listeners are announced (the admin endpoint's too when the config sets
    /// `admin_bind`).
    pub async fn start(fx: &Fixture, config: &Path) -> Proc {
        let admin_bind = certmq::config::Config::load(config)
            .ok()
            .and_then(|c| c.server.admin_bind)
            .is_some();
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
        let log = Arc::new(Log::default());
        let shared = log.clone();
        // Reads stderr to its end, so the broker never blocks on a full pipe.
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                shared.lines.lock().unwrap().push(line);
                shared.changed.notify_waiters();
            }
            shared.closed.store(true, Ordering::SeqCst);
            shared.changed.notify_waiters();
        });
        let mut p = Proc {
            child,
            log,
            cursor: 0,
            mqtt: "0.0.0.0:0".parse().expect("addr"),
            admin: "0.0.0.0:0".parse().expect("addr"),
        };
        const MQTT: &str = "listening for MQTT over TLS";
        const ADMIN: &str = "admin endpoint listening";
        // The two announcements come from different tasks: take them in either order.
        let first = if admin_bind {
            p.wait_line_any(&[MQTT, ADMIN]).await
        } else {
            p.wait_line(MQTT).await
        };
        let mut lines = vec![first];
        if admin_bind {
            let second = if lines[0].contains(ADMIN) {
                MQTT
            } else {
                ADMIN
            };
            lines.push(p.wait_line(second).await);
        }
        for line in lines {
            let addr = addr_field(&line);
            if line.contains(ADMIN) {
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

    /// Sends a signal (`HUP`, `TERM`, `INT`; `STOP` and `CONT` freeze and thaw it, as a
    /// machine that stalls) with kill(2), as an operator's `kill` or systemd does: it has
    /// been sent when this returns.
    pub fn signal(&self, sig: &str) {
        use rustix::process::{kill_process, Pid, Signal};
        let signal = match sig {
            "HUP" => Signal::HUP,
            "TERM" => Signal::TERM,
            "INT" => Signal::INT,
            "STOP" => Signal::STOP,
            "CONT" => Signal::CONT,
            other => panic!("no signal {other} in these tests"),
        };
        let pid = i32::try_from(self.pid())
            .ok()
            .and_then(Pid::from_raw)
            .expect("a child's pid");
        kill_process(pid, signal).unwrap_or_else(|e| panic!("kill -{sig} {pid:?}: {e}"));
    }

    /// SIGKILL, then reap: the broker gets no chance to flush anything.
    pub fn kill(mut self) {
        self.kill_now();
    }

    fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
        let matches = |l: &String| needles.iter().any(|n| l.contains(n));
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let changed = self.log.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // Read before the lines: once set, every line is in.
            let closed = self.log.closed.load(Ordering::SeqCst);
            {
                let lines = self.log.lines.lock().unwrap();
                if let Some(i) = lines[self.cursor..].iter().position(matches) {
                    let i = self.cursor + i;
                    self.cursor = i + 1;
                    return lines[i].clone();
                }
            }
            if closed {
                panic!(
                    "certmq exited before logging {needles:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                // CARGO_TARGET_DIR may be shared between worktrees: a binary built from
                // another branch logs other lines, so name the binary that ran.
                panic!(
                    "no log line with {needles:?} within {WAIT:?} from {}; stderr:\n{}",
                    env!("CARGO_BIN_EXE_certmq"),
                    self.stderr()
                );
            }
        }
    }

    /// Everything the child wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.log.lines.lock().unwrap().join("\n")
    }

    /// Waits up to `limit` for the child to exit (its stderr reaching EOF) and returns its
    /// status; all of its stderr is then in [`Proc::stderr`].
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let log = self.log.clone();
        let drained = tokio::time::timeout(limit, async move {
            loop {
                let changed = log.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if log.closed.load(Ordering::SeqCst) {
                    return;
                }
                changed.await;
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
        self.kill_now();
    }
}

/// Runs `certmq serve --config PATH` expecting it to exit on its own (bounded by `WAIT`;
/// killed if it does not). Returns the exit code and stderr.
pub async fn serve_expecting_exit(config: &Path) -> (Option<i32>, String) {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_certmq"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn certmq serve");
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("certmq serve should exit at start")
        .expect("wait for certmq serve");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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

/// Opens TLS with `client`, sends an MQTT 5 CONNECT (clean start, keep alive 60 s),
/// asserts CONNACK success, then waits for the answer to a PINGREQ: the broker registers a
/// connection for the re-checks of a reload only after its CONNACK, and a reload's counts
/// (`kept=`, `revoked=`) include the connection only once it is served.
pub async fn open_v5(client: &Client, addr: SocketAddr, client_id: &str) -> Raw {
    let connect = RawConnect::new(V::V5, client_id).bytes();
    let mut raw = Raw::connect_ok(client, addr, &connect).await.0;
    raw.ping().await;
    raw
}
