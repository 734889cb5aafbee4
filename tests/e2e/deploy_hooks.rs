//! Deploy hooks are durable: acknowledged only once handled, re-handled
//! after a crash, dead-lettered when malformed or failing.

use std::time::Duration;

use crate::support::{Daemon, RedisServer, Setup, dead_letters, deploy, eventually, pending};

/// A daemon killed mid-hook; another run of it (a new consumer name unless
/// one is configured) handles the hook once and acknowledges it.
fn crash_mid_hook_then_restart(deploy_config: &str, recovered_by: &str) {
    let redis = RedisServer::start();
    redis.cmd::<()>(&["SET", "graph_data:dance", "v"]);
    // First run: a policy that never finishes a deploy hook (it spins; its
    // budgets are made huge so nothing stops it before the kill).
    let stuck = Setup::new(&["hostile"]).config(&format!(
        "[deploy]\n{deploy_config}\n[policies.hostile]\nconfig = {{ on_deploy = \"spin\" }}\nbudgets = {{ fuel = 1000000000000000, wall_time = 600000 }}"
    ));
    let daemon = Daemon::start(&redis, &stuck);
    deploy(&redis, &["--service", "catalog", "--tag", "genre=dance"]);
    // The hook taken (not the start-up line, "reading deploy hooks").
    daemon.wait_for("deploy hook service=", Duration::from_secs(20));
    assert_eq!(pending(&redis), 1, "read but not acknowledged");
    daemon.kill();
    assert!(redis.exists("graph_data:dance"));

    let good = Setup::new(&["genre-invalidation"]).config(&format!("[deploy]\n{deploy_config}"));
    let daemon = Daemon::start(&redis, &good);
    eventually(&daemon, "the hook is handled", || !redis.exists("graph_data:dance"));
    eventually(&daemon, "the hook is acknowledged", || pending(&redis) == 0);
    daemon.wait_for(recovered_by, Duration::from_secs(20));
    assert_eq!(daemon.log_text().matches("deploy hook service=").count(), 1, "handled once:\n{}", daemon.log_text());
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_hook_interrupted_by_a_crash_is_claimed_by_the_next_run() {
    // Consumer names are unique per process: the next run claims the hook
    // once it has been idle (no heartbeat from the dead one) this long.
    crash_mid_hook_then_restart("claim_idle_ms = 1500", "claimed deploy hooks another consumer left pending");
}

#[test]
fn a_hook_interrupted_by_a_crash_is_re_read_under_a_fixed_consumer_name() {
    crash_mid_hook_then_restart("consumer = \"cachepol-a\"", "re-handling deploy hooks left unacknowledged");
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
