//! The audit trail: what policy calls did to the cache.
//!
//! Each call that changed (or, in dry-run, would have changed) something
//! gets a line with a sample of its keys. Keyspace events can come by the
//! hundred thousand a second, though: past [`LINES_PER_WINDOW`] lines in a
//! second, a policy's further key events are summed ([`Tally`]) and logged
//! as one line at the end of the second, with exact counts.
//!
//! Lines go to the `cachepol::audit` target so they can be routed apart from
//! operational logs (`RUST_LOG=cachepol::audit=info`).

use std::time::{Duration, Instant};

use crate::config::Mode;
use crate::sandbox::runtime::CallReport;

/// The window over which key events' lines are counted.
pub const TALLY_EVERY: Duration = Duration::from_secs(1);

/// Key events logged one by one per policy per window; the rest are summed.
pub const LINES_PER_WINDOW: u32 = 100;

/// A policy's keyspace events in the current window.
#[derive(Debug, Default)]
pub struct Tally {
    /// Lines written one by one in this window.
    lines: u32,
    /// Debug lines for calls that changed nothing, in this window.
    quiet: u32,
    /// When the window started.
    window: Option<Instant>,
    calls: u64,
    failed: u64,
    deleted: u64,
    expired: u64,
    written: u64,
    locks: u64,
    denied: u64,
    /// When the first call not yet logged finished.
    since: Option<Instant>,
}

impl Tally {
    /// Log one call for `events` keyspace events, or add it to the
    /// window's sum.
    pub fn add(&mut self, policy: &str, event_id: &str, events: usize, mode: Mode, report: &CallReport) {
        let now = Instant::now();
        if self.window.is_none_or(|w| now >= w + TALLY_EVERY) {
            self.flush(policy, mode);
            self.window = Some(now);
        }
        if !changed(report) {
            // Bounded like the audit lines: `-v` must not slow a busy
            // policy down to the speed of the log.
            if self.quiet < LINES_PER_WINDOW {
                self.quiet += 1;
                unchanged(policy, event_id, report);
            }
            return;
        }
        if self.lines < LINES_PER_WINDOW {
            self.lines += 1;
            return record(policy, event_id, mode, report);
        }
        let e = &report.call.effects;
        self.calls += events as u64;
        self.failed += u64::from(report.result.is_err());
        self.deleted += e.deleted;
        self.expired += e.expired;
        self.written += e.written;
        self.locks += e.locks;
        self.denied += u64::from(report.call.denials_total);
        self.since.get_or_insert(now);
    }

    /// When the line for what is summed now is due (the window's end), if
    /// anything is.
    pub fn due(&self) -> Option<Instant> {
        self.since.and(self.window).map(|w| w + TALLY_EVERY)
    }

    /// Write the sum (if anything was summed) and start a new window.
    pub fn flush(&mut self, policy: &str, mode: Mode) {
        let t = std::mem::take(self);
        if t.deleted == 0 && t.expired == 0 && t.written == 0 && t.locks == 0 && t.denied == 0 {
            return;
        }
        tracing::info!(
            target: "cachepol::audit",
            policy,
            more_events = t.calls,
            failed = t.failed,
            dry_run = mode == Mode::DryRun,
            deleted = t.deleted,
            expired = t.expired,
            written = t.written,
            locks = t.locks,
            denied = t.denied,
            ms = t.since.map_or(0, |s| s.elapsed().as_millis() as u64),
            "{}: {} deleted, {} expired, {} written{} in {} more keyspace events (past {LINES_PER_WINDOW} lines a second, summed)",
            verb(mode),
            t.deleted,
            t.expired,
            t.written,
            if t.denied > 0 { format!(", {} denied", t.denied) } else { String::new() },
            t.calls,
        );
    }
}

fn changed(report: &CallReport) -> bool {
    let e = &report.call.effects;
    e.deleted + e.expired + e.written + e.locks > 0 || report.call.denials_total > 0
}

fn verb(mode: Mode) -> &'static str {
    match mode {
        Mode::Enforce => "did",
        Mode::DryRun => "would have",
    }
}

/// A call that changed nothing: a debug line (shown at `-v`), so a policy
/// can be watched at work without filling the audit trail.
fn unchanged(policy: &str, event_id: &str, report: &CallReport) {
    tracing::debug!(
        target: "cachepol::audit",
        policy,
        event = event_id,
        ok = report.result.is_ok(),
        elapsed_ms = report.elapsed.as_millis() as u64,
        "no change{}",
        match &report.result {
            Ok(outcome) => outcome.note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default(),
            Err(e) => format!(": {e}"),
        }
    );
}

/// Log the effects of one call, if it had any.
pub fn record(policy: &str, event_id: &str, mode: Mode, report: &CallReport) {
    if !changed(report) {
        return unchanged(policy, event_id, report);
    }
    let e = &report.call.effects;
    let verb = verb(mode);
    let note = report.result.as_ref().ok().and_then(|o| o.note.as_deref()).unwrap_or("");
    tracing::info!(
        target: "cachepol::audit",
        policy,
        event = event_id,
        dry_run = mode == Mode::DryRun,
        deleted = e.deleted,
        expired = e.expired,
        written = e.written,
        locks = e.locks,
        denied = report.call.denials_total,
        sample = %e.sample.join(" "),
        ok = report.result.is_ok(),
        elapsed_ms = report.elapsed.as_millis() as u64,
        "{verb}: {} deleted, {} expired, {} written{}{}",
        e.deleted,
        e.expired,
        e.written,
        if report.call.denials_total > 0 { format!(", {} denied", report.call.denials_total) } else { String::new() },
        if note.is_empty() { String::new() } else { format!(" ({note})") },
    );
}
