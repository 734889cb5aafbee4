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
//! - taking it: one script checks the key is free, takes a new token
//!   (`INCR` of `<lease key>:token`, never below Redis's clock in ms, so a
//!   Redis restarted empty does not hand out an old one) and sets
//!   `<daemon id>:<token>` with `PX lease_ttl_ms`, on a connection of the
//!   lease's own, each request bounded by a third of the TTL;
//! - keeping it: every third of the TTL, a script extends the TTL only if
//!   the value is still ours. The holding is valid until the time the
//!   renewal was *sent* plus the TTL ([`crate::dispatch::lease`]): a holder
//!   that cannot confirm it (a stuck connection, a paused process) stops
//!   routing events and starting sweeps before another daemon can take it;
//! - a holder whose keyspace subscription is down (so hears nothing) gives
//!   the lease up after a third of the TTL, and a daemon takes it only
//!   while subscribed;
//! - stopping: the holder deletes the lease (if still its own) once its
//!   in-flight calls are done, and a standby, which looks every second,
//!   takes over.
//!
//! The token orders holdings and names them in logs; it does not fence
//! writes (Redis has no conditional write on it for a policy's commands):
//! the deadline above is what keeps two holders from overlapping.
//!
//! A daemon that takes the lease sweeps every policy (`sweep(gap)`): events
//! between the old holder's last one and the takeover went to nobody. The
//! token is shown in the log, `/status` and `/metrics`
//! (`cachepol_lease_token`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::store::target::Conn;
use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::dispatch::routes::Routes;
use crate::dispatch::switches::Switches;
use crate::metrics::{Readiness, metrics};
use crate::store::redis::is_connection_error;
use crate::wit::SweepReason;

/// Take the lease if nobody holds it: `KEYS[1]` the lease, `KEYS[2]` its
/// token counter, `ARGV[1]` this daemon's id, `ARGV[2]` the TTL in ms.
/// Returns the new token, or nil when it is held.
const TAKE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = redis.call('INCR', KEYS[2])
local now = redis.call('TIME')
local floor = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if token < floor then
  token = floor
  redis.call('SET', KEYS[2], token)
end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token, 'PX', ARGV[2])
return token
";

/// Extend the lease if it is still `ARGV[1]`: 1; 0 if another daemon holds
/// it; -1 if nobody does (it expired, or Redis lost it).
const RENEW: &str = r"
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if held then return 0 end
return -1
";

/// Delete the lease if it is still `ARGV[1]`.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// How often a standby looks whether the lease is free.
const STANDBY_POLL: Duration = Duration::from_secs(1);

/// Take, keep and give back the lease until `stop`; sweep every policy on
/// each takeover. `stop` comes after the daemon's in-flight calls are done.
pub async fn run(switches: Arc<Switches>, mut conn: Conn, routes: Arc<ArcSwap<Routes>>, stop: CancellationToken) {
    let lease = &switches.lease;
    if !lease.enabled() {
        return;
    }
    let ttl = lease.ttl;
    let every = ttl / 3;
    let ttl_ms = ttl.as_millis() as u64;
    let (take, renew, release) = (redis::Script::new(TAKE), redis::Script::new(RENEW), redis::Script::new(RELEASE));
    let ready = &metrics().ready;
    let mut answered = Instant::now();
    let mut unsubscribed_since: Option<Instant> = None;
    let mut standby_logged = false;
    let mut refused_logged = false;
    loop {
        let subscribed = ready.subscribed.load(Ordering::Relaxed);
        unsubscribed_since = if subscribed { None } else { unsubscribed_since.or(Some(Instant::now())) };
        let sent = Instant::now();
        if lease.thinks_it_holds() {
            if unsubscribed_since.is_some_and(|at| at.elapsed() >= every) {
                // Deaf to keyspace events: a subscribed standby does better.
                warn!(key = %lease.key, "the keyspace subscription is down: giving the lease up to a standby");
                let value = lease.value();
                lease.drop_holding();
                let mut call = release.key(&lease.key);
                call.arg(value);
                let _ = bounded(every, call.invoke_async::<i64>(&mut conn)).await;
            } else {
                let mut call = renew.key(&lease.key);
                call.arg(lease.value()).arg(ttl_ms);
                match bounded(every, call.invoke_async::<i64>(&mut conn)).await {
                    Ok(1) => {
                        answered = Instant::now();
                        let lapsed = !lease.holds();
                        lease.extend(sent);
                        if lapsed {
                            // Events were skipped while it could not be
                            // confirmed; nobody else handled them.
                            info!(key = %lease.key, "the keyspace-event lease is confirmed again after a lapse; sweeping every policy");
                            routes.load().sweep_all(SweepReason::Gap);
                        }
                    }
                    Ok(n) => {
                        answered = Instant::now();
                        let why = if n == 0 { "another daemon took it" } else { "it expired or Redis lost it" };
                        warn!(key = %lease.key, "lost the keyspace-event lease ({why}): standing by");
                        lease.drop_holding();
                        standby_logged = true;
                    }
                    // The deadline stops the holding by itself; try again.
                    Err(e) => tracing::debug!(error = %e, "cannot renew the keyspace-event lease"),
                }
            }
        } else if subscribed {
            let mut call = take.key(&lease.key);
            call.key(&lease.counter).arg(&lease.id).arg(ttl_ms);
            match bounded(every, call.invoke_async::<Option<u64>>(&mut conn)).await {
                Ok(Some(token)) => {
                    answered = Instant::now();
                    lease.confirm(token, sent);
                    metrics().lease_takeovers.inc();
                    info!(key = %lease.key, token, id = %lease.id, "took the keyspace-event lease: this daemon handles keyspace events, sweeps and deploy hooks; sweeping every policy for what went to nobody");
                    routes.load().sweep_all(SweepReason::Gap);
                    standby_logged = false;
                    refused_logged = false;
                }
                Ok(None) => {
                    answered = Instant::now();
                    refused_logged = false;
                    if !standby_logged {
                        info!(key = %lease.key, "another daemon holds the keyspace-event lease: standing by");
                        standby_logged = true;
                    }
                }
                Err(e) => {
                    // An ACL without `incr`/`del`, a key of the wrong type:
                    // no daemon will ever hold the lease; say so.
                    if !refused_logged && !e.is_timeout() && !is_connection_error(&e) {
                        warn!(error = %e, key = %lease.key, "cannot take the keyspace-event lease: no daemon handles keyspace events until this is fixed");
                        refused_logged = true;
                    }
                }
            }
        }
        Readiness::set(&ready.lease, answered.elapsed() < ttl);
        let pause = if lease.thinks_it_holds() { every } else { every.min(STANDBY_POLL) };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    if lease.thinks_it_holds() {
        let value = lease.value();
        lease.drop_holding();
        let mut call = release.key(&lease.key);
        call.arg(value);
        match bounded(every, call.invoke_async::<i64>(&mut conn)).await {
            Ok(1) => info!(key = %lease.key, "gave the keyspace-event lease back: a standby takes over"),
            _ => info!(key = %lease.key, "the keyspace-event lease was not ours any more"),
        }
    }
}

/// A lease request, bounded: the connection's own timeout (30 s) is far
/// longer than the lease.
async fn bounded<T>(
    within: Duration,
    request: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    match tokio::time::timeout(within, request).await {
        Ok(result) => result,
        Err(_) => Err(redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"))),
    }
}
