//! The WIT types, re-exported under short names, with builders and helpers
//! so that policies read like the runbooks they replace.
//!
//! Each type's own documentation comes from `wit/policy.wit`; the notes on
//! the re-exports below fill in what the contract leaves unsaid.

use std::time::Duration;

pub use crate::bindings::cachepol::policy::types::{
    Denial, Grant, KeyOps, KeySubscription, Outcome, Subscriptions, SweepReason, ValueKind,
};

/// What a policy is and asks for, returned by
/// [`Policy::manifest`](crate::Policy::manifest). Build one with
/// [`Manifest::new`] and the builder methods below rather than a struct
/// literal: they read like the policy's description. `subscriptions` holds
/// what the policy is woken for (keyspace events, deploy hooks, periodic
/// sweeps).
///
pub use crate::bindings::cachepol::policy::types::Manifest;

/// A keyspace event, as [`Policy::on_key`](crate::Policy::on_key) receives
/// it. `db` is the number of the Redis database the key lives in (the `N`
/// of `__keyevent@N__`), `0` unless the application uses `SELECT`.
///
pub use crate::bindings::cachepol::policy::types::KeyEvent;

/// A deploy hook, as [`Policy::on_deploy`](crate::Policy::on_deploy)
/// receives it. `service` names the service that was deployed, as the
/// sender wrote it; the manifest's [`Manifest::on_deploys`] decides which
/// services reach the policy.
///
pub use crate::bindings::cachepol::policy::types::DeployEvent;

/// What the host delivers: a keyspace event (`Key`), a deploy hook
/// (`Deploy`) or a sweep (`Sweep`). The SDK unpacks it into
/// [`Policy::on_key`](crate::Policy::on_key),
/// [`Policy::on_deploy`](crate::Policy::on_deploy) and
/// [`Policy::on_sweep`](crate::Policy::on_sweep), so a policy rarely sees
/// one.
///
pub use crate::bindings::cachepol::policy::types::Event;

/// A sweep, as the host delivers it; the SDK passes its `reason` to
/// [`Policy::on_sweep`](crate::Policy::on_sweep).
///
pub use crate::bindings::cachepol::policy::types::SweepEvent;

/// Why a host call or a hook failed. Match on it to tell what went wrong;
/// a host call's refusal or failure can be returned from a hook as it is
/// (`?`), and the policy's own failures are [`Error::policy`].
///
pub use crate::bindings::cachepol::policy::types::Error;

/// A key's TTL, as [`redis::ttl`](crate::redis::ttl) answers it;
/// [`KeyTtl::remaining`] gives the time left as a [`Duration`].
///
pub use crate::bindings::cachepol::policy::types::KeyTtl;

/// How [`redis::set`](crate::redis::set) writes. `condition` says when the
/// write happens (always, `NX` or `XX`). Start from
/// [`SetOptions::default`], a plain `SET`, and [`SetOptions::with_ttl`].
///
pub use crate::bindings::cachepol::policy::types::SetOptions;

/// When [`redis::expire`](crate::redis::expire) and its [`Duration`] form
/// [`redis::expire_in`](crate::redis::expire_in) apply a TTL.
///
pub use crate::bindings::cachepol::policy::types::ExpireCondition;

/// When [`redis::set`](crate::redis::set) writes; part of a
/// [`SetOptions`].
///
pub use crate::bindings::cachepol::policy::types::SetCondition;

/// A row of a TTL table for
/// [`redis::expire_matching_rows`](crate::redis::expire_matching_rows).
/// `ttl_ms` is the TTL in milliseconds; [`ExpireRow::new`] takes a
/// [`Duration`] instead.
///
pub use crate::bindings::cachepol::policy::types::ExpireRow;

/// One page of [`redis::scan`](crate::redis::scan); `keys` holds the
/// page's keys. [`redis::scan_all`](crate::redis::scan_all) follows the
/// cursor for you.
///
pub use crate::bindings::cachepol::policy::types::ScanPage;

/// A [`Duration`] as the whole milliseconds the host takes, rounded up so
/// that a non-zero duration never becomes the zero TTL the host refuses,
/// and saturating (the host refuses a TTL that long as out of range).
pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

impl Manifest {
    /// A manifest with no subscriptions and no grants yet.
    ///
    /// `name` must be unique among the loaded policies (`[a-z0-9-]`, 1 to 64
    /// characters; by convention the `.wasm` file's name), and `version` is
    /// shown in the reload log line and the audit trail, so pass the crate's.
    ///
    /// ```
    /// # use cachepol_guest_sdk::Manifest;
    /// let manifest = Manifest::new("drop-quiz", env!("CARGO_PKG_VERSION"));
    /// assert!(manifest.grants.is_empty());
    /// ```
    pub fn new(name: &str, version: &str) -> Manifest {
        Manifest {
            name: name.to_owned(),
            version: version.to_owned(),
            description: String::new(),
            subscriptions: Subscriptions { keys: Vec::new(), deploys: Vec::new(), sweep_interval_secs: None },
            grants: Vec::new(),
        }
    }

    /// One line for operators, shown by `cachepol check` and
    /// `cachepol status`: say what the policy does to the cache.
    ///
    /// ```
    /// # use cachepol_guest_sdk::Manifest;
    /// let manifest = Manifest::new("drop-quiz", "1.0.0").description("drop the quiz cache on each quiz deploy");
    /// ```
    pub fn description(mut self, text: &str) -> Manifest {
        self.description = text.to_owned();
        self
    }

    /// Receive keyspace events `ops` (empty: all) on keys matching `patterns`.
    ///
    /// Each pattern must lie inside a `READ` grant: a policy hears only about
    /// keys it could look at. Name the ops: every op the policies listen to
    /// is a notification the daemon reads, so `&[]` costs the most.
    /// [`KeyEvent::WRITE_OPS`] is the usual "a value was written".
    ///
    /// ```
    /// # use cachepol_guest_sdk::{KeyOps, Manifest};
    /// let manifest = Manifest::new("genre-watch", "1.0.0")
    ///     .on_keys(&["set"], &["last_updated:*"])
    ///     .grant("last_updated:*", KeyOps::READ);
    /// assert_eq!(manifest.subscriptions.keys[0].ops, ["set"]);
    /// ```
    pub fn on_keys(mut self, ops: &[&str], patterns: &[&str]) -> Manifest {
        self.subscriptions.keys.push(KeySubscription {
            ops: ops.iter().map(|s| s.to_string()).collect(),
            patterns: patterns.iter().map(|s| s.to_string()).collect(),
        });
        self
    }

    /// Receive deploy hooks from these services (`"*"` for all).
    ///
    /// ```
    /// # use cachepol_guest_sdk::Manifest;
    /// let manifest = Manifest::new("drop-quiz", "1.0.0").on_deploys(&["quiz-service"]);
    /// assert_eq!(manifest.subscriptions.deploys, ["quiz-service"]);
    /// ```
    pub fn on_deploys(mut self, services: &[&str]) -> Manifest {
        self.subscriptions.deploys.extend(services.iter().map(|s| s.to_string()));
        self
    }

    /// Get a periodic `sweep` every `seconds`.
    ///
    /// Start, reconnect and gap sweeps happen anyway; a periodic one is for
    /// policies that must also catch what no event announces (a key that
    /// outlived its welcome without being written).
    ///
    /// ```
    /// # use cachepol_guest_sdk::Manifest;
    /// let manifest = Manifest::new("stale-locks", "1.0.0").sweep_every(300);
    /// assert_eq!(manifest.subscriptions.sweep_interval_secs, Some(300));
    /// ```
    pub fn sweep_every(mut self, seconds: u32) -> Manifest {
        self.subscriptions.sweep_interval_secs = Some(seconds);
        self
    }

    /// Ask for `ops` on keys matching `pattern`.
    ///
    /// Ask for the least that works: the grants are the operator's view of
    /// what the policy may touch, they may narrow them but never widen them,
    /// and every call outside them is refused. Combine ops with `|`.
    ///
    /// ```
    /// # use cachepol_guest_sdk::{KeyOps, Manifest};
    /// let manifest = Manifest::new("ttl-table", "1.0.0").grant("job:*", KeyOps::READ | KeyOps::EXPIRE);
    /// assert!(manifest.grants[0].ops.contains(KeyOps::EXPIRE));
    /// ```
    pub fn grant(mut self, pattern: &str, ops: KeyOps) -> Manifest {
        self.grants.push(Grant { pattern: pattern.to_owned(), ops });
        self
    }
}

impl KeyEvent {
    /// The keyspace events Redis emits when a command writes a value (as
    /// opposed to deleting, expiring or renaming away): what a policy that
    /// reacts to "a key was written" subscribes to.
    ///
    /// ```
    /// # use cachepol_guest_sdk::{KeyEvent, Manifest};
    /// let manifest = Manifest::new("ttl-table", "1.0.0").on_keys(KeyEvent::WRITE_OPS, &["job:*"]);
    /// assert!(KeyEvent::WRITE_OPS.contains(&"hset"));
    /// ```
    pub const WRITE_OPS: &'static [&'static str] = &[
        "set",
        "setrange",
        "append",
        "incrby",
        "incrbyfloat",
        "hset",
        "hincrby",
        "hincrbyfloat",
        "lpush",
        "rpush",
        "linsert",
        "lset",
        "sadd",
        "zadd",
        "zincr",
        "xadd",
        "rename_to",
        "copy_to",
        "restore",
    ];
}

impl DeployEvent {
    /// The first value of tag `name`.
    ///
    /// ```
    /// # use cachepol_guest_sdk::DeployEvent;
    /// let hook = DeployEvent {
    ///     id: "1-0".into(),
    ///     service: "catalog".into(),
    ///     files: vec![],
    ///     tags: vec![("version".into(), "3".into())],
    /// };
    /// assert_eq!(hook.tag("version"), Some("3"));
    /// assert_eq!(hook.tag("genre"), None);
    /// ```
    pub fn tag<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.tags_named(name).next()
    }

    /// Every value of tag `name` (a hook may carry `genre=rock` and
    /// `genre=dance`).
    ///
    /// ```
    /// # use cachepol_guest_sdk::DeployEvent;
    /// let hook = DeployEvent {
    ///     id: "1-0".into(),
    ///     service: "catalog".into(),
    ///     files: vec![],
    ///     tags: vec![("genre".into(), "rock".into()), ("genre".into(), "dance".into())],
    /// };
    /// assert_eq!(hook.tags_named("genre").collect::<Vec<_>>(), ["rock", "dance"]);
    /// ```
    pub fn tags_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.tags.iter().filter(move |(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

impl Outcome {
    /// Nothing deferred, no note: the usual answer of a hook.
    ///
    /// The host counts what the calls did (deleted, expired, written) by
    /// itself; the outcome only adds what it cannot see.
    ///
    /// ```
    /// # use cachepol_guest_sdk::Outcome;
    /// assert_eq!(Outcome::done().deferred, 0);
    /// ```
    pub fn done() -> Outcome {
        Outcome { deferred: 0, note: None }
    }

    /// `count` pieces of work postponed (a clear waiting for a lock), so the
    /// audit trail shows that the hook did not do everything yet.
    ///
    /// ```
    /// # use cachepol_guest_sdk::Outcome;
    /// let outcome = Outcome::deferred(1).with_note("quiz:* waits for lock:file:quiz.py");
    /// ```
    pub fn deferred(count: u32) -> Outcome {
        Outcome { deferred: count, note: None }
    }

    /// Attach a note for the audit trail: the policy's words on what it did
    /// and why, next to the host's counts.
    ///
    /// ```
    /// # use cachepol_guest_sdk::Outcome;
    /// let outcome = Outcome::done().with_note("dance: 4 deleted");
    /// assert_eq!(outcome.note.as_deref(), Some("dance: 4 deleted"));
    /// ```
    pub fn with_note(mut self, note: impl Into<String>) -> Outcome {
        self.note = Some(note.into());
        self
    }
}

impl Default for Outcome {
    fn default() -> Outcome {
        Outcome::done()
    }
}

impl Error {
    /// The policy's own failure, with a message.
    ///
    /// Returned from a hook it fails that call only: logged with the
    /// message, counted as an error, and counted by the circuit breaker.
    ///
    /// ```
    /// # use cachepol_guest_sdk::Error;
    /// let error = Error::policy("`rows` is empty");
    /// assert!(matches!(error, Error::Policy(m) if m == "`rows` is empty"));
    /// ```
    pub fn policy(message: impl Into<String>) -> Error {
        Error::Policy(message.into())
    }
}

impl Default for SetOptions {
    /// A plain `SET`: always write, no TTL.
    fn default() -> SetOptions {
        SetOptions { ttl_ms: None, condition: SetCondition::Always, keep_ttl: false }
    }
}

impl SetOptions {
    /// These options with a TTL given as a [`Duration`] (`PX`).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use cachepol_guest_sdk::{SetCondition, SetOptions};
    /// let options = SetOptions { condition: SetCondition::IfAbsent, ..SetOptions::default() }
    ///     .with_ttl(Duration::from_secs(60));
    /// assert_eq!(options.ttl_ms, Some(60_000));
    /// ```
    pub fn with_ttl(mut self, ttl: Duration) -> SetOptions {
        self.ttl_ms = Some(duration_ms(ttl));
        self
    }
}

impl ExpireRow {
    /// A row of [`redis::expire_matching_rows`](crate::redis::expire_matching_rows):
    /// keys matching `pattern` get `ttl`; with `only_if_persistent`, keys
    /// that already have a TTL keep theirs.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use cachepol_guest_sdk::ExpireRow;
    /// let rows = [
    ///     ExpireRow::new("graph_data:*", Duration::from_secs(3600), true),
    ///     ExpireRow::new("job:*", Duration::from_secs(86_400), true),
    /// ];
    /// assert_eq!(rows[0].ttl_ms, 3_600_000);
    /// ```
    pub fn new(pattern: &str, ttl: Duration, only_if_persistent: bool) -> ExpireRow {
        ExpireRow { pattern: pattern.to_owned(), ttl_ms: duration_ms(ttl), only_if_persistent }
    }
}

impl KeyTtl {
    /// The time left before the key expires; `None` for a missing or a
    /// persistent key (match on the variants to tell them apart).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use cachepol_guest_sdk::KeyTtl;
    /// assert_eq!(KeyTtl::ExpiresInMs(1500).remaining(), Some(Duration::from_millis(1500)));
    /// assert_eq!(KeyTtl::Persistent.remaining(), None);
    /// ```
    pub fn remaining(&self) -> Option<Duration> {
        match self {
            KeyTtl::ExpiresInMs(ms) => Some(Duration::from_millis(*ms)),
            KeyTtl::Missing | KeyTtl::Persistent => None,
        }
    }
}

impl SweepReason {
    /// The reason as the WIT names it: `start`, `reconnect`, `gap`,
    /// `periodic`, `manual` or `reload`; for log lines and notes.
    ///
    /// ```
    /// # use cachepol_guest_sdk::SweepReason;
    /// assert_eq!(SweepReason::Gap.name(), "gap");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            SweepReason::Start => "start",
            SweepReason::Reconnect => "reconnect",
            SweepReason::Gap => "gap",
            SweepReason::Periodic => "periodic",
            SweepReason::Manual => "manual",
            SweepReason::Reload => "reload",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_up_to_whole_milliseconds() {
        assert_eq!(duration_ms(Duration::ZERO), 0, "zero stays zero, for the host to refuse");
        assert_eq!(duration_ms(Duration::from_nanos(1)), 1);
        assert_eq!(duration_ms(Duration::from_micros(1500)), 2);
        assert_eq!(duration_ms(Duration::from_millis(1)), 1);
        assert_eq!(duration_ms(Duration::from_secs(3600)), 3_600_000);
        assert_eq!(duration_ms(Duration::MAX), u64::MAX);
    }

    #[test]
    fn duration_constructors_fill_the_millisecond_fields() {
        let row = ExpireRow::new("job:*", Duration::from_secs(90), false);
        assert_eq!((row.pattern.as_str(), row.ttl_ms, row.only_if_persistent), ("job:*", 90_000, false));
        let options = SetOptions::default().with_ttl(Duration::from_millis(250));
        assert_eq!(options.ttl_ms, Some(250));
        assert_eq!(options.condition, SetCondition::Always);
        assert_eq!(KeyTtl::ExpiresInMs(0).remaining(), Some(Duration::ZERO));
        assert_eq!(KeyTtl::Missing.remaining(), None);
    }
}
