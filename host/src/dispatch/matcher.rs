//! Which policies want a keyspace event: a matcher built once per policy set.
//!
//! Trying every subscription glob of every policy on every event would cost
//! (policies x patterns) glob matches per event at hundreds of thousands of
//! events a second. Instead, patterns are indexed in a byte trie by their
//! literal prefix (`service_playlist:` for `service_playlist:*:web`): an
//! event walks the trie along its key once, collecting only the patterns
//! whose prefix the key starts with. `prefix*` patterns (the common case)
//! then match without further work; the rest run their glob once.

use std::collections::HashMap;

use cachepol_guest_sdk::glob::Glob;

use crate::sandbox::manifest::Manifest;

/// Route for one subscription pattern.
#[derive(Debug)]
struct Route {
    /// Index of the policy in the set the matcher was built from.
    policy: usize,
    /// `None`: every event name.
    ops: Option<Vec<String>>,
    glob: Glob,
    /// The prefix alone decides (a `prefix*` pattern).
    prefix_only: bool,
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<u8, usize>,
    routes: Vec<usize>,
}

/// The compiled subscriptions of a set of policies.
#[derive(Debug, Default)]
pub struct Matcher {
    nodes: Vec<Node>,
    routes: Vec<Route>,
    policies: usize,
}

impl Matcher {
    /// Build from manifests; a policy's index in `manifests` is its id in
    /// [`Matcher::matching`]'s answers.
    pub fn new<'a>(manifests: impl IntoIterator<Item = &'a Manifest>) -> Matcher {
        let mut m = Matcher { nodes: vec![Node::default()], routes: Vec::new(), policies: 0 };
        for (policy, manifest) in manifests.into_iter().enumerate() {
            m.policies = policy + 1;
            for sub in &manifest.key_subscriptions {
                let ops = if sub.ops.is_empty() { None } else { Some(sub.ops.clone()) };
                for glob in &sub.patterns {
                    m.insert(Route {
                        policy,
                        ops: ops.clone(),
                        glob: glob.clone(),
                        prefix_only: glob.is_prefix_pattern(),
                    });
                }
            }
        }
        m
    }

    fn insert(&mut self, route: Route) {
        let mut node = 0;
        for byte in route.glob.literal_prefix() {
            node = match self.nodes[node].children.get(&byte) {
                Some(&next) => next,
                None => {
                    self.nodes.push(Node::default());
                    let next = self.nodes.len() - 1;
                    self.nodes[node].children.insert(byte, next);
                    next
                }
            };
        }
        self.routes.push(route);
        let id = self.routes.len() - 1;
        self.nodes[node].routes.push(id);
    }

    /// The policies (by index, ascending, no repeats) subscribed to `op` on
    /// `key`.
    pub fn matching(&self, op: &str, key: &[u8]) -> Vec<usize> {
        let mut hit = vec![false; self.policies];
        let mut node = 0;
        let mut depth = 0;
        loop {
            for &r in &self.nodes[node].routes {
                let route = &self.routes[r];
                if hit[route.policy] || route.ops.as_ref().is_some_and(|ops| !ops.iter().any(|o| o == op)) {
                    continue;
                }
                // The empty key matches no non-empty pattern (Redis's rule).
                let matched = if route.prefix_only { !key.is_empty() } else { route.glob.matches_bytes(key) };
                hit[route.policy] |= matched;
            }
            match key.get(depth).and_then(|b| self.nodes[node].children.get(b)) {
                Some(&next) => {
                    node = next;
                    depth += 1;
                }
                None => break,
            }
        }
        hit.iter().enumerate().filter(|(_, h)| **h).map(|(i, _)| i).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::grants::Grants;
    use crate::sandbox::manifest::KeySubscription;

    fn manifest(subs: &[(&[&str], &[&str])]) -> Manifest {
        Manifest {
            name: "p".into(),
            version: semver::Version::new(1, 0, 0),
            description: String::new(),
            key_subscriptions: subs
                .iter()
                .map(|(ops, pats)| KeySubscription {
                    ops: ops.iter().map(|s| s.to_string()).collect(),
                    patterns: pats.iter().map(|p| Glob::new(p)).collect(),
                })
                .collect(),
            deploys: vec![],
            sweep_interval: None,
            grants: Grants::default(),
        }
    }

    #[test]
    fn routes_by_op_and_pattern() {
        let ms = [
            manifest(&[(&["set"], &["last_updated:*"])]),
            manifest(&[(&[], &["graph_data:*", "service_playlist:*:web"])]),
            manifest(&[(&["expired", "del"], &["lock:file:*"])]),
            manifest(&[(&["set"], &["*"])]),
        ];
        let m = Matcher::new(&ms);
        assert_eq!(m.matching("set", b"last_updated:dance"), [0, 3]);
        assert_eq!(m.matching("del", b"last_updated:dance"), Vec::<usize>::new());
        assert_eq!(m.matching("expire", b"graph_data:x"), [1]);
        assert_eq!(m.matching("set", b"service_playlist:dance:web"), [1, 3]);
        assert_eq!(m.matching("set", b"service_playlist:dance:ios"), [3]);
        assert_eq!(m.matching("expired", b"lock:file:app.py"), [2]);
        assert_eq!(m.matching("set", b"lock:file:app.py"), [3]);
        assert_eq!(m.matching("set", b""), Vec::<usize>::new(), "the empty key matches no pattern");
    }

    /// The trie must agree with matching every glob directly.
    #[test]
    fn agrees_with_plain_glob_matching() {
        let patterns = ["a*", "ab*", "a?c", "[ab]*", "abc", "a\\*", "*c", "ab*c*"];
        let ms: Vec<Manifest> = patterns.iter().map(|p| manifest(&[(&[], &[p])])).collect();
        let m = Matcher::new(&ms);
        let alphabet = [b'a', b'b', b'c', b'*'];
        for len in 1..=4u32 {
            for n in 0..alphabet.len().pow(len) {
                let key: Vec<u8> = (0..len).map(|i| alphabet[(n / alphabet.len().pow(i)) % alphabet.len()]).collect();
                let want: Vec<usize> = patterns
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| Glob::new(p).matches_bytes(&key))
                    .map(|(i, _)| i)
                    .collect();
                assert_eq!(m.matching("set", &key), want, "{:?}", String::from_utf8_lossy(&key));
            }
        }
    }
}
