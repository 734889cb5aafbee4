//! `cachepol run`: the daemon, wired together.
//!
//! Start-up, in order: bind the admin server (so liveness answers from
//! the first moment; readiness says what is missing until the end of
//! start-up), connect to Redis (one server, or a Redis Cluster through its
//! cluster client: [`crate::store::target`]; retrying until it answers), load
//! every `*.wasm` in the policies directory (a file that fails is logged and
//! skipped; the others run; an operator grant wider than what a policy asks
//! for stops start-up), check `notify-keyspace-events`, then start the
//! keyspace subscriber (one per primary on a cluster, following the
//! topology: [`crate::intake::cluster`]; its first subscription sends every
//! policy `sweep(start)`), the deploy-hook consumer, the periodic sweeps and the
//! reloader that watches the policies directory.
//!
//! Shutdown, on SIGINT/SIGTERM: report not ready, stop intake (subscriber, deploy reader,
//! reloader; a hook being handled is finished and acknowledged), close the
//! queues so each worker finishes the event in hand, wait for them up to the
//! grace period, stop the admin server, and return. Unhandled keyspace events are reconciled by the
//! `sweep(start)` of the next run; unacknowledged hooks are re-read by it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{self, Admin, Wired};
use crate::config::Config;
use crate::dispatch::lease::Lease;
use crate::dispatch::queue::Item;
use crate::dispatch::registry::{Registry, RejectError};
use crate::dispatch::reload::{ConfigSource, Reloader};
use crate::dispatch::routes::Routes;
use crate::dispatch::switches::Switches;
use crate::intake::cluster::{Nodes, Subscriptions};
use crate::intake::control;
use crate::intake::deploy::DeployConsumer;
use crate::intake::events::{Backoff, Subscriber};
use crate::intake::lease;
use crate::intake::notify::{self, NotifyError};
use crate::intake::peers::{self, Peers};
use crate::metrics::{Readiness, metrics};
use crate::sandbox::reserved::{self, Reserved};
use crate::sandbox::runtime::{Runtime, RuntimeConfig, RuntimeError};
use crate::store::announce::Announcer;
use crate::store::echo::{self, EchoLedger};
use crate::store::eviction;
use crate::store::index::KeyIndex;
use crate::store::legacy;
use crate::store::redis::RedisBackend;
use crate::store::target::RedisTarget;
use crate::wit::SweepReason;

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("invalid Redis URL `{url}`: {error}")]
    RedisUrl { url: String, error: String },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Notifications(#[from] NotifyError),
    #[error("cannot use the policies directory {}: {error}", path.display())]
    PoliciesDir { path: PathBuf, error: std::io::Error },
    /// The operator's config asks for more than a policy does: refusing to
    /// start beats silently running with other rights than configured.
    #[error(transparent)]
    Widening(RejectError),
    #[error("invalid config: {0}")]
    Config(String),
    #[error("cannot listen on the admin address {addr}: {error} (set admin_addr, or `--admin none`)")]
    Admin { addr: std::net::SocketAddr, error: std::io::Error },
}

/// Run the daemon until `shutdown` is cancelled. `reload` reads the config
/// again on SIGHUP.
pub async fn run(config: Config, reload: Option<ConfigSource>, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let ready = &metrics().ready;
    let admin_stop = CancellationToken::new();
    let admin = Admin::new(config.deploy.clone(), config.deploy_token.clone(), config.admin_token.clone());
    let admin_task = match config.admin().map_err(DaemonError::Config)? {
        Some(addr) => {
            let listener = admin::bind(addr).await.map_err(|error| DaemonError::Admin { addr, error })?;
            let bound = listener.local_addr().unwrap_or(addr);
            let webhook = if config.deploy_token.is_some() { "on" } else { "off (no deploy_token)" };
            info!(addr = %bound, webhook, "admin server listening on http://{bound}");
            if !bound.ip().is_loopback() && config.admin_token.is_none() {
                warn!(addr = %bound, "the admin server is reachable beyond loopback without admin_token: anyone who reaches it reads /status (grants, errors) and /metrics; set admin_token or CACHEPOL_ADMIN_TOKEN");
            }
            Some(tokio::spawn(admin::serve(listener, admin.clone(), admin_stop.clone())))
        }
        None => None,
    };
    let result = run_wired(config, reload, &admin, shutdown).await;
    Readiness::set(&ready.shutting_down, true);
    admin_stop.cancel();
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    result
}

async fn run_wired(
    mut config: Config,
    reload: Option<ConfigSource>,
    admin: &Admin,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let ready = &metrics().ready;
    let target =
        RedisTarget::parse(&config.redis_url).map_err(|e| DaemonError::RedisUrl { url: e.url, error: e.reason })?;
    config.for_target().map_err(DaemonError::Config)?;
    if target.is_cluster() && config.index.enabled {
        // Its completeness rests on fences read in order with every write's
        // notification, which one subscription per primary cannot give.
        info!("Redis Cluster: the key index is off; bulk operations scan every primary in parallel");
        config.index.enabled = false;
    }
    let db = target.db();
    let fence_channel = echo::fence_channel();
    let index = Arc::new(KeyIndex::new(config.index.max_keys, fence_channel.clone()));
    let lease = Lease::new(&config.replicas, db, &config.deploy.consumer);
    // Replicas splitting a cluster tell each other of their writes.
    let announcer = (target.is_cluster() && lease.enabled())
        .then(|| Arc::new(Announcer::new(format!("{}:echo", lease.key), lease.id.clone())));
    let Some(redis) = connect(&target, &index, announcer.clone(), &shutdown).await else { return Ok(()) };
    eviction::warn_if_at_risk(&mut redis.connection(), lease.enabled()).await;
    let runtime = Runtime::new(RuntimeConfig {
        max_instances: config.instance_pool,
        reserved: Arc::new(Reserved::new(config.own_keys())),
        ..RuntimeConfig::default()
    })?;
    let ledger = Arc::new(EchoLedger::new());

    let mut switches = Switches::new(lease);
    if target.is_cluster() {
        switches = switches.split_by_shard();
    }
    let switches = Arc::new(switches);
    if let Err(e) = control::read_at_start(&switches, &mut redis.connection(), &config.control_key).await {
        warn!(error = %e, key = %config.control_key, "cannot read the disabled policies; none is held back until they can be read");
    }
    let sweep_requests =
        control::read_sweeps_at_start(&mut redis.connection(), &config.sweep_key, !config.replicas.enabled)
            .await
            .inspect_err(|e| warn!(error = %e, key = %config.sweep_key, "cannot read the sweep requests yet"))
            .unwrap_or_default();
    let registry = Registry::new(runtime, config.clone(), redis.clone(), ledger.clone(), switches.clone());
    let routes = registry.routes();
    let nodes = Arc::new(Nodes::default());
    let peers = Arc::new(Peers::default());
    if let Some(announcer) = &announcer {
        // A write on a node this daemon routes is recognised by its own
        // ledger: only writes landing on another replica's shard need
        // announcing.
        let (nodes, switches) = (nodes.clone(), switches.clone());
        announcer
            .skip_routed(Box::new(move |slot| nodes.shard_of(slot).is_some_and(|s| switches.routes_node(Some(s)))));
    }
    admin.wire(Wired {
        routes: routes.clone(),
        switches: switches.clone(),
        index: index.clone(),
        redis: redis.connection(),
        nodes: nodes.clone(),
        peers: peers.clone(),
    });
    let mut reloader = Reloader::new(registry, &config.policies_dir)
        .map_err(|error| DaemonError::PoliciesDir { path: config.policies_dir.clone(), error })?;
    if config.watch {
        // Before the first load: a file dropped during it is reported.
        reloader.watch();
    }
    if let Some(source) = reload {
        reloader.reload_config_with(source);
    }
    reloader.sync_all().await.map_err(DaemonError::Widening)?;
    // Before any policy is called: state the previous version kept under
    // the (now reserved) `cachepol:` namespace.
    let loaded: Vec<String> = routes.load().routes().iter().map(|r| r.name.to_string()).collect();
    let marker = if target.is_cluster() { "{cachepol}:control:state-moved" } else { "cachepol:control:state-moved" };
    if let Err(e) = legacy::move_state(&redis, &loaded, marker, reserved::state_prefix).await {
        warn!(error = %e, "cannot move the policies' state from under cachepol: yet (tried again at the next start)");
    }
    Readiness::set(&ready.policies_loaded, true);
    // From now on the subscription is (being) set up: a policy loaded later
    // sweeps as it starts.
    reloader.registry.sweep_new = true;
    info!(
        compiled = reloader.registry.compiled,
        from_cache = reloader.registry.cache_hits,
        "policies loaded ({} compiled, {} from the compile cache)",
        reloader.registry.compiled,
        reloader.registry.cache_hits
    );
    if routes.load().routes().is_empty() {
        warn!(dir = %reloader.dir().display(), "no policy loaded yet");
    }
    // What the value cannot show (`n` under `A`) the subscriber probes.
    let needed = notify::required(&routes.load().manifests());
    let added = notify::ensure(&mut redis.connection(), &needed, config.configure_notifications, None)
        .await?
        .require(&needed)?;
    if !added.is_empty() {
        info!(added = %notify::text(&added), "enabled keyspace notification flags");
    }

    let intake = CancellationToken::new();
    let mut sources = JoinSet::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let subscriber = Subscriber {
        client: target
            .node(None)
            .map_err(|e| DaemonError::RedisUrl { url: config.redis_url.clone(), error: e.to_string() })?,
        node: String::new(),
        nodes: nodes.clone(),
        slots: Vec::new(),
        announcements: announcer.as_ref().map(|a| (a.channel.clone(), a.daemon.clone())),
        first_sweep: Some(SweepReason::Start),
        db,
        routes: routes.clone(),
        ledger: ledger.clone(),
        hop_limit: config.hop_limit,
        configure_notifications: config.configure_notifications,
        changes: reloader.registry.changes(),
        fence_channel: fence_channel.clone(),
        index: index.clone(),
        index_config: config.index.clone(),
        switches: switches.clone(),
    };
    let subscriptions = Subscriptions { target: target.clone(), template: subscriber };
    sources.spawn(subscriptions.run(intake.clone(), ready_tx));
    match RedisBackend::connect(&target).await {
        Ok(b) => {
            let consumer = DeployConsumer {
                conn: b.connection(),
                settings: deploy_settings(&config),
                routes: routes.clone(),
                switches: switches.clone(),
            };
            sources.spawn(consumer.run(intake.clone()));
        }
        Err(e) => warn!(error = %e, "no connection for deploy hooks; restart once Redis is reachable"),
    }
    sources.spawn(periodic_sweeps(routes.clone(), switches.clone(), intake.clone()));
    sources.spawn(index.clone().run_builder(redis.connection(), intake.clone()));
    sources.spawn(echo::send_fences(ledger.clone(), redis.connection(), fence_channel.clone(), intake.clone()));
    let watch = control::Watch {
        switches: switches.clone(),
        conn: redis.connection(),
        key: config.control_key.clone(),
        sweep_key: config.sweep_key.clone(),
        requests: sweep_requests,
        routes: routes.clone(),
    };
    sources.spawn(control::watch(watch, intake.clone()));
    sources.spawn(peers::run(peers, switches.clone(), redis.connection(), intake.clone()));
    let reloading = tokio::spawn(reloader.run(intake.clone()));

    // The lease outlives intake: it is given back only once the calls in
    // flight are done, so a standby never sweeps beside them.
    let lease_stop = CancellationToken::new();
    let mut leasing = None;
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = ready_rx => {
            // Only once subscribed: a takeover's sweep must not run before
            // the writes after it can be heard.
            if switches.lease.enabled() {
                match RedisBackend::connect(&target).await {
                    Ok(own) => {
                        let (settled_tx, settled) = tokio::sync::oneshot::channel();
                        leasing = Some(tokio::spawn(lease::run(switches.clone(), nodes.clone(), own.connection(), routes.clone(), lease_stop.clone(), settled_tx)));
                        // Ready once the lease is taken or seen held: a
                        // lone daemon handles what is written after this.
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            _ = tokio::time::timeout(switches.lease.ttl, settled) => {}
                        }
                    }
                    Err(e) => warn!(error = %e, "no connection for the keyspace-event lease; this daemon stands by"),
                }
            }
            info!(policies = routes.load().routes().len(), "cachepol ready");
        }
    }
    shutdown.cancelled().await;

    info!("shutting down: stopping intake");
    Readiness::set(&ready.shutting_down, true);
    intake.cancel();
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    if tokio::time::timeout(grace, async { while sources.join_next().await.is_some() {} }).await.is_err() {
        warn!("intake did not stop within the grace period");
        sources.abort_all();
    }
    info!("waiting for in-flight policy calls");
    match reloading.await {
        Ok(registry) => registry.shutdown(grace).await,
        Err(e) => warn!(error = %e, "the reloader failed; policy calls were not waited for"),
    }
    lease_stop.cancel();
    if let Some(leasing) = leasing {
        let _ = leasing.await;
    }
    info!("stopped");
    Ok(())
}

/// Connect to Redis, retrying with backoff (logged once) until it answers or
/// shutdown is asked for.
async fn connect(
    target: &RedisTarget,
    index: &Arc<KeyIndex>,
    announcer: Option<Arc<Announcer>>,
    shutdown: &CancellationToken,
) -> Option<Arc<RedisBackend>> {
    let mut backoff = Backoff::new();
    let mut logged = false;
    loop {
        match RedisBackend::connect(target).await {
            Ok(backend) => {
                if logged {
                    info!("connected to Redis");
                }
                let backend = backend.with_index(index.clone());
                return Some(Arc::new(match announcer {
                    Some(announcer) => backend.with_announcer(announcer),
                    None => backend,
                }));
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

/// The deploy reader's settings. With replicas, a hook the lease holder
/// was handling when it died is claimed by the next holder once idle for
/// the lease's TTL rather than `claim_idle_ms` (a minute by default): the
/// heartbeat of a live handler then runs every third of that, so a hook
/// still being handled is never taken.
fn deploy_settings(config: &Config) -> crate::config::DeployConfig {
    let mut deploy = config.deploy.clone();
    if config.replicas.enabled {
        deploy.claim_idle_ms = deploy.claim_idle_ms.min(config.replicas.lease_ttl_ms.max(300));
    }
    deploy
}

/// Queue `sweep(periodic)` for each policy at its manifest's interval
/// (while leading sweeps, when replicas share the work). A sweep that falls
/// due while this daemon does not lead stays due, and is queued as soon as
/// it does (a takeover): a lease gap skips none.
async fn periodic_sweeps(routes: Arc<ArcSwap<Routes>>, switches: Arc<Switches>, stop: CancellationToken) {
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
            // One replica sweeps for all (each sweep walks every node). Due
            // while nobody leads, a sweep stays due: it runs on takeover.
            if now.duration_since(*due) >= every && switches.leads_sweeps() && !switches.standing_by() {
                *due = now;
                let _ = route.queue.push(Item::Sweep(SweepReason::Periodic));
            }
        }
    }
}
