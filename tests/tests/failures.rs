//! Failure semantics against real servers and real misbehaving components: a failing
//! provider is never papered over by a later one (pass-through included), never
//! freezes the answer of the provider serving, and is named, with its server, in one
//! line.

use std::time::Duration;

use wasd_tests::{DnsServer, EtcdServer, Sandbox, fixtures, run, strings};

/// The etcd provider at `url`, then pass-through (on, as by default).
fn etcd_config(url: &str, grants: &str) -> String {
    format!(
        r#"
[[provider]]
builtin = "etcd"
settings = {{ endpoints = ["{url}"], timeout = "500ms" }}
grants = {{ {grants} }}
limits = {{ timeout = "3s" }}
"#
    )
}

/// `wasd resolve QUERY` in the sandbox with its wasd.toml: it must fail, with one line
/// on stderr, nothing on stdout. The line.
fn resolve_fails(sandbox: &Sandbox, query: &str) -> String {
    let out = run(sandbox.wasd().args(["resolve", query, "--config", "wasd.toml"]));
    assert_ne!(out.code, 0, "a failure became an answer: {}", out.stdout);
    assert_eq!(out.stdout, "", "stderr: {}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr is not one line: {:?}", out.stderr);
    // Not a terminal: no colour.
    assert!(!out.stderr.contains('\u{1b}'), "{:?}", out.stderr);
    lines[0].to_owned()
}

#[test]
fn etcd_down_is_an_error_naming_etcd_not_the_bare_name() {
    let mut etcd = EtcdServer::start();
    let url = etcd.url();
    etcd.kill();
    let sandbox = Sandbox::new();
    sandbox.write("wasd.toml", etcd_config(&url, &format!(r#"http = ["{url}"]"#)));
    let line = resolve_fails(&sandbox, "hello");
    assert!(
        line.starts_with("wasd: no endpoints for service 'hello'; provider 'etcd': upstream unavailable"),
        "{line}"
    );
    assert!(
        line.contains(&url["http://".len()..]),
        "the server is not named: {line}"
    );
}

#[test]
fn a_forgotten_http_grant_is_an_error_not_the_bare_name() {
    let etcd = EtcdServer::start();
    etcd.put_instance("hello", "a", "v1", &["http://10.0.0.1:8000"], None);
    let sandbox = Sandbox::new();
    sandbox.write("wasd.toml", etcd_config(&etcd.url(), ""));
    let line = resolve_fails(&sandbox, "hello");
    assert!(line.contains("provider 'etcd'"), "{line}");
    assert!(line.contains("denied"), "{line}");
}

/// The dns-srv provider over `server`, then pass-through.
fn dns_config(server: &str, grants: &str) -> String {
    format!(
        r#"
[dns]
servers = ["{server}"]

[[provider]]
builtin = "dns-srv"
settings = {{ suffix = "cluster.local" }}
grants = {{ dns = [{grants}] }}
"#
    )
}

#[test]
fn a_dns_server_that_does_not_answer_is_named_not_the_providers_clock() {
    // A server that takes the query and never answers (default limits: 1 s per call,
    // DNS 2 attempts of 400 ms).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let address = silent.local_addr().unwrap().to_string();
    let sandbox = Sandbox::new();
    sandbox.write("wasd.toml", dns_config(&address, r#""cluster.local""#));
    let line = resolve_fails(&sandbox, "basket");
    assert!(
        line.contains(&format!(
            "DNS server {address} did not answer (2 attempts of 400 ms)"
        )),
        "{line}"
    );
    assert!(!line.contains("time limit"), "{line}");
}

#[test]
fn a_dns_server_that_is_down_is_an_error_not_the_bare_name() {
    let mut dnsmasq = DnsServer::start(30, &[]);
    let address = dnsmasq.address();
    dnsmasq.stop();
    let sandbox = Sandbox::new();
    sandbox.write("wasd.toml", dns_config(&address, r#""cluster.local""#));
    let line = resolve_fails(&sandbox, "basket");
    assert!(line.contains("provider 'dns-srv'"), "{line}");
    assert!(line.contains(&format!("DNS server {address}")), "{line}");
}

#[test]
fn a_dns_grant_that_does_not_cover_the_suffix_is_an_error() {
    let dnsmasq = DnsServer::start(
        30,
        &["--srv-host=_default._tcp.basket.cluster.local,basket-1.cluster.local,8080"],
    );
    let sandbox = Sandbox::new();
    sandbox.write("wasd.toml", dns_config(&dnsmasq.address(), r#""example.org""#));
    let line = resolve_fails(&sandbox, "basket");
    assert!(line.contains("provider 'dns-srv': capability denied"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_of_one_replica_is_followed_at_once() {
    let etcd = EtcdServer::start();
    etcd.put_instance("hello", "a", "v1", &["http://10.0.0.1:8000"], None);
    let sandbox = Sandbox::new();
    let resolver = sandbox
        .resolver(&etcd_config(
            &etcd.url(),
            &format!(r#"http = ["{}"]"#, etcd.url()),
        ))
        .await
        .unwrap();
    let mut watch = resolver.watch("http://hello").await.unwrap();
    assert_eq!(strings(&watch.current()), ["http://10.0.0.1:8000"]);
    // The one replica goes; pass-through stands in (etcd answered cleanly: nothing).
    etcd.delete("/microservices/hello/a");
    let gone = tokio::time::timeout(Duration::from_secs(10), watch.changed())
        .await
        .expect("the deletion reached the watcher")
        .unwrap();
    assert_eq!(gone.provider(), Some("pass-through"));
    // Its replacement registers 0.3 s later, and is served within a second.
    // The rolling restart's gap (part of the scenario, not a wait for anything).
    tokio::time::sleep(Duration::from_millis(300)).await;
    etcd.put_instance("hello", "b", "v1", &["http://10.0.0.2:8000"], None);
    let registered = std::time::Instant::now();
    let back = tokio::time::timeout(Duration::from_secs(5), watch.changed())
        .await
        .expect("the new replica waited for the refresh period")
        .unwrap();
    assert_eq!(strings(&back), ["http://10.0.0.2:8000"]);
    assert!(
        registered.elapsed() < Duration::from_secs(1),
        "{:?}",
        registered.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_provider_ahead_never_freezes_the_config_providers_answer() {
    let sandbox = Sandbox::new();
    sandbox.write_services("catalog", "http", &["http://10.0.0.1:80"]);
    // Ahead of the config provider: a provider with nothing for `catalog` at first,
    // that then fails on every call (an upstream gone, a loop, a quarantine).
    let toml = format!(
        r#"
[[provider]]
name = "flaky"
module = "{}"
settings = {{ service = "catalog", answers = [{{ endpoints = [] }}, {{ error = "unavailable" }}] }}

[[provider]]
builtin = "config"
grants = {{ files = ["appsettings.json"] }}
"#,
        fixtures::SEQUENCE
    );
    let resolver = sandbox.resolver(&toml).await.unwrap();
    let mut watch = resolver.watch("http://catalog").await.unwrap();
    assert_eq!(strings(&watch.current()), ["http://10.0.0.1:80"]);
    // The file changes: the config provider's new answer is published although the
    // provider ahead of it now fails.
    sandbox.write_services("catalog", "http", &["http://10.0.0.2:80"]);
    let changed = tokio::time::timeout(Duration::from_secs(10), watch.changed())
        .await
        .expect("the config provider's new answer was frozen behind a failing provider")
        .unwrap();
    assert_eq!(strings(&changed), ["http://10.0.0.2:80"]);
    // The answer says what failed ahead of it.
    let served = resolver.resolve("http://catalog").await.unwrap();
    assert_eq!(served.failures().len(), 1, "{:?}", served.failures());
    assert_eq!(served.failures()[0].provider, "flaky");
}

/// Rule 6: a module in the plugin folder (not listed in the config) that traps in
/// `configure` at start is skipped with its error; the rest of the chain serves, in
/// the library and in the CLI.
#[test]
fn an_unlisted_module_trapping_in_configure_is_skipped() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "appsettings.json",
        r#"{"Services": {"basket": {"http": ["http://10.0.0.1:80"]}}}"#,
    );
    sandbox.write(
        "plugins/trap-in-configure.wasm",
        std::fs::read(fixtures::HOSTILE).unwrap(),
    );
    sandbox.write(
        "wasd.toml",
        "pass-through = false\nplugin-dir = \"plugins\"\n\
         [[provider]]\nbuiltin = \"config\"\ngrants = { files = [\"appsettings.json\"] }\n",
    );

    // The library: the resolver starts, reports the skipped module, and serves.
    wasd_tests::runtime().block_on(async {
        let toml = std::fs::read_to_string(sandbox.path().join("wasd.toml")).unwrap();
        let resolver = sandbox.resolver(&toml).await.unwrap();
        let status = resolver.reload_status();
        assert_eq!(status.providers, ["config"], "{status:?}");
        let skipped = status.errors.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert!(
            skipped.len() == 1
                && skipped[0].contains("trap-in-configure")
                && skipped[0].contains("trapping in configure, as asked"),
            "{skipped:?}"
        );
        let set = resolver.resolve("http://basket").await.unwrap();
        assert_eq!(strings(&set), ["http://10.0.0.1:80"]);
    });

    // The CLI: the answer, exit 0, and the skipped module named on stderr.
    let out = run(sandbox
        .wasd()
        .args(["resolve", "http://basket", "--config", "wasd.toml"]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "http://10.0.0.1:80");
    assert!(
        out.stderr.contains("trap-in-configure") && out.stderr.contains("trapping in configure"),
        "{}",
        out.stderr
    );
}

/// Rule 8: after etcd returns from an outage, watchers catch up within 5 s, however
/// far their refresh back-off had grown (alone it reaches 30 s).
#[tokio::test(flavor = "multi_thread")]
async fn watchers_catch_up_within_5s_of_etcds_return_whatever_the_back_off() {
    let mut etcd = EtcdServer::start();
    for service in ["hello", "world"] {
        etcd.put_instance(service, "a", "v1", &["http://10.0.0.1:8000"], None);
    }
    let sandbox = Sandbox::new();
    let url = etcd.url();
    let resolver = sandbox
        .resolver(&etcd_config(&url, &format!(r#"http = ["{url}"]"#)))
        .await
        .unwrap();
    let mut watches = Vec::new();
    for service in ["http://hello", "http://world"] {
        let watch = resolver.watch(service).await.unwrap();
        assert_eq!(strings(&watch.current()), ["http://10.0.0.1:8000"]);
        watches.push(watch);
    }
    etcd.kill();
    // Away for 40 s (the scenario, not a wait for an event): the refreshes fail at
    // about 1, 2, 4, 8, 16 and 32 s, and the next would come 30 s later.
    tokio::time::sleep(Duration::from_secs(40)).await;
    let served = resolver.resolve("http://hello").await.unwrap();
    assert_eq!(strings(&served), ["http://10.0.0.1:8000"], "the last good set");
    assert!(
        served.failures().iter().any(|f| f.provider == "etcd"),
        "{:?}",
        served.failures()
    );
    etcd.restart();
    for service in ["hello", "world"] {
        etcd.put_instance(service, "a", "v2", &["http://10.0.0.2:8000"], None);
    }
    let back = std::time::Instant::now();
    for watch in &mut watches {
        let changed = tokio::time::timeout(Duration::from_secs(30), watch.changed())
            .await
            .expect("the watcher never caught up")
            .unwrap();
        assert_eq!(strings(&changed), ["http://10.0.0.2:8000"]);
    }
    assert!(
        back.elapsed() <= Duration::from_secs(5),
        "caught up {:?} after etcd's return",
        back.elapsed()
    );
}
