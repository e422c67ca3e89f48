//! The sidecar's xDS server: an Aggregated Discovery Service (xDS v3, state of the
//! world, over gRPC with tonic) that gives gRPC clients in any language what they need
//! for `xds:///SERVICE`, from the provider chain:
//!
//! - Listener `SERVICE`: an API listener whose HttpConnectionManager carries its route
//!   configuration inline (one virtual host for every domain, one route to the cluster)
//!   and the router filter gRPC requires last.
//! - Route configuration `SERVICE` (for clients that ask RDS): the same.
//! - Cluster `SERVICE`: type EDS over ADS, round robin.
//! - ClusterLoadAssignment `SERVICE`: the endpoints of the query `grpc://SERVICE` (or
//!   the query `[serve.xds-services.SERVICE]` names), grouped into localities by their
//!   `region` and `zone` metadata, weighted by `weight`; host names looked up first.
//!
//! Each stream follows the services it subscribed to (a [`crate::Watch`] each): a
//! change in the chain's answer is pushed as a new version at once. ACKs and NACKs are
//! matched by type and nonce; a NACK is logged with the client's reason and the last
//! version it accepted stays its version. A failure is never a wrong answer: when the
//! chain fails for a service with no last good set, or a host name cannot be looked
//! up, the client keeps what it had, and the culprit is logged.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig,
};
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Locality, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as LbAddress, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener};
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use envoy_types::util::pack_any;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::hosts::{Hosts, Lookup};
use crate::{Endpoint, EndpointSet, Query, Resolver, XdsService};
use wasd_core::Backoff;

pub(crate) const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub(crate) const ROUTES: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub(crate) const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub(crate) const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// Responses queued per stream before the stream waits for its client.
const STREAM_BUFFER: usize = 16;

/// Streams and followed services open now, for `/v1/status`.
#[derive(Default)]
pub(crate) struct XdsCounts {
    pub(crate) streams: AtomicUsize,
    pub(crate) followed: AtomicUsize,
}

/// The ADS service: one [`Session`] per stream.
pub(crate) struct Xds {
    resolver: Resolver,
    services: Arc<HashMap<String, XdsService>>,
    hosts: Hosts,
    streams: AtomicU64,
    counts: Arc<XdsCounts>,
}

impl Xds {
    pub(crate) fn new(resolver: Resolver, services: HashMap<String, XdsService>) -> Xds {
        Xds {
            resolver,
            services: Arc::new(services),
            hosts: Hosts::new(),
            streams: AtomicU64::new(0),
            counts: Arc::default(),
        }
    }

    /// Its streams and followed services open now, shared.
    pub(crate) fn counts(&self) -> Arc<XdsCounts> {
        Arc::clone(&self.counts)
    }

    pub(crate) fn into_service(self) -> AggregatedDiscoveryServiceServer<Xds> {
        AggregatedDiscoveryServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Xds {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "a client".to_owned(), |a| a.to_string());
        let (out, responses) = mpsc::channel(STREAM_BUFFER);
        let (changes_tx, changes) = mpsc::unbounded_channel();
        let session = Session {
            id: self.streams.fetch_add(1, Ordering::Relaxed) + 1,
            peer,
            node: String::new(),
            resolver: self.resolver.clone(),
            services: Arc::clone(&self.services),
            hosts: self.hosts.clone(),
            out,
            subscriptions: HashMap::new(),
            nonce: 0,
            followed: HashMap::new(),
            latest: HashMap::new(),
            changes_tx,
            counts: Arc::clone(&self.counts),
        };
        self.counts.streams.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(session.run(request.into_inner(), changes));
        Ok(Response::new(ReceiverStream::new(responses)))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "wasd serves xDS state of the world (StreamAggregatedResources), not incremental",
        ))
    }
}

/// What a stream subscribed to of one type, and what it was last sent.
#[derive(Default)]
struct Subscription {
    names: BTreeSet<String>,
    /// The version and nonce of the last response sent.
    version: u64,
    nonce: String,
    /// The last version the client accepted (ACKed).
    accepted: Option<String>,
}

/// A service's latest answer as a stream knows it, from its watch.
enum Latest {
    /// The set, and those of its endpoints whose active health checks (the query's
    /// `[[policy]]`) fail: sent as UNHEALTHY, which gRPC clients do not pick.
    Set(EndpointSet, Arc<HashSet<Endpoint>>),
    /// The chain failed with no last good set, or the query is invalid: the reason.
    Failed(String),
}

/// One ADS stream: its subscriptions by type, the services it follows.
struct Session {
    id: u64,
    peer: String,
    /// The client's node id, from its first request.
    node: String,
    resolver: Resolver,
    services: Arc<HashMap<String, XdsService>>,
    hosts: Hosts,
    out: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    subscriptions: HashMap<&'static str, Subscription>,
    nonce: u64,
    /// A task per followed service, ended when unsubscribed or when the stream ends.
    followed: HashMap<String, JoinHandle<()>>,
    latest: HashMap<String, Latest>,
    changes_tx: mpsc::UnboundedSender<(String, Latest)>,
    counts: Arc<XdsCounts>,
}

impl Drop for Session {
    fn drop(&mut self) {
        // A client that goes frees what it followed.
        self.counts
            .followed
            .fetch_sub(self.followed.len(), Ordering::Relaxed);
        for (_, task) in self.followed.drain() {
            task.abort();
        }
        self.counts.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Session {
    async fn run(
        mut self,
        mut requests: Streaming<DiscoveryRequest>,
        mut changes: mpsc::UnboundedReceiver<(String, Latest)>,
    ) {
        tracing::debug!(stream = self.id, peer = %self.peer, "xDS stream opened");
        loop {
            tokio::select! {
                request = requests.message() => match request {
                    Ok(Some(request)) => {
                        if self.on_request(request).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(stream = self.id, "xDS stream ended: {status}");
                        break;
                    }
                },
                Some((service, latest)) = changes.recv() => {
                    // A report from a follower ended since (unsubscribed) is old news.
                    if !self.followed.contains_key(&service) {
                        continue;
                    }
                    // Set numbers only grow: a lower one is an older set, reported late.
                    let changed = match (&latest, self.latest.get(&service)) {
                        (Latest::Set(new, sick), Some(Latest::Set(old, was))) => {
                            new.index() > old.index() || (new.index() == old.index() && sick != was)
                        }
                        _ => true,
                    };
                    if !changed {
                        continue;
                    }
                    self.latest.insert(service.clone(), latest);
                    if self.send(ENDPOINTS, Some(&service)).await.is_err() {
                        break;
                    }
                }
                () = self.out.closed() => break,
            }
        }
        tracing::debug!(stream = self.id, node = %self.node, "xDS stream closed");
    }

    /// `Err`: the client is gone.
    async fn on_request(&mut self, request: DiscoveryRequest) -> Result<(), Gone> {
        if self.node.is_empty()
            && let Some(node) = &request.node
        {
            self.node = node.id.clone();
        }
        let Some(kind) = [LISTENER, ROUTES, CLUSTER, ENDPOINTS]
            .into_iter()
            .find(|t| *t == request.type_url)
        else {
            tracing::debug!(stream = self.id, type_url = %request.type_url, "xDS: a type wasd does not serve");
            return Ok(());
        };
        let names: BTreeSet<String> = request.resource_names.iter().cloned().collect();
        let subscription = self.subscriptions.entry(kind).or_default();
        if !request.response_nonce.is_empty() {
            if request.response_nonce != subscription.nonce {
                // An answer to a response superseded since: the newer one is on its way.
                return Ok(());
            }
            match &request.error_detail {
                Some(error) => tracing::warn!(
                    node = %self.node,
                    peer = %self.peer,
                    "xDS: the client rejected {} version {}: {}; it keeps version {}",
                    short(kind),
                    subscription.version,
                    error.message.escape_default(),
                    subscription.accepted.as_deref().unwrap_or("none"),
                ),
                None => subscription.accepted = Some(request.version_info.clone()),
            }
            // An ACK or a NACK that names what it subscribes to as before: nothing to
            // send (a NACKed version is not sent again unchanged).
            if names == subscription.names {
                return Ok(());
            }
        }
        subscription.names = names;
        if kind == ENDPOINTS {
            self.follow_subscribed();
        }
        self.send(kind, None).await
    }

    /// Follow exactly the services the endpoint subscription names.
    fn follow_subscribed(&mut self) {
        let wanted = self
            .subscriptions
            .get(ENDPOINTS)
            .map(|s| s.names.clone())
            .unwrap_or_default();
        let before = self.followed.len();
        self.followed.retain(|service, task| {
            let keep = wanted.contains(service);
            if !keep {
                task.abort();
            }
            keep
        });
        self.counts
            .followed
            .fetch_sub(before - self.followed.len(), Ordering::Relaxed);
        self.latest.retain(|service, _| wanted.contains(service));
        for service in wanted {
            if self.followed.contains_key(&service) {
                continue;
            }
            let task = tokio::spawn(follow(
                self.resolver.clone(),
                service.clone(),
                self.services.get(&service).cloned(),
                self.changes_tx.clone(),
            ));
            self.followed.insert(service, task);
            self.counts.followed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Send the resources of `kind` the stream subscribed to (for endpoints: those
    /// with an answer, or only `only`).
    async fn send(&mut self, kind: &'static str, only: Option<&str>) -> Result<(), Gone> {
        let Some(subscription) = self.subscriptions.get(kind) else {
            return Ok(());
        };
        let names: Vec<String> = subscription
            .names
            .iter()
            .filter(|name| only.is_none_or(|only| only == name.as_str()))
            .cloned()
            .collect();
        let mut resources = Vec::with_capacity(names.len());
        for name in &names {
            let resource = match kind {
                LISTENER => Some(pack_any(listener(name))),
                ROUTES => Some(pack_any(routes(name))),
                CLUSTER => Some(pack_any(cluster(name))),
                _ => self.load_assignment(name).await.map(pack_any),
            };
            resources.extend(resource);
        }
        // Endpoints not known yet (the watch has not answered) or failing: nothing to
        // say about them now. Listeners and clusters are always sent whole.
        if kind == ENDPOINTS && resources.is_empty() {
            return Ok(());
        }
        self.respond(kind, resources).await
    }

    async fn respond(&mut self, kind: &'static str, resources: Vec<Any>) -> Result<(), Gone> {
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let subscription = self.subscriptions.entry(kind).or_default();
        subscription.version += 1;
        subscription.nonce = nonce.clone();
        let response = DiscoveryResponse {
            version_info: subscription.version.to_string(),
            resources,
            type_url: kind.to_owned(),
            nonce,
            ..Default::default()
        };
        tracing::debug!(
            stream = self.id,
            node = %self.node,
            "xDS: sending {} version {} ({} resources)",
            short(kind),
            response.version_info,
            response.resources.len()
        );
        self.out.send(Ok(response)).await.map_err(|_| Gone)
    }

    /// The service's endpoints as a load assignment; `None` while there is no answer
    /// to give (not asked yet, failing, a host name that cannot be looked up).
    async fn load_assignment(&self, service: &str) -> Option<ClusterLoadAssignment> {
        let (set, unhealthy) = match self.latest.get(service)? {
            Latest::Set(set, unhealthy) => (set, unhealthy),
            Latest::Failed(reason) => {
                tracing::warn!(node = %self.node, "xDS: no endpoints to send for '{service}': {reason}");
                return None;
            }
        };
        let mut localities: BTreeMap<(String, String), Vec<LbEndpoint>> = BTreeMap::new();
        for endpoint in set.iter() {
            let Some(port) = endpoint.port() else {
                continue;
            };
            let ips = match self.hosts.addresses(endpoint.host()).await {
                Ok(ips) => ips,
                Err(Lookup::NotFound) => continue,
                Err(Lookup::Failed(reason)) => {
                    tracing::warn!(
                        node = %self.node,
                        "xDS: not updating '{service}': an endpoint's host name: {reason}"
                    );
                    return None;
                }
            };
            let locality = (
                endpoint.metadata_value("region").unwrap_or_default().to_owned(),
                endpoint.metadata_value("zone").unwrap_or_default().to_owned(),
            );
            for ip in ips {
                localities.entry(locality.clone()).or_default().push(lb_endpoint(
                    endpoint,
                    SocketAddr::new(ip, port),
                    !unhealthy.contains(endpoint),
                ));
            }
        }
        Some(ClusterLoadAssignment {
            cluster_name: service.to_owned(),
            endpoints: localities
                .into_iter()
                .map(|((region, zone), lb_endpoints)| {
                    // gRPC ignores localities without a weight: the sum of their
                    // endpoints' weights, so each endpoint keeps its share.
                    let weight = lb_endpoints
                        .iter()
                        .map(|e| e.load_balancing_weight.as_ref().map_or(1, |w| w.value))
                        .sum::<u32>()
                        .max(1);
                    LocalityLbEndpoints {
                        locality: Some(Locality {
                            region,
                            zone,
                            ..Default::default()
                        }),
                        lb_endpoints,
                        load_balancing_weight: Some(UInt32Value { value: weight }),
                        ..Default::default()
                    }
                })
                .collect(),
            ..Default::default()
        })
    }
}

/// The client went away.
struct Gone;

/// A followed service's endpoints as the resolver's health table sees them, checked
/// actively when the query's policy says so (held here: the checks run while the
/// service is followed).
struct Checks {
    balancing: Arc<crate::balance::Balancing>,
    check: Option<crate::HealthCheck>,
    held: HashMap<Endpoint, Arc<crate::balance::EndpointHealth>>,
    /// The health table's generation when `unhealthy` last looked.
    seen: u64,
}

impl Checks {
    fn new(resolver: &Resolver, query: &Query) -> Checks {
        let balancing = resolver.balancing().clone();
        let check = balancing.policies().for_query(query).health;
        Checks {
            balancing,
            check,
            held: HashMap::new(),
            seen: 0,
        }
    }

    /// Hold (and check) the set's endpoints; those failing their checks now.
    fn follow(&mut self, set: &EndpointSet) -> Arc<HashSet<Endpoint>> {
        let Some(check) = &self.check else {
            return Arc::default();
        };
        let table = self.balancing.table();
        self.held.retain(|e, _| set.iter().any(|s| s == e));
        for endpoint in set.iter() {
            if !self.held.contains_key(endpoint) {
                let entry = table.entry(endpoint);
                table.check(&entry, endpoint, check);
                self.held.insert(endpoint.clone(), entry);
            }
        }
        self.unhealthy(set)
    }

    /// The set's endpoints failing their checks; none when they all do (never an empty
    /// set: the clients then try them all).
    fn unhealthy(&mut self, set: &EndpointSet) -> Arc<HashSet<Endpoint>> {
        // Before looking: a change while looking is then seen by `changed`.
        self.seen = self.balancing.table().generation();
        let failing: HashSet<Endpoint> = set
            .iter()
            .filter(|e| self.held.get(*e).is_some_and(|h| !h.checks_pass()))
            .cloned()
            .collect();
        if failing.len() == set.len() {
            return Arc::default();
        }
        Arc::new(failing)
    }

    /// Resolves when some endpoint's health changed since `unhealthy` last looked
    /// (never, without checks).
    fn changed(&self) -> impl Future<Output = ()> + use<> {
        let balancing = self.balancing.clone();
        let (checked, seen) = (self.check.is_some(), self.seen);
        async move {
            if !checked {
                return std::future::pending::<()>().await;
            }
            let table = balancing.table();
            let notified = table.common().notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if table.generation() == seen {
                notified.await;
            }
        }
    }
}

/// `Listener`, `Cluster`: for logs.
fn short(kind: &str) -> &str {
    kind.rsplit('.').next().unwrap_or(kind)
}

/// Follow a service's answer for a stream, reporting each change (and failures, with
/// their reason) until aborted. A query that fails with no last good set is asked
/// again with back-off.
async fn follow(
    resolver: Resolver,
    service: String,
    configured: Option<XdsService>,
    changes: mpsc::UnboundedSender<(String, Latest)>,
) {
    let configured = configured.unwrap_or_else(|| XdsService::default_for(&service));
    let query = match Query::parse(&configured.query) {
        Ok(query) => configured
            .filters
            .iter()
            .fold(query, |q, (k, v)| q.with_filter(k.clone(), v.clone())),
        Err(e) => {
            let _ = changes.send((service, Latest::Failed(e.to_string())));
            return;
        }
    };
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30)).with_jitter(0.2);
    let mut checks = Checks::new(&resolver, &query);
    loop {
        match resolver.watch_query(&query).await {
            Ok(mut watch) => {
                backoff.reset();
                let mut current = watch.current();
                let mut unhealthy = checks.follow(&current);
                loop {
                    let report = Latest::Set(current.clone(), unhealthy.clone());
                    if changes.send((service.clone(), report)).is_err() {
                        return;
                    }
                    // The next change: a new set, or an endpoint's checks flipping.
                    loop {
                        let health = checks.changed();
                        tokio::select! {
                            set = watch.changed() => match set {
                                Some(set) => {
                                    current = set;
                                    unhealthy = checks.follow(&current);
                                    break;
                                }
                                // The resolver is going away.
                                None => return,
                            },
                            () = health => {
                                let now = checks.unhealthy(&current);
                                if now != unhealthy {
                                    unhealthy = now;
                                    break;
                                }
                            }
                        }
                    }
                }
            }
            Err(e) => {
                if changes
                    .send((service.clone(), Latest::Failed(e.to_string())))
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

fn routes(service: &str) -> RouteConfiguration {
    RouteConfiguration {
        name: service.to_owned(),
        virtual_hosts: vec![VirtualHost {
            name: service.to_owned(),
            domains: vec!["*".to_owned()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(PathSpecifier::Prefix(String::new())),
                    ..Default::default()
                }),
                action: Some(Action::Route(RouteAction {
                    cluster_specifier: Some(ClusterSpecifier::Cluster(service.to_owned())),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn listener(service: &str) -> Listener {
    let manager = HttpConnectionManager {
        route_specifier: Some(RouteSpecifier::RouteConfig(routes(service))),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".to_owned(),
            config_type: Some(ConfigType::TypedConfig(pack_any(Router::default()))),
            ..Default::default()
        }],
        ..Default::default()
    };
    Listener {
        name: service.to_owned(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack_any(manager)),
        }),
        ..Default::default()
    }
}

fn cluster(service: &str) -> Cluster {
    Cluster {
        name: service.to_owned(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: service.to_owned(),
        }),
        ..Default::default()
    }
}

fn lb_endpoint(endpoint: &Endpoint, address: SocketAddr, healthy: bool) -> LbEndpoint {
    let weight = endpoint
        .metadata_value("weight")
        .and_then(|w| w.parse::<u32>().ok())
        .filter(|w| *w > 0);
    LbEndpoint {
        host_identifier: Some(HostIdentifier::Endpoint(LbAddress {
            address: Some(Address {
                address: Some(AddressKind::SocketAddress(SocketAddress {
                    address: match address.ip() {
                        IpAddr::V4(v4) => v4.to_string(),
                        IpAddr::V6(v6) => v6.to_string(),
                    },
                    port_specifier: Some(PortSpecifier::PortValue(u32::from(address.port()))),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        health_status: if healthy {
            HealthStatus::Healthy as i32
        } else {
            HealthStatus::Unhealthy as i32
        },
        load_balancing_weight: weight.map(|value| UInt32Value { value }),
        ..Default::default()
    }
}
