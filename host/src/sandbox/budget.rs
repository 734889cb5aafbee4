//! Per-event limits on what one policy call may consume.
//!
//! A policy is somebody else's code running inside the daemon that guards
//! the production cache. Each `handle` call gets a fresh allowance of CPU,
//! memory, host calls, touched keys and time; running out fails that call
//! only, with a reason that says which limit it hit.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Limits for one policy call. Operators may override each in config.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Budgets {
    /// Wasm fuel (roughly instructions) per call.
    pub fuel: u64,
    /// Largest linear memory the guest may grow to, in bytes.
    pub memory_bytes: usize,
    /// Redis API calls per event.
    pub host_calls: u32,
    /// Keys changed per event: deleted or given a TTL (bulk operations
    /// included, counted as Redis reports them: a key an only-if-persistent
    /// sweep leaves alone does not count), and read by `mget`. 0 means
    /// unlimited (only when set explicitly).
    pub keys_touched: u64,
    /// Keys bulk operations may examine per event: Redis's work (`COUNT`
    /// per `SCAN` page, or each key taken from the key index), whatever
    /// they change. A sweep or hook reaching further is run in slices
    /// ([`crate::store::walks`]); any other call fails past it. 0 means
    /// unlimited (only when set explicitly).
    pub keys_examined: u64,
    /// Keys the policy's scans and bulk operations may examine per second,
    /// across its lanes and calls ([`crate::sandbox::work`]): past it,
    /// calls wait, or fail on `redis_work` if the wait would outlast their
    /// wall time. 0 means unlimited.
    pub examined_per_sec: u64,
    /// Largest value `set` may write, in bytes.
    pub value_bytes: usize,
    /// Bytes a call may read from Redis: values from `get` and `mget`,
    /// key names from `scan`. `mget` goes out in batches sized to what is
    /// left of it, so neither the daemon nor Redis holds more than about
    /// this for one call (a 1 MiB value asked for 10,000 times in one
    /// `mget` would otherwise be 10 GiB in both). 0 means unlimited (only
    /// when set explicitly).
    pub read_bytes: usize,
    /// Log lines per event; more are counted and dropped.
    pub log_lines: u32,
    /// Wall-clock time per call, Redis round trips included.
    #[serde(with = "millis")]
    pub wall_time: Duration,
}

impl Default for Budgets {
    fn default() -> Budgets {
        Budgets {
            fuel: 500_000_000,
            memory_bytes: 64 << 20,
            host_calls: 1_000,
            keys_touched: 1_000_000,
            keys_examined: 10_000_000,
            examined_per_sec: 1_000_000,
            value_bytes: 1 << 20,
            read_bytes: 16 << 20,
            log_lines: 200,
            wall_time: Duration::from_secs(30),
        }
    }
}

impl Budgets {
    /// The keys-touched limit as a count (`u64::MAX` when unlimited).
    pub fn keys_limit(&self) -> u64 {
        if self.keys_touched == 0 { u64::MAX } else { self.keys_touched }
    }

    /// The read-bytes limit (`usize::MAX` when unlimited).
    pub fn read_limit(&self) -> usize {
        if self.read_bytes == 0 { usize::MAX } else { self.read_bytes }
    }

    /// The keys-examined limit as a count (`u64::MAX` when unlimited).
    pub fn examined_limit(&self) -> u64 {
        if self.keys_examined == 0 { u64::MAX } else { self.keys_examined }
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}
