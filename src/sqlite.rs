//! What certmq's two SQLite files (the registry's `certmq.db`, the message store's
//! `messages.db`) share: the integrity check run at start and after a backup, and the words
//! for a file this process may not open.

use std::path::Path;

use rusqlite::{params, Connection};

/// SQLite's `PRAGMA quick_check`: the b-tree structure, page accounting and constraints of
/// the whole file (not index contents, which `integrity_check` adds at several times the
/// cost). It reads every page once, so starting on a large store takes a little longer.
/// `Some(report)` (one problem per `; `) when the file is damaged.
pub fn quick_check(conn: &Connection) -> Result<Option<String>, rusqlite::Error> {
    // At most this many problems are listed: the first few say enough.
    let mut stmt = conn.prepare("PRAGMA quick_check(10)")?;
    let lines = stmt
        .query_map(params![], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    // SQLite's report spans lines ("*** in database main ***", then one per problem).
    Ok((lines != ["ok"]).then(|| lines.join("; ").replace('\n', "; ")))
}

/// Who owns a file in `data_dir` and its folder, with their modes, and who this process
/// is: what an operator needs to see when the file cannot be opened ("certmq.db is owned
/// by root:root, mode 0644, its folder /var/lib/certmq by certmq:certmq, mode 0750; this
/// process runs as certmq (uid 998)"), instead of SQLite's bare `SQLITE_CANTOPEN` or
/// `attempt to write a readonly database`. For a file that cannot be examined, the
/// nearest folder that can. Linux: the process's user comes from `/proc/self/status`,
/// names from `/etc/passwd` and `/etc/group`.
pub fn access_detail(path: &Path) -> String {
    let mut parts = Vec::new();
    match owner_mode(path) {
        Some(o) => parts.push(format!("{} is owned by {o}", path.display())),
        None => parts.push(format!("{} cannot be examined", path.display())),
    }
    let mut at = path.parent();
    while let Some(dir) = at.filter(|d| !d.as_os_str().is_empty()) {
        if let Some(o) = owner_mode(dir) {
            parts.push(format!("its folder {} is owned by {o}", dir.display()));
            break;
        }
        at = dir.parent();
    }
    format!(
        "{}; this process runs as {}",
        parts.join(", "),
        process_user()
    )
}

/// "user:group, mode 0640", or `None` when `path` cannot be examined.
fn owner_mode(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(format!(
        "{}:{}, mode {:04o}",
        user_name(m.uid()),
        group_name(m.gid()),
        m.mode() & 0o7777
    ))
}

/// Whether an error met opening a database is about access rights (the file or its
/// folder), and if so what it means in words, for [`access_detail`] to complete.
pub fn access_problem(e: &rusqlite::Error) -> Option<&'static str> {
    use rusqlite::ffi;
    let rusqlite::Error::SqliteFailure(f, _) = e else {
        return None;
    };
    match f.extended_code {
        ffi::SQLITE_READONLY_DIRECTORY | ffi::SQLITE_CANTOPEN_NOTEMPDIR => Some(
            "this user may not create files in its folder (reading a database in WAL mode \
             needs its -shm file, created by the first reader after the broker stopped)",
        ),
        ffi::SQLITE_CANTOPEN_ISDIR => Some("it is a directory"),
        _ => match f.code {
            rusqlite::ErrorCode::ReadOnly => Some("this user may not write it"),
            rusqlite::ErrorCode::CannotOpen | rusqlite::ErrorCode::PermissionDenied => {
                Some("this user may not open it or its folder")
            }
            _ => None,
        },
    }
}

/// Whether this process may write `path`: an existing file is opened for writing and
/// closed at once (which changes nothing); one that cannot be seen passes (its folder is
/// the problem, and reported as such).
pub fn writable_file(path: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    std::fs::OpenOptions::new().write(true).open(path).map(drop)
}

/// The effective user of this process, as "name (uid N)".
pub fn process_user() -> String {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                // real, effective, saved, filesystem: the effective one decides access.
                .and_then(|ids| ids.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|uid| uid.parse::<u32>().ok());
    match uid {
        Some(uid) => format!("{} (uid {uid})", user_name(uid)),
        None => "an unknown user".to_owned(),
    }
}

/// The name of a user id from `/etc/passwd`, or the number.
fn user_name(uid: u32) -> String {
    name_in("/etc/passwd", uid).unwrap_or_else(|| uid.to_string())
}

/// The name of a group id from `/etc/group`, or the number.
fn group_name(gid: u32) -> String {
    name_in("/etc/group", gid).unwrap_or_else(|| gid.to_string())
}

/// `name:x:ID:...` lines: the name whose third field is `id`.
fn name_in(file: &str, id: u32) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id_field = fields.nth(1)?;
        (id_field.parse::<u32>().ok()? == id).then(|| name.to_owned())
    })
}
