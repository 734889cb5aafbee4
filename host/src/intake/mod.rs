//! Intake: where work enters the daemon.
//!
//! Receives Redis keyspace notifications ([`events`], one RESP3
//! subscription routed inside its reader; one per primary on a Redis
//! Cluster, following the topology, [`cluster`]), deploy hooks ([`deploy`], a Redis
//! Stream read through a consumer group, and the hooks it gave up on,
//! [`dead_letters`]), and the operator's kill switch and sweep requests
//! ([`control`], polled every second); makes sure Redis emits
//! the notifications the policies need ([`notify`]); decides which of
//! several daemons on one Redis handles them ([`lease`]) and names the
//! others ([`peers`]). Hands on typed work
//! items to the policies' queues through [`crate::dispatch`]'s routes, never
//! waiting on a policy: the subscription socket is drained at full speed.
//!
//! May call: `dispatch` (routes, queues), `sandbox` (key limits), `store`
//! (the echo ledger). Called by: the daemon's wiring and the CLI.

pub mod cluster;
pub mod control;
pub mod dead_letters;
pub mod deploy;
pub mod events;
pub mod lease;
pub mod notify;
pub mod peers;
