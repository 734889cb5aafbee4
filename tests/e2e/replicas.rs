//! Several daemons on one Redis (`[replicas]`): one holds the keyspace-event
//! lease and handles each event and hook once; when it dies the other takes
//! over within the lease's TTL and sweeps.

use std::time::Duration;

use crate::support::{Daemon, RedisServer, Setup, deploy, eventually, http};

const REPLICAS: &str = "[replicas]\nenabled = true\nlease_ttl_ms = 1500";

fn holds(daemon: &Daemon) -> bool {
    let (code, status) = http(&daemon.admin(), "GET", "/status", &[], b"");
    assert_eq!(code, 200, "{status}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    status["lease"]["held"].as_bool().unwrap_or_else(|| panic!("no lease in {status}"))
}

fn hooks_handled(daemons: &[&Daemon]) -> usize {
    daemons.iter().map(|d| d.log_text().matches("deploy hook service=").count()).sum()
}

#[test]
fn two_daemons_handle_each_event_and_hook_once_and_the_standby_takes_over() {
    let redis = RedisServer::start();
    let setup = Setup::new(&["recorder"]).config(REPLICAS);
    let a = Daemon::start(&redis, &setup);
    a.wait_for("took the keyspace-event lease", Duration::from_secs(20));
    let b = Daemon::start(&redis, &setup);
    b.wait_for("another daemon holds the keyspace-event lease", Duration::from_secs(20));
    assert!(holds(&a) && !holds(&b));

    for n in 0..200 {
        redis.cmd::<()>(&["SET", &format!("rec:{n}"), "v"]);
    }
    eventually(&a, "200 events handled", || redis.recorded_events("recorder") >= 200);
    deploy(&redis, &["--service", "ci"]);
    eventually(&a, "the hook is handled", || hooks_handled(&[&a, &b]) == 1);
    // Settled: nothing handled twice, by either daemon.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(redis.recorded_events("recorder"), 200, "each event once");
    assert_eq!(hooks_handled(&[&a, &b]), 1, "each hook once");

    // The holder dies: the standby takes over within the TTL (plus one
    // renewal interval), sweeps, and handles what comes next.
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

#[test]
fn a_holder_that_stops_gives_the_lease_back_at_once() {
    let redis = RedisServer::start();
    // A TTL longer than the wait below: only the release can explain the
    // takeover.
    let setup = Setup::new(&["recorder"]).config("[replicas]\nenabled = true\nlease_ttl_ms = 120000");
    let a = Daemon::start(&redis, &setup);
    a.wait_for("took the keyspace-event lease", Duration::from_secs(20));
    let b = Daemon::start(&redis, &setup);
    b.wait_for("another daemon holds the keyspace-event lease", Duration::from_secs(20));
    assert_eq!(a.stop(), Some(0));
    b.wait_for("took the keyspace-event lease", Duration::from_secs(60));
    redis.cmd::<()>(&["SET", "rec:after", "v"]);
    eventually(&b, "handled by the new holder", || redis.recorded_events("recorder") >= 1);
    let (_, metrics) = http(&b.admin(), "GET", "/metrics", &[], b"");
    assert!(metrics.contains("cachepol_lease_held 1"), "{metrics}");
    assert_eq!(b.stop(), Some(0));
}
