//! What the sandbox costs per event: ttl-table's `on_key` through WIT (a
//! reused instance; two host calls, each grant-checked and budgeted)
//! against the same logic compiled natively, calling the same in-memory
//! backend directly.

use std::sync::Arc;
use std::time::Instant;

use cachepol::fake::FakeRedis;
use cachepol::sandbox::runtime::{LoadOptions, Runtime, RuntimeConfig};
use cachepol::store::backend::Backend;
use cachepol::store::redis::RedisBackend;
use cachepol::store::target::RedisTarget;
use cachepol::wit::{self, ExpireCondition, KeyEvent};
use cachepol_guest_sdk::glob::Glob;

use crate::report::Row;
use crate::support::{RedisServer, wasm};
use crate::{Sizes, repeat, secs};

const KEY: &str = "bench:x";
/// One row, with `ttl` and `max`; the key already has a TTL between the two,
/// so each event makes both calls (`EXPIRE NX`, `EXPIRE LT`) and changes
/// nothing: a steady state.
const CONFIG: &str = r#"{"rows": [{"pattern": "other:*", "ttl": 10}, {"pattern": "bench:*", "ttl": 60, "max": 120}]}"#;

/// ttl-table's `on_key`, natively.
async fn native_on_key(rows: &[(Glob, u64, u64)], backend: &dyn Backend, key: &str) -> bool {
    let Some((_, ttl, max)) = rows.iter().find(|(g, _, _)| g.matches(key)) else { return false };
    let given = backend.expire(key, ttl * 1000, ExpireCondition::IfPersistent).await.unwrap();
    if given {
        return true;
    }
    backend.expire(key, max * 1000, ExpireCondition::IfShorter).await.unwrap()
}

/// ns per call through WIT and natively, over `backend`, where `KEY`
/// already has a TTL between the row's `ttl` and `max`.
fn measure(sizes: &Sizes, tokio: &tokio::runtime::Runtime, backend: Arc<dyn Backend>, calls: u64) -> (f64, f64) {
    let runtime = Runtime::new(RuntimeConfig::default()).unwrap();
    let compiled = runtime.compile_file(&wasm("ttl-table")).unwrap();
    let options = LoadOptions { config: CONFIG.into(), ..LoadOptions::default() };
    let mut policy = tokio.block_on(runtime.load(&compiled, backend.clone(), &options)).unwrap();
    let event = wit::Event::Key(KeyEvent { db: 0, op: "set".into(), key: KEY.into() });
    let wit_ns = repeat(sizes.reps, || {
        tokio.block_on(async {
            let started = Instant::now();
            for _ in 0..calls {
                let report = policy.handle("bench", &event).await;
                assert!(report.result.is_ok() && report.call.host_calls == 2, "{:?}", report.result);
            }
            secs(started) * 1e9 / calls as f64
        })
    });
    let rows = [(Glob::new("other:*"), 10, 10), (Glob::new("bench:*"), 60, 120)];
    let native_ns = repeat(sizes.reps, || {
        tokio.block_on(async {
            let started = Instant::now();
            for _ in 0..calls {
                assert!(!native_on_key(&rows, &*backend, std::hint::black_box(KEY)).await);
            }
            secs(started) * 1e9 / calls as f64
        })
    });
    (wit_ns, native_ns)
}

pub fn run(redis: &RedisServer, sizes: &Sizes, tokio: &tokio::runtime::Runtime) -> Vec<Row> {
    let fake = FakeRedis::new();
    fake.app_set(KEY, b"v", Some(90_000));
    let (wit_ns, native_ns) = measure(sizes, tokio, Arc::new(fake.client("ttl-table")), sizes.calls);
    let ratio = wit_ns / native_ns;

    // The same over real Redis, where each host call is a round trip: what
    // the sandbox adds to an event's cost in production.
    redis.cmd::<()>(&["SET", KEY, "v", "EX", "90"]);
    let real: Arc<dyn Backend> =
        Arc::new(tokio.block_on(RedisBackend::connect(&RedisTarget::Single(redis.client()))).unwrap());
    let (wit_real, native_real) = measure(sizes, tokio, real, sizes.calls / 10);
    vec![
        Row {
            scenario: "policy call, 2 host calls, reused instance, in-memory backend".into(),
            cachepol: format!("{:.2} us/call (WIT)", wit_ns / 1000.0),
            baseline: format!("same logic native, same backend: {:.2} us/call", native_ns / 1000.0),
            ratio: format!("{ratio:.2}x"),
            target: "<= 2x".into(),
            met: Some(ratio <= 2.0),
        },
        Row {
            scenario: "the same over real Redis (2 round trips per call)".into(),
            cachepol: format!("{:.1} us/call (WIT)", wit_real / 1000.0),
            baseline: format!("same logic native: {:.1} us/call", native_real / 1000.0),
            ratio: format!("{:.2}x", wit_real / native_real),
            target: "(context)".into(),
            met: None,
        },
    ]
}
