//! Hot reload of real files in the policies directory: atomic swaps under
//! load, rejected files that leave the running version serving, unloading,
//! conflicts, the compile cache, SIGHUP.

use std::process::Command;
use std::time::Duration;

use crate::support::{Daemon, RedisServer, Setup, TempDir, eventually, install, stamped, wasm};

const REC: &str = "[policies.rec]\nconfig = { name = \"rec\", patterns = [\"rec:*\"], mark_prefix = \"mark:\" }";

fn setup_with(config: &str) -> (Setup, TempDir) {
    let cache = TempDir::new("cache");
    let setup = Setup::new(&[]).config(&format!("cache_dir = {:?}", cache.path())).config(config);
    install(&setup.policies(), "rec", &stamped(1));
    (setup, cache)
}

fn mark(redis: &RedisServer, key: &str) -> Option<String> {
    redis.cmd(&["GET", &format!("mark:{key}")])
}

#[test]
fn swapping_under_load_handles_every_event_exactly_once() {
    const N: usize = 20_000;
    const M: u32 = 10;
    let redis = RedisServer::start();
    let (setup, _cache) = setup_with(&format!("queue_capacity = 100000\n{REC}"));
    let daemon = Daemon::start(&redis, &setup);

    let url = redis.url();
    let writer = std::thread::spawn(move || {
        let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
        for batch in 0..N / 200 {
            let mut pipe = redis::pipe();
            for i in batch * 200..(batch + 1) * 200 {
                pipe.cmd("SET").arg(format!("rec:{i:05}")).arg("v").ignore();
            }
            pipe.query::<()>(&mut conn).unwrap();
            std::thread::sleep(Duration::from_millis(15));
        }
    });
    for v in 2..=M + 1 {
        install(&setup.policies(), "rec", &stamped(v));
        daemon.wait_for(&format!("policy reloaded: 1.0.{} -> 1.0.{v}", v - 1), Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(100));
    }
    writer.join().unwrap();

    eventually(&daemon, "every write handled", || redis.keys("mark:rec:*").len() == N);
    assert!(redis.keys("mark:dup:*").is_empty(), "no event was handled twice");
    let keys: Vec<String> = (0..N).map(|i| format!("mark:rec:{i:05}")).collect();
    let mut stamps: Vec<u32> = Vec::new();
    for chunk in keys.chunks(1000) {
        let mut cmd = redis::cmd("MGET");
        cmd.arg(chunk);
        let values: Vec<String> = cmd.query(&mut redis.conn()).unwrap();
        stamps.extend(values.iter().map(|v| v.parse::<u32>().unwrap()));
    }
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "events are handled in order, each by the version live then");
    let versions: std::collections::BTreeSet<u32> = stamps.iter().copied().collect();
    assert!(versions.len() >= 3, "the swaps overlapped the writes: versions {versions:?}");
    assert!(versions.iter().all(|v| (1..=M + 1).contains(v)));
    assert!(!daemon.log_text().contains("policy rejected"));
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn rejected_files_leave_the_running_version_serving() {
    let redis = RedisServer::start();
    let operator_grants = "grants = [{ pattern = \"rec:*\", ops = [\"read\", \"write\", \"delete\", \"expire\"] }, \
        { pattern = \"recorder:rec:*\", ops = [\"read\", \"write\", \"delete\", \"expire\"] }, \
        { pattern = \"mark:*\", ops = [\"read\", \"write\", \"delete\", \"expire\"] }, \
        { pattern = \"stamp:00000001:*\", ops = [\"read\"] }]";
    let (setup, _cache) = setup_with(&format!(
        "[policies.rec]\nconfig = {{ name = \"rec\", mark_prefix = \"mark:\", stamped_grant = true }}\n{operator_grants}"
    ));
    let daemon = Daemon::start(&redis, &setup);
    let good = stamped(2);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("corrupt", vec![0x42; 4096], "not a WebAssembly file"),
        ("truncated", good[..good.len() / 2].to_vec(), "the file is truncated"),
        ("wrong world", std::fs::read(wasm("not-a-policy")).unwrap(), "does not implement the cachepol:policy/policy"),
        ("configure rejects", std::fs::read(wasm("hostile")).unwrap(), "configure failed: invalid config"),
        ("grants forbidden", stamped(3), "wider than what it asks for"),
    ];
    for (round, (what, bytes, why)) in cases.into_iter().enumerate() {
        install(&setup.policies(), "rec", &bytes);
        eventually(&daemon, what, || daemon.log_text().matches("policy rejected").count() > round);
        let line = daemon.log_text().lines().filter(|l| l.contains("policy rejected")).nth(round).unwrap().to_owned();
        assert!(line.contains(why) && line.contains("the running version keeps serving"), "{what}: {line}");
        let key = format!("rec:after-{round}");
        redis.cmd::<()>(&["SET", &key, "v"]);
        eventually(&daemon, "the old version handles it", || mark(&redis, &key).as_deref() == Some("00000001"));
    }
    // The operator puts the good file back: the log says it serves on.
    install(&setup.policies(), "rec", &stamped(1));
    daemon.wait_for("policy file restored to the version that kept serving", Duration::from_secs(20));
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn deleting_unloads_readding_loads_and_duplicate_names_are_refused() {
    let redis = RedisServer::start();
    let (setup, _cache) = setup_with(&format!(
        "{REC}\n[policies.impostor]\nconfig = {{ name = \"rec\", patterns = [\"rec:*\"], mark_prefix = \"other:\" }}"
    ));
    let daemon = Daemon::start(&redis, &setup);
    let file = setup.policies().join("rec.wasm");

    std::fs::remove_file(&file).unwrap();
    daemon.wait_for("policy unloaded", Duration::from_secs(20));
    redis.cmd::<()>(&["SET", "rec:while-gone", "v"]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(mark(&redis, "rec:while-gone"), None, "nobody handles events for an unloaded policy");

    install(&setup.policies(), "rec", &stamped(4));
    daemon.wait_for("policy loaded policy=rec version=1.0.4", Duration::from_secs(20));
    // The subscription follows the policies a moment after they load (what
    // it missed meanwhile is swept): unsubscribed while nothing was loaded,
    // subscribed again.
    eventually(&daemon, "the subscription back", || {
        daemon.log_text().matches("keyspace subscription follows the loaded policies").count() == 2
    });
    redis.cmd::<()>(&["SET", "rec:back", "v"]);
    eventually(&daemon, "loaded again", || mark(&redis, "rec:back").as_deref() == Some("00000004"));

    install(&setup.policies(), "impostor", &stamped(5));
    eventually(&daemon, "the impostor is refused", || daemon.log_text().contains("declares policy `rec`, which"));
    let log = daemon.log_text();
    let line = log.lines().find(|l| l.contains("declares policy `rec`")).unwrap();
    assert!(line.contains("impostor.wasm") && line.contains("rec.wasm"), "both paths named: {line}");
    redis.cmd::<()>(&["SET", "rec:after", "v"]);
    eventually(&daemon, "the original still serves", || mark(&redis, "rec:after").as_deref() == Some("00000004"));
    assert!(redis.keys("other:*").is_empty());
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_file_caught_mid_copy_is_loaded_once_complete_without_an_error() {
    let redis = RedisServer::start();
    let (setup, _cache) = setup_with(REC);
    let daemon = Daemon::start(&redis, &setup);
    let next = stamped(7);
    let file = setup.policies().join("rec.wasm");
    // An in-place copy, caught halfway.
    std::fs::write(&file, &next[..next.len() / 2]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    std::fs::write(&file, &next).unwrap();
    daemon.wait_for("policy reloaded: 1.0.1 -> 1.0.7", Duration::from_secs(20));
    assert!(!daemon.log_text().contains("policy rejected"), "a half-written file is not a failure");
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn new_subscriptions_get_a_reload_sweep() {
    let redis = RedisServer::start();
    let (setup, _cache) =
        setup_with("[policies.rec]\nconfig = { name = \"rec\", mark_prefix = \"mark:\", stamped_grant = true }");
    let daemon = Daemon::start(&redis, &setup);
    install(&setup.policies(), "rec", &stamped(2));
    daemon.wait_for("policy reloaded: 1.0.1 -> 1.0.2", Duration::from_secs(20));
    let line = daemon.log_text().lines().find(|l| l.contains("policy reloaded")).unwrap().to_owned();
    assert!(
        line.contains("stamp:00000002:*(read)") && line.contains("stamp:00000001:*(read)"),
        "grant changes: {line}"
    );
    eventually(&daemon, "sweep(reload)", || {
        redis.cmd::<Option<String>>(&["GET", "recorder:rec:sweep:reload"]).as_deref() == Some("1")
    });
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_restart_with_a_warm_cache_does_not_recompile() {
    let redis = RedisServer::start();
    let (setup, _cache) = setup_with(REC);
    let daemon = Daemon::start(&redis, &setup);
    assert!(daemon.log_text().contains("1 compiled, 0 from the compile cache"), "{}", daemon.log_text());
    assert_eq!(daemon.stop(), Some(0));
    let daemon = Daemon::start(&redis, &setup);
    assert!(daemon.log_text().contains("0 compiled, 1 from the compile cache"), "{}", daemon.log_text());
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn without_watching_sighup_reloads() {
    let redis = RedisServer::start();
    let (setup, _cache) = setup_with(REC);
    let daemon = Daemon::spawn(&redis, &setup, &["--configure-notifications", "--no-watch"]);
    daemon.wait_for("cachepol ready", Duration::from_secs(60));
    install(&setup.policies(), "rec", &stamped(9));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!daemon.log_text().contains("policy reloaded"), "not watching");
    Command::new("kill").arg("-HUP").arg(daemon.pid().to_string()).status().unwrap();
    daemon.wait_for("policy reloaded: 1.0.1 -> 1.0.9", Duration::from_secs(20));
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn events_queued_across_a_swap_reach_the_new_version_only_if_it_subscribes() {
    let redis = RedisServer::start();
    // Each version hears `stamp:<its stamp>:*` only, and is slow, so events
    // for version 1's keys are still queued when version 2 takes over.
    let (setup, _cache) = setup_with(
        "queue_capacity = 100000\n[policies.rec]\nconfig = { name = \"rec\", mark_prefix = \"mark:\", stamped_grant = true, work = 3000000 }",
    );
    let daemon = Daemon::start(&redis, &setup);
    let mut pipe = redis::pipe();
    for i in 0..2_000 {
        pipe.cmd("SET").arg(format!("stamp:00000001:{i:04}")).arg("v").ignore();
    }
    pipe.query::<()>(&mut redis.conn()).unwrap();
    eventually(&daemon, "version 1 is working through the queue", || !redis.keys("mark:stamp:*").is_empty());
    install(&setup.policies(), "rec", &stamped(2));
    daemon.wait_for("policy reloaded: 1.0.1 -> 1.0.2", Duration::from_secs(20));
    daemon.wait_for("not for this version", Duration::from_secs(20));
    let marks = redis.keys("mark:stamp:00000001:*");
    assert!(marks.len() < 2_000, "the swap came before version 1 was done; the test proves nothing");
    for key in marks {
        assert_eq!(
            redis.cmd::<String>(&["GET", &key]),
            "00000001",
            "{key} reached version 2, which does not subscribe to it"
        );
    }
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_renamed_or_relinked_policy_file_keeps_its_policy_loaded() {
    let redis = RedisServer::start();
    // Config sections are keyed by file name: the same one under each name.
    let same = |stem: &str| REC.replace("[policies.rec]", &format!("[policies.{stem}]"));
    let (setup, _cache) = setup_with(&[REC.to_owned(), same("renamed"), same("linked")].join("\n"));
    let daemon = Daemon::start(&redis, &setup);
    let dir = setup.policies();
    // `mv`: however the watcher orders "appeared" and "went", the policy
    // stays loaded and keeps handling events.
    std::fs::rename(dir.join("rec.wasm"), dir.join("renamed.wasm")).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    redis.cmd::<()>(&["SET", "rec:after-rename", "v"]);
    eventually(&daemon, "handled after the rename", || mark(&redis, "rec:after-rename").is_some());
    // A second name for the file first (rejected: the policy is provided
    // already), then the first name removed: the second takes over.
    std::fs::hard_link(dir.join("renamed.wasm"), dir.join("linked.wasm")).unwrap();
    daemon.wait_for("already provides", Duration::from_secs(20));
    std::fs::remove_file(dir.join("renamed.wasm")).unwrap();
    daemon.wait_for("linked.wasm grants=", Duration::from_secs(20));
    // The subscription follows a moment after the load (it may go through
    // "no policy, no channel"; what it missed is swept): a write until one
    // is handled.
    let mut n = 0;
    eventually(&daemon, "handled after the relink", || {
        n += 1;
        redis.cmd::<()>(&["SET", &format!("rec:after-relink:{n}"), "v"]);
        std::thread::sleep(Duration::from_millis(50));
        !redis.keys("mark:rec:after-relink:*").is_empty()
    });
    assert_eq!(daemon.stop(), Some(0));
}

/// The recorder's grants allow deletes, so the key index would make the
/// subscription carry every op and need every flag: the tests of which
/// channels and flags follow the policies turn it off.
const NO_INDEX: &str = "[index]\nenabled = false\n";

#[test]
fn a_policy_loaded_later_that_needs_more_notifications_gets_them() {
    let redis = RedisServer::start();
    let (setup, _cache) = setup_with(&format!("{NO_INDEX}{REC}"));
    let daemon = Daemon::start(&redis, &setup);
    let flags = || redis.cmd::<Vec<String>>(&["CONFIG", "GET", "notify-keyspace-events"]).remove(1);
    assert!(!flags().contains('x'), "nothing loaded needs expired events yet: {}", flags());
    // file-cache-clear waits for `expired` on edit locks.
    std::fs::copy(wasm("file-cache-clear"), setup.policies().join("file-cache-clear.wasm")).unwrap();
    daemon.wait_for("policy loaded policy=file-cache-clear", Duration::from_secs(30));
    eventually(&daemon, "the flag it needs is set without a reconnect", || flags().contains('x'));
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn the_subscription_follows_the_ops_the_loaded_policies_listen_to() {
    let redis = RedisServer::start();
    let (setup, _cache) = setup_with(&format!(
        "{NO_INDEX}{REC}\n[policies.deleter]\nconfig = {{ name = \"deleter\", ops = [\"del\"], patterns = [\"gone:*\"] }}"
    ));
    let daemon = Daemon::start(&redis, &setup);
    daemon.wait_for("subscribed to keyspace notifications ops=set", Duration::from_secs(20));
    let channels = || redis.cmd::<Vec<String>>(&["PUBSUB", "CHANNELS", "__keyevent@0__:*"]);
    assert_eq!(channels(), ["__keyevent@0__:set"], "only what rec listens to");

    std::fs::copy(wasm("recorder"), setup.policies().join("deleter.wasm")).unwrap();
    daemon.wait_for("keyspace subscription follows the loaded policies ops=del set", Duration::from_secs(30));
    let mut now = channels();
    now.sort();
    assert_eq!(now, ["__keyevent@0__:del", "__keyevent@0__:set"]);
    redis.cmd::<()>(&["SET", "gone:1", "v"]);
    redis.cmd::<()>(&["DEL", "gone:1"]);
    eventually(&daemon, "the new op's event delivered", || redis.recorded_events("deleter") == 1);
    eventually(&daemon, "a reload sweep for what it may have missed", || {
        redis.cmd::<Option<u64>>(&["GET", "recorder:deleter:sweep:reload"]).is_some()
    });

    std::fs::remove_file(setup.policies().join("deleter.wasm")).unwrap();
    daemon.wait_for("policy unloaded", Duration::from_secs(30));
    eventually(&daemon, "its channel dropped", || channels() == ["__keyevent@0__:set"]);
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn switching_between_a_pattern_and_channels_delivers_each_event_once() {
    let redis = RedisServer::start();
    // The echoer copies each `echo:*` write to `echo:copy:<key>`, which it
    // hears too: an event delivered twice would be counted twice, and a
    // duplicate of its own write would slip past echo suppression.
    let (setup, _cache) = setup_with(&format!(
        "{NO_INDEX}[policies.echoer]\nconfig = {{ name = \"echoer\", ops = [\"set\"], patterns = [\"echo:*\"], \
         copy_prefix = \"echo:copy:\" }}\n[policies.every]\nconfig = {{ name = \"every\", ops = [], patterns = [\"other:*\"] }}",
    ));
    std::fs::remove_file(setup.policies().join("rec.wasm")).unwrap();
    std::fs::copy(wasm("recorder"), setup.policies().join("echoer.wasm")).unwrap();
    let daemon = Daemon::start(&redis, &setup);
    daemon.wait_for("subscribed to keyspace notifications ops=set", Duration::from_secs(20));
    // Writes all along, while a policy listening to every op comes (one
    // pattern replaces the channels) and goes (channels replace it): for a
    // moment both are subscribed and Redis sends each event twice.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (url, stop) = (redis.url(), stop.clone());
        std::thread::spawn(move || {
            let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut pipe = redis::pipe();
                for _ in 0..20 {
                    n += 1;
                    pipe.cmd("SET").arg(format!("echo:{n:06}")).arg("v").ignore();
                }
                pipe.query::<()>(&mut conn).unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
            n
        })
    };
    std::fs::copy(wasm("recorder"), setup.policies().join("every.wasm")).unwrap();
    daemon.wait_for("keyspace subscription follows the loaded policies ops=every op", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(200));
    std::fs::remove_file(setup.policies().join("every.wasm")).unwrap();
    daemon.wait_for("keyspace subscription follows the loaded policies ops=set", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap();
    eventually(&daemon, "every write copied", || redis.keys("echo:copy:*").len() as u64 == written);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(redis.recorded_events("echoer"), written, "one event per write, none twice, no echo");
    assert!(redis.keys("echo:copy:echo:copy:*").is_empty(), "its own copies were not copied again");
    assert_eq!(daemon.stop(), Some(0));
}
