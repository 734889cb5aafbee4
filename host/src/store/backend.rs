//! The seam between the policy API and whatever stores the keys.
//!
//! [`Backend`] is the restricted Redis API with the grants already checked:
//! the fake host ([`crate::store::memory::FakeRedis`]) implements it in memory for
//! tests and `cachepol test`, the daemon implements it over a real Redis
//! connection. Everything above this trait (grants, budgets, audit) is shared,
//! so a policy behaves the same under test as in production.

use std::sync::Arc;

use async_trait::async_trait;

use cachepol_guest_sdk::glob::{self, Glob};

use crate::store::walks::Position;
use crate::wit::{ExpireCondition, ExpireRow, KeyTtl, SetOptions, ValueKind};

/// A failure of the store itself (not of the policy's arguments).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BackendError {
    /// The store cannot be reached right now.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// The store refused or failed the command.
    #[error("redis error: {0}")]
    Command(String),
}

/// Limits and filters for the host-side bulk operations.
pub struct BulkPlan<'a> {
    /// Every key found by the scan is passed through this (the grants
    /// check); only keys it accepts are touched.
    pub allow: &'a (dyn Fn(&[u8]) -> bool + Send + Sync),
    /// Change at most this many keys (deleted, or given a TTL): keys are
    /// sent only while the keys sent and not yet answered, plus those Redis
    /// said it changed, stay under it. The result says whether the walk
    /// stopped short.
    pub limit: u64,
    /// Examine at most about this many keys (Redis's work: `COUNT` per
    /// `SCAN` page, or each key taken from the key index); the walk stops
    /// at the first page boundary past it.
    pub examine: u64,
    /// Where an earlier slice of the same walk stopped.
    pub resume: Option<&'a Position>,
    /// A slice of a sliced call: every page is taken whole, so the walk
    /// stops at a page boundary and always moves on (the next slice never
    /// sees a page it handled again), even if that passes `limit` by up to
    /// a page. Otherwise `limit` is exact and the walk stops within a page.
    pub whole_pages: bool,
    /// Told about each batch of keys just before its writes are sent and
    /// just after they are answered (the echo layer's ledger).
    pub steps: Option<&'a (dyn Fn(BulkStep<'_>) + Send + Sync)>,
}

impl<'a> BulkPlan<'a> {
    /// A plan changing at most `limit` keys, examining as many as it takes.
    pub fn new(allow: &'a (dyn Fn(&[u8]) -> bool + Send + Sync), limit: u64) -> BulkPlan<'a> {
        BulkPlan { allow, limit, examine: u64::MAX, resume: None, whole_pages: false, steps: None }
    }

    /// Report a step to [`BulkPlan::steps`], if anyone listens.
    pub fn step(&self, step: BulkStep<'_>) {
        if let Some(steps) = self.steps {
            steps(step);
        }
    }
}

/// A moment in a bulk operation, for [`BulkPlan::steps`].
#[derive(Clone, Copy, Debug)]
pub enum BulkStep<'k> {
    /// These keys' writes are about to be sent.
    Before(&'k [Vec<u8>]),
    /// These keys' writes were answered.
    After(&'k [Vec<u8>]),
}

/// What a bulk operation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BulkResult {
    /// Keys deleted, or whose TTL was set.
    pub affected: u64,
    /// Keys examined: `COUNT` per `SCAN` page, or keys taken from the index.
    pub examined: u64,
    /// Keys that matched the pattern but were refused by the plan's filter.
    pub refused: u64,
    /// A limit stopped the operation before the walk was complete.
    pub truncated: bool,
    /// Where the walk stopped, when [`BulkResult::truncated`]: the next
    /// slice goes on from there ([`BulkPlan::resume`]).
    pub stopped: Option<Position>,
    /// A few of the affected keys, for the audit log.
    pub sample: Vec<String>,
}

impl BulkResult {
    /// How many affected keys are kept by name for the audit log.
    pub const SAMPLE: usize = 5;

    /// Count one affected key, keeping its name if the sample has room.
    pub fn record(&mut self, key: &[u8]) {
        self.affected += 1;
        if self.sample.len() < Self::SAMPLE {
            self.sample.push(String::from_utf8_lossy(key).into_owned());
        }
    }
}

/// One `expire-queued` of a policy call, waiting to be sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedExpire {
    pub key: String,
    pub ttl_ms: u64,
    pub condition: ExpireCondition,
}

/// The rows of an `expire-matching` (a TTL table), compiled: each key gets
/// the first row its name matches, and one `SCAN` pass serves them all.
pub struct Rows<'a> {
    rows: &'a [ExpireRow],
    globs: Vec<Glob>,
}

impl<'a> Rows<'a> {
    pub fn new(rows: &'a [ExpireRow]) -> Rows<'a> {
        Rows { rows, globs: rows.iter().map(|r| Glob::new(&r.pattern)).collect() }
    }

    /// The first row `key` matches.
    pub fn row_of(&self, key: &[u8]) -> Option<&'a ExpireRow> {
        self.globs.iter().position(|g| g.matches_bytes(key)).map(|i| &self.rows[i])
    }

    /// The `SCAN MATCH` pattern of the one pass ([`scan_pattern_for`]).
    pub fn scan_pattern(&self) -> String {
        scan_pattern_for(&self.globs.iter().collect::<Vec<_>>())
    }

    /// Each row's pattern, compiled.
    pub fn globs(&self) -> &[Glob] {
        &self.globs
    }

    /// The `PEXPIRE` condition of `row`.
    pub fn condition(row: &ExpireRow) -> ExpireCondition {
        if row.only_if_persistent { ExpireCondition::IfPersistent } else { ExpireCondition::Always }
    }
}

/// The `SCAN MATCH` pattern of one pass serving every glob of `globs`: a
/// single glob's own pattern, else the literal prefix all share, followed by
/// `*` (`*` when they share none). Redis walks the whole keyspace for any
/// pattern; the prefix only saves sending keys no glob can match.
pub fn scan_pattern_for(globs: &[&Glob]) -> String {
    if let [glob] = globs {
        return glob.as_str().to_owned();
    }
    let prefixes: Vec<String> =
        globs.iter().map(|g| String::from_utf8_lossy(&g.literal_prefix()).into_owned()).collect();
    let mut common: &str = prefixes.first().map_or("", String::as_str);
    for p in prefixes.iter().skip(1) {
        let shared = common.char_indices().zip(p.chars()).take_while(|((_, a), b)| a == b).count();
        common = &common[..common.char_indices().nth(shared).map_or(common.len(), |(i, _)| i)];
    }
    format!("{}*", glob::escape(common))
}

/// One page of `SCAN`: the next cursor (0 at the end) and raw key names.
pub type ScanResult = (u64, Vec<Vec<u8>>);

/// The restricted Redis API, without grants (callers check those first).
///
/// Times are milliseconds. `del` is `UNLINK`. Keys are passed as the policy
/// gave them; scan results are raw bytes because Redis keys are.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BackendError>;
    /// The values of `keys`, in order. One by one unless the store can do
    /// better (Redis: one `MGET`).
    async fn mget(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, BackendError> {
        let mut values = Vec::with_capacity(keys.len());
        for key in keys {
            values.push(self.get(key).await?);
        }
        Ok(values)
    }
    async fn exists(&self, key: &str) -> Result<bool, BackendError>;
    async fn ttl(&self, key: &str) -> Result<KeyTtl, BackendError>;
    async fn key_type(&self, key: &str) -> Result<Option<ValueKind>, BackendError>;
    async fn scan(&self, cursor: u64, pattern: &str, count: u32) -> Result<ScanResult, BackendError>;
    async fn set(&self, key: &str, value: &[u8], options: &SetOptions) -> Result<bool, BackendError>;
    async fn del(&self, keys: &[String]) -> Result<u64, BackendError>;
    async fn expire(&self, key: &str, ttl_ms: u64, condition: ExpireCondition) -> Result<bool, BackendError>;
    async fn persist(&self, key: &str) -> Result<bool, BackendError>;
    /// A call's queued `PEXPIRE`s, in order; whether each set a TTL. Sent
    /// one by one unless the store can pipeline them.
    async fn expire_many(&self, items: &[QueuedExpire]) -> Result<Vec<bool>, BackendError> {
        let mut set = Vec::with_capacity(items.len());
        for item in items {
            set.push(self.expire(&item.key, item.ttl_ms, item.condition).await?);
        }
        Ok(set)
    }
    async fn delete_matching(&self, pattern: &str, plan: &BulkPlan<'_>) -> Result<BulkResult, BackendError>;
    /// Give every key matching one of `rows` the TTL of the first it
    /// matches, in one `SCAN` pass ([`Rows`]).
    async fn expire_matching(&self, rows: &[ExpireRow], plan: &BulkPlan<'_>) -> Result<BulkResult, BackendError>;
    /// `SET name token NX PX ttl` with a fresh token; `None` if held.
    async fn lock_acquire(&self, name: &str, ttl_ms: u64) -> Result<Option<String>, BackendError>;
    /// Delete `name` only if it holds `token`, atomically.
    async fn lock_release(&self, name: &str, token: &str) -> Result<bool, BackendError>;
    /// Milliseconds since the Unix epoch, on the store's clock.
    fn now_ms(&self) -> u64;
}

/// The write half of [`Backend`], for wrappers that change what writes do
/// (record them for echo suppression, or only log them in dry-run) while
/// reads go straight through. Wrap with [`Layered`].
#[async_trait]
pub trait WriteLayer: Send + Sync + 'static {
    async fn set(
        &self,
        inner: &dyn Backend,
        key: &str,
        value: &[u8],
        options: &SetOptions,
    ) -> Result<bool, BackendError>;
    async fn del(&self, inner: &dyn Backend, keys: &[String]) -> Result<u64, BackendError>;
    async fn expire(
        &self,
        inner: &dyn Backend,
        key: &str,
        ttl_ms: u64,
        condition: ExpireCondition,
    ) -> Result<bool, BackendError>;
    async fn persist(&self, inner: &dyn Backend, key: &str) -> Result<bool, BackendError>;
    async fn expire_many(&self, inner: &dyn Backend, items: &[QueuedExpire]) -> Result<Vec<bool>, BackendError> {
        let mut set = Vec::with_capacity(items.len());
        for item in items {
            set.push(self.expire(inner, &item.key, item.ttl_ms, item.condition).await?);
        }
        Ok(set)
    }
    async fn delete_matching(
        &self,
        inner: &dyn Backend,
        pattern: &str,
        plan: &BulkPlan<'_>,
    ) -> Result<BulkResult, BackendError>;
    async fn expire_matching(
        &self,
        inner: &dyn Backend,
        rows: &[ExpireRow],
        plan: &BulkPlan<'_>,
    ) -> Result<BulkResult, BackendError>;
    async fn lock_acquire(&self, inner: &dyn Backend, name: &str, ttl_ms: u64) -> Result<Option<String>, BackendError>;
    async fn lock_release(&self, inner: &dyn Backend, name: &str, token: &str) -> Result<bool, BackendError>;
}

/// A backend whose reads go to `inner` and whose writes go through `layer`.
pub struct Layered<L> {
    pub inner: Arc<dyn Backend>,
    pub layer: L,
}

#[async_trait]
impl<L: WriteLayer> Backend for Layered<L> {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BackendError> {
        self.inner.get(key).await
    }
    async fn mget(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, BackendError> {
        self.inner.mget(keys).await
    }
    async fn exists(&self, key: &str) -> Result<bool, BackendError> {
        self.inner.exists(key).await
    }
    async fn ttl(&self, key: &str) -> Result<KeyTtl, BackendError> {
        self.inner.ttl(key).await
    }
    async fn key_type(&self, key: &str) -> Result<Option<ValueKind>, BackendError> {
        self.inner.key_type(key).await
    }
    async fn scan(&self, cursor: u64, pattern: &str, count: u32) -> Result<ScanResult, BackendError> {
        self.inner.scan(cursor, pattern, count).await
    }
    async fn set(&self, key: &str, value: &[u8], options: &SetOptions) -> Result<bool, BackendError> {
        self.layer.set(&*self.inner, key, value, options).await
    }
    async fn del(&self, keys: &[String]) -> Result<u64, BackendError> {
        self.layer.del(&*self.inner, keys).await
    }
    async fn expire(&self, key: &str, ttl_ms: u64, condition: ExpireCondition) -> Result<bool, BackendError> {
        self.layer.expire(&*self.inner, key, ttl_ms, condition).await
    }
    async fn persist(&self, key: &str) -> Result<bool, BackendError> {
        self.layer.persist(&*self.inner, key).await
    }
    async fn expire_many(&self, items: &[QueuedExpire]) -> Result<Vec<bool>, BackendError> {
        self.layer.expire_many(&*self.inner, items).await
    }
    async fn delete_matching(&self, pattern: &str, plan: &BulkPlan<'_>) -> Result<BulkResult, BackendError> {
        self.layer.delete_matching(&*self.inner, pattern, plan).await
    }
    async fn expire_matching(&self, rows: &[ExpireRow], plan: &BulkPlan<'_>) -> Result<BulkResult, BackendError> {
        self.layer.expire_matching(&*self.inner, rows, plan).await
    }
    async fn lock_acquire(&self, name: &str, ttl_ms: u64) -> Result<Option<String>, BackendError> {
        self.layer.lock_acquire(&*self.inner, name, ttl_ms).await
    }
    async fn lock_release(&self, name: &str, token: &str) -> Result<bool, BackendError> {
        self.layer.lock_release(&*self.inner, name, token).await
    }
    fn now_ms(&self) -> u64 {
        self.inner.now_ms()
    }
}

/// Whether `PEXPIRE key ttl <condition>` sets a TTL, given the key's current
/// remaining TTL (`None`: persistent) and the new one. Redis 7's rules: a
/// persistent key counts as an infinite TTL for `GT`/`LT`.
pub fn expire_applies(condition: ExpireCondition, current_ms: Option<u64>, new_ms: u64) -> bool {
    match (condition, current_ms) {
        (ExpireCondition::Always, _) => true,
        (ExpireCondition::IfPersistent, current) => current.is_none(),
        (ExpireCondition::IfVolatile, current) => current.is_some(),
        (ExpireCondition::IfLonger, None) => false,
        (ExpireCondition::IfLonger, Some(current)) => new_ms > current,
        (ExpireCondition::IfShorter, None) => true,
        (ExpireCondition::IfShorter, Some(current)) => new_ms < current,
    }
}

/// Walk `SCAN MATCH pattern` to the end through `backend`, passing each key
/// the plan allows to `visit` until it returns `false` or the plan's limit
/// is reached. For callers that must look before acting (dry-run).
pub async fn scan_each(
    backend: &dyn Backend,
    pattern: &str,
    plan: &BulkPlan<'_>,
    mut visit: impl FnMut(&[u8]) -> bool + Send,
) -> Result<BulkResult, BackendError> {
    let mut result = BulkResult::default();
    let mut cursor = 0;
    loop {
        let (next, keys) = backend.scan(cursor, pattern, 1000).await?;
        for key in keys {
            if !(plan.allow)(&key) {
                result.refused += 1;
            } else if result.affected >= plan.limit {
                result.truncated = true;
                return Ok(result);
            } else if visit(&key) {
                result.record(&key);
            }
        }
        if next == 0 {
            return Ok(result);
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(patterns: &[&str]) -> Vec<ExpireRow> {
        patterns.iter().map(|p| ExpireRow { pattern: (*p).into(), ttl_ms: 1000, only_if_persistent: true }).collect()
    }

    #[test]
    fn one_pass_scans_the_prefix_the_rows_share() {
        let scan = |patterns: &[&str]| Rows::new(&rows(patterns)).scan_pattern();
        assert_eq!(scan(&["graph_data:[a-z]*"]), "graph_data:[a-z]*", "one row scans its own pattern");
        assert_eq!(scan(&["svc:quiz:*", "svc:qa:*", "svc:quota"]), "svc:q*");
        assert_eq!(scan(&["graph_data:*", "lock:*"]), "*");
        assert_eq!(scan(&["a\\*b:*", "a\\*c:*"]), "a\\**", "a shared literal star stays literal");
        assert_eq!(scan(&["é1:*", "é2:*"]), "é*", "cut on a character boundary");
    }

    #[test]
    fn a_key_gets_the_first_row_it_matches() {
        let table = rows(&["job:lock:*", "job:*", "lock:*"]);
        let rows = Rows::new(&table);
        assert_eq!(rows.row_of(b"job:lock:1").map(|r| r.pattern.as_str()), Some("job:lock:*"));
        assert_eq!(rows.row_of(b"job:1").map(|r| r.pattern.as_str()), Some("job:*"));
        assert_eq!(rows.row_of(b"user:1"), None);
    }
}
