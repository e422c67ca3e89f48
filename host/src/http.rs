//! HTTP clients that call services by name (feature `reqwest`).
//!
//! [`Discovery`] is a `reqwest-middleware` middleware: a request to
//! `https+http://catalog/api/items` resolves `catalog` through the host, picks one of its
//! endpoints with a [`Balancer`], rewrites the URL's scheme, host, port and path prefix
//! to that endpoint, and on a connect failure marks the endpoint failed and tries the
//! next one. [`DnsResolver`] is the same resolution at the level of names only, for a
//! plain `reqwest::Client`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::{Request, Response, Url};
use reqwest_middleware::{Middleware, Next};
// The client type [`Discovery::client`] returns, so callers can name it without
// depending on reqwest-middleware themselves.
pub use reqwest_middleware::ClientWithMiddleware;

use crate::balance::{Balancer, DEFAULT_EJECTION, Strategy};
use crate::endpoint::Endpoint;
use crate::error::Error;
use crate::query::Query;
use crate::resolver::Resolver;

/// Endpoints tried per request when connecting fails (the first pick included).
pub const DEFAULT_ATTEMPTS: usize = 3;

/// Services a client keeps a balancer for; beyond that the least recently created goes.
const MAX_SERVICES: usize = 1024;

/// Host names pinned to discovered addresses; beyond that the table starts again.
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
/// it, a host no provider knows fails the request with [`Error::NoEndpoints`] (wrapped in
/// `reqwest_middleware::Error::Middleware`). Requests to an IP address are sent as
/// they are.
///
/// An endpoint given as an IP address with a `host-name` (the target of an SRV record) is
/// called by that name, so TLS verifies it (SNI) and the `Host` header carries it, while
/// the connection goes to the discovered address: the client made by
/// [`Discovery::client`] resolves the name to it. With a client of your own, install
/// [`Discovery::dns_resolver`] for that; without it the request keeps the address and only
/// the `Host` header names the host.
#[derive(Clone)]
pub struct Discovery {
    inner: Arc<Inner>,
}

struct Inner {
    resolver: Resolver,
    strategy: Strategy,
    metadata: Vec<(String, String)>,
    ejection: Duration,
    attempts: usize,
    balancers: Mutex<Balancers>,
    pins: Arc<Pins>,
    /// Whether a client resolves names with this discovery's [`DnsResolver`], so that
    /// pinned host names reach the discovered address.
    pinning: AtomicBool,
}

#[derive(Default)]
struct Balancers {
    by_query: HashMap<String, Balancer>,
    /// Creation order, for evicting the oldest.
    order: std::collections::VecDeque<String>,
}

/// Host name -> the discovered addresses it stands for, the last picked first.
#[derive(Default)]
struct Pins(RwLock<HashMap<String, Vec<SocketAddr>>>);

/// Options of a [`Discovery`].
pub struct DiscoveryBuilder {
    resolver: Resolver,
    strategy: Strategy,
    metadata: Vec<(String, String)>,
    ejection: Duration,
    attempts: usize,
}

impl DiscoveryBuilder {
    /// How each service's endpoints are picked (default round-robin).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Only endpoints whose metadata has `key` = `value`.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.push((key.into(), value.into()));
        self
    }

    /// Only endpoints of this instance version (Kratos's `filter.Version`).
    pub fn version(self, version: impl Into<String>) -> Self {
        self.metadata("version", version)
    }

    /// How long an endpoint that refused a connection is left out at first (default 1 s,
    /// doubling while it keeps failing).
    pub fn ejection(mut self, first: Duration) -> Self {
        self.ejection = first;
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
                resolver: self.resolver,
                strategy: self.strategy,
                metadata: self.metadata,
                ejection: self.ejection,
                attempts: self.attempts,
                balancers: Mutex::default(),
                pins: Arc::default(),
                pinning: AtomicBool::new(false),
            }),
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
            strategy: Strategy::default(),
            metadata: Vec::new(),
            ejection: DEFAULT_EJECTION,
            attempts: DEFAULT_ATTEMPTS,
        }
    }

    /// A client with reqwest's defaults that sends every request through this discovery.
    pub fn client(&self) -> Result<ClientWithMiddleware, reqwest::Error> {
        self.client_with(reqwest::Client::builder())
    }

    /// `builder` (timeouts, TLS, ...) made into a client that sends every request
    /// through this discovery and resolves host names with [`Discovery::dns_resolver`].
    pub fn client_with(
        &self,
        builder: reqwest::ClientBuilder,
    ) -> Result<ClientWithMiddleware, reqwest::Error> {
        let client = builder.dns_resolver(self.dns_resolver()).build()?;
        Ok(reqwest_middleware::ClientBuilder::new(client)
            .with(self.clone())
            .build())
    }

    /// A resolver for `reqwest::ClientBuilder::dns_resolver` that knows the addresses
    /// behind the host names this discovery pins, and asks the wasd resolver for others.
    pub fn dns_resolver(&self) -> DnsResolver {
        self.inner.pinning.store(true, Ordering::Relaxed);
        DnsResolver {
            resolver: self.inner.resolver.clone(),
            pins: self.inner.pins.clone(),
        }
    }

    async fn balancer(&self, query: &str) -> Result<Balancer, Error> {
        if let Some(balancer) = self.inner.balancers.lock().unwrap().by_query.get(query) {
            return Ok(balancer.clone());
        }
        let mut builder = self
            .inner
            .resolver
            .balancer_builder(query)
            .strategy(self.inner.strategy)
            .ejection(self.inner.ejection);
        for (key, value) in &self.inner.metadata {
            builder = builder.metadata(key.clone(), value.clone());
        }
        let balancer = builder.build().await?;
        let mut balancers = self.inner.balancers.lock().unwrap();
        // Another request may have built one meanwhile: keep the first, so that all
        // share counters and failure marks.
        if let Some(existing) = balancers.by_query.get(query) {
            return Ok(existing.clone());
        }
        if balancers.order.len() >= MAX_SERVICES
            && let Some(oldest) = balancers.order.pop_front()
        {
            balancers.by_query.remove(&oldest);
        }
        balancers.order.push_back(query.to_owned());
        balancers.by_query.insert(query.to_owned(), balancer.clone());
        Ok(balancer)
    }

    async fn send(
        &self,
        request: Request,
        extensions: &mut http::Extensions,
        next: Next<'_>,
    ) -> Result<Response, reqwest_middleware::Error> {
        let url = request.url();
        let Some(host) = url.host_str() else {
            return next.run(request, extensions).await;
        };
        // Nothing to discover behind an address.
        if matches!(url.scheme(), "http" | "https")
            && url.host().is_some_and(|h| !matches!(h, url::Host::Domain(_)))
        {
            return next.run(request, extensions).await;
        }
        let query_text = match url.port() {
            Some(port) => format!("{}://{host}:{port}", url.scheme()),
            None => format!("{}://{host}", url.scheme()),
        };
        let query = Query::parse(&query_text).map_err(middleware_error)?;
        let balancer = self.balancer(&query_text).await.map_err(middleware_error)?;
        let original = url.clone();
        let mut request = Some(request);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut this = request.take().expect("a request for each attempt");
            // Keep a copy for the next attempt; a streaming body cannot be copied.
            request = if attempt < self.inner.attempts {
                this.try_clone()
            } else {
                None
            };
            let picked = balancer.pick();
            let target = self
                .target(picked.endpoint(), &original, &query)
                .map_err(middleware_error)?;
            *this.url_mut() = target.url;
            if let Some(host) = target.host_header {
                this.headers_mut().insert(http::header::HOST, host);
            }
            match next.clone().run(this, extensions).await {
                Ok(response) => {
                    picked.succeeded();
                    return Ok(response);
                }
                Err(reqwest_middleware::Error::Reqwest(e)) if e.is_connect() => {
                    picked.failed();
                    tracing::debug!(endpoint = %picked.endpoint(), error = %e, "connect failed");
                    if request.is_none() {
                        return Err(e.into());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The request's URL with the endpoint's scheme, address and path prefix.
    fn target(&self, endpoint: &Endpoint, original: &Url, query: &Query) -> Result<Target, Error> {
        let scheme = match endpoint.scheme() {
            Some(scheme @ ("http" | "https")) => scheme,
            Some(other) => {
                return Err(unusable(
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
        let prefix = endpoint.path().unwrap_or("").trim_end_matches('/');
        let mut text = format!("{scheme}://placeholder{prefix}{}", original.path());
        if let Some(q) = original.query() {
            text.push('?');
            text.push_str(q);
        }
        let bad = |what: &str| unusable(endpoint, query, what.to_owned());
        let mut url = Url::parse(&text).map_err(|e| bad(&format!("not a URL: {e}")))?;
        url.set_port(endpoint.port())
            .map_err(|()| bad("cannot carry a port"))?;
        let host_name = endpoint
            .metadata_value("host-name")
            .map(|n| n.trim_end_matches('.'))
            .filter(|n| !n.is_empty());
        let mut host_header = None;
        match (endpoint.host().parse::<IpAddr>(), host_name) {
            (Ok(ip), Some(name)) if self.inner.pinning.load(Ordering::Relaxed) => {
                url.set_host(Some(name))
                    .map_err(|e| bad(&format!("host-name {name:?}: {e}")))?;
                self.inner.pins.pin(
                    name,
                    SocketAddr::new(ip, url.port_or_known_default().unwrap_or(0)),
                );
            }
            (Ok(ip), name) => {
                url.set_ip_host(ip).map_err(|()| bad("cannot carry an address"))?;
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
                .map_err(|e| bad(&format!("host: {e}")))?,
        }
        Ok(Target { url, host_header })
    }
}

struct Target {
    url: Url,
    host_header: Option<http::HeaderValue>,
}

fn unusable(endpoint: &Endpoint, query: &Query, reason: String) -> Error {
    Error::UnusableEndpoint {
        query: query.to_string(),
        endpoint: endpoint.to_string(),
        reason,
    }
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
            .field("strategy", &self.inner.strategy)
            .field("attempts", &self.inner.attempts)
            .finish_non_exhaustive()
    }
}

impl Pins {
    fn pin(&self, name: &str, address: SocketAddr) {
        if self
            .0
            .read()
            .unwrap()
            .get(name)
            .is_some_and(|a| a.first() == Some(&address))
        {
            return;
        }
        let mut pins = self.0.write().unwrap();
        if pins.len() >= MAX_PINS && !pins.contains_key(name) {
            pins.clear();
        }
        let addresses = pins.entry(name.to_owned()).or_default();
        addresses.retain(|a| *a != address);
        addresses.insert(0, address);
        addresses.truncate(8);
    }

    fn get(&self, name: &str) -> Option<Vec<SocketAddr>> {
        self.0.read().unwrap().get(name).cloned()
    }
}

/// Name resolution through wasd for `reqwest::ClientBuilder::dns_resolver`: a host name
/// becomes the addresses of its endpoints; the URL keeps its scheme and port, as DNS
/// would. Endpoints given by name, such as the pass-through provider's, are looked up by
/// the system.
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
    resolver: Resolver,
    pins: Arc<Pins>,
}

impl DnsResolver {
    /// Resolve names with `resolver`.
    pub fn new(resolver: &Resolver) -> DnsResolver {
        DnsResolver {
            resolver: resolver.clone(),
            pins: Arc::default(),
        }
    }

    /// The addresses `name` stands for: those of its HTTP endpoints (`https+http://name`)
    /// or, when it has none, of whatever endpoints the chain gives for `name`.
    pub async fn lookup(&self, name: &str) -> Result<Vec<SocketAddr>, Error> {
        if let Some(pinned) = self.pins.get(name) {
            return Ok(pinned);
        }
        let set = match self.resolver.resolve(&format!("https+http://{name}")).await {
            Ok(set) => set,
            Err(Error::NoEndpoints { .. }) => self.resolver.resolve(name).await?,
            Err(e) => return Err(e),
        };
        let mut addresses = Vec::with_capacity(set.len());
        for endpoint in set.iter() {
            let port = endpoint.port().unwrap_or(0);
            match endpoint.host().parse::<IpAddr>() {
                Ok(ip) => addresses.push(SocketAddr::new(ip, port)),
                Err(_) => match tokio::net::lookup_host((endpoint.host(), port)).await {
                    Ok(found) => addresses.extend(found),
                    Err(e) => tracing::debug!(host = endpoint.host(), error = %e, "system lookup failed"),
                },
            }
        }
        if addresses.is_empty() {
            return Err(Error::NoEndpoints {
                service: name.to_owned(),
                failures: Vec::new(),
            });
        }
        Ok(addresses)
    }
}

impl Resolve for DnsResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let this = self.clone();
        Box::pin(async move {
            let addresses = this.lookup(name.as_str()).await?;
            Ok(Box::new(addresses.into_iter()) as Addrs)
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
