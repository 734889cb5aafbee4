//! The fake host: cachepol's restricted Redis API over an in-memory keyspace
//! with Redis semantics, for testing policies without Redis.
//!
//! Not a stage of the daemon but its stand-in for policy authors: where the
//! daemon has intake and dispatch, the fake host has a test driving one
//! policy by hand ([`FakeHost`], from `cargo test`) or a scenario file
//! ([`scenario`], from `cachepol test`). It runs the real component in the
//! real [`crate::sandbox`], with the same grants and budgets as the daemon;
//! only the key store is simulated ([`FakeRedis`], from [`crate::store`]).
//!
//! May call: `sandbox`, `store`. Called by: the CLI and tests.

mod host;
pub mod scenario;

pub use host::{Delivery, FakeHost};

pub use crate::store::memory::{AppWrite, EPOCH_MS, FakeClient, FakeRedis, KeySnapshot, KeyspaceEvent, Value};
