//! Active health checks: one task per checked endpoint, on the resolver's runtime,
//! holding the endpoint's health entry weakly so that it ends with the last balancer
//! that uses the endpoint. HTTP GET expecting 2xx (hyper-util's pooled client, http or
//! https), gRPC health v1 `Check` expecting SERVING (tonic-health), or a TCP connect.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use wasd_core::Endpoint;

use super::health::EndpointHealth;
use super::policy::{HealthCheck, Probe};

pub(crate) type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Check `endpoint` every `check.interval` until its entry is gone (or the task is
/// aborted because the policy changed).
pub(crate) async fn run(
    entry: Weak<EndpointHealth>,
    endpoint: Endpoint,
    check: HealthCheck,
    http: HttpClient,
) {
    let mut prober = Prober {
        http,
        #[cfg(feature = "health-grpc")]
        grpc: None,
    };
    let mut in_a_row = (true, 0u32);
    loop {
        let outcome = match tokio::time::timeout(check.timeout, prober.probe(&endpoint, &check.probe)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("no answer within {:?}", check.timeout)),
        };
        let passed = outcome.is_ok();
        in_a_row = if in_a_row.0 == passed {
            (passed, in_a_row.1.saturating_add(1))
        } else {
            (passed, 1)
        };
        metrics::counter!(
            super::HEALTH_CHECKS,
            "kind" => check.probe.kind(),
            "outcome" => if passed { "pass" } else { "fail" }
        )
        .increment(1);
        {
            let Some(entry) = entry.upgrade() else { return };
            let before = entry.checks_pass();
            entry.checked(passed, in_a_row.1, &check);
            let after = entry.checks_pass();
            match (&outcome, before, after) {
                (Err(reason), true, false) => {
                    tracing::warn!(%endpoint, check = check.probe.kind(), "endpoint unhealthy: {reason}");
                }
                (Ok(()), false, true) => {
                    tracing::info!(%endpoint, check = check.probe.kind(), "endpoint healthy again");
                }
                (Err(reason), _, _) => {
                    tracing::debug!(%endpoint, check = check.probe.kind(), "health check failed: {reason}");
                }
                _ => {}
            }
        }
        tokio::time::sleep(check.interval).await;
    }
}

/// What one checker keeps between checks: the resolver's HTTP client (its pool keeps a
/// connection per endpoint) and a gRPC channel.
struct Prober {
    http: HttpClient,
    #[cfg(feature = "health-grpc")]
    grpc: Option<tonic::transport::Channel>,
}

impl Prober {
    async fn probe(&mut self, endpoint: &Endpoint, probe: &Probe) -> Result<(), String> {
        match probe {
            Probe::Tcp => {
                tokio::net::TcpStream::connect((endpoint.host(), port_of(endpoint)))
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                Ok(())
            }
            Probe::Http { path } => http_get(&self.http, endpoint, path).await,
            Probe::Grpc { service } => self.grpc(endpoint, service).await,
        }
    }

    #[cfg(feature = "health-grpc")]
    async fn grpc(&mut self, endpoint: &Endpoint, service: &str) -> Result<(), String> {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let channel = match &self.grpc {
            Some(channel) => channel.clone(),
            None => {
                let scheme = match endpoint.scheme() {
                    Some("grpcs" | "https") => {
                        return Err(
                            "gRPC health checks over TLS are not supported; check with tcp or http".into(),
                        );
                    }
                    _ => "http",
                };
                let uri = format!("{scheme}://{}", authority(endpoint));
                let channel = tonic::transport::Endpoint::from_shared(uri)
                    .map_err(|e| e.to_string())?
                    .connect_lazy();
                self.grpc = Some(channel.clone());
                channel
            }
        };
        let answer = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await;
        match answer {
            Ok(answer) if answer.get_ref().status == ServingStatus::Serving as i32 => Ok(()),
            Ok(answer) => Err(ServingStatus::try_from(answer.get_ref().status)
                .map_or("UNKNOWN", |s| s.as_str_name())
                .to_owned()),
            Err(status) => {
                // A broken connection is made anew next time.
                if status.code() == tonic::Code::Unavailable {
                    self.grpc = None;
                }
                Err(format!("{:?}: {}", status.code(), status.message()))
            }
        }
    }

    #[cfg(not(feature = "health-grpc"))]
    async fn grpc(&mut self, _: &Endpoint, _: &str) -> Result<(), String> {
        Err("gRPC health checks need wasd's `health-grpc` feature".into())
    }
}

/// `host:port` with the scheme's default port, IPv6 bracketed (`Endpoint`'s Display).
fn authority(endpoint: &Endpoint) -> String {
    Endpoint::from_parts(
        None,
        endpoint.host().to_owned(),
        Some(port_of(endpoint)),
        None,
        Vec::new(),
    )
    .to_string()
}

/// The endpoint's port, else its scheme's default (443 for https and grpcs, else 80).
pub(crate) fn port_of(endpoint: &Endpoint) -> u16 {
    endpoint.port().unwrap_or(match endpoint.scheme() {
        Some("https" | "grpcs") => 443,
        _ => 80,
    })
}

async fn http_get(client: &HttpClient, endpoint: &Endpoint, path: &str) -> Result<(), String> {
    let scheme = match endpoint.scheme() {
        Some("https" | "grpcs") => "https",
        _ => "http",
    };
    let uri = format!("{scheme}://{}{path}", authority(endpoint));
    let mut request = http::Request::get(uri);
    if let Some(name) = endpoint.host_name() {
        request = request.header(http::header::HOST, name);
    }
    let request = request
        .header(http::header::USER_AGENT, "wasd-health-check")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("GET {path}: {}", error_chain(&e)))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("GET {path}: {status}"))
    }
}

/// `error` and its sources, as one line.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The client for a resolver's HTTP checks: checks of one endpoint reuse a kept-alive
/// connection, as a load balancer's would. One per resolver, not per process: its pooled
/// connections live on the runtime that made them.
pub(crate) fn http_client() -> HttpClient {
    {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector)
    }
}
