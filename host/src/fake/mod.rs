//! The fake host: cachepol's restricted Redis API over an in-memory keyspace
//! with Redis semantics, for testing policies without Redis.
//!
//! Policy authors use it from `cargo test` ([`FakeHost`]) or through
//! `cachepol test` scenario files ([`crate::scenario`]). It runs the real
//! component in the real runtime, with the same grants and budgets as the
//! daemon; only the key store is simulated ([`FakeRedis`]).

mod host;
mod store;

pub use host::{Delivery, FakeHost};
pub use store::{EPOCH_MS, FakeClient, FakeRedis, KeySnapshot, KeyspaceEvent};
