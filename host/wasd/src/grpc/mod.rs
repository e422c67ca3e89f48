//! gRPC channels over a watched query (feature `tonic`): Kratos's `discovery:///name`
//! dialing for tonic, two ways.
//!
//! [`ChannelBuilder::build_balanced`] (a [`BalancedChannel`]): wasd balances each call
//! itself, under the query's policy, over one tonic channel per endpoint, and each
//! call's failure counts against the endpoint it went to (see `balanced.rs`).
//!
//! [`ChannelBuilder::build`] (tonic's own [`Channel`]): endpoints reach tonic's balanced
//! channel (`Channel::balance_channel`, power of two choices) as insert/remove changes,
//! so the channel follows them live and, like Kratos, never drops to an empty set.
//!
//! tonic's balancer connects lazily and keeps picking an endpoint whose connection
//! fails (each such call fails). grpc-go only picks subchannels that are READY; the same
//! here: an endpoint enters the channel once a TCP connection to it succeeds, leaves it
//! when one fails (checked every few seconds), and is tried again with back-off. When no
//! endpoint is reachable they all stay in, so calls fail with the real error instead of
//! waiting.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::Sender;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint as TonicEndpoint};

use wasd_core::{Backoff, Endpoint, EndpointSet, Error, Query, Watch};

use crate::balance::{Balancing, EndpointHealth, Policy};
use crate::resolver::Resolver;

mod balanced;

pub use balanced::BalancedChannel;

/// Changes buffered between the watch and the channel.
const CHANGE_BUFFER: usize = 64;

/// How long a new connection may take unless `configure` says otherwise; without it a
/// black-holed address would hold requests until the OS gives up.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often endpoints in the channel are checked, and unreachable ones at first.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// How long a reachability check may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest wait between checks of an unreachable endpoint.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

type Configure = Arc<dyn Fn(&Endpoint, TonicEndpoint) -> TonicEndpoint + Send + Sync>;

/// Options of a discovered gRPC channel; see [`Resolver::grpc_channel`].
#[must_use]
pub struct ChannelBuilder {
    resolver: Resolver,
    target: String,
    filters: Vec<(String, String)>,
    configure: Option<Configure>,
    health_interval: Duration,
    health_check: Option<crate::HealthCheck>,
    attempts: usize,
}

/// Endpoints a call of a [`BalancedChannel`] tries, unless `attempts` says otherwise.
pub const DEFAULT_ATTEMPTS: usize = 3;

impl ChannelBuilder {
    /// Check endpoints actively (a gRPC health `Check`, say), over the configured
    /// policy's checks: an endpoint failing them leaves the channel at its next
    /// reachability check.
    pub fn health_check(mut self, check: crate::HealthCheck) -> Self {
        self.health_check = Some(check);
        self
    }

    /// Only endpoints whose metadata has `key` = `value`.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.filters.push((key.into(), value.into()));
        self
    }

    /// Only endpoints of this instance version (Kratos's `filter.Version`).
    pub fn version(self, version: impl Into<String>) -> Self {
        self.metadata("version", version)
    }

    /// Adjust each endpoint's connection settings: timeouts, keep-alive, and TLS (enable
    /// one of tonic's `tls-*` features yourself and call `tls_config`; the wasd endpoint
    /// carries the `host-name` to verify).
    pub fn configure(
        mut self,
        configure: impl Fn(&Endpoint, TonicEndpoint) -> TonicEndpoint + Send + Sync + 'static,
    ) -> Self {
        self.configure = Some(Arc::new(configure));
        self
    }

    /// How often endpoints are checked for reachability (default 5 s): an endpoint that
    /// stopped accepting connections leaves the channel within this time. For
    /// [`build`](Self::build) only: a [`BalancedChannel`] leaves such an endpoint out at
    /// its first failed call.
    pub fn health_interval(mut self, interval: Duration) -> Self {
        self.health_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// How many endpoints a call of a [`BalancedChannel`] tries when their connections
    /// cannot be made (default 3; the request is unsent until one is). A call that was
    /// sent is never sent again.
    pub fn attempts(mut self, attempts: usize) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// The target as a query, with the builder's filters.
    fn query(&self) -> Result<Query, Error> {
        let query = target_query(&self.target)?;
        Ok(self.filters.iter().fold(query, |query, (key, value)| {
            query.with_filter(key.clone(), value.clone())
        }))
    }

    /// Resolve the target (failing as [`Resolver::resolve`] does when nothing answers)
    /// and return a channel that balances each call itself, through a [`Balancer`] under
    /// the query's policy (`[[policy]]`, with this builder's health check over it):
    /// every strategy, zones, subsets, active checks, and ejection fed by the calls'
    /// own outcomes. Each endpoint gets its own tonic channel, connected by the first
    /// call that picks it; an endpoint whose connection cannot be made is passed over
    /// before the request is sent.
    ///
    /// [`Balancer`]: crate::Balancer
    pub async fn build_balanced(self) -> Result<BalancedChannel, Error> {
        let query = self.query()?;
        let mut balancer = self.resolver.balancer_for_query(&query);
        if let Some(check) = self.health_check {
            balancer = balancer.health_check(check);
        }
        let balancer = balancer.build().await?;
        // Every endpoint must be one a channel can be made for: refuse a target of
        // others now rather than at each call.
        for endpoint in balancer.endpoints() {
            tonic_endpoint(&endpoint, &query)?;
        }
        Ok(BalancedChannel::new(
            balancer,
            query,
            self.configure,
            self.attempts,
        ))
    }

    /// Resolve the target (failing as [`Resolver::resolve`] does when nothing answers),
    /// check which endpoints accept connections, and return a channel that follows the
    /// target. Connections are made by tonic, per endpoint, on first use.
    pub async fn build(self) -> Result<Channel, Error> {
        let query = self.query()?;
        let watch = self.resolver.watch_query(&query).await?;
        let first = watch.current();
        if first.is_empty() {
            return Err(Error::NoEndpoints {
                service: query.service().to_owned(),
                failures: Vec::new(),
            });
        }
        // The channel reads changes only when a call comes, and none can come before
        // this returns: room for all the first ones.
        let capacity = CHANGE_BUFFER.max(2 * first.len());
        let (channel, sender) = Channel::balance_channel::<Endpoint>(capacity);
        let balancing = self.resolver.balancing().clone();
        let mut policy = balancing.policies().for_query(&query);
        if let Some(check) = self.health_check {
            policy.health = Some(check);
        }
        let mut feeder = Feeder {
            balancing,
            policy,
            health: HashMap::new(),
            query,
            configure: self.configure,
            interval: self.health_interval,
            sender,
            wanted: HashMap::new(),
            live: HashSet::new(),
            fallback: HashSet::new(),
            held: HashMap::new(),
        };
        // The first endpoints are checked before the channel is handed out, so that no
        // first call goes to a dead one.
        if let Some(e) = feeder.apply(&first).await {
            // None usable: a channel with nothing in it would hold every call.
            return Err(e);
        }
        tokio::spawn(feeder.run(watch));
        Ok(channel)
    }
}

/// Feeds one channel: the watched endpoints, less the unreachable ones and those the
/// resolver's health table leaves out (active checks of the query's policy failing).
struct Feeder {
    balancing: Arc<Balancing>,
    /// The configured policy for the query (its active checks and outlier settings).
    policy: Policy,
    /// Each wanted endpoint's entry in the health table, held so that its checks go on.
    health: HashMap<Endpoint, Arc<EndpointHealth>>,
    query: Query,
    configure: Option<Configure>,
    interval: Duration,
    sender: Sender<Change<Endpoint, TonicEndpoint>>,
    /// The discovered endpoints.
    wanted: HashMap<Endpoint, TonicEndpoint>,
    /// In the channel, last seen reachable.
    live: HashSet<Endpoint>,
    /// In the channel although unreachable: nothing better is there.
    fallback: HashSet<Endpoint>,
    /// Out of the channel, unreachable: when to check again, and the wait after that.
    held: HashMap<Endpoint, (Instant, Backoff)>,
}

impl Feeder {
    async fn run(mut self, mut watch: Watch) {
        let mut next_check = Instant::now() + self.interval;
        loop {
            tokio::select! {
                set = watch.changed() => match set {
                    Some(set) => {
                        self.apply(&set).await;
                    }
                    None => return,
                },
                () = tokio::time::sleep_until(next_check) => {
                    let now = Instant::now();
                    let due: Vec<Endpoint> = self
                        .wanted
                        .keys()
                        .filter(|e| self.held.get(*e).is_none_or(|(at, _)| *at <= now))
                        .cloned()
                        .collect();
                    self.check(due).await;
                    next_check = Instant::now() + self.interval;
                }
                // Every clone of the channel is gone: stop watching.
                () = self.sender.closed() => return,
            }
        }
    }

    /// Follow a new set: gone endpoints leave, new ones are checked and enter. A set
    /// with no usable endpoint changes nothing, and gives the first one's error.
    async fn apply(&mut self, set: &EndpointSet) -> Option<Error> {
        if set.is_empty() {
            tracing::warn!(
                query = %self.query,
                "no endpoints now; the channel keeps the {} it has",
                self.live.len() + self.fallback.len()
            );
            return None;
        }
        let mut usable = HashMap::new();
        let mut unusable = None;
        for endpoint in set.iter() {
            if let Some(tonic) = self.wanted.get(endpoint) {
                usable.insert(endpoint, tonic.clone());
                continue;
            }
            match tonic_endpoint(endpoint, &self.query) {
                Ok(tonic) => {
                    let tonic = match &self.configure {
                        Some(configure) => configure(endpoint, tonic),
                        None => tonic,
                    };
                    usable.insert(endpoint, tonic);
                }
                Err(e) => {
                    tracing::warn!("{e}; left out of the channel");
                    unusable.get_or_insert(e);
                }
            }
        }
        if usable.is_empty() {
            // As an empty set: keep what the channel has.
            return unusable;
        }
        let gone: Vec<Endpoint> = self
            .wanted
            .keys()
            .filter(|e| !usable.contains_key(e))
            .cloned()
            .collect();
        let mut added = Vec::new();
        for (endpoint, tonic) in usable {
            if !self.wanted.contains_key(endpoint) {
                self.wanted.insert(endpoint.clone(), tonic);
                let table = self.balancing.table();
                let entry = table.entry(endpoint);
                if let Some(check) = &self.policy.health {
                    table.check(&entry, endpoint, check);
                }
                self.health.insert(endpoint.clone(), entry);
                added.push(endpoint.clone());
            }
        }
        self.check(added).await;
        for endpoint in gone {
            self.wanted.remove(&endpoint);
            self.health.remove(&endpoint);
            self.held.remove(&endpoint);
            let inserted = self.live.remove(&endpoint) | self.fallback.remove(&endpoint);
            if inserted {
                self.send(Change::Remove(endpoint)).await;
            }
        }
        self.keep_one_in().await;
        None
    }

    /// Check `endpoints` at once and move each in or out of the channel.
    async fn check(&mut self, endpoints: Vec<Endpoint>) {
        let mut probes = JoinSet::new();
        for endpoint in endpoints {
            probes.spawn(async move {
                let reachable = reachable(&endpoint).await;
                (endpoint, reachable)
            });
        }
        let mut results = Vec::new();
        while let Some(result) = probes.join_next().await {
            if let Ok((endpoint, reachable)) = result {
                // What every client of the resolver knows: a refused connection counts
                // as a failure, and an endpoint failing its active checks stays out.
                let healthy = match self.health.get(&endpoint) {
                    Some(health) if reachable => {
                        health.reached();
                        health.checks_pass()
                    }
                    Some(health) => {
                        // Within the policy's cap, counted over this channel's endpoints.
                        let now = self.balancing.table().common().now_ms();
                        let (n, out) = (
                            self.health.len(),
                            self.health
                                .values()
                                .filter(|h| h.ejected_until(now).is_some())
                                .count(),
                        );
                        let cap = usize::from(self.policy.outlier.max_ejection_percent);
                        health.failed(&self.policy.outlier, || out == 0 || (out + 1) * 100 <= cap * n);
                        false
                    }
                    None => reachable,
                };
                results.push((endpoint, healthy));
            }
        }
        // Reachable ones first, so that an unreachable one is never kept in as the
        // fallback while a reachable one is on its way in.
        results.sort_by_key(|(_, reachable)| !reachable);
        for (endpoint, reachable) in results {
            let Some(tonic) = self.wanted.get(&endpoint).cloned() else {
                continue;
            };
            if reachable {
                self.held.remove(&endpoint);
                if self.fallback.remove(&endpoint) {
                    self.live.insert(endpoint);
                } else if self.live.insert(endpoint.clone()) {
                    self.send(Change::Insert(endpoint, tonic)).await;
                }
                // A reachable endpoint is in: the unreachable ones kept as a fallback go.
                for endpoint in std::mem::take(&mut self.fallback) {
                    self.hold(endpoint.clone());
                    self.send(Change::Remove(endpoint)).await;
                }
            } else if self.live.remove(&endpoint) {
                tracing::info!(%endpoint, query = %self.query, "endpoint unreachable; out of the channel");
                self.hold(endpoint.clone());
                self.send(Change::Remove(endpoint)).await;
            } else {
                self.hold(endpoint);
            }
        }
        self.keep_one_in().await;
    }

    /// Never leave the channel empty while endpoints are known: with none reachable,
    /// they all go in, and calls fail with the connection error rather than wait.
    async fn keep_one_in(&mut self) {
        if !self.live.is_empty() || !self.fallback.is_empty() {
            return;
        }
        let all: Vec<(Endpoint, TonicEndpoint)> =
            self.wanted.iter().map(|(e, t)| (e.clone(), t.clone())).collect();
        for (endpoint, tonic) in all {
            self.fallback.insert(endpoint.clone());
            self.send(Change::Insert(endpoint, tonic)).await;
        }
    }

    /// Check an unreachable endpoint again later, waiting longer each time.
    fn hold(&mut self, endpoint: Endpoint) {
        // At most six intervals (30 s with the default 5 s), at most 30 s.
        let longest = (self.interval * 6).min(MAX_BACKOFF);
        let (at, backoff) = self
            .held
            .entry(endpoint)
            .or_insert_with(|| (Instant::now(), Backoff::new(self.interval.min(longest), longest)));
        *at = Instant::now() + backoff.next_delay();
    }

    async fn send(&self, change: Change<Endpoint, TonicEndpoint>) {
        // Fails only when the channel is gone; the loop sees that and ends.
        let _ = self.sender.send(change).await;
    }
}

/// Whether the endpoint accepts a TCP connection now.
async fn reachable(endpoint: &Endpoint) -> bool {
    let port = crate::balance::port_of(endpoint);
    let connect = tokio::net::TcpStream::connect((endpoint.host(), port));
    matches!(tokio::time::timeout(PROBE_TIMEOUT, connect).await, Ok(Ok(_)))
}

/// `discovery:///name` (Kratos; `discovery://authority/name` too, the authority being
/// the registry Kratos would pick and wasd's chain already is) asks for `grpc://name`;
/// anything else is a wasd query (`grpcs+grpc://greeter`, `https://_grpc.basket`).
fn target_query(target: &str) -> Result<Query, Error> {
    match target.strip_prefix("discovery://") {
        Some(rest) => {
            let name = rest.split_once('/').map_or(rest, |(_, name)| name);
            let name = name.trim_end_matches('/');
            if name.is_empty() {
                return Err(Error::InvalidQuery {
                    query: target.to_owned(),
                    reason: "no service name after `discovery:///`".into(),
                });
            }
            Query::parse(&format!("grpc://{name}"))
        }
        None => Query::parse(target),
    }
}

/// How tonic reaches one endpoint: `grpc` and `http` are h2c, `grpcs` and `https` TLS
/// (when tonic has a TLS feature on). An address with a `host-name` is called by that
/// name (`:authority`).
fn tonic_endpoint(endpoint: &Endpoint, query: &Query) -> Result<TonicEndpoint, Error> {
    let scheme = match endpoint.scheme() {
        Some("grpc" | "http") | None => "http",
        Some("grpcs" | "https") => "https",
        Some(other) => {
            return Err(crate::unusable(
                endpoint,
                query,
                format!("a gRPC channel needs a grpc, grpcs, http or https endpoint, not {other}"),
            ));
        }
    };
    // Endpoint's Display brackets IPv6 hosts; without the scheme and path, it is the
    // authority.
    let authority =
        |host: &str| Endpoint::from_parts(None, host.to_owned(), endpoint.port(), None, Vec::new());
    let unusable = |e: &dyn std::fmt::Display| crate::unusable(endpoint, query, e.to_string());
    // `new`, not `from_shared`: it turns TLS on for https when tonic can do TLS.
    let mut tonic = TonicEndpoint::new(format!("{scheme}://{}", authority(endpoint.host())))
        .map_err(|e| unusable(&e))?
        .connect_timeout(DEFAULT_CONNECT_TIMEOUT);
    if let Some(name) = endpoint.host_name() {
        let origin = format!("{scheme}://{}", authority(name))
            .parse()
            .map_err(|e| unusable(&e))?;
        tonic = tonic.origin(origin);
    }
    Ok(tonic)
}

impl Resolver {
    /// A tonic channel over a discovery target, balanced over its endpoints (power of two
    /// choices on pending requests) and following their changes:
    ///
    /// ```no_run
    /// # async fn demo(resolver: wasd::Resolver) -> Result<(), wasd::Error> {
    /// let channel = resolver.grpc_channel("discovery:///greeter").await?;
    /// // let mut client = GreeterClient::new(channel);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// `discovery:///name` asks for the `grpc` endpoints of `name` (as Kratos dials
    /// insecure); any wasd query also works (`grpcs+grpc://greeter`).
    pub async fn grpc_channel(&self, target: &str) -> Result<Channel, Error> {
        self.grpc_channel_builder(target).build().await
    }

    /// A [`ChannelBuilder`], to filter endpoints or adjust their connection settings.
    pub fn grpc_channel_builder(&self, target: impl Into<String>) -> ChannelBuilder {
        ChannelBuilder {
            resolver: self.clone(),
            target: target.into(),
            filters: Vec::new(),
            configure: None,
            health_interval: DEFAULT_HEALTH_INTERVAL,
            health_check: None,
            attempts: DEFAULT_ATTEMPTS,
        }
    }

    /// A [`BalancedChannel`] over a discovery target: wasd balances each call under the
    /// query's policy and counts its failure against the endpoint it went to.
    ///
    /// ```no_run
    /// # async fn demo(resolver: wasd::Resolver) -> Result<(), wasd::Error> {
    /// let channel = resolver.grpc_balanced_channel("discovery:///greeter").await?;
    /// // let mut client = GreeterClient::new(channel);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn grpc_balanced_channel(&self, target: &str) -> Result<BalancedChannel, Error> {
        self.grpc_channel_builder(target).build_balanced().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            target_query("discovery:///greeter").unwrap().as_str(),
            "grpc://greeter"
        );
        assert_eq!(
            target_query("discovery://etcd/greeter").unwrap().as_str(),
            "grpc://greeter"
        );
        assert_eq!(
            target_query("grpcs+grpc://greeter").unwrap().schemes(),
            ["grpcs", "grpc"]
        );
        assert!(target_query("discovery:///").is_err());
    }
}
