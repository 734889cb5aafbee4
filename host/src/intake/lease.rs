//! Several daemons on one Redis: which of them takes the keyspace events.
//!
//! Keyspace notifications go to every subscriber, so two daemons running
//! the same policies would each handle every event. With `[replicas]
//! enabled = true`, the daemons share one lease in Redis (the key
//! `replicas.lease_key` + `:db<N>`); the one holding it routes keyspace
//! events to its policies, runs their sweeps and reads deploy hooks, and
//! the others stand by: subscribed, keeping their key index, ready to take
//! over. No consensus protocol of our own, only Redis's atomic commands:
//!
//! - taking it: one script checks the key is free, takes a new fencing
//!   token (`INCR` of `<lease key>:token`) and sets `<daemon id>:<token>`
//!   with `PX lease_ttl_ms`;
//! - keeping it: every third of the TTL, a script extends the TTL only if
//!   the value is still ours (a daemon paused past its TTL and overtaken
//!   finds that out, and stops);
//! - losing touch with Redis: the holder stops routing once the TTL since
//!   its last renewal has passed, when another daemon may have taken over;
//! - stopping: the holder deletes the lease (if still its own), so a
//!   standby takes over within one renewal interval instead of a TTL.
//!
//! A daemon that takes the lease sweeps every policy (`sweep(gap)`): events
//! between the old holder's last one and the takeover went to nobody. The
//! token orders holders (a higher one is later); it is shown in the log,
//! `/status` and `/metrics` (`cachepol_lease_token`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::ReplicaConfig;
use crate::dispatch::routes::Routes;
use crate::metrics::metrics;
use crate::wit::SweepReason;

/// Take the lease if nobody holds it (or a previous run of this daemon,
/// under a fixed id, did): `KEYS[1]` the lease, `KEYS[2]` its token
/// counter, `ARGV[1]` this daemon's id, `ARGV[2]` the TTL in ms. Returns
/// the new token, or nil when another daemon holds it.
const TAKE: &str = r"
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, #ARGV[1] + 1) ~= ARGV[1] .. ':' then return false end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token, 'PX', ARGV[2])
return token
";

/// Extend the lease if it is still `ARGV[1]`: 1, else 0.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// Delete the lease if it is still `ARGV[1]`.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Whether this daemon takes the keyspace events now; read on every event.
pub struct Lease {
    enabled: bool,
    holding: AtomicBool,
    token: AtomicU64,
    key: String,
    id: String,
}

impl Lease {
    /// The lease of database `db` for a daemon called `id` (`None` when
    /// replicas are off: the daemon always holds).
    pub fn new(config: &ReplicaConfig, db: u32, id: &str) -> Arc<Lease> {
        Arc::new(Lease {
            enabled: config.enabled,
            holding: AtomicBool::new(false),
            token: AtomicU64::new(0),
            key: format!("{}:db{db}", config.lease_key),
            id: id.to_owned(),
        })
    }

    /// Whether this daemon handles keyspace events and sweeps now.
    pub fn holds(&self) -> bool {
        !self.enabled || self.holding.load(Ordering::Relaxed)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The token of the current holding (0 when not holding).
    pub fn token(&self) -> u64 {
        if self.holding.load(Ordering::Relaxed) { self.token.load(Ordering::Relaxed) } else { 0 }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn set(&self, holding: bool, token: u64) {
        self.token.store(token, Ordering::Relaxed);
        self.holding.store(holding, Ordering::Relaxed);
        let m = metrics();
        m.lease_held.set(i64::from(holding));
        m.lease_token.set(if holding { token as i64 } else { 0 });
    }

    fn value(&self) -> String {
        format!("{}:{}", self.id, self.token.load(Ordering::Relaxed))
    }
}

/// Take, keep and give back the lease until `stop`; sweep every policy on
/// each takeover.
pub async fn run(
    lease: Arc<Lease>,
    mut conn: ConnectionManager,
    config: ReplicaConfig,
    routes: Arc<ArcSwap<Routes>>,
    stop: CancellationToken,
) {
    if !lease.enabled {
        return;
    }
    let ttl = Duration::from_millis(config.lease_ttl_ms.max(300));
    let every = ttl / 3;
    let (take, renew, release) = (redis::Script::new(TAKE), redis::Script::new(RENEW), redis::Script::new(RELEASE));
    let counter = format!("{}:token", lease.key);
    // When the lease was last known ours, for giving it up when Redis
    // cannot confirm it any more.
    let mut confirmed: Option<Instant> = None;
    let mut standby_logged = false;
    loop {
        if lease.holding.load(Ordering::Relaxed) {
            let before = Instant::now();
            let kept: redis::RedisResult<i64> =
                renew.key(&lease.key).arg(lease.value()).arg(ttl.as_millis() as u64).invoke_async(&mut conn).await;
            match kept {
                Ok(1) => confirmed = Some(before),
                Ok(_) => {
                    warn!(key = %lease.key, token = lease.token.load(Ordering::Relaxed), "lost the keyspace-event lease to another daemon: standing by");
                    lease.set(false, 0);
                    standby_logged = true;
                }
                Err(e) => {
                    metrics().redis_errors.inc();
                    // Another daemon may take it once it expires in Redis:
                    // stop before that can happen.
                    if confirmed.is_none_or(|at| at.elapsed() + every >= ttl) {
                        warn!(error = %e, key = %lease.key, "cannot renew the keyspace-event lease: standing by until Redis confirms it");
                        lease.set(false, 0);
                        standby_logged = true;
                    }
                }
            }
        } else {
            let taken: redis::RedisResult<Option<u64>> = take
                .key(&lease.key)
                .key(&counter)
                .arg(&lease.id)
                .arg(ttl.as_millis() as u64)
                .invoke_async(&mut conn)
                .await;
            match taken {
                Ok(Some(token)) => {
                    confirmed = Some(Instant::now());
                    lease.set(true, token);
                    metrics().lease_takeovers.inc();
                    info!(key = %lease.key, token, "took the keyspace-event lease: this daemon handles keyspace events and sweeps; sweeping every policy for what went to nobody");
                    routes.load().sweep_all(SweepReason::Gap);
                    standby_logged = false;
                }
                Ok(None) => {
                    if !standby_logged {
                        info!(key = %lease.key, "another daemon holds the keyspace-event lease: standing by");
                        standby_logged = true;
                    }
                }
                Err(e) => {
                    metrics().redis_errors.inc();
                    tracing::debug!(error = %e, "cannot take the keyspace-event lease yet");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
    if lease.holding.load(Ordering::Relaxed) {
        let value = lease.value();
        lease.set(false, 0);
        let released: redis::RedisResult<i64> = release.key(&lease.key).arg(value).invoke_async(&mut conn).await;
        match released {
            Ok(1) => info!(key = %lease.key, "gave the keyspace-event lease back: a standby takes over"),
            _ => info!(key = %lease.key, "the keyspace-event lease was not ours any more"),
        }
    }
}
