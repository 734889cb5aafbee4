//! Echo suppression: a policy's own writes must not wake it again.
//!
//! Redis does not say which client caused a keyspace notification, so the
//! daemon keeps a ledger of what it is about to do. Before a write on a
//! policy's behalf reaches Redis, the ledger records "policy P will cause
//! `expire` on key K" (or, for the bulk operations, "P will cause `del` on
//! keys matching G" for as long as the operation runs). When a notification
//! arrives, the subscriber asks the ledger who caused it; a match is consumed
//! and the event is tagged with its origin:
//!
//! - it is not delivered to P itself (the echo);
//! - it is delivered to other policies one *hop* further than the event P
//!   was handling, and a chain of policies waking each other stops at the
//!   hop limit.
//!
//! Entries expire after [`MARK_TTL`]: a write whose notification never
//! comes (a `DEL` of a missing key) must not swallow a later, genuine event
//! on the same key for long. In the worst case, an application write to the
//! same key with the same operation within that window is taken for the
//! policy's own, which is harmless for the policy (it just did that write).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cachepol_guest_sdk::glob::Glob;

use crate::store::backend::{Backend, BackendError, BulkPlan, BulkResult, WriteLayer};
use crate::wit::{ExpireCondition, SetOptions};

/// How long an expectation waits for its notification.
pub const MARK_TTL: Duration = Duration::from_secs(2);

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
    op: &'static str,
    origin: Origin,
    deadline: Instant,
}

#[derive(Debug)]
struct Window {
    glob: Glob,
    op: &'static str,
    origin: Origin,
    /// `None` while the bulk operation runs.
    closes: Option<Instant>,
    id: u64,
}

#[derive(Debug, Default)]
struct Ledger {
    /// Expected notifications per key, oldest first.
    keys: HashMap<Vec<u8>, VecDeque<Mark>>,
    windows: Vec<Window>,
    next_window: u64,
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

    /// `origin` is about to cause each of `ops` on `key`.
    pub fn expect(&self, key: &[u8], ops: &[&'static str], origin: &Origin) {
        let deadline = Instant::now() + MARK_TTL;
        let mut ledger = self.lock();
        let marks = ledger.keys.entry(key.to_vec()).or_default();
        marks.extend(ops.iter().map(|op| Mark { op, origin: origin.clone(), deadline }));
    }

    /// Withdraw one expectation that will not happen (the write changed
    /// nothing, so Redis will not notify).
    pub fn withdraw(&self, key: &[u8], op: &'static str) {
        let mut ledger = self.lock();
        if let Some(marks) = ledger.keys.get_mut(key) {
            if let Some(last) = marks.iter().rposition(|m| m.op == op) {
                marks.remove(last);
            }
            if marks.is_empty() {
                ledger.keys.remove(key);
            }
        }
    }

    /// `origin` is about to cause `op` on keys matching `pattern` until the
    /// returned window is closed.
    pub fn open_window(self: &Arc<Self>, pattern: &str, op: &'static str, origin: &Origin) -> WindowGuard {
        let mut ledger = self.lock();
        let id = ledger.next_window;
        ledger.next_window += 1;
        ledger.windows.push(Window { glob: Glob::new(pattern), op, origin: origin.clone(), closes: None, id });
        WindowGuard { ledger: self.clone(), id }
    }

    /// Who caused `op` on `key`, if it was one of ours. Consumes a key mark.
    pub fn claim(&self, op: &str, key: &[u8]) -> Option<Origin> {
        let now = Instant::now();
        let mut ledger = self.lock();
        if let Some(marks) = ledger.keys.get_mut(key) {
            marks.retain(|m| m.deadline >= now);
            let found = marks.iter().position(|m| m.op == op).and_then(|i| marks.remove(i));
            if marks.is_empty() {
                ledger.keys.remove(key);
            }
            if let Some(mark) = found {
                return Some(mark.origin);
            }
        }
        ledger
            .windows
            .iter()
            .find(|w| w.op == op && w.closes.is_none_or(|c| c >= now) && w.glob.matches_bytes(key))
            .map(|w| w.origin.clone())
    }

    /// Drop expired marks and closed windows (called periodically).
    pub fn prune(&self) {
        let now = Instant::now();
        let mut ledger = self.lock();
        ledger.keys.retain(|_, marks| {
            marks.retain(|m| m.deadline >= now);
            !marks.is_empty()
        });
        ledger.windows.retain(|w| w.closes.is_none_or(|c| c >= now));
    }

    /// How many expectations are outstanding (for tests and metrics).
    pub fn len(&self) -> usize {
        let ledger = self.lock();
        ledger.keys.values().map(VecDeque::len).sum::<usize>() + ledger.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Closes a bulk operation's window when dropped; notifications already in
/// flight still match it for [`MARK_TTL`].
pub struct WindowGuard {
    ledger: Arc<EchoLedger>,
    id: u64,
}

impl Drop for WindowGuard {
    fn drop(&mut self) {
        let closes = Instant::now() + MARK_TTL;
        let mut ledger = self.ledger.lock();
        if let Some(w) = ledger.windows.iter_mut().find(|w| w.id == self.id) {
            w.closes = Some(closes);
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

    /// Expect `ops` on `key`, run the write, and withdraw the expectation if
    /// the write changed nothing (Redis will not notify).
    async fn expecting<T>(
        &self,
        key: &[u8],
        ops: &[&'static str],
        write: impl Future<Output = Result<T, BackendError>>,
        changed: impl Fn(&T) -> bool,
    ) -> Result<T, BackendError> {
        self.ledger.expect(key, ops, &self.origin());
        let result = write.await;
        if !result.as_ref().is_ok_and(&changed) {
            for op in ops {
                self.ledger.withdraw(key, op);
            }
        }
        result
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
        let ops: &[&'static str] = if options.ttl_ms.is_some() { &["set", "expire"] } else { &["set"] };
        self.expecting(key.as_bytes(), ops, inner.set(key, value, options), |w| *w).await
    }

    async fn del(&self, inner: &dyn Backend, keys: &[String]) -> Result<u64, BackendError> {
        let origin = self.origin();
        for key in keys {
            self.ledger.expect(key.as_bytes(), &["del"], &origin);
        }
        let deleted = inner.del(keys).await;
        if matches!(deleted, Ok(0) | Err(_)) {
            for key in keys {
                self.ledger.withdraw(key.as_bytes(), "del");
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

    async fn delete_matching(
        &self,
        inner: &dyn Backend,
        pattern: &str,
        plan: &BulkPlan<'_>,
    ) -> Result<BulkResult, BackendError> {
        let _window = self.ledger.open_window(pattern, "del", &self.origin());
        inner.delete_matching(pattern, plan).await
    }

    async fn expire_matching(
        &self,
        inner: &dyn Backend,
        pattern: &str,
        ttl_ms: u64,
        only_if_persistent: bool,
        plan: &BulkPlan<'_>,
    ) -> Result<BulkResult, BackendError> {
        let _window = self.ledger.open_window(pattern, "expire", &self.origin());
        inner.expire_matching(pattern, ttl_ms, only_if_persistent, plan).await
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
    fn withdrawn_marks_do_not_swallow_later_events() {
        let ledger = EchoLedger::new();
        ledger.expect(b"k", &["del"], &origin(1));
        ledger.withdraw(b"k", "del");
        assert_eq!(ledger.claim("del", b"k"), None);
    }

    #[test]
    fn windows_claim_matching_keys_while_open() {
        let ledger = Arc::new(EchoLedger::new());
        let guard = ledger.open_window("quiz:*", "del", &origin(2));
        assert_eq!(ledger.claim("del", b"quiz:1"), Some(origin(2)));
        assert_eq!(ledger.claim("del", b"quiz:2"), Some(origin(2)), "a window is not consumed");
        assert_eq!(ledger.claim("del", b"other:1"), None);
        assert_eq!(ledger.claim("expire", b"quiz:1"), None);
        drop(guard);
        assert_eq!(ledger.claim("del", b"quiz:3"), Some(origin(2)), "late notifications still match");
        ledger.prune();
        assert_eq!(ledger.len(), 1, "closed recently: kept until MARK_TTL");
    }
}
