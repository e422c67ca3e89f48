//! What contains a provider beyond WASI's deny-all context: memory and table limits, a
//! bounded stderr capture, caps on text crossing the boundary, and quarantine for a
//! provider that keeps faulting.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use wasmtime::ResourceLimiter;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// A sandbox limit was hit; raised as the trap's cause so it can be told from a bug.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct LimitExceeded(pub String);

/// Most table elements a provider may grow to.
const MAX_TABLE: usize = 100_000;

pub(crate) struct MemoryLimiter {
    pub max_memory: usize,
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
                "memory limit ({} MiB; it asked for {} MiB)",
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

/// Longest text kept from a provider: an error message, a log line.
pub(crate) const MAX_TEXT: usize = 4096;

/// `text`, cut to [`MAX_TEXT`] bytes on a character boundary.
pub(crate) fn cap_text(mut text: String) -> String {
    if text.len() > MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
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

    pub fn contents(&self) -> Vec<u8> {
        self.buffer.lock().expect("stderr lock").iter().copied().collect()
    }

    /// Forget what earlier calls wrote.
    pub fn clear(&self) {
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

/// Faults (traps, limits, broken answers) in a row before a provider is quarantined.
const QUARANTINE_AFTER: u32 = 3;
/// Quarantine length: doubles from the first to the second with each new quarantine.
const QUARANTINE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));

/// A provider's fault record. After [`QUARANTINE_AFTER`] faults in a row it is not
/// called for a while (doubling each time, as proxy-wasm's restart limits do), so a
/// crashing provider costs nothing and the chain goes straight to the next one.
#[derive(Debug)]
pub(crate) struct Health {
    inner: Mutex<HealthState>,
}

#[derive(Debug, Clone, Default)]
struct HealthState {
    in_a_row: u32,
    total: u64,
    until: Option<Instant>,
    quarantined_at: Option<Instant>,
    next_quarantine: Option<Duration>,
}

/// A provider's health, as [`Resolver::provider_status`](crate::Resolver::provider_status) reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderStatus {
    /// The provider's name.
    pub name: String,
    /// Faults (traps, limits, broken answers) since it was loaded.
    pub faults: u64,
    /// Faults in a row, up to now.
    pub faults_in_a_row: u32,
    /// How much longer it stays quarantined (not called), if it is.
    pub quarantined_for: Option<Duration>,
}

impl Health {
    pub fn new() -> Health {
        Health {
            inner: Mutex::new(HealthState::default()),
        }
    }

    /// `Some(time left)` while quarantined.
    pub fn quarantined(&self) -> Option<(Duration, u32)> {
        let state = self.inner.lock().expect("health lock");
        let left = state.until?.checked_duration_since(Instant::now())?;
        Some((left, state.in_a_row))
    }

    /// A call that started at `started` went well. It ends the fault streak, but
    /// not a quarantine that began after it started (a long watch coming back).
    pub fn success(&self, started: Instant) {
        let mut state = self.inner.lock().expect("health lock");
        if state.quarantined_at.is_some_and(|at| at > started) {
            return;
        }
        state.in_a_row = 0;
        state.until = None;
        // Healthy for a long while: the next quarantine starts short again.
        if state
            .quarantined_at
            .is_some_and(|at| at.elapsed() > QUARANTINE.1 * 10)
        {
            state.next_quarantine = None;
            state.quarantined_at = None;
        }
    }

    /// Record a fault; `Some(quarantine)` when this one starts a quarantine.
    pub fn fault(&self) -> Option<Duration> {
        let mut state = self.inner.lock().expect("health lock");
        state.in_a_row += 1;
        state.total += 1;
        if state.in_a_row < QUARANTINE_AFTER || state.until.is_some_and(|u| u > Instant::now()) {
            return None;
        }
        let length = state.next_quarantine.unwrap_or(QUARANTINE.0);
        state.quarantined_at = Some(Instant::now());
        state.until = Some(Instant::now() + length);
        state.next_quarantine = Some((length * 2).min(QUARANTINE.1));
        Some(length)
    }

    pub fn status(&self, name: &str) -> ProviderStatus {
        let state = self.inner.lock().expect("health lock").clone();
        ProviderStatus {
            name: name.to_owned(),
            faults: state.total,
            faults_in_a_row: state.in_a_row,
            quarantined_for: state.until.and_then(|u| u.checked_duration_since(Instant::now())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarantine_starts_after_faults_in_a_row_and_grows() {
        let health = Health::new();
        assert_eq!(health.fault(), None);
        assert_eq!(health.fault(), None);
        assert_eq!(health.fault(), Some(Duration::from_secs(1)));
        assert!(health.quarantined().is_some());
        // Faults during a quarantine do not extend it.
        assert_eq!(health.fault(), None);
        health.inner.lock().unwrap().until = Some(Instant::now());
        assert_eq!(health.fault(), Some(Duration::from_secs(2)));
        // A call that began before the quarantine does not end it.
        health.success(Instant::now() - Duration::from_secs(5));
        assert!(health.quarantined().is_some());
        health.success(Instant::now());
        assert!(health.quarantined().is_none());
        assert_eq!(health.status("p").faults, 5);
        assert_eq!(health.status("p").faults_in_a_row, 0);
    }

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
    }

    #[test]
    fn text_is_capped_on_a_char_boundary() {
        let capped = cap_text("é".repeat(5000));
        assert!(capped.len() <= MAX_TEXT + '…'.len_utf8());
        assert!(capped.ends_with('…'));
        assert_eq!(cap_text("short".into()), "short");
    }
}
