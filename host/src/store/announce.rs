//! Echo suppression across replicas that split a Redis Cluster.
//!
//! The echo ledger ([`crate::store::echo`]) knows only this daemon's
//! writes. When replicas split a cluster by shard, a policy handling an
//! event on one shard may write a key of another shard, whose events
//! another daemon routes: to that daemon the write would look like the
//! application's, delivered at hop 0 (a policy would wake itself again, and
//! a chain of policies would never meet the hop limit).
//!
//! So each write is *announced* on the node that takes it: the write's
//! commands go out in one pipeline to that node, between a `PUBLISH` of
//! what it is (the daemon, the policy and hop count, the notifications it
//! causes, the keys) and a `PUBLISH` saying it is done. A node runs a
//! pipeline in order and queues a notification for its subscribers as it
//! runs the write, so every daemon subscribed to that node reads: the
//! announcement, then the write's notifications, then "done". The
//! announcement puts expectations in that daemon's ledger ([`Remote`]),
//! the notifications claim them, and "done" withdraws what was not
//! claimed (the write changed nothing). No clock, no extra round trip.
//!
//! A `PUBLISH` reaches every node of a cluster, so each subscription reads
//! every announcement; only the one from the node serving the keys is in
//! order with their notifications, and the others are ignored.
//! Announcements whose "done" never came (the writer or the node died in
//! between) are withdrawn after [`STALE`], by a timer ([`Remote::reap`]):
//! left until the next message on the channel, they would make later
//! application writes of those keys look like that policy's for as long
//! as the channel stays quiet.
//!
//! A write on a shard this daemon routes itself is not announced: its own
//! ledger recognises it, and no other replica routes that shard. Most
//! policies write the keys they are told about, so most writes go
//! unannounced; only those landing on another replica's shard pay for two
//! `PUBLISH`es, which the cluster bus carries to every node.
//!
//! Only writes made through the echo layer are announced: it says who is
//! writing ([`WRITING`]). Releasing a lock (a script) is not announced.
//! An announced write redirected by `ASK` (its slot being migrated) fails,
//! as the redirection covers only the first command of the pipeline, and
//! the policy's call is retried as any failed one. (An unannounced write is
//! redirected by the cluster client; if its slot moved to a node another
//! replica routes, that replica takes it for the application's until the
//! topology is read again.)

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::store::echo::{EchoLedger, Origin};

tokio::task_local! {
    /// The write under way (set by the echo layer around the backend's
    /// call): who makes it, and the notifications it causes.
    pub static WRITING: Writing;
}

/// Who makes a write, and the notifications it causes.
#[derive(Clone, Debug)]
pub struct Writing {
    pub origin: Origin,
    pub ops: &'static [&'static str],
}

/// Announcements not yet done kept per subscription: more means a daemon
/// died between its announcement and "done" (the oldest are withdrawn).
const PENDING: usize = 4096;

/// How long an announcement waits for its "done": the pipeline carrying
/// both runs on one node at once, so only a writer or node that died
/// between them leaves one open.
pub const STALE: Duration = Duration::from_secs(10);

/// How often announcements past [`STALE`] are looked for.
const REAP_EVERY: Duration = Duration::from_secs(1);

/// Whether this daemon routes the events of the node serving a slot (set
/// by whoever knows the topology and the leases).
pub type RoutesSlot = Box<dyn Fn(u16) -> bool + Send + Sync>;

/// This daemon's side: the `PUBLISH` commands around its writes.
pub struct Announcer {
    pub channel: String,
    /// This process's id (the lease's): its own announcements are ignored.
    pub daemon: String,
    seq: AtomicU64,
    /// Unset: every write is announced.
    routes: OnceLock<RoutesSlot>,
}

impl Announcer {
    pub fn new(channel: String, daemon: String) -> Announcer {
        Announcer { channel, daemon, seq: AtomicU64::new(0), routes: OnceLock::new() }
    }

    /// Say which slots' writes need no announcing: those of the nodes this
    /// daemon routes. (Once; later calls are ignored.)
    pub fn skip_routed(&self, routes: RoutesSlot) {
        let _ = self.routes.set(routes);
    }

    /// The announcement and the "done" of a write of `keys` (all on one
    /// node), if a write is under way ([`WRITING`]) on a node another
    /// replica routes.
    pub fn around<K: AsRef<[u8]>>(&self, keys: &[K]) -> Option<(redis::Cmd, redis::Cmd)> {
        let writing = WRITING.try_with(Clone::clone).ok()?;
        let slot = crate::store::target::slot(keys.first()?.as_ref());
        if self.routes.get().is_some_and(|routes| routes(slot)) {
            return None;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed).to_string();
        let hops = writing.origin.hops.to_string();
        let ops = writing.ops.join(",");
        let mut fields: Vec<&[u8]> =
            vec![b"w", self.daemon.as_bytes(), seq.as_bytes(), hops.as_bytes(), writing.origin.policy.as_bytes()];
        fields.push(ops.as_bytes());
        fields.extend(keys.iter().map(AsRef::as_ref));
        let publish = |payload: Vec<u8>| redis::cmd("PUBLISH").arg(&self.channel).arg(payload).clone();
        Some((publish(encode(&fields)), publish(encode(&[b"d", self.daemon.as_bytes(), seq.as_bytes()]))))
    }
}

/// Length-prefixed fields (`<len>:<bytes>`): keys are binary.
fn encode(fields: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for field in fields {
        out.extend_from_slice(field.len().to_string().as_bytes());
        out.push(b':');
        out.extend_from_slice(field);
    }
    out
}

fn decode(mut payload: &[u8]) -> Option<Vec<&[u8]>> {
    let mut fields = Vec::new();
    while !payload.is_empty() {
        let colon = payload.iter().position(|b| *b == b':')?;
        let len: usize = std::str::from_utf8(&payload[..colon]).ok()?.parse().ok()?;
        let rest = &payload[colon + 1..];
        fields.push(rest.get(..len)?);
        payload = &rest[len..];
    }
    Some(fields)
}

/// An announcement read back.
#[derive(Debug, PartialEq, Eq)]
enum Announcement<'a> {
    Writes { daemon: &'a [u8], seq: u64, origin: Origin, ops: Vec<&'a str>, keys: Vec<&'a [u8]> },
    Done { daemon: &'a [u8], seq: u64 },
}

fn parse(payload: &[u8]) -> Option<Announcement<'_>> {
    let fields = decode(payload)?;
    let number = |f: &[u8]| std::str::from_utf8(f).ok()?.parse::<u64>().ok();
    match fields.as_slice() {
        [b"w", daemon, seq, hops, policy, ops, keys @ ..] => Some(Announcement::Writes {
            daemon,
            seq: number(seq)?,
            origin: Origin {
                policy: std::str::from_utf8(policy).ok()?.into(),
                hops: u8::try_from(number(hops)?).ok()?,
            },
            ops: std::str::from_utf8(ops).ok()?.split(',').filter(|o| !o.is_empty()).collect(),
            keys: keys.to_vec(),
        }),
        [b"d", daemon, seq] => Some(Announcement::Done { daemon, seq: number(seq)? }),
        _ => None,
    }
}

type Expected = Vec<(Vec<u8>, Range<u64>)>;

/// An announcement by its daemon and number.
type WriteId = (Vec<u8>, u64);

/// The announcements not yet done, and their order (oldest first, with
/// when each came).
#[derive(Default)]
struct Open {
    writes: HashMap<WriteId, Expected>,
    order: VecDeque<(WriteId, Instant)>,
}

/// Another daemon's announced writes, as one subscription reads them: held
/// in this daemon's ledger until their notifications claim them or their
/// "done" arrives. Dropped with its subscription, withdrawing what is left.
pub struct Remote {
    ledger: Arc<EchoLedger>,
    me: String,
    /// The slots of the node this subscription is to (inclusive ranges).
    slots: Vec<(u16, u16)>,
    pending: Mutex<Open>,
}

impl Remote {
    pub fn new(ledger: Arc<EchoLedger>, me: String, slots: Vec<(u16, u16)>) -> Remote {
        Remote { ledger, me, slots, pending: Mutex::default() }
    }

    /// Whether `key` is served by this subscription's node.
    fn here(&self, key: &[u8]) -> bool {
        let slot = crate::store::target::slot(key);
        self.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
    }

    /// Withdraw `remote`'s announcements past [`STALE`] every
    /// [`REAP_EVERY`], for as long as it lives (its subscription).
    pub fn reap(remote: &Arc<Remote>) {
        let remote: Weak<Remote> = Arc::downgrade(remote);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REAP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(remote) = remote.upgrade() else { return };
                let mut pending = remote.pending.lock().unwrap_or_else(|e| e.into_inner());
                remote.expire(&mut pending, Instant::now());
            }
        });
    }

    /// Withdraw the announcements past [`STALE`], and the oldest past
    /// [`PENDING`].
    fn expire(&self, pending: &mut Open, now: Instant) {
        let Open { writes: open, order } = pending;
        while order.front().is_some_and(|(_, at)| order.len() > PENDING || now.duration_since(*at) > STALE) {
            let (oldest, _) = order.pop_front().expect("checked");
            if let Some(expected) = open.remove(&oldest) {
                self.withdraw(expected);
            }
        }
    }

    /// A message on the announcement channel.
    pub fn read(&self, payload: &[u8]) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        self.expire(&mut pending, now);
        let Open { writes: open, order } = &mut *pending;
        match parse(payload) {
            Some(Announcement::Writes { daemon, .. }) | Some(Announcement::Done { daemon, .. })
                if daemon == self.me.as_bytes() => {}
            // Another node's copy: not in order with these keys' events.
            Some(Announcement::Writes { keys, .. }) if !keys.first().is_some_and(|k| self.here(k)) => {}
            Some(Announcement::Writes { daemon, seq, origin, ops, keys }) => {
                let ops: Vec<&'static str> = ops.into_iter().filter_map(crate::store::echo::known_op).collect();
                if self.ledger.len() + keys.len() * ops.len() > crate::store::echo::CAPACITY {
                    tracing::debug!("echo ledger full: another replica's write is not recorded");
                    return;
                }
                let expected = keys.iter().map(|key| (key.to_vec(), self.ledger.expect(key, &ops, &origin))).collect();
                let id = (daemon.to_vec(), seq);
                // The same write sent again (its pipeline retried).
                if let Some(earlier) = open.insert(id.clone(), expected) {
                    self.withdraw(earlier);
                }
                order.push_back((id, now));
            }
            Some(Announcement::Done { daemon, seq }) => {
                if let Some(expected) = open.remove(&(daemon.to_vec(), seq)) {
                    self.withdraw(expected);
                }
            }
            None => tracing::debug!("an unreadable write announcement; ignored"),
        }
    }

    fn withdraw(&self, expected: Expected) {
        for (key, ids) in expected {
            self.ledger.withdraw(&key, ids);
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        let open = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        for expected in open.writes.into_values() {
            self.withdraw(expected);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writing() -> Writing {
        Writing { origin: Origin { policy: "copier".into(), hops: 2 }, ops: &["set", "expire"] }
    }

    fn payload(cmd: &redis::Cmd) -> Vec<u8> {
        match cmd.args_iter().nth(2) {
            Some(redis::Arg::Simple(bytes)) => bytes.to_vec(),
            _ => panic!("PUBLISH channel payload"),
        }
    }

    #[tokio::test]
    async fn another_daemons_write_is_its_echo_until_done() {
        let theirs = Announcer::new("ch".into(), "a/1".into());
        let key: &[u8] = b"k:\x00binary";
        let (announce, done) = WRITING.scope(writing(), async { theirs.around(&[key]) }).await.unwrap();
        assert!(theirs.around(&[key]).is_none(), "nothing is announced outside a write");

        let ledger = Arc::new(EchoLedger::new());
        let remote = Remote::new(ledger.clone(), "b/2".into(), vec![(0, 16383)]);
        remote.read(&payload(&announce));
        // The write's notification, read between the two: the writer's
        // policy one hop further, as if this daemon had written it.
        assert_eq!(ledger.claim("set", key), Some(Origin { policy: "copier".into(), hops: 2 }));
        remote.read(&payload(&done));
        assert!(ledger.is_empty(), "done withdraws the `expire` that never came");
        assert_eq!(ledger.claim("set", key), None, "a later write is the application's");
    }

    #[tokio::test]
    async fn writes_on_a_node_this_daemon_routes_are_not_announced() {
        let mine = Announcer::new("ch".into(), "a/1".into());
        let routed = crate::store::target::slot(b"mine");
        mine.skip_routed(Box::new(move |slot| slot == routed));
        let mine = &mine;
        let around = |key: &'static [u8]| WRITING.scope(writing(), async move { mine.around(&[key]) });
        assert!(around(b"mine").await.is_none(), "its own ledger recognises it");
        assert_ne!(crate::store::target::slot(b"theirs"), routed);
        assert!(around(b"theirs").await.is_some(), "another replica routes that node");
    }

    #[tokio::test(start_paused = true)]
    async fn an_announcement_never_done_is_withdrawn_by_its_timer() {
        let theirs = Announcer::new("ch".into(), "a/1".into());
        let (announce, _) = WRITING.scope(writing(), async { theirs.around(&[b"k"]) }).await.unwrap();
        let ledger = Arc::new(EchoLedger::new());
        let remote = Arc::new(Remote::new(ledger.clone(), "b/2".into(), vec![(0, 16383)]));
        Remote::reap(&remote);
        remote.read(&payload(&announce));
        tokio::time::sleep(STALE / 2).await;
        assert!(!ledger.is_empty(), "still waiting for its notifications");
        // No other message on the channel: the timer alone withdraws it.
        tokio::time::sleep(STALE).await;
        assert!(ledger.is_empty(), "withdrawn after STALE");
        assert_eq!(ledger.claim("set", b"k"), None, "a later write is the application's");
    }

    #[tokio::test]
    async fn own_announcements_are_ignored_and_a_lost_subscription_withdraws() {
        let mine = Announcer::new("ch".into(), "a/1".into());
        let (announce, _) = WRITING.scope(writing(), async { mine.around(&[b"k"]) }).await.unwrap();
        let ledger = Arc::new(EchoLedger::new());
        Remote::new(ledger.clone(), "a/1".into(), vec![(0, 16383)]).read(&payload(&announce));
        assert!(ledger.is_empty(), "its own ledger has its writes already");
        let elsewhere = crate::store::target::slot(b"k").wrapping_add(1) % crate::store::target::SLOTS;
        Remote::new(ledger.clone(), "b/2".into(), vec![(elsewhere, elsewhere)]).read(&payload(&announce));
        assert!(ledger.is_empty(), "another node's copy of the announcement");
        let remote = Remote::new(ledger.clone(), "b/2".into(), vec![(0, 16383)]);
        remote.read(&payload(&announce));
        assert!(!ledger.is_empty());
        drop(remote);
        assert!(ledger.is_empty());
        assert!(parse(b"3:abc").is_none() && parse(b"9:x").is_none());
    }
}
