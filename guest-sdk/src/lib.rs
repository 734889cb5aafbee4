//! Write cachepol cache policies in Rust.
//!
//! A policy is a type implementing [`Policy`]: it builds itself from its
//! typed config in [`Policy::new`], says what it wants in
//! [`Policy::manifest`], and overrides the hooks it cares about (`on_key`,
//! `on_deploy`, `on_sweep`); the others do nothing. One line,
//! [`export_policy!`], turns it into the WebAssembly component the daemon
//! loads. Policy authors never touch the generated WIT bindings.
//!
//! ```no_run
//! use cachepol_guest_sdk::prelude::*;
//!
//! struct DropQuiz;
//!
//! impl Policy for DropQuiz {
//!     type Config = NoConfig;
//!     fn manifest(&self) -> Manifest {
//!         Manifest::new("drop-quiz", env!("CARGO_PKG_VERSION"))
//!             .on_deploys(&["quiz-service"])
//!             .grant("quiz:*", KeyOps::DELETE)
//!     }
//!     fn new(_: NoConfig) -> Result<Self, String> {
//!         Ok(DropQuiz)
//!     }
//!     fn on_deploy(&mut self, _: DeployEvent) -> Result<Outcome, Error> {
//!         redis::delete_matching("quiz:*")?;
//!         Ok(Outcome::done())
//!     }
//! }
//!
//! export_policy!(DropQuiz);
//! ```
//!
//! Module map:
//! - [`glob`]: Redis-identical glob matching, escaping, and pattern coverage.
//! - [`keys`]: key-name conventions (segments, `prefix:version:key`, templates).
//! - `policy` (feature `bindings`): the [`Policy`] trait and the export glue.
//! - [`redis`], [`log`], [`clock`] (feature `bindings`): what the host lends a
//!   policy, with a few conveniences.
//! - [`ledger`] (feature `bindings`): [`TriggerLedger`], what a policy last
//!   acted on per trigger key, so its sweep finds the triggers whose
//!   notifications were lost.
//!
//! Without the default `bindings` feature only `glob` and `keys` are built;
//! the host uses them that way, so host and guests share one matcher.
//!
//! The guide `guest-sdk/docs/writing-a-policy.md` walks from `cachepol new`
//! to a policy enforcing in production.

// Policy authors read these docs instead of the host's source: every public
// item says what it is for.
#![deny(missing_docs)]
// The crate docs link to the trait, the macro and the host modules, which
// exist only with `bindings`; the host's build without it documents the rest.
#![cfg_attr(not(feature = "bindings"), allow(rustdoc::broken_intra_doc_links))]

// Lets the generated bindings name this crate by its public path, which is
// also how the export macro reaches them from a policy crate.
#[cfg(feature = "bindings")]
extern crate self as cachepol_guest_sdk;

pub mod glob;
pub mod keys;

#[cfg(feature = "bindings")]
pub mod ledger;

#[cfg(feature = "bindings")]
mod policy;
#[cfg(feature = "bindings")]
mod types;

#[cfg(feature = "bindings")]
pub use ledger::{LedgerError, SweepReport, Trigger, TriggerLedger, Watch};
#[cfg(feature = "bindings")]
pub use policy::{NoConfig, Policy};
#[cfg(feature = "bindings")]
pub use types::*;

/// The generated WIT bindings. Not a stable API: use the re-exports.
#[cfg(feature = "bindings")]
#[doc(hidden)]
#[allow(clippy::all, missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "policy",
        path: "../wit",
        pub_export_macro: true,
        default_bindings_module: "::cachepol_guest_sdk::bindings",
        runtime_path: "::cachepol_guest_sdk::__private::wit_bindgen::rt",
        bitflags_path: "::cachepol_guest_sdk::__private::wit_bindgen::rt::bitflags",
        additional_derives: [PartialEq, Eq, Clone],
    });
}

/// Implementation details the export macro needs.
#[cfg(feature = "bindings")]
#[doc(hidden)]
#[allow(missing_docs)]
pub mod __private {
    pub use crate::policy::{configure, describe, handle, handle_keys};
    pub use wit_bindgen;
}

#[cfg(feature = "bindings")]
pub mod redis {
    //! What a policy may do to Redis: the host's functions, and typed helpers
    //! over them.
    //!
    //! Two layers live here. The host's own functions ([`get`], [`mget`],
    //! [`set`], [`del`], [`expire`], ...) are re-exported as wit-bindgen
    //! generates them from `wit/policy.wit`: one function per WIT function,
    //! its name and arguments in snake case (`expire-matching` is
    //! [`expire_matching`], `ttl-ms` is `ttl_ms`), each documented with the
    //! contract's own words. Around them, helpers take what a policy usually
    //! has in hand (a `&str`, a [`Duration`], a serde type) so that policies
    //! do not repeat the conversions.
    //!
    //! Every call goes through the host, which checks each key and pattern
    //! against the policy's grants before anything reaches Redis: a refusal
    //! is [`Error::Denied`], logged and counted (`cachepol_denials_total`),
    //! and nothing is sent. Every call also counts against the per-event
    //! budgets the operator sets: host calls (1,000 by default), keys
    //! deleted, expired or read by `mget` (1,000,000), bytes per value
    //! written (1 MiB); going over is [`Error::BudgetExceeded`]. That is why
    //! the helpers prefer one host call to many, and why a policy should too:
    //! [`mget`] rather than a loop of [`get`], [`delete_matching`] rather
    //! than [`scan`] and [`del`], [`expire_matching_rows`] rather than one
    //! [`expire_matching`] per row.
    //!
    //! | need | host function | helper | grant needed |
    //! |---|---|---|---|
    //! | one value | [`get`] | [`get_string`], [`get_json`] | `READ` |
    //! | many values | [`mget`] | [`mget_strings`], [`mget_json`] | `READ` |
    //! | existence, TTL, type | [`exists`], [`ttl`], [`key_type`] | [`KeyTtl::remaining`](crate::KeyTtl::remaining) | `READ` |
    //! | list keys | [`scan`] | [`scan_all`] | `READ` |
    //! | write a value | [`set`] | [`set_string`], [`SetOptions::with_ttl`] | `WRITE` |
    //! | delete keys | [`del`] | [`delete`] | `DELETE` |
    //! | delete by pattern | [`delete_matching`] | | `DELETE` |
    //! | TTL of one key | [`expire`], [`expire_queued`], [`persist`] | [`expire_in`], [`expire_in_queued`] | `EXPIRE` |
    //! | TTL by pattern | [`expire_matching`], [`expire_matching_rows`] | [`expire_matching_in`], [`ExpireRow::new`](crate::ExpireRow::new) | `EXPIRE` |
    //! | locks | [`lock_acquire`], [`lock_release`] | [`lock_acquire_for`] | `LOCK` |
    //!
    //! The host functions take TTLs in milliseconds; the helpers take a
    //! `Duration`, rounded up to whole milliseconds so that a non-zero duration
    //! never turns into the zero TTL the host refuses.
    //!
    //! None of these exist outside WebAssembly: on the host's own target they
    //! panic, which is why their examples are compiled but not run. Test a
    //! policy with `cachepol test`, on the fake host.

    pub use crate::bindings::cachepol::policy::redis::{
        del, delete_matching, exists, expire, expire_matching, expire_matching_rows, expire_queued, get, key_type,
        lock_acquire, lock_release, mget, persist, scan, set, ttl,
    };
    use std::time::Duration;

    use serde::de::DeserializeOwned;

    use crate::types::duration_ms;
    use crate::{Error, ExpireCondition, SetOptions};

    /// Delete one key; returns whether it existed.
    ///
    /// [`del`] takes a list, as Redis's `UNLINK` does; this is the common
    /// one-key case without building a `Vec` at the call site. Deleting
    /// several keys? Pass them all to [`del`]: one host call, not many.
    ///
    /// ```no_run
    /// # use cachepol_guest_sdk::{info, redis, Error};
    /// # fn f() -> Result<(), Error> {
    /// if redis::delete("quiz:today")? {
    ///     info!("dropped today's quiz");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn delete(key: &str) -> Result<bool, Error> {
        Ok(del(&[key.to_owned()])? > 0)
    }

    /// `GET` as UTF-8 text; `None` if the key does not exist.
    ///
    /// Bytes that are not UTF-8 become U+FFFD rather than an error: a
    /// policy reading a marker or a version number should not fail on a
    /// stray byte. Use [`get`] when the exact bytes matter.
    ///
    /// ```no_run
    /// # use cachepol_guest_sdk::{redis, Error};
    /// # fn f() -> Result<(), Error> {
    /// let version = redis::get_string("catalog:version")?.unwrap_or_default();
    /// # Ok(()) }
    /// ```
    pub fn get_string(key: &str) -> Result<Option<String>, Error> {
        Ok(get(key)?.map(lossy_string))
    }

    /// `GET` a value the application stored as JSON, decoded into `T`;
    /// `None` if the key does not exist.
    ///
    /// A value that is not JSON, or not JSON of `T`'s shape, is an
    /// [`Error::Policy`] naming the key and serde's complaint, so the log
    /// points at the data rather than at the policy. Returned from a hook,
    /// it fails that one call; match on it instead to skip bad values.
    ///
    /// ```no_run
    /// use cachepol_guest_sdk::prelude::*;
    ///
    /// #[derive(Deserialize)]
    /// struct Release {
    ///     genres: Vec<String>,
    /// }
    ///
    /// # fn f() -> Result<(), Error> {
    /// if let Some(release) = redis::get_json::<Release>("catalog:release")? {
    ///     for genre in &release.genres {
    ///         redis::delete(&format!("graph_data:{genre}"))?;
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, Error> {
        get(key)?.map(|bytes| decode_json(key, &bytes)).transpose()
    }

    /// `MGET` as UTF-8 text: one value per key, in order, `None` for a key
    /// that does not exist (or holds something other than a string).
    ///
    /// One host call and one round trip to Redis however many keys, where a
    /// loop of [`get_string`] spends a call per key of the event's budget.
    /// Each key still counts toward the keys budget, and each must lie
    /// inside a `READ` grant or the whole call is denied. An empty `keys`
    /// makes no host call. Bytes that are not UTF-8 become U+FFFD, as in
    /// [`get_string`].
    ///
    /// ```no_run
    /// # use cachepol_guest_sdk::{redis, Error};
    /// # fn f() -> Result<(), Error> {
    /// let genres = ["rock", "dance", "jazz"];
    /// let keys: Vec<String> = genres.iter().map(|g| format!("last_updated:{g}")).collect();
    /// for (genre, stamp) in genres.iter().zip(redis::mget_strings(&keys)?) {
    ///     if stamp.is_none() {
    ///         // Never updated: whatever is cached for it is stale.
    ///         redis::delete(&format!("graph_data:{genre}"))?;
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn mget_strings(keys: &[String]) -> Result<Vec<Option<String>>, Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        decode_values(keys, mget(keys)?, |_, value| Ok(lossy_string(value)))
    }

    /// `MGET` of values stored as JSON, each decoded into `T`: one value per
    /// key, in order, `None` for a key that does not exist.
    ///
    /// One host call however many keys, with the budget and grant rules of
    /// [`mget_strings`]. The first value that does not decode fails the
    /// whole call with an [`Error::Policy`] naming its key, as
    /// [`get_json`] would: a batch is either all read or not used. To
    /// tolerate bad values one by one, call [`mget`] and decode each with
    /// `serde_json` yourself. An empty `keys` makes no host call.
    ///
    /// ```no_run
    /// use cachepol_guest_sdk::prelude::*;
    ///
    /// #[derive(Deserialize)]
    /// struct Meta {
    ///     owner: String,
    /// }
    ///
    /// # fn f() -> Result<(), Error> {
    /// let keys = vec!["flow:meta:1".to_owned(), "flow:meta:2".to_owned()];
    /// let orphans = redis::mget_json::<Meta>(&keys)?
    ///     .iter()
    ///     .filter(|meta| meta.as_ref().is_some_and(|m| m.owner.is_empty()))
    ///     .count();
    /// # Ok(()) }
    /// ```
    pub fn mget_json<T: DeserializeOwned>(keys: &[String]) -> Result<Vec<Option<T>>, Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        decode_values(keys, mget(keys)?, |key, value| decode_json(key, &value))
    }

    /// Plain `SET key value [PX ttl]`, always written.
    ///
    /// For a marker or a small piece of state a policy keeps in Redis (its
    /// lanes share nothing else). `None` writes a persistent key. For
    /// `NX`/`XX` or `KEEPTTL`, call [`set`] with [`SetOptions`].
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use cachepol_guest_sdk::{redis, Error};
    /// # fn f() -> Result<(), Error> {
    /// redis::set_string("cachepol:my-policy:last-run", "2026-11-25", Some(Duration::from_secs(86_400)))?;
    /// # Ok(()) }
    /// ```
    pub fn set_string(key: &str, value: &str, ttl: Option<Duration>) -> Result<(), Error> {
        let options = SetOptions { ttl_ms: ttl.map(duration_ms), ..SetOptions::default() };
        set(key, value.as_bytes(), options).map(|_| ())
    }

    /// [`expire`] with a [`Duration`]: `PEXPIRE key ttl [NX|XX|GT|LT]`;
    /// returns whether a TTL was set.
    ///
    /// Use it when the answer matters (to count or log what changed);
    /// otherwise [`expire_in_queued`] saves the round trip.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use cachepol_guest_sdk::{redis, Error, ExpireCondition};
    /// # fn f() -> Result<(), Error> {
    /// let capped = redis::expire_in("lock:import", Duration::from_secs(300), ExpireCondition::IfShorter)?;
    /// # Ok(()) }
    /// ```
    pub fn expire_in(key: &str, ttl: Duration, condition: ExpireCondition) -> Result<bool, Error> {
        expire(key, duration_ms(ttl), condition)
    }

    /// [`expire_queued`] with a [`Duration`]: a TTL whose answer the policy
    /// does not need, sent without waiting (pipelined with the call's
    /// other queued writes).
    ///
    /// This is what keeps a policy that reacts to every write as fast as
    /// Redis: a batch of keyspace events costs one pipelined round trip
    /// instead of one per key. Grants and budgets are still checked at
    /// once.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use cachepol_guest_sdk::prelude::*;
    /// # fn on_key(event: KeyEvent) -> Result<Outcome, Error> {
    /// redis::expire_in_queued(&event.key, Duration::from_secs(900), ExpireCondition::IfPersistent)?;
    /// Ok(Outcome::done())
    /// # }
    /// ```
    pub fn expire_in_queued(key: &str, ttl: Duration, condition: ExpireCondition) -> Result<(), Error> {
        expire_queued(key, duration_ms(ttl), condition)
    }

    /// [`expire_matching`] with a [`Duration`]: a TTL on every key matching
    /// `pattern`, done by the host in one `SCAN` pass (or a walk of its key
    /// index); returns how many keys got it.
    ///
    /// With `only_if_persistent`, keys that already have a TTL keep theirs:
    /// the usual sweep, giving a TTL to keys written while the daemon was
    /// away without touching the ones the application chose. For several
    /// patterns, [`expire_matching_rows`] does them all in one pass.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use cachepol_guest_sdk::{redis, Error};
    /// # fn f() -> Result<(), Error> {
    /// let fixed = redis::expire_matching_in("job:*", Duration::from_secs(86_400), true)?;
    /// # Ok(()) }
    /// ```
    pub fn expire_matching_in(pattern: &str, ttl: Duration, only_if_persistent: bool) -> Result<u64, Error> {
        expire_matching(pattern, duration_ms(ttl), only_if_persistent)
    }

    /// [`lock_acquire`] with a [`Duration`]: take the lock `name` (a key,
    /// needing a `LOCK` grant) if nobody holds it; `Some(token)` to release
    /// it with, `None` if it is held.
    ///
    /// The TTL is what frees the lock when its holder dies mid-work, so make
    /// it longer than the work takes, not much longer. Release with
    /// [`lock_release`], which deletes the lock only if it still holds the
    /// token (after a TTL ran out, someone else's lock is left alone). In
    /// dry-run mode the answer still says whether the lock is free, but
    /// nothing is taken.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use cachepol_guest_sdk::{redis, Error};
    /// # fn f() -> Result<(), Error> {
    /// if let Some(token) = redis::lock_acquire_for("lock:rebuild:dance", Duration::from_secs(30))? {
    ///     redis::delete_matching("service_playlist:dance:*")?;
    ///     redis::lock_release("lock:rebuild:dance", &token)?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn lock_acquire_for(name: &str, ttl: Duration) -> Result<Option<String>, Error> {
        lock_acquire(name, duration_ms(ttl))
    }

    /// Every key matching `pattern`, following `SCAN` cursors to the end.
    ///
    /// Keys may repeat if they were rewritten during the iteration, as with
    /// Redis's `SCAN`. Each page is one host call against the budget, and
    /// looks at up to 10,000 keys of the keyspace (the host's cap), matching
    /// or not: a large keyspace costs many calls. To act on every match, prefer
    /// [`delete_matching`] or [`expire_matching`], which the host runs
    /// itself.
    ///
    /// ```no_run
    /// # use cachepol_guest_sdk::{redis, Error};
    /// # fn f() -> Result<(), Error> {
    /// let locks = redis::scan_all("lock:*")?;
    /// # Ok(()) }
    /// ```
    pub fn scan_all(pattern: &str) -> Result<Vec<String>, Error> {
        let mut keys = Vec::new();
        let mut cursor = 0;
        loop {
            let page = scan(cursor, pattern, 10_000)?;
            keys.extend(page.keys);
            cursor = page.cursor;
            if cursor == 0 {
                return Ok(keys);
            }
        }
    }

    /// A value as text, replacing invalid UTF-8 (without copying a valid
    /// one).
    fn lossy_string(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    /// Decode the JSON value of `key`; an error names the key, the type
    /// expected and what serde found wrong.
    fn decode_json<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, Error> {
        serde_json::from_slice(bytes).map_err(|e| {
            Error::policy(format!("the value of `{key}` is not JSON of a `{}`: {e}", std::any::type_name::<T>()))
        })
    }

    /// Pair `mget`'s answers with their keys and decode the present ones.
    /// The host answers one value per key; anything else is refused rather
    /// than letting values slide onto the wrong keys.
    fn decode_values<T>(
        keys: &[String],
        values: Vec<Option<Vec<u8>>>,
        mut decode: impl FnMut(&str, Vec<u8>) -> Result<T, Error>,
    ) -> Result<Vec<Option<T>>, Error> {
        if values.len() != keys.len() {
            return Err(Error::policy(format!("mget answered {} values for {} keys", values.len(), keys.len())));
        }
        keys.iter().zip(values).map(|(key, value)| value.map(|v| decode(key, v)).transpose()).collect()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[derive(Debug, PartialEq, serde::Deserialize)]
        struct Release {
            genre: String,
            tracks: u32,
        }

        fn policy_message(result: Result<impl std::fmt::Debug, Error>) -> String {
            match result {
                Err(Error::Policy(message)) => message,
                other => panic!("expected a policy error, got {other:?}"),
            }
        }

        #[test]
        fn decode_json_reads_the_type() {
            let release: Release = decode_json("r:1", br#"{"genre": "dance", "tracks": 12}"#).unwrap();
            assert_eq!(release, Release { genre: "dance".into(), tracks: 12 });
            let n: u64 = decode_json("n", b"42").unwrap();
            assert_eq!(n, 42);
        }

        #[test]
        fn decode_json_errors_name_the_key_the_type_and_the_problem() {
            let message = policy_message(decode_json::<Release>("r:1", b"not json"));
            assert!(message.contains("`r:1`"), "{message}");
            assert!(message.contains("Release"), "{message}");
            assert!(message.contains("expected ident at line 1 column 2"), "{message}");
            let message = policy_message(decode_json::<Release>("r:2", br#"{"genre": "dance"}"#));
            assert!(message.contains("`r:2`") && message.contains("missing field `tracks`"), "{message}");
            let message = policy_message(decode_json::<u64>("n", b""));
            assert!(message.contains("`n`") && message.contains("EOF"), "{message}");
        }

        #[test]
        fn decode_values_keeps_order_and_absent_keys() {
            let keys = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
            let values = vec![Some(b"1".to_vec()), None, Some(b"3".to_vec())];
            let decoded = decode_values(&keys, values, |key, v| decode_json::<u32>(key, &v)).unwrap();
            assert_eq!(decoded, [Some(1), None, Some(3)]);
        }

        #[test]
        fn decode_values_fails_on_the_first_bad_value_naming_its_key() {
            let keys = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
            let values = vec![Some(b"1".to_vec()), Some(b"x".to_vec()), Some(b"y".to_vec())];
            let message = policy_message(decode_values(&keys, values, |key, v| decode_json::<u32>(key, &v)));
            assert!(message.contains("`b`") && !message.contains("`c`"), "{message}");
        }

        #[test]
        fn decode_values_refuses_an_answer_of_the_wrong_length() {
            let keys = vec!["a".to_owned(), "b".to_owned()];
            let message = policy_message(decode_values(&keys, vec![None], |_, v| Ok(v)));
            assert_eq!(message, "mget answered 1 values for 2 keys");
        }

        #[test]
        fn strings_are_lossy_utf8() {
            assert_eq!(lossy_string(b"dance".to_vec()), "dance");
            assert_eq!(lossy_string(vec![b'a', 0xff, b'b']), "a\u{fffd}b");
            let keys = vec!["k".to_owned(), "m".to_owned()];
            let decoded = decode_values(&keys, vec![Some(vec![0xc3, 0xa9]), None], |_, v| Ok(lossy_string(v)));
            assert_eq!(decoded.unwrap(), [Some("é".to_owned()), None]);
        }
    }
}

/// Leveled log lines, tagged with the policy's name in the host's log.
///
/// Use the macros, [`trace!`], [`debug!`], [`info!`], [`warn!`] and
/// [`error!`], which format like `format!`. Lines count against the call's
/// log budget (200 by default) so that a chatty policy cannot flood the
/// daemon's log; past it the host writes one "output truncated" line. The
/// operator's `RUST_LOG` decides which levels show.
#[cfg(feature = "bindings")]
pub mod log {
    /// The level of a line: `Trace`, `Debug`, `Info`, `Warn` or `Error`,
    /// as in the daemon's own log.
    pub use crate::bindings::cachepol::policy::log::Level;
    /// Write one line at `level`; what the macros call. Prefer them: they
    /// format, and they read like the `tracing` lines around them.
    ///
    /// ```no_run
    /// use cachepol_guest_sdk::log::{Level, write};
    /// write(Level::Info, "sweep done");
    /// ```
    pub use crate::bindings::cachepol::policy::log::write;
}

#[cfg(feature = "bindings")]
pub mod clock {
    //! The host's clock: milliseconds since the Unix epoch from [`now_ms`].
    //!
    //! Use it rather than `std::time::SystemTime`: under `cachepol test` the
    //! fake host's clock is virtual (a scenario's `advance` moves it), so a
    //! policy that reads this clock behaves in tests as it does in production.
    //!
    //! ```no_run
    //! let started = cachepol_guest_sdk::clock::now_ms();
    //! ```

    pub use crate::bindings::cachepol::policy::clock::now_ms;
}

/// Everything a policy usually needs, in one `use`.
///
/// The trait, the manifest builder, the event and outcome types, the
/// [`redis`] module, the glob and key helpers, and serde's
/// `Deserialize` for the config type (deriving it still needs `serde` as a
/// dependency of the policy crate, with the `derive` feature).
///
/// ```
/// use cachepol_guest_sdk::prelude::*;
///
/// let manifest = Manifest::new("drop-quiz", "1.0.0").grant("quiz:*", KeyOps::DELETE);
/// assert!(Glob::new(&manifest.grants[0].pattern).matches("quiz:today"));
/// ```
#[cfg(feature = "bindings")]
pub mod prelude {
    pub use crate::glob::{self, Glob};
    pub use crate::keys::{self, Template};
    pub use crate::{
        DeployEvent, Error, Event, ExpireCondition, ExpireRow, KeyEvent, KeyOps, KeyTtl, Manifest, NoConfig, Outcome,
        Policy, SetCondition, SetOptions, SweepReason, Trigger, TriggerLedger, Watch, export_policy, redis,
    };
    pub use serde::Deserialize;
}

#[cfg(feature = "bindings")]
#[doc(hidden)]
#[macro_export]
macro_rules! __log {
    ($level:ident, $($arg:tt)+) => {
        $crate::log::write($crate::log::Level::$level, &::std::format!($($arg)+))
    };
}

/// Log at `trace` level, `format!` style: the detail of every decision, off unless asked for.
///
/// ```no_run
/// use cachepol_guest_sdk::trace;
/// trace!("key {} matched row {}", "job:1", 3);
/// ```
#[cfg(feature = "bindings")]
#[macro_export]
macro_rules! trace { ($($arg:tt)+) => { $crate::__log!(Trace, $($arg)+) }; }
/// Log at `debug` level, `format!` style: what a developer wants while watching a policy at work (`cachepol -v`).
///
/// ```no_run
/// use cachepol_guest_sdk::debug;
/// debug!("{} keys to check", 12);
/// ```
#[cfg(feature = "bindings")]
#[macro_export]
macro_rules! debug { ($($arg:tt)+) => { $crate::__log!(Debug, $($arg)+) }; }
/// Log at `info` level, `format!` style: what the policy did, for the operator reading the log.
///
/// ```no_run
/// use cachepol_guest_sdk::info;
/// info!("genre `{}` changed: {} keys deleted", "dance", 4);
/// ```
#[cfg(feature = "bindings")]
#[macro_export]
macro_rules! info { ($($arg:tt)+) => { $crate::__log!(Info, $($arg)+) }; }
/// Log at `warn` level, `format!` style: something odd the policy worked around (bad data, an ignored event).
///
/// ```no_run
/// use cachepol_guest_sdk::warn;
/// warn!("ignoring an empty genre name");
/// ```
#[cfg(feature = "bindings")]
#[macro_export]
macro_rules! warn { ($($arg:tt)+) => { $crate::__log!(Warn, $($arg)+) }; }
/// Log at `error` level, `format!` style: something the policy could not do; prefer returning an `Error` from the hook, which the host logs and counts.
///
/// ```no_run
/// use cachepol_guest_sdk::error;
/// error!("cannot read `{}`", "catalog:release");
/// ```
#[cfg(feature = "bindings")]
#[macro_export]
macro_rules! error { ($($arg:tt)+) => { $crate::__log!(Error, $($arg)+) }; }
