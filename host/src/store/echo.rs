//! Echo suppression: a policy's own writes must not wake it again.
//!
//! Redis does not say which client caused a keyspace notification, so the
//! daemon keeps a ledger of what it is about to do. Before a write on a
//! policy's behalf reaches Redis, the ledger records "policy P will cause
//! `expire` on key K" (a bulk operation records each key of each page before
//! sending its writes). When a notification arrives, the subscriber asks the
//! ledger who caused it; a match is consumed and the event is tagged with its
//! origin:
//!
//! - it is not delivered to P itself (the echo);
//! - it is delivered to other policies one *hop* further than the event P
//!   was handling, and a chain of policies waking each other stops at the
//!   hop limit.
//!
//! An expectation must go once its notification can no longer come (a
//! `DEL` of a missing key notifies nothing), or it would swallow a later,
//! genuine event on that key. That is decided by *fences*, not by time: the
//! daemon publishes a numbered message on a channel its own subscription
//! connection listens to, after the write has been answered. Redis queues a
//! write's notification for the subscriber while executing the write, so
//! once fence `n` comes back through the subscription, every write finished
//! before `n` was sent has had its notification read, and its leftover
//! expectations are dropped. However far the subscriber lags, an echo is
//! matched when it arrives; and a key a policy did not write is never
//! mistaken for its own.
//!
//! On a Redis Cluster there is one subscription per primary, and a write's
//! notification comes through its node's. A `PUBLISH` reaches every node
//! (the cluster bus broadcasts it), after the notifications of every write
//! answered before it was sent, so a fence retires expectations only once
//! it has come back through *every* subscription ([`EchoLedger::listener`]).
//!
//! Writes whose notifications the subscription does not carry (no loaded
//! policy listens to that op: ttl-table's `EXPIRE`s, say) are not recorded
//! at all: nothing would ever claim them.
//!
//! Only when the ledger is full (a bulk operation far ahead of a stalled
//! subscriber) does a bulk operation fall back to a *window*: "P causes `del`
//! on keys matching G" until a fence after it, which takes any application
//! write of that kind on those keys for P's.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cachepol_guest_sdk::glob::Glob;

use crate::store::announce::{WRITING, Writing};
use crate::store::backend::{Backend, BackendError, BulkPlan, BulkResult, BulkStep, QueuedExpire, Rows, WriteLayer};
use crate::store::target::Conn;
use crate::wit::{ExpireCondition, ExpireRow, SetOptions};

/// Expectations kept at once (each about 200 bytes); past this a bulk
/// operation falls back to a window (see the module doc), so memory stays
/// bounded under any lag: about 50 pages in flight.
pub const CAPACITY: usize = 50_000;
/// Key bytes kept at once: 50,000 expectations of 16 KiB keys would be
/// 800 MiB, so the ledger is bounded by bytes as well as by count.
pub const CAPACITY_BYTES: usize = 16 << 20;

/// Who caused an event, as far as the ledger knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub policy: Arc<str>,
    /// How many policy writes deep this event is (1 for a policy's write in
    /// response to an application event).
    pub hops: u8,
}

#[derive(Debug)]
struct Mark {
    id: u64,
    op: &'static str,
    origin: Origin,
}

#[derive(Debug)]
struct Window {
    glob: Glob,
    op: &'static str,
    origin: Origin,
    /// `None` while the bulk operation runs; then the fence that retires it.
    retire_at: Option<u64>,
    id: u64,
}

#[derive(Debug, Default)]
struct Ledger {
    /// Expected notifications per key, oldest first.
    keys: HashMap<Vec<u8>, VecDeque<Mark>>,
    marks: usize,
    /// Bytes of the keys of `marks` (each counted once per mark).
    bytes: usize,
    /// Expectations whose writes were answered, by the fence that retires
    /// them (in order: fences are numbered under this lock).
    retiring: VecDeque<(u64, Vec<u8>, u64)>,
    windows: Vec<Window>,
    next_id: u64,
    /// The id the next fence will carry.
    next_fence: u64,
    /// The ops whose notifications the subscription carries; `None` for
    /// every op (also until the subscriber says).
    listened: Option<BTreeSet<String>>,
    /// The last fence each subscription has read (one per primary on a
    /// cluster); `None` until its first.
    listeners: HashMap<u64, Option<u64>>,
    next_listener: u64,
}

impl Ledger {
    fn remove_mark(&mut self, key: &[u8], pick: impl Fn(&Mark) -> bool) -> Option<Mark> {
        let marks = self.keys.get_mut(key)?;
        let found = marks.iter().position(pick).and_then(|i| marks.remove(i));
        if marks.is_empty() {
            self.keys.remove(key);
        }
        if found.is_some() {
            self.marks -= 1;
            self.bytes -= key.len();
        }
        found
    }

    /// Whether `n` more expectations of `bytes` key bytes fit.
    fn has_room(&self, n: usize, bytes: usize) -> bool {
        self.marks + n <= CAPACITY && self.bytes + bytes <= CAPACITY_BYTES
    }

    fn add(&mut self, key: &[u8], op: &'static str, origin: &Origin) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.marks += 1;
        self.bytes += key.len();
        self.keys.entry(key.to_vec()).or_default().push_back(Mark { id, op, origin: origin.clone() });
        id
    }

    /// Expectation `id` on `key` was written: retire it at the next fence.
    fn written(&mut self, key: &[u8], id: u64) {
        if self.keys.get(key).is_some_and(|marks| marks.iter().any(|m| m.id == id)) {
            self.retiring.push_back((self.next_fence, key.to_vec(), id));
        }
    }
}

/// The ledger of writes the daemon is about to make.
#[derive(Debug, Default)]
pub struct EchoLedger {
    inner: Mutex<Ledger>,
}

impl EchoLedger {
    pub fn new() -> EchoLedger {
        EchoLedger::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The subscription carries notifications of `ops` (`None`: every op)
    /// from now on. Called before subscribing to more, and after dropping
    /// some, so that a write whose notification can arrive is recorded.
    pub fn listen(&self, ops: Option<BTreeSet<String>>) {
        self.lock().listened = ops;
    }

    /// Whether notifications of `op` can arrive.
    pub fn listens(&self, op: &str) -> bool {
        self.lock().listened.as_ref().is_none_or(|ops| ops.contains(op))
    }

    /// `origin` is about to cause each of `ops` on `key` (those it can
    /// hear). Returns the ids of the expectations: none if the ledger is
    /// full (the notification then reaches the policy as an application
    /// event would; said in the log).
    pub fn expect(&self, key: &[u8], ops: &[&'static str], origin: &Origin) -> std::ops::Range<u64> {
        let mut ledger = self.lock();
        let first = ledger.next_id;
        if !ledger.has_room(ops.len(), key.len() * ops.len()) {
            drop(ledger);
            tracing::warn!(policy = %origin.policy, "echo ledger full: this write's notification is not recognised as the policy's own");
            return first..first;
        }
        for op in ops {
            if ledger.listened.as_ref().is_none_or(|heard| heard.contains(*op)) {
                ledger.add(key, op, origin);
            }
        }
        first..ledger.next_id
    }

    /// `origin` is about to cause `op` on each of `keys` (a bulk
    /// operation's page). Returns the first id (one per key, in order), or
    /// `None` if the ledger is full and nothing was recorded.
    pub fn expect_each(&self, keys: &[Vec<u8>], op: &'static str, origin: &Origin) -> Option<u64> {
        let mut ledger = self.lock();
        if !ledger.has_room(keys.len(), keys.iter().map(Vec::len).sum()) {
            return None;
        }
        let first = ledger.next_id;
        for key in keys {
            ledger.add(key, op, origin);
        }
        Some(first)
    }

    /// The writes behind expectations `ids` on `key` were answered (or
    /// their answer was lost): their notifications are queued for the
    /// subscriber, or will never come. The next fence retires what is left.
    pub fn written(&self, key: &[u8], ids: std::ops::Range<u64>) {
        let mut ledger = self.lock();
        for id in ids {
            ledger.written(key, id);
        }
    }

    /// [`EchoLedger::written`] for a page recorded by
    /// [`EchoLedger::expect_each`] from `first`.
    pub fn written_each(&self, keys: &[Vec<u8>], first: u64) {
        let mut ledger = self.lock();
        for (key, id) in keys.iter().zip(first..) {
            ledger.written(key, id);
        }
    }

    /// Withdraw expectations that will not happen (the write changed
    /// nothing, so Redis will not notify).
    pub fn withdraw(&self, key: &[u8], ids: std::ops::Range<u64>) {
        let mut ledger = self.lock();
        for id in ids {
            ledger.remove_mark(key, |m| m.id == id);
        }
    }

    /// `origin` is about to cause `op` on keys matching `pattern` until the
    /// returned window is closed and a fence after that has come back.
    pub fn open_window(self: &Arc<Self>, pattern: &str, op: &'static str, origin: &Origin) -> WindowGuard {
        let mut ledger = self.lock();
        let id = ledger.next_id;
        ledger.next_id += 1;
        ledger.windows.push(Window { glob: Glob::new(pattern), op, origin: origin.clone(), retire_at: None, id });
        WindowGuard { ledger: self.clone(), id }
    }

    /// Who caused `op` on `key`, if it was one of ours. Consumes a key mark.
    pub fn claim(&self, op: &str, key: &[u8]) -> Option<Origin> {
        let mut ledger = self.lock();
        if let Some(mark) = ledger.remove_mark(key, |m| m.op == op) {
            return Some(mark.origin);
        }
        ledger.windows.iter().find(|w| w.op == op && w.glob.matches_bytes(key)).map(|w| w.origin.clone())
    }

    /// The id of a fence to publish now, if anything waits for one (a
    /// written expectation or a closed window, which it would retire).
    pub fn fence_to_send(&self) -> Option<u64> {
        let mut ledger = self.lock();
        let waiting = !ledger.retiring.is_empty() || ledger.windows.iter().any(|w| w.retire_at.is_some());
        waiting.then(|| {
            ledger.next_fence += 1;
            ledger.next_fence - 1
        })
    }

    /// A subscription starts: fences count once it (and every other) has
    /// read them. It hears no write made before it, so it starts as having
    /// read every fence already sent.
    pub fn listener(&self) -> u64 {
        let mut ledger = self.lock();
        let id = ledger.next_listener;
        ledger.next_listener += 1;
        let sent = ledger.next_fence.checked_sub(1);
        ledger.listeners.insert(id, sent);
        id
    }

    /// Subscription `listener` is gone: it holds no fence back any more.
    pub fn drop_listener(&self, listener: u64) {
        let mut ledger = self.lock();
        ledger.listeners.remove(&listener);
        Self::retire_read(&mut ledger);
    }

    /// Fence `id` came back through subscription `listener`.
    pub fn fence_seen_by(&self, listener: u64, id: u64) {
        let mut ledger = self.lock();
        if let Some(seen) = ledger.listeners.get_mut(&listener) {
            *seen = Some(seen.map_or(id, |s| s.max(id)));
        }
        Self::retire_read(&mut ledger);
    }

    /// Retire up to the last fence every subscription has read.
    fn retire_read(ledger: &mut Ledger) {
        let read = ledger.listeners.values().copied().collect::<Option<Vec<u64>>>();
        if let Some(id) = read.and_then(|r| r.into_iter().min()) {
            Self::retire(ledger, id);
        }
    }

    /// Fence `id` came back through the subscription (the only one): every
    /// write answered before it was sent has had its notification read, so
    /// what is left of those expectations will never be matched.
    pub fn fence_seen(&self, id: u64) {
        Self::retire(&mut self.lock(), id);
    }

    fn retire(ledger: &mut Ledger, id: u64) {
        while ledger.retiring.front().is_some_and(|(at, _, _)| *at <= id) {
            let (_, key, mark) = ledger.retiring.pop_front().expect("checked");
            ledger.remove_mark(&key, |m| m.id == mark);
        }
        ledger.windows.retain(|w| w.retire_at.is_none_or(|at| at > id));
    }

    /// How many expectations are outstanding (for tests and metrics).
    pub fn len(&self) -> usize {
        let ledger = self.lock();
        ledger.marks + ledger.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The notifications a write of the restricted API can cause, as the
/// ledger names them.
const WRITE_OPS: &[&str] = &["set", "expire", "del", "persist"];

/// `op` as the ledger names it, if a write can cause it.
pub fn known_op(op: &str) -> Option<&'static str> {
    WRITE_OPS.iter().copied().find(|o| *o == op)
}

/// How often a fence is published while anything waits for one.
pub const FENCE_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// A channel for this daemon's fences, unique per process: a second
/// daemon's fences say nothing about what this one's subscriber has read.
pub fn fence_channel() -> String {
    format!("cachepol:fence:{:016x}", rand::random::<u64>())
}

/// The fence id in a message on the fence channel.
pub fn parse_fence(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload).ok()?.parse().ok()
}

/// Publish fences on `channel` every [`FENCE_EVERY`] while the ledger has
/// anything for them to retire, until `stop`. A fence lost to a broken
/// connection is made good by the next one (each retires all before it).
pub async fn send_fences(
    ledger: Arc<EchoLedger>,
    mut conn: Conn,
    channel: String,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(FENCE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Some(id) = ledger.fence_to_send() {
            let sent: redis::RedisResult<i64> =
                redis::cmd("PUBLISH").arg(&channel).arg(id).query_async(&mut conn).await;
            if let Err(e) = sent {
                tracing::debug!(error = %e, "cannot publish an echo fence; the next one covers it");
            }
        }
    }
}

/// Closes a bulk operation's window when dropped; notifications already in
/// flight still match it until a fence sent after now comes back.
pub struct WindowGuard {
    ledger: Arc<EchoLedger>,
    id: u64,
}

impl Drop for WindowGuard {
    fn drop(&mut self) {
        let mut ledger = self.ledger.lock();
        let fence = ledger.next_fence;
        if let Some(w) = ledger.windows.iter_mut().find(|w| w.id == self.id) {
            w.retire_at = Some(fence);
        }
    }
}

/// The write layer that records each write in the ledger before sending
/// it, tagged with the policy and the hop count of the event being handled.
/// Wrap a backend with it through [`crate::store::backend::Layered`].
pub struct EchoLayer {
    ledger: Arc<EchoLedger>,
    policy: Arc<str>,
    /// Hops of the event the policy is handling now; its writes are one more.
    hops: Arc<AtomicU8>,
}

impl EchoLayer {
    /// Also returns the handle through which the worker tells the layer the
    /// hop count of each event before delivering it.
    pub fn new(ledger: Arc<EchoLedger>, policy: Arc<str>) -> (EchoLayer, Arc<AtomicU8>) {
        let hops = Arc::new(AtomicU8::new(0));
        (EchoLayer { ledger, policy, hops: hops.clone() }, hops)
    }

    fn origin(&self) -> Origin {
        Origin { policy: self.policy.clone(), hops: self.hops.load(Ordering::Relaxed).saturating_add(1) }
    }

    /// Run the backend's `write`, telling it who writes and what the write
    /// causes, for the replicas' announcements ([`crate::store::announce`]).
    async fn as_writer<T>(&self, ops: &'static [&'static str], write: impl Future<Output = T>) -> T {
        WRITING.scope(Writing { origin: self.origin(), ops }, write).await
    }

    /// Expect `ops` on `key` and run the write. If it changed nothing,
    /// Redis will not notify: the expectations are withdrawn at once.
    /// Otherwise (or if the answer was lost) they stay until their
    /// notifications arrive or a fence retires them.
    async fn expecting<T>(
        &self,
        key: &[u8],
        ops: &'static [&'static str],
        write: impl Future<Output = Result<T, BackendError>>,
        changed: impl Fn(&T) -> bool,
    ) -> Result<T, BackendError> {
        let ids = self.ledger.expect(key, ops, &self.origin());
        // If the call is cut off here (its wall time ran out), the write
        // may or may not have reached Redis: the next fence retires the
        // expectations either way.
        let mut pending = Pending { ledger: &self.ledger, key, ids: Some(ids) };
        let result = self.as_writer(ops, write).await;
        let ids = pending.ids.take().unwrap_or_default();
        match &result {
            Ok(value) if !changed(value) => self.ledger.withdraw(key, ids),
            _ => self.ledger.written(key, ids),
        }
        result
    }
}

/// Expectations of a write not answered yet: if the write's future is
/// dropped before its answer, they are retired at the next fence instead
/// of staying for ever (where they would take a later application event on
/// that key for the policy's own).
struct Pending<'a> {
    ledger: &'a EchoLedger,
    key: &'a [u8],
    ids: Option<std::ops::Range<u64>>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(ids) = self.ids.take() {
            self.ledger.written(self.key, ids);
        }
    }
}

/// A page of a bulk operation in flight, named by its first key and size:
/// on a cluster, pages of several nodes are in flight at once and answered
/// in any order (a key is on one node only).
struct Page {
    /// Its keys (kept to retire their expectations if the operation ends
    /// before the page is answered).
    keys: Vec<Vec<u8>>,
    /// Its expectations' first id.
    first_id: u64,
}

/// A bulk operation's side of the ledger: each page's keys are expected
/// before their writes go out and marked written once answered; if the
/// ledger is full, a window covers the rest of the operation instead.
struct BulkEcho<'a> {
    ledger: &'a Arc<EchoLedger>,
    policy: &'a str,
    op: &'static str,
    pattern: &'a str,
    origin: Origin,
    /// The pages in flight.
    pages: Mutex<Vec<Page>>,
    window: Mutex<Option<WindowGuard>>,
    /// The subscription carries this op's notifications: else there is
    /// nothing to expect.
    heard: bool,
}

impl<'a> BulkEcho<'a> {
    fn new(layer: &'a EchoLayer, op: &'static str, pattern: &'a str) -> BulkEcho<'a> {
        BulkEcho {
            ledger: &layer.ledger,
            policy: &layer.policy,
            op,
            pattern,
            origin: layer.origin(),
            pages: Mutex::new(Vec::new()),
            window: Mutex::new(None),
            heard: layer.ledger.listens(op),
        }
    }

    fn step(&self, step: BulkStep<'_>) {
        if !self.heard {
            return;
        }
        match step {
            BulkStep::Before(keys) => {
                let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
                let first = if window.is_some() { None } else { self.ledger.expect_each(keys, self.op, &self.origin) };
                if first.is_none() && window.is_none() {
                    tracing::warn!(policy = %self.policy, pattern = %self.pattern, "echo ledger full: the rest of this bulk operation is covered by a window");
                    *window = Some(self.ledger.open_window(self.pattern, self.op, &self.origin));
                }
                // Under a window, nothing waits for this page's answer.
                if let Some(first) = first {
                    let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
                    pages.push(Page { keys: keys.to_vec(), first_id: first });
                }
            }
            BulkStep::After(keys) => {
                let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
                let page = pages.iter().position(|p| p.keys.first() == keys.first() && p.keys.len() == keys.len());
                if let Some(at) = page {
                    self.ledger.written_each(keys, pages.remove(at).first_id);
                }
            }
        }
    }
}

/// A bulk operation that ends with pages unanswered (cut off by its wall
/// time, or failed): their expectations are retired at the next fence.
impl Drop for BulkEcho<'_> {
    fn drop(&mut self) {
        for page in self.pages.get_mut().unwrap_or_else(|e| e.into_inner()).drain(..) {
            self.ledger.written_each(&page.keys, page.first_id);
        }
    }
}

#[async_trait]
impl WriteLayer for EchoLayer {
    async fn set(
        &self,
        inner: &dyn Backend,
        key: &str,
        value: &[u8],
        options: &SetOptions,
    ) -> Result<bool, BackendError> {
        let ops: &'static [&'static str] = if options.ttl_ms.is_some() { &["set", "expire"] } else { &["set"] };
        self.expecting(key.as_bytes(), ops, inner.set(key, value, options), |w| *w).await
    }

    async fn del(&self, inner: &dyn Backend, keys: &[String]) -> Result<u64, BackendError> {
        let origin = self.origin();
        let ids: Vec<_> = keys.iter().map(|key| self.ledger.expect(key.as_bytes(), &["del"], &origin)).collect();
        let deleted = self.as_writer(&["del"], inner.del(keys)).await;
        for (key, ids) in keys.iter().zip(ids) {
            // None deleted: none will notify. Some: which ones is unknown,
            // and the rest are retired by a fence.
            if matches!(deleted, Ok(0)) {
                self.ledger.withdraw(key.as_bytes(), ids);
            } else {
                self.ledger.written(key.as_bytes(), ids);
            }
        }
        deleted
    }

    async fn expire(
        &self,
        inner: &dyn Backend,
        key: &str,
        ttl_ms: u64,
        condition: ExpireCondition,
    ) -> Result<bool, BackendError> {
        self.expecting(key.as_bytes(), &["expire"], inner.expire(key, ttl_ms, condition), |s| *s).await
    }

    async fn persist(&self, inner: &dyn Backend, key: &str) -> Result<bool, BackendError> {
        self.expecting(key.as_bytes(), &["persist"], inner.persist(key), |p| *p).await
    }

    async fn expire_many(&self, inner: &dyn Backend, items: &[QueuedExpire]) -> Result<Vec<bool>, BackendError> {
        let origin = self.origin();
        let ids: Vec<_> = items.iter().map(|i| self.ledger.expect(i.key.as_bytes(), &["expire"], &origin)).collect();
        let result = self.as_writer(&["expire"], inner.expire_many(items)).await;
        for (index, (item, ids)) in items.iter().zip(ids).enumerate() {
            match &result {
                Ok(set) if !set.get(index).copied().unwrap_or(true) => self.ledger.withdraw(item.key.as_bytes(), ids),
                _ => self.ledger.written(item.key.as_bytes(), ids),
            }
        }
        result
    }

    async fn delete_matching(
        &self,
        inner: &dyn Backend,
        pattern: &str,
        plan: &BulkPlan<'_>,
    ) -> Result<BulkResult, BackendError> {
        let echo = BulkEcho::new(self, "del", pattern);
        let steps = |step: BulkStep<'_>| echo.step(step);
        self.as_writer(&["del"], inner.delete_matching(pattern, &BulkPlan { steps: Some(&steps), ..*plan })).await
    }

    async fn expire_matching(
        &self,
        inner: &dyn Backend,
        rows: &[ExpireRow],
        plan: &BulkPlan<'_>,
    ) -> Result<BulkResult, BackendError> {
        // A window, if the ledger fills, covers what the one pass scans.
        let pattern = Rows::new(rows).scan_pattern();
        let echo = BulkEcho::new(self, "expire", &pattern);
        let steps = |step: BulkStep<'_>| echo.step(step);
        self.as_writer(&["expire"], inner.expire_matching(rows, &BulkPlan { steps: Some(&steps), ..*plan })).await
    }

    async fn lock_acquire(&self, inner: &dyn Backend, name: &str, ttl_ms: u64) -> Result<Option<String>, BackendError> {
        self.expecting(name.as_bytes(), &["set", "expire"], inner.lock_acquire(name, ttl_ms), Option::is_some).await
    }

    async fn lock_release(&self, inner: &dyn Backend, name: &str, token: &str) -> Result<bool, BackendError> {
        self.expecting(name.as_bytes(), &["del"], inner.lock_release(name, token), |r| *r).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(hops: u8) -> Origin {
        Origin { policy: "ttl-table".into(), hops }
    }

    #[test]
    fn a_mark_claims_exactly_one_matching_event() {
        let ledger = EchoLedger::new();
        ledger.expect(b"job:1", &["set", "expire"], &origin(1));
        assert_eq!(ledger.claim("del", b"job:1"), None);
        assert_eq!(ledger.claim("expire", b"job:2"), None);
        assert_eq!(ledger.claim("expire", b"job:1"), Some(origin(1)));
        assert_eq!(ledger.claim("expire", b"job:1"), None, "consumed");
        assert_eq!(ledger.claim("set", b"job:1"), Some(origin(1)));
        assert!(ledger.is_empty());
    }

    #[test]
    fn writes_nobody_listens_to_are_not_recorded() {
        let ledger = EchoLedger::new();
        ledger.listen(Some(["set".to_owned()].into()));
        let ids = ledger.expect(b"job:1", &["set", "expire"], &origin(1));
        assert_eq!(ids.end - ids.start, 1, "only the op the subscription carries");
        assert_eq!(ledger.len(), 1);
        assert_eq!(ledger.claim("set", b"job:1"), Some(origin(1)));
        ledger.listen(None);
        ledger.expect(b"job:1", &["expire"], &origin(1));
        assert_eq!(ledger.claim("expire", b"job:1"), Some(origin(1)), "every op once the subscription is a pattern");
    }

    #[test]
    fn pages_in_flight_are_each_retired_by_a_fence_once_answered() {
        let ledger = Arc::new(EchoLedger::new());
        let (layer, _) = EchoLayer::new(ledger.clone(), "wiper".into());
        let echo = BulkEcho::new(&layer, "del", "k:*");
        let pages: Vec<Vec<Vec<u8>>> =
            (0..3).map(|p| (0..2).map(|k| format!("k:{p}:{k}").into_bytes()).collect()).collect();
        // Three pipelines sent before the first is answered (a walk of the
        // key index), or one per cluster node at once, answered in any
        // order.
        for page in &pages {
            echo.step(BulkStep::Before(page));
        }
        for page in pages.iter().rev() {
            echo.step(BulkStep::After(page));
        }
        // No notification came (the keys were gone already): a fence
        // retires every page's marks, none is left to swallow a later
        // application delete.
        let fence = ledger.fence_to_send().expect("written marks want a fence");
        ledger.fence_seen(fence);
        assert!(ledger.is_empty(), "{} marks left", ledger.len());
        assert_eq!(ledger.claim("del", b"k:0:0"), None);
    }

    #[test]
    fn a_bulk_operation_cut_off_mid_page_leaves_nothing_after_a_fence() {
        let ledger = Arc::new(EchoLedger::new());
        let (layer, _) = EchoLayer::new(ledger.clone(), "wiper".into());
        let page: Vec<Vec<u8>> = (0..3).map(|k| format!("k:{k}").into_bytes()).collect();
        {
            let echo = BulkEcho::new(&layer, "del", "k:*");
            echo.step(BulkStep::Before(&page));
            // Dropped unanswered: the call ran out of wall time.
        }
        let fence = ledger.fence_to_send().expect("the cut-off page wants a fence");
        ledger.fence_seen(fence);
        assert!(ledger.is_empty(), "{} marks left", ledger.len());
        assert_eq!(ledger.claim("del", b"k:1"), None, "a later application delete is the application's");
    }

    #[tokio::test]
    async fn a_write_cut_off_before_its_answer_is_retired_by_the_next_fence() {
        let ledger = Arc::new(EchoLedger::new());
        let (layer, _) = EchoLayer::new(ledger.clone(), "wiper".into());
        let never = layer.expecting(b"k", &["del"], std::future::pending::<Result<u64, BackendError>>(), |n| *n > 0);
        assert!(tokio::time::timeout(std::time::Duration::from_millis(10), never).await.is_err());
        assert_eq!(ledger.len(), 1, "the notification may still come");
        let fence = ledger.fence_to_send().expect("a fence retires it");
        ledger.fence_seen(fence);
        assert!(ledger.is_empty());
    }

    #[test]
    fn the_ledger_is_bounded_by_key_bytes_too() {
        let ledger = EchoLedger::new();
        let key = vec![b'k'; 16 * 1024];
        let mut recorded = 0;
        for _ in 0..2_000 {
            recorded += ledger.expect(&key, &["del"], &origin(1)).count();
        }
        assert_eq!(recorded, CAPACITY_BYTES / key.len(), "recorded until the bytes ran out, then nothing");
        let page = vec![key.clone()];
        assert_eq!(ledger.expect_each(&page, "del", &origin(1)), None, "a full ledger says so to bulk operations");
    }

    #[test]
    fn withdrawn_marks_do_not_swallow_later_events() {
        let ledger = EchoLedger::new();
        let ids = ledger.expect(b"k", &["del"], &origin(1));
        ledger.withdraw(b"k", ids);
        assert_eq!(ledger.claim("del", b"k"), None);
    }

    #[test]
    fn marks_wait_for_their_notification_however_late_and_fences_retire_leftovers() {
        let ledger = EchoLedger::new();
        assert_eq!(ledger.fence_to_send(), None, "nothing to retire, no fence");
        let a = ledger.expect(b"a", &["del"], &origin(1));
        ledger.written(b"a", a);
        let fence = ledger.fence_to_send().expect("a written mark wants a fence");
        // Written after that fence was numbered: a later fence retires it.
        let b = ledger.expect(b"b", &["del"], &origin(1));
        ledger.written(b"b", b);
        // No time limit: only a fence that came back retires a mark.
        std::thread::sleep(std::time::Duration::from_millis(50));
        ledger.fence_seen(fence);
        assert_eq!(ledger.claim("del", b"a"), None, "its notification never came: retired by the fence");
        assert_eq!(ledger.claim("del", b"b"), Some(origin(1)), "written after the fence was sent: still expected");
        // Not yet written (the write is in flight): no fence retires it.
        ledger.expect(b"c", &["del"], &origin(1));
        let later = ledger.fence_to_send().unwrap_or(fence + 1);
        ledger.fence_seen(later + 10);
        assert_eq!(ledger.claim("del", b"c"), Some(origin(1)));
        assert!(ledger.is_empty());
    }

    #[test]
    fn pages_are_expected_key_by_key_and_a_full_ledger_says_so() {
        let ledger = EchoLedger::new();
        let page: Vec<Vec<u8>> = vec![b"quiz:1".to_vec(), b"quiz:2".to_vec()];
        let first = ledger.expect_each(&page, "del", &origin(2)).unwrap();
        ledger.written_each(&page, first);
        assert_eq!(ledger.claim("del", b"quiz:1"), Some(origin(2)));
        assert_eq!(ledger.claim("del", b"quiz:3"), None, "a key it did not write is not its own");
        let fence = ledger.fence_to_send().unwrap();
        ledger.fence_seen(fence);
        assert!(ledger.is_empty(), "quiz:2's notification never came");
        let huge: Vec<Vec<u8>> = (0..=CAPACITY).map(|i| i.to_string().into_bytes()).collect();
        assert_eq!(ledger.expect_each(&huge, "del", &origin(1)), None);
        assert!(ledger.is_empty(), "nothing recorded when it does not fit");
    }

    #[test]
    fn on_a_cluster_a_fence_retires_only_once_every_subscription_read_it() {
        let ledger = EchoLedger::new();
        let (a, b) = (ledger.listener(), ledger.listener());
        let ids = ledger.expect(b"k", &["del"], &origin(1));
        ledger.written(b"k", ids);
        let fence = ledger.fence_to_send().unwrap();
        ledger.fence_seen_by(a, fence);
        assert_eq!(ledger.len(), 1, "node b may still bring the notification");
        ledger.fence_seen_by(b, fence);
        assert!(ledger.is_empty());
        // A node that goes away holds nothing back; one that joins starts
        // past every fence sent.
        let ids = ledger.expect(b"k", &["del"], &origin(1));
        ledger.written(b"k", ids);
        let fence = ledger.fence_to_send().unwrap();
        let c = ledger.listener();
        ledger.fence_seen_by(a, fence);
        assert_eq!(ledger.len(), 1);
        ledger.drop_listener(b);
        assert!(ledger.is_empty(), "c joined after the fence was sent");
        let _ = c;
    }

    #[test]
    fn windows_match_until_a_fence_after_they_close() {
        let ledger = Arc::new(EchoLedger::new());
        let guard = ledger.open_window("quiz:*", "del", &origin(2));
        assert_eq!(ledger.claim("del", b"quiz:1"), Some(origin(2)));
        assert_eq!(ledger.claim("del", b"quiz:2"), Some(origin(2)), "a window is not consumed");
        assert_eq!(ledger.claim("del", b"other:1"), None);
        assert_eq!(ledger.fence_to_send(), None, "an open window waits for no fence");
        drop(guard);
        assert_eq!(ledger.claim("del", b"quiz:3"), Some(origin(2)), "late notifications still match");
        let fence = ledger.fence_to_send().unwrap();
        ledger.fence_seen(fence);
        assert_eq!(ledger.claim("del", b"quiz:4"), None);
        assert!(ledger.is_empty());
    }
}
