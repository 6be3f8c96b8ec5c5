//! A real nats-server with JetStream for the cluster tests (contract §12), started by the
//! test itself on a free loopback port with its own store folder; killed when dropped.
//!
//! Skipped, not failed, when `nats-server` is not installed and `CERTMQ_REQUIRE_NATS` is
//! unset (`cargo test` passes with only the Rust toolchain); CI installs nats-server and
//! sets the variable.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::interop::on_path;

/// Set by CI: a missing nats-server is a failure, not a skip.
pub const REQUIRE_NATS: &str = "CERTMQ_REQUIRE_NATS";
/// How long nats-server may take to say it is ready.
const START_LIMIT: Duration = Duration::from_secs(20);

/// A nats-server child process.
pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    /// The JetStream store folder (kept across [`Nats::restart`]).
    store: tempfile::TempDir,
    /// What the server printed, for failure messages.
    pub log: PathBuf,
}

impl Nats {
    /// Starts nats-server with JetStream, or None (after saying why on stderr) when it is
    /// not installed and not required.
    pub fn start() -> Option<Nats> {
        if !on_path("nats-server") {
            if std::env::var_os(REQUIRE_NATS).is_some() {
                panic!("nats-server is not on PATH and {REQUIRE_NATS} is set");
            }
            eprintln!("skipped: nats-server is not installed (set {REQUIRE_NATS} to require it)");
            return None;
        }
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().expect("its address").port()
        };
        let store = tempfile::tempdir().expect("a store folder");
        let log = store.path().join("nats.log");
        let mut nats = Nats {
            child: None,
            port,
            store,
            log,
        };
        nats.spawn();
        Some(nats)
    }

    /// The URL a certmq `[cluster] nats` list takes.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let mut child = Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path().join("js"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nats-server");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let log = self.log.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .ok();
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(f) = file.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                if line.contains("Server is ready") {
                    let _ = tx.send(());
                }
            }
        });
        let started = Instant::now();
        if rx.recv_timeout(START_LIMIT).is_err() {
            let _ = child.kill();
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            panic!(
                "nats-server on port {} not ready after {:?}:\n{text}",
                self.port,
                started.elapsed()
            );
        }
        self.child = Some(child);
    }

    /// Stops the server at once (SIGKILL), as a crash or a network partition would.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}
