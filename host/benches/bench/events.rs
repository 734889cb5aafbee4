//! Keyspace events end to end: the daemon (release build, the four bundled
//! policies loaded) receiving `set` notifications and ttl-table applying
//! `EXPIRE` for each, against a bare subscriber that only counts the same
//! notifications under the same load.
//!
//! Completion is observed from outside: a separate subscriber counts the
//! `expire` notifications the daemon's writes cause, so "handled" means the
//! TTL is on the key in Redis. The same observer gives the event-to-action
//! latency of a fixed-rate load, and the daemon's resident memory is
//! sampled throughout.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::report::{Row, rate};
use crate::support::{Daemon, RedisServer, Setup, rss_kib};
use crate::{Sizes, median, repeat};

const POLICIES: [&str; 4] = ["ttl-table", "genre-invalidation", "file-cache-clear", "key-naming"];
const TTL_CONFIG: &str = "[policies.ttl-table]\nconfig = { rows = [{ pattern = \"ev:*\", ttl = 3600 }, { pattern = \"lat:*\", ttl = 3600 }] }";

/// Subscribe to `__keyevent@0__:<op>` and pass each key with `prefix` and
/// the time it arrived to `seen`, until it returns false or `stop` is set.
/// Returns once subscribed.
fn observe(
    redis: &RedisServer,
    op: &str,
    prefix: String,
    stop: Arc<AtomicBool>,
    mut seen: impl FnMut(&str, Instant) -> bool + Send + 'static,
) -> JoinHandle<()> {
    let mut conn = redis.conn();
    let channel = format!("__keyevent@0__:{op}");
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        conn.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut pubsub = conn.as_pubsub();
        pubsub.subscribe(&channel).unwrap();
        ready_tx.send(()).unwrap();
        while !stop.load(Ordering::Relaxed) {
            let Ok(msg) = pubsub.get_message() else { continue };
            let key: String = msg.get_payload().unwrap_or_default();
            if key.starts_with(&prefix) && !seen(&key, Instant::now()) {
                return;
            }
        }
    });
    ready_rx.recv().expect("the observer subscribed");
    handle
}

/// Write `n` keys `<prefix><i>` as fast as pipelining allows and return
/// the rate at which `op` notifications for them arrived.
fn throughput(redis: &RedisServer, op: &str, prefix: &str, n: u64) -> f64 {
    let (done_tx, done_rx) = mpsc::channel();
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let counted = count.clone();
    let observer = observe(redis, op, prefix.to_owned(), stop.clone(), move |_, at| {
        if counted.fetch_add(1, Ordering::Relaxed) + 1 == n {
            let _ = done_tx.send(at);
            return false;
        }
        true
    });
    let mut conn = redis.conn();
    let started = Instant::now();
    for batch in (0..n).step_by(1000) {
        let mut pipe = redis::pipe();
        for i in batch..(batch + 1000).min(n) {
            pipe.cmd("SET").arg(format!("{prefix}{i}")).arg("v").ignore();
        }
        pipe.query::<()>(&mut conn).unwrap();
    }
    let done = done_rx.recv_timeout(Duration::from_secs(120));
    stop.store(true, Ordering::Relaxed);
    let _ = observer.join();
    let done = done.unwrap_or_else(|_| {
        panic!("only {} of {n} `{op}` notifications for {prefix}* arrived", count.load(Ordering::Relaxed))
    });
    n as f64 / (done - started).as_secs_f64()
}

/// Sample `pid`'s RSS until `stop`; returns the peak in KiB.
fn sample_rss(pid: u32, stop: Arc<AtomicBool>) -> JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(rss_kib(pid));
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    })
}

/// p50 and p99 in ms of event-to-action latency at `per_sec` writes/s,
/// and how many writes never got their TTL.
fn latency(redis: &RedisServer, per_sec: u64, run: Duration) -> (f64, f64, u64) {
    let n = per_sec * run.as_secs();
    let (arrived_tx, arrived_rx) = mpsc::channel::<(u64, Instant)>();
    let stop = Arc::new(AtomicBool::new(false));
    let observer = observe(redis, "expire", "lat:".into(), stop.clone(), move |key, at| {
        let i = key["lat:".len()..].parse().unwrap_or(u64::MAX);
        arrived_tx.send((i, at)).is_ok()
    });
    let mut conn = redis.conn();
    let mut sent = Vec::with_capacity(n as usize);
    let per_ms = per_sec / 1000;
    let started = Instant::now();
    for tick in 0..n / per_ms {
        let due = started + Duration::from_millis(tick);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let mut pipe = redis::pipe();
        for i in tick * per_ms..(tick + 1) * per_ms {
            pipe.cmd("SET").arg(format!("lat:{i}")).arg("v").ignore();
        }
        let at = Instant::now();
        pipe.query::<()>(&mut conn).unwrap();
        sent.extend(std::iter::repeat_n(at, per_ms as usize));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut latencies = Vec::with_capacity(n as usize);
    while (latencies.len() as u64) < n {
        let Ok((i, at)) = arrived_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else { break };
        if let Some(sent_at) = sent.get(i as usize) {
            latencies.push((at - *sent_at).as_secs_f64() * 1000.0);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = observer.join();
    let missing = n - latencies.len() as u64;
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies.get(((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)).copied();
    (pct(0.5).unwrap_or(f64::NAN), pct(0.99).unwrap_or(f64::NAN), missing)
}

/// The daemon with the four bundled policies, its RSS sampled throughout.
struct Running {
    daemon: Daemon,
    /// The policies directory; the daemon unloads what is deleted.
    _setup: Setup,
    stop: Arc<AtomicBool>,
    sampler: JoinHandle<u64>,
}

impl Running {
    fn start(redis: &RedisServer) -> Running {
        let setup = Setup::new(&POLICIES).config(TTL_CONFIG);
        let daemon = Daemon::spawn_logging(redis, &setup, &["--configure-notifications"], "info");
        daemon.wait_for("cachepol ready", Duration::from_secs(60));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = sample_rss(daemon.pid(), stop.clone());
        Running { daemon, _setup: setup, stop, sampler }
    }

    /// Stop the daemon; its peak RSS in MiB.
    fn stop(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        let peak = self.sampler.join().unwrap() as f64 / 1024.0;
        assert!(!self.daemon.log_text().contains("policy unloaded"), "the policies stayed loaded");
        assert_eq!(self.daemon.stop(), Some(0));
        peak
    }
}

pub fn run(redis: &RedisServer, sizes: &Sizes) -> Vec<Row> {
    redis.cmd::<()>(&["FLUSHALL"]);
    redis.cmd::<()>(&["CONFIG", "SET", "notify-keyspace-events", "E$g"]);
    let mut rep = 0;
    let bare = repeat(sizes.reps, || {
        rep += 1;
        throughput(redis, "set", &format!("base:{rep}:"), sizes.events)
    });

    // Bursts as fast as the writer can go: the daemon's queues overflow and
    // gap sweeps follow, as they would in production.
    let daemon = Running::start(redis);
    let ours = repeat(sizes.reps, || {
        rep += 1;
        throughput(redis, "expire", &format!("ev:{rep}:"), sizes.events)
    });
    let burst_mib = daemon.stop();

    // A steady 10k events/s on a fresh keyspace and daemon, so no sweep left
    // over from the bursts runs in the middle; one warm-up run first.
    redis.cmd::<()>(&["FLUSHALL"]);
    let daemon = Running::start(redis);
    latency(redis, 10_000, Duration::from_secs(1));
    let runs: Vec<(f64, f64, u64)> = (0..sizes.reps).map(|_| latency(redis, 10_000, sizes.latency_run)).collect();
    let steady_mib = daemon.stop();

    let p50 = median(runs.iter().map(|r| r.0).collect());
    let p99 = median(runs.iter().map(|r| r.1).collect());
    let missing: u64 = runs.iter().map(|r| r.2).sum();
    let lost = if missing > 0 { format!(", {missing} without a TTL after 5 s") } else { String::new() };
    let ratio = ours / bare;
    vec![
        Row {
            scenario: format!("keyspace events through ttl-table, bursts of {} writes (EXPIRE applied)", sizes.events),
            cachepol: rate(ours),
            baseline: format!("bare Rust subscriber counting the same events: {}", rate(bare)),
            ratio: format!("{ratio:.2}x"),
            target: ">= 0.8x".into(),
            met: Some(ratio >= 0.8),
        },
        Row {
            scenario: format!("event -> action latency at 10k events/s for {} s", sizes.latency_run.as_secs()),
            cachepol: format!("p50 {p50:.2} ms, p99 {p99:.2} ms{lost}"),
            baseline: "-".into(),
            ratio: "-".into(),
            target: "p99 < 2 ms".into(),
            met: Some(p99 < 2.0 && missing == 0),
        },
        Row {
            scenario: "daemon RSS, 4 policies".into(),
            cachepol: format!("peak {burst_mib:.1} MiB in the bursts, {steady_mib:.1} MiB at 10k events/s"),
            baseline: "-".into(),
            ratio: "-".into(),
            target: "< 64 MiB".into(),
            met: Some(burst_mib < 64.0),
        },
    ]
}
