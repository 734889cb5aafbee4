//! Writes only while this daemon holds its lease.
//!
//! Replicas share the work under a lease ([`crate::dispatch::lease`]): a
//! holding is valid until a deadline on this process's monotonic clock,
//! before which no other daemon can take it. Checking the lease when a call
//! starts is not enough: a holder frozen mid-call (a `SIGSTOP`, a VM
//! paused, a long GC of the host) past its TTL would, once woken, go on
//! writing after another replica took over. So every write of a policy
//! goes through [`HoldingLayer`], which asks whether the lease is still
//! held just before it: single writes fail at once when it is not, and a
//! bulk operation checks before taking each key into a page (a page is
//! sent right after its keys are taken, with no wait in between), so a
//! holder woken after losing its lease sends no further page. The call
//! then fails as Redis being unavailable to this daemon, and the work is
//! the new holder's (a hook is left pending for it, a sweep is its).
//!
//! Whether the lease is held is a closure given by the daemon's wiring
//! (the store knows nothing of leases); with replicas off it is always
//! true.

use std::sync::Arc;

use async_trait::async_trait;

use crate::store::backend::{Backend, BackendError, BulkPlan, BulkResult, QueuedExpire, WriteLayer};
use crate::wit::{ExpireCondition, ExpireRow, SetOptions};

/// Whether this daemon may write now.
pub type Holds = Arc<dyn Fn() -> bool + Send + Sync>;

/// The write layer that refuses writes once the lease is lost.
pub struct HoldingLayer {
    holds: Holds,
}

impl HoldingLayer {
    pub fn new(holds: Holds) -> HoldingLayer {
        HoldingLayer { holds }
    }

    fn check(&self) -> Result<(), BackendError> {
        if (self.holds)() { Ok(()) } else { Err(lost()) }
    }

    /// `plan`'s filter, refusing every key once the lease is lost (asked
    /// last, nearest the page's send).
    fn guarded<'a>(&'a self, plan: &'a BulkPlan<'_>) -> impl Fn(&[u8]) -> bool + Send + Sync + 'a {
        move |key: &[u8]| (plan.allow)(key) && (self.holds)()
    }
}

fn lost() -> BackendError {
    BackendError::Unavailable(
        "this daemon no longer holds its lease (another replica may have taken over): it writes nothing more".into(),
    )
}

#[async_trait]
impl WriteLayer for HoldingLayer {
    async fn set(
        &self,
        inner: &dyn Backend,
        key: &str,
        value: &[u8],
        options: &SetOptions,
    ) -> Result<bool, BackendError> {
        self.check()?;
        inner.set(key, value, options).await
    }

    async fn del(&self, inner: &dyn Backend, keys: &[String]) -> Result<u64, BackendError> {
        self.check()?;
        inner.del(keys).await
    }

    async fn expire(
        &self,
        inner: &dyn Backend,
        key: &str,
        ttl_ms: u64,
        condition: ExpireCondition,
    ) -> Result<bool, BackendError> {
        self.check()?;
        inner.expire(key, ttl_ms, condition).await
    }

    async fn persist(&self, inner: &dyn Backend, key: &str) -> Result<bool, BackendError> {
        self.check()?;
        inner.persist(key).await
    }

    async fn expire_many(&self, inner: &dyn Backend, items: &[QueuedExpire]) -> Result<Vec<bool>, BackendError> {
        self.check()?;
        inner.expire_many(items).await
    }

    async fn delete_matching(
        &self,
        inner: &dyn Backend,
        pattern: &str,
        plan: &BulkPlan<'_>,
    ) -> Result<BulkResult, BackendError> {
        self.check()?;
        let allow = self.guarded(plan);
        let result = inner.delete_matching(pattern, &BulkPlan { allow: &allow, ..*plan }).await?;
        self.check().map(|()| result)
    }

    async fn expire_matching(
        &self,
        inner: &dyn Backend,
        rows: &[ExpireRow],
        plan: &BulkPlan<'_>,
    ) -> Result<BulkResult, BackendError> {
        self.check()?;
        let allow = self.guarded(plan);
        let result = inner.expire_matching(rows, &BulkPlan { allow: &allow, ..*plan }).await?;
        self.check().map(|()| result)
    }

    async fn lock_acquire(&self, inner: &dyn Backend, name: &str, ttl_ms: u64) -> Result<Option<String>, BackendError> {
        self.check()?;
        inner.lock_acquire(name, ttl_ms).await
    }

    async fn lock_release(&self, inner: &dyn Backend, name: &str, token: &str) -> Result<bool, BackendError> {
        self.check()?;
        inner.lock_release(name, token).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::store::backend::Layered;
    use crate::store::memory::FakeRedis;
    use crate::wit::SetCondition;

    const PLAIN: SetOptions = SetOptions { ttl_ms: None, condition: SetCondition::Always, keep_ttl: false };

    #[tokio::test]
    async fn once_the_lease_is_lost_nothing_more_is_written() {
        let held = Arc::new(AtomicBool::new(true));
        let fake: Arc<dyn Backend> = Arc::new(FakeRedis::new().client("p"));
        let flag = held.clone();
        let backend =
            Layered { inner: fake.clone(), layer: HoldingLayer::new(Arc::new(move || flag.load(Ordering::Relaxed))) };
        backend.set("a:1", b"v", &PLAIN).await.unwrap();
        backend.set("a:2", b"v", &PLAIN).await.unwrap();
        // Lost in the middle of a bulk delete: the key it was taking when
        // the lease lapsed, and every later one, stay.
        let seen = std::sync::atomic::AtomicU32::new(0);
        let allow = |_: &[u8]| {
            if seen.fetch_add(1, Ordering::Relaxed) == 0 {
                held.store(false, Ordering::Relaxed);
            }
            true
        };
        let err = backend.delete_matching("a:*", &BulkPlan::new(&allow, 100)).await.unwrap_err();
        assert!(
            matches!(err, BackendError::Unavailable(ref why) if why.contains("no longer holds its lease")),
            "{err}"
        );
        assert!(fake.exists("a:1").await.unwrap() && fake.exists("a:2").await.unwrap());
        assert!(backend.set("a:3", b"v", &PLAIN).await.is_err());
        assert!(backend.del(&["a:1".into()]).await.is_err());
        assert!(!fake.exists("a:3").await.unwrap());
    }
}
