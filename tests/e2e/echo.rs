//! A policy's own writes do not wake it again, and chains of policies
//! waking each other stop at the hop limit.

use std::time::Duration;

use crate::support::{Daemon, RedisServer, Setup, eventually};

fn count(redis: &RedisServer, key: &str) -> u64 {
    redis.cmd::<Option<String>>(&["GET", key]).and_then(|v| v.parse().ok()).unwrap_or(0)
}

#[test]
fn a_policy_writing_keys_it_subscribes_to_does_not_loop() {
    let redis = RedisServer::start();
    // Subscribed to `echo:*` and writing `echo:copy:<key>` on every event:
    // without suppression each write would wake it again, forever. It also
    // sets a TTL on every key it hears about, which notifies `expire`.
    let setup = Setup::new(&[]).with_copy("recorder", "echoer").config(
        "[policies.echoer]\nconfig = { name = \"echoer\", ops = [\"set\", \"expire\"], patterns = [\"echo:*\"], \
         copy_prefix = \"echo:copy:\", ttl_ms = 60000 }",
    );
    let daemon = Daemon::start(&redis, &setup);
    for i in 0..5 {
        redis.cmd::<()>(&["SET", &format!("echo:{i}"), "v"]);
    }
    eventually(&daemon, "five copies", || redis.keys("echo:copy:*").len() == 5);
    // Give any echo time to show up before counting.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(count(&redis, "recorder:echoer:events"), 5, "one event per application write, no echoes");
    assert!(redis.keys("echo:copy:echo:copy:*").is_empty(), "its own copies were not copied again");
    assert_eq!(daemon.stop(), Some(0));
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
    assert_eq!(count(&redis, "recorder:ping:events"), 2);
    assert_eq!(count(&redis, "recorder:pong:events"), 1);
    daemon.wait_for("hop limit reached", Duration::from_secs(20));
    assert_eq!(daemon.stop(), Some(0));
}
