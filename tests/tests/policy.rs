//! Endpoint policy against real servers: weighted round-robin from `weight` metadata,
//! consistent hashing through a live change, zone preference and its fallback, active
//! HTTP / gRPC / TCP checks against servers whose health flips, outlier ejection from
//! 5xx answers through reqwest within the ejection cap, gRPC calls through wasd's
//! balanced channel counted against the endpoint they went to, request keys through
//! both clients, policies reloaded with the config, and `wasd pick`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use wasd::grpc::BalancedChannel;
use wasd::{Health, HealthCheck, PickKey, Resolver, Strategy, Subset};
use wasd_tests::servers::Instances;
use wasd_tests::{Sandbox, eventually};

const WAIT: Duration = Duration::from_secs(10);

fn counts(picks: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for p in picks {
        *counts.entry(p).or_default() += 1;
    }
    counts
}

/// A `wasd.toml` whose provider is the example table provider serving `hello` with
/// these endpoints (`{ host = ..., port = ..., metadata = {...} }` each), then `extra`.
fn table_config(endpoints: &[&str], extra: &str) -> String {
    let module = wasd_tests::example_provider("rust");
    format!(
        r#"
pass-through = false
refresh-period = "1s"
{extra}
[[provider]]
name = "table"
module = {module:?}
settings = {{ services = {{ hello = [ {} ] }} }}
"#,
        endpoints.join(", "),
        module = module.display().to_string(),
    )
}

fn endpoint(host: &str, metadata: &str) -> String {
    format!(r#"{{ host = "{host}", port = 80, scheme = "http", metadata = {{ {metadata} }} }}"#)
}

/// A config provider serving `service` from `urls` under `section` (rewritten by
/// `Sandbox::write_services`), then `extra` (a `[[policy]]`, say).
async fn served(sandbox: &Sandbox, service: &str, section: &str, urls: &[String], extra: &str) -> Resolver {
    sandbox.write_services(service, section, urls);
    let toml = format!(
        "pass-through = false\nrefresh-period = \"1s\"\n[[provider]]\nbuiltin = \"config\"\n\
         grants = {{ files = [\"{}\"] }}\n{extra}\n",
        sandbox.path().join("appsettings.json").display()
    );
    sandbox.resolver(&toml).await.unwrap()
}

/// `web`'s HTTP endpoints from `urls`, with a `[[policy]]` for it.
async fn web(sandbox: &Sandbox, urls: &[String], policy: &str) -> Resolver {
    let policy = format!("[[policy]]\nservice = \"web\"\n{policy}");
    served(sandbox, "web", "http", urls, &policy).await
}

/// `greeter`'s gRPC endpoints from `urls`, then `extra`.
async fn greeter(sandbox: &Sandbox, urls: &[String], extra: &str) -> Resolver {
    served(sandbox, "greeter", "grpc", urls, extra).await
}

#[tokio::test(flavor = "multi_thread")]
async fn weighted_round_robin_follows_the_weight_metadata_smoothly() {
    let sandbox = Sandbox::new();
    let endpoints = [
        endpoint("10.0.0.1", r#"weight = "3""#),
        endpoint("10.0.0.2", r#"weight = "1""#),
        endpoint("10.0.0.3", ""),
    ];
    let refs: Vec<&str> = endpoints.iter().map(String::as_str).collect();
    let policy = "[[policy]]\nservice = \"hello\"\nstrategy = \"weighted-round-robin\"\n";
    let resolver = sandbox.resolver(&table_config(&refs, policy)).await.unwrap();
    // The configured policy, not the builder's default.
    let balancer = resolver.balancer("http://hello").await.unwrap();
    assert_eq!(balancer.strategy(), Strategy::WeightedRoundRobin);
    let picks: Vec<String> = (0..500).map(|_| balancer.pick().endpoint().to_string()).collect();
    // 100 cycles of five: exactly 3:1:1.
    let c = counts(picks.clone());
    assert_eq!(c.values().copied().collect::<Vec<_>>(), [300, 100, 100], "{c:?}");
    // Smooth: every cycle of five has each endpoint its share, and the heavy one never
    // three times in a row.
    for cycle in picks.chunks(5) {
        let c = counts(cycle.iter().cloned());
        assert_eq!(c.values().copied().collect::<Vec<_>>(), [3, 1, 1], "{cycle:?}");
    }
    assert!(
        !picks
            .windows(3)
            .any(|w| w.iter().all(|p| p == "http://10.0.0.1:80")),
        "{:?}",
        &picks[..10]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn consistent_hashing_moves_only_the_keys_of_an_endpoint_that_leaves() {
    let sandbox = Sandbox::new();
    let urls: Vec<String> = (1..=10).map(|i| format!("http://10.0.0.{i}:80")).collect();
    let resolver = web(&sandbox, &urls, "strategy = \"consistent-hash\"").await;
    let balancer = resolver.balancer("http://web").await.unwrap();
    let keys: Vec<String> = (0..5000).map(|k| format!("user-{k}")).collect();
    let owners = |balancer: &wasd::Balancer| -> Vec<String> {
        keys.iter()
            .map(|k| balancer.pick_key(k).endpoint().to_string())
            .collect()
    };
    let before = owners(&balancer);
    // Sticky: the same key, the same endpoint.
    assert_eq!(before, owners(&balancer));
    let spread = counts(before.clone());
    assert_eq!(spread.len(), 10, "{spread:?}");
    // One of ten leaves (a live change through the provider).
    let gone = "http://10.0.0.4:80";
    let fewer: Vec<String> = urls.iter().filter(|u| *u != gone).cloned().collect();
    sandbox.write_services("web", "http", &fewer);
    eventually(WAIT, "the balancer never saw the endpoint leave", || {
        balancer.endpoints().len() == 9
    })
    .await;
    let after = owners(&balancer);
    let moved: Vec<(&String, &String)> = before.iter().zip(&after).filter(|(b, a)| b != a).collect();
    // Only its keys moved, and they were about a tenth.
    assert!(
        moved.iter().all(|(b, _)| *b == gone),
        "{:?}",
        &moved[..5.min(moved.len())]
    );
    assert_eq!(moved.len(), spread[gone]);
    assert!(
        (300..=700).contains(&moved.len()),
        "{} of 5000 keys moved",
        moved.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_callers_zone_is_preferred_until_too_few_of_it_are_healthy() {
    let sandbox = Sandbox::new();
    let endpoints = [
        endpoint("10.0.0.1", r#"zone = "a""#),
        endpoint("10.0.0.2", r#"zone = "a""#),
        endpoint("10.0.0.3", r#"zone = "b""#),
        endpoint("10.0.0.4", r#"zone = "b""#),
    ];
    let refs: Vec<&str> = endpoints.iter().map(String::as_str).collect();
    // The process's zone from the config's top level; the policy's ejection is long
    // enough not to end during the test, then short for the return.
    let extra = "zone = \"a\"\n[[policy]]\nservice = \"*\"\nzone-min-healthy = 0.5\n\
                 outlier = { base-ejection = \"1h\" }\n";
    let resolver = sandbox.resolver(&table_config(&refs, extra)).await.unwrap();
    let balancer = resolver.balancer("http://hello").await.unwrap();
    assert_eq!(balancer.policy().zone.as_deref(), Some("a"));
    let picks = || counts((0..100).map(|_| balancer.pick().endpoint().to_string()));
    assert_eq!(
        picks().keys().collect::<Vec<_>>(),
        ["http://10.0.0.1:80", "http://10.0.0.2:80"]
    );
    let fail = |host: &str| {
        for _ in 0..8 {
            let picked = balancer.pick();
            if picked.endpoint().host() == host {
                picked.failed();
                return;
            }
        }
        panic!("{host} was never picked");
    };
    // Half the zone healthy is enough (0.5): picks stay in it, on the healthy one.
    fail("10.0.0.1");
    assert_eq!(picks().keys().collect::<Vec<_>>(), ["http://10.0.0.2:80"]);
    // None healthy: every zone, which here means zone b's (the ejected stay out).
    fail("10.0.0.2");
    assert_eq!(
        picks().keys().collect::<Vec<_>>(),
        ["http://10.0.0.3:80", "http://10.0.0.4:80"]
    );
    let health: HashMap<String, Health> = balancer
        .health()
        .into_iter()
        .map(|(e, h)| (e.host().to_owned(), h))
        .collect();
    assert!(matches!(health["10.0.0.1"], Health::Ejected { .. }), "{health:?}");
    assert_eq!(health["10.0.0.3"], Health::Healthy);

    // A zone that came back is preferred again: a balancer with short ejections.
    let quick = resolver
        .balancer_builder("http://hello")
        .ejection(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    // The health table is the resolver's: the new balancer sees the ejections too.
    assert!(
        !quick
            .health()
            .iter()
            .any(|(e, h)| e.host() == "10.0.0.2" && h.is_usable())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn zone_traffic_returns_when_the_zones_endpoints_come_back() {
    let sandbox = Sandbox::new();
    let endpoints = [
        endpoint("10.0.0.1", r#"zone = "a""#),
        endpoint("10.0.0.2", r#"zone = "b""#),
    ];
    let refs: Vec<&str> = endpoints.iter().map(String::as_str).collect();
    let resolver = sandbox.resolver(&table_config(&refs, "")).await.unwrap();
    let balancer = resolver
        .balancer_builder("http://hello")
        .zone("a")
        .ejection(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let first = balancer.pick();
    assert_eq!(first.endpoint().host(), "10.0.0.1");
    first.failed();
    drop(first);
    assert_eq!(balancer.pick().endpoint().host(), "10.0.0.2");
    // After its 300 ms ejection the zone's endpoint is preferred again, with no health
    // change announced (the zone decision knows when the ejection ends).
    eventually(WAIT, "zone a never came back", || {
        balancer.pick().endpoint().host() == "10.0.0.1"
    })
    .await;
    let back = counts((0..20).map(|_| balancer.pick().endpoint().to_string()));
    assert_eq!(back.keys().collect::<Vec<_>>(), ["http://10.0.0.1:80"]);
}

/// `count` HTTP servers for `web` under a `[[policy]]`, and a balancer over them whose
/// active checks (if any) have answered once.
struct Web {
    servers: Instances,
    urls: Vec<String>,
    resolver: Resolver,
    balancer: wasd::Balancer,
    _sandbox: Sandbox,
}

async fn checked_web(count: usize, policy: &str) -> Web {
    let servers = Instances::http("web", count).await;
    let urls = servers.urls("http");
    let sandbox = Sandbox::new();
    let resolver = web(&sandbox, &urls, policy).await;
    let balancer = resolver.balancer("http://web").await.unwrap();
    balancer.checked(WAIT).await;
    Web {
        servers,
        urls,
        resolver,
        balancer,
        _sandbox: sandbox,
    }
}

/// Wait (at most [`WAIT`]) until endpoint `index` of `balancer` is in `state`.
async fn until_health(balancer: &wasd::Balancer, index: usize, state: Health) {
    eventually(WAIT, &format!("endpoint {index} never became {state}"), || {
        balancer.health()[index].1 == state
    })
    .await;
}

/// Picks of `balancer`, 300 of them, counted by endpoint.
fn spread(balancer: &wasd::Balancer) -> BTreeMap<String, usize> {
    counts((0..300).map(|_| balancer.pick().endpoint().to_string()))
}

#[tokio::test(flavor = "multi_thread")]
async fn active_http_checks_leave_out_a_failing_healthz_and_take_it_back() {
    let Web {
        servers,
        urls,
        balancer,
        ..
    } = checked_web(
        3,
        "health = { http = \"/healthz\", interval = \"50ms\", timeout = \"500ms\", healthy-threshold = 2, unhealthy-threshold = 2 }",
    )
    .await;
    assert!(
        balancer.health().iter().all(|(_, h)| *h == Health::Healthy),
        "{:?}",
        balancer.health()
    );
    assert_eq!(spread(&balancer).len(), 3);

    servers.set_healthy(1, false).await;
    until_health(&balancer, 1, Health::Unhealthy).await;
    let picks = spread(&balancer);
    assert!(!picks.contains_key(&urls[1]), "{picks:?}");
    assert_eq!(picks.len(), 2);

    servers.set_healthy(1, true).await;
    until_health(&balancer, 1, Health::Healthy).await;
    assert_eq!(spread(&balancer).len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_health_checks_follow_serving_and_not_serving() {
    let servers = Instances::grpc("greeter", 2).await;
    let urls = servers.urls("grpc");
    let sandbox = Sandbox::new();
    sandbox.write_services("greeter", "grpc", &urls);
    let toml = format!(
        "pass-through = false\n[[provider]]\nbuiltin = \"config\"\ngrants = {{ files = [\"{}\"] }}\n",
        sandbox.path().join("appsettings.json").display()
    );
    let resolver = sandbox.resolver(&toml).await.unwrap();
    let balancer = resolver
        .balancer_builder("grpc://greeter")
        .health_check(
            HealthCheck::grpc("")
                .with_interval(Duration::from_millis(50))
                .with_thresholds(1, 1),
        )
        .build()
        .await
        .unwrap();
    balancer.checked(WAIT).await;
    assert_eq!(spread(&balancer).len(), 2);
    servers.set_healthy(0, false).await;
    until_health(&balancer, 0, Health::Unhealthy).await;
    let picks = spread(&balancer);
    assert_eq!(picks.keys().collect::<Vec<_>>(), [&urls[1]], "{picks:?}");

    // The gRPC channel leaves it out too: calls go to greeter-2 only.
    let channel = resolver
        .grpc_channel_builder("discovery:///greeter")
        .health_interval(Duration::from_millis(100))
        .health_check(
            HealthCheck::grpc("")
                .with_interval(Duration::from_millis(50))
                .with_thresholds(1, 1),
        )
        .build()
        .await
        .unwrap();
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut answered_by = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    // Until twenty calls in a row went to greeter-2 (the channel takes greeter-1 out
    // at its next reachability check).
    while answered_by.len() < 20
        || answered_by[answered_by.len() - 20..]
            .iter()
            .any(|n| n != "greeter-2")
    {
        assert!(tokio::time::Instant::now() < deadline, "{answered_by:?}");
        let response = client
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        let name = response
            .metadata()
            .get("x-instance")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        answered_by.push(name);
    }
    servers.set_healthy(0, true).await;
    until_health(&balancer, 0, Health::Healthy).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_checks_leave_out_a_server_that_stops_accepting() {
    let Web {
        mut servers,
        urls,
        balancer,
        ..
    } = checked_web(
        2,
        "health = { tcp = true, interval = \"50ms\", unhealthy-threshold = 1 }",
    )
    .await;
    assert_eq!(spread(&balancer).len(), 2);
    servers.stop(0).await;
    until_health(&balancer, 0, Health::Unhealthy).await;
    assert_eq!(spread(&balancer).keys().collect::<Vec<_>>(), [&urls[1]]);
    // Every endpoint failing its checks: picks use them all rather than none.
    servers.stop(1).await;
    eventually(WAIT, "the second server was never found unhealthy", || {
        balancer.health().iter().all(|(_, h)| *h == Health::Unhealthy)
    })
    .await;
    assert_eq!(spread(&balancer).len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn five_hundreds_through_reqwest_eject_within_the_cap() {
    // reqwest has TLS without a crypto provider in these tests: choose ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Web {
        servers, resolver, ..
    } = checked_web(
        3,
        "outlier = { consecutive-failures = 3, base-ejection = \"1h\", max-ejection-percent = 50 }",
    )
    .await;
    // The first two answer /healthz with 503.
    servers.set_healthy(0, false).await;
    servers.set_healthy(1, false).await;
    let client = resolver.http_client().unwrap();
    let mut statuses = Vec::new();
    for _ in 0..30 {
        let response = client.get("http://web/healthz").send().await.unwrap();
        statuses.push(response.status().as_u16());
    }
    // web-1 failed three times in a row and is out; web-2 failed as often but ejecting
    // it too would leave out two of three (more than 50 %): it stays in. The health
    // table is the resolver's, so another balancer sees the same.
    let health = resolver.balancer("http://web").await.unwrap().health();
    assert!(matches!(health[0].1, Health::Ejected { .. }), "{health:?}");
    assert_eq!(health[1].1, Health::Healthy, "{health:?}");
    assert_eq!(health[2].1, Health::Healthy, "{health:?}");
    // Once web-1 was out, requests went only to web-2 (503) and web-3 (200).
    let tail = &statuses[12..];
    assert!(tail.contains(&200) && tail.contains(&503), "{statuses:?}");
    let ejections = servers.hits();
    assert_eq!(ejections[0].1, 0, "health checks are not hits: {ejections:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_policy_applies_to_live_balancers_on_reload() {
    let sandbox = Sandbox::new();
    let refs = [endpoint("10.0.0.1", ""), endpoint("10.0.0.2", "")];
    let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
    let resolver = sandbox.resolver(&table_config(&refs, "")).await.unwrap();
    let balancer = resolver.balancer("http://hello").await.unwrap();
    assert_eq!(balancer.strategy(), Strategy::RoundRobin);
    assert_eq!(spread(&balancer).len(), 2);
    let mut reloads = resolver.reload_events();
    sandbox.write(
        "wasd.toml",
        table_config(
            &refs,
            "[[policy]]\nservice = \"hello\"\nstrategy = \"pick-first\"\n",
        ),
    );
    tokio::time::timeout(WAIT, reloads.recv())
        .await
        .expect("no reload")
        .unwrap();
    assert_eq!(balancer.strategy(), Strategy::PickFirst);
    assert_eq!(
        spread(&balancer).keys().collect::<Vec<_>>(),
        ["http://10.0.0.1:80"]
    );
    // A policy that does not parse leaves the last one in force.
    sandbox.write(
        "wasd.toml",
        table_config(&refs, "[[policy]]\nservice = \"hello\"\nstrategy = \"fastest\"\n"),
    );
    let report = tokio::time::timeout(WAIT, reloads.recv())
        .await
        .expect("no reload")
        .unwrap();
    assert!(
        format!("{report:?}").contains("unknown strategy 'fastest'"),
        "{report:?}"
    );
    assert_eq!(balancer.strategy(), Strategy::PickFirst);
}

#[test]
fn wasd_pick_counts_picks_by_endpoint_with_their_health() {
    let sandbox = Sandbox::new();
    let endpoints = [
        endpoint("10.0.0.1", r#"weight = "3", zone = "a""#),
        endpoint("10.0.0.2", r#"zone = "b""#),
    ];
    let refs: Vec<&str> = endpoints.iter().map(String::as_str).collect();
    sandbox.write(
        "wasd.toml",
        table_config(
            &refs,
            "[[policy]]\nservice = \"hello\"\nstrategy = \"weighted-round-robin\"\n",
        ),
    );
    let pick = |args: &[&str]| {
        let out = wasd_tests::run(sandbox.wasd().arg("pick").args(args));
        assert_eq!(out.code, 0, "{}", out.stderr);
        out.stdout
    };
    let json: serde_json::Value =
        serde_json::from_str(&pick(&["http://hello", "--count", "8", "--json"])).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "query": "http://hello",
            "strategy": "weighted-round-robin",
            "picks": [
                {"endpoint": "http://10.0.0.1:80", "count": 6, "health": "healthy"},
                {"endpoint": "http://10.0.0.2:80", "count": 2, "health": "healthy"},
            ]
        })
    );
    // The text form: one line per endpoint.
    let text = pick(&["http://hello", "--count", "4", "--strategy", "pick-first"]);
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        lines,
        [
            ["http://10.0.0.1:80", "4", "healthy"],
            ["http://10.0.0.2:80", "0", "healthy"]
        ]
    );
    // The zone flag; a key with consistent hashing always lands on one endpoint.
    let zoned: serde_json::Value =
        serde_json::from_str(&pick(&["http://hello", "--zone", "b", "--count", "5", "--json"])).unwrap();
    assert_eq!(zoned["picks"][1]["count"], 5, "{zoned}");
    // The process's zone from WASD_ZONE, as a fleet sharing one config file sets it.
    let out = wasd_tests::run(sandbox.wasd().env("WASD_ZONE", "b").args([
        "pick",
        "http://hello",
        "--count",
        "5",
        "--json",
    ]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let from_env: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(from_env["picks"][1]["count"], 5, "{from_env}");
    let keyed: serde_json::Value = serde_json::from_str(&pick(&[
        "http://hello",
        "--strategy",
        "consistent-hash",
        "--key",
        "user-7",
        "--count",
        "20",
        "--json",
    ]))
    .unwrap();
    let counts: Vec<u64> = keyed["picks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["count"].as_u64().unwrap())
        .collect();
    assert!(counts == [20, 0] || counts == [0, 20], "{keyed}");
    // A bad strategy is a one-line error.
    let out = wasd_tests::run(
        sandbox
            .wasd()
            .args(["pick", "http://hello", "--strategy", "fastest"]),
    );
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("unknown strategy 'fastest'"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn seeded_random_repeats_and_spreads_and_ewma_prefers_the_faster_endpoint() {
    let sandbox = Sandbox::new();
    let refs = [
        endpoint("10.0.0.1", ""),
        endpoint("10.0.0.2", ""),
        endpoint("10.0.0.3", ""),
    ];
    let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
    let resolver = sandbox.resolver(&table_config(&refs, "")).await.unwrap();
    let random = |seed: u64| {
        let resolver = resolver.clone();
        async move {
            let balancer = resolver
                .balancer_builder("http://hello")
                .strategy(Strategy::Random)
                .seed(seed)
                .build()
                .await
                .unwrap();
            (0..3000)
                .map(|_| balancer.pick().endpoint().host().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let seven = random(7).await;
    // The same seed, the same picks; another seed, others.
    assert_eq!(seven, random(7).await);
    assert_ne!(seven, random(8).await);
    // Uniform: 1000 expected each; 850..1150 is more than four standard deviations.
    let spread = counts(seven);
    assert!(spread.values().all(|n| (850..1150).contains(n)), "{spread:?}");

    // Latency-aware: requests to .1 take 5 ms (the scenario's latency), to .2 none.
    let ewma = resolver
        .balancer_builder("http://hello")
        .filter(|e| e.host() != "10.0.0.3")
        .strategy(Strategy::PowerOfTwoEwma)
        .build()
        .await
        .unwrap();
    let mut picks = Vec::new();
    for _ in 0..200 {
        let picked = ewma.pick();
        if picked.endpoint().host() == "10.0.0.1" {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        picked.succeeded();
        picks.push(picked.endpoint().host().to_owned());
    }
    let spread = counts(picks);
    // Each is tried once unmeasured; then the faster one wins every comparison.
    assert!(spread["10.0.0.2"] >= 195, "{spread:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn power_of_two_choices_avoids_an_endpoint_with_requests_outstanding() {
    let sandbox = Sandbox::new();
    let refs = [endpoint("10.0.0.1", ""), endpoint("10.0.0.2", "")];
    let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
    let resolver = sandbox.resolver(&table_config(&refs, "")).await.unwrap();
    let balancer = resolver
        .balancer_builder("http://hello")
        .strategy(Strategy::PowerOfTwoChoices)
        .build()
        .await
        .unwrap();
    // With two endpoints both are compared on every pick: while one has a request
    // outstanding, every other pick goes to the other.
    let held = balancer.pick();
    let busy = held.endpoint().host().to_owned();
    let while_held = counts((0..200).map(|_| balancer.pick().endpoint().host().to_owned()));
    assert_eq!(while_held.get(&busy), None, "{busy} busy: {while_held:?}");
    // Once it ends, both are even again and each wins about half the ties.
    drop(held);
    let after = counts((0..200).map(|_| balancer.pick().endpoint().host().to_owned()));
    assert!(after.values().all(|&n| n >= 60) && after.len() == 2, "{after:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn subsets_of_consecutive_clients_cover_the_endpoints_once() {
    let sandbox = Sandbox::new();
    let endpoints: Vec<String> = (1..=6).map(|i| endpoint(&format!("10.0.0.{i}"), "")).collect();
    let refs: Vec<&str> = endpoints.iter().map(String::as_str).collect();
    let resolver = sandbox.resolver(&table_config(&refs, "")).await.unwrap();
    let mut seen = Vec::new();
    for client in 3..6 {
        let balancer = resolver
            .balancer_builder("http://hello")
            .subset(Subset::new(2, client))
            .build()
            .await
            .unwrap();
        let held = balancer.endpoints();
        assert_eq!(held.len(), 2, "{held:?}");
        // Picks stay in the subset.
        let picks = counts((0..20).map(|_| balancer.pick().endpoint().to_string()));
        assert_eq!(picks.len(), 2);
        assert!(picks.keys().all(|p| held.iter().any(|e| e.to_string() == *p)));
        seen.extend(held.into_iter().map(|e| e.to_string()));
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 6, "{seen:?}");
}

/// `n` health checks through `channel` (with `key` as their pick key, if any): the
/// instances that answered, counted, and those that failed, in order.
async fn grpc_calls(
    channel: &BalancedChannel,
    n: usize,
    key: Option<&str>,
) -> (BTreeMap<String, usize>, Vec<String>) {
    let mut client = HealthClient::new(channel.clone());
    let (mut answered, mut failed) = (BTreeMap::new(), Vec::new());
    for _ in 0..n {
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        if let Some(key) = key {
            request.extensions_mut().insert(PickKey::new(key));
        }
        let instance = |metadata: &tonic::metadata::MetadataMap| {
            let name = metadata.get("x-instance").expect("the server's tag");
            name.to_str().unwrap().to_owned()
        };
        match client.check(request).await {
            Ok(response) => *answered.entry(instance(response.metadata())).or_default() += 1,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                failed.push(instance(status.metadata()));
            }
        }
    }
    (answered, failed)
}

/// What the resolver's health table says of the endpoint at `url`.
fn health_of(balancer: &wasd::Balancer, url: &str) -> Health {
    let health = balancer.health();
    let found = health.iter().find(|(e, _)| e.to_string() == url);
    found.unwrap_or_else(|| panic!("{url} not in {health:?}")).1
}

#[tokio::test(flavor = "multi_thread")]
async fn balanced_grpc_calls_count_against_the_endpoint_they_went_to() {
    let servers = Instances::grpc("greeter", 3).await;
    let urls = servers.urls("grpc");
    let sandbox = Sandbox::new();
    let resolver = greeter(&sandbox, &urls, "").await;
    let channel = resolver
        .grpc_balanced_channel("discovery:///greeter")
        .await
        .unwrap();
    // Another balancer of the query reads the same health table.
    let view = resolver.balancer("grpc://greeter").await.unwrap();
    let (answered, failed) = grpc_calls(&channel, 30, None).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert!(
        answered.len() == 3 && answered.values().all(|&n| n == 10),
        "round-robin: {answered:?}"
    );

    // greeter-1 answers UNAVAILABLE: its first call fails and ejects it (the default
    // outlier policy: at once, for 1 s); the others answer every other call.
    servers.set_unavailable(0, true);
    let (answered, failed) = grpc_calls(&channel, 30, None).await;
    assert_eq!(failed, ["greeter-1"], "answered: {answered:?}");
    assert_eq!(answered.values().sum::<usize>(), 29, "{answered:?}");
    assert!(
        matches!(health_of(&view, &urls[0]), Health::Ejected { .. }),
        "{:?}",
        view.health()
    );
    assert_eq!(health_of(&view, &urls[1]), Health::Healthy);

    // It serves again: once its ejection ends a call goes to it, succeeds, and it stays.
    servers.set_unavailable(0, false);
    eventually(WAIT, "greeter-1's ejection never ended", || {
        health_of(&view, &urls[0]) == Health::Healthy
    })
    .await;
    let (answered, failed) = grpc_calls(&channel, 6, None).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(answered.get("greeter-1"), Some(&2), "{answered:?}");
    assert_eq!(health_of(&view, &urls[0]), Health::Healthy);

    // It leaves the set: the cache stores the new set before it tells watchers, and
    // the balancer takes it up at the next pick, so no call after the change reaches it.
    let mut watch = resolver.watch("grpc://greeter").await.unwrap();
    sandbox.write_services("greeter", "grpc", &urls[1..]);
    tokio::time::timeout(WAIT, watch.changed())
        .await
        .expect("the change is seen")
        .unwrap();
    let (answered, failed) = grpc_calls(&channel, 6, None).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert!(!answered.contains_key("greeter-1"), "{answered:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn balanced_grpc_channel_passes_over_an_unreachable_endpoint_before_sending() {
    let servers = Instances::grpc("greeter", 2).await;
    // A port bound (so nothing else takes it) with nothing listening: refused.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("grpc://{}", dead.local_addr().unwrap());
    drop(dead);
    let mut urls = vec![dead_url.clone()];
    urls.extend(servers.urls("grpc"));
    let sandbox = Sandbox::new();
    let resolver = greeter(&sandbox, &urls, "").await;
    let channel = resolver
        .grpc_balanced_channel("discovery:///greeter")
        .await
        .unwrap();
    // Its turn comes first, and no call fails for it: the request waits for a
    // connection, which the next endpoint gives.
    let (answered, failed) = grpc_calls(&channel, 30, None).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(answered.values().sum::<usize>(), 30, "{answered:?}");
    assert!(
        matches!(health_of(channel.balancer(), &dead_url), Health::Ejected { .. }),
        "{:?}",
        channel.balancer().health()
    );

    // None reachable: the call fails naming the query and the last endpoint tried.
    let only_dead = Sandbox::new();
    let resolver = greeter(&only_dead, std::slice::from_ref(&dead_url), "").await;
    let channel = resolver
        .grpc_channel_builder("discovery:///greeter")
        .attempts(2)
        .build_balanced()
        .await
        .unwrap();
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let message = status.message();
    assert!(
        message.contains("grpc://greeter")
            && message.contains("2 attempts")
            && message.contains(dead_url.trim_start_matches("grpc://")),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn request_keys_route_grpc_calls_and_http_requests_under_consistent_hashing() {
    let servers = Instances::grpc("greeter", 3).await;
    let sandbox = Sandbox::new();
    let resolver = greeter(
        &sandbox,
        &servers.urls("grpc"),
        "[[policy]]\nservice = \"greeter\"\nstrategy = \"consistent-hash\"",
    )
    .await;
    let channel = resolver
        .grpc_balanced_channel("discovery:///greeter")
        .await
        .unwrap();
    assert_eq!(channel.balancer().strategy(), Strategy::ConsistentHash);
    let mut homes = Vec::new();
    for user in 0..60 {
        let key = format!("user-{user}");
        let (answered, failed) = grpc_calls(&channel, 5, Some(&key)).await;
        assert!(failed.is_empty(), "{failed:?}");
        homes.push(only_home(&key, answered));
    }
    // 60 keys over 3 instances: each gets some (all on one or two: ~1 run in 10^10).
    let homes = counts(homes);
    assert_eq!(homes.len(), 3, "{homes:?}");

    // The HTTP client reads the same extension.
    let web_servers = Instances::http("web", 3).await;
    let web_sandbox = Sandbox::new();
    let resolver = web(
        &web_sandbox,
        &web_servers.urls("http"),
        "strategy = \"consistent-hash\"",
    )
    .await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = resolver.http_client().unwrap();
    let mut http_homes = Vec::new();
    for user in 0..60 {
        let key = format!("user-{user}");
        let mut answered = Vec::new();
        for _ in 0..5 {
            let response = client
                .get("http://web/")
                .with_extension(PickKey::new(&key))
                .send()
                .await
                .unwrap();
            let body = response.text().await.unwrap();
            answered.push(body.split_whitespace().next().unwrap().to_owned());
        }
        http_homes.push(only_home(&key, counts(answered)));
    }
    let http_homes = counts(http_homes);
    assert_eq!(http_homes.len(), 3, "{http_homes:?}");
}

/// The one instance that answered every call of `key`.
fn only_home(key: &str, answered: BTreeMap<String, usize>) -> String {
    assert_eq!(answered.len(), 1, "{key}: {answered:?}");
    answered.into_keys().next().unwrap()
}
