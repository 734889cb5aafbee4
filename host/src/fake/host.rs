//! [`FakeHost`]: one policy, loaded in the real runtime, over a [`FakeRedis`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use crate::sandbox::runtime::{CallFailure, CallReport, Compiled, LoadError, LoadOptions, LoadedPolicy, Runtime};
use crate::store::memory::{AppWrite, FakeRedis, KeyspaceEvent};
use crate::wit::{self, Denial, DeployEvent, KeyEvent, SweepEvent, SweepReason};

/// Events delivered in response to one step at most; a policy whose writes
/// keep waking it would otherwise never let the step finish.
const MAX_DELIVERIES_PER_STEP: usize = 10_000;

/// One event delivered to the policy, and what came of it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub event_id: String,
    pub event: wit::Event,
    pub report: CallReport,
}

/// A policy under test, over an in-memory keyspace.
///
/// Application-side operations (`set`, `del`, `expire`, `advance`) change
/// the keyspace the way the application and Redis would, and deliver the
/// resulting keyspace events to the policy when its manifest subscribes to
/// them. Events caused by the policy's own writes are not delivered back to
/// it, as in the daemon.
pub struct FakeHost {
    redis: FakeRedis,
    policy: LoadedPolicy,
    deliveries: Vec<Delivery>,
    next_id: u64,
    /// Whether application writes and expiries reach the policy as events.
    listening: bool,
}

impl FakeHost {
    /// Load a compiled policy with its JSON config.
    pub async fn load(runtime: &Runtime, compiled: &Compiled, config: &str) -> Result<FakeHost, LoadError> {
        let options = LoadOptions { config: config.to_owned(), ..LoadOptions::default() };
        Self::load_on(runtime, compiled, &options, FakeRedis::new()).await
    }

    /// Load over an existing keyspace (for example one with keys already set).
    pub async fn load_on(
        runtime: &Runtime,
        compiled: &Compiled,
        options: &LoadOptions,
        redis: FakeRedis,
    ) -> Result<FakeHost, LoadError> {
        // The policy has no grants while loading, so nothing is written
        // under this provisional origin.
        let backend = Arc::new(redis.client(&options.label));
        let policy = runtime.load(compiled, backend, options).await?;
        let mut host = FakeHost { redis, policy, deliveries: Vec::new(), next_id: 1, listening: true };
        // Rebind the backend so the policy's writes carry its real name.
        host.policy.rebind_backend(Arc::new(host.redis.client(host.policy.name())));
        Ok(host)
    }

    pub fn redis(&self) -> &FakeRedis {
        &self.redis
    }

    pub fn policy(&self) -> &LoadedPolicy {
        &self.policy
    }

    /// Every event delivered so far, in order.
    pub fn deliveries(&self) -> &[Delivery] {
        &self.deliveries
    }

    /// Every denial recorded so far.
    pub fn denials(&self) -> impl Iterator<Item = &Denial> {
        self.deliveries.iter().flat_map(|d| d.report.call.denials.iter())
    }

    /// Every failed delivery so far.
    pub fn failures(&self) -> impl Iterator<Item = (&Delivery, &CallFailure)> {
        self.deliveries.iter().filter_map(|d| d.report.result.as_ref().err().map(|f| (d, f)))
    }

    /// Stop or resume delivering keyspace events: while not listening,
    /// application writes and expiries change the keyspace and their events
    /// are dropped, as when the daemon is stopped or its subscription is
    /// cut. Deploy hooks (a durable stream) and sweeps are still delivered;
    /// a sweep is how the policy finds out what it missed.
    pub fn set_listening(&mut self, listening: bool) {
        self.listening = listening;
    }

    /// The application writes `key`.
    pub async fn set(&mut self, key: &str, value: &[u8], ttl: Option<Duration>) {
        self.redis.app_set(key, value, ttl.map(millis));
        self.pump().await;
    }

    /// The application deletes `keys`.
    pub async fn del(&mut self, keys: &[&str]) {
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        self.redis.app_del(&keys);
        self.pump().await;
    }

    /// The application writes a list, hash, set or sorted set; fails (and
    /// delivers nothing) with Redis's `WRONGTYPE` on a key of another type.
    pub async fn app_write(&mut self, key: &str, write: &AppWrite) -> Result<(), String> {
        self.redis.app_write(key, write)?;
        self.pump().await;
        Ok(())
    }

    /// The application sets a TTL on `key`.
    pub async fn expire(&mut self, key: &str, ttl: Duration) {
        self.redis.app_expire(key, millis(ttl));
        self.pump().await;
    }

    /// The application removes `key`'s TTL.
    pub async fn persist(&mut self, key: &str) {
        self.redis.app_persist(key);
        self.pump().await;
    }

    /// Time passes; keys that expire produce `expired` events.
    pub async fn advance(&mut self, by: Duration) {
        self.redis.advance(millis(by));
        self.pump().await;
    }

    /// A deploy hook; delivered if the policy subscribes to `service`.
    pub async fn deploy(&mut self, service: &str, files: &[&str], tags: &[(&str, &str)]) {
        if !self.policy.manifest().wants_deploy(service) {
            return;
        }
        let id = self.next_event_id("deploy");
        let event = wit::Event::Deploy(DeployEvent {
            id: id.clone(),
            service: service.to_owned(),
            files: files.iter().map(|f| f.to_string()).collect(),
            tags: tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        });
        self.deliver(id, event).await;
        self.pump().await;
    }

    /// A sweep (every policy gets these).
    pub async fn sweep(&mut self, reason: SweepReason) {
        let id = self.next_event_id("sweep");
        self.deliver(id, wit::Event::Sweep(SweepEvent { reason })).await;
        self.pump().await;
    }

    /// A keyspace event without the write behind it (as if Redis had
    /// notified it); delivered if the policy subscribes to it.
    pub async fn key_event(&mut self, op: &str, key: &str) {
        self.redis.take_events();
        self.dispatch(VecDeque::from([KeyspaceEvent { db: 0, op: op.to_owned(), key: key.to_owned(), origin: None }]))
            .await;
    }

    fn next_event_id(&mut self, kind: &str) -> String {
        let id = format!("{kind}-{}", self.next_id);
        self.next_id += 1;
        id
    }

    async fn deliver(&mut self, event_id: String, event: wit::Event) {
        let report = self.policy.handle(&event_id, &event).await;
        self.deliveries.push(Delivery { event_id, event, report });
    }

    /// Deliver pending keyspace events, and those they cause, in order.
    async fn pump(&mut self) {
        let pending = self.redis.take_events();
        if self.listening {
            self.dispatch(pending.into()).await;
        }
    }

    async fn dispatch(&mut self, mut queue: VecDeque<KeyspaceEvent>) {
        let own = self.policy.name().to_owned();
        let mut delivered = 0;
        while let Some(ev) = queue.pop_front() {
            if ev.origin.as_deref() == Some(own.as_str())
                || !self.policy.manifest().wants_key_event(&ev.op, ev.key.as_bytes())
            {
                continue;
            }
            if delivered == MAX_DELIVERIES_PER_STEP {
                tracing::warn!(policy = %own, "stopped delivering after {MAX_DELIVERIES_PER_STEP} events in one step");
                return;
            }
            delivered += 1;
            let id = self.next_event_id("key");
            let event = wit::Event::Key(KeyEvent { db: ev.db, op: ev.op, key: ev.key });
            self.deliver(id, event).await;
            queue.extend(self.redis.take_events());
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
