//! A policy's inbox: bounded, in order, coalescing, and honest about loss.
//!
//! The subscription socket must be drained at full speed (Redis drops a
//! subscriber that falls 32 MB behind, and redis-rs would buffer without
//! bound), so pushing never waits. Instead, per policy:
//! - a keyspace event identical to the last one still waiting for its key
//!   (same op, same key, nothing else for that key queued after it) is
//!   coalesced into it: the policy looks at the key's current state anyway
//!   (the fewer hops of the two are kept). A key's events are never
//!   reordered: `SET k`, `DEL k`, `SET k` stay three events while they
//!   wait, so the last op a policy hears for a key is the last one Redis
//!   did;
//! - past the capacity (a count of events and a size in bytes), a keyspace
//!   event is dropped, and a `sweep(gap)` is queued behind the events
//!   already waiting, for the policy to reconcile with Redis itself. It
//!   runs even while events keep arriving: one waiting gap sweep covers
//!   every event dropped before it starts, so under sustained overload the
//!   policy alternates between its backlog and sweeps, never falling
//!   behind for good. Nothing is lost silently, memory stays bounded;
//! - deploy hooks and sweeps are never dropped (they are rare, and a hook is
//!   only acknowledged once handled).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, oneshot};

use crate::metrics::PolicyMetrics;
use crate::wit::{DeployEvent, SweepReason};

/// A keyspace event as the daemon routes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyNotification {
    pub db: u32,
    /// Shared by the queues of every policy the event is routed to, and
    /// with the coalescing index of each.
    pub op: Arc<str>,
    pub key: Arc<str>,
    /// Policy writes deep (0: the application's own write).
    pub hops: u8,
    /// The version of the policy's subscriptions it was routed under: a
    /// version swapped in later re-checks it against its own.
    pub generation: u64,
    /// When the notification arrived: the start of the event's lag.
    pub received: std::time::Instant,
    /// The cluster shard it came from, when replicas split a cluster: a
    /// daemon that no longer holds it leaves it to the one that does.
    pub shard: Option<u16>,
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

/// Where a worker reports whether a sweep that started after the request
/// ran to its end (`true`) or failed (`false`); dropped unsent when none
/// ran (this daemon stood by, shut down).
pub type SweepDone = oneshot::Sender<bool>;

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
    /// Gap sweeps queued.
    pub gaps: u64,
}

/// What the queue did to events since the last gap sweep was taken: what
/// that sweep reconciles, for its one log line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Overload {
    pub dropped: u64,
    pub coalesced: u64,
}

/// What one waiting keyspace event costs, beyond its key and op: the
/// entry in `items`, the one in `waiting`, and their allocations.
const EVENT_OVERHEAD_BYTES: usize = 128;

fn event_bytes(event: &KeyNotification) -> usize {
    2 * (event.key.len() + event.op.len()) + EVENT_OVERHEAD_BYTES
}

/// The last waiting event of a key (its op is read from the item itself).
struct Last {
    /// Its push number (see [`Inner::pushed`]).
    at: u64,
    /// Events of this key waiting in all.
    count: u32,
}

struct Inner {
    items: VecDeque<Item>,
    /// Per key with events waiting: the last one, which later identical
    /// events coalesce into.
    waiting: HashMap<Arc<str>, Last>,
    /// Items pushed and popped so far: an item's position in `items` is
    /// its push number minus `popped`.
    pushed: u64,
    popped: u64,
    /// The push number after the last hook or sweep: events before it are
    /// not coalesced into, or they would move ahead of the barrier.
    barrier_at: u64,
    keys_waiting: usize,
    bytes_waiting: usize,
    /// A `sweep(gap)` is waiting in `items`.
    gap_queued: bool,
    /// Sweeps asked for since the worker last looked
    /// ([`PolicyQueue::take_sweeps_asked`]).
    sweeps_asked: u64,
    /// Who waits for the next sweep to finish ([`PolicyQueue::push_awaited`]).
    sweep_waiters: Vec<SweepDone>,
    closed: bool,
    stats: QueueStats,
    overload: Overload,
}

impl Inner {
    fn push_back(&mut self, item: Item) {
        let barrier = !matches!(item, Item::Key(_));
        self.items.push_back(item);
        self.pushed += 1;
        if barrier {
            self.barrier_at = self.pushed;
        }
    }
}

/// The inbox of one policy.
pub struct PolicyQueue {
    inner: Mutex<Inner>,
    ready: Notify,
    capacity: usize,
    max_bytes: usize,
    /// Where coalesced and dropped events are counted.
    metrics: Option<Arc<PolicyMetrics>>,
}

impl PolicyQueue {
    /// A queue of at most `capacity` keyspace events taking `max_bytes`.
    pub fn new(capacity: usize, max_bytes: usize) -> PolicyQueue {
        PolicyQueue {
            inner: Mutex::new(Inner {
                items: VecDeque::new(),
                waiting: HashMap::new(),
                pushed: 0,
                popped: 0,
                barrier_at: 0,
                keys_waiting: 0,
                bytes_waiting: 0,
                gap_queued: false,
                sweeps_asked: 0,
                sweep_waiters: Vec::new(),
                closed: false,
                stats: QueueStats::default(),
                overload: Overload::default(),
            }),
            ready: Notify::new(),
            capacity,
            max_bytes,
            metrics: None,
        }
    }

    /// Count coalesced and dropped events in `metrics`.
    pub fn counted(mut self, metrics: Arc<PolicyMetrics>) -> PolicyQueue {
        self.metrics = Some(metrics);
        self
    }

    /// Bytes the waiting keyspace events hold.
    pub fn bytes(&self) -> usize {
        self.lock().bytes_waiting
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a keyspace event without ever waiting.
    pub fn push_key(&self, event: KeyNotification) -> Pushed {
        let mut guard = self.lock();
        if guard.closed {
            return Pushed::Dropped;
        }
        let queued = &mut *guard;
        if let Some(last) = queued.waiting.get(&*event.key)
            && last.at >= queued.barrier_at
            && let Some(Item::Key(waiting)) = queued.items.get_mut((last.at - queued.popped) as usize)
            && waiting.op == event.op
        {
            // An application's write coalesced into a policy's write of the
            // same kind is still the application's, and must not count
            // toward the hop limit: keep the fewer hops.
            waiting.hops = waiting.hops.min(event.hops);
            queued.stats.coalesced += 1;
            queued.overload.coalesced += 1;
            if let Some(m) = &self.metrics {
                m.coalesced.inc();
            }
            return Pushed::Coalesced;
        }
        let bytes = event_bytes(&event);
        if queued.keys_waiting >= self.capacity || queued.bytes_waiting + bytes > self.max_bytes {
            drop(guard);
            self.record_gap();
            return Pushed::Dropped;
        }
        let at = queued.pushed;
        match queued.waiting.get_mut(&*event.key) {
            Some(last) => {
                last.at = at;
                last.count += 1;
            }
            None => {
                queued.waiting.insert(event.key.clone(), Last { at, count: 1 });
            }
        }
        queued.keys_waiting += 1;
        queued.bytes_waiting += bytes;
        queued.stats.queued += 1;
        queued.push_back(Item::Key(event));
        drop(guard);
        self.ready.notify_one();
        Pushed::Queued
    }

    /// An event for this policy was dropped (its queue is full, or its key
    /// cannot be handed to a policy): make sure a `sweep(gap)` that starts
    /// after it is waiting.
    pub fn record_gap(&self) {
        let mut inner = self.lock();
        if inner.closed {
            return;
        }
        inner.stats.dropped += 1;
        inner.overload.dropped += 1;
        if let Some(m) = &self.metrics {
            m.dropped.inc();
        }
        if inner.gap_queued {
            return;
        }
        inner.gap_queued = true;
        inner.stats.gaps += 1;
        inner.sweeps_asked += 1;
        inner.push_back(Item::Sweep(SweepReason::Gap));
        drop(inner);
        self.ready.notify_one();
    }

    /// What was dropped and coalesced since the last call: called when a
    /// gap sweep starts.
    pub fn take_overload(&self) -> Overload {
        std::mem::take(&mut self.lock().overload)
    }

    /// Queue a deploy hook or a sweep (never dropped while open; a sweep
    /// identical to one already waiting is redundant and skipped). Returns
    /// the item back if the queue is closed.
    pub fn push(&self, item: Item) -> Result<(), Item> {
        if matches!(item, Item::Sweep(_)) {
            self.lock().sweeps_asked += 1;
        }
        self.push_item(item)
    }

    /// Queue a sweep as [`PolicyQueue::push`] does, and be told when a
    /// sweep that starts from now on has run to its end (an operator's
    /// request is recorded as done only then). `None` if the queue is
    /// closed.
    pub fn push_awaited(&self, reason: SweepReason) -> Option<oneshot::Receiver<bool>> {
        let (tx, rx) = oneshot::channel();
        self.lock().sweep_waiters.push(tx);
        self.push(Item::Sweep(reason)).ok()?;
        Some(rx)
    }

    /// Who waits for the sweep starting now ([`PolicyQueue::push_awaited`]).
    pub fn take_sweep_waiters(&self) -> Vec<SweepDone> {
        std::mem::take(&mut self.lock().sweep_waiters)
    }

    /// Give back the waiters of a sweep that goes on in another slice: the
    /// slice that ends it tells them.
    pub fn keep_sweep_waiters(&self, waiters: Vec<SweepDone>) {
        self.lock().sweep_waiters.extend(waiters);
    }

    /// Queue the next slice of a sweep run in slices
    /// ([`crate::store::walks`]), behind what is queued already: unlike
    /// [`PolicyQueue::push`], not a new request for a sweep.
    /// A sweep already waiting (of any reason) goes on with the same walks:
    /// no second one is queued.
    pub fn push_slice(&self, reason: SweepReason) -> Result<(), Item> {
        if self.lock().items.iter().any(|i| matches!(i, Item::Sweep(_))) {
            return Ok(());
        }
        self.push_item(Item::Sweep(reason))
    }

    /// Sweeps asked for with [`PolicyQueue::push`] since the last call:
    /// a request coming while a sweep is walked in slices means the walk
    /// must run again once done (what it reconciles may have changed
    /// behind the positions already passed).
    pub fn take_sweeps_asked(&self) -> u64 {
        std::mem::take(&mut self.lock().sweeps_asked)
    }

    fn push_item(&self, item: Item) -> Result<(), Item> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(item);
        }
        if let Item::Sweep(reason) = &item
            && inner.items.iter().any(|i| matches!(i, Item::Sweep(r) if r == reason))
        {
            return Ok(());
        }
        if matches!(item, Item::Sweep(SweepReason::Gap)) {
            inner.gap_queued = true;
        }
        inner.push_back(item);
        drop(inner);
        self.ready.notify_one();
        Ok(())
    }

    /// The next item, in order. `None` once the queue is closed and empty.
    pub async fn pop(&self) -> Option<Item> {
        loop {
            {
                let mut inner = self.lock();
                if let Some(item) = inner.items.pop_front() {
                    inner.popped += 1;
                    match &item {
                        Item::Key(k) => {
                            if let Some(last) = inner.waiting.get_mut(&*k.key) {
                                last.count -= 1;
                                if last.count == 0 {
                                    inner.waiting.remove(&*k.key);
                                }
                            }
                            inner.keys_waiting -= 1;
                            inner.bytes_waiting -= event_bytes(k);
                        }
                        // Events dropped from now on happen after this sweep
                        // started: they need another.
                        Item::Sweep(SweepReason::Gap) => inner.gap_queued = false,
                        _ => {}
                    }
                    return Some(item);
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
        inner.gap_queued = false;
        inner.waiting.clear();
        inner.popped = inner.pushed;
        inner.keys_waiting = 0;
        inner.bytes_waiting = 0;
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
        KeyNotification {
            db: 0,
            op: op.into(),
            key: key.into(),
            hops: 0,
            generation: 0,
            received: std::time::Instant::now(),
            shard: None,
        }
    }

    #[tokio::test]
    async fn keeps_order_and_coalesces_repeats() {
        let q = PolicyQueue::new(10, 1 << 20);
        assert_eq!(q.push_key(key("set", "a")), Pushed::Queued);
        assert_eq!(q.push_key(key("set", "b")), Pushed::Queued);
        assert_eq!(q.push_key(key("set", "a")), Pushed::Coalesced);
        assert_eq!(q.push_key(key("del", "a")), Pushed::Queued, "another op is another event");
        assert_eq!(q.push_key(key("del", "a")), Pushed::Coalesced);
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
    async fn a_keys_events_are_never_reordered() {
        let q = PolicyQueue::new(10, 1 << 20);
        for op in ["set", "del", "set", "del", "del", "set"] {
            q.push_key(key(op, "k"));
        }
        let mut seen = Vec::new();
        while !q.is_empty() {
            if let Some(Item::Key(k)) = q.pop().await {
                seen.push(k.op.to_string());
            }
        }
        assert_eq!(seen, ["set", "del", "set", "del", "set"], "only repeats in a row coalesce");
    }

    #[tokio::test]
    async fn events_after_a_hook_are_not_coalesced_into_events_before_it() {
        let q = PolicyQueue::new(10, 1 << 20);
        q.push_key(key("set", "k"));
        let (tx, _rx) = oneshot::channel();
        let hook = DeployEvent { id: "1".into(), service: "s".into(), files: vec![], tags: vec![] };
        q.push(Item::Deploy(hook, tx)).unwrap();
        assert_eq!(q.push_key(key("set", "k")), Pushed::Queued, "it must stay after the hook");
        assert_eq!(q.push_key(key("set", "k")), Pushed::Coalesced, "repeats after the hook still coalesce");
        let mut kinds = Vec::new();
        while !q.is_empty() {
            kinds.push(kind(q.pop().await.unwrap()));
        }
        assert_eq!(kinds, ["key", "deploy", "key"]);
    }

    #[tokio::test]
    async fn coalescing_keeps_the_fewest_hops() {
        let q = PolicyQueue::new(10, 1 << 20);
        let echo = KeyNotification { hops: 2, ..key("del", "a") };
        assert_eq!(q.push_key(echo), Pushed::Queued);
        assert_eq!(q.push_key(key("del", "a")), Pushed::Coalesced, "the application's own delete");
        let Some(Item::Key(k)) = q.pop().await else { panic!("a key event") };
        assert_eq!(k.hops, 0, "an application event folded into an echo is still the application's");
    }

    #[tokio::test]
    async fn overflow_drops_and_queues_one_gap_sweep_behind_the_backlog() {
        let q = PolicyQueue::new(3, 1 << 20);
        for i in 0..10 {
            q.push_key(key("set", &format!("k{i}")));
        }
        assert_eq!(q.stats(), QueueStats { queued: 3, coalesced: 0, dropped: 7, gaps: 1 });
        let (tx, _rx) = oneshot::channel();
        let hook = DeployEvent { id: "1".into(), service: "s".into(), files: vec![], tags: vec![] };
        assert!(q.push(Item::Deploy(hook, tx)).is_ok(), "hooks are never dropped");
        let mut kinds = Vec::new();
        for _ in 0..5 {
            kinds.push(kind(q.pop().await.unwrap()));
        }
        assert_eq!(kinds, ["key", "key", "key", "gap", "deploy"], "the sweep does not wait for an empty queue");
        assert_eq!(q.take_overload(), Overload { dropped: 7, coalesced: 0 });
        assert_eq!(q.take_overload(), Overload::default(), "counted once");
    }

    fn kind(item: Item) -> &'static str {
        match item {
            Item::Key(_) => "key",
            Item::Deploy(..) => "deploy",
            Item::Sweep(SweepReason::Gap) => "gap",
            Item::Sweep(_) => "sweep",
        }
    }

    #[tokio::test]
    async fn sustained_overload_gets_a_sweep_after_each_started_one() {
        let q = PolicyQueue::new(2, 1 << 20);
        let mut next = 0;
        let mut flood = |q: &PolicyQueue, n: usize| {
            for _ in 0..n {
                next += 1;
                q.push_key(key("set", &format!("k{next}")));
            }
        };
        flood(&q, 5);
        assert_eq!(kind(q.pop().await.unwrap()), "key");
        flood(&q, 5);
        assert_eq!(q.stats().gaps, 1, "drops before the waiting sweep starts are covered by it");
        let seen: Vec<_> =
            [kind(q.pop().await.unwrap()), kind(q.pop().await.unwrap()), kind(q.pop().await.unwrap())].into();
        assert_eq!(seen, ["key", "gap", "key"]);
        flood(&q, 5);
        assert_eq!(q.stats().gaps, 2, "a drop after the sweep started needs another");
    }

    #[tokio::test]
    async fn bounded_by_bytes_as_well_as_count() {
        let q = PolicyQueue::new(1000, 4096);
        let long = "k".repeat(1000);
        assert_eq!(q.push_key(key("set", &format!("{long}1"))), Pushed::Queued);
        assert_eq!(q.push_key(key("set", &format!("{long}2"))), Pushed::Dropped, "2 KB per event, 4 KB in all");
        assert_eq!(q.push_key(key("set", "short")), Pushed::Queued);
        q.pop().await;
        assert_eq!(q.push_key(key("set", &format!("{long}3"))), Pushed::Queued, "popping frees its bytes");
    }

    #[tokio::test]
    async fn close_wakes_the_worker_and_returns_pending_hooks() {
        let q = std::sync::Arc::new(PolicyQueue::new(3, 1 << 20));
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
