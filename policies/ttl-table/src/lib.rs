//! ttl-table: every cache key gets the TTL its table row says, and nothing
//! lives longer than its row's `max`.
//!
//! The runbook it replaces is a table pasted in a wiki ("graph 1 h, playlist
//! 30 min, service playlist 15 min, job 24 h") plus the 3 a.m. chore of
//! `DEL`-ing locks that a crashed worker left without a TTL. Here the table
//! is config: an ordered list of rows, `pattern` → `ttl` and/or `max`
//! seconds, first match wins.
//!
//! - On a write (`set`-family keyspace events, and `persist`, which strips a
//!   TTL) of a key matching a row: a key without a TTL gets the row's `ttl`
//!   (`EXPIRE .. NX`); with `max`, a longer or missing TTL is cut to `max`
//!   (`EXPIRE .. LT`). Both are conditional on Redis's side, so a TTL the
//!   application set itself in the meantime is never lengthened.
//! - On a sweep (start, reconnect, gap, ...): the persistent keys get their
//!   row's TTL, first match wins as on write, in one `SCAN` pass over the
//!   keyspace for the whole table (`expire-matching-rows` with
//!   only-if-persistent): a table of ten rows costs Redis one walk of its
//!   keys, not ten. Keys written while the daemon was away are fixed.
//!   Longer TTLs are clamped on write only: a sweep never reads keys one by
//!   one.
//!
//! Its own `EXPIRE`s cause `expire` events, which it does not subscribe to;
//! the host's echo suppression would drop them anyway.

use std::time::Duration;

use cachepol_guest_sdk::info;
use cachepol_guest_sdk::prelude::*;

/// One row of the table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Row {
    /// Keys this row is for (a Redis glob).
    pub pattern: String,
    /// TTL in seconds for keys written without one.
    #[serde(default)]
    pub ttl: Option<u64>,
    /// The longest TTL allowed, in seconds; also given to keys without one
    /// when the row has no `ttl`.
    #[serde(default)]
    pub max: Option<u64>,
}

/// Operator settings; every field has the runbook's default.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The table, first match wins.
    pub rows: Vec<Row>,
    /// Keyspace events that count as a write.
    pub ops: Vec<String>,
    /// Also sweep this often, in seconds (off by default: start, reconnect
    /// and gap sweeps already reconcile).
    pub sweep_every_secs: Option<u32>,
}

fn row(pattern: &str, ttl: Option<u64>, max: Option<u64>) -> Row {
    Row { pattern: pattern.to_owned(), ttl, max }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            rows: vec![
                row("graph_data:*", Some(3600), None),
                row("playlist_data:*", Some(1800), None),
                row("service_playlist:*", Some(900), None),
                row("last_updated:*", Some(300), None),
                row("header_art:*", Some(7200), None),
                row("flow:state:*", Some(300), None),
                row("flow:meta:*", Some(3600), None),
                row("job:*", Some(86_400), None),
                row("queue:*", Some(3600), None),
                row("lock:*", None, Some(300)),
            ],
            // A write, or a `PERSIST` that stripped the TTL.
            ops: KeyEvent::WRITE_OPS.iter().chain(&["persist"]).map(|s| s.to_string()).collect(),
            sweep_every_secs: None,
        }
    }
}

/// A checked row.
struct Rule {
    glob: Glob,
    ttl: Option<Duration>,
    max: Option<Duration>,
}

impl Rule {
    fn parse(row: &Row) -> Result<Rule, String> {
        let glob = Glob::new(&row.pattern);
        if let Some(problem) = glob.lint().into_iter().next() {
            return Err(format!("row `{}`: {problem}", row.pattern));
        }
        let secs = |what: &str, v: Option<u64>| match v {
            Some(0) => Err(format!("row `{}`: `{what}` must be at least 1 second", row.pattern)),
            v => Ok(v.map(Duration::from_secs)),
        };
        let (ttl, max) = (secs("ttl", row.ttl)?, secs("max", row.max)?);
        match (ttl, max) {
            (None, None) => Err(format!("row `{}` has neither `ttl` nor `max`", row.pattern)),
            (Some(t), Some(m)) if t > m => Err(format!("row `{}`: `ttl` is longer than `max`", row.pattern)),
            _ => Ok(Rule { glob, ttl, max }),
        }
    }

    /// The TTL a key without one gets.
    fn default_ttl(&self) -> Duration {
        self.ttl.or(self.max).expect("checked in parse")
    }
}

pub struct TtlTable {
    rules: Vec<Rule>,
    config: Config,
}

impl Policy for TtlTable {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.rows.is_empty() {
            return Err("`rows` is empty: the table has nothing to apply".into());
        }
        let rules = config.rows.iter().map(Rule::parse).collect::<Result<_, _>>()?;
        Ok(TtlTable { rules, config })
    }

    fn manifest(&self) -> Manifest {
        let ops: Vec<&str> = self.config.ops.iter().map(String::as_str).collect();
        let patterns: Vec<&str> = self.rules.iter().map(|r| r.glob.as_str()).collect();
        let mut manifest = Manifest::new("ttl-table", env!("CARGO_PKG_VERSION"))
            .description("give keys their table TTL, clamp TTLs to each row's max")
            .on_keys(&ops, &patterns);
        if let Some(secs) = self.config.sweep_every_secs {
            manifest = manifest.sweep_every(secs);
        }
        for rule in &self.rules {
            manifest = manifest.grant(rule.glob.as_str(), KeyOps::READ | KeyOps::EXPIRE);
        }
        manifest
    }

    fn on_key(&mut self, event: KeyEvent) -> Result<Outcome, Error> {
        let Some(rule) = self.rules.iter().find(|r| r.glob.matches(&event.key)) else {
            return Ok(Outcome::done());
        };
        let key = event.key.as_str();
        // Queued, not waited for: the answers are not needed, and a batch
        // of events goes to Redis as one pipeline. `NX` gives the row's TTL
        // to a key without one; then `LT` cuts a longer one to `max` (a
        // persistent key counts as infinite, so a max-only row gives its
        // `max` to a key without a TTL; after the `NX`, `ttl <= max` makes
        // it a no-op).
        if let Some(ttl) = rule.ttl {
            redis::expire_in_queued(key, ttl, ExpireCondition::IfPersistent)?;
        }
        if let Some(max) = rule.max {
            redis::expire_in_queued(key, max, ExpireCondition::IfShorter)?;
        }
        Ok(Outcome::done())
    }

    fn on_sweep(&mut self, reason: SweepReason) -> Result<Outcome, Error> {
        let rows: Vec<ExpireRow> = self
            .rules
            .iter()
            .map(|rule| ExpireRow {
                pattern: rule.glob.as_str().to_owned(),
                ttl_ms: u64::try_from(rule.default_ttl().as_millis()).unwrap_or(u64::MAX),
                only_if_persistent: true,
            })
            .collect();
        let fixed = redis::expire_matching_rows(&rows)?;
        let note = if fixed > 0 { format!("{fixed} keys without a TTL got their row's") } else { String::new() };
        if fixed > 0 {
            info!("sweep ({}): {note}", reason.name());
        }
        Ok(Outcome::done().with_note(note))
    }
}

export_policy!(TtlTable);
