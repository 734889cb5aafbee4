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
//! (default `cachepol:control:sweeps`) counts the requests per policy, with
//! the reason asked for beside it (field `NAME.reason`). Every daemon reads
//! it with the disabled set; a count that changed since its last reading
//! queues one sweep of that policy. A count can also go down or vanish
//! (Redis restarted empty, a failover to a replica that had not seen it):
//! any change is a request, since one sweep too many costs little and one
//! too few leaves the cache wrong. The reading taken at start, before
//! anything is delivered, is only a baseline: a daemon starting does not
//! replay old requests (it sweeps at start anyway).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::store::target::Conn;
use arc_swap::ArcSwap;
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

/// Ask every daemon running policy `name` to sweep it (what `cachepol
/// sweep` does); returns how many requests that policy has had.
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

/// The sweep requests since the last reading: counts per policy, and what
/// to queue for those whose count changed.
#[derive(Default)]
pub struct SweepRequests {
    seen: Option<HashMap<String, i64>>,
}

/// Take the baseline of the sweep requests at `key`, before anything is
/// delivered: requests made from now on are acted on.
pub async fn read_sweeps_at_start(conn: &mut Conn, key: &str) -> redis::RedisResult<SweepRequests> {
    let mut requests = SweepRequests::default();
    requests.update(redis::cmd("HGETALL").arg(key).query_async(conn).await?);
    Ok(requests)
}

impl SweepRequests {
    fn update(&mut self, now: HashMap<String, String>) -> Vec<(String, SweepReason)> {
        let counts: HashMap<String, i64> = now
            .iter()
            .filter(|(field, _)| !field.ends_with(".reason"))
            .filter_map(|(field, count)| Some((field.clone(), count.parse().ok()?)))
            .collect();
        let Some(seen) = self.seen.replace(counts.clone()) else { return Vec::new() };
        counts
            .into_iter()
            .filter(|(name, count)| seen.get(name) != Some(count))
            .map(|(name, _)| {
                let reason = now.get(&format!("{name}.reason")).and_then(|r| sweep_reason(r));
                (name, reason.unwrap_or(SweepReason::Manual))
            })
            .collect()
    }
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
        if let Ok(now) = asked {
            // Read by every daemon (the counts stay current), acted on by
            // one: the lease holder, or on a cluster the replica holding the
            // first shard (a sweep walks every node).
            for (name, reason) in requests.update(now).into_iter().filter(|_| !switches.standing_by()) {
                let reason_name = sweep_reason_name(reason);
                match routes.load().get(&name) {
                    Some(_) if !switches.leads_sweeps() => {
                        info!(policy = %name, reason = reason_name, "sweep requested by the operator: left to the replica holding the first shard");
                    }
                    Some(route) => {
                        info!(policy = %name, reason = reason_name, "sweep requested by the operator: queued");
                        let _ = route.queue.push(Item::Sweep(reason));
                    }
                    None => info!(policy = %name, "sweep requested by the operator for a policy not loaded here"),
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
    fn sweep_requests_count_from_the_first_reading() {
        let mut requests = SweepRequests::default();
        assert!(requests.update(reading(&[("a", "3"), ("a.reason", "manual")])).is_empty(), "a baseline");
        assert!(requests.update(reading(&[("a", "3"), ("a.reason", "manual")])).is_empty(), "nothing new");
        let mut asked = requests.update(reading(&[("a", "4"), ("a.reason", "gap"), ("b", "1"), ("c", "x")]));
        asked.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(asked, vec![("a".to_owned(), SweepReason::Gap), ("b".to_owned(), SweepReason::Manual)]);
        // Redis restarted empty, then one request: the count is lower than
        // before, and still a request.
        assert!(requests.update(reading(&[])).is_empty(), "counts gone: nothing asked");
        assert_eq!(requests.update(reading(&[("a", "1")])), vec![("a".to_owned(), SweepReason::Manual)]);
    }
}
