//! A trigger ledger: what a policy last acted on, per trigger key, kept in
//! Redis, so that a sweep finds the triggers whose notifications were lost.
//!
//! Keyspace notifications are fire-and-forget: a write made while the
//! daemon restarts, while its subscription is cut, while notifications are
//! off or while a queue overflows is never delivered, and the host answers
//! each such gap with a sweep. A policy whose work hangs on a few *trigger*
//! keys (`last_updated:<genre>`, `flow:meta:<id>`) can only reconcile if it
//! knows which triggers moved since it last acted. The ledger remembers, per
//! trigger key, the value it acted on (or only that the key existed), in the
//! policy's own state keys; on a sweep it walks the trigger keys and hands
//! the policy those whose value changed, those that are new, and, if asked,
//! those that disappeared.
//!
//! ```no_run
//! use cachepol_guest_sdk::prelude::*;
//!
//! /// When a flow's metadata goes, its state goes too, even if the `del`
//! /// notification was lost.
//! struct FlowCascade {
//!     ledger: TriggerLedger,
//! }
//!
//! impl Policy for FlowCascade {
//!     type Config = NoConfig;
//!
//!     fn new(_: NoConfig) -> Result<Self, String> {
//!         let ledger = TriggerLedger::new("flow:meta:*", "cachepol-state:flow-cascade:")
//!             .map_err(|e| e.to_string())?
//!             .watching(Watch::Removals);
//!         Ok(FlowCascade { ledger })
//!     }
//!
//!     fn manifest(&self) -> Manifest {
//!         Manifest::new("flow-cascade", "1.0.0")
//!             .on_keys(&["set", "del", "expired", "evicted"], &["flow:meta:*"])
//!             .ledger(&self.ledger)
//!             .grant("flow:state:*", KeyOps::DELETE)
//!     }
//!
//!     fn on_key(&mut self, event: KeyEvent) -> Result<Outcome, Error> {
//!         // A `set` records the flow; a removal cascades. Either way the
//!         // ledger now agrees with Redis, so a sweep will not redo it.
//!         self.ledger.act_on(&event.key, cascade)?;
//!         Ok(Outcome::done())
//!     }
//!
//!     fn on_sweep(&mut self, _: SweepReason) -> Result<Outcome, Error> {
//!         // Only the flows whose metadata went since they were recorded.
//!         let report = self.ledger.sweep(cascade)?;
//!         Ok(Outcome::done().with_note(report.to_string()))
//!     }
//! }
//!
//! fn cascade(trigger: &Trigger) -> Result<(), Error> {
//!     if trigger.is_removed() {
//!         let id = trigger.key.trim_start_matches("flow:meta:");
//!         redis::delete(&format!("flow:state:{id}"))?;
//!     }
//!     Ok(())
//! }
//!
//! export_policy!(FlowCascade);
//! ```
//!
//! What it keeps, under the prefix the policy gives (grant it with
//! [`Manifest::ledger`]):
//! - `<prefix>seen:<trigger key>`: the value acted on ([`Watch::Writes`]),
//!   or an empty marker ([`Watch::Removals`]); persistent.
//! - `<prefix>walk`: where a sweep cut short by its limits stopped (the
//!   pass and its `SCAN` cursor); the next sweep goes on from there.
//! - `<prefix>since`: when the first walk finished. Until then a trigger
//!   without a record is recorded as the baseline, not acted on, so a first
//!   start on an existing cache does not treat every trigger as new.
//!
//! If the operator narrows the policy's grants without the ledger's keys,
//! the live work goes on and the ledger says, in a warning, that it cannot
//! remember: sweeps then reconcile nothing.
//!
//! Its state is in Redis, so it survives daemon restarts and is shared by
//! the policy's lanes (each trigger key has its own record: no lane
//! overwrites another's). A Redis restarted without persistence loses it
//! with the cache, and the next sweep records a new baseline. The values
//! are compared byte for byte: a trigger rewritten with the same value is
//! not a change, so have the application write something that moves (a
//! timestamp, a version).

use std::fmt;

use crate::glob::{self, Glob};
use crate::{Error, KeyOps, Manifest, SetOptions, redis, warn};

mod walk;

use walk::{Walk, Walker};

/// What a [`TriggerLedger`] watches its trigger keys for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watch {
    /// A trigger written with another value than the one acted on, or new
    /// since the baseline. Records hold the value; one `SCAN` pass over the
    /// trigger keys per walk. The trigger keys should be strings: `MGET`
    /// reads nothing else, so a hash or list trigger is acted on live (and
    /// recorded as existing) but never found changed by a sweep.
    Writes,
    /// A trigger acted on that no longer exists (deleted, expired,
    /// evicted). Records are empty markers; a walk is two `SCAN` passes, one
    /// over the trigger keys (to record new ones) and one over the records.
    /// Trigger keys of any type; each that is not a string costs one
    /// `exists` call in the records pass (`MGET` cannot tell it exists).
    Removals,
    /// Both, in the same two passes.
    WritesAndRemovals,
}

impl Watch {
    fn writes(self) -> bool {
        matches!(self, Watch::Writes | Watch::WritesAndRemovals)
    }

    fn removals(self) -> bool {
        matches!(self, Watch::Removals | Watch::WritesAndRemovals)
    }
}

/// A trigger handed to the policy: its key and what it holds now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trigger {
    /// The trigger key.
    pub key: String,
    /// Its value now (empty under [`Watch::Removals`], which reads no
    /// values); `None` when the key is gone.
    pub value: Option<Vec<u8>>,
}

impl Trigger {
    /// Whether the key is gone.
    ///
    /// ```
    /// # use cachepol_guest_sdk::Trigger;
    /// let gone = Trigger { key: "flow:meta:7".into(), value: None };
    /// assert!(gone.is_removed());
    /// ```
    pub fn is_removed(&self) -> bool {
        self.value.is_none()
    }
}

/// Why a [`TriggerLedger`] cannot be built. Its `Display` is written for
/// the operator whose config holds the prefix: return it from
/// `Policy::new` as the reason the load is refused.
///
/// ```
/// use cachepol_guest_sdk::{LedgerError, TriggerLedger};
///
/// let err = TriggerLedger::new("last_updated:*", "cachepol:mine:").unwrap_err();
/// assert!(matches!(err, LedgerError::Reserved { .. }));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LedgerError {
    /// The state prefix is empty: the records would be the whole keyspace.
    EmptyPrefix,
    /// The state prefix lies under the daemon's own keys (`cachepol:`,
    /// `{cachepol}:`), which no policy may write.
    Reserved {
        /// The prefix as given.
        prefix: String,
    },
    /// The trigger pattern matches the ledger's own keys: its records would
    /// be taken for triggers.
    Overlap {
        /// The trigger pattern.
        triggers: String,
        /// The state prefix.
        prefix: String,
    },
    /// The trigger pattern is not a usable glob.
    BadPattern {
        /// What is wrong with it.
        problem: String,
    },
}

impl fmt::Display for LedgerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LedgerError::EmptyPrefix => write!(f, "the ledger's state prefix is empty"),
            LedgerError::Reserved { prefix } => {
                write!(f, "state prefix `{prefix}` lies under the daemon's own keys (`cachepol:`, `{{cachepol}}:`)")
            }
            LedgerError::Overlap { triggers, prefix } => {
                write!(f, "trigger pattern `{triggers}` matches the ledger's own keys under `{prefix}`")
            }
            LedgerError::BadPattern { problem } => write!(f, "trigger pattern: {problem}"),
        }
    }
}

impl std::error::Error for LedgerError {}

/// What one [`TriggerLedger::sweep`] did, for its note and log line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Triggers handed to the policy (changed, new or removed).
    pub acted: u32,
    /// Of those, how many were gone.
    pub removed: u32,
    /// Triggers recorded without acting: the baseline of a first walk, or
    /// new keys under [`Watch::Removals`].
    pub recorded: u32,
    /// Triggers that had not moved.
    pub unchanged: u32,
    /// Records dropped because their key no longer matches the trigger
    /// pattern (the policy's config changed).
    pub stale: u32,
    /// This sweep was part of the first walk: a trigger without a record
    /// was recorded as the baseline, not acted on.
    pub baseline: bool,
    /// The walk reached its end; `false` when a limit cut it short and the
    /// next sweep goes on from where it stopped.
    pub finished: bool,
}

impl fmt::Display for SweepReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} triggers acted on ({} removed), ", self.acted, self.removed)?;
        if self.baseline {
            write!(f, "{} recorded as the baseline", self.recorded)?;
        } else {
            write!(f, "{} recorded", self.recorded)?;
        }
        write!(f, ", {} unchanged", self.unchanged)?;
        if self.stale > 0 {
            write!(f, ", {} stale records dropped", self.stale)?;
        }
        f.write_str(if self.finished { "; walk finished" } else { "; the walk goes on at the next sweep" })
    }
}

/// The ledger itself: build it in `Policy::new`, grant it in the manifest
/// with [`Manifest::ledger`], call [`TriggerLedger::act_on`] from the live
/// hooks and [`TriggerLedger::sweep`] from `on_sweep`. See the [module
/// docs](self) for an example.
#[derive(Clone, Debug)]
pub struct TriggerLedger {
    triggers: Glob,
    prefix: String,
    watch: Watch,
    page_size: u32,
    walk_calls: u32,
    changes: u32,
}

impl TriggerLedger {
    /// A ledger of the keys matching `triggers`, keeping its records under
    /// `state_prefix` (the policy's own keys; take it from the policy's
    /// config so operators can move it). Watches [`Watch::Writes`]; walks
    /// with `SCAN` pages of 1,000 keys, at most 400 host calls of its own
    /// and 100 triggers acted on per sweep (see the setters).
    ///
    /// ```
    /// use cachepol_guest_sdk::TriggerLedger;
    ///
    /// let ledger = TriggerLedger::new("last_updated:*", "cachepol-state:genres:").unwrap();
    /// assert!(TriggerLedger::new("*", "cachepol-state:genres:").is_err(), "its records would be triggers");
    /// ```
    pub fn new(triggers: &str, state_prefix: &str) -> Result<TriggerLedger, LedgerError> {
        if state_prefix.is_empty() {
            return Err(LedgerError::EmptyPrefix);
        }
        if ["cachepol:", "{cachepol}:"].iter().any(|r| state_prefix.starts_with(r) || r.starts_with(state_prefix)) {
            return Err(LedgerError::Reserved { prefix: state_prefix.to_owned() });
        }
        let glob = Glob::new(triggers);
        if let Some(problem) = glob.lint().into_iter().next() {
            return Err(LedgerError::BadPattern { problem });
        }
        let ledger = TriggerLedger {
            triggers: glob,
            prefix: state_prefix.to_owned(),
            watch: Watch::Writes,
            page_size: 1_000,
            walk_calls: 400,
            changes: 100,
        };
        let own = [ledger.record_key(""), ledger.walk_key(), ledger.since_key()];
        if own.iter().any(|k| ledger.triggers.matches(k)) {
            return Err(LedgerError::Overlap { triggers: triggers.to_owned(), prefix: state_prefix.to_owned() });
        }
        Ok(ledger)
    }

    /// What to watch for (default [`Watch::Writes`]).
    pub fn watching(mut self, watch: Watch) -> TriggerLedger {
        self.watch = watch;
        self
    }

    /// `COUNT` of each `SCAN` page (default 1,000, at least 1): how many
    /// keys of the keyspace Redis looks at per call, matching or not.
    pub fn page_size(mut self, keys: u32) -> TriggerLedger {
        self.page_size = keys.max(1);
        self
    }

    /// Most host calls the ledger itself spends in one sweep (`scan`,
    /// `mget`, `exists`, recording, keeping its place; default 400, at
    /// least 1). The walk stops there and the next sweep goes on: leave
    /// room in the host-call budget (1,000 per event by default) for what
    /// the policy does per trigger. A sweep always moves the walk on by at
    /// least one trigger or page, whatever the limit. Should the host's
    /// budget run out first, that sweep fails (the host's rule), but the
    /// walk's place is kept every few pages, so the next one goes on.
    pub fn walk_calls(mut self, calls: u32) -> TriggerLedger {
        self.walk_calls = calls.max(1);
        self
    }

    /// Most triggers handed to the policy per sweep (default 100, at least
    /// 1); the rest wait for the next sweep.
    pub fn changes_per_sweep(mut self, triggers: u32) -> TriggerLedger {
        self.changes = triggers.max(1);
        self
    }

    /// The trigger pattern.
    pub fn triggers(&self) -> &str {
        self.triggers.as_str()
    }

    /// The glob of the ledger's own keys, which it needs `READ`, `WRITE`
    /// and `DELETE` on ([`Manifest::ledger`] asks for them).
    pub fn state_pattern(&self) -> String {
        format!("{}*", glob::escape(&self.prefix))
    }

    fn record_key(&self, trigger: &str) -> String {
        format!("{}seen:{trigger}", self.prefix)
    }

    fn walk_key(&self) -> String {
        format!("{}walk", self.prefix)
    }

    fn since_key(&self) -> String {
        format!("{}since", self.prefix)
    }

    /// Act on a live event of trigger `key`: read what it holds, call
    /// `act`, then record it (or drop its record if it is gone).
    ///
    /// Read before acting, recorded after: a write landing meanwhile is
    /// newer than the record, so if its own notification is lost the next
    /// sweep still sees it as a change. If `act` fails nothing is recorded.
    /// `key` must match the trigger pattern.
    ///
    /// ```no_run
    /// # use cachepol_guest_sdk::prelude::*;
    /// # fn f(ledger: &TriggerLedger, event: KeyEvent) -> Result<(), Error> {
    /// let deleted = ledger.act_on(&event.key, |_| redis::del(&["graph_data:rock".into()]))?;
    /// # Ok(()) }
    /// ```
    pub fn act_on<T>(&self, key: &str, act: impl FnOnce(&Trigger) -> Result<T, Error>) -> Result<T, Error> {
        if !self.triggers.matches(key) {
            return Err(Error::policy(format!("`{key}` is not a trigger of this ledger ({})", self.triggers)));
        }
        let value = match self.watch.writes() {
            true => match redis::get(key) {
                // A hash or a list: its existence is all a record can hold
                // (and the sweeps, reading with `MGET`, leave it alone).
                Err(Error::Redis(why)) if why.contains("WRONGTYPE") => redis::exists(key)?.then(Vec::new),
                read => read?,
            },
            false => redis::exists(key)?.then(Vec::new),
        };
        let trigger = Trigger { key: key.to_owned(), value };
        let done = act(&trigger)?;
        match self.settle(&trigger) {
            Err(e) if self.is_state_denial(&e) => self.warn_ungranted(&e),
            settled => settled?,
        }
        Ok(done)
    }

    /// A refusal of the ledger's own keys: the operator narrowed the
    /// policy's grants without them.
    fn is_state_denial(&self, e: &Error) -> bool {
        matches!(e, Error::Denied(d) if d.target.starts_with(&self.prefix))
    }

    /// Without its keys the ledger cannot remember, but the policy's live
    /// work goes on: say so rather than fail every event.
    fn warn_ungranted(&self, e: &Error) {
        let why = match e {
            Error::Denied(d) => d.reason.as_str(),
            _ => "",
        };
        warn!(
            "the trigger ledger's keys `{}` are not granted ({why}): triggers missed while nobody listened are not reconciled",
            self.state_pattern()
        );
    }

    /// Walk the trigger keys (and, under [`Watch::Removals`], the records)
    /// and call `act` for each trigger that moved since it was last acted
    /// on; record each once `act` returns.
    ///
    /// Bounded by the ledger's limits ([`TriggerLedger::walk_calls`],
    /// [`TriggerLedger::changes_per_sweep`]) and by the host's budgets: when
    /// one stops it, the walk's place is kept in Redis and the next sweep
    /// goes on from there ([`SweepReport::finished`] says which). The first walk ever
    /// records a baseline instead of acting on triggers it has no record of
    /// ([`SweepReport::baseline`]). Another error from `act` stops the
    /// sweep and is returned; what was acted on before it stays recorded.
    ///
    /// ```no_run
    /// # use cachepol_guest_sdk::prelude::*;
    /// # use cachepol_guest_sdk::info;
    /// # fn f(ledger: &TriggerLedger) -> Result<Outcome, Error> {
    /// let report = ledger.sweep(|trigger| {
    ///     let genre = trigger.key.trim_start_matches("last_updated:");
    ///     redis::delete_matching(&format!("service_playlist:{}:*", glob::escape(genre)))?;
    ///     Ok(())
    /// })?;
    /// if report.baseline {
    ///     info!("first sweep: {} triggers recorded as they are, nothing invalidated", report.recorded);
    /// }
    /// Ok(Outcome::done().with_note(report.to_string()))
    /// # }
    /// ```
    pub fn sweep(&self, act: impl FnMut(&Trigger) -> Result<(), Error>) -> Result<SweepReport, Error> {
        match self.walk(act) {
            Err(e) if self.is_state_denial(&e) => {
                self.warn_ungranted(&e);
                Ok(SweepReport::default())
            }
            walked => walked,
        }
    }

    /// [`TriggerLedger::sweep`], its own keys' refusal an error.
    fn walk(&self, act: impl FnMut(&Trigger) -> Result<(), Error>) -> Result<SweepReport, Error> {
        let established = redis::exists(&self.since_key())?;
        let place = match redis::get_string(&self.walk_key())? {
            None => Walk::START,
            Some(text) => Walk::parse(&text).unwrap_or_else(|| {
                warn!("unreadable walk position `{text}` under `{}`: starting the walk over", self.walk_key());
                Walk::START
            }),
        };
        let mut walker = Walker {
            ledger: self,
            act,
            established,
            calls: 2,
            pages: 0,
            report: SweepReport { baseline: !established, ..SweepReport::default() },
        };
        walker.run(place)?;
        Ok(walker.report)
    }

    /// Record what the policy just acted on, or forget a trigger that went.
    fn settle(&self, trigger: &Trigger) -> Result<(), Error> {
        let record = self.record_key(&trigger.key);
        match &trigger.value {
            None => redis::del(&[record]).map(|_| ()),
            Some(value) => {
                let value: &[u8] = if self.watch.writes() { value } else { &[] };
                redis::set(&record, value, SetOptions::default()).map(|_| ())
            }
        }
    }
}

impl Manifest {
    /// Grant what `ledger` needs: `READ` on its trigger keys, and `READ`,
    /// `WRITE` and `DELETE` on its own state keys.
    ///
    /// ```
    /// # use cachepol_guest_sdk::{KeyOps, Manifest, TriggerLedger};
    /// let ledger = TriggerLedger::new("last_updated:*", "cachepol-state:genres:").unwrap();
    /// let manifest = Manifest::new("genres", "1.0.0").ledger(&ledger);
    /// assert_eq!(manifest.grants[1].pattern, ledger.state_pattern());
    /// assert!(manifest.grants[1].ops.contains(KeyOps::WRITE | KeyOps::DELETE));
    /// ```
    pub fn ledger(self, ledger: &TriggerLedger) -> Manifest {
        self.grant(ledger.triggers(), KeyOps::READ)
            .grant(&ledger.state_pattern(), KeyOps::READ | KeyOps::WRITE | KeyOps::DELETE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_patterns_are_checked() {
        let err = |t: &str, p: &str| TriggerLedger::new(t, p).unwrap_err();
        assert_eq!(err("a:*", ""), LedgerError::EmptyPrefix);
        assert!(matches!(err("a:*", "cachepol:x:"), LedgerError::Reserved { .. }));
        assert!(matches!(err("a:*", "{cachepol}:x:"), LedgerError::Reserved { .. }));
        assert!(matches!(err("a:*", "cachepol"), LedgerError::Reserved { .. }), "a prefix of the reserved space");
        assert!(matches!(err("state:*", "state:"), LedgerError::Overlap { .. }));
        assert!(err("a:*", "").to_string().contains("empty"));
        let ledger = TriggerLedger::new("flow:meta:*", "cachepol-state:flows:").unwrap();
        assert_eq!(ledger.record_key("flow:meta:7"), "cachepol-state:flows:seen:flow:meta:7");
        let state = Glob::new(&ledger.state_pattern());
        assert!(state.matches("cachepol-state:flows:walk") && !state.matches("cachepol-state:flowsX"));
        let escaped = TriggerLedger::new("a:*", "st*te:").unwrap();
        assert!(!Glob::new(&escaped.state_pattern()).matches("stXte:walk"), "the prefix is literal");
    }

    #[test]
    fn limits_have_a_floor_of_one() {
        let ledger = TriggerLedger::new("a:*", "s:").unwrap().page_size(0).walk_calls(0).changes_per_sweep(0);
        assert_eq!((ledger.page_size, ledger.walk_calls, ledger.changes), (1, 1, 1));
    }

    #[test]
    fn reports_read_as_notes() {
        let report = SweepReport { acted: 2, removed: 1, recorded: 3, unchanged: 4, ..SweepReport::default() };
        assert_eq!(
            report.to_string(),
            "2 triggers acted on (1 removed), 3 recorded, 4 unchanged; the walk goes on at the next sweep"
        );
        let first = SweepReport { recorded: 5, baseline: true, finished: true, ..SweepReport::default() };
        assert_eq!(
            first.to_string(),
            "0 triggers acted on (0 removed), 5 recorded as the baseline, 0 unchanged; walk finished"
        );
    }
}
