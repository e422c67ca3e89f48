//! The zookeeper provider against a real ZooKeeper (Debian's 3.8 on loopback), beside
//! the same protocol client compiled natively (`providers/zookeeper/src/client.rs` and
//! `jute.rs`, by path) doing the same work in the same run:
//!
//! - an uncached resolve of a service of 10 instances (the provider's kept session:
//!   the children, their data in one pipelined round trip, the instances decoded),
//!   against the native client's same requests on a kept connection and a JSON decode;
//! - an instance rewritten by another client (kazoo) → the change seen: a wasd
//!   watcher, against the native client's data watch firing.
//!
//! `cargo bench -p wasd-tests --bench zookeeper` (needs ZooKeeper: `scripts/setup`).
//! One run, printed as a table (docs/BENCHMARKS.md, "ZooKeeper").

// (Its unit tests' module compiles here too, without its tests.)
#[allow(dead_code, unused_imports)]
#[path = "../../providers/zookeeper/src/client.rs"]
mod client;
#[allow(dead_code)]
#[path = "../../providers/zookeeper/src/jute.rs"]
mod jute;

use std::hint::black_box;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasd::Query;
use wasd_tests::{Sandbox, ZooKeeperServer, runtime, until_version};

use crate::client::{Connection, Dial, Session};

const INSTANCES: usize = 10;
const ROUNDS: usize = 2_000;
const CHANGES: usize = 200;

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn value(j: usize, version: &str) -> String {
    json!({
        "id": format!("i{j}"), "name": "svc", "version": version, "metadata": null,
        "endpoints": [format!("http://10.0.0.{j}:8080")],
    })
    .to_string()
}

/// What a native Kratos discovery does per lookup: the children, each one's data, each
/// decoded into its endpoints.
fn native_resolve(connection: &mut Connection) -> Vec<String> {
    let (children, _) = connection.children("/microservices/svc", false).unwrap().unwrap();
    let paths: Vec<String> = children
        .iter()
        .map(|c| format!("/microservices/svc/{c}"))
        .collect();
    let mut endpoints = Vec::new();
    for (data, _) in connection.get_all(&paths, false).unwrap().into_iter().flatten() {
        let instance: Value = serde_json::from_slice(&data).unwrap();
        for endpoint in instance["endpoints"].as_array().into_iter().flatten() {
            endpoints.push(endpoint.as_str().unwrap().to_owned());
        }
    }
    endpoints
}

fn main() {
    let rt = runtime();
    let zk = ZooKeeperServer::start();
    let address = zk.address();
    let mut writer = zk.client(None);
    for j in 0..INSTANCES {
        writer.register_kratos(
            "svc",
            &format!("i{j}"),
            "v0",
            &[&format!("http://10.0.0.{j}:8080")],
        );
    }
    let toml = format!(
        "pass-through = false\n[[provider]]\nbuiltin = \"zookeeper\"\n\
         settings = {{ servers = [\"{address}\"] }}\ngrants = {{ tcp = [\"{address}\"] }}\n"
    );
    let sandbox = Sandbox::new();
    let resolver = rt.block_on(sandbox.resolver(&toml)).unwrap();
    let query = Query::parse("svc").unwrap();
    let servers = [address.clone()];
    let dial = Dial {
        servers: &servers,
        first: 0,
        timeout: Duration::from_secs(2),
        auth: None,
        max_packet: 16 << 20,
    };
    let mut native = Connection::open(&dial, &Session::new(10_000)).unwrap();

    // Uncached resolves, alternating with the native client's, so both see the same
    // machine and server.
    let (mut wasd, mut direct) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let set = rt.block_on(resolver.resolve_uncached(&query)).unwrap();
        wasd.push(started.elapsed());
        assert_eq!(black_box(set).len(), INSTANCES);
        let started = Instant::now();
        assert_eq!(black_box(native_resolve(&mut native)).len(), INSTANCES);
        direct.push(started.elapsed());
    }
    println!("{INSTANCES} instances, {ROUNDS} rounds | p50 | p99");
    println!("---|---|---");
    row("uncached resolve through the provider", &mut wasd);
    row("native client, same requests and decode", &mut direct);
    println!(
        "ratio (p50) | {:.2}× |",
        percentile(&wasd, 50).as_secs_f64() / percentile(&direct, 50).as_secs_f64()
    );

    // A rewrite by kazoo → the change seen. Each includes kazoo's own command time.
    // Changes are spaced 150 ms apart, as a service's instances change: past ten
    // changes in a row within 100 ms of each other, the host reads a service at most
    // every 100 ms (so a source that returns at once cannot spin), which would measure
    // that pacing instead.
    let mut watch = rt.block_on(resolver.watch("svc")).unwrap();
    let (mut wasd, mut direct) = (Vec::new(), Vec::new());
    for n in 0..CHANGES {
        let version = format!("w{n}");
        std::thread::sleep(Duration::from_millis(150));
        let started = Instant::now();
        writer.set("/microservices/svc/i0", &value(0, &version));
        rt.block_on(until_version(&mut watch, &version));
        wasd.push(started.elapsed());

        let path = "/microservices/svc/i1".to_owned();
        native.get_all(std::slice::from_ref(&path), true).unwrap();
        let started = Instant::now();
        writer.set(&path, &value(1, &version));
        let event = native
            .next_event(Instant::now() + Duration::from_secs(10))
            .unwrap()
            .expect("the data watch fired");
        assert_eq!(event.path, path);
        direct.push(started.elapsed());
    }
    println!();
    println!("rewrite → seen, {CHANGES} changes | p50 | p99");
    println!("---|---|---");
    row("wasd watcher", &mut wasd);
    row("native data watch", &mut direct);
}

/// One table row: the samples' p50 and p99 (sorted in place).
fn row(what: &str, samples: &mut [Duration]) {
    samples.sort();
    println!(
        "{what} | {:.2?} | {:.2?}",
        percentile(samples, 50),
        percentile(samples, 99)
    );
}
