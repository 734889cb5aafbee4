//! Keyspace events on a Redis Cluster of 3 primaries: writes `ev:<i>`
//! spread over every primary, each given its TTL by ttl-table (the four
//! bundled policies loaded), as [`crate::events`] measures on one server.
//! Completion is observed from outside: one subscriber per primary counts
//! the `expire` notifications the daemons' writes cause.
//!
//! - cachepol: one daemon on a `redis+cluster://` URL (one subscription
//!   per primary).
//! - two cachepol replicas splitting the shards 2 and 1: what sharing the
//!   work costs (two processes, leases, and the announcement of any write
//!   landing on the other replica's shard, none here: ttl-table writes the
//!   keys it is told about).
//! - baseline: what one would write by hand, the native daemon of
//!   [`crate::native`], once per primary, each subscribed to its node.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::cluster::{by_node, flush};
use crate::events::{Contender, Native, POLICIES, TTL_CONFIG, cpu_secs, observe};
use crate::report::{Row, rate};
use crate::support::cluster::Cluster;
use crate::support::{Daemon, Setup};
use crate::{Sizes, repeat};

/// Write `n` keys `<prefix><i>`, every primary at once, and return the
/// rate at which their `expire` notifications arrived.
fn throughput(cluster: &Cluster, owner: &[u16], prefix: &str, n: u64) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = mpsc::channel();
    let observers: Vec<_> = cluster
        .primaries()
        .iter()
        .map(|node| {
            let (counted, done_tx) = (count.clone(), done_tx.clone());
            observe(cluster.by_port(node.port), "expire", prefix.to_owned(), stop.clone(), move |_, at| {
                if counted.fetch_add(1, Ordering::Relaxed) + 1 == n {
                    let _ = done_tx.send(at);
                }
                true
            })
        })
        .collect();
    let nodes = by_node(owner, (0..n).map(|i| format!("{prefix}{i}")));
    let started = Instant::now();
    std::thread::scope(|s| {
        for (port, slots) in &nodes {
            let mut conn = cluster.by_port(*port).conn();
            s.spawn(move || {
                let names: Vec<&String> = slots.values().flatten().collect();
                for chunk in names.chunks(1000) {
                    let mut pipe = redis::pipe();
                    for name in chunk {
                        pipe.cmd("SET").arg(name.as_str()).arg("v").ignore();
                    }
                    pipe.query::<()>(&mut conn).unwrap();
                }
            });
        }
    });
    let done = done_rx.recv_timeout(Duration::from_secs(120));
    stop.store(true, Ordering::Relaxed);
    for observer in observers {
        let _ = observer.join();
    }
    let done = done.unwrap_or_else(|_| {
        panic!("only {} of {n} `expire` notifications for {prefix}* arrived", count.load(Ordering::Relaxed))
    });
    n as f64 / (done - started).as_secs_f64()
}

/// Bursts of `sizes.events` writes handled by the processes `pids`:
/// events/s (median) and their CPU microseconds per event, all together.
fn bursts(cluster: &Cluster, owner: &[u16], pids: &[u32], sizes: &Sizes, tag: &str) -> (f64, f64) {
    let cpu = || pids.iter().map(|pid| cpu_secs(*pid)).sum::<f64>();
    let before = cpu();
    let mut rep = 0;
    let rate = repeat(sizes.reps, || {
        rep += 1;
        throughput(cluster, owner, &format!("ev:{tag}{rep}:"), sizes.events)
    });
    (rate, (cpu() - before) * 1e6 / (sizes.events * sizes.reps as u64) as f64)
}

/// cachepol daemons on the cluster, with `extra` config.
fn daemons(cluster: &Cluster, count: usize, extra: &str) -> (Vec<Daemon>, Setup) {
    let setup = Setup::new(&POLICIES).config(&format!("{extra}{TTL_CONFIG}"));
    let daemons = (0..count)
        .map(|_| {
            let daemon = Daemon::spawn_url(&cluster.url(), &setup, &[], "info");
            daemon.wait_for("cachepol ready", Duration::from_secs(60));
            daemon
        })
        .collect();
    (daemons, setup)
}

/// Shows the daemons' logs if the measurement fails (a scenario that did
/// not do its work says why).
struct LogsOnFailure<'a>(&'a [Daemon]);

impl Drop for LogsOnFailure<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (i, daemon) in self.0.iter().enumerate() {
                let log = daemon.log_text();
                let lines: Vec<&str> = log.lines().collect();
                eprintln!(
                    "--- daemon {i} log (last lines) ---\n{}",
                    lines[lines.len().saturating_sub(40)..].join("\n")
                );
            }
        }
    }
}

/// How many shards `daemon` said it holds last.
fn held(daemon: &Daemon) -> usize {
    let log = daemon.log_text();
    let last = log.lines().rev().find_map(|l| l.split("holding ").nth(1)?.split(" of ").next()?.parse().ok());
    last.unwrap_or(0)
}

pub fn rows(cluster: &Cluster, owner: &[u16], sizes: &Sizes) -> Vec<Row> {
    let pids = |daemons: &[Daemon]| daemons.iter().map(Daemon::pid).collect::<Vec<_>>();

    let (one, _setup) = daemons(cluster, 1, "");
    let (ours, ours_cpu) = {
        let _logs = LogsOnFailure(&one);
        bursts(cluster, owner, &pids(&one), sizes, "one")
    };
    one.into_iter().for_each(|d| assert_eq!(d.stop(), Some(0)));
    // Emptied between scenarios: a sweep (when a daemon falls behind, or
    // takes a shard) walks every `ev:*` key, and past the keys budget per
    // call (1M by default) it would stop short.
    flush(cluster);

    let (pair, _setup) = daemons(cluster, 2, "[replicas]\nenabled = true\n");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(pair.iter().all(|d| held(d) > 0) && pair.iter().map(held).sum::<usize>() == 3) {
        assert!(Instant::now() < deadline, "the replicas did not split the shards");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (split, split_cpu) = {
        let _logs = LogsOnFailure(&pair);
        bursts(cluster, owner, &pids(&pair), sizes, "pair")
    };
    pair.into_iter().for_each(|d| assert_eq!(d.stop(), Some(0)));
    flush(cluster);

    let natives: Vec<Native> = cluster.primaries().iter().map(|n| Native::start(cluster.by_port(n.port))).collect();
    let native_pids: Vec<u32> = natives.iter().map(|n| n.pid()).collect();
    let (native, native_cpu) = bursts(cluster, owner, &native_pids, sizes, "native");
    drop(natives);

    let scenario = format!("Redis Cluster (3 primaries): ttl-table on `set` events, {} writes", sizes.events);
    vec![
        Row {
            scenario: scenario.clone(),
            cachepol: format!("{}, {ours_cpu:.1} us CPU/event", rate(ours)),
            baseline: format!(
                "hand-written native daemon, one per primary: {}, {native_cpu:.1} us CPU/event",
                rate(native)
            ),
            ratio: format!("{:.2}x", ours / native),
            target: "-".into(),
            met: None,
        },
        Row {
            scenario: format!("{scenario}, two replicas splitting the shards"),
            cachepol: format!("{}, {split_cpu:.1} us CPU/event", rate(split)),
            baseline: format!("one cachepol daemon (same run): {}, {ours_cpu:.1} us CPU/event", rate(ours)),
            ratio: format!("{:.2}x", split / ours),
            target: "-".into(),
            met: None,
        },
    ]
}
