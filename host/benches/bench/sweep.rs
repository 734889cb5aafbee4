//! A start sweep over a production-sized keyspace: millions of keys, a
//! tenth of them written without a TTL while no daemon ran, the server
//! with `KEA` on. ttl-table's sweep walks them in slices
//! ([`cachepol::store::walks`]); the baseline is the floor any walk has to
//! pay, a bare `SCAN MATCH * COUNT 1000` pass over the same keyspace,
//! measured in the same run. Also: the daemon's peak RSS meanwhile, beside
//! the number of keys its key index holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::Sizes;
use crate::report::{Row, rate};
use crate::support::{Daemon, RedisServer, Setup, http, metric};

/// Overrides the sweep's key count (a tenth of them without a TTL), for
/// quicker iterations on it than the full 10M.
const KEYS_ENV: &str = "CACHEPOL_BENCH_SWEEP_KEYS";

/// The sweep's size: all keys, and those without a TTL among them.
fn size(sizes: &Sizes) -> (u64, u64) {
    if let Some(total) = std::env::var(KEYS_ENV).ok().and_then(|n| n.parse::<u64>().ok()) {
        return (total, total / 10);
    }
    if sizes.quick { (200_000, 20_000) } else { (10_000_000, 1_000_000) }
}

/// `total` keys `job:<i>`, all but the first `persistent` with a TTL, written
/// without notifications (`DEBUG POPULATE`, then a script giving TTLs).
fn fill(redis: &RedisServer, total: u64, persistent: u64) {
    redis.cmd::<()>(&["FLUSHALL"]);
    redis.cmd::<()>(&["DEBUG", "POPULATE", &total.to_string(), "job", "8"]);
    const EXPIRE: &str =
        "for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do redis.call('PEXPIRE', 'job:' .. i, 604800000) end";
    let mut from = persistent;
    while from < total {
        let to = (from + 500_000).min(total) - 1;
        redis.cmd::<()>(&["EVAL", EXPIRE, "0", &from.to_string(), &to.to_string()]);
        from = to + 1;
    }
    assert_eq!(redis.keyspace(), (total, total - persistent), "the keyspace the sweep starts from");
}

/// Seconds of a bare `SCAN ... COUNT 1000` pass over the keyspace: the
/// faster of two, so that a pass slowed by the machine's other load does
/// not flatter the sweep's ratio.
fn scan_floor(redis: &RedisServer) -> f64 {
    scan_pass(redis).min(scan_pass(redis))
}

/// Seconds of one bare `SCAN ... COUNT 1000` pass.
fn scan_pass(redis: &RedisServer) -> f64 {
    let mut conn = redis.conn();
    let started = Instant::now();
    let (mut cursor, mut seen) = (0u64, 0usize);
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg("*").arg("COUNT").arg(1000).query(&mut conn).unwrap();
        seen += keys.len();
        if next == 0 {
            break;
        }
        cursor = next;
    }
    assert!(seen > 0);
    crate::secs(started)
}

/// Seconds of the daemon's start sweep (from its log's timestamps: the
/// first slice's start to its final line), its peak RSS (MiB) and the keys
/// its index held.
fn start_sweep(redis: &RedisServer, total: u64) -> (f64, f64, f64) {
    let setup = Setup::new(&["ttl-table"]);
    let daemon = Daemon::spawn_logging(redis, &setup, &["--configure-notifications"], "info");
    daemon.wait_for("cachepol ready", Duration::from_secs(60));
    let stop = Arc::new(AtomicBool::new(false));
    let peak = crate::events::sample_rss(daemon.pid(), stop.clone());
    let deadline = Instant::now() + Duration::from_secs(600);
    // Done when every key has its TTL and the sweep's last line is out: the
    // final line of a sweep of several slices, or its one audit line.
    let done = |log: &str| match log.contains("walking in slices") {
        true => log.contains("walked to the end"),
        false => log.contains("event=\"sweep-1\""),
    };
    while redis.keyspace().1 < total || !done(&daemon.log_text()) {
        assert!(Instant::now() < deadline, "the start sweep did not finish:\n{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let peak = peak.join().unwrap() as f64 / 1024.0;
    let (_, metrics) = http(&daemon.admin(), "GET", "/metrics", &[], b"");
    let indexed = metric(&metrics, "cachepol_index_keys");
    let log = daemon.log_text();
    let at = |needle: &str| log.lines().find(|l| l.contains(needle)).and_then(seconds_of_day);
    let (Some(ready), Some(last)) = (at("cachepol ready"), at("walked to the end").or_else(|| at("event=\"sweep-1\"")))
    else {
        panic!("no sweep lines in the log:\n{log}")
    };
    assert_eq!(daemon.stop(), Some(0));
    ((last - ready).rem_euclid(86_400.0), peak, indexed)
}

/// The time of day of a log line's timestamp (`2026-12-07T22:54:19.515Z`).
fn seconds_of_day(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let (h, m, s): (f64, f64, f64) =
        (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    Some(h * 3600.0 + m * 60.0 + s)
}

pub fn run(sizes: &Sizes) -> Vec<Row> {
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes", "--notify-keyspace-events", "KEA"]);
    let (total, persistent) = size(sizes);
    fill(&redis, total, persistent);
    let floor = scan_floor(&redis);
    let (ours, peak, indexed) = start_sweep(&redis, total);
    let scenario = format!("start sweep (ttl-table) of {total} keys, {persistent} without a TTL, `KEA`");
    vec![
        Row {
            scenario: scenario.clone(),
            cachepol: format!("{ours:.2} s ({})", rate(total as f64 / ours)),
            baseline: format!(
                "a bare `SCAN COUNT 1000` pass (faster of two): {floor:.2} s ({})",
                rate(total as f64 / floor)
            ),
            ratio: format!("{:.2}x", floor / ours),
            target: ">= 0.7x".into(),
            met: Some(floor / ours >= 0.7),
        },
        Row {
            scenario,
            cachepol: format!("peak RSS {peak:.1} MiB, {indexed} keys in the index"),
            baseline: "-".into(),
            ratio: format!("{peak:.1} MiB"),
            target: "< 64 MiB + index".into(),
            met: None,
        },
    ]
}
