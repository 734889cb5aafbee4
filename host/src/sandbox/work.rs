//! How much of Redis's main thread one policy may keep busy.
//!
//! Per-call budgets bound what one call examines, but not how often: a
//! policy that calls `delete-matching("x:none:*")` (nothing to delete, a
//! full `SCAN` to find that out) on every event, from every lane, keeps
//! Redis's one thread scanning while the application waits. So the keys
//! a policy's scans and bulk operations examine (`COUNT` per `SCAN` page
//! walked, each key taken from the key index) are also metered per policy
//! per second, across its lanes: a token bucket holding one second's
//! allowance. A call that finds the policy in debt waits until it is paid
//! off, or fails on the `redis_work` budget when that would outlast its
//! wall time.
//!
//! The default allowance, 1,000,000 keys a second, is about three times
//! what one connection's `SCAN` walk examines per second on these machines
//! (the bench's bare pass: 300,000 a second), so a sweep or a policy's own
//! scan walks at full speed, while sixteen lanes of empty scans are held
//! to about three walks' worth of Redis's thread instead of sixteen.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One policy's meter, shared by its lanes.
#[derive(Debug)]
pub struct WorkMeter {
    per_sec: u64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Keys that may still be examined now; negative when in debt.
    balance: i128,
    at: Instant,
}

impl WorkMeter {
    /// A meter allowing `per_sec` keys examined a second (0: unlimited).
    pub fn new(per_sec: u64) -> WorkMeter {
        WorkMeter { per_sec, state: Mutex::new(Bucket { balance: i128::from(per_sec), at: Instant::now() }) }
    }

    /// How long until the policy is out of debt (zero: it may go on now).
    pub fn wait(&self) -> Duration {
        if self.per_sec == 0 {
            return Duration::ZERO;
        }
        let bucket = self.refilled();
        if bucket.balance >= 0 {
            return Duration::ZERO;
        }
        let debt = bucket.balance.unsigned_abs();
        Duration::from_secs_f64(debt as f64 / self.per_sec as f64)
    }

    /// Count `keys` examined.
    pub fn charge(&self, keys: u64) {
        if self.per_sec == 0 || keys == 0 {
            return;
        }
        self.refilled().balance -= i128::from(keys);
    }

    /// The bucket, topped up for the time since it was last looked at (to
    /// at most one second's allowance).
    fn refilled(&self) -> std::sync::MutexGuard<'_, Bucket> {
        let mut bucket = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let earned = now.saturating_duration_since(bucket.at).as_secs_f64() * self.per_sec as f64;
        bucket.balance = (bucket.balance + earned as i128).min(i128::from(self.per_sec));
        bucket.at = now;
        bucket
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_of_work_is_free_and_more_is_owed() {
        let meter = WorkMeter::new(1_000_000);
        assert_eq!(meter.wait(), Duration::ZERO);
        meter.charge(1_000_000);
        assert!(meter.wait() < Duration::from_millis(100), "the first second's worth is allowed at once");
        meter.charge(3_000_000);
        let wait = meter.wait();
        assert!(wait > Duration::from_millis(2_500) && wait <= Duration::from_secs(3), "{wait:?}");
    }

    #[test]
    fn zero_means_unlimited() {
        let meter = WorkMeter::new(0);
        meter.charge(u64::MAX);
        assert_eq!(meter.wait(), Duration::ZERO);
    }
}
