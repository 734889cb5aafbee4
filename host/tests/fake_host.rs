//! The fake host as a policy author uses it from `cargo test`.

mod common;

use std::time::Duration;

use cachepol::fake::FakeHost;
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
    assert_eq!(keys, ["graph_data:rock", "last_updated:dance"]);

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
