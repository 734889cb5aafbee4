//! One task per policy: takes its queue in order, calls the policy, reports.
//!
//! Policies run concurrently with each other (one worker each) and handle
//! their own events strictly one at a time, in arrival order.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tracing::Instrument;

use crate::audit;
use crate::config::Mode;
use crate::queue::{Item, PolicyQueue};
use crate::runtime::LoadedPolicy;
use crate::wit::{self, KeyEvent, SweepEvent};

/// How often a failed sweep is tried again before waiting for the next one.
const SWEEP_RETRIES: u32 = 3;

/// A loaded policy and everything its worker needs.
pub struct Worker {
    pub policy: LoadedPolicy,
    pub queue: Arc<PolicyQueue>,
    /// Tells the echo layer the hop count of the event being handled.
    pub hops: Arc<AtomicU8>,
    pub mode: Mode,
    /// Consecutive failed sweeps.
    pub sweep_failures: u32,
}

impl Worker {
    /// Run until the queue is closed and empty; returns the policy.
    pub async fn run(mut self) -> LoadedPolicy {
        let name = self.policy.name().to_owned();
        let mut seq: u64 = 0;
        while let Some(item) = self.queue.pop().await {
            seq += 1;
            let span = tracing::debug_span!("event", policy = %name, seq);
            self.handle(item, seq).instrument(span).await;
        }
        self.policy
    }

    async fn handle(&mut self, item: Item, seq: u64) {
        match item {
            Item::Key(k) => {
                self.hops.store(k.hops, Ordering::Relaxed);
                let id = format!("key-{seq}");
                let event = wit::Event::Key(KeyEvent { db: k.db, op: k.op, key: k.key });
                // A failure is logged and counted by `handle`; nobody waits on it.
                let _ = self.deliver(&id, &event).await;
            }
            Item::Sweep(reason) => {
                self.hops.store(0, Ordering::Relaxed);
                let id = format!("sweep-{seq}");
                match self.deliver(&id, &wit::Event::Sweep(SweepEvent { reason })).await {
                    Ok(()) => self.sweep_failures = 0,
                    // A sweep is how missed events get reconciled: losing one
                    // to a passing failure (Redis restarting) would leave the
                    // cache wrong until the next, so it is tried again later.
                    Err(_) if self.sweep_failures < SWEEP_RETRIES => {
                        self.sweep_failures += 1;
                        let delay = Duration::from_millis(500 << self.sweep_failures);
                        tracing::info!(policy = %self.policy.name(), ?delay, "sweep failed; trying again later");
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
                self.hops.store(0, Ordering::Relaxed);
                let id = hook.id.clone();
                let ok = self.deliver(&id, &wit::Event::Deploy(hook)).await;
                let _ = done.send(ok);
            }
        }
    }

    async fn deliver(&mut self, id: &str, event: &wit::Event) -> Result<(), String> {
        let report = self.policy.handle(id, event).await;
        audit::record(self.policy.name(), id, self.mode, &report);
        report.result.map(|_| ()).map_err(|f| f.to_string())
    }
}
