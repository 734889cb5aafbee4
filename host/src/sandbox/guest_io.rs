//! A policy's stdout and stderr, routed into the host's `tracing` output.
//!
//! Guests get an empty WASI context, but Rust's panic handler still writes
//! its message to stderr before aborting. Those bytes must not reach the
//! daemon's own stderr untagged, and the panic message is the most useful
//! part of a failure report, so each stream becomes log lines tagged with the
//! policy, and stderr's recent tail is kept for the runtime to quote.
//!
//! Lines count against the call's log budget, shared with the policy's
//! `log` import ([`LogAllowance`]): the daemon's log writer never drops a
//! line (audit lines must not be lost), so a guest printing without end
//! would make every thread that logs wait on it, the Redis reader included.
//! Past the budget, output is dropped with one line saying so.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Longest line logged as one; longer output is split.
const MAX_LINE: usize = 4096;
/// How much of stderr's recent output is kept for failure reports.
const TAIL: usize = 8192;

/// The lines one call may log, shared by a policy's `log` import and its
/// stdout and stderr. Reset at the start of every call.
#[derive(Clone, Debug)]
pub struct LogAllowance(Arc<Counts>);

#[derive(Debug)]
struct Counts {
    limit: u32,
    asked: AtomicU32,
}

/// What to do with one line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineVerdict {
    Log,
    /// The first line past the budget: say that output is being dropped.
    Truncate,
    Drop,
}

impl LogAllowance {
    pub fn new(limit: u32) -> LogAllowance {
        LogAllowance(Arc::new(Counts { limit, asked: AtomicU32::new(0) }))
    }

    /// A new call: the whole budget again.
    pub fn reset(&self) {
        self.0.asked.store(0, Ordering::Relaxed);
    }

    /// Ask to log one line.
    pub fn take(&self) -> LineVerdict {
        let n = self.0.asked.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        match n.cmp(&self.0.limit.saturating_add(1)) {
            std::cmp::Ordering::Less => LineVerdict::Log,
            std::cmp::Ordering::Equal => LineVerdict::Truncate,
            std::cmp::Ordering::Greater => LineVerdict::Drop,
        }
    }

    /// Whether a line asked for now would be logged.
    fn has_room(&self) -> bool {
        self.0.asked.load(Ordering::Relaxed) < self.0.limit
    }

    /// Lines asked for in this call, and how many of them were dropped.
    pub fn counts(&self) -> (u32, u32) {
        let asked = self.0.asked.load(Ordering::Relaxed);
        (asked, asked.saturating_sub(self.0.limit))
    }
}

/// Longest text a policy puts anywhere a person reads (an error, a note, a
/// denied key in a log line, a dead-letter reason, `/status`): a policy
/// returning a 60 MB error on every call must not write 60 MB each time.
pub const MAX_SHOWN: usize = 1024;

/// `text` cut to [`MAX_SHOWN`] bytes (at a character boundary), saying
/// how long it was.
pub fn clip(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_SHOWN {
        return text.into();
    }
    format!("{}… ({} bytes in all)", cut(text, MAX_SHOWN), text.len()).into()
}

/// `text`'s first `max` bytes at most, ending on a character boundary.
pub fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// [`clip`], in place.
pub fn clip_owned(text: &mut String) {
    if text.len() > MAX_SHOWN {
        *text = clip(text).into_owned();
    }
}

/// Log the one line that says a policy's output is being dropped.
pub fn log_truncated(policy: &str, limit: u32) {
    tracing::warn!(target: "cachepol::guest", policy, limit, "output truncated: the log budget of {limit} lines per event is spent");
}

#[cfg(test)]
mod clip_tests {
    use super::*;

    #[test]
    fn long_text_is_cut_and_says_how_long_it_was() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(5_000_000);
        let shown = clip(&long);
        assert!(shown.len() < MAX_SHOWN + 40, "{}", shown.len());
        assert!(shown.ends_with("… (10000000 bytes in all)"), "{}", &shown[shown.len() - 40..]);
    }
}

/// One guest output stream (stdout or stderr) of one policy instance.
#[derive(Clone)]
pub struct GuestOutput {
    inner: Arc<Inner>,
}

struct Inner {
    policy: Mutex<Arc<str>>,
    stream: &'static str,
    buffers: Mutex<Buffers>,
    allowance: LogAllowance,
}

#[derive(Default)]
struct Buffers {
    partial: Vec<u8>,
    recent: Vec<u8>,
}

impl GuestOutput {
    pub fn new(policy: Arc<str>, stream: &'static str, allowance: LogAllowance) -> GuestOutput {
        GuestOutput {
            inner: Arc::new(Inner {
                policy: Mutex::new(policy),
                stream,
                buffers: Mutex::new(Buffers::default()),
                allowance,
            }),
        }
    }

    /// Tag later lines with `policy` (the name is known only after
    /// `describe`).
    pub fn rename(&self, policy: Arc<str>) {
        *self.inner.policy.lock().unwrap_or_else(|e| e.into_inner()) = policy;
    }

    /// Take what was written since the last call (at most the last 8 KiB).
    pub fn take_recent(&self) -> String {
        let mut b = self.inner.buffers.lock().unwrap_or_else(|e| e.into_inner());
        let recent = std::mem::take(&mut b.recent);
        String::from_utf8_lossy(&recent).into_owned()
    }

    fn write(&self, bytes: &[u8]) {
        let mut b = self.inner.buffers.lock().unwrap_or_else(|e| e.into_inner());
        b.recent.extend_from_slice(bytes);
        if b.recent.len() > TAIL {
            let cut = b.recent.len() - TAIL;
            b.recent.drain(..cut);
        }
        // Past the budget only the tail is kept: splitting megabytes into
        // lines nobody will see is work for nothing.
        if !self.inner.allowance.has_room() {
            b.partial.clear();
            for _ in bytes.iter().filter(|&&byte| byte == b'\n') {
                self.take_line();
            }
            return;
        }
        for &byte in bytes {
            if byte == b'\n' || b.partial.len() >= MAX_LINE {
                let line = std::mem::take(&mut b.partial);
                self.emit(&line);
                if byte == b'\n' {
                    continue;
                }
            }
            b.partial.push(byte);
        }
    }

    fn emit(&self, line: &[u8]) {
        if self.take_line() {
            let policy = self.inner.policy.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let text = String::from_utf8_lossy(line);
            tracing::info!(target: "cachepol::guest", policy = %policy, stream = self.inner.stream, "{}", text.trim_end());
        }
    }

    /// Count one line against the budget; whether to log it.
    fn take_line(&self) -> bool {
        match self.inner.allowance.take() {
            LineVerdict::Log => true,
            LineVerdict::Truncate => {
                let policy = self.inner.policy.lock().unwrap_or_else(|e| e.into_inner()).clone();
                log_truncated(&policy, self.inner.allowance.0.limit);
                false
            }
            LineVerdict::Drop => false,
        }
    }
}

/// Pull the panic message out of stderr output, if the guest panicked.
/// Rust prints `thread '...' panicked at FILE:LINE:COL:\nMESSAGE`.
pub fn panic_message(stderr: &str) -> Option<String> {
    let at = stderr.rfind("panicked at ")?;
    let rest = &stderr[at + "panicked at ".len()..];
    let (location, message) = rest.split_once('\n').unwrap_or((rest, ""));
    let message = message.lines().next().unwrap_or("").trim();
    let location = location.trim_end_matches(':');
    Some(if message.is_empty() {
        format!("panicked at {location}")
    } else {
        format!("panicked at {location}: {message}")
    })
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for GuestOutput {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.write(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_panic_message() {
        let stderr =
            "\nthread '<unnamed>' panicked at src/lib.rs:12:9:\nboom: index 3\nnote: run with `RUST_BACKTRACE=1`\n";
        assert_eq!(panic_message(stderr).as_deref(), Some("panicked at src/lib.rs:12:9: boom: index 3"));
        assert_eq!(panic_message("just some output\n"), None);
    }

    #[test]
    fn output_counts_against_the_log_budget_and_keeps_its_tail() {
        let allowance = LogAllowance::new(3);
        let out = GuestOutput::new("p".into(), "stdout", allowance.clone());
        out.write(b"one\ntwo\n");
        assert_eq!(allowance.counts(), (2, 0));
        out.write(&b"flood\n".repeat(100_000));
        assert_eq!(allowance.counts(), (100_002, 99_999), "every line counted, all past the third dropped");
        assert!(out.take_recent().ends_with("flood\n"), "the tail is kept for failure reports");
        allowance.reset();
        assert_eq!(allowance.take(), LineVerdict::Log, "a new call has the whole budget");
        assert_eq!(
            (allowance.take(), allowance.take(), allowance.take()),
            (LineVerdict::Log, LineVerdict::Log, LineVerdict::Truncate)
        );
        assert_eq!(allowance.take(), LineVerdict::Drop);
    }

    #[test]
    fn keeps_a_bounded_tail() {
        let out = GuestOutput::new("p".into(), "stderr", LogAllowance::new(200));
        out.write(&vec![b'x'; TAIL * 3]);
        out.write(b"end\n");
        let recent = out.take_recent();
        assert_eq!(recent.len(), TAIL);
        assert!(recent.ends_with("end\n"));
        assert_eq!(out.take_recent(), "");
    }
}
