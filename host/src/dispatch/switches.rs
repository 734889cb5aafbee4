//! What holds policies back, as the workers see it: the set of policy
//! names disabled with `cachepol disable`, as last read from Redis by
//! [`crate::intake::control`], and whether this daemon stands by for a
//! replica holding the keyspace-event lease ([`crate::dispatch::lease`]).
//! A worker consults both before every delivery.

use std::collections::BTreeSet;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::ReplicaConfig;
use crate::dispatch::lease::Lease;

/// The policies an operator has disabled, as last read, and the lease.
pub struct Switches {
    disabled: ArcSwap<BTreeSet<String>>,
    pub lease: Lease,
}

impl Default for Switches {
    fn default() -> Switches {
        Switches::new(Lease::new(&ReplicaConfig::default(), 0, ""))
    }
}

impl Switches {
    pub fn new(lease: Lease) -> Switches {
        Switches { disabled: ArcSwap::default(), lease }
    }

    /// Another replica holds the keyspace-event lease: keyspace events and
    /// sweeps are its to handle.
    pub fn standing_by(&self) -> bool {
        !self.lease.holds()
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
