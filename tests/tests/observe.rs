//! Observing wasd: metrics as Prometheus scrapes them (`wasd watch --metrics ADDR`,
//! fetched with curl and read by prometheus_client's exposition parser, both written by
//! others), metrics as an embedder's recorder sees them, and the spans of a resolve.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::OnceLock;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use serde_json::Value;
use wasd::ServiceInstance;
use wasd_tests::{DnsServer, EtcdServer, Lines, Sandbox, python_clients, register, run_within};

/// One sample as the parser reads it.
#[derive(Debug)]
struct Sample {
    family: String,
    kind: String,
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

/// Parse an exposition with prometheus_client; panics (with the parser's error) if it
/// is not valid.
fn parse(python: &str, text: &str) -> Vec<Sample> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in family.samples:
        out.append([family.name, family.type, s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    let out = run_within(
        Command::new(python).args(["-c", SCRIPT]).arg(file.path()),
        Duration::from_secs(60),
    );
    assert_eq!(
        out.code, 0,
        "the parser refused the exposition: {}\n{text}",
        out.stderr
    );
    let rows: Vec<Value> = serde_json::from_str(&out.stdout).unwrap();
    rows.into_iter()
        .map(|row| Sample {
            family: row[0].as_str().unwrap().to_owned(),
            kind: row[1].as_str().unwrap().to_owned(),
            name: row[2].as_str().unwrap().to_owned(),
            labels: serde_json::from_value(row[3].clone()).unwrap(),
            value: row[4].as_f64().unwrap(),
        })
        .collect()
}

/// GET the metrics with curl.
fn scrape(address: &str) -> Option<String> {
    let out = run_within(
        Command::new("curl").args(["-sS", "--max-time", "5", &format!("http://{address}/metrics")]),
        Duration::from_secs(10),
    );
    (out.code == 0).then_some(out.stdout)
}

/// Scrape and parse until `done` holds of the samples, for at most 10 s. The process
/// publishes its gauges once a second and cannot tell us when: a scrape is the event.
fn scrape_until(python: &str, address: &str, what: &str, done: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(text) = scrape(address) {
            let samples = parse(python, &text);
            if done(&samples) {
                return samples;
            }
        }
        assert!(Instant::now() < deadline, "no {what} within 10 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of the sample named `name` with exactly these labels.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

fn kind<'a>(samples: &'a [Sample], family: &str) -> Option<&'a str> {
    samples
        .iter()
        .find(|s| s.family == family)
        .map(|s| s.kind.as_str())
}

#[test]
fn watch_serves_valid_prometheus_metrics() {
    let python = python_clients();
    let sandbox = Sandbox::new();
    sandbox.write_services(
        "basket",
        "http",
        &["http://10.0.0.1:8080", "http://10.0.0.2:8080"],
    );
    let address = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let mut child = sandbox
        .wasd()
        .args(["watch", "http://basket", "--metrics", &address])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = Lines::new(child.stdout.take().unwrap());
    let first = stdout.next(Duration::from_secs(60), "the current set");
    assert_eq!(first.trim(), "http://10.0.0.1:8080 http://10.0.0.2:8080");

    // The reporter publishes once a second: scrape until the gauges say what the
    // watch printed (a report made while the first answer was on its way says 0).
    let samples = scrape_until(&python, &address, "wasd_endpoints for basket at 2", |samples| {
        value(samples, "wasd_endpoints", &[("service", "basket")]) == Some(2.0)
    });

    // A change to the file: the provider is reloaded, the watcher told, the gauge
    // follows.
    sandbox.write_services(
        "basket",
        "http",
        &[
            "http://10.0.0.1:8080",
            "http://10.0.0.2:8080",
            "http://10.0.0.3:8080",
        ],
    );
    let changed = stdout.next(Duration::from_secs(10), "the change");
    assert_eq!(changed.split(' ').count(), 3, "{changed}");
    let later = scrape_until(
        &python,
        &address,
        "wasd_endpoints following the change",
        |samples| value(samples, "wasd_endpoints", &[("service", "basket")]) == Some(3.0),
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(value(&later, "wasd_reloads_total", &[("result", "applied")]).unwrap() >= 1.0);
    assert_eq!(value(&later, "wasd_watch_changes_total", &[]), Some(2.0));

    // Types as Prometheus conventions want them (the parser drops `_total` from a
    // counter family's name).
    assert_eq!(kind(&samples, "wasd_resolves"), Some("counter"));
    assert_eq!(kind(&samples, "wasd_provider_calls"), Some("counter"));
    assert_eq!(
        kind(&samples, "wasd_provider_call_duration_seconds"),
        Some("histogram")
    );
    assert_eq!(kind(&samples, "wasd_cache_entries"), Some("gauge"));
    assert_eq!(kind(&samples, "wasd_endpoints"), Some("gauge"));

    // What this run did: one query, a miss that the config provider answered with two
    // endpoints; one cached entry.
    assert_eq!(
        value(&samples, "wasd_resolves_total", &[("outcome", "miss")]),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, "wasd_endpoints", &[("service", "basket")]),
        Some(2.0)
    );
    assert_eq!(value(&samples, "wasd_cache_entries", &[]), Some(1.0));
    let answered = [
        ("provider", "config"),
        ("call", "resolve"),
        ("outcome", "answered"),
    ];
    assert!(value(&samples, "wasd_provider_calls_total", &answered).unwrap() >= 1.0);
    let timed = [("provider", "config"), ("call", "resolve")];
    assert!(value(&samples, "wasd_provider_call_duration_seconds_count", &timed).unwrap() >= 1.0);
    assert!(value(&samples, "wasd_provider_call_duration_seconds_sum", &timed).unwrap() > 0.0);
    assert_eq!(
        value(&samples, "wasd_provider_quarantined", &[("provider", "config")]),
        Some(0.0)
    );
    assert!(value(&samples, "wasd_provider_instances", &[("provider", "config")]).unwrap() >= 1.0);
}

#[test]
fn a_metrics_address_in_use_is_a_clear_error() {
    let sandbox = Sandbox::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let out = wasd_tests::run(sandbox.wasd().args(["watch", "basket", "--metrics", &address]));
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr
            .starts_with(&format!("wasd: serving metrics on {address}: ")),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
}

/// The recorder the library tests of this file share (one per process, as for any
/// embedder): installed before any resolver is built.
fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder of this test process");
        snapshotter
    })
}

/// A series as the debugging recorder reports it: name, labels (sorted), value.
type Series = (String, Vec<(String, String)>, DebugValue);

/// Every series' change since the last snapshot.
fn series() -> Vec<Series> {
    snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let mut labels: Vec<(String, String)> = key
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            (key.key().name().to_owned(), labels, value)
        })
        .collect()
}

/// Two snapshots of changes as one: counters and gauges added, histograms joined.
fn merged(first: Vec<Series>, second: Vec<Series>) -> Vec<Series> {
    let mut all = first;
    for (name, labels, value) in second {
        match all.iter_mut().find(|(n, l, _)| *n == name && *l == labels) {
            None => all.push((name, labels, value)),
            Some((_, _, existing)) => match (existing, value) {
                (DebugValue::Counter(a), DebugValue::Counter(b)) => *a += b,
                (DebugValue::Gauge(a), DebugValue::Gauge(b)) => *a = (a.into_inner() + b.into_inner()).into(),
                (DebugValue::Histogram(a), DebugValue::Histogram(b)) => a.extend(b),
                (existing, value) => panic!("{name}: {existing:?} then {value:?}"),
            },
        }
    }
    all
}

fn find<'a>(series: &'a [Series], name: &str, labels: &[(&str, &str)]) -> Option<&'a DebugValue> {
    series
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, value)| value)
}

/// A real etcd (empty) and a dnsmasq serving basket, and a sandbox whose `wasd.toml`
/// asks etcd first (an HTTP request that finds nothing), then dns-srv (DNS lookups
/// that answer `10.0.0.1:8080`).
fn etcd_then_dns() -> (EtcdServer, DnsServer, Sandbox) {
    let etcd = EtcdServer::start();
    let dns = DnsServer::start(
        30,
        &[
            "--srv-host=_default._tcp.basket.cluster.local,basket-1.cluster.local,8080,0,10",
            "--host-record=basket-1.cluster.local,10.0.0.1",
        ],
    );
    let sandbox = Sandbox::new();
    let url = etcd.url();
    sandbox.write(
        "wasd.toml",
        format!(
            r#"
pass-through = false
[dns]
servers = ["{dns}"]
[[provider]]
builtin = "etcd"
settings = {{ endpoints = ["{url}"] }}
grants = {{ http = ["{url}"] }}
[[provider]]
builtin = "dns-srv"
settings = {{ suffix = "cluster.local" }}
grants = {{ dns = ["cluster.local"] }}
"#,
            dns = dns.address()
        ),
    );
    (etcd, dns, sandbox)
}

#[tokio::test(flavor = "multi_thread")]
async fn imports_registrations_and_reloads_are_measured() {
    snapshotter();
    let (etcd, _dns, sandbox) = etcd_then_dns();
    let url = etcd.url();
    let config = sandbox.path().join("wasd.toml");
    let resolver = wasd::Resolver::builder()
        .config_file(&config)
        .watch_files(false)
        .build()
        .await
        .unwrap();
    let registration = register(
        &resolver,
        ServiceInstance::new("metered", ["http://10.1.0.1:80"]),
        Duration::from_secs(5),
    )
    .await;
    let registered = series();
    assert_eq!(resolver.resolve("metered").await.unwrap().len(), 1);
    assert_eq!(resolver.resolve("basket").await.unwrap().len(), 1);
    registration.deregister().await.unwrap();
    // A config that no longer parses: a failed reload.
    std::fs::write(&config, "this is not toml").unwrap();
    assert!(!resolver.reload().await.errors.is_empty());
    let after = series();

    // The debugging recorder hands out changes since the last snapshot: while
    // registered, the gauge had counted it under `registered` (and no longer under
    // `registering`); deregistering took it out again.
    fn state(series: &[Series], state: &str) -> f64 {
        match find(
            series,
            "wasd_registrations",
            &[("service", "metered"), ("state", state)],
        ) {
            Some(DebugValue::Gauge(value)) => value.into_inner(),
            other => panic!("wasd_registrations {state}: {other:?}"),
        }
    }
    assert_eq!(state(&registered, "registered"), 1.0);
    assert_eq!(state(&registered, "registering"), 0.0);
    assert_eq!(state(&after, "registered"), -1.0);
    let after = merged(registered, after);
    assert_eq!(
        (state(&after, "registered"), state(&after, "registering")),
        (0.0, 0.0)
    );
    // The registrar's calls, and the HTTP requests and DNS lookups behind the answers.
    let calls = |call, outcome| match find(
        &after,
        "wasd_provider_calls_total",
        &[("provider", "etcd"), ("call", call), ("outcome", outcome)],
    ) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!("{call} {outcome}: {other:?}"),
    };
    assert_eq!(calls("register", "answered"), 1);
    assert_eq!(calls("deregister", "answered"), 1);
    let origin = url.as_str();
    match find(
        &after,
        "wasd_http_request_duration_seconds",
        &[("provider", "etcd"), ("origin", origin)],
    ) {
        Some(DebugValue::Histogram(samples)) => assert!(samples.len() >= 3, "{samples:?}"),
        other => panic!("HTTP requests to {origin}: {other:?}"),
    }
    match find(
        &after,
        "wasd_dns_lookup_duration_seconds",
        &[("provider", "dns-srv")],
    ) {
        Some(DebugValue::Histogram(samples)) => assert!(!samples.is_empty()),
        other => panic!("DNS lookups: {other:?}"),
    }
    match find(&after, "wasd_reloads_total", &[("result", "failed")]) {
        Some(DebugValue::Counter(n)) => assert!(*n >= 1),
        other => panic!("failed reloads: {other:?}"),
    }
}

/// One JSON log line's span, by name and fields.
fn span_named<'a>(spans: &'a [Value], name: &str) -> Option<&'a Value> {
    spans.iter().find(|s| s["name"] == name)
}

#[test]
fn a_resolve_miss_shows_each_provider_call_and_import_in_its_spans() {
    // etcd first (it has nothing for basket: an HTTP request), then dns-srv (DNS
    // lookups that answer).
    let (etcd, _dns, sandbox) = etcd_then_dns();
    let url = etcd.url();
    let out = wasd_tests::run(
        sandbox
            .wasd()
            .args(["resolve", "basket", "--config", "wasd.toml"])
            .env("WASD_LOG", "debug")
            .env("WASD_LOG_FORMAT", "json"),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "10.0.0.1:8080");
    // Every line is a JSON object; span ends carry their time.
    let lines: Vec<Value> = out
        .stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let closed = |name: &str| -> Vec<&Value> {
        lines
            .iter()
            .filter(|l| l["fields"]["message"] == "close" && l["span"]["name"] == name)
            .collect()
    };
    for line in closed("provider_call") {
        assert!(line["fields"]["time.busy"].is_string(), "{line}");
    }
    // The import spans nest in their provider's call, which nests in the resolve.
    let inside = |import: &str, provider: &str| {
        let found = closed(import);
        let line = found
            .iter()
            .find(|l| {
                let spans = l["spans"].as_array().unwrap();
                span_named(spans, "provider_call").is_some_and(|c| c["provider"] == provider)
                    && span_named(spans, "resolve").is_some_and(|r| r["service"] == "basket")
            })
            .unwrap_or_else(|| panic!("no {import} inside {provider}'s call inside the resolve: {found:?}"));
        assert!(line["fields"]["time.busy"].is_string(), "{line}");
    };
    inside("http_request", "etcd");
    inside("dns_lookup", "dns-srv");
    // What each import asked for.
    assert!(
        closed("http_request")
            .iter()
            .all(|l| l["span"]["origin"] == url.as_str())
    );
    assert!(
        closed("dns_lookup")
            .iter()
            .any(|l| l["span"]["lookup"] == "_default._tcp.basket.cluster.local"),
        "{:?}",
        closed("dns_lookup")
    );
    // Each call's span says how it ended.
    let outcome = |provider: &str| {
        closed("provider_call")
            .iter()
            .find(|l| l["span"]["provider"] == provider)
            .map(|l| l["span"]["outcome"].clone())
    };
    assert_eq!(outcome("etcd"), Some(Value::from("empty")));
    assert_eq!(outcome("dns-srv"), Some(Value::from("answered")));
}

#[test]
fn an_unknown_log_format_is_a_clear_error() {
    let sandbox = Sandbox::new();
    let out = wasd_tests::run(
        sandbox
            .wasd()
            .args(["resolve", "basket"])
            .env("WASD_LOG_FORMAT", "xml"),
    );
    assert_eq!(out.code, 1);
    assert_eq!(
        out.stderr,
        "wasd: WASD_LOG_FORMAT is 'xml'; it takes `text` (the default) or `json`\n"
    );
}

/// One provider of `wasd resolve --explain --json`'s `providers`, by name.
fn explained<'a>(explanation: &'a Value, provider: &str) -> &'a Value {
    explanation["providers"]
        .as_array()
        .and_then(|steps| steps.iter().find(|s| s["provider"] == provider))
        .unwrap_or_else(|| panic!("{provider} is not explained: {explanation}"))
}

#[test]
fn explain_shows_each_provider_its_imports_the_dropped_endpoints_and_the_failure() {
    let (mut etcd, _dns, sandbox) = etcd_then_dns();
    let url = etcd.url();
    let explain = |args: &[&str]| {
        wasd_tests::run(
            sandbox
                .wasd()
                .args(["resolve", "basket", "--config", "wasd.toml", "--explain"])
                .args(args),
        )
    };

    // etcd has nothing (one HTTP request to its origin), dns-srv answers (DNS lookups).
    let out = explain(&["--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let json: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
    assert_eq!(json["query"], "basket");
    assert_eq!(
        json["cache"],
        Value::Null,
        "a one-shot resolve has no cache entry"
    );
    let etcd_step = explained(&json, "etcd");
    assert_eq!(etcd_step["outcome"], "declined", "{etcd_step}");
    let requests = etcd_step["imports"].as_array().unwrap();
    assert!(!requests.is_empty(), "{etcd_step}");
    for request in requests {
        assert_eq!(request["kind"], "http");
        assert_eq!(request["target"], url.as_str());
        assert!(
            request["detail"].as_str().unwrap().starts_with("POST /v3/"),
            "{request}"
        );
        assert_eq!(request["result"], "200 OK");
    }
    let dns_step = explained(&json, "dns-srv");
    assert_eq!(
        (&dns_step["outcome"], &dns_step["endpoints"], &dns_step["kept"]),
        (&Value::from("answered"), &Value::from(1), &Value::from(1)),
        "{dns_step}"
    );
    assert!(dns_step["elapsed_ms"].as_f64().unwrap() > 0.0);
    let lookups = dns_step["imports"].as_array().unwrap();
    assert!(
        lookups.iter().any(|l| l["kind"] == "dns"
            && l["target"] == "_default._tcp.basket.cluster.local"
            && l["detail"] == "SRV"
            && l["result"] == "1 record"),
        "{lookups:?}"
    );
    assert_eq!(json["answer"]["endpoints"][0]["endpoint"], "10.0.0.1:8080");
    assert_eq!(json["dropped"], Value::Array(vec![]));
    // How a balancer would pick among the answer: no [[policy]], the defaults.
    assert_eq!(
        (
            &json["policy"]["strategy"],
            &json["policy"]["outlier"]["base_ejection_ms"]
        ),
        (&Value::from("round-robin"), &Value::from(1000.0)),
        "{}",
        json["policy"]
    );

    // A filter no endpoint matches: the endpoint is dropped, naming the filter.
    let out = explain(&["--json", "--filter", "zone=eu"]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert_eq!(out.stderr, "wasd: no endpoints for service 'basket'\n");
    let json: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(explained(&json, "dns-srv")["kept"], 0);
    assert_eq!(
        json["dropped"],
        serde_json::json!([{
            "endpoint": "10.0.0.1:8080",
            "provider": "dns-srv",
            "reason": "metadata_filter",
            "detail": "metadata filter zone=eu not matched",
        }])
    );

    // etcd down: its failure is the answer, with its reason; dns-srv is not asked.
    etcd.kill();
    let out = explain(&[]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    let line = |prefix: &str| {
        out.stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no '{prefix}' line: {}", out.stdout))
            .to_owned()
    };
    let etcd_line = line("provider   etcd ");
    assert!(
        etcd_line.contains(&format!("failed: upstream unavailable: etcd at {url}")),
        "{etcd_line}"
    );
    assert!(
        out.stdout
            .contains(&format!("\n  import   http POST /v3/kv/range {url} → ")),
        "{}",
        out.stdout
    );
    assert!(
        line("provider   dns-srv ").contains("not asked: 'etcd' failed"),
        "{}",
        out.stdout
    );
    assert!(line("answer ").starts_with("answer     none: "), "{}", out.stdout);
    assert_eq!(
        line("policy "),
        "policy     round-robin; ejects after 1 failure for 1s, doubling to 30s, at most 100 %"
    );
    assert!(
        out.stderr.starts_with("wasd: ") && out.stderr.contains("etcd"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_embedder_explains_a_cached_query_with_its_freshness() {
    let (_etcd, _dns, sandbox) = etcd_then_dns();
    let resolver = wasd::Resolver::builder()
        .config_file(sandbox.path().join("wasd.toml"))
        .build()
        .await
        .unwrap();
    let explanation = resolver.explain("basket").await.unwrap();
    assert!(explanation.cache.is_none());
    resolver.resolve("basket").await.unwrap();

    let explanation = resolver.explain("basket").await.unwrap();
    let Some(cache) = &explanation.cache else {
        panic!("the resolved query is not cached: {explanation}")
    };
    assert!(!cache.is_stale());
    assert_eq!(cache.set.provider(), Some("dns-srv"));
    // dnsmasq's TTL is 30 s: the entry is refreshed within it.
    let refresh_in = cache.refresh_in.expect("refreshed on its TTL");
    assert!(
        refresh_in <= Duration::from_secs(30) && refresh_in > Duration::from_secs(20),
        "{refresh_in:?}"
    );
    let text = explanation.to_string();
    assert!(text.contains("cache      fresh: 1 endpoint answered"), "{text}");
    assert!(
        text.contains("  import   dns SRV _default._tcp.basket.cluster.local → 1 record"),
        "{text}"
    );
    assert!(
        resolver.explain("https+://basket").await.is_err(),
        "a query that does not parse is an error"
    );
}
