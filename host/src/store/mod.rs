//! Store: the keys, behind one seam.
//!
//! [`backend::Backend`] is the restricted Redis API with grants already
//! checked. It is implemented over a real Redis ([`redis`], one multiplexed
//! connection, the bulk operations pipelined) and in memory with Redis
//! semantics ([`memory`], the fake host's keyspace). Write layers wrap a
//! backend: [`echo`] records each write so its own notification does not
//! wake the policy again (and [`announce`] tells other replicas of the
//! writes, when they split a cluster), [`dryrun`] only logs what a write would do,
//! [`holding`] lets a policy write only while this daemon holds its lease.
//! [`target`] says whether that is one server or a Redis Cluster, and holds
//! the connection type everything else uses; [`eviction`] says whether
//! Redis may evict the daemon's own keys.
//! [`index`] keeps the names of the keys bulk operations can reach, fed by
//! the keyspace subscriber, so that they walk names instead of scanning
//! Redis ([`keyset`] stores them); [`flags`] reads `notify-keyspace-events`
//! values, for it and for the subscriber. [`walks`] keeps where a bulk walk
//! too long for one call stopped, so that the next slice goes on from there;
//! [`legacy`] moves state bundled policies kept under `cachepol:` once.
//!
//! Receives calls from the sandbox's host API, and every notification from
//! intake (for the index); hands back Redis's answers.
//! May call: nothing above it (only the contract types in [`crate::wit`]).

pub(crate) mod announce;
pub mod backend;
pub(crate) mod dryrun;
pub(crate) mod echo;
pub mod eviction;
pub mod flags;
pub mod holding;
pub mod index;
pub mod keyset;
pub mod legacy;
pub mod memory;
pub mod redis;
pub mod target;
pub mod walks;
