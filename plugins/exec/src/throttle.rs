//! Slowing token guessing: a per-source budget of failed `auth` attempts, and a rate-limited
//! log of failures.
//!
//! Without it one client could try ~900 tokens a second. Each source (an IPv4 address, an
//! IPv6 /64, so one host cannot rotate through its addresses, or a local user on a Unix socket) has a bucket of failures that
//! refills at `auth_failures_per_minute`; an `auth` line from a source whose bucket is empty is
//! refused without the token even being compared, so guessing from one source runs at that
//! rate however many connections it opens. Other sources have their own buckets: an attacker
//! cannot delay anyone else. The table is bounded ([`MAX_SOURCES`]); when it is full, sources
//! that have been forgiven (a full bucket) are forgotten first, then the most forgiven one.
//!
//! Failures are logged with the peer address (never the token), at most once per
//! [`LOG_EVERY`], with the count of failures not logged since.

use std::collections::HashMap;
use wharf_core::peer::Peer;

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};
use wharf_core::net::Source;

/// Most sources remembered at once.
pub const MAX_SOURCES: usize = 4096;
/// Most failures a source may make in a burst before it is held to the refill rate.
pub const BURST: f64 = 5.0;
/// At most one failure log line per this long.
pub const LOG_EVERY: Duration = Duration::from_secs(1);

/// Failed-auth accounting for one service.
pub struct AuthThrottle {
    /// Failures regained per second.
    rate: f64,
    capacity: f64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    sources: HashMap<Source, Bucket>,
    last_log: Option<Instant>,
    unlogged: u64,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refilled(self, now: Instant, rate: f64, capacity: f64) -> f64 {
        (self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * rate).min(capacity)
    }
}

impl AuthThrottle {
    /// `per_minute` failures per source and minute (at least 1), after a burst of [`BURST`].
    pub fn new(per_minute: u32) -> Self {
        let per_minute = f64::from(per_minute.max(1));
        AuthThrottle {
            rate: per_minute / 60.0,
            capacity: BURST.min(per_minute),
            state: Mutex::new(State::default()),
        }
    }

    /// Whether `peer` may have its token checked now (it has failures left).
    pub fn allowed(&self, peer: &Peer) -> bool {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state
            .sources
            .get(&Source::of_peer(peer))
            .is_none_or(|b| b.refilled(Instant::now(), self.rate, self.capacity) >= 1.0)
    }

    /// Counts one failure of `peer` (a wrong token, or a refusal because it had none left)
    /// and logs it, rate-limited.
    pub fn failed(&self, peer: &Peer, throttled: bool) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let key = Source::of_peer(peer);
        if !state.sources.contains_key(&key) && state.sources.len() >= MAX_SOURCES {
            self.make_room(&mut state.sources, now);
        }
        let (rate, capacity) = (self.rate, self.capacity);
        let bucket = state.sources.entry(key).or_insert(Bucket {
            tokens: capacity,
            at: now,
        });
        let tokens = bucket.refilled(now, rate, capacity);
        *bucket = Bucket {
            tokens: (tokens - 1.0).max(0.0),
            at: now,
        };
        if state
            .last_log
            .is_none_or(|at| now.duration_since(at) >= LOG_EVERY)
        {
            let unlogged = std::mem::take(&mut state.unlogged);
            state.last_log = Some(now);
            drop(state);
            tracing::warn!(
                %peer,
                throttled,
                others_since_last_log = unlogged,
                "exec: authentication failed"
            );
        } else {
            state.unlogged += 1;
        }
    }

    /// Forgets forgiven sources; if none is, the most forgiven one.
    fn make_room(&self, sources: &mut HashMap<Source, Bucket>, now: Instant) {
        let (rate, capacity) = (self.rate, self.capacity);
        sources.retain(|_, b| b.refilled(now, rate, capacity) < capacity);
        if sources.len() >= MAX_SOURCES {
            let most = sources
                .iter()
                .max_by(|a, b| {
                    let a = a.1.refilled(now, rate, capacity);
                    let b = b.1.refilled(now, rate, capacity);
                    a.total_cmp(&b)
                })
                .map(|(k, _)| *k);
            if let Some(k) = most {
                sources.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: &str) -> Peer {
        Peer::Ip(std::net::SocketAddr::new(ip.parse().unwrap(), 1234))
    }

    #[test]
    fn a_source_runs_out_after_its_burst_and_others_do_not() {
        let t = AuthThrottle::new(60);
        let a = peer("192.0.2.1");
        for _ in 0..BURST as usize {
            assert!(t.allowed(&a));
            t.failed(&a, false);
        }
        assert!(!t.allowed(&a));
        assert!(t.allowed(&peer("192.0.2.2")));
        // The same IPv6 /64 is one source.
        let v6 = peer("2001:db8::1");
        for _ in 0..BURST as usize {
            t.failed(&v6, false);
        }
        assert!(!t.allowed(&peer("2001:db8::ffff")));
        assert!(t.allowed(&peer("2001:db8:0:1::1")));
        // Local users on a Unix socket: one source per uid, whatever the process.
        let unix = |uid, pid| {
            Peer::Unix(wharf_core::PeerCredentials {
                uid,
                gid: 0,
                pid: Some(pid),
            })
        };
        for pid in 0..BURST as u32 {
            t.failed(&unix(1000, pid), false);
        }
        assert!(!t.allowed(&unix(1000, 99)));
        assert!(t.allowed(&unix(1001, 1)));
    }

    #[test]
    fn the_table_stays_bounded() {
        let t = AuthThrottle::new(1);
        for i in 0..(MAX_SOURCES as u32 + 100) {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            t.failed(&Peer::Ip(std::net::SocketAddr::new(ip.into(), 1)), false);
        }
        let state = t.state.lock().unwrap();
        assert!(state.sources.len() <= MAX_SOURCES);
    }
}
