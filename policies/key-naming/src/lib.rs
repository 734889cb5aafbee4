//! key-naming: keep the keyspace to its naming rules, and drop the keys of
//! cache versions nobody reads any more.
//!
//! The runbooks it replaces: "our Django cache keys are `bisk:<version>:*`;
//! after bumping VERSION, delete the old version's keys and the legacy
//! unprefixed `:1:*` ones", and "keys are
//! `{service}:{feature}:{tenant}:{entity}`, with a known service".
//!
//! Rules come from config, each with a mode for keys that break it:
//! `report` (a warning naming the key and the rule, counted), `expire` (a
//! short TTL, never lengthening one), or `delete`.
//! - `versioned`: keys under `prefix:` must be `prefix:<version>:<key>`
//!   with the current version or a newer one (a rolling deploy may write the
//!   next version first); keys matching `legacy` patterns break it too.
//!   When the version goes up (a deploy hook tagged `version=N`, or a higher
//!   `version` in config, seen at the next sweep) the older versions' keys
//!   and the legacy keys are cleared in bulk with `delete-matching` (or
//!   `expire-matching`). The version reached and the last one cleaned are
//!   kept in Redis under the policy's own prefix, so a restart neither
//!   forgets a bump nor clears twice. Versions only go up; to roll back,
//!   delete `cachepol-state:key-naming:version:<prefix>`.
//! - `schema`: keys matching `keys` must have the schema's segments, with
//!   literal segments equal and placeholder segments non-empty and, where
//!   `allowed` lists values for a placeholder, one of them.
//!
//! Keys matching `exempt` (the daemon's own `cachepol:*` and `{cachepol}:*`, and every
//! policy's state under `cachepol-state:*`, by default) are
//! never judged.

use std::collections::BTreeMap;

use cachepol_guest_sdk::prelude::*;
use cachepol_guest_sdk::{info, warn};

/// What to do with a key that breaks a rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Log it and count it.
    #[default]
    Report,
    /// Give it a short TTL (`expire_secs`).
    Expire,
    /// Delete it.
    Delete,
}

/// Django-style `prefix:version:key`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Versioned {
    pub prefix: String,
    pub version: u32,
    /// The first version ever used (Django starts at 1).
    #[serde(default = "one")]
    pub first_version: u32,
    /// Globs of keys from before the prefix, cleared with old versions.
    #[serde(default)]
    pub legacy: Vec<String>,
    #[serde(default)]
    pub mode: Mode,
}

fn one() -> u32 {
    1
}

/// Segment schema such as `{service}:{feature}:{tenant}:{entity}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    /// Keys the schema applies to.
    #[serde(default = "every_key")]
    pub keys: String,
    pub schema: String,
    /// Allowed values per placeholder (`service = ["quiz", "api"]`).
    #[serde(default)]
    pub allowed: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub mode: Mode,
}

fn every_key() -> String {
    "*".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum RuleConfig {
    Versioned(Versioned),
    Schema(Schema),
}

/// Operator settings; every field has the runbook's default.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub rules: Vec<RuleConfig>,
    /// Keys never judged.
    pub exempt: Vec<String>,
    /// The TTL `expire` mode gives, in seconds.
    pub expire_secs: u64,
    /// The deploy-hook tag that announces a new version.
    pub version_tag: String,
    /// Services whose deploy hooks are read (`*`: all).
    pub services: Vec<String>,
    /// Where the policy keeps its own state.
    pub state_prefix: String,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            rules: vec![RuleConfig::Versioned(Versioned {
                prefix: "bisk".into(),
                version: 1,
                first_version: 1,
                legacy: vec![":1:*".into()],
                mode: Mode::Report,
            })],
            exempt: vec!["cachepol:*".into(), "{cachepol}:*".into(), "cachepol-state:*".into()],
            expire_secs: 60,
            version_tag: "version".into(),
            services: vec!["*".into()],
            state_prefix: "cachepol-state:key-naming:".into(),
        }
    }
}

/// Where a versioned rule stands, read from Redis on first use.
#[derive(Debug, Clone, Copy)]
struct Progress {
    current: u32,
    /// The version whose predecessors were last cleared, if any.
    cleaned: Option<u32>,
}

struct Rule {
    config: RuleConfig,
    /// The keys the rule judges.
    scope: Vec<Glob>,
    violations: u64,
    progress: Option<Progress>,
}

impl Rule {
    fn new(config: RuleConfig) -> Result<Rule, String> {
        let scope = match &config {
            RuleConfig::Versioned(v) => {
                if v.prefix.is_empty() || v.prefix.contains(':') {
                    return Err(format!("versioned prefix `{}` must be non-empty and without `:`", v.prefix));
                }
                if v.first_version > v.version {
                    return Err(format!("`{}`: first_version is after version", v.prefix));
                }
                let mut scope = vec![format!("{}:*", glob::escape(&v.prefix))];
                scope.extend(v.legacy.iter().cloned());
                scope
            }
            RuleConfig::Schema(s) => {
                let names: Vec<&str> = s.schema.split(':').filter_map(placeholder).collect();
                if let Some(unknown) = s.allowed.keys().find(|k| !names.contains(&k.as_str())) {
                    return Err(format!("`allowed` names `{unknown}`, which schema `{}` does not have", s.schema));
                }
                vec![s.keys.clone()]
            }
        };
        let scope: Vec<Glob> = scope.iter().map(|p| Glob::new(p)).collect();
        if let Some(problem) = scope.iter().flat_map(Glob::lint).next() {
            return Err(problem);
        }
        Ok(Rule { config, scope, violations: 0, progress: None })
    }

    fn mode(&self) -> Mode {
        match &self.config {
            RuleConfig::Versioned(v) => v.mode,
            RuleConfig::Schema(s) => s.mode,
        }
    }

    fn name(&self) -> String {
        match &self.config {
            RuleConfig::Versioned(v) => format!("{}:<version>:<key>", v.prefix),
            RuleConfig::Schema(s) => s.schema.clone(),
        }
    }

    /// Why `key` breaks this rule, if it does.
    fn judge(&self, key: &str) -> Option<String> {
        match &self.config {
            RuleConfig::Versioned(v) => {
                if self.scope[1..].iter().any(|g| g.matches(key)) {
                    return Some("a legacy key".into());
                }
                let current = self.progress.map_or(v.version, |p| p.current);
                match keys::parse_versioned(key) {
                    Some(k) if k.prefix == v.prefix && k.version >= current => None,
                    Some(k) if k.prefix == v.prefix => Some(format!("version {} is older than {current}", k.version)),
                    _ => Some("no version segment".into()),
                }
            }
            RuleConfig::Schema(s) => {
                let want: Vec<&str> = s.schema.split(':').collect();
                let have: Vec<&str> = keys::segments(key).collect();
                if want.len() != have.len() {
                    return Some(format!("{} segments instead of {}", have.len(), want.len()));
                }
                want.iter().zip(&have).find_map(|(w, h)| match placeholder(w) {
                    _ if h.is_empty() => Some(format!("empty `{w}` segment")),
                    None if w != h => Some(format!("`{h}` where `{w}` belongs")),
                    Some(name) if s.allowed.get(name).is_some_and(|ok| !ok.iter().any(|v| v == h)) => {
                        Some(format!("unknown {name} `{h}`"))
                    }
                    _ => None,
                })
            }
        }
    }
}

/// `name` for a `{name}` segment.
fn placeholder(segment: &str) -> Option<&str> {
    segment.strip_prefix('{')?.strip_suffix('}')
}

pub struct KeyNaming {
    rules: Vec<Rule>,
    exempt: Vec<Glob>,
    config: Config,
}

impl KeyNaming {
    fn state_key(&self, what: &str, prefix: &str) -> String {
        format!("{}{what}:{prefix}", self.config.state_prefix)
    }

    /// Read where each versioned rule stands, once per instance.
    fn load_progress(&mut self) -> Result<(), Error> {
        for i in 0..self.rules.len() {
            let RuleConfig::Versioned(v) = &self.rules[i].config else { continue };
            if self.rules[i].progress.is_some() {
                continue;
            }
            let read = |what: &str| -> Result<Option<u32>, Error> {
                Ok(redis::get_string(&self.state_key(what, &v.prefix))?.and_then(|s| s.parse().ok()))
            };
            let current = read("version")?.unwrap_or(0).max(v.version);
            let cleaned = read("cleaned")?;
            self.rules[i].progress = Some(Progress { current, cleaned });
        }
        Ok(())
    }

    /// Clear the versions before the current one (those not cleared yet)
    /// and the legacy keys. Returns a note, if anything was due.
    fn clean_old_versions(&mut self, i: usize) -> Result<Option<String>, Error> {
        let RuleConfig::Versioned(v) = self.rules[i].config.clone() else { return Ok(None) };
        let progress = self.rules[i].progress.expect("loaded");
        if progress.cleaned.is_some_and(|c| c >= progress.current) {
            return Ok(None);
        }
        // At most the last 100 versions: older ones went long ago, and the
        // call budget per event is finite.
        let from = progress.cleaned.unwrap_or(v.first_version).max(progress.current.saturating_sub(100));
        let prefix = glob::escape(&v.prefix);
        let mut patterns: Vec<String> = (from..progress.current).map(|old| format!("{prefix}:{old}:*")).collect();
        patterns.extend(v.legacy.iter().cloned());
        let ttl_ms = self.config.expire_secs.saturating_mul(1000);
        let mut cleared = 0;
        for pattern in &patterns {
            cleared += match v.mode {
                Mode::Delete => redis::delete_matching(pattern)?,
                Mode::Expire => redis::expire_matching(pattern, ttl_ms, false)?,
                Mode::Report => 0,
            };
        }
        let list = patterns.join(", ");
        if v.mode == Mode::Report {
            info!("`{}` is at version {}: report mode leaves {list} in place", v.prefix, progress.current);
            return Ok(Some(format!("report only: {list}")));
        }
        redis::set_string(&self.state_key("cleaned", &v.prefix), &progress.current.to_string(), None)?;
        self.rules[i].progress = Some(Progress { cleaned: Some(progress.current), ..progress });
        info!("`{}` is at version {}: {cleared} keys of {list} cleared", v.prefix, progress.current);
        Ok(Some(format!("{cleared} cleared")))
    }

    /// What a rule's mode does to a key that breaks it.
    fn enforce(&self, mode: Mode, key: &str) -> Result<(), Error> {
        match mode {
            Mode::Report => {}
            Mode::Expire => {
                let ttl = std::time::Duration::from_secs(self.config.expire_secs);
                redis::expire_in(key, ttl, ExpireCondition::IfShorter)?;
            }
            Mode::Delete => {
                redis::delete(key)?;
            }
        }
        Ok(())
    }
}

impl Policy for KeyNaming {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.rules.is_empty() {
            return Err("`rules` is empty: nothing to enforce".into());
        }
        if config.expire_secs == 0 {
            return Err("`expire_secs` must be at least 1".into());
        }
        let rules = config.rules.iter().cloned().map(Rule::new).collect::<Result<_, _>>()?;
        let exempt = config.exempt.iter().map(|p| Glob::new(p)).collect();
        Ok(KeyNaming { rules, exempt, config })
    }

    fn manifest(&self) -> Manifest {
        let services: Vec<&str> = self.config.services.iter().map(String::as_str).collect();
        let state = format!("{}*", glob::escape(&self.config.state_prefix));
        let mut manifest = Manifest::new("key-naming", env!("CARGO_PKG_VERSION"))
            .description("report or remove keys that break the naming rules; clear old cache versions")
            .on_deploys(&services)
            .grant(&state, KeyOps::READ | KeyOps::WRITE);
        for rule in &self.rules {
            let ops = KeyOps::READ
                | match rule.mode() {
                    Mode::Report => KeyOps::empty(),
                    Mode::Expire => KeyOps::EXPIRE,
                    Mode::Delete => KeyOps::DELETE,
                };
            let scope: Vec<&str> = rule.scope.iter().map(Glob::as_str).collect();
            manifest = manifest.on_keys(KeyEvent::WRITE_OPS, &scope);
            for pattern in scope {
                manifest = manifest.grant(pattern, ops);
            }
        }
        manifest
    }

    fn on_key(&mut self, event: KeyEvent) -> Result<Outcome, Error> {
        let key = event.key.as_str();
        if self.exempt.iter().any(|g| g.matches(key)) {
            return Ok(Outcome::done());
        }
        self.load_progress()?;
        let mut notes = Vec::new();
        for i in 0..self.rules.len() {
            let rule = &self.rules[i];
            let Some(reason) = rule.scope.iter().any(|g| g.matches(key)).then(|| rule.judge(key)).flatten() else {
                continue;
            };
            let (name, mode) = (rule.name(), rule.mode());
            self.rules[i].violations += 1;
            let count = self.rules[i].violations;
            warn!("`{key}` breaks `{name}`: {reason} ({mode:?}; {count} so far)");
            notes.push(format!("`{key}` breaks `{name}`: {reason}"));
            self.enforce(mode, key)?;
            if mode == Mode::Delete {
                break;
            }
        }
        Ok(Outcome::done().with_note(notes.join("; ")))
    }

    fn on_deploy(&mut self, event: DeployEvent) -> Result<Outcome, Error> {
        let Some(tag) = event.tag(&self.config.version_tag) else { return Ok(Outcome::done()) };
        let Ok(announced) = tag.parse::<u32>() else {
            warn!("deploy {}: `{}={tag}` is not a version number; ignored", event.id, self.config.version_tag);
            return Ok(Outcome::done().with_note(format!("bad version tag `{tag}`")));
        };
        self.load_progress()?;
        let mut notes = Vec::new();
        for i in 0..self.rules.len() {
            let (RuleConfig::Versioned(v), Some(progress)) = (&self.rules[i].config, self.rules[i].progress) else {
                continue;
            };
            if announced <= progress.current {
                info!(
                    "`{}` is already at version {}; `version={announced}` changes nothing",
                    v.prefix, progress.current
                );
                continue;
            }
            redis::set_string(&self.state_key("version", &v.prefix), &announced.to_string(), None)?;
            self.rules[i].progress = Some(Progress { current: announced, ..progress });
            notes.extend(self.clean_old_versions(i)?);
        }
        Ok(Outcome::done().with_note(notes.join("; ")))
    }

    fn on_sweep(&mut self, _reason: SweepReason) -> Result<Outcome, Error> {
        self.load_progress()?;
        let mut notes = Vec::new();
        for i in 0..self.rules.len() {
            notes.extend(self.clean_old_versions(i)?);
        }
        Ok(Outcome::done().with_note(notes.join("; ")))
    }
}

export_policy!(KeyNaming);
