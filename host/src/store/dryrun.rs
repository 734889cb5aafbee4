//! Dry-run: a policy runs for real but its writes are only logged.
//!
//! Ops roll a policy out in `mode = "dry-run"` before `enforce`. Reads go to
//! Redis as usual, so the policy makes the decisions it would make in
//! production; every write is looked up instead of performed (does the key
//! exist? would the TTL condition hold? how many keys match?), logged as
//! "would ...", and answered as Redis would have, so the policy's own
//! counts and the audit trail show what enforcing would do.

use async_trait::async_trait;

use crate::store::backend::{Backend, BackendError, BulkPlan, BulkResult, Rows, WriteLayer, expire_applies, scan_each};
use crate::wit::{ExpireCondition, ExpireRow, KeyTtl, SetCondition, SetOptions};

/// The token a dry-run "acquires"; nothing is locked.
const DRY_RUN_TOKEN: &str = "dry-run";

/// The write layer of a policy in dry-run mode.
pub struct DryRunLayer {
    policy: String,
}

impl DryRunLayer {
    pub fn new(policy: &str) -> DryRunLayer {
        DryRunLayer { policy: policy.to_owned() }
    }

    fn would(&self, action: &str, target: &str, effect: impl std::fmt::Display) {
        tracing::info!(target: "cachepol::audit", policy = %self.policy, dry_run = true, "would {action} {target}: {effect}");
    }
}

/// Remaining TTL in ms, `None` if persistent, `Err` if the key is missing.
async fn current_ttl(inner: &dyn Backend, key: &str) -> Result<Result<Option<u64>, ()>, BackendError> {
    Ok(match inner.ttl(key).await? {
        KeyTtl::Missing => Err(()),
        KeyTtl::Persistent => Ok(None),
        KeyTtl::ExpiresInMs(ms) => Ok(Some(ms)),
    })
}

#[async_trait]
impl WriteLayer for DryRunLayer {
    async fn set(&self, inner: &dyn Backend, key: &str, _: &[u8], options: &SetOptions) -> Result<bool, BackendError> {
        let exists = inner.exists(key).await?;
        let writes = match options.condition {
            SetCondition::Always => true,
            SetCondition::IfAbsent => !exists,
            SetCondition::IfPresent => exists,
        };
        self.would("SET", key, if writes { "written" } else { "not written (condition)" });
        Ok(writes)
    }

    async fn del(&self, inner: &dyn Backend, keys: &[String]) -> Result<u64, BackendError> {
        let mut existing = 0;
        for key in keys {
            existing += u64::from(inner.exists(key).await?);
        }
        self.would("UNLINK", &keys.join(" "), format_args!("{existing} existing keys deleted"));
        Ok(existing)
    }

    async fn expire(
        &self,
        inner: &dyn Backend,
        key: &str,
        ttl_ms: u64,
        condition: ExpireCondition,
    ) -> Result<bool, BackendError> {
        let applies = match current_ttl(inner, key).await? {
            Ok(current) => expire_applies(condition, current, ttl_ms),
            Err(()) => false,
        };
        self.would("PEXPIRE", key, format_args!("{ttl_ms} ms {}", if applies { "set" } else { "not set" }));
        Ok(applies)
    }

    async fn persist(&self, inner: &dyn Backend, key: &str) -> Result<bool, BackendError> {
        let volatile = matches!(current_ttl(inner, key).await?, Ok(Some(_)));
        self.would("PERSIST", key, if volatile { "TTL removed" } else { "nothing to do" });
        Ok(volatile)
    }

    async fn delete_matching(
        &self,
        inner: &dyn Backend,
        pattern: &str,
        plan: &BulkPlan<'_>,
    ) -> Result<BulkResult, BackendError> {
        let result = scan_each(inner, pattern, plan, |_| true).await?;
        self.would(
            "delete-matching",
            pattern,
            format_args!("{} keys deleted, e.g. {}", result.affected, result.sample.join(" ")),
        );
        Ok(result)
    }

    async fn expire_matching(
        &self,
        inner: &dyn Backend,
        rows: &[ExpireRow],
        plan: &BulkPlan<'_>,
    ) -> Result<BulkResult, BackendError> {
        let rows = Rows::new(rows);
        let pattern = rows.scan_pattern();
        // Keys no row matches are passed over, not refused.
        let allow = |key: &[u8]| rows.row_of(key).is_none() || (plan.allow)(key);
        // Collect first: deciding per key needs a TTL lookup, which cannot
        // happen inside the scan's synchronous visitor.
        let mut keys = Vec::new();
        let scanned = scan_each(inner, &pattern, &BulkPlan { allow: &allow, ..*plan }, |k| {
            let row = rows.row_of(k);
            if let Some(row) = row {
                keys.push((String::from_utf8_lossy(k).into_owned(), row));
            }
            row.is_some()
        })
        .await?;
        let mut result = BulkResult { refused: scanned.refused, truncated: scanned.truncated, ..BulkResult::default() };
        for (key, row) in keys {
            let applies = match current_ttl(inner, &key).await? {
                Ok(current) => !row.only_if_persistent || current.is_none(),
                Err(()) => false,
            };
            if applies {
                result.record(key.as_bytes());
            }
        }
        self.would(
            "expire-matching",
            &pattern,
            format_args!("{} keys get their row's TTL, e.g. {}", result.affected, result.sample.join(" ")),
        );
        Ok(result)
    }

    async fn lock_acquire(&self, inner: &dyn Backend, name: &str, ttl_ms: u64) -> Result<Option<String>, BackendError> {
        let free = !inner.exists(name).await?;
        self.would("lock", name, format_args!("{} for {ttl_ms} ms", if free { "acquired" } else { "held elsewhere" }));
        Ok(free.then(|| DRY_RUN_TOKEN.to_owned()))
    }

    async fn lock_release(&self, _: &dyn Backend, name: &str, token: &str) -> Result<bool, BackendError> {
        let ours = token == DRY_RUN_TOKEN;
        self.would("unlock", name, if ours { "released" } else { "not ours" });
        Ok(ours)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::backend::Layered;
    use crate::store::memory::FakeRedis;

    #[tokio::test]
    async fn dry_run_reports_what_would_happen_and_changes_nothing() {
        let redis = FakeRedis::new();
        for key in ["quiz:1", "quiz:2", "job:1"] {
            redis.app_set(key, b"v", None);
        }
        redis.app_set("job:2", b"v", Some(5000));
        let before = redis.snapshot();
        redis.take_events();
        let dry = Layered { inner: Arc::new(redis.client("p")), layer: DryRunLayer::new("p") };
        let allow = |_: &[u8]| true;
        let plan = BulkPlan::new(&allow, u64::MAX);

        assert_eq!(dry.delete_matching("quiz:*", &plan).await.unwrap().affected, 2);
        let row = ExpireRow { pattern: "job:*".into(), ttl_ms: 1000, only_if_persistent: true };
        assert_eq!(dry.expire_matching(std::slice::from_ref(&row), &plan).await.unwrap().affected, 1);
        assert_eq!(dry.del(&["quiz:1".into(), "nope".into()]).await.unwrap(), 1);
        assert!(dry.expire("job:1", 10, ExpireCondition::IfPersistent).await.unwrap());
        assert!(!dry.expire("job:2", 10_000, ExpireCondition::IfShorter).await.unwrap());
        assert!(
            !dry.set("quiz:1", b"x", &SetOptions { ttl_ms: None, condition: SetCondition::IfAbsent, keep_ttl: false })
                .await
                .unwrap()
        );
        let token = dry.lock_acquire("lock:a", 100).await.unwrap().unwrap();
        assert!(dry.lock_release("lock:a", &token).await.unwrap());

        assert_eq!(redis.snapshot(), before, "dry-run wrote nothing");
        assert!(redis.take_events().is_empty());
    }
}
