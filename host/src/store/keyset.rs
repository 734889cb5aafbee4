//! A sorted set of key names packed into small blocks: the storage of the
//! key index ([`crate::store::index`]).
//!
//! Why not a `BTreeSet<Box<[u8]>>`: each key would cost its own heap
//! allocation (with the allocator's header and rounding) plus a 16-byte box
//! in a node slot, about 70 bytes for a 30-byte key, and the index must stay
//! near 64 bytes per key *including* the name. Here keys sit back to back,
//! each behind a 2-byte length, in blocks of at most [`BLOCK_MAX`] bytes (small, because a lookup walks its block) kept
//! in a `BTreeMap` by their first key: the cost per key is its length plus 2
//! plus the blocks' unused room. Sorted order is what a bulk operation needs:
//! `service_playlist:dance:*` is a walk from `service_playlist:dance:` to the
//! first key past that prefix, whatever else the index holds.
//!
//! Blocks are split when full (at the insertion point when appending, so keys
//! written in ascending order leave full blocks behind them, not half-full
//! ones) and merged with their successor when a removal leaves them under a
//! quarter full.

use std::collections::BTreeMap;
use std::ops::Bound;

/// Bytes of entries a block holds at most (a block holding one longer key
/// is the exception).
pub const BLOCK_MAX: usize = 512;

/// A block this empty after a removal is merged into its successor if both
/// fit in one.
const MERGE_BELOW: usize = BLOCK_MAX / 4;

/// Block capacity grows and shrinks in steps of this many bytes, so the
/// unused room of a block stays under one step.
const STEP: usize = 64;

/// The longest key the set stores (its length is kept in two bytes).
pub const MAX_KEY_LEN: usize = u16::MAX as usize;

/// Rough cost of one `BTreeMap` entry of ours beyond the block itself: the
/// slot (a box and a vector, 40 bytes) in nodes about two thirds full, and
/// the allocator's header of the block.
const PER_BLOCK_OVERHEAD: usize = 80;

/// A page of keys, and the key to go on after (`None`: the range is done).
pub type Page = (Vec<Vec<u8>>, Option<Vec<u8>>);

/// A key longer than [`MAX_KEY_LEN`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a key of {0} bytes is longer than the index stores ({MAX_KEY_LEN} bytes)")]
pub struct TooLong(pub usize);

/// The set. See the module doc.
#[derive(Default)]
pub struct KeySet {
    /// Blocks by a key no greater than their first key, and greater than
    /// every key of the block before: removing a block's first key leaves
    /// its map key as it is.
    blocks: BTreeMap<Box<[u8]>, Vec<u8>>,
    len: usize,
}

/// The entries of a block: (offset, key).
fn entries(block: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= block.len() {
            return None;
        }
        let len = u16::from_le_bytes([block[at], block[at + 1]]) as usize;
        let key = &block[at + 2..at + 2 + len];
        let offset = at;
        at += 2 + len;
        Some((offset, key))
    })
}

/// Where `key` is in `block` (`Ok(offset)`), or where it would go.
fn find(block: &[u8], key: &[u8]) -> Result<usize, usize> {
    for (offset, k) in entries(block) {
        match k.cmp(key) {
            std::cmp::Ordering::Less => {}
            std::cmp::Ordering::Equal => return Ok(offset),
            std::cmp::Ordering::Greater => return Err(offset),
        }
    }
    Err(block.len())
}

fn entry(key: &[u8]) -> impl Iterator<Item = u8> + '_ {
    (key.len() as u16).to_le_bytes().into_iter().chain(key.iter().copied())
}

fn rounded(n: usize) -> usize {
    n.div_ceil(STEP) * STEP
}

/// Give `block` room for `more` bytes, in [`STEP`]s.
fn reserve(block: &mut Vec<u8>, more: usize) {
    let want = rounded(block.len() + more);
    if block.capacity() < want {
        block.reserve_exact(want - block.len());
    }
}

/// The offset of the entry boundary closest to the middle of `block`.
/// (Never 0 for a block with entries; its length when it holds one entry.)
fn middle(block: &[u8]) -> usize {
    entries(block).map(|(offset, _)| offset).find(|offset| *offset >= block.len().div_ceil(2)).unwrap_or(block.len())
}

impl KeySet {
    pub fn new() -> KeySet {
        KeySet::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Heap bytes held, estimated from the blocks' capacities.
    pub fn heap_bytes(&self) -> usize {
        self.blocks.iter().map(|(first, block)| first.len() + block.capacity() + PER_BLOCK_OVERHEAD).sum()
    }

    pub fn clear(&mut self) {
        *self = KeySet::default();
    }

    /// The map key of the block `key` belongs in, if there is any block.
    fn block_for(&self, key: &[u8]) -> Option<Box<[u8]>> {
        self.blocks
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .map(|(first, _)| first.clone())
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        self.blocks
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .is_some_and(|(_, block)| find(block, key).is_ok())
    }

    /// Add `key`; `false` if it was there.
    pub fn insert(&mut self, key: &[u8]) -> Result<bool, TooLong> {
        if key.len() > MAX_KEY_LEN {
            return Err(TooLong(key.len()));
        }
        let first = match self.block_for(key) {
            Some(first) => first,
            None => match self.blocks.pop_first() {
                // Before every block: the first one now starts at `key`.
                Some((_, block)) => {
                    let first: Box<[u8]> = key.into();
                    self.blocks.insert(first.clone(), block);
                    first
                }
                None => {
                    let first: Box<[u8]> = key.into();
                    self.blocks.insert(first.clone(), Vec::new());
                    first
                }
            },
        };
        let block = self.blocks.get_mut(&first).expect("just found");
        let Err(at) = find(block, key) else { return Ok(false) };
        let size = 2 + key.len();
        let (block, at) = if block.len() + size > BLOCK_MAX && !block.is_empty() {
            // Split: at the insertion point when it is the end (ascending
            // writes), else in the middle.
            // (A block holding one long key is cut before it, so a key
            // inserted in front gets a block of its own.)
            let cut = match middle(block) {
                _ if at == block.len() => at,
                m if m == block.len() => at,
                m => m,
            };
            let mut tail = Vec::with_capacity(rounded(block.len() - cut + size));
            tail.extend_from_slice(&block[cut..]);
            block.truncate(cut);
            block.shrink_to(rounded(cut));
            if at < cut || cut == 0 {
                let tail_first: Option<Box<[u8]>> = entries(&tail).next().map(|(_, k)| k.into());
                if let Some(tail_first) = tail_first {
                    self.blocks.insert(tail_first, tail);
                }
                (self.blocks.get_mut(&first).expect("still there"), at)
            } else {
                // `key` opens the new block or goes inside it.
                let tail_first: Box<[u8]> = match entries(&tail).next() {
                    Some((_, k)) if at > cut => k.into(),
                    _ => key.into(),
                };
                self.blocks.insert(tail_first.clone(), tail);
                (self.blocks.get_mut(&tail_first).expect("just inserted"), at - cut)
            }
        } else {
            (block, at)
        };
        reserve(block, size);
        block.splice(at..at, entry(key));
        self.len += 1;
        Ok(true)
    }

    /// Remove `key`; `false` if it was not there.
    pub fn remove(&mut self, key: &[u8]) -> bool {
        let Some(first) = self.block_for(key) else { return false };
        let block = self.blocks.get_mut(&first).expect("just found");
        let Ok(at) = find(block, key) else { return false };
        let size = 2 + key.len();
        block.drain(at..at + size);
        self.len -= 1;
        if block.is_empty() {
            self.blocks.remove(&first);
            return true;
        }
        if block.len() < MERGE_BELOW {
            let next = self
                .blocks
                .range::<[u8], _>((Bound::Excluded(&*first), Bound::Unbounded))
                .next()
                .map(|(k, b)| (k.clone(), b.len()));
            if let Some((next_first, next_len)) = next
                && next_len + self.blocks[&first].len() <= BLOCK_MAX
            {
                let next = self.blocks.remove(&next_first).expect("just seen");
                let block = self.blocks.get_mut(&first).expect("still there");
                reserve(block, next.len());
                block.extend_from_slice(&next);
                return true;
            }
        }
        let block = self.blocks.get_mut(&first).expect("still there");
        if block.capacity() >= rounded(block.len()) + 2 * STEP {
            block.shrink_to(rounded(block.len()));
        }
        true
    }

    /// Up to `max` keys that start with `prefix` and that `keep` accepts, in
    /// order, after `after` (exclusive) if given, looking at no more than
    /// `examine` keys (a selective filter over a long range must not hold
    /// the caller's lock for the whole range). Also returns where to go on
    /// from (`None`: the prefix's range is done).
    pub fn page(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        max: usize,
        examine: usize,
        mut keep: impl FnMut(&[u8]) -> bool,
    ) -> Page {
        let from: &[u8] = match after {
            Some(after) if after > prefix => after,
            _ => prefix,
        };
        let start = self
            .blocks
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(from)))
            .next_back()
            .map(|(first, _)| first.clone());
        let blocks: Box<dyn Iterator<Item = &Vec<u8>>> = match &start {
            Some(first) => {
                Box::new(self.blocks.range::<[u8], _>((Bound::Included(&**first), Bound::Unbounded)).map(|(_, b)| b))
            }
            None => Box::new(self.blocks.values()),
        };
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut examined = 0;
        let mut last: Option<&[u8]> = None;
        for block in blocks {
            for (_, key) in entries(block) {
                if key < from || after == Some(key) {
                    continue;
                }
                if !key.starts_with(prefix) {
                    return (out, None);
                }
                if examined == examine {
                    return (out, last.map(<[u8]>::to_vec));
                }
                examined += 1;
                last = Some(key);
                if keep(key) {
                    out.push(key.to_vec());
                    if out.len() == max {
                        let resume = out.last().cloned();
                        return (out, resume);
                    }
                }
            }
        }
        (out, None)
    }

    /// Every key, in order (tests and rebuild checks).
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.blocks.values().flat_map(|b| entries(b).map(|(_, k)| k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeSet;

    fn check(set: &KeySet, model: &BTreeSet<Vec<u8>>) {
        let got: Vec<&[u8]> = set.iter().collect();
        let want: Vec<&[u8]> = model.iter().map(Vec::as_slice).collect();
        assert_eq!(got, want);
        assert_eq!(set.len(), model.len());
        // Blocks stay sorted after their map keys and bounded.
        let mut prev: Option<&[u8]> = None;
        for (first, block) in &set.blocks {
            assert!(!block.is_empty(), "no empty block is kept");
            let keys: Vec<&[u8]> = entries(block).map(|(_, k)| k).collect();
            assert!(&**first <= keys[0], "a block's map key is at most its first key");
            if let Some(p) = prev {
                assert!(p < &**first, "blocks follow each other");
            }
            prev = keys.last().copied();
            assert!(block.len() <= BLOCK_MAX || keys.len() == 1);
        }
    }

    #[test]
    fn agrees_with_a_btreeset_under_random_inserts_and_removes() {
        for seed in 0..20u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut set = KeySet::new();
            let mut model = BTreeSet::new();
            for i in 0..20_000 {
                let key = format!("k:{}:{}", rng.random_range(0..40), rng.random_range(0..400)).into_bytes();
                if rng.random_bool(0.6) {
                    assert_eq!(set.insert(&key).unwrap(), model.insert(key.clone()), "seed {seed} step {i}");
                } else {
                    assert_eq!(set.remove(&key), model.remove(&key), "seed {seed} step {i}");
                }
                assert_eq!(set.contains(&key), model.contains(&key));
            }
            check(&set, &model);
            let prefix = b"k:7:";
            let (page, next) = set.page(prefix, None, usize::MAX, usize::MAX, |_| true);
            let want: Vec<Vec<u8>> = model.iter().filter(|k| k.starts_with(prefix)).cloned().collect();
            assert_eq!(page, want, "seed {seed}");
            assert!(next.is_none());
        }
    }

    #[test]
    fn pages_resume_after_the_last_key_and_filter() {
        let mut set = KeySet::new();
        for i in 0..5000 {
            set.insert(format!("a:{i:05}").as_bytes()).unwrap();
            set.insert(format!("b:{i:05}").as_bytes()).unwrap();
        }
        // Pages of at most 333 keys, each call looking at no more than 700:
        // some calls find nothing and say where to go on.
        let mut after: Option<Vec<u8>> = None;
        let mut all = Vec::new();
        let mut calls = 0;
        loop {
            calls += 1;
            let (page, next) = set.page(b"a:", after.as_deref(), 333, 700, |k| k.ends_with(b"7"));
            all.extend(page);
            match next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(all.len(), 500);
        assert!(calls >= 5000 / 700, "{calls} calls");
        assert!(all.iter().all(|k| k.starts_with(b"a:") && k.ends_with(b"7")));
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        let (none, next) = set.page(b"c:", None, 10, 10, |_| true);
        assert!(none.is_empty() && next.is_none());
    }

    #[test]
    fn ascending_writes_fill_blocks_and_memory_stays_small() {
        let mut set = KeySet::new();
        let n = 100_000;
        for i in 0..n {
            set.insert(format!("service_playlist:dance:{i:08}").as_bytes()).unwrap();
        }
        let per_key = set.heap_bytes() / n;
        // 31-byte names: 33 bytes of entry, the rest is room and per-block cost.
        assert!(per_key <= 44, "{per_key} bytes per key");
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut random = KeySet::new();
        for _ in 0..n {
            random.insert(format!("service_playlist:dance:{:08}", rng.random_range(0..u32::MAX)).as_bytes()).unwrap();
        }
        let per_key = random.heap_bytes() / random.len();
        assert!(per_key <= 56, "{per_key} bytes per key in random order");
        // Removing most keys gives the room back.
        for i in 0..n - 1000 {
            set.remove(format!("service_playlist:dance:{i:08}").as_bytes());
        }
        assert!(set.heap_bytes() / set.len() <= 64, "{} bytes per key left", set.heap_bytes() / set.len());
    }

    #[test]
    fn long_keys() {
        let mut set = KeySet::new();
        let long = vec![b'x'; 5000];
        assert!(set.insert(&long).unwrap());
        assert!(set.insert(b"a").unwrap());
        assert!(set.insert(b"z").unwrap());
        assert!(set.contains(&long));
        assert_eq!(set.insert(&vec![b'y'; MAX_KEY_LEN + 1]), Err(TooLong(MAX_KEY_LEN + 1)));
        let model: BTreeSet<Vec<u8>> = [long.clone(), b"a".to_vec(), b"z".to_vec()].into();
        check(&set, &model);
        assert!(set.remove(&long));
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![b"a".as_slice(), b"z"]);
    }
}
