//! The production-shaped tier: a server started with the canonical `KEA`
//! flags, `maxmemory` with `allkeys-lru`, and a keyspace in the millions
//! written while no daemon ran (`DEBUG POPULATE`, which sends no
//! notifications), on Redis 7 and Valkey 9 (`cargo xtask test` runs this
//! module on both). What a lab-sized keyspace never shows: sweeps and hooks
//! that reach more keys than one call's budgets allow finish, in slices,
//! and go on where they stopped after a daemon restart.

use std::time::{Duration, Instant};

use crate::support::{Daemon, RedisServer, Setup, dead_letters, deploy, pending};

/// A production cache's shape, as far as one machine allows.
const PRODUCTION: &[&str] = &[
    "--enable-debug-command",
    "yes",
    "--notify-keyspace-events",
    "KEA",
    "--maxmemory",
    "4gb",
    "--maxmemory-policy",
    "allkeys-lru",
];

/// Keys written before any daemon: three times one call's keys budget.
const MILLIONS: u64 = 3_000_000;

/// `n` keys `<prefix>:<i>` without a TTL, written with no notification.
fn populate(redis: &RedisServer, n: u64, prefix: &str) {
    redis.cmd::<()>(&["DEBUG", "POPULATE", &n.to_string(), prefix, "8"]);
}

/// Poll `check` for up to five minutes (a debug build walking millions of
/// keys); fail with `what` and the daemon's log.
fn within_minutes(daemon: &Daemon, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}\n--- daemon log ---\n{}", tail(daemon));
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn tail(daemon: &Daemon) -> String {
    let log = daemon.log_text();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

#[test]
fn a_cache_of_millions_written_while_no_daemon_ran_gets_every_ttl() {
    let redis = RedisServer::start_with(PRODUCTION);
    populate(&redis, MILLIONS, "job");
    assert_eq!(redis.keyspace(), (MILLIONS, 0));
    // Kept until the end: the daemon watches the directory it holds. Two
    // daemons with the same default config, as a Deployment of two runs
    // them: one holds the lease and sweeps, the other stands by.
    let setup = Setup::new(&["ttl-table"]);
    let daemon = Daemon::start(&redis, &setup);
    let other = Daemon::start(&redis, &setup);
    within_minutes(&daemon, "every job:* key with its TTL", || redis.keyspace().1 >= MILLIONS);
    // The walk took several slices, and said so once it was done.
    let sweepers = || [&daemon, &other].into_iter().filter(|d| d.log_text().contains("walked to the end")).count();
    within_minutes(&daemon, "the sweep's final line", || sweepers() > 0);
    assert_eq!(sweepers(), 1, "one daemon swept:\n{}\n---\n{}", tail(&daemon), tail(&other));
    for d in [&daemon, &other] {
        assert!(!d.log_text().contains("budget exceeded"), "a slice is not a budget failure:\n{}", tail(d));
    }
    let kept: u64 = redis.cmd(&["EXISTS", "cachepol:walks:ttl-table/sweep"]);
    assert_eq!(kept, 0, "a finished walk leaves no position behind");
    let ttl: i64 = redis.cmd(&["TTL", "job:2999999"]);
    assert!(ttl > 86_000, "the table's 24 h TTL: {ttl}");
    assert_eq!(other.stop(), Some(0));
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_sweep_killed_halfway_goes_on_where_it_stopped_after_a_restart() {
    let redis = RedisServer::start_with(PRODUCTION);
    populate(&redis, MILLIONS, "job");
    let setup = Setup::new(&["ttl-table"]);
    let first = Daemon::start(&redis, &setup);
    within_minutes(&first, "a third of the keys with a TTL", || redis.keyspace().1 >= MILLIONS / 3);
    first.kill();
    let (_, expires) = redis.keyspace();
    assert!(expires < MILLIONS, "the sweep finished before the kill; the test proves nothing");
    let kept: Option<String> = redis.cmd(&["GET", "cachepol:walks:ttl-table/sweep"]);
    let kept = kept.expect("where the sweep stopped is kept in Redis");
    assert!(kept.contains("\"cursor\""), "{kept}");

    let second = Daemon::start(&redis, &setup);
    within_minutes(&second, "every job:* key with its TTL after the restart", || redis.keyspace().1 >= MILLIONS);
    // The second daemon went on from the kept position: its first slice
    // is numbered after the first daemon's.
    within_minutes(&second, "the sweep's final line", || second.log_text().contains("walked to the end"));
    let log = second.log_text();
    let resumed = log
        .lines()
        .filter(|l| l.contains("walking in slices"))
        .find_map(|l| l.split("slices=").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse::<u32>().ok());
    assert!(resumed.is_some_and(|n| n > 1), "the walk went on from its kept position:\n{}", tail(&second));
    assert_eq!(second.stop(), Some(0));
}

#[test]
fn a_hook_deleting_millions_of_keys_finishes_and_leaves_the_rest() {
    let redis = RedisServer::start_with(PRODUCTION);
    populate(&redis, MILLIONS, "quiz");
    populate(&redis, 1_000, "keep");
    let setup = Setup::new(&["file-cache-clear"]);
    let daemon = Daemon::start(&redis, &setup);
    let other = Daemon::start(&redis, &setup);
    deploy(&redis, &["--service", "quiz", "--file", "quiz_generator.py"]);
    // (The consumer group exists once the hook is being handled.)
    within_minutes(&daemon, "the hook handled and acknowledged", || {
        redis.keyspace().0 < 10_000 && pending(&redis) == 0
    });
    assert!(dead_letters(&redis).is_empty(), "size alone never dead-letters a hook");
    assert!(redis.keys("quiz:*").is_empty(), "every matching key deleted");
    assert_eq!(redis.keys("keep:*").len(), 1_000, "nothing else touched");
    let handled = [&daemon, &other].into_iter().filter(|d| d.log_text().contains("walked to the end")).count();
    assert_eq!(handled, 1, "handled once, in several slices:\n{}\n---\n{}", tail(&daemon), tail(&other));
    assert_eq!(other.stop(), Some(0));
    assert_eq!(daemon.stop(), Some(0));
}
