//! The daemon's own keys, which no policy may reach, and the state
//! namespace each policy gets instead.
//!
//! The kill switch, sweep requests, walk positions, the lease, the deploy
//! stream and its dead letters, announcements and probes all live in Redis
//! beside the cache. A policy that could write one of them could turn the
//! kill switch off, squat the lease (stopping every replica) or forge a
//! hook; one granted `*:*:*:*` delete by an author who meant "every
//! tenant's keys" would delete `cachepol:lease:events:db0` by accident. So
//! the daemon's keys are *reserved*: everything under `cachepol:` and
//! `{cachepol}:`, and any key the operator moved elsewhere in the config.
//!
//! Every key check ([`crate::sandbox::grants`]) refuses reserved keys
//! whatever the grants say, so single-key calls are denied and bulk
//! operations, scans and the key index skip them. A grant that asks for
//! nothing but reserved keys (`cachepol:*`) is refused when the policy
//! loads, with an example key; a wider one that also covers some (`*`, a
//! tenant's `*:*:*:*`) loads with a warning naming a key it will not get.
//!
//! A policy that keeps state of its own (deferred clears, a version marker,
//! a trigger ledger) gets `cachepol-state:<policy>:*` with every operation,
//! granted by the host whether it asks or not: outside the daemon's keys,
//! and named so that an operator knows whose it is.

use std::sync::{Arc, OnceLock};

use cachepol_guest_sdk::glob::{self, Coverage, Glob};

use crate::sandbox::grants::{GrantRule, Grants};

/// Where each policy's own state lives: `cachepol-state:<policy>:`.
pub const STATE_PREFIX: &str = "cachepol-state:";

/// The prefixes reserved whatever the config: the daemon's own keys, and
/// the policies' state (each policy reaches only its own namespace there:
/// another's deferred clear, written by a policy granted `*:*:*:*`, would
/// make that policy delete for it).
pub const RESERVED_PREFIXES: [&str; 3] = ["cachepol:", "{cachepol}:", STATE_PREFIX];

/// The state namespace of the policy named `policy` (a manifest name:
/// a-z, 0-9 and `-`, so nothing in it needs escaping in a glob).
pub fn state_prefix(policy: &str) -> String {
    format!("{STATE_PREFIX}{policy}:")
}

/// The keys no policy may reach (but its own state namespace).
#[derive(Debug, PartialEq, Eq)]
pub struct Reserved {
    /// Key prefixes: a key starting with one is reserved.
    prefixes: Vec<Vec<u8>>,
    /// Keys reserved exactly (a moved key `deploys` reserves `deploys` and
    /// `deploys:...`, not `deploys_v2`).
    exact: Vec<Vec<u8>>,
    /// The daemon's actual keys, as examples in refusals (a grant that
    /// reaches `cachepol:lease:events:db0` says so, not `cachepol:::`).
    examples: Vec<String>,
}

impl Reserved {
    /// `cachepol:` and `{cachepol}:`, and each of `keys` (the daemon's keys
    /// and key prefixes as configured: control, sweeps, walks, lease, deploy
    /// stream, dead letters) that lies outside them.
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a str>) -> Reserved {
        let mut prefixes: Vec<Vec<u8>> = RESERVED_PREFIXES.iter().map(|p| p.as_bytes().to_vec()).collect();
        let (mut exact, mut examples) = (Vec::new(), Vec::new());
        for key in keys {
            if key.is_empty() {
                continue;
            }
            examples.push(key.to_owned());
            if !prefixes.iter().any(|p| key.as_bytes().starts_with(p)) {
                exact.push(key.as_bytes().to_vec());
                prefixes.push(format!("{key}:").into_bytes());
            }
        }
        Reserved { prefixes, exact, examples }
    }

    /// The built-in prefixes only, shared: what a policy checked outside a
    /// daemon (`cachepol test`, `cachepol check`) is held to.
    pub fn builtin() -> Arc<Reserved> {
        static BUILTIN: OnceLock<Arc<Reserved>> = OnceLock::new();
        BUILTIN.get_or_init(|| Arc::new(Reserved::new([]))).clone()
    }

    /// Whether `key` is one of the daemon's, or under the policies' state.
    pub fn holds(&self, key: &[u8]) -> bool {
        self.prefixes.iter().any(|p| key.starts_with(p)) || self.exact.iter().any(|k| k == key)
    }

    /// Judge a policy's grants against the daemon's keys. A grant every
    /// key of which is reserved (`cachepol:*`, `{cachepol}:lease:*`, the
    /// moved deploy stream) asks for nothing but the daemon's keys: `Err`,
    /// naming it and a key. A wider grant that also reaches some
    /// (`*:*:*:*`, a schema rule's `*`) loads, and is returned with a key
    /// it would have reached, to say once: those keys are held back from
    /// every check whatever the grant.
    /// Grants inside `own` (the policy's state namespace) are the
    /// policy's to have.
    pub fn check(&self, grants: &Grants, own: &str) -> Result<Vec<(String, String)>, String> {
        let text = |b: &[u8]| glob::escape(&String::from_utf8_lossy(b));
        let reserved: Vec<Glob> = (self.prefixes.iter().map(|p| Glob::new(&format!("{}*", text(p)))))
            .chain(self.exact.iter().map(|k| Glob::new(&text(k))))
            .collect();
        let reserved: Vec<&Glob> = reserved.iter().collect();
        let own = Glob::new(&format!("{}*", glob::escape(own)));
        let mut overlapping = Vec::new();
        for rule in grants.rules() {
            if glob::covers(&[&own], &rule.pattern) == Coverage::Covered {
                continue;
            }
            let Some(key) = self.reached_by(rule) else { continue };
            let key = String::from_utf8_lossy(&key).escape_debug().to_string();
            if glob::covers(&reserved, &rule.pattern) == Coverage::Covered {
                return Err(format!(
                    "grant `{rule}` asks only for reserved keys (`{key}`, say): the daemon's own, under {}, and other policies' state; keep the policy's state under `{STATE_PREFIX}<policy>:`, which every policy is granted",
                    self.describe()
                ));
            }
            overlapping.push((rule.pattern.to_string(), key));
        }
        Ok(overlapping)
    }

    /// A reserved key `rule` matches: one of the daemon's keys (as
    /// configured, or under its default name) if it matches one, else the shortest under a reserved prefix.
    fn reached_by(&self, rule: &GrantRule) -> Option<Vec<u8>> {
        let real = self.examples.iter().map(String::as_str).chain(SAMPLE_KEYS);
        for key in real {
            if self.holds(key.as_bytes()) && rule.pattern.matches(key) {
                return Some(key.as_bytes().to_vec());
            }
        }
        let exact = self.exact.iter().find(|k| rule.pattern.matches_bytes(k)).cloned();
        exact.or_else(|| self.prefixes.iter().find_map(|p| rule.pattern.example_starting_with(p)))
    }

    fn describe(&self) -> String {
        self.prefixes.iter().map(|p| format!("`{}`", String::from_utf8_lossy(p))).collect::<Vec<_>>().join(", ")
    }
}

/// The daemon's keys under their default names, tried first as examples.
const SAMPLE_KEYS: [&str; 7] = [
    "cachepol:control:disabled",
    "cachepol:control:sweeps",
    "cachepol:lease:events",
    "cachepol:lease:events:db0",
    "cachepol:deploys",
    "cachepol:deploys:dead",
    "cachepol:walks",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wit::KeyOps;
    use cachepol_guest_sdk::glob::Glob;

    fn grants(patterns: &[&str]) -> Grants {
        Grants::new(patterns.iter().map(|p| GrantRule { pattern: Glob::new(p), ops: KeyOps::DELETE }).collect())
    }

    #[test]
    fn grants_for_nothing_but_reserved_keys_are_refused_with_a_real_key() {
        let reserved = Reserved::new(["cachepol:lease:events", "deploys"]);
        let own = state_prefix("p");
        let why = reserved.check(&grants(&["cachepol:*"]), &own).unwrap_err();
        assert!(why.contains("`cachepol:lease:events`"), "{why}");
        let why = reserved.check(&grants(&["quiz:*", "{cachepol}:lease:*"]), &own).unwrap_err();
        assert!(why.contains("`{cachepol}:lease:`"), "{why}");
        assert!(reserved.check(&grants(&["deploys:*"]), &own).is_err(), "a stream moved by the operator is reserved");
        assert!(reserved.check(&grants(&["deploys"]), &own).is_err());
        let why = reserved.check(&grants(&["cachepol-state:file-cache-clear:*"]), &own).unwrap_err();
        assert!(why.contains("other policies' state"), "{why}");
        assert_eq!(reserved.check(&grants(&["cachepol-state:p:*", "cachepol-state:p:x"]), &own), Ok(vec![]));
        assert_eq!(reserved.check(&grants(&["deploys_v2:*"]), &own), Ok(vec![]), "only the key and key:...");
    }

    #[test]
    fn wider_grants_load_and_name_a_key_they_will_not_get() {
        let reserved = Reserved::new(["cachepol:lease:events"]);
        let wide = reserved.check(&grants(&["quiz:*", "*:*:*:*", "*", "*:events"]), &state_prefix("p")).unwrap();
        let named: Vec<&str> = wide.iter().map(|(_, key)| key.as_str()).collect();
        assert_eq!(named, ["cachepol:lease:events:db0", "cachepol:lease:events", "cachepol:lease:events"]);
    }

    #[test]
    fn grants_beside_the_daemons_keys_load() {
        let reserved = Reserved::new(["cachepol:lease:events"]);
        for ok in ["quiz:*", "cachepol-state:genre-invalidation:*", "cache:*", "cachepo", "c[^a]*", "q*:event"] {
            assert_eq!(reserved.check(&grants(&[ok]), &state_prefix("genre-invalidation")), Ok(vec![]), "{ok}");
        }
    }

    #[test]
    fn reserved_keys_are_held_by_prefix() {
        let reserved = Reserved::builtin();
        assert!(reserved.holds(b"cachepol:control:disabled"));
        assert!(reserved.holds(b"{cachepol}:lease:events:db0"));
        assert!(reserved.holds(b"cachepol-state:x:y"), "another policy's state");
        assert!(!reserved.holds(b"cachepol"));
    }
}
