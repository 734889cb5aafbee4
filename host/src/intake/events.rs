//! Keyspace notifications from Redis into the policies' queues.
//!
//! One dedicated subscription connection subscribes to the
//! `__keyevent@<db>__:<op>` channels of the ops the loaded policies listen
//! to, and re-subscribes when that set changes: Redis sends nothing the
//! policies would not be given (ttl-table's own `EXPIRE`s cause `expire`
//! events nobody wants, as many as the writes it handles). A policy that
//! listens to every op turns this into `PSUBSCRIBE __keyevent@<db>__:*`.
//! The key index ([`crate::store::index`]) adds its own: `new` (a key
//! created) and the removals.
//! Keyevent channels rather than keyspace channels: the event name is the
//! (ASCII) channel suffix and the key is the payload, so keys are taken
//! binary-safe as they are, with no parsing of key bytes out of a channel
//! name.
//!
//! The connection speaks RESP3, and each notification is routed right in
//! the connection's reader as it is parsed (redis-rs's push sender), with no
//! buffer in between: it is parsed, the echo ledger says who caused it, and
//! it is pushed into bounded queues, which never waits. So the socket is
//! drained as fast as routing goes, and if Redis still outpaces that, the
//! backlog waits in Redis's output buffer for this client, not in our
//! memory: past its limit Redis closes the connection, and the reconnect
//! sweep below reconciles. (redis-rs's RESP2 pub/sub would queue messages
//! without bound instead.) Notifications are fire-and-forget, so every (re)connect is
//! treated as a gap: after the subscription is back, every policy gets
//! `sweep(reconnect)` (`sweep(start)` the first time) to reconcile what it
//! missed. Reconnects back off exponentially with jitter and are logged once
//! per change of state, not once per retry.
//!
//! The node's `notify-keyspace-events` is checked on this connection after
//! each subscription, at every ping and when the policies change
//! ([`notify`]): what the policies and the key index need, probed where the
//! value cannot show it (`A` hides `n`). A flag found off after it was
//! found sent is a real gap (a sweep for the policies, a rebuild for the
//! index); a value printed differently is not.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::aio::{AsyncPushSender, MultiplexedConnection};
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::IndexConfig;
use crate::dispatch::routes::Routes;
use crate::dispatch::switches::Switches;
use crate::intake::cluster::Nodes;
use crate::intake::notify::{self, Checked, Probe};
use crate::metrics::metrics;
use crate::sandbox::manifest::Manifest;
use crate::store::announce::Remote;
use crate::store::echo::EchoLedger;
use crate::store::index::{self, KeyIndex};
use crate::wit::SweepReason;

/// Fault injection for tests: with this set (milliseconds), the reader
/// stalls that long before routing each keyspace event of a key not the
/// daemon's own, as a subscriber far behind Redis would. (The lease's
/// renewals and the daemons' roll call notify every few seconds: stalled
/// too, they alone would keep the reader behind for ever.) Never set in
/// production.
const LAG_ENV: &str = "CACHEPOL_FAULT_SUBSCRIBER_LAG_MS";

/// How often the subscription connection is pinged to notice a dead peer.
const PING_EVERY: Duration = Duration::from_secs(5);

/// Everything the subscriber needs.
#[derive(Clone)]
pub struct Subscriber {
    /// The node subscribed to ([`crate::intake::cluster`] sets it per
    /// primary on a cluster).
    pub client: redis::Client,
    /// Its `host:port` on a cluster, for logs and `/status` (empty on a
    /// single server).
    pub node: String,
    /// Every subscription's state (readiness is all of them).
    pub nodes: Arc<Nodes>,
    /// Where the other replicas splitting a cluster announce their writes
    /// ([`crate::store::announce`]), and this daemon's id among them.
    pub announcements: Option<(String, String)>,
    /// The slots the node serves (a cluster's primary; empty otherwise).
    pub slots: Vec<(u16, u16)>,
    /// The sweep after the first subscription: `start` for the daemon's
    /// own start, `reconnect` for a primary that appeared later, none for
    /// the primaries of a cluster at start (one sweep covers them all,
    /// once all are subscribed).
    pub first_sweep: Option<SweepReason>,
    pub db: u32,
    pub routes: Arc<ArcSwap<Routes>>,
    pub ledger: Arc<EchoLedger>,
    pub hop_limit: u8,
    /// Set missing `notify-keyspace-events` flags, which are re-checked
    /// after every reconnect (a restarted Redis forgets a `CONFIG SET`) and
    /// whenever the set of policies changes (a reloaded policy may need
    /// more).
    pub configure_notifications: bool,
    /// Changes whenever the routes are republished.
    pub changes: tokio::sync::watch::Receiver<u64>,
    /// Where the echo ledger's and the key index's fences come back
    /// ([`crate::store::echo`], [`crate::store::index`]): subscribed on the
    /// same connection, so they arrive in order with the notifications.
    pub fence_channel: String,
    /// Fed every notification before it is routed; while it indexes any
    /// pattern, the subscription carries its events (`new` and removals).
    pub index: Arc<KeyIndex>,
    pub index_config: IndexConfig,
    /// Whether this daemon routes keyspace events to its policies now (the
    /// replicas' lease, [`crate::dispatch::lease`]); a standby still keeps
    /// its key index.
    pub switches: Arc<Switches>,
}

/// Exponential backoff with jitter: 100 ms doubling to 10 s, each wait
/// randomised by ±25% so that many daemons do not reconnect in lockstep.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);

    pub fn new() -> Backoff {
        Backoff::with_max(Self::MAX)
    }

    /// Doubling up to `max` instead of 10 s: for waits whose end someone
    /// is waiting on (a deploy hook pending while Redis restarts).
    pub fn with_max(max: Duration) -> Backoff {
        Backoff { next: Self::FIRST, max }
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    /// The next wait.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(rand::random_range(0.75..1.25))
    }
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::new()
    }
}

/// The keyevent channels a set of policies needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Channels {
    /// These ops' channels.
    Ops(BTreeSet<String>),
    /// Every op (a policy listens to all of them): one pattern.
    #[default]
    All,
}

impl Channels {
    /// What the loaded policies listen to, and the key index's events
    /// while it is kept.
    pub fn needed(routes: &Routes, indexing: bool) -> Channels {
        let mut ops: BTreeSet<String> = BTreeSet::new();
        if indexing {
            ops.extend(index::OPS.iter().map(|op| op.to_string()));
        }
        for manifest in routes.manifests() {
            for subscription in &manifest.key_subscriptions {
                if subscription.ops.is_empty() {
                    return Channels::All;
                }
                ops.extend(subscription.ops.iter().cloned());
            }
        }
        Channels::Ops(ops)
    }

    /// What the echo ledger records while these channels are subscribed
    /// (`None`: every op): writes whose notifications can arrive *and* may
    /// be delivered to a policy. The key index adds channels (`del`, say)
    /// whose notifications of a write no policy listens to would only be
    /// recorded to be thrown away.
    fn recorded(&self, routes: &Routes) -> Option<BTreeSet<String>> {
        match (self, Channels::needed(routes, false)) {
            (Channels::All, Channels::All) => None,
            (Channels::All, Channels::Ops(heard)) => Some(heard),
            (Channels::Ops(ops), Channels::All) => Some(ops.clone()),
            (Channels::Ops(ops), Channels::Ops(heard)) => Some(ops.intersection(&heard).cloned().collect()),
        }
    }

    /// Whether the key index's events arrive on these channels.
    fn carry_index(&self) -> bool {
        match self {
            Channels::All => true,
            Channels::Ops(ops) => index::OPS.iter().all(|op| ops.contains(*op)),
        }
    }

    /// Both sets of channels at once.
    fn union(&self, other: &Channels) -> Channels {
        match (self, other) {
            (Channels::Ops(a), Channels::Ops(b)) => Channels::Ops(a.union(b).cloned().collect()),
            _ => Channels::All,
        }
    }

    fn names(&self, db: u32) -> Vec<String> {
        match self {
            Channels::All => vec![format!("__keyevent@{db}__:*")],
            Channels::Ops(ops) => ops.iter().map(|op| format!("__keyevent@{db}__:{op}")).collect(),
        }
    }

    /// Whether `manifest` listens to an op these channels do not carry.
    fn miss_any(&self, manifest: &Manifest) -> bool {
        let Channels::Ops(ops) = self else { return false };
        manifest.key_subscriptions.iter().any(|s| s.ops.is_empty() || s.ops.iter().any(|op| !ops.contains(op)))
    }
}

impl std::fmt::Display for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Channels::All => f.write_str("every op"),
            Channels::Ops(ops) if ops.is_empty() => f.write_str("no op"),
            Channels::Ops(ops) => f.write_str(&ops.iter().map(String::as_str).collect::<Vec<_>>().join(" ")),
        }
    }
}

/// The patterns the key index keeps for these policies (see
/// [`crate::store::index`] for why these).
pub fn index_patterns(routes: &Routes, config: &IndexConfig) -> Vec<String> {
    if !config.enabled {
        return Vec::new();
    }
    let mut patterns: Vec<String> = config.patterns.clone();
    for manifest in routes.manifests() {
        patterns.extend(manifest.bulk_patterns().map(|g| g.to_string()));
    }
    patterns
}

/// Parse a keyevent channel name: `__keyevent@<db>__:<op>` -> (db, op).
pub fn parse_channel(channel: &str) -> Option<(u32, &str)> {
    let rest = channel.strip_prefix("__keyevent@")?;
    let (db, op) = rest.split_once("__:")?;
    let db = db.parse().ok()?;
    (!op.is_empty()).then_some((db, op))
}

impl Subscriber {
    /// Run until `shutdown`. `ready` fires after the first subscription.
    pub async fn run(mut self, shutdown: CancellationToken, ready: tokio::sync::oneshot::Sender<()>) {
        let mut ready = Some(ready);
        let mut first = true;
        let mut backoff = Backoff::new();
        let mut down_since_logged = false;
        loop {
            // Read before subscribing: a change after this is acted on by
            // `watch`, whose receiver has not marked it seen.
            let channels = self.follow_policies();
            let subscribed = tokio::select! {
                _ = shutdown.cancelled() => return,
                s = self.subscribe(&channels) => s,
            };
            let (mut conn, link, _listening, probe) = match subscribed {
                Ok(subscribed) => subscribed,
                Err(e) => {
                    metrics().redis_errors.inc();
                    if !down_since_logged {
                        warn!(error = %e, "keyspace subscription unavailable; retrying with backoff");
                        down_since_logged = true;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next_delay()) => continue,
                    }
                }
            };
            backoff.reset();
            let reason = if first { self.first_sweep } else { Some(SweepReason::Reconnect) };
            first = false;
            let m = metrics();
            if reason == Some(SweepReason::Reconnect) {
                m.reconnects.inc();
                m.gaps.inc();
                info!(ops = %channels, node = %self.node, "keyspace subscription restored; sweeping every policy to reconcile");
            } else {
                info!(ops = %channels, node = %self.node, "subscribed to keyspace notifications");
            }
            down_since_logged = false;
            self.check_flags(&mut conn, &channels, &probe, true).await;
            // A standby sweeps when it takes the lease instead.
            if let Some(reason) = reason.filter(|_| self.switches.routes_node(self.shard())) {
                self.routes.load().sweep_all(reason);
            }
            // Subscribed before ready: the lease is taken only by a daemon
            // subscribed, right after it is ready.
            self.nodes.update(&self.node, |s| s.subscribed = true);
            if let Some(tx) = ready.take() {
                let _ = tx.send(());
            }
            let stopped = self.watch(conn, channels, &link, &probe, &shutdown).await;
            if stopped {
                return;
            }
            self.nodes.update(&self.node, |s| s.subscribed = false);
            self.index.gap();
            self.nodes.lost.notify_one();
            warn!(node = %self.node, "keyspace subscription lost; reconnecting (notifications meanwhile are reconciled by a sweep)");
        }
    }

    /// Connect and subscribe. Returns the connection (for pings and flag
    /// checks), what fires when it closes, its place among the echo
    /// ledger's fence readers (given up when dropped, however this
    /// subscription ends: cancelled half-way, or lost), and its probe of the
    /// node's notification flags (whose findings hold for this connection
    /// only).
    async fn subscribe(
        &self,
        channels: &Channels,
    ) -> Result<(MultiplexedConnection, Arc<Link>, FenceListener, Arc<Probe>), String> {
        let info = self.client.get_connection_info().clone();
        let resp3 = info.clone().set_redis_settings(info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3));
        let client = redis::Client::open(resp3).map_err(|e| e.to_string())?;
        let listening = FenceListener::new(self.ledger.clone());
        let link = Arc::new(Link::new(listening.id));
        let probe = Arc::new(Probe::new(&self.fence_channel, &self.slots));
        let lag = std::env::var(LAG_ENV).ok().and_then(|ms| ms.parse().ok()).map(Duration::from_millis);
        if let Some(lag) = lag {
            warn!(
                lag_ms = lag.as_millis() as u64,
                "{LAG_ENV} is set: every keyspace event is routed late (a test fault)"
            );
        }
        let router = Router {
            keyevent_pattern: Channels::All.names(self.db).remove(0),
            pattern_on: AtomicBool::new(false),
            lag,
            fence_channel: self.fence_channel.clone(),
            routes: self.routes.clone(),
            ledger: self.ledger.clone(),
            index: self.index.clone(),
            probe: probe.clone(),
            switches: self.switches.clone(),
            shard: self.shard(),
            announcements: self.announcements.as_ref().map(|(channel, me)| {
                let remote = Arc::new(Remote::new(self.ledger.clone(), me.clone(), self.slots.clone()));
                Remote::reap(&remote);
                (channel.clone(), remote)
            }),
            hop_limit: self.hop_limit,
            link: link.clone(),
            skipped: AtomicU64::new(0),
            undeliverable: AtomicU64::new(0),
        };
        // A reply (to a SUBSCRIBE as the policies change, say) may wait
        // behind a backlog of notifications: a busy link, not a dead one
        // (redis-rs gives up after 500 ms by default).
        let config = AsyncConnectionConfig::new().set_push_sender(router).set_response_timeout(Some(PING_EVERY));
        let mut conn = client.get_multiplexed_async_connection_with_config(&config).await.map_err(|e| e.to_string())?;
        conn.subscribe(&self.fence_channel).await.map_err(|e| e.to_string())?;
        if let Some((channel, _)) = &self.announcements {
            conn.subscribe(channel).await.map_err(|e| e.to_string())?;
        }
        self.ledger.listen(channels.recorded(&self.routes.load()));
        self.listen(&mut conn, channels, true).await.map_err(|e| e.to_string())?;
        Ok((conn, link, listening, probe))
    }

    /// The cluster shard the node serves, by first slot: its lease decides
    /// whether this node's events are this daemon's to route, when replicas
    /// split a cluster.
    fn shard(&self) -> Option<u16> {
        self.slots.first().map(|(start, _)| *start)
    }

    /// Subscribe to `channels` (`on`) or unsubscribe from them.
    async fn listen(&self, conn: &mut MultiplexedConnection, channels: &Channels, on: bool) -> redis::RedisResult<()> {
        let names = channels.names(self.db);
        match (channels, on) {
            (_, _) if names.is_empty() => Ok(()),
            (Channels::All, true) => conn.psubscribe(names).await,
            (Channels::All, false) => conn.punsubscribe(names).await,
            (Channels::Ops(_), true) => conn.subscribe(names).await,
            (Channels::Ops(_), false) => conn.unsubscribe(names).await,
        }
    }

    /// The policies changed: hear what they now listen to. Ops newly heard
    /// may have been written before the subscription took: the policies
    /// listening to them sweep (the one a reload queues may have run
    /// before it).
    async fn resubscribe(&self, conn: &mut MultiplexedConnection, current: &mut Channels) -> redis::RedisResult<()> {
        let routes = self.routes.load();
        let wanted = self.follow_policies();
        if wanted == *current {
            self.ledger.listen(wanted.recorded(&routes));
            return Ok(());
        }
        // Writes are recorded for the echo ledger before their notifications
        // can arrive, and while the old ones still can.
        self.ledger.listen(wanted.union(current).recorded(&routes));
        match (&wanted, &*current) {
            (Channels::Ops(now), Channels::Ops(then)) => {
                let add = Channels::Ops(now.difference(then).cloned().collect());
                let remove = Channels::Ops(then.difference(now).cloned().collect());
                self.listen(conn, &add, true).await?;
                self.listen(conn, &remove, false).await?;
            }
            _ => {
                self.listen(conn, &wanted, true).await?;
                self.listen(conn, current, false).await?;
            }
        }
        self.ledger.listen(wanted.recorded(&routes));
        info!(ops = %wanted, "keyspace subscription follows the loaded policies");
        for route in routes.routes().iter().filter(|r| current.miss_any(&r.manifest)) {
            let _ = route.queue.push(crate::dispatch::queue::Item::Sweep(SweepReason::Reload));
        }
        *current = wanted;
        Ok(())
    }

    /// Give the key index the patterns of the loaded policies; the channels
    /// they need then. While the subscription may not carry the index's
    /// events, the index is not known complete (nothing is built before).
    fn follow_policies(&self) -> Channels {
        let routes = self.routes.load();
        let patterns = index_patterns(&routes, &self.index_config);
        let wanted = Channels::needed(&routes, !patterns.is_empty());
        if !wanted.carry_index() && self.index.is_covering() {
            self.index.gap();
        }
        self.index.set_patterns(&patterns);
        wanted
    }

    /// Check the node's `notify-keyspace-events` for what the policies and,
    /// while `channels` carry its events, the key index need (probing where
    /// the value cannot say), set what is off if allowed, and act on what
    /// changed. A flag found off that the check before found sent was
    /// turned off meanwhile: a real gap (notifications were lost), whatever
    /// is set back. How a value is printed is never one. `first`: the check
    /// right after subscribing, whose sweep follows anyway. Logged only on
    /// changes; a check without an answer (a backlog, Redis going away)
    /// changes nothing, and the next ping asks again.
    async fn check_flags(&self, conn: &mut MultiplexedConnection, channels: &Channels, probe: &Probe, first: bool) {
        let policies = notify::required(&self.routes.load().manifests());
        let indexing = self.index.is_active() && channels.carry_index();
        let index = if indexing { notify::for_index() } else { BTreeSet::new() };
        let needed: BTreeSet<char> = policies.union(&index).copied().collect();
        let ensured = notify::ensure(conn, &needed, self.configure_notifications, Some(probe));
        let checked = match tokio::time::timeout(2 * PING_EVERY, ensured).await {
            Ok(Ok(checked)) => checked,
            Ok(Err(e)) if first => {
                tracing::error!(error = %e, node = %self.node, "keyspace notifications are incomplete");
                self.nodes.update(&self.node, |s| s.notifications = false);
                metrics().gaps.inc();
                return;
            }
            Ok(Err(e)) => return tracing::debug!(error = %e, node = %self.node, "cannot check the notification flags"),
            Err(_) => return,
        };
        let sent_before = probe.swap_sent(needed.difference(&checked.missing).copied().collect());
        let lost: BTreeSet<char> = sent_before.intersection(&checked.off).copied().collect();
        let added = checked.added();
        if !added.is_empty() {
            info!(added = %notify::text(&added), node = %self.node, "enabled keyspace notification flags");
        }
        self.nodes.update(&self.node, |s| s.flags = Some(checked.state(&policies, &index)));
        self.follow_policy_flags(&checked, &policies, &lost, first);
        if indexing {
            self.follow_index_flags(&checked, &index, &lost);
        }
    }

    /// The policies' flags as `checked` found them: missing, the daemon is
    /// not ready and owes a gap; back (or turned off and set back), every
    /// policy is swept for what it missed.
    fn follow_policy_flags(&self, checked: &Checked, policies: &BTreeSet<char>, lost: &BTreeSet<char>, first: bool) {
        let was = self.nodes.notifications(&self.node);
        let lost: BTreeSet<char> = lost.intersection(policies).copied().collect();
        if !lost.is_empty() {
            metrics().gaps.inc();
            warn!(flags = %notify::text(&lost), value = %checked.read, node = %self.node, "notify-keyspace-events stopped sending what the policies need: their events meanwhile are lost");
        }
        if let Err(e) = checked.require(policies) {
            if was || first {
                tracing::error!(error = %e, node = %self.node, "keyspace notifications are incomplete");
                if lost.is_empty() {
                    metrics().gaps.inc();
                }
            }
            self.nodes.update(&self.node, |s| s.notifications = false);
            return;
        }
        if !first && (!was || !lost.is_empty()) {
            info!(node = %self.node, "keyspace notification flags complete again; sweeping every policy for what it missed");
            if self.switches.routes_node(self.shard()) {
                self.routes.load().sweep_all(SweepReason::Gap);
            }
        }
        self.nodes.update(&self.node, |s| s.notifications = true);
    }

    /// The key index's flags as `checked` found them: sent, the index may
    /// build (or goes on); turned off, it is no longer known complete and is
    /// rebuilt once they are back; missing, it stays unused, said once.
    fn follow_index_flags(&self, checked: &Checked, index: &BTreeSet<char>, lost: &BTreeSet<char>) {
        let missing = checked.missing_of(index);
        if self.index.is_covering() && (!lost.is_disjoint(index) || !missing.is_empty()) {
            warn!(value = %checked.read, "notify-keyspace-events stopped reporting created keys or removals: the key index is rebuilt once it does");
            self.index.gap();
        }
        if missing.is_empty() {
            self.index.covered(&checked.now);
        } else if self.index.first_unusable() {
            warn!(
                value = %checked.now,
                missing = %notify::text(&missing),
                "the key index stays unused: notify-keyspace-events lacks `{}` (created keys and removals){}, and {}: bulk operations will SCAN the keyspace until it sends them (`CONFIG SET notify-keyspace-events {}`)",
                notify::text(&missing),
                checked.why(),
                checked.not_set.as_deref().unwrap_or("it is not set"),
                checked.wanted(index),
            );
        }
    }

    /// Wait while notifications flow (the connection's reader routes them)
    /// until the connection dies (`false`) or shutdown (`true`). A change of
    /// policies re-checks the notification flags (RESP3 lets the subscribed
    /// connection run commands).
    async fn watch(
        &mut self,
        mut conn: MultiplexedConnection,
        mut channels: Channels,
        link: &Link,
        probe: &Probe,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        // Not marked unchanged here: a republish between the subscription's
        // own check and now must still be acted on (one extra check is
        // harmless).
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return true,
                _ = link.closed.notified() => return false,
                Ok(()) = self.changes.changed() => {
                    self.changes.mark_unchanged();
                    if let Err(e) = self.resubscribe(&mut conn, &mut channels).await {
                        warn!(error = %e, "cannot change the keyspace subscription; reconnecting");
                        return false;
                    }
                    self.check_flags(&mut conn, &channels, probe, false).await;
                }
                _ = ping.tick() => {
                    let alive = tokio::time::timeout(PING_EVERY, redis::cmd("PING").query_async::<Value>(&mut conn)).await;
                    // A reply stuck behind a backlog of notifications is a
                    // busy link, not a dead one: notifications still coming
                    // in count as signs of life.
                    if !matches!(alive, Ok(Ok(_))) && !link.heard_within(PING_EVERY) {
                        return false;
                    }
                    // Flags turned off, or back on.
                    self.check_flags(&mut conn, &channels, probe, false).await;
                }
            }
        }
    }
}

/// A subscription's place among the echo ledger's fence readers, given up
/// when dropped: a subscription gone for good must not hold every later
/// fence back.
struct FenceListener {
    ledger: Arc<EchoLedger>,
    id: u64,
}

impl FenceListener {
    fn new(ledger: Arc<EchoLedger>) -> FenceListener {
        let id = ledger.listener();
        FenceListener { ledger, id }
    }
}

impl Drop for FenceListener {
    fn drop(&mut self) {
        self.ledger.drop_listener(self.id);
    }
}

/// The subscription connection as its reader sees it: whether it closed,
/// and when it last carried anything.
struct Link {
    /// This connection's place in the echo ledger's fences.
    listener: u64,
    closed: Notify,
    since: std::time::Instant,
    /// Milliseconds after `since` of the last push.
    last_heard_ms: AtomicU64,
}

impl Link {
    fn new(listener: u64) -> Link {
        Link { listener, closed: Notify::new(), since: std::time::Instant::now(), last_heard_ms: AtomicU64::new(0) }
    }

    fn heard(&self) {
        self.last_heard_ms.store(self.since.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn heard_within(&self, window: Duration) -> bool {
        let last = Duration::from_millis(self.last_heard_ms.load(Ordering::Relaxed));
        self.since.elapsed().saturating_sub(last) <= window
    }
}

/// Routes notifications inside the subscription connection's reader.
struct Router {
    /// `__keyevent@<db>__:*`, and whether it is subscribed (as confirmed on
    /// the connection): then keyevent channel messages are duplicates.
    keyevent_pattern: String,
    pattern_on: AtomicBool,
    /// See [`LAG_ENV`].
    lag: Option<Duration>,
    fence_channel: String,
    routes: Arc<ArcSwap<Routes>>,
    ledger: Arc<EchoLedger>,
    index: Arc<KeyIndex>,
    /// This connection's probe of the notification flags: its key's
    /// notifications and its markers are its own.
    probe: Arc<Probe>,
    switches: Arc<Switches>,
    shard: Option<u16>,
    /// The other replicas' announced writes, read on this connection.
    announcements: Option<(String, Arc<Remote>)>,
    hop_limit: u8,
    /// Told when redis-rs reports the connection closed; knows when the last
    /// push arrived.
    link: Arc<Link>,
    skipped: AtomicU64,
    /// Events whose key a policy cannot be given.
    undeliverable: AtomicU64,
}

impl AsyncPushSender for Router {
    fn send(&self, push: PushInfo) -> Result<(), redis::aio::SendError> {
        self.link.heard();
        match push.kind {
            // [pattern, channel, payload]
            PushKind::PMessage => {
                if let [_, Value::BulkString(channel), Value::BulkString(payload)] = push.data.as_slice() {
                    self.deliver(channel, payload);
                }
            }
            // [channel, payload]: a keyevent channel, or a fence of the echo
            // ledger.
            PushKind::Message => {
                if let [Value::BulkString(channel), Value::BulkString(payload)] = push.data.as_slice() {
                    if let Some((_, remote)) =
                        self.announcements.as_ref().filter(|(c, _)| c.as_bytes() == channel.as_slice())
                    {
                        remote.read(payload);
                    } else if channel.as_slice() == self.fence_channel.as_bytes() {
                        if let Some(id) = crate::store::echo::parse_fence(payload) {
                            self.ledger.fence_seen_by(self.link.listener, id);
                        } else if !self.index.fence_seen(payload) {
                            self.probe.marker_seen(payload);
                        }
                    } else if !self.pattern_on.load(Ordering::Relaxed) {
                        // (While the pattern is on too, during a switch
                        // between the two, its copy is the one routed.)
                        self.deliver(channel, payload);
                    }
                }
            }
            // Confirmations arrive in order with the messages: from the
            // pattern's until its removal's, every keyevent message comes
            // twice if its channel is subscribed as well.
            PushKind::PSubscribe | PushKind::PUnsubscribe => {
                if let [Value::BulkString(pattern), ..] = push.data.as_slice()
                    && pattern.as_slice() == self.keyevent_pattern.as_bytes()
                {
                    self.pattern_on.store(push.kind == PushKind::PSubscribe, Ordering::Relaxed);
                }
            }
            // A permit is stored if nobody waits yet.
            PushKind::Disconnection => {
                self.index.gap();
                self.link.closed.notify_one();
            }
            _ => {}
        }
        Ok(())
    }
}

impl Router {
    /// Route a message from a keyevent channel.
    fn deliver(&self, channel: &[u8], payload: &[u8]) {
        if !std::str::from_utf8(channel).is_ok_and(|channel| self.route(channel, payload)) {
            let skipped = self.skipped.fetch_add(1, Ordering::Relaxed) + 1;
            if skipped.is_power_of_two() {
                tracing::debug!(skipped, "skipped pub/sub messages that are not keyspace events");
            }
        }
    }

    /// Route one notification; `false` if it was not routable.
    fn route(&self, channel: &str, payload: &[u8]) -> bool {
        let Some((db, op)) = parse_channel(channel) else { return false };
        if self.probe.observe(op, payload) {
            return true;
        }
        let own = self.switches.lease.is_own_key(payload);
        if let Some(lag) = self.lag.filter(|_| !own) {
            std::thread::sleep(lag);
        }
        self.index.observe(op, payload);
        let origin = self.ledger.claim(op, payload);
        // Another daemon holds the lease: it handles this event. The
        // lease's own keys are no application's.
        if !self.switches.routes_node(self.shard) || own {
            return true;
        }
        let routed = self.routes.load().key_event(db, self.shard, op, payload, origin.as_ref(), self.hop_limit);
        if routed.swept_instead > 0 {
            let undeliverable = self.undeliverable.fetch_add(1, Ordering::Relaxed) + 1;
            if undeliverable.is_power_of_two() {
                warn!(
                    op,
                    undeliverable,
                    policies = routed.swept_instead,
                    "keyspace events for keys that are not UTF-8 or longer than 16 KiB cannot be delivered; the policies they concern are swept instead"
                );
            }
        }
        if routed.hop_limited {
            warn!(
                op,
                key = %String::from_utf8_lossy(payload),
                via = origin.as_ref().map_or("", |o| &*o.policy),
                "hop limit reached: not delivered further"
            );
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_parse() {
        assert_eq!(parse_channel("__keyevent@0__:set"), Some((0, "set")));
        assert_eq!(parse_channel("__keyevent@15__:expired"), Some((15, "expired")));
        assert_eq!(parse_channel("__keyspace@0__:foo"), None);
        assert_eq!(parse_channel("__keyevent@x__:set"), None);
        assert_eq!(parse_channel("__keyevent@0__:"), None);
    }

    #[test]
    fn backoff_grows_to_a_cap_with_jitter() {
        let mut b = Backoff::new();
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(75) && first <= Duration::from_millis(125));
        for _ in 0..20 {
            b.next_delay();
        }
        let capped = b.next_delay();
        assert!(capped <= Duration::from_millis(12_500) && capped >= Duration::from_millis(7_500));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(125));
    }
}
