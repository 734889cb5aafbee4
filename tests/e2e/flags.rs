//! `notify-keyspace-events` as production servers have it: the flags are
//! judged by what Redis sends, not by how it prints them. Redis prints
//! `AKE` for `AKEn` (`A` hides `n`), so under the canonical `KEA` the daemon
//! confirms `new` with a probe once, and the key index is rebuilt only after
//! a real gap, never because of how a value reads.

use std::time::Duration;

use crate::index::{INDEX_COMPLETE, SCANNED, SERVED, count, wipe, wiper};
use crate::support::*;

/// A server started with these flags.
fn server(flags: &str) -> RedisServer {
    RedisServer::start_with(&["--notify-keyspace-events", flags])
}

fn flags(redis: &RedisServer) -> String {
    let reply: Vec<String> = redis.cmd(&["CONFIG", "GET", "notify-keyspace-events"]);
    reply[1].clone()
}

fn scrape(daemon: &Daemon) -> String {
    let (code, text) = http(&daemon.admin(), "GET", "/metrics", &[], b"");
    assert_eq!(code, 200, "{text}");
    text
}

/// The flags as `/status` shows them for the one subscription.
fn flags_status(daemon: &Daemon) -> serde_json::Value {
    let (code, status) = http(&daemon.admin(), "GET", "/status", &[], b"");
    assert_eq!(code, 200, "{status}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    status["subscriptions"][0]["flags"].clone()
}

/// Write `n` keys under `idx:a:` (wiped) and as many under `idx:b:` (kept).
fn write(redis: &RedisServer, tag: &str, n: usize) {
    for i in 0..n {
        redis.cmd::<()>(&["SET", &format!("idx:a:{tag}:{i}"), "v"]);
        redis.cmd::<()>(&["SET", &format!("idx:b:{tag}:{i}"), "v"]);
    }
}

/// A wipe of `n` keys written now, served by the index, with no `SCAN`.
fn wipe_through_the_index(redis: &RedisServer, daemon: &Daemon, n: usize) {
    let served = count(daemon, SERVED);
    redis.cmd::<()>(&["CONFIG", "RESETSTAT"]);
    write(redis, "w", n);
    assert_eq!(wipe(redis, daemon), n as u64, "{}", daemon.log_text());
    assert_eq!(count(daemon, SERVED), served + 1, "the wipe walked the index\n{}", daemon.log_text());
    assert_eq!(redis.scan_calls(), 0, "no SCAN\n{}", daemon.log_text());
    assert!(redis.keys("idx:a:*").is_empty());
    assert!(!redis.keys("idx:b:w:*").is_empty(), "the other keys stay");
}

/// The canonical production flags, set by the daemon: it adds `n`, reads
/// `AKE` back, confirms `new` by a probe, and then leaves the index alone
/// over several checks (one every 5 s).
#[test]
fn under_kea_the_index_is_built_once_and_serves_bulk_deletes() {
    let redis = server("KEA");
    let setup = wiper("");
    let daemon = Daemon::start(&redis, &setup);
    daemon.wait_for(INDEX_COMPLETE, Duration::from_secs(30));
    assert_eq!(flags(&redis), "AKE", "Redis prints `AKEn` as `AKE`");
    eventually(&daemon, "a probe confirmed `new`", || {
        flags_status(&daemon)["probe"].as_str().is_some_and(|p| p.contains("came back"))
    });
    let m = scrape(&daemon);
    assert_eq!(metric(&m, "cachepol_index_builds_total"), 1.0, "{m}");
    redis.cmd::<()>(&["CONFIG", "RESETSTAT"]);
    std::thread::sleep(Duration::from_secs(16));
    let m = scrape(&daemon);
    assert_eq!(metric(&m, "cachepol_index_builds_total"), 1.0, "rebuilt in steady state\n{}", daemon.log_text());
    assert_eq!(metric(&m, "cachepol_gaps_total"), 0.0, "{m}");
    assert_eq!(redis.scan_calls(), 0, "a SCAN in steady state\n{}", daemon.log_text());
    assert_eq!(count(&daemon, "stopped reporting created keys"), 0, "{}", daemon.log_text());
    wipe_through_the_index(&redis, &daemon, 5);
    let status = flags_status(&daemon);
    assert_eq!(status["value"], "AKE", "{status}");
    assert_eq!(status["missing"], serde_json::json!([]), "{status}");
    assert_eq!(daemon.stop(), Some(0));
}

/// Flags the value shows class by class need no probe; flags missing are
/// set by the daemon when allowed.
#[test]
fn values_that_show_every_flag_need_no_probe() {
    for (value, configure) in [("KEg$xen", false), ("Ex", true)] {
        let redis = server(value);
        let args: &[&str] = if configure { &["--configure-notifications"] } else { &[] };
        let setup = wiper("");
        let daemon = Daemon::spawn(&redis, &setup, args);
        daemon.wait_for("cachepol ready", Duration::from_secs(60));
        daemon.wait_for(INDEX_COMPLETE, Duration::from_secs(30));
        wipe_through_the_index(&redis, &daemon, 3);
        let status = flags_status(&daemon);
        assert_eq!(status["probe"], serde_json::Value::Null, "{value}: {status}");
        assert_eq!(status["missing"], serde_json::json!([]), "{value}: {status}");
        assert_eq!(metric(&scrape(&daemon), "cachepol_index_builds_total"), 1.0, "{value}");
        assert_eq!(daemon.stop(), Some(0));
    }
}

/// `AKE` without `n`, and a daemon that may not set flags: it says once what
/// is missing and what that costs, `/status` and `cachepol status` show it,
/// and bulk operations scan. The operator's `CONFIG SET AKEn` reads back
/// `AKE`, as before: the daemon sees it by probing again, and the index
/// serves.
#[test]
fn ake_then_config_set_aken_is_seen_by_a_probe() {
    let redis = server("AKE");
    let setup = wiper("");
    let daemon = Daemon::spawn(&redis, &setup, &[]);
    daemon.wait_for("cachepol ready", Duration::from_secs(60));
    let unused = "the key index stays unused";
    daemon.wait_for(unused, Duration::from_secs(20));
    let line = daemon.log_text().lines().find(|l| l.contains(unused)).unwrap().to_owned();
    for part in ["`n`", "did not come back", "no --configure-notifications", "bulk operations will SCAN", "AKEn"] {
        assert!(line.contains(part), "{part} in {line}");
    }
    let status = flags_status(&daemon);
    let missing = &status["missing"][0];
    assert_eq!(missing["flags"], "n", "{status}");
    assert_eq!(missing["needed_by"], "key index", "{status}");
    assert!(missing["cost"].as_str().unwrap().contains("SCAN"), "{status}");
    let table = status_table(&daemon.admin());
    assert!(table.contains("missing `n` for the key index") && table.contains("SCAN"), "{table}");
    write(&redis, "before", 3);
    assert_eq!(wipe(&redis, &daemon), 3);
    assert!(count(&daemon, SCANNED) >= 1, "{}", daemon.log_text());

    redis.cmd::<()>(&["CONFIG", "SET", "notify-keyspace-events", "AKEn"]);
    assert_eq!(flags(&redis), "AKE", "the value reads the same");
    daemon.wait_for(INDEX_COMPLETE, Duration::from_secs(20));
    wipe_through_the_index(&redis, &daemon, 3);
    assert_eq!(count(&daemon, unused), 1, "said once\n{}", daemon.log_text());
    assert_eq!(daemon.stop(), Some(0));
}

/// Flags turned off at run time and set back by the daemon: a real gap.
/// Keys written meanwhile never notified the index, so it is rebuilt, once,
/// and the next wipe reaches them.
#[test]
fn flags_turned_off_and_back_are_a_real_gap_and_the_index_is_rebuilt_once() {
    let redis = server("KEA");
    let setup = wiper("");
    let daemon = Daemon::start(&redis, &setup);
    daemon.wait_for(INDEX_COMPLETE, Duration::from_secs(30));
    redis.cmd::<()>(&["CONFIG", "SET", "notify-keyspace-events", ""]);
    write(&redis, "off", 4);
    eventually(&daemon, "the gap is seen and the index rebuilt", || {
        metric(&scrape(&daemon), "cachepol_index_builds_total") == 2.0 && count(&daemon, INDEX_COMPLETE) == 2
    });
    assert!(metric(&scrape(&daemon), "cachepol_gaps_total") >= 1.0);
    assert!(flags(&redis).contains('n'), "set back: {}", flags(&redis));
    assert_eq!(wipe(&redis, &daemon), 4, "the keys written while the flags were off are reached");
    std::thread::sleep(Duration::from_secs(11));
    assert_eq!(metric(&scrape(&daemon), "cachepol_index_builds_total"), 2.0, "{}", daemon.log_text());
    wipe_through_the_index(&redis, &daemon, 2);
    assert_eq!(daemon.stop(), Some(0));
}

/// The ACL user `cachepol acl` describes without --configure-notifications
/// (no `CONFIG SET`), running a daemon told to set the flags: Redis refuses,
/// and the daemon says so once, with what is missing and what it costs.
#[test]
fn an_acl_user_refused_config_set_says_once_what_is_missing_and_the_cost() {
    let redis = server("KEA");
    let setup = wiper("");
    let url = format!("redis://cachepol:s3cret@127.0.0.1:{}", redis.port);
    let out = acl(&url, &setup, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(line.contains("~cachepol:probe:*") && !line.contains("config|set"), "{line}");
    redis.cmd::<()>(&line.split_whitespace().collect::<Vec<_>>());
    let daemon = Daemon::spawn_url(&url, &setup, &["--configure-notifications"], "info,cachepol=debug");
    daemon.wait_for("cachepol ready", Duration::from_secs(60));
    let unused = "the key index stays unused";
    daemon.wait_for(unused, Duration::from_secs(20));
    let said = daemon.log_text().lines().find(|l| l.contains(unused)).unwrap().to_owned();
    for part in ["`n`", "did not come back", "Redis refused CONFIG SET", "bulk operations will SCAN"] {
        assert!(said.contains(part), "{part} in {said}");
    }
    let status = flags_status(&daemon);
    assert!(status["missing"][0]["not_set"].as_str().unwrap().contains("refused"), "{status}");
    write(&redis, "scanned", 3);
    assert_eq!(wipe(&redis, &daemon), 3, "bulk operations scan, as the ACL user");
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(count(&daemon, unused), 1, "said once\n{}", daemon.log_text());
    assert_eq!(flags(&redis), "AKE", "nothing set");
    assert_eq!(daemon.stop(), Some(0));
}
