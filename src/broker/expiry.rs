//! Session expiry (contract §2 `max_session_expiry`, contract §4): how long a persistent session
//! outlives its connection, and the timers that end it.
//!
//! Every persistent session has a finite expiry unless the operator sets
//! `max_session_expiry` to 0xFFFFFFFF: an MQTT 5 Session Expiry Interval is capped (CONNACK
//! announces the value used, MQTT 5 §3.2.2.3.2), an MQTT 3.1.1 clean-session-0 session gets
//! `max_session_expiry`, and a session restored from the store with no deadline (it was
//! online when the broker stopped, or was written before the cap existed) gets one at
//! start. Without this, a device that connects once with a fresh client id, or says
//! "never", holds a queue, subscriptions and store rows forever.

use std::sync::Arc;
use std::time::Duration;

use super::journal::{Op, Recovered};
use super::session::{Expiry, SessionRef};
use super::Broker;
use crate::mqtt::codec::Protocol;

/// What a CONNECT gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    pub expiry: Expiry,
    /// MQTT 5: the Session Expiry Interval CONNACK must carry, because it is lower than
    /// what the client asked for. None: the client's own value applies.
    pub announce: Option<u32>,
}

/// The session expiry of a CONNECT under `max` seconds. `requested` is the MQTT 5
/// Session Expiry Interval (absent = 0); MQTT 3.1.1 clean session 0 gets `max`.
pub fn granted(protocol: Protocol, clean_start: bool, requested: Option<u32>, max: u32) -> Granted {
    match protocol {
        Protocol::V311 if clean_start => Granted {
            expiry: Expiry::OnDisconnect,
            announce: None,
        },
        // 3.1.1 has no way to announce it: documented in the README instead.
        Protocol::V311 => Granted {
            expiry: Expiry::from_v5(max),
            announce: None,
        },
        Protocol::V5 => {
            let asked = requested.unwrap_or(0);
            let used = asked.min(max);
            Granted {
                expiry: Expiry::from_v5(used),
                announce: (used < asked).then_some(used),
            }
        }
    }
}

/// The expiry an MQTT 5 DISCONNECT sets (MQTT 5 §3.14.2.2.2), under the same cap.
pub fn on_disconnect(requested: u32, max: u32) -> Expiry {
    Expiry::from_v5(requested.min(max))
}

/// A restored session's (expiry, deadline) under `max`, `now` in seconds since the epoch:
/// the expiry capped, and a deadline for a session that had none (it is offline now, so
/// its interval starts now) or one later than the cap allows.
fn capped(
    expiry: Option<u32>,
    expires_at: Option<i64>,
    max: u32,
    now: i64,
) -> (Option<u32>, Option<i64>) {
    let never = u32::MAX;
    let secs = expiry.unwrap_or(never).min(max);
    if secs == never {
        return (None, expires_at);
    }
    let latest = now.saturating_add(i64::from(secs));
    (
        Some(secs),
        Some(expires_at.map_or(latest, |at| at.min(latest))),
    )
}

impl Broker {
    /// Applies `max_session_expiry` to the sessions read back from the store, before
    /// [`Broker::restore`]: each gets a capped expiry and a deadline, and a changed one is
    /// written back, so a deadline given now does not move on to a later one at the next
    /// restart.
    pub fn cap_restored_expiry(&self, recovered: &mut Recovered, max: u32) {
        let now = crate::cert::now_secs();
        for s in &mut recovered.sessions {
            let (expiry, expires_at) = capped(s.expiry, s.expires_at, max, now);
            if (expiry, expires_at) == (s.expiry, s.expires_at) {
                continue;
            }
            s.expiry = expiry;
            s.expires_at = expires_at;
            if let Some(journal) = self.journal() {
                journal.submit(Op::Session {
                    key: s.key.clone(),
                    expiry,
                    expires_at,
                });
            }
        }
    }

    /// Ends `session` after `wait` unless a connection attached to it meanwhile (its
    /// attach generation moved on) or it ended otherwise. Logs "session expired": the event
    /// operators (and tests) look for.
    pub(super) fn expire_later(
        self: &Arc<Self>,
        session: SessionRef,
        generation: u64,
        wait: Duration,
    ) {
        let broker = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if session.generation() != generation || session.online() {
                return;
            }
            if !broker.is_current(&session) {
                return;
            }
            tracing::info!(
                device = ?session.key.device,
                client_id = ?session.key.client_id,
                after_s = wait.as_secs(),
                "session expired"
            );
            session.mark_expired();
            broker.end_session(&session);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::DeviceAcl;
    use crate::broker::journal::StoredSession;
    use crate::broker::session::SessionKey;
    use crate::broker::SessionRequest;
    use crate::identity::DeviceName;
    use crate::metrics::Metrics;
    use tokio_util::sync::CancellationToken;

    const WEEK: u32 = 604_800;

    #[test]
    fn v5_expiry_is_capped_and_announced_only_when_lowered() {
        let g = |asked| granted(Protocol::V5, false, asked, 60);
        assert_eq!(
            g(Some(u32::MAX)),
            Granted {
                expiry: Expiry::After(60),
                announce: Some(60)
            }
        );
        assert_eq!(
            g(Some(61)),
            Granted {
                expiry: Expiry::After(60),
                announce: Some(60)
            }
        );
        assert_eq!(
            g(Some(60)),
            Granted {
                expiry: Expiry::After(60),
                announce: None
            }
        );
        assert_eq!(
            g(Some(1)),
            Granted {
                expiry: Expiry::After(1),
                announce: None
            }
        );
        assert_eq!(
            g(None),
            Granted {
                expiry: Expiry::OnDisconnect,
                announce: None
            }
        );
        // The operator may allow "never".
        let never = granted(Protocol::V5, true, Some(u32::MAX), u32::MAX);
        assert_eq!(
            never,
            Granted {
                expiry: Expiry::Never,
                announce: None
            }
        );
        // 0: no session outlives its connection, and the client is told.
        let none = granted(Protocol::V5, true, Some(30), 0);
        assert_eq!(
            none,
            Granted {
                expiry: Expiry::OnDisconnect,
                announce: Some(0)
            }
        );
    }

    #[test]
    fn v311_persistent_sessions_get_the_cap() {
        let g = |clean| granted(Protocol::V311, clean, None, WEEK);
        assert_eq!(g(false).expiry, Expiry::After(WEEK));
        assert_eq!(g(true).expiry, Expiry::OnDisconnect);
        assert_eq!(g(false).announce, None);
        assert_eq!(on_disconnect(u32::MAX, WEEK), Expiry::After(WEEK));
        assert_eq!(on_disconnect(10, WEEK), Expiry::After(10));
    }

    #[test]
    fn restored_sessions_get_a_deadline_within_the_cap() {
        let now = 1_000_000;
        // Never, no deadline (3.1.1, or v5 0xFFFFFFFF): the cap, from now.
        assert_eq!(capped(None, None, 60, now), (Some(60), Some(now + 60)));
        // Online when the broker stopped: its own interval, from now.
        assert_eq!(capped(Some(30), None, 60, now), (Some(30), Some(now + 30)));
        // A deadline beyond what the cap allows is brought forward; an earlier one kept.
        assert_eq!(
            capped(Some(600), Some(now + 500), 60, now),
            (Some(60), Some(now + 60))
        );
        assert_eq!(
            capped(Some(600), Some(now + 5), 60, now),
            (Some(60), Some(now + 5))
        );
        // "Never" allowed by the operator stays never.
        assert_eq!(capped(None, None, u32::MAX, now), (None, None));
    }

    fn broker() -> Arc<Broker> {
        Broker::new(Arc::new(Metrics::default()), None)
    }

    fn key(id: &str) -> SessionKey {
        SessionKey {
            device: DeviceName::parse("dev-1").unwrap(),
            client_id: id.into(),
        }
    }

    fn open(broker: &Broker, id: &str, expiry: Expiry, conn: u64) -> SessionRef {
        let req = SessionRequest {
            key: key(id),
            clean_start: false,
            expiry,
            acl: Arc::new(DeviceAcl::default()),
            max_queued: 10,
            max_sessions: 16,
        };
        broker
            .open_session(req, conn, CancellationToken::new())
            .expect("opened")
            .session
    }

    #[tokio::test(start_paused = true)]
    async fn a_v311_persistent_session_expires_after_the_cap() {
        let broker = broker();
        let expiry = granted(Protocol::V311, false, None, 5).expiry;
        let session = open(&broker, "c", expiry, 1);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(broker.session_count(), 1, "online sessions do not expire");
        broker.close_session(&session, 1);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(broker.session_count(), 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(broker.session_count(), 0);
    }

    /// A will whose delay equals the session expiry is due when the session ends: it is
    /// published even when the expiry timer runs first (it was dropped as "the session
    /// ended" before; the connection's own order of calls only hid the race).
    #[tokio::test(start_paused = true)]
    async fn a_will_due_at_the_session_expiry_is_published_whichever_timer_runs_first() {
        use crate::broker::message::Message;
        use crate::broker::Will;
        use crate::mqtt::codec::QoS;
        use crate::mqtt::topic::TopicName;
        let broker = broker();
        let req = SessionRequest {
            key: key("c"),
            clean_start: false,
            expiry: Expiry::After(10),
            acl: Arc::new(crate::acl::Profile::builtin_device().for_device("dev-1")),
            max_queued: 10,
            max_sessions: 16,
        };
        let session = broker
            .open_session(req, 1, CancellationToken::new())
            .expect("opened")
            .session;
        // The expiry timer is registered first, so it fires first at the shared deadline.
        broker.close_session(&session, 1);
        let will = Will::new(
            Message {
                topic: TopicName::parse("devices/dev-1/status").unwrap(),
                payload: bytes::Bytes::from_static(b"gone"),
                qos: QoS::AtMostOnce,
                retain: false,
                props: Default::default(),
                expires_at: None,
                store_id: Default::default(),
            },
            10,
        );
        broker.publish_will(&session, will, session.generation());
        let received = || broker.metrics.messages_received.get();
        tokio::time::sleep(Duration::from_millis(9_999)).await;
        assert_eq!(received(), 0, "not before the delay");
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(broker.session_count(), 0, "the session expired");
        assert_eq!(received(), 1, "the will was published");
    }

    #[tokio::test(start_paused = true)]
    async fn reconnecting_before_the_deadline_keeps_the_session() {
        let broker = broker();
        let session = open(&broker, "c", Expiry::After(5), 1);
        broker.close_session(&session, 1);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let again = open(&broker, "c", Expiry::After(5), 2);
        assert_eq!(again, session, "resumed");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(broker.session_count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_restored_session_without_a_deadline_gets_one() {
        let broker = broker();
        let stored = |id: &str, expiry| StoredSession {
            key: key(id),
            expiry,
            expires_at: None,
            subscriptions: Vec::new(),
            queue: Vec::new(),
            inbound: Vec::new(),
        };
        let mut recovered = Recovered {
            sessions: vec![stored("never", None), stored("was-online", Some(3))],
            ..Default::default()
        };
        broker.cap_restored_expiry(&mut recovered, 5);
        let deadlines = broker.restore(recovered, |_| Arc::new(DeviceAcl::default()), 10);
        assert_eq!(deadlines.len(), 2);
        broker.schedule_expiry(deadlines);
        assert_eq!(broker.session_count(), 2);
        // The deadlines are whole seconds of the wall clock, which may tick meanwhile.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert_eq!(broker.session_count(), 1, "the 3 s one ended");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(broker.session_count(), 0, "the capped one ended");
    }
}
