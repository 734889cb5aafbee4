//! cachepol: cache policies as hot-reloadable WebAssembly components next to
//! Redis.
//!
//! Module map, in the order an event meets them:
//! - [`daemon`]: `cachepol run`, wiring the rest together; [`config`] its
//!   settings; [`registry`] the loaded policies and [`reload`] the watcher
//!   that swaps them.
//! - [`events`]: keyspace notifications in; [`deploy`]: deploy hooks in
//!   (a Redis Stream); [`notify`]: the `notify-keyspace-events` flags.
//! - [`routes`] and [`matcher`]: which policies want an event; [`queue`]:
//!   each policy's bounded, coalescing inbox; [`worker`]: one task per policy.
//! - [`breaker`]: what repeated failures of a policy do; [`control`]: the
//!   operator's kill switch.
//! - [`runtime`]: wasmtime engine, loading components, calling them under
//!   budgets ([`budget`]), containing traps; [`manifest`]: validating what a
//!   policy says it needs; [`wit`]: the bindings of the contract in `wit/`.
//! - `hostapi`: the imports a policy calls, gated by [`grants`] and budgets.
//! - [`backend`]: the seam to the key store: real Redis in
//!   [`redis_backend`], in memory in [`fake`]; write layers for [`echo`]
//!   suppression and [`dryrun`].
//! - [`audit`]: what each call did, one log line.
//! - [`scenario`]: scenario files for `cachepol test`, run on the fake host.
//! - `guest_io`: a guest's stdout/stderr into the log.
//! - [`acl`]: the Redis ACL rule for the loaded policies (`cachepol acl`).

pub mod acl;
pub mod audit;
pub mod backend;
pub mod breaker;
pub mod budget;
pub mod config;
pub mod control;
pub mod daemon;
pub mod deploy;
pub mod dryrun;
pub mod echo;
pub mod events;
pub mod fake;
pub mod grants;
mod guest_io;
mod hostapi;
pub mod manifest;
pub mod matcher;
pub mod notify;
pub mod queue;
pub mod redis_backend;
pub mod registry;
pub mod reload;
pub mod routes;
pub mod runtime;
pub mod scenario;
pub mod wit;
pub mod worker;

pub use hostapi::{CallState, Effects};
