//! Whole-system benchmarks against real servers and real files (docs/BENCHMARKS.md has
//! the report; `host/benches/resolve.rs` covers the in-process paths):
//!
//! - `dns`: the `dns-srv` provider vs hickory-resolver called directly, against the
//!   same dnsmasq, with every answer fresh from the server (TTL 0) and from hickory's
//!   cache;
//! - `etcd`: the `etcd` provider vs a direct HTTP call from Rust to the same etcd, and
//!   the latency from a put to a subscriber's notification;
//! - `reload`: a module file replaced → the new provider serving, and cached-resolve
//!   throughput while reloads run back to back vs none;
//! - `scale`: resolve cost with 10, 1 000 and 10 000 services and with 1 000 watchers,
//!   and the memory each costs (printed, as criterion measures only time);
//! - `process`: a whole `wasd resolve` with the four standard providers, and a `wasd`
//!   process's resident memory with them loaded.
//!
//! `cargo bench -p wasd-tests --bench system` (needs dnsmasq and etcd: `scripts/setup`).

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use serde_json::{Value, json};
use tokio::runtime::Runtime;
use wasd::Query;
use wasd_tests::{DnsServer, EtcdServer, Sandbox, direct_discovery, fixtures, runtime, until_version};

/// Resident and peak memory of a process, in KiB, from /proc.
fn memory_kib(pid: &str) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn rss_kib() -> u64 {
    memory_kib("self").0
}

// ---------------------------------------------------------------------------- dns

const DNS_RECORDS: &[&str] = &[
    "--srv-host=_default._tcp.basket.cluster.local,basket-1.cluster.local,8080,0,10",
    "--srv-host=_default._tcp.basket.cluster.local,basket-2.cluster.local,8081,1,5",
    "--host-record=basket-1.cluster.local,10.0.0.1",
    "--host-record=basket-2.cluster.local,10.0.0.2",
];

/// What a native service would write: one SRV lookup, targets' addresses from the
/// additional section (or looked up), endpoints in priority order.
async fn hickory_srv(resolver: &TokioResolver) -> Vec<(String, u16)> {
    let lookup = resolver
        .srv_lookup("_default._tcp.basket.cluster.local.")
        .await
        .unwrap();
    let mut records: Vec<_> = lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(srv) => Some(srv.clone()),
            _ => None,
        })
        .collect();
    records.sort_by_key(|srv| (srv.priority, std::cmp::Reverse(srv.weight)));
    let mut endpoints = Vec::new();
    for srv in records {
        let mut found = false;
        for extra in lookup.additionals().iter().filter(|e| e.name == srv.target) {
            if let RData::A(a) = &extra.data {
                endpoints.push((a.0.to_string(), srv.port));
                found = true;
            }
        }
        if !found {
            for ip in resolver.lookup_ip(srv.target.clone()).await.unwrap().iter() {
                endpoints.push((ip.to_string(), srv.port));
            }
        }
    }
    endpoints
}

fn hickory_for(server: &DnsServer) -> TokioResolver {
    let addr: std::net::SocketAddr = server.address().parse().unwrap();
    let mut udp = ConnectionConfig::udp();
    udp.port = addr.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = addr.port();
    let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
    ns.connections = vec![udp, tcp];
    TokioResolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    )
    .build()
    .unwrap()
}

fn dns(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("dns");
    // TTL 0: neither hickory nor the host's resolver keeps the answer, every lookup goes
    // to dnsmasq. TTL 300: every lookup after the first is served from hickory's cache.
    for (label, ttl) in [("from_server", 0), ("hickory_cached", 300)] {
        let server = DnsServer::start(ttl, DNS_RECORDS);
        let sandbox = Sandbox::new();
        let toml = format!(
            "pass-through = false\n[dns]\nservers = [\"{}\"]\n[[provider]]\nbuiltin = \"dns-srv\"\n\
             settings = {{ suffix = \"cluster.local\" }}\ngrants = {{ dns = [\"cluster.local\"] }}\n",
            server.address()
        );
        let resolver = rt.block_on(sandbox.resolver(&toml)).unwrap();
        let native = hickory_for(&server);
        let query = Query::parse("basket").unwrap();
        let expected = rt.block_on(hickory_srv(&native));
        let through = rt.block_on(resolver.resolve_uncached(&query)).unwrap();
        assert_eq!(expected.len(), 2);
        assert_eq!(through.len(), 2, "{through:?}");

        group.bench_function(format!("{label}/hickory_direct"), |b| {
            b.to_async(&rt)
                .iter(|| async { black_box(hickory_srv(&native).await) })
        });
        group.bench_function(format!("{label}/dns_srv_provider"), |b| {
            b.to_async(&rt)
                .iter(|| async { black_box(resolver.resolve_uncached(&query).await.unwrap()) })
        });
    }
    group.finish();
}

// --------------------------------------------------------------------------- etcd

fn etcd(c: &mut Criterion) {
    let rt = runtime();
    let etcd = EtcdServer::start();
    etcd.put_instance(
        "hello",
        "a",
        "v1",
        &["grpc://10.0.0.1:9000", "http://10.0.0.1:8000"],
        None,
    );
    etcd.put_instance("hello", "b", "v1", &["http://10.0.0.2:8000"], None);
    let url = etcd.url();
    let sandbox = Sandbox::new();
    let toml = format!(
        "pass-through = false\n[[provider]]\nbuiltin = \"etcd\"\n\
         settings = {{ endpoints = [\"{url}\"] }}\ngrants = {{ http = [\"{url}\"] }}\n"
    );
    let resolver = rt.block_on(sandbox.resolver(&toml)).unwrap();
    let query = Query::parse("http://hello").unwrap();
    assert_eq!(rt.block_on(resolver.resolve_uncached(&query)).unwrap().len(), 2);
    // A pooled client (keep-alive), as a native service would hold (and the host's HTTP
    // import does), and one that opens a connection per request.
    let pooled = ureq::Agent::new_with_defaults();
    assert_eq!(direct_discovery(&pooled, &url, "hello").len(), 3);

    let mut group = c.benchmark_group("etcd");
    group.bench_function("direct_http_keep_alive", |b| {
        b.iter(|| black_box(direct_discovery(&pooled, &url, "hello")))
    });
    group.bench_function("direct_http_new_connection", |b| {
        b.iter(|| black_box(direct_discovery(&ureq::Agent::new_with_defaults(), &url, "hello")))
    });
    group.bench_function("etcd_provider", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(resolver.resolve_uncached(&query).await.unwrap()) })
    });

    // Put → notified: each iteration changes an instance's version and waits for the
    // subscriber to see it. Twice: with the put 300 ms after the previous notification
    // (untimed; the watch is open and waiting, as for most real puts), and right after
    // it (the host may still be pacing its next watch call).
    let mut watch = rt.block_on(resolver.watch("http://hello")).unwrap();
    let counter = AtomicU64::new(0);
    group.sample_size(20);
    for (label, pause) in [
        ("watch_put_to_notified", 300),
        ("watch_put_right_after_a_change", 0),
    ] {
        group.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let version = format!("v{n}");
                    std::thread::sleep(Duration::from_millis(pause));
                    let start = Instant::now();
                    etcd.put_instance("hello", "b", &version, &["http://10.0.0.2:8000"], None);
                    rt.block_on(until_version(&mut watch, &version));
                    total += start.elapsed();
                }
                total
            })
        });
    }
    group.finish();
}

// ------------------------------------------------------------------------- reload

fn write_then_rename(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn reload(c: &mut Criterion) {
    let rt = runtime();
    let a = std::fs::read(fixtures::FIXED_A).unwrap();
    let b = std::fs::read(fixtures::FIXED_B).unwrap();
    let sandbox = Sandbox::new();
    let plugin = sandbox.write("plugins/fixed.wasm", &a);
    let resolver = rt
        .block_on(sandbox.resolver("pass-through = false\nplugin-dir = \"plugins\"\n"))
        .unwrap();
    let query = Query::parse("fixed").unwrap();
    let serving = |rt: &Runtime| {
        wasd_tests::strings(&rt.block_on(resolver.resolve_uncached(&query)).unwrap()).join(" ")
    };
    assert_eq!(serving(&rt), "http://10.1.0.1:80");

    let mut group = c.benchmark_group("reload");
    group.sample_size(10);
    // File replaced (write + rename) → the reload that replaced the provider reported
    // → the new version answers. Includes the 150 ms debounce.
    let flip = AtomicU64::new(0);
    group.bench_function("module_replaced_to_serving", |bench| {
        bench.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let to_b = flip.fetch_add(1, Ordering::Relaxed).is_multiple_of(2);
                let (bytes, want) = if to_b {
                    (&b, "http://10.1.0.2:80")
                } else {
                    (&a, "http://10.1.0.1:80")
                };
                let mut events = resolver.reload_events();
                let start = Instant::now();
                write_then_rename(&plugin, bytes);
                rt.block_on(async {
                    loop {
                        let report = tokio::time::timeout(Duration::from_secs(10), events.recv())
                            .await
                            .expect("no reload within 10 s")
                            .unwrap();
                        if report.replaced.iter().any(|p| p == "fixed") {
                            break;
                        }
                    }
                });
                total += start.elapsed();
                assert_eq!(serving(&rt), want);
            }
            total
        })
    });

    // Resolves on one thread, cached and uncached (the chain runs on every call, so a
    // chain broken mid-swap would be seen), with and without a writer replacing the
    // module every 200 ms (each write becomes one reload: longer than the debounce).
    // Every answer is checked (one of the two versions); failures, wrong answers and
    // reloads are counted per run, not since the resolver started.
    group.sample_size(20);
    for label in ["quiet", "reloading"] {
        let stop = Arc::new(AtomicBool::new(false));
        let reloads_before = resolver.reload_status().reloads;
        let writer = (label == "reloading").then(|| {
            let (stop, plugin, a, b) = (stop.clone(), plugin.clone(), a.clone(), b.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    write_then_rename(&plugin, if n.is_multiple_of(2) { &b } else { &a });
                    n += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                n
            })
        });
        let (failures, wrong) = (AtomicU64::new(0), AtomicU64::new(0));
        let (cached, uncached) = (AtomicU64::new(0), AtomicU64::new(0));
        // Checked without allocating: the host of the one endpoint, either version's.
        let check = |result: Result<wasd::EndpointSet, wasd::Error>| match result {
            Ok(set) if matches!(set.endpoints(), [e] if e.host() == "10.1.0.1" || e.host() == "10.1.0.2") => {
            }
            Ok(_) => drop(wrong.fetch_add(1, Ordering::Relaxed)),
            Err(_) => drop(failures.fetch_add(1, Ordering::Relaxed)),
        };
        group.bench_function(format!("cached_resolve_{label}"), |bench| {
            bench.to_async(&rt).iter(|| async {
                cached.fetch_add(1, Ordering::Relaxed);
                check(resolver.resolve("fixed").await);
            })
        });
        group.bench_function(format!("uncached_resolve_{label}"), |bench| {
            bench.to_async(&rt).iter(|| async {
                uncached.fetch_add(1, Ordering::Relaxed);
                check(resolver.resolve_uncached(&query).await);
            })
        });
        stop.store(true, Ordering::Relaxed);
        let writes = writer.map_or(0, |writer| writer.join().unwrap());
        eprintln!(
            "reload/{label}: {writes} module writes, {} reloads in this run; {} cached and {} uncached resolves, {} failed, {} wrong",
            resolver.reload_status().reloads - reloads_before,
            cached.load(Ordering::Relaxed),
            uncached.load(Ordering::Relaxed),
            failures.load(Ordering::Relaxed),
            wrong.load(Ordering::Relaxed),
        );
        assert_eq!(
            (failures.load(Ordering::Relaxed), wrong.load(Ordering::Relaxed)),
            (0, 0),
            "resolves failed or were wrong during reloads"
        );
    }
    group.finish();
}

// -------------------------------------------------------------------------- scale

/// An appsettings.json with `n` services of two endpoints each.
fn appsettings(n: usize) -> String {
    let services: serde_json::Map<String, Value> = (0..n)
        .map(|i| {
            let ip = format!("10.{}.{}", i / 256 % 256, i % 256);
            let endpoints =
                json!({ "https": [format!("https://{ip}.1:443"), format!("https://{ip}.2:443")] });
            (format!("svc{i}"), endpoints)
        })
        .collect();
    json!({ "Services": services }).to_string()
}

fn scale(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("scale");
    for n in [10usize, 1_000, 10_000] {
        let sandbox = Sandbox::new();
        let settings = sandbox.write("appsettings.json", appsettings(n));
        let toml = format!(
            "pass-through = false\n[[provider]]\nbuiltin = \"config\"\ngrants = {{ files = [\"{}\"] }}\n",
            settings.display()
        );
        let before = rss_kib();
        let resolver = rt.block_on(sandbox.resolver(&toml)).unwrap();
        let loaded = rss_kib();
        let queries: Vec<String> = (0..n).map(|i| format!("https://svc{i}")).collect();
        rt.block_on(async {
            for q in &queries {
                resolver.resolve(q).await.unwrap();
            }
        });
        let warmed = rss_kib();
        eprintln!(
            "scale/{n}: resolver with {n} services loaded +{} KiB; all {n} answers cached +{} KiB ({} B per cached answer)",
            loaded.saturating_sub(before),
            warmed.saturating_sub(loaded),
            warmed.saturating_sub(loaded) * 1024 / n as u64
        );
        // Cycle through every service so the caches are exercised at their size. The
        // baseline: a HashMap of the same answers, cycled the same way (at 10 000 both
        // outgrow the CPU caches).
        let next = AtomicU64::new(0);
        let map: std::collections::HashMap<&str, Arc<[String]>> = queries
            .iter()
            .map(|q| (q.as_str(), Arc::from(vec![q.clone(), q.clone()])))
            .collect();
        group.bench_function(format!("hashmap_lookup/{n}_services"), |b| {
            b.iter(|| {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize % n;
                black_box(map.get(queries[i].as_str()).cloned())
            })
        });
        group.bench_function(format!("cached_resolve/{n}_services"), |b| {
            b.to_async(&rt).iter(|| async {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize % n;
                black_box(resolver.resolve(&queries[i]).await.unwrap())
            })
        });
        let parsed: Vec<Query> = queries.iter().map(|q| Query::parse(q).unwrap()).collect();
        group.bench_function(format!("uncached_resolve/{n}_services"), |b| {
            b.to_async(&rt).iter(|| async {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize % n;
                black_box(resolver.resolve_uncached(&parsed[i]).await.unwrap())
            })
        });

        if n == 1_000 {
            // 1 000 watchers, one per service, alive while resolves run.
            let before = rss_kib();
            let watches: Vec<_> = rt.block_on(async {
                let mut watches = Vec::new();
                for q in &queries {
                    watches.push(resolver.watch(q).await.unwrap());
                }
                watches
            });
            let after = rss_kib();
            eprintln!(
                "scale/1000 watchers: +{} KiB ({} B per watcher)",
                after.saturating_sub(before),
                after.saturating_sub(before) * 1024 / 1_000
            );
            group.bench_function("cached_resolve/1000_services_1000_watchers", |b| {
                b.to_async(&rt).iter(|| async {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize % n;
                    black_box(resolver.resolve(&queries[i]).await.unwrap())
                })
            });
            drop(watches);
        }
    }
    group.finish();
}

/// A release `wasd` process with the four standard providers (config, dns-srv, dns,
/// etcd) and pass-through: a whole `wasd resolve` timed, and the resident memory of a
/// `wasd watch` after each provider has answered once (printed: criterion measures only
/// time).
fn process(c: &mut Criterion) {
    let mut group = c.benchmark_group("process");
    group.sample_size(20);
    // Set up on first use: criterion calls the routine once per sample, and not at all
    // when a filter leaves this group out.
    let setup = std::cell::OnceCell::new();
    group.bench_function("wasd_resolve_four_providers", |b| {
        let setup: &ProcessSetup = setup.get_or_init(ProcessSetup::start);
        b.iter(|| {
            let out = setup.wasd("resolve", "https://svc1").output().unwrap();
            assert!(out.status.success());
        })
    });
    group.finish();
}

/// dnsmasq, etcd and a config using both, for whole `wasd` processes.
struct ProcessSetup {
    bin: std::path::PathBuf,
    config: std::path::PathBuf,
    _servers: (DnsServer, EtcdServer, Sandbox),
}

impl ProcessSetup {
    fn start() -> ProcessSetup {
        let bin = wasd_tests::build_wasd(true);
        let dns = DnsServer::start(30, DNS_RECORDS);
        let etcd = EtcdServer::start();
        etcd.put_instance("hello", "a", "v1", &["http://10.0.0.1:8000"], None);
        let sandbox = Sandbox::new();
        let settings = sandbox.write("appsettings.json", appsettings(10));
        let url = etcd.url();
        let config = sandbox.write(
            "wasd.toml",
            format!(
                r#"
[dns]
servers = ["{dns}"]
[[provider]]
builtin = "config"
grants = {{ files = ["{settings}"] }}
[[provider]]
builtin = "dns-srv"
settings = {{ suffix = "cluster.local" }}
grants = {{ dns = ["cluster.local"] }}
[[provider]]
builtin = "dns"
grants = {{ dns = ["cluster.local"] }}
[[provider]]
builtin = "etcd"
settings = {{ endpoints = ["{url}"] }}
grants = {{ http = ["{url}"] }}
"#,
                dns = dns.address(),
                settings = settings.display()
            ),
        );
        let setup = ProcessSetup {
            bin,
            config,
            _servers: (dns, etcd, sandbox),
        };
        // Each query is answered by another provider: config, dns-srv, etcd.
        for query in ["https://svc1", "basket", "hello"] {
            let mut child = setup
                .wasd("watch", query)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            std::io::BufRead::read_line(&mut out, &mut line).unwrap();
            std::thread::sleep(Duration::from_millis(500));
            let (rss, peak) = memory_kib(&child.id().to_string());
            eprintln!(
                "process/wasd watch {query} (first answer {}): RSS {:.1} MiB, peak {:.1} MiB",
                line.trim(),
                rss as f64 / 1024.0,
                peak as f64 / 1024.0
            );
            let _ = child.kill();
            let _ = child.wait();
        }
        setup
    }

    fn wasd(&self, command: &str, query: &str) -> std::process::Command {
        let mut cmd = std::process::Command::new(&self.bin);
        cmd.args([command, "--config"])
            .arg(&self.config)
            .arg(query)
            .env("XDG_CACHE_HOME", wasd_tests::cache_dir())
            .stderr(std::process::Stdio::null());
        cmd
    }
}

criterion_group!(benches, dns, etcd, reload, scale, process);
criterion_main!(benches);
