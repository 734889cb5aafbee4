//! The audit trail: what each policy call did to the cache, one log line per
//! call that changed (or, in dry-run, would have changed) something.
//!
//! Lines go to the `cachepol::audit` target so they can be routed apart from
//! operational logs (`RUST_LOG=cachepol::audit=info`).

use crate::config::Mode;
use crate::sandbox::runtime::CallReport;

/// Log the effects of one call, if it had any.
pub fn record(policy: &str, event_id: &str, mode: Mode, report: &CallReport) {
    let e = &report.call.effects;
    if e.deleted == 0 && e.expired == 0 && e.written == 0 && e.locks == 0 && report.call.denials_total == 0 {
        return;
    }
    let verb = match mode {
        Mode::Enforce => "did",
        Mode::DryRun => "would have",
    };
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
