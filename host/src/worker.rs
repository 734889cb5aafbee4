//! One task per policy: takes its queue in order, calls the policy, reports.
//!
//! Policies run concurrently with each other (one worker each) and handle
//! their own events strictly one at a time, in arrival order. A new version
//! of the policy arrives on the control channel and takes over between two
//! events: the old version finishes the event in hand, every later event
//! goes to the new one, and the old instance is dropped (its memory returns
//! to the pool).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::Instrument;

use crate::audit;
use crate::config::Mode;
use crate::queue::{Item, PolicyQueue};
use crate::runtime::LoadedPolicy;
use crate::wit::{self, KeyEvent, SweepEvent};

/// How often a failed sweep is tried again before waiting for the next one.
const SWEEP_RETRIES: u32 = 3;

/// A policy version and what its write path needs.
pub struct Version {
    pub policy: LoadedPolicy,
    pub mode: Mode,
    /// Tells the echo layer the hop count of the event being handled.
    pub hops: Arc<AtomicU8>,
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
    /// Consecutive failed sweeps.
    sweep_failures: u32,
}

impl Worker {
    /// A worker and the sender that controls it.
    pub fn new(version: Version, queue: Arc<PolicyQueue>) -> (Worker, mpsc::UnboundedSender<Control>) {
        let (tx, control) = mpsc::unbounded_channel();
        (Worker { version, queue, control, sweep_failures: 0 }, tx)
    }

    /// Run until the queue is closed and empty.
    pub async fn run(mut self) {
        let mut seq: u64 = 0;
        loop {
            let item = tokio::select! {
                biased;
                Some(Control::Swap(next)) = self.control.recv() => {
                    self.version = next;
                    continue;
                }
                item = self.queue.pop() => item,
            };
            let Some(item) = item else { return };
            seq += 1;
            let span = tracing::debug_span!("event", policy = %self.version.policy.name(), seq);
            self.handle(item, seq).instrument(span).await;
        }
    }

    async fn handle(&mut self, item: Item, seq: u64) {
        match item {
            Item::Key(k) => {
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
                        tracing::info!(policy = %self.version.policy.name(), ?delay, "sweep failed; trying again later");
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

    async fn deliver(&mut self, id: &str, event: &wit::Event) -> Result<(), String> {
        let report = self.version.policy.handle(id, event).await;
        audit::record(self.version.policy.name(), id, self.version.mode, &report);
        report.result.map(|_| ()).map_err(|f| f.to_string())
    }
}
