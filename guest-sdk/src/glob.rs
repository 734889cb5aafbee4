//! Redis glob patterns, matched exactly the way Redis matches them.
//!
//! `SCAN MATCH`, `KEYS` and keyspace subscriptions all use Redis's
//! `stringmatchlen`. A policy that decides which keys to touch, the host that
//! checks its grants and the fake host that stands in for Redis in tests must
//! all agree with it byte for byte, or a policy that passes its tests would
//! behave differently in production. So this module is a port of that
//! function's rules, including its corner cases:
//!
//! - `*` matches any run of bytes, `?` any one byte.
//! - `[abc]`, `[a-z]` (a reversed range `[z-a]` is the same range), `[^a-z]`
//!   negates; `\x` inside a class is a literal `x`; a class with no closing
//!   `]` runs to the end of the pattern; `[a-]` is the range `]`..`a` (Redis
//!   reads the `]` as the range's end), so that class is also unterminated.
//! - `\x` outside a class is a literal `x`; a trailing lone `\` is a literal
//!   backslash.
//! - Matching is on bytes. An empty key matches only the empty pattern
//!   (`SCAN`/`KEYS` special-case a lone `*` as "everything"; see
//!   [`Glob::is_match_all`]).
//!
//! Beyond matching, [`covers`] decides whether every key one pattern can match
//! is matched by at least one of a set of other patterns. The host uses it to
//! check `scan`/`delete-matching` patterns against a policy's grants; it is a
//! language-inclusion test on the patterns' automata, not a string heuristic,
//! so `quiz:[a-z]*` is inside `quiz:*` while `quiz*` is not, and the answer
//! comes with an example key that shows why.

use std::collections::{HashMap, VecDeque};
use std::fmt;

/// A set of bytes, one bit each.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
struct ByteSet([u64; 4]);

impl ByteSet {
    fn insert(&mut self, b: u8) {
        self.0[usize::from(b >> 6)] |= 1 << (b & 63);
    }

    fn insert_range(&mut self, from: u8, to: u8) {
        for b in from..=to {
            self.insert(b);
        }
    }

    fn contains(&self, b: u8) -> bool {
        self.0[usize::from(b >> 6)] & (1 << (b & 63)) != 0
    }

    fn complement(self) -> ByteSet {
        ByteSet(self.0.map(|w| !w))
    }
}

impl fmt::Debug for ByteSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let members: Vec<u8> = (0..=255u8).filter(|&b| self.contains(b)).collect();
        write!(f, "{:?}", String::from_utf8_lossy(&members))
    }
}

/// One element of a compiled pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    /// `*`: any run of bytes (consecutive stars are folded into one).
    Star,
    /// `?`, a literal byte, or a `[...]` class: exactly one byte from the set.
    One(ByteSet),
}

impl Token {
    fn literal(b: u8) -> Token {
        let mut set = ByteSet::default();
        set.insert(b);
        Token::One(set)
    }

    fn any() -> Token {
        Token::One(ByteSet([u64::MAX; 4]))
    }
}

/// A compiled Redis glob pattern.
///
/// Compiling never fails, because Redis accepts every byte string as a
/// pattern; [`Glob::lint`] reports constructs that are legal but probably not
/// what the author meant. Compile once (in `Policy::new`, say) and match
/// many keys: matching a compiled glob does no parsing.
///
/// ```
/// use cachepol_guest_sdk::glob::Glob;
///
/// let glob = Glob::new("quiz:[a-z]*");
/// assert!(glob.matches("quiz:today"));
/// assert!(!glob.matches("quiz:2024"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Glob {
    source: String,
    tokens: Vec<Token>,
    unterminated_class: bool,
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.source)
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl Glob {
    /// Compile `pattern` following Redis's `stringmatchlen` rules.
    ///
    /// ```
    /// # use cachepol_guest_sdk::glob::Glob;
    /// assert!(Glob::new("img:?").matches("img:1"));
    /// ```
    pub fn new(pattern: &str) -> Glob {
        let p = pattern.as_bytes();
        let mut tokens = Vec::new();
        let mut unterminated_class = false;
        let mut i = 0;
        while i < p.len() {
            match p[i] {
                b'*' => {
                    if tokens.last() != Some(&Token::Star) {
                        tokens.push(Token::Star);
                    }
                    i += 1;
                }
                b'?' => {
                    tokens.push(Token::any());
                    i += 1;
                }
                b'[' => {
                    let (set, next, closed) = parse_class(p, i + 1);
                    unterminated_class |= !closed;
                    tokens.push(Token::One(set));
                    i = next;
                }
                b'\\' if p.len() - i >= 2 => {
                    tokens.push(Token::literal(p[i + 1]));
                    i += 2;
                }
                b => {
                    tokens.push(Token::literal(b));
                    i += 1;
                }
            }
        }
        Glob { source: pattern.to_owned(), tokens, unterminated_class }
    }

    /// The pattern as written, for a manifest or a host call that takes
    /// the pattern as text.
    ///
    /// ```
    /// # use cachepol_guest_sdk::glob::Glob;
    /// assert_eq!(Glob::new("job:*").as_str(), "job:*");
    /// ```
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `key` matches, exactly as Redis would decide it.
    ///
    /// ```
    /// # use cachepol_guest_sdk::glob::Glob;
    /// let glob = Glob::new("service_playlist:[^x]*");
    /// assert!(glob.matches("service_playlist:dance:1"));
    /// assert!(!glob.matches("service_playlist:xmas"));
    /// ```
    pub fn matches(&self, key: &str) -> bool {
        self.matches_bytes(key.as_bytes())
    }

    /// [`Glob::matches`] for binary keys: Redis matches bytes, not
    /// characters, so `?` is one byte.
    ///
    /// ```
    /// # use cachepol_guest_sdk::glob::Glob;
    /// assert!(Glob::new("img:?").matches_bytes(b"img:\xff"));
    /// assert!(!Glob::new("img:?").matches("img:é"), "two bytes in UTF-8");
    /// ```
    pub fn matches_bytes(&self, key: &[u8]) -> bool {
        if key.is_empty() {
            // stringmatchlen never enters its loop for an empty string, so
            // only the empty pattern matches it (not even `*`).
            return self.tokens.is_empty();
        }
        let tokens = &self.tokens;
        let (mut t, mut i) = (0, 0);
        // Position of the last star seen and the key offset it currently
        // swallows up to: on a mismatch, let that star take one more byte.
        let mut backtrack: Option<(usize, usize)> = None;
        while i < key.len() {
            match tokens.get(t) {
                Some(Token::Star) => {
                    backtrack = Some((t, i));
                    t += 1;
                    continue;
                }
                Some(Token::One(set)) if set.contains(key[i]) => {
                    t += 1;
                    i += 1;
                    continue;
                }
                _ => {}
            }
            match backtrack {
                Some((star, from)) => {
                    t = star + 1;
                    i = from + 1;
                    backtrack = Some((star, from + 1));
                }
                None => return false,
            }
        }
        tokens[t..].iter().all(|tok| *tok == Token::Star)
    }

    /// `true` for the lone `*`, which `SCAN`/`KEYS` treat as "every key"
    /// without matching (so it includes the empty key).
    ///
    /// ```
    /// # use cachepol_guest_sdk::glob::Glob;
    /// assert!(Glob::new("*").is_match_all());
    /// assert!(!Glob::new("**").is_match_all(), "matched like any other pattern");
    /// ```
    pub fn is_match_all(&self) -> bool {
        self.source == "*"
    }

    /// The exact key this pattern matches, if it contains no wildcard:
    /// such a pattern can be one `del` rather than a `delete-matching`.
    ///
    /// ```
    /// # use cachepol_guest_sdk::glob::Glob;
    /// assert_eq!(Glob::new("graph_data:dance").literal(), Some(b"graph_data:dance".to_vec()));
    /// assert_eq!(Glob::new("quiz\\*").literal(), Some(b"quiz*".to_vec()));
    /// assert_eq!(Glob::new("quiz*").literal(), None);
    /// ```
    pub fn literal(&self) -> Option<Vec<u8>> {
        self.tokens.iter().map(single_byte).collect()
    }

    /// The bytes every match starts with: the pattern up to its first
    /// wildcard or class (escapes resolved). Lets a matcher index patterns
    /// by prefix instead of trying each one.
    ///
    /// ```
    /// # use cachepol_guest_sdk::glob::Glob;
    /// assert_eq!(Glob::new("quiz:[a-z]*").literal_prefix(), b"quiz:");
    /// ```
    pub fn literal_prefix(&self) -> Vec<u8> {
        self.tokens.iter().map_while(single_byte).collect()
    }

    /// `true` for `prefix*` patterns: a literal prefix and one trailing star,
    /// which match exactly the keys starting with the prefix (except the
    /// empty key, as with every non-empty pattern).
    ///
    /// ```
    /// # use cachepol_guest_sdk::glob::Glob;
    /// assert!(Glob::new("quiz:*").is_prefix_pattern());
    /// assert!(!Glob::new("quiz:*:today").is_prefix_pattern());
    /// ```
    pub fn is_prefix_pattern(&self) -> bool {
        let prefix = self.tokens.iter().take_while(|t| single_byte(t).is_some()).count();
        self.tokens.len() == prefix + 1 && self.tokens[prefix] == Token::Star
    }

    /// A key this pattern matches that starts with `prefix`, if there is
    /// one: the shortest such key, printable where the pattern allows.
    /// Lets a host say which of its own keys (`cachepol:...`) a grant
    /// would reach, instead of only that it would.
    ///
    /// ```
    /// # use cachepol_guest_sdk::glob::Glob;
    /// assert_eq!(Glob::new("*:*:*:*").example_starting_with(b"cachepol:"), Some(b"cachepol:::".to_vec()));
    /// assert_eq!(Glob::new("quiz:*").example_starting_with(b"cachepol:"), None);
    /// assert_eq!(Glob::new("cache*").example_starting_with(b"cachepol:"), Some(b"cachepol:".to_vec()));
    /// ```
    pub fn example_starting_with(&self, prefix: &[u8]) -> Option<Vec<u8>> {
        let mut at = Nfa::start(&self.tokens);
        for &byte in prefix {
            at = at.step(&self.tokens, byte);
            if at.is_empty() {
                return None;
            }
        }
        // From the furthest position reached, each remaining one-byte token
        // needs one byte; stars need none.
        let furthest = at.0.iter().rposition(|&on| on)?;
        let mut example = prefix.to_vec();
        for token in &self.tokens[furthest..] {
            if let Token::One(set) = token {
                let printable = (b'a'..=b'z').chain(b'0'..=b'9').chain(0x20..=0x7e).chain(0..=255);
                example.push(printable.into_iter().find(|&b| set.contains(b))?);
            }
        }
        (!example.is_empty() && self.matches_bytes(&example)).then_some(example)
    }

    /// Legal-but-suspicious constructs, worded for a person. Empty when the
    /// pattern is clean.
    ///
    /// Redis never refuses a pattern, so a typo such as a missing `]`
    /// silently matches something else; check patterns from config with
    /// this and refuse the config (an `Err` from `Policy::new`) instead.
    ///
    /// ```
    /// # use cachepol_guest_sdk::glob::Glob;
    /// assert!(Glob::new("quiz:*").lint().is_empty());
    /// assert!(Glob::new("quiz:[a-z").lint()[0].contains("without a closing `]`"));
    /// ```
    pub fn lint(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.source.is_empty() {
            problems.push("the pattern is empty".to_owned());
        }
        if self.unterminated_class {
            problems.push(format!(
                "`{}` has a `[` class without a closing `]`; Redis reads it to the end of the pattern",
                self.source
            ));
        }
        if self.source.ends_with('\\') && !self.source.ends_with("\\\\") {
            problems.push(format!("`{}` ends with a lone `\\`", self.source));
        }
        problems
    }
}

/// The byte a token matches, if it matches exactly one.
fn single_byte(token: &Token) -> Option<u8> {
    match token {
        Token::One(set) => {
            let mut members = (0..=255u8).filter(|&b| set.contains(b));
            match (members.next(), members.next()) {
                (Some(b), None) => Some(b),
                _ => None,
            }
        }
        Token::Star => None,
    }
}

/// Parse a class body starting after `[`. Returns the byte set (negation
/// already applied), the index after the class, and whether a `]` closed it.
fn parse_class(p: &[u8], mut i: usize) -> (ByteSet, usize, bool) {
    let negate = p.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut set = ByteSet::default();
    let closed = loop {
        let rest = p.len() - i;
        if rest >= 2 && p[i] == b'\\' {
            set.insert(p[i + 1]);
            i += 2;
        } else if rest >= 1 && p[i] == b']' {
            i += 1;
            break true;
        } else if rest == 0 {
            break false;
        } else if rest >= 3 && p[i + 1] == b'-' {
            let (a, b) = (p[i], p[i + 2]);
            set.insert_range(a.min(b), a.max(b));
            i += 3;
        } else {
            set.insert(p[i]);
            i += 1;
        }
    };
    (if negate { set.complement() } else { set }, i, closed)
}

/// Whether `pattern` matches `key`; see [`Glob`]. Compiles the pattern
/// each time: keep a [`Glob`] to match many keys.
///
/// ```
/// assert!(cachepol_guest_sdk::glob::matches("quiz:*", "quiz:today"));
/// ```
pub fn matches(pattern: &str, key: &str) -> bool {
    Glob::new(pattern).matches(key)
}

/// Escape every glob metacharacter in `text`, so that it matches only itself.
///
/// Use it whenever outside input (a genre name, a file name) becomes part of a
/// pattern: `delete-matching(format!("service_playlist:{}:*", escape(genre)))`
/// must not turn a genre called `*` into "every playlist".
///
/// ```
/// use cachepol_guest_sdk::glob::{Glob, escape};
///
/// let pattern = format!("service_playlist:{}:*", escape("*"));
/// assert_eq!(pattern, "service_playlist:\\*:*");
/// assert!(!Glob::new(&pattern).matches("service_playlist:rock:1"));
/// ```
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^' | '-') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The answer of [`covers`].
///
/// ```
/// use cachepol_guest_sdk::glob::{Coverage, Glob, covers};
///
/// let grant = Glob::new("quiz:*");
/// match covers(&[&grant], &Glob::new("quiz*")) {
///     Coverage::Uncovered { example } => println!("`quiz*` also matches {:?}", String::from_utf8_lossy(&example)),
///     Coverage::Covered | Coverage::TooComplex => unreachable!(),
/// }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Coverage {
    /// Every key the pattern can match is matched by one of the covering
    /// patterns.
    Covered,
    /// `example` matches the pattern but none of the covering patterns.
    Uncovered {
        /// A shortest key that shows why: the host puts it in the denial.
        example: Vec<u8>,
    },
    /// The patterns are too intricate to decide within the search limit;
    /// treat as not covered.
    TooComplex,
}

/// How many product states [`covers`] explores before giving up. Realistic
/// patterns need a few dozen; the limit bounds adversarial ones.
const COVER_STATE_LIMIT: usize = 20_000;
/// Longest non-literal pattern [`covers`] decides. A key pattern with more
/// than this many wildcards and classes is not something a cache runs on.
const COVER_TOKEN_LIMIT: usize = 1_024;
/// Total tokens of the covering patterns [`covers`] accepts.
const COVER_GRANT_TOKEN_LIMIT: usize = 8_192;
/// Work (NFA positions stepped) one [`covers`] call may do: the host runs
/// it synchronously on every `scan`/`*-matching` call, so each is bounded to
/// a few milliseconds whatever a hostile policy passes (a state limit alone
/// is not enough: `*a` and 16k `?` makes each state 16k positions wide).
const COVER_WORK_LIMIT: usize = 4_000_000;

/// Decide whether every key matched by `pattern` is matched by at least one
/// of `by`.
///
/// Both sides are turned into automata over bytes; a breadth-first search of
/// their product looks for a key that `pattern` accepts and no member of `by`
/// does. The shortest such key is returned as the example.
///
/// The host decides grants this way; a policy can ask the same question of
/// an operator's config in `Policy::new` and refuse a pattern its own grants
/// could never allow, instead of failing on every event.
///
/// ```
/// use cachepol_guest_sdk::glob::{Coverage, Glob, covers};
///
/// let grant = Glob::new("quiz:*");
/// assert_eq!(covers(&[&grant], &Glob::new("quiz:[a-z]*")), Coverage::Covered);
/// assert!(matches!(covers(&[&grant], &Glob::new("*")), Coverage::Uncovered { .. }));
/// ```
pub fn covers(by: &[&Glob], pattern: &Glob) -> Coverage {
    let mut work = COVER_WORK_LIMIT;
    covers_within(by, pattern, &mut work)
}

/// [`covers`], spending at most `*work` of its work (and never more than
/// one call's limit), and taking what it spent off `*work`: a caller that
/// checks many patterns bounds their total, not just each one. Runs out as
/// [`Coverage::TooComplex`].
///
/// ```
/// use cachepol_guest_sdk::glob::{Coverage, Glob, covers_within};
///
/// let grant = Glob::new("quiz:*");
/// let mut work = 100_000;
/// for pattern in ["quiz:a*", "quiz:b*"] {
///     assert_eq!(covers_within(&[&grant], &Glob::new(pattern), &mut work), Coverage::Covered);
/// }
/// assert!(work < 100_000);
/// ```
pub fn covers_within(by: &[&Glob], pattern: &Glob, work: &mut usize) -> Coverage {
    let budget = (*work).min(COVER_WORK_LIMIT);
    let mut left = budget;
    let coverage = search(by, pattern, &mut left);
    *work -= budget - left;
    coverage
}

fn search(by: &[&Glob], pattern: &Glob, work: &mut usize) -> Coverage {
    if pattern.tokens.is_empty() {
        // The empty pattern matches only the empty key.
        return if by.iter().any(|g| g.tokens.is_empty()) {
            Coverage::Covered
        } else {
            Coverage::Uncovered { example: Vec::new() }
        };
    }
    // A literal pattern is one key: no automaton needed, whatever its length.
    if let Some(key) = pattern.literal() {
        return if by.iter().any(|g| g.matches_bytes(&key)) {
            Coverage::Covered
        } else {
            Coverage::Uncovered { example: key }
        };
    }
    let grant_tokens: usize = by.iter().map(|g| g.tokens.len() + 1).sum();
    if pattern.tokens.len() > COVER_TOKEN_LIMIT || grant_tokens > COVER_GRANT_TOKEN_LIMIT {
        return Coverage::TooComplex;
    }
    let step_cost = pattern.tokens.len() + 1 + grant_tokens;
    let alphabet = representative_bytes(by, pattern);
    let start = ProductState {
        pattern: Nfa::start(&pattern.tokens),
        covering: by.iter().map(|g| Nfa::start(&g.tokens)).collect(),
    };
    // Each visited state remembers how it was reached, to rebuild the example.
    let mut seen: HashMap<ProductState, Option<(usize, u8)>> = HashMap::new();
    let mut order: Vec<ProductState> = Vec::new();
    let mut queue = VecDeque::new();
    seen.insert(start.clone(), None);
    order.push(start.clone());
    queue.push_back(0usize);
    while let Some(index) = queue.pop_front() {
        let state = order[index].clone();
        for &byte in &alphabet {
            let Some(rest) = work.checked_sub(step_cost) else {
                *work = 0;
                return Coverage::TooComplex;
            };
            *work = rest;
            let next_pattern = state.pattern.step(&pattern.tokens, byte);
            if next_pattern.is_empty() {
                continue;
            }
            let next = ProductState {
                covering: state.covering.iter().zip(by).map(|(s, g)| s.step(&g.tokens, byte)).collect(),
                pattern: next_pattern,
            };
            let pattern_accepts = next.pattern.accepts(&pattern.tokens);
            let covered = next.covering.iter().zip(by).any(|(s, g)| s.accepts(&g.tokens));
            if pattern_accepts && !covered {
                let mut example = vec![byte];
                let mut at = index;
                while let Some((parent, b)) = seen[&order[at]] {
                    example.push(b);
                    at = parent;
                }
                example.reverse();
                return Coverage::Uncovered { example };
            }
            if !seen.contains_key(&next) {
                if order.len() >= COVER_STATE_LIMIT {
                    return Coverage::TooComplex;
                }
                seen.insert(next.clone(), Some((index, byte)));
                order.push(next);
                queue.push_back(order.len() - 1);
            }
        }
    }
    Coverage::Covered
}

/// One byte from each class of bytes that no pattern involved tells apart.
/// Printable ones are preferred so that examples read well.
fn representative_bytes(by: &[&Glob], pattern: &Glob) -> Vec<u8> {
    // Distinct sets only: a pattern of 16k `?` has one set, not 16k.
    let sets: Vec<ByteSet> = by
        .iter()
        .copied()
        .chain(std::iter::once(pattern))
        .flat_map(|g| g.tokens.iter())
        .filter_map(|tok| match tok {
            Token::One(set) => Some(*set),
            Token::Star => None,
        })
        .collect::<std::collections::HashSet<_>>()
        .into_iter()
        .collect();
    let preferred = (b'a'..=b'z').chain(b'0'..=b'9').chain(0x20..=0x7e).chain(0..=255);
    let mut seen_signatures = std::collections::HashSet::new();
    preferred
        .filter(|&b| {
            let signature: Vec<bool> = sets.iter().map(|s| s.contains(b)).collect();
            seen_signatures.insert(signature)
        })
        .collect()
}

/// A set of positions in a pattern's token list (the states of its NFA),
/// kept closed under "a star may match nothing".
#[derive(Clone, PartialEq, Eq, Hash)]
struct Nfa(Vec<bool>);

impl Nfa {
    fn start(tokens: &[Token]) -> Nfa {
        let mut states = vec![false; tokens.len() + 1];
        states[0] = true;
        let mut nfa = Nfa(states);
        nfa.close(tokens);
        nfa
    }

    fn close(&mut self, tokens: &[Token]) {
        for (t, token) in tokens.iter().enumerate() {
            if self.0[t] && *token == Token::Star {
                self.0[t + 1] = true;
            }
        }
    }

    fn step(&self, tokens: &[Token], byte: u8) -> Nfa {
        let mut next = vec![false; self.0.len()];
        for (t, token) in tokens.iter().enumerate() {
            if !self.0[t] {
                continue;
            }
            match token {
                Token::Star => next[t] = true,
                Token::One(set) if set.contains(byte) => next[t + 1] = true,
                Token::One(_) => {}
            }
        }
        let mut nfa = Nfa(next);
        nfa.close(tokens);
        nfa
    }

    fn is_empty(&self) -> bool {
        !self.0.contains(&true)
    }

    fn accepts(&self, tokens: &[Token]) -> bool {
        self.0[tokens.len()]
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct ProductState {
    pattern: Nfa,
    covering: Vec<Nfa>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, key: &str) -> bool {
        matches(pattern, key)
    }

    #[test]
    fn stars_and_question_marks() {
        assert!(m("quiz:*", "quiz:1"));
        assert!(m("quiz:*", "quiz:"));
        assert!(!m("quiz:*", "quiz"));
        assert!(m("*", "anything"));
        assert!(m("a*b*c", "abc"));
        assert!(m("a*b*c", "axxbyyc"));
        assert!(!m("a*b*c", "axxbyy"));
        assert!(m("h?llo", "hello"));
        assert!(!m("h?llo", "hllo"));
        assert!(m("**a**", "xa"));
        assert!(m("a*", "a"));
        assert!(!m("a*?", "a"));
    }

    #[test]
    fn empty_key_matches_only_the_empty_pattern() {
        assert!(m("", ""));
        assert!(!m("*", ""));
        assert!(!m("", "a"));
        assert!(Glob::new("*").is_match_all());
        assert!(!Glob::new("**").is_match_all());
    }

    #[test]
    fn classes_ranges_and_negation() {
        assert!(m("h[ae]llo", "hallo"));
        assert!(!m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo"));
        assert!(!m("h[^e]llo", "hello"));
        assert!(m("h[a-b]llo", "hbllo"));
        assert!(m("h[b-a]llo", "hallo"), "reversed ranges are swapped");
        assert!(!m("h[a-b]llo", "hcllo"));
        assert!(m("[\\]]", "]"));
        assert!(m("[\\-]", "-"));
        assert!(!m("[]", "a"), "an empty class matches nothing");
        assert!(m("[^]", "a"), "a negated empty class matches anything");
    }

    #[test]
    fn redis_corner_cases_of_classes() {
        // Unterminated class runs to the end of the pattern.
        assert!(m("[abc", "b"));
        assert!(!m("[abc", "bc"));
        // `[a-]` is the range `]`..`a` and swallows the `]`.
        assert!(m("[a-]", "_"));
        assert!(m("[a-]", "a"));
        assert!(!m("[a-]", "-"));
        assert!(Glob::new("[a-]").lint().iter().any(|l| l.contains("closing")));
        assert!(Glob::new("x[abc]").lint().is_empty());
    }

    #[test]
    fn escapes() {
        assert!(m("quiz\\*", "quiz*"));
        assert!(!m("quiz\\*", "quiz:1"));
        assert!(m("a\\?b", "a?b"));
        assert!(!m("a\\?b", "axb"));
        assert!(m("a\\", "a\\"), "a trailing backslash is literal");
        assert!(m("\\a", "a"));
    }

    #[test]
    fn escape_makes_any_text_literal() {
        for text in ["*", "a?b", "[x]", "back\\slash", "^-", "plain", "dance"] {
            let g = Glob::new(&escape(text));
            assert!(g.matches(text), "{text}");
            assert_eq!(g.literal().as_deref(), Some(text.as_bytes()), "{text}");
        }
        assert!(!Glob::new(&format!("service_playlist:{}:*", escape("*"))).matches("service_playlist:rock:1"));
    }

    #[test]
    fn literal_detects_wildcard_free_patterns() {
        assert_eq!(Glob::new("a:b").literal(), Some(b"a:b".to_vec()));
        assert_eq!(Glob::new("a:[b]").literal(), Some(b"a:b".to_vec()));
        assert_eq!(Glob::new("a:*").literal(), None);
        assert_eq!(Glob::new("a:[bc]").literal(), None);
    }

    #[test]
    fn literal_prefixes_for_indexing() {
        assert_eq!(Glob::new("quiz:*").literal_prefix(), b"quiz:");
        assert_eq!(Glob::new("a\\*b*").literal_prefix(), b"a*b");
        assert_eq!(Glob::new("[x]y?z").literal_prefix(), b"xy");
        assert_eq!(Glob::new("*").literal_prefix(), b"");
        assert!(Glob::new("quiz:*").is_prefix_pattern());
        assert!(Glob::new("*").is_prefix_pattern());
        assert!(!Glob::new("quiz:*:x").is_prefix_pattern());
        assert!(!Glob::new("quiz:").is_prefix_pattern());
        assert!(!Glob::new("q?iz:*").is_prefix_pattern());
    }

    fn cov(by: &[&str], pattern: &str) -> Coverage {
        let by: Vec<Glob> = by.iter().map(|p| Glob::new(p)).collect();
        let refs: Vec<&Glob> = by.iter().collect();
        covers(&refs, &Glob::new(pattern))
    }

    #[test]
    fn covers_accepts_narrower_patterns() {
        for p in ["quiz:*", "quiz:2024:*", "quiz:[a-z]*", "quiz\\:*", "quiz:?", "quiz:x", "quiz:**", "quiz:*:*"] {
            assert_eq!(cov(&["quiz:*"], p), Coverage::Covered, "{p}");
        }
    }

    #[test]
    fn covers_rejects_wider_patterns_with_an_example() {
        let cases = [
            ("*", "a"),
            ("q*", "q"),
            ("quiz*", "quiz"),
            ("quiz?*", "quiza"),
            ("[a-z]*", "a"),
            ("quiz[:;]*", "quiz;"),
            ("quiz\\*", "quiz*"),
            ("?uiz:*", "auiz:"),
            ("[^x]uiz:*", "auiz:"),
        ];
        for (pattern, example) in cases {
            assert_eq!(
                cov(&["quiz:*"], pattern),
                Coverage::Uncovered { example: example.as_bytes().to_vec() },
                "{pattern}"
            );
        }
    }

    #[test]
    fn covers_uses_the_union_of_grants() {
        assert_eq!(cov(&["a:*", "b:*"], "[ab]:*"), Coverage::Covered);
        assert!(matches!(cov(&["a:*", "b:*"], "[abc]:*"), Coverage::Uncovered { .. }));
        assert_eq!(cov(&["k:[a-m]*", "k:[n-z]*"], "k:[a-z]x"), Coverage::Covered);
        assert_eq!(cov(&["k:[a-m]*", "k:[^a-m]*"], "k:*"), Coverage::Uncovered { example: b"k:".to_vec() });
        assert_eq!(cov(&["k:[a-m]*", "k:[^a-m]*"], "k:?*"), Coverage::Covered);
        assert_eq!(cov(&[], "x"), Coverage::Uncovered { example: b"x".to_vec() });
    }

    #[test]
    fn covers_handles_grants_with_inner_wildcards() {
        assert_eq!(cov(&["sp:*:*"], "sp:dance:*"), Coverage::Covered);
        assert!(matches!(cov(&["sp:*:*"], "sp:dance*"), Coverage::Uncovered { .. }));
        assert_eq!(cov(&["*:suffix"], "a:*:suffix"), Coverage::Covered);
        assert!(matches!(cov(&["*:suffix"], "a:*"), Coverage::Uncovered { .. }));
    }

    #[test]
    fn covers_literal_keys_like_matches() {
        assert_eq!(cov(&["last_updated:*"], "last_updated:dance"), Coverage::Covered);
        assert!(matches!(cov(&["last_updated:x"], "last_updated:y"), Coverage::Uncovered { .. }));
        assert_eq!(cov(&["a"], ""), Coverage::Uncovered { example: vec![] });
        assert_eq!(cov(&[""], ""), Coverage::Covered);
    }

    #[test]
    fn covers_gives_up_on_adversarial_patterns_instead_of_hanging() {
        // `*a` followed by n `?`: its automaton must remember which of the last
        // n bytes were `a`, 2^n states; deciding it against itself would take
        // that many steps.
        let blowup = format!("*a{}", "?".repeat(20));
        assert_eq!(cov(&[&blowup], &blowup), Coverage::TooComplex);
        // A small one of the same shape is still decided.
        let small = format!("*a{}", "?".repeat(3));
        assert_eq!(cov(&[&small], &small), Coverage::Covered);
        // Wide states: each of few states is 16k positions; refused on its
        // length, before any automaton is built.
        let wide = format!("hostile:*a{}", "?".repeat(16_000));
        assert_eq!(cov(&["hostile:*"], &wide), Coverage::TooComplex);
        // Under the token limit but wide enough to cost: the work limit ends it.
        let costly = format!("hostile:*a{}", "?".repeat(1_000));
        assert_eq!(cov(&["hostile:*", "other:*"], &costly), Coverage::TooComplex);
        // A long literal key is decided directly.
        let long_key = format!("hostile:{}", "k".repeat(16_000));
        assert_eq!(cov(&["hostile:*"], &long_key), Coverage::Covered);
        // A shared allowance bounds the total: once spent, even an easy
        // pattern is not decided, and what a call spent is taken off.
        let (hostile, grant) = (Glob::new("hostile:*"), Glob::new(&costly));
        let mut work = 5_000_000;
        assert_eq!(covers_within(&[&hostile], &grant, &mut work), Coverage::TooComplex);
        assert!(work <= 1_000_000, "one call spends at most its own limit, {work} left");
        let mut none = 0;
        assert_eq!(covers_within(&[&hostile], &Glob::new("hostile:[ab]*"), &mut none), Coverage::TooComplex);
        let mut plenty = 100_000;
        assert_eq!(covers_within(&[&hostile], &Glob::new("hostile:[ab]*"), &mut plenty), Coverage::Covered);
        assert!(plenty < 100_000, "deciding costs something");
    }

    /// Cross-check `covers` against brute force on every short key over a
    /// small alphabet: whenever it says covered, no key may disprove it, and
    /// every example it gives must be real.
    #[test]
    fn covers_agrees_with_brute_force() {
        let patterns = ["a*", "*a", "a?", "?a", "[ab]*", "[^a]*", "a\\*", "*", "ab", "a*b", "[a-b]?", "?*?", "b*a*"];
        let alphabet = [b'a', b'b', b'*'];
        let mut keys: Vec<Vec<u8>> = vec![vec![]];
        for len in 1..=4 {
            let mut k = vec![0usize; len];
            loop {
                keys.push(k.iter().map(|&i| alphabet[i]).collect());
                let mut pos = 0;
                while pos < len {
                    k[pos] += 1;
                    if k[pos] < alphabet.len() {
                        break;
                    }
                    k[pos] = 0;
                    pos += 1;
                }
                if pos == len {
                    break;
                }
            }
        }
        for g in patterns {
            for p in patterns {
                let grant = Glob::new(g);
                let pattern = Glob::new(p);
                match covers(&[&grant], &pattern) {
                    Coverage::Covered => {
                        for key in &keys {
                            if pattern.matches_bytes(key) {
                                assert!(grant.matches_bytes(key), "{p} in {g}: {key:?}");
                            }
                        }
                    }
                    Coverage::Uncovered { example } => {
                        assert!(pattern.matches_bytes(&example), "{p} in {g}: {example:?}");
                        assert!(!grant.matches_bytes(&example), "{p} in {g}: {example:?}");
                    }
                    Coverage::TooComplex => panic!("{p} in {g} too complex"),
                }
            }
        }
    }
}
