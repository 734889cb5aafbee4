//! The WIT imports a policy calls: the restricted Redis API, logging, clock.
//!
//! Every Redis call goes through the same gate, in this order: count it
//! against the host-call budget, validate the arguments, check the grants.
//! Only then does it reach the [`Backend`]. A refusal is an error value the
//! guest sees (`denied`, `budget-exceeded`, `invalid-argument`), a warning in
//! the log, and an entry in the call's report; nothing is sent to Redis.
//!
//! Budget overruns are also remembered for the whole call: a policy that
//! swallows the `budget-exceeded` error still has its call reported as
//! failed, because it did not finish its work.

use std::sync::Arc;

use crate::sandbox::budget::Budgets;
use crate::sandbox::grants::{Grants, MAX_KEY_LEN};
use crate::sandbox::guest_io::{LineVerdict, LogAllowance, clip, clip_owned, cut, log_truncated};
use crate::sandbox::work::WorkMeter;
use crate::store::backend::{Backend, BackendError, BulkPlan, BulkResult, QueuedExpire};
use crate::store::walks::WalkBook;
use crate::wit::{self, Denial, Error, ExpireCondition, ExpireRow, KeyOps, KeyTtl, ScanPage, SetOptions, ValueKind};

/// What a host function returns: a trap (`Err`) or a result for the guest.
type HostResult<T> = wasmtime::Result<Result<T, Error>>;

/// Longest TTL a policy may set: 100 years.
const MAX_TTL_MS: u64 = 100 * 365 * 24 * 3600 * 1000;
/// Largest `COUNT` a scan page may ask for.
const MAX_SCAN_COUNT: u32 = 10_000;
/// The most keys one `mget` reads: a call's reply is held whole, in the
/// host and in the guest, so it is bounded like a `SCAN` page.
const MAX_MGET_KEYS: usize = 10_000;
/// Keys one `mget` batch asks for at most: a batch is what Redis builds
/// its reply from and the daemon holds at once, and batches are smaller
/// still when the call's read allowance is nearly spent.
const MGET_BATCH: usize = 256;
/// Denials kept by name per call; more are only counted.
const MAX_DENIALS_KEPT: usize = 100;
/// Work the grant checks of one call may do (`glob::covers_within` units;
/// one check may spend a tenth of it): the checks run on the host's thread,
/// outside the guest's fuel, so their total per event is bounded too.
const GRANT_WORK_PER_CALL: usize = 40_000_000;

/// Queued writes (`expire-queued`) held at most before they are sent, by
/// count and by key bytes: a pipeline this size is one round trip, and a
/// call queuing without end (a batch of 64 events has 64,000 host calls)
/// cannot grow the host's memory with it.
const MAX_QUEUED: usize = 1_000;
const MAX_QUEUED_BYTES: usize = 1 << 20;

/// Keys one slice of a sliced call (a sweep, a hook) may examine: about
/// half a second of Redis's work, so that the policy's keyspace events
/// queued meanwhile are handled between slices instead of waiting for a
/// walk of millions of keys.
pub const SLICE_EXAMINED: u64 = 250_000;

/// Bulk operations one sliced call may keep positions for; a call making
/// more is not sliced (it fails on its budgets, as any other call): the
/// book is written to Redis after every slice.
const MAX_WALKS: usize = 64;

/// What a policy's calls did during one event, for the audit trail.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    pub deleted: u64,
    pub expired: u64,
    pub written: u64,
    pub locks: u64,
    /// Of `deleted` and `expired`, those by bulk operations.
    pub bulk_deleted: u64,
    pub bulk_expired: u64,
    /// A few affected key names.
    pub sample: Vec<String>,
}

impl Effects {
    fn note_keys<'a>(&mut self, keys: impl IntoIterator<Item = &'a str>) {
        for key in keys {
            if self.sample.len() >= BulkResult::SAMPLE {
                break;
            }
            self.sample.push(key.to_owned());
        }
    }
}

/// Everything recorded during one call into the policy.
#[derive(Clone, Debug)]
pub struct CallState {
    pub host_calls: u32,
    pub keys_touched: u64,
    pub log_lines: u32,
    pub logs_dropped: u32,
    pub denials: Vec<Denial>,
    pub denials_total: u32,
    pub effects: Effects,
    /// Keys examined by bulk operations (Redis's work).
    pub keys_examined: u64,
    /// Bytes read from Redis: values and scanned key names.
    pub read_bytes: usize,
    /// The walks of a sliced call, as far as they got
    /// ([`HostApi::slice_walks`]).
    pub walks: Option<WalkBook>,
    /// A walk of this slice stopped short and the policy was told so with
    /// a `budget-exceeded` error: if it gives up on that error, the call
    /// is a slice done, not a failure.
    pub slice_cut: bool,
    /// The first budget the call ran out of.
    pub budget_exceeded: Option<String>,
    /// Which budget that was (`host_calls`, `grant_work`, `keys`,
    /// `value_bytes`), for metrics.
    pub budget_kind: Option<&'static str>,
    /// Redis calls that failed because Redis could not be reached.
    pub redis_unavailable: u32,
    /// Queued writes Redis failed (the call fails, even if the policy
    /// ignored the error it was given).
    pub queued_failed: Option<String>,
    /// Grant-check work left for this call.
    grant_work_left: usize,
    /// When the call began (a wait for the Redis-work allowance must end
    /// within its wall time).
    started: std::time::Instant,
}

impl Default for CallState {
    fn default() -> CallState {
        CallState {
            host_calls: 0,
            keys_touched: 0,
            log_lines: 0,
            logs_dropped: 0,
            denials: Vec::new(),
            denials_total: 0,
            effects: Effects::default(),
            keys_examined: 0,
            read_bytes: 0,
            walks: None,
            slice_cut: false,
            budget_exceeded: None,
            budget_kind: None,
            redis_unavailable: 0,
            queued_failed: None,
            grant_work_left: GRANT_WORK_PER_CALL,
            started: std::time::Instant::now(),
        }
    }
}

/// The host side of one policy instance's imports.
pub struct HostApi {
    policy: Arc<str>,
    grants: Arc<Grants>,
    backend: Arc<dyn Backend>,
    budgets: Budgets,
    log: LogAllowance,
    call: CallState,
    /// Events in the current call (a batch of keyspace events counts each):
    /// the per-event host-call and keys budgets scale with it.
    events: u32,
    /// `expire-queued` writes not sent yet, in order, and their keys' bytes.
    queued: Vec<QueuedExpire>,
    queued_bytes: usize,
    /// The next call is a slice of a sliced call: its bulk operations go
    /// on from this book's positions and stop at the slice's allowance.
    walks: Option<WalkBook>,
    /// The policy's Redis-work meter, shared by its lanes.
    meter: Arc<WorkMeter>,
}

/// What a gated call is about.
enum Target<'a> {
    Key(&'a str),
    Keys(&'a [String]),
    Pattern(&'a str),
}

impl HostApi {
    /// `log` is the call's log budget, shared with the guest's stdout and
    /// stderr.
    pub fn new(
        policy: Arc<str>,
        grants: Arc<Grants>,
        backend: Arc<dyn Backend>,
        budgets: Budgets,
        log: LogAllowance,
        meter: Arc<WorkMeter>,
    ) -> HostApi {
        HostApi {
            meter,
            policy,
            grants,
            backend,
            budgets,
            log,
            call: CallState::default(),
            events: 1,
            queued: Vec::new(),
            queued_bytes: 0,
            walks: None,
        }
    }

    /// Run the next call as a slice of the sliced call `book` describes
    /// (a sweep or a hook): each bulk operation goes on where the book says
    /// it stopped, or answers at once if it already reached its end, and
    /// one that reaches the slice's allowance stops there (kept in the
    /// book) instead of failing. The book comes back in the call's report.
    pub fn slice_walks(&mut self, mut book: WalkBook) {
        book.begin_slice();
        self.walks = Some(book);
    }

    /// Start a new call for `events` events: fresh budgets and an empty
    /// report.
    pub fn begin_call(&mut self, events: u32) {
        self.call = CallState::default();
        self.events = events.max(1);
        self.queued.clear();
        self.queued_bytes = 0;
        self.log.reset();
    }

    /// Send the call's queued writes, as one pipeline where the store can:
    /// before any other request of the call (so Redis sees the policy's
    /// requests in the order it made them) and when the call returns.
    pub async fn flush(&mut self) -> Result<(), Error> {
        if self.queued.is_empty() {
            return Ok(());
        }
        let queued = std::mem::take(&mut self.queued);
        self.queued_bytes = 0;
        let set = match self.backend.expire_many(&queued).await {
            Ok(set) => set,
            Err(e) => {
                let error = self.redis_failed("expire-queued", e);
                self.call.queued_failed.get_or_insert_with(|| wit::Shown(&error).to_string());
                return Err(error);
            }
        };
        for (item, _) in queued.iter().zip(&set).filter(|(_, set)| **set) {
            self.call.effects.expired += 1;
            self.call.effects.note_keys([item.key.as_str()]);
        }
        Ok(())
    }

    /// Host calls allowed in this call.
    fn host_calls_limit(&self) -> u32 {
        self.budgets.host_calls.saturating_mul(self.events)
    }

    /// The report of the call that just ended.
    pub fn take_call(&mut self) -> CallState {
        (self.call.log_lines, self.call.logs_dropped) = self.log.counts();
        self.call.walks = self.walks.take();
        std::mem::take(&mut self.call)
    }

    /// Grants take effect once the manifest is validated.
    pub fn set_grants(&mut self, policy: Arc<str>, grants: Arc<Grants>) {
        self.policy = policy;
        self.grants = grants;
    }

    /// Switch the store the calls go to.
    pub fn set_backend(&mut self, backend: Arc<dyn Backend>) {
        self.backend = backend;
    }

    fn exceeded(&mut self, kind: &'static str, what: String) -> Error {
        // Once per call: a policy retrying past its budget must not flood
        // the log through the host's own warnings either.
        if self.call.budget_exceeded.is_none() {
            tracing::warn!(policy = %self.policy, budget = %what, "budget exceeded");
            self.call.budget_exceeded = Some(what.clone());
            self.call.budget_kind = Some(kind);
        }
        Error::BudgetExceeded(what)
    }

    /// A walk of a sliced call stops here until the next slice. The policy
    /// is told with a `budget-exceeded` error, so that one that stops on
    /// it does nothing it would do only once every walk is done (write a
    /// "cleaned" marker); one that goes on past it loses nothing either.
    /// Not a budget failure of the call.
    fn slice_cut(&mut self, op: &str, pattern: &str) -> Error {
        self.call.slice_cut = true;
        Error::BudgetExceeded(format!(
            "{op}({pattern}) goes on in the next slice: the host calls this event again until its walks are done"
        ))
    }

    /// A refusal: counted, kept (the first [`MAX_DENIALS_KEPT`]), and
    /// logged against the call's log budget, the key cut to
    /// [`MAX_SHOWN`](crate::sandbox::MAX_SHOWN) (a policy may pass 16 KiB
    /// keys a thousand times an event).
    fn deny(&mut self, op: &str, target: &str, reason: String) -> Error {
        let target = clip(target).into_owned();
        let mut reason = reason;
        clip_owned(&mut reason);
        match self.log.take() {
            LineVerdict::Log => tracing::warn!(policy = %self.policy, op, %target, %reason, "denied"),
            LineVerdict::Truncate => log_truncated(&self.policy, self.budgets.log_lines),
            LineVerdict::Drop => {}
        }
        let denial = Denial { op: op.to_owned(), target, reason };
        self.call.denials_total += 1;
        if self.call.denials.len() < MAX_DENIALS_KEPT {
            self.call.denials.push(denial.clone());
        }
        Error::Denied(denial)
    }

    /// The gate of a call that goes to Redis now: the call's queued writes
    /// go first (Redis sees the policy's requests in its order), then
    /// [`HostApi::admit`].
    async fn request(&mut self, op: &'static str, need: KeyOps, target: Target<'_>) -> Result<(), Error> {
        self.flush().await?;
        self.admit(op, need, target)
    }

    /// The gate every Redis call passes: budget, arguments, grants.
    fn admit(&mut self, op: &'static str, need: KeyOps, target: Target<'_>) -> Result<(), Error> {
        self.call.host_calls += 1;
        if self.call.host_calls > self.host_calls_limit() {
            return Err(
                self.exceeded("host_calls", format!("more than {} host calls in one event", self.budgets.host_calls))
            );
        }
        match target {
            Target::Key(key) => self.admit_key(op, need, key),
            Target::Keys(keys) => {
                if keys.is_empty() {
                    return Err(Error::InvalidArgument(format!("{op}: no keys given")));
                }
                keys.iter().try_for_each(|k| self.admit_key(op, need, k))
            }
            Target::Pattern(pattern) => {
                check_length(op, pattern)?;
                if self.call.grant_work_left == 0 {
                    return Err(self.exceeded(
                        "grant_work",
                        format!(
                            "{op}: the grant checks of this event used up their work allowance (patterns too intricate)"
                        ),
                    ));
                }
                self.grants
                    .check_pattern_within(need, pattern, &mut self.call.grant_work_left)
                    .map_err(|reason| self.deny(op, pattern, reason))
            }
        }
    }

    fn admit_key(&mut self, op: &'static str, need: KeyOps, key: &str) -> Result<(), Error> {
        check_length(op, key)?;
        self.grants.check_key(need, key).map_err(|reason| self.deny(op, key, reason))
    }

    fn redis_failed(&mut self, op: &str, e: BackendError) -> Error {
        tracing::warn!(policy = %self.policy, op, error = %e, "redis call failed");
        crate::metrics::metrics().redis_errors.inc();
        if matches!(e, BackendError::Unavailable(_)) {
            self.call.redis_unavailable += 1;
        }
        Error::Redis(e.to_string())
    }

    /// Count `n` bytes read from Redis against the call's allowance; past
    /// it, what was read is dropped and the call fails on `read_bytes`.
    fn read(&mut self, op: &str, n: usize) -> Result<(), Error> {
        self.call.read_bytes = self.call.read_bytes.saturating_add(n);
        if self.call.read_bytes > self.budgets.read_limit() {
            return Err(self.exceeded(
                "read_bytes",
                format!("{op} would read more than {} bytes from Redis in one call", self.budgets.read_limit()),
            ));
        }
        Ok(())
    }

    /// Before a call that makes Redis examine keys: wait while the policy
    /// is past its Redis-work allowance, or fail on it if the wait would
    /// outlast the call's wall time.
    async fn pace(&mut self, op: &str) -> Result<(), Error> {
        let wait = self.meter.wait();
        if wait.is_zero() {
            return Ok(());
        }
        let left = self.budgets.wall_time.saturating_sub(self.call.started.elapsed());
        if wait >= left {
            return Err(self.exceeded(
                "redis_work",
                format!(
                    "{op}: the policy's scans examined more than {} keys a second; it may go on in {} ms",
                    self.budgets.examined_per_sec,
                    wait.as_millis()
                ),
            ));
        }
        tracing::debug!(policy = %self.policy, op, wait_ms = wait.as_millis() as u64, "waiting for the Redis-work allowance");
        tokio::time::sleep(wait).await;
        Ok(())
    }

    /// Count `n` keys examined by this call (Redis's work) against the
    /// call's budget and the policy's meter.
    fn examined(&mut self, n: u64) {
        self.call.keys_examined += n;
        self.meter.charge(n);
    }

    /// Keys-touched budget left for this call.
    fn keys_left(&self) -> u64 {
        self.budgets.keys_limit().saturating_mul(u64::from(self.events)).saturating_sub(self.call.keys_touched)
    }

    /// Count keys touched by a single-key operation against the budget.
    fn touch(&mut self, op: &str, n: u64) -> Result<(), Error> {
        if n > self.keys_left() {
            return Err(self.exceeded(
                "keys",
                format!("{op} would touch more than {} keys in one event", self.budgets.keys_limit()),
            ));
        }
        self.call.keys_touched += n;
        Ok(())
    }

    /// A host-side bulk operation: every pattern checked against the
    /// grants first, every key Redis returns checked again.
    async fn bulk(&mut self, op: &'static str, work: Bulk<'_>) -> Result<u64, Error> {
        self.flush().await?;
        let need = match work {
            Bulk::Delete(pattern) => {
                self.admit(op, KeyOps::DELETE, Target::Pattern(pattern))?;
                KeyOps::DELETE
            }
            Bulk::Expire(rows) => {
                if rows.is_empty() {
                    return Ok(0);
                }
                for row in rows {
                    check_ttl(op, row.ttl_ms)?;
                    self.admit(op, KeyOps::EXPIRE, Target::Pattern(&row.pattern))?;
                }
                KeyOps::EXPIRE
            }
        };
        let grants = self.grants.clone();
        let allow = move |key: &[u8]| grants.allows_key(need, key);
        let pattern = work.describe();
        // In a sliced call: this operation's walk, and where it stopped.
        let walk = match &mut self.walks {
            Some(book) if book.walks.len() < MAX_WALKS || book.made() < book.walks.len() => {
                Some(book.next(&work.identity()))
            }
            _ => None,
        };
        let examine = self.budgets.examined_limit().saturating_sub(self.call.keys_examined);
        let resume = match (&self.walks, walk) {
            (Some(book), Some(at)) if book.walks[at].done => {
                tracing::debug!(policy = %self.policy, op, %pattern, "already walked to its end in an earlier slice");
                return Ok(0);
            }
            // This slice's allowance is spent: the walk waits for the next.
            (Some(_), Some(_)) if self.call.keys_examined >= SLICE_EXAMINED || examine == 0 => {
                return Err(self.slice_cut(op, &pattern));
            }
            (Some(book), Some(at)) => Some(book.walks[at].at.clone()),
            _ => None,
        };
        // One bulk operation stays within one event's keys budget, however
        // many events share the call: it is a limit on blast radius.
        let mut plan = BulkPlan::new(&allow, self.keys_left().min(self.budgets.keys_limit()));
        plan.examine = match walk {
            Some(_) => examine.min(SLICE_EXAMINED - self.call.keys_examined),
            None => examine,
        };
        plan.resume = resume.as_ref();
        plan.whole_pages = walk.is_some();
        self.pace(op).await?;
        let result = match work {
            Bulk::Delete(pattern) => self.backend.delete_matching(pattern, &plan).await,
            Bulk::Expire(rows) => self.backend.expire_matching(rows, &plan).await,
        }
        .map_err(|e| self.redis_failed(op, e))?;
        self.call.keys_touched += result.affected;
        self.examined(result.examined);
        let effects = &mut self.call.effects;
        match work {
            Bulk::Delete(_) => {
                effects.deleted += result.affected;
                effects.bulk_deleted += result.affected;
            }
            Bulk::Expire(_) => {
                effects.expired += result.affected;
                effects.bulk_expired += result.affected;
            }
        }
        self.call.effects.note_keys(result.sample.iter().map(String::as_str));
        if result.refused > 0 {
            tracing::warn!(policy = %self.policy, op, %pattern, refused = result.refused, "keys outside the grants were skipped");
        }
        if let (Some(book), Some(at)) = (self.walks.as_mut(), walk) {
            let walk = &mut book.walks[at];
            walk.examined += result.examined;
            walk.changed += result.affected;
            match result.stopped {
                // The next slice goes on from there.
                Some(position) if result.truncated => {
                    walk.at = position;
                    return Err(self.slice_cut(op, &pattern));
                }
                _ => walk.done = true,
            }
            return Ok(result.affected);
        }
        if result.truncated {
            let examined_out = self.call.keys_examined >= self.budgets.examined_limit();
            let (kind, budget) = if examined_out {
                ("keys_examined", format!("keys-examined budget of {} per event", self.budgets.examined_limit()))
            } else {
                ("keys", format!("keys-touched budget of {} per event", self.budgets.keys_limit()))
            };
            return Err(self.exceeded(
                kind,
                format!(
                    "{op}({pattern}) stopped after changing {} keys and examining {}: {budget}",
                    result.affected, result.examined
                ),
            ));
        }
        Ok(result.affected)
    }
}

/// What a bulk operation does.
#[derive(Clone, Copy)]
enum Bulk<'a> {
    Delete(&'a str),
    /// A TTL table's rows, in one pass.
    Expire(&'a [ExpireRow]),
}

impl Bulk<'_> {
    /// What tells this walk apart from another at the same place in a
    /// sliced call: the operation and every argument (a TTL changed by a
    /// new config starts the walk over), as a digest (patterns may be
    /// long, and the book is written after every slice).
    fn identity(&self) -> String {
        use sha2::Digest;
        let text = match self {
            Bulk::Delete(pattern) => format!("delete\0{pattern}"),
            Bulk::Expire(rows) => rows
                .iter()
                .map(|r| format!("expire\0{}\0{}\0{}", r.pattern, r.ttl_ms, r.only_if_persistent))
                .collect::<Vec<_>>()
                .join("\0"),
        };
        let digest = sha2::Sha256::digest(text.as_bytes());
        digest[..12].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Its patterns, for log lines.
    fn describe(&self) -> String {
        match self {
            Bulk::Delete(pattern) => (*pattern).to_owned(),
            Bulk::Expire(rows) => rows.iter().map(|r| r.pattern.as_str()).collect::<Vec<_>>().join(" "),
        }
    }
}

fn check_length(op: &str, key: &str) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::InvalidArgument(format!("{op}: empty key or pattern")));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Error::InvalidArgument(format!("{op}: key or pattern longer than {MAX_KEY_LEN} bytes")));
    }
    Ok(())
}

fn check_ttl(op: &str, ttl_ms: u64) -> Result<(), Error> {
    if ttl_ms == 0 || ttl_ms > MAX_TTL_MS {
        return Err(Error::InvalidArgument(format!("{op}: ttl-ms must be between 1 and {MAX_TTL_MS}")));
    }
    Ok(())
}

impl wit::types::Host for HostApi {}

impl wit::redis::Host for HostApi {
    async fn get(&mut self, key: String) -> HostResult<Option<Vec<u8>>> {
        Ok(async {
            self.request("get", KeyOps::READ, Target::Key(&key)).await?;
            let value = self.backend.get(&key).await.map_err(|e| self.redis_failed("get", e))?;
            self.read("get", value.as_ref().map_or(0, Vec::len))?;
            Ok(value)
        }
        .await)
    }

    async fn mget(&mut self, keys: Vec<String>) -> HostResult<Vec<Option<Vec<u8>>>> {
        Ok(async {
            if keys.len() > MAX_MGET_KEYS {
                return Err(Error::InvalidArgument(format!(
                    "mget: {} keys in one call; at most {MAX_MGET_KEYS}",
                    keys.len()
                )));
            }
            self.request("mget", KeyOps::READ, Target::Keys(&keys)).await?;
            self.touch("mget", keys.len() as u64)?;
            // In batches no bigger than what is left of the read allowance
            // holds of values as large as a policy may write: the reply of
            // one batch is all Redis and the daemon buffer at once.
            let mut values = Vec::with_capacity(keys.len());
            let mut rest = &keys[..];
            while !rest.is_empty() {
                let left = self.budgets.read_limit().saturating_sub(self.call.read_bytes);
                let take = (left / self.budgets.value_bytes.max(1)).clamp(1, MGET_BATCH.min(rest.len()));
                let (now, later) = rest.split_at(take);
                let got = self.backend.mget(now).await.map_err(|e| self.redis_failed("mget", e))?;
                self.read("mget", got.iter().flatten().map(Vec::len).sum())?;
                values.extend(got);
                rest = later;
            }
            Ok(values)
        }
        .await)
    }

    async fn exists(&mut self, key: String) -> HostResult<bool> {
        Ok(async {
            self.request("exists", KeyOps::READ, Target::Key(&key)).await?;
            self.backend.exists(&key).await.map_err(|e| self.redis_failed("exists", e))
        }
        .await)
    }

    async fn ttl(&mut self, key: String) -> HostResult<KeyTtl> {
        Ok(async {
            self.request("ttl", KeyOps::READ, Target::Key(&key)).await?;
            self.backend.ttl(&key).await.map_err(|e| self.redis_failed("ttl", e))
        }
        .await)
    }

    async fn key_type(&mut self, key: String) -> HostResult<Option<ValueKind>> {
        Ok(async {
            self.request("key-type", KeyOps::READ, Target::Key(&key)).await?;
            self.backend.key_type(&key).await.map_err(|e| self.redis_failed("key-type", e))
        }
        .await)
    }

    async fn scan(&mut self, cursor: u64, pattern: String, count: u32) -> HostResult<ScanPage> {
        Ok(async {
            self.request("scan", KeyOps::READ, Target::Pattern(&pattern)).await?;
            let count = count.clamp(1, MAX_SCAN_COUNT);
            // A page costs Redis its `COUNT` whatever it finds.
            if self.call.keys_examined + u64::from(count) > self.budgets.examined_limit() {
                return Err(self.exceeded(
                    "keys_examined",
                    format!("scan: more than {} keys examined in one event", self.budgets.examined_limit()),
                ));
            }
            self.pace("scan").await?;
            self.examined(u64::from(count));
            let (cursor, raw) =
                self.backend.scan(cursor, &pattern, count).await.map_err(|e| self.redis_failed("scan", e))?;
            // Re-check what Redis returned: the pattern check and Redis must
            // agree, and a key the policy may not read is never shown to it.
            self.read("scan", raw.iter().map(Vec::len).sum())?;
            let keys = raw
                .into_iter()
                .filter(|k| self.grants.allows_key(KeyOps::READ, k))
                .filter_map(|k| String::from_utf8(k).ok())
                .collect();
            Ok(ScanPage { cursor, keys })
        }
        .await)
    }

    async fn set(&mut self, key: String, value: Vec<u8>, options: SetOptions) -> HostResult<bool> {
        Ok(async {
            self.request("set", KeyOps::WRITE, Target::Key(&key)).await?;
            if let Some(ttl) = options.ttl_ms {
                check_ttl("set", ttl)?;
            }
            if value.len() > self.budgets.value_bytes {
                return Err(self.exceeded(
                    "value_bytes",
                    format!("set of {} bytes: values are limited to {} bytes", value.len(), self.budgets.value_bytes),
                ));
            }
            let written = self.backend.set(&key, &value, &options).await.map_err(|e| self.redis_failed("set", e))?;
            if written {
                self.call.effects.written += 1;
                self.call.effects.note_keys([key.as_str()]);
            }
            Ok(written)
        }
        .await)
    }

    async fn del(&mut self, keys: Vec<String>) -> HostResult<u64> {
        Ok(async {
            self.request("del", KeyOps::DELETE, Target::Keys(&keys)).await?;
            self.touch("del", keys.len() as u64)?;
            let n = self.backend.del(&keys).await.map_err(|e| self.redis_failed("del", e))?;
            self.call.effects.deleted += n;
            // Redis says how many, not which: name them only when all were.
            if n == keys.len() as u64 {
                self.call.effects.note_keys(keys.iter().map(String::as_str));
            }
            Ok(n)
        }
        .await)
    }

    async fn expire(&mut self, key: String, ttl_ms: u64, condition: ExpireCondition) -> HostResult<bool> {
        Ok(async {
            self.request("expire", KeyOps::EXPIRE, Target::Key(&key)).await?;
            check_ttl("expire", ttl_ms)?;
            self.touch("expire", 1)?;
            let set = self.backend.expire(&key, ttl_ms, condition).await.map_err(|e| self.redis_failed("expire", e))?;
            if set {
                self.call.effects.expired += 1;
                self.call.effects.note_keys([key.as_str()]);
            }
            Ok(set)
        }
        .await)
    }

    async fn expire_queued(&mut self, key: String, ttl_ms: u64, condition: ExpireCondition) -> HostResult<()> {
        Ok(async {
            self.admit("expire-queued", KeyOps::EXPIRE, Target::Key(&key))?;
            check_ttl("expire-queued", ttl_ms)?;
            self.touch("expire-queued", 1)?;
            self.queued_bytes += key.len();
            self.queued.push(QueuedExpire { key, ttl_ms, condition });
            // What waits is bounded whatever the call's budgets (a batch
            // of long keys): past this, the queue goes out now.
            if self.queued.len() >= MAX_QUEUED || self.queued_bytes >= MAX_QUEUED_BYTES {
                self.flush().await?;
            }
            Ok(())
        }
        .await)
    }

    async fn persist(&mut self, key: String) -> HostResult<bool> {
        Ok(async {
            self.request("persist", KeyOps::EXPIRE, Target::Key(&key)).await?;
            self.backend.persist(&key).await.map_err(|e| self.redis_failed("persist", e))
        }
        .await)
    }

    async fn delete_matching(&mut self, pattern: String) -> HostResult<u64> {
        Ok(self.bulk("delete-matching", Bulk::Delete(&pattern)).await)
    }

    async fn expire_matching(&mut self, pattern: String, ttl_ms: u64, only_if_persistent: bool) -> HostResult<u64> {
        let row = ExpireRow { pattern, ttl_ms, only_if_persistent };
        Ok(self.bulk("expire-matching", Bulk::Expire(std::slice::from_ref(&row))).await)
    }

    async fn expire_matching_rows(&mut self, rows: Vec<ExpireRow>) -> HostResult<u64> {
        Ok(self.bulk("expire-matching-rows", Bulk::Expire(&rows)).await)
    }

    async fn lock_acquire(&mut self, name: String, ttl_ms: u64) -> HostResult<Option<String>> {
        Ok(async {
            self.request("lock-acquire", KeyOps::LOCK, Target::Key(&name)).await?;
            check_ttl("lock-acquire", ttl_ms)?;
            let token =
                self.backend.lock_acquire(&name, ttl_ms).await.map_err(|e| self.redis_failed("lock-acquire", e))?;
            if token.is_some() {
                self.call.effects.locks += 1;
            }
            Ok(token)
        }
        .await)
    }

    async fn lock_release(&mut self, name: String, token: String) -> HostResult<bool> {
        Ok(async {
            self.request("lock-release", KeyOps::LOCK, Target::Key(&name)).await?;
            if token.is_empty() {
                return Err(Error::InvalidArgument("lock-release: empty token".into()));
            }
            self.backend.lock_release(&name, &token).await.map_err(|e| self.redis_failed("lock-release", e))
        }
        .await)
    }
}

impl wit::log::Host for HostApi {
    async fn write(&mut self, level: wit::log::Level, message: String) -> wasmtime::Result<()> {
        use wit::log::Level;
        let policy = &*self.policy;
        match self.log.take() {
            LineVerdict::Log => {}
            LineVerdict::Truncate => {
                log_truncated(policy, self.budgets.log_lines);
                return Ok(());
            }
            LineVerdict::Drop => return Ok(()),
        }
        let message = cut(&message, 4096);
        match level {
            Level::Trace => tracing::trace!(target: "cachepol::guest", policy, "{message}"),
            Level::Debug => tracing::debug!(target: "cachepol::guest", policy, "{message}"),
            Level::Info => tracing::info!(target: "cachepol::guest", policy, "{message}"),
            Level::Warn => tracing::warn!(target: "cachepol::guest", policy, "{message}"),
            Level::Error => tracing::error!(target: "cachepol::guest", policy, "{message}"),
        }
        Ok(())
    }
}

impl wit::clock::Host for HostApi {
    async fn now_ms(&mut self) -> wasmtime::Result<u64> {
        Ok(self.backend.now_ms())
    }
}

/// Contract 0.1.0's imports: the same functions as 0.2.0's, which serve
/// them (see [`crate::wit::v0_1`]).
mod v0_1 {
    use super::{HostApi, HostResult};
    use crate::wit::redis::Host as Current;
    use crate::wit::v0_1::{clock, log, redis};
    use crate::wit::{self, ExpireCondition, KeyTtl, ScanPage, SetOptions, ValueKind};

    impl redis::Host for HostApi {
        async fn get(&mut self, key: String) -> HostResult<Option<Vec<u8>>> {
            Current::get(self, key).await
        }
        async fn exists(&mut self, key: String) -> HostResult<bool> {
            Current::exists(self, key).await
        }
        async fn ttl(&mut self, key: String) -> HostResult<KeyTtl> {
            Current::ttl(self, key).await
        }
        async fn key_type(&mut self, key: String) -> HostResult<Option<ValueKind>> {
            Current::key_type(self, key).await
        }
        async fn scan(&mut self, cursor: u64, pattern: String, count: u32) -> HostResult<ScanPage> {
            Current::scan(self, cursor, pattern, count).await
        }
        async fn set(&mut self, key: String, value: Vec<u8>, options: SetOptions) -> HostResult<bool> {
            Current::set(self, key, value, options).await
        }
        async fn del(&mut self, keys: Vec<String>) -> HostResult<u64> {
            Current::del(self, keys).await
        }
        async fn expire(&mut self, key: String, ttl_ms: u64, condition: ExpireCondition) -> HostResult<bool> {
            Current::expire(self, key, ttl_ms, condition).await
        }
        async fn persist(&mut self, key: String) -> HostResult<bool> {
            Current::persist(self, key).await
        }
        async fn delete_matching(&mut self, pattern: String) -> HostResult<u64> {
            Current::delete_matching(self, pattern).await
        }
        async fn expire_matching(&mut self, pattern: String, ttl_ms: u64, only: bool) -> HostResult<u64> {
            Current::expire_matching(self, pattern, ttl_ms, only).await
        }
        async fn lock_acquire(&mut self, name: String, ttl_ms: u64) -> HostResult<Option<String>> {
            Current::lock_acquire(self, name, ttl_ms).await
        }
        async fn lock_release(&mut self, name: String, token: String) -> HostResult<bool> {
            Current::lock_release(self, name, token).await
        }
    }

    impl log::Host for HostApi {
        async fn write(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
            let level = match level {
                log::Level::Trace => wit::log::Level::Trace,
                log::Level::Debug => wit::log::Level::Debug,
                log::Level::Info => wit::log::Level::Info,
                log::Level::Warn => wit::log::Level::Warn,
                log::Level::Error => wit::log::Level::Error,
            };
            wit::log::Host::write(self, level, message).await
        }
    }

    impl clock::Host for HostApi {
        async fn now_ms(&mut self) -> wasmtime::Result<u64> {
            wit::clock::Host::now_ms(self).await
        }
    }
}
