//! [`Backend`] over a real Redis: the restricted API, done efficiently.
//!
//! One multiplexed, self-reconnecting connection ([`Conn`]: a
//! `ConnectionManager`, or redis-rs's cluster client on a Redis Cluster) is
//! shared by every policy; it is separate from the keyspace subscription,
//! which Redis puts in a mode where it can run no other command.
//!
//! The bulk operations are the reason this exists: a runbook's
//! `for key in scan_iter(...): delete(key)` costs one round trip per key.
//! Here `SCAN MATCH p COUNT 1000` pages are deleted with one multi-key
//! `UNLINK` per page, sent in the same pipeline as the request for the next
//! page, so a page costs one round trip. Every key Redis returns is checked
//! against the policy's grants before it is touched, and `KEYS` is never used.
//!
//! On a Redis Cluster a `SCAN` cursor belongs to one node, so bulk
//! operations walk every primary, in parallel, each over a connection of
//! its own; a multi-key command takes keys of one slot only, so a page's
//! `UNLINK` and the pipelined `MGET`s are split by slot, and pipelines of
//! single-key commands are sent one per slot.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use cachepol_guest_sdk::glob::Glob;
use redis::{RedisError, Script, Value};

use crate::metrics::{Metrics, metrics};
use crate::store::announce::Announcer;
use crate::store::backend::{
    Backend, BackendError, BulkPlan, BulkResult, BulkStep, QueuedExpire, Rows, ScanResult, scan_pattern_for,
};
use crate::store::index::{self, Fence, KeyIndex, Lease};
use crate::store::target::{self, Conn, Node, RedisTarget};
use crate::store::walks::{NodeAt, Position};
use crate::wit::{ExpireCondition, ExpireRow, KeyTtl, SetCondition, SetOptions, ValueKind};

/// Keys asked for per `SCAN` page in bulk operations (and per page taken
/// from the key index).
pub const SCAN_BATCH: usize = 1000;

/// Page writes of a `SCAN` walk in flight at once, beside its next `SCAN`
/// ([`RedisBackend::scan`]): one keeps Redis busy while the daemon takes
/// the next page; a second covers the reply's way back.
const WRITES_IN_FLIGHT: usize = 2;

/// Pipelines of a bulk operation over the key index in flight at once:
/// with one, Redis idles while the daemon prepares the next page.
const IN_FLIGHT: usize = 4;

/// Pages a bulk operation over the key index may run ahead of the keyspace
/// subscription: each deleted key is a notification queued in Redis for the
/// subscriber, and past `client-output-buffer-limit pubsub` (32 MB by
/// default, about 400k such notifications) Redis cuts it. 32 pages are about
/// 5 MB of them.
const PAGES_AHEAD: usize = 32;

/// Compare-and-delete: release a lock only if it still holds our token.
/// `UNLINK`, like every delete the daemon sends: Redis checks the commands a
/// script runs against the ACL user's rules, and `cachepol acl` allows
/// `UNLINK`, not `DEL`.
const RELEASE: &str =
    r#"if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("UNLINK", KEYS[1]) else return 0 end"#;

/// The restricted Redis API over one multiplexed connection.
#[derive(Clone)]
pub struct RedisBackend {
    conn: Conn,
    /// For the connections of `SCAN`-based bulk operations (see
    /// [`RedisBackend::scan`]), and a cluster's primaries.
    target: RedisTarget,
    release: Script,
    /// Serves bulk operations when complete ([`crate::store::index`]).
    index: Option<Arc<KeyIndex>>,
    /// Tells the other replicas splitting a cluster of each write
    /// ([`crate::store::announce`]).
    announcer: Option<Arc<Announcer>>,
    /// On a cluster, a connection per primary for policies' `SCAN` pages
    /// (by address; dropped when it fails).
    node_conns: Arc<std::sync::Mutex<HashMap<String, redis::aio::MultiplexedConnection>>>,
    /// On a cluster, the primaries as last read, and when: a policy's
    /// `scan` pages reuse them for [`PRIMARIES_FRESH`] instead of sending
    /// `CLUSTER SLOTS` before each page; any node error forgets them.
    primaries: Arc<std::sync::Mutex<Option<Primaries>>>,
}

/// A cluster's primaries, and when they were read.
type Primaries = (std::time::Instant, Vec<Node>);

/// How long a cluster's primaries, once read, serve `scan` pages.
const PRIMARIES_FRESH: std::time::Duration = std::time::Duration::from_secs(1);

impl RedisBackend {
    /// Connect (the connection manager reconnects by itself afterwards).
    pub async fn connect(target: &RedisTarget) -> Result<RedisBackend, BackendError> {
        let conn = target.connect().await.map_err(failed)?;
        Ok(RedisBackend {
            conn,
            target: target.clone(),
            release: Script::new(RELEASE),
            index: None,
            announcer: None,
            node_conns: Arc::default(),
            primaries: Arc::default(),
        })
    }

    /// Serve bulk operations from `index` when it is complete. (Not on a
    /// cluster: the index's fences need one subscription in order with
    /// every write, and a cluster has one per primary.)
    pub fn with_index(mut self, index: Arc<KeyIndex>) -> RedisBackend {
        if !self.target.is_cluster() {
            self.index = Some(index);
        }
        self
    }

    /// Announce every write to the other replicas (on a cluster they split).
    pub(crate) fn with_announcer(mut self, announcer: Arc<Announcer>) -> RedisBackend {
        self.announcer = Some(announcer);
        self
    }

    /// The announcement and "done" around a write of `keys` (one node's),
    /// when replicas split the cluster and a policy is writing.
    fn around<K: AsRef<[u8]>>(&self, keys: &[K]) -> Option<(redis::Cmd, redis::Cmd)> {
        self.announcer.as_ref()?.around(keys)
    }

    /// One write of `key`: on a cluster, announced to the other replicas
    /// when they split it.
    async fn write<T: redis::FromRedisValue>(&self, key: &[u8], cmd: redis::Cmd) -> Result<T, BackendError> {
        if !self.target.is_cluster() {
            return self.query(&cmd).await;
        }
        let reply = self.pipelined(vec![(vec![key], cmd)]).await?.pop().unwrap_or(Value::Nil);
        redis::from_redis_value(reply).map_err(|e| BackendError::Command(e.to_string()))
    }

    /// A clone of the connection, for host-side commands outside the
    /// policy API (streams, `CONFIG`).
    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.target.is_cluster()
    }

    pub fn connection(&self) -> Conn {
        self.conn.clone()
    }

    /// Send `cmds` (each with its keys, of one slot) and return their
    /// replies in order: one pipeline on a single server; on a cluster, one
    /// pipeline per slot, all at once (the cluster client routes a pipeline
    /// whole, to the node of its first key), each announced to the other
    /// replicas when they split the cluster.
    async fn pipelined(&self, cmds: Vec<(Vec<&[u8]>, redis::Cmd)>) -> Result<Vec<Value>, BackendError> {
        if !self.target.is_cluster() {
            let mut pipe = redis::pipe();
            for (_, cmd) in cmds {
                pipe.add_command(cmd);
            }
            return retrying(|| async { pipe.query_async(&mut self.conn.clone()).await }).await;
        }
        type Group<'k> = (Vec<usize>, Vec<&'k [u8]>, Vec<redis::Cmd>);
        let mut by_slot: std::collections::BTreeMap<u16, Group<'_>> = Default::default();
        for (i, (keys, cmd)) in cmds.into_iter().enumerate() {
            let slot = keys.first().map_or(0, |k| target::slot(k));
            let (at, all, group) = by_slot.entry(slot).or_default();
            at.push(i);
            all.extend(keys);
            group.push(cmd);
        }
        let sent = by_slot.into_iter().map(|(slot, (at, keys, cmds))| async move {
            let replies = self.on_slot(slot, &keys, cmds).await?;
            Ok::<_, BackendError>(at.into_iter().zip(replies).collect::<Vec<_>>())
        });
        let mut replies: Vec<(usize, Value)> =
            futures_util::future::try_join_all(sent).await?.into_iter().flatten().collect();
        replies.sort_by_key(|(i, _)| *i);
        Ok(replies.into_iter().map(|(_, v)| v).collect())
    }

    /// `cmds` writing `keys`, all of one `slot`, in one pipeline; their
    /// replies. Announced to the other replicas when a policy writes on a
    /// node another replica routes.
    async fn on_slot<K: AsRef<[u8]>>(
        &self,
        slot: u16,
        keys: &[K],
        cmds: Vec<redis::Cmd>,
    ) -> Result<Vec<Value>, BackendError> {
        if let Some(around) = self.around(keys) {
            return self.announced(slot, around, cmds).await;
        }
        let mut pipe = redis::pipe();
        for cmd in cmds {
            pipe.add_command(cmd);
        }
        retrying(|| async { pipe.query_async::<Vec<Value>>(&mut self.conn.clone()).await }).await
    }

    /// `cmds` of one `slot`, between `around`'s announcement and its
    /// "done", in one pipeline to the slot's node; their replies.
    async fn announced(
        &self,
        slot: u16,
        (before, after): (redis::Cmd, redis::Cmd),
        cmds: impl IntoIterator<Item = redis::Cmd>,
    ) -> Result<Vec<Value>, BackendError> {
        let mut pipe = redis::pipe();
        pipe.add_command(before);
        for cmd in cmds {
            pipe.add_command(cmd);
        }
        pipe.add_command(after);
        let mut replies =
            retrying(|| async { self.conn.clone().pipeline_on_slot(&pipe, slot).await.and_then(server_errors) })
                .await?;
        replies.pop();
        replies.remove(0);
        Ok(replies)
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, BackendError> {
        retrying(|| async { cmd.query_async(&mut self.conn.clone()).await }).await
    }

    /// Walk the keys matching any of `walks` (each key handled by the first
    /// that matches it), handing each page's allowed keys to `act`, which
    /// adds its commands for them to a pipeline. `tally` says how many keys
    /// each of those commands' replies counts for; replies are counted page
    /// by page, never kept (a bulk operation may touch millions of keys).
    ///
    /// The keys come from the key index when it is complete for every walk
    /// ([`crate::store::index`]), else from `SCAN MATCH`. If the index goes
    /// incomplete on the way (a gap in the subscription, as a Redis restart
    /// causes), the operation goes on with a scan from the start.
    ///
    /// The walk stops short once the plan's limits are reached (keys
    /// changed, keys examined), at a page boundary, and says where
    /// ([`BulkResult::stopped`]); a plan that resumes such a walk goes on
    /// from there ([`crate::store::walks`]).
    async fn bulk(
        &self,
        walks: &[Glob],
        plan: &BulkPlan<'_>,
        act: impl Fn(&mut redis::Pipeline, &[Vec<u8>]),
        tally: impl Fn(&Value) -> u64,
    ) -> Result<BulkResult, BackendError> {
        let mut result = BulkResult::default();
        let taking = Taking::new(plan);
        // An exact key needs no scan.
        if let [walk] = walks
            && let Some(literal) = walk.literal()
        {
            let exists: bool = self.query(redis::cmd("EXISTS").arg(&literal)).await?;
            result.examined = 1;
            if exists && (plan.allow)(&literal) && plan.limit > 0 {
                let mut pipe = redis::pipe();
                let keys = std::slice::from_ref(&literal);
                act(&mut pipe, keys);
                plan.step(BulkStep::Before(keys));
                let cmds: Vec<redis::Cmd> = pipe.cmd_iter().cloned().collect();
                let replies = self.on_slot(target::slot(&literal), keys, cmds).await;
                plan.step(BulkStep::After(keys));
                let replies = replies?;
                sample_changed(&mut result, keys, &replies, &tally);
                result.affected = replies.iter().map(&tally).sum();
            }
            return Ok(result);
        }
        let scan_pattern = scan_pattern_for(&walks.iter().collect::<Vec<_>>());
        let resume = plan.resume.cloned().unwrap_or_default();
        if let Some(leases) = self.leases(walks, &scan_pattern).await {
            match self.walk_index(walks, &leases, resume.index.clone(), &taking, &act, &tally, &mut result).await? {
                Walked::Complete => {
                    Metrics::count(&metrics().bulk_operations, "index");
                    return Ok(result);
                }
                Walked::Stopped(at) => {
                    result.truncated = true;
                    result.stopped = Some(Position { index: Some(at), ..Position::default() });
                    Metrics::count(&metrics().bulk_operations, "index");
                    return Ok(result);
                }
                Walked::Stale => tracing::info!(
                    pattern = %scan_pattern,
                    "the key index went incomplete during a bulk operation; scanning for the rest"
                ),
            }
        }
        // A walk the index served stopped at a key, not a cursor: the scan
        // starts from the beginning (keys already handled are found again,
        // and answer as unchanged).
        let stopped = match self.target.is_cluster() {
            false => {
                let client = self.target.node(None).map_err(failed)?;
                let at = self.scan(&client, "", walks, &scan_pattern, &resume, &taking, &act, &tally, &mut result);
                let at = at.await?;
                (!at.done).then(|| [(String::new(), at)].into())
            }
            true => self.scan_primaries(walks, &scan_pattern, &resume, &taking, &act, &tally, &mut result).await?,
        };
        Metrics::count(&metrics().bulk_operations, "scan");
        if let Some(nodes) = stopped {
            result.truncated = true;
            result.stopped = Some(Position { nodes, index: None });
        }
        Ok(result)
    }

    /// [`RedisBackend::scan`] on every primary of the cluster at once,
    /// each from where `resume` left it. `result` gathers every node's;
    /// returns where each node stands if any stopped short.
    #[allow(clippy::too_many_arguments)]
    async fn scan_primaries(
        &self,
        walks: &[Glob],
        pattern: &str,
        resume: &Position,
        taking: &Taking<'_, '_>,
        act: &impl Fn(&mut redis::Pipeline, &[Vec<u8>]),
        tally: &impl Fn(&Value) -> u64,
        result: &mut BulkResult,
    ) -> Result<Option<BTreeMap<String, NodeAt>>, BackendError> {
        let primaries = self.primaries().await?;
        let nodes = primaries.iter().map(|node| async {
            let client = self.target.node(Some(node)).map_err(failed)?;
            let mut mine = BulkResult::default();
            let shard = node.shard().to_string();
            let at = self.scan(&client, &shard, walks, pattern, resume, taking, act, tally, &mut mine).await;
            at.map(|at| (shard, at, mine)).map_err(|e| on_node(node, e))
        });
        // Every node's walk runs to its end, whatever the others do: one
        // cut short between sending a page and reading its answer would
        // leave the echo ledger expecting notifications.
        let mut failed = None;
        let mut positions = BTreeMap::new();
        for walked in futures_util::future::join_all(nodes).await {
            let (shard, at, mine) = match walked {
                Ok(walked) => walked,
                Err(e) => {
                    failed.get_or_insert(e);
                    continue;
                }
            };
            result.affected += mine.affected;
            result.examined += mine.examined;
            result.refused += mine.refused;
            let room = BulkResult::SAMPLE.saturating_sub(result.sample.len());
            result.sample.extend(mine.sample.into_iter().take(room));
            positions.insert(shard, at);
        }
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(positions.values().any(|at| !at.done).then_some(positions))
    }

    /// A connection to `node`, kept for the next call.
    pub(super) async fn node_conn(&self, node: &Node) -> Result<redis::aio::MultiplexedConnection, BackendError> {
        if let Some(conn) = self.node_conns.lock().unwrap_or_else(|e| e.into_inner()).get(&node.addr) {
            return Ok(conn.clone());
        }
        let client = self.target.node(Some(node)).map_err(failed)?;
        let conn = client.get_multiplexed_async_connection().await.map_err(|e| on_node(node, self.node_failed(e)))?;
        self.node_conns.lock().unwrap_or_else(|e| e.into_inner()).insert(node.addr.clone(), conn.clone());
        Ok(conn)
    }

    /// [`failed`], for a command sent to one node: an error saying the
    /// cluster's layout changed raises its [`target::TopologyHint`].
    fn node_failed(&self, e: RedisError) -> BackendError {
        self.target.saw(&e);
        *self.primaries.lock().unwrap_or_else(|e| e.into_inner()) = None;
        failed(e)
    }

    /// The cluster's primaries now. Every bulk operation and sweep walks
    /// them all: a policy's sweep reconciles state that may live on any
    /// shard (a deferred clear stored away from its lock, a marker saying
    /// which version was cleaned), so it is never narrowed to some.
    pub(super) async fn primaries(&self) -> Result<Vec<Node>, BackendError> {
        let primaries = self.target.primaries(&mut self.conn.clone()).await.map_err(failed)?;
        if primaries.is_empty() {
            return Err(BackendError::Unavailable("the cluster announces no primary serving slots".into()));
        }
        *self.primaries.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((std::time::Instant::now(), primaries.clone()));
        Ok(primaries)
    }

    /// [`RedisBackend::primaries`], as read within [`PRIMARIES_FRESH`]:
    /// for a policy's `scan` pages, which come one host call at a time.
    async fn recent_primaries(&self) -> Result<Vec<Node>, BackendError> {
        if let Some((at, primaries)) = &*self.primaries.lock().unwrap_or_else(|e| e.into_inner())
            && at.elapsed() < PRIMARIES_FRESH
        {
            return Ok(primaries.clone());
        }
        self.primaries().await
    }

    /// [`RedisBackend::bulk`] over the key index: pages of keys taken from
    /// it under `leases`, from `after` (a walk and the last key an earlier
    /// slice took), [`IN_FLIGHT`] pipelines at a time. What was sent is
    /// in `result`.
    #[allow(clippy::too_many_arguments)]
    async fn walk_index(
        &self,
        walks: &[Glob],
        leases: &[Lease],
        after: Option<(usize, Vec<u8>)>,
        taking: &Taking<'_, '_>,
        act: &impl Fn(&mut redis::Pipeline, &[Vec<u8>]),
        tally: &impl Fn(&Value) -> u64,
        result: &mut BulkResult,
    ) -> Result<Walked, BackendError> {
        let index = self.index.as_deref().expect("leases come from the index");
        let first_walk = |key: &[u8]| walks.iter().position(|w| w.matches_bytes(key));
        let (mut walk, mut after): (usize, Option<Vec<u8>>) = match after {
            Some((walk, key)) if walk < walks.len() => (walk, Some(key)),
            _ => (0, None),
        };
        // The last key taken: where a walk stopped short goes on.
        let mut last: Option<(usize, Vec<u8>)> = after.clone().map(|k| (walk, k));
        let mut stop = false;
        let mut stale = false;
        let mut failed = None;
        let mut in_flight = futures_util::stream::FuturesOrdered::new();
        let mut fences = std::collections::VecDeque::new();
        loop {
            while in_flight.len() < IN_FLIGHT && failed.is_none() && !stale && !stop {
                // Each deleted key comes back as a notification: stay within
                // [`PAGES_AHEAD`] pages of what the subscription has read,
                // or Redis's output buffer for it overflows and it is cut.
                if fences.len() >= PAGES_AHEAD {
                    let oldest: Fence = fences.pop_front().expect("checked");
                    if oldest.back(index::FENCE_WAIT * 5).await.is_err() {
                        stale = true;
                        break;
                    }
                }
                let mut page = Vec::new();
                while walk < leases.len() && page.len() < SCAN_BATCH && !stop {
                    let room = SCAN_BATCH - page.len();
                    let Ok((keys, next)) =
                        index.page(leases[walk], &walks[walk], after.as_deref(), room, |k| first_walk(k) == Some(walk))
                    else {
                        stale = true;
                        break;
                    };
                    let finished = next.is_none();
                    after = next;
                    for key in keys {
                        match taking.take_one(&key, result) {
                            Took::Full => {
                                stop = true;
                                break;
                            }
                            Took::Refused => last = Some((walk, key)),
                            Took::Taken => {
                                last = Some((walk, key.clone()));
                                page.push(key);
                            }
                        }
                    }
                    if !stop && finished {
                        walk += 1;
                        after = None;
                    }
                }
                stop |= taking.spent();
                if page.is_empty() {
                    break;
                }
                let mut pipe = redis::pipe();
                act(&mut pipe, &page);
                fences.push_back(index.fence(&mut pipe));
                taking.plan.step(BulkStep::Before(&page));
                result.examined += page.len() as u64;
                taking.examined(page.len() as u64);
                let conn = self.conn.clone();
                in_flight.push_back(async move {
                    let mut broke = false;
                    let replies = retrying_noting(&mut broke, || async {
                        pipe.query_async::<Vec<Value>>(&mut conn.clone()).await
                    });
                    (replies.await, page, broke)
                });
            }
            let Some((replies, page, broke)) = futures_util::StreamExt::next(&mut in_flight).await else { break };
            // Answered, or failed: either way a write may have reached Redis.
            taking.plan.step(BulkStep::After(&page));
            match replies {
                Ok(mut replies) => {
                    // The last reply is the fence's: how many subscribers
                    // it reached (none: the subscription is gone).
                    let listeners = replies.pop();
                    let changed = replies.iter().map(tally).sum::<u64>();
                    taking.answered(page.len() as u64, changed);
                    result.affected += changed;
                    sample_changed(result, &page, &replies, tally);
                    // A broken connection may be a restarted Redis, whose
                    // keys the index no longer describes (deleted keys back
                    // from a snapshot): the rest is scanned.
                    stale |= broke || !matches!(listeners, Some(Value::Int(n)) if n > 0);
                }
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        // Done only once the subscription has read past the last page with
        // no gap: else a restart during the walk could go unnoticed.
        if !stale {
            let back = match fences.pop_back() {
                Some(last) => last.back(index::FENCE_WAIT * 5).await.is_ok(),
                None => true,
            };
            stale = !back || !leases.iter().all(|l| index.holds(*l));
        }
        Ok(match (stale, stop && walk < leases.len()) {
            (true, _) => Walked::Stale,
            (false, true) => Walked::Stopped(last.unwrap_or((walk, Vec::new()))),
            (false, false) => Walked::Complete,
        })
    }

    /// [`RedisBackend::bulk`] by `SCAN MATCH` on one node (`shard` names it
    /// in positions: `""` for a single server), from where `resume` left
    /// it. The request for the next page goes out before the current
    /// page's writes, which are sent on their own ([`WRITES_IN_FLIGHT`] at
    /// most): Redis works through a page's writes while the daemon takes
    /// the next page, instead of each side waiting for the other at every
    /// page. Returns where the node's walk stands.
    ///
    /// If the connection breaks mid-way, the scan starts over from cursor 0
    /// once it is back: Redis may have restarted, and a `SCAN` cursor means
    /// nothing on a restarted server (its dict has a new hash seed), so
    /// going on would silently skip keys. Keys already deleted are not found
    /// again; keys whose TTL was set are found again and answer unchanged.
    /// For the same reason a cursor kept from an earlier slice is used only
    /// on the server that gave it (its `run_id`).
    #[allow(clippy::too_many_arguments)]
    async fn scan(
        &self,
        node: &redis::Client,
        shard: &str,
        walks: &[Glob],
        pattern: &str,
        resume: &Position,
        taking: &Taking<'_, '_>,
        act: &impl Fn(&mut redis::Pipeline, &[Vec<u8>]),
        tally: &impl Fn(&Value) -> u64,
        result: &mut BulkResult,
    ) -> Result<NodeAt, BackendError> {
        // A connection of its own: on the shared one, another user (the
        // echo fences, the index builder) may be the first to find it broken
        // after a Redis restart and reconnect it, and this scan would go on
        // with a cursor the restarted server knows nothing of.
        let conn = RedisTarget::Single(node.clone()).connect().await.map_err(|e| self.node_failed(e))?;
        let mut run_id = run_id(&conn).await?;
        let Some(from) = resume.resume_on(shard, &run_id) else {
            return Ok(NodeAt { run_id, cursor: 0, done: true });
        };
        // Keys taken from the last page, their writes not sent yet.
        let mut pending: Vec<Vec<u8>> = Vec::new();
        let mut writes = Writes::default();
        let mut cursor: Option<u64> = Some(from);
        // Where the walk goes on next time, once it stops short.
        let mut stopped_at: Option<u64> = None;
        let mut restarts = 0;
        loop {
            let asked = cursor.map(|c| self.scan_page(&conn, c, pattern));
            let mut asked = std::pin::pin!(futures_util::future::OptionFuture::from(asked));
            // Polled once, the request is on the connection ahead of the
            // writes sent next: its answer comes back while Redis works
            // through them, and the next page is taken meanwhile.
            let early = futures_util::FutureExt::now_or_never(asked.as_mut());
            if !pending.is_empty() {
                writes.settle(WRITES_IN_FLIGHT - 1, taking, tally, result).await;
                let mut keys = std::mem::take(&mut pending);
                let pipe = self.page_writes(&mut keys, act);
                taking.plan.step(BulkStep::Before(&keys));
                writes.send(keys, pipe, &conn, self.target.topology_hint().cloned());
            }
            let (page, scan_broke) = match early {
                Some(answer) => answer,
                None => asked.await,
            }
            .map_or((Ok(None), false), |(page, broke)| (page.map(Some), broke));
            let page = page.map(|p| p.map(|(next, keys)| (next, matching(walks, keys))));
            // Every write is answered before the walk ends, starts over or
            // fails, and before a page whose keys may reach a limit is
            // taken: pages in flight may yet answer "unchanged" and give
            // room back, as they had by then when each page was one round
            // trip, so limits cut where they did then.
            let drain = match &page {
                Ok(Some((_, keys))) => scan_broke || writes.troubled() || taking.may_fill(keys.len()),
                _ => true,
            };
            if drain {
                writes.settle(0, taking, tally, result).await;
            }
            if let Some(e) = writes.failed.take() {
                return Err(e);
            }
            let page = page?;
            if scan_broke || std::mem::take(&mut writes.broke) {
                restarts += 1;
                if restarts > MAX_SCAN_RESTARTS {
                    return Err(BackendError::Unavailable(format!(
                        "the connection broke {restarts} times during a bulk operation on `{pattern}`"
                    )));
                }
                tracing::warn!(
                    pattern,
                    "the connection to Redis broke during a bulk operation; starting its scan over"
                );
                run_id = self::run_id(&conn).await?;
                (cursor, stopped_at) = (Some(0), None);
                continue;
            }
            let (Some((next, keys)), Some(requested)) = (page, cursor) else {
                return Ok(NodeAt { run_id, cursor: stopped_at.unwrap_or(0), done: stopped_at.is_none() });
            };
            result.examined += SCAN_BATCH as u64;
            taking.examined(SCAN_BATCH as u64);
            let mut cut = false;
            for key in keys {
                match taking.take_one(&key, result) {
                    Took::Taken => pending.push(key),
                    Took::Refused => {}
                    Took::Full => {
                        cut = true;
                        break;
                    }
                }
            }
            // A page cut part-way (an exact limit, never in a slice: pages
            // are taken whole there) would be walked again; one taken whole
            // goes on after it. Other nodes' walks may have used up the
            // limits.
            (cursor, stopped_at) = if cut {
                (None, Some(requested))
            } else if next == 0 {
                (None, None)
            } else if taking.spent() {
                (None, Some(next))
            } else {
                (Some(next), None)
            };
            // A walk of more than a page: the index builder's scan of the
            // same server waits for it (a cluster has no index). One that
            // ends on its first page (a small keyspace, swept every second)
            // never holds it back.
            if cursor.is_some()
                && let Some(index) = &self.index
            {
                index.walking();
            }
        }
    }

    /// One `SCAN` page of a walk on `conn`, and whether the connection was
    /// found broken on the way (the cursor may then be another server's).
    async fn scan_page(&self, conn: &Conn, cursor: u64, pattern: &str) -> (Result<ScanPage, BackendError>, bool) {
        let mut broke = false;
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(SCAN_BATCH);
        let page = retrying_noting(&mut broke, || async {
            cmd.query_async(&mut conn.clone()).await.inspect_err(|e| self.target.saw(e))
        })
        .await;
        (page, broke)
    }

    /// The pipeline of `act`'s commands for `keys`, a page of one node's
    /// walk, announced to the other replicas when they split a cluster. On
    /// a cluster a multi-key command takes keys of one slot: the page goes
    /// out slot by slot, `keys` sorted so that the replies pair with them
    /// in this order.
    fn page_writes(&self, keys: &mut [Vec<u8>], act: &impl Fn(&mut redis::Pipeline, &[Vec<u8>])) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        let around = self.around(keys);
        if let Some((before, _)) = &around {
            pipe.add_command(before.clone()).ignore();
        }
        if self.target.is_cluster() {
            keys.sort_by_key(|k| target::slot(k));
            for group in keys.chunk_by(|a, b| target::slot(a) == target::slot(b)) {
                act(&mut pipe, group);
            }
        } else {
            act(&mut pipe, keys);
        }
        if let Some((_, after)) = around {
            pipe.add_command(after).ignore();
        }
        pipe
    }

    /// Leases on the key index for every walk, once a fence says the index
    /// holds every write answered before now; `None`: scan instead.
    async fn leases(&self, walks: &[Glob], pattern: &str) -> Option<Vec<Lease>> {
        let index = self.index.as_deref()?;
        if !index.is_active() {
            return None;
        }
        let scan = |why: &str| {
            tracing::debug!(pattern, "bulk operation scans: {why}");
            None
        };
        let Some(leases) = walks.iter().map(|w| index.serve(w)).collect::<Option<Vec<Lease>>>() else {
            return scan("no complete key index covers it");
        };
        let mut pipe = redis::pipe();
        pipe.cmd("CONFIG").arg("GET").arg("notify-keyspace-events");
        let fence = index.fence(&mut pipe);
        let sent =
            retrying(|| async { pipe.query_async::<(HashMap<String, String>, i64)>(&mut self.conn.clone()).await });
        let (flags, listeners) = match sent.await {
            Ok(replies) => replies,
            Err(e) => return scan(&format!("cannot fence the subscription: {e}")),
        };
        match index.flags_say(flags.get("notify-keyspace-events").map_or("", String::as_str)) {
            index::FlagsSay::Sent => {}
            index::FlagsSay::Off => {
                // Keys may have been created unnotified: the index is no
                // longer known complete, until the subscriber finds the
                // flags back.
                index.gap();
                return scan("notify-keyspace-events no longer reports created keys and removals");
            }
            index::FlagsSay::Unconfirmed => {
                return scan(
                    "notify-keyspace-events changed to a value that cannot show `n`; the subscriber checks it",
                );
            }
        }
        if listeners == 0 {
            return scan("the subscription is not listening");
        }
        match fence.back(index::FENCE_WAIT).await {
            Ok(()) if leases.iter().all(|l| index.holds(*l)) => {
                tracing::debug!(pattern, "bulk operation served by the key index");
                Some(leases)
            }
            Ok(()) => scan("the key index went incomplete while fencing"),
            Err(lost) => scan(&lost.to_string()),
        }
    }
}

/// Keep the names of keys a page's replies say were changed, for the audit
/// sample: with one command per key (`PEXPIRE`), those whose reply counts;
/// with one command for the page (`UNLINK`), all of them only if all were
/// changed (the reply does not say which).
fn sample_changed(result: &mut BulkResult, keys: &[Vec<u8>], replies: &[Value], tally: &impl Fn(&Value) -> u64) {
    let room = BulkResult::SAMPLE.saturating_sub(result.sample.len());
    if room == 0 {
        return;
    }
    let changed: Vec<&Vec<u8>> = if replies.len() == keys.len() {
        keys.iter().zip(replies).filter(|(_, r)| tally(r) > 0).map(|(k, _)| k).collect()
    } else if replies.iter().map(tally).sum::<u64>() == keys.len() as u64 {
        keys.iter().collect()
    } else {
        Vec::new()
    };
    result.sample.extend(changed.into_iter().take(room).map(|k| String::from_utf8_lossy(k).into_owned()));
}

/// A bulk operation's plan, and what it has used of its limits so far
/// across every node's walk (the limits are for the whole operation).
struct Taking<'p, 'a> {
    plan: &'p BulkPlan<'a>,
    /// Keys sent and not answered yet, plus those Redis said it changed:
    /// what the plan's limit bounds, so that it is never passed even by
    /// pages in flight.
    committed: AtomicU64,
    examined: AtomicU64,
}

impl<'p, 'a> Taking<'p, 'a> {
    fn new(plan: &'p BulkPlan<'a>) -> Taking<'p, 'a> {
        Taking { plan, committed: AtomicU64::new(0), examined: AtomicU64::new(0) }
    }

    /// Whether `key` goes into the next pipeline: not if the plan refuses
    /// it (counted in `result`), nor if the limit has no room left for it.
    fn take_one(&self, key: &[u8], result: &mut BulkResult) -> Took {
        if !(self.plan.allow)(key) {
            result.refused += 1;
            return Took::Refused;
        }
        if self.committed.fetch_add(1, Ordering::Relaxed) < self.plan.limit || self.plan.whole_pages {
            return Took::Taken;
        }
        self.committed.fetch_sub(1, Ordering::Relaxed);
        Took::Full
    }

    /// `sent` keys were answered, `changed` of them changed.
    fn answered(&self, sent: u64, changed: u64) {
        self.committed.fetch_sub(sent.saturating_sub(changed), Ordering::Relaxed);
    }

    fn examined(&self, n: u64) {
        self.examined.fetch_add(n, Ordering::Relaxed);
    }

    /// Whether taking `n` more keys may reach the limit on keys changed
    /// (counting those in flight as changed).
    fn may_fill(&self, n: usize) -> bool {
        self.committed.load(Ordering::Relaxed).saturating_add(n as u64) >= self.plan.limit
    }

    /// A limit is reached: the walk stops at the end of this page.
    fn spent(&self) -> bool {
        self.committed.load(Ordering::Relaxed) >= self.plan.limit
            || self.examined.load(Ordering::Relaxed) >= self.plan.examine
    }
}

/// A `SCAN` reply: the next cursor, and the page's keys.
type ScanPage = (u64, Vec<Vec<u8>>);

/// The keys of a `SCAN` page that one of `walks` matches (the page's
/// `MATCH` is only their common prefix).
fn matching(walks: &[Glob], keys: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    keys.into_iter().filter(|k| walks.iter().any(|w| w.matches_bytes(k))).collect()
}

/// The page writes of a `SCAN` walk in flight ([`RedisBackend::scan`]),
/// oldest first, and what those settled said.
#[derive(Default)]
struct Writes {
    in_flight: std::collections::VecDeque<(Vec<Vec<u8>>, tokio::task::JoinHandle<Sent>)>,
    /// A write found the connection broken (and was retried): the walk's
    /// cursor may be another server's.
    broke: bool,
    /// The first write that failed.
    failed: Option<BackendError>,
}

/// A page's writes as sent: the replies, and whether the connection broke
/// on the way.
type Sent = (Result<Vec<Value>, BackendError>, bool);

impl Writes {
    /// Send `pipe`, the writes for `keys`, on a task of its own: redis-rs
    /// sends a request only while its future is polled, and the walk is
    /// meanwhile waiting for its next page.
    fn send(&mut self, keys: Vec<Vec<u8>>, pipe: redis::Pipeline, conn: &Conn, hint: Option<target::TopologyHint>) {
        let conn = conn.clone();
        let task = tokio::spawn(async move {
            let mut broke = false;
            let replies = retrying_noting(&mut broke, || async {
                pipe.query_async::<Vec<Value>>(&mut conn.clone())
                    .await
                    .inspect_err(|e| hint.iter().for_each(|h| h.saw(e)))
            })
            .await;
            (replies, broke)
        });
        self.in_flight.push_back((keys, task));
    }

    /// A write already settled broke or failed.
    fn troubled(&self) -> bool {
        self.broke || self.failed.is_some()
    }

    /// Wait for the oldest writes until at most `keep` are in flight, and
    /// count what each changed, as [`RedisBackend::scan`] did when a page's
    /// writes rode with the next `SCAN`.
    async fn settle(
        &mut self,
        keep: usize,
        taking: &Taking<'_, '_>,
        tally: &impl Fn(&Value) -> u64,
        result: &mut BulkResult,
    ) {
        while self.in_flight.len() > keep {
            let (keys, task) = self.in_flight.pop_front().expect("more than `keep` in flight");
            let (replies, broke) = task.await.unwrap_or_else(|e| {
                (Err(BackendError::Unavailable(format!("a bulk operation's writes were lost: {e}"))), false)
            });
            // Answered, or failed: either way a write may have reached Redis.
            taking.plan.step(BulkStep::After(&keys));
            self.broke |= broke;
            match replies {
                Ok(replies) => {
                    let changed = replies.iter().map(tally).sum::<u64>();
                    taking.answered(keys.len() as u64, changed);
                    result.affected += changed;
                    sample_changed(result, &keys, &replies, tally);
                }
                Err(e) => {
                    self.failed.get_or_insert(e);
                }
            }
        }
    }
}

/// What [`Taking::take_one`] did with a key.
enum Took {
    Taken,
    Refused,
    /// The limit has no room: the walk stops before this key.
    Full,
}

/// How a walk over the key index ended.
enum Walked {
    Complete,
    /// A limit stopped it after this key of this walk.
    Stopped((usize, Vec<u8>)),
    /// The index went incomplete: the rest must be scanned.
    Stale,
}

/// The `run_id` of the server behind `conn`: a `SCAN` cursor is valid
/// only on the server that gave it.
async fn run_id(conn: &Conn) -> Result<String, BackendError> {
    let info: String =
        retrying(|| async { redis::cmd("INFO").arg("server").query_async(&mut conn.clone()).await }).await?;
    Ok(info.lines().find_map(|l| l.strip_prefix("run_id:")).unwrap_or_default().trim().to_owned())
}

/// Name the node an error came from.
fn on_node(node: &Node, e: BackendError) -> BackendError {
    match e {
        BackendError::Unavailable(e) => BackendError::Unavailable(format!("{node}: {e}")),
        BackendError::Command(e) => BackendError::Command(format!("{node}: {e}")),
    }
}

/// A policy's `SCAN` cursor on a cluster: the shard's first slot in the
/// top 16 bits (a replica promoted in its place keeps the walk going), that
/// node's own cursor below (Redis's cursors stay under 2^48 for any table
/// a node can hold).
const NODE_SHIFT: u32 = 48;

/// Retry delays when the connection was found broken. The connection manager
/// reconnects in the background once a command fails on a dead connection
/// (after a Redis restart, say); the first commands after that must not be
/// lost to it. Every API call is safe to repeat: reads, idempotent writes,
/// and `SET NX` (a lock whose reply was lost just looks held).
const RETRY_DELAYS_MS: [u64; 4] = [20, 100, 300, 1000];

/// A bulk operation whose scan keeps being cut gives up after this many
/// fresh starts (its caller retries once Redis is steady).
const MAX_SCAN_RESTARTS: u32 = 10;

async fn retrying<T, F, Fut>(attempt: F) -> Result<T, BackendError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<T>>,
{
    retrying_noting(&mut false, attempt).await
}

/// [`retrying`], setting `broke` if the connection was found broken on the
/// way (whatever the final result): the caller may hold state that does not
/// survive a reconnect, such as a `SCAN` cursor.
async fn retrying_noting<T, F, Fut>(broke: &mut bool, mut attempt: F) -> Result<T, BackendError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<T>>,
{
    let mut delays = RETRY_DELAYS_MS.iter();
    loop {
        match attempt().await.map_err(failed) {
            Err(BackendError::Unavailable(e)) => match delays.next() {
                Some(ms) => {
                    *broke = true;
                    tracing::debug!(error = %e, retry_in_ms = ms, "redis connection broken; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(*ms)).await;
                }
                None => return Err(BackendError::Unavailable(e)),
            },
            other => return other,
        }
    }
}

/// Map a redis-rs error: connection trouble is "unavailable", anything else
/// a command failure.
pub fn failed(e: RedisError) -> BackendError {
    if is_connection_error(&e) { BackendError::Unavailable(describe(&e)) } else { BackendError::Command(describe(&e)) }
}

/// A redis-rs error as Redis said it: `WRONGTYPE Operation against a key
/// holding the wrong kind of value`. redis-rs's own Display quotes the code
/// (`"WRONGTYPE": ...`), and an error chain (`{:#}`) shows it twice, once
/// for the error and once for its source.
pub fn describe(e: &RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        _ => e.to_string(),
    }
}

/// Whether `e` says the connection failed (dropped, refused, timed out),
/// as opposed to Redis answering with an error: only the first is worth
/// retrying as it is.
pub fn is_connection_error(e: &RedisError) -> bool {
    e.is_connection_dropped() || e.is_io_error() || e.is_timeout() || e.is_connection_refusal()
}

/// A pipeline's replies as `query_async` gives them: an error reply is the
/// pipeline's error (raw replies keep them as values).
fn server_errors(replies: Vec<Value>) -> redis::RedisResult<Vec<Value>> {
    match replies.iter().find_map(|v| if let Value::ServerError(e) = v { Some(e.clone()) } else { None }) {
        Some(e) => Err(e.into()),
        None => Ok(replies),
    }
}

/// Keys per `MGET` command.
const MGET_BATCH: usize = 1000;

fn is_one(v: &Value) -> bool {
    matches!(v, Value::Int(1))
}

#[async_trait]
impl Backend for RedisBackend {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BackendError> {
        self.query(redis::cmd("GET").arg(key)).await
    }

    /// `MGET`s of at most [`MGET_BATCH`] keys, pipelined in one round trip:
    /// Redis answers each without blocking the others for long.
    async fn mget(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, BackendError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        if !self.target.is_cluster() {
            let mut pipe = redis::pipe();
            for chunk in keys.chunks(MGET_BATCH) {
                pipe.cmd("MGET").arg(chunk);
            }
            let replies: Vec<Vec<Option<Vec<u8>>>> =
                retrying(|| async { pipe.query_async(&mut self.conn.clone()).await }).await?;
            return Ok(replies.into_iter().flatten().collect());
        }
        // One `MGET` per slot's chunk, then the values put back in order.
        let mut at: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, key) in keys.iter().enumerate() {
            at.entry(key.as_str()).or_default().push(i);
        }
        let mut cmds = Vec::new();
        for group in target::by_slot(keys) {
            for chunk in group.chunks(MGET_BATCH) {
                cmds.push((chunk[0].as_bytes(), chunk.to_vec()));
            }
        }
        let sent = cmds.iter().map(|(key, chunk)| (vec![*key], redis::cmd("MGET").arg(chunk).clone())).collect();
        let replies = self.pipelined(sent).await?;
        let mut values = vec![None; keys.len()];
        for ((_, chunk), reply) in cmds.iter().zip(replies) {
            let got: Vec<Option<Vec<u8>>> =
                redis::from_redis_value(reply).map_err(|e| BackendError::Command(e.to_string()))?;
            for (key, value) in chunk.iter().zip(got) {
                for i in &at[key.as_str()] {
                    values[*i] = value.clone();
                }
            }
        }
        Ok(values)
    }

    async fn exists(&self, key: &str) -> Result<bool, BackendError> {
        self.query(redis::cmd("EXISTS").arg(key)).await
    }

    async fn ttl(&self, key: &str) -> Result<KeyTtl, BackendError> {
        let ms: i64 = self.query(redis::cmd("PTTL").arg(key)).await?;
        Ok(match ms {
            -2 => KeyTtl::Missing,
            -1 => KeyTtl::Persistent,
            ms => KeyTtl::ExpiresInMs(ms.max(0) as u64),
        })
    }

    async fn key_type(&self, key: &str) -> Result<Option<ValueKind>, BackendError> {
        let kind: String = self.query(redis::cmd("TYPE").arg(key)).await?;
        Ok(match kind.as_str() {
            "none" => None,
            "string" => Some(ValueKind::String),
            "list" => Some(ValueKind::List),
            "set" => Some(ValueKind::Set),
            "zset" => Some(ValueKind::Zset),
            "hash" => Some(ValueKind::Hash),
            "stream" => Some(ValueKind::Stream),
            _ => Some(ValueKind::Other),
        })
    }

    /// On a cluster, the cursor walks the primaries one after the other
    /// (see [`NODE_SHIFT`]); a topology change during a walk may skip or
    /// repeat keys, as a restarted server does on a single one.
    async fn scan(&self, cursor: u64, pattern: &str, count: u32) -> Result<ScanResult, BackendError> {
        let page = |c: u64| redis::cmd("SCAN").arg(c).arg("MATCH").arg(pattern).arg("COUNT").arg(count).clone();
        if !self.target.is_cluster() {
            return self.query(&page(cursor)).await;
        }
        let mut primaries = self.recent_primaries().await?;
        primaries.sort_by_key(Node::shard);
        let shard = (cursor >> NODE_SHIFT) as u16;
        // The shard's node, or the next one (a shard gone from the topology).
        let Some(at) = primaries.iter().position(|n| n.shard() >= shard) else { return Ok((0, Vec::new())) };
        let node = &primaries[at];
        let cursor = if node.shard() == shard { cursor } else { 0 };
        let mut conn = self.node_conn(node).await?;
        let (next, keys): ScanResult =
            page(cursor & ((1 << NODE_SHIFT) - 1)).query_async(&mut conn).await.map_err(|e| {
                self.node_conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&node.addr);
                on_node(node, self.node_failed(e))
            })?;
        if next >= 1 << NODE_SHIFT {
            return Err(BackendError::Command(format!("{node} answered a SCAN cursor too large to carry")));
        }
        let next = match (next, primaries.get(at + 1)) {
            (0, Some(following)) => u64::from(following.shard()) << NODE_SHIFT,
            (0, None) => 0,
            (n, _) => (u64::from(node.shard()) << NODE_SHIFT) | n,
        };
        Ok((next, keys))
    }

    async fn set(&self, key: &str, value: &[u8], options: &SetOptions) -> Result<bool, BackendError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value);
        match (options.ttl_ms, options.keep_ttl) {
            (Some(ms), _) => {
                cmd.arg("PX").arg(ms);
            }
            (None, true) => {
                cmd.arg("KEEPTTL");
            }
            (None, false) => {}
        }
        match options.condition {
            SetCondition::Always => {}
            SetCondition::IfAbsent => {
                cmd.arg("NX");
            }
            SetCondition::IfPresent => {
                cmd.arg("XX");
            }
        }
        let reply: Value = self.write(key.as_bytes(), cmd).await?;
        Ok(!matches!(reply, Value::Nil))
    }

    /// On a cluster, one `UNLINK` per slot.
    async fn del(&self, keys: &[String]) -> Result<u64, BackendError> {
        if !self.target.is_cluster() {
            return self.query(redis::cmd("UNLINK").arg(keys)).await;
        }
        let cmds = target::by_slot(keys)
            .into_iter()
            .map(|group| {
                let cmd = redis::cmd("UNLINK").arg(&group).clone();
                (group.into_iter().map(String::as_bytes).collect(), cmd)
            })
            .collect();
        Ok(self.pipelined(cmds).await?.iter().map(|v| if let Value::Int(n) = v { *n as u64 } else { 0 }).sum())
    }

    async fn expire(&self, key: &str, ttl_ms: u64, condition: ExpireCondition) -> Result<bool, BackendError> {
        let n: i64 = self.write(key.as_bytes(), pexpire(key, ttl_ms, condition)).await?;
        Ok(n == 1)
    }

    async fn persist(&self, key: &str) -> Result<bool, BackendError> {
        let n: i64 = self.write(key.as_bytes(), redis::cmd("PERSIST").arg(key).clone()).await?;
        Ok(n == 1)
    }

    /// One pipeline, one round trip.
    async fn expire_many(&self, items: &[QueuedExpire]) -> Result<Vec<bool>, BackendError> {
        let cmds = items
            .iter()
            .map(|item| (vec![item.key.as_bytes()], pexpire(&item.key, item.ttl_ms, item.condition)))
            .collect();
        Ok(self.pipelined(cmds).await?.iter().map(is_one).collect())
    }

    async fn delete_matching(&self, pattern: &str, plan: &BulkPlan<'_>) -> Result<BulkResult, BackendError> {
        self.bulk(
            std::slice::from_ref(&Glob::new(pattern)),
            plan,
            |pipe, keys| {
                pipe.cmd("UNLINK").arg(keys);
            },
            // `UNLINK` says how many of the scanned keys still existed.
            |v| if let Value::Int(n) = v { *n as u64 } else { 0 },
        )
        .await
    }

    async fn expire_matching(&self, rows: &[ExpireRow], plan: &BulkPlan<'_>) -> Result<BulkResult, BackendError> {
        let rows = Rows::new(rows);
        self.bulk(
            rows.globs(),
            plan,
            |pipe, keys| {
                for (key, row) in keys.iter().filter_map(|k| Some((k, rows.row_of(k)?))) {
                    pipe.add_command(pexpire(key, row.ttl_ms, Rows::condition(row)));
                }
            },
            |v| u64::from(is_one(v)),
        )
        .await
    }

    async fn lock_acquire(&self, name: &str, ttl_ms: u64) -> Result<Option<String>, BackendError> {
        let token = format!("{:032x}", rand::random::<u128>());
        let cmd = redis::cmd("SET").arg(name).arg(&token).arg("NX").arg("PX").arg(ttl_ms).clone();
        let reply: Value = self.write(name.as_bytes(), cmd).await?;
        Ok(if matches!(reply, Value::Nil) { None } else { Some(token) })
    }

    async fn lock_release(&self, name: &str, token: &str) -> Result<bool, BackendError> {
        let n: i64 = self.release.key(name).arg(token).invoke_async(&mut self.conn.clone()).await.map_err(failed)?;
        Ok(n == 1)
    }

    fn now_ms(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }
}

/// `PEXPIRE key ms [condition]`.
fn pexpire(key: impl redis::ToRedisArgs, ttl_ms: u64, condition: ExpireCondition) -> redis::Cmd {
    let mut cmd = redis::cmd("PEXPIRE");
    cmd.arg(key).arg(ttl_ms);
    if let Some(flag) = expire_flag(condition) {
        cmd.arg(flag);
    }
    cmd
}

/// The `PEXPIRE` option for a condition.
pub fn expire_flag(condition: ExpireCondition) -> Option<&'static str> {
    match condition {
        ExpireCondition::Always => None,
        ExpireCondition::IfPersistent => Some("NX"),
        ExpireCondition::IfVolatile => Some("XX"),
        ExpireCondition::IfLonger => Some("GT"),
        ExpireCondition::IfShorter => Some("LT"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redis_error_is_said_once_as_redis_said_it() {
        let Value::ServerError(e) =
            redis::parse_redis_value(b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n")
                .unwrap()
        else {
            panic!("an error reply")
        };
        let e = RedisError::from(e);
        assert_eq!(describe(&e), "WRONGTYPE Operation against a key holding the wrong kind of value");
        assert_eq!(
            failed(e),
            BackendError::Command("WRONGTYPE Operation against a key holding the wrong kind of value".into())
        );
    }

    #[test]
    fn the_audit_sample_names_only_keys_redis_says_were_changed() {
        let keys: Vec<Vec<u8>> = ["a", "b", "c"].iter().map(|k| k.as_bytes().to_vec()).collect();
        let count = |v: &Value| match v {
            Value::Int(n) => *n as u64,
            _ => 0,
        };
        // One PEXPIRE per key: `b` already had its TTL.
        let mut result = BulkResult::default();
        sample_changed(&mut result, &keys, &[Value::Int(1), Value::Int(0), Value::Int(1)], &count);
        assert_eq!(result.sample, ["a", "c"]);
        // One UNLINK for the page: names only when all went.
        let mut all = BulkResult::default();
        sample_changed(&mut all, &keys, &[Value::Int(3)], &count);
        assert_eq!(all.sample, ["a", "b", "c"]);
        let mut some = BulkResult::default();
        sample_changed(&mut some, &keys, &[Value::Int(2)], &count);
        assert!(some.sample.is_empty(), "which two is not known");
    }
}
