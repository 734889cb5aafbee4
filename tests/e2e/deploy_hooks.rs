//! Deploy hooks are durable: acknowledged only once handled, re-handled
//! after a crash, dead-lettered when malformed or failing.

use std::time::Duration;

use crate::support::{Daemon, RedisServer, Setup, deploy, eventually};

/// Hooks read by the group but not acknowledged.
fn pending(redis: &RedisServer) -> usize {
    let entries: Vec<redis::Value> = redis.cmd(&["XPENDING", "cachepol:deploys", "cachepol", "-", "+", "100"]);
    entries.len()
}

/// The reasons of the dead-lettered hooks, in order.
fn dead_letters(redis: &RedisServer) -> Vec<String> {
    let reply: redis::streams::StreamRangeReply = redis.cmd(&["XRANGE", "cachepol:deploys:dead", "-", "+"]);
    reply.ids.iter().map(|e| e.get::<String>("reason").unwrap_or_default()).collect()
}

#[test]
fn a_hook_interrupted_by_a_crash_is_handled_after_restart() {
    let redis = RedisServer::start();
    redis.cmd::<()>(&["SET", "graph_data:dance", "v"]);
    // First run: a policy that never finishes a deploy hook (it spins; its
    // budgets are made huge so nothing stops it before the kill).
    let stuck = Setup::new(&["hostile"]).config(
        "[policies.hostile]\nconfig = { on_deploy = \"spin\" }\nbudgets = { fuel = 1000000000000000, wall_time = 600000 }",
    );
    let daemon = Daemon::start(&redis, &stuck);
    deploy(&redis, &["--service", "catalog", "--tag", "genre=dance"]);
    daemon.wait_for("deploy hook", Duration::from_secs(20));
    assert_eq!(pending(&redis), 1, "read but not acknowledged");
    daemon.kill();
    assert!(redis.exists("graph_data:dance"));

    // Second run, same consumer name: the pending hook is handled and acked.
    let good = Setup::new(&["genre-invalidation"]);
    let daemon = Daemon::start(&redis, &good);
    eventually(&daemon, "the hook is handled", || !redis.exists("graph_data:dance"));
    eventually(&daemon, "the hook is acknowledged", || pending(&redis) == 0);
    daemon.wait_for("re-handling deploy hooks left unacknowledged", Duration::from_secs(20));
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn malformed_hooks_are_dead_lettered_and_the_next_one_is_handled() {
    let redis = RedisServer::start();
    redis.cmd::<()>(&["SET", "graph_data:pop", "v"]);
    let setup = Setup::new(&["genre-invalidation"]);
    let daemon = Daemon::start(&redis, &setup);
    redis.cmd::<String>(&["XADD", "cachepol:deploys", "*", "files", "[\"app.py\"]"]);
    redis.cmd::<String>(&["XADD", "cachepol:deploys", "*", "service", "web", "files", "app.py"]);
    redis.cmd::<String>(&["XADD", "cachepol:deploys", "*", "service", "web", "tags", "{\"genre\": 7}"]);
    deploy(&redis, &["--service", "catalog", "--tag", "genre=pop"]);
    eventually(&daemon, "the good hook is handled", || !redis.exists("graph_data:pop"));
    eventually(&daemon, "three dead letters", || dead_letters(&redis).len() == 3);
    let reasons = dead_letters(&redis).join("\n");
    assert!(reasons.contains("missing field `service`"), "{reasons}");
    assert!(reasons.contains("`files` must be a JSON list"), "{reasons}");
    assert!(reasons.contains("`tags` must be a JSON object"), "{reasons}");
    // Each hook is acknowledged right after its dead letter (or its
    // handling) is written.
    eventually(&daemon, "dead-lettered and handled hooks are acknowledged", || pending(&redis) == 0);
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_hook_that_keeps_failing_is_dead_lettered_with_the_error() {
    let redis = RedisServer::start();
    let setup = Setup::new(&["hostile"])
        .config("[deploy]\nmax_attempts = 2\n[policies.hostile]\nconfig = { on_deploy = \"panic\" }");
    let daemon = Daemon::start(&redis, &setup);
    deploy(&redis, &["--service", "web"]);
    eventually(&daemon, "dead-lettered after two attempts", || dead_letters(&redis).len() == 1);
    let reason = dead_letters(&redis).join("");
    assert!(reason.contains("failed 2 times") && reason.contains("panics on purpose"), "{reason}");
    eventually(&daemon, "the dead-lettered hook is acknowledged", || pending(&redis) == 0);
    assert_eq!(daemon.stop(), Some(0));
}
