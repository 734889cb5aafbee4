//! Several daemons on one Redis (`[replicas]`, on by default; here with a
//! shorter lease): one holds the keyspace-event lease and handles each
//! event and hook once; when it dies or freezes the other takes over and
//! sweeps; when it stops it hands over.

use std::time::Duration;

use crate::support::{Daemon, RedisServer, Setup, deploy, eventually, http};

const REPLICAS: &str = "[replicas]\nlease_ttl_ms = 3000";

fn holds(daemon: &Daemon) -> bool {
    let (code, status) = http(&daemon.admin(), "GET", "/status", &[], b"");
    assert_eq!(code, 200, "{status}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    status["lease"]["held"].as_bool().unwrap_or_else(|| panic!("no lease in {status}"))
}

fn hooks_handled(daemons: &[&Daemon]) -> usize {
    daemons.iter().map(|d| d.log_text().matches("deploy hook service=").count()).sum()
}

/// A holder, then a standby, both ready.
fn pair(redis: &RedisServer, setup: &Setup) -> (Daemon, Daemon) {
    let a = Daemon::start(redis, setup);
    a.wait_for("took the keyspace-event lease", Duration::from_secs(20));
    let b = Daemon::start(redis, setup);
    b.wait_for("another daemon holds the keyspace-event lease", Duration::from_secs(20));
    (a, b)
}

#[test]
fn two_daemons_handle_each_event_and_hook_once_and_the_standby_takes_over() {
    let redis = RedisServer::start();
    let setup = Setup::new(&["recorder"]).config(REPLICAS);
    let (a, b) = pair(&redis, &setup);
    assert!(holds(&a) && !holds(&b));

    for n in 0..200 {
        redis.cmd::<()>(&["SET", &format!("rec:{n}"), "v"]);
    }
    eventually(&a, "200 events handled", || redis.recorded_events("recorder") >= 200);
    deploy(&redis, &["--service", "ci"]);
    eventually(&a, "the hook is handled", || hooks_handled(&[&a, &b]) == 1);
    assert_eq!(redis.recorded_events("recorder"), 200, "each event once");
    assert!(a.log_text().contains("event=\"key-"), "a handled call is logged so");
    assert!(!b.log_text().contains("event=\"key-"), "the standby handled an event:\n{}", b.log_text());

    // The holder dies: the standby takes over, sweeps, and handles what
    // comes next. A key written before the takeover goes to nobody: only
    // the takeover's sweep reaches it (the recorder's sweep counter).
    redis.cmd::<i64>(&["DEL", "recorder:recorder:sweep:gap"]);
    a.kill();
    b.wait_for("took the keyspace-event lease", Duration::from_secs(20));
    eventually(&b, "the takeover sweep", || {
        redis.cmd::<Option<String>>(&["GET", "recorder:recorder:sweep:gap"]).is_some()
    });
    for n in 200..250 {
        redis.cmd::<()>(&["SET", &format!("rec:{n}"), "v"]);
    }
    eventually(&b, "the next events handled by the new holder", || redis.recorded_events("recorder") == 250);
    deploy(&redis, &["--service", "ci"]);
    eventually(&b, "the next hook handled by the new holder", || hooks_handled(&[&b]) == 1);
    assert!(holds(&b));
    assert_eq!(b.stop(), Some(0));
}

/// A holder frozen past its lease (SIGSTOP) is replaced; woken up, it must
/// not handle the events it had buffered, nor any later one.
#[test]
fn a_frozen_holder_does_not_handle_events_once_its_lease_has_lapsed() {
    let redis = RedisServer::start();
    let setup = Setup::new(&["recorder"]).config(REPLICAS);
    let (a, b) = pair(&redis, &setup);
    let signal = |sig: &str| {
        assert!(std::process::Command::new("kill").args([sig, &a.pid().to_string()]).status().unwrap().success());
    };
    signal("-STOP");
    b.wait_for("took the keyspace-event lease", Duration::from_secs(30));
    for n in 0..100 {
        redis.cmd::<()>(&["SET", &format!("rec:{n}"), "v"]);
    }
    eventually(&b, "the new holder handles them", || redis.recorded_events("recorder") >= 100);
    signal("-CONT");
    a.wait_for("lost the keyspace-event lease", Duration::from_secs(30));
    for n in 100..150 {
        redis.cmd::<()>(&["SET", &format!("rec:{n}"), "v"]);
    }
    eventually(&b, "the later ones too", || redis.recorded_events("recorder") >= 150);
    // Both alive, each event counted once: the woken one handled none of
    // what it had buffered while frozen.
    assert_eq!(redis.recorded_events("recorder"), 150, "{}", a.log_text());
    assert!(!a.log_text().contains("event=\"key-"), "the frozen holder handled an event:\n{}", a.log_text());
    assert_eq!(b.stop(), Some(0));
    assert_eq!(a.stop(), Some(0));
}

#[test]
fn a_holder_that_stops_gives_the_lease_back() {
    let redis = RedisServer::start();
    // A TTL far longer than the wait below: only the hand-over explains
    // the takeover.
    let setup = Setup::new(&["recorder"]).config("[replicas]\nlease_ttl_ms = 600000");
    let (a, b) = pair(&redis, &setup);
    assert_eq!(a.stop(), Some(0));
    b.wait_for("took the keyspace-event lease", Duration::from_secs(60));
    redis.cmd::<()>(&["SET", "rec:after", "v"]);
    eventually(&b, "handled by the new holder", || redis.recorded_events("recorder") >= 1);
    let (_, metrics) = http(&b.admin(), "GET", "/metrics", &[], b"");
    assert!(metrics.contains("cachepol_lease_held 1"), "{metrics}");
    assert_eq!(b.stop(), Some(0));
}

/// The holder dies in the middle of a deploy hook: the next holder claims
/// it once idle for the lease's TTL (not `claim_idle_ms`, a minute) and
/// handles it.
#[test]
fn a_hook_the_dead_holder_was_handling_is_handled_by_the_next_one() {
    let redis = RedisServer::start();
    redis.cmd::<()>(&["SET", "graph_data:dance", "v"]);
    // The first holder's policy never finishes a hook; the standby's does
    // the job (two policy sets, one lease).
    let stuck = Setup::new(&["hostile"]).config(&format!(
        "{REPLICAS}\n[policies.hostile]\nconfig = {{ on_deploy = \"spin\" }}\nbudgets = {{ fuel = 1000000000000000, wall_time = 600000 }}"
    ));
    let good = Setup::new(&["genre-invalidation"]).config(REPLICAS);
    let a = Daemon::start(&redis, &stuck);
    a.wait_for("took the keyspace-event lease", Duration::from_secs(20));
    let b = Daemon::start(&redis, &good);
    b.wait_for("another daemon holds the keyspace-event lease", Duration::from_secs(20));
    deploy(&redis, &["--service", "catalog", "--tag", "genre=dance"]);
    a.wait_for("deploy hook service=", Duration::from_secs(20));
    a.kill();
    b.wait_for("took the keyspace-event lease", Duration::from_secs(20));
    eventually(&b, "the hook is claimed and handled", || !redis.exists("graph_data:dance"));
    b.wait_for("claimed deploy hooks another consumer left pending", Duration::from_secs(20));
    assert_eq!(b.stop(), Some(0));
}
