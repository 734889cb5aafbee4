//! `cachepol acl` on real Redis: the daemon runs as the user it describes,
//! the policies work, and Redis itself refuses anything else.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{self, Daemon, RedisServer, Setup, TempDir, deploy, eventually, http};

#[test]
fn the_daemon_runs_as_the_acl_user_and_redis_refuses_the_rest() {
    let redis = RedisServer::start();
    // The user may read notify-keyspace-events, not set it.
    redis.cmd::<()>(&["CONFIG", "SET", "notify-keyspace-events", "KEA"]);
    for key in ["graph_data:dance", "service_playlist:dance:web", "graph_data:rock", "secret:password"] {
        redis.cmd::<()>(&["SET", key, "v"]);
    }
    // The recorder takes and releases a lock on each hook: the release is a
    // script, and Redis checks the commands scripts run against the rule.
    // It also reads many keys in one `MGET` (the SDK's `mget_json`).
    redis.cmd::<()>(&["SET", "rec:a", r#"{"count": 3}"#]);
    let setup = Setup::new(&["genre-invalidation", "ttl-table", "recorder"])
        .config("[policies.recorder]\nconfig = { lock = true, sum_json = [\"rec:a\", \"rec:b\"] }");
    let url = format!("redis://cachepol:s3cret@127.0.0.1:{}", redis.port);
    // Every argument of `run` that decides what is loaded is accepted.
    let cache = TempDir::new("acl-cache");
    let out = support::acl(&url, &setup, &["--cache-dir".as_ref(), cache.path().as_os_str()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(line.starts_with("ACL SETUSER cachepol reset on >s3cret "), "{line}");
    assert!(std::fs::read_dir(cache.path()).unwrap().next().is_some(), "compiled through the cache dir");
    assert!(line.contains(" %W~graph_data:* ") && line.contains(" ~job:* "), "{line}");

    // Applied the way an operator would: through redis-cli.
    let mut cli = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("redis-cli");
    cli.stdin.take().unwrap().write_all(line.as_bytes()).unwrap();
    let applied = cli.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&applied.stdout).trim(), "OK");

    let daemon = Daemon::spawn_url(&url, &setup, &[], "info,cachepol=debug");
    daemon.wait_for("cachepol ready", Duration::from_secs(60));
    deploy(&redis, &["--service", "catalog", "--tag", "genre=dance"]);
    eventually(&daemon, "dance's keys deleted as the ACL user", || {
        !redis.exists("graph_data:dance") && !redis.exists("service_playlist:dance:web")
    });
    eventually(&daemon, "a lock taken and released as the ACL user", || {
        redis.cmd::<Option<String>>(&["GET", "recorder:recorder:released"]).as_deref() == Some("1")
    });
    assert_eq!(redis.cmd::<Option<String>>(&["GET", "recorder:recorder:sum"]).as_deref(), Some("3 1"), "MGET allowed");
    redis.cmd::<()>(&["SET", "job:7", "queued"]);
    eventually(&daemon, "ttl-table's EXPIRE allowed", || redis.cmd::<i64>(&["TTL", "job:7"]) > 0);
    // Sweep requests and /status's view of Redis work as the ACL user too.
    let (asked, text) = support::cli(&redis, &["sweep", "ttl-table"]);
    assert!(asked, "{text}");
    daemon.wait_for("sweep requested by the operator: run, and recorded", Duration::from_secs(10));
    let (code, status) = http(&daemon.admin(), "GET", "/status", &[], b"");
    assert_eq!(code, 200, "{status}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert!(status["redis"]["error"].is_null() && status["redis"]["version"].is_string(), "{status}");
    assert!(!daemon.log_text().to_lowercase().contains("noperm"), "{}", daemon.log_text());

    // Anything else is Redis's own refusal.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let refused = [
        ("GET", vec!["secret:password"]),
        ("UNLINK", vec!["secret:password"]),
        ("FLUSHALL", vec![]),
        ("KEYS", vec!["*"]),
        ("DEL", vec!["graph_data:rock"]),
        ("CONFIG", vec!["SET", "notify-keyspace-events", ""]),
    ];
    for (command, args) in refused {
        let err = redis::cmd(command).arg(&args).query::<redis::Value>(&mut conn).unwrap_err();
        assert!(err.to_string().to_lowercase().contains("noperm"), "{command}: {err}");
    }
    assert!(redis.exists("graph_data:rock") && redis.exists("secret:password"));
    assert_eq!(daemon.stop(), Some(0));
}
