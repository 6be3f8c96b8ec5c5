//! The durability tests' tools (SPEC 7): the broker as a real child process that can be
//! SIGKILLed and restarted on the same `data_dir`, a raw MQTT client that sees every
//! packet id and flag, a tmpfs mount for the full-disk test, and a seeded generator.
//!
//! Why a child process and not the in-process broker: `kill -9` must cut the broker off
//! with no destructor, no final flush and no chance to finish a commit, exactly as an
//! operator's `kill -9` or a crash does; only a separate process gives that.

pub mod flows;
pub mod wire;
pub mod world;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};

use tokio::io::AsyncWriteExt;
use wire::Pkt;

use super::{read_packet, Client, WAIT};

/// A `certmq serve` child process. Dropping it kills it (SIGKILL), on every path.
pub struct BrokerProc {
    child: Child,
    /// Where the broker listens (it binds 127.0.0.1:0 and logs the port).
    pub addr: SocketAddr,
    /// Everything it wrote to stderr so far, for failure messages.
    log: Arc<Mutex<Vec<String>>>,
}

impl BrokerProc {
    /// Starts `certmq serve --config PATH` and waits (bounded) for its
    /// `listening for MQTT over TLS addr=...` line.
    pub fn start(config: &Path) -> BrokerProc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_certmq"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn certmq serve");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let lines = log.clone();
        // Reads stderr to its end so the broker never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening for MQTT over TLS") {
                    if let Some(addr) = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("addr="))
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                    {
                        let _ = tx.send(addr);
                    }
                }
                lines.lock().unwrap().push(line);
            }
        });
        let mut proc = BrokerProc {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            log,
        };
        match rx.recv_timeout(WAIT) {
            Ok(addr) => proc.addr = addr,
            Err(e) => {
                let _ = proc.child.kill();
                let status = proc.child.wait();
                panic!(
                    "certmq serve did not start ({e}; {status:?}):\n{}",
                    proc.log()
                );
            }
        }
        proc
    }

    /// SIGKILL, then reap: the broker gets no chance to flush anything.
    pub fn kill(mut self) {
        self.kill_now();
    }

    fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The broker's stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for BrokerProc {
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

/// One MQTT connection over mutual TLS, packet by packet.
pub struct Raw {
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    /// MQTT 5 (properties in PUBLISH and SUBACK).
    pub v5: bool,
}

impl Raw {
    /// TLS, then `connect` (from [`wire::connect`]); returns the connection and what the
    /// broker answered first (normally CONNACK).
    pub async fn open(
        client: &Client,
        addr: SocketAddr,
        connect: &[u8],
        v5: bool,
    ) -> Result<(Raw, Pkt), String> {
        let (first, stream) = client.raw_first_packet(addr, connect).await?;
        let pkt = wire::parse(&first, v5)?;
        Ok((Raw { stream, v5 }, pkt))
    }

    /// Connects and insists on CONNACK success; returns Session Present.
    pub async fn connect(
        client: &Client,
        addr: SocketAddr,
        client_id: &str,
        clean: bool,
        session_expiry: Option<u32>,
    ) -> (Raw, bool) {
        let bytes = wire::connect(client_id, clean, session_expiry);
        let (raw, ack) = Raw::open(client, addr, &bytes, session_expiry.is_some())
            .await
            .unwrap_or_else(|e| panic!("{client_id}: connect: {e}"));
        match ack {
            Pkt::ConnAck { present, code: 0 } => (raw, present),
            other => panic!("{client_id}: expected CONNACK success, got {other:?}"),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| e.to_string())?;
        self.stream.flush().await.map_err(|e| e.to_string())
    }

    /// The next packet; an error when the connection closes or nothing comes within `WAIT`.
    pub async fn recv(&mut self) -> Result<Pkt, String> {
        match tokio::time::timeout(WAIT, read_packet(&mut self.stream)).await {
            Ok(bytes) => wire::parse(&bytes?, self.v5),
            Err(_) => Err(format!("no packet within {WAIT:?}")),
        }
    }

    /// The next packet, or None once the broker closed the connection; panics if neither
    /// happens within `WAIT`.
    pub async fn recv_or_closed(&mut self) -> Option<Pkt> {
        match tokio::time::timeout(WAIT, read_packet(&mut self.stream)).await {
            Ok(Ok(bytes)) => Some(wire::parse(&bytes, self.v5).expect("parse")),
            Ok(Err(_)) => None,
            Err(_) => panic!("neither a packet nor a close within {WAIT:?}"),
        }
    }

    /// DISCONNECT, then waits (bounded) until the broker has closed the connection, so
    /// that the broker has processed everything sent before.
    pub async fn disconnect(mut self) {
        self.send(&wire::disconnect())
            .await
            .expect("send DISCONNECT");
        if let Some(p) = self.recv_or_closed().await {
            panic!("expected the connection to close after DISCONNECT, got {p:?}");
        }
    }

    /// SUBSCRIBE one filter and wait for its SUBACK; returns the granted code.
    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> u8 {
        self.send(&wire::subscribe(self.v5, 1, filter, qos))
            .await
            .expect("send SUBSCRIBE");
        loop {
            match self.recv().await.expect("SUBACK") {
                Pkt::SubAck { pkid: 1, codes } => return codes[0],
                Pkt::Publish { .. } => continue,
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }
    }

    /// Publishes and waits for the PUBACK (QoS 1) or runs PUBREC/PUBREL/PUBCOMP (QoS 2);
    /// returns the PUBACK/PUBREC reason code. Deliveries to this connection in between
    /// are not expected.
    pub async fn publish_acked(
        &mut self,
        qos: u8,
        retain: bool,
        pkid: u16,
        topic: &str,
        payload: &[u8],
    ) -> u8 {
        self.send(&wire::publish(self.v5, qos, retain, pkid, topic, payload))
            .await
            .expect("send PUBLISH");
        let reason = match self.recv().await.expect("PUBACK/PUBREC") {
            Pkt::Ack {
                kind,
                pkid: p,
                reason,
            } if p == pkid && (kind == wire::PUBACK || kind == wire::PUBREC) => reason,
            other => panic!("expected the acknowledgement of {pkid}, got {other:?}"),
        };
        if qos == 2 && reason < 0x80 {
            self.send(&wire::ack(wire::PUBREL, pkid))
                .await
                .expect("PUBREL");
            match self.recv().await.expect("PUBCOMP") {
                Pkt::Ack {
                    kind: wire::PUBCOMP,
                    pkid: p,
                    ..
                } if p == pkid => {}
                other => panic!("expected PUBCOMP {pkid}, got {other:?}"),
            }
        }
        reason
    }
}

/// A tmpfs mounted on a directory, unmounted on drop (SPEC 7's full-disk test).
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// `mount -t tmpfs -o size=SIZE tmpfs DIR` (needs root, as in CI).
    pub fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }
}

impl Tmpfs {
    /// [`Tmpfs::mount`], or None (after saying so) when mounting is not possible and
    /// `CERTMQ_SKIP_MOUNT_TESTS` is set; otherwise a failure to mount fails the test, since
    /// CI runs as root.
    pub fn mount_or_skip(dir: &Path, size: &str) -> Option<Tmpfs> {
        match Tmpfs::mount(dir, size) {
            Ok(m) => Some(m),
            Err(e) if std::env::var_os("CERTMQ_SKIP_MOUNT_TESTS").is_some() => {
                eprintln!("skipped (CERTMQ_SKIP_MOUNT_TESTS is set): {e}");
                None
            }
            Err(e) => panic!("{e}; this test needs root (set CERTMQ_SKIP_MOUNT_TESTS to skip it)"),
        }
    }
}

impl Tmpfs {
    /// `mount -o remount,MODE DIR`: `ro` makes the store read-only under a running broker
    /// (root bypasses file permissions, a read-only file system it cannot), `rw` undoes it.
    pub fn remount(&self, mode: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "remount {mode} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("mount")
            .args(["-o", "remount,rw"])
            .arg(&self.dir)
            .status();
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still holds a file there: detach it so the tempdir can go.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Writes `path` until the file system is full (ENOSPC), down to the last byte.
pub fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).expect("create filler");
    for chunk in [1 << 16, 4096, 512, 1] {
        let buf = vec![0x5a; chunk];
        loop {
            match f.write(&buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    // Data already written stays; a failing fsync only says the disk is full.
    let _ = f.sync_all();
}

/// SplitMix64: a small seeded generator, so a failing run can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo) as u64) as usize
    }
}
