//! Keyspace events end to end: the daemon (release build, the four bundled
//! policies loaded) receiving `set` notifications and ttl-table applying
//! `EXPIRE` for each, against what a user would write instead (the
//! hand-written [`crate::native`] daemon doing the same job), with a bare
//! subscriber that only counts the same notifications for context.
//!
//! Completion is observed from outside: a separate subscriber counts the
//! `expire` notifications the daemon's writes cause, so "handled" means the
//! TTL is on the key in Redis. The same observer gives the event-to-action
//! latency of a fixed-rate load and the lag after a `redis-benchmark`
//! burst; each daemon's CPU time per handled event comes from
//! `/proc/<pid>/stat`, and the daemon's resident memory is sampled
//! throughout.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::report::{Row, rate};
use crate::support::{Daemon, RedisServer, Setup, rss_kib};
use crate::{Sizes, median, repeat};

pub const POLICIES: [&str; 4] = ["ttl-table", "genre-invalidation", "file-cache-clear", "key-naming"];
/// The same rows as [`crate::native`]'s.
pub const TTL_CONFIG: &str = "[policies.ttl-table]\nconfig = { rows = [{ pattern = \"ev:*\", ttl = 3600 }, \
                          { pattern = \"lat:*\", ttl = 3600 }, { pattern = \"job:*\", ttl = 86400 }] }";

/// Subscribe to `__keyevent@0__:<op>` and pass each key with `prefix` and
/// the time it arrived to `seen`, until it returns false or `stop` is set.
/// Returns once subscribed.
pub fn observe(
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
pub fn sample_rss(pid: u32, stop: Arc<AtomicBool>) -> JoinHandle<u64> {
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

/// CPU seconds `pid` has used (user and system), from `/proc/<pid>/stat`.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and
    // stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<u64>().ok()).sum();
    ticks as f64 / clock_ticks_per_sec()
}

fn clock_ticks_per_sec() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output();
    out.ok().and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()).unwrap_or(100.0)
}

/// A daemon doing ttl-table's job.
pub trait Contender {
    fn pid(&self) -> u32;
    /// The log, to tell whether it had to sweep (cachepol only).
    fn log(&self) -> String {
        String::new()
    }
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
    /// With `extra` config before the policies' sections.
    fn start(redis: &RedisServer, extra: &str) -> Running {
        let setup = Setup::new(&POLICIES).config(&format!("{extra}{TTL_CONFIG}"));
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

impl Contender for Running {
    fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    fn log(&self) -> String {
        self.daemon.log_text()
    }
}

/// The hand-written native daemon ([`crate::native`]), killed on drop.
pub struct Native(Child);

impl Native {
    pub fn start(redis: &RedisServer) -> Native {
        let mut child = Command::new(std::env::current_exe().expect("the bench binary"))
            .args([crate::native::FLAG, &redis.url()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the native daemon");
        let mut ready = String::new();
        let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        std::io::BufRead::read_line(&mut stderr, &mut ready).unwrap();
        assert!(ready.contains("ready"), "the native daemon did not start: {ready}");
        Native(child)
    }
}

impl Contender for Native {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Native {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Bursts of `sizes.events` writes through `daemon`: events/s (median) and
/// CPU microseconds per handled event (over all bursts).
fn bursts(redis: &RedisServer, daemon: &dyn Contender, sizes: &Sizes, tag: &str) -> (f64, f64) {
    let cpu = cpu_secs(daemon.pid());
    let mut rep = 0;
    let rate = repeat(sizes.reps, || {
        rep += 1;
        throughput(redis, "expire", &format!("ev:{tag}{rep}:"), sizes.events)
    });
    let used = cpu_secs(daemon.pid()) - cpu;
    (rate, used * 1e6 / (sizes.events * sizes.reps as u64) as f64)
}

/// `redis-benchmark -P 16` writes `n` random `job:` keys as fast as it
/// can; returns how long after it finished the last TTL was applied (from
/// the `expire` notifications) and whether the daemon fell behind (and
/// swept); fails if a key was left without a TTL.
fn benchmark_burst(redis: &RedisServer, daemon: &dyn Contender, n: u64) -> (Duration, bool) {
    redis.cmd::<()>(&["FLUSHALL"]);
    let log_before = daemon.log().len();
    let last = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let seen = last.clone();
    let observer = observe(redis, "expire", "job:".into(), stop.clone(), move |_, at| {
        seen.store((at - t0).as_micros() as u64, Ordering::Relaxed);
        true
    });
    let status = Command::new("redis-benchmark")
        .args(["-p", &redis.port.to_string(), "-n", &n.to_string(), "-P", "16", "-r", "1000000000", "-q"])
        .args(["SET", "job:__rand_int__", "v"])
        .stdout(Stdio::null())
        .status()
        .expect("redis-benchmark (installed with redis-server)");
    assert!(status.success(), "redis-benchmark failed");
    let ended = t0.elapsed();
    // Done once no TTL has been applied for a second.
    let mut quiet_since = Instant::now();
    let mut seen_at = last.load(Ordering::Relaxed);
    while quiet_since.elapsed() < Duration::from_secs(1) && t0.elapsed() < ended + Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
        let now = last.load(Ordering::Relaxed);
        if now != seen_at {
            seen_at = now;
            quiet_since = Instant::now();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = observer.join();
    let persistent = persistent_keys(redis, "job:*");
    assert_eq!(persistent, 0, "keys left without a TTL after the burst");
    let swept = daemon.log().get(log_before..).is_some_and(|log| log.contains("fell behind"));
    (Duration::from_micros(seen_at).saturating_sub(ended), swept)
}

/// Keys matching `pattern` without a TTL.
fn persistent_keys(redis: &RedisServer, pattern: &str) -> usize {
    let mut conn = redis.conn();
    let mut cursor = 0u64;
    let mut persistent = 0;
    loop {
        let (next, keys): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000).query(&mut conn).unwrap();
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("PTTL").arg(key);
        }
        let ttls: Vec<i64> = pipe.query(&mut conn).unwrap();
        persistent += ttls.iter().filter(|t| **t == -1).count();
        if next == 0 {
            return persistent;
        }
        cursor = next;
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

    let native = Native::start(redis);
    let (native_rate, native_cpu) = bursts(redis, &native, sizes, "native");
    let (native_lag, _) = benchmark_burst(redis, &native, sizes.burst);
    drop(native);

    // Bursts as fast as the writer can go: if the daemon's queues overflow,
    // gap sweeps follow, as they would in production.
    redis.cmd::<()>(&["FLUSHALL"]);
    let daemon = Running::start(redis, "");
    let (ours, our_cpu) = bursts(redis, &daemon, sizes, "cachepol");
    let (our_lag, swept) = benchmark_burst(redis, &daemon, sizes.burst);
    let burst_mib = daemon.stop();
    // Every key the bursts wrote is under a ttl-table row: indexed.
    let indexed = sizes.events * sizes.reps as u64 + sizes.burst;

    // The same bursts without the key index (which the bundled policies'
    // grants turn on): what keeping it costs the event path.
    redis.cmd::<()>(&["FLUSHALL"]);
    let daemon = Running::start(redis, "[index]\nenabled = false\n");
    let (plain, plain_cpu) = bursts(redis, &daemon, sizes, "plain");
    daemon.stop();

    // A steady 10k events/s on a fresh keyspace and daemon, so no sweep left
    // over from the bursts runs in the middle; one warm-up run first.
    redis.cmd::<()>(&["FLUSHALL"]);
    let daemon = Running::start(redis, "");
    latency(redis, 10_000, Duration::from_secs(1));
    let runs: Vec<(f64, f64, u64)> = (0..sizes.reps).map(|_| latency(redis, 10_000, sizes.latency_run)).collect();
    let steady_mib = daemon.stop();

    let p50 = median(runs.iter().map(|r| r.0).collect());
    let p99 = median(runs.iter().map(|r| r.1).collect());
    let missing: u64 = runs.iter().map(|r| r.2).sum();
    let lost = if missing > 0 { format!(", {missing} without a TTL after 5 s") } else { String::new() };
    let ratio = ours / native_rate;
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    vec![
        Row {
            scenario: format!("keyspace events through ttl-table, bursts of {} writes (EXPIRE applied)", sizes.events),
            cachepol: rate(ours),
            baseline: format!(
                "hand-written native daemon (RESP3, pipelined EXPIRE NX): {}; bare subscriber only counting: {}",
                rate(native_rate),
                rate(bare)
            ),
            ratio: format!("{ratio:.2}x"),
            target: ">= 0.8x".into(),
            met: Some(ratio >= 0.8),
        },
        Row {
            scenario: "the same bursts: what keeping the key index costs the event path".into(),
            cachepol: format!("{} and {our_cpu:.1} us/event with the index", rate(ours)),
            baseline: format!("index off: {} and {plain_cpu:.1} us/event", rate(plain)),
            ratio: format!("{:.2}x the rate", ours / plain),
            target: "-".into(),
            met: None,
        },
        Row {
            scenario: "daemon CPU per handled event, in those bursts".into(),
            cachepol: format!("{our_cpu:.1} us"),
            baseline: format!("native daemon: {native_cpu:.1} us"),
            ratio: format!("{:.1}x the CPU", our_cpu / native_cpu),
            target: "<= 5 us".into(),
            met: Some(our_cpu <= 5.0),
        },
        Row {
            scenario: format!(
                "`redis-benchmark -P 16` burst of {} random job:* writes: last TTL applied after the burst ended",
                sizes.burst
            ),
            cachepol: format!("{}{}", ms(our_lag), if swept { ", fell behind: gap sweep" } else { "" }),
            baseline: format!("native daemon: {}", ms(native_lag)),
            ratio: "-".into(),
            target: "< 1 s, no gap sweep".into(),
            met: Some(our_lag < Duration::from_secs(1) && !swept),
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
            scenario: format!(
                "daemon RSS, 4 policies (the key index holding the {indexed} keys the bursts wrote, ttl-table's)"
            ),
            cachepol: format!("peak {burst_mib:.1} MiB in the bursts, {steady_mib:.1} MiB at 10k events/s"),
            baseline: "-".into(),
            ratio: "-".into(),
            target: "< 64 MiB + 64 bytes per indexed key".into(),
            met: Some(burst_mib < 64.0 + (indexed * 64) as f64 / (1024.0 * 1024.0)),
        },
    ]
}
