//! Log hygiene for lines a peer can cause (contract §10): refusal lines are rate-limited per
//! peer address, so a client retrying a bad certificate in a loop cannot flood the log or
//! the disk under it. Every refusal is still counted in the metrics; the first line after
//! a quiet spell says how many were left out.
//!
//! Quoting is done where the lines are written: peer-supplied values (CN, device name,
//! client id, topic, reason) go into `tracing` fields with `?` (Debug: quoted, with `"`,
//! `\` and control characters escaped), never with `%`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Refusal lines per peer address in one window.
const BURST: u32 = 5;
/// The window.
const WINDOW: Duration = Duration::from_secs(10);
/// Peers remembered at most: the table stays bounded however many addresses an attacker
/// has (a full table forgets expired windows first, then everything).
const MAX_PEERS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Slot {
    since: Instant,
    logged: u32,
    /// Lines left out since the last line written for this peer.
    suppressed: u64,
}

/// The per-peer budget of refusal lines.
#[derive(Debug, Default)]
pub struct Limiter {
    peers: HashMap<IpAddr, Slot>,
}

impl Limiter {
    /// Whether a refusal line for `ip` may be written at `now`: Some(lines left out before
    /// it) or None (leave it out).
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> Option<u64> {
        if !self.peers.contains_key(&ip) && self.peers.len() >= MAX_PEERS {
            self.peers
                .retain(|_, s| now.saturating_duration_since(s.since) < WINDOW);
            if self.peers.len() >= MAX_PEERS {
                self.peers.clear();
            }
        }
        let slot = self.peers.entry(ip).or_insert(Slot {
            since: now,
            logged: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(slot.since) >= WINDOW {
            slot.since = now;
            slot.logged = 0;
        }
        if slot.logged >= BURST {
            slot.suppressed += 1;
            return None;
        }
        slot.logged += 1;
        Some(std::mem::take(&mut slot.suppressed))
    }
}

/// [`Limiter::allow`] on the process's limiter, now.
pub fn refusal_allowed(ip: IpAddr) -> Option<u64> {
    static LIMITER: OnceLock<Mutex<Limiter>> = OnceLock::new();
    let mut limiter = LIMITER
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    limiter.allow(ip, Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn a_burst_per_window_then_the_count_of_what_was_left_out() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(l.allow(ip(1), t0), Some(0));
        }
        assert_eq!(l.allow(ip(1), t0), None);
        assert_eq!(l.allow(ip(1), t0 + WINDOW / 2), None);
        // Another peer has its own budget.
        assert_eq!(l.allow(ip(2), t0), Some(0));
        // The next window: the first line says two were left out.
        assert_eq!(l.allow(ip(1), t0 + WINDOW), Some(2));
        assert_eq!(l.allow(ip(1), t0 + WINDOW), Some(0));
    }

    #[test]
    fn the_table_stays_bounded() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        for i in 0..(MAX_PEERS as u32 + 10) {
            let addr = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert_eq!(l.allow(addr, t0), Some(0));
        }
        assert!(l.peers.len() <= MAX_PEERS);
    }
}
