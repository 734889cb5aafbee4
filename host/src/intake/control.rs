//! The kill switch: an operator disables a policy without touching files.
//!
//! The set of disabled policy names lives in Redis (a Set, default key
//! `cachepol:control:disabled`), written by `cachepol disable NAME` and
//! `cachepol enable NAME` (or `SADD`/`SREM` by hand), so every daemon
//! sharing the Redis obeys it and it survives restarts. The daemon reads it
//! once a second (one `SMEMBERS`; polling needs no notification flags and
//! cannot miss a change) and confirms each change in its log.
//!
//! A disabled policy gets nothing: keyspace events and sweeps are dropped
//! and owed as a sweep, deploy hooks fail (so the deploy reader retries and
//! then dead-letters them: nothing is lost). When it is enabled again it is
//! swept, to reconcile what it missed.
//!
//! Sweep requests (`cachepol sweep NAME`) travel the same way: a Redis Hash
//! (default `cachepol:control:sweeps`) counts the requests per policy
//! (field `NAME`), with the reason asked for beside it (`NAME.reason`), and
//! says which the policy's sweeps have answered: `NAME.done` is the count
//! last run, `NAME.by` the daemon that ran it (its lease id) and `NAME.at`
//! when (Unix ms). A request is pending while `NAME.done` differs from
//! `NAME`, and stays pending until a daemon that has the policy and leads
//! sweeps (the lease holder; on a cluster the replica holding the first
//! shard) has run a sweep started after it to its end: a request made
//! while nobody leads (a lease gap, the first shard's primary down, the
//! leader without that policy) is run by whoever leads next, and
//! `cachepol sweep --wait` waits for `NAME.done` and says who ran it.
//! Every daemon reads the hash with the disabled set; only the leader acts.
//! A count that vanished (Redis restarted empty) leaves nothing pending.
//! (A hash written before `NAME.done` existed runs each policy's last
//! request once more.) With replicas off every daemon runs every request
//! made after it started, and the last to finish is the one recorded.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::store::target::Conn;
use arc_swap::ArcSwap;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::dispatch::queue::Item;
use crate::dispatch::routes::Routes;
use crate::dispatch::switches::Switches;
use crate::metrics::metrics;
use crate::store::redis::is_connection_error;
use crate::wit::{SWEEP_REASONS, SweepReason, sweep_reason_name};

/// How often the disabled set is read.
pub const POLL_EVERY: Duration = Duration::from_secs(1);

/// Read the disabled set once, before anything is delivered: a policy an
/// operator disabled must not run even its start-up sweep.
pub async fn read_at_start(switches: &Switches, conn: &mut Conn, key: &str) -> redis::RedisResult<()> {
    read(switches, conn, key).await.map(|_| ())
}

/// Take a reading of the disabled set, log the policies it newly disables,
/// and return those it newly enables.
async fn read(switches: &Switches, conn: &mut Conn, key: &str) -> redis::RedisResult<Vec<String>> {
    let now = redis::cmd("SMEMBERS").arg(key).query_async::<BTreeSet<String>>(conn).await?;
    let (disabled, enabled) = switches.update(now);
    for name in disabled {
        warn!(policy = %name, key = %key, "policy disabled by the operator: it gets no events until enabled");
    }
    Ok(enabled)
}

/// A sweep reason by its WIT name.
pub fn sweep_reason(name: &str) -> Option<SweepReason> {
    SWEEP_REASONS.into_iter().find(|r| sweep_reason_name(*r) == name)
}

/// Ask the daemon leading sweeps to sweep policy `name` (what `cachepol
/// sweep` does); returns how many requests that policy has had: the
/// request is answered once [`SweepAnswer::done`] reaches it.
pub async fn request_sweep(conn: &mut Conn, key: &str, name: &str, reason: SweepReason) -> redis::RedisResult<i64> {
    let (count,): (i64,) = redis::pipe()
        .atomic()
        .cmd("HINCRBY")
        .arg(key)
        .arg(name)
        .arg(1)
        .cmd("HSET")
        .arg(key)
        .arg(format!("{name}.reason"))
        .arg(sweep_reason_name(reason))
        .ignore()
        .query_async(conn)
        .await?;
    Ok(count)
}

/// Which of a policy's sweep requests were run, and by whom.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepAnswer {
    /// The request count last run.
    pub done: i64,
    /// The daemon that ran it (its lease id), and when (Unix ms).
    pub by: Option<String>,
    pub at_ms: Option<u64>,
}

/// What the hash says of policy `name`'s requests.
pub async fn sweep_answer(conn: &mut Conn, key: &str, name: &str) -> redis::RedisResult<SweepAnswer> {
    let (done, by, at): (Option<i64>, Option<String>, Option<u64>) = redis::cmd("HMGET")
        .arg(key)
        .arg(format!("{name}.done"))
        .arg(format!("{name}.by"))
        .arg(format!("{name}.at"))
        .query_async(conn)
        .await?;
    Ok(SweepAnswer { done: done.unwrap_or(0), by, at_ms: at })
}

/// A policy's requests not yet run: the count to record once its sweep
/// has run, and the reason asked for.
#[derive(Debug, PartialEq, Eq)]
struct Pending {
    name: String,
    count: i64,
    reason: SweepReason,
}

/// The policies with requests pending in a reading of the hash: those whose
/// count differs from the one last run (`ran_here`: by this daemon, with
/// replicas off; else by any, `NAME.done`).
fn pending(now: &HashMap<String, String>, ran_here: Option<&HashMap<String, i64>>) -> Vec<Pending> {
    let number = |field: String| now.get(&field).and_then(|v| v.parse::<i64>().ok());
    let mut pending: Vec<Pending> = now
        .keys()
        .filter(|field| ![".reason", ".done", ".by", ".at"].iter().any(|suffix| field.ends_with(suffix)))
        .filter_map(|name| {
            let count = number(name.clone())?;
            let done = match ran_here {
                Some(ran) => ran.get(name).copied().unwrap_or(0),
                None => number(format!("{name}.done")).unwrap_or(0),
            };
            (done != count).then(|| Pending {
                name: name.clone(),
                count,
                reason: now.get(&format!("{name}.reason")).and_then(|r| sweep_reason(r)).unwrap_or(SweepReason::Manual),
            })
        })
        .collect();
    pending.sort_by(|a, b| a.name.cmp(&b.name));
    pending
}

/// The operator's sweeps as this daemon handles them.
#[derive(Default)]
pub struct SweepRequests {
    /// Queued here and waited for: per policy, the count it answers and
    /// the worker's word that its sweep ended.
    running: HashMap<String, (i64, oneshot::Receiver<bool>)>,
    /// With replicas off every daemon runs every request: the count each
    /// policy's requests were at when this daemon last acted (at start, a
    /// baseline: old requests are not replayed, it sweeps at start anyway).
    ran_here: Option<HashMap<String, i64>>,
    /// Requests left to the leader, said in the log once each.
    left: HashMap<String, i64>,
}

/// Check that the sweep requests at `key` can be read, before anything is
/// delivered (a refusal is said at start); `per_daemon` (replicas off):
/// every daemon runs every request made from now on.
pub async fn read_sweeps_at_start(conn: &mut Conn, key: &str, per_daemon: bool) -> redis::RedisResult<SweepRequests> {
    let now: HashMap<String, String> = redis::cmd("HGETALL").arg(key).query_async(conn).await?;
    let baseline =
        per_daemon.then(|| pending(&now, Some(&HashMap::new())).into_iter().map(|p| (p.name, p.count)).collect());
    Ok(SweepRequests { ran_here: baseline, ..SweepRequests::default() })
}

impl SweepRequests {
    /// The sweeps that ended since the last look (policy, count, whether
    /// it ran to its end); those still running stay.
    fn ended(&mut self) -> Vec<(String, i64, bool)> {
        let mut ended = Vec::new();
        self.running.retain(|name, (count, rx)| match rx.try_recv() {
            Err(oneshot::error::TryRecvError::Empty) => true,
            Ok(ok) => {
                ended.push((name.clone(), *count, ok));
                false
            }
            Err(oneshot::error::TryRecvError::Closed) => {
                ended.push((name.clone(), *count, false));
                false
            }
        });
        ended
    }
}

/// Record that this daemon (`me`) ran policy `name`'s requests up to
/// `count`.
async fn record_sweep(conn: &mut Conn, key: &str, name: &str, count: i64, me: &str) -> redis::RedisResult<()> {
    let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    redis::cmd("HSET")
        .arg(key)
        .arg(format!("{name}.done"))
        .arg(count)
        .arg(format!("{name}.by"))
        .arg(me)
        .arg(format!("{name}.at"))
        .arg(at)
        .query_async(conn)
        .await
}

/// What the control poll reads and where it acts.
pub struct Watch {
    pub switches: Arc<Switches>,
    pub conn: Conn,
    /// The disabled set.
    pub key: String,
    /// The sweep requests' hash, and the reading taken at start.
    pub sweep_key: String,
    pub requests: SweepRequests,
    pub routes: Arc<ArcSwap<Routes>>,
}

/// Read the disabled set (and the sweep requests at `sweep_key`) every
/// [`POLL_EVERY`] until `stop`; a policy enabled again is swept to catch
/// up, and one an operator asked to sweep is swept.
pub async fn watch(w: Watch, stop: CancellationToken) {
    let Watch { switches, mut conn, key, sweep_key, mut requests, routes } = w;
    let mut failing = false;
    let mut sweeps_failing = false;
    loop {
        // Recorded before the reading, which then shows them answered.
        for (name, count, ran) in requests.ended() {
            if !ran {
                info!(policy = %name, "the operator's sweep did not run to its end; asked again while it is pending");
                continue;
            }
            match record_sweep(&mut conn, &sweep_key, &name, count, &switches.lease.id).await {
                Ok(()) => info!(policy = %name, request = count, "sweep requested by the operator: run, and recorded"),
                Err(e) => {
                    warn!(error = %e, policy = %name, key = %sweep_key, "the operator's sweep ran but cannot be recorded; it will run again")
                }
            }
        }
        let asked = redis::cmd("HGETALL").arg(&sweep_key).query_async::<HashMap<String, String>>(&mut conn).await;
        match asked {
            Ok(_) => sweeps_failing = false,
            // Redis away is logged below; a refusal (an ACL without
            // `hgetall` on the key) must not leave `cachepol sweep` silently
            // ignored.
            Err(ref e) if !sweeps_failing && !is_connection_error(e) => {
                sweeps_failing = true;
                warn!(error = %e, key = %sweep_key, "cannot read the sweep requests; `cachepol sweep` is ignored until they can be read");
            }
            Err(_) => {}
        }
        // Acted on by one daemon: the lease holder, or on a cluster the
        // replica holding the first shard (a sweep walks every node). The
        // others leave requests pending for it, whoever it is next.
        let leads = !switches.standing_by() && switches.leads_sweeps();
        if !leads {
            requests.running.clear();
        }
        if let Ok(now) = &asked {
            for Pending { name, count, reason } in pending(now, requests.ran_here.as_ref()) {
                if !leads {
                    if requests.left.insert(name.clone(), count) != Some(count) {
                        info!(policy = %name, request = count, "sweep requested by the operator: left to the replica leading sweeps (the lease holder, or the first shard's)");
                    }
                    continue;
                }
                if requests.running.get(&name).is_some_and(|(queued, _)| *queued == count) {
                    continue;
                }
                let routes = routes.load();
                let Some(route) = routes.get(&name) else {
                    // Left pending, for a replica that has it.
                    continue;
                };
                if let Some(rx) = route.queue.push_awaited(reason) {
                    info!(policy = %name, reason = sweep_reason_name(reason), request = count, "sweep requested by the operator: queued");
                    if let Some(ran) = requests.ran_here.as_mut() {
                        ran.insert(name.clone(), count);
                    }
                    requests.running.insert(name, (count, rx));
                }
            }
        }
        match read(&switches, &mut conn, &key).await {
            Ok(enabled) => {
                failing = false;
                for name in enabled {
                    info!(policy = %name, key = %key, "policy enabled by the operator: its lease holder sweeps it to catch up");
                    if let Some(route) = routes.load().get(&name).filter(|_| !switches.standing_by()) {
                        let _ = route.queue.push(Item::Sweep(SweepReason::Manual));
                    }
                }
            }
            // Keep the last reading while Redis is away.
            Err(e) if !failing => {
                metrics().redis_errors.inc();
                failing = true;
                warn!(error = %e, key = %key, "cannot read the disabled policies; keeping the last reading");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(POLL_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(fields: &[(&str, &str)]) -> HashMap<String, String> {
        fields.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_request_is_pending_until_its_count_is_recorded_done() {
        let names = |r: &HashMap<String, String>| {
            pending(r, None).into_iter().map(|p| (p.name, p.count, p.reason)).collect::<Vec<_>>()
        };
        assert_eq!(names(&reading(&[("a", "3"), ("a.reason", "gap")])), [("a".into(), 3, SweepReason::Gap)]);
        assert!(names(&reading(&[("a", "3"), ("a.done", "3"), ("a.by", "d/1")])).is_empty(), "answered");
        assert_eq!(
            names(&reading(&[("a", "4"), ("a.done", "3"), ("b", "1"), ("c", "x"), ("d.e", "2")])),
            [
                ("a".into(), 4, SweepReason::Manual),
                ("b".into(), 1, SweepReason::Manual),
                ("d.e".into(), 2, SweepReason::Manual)
            ]
        );
        // Redis restarted empty: nothing pending; then one request.
        assert!(names(&reading(&[])).is_empty());
        assert_eq!(names(&reading(&[("a", "1")])), [("a".into(), 1, SweepReason::Manual)]);
        // Replicas off: what this daemon ran, whoever recorded it.
        let ran: HashMap<String, i64> = [("a".to_owned(), 2)].into();
        let mine = pending(&reading(&[("a", "3"), ("a.done", "3")]), Some(&ran));
        assert_eq!(mine.into_iter().map(|p| p.count).collect::<Vec<_>>(), [3]);
    }
}
