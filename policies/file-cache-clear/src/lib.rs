//! file-cache-clear: when a deploy changes a file, clear the cache built
//! from it; if someone is mid-edit (the file's lock is held), clear once the
//! lock is released.
//!
//! The runbook it replaces: "delete `quiz:*` when `quiz_generator.py` is
//! deployed, `api:*` for `app.py`; if `lock:file:quiz_generator.py` exists,
//! wait until it is gone". Config maps file names (or globs) to the key
//! patterns to clear. A name without `/` is matched against the changed
//! file's base name, one with `/` against the whole path as the hook sent it.
//!
//! Deferred clears are kept in Redis (under the policy's own prefix,
//! `cachepol-state:file-cache-clear:deferred:<lock>`, holding the patterns as JSON)
//! so they survive a daemon restart. They are resolved when the lock key is
//! deleted, expires or is evicted (keyspace events), and on every sweep, for
//! locks that went while nobody was listening. A lock taken again before the
//! clear ran keeps the clear waiting.

use std::collections::{BTreeMap, BTreeSet};

use cachepol_guest_sdk::prelude::*;
use cachepol_guest_sdk::{info, warn};

/// One pattern or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Patterns {
    One(String),
    Many(Vec<String>),
}

impl Patterns {
    fn list(&self) -> &[String] {
        match self {
            Patterns::One(p) => std::slice::from_ref(p),
            Patterns::Many(v) => v,
        }
    }
}

/// Operator settings; every field but `files` has a default.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Changed file (name, path or glob) → key patterns to clear.
    pub files: BTreeMap<String, Patterns>,
    /// The lock that means "being edited": `{file}` is the base name.
    pub lock: String,
    /// Where deferred clears are kept; the policy's own keys.
    pub state_prefix: String,
    /// Services whose deploy hooks are read (`*`: all).
    pub services: Vec<String>,
    /// Also look for released locks this often, in seconds (off by
    /// default: lock events and start/reconnect/gap sweeps cover it).
    pub sweep_every_secs: Option<u32>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            files: BTreeMap::from([
                ("quiz_generator.py".to_owned(), Patterns::One("quiz:*".to_owned())),
                ("app.py".to_owned(), Patterns::One("api:*".to_owned())),
            ]),
            lock: "lock:file:{file}".into(),
            state_prefix: "cachepol-state:file-cache-clear:".into(),
            services: vec!["*".into()],
            sweep_every_secs: None,
        }
    }
}

/// A clear waiting for a lock, as stored in Redis.
#[derive(Debug, Default, serde::Serialize, Deserialize)]
struct Deferred {
    /// Changed files that asked for it, for the log.
    files: BTreeSet<String>,
    patterns: BTreeSet<String>,
}

/// A changed-file matcher and what it clears.
struct Mapping {
    file: Glob,
    /// Match the whole path (the config entry has a `/`), not the base name.
    whole_path: bool,
    patterns: Vec<String>,
}

pub struct FileCacheClear {
    mappings: Vec<Mapping>,
    lock: Template,
    config: Config,
}

fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

impl FileCacheClear {
    fn deferred_key(&self, lock: &str) -> String {
        format!("{}deferred:{lock}", self.config.state_prefix)
    }

    /// The patterns mapped to a changed file.
    fn patterns_for(&self, path: &str) -> BTreeSet<String> {
        let path = path.strip_prefix("./").unwrap_or(path);
        self.mappings
            .iter()
            .filter(|m| m.file.matches(if m.whole_path { path } else { base_name(path) }))
            .flat_map(|m| m.patterns.iter().cloned())
            .collect()
    }

    fn clear(patterns: &BTreeSet<String>) -> Result<u64, Error> {
        let mut deleted = 0;
        for pattern in patterns {
            deleted += redis::delete_matching(pattern)?;
        }
        Ok(deleted)
    }

    /// Remember `patterns` until `lock` is released, merged with what is
    /// already waiting for it.
    fn defer(&self, lock: &str, file: &str, patterns: &BTreeSet<String>) -> Result<(), Error> {
        let key = self.deferred_key(lock);
        let mut waiting = load(&key)?.unwrap_or_default();
        waiting.files.insert(file.to_owned());
        waiting.patterns.extend(patterns.iter().cloned());
        let json = serde_json::to_string(&waiting).map_err(|e| Error::policy(e.to_string()))?;
        redis::set_string(&key, &json, None)
    }

    /// Run the clear waiting for `lock` if the lock is gone. Returns the
    /// number of keys deleted, or `None` if nothing ran.
    fn resolve(&self, lock: &str) -> Result<Option<u64>, Error> {
        let key = self.deferred_key(lock);
        let Some(waiting) = load(&key)? else { return Ok(None) };
        if redis::exists(lock)? {
            return Ok(None);
        }
        let deleted = Self::clear(&waiting.patterns)?;
        redis::delete(&key)?;
        let files: Vec<&str> = waiting.files.iter().map(String::as_str).collect();
        info!("`{lock}` released: cleared {deleted} keys deferred for {}", files.join(", "));
        Ok(Some(deleted))
    }
}

/// A deferral record; a corrupt one is reported and treated as absent
/// rather than blocking every later event.
fn load(key: &str) -> Result<Option<Deferred>, Error> {
    let Some(text) = redis::get_string(key)? else { return Ok(None) };
    match serde_json::from_str(&text) {
        Ok(d) => Ok(Some(d)),
        Err(e) => {
            warn!("ignoring unreadable deferral `{key}`: {e}");
            Ok(None)
        }
    }
}

impl Policy for FileCacheClear {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.files.is_empty() {
            return Err("`files` is empty: no file is mapped to keys".into());
        }
        let lock = Template::parse(&config.lock).map_err(|e| e.to_string())?;
        lock.check_placeholders(&["file"]).map_err(|e| e.to_string())?;
        if lock.placeholders().count() != 1 {
            return Err(format!("`lock` template `{}` must contain `{{file}}` exactly once", config.lock));
        }
        if config.state_prefix.is_empty() {
            return Err("`state_prefix` is empty".into());
        }
        let mut mappings = Vec::new();
        for (file, patterns) in &config.files {
            let patterns = patterns.list().to_vec();
            if patterns.is_empty() {
                return Err(format!("`{file}` maps to no key pattern"));
            }
            for p in &patterns {
                if let Some(problem) = Glob::new(p).lint().into_iter().next() {
                    return Err(format!("`{file}`: {problem}"));
                }
            }
            mappings.push(Mapping { file: Glob::new(file), whole_path: file.contains('/'), patterns });
        }
        Ok(FileCacheClear { mappings, lock, config })
    }

    fn manifest(&self) -> Manifest {
        let services: Vec<&str> = self.config.services.iter().map(String::as_str).collect();
        let locks = self.lock.wildcard();
        let state = format!("{}*", glob::escape(&self.config.state_prefix));
        let mut manifest = Manifest::new("file-cache-clear", env!("CARGO_PKG_VERSION"))
            .description("clear the cache keys built from a deployed file, after its edit lock is released")
            .on_deploys(&services)
            .on_keys(&["del", "expired", "evicted"], &[&locks])
            .grant(&locks, KeyOps::READ)
            .grant(&state, KeyOps::READ | KeyOps::WRITE | KeyOps::DELETE);
        if let Some(secs) = self.config.sweep_every_secs {
            manifest = manifest.sweep_every(secs);
        }
        let patterns: BTreeSet<&str> =
            self.mappings.iter().flat_map(|m| m.patterns.iter().map(String::as_str)).collect();
        for pattern in patterns {
            manifest = manifest.grant(pattern, KeyOps::DELETE);
        }
        manifest
    }

    fn on_deploy(&mut self, event: DeployEvent) -> Result<Outcome, Error> {
        let mut now = BTreeSet::new();
        let mut deferred = 0;
        let mut notes = Vec::new();
        for file in &event.files {
            let patterns = self.patterns_for(file);
            if patterns.is_empty() {
                info!("`{file}` is not mapped to any cache keys");
                continue;
            }
            let lock = self.lock.render_key(&[("file", base_name(file))]).map_err(|e| Error::policy(e.to_string()))?;
            if redis::exists(&lock)? {
                self.defer(&lock, file, &patterns)?;
                info!("`{file}` changed while `{lock}` is held: clear deferred until it is released");
                notes.push(format!("{file}: deferred"));
                deferred += 1;
            } else {
                now.extend(patterns);
            }
        }
        if !now.is_empty() {
            let deleted = Self::clear(&now)?;
            let list: Vec<&str> = now.iter().map(String::as_str).collect();
            info!("deploy {}: cleared {deleted} keys ({})", event.id, list.join(", "));
            notes.push(format!("{deleted} deleted"));
        }
        Ok(Outcome::deferred(deferred).with_note(notes.join(", ")))
    }

    fn on_key(&mut self, event: KeyEvent) -> Result<Outcome, Error> {
        Ok(match self.resolve(&event.key)? {
            Some(deleted) => Outcome::done().with_note(format!("{}: {deleted} deleted", event.key)),
            None => Outcome::done(),
        })
    }

    fn on_sweep(&mut self, _reason: SweepReason) -> Result<Outcome, Error> {
        let prefix = self.deferred_key("");
        let mut resolved = 0;
        let mut waiting = 0;
        // SCAN may return a key twice.
        let keys: BTreeSet<String> = redis::scan_all(&format!("{}*", glob::escape(&prefix)))?.into_iter().collect();
        for key in keys {
            let Some(lock) = key.strip_prefix(&prefix) else { continue };
            match self.resolve(lock)? {
                Some(_) => resolved += 1,
                None => waiting += 1,
            }
        }
        Ok(Outcome::deferred(waiting).with_note(format!("{resolved} deferred clears ran")))
    }
}

export_policy!(FileCacheClear);
