//! Several daemons on one Redis: which of them takes the keyspace events.
//!
//! Keyspace notifications go to every subscriber, so two daemons running
//! the same policies would each handle every event. With `[replicas]
//! enabled = true` (the default: a lone daemon simply holds the lease), the daemons share one lease in Redis (the key
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
//! - a holder whose keyspace subscriptions are all down (so hears nothing)
//!   gives the lease up after a third of the TTL, and a daemon takes it
//!   only while subscribed (to every primary, on a cluster);
//! - stopping: the holder deletes the lease (if still its own) once its
//!   in-flight calls are done, and a standby, which looks every second,
//!   takes over.
//!
//! The token orders holdings and names them in logs; it does not fence
//! writes (Redis has no conditional write on it for a policy's commands):
//! the deadline above is what keeps two holders from overlapping.
//!
//! A daemon that takes the lease sweeps every policy (`sweep(gap)`): events
//! between the old holder's last one and the takeover went to nobody (a
//! daemon taking it as it starts sweeps as its start, `sweep(start)`). The
//! token is shown in the log, `/status` and `/metrics`
//! (`cachepol_lease_token`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::store::target::Conn;
use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::dispatch::lease::Lease;
use crate::dispatch::routes::Routes;
use crate::dispatch::switches::Switches;
use crate::intake::cluster::Nodes;
use crate::intake::peers::ROLL_CALL;
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

/// Delete the lease if it is still `ARGV[1]` (with `UNLINK`, which the
/// policies' rule allows already: `cachepol acl` need not grant `DEL`, which
/// would let the user delete any key it may write synchronously).
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('UNLINK', KEYS[1]) end
return 0
";

/// How often a standby looks whether the lease is free.
const STANDBY_POLL: Duration = Duration::from_secs(1);

/// The lease scripts, and the timing every request follows.
struct Requests {
    take: redis::Script,
    renew: redis::Script,
    release: redis::Script,
    /// A third of the TTL: the renewal period, and the bound on a request.
    every: Duration,
    ttl_ms: u64,
}

impl Requests {
    fn new(ttl: Duration) -> Requests {
        Requests {
            take: redis::Script::new(TAKE),
            renew: redis::Script::new(RENEW),
            release: redis::Script::new(RELEASE),
            every: ttl / 3,
            ttl_ms: ttl.as_millis() as u64,
        }
    }

    /// Take `lease` if it is free: its token, or `None` when held.
    async fn take(&self, lease: &Lease, conn: &mut Conn) -> redis::RedisResult<Option<u64>> {
        let sent = Instant::now();
        let mut call = self.take.key(&lease.key);
        call.key(&lease.counter).arg(&lease.id).arg(self.ttl_ms);
        let token = bounded(self.every, call.invoke_async::<Option<u64>>(conn)).await?;
        if let Some(token) = token {
            lease.confirm(token, sent);
        }
        Ok(token)
    }

    /// Extend `lease`: 1 extended (and confirmed), 0 another daemon holds
    /// it, -1 nobody does; and whether the holding had lapsed by the time
    /// the answer came (its deadline passed: events were skipped).
    async fn renew(&self, lease: &Lease, conn: &mut Conn) -> redis::RedisResult<(i64, bool)> {
        let sent = Instant::now();
        let mut call = self.renew.key(&lease.key);
        call.arg(lease.value()).arg(self.ttl_ms);
        let held = bounded(self.every, call.invoke_async::<i64>(conn)).await?;
        let lapsed = !lease.holds();
        if held == 1 {
            lease.extend(sent);
        }
        Ok((held, lapsed))
    }

    /// Stop holding `lease` and delete it if it is still ours: whether it was.
    async fn give_back(&self, lease: &Lease, conn: &mut Conn) -> bool {
        let value = lease.value();
        lease.drop_holding();
        let mut call = self.release.key(&lease.key);
        call.arg(value);
        matches!(bounded(self.every, call.invoke_async::<i64>(conn)).await, Ok(1))
    }
}

/// Whether any keyspace subscription is up: a holder gives its leases up
/// only when none is (a primary down is down for every daemon alike; the
/// sweep when its successor is subscribed reconciles it, while the other
/// nodes' events go on). Taking a lease needs every subscription.
fn hearing() -> bool {
    metrics().subscriptions.get() > 0
}

/// Take, keep and give back the lease until `stop`; sweep every policy on
/// each takeover. `stop` comes after the daemon's in-flight calls are done.
/// `settled` fires after the first round (the lease taken, or seen held by
/// another daemon): the daemon says it is ready only then, so that a lone
/// daemon handles what is written once it says so. A takeover in that
/// first round sweeps as the daemon's start (`sweep(start)`): the
/// subscription's own start sweep waits for the lease.
pub async fn run(
    switches: Arc<Switches>,
    nodes: Arc<Nodes>,
    mut conn: Conn,
    routes: Arc<ArcSwap<Routes>>,
    stop: CancellationToken,
    settled: tokio::sync::oneshot::Sender<()>,
) {
    if switches.shards.is_some() {
        return run_shards(switches, nodes, conn, routes, stop, settled).await;
    }
    let lease = &switches.lease;
    if !lease.enabled() {
        return;
    }
    let mut settled = Some(settled);
    let ttl = lease.ttl;
    let requests = Requests::new(ttl);
    let every = requests.every;
    let ready = &metrics().ready;
    let mut answered = Instant::now();
    let mut unsubscribed_since: Option<Instant> = None;
    let mut standby_logged = false;
    let mut refused_logged = false;
    loop {
        let subscribed = ready.subscribed.load(Ordering::Relaxed);
        unsubscribed_since = if hearing() { None } else { unsubscribed_since.or(Some(Instant::now())) };
        if lease.thinks_it_holds() {
            if unsubscribed_since.is_some_and(|at| at.elapsed() >= every) {
                // Deaf to keyspace events: a subscribed standby does better.
                warn!(key = %lease.key, "the keyspace subscription is down: giving the lease up to a standby");
                requests.give_back(lease, &mut conn).await;
            } else {
                match requests.renew(lease, &mut conn).await {
                    Ok((1, lapsed)) => {
                        answered = Instant::now();
                        if lapsed {
                            // Events were skipped while it could not be
                            // confirmed; nobody else handled them.
                            info!(key = %lease.key, "the keyspace-event lease is confirmed again after a lapse; sweeping every policy");
                            routes.load().sweep_all(SweepReason::Gap);
                        }
                    }
                    Ok((n, _)) => {
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
            match requests.take(lease, &mut conn).await {
                Ok(Some(token)) => {
                    answered = Instant::now();
                    metrics().lease_takeovers.inc();
                    info!(key = %lease.key, token, id = %lease.id, "took the keyspace-event lease: this daemon handles keyspace events, sweeps and deploy hooks; sweeping every policy for what went to nobody");
                    routes.load().sweep_all(first_sweep(&settled));
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
                Err(e) => refused(&e, &lease.key, &mut refused_logged),
            }
        }
        Readiness::set(&ready.lease, answered.elapsed() < ttl);
        // Settled once it could try to take the lease (only a subscribed
        // daemon does).
        if let Some(settled) = settled.take_if(|_| subscribed) {
            let _ = settled.send(());
        }
        let pause = if lease.thinks_it_holds() { every } else { every.min(STANDBY_POLL) };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    if lease.thinks_it_holds() {
        match requests.give_back(lease, &mut conn).await {
            true => info!(key = %lease.key, "gave the keyspace-event lease back: a standby takes over"),
            false => info!(key = %lease.key, "the keyspace-event lease was not ours any more"),
        }
    }
}

/// The reason of a takeover's sweep: `start` in the lease loop's first
/// round (`settled` not sent yet), `gap` later.
fn first_sweep(settled: &Option<tokio::sync::oneshot::Sender<()>>) -> SweepReason {
    if settled.is_some() { SweepReason::Start } else { SweepReason::Gap }
}

/// A lease request Redis refused: an ACL without `incr`/`del`, a key of the
/// wrong type. No daemon will ever hold the lease; say so, once.
fn refused(e: &redis::RedisError, key: &str, logged: &mut bool) {
    if !*logged && !e.is_timeout() && !is_connection_error(e) {
        warn!(error = %e, key, "cannot take the keyspace-event lease: no daemon handles keyspace events until this is fixed (re-run `cachepol acl`: replicas are on by default; or set [replicas] enabled = false for a daemon that must run alone)");
        *logged = true;
    }
}

/// Replicas sharing a Redis Cluster: one lease per shard, split evenly.
///
/// Every round (a third of the TTL), each daemon counts itself among the
/// replicas alive (a sorted set scored by Redis's clock), as long as it
/// hears at least one primary, and aims at its share,
/// `ceil(shards / replicas)`. It renews the shards it holds, gives back
/// those over its share (a daemon that joins gets work within a round) and
/// those whose primary it has not heard for a round, and takes free ones
/// up to its share whose primary it hears. A shard found free two rounds
/// in a row is taken even above the share: a replica that counts itself
/// but cannot take it (not subscribed to that primary) must not leave it
/// to nobody. Taking any shard, or confirming one again after a lapse,
/// sweeps every policy: their events between the last holder and now went
/// to nobody. (The sweep walks every primary: what a policy reconciles
/// for one shard's missed events may be stored on another.)
async fn run_shards(
    switches: Arc<Switches>,
    nodes: Arc<Nodes>,
    mut conn: Conn,
    routes: Arc<ArcSwap<Routes>>,
    stop: CancellationToken,
    settled: tokio::sync::oneshot::Sender<()>,
) {
    let mut settled = Some(settled);
    let (base, shards) = (&switches.lease, switches.shards.as_ref().expect("checked by run"));
    let requests = Requests::new(base.ttl);
    let every = requests.every;
    let members = redis::Script::new(ROLL_CALL);
    let ready = &metrics().ready;
    let mut answered = Instant::now();
    let mut deaf_since: BTreeMap<u16, Instant> = BTreeMap::new();
    let mut free_rounds: BTreeMap<u16, u32> = BTreeMap::new();
    let mut refused_logged = false;
    let mut share_logged = None;
    loop {
        let all = shards.all();
        for (slot, _) in &all {
            if nodes.hears(*slot) {
                deaf_since.remove(slot);
            } else {
                deaf_since.entry(*slot).or_insert_with(Instant::now);
            }
        }
        let mut call = members.key(base.members_key());
        call.arg(&base.id).arg(requests.ttl_ms).arg(if hearing() { "1" } else { "0" });
        let replicas = match bounded(every, call.invoke_async::<Vec<String>>(&mut conn)).await {
            Ok(alive) => {
                answered = Instant::now();
                alive.len().max(1)
            }
            Err(e) => {
                refused(&e, &base.members_key(), &mut refused_logged);
                1
            }
        };
        let share = all.len().div_ceil(replicas);
        let mut held = 0;
        let mut swept_for = Vec::new();
        for (slot, lease) in all.iter().filter(|(_, l)| l.thinks_it_holds()) {
            let deaf = deaf_since.get(slot).is_some_and(|at| at.elapsed() >= every);
            if deaf || held >= share {
                let why = if deaf { "its primary is not heard" } else { "balancing between replicas" };
                requests.give_back(lease, &mut conn).await;
                info!(slot, key = %lease.key, "gave a shard's keyspace-event lease back ({why})");
                continue;
            }
            match requests.renew(lease, &mut conn).await {
                Ok((1, lapsed)) => {
                    held += 1;
                    if lapsed {
                        info!(slot, key = %lease.key, "a shard's keyspace-event lease is confirmed again after a lapse");
                        swept_for.push(*slot);
                    }
                }
                Ok(_) => {
                    warn!(slot, key = %lease.key, "lost a shard's keyspace-event lease: another daemon handles it");
                    lease.drop_holding();
                }
                Err(e) => {
                    tracing::debug!(error = %e, slot, "cannot renew a shard's keyspace-event lease");
                    held += 1;
                }
            }
        }
        for (slot, lease) in all.iter().filter(|(slot, l)| !l.thinks_it_holds() && nodes.hears(*slot)) {
            if held >= share && !free_twice(&requests, lease, &mut conn, &mut free_rounds, *slot).await {
                continue;
            }
            match requests.take(lease, &mut conn).await {
                Ok(Some(token)) => {
                    held += 1;
                    swept_for.push(*slot);
                    free_rounds.remove(slot);
                    metrics().lease_takeovers.inc();
                    info!(slot, token, key = %lease.key, id = %base.id, "took a shard's keyspace-event lease: this daemon handles its events and sweeps it");
                }
                Ok(None) => {}
                Err(e) => refused(&e, &lease.key, &mut refused_logged),
            }
        }
        if !swept_for.is_empty() {
            let slots: Vec<String> = swept_for.iter().map(u16::to_string).collect();
            info!(slots = %slots.join(" "), "shards taken or confirmed after a lapse: sweeping every policy for what went to nobody");
            routes.load().sweep_all(first_sweep(&settled));
        }
        if share_logged != Some((held, all.len(), replicas)) {
            info!(
                held,
                shards = all.len(),
                replicas,
                "holding {held} of {} shards' keyspace events ({replicas} replicas)",
                all.len()
            );
            share_logged = Some((held, all.len(), replicas));
        }
        metrics().lease_held.set(held as i64);
        Readiness::set(&ready.lease, answered.elapsed() < base.ttl);
        if let Some(settled) = settled.take() {
            let _ = settled.send(());
        }
        let pause = if held >= share && share > 0 { every } else { every.min(STANDBY_POLL) };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    for (_, lease) in shards.all().iter().filter(|(_, l)| l.thinks_it_holds()) {
        requests.give_back(lease, &mut conn).await;
    }
    let mut call = redis::cmd("ZREM");
    call.arg(base.members_key()).arg(&base.id);
    let _ = bounded(every, call.query_async::<i64>(&mut conn)).await;
    info!("gave the shards' keyspace-event leases back: the other replicas take over");
}

/// Whether the lease of the shard starting at `slot` has been free at two
/// looks in a row (one `EXISTS` a round, only for daemons at their share).
async fn free_twice(
    requests: &Requests,
    lease: &Lease,
    conn: &mut Conn,
    rounds: &mut BTreeMap<u16, u32>,
    slot: u16,
) -> bool {
    let free =
        matches!(bounded(requests.every, redis::cmd("EXISTS").arg(&lease.key).query_async::<i64>(conn)).await, Ok(0));
    if !free {
        rounds.remove(&slot);
        return false;
    }
    let seen = rounds.entry(slot).or_default();
    *seen += 1;
    *seen >= 2
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
