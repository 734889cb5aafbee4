//! `notify-keyspace-events`: which flags the loaded policies need.
//!
//! Redis sends no keyspace notifications by default, and each class of
//! command has its own flag. The daemon subscribes to keyevent channels
//! (flag `E`) and works out the class flags from the event names the
//! policies subscribe to. It either sets them (`--configure-notifications`)
//! or refuses to start naming exactly what is missing, because running
//! without them looks healthy while no policy ever fires.

use std::collections::BTreeSet;

use crate::sandbox::manifest::Manifest;

/// Every class flag; `A` in Redis 7's syntax.
const ALL_CLASSES: &str = "g$lshzxetd";

/// The class flag that makes Redis emit `op`, or `None` if unknown (then
/// every class is needed).
pub fn class_of(op: &str) -> Option<char> {
    Some(match op {
        "del" | "expire" | "rename_from" | "rename_to" | "persist" | "copy_to" | "move_from" | "move_to"
        | "restore" | "sortstore" => 'g',
        "set" | "setrange" | "incrby" | "incrbyfloat" | "append" => '$',
        "expired" => 'x',
        "evicted" => 'e',
        "new" => 'n',
        op if op.starts_with('h') => 'h',
        op if op.starts_with('l') || op.starts_with('r') && op.ends_with("push") || op == "rpop" => 'l',
        op if op.starts_with('s') => 's',
        op if op.starts_with('z') => 'z',
        op if op.starts_with('x') => 't',
        _ => return None,
    })
}

/// The flags the key index needs ([`crate::store::index::FLAGS`]).
pub fn for_index() -> BTreeSet<char> {
    crate::store::index::FLAGS.chars().collect()
}

/// The flags needed for these manifests' key subscriptions (empty if none
/// subscribes to keyspace events).
pub fn required(manifests: &[&Manifest]) -> BTreeSet<char> {
    let mut flags = BTreeSet::new();
    for m in manifests {
        for sub in &m.key_subscriptions {
            if sub.ops.is_empty() {
                flags.extend(ALL_CLASSES.chars());
            }
            for op in &sub.ops {
                match class_of(op) {
                    Some(c) => {
                        flags.insert(c);
                    }
                    None => flags.extend(ALL_CLASSES.chars()),
                }
            }
        }
    }
    if !flags.is_empty() {
        flags.insert('E');
    }
    flags
}

/// The flags a `notify-keyspace-events` value turns on (`A` expanded).
pub fn parse(value: &str) -> BTreeSet<char> {
    let mut flags = BTreeSet::new();
    for c in value.chars() {
        if c == 'A' {
            flags.extend(ALL_CLASSES.chars());
        } else {
            flags.insert(c);
        }
    }
    flags
}

/// Why the daemon cannot get the notifications it needs.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(
        "Redis's notify-keyspace-events is `{current}` but the loaded policies need `{needed}`; missing `{missing}`. \
         Run `redis-cli CONFIG SET notify-keyspace-events {wanted}` (and persist it in redis.conf), \
         or start cachepol with --configure-notifications"
    )]
    Missing { current: String, needed: String, missing: String, wanted: String },
    #[error("cannot read or set notify-keyspace-events: {0}")]
    Redis(String),
}

/// Flags as Redis users write them: `K`/`E` first, then the classes.
pub fn text(flags: &BTreeSet<char>) -> String {
    let (kinds, classes): (Vec<char>, Vec<char>) = flags.iter().partition(|c| matches!(c, 'K' | 'E'));
    kinds.into_iter().chain(classes).collect()
}

/// Make sure Redis emits what `needed` asks for. With `configure`, add the
/// missing flags to what is set (never removing any); otherwise fail naming
/// them. Returns the flags it added.
pub async fn ensure(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    needed: &BTreeSet<char>,
    configure: bool,
) -> Result<BTreeSet<char>, NotifyError> {
    if needed.is_empty() {
        return Ok(BTreeSet::new());
    }
    // A flat list of pairs over RESP2, a map over RESP3 (the subscription
    // connection re-checks the flags on itself).
    let reply: std::collections::HashMap<String, String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("notify-keyspace-events")
        .query_async(conn)
        .await
        .map_err(|e| NotifyError::Redis(e.to_string()))?;
    let current = reply.get("notify-keyspace-events").cloned().unwrap_or_default();
    let have = parse(&current);
    let missing: BTreeSet<char> = needed.difference(&have).copied().collect();
    if missing.is_empty() {
        return Ok(missing);
    }
    let wanted: BTreeSet<char> = have.union(needed).copied().collect();
    if !configure {
        return Err(NotifyError::Missing {
            current,
            needed: text(needed),
            missing: text(&missing),
            wanted: text(&wanted),
        });
    }
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg(text(&wanted))
        .query_async::<()>(conn)
        .await
        .map_err(|e| NotifyError::Redis(e.to_string()))?;
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_of_common_events() {
        assert_eq!(class_of("set"), Some('$'));
        assert_eq!(class_of("del"), Some('g'));
        assert_eq!(class_of("expire"), Some('g'));
        assert_eq!(class_of("expired"), Some('x'));
        assert_eq!(class_of("hset"), Some('h'));
        assert_eq!(class_of("lpush"), Some('l'));
        assert_eq!(class_of("rpush"), Some('l'));
        assert_eq!(class_of("zadd"), Some('z'));
        assert_eq!(class_of("xadd"), Some('t'));
        assert_eq!(class_of("weird"), None);
    }

    #[test]
    fn parse_expands_a() {
        assert_eq!(text(&parse("KEA")), "EK$deghlstxz");
        assert_eq!(text(&parse("")), "");
    }
}
