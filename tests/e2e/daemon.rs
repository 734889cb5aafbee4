//! The daemon with genre-invalidation on real Redis, start-up checks and
//! shutdown.

use std::time::Duration;

use crate::support::{Daemon, RedisServer, Setup, deploy, eventually};

fn seed(redis: &RedisServer) {
    for key in [
        "graph_data:dance",
        "playlist_data:dance",
        "header_art:dance",
        "service_playlist:dance:web",
        "service_playlist:dance:ios",
        "graph_data:rock",
        "playlist_data:rock",
        "service_playlist:rock:web",
        "service_playlist:dancehall:web",
        "unrelated",
    ] {
        redis.cmd::<()>(&["SET", key, "v"]);
    }
}

#[test]
fn a_deploy_hook_deletes_exactly_that_genres_keys() {
    let redis = RedisServer::start();
    seed(&redis);
    let setup = Setup::new(&["genre-invalidation"]);
    let daemon = Daemon::start(&redis, &setup);
    deploy(&redis, &["--service", "catalog", "--tag", "genre=dance"]);
    eventually(&daemon, "dance's keys deleted", || {
        redis.keys("*dance:*").is_empty() && !redis.exists("graph_data:dance")
    });
    let mut left = redis.keys("*");
    // The daemon's keys, and the policy's own (its trigger ledger).
    left.retain(|k| !k.starts_with("cachepol"));
    assert_eq!(
        left,
        [
            "graph_data:rock",
            "playlist_data:rock",
            "service_playlist:dancehall:web",
            "service_playlist:rock:web",
            "unrelated"
        ]
    );
    // The audit line counts the deletions (it may trail them slightly: the
    // log has a writer thread of its own).
    daemon.wait_for("did: 5 deleted", Duration::from_secs(20));
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_write_to_last_updated_deletes_that_genres_keys() {
    let redis = RedisServer::start();
    seed(&redis);
    let setup = Setup::new(&["genre-invalidation"]);
    let daemon = Daemon::start(&redis, &setup);
    redis.cmd::<()>(&["SET", "last_updated:rock", "1700000000"]);
    let rock = || redis.keys("*rock*").into_iter().filter(|k| !k.starts_with("cachepol")).collect::<Vec<_>>();
    eventually(&daemon, "rock's keys deleted", || rock() == ["last_updated:rock"]);
    assert!(redis.exists("graph_data:dance"));
    let left = redis.keys("*").into_iter().filter(|k| !k.starts_with("cachepol")).count();
    assert_eq!(left, 8, "only rock's three keys went");
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn missing_notification_flags_stop_start_up_naming_them() {
    let redis = RedisServer::start();
    let setup = Setup::new(&["genre-invalidation"]);
    let daemon = Daemon::spawn(&redis, &setup, &[]);
    let (code, text) = daemon.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("notify-keyspace-events is `` but the loaded policies need `E$`"), "{text}");
    assert!(text.contains("CONFIG SET notify-keyspace-events E$"), "{text}");
    assert!(text.contains("--configure-notifications"), "{text}");
    let flags: Vec<String> = redis.cmd(&["CONFIG", "GET", "notify-keyspace-events"]);
    assert_eq!(flags[1], "", "nothing was changed without permission");
}

#[test]
fn configure_notifications_adds_flags_without_removing_any() {
    let redis = RedisServer::start();
    redis.cmd::<()>(&["CONFIG", "SET", "notify-keyspace-events", "Kl"]);
    let setup = Setup::new(&["genre-invalidation"]);
    let daemon = Daemon::start(&redis, &setup);
    let flags: Vec<String> = redis.cmd(&["CONFIG", "GET", "notify-keyspace-events"]);
    // (`A` is every class: what the key index asks for.)
    let classes = if flags[1].contains('A') { "g$lshzxetd" } else { "" };
    for flag in ['K', 'E', 'l', '$'] {
        assert!(flags[1].contains(flag) || classes.contains(flag), "{flag} missing from {:?}", flags[1]);
    }
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_broken_policy_file_is_skipped_and_the_others_run() {
    let redis = RedisServer::start();
    seed(&redis);
    let setup = Setup::new(&["genre-invalidation"]);
    std::fs::write(setup.policies().join("broken.wasm"), b"\0asm\x01\0\0\0").unwrap();
    let daemon = Daemon::start(&redis, &setup);
    let log = daemon.log_text();
    assert!(log.contains("policy rejected") && log.contains("core WebAssembly module"), "{log}");
    redis.cmd::<()>(&["SET", "last_updated:dance", "x"]);
    eventually(&daemon, "the good policy still works", || !redis.exists("graph_data:dance"));
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn dry_run_logs_what_it_would_do_and_deletes_nothing() {
    let redis = RedisServer::start();
    seed(&redis);
    let setup = Setup::new(&["genre-invalidation"]).config("[policies.genre-invalidation]\nmode = \"dry-run\"");
    let daemon = Daemon::start(&redis, &setup);
    redis.cmd::<()>(&["SET", "last_updated:dance", "x"]);
    daemon.wait_for("would have: 5 deleted", Duration::from_secs(20));
    assert!(daemon.log_text().contains("would delete-matching service_playlist:dance:*"));
    assert!(redis.exists("graph_data:dance") && redis.exists("service_playlist:dance:web"));
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn an_invalid_config_file_is_an_error_with_its_line() {
    let redis = RedisServer::start();
    let setup = Setup::new(&["genre-invalidation"]).config("hop_limit = 2\nqueue_capacty = 5");
    let daemon = Daemon::spawn(&redis, &setup, &[]);
    let (code, text) = daemon.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("line 2") && text.contains("queue_capacty"), "{text}");
}

#[test]
fn a_policy_whose_lanes_do_not_fit_the_instance_pool_is_refused_and_the_others_run() {
    let redis = RedisServer::start();
    seed(&redis);
    let setup =
        Setup::new(&["ttl-table", "genre-invalidation"]).config("instance_pool = 20\n[policies.ttl-table]\nlanes = 32");
    let daemon = Daemon::start(&redis, &setup);
    let log = daemon.log_text();
    assert!(
        log.contains("needs 32 lanes, but the instance pool has") && log.contains("slots free"),
        "refused at load with what to change, not failing later: {log}"
    );
    redis.cmd::<()>(&["SET", "last_updated:dance", "x"]);
    eventually(&daemon, "the policy that fits works", || !redis.exists("graph_data:dance"));
    assert_eq!(daemon.stop(), Some(0));
}
