//! What the daemon does with a policy that keeps failing: a circuit breaker
//! around every policy, and the operator's choice of what a trip means.
//!
//! Each failed call already fails only itself (see `runtime`). The breaker
//! counts failures in a sliding window; `threshold` of them trip it. Then,
//! per the policy's `on_failure`:
//! - `fail-open`: log it loudly and keep delivering (the default: a
//!   policy's failures cost only its own events);
//! - `quarantine`: deliver nothing for a cool-down (events are dropped and
//!   reconciled by a `sweep(gap)` afterwards; deploy hooks fail, so they are
//!   retried and dead-lettered by the deploy reader), then try again;
//! - `reload`: the same, and the policy's instance is re-created before it
//!   is tried again.
//!
//! The cool-down doubles with each trip in a row, up to a cap, and resets
//! after a success. Every change of health (healthy, degraded, tripped) is
//! logged once, not once per event.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tracing::{error, info, warn};

/// What a tripped breaker does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    #[default]
    FailOpen,
    Quarantine,
    Reload,
}

/// An operator's failure settings for one policy (`[policies.NAME.failure]`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailurePolicy {
    pub on_failure: OnFailure,
    /// Failures within `window_secs` that trip the breaker.
    pub threshold: u32,
    pub window_secs: u64,
    /// The first cool-down; doubled with each trip in a row.
    pub cooldown_secs: u64,
    pub max_cooldown_secs: u64,
}

impl Default for FailurePolicy {
    fn default() -> FailurePolicy {
        FailurePolicy {
            on_failure: OnFailure::FailOpen,
            threshold: 5,
            window_secs: 60,
            cooldown_secs: 30,
            max_cooldown_secs: 600,
        }
    }
}

/// A policy's health, as logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Failures in the window, fewer than the threshold.
    Degraded,
    /// The threshold was reached.
    Tripped,
}

/// What the worker does with the next event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    Deliver,
    /// Hold off until then (quarantine or reload back-off).
    Wait(Instant),
}

/// One policy's breaker.
pub struct Breaker {
    settings: FailurePolicy,
    policy: String,
    failures: VecDeque<Instant>,
    health: Health,
    /// Trips in a row (reset by a success).
    trips: u32,
    /// Trips ever: a call that started before the last one says nothing
    /// about the policy since (see [`Breaker::epoch`]).
    epoch: u64,
    open_until: Option<Instant>,
}

impl Breaker {
    pub fn new(policy: &str, settings: FailurePolicy) -> Breaker {
        Breaker {
            settings,
            policy: policy.to_owned(),
            failures: VecDeque::new(),
            health: Health::Healthy,
            trips: 0,
            epoch: 0,
            open_until: None,
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Deliver now, or wait for the cool-down to end.
    pub fn admit(&self, now: Instant) -> Admit {
        match self.open_until {
            Some(until) if now < until => Admit::Wait(until),
            _ => Admit::Deliver,
        }
    }

    /// Changes whenever the breaker trips. A policy with several calls in
    /// flight records only those that started after the last trip: one
    /// that began before and succeeds after must not lift a quarantine.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Record a call's result. Returns `true` when this failure tripped a
    /// `reload` breaker: the caller re-creates the instance.
    pub fn record(&mut self, ok: bool, now: Instant) -> bool {
        let window = Duration::from_secs(self.settings.window_secs);
        while self.failures.front().is_some_and(|t| now.duration_since(*t) > window) {
            self.failures.pop_front();
        }
        if ok {
            self.trips = 0;
            self.open_until = None;
            if self.health == Health::Tripped || self.failures.is_empty() {
                self.set_health(Health::Healthy, "");
            }
            return false;
        }
        self.failures.push_back(now);
        if (self.failures.len() as u32) < self.settings.threshold.max(1) {
            if self.health == Health::Healthy {
                self.set_health(Health::Degraded, "");
            }
            return false;
        }
        self.trips += 1;
        self.epoch += 1;
        self.failures.clear();
        let cooldown = Duration::from_secs(self.settings.cooldown_secs)
            .saturating_mul(1 << (self.trips - 1).min(16))
            .min(Duration::from_secs(self.settings.max_cooldown_secs));
        let action = match self.settings.on_failure {
            OnFailure::FailOpen => "fail-open: still delivering".to_owned(),
            OnFailure::Quarantine => {
                format!("quarantined for {} s: events are dropped and swept afterwards", cooldown.as_secs())
            }
            OnFailure::Reload => format!("re-creating it, next try in {} s", cooldown.as_secs()),
        };
        if self.settings.on_failure != OnFailure::FailOpen {
            self.open_until = Some(now + cooldown);
        }
        self.set_health(Health::Tripped, &action);
        self.settings.on_failure == OnFailure::Reload
    }

    fn set_health(&mut self, health: Health, action: &str) {
        let was = std::mem::replace(&mut self.health, health);
        let policy = &self.policy;
        match health {
            Health::Tripped => error!(
                policy = %policy,
                threshold = self.settings.threshold,
                window_secs = self.settings.window_secs,
                trips = self.trips,
                "policy tripped its circuit breaker ({} failures within {} s); {action}",
                self.settings.threshold,
                self.settings.window_secs
            ),
            _ if was == health => {}
            Health::Degraded => warn!(policy = %policy, "policy degraded: a call failed"),
            Health::Healthy => info!(policy = %policy, "policy healthy again"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(on_failure: OnFailure) -> FailurePolicy {
        FailurePolicy { on_failure, threshold: 3, window_secs: 10, cooldown_secs: 5, max_cooldown_secs: 12 }
    }

    #[test]
    fn failures_degrade_then_trip_and_a_success_heals() {
        let t0 = Instant::now();
        let mut b = Breaker::new("p", settings(OnFailure::Quarantine));
        assert!(!b.record(false, t0));
        assert_eq!(b.health(), Health::Degraded);
        assert_eq!(b.admit(t0), Admit::Deliver);
        b.record(false, t0);
        b.record(false, t0);
        assert_eq!(b.health(), Health::Tripped);
        assert_eq!(b.admit(t0), Admit::Wait(t0 + Duration::from_secs(5)));
        assert_eq!(b.admit(t0 + Duration::from_secs(5)), Admit::Deliver, "half-open after the cool-down");
        b.record(true, t0 + Duration::from_secs(5));
        assert_eq!(b.health(), Health::Healthy);
        assert_eq!(b.admit(t0 + Duration::from_secs(5)), Admit::Deliver);
    }

    #[test]
    fn old_failures_leave_the_window() {
        let t0 = Instant::now();
        let mut b = Breaker::new("p", settings(OnFailure::Quarantine));
        b.record(false, t0);
        b.record(false, t0);
        b.record(false, t0 + Duration::from_secs(11));
        assert_eq!(b.health(), Health::Degraded, "two of the three fell out of the 10 s window");
    }

    #[test]
    fn cool_downs_double_up_to_the_cap_and_fail_open_never_waits() {
        let t0 = Instant::now();
        let mut b = Breaker::new("p", settings(OnFailure::Reload));
        let trip = |b: &mut Breaker, at: Instant| (0..3).map(|_| b.record(false, at)).last().unwrap();
        assert!(trip(&mut b, t0), "a reload breaker asks for a fresh instance");
        assert_eq!(b.admit(t0), Admit::Wait(t0 + Duration::from_secs(5)));
        let t1 = t0 + Duration::from_secs(5);
        trip(&mut b, t1);
        assert_eq!(b.admit(t1), Admit::Wait(t1 + Duration::from_secs(10)));
        let t2 = t1 + Duration::from_secs(10);
        trip(&mut b, t2);
        assert_eq!(b.admit(t2), Admit::Wait(t2 + Duration::from_secs(12)), "capped");

        let mut open = Breaker::new("p", settings(OnFailure::FailOpen));
        assert!(!trip(&mut open, t0));
        assert_eq!(open.health(), Health::Tripped);
        assert_eq!(open.admit(t0), Admit::Deliver);
    }
}
