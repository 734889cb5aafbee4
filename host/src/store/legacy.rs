//! State the bundled policies kept under `cachepol:` before those keys
//! were reserved, moved once to where they keep it now.
//!
//! file-cache-clear kept its deferred clears under
//! `cachepol:file-cache-clear:` and key-naming its version markers under
//! `cachepol:key-naming:`. The daemon's keys are reserved now, and each
//! policy keeps its state under a namespace the sandbox grants it
//! (`cachepol-state:<policy>:`). A deferred clear left under the old name by
//! the previous version would never run, so the first start of this
//! version moves those keys (value and TTL, by `DUMP`/`RESTORE`: on a
//! cluster the new name may hash to another node) before any policy is
//! called, and notes in a hash that it did, so that later starts do not
//! scan again. A key already present under the new name is kept, and the
//! old one dropped.

use redis::Value;

use crate::store::backend::BackendError;
use crate::store::redis::{RedisBackend, failed};
use crate::store::target::Conn;

/// Policies that kept state under `cachepol:<policy>:`.
pub const POLICIES: [&str; 2] = ["file-cache-clear", "key-naming"];

/// Move the legacy state of each of `loaded` that is one of [`POLICIES`]
/// and not moved yet (per `marker`, a hash of policy names) to
/// `state_prefix(policy)`; returns how many keys moved. One `SCAN` of the
/// keyspace (every primary on a cluster) serves all of them.
pub async fn move_state(
    backend: &RedisBackend,
    loaded: &[String],
    marker: &str,
    state_prefix: fn(&str) -> String,
) -> Result<u64, BackendError> {
    let mut conn = backend.connection();
    let mut pending = Vec::new();
    for policy in POLICIES.iter().filter(|p| loaded.iter().any(|l| l == *p)) {
        let done: bool = redis::cmd("HEXISTS").arg(marker).arg(*policy).query_async(&mut conn).await.map_err(failed)?;
        if !done {
            pending.push(*policy);
        }
    }
    if pending.is_empty() {
        return Ok(0);
    }
    let moves: Vec<(String, String)> = pending.iter().map(|p| (format!("cachepol:{p}:"), state_prefix(p))).collect();
    tracing::info!(policies = %pending.join(" "), "moving the policies' state from under cachepol: to cachepol-state: (once)");
    let mut moved = 0;
    for mut node in scanners(backend).await? {
        let mut cursor = 0u64;
        loop {
            let page = redis::cmd("SCAN").arg(cursor).arg("MATCH").arg("cachepol:*").arg("COUNT").arg(1000).clone();
            let (next, keys): (u64, Vec<Vec<u8>>) = match &mut node {
                Scanner::Server(conn) => page.query_async(conn).await,
                Scanner::Node(conn) => page.query_async(conn).await,
            }
            .map_err(failed)?;
            for key in keys {
                let Some(to) = moves.iter().find_map(|(from, to)| {
                    key.strip_prefix(from.as_bytes()).map(|rest| [to.as_bytes(), rest].concat())
                }) else {
                    continue;
                };
                moved += u64::from(move_key(&mut conn, &key, &to).await?);
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    for policy in &pending {
        redis::cmd("HSET").arg(marker).arg(*policy).arg(moved).query_async::<()>(&mut conn).await.map_err(failed)?;
    }
    tracing::info!(moved, "the policies' state is under cachepol-state:");
    Ok(moved)
}

/// Where a `SCAN` walks: the one server, or one primary of a cluster.
enum Scanner {
    Server(Conn),
    Node(redis::aio::MultiplexedConnection),
}

/// A connection per node to `SCAN`.
async fn scanners(backend: &RedisBackend) -> Result<Vec<Scanner>, BackendError> {
    if !backend.is_cluster() {
        return Ok(vec![Scanner::Server(backend.connection())]);
    }
    let mut conns = Vec::new();
    for node in backend.primaries().await? {
        conns.push(Scanner::Node(backend.node_conn(&node).await?));
    }
    Ok(conns)
}

/// `from`'s value and TTL to `to` (kept if `to` exists), then `from` gone.
/// Whether it moved.
async fn move_key(conn: &mut Conn, from: &[u8], to: &[u8]) -> Result<bool, BackendError> {
    let dump: Value = redis::cmd("DUMP").arg(from).query_async(conn).await.map_err(failed)?;
    let Value::BulkString(dump) = dump else { return Ok(false) };
    let ttl: i64 = redis::cmd("PTTL").arg(from).query_async(conn).await.map_err(failed)?;
    if ttl == -2 {
        // Expired between the two: nothing to move.
        return Ok(false);
    }
    let restored = redis::cmd("RESTORE").arg(to).arg(ttl.max(0)).arg(dump).query_async::<()>(conn).await;
    let moved = restored.is_ok();
    match restored {
        Ok(()) => {}
        Err(ref e) if e.code() == Some("BUSYKEY") => {}
        Err(e) => return Err(failed(e)),
    }
    redis::cmd("UNLINK").arg(from).query_async::<()>(conn).await.map_err(failed)?;
    Ok(moved)
}
