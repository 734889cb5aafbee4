//! The key index: bulk operations served from it leave exactly what a scan
//! would, including right after a write, across gaps, and under random
//! application traffic.

use std::collections::BTreeSet;
use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::support::*;

/// A recorder that wipes `idx:a:*` on every deploy hook; its grants make
/// the daemon index `idx:*`.
pub(crate) fn wiper(extra_config: &str) -> Setup {
    Setup::new(&["recorder"]).config(&format!(
        "[policies.recorder]\nconfig = {{ name = \"idx\", ops = [\"persist\"], patterns = [\"idx:*\"], wipe = \"idx:a:*\" }}\n{extra_config}"
    ))
}

pub(crate) const INDEX_COMPLETE: &str = "key index complete: bulk operations on this pattern use it pattern=idx:*";
pub(crate) const SERVED: &str = "bulk operation served by the key index";
pub(crate) const SCANNED: &str = "bulk operation scans";

pub(crate) fn count(daemon: &Daemon, needle: &str) -> usize {
    daemon.log_text().matches(needle).count()
}

fn get(redis: &RedisServer, key: &str) -> u64 {
    redis.cmd::<Option<u64>>(&["GET", key]).unwrap_or(0)
}

/// Send a deploy hook and wait until the wipe it causes is done; the keys
/// it deleted.
pub(crate) fn wipe(redis: &RedisServer, daemon: &Daemon) -> u64 {
    let before = (get(redis, "recorder:idx:wiped"), get(redis, "recorder:idx:wiped_keys"));
    let _: String = redis.cmd(&["XADD", "cachepol:deploys", "*", "service", "web"]);
    eventually(daemon, &format!("the wipe after {before:?} on {}", redis.url()), || {
        get(redis, "recorder:idx:wiped") > before.0
    });
    get(redis, "recorder:idx:wiped_keys") - before.1
}

/// A daemon started with a test fault (an environment variable), once its
/// index of `idx:*` is built.
fn indexed_with_fault(redis: &RedisServer, setup: &Setup, fault: (&str, &str)) -> Daemon {
    let daemon = Daemon::spawn_with_env(redis, setup, &["--configure-notifications"], &[fault]);
    daemon.wait_for(INDEX_COMPLETE, Duration::from_secs(30));
    daemon
}

#[test]
fn a_key_written_just_before_the_operation_is_deleted() {
    let redis = RedisServer::start();
    let setup = wiper("");
    // Every notification is routed 20 ms late, as by a subscriber behind
    // Redis: the hook is handled long before the write's notification is
    // routed, unless the wipe waits for it.
    let daemon = indexed_with_fault(&redis, &setup, ("CACHEPOL_FAULT_SUBSCRIBER_LAG_MS", "20"));
    let mut conn = redis.conn();
    let rounds = 20;
    for i in 0..rounds {
        // The write and the hook in one round trip.
        let key = format!("idx:a:fence:{i}");
        let _: () = redis::pipe()
            .cmd("SET")
            .arg(&key)
            .arg("v")
            .ignore()
            .cmd("XADD")
            .arg("cachepol:deploys")
            .arg("*")
            .arg("service")
            .arg("web")
            .ignore()
            .query(&mut conn)
            .unwrap();
        eventually(&daemon, "the wipe", || get(&redis, "recorder:idx:wiped") > i);
        assert!(!redis.exists(&key), "{key} was written before the hook and survived it");
    }
    assert_eq!(get(&redis, "recorder:idx:wiped_keys"), rounds);
    assert_eq!(count(&daemon, SERVED), rounds as usize, "every wipe used the index\n{}", daemon.log_text());
}

#[test]
fn after_a_gap_the_next_operation_scans_and_the_index_comes_back() {
    let redis = RedisServer::start();
    let setup = wiper("");
    let daemon = indexed_with_fault(&redis, &setup, ("CACHEPOL_FAULT_INDEX_BUILD_DELAY_MS", "3000"));
    for i in 0..50 {
        let _: () = redis.cmd(&["SET", &format!("idx:a:{i}"), "v"]);
    }
    assert_eq!(wipe(&redis, &daemon), 50);
    assert_eq!(count(&daemon, SERVED), 1);

    // Cut the subscription and write while it is away: the index never
    // hears of these keys.
    let _: u64 = redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    for i in 0..30 {
        let _: () = redis.cmd(&["SET", &format!("idx:a:gap:{i}"), "v"]);
    }
    daemon.wait_for("keyspace subscription restored", Duration::from_secs(20));
    // The rebuild waits 3 s: this hook comes before it and scans.
    assert_eq!(wipe(&redis, &daemon), 30, "keys written during the gap are deleted");
    assert!(redis.keys("idx:a:*").is_empty());
    assert_eq!(count(&daemon, SERVED), 1, "{}", daemon.log_text());
    assert!(count(&daemon, SCANNED) >= 1);

    eventually(&daemon, "the rebuild", || count(&daemon, INDEX_COMPLETE) == 2);
    for i in 0..20 {
        let _: () = redis.cmd(&["HSET", &format!("idx:a:h:{i}"), "f", "v"]);
    }
    assert_eq!(wipe(&redis, &daemon), 20);
    assert_eq!(count(&daemon, SERVED), 2, "the index serves again after its rebuild");
}

/// One random application step on `idx:{a,b}:*`. Short TTLs become
/// expiries, renames move keys between the wiped and the kept half.
fn random_step(rng: &mut rand::rngs::StdRng, pipe: &mut redis::Pipeline) {
    let key = |rng: &mut rand::rngs::StdRng| {
        let half = if rng.random_bool(0.5) { "a" } else { "b" };
        format!("idx:{half}:{}", rng.random_range(0..60))
    };
    let k = key(rng);
    match rng.random_range(0..11) {
        0..=2 => pipe.cmd("SET").arg(&k).arg("v"),
        3 => pipe.cmd("HSET").arg(&k).arg("f").arg("v"),
        4 => pipe.cmd("RPUSH").arg(&k).arg("v"),
        5 => pipe.cmd("SADD").arg(&k).arg("m"),
        6 => pipe.cmd("ZADD").arg(&k).arg(1).arg("m"),
        7 => pipe.cmd("DEL").arg(&k),
        8 => pipe.cmd("UNLINK").arg(&k),
        9 => pipe.cmd("PEXPIRE").arg(&k).arg(rng.random_range(1..20)),
        // `COPY` rather than `RENAME`, which fails on a missing source and
        // would stop the pipeline: a missing source just copies nothing.
        _ => {
            let to = key(rng);
            pipe.cmd("COPY").arg(&k).arg(&to).arg("REPLACE").ignore();
            pipe.cmd("UNLINK").arg(&k)
        }
    }
    .ignore();
}

fn keyspace(redis: &RedisServer) -> BTreeSet<String> {
    redis.keys("idx:*").into_iter().collect()
}

/// Random application traffic (writes of every type, deletes, expiries,
/// copies with deletes, evictions) with gaps injected into the indexed
/// daemon's subscription and a restart of it; after every wipe, the daemon
/// with the index and the one without leave the same keyspace, having
/// deleted the same number of keys.
#[test]
fn index_and_scan_leave_the_same_keyspace() {
    let seed: u64 = std::env::var("CACHEPOL_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (CACHEPOL_TEST_SEED={seed} repeats this run)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (indexed_redis, scanned_redis) = (RedisServer::start(), RedisServer::start());
    let (indexed_setup, scanned_setup) = (wiper(""), wiper("[index]\nenabled = false"));
    let mut indexed = Daemon::start(&indexed_redis, &indexed_setup);
    let scanned = Daemon::start(&scanned_redis, &scanned_setup);
    indexed.wait_for(INDEX_COMPLETE, Duration::from_secs(20));
    let mut conns = (indexed_redis.conn(), scanned_redis.conn());
    let rounds = 16;
    for round in 0..rounds {
        let gap = rng.random_range(0..4);
        if gap == 0 {
            let _: u64 = indexed_redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        }
        if round == rounds / 2 {
            indexed.kill();
            indexed = Daemon::start(&indexed_redis, &indexed_setup);
            // The recorder counts in its memory: a new instance starts at 0.
            let _: u64 = indexed_redis.cmd(&["DEL", "recorder:idx:wiped", "recorder:idx:wiped_keys"]);
        }
        let evicting = round == rounds - 1;
        if evicting {
            for redis in [&indexed_redis, &scanned_redis] {
                let limit = used_memory(redis) + 300_000;
                let _: () = redis.cmd(&["CONFIG", "SET", "maxmemory-policy", "volatile-random"]);
                let _: () = redis.cmd(&["CONFIG", "SET", "maxmemory", &limit.to_string()]);
            }
        }
        let mut pipe = redis::pipe();
        for _ in 0..rng.random_range(50..300) {
            random_step(&mut rng, &mut pipe);
        }
        if evicting {
            // Only keys with a TTL are evicted (not the recorder's counts).
            for i in 0..200 {
                let half = if i % 2 == 0 { "a" } else { "b" };
                pipe.cmd("SET")
                    .arg(format!("idx:{half}:big:{i}"))
                    .arg(vec![b'x'; 4096])
                    .arg("PX")
                    .arg(600_000)
                    .ignore();
            }
        }
        // Errors (OOM while evicting) end the pipeline where they are, the
        // same way on both servers.
        let _: redis::RedisResult<()> = pipe.query(&mut conns.0);
        let _: redis::RedisResult<()> = pipe.query(&mut conns.1);
        if evicting {
            let evicted: Vec<u64> = [&indexed_redis, &scanned_redis]
                .iter()
                .map(|r| {
                    let _: () = r.cmd(&["CONFIG", "SET", "maxmemory", "0"]);
                    let stats: String = r.cmd(&["INFO", "stats"]);
                    stats.lines().find_map(|l| l.strip_prefix("evicted_keys:")?.trim().parse().ok()).unwrap_or(0)
                })
                .collect();
            assert!(evicted.iter().all(|n| *n > 0), "seed {seed}: the eviction round evicted nothing: {evicted:?}");
        }
        // Every short TTL has passed.
        std::thread::sleep(Duration::from_millis(30));
        let before = (keyspace(&indexed_redis), keyspace(&scanned_redis));
        if !evicting {
            assert_eq!(before.0, before.1, "seed {seed} round {round}: the same traffic left different keyspaces");
        }
        let deleted = (wipe(&indexed_redis, &indexed), wipe(&scanned_redis, &scanned));
        let after = (keyspace(&indexed_redis), keyspace(&scanned_redis));
        for (name, before, after, deleted) in
            [("indexed", &before.0, &after.0, deleted.0), ("scanned", &before.1, &after.1, deleted.1)]
        {
            let kept: BTreeSet<String> = before.iter().filter(|k| !k.starts_with("idx:a:")).cloned().collect();
            assert_eq!(*after, kept, "seed {seed} round {round}: {name} daemon left a different keyspace");
            assert_eq!(deleted, (before.len() - kept.len()) as u64, "seed {seed} round {round}: {name} count");
        }
        if !evicting {
            assert_eq!(after.0, after.1, "seed {seed} round {round}");
        }
    }
    let served = count(&indexed, SERVED);
    assert!(served >= rounds / 2, "seed {seed}: the index served only {served} of {rounds} wipes");
    assert_eq!(count(&scanned, SERVED), 0);
}

/// Redis's `used_memory`.
fn used_memory(redis: &RedisServer) -> u64 {
    let info: String = redis.cmd(&["INFO", "memory"]);
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory in INFO")
}

#[test]
fn ttl_table_sweeps_walk_the_index_instead_of_scanning() {
    let redis = RedisServer::start();
    let setup =
        Setup::new(&["ttl-table"]).config("[policies.ttl-table]\nconfig = { sweep_every_secs = 1, ops = [\"set\"] }");
    let daemon = Daemon::start(&redis, &setup);
    eventually(&daemon, "a sweep served by the index", || daemon.log_text().contains(SERVED));
    redis.cmd::<()>(&["CONFIG", "RESETSTAT"]);
    redis.cmd::<()>(&["SET", "graph_data:x", "g"]);
    eventually(&daemon, "the write got its TTL", || redis.cmd::<i64>(&["PTTL", "graph_data:x"]) > 0);
    // Told to hear only `set`, ttl-table misses the `PERSIST`: only its
    // periodic sweep finds the key without a TTL again.
    let _: i64 = redis.cmd(&["PERSIST", "graph_data:x"]);
    eventually(&daemon, "the sweep gave the TTL back", || redis.cmd::<i64>(&["PTTL", "graph_data:x"]) > 0);
    assert_eq!(redis.scan_calls(), 0, "the sweeps walked the index: no SCAN\n{}", daemon.log_text());
    assert_eq!(daemon.stop(), Some(0));
}

/// A wipe over several pages in flight at once, where some names are of
/// keys Redis expires lazily on the `UNLINK` (no `del` notification comes
/// for them): the policy's own deletes are not delivered back to it, and
/// no expectation is left behind to swallow the application's later
/// deletes of those names.
#[test]
fn a_bulk_delete_over_many_pages_leaves_no_echo_behind() {
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let setup = Setup::new(&["recorder"]).config(
        "[policies.recorder]\nconfig = { name = \"idx\", ops = [\"del\"], patterns = [\"idx:*\"], wipe = \"idx:a:*\" }",
    );
    let daemon = Daemon::start(&redis, &setup);
    daemon.wait_for(INDEX_COMPLETE, Duration::from_secs(20));
    // Expired keys stay until touched.
    let _: () = redis.cmd(&["DEBUG", "SET-ACTIVE-EXPIRE", "0"]);
    let mut conn = redis.conn();
    let mut pipe = redis::pipe();
    for i in 0..5000 {
        pipe.cmd("SET").arg(format!("idx:a:{i:05}")).arg("v").ignore();
        if i % 2 == 0 {
            pipe.cmd("SET").arg(format!("idx:a:{i:05}:x")).arg("v").arg("PX").arg(1).ignore();
        }
    }
    pipe.query::<()>(&mut conn).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(wipe(&redis, &daemon), 5000, "the expired keys are not counted");
    assert_eq!(count(&daemon, SERVED), 1);
    assert!(redis.keys("idx:a:*").is_empty());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(redis.recorded_events("idx"), 0, "its own deletes are not delivered to it");
    // The application reuses the names whose deletes never notified.
    let mut pipe = redis::pipe();
    for i in (0..5000).step_by(2) {
        pipe.cmd("SET").arg(format!("idx:a:{i:05}:x")).arg("v").ignore();
        pipe.cmd("DEL").arg(format!("idx:a:{i:05}:x")).ignore();
    }
    pipe.query::<()>(&mut conn).unwrap();
    eventually(&daemon, "every application delete delivered", || redis.recorded_events("idx") == 2500);
    assert_eq!(daemon.stop(), Some(0));
}

/// Redis restarts (durable: what was written comes back from its AOF): the
/// index is let go with the subscription and rebuilt from the restarted
/// server, and the next wipe is exact again.
#[test]
fn a_redis_restart_makes_the_index_rebuild_from_the_restarted_server() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let setup = wiper("");
    let daemon = Daemon::start(&redis, &setup);
    daemon.wait_for(INDEX_COMPLETE, Duration::from_secs(20));
    for i in 0..30 {
        let _: () = redis.cmd(&["SET", &format!("idx:a:before:{i}"), "v"]);
    }
    assert_eq!(wipe(&redis, &daemon), 30);
    for i in 0..40 {
        let _: () = redis.cmd(&["SET", &format!("idx:a:kept:{i}"), "v"]);
    }
    redis.restart();
    assert_eq!(redis.keys("idx:a:*").len(), 40, "the AOF brought the keys back");
    eventually(&daemon, "the rebuild", || count(&daemon, INDEX_COMPLETE) >= 2);
    // The recorder restarts its counts with a new instance if it was
    // re-created; compare against what Redis holds now.
    let before = get(&redis, "recorder:idx:wiped_keys");
    let _: String = redis.cmd(&["XADD", "cachepol:deploys", "*", "service", "web"]);
    eventually(&daemon, "the wipe after the restart", || redis.keys("idx:a:*").is_empty());
    eventually(&daemon, "its count", || get(&redis, "recorder:idx:wiped_keys") == before + 40);
    assert_eq!(count(&daemon, SERVED), 2, "both wipes walked the index\n{}", daemon.log_text());
}

/// A start sweep over a keyspace of many `SCAN` pages (written with no
/// notification, none with a TTL): the index's build does not scan beside
/// it, and is complete once the sweep is over, with every key.
#[test]
fn the_index_build_waits_for_the_start_sweeps_scan_and_completes_after() {
    const KEYS: u64 = 300_000;
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    redis.cmd::<()>(&["DEBUG", "POPULATE", &KEYS.to_string(), "job", "8"]);
    let setup = Setup::new(&["ttl-table"]);
    // The build starts late enough for the sweep to be scanning.
    let fault = ("CACHEPOL_FAULT_INDEX_BUILD_DELAY_MS", "1000");
    let daemon = Daemon::spawn_with_env(&redis, &setup, &["--configure-notifications"], &[fault]);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while redis.keyspace().1 < KEYS {
        assert!(std::time::Instant::now() < deadline, "the sweep did not finish:\n{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let complete = "key index complete: bulk operations on this pattern use it pattern=job:*";
    daemon.wait_for(complete, Duration::from_secs(60));
    let log = daemon.log_text();
    assert!(log.contains("key index build waits for a walk"), "{log}");
    let line = log.lines().find(|l| l.contains(complete)).unwrap_or_default();
    assert!(line.contains(&format!("keys={KEYS} ")), "every key indexed: {line}");
    assert_eq!(daemon.stop(), Some(0));
}
