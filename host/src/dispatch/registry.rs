//! The set of loaded policies, by file, and every change to it.
//!
//! Loading a file is split in two so that nothing slow or fallible happens
//! on the event path: [`Registry::prepare`] reads, hashes, compiles (through
//! the compile cache), instantiates, configures, describes and checks the
//! manifest; only a fully prepared version reaches [`Registry::commit`],
//! which swaps it in: the worker takes it between two events, and the routes
//! the event sources use are republished at the same moment. A file that
//! fails any step changes nothing: the running version keeps serving.
//!
//! Only the daemon's reload task owns the registry, so changes are applied
//! one at a time, in order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU8;
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::{Config, Mode};
use crate::dispatch::queue::PolicyQueue;
use crate::dispatch::routes::{Origin, Route, Routes};
use crate::dispatch::switches::Switches;
use crate::dispatch::worker::{Control, Lane, Version, Worker};
use crate::metrics::{Metrics, metrics};
use crate::sandbox::grants::{Grants, ops_to_string};
use crate::sandbox::manifest::Manifest;
use crate::sandbox::runtime::{ContentHash, LoadError, Runtime};
use crate::store::backend::{Backend, Layered};
use crate::store::dryrun::DryRunLayer;
use crate::store::echo::{EchoLayer, EchoLedger};
use crate::store::holding::HoldingLayer;
use crate::store::redis::RedisBackend;
use crate::store::walks::WalkStore;
use crate::wit::SweepReason;

/// Why a file was not (re)loaded. Each names the step.
#[derive(Debug, thiserror::Error)]
pub enum RejectError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("declares policy `{declared}` but {} holds `{held}`; a policy is renamed by adding a new file and deleting the old", path.display())]
    Renamed { path: PathBuf, held: String, declared: String },
    #[error("declares policy `{name}`, which {} already provides", other.display())]
    Duplicate { name: String, other: PathBuf },
    #[error(
        "needs {lanes} lanes, but the instance pool has {free} of its {pool} slots free: set `lanes` lower for this policy or `instance_pool` higher"
    )]
    Pool { lanes: usize, free: usize, pool: usize },
}

impl RejectError {
    /// The operator's config forbids what the policy asks for.
    pub fn is_widening(&self) -> bool {
        matches!(self, RejectError::Load(LoadError::Widening { .. }))
    }
}

/// A version of a policy ready to be swapped in.
pub struct Prepared {
    path: PathBuf,
    /// The file the policy was loaded from until now, if it was renamed
    /// (that file is gone): the running policy moves to `path`.
    renamed_from: Option<PathBuf>,
    hash: ContentHash,
    version: Version,
    manifest: Arc<Manifest>,
    from_cache: bool,
    started: Instant,
    settings: String,
}

/// What a commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Loaded { name: String },
    Replaced { name: String },
}

struct Entry {
    name: Arc<str>,
    /// Versions swapped in so far (see [`KeyNotification::generation`]).
    ///
    /// [`KeyNotification::generation`]: crate::dispatch::queue::KeyNotification::generation
    generation: u64,
    hash: ContentHash,
    manifest: Arc<Manifest>,
    queue: Arc<PolicyQueue>,
    control: mpsc::UnboundedSender<Control>,
    /// Instances its version may use.
    lanes: usize,
    mode: Mode,
    /// What the config said about it when it was loaded
    /// ([`Config::fingerprint`]): a change reloads it.
    settings: String,
}

/// The loaded policies and what they need to be (re)loaded.
pub struct Registry {
    runtime: Runtime,
    config: Config,
    redis: Arc<RedisBackend>,
    /// `redis` for policies' writes: only while this daemon holds its
    /// lease, checked before each write and each bulk page.
    holding: Arc<dyn Backend>,
    ledger: Arc<EchoLedger>,
    routes: Arc<ArcSwap<Routes>>,
    /// The operator's kill switch, which every worker consults.
    switches: Arc<Switches>,
    /// Where every policy's sliced sweeps and hooks stand.
    walks: Arc<WalkStore>,
    entries: BTreeMap<PathBuf, Entry>,
    workers: tokio::task::JoinSet<()>,
    /// Bumped whenever the routes are republished.
    changes: tokio::sync::watch::Sender<u64>,
    /// Give a newly loaded policy `sweep(start)` at once. Off while the
    /// daemon starts: the keyspace subscriber sweeps every policy after its
    /// first subscription, and a sweep before that could miss writes.
    pub sweep_new: bool,
    /// Components compiled from scratch, and reused from the cache.
    pub compiled: u64,
    pub cache_hits: u64,
}

impl Registry {
    pub fn new(
        runtime: Runtime,
        config: Config,
        redis: Arc<RedisBackend>,
        ledger: Arc<EchoLedger>,
        switches: Arc<Switches>,
    ) -> Registry {
        let walks = Arc::new(WalkStore::in_redis(redis.connection(), config.walks_key.clone()));
        let lease = switches.clone();
        let holds = HoldingLayer::new(Arc::new(move || !lease.standing_by()));
        Registry {
            runtime,
            config,
            walks,
            holding: Arc::new(Layered { inner: redis.clone(), layer: holds }),
            redis,
            ledger,
            routes: Arc::new(ArcSwap::from_pointee(Routes::default())),
            switches,
            entries: BTreeMap::new(),
            workers: tokio::task::JoinSet::new(),
            changes: tokio::sync::watch::Sender::new(0),
            sweep_new: false,
            compiled: 0,
            cache_hits: 0,
        }
    }

    /// The routes the event sources read; republished on every change.
    pub fn routes(&self) -> Arc<ArcSwap<Routes>> {
        self.routes.clone()
    }

    /// Changes whenever the routes are republished: for sources that must
    /// act on a new set of policies (the notification flags it needs).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The file holding policy `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.entries.iter().find(|(_, e)| &*e.name == name).map(|(p, _)| p.as_path())
    }

    /// Whether a policy from `path` is loaded.
    pub fn is_loaded(&self, path: &Path) -> bool {
        self.entries.contains_key(path)
    }

    /// Whether `path` is loaded with exactly the contents hashed `hash`,
    /// under the settings the config has for it now.
    pub fn is_current(&self, path: &Path, hash: &ContentHash) -> bool {
        self.entries.get(path).is_some_and(|e| e.hash == *hash && e.settings == self.config.fingerprint(&stem(path)))
    }

    /// Loaded policies still running under other settings than the config
    /// has for them now (their reload under the new ones was refused).
    pub fn behind_config(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|(path, e)| e.settings != self.config.fingerprint(&stem(path)))
            .map(|(_, e)| e.name.to_string())
            .collect()
    }

    /// The config policies are loaded under.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Load under `config` from now on; the policies it changes are
    /// reloaded by the next sync (see [`Registry::is_current`]).
    pub fn set_config(&mut self, config: Config) {
        self.config = config;
    }

    /// Every step of loading `path` (contents `bytes`, hashed `hash`)
    /// except the swap.
    pub async fn prepare(&mut self, path: &Path, bytes: &[u8], hash: ContentHash) -> Result<Prepared, RejectError> {
        let started = Instant::now();
        let stem = stem(path);
        let section = self.config.policy(&stem);
        let settings = self.config.fingerprint(&stem);
        // Compiling takes from milliseconds to seconds of CPU: off the async
        // workers, which also drive the event path.
        let (runtime, owned, cache_dir) = (self.runtime.clone(), bytes.to_vec(), self.config.cache_dir.clone());
        let (compiled, from_cache) =
            tokio::task::spawn_blocking(move || runtime.compile_cached(&owned, &hash, &cache_dir))
                .await
                .map_err(|e| LoadError::Compile(format!("the compiler task failed: {e}")))??;
        if from_cache {
            self.cache_hits += 1;
        } else {
            self.compiled += 1;
        }
        let options = self.config.load_options(&stem, &section);
        // Loading writes nothing (no grants yet); the write path is set
        // once the policy's name is known.
        let mut policy = self.runtime.load(&compiled, self.redis.clone(), &options).await?;
        let name: Arc<str> = Arc::from(policy.name());
        if let Some(held) = self.entries.get(path).map(|e| e.name.clone())
            && held != name
        {
            return Err(RejectError::Renamed { path: path.into(), held: held.to_string(), declared: name.to_string() });
        }
        let mut renamed_from = None;
        if let Some(other) = self.file_of(&name).filter(|other| *other != path) {
            // `mv a.wasm b.wasm` may be seen as "b appeared" before "a went":
            // the policy moves to the new file rather than being unloaded.
            if other.exists() {
                return Err(RejectError::Duplicate { name: name.to_string(), other: other.to_owned() });
            }
            renamed_from = Some(other.to_owned());
        }
        // Each lane writes through a backend of its own: the echo layer
        // stamps a write with the hop count of the event its lane has in hand.
        let write_path = || -> (Arc<dyn Backend>, Arc<AtomicU8>) {
            let (layer, hops) = EchoLayer::new(self.ledger.clone(), name.clone());
            match section.mode {
                Mode::Enforce => (Arc::new(Layered { inner: self.holding.clone(), layer }), hops),
                Mode::DryRun => (Arc::new(Layered { inner: self.redis.clone(), layer: DryRunLayer::new(&name) }), hops),
            }
        };
        let (backend, hops) = write_path();
        policy.rebind_backend(backend);
        let manifest = Arc::new(policy.manifest().clone());
        let mut lanes = Vec::new();
        // A policy built against 0.1.0 was written for one instance.
        let count = match section.lanes {
            None if policy.is_v0_1() => 1,
            _ => self.config.lanes_for(&section),
        };
        // Every lane of every policy must fit in the pool, the running
        // version of this one included until the swap: a lane created past
        // it would fail its calls instead.
        let pool = self.runtime.max_instances();
        let in_use: usize = self.entries.values().map(|e| e.lanes).sum();
        let free = pool.saturating_sub(in_use);
        if count > free {
            return Err(RejectError::Pool { lanes: count, free, pool });
        }
        for _ in 1..count {
            let (backend, hops) = write_path();
            lanes.push(Lane { policy: policy.lane(backend), hops });
        }
        lanes.insert(0, Lane { policy, hops });
        Ok(Prepared {
            path: path.to_owned(),
            renamed_from,
            hash,
            version: Version { lanes, mode: section.mode, failure: section.failure.clone(), generation: 0 },
            manifest,
            from_cache,
            started,
            settings,
        })
    }

    /// Swap a prepared version in (or start a new policy), republish the
    /// routes, and sweep if it now subscribes to more than before.
    pub fn commit(&mut self, prepared: Prepared) -> Change {
        let Prepared { path, renamed_from, hash, mut version, manifest, from_cache, started, settings } = prepared;
        let name: Arc<str> = Arc::from(version.policy().name());
        let grants = version.policy().grants().clone();
        let mode = version.mode;
        if let Some(entry) = renamed_from.and_then(|from| self.entries.remove(&from).map(|e| (from, e))) {
            info!(policy = %name, from = %entry.0.display(), to = %path.display(), "policy file renamed");
            self.entries.insert(path.clone(), entry.1);
        }
        match self.entries.get_mut(&path) {
            Some(entry) => {
                let old = entry.manifest.clone();
                let same_file = entry.hash == hash;
                entry.generation += 1;
                version.generation = entry.generation;
                entry.lanes = version.lanes.len();
                entry.mode = version.mode;
                entry.settings = settings;
                let _ = entry.control.send(Control::Swap(version));
                entry.hash = hash;
                entry.manifest = manifest.clone();
                let queue = entry.queue.clone();
                self.publish();
                // New settings (dry-run to enforce, another TTL table) or
                // new subscriptions: what the old version left is
                // reconciled under the new one.
                if same_file || adds_subscriptions(&old, &manifest) {
                    let _ = queue.push(crate::dispatch::queue::Item::Sweep(SweepReason::Reload));
                }
                info!(
                    policy = %name,
                    from = %old.version,
                    to = %manifest.version,
                    mode = %mode,
                    grants_added = %describe_grants(&grants, &old.grants),
                    grants_removed = %describe_grants(&old.grants, &grants),
                    compile_cache = from_cache,
                    ms = started.elapsed().as_millis() as u64,
                    "{}",
                    if same_file {
                        format!("policy reloaded with new settings from the config ({mode})")
                    } else {
                        format!("policy reloaded: {} -> {}", old.version, manifest.version)
                    }
                );
                Metrics::count(&metrics().reloads, "replaced");
                Change::Replaced { name: name.to_string() }
            }
            None => {
                let queue = Arc::new(
                    PolicyQueue::new(self.config.queue_capacity, self.config.queue_bytes)
                        .counted(crate::metrics::metrics().policy(&name)),
                );
                let version_lanes = version.lanes.len();
                let (worker, control) = Worker::new(version, queue.clone(), self.switches.clone(), self.walks.clone());
                self.workers.spawn(worker.run());
                self.entries.insert(
                    path.clone(),
                    Entry {
                        name: name.clone(),
                        generation: 0,
                        hash,
                        manifest: manifest.clone(),
                        queue: queue.clone(),
                        control,
                        lanes: version_lanes,
                        mode,
                        settings,
                    },
                );
                self.publish();
                if self.sweep_new {
                    let _ = queue.push(crate::dispatch::queue::Item::Sweep(SweepReason::Start));
                }
                info!(
                    policy = %name,
                    version = %manifest.version,
                    mode = %mode,
                    file = %path.display(),
                    grants = %describe_grants(&grants, &Grants::default()),
                    compile_cache = from_cache,
                    ms = started.elapsed().as_millis() as u64,
                    "policy loaded"
                );
                Metrics::count(&metrics().reloads, "loaded");
                Change::Loaded { name: name.to_string() }
            }
        }
    }

    /// Unload the policy of a deleted file. Its worker finishes the event in
    /// hand; keyspace events still queued are discarded (the policy is gone,
    /// and other policies have queues of their own), and deploy hooks still
    /// queued stop waiting for it: the deploy reader acknowledges each once
    /// the policies still loaded have handled it.
    pub fn remove(&mut self, path: &Path) -> Option<String> {
        let entry = self.entries.remove(path)?;
        self.publish();
        metrics().forget(&entry.name);
        Metrics::count(&metrics().reloads, "unloaded");
        let dropped = entry.queue.len();
        entry.queue.close();
        info!(policy = %entry.name, file = %path.display(), discarded = dropped, "policy unloaded: its file was deleted");
        Some(entry.name.to_string())
    }

    /// Files currently loaded.
    pub fn files(&self) -> Vec<PathBuf> {
        self.entries.keys().cloned().collect()
    }

    fn publish(&self) {
        let routes = self
            .entries
            .iter()
            .map(|(path, e)| Route {
                name: e.name.clone(),
                manifest: e.manifest.clone(),
                queue: e.queue.clone(),
                generation: e.generation,
                origin: Arc::new(Origin { file: path.clone(), hash: hex(&e.hash), mode: e.mode }),
            })
            .collect();
        self.routes.store(Arc::new(Routes::new(routes)));
        self.changes.send_modify(|n| *n += 1);
    }

    /// Close every queue and wait for the workers to finish the events in
    /// hand, up to `grace`.
    pub async fn shutdown(mut self, grace: std::time::Duration) {
        for (path, entry) in &self.entries {
            let left = entry.queue.close();
            if !left.is_empty() {
                info!(policy = %entry.name, file = %path.display(), "deploy hooks left pending for the next run");
            }
        }
        let workers = &mut self.workers;
        if tokio::time::timeout(grace, async { while workers.join_next().await.is_some() {} }).await.is_err() {
            warn!(
                grace_ms = grace.as_millis() as u64,
                "policy calls still running after the grace period; abandoning them"
            );
            self.workers.abort_all();
        }
    }
}

/// A policy file's stem: the key of its `[policies.NAME]` section.
fn stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `pattern(ops)` of the rules in `a` that `b` does not have, or `-`.
fn describe_grants(a: &Grants, b: &Grants) -> String {
    let theirs: BTreeSet<String> =
        b.rules().iter().map(|r| format!("{}({})", r.pattern, ops_to_string(r.ops))).collect();
    let ours: Vec<String> = a
        .rules()
        .iter()
        .map(|r| format!("{}({})", r.pattern, ops_to_string(r.ops)))
        .filter(|r| !theirs.contains(r))
        .collect();
    if ours.is_empty() { "-".into() } else { ours.join(" ") }
}

/// Whether `new` hears about anything `old` did not: new keyspace
/// (op, pattern) pairs, deploy services, or a sweep interval.
fn adds_subscriptions(old: &Manifest, new: &Manifest) -> bool {
    let pairs = |m: &Manifest| -> BTreeSet<(String, String)> {
        m.key_subscriptions
            .iter()
            .flat_map(|s| {
                let ops = if s.ops.is_empty() { vec!["*".to_owned()] } else { s.ops.clone() };
                s.patterns.iter().flat_map(move |p| ops.clone().into_iter().map(move |o| (o, p.as_str().to_owned())))
            })
            .collect()
    };
    let old_pairs = pairs(old);
    pairs(new).iter().any(|p| !old_pairs.contains(p))
        || new.deploys.iter().any(|s| !old.deploys.contains(s))
        || (new.sweep_interval.is_some() && old.sweep_interval.is_none())
}
