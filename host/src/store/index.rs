//! The key index: which keys exist under the patterns bulk operations use,
//! kept from the keyspace notifications the daemon receives anyway, so that
//! `delete-matching`, `expire-matching` and sweeps cost what they touch
//! instead of a `SCAN` of the whole keyspace (dropping 100 keys among 2M by
//! `SCAN` costs Redis about 1.7 s here).
//!
//! **What is indexed.** The patterns of the grants that allow `delete` or
//! `expire` on a wildcard pattern: those are exactly the keys a policy's bulk
//! operations can reach (a bulk operation outside its grants is refused), so
//! the bundled policies get the fast path with no operator config, and a
//! policy that only reads or only writes named keys costs nothing. The
//! operator adds patterns (`[index] patterns`) or turns it off
//! (`[index] enabled = false`). A pattern covered by another indexed one is
//! not kept twice.
//!
//! **Where.** In daemon memory ([`KeySet`]: names packed in sorted blocks,
//! about the key's length plus 10 bytes). In Redis it would cost an extra
//! write per application write on the server the cache lives on; here it
//! costs an ordered insert per notification.
//!
//! **Exact or not used.** A pattern's index serves a bulk operation only
//! while it is complete: built by a `SCAN` started once the subscription
//! carried the index's events ([`OPS`]: `new`, which Redis sends for every
//! key created, and the removals), with no gap since (a lost subscription,
//! a daemon start, notification flags without `n`, a pattern newly added).
//! Whether the flags send `n` is the subscriber's finding when the value
//! cannot show it (`A` hides `n`: [`crate::store::flags`]); a bulk
//! operation reads the value again and trusts the index only if the value
//! shows the flags, or is the one the subscriber found them under (a value
//! that shows a flag off is a gap). Before serving, the operation *fences* the subscription: it
//! publishes a marker on the daemon's fence channel and waits for it to come
//! back through the subscription connection, after every notification Redis
//! queued before it, so every write answered before the operation started is
//! in the index. Otherwise the operation scans, as before.
//!
//! `new` adds a key, `del`/`expired`/`evicted`/`rename_from`/`move_from`
//! remove it; other events change nothing (the key's creation was told). The index may hold keys Redis no
//! longer has (`FLUSHALL`, an expired key not yet reaped), never the reverse:
//! a stale name costs a no-op in the bulk operation, whose counts come from
//! Redis's answers, so results are the same as the scan's. A stale name
//! found while building (the scan returned a key whose removal was already
//! read) is kept out by the removals seen during the build.
//!
//! **Bounded.** Past `[index] max_keys` keys a pattern's index is dropped
//! (one log line) and its bulk operations scan.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cachepol_guest_sdk::glob::{self, Coverage, Glob};
use tokio::sync::{Notify, oneshot};
use tracing::{info, warn};

use crate::metrics::metrics;
use crate::store::backend::scan_pattern_for;
use crate::store::flags::{Flags, Says};
use crate::store::keyset::{KeySet, Page};

/// Events that take a key away.
pub const REMOVALS: [&str; 5] = ["del", "expired", "evicted", "rename_from", "move_from"];

/// The event Redis (7.0 and later) sends when a key is created, whatever
/// the command (`SET`, `HSET`, `RESTORE`, a copy's or a rename's target, a
/// module's type...): flag `n`, which `A` does not include.
pub const NEW: &str = "new";

/// The keyevent channels the index needs: creations, and the removals that
/// keep it from holding names Redis dropped. Not every op: ttl-table's own
/// `EXPIRE`s alone are as many notifications as the writes they follow.
pub const OPS: [&str; 6] = [NEW, "del", "expired", "evicted", "rename_from", "move_from"];

/// Removals remembered while a build runs, at most; past that the build
/// starts over (a scan running through a storm of expiries).
const TOMBSTONES_MAX: usize = 1 << 20;

/// The `notify-keyspace-events` flags for [`OPS`] on keyevent channels.
pub const FLAGS: &str = "Engxe";

/// What a `notify-keyspace-events` value read before a bulk operation means
/// for the index ([`KeyIndex::flags_say`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlagsSay {
    /// [`OPS`] are sent: shown by the value, or confirmed by the subscriber
    /// under this very value.
    Sent,
    /// One at least is off: keys may be created unnotified.
    Off,
    /// The value cannot show it (`n` under `A`) and the subscriber has not
    /// confirmed it under this value yet.
    Unconfirmed,
}

/// Fault injection for tests: with this set (milliseconds), every build
/// waits that long before its scan, so a test can act while the index is
/// incomplete. Never set in production.
const BUILD_DELAY_ENV: &str = "CACHEPOL_FAULT_INDEX_BUILD_DELAY_MS";

/// Patterns indexed at most (after those covered by others are left out);
/// the rest are not indexed, said once per change. Every notification is
/// matched against each, under the lock the subscriber needs.
pub const MAX_PATTERNS: usize = 64;

/// Work allowed to decide which patterns cover which
/// ([`glob::covers_within`]), for all of them together.
const COVERAGE_WORK: usize = 4_000_000;

/// Names a page of a walk looks at, at most, while holding the lock.
const EXAMINE: usize = 16_384;

/// How long a bulk operation waits for its fence before scanning instead.
pub const FENCE_WAIT: Duration = Duration::from_secs(2);

/// How long after a bulk walk's last `SCAN` page a build still holds back
/// ([`KeyIndex::walking`]): longer than the pause between two slices of a
/// sweep, so that a sliced walk is waited for whole.
const WALK_HOLD: Duration = Duration::from_secs(2);

/// How long one build holds back for walks in all: past it the build goes
/// on beside them, so that walks that never pause (hooks scanning the
/// keyspace back to back, which is what a complete index would spare) do
/// not keep the index from ever being built.
const WALK_HOLD_MAX: Duration = Duration::from_secs(120);

/// Keys a build visits before it projects each pattern's final size from
/// what it found so far: at least this many, and at least
/// [`PROJECT_AFTER_PART`] of the keyspace.
const PROJECT_AFTER: u64 = 100_000;
const PROJECT_AFTER_PART: u64 = 50;

/// Where a pattern's index stands.
enum Status {
    /// Needs a build (the subscription may not carry everything yet).
    Waiting,
    /// A scan is filling it; removals seen meanwhile are remembered so the
    /// scan's late answers do not bring them back.
    Building { tombstones: HashSet<Box<[u8]>>, since: Instant },
    /// Holds every key of the pattern; `lease` changes with each build.
    Complete { lease: u64 },
    /// Over the cap, or holding a key it cannot store: not kept.
    Dropped,
}

impl Status {
    fn name(&self) -> &'static str {
        match self {
            Status::Waiting => "waiting",
            Status::Building { .. } => "building",
            Status::Complete { .. } => "complete",
            Status::Dropped => "dropped",
        }
    }
}

struct Pattern {
    glob: Glob,
    /// The glob's literal prefix, and whether the glob is just that and a
    /// `*`: most keys are told apart by a prefix compare.
    prefix: Vec<u8>,
    prefix_only: bool,
    keys: KeySet,
    status: Status,
}

impl Pattern {
    fn new(glob: Glob) -> Pattern {
        let (prefix, prefix_only) = (glob.literal_prefix(), glob.is_prefix_pattern());
        Pattern { glob, prefix, prefix_only, keys: KeySet::new(), status: Status::Waiting }
    }

    fn matches(&self, key: &[u8]) -> bool {
        key.starts_with(&self.prefix) && (self.prefix_only && !key.is_empty() || self.glob.matches_bytes(key))
    }

    fn drop_index(&mut self, why: &str) {
        warn!(
            pattern = %self.glob,
            keys = self.keys.len(),
            "the key index of this pattern is dropped ({why}); bulk operations on it scan Redis"
        );
        self.keys.clear();
        self.status = Status::Dropped;
    }
}

#[derive(Default)]
struct State {
    patterns: Vec<Pattern>,
    /// The subscription carries every op and the notification flags cover
    /// every key type: builds may start.
    covering: bool,
    /// The `notify-keyspace-events` value under which the subscriber last
    /// found [`OPS`] sent (the value may not show it: `n` under `A`).
    flags: Option<String>,
    /// Changes with every gap: a build or fence of an older epoch is void.
    epoch: u64,
    next_lease: u64,
    next_fence: u64,
    fences: Vec<(u64, oneshot::Sender<()>)>,
}

/// A fence on its way through the subscription ([`KeyIndex::fence`]).
pub struct Fence(oneshot::Receiver<()>);

/// Why a fence did not come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FenceLost {
    #[error("the subscription had a gap while fencing")]
    Gap,
    #[error("the subscription is too far behind to fence")]
    Late,
}

impl Fence {
    /// Wait up to `within` for it to come back.
    pub async fn back(self, within: Duration) -> Result<(), FenceLost> {
        match tokio::time::timeout(within, self.0).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(FenceLost::Gap),
            Err(_) => Err(FenceLost::Late),
        }
    }
}

/// A complete pattern index granted to a bulk operation; void once the
/// index is rebuilt or dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease(u64);

/// The index went incomplete during a bulk operation: scan instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stale;

/// One pattern's state, for logs, tests and the benchmark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternStats {
    pub pattern: String,
    pub status: &'static str,
    pub keys: usize,
}

/// The index. See the module doc.
pub struct KeyIndex {
    state: Mutex<State>,
    /// Any pattern at all: the notification path's fast exit.
    active: AtomicBool,
    build: Notify,
    max_keys: usize,
    /// The daemon's fence channel, subscribed on the same connection as
    /// the notifications.
    fence_channel: String,
    /// Said that the index cannot be used (flags missing) since the last
    /// time it could.
    unusable_said: AtomicBool,
    /// Until when a bulk walk is taken to be scanning the keyspace
    /// ([`KeyIndex::walking`]).
    walk_until: Mutex<Option<Instant>>,
}

impl KeyIndex {
    pub fn new(max_keys: usize, fence_channel: String) -> KeyIndex {
        KeyIndex {
            state: Mutex::default(),
            active: AtomicBool::new(false),
            build: Notify::new(),
            max_keys,
            fence_channel,
            unusable_said: AtomicBool::new(false),
            walk_until: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A bulk walk just read a `SCAN` page of the whole keyspace: builds
    /// hold back for [`WALK_HOLD`] more. Two full scans side by side (a
    /// start sweep's and the build's) make Redis serve both at half speed,
    /// and the walk (a sweep that sets TTLs, a hook that deletes) is the
    /// one whose end someone waits for; the build's scan comes after it.
    pub fn walking(&self) {
        let until = Instant::now() + WALK_HOLD;
        *self.walk_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
    }

    /// How much longer builds hold back for a walk, if one is on.
    fn walk_hold(&self) -> Option<Duration> {
        let until = (*self.walk_until.lock().unwrap_or_else(|p| p.into_inner()))?;
        until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
    }

    /// Whether any pattern is indexed (then the subscription must carry
    /// every op).
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// The patterns to index from now on. Kept patterns keep their keys;
    /// new ones wait for a build; a pattern covered by another is left out.
    pub fn set_patterns(&self, patterns: &[String]) {
        let mut globs: Vec<Glob> = minimal(patterns);
        if globs.len() > MAX_PATTERNS {
            let skipped: Vec<String> = globs.drain(MAX_PATTERNS..).map(|g| g.to_string()).collect();
            warn!(
                patterns = %skipped.join(" "),
                "more than {MAX_PATTERNS} patterns to index: these are not (their bulk operations scan Redis)"
            );
        }
        let mut st = self.lock();
        let mut old = std::mem::take(&mut st.patterns);
        for glob in globs {
            match old.iter().position(|p| p.glob == glob) {
                Some(i) => st.patterns.push(old.swap_remove(i)),
                None => {
                    info!(pattern = %glob, "indexing the keys of this pattern");
                    st.patterns.push(Pattern::new(glob));
                }
            }
        }
        self.active.store(!st.patterns.is_empty(), Ordering::Relaxed);
        if st.covering && st.patterns.iter().any(|p| matches!(p.status, Status::Waiting)) {
            self.build.notify_one();
        }
    }

    /// A keyspace notification (called by the subscriber for every one,
    /// before it is routed to policies).
    pub fn observe(&self, op: &str, key: &[u8]) {
        let removal = REMOVALS.contains(&op);
        if !self.is_active() || !removal && op != NEW {
            return;
        }
        let mut st = self.lock();
        for p in st.patterns.iter_mut() {
            if matches!(p.status, Status::Dropped) || !p.matches(key) {
                continue;
            }
            if removal {
                p.keys.remove(key);
                if let Status::Building { tombstones, .. } = &mut p.status {
                    tombstones.insert(key.into());
                    if tombstones.len() > TOMBSTONES_MAX {
                        // Built again from the start, on the next wake-up.
                        p.status = Status::Waiting;
                        self.build.notify_one();
                    }
                }
                continue;
            }
            if let Status::Building { tombstones, .. } = &mut p.status {
                tombstones.remove(key);
            }
            add(p, key, self.max_keys);
        }
    }

    /// The subscription was lost (or never there): nothing is known
    /// complete any more. Keys are let go (Redis may have restarted empty).
    pub fn gap(&self) {
        let mut st = self.lock();
        st.covering = false;
        st.flags = None;
        st.epoch += 1;
        for p in st.patterns.iter_mut().filter(|p| !matches!(p.status, Status::Dropped)) {
            p.keys.clear();
            p.status = Status::Waiting;
        }
        // Waiting operations scan instead.
        st.fences.clear();
    }

    /// Whether builds may run (see [`KeyIndex::covered`]).
    pub fn is_covering(&self) -> bool {
        self.lock().covering
    }

    /// `true` the first time it is asked since the index was last usable:
    /// whether to log why it is not.
    pub fn first_unusable(&self) -> bool {
        !self.unusable_said.swap(true, Ordering::Relaxed)
    }

    /// The subscription carries every op from now on, and Redis sends them
    /// under the `notify-keyspace-events` value `flags` (as the subscriber
    /// found, by the value itself or by a probe): builds may start. Called
    /// again at every check that finds them sent, with the value then.
    pub fn covered(&self, flags: &str) {
        self.unusable_said.store(false, Ordering::Relaxed);
        let mut st = self.lock();
        st.covering = true;
        st.flags = Some(flags.to_owned());
        if st.patterns.iter().any(|p| matches!(p.status, Status::Waiting)) {
            self.build.notify_one();
        }
    }

    /// Whether `value`, the `notify-keyspace-events` read before a bulk
    /// operation, sends [`OPS`]: said by the value, or by the subscriber's
    /// last finding under the same value. A value that cannot say and that
    /// the subscriber has not seen is not taken for flags turned off: the
    /// operation scans, and the index stays until the subscriber decides.
    pub fn flags_say(&self, value: &str) -> FlagsSay {
        match Flags::parse(value).say(&FLAGS.chars().collect()) {
            Says::On => FlagsSay::Sent,
            Says::Off => FlagsSay::Off,
            Says::Unsure if self.lock().flags.as_deref() == Some(value) => FlagsSay::Sent,
            Says::Unsure => FlagsSay::Unconfirmed,
        }
    }

    /// The index serving `query`, if one is complete and covers it.
    /// (Coverage is decided outside the lock the subscriber needs.)
    pub fn serve(&self, query: &Glob) -> Option<Lease> {
        let complete: Vec<(Glob, u64)> = {
            let st = self.lock();
            st.patterns
                .iter()
                .filter_map(|p| match p.status {
                    Status::Complete { lease } => Some((p.glob.clone(), lease)),
                    _ => None,
                })
                .collect()
        };
        complete.into_iter().find(|(glob, _)| glob::covers(&[glob], query) == Coverage::Covered).map(|(_, l)| Lease(l))
    }

    /// Whether `lease` still holds.
    pub fn holds(&self, lease: Lease) -> bool {
        self.lock().patterns.iter().any(|p| matches!(p.status, Status::Complete { lease: l } if l == lease.0))
    }

    /// A fence published by `pipe` (added to it): it comes back once the
    /// subscription has read every notification Redis queued before it.
    pub fn fence(&self, pipe: &mut redis::Pipeline) -> Fence {
        let (payload, back) = self.new_fence();
        pipe.cmd("PUBLISH").arg(&self.fence_channel).arg(payload);
        Fence(back)
    }

    /// A fence to publish: its payload, and what fires when it comes back
    /// (dropped, never fired, if a gap comes first).
    fn new_fence(&self) -> (String, oneshot::Receiver<()>) {
        let mut st = self.lock();
        // Those whose operation stopped waiting (timed out).
        st.fences.retain(|(_, tx)| !tx.is_closed());
        let id = st.next_fence;
        st.next_fence += 1;
        let (tx, rx) = oneshot::channel();
        st.fences.push((id, tx));
        (format!("i{id}"), rx)
    }

    /// A message came back on the fence channel; `true` if it was one of
    /// ours. Fences are published in order of their ids, but by several
    /// operations at once, so each one only releases itself.
    pub fn fence_seen(&self, payload: &[u8]) -> bool {
        let Some(id) = payload.strip_prefix(b"i").and_then(|d| std::str::from_utf8(d).ok()?.parse::<u64>().ok()) else {
            return false;
        };
        let mut st = self.lock();
        if let Some(i) = st.fences.iter().position(|(f, _)| *f == id) {
            let (_, tx) = st.fences.swap_remove(i);
            let _ = tx.send(());
        }
        true
    }

    /// Up to `max` keys of the leased index matching `query` that `keep`
    /// accepts, after `after`; and where to go on from (`None`: done). Looks
    /// at a bounded number of names per call: the subscriber waits for the
    /// same lock.
    pub fn page(
        &self,
        lease: Lease,
        query: &Glob,
        after: Option<&[u8]>,
        max: usize,
        mut keep: impl FnMut(&[u8]) -> bool,
    ) -> Result<Page, Stale> {
        let st = self.lock();
        let p = st
            .patterns
            .iter()
            .find(|p| matches!(p.status, Status::Complete { lease: l } if l == lease.0))
            .ok_or(Stale)?;
        Ok(p.keys.page(&query.literal_prefix(), after, max, EXAMINE, |k| query.matches_bytes(k) && keep(k)))
    }

    /// What each pattern holds (cheap: no walk of the keys, so scrapes
    /// cannot hold the index's lock for long).
    pub fn stats(&self) -> Vec<PatternStats> {
        let st = self.lock();
        st.patterns
            .iter()
            .map(|p| PatternStats { pattern: p.glob.to_string(), status: p.status.name(), keys: p.keys.len() })
            .collect()
    }

    /// Start building every waiting pattern: the epoch and the `SCAN`
    /// pattern of the one pass that fills them.
    fn start_build(&self) -> Option<(u64, String)> {
        let mut st = self.lock();
        if !st.covering {
            return None;
        }
        let mut globs = Vec::new();
        for p in st.patterns.iter_mut().filter(|p| matches!(p.status, Status::Waiting)) {
            p.status = Status::Building { tombstones: HashSet::new(), since: Instant::now() };
            globs.push(p.glob.clone());
        }
        if globs.is_empty() {
            return None;
        }
        metrics().index_builds.inc();
        Some((st.epoch, scan_pattern_for(&globs.iter().collect::<Vec<_>>())))
    }

    /// A page of the build's scan; `false`: the scan may end (a gap voided
    /// it, or no pattern is building any more, every one dropped past the
    /// cap or sent back to wait: going on would walk the rest of the
    /// keyspace for nothing).
    fn add_scanned(&self, epoch: u64, keys: &[Vec<u8>]) -> bool {
        let mut st = self.lock();
        if st.epoch != epoch {
            return false;
        }
        for key in keys {
            for p in st.patterns.iter_mut() {
                if let Status::Building { tombstones, .. } = &p.status
                    && !tombstones.contains(key.as_slice())
                    && p.matches(key)
                {
                    add(p, key, self.max_keys);
                }
            }
        }
        st.patterns.iter().any(|p| matches!(p.status, Status::Building { .. }))
    }

    /// `visited` keys of `dbsize` scanned so far: drop every building
    /// pattern whose keys, at the rate found so far, would end well past
    /// the cap. `SCAN` visits the keyspace in an order unrelated to the
    /// names, so the part visited is a fair sample; without this, a
    /// pattern over the cap is held until it has `max_keys` names (5M by
    /// default: hundreds of MiB) before it is given up. `false`: no pattern
    /// is building any more.
    fn project(&self, epoch: u64, visited: u64, dbsize: u64) -> bool {
        let mut st = self.lock();
        if st.epoch != epoch {
            return false;
        }
        if visited >= (dbsize / PROJECT_AFTER_PART).max(PROJECT_AFTER) {
            let bound = self.max_keys as u64 * 6 / 5;
            for p in st.patterns.iter_mut().filter(|p| matches!(p.status, Status::Building { .. })) {
                let expected = (p.keys.len() as u128 * dbsize as u128 / visited as u128) as u64;
                if expected > bound {
                    p.drop_index(&format!(
                        "about {expected} keys expected, {} found in the first {visited} of {dbsize}: more than max_keys = {}; raise it in [index] to keep it",
                        p.keys.len(),
                        self.max_keys
                    ));
                }
            }
        }
        st.patterns.iter().any(|p| matches!(p.status, Status::Building { .. }))
    }

    /// The build's scan is over (`ok`) or failed: complete what it built,
    /// or let it wait for the next.
    fn end_build(&self, epoch: u64, ok: bool) {
        let mut st = self.lock();
        if st.epoch != epoch {
            return;
        }
        let mut next_lease = st.next_lease;
        for p in st.patterns.iter_mut() {
            let Status::Building { since, .. } = &p.status else { continue };
            if !ok {
                p.status = Status::Waiting;
                continue;
            }
            let bytes = p.keys.heap_bytes();
            info!(
                pattern = %p.glob,
                keys = p.keys.len(),
                bytes,
                bytes_per_key = bytes.checked_div(p.keys.len()).unwrap_or(0),
                took_ms = since.elapsed().as_millis() as u64,
                "key index complete: bulk operations on this pattern use it"
            );
            next_lease += 1;
            p.status = Status::Complete { lease: next_lease };
        }
        st.next_lease = next_lease;
    }

    /// Build waiting patterns whenever there are some and the subscription
    /// covers them, until `stop`. One `SCAN` pass fills every pattern
    /// waiting at its start; a failed pass is retried with backoff.
    pub async fn run_builder(
        self: Arc<Self>,
        mut conn: crate::store::target::Conn,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut failures = 0u32;
        let delay = std::env::var(BUILD_DELAY_ENV).ok().and_then(|ms| ms.parse().ok()).map(Duration::from_millis);
        if let Some(delay) = delay {
            warn!(
                delay_ms = delay.as_millis() as u64,
                "{BUILD_DELAY_ENV} is set: key index builds start late (a test fault)"
            );
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.build.notified() => {}
            }
            if let Some(delay) = delay {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            loop {
                let mut walks = WalkWait::default();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.wait_for_walks(&mut walks) => {}
                }
                let Some((epoch, pattern)) = self.start_build() else { break };
                let scanned = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = self.scan_into(&mut conn, epoch, &pattern, &mut walks) => r,
                };
                match scanned {
                    Ok(()) => {
                        failures = 0;
                        self.end_build(epoch, true);
                    }
                    Err(e) => {
                        self.end_build(epoch, false);
                        failures += 1;
                        let wait = Duration::from_millis(100 << failures.min(7));
                        warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot build the key index; bulk operations scan meanwhile");
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            }
        }
    }

    /// Hold back while a bulk walk scans ([`KeyIndex::walking`]), within
    /// what is left of the build's [`WALK_HOLD_MAX`].
    async fn wait_for_walks(&self, walks: &mut WalkWait) {
        while let Some(hold) = self.walk_hold() {
            let Some(left) = WALK_HOLD_MAX.checked_sub(walks.waited).filter(|d| !d.is_zero()) else {
                if !walks.gave_up {
                    walks.gave_up = true;
                    warn!(
                        waited_s = walks.waited.as_secs(),
                        "key index build goes on beside a walk that does not pause"
                    );
                }
                return;
            };
            if !walks.said {
                walks.said = true;
                info!("key index build waits for a walk");
            }
            let hold = hold.min(left);
            tokio::time::sleep(hold).await;
            walks.waited += hold;
        }
    }

    async fn scan_into(
        &self,
        conn: &mut crate::store::target::Conn,
        epoch: u64,
        pattern: &str,
        walks: &mut WalkWait,
    ) -> redis::RedisResult<()> {
        // The keyspace's size, once: what a pattern's share of the keys
        // visited so far projects to ([`KeyIndex::project`]).
        let dbsize: u64 = redis::cmd("DBSIZE").query_async(conn).await?;
        let (mut cursor, mut visited) = (0u64, 0u64);
        loop {
            self.wait_for_walks(walks).await;
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(crate::store::redis::SCAN_BATCH)
                .query_async(conn)
                .await?;
            // `COUNT` is about how many keys a page visits.
            visited += crate::store::redis::SCAN_BATCH as u64;
            if !self.add_scanned(epoch, &keys) || !self.project(epoch, visited, dbsize) {
                return Ok(());
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}

/// What one build has waited for walks ([`KeyIndex::wait_for_walks`]).
#[derive(Default)]
struct WalkWait {
    waited: Duration,
    /// Said that it waits; said that it stopped waiting.
    said: bool,
    gave_up: bool,
}

/// Add `key` to `p`, dropping `p`'s index past the cap.
fn add(p: &mut Pattern, key: &[u8], max_keys: usize) {
    match p.keys.insert(key) {
        Err(e) => p.drop_index(&e.to_string()),
        Ok(_) if p.keys.len() > max_keys => {
            p.drop_index(&format!("more than max_keys = {max_keys} keys; raise it in [index] to keep it"))
        }
        Ok(_) => {}
    }
}

/// `patterns` without duplicates and without those another one covers
/// (within [`COVERAGE_WORK`] for all checks: past it, patterns are kept
/// as they are, which only costs memory).
fn minimal(patterns: &[String]) -> Vec<Glob> {
    let mut globs: Vec<Glob> = Vec::new();
    for p in patterns {
        let g = Glob::new(p);
        if !globs.contains(&g) {
            globs.push(g);
        }
    }
    let mut work = COVERAGE_WORK;
    let mut covers = |by: &Glob, what: &Glob| glob::covers_within(&[by], what, &mut work) == Coverage::Covered;
    let mut keep = vec![true; globs.len()];
    for i in 0..globs.len() {
        keep[i] = !(0..globs.len()).any(|j| {
            j != i
                && covers(&globs[j], &globs[i])
                // Of two that cover each other, the first is kept.
                && (j < i || !covers(&globs[i], &globs[j]))
        });
    }
    globs.into_iter().zip(keep).filter_map(|(g, k)| k.then_some(g)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(patterns: &[&str]) -> KeyIndex {
        let index = KeyIndex::new(1000, "f".into());
        index.set_patterns(&patterns.iter().map(|p| p.to_string()).collect::<Vec<_>>());
        index
    }

    fn complete(index: &KeyIndex, scanned: &[&str]) {
        index.covered("KEA");
        let (epoch, _) = index.start_build().expect("a build starts");
        let keys: Vec<Vec<u8>> = scanned.iter().map(|k| k.as_bytes().to_vec()).collect();
        assert!(index.add_scanned(epoch, &keys));
        index.end_build(epoch, true);
    }

    fn all(index: &KeyIndex, query: &str) -> Result<Vec<String>, Stale> {
        let query = Glob::new(query);
        let lease = index.serve(&query).ok_or(Stale)?;
        let (keys, next) = index.page(lease, &query, None, usize::MAX, |_| true)?;
        assert!(next.is_none());
        Ok(keys.into_iter().map(|k| String::from_utf8(k).unwrap()).collect())
    }

    #[test]
    fn covered_patterns_are_kept_once() {
        let globs = minimal(&["a:*".into(), "a:*:b".into(), "b:*".into(), "a:*".into(), "c:[x]".into(), "c:x".into()]);
        let names: Vec<String> = globs.iter().map(|g| g.to_string()).collect();
        assert_eq!(names, ["a:*", "b:*", "c:[x]"]);
    }

    #[test]
    fn serves_only_complete_covering_indexes() {
        let index = index(&["sp:*"]);
        index.observe("new", b"sp:dance:1");
        assert_eq!(all(&index, "sp:dance:*"), Err(Stale), "not built yet");
        complete(&index, &["sp:dance:2", "sp:rock:1", "other:1"]);
        assert_eq!(all(&index, "sp:dance:*").unwrap(), ["sp:dance:1", "sp:dance:2"]);
        assert_eq!(all(&index, "sp*"), Err(Stale), "`sp*` is wider than `sp:*`");
        index.observe("del", b"sp:dance:1");
        index.observe("new", b"sp:dance:3");
        index.observe("new", b"sp:rock:2");
        index.observe("hset", b"sp:rock:3");
        // Other events are of keys that exist, whose creation was told:
        // nothing new (here, keys the index never heard of stay unheard).
        index.observe("expire", b"sp:dance:9");
        assert_eq!(all(&index, "sp:dance:*").unwrap(), ["sp:dance:2", "sp:dance:3"]);
        assert_eq!(all(&index, "sp:r?ck:*").unwrap(), ["sp:rock:1", "sp:rock:2"]);
        let lease = index.serve(&Glob::new("sp:*")).unwrap();
        index.gap();
        assert!(!index.holds(lease));
        assert_eq!(all(&index, "sp:*"), Err(Stale), "a gap voids the index until a new build");
        complete(&index, &["sp:x"]);
        assert_eq!(all(&index, "sp:*").unwrap(), ["sp:x"]);
    }

    #[test]
    fn a_removal_read_during_the_build_beats_the_scans_late_answer() {
        let index = index(&["k:*"]);
        index.covered("KEA");
        let (epoch, pattern) = index.start_build().unwrap();
        assert_eq!(pattern, "k:*");
        index.observe("expired", b"k:1");
        index.observe("new", b"k:2");
        index.observe("del", b"k:2");
        index.observe("new", b"k:2");
        index.add_scanned(epoch, &[b"k:1".to_vec(), b"k:2".to_vec(), b"k:3".to_vec()]);
        index.end_build(epoch, true);
        assert_eq!(all(&index, "k:*").unwrap(), ["k:2", "k:3"]);
    }

    #[test]
    fn a_gap_during_the_build_voids_it() {
        let index = index(&["k:*"]);
        index.covered("KEA");
        let (epoch, _) = index.start_build().unwrap();
        index.gap();
        assert!(!index.add_scanned(epoch, &[b"k:1".to_vec()]));
        index.end_build(epoch, true);
        assert_eq!(all(&index, "k:*"), Err(Stale));
        assert!(index.start_build().is_none(), "no build before the subscription covers again");
    }

    #[test]
    fn past_the_cap_the_pattern_is_dropped() {
        let index = KeyIndex::new(3, "f".into());
        index.set_patterns(&["k:*".into(), "j:*".into()]);
        complete(&index, &["k:1", "k:2", "j:1"]);
        index.observe("new", b"k:3");
        assert_eq!(all(&index, "k:*").unwrap().len(), 3);
        index.observe("new", b"k:4");
        assert_eq!(all(&index, "k:*"), Err(Stale));
        assert_eq!(all(&index, "j:*").unwrap(), ["j:1"], "other patterns keep theirs");
        let stats = index.stats();
        assert_eq!((stats[0].status, stats[0].keys), ("dropped", 0));
        index.gap();
        index.covered("KEA");
        assert_eq!(index.stats()[0].status, "dropped", "a dropped pattern stays dropped");
    }

    #[test]
    fn the_build_ends_once_no_pattern_is_building() {
        let index = KeyIndex::new(2, "f".into());
        index.set_patterns(&["k:*".into()]);
        index.covered("KEA");
        let (epoch, _) = index.start_build().unwrap();
        assert!(index.add_scanned(epoch, &[b"k:1".to_vec(), b"j:1".to_vec()]));
        assert!(!index.add_scanned(epoch, &[b"k:2".to_vec(), b"k:3".to_vec()]), "dropped: nothing left to build");
    }

    #[test]
    fn a_pattern_bound_past_the_cap_is_dropped_early() {
        let index = KeyIndex::new(1000, "f".into());
        index.set_patterns(&["k:*".into(), "j:*".into()]);
        index.covered("KEA");
        let (epoch, _) = index.start_build().unwrap();
        let page: Vec<Vec<u8>> = (0..100).map(|i| format!("k:{i}").into_bytes()).collect();
        assert!(index.add_scanned(epoch, &page));
        assert!(index.project(epoch, 100_000, 10_000_000), "too few visited to say: a fiftieth at least");
        assert_eq!(index.stats()[0].status, "building");
        // 100 `k:*` in the first 200k of 10M: about 5k expected.
        assert!(index.project(epoch, 200_000, 10_000_000), "`j:*` builds on");
        let stats = index.stats();
        assert_eq!((stats[0].status, stats[0].keys), ("dropped", 0));
        assert_eq!(stats[1].status, "building");
        // Within a fifth of the cap: kept (the projection is a sample's).
        let index = KeyIndex::new(1000, "f".into());
        index.set_patterns(&["k:*".into()]);
        index.covered("KEA");
        let (epoch, _) = index.start_build().unwrap();
        assert!(index.add_scanned(epoch, &page));
        assert!(index.project(epoch, 100_000, 1_100_000));
        assert_eq!(index.stats()[0].status, "building");
    }

    #[tokio::test]
    async fn builds_hold_back_while_a_walk_scans_but_not_for_ever() {
        let index = index(&["k:*"]);
        assert_eq!(index.walk_hold(), None, "no walk yet");
        index.walking();
        assert!(index.walk_hold().is_some_and(|d| d <= WALK_HOLD));
        let mut walks = WalkWait { waited: WALK_HOLD_MAX, ..WalkWait::default() };
        tokio::time::timeout(Duration::from_millis(500), index.wait_for_walks(&mut walks))
            .await
            .expect("a build that waited its fill goes on");
        assert!(walks.gave_up);
    }

    #[test]
    fn a_policy_cannot_make_the_index_match_without_end() {
        // Two hundred grants that do not cover each other (a hostile
        // manifest): only the first 64 are indexed.
        let patterns: Vec<String> = (0..200).map(|i| format!("p{i:03}:*")).collect();
        let index = KeyIndex::new(1000, "f".into());
        index.set_patterns(&patterns);
        assert_eq!(index.stats().len(), MAX_PATTERNS);
    }

    #[test]
    fn a_value_that_cannot_show_n_is_taken_from_the_subscribers_finding() {
        let index = index(&["k:*"]);
        assert_eq!(index.flags_say("g$xenKE"), FlagsSay::Sent);
        assert_eq!(index.flags_say("g$xeKE"), FlagsSay::Off);
        assert_eq!(index.flags_say("AKE"), FlagsSay::Unconfirmed, "`A` hides `n`");
        index.covered("AKE");
        assert_eq!(index.flags_say("AKE"), FlagsSay::Sent, "the subscriber found `new` sent under `AKE`");
        assert_eq!(index.flags_say("AK"), FlagsSay::Off, "no `E`, whatever was found");
        index.gap();
        assert_eq!(index.flags_say("AKE"), FlagsSay::Unconfirmed, "a gap voids the finding");
    }

    #[test]
    fn fences_release_their_own_waiter() {
        let index = index(&["k:*"]);
        let (a, mut rx_a) = index.new_fence();
        let (b, mut rx_b) = index.new_fence();
        assert!(index.fence_seen(b.as_bytes()));
        assert!(rx_b.try_recv().is_ok());
        assert!(rx_a.try_recv().is_err());
        assert!(!index.fence_seen(b"17"), "an echo fence is not ours");
        index.gap();
        assert!(matches!(rx_a.try_recv(), Err(oneshot::error::TryRecvError::Closed)), "a gap fails waiting fences");
        let _ = a;
    }
}
