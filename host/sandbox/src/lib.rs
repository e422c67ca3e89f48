//! The sandbox of wasd: where a provider's WebAssembly component runs, and everything
//! it may touch.
//!
//! - [`Runtime`] (`engine.rs`): the wasmtime engine, its epoch ticker, the linker, the
//!   cache of precompiled components.
//! - [`Provider`] (`provider.rs`): one loaded component with its pool of instances,
//!   call deadlines, answer checks and trap classification; it is a
//!   [`wasd_core::Source`].
//! - `metrics.rs`: provider calls, instances and imports, for the `metrics` facade.
//! - `limits.rs` (memory, tables, stderr), `quarantine.rs` (a provider that keeps
//!   faulting is left out for a while), `inspect.rs` (what a component imports and
//!   exports, for one-line load errors and `wasd check`).
//! - `capability/`: one module per capability a provider can be granted — `http`
//!   (origins, TLS, sending), `dns` (zones, the client, the import), `log`.
//! - [`ProviderSpec`] (`spec.rs`): what a provider is made from, and the one list of
//!   files it reads.
//!
//! The generated WIT bindings stay private: the public surface speaks the core's types.

mod bindings;
mod builtin;
mod capability;
mod engine;
mod inspect;
mod limits;
pub mod metrics;
mod provider;
mod quarantine;
mod spec;

pub use builtin::Builtin;
pub use capability::dns::{DEFAULT_DNS_TIMEOUT, DnsSettings};
pub use capability::http::normalize_origin;
pub use capability::tcp::normalize_tcp_target;
pub use engine::{COMPILE_TARGET, Runtime};
pub use inspect::{CheckReport, check};
pub use provider::{Prepared, Provider};
pub use quarantine::QUARANTINE;
pub use spec::{
    DEFAULT_MAX_ENDPOINTS, DEFAULT_MAX_MEMORY, DEFAULT_TIMEOUT, Grants, InputFile, Limits, ModuleSource,
    ProviderSpec, TlsSpec,
};
