//! What a policy may touch: key globs with the operations allowed on them.
//!
//! Every key argument a policy passes is matched against its grants, and
//! every glob argument (`scan`, `delete-matching`, `expire-matching`) must be
//! *covered*: each key the glob could match must be matched by a grant that
//! allows the operation. Coverage is decided exactly on the globs' automata
//! ([`cachepol_guest_sdk::glob::covers`]), so `quiz:[a-z]*` passes under
//! `quiz:*` while `quiz*`, `q*`, `*` and `[a-z]*` are refused, and the
//! refusal names a key that shows why. The bulk operations also re-check
//! each key Redis returns, so a grant check and a scan can never disagree.

use std::sync::Arc;

use cachepol_guest_sdk::glob::{self, Coverage, Glob};

use crate::sandbox::reserved::{self, Reserved};
use crate::wit::KeyOps;

/// Longest key or pattern a policy may pass (Redis allows 512 MB; nothing
/// sane in a cache key comes close to this).
pub const MAX_KEY_LEN: usize = 16 * 1024;

/// The name of each operation flag, for messages and config files.
pub const OP_NAMES: [(KeyOps, &str); 5] = [
    (KeyOps::READ, "read"),
    (KeyOps::WRITE, "write"),
    (KeyOps::DELETE, "delete"),
    (KeyOps::EXPIRE, "expire"),
    (KeyOps::LOCK, "lock"),
];

/// `read+delete` style rendering of a set of operations.
pub fn ops_to_string(ops: KeyOps) -> String {
    let names: Vec<&str> = OP_NAMES.iter().filter(|(f, _)| ops.contains(*f)).map(|(_, n)| *n).collect();
    if names.is_empty() { "none".to_owned() } else { names.join("+") }
}

/// Parse an operation name (`read`, `write`, `delete`, `expire`, `lock`).
pub fn op_from_name(name: &str) -> Option<KeyOps> {
    OP_NAMES.iter().find(|(_, n)| *n == name).map(|(f, _)| *f)
}

/// A grant as an operator writes it in config:
/// `{ pattern = "graph_data:*", ops = ["delete"] }`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantConfig {
    pub pattern: String,
    pub ops: Vec<String>,
}

/// One grant: a glob and what it allows.
#[derive(Clone, Debug)]
pub struct GrantRule {
    pub pattern: Glob,
    pub ops: KeyOps,
}

impl std::fmt::Display for GrantRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.pattern, ops_to_string(self.ops))
    }
}

/// A policy's grants, ready to check calls against. A key the daemon
/// keeps for itself ([`reserved`]) is refused whatever the rules say.
#[derive(Clone, Debug)]
pub struct Grants {
    rules: Vec<GrantRule>,
    reserved: Arc<Reserved>,
    /// The policy's own state namespace, which `reserved` does not hold
    /// back from it.
    own: Vec<u8>,
}

impl Default for Grants {
    fn default() -> Grants {
        Grants::new(Vec::new())
    }
}

impl Grants {
    pub fn new(rules: Vec<GrantRule>) -> Grants {
        Grants { rules, reserved: Reserved::builtin(), own: Vec::new() }
    }

    /// These grants as a loaded policy named `policy` holds them: refused
    /// if one asks for nothing but keys of `reserved`, else with the
    /// policy's state namespace added (every operation on
    /// `cachepol-state:<policy>:*`) and `reserved` held back from every
    /// check. Also returns the grants that reach reserved keys anyway
    /// (`*`), each with a key it will not get, to be said once.
    pub fn for_policy(
        mut self,
        policy: &str,
        reserved: Arc<Reserved>,
    ) -> Result<(Grants, Vec<(String, String)>), String> {
        let prefix = reserved::state_prefix(policy);
        let overlapping = reserved.check(&self, &prefix)?;
        let every = KeyOps::READ | KeyOps::WRITE | KeyOps::DELETE | KeyOps::EXPIRE | KeyOps::LOCK;
        // The policy may ask for it itself, escaped its own way.
        let same = |r: &GrantRule| r.pattern.is_prefix_pattern() && r.pattern.literal_prefix() == prefix.as_bytes();
        match self.rules.iter_mut().find(|r| same(r)) {
            Some(rule) => rule.ops |= every,
            None => self.rules.push(GrantRule { pattern: Glob::new(&format!("{prefix}*")), ops: every }),
        }
        self.reserved = reserved;
        self.own = prefix.into_bytes();
        Ok((self, overlapping))
    }

    /// Grants from operator config; errors name the offending entry.
    pub fn from_config(entries: &[GrantConfig]) -> Result<Grants, String> {
        let mut rules = Vec::new();
        for entry in entries {
            let mut ops = KeyOps::empty();
            for name in &entry.ops {
                ops |= op_from_name(name).ok_or_else(|| {
                    format!("grant `{}`: unknown operation `{name}` (read, write, delete, expire, lock)", entry.pattern)
                })?;
            }
            if ops == KeyOps::empty() || entry.pattern.is_empty() {
                return Err(format!("grant `{}` needs a pattern and at least one operation", entry.pattern));
            }
            rules.push(GrantRule { pattern: Glob::new(&entry.pattern), ops });
        }
        Ok(Grants::new(rules))
    }

    pub fn rules(&self) -> &[GrantRule] {
        &self.rules
    }

    fn allowing(&self, op: KeyOps) -> Vec<&Glob> {
        self.rules.iter().filter(|r| r.ops.contains(op)).map(|r| &r.pattern).collect()
    }

    /// Whether `op` on `key` is allowed.
    pub fn allows_key(&self, op: KeyOps, key: &[u8]) -> bool {
        !self.held_back(key) && self.rules.iter().any(|r| r.ops.contains(op) && r.pattern.matches_bytes(key))
    }

    /// A reserved key, unless it is in the policy's own state namespace:
    /// never shown to the policy, in a reply or as a keyspace event.
    pub fn held_back(&self, key: &[u8]) -> bool {
        self.reserved.holds(key) && (self.own.is_empty() || !key.starts_with(&self.own))
    }

    /// `Ok` if `op` on `key` is allowed, else the reason for the denial.
    pub fn check_key(&self, op: KeyOps, key: &str) -> Result<(), String> {
        if self.held_back(key.as_bytes()) {
            Err("the key is reserved (the daemon's own, or another policy's state)".to_owned())
        } else if self.allows_key(op, key.as_bytes()) {
            Ok(())
        } else {
            Err(format!("no grant allows {} on this key", ops_to_string(op)))
        }
    }

    /// `Ok` if every key `pattern` can match is allowed for `op`.
    pub fn check_pattern(&self, op: KeyOps, pattern: &str) -> Result<(), String> {
        let mut unbounded = usize::MAX;
        self.check_pattern_within(op, pattern, &mut unbounded)
    }

    /// [`Grants::check_pattern`], spending at most `*work` (see
    /// [`glob::covers_within`]), so a caller bounds the total it spends.
    pub fn check_pattern_within(&self, op: KeyOps, pattern: &str, work: &mut usize) -> Result<(), String> {
        let pattern = Glob::new(pattern);
        match glob::covers_within(&self.allowing(op), &pattern, work) {
            Coverage::Covered => Ok(()),
            Coverage::Uncovered { example } => Err(format!(
                "the pattern can match `{}`, which no grant allows {} on",
                String::from_utf8_lossy(&example).escape_debug(),
                ops_to_string(op)
            )),
            Coverage::TooComplex => Err("the pattern is too complex to check against the grants".to_owned()),
        }
    }

    /// Whether `other`'s every rule lies inside these grants (same or fewer
    /// operations on the same or fewer keys). `Err` names the first rule
    /// that does not.
    pub fn check_within(&self, other: &Grants) -> Result<(), String> {
        for rule in &other.rules {
            for (flag, name) in OP_NAMES {
                if rule.ops.contains(flag)
                    && let Err(why) = self.check_pattern(flag, rule.pattern.as_str())
                {
                    return Err(format!("`{}` for {name}: {why}", rule.pattern));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(rules: &[(&str, KeyOps)]) -> Grants {
        Grants::new(rules.iter().map(|(p, ops)| GrantRule { pattern: Glob::new(p), ops: *ops }).collect())
    }

    #[test]
    fn keys_need_a_grant_with_the_operation() {
        let g = grants(&[("quiz:*", KeyOps::DELETE), ("last_updated:*", KeyOps::READ)]);
        assert!(g.check_key(KeyOps::DELETE, "quiz:1").is_ok());
        assert!(g.check_key(KeyOps::READ, "quiz:1").is_err(), "delete does not imply read");
        assert!(g.check_key(KeyOps::DELETE, "quiz").is_err());
        assert!(g.check_key(KeyOps::DELETE, "quizz:1").is_err());
        assert!(g.check_key(KeyOps::READ, "last_updated:dance").is_ok());
        assert!(g.check_key(KeyOps::DELETE, "last_updated:dance").is_err());
    }

    #[test]
    fn patterns_must_lie_inside_the_grants() {
        let g = grants(&[("quiz:*", KeyOps::DELETE | KeyOps::READ)]);
        for ok in ["quiz:*", "quiz:2024:*", "quiz:[a-z]*", "quiz\\:*", "quiz:?"] {
            assert!(g.check_pattern(KeyOps::DELETE, ok).is_ok(), "{ok}");
        }
        for bad in ["*", "q*", "quiz*", "[a-z]*", "quiz\\*", "?uiz:*", "quiz[:;]*", "[^a]*"] {
            assert!(g.check_pattern(KeyOps::DELETE, bad).is_err(), "{bad}");
        }
        assert!(g.check_pattern(KeyOps::EXPIRE, "quiz:*").is_err());
    }

    #[test]
    fn denials_explain_with_an_example_key() {
        let g = grants(&[("quiz:*", KeyOps::DELETE)]);
        let why = g.check_pattern(KeyOps::DELETE, "quiz*").unwrap_err();
        assert_eq!(why, "the pattern can match `quiz`, which no grant allows delete on");
        let why = g.check_pattern(KeyOps::DELETE, "*").unwrap_err();
        assert!(why.contains("`a`"), "{why}");
    }

    #[test]
    fn escaped_metacharacters_are_literal_on_both_sides() {
        // A grant on the literal key `quiz*` does not open `quiz:*`.
        let g = grants(&[("quiz\\*", KeyOps::DELETE)]);
        assert!(g.check_key(KeyOps::DELETE, "quiz*").is_ok());
        assert!(g.check_key(KeyOps::DELETE, "quiz:1").is_err());
        assert!(g.check_pattern(KeyOps::DELETE, "quiz*").is_err());
        assert!(g.check_pattern(KeyOps::DELETE, "quiz\\*").is_ok());
        assert!(g.check_pattern(KeyOps::DELETE, "quiz[*]").is_ok());
    }

    #[test]
    fn union_of_grants_covers_a_pattern() {
        let g = grants(&[("a:*", KeyOps::DELETE), ("b:*", KeyOps::DELETE), ("c:*", KeyOps::READ)]);
        assert!(g.check_pattern(KeyOps::DELETE, "[ab]:*").is_ok());
        assert!(g.check_pattern(KeyOps::DELETE, "[abc]:*").is_err(), "c: is read-only");
    }

    #[test]
    fn no_grants_allow_nothing() {
        let g = Grants::default();
        assert!(g.check_key(KeyOps::READ, "x").is_err());
        assert!(g.check_pattern(KeyOps::READ, "x").is_err());
    }

    #[test]
    fn within_compares_whole_grant_sets() {
        let wide = grants(&[("quiz:*", KeyOps::DELETE | KeyOps::READ)]);
        let narrow = grants(&[("quiz:2024:*", KeyOps::DELETE)]);
        assert!(wide.check_within(&narrow).is_ok());
        let err = narrow.check_within(&wide).unwrap_err();
        assert!(err.starts_with("`quiz:*` for read"), "{err}");
    }

    #[test]
    fn operator_config_parses_and_names_mistakes() {
        let ok =
            Grants::from_config(&[GrantConfig { pattern: "a:*".into(), ops: vec!["read".into(), "delete".into()] }])
                .unwrap();
        assert_eq!(ok.rules()[0].ops, KeyOps::READ | KeyOps::DELETE);
        let err = Grants::from_config(&[GrantConfig { pattern: "a:*".into(), ops: vec!["flush".into()] }]).unwrap_err();
        assert!(err.contains("unknown operation `flush`"), "{err}");
        assert!(Grants::from_config(&[GrantConfig { pattern: "a:*".into(), ops: vec![] }]).is_err());
    }

    #[test]
    fn op_names_round_trip() {
        for (flag, name) in OP_NAMES {
            assert_eq!(op_from_name(name), Some(flag));
        }
        assert_eq!(ops_to_string(KeyOps::READ | KeyOps::LOCK), "read+lock");
        assert_eq!(ops_to_string(KeyOps::empty()), "none");
        assert_eq!(op_from_name("flush"), None);
    }
}
