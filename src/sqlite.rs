//! What certmq's two SQLite files (the registry's `certmq.db`, the message store's
//! `messages.db`) share: the integrity check run at start and after a backup.

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
