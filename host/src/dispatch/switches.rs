//! What holds policies back, as the workers see it: the set of policy
//! names disabled with `cachepol disable`, as last read from Redis by
//! [`crate::intake::control`], and whether this daemon stands by for a
//! replica holding the keyspace-event lease ([`crate::dispatch::lease`]).
//! A worker consults both before every delivery.

use std::collections::BTreeSet;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::ReplicaConfig;
use crate::dispatch::lease::{Lease, Shards};

/// The policies an operator has disabled, as last read, and the lease.
pub struct Switches {
    disabled: ArcSwap<BTreeSet<String>>,
    pub lease: Lease,
    /// On a cluster with replicas on: the work is split by shard, each
    /// under its own lease, instead of one lease for everything.
    pub shards: Option<Shards>,
}

/// A daemon alone by construction (the fake host, tests): no lease.
impl Default for Switches {
    fn default() -> Switches {
        Switches::new(Lease::new(&ReplicaConfig { enabled: false, ..ReplicaConfig::default() }, 0, ""))
    }
}

impl Switches {
    pub fn new(lease: Lease) -> Switches {
        Switches { disabled: ArcSwap::default(), lease, shards: None }
    }

    /// Split the work by cluster shard ([`Shards`]), when replicas are on.
    pub fn split_by_shard(mut self) -> Switches {
        if self.lease.enabled() {
            self.shards = Some(Shards::default());
        }
        self
    }

    /// Other replicas hold every lease: keyspace events, sweeps and deploy
    /// hooks are theirs to handle.
    pub fn standing_by(&self) -> bool {
        match &self.shards {
            Some(shards) => !shards.any_held(),
            None => !self.lease.holds(),
        }
    }

    /// Whether this daemon routes the events of the node serving the shard
    /// that starts at `shard` (`None`: the only node).
    pub fn routes_node(&self, shard: Option<u16>) -> bool {
        match (&self.shards, shard) {
            (Some(shards), Some(slot)) => shards.holds(slot),
            _ => !self.standing_by(),
        }
    }

    /// Whether this daemon runs the sweeps made for nobody in particular
    /// (periodic ones, an operator's) on every replica's behalf: the lease
    /// holder on one server; on a cluster, the replica holding the first
    /// shard. A sweep walks every primary, so one replica running it is
    /// enough. Decided when the sweep is asked for: a sweep queued is run.
    pub fn leads_sweeps(&self) -> bool {
        match &self.shards {
            Some(shards) => shards.all().first().is_some_and(|(_, lease)| lease.holds()),
            None => !self.standing_by(),
        }
    }

    pub fn is_disabled(&self, policy: &str) -> bool {
        self.disabled.load().contains(policy)
    }

    /// Take a new reading; returns (newly disabled, newly enabled).
    pub fn update(&self, now: BTreeSet<String>) -> (Vec<String>, Vec<String>) {
        let before = self.disabled.load_full();
        let disabled = now.difference(&before).cloned().collect();
        let enabled = before.difference(&now).cloned().collect();
        self.disabled.store(Arc::new(now));
        (disabled, enabled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_report_what_changed() {
        let s = Switches::default();
        let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(s.update(set(&["a", "b"])), (vec!["a".into(), "b".into()], vec![]));
        assert!(s.is_disabled("a") && !s.is_disabled("c"));
        assert_eq!(s.update(set(&["b", "c"])), (vec!["c".into()], vec!["a".into()]));
        assert!(!s.is_disabled("a"));
    }
}
