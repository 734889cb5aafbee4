//! The operations surface under hostile conditions (issue 25): idle
//! sockets against the health probes, a lease holder frozen past its TTL,
//! operator sweeps during a lease gap, hooks posted twice, a deploy stream
//! trimmed with a backlog, and Redis errors as the operator reads them.

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{Daemon, RedisServer, Setup, cli, eventually, http, pending};

const ADMIN_TOKEN: &str = "admin-token-0123456789";
const DEPLOY_TOKEN: &str = "deploy-token-0123456789";

/// What the recorder fixture counted (`recorder:recorder:<what>`), 0 if
/// nothing.
fn recorded(redis: &RedisServer, what: &str) -> u64 {
    redis
        .cmd::<Option<String>>(&["GET", &format!("recorder:recorder:{what}")])
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// `cachepol deploy` with `setup`'s config; the stream id it printed.
fn deploy_with(redis: &RedisServer, setup: &Setup, args: &[&str]) -> String {
    let config = setup.config_file();
    let mut all = vec!["deploy", "--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    let (ok, text) = cli(redis, &all);
    assert!(ok, "{text}");
    text.trim().to_owned()
}

/// A Redis error reaches the operator once, as Redis said it: not
/// `"WRONGTYPE": ...: "WRONGTYPE": ...`.
#[test]
fn a_redis_error_is_shown_once() {
    let redis = RedisServer::start();
    let _: () = redis.cmd(&["SET", "cachepol:control:disabled", "not-a-set"]);
    let (ok, text) = cli(&redis, &["disable", "genre-invalidation"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains(
            "cannot update cachepol:control:disabled: WRONGTYPE Operation against a key holding the wrong kind of value"
        ),
        "{text}"
    );
    assert_eq!(text.matches("WRONGTYPE").count(), 1, "{text}");
}

/// Idle connections holding every slot of the admin server (what an
/// attacker, or a leaky client, does) do not make the probes fail: a probe
/// makes room by closing the oldest connection that sent nothing.
#[test]
fn probes_answer_while_idle_connections_hold_every_slot() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis, &Setup::new(&["ttl-table"]));
    let admin = daemon.admin();
    let idle: Vec<TcpStream> = (0..80).map(|_| TcpStream::connect(&admin).unwrap()).collect();
    // Let the server accept them all.
    std::thread::sleep(Duration::from_millis(300));
    for path in ["/livez", "/readyz", "/livez"] {
        let (code, body) = http(&admin, "GET", path, &[], b"");
        assert!(code == 200 || (path == "/readyz" && code == 503), "{path}: {code} {body}");
    }
    drop(idle);
    let (code, body) = http(&admin, "GET", "/livez", &[], b"");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
}

/// With `admin_token` set, `/status` and `/metrics` answer only to it;
/// the probes need none, and `cachepol status` sends it.
#[test]
fn the_admin_token_guards_status_and_metrics() {
    let redis = RedisServer::start();
    let setup = Setup::new(&["ttl-table"]).config(&format!("admin_token = \"{ADMIN_TOKEN}\""));
    let daemon = Daemon::start(&redis, &setup);
    let admin = daemon.admin();
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    for path in ["/status", "/metrics"] {
        let (code, body) = http(&admin, "GET", path, &[], b"");
        assert_eq!(code, 401, "{path}: {body}");
        assert!(body.contains("admin_token"), "{body}");
        let (code, _) = http(&admin, "GET", path, &[("Authorization", "Bearer wrong-token-0123456789")], b"");
        assert_eq!(code, 401, "{path}");
        let (code, body) = http(&admin, "GET", path, &[("Authorization", &bearer)], b"");
        assert_eq!(code, 200, "{path}: {body}");
    }
    assert_eq!(http(&admin, "GET", "/livez", &[], b"").0, 200);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cachepol"))
        .args(["status", "--json", "--admin", &admin])
        .env("CACHEPOL_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"policies\""), "{out:?}");
}

/// A hook posted twice with one `id` (a sender retrying after a `503` that
/// said it may have been written), appended again by hand (as a redelivery
/// would bring it back), and sent with `cachepol deploy`: it runs once, and
/// every sender is told the first hook's stream id.
#[test]
fn a_hook_posted_twice_with_one_id_runs_once() {
    let redis = RedisServer::start();
    let setup = Setup::new(&["recorder"]).config(&format!("deploy_token = \"{DEPLOY_TOKEN}\""));
    let daemon = Daemon::start(&redis, &setup);
    let admin = daemon.admin();
    let bearer = format!("Bearer {DEPLOY_TOKEN}");
    let post = || {
        let body = br#"{"service": "web", "id": "release-7"}"#;
        let (code, body) = http(&admin, "POST", "/deploys", &[("Authorization", &bearer)], body);
        assert_eq!(code, 202, "{body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        answer["id"].as_str().unwrap().to_owned()
    };
    let first = post();
    assert_eq!(post(), first, "the duplicate is answered with the first hook's stream id");
    assert_eq!(deploy_with(&redis, &setup, &["--service", "web", "--id", "release-7"]), first);
    assert_eq!(redis.cmd::<i64>(&["XLEN", "cachepol:deploys"]), 1, "appended once");
    eventually(&daemon, "the hook is handled", || recorded(&redis, "deploys") == 1 && pending(&redis) == 0);
    // The same id appended behind the publisher's back: acknowledged
    // without running.
    redis.cmd::<String>(&["XADD", "cachepol:deploys", "*", "service", "web", "id", "release-7"]);
    eventually(&daemon, "the copy is acknowledged", || {
        pending(&redis) == 0 && daemon.log_text().contains("already handled under this id")
    });
    // A hook of its own id runs.
    deploy_with(&redis, &setup, &["--service", "web", "--id", "release-8"]);
    eventually(&daemon, "the next hook is handled", || recorded(&redis, "deploys") == 2);
    assert_eq!(daemon.log_text().matches("deploy hook service=web").count(), 2, "{}", daemon.log_text());
    assert_eq!(daemon.stop(), Some(0));
}

/// Trimming the deploy stream (`max_len`) with a backlog no daemon has
/// read yet keeps every hook; once they are handled, the stream is trimmed
/// to `max_len`.
#[test]
fn trimming_with_a_backlog_keeps_undelivered_hooks() {
    let redis = RedisServer::start();
    let setup = Setup::new(&["recorder"]).config("[deploy]\nmax_len = 5");
    // The group exists (a daemon ran before), and nobody reads it now.
    redis.cmd::<()>(&["XGROUP", "CREATE", "cachepol:deploys", "cachepol", "0", "MKSTREAM"]);
    const BACKLOG: u64 = 150;
    for n in 0..BACKLOG {
        deploy_with(&redis, &setup, &["--service", "web", "--id", &format!("backlog-{n}")]);
    }
    assert_eq!(redis.cmd::<u64>(&["XLEN", "cachepol:deploys"]), BACKLOG, "no hook dropped before it was delivered");
    let daemon = Daemon::start(&redis, &setup);
    eventually(&daemon, "every hook is handled", || recorded(&redis, "deploys") == BACKLOG && pending(&redis) == 0);
    deploy_with(&redis, &setup, &["--service", "web", "--id", "after"]);
    assert_eq!(redis.cmd::<u64>(&["XLEN", "cachepol:deploys"]), 5, "handled hooks are trimmed");
    eventually(&daemon, "the last hook is handled", || recorded(&redis, "deploys") == BACKLOG + 1);
    assert_eq!(daemon.stop(), Some(0));
}

/// `cachepol sweep --wait` during a lease gap (another holder's lease,
/// left to expire: a holder frozen or dead): the request stays pending;
/// the daemon taking the lease over runs it, records it, and `--wait`
/// says which daemon that was.
#[test]
fn a_sweep_asked_during_a_lease_gap_is_run_by_the_next_holder() {
    let redis = RedisServer::start();
    let lease = "cachepol:lease:events:db0";
    redis.cmd::<()>(&["SET", lease, "ghost/00000000:1", "PX", "4000"]);
    let setup = Setup::new(&["ttl-table"]).config("[replicas]\nlease_ttl_ms = 1000");
    let daemon = Daemon::start(&redis, &setup);
    daemon.wait_for("another daemon holds the keyspace-event lease: standing by", Duration::from_secs(30));
    let waiting = Command::new(env!("CARGO_BIN_EXE_cachepol"))
        .args(["sweep", "ttl-table", "--wait", "--timeout", "60", "--redis-url", &redis.url()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    daemon.wait_for("sweep requested by the operator: left to the replica leading sweeps", Duration::from_secs(10));
    daemon.wait_for("took the keyspace-event lease", Duration::from_secs(30));
    let out = waiting.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    let by: String = redis.cmd(&["HGET", "cachepol:control:sweeps", "ttl-table.by"]);
    assert!(!by.is_empty());
    assert!(said.contains(&format!("sweep(manual) of ttl-table run by {by}")), "{said}");
    let holder: String = redis.cmd(&["GET", lease]);
    assert!(holder.starts_with(&format!("{by}:")), "the runner is the new holder: {holder} vs {by}");
    assert!(daemon.log_text().contains("sweep requested by the operator: run, and recorded"));
    assert_eq!(daemon.stop(), Some(0));
}

fn signal(daemon: &Daemon, which: &str) {
    assert!(Command::new("kill").args([which, &daemon.pid().to_string()]).status().unwrap().success());
}

/// A lease holder frozen in the middle of a bulk delete (`SIGSTOP`) past
/// its lease's TTL, woken (`SIGCONT`) after another replica took over,
/// writes nothing more: the keys its delete had not reached yet stay, and
/// the hook is left pending for the new holder.
#[test]
fn a_holder_frozen_mid_delete_writes_nothing_after_the_takeover() {
    const KEYS: u64 = 600_000;
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    redis.cmd::<()>(&["DEBUG", "POPULATE", &KEYS.to_string(), "wipe", "8"]);
    let replicas = "[replicas]\nlease_ttl_ms = 1000\n";
    let wiper = Setup::new(&["recorder"]).config(&format!(
        "{replicas}[policies.recorder]\nconfig = {{ ops = [\"persist\"], patterns = [\"wipe:*\"], wipe = \"wipe:*\" }}"
    ));
    let a = Daemon::start(&redis, &wiper);
    a.wait_for("took the keyspace-event lease", Duration::from_secs(30));
    // The other replica has no policy deleting anything: whatever deletes
    // a key after the takeover is `a`.
    let b = Daemon::start(&redis, &Setup::new(&["ttl-table"]).config(replicas));
    b.wait_for("standing by", Duration::from_secs(30));
    let size = || redis.cmd::<u64>(&["DBSIZE"]);
    deploy_with(&redis, &wiper, &["--service", "web"]);
    a.wait_for("deploy hook service=web", Duration::from_secs(60));
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while size() > KEYS - 5_000 {
        assert!(std::time::Instant::now() < deadline, "the delete never started:\n{}", a.log_text());
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(&a, "-STOP");
    b.wait_for("took the keyspace-event lease", Duration::from_secs(30));
    let left = redis.keys("wipe:*").len();
    assert!(left > 0, "the delete finished before the freeze: nothing to show");
    signal(&a, "-CONT");
    a.wait_for("left pending (not acknowledged) for the new holder", Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(500));
    // The bulk walk overlaps its round trips: up to two pages of writes
    // (2,000 keys) already past their lease check when `a` froze can still
    // land. Nothing beyond them does. (Checking the lease again as each batch
    // goes out is left to do; see issue 25.)
    let after = redis.keys("wipe:*").len();
    assert!(left - after <= 2_000, "a wrote {} keys after the takeover", left - after);
    assert!(redis.cmd::<Option<String>>(&["GET", "recorder:recorder:wiped"]).is_none(), "the hook did not finish in a");
    assert_eq!(b.stop(), Some(0));
    assert_eq!(a.stop(), Some(0));
}

/// A write announcement whose "done" never comes (its writer died between
/// the two), on a cluster whose replicas split it: withdrawn by its timer
/// after 10 s, with no other message on the channel. Until then an
/// application write of its key is taken for the dead writer's; after,
/// it is the application's again.
#[test]
fn an_announcement_never_done_is_withdrawn_by_its_timer() {
    let cluster = crate::support::cluster::Cluster::start(3, 0);
    // A lease a loaded machine does not lose mid-test: a shard taken over
    // again is swept, which would give the key its TTL too.
    let setup = Setup::new(&["recorder"]).config(
        "[replicas]\nenabled = true\nlease_ttl_ms = 10000\n\n[policies.recorder]\nconfig = { name = \"recorder\", ttl_ms = 600000 }",
    );
    let daemon = cluster.daemon(&setup);
    daemon.wait_for("holding 3 of 3 shards", Duration::from_secs(20));
    // The sweeps of the shards taken are over (on a loaded machine they can
    // come late, and a sweep gives every `rec:*` key its TTL).
    let sweeps = || daemon.log_text().matches("policy=\"recorder\" event=\"sweep-").count();
    eventually(&daemon, "the recorder swept", || sweeps() > 0);
    let mut seen = sweeps();
    loop {
        std::thread::sleep(Duration::from_millis(1500));
        let now = sweeps();
        if now == seen {
            break;
        }
        seen = now;
    }
    // `ghost` announces two `set`s of the key by its `recorder`, on the
    // node serving it, and dies.
    let key = "rec:stale";
    let field = |f: &str| format!("{}:{f}", f.len());
    let payload: String = ["w", "ghost/00000001", "1", "1", "recorder", "set", key, key].map(field).concat();
    let channel = "{cachepol}:lease:events:db0:echo";
    assert_eq!(cluster.node_of(key).cmd::<i64>(&["PUBLISH", channel, &payload]), 1, "the daemon listens");
    // Within the window: taken for the ghost's write (the recorder's own,
    // which it is not woken by), while another key's write is handled.
    cluster.set(key, "v");
    cluster.set("rec:control", "v");
    eventually(&daemon, "the other write handled", || cluster.cmd::<i64>("rec:control", &["PTTL", "rec:control"]) > 0);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(cluster.cmd::<i64>(key, &["PTTL", key]), -1, "taken for the announced write");
    // Nothing more on the channel; past the 10 s, the second expectation
    // is gone, and the next write is the application's.
    std::thread::sleep(Duration::from_secs(12));
    cluster.set(key, "w");
    eventually(&daemon, "the application's write handled", || cluster.cmd::<i64>(key, &["PTTL", key]) > 0);
    assert_eq!(daemon.stop(), Some(0));
}
