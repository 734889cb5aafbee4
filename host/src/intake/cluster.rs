//! One keyspace subscription per primary, following the topology.
//!
//! Keyspace notifications are per node and never broadcast, and no
//! cluster client keeps a subscription on every primary (redis-rs routes a
//! `SUBSCRIBE` to one random node, and after a reconnect to the first node
//! it reaches). So the daemon does it itself: it reads the primaries from
//! `CLUSTER SLOTS` and runs one [`Subscriber`] per primary, each on a RESP3
//! connection of its own to that node. The topology is read again every
//! [`REFRESH`], at once when a subscription is lost (a primary failing
//! over is the usual reason), and at once when a command's reply says the
//! layout changed (`MOVED`, `CLUSTERDOWN`, a node unreachable: the store's
//! [`crate::store::target::TopologyHint`]), at most every [`HINTED`]. A primary that appears (a promoted replica, a
//! node added) is subscribed, and every policy gets `sweep(reconnect)` for
//! what may have been written there meanwhile (over every primary: what a
//! policy reconciles may be stored on any shard); a node that no longer
//! serves slots is let go.
//!
//! On a single server there is one subscription, to it, and no topology.
//!
//! [`Nodes`] keeps each subscription's state: readiness is "every primary
//! subscribed, every primary sending what the policies need", and
//! `/status` lists them.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::intake::events::{Backoff, Subscriber};
use crate::metrics::{Readiness, metrics};
use crate::store::target::{Node, RedisTarget};
use crate::wit::SweepReason;

/// How often the primaries are read again while nothing is lost.
pub const REFRESH: Duration = Duration::from_secs(5);

/// The least time between two reads asked for by failing commands: while
/// a node is down, every command sent to it fails, and one read per
/// failure would only load the nodes still up.
pub const HINTED: Duration = Duration::from_millis(500);

/// One subscription's state, as `/status` shows it.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct NodeState {
    /// `host:port` (empty on a single server).
    pub node: String,
    pub subscribed: bool,
    /// The node sends every notification the policies need.
    pub notifications: bool,
    /// Its `notify-keyspace-events` as last checked: the value, what a
    /// probe found where the value cannot say, what is missing and what
    /// that costs.
    #[serde(default)]
    pub flags: Option<crate::intake::notify::FlagsState>,
    /// The shard it serves, by first slot (on a cluster).
    #[serde(default)]
    pub shard: Option<u16>,
    /// The slot ranges it serves (inclusive; on a cluster).
    #[serde(skip)]
    pub slots: Vec<(u16, u16)>,
}

/// The subscriptions of this daemon, by node.
#[derive(Default)]
pub struct Nodes {
    states: Mutex<BTreeMap<String, NodeState>>,
    /// A subscription was lost: read the topology now.
    pub lost: tokio::sync::Notify,
}

impl Nodes {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, NodeState>> {
        self.states.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A subscription to `node` (serving `slots`, the shard of the first)
    /// starts: readiness waits for it.
    pub fn join(&self, node: &str, slots: &[(u16, u16)]) {
        let mut states = self.lock();
        let shard = slots.first().map(|(start, _)| *start);
        states.insert(
            node.to_string(),
            NodeState { node: node.into(), shard, slots: slots.to_vec(), ..NodeState::default() },
        );
        Self::publish(&states);
    }

    /// The shard (by first slot) of the node serving `slot`, as the
    /// topology was last read (`None`: no node known to serve it).
    pub fn shard_of(&self, slot: u16) -> Option<u16> {
        let states = self.lock();
        let mut serving = states.values().filter(|s| s.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)));
        serving.next().and_then(|s| s.shard)
    }

    /// Whether the primary of the shard starting at `slot` is subscribed.
    pub fn hears(&self, slot: u16) -> bool {
        self.lock().values().any(|s| s.shard == Some(slot) && s.subscribed)
    }

    /// Update `node`'s state and readiness from every node's. A node let
    /// go ([`Nodes::forget`]) stays gone, whatever its subscriber, still
    /// stopping, says.
    pub fn update(&self, node: &str, change: impl FnOnce(&mut NodeState)) {
        let mut states = self.lock();
        if let Some(state) = states.get_mut(node) {
            change(state);
            Self::publish(&states);
        }
    }

    /// Whether `node` sends what the policies need (as last checked).
    pub fn notifications(&self, node: &str) -> bool {
        self.lock().get(node).is_some_and(|s| s.notifications)
    }

    fn forget(&self, node: &str) {
        let mut states = self.lock();
        states.remove(node);
        Self::publish(&states);
    }

    fn publish(states: &BTreeMap<String, NodeState>) {
        let (subscribed, notifications, count) = Self::summary(states);
        let ready = &metrics().ready;
        Readiness::set(&ready.subscribed, subscribed);
        Readiness::set(&ready.notifications, notifications);
        metrics().subscriptions.set(count);
    }

    /// Every node subscribed; every node sending what is needed; how many
    /// subscriptions are up.
    fn summary(states: &BTreeMap<String, NodeState>) -> (bool, bool, i64) {
        let up = states.values().filter(|s| s.subscribed).count();
        (!states.is_empty() && up == states.len(), states.values().all(|s| s.notifications), up as i64)
    }

    /// Every subscription, by node.
    pub fn snapshot(&self) -> Vec<NodeState> {
        self.lock().values().cloned().collect()
    }
}

/// Runs the subscriptions `template` describes (one, or one per primary).
pub struct Subscriptions {
    pub target: RedisTarget,
    /// Cloned for each node, with its client and name.
    pub template: Subscriber,
}

impl Subscriptions {
    /// Run until `shutdown`; `ready` fires once every primary known at
    /// start is subscribed.
    pub async fn run(self, shutdown: CancellationToken, ready: tokio::sync::oneshot::Sender<()>) {
        if !self.target.is_cluster() {
            let mut single = self.template;
            single.nodes.join("", &[]);
            match self.target.node(None) {
                Ok(client) => single.client = client,
                Err(e) => return warn!(error = %e, "cannot subscribe to keyspace notifications"),
            }
            return single.run(shutdown, ready).await;
        }
        let nodes = self.template.nodes.clone();
        // By node and shard (a node whose slots change, a resharding, is
        // subscribed again under its new shard's lease): how to stop it,
        // and since when it is missing from the reads. It is let go once
        // missing for [`REFRESH`]: nodes answering `CLUSTER SLOTS` may
        // disagree for a moment during a failover, and reads asked for by
        // failing commands come faster than that.
        let mut running: BTreeMap<(String, u16), (CancellationToken, Option<Instant>)> = BTreeMap::new();
        let mut tasks = JoinSet::new();
        let mut ready = Some(ready);
        let mut backoff = Backoff::new();
        let mut conn = None;
        let mut warned = false;
        loop {
            let primaries = match self.read_primaries(&mut conn).await {
                Ok(primaries) => {
                    backoff.reset();
                    warned = false;
                    Some(primaries)
                }
                Err(e) => {
                    if !warned {
                        warn!(error = %e, "cannot read the cluster's primaries; keeping the subscriptions as they are");
                        warned = true;
                    }
                    conn = None;
                    // This read's own failure is no news: the next read
                    // waits as usual (the refresh, or the backoff when
                    // nothing is subscribed).
                    if let Some(hint) = self.target.topology_hint() {
                        let _ = hint.raised().now_or_never();
                    }
                    None
                }
            };
            if let Some(primaries) = primaries {
                let first = ready.is_some();
                running.retain(|(addr, shard), (stop, missing)| {
                    let serving = primaries.iter().any(|n| n.addr == *addr && n.shard() == *shard);
                    *missing = if serving { None } else { missing.or(Some(Instant::now())) };
                    if missing.is_none_or(|since| since.elapsed() < REFRESH) {
                        return true;
                    }
                    info!(node = %addr, slot = shard, "a node no longer serves these slots; unsubscribing from it");
                    stop.cancel();
                    nodes.forget(addr);
                    false
                });
                let mut started = Vec::new();
                let new: Vec<&Node> =
                    primaries.iter().filter(|n| !running.contains_key(&(n.addr.clone(), n.shard()))).collect();
                for node in new {
                    // The same node under another shard (its slots moved):
                    // the old subscription goes at once.
                    running.retain(|(addr, _), (stop, _)| {
                        let same = *addr == node.addr;
                        if same {
                            stop.cancel();
                        }
                        !same
                    });
                    let stop = shutdown.child_token();
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    match self.subscriber(node, first) {
                        Ok(subscriber) => {
                            nodes.join(&node.addr, &node.slots);
                            tasks.spawn(subscriber.run(stop.clone(), tx));
                            running.insert((node.addr.clone(), node.shard()), (stop, None));
                            started.push(rx);
                            if !first {
                                info!(node = %node, "a new primary serves slots; subscribing to it");
                            }
                        }
                        Err(e) => warn!(node = %node, error = %e, "cannot subscribe to a primary"),
                    }
                }
                // A node's ranges change under resharding while its first
                // slot, and so its subscription, stays.
                for node in &primaries {
                    nodes.update(&node.addr, |s| s.slots.clone_from(&node.slots));
                }
                metrics().primaries.set(primaries.len() as i64);
                // The shards as subscribed (a node is let go once missing
                // for a while), not as one read says.
                if let Some(shards) = &self.template.switches.shards {
                    shards.set(&self.template.switches.lease, running.keys().map(|(_, shard)| *shard));
                }
                if let Some(tx) = ready.take() {
                    info!(primaries = primaries.len(), "Redis Cluster: one keyspace subscription per primary");
                    let (routes, switches) = (self.template.routes.clone(), self.template.switches.clone());
                    tokio::spawn(async move {
                        for rx in started {
                            let _ = rx.await;
                        }
                        // One start sweep for every primary (replicas
                        // splitting the cluster sweep as they take shards).
                        if !switches.standing_by() {
                            routes.load().sweep_all(SweepReason::Start);
                        }
                        let _ = tx.send(());
                    });
                }
            }
            let read_at = tokio::time::Instant::now();
            let wait = if running.is_empty() { backoff.next_delay() } else { REFRESH };
            let hint = self.target.topology_hint().cloned().unwrap_or_default();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
                _ = nodes.lost.notified() => {}
                _ = hint.raised() => {
                    tracing::debug!("a command's reply says the cluster's layout changed; reading it again");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep_until(read_at + HINTED) => {}
                    }
                }
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    /// The subscriber for `node`: its first subscription sweeps for what
    /// the node may have taken unheard, unless it is one of the primaries
    /// at start (`first`), which one sweep covers.
    fn subscriber(&self, node: &Node, first: bool) -> redis::RedisResult<Subscriber> {
        let mut subscriber = self.template.clone();
        subscriber.client = self.target.node(Some(node))?;
        subscriber.node = node.addr.clone();
        subscriber.slots = node.slots.clone();
        subscriber.first_sweep = if first { None } else { Some(SweepReason::Reconnect) };
        Ok(subscriber)
    }

    async fn read_primaries(&self, conn: &mut Option<crate::store::target::Conn>) -> redis::RedisResult<Vec<Node>> {
        if conn.is_none() {
            *conn = Some(self.target.connect().await?);
        }
        let conn = conn.as_mut().expect("just set");
        let primaries = self.target.primaries(conn).await?;
        if primaries.is_empty() {
            return Err((redis::ErrorKind::Io, "the cluster announces no primary serving slots").into());
        }
        Ok(primaries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_primary_is_subscribed_and_sending() {
        let mut states = BTreeMap::new();
        let state = |subscribed, notifications| NodeState { subscribed, notifications, ..NodeState::default() };
        assert_eq!(Nodes::summary(&states), (false, true, 0), "no subscription yet");
        states.insert("a:1".to_string(), state(true, true));
        states.insert("b:2".to_string(), state(false, false));
        assert_eq!(Nodes::summary(&states), (false, false, 1));
        states.insert("b:2".to_string(), state(true, true));
        assert_eq!(Nodes::summary(&states), (true, true, 2));
        states.insert("b:2".to_string(), state(true, false));
        assert_eq!(Nodes::summary(&states), (true, false, 2));
    }

    #[test]
    fn a_slot_is_found_in_its_nodes_shard() {
        let nodes = Nodes::default();
        nodes.join("a:1", &[(0, 5460), (10923, 11000)]);
        nodes.join("b:2", &[(5461, 10922)]);
        assert_eq!(nodes.shard_of(0), Some(0));
        assert_eq!(nodes.shard_of(10950), Some(0), "a node's second range");
        assert_eq!(nodes.shard_of(6000), Some(5461));
        assert_eq!(nodes.shard_of(16000), None, "no node known to serve it");
        nodes.forget("b:2");
        assert_eq!(nodes.shard_of(6000), None);
    }
}
