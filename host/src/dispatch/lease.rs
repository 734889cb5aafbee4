//! Whether this daemon is the one of its replicas that handles keyspace
//! events and sweeps now, as the event sources and the workers see it. The
//! lease itself (taking, renewing, giving it back) is
//! [`crate::intake::lease`]'s; this is the answer it keeps current.
//!
//! A holding is valid until a deadline on this process's monotonic clock:
//! the time the last renewal was *sent* plus the lease's TTL, less a
//! margin. Redis cannot let another daemon take the lease before that
//! (its TTL started later), so a holder that cannot confirm its lease (a
//! stuck connection, a pause of the whole process) stops routing events and
//! starting sweeps by itself, before anyone else can start.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::ReplicaConfig;
use crate::metrics::{Readiness, metrics};

/// A daemon's view of the keyspace-event lease.
pub struct Lease {
    enabled: bool,
    holding: AtomicBool,
    token: AtomicU64,
    /// Milliseconds after `epoch` until which the holding is valid.
    valid_until_ms: AtomicU64,
    epoch: Instant,
    /// The lease's key, and its token counter.
    pub key: String,
    pub counter: String,
    /// This process's id: the deploy consumer name and a random nonce, so
    /// replicas sharing a fixed consumer name still tell each other apart.
    pub id: String,
    pub ttl: Duration,
}

impl Lease {
    /// The lease of database `db` for a daemon whose consumer name is
    /// `consumer` (replicas off: this daemon always holds).
    pub fn new(config: &ReplicaConfig, db: u32, consumer: &str) -> Lease {
        let key = format!("{}:db{db}", config.lease_key);
        if !config.enabled {
            Readiness::set(&metrics().ready.lease, true);
        }
        Lease {
            enabled: config.enabled,
            holding: AtomicBool::new(false),
            token: AtomicU64::new(0),
            valid_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            counter: format!("{key}:token"),
            key,
            id: format!("{consumer}/{:08x}", rand::random::<u32>()),
            ttl: Duration::from_millis(config.lease_ttl_ms.max(300)),
        }
    }

    /// Whether this daemon handles keyspace events and sweeps now.
    pub fn holds(&self) -> bool {
        !self.enabled
            || (self.holding.load(Ordering::Relaxed) && self.now_ms() < self.valid_until_ms.load(Ordering::Relaxed))
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The token of the current holding (0 when not holding).
    pub fn token(&self) -> u64 {
        if self.holds() && self.enabled { self.token.load(Ordering::Relaxed) } else { 0 }
    }

    /// The lease's own keys: their notifications are not the application's.
    pub fn is_own_key(&self, key: &[u8]) -> bool {
        self.enabled && (key == self.key.as_bytes() || key == self.counter.as_bytes())
    }

    /// The value this daemon's holding has in Redis.
    pub fn value(&self) -> String {
        format!("{}:{}", self.id, self.token.load(Ordering::Relaxed))
    }

    /// The holding goes on, as a renewal sent at `sent` confirmed.
    pub fn extend(&self, sent: Instant) {
        self.confirm(self.token.load(Ordering::Relaxed), sent);
    }

    /// Held with `token`, as confirmed by a request sent at `sent`.
    pub fn confirm(&self, token: u64, sent: Instant) {
        // A margin for the time Redis took to start the key's TTL.
        let margin = (self.ttl / 10).max(Duration::from_millis(50));
        let until = sent.saturating_duration_since(self.epoch) + self.ttl.saturating_sub(margin);
        self.token.store(token, Ordering::Relaxed);
        self.valid_until_ms.store(until.as_millis() as u64, Ordering::Relaxed);
        self.holding.store(true, Ordering::Relaxed);
        let m = metrics();
        m.lease_held.set(1);
        m.lease_token.set(token as i64);
    }

    /// Not held (any more).
    pub fn drop_holding(&self) {
        self.holding.store(false, Ordering::Relaxed);
        self.valid_until_ms.store(0, Ordering::Relaxed);
        let m = metrics();
        m.lease_held.set(0);
        m.lease_token.set(0);
    }

    /// Held in this process's view (the deadline may have passed).
    pub fn thinks_it_holds(&self) -> bool {
        self.holding.load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holding_lapses_at_its_deadline_without_a_word_from_redis() {
        let config = ReplicaConfig { enabled: true, lease_ttl_ms: 300, ..ReplicaConfig::default() };
        let lease = Lease::new(&config, 0, "c");
        assert!(!lease.holds());
        lease.confirm(7, Instant::now());
        assert!(lease.holds() && lease.token() == 7);
        std::thread::sleep(Duration::from_millis(300));
        assert!(!lease.holds(), "past the TTL since the renewal was sent");
        assert!(lease.thinks_it_holds());
        let off = Lease::new(&ReplicaConfig::default(), 0, "c");
        assert!(off.holds(), "replicas off: always");
        assert!(lease.is_own_key(b"cachepol:lease:events:db0") && !lease.is_own_key(b"x"));
    }
}
