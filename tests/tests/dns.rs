//! The `dns-srv` and `dns` providers against a real DNS server (dnsmasq on loopback).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use wasd::{Error, ProviderErrorKind};
use wasd_tests::{DnsServer, Sandbox, run, strings};

const BASKET: &[&str] = &[
    // Two targets for the default endpoint, priority 1 written first on purpose.
    "--srv-host=_default._tcp.basket.cluster.local,basket-2.cluster.local,8081,1,5",
    "--srv-host=_default._tcp.basket.cluster.local,basket-1.cluster.local,8080,0,10",
    "--srv-host=_dashboard._tcp.basket.cluster.local,basket-1.cluster.local,9999,0,0",
    "--host-record=basket-1.cluster.local,10.0.0.1",
    "--host-record=basket-2.cluster.local,10.0.0.2",
    // Scheme-named ports: catalog only has http.
    "--srv-host=_http._tcp.catalog.cluster.local,catalog-1.cluster.local,80,0,0",
    "--host-record=catalog-1.cluster.local,10.0.1.1",
    // A target with no address record: the endpoint keeps the name.
    "--srv-host=_default._tcp.orders.cluster.local,orders.elsewhere.test,7000,0,0",
    // Another zone, for templates.
    "--srv-host=_grpc._tcp.basket.custom.test,basket-9.custom.test,9000,0,0",
    "--host-record=basket-9.custom.test,10.9.9.9",
    // For the A/AAAA provider.
    "--host-record=web.cluster.local,10.0.2.1",
    "--host-record=web.cluster.local,10.0.2.2",
];

fn config(server: &DnsServer, settings: &str, grants: &str) -> String {
    config_at(&server.address(), settings, grants, "3s")
}

/// One dns-srv provider asking the DNS server at `address`, with a call limit of
/// `limit`.
fn config_at(address: &str, settings: &str, grants: &str, limit: &str) -> String {
    format!(
        r#"
pass-through = false
[dns]
servers = ["{address}"]
timeout = "300ms"

[[provider]]
builtin = "dns-srv"
settings = {{ {settings} }}
grants = {{ dns = [{grants}] }}
limits = {{ timeout = "{limit}" }}
"#
    )
}

/// A dnsmasq serving BASKET with long TTLs, and a resolver with one dns-srv provider.
async fn srv_resolver(settings: &str, grants: &str) -> (DnsServer, Sandbox, wasd::Resolver) {
    let server = DnsServer::start(30, BASKET);
    let sandbox = Sandbox::new();
    let resolver = sandbox
        .resolver(&config(&server, settings, grants))
        .await
        .unwrap();
    (server, sandbox, resolver)
}

#[tokio::test]
async fn default_and_named_endpoints_in_priority_order() {
    let (_server, _sandbox, r) = srv_resolver(r#"suffix = "cluster.local""#, r#""cluster.local""#).await;
    let set = r.resolve("basket").await.unwrap();
    assert_eq!(strings(&set), ["10.0.0.1:8080", "10.0.0.2:8081"]);
    assert_eq!(set.provider(), Some("dns-srv"));
    let first = &set.endpoints()[0];
    assert_eq!(first.metadata_value("host-name"), Some("basket-1.cluster.local"));
    assert_eq!(first.metadata_value("priority"), Some("0"));
    // A single scheme in the query is the endpoints' scheme.
    assert_eq!(
        strings(&r.resolve("https://_dashboard.basket").await.unwrap()),
        ["https://10.0.0.1:9999"]
    );
    // No address record: connect by name.
    let orders = r.resolve("orders").await.unwrap();
    assert_eq!(strings(&orders), ["orders.elsewhere.test:7000"]);
}

#[tokio::test]
async fn scheme_form_follows_the_preference() {
    let (_server, _sandbox, r) = srv_resolver(
        r#"suffix = "cluster.local", scheme-form = true"#,
        r#""cluster.local""#,
    )
    .await;
    // No _https record for catalog: the http one, with its scheme.
    assert_eq!(
        strings(&r.resolve("https+http://catalog").await.unwrap()),
        ["http://10.0.1.1:80"]
    );
    // Named endpoints still use their name.
    assert_eq!(
        strings(&r.resolve("https://_dashboard.basket").await.unwrap()),
        ["https://10.0.0.1:9999"]
    );
}

#[tokio::test]
async fn custom_suffix_and_template() {
    let (_server, _sandbox, r) = srv_resolver(
        r#"template = "_{endpoint}._tcp.{service}.custom.test""#,
        r#""custom.test""#,
    )
    .await;
    assert_eq!(
        strings(&r.resolve("grpc://_grpc.basket").await.unwrap()),
        ["grpc://10.9.9.9:9000"]
    );
}

#[tokio::test]
async fn without_a_suffix_the_provider_declines() {
    let (_server, _sandbox, r) = srv_resolver("", r#""*""#).await;
    match r.resolve("basket").await {
        Err(Error::NoEndpoints { failures, .. }) => assert!(failures.is_empty(), "{failures:?}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn names_outside_the_grant_are_denied() {
    let (server, sandbox, r) = srv_resolver(r#"suffix = "cluster.local""#, r#""example.org""#).await;
    match r.resolve("basket").await {
        Err(Error::NoEndpoints { failures, .. }) => match &failures[0].kind {
            ProviderErrorKind::Denied(m) => {
                assert!(
                    m.contains("may not look up '_default._tcp.basket.cluster.local'"),
                    "{m}"
                )
            }
            other => panic!("expected a denial, got {other:?}"),
        },
        other => panic!("{other:?}"),
    }
    // No grant at all is the default.
    let no_grant = config(&server, r#"suffix = "cluster.local""#, "");
    let r = sandbox.resolver(&no_grant).await.unwrap();
    match r.resolve("basket").await {
        Err(Error::NoEndpoints { failures, .. }) => {
            assert!(
                matches!(&failures[0].kind, ProviderErrorKind::Denied(m) if m.contains("_default._tcp.basket.cluster.local")),
                "{failures:?}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn ttl_refresh_nxdomain_and_outages_through_watch() {
    let mut server = DnsServer::start(1, BASKET);
    let sandbox = Sandbox::new();
    let r = sandbox
        .resolver(&config(
            &server,
            r#"suffix = "cluster.local""#,
            r#""cluster.local""#,
        ))
        .await
        .unwrap();
    let mut watch = r.watch("basket").await.unwrap();
    assert_eq!(strings(&watch.current()), ["10.0.0.1:8080", "10.0.0.2:8081"]);

    // New records: seen on the next TTL-driven refresh.
    server.restart(&[
        "--srv-host=_default._tcp.basket.cluster.local,basket-3.cluster.local,8082,0,0",
        "--host-record=basket-3.cluster.local,10.0.0.3",
    ]);
    let next = tokio::time::timeout(Duration::from_secs(10), watch.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(strings(&next), ["10.0.0.3:8082"]);

    // The server goes away: the last good set is served, and no change is published.
    server.stop();
    assert!(
        tokio::time::timeout(Duration::from_secs(4), watch.changed())
            .await
            .is_err()
    );
    assert_eq!(strings(&r.resolve("basket").await.unwrap()), ["10.0.0.3:8082"]);

    // Back, but the records are gone (NXDOMAIN): the endpoints are removed.
    server.restart(&["--host-record=unrelated.cluster.local,10.0.0.99"]);
    let gone = tokio::time::timeout(Duration::from_secs(40), watch.changed())
        .await
        .unwrap()
        .unwrap();
    assert!(gone.is_empty(), "{gone:?}");
}

#[tokio::test]
async fn dns_provider_looks_up_addresses() {
    let server = DnsServer::start(30, BASKET);
    let sandbox = Sandbox::new();
    let toml = format!(
        r#"
pass-through = false
[dns]
servers = ["{}"]
[[provider]]
builtin = "dns"
settings = {{ suffix = "cluster.local", port = 8080 }}
grants = {{ dns = ["cluster.local"] }}
"#,
        server.address()
    );
    let r = sandbox.resolver(&toml).await.unwrap();
    let mut web = strings(&r.resolve("http://web").await.unwrap());
    web.sort();
    assert_eq!(web, ["http://10.0.2.1:8080", "http://10.0.2.2:8080"]);
    // The query's port wins over the setting.
    let mut web = strings(&r.resolve("web:9090").await.unwrap());
    web.sort();
    assert_eq!(web, ["10.0.2.1:9090", "10.0.2.2:9090"]);
    assert!(matches!(
        r.resolve("nothing").await,
        Err(Error::NoEndpoints { .. })
    ));
}

#[test]
fn cli_resolves_through_dns_srv() {
    let server = DnsServer::start(30, BASKET);
    let sandbox = Sandbox::new();
    sandbox.write(
        "wasd.toml",
        config(&server, r#"suffix = "cluster.local""#, r#""cluster.local""#),
    );
    let out = run(sandbox.wasd().args([
        "resolve",
        "https://_dashboard.basket",
        "--config",
        "wasd.toml",
        "--json",
    ]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["endpoints"][0]["endpoint"], "https://10.0.0.1:9999");
    assert_eq!(v["endpoints"][0]["provider"], "dns-srv");
    assert_eq!(
        v["endpoints"][0]["metadata"]["host-name"],
        "basket-1.cluster.local"
    );
}

/// Time spent waiting for the DNS server is set aside from the provider's time limit:
/// a server that does not answer is reported as such, not as the provider running out
/// of time (its limit here is shorter than one DNS attempt).
#[tokio::test]
async fn a_silent_dns_server_is_not_the_providers_time_limit() {
    // A UDP socket that never answers: every lookup waits for the DNS timeout.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let toml = config_at(
        &silent.local_addr().unwrap().to_string(),
        r#"suffix = "cluster.local""#,
        r#""*""#,
        "100ms",
    );
    let sandbox = Sandbox::new();
    let r = sandbox.resolver(&toml).await.unwrap();
    let started = std::time::Instant::now();
    match r.resolve("basket").await {
        Err(Error::NoEndpoints { failures, .. }) => {
            let failure = failures[0].to_string();
            assert!(
                matches!(failures[0].kind, ProviderErrorKind::Unavailable(_)),
                "{failure}"
            );
            assert!(!failure.contains("time limit"), "{failure}");
        }
        other => panic!("{other:?}"),
    }
    // The provider was given the DNS time (two attempts of 300 ms), not cut at 100 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
}

/// A DNS server on loopback whose every answer is malformed: for `basket-N`, kind
/// N % 3 of a record whose data runs past the packet, an answer count larger than the
/// answers, and a name that points to itself (a compression loop).
struct MalformedDns {
    address: String,
    answered: Arc<AtomicUsize>,
}

impl MalformedDns {
    fn start() -> MalformedDns {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let address = socket.local_addr().unwrap().to_string();
        let answered = Arc::new(AtomicUsize::new(0));
        let count = answered.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 512];
            while let Ok((len, from)) = socket.recv_from(&mut buffer) {
                let query = &buffer[..len];
                // The question: the name's labels up to the root, then type and class.
                let mut end = 12;
                while end < len && query[end] != 0 {
                    end += 1 + query[end] as usize;
                }
                let question_end = end + 5;
                if question_end > len {
                    continue;
                }
                let qtype = [query[end + 1], query[end + 2]];
                count.fetch_add(1, Ordering::SeqCst);
                // The kind of damage: `basket-N` gets kind N % 3.
                let name = &query[12..end];
                let n = name
                    .windows(7)
                    .position(|w| w == b"basket-")
                    .and_then(|at| name.get(at + 7))
                    .map_or(0, |digit| usize::from(digit.wrapping_sub(b'0')));
                let mut answer = Vec::from(&query[..2]);
                let answers: u16 = if n % 3 == 1 { 5 } else { 1 };
                answer.extend([0x81, 0x80, 0, 1]);
                answer.extend(answers.to_be_bytes());
                answer.extend([0, 0, 0, 0]);
                answer.extend(&query[12..question_end]);
                match n % 3 {
                    // Data length 50, three bytes of data.
                    0 => {
                        answer.extend([0xc0, 12]);
                        answer.extend(qtype);
                        answer.extend([0, 1, 0, 0, 0, 30, 0, 50, 1, 2, 3]);
                    }
                    // Five answers announced, one given (four bytes of an address).
                    1 => {
                        answer.extend([0xc0, 12]);
                        answer.extend(qtype);
                        answer.extend([0, 1, 0, 0, 0, 30, 0, 4, 10, 0, 0, 1]);
                    }
                    // The record's name is a pointer to itself.
                    _ => {
                        let here = answer.len() as u16;
                        answer.extend((0xc000 | here).to_be_bytes());
                        answer.extend(qtype);
                        answer.extend([0, 1, 0, 0, 0, 30, 0, 4, 10, 0, 0, 1]);
                    }
                }
                let _ = socket.send_to(&answer, from);
            }
        });
        MalformedDns { address, answered }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_dns_answers_are_errors_not_panics() {
    let server = MalformedDns::start();
    let toml = config_at(&server.address, r#"suffix = "cluster.local""#, r#""*""#, "3s");
    let sandbox = Sandbox::new();
    let resolver = sandbox.resolver(&toml).await.unwrap();
    // Each query gets malformed answers only: it fails as the DNS being unavailable,
    // naming the provider, the server and the damage, and the host goes on to the next.
    for i in 0..6 {
        let query: wasd::Query = format!("basket-{i}").parse().unwrap();
        match resolver.resolve_uncached(&query).await {
            Err(Error::NoEndpoints { failures, .. }) => {
                let failure = failures[0].to_string();
                assert!(
                    matches!(failures[0].kind, ProviderErrorKind::Unavailable(_)),
                    "{failure}"
                );
                assert!(failure.starts_with("provider 'dns-srv'"), "{failure}");
                // The server and what was wrong with its answer are named.
                let damage = [
                    "incorrect rdata length",
                    "unexpected end of input",
                    "label points to data",
                ];
                assert!(
                    failure.contains(&format!(
                        "DNS server {}: protocol error: decoding error: ",
                        server.address
                    )) && failure.contains(damage[i % 3]),
                    "{failure}"
                );
            }
            other => panic!("basket-{i}: {other:?}"),
        }
    }
    // Every kind of malformed answer was served, several times.
    assert!(server.answered.load(Ordering::SeqCst) >= 6);
}
