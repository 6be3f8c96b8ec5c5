//! The field's own clients as test peers: Mosquitto's `mosquitto_pub` / `mosquitto_sub`
//! and a paho-mqtt script, spawned as child processes against the in-process broker.
//!
//! Why a guard around every child: a broker bug that never answers (no CONNACK, no
//! PUBACK) must fail its test in bounded time, and a failed test must not leave a client
//! running. [`Spawned`] bounds every wait ([`CHILD_TIMEOUT`] unless told otherwise) and
//! kills the process when it is dropped, on every path, panics included.
//!
//! Why skip instead of fail by default: `cargo test` must pass on a machine with only the
//! Rust toolchain (README). CI installs the clients and sets `CERTMQ_REQUIRE_MOSQUITTO` /
//! `CERTMQ_REQUIRE_PAHO`, which turn a missing client into a failure.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::task::JoinHandle;

use super::Fixture;

/// How long one client program may run, or take to print its next line.
pub const CHILD_TIMEOUT: Duration = Duration::from_secs(10);

/// Set by CI: a missing Mosquitto client is a failure, not a skip.
pub const REQUIRE_MOSQUITTO: &str = "CERTMQ_REQUIRE_MOSQUITTO";
/// Set by CI: a missing python3 or paho-mqtt 2.x is a failure, not a skip.
pub const REQUIRE_PAHO: &str = "CERTMQ_REQUIRE_PAHO";

/// Whether `program` is an executable file in one of `PATH`'s folders.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            std::fs::metadata(dir.join(program)).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
        })
    })
}

/// Decides what a test does without its client: `true` to run; `false` (after printing
/// why) to skip; a panic when `require_var` is set in the environment.
pub fn available(what: &str, present: bool, require_var: &str) -> bool {
    if present {
        return true;
    }
    if std::env::var_os(require_var).is_some() {
        panic!("{what}: not installed, and {require_var} is set");
    }
    eprintln!("skipped: {what}: not installed (set {require_var} to make this a failure)");
    false
}

/// `mosquitto_pub` and `mosquitto_sub` are both installed (or the test is skipped/fails).
pub fn mosquitto_available() -> bool {
    available(
        "mosquitto_pub and mosquitto_sub",
        on_path("mosquitto_pub") && on_path("mosquitto_sub"),
        REQUIRE_MOSQUITTO,
    )
}

/// `python3` with paho-mqtt 2.x is installed (or the test is skipped/fails).
pub async fn paho_available() -> bool {
    let present = on_path("python3")
        && {
            let mut probe = Command::new("python3");
            probe.args([
            "-c",
            "import sys, paho.mqtt; sys.exit(0 if paho.mqtt.__version__.split('.')[0] == '2' else 1)",
        ]);
            run("python3 paho probe", probe).await.code == Some(0)
        };
    available("python3 with paho-mqtt 2.x", present, REQUIRE_PAHO)
}

/// The MQTT version a Mosquitto client speaks (`-V`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

impl Version {
    pub fn flag(self) -> &'static str {
        match self {
            Version::V311 => "mqttv311",
            Version::V5 => "mqttv5",
        }
    }
}

/// One client's TLS files, written into the fixture directory.
#[derive(Debug, Clone)]
pub struct Creds {
    pub cafile: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Creds {
    /// Writes `<name>.pem` (leaf, then any intermediates) and `<name>.key`; the CA file
    /// is the fixture root that issued the server certificate.
    pub fn write(fx: &Fixture, name: &str, chain_pem: &str, key_pem: &str) -> Creds {
        Creds {
            cafile: fx.path("root.pem"),
            cert: fx.write(&format!("{name}.pem"), chain_pem),
            key: fx.write(&format!("{name}.key"), key_pem),
        }
    }

    /// Files that already exist (e.g. `certs-example/`).
    pub fn files(cafile: &Path, cert: &Path, key: &Path) -> Creds {
        Creds {
            cafile: cafile.to_owned(),
            cert: cert.to_owned(),
            key: key.to_owned(),
        }
    }
}

/// `mosquitto_pub` or `mosquitto_sub` with `-h localhost -p PORT -V ... --cafile --cert
/// --key`; the caller adds topic, message and flags. `localhost` because the host must be
/// in the server certificate's SAN (NOTES.md).
pub fn mosquitto(program: &str, port: u16, version: Version, creds: &Creds) -> Command {
    let mut cmd = Command::new(program);
    let args: [OsString; 10] = [
        "-h".into(),
        "localhost".into(),
        "-p".into(),
        port.to_string().into(),
        "-V".into(),
        version.flag().into(),
        "--cafile".into(),
        creds.cafile.clone().into(),
        "--cert".into(),
        creds.cert.clone().into(),
    ];
    cmd.args(args).arg("--key").arg(&creds.key);
    cmd
}

/// What a finished child printed and how it ended.
pub struct Finished {
    /// `None` when a signal ended the process.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// Both streams, for assertions on text a client may print to either.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// Asserts exit status 0, showing everything the client printed otherwise.
    #[track_caller]
    pub fn assert_success(&self) {
        assert_eq!(self.code, Some(0), "client failed:\n{self}");
    }
}

impl fmt::Display for Finished {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// A running child process: stdout read line by line, stderr collected in the
/// background. Killed when dropped.
pub struct Spawned {
    name: String,
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    /// Lines already handed out by [`Spawned::next_line`], kept for [`Finished::stdout`].
    seen: String,
    stderr: Option<JoinHandle<String>>,
    /// The bound on each wait: the next line, or the exit.
    timeout: Duration,
}

impl Spawned {
    /// Starts `cmd` with stdin closed and both outputs piped. `name` labels failures.
    pub fn spawn(name: &str, cmd: Command) -> Spawned {
        Spawned::spawn_with_timeout(name, cmd, CHILD_TIMEOUT)
    }

    /// [`Spawned::spawn`] for a program that needs longer than [`CHILD_TIMEOUT`].
    pub fn spawn_with_timeout(name: &str, mut cmd: Command, timeout: Duration) -> Spawned {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let mut err = child.stderr.take().expect("piped stderr");
        let stderr = tokio::spawn(async move {
            let mut buf = Vec::new();
            let _ = err.read_to_end(&mut buf).await;
            String::from_utf8_lossy(&buf).into_owned()
        });
        Spawned {
            name: name.to_owned(),
            child,
            stdout,
            seen: String::new(),
            stderr: Some(stderr),
            timeout,
        }
    }

    /// The next line on stdout, within the timeout; panics (with what the child
    /// printed) on a timeout or an early exit.
    pub async fn next_line(&mut self) -> String {
        match tokio::time::timeout(self.timeout, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => {
                self.seen.push_str(&line);
                self.seen.push('\n');
                line
            }
            Ok(Ok(None)) => {
                let done = self.finish().await;
                panic!("{} exited before printing a line:\n{done}", self.name)
            }
            Ok(Err(e)) => panic!("{}: reading stdout: {e}", self.name),
            Err(_) => panic!(
                "{}: no line within {:?}; so far:\n{}",
                self.name, self.timeout, self.seen
            ),
        }
    }

    /// Waits for the child to exit on its own (within the timeout) and returns all
    /// it printed, lines already read included.
    pub async fn finish(&mut self) -> Finished {
        let name = self.name.clone();
        let waited = tokio::time::timeout(self.timeout, async {
            while let Some(line) = self
                .stdout
                .next_line()
                .await
                .unwrap_or_else(|e| panic!("{name}: reading stdout: {e}"))
            {
                self.seen.push_str(&line);
                self.seen.push('\n');
            }
            let status = self
                .child
                .wait()
                .await
                .unwrap_or_else(|e| panic!("{name}: wait: {e}"));
            let stderr = match self.stderr.take() {
                Some(task) => task.await.unwrap_or_default(),
                None => String::new(),
            };
            (status, stderr)
        })
        .await;
        match waited {
            Ok((status, stderr)) => Finished {
                code: status.code(),
                stdout: self.seen.clone(),
                stderr,
            },
            Err(_) => panic!(
                "{} did not exit within {:?}; stdout so far:\n{}",
                self.name, self.timeout, self.seen
            ),
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // Already exited: the error is expected and harmless.
        let _ = self.child.start_kill();
    }
}

/// Runs `cmd` to completion under [`CHILD_TIMEOUT`].
pub async fn run(name: &str, cmd: Command) -> Finished {
    Spawned::spawn(name, cmd).finish().await
}

/// Splits one shell command line into words: bare words, '…' and "…" (no escapes, no
/// expansions), which is all the README's examples use. Panics on anything else so that
/// a README change this cannot read fails loudly instead of being misread.
pub fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' | '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some(q) if q == c => break,
                        Some('\\' | '$' | '`') if c == '"' => {
                            panic!("escapes and expansions are not supported: {line}")
                        }
                        Some(other) => word.push(other),
                        None => panic!("unterminated quote in: {line}"),
                    }
                }
            }
            '\\' | '$' | '`' | ';' | '|' | '&' | '<' | '>' | '*' | '?' => {
                panic!("shell syntax {c:?} is not supported: {line}")
            }
            other => {
                in_word = true;
                word.push(other);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}
