//! One task per policy: takes its queue in order, calls the policy, reports.
//!
//! Policies run concurrently with each other (one worker each) and handle
//! their own events strictly one at a time, in arrival order. A new version
//! of the policy arrives on the control channel and takes over between two
//! events: the old version finishes the event in hand, every later event
//! goes to the new one, and the old instance is dropped (its memory returns
//! to the pool).
//!
//! Before delivering, the worker asks the policy's circuit breaker
//! ([`crate::dispatch::breaker`]) and the operator's kill switch
//! ([`crate::dispatch::switches`]). While either holds the policy back, events are
//! not delivered: keyspace events and sweeps are dropped and owed as one
//! `sweep(gap)`, deploy hooks fail (the deploy reader retries, then
//! dead-letters them).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::Instrument;

use crate::config::Mode;
use crate::dispatch::audit;
use crate::dispatch::breaker::{Admit, Breaker, FailurePolicy};
use crate::dispatch::queue::{FailureKind, HookFailure, Item, PolicyQueue};
use crate::dispatch::switches::Switches;
use crate::sandbox::runtime::{CallFailure, LoadedPolicy};
use crate::wit::{self, KeyEvent, SweepEvent, SweepReason};

/// How often a failed sweep is tried again before waiting for the next one.
const SWEEP_RETRIES: u32 = 3;

/// A policy version and what its write path needs.
pub struct Version {
    pub policy: LoadedPolicy,
    pub mode: Mode,
    /// Tells the echo layer the hop count of the event being handled.
    pub hops: Arc<AtomicU8>,
    /// What repeated failures do.
    pub failure: FailurePolicy,
    /// Which version of the policy this is (see
    /// [`crate::dispatch::queue::KeyNotification::generation`]).
    pub generation: u64,
}

/// Messages to a running worker.
pub enum Control {
    /// Replace the policy after the event in hand.
    Swap(Version),
}

/// A loaded policy and everything its worker needs.
pub struct Worker {
    version: Version,
    queue: Arc<PolicyQueue>,
    control: mpsc::UnboundedReceiver<Control>,
    breaker: Breaker,
    switches: Arc<Switches>,
    /// Events were dropped while the policy was held back: sweep it.
    owes_sweep: bool,
    /// Consecutive failed sweeps.
    sweep_failures: u32,
}

impl Worker {
    /// A worker and the sender that controls it.
    pub fn new(
        version: Version,
        queue: Arc<PolicyQueue>,
        switches: Arc<Switches>,
    ) -> (Worker, mpsc::UnboundedSender<Control>) {
        let (tx, control) = mpsc::unbounded_channel();
        let breaker = Breaker::new(version.policy.name(), version.failure.clone());
        (Worker { version, queue, control, breaker, switches, owes_sweep: false, sweep_failures: 0 }, tx)
    }

    /// Run until the queue is closed and empty.
    pub async fn run(mut self) {
        let mut seq: u64 = 0;
        loop {
            let cooling = match self.breaker.admit(Instant::now()) {
                Admit::Wait(until) => Some(tokio::time::Instant::from_std(until)),
                Admit::Deliver => None,
            };
            let item = tokio::select! {
                biased;
                Some(Control::Swap(next)) = self.control.recv() => {
                    // A new version starts with a clean record.
                    self.breaker = Breaker::new(next.policy.name(), next.failure.clone());
                    self.version = next;
                    continue;
                }
                _ = tokio::time::sleep_until(cooling.unwrap_or_else(tokio::time::Instant::now)), if cooling.is_some() => {
                    self.settle();
                    continue;
                }
                item = self.queue.pop() => item,
            };
            let Some(item) = item else { return };
            let held = if cooling.is_some() {
                Some("quarantined by its circuit breaker")
            } else if self.switches.is_disabled(self.version.policy.name()) {
                Some("disabled by the operator")
            } else {
                None
            };
            if let Some(why) = held {
                self.skip(item, why);
                continue;
            }
            if matches!(item, Item::Sweep(_)) {
                self.owes_sweep = false;
            } else {
                self.settle();
            }
            seq += 1;
            let span = tracing::debug_span!("event", policy = %self.version.policy.name(), seq);
            self.handle(item, seq).instrument(span).await;
        }
    }

    async fn handle(&mut self, item: Item, seq: u64) {
        match item {
            Item::Key(k) => {
                // Routed under another version's subscriptions (queued
                // across a swap): only what this version subscribes to.
                if k.generation != self.version.generation
                    && !self.version.policy.manifest().wants_key_event(&k.op, k.key.as_bytes())
                {
                    tracing::debug!(policy = %self.version.policy.name(), op = %k.op, key = %k.key, "not for this version: its subscriptions changed");
                    return;
                }
                self.version.hops.store(k.hops, Ordering::Relaxed);
                let id = format!("key-{seq}");
                let event = wit::Event::Key(KeyEvent { db: k.db, op: k.op, key: k.key });
                // A failure is logged and counted by `handle`; nobody waits on it.
                let _ = self.deliver(&id, &event).await;
            }
            Item::Sweep(reason) => {
                self.version.hops.store(0, Ordering::Relaxed);
                let id = format!("sweep-{seq}");
                match self.deliver(&id, &wit::Event::Sweep(SweepEvent { reason })).await {
                    Ok(()) => self.sweep_failures = 0,
                    // A sweep is how missed events get reconciled: losing one
                    // to a passing failure (Redis restarting) would leave the
                    // cache wrong until the next, so it is tried again later.
                    Err(_) if self.sweep_failures < SWEEP_RETRIES => {
                        self.sweep_failures += 1;
                        let delay = Duration::from_millis(500 << self.sweep_failures);
                        tracing::info!(policy = %self.version.policy.name(), delay_ms = delay.as_millis(), "sweep failed; trying again later");
                        let queue = self.queue.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = queue.push(Item::Sweep(reason));
                        });
                    }
                    Err(_) => {}
                }
            }
            Item::Deploy(hook, done) => {
                self.version.hops.store(0, Ordering::Relaxed);
                let id = hook.id.clone();
                let ok = self.deliver(&id, &wit::Event::Deploy(hook)).await;
                let _ = done.send(ok);
            }
        }
    }

    /// Not delivered: owe a sweep for what it misses, fail a deploy hook
    /// (it is retried, then dead-lettered, never lost).
    fn skip(&mut self, item: Item, why: &str) {
        match item {
            Item::Key(_) | Item::Sweep(_) => self.owes_sweep = true,
            Item::Deploy(hook, done) => {
                let _ = done.send(Err(HookFailure::failed(format!("not delivered: the policy is {why}"))));
                tracing::info!(policy = %self.version.policy.name(), hook = %hook.id, "deploy hook not delivered: {why}");
            }
        }
    }

    /// Queue the sweep owed for events dropped while held back.
    fn settle(&mut self) {
        if std::mem::take(&mut self.owes_sweep) {
            let _ = self.queue.push(Item::Sweep(SweepReason::Gap));
        }
    }

    async fn deliver(&mut self, id: &str, event: &wit::Event) -> Result<(), HookFailure> {
        let report = self.version.policy.handle(id, event).await;
        audit::record(self.version.policy.name(), id, self.version.mode, &report);
        if self.breaker.record(report.result.is_ok(), Instant::now()) {
            self.version.policy.reset_instance();
        }
        let Err(failure) = report.result else { return Ok(()) };
        // Redis going away explains a failure before anything else does; a
        // denial the policy returned will be met the same way next time.
        let kind = if report.call.redis_unavailable > 0 {
            FailureKind::RedisUnavailable
        } else if matches!(failure, CallFailure::Returned(wit::Error::Denied(_))) {
            FailureKind::Denied
        } else {
            FailureKind::Failed
        };
        Err(HookFailure { reason: failure.to_string(), kind })
    }
}
