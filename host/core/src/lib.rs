//! The discovery core of wasd: what a query means, which source answers it, how the
//! answer is cached, kept fresh, reloaded and registered — over any [`Source`] of
//! answers, with no WebAssembly in sight.
//!
//! The `wasd` crate puts sandboxed WebAssembly providers (`wasd-sandbox`) behind
//! [`Source`]; the core's own tests use fake sources and tokio's paused clock.
//!
//! ```
//! # async fn demo(sources: Vec<std::sync::Arc<dyn wasd_core::Source>>) -> Result<(), wasd_core::Error> {
//! use std::sync::Arc;
//! use wasd_core::{Cache, Chain, ChainCell, Clock, Settings};
//!
//! let cell = Arc::new(ChainCell::new(Chain::new(sources)));
//! let cache = Cache::new(cell, Settings::default(), Clock::exact());
//! let endpoints = cache.resolve("https+http://catalog").await?;
//! println!("{endpoints}");
//! # Ok(())
//! # }
//! ```

mod backoff;
mod cache;
mod chain;
mod clock;
mod endpoint;
mod error;
mod explain;
pub mod metrics;
mod query;
mod recovery;
mod registration;
mod reload;
mod source;
pub mod text;

pub use backoff::Backoff;
pub use cache::{
    Cache, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_LONG_POLLS, DEFAULT_REFRESH_PERIOD, Latest, REFRESH_BACKOFF,
    Settings, Watch,
};
pub use chain::{Chain, ChainAnswer, ChainCell};
pub use clock::Clock;
pub use endpoint::{Endpoint, EndpointSet, SetInner};
pub use error::{ConfigError, Error, ProviderError, ProviderErrorKind};
pub use explain::{
    CacheState, DropReason, Dropped, Explanation, Import, ImportKind, Imports, Step, StepOutcome, Trace,
};
pub use query::Query;
pub use registration::{
    DEFAULT_REGISTRATION_TTL, REGISTRATION_BACKOFF, RegistrarSource, Registration, RegistrationState,
    ServiceInstance,
};
pub use reload::{Planned, ReloadError, ReloadReport, ReloadStatus, Reloader};
pub use source::{Answer, ProviderStatus, Source, SourceQuery};

#[cfg(test)]
mod tests;
