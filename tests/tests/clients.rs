//! The client integrations end to end: reqwest (`wasd::http`) and tonic (`wasd::grpc`)
//! calling real axum and tonic-health servers discovered through the config provider,
//! DNS SRV (dnsmasq) and etcd registration.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use wasd::http::{ClientWithMiddleware, Discovery, DnsResolver, reqwest_middleware};
use wasd::{Resolver, ServiceInstance, Strategy};
use wasd_tests::servers::{Instances, TlsServer};
use wasd_tests::{DnsServer, EtcdServer, Sandbox, TlsFiles};

/// A config provider serving `service` from an appsettings.json the test rewrites.
async fn configured(service: &str, section: &str, urls: &[String]) -> (Sandbox, Resolver) {
    crypto_provider();
    let sandbox = Sandbox::new();
    sandbox.write_services(service, section, urls);
    let resolver = sandbox.config_resolver().await;
    (sandbox, resolver)
}

/// The tests' reqwest has TLS without a built-in crypto provider: ring, as the host.
fn crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A dead instance: a port bound (so no other test takes it) that nothing listens on,
/// which refuses connections. Keep the socket while the test runs.
fn dead(scheme: &str) -> (tokio::net::TcpSocket, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let url = format!("{scheme}://{}", socket.local_addr().unwrap());
    (socket, url)
}

async fn get(client: &ClientWithMiddleware, url: &str) -> String {
    let response = client.get(url).send().await.unwrap();
    assert!(response.status().is_success(), "{url}: {}", response.status());
    response.text().await.unwrap()
}

fn hits(instances: &Instances) -> HashMap<String, usize> {
    instances.hits().into_iter().collect()
}

#[tokio::test]
async fn http_requests_spread_per_strategy() {
    let catalog = Instances::http("catalog", 3).await;
    let (_sandbox, r) = configured("catalog", "http", &catalog.urls("http")).await;
    let spread = |counts: &HashMap<String, usize>, at_least: usize| {
        counts.values().all(|&n| n >= at_least) && counts.len() == 3
    };
    for strategy in [
        Strategy::RoundRobin,
        Strategy::Random,
        Strategy::PowerOfTwoChoices,
        Strategy::PickFirst,
    ] {
        catalog.reset();
        let client = Discovery::builder(&r)
            .strategy(strategy)
            .build()
            .client()
            .unwrap();
        for _ in 0..60 {
            // No https endpoint: the preference falls back to http; the path and query
            // string travel to the endpoint.
            let body = get(&client, "https+http://catalog/api/items?page=2").await;
            assert!(body.ends_with(" /api/items?page=2"), "{body}");
        }
        let counts = hits(&catalog);
        match strategy {
            Strategy::RoundRobin => assert!(counts.values().all(|&n| n == 20), "{counts:?}"),
            // 60 picks, each instance with probability 1/3: fewer than 5 is ~1e-4.
            Strategy::Random | Strategy::PowerOfTwoChoices => assert!(spread(&counts, 5), "{counts:?}"),
            Strategy::PickFirst => assert_eq!(counts["catalog-1"], 60, "{counts:?}"),
            _ => unreachable!(),
        }
    }
}

#[tokio::test]
async fn power_of_two_choices_avoids_a_slow_instance() {
    // Two instances, one of them busy with a request that hangs: p2c sends new
    // requests to the other.
    let catalog = Instances::http("catalog", 2).await;
    let slow = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_url = format!("http://{}", slow.local_addr().unwrap());
    // Accepts connections, says so, and never answers.
    let (accepted, mut accepts) = tokio::sync::mpsc::unbounded_channel();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = slow.accept().await {
            held.push(stream);
            let _ = accepted.send(());
        }
    });
    let urls = vec![slow_url, catalog.urls("http")[0].clone()];
    let (_sandbox, r) = configured("catalog", "http", &urls).await;
    let client = Discovery::builder(&r)
        .strategy(Strategy::PowerOfTwoChoices)
        .build()
        .client_with(reqwest::Client::builder().timeout(Duration::from_secs(30)))
        .unwrap();
    // Send until a request is parked on the slow instance (p2c picks it at first as
    // often as the other: both idle).
    let mut parked = None;
    for _ in 0..100 {
        let c = client.clone();
        let mut request = tokio::spawn(async move { c.get("http://catalog/x").send().await });
        tokio::select! {
            _ = accepts.recv() => {
                parked = Some(request);
                break;
            }
            answered = &mut request => {
                answered.unwrap().unwrap();
            }
        }
    }
    let parked = parked.expect("p2c never sent to the slow instance");
    catalog.reset();
    for _ in 0..40 {
        get(&client, "http://catalog/x").await;
    }
    // With one request outstanding on the slow instance, every pick compares it with
    // the idle one and takes the idle one (round-robin would send it half of them).
    assert_eq!(hits(&catalog)["catalog-1"], 40);
    parked.abort();
}
#[tokio::test]
async fn removed_instance_stops_receiving_traffic_after_one_change() {
    let catalog = Instances::http("catalog", 3).await;
    let urls = catalog.urls("http");
    let (sandbox, r) = configured("catalog", "http", &urls).await;
    let client = r.http_client().unwrap();
    for _ in 0..6 {
        get(&client, "https+http://catalog/").await;
    }
    assert_eq!(hits(&catalog)["catalog-3"], 2);

    let mut watch = r.watch("https+http://catalog").await.unwrap();
    sandbox.write_services("catalog", "http", &urls[..2]);
    let set = tokio::time::timeout(Duration::from_secs(10), watch.changed())
        .await
        .expect("the change is seen")
        .unwrap();
    assert_eq!(set.len(), 2);
    // No waiting: the balancer looks at the query's set on each pick.
    catalog.reset();
    for _ in 0..30 {
        get(&client, "https+http://catalog/").await;
    }
    let counts = hits(&catalog);
    assert_eq!(counts["catalog-3"], 0, "{counts:?}");
    assert_eq!(counts["catalog-1"] + counts["catalog-2"], 30);
}

#[tokio::test]
async fn dead_instance_is_skipped() {
    let catalog = Instances::http("catalog", 2).await;
    let (_dead, dead_url) = dead("http");
    let mut urls = vec![dead_url];
    urls.extend(catalog.urls("http"));
    let (_sandbox, r) = configured("catalog", "http", &urls).await;

    // Without retries, the requests that pick the dead instance fail...
    let once = Discovery::builder(&r).attempts(1).build().client().unwrap();
    let mut failed = 0;
    for _ in 0..3 {
        if once.get("http://catalog/").send().await.is_err() {
            failed += 1;
        }
    }
    assert_eq!(failed, 1, "round-robin picks the dead instance once in three");

    // ...with the default, each goes on to the next endpoint, and the dead one is left
    // out of later picks.
    let client = r.http_client().unwrap();
    for _ in 0..30 {
        get(&client, "http://catalog/").await;
    }
    let counts = hits(&catalog);
    assert_eq!(counts.values().sum::<usize>(), 32, "{counts:?}");
    assert!(counts.values().all(|&n| n >= 14), "{counts:?}");
}

#[tokio::test]
async fn endpoint_path_prefix_and_name_resolution() {
    let catalog = Instances::http("catalog", 1).await;
    let url = &catalog.urls("http")[0];
    let (_sandbox, r) = configured("catalog", "http", &[format!("{url}/base/")]).await;
    let client = r.http_client().unwrap();
    assert_eq!(
        get(&client, "http://catalog/items").await,
        "catalog-1 /base/items"
    );

    // Name resolution only: the URL keeps its scheme and port, the host is looked up
    // through wasd.
    let port = url.rsplit(':').next().unwrap();
    let plain = reqwest::Client::builder()
        .dns_resolver(DnsResolver::new(&r))
        .build()
        .unwrap();
    let body = plain
        .get(format!("http://catalog:{port}/items"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "catalog-1 /items");

    // Unknown services fail with the resolver's error, not a connection attempt.
    let err = client.get("http://nowhere/").send().await.unwrap_err();
    assert!(
        err.to_string().contains("no endpoints for service 'nowhere'"),
        "{err}"
    );
}

#[tokio::test]
async fn https_preferred_and_called_by_the_srv_target_name() {
    let tls = TlsFiles::generate_for(&["shop-1.cluster.local"]);
    let secure = TlsServer::start(&tls).await;
    let plain = Instances::http("plain", 1).await;
    let plain_port = plain.urls("http")[0].rsplit(':').next().unwrap().to_owned();
    let records = [
        format!(
            "--srv-host=_https._tcp.shop.cluster.local,shop-1.cluster.local,{},0,0",
            secure.address.port()
        ),
        format!("--srv-host=_http._tcp.shop.cluster.local,shop-2.cluster.local,{plain_port},0,0"),
        "--host-record=shop-1.cluster.local,127.0.0.1".to_owned(),
        "--host-record=shop-2.cluster.local,127.0.0.1".to_owned(),
    ];
    let records: Vec<&str> = records.iter().map(String::as_str).collect();
    let dns = DnsServer::start(30, &records);
    let sandbox = Sandbox::new();
    let toml = format!(
        r#"
pass-through = false
[dns]
servers = ["{}"]
[[provider]]
builtin = "dns-srv"
settings = {{ suffix = "cluster.local", scheme-form = true }}
grants = {{ dns = ["cluster.local"] }}
"#,
        dns.address()
    );
    let r = sandbox.resolver(&toml).await.unwrap();
    crypto_provider();

    // The endpoint is 127.0.0.1 with host-name shop-1.cluster.local, a name the system
    // cannot resolve: the client connects to the address and verifies the name.
    let client = Discovery::new(&r)
        .client_with(reqwest::Client::builder().tls_backend_preconfigured(tls_config(&tls)))
        .unwrap();
    let port = secure.address.port();
    for _ in 0..3 {
        assert_eq!(
            get(&client, "https+http://shop/hello").await,
            format!("sni=shop-1.cluster.local host=shop-1.cluster.local:{port}")
        );
    }
    // Plain http asked for: the http endpoint.
    assert_eq!(get(&client, "http://shop/hello").await, "plain-1 /hello");

    // In a middleware stack of one's own (no pinning resolver), the address is called
    // (the certificate also names 127.0.0.1) and the Host header names the target.
    let own = reqwest::Client::builder()
        .tls_backend_preconfigured(tls_config(&tls))
        .build()
        .unwrap();
    let stacked = reqwest_middleware::ClientBuilder::new(own)
        .with(Discovery::new(&r))
        .build();
    assert_eq!(
        get(&stacked, "https://shop/hello").await,
        format!("sni=- host=shop-1.cluster.local:{port}")
    );
}

/// A rustls client config trusting the test CA.
fn tls_config(tls: &TlsFiles) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile(&std::fs::read(&tls.ca).unwrap()) {
        roots.add(cert).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

fn rustls_pemfile(pem: &[u8]) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Health checks through `channel`, counted by the instance that answered.
async fn health_checks(channel: &tonic::transport::Channel, n: usize) -> HashMap<String, usize> {
    let mut client = HealthClient::new(channel.clone());
    let mut counts = HashMap::new();
    for _ in 0..n {
        let response = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        let instance = response.metadata().get("x-instance").unwrap().to_str().unwrap();
        *counts.entry(instance.to_owned()).or_default() += 1;
    }
    counts
}

/// Wait (at most 1 s) until calls stop reaching `instance`: the channel takes up a
/// change on its own tasks, just after the watch event.
async fn until_gone(channel: &tonic::transport::Channel, instance: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    // 20 calls miss a live one of three instances by chance once in ~3 000.
    while health_checks(channel, 20).await.contains_key(instance) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{instance} still gets calls"
        );
    }
}

#[tokio::test]
async fn grpc_channel_spreads_and_follows_changes() {
    let greeter = Instances::grpc("greeter", 3).await;
    let urls = greeter.urls("grpc");
    let (sandbox, r) = configured("greeter", "grpc", &urls).await;
    let channel = r.grpc_channel("discovery:///greeter").await.unwrap();
    let counts = health_checks(&channel, 60).await;
    assert!(
        counts.len() == 3 && counts.values().all(|&n| n >= 5),
        "{counts:?}"
    );

    let mut watch = r.watch("grpc://greeter").await.unwrap();
    sandbox.write_services("greeter", "grpc", &urls[1..]);
    tokio::time::timeout(Duration::from_secs(10), watch.changed())
        .await
        .expect("the change is seen")
        .unwrap();
    until_gone(&channel, "greeter-1").await;
    let counts = health_checks(&channel, 30).await;
    assert!(!counts.contains_key("greeter-1"), "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 30);

    // Every endpoint gone (a registry briefly empty): the channel keeps the last ones.
    sandbox.write_services("greeter", "grpc", &[] as &[&str]);
    let set = tokio::time::timeout(Duration::from_secs(10), watch.changed())
        .await
        .expect("the change is seen")
        .unwrap();
    assert!(set.is_empty(), "{set:?}");
    // An emptied channel would hold calls rather than fail them.
    let counts = tokio::time::timeout(Duration::from_secs(10), health_checks(&channel, 10))
        .await
        .expect("the channel still answers");
    assert_eq!(counts.values().sum::<usize>(), 10, "{counts:?}");
}

#[tokio::test]
async fn grpc_dead_instance_is_skipped() {
    let greeter = Instances::grpc("greeter", 2).await;
    let (_dead, dead_url) = dead("grpc");
    let mut urls = vec![dead_url];
    urls.extend(greeter.urls("grpc"));
    let (_sandbox, r) = configured("greeter", "grpc", &urls).await;
    let channel = r.grpc_channel("discovery:///greeter").await.unwrap();
    let counts = health_checks(&channel, 30).await;
    assert_eq!(counts.values().sum::<usize>(), 30, "{counts:?}");
}

#[tokio::test]
async fn grpc_instance_that_stops_leaves_and_one_that_starts_joins() {
    let mut greeter = Instances::grpc("greeter", 2).await;
    let (late_socket, late_url) = dead("grpc");
    let late = late_socket.local_addr().unwrap();
    let mut urls = greeter.urls("grpc");
    urls.push(late_url);
    let (_sandbox, r) = configured("greeter", "grpc", &urls).await;
    let channel = r
        .grpc_channel_builder("discovery:///greeter")
        .health_interval(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    // Nothing listens at `late` yet: every call succeeds on the other two.
    let counts = health_checks(&channel, 20).await;
    assert_eq!(counts.values().sum::<usize>(), 20, "{counts:?}");

    // greeter-1 shuts down: within a check or two (100 ms each) it is out. Until then
    // a call that tonic's balancer sends its way fails with the connect error (tonic
    // reconnects on the call; the channel does not resend it elsewhere), and only
    // such calls fail.
    let stopped = greeter.urls("grpc")[0].trim_start_matches("grpc://").to_owned();
    greeter.stop(0).await;
    let stopped_at = tokio::time::Instant::now();
    let mut client = HealthClient::new(channel.clone());
    let mut failed = 0;
    let mut in_a_row_on_greeter_2 = 0;
    while in_a_row_on_greeter_2 < 20 {
        assert!(
            stopped_at.elapsed() < Duration::from_secs(2),
            "greeter-1 still picked after 2 s ({failed} calls failed)"
        );
        match client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
        {
            Ok(response) => {
                let instance = response.metadata().get("x-instance").unwrap().to_str().unwrap();
                assert_eq!(instance, "greeter-2");
                in_a_row_on_greeter_2 += 1;
            }
            Err(status) => {
                let text = format!("{status:?}");
                assert!(
                    text.contains("ConnectionRefused") && text.contains(&stopped),
                    "a failure other than greeter-1's connect error: {text}"
                );
                failed += 1;
                in_a_row_on_greeter_2 = 0;
            }
        }
    }
    eprintln!(
        "greeter-1 out {:?} after it stopped; {failed} calls failed meanwhile",
        stopped_at.elapsed()
    );

    // An instance starts at `late`: it is checked again (with back-off) and joins.
    drop(late_socket);
    let _late = Instances::grpc_at("greeter-late", late).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if health_checks(&channel, 10).await.contains_key("greeter-late") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the late instance never joined"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn grpc_channel_refuses_a_target_without_usable_endpoints() {
    let (_sandbox, r) = configured("greeter", "ftp", &["ftp://127.0.0.1:21".to_owned()]).await;
    let err = r.grpc_channel("ftp://greeter").await.unwrap_err();
    assert!(err.to_string().contains("not ftp"), "{err}");
}

#[tokio::test]
async fn grpc_and_http_through_etcd_registration() {
    let etcd = EtcdServer::start();
    let greeter = Instances::grpc("greeter", 2).await;
    let catalog = Instances::http("catalog", 2).await;
    let sandbox = Sandbox::new();
    let url = etcd.url();
    let toml = format!(
        r#"
pass-through = false
[[provider]]
builtin = "etcd"
settings = {{ endpoints = ["{url}"], timeout = "2s" }}
grants = {{ http = ["{url}"] }}
limits = {{ timeout = "5s" }}
"#
    );
    let r = sandbox.resolver(&toml).await.unwrap();
    crypto_provider();
    // Kratos-style: each instance registers its endpoints under its own key and lease.
    let mut registrations = Vec::new();
    for (i, (grpc, http)) in greeter
        .urls("grpc")
        .into_iter()
        .zip(catalog.urls("http"))
        .enumerate()
    {
        registrations.push(r.register(ServiceInstance::new("greeter", [grpc])).await.unwrap());
        let mut instance = ServiceInstance::new("catalog", [http]);
        instance.version = format!("v{}", i + 1);
        registrations.push(r.register(instance).await.unwrap());
    }
    for registration in &mut registrations {
        registration.registered().await.unwrap();
    }

    let channel = r.grpc_channel("discovery:///greeter").await.unwrap();
    let counts = health_checks(&channel, 40).await;
    assert!(
        counts.len() == 2 && counts.values().all(|&n| n >= 5),
        "{counts:?}"
    );

    let client = r.http_client().unwrap();
    for _ in 0..10 {
        get(&client, "http://catalog/").await;
    }
    assert_eq!(
        hits(&catalog),
        HashMap::from([("catalog-1".into(), 5), ("catalog-2".into(), 5)])
    );
    // Kratos's filter.Version("v2"), at pick time.
    catalog.reset();
    let v2 = Discovery::builder(&r).version("v2").build().client().unwrap();
    for _ in 0..10 {
        get(&v2, "http://catalog/").await;
    }
    assert_eq!(hits(&catalog)["catalog-2"], 10);

    // The first greeter deregisters: once etcd's watch says so, it gets no more calls.
    let mut watch = r.watch("grpc://greeter").await.unwrap();
    registrations.remove(0).deregister().await.unwrap();
    loop {
        let set = tokio::time::timeout(Duration::from_secs(10), watch.changed())
            .await
            .expect("the deregistration is seen")
            .unwrap();
        if set.len() == 1 {
            break;
        }
    }
    until_gone(&channel, "greeter-1").await;
    let counts = health_checks(&channel, 20).await;
    assert_eq!(counts.get("greeter-2"), Some(&20), "{counts:?}");
}
