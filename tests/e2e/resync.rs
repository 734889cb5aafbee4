//! Notifications are fire-and-forget: the daemon reconciles after a Redis
//! restart and after its queues overflow, and its memory stays bounded.

use std::time::Duration;

use crate::support::{Daemon, RedisServer, Setup, eventually};

fn count(redis: &RedisServer, key: &str) -> u64 {
    redis.cmd::<Option<String>>(&["GET", key]).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// TTL-table-like recorder: keys `rec:*` get a 1 h TTL on each event and on
/// each sweep.
fn ttl_recorder() -> Setup {
    Setup::new(&["recorder"]).config("[policies.recorder]\nconfig = { ttl_ms = 3600000 }")
}

#[test]
fn after_redis_restarts_the_daemon_reconnects_and_sweeps() {
    let mut redis = RedisServer::start();
    let setup = ttl_recorder();
    let daemon = Daemon::start(&redis, &setup);
    eventually(&daemon, "the start sweep", || count(&redis, "recorder:recorder:sweep:start") == 1);

    redis.restart();
    // Written right after the restart, possibly before the daemon is back:
    // their notifications may be lost; the reconnect sweep must fix them.
    let mut conn = redis.conn();
    for i in 0..50 {
        redis::cmd("SET").arg(format!("rec:{i}")).arg("v").query::<()>(&mut conn).unwrap();
    }
    eventually(&daemon, "sweep(reconnect)", || count(&redis, "recorder:recorder:sweep:reconnect") >= 1);
    eventually(&daemon, "every key written across the restart has its TTL", || {
        (0..50).all(|i| redis.cmd::<i64>(&["TTL", &format!("rec:{i}")]) > 0)
    });
    daemon.wait_for("keyspace subscription restored", Duration::from_secs(20));
    let log = daemon.log_text();
    assert!(log.contains("keyspace subscription lost"), "{log}");
    assert_eq!(
        log.matches("keyspace subscription unavailable").count(),
        log.matches("keyspace subscription restored").count(),
        "retries are logged once per outage, not once per attempt"
    );
    // The flags were re-enabled on the fresh server.
    let flags: Vec<String> = redis.cmd(&["CONFIG", "GET", "notify-keyspace-events"]);
    assert!(flags[1].contains('E'), "{flags:?}");
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn overflow_records_a_gap_memory_stays_bounded_and_the_sweep_reconciles() {
    let redis = RedisServer::start();
    // A slow policy (busy work on every event) behind a small queue.
    let setup = Setup::new(&["recorder"])
        .config("queue_capacity = 50")
        .config("[policies.recorder]\nconfig = { ttl_ms = 3600000, work = 3000000 }");
    let daemon = Daemon::start(&redis, &setup);
    let before = daemon.rss_kib();

    let mut conn = redis.conn();
    for batch in 0..20 {
        let mut pipe = redis::pipe();
        for i in 0..1000 {
            pipe.cmd("SET").arg(format!("rec:{batch}:{i}")).arg("v").ignore();
        }
        pipe.query::<()>(&mut conn).unwrap();
    }
    let peak = daemon.rss_kib();
    eventually(&daemon, "sweep(gap)", || count(&redis, "recorder:recorder:sweep:gap") >= 1);
    eventually(&daemon, "every key has its TTL after the gap sweep", || {
        let keys: Vec<String> = redis.keys("rec:*");
        keys.len() == 20_000 && keys.iter().all(|k| redis.cmd::<i64>(&["TTL", k]) > 0)
    });
    let events = redis.recorded_events("recorder");
    assert!(events < 20_000, "events were dropped ({events} handled), not buffered without bound");
    assert!(
        peak < before + 64 * 1024,
        "RSS grew from {before} KiB to {peak} KiB while 20k events arrived for a slow policy"
    );
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn redis_down_at_start_is_waited_for() {
    let mut redis = RedisServer::start();
    redis.stop();
    let setup = ttl_recorder();
    let daemon = Daemon::spawn(&redis, &setup, &["--configure-notifications"]);
    daemon.wait_for("cannot connect to Redis; retrying", Duration::from_secs(20));
    redis.restart();
    daemon.wait_for("cachepol ready", Duration::from_secs(30));
    redis.cmd::<()>(&["SET", "rec:late", "v"]);
    eventually(&daemon, "the key gets its TTL", || redis.cmd::<i64>(&["TTL", "rec:late"]) > 0);
    assert_eq!(daemon.stop(), Some(0));
}
