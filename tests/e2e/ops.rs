//! The operator's commands against a running daemon: dead-letter replay,
//! sweep requests, SIGHUP config reloads, JSON logs.

use std::process::Command;
use std::time::Duration;

use crate::support::{Daemon, RedisServer, Setup, cli, dead_letters, deploy, eventually, http, metric};

#[test]
fn a_hook_dead_lettered_while_its_policy_was_disabled_is_replayed_once_enabled() {
    let redis = RedisServer::start();
    redis.cmd::<()>(&["SET", "graph_data:dance", "v"]);
    let setup = Setup::new(&["genre-invalidation"]);
    let daemon = Daemon::start(&redis, &setup);
    cli(&redis, &["disable", "genre-invalidation"]);
    daemon.wait_for("policy disabled by the operator", Duration::from_secs(10));
    deploy(&redis, &["--service", "catalog", "--tag", "genre=dance", "--id", "release-9"]);
    eventually(&daemon, "the hook is dead-lettered", || dead_letters(&redis).len() == 1);
    assert!(redis.exists("graph_data:dance"), "a disabled policy does nothing");

    let (ok, listed) = cli(&redis, &["dead-letter", "list"]);
    assert!(ok, "{listed}");
    let row = listed.lines().nth(1).unwrap_or_default();
    for expected in ["catalog", "genre-invalidation", "disabled by the operator"] {
        assert!(row.contains(expected), "no {expected:?} in the listing:\n{listed}");
    }
    let attempts = row.split_whitespace().nth(3);
    assert_eq!(attempts, Some("3"), "deploy.max_attempts deliveries:\n{listed}");
    let id = row.split_whitespace().next().unwrap().to_owned();

    cli(&redis, &["enable", "genre-invalidation"]);
    daemon.wait_for("policy enabled by the operator", Duration::from_secs(10));
    let (ok, replayed) = cli(&redis, &["dead-letter", "replay", &id]);
    assert!(ok && replayed.contains(&format!("replayed {id}")), "{replayed}");
    eventually(&daemon, "the replayed hook is handled", || !redis.exists("graph_data:dance"));
    assert!(dead_letters(&redis).is_empty(), "replayed, so no longer a dead letter");
    // The audit line, written as the call ends: the hook kept its id.
    daemon.wait_for("event=\"release-9\"", Duration::from_secs(10));
    let (ok, listed) = cli(&redis, &["dead-letter", "list"]);
    assert!(ok && listed.contains("no dead letters"), "{listed}");

    // Asking for what is not there is an error that says so.
    let (ok, text) = cli(&redis, &["dead-letter", "replay", &id]);
    assert!(!ok && text.contains("no dead letter"), "{text}");
    let (ok, text) = cli(&redis, &["dead-letter", "drop", "1-1"]);
    assert!(!ok && text.contains("no dead letter 1-1"), "{text}");
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_dead_letter_can_be_dropped_and_replay_all_sends_every_one_back() {
    let redis = RedisServer::start();
    let setup = Setup::new(&["hostile"])
        .config("[deploy]\nmax_attempts = 1\n[policies.hostile]\nconfig = { on_deploy = \"panic\" }");
    let daemon = Daemon::start(&redis, &setup);
    for n in 0..3 {
        deploy(&redis, &["--service", &format!("web{n}")]);
    }
    eventually(&daemon, "three dead letters", || dead_letters(&redis).len() == 3);
    let ids: Vec<(String, Vec<String>)> = redis.cmd(&["XRANGE", "cachepol:deploys:dead", "-", "+"]);
    let (ok, text) = cli(&redis, &["dead-letter", "drop", &ids[0].0]);
    assert!(ok, "{text}");
    assert_eq!(dead_letters(&redis).len(), 2);
    let before: i64 = redis.cmd(&["XLEN", "cachepol:deploys"]);
    let (ok, text) = cli(&redis, &["dead-letter", "replay", "--all"]);
    assert!(ok && text.matches("replayed").count() == 2, "{text}");
    // Replayed hooks fail again (the policy still panics) and come back
    // as new dead letters: nothing is lost either way.
    let after: i64 = redis.cmd(&["XLEN", "cachepol:deploys"]);
    assert_eq!(after, before + 2);
    eventually(&daemon, "the replays are dead-lettered again", || {
        dead_letters(&redis).len() == 2 && {
            let ids2: Vec<(String, Vec<String>)> = redis.cmd(&["XRANGE", "cachepol:deploys:dead", "-", "+"]);
            ids2.iter().all(|(id, _)| !ids.iter().any(|(old, _)| old == id))
        }
    });
    // A replay Redis refuses (the target is not a stream) keeps the letter.
    redis.cmd::<()>(&["SET", "not-a-stream", "x"]);
    let (ok, text) = cli(&redis, &["dead-letter", "replay", "--all", "--deploy-stream", "not-a-stream"]);
    assert!(!ok && text.contains("WRONGTYPE"), "{text}");
    assert_eq!(dead_letters(&redis).len(), 2, "a failed replay keeps its dead letter");
    assert_eq!(daemon.stop(), Some(0));
}

/// `cachepol sweep` reaches every daemon running the policy: with replicas
/// (the default) the one holding the lease runs it, once; with replicas off
/// each of them does.
#[test]
fn cachepol_sweep_runs_the_policys_sweep_once_or_in_every_daemon_without_replicas() {
    for (config, sweeps) in [("", [1.0, 0.0]), ("[replicas]\nenabled = false", [1.0, 1.0])] {
        let redis = RedisServer::start();
        let setup = Setup::new(&["ttl-table"]).config(config);
        let first = Daemon::start(&redis, &setup);
        let second = Daemon::start(&redis, &setup);
        // Written with notifications off: only a sweep can find it.
        redis.cmd::<()>(&["CONFIG", "SET", "notify-keyspace-events", ""]);
        redis.cmd::<()>(&["SET", "job:unseen", "v"]);
        redis.cmd::<()>(&["CONFIG", "SET", "notify-keyspace-events", "KEA"]);
        assert_eq!(redis.cmd::<i64>(&["TTL", "job:unseen"]), -1);
        let (ok, text) = cli(&redis, &["sweep", "ttl-table"]);
        assert!(ok && text.contains("sweep(manual) of ttl-table requested"), "{text}");
        let manual = |daemon: &Daemon| {
            let (_, m) = http(&daemon.admin(), "GET", "/metrics", &[], b"");
            metric(&m, "cachepol_sweeps_total{policy=\"ttl-table\",kind=\"manual\"}")
        };
        // The first daemon holds the lease when there is one.
        first.wait_for("sweep requested by the operator", Duration::from_secs(10));
        eventually(&first, "the manual sweep is counted", || manual(&first) == 1.0);
        eventually(&first, "the sweep gave the key its TTL", || redis.cmd::<i64>(&["TTL", "job:unseen"]) > 0);
        eventually(&second, "the second daemon's part", || manual(&second) == sweeps[1]);
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!([manual(&first), manual(&second)], sweeps, "config {config:?}");
        let (ok, text) = cli(&redis, &["sweep", "ttl-table", "--reason", "sideways"]);
        assert!(!ok && text.contains("not a sweep reason"), "{text}");
        assert_eq!(first.stop(), Some(0));
        assert_eq!(second.stop(), Some(0));
    }
}

fn hangup(daemon: &Daemon) {
    assert!(Command::new("kill").args(["-HUP", &daemon.pid().to_string()]).status().unwrap().success());
}

#[test]
fn sighup_applies_a_changed_mode_and_keeps_the_running_config_when_the_file_is_broken() {
    let redis = RedisServer::start();
    let setup = Setup::new(&["genre-invalidation", "ttl-table"]);
    let config = setup.config_file();
    let daemon = Daemon::start(&redis, &setup);
    let mode = |admin: &str| {
        let (_, status) = http(admin, "GET", "/status", &[], b"");
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        let policies = status["policies"].as_array().unwrap().clone();
        let genre = policies.iter().find(|p| p["name"] == "genre-invalidation").unwrap();
        genre["mode"].as_str().unwrap().to_owned()
    };
    let admin = daemon.admin();
    assert_eq!(mode(&admin), "enforce");

    std::fs::write(&config, "[policies.genre-invalidation]\nmode = \"dry-run\"\n").unwrap();
    hangup(&daemon);
    daemon.wait_for("policy reloaded with new settings from the config (dry-run)", Duration::from_secs(20));
    assert_eq!(mode(&admin), "dry-run");
    assert!(
        !daemon.log_text().contains("policy=ttl-table from="),
        "ttl-table's settings did not change:\n{}",
        daemon.log_text()
    );
    redis.cmd::<()>(&["SET", "graph_data:dance", "v"]);
    deploy(&redis, &["--service", "catalog", "--tag", "genre=dance"]);
    daemon.wait_for("would have", Duration::from_secs(20));
    assert!(redis.exists("graph_data:dance"), "dry-run changes nothing");

    // A broken file: refused whole, the running config stays.
    std::fs::write(&config, "[policies.genre-invalidation]\nmode = \"enforce\"\nlanes = 0\n").unwrap();
    hangup(&daemon);
    daemon.wait_for("the config file is invalid; the running config stays", Duration::from_secs(20));
    assert!(daemon.log_text().contains("lanes must be between 1 and"), "says why:\n{}", daemon.log_text());
    assert_eq!(mode(&admin), "dry-run");
    deploy(&redis, &["--service", "catalog", "--tag", "genre=dance"]);
    eventually(&daemon, "the second hook is handled", || daemon.log_text().matches("would have").count() >= 2);
    assert!(redis.exists("graph_data:dance"), "still dry-run");

    // Valid, but the policy refuses its new config: it keeps running with
    // its previous settings, and the log says so.
    std::fs::write(&config, "[policies.genre-invalidation]\nmode = \"enforce\"\nconfig = { keys = [] }\n").unwrap();
    hangup(&daemon);
    daemon.wait_for("these policies keep their previous settings", Duration::from_secs(20));
    assert!(daemon.log_text().contains("`keys` is empty"), "says why:\n{}", daemon.log_text());
    assert_eq!(mode(&admin), "dry-run");

    // A setting only a restart applies is named as such.
    std::fs::write(&config, "hop_limit = 5\n[policies.genre-invalidation]\nmode = \"enforce\"\n").unwrap();
    hangup(&daemon);
    daemon.wait_for("take effect only at the next start", Duration::from_secs(20));
    eventually(&daemon, "enforce again", || mode(&admin) == "enforce");
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn json_logs_are_one_object_per_line_with_span_fields() {
    let redis = RedisServer::start();
    let setup = Setup::new(&["genre-invalidation"]);
    let daemon = Daemon::spawn(&redis, &setup, &["--configure-notifications", "--log-format", "json"]);
    daemon.wait_for("cachepol ready", Duration::from_secs(60));
    redis.cmd::<()>(&["SET", "graph_data:dance", "v"]);
    deploy(&redis, &["--service", "catalog", "--tag", "genre=dance"]);
    eventually(&daemon, "the hook is handled", || !redis.exists("graph_data:dance"));
    daemon.wait_for("deleted", Duration::from_secs(10));
    let text = daemon.log_text();
    let lines: Vec<serde_json::Value> =
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    assert!(lines.iter().all(|l| l["level"].is_string() && l["message"].is_string()), "{text}");
    // The audit line has its counts as fields; what the policy logs during
    // its call carries the call's span (policy, event number, lane).
    assert!(
        lines.iter().any(|l| l["target"] == "cachepol::audit" && l["deleted"].as_u64() == Some(1)),
        "no audit line:\n{text}"
    );
    let from_policy = lines
        .iter()
        .find(|l| l["message"].as_str().is_some_and(|m| m.contains("genre `dance` changed")))
        .unwrap_or_else(|| panic!("no line from the policy:\n{text}"));
    let spans = from_policy["spans"].as_array().unwrap_or_else(|| panic!("no spans: {from_policy}"));
    assert!(spans.iter().any(|s| s["name"] == "event" && s["policy"] == "genre-invalidation"), "{from_policy}");
    assert_eq!(daemon.stop(), Some(0));
}
