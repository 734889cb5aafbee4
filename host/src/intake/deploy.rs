//! Deploy hooks: a Redis Stream read through a consumer group.
//!
//! CI/CD writes one entry per deploy (`cachepol deploy`, or any `XADD`):
//!
//! | field     | value                                             |
//! |-----------|---------------------------------------------------|
//! | `service` | the service that went live (required)             |
//! | `files`   | JSON list of changed paths, `["app.py"]`          |
//! | `tags`    | JSON object `{"genre": "dance"}`, or a JSON list of `"name=value"` strings when a name repeats |
//! | `id`      | the sender's id for the hook (default: the entry id) |
//!
//! Durability is the point of a stream over pub/sub: an entry is
//! acknowledged (`XACK`) only after every subscribed policy handled it. At
//! start, and again whenever Redis was unreachable, the daemon first
//! re-reads all its own unacknowledged entries (a crash mid-hook, an ack lost
//! to a broken connection), then claims entries other consumers left pending
//! too long (`XAUTOCLAIM`, cursor followed to the end), then reads new ones.
//! An entry being handled is kept claimed (`XCLAIM ... JUSTID` every third
//! of `claim_idle_ms`), so another daemon never takes over a hook that is
//! merely slow.
//!
//! Failures, by kind: a hook that fails while Redis is unreachable is tried
//! again once Redis answers, without spending an attempt; one refused by a
//! grant is dead-lettered at once (it would be refused the same way again);
//! any other failure is retried with backoff, only by the policies that
//! failed it, and after `max_attempts` the hook is moved to the dead-letter
//! stream with the reason, as is a malformed entry at once. The loop never
//! stops on bad input, and a stream or group that vanished (Redis restarted
//! empty, `FLUSHALL`, eviction) is created again.
//!
//! A hook with an `id` runs once by that id, whatever the retries: the
//! publisher ([`publish`]: the webhook, `cachepol deploy`) appends it only
//! if `<stream>:id:<id>` is free, and sets that key to its stream id for
//! [`HOOK_ID_TTL`] (a duplicate gets the first stream id back); the reader
//! marks a hook handled (`<stream>:done:<group>:<id>`, same TTL) before
//! acknowledging it and acknowledges without running one already marked
//! (an `XACK` Redis refused, the same id appended by hand). A dead-lettered
//! hook is not marked: `cachepol dead-letter replay` runs it again.
//!
//! The deploy stream is trimmed to about `deploy.max_len` entries, but
//! never past an entry a consumer group has not been delivered or has not
//! acknowledged ([`TRIM`]): a backlog (no daemon reading, hooks failing)
//! keeps every hook, however long. The dead letters are trimmed with
//! `MAXLEN ~` (`deploy.dead_letter_max_len`). Policies should be
//! idempotent: after a crash, a hook that some policies had already
//! handled is delivered again to all of them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::store::target::Conn;
use arc_swap::ArcSwap;
use redis::streams::{StreamId, StreamPendingCountReply};
use redis::{AsyncCommands, RedisResult, Value};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, warn};

use crate::config::DeployConfig;
use crate::dispatch::queue::{FailureKind, HookFailure};
use crate::dispatch::routes::Routes;
use crate::dispatch::switches::Switches;
use crate::intake::events::Backoff;
use crate::metrics::{Metrics, Readiness, metrics};
use crate::store::redis::is_connection_error;
use crate::wit::DeployEvent;

/// Entries read per `XREADGROUP`, and claimed per `XAUTOCLAIM`: one. Only
/// the entry in hand is kept claimed by the heartbeat; a batch would leave
/// the rest idling while the first is handled, for another daemon to claim
/// and handle too. Hooks are rare; a round trip each costs nothing.
const BATCH: usize = 1;
/// How long one `XREADGROUP` blocks waiting for new entries.
const BLOCK_MS: usize = 1000;
/// Longest wait between tries while Redis is away, so that hooks pending
/// when it comes back are handled within about this long.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Tries of a hook whose failures all came from Redis being away; these do
/// not spend attempts, but a Redis that keeps dropping the policy's calls
/// while answering the reader must not keep a hook forever.
const MAX_UNAVAILABLE_RETRIES: u32 = 20;

/// Parse a stream entry into a deploy event, or say why it is malformed.
pub fn parse_entry(entry: &StreamId) -> Result<DeployEvent, String> {
    let field = |name: &str| -> Result<Option<String>, String> {
        match entry.map.get(name) {
            None => Ok(None),
            Some(v) => redis::from_redis_value::<String>(v.clone())
                .map(Some)
                .map_err(|_| format!("field `{name}` is not text")),
        }
    };
    let service = field("service")?.filter(|s| !s.trim().is_empty()).ok_or("missing field `service`")?;
    let files = match field("files")? {
        None => Vec::new(),
        Some(text) => serde_json::from_str::<Vec<String>>(&text)
            .map_err(|e| format!("field `files` must be a JSON list of strings: {e}"))?,
    };
    let tags = match field("tags")? {
        None => Vec::new(),
        Some(text) => parse_tags(&text)?,
    };
    let id = field("id")?.unwrap_or_else(|| entry.id.clone());
    Ok(DeployEvent { id, service, files, tags })
}

fn parse_tags(text: &str) -> Result<Vec<(String, String)>, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("field `tags` is not JSON: {e}"))?;
    tags_from_json(value)
}

/// Tags given as JSON: an object of strings, or a list of `"name=value"`
/// strings (when a name repeats). Shared with the deploy webhook.
pub fn tags_from_json(value: serde_json::Value) -> Result<Vec<(String, String)>, String> {
    let bad = || "field `tags` must be a JSON object of strings or a list of \"name=value\" strings".to_owned();
    match value {
        serde_json::Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| {
                // The stream carries tags as `name=value` words: a name
                // must survive the split.
                if k.is_empty() || k.contains('=') {
                    return Err(format!("tag name `{}` must be non-empty and without `=`", k.escape_debug()));
                }
                v.as_str().map(|v| (k.clone(), v.to_owned())).ok_or_else(bad)
            })
            .collect(),
        serde_json::Value::Array(items) => items
            .into_iter()
            .map(|item| {
                let s = item.as_str().ok_or_else(bad)?;
                match s.split_once('=') {
                    Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
                    _ => Err(format!("tag `{}` is not of the form name=value", s.escape_debug())),
                }
            })
            .collect(),
        _ => Err(bad()),
    }
}

/// Tags as `name=value` words: how the stream carries them, and how log
/// lines show them.
fn tag_words(tags: &[(String, String)]) -> Vec<String> {
    tags.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// The stream entry's fields for a hook: what [`parse_entry`] reads back
/// as the same hook.
pub fn entry_fields(
    service: &str,
    files: &[String],
    tags: &[(String, String)],
    id: Option<&str>,
) -> Vec<(&'static str, String)> {
    let mut fields = vec![
        ("service", service.to_owned()),
        ("files", serde_json::to_string(files).unwrap_or_default()),
        ("tags", serde_json::to_string(&tag_words(tags)).unwrap_or_default()),
    ];
    if let Some(id) = id {
        fields.push(("id", id.to_owned()));
    }
    fields
}

/// How long a hook's id is remembered (published, and handled): a sender
/// retrying the same id within it gets the first hook's stream id back,
/// and a redelivered hook is acknowledged without running again.
pub const HOOK_ID_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where the first stream id of hook `id` is kept.
pub fn id_key(stream: &str, id: &str) -> String {
    format!("{stream}:id:{id}")
}

/// Where hook `id` is marked handled by consumer group `group`: each
/// group (a fleet of daemons reading the stream) handles every hook once.
pub fn done_key(stream: &str, group: &str, id: &str) -> String {
    format!("{stream}:done:{group}:{id}")
}

/// Lua: `trim(stream, max_len)` trims the stream to about `max_len`
/// entries, oldest first, but keeps every entry from the oldest one a
/// consumer group still needs: its oldest pending entry, or the one after
/// its last delivered. Without any group nothing has been delivered, so
/// nothing is trimmed (a daemon's group is created at `0`). Entries older
/// than that were delivered and acknowledged by every group. `XRANGE` up to
/// that entry costs what it trims.
pub const TRIM: &str = r"
local function id_less(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local function trim(stream, max_len)
  max_len = tonumber(max_len)
  if max_len <= 0 then return end
  local excess = redis.call('XLEN', stream) - max_len
  if excess <= 0 then return end
  local groups = redis.call('XINFO', 'GROUPS', stream)
  if #groups == 0 then return end
  -- The oldest entry a group still needs (nil: none).
  local floor = nil
  for _, group in ipairs(groups) do
    local info = {}
    for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
    local need
    if info['pending'] > 0 then
      need = redis.call('XPENDING', stream, info['name'])[2]
    else
      local after = redis.call('XRANGE', stream, '(' .. info['last-delivered-id'], '+', 'COUNT', 1)[1]
      need = after and after[1]
    end
    if need and (floor == nil or id_less(need, floor)) then floor = need end
  end
  local older = redis.call('XRANGE', stream, '-', floor and ('(' .. floor) or '+', 'COUNT', excess)
  if #older > 0 then
    -- Drop exactly those: keep from just after the last of them.
    local ms, seq = string.match(older[#older][1], '^(%d+)-(%d+)$')
    redis.call('XTRIM', stream, 'MINID', ms .. '-' .. string.format('%d', tonumber(seq) + 1))
  end
end
";

/// Append a hook unless its id was published already: KEYS stream and the
/// id's key (when the hook has an id); ARGV max_len, the id's TTL in ms,
/// then the entry's fields and values. Returns the stream id, the first
/// one for a duplicate.
const PUBLISH: &str = r"
if KEYS[2] then
  local first = redis.call('GET', KEYS[2])
  if first then return first end
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
if KEYS[2] then redis.call('SET', KEYS[2], id, 'PX', ARGV[2]) end
trim(KEYS[1], ARGV[1])
return id
";

static PUBLISH_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(&format!("{TRIM}{PUBLISH}")));

/// Write one deploy hook (what `cachepol deploy` does), trimming the stream
/// to about `max_len` entries (0: no trimming) without dropping one not yet
/// handled ([`TRIM`]); returns its stream id. A hook whose `id` was
/// published within [`HOOK_ID_TTL`] is not appended again: the first one's
/// stream id is returned.
pub async fn publish(
    conn: &mut Conn,
    stream: &str,
    max_len: usize,
    service: &str,
    files: &[String],
    tags: &[(String, String)],
    id: Option<&str>,
) -> RedisResult<String> {
    let mut script = PUBLISH_SCRIPT.key(stream);
    if let Some(id) = id {
        script.key(id_key(stream, id));
    }
    script.arg(max_len).arg(HOOK_ID_TTL.as_millis() as u64);
    for (field, value) in entry_fields(service, files, tags, id) {
        script.arg(field).arg(value);
    }
    script.invoke_async(conn).await
}

/// The consumer-group reader.
pub struct DeployConsumer {
    pub conn: Conn,
    pub settings: DeployConfig,
    pub routes: Arc<ArcSwap<Routes>>,
    /// Hooks are read by the daemon holding the keyspace-event lease: one
    /// daemon writes at a time, so its echo suppression sees every write
    /// of its policies ([`crate::intake::lease`]).
    pub switches: Arc<Switches>,
}

/// How a round of work ended.
enum Handled {
    Done,
    /// Shutdown came first; the entry stays pending for the next start.
    Interrupted,
}

impl DeployConsumer {
    /// Run until `shutdown`; an entry being handled then is finished (or
    /// left pending if its policies were stopped) before returning.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::with_max(MAX_BACKOFF);
        // Re-read our own pending entries (and make sure the group exists):
        // at start, and after any trouble talking to Redis.
        let mut catch_up = true;
        let mut failing = false;
        let mut last_claim: Option<tokio::time::Instant> = None;
        info!(stream = %self.settings.stream, group = %self.settings.group, consumer = %self.settings.consumer, "reading deploy hooks");
        while !shutdown.is_cancelled() {
            if self.switches.standing_by() {
                // Standing by is ready: able to take over.
                Readiness::set(&metrics().ready.deploy_reader, true);
                catch_up = true;
                if let Handled::Interrupted = pause(&shutdown, Duration::from_millis(200)).await {
                    break;
                }
                continue;
            }
            match self.round(&mut catch_up, &mut last_claim, &shutdown).await {
                Ok(Handled::Interrupted) => break,
                Ok(Handled::Done) => {
                    Readiness::set(&metrics().ready.deploy_reader, true);
                    if failing {
                        info!(stream = %self.settings.stream, "deploy stream reachable again");
                        failing = false;
                    }
                    backoff.reset();
                }
                Err(e) => {
                    catch_up = true;
                    Readiness::set(&metrics().ready.deploy_reader, false);
                    metrics().redis_errors.inc();
                    if !failing {
                        let why = if e.code() == Some("NOGROUP") {
                            "the deploy stream or its group is gone (Redis restarted empty, FLUSHALL, eviction); creating it again"
                        } else {
                            "cannot read the deploy stream; retrying with backoff"
                        };
                        warn!(error = %e, stream = %self.settings.stream, "{why}");
                        failing = true;
                    }
                    if let Handled::Interrupted = pause(&shutdown, backoff.next_delay()).await {
                        break;
                    }
                }
            }
        }
        Readiness::set(&metrics().ready.deploy_reader, false);
    }

    /// One round: catch up if needed, claim stale entries when due, then
    /// read and handle new ones.
    async fn round(
        &mut self,
        catch_up: &mut bool,
        last_claim: &mut Option<tokio::time::Instant>,
        shutdown: &CancellationToken,
    ) -> RedisResult<Handled> {
        if *catch_up {
            self.setup().await?;
            if let Handled::Interrupted = self.replay_own(shutdown).await? {
                return Ok(Handled::Interrupted);
            }
            *catch_up = false;
        }
        if last_claim.is_none_or(|at| at.elapsed() >= self.claim_every()) {
            *last_claim = Some(tokio::time::Instant::now());
            if let Handled::Interrupted = self.claim_stale(shutdown).await? {
                return Ok(Handled::Interrupted);
            }
        }
        let entries = tokio::select! {
            _ = shutdown.cancelled() => return Ok(Handled::Interrupted),
            r = self.read(">") => r?,
        };
        self.handle_all(entries, None, shutdown).await
    }

    /// How often stale entries of other consumers are looked for.
    fn claim_every(&self) -> Duration {
        Duration::from_millis(self.settings.claim_idle_ms / 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
    }

    /// Create the group if it does not exist, and the stream with it. At
    /// `0`, so that hooks written before the first daemon started (or
    /// between a Redis restart and our reconnect) are handled too.
    async fn setup(&mut self) -> RedisResult<()> {
        let created: RedisResult<()> =
            self.conn.xgroup_create_mkstream(&self.settings.stream, &self.settings.group, "0").await;
        match created {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Ok(()) => {
                info!(stream = %self.settings.stream, group = %self.settings.group, "created the deploy consumer group");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// `XREADGROUP` from `from` (`>`: new entries, blocking a while; an id:
    /// our own pending entries after it).
    async fn read(&mut self, from: &str) -> RedisResult<Vec<StreamId>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(&self.settings.group).arg(&self.settings.consumer).arg("COUNT").arg(BATCH);
        if from == ">" {
            cmd.arg("BLOCK").arg(BLOCK_MS);
        }
        cmd.arg("STREAMS").arg(&self.settings.stream).arg(from);
        let reply: Value = cmd.query_async(&mut self.conn).await?;
        Ok(read_reply_entries(reply))
    }

    /// How often each of these pending entries was delivered already.
    async fn delivery_counts(&mut self, entries: &[StreamId]) -> RedisResult<HashMap<String, usize>> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else { return Ok(HashMap::new()) };
        let reply: StreamPendingCountReply = self
            .conn
            .xpending_consumer_count(
                &self.settings.stream,
                &self.settings.group,
                &first.id,
                &last.id,
                entries.len(),
                &self.settings.consumer,
            )
            .await?;
        Ok(reply.ids.into_iter().map(|p| (p.id, p.times_delivered)).collect())
    }

    /// Handle entries in order; with `counts`, each has already been
    /// delivered that many times (a re-read or a claim counts as one).
    async fn handle_all(
        &mut self,
        entries: Vec<StreamId>,
        counts: Option<HashMap<String, usize>>,
        shutdown: &CancellationToken,
    ) -> RedisResult<Handled> {
        for entry in entries {
            let before = counts.as_ref().map_or(0, |c| c.get(&entry.id).copied().unwrap_or(1).saturating_sub(1));
            if let Handled::Interrupted = self.handle(entry, before as u32, shutdown).await? {
                return Ok(Handled::Interrupted);
            }
        }
        Ok(Handled::Done)
    }

    /// Every entry delivered to us and not acknowledged, page by page.
    async fn replay_own(&mut self, shutdown: &CancellationToken) -> RedisResult<Handled> {
        let mut after = "0".to_owned();
        let mut total = 0;
        loop {
            let entries = self.read(&after).await?;
            let Some(last) = entries.last() else { break };
            after = last.id.clone();
            if total == 0 {
                info!("re-handling deploy hooks left unacknowledged (a previous run died, or Redis went away)");
            }
            total += entries.len();
            let counts = self.delivery_counts(&entries).await?;
            if let Handled::Interrupted = self.handle_all(entries, Some(counts), shutdown).await? {
                return Ok(Handled::Interrupted);
            }
        }
        Ok(Handled::Done)
    }

    /// Take over entries other consumers left pending for too long,
    /// following `XAUTOCLAIM`'s cursor to the end.
    async fn claim_stale(&mut self, shutdown: &CancellationToken) -> RedisResult<Handled> {
        let mut cursor = "0-0".to_owned();
        loop {
            let reply: Value = redis::cmd("XAUTOCLAIM")
                .arg(&self.settings.stream)
                .arg(&self.settings.group)
                .arg(&self.settings.consumer)
                .arg(self.settings.claim_idle_ms)
                .arg(&cursor)
                .arg("COUNT")
                .arg(BATCH)
                .query_async(&mut self.conn)
                .await?;
            let claimed = autoclaim_reply(reply);
            if let Handled::Interrupted = self.handle_all(claimed.trimmed, None, shutdown).await? {
                return Ok(Handled::Interrupted);
            }
            if !claimed.entries.is_empty() {
                info!(count = claimed.entries.len(), "claimed deploy hooks another consumer left pending");
                let counts = self.delivery_counts(&claimed.entries).await?;
                if let Handled::Interrupted = self.handle_all(claimed.entries, Some(counts), shutdown).await? {
                    return Ok(Handled::Interrupted);
                }
            }
            match claimed.cursor {
                Some(next) if next != "0-0" => cursor = next,
                _ => return Ok(Handled::Done),
            }
        }
    }

    /// Handle one entry: deliver, wait, retry the failures, ack or
    /// dead-letter. Kept claimed meanwhile.
    async fn handle(
        &mut self,
        entry: StreamId,
        attempts_before: u32,
        shutdown: &CancellationToken,
    ) -> RedisResult<Handled> {
        let span = tracing::info_span!("deploy", entry = %entry.id);
        let _heartbeat = Heartbeat::start(self.conn.clone(), &self.settings, &entry.id);
        self.handle_in_span(entry, attempts_before, shutdown).instrument(span).await
    }

    async fn handle_in_span(
        &mut self,
        entry: StreamId,
        attempts_before: u32,
        shutdown: &CancellationToken,
    ) -> RedisResult<Handled> {
        if entry.map.is_empty() {
            let reason = "deleted from the stream before it was handled (trimmed past deploy.max_len, or XDEL)";
            warn!(reason, "deploy hook lost its contents: moved to the dead-letter stream");
            return self.dead_letter(&entry, reason, Failed::none(attempts_before), shutdown).await;
        }
        let event = match parse_entry(&entry) {
            Ok(event) => event,
            Err(reason) => {
                warn!(%reason, "malformed deploy hook: moved to the dead-letter stream");
                return self.dead_letter(&entry, &reason, Failed::none(attempts_before), shutdown).await;
            }
        };
        // Only a hook its sender named (an `id` field) is marked: one without
        // asked for no de-duplication, and a marker per hook would fill the
        // keyspace with one key per deploy for a week.
        let done_key =
            entry.map.contains_key("id").then(|| done_key(&self.settings.stream, &self.settings.group, &event.id));
        let handled: Option<String> = match &done_key {
            Some(key) => redis::cmd("GET").arg(key).query_async(&mut self.conn).await?,
            None => None,
        };
        if let Some(first) = handled {
            info!(hook = %event.id, first_entry = %first, "deploy hook already handled under this id: acknowledged without running it again");
            Metrics::count(&metrics().deploy_hooks, "duplicate");
            return self.ack(&entry, shutdown).await;
        }
        let max = self.settings.max_attempts.max(1);
        if attempts_before >= max {
            let reason = format!("gave up after {attempts_before} deliveries (the last ones were interrupted)");
            return self.dead_letter(&entry, &reason, Failed::none(attempts_before), shutdown).await;
        }
        let mut remaining: Vec<Arc<str>> =
            self.routes.load().deploy_targets(&event.service).iter().map(|r| r.name.clone()).collect();
        info!(service = %event.service, files = event.files.len(), tags = %tag_words(&event.tags).join(" "), policies = %remaining.join(" "), "deploy hook");
        // Refusals by a grant: final, and reported with the rest.
        let mut denied: Vec<(Arc<str>, HookFailure)> = Vec::new();
        let mut attempt = attempts_before;
        let mut unavailable_retries = 0;
        let mut backoff = Duration::from_millis(500);
        loop {
            attempt += 1;
            let failed = match self.attempt(&event, &remaining, shutdown).await {
                Some(failed) => failed,
                None => return Ok(Handled::Interrupted),
            };
            // Lost the lease meanwhile (the policies' writes stopped with
            // it): the hook is the new holder's, left pending for it to
            // claim; neither acknowledged, retried nor dead-lettered here.
            if self.switches.standing_by() {
                warn!(hook = %event.id, "this daemon lost its lease while handling the deploy hook: left pending (not acknowledged) for the new holder");
                return Ok(Handled::Done);
            }
            let (now_denied, retry): (Vec<_>, Vec<_>) =
                failed.into_iter().partition(|(_, f)| f.kind == FailureKind::Denied);
            denied.extend(now_denied);
            remaining = retry.iter().map(|(n, _)| n.clone()).collect();
            if retry.is_empty() {
                if denied.is_empty() {
                    // Marked before the ack: a refused or lost ack brings
                    // the hook back, and it must not run twice.
                    if let Some(done_key) = &done_key {
                        let _: () = redis::cmd("SET")
                            .arg(done_key)
                            .arg(&entry.id)
                            .arg("PX")
                            .arg(HOOK_ID_TTL.as_millis() as u64)
                            .query_async(&mut self.conn)
                            .await?;
                    }
                    let acked = self.ack(&entry, shutdown).await;
                    if matches!(acked, Ok(Handled::Done)) {
                        Metrics::count(&metrics().deploy_hooks, "acked");
                    }
                    return acked;
                }
                let reason = format!("refused by a grant (not retried): {}", reasons(&denied));
                return self.dead_letter(&entry, &reason, Failed::of(&denied, attempt), shutdown).await;
            }
            if retry.iter().all(|(_, f)| f.kind == FailureKind::RedisUnavailable)
                && unavailable_retries < MAX_UNAVAILABLE_RETRIES
            {
                unavailable_retries += 1;
                attempt -= 1;
                info!(policies = %remaining.join(" "), "Redis was unreachable during the hook; trying again once it answers (no attempt spent)");
                if let Handled::Interrupted = self.wait_for_redis(shutdown).await {
                    return Ok(Handled::Interrupted);
                }
                // Redis may answer a PING while still loading its data.
                if let Handled::Interrupted = pause(shutdown, Duration::from_millis(250)).await {
                    return Ok(Handled::Interrupted);
                }
                continue;
            }
            warn!(attempt, max, failed = %remaining.join(" "), "deploy hook failed");
            if attempt >= max {
                let all: Vec<_> = retry.into_iter().chain(denied).collect();
                let reason = format!("failed {max} times: {}", reasons(&all));
                return self.dead_letter(&entry, &reason, Failed::of(&all, max), shutdown).await;
            }
            Metrics::count(&metrics().deploy_hooks, "retried");
            if let Handled::Interrupted = pause(shutdown, backoff).await {
                return Ok(Handled::Interrupted);
            }
            backoff *= 2;
        }
    }

    /// Deliver `event` to the named policies as they are now (a policy
    /// swapped, unloaded or re-added since the last attempt is found, or
    /// not, as it is now) and wait. The failures, or `None` on shutdown.
    async fn attempt(
        &self,
        event: &DeployEvent,
        names: &[Arc<str>],
        shutdown: &CancellationToken,
    ) -> Option<Vec<(Arc<str>, HookFailure)>> {
        let routes = self.routes.load_full();
        let waits: Vec<_> = names
            .iter()
            .filter_map(|name| routes.get(name))
            .map(|route| (route.name.clone(), Routes::deploy_to(route, event.clone())))
            .collect();
        let mut failed = Vec::new();
        for (name, rx) in waits {
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed.push((name, e)),
                // The policy's queue closed before handling it.
                Err(_) if shutdown.is_cancelled() => return None,
                // Unloaded (its file was deleted): it no longer subscribes,
                // so the hook no longer waits for it.
                Err(_) if self.routes.load().get(&name).is_none() => {
                    info!(policy = %name, "policy unloaded before handling the hook; not waiting for it");
                }
                Err(_) => failed.push((name, HookFailure::failed("the policy's queue closed before handling it"))),
            }
        }
        Some(failed)
    }

    /// Wait until Redis answers a `PING` (or shutdown).
    async fn wait_for_redis(&mut self, shutdown: &CancellationToken) -> Handled {
        let mut backoff = Backoff::with_max(MAX_BACKOFF);
        loop {
            if redis::cmd("PING").query_async::<Value>(&mut self.conn).await.is_ok() {
                Readiness::set(&metrics().ready.deploy_reader, true);
                return Handled::Done;
            }
            // Stuck on a hook until Redis answers: not reading new ones.
            Readiness::set(&metrics().ready.deploy_reader, false);
            if let Handled::Interrupted = pause(shutdown, backoff.next_delay()).await {
                return Handled::Interrupted;
            }
        }
    }

    /// Acknowledge, retrying while Redis is away: an ack lost to a broken
    /// connection would leave the hook to be handled again much later.
    async fn ack(&mut self, entry: &StreamId, shutdown: &CancellationToken) -> RedisResult<Handled> {
        let mut backoff = Backoff::with_max(MAX_BACKOFF);
        let mut logged = false;
        loop {
            let acked: RedisResult<i64> =
                self.conn.xack(&self.settings.stream, &self.settings.group, &[&entry.id]).await;
            match acked {
                Ok(_) => return Ok(Handled::Done),
                // The group is gone (Redis restarted empty): so is the entry.
                Err(e) if e.code() == Some("NOGROUP") => return Err(e),
                // Redis refused (an ACL, a read-only replica after a failover):
                // retrying will not help. The entry stays pending; it is
                // claimed and handled again once idle, and the reader goes on.
                Err(e) if !is_connection_error(&e) => {
                    error!(error = %e, entry = %entry.id, "Redis refused to acknowledge the deploy hook; it stays pending and will be handled again");
                    return Ok(Handled::Done);
                }
                Err(e) => {
                    if !logged {
                        warn!(error = %e, "cannot acknowledge the deploy hook; retrying until Redis answers");
                        logged = true;
                    }
                    if let Handled::Interrupted = pause(shutdown, backoff.next_delay()).await {
                        return Ok(Handled::Interrupted);
                    }
                }
            }
        }
    }

    /// Park an entry with the reason, then acknowledge it. If the dead
    /// letter cannot be written the entry stays pending, and is re-read
    /// once Redis answers.
    async fn dead_letter(
        &mut self,
        entry: &StreamId,
        reason: &str,
        failed: Failed,
        shutdown: &CancellationToken,
    ) -> RedisResult<Handled> {
        let mut fields: Vec<(String, Value)> = vec![
            ("reason".into(), Value::SimpleString(reason.to_owned())),
            ("entry".into(), Value::SimpleString(entry.id.clone())),
            ("stream".into(), Value::SimpleString(self.settings.stream.clone())),
            ("policies".into(), Value::SimpleString(failed.policies)),
            ("attempts".into(), Value::Int(i64::from(failed.attempts))),
        ];
        let mut original: Vec<(&String, &Value)> = entry.map.iter().collect();
        original.sort_by(|a, b| a.0.cmp(b.0));
        fields.extend(original.into_iter().map(|(k, v)| (format!("original.{k}"), v.clone())));
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.settings.dead_letter);
        if self.settings.dead_letter_max_len > 0 {
            cmd.arg("MAXLEN").arg("~").arg(self.settings.dead_letter_max_len);
        }
        cmd.arg("*");
        for (k, v) in &fields {
            cmd.arg(k);
            match v {
                Value::BulkString(b) => cmd.arg(b),
                Value::SimpleString(s) => cmd.arg(s),
                Value::Int(n) => cmd.arg(n),
                _ => cmd.arg(""),
            };
        }
        let id: String = match cmd.query_async(&mut self.conn).await {
            Ok(id) => id,
            // As with an ack Redis refuses: leave it pending (claimed and
            // tried again once idle) rather than stop reading new hooks.
            Err(e) if !is_connection_error(&e) => {
                error!(error = %e, entry = %entry.id, dead_letter = %self.settings.dead_letter, %reason, "Redis refused the dead letter; the deploy hook stays pending and will be tried again");
                return Ok(Handled::Done);
            }
            Err(e) => return Err(e),
        };
        warn!(dead_letter = %self.settings.dead_letter, id = %id, %reason, "deploy hook dead-lettered");
        Metrics::count(&metrics().deploy_hooks, "dead_lettered");
        self.ack(entry, shutdown).await
    }
}

/// Sleep `delay`, unless shutdown comes first.
async fn pause(shutdown: &CancellationToken, delay: Duration) -> Handled {
    tokio::select! {
        _ = shutdown.cancelled() => Handled::Interrupted,
        _ = tokio::time::sleep(delay) => Handled::Done,
    }
}

/// `policy: reason; policy: reason`.
/// Who failed a dead-lettered hook, and after how many deliveries: the
/// `policies` and `attempts` fields of its dead letter.
struct Failed {
    /// Space-separated names; empty when no policy was at fault (a
    /// malformed entry).
    policies: String,
    attempts: u32,
}

impl Failed {
    fn none(attempts: u32) -> Failed {
        Failed { policies: String::new(), attempts }
    }

    fn of(failures: &[(Arc<str>, HookFailure)], attempts: u32) -> Failed {
        let names: Vec<&str> = failures.iter().map(|(name, _)| &**name).collect();
        Failed { policies: names.join(" "), attempts }
    }
}

fn reasons(failures: &[(Arc<str>, HookFailure)]) -> String {
    failures.iter().map(|(name, f)| format!("{name}: {f}")).collect::<Vec<_>>().join("; ")
}

/// Keeps a pending entry claimed by us while it is handled: another
/// consumer claims entries idle for `claim_idle_ms`, and a hook may take
/// longer than that to handle (attempts x wall budget + backoff). Stops
/// when dropped.
struct Heartbeat(tokio::task::JoinHandle<()>);

impl Heartbeat {
    fn start(mut conn: Conn, settings: &DeployConfig, id: &str) -> Heartbeat {
        let every = Duration::from_millis((settings.claim_idle_ms / 3).max(100));
        let min_idle = settings.claim_idle_ms / 2;
        let (stream, group, consumer, id) =
            (settings.stream.clone(), settings.group.clone(), settings.consumer.clone(), id.to_owned());
        Heartbeat(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                // Resets the entry's idle time; JUSTID leaves its delivery
                // count alone.
                let touched: RedisResult<Value> = redis::cmd("XCLAIM")
                    .arg(&stream)
                    .arg(&group)
                    .arg(&consumer)
                    // Only if idle this long: renews our claim (idle never
                    // passes 2/3 of claim_idle) without taking the entry back
                    // from a daemon that claimed it meanwhile.
                    .arg(min_idle)
                    .arg(&id)
                    .arg("JUSTID")
                    .query_async(&mut conn)
                    .await;
                if let Err(e) = touched {
                    tracing::debug!(error = %e, entry = %id, "cannot renew the claim on a deploy hook");
                }
            }
        }))
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The entries of an `XREADGROUP` reply, in order. An entry trimmed from
/// the stream while pending comes back with no fields (Redis sends nil).
fn read_reply_entries(reply: Value) -> Vec<StreamId> {
    // [[stream, [entry, ...]], ...] (RESP2), or a map of stream -> entries.
    let streams = match reply {
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs.into_iter().map(|(_, entries)| entries).collect(),
        _ => Vec::new(),
    };
    streams.into_iter().flat_map(entries).collect()
}

/// What one `XAUTOCLAIM` gave.
struct Claimed {
    /// Where the next call goes on; `0-0` at the end.
    cursor: Option<String>,
    entries: Vec<StreamId>,
    /// Entries trimmed from the stream while pending (Redis 7 lists their
    /// ids and drops them from the pending list), with no fields: they are
    /// dead-lettered as lost rather than vanish.
    trimmed: Vec<StreamId>,
}

fn autoclaim_reply(reply: Value) -> Claimed {
    let mut claimed = Claimed { cursor: None, entries: Vec::new(), trimmed: Vec::new() };
    let Value::Array(parts) = reply else { return claimed };
    let mut parts = parts.into_iter();
    claimed.cursor = parts.next().and_then(|c| redis::from_redis_value::<String>(c).ok());
    claimed.entries = parts.next().map(entries).unwrap_or_default();
    let trimmed = parts.next().and_then(|d| redis::from_redis_value::<Vec<String>>(d).ok()).unwrap_or_default();
    claimed.trimmed = trimmed.into_iter().map(|id| StreamId { id, ..StreamId::default() }).collect();
    claimed
}

/// `[[id, [field, value, ...] | nil], ...]` as stream entries.
fn entries(list: Value) -> Vec<StreamId> {
    let Value::Array(items) = list else { return Vec::new() };
    items
        .into_iter()
        .filter_map(|item| {
            let Value::Array(mut pair) = item else { return None };
            if pair.len() != 2 {
                return None;
            }
            let fields = pair.pop()?;
            let id = redis::from_redis_value::<String>(pair.pop()?).ok()?;
            let map = match fields {
                Value::Array(kv) => kv
                    .chunks_exact(2)
                    .filter_map(|c| Some((redis::from_redis_value::<String>(c[0].clone()).ok()?, c[1].clone())))
                    .collect(),
                Value::Map(kv) => {
                    kv.into_iter().filter_map(|(k, v)| Some((redis::from_redis_value::<String>(k).ok()?, v))).collect()
                }
                _ => HashMap::new(),
            };
            Some(StreamId { id, map, ..StreamId::default() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&str, &str)]) -> StreamId {
        StreamId {
            id: "1-0".into(),
            map: fields.iter().map(|(k, v)| (k.to_string(), Value::BulkString(v.as_bytes().to_vec()))).collect(),
            ..StreamId::default()
        }
    }

    #[test]
    fn parses_a_full_entry() {
        let e = parse_entry(&entry(&[
            ("service", "catalog"),
            ("files", r#"["quiz_generator.py", "app.py"]"#),
            ("tags", r#"["genre=dance", "genre=rock"]"#),
            ("id", "deploy-42"),
        ]))
        .unwrap();
        assert_eq!(e.service, "catalog");
        assert_eq!(e.files, ["quiz_generator.py", "app.py"]);
        assert_eq!(e.tags, [("genre".into(), "dance".into()), ("genre".into(), "rock".into())]);
        assert_eq!(e.id, "deploy-42");
        let e = parse_entry(&entry(&[("service", "web"), ("tags", r#"{"version": "2"}"#)])).unwrap();
        assert_eq!(e.tags, [("version".into(), "2".into())]);
        assert_eq!(e.id, "1-0", "the entry id by default");
        assert!(e.files.is_empty());
    }

    #[test]
    fn malformed_entries_say_why() {
        let cases: [(&[(&str, &str)], &str); 6] = [
            (&[("files", "[]")], "missing field `service`"),
            (&[("service", " ")], "missing field `service`"),
            (&[("service", "s"), ("files", "app.py")], "`files` must be a JSON list"),
            (&[("service", "s"), ("files", "[1]")], "`files` must be a JSON list"),
            (&[("service", "s"), ("tags", "genre=dance")], "`tags` is not JSON"),
            (&[("service", "s"), ("tags", r#"["genre"]"#)], "not of the form name=value"),
        ];
        for (fields, why) in cases {
            let err = parse_entry(&entry(fields)).unwrap_err();
            assert!(err.contains(why), "{fields:?}: {err}");
        }
    }
}
