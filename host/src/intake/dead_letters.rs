//! The dead-letter stream: deploy hooks the daemon gave up on, and how an
//! operator lists, replays or drops them (`cachepol dead-letter`).
//!
//! A dead letter (written by [`crate::intake::deploy`]) keeps the hook's
//! original fields under `original.*`, with `reason`, `entry` (its id in
//! the deploy stream), `policies` (the ones that failed it) and `attempts`.
//! Replaying appends the original fields to the deploy stream again, as a
//! new hook keeping the sender's `id` (the original entry id when it had
//! none), and deletes the dead letter, in one script ([`REPLAY`]): Redis
//! runs it alone, so two operators replaying the same letter add it once,
//! and an `XADD` that fails (a `deploy.stream` of the wrong type) stops the
//! script before the dead letter is deleted.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::store::target::Conn;
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
}

/// Replay one dead letter: `KEYS[1]` the dead letters, `KEYS[2]` the deploy
/// stream, `ARGV[1]` the letter's id, `ARGV[2]` the deploy stream's
/// `max_len` (0: no trimming; never past a hook not yet handled,
/// [`crate::intake::deploy::TRIM`]). Returns the new entry's id, nil when
/// there is no such letter, an `EMPTY` error when it holds no hook.
pub const REPLAY: &str = r"
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return false end
local fields, out, has_id, entry = found[1][2], {}, false, nil
for i = 1, #fields, 2 do
  local name, value = fields[i], fields[i + 1]
  if string.sub(name, 1, 9) == 'original.' then
    name = string.sub(name, 10)
    if name == 'id' then has_id = true end
    out[#out + 1] = name
    out[#out + 1] = value
  elseif name == 'entry' then
    entry = value
  end
end
if #out == 0 then return redis.error_reply('EMPTY the dead letter holds no hook to replay') end
if not has_id and entry then
  out[#out + 1] = 'id'
  out[#out + 1] = entry
end
out[#out + 1] = 'replay_of'
out[#out + 1] = ARGV[1]
local id = redis.call('XADD', KEYS[2], '*', unpack(out))
trim(KEYS[2], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[1])
return id
";

static REPLAY_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(&format!("{}{REPLAY}", crate::intake::deploy::TRIM)));

/// Why an operator's request on a dead letter failed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("no dead letter {id} in {stream}")]
    NotFound { id: String, stream: String },
    #[error("dead letter {id} has no original hook fields to replay")]
    Empty { id: String },
    #[error("{}", crate::store::redis::describe(.0))]
    Redis(#[from] redis::RedisError),
}

/// The dead letters, oldest first, at most `count`, after the one with
/// id `after` (from the first when `None`).
pub async fn list(
    conn: &mut Conn,
    settings: &DeployConfig,
    after: Option<&str>,
    count: usize,
) -> RedisResult<Vec<DeadLetter>> {
    let start = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
    let reply: StreamRangeReply = conn.xrange_count(&settings.dead_letter, start, "+", count).await?;
    Ok(reply.ids.iter().map(DeadLetter::from_entry).collect())
}

/// Every dead letter's id, oldest first, read a page at a time.
pub async fn all_ids(conn: &mut Conn, settings: &DeployConfig) -> RedisResult<Vec<String>> {
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

/// Send dead letter `id` back to the deploy stream; returns the new
/// hook's stream id.
pub async fn replay(conn: &mut Conn, settings: &DeployConfig, id: &str) -> Result<String, DeadLetterError> {
    let replayed: RedisResult<Option<String>> = REPLAY_SCRIPT
        .key(&settings.dead_letter)
        .key(&settings.stream)
        .arg(id)
        .arg(settings.max_len)
        .invoke_async(conn)
        .await;
    match replayed {
        Ok(Some(new_id)) => Ok(new_id),
        Ok(None) => Err(DeadLetterError::NotFound { id: id.to_owned(), stream: settings.dead_letter.clone() }),
        Err(e) if e.code() == Some("EMPTY") => Err(DeadLetterError::Empty { id: id.to_owned() }),
        Err(e) => Err(e.into()),
    }
}

/// Delete dead letter `id` for good.
pub async fn drop(conn: &mut Conn, settings: &DeployConfig, id: &str) -> Result<(), DeadLetterError> {
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
    fn a_dead_letter_reads_back() {
        let l = letter(&[
            ("reason", "failed 3 times: quiz: boom"),
            ("entry", "1699999999999-0"),
            ("policies", "quiz"),
            ("attempts", "3"),
            ("original.service", "quiz"),
            ("original.files", "[\"quiz_generator.py\"]"),
        ]);
        assert_eq!((l.service.as_str(), l.policies.as_str(), l.attempts), ("quiz", "quiz", Some(3)));
        assert_eq!(l.entry, "1699999999999-0");
        let at = UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_060_000);
        assert_eq!(l.age(at), Some(std::time::Duration::from_secs(60)));
    }
}
