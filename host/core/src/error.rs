//! Errors the host reports. Provider-reported errors and traps are kept apart: the
//! first is what the provider said, the second what the sandbox caught.

use std::fmt;
use std::path::PathBuf;

/// Everything that can go wrong in the host's public API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The query string is not a service query. Fix the caller's input.
    #[error("invalid query '{query}': {reason}")]
    InvalidQuery {
        /// The query as written (shortened and escaped).
        query: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The query only names schemes the host config does not allow.
    #[error("query '{query}': none of its schemes is allowed (allowed: {})", allowed.join(", "))]
    SchemeNotAllowed {
        /// The query as written.
        query: String,
        /// The `allowed-schemes` of the host config.
        allowed: Vec<String>,
    },

    /// No provider had endpoints for the service. `failures` lists the providers that
    /// failed on the way (an empty list means every provider answered "nothing here").
    #[error("no endpoints for service '{service}'{}", FailureList(failures))]
    NoEndpoints {
        /// The service name.
        service: String,
        /// The providers that failed, in chain order.
        failures: Vec<ProviderError>,
    },

    /// A client cannot use the endpoint it was given (an HTTP request to a `grpc`
    /// endpoint, a host a URL cannot carry).
    #[error("endpoint {endpoint} of '{query}' is not usable here: {reason}")]
    UnusableEndpoint {
        /// The query the endpoint answered.
        query: String,
        /// The endpoint.
        endpoint: String,
        /// Why it cannot be used.
        reason: String,
    },

    /// The host configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// The host could not start a part it needs: the WebAssembly engine (an
    /// unsupported platform, say), the file watcher, a background task.
    #[error("cannot {what}: {source}")]
    Engine {
        /// What the host was doing (`start the WebAssembly engine`).
        what: &'static str,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A service instance cannot be registered as given.
    #[error("cannot register '{service}': {reason}")]
    InvalidInstance {
        /// The instance's service name.
        service: String,
        /// What is wrong.
        reason: String,
    },

    /// No provider in the chain can register instances (none exports
    /// `wasd:provider/registrar`, or the configured `registrar` is not one).
    #[error("no provider can register instances: {0}")]
    NoRegistrar(String),

    /// Deregistering failed (the lease will still expire on its TTL).
    #[error("deregistration failed: {0}")]
    Deregister(#[source] ProviderError),

    /// A provider module could not be loaded (compile, link, instantiate or configure).
    #[error("provider '{provider}' ({source_name}) failed to load: {reason}")]
    Load {
        /// The provider's configured name.
        provider: String,
        /// `builtin:config` or the module's path.
        source_name: String,
        /// What went wrong.
        reason: String,
    },
}

/// One provider's failure for one call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("provider '{provider}': {kind}")]
#[non_exhaustive]
pub struct ProviderError {
    /// The provider's configured name.
    pub provider: String,
    /// What happened.
    pub kind: ProviderErrorKind,
}

impl ProviderError {
    /// `provider` failed with `kind`.
    pub fn new(provider: impl Into<String>, kind: ProviderErrorKind) -> ProviderError {
        ProviderError {
            provider: provider.into(),
            kind,
        }
    }
}

impl Error {
    /// The host failed to `what` (`start the WebAssembly engine`) because of `source`.
    pub fn engine(what: &'static str, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
        Error::Engine {
            what,
            source: source.into(),
        }
    }
}

/// What went wrong in a provider call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderErrorKind {
    /// The provider reported that the query makes no sense to it.
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    /// The provider refused its settings or granted files.
    #[error("invalid settings: {0}")]
    InvalidSettings(String),
    /// The provider's upstream (DNS server, etcd, ...) failed; the host keeps serving
    /// the last good answer and retries.
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
    /// The provider was denied a capability it was not granted.
    #[error("capability denied: {0}")]
    Denied(String),
    /// The provider does not implement the call.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The provider reported some other failure.
    #[error("{0}")]
    Internal(String),
    /// The provider trapped (panicked, hit `unreachable`, ...). Its instance was
    /// discarded; the next call gets a fresh one.
    #[error("trapped: {0}")]
    Trap(String),
    /// The provider ran into one of its sandbox limits and was stopped.
    #[error("exceeded its {0}")]
    Limit(String),
    /// The provider's answer broke the contract (too many endpoints, bad host names...).
    #[error("answer refused: {0}")]
    InvalidAnswer(String),
    /// The provider faulted (trapped, hit a limit, broke the contract) several times in
    /// a row and is not called for a while; the chain goes on without it.
    #[error("quarantined: {0}")]
    Quarantined(String),
}

struct FailureList<'a>(&'a [ProviderError]);

impl fmt::Display for FailureList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, failure) in self.0.iter().enumerate() {
            f.write_str(if i == 0 { "; " } else { ", " })?;
            write!(f, "{failure}")?;
        }
        Ok(())
    }
}

/// A host configuration problem, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", Location(path.as_deref(), *line, *column))]
#[non_exhaustive]
pub struct ConfigError {
    /// The config file, when the config came from one.
    pub path: Option<PathBuf>,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    /// A problem with no position (a missing file, a folder that cannot be read).
    pub fn new(path: Option<PathBuf>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            path,
            line: None,
            column: None,
            message: message.into(),
        }
    }

    /// A problem at a 1-based line and column.
    pub fn at(path: Option<PathBuf>, line: usize, column: usize, message: impl Into<String>) -> ConfigError {
        ConfigError {
            path,
            line: Some(line),
            column: Some(column),
            message: message.into(),
        }
    }
}

struct Location<'a>(Option<&'a std::path::Path>, Option<usize>, Option<usize>);

impl fmt::Display for Location<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Location(path, line, column) = *self;
        let path = path.map(|p| p.display().to_string());
        match (path, line, column) {
            (Some(p), Some(l), Some(c)) => write!(f, "{p}:{l}:{c}: "),
            (Some(p), Some(l), None) => write!(f, "{p}:{l}: "),
            (Some(p), None, _) => write!(f, "{p}: "),
            (None, Some(l), Some(c)) => write!(f, "line {l}, column {c}: "),
            _ => Ok(()),
        }
    }
}
