//! A Redis Cluster (`redis+cluster://`): one subscription per primary, bulk
//! operations on every primary, a failover followed, and two daemons
//! sharing one cluster.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::cluster::Cluster;
use crate::support::{Daemon, Setup, http, metric};

/// The ports of the primaries serving `keys`.
fn nodes_of(cluster: &Cluster, keys: &[String]) -> BTreeSet<u16> {
    keys.iter().map(|k| cluster.node_of(k).port).collect()
}

fn status(daemon: &Daemon) -> serde_json::Value {
    let (code, body) = http(&daemon.admin(), "GET", "/status", &[], b"");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The reason of `policy`'s last sweep, as `/status` says (`failed` after
/// it if it failed: a failed sweep is tried again).
fn last_sweep(daemon: &Daemon, policy: &str) -> String {
    let status = status(daemon);
    let policies = status["policies"].as_array().cloned().unwrap_or_default();
    let sweep = &policies.iter().find(|p| p["name"] == policy).map(|p| p["last_sweep"].clone()).unwrap_or_default();
    let reason = sweep["reason"].as_str().unwrap_or_default();
    if sweep["ok"] == true { reason.to_owned() } else { format!("{reason} failed") }
}

/// The shards (by first slot) `daemon` holds, from `/status`.
fn held_shards(daemon: &Daemon) -> Vec<u16> {
    let shards = status(daemon)["lease"]["shards"].as_array().cloned().unwrap_or_default();
    shards.iter().filter(|s| s["held"] == true).map(|s| s["slot"].as_u64().unwrap() as u16).collect()
}

/// The shard (by first slot) serving `key`.
fn shard_of(cluster: &Cluster, key: &str) -> u16 {
    let slot = cachepol::store::target::slot(key.as_bytes());
    let primaries = cluster.primaries();
    let node = primaries.iter().find(|n| n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))).unwrap();
    node.shard()
}

fn eventually(daemon: &Daemon, what: &str, check: impl FnMut() -> bool) {
    crate::support::eventually(daemon, what, check)
}

#[test]
fn policies_reach_keys_on_every_primary_and_a_hook_is_handled_once() {
    let cluster = Cluster::start(3, 0);
    // Written before the daemon starts: only its start sweep, which must
    // scan every primary, can find them.
    let before: Vec<String> = (0..30).map(|n| format!("graph_data:old{n}")).collect();
    for key in &before {
        cluster.set(key, "g");
    }
    assert_eq!(nodes_of(&cluster, &before).len(), 3, "the keys are spread over every primary");
    let setup = Setup::new(&["ttl-table", "genre-invalidation"]);
    let daemon = cluster.daemon(&setup);

    let subscriptions = status(&daemon)["subscriptions"].as_array().unwrap().clone();
    assert_eq!(subscriptions.len(), 3, "one subscription per primary: {subscriptions:?}");
    assert!(subscriptions.iter().all(|s| s["subscribed"] == true && s["notifications"] == true));

    // Events from every node: each key gets the table's TTL (graph 1 h).
    let after: Vec<String> = (0..30).map(|n| format!("graph_data:new{n}")).collect();
    for key in &after {
        cluster.set(key, "g");
    }
    for key in before.iter().chain(&after) {
        eventually(&daemon, &format!("{key} has its TTL"), || {
            let ttl: i64 = cluster.cmd(key, &["PTTL", key]);
            ttl > 3_000_000 && ttl <= 3_600_000
        });
    }

    // A deploy hook through the stream on the cluster: genre-invalidation
    // deletes the genre's keys on every primary, and nothing else.
    let dance: Vec<String> = (0..60).map(|n| format!("service_playlist:dance:{n}")).collect();
    for key in &dance {
        cluster.set(key, "p");
    }
    cluster.set("service_playlist:rock:1", "p");
    cluster.set("graph_data:dance", "g");
    assert_eq!(nodes_of(&cluster, &dance).len(), 3);
    let (ok, out) = cluster.cli(&["deploy", "--service", "catalog", "--tag", "genre=dance"]);
    assert!(ok, "{out}");
    eventually(&daemon, "the genre's keys are gone from every primary", || {
        cluster.keys("service_playlist:dance:*").is_empty() && !cluster.exists("graph_data:dance")
    });
    assert!(cluster.exists("service_playlist:rock:1"));
    eventually(&daemon, "the hook is acknowledged", || {
        let pending: Vec<redis::Value> =
            cluster.cmd("{cachepol}:deploys", &["XPENDING", "{cachepol}:deploys", "cachepol", "-", "+", "10"]);
        pending.is_empty()
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(daemon.log_text().matches("deploy hook service=").count(), 1, "the hook is handled once");
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_failed_primary_is_replaced_by_its_replica_and_its_slots_are_handled() {
    let mut cluster = Cluster::start(3, 1);
    let setup = Setup::new(&["ttl-table"]);
    let daemon = cluster.daemon(&setup);
    let key = "graph_data:{failover}1";
    cluster.set(key, "g");
    eventually(&daemon, "a TTL before the failover", || cluster.cmd::<i64>(key, &["PTTL", key]) > 0);

    // The start sweep is done: from here on, SCANs come from the sweep for
    // the promoted primary.
    eventually(&daemon, "the start sweep", || last_sweep(&daemon, "ttl-table") == "start");
    for p in cluster.primaries() {
        cluster.by_port(p.port).cmd::<()>(&["CONFIG", "RESETSTAT"]);
    }
    // The primary of that slot dies; its replica is promoted.
    let dead = cluster.node_of(key).port;
    let others: Vec<u16> = cluster.primaries().iter().map(|p| p.port).filter(|p| *p != dead).collect();
    cluster.by_port_mut(dead).stop();
    cluster.wait_until("the replica is promoted", |c| {
        c.primaries().len() == 3 && c.primaries().iter().all(|p| p.port != dead)
    });
    // Written on the promoted primary at once, maybe before the daemon
    // subscribed to it: its event, or the sweep for the new primary,
    // gives it its TTL.
    let meanwhile = "graph_data:{failover}2";
    cluster.set(meanwhile, "g");
    daemon.wait_for("a new primary serves slots; subscribing to it", Duration::from_secs(30));
    eventually(&daemon, "the key written around the failover has its TTL", || {
        cluster.cmd::<i64>(meanwhile, &["PTTL", meanwhile]) > 0
    });
    // Once subscribed, its writes are handled as events.
    let promoted = cluster.node_of(key).port;
    eventually(&daemon, "subscribed to the promoted primary", || {
        status(&daemon)["subscriptions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["node"] == format!("127.0.0.1:{promoted}") && s["subscribed"] == true)
    });
    // The sweep for the new primary walks every primary: what a policy
    // reconciles for one node's missed events may be stored on another
    // (file-cache-clear's deferred clears, key-naming's cleaned marker).
    // With replicas on (the default), the shard's lease may have been given
    // back while its primary was unheard: then the sweep is its takeover's,
    // `gap`, when taken again.
    eventually(&daemon, "the sweep for the new primary", || {
        matches!(last_sweep(&daemon, "ttl-table").as_str(), "reconnect" | "gap")
    });
    for port in others.iter().chain([&promoted]) {
        eventually(&daemon, "every primary swept", || cluster.by_port(*port).scan_calls() > 0);
    }
    let later = "graph_data:{failover}3";
    cluster.set(later, "g");
    eventually(&daemon, "a write after the failover has its TTL", || cluster.cmd::<i64>(later, &["PTTL", later]) > 0);
    eventually(&daemon, "the dead node is let go", || {
        status(&daemon)["subscriptions"].as_array().unwrap().iter().all(|s| s["node"] != format!("127.0.0.1:{dead}"))
    });
    assert_eq!(daemon.stop(), Some(0));
}

/// A primary restarted in place, with no replica to take over: its
/// subscription comes back, the notification flags it lost are set again,
/// and its shard is swept, whether it comes back empty or with its data.
fn a_primary_restarted_in_place(durable: bool) {
    let extra: &[&str] = if durable { &["--appendonly", "yes", "--appendfsync", "always"] } else { &[] };
    let mut cluster = Cluster::start_with(3, 0, extra);
    let setup = Setup::new(&["ttl-table"]);
    let daemon = cluster.daemon(&setup);
    eventually(&daemon, "the start sweep", || last_sweep(&daemon, "ttl-table") == "start");
    for p in cluster.primaries() {
        cluster.by_port(p.port).cmd::<()>(&["CONFIG", "RESETSTAT"]);
    }
    let before = "graph_data:{restart}0";
    cluster.set(before, "g");
    eventually(&daemon, "a TTL before the restart", || cluster.cmd::<i64>(before, &["PTTL", before]) > 0);

    let port = cluster.node_of(before).port;
    cluster.by_port_mut(port).restart();
    cluster.wait_until("the restarted primary serves its slots again", |c| c.ok(3));
    let meanwhile = "graph_data:{restart}1";
    cluster.set(meanwhile, "g");
    daemon.wait_for("keyspace subscription restored", Duration::from_secs(30));
    eventually(&daemon, "the sweep for the restarted primary", || last_sweep(&daemon, "ttl-table") == "reconnect");
    for p in cluster.primaries() {
        eventually(&daemon, "the sweep walks every primary", || cluster.by_port(p.port).scan_calls() > 0);
    }
    eventually(&daemon, "a key written around the restart has its TTL", || {
        cluster.cmd::<i64>(meanwhile, &["PTTL", meanwhile]) > 0
    });
    let flags: Vec<String> = cluster.by_port(port).cmd(&["CONFIG", "GET", "notify-keyspace-events"]);
    assert!(flags[1].contains('E'), "the flags are set again on the restarted node: {flags:?}");
    assert_eq!(cluster.exists(before), durable, "its data came back only if it was kept");
    let later = "graph_data:{restart}2";
    cluster.set(later, "g");
    eventually(&daemon, "a write after the restart has its TTL", || cluster.cmd::<i64>(later, &["PTTL", later]) > 0);
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_primary_restarted_empty_in_place_is_subscribed_again_and_swept() {
    a_primary_restarted_in_place(false);
}

#[test]
fn a_primary_restarted_with_its_data_in_place_is_subscribed_again_and_swept() {
    a_primary_restarted_in_place(true);
}

/// Two daemons on a 3-primary cluster, once they have split its shards 2
/// and 1.
fn split_pair(cluster: &Cluster, setup: &Setup) -> (Daemon, Daemon) {
    split_pair_at(cluster, &cluster.url(), setup, &["--configure-notifications"])
}

/// [`split_pair`] on `url`, with `extra` arguments.
fn split_pair_at(cluster: &Cluster, url: &str, setup: &Setup, extra: &[&str]) -> (Daemon, Daemon) {
    let a = cluster.daemon_at(url, setup, extra);
    a.wait_for("holding 3 of 3 shards", Duration::from_secs(20));
    // A second daemon joins: the first gives one shard back, the second
    // takes it.
    let b = cluster.daemon_at(url, setup, extra);
    b.wait_for("holding 1 of 3 shards", Duration::from_secs(20));
    a.wait_for("holding 2 of 3 shards", Duration::from_secs(20));
    (a, b)
}

/// A policy copying each key it hears of to `echo:copy:<key>`, a key it
/// listens to as well, often on another shard than the original: the
/// daemon routing the copy's events is then not always the one that
/// wrote it.
/// Only the writer's announcement keeps the copy from being taken for an
/// application write, and copied again, without end.
#[test]
fn replicas_splitting_a_cluster_know_each_others_writes() {
    let cluster = Cluster::start(3, 0);
    let setup = Setup::new(&[]).with_copy("recorder", "echoer").config(
        "[replicas]\nenabled = true\nlease_ttl_ms = 3000\n\n[policies.echoer]\nconfig = { name = \"echoer\", ops = [\"set\", \"expire\"], \
         patterns = [\"echo:*\"], copy_prefix = \"echo:copy:\", ttl_ms = 60000 }",
    );
    let (a, b) = split_pair(&cluster, &setup);
    let keys: Vec<String> = (0..60).map(|n| format!("echo:{n}")).collect();
    for key in &keys {
        cluster.set(key, "v");
    }
    // Copies written by one daemon whose events the other routes. (CRC16
    // is linear: a fixed prefix moves slots in a fixed pattern, so fewer
    // cross than chance would have.)
    let (held_a, held_b) = (held_shards(&a), held_shards(&b));
    assert_eq!(held_a.len() + held_b.len(), 3, "{held_a:?} {held_b:?}");
    let holder = |key: &str| held_a.contains(&shard_of(&cluster, key));
    let crossing = keys.iter().filter(|k| holder(k) != holder(&format!("echo:copy:{k}"))).count();
    assert!(crossing >= 3, "copies routed by the other daemon than their writer: {crossing} of 60");
    eventually(&a, "60 copies", || cluster.keys("echo:copy:*").len() == 60);
    std::thread::sleep(Duration::from_millis(500));
    assert!(cluster.keys("echo:copy:echo:copy:*").is_empty(), "a copy was taken for the application's and copied");
    assert_eq!(cluster.recorded_events("echoer"), 60, "one event per application write, no echoes");
    for daemon in [&a, &b] {
        assert!(!daemon.log_text().contains("hop limit reached"), "{}", daemon.log_text());
    }
    assert_eq!(a.stop(), Some(0));
    assert_eq!(b.stop(), Some(0));
}

#[test]
fn two_daemons_on_a_cluster_split_the_shards_handle_each_event_once_and_one_takes_over() {
    let cluster = Cluster::start(3, 0);
    let setup = Setup::new(&["recorder"]).config(
        "[replicas]\nenabled = true\nlease_ttl_ms = 3000\n\n[policies.recorder]\nconfig = { name = \"recorder\", ttl_ms = 600000 }",
    );
    let (a, b) = split_pair(&cluster, &setup);

    let keys: Vec<String> = (0..200).map(|n| format!("rec:{n}")).collect();
    for key in &keys {
        cluster.set(key, "v");
    }
    assert_eq!(nodes_of(&cluster, &keys).len(), 3);
    eventually(&a, "200 events handled", || cluster.recorded_events("recorder") >= 200);
    let (ok, out) = cluster.cli(&["deploy", "--service", "ci"]);
    assert!(ok, "{out}");
    let hooks = |daemons: &[&Daemon]| {
        daemons.iter().map(|d| d.log_text().matches("deploy hook service=").count()).sum::<usize>()
    };
    eventually(&a, "the hook is handled", || hooks(&[&a, &b]) == 1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(cluster.recorded_events("recorder"), 200, "each event once");
    assert_eq!(hooks(&[&a, &b]), 1, "the hook once");
    for daemon in [&a, &b] {
        assert!(daemon.log_text().contains("event=\"key-"), "each daemon handles its shards' events");
    }

    // An operator's sweep is run by the replica holding the first shard
    // alone: it walks every primary, each once, not once per daemon.
    let primaries = cluster.primaries();
    for p in &primaries {
        cluster.by_port(p.port).cmd::<()>(&["CONFIG", "RESETSTAT"]);
    }
    let (ok, out) = cluster.cli(&["sweep", "recorder"]);
    assert!(ok, "{out}");
    let sweeps = || {
        [&a, &b]
            .iter()
            .map(|daemon| {
                let (_, text) = http(&daemon.admin(), "GET", "/metrics", &[], b"");
                metric(&text, "cachepol_sweeps_total{policy=\"recorder\",kind=\"manual\"}")
            })
            .sum::<f64>()
    };
    eventually(&a, "the operator's sweep ran", || sweeps() >= 1.0);
    // Both read the request (each polls every second); one queued it.
    let left = "sweep requested by the operator: left to the replica leading sweeps";
    eventually(&a, "the other replica left it", || a.log_text().contains(left) || b.log_text().contains(left));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sweeps(), 1.0, "one daemon ran it");
    for p in &primaries {
        assert_eq!(cluster.by_port(p.port).scan_calls(), 1, "{} scanned once", p.addr);
    }

    // One dies: the other takes its shards over within about the lease's
    // TTL, sweeps (reaching a key written while nobody held them), and
    // handles the events of every node from then on.
    let gap = "recorder:recorder:sweep:gap";
    cluster.cmd::<i64>(gap, &["DEL", gap]);
    // On a shard `a` held, which only `b`'s takeover sweep reaches.
    let of_a = held_shards(&a);
    let orphan = (0..).map(|n| format!("rec:orphan{n}")).find(|k| of_a.contains(&shard_of(&cluster, k))).unwrap();
    let orphan = orphan.as_str();
    a.kill();
    cluster.set(orphan, "v");
    b.wait_for("holding 3 of 3 shards", Duration::from_secs(20));
    eventually(&b, "the takeover sweep", || cluster.cmd::<Option<String>>(gap, &["GET", gap]).is_some());
    eventually(&b, "the takeover sweep gave the orphan its TTL", || cluster.cmd::<i64>(orphan, &["PTTL", orphan]) > 0);
    let before = cluster.recorded_events("recorder");
    for key in (200..250).map(|n| format!("rec:{n}")) {
        cluster.set(&key, "v");
    }
    eventually(&b, "the next events handled by the one left", || cluster.recorded_events("recorder") == before + 50);
    assert_eq!(b.stop(), Some(0));
}

/// `cachepol acl` on a cluster: the rule applied on every node, two
/// replicas run as that user (leases, shard split, announcements, scans of
/// every primary) and nothing is refused.
#[test]
fn replicas_run_on_a_cluster_as_the_acl_user() {
    let cluster = Cluster::start(3, 0);
    // The user may read notify-keyspace-events, not set it.
    cluster.on_every_node(&["CONFIG", "SET", "notify-keyspace-events", "KEA"]);
    let setup =
        Setup::new(&["genre-invalidation", "ttl-table"]).config("[replicas]\nenabled = true\nlease_ttl_ms = 3000");
    let url = cluster.url_as("cachepol", "s3cret");
    let out = crate::support::acl(&url, &setup, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Apply this rule on every node"));
    let line = String::from_utf8(out.stdout).unwrap();
    let setuser: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(setuser[..2], ["ACL", "SETUSER"], "{line}");
    cluster.on_every_node(&setuser);

    let (a, b) = split_pair_at(&cluster, &url, &setup, &[]);
    let dance: Vec<String> = (0..30).map(|n| format!("service_playlist:dance:{n}")).collect();
    for key in &dance {
        cluster.set(key, "p");
    }
    let jobs: Vec<String> = (0..30).map(|n| format!("job:{n}")).collect();
    for key in &jobs {
        cluster.set(key, "queued");
    }
    assert_eq!(nodes_of(&cluster, &jobs).len(), 3);
    for key in &jobs {
        eventually(&a, &format!("{key} has its TTL"), || cluster.cmd::<i64>(key, &["PTTL", key]) > 0);
    }
    let (ok, out) = cluster.cli(&["deploy", "--service", "catalog", "--tag", "genre=dance"]);
    assert!(ok, "{out}");
    eventually(&a, "the genre's keys deleted from every primary", || {
        cluster.keys("service_playlist:dance:*").is_empty()
    });
    for daemon in [&a, &b] {
        let log = daemon.log_text().to_lowercase();
        assert!(!log.contains("noperm") && !log.contains("no permissions"), "{}", daemon.log_text());
    }
    assert_eq!(a.stop(), Some(0));
    assert_eq!(b.stop(), Some(0));
}

/// A policy's own `scan` walks every primary (its cursor carries the
/// shard), and `mget` of keys on several slots reads them all.
#[test]
fn a_policys_scan_and_mget_reach_every_primary() {
    let cluster = Cluster::start(3, 0);
    let keys: Vec<String> = (0..150).map(|n| format!("rec:{n}")).collect();
    for key in &keys {
        cluster.set(key, "v");
    }
    // Two values on two nodes.
    let other = ('b'..='z')
        .map(|c| format!("rec:{c}"))
        .find(|k| cluster.node_of(k).port != cluster.node_of("rec:a").port)
        .unwrap();
    cluster.set("rec:a", r#"{"count": 2}"#);
    cluster.set(&other, r#"{"count": 5}"#);
    assert_eq!(nodes_of(&cluster, &keys).len(), 3);
    let setup = Setup::new(&["recorder"]).config(&format!(
        "[policies.recorder]\nconfig = {{ count_on_deploy = \"rec:*\", sum_json = [\"rec:a\", \"{other}\", \"rec:none\"] }}"
    ));
    let daemon = cluster.daemon(&setup);
    let (ok, out) = cluster.cli(&["deploy", "--service", "ci"]);
    assert!(ok, "{out}");
    let counted = "recorder:recorder:counted";
    eventually(&daemon, "the keys counted", || cluster.cmd::<Option<String>>(counted, &["GET", counted]).is_some());
    assert_eq!(
        cluster.cmd::<Option<String>>(counted, &["GET", counted]).as_deref(),
        Some("152"),
        "every primary's keys"
    );
    let sum = "recorder:recorder:sum";
    assert_eq!(cluster.cmd::<Option<String>>(sum, &["GET", sum]).as_deref(), Some("7 1"), "both values, one missing");
    assert_eq!(daemon.stop(), Some(0));
}
