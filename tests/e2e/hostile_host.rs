//! A hostile policy that stays inside its grants, host side: what it can
//! make the daemon and Redis do with the allowances it has. Each test runs
//! the hostile fixture (`tests/fixtures/hostile`) on one deploy hook against
//! a real redis-server and checks what a platform team would: the daemon's
//! own keys, memory on both sides, Redis's work, log and dead-letter sizes.

use crate::support::{Daemon, RedisServer, Setup, cli, dead_letters, deploy, eventually, http, metric, pending};

/// The hostile fixture (doing `on_deploy` on every hook, with
/// `extra_grants` on top of its own) beside genre-invalidation; one
/// attempt per hook.
fn hostile(on_deploy: &str, extra: &str) -> Setup {
    Setup::new(&["hostile", "genre-invalidation"]).config(&format!(
        "[deploy]\nmax_attempts = 1\n[policies.hostile]\nconfig = {{ on_deploy = \"{on_deploy}\", extra_grants = [{extra}] }}"
    ))
}

/// The kill switch still works: `cachepol disable` and `enable` succeed and
/// the daemon follows them.
fn kill_switch_works(redis: &RedisServer, daemon: &Daemon) {
    let (ok, out) = cli(redis, &["disable", "genre-invalidation"]);
    assert!(ok, "{out}");
    daemon.wait_for("policy disabled by the operator", std::time::Duration::from_secs(20));
    let (ok, out) = cli(redis, &["enable", "genre-invalidation"]);
    assert!(ok, "{out}");
}

#[test]
fn a_policy_asking_for_the_daemons_keys_is_refused_at_load() {
    let redis = RedisServer::start();
    let setup = hostile("squat", "\"cachepol:*\"");
    let daemon = Daemon::start(&redis, &setup);
    daemon.wait_for("may not reach reserved keys", std::time::Duration::from_secs(20));
    let log = daemon.log_text();
    assert!(log.contains("asks only for reserved keys"), "{log}");
    // The other policy runs, and the operator still holds the switch.
    redis.cmd::<()>(&["SET", "graph_data:dance", "v"]);
    deploy(&redis, &["--service", "catalog", "--tag", "genre=dance"]);
    eventually(&daemon, "genre-invalidation clears the genre", || !redis.exists("graph_data:dance"));
    kill_switch_works(&redis, &daemon);
}

#[test]
fn a_policy_granted_every_tenant_cannot_touch_the_daemons_keys() {
    let redis = RedisServer::start();
    for key in ["svc:feat:acme:1", "svc:feat:events:2"] {
        redis.cmd::<()>(&["SET", key, "v"]);
    }
    let setup = hostile("squat", "\"*:*:*:*\"");
    let daemon = Daemon::start(&redis, &setup);
    daemon.wait_for("also covers the daemon's own keys", std::time::Duration::from_secs(20));
    eventually(&daemon, "the lease is held", || redis.exists("cachepol:lease:events:db0"));
    let lease: String = redis.cmd(&["GET", "cachepol:lease:events:db0"]);
    let neighbour = "cachepol-state:genre-invalidation:since";
    eventually(&daemon, "genre-invalidation keeps its state", || redis.exists(neighbour));
    let state: String = redis.cmd(&["GET", neighbour]);

    deploy(&redis, &["--service", "catalog"]);
    eventually(&daemon, "the hook ran", || daemon.log_text().contains("wiped 2; through: )"));
    // The tenants' keys went; the daemon's did not, and none was overwritten.
    assert!(redis.keys("svc:*").is_empty());
    let still: String = redis.cmd(&["GET", "cachepol:lease:events:db0"]);
    assert_eq!(still, lease, "the lease is the daemon's");
    assert_eq!(redis.cmd::<String>(&["GET", neighbour]), state, "another policy's state is out of reach");
    let kind: String = redis.cmd(&["TYPE", "cachepol:deploys"]);
    assert_eq!(kind, "stream");
    assert!(
        !redis.exists("cachepol:control:disabled")
            || redis.cmd::<String>(&["TYPE", "cachepol:control:disabled"]) != "string"
    );
    assert!(dead_letters(&redis).is_empty(), "denials were swallowed, the hook succeeded");
    kill_switch_works(&redis, &daemon);
}

/// Peak resident memory of a process, in KiB.
fn peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn info_field(redis: &RedisServer, section: &str, field: &str) -> u64 {
    let info: String = redis.cmd(&["INFO", section]);
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().split(',').next())
        .and_then(|v| v.trim_start_matches("calls=").parse().ok())
        .unwrap_or(0)
}

#[test]
fn an_mget_of_one_big_value_thousands_of_times_stays_bounded() {
    let redis = RedisServer::start();
    let setup = hostile("mget-bomb", "");
    let daemon = Daemon::start(&redis, &setup);
    deploy(&redis, &["--service", "catalog"]);
    eventually(&daemon, "the hook is dead-lettered", || dead_letters(&redis).len() == 1);
    let reason = &dead_letters(&redis)[0];
    assert!(reason.contains("would read more than 16777216 bytes"), "{reason}");
    // 2,000 x 1 MiB asked for: before the read allowance, 2 GiB in each.
    let daemon_peak = peak_kib(daemon.pid());
    assert!(daemon_peak < 400 * 1024, "daemon peak RSS {daemon_peak} KiB");
    let redis_peak = info_field(&redis, "memory", "used_memory_peak");
    assert!(redis_peak < 200 << 20, "Redis used_memory_peak {redis_peak} bytes");
    let admin = daemon.admin();
    let (_, metrics) = http(&admin, "GET", "/metrics", &[], b"");
    assert_eq!(
        metric(&metrics, "cachepol_budget_trips_total{policy=\"hostile\",kind=\"read_bytes\"}"),
        1.0,
        "{metrics}"
    );
}

#[test]
fn empty_scans_are_held_to_the_policys_redis_work_allowance() {
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    redis.cmd::<()>(&["DEBUG", "POPULATE", "100000", "app", "8"]);
    let setup = hostile("empty-scans", "").config("budgets = { wall_time = 3000 }");
    let daemon = Daemon::start(&redis, &setup);
    let admin = daemon.admin();
    // Start-up scans (the key index, the start sweeps) are over.
    eventually(&daemon, "the key index is complete", || daemon.log_text().contains("key index complete"));
    eventually(&daemon, "the start sweeps ran", || {
        let (_, m) = http(&admin, "GET", "/metrics", &[], b"");
        ["hostile", "genre-invalidation"]
            .iter()
            .all(|p| metric(&m, &format!("cachepol_sweeps_total{{policy=\"{p}\",kind=\"start\"}}")) == 1.0)
    });
    let before = info_field(&redis, "commandstats", "cmdstat_scan");
    deploy(&redis, &["--service", "catalog"]);
    eventually(&daemon, "the hook is dead-lettered", || dead_letters(&redis).len() == 1);
    let pages = info_field(&redis, "commandstats", "cmdstat_scan") - before;
    // 1,000 pages of COUNT 10,000 asked for (within the host-call budget);
    // 1,000,000 keys a second allowed, one second's worth at once: at most
    // about 400 pages in 3 s.
    assert!(pages <= 450, "{pages} SCAN pages");
    assert!(pages >= 20, "{pages} SCAN pages: the policy did scan");
    // Stopped by the allowance, or (on a machine too loaded for the pages
    // to outrun it) by the wall time: either way within the bound above.
    let reason = &dead_letters(&redis)[0];
    assert!(reason.contains("examined more than 1000000 keys a second") || reason.contains("wall-clock"), "{reason}");
}

#[test]
fn a_ten_megabyte_error_is_clipped_everywhere_it_is_shown() {
    let redis = RedisServer::start();
    let setup = hostile("long-error", "");
    let daemon = Daemon::start(&redis, &setup);
    deploy(&redis, &["--service", "catalog"]);
    eventually(&daemon, "the hook is dead-lettered", || dead_letters(&redis).len() == 1);
    let reason = &dead_letters(&redis)[0];
    assert!(reason.len() < 4096, "{} bytes of reason", reason.len());
    assert!(reason.contains("(10485760 bytes in all)"), "{reason}");
    let log = std::fs::metadata(&daemon.log).unwrap().len();
    assert!(log < 1 << 20, "{log} bytes of log");
    let (code, status) = http(&daemon.admin(), "GET", "/status", &[], b"");
    assert_eq!(code, 200);
    assert!(status.len() < 64 * 1024, "{} bytes of /status", status.len());
}

#[test]
fn a_thousand_denied_sixteen_kib_keys_cost_the_log_its_budget_only() {
    let redis = RedisServer::start();
    let setup = hostile("long-denied", "");
    let daemon = Daemon::start(&redis, &setup);
    let before = std::fs::metadata(&daemon.log).unwrap().len();
    deploy(&redis, &["--service", "catalog"]);
    eventually(&daemon, "the log budget is spent", || daemon.log_text().contains("output truncated"));
    eventually(&daemon, "the hook is acknowledged", || pending(&redis) == 0);
    let grown = std::fs::metadata(&daemon.log).unwrap().len() - before;
    // 1,000 x 16 KiB would be 16 MB; 200 lines of at most 1 KiB of key.
    assert!(grown < 600 * 1024, "the log grew by {grown} bytes");
}
