//! Loading policy components and calling them under budgets.
//!
//! One [`Runtime`] holds the wasmtime `Engine` (pooling allocator, fuel) and
//! a `Linker` with the cachepol imports plus WASI p2 over an empty context:
//! Rust's `wasm32-wasip2` guests always import `wasi:io`/`wasi:cli`, but get
//! no environment, arguments, files or sockets, and their stdout/stderr go
//! to the log ([`crate::sandbox::guest_io`]).
//!
//! Loading is split so that each failure has a name:
//! [`Runtime::compile`] checks the bytes (not empty, WebAssembly, a
//! component rather than a core module), compiles, and checks that the
//! component's imports are ones we provide and its exports are the `policy`
//! world's; [`Runtime::load`] instantiates it, calls `configure`, then
//! `describe`, and validates the manifest.
//!
//! A [`LoadedPolicy`] keeps one instance alive between events (a reused
//! instance costs microseconds per call). Every call gets fresh fuel, the
//! memory cap, the host-call budgets and a wall-clock limit. A trap kills
//! only that instance: the next event gets a new one, configured again, and
//! the daemon and the other policies never notice.

use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::Instrument;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::sandbox::budget::Budgets;
use crate::sandbox::grants::Grants;
use crate::sandbox::guest_io::{GuestOutput, LogAllowance, panic_message};
use crate::sandbox::guest_io::{clip, clip_owned};
use crate::sandbox::hostapi::{CallState, HostApi};
use crate::sandbox::manifest::{Manifest, ManifestError};
use crate::sandbox::reserved::Reserved;
use crate::sandbox::work::WorkMeter;
use crate::store::backend::Backend;
use crate::store::walks::WalkBook;
use crate::wit::{self, Policy, PolicyPre};

/// Why a component could not be loaded. Each message is one line and says
/// which step failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("the file is empty")]
    Empty,
    #[error("not a WebAssembly file (it does not start with \\0asm)")]
    NotWasm,
    #[error(
        "this is a core WebAssembly module, not a component: build the policy with `cargo build --target wasm32-wasip2`"
    )]
    CoreModule,
    #[error("unsupported WebAssembly binary version {0:02x?}")]
    UnknownVersion([u8; 4]),
    #[error(
        "the file is truncated: {size} bytes, but its sections need at least {needed} (an incomplete copy? install with cp to a temporary name, then mv)"
    )]
    Truncated { size: usize, needed: usize },
    #[error("cannot compile the component: {0}")]
    Compile(String),
    #[error("the component needs imports cachepol does not provide: {0}")]
    Imports(String),
    #[error(
        "the component does not implement the cachepol:policy/policy world (0.1.0 or 0.2.x): {0} (if the file was copied, check the copy is complete)"
    )]
    Exports(String),
    #[error("cannot instantiate the component: {0}")]
    Instantiate(String),
    #[error("configure failed: {0}")]
    Configure(String),
    #[error("describe failed: {0}")]
    Describe(String),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("the operator's grants for `{policy}` are wider than what it asks for: {detail}")]
    Widening { policy: String, detail: String },
    #[error("`{policy}` may not reach reserved keys: {detail}")]
    Reserved { policy: String, detail: String },
}

/// Why one call into a policy failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallFailure {
    /// The policy returned an error value (it did not trap).
    #[error("policy returned an error: {}", wit::Shown(.0))]
    Returned(wit::Error),
    /// A per-event budget ran out (the policy may have swallowed the error).
    #[error("budget exceeded: {0}")]
    Budget(String),
    #[error("CPU budget exhausted: out of fuel after {0} units")]
    OutOfFuel(u64),
    #[error("memory budget exceeded: tried to grow to {wanted} bytes, the limit is {limit}")]
    Memory { wanted: usize, limit: usize },
    #[error("guest {0}")]
    Panic(String),
    #[error("took longer than the {} ms wall-clock budget", .0.as_millis())]
    Timeout(Duration),
    #[error("trapped: {0}")]
    Trap(String),
    /// Redis failed the writes the policy queued (`expire-queued`).
    #[error("queued writes failed: {0}")]
    Queued(String),
    /// The instance died earlier and could not be re-created.
    #[error("could not re-create the instance: {0}")]
    Restart(String),
}

impl CallFailure {
    /// Whether the instance is unusable after this failure.
    fn kills_instance(&self) -> bool {
        !matches!(self, CallFailure::Returned(_) | CallFailure::Budget(_) | CallFailure::Queued(_))
    }
}

/// The engine could not be set up (for example, the pooling allocator could
/// not reserve its address space).
#[derive(Debug, thiserror::Error)]
#[error("cannot start the WebAssembly runtime: {0}")]
pub struct RuntimeError(String);

/// Engine-wide settings.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Policy instances alive at once (pooling allocator slots): one per
    /// lane of every policy, twice over while a version is swapped. Slots
    /// are address space reserved up front, not memory used.
    pub max_instances: u32,
    /// Upper bound for any policy's memory budget.
    pub max_memory_bytes: usize,
    /// The daemon's own keys, which no policy's grants may reach.
    pub reserved: Arc<Reserved>,
}

impl Default for RuntimeConfig {
    fn default() -> RuntimeConfig {
        RuntimeConfig { max_instances: 512, max_memory_bytes: 256 << 20, reserved: Reserved::builtin() }
    }
}

/// The wasmtime engine and linker shared by every policy.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<StoreState>>,
    max_memory_bytes: usize,
    max_instances: u32,
    reserved: Arc<Reserved>,
}

/// A compiled, import-checked component, ready to instantiate.
#[derive(Clone)]
pub struct Compiled {
    pre: Pre,
}

/// A component ready to instantiate, by the contract version it exports.
#[derive(Clone)]
enum Pre {
    Current(PolicyPre<StoreState>),
    /// Built against 0.1.0: no `handle-keys`.
    V0_1(wit::v0_1::PolicyPre<StoreState>),
}

impl Pre {
    fn engine(&self) -> &Engine {
        match self {
            Pre::Current(pre) => pre.engine(),
            Pre::V0_1(pre) => pre.engine(),
        }
    }

    async fn instantiate(&self, store: &mut Store<StoreState>) -> wasmtime::Result<Bindings> {
        Ok(match self {
            Pre::Current(pre) => Bindings::Current(pre.instantiate_async(store).await?),
            Pre::V0_1(pre) => Bindings::V0_1(pre.instantiate_async(store).await?),
        })
    }
}

/// A live instance's exports. 0.1.0's take and return 0.2.0's types (the
/// contract's types did not change), so only `handle-keys` differs.
enum Bindings {
    Current(Policy),
    V0_1(wit::v0_1::Policy),
}

impl Bindings {
    async fn call_configure(
        &self,
        store: &mut Store<StoreState>,
        config: &str,
    ) -> wasmtime::Result<Result<(), String>> {
        match self {
            Bindings::Current(b) => b.call_configure(store, config).await,
            Bindings::V0_1(b) => b.call_configure(store, config).await,
        }
    }

    async fn call_describe(&self, store: &mut Store<StoreState>) -> wasmtime::Result<wit::Manifest> {
        match self {
            Bindings::Current(b) => b.call_describe(store).await,
            Bindings::V0_1(b) => b.call_describe(store).await,
        }
    }

    async fn call_handle(
        &self,
        store: &mut Store<StoreState>,
        event: &wit::Event,
    ) -> wasmtime::Result<Result<wit::Outcome, wit::Error>> {
        match self {
            Bindings::Current(b) => b.call_handle(store, event).await,
            Bindings::V0_1(b) => b.call_handle(store, event).await,
        }
    }

    /// Keyspace events in one call where the policy exports `handle-keys`;
    /// one `handle` after another where it does not.
    async fn call_handle_keys(
        &self,
        store: &mut Store<StoreState>,
        events: &[wit::KeyEvent],
    ) -> wasmtime::Result<Vec<Result<wit::Outcome, wit::Error>>> {
        match self {
            Bindings::Current(b) => b.call_handle_keys(store, events).await,
            Bindings::V0_1(b) => {
                let mut results = Vec::with_capacity(events.len());
                for event in events {
                    results.push(b.call_handle(&mut *store, &wit::Event::Key(event.clone())).await?);
                }
                Ok(results)
            }
        }
    }
}

/// How fuel is handed out: the guest yields to the async executor after
/// this much, so a spinning policy cannot hog a worker thread.
const FUEL_YIELD_INTERVAL: u64 = 1_000_000;

impl Runtime {
    pub fn new(config: RuntimeConfig) -> Result<Runtime, RuntimeError> {
        Self::build(config).map_err(|e| RuntimeError(format!("{e:#}")))
    }

    fn build(config: RuntimeConfig) -> wasmtime::Result<Runtime> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(config.max_instances)
            .total_core_instances(config.max_instances * 8)
            .total_memories(config.max_instances * 2)
            .total_tables(config.max_instances * 8)
            .total_stacks(config.max_instances)
            .max_memory_size(config.max_memory_bytes);
        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .consume_fuel(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        Policy::add_to_linker::<_, HasSelf<HostApi>>(&mut linker, |state: &mut StoreState| &mut state.api)?;
        // Policies built against contract 0.1.0 import these instead; their
        // types and exports are 0.2.0's.
        fn api(state: &mut StoreState) -> &mut HostApi {
            &mut state.api
        }
        wit::v0_1::redis::add_to_linker::<_, HasSelf<HostApi>>(&mut linker, api)?;
        wit::v0_1::log::add_to_linker::<_, HasSelf<HostApi>>(&mut linker, api)?;
        wit::v0_1::clock::add_to_linker::<_, HasSelf<HostApi>>(&mut linker, api)?;
        Ok(Runtime {
            engine,
            linker: Arc::new(linker),
            max_memory_bytes: config.max_memory_bytes,
            max_instances: config.max_instances,
            reserved: config.reserved,
        })
    }

    /// Instances that can be alive at once (see [`RuntimeConfig`]).
    pub fn max_instances(&self) -> usize {
        self.max_instances as usize
    }

    /// Check and compile a component from bytes.
    pub fn compile(&self, bytes: &[u8]) -> Result<Compiled, LoadError> {
        sniff(bytes)?;
        let component = Component::new(&self.engine, bytes).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        self.link(&component)
    }

    /// [`Runtime::compile`] through an on-disk cache of compiled code keyed
    /// by the component's content hash (and this engine's settings), so a
    /// restart or a re-deployed identical file does not recompile. Returns
    /// whether the cache had it. `digest` is [`content_hash`] of `bytes`,
    /// which the caller already has.
    pub fn compile_cached(
        &self,
        bytes: &[u8],
        digest: &ContentHash,
        cache_dir: &Path,
    ) -> Result<(Compiled, bool), LoadError> {
        sniff(bytes)?;
        let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut engine_hash);
        let name = format!("{}-{:016x}.cwasm", hex(digest), engine_hash.finish());
        let path = cache_dir.join(name);
        if path.exists() {
            // SAFETY: the cache directory is written only by this function,
            // from code this engine compiled; deserialize also checks that
            // the artifact matches this engine's version and settings.
            match unsafe { Component::deserialize_file(&self.engine, &path) } {
                Ok(component) => return Ok((self.link(&component)?, true)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "unusable compile cache entry; recompiling");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        let compiled = self.link(&component)?;
        if let Err(e) = store_artifact(cache_dir, &path, &component) {
            tracing::warn!(dir = %cache_dir.display(), error = %e, "cannot write the compile cache");
        }
        Ok((compiled, false))
    }

    /// Check imports and exports against the world.
    fn link(&self, component: &Component) -> Result<Compiled, LoadError> {
        let pre = self.linker.instantiate_pre(component).map_err(|e| LoadError::Imports(format!("{e:#}")))?;
        let pre = match PolicyPre::new(pre.clone()) {
            Ok(current) => Pre::Current(current),
            Err(e) => match wit::v0_1::PolicyPre::new(pre) {
                Ok(old) => Pre::V0_1(old),
                Err(_) => return Err(LoadError::Exports(format!("{e:#}"))),
            },
        };
        Ok(Compiled { pre })
    }

    /// Read and compile a component file.
    pub fn compile_file(&self, path: &Path) -> Result<Compiled, LoadError> {
        let bytes = std::fs::read(path).map_err(|error| LoadError::Read { path: path.display().to_string(), error })?;
        self.compile(&bytes)
    }

    /// Instantiate, configure, describe and validate the manifest; then
    /// apply the operator's grant narrowing, if any.
    pub async fn load(
        &self,
        compiled: &Compiled,
        backend: Arc<dyn Backend>,
        options: &LoadOptions,
    ) -> Result<LoadedPolicy, LoadError> {
        let mut budgets = options.budgets.clone();
        budgets.memory_bytes = budgets.memory_bytes.min(self.max_memory_bytes);
        let setup = Setup {
            pre: compiled.pre.clone(),
            label: Arc::from(options.label.as_str()),
            config: options.config.clone(),
            backend,
            meter: Arc::new(WorkMeter::new(budgets.examined_per_sec)),
            budgets,
            grants: Arc::new(Grants::default()),
        };
        let mut instance = setup.instantiate().await.map_err(LoadError::Instantiate)?;
        instance.configure(&setup.config).await.map_err(LoadError::Configure)?;
        let raw = instance
            .call(|bindings, store| Box::pin(bindings.call_describe(store)))
            .await
            .0
            .map_err(|f| LoadError::Describe(f.to_string()))?;
        let manifest = Manifest::validate(raw)?;
        let grants = match &options.grants {
            None => manifest.grants.clone(),
            Some(narrowed) => {
                manifest
                    .grants
                    .check_within(narrowed)
                    .map_err(|detail| LoadError::Widening { policy: manifest.name.clone(), detail })?;
                narrowed.clone()
            }
        };
        let (grants, overlapping) = grants
            .for_policy(&manifest.name, self.reserved.clone())
            .map_err(|detail| LoadError::Reserved { policy: manifest.name.clone(), detail })?;
        for (grant, key) in overlapping {
            tracing::warn!(policy = %manifest.name, %grant, example = %key, "the grant also covers the daemon's own keys; those are held back from the policy whatever its grants");
        }
        let name: Arc<str> = Arc::from(manifest.name.as_str());
        // From here on the manifest says what the policy may do, as narrowed
        // (what the key index keeps, say).
        let manifest = Manifest { grants: grants.clone(), ..manifest };
        let grants = Arc::new(grants);
        instance.adopt(name.clone(), grants.clone());
        Ok(LoadedPolicy {
            setup: Setup { label: name, grants, ..setup },
            manifest: Arc::new(manifest),
            instance: Some(instance),
            started: true,
            stats: PolicyStats::default(),
        })
    }
}

/// A policy's error with its text cut to [`MAX_SHOWN`](crate::sandbox::MAX_SHOWN).
fn clipped(mut error: wit::Error) -> wit::Error {
    match &mut error {
        wit::Error::Denied(denial) => {
            clip_owned(&mut denial.target);
            clip_owned(&mut denial.reason);
        }
        wit::Error::BudgetExceeded(text)
        | wit::Error::InvalidArgument(text)
        | wit::Error::Redis(text)
        | wit::Error::Policy(text) => clip_owned(text),
    }
    error
}

/// How to load one policy.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Names the policy in logs until its manifest gives its name (the
    /// file name, say).
    pub label: String,
    /// The policy's config, as JSON text.
    pub config: String,
    pub budgets: Budgets,
    /// The operator's narrowing of the policy's grants: if set, the policy
    /// gets exactly these, and each must lie inside what it asks for.
    pub grants: Option<Grants>,
}

impl Default for LoadOptions {
    fn default() -> LoadOptions {
        LoadOptions { label: "policy".into(), config: "{}".into(), budgets: Budgets::default(), grants: None }
    }
}

/// A component's SHA-256: what tells versions of a policy file apart, and
/// names its compiled code in the cache.
pub type ContentHash = [u8; 32];

pub fn content_hash(bytes: &[u8]) -> ContentHash {
    Sha256::digest(bytes).into()
}

/// Write a compiled artifact atomically (temporary file, then rename).
fn store_artifact(dir: &Path, path: &Path, component: &Component) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let bytes = component.serialize().map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Tell the kinds of bad input apart before handing bytes to the compiler,
/// whose messages for them are less direct.
fn sniff(bytes: &[u8]) -> Result<(), LoadError> {
    const CORE: [u8; 4] = [1, 0, 0, 0];
    const COMPONENT: [u8; 4] = [0x0d, 0, 1, 0];
    if bytes.is_empty() {
        return Err(LoadError::Empty);
    }
    // A copy cut inside the header.
    let header = [b'\0', b'a', b's', b'm', 0x0d, 0, 1, 0];
    if bytes.len() <= 8 && header.starts_with(bytes) {
        return Err(LoadError::Truncated { size: bytes.len(), needed: 9 });
    }
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadError::NotWasm);
    }
    match [bytes[4], bytes[5], bytes[6], bytes[7]] {
        CORE => Err(LoadError::CoreModule),
        COMPONENT => truncation(bytes).map_or(Ok(()), |needed| Err(LoadError::Truncated { size: bytes.len(), needed })),
        other => Err(LoadError::UnknownVersion(other)),
    }
}

/// If the top-level sections run past the end of `bytes` (a copy cut
/// short), how many bytes they need at least. The compiler would only say
/// `unexpected end-of-file` or that a section range is out of bounds. A
/// size that is not a valid `u32` LEB128 is malformed, not truncated: the
/// compiler reports it.
fn truncation(bytes: &[u8]) -> Option<usize> {
    let mut at = 8;
    while at < bytes.len() {
        at += 1; // the section id
        let mut size: u64 = 0;
        let mut done = false;
        for shift in (0..35).step_by(7) {
            let Some(&byte) = bytes.get(at) else { return Some(at + 1) };
            at += 1;
            size |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                done = true;
                break;
            }
        }
        if !done || size > u64::from(u32::MAX) {
            return None;
        }
        let end = at.saturating_add(usize::try_from(size).unwrap_or(usize::MAX));
        if end > bytes.len() {
            return Some(end);
        }
        at = end;
    }
    None
}

/// What a policy's store holds: WASI's empty context, the memory limiter,
/// and the cachepol imports.
pub struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    api: HostApi,
    stdout: GuestOutput,
    stderr: GuestOutput,
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// Caps a guest's linear memory and remembers when it tried to exceed it,
/// so the failure can be reported as "memory" rather than a generic trap.
struct MemoryLimiter {
    limit: usize,
    exceeded: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
#[error("memory limit of {limit} bytes exceeded (wanted {wanted})")]
struct MemoryExceeded {
    limit: usize,
    wanted: usize,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.exceeded = Some(desired);
            return Err(MemoryExceeded { limit: self.limit, wanted: desired }.into());
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// Everything needed to (re-)create a policy's instance.
#[derive(Clone)]
struct Setup {
    pre: Pre,
    label: Arc<str>,
    config: String,
    backend: Arc<dyn Backend>,
    budgets: Budgets,
    grants: Arc<Grants>,
    /// The policy's Redis-work meter: every lane's instance shares it.
    meter: Arc<WorkMeter>,
}

impl Setup {
    async fn instantiate(&self) -> Result<Instance, String> {
        let log = LogAllowance::new(self.budgets.log_lines);
        let stdout = GuestOutput::new(self.label.clone(), "stdout", log.clone());
        let stderr = GuestOutput::new(self.label.clone(), "stderr", log.clone());
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = StoreState {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter { limit: self.budgets.memory_bytes, exceeded: None },
            api: HostApi::new(
                self.label.clone(),
                self.grants.clone(),
                self.backend.clone(),
                self.budgets.clone(),
                log,
                self.meter.clone(),
            ),
            stdout,
            stderr,
        };
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limiter);
        store.fuel_async_yield_interval(Some(FUEL_YIELD_INTERVAL)).map_err(|e| format!("{e:#}"))?;
        store.set_fuel(self.budgets.fuel).map_err(|e| format!("{e:#}"))?;
        let bindings = self.pre.instantiate(&mut store).await.map_err(|e| {
            if let Some(wanted) = store.data().limiter.exceeded {
                format!("memory limit of {} bytes exceeded (wanted {wanted})", self.budgets.memory_bytes)
            } else {
                format!("{e:#}")
            }
        })?;
        Ok(Instance { store, bindings, budgets: self.budgets.clone() })
    }
}

/// One live instance of a policy.
struct Instance {
    store: Store<StoreState>,
    bindings: Bindings,
    budgets: Budgets,
}

type CallFuture<'a, R> = std::pin::Pin<Box<dyn std::future::Future<Output = wasmtime::Result<R>> + Send + 'a>>;

impl Instance {
    /// Run one export under the budgets; returns its result and what the
    /// call did through the host API (also when it failed: what a policy
    /// deleted before it trapped was still deleted).
    async fn call<R>(
        &mut self,
        f: impl for<'a> FnOnce(&'a Bindings, &'a mut Store<StoreState>) -> CallFuture<'a, R>,
    ) -> (Result<R, CallFailure>, CallState) {
        self.call_for(1, f).await
    }

    /// [`Instance::call`] for `events` events at once: the per-event
    /// budgets (fuel, host calls, keys, wall time) scale with it. The
    /// call's queued writes are sent when it returns, within its time.
    async fn call_for<R>(
        &mut self,
        events: u32,
        f: impl for<'a> FnOnce(&'a Bindings, &'a mut Store<StoreState>) -> CallFuture<'a, R>,
    ) -> (Result<R, CallFailure>, CallState) {
        let events = events.max(1);
        let fuel = self.budgets.fuel.saturating_mul(u64::from(events));
        if let Err(e) = self.store.set_fuel(fuel) {
            return (Err(CallFailure::Trap(format!("{e:#}"))), CallState::default());
        }
        let state = self.store.data_mut();
        state.api.begin_call(events);
        state.limiter.exceeded = None;
        state.stderr.take_recent();
        // A batch's wall time grows with it, up to a minute (or one
        // event's, if longer): barriers and shutdown wait for it.
        let wall_time =
            self.budgets.wall_time.saturating_mul(events).min(self.budgets.wall_time.max(Duration::from_secs(60)));
        let (bindings, store) = (&self.bindings, &mut self.store);
        let outcome = tokio::time::timeout(wall_time, async move {
            let outcome = f(bindings, &mut *store).await;
            // What the policy queued was accepted: it is sent even if the
            // policy trapped afterwards, as a write it waited for would
            // have been.
            let flushed = store.data_mut().api.flush().await;
            (outcome, flushed)
        })
        .await;
        let call = self.store.data_mut().api.take_call();
        let result = match outcome {
            Err(_) => Err(CallFailure::Timeout(wall_time)),
            Ok((Err(e), _)) => Err(self.classify(e)),
            Ok((Ok(_), Err(e))) => Err(CallFailure::Queued(wit::Shown(&e).to_string())),
            Ok((Ok(value), Ok(()))) => match (&call.budget_exceeded, &call.queued_failed) {
                (Some(what), _) => Err(CallFailure::Budget(what.clone())),
                // Sent before a later request, failed, and the policy went on.
                (None, Some(why)) => Err(CallFailure::Queued(why.clone())),
                (None, None) => Ok(value),
            },
        };
        (result, call)
    }

    fn classify(&mut self, error: wasmtime::Error) -> CallFailure {
        tracing::debug!(error = %format_args!("{error:#}"), "policy trap");
        let state = self.store.data();
        if let Some(wanted) = state.limiter.exceeded {
            return CallFailure::Memory { wanted, limit: state.limiter.limit };
        }
        match error.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => CallFailure::OutOfFuel(self.budgets.fuel),
            Some(trap) => match panic_message(&state.stderr.take_recent()) {
                Some(message) => CallFailure::Panic(message),
                None => CallFailure::Trap(trap.to_string()),
            },
            None => CallFailure::Trap(format!("{error:#}")),
        }
    }

    async fn configure(&mut self, config: &str) -> Result<(), String> {
        let config = config.to_owned();
        self.call(move |bindings, store| Box::pin(async move { bindings.call_configure(store, &config).await }))
            .await
            .0
            .map_err(|f| clip(&f.to_string()).into_owned())?
    }

    /// The manifest is known: tag output and grant the policy its keys.
    fn adopt(&mut self, name: Arc<str>, grants: Arc<Grants>) {
        let state = self.store.data_mut();
        state.stdout.rename(name.clone());
        state.stderr.rename(name.clone());
        state.api.set_grants(name, grants);
    }
}

/// Counters kept per loaded policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyStats {
    pub calls: u64,
    pub failures: u64,
    pub consecutive_failures: u64,
    pub restarts: u64,
    pub denials: u64,
}

/// The report of one `handle` call.
#[derive(Debug, Clone)]
pub struct CallReport {
    pub result: Result<wit::Outcome, CallFailure>,
    /// Effects, denials and budget use recorded by the host API (for a
    /// trapped call: whatever happened before the trap).
    pub call: CallState,
    pub elapsed: Duration,
}

/// What one call delivers.
enum Delivery {
    One(wit::Event),
    Keys(Vec<wit::KeyEvent>),
}

/// A batch's results as one: its first error, or what the events deferred
/// and the first note.
fn merge(results: Vec<Result<wit::Outcome, wit::Error>>) -> Result<wit::Outcome, wit::Error> {
    let mut merged = wit::Outcome { deferred: 0, note: None };
    for result in results {
        let outcome = result?;
        merged.deferred = merged.deferred.saturating_add(outcome.deferred);
        merged.note = merged.note.or(outcome.note);
    }
    Ok(merged)
}

/// A configured policy with a validated manifest.
pub struct LoadedPolicy {
    setup: Setup,
    manifest: Arc<Manifest>,
    instance: Option<Instance>,
    /// An instance was created at least once: a missing one is then a
    /// restart after a failure, not a lane's first event.
    started: bool,
    stats: PolicyStats,
}

impl LoadedPolicy {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The grants in force: the manifest's, or the operator's narrowing.
    pub fn grants(&self) -> &Grants {
        &self.setup.grants
    }

    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    pub fn stats(&self) -> PolicyStats {
        self.stats
    }

    /// Built against contract 0.1.0 (written for one instance, no
    /// batches).
    pub fn is_v0_1(&self) -> bool {
        matches!(self.setup.pre, Pre::V0_1(_))
    }

    /// Another instance of the same version, writing through `backend`:
    /// a lane, which handles its share of the events concurrently with the
    /// others. Its instance is created (and configured) on its first event,
    /// so a lane that never gets one costs nothing.
    pub fn lane(&self, backend: Arc<dyn Backend>) -> LoadedPolicy {
        LoadedPolicy {
            setup: Setup { backend, ..self.setup.clone() },
            manifest: self.manifest.clone(),
            instance: None,
            started: false,
            stats: PolicyStats::default(),
        }
    }

    /// Drop the live instance: the next event gets a fresh one, configured
    /// again (the `reload` failure policy).
    pub fn reset_instance(&mut self) {
        self.instance = None;
    }

    /// Point the policy at another backend (the next instance uses it; the
    /// live one is re-created).
    pub fn rebind_backend(&mut self, backend: Arc<dyn Backend>) {
        self.setup.backend = backend;
        if let Some(instance) = &mut self.instance {
            instance.store.data_mut().api.set_backend(self.setup.backend.clone());
        }
    }

    /// Deliver one event. Never panics and never propagates a guest fault:
    /// the report says what happened.
    pub async fn handle(&mut self, event_id: &str, event: &wit::Event) -> CallReport {
        self.deliver(event_id, Delivery::One(event.clone()), None).await
    }

    /// Deliver one event as a slice of a sliced call (a sweep or a hook
    /// whose walks may not fit one call: [`crate::store::walks`]): its bulk
    /// operations go on from `book`'s positions and stop at the slice's
    /// allowance. The report's `call.walks` says how far they got (`None`
    /// if the call could not start).
    pub async fn handle_slice(&mut self, event_id: &str, event: &wit::Event, book: WalkBook) -> CallReport {
        self.deliver(event_id, Delivery::One(event.clone()), Some(book)).await
    }

    /// Deliver keyspace events in one call (`handle-keys`; one `handle`
    /// after another for a 0.1.0 policy), budgets scaled to their number.
    /// The report sums the batch: its effects, and its first failure.
    pub async fn handle_keys(&mut self, event_id: &str, events: Vec<wit::KeyEvent>) -> CallReport {
        self.deliver(event_id, Delivery::Keys(events), None).await
    }

    async fn deliver(&mut self, event_id: &str, delivery: Delivery, walks: Option<WalkBook>) -> CallReport {
        // Debug level: at 100k calls a second, recording a span per call
        // would cost more than the call; lines logged here name the policy
        // and the event themselves.
        let span = tracing::debug_span!("policy_call", policy = %self.manifest.name, event = %event_id);
        let started = Instant::now();
        let (mut result, mut call) = self.handle_inner(delivery, walks).instrument(span.clone()).await;
        if let Some(book) = &mut call.walks {
            book.end_slice(result.is_ok());
            // The policy stopped on a walk cut short for the next slice
            // (the error it was given): a slice done, not a failure.
            if call.slice_cut && matches!(result, Err(CallFailure::Returned(_))) {
                result = Ok(wit::Outcome { deferred: 0, note: Some("its walks go on in the next slice".into()) });
            }
        }
        let report = CallReport { result, call, elapsed: started.elapsed() };
        self.stats.calls += 1;
        self.stats.denials += u64::from(report.call.denials_total);
        let _entered = span.enter();
        match &report.result {
            Ok(_) => self.stats.consecutive_failures = 0,
            Err(failure) => {
                self.stats.failures += 1;
                self.stats.consecutive_failures += 1;
                tracing::warn!(error = %failure, policy = %self.manifest.name, event = %event_id, "policy call failed");
            }
        }
        report
    }

    async fn handle_inner(
        &mut self,
        delivery: Delivery,
        walks: Option<WalkBook>,
    ) -> (Result<wit::Outcome, CallFailure>, CallState) {
        let mut instance = match self.instance.take() {
            Some(instance) => instance,
            None => match self.restart().await {
                Ok(instance) => instance,
                Err(failure) => return (Err(failure), CallState::default()),
            },
        };
        if let Some(book) = walks {
            instance.store.data_mut().api.slice_walks(book);
        }
        let events = match &delivery {
            Delivery::One(_) => 1,
            Delivery::Keys(events) => u32::try_from(events.len()).unwrap_or(u32::MAX),
        };
        let (result, call) = instance
            .call_for(events, move |bindings, store| {
                Box::pin(async move {
                    match delivery {
                        Delivery::One(event) => bindings.call_handle(store, &event).await,
                        Delivery::Keys(events) => bindings.call_handle_keys(store, &events).await.map(merge),
                    }
                })
            })
            .await;
        // What the policy says is cut to a size a log line, `/status` and a
        // dead-letter reason can carry.
        let result = match result {
            Ok(Ok(mut outcome)) => {
                if let Some(note) = outcome.note.as_mut() {
                    clip_owned(note);
                }
                Ok(outcome)
            }
            Ok(Err(returned)) => Err(CallFailure::Returned(clipped(returned))),
            Err(failure) => Err(failure),
        };
        if !result.as_ref().is_err_and(CallFailure::kills_instance) {
            self.instance = Some(instance);
        }
        (result, call)
    }

    /// A fresh instance after a trap (or a lane's first), configured as the
    /// first one was.
    async fn restart(&mut self) -> Result<Instance, CallFailure> {
        if std::mem::replace(&mut self.started, true) {
            self.stats.restarts += 1;
            tracing::info!(policy = %self.manifest.name, "re-creating the policy instance after a failure");
        }
        let mut instance = self.setup.instantiate().await.map_err(CallFailure::Restart)?;
        instance.configure(&self.setup.config).await.map_err(CallFailure::Restart)?;
        instance.adopt(self.setup.label.clone(), self.setup.grants.clone());
        Ok(instance)
    }
}
