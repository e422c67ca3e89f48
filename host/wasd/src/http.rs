//! HTTP clients that call services by name (feature `reqwest`).
//!
//! [`Discovery`] is a `reqwest-middleware` middleware: a request to
//! `https+http://catalog/api/items` resolves `catalog` through the host, picks one of its
//! endpoints with a [`Balancer`], rewrites the URL's scheme, host, port and path prefix
//! to that endpoint, and on a connect failure marks the endpoint failed and tries the
//! next one. [`DnsResolver`] is the same resolution at the level of names only, for a
//! plain `reqwest::Client`.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::{Request, Response, Url};
use reqwest_middleware::{Middleware, Next};
// What [`Discovery::client`] returns and fails with, so callers need not depend on
// reqwest-middleware themselves to name them.
pub use reqwest_middleware::{self, ClientWithMiddleware};

use crate::balance::{Balancer, Options, Strategy};
use wasd_core::{Endpoint, Error, Query};

use crate::resolver::Resolver;

/// Endpoints tried per request when connecting fails (the first pick included).
pub const DEFAULT_ATTEMPTS: usize = 3;

/// Services a discovery keeps a balancer for; beyond that the least recently created
/// goes.
const MAX_SERVICES: usize = 1024;

/// Host names a client keeps pinned to an address; beyond that the table starts again.
const MAX_PINS: usize = 4096;

/// Service discovery for reqwest: resolves, balances and retries each request whose host
/// names a service. Cheap to clone; clones share balancers.
///
/// ```no_run
/// # async fn demo(resolver: wasd::Resolver) -> Result<(), Box<dyn std::error::Error>> {
/// let http = resolver.http_client()?;
/// let items = http.get("https+http://catalog/api/items").send().await?.text().await?;
/// # Ok(())
/// # }
/// ```
///
/// Every request goes through the resolver, so the chain decides what a host means: the
/// built-in pass-through provider hands `https://example.com` back unchanged; without
/// it, a host no provider knows fails the request with [`Error::NoEndpoints`] (in
/// `reqwest_middleware::Error::Middleware`). Requests to an IP address are sent as they
/// are.
///
/// An endpoint given as an IP address with a `host-name` (the target of an SRV record) is
/// called by that name, so that TLS verifies it (SNI) and the `Host` header carries it,
/// while the connection goes to the discovered address: clients made by
/// [`Discovery::client`] and [`Discovery::client_builder`] resolve the name to it.
/// reqwest pools connections by host name, so endpoints that share a `host-name` share
/// connections too. Put in a middleware stack of your own without those, the request
/// keeps the address and only the `Host` header names the host.
///
/// Each attempt gets the client's full timeout: with a timeout set, a request whose
/// endpoints all time out takes up to `attempts` times it.
#[derive(Clone)]
pub struct Discovery {
    inner: Arc<Inner>,
    /// The pins of the client this copy serves, when its DNS resolver knows them.
    pins: Option<Arc<Pins>>,
}

struct Inner {
    settings: DiscoveryBuilder,
    balancers: Mutex<Balancers>,
}

#[derive(Default)]
struct Balancers {
    by_query: HashMap<String, Arc<Service>>,
    /// Creation order, for evicting the oldest.
    order: VecDeque<String>,
}

/// What requests to one service share: its parsed query and its balancer.
struct Service {
    query: Query,
    balancer: Balancer,
}

/// Host name -> the discovered address it stands for (the last picked). One table per
/// client, shared by its middleware and its DNS resolver. Endpoints that share a host
/// name share its entry: a request may reach the other one's address (the name, and so
/// the certificate, being the same).
#[derive(Default)]
struct Pins(RwLock<HashMap<String, IpAddr>>);

/// Options of a [`Discovery`].
#[must_use]
pub struct DiscoveryBuilder {
    resolver: Resolver,
    /// Each service's balancer is built with these.
    balancing: Options,
    attempts: usize,
}

impl DiscoveryBuilder {
    /// How each service's endpoints are picked (default: the configured policy's
    /// strategy, round-robin unless a `[[policy]]` says otherwise).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.balancing.strategy(strategy);
        self
    }

    /// Only endpoints whose metadata has `key` = `value`.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.balancing.metadata(key.into(), value.into());
        self
    }

    /// Only endpoints of this instance version (Kratos's `filter.Version`).
    pub fn version(self, version: impl Into<String>) -> Self {
        self.metadata("version", version)
    }

    /// Only endpoints `keep` accepts.
    pub fn filter(mut self, keep: impl Fn(&Endpoint) -> bool + Send + Sync + 'static) -> Self {
        self.balancing.filter(Arc::new(keep));
        self
    }

    /// How long an endpoint that refused a connection is left out at first (default 1 s,
    /// doubling while it keeps failing).
    pub fn ejection(mut self, first: Duration) -> Self {
        self.balancing.ejection(first);
        self
    }

    /// Endpoints tried per request when connecting fails, the first one included
    /// (default 3; 1 never retries). Requests with a streaming body are sent once.
    pub fn attempts(mut self, attempts: usize) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// The middleware.
    pub fn build(self) -> Discovery {
        Discovery {
            inner: Arc::new(Inner {
                settings: self,
                balancers: Mutex::default(),
            }),
            pins: None,
        }
    }
}

impl Discovery {
    /// Round-robin, 3 attempts: what [`Resolver::http_client`] uses.
    pub fn new(resolver: &Resolver) -> Discovery {
        Discovery::builder(resolver).build()
    }

    /// A discovery with a strategy, filters or retry budget of your choice.
    pub fn builder(resolver: &Resolver) -> DiscoveryBuilder {
        DiscoveryBuilder {
            resolver: resolver.clone(),
            balancing: Options::default(),
            attempts: DEFAULT_ATTEMPTS,
        }
    }

    /// A client with reqwest's defaults that sends every request through this discovery.
    pub fn client(&self) -> Result<ClientWithMiddleware, reqwest::Error> {
        self.client_with(reqwest::Client::builder())
    }

    /// `builder` (timeouts, TLS, ...) made into a client that sends every request
    /// through this discovery.
    pub fn client_with(
        &self,
        builder: reqwest::ClientBuilder,
    ) -> Result<ClientWithMiddleware, reqwest::Error> {
        Ok(self.client_builder(builder)?.build())
    }

    /// As [`Discovery::client_with`], with room for more middleware (retries, tracing)
    /// before `build()`. What is added runs after discovery chose the endpoint.
    pub fn client_builder(
        &self,
        builder: reqwest::ClientBuilder,
    ) -> Result<reqwest_middleware::ClientBuilder, reqwest::Error> {
        let pins = Arc::new(Pins::default());
        let client = builder
            .dns_resolver(DnsResolver {
                resolver: None,
                pins: pins.clone(),
            })
            .build()?;
        // This client's copy of the middleware knows the pins its resolver answers with.
        let middleware = Discovery {
            inner: self.inner.clone(),
            pins: Some(pins),
        };
        Ok(reqwest_middleware::ClientBuilder::new(client).with(middleware))
    }

    /// The service a query text names, made on its first request.
    async fn service(&self, text: &str) -> Result<Arc<Service>, Error> {
        if let Some(service) = self.inner.balancers.lock().unwrap().by_query.get(text) {
            return Ok(service.clone());
        }
        let settings = &self.inner.settings;
        let query = Query::parse(text)?;
        // Built outside the lock; requests racing for a new service each build one.
        let balancer = settings
            .resolver
            .balancer_with(text.to_owned(), settings.balancing.clone())
            .build()
            .await?;
        let mut balancers = self.inner.balancers.lock().unwrap();
        // Keep the first, so that all requests share counters and failure marks.
        if let Some(existing) = balancers.by_query.get(text) {
            return Ok(existing.clone());
        }
        if balancers.order.len() >= MAX_SERVICES
            && let Some(oldest) = balancers.order.pop_front()
        {
            balancers.by_query.remove(&oldest);
        }
        let service = Arc::new(Service { query, balancer });
        balancers.order.push_back(text.to_owned());
        balancers.by_query.insert(text.to_owned(), service.clone());
        Ok(service)
    }

    async fn send(
        &self,
        request: Request,
        extensions: &mut http::Extensions,
        next: Next<'_>,
    ) -> Result<Response, reqwest_middleware::Error> {
        let url = request.url();
        let host = match url.host() {
            Some(url::Host::Domain(host)) => host.to_ascii_lowercase(),
            // Nothing to discover behind an address, or without a host.
            _ => return next.run(request, extensions).await,
        };
        let query_text = match url.port() {
            Some(port) => format!("{}://{host}:{port}", url.scheme()),
            None => format!("{}://{host}", url.scheme()),
        };
        let service = self.service(&query_text).await.map_err(middleware_error)?;
        let pins = self.pins.as_deref();
        let original = url.clone();
        let mut request = Some(request);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut this = request.take().expect("a request for each attempt");
            // Keep a copy for the next attempt; a streaming body cannot be copied.
            request = if attempt < self.inner.settings.attempts {
                this.try_clone()
            } else {
                None
            };
            // A request keyed for consistent hashing (a `PickKey` extension) picks by it.
            let picked = match extensions.get::<crate::PickKey>() {
                Some(&key) => service.balancer.pick_hashed(key),
                None => service.balancer.pick(),
            };
            let target = target(picked.endpoint(), &original, &service.query, pins.is_some())
                .map_err(middleware_error)?;
            if let (Some(pins), Some((name, address))) = (pins, target.pin) {
                pins.pin(name, address);
            }
            *this.url_mut() = target.url;
            if let Some(host) = target.host_header {
                this.headers_mut().entry(http::header::HOST).or_insert(host);
            }
            match next.clone().run(this, extensions).await {
                Ok(mut response) => {
                    // A 502, 503 or 504 (the endpoint, or what stands before it, cannot
                    // serve) counts toward ejecting it, as gRPC's UNAVAILABLE would; a
                    // 500 is the application's answer. The answer goes to the caller.
                    let unavailable = matches!(response.status().as_u16(), 502..=504);
                    if unavailable {
                        picked.failed();
                    } else {
                        picked.succeeded();
                    }
                    // The request stays outstanding (for power of two choices) until its
                    // response, body included, is dropped.
                    response.extensions_mut().insert(Arc::new(picked));
                    return Ok(response);
                }
                Err(reqwest_middleware::Error::Reqwest(e)) if e.is_connect() => {
                    picked.failed();
                    tracing::debug!(endpoint = %picked.endpoint(), error = %e, "connect failed");
                    if request.is_none() {
                        return Err(e.into());
                    }
                }
                Err(e) => {
                    // A request that timed out counts against the endpoint too: one
                    // that never answers must not look like one never measured.
                    if let reqwest_middleware::Error::Reqwest(e) = &e
                        && e.is_timeout()
                    {
                        picked.failed();
                    }
                    return Err(e);
                }
            }
        }
    }
}

/// Where one attempt goes.
#[derive(Debug)]
struct Target<'a> {
    url: Url,
    /// Set when the URL keeps the address but the endpoint has a host name.
    host_header: Option<http::HeaderValue>,
    /// The host name the URL now carries, and the address it must reach.
    pin: Option<(&'a str, IpAddr)>,
}

/// The request's URL sent to the endpoint: its scheme, address and path prefix, the
/// request's path and query. With `pinning`, an address with a host name is called by
/// that name (the client's resolver maps it back).
fn target<'a>(
    endpoint: &'a Endpoint,
    original: &Url,
    query: &Query,
    pinning: bool,
) -> Result<Target<'a>, Error> {
    let scheme = match endpoint.scheme() {
        Some(scheme @ ("http" | "https")) => scheme,
        Some(other) => {
            return Err(crate::unusable(
                endpoint,
                query,
                format!("an HTTP client needs an http or https endpoint, not {other}"),
            ));
        }
        // A bare host:port: the query's most preferred scheme, as .NET does.
        None => query
            .schemes()
            .iter()
            .map(String::as_str)
            .find(|s| matches!(*s, "http" | "https"))
            .unwrap_or("http"),
    };
    let bad = |what: String| crate::unusable(endpoint, query, what);
    let mut url = Url::parse(&format!("{scheme}://localhost/")).expect("a valid URL");
    let prefix = endpoint.path().unwrap_or("").trim_end_matches('/');
    url.set_path(&format!("{prefix}{}", original.path()));
    url.set_query(original.query());
    let mut host_header = None;
    let mut pin = None;
    match (endpoint.host().parse::<IpAddr>(), endpoint.host_name()) {
        (Ok(ip), Some(name)) if pinning => {
            url.set_host(Some(name))
                .map_err(|e| bad(format!("host-name {name:?}: {e}")))?;
            pin = Some((name, ip));
        }
        (Ok(ip), name) => {
            url.set_ip_host(ip)
                .map_err(|()| bad("cannot carry an address".into()))?;
            if let Some(name) = name {
                let value = match endpoint.port() {
                    Some(port) => format!("{name}:{port}"),
                    None => name.to_owned(),
                };
                host_header = http::HeaderValue::try_from(value).ok();
            }
        }
        (Err(_), _) => url
            .set_host(Some(endpoint.host()))
            .map_err(|e| bad(format!("host: {e}")))?,
    }
    url.set_port(endpoint.port())
        .map_err(|()| bad("cannot carry a port".into()))?;
    Ok(Target {
        url,
        host_header,
        pin,
    })
}

fn middleware_error(e: Error) -> reqwest_middleware::Error {
    reqwest_middleware::Error::Middleware(anyhow::Error::new(e))
}

#[async_trait::async_trait]
impl Middleware for Discovery {
    async fn handle(
        &self,
        request: Request,
        extensions: &mut http::Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        self.send(request, extensions, next).await
    }
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("strategy", &self.inner.settings.balancing.overrides.strategy)
            .field("attempts", &self.inner.settings.attempts)
            .finish_non_exhaustive()
    }
}

impl Pins {
    fn pin(&self, name: &str, address: IpAddr) {
        if self.0.read().unwrap().get(name) == Some(&address) {
            return;
        }
        let mut pins = self.0.write().unwrap();
        // Bounded by the endpoints seen; starting again only costs requests in flight
        // that moment a system lookup of their name.
        if pins.len() >= MAX_PINS && !pins.contains_key(name) {
            pins.clear();
        }
        pins.insert(name.to_owned(), address);
    }

    fn get(&self, name: &str) -> Option<IpAddr> {
        self.0.read().unwrap().get(name).copied()
    }
}

/// Name resolution through wasd for `reqwest::ClientBuilder::dns_resolver`: a host name
/// becomes the addresses of the service's endpoints (its `https+http` ones, else those
/// the chain gives for the bare name). Only names: the URL keeps its scheme and port, as
/// with DNS. Endpoints given by name, and names the chain does not know, are looked up
/// by the system.
///
/// ```no_run
/// # async fn demo(resolver: wasd::Resolver) -> Result<(), reqwest::Error> {
/// let client = reqwest::Client::builder()
///     .dns_resolver(wasd::http::DnsResolver::new(&resolver))
///     .build()?;
/// let page = client.get("http://basket:8080/").send().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct DnsResolver {
    /// `None` in a [`Discovery`] client: the middleware already resolved the service,
    /// and the names left are pinned ones or endpoints' own.
    resolver: Option<Resolver>,
    pins: Arc<Pins>,
}

impl DnsResolver {
    /// Resolve names with `resolver`.
    pub fn new(resolver: &Resolver) -> DnsResolver {
        DnsResolver {
            resolver: Some(resolver.clone()),
            pins: Arc::default(),
        }
    }

    /// The addresses `name` stands for (ports 0: the URL's port applies).
    pub async fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, Error> {
        if let Some(pinned) = self.pins.get(name) {
            return Ok(vec![pinned]);
        }
        let hosts = match &self.resolver {
            None => vec![name.to_owned()],
            Some(resolver) => match service_hosts(resolver, name).await {
                Ok(hosts) => hosts,
                // Discovery has nothing for the name: the system resolves it. A provider
                // that failed is not papered over by the system's DNS either.
                Err(Error::NoEndpoints { failures, .. }) if failures.is_empty() => vec![name.to_owned()],
                Err(e) => return Err(e),
            },
        };
        let mut addresses = Vec::with_capacity(hosts.len());
        for host in hosts {
            match host.parse::<IpAddr>() {
                Ok(ip) => addresses.push(ip),
                Err(_) => match tokio::net::lookup_host((host.as_str(), 0)).await {
                    Ok(found) => addresses.extend(found.map(|a| a.ip())),
                    Err(e) => tracing::debug!(host, error = %e, "system lookup failed"),
                },
            }
        }
        addresses.dedup();
        if addresses.is_empty() {
            return Err(Error::NoEndpoints {
                service: name.to_owned(),
                failures: Vec::new(),
            });
        }
        Ok(addresses)
    }
}

/// The hosts of `name`'s endpoints: its HTTP ones if it has any, else any.
async fn service_hosts(resolver: &Resolver, name: &str) -> Result<Vec<String>, Error> {
    let set = match resolver.resolve(&format!("https+http://{name}")).await {
        // Nothing anywhere for the scheme form: the bare name. A failure is no "nothing".
        Err(Error::NoEndpoints { failures, .. }) if failures.is_empty() => resolver.resolve(name).await?,
        other => other?,
    };
    Ok(set.iter().map(|e| e.host().to_owned()).collect())
}

impl Resolve for DnsResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let this = self.clone();
        Box::pin(async move {
            let addresses = this.lookup(name.as_str()).await?;
            Ok(Box::new(addresses.into_iter().map(|ip| SocketAddr::new(ip, 0))) as Addrs)
        })
    }
}

impl std::fmt::Debug for DnsResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsResolver").finish_non_exhaustive()
    }
}

impl Resolver {
    /// A reqwest client on which `get("https+http://catalog/api/items")` calls one of
    /// `catalog`'s endpoints: [`Discovery::new`] with reqwest's defaults.
    pub fn http_client(&self) -> Result<ClientWithMiddleware, reqwest::Error> {
        Discovery::new(self).client()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(scheme: Option<&str>, host: &str, port: Option<u16>, path: Option<&str>) -> Endpoint {
        Endpoint::from_parts(
            scheme.map(Into::into),
            host.into(),
            port,
            path.map(Into::into),
            Vec::new(),
        )
    }

    fn url(endpoint: &Endpoint, request: &str, pinning: bool) -> Target<'static> {
        let original = Url::parse(request).unwrap();
        let query = Query::parse(&format!(
            "{}://{}",
            original.scheme(),
            original.host_str().unwrap()
        ))
        .unwrap();
        // The endpoint outlives the test's assertions.
        let endpoint: &'static Endpoint = Box::leak(Box::new(endpoint.clone()));
        target(endpoint, &original, &query, pinning).unwrap()
    }

    #[test]
    fn urls_take_the_endpoint_scheme_address_port_and_prefix() {
        let e = endpoint(Some("https"), "10.0.0.1", Some(8443), Some("/base/"));
        assert_eq!(
            url(&e, "https+http://catalog/api/items?page=2&q=a%20b", false)
                .url
                .as_str(),
            "https://10.0.0.1:8443/base/api/items?page=2&q=a%20b"
        );
        // Default ports stay implicit; IPv6 gets its brackets.
        let e = endpoint(Some("http"), "fd00::1", Some(80), None);
        assert_eq!(
            url(&e, "http://catalog/", false).url.as_str(),
            "http://[fd00::1]/"
        );
        // A bare host:port takes the query's first scheme.
        let e = endpoint(None, "catalog.internal", Some(7000), None);
        assert_eq!(
            url(&e, "https+http://catalog/x", false).url.as_str(),
            "https://catalog.internal:7000/x"
        );
        // A prefix with characters a path must escape stays in the path.
        let e = endpoint(Some("http"), "10.0.0.1", None, Some("/a?b#c"));
        assert_eq!(
            url(&e, "http://catalog/d?e", false).url.as_str(),
            "http://10.0.0.1/a%3Fb%23c/d?e"
        );
    }

    #[test]
    fn an_address_with_a_host_name_is_called_by_name_or_named_in_host() {
        let e = endpoint(Some("https"), "10.0.0.1", Some(8443), None)
            .with_metadata("host-name", "node-1.cluster.local.");
        let pinned = url(&e, "https://catalog/x", true);
        assert_eq!(pinned.url.as_str(), "https://node-1.cluster.local:8443/x");
        assert_eq!(
            pinned.pin,
            Some(("node-1.cluster.local", "10.0.0.1".parse().unwrap()))
        );
        assert!(pinned.host_header.is_none());
        let unpinned = url(&e, "https://catalog/x", false);
        assert_eq!(unpinned.url.as_str(), "https://10.0.0.1:8443/x");
        assert_eq!(unpinned.host_header.unwrap(), "node-1.cluster.local:8443");
    }

    #[test]
    fn other_schemes_are_refused_by_name() {
        let e = endpoint(Some("grpc"), "10.0.0.1", Some(9000), None);
        let original = Url::parse("http://catalog/").unwrap();
        let err = target(&e, &original, &Query::parse("http://catalog").unwrap(), false).unwrap_err();
        assert!(err.to_string().contains("not grpc"), "{err}");
    }
}
