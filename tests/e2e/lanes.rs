//! A policy runs as several lanes: one key's events stay in order, deploy
//! hooks wait for the events queued before them, and sustained overload is
//! reconciled by gap sweeps that run while events keep arriving.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::{Daemon, RedisServer, Setup, deploy, eventually};

#[test]
fn events_of_one_key_are_handled_in_order_across_lanes() {
    const KEYS: usize = 200;
    const ROUNDS: usize = 40;
    let redis = RedisServer::start();
    let setup = Setup::new(&[]).with_copy("recorder", "ord").config(
        "lanes = 8\nqueue_capacity = 100000\n[policies.ord]\nconfig = { name = \"ord\", ops = [\"set\", \"del\"], \
         patterns = [\"ord:*\"], order = true }",
    );
    let daemon = Daemon::start(&redis, &setup);
    // Every key alternates SET and DEL, the keys interleaved: a key's
    // events handled out of order show as the same op twice in a row.
    let mut conn = redis.conn();
    for round in 0..ROUNDS {
        let mut pipe = redis::pipe();
        for k in 0..KEYS {
            if round.is_multiple_of(2) {
                pipe.cmd("SET").arg(format!("ord:{k}")).arg(round).ignore();
            } else {
                pipe.cmd("DEL").arg(format!("ord:{k}")).ignore();
            }
        }
        pipe.query::<()>(&mut conn).unwrap();
    }
    let last_op = if ROUNDS.is_multiple_of(2) { "del" } else { "set" };
    eventually(&daemon, "every key's last event handled", || {
        let last: Vec<Option<String>> = redis::cmd("MGET")
            .arg((0..KEYS).map(|k| format!("order:last:ord:{k}")).collect::<Vec<_>>())
            .query(&mut conn)
            .unwrap();
        let ok = last.iter().all(|op| op.as_deref() == Some(last_op));
        if !ok {
            eprintln!(
                "last ops: {:?}",
                last.iter().enumerate().filter(|(_, op)| op.as_deref() != Some(last_op)).take(5).collect::<Vec<_>>()
            );
        }
        ok
    });
    assert_eq!(redis.keys("order:bad:*"), Vec::<String>::new(), "no key saw its events out of order");
    let lanes = redis.keys("recorder:ord:events:*").len();
    assert!(lanes > 1, "the events were shared among lanes ({lanes} instance(s) handled them)");
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_deploy_hook_sees_the_effects_of_every_event_queued_before_it() {
    const KEYS: usize = 600;
    let redis = RedisServer::start();
    // A slow policy (a few ms of CPU per event): the hook arrives while
    // most events still wait, and must run after all of them.
    let setup = Setup::new(&[]).with_copy("recorder", "rec").config(
        "lanes = 8\nqueue_capacity = 100000\n[policies.rec]\nconfig = { name = \"rec\", patterns = [\"rec:*\"], \
         mark_prefix = \"mark:\", work = 10000000, count_on_deploy = \"mark:*\" }",
    );
    let daemon = Daemon::start(&redis, &setup);
    let mut pipe = redis::pipe();
    for i in 0..KEYS {
        pipe.cmd("SET").arg(format!("rec:{i}")).arg("v").ignore();
    }
    pipe.query::<()>(&mut redis.conn()).unwrap();
    // Routing the notifications takes well under this; handling them
    // takes seconds.
    std::thread::sleep(Duration::from_millis(300));
    let handled_before = redis.keys("mark:rec:*").len();
    deploy(&redis, &["--service", "catalog"]);
    eventually(&daemon, "the hook handled", || redis.exists("recorder:rec:counted"));
    assert!(handled_before < KEYS, "the hook was sent while events were still waiting ({handled_before} handled)");
    let counted: usize = redis.cmd::<String>(&["GET", "recorder:rec:counted"]).parse().unwrap();
    assert_eq!(counted, KEYS, "the hook ran after every event queued before it");
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn under_sustained_overload_the_gap_sweep_runs_while_events_keep_arriving() {
    let redis = RedisServer::start();
    // A small queue and a slow policy: the writer outpaces it for as long
    // as it writes.
    let setup = Setup::new(&[]).with_copy("recorder", "rec").config(
        "lanes = 2\nqueue_capacity = 50\n[policies.rec]\nconfig = { name = \"rec\", patterns = [\"rec:*\"], \
         ttl_ms = 600000, work = 1000000 }",
    );
    let daemon = Daemon::start(&redis, &setup);
    let swept = Arc::new(AtomicBool::new(false));
    let writer = {
        let (url, swept) = (redis.url(), swept.clone());
        std::thread::spawn(move || {
            let client = redis::Client::open(url).unwrap();
            let mut conn = client.get_connection().unwrap();
            let mut written = 0u64;
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            // Keep writing until a gap sweep has run, and a while after.
            let mut after = 0;
            while after < 20 && std::time::Instant::now() < deadline {
                let mut pipe = redis::pipe();
                for _ in 0..200 {
                    written += 1;
                    pipe.cmd("SET").arg(format!("rec:{written}")).arg("v").ignore();
                }
                pipe.query::<()>(&mut conn).unwrap();
                let gap: Option<u64> = redis::cmd("GET").arg("recorder:rec:sweep:gap").query(&mut conn).unwrap();
                if gap.is_some() {
                    swept.store(true, Ordering::Relaxed);
                    after += 1;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            written
        })
    };
    let written = writer.join().unwrap();
    assert!(swept.load(Ordering::Relaxed), "a gap sweep ran while {written} writes kept arriving");
    eventually(&daemon, "every key has its TTL", || {
        let keys = redis.keys("rec:*");
        let mut pipe = redis::pipe();
        keys.iter().for_each(|k| {
            pipe.cmd("TTL").arg(k);
        });
        let ttls: Vec<i64> = pipe.query(&mut redis.conn()).unwrap();
        keys.len() as u64 == written && ttls.iter().all(|t| *t > 0)
    });
    daemon.wait_for("keyspace events dropped", Duration::from_secs(5));
    assert!(redis.recorded_events("rec") < written, "events were dropped, not buffered without bound");
    assert_eq!(daemon.stop(), Some(0));
}
