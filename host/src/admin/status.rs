//! `GET /status`: what the daemon is doing, as JSON, and the types
//! `cachepol status` reads it back into.
//!
//! Redis is asked at most once per [`REDIS_EVERY`] (`INFO` and the
//! notification flags, one round trip on the policies' connection, bounded
//! by [`REDIS_WAIT`]): polling `/status` cannot load Redis. When it does not
//! answer, the rest of the status is still given, with the Redis part's
//! error.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::{Admin, Wired, error};
use crate::dispatch::routes::Route;
use crate::intake::cluster::NodeState;
use crate::metrics::{Activity, metrics};
use crate::sandbox::grants::ops_to_string;

/// The longest `/status` waits for Redis.
pub const REDIS_WAIT: Duration = Duration::from_secs(2);
/// How long Redis's answer is reused.
pub const REDIS_EVERY: Duration = Duration::from_secs(1);

/// The whole status.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub uptime_secs: u64,
    pub ready: bool,
    /// What keeps it from being ready.
    pub not_ready: Vec<String>,
    pub redis: RedisStatus,
    /// The keyspace-event lease, when replicas share the work (the
    /// default; absent with `[replicas] enabled = false`).
    pub lease: Option<LeaseStatus>,
    /// The other daemons seen on this Redis ([`crate::intake::peers`]), by
    /// id. With no lease, each of them handles every keyspace event too.
    #[serde(default)]
    pub peers: Vec<String>,
    /// The keyspace subscriptions: one, or one per primary of a cluster.
    #[serde(default)]
    pub subscriptions: Vec<NodeState>,
    pub index: Vec<IndexPattern>,
    pub policies: Vec<PolicyStatus>,
}

/// What Redis says about itself.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RedisStatus {
    pub version: Option<String>,
    pub keyspace_hits: Option<u64>,
    pub keyspace_misses: Option<u64>,
    /// hits / (hits + misses), since Redis started or `CONFIG RESETSTAT`.
    pub hit_rate: Option<f64>,
    pub used_memory: Option<u64>,
    /// What Redis evicts when full (`noeviction`, `allkeys-lru`, ...): the
    /// daemon's own keys may be among them (see [`crate::store::eviction`]).
    #[serde(default)]
    pub maxmemory_policy: Option<String>,
    pub notify_keyspace_events: Option<String>,
    /// Why the rest is missing.
    pub error: Option<String>,
}

/// This daemon's part in a set of replicas.
#[derive(Debug, Serialize, Deserialize)]
pub struct LeaseStatus {
    pub key: String,
    /// This daemon's id (its deploy consumer name).
    pub id: String,
    /// Whether it handles keyspace events, sweeps and deploy hooks now.
    pub held: bool,
    /// The fencing token of its holding (0: standing by).
    pub token: u64,
    /// On a Redis Cluster, the shards' leases (by first slot): which this
    /// daemon holds.
    #[serde(default)]
    pub shards: Vec<ShardLease>,
}

/// One cluster shard's lease, as this daemon sees it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ShardLease {
    /// The shard's first slot.
    pub slot: u16,
    pub held: bool,
    pub token: u64,
}

/// One pattern of the key index.
#[derive(Debug, Serialize, Deserialize)]
pub struct IndexPattern {
    pub pattern: String,
    pub status: String,
    pub keys: usize,
}

/// One loaded policy.
#[derive(Debug, Serialize, Deserialize)]
pub struct PolicyStatus {
    pub name: String,
    pub version: String,
    pub file: String,
    pub sha256: String,
    pub mode: String,
    /// `pattern(ops)`, after the operator's narrowing.
    pub grants: Vec<String>,
    pub subscriptions: Subscriptions,
    /// `healthy`, `degraded` or `tripped` (the circuit breaker).
    pub health: String,
    /// Held back by `cachepol disable`.
    pub disabled: bool,
    pub queue: QueueStatus,
    #[serde(flatten)]
    pub activity: Activity,
    pub counters: Counters,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Subscriptions {
    /// `op1,op2 pattern` (or `* pattern` for every op).
    pub keys: Vec<String>,
    pub deploys: Vec<String>,
    pub sweep_every_secs: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct QueueStatus {
    pub depth: usize,
    pub bytes: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Counters {
    pub delivered: u64,
    pub coalesced: u64,
    pub dropped: u64,
    pub denials: u64,
    /// Calls by result (`ok`, `error`, `trap`, ...).
    pub calls: BTreeMap<String, u64>,
}

pub(super) async fn status(State(admin): State<Arc<Admin>>, headers: axum::http::HeaderMap) -> Response {
    if let Some(refused) = admin.refuse_without_token(&headers) {
        return refused;
    }
    let Some(wired) = admin.wired() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "starting: not connected to Redis yet");
    };
    let not_ready: Vec<String> = metrics().ready.missing().into_iter().map(str::to_owned).collect();
    let status = Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_secs: admin.started.elapsed().as_secs(),
        ready: not_ready.is_empty(),
        not_ready,
        redis: cached_redis_status(&admin, wired).await,
        lease: wired.switches.lease.enabled().then(|| LeaseStatus {
            key: wired.switches.lease.key.clone(),
            id: wired.switches.lease.id.clone(),
            held: wired.switches.lease.holds(),
            token: wired.switches.lease.token(),
            shards: wired.switches.shards.as_ref().map_or_else(Vec::new, |shards| {
                shards
                    .all()
                    .iter()
                    .map(|(slot, l)| ShardLease { slot: *slot, held: l.holds(), token: l.token() })
                    .collect()
            }),
        }),
        peers: wired.peers.snapshot(),
        subscriptions: wired.nodes.snapshot(),
        index: wired
            .index
            .stats()
            .into_iter()
            .map(|p| IndexPattern { pattern: p.pattern, status: p.status.to_owned(), keys: p.keys })
            .collect(),
        policies: wired.routes.load().routes().iter().map(|r| policy_status(wired, r)).collect(),
    };
    Json(status).into_response()
}

fn policy_status(wired: &Wired, route: &Route) -> PolicyStatus {
    let m = &route.manifest;
    let counters = metrics().policy(&route.name);
    PolicyStatus {
        name: route.name.to_string(),
        version: m.version.to_string(),
        file: route.origin.file.display().to_string(),
        sha256: route.origin.hash.clone(),
        mode: route.origin.mode.to_string(),
        grants: m.grants.rules().iter().map(|r| format!("{}({})", r.pattern, ops_to_string(r.ops))).collect(),
        subscriptions: Subscriptions {
            keys: m
                .key_subscriptions
                .iter()
                .flat_map(|s| {
                    let ops = if s.ops.is_empty() { "*".to_owned() } else { s.ops.join(",") };
                    s.patterns.iter().map(move |p| format!("{ops} {p}"))
                })
                .collect(),
            deploys: m.deploys.clone(),
            sweep_every_secs: m.sweep_interval.map(|d| d.as_secs()),
        },
        health: counters.health().to_owned(),
        disabled: wired.switches.is_disabled(&route.name),
        queue: QueueStatus { depth: route.queue.len(), bytes: route.queue.bytes() },
        activity: counters.snapshot(),
        counters: Counters {
            delivered: counters.delivered.get(),
            coalesced: counters.coalesced.get(),
            dropped: counters.dropped.get(),
            denials: counters.denials.get(),
            calls: counters.calls().into_iter().collect(),
        },
    }
}

async fn cached_redis_status(admin: &Admin, wired: &Wired) -> RedisStatus {
    let cache = || admin.redis_status.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((at, status)) = cache().as_ref()
        && at.elapsed() < REDIS_EVERY
    {
        return status.clone();
    }
    let status = redis_status(wired).await;
    *cache() = Some((std::time::Instant::now(), status.clone()));
    status
}

async fn redis_status(wired: &Wired) -> RedisStatus {
    let mut conn = wired.redis.clone();
    let mut pipe = redis::pipe();
    pipe.cmd("INFO").arg("server").arg("stats").arg("memory");
    pipe.cmd("CONFIG").arg("GET").arg("notify-keyspace-events");
    let asked = tokio::time::timeout(REDIS_WAIT, pipe.query_async::<(String, BTreeMap<String, String>)>(&mut conn));
    let (info, flags) = match asked.await {
        Ok(Ok(replies)) => replies,
        Ok(Err(e)) => return RedisStatus { error: Some(e.to_string()), ..RedisStatus::default() },
        Err(_) => {
            let why = format!("Redis did not answer within {} s", REDIS_WAIT.as_secs());
            return RedisStatus { error: Some(why), ..RedisStatus::default() };
        }
    };
    let fields: BTreeMap<&str, &str> = info.lines().filter_map(|l| l.trim_end().split_once(':')).collect();
    let number = |name: &str| fields.get(name).and_then(|v| v.parse::<u64>().ok());
    let (hits, misses) = (number("keyspace_hits"), number("keyspace_misses"));
    RedisStatus {
        version: fields.get("redis_version").map(|v| (*v).to_owned()),
        keyspace_hits: hits,
        keyspace_misses: misses,
        hit_rate: match (hits, misses) {
            (Some(h), Some(m)) if h + m > 0 => Some(h as f64 / (h + m) as f64),
            _ => None,
        },
        used_memory: number("used_memory"),
        maxmemory_policy: fields.get("maxmemory_policy").map(|v| (*v).to_owned()),
        notify_keyspace_events: flags.get("notify-keyspace-events").cloned(),
        error: None,
    }
}
