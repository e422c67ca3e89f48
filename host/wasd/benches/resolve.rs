//! Side-by-side benchmarks of the resolve paths (docs/BENCHMARKS.md has the report):
//!
//! - `cached`: a cached resolve through the host vs a bare `HashMap` lookup of the same
//!   data, and the host's throughput on every core;
//! - `uncached`: a resolve through the Wasm configuration provider vs the same logic
//!   compiled natively, and what the boundary costs (an empty answer);
//! - `startup`: building a resolver with components from the precompiled cache vs a
//!   cold Cranelift compile.
//!
//! `cargo bench -p wasd --bench resolve`

use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::runtime::Runtime;
use wasd::{Query, Resolver};

/// The same services the host and the native baselines serve.
const SETTINGS: &str = r#"{"Services": {
    "catalog": {"https": ["https://10.46.24.90:443", "https://10.46.24.91:443"], "http": ["http://10.46.24.90:80"]},
    "basket": {"default": ["10.0.0.7:8080"], "dashboard": ["https://10.0.0.7:8443"]}
}}"#;

fn resolver(rt: &Runtime, dir: &Path, cache: Option<&Path>) -> Resolver {
    std::fs::write(dir.join("appsettings.json"), SETTINGS).unwrap();
    let toml = format!(
        "pass-through = false\n[[provider]]\nbuiltin = \"config\"\ngrants = {{ files = [\"{}\"] }}\n",
        dir.join("appsettings.json").display()
    );
    rt.block_on(
        Resolver::builder()
            .config_toml(toml)
            .plugin_dir(None)
            .cache_dir(cache.map(Path::to_path_buf))
            .watch_files(false)
            .build(),
    )
    .unwrap()
}

/// A current-thread runtime and a folder for the config and the component cache.
///
/// With `WASD_BENCH_METRICS=1` in the environment, a Prometheus recorder is installed
/// first (what `wasd watch --metrics` does), so the rows show what metrics cost.
fn setup() -> (Runtime, tempfile::TempDir) {
    static RECORDER: std::sync::Once = std::sync::Once::new();
    RECORDER.call_once(|| {
        if std::env::var_os("WASD_BENCH_METRICS").is_some() {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .expect("installing the Prometheus recorder");
            wasd::describe_metrics();
        }
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (rt, tempfile::tempdir().unwrap())
}

/// An endpoint as a native provider would hold it.
#[derive(Clone, Debug)]
#[allow(dead_code)] // Read through black_box only.
struct NativeEndpoint {
    scheme: Option<String>,
    host: String,
    port: Option<u16>,
}

fn parse(value: &str) -> NativeEndpoint {
    let (scheme, rest) = match value.split_once("://") {
        Some((s, r)) => (Some(s.to_owned()), r),
        None => (None, value),
    };
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h.to_owned(), p.parse().ok()),
        None => (rest.to_owned(), None),
    };
    NativeEndpoint { scheme, host, port }
}

/// The configuration provider's resolve, natively: the same data structure (service →
/// named endpoint lists), the same lookup order and copies, then the host's scheme
/// selection.
struct NativeConfig {
    services: HashMap<String, Vec<(String, Vec<NativeEndpoint>)>>,
}

impl NativeConfig {
    fn new() -> NativeConfig {
        let json: serde_json::Value = serde_json::from_str(SETTINGS).unwrap();
        let mut services = HashMap::new();
        for (service, named) in json["Services"].as_object().unwrap() {
            let mut lists = Vec::new();
            for (name, values) in named.as_object().unwrap() {
                let endpoints = values
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| parse(v.as_str().unwrap()))
                    .collect();
                lists.push((name.to_lowercase(), endpoints));
            }
            services.insert(service.to_lowercase(), lists);
        }
        NativeConfig { services }
    }

    fn resolve(&self, service: &str, schemes: &[String]) -> Vec<NativeEndpoint> {
        let Some(named) = self.services.get(service) else {
            return Vec::new();
        };
        let section = |name: &str| named.iter().find(|(n, _)| n == name);
        let Some((name, endpoints)) = std::iter::once("default")
            .chain(schemes.iter().map(String::as_str))
            .find_map(section)
        else {
            return Vec::new();
        };
        let implied = schemes.iter().find(|s| *s == name);
        let endpoints: Vec<NativeEndpoint> = endpoints
            .iter()
            .cloned()
            .map(|mut e| {
                if e.scheme.is_none() {
                    e.scheme = implied.cloned();
                }
                e
            })
            .collect();
        // The host's rule: the most preferred scheme present, nothing else.
        match schemes
            .iter()
            .find(|s| endpoints.iter().any(|e| e.scheme.as_ref() == Some(s)))
        {
            Some(best) => endpoints
                .into_iter()
                .filter(|e| e.scheme.as_ref() == Some(best))
                .collect(),
            None => endpoints,
        }
    }
}

fn cached(c: &mut Criterion) {
    let (rt, dir) = setup();
    let cache = dir.path().join("cache");
    let resolver = resolver(&rt, dir.path(), Some(&cache));
    let query = Query::parse("https+http://catalog").unwrap();
    let warm = rt.block_on(resolver.resolve_query(&query)).unwrap();

    let mut group = c.benchmark_group("cached");
    group.throughput(Throughput::Elements(1));
    // The baseline: the same answer in a HashMap, cloned out as the host clones its set.
    let map: HashMap<String, Arc<[String]>> = HashMap::from([(
        "https+http://catalog".to_owned(),
        warm.iter().map(ToString::to_string).collect::<Vec<_>>().into(),
    )]);
    group.bench_function("hashmap_lookup", |b| {
        b.iter(|| black_box(map.get(black_box("https+http://catalog")).cloned()))
    });
    // The same with the hasher the host's text index uses (foldhash), the fairer
    // baseline: SipHash above costs more per lookup.
    let fast: HashMap<String, Arc<[String]>, foldhash::fast::RandomState> = map.clone().into_iter().collect();
    group.bench_function("hashmap_foldhash_lookup", |b| {
        b.iter(|| black_box(fast.get(black_box("https+http://catalog")).cloned()))
    });
    group.bench_function("host_resolve_parsed", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(resolver.resolve_query(black_box(&query)).await.unwrap()) })
    });
    group.bench_function("host_resolve_str", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(resolver.resolve(black_box("https+http://catalog")).await.unwrap()) })
    });
    // Throughput on every core: one current-thread runtime per core, sharing the
    // resolver; every thread resolving the same query, then each its own service
    // (issue 23: ≥ 1.8× one thread on 2 cores), where the one answer's reference count
    // is not shared and what else is shows.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let own = [
        "https+http://catalog",
        "basket",
        "https://_dashboard.basket",
        "http://catalog",
    ];
    for text in &own {
        rt.block_on(resolver.resolve(text)).unwrap();
    }
    for (name, queries) in [("", &own[..1]), ("_own_queries", &own[..])] {
        group.bench_function(format!("host_resolve_{cores}_threads{name}"), |b| {
            b.iter_custom(|iters| {
                let per_thread = iters.div_ceil(cores as u64);
                let start = Instant::now();
                std::thread::scope(|scope| {
                    for core in 0..cores {
                        let resolver = resolver.clone();
                        let text = queries[core % queries.len()];
                        scope.spawn(move || {
                            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                            rt.block_on(async {
                                for _ in 0..per_thread {
                                    black_box(resolver.resolve(black_box(text)).await.unwrap());
                                }
                            });
                        });
                    }
                });
                // Time per resolve across all threads: the inverse is resolves/s.
                start
                    .elapsed()
                    .div_f64(cores as f64 * per_thread as f64 / iters as f64)
            })
        });
    }
    group.bench_function("host_resolve_basket", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(resolver.resolve(black_box("basket")).await.unwrap()) })
    });
    group.finish();
}

/// The native lookup as a source of the discovery core: the same host work as the
/// Wasm path (query conversion, the chain, scheme selection, building the
/// `EndpointSet`), without the sandbox. The fair baseline for `wasm_config`: the
/// difference between the two is the boundary's cost alone.
struct NativeSource {
    name: Arc<str>,
    config: NativeConfig,
}

#[async_trait::async_trait]
impl wasd_core::Source for NativeSource {
    fn name(&self) -> &Arc<str> {
        &self.name
    }

    async fn resolve(
        &self,
        query: &wasd_core::SourceQuery,
    ) -> Result<wasd_core::Answer, wasd_core::ProviderError> {
        let endpoints = self
            .config
            .resolve(&query.service, &query.schemes)
            .into_iter()
            .map(|e| {
                let mut endpoint = wasd_core::Endpoint::new(e.host);
                if let Some(scheme) = e.scheme {
                    endpoint = endpoint.with_scheme(scheme);
                }
                if let Some(port) = e.port {
                    endpoint = endpoint.with_port(port);
                }
                endpoint
            })
            .collect();
        Ok(wasd_core::Answer::new(endpoints))
    }
}

fn uncached(c: &mut Criterion) {
    let (rt, dir) = setup();
    let cache = dir.path().join("cache");
    let resolver = resolver(&rt, dir.path(), Some(&cache));
    let native = NativeConfig::new();
    let query = Query::parse("https+http://catalog").unwrap();
    let miss = Query::parse("https+http://nobody").unwrap();
    let schemes = vec!["https".to_owned(), "http".to_owned()];
    assert_eq!(native.resolve("catalog", &schemes).len(), 2);
    assert_eq!(rt.block_on(resolver.resolve_uncached(&query)).unwrap().len(), 2);

    let through_host = wasd_core::Cache::new(
        Arc::new(wasd_core::ChainCell::new(wasd_core::Chain::new(vec![Arc::new(
            NativeSource {
                name: "native".into(),
                config: NativeConfig::new(),
            },
        )]))),
        wasd_core::Settings::default(),
        wasd_core::Clock::default(),
    );
    assert_eq!(
        rt.block_on(through_host.resolve_uncached(&query)).unwrap().len(),
        2
    );

    let mut group = c.benchmark_group("uncached");
    group.bench_function("native_config", |b| {
        b.iter(|| black_box(native.resolve(black_box("catalog"), black_box(&schemes))))
    });
    group.bench_function("native_source_through_host", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(through_host.resolve_uncached(black_box(&query)).await.unwrap()) })
    });
    group.bench_function("wasm_config", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(resolver.resolve_uncached(black_box(&query)).await.unwrap()) })
    });
    // The boundary alone: a call that finds nothing (no endpoints to copy back).
    group.bench_function("wasm_config_empty_answer", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(resolver.resolve_uncached(black_box(&miss)).await.unwrap_err()) })
    });
    group.finish();
}

fn startup(c: &mut Criterion) {
    let (rt, dir) = setup();
    let cache = dir.path().join("cache");
    drop(resolver(&rt, dir.path(), Some(&cache)));

    let mut group = c.benchmark_group("startup");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    group.bench_function("from_precompiled_cache", |b| {
        b.iter(|| resolver(&rt, dir.path(), Some(&cache)))
    });
    group.bench_function("cold_compile", |b| b.iter(|| resolver(&rt, dir.path(), None)));
    group.finish();
}

criterion_group!(benches, cached, uncached, startup);
criterion_main!(benches);
