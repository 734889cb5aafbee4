//! A policy's inbox: bounded, in order, coalescing, and honest about loss.
//!
//! The subscription socket must be drained at full speed (Redis drops a
//! subscriber that falls 32 MB behind, and redis-rs would buffer without
//! bound), so pushing never waits. Instead, per policy:
//! - a keyspace event identical to one still waiting (same op, same key) is
//!   coalesced into it: the policy looks at the key's current state anyway
//!   (the fewer hops of the two are kept);
//! - past the capacity, a keyspace event is dropped, and the queue records a
//!   gap; once the backlog is worked off the policy gets `sweep(gap)` to
//!   reconcile with Redis itself. Nothing is lost silently, memory stays
//!   bounded;
//! - deploy hooks and sweeps are never dropped (they are rare, and a hook is
//!   only acknowledged once handled).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::{Notify, oneshot};

use crate::wit::{DeployEvent, SweepReason};

/// A keyspace event as the daemon routes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyNotification {
    pub db: u32,
    pub op: String,
    pub key: String,
    /// Policy writes deep (0: the application's own write).
    pub hops: u8,
    /// The version of the policy's subscriptions it was routed under: a
    /// version swapped in later re-checks it against its own.
    pub generation: u64,
}

/// Why a policy did not handle a deploy hook, and what retrying would do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct HookFailure {
    pub reason: String,
    pub kind: FailureKind,
}

/// What kind of failure a [`HookFailure`] is, which decides its retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// Redis could not be reached during the call: not the hook's fault.
    /// Retry once Redis answers again, without spending an attempt.
    RedisUnavailable,
    /// A grant refused what the policy asked for: it will be refused the
    /// same way every time, so retrying only delays the dead letter.
    Denied,
    /// Anything else (a trap, an error the policy returned, a budget):
    /// retried up to the attempt limit.
    Failed,
}

impl HookFailure {
    pub fn failed(reason: impl Into<String>) -> HookFailure {
        HookFailure { reason: reason.into(), kind: FailureKind::Failed }
    }
}

/// Where a worker reports whether a deploy hook was handled.
pub type HookDone = oneshot::Sender<Result<(), HookFailure>>;

/// One unit of work for a policy.
#[derive(Debug)]
pub enum Item {
    Key(KeyNotification),
    /// The hook, and where to report whether it was handled.
    Deploy(DeployEvent, HookDone),
    Sweep(SweepReason),
}

/// What happened to a pushed keyspace event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    Coalesced,
    Dropped,
}

/// Counters, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub queued: u64,
    pub coalesced: u64,
    pub dropped: u64,
    pub gaps: u64,
}

struct Inner {
    items: VecDeque<Item>,
    /// (op, key) of every keyspace event waiting, for coalescing, with the
    /// fewest hops among the events folded into it: an application's write
    /// coalesced into a policy's write of the same kind is still the
    /// application's, and must not count toward the hop limit.
    waiting: HashMap<(String, String), u8>,
    keys_waiting: usize,
    gap: bool,
    closed: bool,
    stats: QueueStats,
}

/// The inbox of one policy.
pub struct PolicyQueue {
    inner: Mutex<Inner>,
    ready: Notify,
    capacity: usize,
}

impl PolicyQueue {
    pub fn new(capacity: usize) -> PolicyQueue {
        PolicyQueue {
            inner: Mutex::new(Inner {
                items: VecDeque::new(),
                waiting: HashMap::new(),
                keys_waiting: 0,
                gap: false,
                closed: false,
                stats: QueueStats::default(),
            }),
            ready: Notify::new(),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a keyspace event without ever waiting.
    pub fn push_key(&self, event: KeyNotification) -> Pushed {
        let mut inner = self.lock();
        if inner.closed {
            return Pushed::Dropped;
        }
        let id = (event.op.clone(), event.key.clone());
        if let Some(hops) = inner.waiting.get_mut(&id) {
            *hops = (*hops).min(event.hops);
            inner.stats.coalesced += 1;
            return Pushed::Coalesced;
        }
        if inner.keys_waiting >= self.capacity {
            if !inner.gap {
                inner.stats.gaps += 1;
            }
            inner.gap = true;
            inner.stats.dropped += 1;
            return Pushed::Dropped;
        }
        inner.waiting.insert(id, event.hops);
        inner.keys_waiting += 1;
        inner.stats.queued += 1;
        inner.items.push_back(Item::Key(event));
        drop(inner);
        self.ready.notify_one();
        Pushed::Queued
    }

    /// An event for this policy could not be queued at all (its key cannot
    /// be handed to a policy): owe it a `sweep(gap)`.
    pub fn record_gap(&self) {
        let mut inner = self.lock();
        if inner.closed {
            return;
        }
        if !inner.gap {
            inner.stats.gaps += 1;
        }
        inner.gap = true;
        inner.stats.dropped += 1;
        drop(inner);
        self.ready.notify_one();
    }

    /// Queue a deploy hook or a sweep (never dropped while open; a sweep
    /// identical to one already waiting is redundant and skipped). Returns
    /// the item back if the queue is closed.
    pub fn push(&self, item: Item) -> Result<(), Item> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(item);
        }
        if let Item::Sweep(reason) = &item
            && inner.items.iter().any(|i| matches!(i, Item::Sweep(r) if r == reason))
        {
            return Ok(());
        }
        inner.items.push_back(item);
        drop(inner);
        self.ready.notify_one();
        Ok(())
    }

    /// The next item; after a gap, `sweep(gap)` once the backlog is empty.
    /// `None` once the queue is closed and empty.
    pub async fn pop(&self) -> Option<Item> {
        loop {
            {
                let mut inner = self.lock();
                if let Some(mut item) = inner.items.pop_front() {
                    if let Item::Key(k) = &mut item {
                        let id = (k.op.clone(), k.key.clone());
                        if let Some(hops) = inner.waiting.remove(&id) {
                            k.hops = hops;
                        }
                        inner.keys_waiting -= 1;
                    }
                    return Some(item);
                }
                if inner.gap {
                    inner.gap = false;
                    return Some(Item::Sweep(SweepReason::Gap));
                }
                if inner.closed {
                    return None;
                }
            }
            self.ready.notified().await;
        }
    }

    /// Stop accepting work. Waiting keyspace events are discarded (a sweep
    /// at the next start reconciles them); waiting hooks and sweeps are
    /// returned so their senders learn they were not handled.
    pub fn close(&self) -> Vec<Item> {
        let mut inner = self.lock();
        inner.closed = true;
        inner.gap = false;
        inner.waiting.clear();
        inner.keys_waiting = 0;
        let rest = inner.items.drain(..).filter(|i| !matches!(i, Item::Key(_))).collect();
        drop(inner);
        self.ready.notify_waiters();
        self.ready.notify_one();
        rest
    }

    pub fn stats(&self) -> QueueStats {
        self.lock().stats
    }

    /// Items waiting now.
    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(op: &str, key: &str) -> KeyNotification {
        KeyNotification { db: 0, op: op.into(), key: key.into(), hops: 0, generation: 0 }
    }

    #[tokio::test]
    async fn keeps_order_and_coalesces_repeats() {
        let q = PolicyQueue::new(10);
        assert_eq!(q.push_key(key("set", "a")), Pushed::Queued);
        assert_eq!(q.push_key(key("set", "b")), Pushed::Queued);
        assert_eq!(q.push_key(key("set", "a")), Pushed::Coalesced);
        assert_eq!(q.push_key(key("del", "a")), Pushed::Queued, "another op is another event");
        let mut seen = Vec::new();
        while !q.is_empty() {
            if let Some(Item::Key(k)) = q.pop().await {
                seen.push(format!("{} {}", k.op, k.key));
            }
        }
        assert_eq!(seen, ["set a", "set b", "del a"]);
        assert_eq!(q.push_key(key("set", "a")), Pushed::Queued, "handled events no longer coalesce");
    }

    #[tokio::test]
    async fn coalescing_keeps_the_fewest_hops() {
        let q = PolicyQueue::new(10);
        let echo = KeyNotification { hops: 2, ..key("del", "a") };
        assert_eq!(q.push_key(echo), Pushed::Queued);
        assert_eq!(q.push_key(key("del", "a")), Pushed::Coalesced, "the application's own delete");
        let Some(Item::Key(k)) = q.pop().await else { panic!("a key event") };
        assert_eq!(k.hops, 0, "an application event folded into an echo is still the application's");
    }

    #[tokio::test]
    async fn overflow_drops_records_a_gap_and_sweeps_after_the_backlog() {
        let q = PolicyQueue::new(3);
        for i in 0..10 {
            q.push_key(key("set", &format!("k{i}")));
        }
        assert_eq!(q.stats(), QueueStats { queued: 3, coalesced: 0, dropped: 7, gaps: 1 });
        let (tx, _rx) = oneshot::channel();
        let hook = DeployEvent { id: "1".into(), service: "s".into(), files: vec![], tags: vec![] };
        assert!(q.push(Item::Deploy(hook, tx)).is_ok(), "hooks are never dropped");
        let mut kinds = Vec::new();
        for _ in 0..5 {
            kinds.push(match q.pop().await.unwrap() {
                Item::Key(_) => "key",
                Item::Deploy(..) => "deploy",
                Item::Sweep(SweepReason::Gap) => "gap",
                Item::Sweep(_) => "sweep",
            });
        }
        assert_eq!(kinds, ["key", "key", "key", "deploy", "gap"]);
    }

    #[tokio::test]
    async fn close_wakes_the_worker_and_returns_pending_hooks() {
        let q = std::sync::Arc::new(PolicyQueue::new(3));
        let worker = {
            let q = q.clone();
            tokio::spawn(async move { q.pop().await.is_none() })
        };
        tokio::task::yield_now().await;
        q.push_key(key("set", "x"));
        let rest = q.close();
        assert!(rest.is_empty());
        // The worker either got the key before the close or saw the close.
        let _ = worker.await.unwrap();
        assert!(q.pop().await.is_none());
        assert_eq!(q.push_key(key("set", "y")), Pushed::Dropped);
    }
}
