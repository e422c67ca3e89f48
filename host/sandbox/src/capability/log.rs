//! Logging: `wasd:provider/log`, guest messages into the host's `tracing` log, one
//! sanitised line each, a bounded number per call.

use crate::bindings::wasd::provider::log::{Host, Level};
use wasd_core::text::{MAX_TEXT, sanitize};

use crate::provider::{MAX_LOG_LINES_PER_CALL, ProviderState};

impl Host for ProviderState {
    // A provider cannot flood the log: lines are capped in length, and in number per call.
    fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let provider = &*self.name;
        self.log_lines = self.log_lines.saturating_add(1);
        if self.log_lines > MAX_LOG_LINES_PER_CALL {
            if self.log_lines == MAX_LOG_LINES_PER_CALL + 1 {
                tracing::warn!(
                    provider,
                    "more than {MAX_LOG_LINES_PER_CALL} log lines in one call; dropping the rest of this call's"
                );
            }
            return Ok(());
        }
        // One line each, whatever the guest sends: no forged host log lines.
        let message = sanitize(&message, MAX_TEXT);
        match level {
            Level::Trace => tracing::trace!(provider, "{message}"),
            Level::Debug => tracing::debug!(provider, "{message}"),
            Level::Info => tracing::info!(provider, "{message}"),
            Level::Warn => tracing::warn!(provider, "{message}"),
            Level::Error => tracing::error!(provider, "{message}"),
        }
        Ok(())
    }
}
