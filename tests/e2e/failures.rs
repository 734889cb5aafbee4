//! A policy that keeps failing, and the operator's kill switch, on real
//! Redis: the circuit breaker trips once and holds the policy back, the
//! neighbour keeps working, and nothing is lost (hooks are dead-lettered,
//! missed events are swept).

use std::time::Duration;

use crate::support::{Daemon, RedisServer, Setup, cli, deploy, eventually};

fn dead_letters(redis: &RedisServer) -> String {
    let entries: Vec<(String, Vec<String>)> = redis.cmd(&["XRANGE", "cachepol:deploys:dead", "-", "+"]);
    entries.into_iter().flat_map(|(_, fields)| fields).collect::<Vec<_>>().join(" ")
}

fn hostile_beside_genre(failure: &str) -> Setup {
    Setup::new(&["hostile", "genre-invalidation"]).config(&format!(
        "[deploy]\nmax_attempts = 3\n[policies.hostile]\nconfig = {{ on_deploy = \"panic\" }}\nfailure = {failure}"
    ))
}

#[test]
fn a_quarantined_policy_gets_nothing_and_its_neighbour_goes_on() {
    let redis = RedisServer::start();
    redis.cmd::<()>(&["SET", "graph_data:dance", "v"]);
    let setup = hostile_beside_genre("{ on_failure = \"quarantine\", threshold = 2, cooldown_secs = 600 }");
    let daemon = Daemon::start(&redis, &setup);
    // Delivered to both: hostile panics twice (tripping its breaker), then
    // its third attempt is refused without a call.
    deploy(&redis, &["--service", "catalog", "--tag", "genre=dance"]);
    eventually(&daemon, "the neighbour handled the hook", || !redis.exists("graph_data:dance"));
    eventually(&daemon, "the hook dead-lettered", || {
        dead_letters(&redis).contains("quarantined by its circuit breaker")
    });
    redis.cmd::<()>(&["SET", "hostile:in:a", "v"]);
    deploy(&redis, &["--service", "catalog"]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!redis.exists("hostile:seen:a"), "a quarantined policy gets no events");
    let log = daemon.log_text();
    assert_eq!(log.matches("policy tripped its circuit breaker").count(), 1, "{log}");
    assert_eq!(log.matches("policy degraded").count(), 1, "logged once per state change");
    assert_eq!(log.matches("policy call failed error=guest panicked").count(), 2, "no call after the trip:\n{log}");
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_reload_breaker_recreates_the_policy_and_lets_it_back_after_the_cool_down() {
    let redis = RedisServer::start();
    let setup = hostile_beside_genre("{ on_failure = \"reload\", threshold = 2, cooldown_secs = 1 }");
    let daemon = Daemon::start(&redis, &setup);
    deploy(&redis, &["--service", "catalog"]);
    daemon.wait_for("policy tripped its circuit breaker", Duration::from_secs(20));
    redis.cmd::<()>(&["SET", "hostile:in:during", "v"]);
    std::thread::sleep(Duration::from_millis(200));
    assert!(!redis.exists("hostile:seen:during"), "held back during the cool-down");
    std::thread::sleep(Duration::from_millis(1000));
    redis.cmd::<()>(&["SET", "hostile:in:after", "v"]);
    eventually(&daemon, "handled again after the cool-down", || redis.exists("hostile:seen:after"));
    daemon.wait_for("policy healthy again", Duration::from_secs(20));
    assert!(daemon.log_text().contains("re-creating it"), "{}", daemon.log_text());
    assert_eq!(daemon.stop(), Some(0));
}

fn switch(redis: &RedisServer, verb: &str, name: &str) -> String {
    let (ok, text) = cli(redis, &[verb, name]);
    assert!(ok, "{text}");
    text
}

#[test]
fn the_kill_switch_disables_a_policy_without_losing_what_it_missed() {
    let redis = RedisServer::start();
    for key in ["graph_data:rock", "graph_data:pop", "graph_data:jazz"] {
        redis.cmd::<()>(&["SET", key, "v"]);
    }
    let setup = Setup::new(&["genre-invalidation"]).config("[deploy]\nmax_attempts = 1");
    let daemon = Daemon::start(&redis, &setup);
    assert!(switch(&redis, "disable", "genre-invalidation").contains("genre-invalidation disabled"));
    daemon.wait_for("policy disabled by the operator", Duration::from_secs(10));

    redis.cmd::<()>(&["SET", "last_updated:rock", "now"]);
    deploy(&redis, &["--service", "catalog", "--tag", "genre=pop"]);
    eventually(&daemon, "the hook is parked, not lost", || dead_letters(&redis).contains("disabled by the operator"));
    assert!(redis.exists("graph_data:rock") && redis.exists("graph_data:pop"), "a disabled policy does nothing");

    switch(&redis, "enable", "genre-invalidation");
    daemon.wait_for("policy enabled by the operator", Duration::from_secs(10));
    redis.cmd::<()>(&["SET", "last_updated:jazz", "now"]);
    eventually(&daemon, "working again", || !redis.exists("graph_data:jazz"));
    assert_eq!(daemon.stop(), Some(0));
    // The switch is in Redis: a restart keeps a policy disabled.
    switch(&redis, "disable", "genre-invalidation");
    let daemon = Daemon::start(&redis, &setup);
    daemon.wait_for("policy disabled by the operator", Duration::from_secs(10));
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_sweep_that_keeps_failing_is_retried_and_logged_as_an_error() {
    let redis = RedisServer::start();
    let setup = Setup::new(&["hostile"]).config("[policies.hostile]\nconfig = { fail_sweeps = true }");
    let daemon = Daemon::start(&redis, &setup);
    // The start sweep fails, is tried again 1, 2 and 4 s later; the third
    // failure in a row is an error, with what it means.
    daemon.wait_for("sweep failed; trying again later", Duration::from_secs(10));
    daemon.wait_for("sweep(start) failed 3 times in a row", Duration::from_secs(30));
    let log = daemon.log_text();
    assert!(log.contains("ERROR"), "logged as an error: {log}");
    // The policy still gets its events meanwhile.
    redis.cmd::<()>(&["SET", "hostile:in:a", "v"]);
    eventually(&daemon, "events still delivered", || redis.exists("hostile:seen:a"));
    assert_eq!(daemon.stop(), Some(0));
}
