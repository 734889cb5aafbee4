//! cachepol: cache policies as hot-reloadable WebAssembly components next to
//! Redis.
//!
//! Module map, by the stage of an event's trip. Imports only point down the
//! flow (`intake -> dispatch -> sandbox -> store`); each folder's module
//! says what it receives, what it hands on and what it may call.
//! - [`intake`]: keyspace notifications, deploy hooks and the kill switch
//!   come in from Redis.
//! - [`dispatch`]: routes, per-policy queues and workers, circuit breakers,
//!   the registry of loaded policies and hot reload.
//! - [`sandbox`]: wasmtime runtime, budgets, manifests, grants and the
//!   restricted host API a policy calls.
//! - [`store`]: the `Backend` seam: real Redis, the in-memory store, the
//!   echo and dry-run write layers, and the key index bulk operations walk.
//!
//! Beside the stages:
//! - [`daemon`]: `cachepol run`, wiring the stages together, with start-up
//!   and graceful shutdown spelled out.
//! - [`admin`]: the admin HTTP server (metrics, health, status, the deploy
//!   webhook), which reads every stage.
//! - [`metrics`]: the counters and readiness every stage records and the
//!   admin server shows.
//! - [`config`]: the daemon's settings file, read by the stages above the
//!   sandbox.
//! - [`wit`]: the bindings of the contract in `wit/`, whose types every
//!   stage speaks.
//! - [`fake`]: the fake host and scenario files, the policy author's stand-in
//!   for intake and dispatch (`cachepol test`).
//!
//! The `cachepol` binary's subcommands (`src/cli/`) sit on top of all this.

pub mod admin;
pub mod config;
pub mod daemon;
pub mod dispatch;
pub mod fake;
pub mod intake;
pub mod metrics;
pub mod sandbox;
pub mod store;
pub mod wit;
