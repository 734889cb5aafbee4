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

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::dispatch::queue::Item;
use crate::dispatch::routes::Routes;
use crate::dispatch::switches::Switches;
use crate::wit::SweepReason;

/// How often the disabled set is read.
pub const POLL_EVERY: Duration = Duration::from_secs(1);

/// Read the disabled set once, before anything is delivered: a policy an
/// operator disabled must not run even its start-up sweep.
pub async fn read_at_start(switches: &Switches, conn: &mut ConnectionManager, key: &str) -> redis::RedisResult<()> {
    read(switches, conn, key).await.map(|_| ())
}

/// Take a reading of the disabled set, log the policies it newly disables,
/// and return those it newly enables.
async fn read(switches: &Switches, conn: &mut ConnectionManager, key: &str) -> redis::RedisResult<Vec<String>> {
    let now = redis::cmd("SMEMBERS").arg(key).query_async::<BTreeSet<String>>(conn).await?;
    let (disabled, enabled) = switches.update(now);
    for name in disabled {
        warn!(policy = %name, key = %key, "policy disabled by the operator: it gets no events until enabled");
    }
    Ok(enabled)
}

/// Read the disabled set every [`POLL_EVERY`] until `stop`; a policy
/// enabled again is swept to catch up.
pub async fn watch(
    switches: Arc<Switches>,
    mut conn: ConnectionManager,
    key: String,
    routes: Arc<ArcSwap<Routes>>,
    stop: CancellationToken,
) {
    let mut failing = false;
    loop {
        match read(&switches, &mut conn, &key).await {
            Ok(enabled) => {
                failing = false;
                for name in enabled {
                    info!(policy = %name, key = %key, "policy enabled by the operator: sweeping it to catch up");
                    if let Some(route) = routes.load().get(&name) {
                        let _ = route.queue.push(Item::Sweep(SweepReason::Manual));
                    }
                }
            }
            // Keep the last reading while Redis is away.
            Err(e) if !failing => {
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
