//! Reading the store back at start (contract §7, recovery): persistent sessions with their
//! subscriptions, queued and in-flight deliveries (in order), inbound QoS 2 ids, and
//! retained messages. Sessions and messages that expired while the broker was down are
//! deleted here.
//!
//! Each stored message is read once into one `Arc`, which every queue row and the retained
//! entry referencing it share: memory after a restart is what it was before, not one copy
//! per session. Recovery stays O(rows): one pass over `messages`, then the references.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::{params, Connection};

use super::writer::{key, parse_props};
use super::StoreError;
use crate::broker::journal::{
    Message, Recovered, RetainHandling, StoreId, StoredQueued, StoredRetained, StoredSession,
    SubOptions,
};
use crate::identity::DeviceName;
use crate::mqtt::codec::QoS;
use crate::mqtt::topic::TopicName;

fn qos(v: u8) -> Result<QoS, StoreError> {
    match v {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        2 => Ok(QoS::ExactlyOnce),
        other => Err(StoreError::Corrupt(format!("QoS {other}"))),
    }
}

/// Converts a stored expiry (seconds since the epoch) back to a deadline.
fn deadline(at: Option<i64>, now: i64) -> Option<Instant> {
    at.map(|t| Instant::now() + Duration::from_secs(u64::try_from(t - now).unwrap_or(0)))
}

/// One row of `messages`.
struct MessageRow {
    id: i64,
    topic: String,
    payload: Vec<u8>,
    qos: u8,
    retain: bool,
    props: Option<String>,
    expires_at: Option<i64>,
}

fn message(row: MessageRow, now: i64) -> Result<Message, StoreError> {
    let MessageRow {
        id,
        topic,
        payload,
        qos: msg_qos,
        retain,
        props,
        expires_at,
    } = row;
    Ok(Message {
        topic: TopicName::parse(&topic)
            .map_err(|e| StoreError::Corrupt(format!("topic {topic:?}: {e}")))?,
        payload: Bytes::from(payload),
        qos: qos(msg_qos)?,
        retain,
        props: match props {
            Some(p) => parse_props(&p)?,
            None => Default::default(),
        },
        expires_at: deadline(expires_at, now),
        store_id: StoreId::assigned(id),
    })
}

/// Every stored message, each in one `Arc`.
fn load_messages(conn: &Connection, now: i64) -> Result<HashMap<i64, Arc<Message>>, StoreError> {
    let mut stmt =
        conn.prepare("SELECT id, topic, payload, qos, retain, props, expires_at FROM messages")?;
    let rows = stmt.query_map([], |r| {
        Ok(MessageRow {
            id: r.get(0)?,
            topic: r.get(1)?,
            payload: r.get(2)?,
            qos: r.get(3)?,
            retain: r.get(4)?,
            props: r.get(5)?,
            expires_at: r.get(6)?,
        })
    })?;
    let mut out = HashMap::new();
    for row in rows {
        let row = row?;
        out.insert(row.id, Arc::new(message(row, now)?));
    }
    Ok(out)
}

/// The shared message a row references.
fn referenced(
    messages: &HashMap<i64, Arc<Message>>,
    id: i64,
    by: &str,
) -> Result<Arc<Message>, StoreError> {
    messages
        .get(&id)
        .cloned()
        .ok_or_else(|| StoreError::Corrupt(format!("{by} references message {id}, not stored")))
}

/// Reads everything, deleting what expired. Also returns the largest message id in use
/// (new messages are numbered after it).
pub(super) fn load(conn: &Connection, now: i64) -> Result<(Recovered, i64), StoreError> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = load_in_tx(conn, now);
    match &result {
        Ok(_) => conn.execute_batch("COMMIT")?,
        Err(_) => {
            let _ = conn.execute_batch("ROLLBACK");
        }
    }
    result
}

fn load_in_tx(conn: &Connection, now: i64) -> Result<(Recovered, i64), StoreError> {
    purge_expired(conn, now)?;
    let messages = load_messages(conn, now)?;
    let max_message_id = messages.keys().copied().max().unwrap_or(0);
    let mut out = Recovered::default();
    let mut stmt = conn.prepare(
        "SELECT device, client_id, expiry, expires_at FROM sessions ORDER BY device, client_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<u32>>(2)?,
            r.get::<_, Option<i64>>(3)?,
        ))
    })?;
    for row in rows {
        let (device, client_id, expiry, expires_at) = row?;
        let queue = load_queue(conn, &messages, &device, &client_id)?;
        if let Some(last) = queue.last() {
            out.max_queue_id = out.max_queue_id.max(last.id);
        }
        out.sessions.push(StoredSession {
            subscriptions: load_subscriptions(conn, &device, &client_id)?,
            queue,
            inbound: load_inbound(conn, &device, &client_id)?,
            key: key(device, client_id)?,
            expiry,
            expires_at,
        });
    }
    let max: Option<i64> = conn.query_row("SELECT max(id) FROM queue", [], |r| r.get(0))?;
    out.max_queue_id = out.max_queue_id.max(max.unwrap_or(0));
    out.retained = load_retained(conn, &messages)?;
    Ok((out, max_message_id))
}

/// Sessions whose expiry passed while the broker was down end now, and expired messages
/// lose their references (the triggers then take the messages with them); deliveries of
/// sessions that do not exist and messages nothing refers to are removed.
fn purge_expired(conn: &Connection, now: i64) -> Result<(), StoreError> {
    let mut expired = Vec::new();
    {
        let mut stmt = conn.prepare("SELECT device, client_id FROM sessions WHERE expires_at IS NOT NULL AND expires_at <= ?1")?;
        let rows = stmt.query_map(params![now], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        for r in rows {
            expired.push(r?);
        }
    }
    for (d, c) in &expired {
        for table in ["sessions", "subscriptions", "queue", "inbound"] {
            conn.execute(
                &format!("DELETE FROM {table} WHERE device = ?1 AND client_id = ?2"),
                params![d, c],
            )?;
        }
    }
    for table in ["queue", "retained"] {
        conn.execute(
            &format!(
                "DELETE FROM {table} WHERE message_id IN
                 (SELECT id FROM messages WHERE expires_at IS NOT NULL AND expires_at <= ?1)"
            ),
            params![now],
        )?;
    }
    // Deliveries of sessions that no longer exist (written by versions that queued for a
    // session ended while the message was being routed), and messages nothing refers to.
    conn.execute(
        "DELETE FROM queue WHERE NOT EXISTS (SELECT 1 FROM sessions s
             WHERE s.device = queue.device AND s.client_id = queue.client_id)",
        [],
    )?;
    conn.execute(
        "DELETE FROM messages WHERE NOT EXISTS (SELECT 1 FROM queue WHERE message_id = messages.id)
             AND NOT EXISTS (SELECT 1 FROM retained WHERE message_id = messages.id)",
        [],
    )?;
    Ok(())
}

/// One session's subscriptions: (filter as subscribed after the alias, options, aliased).
fn load_subscriptions(
    conn: &Connection,
    device: &str,
    client_id: &str,
) -> Result<Vec<(String, SubOptions, bool)>, StoreError> {
    let mut subs = conn.prepare_cached(
        "SELECT filter, qos, no_local, retain_as_published, retain_handling, sub_id, aliased
         FROM subscriptions WHERE device = ?1 AND client_id = ?2",
    )?;
    let rows = subs.query_map(params![device, client_id], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, u8>(1)?,
            r.get::<_, bool>(2)?,
            r.get::<_, bool>(3)?,
            r.get::<_, u8>(4)?,
            r.get::<_, Option<u32>>(5)?,
            r.get::<_, bool>(6)?,
        ))
    })?;
    let mut out = Vec::new();
    for r in rows {
        let (filter, q, no_local, rap, rh, sub_id, aliased) = r?;
        let opts = SubOptions {
            qos: qos(q)?,
            no_local,
            retain_as_published: rap,
            retain_handling: match rh {
                0 => RetainHandling::SendAlways,
                1 => RetainHandling::SendIfNew,
                _ => RetainHandling::Never,
            },
            subscription_id: sub_id,
        };
        out.push((filter, opts, aliased));
    }
    Ok(out)
}

/// One session's queued and in-flight deliveries, in queue order.
fn load_queue(
    conn: &Connection,
    messages: &HashMap<i64, Arc<Message>>,
    device: &str,
    client_id: &str,
) -> Result<Vec<StoredQueued>, StoreError> {
    let mut queue = conn.prepare_cached(
        "SELECT id, message_id, qos, retain, sub_ids, pkid, released
         FROM queue WHERE device = ?1 AND client_id = ?2 ORDER BY id",
    )?;
    let rows = queue.query_map(params![device, client_id], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, u8>(2)?,
            r.get::<_, bool>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, Option<u16>>(5)?,
            r.get::<_, bool>(6)?,
        ))
    })?;
    let mut out = Vec::new();
    for r in rows {
        let (id, message_id, q, retain, sub_ids, pkid, released) = r?;
        let sub_ids = sub_ids
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<u32>()
                    .map_err(|e| StoreError::Corrupt(format!("subscription id {s:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.push(StoredQueued {
            id,
            msg: referenced(messages, message_id, &format!("queue row {id}"))?,
            qos: qos(q)?,
            retain,
            sub_ids,
            pkid,
            released,
        });
    }
    Ok(out)
}

/// One session's inbound QoS 2 packet ids between PUBLISH and PUBREL.
fn load_inbound(conn: &Connection, device: &str, client_id: &str) -> Result<Vec<u16>, StoreError> {
    let mut inbound =
        conn.prepare_cached("SELECT pkid FROM inbound WHERE device = ?1 AND client_id = ?2")?;
    let rows = inbound.query_map(params![device, client_id], |r| r.get::<_, u16>(0))?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Every retained message with the device whose quota it counts against.
fn load_retained(
    conn: &Connection,
    messages: &HashMap<i64, Arc<Message>>,
) -> Result<Vec<StoredRetained>, StoreError> {
    let mut stmt = conn.prepare("SELECT topic, message_id, owner FROM retained")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, Option<String>>(2)?,
        ))
    })?;
    let mut out = Vec::new();
    for r in rows {
        let (topic, message_id, owner) = r?;
        let owner = owner
            .map(|o| {
                DeviceName::parse(&o)
                    .map_err(|e| StoreError::Corrupt(format!("owner {o:?} of {topic:?}: {e}")))
            })
            .transpose()?;
        out.push(StoredRetained {
            msg: referenced(messages, message_id, &format!("retained {topic:?}"))?,
            owner,
        });
    }
    Ok(out)
}
