//! The live set of policies as the event sources see it: who gets what.
//!
//! A [`Routes`] is an immutable snapshot (queues, manifests, the compiled
//! [`Matcher`]); the daemon publishes a new one whenever the set changes,
//! and sources load the current one per event, so a swap is atomic.

use std::sync::Arc;

use crate::dispatch::matcher::Matcher;
use crate::dispatch::queue::{HookFailure, Item, KeyNotification, PolicyQueue, Pushed};
use crate::sandbox::grants::MAX_KEY_LEN;
use crate::sandbox::manifest::Manifest;
use crate::store::echo::Origin as EchoOrigin;
use crate::wit::{DeployEvent, SweepReason};

/// One policy as routed to.
pub struct Route {
    pub name: Arc<str>,
    pub manifest: Arc<Manifest>,
    pub queue: Arc<PolicyQueue>,
    /// Which version of the policy (counted per policy) these routes are
    /// for; stamped on every event routed to it.
    pub generation: u64,
    /// Where it was loaded from, for `/status`.
    pub origin: Arc<Origin>,
}

/// A policy version's file and settings, as `/status` shows them.
#[derive(Debug)]
pub struct Origin {
    pub file: std::path::PathBuf,
    /// SHA-256 of the file, in hex.
    pub hash: String,
    pub mode: crate::config::Mode,
}

/// What became of one keyspace event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Routed {
    pub queued: u32,
    pub coalesced: u32,
    pub dropped: u32,
    /// Not delivered to the policy that caused it.
    pub echoes: u32,
    /// Not delivered because the chain of policies was too long.
    pub hop_limited: bool,
    /// Owed a sweep instead: the key cannot be handed to a policy.
    pub swept_instead: u32,
}

/// A snapshot of the policies and their subscriptions.
#[derive(Default)]
pub struct Routes {
    routes: Vec<Route>,
    matcher: Matcher,
}

impl Routes {
    pub fn new(routes: Vec<Route>) -> Routes {
        let matcher = Matcher::new(routes.iter().map(|r| &*r.manifest));
        Routes { routes, matcher }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn get(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|r| &*r.name == name)
    }

    /// Queue a keyspace event for every subscribed policy except the one
    /// that caused it, unless the chain it belongs to is over `hop_limit`.
    ///
    /// A key that cannot be handed to a policy (not UTF-8, or longer than
    /// [`MAX_KEY_LEN`]) owes each of those policies a `sweep(gap)` instead,
    /// which reaches the key on Redis's side; the echo and hop rules are the
    /// same, so a sweep's own writes never owe it another sweep.
    pub fn key_event(
        &self,
        db: u32,
        shard: Option<u16>,
        op: &str,
        key: &[u8],
        origin: Option<&EchoOrigin>,
        hop_limit: u8,
    ) -> Routed {
        let mut routed = Routed::default();
        let hops = origin.map_or(0, |o| o.hops);
        let text = if key.len() > MAX_KEY_LEN { None } else { std::str::from_utf8(key).ok() };
        // Made once, on the first policy that gets the event, and shared by
        // every queue it joins.
        let mut shared: Option<(Arc<str>, Arc<str>)> = None;
        let received = std::time::Instant::now();
        for index in self.matcher.matching(op, key) {
            let route = &self.routes[index];
            // The daemon's keys (a hook's id marker, a walk's book) and other
            // policies' state are no policy's events, whatever it listens to.
            if route.manifest.grants.held_back(key) {
                continue;
            }
            if origin.is_some_and(|o| o.policy == route.name) {
                routed.echoes += 1;
                continue;
            }
            if hops > hop_limit {
                routed.hop_limited = true;
                continue;
            }
            let Some(text) = text else {
                route.queue.record_gap();
                routed.swept_instead += 1;
                continue;
            };
            let (op, key) = shared.get_or_insert_with(|| (Arc::from(op), Arc::from(text))).clone();
            let event = KeyNotification { db, op, key, hops, generation: route.generation, received, shard };
            match route.queue.push_key(event) {
                Pushed::Queued => routed.queued += 1,
                Pushed::Coalesced => routed.coalesced += 1,
                Pushed::Dropped => routed.dropped += 1,
            }
        }
        routed
    }

    /// Every loaded policy's manifest.
    pub fn manifests(&self) -> Vec<&Manifest> {
        self.routes.iter().map(|r| &*r.manifest).collect()
    }

    /// The policies that want deploy hooks from `service`.
    pub fn deploy_targets(&self, service: &str) -> Vec<&Route> {
        self.routes.iter().filter(|r| r.manifest.wants_deploy(service)).collect()
    }

    /// Queue a sweep for every policy.
    pub fn sweep_all(&self, reason: SweepReason) {
        for route in &self.routes {
            let _ = route.queue.push(Item::Sweep(reason));
        }
    }

    /// Queue a deploy hook for one policy; the receiver says how it went.
    pub fn deploy_to(route: &Route, event: DeployEvent) -> tokio::sync::oneshot::Receiver<Result<(), HookFailure>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A closed queue hands the item back; dropping it drops `tx`, which
        // the receiver sees as "not handled".
        let _ = route.queue.push(Item::Deploy(event, tx));
        rx
    }
}
