//! A policy's manifest, validated.
//!
//! `describe` is untrusted output of guest code. Before a policy is loaded
//! its manifest is checked as a whole and every problem is reported at once,
//! so an author fixes them in one round instead of one per load.

use std::fmt;
use std::time::Duration;

use cachepol_guest_sdk::glob::{self, Coverage, Glob};

use crate::sandbox::grants::{GrantRule, Grants, MAX_KEY_LEN, ops_to_string};
use crate::wit::{self, KeyOps};

/// A manifest that passed validation.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub name: String,
    pub version: semver::Version,
    pub description: String,
    pub key_subscriptions: Vec<KeySubscription>,
    /// Services whose deploy hooks the policy wants; `*` means all.
    pub deploys: Vec<String>,
    pub sweep_interval: Option<Duration>,
    pub grants: Grants,
}

/// Keyspace events on keys matching `patterns` (any op if `ops` is empty).
#[derive(Clone, Debug)]
pub struct KeySubscription {
    pub ops: Vec<String>,
    pub patterns: Vec<Glob>,
}

/// Every problem found in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    pub problems: Vec<String>,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid manifest: {}", self.problems.join("; "))
    }
}

const MAX_NAME_LEN: usize = 64;

impl Manifest {
    /// The patterns this policy's bulk operations can reach, which the key
    /// index keeps ([`crate::store::index`]): its wildcard grants allowing
    /// `delete` or `expire`.
    pub fn bulk_patterns(&self) -> impl Iterator<Item = &Glob> {
        self.grants
            .rules()
            .iter()
            .filter(|r| r.ops.intersects(KeyOps::DELETE | KeyOps::EXPIRE) && r.pattern.literal().is_none())
            .map(|r| &r.pattern)
    }

    /// Validate what `describe` returned.
    pub fn validate(raw: wit::Manifest) -> Result<Manifest, ManifestError> {
        let mut problems = Vec::new();

        let name_ok = !raw.name.is_empty()
            && raw.name.len() <= MAX_NAME_LEN
            && raw.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !name_ok {
            problems.push(format!(
                "name `{}` must be 1 to {MAX_NAME_LEN} characters of a-z, 0-9 and -",
                raw.name.escape_debug()
            ));
        }
        let version = semver::Version::parse(&raw.version).unwrap_or_else(|e| {
            problems.push(format!("version `{}` is not semantic (1.2.3): {e}", raw.version.escape_debug()));
            semver::Version::new(0, 0, 0)
        });

        let mut rules: Vec<GrantRule> = Vec::new();
        for grant in raw.grants {
            let what = format!("grant `{}`", grant.pattern);
            if let Some(problem) = pattern_problem(&grant.pattern) {
                problems.push(format!("{what}: {problem}"));
                continue;
            }
            if grant.ops == KeyOps::empty() {
                problems.push(format!("{what} allows no operation"));
                continue;
            }
            if rules.iter().any(|r| r.pattern.as_str() == grant.pattern) {
                problems.push(format!("{what} is listed twice (merge the operations into one grant)"));
                continue;
            }
            rules.push(GrantRule { pattern: Glob::new(&grant.pattern), ops: grant.ops });
        }
        let grants = Grants::new(rules);

        let readable: Vec<&Glob> =
            grants.rules().iter().filter(|r| r.ops.contains(KeyOps::READ)).map(|r| &r.pattern).collect();
        let mut key_subscriptions = Vec::new();
        for sub in raw.subscriptions.keys {
            if sub.patterns.is_empty() {
                problems.push("a key subscription has no patterns".to_owned());
            }
            for op in &sub.ops {
                if op.is_empty() || !op.bytes().all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit()) {
                    problems.push(format!("key subscription op `{}` is not a Redis event name", op.escape_debug()));
                }
            }
            let mut patterns = Vec::new();
            for p in &sub.patterns {
                if let Some(problem) = pattern_problem(p) {
                    problems.push(format!("subscription `{p}`: {problem}"));
                    continue;
                }
                let glob = Glob::new(p);
                if let Coverage::Uncovered { .. } | Coverage::TooComplex = glob::covers(&readable, &glob) {
                    problems.push(format!(
                        "subscription `{p}` is not inside a grant with {} (a policy only hears about keys it may read)",
                        ops_to_string(KeyOps::READ)
                    ));
                    continue;
                }
                patterns.push(glob);
            }
            key_subscriptions.push(KeySubscription { ops: sub.ops, patterns });
        }

        for service in &raw.subscriptions.deploys {
            if service.trim().is_empty() {
                problems.push("a deploy subscription names an empty service".to_owned());
            }
        }
        let sweep_interval = match raw.subscriptions.sweep_interval_secs {
            Some(0) => {
                problems.push("sweep-interval-secs must be at least 1".to_owned());
                None
            }
            other => other.map(|s| Duration::from_secs(u64::from(s))),
        };

        if !problems.is_empty() {
            return Err(ManifestError { problems });
        }
        Ok(Manifest {
            name: raw.name,
            version,
            description: raw.description,
            key_subscriptions,
            deploys: raw.subscriptions.deploys,
            sweep_interval,
            grants,
        })
    }

    /// Whether a keyspace event `op` on `key` is for this policy.
    pub fn wants_key_event(&self, op: &str, key: &[u8]) -> bool {
        self.key_subscriptions.iter().any(|s| {
            (s.ops.is_empty() || s.ops.iter().any(|o| o == op)) && s.patterns.iter().any(|p| p.matches_bytes(key))
        })
    }

    /// Whether a deploy hook from `service` is for this policy.
    pub fn wants_deploy(&self, service: &str) -> bool {
        self.deploys.iter().any(|s| s == "*" || s == service)
    }
}

impl fmt::Display for Manifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "policy:      {} {}", self.name, self.version)?;
        if !self.description.is_empty() {
            writeln!(f, "description: {}", self.description)?;
        }
        writeln!(f, "subscriptions:")?;
        for sub in &self.key_subscriptions {
            let ops = if sub.ops.is_empty() { "any".to_owned() } else { sub.ops.join(",") };
            let patterns: Vec<&str> = sub.patterns.iter().map(Glob::as_str).collect();
            writeln!(f, "  keyspace   {ops} on {}", patterns.join(" "))?;
        }
        if !self.deploys.is_empty() {
            writeln!(f, "  deploys    from {}", self.deploys.join(" "))?;
        }
        if let Some(every) = self.sweep_interval {
            writeln!(f, "  sweep      every {}s", every.as_secs())?;
        }
        writeln!(f, "grants:")?;
        for rule in self.grants.rules() {
            writeln!(f, "  {:<32} {}", rule.pattern.as_str(), ops_to_string(rule.ops))?;
        }
        Ok(())
    }
}

/// Why a glob in a manifest is unacceptable, if it is.
fn pattern_problem(pattern: &str) -> Option<String> {
    if pattern.len() > MAX_KEY_LEN {
        return Some(format!("longer than {MAX_KEY_LEN} bytes"));
    }
    Glob::new(pattern).lint().into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wit::{Grant, KeySubscription as WitSub, Subscriptions};

    fn raw(name: &str, grants: &[(&str, KeyOps)], subs: &[&str]) -> wit::Manifest {
        wit::Manifest {
            name: name.into(),
            version: "1.0.0".into(),
            description: String::new(),
            subscriptions: Subscriptions {
                keys: vec![WitSub { ops: vec!["set".into()], patterns: subs.iter().map(|s| s.to_string()).collect() }],
                deploys: vec!["*".into()],
                sweep_interval_secs: None,
            },
            grants: grants.iter().map(|(p, ops)| Grant { pattern: p.to_string(), ops: *ops }).collect(),
        }
    }

    #[test]
    fn a_good_manifest_validates_and_routes_events() {
        let m = Manifest::validate(raw(
            "genre-invalidation",
            &[("last_updated:*", KeyOps::READ), ("graph_data:*", KeyOps::DELETE)],
            &["last_updated:*"],
        ))
        .unwrap();
        assert!(m.wants_key_event("set", b"last_updated:dance"));
        assert!(!m.wants_key_event("del", b"last_updated:dance"));
        assert!(!m.wants_key_event("set", b"graph_data:dance"));
        assert!(m.wants_deploy("anything"));
        assert!(m.to_string().contains("graph_data:*"));
    }

    #[test]
    fn garbage_is_reported_all_at_once() {
        let mut r = raw(
            "",
            &[
                ("", KeyOps::READ),
                ("a:*", KeyOps::empty()),
                ("b:*", KeyOps::READ),
                ("b:*", KeyOps::DELETE),
                ("[x", KeyOps::READ),
            ],
            &["secret:*"],
        );
        r.version = "one".into();
        r.subscriptions.sweep_interval_secs = Some(0);
        r.subscriptions.keys[0].ops.push("SET ALL".into());
        let err = Manifest::validate(r).unwrap_err();
        let all = err.to_string();
        for needle in [
            "name ``",
            "version `one`",
            "grant ``: the pattern is empty",
            "grant `a:*` allows no operation",
            "grant `b:*` is listed twice",
            "grant `[x`",
            "subscription `secret:*` is not inside a grant",
            "sweep-interval-secs",
            "`SET ALL`",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in {all}");
        }
        assert_eq!(err.problems.len(), 9, "{all}");
    }
}
