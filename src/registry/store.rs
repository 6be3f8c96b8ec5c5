//! SQLite storage of the registry: `data_dir/certmq.db`, created on first start, in WAL
//! mode so that the broker and the `certmq devices` CLI can use it at the same time.
//!
//! Provisioning and rotation commit with `synchronous = FULL` before CONNACK: a device
//! that was told it is admitted survives `kill -9` and power loss. `last_seen_at` is not
//! worth an fsync per connection: it is collected in memory and written in one transaction
//! by [`Registry::flush_last_seen`], which the server calls every second and at shutdown.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{decide, Admitted, Device, Imported, Mode, Presented, Refusal, Source};
use crate::cert::{now_secs, Fingerprint, Validity};
use crate::config::PinnedDevice;

/// `PRAGMA application_id` of a certmq database ("cmq1"): a foreign SQLite file in
/// `data_dir` is refused instead of being written into.
const APPLICATION_ID: i64 = 0x636d_7131;
/// Schema version in `PRAGMA user_version`. Version 2 added `dropped_messages`; a version
/// 1 file is migrated in place at open.
const SCHEMA_VERSION: i64 = 2;
/// The database file name inside `data_dir`.
pub const DB_FILE: &str = "certmq.db";

/// Registry storage failures.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot create the data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// Access rights (the file, its folder): the message says what is wrong in words and
    /// names the owners, modes and the user this process runs as, in place of SQLite's
    /// `SQLITE_READONLY_DIRECTORY` or `SQLITE_CANTOPEN` (kept in `sqlite` for debugging).
    #[error("cannot open the registry {path}: {detail}")]
    Denied {
        path: PathBuf,
        detail: String,
        sqlite: rusqlite::Error,
    },
    #[error("cannot read the registry {path} ({detail})")]
    Unreadable {
        path: PathBuf,
        detail: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the registry {path} ({detail})")]
    Unwritable {
        path: PathBuf,
        detail: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a certmq database (application_id {found:#x}); refusing to use it")]
    Foreign { path: PathBuf, found: i64 },
    #[error("{path} has schema version {found}, this certmq knows {SCHEMA_VERSION}")]
    Schema { path: PathBuf, found: i64 },
    /// contract §7: a damaged file is refused at start, never used silently.
    #[error("{path} is damaged (SQLite quick_check: {report}); refusing to use it")]
    Damaged { path: PathBuf, report: String },
    #[error("{path}: the write-ahead log was not fully checkpointed ({done} of {log} pages; another process is reading it)")]
    CheckpointBusy { path: PathBuf, log: i64, done: i64 },
    #[error("registry database error")]
    Sqlite(#[from] rusqlite::Error),
    #[error("registry row for {name:?} holds an invalid fingerprint")]
    BadRow { name: String },
    #[error("no device named {0:?}")]
    UnknownDevice(String),
    #[error("the registry lock was poisoned by a panic")]
    Poisoned,
    /// Used after [`Registry::close`]: the broker is stopping.
    #[error("the registry {path} is closed (the broker is stopping)")]
    Closed { path: PathBuf },
    /// Cluster mode: the bucket cannot be read or written now (NATS unreachable, a
    /// timeout, JetStream refusing). Provisioning and rotation are then refused.
    #[error("NATS bucket {bucket}: {reason}")]
    Unavailable { bucket: String, reason: String },
    /// Cluster mode: a value in the bucket that is not a certmq registry record.
    #[error("the registry record of {name:?} cannot be read: {reason}")]
    BadRecord { name: String, reason: String },
    /// Cluster mode: the device's entry changed under every compare-and-set attempt.
    #[error("device {name:?}: the registry entry changed during {attempts} attempts to write it")]
    Contention { name: String, attempts: usize },
}

/// How [`Registry::open_existing`] opens the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// An error opening `path`: for access rights, one that says what is wrong in words and
/// names owners, modes and this process's user.
fn open_error(path: &Path, source: rusqlite::Error) -> RegistryError {
    match crate::sqlite::access_problem(&source) {
        Some(problem) => RegistryError::Denied {
            path: path.to_path_buf(),
            detail: format!("{problem} ({})", crate::sqlite::access_detail(path)),
            sqlite: source,
        },
        None => RegistryError::Open {
            path: path.to_path_buf(),
            source,
        },
    }
}

/// SQLite's `-wal` or `-shm` file next to a database file.
fn wal_file(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The registry's connection, locked; only made while it is open (see `Registry::lock`).
struct Conn<'a>(std::sync::MutexGuard<'a, Option<Connection>>);

impl std::ops::Deref for Conn<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.0.as_ref().expect("checked open in Registry::lock")
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        self.0.as_mut().expect("checked open in Registry::lock")
    }
}

/// What [`Registry::sync_pinned`] found.
#[derive(Debug, Default)]
pub struct PinnedSync {
    /// (pinned name, anchor) pairs: the registry holds the name for that anchor.
    pub conflicts: Vec<(String, String)>,
    /// Pinned names whose row was missing and is (or, in a dry run, would be) created.
    pub created: Vec<String>,
}

/// Refused certificates are named by the device they belong to (`tls::KnownDevices`).
impl crate::tls::KnownDevices for Registry {
    fn device_with(&self, fingerprint: &Fingerprint) -> Option<String> {
        self.name_of(fingerprint).ok().flatten()
    }
}

/// The registry. The connection sits behind a std Mutex: every operation is a short
/// synchronous SQLite call, never held across an await; the server calls the writing ones
/// from `spawn_blocking` because a commit waits for fsync.
#[derive(Debug)]
pub struct Registry {
    path: PathBuf,
    /// `None` once [`Registry::close`] ran (a graceful stop).
    conn: Mutex<Option<Connection>>,
    /// last_seen_at updates waiting for the next flush.
    seen: Mutex<HashMap<String, i64>>,
    /// Messages dropped for each device's sessions (contract §7: a full queue), waiting for the
    /// next flush into `dropped_messages`.
    dropped: Mutex<HashMap<String, u64>>,
}

impl Registry {
    /// Opens (creating if needed) `data_dir/certmq.db`.
    pub fn open(data_dir: &Path) -> Result<Registry, RegistryError> {
        std::fs::create_dir_all(data_dir).map_err(|source| RegistryError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join(DB_FILE);
        let conn = Connection::open(&path).map_err(|source| open_error(&path, source))?;
        let registry = Registry::with(path, conn);
        registry.init().map_err(|e| registry.named(e))?;
        Ok(registry)
    }

    /// Opens `data_dir/certmq.db` for a CLI command if it exists, never creating it nor
    /// `data_dir` (docs/contract.md, "Operations": `check`, `explain` and `devices
    /// list|show` never create or modify a database; run as root before the first start
    /// they must not leave a root-owned file the broker's user cannot open). `Ok(None)`:
    /// no registry yet.
    ///
    /// [`Access::ReadOnly`] opens the file read-only: no migration, no journal mode
    /// change, no write. As root, SQLite gives the `-wal` and `-shm` files it may create
    /// the database file's owner. [`Access::ReadWrite`] (the `devices` commands that
    /// change a row) opens it as the broker does, without creating it.
    pub fn open_existing(
        data_dir: &Path,
        access: Access,
    ) -> Result<Option<Registry>, RegistryError> {
        let path = data_dir.join(DB_FILE);
        match std::fs::metadata(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(RegistryError::Unreadable {
                    detail: crate::sqlite::access_detail(&path),
                    path,
                    source,
                })
            }
        }
        if access == Access::ReadWrite {
            // SQLite would open a file it may not write read-only, and fail at the write.
            for file in [
                path.clone(),
                wal_file(&path, "-wal"),
                wal_file(&path, "-shm"),
            ] {
                crate::sqlite::writable_file(&file).map_err(|source| {
                    RegistryError::Unwritable {
                        detail: crate::sqlite::access_detail(&file),
                        path: file.clone(),
                        source,
                    }
                })?;
            }
        }
        use rusqlite::OpenFlags;
        let flags = match access {
            Access::ReadOnly => OpenFlags::SQLITE_OPEN_READ_ONLY,
            Access::ReadWrite => OpenFlags::SQLITE_OPEN_READ_WRITE,
        } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&path, flags)
            .map_err(|source| open_error(&path, source))?;
        let registry = Registry::with(path, conn);
        match access {
            Access::ReadOnly => registry.check_read_only(),
            Access::ReadWrite => registry.init(),
        }
        .map_err(|e| registry.named(e))?;
        Ok(Some(registry))
    }

    fn with(path: PathBuf, conn: Connection) -> Registry {
        Registry {
            path,
            conn: Mutex::new(Some(conn)),
            seen: Mutex::new(HashMap::new()),
            dropped: Mutex::new(HashMap::new()),
        }
    }

    /// What [`Registry::init`] checks, without writing: a certmq registry of this schema.
    fn check_read_only(&self) -> Result<(), RegistryError> {
        let conn = self.lock()?;
        let app_id: i64 = conn.query_row("PRAGMA application_id", [], |r| r.get(0))?;
        if app_id != APPLICATION_ID {
            return Err(RegistryError::Foreign {
                path: self.path.clone(),
                found: app_id,
            });
        }
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version != SCHEMA_VERSION {
            return Err(RegistryError::Schema {
                path: self.path.clone(),
                found: version,
            });
        }
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(())
    }

    /// Names the file in a database error met while opening (read-only file system,
    /// locked, corrupt...), so the startup error says which file.
    fn named(&self, e: RegistryError) -> RegistryError {
        match e {
            RegistryError::Sqlite(source) => open_error(&self.path, source),
            RegistryError::Open { source, .. } => open_error(&self.path, source),
            other => other,
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> Result<Conn<'_>, RegistryError> {
        let guard = self.conn.lock().map_err(|_| RegistryError::Poisoned)?;
        if guard.is_none() {
            return Err(RegistryError::Closed {
                path: self.path.clone(),
            });
        }
        Ok(Conn(guard))
    }

    fn init(&self) -> Result<(), RegistryError> {
        let conn = self.lock()?;
        let open_err = |source| RegistryError::Open {
            path: self.path.clone(),
            source,
        };
        // A file that is not SQLite at all fails here, with SQLite's "file is not a database".
        let app_id: i64 = conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(open_err)?;
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(open_err)?;
        if app_id != APPLICATION_ID && (app_id != 0 || tables != 0) {
            return Err(RegistryError::Foreign {
                path: self.path.clone(),
                found: app_id,
            });
        }
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // journal_mode answers with a row, hence the _and_check form.
        let _mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        if app_id == 0 {
            conn.execute_batch(&format!(
                "BEGIN IMMEDIATE;
                 CREATE TABLE IF NOT EXISTS devices (
                     name TEXT PRIMARY KEY NOT NULL,
                     source TEXT NOT NULL,
                     fingerprint TEXT NOT NULL,
                     not_before INTEGER NOT NULL,
                     not_after INTEGER NOT NULL,
                     enabled INTEGER NOT NULL DEFAULT 1,
                     created_at INTEGER NOT NULL,
                     updated_at INTEGER NOT NULL,
                     last_seen_at INTEGER,
                     dropped_messages INTEGER NOT NULL DEFAULT 0
                 );
                 PRAGMA application_id = {APPLICATION_ID};
                 PRAGMA user_version = {SCHEMA_VERSION};
                 COMMIT;"
            ))?;
        } else {
            let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
            if version == 1 {
                conn.execute_batch(&format!(
                    "BEGIN IMMEDIATE;
                     ALTER TABLE devices ADD COLUMN dropped_messages INTEGER NOT NULL DEFAULT 0;
                     PRAGMA user_version = {SCHEMA_VERSION};
                     COMMIT;"
                ))?;
            } else if version != SCHEMA_VERSION {
                return Err(RegistryError::Schema {
                    path: self.path.clone(),
                    found: version,
                });
            }
        }
        Ok(())
    }

    /// contract §3 step 7 in one IMMEDIATE transaction: the lookup and the write (provisioning
    /// or rotation) cannot interleave with another connection or the CLI.
    pub fn admit(
        &self,
        presented: &Presented<'_>,
        mode: Mode,
    ) -> Result<Result<Admitted, Refusal>, RegistryError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(match mode {
            Mode::Commit => TransactionBehavior::Immediate,
            Mode::DryRun => TransactionBehavior::Deferred,
        })?;
        let stored = get(&tx, presented.name.as_str())?;
        let outcome = decide(stored.as_ref(), presented);
        if mode == Mode::DryRun {
            return Ok(outcome);
        }
        let now = now_secs();
        match &outcome {
            Ok(Admitted::Provisioned) => {
                tx.execute(
                    "INSERT INTO devices (name, source, fingerprint, not_before, not_after,
                         enabled, created_at, updated_at, last_seen_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?6, ?6)",
                    params![
                        presented.name.as_str(),
                        presented.source.as_str(),
                        presented.fingerprint.to_hex(),
                        presented.validity.not_before,
                        presented.validity.not_after,
                        now
                    ],
                )?;
            }
            Ok(Admitted::Rotated { .. }) => {
                tx.execute(
                    "UPDATE devices SET fingerprint = ?2, not_before = ?3, not_after = ?4,
                         updated_at = ?5 WHERE name = ?1",
                    params![
                        presented.name.as_str(),
                        presented.fingerprint.to_hex(),
                        presented.validity.not_before,
                        presented.validity.not_after,
                        now
                    ],
                )?;
            }
            Ok(Admitted::Known) | Err(_) => {}
        }
        tx.commit()?;
        Ok(outcome)
    }

    /// Enters the config's pinned devices (contract §3 step 7, at start and on reload).
    /// Conflicts are the names that the registry holds for an anchor: a config error,
    /// reported by the caller; nothing is written then. Otherwise `created` lists the pinned
    /// names whose row was missing (never seen, or deleted by `certmq devices delete`) and
    /// is now (re)created: a new registry entry, so sessions left under that name belong to
    /// the deleted one (contract §4).
    pub fn sync_pinned(
        &self,
        pinned: &[PinnedDevice],
        mode: Mode,
    ) -> Result<PinnedSync, RegistryError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(match mode {
            Mode::Commit => TransactionBehavior::Immediate,
            Mode::DryRun => TransactionBehavior::Deferred,
        })?;
        let mut out = PinnedSync::default();
        for p in pinned {
            match get(&tx, p.name.as_str())? {
                Some(Device {
                    source: Source::Anchor(anchor),
                    ..
                }) => out.conflicts.push((p.name.to_string(), anchor)),
                Some(_) => {}
                None => out.created.push(p.name.to_string()),
            }
        }
        if !out.conflicts.is_empty() || mode == Mode::DryRun {
            return Ok(out);
        }
        let now = now_secs();
        for p in pinned {
            tx.execute(
                "INSERT INTO devices (name, source, fingerprint, not_before, not_after,
                     enabled, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?6)
                 ON CONFLICT(name) DO UPDATE SET fingerprint = excluded.fingerprint,
                     not_before = excluded.not_before, not_after = excluded.not_after,
                     updated_at = excluded.updated_at
                 WHERE fingerprint <> excluded.fingerprint",
                params![
                    p.name.as_str(),
                    Source::Pinned.as_str(),
                    p.info.fingerprint.to_hex(),
                    p.info.validity.not_before,
                    p.info.validity.not_after,
                    now
                ],
            )?;
        }
        tx.commit()?;
        Ok(out)
    }

    /// `devices import`: every device missing here is inserted as it is, in one
    /// transaction; nothing is written when one conflicts (same name, another rule or
    /// certificate). A device already held with the same rule and certificate is left.
    pub fn import(&self, devices: &[Device]) -> Result<Imported, RegistryError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut out = Imported::default();
        for d in devices {
            match get(&tx, &d.name)? {
                None => out.added.push(d.name.clone()),
                Some(held) if held.source == d.source && held.fingerprint == d.fingerprint => {
                    out.present.push(d.name.clone())
                }
                Some(held) => out
                    .conflicts
                    .push((d.name.clone(), super::held_text(&held))),
            }
        }
        if !out.conflicts.is_empty() {
            out.added.clear();
            return Ok(out);
        }
        let now = now_secs();
        let added: std::collections::HashSet<&str> = out.added.iter().map(String::as_str).collect();
        for d in devices.iter().filter(|d| added.contains(d.name.as_str())) {
            tx.execute(
                "INSERT INTO devices (name, source, fingerprint, not_before, not_after,
                     enabled, created_at, updated_at, last_seen_at, dropped_messages)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    d.name,
                    d.source.as_str(),
                    d.fingerprint.to_hex(),
                    d.validity.not_before,
                    d.validity.not_after,
                    d.enabled,
                    d.created_at,
                    now,
                    d.last_seen_at,
                    i64::try_from(d.dropped_messages).unwrap_or(i64::MAX)
                ],
            )?;
        }
        tx.commit()?;
        Ok(out)
    }

    /// One device.
    pub fn get(&self, name: &str) -> Result<Option<Device>, RegistryError> {
        let conn = self.lock()?;
        get(&conn, name)
    }

    /// The device whose current certificate has `fingerprint`, if any.
    pub fn name_of(&self, fingerprint: &Fingerprint) -> Result<Option<String>, RegistryError> {
        let conn = self.lock()?;
        Ok(conn
            .query_row(
                "SELECT name FROM devices WHERE fingerprint = ?1",
                params![fingerprint.to_hex()],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Indexes the registry by fingerprint, so that [`Registry::name_of`] is one lookup
    /// however many devices there are. Idempotent; a database without the index (opened
    /// read-only, or by an older certmq) answers the same, by a scan. Called by the broker.
    pub fn index_fingerprints(&self) -> Result<(), RegistryError> {
        let conn = self.lock()?;
        conn.execute_batch(
            "CREATE INDEX IF NOT EXISTS devices_by_fingerprint ON devices (fingerprint)",
        )?;
        Ok(())
    }

    /// Every device, by name.
    pub fn list(&self) -> Result<Vec<Device>, RegistryError> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare(&format!("{SELECT} ORDER BY name"))?;
        let rows = stmt.query_map([], row)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r??);
        }
        Ok(out)
    }

    /// `devices enable|disable NAME`.
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), RegistryError> {
        let conn = self.lock()?;
        let n = conn.execute(
            "UPDATE devices SET enabled = ?2, updated_at = ?3 WHERE name = ?1",
            params![name, enabled, now_secs()],
        )?;
        if n == 0 {
            return Err(RegistryError::UnknownDevice(name.to_owned()));
        }
        Ok(())
    }

    /// `devices delete NAME`.
    pub fn delete(&self, name: &str) -> Result<(), RegistryError> {
        let conn = self.lock()?;
        let n = conn.execute("DELETE FROM devices WHERE name = ?1", params![name])?;
        if n == 0 {
            return Err(RegistryError::UnknownDevice(name.to_owned()));
        }
        Ok(())
    }

    /// SQLite's `data_version`: changes when another connection (the CLI) committed.
    pub fn data_version(&self) -> Result<i64, RegistryError> {
        let conn = self.lock()?;
        Ok(conn.query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    /// Whether the store accepts writes now (the admin health check): takes and releases
    /// the write lock without changing anything.
    pub fn writable(&self) -> Result<(), RegistryError> {
        let conn = self.lock()?;
        conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;")?;
        Ok(())
    }

    /// SQLite's `quick_check` of the whole file, run by the broker at start (contract §7): a
    /// damaged registry is refused, naming the file, never used silently.
    pub fn quick_check(&self) -> Result<(), RegistryError> {
        let conn = self.lock()?;
        match crate::sqlite::quick_check(&conn) {
            Ok(None) => Ok(()),
            Ok(Some(report)) => Err(RegistryError::Damaged {
                path: self.path.clone(),
                report,
            }),
            Err(source) => Err(RegistryError::Open {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Copies the write-ahead log into `certmq.db` and truncates it, so that the file alone
    /// is the whole registry (contract §7, at a graceful stop). The CLI may be reading at that
    /// moment: then part of the log stays, which loses nothing.
    fn checkpoint(&self, conn: &Connection) -> Result<(), RegistryError> {
        let (busy, log, done): (i64, i64, i64) =
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
        if busy != 0 {
            return Err(RegistryError::CheckpointBusy {
                path: self.path.clone(),
                log,
                done,
            });
        }
        Ok(())
    }

    /// The end of a graceful stop: writes pending `last_seen_at` values and drop counts,
    /// checkpoints the write-ahead log into `certmq.db`, then closes
    /// the connection, which removes the `-wal` and `-shm` files when no other process has
    /// the database open. Whatever calls it later gets [`RegistryError::Closed`]. The
    /// connection is closed even when the checkpoint fails; the first error is returned.
    pub fn close(&self) -> Result<(), RegistryError> {
        // What the sessions recorded during the grace period, after the last periodic flush.
        if let Err(e) = self.flush_last_seen() {
            if !matches!(e, RegistryError::Closed { .. }) {
                tracing::warn!(error = %e, "last_seen_at not written at stop");
            }
        }
        let taken = self
            .conn
            .lock()
            .map_err(|_| RegistryError::Poisoned)?
            .take();
        let Some(conn) = taken else {
            return Ok(());
        };
        let checkpointed = self.checkpoint(&conn);
        let closed = conn.close().map_err(|(_, e)| RegistryError::Sqlite(e));
        checkpointed.and(closed)
    }

    /// Records a connection time, written at the next [`Registry::flush_last_seen`].
    pub fn touch(&self, name: &str, at: i64) {
        if let Ok(mut seen) = self.seen.lock() {
            seen.insert(name.to_owned(), at);
        }
    }

    /// Counts messages dropped for a device's sessions, written at the next
    /// [`Registry::flush_last_seen`] (`devices show` reports the total).
    pub fn count_dropped(&self, name: &str, n: u64) {
        if let Ok(mut dropped) = self.dropped.lock() {
            *dropped.entry(name.to_owned()).or_default() += n;
        }
    }

    /// Writes pending `last_seen_at` values and drop counts in one transaction.
    pub fn flush_last_seen(&self) -> Result<usize, RegistryError> {
        let pending: Vec<(String, i64)> = match self.seen.lock() {
            Ok(mut seen) => seen.drain().collect(),
            Err(_) => return Err(RegistryError::Poisoned),
        };
        let dropped: Vec<(String, u64)> = match self.dropped.lock() {
            Ok(mut d) => d.drain().collect(),
            Err(_) => return Err(RegistryError::Poisoned),
        };
        if pending.is_empty() && dropped.is_empty() {
            return Ok(0);
        }
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE devices SET last_seen_at = max(coalesce(last_seen_at, 0), ?2) WHERE name = ?1",
            )?;
            for (name, at) in &pending {
                stmt.execute(params![name, at])?;
            }
            let mut stmt = tx.prepare_cached(
                "UPDATE devices SET dropped_messages = dropped_messages + ?2 WHERE name = ?1",
            )?;
            for (name, n) in &dropped {
                stmt.execute(params![name, i64::try_from(*n).unwrap_or(i64::MAX)])?;
            }
        }
        tx.commit()?;
        Ok(pending.len() + dropped.len())
    }
}

const SELECT: &str = "SELECT name, source, fingerprint, not_before, not_after, enabled, \
                      created_at, last_seen_at, dropped_messages FROM devices";

fn get(conn: &Connection, name: &str) -> Result<Option<Device>, RegistryError> {
    let mut stmt = conn.prepare_cached(&format!("{SELECT} WHERE name = ?1"))?;
    match stmt.query_row(params![name], row).optional()? {
        Some(r) => Ok(Some(r?)),
        None => Ok(None),
    }
}

/// Maps a row; the inner Result carries a bad fingerprint without aborting SQLite's API.
fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Device, RegistryError>> {
    let name: String = r.get(0)?;
    let fp: String = r.get(2)?;
    let Some(fingerprint) = Fingerprint::from_hex(&fp) else {
        return Ok(Err(RegistryError::BadRow { name }));
    };
    Ok(Ok(Device {
        source: Source::from_stored(r.get(1)?),
        fingerprint,
        validity: Validity {
            not_before: r.get(3)?,
            not_after: r.get(4)?,
        },
        enabled: r.get(5)?,
        created_at: r.get(6)?,
        last_seen_at: r.get(7)?,
        dropped_messages: u64::try_from(r.get::<_, i64>(8)?).unwrap_or(0),
        name,
    }))
}

impl Registry {
    /// An empty registry in memory: what `explain` consults before the broker ever ran,
    /// so that it creates no file.
    pub fn in_memory() -> Result<Registry, RegistryError> {
        let path = PathBuf::from(":memory:");
        let conn = Connection::open_in_memory().map_err(|source| RegistryError::Open {
            path: path.clone(),
            source,
        })?;
        let registry = Registry {
            path,
            conn: Mutex::new(Some(conn)),
            seen: Mutex::new(HashMap::new()),
            dropped: Mutex::new(HashMap::new()),
        };
        registry.init()?;
        Ok(registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A graceful stop closes the registry while other handles on it still exist (tasks
    /// that have not dropped theirs yet): the files are final when `close` returns.
    #[test]
    fn close_leaves_the_database_file_alone_and_refuses_later_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = std::sync::Arc::new(Registry::open(dir.path()).expect("open"));
        let held = registry.clone();
        registry
            .lock()
            .expect("lock")
            .execute(
                "INSERT INTO devices (name, source, fingerprint, not_before, not_after, enabled, \
                 created_at, updated_at) VALUES ('d1', 'fleet', ?1, 1, 2, 1, 3, 3)",
                [&"ab".repeat(32)],
            )
            .expect("a device");
        let wal = wal_file(&dir.path().join(DB_FILE), "-wal");
        assert!(wal.exists());
        // Recorded after the last periodic flush: written by the close.
        registry.count_dropped("d1", 3);
        registry.close().expect("close");
        assert!(!wal.exists());
        assert!(!wal_file(&dir.path().join(DB_FILE), "-shm").exists());
        assert!(matches!(held.get("d1"), Err(RegistryError::Closed { .. })));
        registry.close().expect("a second close is harmless");
        let reopened = Registry::open(dir.path()).expect("reopen");
        let d1 = reopened.get("d1").expect("read").expect("kept");
        assert_eq!(d1.dropped_messages, 3);
    }

    /// A registry written by schema version 1 opens, keeps its rows, and counts drops.
    #[test]
    fn a_version_1_registry_is_migrated_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).expect("open");
            conn.execute_batch(&format!(
                "CREATE TABLE devices (
                     name TEXT PRIMARY KEY NOT NULL, source TEXT NOT NULL,
                     fingerprint TEXT NOT NULL, not_before INTEGER NOT NULL,
                     not_after INTEGER NOT NULL, enabled INTEGER NOT NULL DEFAULT 1,
                     created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL,
                     last_seen_at INTEGER);
                 INSERT INTO devices VALUES ('d1', 'fleet', '{}', 1, 2, 0, 3, 3, NULL);
                 PRAGMA application_id = {APPLICATION_ID};
                 PRAGMA user_version = 1;",
                "ab".repeat(32)
            ))
            .expect("v1 schema");
        }
        let registry = Registry::open(dir.path()).expect("migrated");
        let d1 = registry.get("d1").expect("read").expect("kept");
        assert!(!d1.enabled);
        assert_eq!(d1.source, Source::Anchor("fleet".into()));
        assert_eq!(d1.dropped_messages, 0);
        registry.count_dropped("d1", 7);
        registry.flush_last_seen().expect("flush");
        assert_eq!(
            registry
                .get("d1")
                .expect("read")
                .expect("kept")
                .dropped_messages,
            7
        );
        drop(registry);
        // Opened again: already at version 2, nothing to do.
        let again = Registry::open(dir.path()).expect("reopen");
        assert_eq!(
            again
                .get("d1")
                .expect("read")
                .expect("kept")
                .dropped_messages,
            7
        );
    }
}
