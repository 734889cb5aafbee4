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
//!
//! On a Redis Cluster the work is split by shard: one such lease per
//! primary's slots ([`Shards`], keyed by the shard's first slot, so that a
//! replica promoted in its place keeps the same lease), and a daemon routes
//! the events of the shards it holds. (Its sweeps walk every primary: what
//! a policy reconciles may be stored on any shard.)

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
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
    /// Whether this holding is reported in `cachepol_lease_held` and
    /// `cachepol_lease_token` (a shard's is counted by its loop instead).
    reported: bool,
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
            reported: true,
        }
    }

    /// The lease of the cluster shard whose first slot is `slot`: the same
    /// daemon id and TTL, its own key and token counter.
    pub fn for_shard(&self, slot: u16) -> Lease {
        let key = format!("{}:slot{slot}", self.key);
        Lease {
            enabled: self.enabled,
            holding: AtomicBool::new(false),
            token: AtomicU64::new(0),
            valid_until_ms: AtomicU64::new(0),
            epoch: self.epoch,
            counter: format!("{key}:token"),
            key,
            id: self.id.clone(),
            ttl: self.ttl,
            reported: false,
        }
    }

    /// The set of the replicas alive, for splitting the shards among them.
    pub fn members_key(&self) -> String {
        format!("{}:members", self.key)
    }

    /// The set of the daemons alive on this Redis, replicas or not
    /// ([`crate::intake::peers`]).
    pub fn daemons_key(&self) -> String {
        format!("{}:daemons", self.key)
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

    /// The lease's own keys (its token, its shards' leases, the members,
    /// the daemons alive, kept with replicas off too): their notifications
    /// are not the application's.
    pub fn is_own_key(&self, key: &[u8]) -> bool {
        key.starts_with(self.key.as_bytes())
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
        if self.reported {
            let m = metrics();
            m.lease_held.set(1);
            m.lease_token.set(token as i64);
        }
    }

    /// Not held (any more).
    pub fn drop_holding(&self) {
        self.holding.store(false, Ordering::Relaxed);
        self.valid_until_ms.store(0, Ordering::Relaxed);
        if self.reported {
            let m = metrics();
            m.lease_held.set(0);
            m.lease_token.set(0);
        }
    }

    /// Held in this process's view (the deadline may have passed).
    pub fn thinks_it_holds(&self) -> bool {
        self.holding.load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// The shards' leases, by first slot (empty unless replicas share a
/// cluster): the topology decides which exist, the lease loop which are
/// held.
#[derive(Default)]
pub struct Shards {
    leases: RwLock<BTreeMap<u16, Arc<Lease>>>,
}

impl Shards {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u16, Arc<Lease>>> {
        self.leases.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The shards now (by first slot): new ones get a lease not held, and
    /// the leases of shards gone are forgotten (their key expires in Redis).
    pub fn set(&self, base: &Lease, slots: impl IntoIterator<Item = u16>) {
        let mut leases = self.leases.write().unwrap_or_else(|e| e.into_inner());
        let now: BTreeMap<u16, Arc<Lease>> = slots
            .into_iter()
            .map(|slot| (slot, leases.get(&slot).cloned().unwrap_or_else(|| Arc::new(base.for_shard(slot)))))
            .collect();
        *leases = now;
    }

    /// Every shard's lease.
    pub fn all(&self) -> Vec<(u16, Arc<Lease>)> {
        self.read().iter().map(|(slot, lease)| (*slot, lease.clone())).collect()
    }

    /// Whether this daemon handles the events of the shard starting at `slot`.
    pub fn holds(&self, slot: u16) -> bool {
        self.read().get(&slot).is_some_and(|l| l.holds())
    }

    /// Whether this daemon holds any shard.
    pub fn any_held(&self) -> bool {
        self.read().values().any(|l| l.holds())
    }

    /// The shards this daemon holds, by first slot.
    pub fn held(&self) -> Vec<u16> {
        self.read().iter().filter(|(_, l)| l.holds()).map(|(slot, _)| *slot).collect()
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
        let off = Lease::new(&ReplicaConfig { enabled: false, ..ReplicaConfig::default() }, 0, "c");
        assert!(off.holds(), "replicas off: always");
        assert!(lease.is_own_key(b"cachepol:lease:events:db0") && !lease.is_own_key(b"x"));
    }

    #[test]
    fn shards_keep_their_lease_across_topology_reads() {
        let config = ReplicaConfig { enabled: true, lease_ttl_ms: 5000, ..ReplicaConfig::default() };
        let base = Lease::new(&config, 0, "c");
        let shards = Shards::default();
        shards.set(&base, [0, 5461, 10923]);
        let (_, first) = shards.all()[0].clone();
        assert_eq!(first.key, "cachepol:lease:events:db0:slot0");
        assert!(base.is_own_key(first.key.as_bytes()) && base.is_own_key(first.counter.as_bytes()));
        first.confirm(3, Instant::now());
        assert_eq!(shards.held(), [0]);
        // A failover keeps the slots, so the lease: still held.
        shards.set(&base, [0, 5461, 10923]);
        assert!(shards.holds(0) && !shards.holds(5461));
        shards.set(&base, [5461, 10923]);
        assert!(shards.held().is_empty());
    }
}
