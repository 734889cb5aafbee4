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
//!
//! Without the default `bindings` feature only `glob` and `keys` are built;
//! the host uses them that way, so host and guests share one matcher.

// Lets the generated bindings name this crate by its public path, which is
// also how the export macro reaches them from a policy crate.
#[cfg(feature = "bindings")]
extern crate self as cachepol_guest_sdk;

pub mod glob;
pub mod keys;

#[cfg(feature = "bindings")]
mod policy;
#[cfg(feature = "bindings")]
mod types;

#[cfg(feature = "bindings")]
pub use policy::{NoConfig, Policy};
#[cfg(feature = "bindings")]
pub use types::*;

/// The generated WIT bindings. Not a stable API: use the re-exports.
#[cfg(feature = "bindings")]
#[doc(hidden)]
#[allow(clippy::all)]
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
pub mod __private {
    pub use crate::policy::{configure, describe, handle, handle_keys};
    pub use wit_bindgen;
}

/// The restricted Redis API. Every key and pattern is checked against the
/// policy's grants by the host; see the WIT docs of each function.
#[cfg(feature = "bindings")]
pub mod redis {
    pub use crate::bindings::cachepol::policy::redis::{
        del, delete_matching, exists, expire, expire_matching, expire_matching_rows, expire_queued, get, key_type,
        lock_acquire, lock_release, persist, scan, set, ttl,
    };
    use crate::{Error, ExpireCondition, SetOptions};
    use std::time::Duration;

    /// Delete one key; returns whether it existed.
    pub fn delete(key: &str) -> Result<bool, Error> {
        Ok(del(&[key.to_owned()])? > 0)
    }

    /// `GET` as UTF-8 text (lossy for non-UTF-8 values).
    pub fn get_string(key: &str) -> Result<Option<String>, Error> {
        Ok(get(key)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Plain `SET key value [PX ttl]`.
    pub fn set_string(key: &str, value: &str, ttl: Option<Duration>) -> Result<(), Error> {
        let options = SetOptions { ttl_ms: ttl.map(duration_ms), ..SetOptions::default() };
        set(key, value.as_bytes(), options).map(|_| ())
    }

    /// `PEXPIRE key ttl` with a [`Duration`].
    pub fn expire_in(key: &str, ttl: Duration, condition: ExpireCondition) -> Result<bool, Error> {
        expire(key, duration_ms(ttl), condition)
    }

    /// [`expire_queued`] with a [`Duration`]: a TTL whose answer the policy
    /// does not need, sent without waiting (pipelined with the call's
    /// other queued writes).
    pub fn expire_in_queued(key: &str, ttl: Duration, condition: ExpireCondition) -> Result<(), Error> {
        expire_queued(key, duration_ms(ttl), condition)
    }

    /// Every key matching `pattern`, following `SCAN` cursors to the end.
    /// Keys may repeat if they were rewritten during the iteration, as with
    /// Redis's `SCAN`.
    pub fn scan_all(pattern: &str) -> Result<Vec<String>, Error> {
        let mut keys = Vec::new();
        let mut cursor = 0;
        loop {
            let page = scan(cursor, pattern, 1000)?;
            keys.extend(page.keys);
            cursor = page.cursor;
            if cursor == 0 {
                return Ok(keys);
            }
        }
    }

    fn duration_ms(d: Duration) -> u64 {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
    }
}

/// Leveled log lines, tagged with the policy's name in the host's log. Use
/// the macros: [`info!`], [`warn!`], ...
#[cfg(feature = "bindings")]
pub mod log {
    pub use crate::bindings::cachepol::policy::log::{Level, write};
}

/// The host's clock (virtual under the fake host).
#[cfg(feature = "bindings")]
pub mod clock {
    pub use crate::bindings::cachepol::policy::clock::now_ms;
}

/// Everything a policy usually needs, in one `use`.
#[cfg(feature = "bindings")]
pub mod prelude {
    pub use crate::glob::{self, Glob};
    pub use crate::keys::{self, Template};
    pub use crate::{
        DeployEvent, Error, Event, ExpireCondition, ExpireRow, KeyEvent, KeyOps, Manifest, NoConfig, Outcome, Policy,
        SetCondition, SetOptions, SweepReason, export_policy, redis,
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

/// Log at `trace` level, `format!` style.
#[cfg(feature = "bindings")]
#[macro_export]
macro_rules! trace { ($($arg:tt)+) => { $crate::__log!(Trace, $($arg)+) }; }
/// Log at `debug` level, `format!` style.
#[cfg(feature = "bindings")]
#[macro_export]
macro_rules! debug { ($($arg:tt)+) => { $crate::__log!(Debug, $($arg)+) }; }
/// Log at `info` level, `format!` style.
#[cfg(feature = "bindings")]
#[macro_export]
macro_rules! info { ($($arg:tt)+) => { $crate::__log!(Info, $($arg)+) }; }
/// Log at `warn` level, `format!` style.
#[cfg(feature = "bindings")]
#[macro_export]
macro_rules! warn { ($($arg:tt)+) => { $crate::__log!(Warn, $($arg)+) }; }
/// Log at `error` level, `format!` style.
#[cfg(feature = "bindings")]
#[macro_export]
macro_rules! error { ($($arg:tt)+) => { $crate::__log!(Error, $($arg)+) }; }
