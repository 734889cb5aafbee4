//! The fake host as a policy author uses it from `cargo test`.

mod common;

use std::time::Duration;

use cachepol::fake::{AppWrite, FakeHost};
use cachepol::wit::SweepReason;

#[tokio::test]
async fn genre_invalidation_through_the_fake_host_api() {
    let runtime = common::runtime();
    let compiled = common::compile(&runtime, &common::policy("genre-invalidation"));
    let mut host = FakeHost::load(&runtime, &compiled, "{}").await.unwrap();
    assert_eq!(host.policy().name(), "genre-invalidation");

    host.set("graph_data:dance", b"g", Some(Duration::from_secs(3600))).await;
    host.set("service_playlist:dance:web", b"p", None).await;
    host.set("graph_data:rock", b"g", None).await;
    assert!(host.deliveries().is_empty(), "writes to cache keys are not subscribed to");

    host.set("last_updated:dance", b"now", None).await;
    assert_eq!(host.deliveries().len(), 1);
    let report = &host.deliveries()[0].report;
    assert!(report.result.is_ok(), "{:?}", report.result);
    assert_eq!(report.call.effects.deleted, 2);
    let keys: Vec<String> = host.redis().snapshot().into_keys().collect();
    // The trigger ledger's record of the value it acted on, for its sweeps.
    let record = "cachepol-state:genre-invalidation:seen:last_updated:dance";
    assert_eq!(keys, [record, "graph_data:rock", "last_updated:dance"]);

    // Its own deletes produced `del` events; they are not delivered back.
    host.sweep(SweepReason::Manual).await;
    assert_eq!(host.deliveries().len(), 2);
    assert_eq!(host.failures().count(), 0);
    assert_eq!(host.denials().count(), 0);
}

#[tokio::test]
async fn expiry_on_the_virtual_clock_is_delivered_as_expired() {
    let runtime = common::runtime();
    let compiled = common::compile(&runtime, &common::policy("genre-invalidation"));
    let config = r#"{"trigger_ops": ["expired"]}"#;
    let mut host = FakeHost::load(&runtime, &compiled, config).await.unwrap();
    host.set("graph_data:pop", b"g", None).await;
    host.set("last_updated:pop", b"x", Some(Duration::from_secs(300))).await;
    assert!(host.deliveries().is_empty(), "only `expired` is subscribed");
    host.advance(Duration::from_secs(299)).await;
    assert!(host.redis().snapshot().contains_key("graph_data:pop"));
    host.advance(Duration::from_secs(1)).await;
    assert_eq!(host.deliveries().len(), 1);
    assert!(host.redis().snapshot().is_empty());
}

/// ttl-table queues its `EXPIRE`s (`expire-queued`): a batch of events is
/// one call, its writes one pipeline, and the report counts each TTL set.
#[tokio::test]
async fn a_batch_of_key_events_is_one_call_with_exact_effects() {
    let runtime = common::runtime();
    let compiled = common::compile(&runtime, &common::policy("ttl-table"));
    let redis = cachepol::fake::FakeRedis::new();
    for key in ["job:1", "job:2", "lock:3"] {
        redis.app_set(key, b"v", None);
    }
    redis.app_set("job:4", b"v", Some(1_000));
    let backend = std::sync::Arc::new(redis.client("ttl-table"));
    let mut policy = runtime.load(&compiled, backend, &Default::default()).await.unwrap();
    let event = |key: &str| cachepol::wit::KeyEvent { db: 0, op: "set".into(), key: key.into() };
    let events = ["job:1", "job:2", "lock:3", "job:4", "user:5"].map(event).to_vec();
    let report = policy.handle_keys("keys-1-5", events).await;
    assert!(report.result.is_ok(), "{}", report.result.unwrap_err());
    assert_eq!(report.call.effects.expired, 3, "job:4 kept the TTL it had; user:5 has no row");
    let keys = redis.snapshot();
    assert_eq!(keys["job:1"].ttl_ms, Some(86_400_000));
    assert_eq!(keys["lock:3"].ttl_ms, Some(300_000), "a max-only row gives its max");
    assert_eq!(keys["job:4"].ttl_ms, Some(1_000));
    assert_eq!(report.call.host_calls, 4, "one queued EXPIRE per event with a row");

    // Redis gone when the queue is sent: the call fails and says why.
    redis.app_set("job:6", b"v", None);
    redis.set_unavailable(Some("connection refused"));
    let report = policy.handle_keys("key-6", vec![event("job:6")]).await;
    let failure = report.result.unwrap_err().to_string();
    assert!(failure.starts_with("queued writes failed: redis: redis unavailable"), "{failure}");
    assert!(report.call.redis_unavailable > 0, "counted as Redis being away, not the policy's fault");
    redis.set_unavailable(None);
    assert_eq!(redis.snapshot()["job:6"].ttl_ms, None);
}

/// The SDK's `mget_json` and `get_json`, through the recorder fixture: one
/// host call reads every key; a non-string key reads as missing, as with
/// Redis's `MGET`; a value that is not the JSON asked for fails the call,
/// naming the key.
#[tokio::test]
async fn sdk_json_and_multi_key_reads_on_the_fake_host() {
    let runtime = common::runtime();
    let compiled = common::compile(&runtime, &common::fixture("recorder"));
    let config = r#"{"sum_json": ["rec:a", "rec:b", "rec:missing", "rec:queue"]}"#;
    let mut host = FakeHost::load(&runtime, &compiled, config).await.unwrap();
    let redis = host.redis().clone();
    redis.app_set("rec:a", br#"{"count": 2}"#, None);
    redis.app_set("rec:b", br#"{"count": 5}"#, None);
    redis.app_write("rec:queue", &AppWrite::Rpush(vec!["x".into()])).unwrap();
    host.deploy("ci", &[], &[]).await;
    let report = &host.deliveries().last().unwrap().report;
    assert!(report.result.is_ok(), "{:?}", report.result);
    let value = |key: &str| redis.snapshot().get(key).and_then(|s| s.value.as_string().map(<[u8]>::to_vec));
    assert_eq!(value("recorder:recorder:sum").as_deref(), Some(&b"7 2"[..]), "2 + 5, two missing");
    assert_eq!(value("recorder:recorder:first").as_deref(), Some(&b"Some(2)"[..]));
    // deploys counter, mget, set, get, set: the four keys cost one call.
    assert!(report.call.host_calls <= 6, "{} host calls", report.call.host_calls);

    redis.app_set("rec:b", b"not json", None);
    host.deploy("ci", &[], &[]).await;
    let failed: Vec<String> = host.failures().map(|(_, f)| f.to_string()).collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].contains("rec:b") && failed[0].contains("JSON"), "{failed:?}");
}
