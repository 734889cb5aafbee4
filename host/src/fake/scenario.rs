//! Scenario files: a policy's behaviour written down as data, run on the fake
//! host by `cachepol test` and from `cargo test`.
//!
//! A scenario gives the policy's config, the keys that exist at the start
//! (with TTLs), a sequence of steps (application writes, deploy hooks,
//! sweeps, clock advances, raw keyspace events) and what must hold afterwards
//! (and optionally at checkpoints in between). An `unnoticed` step holds
//! application writes whose events are lost (the daemon away), so that a
//! later `sweep` step shows the policy reconciling. TOML or JSON:
//!
//! ```toml
//! description = "a deploy tagged genre=dance drops only dance's keys"
//! [config]                       # the policy's JSON config, as TOML
//! [keys]
//! "graph_data:dance" = "g"
//! "service_playlist:dance:1" = { value = "p", ttl = 900 }
//! [[steps]]
//! deploy = { service = "catalog", tags = { genre = "dance" } }
//! [expect]
//! absent = ["graph_data:dance"]
//! none_matching = ["service_playlist:dance:*"]
//! ```
//!
//! Expectations are strict where silence would hide bugs: unless a
//! checkpoint lists `denials` and `failures`, it requires none since the
//! previous checkpoint.
//!
//! Lists, hashes, sets and sorted sets can be starting keys
//! (`"queue:1" = { list = ["a", "b"] }`, `{ hash = { f = "v" } }`,
//! `{ set = [...] }`, `{ zset = { m = 1.5 } }`), written by steps (`rpush`,
//! `lpush`, `lpop`, `rpop`, `hset`, `hdel`, `sadd`, `srem`, `zadd`, `zrem`,
//! each emitting the keyspace event Redis would), and checked (`lists`,
//! `hashes`, `sets`, `zsets`). The full reference is
//! `guest-sdk/docs/scenarios.md`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cachepol_guest_sdk::glob::Glob;
use serde::Deserialize;

use crate::fake::{AppWrite, FakeHost, FakeRedis, KeySnapshot, Value};
use crate::sandbox::budget::Budgets;
use crate::sandbox::grants::{GrantConfig, Grants};
use crate::sandbox::runtime::{Compiled, LoadOptions, Runtime};
use crate::wit::{SWEEP_REASONS, SweepReason, sweep_reason_name};

/// A parsed scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// One line saying what the scenario shows.
    #[serde(default)]
    pub description: String,
    /// The policy's config (any JSON-able value); `{}` if absent.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// Budgets, if the defaults are not what the scenario is about.
    #[serde(default)]
    pub budgets: Option<Budgets>,
    /// The operator's narrowing of the policy's grants, as in the daemon's
    /// config: `[{ pattern = "graph_data:*", ops = ["delete"] }]`.
    #[serde(default)]
    pub grants: Option<Vec<GrantConfig>>,
    /// If set, loading must fail with a message containing this text.
    #[serde(default)]
    pub load_error: Option<String>,
    /// Keys present at the start.
    #[serde(default)]
    pub keys: BTreeMap<String, InitialKey>,
    #[serde(default)]
    pub steps: Vec<Step>,
    /// What must hold at the end.
    #[serde(default)]
    pub expect: Option<Expect>,
}

/// A starting key: a bare string value, or a table with one of `value`,
/// `list`, `hash`, `set`, `zset`, and an optional TTL in seconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "serde_json::Value")]
pub enum InitialKey {
    Value(String),
    Typed(TypedKey),
}

/// Read by hand rather than `untagged`, whose error for a typo in a table
/// ("did not match any variant") would not name the field.
impl TryFrom<serde_json::Value> for InitialKey {
    type Error = String;

    fn try_from(value: serde_json::Value) -> Result<InitialKey, String> {
        match value {
            serde_json::Value::String(s) => Ok(InitialKey::Value(s)),
            table @ serde_json::Value::Object(_) => {
                serde_json::from_value(table).map(InitialKey::Typed).map_err(|e| e.to_string())
            }
            other => Err(format!("a starting key is a string or a table, not `{other}`")),
        }
    }
}

/// A starting key given as a table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypedKey {
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub list: Option<Vec<String>>,
    #[serde(default)]
    pub hash: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub set: Option<Vec<String>>,
    #[serde(default)]
    pub zset: Option<BTreeMap<String, f64>>,
    #[serde(default)]
    pub ttl: Option<f64>,
}

impl InitialKey {
    /// The value it starts with, and its TTL in seconds.
    fn value(&self) -> Result<(Value, Option<f64>), String> {
        let t = match self {
            InitialKey::Value(v) => return Ok((Value::String(v.as_bytes().to_vec()), None)),
            InitialKey::Typed(t) => t,
        };
        let b = |s: &String| s.as_bytes().to_vec();
        let mut values = Vec::new();
        if let Some(v) = &t.value {
            values.push(Value::String(b(v)));
        }
        if let Some(l) = &t.list {
            values.push(Value::List(l.iter().map(b).collect()));
        }
        if let Some(h) = &t.hash {
            values.push(Value::Hash(h.iter().map(|(f, v)| (b(f), b(v))).collect()));
        }
        if let Some(set) = &t.set {
            values.push(Value::Set(set.iter().map(b).collect()));
        }
        if let Some(z) = &t.zset {
            values.push(Value::ZSet(z.iter().map(|(m, s)| (b(m), *s)).collect()));
        }
        if values.first().is_some_and(|v| v.is_empty()) {
            return Err("Redis holds no empty list, hash, set or sorted set: give at least one element".into());
        }
        if let Some(Value::ZSet(z)) = values.first()
            && z.values().any(|s| s.is_nan())
        {
            return Err("a sorted set's score must be a number, not NaN".into());
        }
        match values.len() {
            1 => Ok((values.remove(0), t.ttl)),
            0 => Err("give one of `value`, `list`, `hash`, `set` or `zset`".into()),
            _ => Err("give only one of `value`, `list`, `hash`, `set` or `zset`".into()),
        }
    }
}

/// One thing that happens. Times are seconds (fractions allowed).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// The application writes a key (`SET key value [PX ttl]`).
    Set(SetStep),
    /// The application deletes keys.
    Del(Vec<String>),
    /// The application sets a TTL.
    Expire(ExpireStep),
    /// The application removes a TTL.
    Persist(String),
    /// Time passes; keys that expire notify `expired`.
    Advance(f64),
    /// A deploy hook arrives.
    Deploy(DeployStep),
    /// A sweep is triggered: `start`, `reconnect`, `gap`, `periodic`,
    /// `manual` or `reload`.
    Sweep(String),
    /// A keyspace notification without the write behind it.
    Event(EventStep),
    /// The application appends to a list (`RPUSH key values...`).
    Rpush(PushStep),
    /// The application prepends to a list (`LPUSH`).
    Lpush(PushStep),
    /// The application pops from a list's head (`LPOP key [count]`).
    Lpop(PopStep),
    /// The application pops from a list's tail (`RPOP`).
    Rpop(PopStep),
    /// The application sets hash fields (`HSET key f v ...`).
    Hset(HsetStep),
    /// The application removes hash fields (`HDEL`).
    Hdel(FieldsStep),
    /// The application adds set members (`SADD`).
    Sadd(MembersStep),
    /// The application removes set members (`SREM`).
    Srem(MembersStep),
    /// The application adds or rescores sorted-set members (`ZADD`).
    Zadd(ZaddStep),
    /// The application removes sorted-set members (`ZREM`).
    Zrem(MembersStep),
    /// Application steps whose keyspace events are lost (the daemon was
    /// stopped, or its subscription cut): they change the keyspace, the
    /// policy hears nothing until a sweep. Writes and `advance` only.
    Unnoticed(Vec<Step>),
    /// A checkpoint: these must hold now.
    Expect(Expect),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetStep {
    pub key: String,
    #[serde(default)]
    pub value: String,
    #[serde(default)]
    pub ttl: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushStep {
    pub key: String,
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PopStep {
    pub key: String,
    #[serde(default = "one")]
    pub count: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsetStep {
    pub key: String,
    pub fields: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldsStep {
    pub key: String,
    pub fields: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembersStep {
    pub key: String,
    pub members: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZaddStep {
    pub key: String,
    /// Member -> score.
    pub members: BTreeMap<String, f64>,
}

impl Step {
    /// The application write to a list, hash, set or sorted set this step
    /// is, with its key.
    fn app_write(&self) -> Option<(&str, AppWrite)> {
        Some(match self {
            Step::Rpush(p) => (&p.key, AppWrite::Rpush(p.values.clone())),
            Step::Lpush(p) => (&p.key, AppWrite::Lpush(p.values.clone())),
            Step::Lpop(p) => (&p.key, AppWrite::Lpop(p.count)),
            Step::Rpop(p) => (&p.key, AppWrite::Rpop(p.count)),
            Step::Hset(h) => (&h.key, AppWrite::Hset(h.fields.clone())),
            Step::Hdel(h) => (&h.key, AppWrite::Hdel(h.fields.clone())),
            Step::Sadd(m) => (&m.key, AppWrite::Sadd(m.members.clone())),
            Step::Srem(m) => (&m.key, AppWrite::Srem(m.members.clone())),
            Step::Zadd(z) => (&z.key, AppWrite::Zadd(z.members.clone())),
            Step::Zrem(m) => (&m.key, AppWrite::Zrem(m.members.clone())),
            _ => return None,
        })
    }

    /// The steps an `unnoticed` step holds (none for other steps).
    fn unnoticed(&self) -> &[Step] {
        match self {
            Step::Unnoticed(inner) => inner,
            _ => &[],
        }
    }

    /// Whether this step is something the application (or time) does to
    /// the keyspace, which is what an `unnoticed` step may hold.
    fn is_app_side(&self) -> bool {
        matches!(self, Step::Set(_) | Step::Del(_) | Step::Expire(_) | Step::Persist(_) | Step::Advance(_))
            || self.app_write().is_some()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpireStep {
    pub key: String,
    pub ttl: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployStep {
    #[serde(default = "default_service")]
    pub service: String,
    #[serde(default)]
    pub files: Vec<String>,
    #[serde(default)]
    pub tags: Tags,
}

fn default_service() -> String {
    "app".to_owned()
}

/// Deploy tags: `{ genre = "dance" }`, or `["genre=dance", "genre=rock"]`
/// when a name repeats.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Tags {
    Map(BTreeMap<String, String>),
    List(Vec<String>),
}

impl Default for Tags {
    fn default() -> Tags {
        Tags::Map(BTreeMap::new())
    }
}

impl Tags {
    fn pairs(&self) -> Result<Vec<(String, String)>, String> {
        match self {
            Tags::Map(map) => Ok(map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
            Tags::List(list) => list
                .iter()
                .map(|t| match t.split_once('=') {
                    Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
                    _ => Err(format!("tag `{}` is not of the form name=value", t.escape_debug())),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventStep {
    pub op: String,
    pub key: String,
}

/// What must hold at a checkpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Expect {
    /// Keys that must exist.
    pub present: Vec<String>,
    /// Keys that must not exist.
    pub absent: Vec<String>,
    /// Globs no key may match.
    pub none_matching: Vec<String>,
    /// Exact values of keys.
    pub values: BTreeMap<String, String>,
    /// TTLs: `[min, max]` seconds, or `"persistent"`.
    pub ttl: BTreeMap<String, TtlExpect>,
    /// If set, exactly these keys exist.
    pub keys: Option<Vec<String>>,
    /// Lists, in order.
    pub lists: BTreeMap<String, Vec<String>>,
    /// Hashes, field -> value.
    pub hashes: BTreeMap<String, BTreeMap<String, String>>,
    /// Sets, in any order.
    pub sets: BTreeMap<String, Vec<String>>,
    /// Sorted sets, member -> score.
    pub zsets: BTreeMap<String, BTreeMap<String, f64>>,
    /// Denials since the previous checkpoint, in order; none if unset.
    pub denials: Option<Vec<DenialExpect>>,
    /// Failed deliveries since the previous checkpoint; 0 if unset.
    pub failures: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TtlExpect {
    Range([f64; 2]),
    Word(String),
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DenialExpect {
    pub op: String,
    pub target: String,
}

impl fmt::Display for DenialExpect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} `{}`", self.op, self.target)
    }
}

/// A scenario file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read {}: {error}", path.display())]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

impl Scenario {
    /// Parse a `.toml` or `.json` scenario file.
    pub fn from_file(path: &Path) -> Result<Scenario, ScenarioError> {
        let text =
            std::fs::read_to_string(path).map_err(|error| ScenarioError::Read { path: path.to_owned(), error })?;
        let is_json = path.extension().is_some_and(|e| e == "json");
        Scenario::parse(&text, is_json).map_err(|message| ScenarioError::Invalid { path: path.to_owned(), message })
    }

    /// Parse scenario text (TOML unless `json`), and check it can fail:
    /// a scenario without expectations would pass whatever the policy does.
    pub fn parse(text: &str, json: bool) -> Result<Scenario, String> {
        let scenario: Scenario = if json {
            serde_json::from_str(text).map_err(|e| e.to_string())?
        } else {
            toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?
        };
        let checkpoints = scenario.steps.iter().filter(|s| matches!(s, Step::Expect(_))).count();
        if scenario.expect.is_none() && checkpoints == 0 && scenario.load_error.is_none() {
            return Err("the scenario has no `expect` section or step, so it could never fail".to_owned());
        }
        for (key, initial) in &scenario.keys {
            initial.value().map_err(|e| format!("keys.\"{key}\": {e}"))?;
        }
        let unnoticed = scenario.steps.iter().filter_map(|s| match s {
            Step::Unnoticed(inner) => Some(inner),
            _ => None,
        });
        for inner in unnoticed {
            if inner.is_empty() || !inner.iter().all(Step::is_app_side) {
                return Err("an `unnoticed` step holds one or more application writes or `advance` steps \
                            (not deploy, sweep, event, expect or unnoticed)"
                    .to_owned());
            }
        }
        for step in scenario.steps.iter().chain(scenario.steps.iter().flat_map(Step::unnoticed)) {
            if let Step::Sweep(reason) = step {
                sweep_reason(reason)?;
            }
            if let Step::Deploy(deploy) = step {
                deploy.tags.pairs()?;
            }
            if let Some((key, write)) = step.app_write() {
                write.check().map_err(|e| format!("{} {key}: {e}", write.name()))?;
            }
        }
        Ok(scenario)
    }

    fn config_json(&self) -> String {
        self.config.as_ref().map_or_else(|| "{}".to_owned(), |v| v.to_string())
    }
}

fn sweep_reason(name: &str) -> Result<SweepReason, String> {
    SWEEP_REASONS.into_iter().find(|r| sweep_reason_name(*r) == name).ok_or_else(|| {
        let known: Vec<&str> = SWEEP_REASONS.into_iter().map(sweep_reason_name).collect();
        format!("unknown sweep reason `{name}` ({})", known.join(", "))
    })
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// The result of running one scenario.
#[derive(Debug, Clone)]
pub struct ScenarioReport {
    pub description: String,
    /// Mismatches per checkpoint that had any (label, lines).
    pub failed_checks: Vec<(String, Vec<String>)>,
    pub checkpoints: usize,
    pub steps: usize,
    pub deliveries: usize,
}

impl ScenarioReport {
    pub fn passed(&self) -> bool {
        self.failed_checks.is_empty()
    }
}

impl fmt::Display for ScenarioReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (label, lines) in &self.failed_checks {
            writeln!(f, "  {label}:")?;
            for line in lines {
                writeln!(f, "    {line}")?;
            }
        }
        Ok(())
    }
}

/// Run a scenario against a compiled policy on a fresh fake host.
pub async fn run(runtime: &Runtime, compiled: &Compiled, scenario: &Scenario) -> ScenarioReport {
    let mut report = ScenarioReport {
        description: scenario.description.clone(),
        failed_checks: Vec::new(),
        checkpoints: 0,
        steps: scenario.steps.len(),
        deliveries: 0,
    };
    let redis = FakeRedis::new();
    for (key, initial) in &scenario.keys {
        // Checked when parsed.
        if let Ok((value, ttl)) = initial.value() {
            redis.app_insert(key, value, ttl.map(|t| secs(t).as_millis() as u64));
        }
    }
    redis.take_events();
    let grants = match scenario.grants.as_deref().map(Grants::from_config).transpose() {
        Ok(grants) => grants,
        Err(e) => {
            report.failed_checks.push(("loading".into(), vec![format!("invalid grants: {e}")]));
            return report;
        }
    };
    let options = LoadOptions {
        label: "scenario".into(),
        config: scenario.config_json(),
        budgets: scenario.budgets.clone().unwrap_or_default(),
        grants,
    };
    let loaded = FakeHost::load_on(runtime, compiled, &options, redis).await;
    let mut host = match (loaded, &scenario.load_error) {
        (Ok(host), None) => host,
        (Err(e), Some(expected)) if e.to_string().contains(expected.as_str()) => return report,
        (Err(e), _) => {
            report.failed_checks.push(("loading".into(), vec![format!("the policy failed to load: {e}")]));
            return report;
        }
        (Ok(_), Some(expected)) => {
            report
                .failed_checks
                .push(("loading".into(), vec![format!("expected loading to fail with `{expected}`, but it loaded")]));
            return report;
        }
    };

    let mut seen = 0;
    for (index, step) in scenario.steps.iter().enumerate() {
        match step {
            Step::Expect(expect) => {
                report.checkpoints += 1;
                check(&mut report, format!("after step {}", index + 1), expect, &host, seen);
                seen = host.deliveries().len();
            }
            Step::Unnoticed(inner) => {
                host.set_listening(false);
                for step in inner {
                    apply(&mut host, step, index, &mut report).await;
                }
                host.set_listening(true);
            }
            step => apply(&mut host, step, index, &mut report).await,
        }
    }
    if let Some(expect) = &scenario.expect {
        report.checkpoints += 1;
        check(&mut report, "at the end".into(), expect, &host, seen);
    }
    report.deliveries = host.deliveries().len();
    report
}

/// Carry out step `index` (any but a checkpoint or an `unnoticed` list);
/// a write Redis would refuse fails the scenario there.
async fn apply(host: &mut FakeHost, step: &Step, index: usize, report: &mut ScenarioReport) {
    match step {
        Step::Set(s) => host.set(&s.key, s.value.as_bytes(), s.ttl.map(secs)).await,
        Step::Del(keys) => host.del(&keys.iter().map(String::as_str).collect::<Vec<_>>()).await,
        Step::Expire(e) => host.expire(&e.key, secs(e.ttl)).await,
        Step::Persist(key) => host.persist(key).await,
        Step::Advance(s) => host.advance(secs(*s)).await,
        Step::Deploy(d) => {
            let tags = d.tags.pairs().unwrap_or_default();
            let tags: Vec<(&str, &str)> = tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let files: Vec<&str> = d.files.iter().map(String::as_str).collect();
            host.deploy(&d.service, &files, &tags).await;
        }
        Step::Sweep(reason) => {
            if let Ok(reason) = sweep_reason(reason) {
                host.sweep(reason).await;
            }
        }
        Step::Event(e) => host.key_event(&e.op, &e.key).await,
        step @ (Step::Rpush(_)
        | Step::Lpush(_)
        | Step::Lpop(_)
        | Step::Rpop(_)
        | Step::Hset(_)
        | Step::Hdel(_)
        | Step::Sadd(_)
        | Step::Srem(_)
        | Step::Zadd(_)
        | Step::Zrem(_)) => {
            let (key, write) = step.app_write().expect("a write step");
            if let Err(e) = host.app_write(key, &write).await {
                let what = format!("step {} ({} {key})", index + 1, write.name());
                report.failed_checks.push((what, vec![e]));
            }
        }
        // Handled by `run`.
        Step::Expect(_) | Step::Unnoticed(_) => {}
    }
}

fn show_value(value: &Value) -> String {
    match value {
        Value::String(v) => format!("\"{}\"", String::from_utf8_lossy(v).escape_debug()),
        other => other.render(),
    }
}

fn show_ttl(snapshot: Option<&KeySnapshot>) -> String {
    match snapshot {
        None => "missing".into(),
        Some(KeySnapshot { ttl_ms: None, .. }) => "persistent".into(),
        Some(KeySnapshot { ttl_ms: Some(ms), .. }) => format!("{} s", *ms as f64 / 1000.0),
    }
}

/// Compare the fake host's state with one checkpoint; record mismatches.
fn check(report: &mut ScenarioReport, label: String, expect: &Expect, host: &FakeHost, since: usize) {
    let keys = host.redis().snapshot();
    let mut out = Vec::new();
    for key in &expect.present {
        if !keys.contains_key(key) {
            out.push(format!("{key}: expected present, but it is missing"));
        }
    }
    for key in &expect.absent {
        if let Some(found) = keys.get(key) {
            out.push(format!("{key}: expected absent, but found {}", show_value(&found.value)));
        }
    }
    for pattern in &expect.none_matching {
        let glob = Glob::new(pattern);
        let found: Vec<&str> = keys.keys().filter(|k| glob.matches(k)).map(String::as_str).collect();
        if !found.is_empty() {
            out.push(format!("expected no key matching `{pattern}`, found {}", found.join(", ")));
        }
    }
    let b = |s: &String| s.as_bytes().to_vec();
    let wanted = expect
        .values
        .iter()
        .map(|(k, v)| (k, Value::String(b(v))))
        .chain(expect.lists.iter().map(|(k, l)| (k, Value::List(l.iter().map(b).collect()))))
        .chain(expect.hashes.iter().map(|(k, h)| (k, Value::Hash(h.iter().map(|(f, v)| (b(f), b(v))).collect()))))
        .chain(expect.sets.iter().map(|(k, s)| (k, Value::Set(s.iter().map(b).collect()))))
        .chain(expect.zsets.iter().map(|(k, z)| (k, Value::ZSet(z.iter().map(|(m, s)| (b(m), *s)).collect()))));
    for (key, want) in wanted {
        match keys.get(key) {
            Some(found) if found.value == want => {}
            Some(found) => {
                out.push(format!("{key}: expected {}, found {}", show_value(&want), show_value(&found.value)))
            }
            None => out.push(format!("{key}: expected {}, but it is missing", show_value(&want))),
        }
    }
    for (key, want) in &expect.ttl {
        let found = keys.get(key);
        let ok = match (want, found) {
            (TtlExpect::Word(w), Some(KeySnapshot { ttl_ms: None, .. })) => w == "persistent",
            (TtlExpect::Range([lo, hi]), Some(KeySnapshot { ttl_ms: Some(ms), .. })) => {
                let s = *ms as f64 / 1000.0;
                *lo <= s && s <= *hi
            }
            _ => false,
        };
        if !ok {
            let want = match want {
                TtlExpect::Range([lo, hi]) => format!("{lo}..={hi} s"),
                TtlExpect::Word(w) => w.clone(),
            };
            out.push(format!("ttl of {key}: expected {want}, found {}", show_ttl(found)));
        }
    }
    if let Some(exact) = &expect.keys {
        let mut want: Vec<&str> = exact.iter().map(String::as_str).collect();
        want.sort();
        let have: Vec<&str> = keys.keys().map(String::as_str).collect();
        if want != have {
            let extra: Vec<&str> = have.iter().filter(|k| !want.contains(k)).copied().collect();
            let missing: Vec<&str> = want.iter().filter(|k| !have.contains(k)).copied().collect();
            out.push(format!("keyspace differs: unexpected [{}], missing [{}]", extra.join(", "), missing.join(", ")));
        }
    }
    let recent = &host.deliveries()[since..];
    let denials: Vec<DenialExpect> = recent
        .iter()
        .flat_map(|d| d.report.call.denials.iter())
        .map(|d| DenialExpect { op: d.op.clone(), target: d.target.clone() })
        .collect();
    let want_denials = expect.denials.clone().unwrap_or_default();
    if denials != want_denials {
        let list = |v: &[DenialExpect]| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
            }
        };
        out.push(format!("denials: expected {}, got {}", list(&want_denials), list(&denials)));
    }
    let failures: Vec<String> =
        recent.iter().filter_map(|d| d.report.result.as_ref().err().map(|f| format!("{}: {f}", d.event_id))).collect();
    let want_failures = expect.failures.unwrap_or(0);
    if failures.len() != want_failures {
        out.push(format!("failed deliveries: expected {want_failures}, got {}", failures.len()));
        out.extend(failures.iter().map(|f| format!("  {f}")));
    }
    if !out.is_empty() {
        report.failed_checks.push((label, out));
    }
}

/// Scenario files named by `paths`: files as given, directories searched
/// (not recursively) for `*.toml` and `*.json`, sorted.
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ScenarioError> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|error| ScenarioError::Read { path: path.clone(), error })?;
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "toml" || e == "json"))
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_starting_keys_and_their_mistakes_are_named() {
        let ok = Scenario::parse(
            "[keys]\n\"q\" = { list = [\"a\"], ttl = 5 }\n\"z\" = { zset = { m = 1.5 } }\n[expect]\nabsent = [\"x\"]",
            false,
        )
        .unwrap();
        assert!(matches!(ok.keys["q"].value(), Ok((Value::List(_), Some(_)))));
        for (text, says) in [
            ("\"k\" = { lst = [\"a\"] }", "unknown field `lst`"),
            ("\"k\" = { list = [] }", "no empty list"),
            ("\"k\" = { list = [\"a\"], set = [\"b\"] }", "only one of"),
            ("\"k\" = 7", "a string or a table"),
        ] {
            let err = Scenario::parse(&format!("[keys]\n{text}\n[expect]\nabsent = [\"x\"]"), false).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
        let err = Scenario::parse("[[steps]]\nsadd = { key = \"s\", members = [] }\n[expect]\nabsent = []", false)
            .unwrap_err();
        assert!(err.contains("sadd s: needs at least one element"), "{err}");
    }

    #[test]
    fn parses_every_step_kind() {
        let s = Scenario::parse(
            r#"
            description = "all steps"
            [config]
            keys = ["a:{genre}"]
            [keys]
            "a" = "1"
            "b" = { value = "2", ttl = 1.5 }
            [[steps]]
            set = { key = "k", value = "v", ttl = 10 }
            [[steps]]
            del = ["k"]
            [[steps]]
            expire = { key = "a", ttl = 5 }
            [[steps]]
            persist = "a"
            [[steps]]
            advance = 0.5
            [[steps]]
            deploy = { service = "s", files = ["f.py"], tags = ["genre=rock", "genre=pop"] }
            [[steps]]
            sweep = "manual"
            [[steps]]
            event = { op = "set", key = "x" }
            [[steps]]
            expect = { present = ["a"], ttl = { b = [1, 2], a = "persistent" } }
            "#,
            false,
        )
        .unwrap();
        assert_eq!(s.steps.len(), 9);
        assert_eq!(s.keys.len(), 2);
        assert_eq!(s.config_json(), r#"{"keys":["a:{genre}"]}"#);
    }

    #[test]
    fn rejects_scenarios_that_cannot_fail_and_bad_input() {
        let err = Scenario::parse("[[steps]]\nadvance = 1\n", false).unwrap_err();
        assert!(err.contains("could never fail"), "{err}");
        let err = Scenario::parse("[expect]\npresnt = [\"a\"]\n", false).unwrap_err();
        assert!(err.contains("presnt"), "{err}");
        let err = Scenario::parse("[[steps]]\nsweep = \"sometimes\"\n[expect]\n", false).unwrap_err();
        assert!(err.contains("unknown sweep reason"), "{err}");
        let err = Scenario::parse("[[steps]]\ndeploy = { tags = [\"genre\"] }\n[expect]\n", false).unwrap_err();
        assert!(err.contains("name=value"), "{err}");
        let err = Scenario::parse("[[steps]]\nfly = 1\n[expect]\n", false).unwrap_err();
        assert!(err.contains("fly"), "{err}");
    }

    #[test]
    fn unnoticed_steps_hold_application_writes_only() {
        let s = Scenario::parse(
            "[[steps]]\nunnoticed = [{ set = { key = \"k\", value = \"v\" } }, { del = [\"k\"] }, { advance = 1 }]\n[expect]\n",
            false,
        )
        .unwrap();
        assert!(matches!(&s.steps[0], Step::Unnoticed(inner) if inner.len() == 3));
        for inner in ["[]", "[{ sweep = \"gap\" }]", "[{ unnoticed = [{ advance = 1 }] }]", "[{ expect = {} }]"] {
            let err = Scenario::parse(&format!("[[steps]]\nunnoticed = {inner}\n[expect]\n"), false).unwrap_err();
            assert!(err.contains("an `unnoticed` step holds"), "{inner}: {err}");
        }
        let err =
            Scenario::parse("[[steps]]\nunnoticed = [{ sadd = { key = \"s\", members = [] } }]\n[expect]\n", false)
                .unwrap_err();
        assert!(err.contains("sadd s: needs at least one element"), "checked like any write: {err}");
    }

    #[test]
    fn json_scenarios_work_too() {
        let s = Scenario::parse(r#"{"steps": [{"advance": 1}], "expect": {"absent": ["x"]}}"#, true).unwrap();
        assert_eq!(s.steps.len(), 1);
    }
}
