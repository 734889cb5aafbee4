//! The daemon's settings: `cachepol.toml`, overridden by flags and `REDIS_URL`.
//!
//! ```toml
//! redis_url = "redis://127.0.0.1:6379/0"
//! policies_dir = "policies"
//! configure_notifications = false
//! admin_addr = "127.0.0.1:9477"   # the admin server; "none" turns it off
//! admin_token = "..."              # /status and /metrics need it (beyond loopback)
//!
//! [deploy]
//! stream = "cachepol:deploys"
//!
//! [index]              # the key index serving bulk operations
//! max_keys = 5000000
//!
//! [budgets]            # defaults for every policy
//! wall_time = 30000
//!
//! [policies.genre-invalidation]     # keyed by the .wasm file's stem
//! mode = "dry-run"
//! config = { keys = ["graph_data:{genre}"] }
//! grants = [{ pattern = "graph_data:*", ops = ["delete"] }, { pattern = "last_updated:*", ops = ["read"] }]
//! ```
//!
//! Unknown keys are errors (with their line), so a typo never silently
//! leaves a setting at its default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::dispatch::breaker::FailurePolicy;
use crate::sandbox::budget::Budgets;
use crate::sandbox::grants::{GrantConfig, Grants};
use crate::sandbox::runtime::LoadOptions;

/// Round trips in flight per policy: on 2 cores, ttl-table handled 95k
/// events/s with 8 lanes, 117k with 16 and 139k with 32 (`cargo xtask
/// bench`); each lane is an instance (a pool slot, and its memory once
/// used), so 16 is the default and a busy policy can ask for more.
pub const DEFAULT_LANES: usize = 16;

/// The admin server's address unless configured: loopback only, since
/// `/status` shows grants and key patterns.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9477";

/// More lanes than this buys nothing and costs an instance each.
pub const MAX_LANES: usize = 64;

/// Everything `cachepol run` needs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `redis://[user:password@]host:port[/db]`.
    pub redis_url: String,
    /// Where the `.wasm` policies are.
    pub policies_dir: PathBuf,
    /// Watch `policies_dir` and reload changed files (`--no-watch` turns
    /// it off; SIGHUP reloads either way).
    pub watch: bool,
    /// Compiled policies, by content hash, so restarts do not recompile.
    pub cache_dir: PathBuf,
    /// Set `notify-keyspace-events` to what the policies need instead of
    /// refusing to start when flags are missing.
    pub configure_notifications: bool,
    pub deploy: DeployConfig,
    /// Events queued per policy before repeated ones coalesce and, past
    /// that, are dropped (and a `sweep(gap)` follows).
    pub queue_capacity: usize,
    /// The same bound in bytes of queued keys (long keys fill a queue's
    /// memory before its count).
    pub queue_bytes: usize,
    /// Instances of each policy handling keyspace events at once; events
    /// are shared out by key, so one key's events stay in order. Each lane
    /// keeps one Redis round trip in flight: the daemon's throughput grows
    /// with lanes until the CPU is busy. Deploy hooks and sweeps use one
    /// lane and wait for the others. `[policies.NAME] lanes` overrides it.
    pub lanes: usize,
    /// Policy instances that can be alive at once: every lane of every
    /// policy, and a policy's new version beside the old during a swap. A
    /// load that would not fit is refused. Slots are address space
    /// reserved at start, not memory used.
    pub instance_pool: u32,
    /// How many policy-to-policy steps a chain of writes may take.
    pub hop_limit: u8,
    /// How long shutdown waits for in-flight policy calls, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// Default budgets for every policy.
    pub budgets: Budgets,
    /// Per-policy sections, keyed by the `.wasm` file's stem.
    pub policies: BTreeMap<String, PolicySection>,
    /// The Redis Set of policy names an operator disabled
    /// (`cachepol disable NAME`).
    pub control_key: String,
    /// The Redis Hash of sweep requests (`cachepol sweep NAME`).
    pub sweep_key: String,
    /// The prefix of the keys saying where sweeps and hooks too long for
    /// one call stopped (`<walks_key>:<policy>/<call>`), so that a
    /// restarted daemon (or a replica taking over) goes on from there
    /// ([`crate::store::walks`]).
    pub walks_key: String,
    /// Where the admin server listens (`/metrics`, `/livez`, `/readyz`,
    /// `/status`, `POST /deploys`); `none` turns it off.
    pub admin_addr: String,
    /// The bearer token `POST /deploys` requires; without one (here or in
    /// `CACHEPOL_DEPLOY_TOKEN`) the webhook is off.
    pub deploy_token: Option<String>,
    /// The bearer token `/status` and `/metrics` require, when set (here or
    /// in `CACHEPOL_ADMIN_TOKEN`): for an admin server bound beyond
    /// loopback. `/livez` and `/readyz` never need one.
    pub admin_token: Option<String>,
    /// The key index that serves bulk operations.
    pub index: IndexConfig,
    /// Several daemons on one Redis ([`crate::intake::lease`]), on by
    /// default.
    pub replicas: ReplicaConfig,
}

/// `[replicas]`: daemons sharing one Redis, one of them (the lease holder)
/// handling keyspace events, sweeps and deploy hooks at a time.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicaConfig {
    /// On by default: a second daemon started with the same config (a
    /// Deployment scaled to two, a unit started twice) must not handle
    /// every event again. A lone daemon simply holds the lease. Off, each
    /// daemon handles every keyspace event, and one that sees another on
    /// its Redis names it ([`crate::intake::peers`]).
    pub enabled: bool,
    /// How long a lease lives without renewal: a standby takes over within
    /// about this long after the holder dies (at once when it stops).
    pub lease_ttl_ms: u64,
    /// The lease's key (`:db<N>` is appended); the same in every daemon.
    pub lease_key: String,
}

impl Default for ReplicaConfig {
    fn default() -> ReplicaConfig {
        ReplicaConfig { enabled: true, lease_ttl_ms: 5000, lease_key: "cachepol:lease:events".into() }
    }
}

/// `[index]`: the key index ([`crate::store::index`]).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct IndexConfig {
    /// Keep it (on by default): the patterns of the policies' wildcard
    /// grants that allow `delete` or `expire`, and `patterns`.
    pub enabled: bool,
    /// Keys one pattern's index holds at most (about 45 bytes each for
    /// 30-byte names); past this that pattern's index is dropped and its
    /// bulk operations scan Redis.
    pub max_keys: usize,
    /// More patterns to index, besides those the grants imply.
    pub patterns: Vec<String>,
}

impl Default for IndexConfig {
    fn default() -> IndexConfig {
        IndexConfig { enabled: true, max_keys: 5_000_000, patterns: Vec::new() }
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            redis_url: "redis://127.0.0.1:6379".into(),
            policies_dir: "policies".into(),
            watch: true,
            cache_dir: default_cache_dir(),
            configure_notifications: false,
            deploy: DeployConfig::default(),
            // A 100k-write burst at Redis's full speed fits without a gap
            // sweep (about 20 MB at most, in the one policy it concerns).
            queue_capacity: 100_000,
            queue_bytes: 32 << 20,
            lanes: DEFAULT_LANES,
            instance_pool: 512,
            hop_limit: 2,
            shutdown_grace_ms: 10_000,
            budgets: Budgets::default(),
            policies: BTreeMap::new(),
            control_key: "cachepol:control:disabled".into(),
            sweep_key: "cachepol:control:sweeps".into(),
            walks_key: "cachepol:walks".into(),
            admin_addr: DEFAULT_ADMIN_ADDR.into(),
            deploy_token: None,
            admin_token: None,
            index: IndexConfig::default(),
            replicas: ReplicaConfig::default(),
        }
    }
}

/// The deploy-hook stream.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeployConfig {
    pub stream: String,
    pub group: String,
    /// This daemon's consumer name in the group (default: unique per
    /// process). Set it, stable across restarts, to have a restarted daemon
    /// re-read its own unacknowledged hooks at once instead of claiming them
    /// after `claim_idle_ms`; never share one between running daemons.
    pub consumer: String,
    /// Where hooks that cannot be handled go, with the reason.
    pub dead_letter: String,
    /// Attempts before a failing hook is dead-lettered.
    pub max_attempts: u32,
    /// Hooks another consumer left unacknowledged this long are claimed.
    /// A hook being handled is kept claimed, however long it takes.
    pub claim_idle_ms: u64,
    /// Trim the deploy stream to about this many entries (0: never).
    pub max_len: usize,
    /// Trim the dead-letter stream to about this many entries (0: never).
    pub dead_letter_max_len: usize,
}

impl Default for DeployConfig {
    fn default() -> DeployConfig {
        DeployConfig {
            stream: "cachepol:deploys".into(),
            group: "cachepol".into(),
            consumer: default_consumer(),
            dead_letter: "cachepol:deploys:dead".into(),
            max_attempts: 3,
            claim_idle_ms: 60_000,
            max_len: 10_000,
            dead_letter_max_len: 10_000,
        }
    }
}

/// `$XDG_CACHE_HOME/cachepol`, `~/.cache/cachepol`, or a temp directory.
fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("cachepol");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".cache").join("cachepol");
    }
    std::env::temp_dir().join("cachepol-cache")
}

/// Unique per process: replicas sharing a config (and a hostname file) must
/// not share a consumer name, or one would take the other's pending hooks
/// for its own. A restarted daemon claims what its predecessor left once it
/// is idle for `claim_idle_ms`.
fn default_consumer() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    let host = if host.is_empty() { "cachepol".to_owned() } else { format!("cachepol-{host}") };
    format!("{host}-{}-{:06x}", std::process::id(), rand::random::<u32>() & 0xff_ffff)
}

/// Enforce or only log what a policy would write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    Enforce,
    DryRun,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::DryRun => "dry-run",
        })
    }
}

/// One policy's operator settings.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySection {
    /// Passed to the policy's `configure` as JSON.
    pub config: Option<toml::Value>,
    /// Narrow the policy's grants to these (each must lie inside what it
    /// asks for; wider is a startup error).
    pub grants: Option<Vec<GrantConfig>>,
    pub mode: Mode,
    /// Per-policy budgets: each one set here overrides the `[budgets]`
    /// default of the same name; the others keep it.
    pub budgets: Option<toml::Table>,
    /// What repeated failures do (`[policies.NAME.failure]`).
    pub failure: FailurePolicy,
    /// Overrides the top-level `lanes` for this policy (1: strictly one
    /// event at a time, in arrival order across keys).
    pub lanes: Option<usize>,
}

impl PolicySection {
    /// The config as JSON text (`{}` if none).
    pub fn config_json(&self) -> String {
        self.config.as_ref().map_or_else(|| "{}".into(), |v| serde_json::to_string(v).unwrap_or_default())
    }

    pub fn grants(&self) -> Result<Option<Grants>, String> {
        self.grants.as_deref().map(Grants::from_config).transpose()
    }
}

fn check_lanes(lanes: usize) -> Result<(), String> {
    if (1..=MAX_LANES).contains(&lanes) {
        Ok(())
    } else {
        Err(format!("lanes must be between 1 and {MAX_LANES}, not {lanes}"))
    }
}

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {error}", path.display())]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    /// Read a config file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.into(), error })?;
        Config::parse(&text).map_err(|message| ConfigError::Invalid { path: path.into(), message })
    }

    /// Parse config text and check what serde cannot.
    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        for (name, section) in &config.policies {
            section.grants().map_err(|e| format!("[policies.{name}]: {e}"))?;
            config.merged_budgets(section).map_err(|e| format!("[policies.{name}.budgets]: {e}"))?;
            if let Some(lanes) = section.lanes {
                check_lanes(lanes).map_err(|e| format!("[policies.{name}]: {e}"))?;
            }
        }
        check_lanes(config.lanes)?;
        if config.queue_capacity == 0 {
            return Err("queue_capacity must be at least 1".into());
        }
        if !(16..=8192).contains(&config.instance_pool) {
            return Err("instance_pool must be between 16 and 8192".into());
        }
        if config.queue_bytes < 1024 {
            return Err("queue_bytes must be at least 1024".into());
        }
        config.admin()?;
        if config.deploy_token.as_deref().is_some_and(|t| t.trim().len() < 16) {
            return Err("deploy_token must be at least 16 characters (a guessable token guards nothing)".into());
        }
        if config.admin_token.as_deref().is_some_and(|t| t.trim().len() < 16) {
            return Err("admin_token must be at least 16 characters (a guessable token guards nothing)".into());
        }
        Ok(config)
    }

    /// Settle the daemon's own keys for the Redis at `redis_url`. On a
    /// Redis Cluster, the deploy stream, its dead letters, the control keys
    /// and the lease must live on one slot (scripts touch two of them at
    /// once, and `cachepol acl` grants them by name): the defaults become
    /// `{cachepol}:...`, and keys set in the file must share a hash tag.
    pub fn for_target(&mut self) -> Result<(), String> {
        let target = crate::store::target::RedisTarget::parse(&self.redis_url).map_err(|e| e.to_string())?;
        if !target.is_cluster() {
            return Ok(());
        }
        let (defaults, replicas, deploy) = (Config::default(), ReplicaConfig::default(), DeployConfig::default());
        let keys: [(&str, &mut String, &str); 6] = [
            ("deploy.stream", &mut self.deploy.stream, &deploy.stream),
            ("deploy.dead_letter", &mut self.deploy.dead_letter, &deploy.dead_letter),
            ("control_key", &mut self.control_key, &defaults.control_key),
            ("sweep_key", &mut self.sweep_key, &defaults.sweep_key),
            ("walks_key", &mut self.walks_key, &defaults.walks_key),
            ("replicas.lease_key", &mut self.replicas.lease_key, &replicas.lease_key),
        ];
        let mut slots = Vec::new();
        for (name, key, default) in keys {
            if key == default {
                *key = key.replacen("cachepol:", "{cachepol}:", 1);
            }
            slots.push((name, key.clone(), crate::store::target::slot(key.as_bytes())));
        }
        if let Some((name, key, _)) = slots.iter().find(|(_, _, slot)| *slot != slots[0].2) {
            return Err(format!(
                "on a Redis Cluster the daemon's keys must share one slot, but {name} `{key}` is not on the slot of {} `{}`: give them one hash tag, as the defaults do (`{{cachepol}}:deploys`)",
                slots[0].0, slots[0].1
            ));
        }
        Ok(())
    }

    /// The daemon's own keys and key prefixes, wherever the config put
    /// them: no policy may reach them ([`crate::sandbox::reserved`]).
    pub fn own_keys(&self) -> [&str; 6] {
        [
            &self.control_key,
            &self.sweep_key,
            &self.walks_key,
            &self.replicas.lease_key,
            &self.deploy.stream,
            &self.deploy.dead_letter,
        ]
    }

    /// How many lanes the policy with `section` runs.
    /// The admin server's address, or `None` when it is off.
    pub fn admin(&self) -> Result<Option<std::net::SocketAddr>, String> {
        if self.admin_addr == "none" {
            return Ok(None);
        }
        self.admin_addr
            .parse()
            .map(Some)
            .map_err(|_| format!("admin_addr `{}` is not host:port (or `none`)", self.admin_addr))
    }

    /// The settings SIGHUP cannot change in a running daemon, that differ
    /// between `self` and `new`: they take effect at the next start.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        // Destructured whole: a new setting does not compile until it is
        // sorted here into what SIGHUP applies and what waits for a restart.
        let Config {
            redis_url,
            policies_dir,
            watch,
            cache_dir,
            configure_notifications,
            deploy,
            queue_capacity,
            queue_bytes,
            lanes: _,
            instance_pool,
            hop_limit,
            shutdown_grace_ms,
            budgets: _,
            policies: _,
            control_key,
            sweep_key,
            walks_key,
            admin_addr,
            deploy_token,
            admin_token,
            index,
            replicas,
        } = new;
        let DeployConfig {
            stream,
            group,
            // Random per reading unless set: not comparable.
            consumer: _,
            dead_letter,
            max_attempts,
            claim_idle_ms,
            max_len,
            dead_letter_max_len,
        } = deploy;
        let old = &self.deploy;
        let deploy_changed = (stream, group, dead_letter, max_attempts, claim_idle_ms, max_len, dead_letter_max_len)
            != (
                &old.stream,
                &old.group,
                &old.dead_letter,
                &old.max_attempts,
                &old.claim_idle_ms,
                &old.max_len,
                &old.dead_letter_max_len,
            );
        let checks = [
            ("redis_url", self.redis_url != *redis_url),
            ("policies_dir", self.policies_dir != *policies_dir),
            ("watch", self.watch != *watch),
            ("cache_dir", self.cache_dir != *cache_dir),
            ("configure_notifications", self.configure_notifications != *configure_notifications),
            ("deploy", deploy_changed),
            ("queue_capacity", self.queue_capacity != *queue_capacity),
            ("queue_bytes", self.queue_bytes != *queue_bytes),
            ("instance_pool", self.instance_pool != *instance_pool),
            ("hop_limit", self.hop_limit != *hop_limit),
            ("shutdown_grace_ms", self.shutdown_grace_ms != *shutdown_grace_ms),
            ("control_key", self.control_key != *control_key),
            ("sweep_key", self.sweep_key != *sweep_key),
            ("walks_key", self.walks_key != *walks_key),
            ("admin_addr", self.admin_addr != *admin_addr),
            ("deploy_token", self.deploy_token != *deploy_token),
            ("admin_token", self.admin_token != *admin_token),
            ("index", self.index != *index),
            ("replicas", self.replicas != *replicas),
        ];
        checks.into_iter().filter(|(_, changed)| *changed).map(|(name, _)| name).collect()
    }

    /// `self` with what SIGHUP applies taken from `new`: the policies'
    /// sections (mode, config, grant narrowing, budgets, failure policy,
    /// lanes), the default budgets and lanes.
    pub fn reloaded(&self, new: &Config) -> Config {
        Config { policies: new.policies.clone(), budgets: new.budgets.clone(), lanes: new.lanes, ..self.clone() }
    }

    /// Everything this config decides about the policy in file `stem`: two
    /// loads with equal fingerprints load it the same way.
    pub fn fingerprint(&self, stem: &str) -> String {
        let section = self.policy(stem);
        format!("{:?}", (&section, self.budgets_for(&section), self.lanes_for(&section)))
    }

    pub fn lanes_for(&self, section: &PolicySection) -> usize {
        section.lanes.unwrap_or(self.lanes)
    }

    /// The section for the policy loaded from `stem.wasm`.
    pub fn policy(&self, stem: &str) -> PolicySection {
        self.policies.get(stem).cloned().unwrap_or_default()
    }

    /// How to load the policy from `stem.wasm` with its `section`: what the
    /// daemon and `cachepol acl` both use, so they load the same thing.
    pub fn load_options(&self, stem: &str, section: &PolicySection) -> LoadOptions {
        LoadOptions {
            label: stem.to_owned(),
            config: section.config_json(),
            budgets: self.budgets_for(section),
            // Validated when the config was parsed.
            grants: section.grants().unwrap_or_default(),
        }
    }

    /// Budgets for a policy: the defaults, with what its own section sets.
    pub fn budgets_for(&self, section: &PolicySection) -> Budgets {
        // Validated when the config was parsed.
        self.merged_budgets(section).unwrap_or_else(|_| self.budgets.clone())
    }

    fn merged_budgets(&self, section: &PolicySection) -> Result<Budgets, String> {
        let Some(overrides) = &section.budgets else { return Ok(self.budgets.clone()) };
        let mut merged = toml::Table::try_from(&self.budgets).map_err(|e| e.to_string())?;
        merged.extend(overrides.iter().map(|(k, v)| (k.clone(), v.clone())));
        Budgets::deserialize(toml::Value::Table(merged)).map_err(|e| e.to_string().trim_end().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_config_parses() {
        let c = Config::parse(
            r#"
            redis_url = "redis://user:pw@10.0.0.1:6380/2"
            policies_dir = "/srv/policies"
            configure_notifications = true
            hop_limit = 3
            [deploy]
            stream = "deploys"
            max_attempts = 5
            [budgets]
            fuel = 1000
            [policies.genre-invalidation]
            mode = "dry-run"
            config = { keys = ["graph_data:{genre}"], services = ["catalog"] }
            grants = [{ pattern = "graph_data:*", ops = ["delete"] }]
            "#,
        )
        .unwrap();
        assert_eq!(c.deploy.stream, "deploys");
        assert_eq!(c.deploy.group, "cachepol", "unset keys keep their defaults");
        assert!(c.replicas.enabled, "replicas share one lease by default");
        assert!(!Config::parse("[replicas]\nenabled = false\n").unwrap().replicas.enabled);
        assert_eq!(c.budgets.fuel, 1000);
        assert_eq!(c.budgets.host_calls, Budgets::default().host_calls);
        let p = c.policy("genre-invalidation");
        assert_eq!(p.mode, Mode::DryRun);
        assert_eq!(p.config_json(), r#"{"keys":["graph_data:{genre}"],"services":["catalog"]}"#);
        assert!(p.grants().unwrap().is_some());
        assert_eq!(c.policy("other").config_json(), "{}");
    }

    #[test]
    fn sighup_sorts_every_setting_into_applied_or_waiting_for_a_restart() {
        let old = Config::default();
        let new = Config::parse(
            "hop_limit = 5\nlanes = 4\n[deploy]\nmax_attempts = 9\n[policies.a]\nmode = \"dry-run\"\n[budgets]\nfuel = 7\n",
        )
        .unwrap();
        assert_eq!(old.restart_only_changes(&new), vec!["deploy", "hop_limit"]);
        let applied = old.reloaded(&new);
        assert_eq!((applied.lanes, applied.budgets.fuel, applied.policy("a").mode), (4, 7, Mode::DryRun));
        assert_eq!(applied.hop_limit, old.hop_limit, "waits for a restart");
        assert_ne!(old.fingerprint("a"), applied.fingerprint("a"), "policy a is reloaded");
        assert_ne!(old.fingerprint("b"), applied.fingerprint("b"), "lanes changed for every policy");
        assert!(
            Config::default().restart_only_changes(&Config::default()).is_empty(),
            "a random consumer is no change"
        );
    }

    #[test]
    fn a_policy_budget_overrides_only_what_it_sets() {
        let c = Config::parse(
            "[budgets]\nfuel = 1000\nwall_time = 5000\n[policies.a]\nbudgets = { wall_time = 60000 }\n[policies.b]\n",
        )
        .unwrap();
        let a = c.budgets_for(&c.policy("a"));
        assert_eq!(a.wall_time, std::time::Duration::from_secs(60));
        assert_eq!(a.fuel, 1000, "the global default, not the built-in one");
        assert_eq!(c.budgets_for(&c.policy("b")), c.budgets);
        let err = Config::parse("[policies.a]\nbudgets = { fuel = \"lots\" }\n").unwrap_err();
        assert!(err.contains("[policies.a.budgets]") && err.contains("fuel"), "{err}");
        let err = Config::parse("[policies.a]\nbudgets = { fule = 1 }\n").unwrap_err();
        assert!(err.contains("fule"), "{err}");
    }

    #[test]
    fn on_a_cluster_the_daemons_keys_share_one_slot() {
        let mut c = Config { redis_url: "redis+cluster://127.0.0.1:7000".into(), ..Config::default() };
        c.for_target().unwrap();
        assert_eq!(c.deploy.stream, "{cachepol}:deploys");
        assert_eq!(c.replicas.lease_key, "{cachepol}:lease:events");
        let mut odd = Config { redis_url: c.redis_url.clone(), ..Config::default() };
        odd.sweep_key = "sweeps".into();
        let err = odd.for_target().unwrap_err();
        assert!(err.contains("sweep_key `sweeps`"), "{err}");
        let mut single = Config::default();
        single.for_target().unwrap();
        assert_eq!(single.deploy.stream, "cachepol:deploys", "one server keeps its keys");
    }

    #[test]
    fn unknown_keys_are_errors_with_their_line() {
        let err = Config::parse("redis_url = \"redis://x\"\n\nqueue_capacty = 5\n").unwrap_err();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("queue_capacty"), "{err}");
        let err = Config::parse("[policies.a]\nmode = \"sometimes\"\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        let err = Config::parse("[policies.a]\ngrants = [{ pattern = \"x:*\", ops = [\"nuke\"] }]\n").unwrap_err();
        assert!(err.contains("[policies.a]") && err.contains("nuke"), "{err}");
    }

    #[test]
    fn lanes_default_and_per_policy() {
        let c = Config::parse("lanes = 4\n[policies.a]\nlanes = 1\n").unwrap();
        assert_eq!(c.lanes_for(&c.policy("a")), 1);
        assert_eq!(c.lanes_for(&c.policy("b")), 4);
        assert_eq!(Config::default().lanes, DEFAULT_LANES);
        let err = Config::parse("[policies.a]\nlanes = 0\n").unwrap_err();
        assert!(err.contains("[policies.a]") && err.contains("between 1 and"), "{err}");
        assert!(Config::parse("lanes = 1000\n").is_err());
    }
}
