//! The WIT types, re-exported under short names, with builders and helpers
//! so that policies read like the runbooks they replace.

pub use crate::bindings::cachepol::policy::types::{
    Denial, DeployEvent, Error, Event, ExpireCondition, ExpireRow, Grant, KeyEvent, KeyOps, KeySubscription, KeyTtl,
    Manifest, Outcome, ScanPage, SetCondition, SetOptions, Subscriptions, SweepEvent, SweepReason, ValueKind,
};

impl Manifest {
    /// A manifest with no subscriptions and no grants yet.
    pub fn new(name: &str, version: &str) -> Manifest {
        Manifest {
            name: name.to_owned(),
            version: version.to_owned(),
            description: String::new(),
            subscriptions: Subscriptions { keys: Vec::new(), deploys: Vec::new(), sweep_interval_secs: None },
            grants: Vec::new(),
        }
    }

    /// One line for operators.
    pub fn description(mut self, text: &str) -> Manifest {
        self.description = text.to_owned();
        self
    }

    /// Receive keyspace events `ops` (empty: all) on keys matching `patterns`.
    pub fn on_keys(mut self, ops: &[&str], patterns: &[&str]) -> Manifest {
        self.subscriptions.keys.push(KeySubscription {
            ops: ops.iter().map(|s| s.to_string()).collect(),
            patterns: patterns.iter().map(|s| s.to_string()).collect(),
        });
        self
    }

    /// Receive deploy hooks from these services (`"*"` for all).
    pub fn on_deploys(mut self, services: &[&str]) -> Manifest {
        self.subscriptions.deploys.extend(services.iter().map(|s| s.to_string()));
        self
    }

    /// Get a periodic `sweep` every `seconds`.
    pub fn sweep_every(mut self, seconds: u32) -> Manifest {
        self.subscriptions.sweep_interval_secs = Some(seconds);
        self
    }

    /// Ask for `ops` on keys matching `pattern`.
    pub fn grant(mut self, pattern: &str, ops: KeyOps) -> Manifest {
        self.grants.push(Grant { pattern: pattern.to_owned(), ops });
        self
    }
}

impl KeyEvent {
    /// The keyspace events Redis emits when a command writes a value (as
    /// opposed to deleting, expiring or renaming away): what a policy that
    /// reacts to "a key was written" subscribes to.
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
    pub fn tag<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.tags_named(name).next()
    }

    /// Every value of tag `name` (a hook may carry `genre=rock` and
    /// `genre=dance`).
    pub fn tags_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.tags.iter().filter(move |(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

impl Outcome {
    /// Nothing deferred, no note.
    pub fn done() -> Outcome {
        Outcome { deferred: 0, note: None }
    }

    /// `count` pieces of work postponed.
    pub fn deferred(count: u32) -> Outcome {
        Outcome { deferred: count, note: None }
    }

    /// Attach a note for the audit trail.
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

impl SweepReason {
    /// The reason as the WIT names it: `start`, `reconnect`, `gap`,
    /// `periodic`, `manual` or `reload`.
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
