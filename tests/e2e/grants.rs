//! Grants on real Redis: out-of-grant calls are refused before anything is
//! sent, as `MONITOR` shows.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{Daemon, RedisServer, Setup, deploy};

/// Everything Redis executes while `during` runs, as `MONITOR` lines.
fn monitor(redis: &RedisServer, during: impl FnOnce()) -> String {
    let mut child = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "monitor"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("redis-cli");
    std::thread::sleep(Duration::from_millis(300));
    during();
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let _ = child.wait();
    out
}

#[test]
fn out_of_grant_keys_and_patterns_never_reach_redis() {
    let redis = RedisServer::start();
    redis.cmd::<()>(&["SET", "secret:password", "hunter2"]);
    redis.cmd::<()>(&["SET", "hostile:ok", "v"]);
    let cases = [("escape-del", "UNLINK"), ("star-scan", "SCAN"), ("escape-get", "secret"), ("prefix-trick", "SCAN")];
    for (mode, forbidden) in cases {
        let setup =
            Setup::new(&["hostile"]).config(&format!("[policies.hostile]\nconfig = {{ on_deploy = \"{mode}\" }}"));
        let daemon = Daemon::start(&redis, &setup);
        let seen = monitor(&redis, || {
            deploy(&redis, &["--service", "x"]);
            daemon.wait_for("denied", Duration::from_secs(20));
        });
        let commands: Vec<&str> =
            seen.lines().filter(|l| !l.contains("cachepol:deploys") && !l.contains("\"PING\"")).collect();
        assert!(
            !commands.iter().any(|l| l.contains(forbidden)),
            "{mode}: {forbidden} reached Redis:\n{}",
            commands.join("\n")
        );
        assert!(redis.exists("secret:password") && redis.exists("hostile:ok"), "{mode} changed keys");
        assert_eq!(daemon.stop(), Some(0));
    }
}

#[test]
fn an_operator_can_narrow_grants_but_never_widen_them() {
    let redis = RedisServer::start();
    for key in ["graph_data:dance", "header_art:dance"] {
        redis.cmd::<()>(&["SET", key, "v"]);
    }
    let narrowed = Setup::new(&["genre-invalidation"]).config(
        "[policies.genre-invalidation]\ngrants = [\
         { pattern = \"last_updated:*\", ops = [\"read\"] }, { pattern = \"graph_data:*\", ops = [\"delete\"] }, \
         { pattern = \"service_playlist:*:*\", ops = [\"delete\"] }, { pattern = \"playlist_data:*\", ops = [\"delete\"] }]",
    );
    let daemon = Daemon::start(&redis, &narrowed);
    redis.cmd::<()>(&["SET", "last_updated:dance", "x"]);
    daemon.wait_for("denied", Duration::from_secs(20));
    assert!(redis.exists("header_art:dance"), "outside the narrowed grants");
    assert_eq!(daemon.stop(), Some(0));

    // Widening is a start-up error, not a silently ignored entry.
    let widened = Setup::new(&["genre-invalidation"])
        .config("[policies.genre-invalidation]\ngrants = [{ pattern = \"*\", ops = [\"delete\"] }]");
    let daemon = Daemon::spawn(&redis, &widened, &["--configure-notifications"]);
    let (code, text) = daemon.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("wider than what it asks for") && text.contains("`*` for delete"), "{text}");
    assert!(redis.exists("graph_data:dance"));
}
