//! Faults an operator meets, each against a real `redis-server`: Redis
//! killed in the middle of a bulk delete (durable, so it comes back with
//! part of the work done), Redis restarted empty or flushed (the deploy
//! stream and its group gone), a hook a grant refuses, a policy disabled
//! before the daemon starts, and keys no policy can be handed.

use std::time::{Duration, Instant};

use crate::support::{Daemon, RedisServer, Setup, dead_letters, deploy, eventually, pending};

/// Write `n` keys `<prefix><i>`, a thousand per round trip.
fn fill(redis: &RedisServer, prefix: &str, n: usize) {
    let mut conn = redis.conn();
    for start in (0..n).step_by(1000) {
        let mut mset = redis::cmd("MSET");
        for i in start..(start + 1000).min(n) {
            mset.arg(format!("{prefix}{i}")).arg("v");
        }
        mset.query::<()>(&mut conn).unwrap();
    }
}

fn dbsize(redis: &RedisServer) -> usize {
    redis.cmd::<usize>(&["DBSIZE"])
}

#[test]
fn redis_killed_mid_bulk_delete_leaves_no_matching_key_and_the_hook_acked() {
    // Durable: every write is on disk before it is answered, so the
    // restarted server has the deletions done so far and the rest to do. A
    // SCAN cursor from before the crash means nothing to it.
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    fill(&redis, "quiz:", 300_000);
    fill(&redis, "keep:", 1_000);
    let setup = Setup::new(&["file-cache-clear"]);
    let daemon = Daemon::start(&redis, &setup);
    deploy(&redis, &["--service", "quiz", "--file", "quiz_generator.py"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while dbsize(&redis) > 290_000 {
        assert!(Instant::now() < deadline, "the delete never started:\n{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(1));
    }
    redis.restart();
    let left_after_crash = redis.keys("quiz:*").len();
    assert!(left_after_crash > 0, "the crash came after the delete finished; the test proves nothing");

    eventually(&daemon, "every matching key deleted on the restarted server", || redis.keys("quiz:*").is_empty());
    eventually(&daemon, "the hook acknowledged", || pending(&redis) == 0);
    assert_eq!(redis.keys("keep:*").len(), 1_000, "nothing else touched");
    assert!(dead_letters(&redis).is_empty(), "a Redis restart is no reason to give up on a hook");
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_deploy_stream_lost_to_a_restart_or_flushall_is_created_again() {
    let mut redis = RedisServer::start();
    let setup = Setup::new(&["genre-invalidation"]);
    let daemon = Daemon::start(&redis, &setup);
    // Restarted without persistence: the stream and its group are gone.
    redis.restart();
    a_genre_hook_is_handled_and_acked(&redis, &daemon, "rock");
    // FLUSHALL: the same, on a connection that never broke.
    redis.cmd::<()>(&["FLUSHALL"]);
    a_genre_hook_is_handled_and_acked(&redis, &daemon, "pop");
    assert_eq!(daemon.stop(), Some(0));
}

/// A deploy hook for `genre` deletes its graph and is acknowledged.
fn a_genre_hook_is_handled_and_acked(redis: &RedisServer, daemon: &Daemon, genre: &str) {
    a_genre_hook_is_handled_and_acked_after(redis, daemon, genre, 0);
}

/// The same, with `stuck` other hooks left pending.
fn a_genre_hook_is_handled_and_acked_after(redis: &RedisServer, daemon: &Daemon, genre: &str, stuck: usize) {
    let key = format!("graph_data:{genre}");
    redis.cmd::<()>(&["SET", &key, "v"]);
    deploy(redis, &["--service", "catalog", "--tag", &format!("genre={genre}")]);
    eventually(daemon, &format!("the hook for {genre} is handled"), || !redis.exists(&key));
    eventually(daemon, "and acknowledged", || pending(redis) == stuck);
}

#[test]
fn a_hook_sent_before_the_first_start_is_handled() {
    let redis = RedisServer::start();
    redis.cmd::<()>(&["SET", "graph_data:jazz", "v"]);
    deploy(&redis, &["--service", "catalog", "--tag", "genre=jazz"]);
    let setup = Setup::new(&["genre-invalidation"]);
    let daemon = Daemon::start(&redis, &setup);
    eventually(&daemon, "the early hook is handled", || !redis.exists("graph_data:jazz"));
    eventually(&daemon, "and acknowledged", || pending(&redis) == 0);
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_hook_refused_by_a_grant_is_dead_lettered_at_once_with_a_readable_reason() {
    let redis = RedisServer::start();
    redis.cmd::<()>(&["SET", "header_art:dance", "a"]);
    // The operator's grants leave header art out; the policy deletes it.
    let setup = Setup::new(&["genre-invalidation"]).config(
        r#"[policies.genre-invalidation]
grants = [
    { pattern = "last_updated:*", ops = ["read"] },
    { pattern = "graph_data:*", ops = ["delete"] },
    { pattern = "playlist_data:*", ops = ["delete"] },
    { pattern = "service_playlist:*:*", ops = ["delete"] },
]"#,
    );
    let daemon = Daemon::start(&redis, &setup);
    deploy(&redis, &["--service", "catalog", "--tag", "genre=dance"]);
    eventually(&daemon, "dead-lettered", || dead_letters(&redis).len() == 1);
    let reason = dead_letters(&redis).remove(0);
    assert!(reason.starts_with("refused by a grant (not retried): genre-invalidation: "), "{reason}");
    assert!(reason.contains("denied: del `header_art:dance`: no grant allows delete on this key"), "{reason}");
    assert!(!reason.contains("Denial {"), "shown with Display, not Debug: {reason}");
    eventually(&daemon, "acknowledged", || pending(&redis) == 0);
    let log = daemon.log_text();
    assert!(!log.contains("deploy hook failed"), "a denial is not retried:\n{log}");
    assert!(redis.exists("header_art:dance"));
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_policy_disabled_before_start_does_not_even_sweep() {
    let redis = RedisServer::start();
    redis.cmd::<()>(&["SET", "job:1", "queued"]);
    redis.cmd::<()>(&["SADD", "cachepol:control:disabled", "ttl-table"]);
    let setup = Setup::new(&["ttl-table"]);
    let daemon = Daemon::start(&redis, &setup);
    daemon.wait_for("policy disabled by the operator", Duration::from_secs(20));
    // Its start sweep would have given job:1 a TTL; it is owed instead.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(redis.cmd::<i64>(&["TTL", "job:1"]), -1, "swept while disabled:\n{}", daemon.log_text());
    redis.cmd::<()>(&["SREM", "cachepol:control:disabled", "ttl-table"]);
    eventually(&daemon, "swept once enabled", || redis.cmd::<i64>(&["TTL", "job:1"]) > 0);
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn an_event_for_a_key_no_policy_can_be_given_is_owed_as_a_sweep() {
    let redis = RedisServer::start();
    let setup = Setup::new(&["ttl-table"]);
    let daemon = Daemon::start(&redis, &setup);
    // Not UTF-8: the policy API cannot carry this key, but a sweep reaches
    // it on Redis's side.
    let key = b"job:\xff\xfe".to_vec();
    redis::cmd("SET").arg(&key).arg("v").query::<()>(&mut redis.conn()).unwrap();
    eventually(&daemon, "the binary key gets its TTL from a gap sweep", || {
        redis::cmd("TTL").arg(&key).query::<i64>(&mut redis.conn()).unwrap() > 0
    });
    daemon.wait_for("cannot be delivered", Duration::from_secs(5));
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_dead_letter_redis_refuses_does_not_stop_the_reader() {
    let redis = RedisServer::start();
    // The dead-letter key holds a string: every XADD to it is refused.
    redis.cmd::<()>(&["SET", "cachepol:deploys:dead", "not a stream"]);
    let setup = Setup::new(&["genre-invalidation"]);
    let daemon = Daemon::start(&redis, &setup);
    redis.cmd::<String>(&["XADD", "cachepol:deploys", "*", "files", "[]"]);
    daemon.wait_for("Redis refused the dead letter", Duration::from_secs(20));
    a_genre_hook_is_handled_and_acked_after(&redis, &daemon, "rock", 1);
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_pending_hook_deleted_from_the_stream_is_dead_lettered_not_lost() {
    let redis = RedisServer::start();
    // A daemon takes the hook and dies mid-way.
    let stuck = Setup::new(&["hostile"]).config(
        "[deploy]\nclaim_idle_ms = 1500\n[policies.hostile]\nconfig = { on_deploy = \"spin\" }\nbudgets = { fuel = 1000000000000000, wall_time = 600000 }",
    );
    let daemon = Daemon::start(&redis, &stuck);
    let id = deploy(&redis, &["--service", "catalog", "--tag", "genre=dance"]);
    // The hook taken (not the start-up line, "reading deploy hooks").
    daemon.wait_for("deploy hook service=", Duration::from_secs(20));
    daemon.kill();
    // Trimmed away (here by hand) while still pending.
    redis.cmd::<i64>(&["XDEL", "cachepol:deploys", &id]);
    let setup = Setup::new(&["genre-invalidation"]).config("[deploy]\nclaim_idle_ms = 1500");
    let daemon = Daemon::start(&redis, &setup);
    eventually(&daemon, "the lost hook is dead-lettered", || dead_letters(&redis).len() == 1);
    let reason = dead_letters(&redis).remove(0);
    assert!(reason.contains("deleted from the stream before it was handled"), "{reason}");
    eventually(&daemon, "nothing left pending", || pending(&redis) == 0);
    assert_eq!(daemon.stop(), Some(0));
}

/// A hostile policy misbehaving on every deploy hook, beside genre-invalidation
/// and ttl-table on the same Redis: the healthy ones do their jobs.
fn beside_healthy_policies(on_deploy: &str, expected_in_log: &str) -> String {
    let redis = RedisServer::start();
    redis.cmd::<()>(&["SET", "graph_data:dance", "g"]);
    let setup = Setup::new(&["hostile", "genre-invalidation", "ttl-table"])
        .config(&format!("[policies.hostile]\nconfig = {{ on_deploy = \"{on_deploy}\" }}"));
    let daemon = Daemon::start(&redis, &setup);
    deploy(&redis, &["--service", "catalog", "--tag", "genre=dance"]);
    eventually(&daemon, "genre-invalidation handled the hook", || !redis.exists("graph_data:dance"));
    redis.cmd::<()>(&["SET", "job:1", "queued"]);
    eventually(&daemon, "ttl-table handled a write meanwhile", || redis.cmd::<i64>(&["TTL", "job:1"]) > 0);
    daemon.wait_for(expected_in_log, Duration::from_secs(30));
    let log = daemon.log_text();
    assert_eq!(daemon.stop(), Some(0));
    log
}

#[test]
fn a_hostile_grant_check_pattern_beside_healthy_policies() {
    beside_healthy_policies("grant-bomb", "used up their work allowance");
}

#[test]
fn an_output_flood_beside_healthy_policies_is_truncated() {
    let log = beside_healthy_policies("output-flood", "output truncated");
    let flood = log.lines().filter(|l| l.contains("flood ")).count();
    assert!(flood <= 200, "at most the log budget of the flood reached the log, not 20,000 lines: {flood}");
}
