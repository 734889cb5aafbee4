//! Sandbox: running untrusted policy code.
//!
//! Receives a component and, per call, one event. The [`runtime`] compiles
//! and instantiates components in wasmtime and calls them under per-event
//! [`budget`]s (fuel, memory, host calls, keys, wall time), containing
//! traps; [`manifest`] validates what a policy says it needs; the host API
//! (`hostapi`) is the restricted Redis API a policy imports, every key and
//! pattern checked against its [`grants`] before it reaches the store; a
//! guest's stdout and stderr become log lines (`guest_io`). Hands on each
//! call's result and effects (a `CallReport`) to its caller.
//!
//! May call: `store` (the `Backend` a policy's calls go to). Never calls
//! `dispatch` or `intake`: a policy cannot reach the daemon's machinery.

pub mod budget;
pub mod grants;
mod guest_io;
mod hostapi;
pub mod manifest;
pub mod reserved;
pub mod runtime;
pub mod work;

pub use guest_io::{MAX_SHOWN, clip};
pub use hostapi::{CallState, Effects};
