//! Real servers for the client integrations: axum HTTP instances, a TLS server that
//! reports the name the client asked for, and tonic gRPC instances serving the standard
//! health service. All on 127.0.0.1 with ports from the OS; each counts what it served.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::Request;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Instances of one service, each answering every request with its name.
pub struct Instances {
    instances: Vec<Instance>,
}

struct Instance {
    name: String,
    address: SocketAddr,
    hits: Arc<AtomicUsize>,
    /// Whether its health endpoint says healthy (`/healthz` for HTTP, the health
    /// service's SERVING for gRPC).
    healthy: Arc<AtomicBool>,
    /// The gRPC instance's health reporter.
    reporter: Option<tonic_health::server::HealthReporter>,
    /// A gRPC instance answers every call UNAVAILABLE while set.
    unavailable: Arc<AtomicBool>,
    task: JoinHandle<()>,
    /// Graceful shutdown: stop accepting, close idle connections.
    stop: Option<oneshot::Sender<()>>,
}

impl Instances {
    /// `count` axum servers named `{service}-1`, `{service}-2`, ...; each answers
    /// `{name} {path and query}`, except `/healthz`: 200, or 503 once
    /// [`Instances::set_healthy`] says so (health checks are not counted as hits).
    pub async fn http(service: &str, count: usize) -> Instances {
        let mut instances = Vec::new();
        for i in 1..=count {
            let name = format!("{service}-{i}");
            let hits = Arc::new(AtomicUsize::new(0));
            let healthy = Arc::new(AtomicBool::new(true));
            let (answer, counter, up) = (name.clone(), hits.clone(), healthy.clone());
            let app = axum::Router::new().fallback(move |request: Request| {
                let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
                let status = if target == "/healthz" {
                    if up.load(Ordering::Relaxed) {
                        http::StatusCode::OK
                    } else {
                        http::StatusCode::SERVICE_UNAVAILABLE
                    }
                } else {
                    counter.fetch_add(1, Ordering::Relaxed);
                    http::StatusCode::OK
                };
                let answer = format!("{answer} {target}");
                async move { (status, answer) }
            });
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
            instances.push(Instance {
                name,
                address,
                hits,
                healthy,
                reporter: None,
                unavailable: Arc::default(),
                task,
                stop: Some(stop),
            });
        }
        Instances { instances }
    }

    /// `count` tonic servers named `{service}-1`, ... serving `grpc.health.v1.Health`
    /// (every service SERVING), each putting its name in the `x-instance` response header.
    pub async fn grpc(service: &str, count: usize) -> Instances {
        let mut instances = Vec::new();
        for i in 1..=count {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            instances.push(grpc_instance(format!("{service}-{i}"), listener).await);
        }
        Instances { instances }
    }

    /// One tonic server named `name` at `address` (a port an earlier server left).
    pub async fn grpc_at(name: &str, address: SocketAddr) -> Instances {
        let listener = TcpListener::bind(address).await.unwrap();
        Instances {
            instances: vec![grpc_instance(name.to_owned(), listener).await],
        }
    }

    /// Shut instance `index` (from 0) down: it stops accepting and closes its
    /// connections once their requests are done.
    pub async fn stop(&mut self, index: usize) {
        let instance = &mut self.instances[index];
        if let Some(stop) = instance.stop.take() {
            let _ = stop.send(());
            // Connections a client keeps open would hold a graceful stop; cut them after 2 s.
            if tokio::time::timeout(Duration::from_secs(2), &mut instance.task)
                .await
                .is_err()
            {
                instance.task.abort();
            }
        }
    }

    /// Make instance `index` (from 0) report healthy or not: `/healthz` answers 200 or
    /// 503; the gRPC health service SERVING or NOT_SERVING.
    pub async fn set_healthy(&self, index: usize, healthy: bool) {
        let instance = &self.instances[index];
        instance.healthy.store(healthy, Ordering::Relaxed);
        if let Some(reporter) = &instance.reporter {
            let status = if healthy {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
        }
    }

    /// Make gRPC instance `index` (from 0) answer every call UNAVAILABLE (a
    /// trailers-only answer, as a server that is shutting down gives), or not.
    pub fn set_unavailable(&self, index: usize, unavailable: bool) {
        self.instances[index]
            .unavailable
            .store(unavailable, Ordering::Relaxed);
    }

    /// `http://127.0.0.1:PORT` of each instance (`scheme` instead of http).
    pub fn urls(&self, scheme: &str) -> Vec<String> {
        self.instances
            .iter()
            .map(|i| format!("{scheme}://{}", i.address))
            .collect()
    }

    /// The instances' names, in order.
    pub fn names(&self) -> Vec<String> {
        self.instances.iter().map(|i| i.name.clone()).collect()
    }

    /// Requests each instance served, by name.
    pub fn hits(&self) -> Vec<(String, usize)> {
        self.instances
            .iter()
            .map(|i| (i.name.clone(), i.hits.load(Ordering::Relaxed)))
            .collect()
    }

    /// Forget what was served so far.
    pub fn reset(&self) {
        for i in &self.instances {
            i.hits.store(0, Ordering::Relaxed);
        }
    }
}

impl Drop for Instances {
    fn drop(&mut self) {
        for i in &self.instances {
            i.task.abort();
        }
    }
}

async fn grpc_instance(name: String, listener: TcpListener) -> Instance {
    let hits = Arc::new(AtomicUsize::new(0));
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let address = listener.local_addr().unwrap();
    let (header, counter) = (http::HeaderValue::try_from(name.as_str()).unwrap(), hits.clone());
    let tag = tower::util::MapResponseLayer::new(move |mut response: http::Response<_>| {
        counter.fetch_add(1, Ordering::Relaxed);
        response.headers_mut().insert("x-instance", header.clone());
        response
    });
    let unavailable = Arc::new(AtomicBool::new(false));
    let refusing = unavailable.clone();
    let refuse = tonic::service::InterceptorLayer::new(move |request| {
        if refusing.load(Ordering::Relaxed) {
            Err(tonic::Status::unavailable("shutting down"))
        } else {
            Ok(request)
        }
    });
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let (stop, stopped) = oneshot::channel::<()>();
    let kept = reporter.clone();
    let task = tokio::spawn(async move {
        let _reporter = kept;
        // The tag outermost: refused calls are tagged too.
        tonic::transport::Server::builder()
            .layer(tag)
            .layer(refuse)
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Instance {
        name,
        address,
        hits,
        healthy: Arc::new(AtomicBool::new(true)),
        reporter: Some(reporter),
        unavailable,
        task,
        stop: Some(stop),
    }
}

/// A TLS server for `names` (certificate from [`crate::TlsFiles::generate_for`]) that
/// answers `sni=NAME host=HOST`: the server name the client sent and its Host header.
pub struct TlsServer {
    /// Where it listens.
    pub address: SocketAddr,
    task: JoinHandle<()>,
}

impl TlsServer {
    pub async fn start(tls: &crate::TlsFiles) -> TlsServer {
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(&tls.cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&tls.key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let sni = stream.get_ref().1.server_name().unwrap_or("-").to_owned();
                    let service =
                        hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                            let host = request
                                .headers()
                                .get(http::header::HOST)
                                .and_then(|h| h.to_str().ok())
                                .unwrap_or("-")
                                .to_owned();
                            let body = format!("sni={sni} host={host}");
                            async move { Ok::<_, std::convert::Infallible>(http::Response::new(body)) }
                        });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        TlsServer { address, task }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
