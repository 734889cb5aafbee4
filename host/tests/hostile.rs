//! Hostile policies are contained: each misbehaviour fails only the call that
//! did it, with the right reason; nothing out of grant reaches the keyspace;
//! the same policy works again on its next event (on a fresh instance); and a
//! well-behaved policy in the same runtime keeps doing its job.

mod common;

use cachepol::fake::{FakeHost, FakeRedis};
use cachepol::sandbox::budget::Budgets;
use cachepol::sandbox::runtime::{CallFailure, LoadError, LoadOptions};
use cachepol::wit::Error;

struct Arena {
    redis: FakeRedis,
    hostile: FakeHost,
    neighbour: FakeHost,
}

async fn arena(on_deploy: &str, budgets: Budgets) -> Arena {
    let runtime = common::runtime();
    let redis = FakeRedis::new();
    for key in ["secret:password", "hostile:ok", "graph_data:dance", "service_playlist:dance:web", "graph_data:rock"] {
        redis.app_set(key, b"v", None);
    }
    redis.take_events();
    let hostile = common::compile(&runtime, &common::fixture("hostile"));
    let options =
        LoadOptions { config: format!(r#"{{"on_deploy": "{on_deploy}"}}"#), budgets, ..LoadOptions::default() };
    let hostile = FakeHost::load_on(&runtime, &hostile, &options, redis.clone()).await.unwrap();
    let good = common::compile(&runtime, &common::policy("genre-invalidation"));
    let neighbour = FakeHost::load_on(&runtime, &good, &LoadOptions::default(), redis.clone()).await.unwrap();
    Arena { redis, hostile, neighbour }
}

impl Arena {
    /// Trigger the misbehaviour and return how the call failed.
    async fn provoke(&mut self) -> CallFailure {
        self.hostile.deploy("ci", &[], &[]).await;
        let delivery = self.hostile.deliveries().last().expect("the hook was delivered");
        delivery.report.result.clone().expect_err("the hostile call must fail")
    }

    /// The neighbour and the hostile policy itself still work afterwards.
    async fn assert_everyone_recovers(&mut self) {
        self.neighbour.deploy("catalog", &[], &[("genre", "dance")]).await;
        let report = &self.neighbour.deliveries().last().unwrap().report;
        assert!(report.result.is_ok(), "neighbour failed: {:?}", report.result);
        let keys = self.redis.snapshot();
        assert!(!keys.contains_key("graph_data:dance"), "the neighbour did its job");
        assert!(!keys.contains_key("service_playlist:dance:web"));
        assert!(keys.contains_key("graph_data:rock"));
        assert!(keys.contains_key("secret:password"), "nothing out of grant was touched");

        self.hostile.set("hostile:in:after", b"1", None).await;
        let report = &self.hostile.deliveries().last().unwrap().report;
        assert!(report.result.is_ok(), "the hostile policy's next event failed: {:?}", report.result);
        assert!(self.redis.snapshot().contains_key("hostile:seen:after"));
    }
}

fn small_fuel() -> Budgets {
    Budgets { fuel: 20_000_000, ..Budgets::default() }
}

#[tokio::test]
async fn an_infinite_loop_runs_out_of_fuel() {
    let mut a = arena("spin", small_fuel()).await;
    assert_eq!(a.provoke().await, CallFailure::OutOfFuel(20_000_000));
    a.assert_everyone_recovers().await;
    assert_eq!(a.hostile.policy().stats().restarts, 1, "the trapped instance was replaced");
}

#[tokio::test]
async fn exponential_recursion_runs_out_of_fuel() {
    let mut a = arena("recurse", small_fuel()).await;
    assert_eq!(a.provoke().await, CallFailure::OutOfFuel(20_000_000));
    a.assert_everyone_recovers().await;
}

#[tokio::test]
async fn unbounded_recursion_exhausts_the_stack_only() {
    let mut a = arena("deep", Budgets::default()).await;
    match a.provoke().await {
        CallFailure::Trap(why) => assert!(why.contains("call stack exhausted"), "{why}"),
        other => panic!("expected a stack overflow trap, got {other:?}"),
    }
    a.assert_everyone_recovers().await;
}

#[tokio::test]
async fn a_memory_bomb_hits_the_memory_budget() {
    let limit = 16 << 20;
    let mut a = arena("membomb", Budgets { memory_bytes: limit, ..Budgets::default() }).await;
    match a.provoke().await {
        CallFailure::Memory { wanted, limit: l } => {
            assert_eq!(l, limit);
            assert!(wanted > limit);
        }
        other => panic!("expected a memory failure, got {other:?}"),
    }
    a.assert_everyone_recovers().await;
}

#[tokio::test]
async fn a_guest_panic_is_reported_with_its_message() {
    let mut a = arena("panic", Budgets::default()).await;
    match a.provoke().await {
        CallFailure::Panic(message) => {
            assert!(message.contains("the hostile fixture panics on purpose"), "{message}");
            assert!(message.contains("src/lib.rs"), "{message}");
        }
        other => panic!("expected a panic, got {other:?}"),
    }
    a.assert_everyone_recovers().await;
}

/// Calls outside the grants come back as `denied` and change nothing.
async fn assert_denied(mode: &str, op: &str, target: &str) {
    let mut a = arena(mode, Budgets::default()).await;
    let before = a.redis.snapshot();
    match a.provoke().await {
        CallFailure::Returned(Error::Denied(d)) => {
            assert_eq!((d.op.as_str(), d.target.as_str()), (op, target), "{}", d.reason);
        }
        other => panic!("{mode}: expected a denial, got {other:?}"),
    }
    assert_eq!(a.redis.snapshot(), before, "{mode}: a denied call must not touch the keyspace");
    assert_eq!(a.hostile.denials().count(), 1);
    a.assert_everyone_recovers().await;
}

#[tokio::test]
async fn reads_and_writes_outside_the_grants_are_denied() {
    assert_denied("escape-get", "get", "secret:password").await;
    // One key of two is out of grant: the whole call is refused, so the
    // in-grant key survives too.
    assert_denied("escape-del", "del", "secret:password").await;
    assert_denied("escape-lock", "lock-acquire", "lock:global").await;
}

#[tokio::test]
async fn patterns_wider_than_the_grants_are_denied() {
    assert_denied("star-scan", "scan", "*").await;
    assert_denied("class-scan", "scan", "[a-z]*").await;
    assert_denied("prefix-trick", "delete-matching", "hostile*").await;
    assert_denied("escaped-star", "delete-matching", "hostile\\*").await;
}

#[tokio::test]
async fn a_huge_value_is_refused_by_the_value_budget() {
    let mut a = arena("huge-value", Budgets::default()).await;
    match a.provoke().await {
        CallFailure::Budget(why) => assert!(why.contains("values are limited to 1048576 bytes"), "{why}"),
        other => panic!("expected a budget failure, got {other:?}"),
    }
    assert!(!a.redis.snapshot().contains_key("hostile:big"));
    a.assert_everyone_recovers().await;
}

#[tokio::test]
async fn a_host_call_flood_fails_even_when_the_errors_are_swallowed() {
    let mut a = arena("flood", Budgets { host_calls: 50, ..Budgets::default() }).await;
    match a.provoke().await {
        CallFailure::Budget(why) => assert_eq!(why, "more than 50 host calls in one event"),
        other => panic!("expected a budget failure, got {other:?}"),
    }
    a.assert_everyone_recovers().await;
}

#[tokio::test]
async fn queued_writes_without_end_fail_on_the_host_call_budget() {
    // Each queued key is 10 KB: the host sends the queue every 1 MiB
    // rather than holding what the budget allows (1,000 keys, 10 MB here;
    // 640 MB for a batch of 64 events).
    let mut a = arena("queue-flood", Budgets::default()).await;
    match a.provoke().await {
        CallFailure::Budget(why) => assert_eq!(why, "more than 1000 host calls in one event"),
        other => panic!("expected a budget failure, got {other:?}"),
    }
    let report = &a.hostile.deliveries().last().unwrap().report;
    assert_eq!(report.call.host_calls, 1_001);
    a.assert_everyone_recovers().await;
}

#[tokio::test]
async fn grant_checks_built_to_be_slow_run_out_of_their_allowance() {
    // 1,000 distinct patterns, each as costly to check as the limit of one
    // check allows: the event's allowance ends the game after a few.
    let mut a = arena("grant-bomb", Budgets::default()).await;
    let started = std::time::Instant::now();
    match a.provoke().await {
        CallFailure::Budget(why) => assert!(why.contains("used up their work allowance"), "{why}"),
        other => panic!("expected a budget failure, got {other:?}"),
    }
    eprintln!("1,000 hostile grant checks took {:?} in all (debug build)", started.elapsed());
    let report = &a.hostile.deliveries().last().unwrap().report;
    assert!(
        (1..=20).contains(&report.call.denials_total),
        "only the first checks did work: {}",
        report.call.denials_total
    );
    assert!(report.call.denials.iter().all(|d| d.reason.contains("too complex")), "{:?}", report.call.denials);
    a.assert_everyone_recovers().await;
}

#[tokio::test]
async fn output_past_the_log_budget_is_dropped_and_counted() {
    let mut a = arena("output-flood", Budgets { log_lines: 50, ..Budgets::default() }).await;
    a.hostile.deploy("ci", &[], &[]).await;
    let report = &a.hostile.deliveries().last().unwrap().report;
    assert!(report.result.is_ok(), "printing is not a failure: {:?}", report.result);
    assert_eq!(report.call.log_lines, 20_000, "every line of stdout and stderr counted");
    assert_eq!(report.call.logs_dropped, 20_000 - 50, "all but the budget's 50 dropped");
    a.assert_everyone_recovers().await;
}

#[tokio::test]
async fn bulk_deletes_stop_at_the_keys_touched_budget() {
    let mut a = arena("wipe", Budgets { keys_touched: 10, ..Budgets::default() }).await;
    for i in 0..25 {
        a.redis.app_set(&format!("hostile:k{i}"), b"", None);
    }
    a.redis.take_events();
    match a.provoke().await {
        CallFailure::Budget(why) => assert!(why.contains("stopped after changing 10 keys"), "{why}"),
        other => panic!("expected a budget failure, got {other:?}"),
    }
    // 25 keys plus `hostile:ok`, all inside `hostile:*`.
    let left = a.redis.snapshot().keys().filter(|k| k.starts_with("hostile:")).count();
    assert_eq!(left, 16, "exactly the budget's worth of keys was deleted");
    a.assert_everyone_recovers().await;
}

#[tokio::test]
async fn a_garbage_manifest_is_refused_with_every_problem_named() {
    let runtime = common::runtime();
    let compiled = common::compile(&runtime, &common::fixture("hostile"));
    let options = LoadOptions { config: r#"{"garbage_manifest": true}"#.into(), ..LoadOptions::default() };
    let err = FakeHost::load_on(&runtime, &compiled, &options, FakeRedis::new()).await.err().expect("refused");
    let LoadError::Manifest(m) = &err else { panic!("expected a manifest error, got {err}") };
    let text = err.to_string();
    for needle in
        ["name ``", "not-a-version", "the pattern is empty", "listed twice", "allows no operation", "secret:*"]
    {
        assert!(text.contains(needle), "missing {needle:?} in {text}");
    }
    assert_eq!(m.problems.len(), 6, "{text}");
}

#[tokio::test]
async fn a_rejected_config_refuses_the_load() {
    let runtime = common::runtime();
    let compiled = common::compile(&runtime, &common::fixture("hostile"));
    let options = LoadOptions { config: r#"{"reject_config": true}"#.into(), ..LoadOptions::default() };
    let err = FakeHost::load_on(&runtime, &compiled, &options, FakeRedis::new()).await.err().expect("refused");
    assert_eq!(err.to_string(), "configure failed: this config is refused on purpose");
    let options = LoadOptions { config: r#"{"on_deploy": 3}"#.into(), ..LoadOptions::default() };
    let err = FakeHost::load_on(&runtime, &compiled, &options, FakeRedis::new()).await.err().expect("refused");
    assert!(err.to_string().starts_with("configure failed: invalid config: invalid type: integer `3`"), "{err}");
}

#[tokio::test]
async fn a_policy_that_never_returns_from_configure_is_refused_and_the_host_goes_on() {
    let runtime = common::runtime();
    let compiled = common::compile(&runtime, &common::fixture("hostile"));
    let options = LoadOptions {
        config: r#"{"spin_in_configure": true}"#.into(),
        budgets: small_fuel(),
        ..LoadOptions::default()
    };
    let err = FakeHost::load_on(&runtime, &compiled, &options, FakeRedis::new()).await.err().expect("refused");
    let err = err.to_string();
    assert!(err.starts_with("configure failed: CPU budget exhausted: out of fuel"), "{err}");
    // The same runtime loads and runs a well-behaved policy afterwards.
    let good = common::compile(&runtime, &common::policy("genre-invalidation"));
    let mut neighbour = FakeHost::load_on(&runtime, &good, &LoadOptions::default(), FakeRedis::new()).await.unwrap();
    neighbour.deploy("catalog", &[], &[("genre", "dance")]).await;
    assert!(neighbour.deliveries().last().unwrap().report.result.is_ok());
}
