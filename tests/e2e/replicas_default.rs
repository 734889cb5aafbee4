//! Several daemons with the default config on one Redis (a Deployment
//! scaled to two): they share the keyspace-event lease without being told
//! to, so each event and hook is handled once, and a lone daemon simply
//! holds it. Replicas turned off stay possible, but a second daemon is then
//! named: in the log, in `/status`, in a metric.

use std::time::Duration;

use crate::support::*;

fn hooks_handled(daemons: &[&Daemon]) -> usize {
    daemons.iter().map(|d| d.log_text().matches("deploy hook service=").count()).sum()
}

fn count(redis: &RedisServer, key: &str) -> u64 {
    redis.cmd::<Option<u64>>(&["GET", key]).unwrap_or(0)
}

fn status(daemon: &Daemon) -> serde_json::Value {
    let (code, status) = http(&daemon.admin(), "GET", "/status", &[], b"");
    assert_eq!(code, 200, "{status}");
    serde_json::from_str(&status).unwrap()
}

fn set_keys(redis: &RedisServer, range: std::ops::Range<u32>) {
    for n in range {
        redis.cmd::<()>(&["SET", &format!("rec:{n}"), "v"]);
    }
}

#[test]
fn two_daemons_with_the_default_config_handle_each_event_and_hook_once() {
    let redis = RedisServer::start();
    // No [replicas] section: the defaults.
    let setup = Setup::new(&["recorder"]);
    let a = Daemon::start(&redis, &setup);
    // A lone daemon holds the lease by the time it says it is ready: what
    // is written then is handled as an event, and its start sweep is one.
    assert!(a.log_text().contains("took the keyspace-event lease"), "{}", a.log_text());
    redis.cmd::<()>(&["SET", "rec:first", "v"]);
    eventually(&a, "the first write handled as an event", || redis.recorded_events("recorder") == 1);
    let (code, _) = http(&a.admin(), "GET", "/readyz", &[], b"");
    assert_eq!(code, 200);
    assert_eq!(count(&redis, "recorder:recorder:sweep:start"), 1);
    assert_eq!(count(&redis, "recorder:recorder:sweep:gap"), 0, "a start is no takeover");

    let b = Daemon::start(&redis, &setup);
    b.wait_for("another daemon holds the keyspace-event lease", Duration::from_secs(20));
    set_keys(&redis, 0..100);
    eventually(&a, "100 more events handled", || redis.recorded_events("recorder") >= 101);
    deploy(&redis, &["--service", "ci"]);
    eventually(&a, "the hook is handled", || hooks_handled(&[&a, &b]) == 1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(redis.recorded_events("recorder"), 101, "each event once");
    assert_eq!(hooks_handled(&[&a, &b]), 1, "each hook once");
    assert!(!b.log_text().contains("event=\"key-"), "the standby handled an event:\n{}", b.log_text());
    assert_eq!(status(&a)["lease"]["held"], true);
    assert_eq!(status(&b)["lease"]["held"], false);
    assert!(!a.log_text().contains("another cachepol daemon runs on this Redis"), "replicas are no warning");

    // The holder dies: the other takes over once its lease has expired,
    // sweeps, and handles what comes next.
    a.kill();
    b.wait_for("took the keyspace-event lease", Duration::from_secs(20));
    eventually(&b, "the takeover sweep", || count(&redis, "recorder:recorder:sweep:gap") == 1);
    set_keys(&redis, 100..150);
    eventually(&b, "the next events handled by the new holder", || redis.recorded_events("recorder") == 151);
    deploy(&redis, &["--service", "ci"]);
    eventually(&b, "the next hook handled by the new holder", || hooks_handled(&[&b]) == 1);
    assert_eq!(b.stop(), Some(0));
}

#[test]
fn with_replicas_off_a_second_daemon_is_named() {
    let redis = RedisServer::start();
    let off = |name: &str| {
        Setup::new(&["recorder"]).config(&format!("[replicas]\nenabled = false\n[deploy]\nconsumer = \"{name}\""))
    };
    let (setup_a, setup_b) = (off("daemon-a"), off("daemon-b"));
    let a = Daemon::start(&redis, &setup_a);
    let b = Daemon::start(&redis, &setup_b);
    let named = "another cachepol daemon runs on this Redis";
    a.wait_for(&format!("{named}: daemon-b/"), Duration::from_secs(20));
    b.wait_for(&format!("{named}: daemon-a/"), Duration::from_secs(20));

    let seen = status(&a);
    assert_eq!(seen["lease"], serde_json::Value::Null, "{seen}");
    let peers: Vec<&str> = seen["peers"].as_array().unwrap().iter().filter_map(|p| p.as_str()).collect();
    assert!(peers.len() == 1 && peers[0].starts_with("daemon-b/"), "{seen}");
    let (_, metrics) = http(&a.admin(), "GET", "/metrics", &[], b"");
    assert_eq!(metric(&metrics, "cachepol_peer_daemons"), 1.0, "{metrics}");
    let table = status_table(&a.admin());
    assert!(table.contains("other daemons on this Redis: daemon-b/") && table.contains("EACH handles"), "{table}");

    // What it warns of: both handle every event.
    set_keys(&redis, 0..10);
    eventually(&a, "both handle each event", || redis.recorded_events("recorder") == 20);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(a.log_text().matches(named).count(), 1, "named once per peer\n{}", a.log_text());

    // A peer gone is dropped from the roll call within the lease's TTL.
    b.kill();
    eventually(&a, "the peer is gone", || status(&a)["peers"].as_array().is_some_and(|p| p.is_empty()));
    assert_eq!(a.stop(), Some(0));
}
