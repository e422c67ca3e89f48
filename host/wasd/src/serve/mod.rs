//! `wasd serve`: the provider chain served to services in every language, as a DNS
//! server authoritative for one zone (hickory-server, [`dns`]) and a JSON HTTP API
//! (axum, [`http`]), both over one [`Resolver`] (its cache, refreshes, watches and
//! hot reload).
//!
//! ```no_run
//! # async fn demo(resolver: wasd::Resolver) -> Result<(), wasd::serve::ServeError> {
//! use wasd::serve::{ServeOptions, Server};
//!
//! let server = Server::bind(resolver, ServeOptions::default(), None).await?;
//! println!("HTTP on {}, DNS on {}", server.http_addr(), server.dns_addr());
//! server.run_until(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(())
//! # }
//! ```

mod dns;
mod hosts;
mod http;
mod instances;
#[cfg(feature = "xds")]
mod xds;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server as DnsServer;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::{TcpListener, UdpSocket};

use crate::Resolver;

/// `--http`'s default.
pub const DEFAULT_HTTP: SocketAddr =
    SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 8585));
/// `--dns`'s default.
pub const DEFAULT_DNS: SocketAddr =
    SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 8653));
/// `--dns-zone`'s default.
pub const DEFAULT_ZONE: &str = "wasd.internal";
/// The most a DNS record's TTL may be (`[serve] dns-ttl`).
pub const DEFAULT_DNS_TTL: Duration = Duration::from_secs(5);
/// How long a DNS-over-TCP connection may stay idle.
const DNS_TCP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to serve.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServeOptions {
    /// The HTTP API's address.
    pub http: SocketAddr,
    /// The DNS server's address (UDP and TCP).
    pub dns: SocketAddr,
    /// The zone the DNS server answers for.
    pub zone: String,
    /// The most a DNS record's TTL may be.
    pub dns_ttl: Duration,
    /// The bearer token mutating HTTP calls need; without one the HTTP API listens on
    /// loopback addresses only.
    pub token: Option<String>,
    /// The xDS server's address, if one is served (feature `xds`).
    pub xds: Option<SocketAddr>,
    /// What xDS service names stand for where not `grpc://NAME`.
    pub xds_services: std::collections::HashMap<String, crate::XdsService>,
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        ServeOptions {
            http: DEFAULT_HTTP,
            dns: DEFAULT_DNS,
            zone: DEFAULT_ZONE.to_owned(),
            dns_ttl: DEFAULT_DNS_TTL,
            token: None,
            xds: None,
            xds_services: Default::default(),
        }
    }
}

impl ServeOptions {
    /// The same options with the HTTP API on `address`.
    pub fn with_http(mut self, address: SocketAddr) -> ServeOptions {
        self.http = address;
        self
    }

    /// The same options with the DNS server on `address`.
    pub fn with_dns(mut self, address: SocketAddr) -> ServeOptions {
        self.dns = address;
        self
    }

    /// The same options answering for `zone`.
    pub fn with_zone(mut self, zone: impl Into<String>) -> ServeOptions {
        self.zone = zone.into();
        self
    }

    /// The same options with mutating HTTP calls needing `Authorization: Bearer
    /// <token>`.
    pub fn with_token(mut self, token: impl Into<String>) -> ServeOptions {
        self.token = Some(token.into());
        self
    }

    /// Refuse options no server may start with: a zone that is not a DNS name, an
    /// HTTP API beyond loopback without a token. [`Server::bind`] checks them too;
    /// checking first spares loading the providers for nothing.
    pub fn check(&self) -> Result<(), ServeError> {
        self.checked_zone().map(drop)
    }

    /// [`ServeOptions::check`], and the zone parsed.
    fn checked_zone(&self) -> Result<hickory_server::proto::rr::Name, ServeError> {
        let zone = dns::parse_zone(&self.zone).map_err(ServeError::Zone)?;
        if self.token.is_none() && !self.http.ip().is_loopback() {
            return Err(ServeError::Unguarded(self.http));
        }
        Ok(zone)
    }

    /// The same options serving xDS (ADS) on `address` (feature `xds`).
    pub fn with_xds(mut self, address: SocketAddr) -> ServeOptions {
        self.xds = Some(address);
        self
    }

    /// The same options with these xDS service names standing for these queries.
    pub fn with_xds_services(
        mut self,
        services: std::collections::HashMap<String, crate::XdsService>,
    ) -> ServeOptions {
        self.xds_services = services;
        self
    }

    /// The same options with DNS TTLs capped at `ttl`.
    pub fn with_dns_ttl(mut self, ttl: Duration) -> ServeOptions {
        self.dns_ttl = ttl;
        self
    }
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// A listener's address could not be bound.
    #[error("cannot listen for {what} on {address}: {source}")]
    Bind {
        /// `HTTP`, `DNS (UDP)`, `DNS (TCP)` or `xDS`.
        what: &'static str,
        /// The address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP API would listen beyond this machine with no token to guard it.
    #[error(
        "refusing to serve the HTTP API on {0} without a token: set [serve] token-env, or listen on a loopback address"
    )]
    Unguarded(SocketAddr),
    /// The DNS zone is not a name.
    #[error("[serve] dns-zone: {0}")]
    Zone(String),
    /// A listener failed while serving.
    #[error("serving {what}: {source}")]
    Serving {
        /// `HTTP`, `DNS` or `xDS`.
        what: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A non-blocking UDP socket bound to `address` with SO_REUSEPORT, so that sockets of
/// this process can share the port.
fn udp_socket(address: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::DGRAM, Some(Protocol::UDP))?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    UdpSocket::from_std(socket.into())
}

/// The DNS server and the HTTP API, bound and ready.
pub struct Server {
    http: TcpListener,
    http_addr: SocketAddr,
    dns: DnsServer<dns::DnsHandler>,
    dns_addr: SocketAddr,
    api: Arc<http::Api>,
    /// The xDS listener and what it serves.
    #[cfg(feature = "xds")]
    xds: Option<(TcpListener, SocketAddr, xds::Xds)>,
}

impl Server {
    /// Bind the listeners (an address with port 0 gets a free port: see
    /// [`Server::http_addr`], [`Server::dns_addr`]). `metrics`: the Prometheus handle
    /// `GET /metrics` renders, if the caller installed that recorder.
    pub async fn bind(
        resolver: Resolver,
        options: ServeOptions,
        metrics: Option<PrometheusHandle>,
    ) -> Result<Server, ServeError> {
        let zone = options.checked_zone()?;
        let bind = |what: &'static str, address: SocketAddr| {
            move |source| ServeError::Bind {
                what,
                address,
                source,
            }
        };
        let http = TcpListener::bind(options.http)
            .await
            .map_err(bind("HTTP", options.http))?;
        let http_addr = http.local_addr().map_err(bind("HTTP", options.http))?;
        // One UDP socket per core on the same port (SO_REUSEPORT): the kernel spreads
        // the queries over them, and each has its own receive loop (one measured at
        // 0.79x dnsmasq's queries per second, two at 0.89-0.91x; docs/BENCHMARKS.md
        // row 10). The TCP listener takes the port without SO_REUSEPORT, so a second
        // server started on it fails there instead of sharing the UDP traffic. With
        // port 0, UDP picks a port whose TCP side may be taken (another process's
        // ephemeral port): then it picks again.
        let mut attempts = 0;
        let (udp, dns_addr, tcp) = loop {
            attempts += 1;
            let first = udp_socket(options.dns).map_err(bind("DNS (UDP)", options.dns))?;
            let dns_addr = first.local_addr().map_err(bind("DNS (UDP)", options.dns))?;
            // TCP on the port UDP got (the same when it was given).
            match TcpListener::bind(dns_addr).await {
                Ok(tcp) => {
                    let mut udp = vec![first];
                    let cores = std::thread::available_parallelism().map_or(1, usize::from);
                    for _ in 1..cores {
                        udp.push(udp_socket(dns_addr).map_err(bind("DNS (UDP)", dns_addr))?);
                    }
                    break (udp, dns_addr, tcp);
                }
                Err(e)
                    if options.dns.port() == 0
                        && e.kind() == std::io::ErrorKind::AddrInUse
                        && attempts < 16 => {}
                Err(e) => return Err(bind("DNS (TCP)", dns_addr)(e)),
            }
        };
        let mut dns = DnsServer::new(dns::DnsHandler::new(resolver.clone(), zone, options.dns_ttl));
        for socket in udp {
            dns.register_socket(socket);
        }
        dns.register_listener(tcp, DNS_TCP_TIMEOUT, 64);
        #[cfg(feature = "xds")]
        let xds = match options.xds {
            Some(address) => {
                let listener = TcpListener::bind(address).await.map_err(bind("xDS", address))?;
                let bound = listener.local_addr().map_err(bind("xDS", address))?;
                let service = xds::Xds::new(resolver.clone(), options.xds_services.clone());
                Some((listener, bound, service))
            }
            None => None,
        };
        #[cfg(not(feature = "xds"))]
        if let Some(address) = options.xds {
            return Err(ServeError::Bind {
                what: "xDS",
                address,
                source: std::io::Error::other("this build of wasd has no xDS server (feature `xds`)"),
            });
        }
        // `/v1/status` reads the xDS server's counts.
        #[cfg(feature = "xds")]
        let xds_counts = xds.as_ref().map(|(_, _, service)| service.counts());
        Ok(Server {
            http,
            http_addr,
            dns,
            dns_addr,
            #[cfg(feature = "xds")]
            xds,
            api: Arc::new(http::Api {
                resolver,
                metrics,
                blocked: Default::default(),
                instances: Default::default(),
                token: options.token.clone(),
                stopping: tokio::sync::watch::Sender::new(false),
                balancers: Default::default(),
                #[cfg(feature = "xds")]
                xds: xds_counts,
            }),
        })
    }

    /// The HTTP API's address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The DNS server's address (UDP and TCP).
    pub fn dns_addr(&self) -> SocketAddr {
        self.dns_addr
    }

    /// The xDS server's address, when one is served.
    pub fn xds_addr(&self) -> Option<SocketAddr> {
        #[cfg(feature = "xds")]
        return self.xds.as_ref().map(|(_, address, _)| *address);
        #[cfg(not(feature = "xds"))]
        None
    }

    /// Serve until `shutdown` completes, then stop every listener.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let Server {
            http,
            mut dns,
            api,
            #[cfg(feature = "xds")]
            xds,
            ..
        } = self;
        // One stop for both: hickory-server's shutdown token, which the HTTP side
        // waits on too.
        let stopped = dns.shutdown_token().clone().cancelled_owned();
        let serving = http::serve(http, http::router(api.clone()), stopped);
        // Instances whose clients stopped renewing them go, checked every second.
        let expiring = api.clone();
        let expiry = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                expiring.instances.expire().await;
            }
        });
        let mut http_task = tokio::spawn(serving);
        // xDS streams end with the server: clients reconnect to another control plane
        // or keep what they were sent.
        #[cfg(feature = "xds")]
        let xds_task = xds.map(|(listener, _, service)| {
            let stopped = dns.shutdown_token().clone().cancelled_owned();
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service.into_service())
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(listener),
                        stopped,
                    ),
            )
        });
        // Until told to stop, or until the HTTP task ends early (only a panic ends it).
        let http_result = tokio::select! {
            () = shutdown => None,
            ended = &mut http_task => Some(ended),
        };
        // Blocked watches answer now, so the HTTP side drains at once.
        api.stopping.send_replace(true);
        let dns_result = dns.shutdown_gracefully().await;
        expiry.abort();
        // What this server registered goes with it.
        api.instances.deregister_all().await;
        let http_result = match http_result {
            Some(ended) => ended,
            None => http_task.await,
        };
        let failed = |what, source| ServeError::Serving { what, source };
        #[cfg(feature = "xds")]
        if let Some(task) = xds_task {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(failed("xDS", e.into())),
                Err(e) => return Err(failed("xDS", e.into())),
            }
        }
        dns_result.map_err(|e| failed("DNS", e.into()))?;
        http_result.map_err(|e| failed("HTTP", e.into()))
    }
}
