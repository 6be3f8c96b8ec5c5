//! What ties a running broker to its `data_dir` (contract §1): an exclusive lock, so that two
//! brokers can never run on one `data_dir`, and a control socket, through which `certmq
//! reload` asks exactly the broker of that `data_dir` to reload (never "every process named
//! certmq on the host", as `kill -HUP $(pidof certmq)` does).
//!
//! - `data_dir/certmq.lock`: `flock`-ed exclusively for the broker's lifetime; it holds the
//!   broker's pid, so the second broker's error names the process that holds it. The lock
//!   goes with the process, also after `kill -9`: no stale lock to clean up.
//! - `data_dir/certmq.sock`: a Unix socket, mode 0600 (the broker's user only). One request
//!   per connection, then the broker closes it: the line `reload`, answered `reloaded ...`
//!   or `refused` followed by one line per problem; or the line `online` (for `certmq
//!   devices list|show`), answered with one JSON object `{"online": {DEVICE: CONNECTIONS}}`
//!   naming each device with a live connection.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::{ServerError, Shared};

/// The lock file inside `data_dir`.
pub const LOCK_FILE: &str = "certmq.lock";
/// The control socket inside `data_dir`.
pub const SOCKET_FILE: &str = "certmq.sock";
/// How long the control socket waits for a request line.
const REQUEST_LIMIT: Duration = Duration::from_secs(5);

/// Why the `data_dir` could not be claimed or reached.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create the data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the lock file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("data_dir {data_dir} is in use by another broker (process {pid}, lock file {lock})")]
    Held {
        data_dir: PathBuf,
        pid: String,
        lock: PathBuf,
    },
    #[error("cannot listen on the control socket {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no broker runs on data_dir {data_dir} (no control socket answers at {path})")]
    NotRunning {
        data_dir: PathBuf,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the broker on {path} did not answer")]
    Talk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The broker's exclusive claim on its `data_dir`; released when dropped (or the process
/// ends, whatever the way).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Takes the lock, or says which process holds it.
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock, ControlError> {
        std::fs::create_dir_all(data_dir).map_err(|source| ControlError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join(LOCK_FILE);
        let open = |source| ControlError::Open {
            path: path.clone(),
            source,
        };
        let rw = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path);
        // A read-only data_dir still gets locked through an existing lock file (flock
        // works on a read-only descriptor), so the error the operator sees is the one that
        // names the database that cannot be written.
        let mut file = match rw {
            Ok(f) => f,
            Err(e) => File::open(&path).map_err(|_| open(e))?,
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(ControlError::Held {
                    data_dir: data_dir.to_path_buf(),
                    pid: match pid.trim() {
                        "" => "unknown".to_owned(),
                        p => p.to_owned(),
                    },
                    lock: path,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(open(e)),
        }
        // Ours now: record who holds it (a diagnostic only; the lock is the flock).
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = writeln!(file, "{}", std::process::id());
        let _ = file.flush();
        Ok(DataDirLock { _file: file })
    }
}

/// Binds the control socket of `data_dir`. Call only while holding its [`DataDirLock`]:
/// a socket file left by a broker that was killed is then certainly stale and replaced.
pub fn bind(data_dir: &Path) -> Result<UnixListener, ControlError> {
    let path = data_dir.join(SOCKET_FILE);
    let listen = |source| ControlError::Listen {
        path: path.clone(),
        source,
    };
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen(e)),
    }
    let listener = UnixListener::bind(&path).map_err(listen)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(listen)?;
    Ok(listener)
}

/// Serves control requests until shutdown.
pub async fn serve(listener: UnixListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // One at a time: reloads are serialised anyway, and the socket is the operator's.
        if let Err(e) = answer(stream, &shared).await {
            tracing::warn!(error = %e, "control request failed");
        }
    }
}

/// Reads one request line and answers it.
async fn answer(stream: UnixStream, shared: &Arc<Shared>) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let mut rd = BufReader::new(tokio::io::AsyncReadExt::take(rd, 64));
    match tokio::time::timeout(REQUEST_LIMIT, rd.read_line(&mut line)).await {
        Ok(r) => {
            r?;
        }
        Err(_) => return Ok(()),
    }
    let reply = match line.trim() {
        // A probe (`certmq check` asking whether a broker runs here): nothing to answer.
        "" => return Ok(()),
        "reload" => {
            let s = shared.clone();
            let outcome = tokio::task::spawn_blocking(move || s.reload()).await;
            match outcome {
                Ok(r) => reload_reply(&r, "reload command"),
                Err(e) => format!("refused\nthe reload task failed: {e}\n"),
            }
        }
        "online" => {
            let online: serde_json::Map<String, serde_json::Value> = shared
                .live
                .online()
                .into_iter()
                .map(|(device, n)| (device, n.into()))
                .collect();
            format!("{}\n", serde_json::json!({ "online": online }))
        }
        other => format!("refused\nunknown request {other:?}\n"),
    };
    wr.write_all(reply.as_bytes()).await?;
    wr.shutdown().await
}

/// Logs a reload's outcome (as SIGHUP and `certmq reload` both do) and returns the reply
/// `certmq reload` prints: `reloaded ...`, or `refused` and one line per problem.
pub fn reload_reply(outcome: &Result<super::ReloadOutcome, ServerError>, trigger: &str) -> String {
    match outcome {
        Ok(o) => {
            tracing::info!(
                kept = o.recheck.kept,
                revoked = o.recheck.revoked,
                subscriptions_removed = o.recheck.subscriptions_removed,
                sessions_forgotten = o.recheck.sessions_forgotten,
                "{trigger}: configuration reloaded"
            );
            format!(
                "reloaded: {} sessions kept, {} revoked, {} subscriptions removed\n",
                o.recheck.kept, o.recheck.revoked, o.recheck.subscriptions_removed
            )
        }
        Err(ServerError::Config(e)) => {
            tracing::error!("{trigger}: reload refused, keeping the running configuration: {e}");
            let mut reply = format!("refused\n{e}\n");
            for p in &e.problems {
                tracing::error!("  {p}");
                reply.push_str(&format!("  {p}\n"));
            }
            reply
        }
        Err(e) => {
            let text = error_chain(e);
            tracing::error!("{trigger}: reload refused, keeping the running configuration: {text}");
            format!("refused\n{text}\n")
        }
    }
}

/// An error and its causes as one sentence.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Whether a broker runs on `data_dir`: its control socket accepts a connection (closed
/// at once without a request, which the broker answers and forgets).
pub fn broker_running(data_dir: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(data_dir.join(SOCKET_FILE)).is_ok()
}

/// `certmq reload`: asks the broker of `data_dir` to reload and returns its answer.
pub fn request_reload(data_dir: &Path) -> Result<String, ControlError> {
    let path = data_dir.join(SOCKET_FILE);
    let mut stream = std::os::unix::net::UnixStream::connect(&path).map_err(|source| {
        ControlError::NotRunning {
            data_dir: data_dir.to_path_buf(),
            path: path.clone(),
            source,
        }
    })?;
    let talk = |source| ControlError::Talk {
        path: path.clone(),
        source,
    };
    // A reload re-checks every session: give it time, but never wait forever.
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(talk)?;
    stream.write_all(b"reload\n").map_err(talk)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).map_err(talk)?;
    Ok(reply)
}

/// The devices with a live connection on the broker of `data_dir`, with their number of
/// connections; `None` when that is unknown: no broker runs there, this user may not use
/// its socket, or the broker does not answer the request (an older certmq).
pub fn request_online(data_dir: &Path) -> Option<std::collections::BTreeMap<String, u64>> {
    let path = data_dir.join(SOCKET_FILE);
    let mut stream = std::os::unix::net::UnixStream::connect(path).ok()?;
    stream.set_read_timeout(Some(REQUEST_LIMIT)).ok()?;
    stream.write_all(b"online\n").ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    let value: serde_json::Value = serde_json::from_str(&reply).ok()?;
    value
        .get("online")?
        .as_object()?
        .iter()
        .map(|(device, n)| Some((device.clone(), n.as_u64()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_on_a_data_dir_names_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = DataDirLock::acquire(dir.path()).expect("first");
        match DataDirLock::acquire(dir.path()) {
            Err(ControlError::Held { pid, .. }) => {
                assert_eq!(pid, std::process::id().to_string())
            }
            other => panic!("expected Held, got {other:?}"),
        }
        drop(first);
        DataDirLock::acquire(dir.path()).expect("free again once released");
    }
}
