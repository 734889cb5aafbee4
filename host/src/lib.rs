//! cachepol: cache policies as hot-reloadable WebAssembly components next to
//! Redis.
//!
//! Module map, in the order an event meets them:
//! - [`wit`]: the host bindings of the WIT contract in `wit/`.
//! - [`runtime`]: wasmtime engine, loading components, calling them under
//!   budgets ([`budget`]), containing traps.
//! - [`manifest`]: validating what a policy says it needs.
//! - [`grants`]: what a policy may touch, checked on every call.
//! - `hostapi`: the imports a policy calls, gated by grants and budgets.
//! - [`backend`]: the seam to the key store: the fake host in [`fake`], real
//!   Redis in the daemon.
//! - [`scenario`]: scenario files for `cachepol test`, run on the fake host.
//! - `guest_io`: a guest's stdout/stderr into the log.

pub mod backend;
pub mod budget;
pub mod fake;
pub mod grants;
mod guest_io;
mod hostapi;
pub mod manifest;
pub mod runtime;
pub mod scenario;
pub mod wit;

pub use hostapi::{CallState, Effects};
