//! What the client integrations add to a request, side by side with the same request
//! without them, against the same loopback servers (docs/BENCHMARKS.md has the report):
//!
//! - `pick`: `Balancer::pick` over 3 and 1 000 endpoints, per strategy (consistent
//!   hashing with a key per pick), beside a bare atomic round-robin over a `Vec`;
//! - `http`: a GET to one axum instance with plain reqwest (keep-alive), through an
//!   empty reqwest-middleware stack, and through `wasd::http::Discovery`
//!   (`http://catalog/x`: resolve, pick, rewrite);
//! - `overhead`: the same middleware stack ending in a canned answer, with and without
//!   discovery: its own cost per request, without the network's noise;
//! - `grpc`: a health check to one tonic instance over a plain `Channel`, over tonic's
//!   own balanced channel with a fixed list, over `Resolver::grpc_channel`, and over
//!   `Resolver::grpc_balanced_channel` (wasd picks each call).
//!
//! `cargo bench -p wasd-tests --bench clients`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use wasd::http::reqwest_middleware;
use wasd::{Resolver, Strategy};
use wasd_tests::servers::Instances;
use wasd_tests::{Sandbox, runtime};

/// A config provider serving `service` at `urls` under `section`.
async fn configured(sandbox: &Sandbox, service: &str, section: &str, urls: &[String]) -> Resolver {
    sandbox.write_services(service, section, urls);
    sandbox.config_resolver().await
}

/// reqwest has TLS without a crypto provider in this crate's tests: choose ring.
fn crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn pick(c: &mut Criterion) {
    let rt = runtime();
    for size in [3usize, 1000] {
        let sandbox = Sandbox::new();
        let urls: Vec<String> = (0..size)
            .map(|i| format!("http://10.{}.{}.{}:80", i / 65536, (i / 256) % 256, i % 256))
            .collect();
        let resolver = rt.block_on(configured(&sandbox, "catalog", "http", &urls));
        let mut group = c.benchmark_group(format!("clients/pick/{size}"));
        // The baseline: the least a round-robin pick can be — an atomic counter and an
        // Arc clone from a Vec, nothing followed, nothing checked.
        let plain: Vec<std::sync::Arc<String>> = urls.iter().cloned().map(std::sync::Arc::new).collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        group.bench_function("baseline_atomic_round_robin", |b| {
            b.iter(|| {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % plain.len();
                black_box(plain[i].clone())
            })
        });
        let keys: Vec<String> = (0..1024).map(|k| format!("user-{k}")).collect();
        for &strategy in Strategy::ALL {
            let balancer = rt
                .block_on(
                    resolver
                        .balancer_builder("http://catalog")
                        .strategy(strategy)
                        .build(),
                )
                .unwrap();
            if strategy == Strategy::ConsistentHash {
                let mut k = 0;
                group.bench_function(strategy.name(), |b| {
                    b.iter(|| {
                        k = (k + 1) % keys.len();
                        black_box(balancer.pick_key(&keys[k]))
                    })
                });
            } else {
                group.bench_function(strategy.name(), |b| b.iter(|| black_box(balancer.pick())));
            }
        }
        group.finish();
    }
}

fn http(c: &mut Criterion) {
    crypto_provider();
    let rt = runtime();
    let sandbox = Sandbox::new();
    let (instances, resolver) = rt.block_on(async {
        let instances = Instances::http("catalog", 1).await;
        let resolver = configured(&sandbox, "catalog", "http", &instances.urls("http")).await;
        (instances, resolver)
    });
    let direct_url = format!("{}/x", instances.urls("http")[0]);
    let plain = reqwest::Client::new();
    // The middleware framework alone (no middleware), to tell its cost from discovery's.
    let stack = reqwest_middleware::ClientBuilder::new(reqwest::Client::new()).build();
    let discovered = resolver.http_client().unwrap();
    let mut group = c.benchmark_group("clients/http");
    group.bench_function("reqwest", |b| {
        b.to_async(&rt).iter(|| async {
            let response = plain.get(&direct_url).send().await.unwrap();
            black_box(response.bytes().await.unwrap())
        })
    });
    group.bench_function("reqwest-middleware", |b| {
        b.to_async(&rt).iter(|| async {
            let response = stack.get(&direct_url).send().await.unwrap();
            black_box(response.bytes().await.unwrap())
        })
    });
    group.bench_function("wasd", |b| {
        b.to_async(&rt).iter(|| async {
            let response = discovered.get("http://catalog/x").send().await.unwrap();
            black_box(response.bytes().await.unwrap())
        })
    });
    group.finish();
}

/// A last middleware that answers at once: what is left is the cost of what runs before.
fn canned<'a>(
    _: reqwest::Request,
    _: &'a mut http::Extensions,
    _: reqwest_middleware::Next<'a>,
) -> std::pin::Pin<Box<dyn Future<Output = reqwest_middleware::Result<reqwest::Response>> + Send + 'a>> {
    Box::pin(async { Ok(reqwest::Response::from(http::Response::new(""))) })
}

/// Discovery's own work per request (resolve from the cache, pick, rewrite, bookkeeping)
/// without the network: the same stack ending in `canned`, with and without it.
fn overhead(c: &mut Criterion) {
    crypto_provider();
    let rt = runtime();
    let sandbox = Sandbox::new();
    let urls = vec!["http://10.0.0.1:8080".to_owned()];
    let resolver = rt.block_on(configured(&sandbox, "catalog", "http", &urls));
    let bare = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(canned)
        .build();
    let discovered = wasd::http::Discovery::new(&resolver)
        .client_builder(reqwest::Client::builder())
        .unwrap()
        .with(canned)
        .build();
    let mut group = c.benchmark_group("clients/overhead");
    group.bench_function("stack", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(bare.get("http://10.0.0.1:8080/x").send().await.unwrap()) })
    });
    group.bench_function("wasd", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(discovered.get("http://catalog/x").send().await.unwrap()) })
    });
    group.finish();
}

fn grpc(c: &mut Criterion) {
    let rt = runtime();
    let sandbox = Sandbox::new();
    let (instances, resolver) = rt.block_on(async {
        let instances = Instances::grpc("greeter", 1).await;
        let resolver = configured(&sandbox, "greeter", "grpc", &instances.urls("grpc")).await;
        (instances, resolver)
    });
    let url = instances.urls("http")[0].clone();
    let (direct, listed, discovered) = rt.block_on(async {
        let endpoint = tonic::transport::Endpoint::from_shared(url).unwrap();
        let direct = endpoint.connect().await.unwrap();
        let listed = tonic::transport::Channel::balance_list(std::iter::once(endpoint));
        let discovered = resolver.grpc_channel("discovery:///greeter").await.unwrap();
        (direct, listed, discovered)
    });
    let balanced = rt
        .block_on(resolver.grpc_balanced_channel("discovery:///greeter"))
        .unwrap();
    let mut group = c.benchmark_group("clients/grpc");
    for (name, channel) in [
        ("channel", direct),
        ("balance_list", listed),
        ("wasd", discovered),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                let mut client = HealthClient::new(channel.clone());
                async move {
                    let request = HealthCheckRequest {
                        service: String::new(),
                    };
                    black_box(client.check(request).await.unwrap())
                }
            })
        });
    }
    // wasd's own balancing: a pick per call, the endpoint's channel, the outcome read.
    group.bench_function("wasd_balanced", |b| {
        b.to_async(&rt).iter(|| {
            let mut client = HealthClient::new(balanced.clone());
            async move {
                let request = HealthCheckRequest {
                    service: String::new(),
                };
                black_box(client.check(request).await.unwrap())
            }
        })
    });
    group.finish();
}

criterion_group!(benches, pick, overhead, http, grpc);
criterion_main!(benches);
