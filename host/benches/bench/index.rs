//! Invalidation through the key index: the daemon (release build) with
//! genre-invalidation, a deploy hook in, keys gone in Redis out.
//!
//! - 100 keys `service_playlist:dance:*` among `2N` (the other genres'
//!   playlists and as many unrelated keys): from the hook's `XADD` to the
//!   last key gone, with the index and with the index turned off (the
//!   `SCAN` path, which walks every key in Redis).
//! - `N` keys `quiz:*` among `2N`: deletion rate against `redis-cli --pipe`
//!   of 1000-key `UNLINK`s of the known names, measured while the same
//!   daemon is subscribed (so Redis pays for the same notifications).
//! - The index's memory: its own estimate per key (from the daemon's log)
//!   and the daemon's RSS with the index against without.
//!
//! The event-path cost of keeping the index is in [`crate::events`].

use std::time::{Duration, Instant};

use crate::deletion::{dbsize, redis_cli_pipe};
use crate::report::{Row, rate};
use crate::support::{Daemon, RedisServer, Setup};
use crate::{Sizes, median, secs};

const GENRES: u64 = 1000;

/// `MSET` keys `<prefix><i>` for `i` in `range`, 1000 per command.
fn mset(redis: &RedisServer, name: impl Fn(u64) -> String, range: std::ops::Range<u64>) {
    let mut conn = redis.conn();
    let all: Vec<u64> = range.collect();
    for batch in all.chunks(10_000) {
        let mut pipe = redis::pipe();
        for chunk in batch.chunks(1000) {
            let mut cmd = redis::cmd("MSET");
            for i in chunk {
                cmd.arg(name(*i)).arg("v");
            }
            pipe.add_command(cmd).ignore();
        }
        pipe.query::<()>(&mut conn).unwrap();
    }
}

fn dance(i: u64) -> String {
    format!("service_playlist:dance:{i:05}")
}

/// The daemon with genre-invalidation alone, index on or off; waits until
/// it is ready and, with the index, until the index of `pattern` is built.
/// Returns the daemon and the index's log line.
fn start(redis: &RedisServer, config: &str, indexed: bool, pattern: &str) -> (Daemon, Setup, String) {
    let index = if indexed { "" } else { "[index]\nenabled = false\n" };
    let setup = Setup::new(&["genre-invalidation"]).config(&format!(
        "{index}[policies.genre-invalidation]\nbudgets = {{ keys_touched = 0, wall_time = 600000 }}\n{config}"
    ));
    // Debug for the store: each bulk operation says which path it took.
    let daemon = Daemon::spawn_logging(redis, &setup, &["--configure-notifications"], "info,cachepol::store=debug");
    daemon.wait_for("cachepol ready", Duration::from_secs(60));
    let mut line = String::new();
    if indexed {
        let needle = format!("key index complete: bulk operations on this pattern use it pattern={pattern} ");
        daemon.wait_for(&needle, Duration::from_secs(300));
        line = daemon.log_text().lines().find(|l| l.contains(&needle)).unwrap_or_default().to_owned();
    }
    (daemon, setup, line)
}

/// Wait until the daemon is idle (its CPU time still for 300 ms): after a
/// million writes it has their notifications to read, and an operation
/// started meanwhile waits for its fence behind them (or scans, after two
/// seconds), which is not what is measured here.
fn settle(daemon: &Daemon) {
    let started = Instant::now();
    let mut before = crate::events::cpu_secs(daemon.pid());
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = crate::events::cpu_secs(daemon.pid());
        if now - before < 0.02 || started.elapsed() > Duration::from_secs(120) {
            return;
        }
        before = now;
    }
}

/// A `key=value` field of a log line.
fn field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
}

/// Send a deploy hook tagged `genre=<genre>` and wait until `gone` says
/// its keys are gone; seconds from the `XADD`.
fn hook(redis: &RedisServer, daemon: &Daemon, genre: &str, mut gone: impl FnMut() -> bool) -> f64 {
    let started = Instant::now();
    let _: String =
        redis.cmd(&["XADD", "cachepol:deploys", "*", "service", "web", "tags", &format!("{{\"genre\":\"{genre}\"}}")]);
    while !gone() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the hook's keys were not deleted\n--- daemon log ---\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    secs(started)
}

/// Milliseconds from hook to the last of the 100 dance playlists gone, median.
fn few_among_many(redis: &RedisServer, daemon: &Daemon, reps: usize) -> f64 {
    let mut conn = redis.conn();
    let names: Vec<String> = (0..100).map(dance).collect();
    let times = (0..reps)
        .map(|_| {
            mset(redis, dance, 0..100);
            hook(redis, daemon, "dance", || redis::cmd("EXISTS").arg(&names).query::<u64>(&mut conn).unwrap() == 0)
        })
        .collect();
    median(times) * 1000.0
}

pub fn run(redis: &RedisServer, sizes: &Sizes) -> Vec<Row> {
    // Production's flags: with every class on, Redis prints them as `AKE`
    // whatever `n` is, and the daemon confirms `new` by a probe.
    let flags: Vec<String> = redis.cmd(&["CONFIG", "GET", "notify-keyspace-events"]);
    redis.cmd::<()>(&["CONFIG", "SET", "notify-keyspace-events", "KEA"]);
    let rows = run_with(redis, sizes);
    redis.cmd::<()>(&["CONFIG", "SET", "notify-keyspace-events", &flags[1]]);
    rows
}

fn run_with(redis: &RedisServer, sizes: &Sizes) -> Vec<Row> {
    let n = sizes.keys;
    redis.cmd::<()>(&["FLUSHALL"]);
    let per_genre = (n - 100) / (GENRES - 1);
    mset(redis, |i| format!("service_playlist:g{}:{:05}", i / per_genre, i % per_genre), 0..per_genre * (GENRES - 1));
    mset(redis, |i| format!("keep:{i}"), 0..n);
    let total = dbsize(redis) + 100;

    let (daemon, _setup, line) = start(redis, "", true, "service_playlist:*:*");
    let rss_indexed = daemon.rss_kib();
    let (indexed_keys, bytes_per_key, build_ms) =
        (field(&line, "keys"), field(&line, "bytes_per_key"), field(&line, "took_ms"));
    let reps = sizes.reps.max(3);
    let with_index = few_among_many(redis, &daemon, reps);
    assert_eq!(daemon.log_text().matches("bulk operation served by the key index").count(), reps);
    assert_eq!(daemon.stop(), Some(0));
    let (daemon, _setup, _) = start(redis, "", false, "");
    let rss_plain = daemon.rss_kib();
    let with_scan = few_among_many(redis, &daemon, sizes.reps);
    assert!(!daemon.log_text().contains("bulk operation served by the key index"));
    assert_eq!(daemon.stop(), Some(0));
    let rss_per_key = (rss_indexed.saturating_sub(rss_plain) * 1024) as f64 / indexed_keys.max(1) as f64;

    // N of 2N through the index; the pipe baseline refills the same way.
    redis.cmd::<()>(&["FLUSHALL"]);
    mset(redis, |i| format!("keep:{i}"), 0..n);
    let (daemon, _setup, _) = start(redis, "config = { keys = [\"{genre}:*\"] }", true, "*:*");
    let rates: Vec<f64> = (0..sizes.reps)
        .map(|_| {
            mset(redis, |i| format!("quiz:{i}"), 0..n);
            settle(&daemon);
            // Counted once the daemon is idle: its start sweep's trigger
            // ledger writes keys of its own.
            let rest = dbsize(redis) - n;
            let took = hook(redis, &daemon, "quiz", || dbsize(redis) == rest);
            n as f64 / took
        })
        .collect();
    let ours = median(rates);
    let remaining = dbsize(redis);
    let pipe = redis_cli_pipe(redis, sizes, remaining, |redis| {
        mset(redis, |i| format!("quiz:{i}"), 0..n);
        settle(&daemon);
    });
    assert_eq!(daemon.log_text().matches("bulk operation served by the key index").count(), sizes.reps);
    assert_eq!(daemon.stop(), Some(0));

    let mut rows = vec![
        Row {
            scenario: format!("deploy hook -> 100 keys `service_playlist:dance:*` gone, among {total} keys, `KEA`"),
            cachepol: format!("{with_index:.1} ms with the key index"),
            baseline: format!("the same daemon without the index (SCAN): {with_scan:.0} ms"),
            ratio: format!("{:.0}x faster", with_scan / with_index),
            target: "<= 10 ms".into(),
            met: Some(with_index <= 10.0),
        },
        Row {
            scenario: format!("key index of {indexed_keys} keys: memory"),
            cachepol: format!("{bytes_per_key} bytes/key (its estimate); RSS +{rss_per_key:.0} bytes/key"),
            baseline: format!("built by one SCAN pass at start in {build_ms} ms"),
            ratio: "-".into(),
            target: "<= 64 bytes/key".into(),
            met: Some(bytes_per_key <= 64 && rss_per_key <= 64.0),
        },
    ];
    rows.push(Row {
        scenario: format!("deploy hook -> {n} keys `quiz:*` deleted among {} keys, through the key index", 2 * n),
        cachepol: rate(ours),
        baseline: match pipe {
            Some(pipe) => format!("`redis-cli --pipe`, 1000-key UNLINKs of the known names: {}", rate(pipe)),
            None => "`redis-cli` not installed".into(),
        },
        ratio: pipe.map_or("-".into(), |p| format!("{:.2}x", ours / p)),
        target: ">= 0.8x".into(),
        met: pipe.map(|p| ours / p >= 0.8),
    });
    rows
}
