//! Pattern invalidation on a Redis Cluster of 3 primaries: delete `quiz:*`
//! (N keys spread over every primary) among 2N, notifications on.
//!
//! - cachepol: genre-invalidation handling a deploy hook through the
//!   daemon's backend on a `redis+cluster://` URL: every primary scanned
//!   at once over a connection of its own, each page's keys deleted with
//!   one `UNLINK` per slot in the same round trip as the next `SCAN`.
//! - naive: what a runbook does against a cluster, `SCAN` + `DEL` per key,
//!   one primary after the other. It runs for a fixed time; its rate is
//!   taken.
//! - `redis-cli --pipe` on every primary at once, of `UNLINK`s of the
//!   known names (one slot's keys per command): the ceiling.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use cachepol::store::target::{RedisTarget, slot};

use crate::deletion;
use crate::report::{Row, rate};
use crate::support::cluster::Cluster;
use crate::{Sizes, repeat, secs};

/// Keys to delete: the full run's million would take most of a minute to
/// write into three nodes on two cores, each time.
fn keys(sizes: &Sizes) -> u64 {
    sizes.keys.min(300_000)
}

/// The port of the primary serving each slot.
fn owners(cluster: &Cluster) -> Vec<u16> {
    let mut owner = vec![0; 16384];
    for node in cluster.primaries() {
        for (a, b) in &node.slots {
            owner[*a as usize..=*b as usize].fill(node.port);
        }
    }
    owner
}

/// `names` grouped by the primary serving them, then by slot.
pub fn by_node(owner: &[u16], names: impl Iterator<Item = String>) -> BTreeMap<u16, BTreeMap<u16, Vec<String>>> {
    let mut nodes: BTreeMap<u16, BTreeMap<u16, Vec<String>>> = BTreeMap::new();
    for name in names {
        let s = slot(name.as_bytes());
        nodes.entry(owner[s as usize]).or_default().entry(s).or_default().push(name);
    }
    nodes
}

fn quiz(n: u64) -> impl Iterator<Item = String> {
    (0..n).map(|i| format!("quiz:{i}"))
}

/// Empty every primary.
pub fn flush(cluster: &Cluster) {
    for node in cluster.primaries() {
        cluster.by_port(node.port).cmd::<()>(&["FLUSHALL"]);
    }
}

/// Empty every primary, then write `n` keys `quiz:<i>` and `n` keys `keep:<i>`.
fn fill(cluster: &Cluster, owner: &[u16], n: u64) {
    flush(cluster);
    let names = quiz(n).chain((0..n).map(|i| format!("keep:{i}")));
    for (port, slots) in by_node(owner, names) {
        let mut conn = cluster.by_port(port).conn();
        let mut pipe = redis::pipe();
        for (_, names) in slots {
            for chunk in names.chunks(1000) {
                let mut mset = redis::cmd("MSET");
                for name in chunk {
                    mset.arg(name).arg("v");
                }
                pipe.add_command(mset).ignore();
            }
            if pipe.cmd_iter().count() >= 200 {
                pipe.query::<()>(&mut conn).unwrap();
                pipe = redis::pipe();
            }
        }
        pipe.query::<()>(&mut conn).unwrap();
    }
}

fn dbsize(cluster: &Cluster) -> u64 {
    cluster.primaries().iter().map(|n| cluster.by_port(n.port).cmd::<u64>(&["DBSIZE"])).sum()
}

fn naive(cluster: &Cluster, owner: &[u16], sizes: &Sizes) -> f64 {
    fill(cluster, owner, keys(sizes));
    let started = Instant::now();
    let mut deleted = 0u64;
    'nodes: for node in cluster.primaries() {
        let mut conn = cluster.by_port(node.port).conn();
        let mut cursor: u64 = 0;
        loop {
            let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg("quiz:*")
                .arg("COUNT")
                .arg(1000)
                .query(&mut conn)
                .unwrap();
            for key in found {
                deleted += redis::cmd("DEL").arg(&key).query::<u64>(&mut conn).unwrap();
            }
            cursor = next;
            if started.elapsed() > sizes.naive_cap {
                break 'nodes;
            }
            if cursor == 0 {
                break;
            }
        }
    }
    deleted as f64 / secs(started)
}

fn cachepol(cluster: &Cluster, owner: &[u16], sizes: &Sizes, tokio: &tokio::runtime::Runtime) -> f64 {
    let target = RedisTarget::parse(&cluster.url()).unwrap();
    let n = keys(sizes);
    deletion::policy_rate(&target, sizes.reps, n, tokio, || fill(cluster, owner, n), || dbsize(cluster))
}

/// `redis-cli --pipe` on every primary at once; `None` without `redis-cli`.
fn redis_cli_pipe(cluster: &Cluster, owner: &[u16], sizes: &Sizes) -> Option<f64> {
    Command::new("redis-cli").arg("--version").output().ok()?;
    let n = keys(sizes);
    let per_node: Vec<(u16, Vec<u8>)> = by_node(owner, quiz(n))
        .into_iter()
        .map(|(port, slots)| {
            let mut resp = Vec::new();
            for names in slots.values() {
                for chunk in names.chunks(1000) {
                    write!(resp, "*{}\r\n$6\r\nUNLINK\r\n", chunk.len() + 1).unwrap();
                    for name in chunk {
                        write!(resp, "${}\r\n{name}\r\n", name.len()).unwrap();
                    }
                }
            }
            (port, resp)
        })
        .collect();
    Some(repeat(sizes.reps, || {
        fill(cluster, owner, n);
        let started = Instant::now();
        let children: Vec<_> = per_node
            .iter()
            .map(|(port, resp)| {
                let mut child = Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "--pipe"])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap();
                let mut stdin = child.stdin.take().unwrap();
                let resp = resp.clone();
                (child, std::thread::spawn(move || stdin.write_all(&resp).unwrap()))
            })
            .collect();
        for (mut child, writer) in children {
            writer.join().unwrap();
            assert!(child.wait().unwrap().success());
        }
        let took = secs(started);
        assert_eq!(dbsize(cluster), n, "redis-cli deleted every quiz:* key");
        n as f64 / took
    }))
}

pub fn run(sizes: &Sizes, tokio: &tokio::runtime::Runtime) -> Vec<Row> {
    let cluster = Cluster::start(3, 0);
    for node in &cluster.nodes {
        node.cmd::<()>(&["CONFIG", "SET", "notify-keyspace-events", "KEA"]);
    }
    let owner = owners(&cluster);
    let naive = naive(&cluster, &owner, sizes);
    let ours = cachepol(&cluster, &owner, sizes, tokio);
    let pipe = redis_cli_pipe(&cluster, &owner, sizes);
    let scenario =
        format!("Redis Cluster (3 primaries): delete-matching `quiz:*`, {} of {} keys", keys(sizes), 2 * keys(sizes));
    let mut rows =
        vec![deletion::against_naive(&scenario, ours, "naive SCAN + DEL per key, primary by primary", naive)];
    if let Some(pipe) = pipe {
        rows.push(Row {
            scenario,
            cachepol: rate(ours),
            baseline: format!("`redis-cli --pipe` on every primary at once, per-slot UNLINKs: {}", rate(pipe)),
            ratio: format!("{:.2}x", ours / pipe),
            target: "-".into(),
            met: None,
        });
    }
    flush(&cluster);
    rows.extend(crate::cluster_events::rows(&cluster, &owner, sizes));
    rows
}
