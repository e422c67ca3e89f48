//! `wasd:provider/log`: guest messages into the host's `tracing` log.

use crate::bindings::wasd::provider::log::{Host, Level};
use crate::provider::ProviderState;

/// Longest message kept; a provider cannot flood the log with megabyte lines.
const MAX_MESSAGE: usize = 4096;

impl Host for ProviderState {
    fn log(&mut self, level: Level, mut message: String) -> wasmtime::Result<()> {
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        let provider = &*self.name;
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
