//! The operator's kill switch as the workers see it: the set of policy
//! names disabled with `cachepol disable`, as last read from Redis by
//! [`crate::intake::control`]. A worker consults it before every delivery.

use std::collections::BTreeSet;
use std::sync::Arc;

use arc_swap::ArcSwap;

/// The policies an operator has disabled, as last read.
#[derive(Default)]
pub struct Switches {
    disabled: ArcSwap<BTreeSet<String>>,
}

impl Switches {
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
