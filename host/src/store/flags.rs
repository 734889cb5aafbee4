//! What a `notify-keyspace-events` value says, and what it cannot say.
//!
//! Redis prints the flags it holds, not the flags it was given: whenever
//! every class of `A` is on, it prints `A`, and the classes outside `A`
//! (`n`, a key created) are left out even when they are on. Redis 7.0 and
//! Valkey 9.1 read `CONFIG SET notify-keyspace-events AKEn` back as `AKE`,
//! while `new` events are delivered. So under an `A`, a class outside it is
//! neither on nor off by the text: only an observation can tell (the
//! subscriber's probe, [`crate::intake::notify`]). Without an `A`, every
//! class that is on is printed, so what the text leaves out is off.
//!
//! Both the subscriber (which sets and checks the flags) and the bulk
//! operations (which read them before trusting the key index) read values
//! through here, so they agree on what a text means.

use std::collections::BTreeSet;

/// Every class flag `A` stands for (Redis 7's syntax).
pub const ALL_CLASSES: &str = "g$lshzxetd";

/// Flags printed on their own even under `A`: the channel kinds and key
/// misses.
const BESIDE_ALL: &str = "KEm";

/// A value, read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flags {
    /// The flags the text shows on (`A` expanded).
    pub on: BTreeSet<char>,
    /// The text has an `A`: classes outside it are not shown either way.
    all: bool,
}

impl Flags {
    pub fn parse(value: &str) -> Flags {
        let mut on = BTreeSet::new();
        for c in value.chars() {
            if c == 'A' {
                on.extend(ALL_CLASSES.chars());
            } else {
                on.insert(c);
            }
        }
        Flags { on, all: value.contains('A') }
    }

    /// Of `needed`: what the text shows off, and what it cannot show (a
    /// class outside `A` under an `A`).
    pub fn lacks(&self, needed: &BTreeSet<char>) -> (BTreeSet<char>, BTreeSet<char>) {
        needed
            .difference(&self.on)
            .copied()
            .partition(|c| !self.all || BESIDE_ALL.contains(*c) || ALL_CLASSES.contains(*c))
    }

    /// What the text says about `needed`.
    pub fn say(&self, needed: &BTreeSet<char>) -> Says {
        match self.lacks(needed) {
            (off, _) if !off.is_empty() => Says::Off,
            (_, unsure) if !unsure.is_empty() => Says::Unsure,
            _ => Says::On,
        }
    }
}

/// What a value says about a set of flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Says {
    /// Every one is on.
    On,
    /// One at least is off.
    Off,
    /// None is shown off, but one at least is not shown at all (`n` under
    /// `A`).
    Unsure,
}

/// Flags as Redis users write them: `K`/`E` first, then the classes.
pub fn text(flags: &BTreeSet<char>) -> String {
    let (kinds, classes): (Vec<char>, Vec<char>) = flags.iter().partition(|c| matches!(c, 'K' | 'E'));
    kinds.into_iter().chain(classes).collect()
}

/// Flags as a `notify-keyspace-events` value, `A` for every class of it:
/// `AKEn`, what an operator types.
pub fn value(flags: &BTreeSet<char>) -> String {
    if !ALL_CLASSES.chars().all(|c| flags.contains(&c)) {
        return text(flags);
    }
    let kinds = ['K', 'E'].into_iter().filter(|c| flags.contains(c));
    let rest = flags.iter().copied().filter(|c| !ALL_CLASSES.contains(*c) && !matches!(c, 'K' | 'E'));
    std::iter::once('A').chain(kinds).chain(rest).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(flags: &str) -> BTreeSet<char> {
        flags.chars().collect()
    }

    #[test]
    fn a_expands_to_every_class_and_hides_n() {
        assert_eq!(text(&Flags::parse("KEA").on), "EK$deghlstxz");
        assert_eq!(text(&Flags::parse("").on), "");
        let index = set("Engxe");
        // What Redis prints after `CONFIG SET notify-keyspace-events AKEn`.
        assert_eq!(Flags::parse("AKE").lacks(&index), (set(""), set("n")));
        assert_eq!(Flags::parse("AKE").say(&index), Says::Unsure);
        // Printed class by class, `n` shows.
        assert_eq!(Flags::parse("g$xenKE").say(&index), Says::On);
        assert_eq!(Flags::parse("KEg$xen").say(&index), Says::On);
        // Without `A`, what is not printed is off.
        assert_eq!(Flags::parse("Ex").lacks(&index), (set("egn"), set("")));
        assert_eq!(Flags::parse("KEg$xe").say(&index), Says::Off);
        // Under `A`, a kind or a class of `A` left out is off for sure.
        assert_eq!(Flags::parse("AK").lacks(&index), (set("E"), set("n")));
        assert_eq!(Flags::parse("AK").say(&index), Says::Off);
    }

    #[test]
    fn values_are_written_as_operators_do() {
        assert_eq!(value(&Flags::parse("KEAn").on), "AKEn");
        assert_eq!(value(&set("Engxe")), "Eegnx");
        assert_eq!(Flags::parse(&value(&Flags::parse("g$lshzxetdnKE").on)).on, Flags::parse("AKEn").on);
    }
}
