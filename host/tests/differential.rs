//! The fake host tells the truth about Redis: seeded random sequences of
//! restricted-API operations run on the fake (`FakeRedis`) and on a real
//! `redis-server`, through the same `Backend` trait the policies' calls go
//! through, mixed with the application's writes to lists, hashes, sets and
//! sorted sets (which the fake's scenarios offer), and every result and the
//! final keyspace (types and contents) must agree.
//!
//! 1,000 sequences by default; `CACHEPOL_DIFF_SEQUENCES=N` for more,
//! `CACHEPOL_DIFF_SEED=S` to replay one. A difference prints the seed and
//! the operations up to the first one that disagreed.
//!
//! Time: TTLs are compared with a tolerance (the real clock moves while the
//! fake's stands still), and every TTL a sequence uses is distinct from the
//! others by at least a second, so that `EXPIRE GT/LT` never compares two
//! values that only drift apart. Clock advances pair a key set to expire
//! soon with a real sleep past it (and `advance` on the fake).

#[path = "../../tests/e2e/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use cachepol::fake::{AppWrite, FakeRedis, Value};
use cachepol::store::backend::{Backend, BulkPlan};
use cachepol::store::redis::RedisBackend;
use cachepol::store::target::RedisTarget;
use cachepol::wit::{ExpireCondition, ExpireRow, KeyTtl, SetCondition, SetOptions};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use support::RedisServer;

const KEYS: &[&str] = &["k:1", "k:2", "k:3", "k:10", "k:*", "k:[1]", "j:1", "j:2", "lock:a", "other"];
const PATTERNS: &[&str] = &["k:*", "k:?", "k:[1-2]", "k:\\*", "j:*", "*:1", "k:[^1]*", "lock:*", "*", "nothing:*"];
/// TTLs of keys meant to expire at the next clock advance.
const SOON_MS: u64 = 300;
const ADVANCE_MS: u64 = 700;
/// How far a TTL may differ between the two (ms).
const TTL_TOLERANCE_MS: u64 = 1500;

#[derive(Clone, Debug)]
enum Op {
    Get(&'static str),
    Exists(&'static str),
    Ttl(&'static str),
    Type(&'static str),
    Set(&'static str, String, SetOptions),
    Del(Vec<&'static str>),
    Expire(&'static str, u64, ExpireCondition),
    Persist(&'static str),
    ScanAll(&'static str, u32),
    DeleteMatching(&'static str),
    /// Rows (pattern, TTL, only if persistent), first match wins.
    ExpireMatching(Vec<(&'static str, u64, bool)>),
    LockAcquire(&'static str, u64),
    /// Release with the token this side got (`true`) or a wrong one.
    LockRelease(&'static str, bool),
    /// Set a key to expire soon, then let the clock pass it.
    Advance(&'static str),
    /// The application writes a list, hash, set or sorted set.
    Write(&'static str, AppWrite),
    Mget(Vec<&'static str>),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

/// A sequence's operations, each TTL distinct by at least a second.
fn generate(seed: u64) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ttls: Vec<u64> = (5..600).map(|s| s * 1000).collect();
    let mut ttl = |rng: &mut StdRng| ttls.swap_remove(rng.random_range(0..ttls.len()));
    let key = |rng: &mut StdRng| *KEYS.choose(rng).unwrap();
    let pattern = |rng: &mut StdRng| *PATTERNS.choose(rng).unwrap();
    let len = rng.random_range(5..30);
    (0..len)
        .map(|_| match rng.random_range(0..120) {
            0..8 => Op::Get(key(&mut rng)),
            8..12 => Op::Exists(key(&mut rng)),
            12..20 => Op::Ttl(key(&mut rng)),
            20..23 => Op::Type(key(&mut rng)),
            23..45 => {
                let condition =
                    *[SetCondition::Always, SetCondition::IfAbsent, SetCondition::IfPresent].choose(&mut rng).unwrap();
                let ttl_ms = rng.random_bool(0.5).then(|| ttl(&mut rng));
                let options = SetOptions { ttl_ms, condition, keep_ttl: rng.random_bool(0.2) };
                Op::Set(key(&mut rng), format!("v{}", rng.random_range(0..100)), options)
            }
            45..52 => Op::Del((0..rng.random_range(1..4)).map(|_| key(&mut rng)).collect()),
            52..62 => {
                let condition = *[
                    ExpireCondition::Always,
                    ExpireCondition::IfPersistent,
                    ExpireCondition::IfVolatile,
                    ExpireCondition::IfLonger,
                    ExpireCondition::IfShorter,
                ]
                .choose(&mut rng)
                .unwrap();
                Op::Expire(key(&mut rng), ttl(&mut rng), condition)
            }
            62..66 => Op::Persist(key(&mut rng)),
            66..74 => Op::ScanAll(pattern(&mut rng), rng.random_range(1..20)),
            74..79 => Op::DeleteMatching(pattern(&mut rng)),
            79..85 => Op::ExpireMatching(
                (0..rng.random_range(1..4)).map(|_| (pattern(&mut rng), ttl(&mut rng), rng.random_bool(0.5))).collect(),
            ),
            85..91 => Op::LockAcquire(key(&mut rng), ttl(&mut rng)),
            91..97 => Op::LockRelease(key(&mut rng), rng.random_bool(0.7)),
            97..100 => Op::Advance(key(&mut rng)),
            100..116 => Op::Write(key(&mut rng), app_write(&mut rng)),
            _ => Op::Mget((0..rng.random_range(1..4)).map(|_| key(&mut rng)).collect()),
        })
        .collect()
}

/// A random write of the application's to a list, hash, set or sorted set.
fn app_write(rng: &mut StdRng) -> AppWrite {
    let item = |rng: &mut StdRng| ["a", "b", "c"].choose(rng).unwrap().to_string();
    let items = |rng: &mut StdRng| (0..rng.random_range(1..4)).map(|_| item(rng)).collect::<Vec<_>>();
    match rng.random_range(0..10) {
        0 => AppWrite::Rpush(items(rng)),
        1 => AppWrite::Lpush(items(rng)),
        2 => AppWrite::Lpop(rng.random_range(1..3)),
        3 => AppWrite::Rpop(rng.random_range(1..3)),
        4 => AppWrite::Hset(items(rng).into_iter().map(|f| (f, format!("v{}", rng.random_range(0..9)))).collect()),
        5 => AppWrite::Hdel(items(rng)),
        6 => AppWrite::Sadd(items(rng)),
        7 => AppWrite::Srem(items(rng)),
        8 => AppWrite::Zadd(items(rng).into_iter().map(|m| (m, *[1.0, 2.0, 2.5].choose(rng).unwrap())).collect()),
        _ => AppWrite::Zrem(items(rng)),
    }
}

/// The command a real application sends for `write`.
fn command(key: &str, write: &AppWrite) -> redis::Cmd {
    let mut cmd = redis::cmd(&write.name().to_uppercase());
    cmd.arg(key);
    match write {
        AppWrite::Rpush(items)
        | AppWrite::Lpush(items)
        | AppWrite::Hdel(items)
        | AppWrite::Sadd(items)
        | AppWrite::Srem(items)
        | AppWrite::Zrem(items) => {
            cmd.arg(items);
        }
        AppWrite::Lpop(n) | AppWrite::Rpop(n) => {
            cmd.arg(*n);
        }
        AppWrite::Hset(fields) => {
            for (f, v) in fields {
                cmd.arg(f).arg(v);
            }
        }
        AppWrite::Zadd(members) => {
            for (m, score) in members {
                cmd.arg(*score).arg(m);
            }
        }
    }
    cmd
}

/// One side: a backend and the lock tokens it handed out.
struct Side {
    backend: Arc<dyn Backend>,
    /// The real side's own connection, for the application's writes and
    /// for reading back non-string values.
    raw: Option<redis::aio::MultiplexedConnection>,
    tokens: BTreeMap<&'static str, String>,
    /// Every token, in order: tokens are random by design, so a value that
    /// is one compares as "the n-th token".
    issued: Vec<String>,
}

/// What an operation returned, comparable across the two sides.
#[derive(Debug, PartialEq)]
enum Outcome {
    Value(Option<Vec<u8>>),
    Bool(bool),
    Ttl(Option<u64>, bool),
    Count(u64),
    Keys(Vec<Vec<u8>>),
    Text(String),
}

fn ttl_outcome(ttl: KeyTtl) -> Outcome {
    match ttl {
        KeyTtl::Missing => Outcome::Ttl(None, false),
        KeyTtl::Persistent => Outcome::Ttl(None, true),
        KeyTtl::ExpiresInMs(ms) => Outcome::Ttl(Some(ms), true),
    }
}

/// Equal, with TTLs within the tolerance.
fn agree(a: &Outcome, b: &Outcome) -> bool {
    match (a, b) {
        (Outcome::Ttl(Some(x), true), Outcome::Ttl(Some(y), true)) => x.abs_diff(*y) <= TTL_TOLERANCE_MS,
        _ => a == b,
    }
}

fn allow_all(_: &[u8]) -> bool {
    true
}

const EVERYTHING: BulkPlan<'static> =
    BulkPlan { allow: &allow_all, limit: u64::MAX, examine: u64::MAX, resume: None, whole_pages: false, steps: None };

impl Side {
    fn new(backend: Arc<dyn Backend>, raw: Option<redis::aio::MultiplexedConnection>) -> Side {
        Side { backend, raw, tokens: BTreeMap::new(), issued: Vec::new() }
    }

    fn value(&self, value: Option<Vec<u8>>) -> Outcome {
        match value.as_deref().and_then(|v| self.issued.iter().position(|t| t.as_bytes() == v)) {
            Some(n) => Outcome::Text(format!("token #{n}")),
            None => Outcome::Value(value),
        }
    }

    async fn apply(&mut self, op: &Op, fake: Option<&FakeRedis>) -> Outcome {
        let b = &*self.backend;
        let result = match op {
            Op::Get(k) => b.get(k).await.map(|v| self.value(v)),
            Op::Exists(k) => b.exists(k).await.map(Outcome::Bool),
            Op::Ttl(k) => b.ttl(k).await.map(ttl_outcome),
            Op::Type(k) => b.key_type(k).await.map(|t| Outcome::Text(format!("{t:?}"))),
            Op::Set(k, v, o) => b.set(k, v.as_bytes(), o).await.map(Outcome::Bool),
            Op::Del(keys) => b.del(&keys.iter().map(|k| k.to_string()).collect::<Vec<_>>()).await.map(Outcome::Count),
            Op::Expire(k, ms, c) => b.expire(k, *ms, *c).await.map(Outcome::Bool),
            Op::Persist(k) => b.persist(k).await.map(Outcome::Bool),
            Op::ScanAll(p, count) => scan_all(b, p, *count).await.map(Outcome::Keys),
            Op::DeleteMatching(p) => b.delete_matching(p, &EVERYTHING).await.map(|r| Outcome::Count(r.affected)),
            Op::ExpireMatching(rows) => {
                let rows: Vec<ExpireRow> = rows
                    .iter()
                    .map(|(p, ms, only)| ExpireRow { pattern: p.to_string(), ttl_ms: *ms, only_if_persistent: *only })
                    .collect();
                b.expire_matching(&rows, &EVERYTHING).await.map(|r| Outcome::Count(r.affected))
            }
            Op::LockAcquire(k, ms) => b.lock_acquire(k, *ms).await.map(|token| {
                let got = token.is_some();
                if let Some(token) = token {
                    self.issued.push(token.clone());
                    self.tokens.insert(k, token);
                }
                Outcome::Bool(got)
            }),
            Op::LockRelease(k, own) => {
                let token = if *own { self.tokens.get(k).cloned().unwrap_or_default() } else { "wrong".into() };
                b.lock_release(k, &token).await.map(Outcome::Bool)
            }
            Op::Advance(k) => {
                let options = SetOptions { ttl_ms: Some(SOON_MS), condition: SetCondition::Always, keep_ttl: false };
                let set = b.set(k, b"soon", &options).await;
                match fake {
                    Some(fake) => fake.advance(ADVANCE_MS),
                    None => tokio::time::sleep(std::time::Duration::from_millis(ADVANCE_MS)).await,
                }
                set.map(Outcome::Bool)
            }
            Op::Write(k, write) => {
                let done = match (fake, &mut self.raw) {
                    (Some(fake), _) => fake.app_write(k, write),
                    (None, Some(raw)) => {
                        command(k, write).query_async::<redis::Value>(raw).await.map(|_| ()).map_err(|e| e.to_string())
                    }
                    (None, None) => unreachable!("the real side has a connection"),
                };
                return done.map_or_else(|e| error_outcome(&e), |()| Outcome::Bool(true));
            }
            Op::Mget(keys) => {
                let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
                b.mget(&keys).await.map(|values| {
                    Outcome::Text(format!("{:?}", values.into_iter().map(|v| self.value(v)).collect::<Vec<_>>()))
                })
            }
        };
        result.unwrap_or_else(|e| error_outcome(&e.to_string()))
    }

    /// A non-string key's contents, rendered the same way on both sides.
    async fn contents(&mut self, key: &str, fake: Option<&FakeRedis>) -> Outcome {
        if let Some(fake) = fake {
            let snapshot = fake.snapshot();
            return Outcome::Text(snapshot.get(key).map(|s| s.value.render()).unwrap_or_default());
        }
        let raw = self.raw.as_mut().expect("the real side has a connection");
        let b = |s: String| s.into_bytes();
        let kind: String = redis::cmd("TYPE").arg(key).query_async(raw).await.unwrap();
        let value = match kind.as_str() {
            "list" => {
                let items: Vec<String> = redis::cmd("LRANGE").arg(key).arg(0).arg(-1).query_async(raw).await.unwrap();
                Value::List(items.into_iter().map(b).collect())
            }
            "hash" => {
                let fields: BTreeMap<String, String> = redis::cmd("HGETALL").arg(key).query_async(raw).await.unwrap();
                Value::Hash(fields.into_iter().map(|(f, v)| (b(f), b(v))).collect())
            }
            "set" => {
                let members: Vec<String> = redis::cmd("SMEMBERS").arg(key).query_async(raw).await.unwrap();
                Value::Set(members.into_iter().map(b).collect())
            }
            "zset" => {
                let members: Vec<(String, f64)> =
                    redis::cmd("ZRANGE").arg(key).arg(0).arg(-1).arg("WITHSCORES").query_async(raw).await.unwrap();
                Value::ZSet(members.into_iter().map(|(m, s)| (b(m), s)).collect())
            }
            other => return Outcome::Text(format!("type {other}")),
        };
        Outcome::Text(value.render())
    }

    /// Every key with its type and value, and its TTL.
    async fn keyspace(&mut self, fake: Option<&FakeRedis>) -> Vec<(String, Outcome, Outcome)> {
        let b = self.backend.clone();
        let mut out = Vec::new();
        for key in scan_all(&*b, "*", 100).await.unwrap() {
            let name = String::from_utf8_lossy(&key).into_owned();
            let value = match b.key_type(&name).await.unwrap() {
                Some(cachepol::wit::ValueKind::String) => self.value(b.get(&name).await.unwrap()),
                _ => self.contents(&name, fake).await,
            };
            let ttl = ttl_outcome(b.ttl(&name).await.unwrap());
            out.push((name, value, ttl));
        }
        out
    }
}

/// An error, by what Redis calls it when it has a name for it (`WRONGTYPE`):
/// the fake's wording need not match Redis's.
fn error_outcome(message: &str) -> Outcome {
    if message.contains("WRONGTYPE") {
        Outcome::Text("error: WRONGTYPE".into())
    } else {
        Outcome::Text(format!("error: {message}"))
    }
}

/// Keys matching `pattern`, following cursors to the end, sorted, without
/// the repeats `SCAN` may return.
async fn scan_all(
    b: &dyn Backend,
    pattern: &str,
    count: u32,
) -> Result<Vec<Vec<u8>>, cachepol::store::backend::BackendError> {
    let mut keys = Vec::new();
    let mut cursor = 0;
    loop {
        let (next, page) = b.scan(cursor, pattern, count).await?;
        keys.extend(page);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// Run one sequence on both; `Err` describes the first difference.
async fn run_one(seed: u64, real: Arc<dyn Backend>, flush: &redis::Client) -> Result<(), String> {
    let mut conn = flush.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("FLUSHDB").query_async::<()>(&mut conn).await.unwrap();
    let fake_redis = FakeRedis::new();
    let mut fake = Side::new(Arc::new(fake_redis.client("diff")), None);
    let mut real = Side::new(real, Some(conn.clone()));
    let ops = generate(seed);
    for (i, op) in ops.iter().enumerate() {
        let (f, r) = (fake.apply(op, Some(&fake_redis)).await, real.apply(op, None).await);
        if !agree(&f, &r) {
            let prefix: Vec<String> = ops[..=i].iter().map(|o| format!("  {o}")).collect();
            return Err(format!(
                "seed {seed}: operation {} differs: fake {f:?}, redis {r:?}\n{}",
                i + 1,
                prefix.join("\n")
            ));
        }
    }
    let (f, r) = (fake.keyspace(Some(&fake_redis)).await, real.keyspace(None).await);
    let same =
        f.len() == r.len() && f.iter().zip(&r).all(|(a, b)| a.0 == b.0 && agree(&a.1, &b.1) && agree(&a.2, &b.2));
    if !same {
        return Err(format!("seed {seed}: final keyspaces differ:\nfake  {f:?}\nredis {r:?}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_host_agrees_with_redis_on_random_sequences() {
    let redis = RedisServer::start();
    let sequences: u64 = std::env::var("CACHEPOL_DIFF_SEQUENCES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let seeds: Vec<u64> = match std::env::var("CACHEPOL_DIFF_SEED").ok().and_then(|v| v.parse().ok()) {
        Some(seed) => vec![seed],
        None => (0..sequences).collect(),
    };
    // One worker per database, so sequences run side by side without
    // seeing each other's keys (and the advances' sleeps overlap).
    const WORKERS: u64 = 16;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..WORKERS {
        let url = format!("{}/{worker}", redis.url());
        let mine: Vec<u64> = seeds.iter().copied().filter(|s| s % WORKERS == worker).collect();
        tasks.spawn(async move {
            let client = redis::Client::open(url).unwrap();
            let target = RedisTarget::Single(client.clone());
            let real: Arc<dyn Backend> = Arc::new(RedisBackend::connect(&target).await.unwrap());
            let mut failures = Vec::new();
            for seed in mine {
                if let Err(e) = run_one(seed, real.clone(), &client).await {
                    failures.push(e);
                }
            }
            failures
        });
    }
    let mut failures = Vec::new();
    while let Some(done) = tasks.join_next().await {
        failures.extend(done.unwrap());
    }
    assert!(failures.is_empty(), "{} of {} sequences differ:\n{}", failures.len(), seeds.len(), failures.join("\n\n"));
    eprintln!("differential: {} sequences, 0 differences", seeds.len());
}
