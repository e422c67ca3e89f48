//! Registries at scale: 10 / 1 000 / 10 000 services of 10 instances each in a real
//! etcd (Kratos layout), through the etcd provider, beside a direct etcd HTTP client
//! doing the same work in the same run:
//!
//! - the first resolve of every service (a range read each), and the direct client's
//!   range read and decode of the same service;
//! - a cached resolve, and an uncached one (the provider called);
//! - the memory a resolver holds per instance (measured in a fresh child process);
//! - at 10 000 services, 1 000 watchers on different services: memory, and put →
//!   notification p50 / p99 against 1 000 direct `/v3/watch` streams.
//!
//! `cargo bench -p wasd-tests --bench registry` (needs etcd: `scripts/setup`). One
//! run, printed as a table (docs/BENCHMARKS.md, "Registries at scale").

use std::hint::black_box;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use wasd::Query;
use wasd_tests::{EtcdServer, Sandbox, direct_discovery, runtime, until_version};

const INSTANCES: usize = 10;
const WATCHERS: usize = 1_000;
const PUTS: usize = 200;

fn service(i: usize) -> String {
    format!("svc-{i:05}")
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn instance_value(service: &str, j: usize, version: &str) -> String {
    json!({
        "id": format!("{service}-{j}"), "name": service, "version": version, "metadata": null,
        "endpoints": [format!("http://10.{}.{}.{}:8080", j, (service.len() + j) % 256, j * 7 % 256)],
    })
    .to_string()
}

/// Write services `range`, 10 instances each, 128 puts a transaction (etcd's limit).
fn load(etcd: &EtcdServer, range: std::ops::Range<usize>) {
    let puts: Vec<Value> = range
        .flat_map(|i| (0..INSTANCES).map(move |j| (i, j)))
        .map(|(i, j)| {
            let name = service(i);
            let key = format!("/microservices/{name}/{name}-{j}");
            json!({ "request_put": { "key": B64.encode(key), "value": B64.encode(instance_value(&name, j, "v1")) } })
        })
        .collect();
    for batch in puts.chunks(128) {
        etcd.post("/v3/kv/txn", json!({ "success": batch }));
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn etcd_only(url: &str) -> String {
    format!(
        "pass-through = false\n[[provider]]\nbuiltin = \"etcd\"\n\
         settings = {{ endpoints = [\"{url}\"] }}\ngrants = {{ http = [\"{url}\"] }}\n"
    )
}

/// In a process of its own (a freed allocation would be reused, not shown, in the
/// same process): the resident memory a resolver adds by resolving `services`
/// services, or by watching them, in KiB. Printed for the parent.
fn memory_child(url: &str, services: usize, watch: bool) {
    let rt = runtime();
    let sandbox = Sandbox::new();
    let resolver = rt.block_on(sandbox.resolver(&etcd_only(url))).unwrap();
    // The provider instantiated and one query answered first: the fixed cost apart.
    rt.block_on(resolver.resolve("svc-99999")).ok();
    let before = rss_kib();
    let mut watches = Vec::new();
    for i in 0..services {
        if watch {
            watches.push(rt.block_on(resolver.watch(&service(i))).unwrap());
        } else {
            rt.block_on(resolver.resolve(&service(i))).unwrap();
        }
    }
    // Every long-poll open (a provider call each) before reading.
    std::thread::sleep(Duration::from_secs(2));
    println!("{}", rss_kib().saturating_sub(before));
}

/// [`memory_child`] run in a child process.
fn memory_of(url: &str, services: usize, watch: bool) -> u64 {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--memory-of",
            url,
            &services.to_string(),
            if watch { "watch" } else { "resolve" },
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--memory-of") {
        return memory_child(&args[2], args[3].parse().unwrap(), args[4] == "watch");
    }
    let rt = runtime();
    let etcd = EtcdServer::start();
    let url = etcd.url();
    let toml = etcd_only(&url);
    let agent = ureq::Agent::new_with_defaults();
    println!(
        "services | first resolve (provider) | direct range+decode | ratio | cached resolve | uncached resolve | memory / instance"
    );
    println!("---|---|---|---|---|---|---");
    let mut loaded = 0;
    let mut kept = None;
    for services in [10, 1_000, 10_000] {
        load(&etcd, loaded..services);
        loaded = services;
        let sandbox = Sandbox::new();
        let resolver = rt.block_on(sandbox.resolver(&toml)).unwrap();
        let names: Vec<String> = (0..services).map(service).collect();

        let started = Instant::now();
        for name in &names {
            let set = rt.block_on(resolver.resolve(name)).unwrap();
            assert_eq!(set.len(), INSTANCES, "{name}");
        }
        let first = started.elapsed() / services as u32;
        let memory = memory_of(&url, services, false) * 1024 / (services * INSTANCES) as u64;

        let started = Instant::now();
        for name in &names {
            assert_eq!(black_box(direct_discovery(&agent, &url, name)).len(), INSTANCES);
        }
        let direct = started.elapsed() / services as u32;

        // Cached: 200 000 resolves spread over every service.
        let rounds = 200_000;
        let started = Instant::now();
        rt.block_on(async {
            for k in 0..rounds {
                black_box(resolver.resolve(&names[(k * 7919) % services]).await.unwrap());
            }
        });
        let cached = started.elapsed() / rounds as u32;

        let sample = services.min(1_000);
        let queries: Vec<Query> = names[..sample].iter().map(|n| Query::parse(n).unwrap()).collect();
        let started = Instant::now();
        rt.block_on(async {
            for query in &queries {
                black_box(resolver.resolve_uncached(query).await.unwrap());
            }
        });
        let uncached = started.elapsed() / sample as u32;

        println!(
            "{services} | {first:.2?} | {direct:.2?} | {:.2}× | {cached:.0?} | {uncached:.2?} | {memory} B",
            first.as_secs_f64() / direct.as_secs_f64()
        );
        kept = Some((sandbox, resolver));
    }
    // (Their long-polls end with them.)

    // 1 000 watchers on different services, at 10 000 services, on a resolver of
    // their own (the one above follows its first 1 024 services already).
    drop(kept);
    let watch_memory = memory_of(&url, WATCHERS, true);
    let sandbox = Sandbox::new();
    let resolver = rt.block_on(sandbox.resolver(&toml)).unwrap();
    let mut watches = Vec::new();
    for i in 0..WATCHERS {
        watches.push(rt.block_on(resolver.watch(&service(i))).unwrap());
    }
    let mut latencies = Vec::new();
    for n in 0..PUTS {
        let i = (n * 37) % WATCHERS;
        let name = service(i);
        let version = format!("w{n}");
        let started = Instant::now();
        etcd.put(
            &format!("/microservices/{name}/{name}-0"),
            instance_value(&name, 0, &version).as_bytes(),
            None,
        );
        rt.block_on(until_version(&mut watches[i], &version));
        latencies.push(started.elapsed());
    }
    latencies.sort();

    // The same with 1 000 direct watch streams (one connection each, as 1 000 Go
    // clients' watchers on their own services would hold).
    let direct = rt.block_on(direct_watchers(&url, &etcd));
    println!();
    println!("{WATCHERS} watchers at 10 000 services | put → notified p50 | p99 | memory");
    println!("---|---|---|---");
    println!(
        "wasd | {:.2?} | {:.2?} | {} MiB ({} KiB a watcher: its entry and its long-poll's provider instance)",
        percentile(&latencies, 50),
        percentile(&latencies, 99),
        watch_memory / 1024,
        watch_memory / WATCHERS as u64
    );
    println!(
        "direct /v3/watch streams | {:.2?} | {:.2?} | —",
        percentile(&direct, 50),
        percentile(&direct, 99)
    );
}

/// 1 000 `/v3/watch` streams on services 0..1 000 over plain HTTP/1.1, each reporting
/// its first event after a put; the put → event latencies, sorted.
async fn direct_watchers(url: &str, etcd: &EtcdServer) -> Vec<Duration> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let authority = url.trim_start_matches("http://").to_owned();
    let (events, mut seen) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let mut opened = Vec::new();
    for i in 0..WATCHERS {
        let prefix = format!("/microservices/{}/", service(i));
        let mut end = prefix.clone().into_bytes();
        *end.last_mut().unwrap() += 1;
        let body = json!({ "create_request": { "key": B64.encode(&prefix), "range_end": B64.encode(&end) } })
            .to_string();
        let mut stream = tokio::net::TcpStream::connect(&authority).await.unwrap();
        let request = format!(
            "POST /v3/watch HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let events = events.clone();
        let (created, ready) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            let mut created = Some(created);
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("\"created\":true") {
                    if let Some(created) = created.take() {
                        let _ = created.send(());
                    }
                } else if line.contains("\"events\"") {
                    let _ = events.send((i, Instant::now()));
                }
            }
        });
        opened.push(ready);
    }
    for ready in opened {
        ready.await.unwrap();
    }
    let mut latencies = Vec::new();
    for n in 0..PUTS {
        let i = (n * 37) % WATCHERS;
        let name = service(i);
        let started = Instant::now();
        etcd.put(
            &format!("/microservices/{name}/{name}-0"),
            instance_value(&name, 0, &format!("d{n}")).as_bytes(),
            None,
        );
        loop {
            let (who, at) = tokio::time::timeout(Duration::from_secs(10), seen.recv())
                .await
                .expect("no event within 10 s")
                .unwrap();
            if who == i {
                latencies.push(at - started);
                break;
            }
        }
    }
    latencies.sort();
    latencies
}
