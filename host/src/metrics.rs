//! The daemon's counters and readiness, as the admin server shows them.
//!
//! Every stage records here (a keyspace event queued or dropped in intake, a
//! call's result in dispatch, keys a bulk operation deleted in the
//! sandbox), and only the admin server ([`crate::admin`]) reads. A process
//! runs one daemon, so the registry is process-wide ([`metrics`]) rather
//! than threaded through every constructor; the per-policy handles
//! ([`PolicyMetrics`]) are looked up once, when a policy's queue or worker
//! is made, so the event path pays an atomic add per counter and no lookup.
//!
//! Names follow Prometheus conventions: `cachepol_` prefix, `_total` on
//! counters, the unit in the name (`_seconds`, `_bytes`). A policy that is
//! unloaded and loaded again keeps its counters: they never go backwards
//! while the process lives.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabel {
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyKindLabels {
    pub policy: String,
    /// The result of a call, the budget tripped, the kind of key change,
    /// or the sweep's reason, depending on the family.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

/// Buckets of the event lag histogram: 100 us to about 26 s.
fn lag_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    policies: Mutex<HashMap<String, Arc<PolicyMetrics>>>,
    delivered: Family<PolicyLabel, Counter>,
    coalesced: Family<PolicyLabel, Counter>,
    dropped: Family<PolicyLabel, Counter>,
    calls: Family<PolicyKindLabels, Counter>,
    denials: Family<PolicyLabel, Counter>,
    budget_trips: Family<PolicyKindLabels, Counter>,
    bulk_keys: Family<PolicyKindLabels, Counter>,
    sweeps: Family<PolicyKindLabels, Counter>,
    health: Family<PolicyLabel, Gauge>,
    lag: Family<PolicyLabel, Histogram, fn() -> Histogram>,
    /// Set at each scrape from the queues themselves.
    pub queue_depth: Family<PolicyLabel, Gauge>,
    pub queue_bytes: Family<PolicyLabel, Gauge>,
    pub reloads: Family<OutcomeLabel, Counter>,
    pub deploy_hooks: Family<OutcomeLabel, Counter>,
    pub bulk_operations: Family<OutcomeLabel, Counter>,
    pub reconnects: Counter,
    pub gaps: Counter,
    pub redis_errors: Counter,
    /// Set at each scrape.
    pub resident_memory: Gauge,
    pub index_keys: Gauge,
    pub index_builds: Counter,
    /// Other daemons seen on the same Redis ([`crate::intake::peers`]).
    pub peer_daemons: Gauge,
    pub lease_held: Gauge,
    pub lease_token: Gauge,
    pub lease_takeovers: Counter,
    pub subscriptions: Gauge,
    pub primaries: Gauge,
    pub ready: Readiness,
}

/// The daemon's one registry.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cachepol");
        let m = Metrics {
            registry: Registry::default(),
            policies: Mutex::new(HashMap::new()),
            delivered: Family::default(),
            coalesced: Family::default(),
            dropped: Family::default(),
            calls: Family::default(),
            denials: Family::default(),
            budget_trips: Family::default(),
            bulk_keys: Family::default(),
            sweeps: Family::default(),
            health: Family::default(),
            lag: Family::new_with_constructor(lag_histogram),
            queue_depth: Family::default(),
            queue_bytes: Family::default(),
            reloads: Family::default(),
            deploy_hooks: Family::default(),
            bulk_operations: Family::default(),
            reconnects: Counter::default(),
            gaps: Counter::default(),
            redis_errors: Counter::default(),
            resident_memory: Gauge::default(),
            index_keys: Gauge::default(),
            index_builds: Counter::default(),
            peer_daemons: Gauge::default(),
            lease_held: Gauge::default(),
            lease_token: Gauge::default(),
            lease_takeovers: Counter::default(),
            subscriptions: Gauge::default(),
            primaries: Gauge::default(),
            ready: Readiness::default(),
        };
        let r = &mut registry;
        r.register("events_delivered", "Keyspace events handed to a policy call", m.delivered.clone());
        r.register(
            "events_coalesced",
            "Keyspace events merged into one already queued for the same key",
            m.coalesced.clone(),
        );
        r.register(
            "events_dropped",
            "Keyspace events dropped (queue full, a key no policy can take, the policy held back); a sweep(gap) reconciles them",
            m.dropped.clone(),
        );
        r.register(
            "calls",
            "Policy calls by result (ok, error, budget, fuel, memory, timeout, panic, trap, queued, restart)",
            m.calls.clone(),
        );
        r.register("denials", "Redis operations a policy asked for outside its grants", m.denials.clone());
        r.register("budget_trips", "Calls stopped by a budget, by budget", m.budget_trips.clone());
        r.register(
            "bulk_keys",
            "Keys deleted or expired by bulk operations (delete-matching, expire-matching; not in dry-run), and keys they examined (kind=examined: Redis's work, COUNT per SCAN page or keys taken from the key index)",
            m.bulk_keys.clone(),
        );
        r.register("sweeps", "Sweeps run, by reason", m.sweeps.clone());
        r.register("policy_health", "Circuit breaker state: 0 healthy, 1 degraded, 2 tripped", m.health.clone());
        r.register_with_unit(
            "event_lag",
            "From a keyspace notification's arrival to the end of the call that handled it",
            Unit::Seconds,
            m.lag.clone(),
        );
        r.register("queue_depth", "Items waiting in a policy's queue", m.queue_depth.clone());
        r.register_with_unit(
            "queue",
            "Memory held by a policy's queued keyspace events",
            Unit::Bytes,
            m.queue_bytes.clone(),
        );
        r.register(
            "reloads",
            "Policy file changes applied, by outcome (loaded, replaced, rejected, unloaded)",
            m.reloads.clone(),
        );
        r.register(
            "deploy_hooks",
            "Deploy hooks by outcome (acked, retried, dead_lettered, duplicate)",
            m.deploy_hooks.clone(),
        );
        r.register(
            "bulk_operations",
            "Bulk operations by how their keys were found (index, scan)",
            m.bulk_operations.clone(),
        );
        r.register(
            "subscription_reconnects",
            "Keyspace subscriptions re-established after a loss",
            m.reconnects.clone(),
        );
        r.register(
            "gaps",
            "Subscription gaps, when notifications were lost for every policy: a lost subscription, notification flags found missing",
            m.gaps.clone(),
        );
        r.register(
            "redis_errors",
            "Redis commands that failed (connection lost, refused by the server): policies' calls, the deploy reader, subscription attempts, the control poll (once per outage), the lease",
            m.redis_errors.clone(),
        );
        r.register_with_unit(
            "resident_memory",
            "Resident memory of the daemon process",
            Unit::Bytes,
            m.resident_memory.clone(),
        );
        r.register("index_keys", "Key names the key index holds", m.index_keys.clone());
        r.register(
            "index_builds",
            "Key index builds, each one SCAN pass: at start, after a real gap (a lost subscription, flags found off), for a newly indexed pattern",
            m.index_builds.clone(),
        );
        r.register(
            "peer_daemons",
            "Other cachepol daemons seen on the same Redis (with [replicas] enabled = false each handles every event)",
            m.peer_daemons.clone(),
        );
        r.register(
            "lease_held",
            "1 while this daemon holds the keyspace-event lease ([replicas])",
            m.lease_held.clone(),
        );
        r.register("lease_token", "The fencing token of the lease this daemon holds (0: none)", m.lease_token.clone());
        r.register("lease_takeovers", "Times this daemon took the keyspace-event lease", m.lease_takeovers.clone());
        r.register(
            "subscriptions",
            "Keyspace subscriptions up (one per primary on a Redis Cluster)",
            m.subscriptions.clone(),
        );
        r.register(
            "cluster_primaries",
            "Primaries serving slots (Redis Cluster; 0 on one server)",
            m.primaries.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Count one outcome in a daemon-wide family (`reloads`,
    /// `deploy_hooks`, `bulk_operations`).
    pub fn count(family: &Family<OutcomeLabel, Counter>, outcome: &str) {
        family.get_or_create(&OutcomeLabel { outcome: outcome.to_owned() }).inc();
    }

    /// The handles of policy `name`'s metrics (the same ones each time).
    pub fn policy(&self, name: &str) -> Arc<PolicyMetrics> {
        let mut policies = self.policies.lock().unwrap_or_else(|e| e.into_inner());
        policies
            .entry(name.to_owned())
            .or_insert_with(|| {
                let label = PolicyLabel { policy: name.to_owned() };
                Arc::new(PolicyMetrics {
                    name: name.to_owned(),
                    delivered: self.delivered.get_or_create_owned(&label),
                    coalesced: self.coalesced.get_or_create_owned(&label),
                    dropped: self.dropped.get_or_create_owned(&label),
                    denials: self.denials.get_or_create_owned(&label),
                    ok: self
                        .calls
                        .get_or_create_owned(&PolicyKindLabels { policy: name.to_owned(), kind: "ok".into() }),
                    health: self.health.get_or_create_owned(&label),
                    lag: self.lag.get_or_create_owned(&label),
                    last_event_ms: AtomicU64::new(0),
                    last_sweep: Mutex::new(None),
                    walking: Mutex::new(None),
                })
            })
            .clone()
    }

    /// Policy `name` was unloaded: its gauges go (a queue depth or health
    /// of a policy that is not there would mislead), its counters stay
    /// (they never go backwards while the process lives).
    pub fn forget(&self, name: &str) {
        let label = PolicyLabel { policy: name.to_owned() };
        self.health.remove(&label);
        self.queue_depth.remove(&label);
        self.queue_bytes.remove(&label);
        self.policies.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
    }

    /// The text `/metrics` serves (OpenMetrics, which Prometheus reads).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// One policy's metrics, and what `/status` says it did last.
pub struct PolicyMetrics {
    name: String,
    pub delivered: Counter,
    pub coalesced: Counter,
    pub dropped: Counter,
    pub denials: Counter,
    /// `calls{kind="ok"}`, resolved once: the common case on the event path.
    ok: Counter,
    /// The breaker's state: 0 healthy, 1 degraded, 2 tripped.
    health: Gauge,
    lag: Histogram,
    /// When a keyspace event was last handled (Unix ms; 0: never). An
    /// atomic, not behind the sweep's lock: it is written on every call.
    last_event_ms: AtomicU64,
    last_sweep: Mutex<Option<SweepRecord>>,
    walking: Mutex<Option<WalkProgress>>,
}

/// What a policy did last, as `/status` shows it.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Activity {
    /// When a keyspace event was last handled (Unix milliseconds).
    pub last_event_ms: Option<u64>,
    pub last_sweep: Option<SweepRecord>,
    /// A sliced sweep or hook under way, if any.
    #[serde(default)]
    pub walking: Option<WalkProgress>,
}

/// How far a sweep or hook run in slices has got
/// ([`crate::store::walks`]).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WalkProgress {
    /// `sweep(<reason>)` or `hook <id>`.
    pub what: String,
    pub started_ms: u64,
    pub slices: u32,
    /// Keys examined and changed so far.
    pub examined: u64,
    pub changed: u64,
    /// Keys its walks cover: the keyspace when it started, once per walk
    /// (each may walk all of it), about.
    pub keyspace: u64,
    /// Keys examined per second so far.
    pub rate: u64,
    /// Seconds left at that rate (`None` when the keyspace size is unknown).
    pub eta_secs: Option<u64>,
}

impl WalkProgress {
    /// Progress of `what` from its totals, `now_ms` being the time now.
    pub fn new(what: String, started_ms: u64, slices: u32, (examined, changed): (u64, u64), keyspace: u64) -> Self {
        let secs = (unix_ms(SystemTime::now()).saturating_sub(started_ms) as f64 / 1000.0).max(0.001);
        let rate = (examined as f64 / secs) as u64;
        let eta_secs = (keyspace > 0 && rate > 0).then(|| keyspace.saturating_sub(examined) / rate);
        WalkProgress { what, started_ms, slices, examined, changed, keyspace, rate, eta_secs }
    }
}

impl std::fmt::Display for WalkProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} keys examined, {} changed, {}/s", self.what, self.examined, self.changed, self.rate)?;
        if self.keyspace > 0 {
            write!(f, " of about {}", self.keyspace)?;
        }
        match self.eta_secs {
            Some(eta) => write!(f, ", about {eta} s left"),
            None => Ok(()),
        }
    }
}

/// The breaker's states, by the value of `cachepol_policy_health`.
const HEALTH: [&str; 3] = ["healthy", "degraded", "tripped"];

/// The last sweep a policy ran.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SweepRecord {
    pub reason: String,
    pub at_ms: u64,
    pub ok: bool,
    /// Why it failed.
    pub error: Option<String>,
    pub deleted: u64,
    pub expired: u64,
    /// Keys its bulk operations examined, over every slice.
    #[serde(default)]
    pub examined: u64,
    /// Calls it took (more than one when its walks did not fit one).
    #[serde(default)]
    pub slices: u32,
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl PolicyMetrics {
    /// A call finished: its result (`ok`, or the kind of failure), the
    /// budget it ran out of, its denials.
    pub fn call(&self, result: &str, budget: Option<&str>, denials: u32) {
        if result == "ok" && budget.is_none() && denials == 0 {
            self.ok.inc();
            return;
        }
        let m = metrics();
        let labels = |kind: &str| PolicyKindLabels { policy: self.name.clone(), kind: kind.to_owned() };
        m.calls.get_or_create(&labels(result)).inc();
        if let Some(budget) = budget {
            m.budget_trips.get_or_create(&labels(budget)).inc();
        }
        if denials > 0 {
            self.denials.inc_by(u64::from(denials));
        }
    }

    /// Keyspace events handled, each waited `lag` since it arrived.
    pub fn handled(&self, lags: impl Iterator<Item = Duration>) {
        for lag in lags {
            self.lag.observe(lag.as_secs_f64());
        }
        self.last_event_ms.store(unix_ms(SystemTime::now()), Ordering::Relaxed);
    }

    /// A sliced sweep or hook got this far (`None`: none under way).
    pub fn walking(&self, progress: Option<WalkProgress>) {
        *self.walking.lock().unwrap_or_else(|e| e.into_inner()) = progress;
    }

    /// A bulk operation changed `n` keys (`kind`: deleted or expired), or
    /// examined them (`examined`).
    pub fn bulk(&self, kind: &str, n: u64) {
        if n > 0 {
            let labels = PolicyKindLabels { policy: self.name.clone(), kind: kind.to_owned() };
            metrics().bulk_keys.get_or_create(&labels).inc_by(n);
        }
    }

    /// A sweep finished.
    pub fn swept(&self, record: SweepRecord) {
        let labels = PolicyKindLabels { policy: self.name.clone(), kind: record.reason.clone() };
        metrics().sweeps.get_or_create(&labels).inc();
        *self.last_sweep() = Some(SweepRecord { at_ms: unix_ms(SystemTime::now()), ..record });
    }

    /// The breaker's state: `healthy`, `degraded` or `tripped`.
    pub fn set_health(&self, health: &str) {
        let level = HEALTH.iter().position(|h| *h == health).unwrap_or(HEALTH.len() - 1);
        self.health.set(level as i64);
    }

    /// The breaker's state, as [`PolicyMetrics::set_health`] was told.
    pub fn health(&self) -> &'static str {
        HEALTH.get(self.health.get() as usize).copied().unwrap_or("tripped")
    }

    /// What the policy did last.
    pub fn snapshot(&self) -> Activity {
        let last_event_ms = self.last_event_ms.load(Ordering::Relaxed);
        Activity {
            last_event_ms: (last_event_ms > 0).then_some(last_event_ms),
            last_sweep: self.last_sweep().clone(),
            walking: self.walking.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }

    /// Calls so far, by result.
    pub fn calls(&self) -> Vec<(String, u64)> {
        let mut calls = Vec::new();
        for kind in CALL_RESULTS {
            let labels = PolicyKindLabels { policy: self.name.clone(), kind: (*kind).to_owned() };
            let n = metrics().calls.get_or_create(&labels).get();
            if n > 0 {
                calls.push(((*kind).to_owned(), n));
            }
        }
        calls
    }

    fn last_sweep(&self) -> std::sync::MutexGuard<'_, Option<SweepRecord>> {
        self.last_sweep.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Every value of the `kind` label of `cachepol_calls_total`.
pub const CALL_RESULTS: &[&str] =
    &["ok", "error", "denied", "budget", "fuel", "memory", "timeout", "panic", "trap", "queued", "restart"];

/// What `/readyz` checks: each part sets its own flag.
#[derive(Default)]
pub struct Readiness {
    pub subscribed: AtomicBool,
    /// `notify-keyspace-events` has every flag the policies need.
    pub notifications: AtomicBool,
    /// The keyspace-event lease is answered for (held, or known held by
    /// another daemon); always with replicas off.
    pub lease: AtomicBool,
    pub deploy_reader: AtomicBool,
    pub policies_loaded: AtomicBool,
    pub shutting_down: AtomicBool,
}

impl Readiness {
    /// What keeps the daemon from being ready, if anything.
    pub fn missing(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if self.shutting_down.load(Ordering::Relaxed) {
            missing.push("shutting down");
        }
        if !self.policies_loaded.load(Ordering::Relaxed) {
            missing.push("policies not loaded yet");
        }
        if !self.subscribed.load(Ordering::Relaxed) {
            missing.push("not subscribed to keyspace notifications (starting, or Redis unreachable)");
        }
        if self.subscribed.load(Ordering::Relaxed) && !self.notifications.load(Ordering::Relaxed) {
            missing.push("notify-keyspace-events lacks flags the policies need (see the log)");
        }
        if !self.lease.load(Ordering::Relaxed) {
            missing.push("the keyspace-event lease can be neither taken nor seen held (see the log)");
        }
        if !self.deploy_reader.load(Ordering::Relaxed) {
            missing.push("deploy reader not running (starting, or Redis unreachable)");
        }
        missing
    }

    pub fn set(flag: &AtomicBool, on: bool) {
        flag.store(on, Ordering::Relaxed);
    }
}

/// The process's resident memory, from `/proc/self/status` (in kB there,
/// whatever the page size).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rss = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = rss.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let p = metrics().policy("unit-test-policy");
        p.delivered.inc_by(3);
        p.call("ok", None, 0);
        p.call("budget", Some("host_calls"), 2);
        p.bulk("deleted", 5);
        p.handled([Duration::from_millis(3)].into_iter());
        let text = metrics().encode();
        for line in [
            "cachepol_events_delivered_total{policy=\"unit-test-policy\"} 3",
            "cachepol_calls_total{policy=\"unit-test-policy\",kind=\"ok\"} 1",
            "cachepol_budget_trips_total{policy=\"unit-test-policy\",kind=\"host_calls\"} 1",
            "cachepol_denials_total{policy=\"unit-test-policy\"} 2",
            "cachepol_bulk_keys_total{policy=\"unit-test-policy\",kind=\"deleted\"} 5",
            "cachepol_event_lag_seconds_count{policy=\"unit-test-policy\"} 1",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        assert!(Arc::ptr_eq(&p, &metrics().policy("unit-test-policy")), "a policy keeps its handles");
        assert_eq!(p.calls(), vec![("ok".to_owned(), 1), ("budget".to_owned(), 1)]);
    }
}
