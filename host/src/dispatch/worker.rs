//! One dispatcher per policy: takes its queue in order and shares the work
//! out to the policy's lanes.
//!
//! A policy runs as K lanes (`lanes` in the config), each an instance of
//! its own. A keyspace event goes to the lane its key hashes to, so the
//! events of one key are handled in the order they arrived while K calls
//! (and so K Redis round trips, pipelined on the shared connection) are in
//! flight. Deploy hooks and sweeps are barriers: the dispatcher stops
//! taking work, waits until every lane is idle, runs the barrier on lane 0,
//! and only then takes the next item; so a hook sees the effects of every
//! event queued before it, and no event queued after it runs alongside it.
//!
//! A new version of the policy arrives on the control channel and takes
//! over the same way: the events already taken finish on the old version,
//! every later one goes to the new, and the old instances are dropped
//! (their memory returns to the pool). Every event is handled once, by the
//! version live when it was taken off the queue.
//!
//! Before starting a call, the dispatcher asks the policy's circuit breaker
//! ([`crate::dispatch::breaker`]) and the operator's kill switch
//! ([`crate::dispatch::switches`]), both per policy whatever the lanes.
//! While either holds the policy back, events are not delivered: keyspace
//! events and sweeps are dropped and owed as one `sweep(gap)`, deploy hooks
//! fail (the deploy reader retries, then dead-letters them).

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::config::Mode;
use crate::dispatch::audit;
use crate::dispatch::breaker::{Admit, Breaker, FailurePolicy, Health};
use crate::dispatch::queue::{FailureKind, HookDone, HookFailure, Item, KeyNotification, PolicyQueue, SweepDone};
use crate::dispatch::switches::Switches;
use crate::metrics::{PolicyMetrics, SweepRecord, WalkProgress, metrics};
use crate::sandbox::runtime::{CallFailure, CallReport, LoadedPolicy};
use crate::store::walks::{WalkBook, WalkStore};
use crate::wit::{self, DeployEvent, KeyEvent, SweepEvent, SweepReason};

/// Failed sweeps in a row before it is an error (it is still retried).
const SWEEP_RETRIES: u32 = 3;

/// The longest wait between two attempts at a failing sweep.
const SWEEP_RETRY_MAX: Duration = Duration::from_secs(60);

/// Keyspace events taken off the queue but not started, per lane: enough
/// for a batch each when keys are unevenly spread, few enough that repeats
/// still coalesce in the queue.
const BACKLOG_PER_LANE: usize = 32;

/// The most keyspace events one call handles (`handle-keys`): a lane takes
/// what waits for it, up to this many, so a busy policy makes one call and
/// one pipelined round trip for many events, and an idle one gets each
/// event alone at once.
const MAX_BATCH: usize = 64;

/// Slices one sweep or hook may take (about a billion keys examined): a
/// walk past it is given up, with an error in the log, rather than keep
/// Redis scanning for ever.
const MAX_SLICES: u32 = 4_000;

/// How often a sweep or hook run in slices says how far it got.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// The walk book of a policy's sweeps ([`WalkStore`]): one per policy,
/// whatever the reason each slice is asked for.
const SWEEP_BOOK: &str = "sweep";

/// One instance of a policy version and its write path.
pub struct Lane {
    pub policy: LoadedPolicy,
    /// Tells this lane's echo layer the hop count of the event in hand.
    pub hops: Arc<AtomicU8>,
}

/// A policy version: its lanes and what its write path needs.
pub struct Version {
    /// At least one; lane 0 also takes deploy hooks and sweeps.
    pub lanes: Vec<Lane>,
    pub mode: Mode,
    /// What repeated failures do.
    pub failure: FailurePolicy,
    /// Which version of the policy this is (see
    /// [`crate::dispatch::queue::KeyNotification::generation`]).
    pub generation: u64,
}

impl Version {
    pub fn policy(&self) -> &LoadedPolicy {
        &self.lanes[0].policy
    }
}

/// Messages to a running worker.
pub enum Control {
    /// Replace the policy once the events already taken are handled.
    Swap(Version),
}

/// A call handed to a lane.
enum Work {
    /// Keyspace events, by when each arrived.
    Keys(Vec<Instant>),
    /// The sweep, and who waits for it to end.
    Sweep(SweepReason, Vec<SweepDone>),
    /// The hook is kept: a hook whose walks do not fit one call is called
    /// again with it until they are done.
    Deploy(DeployEvent, HookDone),
}

/// A call run as a slice of a longer one ([`crate::store::walks`]).
struct Slice {
    /// Its book in the [`WalkStore`].
    book: String,
    /// A new request for it came since the last slice.
    asked: bool,
    /// A hook: a slice that fails leaves no book behind (the hook is
    /// retried, or dead-lettered, from the start); a sweep's failed slice
    /// keeps its walks' positions for the retry.
    hook: bool,
}

/// What a call delivers.
enum Call {
    One(wit::Event),
    Keys(Vec<KeyEvent>),
}

/// A lane back from its call.
struct Finished {
    index: usize,
    lane: Lane,
    work: Work,
    report: CallReport,
    id: String,
    seq: u64,
    /// The breaker's reset count when the call started: an instance that
    /// was out while the breaker tripped is re-created on its return.
    resets: u64,
    /// The breaker's epoch when the call started.
    epoch: u64,
}

/// A loaded policy and everything its dispatcher needs.
pub struct Worker {
    name: Arc<str>,
    mode: Mode,
    generation: u64,
    /// `None` while the lane's call is in flight.
    lanes: Vec<Option<Lane>>,
    /// Keyspace events taken and waiting for their lane, per lane.
    backlog: Vec<VecDeque<(u64, KeyNotification)>>,
    buffered: usize,
    /// The calls in flight, one per busy lane: futures of this task rather
    /// than tasks of their own, so an event costs no thread wake-up to
    /// start or to finish.
    calls: FuturesUnordered<BoxFuture<'static, Finished>>,
    /// A hook or sweep taken, waiting for the lanes to be idle.
    barrier: Option<(u64, Item)>,
    barrier_running: bool,
    /// A new version, waiting for the lanes to be idle.
    next: Option<Version>,
    queue: Arc<PolicyQueue>,
    closed: bool,
    control: mpsc::UnboundedReceiver<Control>,
    breaker: Breaker,
    /// Times the breaker had the instances re-created.
    resets: u64,
    switches: Arc<Switches>,
    /// Events were dropped while the policy was held back: sweep it.
    owes_sweep: bool,
    /// Consecutive failed sweeps.
    sweep_failures: u32,
    /// Items taken so far: numbers the events in logs and audit lines.
    seq: u64,
    /// Key events' effects not yet in the audit trail.
    tally: audit::Tally,
    hasher: std::collections::hash_map::RandomState,
    metrics: Arc<PolicyMetrics>,
    /// Where the policy's sliced sweeps and hooks stand.
    walks: Arc<WalkStore>,
    /// When a sliced call last said how far it got.
    walk_logged: Option<Instant>,
}

impl Worker {
    /// A worker and the sender that controls it.
    pub fn new(
        version: Version,
        queue: Arc<PolicyQueue>,
        switches: Arc<Switches>,
        walks: Arc<WalkStore>,
    ) -> (Worker, mpsc::UnboundedSender<Control>) {
        let (tx, control) = mpsc::unbounded_channel();
        let name: Arc<str> = Arc::from(version.policy().name());
        let breaker = Breaker::new(&name, version.failure.clone());
        let name_for_metrics = name.clone();
        let mut worker = Worker {
            name,
            mode: version.mode,
            generation: version.generation,
            lanes: Vec::new(),
            backlog: Vec::new(),
            buffered: 0,
            calls: FuturesUnordered::new(),
            barrier: None,
            barrier_running: false,
            next: None,
            queue,
            closed: false,
            control,
            breaker,
            resets: 0,
            switches,
            owes_sweep: false,
            sweep_failures: 0,
            seq: 0,
            tally: audit::Tally::default(),
            hasher: Default::default(),
            metrics: metrics().policy(&name_for_metrics),
            walks,
            walk_logged: None,
        };
        worker.install(version);
        (worker, tx)
    }

    /// Take `version`'s lanes; only called with every lane idle.
    fn install(&mut self, version: Version) {
        debug_assert!(self.calls.is_empty() && self.buffered == 0);
        // What the old version did is logged under its own mode.
        self.tally.flush(&self.name, self.mode);
        // A new version starts with a clean record, under its own settings.
        self.breaker = Breaker::new(&self.name, version.failure.clone());
        self.metrics.set_health(health_name(Health::Healthy));
        self.mode = version.mode;
        self.generation = version.generation;
        self.lanes = version.lanes.into_iter().map(Some).collect();
        self.backlog = self.lanes.iter().map(|_| VecDeque::new()).collect();
    }

    /// Run until the queue is closed and every call taken has finished.
    pub async fn run(mut self) {
        loop {
            let cooling = match self.breaker.admit(Instant::now()) {
                Admit::Wait(until) => Some(tokio::time::Instant::from_std(until)),
                Admit::Deliver => None,
            };
            self.advance(cooling.is_some());
            if self.closed && self.calls.is_empty() {
                self.tally.flush(&self.name, self.mode);
                return;
            }
            let audit_due = self.tally.due().map(tokio::time::Instant::from_std);
            let taking = !self.closed
                && self.barrier.is_none()
                && !self.barrier_running
                && self.next.is_none()
                && self.buffered < BACKLOG_PER_LANE * self.lanes.len();
            tokio::select! {
                biased;
                Some(finished) = self.calls.next(), if !self.calls.is_empty() => self.finish(finished),
                Some(Control::Swap(next)) = self.control.recv(), if self.next.is_none() => {
                    self.next = Some(next);
                }
                _ = tokio::time::sleep_until(cooling.unwrap_or_else(tokio::time::Instant::now)), if cooling.is_some() => {
                    self.settle();
                }
                _ = tokio::time::sleep_until(audit_due.unwrap_or_else(tokio::time::Instant::now)), if audit_due.is_some() => {
                    self.tally.flush(&self.name, self.mode);
                }
                item = self.queue.pop(), if taking => match item {
                    Some(item) => self.take(item),
                    None => self.close(),
                },
                // Every branch off would be a state `advance` leaves behind
                // by mistake; a pause beats a panicking dispatcher.
                else => {
                    tracing::error!(policy = %self.name, "dispatcher found nothing to wait for; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// The queue is closed: what was taken and not started is dropped
    /// (a deploy hook's sender learns it was not handled).
    fn close(&mut self) {
        self.closed = true;
        self.barrier = None;
        self.next = None;
        self.backlog.iter_mut().for_each(VecDeque::clear);
        self.buffered = 0;
    }

    /// Take one item off the queue: a keyspace event joins its lane's
    /// backlog, a hook or sweep becomes the barrier.
    fn take(&mut self, item: Item) {
        self.seq += 1;
        match item {
            Item::Key(k) => {
                let lane = self.lane_of(&k.key);
                self.backlog[lane].push_back((self.seq, k));
                self.buffered += 1;
            }
            item => self.barrier = Some((self.seq, item)),
        }
    }

    fn lane_of(&self, key: &str) -> usize {
        if self.lanes.len() == 1 {
            return 0;
        }
        (self.hasher.hash_one(key) % self.lanes.len() as u64) as usize
    }

    /// Start whatever can start: each idle lane's next event; once every
    /// lane is idle, the waiting barrier, then the waiting version.
    fn advance(&mut self, cooling: bool) {
        // A sweep owed (events dropped while held back, a batch that
        // failed part-way) is queued as soon as the policy may have it,
        // not only when the next event comes.
        if self.owes_sweep && self.held(cooling).is_none() && !self.switches.standing_by() {
            self.settle();
        }
        for index in 0..self.lanes.len() {
            while self.lanes[index].is_some() && !self.backlog[index].is_empty() {
                self.start_keys(index, cooling);
            }
        }
        // With every lane idle: the barrier, then (if the barrier did not
        // start a call: the policy is held back) the new version.
        if !self.calls.is_empty() || self.buffered > 0 {
            return;
        }
        if let Some((seq, item)) = self.barrier.take() {
            self.start_barrier(seq, item, cooling);
            if !self.calls.is_empty() || self.buffered > 0 {
                return;
            }
        }
        if let Some(next) = self.next.take() {
            self.install(next);
        }
    }

    /// Why the policy is held back, if it is.
    fn held(&self, cooling: bool) -> Option<&'static str> {
        if cooling {
            Some("quarantined by its circuit breaker")
        } else if self.switches.is_disabled(&self.name) {
            Some("disabled by the operator")
        } else {
            None
        }
    }

    /// Start lane `index` on the events waiting for it: up to
    /// [`MAX_BATCH`] in one call, as long as they are as many hops deep as
    /// the first (the echo layer stamps the call's writes with one count).
    /// Takes at least one event off the backlog.
    fn start_keys(&mut self, index: usize, cooling: bool) {
        // Another replica took over: what is queued is its to handle (its
        // takeover sweep covers it); nothing is owed here.
        if self.switches.standing_by() {
            let dropped = self.backlog[index].len();
            self.buffered -= dropped;
            self.backlog[index].clear();
            tracing::debug!(policy = %self.name, dropped, "standing by: queued keyspace events left to the lease holder");
            return;
        }
        if self.held(cooling).is_some() {
            let dropped = self.backlog[index].len();
            self.buffered -= dropped;
            self.metrics.dropped.inc_by(dropped as u64);
            self.backlog[index].clear();
            self.owes_sweep = true;
            return;
        }
        let lane = self.lanes[index].as_ref().expect("an idle lane");
        let manifest = lane.policy.manifest();
        let (mut events, mut received, mut first, mut last, mut hops) = (Vec::new(), Vec::new(), 0, 0, None);
        while events.len() < MAX_BATCH
            && let Some((_, k)) = self.backlog[index].front()
            && hops.is_none_or(|h| h == k.hops)
        {
            let (seq, k) = self.backlog[index].pop_front().expect("checked");
            self.buffered -= 1;
            // Its shard was handed over (replicas splitting a cluster):
            // the new holder routes its events and swept it on taking it.
            if !self.switches.routes_node(k.shard) {
                tracing::debug!(policy = %self.name, key = %k.key, "its shard is another replica's now: left to it");
                continue;
            }
            // Routed under another version's subscriptions (queued across
            // a swap): only what this version subscribes to.
            if k.generation != self.generation && !manifest.wants_key_event(&k.op, k.key.as_bytes()) {
                tracing::debug!(policy = %self.name, op = %k.op, key = %k.key, "not for this version: its subscriptions changed");
                continue;
            }
            if hops.is_none() {
                (first, hops) = (seq, Some(k.hops));
            }
            last = seq;
            received.push(k.received);
            events.push(KeyEvent { db: k.db, op: k.op.to_string(), key: k.key.to_string() });
        }
        let Some(hops) = hops else { return };
        lane.hops.store(hops, Ordering::Relaxed);
        let id = if first == last { format!("key-{first}") } else { format!("keys-{first}-{last}") };
        self.metrics.delivered.inc_by(events.len() as u64);
        let work = Work::Keys(received);
        self.spawn(index, id, first, Call::Keys(events), work, None);
    }

    fn start_barrier(&mut self, seq: u64, item: Item, cooling: bool) {
        if self.switches.standing_by() && matches!(item, Item::Sweep(_) | Item::Key(_)) {
            tracing::debug!(policy = %self.name, "standing by: a sweep left to the lease holder");
            return;
        }
        if let Some(why) = self.held(cooling) {
            match item {
                Item::Key(_) | Item::Sweep(_) => self.owes_sweep = true,
                Item::Deploy(hook, done) => {
                    let _ = done.send(Err(HookFailure::failed(format!("not delivered: the policy is {why}"))));
                    tracing::info!(policy = %self.name, hook = %hook.id, "deploy hook not delivered: {why}");
                }
            }
            return;
        }
        let lane = self.lanes[0].as_ref().expect("every lane is idle");
        lane.hops.store(0, Ordering::Relaxed);
        let (id, event, work, slice) = match item {
            Item::Sweep(reason) => {
                self.owes_sweep = false;
                if reason == SweepReason::Gap {
                    let lost = self.queue.take_overload();
                    if lost.dropped > 0 {
                        tracing::warn!(
                            policy = %self.name,
                            dropped = lost.dropped,
                            coalesced = lost.coalesced,
                            "the policy fell behind: {} keyspace events dropped and {} coalesced since its last gap sweep; sweeping to reconcile",
                            lost.dropped,
                            lost.coalesced
                        );
                    }
                }
                let slice = Slice { book: SWEEP_BOOK.into(), asked: self.queue.take_sweeps_asked() > 0, hook: false };
                let waiters = self.queue.take_sweep_waiters();
                (format!("sweep-{seq}"), wit::Event::Sweep(SweepEvent { reason }), Work::Sweep(reason, waiters), slice)
            }
            Item::Deploy(hook, done) => {
                let slice = Slice { book: format!("hook:{}", hook.id), asked: false, hook: true };
                (hook.id.clone(), wit::Event::Deploy(hook.clone()), Work::Deploy(hook, done), slice)
            }
            Item::Key(k) => {
                // Keys never become barriers; handled as an event anyway.
                self.backlog[0].push_back((seq, k));
                self.buffered += 1;
                return;
            }
        };
        self.barrier_running = true;
        self.spawn(0, id, seq, Call::One(event), work, Some(slice));
    }

    /// Start one call on lane `index`; the lane comes back with its report.
    /// A `slice` runs as the next slice of its book: where its walks
    /// stopped is read before the call and kept after it.
    fn spawn(&mut self, index: usize, id: String, seq: u64, call: Call, work: Work, slice: Option<Slice>) {
        let mut lane = self.lanes[index].take().expect("an idle lane");
        let (resets, epoch) = (self.resets, self.breaker.epoch());
        let span = tracing::debug_span!("event", policy = %self.name, seq, lane = index);
        let (walks, name) = (self.walks.clone(), self.name.clone());
        let run = async move {
            let report = match (call, slice) {
                (Call::One(event), Some(slice)) => {
                    let loaded = walks.load(&name, &slice.book).await;
                    let kept = loaded.is_some();
                    let mut book = loaded.unwrap_or_default();
                    if book.slices == 0 {
                        book.started_ms = crate::store::walks::now_ms();
                    } else if slice.asked {
                        book.again = true;
                    }
                    let before = book.progress();
                    let mut report = lane.policy.handle_slice(&id, &event, book).await;
                    let failed = report.result.is_err();
                    // The keyspace's size is only for the progress of a call
                    // that takes more than one slice: asked once, when its
                    // first slice leaves walks unfinished, not on every
                    // sweep and hook.
                    if let Some(book) = report.call.walks.as_mut().filter(|b| b.slices == 1 && b.unfinished()) {
                        book.keyspace = walks.keyspace().await;
                    }
                    match &report.call.walks {
                        Some(book) if book.unfinished() && !failed && book.progress() == before => {
                            tracing::error!(policy = %name, call = %slice.book, "a slice moved no walk on: the walk is given up (the policy's bulk calls may depend on what changes between calls)");
                            report.call.walks = None;
                            walks.clear(&name, &slice.book).await;
                        }
                        Some(book) if book.unfinished() && book.slices >= MAX_SLICES => {
                            tracing::error!(policy = %name, call = %slice.book, slices = book.slices, "a walk still unfinished after the most slices one call may take: given up");
                            report.call.walks = None;
                            walks.clear(&name, &slice.book).await;
                        }
                        Some(book) if failed && slice.hook && (kept || book.slices > 1) => {
                            walks.clear(&name, &slice.book).await;
                        }
                        Some(_) if failed && slice.hook => {}
                        Some(book) if book.unfinished() || failed => walks.save(&name, &slice.book, book).await,
                        Some(_) if kept => walks.clear(&name, &slice.book).await,
                        _ => {}
                    }
                    report
                }
                (Call::One(event), None) => lane.policy.handle(&id, &event).await,
                (Call::Keys(events), _) => lane.policy.handle_keys(&id, events).await,
            };
            Finished { index, lane, work, report, id, seq, resets, epoch }
        };
        self.calls.push(Box::pin(run.instrument(span)));
    }

    /// A slice of `what` left walks unfinished (or, done, must walk again):
    /// show how far it got, in the log at most every [`PROGRESS_EVERY`].
    /// Returns whether another slice is due.
    fn walked(&mut self, what: String, book: Option<&WalkBook>, ok: bool) -> bool {
        let Some(book) = book else { return false };
        // Each walk may cover the whole keyspace: the whole call's size.
        let size = book.keyspace.saturating_mul(book.walks.len().max(1) as u64);
        let progress = WalkProgress::new(what, book.started_ms, book.slices, book.totals(), size);
        let more = ok && (book.unfinished() || book.again);
        if more {
            if self.walk_logged.is_none_or(|at| at.elapsed() >= PROGRESS_EVERY) {
                self.walk_logged = Some(Instant::now());
                tracing::info!(policy = %self.name, slices = book.slices, "walking in slices: {progress}");
            }
            self.metrics.walking(Some(progress));
        } else {
            if book.slices > 1 || self.walk_logged.is_some() {
                tracing::info!(
                    policy = %self.name,
                    slices = book.slices,
                    "{}: {progress}",
                    if ok { "walked to the end" } else { "stopped" },
                );
            }
            self.walk_logged = None;
            self.metrics.walking(None);
        }
        more
    }

    /// A lane is back: audit, breaker, and the work's own follow-up.
    fn finish(&mut self, done: Finished) {
        let Finished { index, mut lane, work, report, id, seq, resets, epoch } = done;
        match &work {
            Work::Keys(received) => self.tally.add(&self.name, &id, received.len(), self.mode, &report),
            _ => audit::record(&self.name, &id, self.mode, &report),
        }
        let (kind, budget) = result_kind(&report);
        self.metrics.call(kind, budget, report.call.denials_total);
        // In dry-run nothing was deleted or expired.
        if self.mode == Mode::Enforce {
            self.metrics.bulk("deleted", report.call.effects.bulk_deleted);
            self.metrics.bulk("expired", report.call.effects.bulk_expired);
        }
        self.metrics.bulk("examined", report.call.keys_examined);
        let result = classify(&report);
        if epoch == self.breaker.epoch() && self.breaker.record(result.is_ok(), Instant::now()) {
            self.resets += 1;
            self.lanes.iter_mut().flatten().for_each(|l| l.policy.reset_instance());
        }
        self.metrics.set_health(health_name(self.breaker.health()));
        // A batch cut short (a trap, a budget, its queued writes lost) left
        // later events unhandled: a sweep reconciles them. (An error the
        // policy returned for one event did not stop the others.)
        if matches!(&work, Work::Keys(received) if received.len() > 1)
            && report.result.as_ref().is_err_and(|f| !matches!(f, CallFailure::Returned(_)))
        {
            self.owes_sweep = true;
        }
        if resets != self.resets {
            lane.policy.reset_instance();
        }
        self.lanes[index] = Some(lane);
        match work {
            Work::Keys(received) => {
                let now = Instant::now();
                self.metrics.handled(received.iter().map(|r| now.saturating_duration_since(*r)));
            }
            Work::Deploy(hook, done) => {
                self.barrier_running = false;
                // Its walks go on at once, the hook held until they are done:
                // its size alone never fails it.
                if self.walked(format!("hook {}", hook.id), report.call.walks.as_ref(), result.is_ok()) {
                    self.barrier = Some((seq, Item::Deploy(hook, done)));
                    return;
                }
                let _ = done.send(result);
            }
            Work::Sweep(reason, waiters) => {
                self.barrier_running = false;
                let name = wit::sweep_reason_name(reason);
                // The next slice goes behind the events queued meanwhile.
                if self.walked(format!("sweep({name})"), report.call.walks.as_ref(), result.is_ok()) {
                    self.queue.keep_sweep_waiters(waiters);
                    let _ = self.queue.push_slice(reason);
                    return;
                }
                for waiter in waiters {
                    let _ = waiter.send(result.is_ok());
                }
                let effects = &report.call.effects;
                let (examined, slices) = match &report.call.walks {
                    Some(book) => (book.totals().0, book.slices),
                    None => (report.call.keys_examined, 1),
                };
                self.metrics.swept(SweepRecord {
                    reason: name.to_owned(),
                    at_ms: 0,
                    ok: result.is_ok(),
                    error: result.as_ref().err().map(|e| e.reason.clone()),
                    deleted: effects.deleted,
                    expired: effects.expired,
                    examined,
                    slices,
                });
                self.sweep_done(reason, result.is_ok());
            }
        }
    }

    /// A sweep is how missed events get reconciled: losing one to a passing
    /// failure (Redis restarting) would leave the cache wrong until the
    /// next, so a failed one is tried again, later and later, and one that
    /// keeps failing is an error in the log.
    fn sweep_done(&mut self, reason: SweepReason, ok: bool) {
        if ok {
            if self.sweep_failures >= SWEEP_RETRIES {
                tracing::info!(policy = %self.name, attempts = self.sweep_failures + 1, "sweep succeeded again");
            }
            self.sweep_failures = 0;
            return;
        }
        self.sweep_failures += 1;
        let failures = self.sweep_failures;
        let delay = Duration::from_millis(500u64 << failures.min(10)).min(SWEEP_RETRY_MAX);
        if failures >= SWEEP_RETRIES && (failures - SWEEP_RETRIES).is_multiple_of(10) {
            tracing::error!(
                policy = %self.name,
                failures,
                delay_ms = delay.as_millis() as u64,
                "sweep({}) failed {failures} times in a row: what it reconciles stays wrong until one succeeds; trying again",
                wit::sweep_reason_name(reason)
            );
        } else {
            tracing::info!(policy = %self.name, delay_ms = delay.as_millis() as u64, "sweep failed; trying again later");
        }
        let queue = self.queue.clone();
        // The same sweep again (its walks go on where they stopped), not
        // a new request.
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = queue.push_slice(reason);
        });
    }

    /// Queue the sweep owed for events dropped while held back.
    fn settle(&mut self) {
        if std::mem::take(&mut self.owes_sweep) {
            let _ = self.queue.push(Item::Sweep(SweepReason::Gap));
        }
    }
}

/// The `kind` label of a call's result in `cachepol_calls_total`, and the
/// budget it ran out of, if any (a policy that hit a host-side budget and
/// then panicked still tripped it).
fn result_kind(report: &CallReport) -> (&'static str, Option<&'static str>) {
    let (kind, budget) = match &report.result {
        Ok(_) => ("ok", None),
        Err(CallFailure::Returned(wit::Error::Denied(_))) => ("denied", None),
        Err(CallFailure::Returned(_)) => ("error", None),
        Err(CallFailure::Budget(_)) => ("budget", None),
        Err(CallFailure::OutOfFuel(_)) => ("fuel", Some("fuel")),
        Err(CallFailure::Memory { .. }) => ("memory", Some("memory")),
        Err(CallFailure::Timeout(_)) => ("timeout", Some("wall_time")),
        Err(CallFailure::Panic(_)) => ("panic", None),
        Err(CallFailure::Trap(_)) => ("trap", None),
        Err(CallFailure::Queued(_)) => ("queued", None),
        Err(CallFailure::Restart(_)) => ("restart", None),
    };
    (kind, report.call.budget_kind.or(budget))
}

fn health_name(health: Health) -> &'static str {
    match health {
        Health::Healthy => "healthy",
        Health::Degraded => "degraded",
        Health::Tripped => "tripped",
    }
}

/// What a call's report means for its caller (and its retries).
fn classify(report: &CallReport) -> Result<(), HookFailure> {
    let Err(failure) = &report.result else { return Ok(()) };
    // Redis going away explains a failure before anything else does; a
    // denial the policy returned will be met the same way next time.
    let kind = if report.call.redis_unavailable > 0 {
        FailureKind::RedisUnavailable
    } else if matches!(failure, CallFailure::Returned(wit::Error::Denied(_))) {
        FailureKind::Denied
    } else {
        FailureKind::Failed
    };
    Err(HookFailure { reason: failure.to_string(), kind })
}
