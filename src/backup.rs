//! `certmq backup --out DIR` (contract §1): a consistent copy of the registry and the message
//! store while the broker runs, restorable by pointing `data_dir` at `DIR`.
//!
//! Each database is copied with SQLite's `VACUUM INTO` from a read-only connection: one
//! read transaction, so the copy is that database at one instant (WAL mode lets the broker
//! go on writing meanwhile), compacted, and self-contained (no `-wal` file). The two files
//! are two instants a few milliseconds apart; recovery tolerates that (a session whose
//! device is missing from the registry is forgotten at start, contract §4). Each copy is checked
//! with `PRAGMA quick_check` before the command reports success.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

/// Why a backup failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0} already exists and is not an empty directory: refusing to write over it")]
    NotEmpty(PathBuf),
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} does not exist: has a broker ever run on this data_dir?")]
    Missing(PathBuf),
    #[error("cannot copy {from} to {to}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the copy {path} does not pass SQLite's quick_check: {found}")]
    Damaged { path: PathBuf, found: String },
}

/// Copies both databases of `data_dir` into the new directory `out`; returns the files
/// written.
pub fn backup(data_dir: &Path, out: &Path) -> Result<Vec<PathBuf>, BackupError> {
    if out.exists() {
        let empty = std::fs::read_dir(out)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            return Err(BackupError::NotEmpty(out.to_path_buf()));
        }
    }
    std::fs::create_dir_all(out).map_err(|source| BackupError::Create {
        path: out.to_path_buf(),
        source,
    })?;
    let mut written = Vec::new();
    for file in [crate::registry::DB_FILE, crate::storage::DB_FILE] {
        let from = data_dir.join(file);
        let to = out.join(file);
        if !from.exists() {
            return Err(BackupError::Missing(from));
        }
        copy(&from, &to)?;
        written.push(to);
    }
    Ok(written)
}

fn copy(from: &Path, to: &Path) -> Result<(), BackupError> {
    let err = |source| BackupError::Copy {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    };
    let conn = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(err)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(err)?;
    let target = to.to_string_lossy().into_owned();
    conn.execute("VACUUM INTO ?1", [target]).map_err(err)?;
    let copy = Connection::open_with_flags(to, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(err)?;
    if let Some(found) = crate::sqlite::quick_check(&copy).map_err(err)? {
        return Err(BackupError::Damaged {
            path: to.to_path_buf(),
            found,
        });
    }
    Ok(())
}
