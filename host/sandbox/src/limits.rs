//! What contains a provider beyond WASI's deny-all context: memory and table limits,
//! and a bounded stderr capture.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime::ResourceLimiter;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// A sandbox limit was hit; raised as the trap's cause so it can be told from a bug.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct LimitExceeded(pub(crate) String);

/// Most table elements a provider may grow to.
const MAX_TABLE: usize = 100_000;

pub(crate) struct MemoryLimiter {
    pub(crate) max_memory: usize,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            return Err(wasmtime::Error::new(LimitExceeded(format!(
                "memory limit ({} MiB; it asked for {} MiB): raise limits.max-memory",
                self.max_memory >> 20,
                desired.div_ceil(1 << 20)
            ))));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE {
            return Err(wasmtime::Error::new(LimitExceeded(format!(
                "table limit ({MAX_TABLE} elements)"
            ))));
        }
        Ok(true)
    }
}

/// The guest's stderr: only the last few KiB are kept (to explain a trap by the panic
/// message written just before it). Writes always succeed, so a chatty provider is
/// never failed by its own logging and never grows the host's memory.
#[derive(Clone, Default)]
pub(crate) struct StderrTail {
    buffer: Arc<Mutex<VecDeque<u8>>>,
}

impl StderrTail {
    const KEEP: usize = 16 << 10;

    pub(crate) fn contents(&self) -> Vec<u8> {
        self.buffer.lock().expect("stderr lock").iter().copied().collect()
    }

    /// Forget what earlier calls wrote.
    pub(crate) fn clear(&self) {
        self.buffer.lock().expect("stderr lock").clear();
    }

    fn push(&self, bytes: &[u8]) {
        let mut buffer = self.buffer.lock().expect("stderr lock");
        let bytes = &bytes[bytes.len().saturating_sub(Self::KEEP)..];
        let excess = (buffer.len() + bytes.len()).saturating_sub(Self::KEEP);
        buffer.drain(..excess);
        buffer.extend(bytes);
    }
}

impl IsTerminal for StderrTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for StderrTail {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for StderrTail {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_and_table_growth_past_the_limits_is_refused() {
        let mut limiter = MemoryLimiter { max_memory: 64 << 20 };
        assert!(limiter.memory_growing(0, 64 << 20, None).unwrap());
        let e = limiter
            .memory_growing(64 << 20, (64 << 20) + 65536, None)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("memory limit (64 MiB; it asked for 65 MiB)"),
            "{e}"
        );
        assert!(limiter.table_growing(0, MAX_TABLE, None).unwrap());
        let e = limiter.table_growing(MAX_TABLE, MAX_TABLE + 1, None).unwrap_err();
        assert!(e.to_string().contains("table limit (100000 elements)"), "{e}");
        // Raised as LimitExceeded, so the host reports a limit, not a bug.
        assert!(e.downcast_ref::<LimitExceeded>().is_some());
    }

    #[test]
    fn stderr_keeps_the_tail() {
        let tail = StderrTail::default();
        tail.push(&vec![b'a'; 20 << 10]);
        for _ in 0..100 {
            tail.push(b"small write ");
        }
        tail.push(b"panicked at the end");
        let kept = tail.contents();
        assert_eq!(kept.len(), StderrTail::KEEP);
        assert!(kept.ends_with(b"panicked at the end"));
        // One write larger than the tail keeps that write's end; a new call starts clean.
        tail.push(&[b'z'; 100_000]);
        assert_eq!(tail.contents(), vec![b'z'; StderrTail::KEEP]);
        tail.clear();
        assert!(tail.contents().is_empty());
    }
}
