//! A policy's stdout and stderr, routed into the host's `tracing` output.
//!
//! Guests get an empty WASI context, but Rust's panic handler still writes
//! its message to stderr before aborting. Those bytes must not reach the
//! daemon's own stderr untagged, and the panic message is the most useful
//! part of a failure report, so each stream becomes log lines tagged with the
//! policy, and stderr's recent tail is kept for the runtime to quote.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Longest line logged as one; longer output is split.
const MAX_LINE: usize = 4096;
/// How much of stderr's recent output is kept for failure reports.
const TAIL: usize = 8192;

/// One guest output stream (stdout or stderr) of one policy instance.
#[derive(Clone)]
pub struct GuestOutput {
    inner: Arc<Inner>,
}

struct Inner {
    policy: Mutex<Arc<str>>,
    stream: &'static str,
    buffers: Mutex<Buffers>,
}

#[derive(Default)]
struct Buffers {
    partial: Vec<u8>,
    recent: Vec<u8>,
}

impl GuestOutput {
    pub fn new(policy: Arc<str>, stream: &'static str) -> GuestOutput {
        GuestOutput {
            inner: Arc::new(Inner { policy: Mutex::new(policy), stream, buffers: Mutex::new(Buffers::default()) }),
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
        let policy = self.inner.policy.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let text = String::from_utf8_lossy(line);
        tracing::info!(target: "cachepol::guest", policy = %policy, stream = self.inner.stream, "{}", text.trim_end());
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
    fn keeps_a_bounded_tail() {
        let out = GuestOutput::new("p".into(), "stderr");
        out.write(&vec![b'x'; TAIL * 3]);
        out.write(b"end\n");
        let recent = out.take_recent();
        assert_eq!(recent.len(), TAIL);
        assert!(recent.ends_with("end\n"));
        assert_eq!(out.take_recent(), "");
    }
}
