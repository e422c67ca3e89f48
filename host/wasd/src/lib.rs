//! Service discovery whose providers are sandboxed WebAssembly components.
//!
//! A [`Resolver`] answers "where is `https+http://basket`?" by asking providers in a
//! configured order. Each provider is a WebAssembly component (`wasm32-wasip2`)
//! implementing `wasd:provider/resolver@0.1.0`, running in its own sandbox with only
//! the capabilities the configuration grants it. The standard providers are built in;
//! more come from a plugin folder.
//!
//! ```no_run
//! # async fn demo() -> Result<(), wasd::Error> {
//! // Built-in defaults: `./appsettings.json` and `services__*` environment
//! // variables, then pass-through. Or: `.config_file("wasd.toml")`.
//! let resolver = wasd::Resolver::builder().build().await?;
//!
//! let endpoints = resolver.resolve("https+http://catalog").await?;
//! for endpoint in &endpoints {
//!     println!("{endpoint} from {}", endpoints.provider().unwrap_or("-"));
//! }
//!
//! let mut watch = resolver.watch("https+http://catalog").await?;
//! while let Some(set) = watch.changed().await {
//!     println!("now {} endpoints", set.len());
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Providers backed by a registry (the built-in `etcd`) also register instances, the
//! way Kratos's Registrar does; the host keeps the lease alive and never gives up:
//!
//! ```no_run
//! # async fn demo(resolver: wasd::Resolver) -> Result<(), wasd::Error> {
//! let instance = wasd::ServiceInstance::new("hello", ["http://10.0.0.1:8000"]);
//! let registration = resolver.register(instance).await?;
//! // ... serve ...
//! registration.deregister().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Resolution follows Microsoft.Extensions.ServiceDiscovery: the first provider with
//! endpoints wins, pass-through runs last, `https+http://` prefers https endpoints and
//! falls back to http (never mixing them), `_name.service` asks for a named endpoint.
//! Answers are cached; a cached resolve does not enter WebAssembly.
//!
//! Cargo features: `cli` (default) builds the `wasd` binary; `serve` (part of `cli`)
//! adds [`serve`], the sidecar's DNS server and HTTP API; `reqwest` adds
//! [`http`] (clients calling `https+http://catalog/...`); `tonic` adds [`grpc`]
//! (channels dialing `discovery:///name`); `tower` adds [`Resolver::discover`].
//!
//! The crate is the top of three layers (ARCHITECTURE.md draws them): the discovery
//! core [`wasd_core`] (queries, the chain, the cache and its refresh loop, reload
//! orchestration, registration — no WebAssembly), the sandbox [`wasd_sandbox`]
//! (wasmtime, limits, capabilities), and this crate, which reads the configuration,
//! watches files and offers the clients.

mod balance;
mod chain;
mod check;
mod config;
#[cfg(feature = "tower")]
mod discover;
mod files;
#[cfg(feature = "tonic")]
pub mod grpc;
#[cfg(feature = "reqwest")]
pub mod http;
pub mod json;
mod observe;
mod resolver;
#[cfg(feature = "serve")]
pub mod serve;

pub use balance::{
    Balancer, BalancerBuilder, DEFAULT_EJECTION, Health, HealthCheck, Outlier, PickKey, Picked, Policies,
    Policy, Probe, Strategy, Subset,
};
pub use check::check;
pub use config::{Config, ServeSettings, XdsService};
#[cfg(feature = "tower")]
pub use discover::Discover;
pub use observe::{DEFAULT_MAX_SERVICES, OTHER_SERVICES, describe_metrics};
pub use resolver::{Resolver, ResolverBuilder};
pub use wasd_core::{
    CacheState, ConfigError, DEFAULT_IDLE_TIMEOUT, DEFAULT_REFRESH_PERIOD, DEFAULT_REGISTRATION_TTL,
    DropReason, Dropped, Endpoint, EndpointSet, Error, Explanation, Import, ImportKind, ProviderError,
    ProviderErrorKind, ProviderStatus, Query, Registration, RegistrationState, ReloadError, ReloadReport,
    ReloadStatus, ServiceInstance, Step, StepOutcome, Watch,
};
pub use wasd_sandbox::{
    COMPILE_TARGET, CheckReport, DEFAULT_MAX_ENDPOINTS, DEFAULT_MAX_MEMORY, DEFAULT_TIMEOUT,
};

/// This endpoint cannot be used by a client, for `reason`.
#[cfg(any(feature = "reqwest", feature = "tonic"))]
pub(crate) fn unusable(endpoint: &Endpoint, query: &Query, reason: String) -> Error {
    Error::UnusableEndpoint {
        query: query.to_string(),
        endpoint: endpoint.to_string(),
        reason,
    }
}
