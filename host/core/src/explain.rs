//! Why an answer is what it is: the report of [`Cache::explain`](crate::Cache::explain).
//!
//! An explanation is a chain walk like any other (the same rules, the same sources),
//! recorded step by step: what each provider said and how long it took, the imports
//! it made (DNS names, HTTP origins: [`Imports`], filled by sources that can), which
//! endpoints the query's filters and schemes dropped and why, and the state of the
//! query's cache entry before the walk. It does not fill the cache.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::endpoint::{Endpoint, EndpointSet};
use crate::error::{Error, ProviderError, ProviderErrorKind};
use crate::query::Query;

/// The report of one explained resolve.
#[derive(Debug)]
#[non_exhaustive]
pub struct Explanation {
    /// The query, parsed, with its metadata filters.
    pub query: Query,
    /// The schemes the providers were asked for once `allowed-schemes` was applied,
    /// most preferred first; empty accepts any.
    pub schemes: Vec<String>,
    /// The host's `allowed-schemes` (empty: all).
    pub allowed_schemes: Vec<String>,
    /// The query's cache entry before the walk; `None` when it was not cached.
    pub cache: Option<CacheState>,
    /// Every provider of the chain, in order, with what it did.
    pub steps: Vec<Step>,
    /// Endpoints providers answered that the query did not accept.
    pub dropped: Vec<Dropped>,
    /// What the walk settled on: what a resolve with an empty cache would answer.
    pub result: Result<EndpointSet, Error>,
}

/// What one provider did in the walk.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Step {
    /// The provider's name.
    pub provider: String,
    /// What it said, or why it was not asked.
    pub outcome: StepOutcome,
    /// Time spent in the call (zero when not asked).
    pub elapsed: Duration,
    /// The imports the call made, in the order they ended.
    pub imports: Vec<Import>,
}

/// What a provider said, or why it was not asked.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StepOutcome {
    /// It answered `endpoints`, of which the query kept `kept` (the first provider
    /// that keeps any wins; one whose endpoints were all dropped passes the query on).
    Answered {
        /// Endpoints in its answer.
        endpoints: usize,
        /// Endpoints the query's filters and schemes kept.
        kept: usize,
    },
    /// It answered that it has nothing for the service (an empty answer or
    /// `not-found`): the next provider is asked.
    Declined,
    /// The call failed (including a quarantined provider, not called at all).
    Failed(ProviderError),
    /// Not asked: an earlier provider answered.
    Skipped {
        /// The provider whose answer won.
        answered_by: String,
    },
    /// Not asked: an earlier provider failed, and a failure is never papered over by a
    /// later provider.
    NotAsked {
        /// The provider that failed first.
        failed: String,
    },
}

impl StepOutcome {
    /// A one-word label: `answered`, `declined`, `failed`, `quarantined`, `skipped`,
    /// `not_asked`.
    pub fn label(&self) -> &'static str {
        match self {
            StepOutcome::Answered { .. } => "answered",
            StepOutcome::Declined => "declined",
            StepOutcome::Failed(failure) if matches!(failure.kind, ProviderErrorKind::Quarantined(_)) => {
                "quarantined"
            }
            StepOutcome::Failed(_) => "failed",
            StepOutcome::Skipped { .. } => "skipped",
            StepOutcome::NotAsked { .. } => "not_asked",
        }
    }
}

/// `answered 2 (kept 2)`, `failed: <reason>`, `skipped: 'config' answered first`.
impl fmt::Display for StepOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepOutcome::Answered { endpoints, kept } => write!(f, "answered {endpoints} (kept {kept})"),
            StepOutcome::Declined => f.write_str("declined (nothing for this service)"),
            StepOutcome::Failed(failure) => write!(f, "{}: {}", self.label(), failure.kind),
            StepOutcome::Skipped { answered_by } => {
                write!(f, "skipped: '{answered_by}' answered first")
            }
            StepOutcome::NotAsked { failed } => write!(
                f,
                "not asked: '{failed}' failed, and a later provider never stands in for a failed one"
            ),
        }
    }
}

/// A host import a provider call made.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Import {
    /// Which capability.
    pub kind: ImportKind,
    /// The DNS name asked, or the HTTP origin called.
    pub target: String,
    /// The record type (`SRV`, `A/AAAA`), or the request's method and path.
    pub detail: String,
    /// What came back: `2 records`, `200 OK`, or the error.
    pub result: String,
    /// How long it took.
    pub elapsed: Duration,
}

impl Import {
    /// An import of `kind` to `target`.
    pub fn new(
        kind: ImportKind,
        target: impl Into<String>,
        detail: impl Into<String>,
        result: impl Into<String>,
        elapsed: Duration,
    ) -> Import {
        Import {
            kind,
            target: target.into(),
            detail: detail.into(),
            result: result.into(),
            elapsed,
        }
    }
}

/// `dns SRV _https._tcp.catalog → 2 records (1.2 ms)`.
impl fmt::Display for Import {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} → {} ({})",
            self.kind,
            self.detail,
            self.target,
            self.result,
            Millis(self.elapsed)
        )
    }
}

/// The capability an import used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImportKind {
    /// `wasd:provider/dns`.
    Dns,
    /// `wasi:http/outgoing-handler`.
    Http,
}

impl ImportKind {
    /// `dns` or `http`.
    pub fn label(self) -> &'static str {
        match self {
            ImportKind::Dns => "dns",
            ImportKind::Http => "http",
        }
    }
}

impl fmt::Display for ImportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Where a source notes the imports of one explained call ([`Source::resolve_explained`](crate::Source::resolve_explained)).
/// Cheap to clone; an HTTP request that ends on another task notes itself there.
#[derive(Debug, Clone, Default)]
pub struct Imports(Arc<Mutex<Vec<Import>>>);

impl Imports {
    /// An empty journal.
    pub fn new() -> Imports {
        Imports::default()
    }

    /// Note an import.
    pub fn push(&self, import: Import) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(import);
    }

    /// The imports noted so far, leaving the journal empty.
    pub fn take(&self) -> Vec<Import> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// An endpoint a provider answered that the query did not accept.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Dropped {
    /// The provider that answered it.
    pub provider: String,
    /// The endpoint.
    pub endpoint: Endpoint,
    /// Why it was dropped.
    pub reason: DropReason,
}

/// Why an endpoint was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DropReason {
    /// Its metadata does not hold this filter of the query.
    Metadata {
        /// The filter's key.
        key: String,
        /// The filter's value.
        value: String,
    },
    /// Its scheme is not among the query's schemes.
    SchemeNotAsked {
        /// Its scheme.
        scheme: String,
    },
    /// Its scheme is left out by the host's `allowed-schemes`.
    SchemeNotAllowed {
        /// Its scheme.
        scheme: String,
    },
    /// The same answer has endpoints of a scheme the query prefers (never a mix).
    SchemePreference {
        /// Its scheme.
        scheme: String,
        /// The scheme kept.
        preferred: String,
    },
}

impl DropReason {
    /// A one-word label: `metadata_filter`, `scheme_not_asked`, `scheme_not_allowed`,
    /// `scheme_preference`.
    pub fn label(&self) -> &'static str {
        match self {
            DropReason::Metadata { .. } => "metadata_filter",
            DropReason::SchemeNotAsked { .. } => "scheme_not_asked",
            DropReason::SchemeNotAllowed { .. } => "scheme_not_allowed",
            DropReason::SchemePreference { .. } => "scheme_preference",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DropReason::Metadata { key, value } => write!(f, "metadata filter {key}={value} not matched"),
            DropReason::SchemeNotAsked { scheme } => write!(f, "scheme {scheme} not in the query"),
            DropReason::SchemeNotAllowed { scheme } => {
                write!(f, "scheme {scheme} not in the host's allowed-schemes")
            }
            DropReason::SchemePreference { scheme, preferred } => {
                write!(
                    f,
                    "scheme {scheme}: the query prefers {preferred}, which this provider has"
                )
            }
        }
    }
}

/// A query's cache entry, as it stood when explained.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CacheState {
    /// The set served now (empty while the first answer is awaited, or once the
    /// service disappeared).
    pub set: EndpointSet,
    /// Time since a provider last gave or confirmed this set.
    pub age: Duration,
    /// Time until the entry is next refreshed from the chain; `None` while a long-poll
    /// keeps it current ([`CacheState::long_poll`]).
    pub refresh_in: Option<Duration>,
    /// The provider long-polled for changes, if any.
    pub long_poll: Option<String>,
    /// Set when the last refresh failed and the last good answer was kept: how long
    /// ago it first failed. The failures are the set's ([`EndpointSet::failures`]).
    pub stale_for: Option<Duration>,
}

impl CacheState {
    /// Whether the set served is the last good one, kept because a refresh failed.
    pub fn is_stale(&self) -> bool {
        self.stale_for.is_some()
    }
}

/// `1 endpoint`, `2 endpoints`.
struct Endpoints(usize);

impl fmt::Display for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            1 => f.write_str("1 endpoint"),
            n => write!(f, "{n} endpoints"),
        }
    }
}

/// A duration as milliseconds with one decimal: `1.2 ms`.
pub(crate) struct Millis(pub(crate) Duration);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1} ms", self.0.as_secs_f64() * 1000.0)
    }
}

/// The walk's record, filled by [`Chain::explain`](crate::Chain::explain).
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Trace {
    /// Every source, in order.
    pub steps: Vec<Step>,
    /// Endpoints dropped, with their reasons (schemes not yet told apart from
    /// allowed-schemes: the cache does that, knowing the settings).
    pub dropped: Vec<Dropped>,
}

/// The report as an operator reads it, one fact per line:
///
/// ```text
/// query      https+http://catalog
/// schemes    https, http
/// cache      fresh: answered 10.2 s ago by 'config', refreshed in 19.8 s
/// provider   config        answered 3 (kept 2)  0.3 ms
/// provider   dns           skipped: 'config' answered first
/// dropped    http://10.0.0.3:80 from config: scheme http: the query prefers https, which this provider has
/// answer     https://10.0.0.1:443, https://10.0.0.2:443 (from config)
/// ```
impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "query      {}", self.query)?;
        if !self.query.filters().is_empty() {
            let filters: Vec<String> = self
                .query
                .filters()
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            writeln!(f, "filters    {}", filters.join(", "))?;
        }
        let listed = |schemes: &[String]| {
            if schemes.is_empty() {
                "any".to_owned()
            } else {
                schemes.join(", ")
            }
        };
        write!(f, "schemes    {}", listed(&self.schemes))?;
        if !self.allowed_schemes.is_empty() {
            write!(f, " (allowed-schemes: {})", self.allowed_schemes.join(", "))?;
        }
        writeln!(f)?;
        match &self.cache {
            None => writeln!(f, "cache      not cached")?,
            Some(cache) => writeln!(f, "cache      {cache}")?,
        }
        let width = self.steps.iter().map(|s| s.provider.len()).max().unwrap_or(0);
        for step in &self.steps {
            write!(f, "provider   {:width$}  {}", step.provider, step.outcome)?;
            if !step.elapsed.is_zero() || matches!(step.outcome, StepOutcome::Answered { .. }) {
                write!(f, "  {}", Millis(step.elapsed))?;
            }
            writeln!(f)?;
            for import in &step.imports {
                writeln!(f, "  import   {import}")?;
            }
        }
        for dropped in &self.dropped {
            writeln!(
                f,
                "dropped    {} from {}: {}",
                dropped.endpoint, dropped.provider, dropped.reason
            )?;
        }
        match &self.result {
            Ok(set) => write!(f, "answer     {set}"),
            Err(e) => write!(f, "answer     none: {e}"),
        }
    }
}

/// `fresh: 2 endpoints answered 10.2 s ago by 'config', refreshed in 19.8 s`.
impl fmt::Display for CacheState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seconds = |d: Duration| format!("{:.1} s", d.as_secs_f64());
        let provider = self.set.provider().unwrap_or("no provider");
        match self.stale_for {
            Some(stale_for) => write!(
                f,
                "stale for {}: the last good {}, answered {} ago by '{provider}', kept",
                seconds(stale_for),
                Endpoints(self.set.len()),
                seconds(self.age)
            )?,
            None if self.set.is_empty() => {
                write!(f, "fresh: no endpoints (answered {} ago)", seconds(self.age))?
            }
            None => write!(
                f,
                "fresh: {} answered {} ago by '{provider}'",
                Endpoints(self.set.len()),
                seconds(self.age)
            )?,
        }
        match (&self.long_poll, self.refresh_in) {
            (Some(source), _) => write!(f, ", kept current by a long-poll on '{source}'")?,
            (None, Some(refresh_in)) => write!(f, ", refreshed in {}", seconds(refresh_in))?,
            (None, None) => {}
        }
        if !self.set.failures().is_empty() {
            let failures: Vec<String> = self.set.failures().iter().map(ToString::to_string).collect();
            write!(f, "; because {}", failures.join("; "))?;
        }
        Ok(())
    }
}
