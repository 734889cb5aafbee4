//! Where a long bulk walk stopped, so that the next slice goes on from there.
//!
//! A sweep or a deploy hook may reach more keys than one call can walk
//! within its budgets (a cache of millions of keys written while no daemon
//! ran). Such a call is run in slices: each bulk operation it makes walks
//! until the call's allowance for the slice is used, and the position it
//! reached (a `SCAN` cursor per node, or a place in the key index) is kept
//! here. The host then calls the policy again with the same event; its bulk
//! operations, made in the same order, go on from their positions, and
//! those already walked to their end answer at once. The call is done when
//! every walk it made has reached its end.
//!
//! A [`WalkBook`] holds the walks of one such call (a policy's sweep, or one
//! hook by id). [`WalkStore`] keeps books in Redis under the daemon's
//! namespace (in memory for the fake host), so that a daemon restarted
//! halfway (or a replica taking over) goes on where the walk stopped. A `SCAN`
//! cursor means nothing on a restarted Redis (its dict has a new hash
//! seed), so each node's cursor is kept with that node's `run_id`, and a
//! different one starts the node's walk over.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::store::target::Conn;

/// Where one walk stands on one node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAt {
    /// The node's `run_id` when the cursor was taken.
    pub run_id: String,
    /// The `SCAN` cursor to go on from.
    pub cursor: u64,
    /// The node's walk reached its end.
    pub done: bool,
}

/// Where a walk stopped: a cursor per node (by address; `""` for a single
/// server), or, for a walk served by the key index, the walk's glob and the
/// last key taken.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub nodes: BTreeMap<String, NodeAt>,
    /// `(walk, last key)` in the key index.
    pub index: Option<(usize, Vec<u8>)>,
}

impl Position {
    /// The cursor to go on from on `node` whose `run_id` is `run_id`, or
    /// `None` when that node's walk is done. A node restarted since (another
    /// `run_id`) starts over.
    pub fn resume_on(&self, node: &str, run_id: &str) -> Option<u64> {
        match self.nodes.get(node) {
            Some(at) if at.run_id == run_id && at.done => None,
            Some(at) if at.run_id == run_id => Some(at.cursor),
            _ => Some(0),
        }
    }
}

/// One bulk operation of a sliced call, as far as it got.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Walk {
    /// A digest of the operation and all its arguments: a call that makes
    /// another one at this place (a new version of the policy, another
    /// TTL) starts it over.
    pub what: String,
    pub done: bool,
    pub at: Position,
    /// Keys examined (Redis's work) and keys changed, over every slice.
    pub examined: u64,
    pub changed: u64,
}

/// The walks of one sliced call, in the order the call makes them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalkBook {
    pub walks: Vec<Walk>,
    /// When the first slice started (Unix ms).
    pub started_ms: u64,
    /// Keys in the keyspace after the first slice (`DBSIZE`, summed over
    /// primaries; 0 for a call done in one slice): the denominator of
    /// progress.
    pub keyspace: u64,
    /// A new request came while this book was in progress: once it is
    /// done, the call runs again from the start (what it reconciles may
    /// have changed behind the positions already passed).
    pub again: bool,
    /// Slices run so far.
    pub slices: u32,
    /// Walks made in the current slice (not kept).
    #[serde(skip)]
    made: usize,
}

impl WalkBook {
    /// A fresh slice begins: walks are taken from the first again.
    pub fn begin_slice(&mut self) {
        self.made = 0;
        self.slices += 1;
    }

    /// The place of the next walk the call makes, described by `what`
    /// (in [`WalkBook::walks`]); a walk found at this place for another
    /// operation is started over.
    pub fn next(&mut self, what: &str) -> usize {
        let at = self.made;
        self.made += 1;
        if self.walks.len() <= at {
            self.walks.push(Walk { what: what.to_owned(), ..Walk::default() });
        } else if self.walks[at].what != what {
            self.walks[at] = Walk { what: what.to_owned(), ..Walk::default() };
        }
        at
    }

    /// Walks made so far in this slice.
    pub fn made(&self) -> usize {
        self.made
    }

    /// The slice is over. If the call went through to its end, walks it
    /// did not make this time (its calls changed: a lock now held, a
    /// different config) are dropped; if it stopped at a walk cut short,
    /// the walks after that one are still owed.
    pub fn end_slice(&mut self, went_through: bool) {
        if went_through {
            self.walks.truncate(self.made);
        }
    }

    /// Walks done so far (for telling a slice that moved on from one
    /// that did not).
    pub fn progress(&self) -> (usize, u64) {
        (self.walks.iter().filter(|w| w.done).count(), self.totals().0)
    }

    /// Some walk stopped short: the call must be made again.
    pub fn unfinished(&self) -> bool {
        self.walks.iter().any(|w| !w.done)
    }

    /// Keys examined and changed over every walk and slice.
    pub fn totals(&self) -> (u64, u64) {
        self.walks.iter().fold((0, 0), |(e, c), w| (e + w.examined, c + w.changed))
    }
}

/// How long a book outlives its last slice: a book nobody goes on with (a
/// hook given up, a policy unloaded) is not kept for ever.
const BOOK_TTL_MS: u64 = 24 * 3600 * 1000;

/// Books of sliced calls, by policy and call: in memory for the fake host
/// and tests, else in Redis, one key per book (`<prefix>:<policy>/<call>`,
/// with [`BOOK_TTL_MS`]), so that they outlive the process and a replica
/// taking over reads the same. Never both: a copy kept here could go stale
/// while another daemon goes on with the walk.
pub struct WalkStore {
    memory: Mutex<HashMap<String, WalkBook>>,
    redis: Option<(Conn, String)>,
}

impl WalkStore {
    /// Books kept only in this process (the fake host, tests).
    pub fn in_memory() -> WalkStore {
        WalkStore { memory: Mutex::default(), redis: None }
    }

    /// Books kept in Redis under `prefix` (the daemon's namespace).
    pub fn in_redis(conn: Conn, prefix: String) -> WalkStore {
        WalkStore { memory: Mutex::default(), redis: Some((conn, prefix)) }
    }

    fn key(prefix: &str, policy: &str, context: &str) -> String {
        format!("{prefix}:{policy}/{context}")
    }

    /// The book of `policy`'s call `context`, if one is in progress. An
    /// unreadable one (Redis down, a record from another version) is
    /// reported and the walk starts over, which loses nothing but time.
    pub async fn load(&self, policy: &str, context: &str) -> Option<WalkBook> {
        let Some((conn, prefix)) = &self.redis else {
            return self.memory.lock().unwrap_or_else(|e| e.into_inner()).get(&format!("{policy}/{context}")).cloned();
        };
        let key = Self::key(prefix, policy, context);
        let text: Option<String> = match redis::cmd("GET").arg(&key).query_async(&mut conn.clone()).await {
            Ok(text) => text,
            Err(e) => {
                tracing::warn!(policy, call = context, error = %e, "cannot read where the last walk stopped; it starts over");
                return None;
            }
        };
        match serde_json::from_str(&text?) {
            Ok(book) => Some(book),
            Err(e) => {
                tracing::warn!(policy, call = context, error = %e, "the record of where the last walk stopped is unreadable; it starts over");
                None
            }
        }
    }

    /// Keep `book` (still in progress).
    pub async fn save(&self, policy: &str, context: &str, book: &WalkBook) {
        let Some((conn, prefix)) = &self.redis else {
            self.memory.lock().unwrap_or_else(|e| e.into_inner()).insert(format!("{policy}/{context}"), book.clone());
            return;
        };
        let text = serde_json::to_string(book).expect("a walk book serialises");
        let key = Self::key(prefix, policy, context);
        let saved: redis::RedisResult<()> =
            redis::cmd("SET").arg(&key).arg(text).arg("PX").arg(BOOK_TTL_MS).query_async(&mut conn.clone()).await;
        if let Err(e) = saved {
            tracing::warn!(policy, call = context, error = %e, "cannot record where the walk stopped; a restart would start it over");
        }
    }

    /// Keys in the keyspace now (`DBSIZE`; on a cluster, summed over its
    /// primaries), for progress; 0 when unknown.
    pub async fn keyspace(&self) -> u64 {
        let Some((conn, _)) = &self.redis else { return 0 };
        redis::cmd("DBSIZE").query_async(&mut conn.clone()).await.unwrap_or(0)
    }

    /// Forget `policy`'s book for `context`: its call is done (or given up).
    pub async fn clear(&self, policy: &str, context: &str) {
        let Some((conn, prefix)) = &self.redis else {
            self.memory.lock().unwrap_or_else(|e| e.into_inner()).remove(&format!("{policy}/{context}"));
            return;
        };
        let key = Self::key(prefix, policy, context);
        let cleared: redis::RedisResult<()> = redis::cmd("UNLINK").arg(&key).query_async(&mut conn.clone()).await;
        if let Err(e) = cleared {
            tracing::warn!(policy, call = context, error = %e, "cannot forget a finished walk; the next run of that call may skip what it walked");
        }
    }
}

/// Milliseconds since the Unix epoch, for [`WalkBook::started_ms`].
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarted_node_starts_its_walk_over() {
        let mut at = Position::default();
        at.nodes.insert(String::new(), NodeAt { run_id: "a".into(), cursor: 42, done: false });
        assert_eq!(at.resume_on("", "a"), Some(42));
        assert_eq!(at.resume_on("", "b"), Some(0), "another run_id: the cursor means nothing there");
        assert_eq!(at.resume_on("other:1", "a"), Some(0), "a node not walked yet starts at 0");
        at.nodes.get_mut("").unwrap().done = true;
        assert_eq!(at.resume_on("", "a"), None);
    }

    #[test]
    fn walks_are_matched_by_place_and_operation() {
        let mut book = WalkBook::default();
        book.begin_slice();
        let first = book.next("expire job:*");
        book.walks[first].examined = 10;
        let second = book.next("delete quiz:*");
        book.walks[second].done = true;
        assert!(book.unfinished());
        book.begin_slice();
        let same = book.next("expire job:*");
        assert_eq!(book.walks[same].examined, 10, "the same walk goes on");
        let other = book.next("delete api:*");
        assert_eq!(
            (book.walks[other].examined, book.walks[other].done),
            (0, false),
            "another operation there starts over"
        );
    }
}
