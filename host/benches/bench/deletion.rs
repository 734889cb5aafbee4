//! Pattern invalidation: delete `quiz:*` (N keys) among 2N.
//!
//! - cachepol: a real policy call (genre-invalidation configured to clear
//!   `{genre}:*`, handling a deploy hook tagged `genre=quiz`) over the
//!   daemon's Redis backend: host-side `SCAN` pages, each deleted with one
//!   multi-key `UNLINK` in the same round trip as the next page's `SCAN`,
//!   every key re-checked against the grants.
//! - naive: the loop teams write, `for k in scan_iter("quiz:*"): delete(k)`,
//!   one round trip per key, in Rust on a plain connection. It is slow, so
//!   it runs for a fixed time over the same keyspace and its rate is taken.
//! - `redis-cli --pipe` of `UNLINK` commands of 1000 known key names each:
//!   the ceiling (no `SCAN` at all).

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use cachepol::sandbox::budget::Budgets;
use cachepol::sandbox::runtime::{LoadOptions, Runtime, RuntimeConfig};
use cachepol::store::backend::Backend;
use cachepol::store::redis::RedisBackend;
use cachepol::store::target::RedisTarget;
use cachepol::wit::{self, DeployEvent};

use crate::report::{Row, rate};
use crate::support::{RedisServer, wasm};
use crate::{Sizes, repeat, secs};

/// `FLUSHALL`, then `n` keys `quiz:<i>` and `n` keys `keep:<i>`.
/// (The server is the benchmark's own private one.)
fn fill(redis: &RedisServer, n: u64) {
    let mut conn = redis.conn();
    redis::cmd("FLUSHALL").query::<()>(&mut conn).unwrap();
    for prefix in ["quiz", "keep"] {
        for start in (0..n).step_by(10_000) {
            let mut pipe = redis::pipe();
            for chunk in (start..(start + 10_000).min(n)).collect::<Vec<_>>().chunks(1000) {
                let mut mset = redis::cmd("MSET");
                for i in chunk {
                    mset.arg(format!("{prefix}:{i}")).arg("v");
                }
                pipe.add_command(mset).ignore();
            }
            pipe.query::<()>(&mut conn).unwrap();
        }
    }
}

pub fn dbsize(redis: &RedisServer) -> u64 {
    redis.cmd(&["DBSIZE"])
}

fn naive(redis: &RedisServer, sizes: &Sizes) -> f64 {
    fill(redis, sizes.keys);
    let mut conn = redis.conn();
    let started = Instant::now();
    let mut cursor: u64 = 0;
    let mut deleted = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg("quiz:*").arg("COUNT").arg(1000).query(&mut conn).unwrap();
        for key in keys {
            deleted += redis::cmd("DEL").arg(&key).query::<u64>(&mut conn).unwrap();
        }
        cursor = next;
        if cursor == 0 || started.elapsed() > sizes.naive_cap {
            break;
        }
    }
    deleted as f64 / secs(started)
}

fn cachepol(redis: &RedisServer, sizes: &Sizes, tokio: &tokio::runtime::Runtime) -> f64 {
    let target = RedisTarget::Single(redis.client());
    policy_rate(&target, sizes.reps, sizes.keys, tokio, || fill(redis, sizes.keys), || dbsize(redis))
}

/// genre-invalidation deleting `quiz:*` (`n` keys, as many others) through
/// the daemon's backend on `target`, in keys per second: `refill` writes
/// the keys before each of `reps` runs, `dbsize` counts what is left after.
pub fn policy_rate(
    target: &RedisTarget,
    reps: usize,
    n: u64,
    tokio: &tokio::runtime::Runtime,
    mut refill: impl FnMut(),
    dbsize: impl Fn() -> u64,
) -> f64 {
    let runtime = Runtime::new(RuntimeConfig::default()).unwrap();
    let compiled = runtime.compile_file(&wasm("genre-invalidation")).unwrap();
    let options = LoadOptions {
        label: "bench".into(),
        config: r#"{"keys": ["{genre}:*"]}"#.into(),
        budgets: Budgets { keys_touched: 0, wall_time: std::time::Duration::from_secs(600), ..Budgets::default() },
        grants: None,
    };
    let backend: Arc<dyn Backend> = Arc::new(tokio.block_on(RedisBackend::connect(target)).unwrap());
    let mut policy = tokio.block_on(runtime.load(&compiled, backend, &options)).unwrap();
    repeat(reps, || {
        refill();
        let event = wit::Event::Deploy(DeployEvent {
            id: "bench".into(),
            service: "quiz".into(),
            files: vec![],
            tags: vec![("genre".into(), "quiz".into())],
        });
        let started = Instant::now();
        let report = tokio.block_on(policy.handle("bench", &event));
        let took = secs(started);
        assert!(report.result.is_ok(), "the policy call failed: {:?}", report.result);
        assert_eq!(report.call.effects.deleted, n, "every quiz:* key deleted");
        assert_eq!(dbsize(), n, "no other key touched");
        n as f64 / took
    })
}

/// `UNLINK`s of `quiz:0..N` through `redis-cli --pipe`, after `refill` puts
/// them back each time (`N` other keys stay); `None` if `redis-cli` is not
/// installed.
pub fn redis_cli_pipe(
    redis: &RedisServer,
    sizes: &Sizes,
    remaining: u64,
    mut refill: impl FnMut(&RedisServer),
) -> Option<f64> {
    Command::new("redis-cli").arg("--version").output().ok()?;
    let mut resp = Vec::new();
    for start in (0..sizes.keys).step_by(1000) {
        let end = (start + 1000).min(sizes.keys);
        write!(resp, "*{}\r\n$6\r\nUNLINK\r\n", end - start + 1).unwrap();
        for i in start..end {
            let key = format!("quiz:{i}");
            write!(resp, "${}\r\n{key}\r\n", key.len()).unwrap();
        }
    }
    Some(repeat(sizes.reps, || {
        refill(redis);
        let started = Instant::now();
        let mut child = Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "--pipe"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&resp).unwrap();
        assert!(child.wait().unwrap().success());
        let took = secs(started);
        assert_eq!(dbsize(redis), remaining, "redis-cli deleted every quiz:* key");
        sizes.keys as f64 / took
    }))
}

/// The row of cachepol's rate `ours` against a naive loop (`how`, in
/// Rust) measured at `naive`, and the ">= 50x" target.
pub fn against_naive(scenario: &str, ours: f64, how: &str, naive: f64) -> Row {
    Row {
        scenario: scenario.to_owned(),
        cachepol: rate(ours),
        baseline: format!("{how} (Rust): {}", rate(naive)),
        ratio: format!("{:.0}x", ours / naive),
        target: ">= 50x".into(),
        met: Some(ours / naive >= 50.0),
    }
}

pub fn run(redis: &RedisServer, sizes: &Sizes, tokio: &tokio::runtime::Runtime) -> Vec<Row> {
    let naive = naive(redis, sizes);
    let ours = cachepol(redis, sizes, tokio);
    let pipe = redis_cli_pipe(redis, sizes, sizes.keys, |redis| fill(redis, sizes.keys));
    let scenario = format!("delete-matching `quiz:*`, {} of {} keys", sizes.keys, 2 * sizes.keys);
    let mut rows = vec![against_naive(&scenario, ours, "naive SCAN + DEL per key", naive)];
    rows.push(match pipe {
        Some(pipe) => Row {
            scenario,
            cachepol: rate(ours),
            baseline: format!("`redis-cli --pipe`, 1000-key UNLINKs: {}", rate(pipe)),
            ratio: format!("{:.2}x", ours / pipe),
            target: ">= 0.66x".into(),
            met: Some(ours / pipe >= 0.66),
        },
        None => Row {
            scenario,
            cachepol: rate(ours),
            baseline: "`redis-cli` not installed".into(),
            ratio: "-".into(),
            target: ">= 0.66x".into(),
            met: None,
        },
    });
    rows
}
