//! The bundled ttl-table, file-cache-clear and key-naming policies in the
//! daemon on real Redis: each runbook case, ending in the key state a team
//! would check by hand. (genre-invalidation has its own, in `daemon.rs`.)

use std::time::Duration;

use crate::support::{Daemon, RedisServer, Setup, deploy, eventually, workspace};

fn pttl(redis: &RedisServer, key: &str) -> i64 {
    redis.cmd(&["PTTL", key])
}

#[test]
fn ttl_table_gives_table_ttls_clamps_locks_and_fixes_keys_from_before_start() {
    let redis = RedisServer::start();
    // Written while no daemon was running: only the start sweep sees them.
    redis.cmd::<()>(&["SET", "graph_data:old", "g"]);
    redis.cmd::<()>(&["SET", "lock:stuck", "worker-9"]);
    redis.cmd::<()>(&["SET", "user:7", "not in the table"]);
    // Bound: dropping the setup deletes the policies directory (and so unloads the policy).
    // The scan path: with the key index, the sweep may walk it instead
    // (`index.rs` tests that).
    let setup = Setup::new(&["ttl-table"]).config("[index]\nenabled = false");
    redis.cmd::<()>(&["CONFIG", "RESETSTAT"]);
    let daemon = Daemon::start(&redis, &setup);
    eventually(&daemon, "the start sweep set TTLs", || {
        (3_590_000..=3_600_000).contains(&pttl(&redis, "graph_data:old")) && pttl(&redis, "lock:stuck") > 0
    });
    assert!(pttl(&redis, "lock:stuck") <= 300_000);
    assert_eq!(redis.scan_calls(), 1, "one SCAN pass for the whole ten-row table (three keys fit one page)");

    redis.cmd::<()>(&["SET", "playlist_data:dance", "p"]);
    redis.cmd::<()>(&["SET", "lock:import", "worker-1", "EX", "86400"]);
    redis.cmd::<()>(&["SET", "job:42", "queued", "EX", "10"]);
    eventually(&daemon, "writes got their row's TTL", || {
        (1_790_000..=1_800_000).contains(&pttl(&redis, "playlist_data:dance"))
            && (1..=300_000).contains(&pttl(&redis, "lock:import"))
    });
    assert!(pttl(&redis, "job:42") <= 10_000, "a TTL the app chose is kept");
    assert_eq!(pttl(&redis, "user:7"), -1, "keys outside the table are left alone");
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn file_cache_clear_waits_for_the_edit_lock_and_survives_a_restart() {
    let redis = RedisServer::start();
    for key in ["quiz:1", "quiz:2024:7", "api:users", "quizzes_legacy"] {
        redis.cmd::<()>(&["SET", key, "v"]);
    }
    redis.cmd::<()>(&["SET", "lock:file:quiz_generator.py", "editor-7"]);
    let setup = Setup::new(&["file-cache-clear"]);
    let daemon = Daemon::start(&redis, &setup);
    deploy(&redis, &["--service", "quiz", "--file", "src/quiz_generator.py", "--file", "app.py"]);
    eventually(&daemon, "app.py's keys cleared", || !redis.exists("api:users"));
    let deferral = "cachepol-state:file-cache-clear:deferred:lock:file:quiz_generator.py";
    eventually(&daemon, "quiz's clear deferred", || redis.exists(deferral));
    assert!(redis.exists("quiz:1"), "the clear waits while the file is being edited");

    // The daemon goes away; the editor finishes meanwhile.
    assert_eq!(daemon.stop(), Some(0));
    redis.cmd::<()>(&["DEL", "lock:file:quiz_generator.py"]);
    let daemon = Daemon::start(&redis, &setup);
    eventually(&daemon, "the start sweep ran the deferred clear", || redis.keys("quiz:*").is_empty());
    assert!(!redis.exists(deferral));
    assert!(redis.exists("quizzes_legacy"), "quiz:* does not match quizzes_legacy");

    // And while running: an expiring lock releases the clear too.
    redis.cmd::<()>(&["SET", "quiz:3", "v"]);
    redis.cmd::<()>(&["SET", "lock:file:quiz_generator.py", "editor-8", "PX", "3000"]);
    deploy(&redis, &["--service", "quiz", "--file", "quiz_generator.py"]);
    eventually(&daemon, "deferred again", || redis.exists(deferral));
    eventually(&daemon, "cleared once the lock expired", || !redis.exists("quiz:3") && !redis.exists(deferral));
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn state_kept_under_cachepol_by_the_previous_version_is_moved_once_and_acted_on() {
    let redis = RedisServer::start();
    redis.cmd::<()>(&["SET", "quiz:1", "v"]);
    // What the previous version left: a clear deferred while the file was
    // edited (the editor finished while no daemon ran), and a marker.
    let old = "cachepol:file-cache-clear:deferred:lock:file:quiz_generator.py";
    redis.cmd::<()>(&["SET", old, r#"{"files":["quiz_generator.py"],"patterns":["quiz:*"]}"#, "EX", "86400"]);
    redis.cmd::<()>(&["SET", "cachepol:key-naming:cleaned:bisk", "1"]);
    let setup = Setup::new(&["file-cache-clear", "key-naming"]);
    let daemon = Daemon::start(&redis, &setup);
    eventually(&daemon, "the start sweep ran the deferred clear", || !redis.exists("quiz:1"));
    assert!(redis.keys("cachepol:file-cache-clear:*").is_empty() && redis.keys("cachepol:key-naming:*").is_empty());
    let marker: String = redis.cmd(&["GET", "cachepol-state:key-naming:cleaned:bisk"]);
    assert_eq!(marker, "1", "moved with its value");
    let log = daemon.log_text();
    assert!(log.contains("moved=2"), "{log}");

    // Moved once: a later start does not scan for them again.
    assert_eq!(daemon.stop(), Some(0));
    redis.cmd::<()>(&["SET", "cachepol:key-naming:cleaned:bisk", "9"]);
    let daemon = Daemon::start(&redis, &setup);
    assert!(!daemon.log_text().contains("moving the policies' state"), "{}", daemon.log_text());
    let marker: String = redis.cmd(&["GET", "cachepol-state:key-naming:cleaned:bisk"]);
    assert_eq!(marker, "1");
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn key_naming_clears_old_versions_on_a_bump_and_deletes_stale_writes() {
    let redis = RedisServer::start();
    for key in ["bisk:1:user:7", "bisk:1:enforcer:rules", ":1:enforcer:rules", "bisk:2:user:7", "graph_data:dance"] {
        redis.cmd::<()>(&["SET", key, "v"]);
    }
    let setup = Setup::new(&["key-naming"]).config(
        "[policies.key-naming]\n\
         config = { rules = [{ kind = \"versioned\", prefix = \"bisk\", version = 1, legacy = [\":1:*\"], mode = \"delete\" }] }",
    );
    let daemon = Daemon::start(&redis, &setup);
    eventually(&daemon, "legacy keys cleared at start", || !redis.exists(":1:enforcer:rules"));
    assert!(redis.exists("bisk:1:user:7"), "version 1 is still current");

    deploy(&redis, &["--service", "web", "--tag", "version=2"]);
    eventually(&daemon, "version 1 cleared", || redis.keys("bisk:1:*").is_empty());
    redis.cmd::<()>(&["SET", "bisk:1:user:8", "stale writer"]);
    redis.cmd::<()>(&["SET", "bisk:2:user:8", "current"]);
    eventually(&daemon, "the stale write is deleted", || !redis.exists("bisk:1:user:8"));
    let mut left = redis.keys("*");
    // The daemon's own keys (reserved): the deploy stream, the lease and
    // roll call of the daemons alive (replicas are on by default), the note
    // that old state was moved.
    left.retain(|k| !k.starts_with("cachepol:"));
    assert_eq!(
        left,
        [
            "bisk:2:user:7",
            "bisk:2:user:8",
            "cachepol-state:key-naming:cleaned:bisk",
            "cachepol-state:key-naming:version:bisk",
            "graph_data:dance"
        ]
    );
    daemon
        .wait_for("`bisk:1:user:8` breaks `bisk:<version>:<key>`: version 1 is older than 2", Duration::from_secs(20));
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_policy_built_against_contract_0_1_0_still_loads_and_runs() {
    an_old_build_loads_and_runs("0.1.0");
}

/// 0.2.1 added `mget`: a component built against 0.2.0 imports a subset of
/// it, and links against the host's 0.2.1 as it is.
#[test]
fn a_policy_built_against_contract_0_2_0_still_loads_and_runs() {
    an_old_build_loads_and_runs("0.2.0");
}

fn an_old_build_loads_and_runs(contract: &str) {
    let redis = RedisServer::start();
    redis.cmd::<()>(&["SET", "old:before", "v"]);
    let setup =
        Setup::new(&[]).config("[policies.old]\nconfig = { name = \"old\", patterns = [\"old:*\"], ttl_ms = 60000 }");
    // The recorder fixture as built against that version of the contract.
    let old = workspace().join(format!("tests/fixtures/compat/recorder-{contract}.wasm"));
    std::fs::copy(old, setup.policies().join("old.wasm")).unwrap();
    let daemon = Daemon::start(&redis, &setup);
    // Its start sweep calls that contract's `expire-matching`.
    eventually(&daemon, "the start sweep through 0.1.0's imports", || pttl(&redis, "old:before") > 0);
    redis.cmd::<()>(&["SET", "old:1", "v"]);
    eventually(&daemon, "an event handled", || redis.recorded_events("old") == 1 && pttl(&redis, "old:1") > 0);
    assert!(!daemon.log_text().contains("policy rejected"));
    assert_eq!(daemon.stop(), Some(0));
}

/// The SDK's `mget_json` and `get_json` against Redis: one `MGET`, a list
/// reads as missing (Redis's `MGET` gives nil for it), JSON decoded.
#[test]
fn sdk_json_and_multi_key_reads_on_real_redis() {
    let redis = RedisServer::start();
    redis.cmd::<()>(&["SET", "rec:a", r#"{"count": 2}"#]);
    redis.cmd::<()>(&["SET", "rec:b", r#"{"count": 5}"#]);
    redis.cmd::<i64>(&["RPUSH", "rec:queue", "x"]);
    let setup = Setup::new(&["recorder"]).config(
        r#"[policies.recorder]
config = { sum_json = ["rec:a", "rec:b", "rec:missing", "rec:queue"] }"#,
    );
    let daemon = Daemon::start(&redis, &setup);
    crate::support::deploy(&redis, &["--service", "ci"]);
    // Written one after the other, `first` last.
    eventually(&daemon, "the single read is written", || {
        redis.cmd::<Option<String>>(&["GET", "recorder:recorder:first"]).as_deref() == Some("Some(2)")
    });
    assert_eq!(redis.cmd::<Option<String>>(&["GET", "recorder:recorder:sum"]).as_deref(), Some("7 2"));
    assert_eq!(daemon.stop(), Some(0));
}
