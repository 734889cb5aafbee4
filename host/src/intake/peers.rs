//! Other daemons on the same Redis: each says it is alive, and sees who
//! else is.
//!
//! Keyspace notifications reach every subscriber, so two daemons running
//! the same policies each handle every keyspace event and sweep unless they
//! share the lease ([`crate::intake::lease`], on by default). Every daemon,
//! whatever its `[replicas]` setting, adds its id to a sorted set in Redis
//! (`<lease key>:daemons`, on the slot of the daemon's other keys on a
//! cluster) scored by Redis's clock plus the lease's TTL, every third of
//! that TTL; it drops those past their score and reads the rest: the
//! daemons alive on this Redis. With replicas off, a daemon that sees
//! another names it: in the log (once per peer), in `/status` (`peers`) and
//! in `cachepol_peer_daemons`. With replicas on, peers are expected: they
//! are shown, and logged once at `info`.
//!
//! A key with a TTL rather than `CLIENT SETNAME` and `CLIENT LIST`: it needs
//! no command that shows other clients' connections to the ACL user
//! `cachepol acl` prints, goes through a cluster client like any key, and a
//! daemon that dies leaves the set within a TTL.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::dispatch::switches::Switches;
use crate::metrics::metrics;
use crate::store::redis::is_connection_error;
use crate::store::target::Conn;

/// Count a daemon (`ARGV[1]`) alive until `ARGV[2]` ms past Redis's clock
/// (`ARGV[3]` = 1; 0 takes it out), forget those past theirs, and return
/// those that remain: `KEYS[1]` the sorted set. The replicas splitting a
/// cluster count themselves in their own set the same way.
pub(crate) const ROLL_CALL: &str = r"
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[2]), ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZRANGE', KEYS[1], 0, -1)
";

/// The other daemons this one saw at its last roll call.
#[derive(Default)]
pub struct Peers {
    seen: Mutex<BTreeSet<String>>,
}

impl Peers {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Their ids (deploy consumer name and nonce), for `/status`.
    pub fn snapshot(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }

    /// A roll call's answer (this daemon's own id left out): the peers that
    /// appeared since the last one.
    fn update(&self, now: BTreeSet<String>) -> Vec<String> {
        let mut seen = self.lock();
        let new = now.difference(&seen).cloned().collect();
        metrics().peer_daemons.set(now.len() as i64);
        *seen = now;
        new
    }
}

/// Answer the roll call every third of the lease's TTL until `stop`, then
/// leave it.
pub async fn run(peers: Arc<Peers>, switches: Arc<Switches>, mut conn: Conn, stop: CancellationToken) {
    let lease = &switches.lease;
    let (key, every) = (lease.daemons_key(), lease.ttl / 3);
    let ttl_ms = lease.ttl.as_millis() as u64;
    let script = redis::Script::new(ROLL_CALL);
    let mut named: BTreeSet<String> = BTreeSet::new();
    let mut refused_logged = false;
    loop {
        let mut call = script.key(&key);
        call.arg(&lease.id).arg(ttl_ms).arg("1");
        match tokio::time::timeout(every, call.invoke_async::<Vec<String>>(&mut conn)).await {
            Ok(Ok(alive)) => {
                refused_logged = false;
                let others = alive.into_iter().filter(|id| *id != lease.id).collect();
                for peer in peers.update(others) {
                    name(&peer, lease.enabled(), &mut named);
                }
            }
            Ok(Err(e)) if !refused_logged && !is_connection_error(&e) => {
                warn!(error = %e, %key, "cannot tell whether other daemons share this Redis (re-run `cachepol acl`?)");
                refused_logged = true;
            }
            // Redis away or slow: the next round asks again.
            _ => {}
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
    let mut call = script.key(&key);
    call.arg(&lease.id).arg(ttl_ms).arg("0");
    let _ = tokio::time::timeout(every, call.invoke_async::<Vec<String>>(&mut conn)).await;
}

/// Say that `peer` runs on this Redis: a warning with replicas off, once
/// per peer (`named`) for as long as this daemon runs.
fn name(peer: &str, replicas: bool, named: &mut BTreeSet<String>) {
    if !named.insert(peer.to_owned()) {
        return;
    }
    if replicas {
        info!(%peer, "another cachepol daemon shares this Redis: one of them at a time handles keyspace events and sweeps ([replicas])");
    } else {
        warn!(
            %peer,
            "another cachepol daemon runs on this Redis: {peer}. With [replicas] enabled = false each of them handles every keyspace event and sweep; set [replicas] enabled = true (the default) in both, or give each its own Redis"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_roll_call_says_who_appeared() {
        let peers = Peers::default();
        let ids = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(peers.update(ids(&["b"])), ["b"]);
        assert_eq!(peers.update(ids(&["b", "c"])), ["c"]);
        assert_eq!(peers.update(ids(&["c"])), Vec::<String>::new());
        assert_eq!(peers.snapshot(), ["c"]);
        assert_eq!(peers.update(ids(&["b", "c"])), ["b"], "one that comes back appears again");
    }
}
