//! Dispatch: from a work item to the policy calls it causes.
//!
//! Receives keyspace events, deploy hooks and sweeps from
//! [`crate::intake`]. [`routes`] and its [`matcher`] decide which policies
//! want an event; each policy has a bounded, coalescing [`queue`] and a
//! [`worker`] that takes it in order and shares it out to the policy's
//! lanes (one key's events stay on one lane, in order; hooks and sweeps
//! are barriers), asks the policy's circuit [`breaker`] and the operator's
//! [`switches`], calls the policy through [`crate::sandbox`], and writes the
//! [`audit`] trail. The [`registry`] holds
//! the loaded policies and [`reload`] swaps them between two events when a
//! file in `policies/` changes.
//!
//! May call: `sandbox` (load and call policies), `store` (the write layers a
//! policy's calls go through). Called by: `intake`, the daemon's wiring.

pub(crate) mod audit;
pub mod breaker;
pub mod lease;
pub(crate) mod matcher;
pub(crate) mod queue;
pub(crate) mod registry;
pub mod reload;
pub(crate) mod routes;
pub(crate) mod switches;
pub(crate) mod worker;
