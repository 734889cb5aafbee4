//! Hot reload: watch the policies directory and apply what changes.
//!
//! Ops change behaviour by dropping `.wasm` files into the directory. The
//! watcher (`notify`) reports changes; they are debounced per file (an
//! in-place copy produces a burst of writes) and then applied one at a time
//! through the [`Registry`]: a new or changed file is prepared off the event
//! path and swapped in atomically, a deleted file unloads its policy, and a
//! file that fails any step is rejected with one line saying which step and
//! why, while the running version keeps serving.
//!
//! A file caught mid-copy fails to compile; if it is still changing a moment
//! later, the failure is not reported: the end of the write triggers another
//! attempt. The recommended way to deploy is still atomic:
//! `cp new.wasm policies/.name.tmp && mv policies/.name.tmp policies/name.wasm`
//! (hidden files are ignored, and the rename is a single event).
//!
//! Only top-level `*.wasm` files count. SIGHUP re-reads the config file
//! (when there is one) and re-scans the whole directory; `--no-watch` turns
//! the watcher off for immutable deployments (SIGHUP still works). The new
//! config is validated whole before anything changes: an invalid file is
//! logged with why, and the running config stays. A valid one applies the
//! policy settings (mode, config, grant narrowing, budgets, failure policy,
//! lanes): each policy whose settings changed is reloaded, with the same
//! swap and rejection rules as a new file. Settings a running daemon cannot
//! change (the Redis URL, stream names, the admin address, ...) are named
//! in the log as waiting for a restart.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::dispatch::registry::{Registry, RejectError};
use crate::metrics::{Metrics, metrics};
use crate::sandbox::runtime::{LoadError, content_hash};

/// Quiet time after a file's last change before it is loaded.
pub const DEBOUNCE: Duration = Duration::from_millis(40);
/// How long to watch a file that failed to compile for further writes.
const SETTLE: Duration = Duration::from_millis(200);

/// Whether `path` is a policy file in `dir`: `dir/*.wasm`, not hidden.
pub fn is_policy_file(dir: &Path, path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    path.parent() == Some(dir) && name.ends_with(".wasm") && !name.starts_with('.')
}

/// The policy files in `dir`, sorted.
pub fn policy_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_policy_file(dir, p) && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

fn fingerprint(path: &Path) -> Option<(u64, SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

/// Failures a half-written file produces.
fn maybe_partial(e: &RejectError) -> bool {
    matches!(
        e,
        RejectError::Load(
            LoadError::Empty
                | LoadError::Truncated { .. }
                | LoadError::NotWasm
                | LoadError::UnknownVersion(_)
                | LoadError::Compile(_)
                | LoadError::Read { .. }
        )
    )
}

/// Owns the registry and applies changes to the policies directory.
pub struct Reloader {
    pub registry: Registry,
    dir: PathBuf,
    /// Files rejected because another file provides the same policy: tried
    /// again when a file is removed (the other may have been it).
    duplicates: BTreeSet<PathBuf>,
    /// Files whose last version was rejected while an earlier one kept
    /// serving: when the file is put back as that one, the log says so.
    rejected: BTreeSet<PathBuf>,
    /// The directory's watcher, once armed, and where it reports.
    watcher: Option<(notify::RecommendedWatcher, Events)>,
    /// Reads the config again on SIGHUP (none without a config file).
    config_source: Option<ConfigSource>,
}

/// Reads the daemon's config again, flags and environment applied as at
/// start, or says why it cannot.
pub type ConfigSource = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;

type Events = mpsc::UnboundedReceiver<notify::Result<notify::Event>>;

impl Reloader {
    /// `dir` is made absolute so that watcher paths compare equal.
    pub fn new(registry: Registry, dir: &Path) -> std::io::Result<Reloader> {
        Ok(Reloader {
            registry,
            dir: std::fs::canonicalize(dir)?,
            duplicates: BTreeSet::new(),
            rejected: BTreeSet::new(),
            watcher: None,
            config_source: None,
        })
    }

    /// Re-read the config with `source` on SIGHUP.
    pub fn reload_config_with(&mut self, source: ConfigSource) {
        self.config_source = Some(source);
    }

    /// SIGHUP: take the config file's policy settings if it is valid, then
    /// bring every policy in line with the directory and the settings.
    async fn hangup(&mut self) {
        if let Some(source) = &self.config_source {
            match source() {
                Ok(new) => {
                    let waiting = self.registry.config().restart_only_changes(&new);
                    if !waiting.is_empty() {
                        warn!(settings = %waiting.join(" "), "SIGHUP: these settings changed but take effect only at the next start");
                    }
                    let applied = self.registry.config().reloaded(&new);
                    self.registry.set_config(applied);
                    info!(
                        "SIGHUP: config re-read; applying the policy settings and re-scanning the policies directory"
                    );
                }
                Err(why) => {
                    error!(error = %why, "SIGHUP: the config file is invalid; the running config stays (fix the file and send SIGHUP again)");
                    Metrics::count(&metrics().reloads, "config_rejected");
                }
            }
        } else {
            info!("SIGHUP: re-scanning the policies directory");
        }
        let _ = self.sync_all().await;
        // Each policy is reloaded on its own: one whose new settings are
        // refused keeps running with its old ones (the refusal is logged
        // above), the others move on.
        let behind = self.registry.behind_config();
        if !behind.is_empty() {
            warn!(policies = %behind.join(" "), "SIGHUP: these policies keep their previous settings: their reload under the new ones was refused (see above); fix the config and send SIGHUP again");
        }
    }

    /// Start watching the directory. Called before the first
    /// [`Reloader::sync_all`], so that a file changed while that load runs
    /// is reported too; [`Reloader::run`] applies what it reports.
    pub fn watch(&mut self) {
        let (tx, rx) = mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |event| {
            let _ = tx.send(event);
        })
        .and_then(|mut w| w.watch(&self.dir, RecursiveMode::NonRecursive).map(|_| w));
        match watcher {
            Ok(w) => {
                info!(dir = %self.dir.display(), "watching for policy changes");
                self.watcher = Some((w, rx));
            }
            Err(e) => {
                error!(dir = %self.dir.display(), error = %e, "cannot watch the policies directory; use SIGHUP to reload")
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bring the registry in line with the whole directory: load new and
    /// changed files, unload deleted ones. Returns the first rejection that
    /// the operator's config caused (a start-up error).
    pub async fn sync_all(&mut self) -> Result<(), RejectError> {
        let files = policy_files(&self.dir).unwrap_or_else(|e| {
            error!(dir = %self.dir.display(), error = %e, "cannot list the policies directory");
            Vec::new()
        });
        let mut widening = None;
        for path in &files {
            if let Err(e) = self.sync_file(path).await
                && e.is_widening()
                && widening.is_none()
            {
                widening = Some(e);
            }
        }
        for gone in self.registry.files().into_iter().filter(|p| !files.contains(p)) {
            self.unload(&gone).await;
        }
        widening.map_or(Ok(()), Err)
    }

    /// Unload a deleted file's policy, then retry the files that were
    /// rejected as duplicates: one of them may provide it now.
    async fn unload(&mut self, path: &Path) {
        self.rejected.remove(path);
        if self.registry.remove(path).is_some() {
            for other in std::mem::take(&mut self.duplicates) {
                // Boxed: loading may find its file gone and unload in turn.
                let _ = Box::pin(self.load(&other)).await;
            }
        }
    }

    /// Apply the current state of one file. Rejections are logged here;
    /// the error is returned for callers that care about its kind.
    pub async fn sync_file(&mut self, path: &Path) -> Result<(), RejectError> {
        if path.exists() {
            self.load(path).await
        } else {
            self.unload(path).await;
            Ok(())
        }
    }

    async fn load(&mut self, path: &Path) -> Result<(), RejectError> {
        self.duplicates.remove(path);
        let before = fingerprint(path);
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.unload(path).await;
                return Ok(());
            }
            Err(e) => {
                let e = RejectError::Load(LoadError::Read { path: path.display().to_string(), error: e });
                error!(file = %path.display(), error = %e, "policy rejected");
                return Err(e);
            }
        };
        let hash = content_hash(&bytes);
        if self.registry.is_current(path, &hash) {
            if self.rejected.remove(path) {
                info!(file = %path.display(), "policy file restored to the version that kept serving: it serves on, unchanged");
            } else {
                debug!(file = %path.display(), "unchanged");
            }
            return Ok(());
        }
        match self.registry.prepare(path, &bytes, hash).await {
            Ok(prepared) => {
                self.rejected.remove(path);
                self.registry.commit(prepared);
                Ok(())
            }
            Err(e) => {
                if maybe_partial(&e) {
                    tokio::time::sleep(SETTLE).await;
                    if fingerprint(path) != before {
                        debug!(file = %path.display(), "file still being written; will load it when the write completes");
                        return Err(e);
                    }
                }
                if matches!(e, RejectError::Duplicate { .. }) {
                    self.duplicates.insert(path.to_owned());
                }
                Metrics::count(&metrics().reloads, "rejected");
                let keeps = if self.registry.is_loaded(path) {
                    self.rejected.insert(path.to_owned());
                    "; the running version keeps serving"
                } else {
                    ""
                };
                error!(file = %path.display(), error = %e, "policy rejected{keeps}");
                Err(e)
            }
        }
    }

    /// Apply what the watcher (if armed) and SIGHUP report until
    /// `shutdown`, then hand the registry back.
    pub async fn run(mut self, shutdown: CancellationToken) -> Registry {
        // Without a watcher, a channel nothing is ever sent on: only
        // SIGHUP reloads.
        let (_idle, idle) = mpsc::unbounded_channel();
        let (watcher, mut rx) = match self.watcher.take() {
            Some((w, rx)) => (Some(w), rx),
            None => (None, idle),
        };
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut pending: HashMap<PathBuf, Instant> = HashMap::new();
        loop {
            let due = pending.values().min().map(|t| tokio::time::Instant::from_std(*t + DEBOUNCE));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(event) = rx.recv() => match event {
                    // Opening and reading a file (our own reads too) is
                    // no change; the end of a write is.
                    Ok(event) if matches!(event.kind, EventKind::Access(kind) if kind != AccessKind::Close(AccessMode::Write)) => {}
                    Ok(event) => {
                        for path in event.paths.into_iter().filter(|p| is_policy_file(&self.dir, p)) {
                            pending.insert(path, Instant::now());
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "watcher error; re-scanning the policies directory");
                        let _ = self.sync_all().await;
                    }
                },
                _ = async { tokio::time::sleep_until(due.expect("guarded")).await }, if due.is_some() => {
                    let now = Instant::now();
                    let ready: Vec<PathBuf> =
                        pending.iter().filter(|(_, t)| now >= **t + DEBOUNCE).map(|(p, _)| p.clone()).collect();
                    for path in ready {
                        pending.remove(&path);
                        let _ = self.sync_file(&path).await;
                    }
                }
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    self.hangup().await;
                }
            }
        }
        drop(watcher);
        self.registry
    }
}
