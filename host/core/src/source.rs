//! What the core asks for answers: a [`Source`]. The sandbox's providers are sources;
//! so are the fakes the core's tests drive.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::endpoint::Endpoint;
use crate::error::{ProviderError, ProviderErrorKind};
use crate::explain::Imports;
use crate::registration::ServiceInstance;

/// A query as a source sees it: parsed, with the allowed schemes applied.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct SourceQuery {
    /// The service name (`basket`).
    pub service: String,
    /// The named endpoint (`dashboard` in `_dashboard.basket`), if any.
    pub endpoint_name: Option<String>,
    /// Acceptable schemes, most preferred first; empty accepts any.
    pub schemes: Vec<String>,
    /// The port the query names, if any.
    pub port: Option<u16>,
}

impl SourceQuery {
    /// A query for `service` with no endpoint name, schemes or port.
    pub fn new(service: impl Into<String>) -> SourceQuery {
        SourceQuery {
            service: service.into(),
            endpoint_name: None,
            schemes: Vec::new(),
            port: None,
        }
    }

    /// The same query accepting `schemes`, most preferred first.
    pub fn with_schemes(mut self, schemes: impl IntoIterator<Item = impl Into<String>>) -> SourceQuery {
        self.schemes = schemes.into_iter().map(Into::into).collect();
        self
    }
}

/// A source's answer, already checked against its limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Answer {
    /// The endpoints, in the source's order; empty means "nothing here".
    pub endpoints: Vec<Endpoint>,
    /// How long the answer may be cached; `None`: the refresh period.
    pub ttl: Option<Duration>,
    /// A version tag: the source can long-poll for a change to it ([`Source::watch`]).
    pub version: Option<String>,
}

impl Answer {
    /// An answer with these endpoints, no TTL and no version.
    pub fn new(endpoints: Vec<Endpoint>) -> Answer {
        Answer {
            endpoints,
            ttl: None,
            version: None,
        }
    }

    /// The same answer with a TTL.
    pub fn with_ttl(mut self, ttl: Duration) -> Answer {
        self.ttl = Some(ttl);
        self
    }

    /// The same answer tagged with a version.
    pub fn with_version(mut self, version: impl Into<String>) -> Answer {
        self.version = Some(version.into());
        self
    }
}

/// A source's health, as `Resolver::provider_status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProviderStatus {
    /// The provider's name.
    pub name: String,
    /// Faults (traps, limits, broken answers) since it was loaded.
    pub faults: u64,
    /// Faults in a row, up to now.
    pub faults_in_a_row: u32,
    /// How much longer it stays quarantined (not called), if it is.
    pub quarantined_for: Option<Duration>,
    /// Instances alive (pooled or in a call), for a source that has instances.
    pub instances: Option<usize>,
}

impl ProviderStatus {
    /// A source with no faults.
    pub fn healthy(name: impl Into<String>) -> ProviderStatus {
        ProviderStatus {
            name: name.into(),
            faults: 0,
            faults_in_a_row: 0,
            quarantined_for: None,
            instances: None,
        }
    }
}

/// A source of answers in the provider chain. The calls mirror the provider WIT
/// (`wasd:provider/resolver` and `registrar`); `configure` is the source's own business,
/// done before it joins a chain.
///
/// `not-found` is an empty [`Answer`]; an `Err` is a failure the core treats as such
/// (it keeps the last good answer, backs off and names the source).
#[async_trait]
pub trait Source: Send + Sync + 'static {
    /// The source's configured name, unique in its chain.
    fn name(&self) -> &Arc<str>;

    /// Answer a query.
    async fn resolve(&self, query: &SourceQuery) -> Result<Answer, ProviderError>;

    /// [`Source::resolve`], noting in `imports` the host imports the call makes (DNS
    /// lookups, HTTP requests), for an explanation. The default notes nothing.
    async fn resolve_explained(
        &self,
        query: &SourceQuery,
        imports: &Imports,
    ) -> Result<Answer, ProviderError> {
        let _ = imports;
        self.resolve(query).await
    }

    /// Wait up to `wait` for the answer tagged `version` to change: `Ok(None)` when
    /// nothing changed. The default answers `unsupported`.
    async fn watch(
        &self,
        query: &SourceQuery,
        version: &str,
        wait: Duration,
    ) -> Result<Option<Answer>, ProviderError> {
        let _ = (query, version, wait);
        Err(self.unsupported("watch"))
    }

    /// Whether [`Source::watch`] is worth calling (false once it answered
    /// `unsupported`).
    fn can_watch(&self) -> bool {
        false
    }

    /// Whether the source registers instances.
    fn is_registrar(&self) -> bool {
        false
    }

    /// Write `instance` under a new lease of `ttl`; the lease's id.
    async fn register(&self, instance: &ServiceInstance, ttl: Duration) -> Result<String, ProviderError> {
        let _ = (instance, ttl);
        Err(self.unsupported("register"))
    }

    /// Refresh a lease; `false` when the instance is no longer registered under it.
    async fn keep_alive(&self, instance: &ServiceInstance, lease: &str) -> Result<bool, ProviderError> {
        let _ = (instance, lease);
        Err(self.unsupported("keep-alive"))
    }

    /// Delete the instance and revoke its lease.
    async fn deregister(&self, instance: &ServiceInstance, lease: Option<&str>) -> Result<(), ProviderError> {
        let _ = (instance, lease);
        Err(self.unsupported("deregister"))
    }

    /// Faults and quarantine.
    fn status(&self) -> ProviderStatus {
        ProviderStatus::healthy(&**self.name())
    }

    /// What the source was made from: a reload whose inputs hash the same keeps it.
    /// `None`: always made anew.
    fn fingerprint(&self) -> Option<[u8; 32]> {
        None
    }

    /// The failure for a call this source does not implement.
    fn unsupported(&self, call: &str) -> ProviderError {
        ProviderError::new(
            &**self.name(),
            ProviderErrorKind::Unsupported(format!("this provider does not implement {call}")),
        )
    }
}
