//! Whether Redis may evict the daemon's own keys.
//!
//! cachepol keeps its state in the Redis it serves: the deploy stream and
//! its consumer group (hooks not yet handled), the dead letters, the kill
//! switch and the sweep requests, and, with replicas, the leases (keys with
//! a TTL). A cache usually runs with a `maxmemory` and an eviction policy,
//! and under memory pressure Redis picks its victims among all keys, or
//! among the keys with a TTL. No key can be exempted, so the daemon says at
//! start which of its keys are at risk, and what losing them does.

use redis::aio::ConnectionLike;
use tracing::warn;

/// What `maxmemory-policy` may evict of the daemon's keys (`replicas`:
/// whether leases are in use), and what losing it does; `None` if
/// nothing. Only applies when `maxmemory` is set.
pub fn at_risk(policy: &str, replicas: bool) -> Option<&'static str> {
    if policy.starts_with("allkeys-") {
        Some(
            "any of cachepol's keys: the deploy stream (hooks not yet handled are lost), the dead \
             letters, the kill switch (disabled policies run again), the sweep requests and the leases",
        )
    } else if policy.starts_with("volatile-") && replicas {
        Some("the keyspace-event leases: two daemons may both handle the same events until the next renewal")
    } else {
        None
    }
}

/// Read `maxmemory` and `maxmemory-policy` (from `INFO memory`, which any
/// user may run) and warn if Redis may evict the daemon's keys. A Redis
/// that cannot be asked is not a reason to stop: nothing is said.
pub async fn warn_if_at_risk(conn: &mut impl ConnectionLike, replicas: bool) {
    let Ok(info) = redis::cmd("INFO").arg("memory").query_async::<String>(conn).await else { return };
    let field = |name: &str| info.lines().find_map(|l| l.trim_end().strip_prefix(name)?.strip_prefix(':'));
    let limited = field("maxmemory").and_then(|v| v.parse::<u64>().ok()).is_some_and(|m| m > 0);
    let policy = field("maxmemory_policy").unwrap_or("noeviction");
    if let Some(risk) = at_risk(policy, replicas).filter(|_| limited) {
        warn!(
            maxmemory_policy = policy,
            "Redis evicts keys when full (maxmemory-policy {policy}), and may evict {risk}; \
             give cachepol's keys a Redis without eviction, or leave room below maxmemory"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_each_policy_may_evict() {
        assert!(at_risk("allkeys-lru", false).is_some_and(|r| r.contains("deploy stream")));
        assert!(at_risk("allkeys-lfu", true).is_some());
        assert!(at_risk("volatile-ttl", true).is_some_and(|r| r.contains("leases")));
        assert_eq!(at_risk("volatile-lru", false), None, "no lease, and the stream has no TTL");
        assert_eq!(at_risk("noeviction", true), None);
    }
}
