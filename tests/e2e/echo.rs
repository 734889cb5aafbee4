//! A policy's own writes do not wake it again, and chains of policies
//! waking each other stop at the hop limit.

use std::time::Duration;

use crate::support::{Daemon, RedisServer, Setup, eventually};

fn count(redis: &RedisServer, key: &str) -> u64 {
    redis.cmd::<Option<String>>(&["GET", key]).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Subscribed to `echo:*` and writing `echo:copy:<key>` on every event:
/// without suppression each write would wake it again, forever. It also
/// sets a TTL on every key it hears about, which notifies `expire`.
fn echoer() -> Setup {
    Setup::new(&[]).with_copy("recorder", "echoer").config(
        "[policies.echoer]\nconfig = { name = \"echoer\", ops = [\"set\", \"expire\"], patterns = [\"echo:*\"], \
         copy_prefix = \"echo:copy:\", ttl_ms = 60000 }",
    )
}

/// The echoer got one event per application write, none of its own, and
/// its copies were not copied again.
fn heard_only_the_application(redis: &RedisServer, daemon: Daemon, writes: u64) {
    assert_eq!(redis.recorded_events("echoer"), writes, "one event per application write, no echoes");
    assert!(redis.keys("echo:copy:echo:copy:*").is_empty(), "its own copies were not copied again");
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_policy_writing_keys_it_subscribes_to_does_not_loop() {
    let redis = RedisServer::start();
    let setup = echoer();
    let daemon = Daemon::start(&redis, &setup);
    for i in 0..5 {
        redis.cmd::<()>(&["SET", &format!("echo:{i}"), "v"]);
    }
    eventually(&daemon, "five copies", || redis.keys("echo:copy:*").len() == 5);
    // Give any echo time to show up before counting.
    std::thread::sleep(Duration::from_millis(500));
    heard_only_the_application(&redis, daemon, 5);
}

#[test]
fn two_policies_waking_each_other_stop_at_the_hop_limit() {
    let redis = RedisServer::start();
    // ping copies `a:*` to `b:<key>`, pong copies `b:*` to `a:<key>`.
    let setup = Setup::new(&[])
        .with_copy("recorder", "ping")
        .with_copy("recorder", "pong")
        .config("hop_limit = 2")
        .config("[policies.ping]\nconfig = { name = \"ping\", patterns = [\"a:*\"], copy_prefix = \"b:\" }")
        .config("[policies.pong]\nconfig = { name = \"pong\", patterns = [\"b:*\"], copy_prefix = \"a:\" }");
    let daemon = Daemon::start(&redis, &setup);
    redis.cmd::<()>(&["SET", "a:x", "v"]);
    // a:x (the application, hop 0) -> ping writes b:a:x (hop 1) -> pong
    // writes a:b:a:x (hop 2) -> ping writes b:a:b:a:x (hop 3), which is over
    // the limit and not delivered: pong never writes a:b:a:b:a:x.
    eventually(&daemon, "the chain reaches hop 3", || redis.exists("b:a:b:a:x"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!redis.exists("a:b:a:b:a:x"), "the chain stopped at the hop limit");
    assert_eq!(redis.recorded_events("ping"), 2);
    assert_eq!(redis.recorded_events("pong"), 1);
    daemon.wait_for("hop limit reached", Duration::from_secs(20));
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_policy_writing_keys_it_subscribes_to_does_not_loop_under_a_lagging_subscriber() {
    let redis = RedisServer::start();
    // The same echoer, with every notification read 2.1 s late: longer than
    // any time-based expectation would wait. Echoes must still be matched.
    let setup = echoer();
    let daemon = Daemon::spawn_with_env(
        &redis,
        &setup,
        &["--configure-notifications"],
        &[("CACHEPOL_FAULT_SUBSCRIBER_LAG_MS", "2100")],
    );
    daemon.wait_for("cachepol ready", Duration::from_secs(60));
    redis.cmd::<()>(&["SET", "echo:0", "v"]);
    eventually(&daemon, "the copy", || redis.exists("echo:copy:echo:0"));
    // Every notification its writes caused has been read by now (each takes
    // 2.1 s; the policy's three writes plus the application's).
    std::thread::sleep(Duration::from_secs(10));
    heard_only_the_application(&redis, daemon, 1);
}

#[test]
fn an_application_delete_during_a_bulk_delete_is_delivered() {
    let redis = RedisServer::start();
    // The wiper hears deletes of `wipe:*` and, on a deploy, deletes
    // `wipe:bulk:*` itself.
    let setup = Setup::new(&[]).with_copy("recorder", "wiper").config(
        "[policies.wiper]\nconfig = { name = \"wiper\", ops = [\"del\"], patterns = [\"wipe:*\"], wipe = \"wipe:bulk:*\" }",
    );
    let daemon = Daemon::start(&redis, &setup);
    let mut conn = redis.conn();
    for start in (0..50_000).step_by(1000) {
        let mut mset = redis::cmd("MSET");
        for i in start..start + 1000 {
            mset.arg(format!("wipe:bulk:{i}")).arg("v");
        }
        mset.query::<()>(&mut conn).unwrap();
    }
    crate::support::deploy(&redis, &["--service", "ops"]);
    eventually(&daemon, "the bulk delete is under way", || redis.cmd::<usize>(&["DBSIZE"]) < 49_000);
    // Meanwhile the application deletes keys under the same pattern. Each is
    // set and deleted in one transaction: the policy's scan can never see
    // it, so its delete is the application's alone.
    for i in 0..20 {
        let app_key = format!("wipe:bulk:app-{i}");
        redis::pipe().atomic().set(&app_key, "v").del(&app_key).query::<()>(&mut conn).unwrap();
    }
    eventually(&daemon, "the bulk delete done", || count(&redis, "recorder:wiper:wiped") == 1);
    eventually(&daemon, "every application delete delivered", || redis.recorded_events("wiper") == 20);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(redis.recorded_events("wiper"), 20, "its own 50,000 deletes were not delivered back");
    assert_eq!(daemon.stop(), Some(0));
}
