//! The dead-letter stream: deploy hooks the daemon gave up on, and how an
//! operator lists, replays or drops them (`cachepol dead-letter`).
//!
//! A dead letter (written by [`crate::intake::deploy`]) keeps the hook's
//! original fields under `original.*`, with `reason`, `entry` (its id in
//! the deploy stream), `policies` (the ones that failed it) and `attempts`.
//! Replaying appends the original fields to the deploy stream again, as a
//! new hook keeping the sender's `id` (the original entry id when it had
//! none), and deletes the dead letter, both in one `MULTI`: a replay is
//! never lost nor doubled by a crash between the two.

use std::time::{SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;
use redis::streams::{StreamId, StreamRangeReply};
use redis::{AsyncCommands, RedisResult, Value};

use crate::config::DeployConfig;

/// One dead letter, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its id in the dead-letter stream.
    pub id: String,
    pub service: String,
    /// The policies that failed it (empty: no policy was at fault, say a
    /// malformed hook).
    pub policies: String,
    pub reason: String,
    pub attempts: Option<u32>,
    /// The hook's id in the deploy stream.
    pub entry: String,
    /// The hook's fields as sent.
    pub original: Vec<(String, String)>,
}

impl DeadLetter {
    fn from_entry(entry: &StreamId) -> DeadLetter {
        let text = |v: &Value| redis::from_redis_value::<String>(v.clone()).unwrap_or_default();
        let field = |name: &str| entry.map.get(name).map(text).unwrap_or_default();
        let mut original: Vec<(String, String)> = entry
            .map
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("original.").map(|k| (k.to_owned(), text(v))))
            .collect();
        original.sort();
        let service = original.iter().find(|(k, _)| k == "service").map(|(_, v)| v.clone()).unwrap_or_default();
        DeadLetter {
            id: entry.id.clone(),
            service,
            policies: field("policies"),
            reason: field("reason"),
            attempts: field("attempts").parse().ok(),
            entry: field("entry"),
            original,
        }
    }

    /// How long ago it was dead-lettered (from its stream id).
    pub fn age(&self, now: SystemTime) -> Option<std::time::Duration> {
        let ms: u64 = self.id.split_once('-')?.0.parse().ok()?;
        let now = now.duration_since(UNIX_EPOCH).ok()?.as_millis() as u64;
        Some(std::time::Duration::from_millis(now.saturating_sub(ms)))
    }

    /// The hook as it goes back to the deploy stream.
    fn replay_fields(&self) -> Vec<(String, String)> {
        let mut fields = self.original.clone();
        if !fields.iter().any(|(k, _)| k == "id") && !self.entry.is_empty() {
            fields.push(("id".into(), self.entry.clone()));
        }
        fields.push(("replay_of".into(), self.id.clone()));
        fields
    }
}

/// Why an operator's request on a dead letter failed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("no dead letter {id} in {stream}")]
    NotFound { id: String, stream: String },
    #[error("dead letter {id} has no original hook fields to replay")]
    Empty { id: String },
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

/// The dead letters, oldest first, at most `count`, after the one with
/// id `after` (from the first when `None`).
pub async fn list(
    conn: &mut ConnectionManager,
    settings: &DeployConfig,
    after: Option<&str>,
    count: usize,
) -> RedisResult<Vec<DeadLetter>> {
    let start = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
    let reply: StreamRangeReply = conn.xrange_count(&settings.dead_letter, start, "+", count).await?;
    Ok(reply.ids.iter().map(DeadLetter::from_entry).collect())
}

/// Every dead letter's id, oldest first, read a page at a time.
pub async fn all_ids(conn: &mut ConnectionManager, settings: &DeployConfig) -> RedisResult<Vec<String>> {
    const PAGE: usize = 1000;
    let mut ids: Vec<String> = Vec::new();
    loop {
        let page = list(conn, settings, ids.last().map(String::as_str), PAGE).await?;
        let done = page.len() < PAGE;
        ids.extend(page.into_iter().map(|l| l.id));
        if done {
            return Ok(ids);
        }
    }
}

async fn get(conn: &mut ConnectionManager, settings: &DeployConfig, id: &str) -> Result<DeadLetter, DeadLetterError> {
    let reply: StreamRangeReply = conn.xrange(&settings.dead_letter, id, id).await?;
    let entry = reply
        .ids
        .first()
        .ok_or_else(|| DeadLetterError::NotFound { id: id.to_owned(), stream: settings.dead_letter.clone() })?;
    Ok(DeadLetter::from_entry(entry))
}

/// Send dead letter `id` back to the deploy stream; returns the new
/// hook's stream id.
pub async fn replay(
    conn: &mut ConnectionManager,
    settings: &DeployConfig,
    id: &str,
) -> Result<String, DeadLetterError> {
    let letter = get(conn, settings, id).await?;
    if letter.original.is_empty() {
        return Err(DeadLetterError::Empty { id: id.to_owned() });
    }
    let mut add = redis::cmd("XADD");
    add.arg(&settings.stream);
    if settings.max_len > 0 {
        add.arg("MAXLEN").arg("~").arg(settings.max_len);
    }
    add.arg("*");
    for (k, v) in letter.replay_fields() {
        add.arg(k).arg(v);
    }
    let (new_id, _deleted): (String, i64) = redis::pipe()
        .atomic()
        .add_command(add)
        .cmd("XDEL")
        .arg(&settings.dead_letter)
        .arg(id)
        .query_async(conn)
        .await?;
    Ok(new_id)
}

/// Delete dead letter `id` for good.
pub async fn drop(conn: &mut ConnectionManager, settings: &DeployConfig, id: &str) -> Result<(), DeadLetterError> {
    let deleted: i64 = conn.xdel(&settings.dead_letter, &[id]).await?;
    if deleted == 0 {
        return Err(DeadLetterError::NotFound { id: id.to_owned(), stream: settings.dead_letter.clone() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(fields: &[(&str, &str)]) -> DeadLetter {
        let entry = StreamId {
            id: "1700000000000-0".into(),
            map: fields.iter().map(|(k, v)| (k.to_string(), Value::BulkString(v.as_bytes().to_vec()))).collect(),
            ..StreamId::default()
        };
        DeadLetter::from_entry(&entry)
    }

    #[test]
    fn a_dead_letter_reads_back_and_replays_with_its_identity() {
        let l = letter(&[
            ("reason", "failed 3 times: quiz: boom"),
            ("entry", "1699999999999-0"),
            ("policies", "quiz"),
            ("attempts", "3"),
            ("original.service", "quiz"),
            ("original.files", "[\"quiz_generator.py\"]"),
        ]);
        assert_eq!((l.service.as_str(), l.policies.as_str(), l.attempts), ("quiz", "quiz", Some(3)));
        let fields = l.replay_fields();
        assert!(fields.contains(&("id".into(), "1699999999999-0".into())), "keeps the hook's id: {fields:?}");
        assert!(fields.contains(&("replay_of".into(), l.id.clone())));
        let at = UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_060_000);
        assert_eq!(l.age(at), Some(std::time::Duration::from_secs(60)));
    }
}
