//! How fast a change in the chain reaches gRPC clients through `wasd serve --xds`
//! (docs/BENCHMARKS.md, row 11), against a real etcd, with the release build:
//!
//! - change → first call: a Python grpcio client calling `xds:///echo` until the
//!   instance just put in etcd answers (from before the put to the client's report,
//!   which includes the pipe to the client: ~0.1 ms); then the old instance is deleted
//!   and the client calls until it no longer answers.
//! - fan-out: 100 ADS streams (envoy-types' tonic client, a connection each) subscribed
//!   to the same service; from an etcd write until every stream has the new assignment.
//!
//! Changes are spaced 300 ms apart: a change right after another is delayed ~100 ms by
//! etcd itself (a watch started at a revision already past is served by etcd's 100 ms
//! "unsynced watchers" loop; docs/BENCHMARKS.md row 4), which would hide the path
//! measured here. `WASD_BENCH_BACK_TO_BACK=1` leaves the pause out, to see that.
//!
//! `cargo bench -p wasd-tests --bench xds [-- ROUNDS]` (default 30)

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use wasd_tests::peers::{GrpcServers, Reaped, XdsClient};
use wasd_tests::{EtcdServer, Lines, Sandbox, build_wasd, python_clients};

const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const STREAMS: usize = 100;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let at = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at]
}

fn report(what: &str, mut times: Vec<Duration>) {
    times.sort();
    println!(
        "{what}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} rounds)",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        times.last().unwrap().as_secs_f64() * 1e3,
        times.len()
    );
}

/// The pause between two changes (see the module's comment).
fn pause() -> Duration {
    if std::env::var_os("WASD_BENCH_BACK_TO_BACK").is_some() {
        Duration::ZERO
    } else {
        Duration::from_millis(300)
    }
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(30);
    let python = python_clients();
    let etcd = EtcdServer::start();
    let sandbox = Sandbox::new();
    sandbox.write("wasd.toml", etcd.only_provider_config());
    let grpc = GrpcServers::start(&python, 3);
    etcd.put_instance("echo", "i0", "v1", &[&grpc.url(0)], None);
    let mut serve = Reaped(
        Command::new(build_wasd(true))
            .current_dir(sandbox.path())
            .args(["serve", "--config", "wasd.toml", "--http", "127.0.0.1:0"])
            .args(["--dns", "127.0.0.1:0", "--xds", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting wasd serve"),
    );
    let said = Lines::new(serve.0.stdout.take().unwrap());
    let xds = loop {
        let line = said.next(Duration::from_secs(120), "the xDS listener's line");
        if let Some(address) = line.strip_prefix("serving xDS on ") {
            break address.to_owned();
        }
    };

    // A. change → first call, with grpcio.
    let mut client = XdsClient::start(&python, &sandbox, &xds);
    assert!(client.until("echo", "s0").is_some(), "no call reached s0");
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // The instance on server `next` joins; the one on `current` leaves.
        let (current, next) = (round % 3, (round + 1) % 3);
        std::thread::sleep(pause());
        let began = Instant::now();
        etcd.put_instance("echo", &format!("i{next}"), "v1", &[&grpc.url(next)], None);
        client
            .until("echo", &format!("s{next}"))
            .expect("the new instance never answered");
        added.push(began.elapsed());
        std::thread::sleep(pause());
        let began = Instant::now();
        etcd.delete(&format!("/microservices/echo/i{current}"));
        // Gone once 20 calls in a row miss it (round robin over two would hit it
        // every other call).
        client.call_until(
            "echo",
            20,
            Duration::from_secs(30),
            "the old instance to go",
            |calls| !calls.ok.contains_key(&format!("s{current}")) && calls.errors.is_empty(),
        );
        removed.push(began.elapsed());
    }
    println!("== xDS, etcd → grpcio client (Python grpcio, xds:///echo)");
    report("instance put in etcd → first call on it", added);
    report(
        "instance deleted from etcd → 20 calls in a row miss it (includes the 20 calls)",
        removed,
    );
    drop(client);

    // B. fan-out to 100 streams.
    let runtime = wasd_tests::runtime();
    let times = runtime.block_on(fan_out(&etcd, &grpc, &xds, rounds));
    println!("== xDS fan-out: {STREAMS} ADS streams (a connection each) following echo");
    report("etcd write → every stream has the new assignment", times);
}

async fn fan_out(etcd: &EtcdServer, grpc: &GrpcServers, xds: &str, rounds: usize) -> Vec<Duration> {
    let (received_tx, mut received) = mpsc::unbounded_channel::<(usize, Instant)>();
    let received_tx = Arc::new(received_tx);
    for stream in 0..STREAMS {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}"))
            .await
            .unwrap();
        let (requests, outgoing) = mpsc::channel(4);
        requests
            .send(DiscoveryRequest {
                resource_names: vec!["echo".into()],
                type_url: ENDPOINTS.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut responses = client
            .stream_aggregated_resources(ReceiverStream::new(outgoing))
            .await
            .unwrap()
            .into_inner();
        let received_tx = Arc::clone(&received_tx);
        tokio::spawn(async move {
            let _client = client;
            while let Ok(Some(response)) = responses.message().await {
                let _ = received_tx.send((stream, Instant::now()));
                let ack = DiscoveryRequest {
                    version_info: response.version_info,
                    resource_names: vec!["echo".into()],
                    type_url: ENDPOINTS.into(),
                    response_nonce: response.nonce,
                    ..Default::default()
                };
                if requests.send(ack).await.is_err() {
                    break;
                }
            }
        });
    }
    // Every stream's first assignment.
    for _ in 0..STREAMS {
        received.recv().await.unwrap();
    }
    let mut times = Vec::new();
    for round in 0..rounds {
        tokio::time::sleep(pause()).await;
        let began = Instant::now();
        if round % 2 == 0 {
            etcd.put_instance("echo", "fan", "v1", &[&grpc.url(2)], None);
        } else {
            etcd.delete("/microservices/echo/fan");
        }
        let mut seen = [false; STREAMS];
        let mut last = began;
        while seen.iter().any(|s| !s) {
            let (stream, at) = tokio::time::timeout(Duration::from_secs(30), received.recv())
                .await
                .expect("every stream within 30 s")
                .unwrap();
            seen[stream] = true;
            last = last.max(at);
        }
        times.push(last - began);
    }
    times
}
