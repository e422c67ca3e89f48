//! What the example clients share: the instances they call (started in-process on
//! free loopback ports) and the two ways they are discovered, from configuration or
//! from etcd registrations.

use std::net::SocketAddr;

use anyhow::Context;
use tokio::net::TcpListener;
use wasd::{Registration, Resolver, ServiceInstance};

/// Pick ring for TLS, in case reqwest was built with TLS but no crypto provider (as it is
/// in this workspace's tests), which would make building a client panic. The examples
/// call plain http and grpc; a real service would choose its TLS in its own Cargo.toml.
pub fn crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Where the example finds its instances.
#[derive(clap::Args)]
pub struct Discovery {
    /// Register the instances in this etcd (its HTTP gateway, e.g. http://127.0.0.1:2379)
    /// and discover them there, Kratos-style; default: an appsettings.json.
    #[arg(long, value_name = "URL")]
    pub etcd: Option<String>,
}

/// A resolver that knows `service` at `urls`, and what keeps it so.
pub struct Discovered {
    pub resolver: Resolver,
    source: Source,
    service: String,
    section: String,
}

enum Source {
    /// The appsettings.json the config provider reads.
    Config(tempfile::TempDir),
    /// One registration per instance.
    Etcd(Vec<Registration>),
}

impl Discovery {
    /// Make `urls` discoverable as `service` (`section` is the appsettings.json endpoint
    /// name: `http`, `grpc`) and return a resolver that finds them.
    pub async fn start(&self, service: &str, section: &str, urls: &[String]) -> anyhow::Result<Discovered> {
        match &self.etcd {
            None => {
                let dir = tempfile::tempdir()?;
                let settings = dir.path().join("appsettings.json");
                write_appsettings(&settings, service, section, urls)?;
                let toml = format!(
                    "pass-through = false\n[[provider]]\nbuiltin = \"config\"\ngrants = {{ files = [{:?}] }}\n",
                    settings.display().to_string()
                );
                let resolver = Resolver::builder().config_toml(toml).build().await?;
                Ok(Discovered {
                    resolver,
                    source: Source::Config(dir),
                    service: service.into(),
                    section: section.into(),
                })
            }
            Some(etcd) => {
                let toml = format!(
                    "pass-through = false\n[[provider]]\nbuiltin = \"etcd\"\n\
                     settings = {{ endpoints = [{etcd:?}] }}\ngrants = {{ http = [{etcd:?}] }}\n"
                );
                let resolver = Resolver::builder().config_toml(toml).build().await?;
                let mut registrations = Vec::new();
                for url in urls {
                    let mut registration = resolver.register(ServiceInstance::new(service, [url])).await?;
                    let id = registration.registered().await?;
                    println!("registered {service}/{id} at {url} in {etcd}");
                    registrations.push(registration);
                }
                Ok(Discovered {
                    resolver,
                    source: Source::Etcd(registrations),
                    service: service.into(),
                    section: section.into(),
                })
            }
        }
    }
}

impl Discovered {
    /// Take the instance at `url` out of discovery (rewrite the file, or deregister)
    /// and wait until the resolver's `query` has seen it go.
    pub async fn remove(&mut self, url: &str, query: &str) -> anyhow::Result<()> {
        let mut watch = self.resolver.watch(query).await?;
        match &mut self.source {
            Source::Config(dir) => {
                let urls: Vec<String> = watch
                    .current()
                    .iter()
                    .map(|e| e.to_string())
                    .filter(|u| u != url)
                    .collect();
                write_appsettings(
                    &dir.path().join("appsettings.json"),
                    &self.service,
                    &self.section,
                    &urls,
                )?;
            }
            Source::Etcd(registrations) => {
                let at = registrations
                    .iter()
                    .position(|r| r.instance().endpoints.iter().any(|e| e == url))
                    .context("no registration for that instance")?;
                registrations.remove(at).deregister().await?;
            }
        }
        while watch.current().iter().any(|e| e.to_string() == url) {
            watch.changed().await.context("the resolver stopped")?;
        }
        Ok(())
    }

    /// Deregister what was registered.
    pub async fn stop(self) -> anyhow::Result<()> {
        if let Source::Etcd(registrations) = self.source {
            for registration in registrations {
                registration.deregister().await?;
            }
        }
        Ok(())
    }
}

/// Write atomically, so the config provider never reads half a file.
fn write_appsettings(
    path: &std::path::Path,
    service: &str,
    section: &str,
    urls: &[String],
) -> anyhow::Result<()> {
    let json = serde_json::json!({ "Services": { service: { section: urls } } });
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json.to_string())?;
    std::fs::rename(tmp, path)?;
    Ok(())
}

/// An axum server named `name` on a free port, answering `NAME served PATH`.
pub async fn http_instance(name: String) -> anyhow::Result<SocketAddr> {
    let app = axum::Router::new().fallback(move |uri: http::Uri| {
        let answer = format!("{name} served {}", uri.path());
        async move { answer }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(address)
}

/// A tonic server named `name` on a free port, serving the standard gRPC health service
/// (`grpc.health.v1.Health`, every service SERVING) with its name in the `x-instance`
/// response header.
pub async fn grpc_instance(name: String) -> anyhow::Result<SocketAddr> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let header = http::HeaderValue::try_from(name)?;
    let tag = tower::util::MapResponseLayer::new(move |mut response: http::Response<_>| {
        response.headers_mut().insert("x-instance", header.clone());
        response
    });
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(async move {
        let _reporter = reporter;
        tonic::transport::Server::builder()
            .layer(tag)
            .add_service(health)
            .serve_with_incoming(incoming)
            .await
    });
    Ok(address)
}

/// How many answers each instance gave, in name order.
pub fn tally(answers: &[String]) -> String {
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for answer in answers {
        *counts.entry(answer.as_str()).or_default() += 1;
    }
    counts
        .iter()
        .map(|(name, n)| format!("{name}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}
