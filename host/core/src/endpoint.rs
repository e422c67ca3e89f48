//! Endpoints as the host hands them out, and the scheme-preference rule.

use std::fmt;
use std::sync::Arc;

use crate::error::ProviderError;
use crate::explain::DropReason;

/// Where one instance of a service can be reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub(crate) scheme: Option<String>,
    pub(crate) host: String,
    pub(crate) port: Option<u16>,
    pub(crate) path: Option<String>,
    pub(crate) metadata: Vec<(String, String)>,
}

impl Endpoint {
    /// An endpoint at `host` (a DNS name or an IP address, IPv6 without brackets).
    /// Checking what a provider returned is the sandbox's job; this only stores.
    pub fn new(host: impl Into<String>) -> Endpoint {
        Endpoint {
            scheme: None,
            host: host.into(),
            port: None,
            path: None,
            metadata: Vec::new(),
        }
    }

    /// The same endpoint with a scheme (`https`).
    pub fn with_scheme(mut self, scheme: impl Into<String>) -> Endpoint {
        self.scheme = Some(scheme.into());
        self
    }

    /// The same endpoint with a port.
    pub fn with_port(mut self, port: u16) -> Endpoint {
        self.port = Some(port);
        self
    }

    /// The same endpoint with a path prefix (`/api`).
    pub fn with_path(mut self, path: impl Into<String>) -> Endpoint {
        self.path = Some(path.into());
        self
    }

    /// The same endpoint with a metadata pair added.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Endpoint {
        self.metadata.push((key.into(), value.into()));
        self
    }

    /// An endpoint from all its parts at once.
    pub fn from_parts(
        scheme: Option<String>,
        host: String,
        port: Option<u16>,
        path: Option<String>,
        metadata: Vec<(String, String)>,
    ) -> Endpoint {
        Endpoint {
            scheme,
            host,
            port,
            path,
            metadata,
        }
    }

    /// `https`, `grpc`, ...; `None` for a bare `host:port`.
    pub fn scheme(&self) -> Option<&str> {
        self.scheme.as_deref()
    }

    /// A DNS name or an IP address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port; `None` means the scheme's default.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The path prefix of a URI endpoint (`/api`), if any.
    pub fn path(&self) -> Option<&str> {
        self.path.as_deref()
    }

    /// Metadata pairs the provider attached (instance version, TLS server name, ...).
    pub fn metadata(&self) -> &[(String, String)] {
        &self.metadata
    }

    /// The first metadata value under `key`.
    pub fn metadata_value(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The name to verify TLS against and send as `Host` when the host is an address:
    /// the `host-name` metadata (an SRV target, say), without a trailing dot.
    pub fn host_name(&self) -> Option<&str> {
        self.metadata_value("host-name")
            .map(|name| name.trim_end_matches('.'))
            .filter(|name| !name.is_empty() && *name != self.host)
    }
}

/// `scheme://host:port/path` when the scheme is known, `host:port` otherwise.
impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(scheme) = &self.scheme {
            write!(f, "{scheme}://")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        if self.scheme.is_some()
            && let Some(path) = &self.path
        {
            f.write_str(path)?;
        }
        Ok(())
    }
}

/// The endpoints one provider gave for a query. Cheap to clone: one reference count,
/// which is all a cached resolve pays for its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSet(Arc<SetInner>);

/// What an [`EndpointSet`] shares; the cache holds it directly (one pointer hop less
/// on a cached resolve), and a balancer compares it by pointer to notice a change.
#[derive(Debug, Default)]
pub struct SetInner {
    provider: Option<Arc<str>>,
    endpoints: Box<[Endpoint]>,
    /// Providers ahead of the one that answered that failed when the set was last
    /// refreshed. Not part of equality: a set is "the same" for watchers whatever failed.
    failures: Box<[ProviderError]>,
    /// The cache's change number for this set (see [`EndpointSet::index`]). Not part of
    /// equality either.
    index: u64,
}

impl PartialEq for SetInner {
    fn eq(&self, other: &SetInner) -> bool {
        self.provider == other.provider && self.endpoints == other.endpoints
    }
}

impl Eq for SetInner {}

impl Default for EndpointSet {
    fn default() -> Self {
        static EMPTY: std::sync::LazyLock<Arc<SetInner>> = std::sync::LazyLock::new(Arc::default);
        EndpointSet(EMPTY.clone())
    }
}

impl EndpointSet {
    /// What this set shares with its clones.
    pub fn shared(&self) -> Arc<SetInner> {
        self.0.clone()
    }

    /// The set around a shared part (from [`EndpointSet::shared`] or a [`Latest`](crate::Latest)).
    pub fn from_shared(inner: Arc<SetInner>) -> Self {
        EndpointSet(inner)
    }

    /// The endpoints `provider` answered with.
    pub fn new(provider: Arc<str>, endpoints: Vec<Endpoint>) -> Self {
        EndpointSet(Arc::new(SetInner {
            index: 0,
            provider: Some(provider),
            endpoints: endpoints.into(),
            failures: Box::default(),
        }))
    }

    /// The same endpoints, recorded with the failures of providers ahead of the one
    /// that answered (an answer served while an earlier provider is down).
    pub fn with_failures(self, failures: Vec<ProviderError>) -> Self {
        if failures.is_empty() && self.0.failures.is_empty() {
            return self;
        }
        EndpointSet(Arc::new(SetInner {
            provider: self.0.provider.clone(),
            endpoints: self.0.endpoints.clone(),
            failures: failures.into(),
            index: self.0.index,
        }))
    }

    /// The same set numbered `index` (in place when this is the only reference).
    pub(crate) fn with_index(mut self, index: u64) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.index = index;
            return self;
        }
        EndpointSet(Arc::new(SetInner {
            provider: self.0.provider.clone(),
            endpoints: self.0.endpoints.clone(),
            failures: self.0.failures.clone(),
            index,
        }))
    }

    /// The cache's number for this set: a query's set gets a new one, higher than any
    /// before it, each time its endpoints change (a set equal to the last keeps its
    /// number). Numbers are unique across queries for the life of the process, so a
    /// client can hold one and ask "anything newer?" (the sidecar's blocking
    /// `/v1/watch?index=N`). 0: a set the cache did not publish.
    pub fn index(&self) -> u64 {
        self.0.index
    }

    /// Providers ahead of the one that answered that failed when this set was last
    /// refreshed: the set is served all the same (it is the last good answer, or a fresh
    /// one from the provider that gave it), and this says why it may be stale.
    pub fn failures(&self) -> &[ProviderError] {
        &self.0.failures
    }

    /// The name of the provider that answered (`config`, `pass-through`, ...); `None`
    /// for the empty set.
    pub fn provider(&self) -> Option<&str> {
        self.0.provider.as_deref()
    }

    /// The endpoints, in the provider's order.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.0.endpoints
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.0.endpoints.len()
    }

    /// True when there is no endpoint.
    pub fn is_empty(&self) -> bool {
        self.0.endpoints.is_empty()
    }

    /// Iterate over the endpoints.
    pub fn iter(&self) -> std::slice::Iter<'_, Endpoint> {
        self.0.endpoints.iter()
    }
}

/// The endpoints, comma-separated, and the provider that answered:
/// `https://10.0.0.1:443, https://10.0.0.2:443 (from config)`; `(none)` when empty.
impl fmt::Display for EndpointSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("(none)");
        }
        for (i, endpoint) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{endpoint}")?;
        }
        if let Some(provider) = self.provider() {
            write!(f, " (from {provider})")?;
        }
        Ok(())
    }
}

impl<'a> IntoIterator for &'a EndpointSet {
    type Item = &'a Endpoint;
    type IntoIter = std::slice::Iter<'a, Endpoint>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Keep the endpoints whose metadata holds every `(key, value)` filter; the others go
/// to `dropped`, with the first filter they miss.
pub(crate) fn filter_by_metadata(
    mut endpoints: Vec<Endpoint>,
    filters: &[(String, String)],
    dropped: &mut impl FnMut(Endpoint, DropReason),
) -> Vec<Endpoint> {
    if filters.is_empty() {
        return endpoints;
    }
    let missed = |e: &Endpoint| {
        filters
            .iter()
            .find(|(k, v)| !e.metadata.iter().any(|(ek, ev)| ek == k && ev == v))
    };
    for endpoint in endpoints.extract_if(.., |e| missed(e).is_some()) {
        let (key, value) = missed(&endpoint).cloned().unwrap_or_default();
        dropped(endpoint, DropReason::Metadata { key, value });
    }
    endpoints
}

/// Keep the endpoints of the most preferred scheme that has any, never a mix
/// (Microsoft's rule); the others go to `dropped`. Endpoints without a scheme always
/// stay; with no schemes to prefer, everything stays.
pub(crate) fn select_by_scheme(
    mut endpoints: Vec<Endpoint>,
    schemes: &[String],
    dropped: &mut impl FnMut(Endpoint, DropReason),
) -> Vec<Endpoint> {
    if schemes.is_empty() {
        return endpoints;
    }
    let rank = |e: &Endpoint| {
        e.scheme
            .as_deref()
            .map(|s| schemes.iter().position(|p| p.eq_ignore_ascii_case(s)))
    };
    let best = endpoints.iter().filter_map(|e| rank(e).flatten()).min();
    for endpoint in endpoints.extract_if(.., |e| rank(e).is_some_and(|r| r.is_none() || r != best)) {
        let scheme = endpoint.scheme.clone().unwrap_or_default();
        let reason = match (rank(&endpoint).flatten(), best) {
            (Some(_), Some(best)) => DropReason::SchemePreference {
                scheme,
                preferred: schemes[best].clone(),
            },
            _ => DropReason::SchemeNotAsked { scheme },
        };
        dropped(endpoint, reason);
    }
    endpoints
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(scheme: Option<&str>, host: &str, port: Option<u16>) -> Endpoint {
        Endpoint {
            scheme: scheme.map(str::to_owned),
            host: host.into(),
            port,
            path: None,
            metadata: vec![],
        }
    }

    #[test]
    fn sets_display_their_endpoints_and_provider() {
        let set = EndpointSet::new(
            "config".into(),
            vec![ep(Some("https"), "a", Some(1)), ep(None, "b", Some(2))],
        );
        assert_eq!(set.to_string(), "https://a:1, b:2 (from config)");
        assert_eq!(EndpointSet::default().to_string(), "(none)");
    }

    #[test]
    fn displays_uri_or_host_port() {
        assert_eq!(
            ep(Some("https"), "10.2.3.4", Some(8080)).to_string(),
            "https://10.2.3.4:8080"
        );
        assert_eq!(ep(None, "basket", Some(80)).to_string(), "basket:80");
        assert_eq!(ep(None, "basket", None).to_string(), "basket");
        assert_eq!(
            ep(Some("grpc"), "::1", Some(9000)).to_string(),
            "grpc://[::1]:9000"
        );
        let mut with_path = ep(Some("http"), "a", None);
        with_path.path = Some("/api".into());
        assert_eq!(with_path.to_string(), "http://a/api");
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn ignore(_: Endpoint, _: DropReason) {}

    #[test]
    fn most_preferred_scheme_wins_and_never_mixes() {
        let all = vec![
            ep(Some("http"), "a", None),
            ep(Some("https"), "b", None),
            ep(Some("https"), "c", None),
            ep(Some("grpc"), "d", None),
        ];
        let hosts = |v: Vec<Endpoint>| v.into_iter().map(|e| e.host).collect::<Vec<_>>();
        assert_eq!(
            hosts(select_by_scheme(all.clone(), &s(&["https", "http"]), &mut ignore)),
            ["b", "c"]
        );
        assert_eq!(
            hosts(select_by_scheme(all.clone(), &s(&["http", "https"]), &mut ignore)),
            ["a"]
        );
        assert_eq!(
            hosts(select_by_scheme(all.clone(), &s(&["ftp"]), &mut ignore)),
            Vec::<String>::new()
        );
        assert_eq!(select_by_scheme(all.clone(), &[], &mut ignore).len(), 4);
        // Fallback: no https endpoint, so http.
        let http_only = vec![ep(Some("http"), "a", None), ep(None, "bare", Some(1))];
        assert_eq!(
            hosts(select_by_scheme(http_only, &s(&["https", "http"]), &mut ignore)),
            ["a", "bare"]
        );
    }

    #[test]
    fn every_dropped_endpoint_is_told_with_its_reason() {
        let mut tagged = ep(Some("https"), "a", None);
        tagged.metadata.push(("zone".into(), "eu".into()));
        let mut other_zone = ep(Some("https"), "b", None);
        other_zone.metadata.push(("zone".into(), "us".into()));
        let all = vec![
            tagged,
            other_zone,
            ep(Some("http"), "c", None),
            ep(Some("grpc"), "d", None),
            ep(None, "e", Some(1)),
        ];
        let mut dropped = Vec::new();
        let mut note = |e: Endpoint, reason: DropReason| dropped.push((e.host, reason));
        let filters = [("zone".to_owned(), "eu".to_owned())];
        let kept = filter_by_metadata(all.clone(), &filters, &mut note);
        assert_eq!(kept.len(), 1, "only a has zone=eu");
        let kept = select_by_scheme(all, &s(&["https", "http"]), &mut note);
        let kept: Vec<_> = kept.into_iter().map(|e| e.host).collect();
        assert_eq!(kept, ["a", "b", "e"]);
        let metadata = || DropReason::Metadata {
            key: "zone".into(),
            value: "eu".into(),
        };
        assert_eq!(
            dropped,
            [
                ("b".to_owned(), metadata()),
                ("c".to_owned(), metadata()),
                ("d".to_owned(), metadata()),
                ("e".to_owned(), metadata()),
                (
                    "c".to_owned(),
                    DropReason::SchemePreference {
                        scheme: "http".into(),
                        preferred: "https".into()
                    }
                ),
                (
                    "d".to_owned(),
                    DropReason::SchemeNotAsked {
                        scheme: "grpc".into()
                    }
                ),
            ]
        );
    }
}
