//! `SCAN` walks of many pages on a real `redis-server`, whose page writes
//! run beside the next `SCAN` ([`cachepol::store::redis`]): an exact limit
//! still changes exactly that many keys, slices taken whole go on where the
//! last one stopped until the walk is done, and every page's writes are
//! told before they are sent and after they are answered (the echo
//! ledger's pairing).

#[path = "../../tests/e2e/support/mod.rs"]
mod support;

use std::sync::Mutex;

use cachepol::store::backend::{Backend, BulkPlan, BulkStep};
use cachepol::store::redis::RedisBackend;
use cachepol::store::target::RedisTarget;
use cachepol::wit::ExpireRow;

use support::RedisServer;

/// Keys `k:<i>` (and as many `other:<i>`), none with a TTL: several pages.
const KEYS: u64 = 5_000;

fn allow_all(_: &[u8]) -> bool {
    true
}

/// The keys told before their writes and not yet after, and whether an
/// `After` ever came for keys not told before.
#[derive(Default)]
struct Steps {
    open: Mutex<Vec<Vec<Vec<u8>>>>,
    unpaired: Mutex<bool>,
}

impl Steps {
    fn step(&self, step: BulkStep<'_>) {
        let mut open = self.open.lock().unwrap();
        match step {
            BulkStep::Before(keys) => open.push(keys.to_vec()),
            BulkStep::After(keys) => match open.iter().position(|k| k == keys) {
                Some(at) => drop(open.remove(at)),
                None => *self.unpaired.lock().unwrap() = true,
            },
        }
    }

    fn paired(&self) -> bool {
        self.open.lock().unwrap().is_empty() && !*self.unpaired.lock().unwrap()
    }
}

async fn backend(redis: &RedisServer) -> RedisBackend {
    let target = RedisTarget::Single(redis::Client::open(redis.url()).unwrap());
    RedisBackend::connect(&target).await.unwrap()
}

fn fill(redis: &RedisServer) {
    let mut conn = redis.conn();
    let mut pipe = redis::pipe();
    for i in 0..KEYS {
        pipe.cmd("SET").arg(format!("k:{i}")).arg("v").ignore();
        pipe.cmd("SET").arg(format!("other:{i}")).arg("v").ignore();
    }
    pipe.query::<()>(&mut conn).unwrap();
}

fn rows() -> Vec<ExpireRow> {
    vec![ExpireRow { pattern: "k:*".into(), ttl_ms: 600_000, only_if_persistent: true }]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exact_limit_changes_exactly_that_many_keys_over_many_pages() {
    let redis = RedisServer::start();
    fill(&redis);
    let backend = backend(&redis).await;
    let steps = Steps::default();
    let told = |step: BulkStep<'_>| steps.step(step);
    let mut plan = BulkPlan::new(&allow_all, 2_345);
    plan.steps = Some(&told);
    let result = backend.expire_matching(&rows(), &plan).await.unwrap();
    assert_eq!(result.affected, 2_345);
    assert!(result.truncated);
    assert_eq!(redis.keyspace().1, 2_345, "no key past the limit got a TTL");
    assert!(steps.paired(), "every page told before and after");
    // Again over keys already done: they answer unchanged and leave room.
    let result = backend.expire_matching(&rows(), &BulkPlan::new(&allow_all, u64::MAX)).await.unwrap();
    assert_eq!((result.affected, result.truncated), (KEYS - 2_345, false));
    assert_eq!(redis.keyspace().1, KEYS);
    let gone = backend.delete_matching("k:*", &BulkPlan::new(&allow_all, 1_000)).await.unwrap();
    assert_eq!(gone.affected, 1_000);
    assert_eq!(redis.keyspace().0, 2 * KEYS - 1_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slices_taken_whole_go_on_until_the_walk_is_done() {
    let redis = RedisServer::start();
    fill(&redis);
    let backend = backend(&redis).await;
    let steps = Steps::default();
    let told = |step: BulkStep<'_>| steps.step(step);
    let (mut at, mut slices, mut changed) = (None, 0, 0);
    loop {
        let mut plan = BulkPlan::new(&allow_all, 700);
        plan.whole_pages = true;
        plan.resume = at.as_ref();
        plan.steps = Some(&told);
        let result = backend.expire_matching(&rows(), &plan).await.unwrap();
        changed += result.affected;
        slices += 1;
        assert!(slices < 100, "the walk does not end");
        if !result.truncated {
            break;
        }
        at = result.stopped;
    }
    assert!(slices > 2, "several slices: {slices}");
    assert_eq!(changed, KEYS, "every key once");
    assert_eq!(redis.keyspace().1, KEYS);
    assert!(steps.paired());
}
