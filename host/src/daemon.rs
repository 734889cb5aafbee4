//! `cachepol run`: the daemon, wired together.
//!
//! Start-up, in order: connect to Redis (retrying until it answers), load
//! every `*.wasm` in the policies directory (a file that fails is logged and
//! skipped; the others run), check `notify-keyspace-events`, start one worker
//! per policy, then the keyspace subscriber (whose first subscription sends
//! every policy `sweep(start)`), the deploy-hook consumer, and the periodic
//! sweeps.
//!
//! Shutdown, on SIGINT/SIGTERM: stop intake (subscriber and deploy reader;
//! a hook being handled is finished and acknowledged), close the queues so
//! each worker finishes the event in hand, wait for them up to the grace
//! period, and return. Unhandled keyspace events are reconciled by the
//! `sweep(start)` of the next run; unacknowledged hooks are re-read by it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::backend::{Backend, Layered};
use crate::config::{Config, Mode};
use crate::deploy::DeployConsumer;
use crate::dryrun::DryRunLayer;
use crate::echo::{EchoLayer, EchoLedger};
use crate::events::{Backoff, Subscriber};
use crate::manifest::Manifest;
use crate::notify::{self, NotifyError};
use crate::queue::{Item, PolicyQueue};
use crate::redis_backend::RedisBackend;
use crate::routes::{Route, Routes};
use crate::runtime::{LoadError, LoadOptions, LoadedPolicy, Runtime, RuntimeConfig, RuntimeError};
use crate::wit::SweepReason;
use crate::worker::Worker;

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("invalid Redis URL {url:?}: {error}")]
    RedisUrl { url: String, error: String },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Notifications(#[from] NotifyError),
    #[error("cannot read the policies directory {}: {error}", path.display())]
    PoliciesDir { path: PathBuf, error: std::io::Error },
    /// The operator's config asks for more than a policy does: refusing to
    /// start beats silently running with other rights than configured.
    #[error("{}: {error}", path.display())]
    Widening { path: PathBuf, error: LoadError },
}

/// A policy loaded from a file, ready to get a worker.
struct Loaded {
    path: PathBuf,
    policy: LoadedPolicy,
    mode: Mode,
    hops: Arc<std::sync::atomic::AtomicU8>,
}

/// Run the daemon until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let client = redis::Client::open(config.redis_url.as_str())
        .map_err(|e| DaemonError::RedisUrl { url: config.redis_url.clone(), error: e.to_string() })?;
    let db = u32::try_from(client.get_connection_info().redis_settings().db()).unwrap_or(0);
    let Some(redis) = connect(&client, &shutdown).await else { return Ok(()) };
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let ledger = Arc::new(EchoLedger::new());

    let loaded = load_policies(&runtime, &config, redis.clone(), &ledger).await?;
    let manifests: Vec<&Manifest> = loaded.iter().map(|l| l.policy.manifest()).collect();
    let needed = notify::required(&manifests);
    let added = notify::ensure(&mut redis.connection(), &needed, config.configure_notifications).await?;
    if !added.is_empty() {
        info!(added = %notify::text(&added), "enabled keyspace notification flags");
    }

    let mut workers = JoinSet::new();
    let mut routes = Vec::new();
    for l in loaded {
        let queue = Arc::new(PolicyQueue::new(config.queue_capacity));
        let manifest = Arc::new(l.policy.manifest().clone());
        let name: Arc<str> = Arc::from(l.policy.name());
        info!(
            policy = %name,
            version = %manifest.version,
            mode = ?l.mode,
            file = %l.path.display(),
            grants = l.policy.grants().rules().len(),
            "policy loaded"
        );
        routes.push(Route { name, manifest, queue: queue.clone() });
        workers.spawn(Worker { policy: l.policy, queue, hops: l.hops, mode: l.mode, sweep_failures: 0 }.run());
    }
    let routes = Arc::new(ArcSwap::from_pointee(Routes::new(routes)));

    let intake = CancellationToken::new();
    let mut sources = JoinSet::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let subscriber = Subscriber {
        client: client.clone(),
        db,
        routes: routes.clone(),
        ledger: ledger.clone(),
        hop_limit: config.hop_limit,
        needed_flags: needed,
        configure_notifications: config.configure_notifications,
    };
    sources.spawn(subscriber.run(intake.clone(), ready_tx));
    let deploy_conn = match RedisBackend::connect(&client).await {
        Ok(b) => Some(b.connection()),
        Err(e) => {
            warn!(error = %e, "no connection for deploy hooks yet; they are read once Redis is back");
            None
        }
    };
    if let Some(conn) = deploy_conn {
        let consumer = DeployConsumer { conn, settings: config.deploy.clone(), routes: routes.clone() };
        sources.spawn(consumer.run(intake.clone()));
    }
    sources.spawn(periodic_sweeps(routes.clone(), intake.clone()));
    sources.spawn(prune_ledger(ledger.clone(), intake.clone()));

    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = ready_rx => info!(policies = routes.load().routes().len(), "cachepol ready"),
    }
    shutdown.cancelled().await;

    info!("shutting down: stopping intake");
    intake.cancel();
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    if tokio::time::timeout(grace, async { while sources.join_next().await.is_some() {} }).await.is_err() {
        warn!("intake did not stop within the grace period");
        sources.abort_all();
    }
    for route in routes.load().routes() {
        for item in route.queue.close() {
            if let Item::Deploy(hook, _) = item {
                info!(policy = %route.name, hook = %hook.id, "deploy hook left pending for the next run");
            }
        }
    }
    info!("waiting for in-flight policy calls");
    if tokio::time::timeout(grace, async { while workers.join_next().await.is_some() {} }).await.is_err() {
        warn!(
            grace_ms = config.shutdown_grace_ms,
            "policy calls still running after the grace period; abandoning them"
        );
        workers.abort_all();
    }
    info!("stopped");
    Ok(())
}

/// Connect to Redis, retrying with backoff (logged once) until it answers or
/// shutdown is asked for.
async fn connect(client: &redis::Client, shutdown: &CancellationToken) -> Option<Arc<RedisBackend>> {
    let mut backoff = Backoff::new();
    let mut logged = false;
    loop {
        match RedisBackend::connect(client).await {
            Ok(backend) => {
                if logged {
                    info!("connected to Redis");
                }
                return Some(Arc::new(backend));
            }
            Err(e) => {
                if !logged {
                    warn!(error = %e, "cannot connect to Redis; retrying with backoff");
                    logged = true;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}

/// The `*.wasm` files directly in `dir`, sorted.
pub fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, DaemonError> {
    let entries = std::fs::read_dir(dir).map_err(|error| DaemonError::PoliciesDir { path: dir.into(), error })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "wasm"))
        .collect();
    files.sort();
    Ok(files)
}

/// Load every policy file; failures are logged and skipped.
async fn load_policies(
    runtime: &Runtime,
    config: &Config,
    redis: Arc<RedisBackend>,
    ledger: &Arc<EchoLedger>,
) -> Result<Vec<Loaded>, DaemonError> {
    let mut loaded: Vec<Loaded> = Vec::new();
    let mut by_name: BTreeMap<String, PathBuf> = BTreeMap::new();
    for path in policy_files(&config.policies_dir)? {
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        match load_one(runtime, config, &path, &stem, redis.clone(), ledger).await {
            Ok(l) => {
                let name = l.policy.name().to_owned();
                if let Some(first) = by_name.get(&name) {
                    error!(
                        policy = %name,
                        file = %path.display(),
                        loaded_from = %first.display(),
                        "rejected: another file already declares this policy name"
                    );
                    continue;
                }
                if name != stem {
                    warn!(policy = %name, file = %path.display(), "the file name differs from the policy name; its config section is [policies.{stem}]");
                }
                by_name.insert(name, path);
                loaded.push(l);
            }
            Err(error @ LoadError::Widening { .. }) => return Err(DaemonError::Widening { path, error }),
            Err(e) => error!(file = %path.display(), error = %e, "policy rejected"),
        }
    }
    if loaded.is_empty() {
        warn!(dir = %config.policies_dir.display(), "no policy loaded");
    }
    Ok(loaded)
}

async fn load_one(
    runtime: &Runtime,
    config: &Config,
    path: &Path,
    stem: &str,
    redis: Arc<RedisBackend>,
    ledger: &Arc<EchoLedger>,
) -> Result<Loaded, LoadError> {
    let section = config.policy(stem);
    let compiled = runtime.compile_file(path)?;
    let options = LoadOptions {
        label: stem.to_owned(),
        config: section.config_json(),
        budgets: config.budgets_for(&section),
        // Checked when the config was parsed.
        grants: section.grants().unwrap_or_default(),
    };
    // Loading writes nothing (no grants yet); the write path is set once
    // the policy's name is known.
    let mut policy = runtime.load(&compiled, redis.clone(), &options).await?;
    let name: Arc<str> = Arc::from(policy.name());
    let (layer, hops) = EchoLayer::new(ledger.clone(), name.clone());
    let backend: Arc<dyn Backend> = match section.mode {
        Mode::Enforce => Arc::new(Layered { inner: redis, layer }),
        Mode::DryRun => Arc::new(Layered { inner: redis, layer: DryRunLayer::new(&name) }),
    };
    policy.rebind_backend(backend);
    Ok(Loaded { path: path.to_owned(), policy, mode: section.mode, hops })
}

/// Queue `sweep(periodic)` for each policy at its manifest's interval.
async fn periodic_sweeps(routes: Arc<ArcSwap<Routes>>, stop: CancellationToken) {
    let mut last: BTreeMap<String, tokio::time::Instant> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = tokio::time::Instant::now();
        for route in routes.load().routes() {
            let Some(every) = route.manifest.sweep_interval else { continue };
            let due = last.entry(route.name.to_string()).or_insert(now);
            if now.duration_since(*due) >= every {
                *due = now;
                let _ = route.queue.push(Item::Sweep(SweepReason::Periodic));
            }
        }
    }
}

/// Drop stale echo expectations now and then.
async fn prune_ledger(ledger: Arc<EchoLedger>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => ledger.prune(),
        }
    }
}
