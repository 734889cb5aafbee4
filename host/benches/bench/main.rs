//! cachepol's benchmark: every figure next to a baseline measured in the same
//! run, on the same private `redis-server`, so that the ratios hold on any
//! machine even where the absolute numbers do not.
//!
//! `cargo xtask bench` (full) or `cargo xtask bench --quick` (CI-sized: it
//! keeps the harness from rotting and asserts nothing about speed). It
//! asserts correctness only: a scenario that did not do its work fails the
//! run instead of reporting a meaningless rate.
//!
//! Module map:
//! - [`deletion`]: `delete-matching` against a naive SCAN+DEL loop and
//!   `redis-cli --pipe`.
//! - [`cluster`]: the same on a Redis Cluster of 3 primaries, and
//!   [`cluster_events`]: keyspace events through ttl-table there, one
//!   daemon and two replicas against a native daemon per primary.
//! - [`events`]: keyspace events through ttl-table against a hand-written
//!   [`native`] daemon and a bare subscriber; CPU per event; lag after a
//!   `redis-benchmark` burst; event-to-action latency at a fixed rate;
//!   daemon memory.
//! - [`index`]: invalidation through the key index (100 keys among 2M, 1M
//!   of 2M) against the `SCAN` path and `redis-cli --pipe`; its memory.
//! - [`overhead`]: one WIT `handle` against the same logic compiled natively.
//! - [`sweep`]: a start sweep of millions of keys (a tenth without a TTL)
//!   in slices, against one bare `SCAN` pass; the daemon's peak RSS.
//! - [`swap`]: hot swap, from rename to the new version handling events.
//! - [`report`]: the table.

#[path = "../../../tests/e2e/support/mod.rs"]
mod support;

mod cluster;
mod cluster_events;
mod deletion;
mod events;
mod index;
mod native;
mod overhead;
mod report;
mod swap;
mod sweep;

use std::time::{Duration, Instant};

use report::Row;
use support::RedisServer;

/// How big a run is.
pub struct Sizes {
    pub quick: bool,
    /// Keys matching the pattern to delete; as many others stay.
    pub keys: u64,
    /// The naive loop is slow: it runs this long and its rate is measured.
    pub naive_cap: Duration,
    /// Repetitions of each measurement (the median is reported).
    pub reps: usize,
    /// Events written for the throughput scenario.
    pub events: u64,
    /// Writes in the `redis-benchmark` burst.
    pub burst: u64,
    /// How long the fixed-rate latency run lasts.
    pub latency_run: Duration,
    /// Policy calls for the overhead scenario.
    pub calls: u64,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                quick,
                keys: 50_000,
                naive_cap: Duration::from_secs(2),
                reps: 1,
                events: 20_000,
                burst: 50_000,
                latency_run: Duration::from_secs(2),
                calls: 20_000,
            }
        } else {
            Sizes {
                quick,
                keys: 1_000_000,
                naive_cap: Duration::from_secs(15),
                reps: 3,
                events: 200_000,
                burst: 200_000,
                latency_run: Duration::from_secs(10),
                calls: 200_000,
            }
        }
    }
}

/// The median of some measurements.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Run `f` `reps` times and return the median of what it returns.
pub fn repeat(reps: usize, mut f: impl FnMut() -> f64) -> f64 {
    median((0..reps).map(|_| f()).collect())
}

/// Seconds since `t`.
pub fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

fn main() {
    // `cargo bench` passes `--bench`; ours are `--quick` and `--only NAME`
    // (deletion, cluster, index, overhead, events, sweep, swap), for profiling one scenario.
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == native::FLAG) {
        native::main(args.get(i + 1).expect("a Redis URL after the flag"));
    }
    let quick = args.iter().any(|a| a == "--quick");
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let sizes = Sizes::new(quick);
    let redis = RedisServer::start();
    let tokio = tokio::runtime::Runtime::new().expect("tokio runtime");
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    if wanted("deletion") {
        eprintln!("bench: deletion");
        rows.extend(deletion::run(&redis, &sizes, &tokio));
    }
    if wanted("cluster") {
        eprintln!("bench: deletion and keyspace events on a Redis Cluster");
        rows.extend(cluster::run(&sizes, &tokio));
    }
    if wanted("index") {
        eprintln!("bench: invalidation through the key index");
        rows.extend(index::run(&redis, &sizes));
    }
    if wanted("overhead") {
        eprintln!("bench: policy call overhead");
        rows.extend(overhead::run(&redis, &sizes, &tokio));
    }
    if wanted("events") {
        eprintln!("bench: keyspace events, latency and memory");
        rows.extend(events::run(&redis, &sizes));
    }
    if wanted("sweep") {
        eprintln!("bench: a start sweep of a production-sized keyspace");
        rows.extend(sweep::run(&sizes));
    }
    if wanted("swap") {
        eprintln!("bench: hot swap");
        rows.extend(swap::run(&redis, &sizes));
    }
    print!("{}", report::render(&redis, &sizes, &rows, started.elapsed()));
}
