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
//! start the daemon first re-reads its own unacknowledged entries (a crash
//! mid-hook), then claims entries other consumers left pending too long
//! (`XAUTOCLAIM`), then reads new ones. A hook that keeps failing is retried
//! with backoff, only by the policies that failed it, and after
//! `max_attempts` is moved to the dead-letter stream with the reason, as is a
//! malformed entry at once; the loop itself never stops on bad input.
//!
//! Policies should be idempotent: after a crash, a hook that some policies
//! had already handled is delivered again to all of them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::aio::ConnectionManager;
use redis::streams::{StreamId, StreamPendingCountReply, StreamReadReply};
use redis::{AsyncCommands, Value};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use crate::config::DeployConfig;
use crate::dispatch::routes::Routes;
use crate::intake::events::Backoff;
use crate::wit::DeployEvent;

/// Entries read per `XREADGROUP`.
const BATCH: usize = 16;
/// How long one `XREADGROUP` blocks waiting for new entries.
const BLOCK_MS: usize = 1000;
/// How often stale entries of other consumers are looked for.
const CLAIM_EVERY: Duration = Duration::from_secs(30);

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
    let bad = || "field `tags` must be a JSON object of strings or a list of \"name=value\" strings".to_owned();
    match value {
        serde_json::Value::Object(map) => {
            map.into_iter().map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())).ok_or_else(bad)).collect()
        }
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

/// Tags as `name=value` words, for log lines.
fn show_tags(tags: &[(String, String)]) -> String {
    tags.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

/// Write one deploy hook (what `cachepol deploy` does); returns its id.
pub async fn publish(
    conn: &mut ConnectionManager,
    stream: &str,
    service: &str,
    files: &[String],
    tags: &[(String, String)],
    id: Option<&str>,
) -> redis::RedisResult<String> {
    let tags: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut fields = vec![
        ("service", service.to_owned()),
        ("files", serde_json::to_string(files).unwrap_or_default()),
        ("tags", serde_json::to_string(&tags).unwrap_or_default()),
    ];
    if let Some(id) = id {
        fields.push(("id", id.to_owned()));
    }
    conn.xadd(stream, "*", &fields).await
}

/// The consumer-group reader.
pub struct DeployConsumer {
    pub conn: ConnectionManager,
    pub settings: DeployConfig,
    pub routes: Arc<ArcSwap<Routes>>,
}

/// The outcome of handling one entry.
enum Handled {
    Acked,
    /// Shutdown came first; the entry stays pending for the next start.
    Interrupted,
}

impl DeployConsumer {
    /// Run until `shutdown`; an entry being handled then is finished (or
    /// left pending if its policies were stopped) before returning.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new();
        let mut failing = false;
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.setup() => r,
            };
            match result {
                Ok(()) => break,
                Err(e) => {
                    if !failing {
                        warn!(error = %e, stream = %self.settings.stream, "cannot set up the deploy stream; retrying");
                        failing = true;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
        info!(stream = %self.settings.stream, group = %self.settings.group, consumer = %self.settings.consumer, "reading deploy hooks");
        // Our own unacknowledged entries first: a previous run died mid-hook.
        if let Err(e) = self.replay_own(&shutdown).await {
            warn!(error = %e, "cannot replay pending deploy hooks; they will be claimed later");
        }
        let mut last_claim = tokio::time::Instant::now();
        self.claim_stale(&shutdown).await;
        backoff.reset();
        failing = false;
        while !shutdown.is_cancelled() {
            if last_claim.elapsed() >= CLAIM_EVERY {
                self.claim_stale(&shutdown).await;
                last_claim = tokio::time::Instant::now();
            }
            let read = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.read(">") => r,
            };
            match read {
                Ok(entries) => {
                    if failing {
                        info!("deploy stream reachable again");
                        failing = false;
                        backoff.reset();
                    }
                    for entry in entries {
                        if let Handled::Interrupted = self.handle(entry, 0, &shutdown).await {
                            return;
                        }
                    }
                }
                Err(e) => {
                    if !failing {
                        warn!(error = %e, "cannot read the deploy stream; retrying with backoff");
                        failing = true;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }

    /// Create the group (at the stream's end) if it does not exist.
    async fn setup(&mut self) -> redis::RedisResult<()> {
        let created: redis::RedisResult<()> =
            self.conn.xgroup_create_mkstream(&self.settings.stream, &self.settings.group, "$").await;
        match created {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    async fn read(&mut self, from: &str) -> redis::RedisResult<Vec<StreamId>> {
        let block = if from == ">" { Some(BLOCK_MS) } else { None };
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(&self.settings.group).arg(&self.settings.consumer).arg("COUNT").arg(BATCH);
        if let Some(ms) = block {
            cmd.arg("BLOCK").arg(ms);
        }
        cmd.arg("STREAMS").arg(&self.settings.stream).arg(from);
        let reply: Option<StreamReadReply> = cmd.query_async(&mut self.conn).await?;
        Ok(reply.map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect()).unwrap_or_default())
    }

    /// How often each of our pending entries was delivered already.
    async fn delivery_counts(&mut self) -> redis::RedisResult<HashMap<String, usize>> {
        let reply: StreamPendingCountReply = self
            .conn
            .xpending_consumer_count(
                &self.settings.stream,
                &self.settings.group,
                "-",
                "+",
                1000,
                &self.settings.consumer,
            )
            .await?;
        Ok(reply.ids.into_iter().map(|p| (p.id, p.times_delivered)).collect())
    }

    async fn replay_own(&mut self, shutdown: &CancellationToken) -> redis::RedisResult<()> {
        let entries = self.read("0").await?;
        if entries.is_empty() {
            return Ok(());
        }
        let counts = self.delivery_counts().await?;
        info!(count = entries.len(), "re-handling deploy hooks left unacknowledged by a previous run");
        for entry in entries {
            // This read counted as a delivery too.
            let before = counts.get(&entry.id).copied().unwrap_or(1).saturating_sub(1);
            if let Handled::Interrupted = self.handle(entry, before as u32, shutdown).await {
                break;
            }
        }
        Ok(())
    }

    /// Take over entries another consumer left pending for too long.
    async fn claim_stale(&mut self, shutdown: &CancellationToken) {
        let reply: redis::RedisResult<redis::streams::StreamAutoClaimReply> = redis::cmd("XAUTOCLAIM")
            .arg(&self.settings.stream)
            .arg(&self.settings.group)
            .arg(&self.settings.consumer)
            .arg(self.settings.claim_idle_ms)
            .arg("0-0")
            .arg("COUNT")
            .arg(100)
            .query_async(&mut self.conn)
            .await;
        match reply {
            Ok(reply) if !reply.claimed.is_empty() => {
                info!(count = reply.claimed.len(), "claimed deploy hooks another consumer left pending");
                let counts = self.delivery_counts().await.unwrap_or_default();
                for entry in reply.claimed {
                    let before = counts.get(&entry.id).copied().unwrap_or(1).saturating_sub(1);
                    if let Handled::Interrupted = self.handle(entry, before as u32, shutdown).await {
                        return;
                    }
                }
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot claim stale deploy hooks"),
        }
    }

    /// Handle one entry: deliver, wait, retry the failures, ack or dead-letter.
    async fn handle(&mut self, entry: StreamId, attempts_before: u32, shutdown: &CancellationToken) -> Handled {
        let span = tracing::info_span!("deploy", entry = %entry.id);
        self.handle_in_span(entry, attempts_before, shutdown).instrument(span).await
    }

    async fn handle_in_span(&mut self, entry: StreamId, attempts_before: u32, shutdown: &CancellationToken) -> Handled {
        let event = match parse_entry(&entry) {
            Ok(event) => event,
            Err(reason) => {
                warn!(%reason, "malformed deploy hook: moved to the dead-letter stream");
                return self.dead_letter(&entry, &reason).await;
            }
        };
        let max = self.settings.max_attempts.max(1);
        if attempts_before >= max {
            let reason = format!("gave up after {attempts_before} deliveries (the last ones were interrupted)");
            return self.dead_letter(&entry, &reason).await;
        }
        let mut remaining: Vec<Arc<str>> =
            self.routes.load().deploy_targets(&event.service).iter().map(|r| r.name.clone()).collect();
        info!(service = %event.service, files = event.files.len(), tags = %show_tags(&event.tags), policies = %remaining.join(" "), "deploy hook");
        let mut errors = Vec::new();
        let mut backoff = Duration::from_millis(500);
        for attempt in attempts_before + 1..=max {
            // The current routes: a policy swapped, unloaded or re-added
            // since the last attempt is found (or not) as it is now.
            let routes = self.routes.load_full();
            let waits: Vec<_> = remaining
                .iter()
                .filter_map(|name| routes.get(name))
                .map(|route| (route.name.clone(), Routes::deploy_to(route, event.clone())))
                .collect();
            errors.clear();
            for (name, rx) in waits {
                match rx.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => errors.push((name, e)),
                    // The policy's queue closed before handling it.
                    Err(_) if shutdown.is_cancelled() => return Handled::Interrupted,
                    // Unloaded (its file was deleted): it no longer
                    // subscribes, so the hook no longer waits for it.
                    Err(_) if self.routes.load().get(&name).is_none() => {
                        info!(policy = %name, "policy unloaded before handling the hook; not waiting for it");
                    }
                    Err(_) => errors.push((name, "the policy's queue closed before handling it".to_owned())),
                }
            }
            remaining = errors.iter().map(|(n, _)| n.clone()).collect();
            if remaining.is_empty() {
                return self.ack(&entry).await;
            }
            warn!(attempt, max, failed = %remaining.join(" "), "deploy hook failed");
            if attempt < max {
                tokio::select! {
                    _ = shutdown.cancelled() => return Handled::Interrupted,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff *= 2;
            }
        }
        let reason = errors.iter().map(|(name, e)| format!("{name}: {e}")).collect::<Vec<_>>().join("; ");
        self.dead_letter(&entry, &format!("failed {max} times: {reason}")).await
    }

    async fn ack(&mut self, entry: &StreamId) -> Handled {
        let acked: redis::RedisResult<i64> =
            self.conn.xack(&self.settings.stream, &self.settings.group, &[&entry.id]).await;
        if let Err(e) = acked {
            warn!(error = %e, "cannot acknowledge the deploy hook; it will be delivered again");
        }
        Handled::Acked
    }

    /// Park an entry with the reason, then acknowledge it.
    async fn dead_letter(&mut self, entry: &StreamId, reason: &str) -> Handled {
        let mut fields: Vec<(String, Value)> = vec![
            ("reason".into(), Value::SimpleString(reason.to_owned())),
            ("entry".into(), Value::SimpleString(entry.id.clone())),
            ("stream".into(), Value::SimpleString(self.settings.stream.clone())),
        ];
        let mut original: Vec<(&String, &Value)> = entry.map.iter().collect();
        original.sort_by(|a, b| a.0.cmp(b.0));
        fields.extend(original.into_iter().map(|(k, v)| (format!("original.{k}"), v.clone())));
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.settings.dead_letter).arg("*");
        for (k, v) in &fields {
            cmd.arg(k);
            match v {
                Value::BulkString(b) => cmd.arg(b),
                Value::SimpleString(s) => cmd.arg(s),
                other => cmd.arg(format!("{other:?}")),
            };
        }
        match cmd.query_async::<String>(&mut self.conn).await {
            Ok(id) => {
                warn!(dead_letter = %self.settings.dead_letter, id = %id, %reason, "deploy hook dead-lettered");
                self.ack(entry).await
            }
            // Not acknowledged: it stays pending and is retried later rather
            // than lost.
            Err(e) => {
                warn!(error = %e, "cannot dead-letter the deploy hook; leaving it pending");
                Handled::Acked
            }
        }
    }
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
