//! The admin server against a real daemon and Redis: metrics that move by
//! what policies did, readiness that follows Redis, and the deploy webhook.

use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::support::{Daemon, RedisServer, Setup, dead_letters, eventually, http, metric};

const TOKEN: &str = "test-token-0123456789";

fn auth() -> (&'static str, String) {
    ("Authorization", format!("Bearer {TOKEN}"))
}

fn post_hook(admin: &str, body: &str) -> (u16, String) {
    let (name, value) = auth();
    http(admin, "POST", "/deploys", &[(name, &value), ("Content-Type", "application/json")], body.as_bytes())
}

fn scrape(admin: &str) -> String {
    let (code, text) = http(admin, "GET", "/metrics", &[], b"");
    assert_eq!(code, 200, "{text}");
    text
}

fn stream_len(redis: &RedisServer) -> i64 {
    redis.cmd(&["XLEN", "cachepol:deploys"])
}

#[test]
fn metrics_move_by_what_the_policies_did() {
    let redis = RedisServer::start();
    let setup = Setup::new(&["genre-invalidation", "hostile"])
        .config(&format!("deploy_token = \"{TOKEN}\"\n[policies.hostile]\nconfig = {{ on_deploy = \"escape-del\" }}"));
    let daemon = Daemon::start(&redis, &setup);
    let admin = daemon.admin();
    // The start sweeps have run once every policy reports a call.
    eventually(&daemon, "start sweeps done", || {
        let m = scrape(&admin);
        metric(&m, "cachepol_sweeps_total{policy=\"genre-invalidation\",kind=\"start\"}") == 1.0
            && metric(&m, "cachepol_sweeps_total{policy=\"hostile\",kind=\"start\"}") == 1.0
    });
    let before = scrape(&admin);
    let g = |name: &str, labels: &str| format!("cachepol_{name}{{policy=\"genre-invalidation\"{labels}}}");
    for key in ["graph_data:dance", "playlist_data:dance", "service_playlist:dance:1", "service_playlist:dance:2"] {
        redis.cmd::<()>(&["SET", key, "v"]);
    }
    redis.cmd::<()>(&["SET", "service_playlist:dance:3", "v"]);

    // One hook through the webhook: genre-invalidation clears the genre
    // (three keys by a bulk delete), hostile is denied and dead-lettered.
    let (code, body) = post_hook(&admin, r#"{"service": "catalog", "tags": {"genre": "dance"}}"#);
    assert_eq!(code, 202, "{body}");
    eventually(&daemon, "the genre is cleared", || redis.keys("*dance*").is_empty());
    eventually(&daemon, "hostile's hook is dead-lettered", || dead_letters(&redis).len() == 1);
    // One keyspace event.
    redis.cmd::<()>(&["SET", "last_updated:rock", "1"]);

    let moved = |after: &str, sample: &str| metric(after, sample) - metric(&before, sample);
    // The lag is recorded as the call ends: the event is handled.
    eventually(&daemon, "the event is handled", || moved(&scrape(&admin), &g("event_lag_seconds_count", "")) == 1.0);
    let after = scrape(&admin);
    assert_eq!(moved(&after, &g("events_delivered_total", "")), 1.0, "{after}");
    assert_eq!(moved(&after, &g("bulk_keys_total", ",kind=\"deleted\"")), 3.0, "service_playlist:dance:*\n{after}");
    assert_eq!(moved(&after, &g("calls_total", ",kind=\"ok\"")), 2.0, "the hook and the event\n{after}");
    assert_eq!(moved(&after, "cachepol_denials_total{policy=\"hostile\"}"), 1.0, "{after}");
    assert_eq!(moved(&after, "cachepol_calls_total{policy=\"hostile\",kind=\"denied\"}"), 1.0, "{after}");
    assert_eq!(moved(&after, "cachepol_deploy_hooks_total{outcome=\"dead_lettered\"}"), 1.0, "{after}");
    assert_eq!(moved(&after, "cachepol_denials_total{policy=\"genre-invalidation\"}"), 0.0, "{after}");
    assert!(metric(&after, "cachepol_resident_memory_bytes") > 1e6, "{after}");

    // /status tells the same story, and `cachepol status` renders it.
    let (code, status) = http(&admin, "GET", "/status", &[], b"");
    assert_eq!(code, 200, "{status}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["ready"], true, "{status}");
    assert!(status["redis"]["version"].as_str().is_some_and(|v| !v.is_empty()), "{status}");
    let genre = status["policies"].as_array().unwrap().iter().find(|p| p["name"] == "genre-invalidation").unwrap();
    assert_eq!(status["redis"]["maxmemory_policy"], "noeviction", "{status}");
    assert!(!daemon.log_text().contains("Redis evicts keys"), "nothing to warn of without eviction");
    assert_eq!(genre["mode"], "enforce");
    assert_eq!(genre["last_sweep"]["reason"], "start");
    assert!(genre["last_event_ms"].as_u64().is_some(), "{genre}");
    assert_eq!(genre["sha256"].as_str().map(str::len), Some(64));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cachepol"))
        .args(["status", "--admin", &admin])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.contains("ready") && table.contains("genre-invalidation") && table.contains("start ok"), "{table}");
    assert_eq!(daemon.stop(), Some(0));
}

/// A Redis that evicts when full may evict the daemon's own keys (the
/// deploy stream, the kill switch, the leases): said once at start, and
/// shown in `/status`.
#[test]
fn a_redis_that_may_evict_the_daemons_keys_is_named_at_start() {
    let redis = RedisServer::start_with(&["--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru"]);
    let setup = Setup::new(&["recorder"]);
    let daemon = Daemon::start(&redis, &setup);
    daemon.wait_for("may evict any of cachepol's keys", Duration::from_secs(30));
    let (code, body) = http(&daemon.admin(), "GET", "/status", &[], b"");
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["redis"]["maxmemory_policy"], "allkeys-lru", "{status}");
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn readiness_follows_redis() {
    let mut redis = RedisServer::start();
    let setup = Setup::new(&["ttl-table"]);
    let daemon = Daemon::start(&redis, &setup);
    let admin = daemon.admin();
    let ready = |admin: &str| http(admin, "GET", "/readyz", &[], b"");
    eventually(&daemon, "ready", || ready(&admin).0 == 200);
    redis.stop();
    eventually(&daemon, "not ready while Redis is down", || ready(&admin).0 == 503);
    let (_, why) = ready(&admin);
    assert!(why.contains("not subscribed"), "{why}");
    assert_eq!(http(&admin, "GET", "/livez", &[], b"").0, 200, "alive all the same");
    redis.restart();
    eventually(&daemon, "ready again once Redis is back", || ready(&admin).0 == 200);
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn readiness_follows_the_notification_flags_and_their_return_sweeps() {
    let redis = RedisServer::start();
    redis.cmd::<()>(&["CONFIG", "SET", "notify-keyspace-events", "KEA"]);
    let setup = Setup::new(&["ttl-table"]);
    // Not allowed to set the flags itself: it can only report them.
    let daemon = Daemon::spawn(&redis, &setup, &[]);
    daemon.wait_for("cachepol ready", Duration::from_secs(60));
    let admin = daemon.admin();
    let ready = |admin: &str| http(admin, "GET", "/readyz", &[], b"");
    eventually(&daemon, "ready", || ready(&admin).0 == 200);
    redis.cmd::<()>(&["CONFIG", "SET", "notify-keyspace-events", ""]);
    redis.cmd::<()>(&["SET", "job:unseen", "v"]);
    eventually(&daemon, "not ready without the flags", || ready(&admin).0 == 503);
    assert!(ready(&admin).1.contains("lacks flags"), "{}", ready(&admin).1);
    redis.cmd::<()>(&["CONFIG", "SET", "notify-keyspace-events", "KEA"]);
    eventually(&daemon, "ready again", || ready(&admin).0 == 200);
    // The write made while notifications were off is reconciled.
    daemon.wait_for("keyspace notification flags complete again", Duration::from_secs(10));
    eventually(&daemon, "the gap sweep gave the key its TTL", || redis.cmd::<i64>(&["TTL", "job:unseen"]) > 0);
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn the_webhook_takes_a_hook_with_the_token_and_refuses_the_rest_writing_nothing() {
    let redis = RedisServer::start();
    redis.cmd::<()>(&["SET", "graph_data:dance", "v"]);
    let setup = Setup::new(&["genre-invalidation"]);
    let daemon =
        Daemon::spawn_with_env(&redis, &setup, &["--configure-notifications"], &[("CACHEPOL_DEPLOY_TOKEN", TOKEN)]);
    daemon.wait_for("cachepol ready", Duration::from_secs(60));
    let admin = daemon.admin();
    let good = r#"{"service": "catalog", "files": ["app.py"], "tags": {"genre": "dance"}, "id": "release-7"}"#;
    let json = ("Content-Type", "application/json");
    let refusals: Vec<(u16, String, &str)> = vec![
        {
            let (c, b) = http(&admin, "POST", "/deploys", &[json], good.as_bytes());
            (c, b, "no token")
        },
        {
            let (c, b) = http(
                &admin,
                "POST",
                "/deploys",
                &[("Authorization", "Bearer wrong-token-0123456789"), json],
                good.as_bytes(),
            );
            (c, b, "wrong token")
        },
        {
            let (c, b) = post_hook(&admin, "{\"service\": ");
            (c, b, "bad JSON")
        },
        {
            let (c, b) = post_hook(&admin, r#"{"service": "catalog", "tag": {"genre": "dance"}}"#);
            (c, b, "unknown field")
        },
        {
            let huge = format!(r#"{{"service": "catalog", "files": ["{}"]}}"#, "a".repeat(200_000));
            let (c, b) = post_hook(&admin, &huge);
            (c, b, "huge body")
        },
    ];
    // A body sent in chunks, without a length: cut off past the limit too.
    let chunked = {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&admin).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let head = format!(
            "POST /deploys HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
        let _ = stream.write_all(head.as_bytes());
        let chunk = "x".repeat(16 * 1024);
        for _ in 0..8 {
            let _ = stream.write_all(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes());
        }
        let _ = stream.write_all(b"0\r\n\r\n");
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    };
    assert!(chunked.starts_with("HTTP/1.1 413"), "{chunked}");
    let codes: Vec<u16> = refusals.iter().map(|(c, _, _)| *c).collect();
    assert_eq!(codes, vec![401, 401, 400, 400, 413], "{refusals:#?}");
    assert!(refusals[0].1.contains("Bearer"), "says what is missing: {}", refusals[0].1);
    assert!(refusals[3].1.contains("unknown field `tag`"), "{}", refusals[3].1);
    assert!(refusals[4].1.contains("larger than"), "{}", refusals[4].1);
    assert_eq!(stream_len(&redis), 0, "nothing written");
    assert!(redis.exists("graph_data:dance"));

    let (code, body) = post_hook(&admin, good);
    assert_eq!(code, 202, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"].as_str().unwrap().to_owned();
    let entries: Vec<(String, Vec<String>)> = redis.cmd(&["XRANGE", "cachepol:deploys", "-", "+"]);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].0, id, "the answer is the hook's stream id");
    assert!(entries[0].1.contains(&"release-7".to_owned()), "{entries:?}");
    eventually(&daemon, "the hook is handled", || !redis.exists("graph_data:dance"));
    assert_eq!(daemon.stop(), Some(0));

    // Without a token configured the webhook is off.
    let daemon = Daemon::start(&redis, &setup);
    let (code, body) = post_hook(&daemon.admin(), good);
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("deploy_token"), "{body}");
    assert_eq!(stream_len(&redis), 1);
    assert_eq!(daemon.stop(), Some(0));
}

/// Random bodies, from valid hooks to noise: each is either taken (202,
/// one stream entry) or refused (400), never anything else, and the daemon
/// keeps serving. Seeded from `CACHEPOL_TEST_SEED` when set.
#[test]
fn fuzzed_webhook_bodies_are_taken_or_refused_and_only_taken_ones_are_written() {
    let redis = RedisServer::start();
    let setup = Setup::new(&["ttl-table"]).config(&format!("deploy_token = \"{TOKEN}\""));
    let daemon = Daemon::start(&redis, &setup);
    let admin = daemon.admin();
    let seed = std::env::var("CACHEPOL_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let pieces = [
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\"service\"",
        "\"files\"",
        "\"tags\"",
        "\"id\"",
        "\"x\"",
        "\"\"",
        "null",
        "7",
        "true",
        "\"genre=dance\"",
        "\"a=\"",
        "\"\\u0000\"",
        "\"\\ud800\"",
        "{\"g\":\"d\"}",
        " ",
        "\u{e9}",
        "\\",
    ];
    let (mut taken, mut refused) = (0, 0);
    for i in 0..300 {
        let body = match i % 3 {
            // Structured: a hook with random parts.
            0 => format!(
                "{{\"service\": {}, \"files\": [{}], \"tags\": {}}}",
                pieces[rng.random_range(0..pieces.len())],
                pieces[rng.random_range(0..pieces.len())],
                pieces[rng.random_range(0..pieces.len())]
            ),
            // Tokens in random order.
            1 => (0..rng.random_range(1..12)).map(|_| pieces[rng.random_range(0..pieces.len())]).collect(),
            // Random bytes.
            _ => String::from_utf8_lossy(&(0..rng.random_range(0..64)).map(|_| rng.random::<u8>()).collect::<Vec<_>>())
                .into_owned(),
        };
        let (code, answer) = post_hook(&admin, &body);
        match code {
            202 => taken += 1,
            400 => refused += 1,
            _ => panic!("seed {seed}: {body:?} got {code}: {answer}"),
        }
    }
    assert!(refused > 0, "seed {seed}: some bodies are refused");
    assert_eq!(stream_len(&redis), taken, "seed {seed}: one entry per 202 and none else");
    assert_eq!(http(&admin, "GET", "/livez", &[], b"").0, 200);
    assert_eq!(daemon.stop(), Some(0));
}
