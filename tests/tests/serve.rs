//! `wasd serve`, the sidecar, driven as a subprocess and asked by clients no one here
//! wrote: `dig` and dnspython for DNS (UDP and TCP), `curl` and Python's urllib for the
//! HTTP API, headless chromium (driven by Playwright) for the status page.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use wasd_tests::peers::{Calls, GrpcServers, Reaped, XdsClient};
use wasd_tests::{EtcdServer, Lines, Sandbox, python_clients, run, run_within, workspace_root};

/// `SERVICE.ZONE` asks `SERVICE` as `wasd resolve SERVICE` does: the configuration
/// provider's `default` endpoints (Microsoft's rule); named ones are asked by SRV.
const APPSETTINGS: &str = r#"{"Services": {
  "catalog": {"default": ["https://127.0.0.1:8443", "https://10.46.24.90:443", "http://10.0.0.7:8080"]},
  "basket": {"default": "http://10.0.0.1:80", "dashboard": "https://10.2.3.4:9999"},
  "v6": {"default": "http://[fd00::1]:8080"}
}}"#;

/// Config first, nothing after it (no pass-through: an unknown service is unknown).
const CONFIG_ONLY: &str = r#"
pass-through = false
[[provider]]
builtin = "config"
grants = { files = ["appsettings.json"] }
"#;

/// A running `wasd serve` on free ports; killed when dropped.
struct Served {
    child: Option<Child>,
    http: String,
    dns_port: String,
    /// The xDS server's address, when started with `--xds`.
    xds: Option<String>,
    /// The server's log, when captured.
    stderr: Option<Lines>,
    _stdout: Lines,
}

impl Served {
    fn start(sandbox: &Sandbox) -> Served {
        Served::start_with(sandbox, &[])
    }

    /// With these environment variables.
    fn start_with(sandbox: &Sandbox, env: &[(&str, &str)]) -> Served {
        Served::start_with_args(sandbox, env, &[])
    }

    /// With these environment variables and extra arguments (`--xds ADDR`).
    fn start_with_args(sandbox: &Sandbox, env: &[(&str, &str)], extra: &[&str]) -> Served {
        Served::start_full(sandbox, env, extra, false)
    }

    /// With the server's stderr read by the test (`Served::stderr`) instead of shown.
    fn start_full(sandbox: &Sandbox, env: &[(&str, &str)], extra: &[&str], capture: bool) -> Served {
        let mut child = sandbox
            .wasd()
            .envs(env.iter().copied())
            .args([
                "serve",
                "--config",
                "wasd.toml",
                "--http",
                "127.0.0.1:0",
                "--dns",
                "127.0.0.1:0",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if capture { Stdio::piped() } else { Stdio::inherit() })
            .spawn()
            .expect("starting wasd serve");
        let stdout = Lines::new(child.stdout.take().unwrap());
        let stderr = child.stderr.take().map(Lines::new);
        let http_line = stdout.next(Duration::from_secs(60), "the HTTP listener's line");
        let dns_line = stdout.next(Duration::from_secs(10), "the DNS listener's line");
        let http = http_line
            .strip_prefix("serving HTTP on ")
            .unwrap_or_else(|| panic!("{http_line}"))
            .to_owned();
        let dns = dns_line
            .strip_prefix("serving DNS on ")
            .and_then(|rest| rest.split_once(' '))
            .map(|(address, rest)| {
                assert_eq!(rest, "(UDP and TCP) for wasd.internal", "{dns_line}");
                address.to_owned()
            })
            .unwrap_or_else(|| panic!("{dns_line}"));
        let dns_port = dns.rsplit_once(':').unwrap().1.to_owned();
        let xds = extra.contains(&"--xds").then(|| {
            let line = stdout.next(Duration::from_secs(10), "the xDS listener's line");
            line.strip_prefix("serving xDS on ")
                .unwrap_or_else(|| panic!("{line}"))
                .to_owned()
        });
        Served {
            child: Some(child),
            http,
            dns_port,
            xds,
            stderr,
            _stdout: stdout,
        }
    }

    /// `curl` a path: the status and the body.
    fn get(&self, path: &str) -> (u16, String) {
        curl(&[&format!("{}{path}", self.http)])
    }

    /// Follow `/v1/watch` (each call blocking until the set changes) until `done`
    /// holds for the answer; fail after `within`.
    fn watch_until(&self, query: &str, within: Duration, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        let mut index = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "waited {within:?} for {what}");
            let wait = left.as_secs().clamp(1, 30);
            let (status, body) = self.get(&format!("/v1/watch?query={query}&index={index}&wait={wait}s"));
            assert_eq!(status, 200, "{body}");
            let answer = json(&body);
            if done(&answer) {
                return answer;
            }
            index = answer["index"].as_u64().unwrap();
        }
    }

    /// A `/v1/watch` of `query` at `index` (waiting up to 60 s) made by curl on a
    /// thread, returned once the server counts it blocked; the thread gives curl's
    /// answer (`extra`: more curl arguments) and when it came.
    fn blocked_watch(
        &self,
        query: &str,
        index: u64,
        extra: &[&str],
    ) -> std::thread::JoinHandle<((u16, String), Instant)> {
        let url = format!("{}/v1/watch?query={query}&index={index}&wait=60s", self.http);
        let mut args: Vec<String> = extra.iter().map(|a| (*a).to_owned()).collect();
        args.push(url);
        let waiting = std::thread::spawn(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let answer = curl(&args);
            (answer, Instant::now())
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, status) = self.get("/v1/status");
            if json(&status)["blocked_watches"] == 1 {
                return waiting;
            }
            assert!(Instant::now() < deadline, "the watch never blocked: {status}");
            assert!(!waiting.is_finished(), "the watch returned before it blocked");
        }
    }

    /// `dig` a name and type at the server; `extra` as dig takes them (`+tcp`).
    fn dig(&self, name: &str, qtype: &str, extra: &[&str]) -> Dig {
        let out = run_within(
            Command::new("dig")
                .args(["@127.0.0.1", "-p", &self.dns_port, name, qtype])
                .args([
                    "+noall",
                    "+comments",
                    "+answer",
                    "+authority",
                    "+additional",
                    "+tries=1",
                    "+time=5",
                ])
                .args(extra),
            Duration::from_secs(20),
        );
        assert_eq!(out.code, 0, "dig failed: {}{}", out.stdout, out.stderr);
        Dig::parse(&out.stdout)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `curl -s` with the status code appended: (status, body).
fn curl(args: &[&str]) -> (u16, String) {
    let out = run_within(
        Command::new("curl")
            .args(["-s", "--max-time", "60", "-w", "\n%{http_code}"])
            .args(args),
        Duration::from_secs(70),
    );
    assert_eq!(out.code, 0, "curl failed: {}", out.stderr);
    let (body, status) = out.stdout.rsplit_once('\n').unwrap();
    (status.parse().unwrap(), body.to_owned())
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// What dig printed: the status, the flags, and the records of each section as
/// `(name, ttl, type, data)`.
#[derive(Debug)]
struct Dig {
    status: String,
    flags: String,
    answer: Vec<(String, u32, String, String)>,
    authority: Vec<(String, u32, String, String)>,
    additional: Vec<(String, u32, String, String)>,
}

impl Dig {
    fn parse(text: &str) -> Dig {
        let mut dig = Dig {
            status: String::new(),
            flags: String::new(),
            answer: Vec::new(),
            authority: Vec::new(),
            additional: Vec::new(),
        };
        let mut section = "";
        for line in text.lines() {
            if let Some(rest) = line.split_once("status: ") {
                dig.status = rest.1.split(',').next().unwrap().to_owned();
            } else if let Some(rest) = line.strip_prefix(";; flags: ") {
                dig.flags = rest.split(';').next().unwrap().to_owned();
            } else if line.starts_with(";; ANSWER SECTION") {
                section = "answer";
            } else if line.starts_with(";; AUTHORITY SECTION") {
                section = "authority";
            } else if line.starts_with(";; ADDITIONAL SECTION") {
                section = "additional";
            } else if !line.starts_with(';') && !line.trim().is_empty() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let record = (
                    fields[0].to_owned(),
                    fields[1].parse().unwrap(),
                    fields[3].to_owned(),
                    fields[4..].join(" "),
                );
                match section {
                    "answer" => dig.answer.push(record),
                    "authority" => dig.authority.push(record),
                    "additional" => dig.additional.push(record),
                    _ => panic!("a record outside a section: {line}"),
                }
            }
        }
        dig
    }

    fn data(&self) -> Vec<&str> {
        let mut data: Vec<&str> = self.answer.iter().map(|r| r.3.as_str()).collect();
        data.sort();
        data
    }
}

fn sandbox(config: &str) -> Sandbox {
    let sandbox = Sandbox::new();
    sandbox.write("appsettings.json", APPSETTINGS);
    sandbox.write("wasd.toml", config);
    sandbox
}

#[test]
fn dns_answers_a_srv_nxdomain_nodata_and_refused_as_dig_reads_them() {
    let sandbox = sandbox(CONFIG_ONLY);
    let served = Served::start(&sandbox);

    // A: every endpoint's address, authoritative, TTL capped at 5 s.
    let a = served.dig("catalog.wasd.internal", "A", &[]);
    assert_eq!(a.status, "NOERROR", "{a:?}");
    assert!(a.flags.split_whitespace().any(|f| f == "aa"), "{a:?}");
    assert_eq!(a.data(), ["10.0.0.7", "10.46.24.90", "127.0.0.1"]);
    assert!(a.answer.iter().all(|r| r.1 <= 5), "{a:?}");
    // The same over TCP.
    let tcp = served.dig("catalog.wasd.internal", "A", &["+tcp"]);
    assert_eq!(tcp.data(), a.data());

    // SRV by scheme: the https endpoints, each target answered in the additional
    // section and by the server itself.
    let srv = served.dig("_https._tcp.catalog.wasd.internal", "SRV", &[]);
    assert_eq!(srv.status, "NOERROR", "{srv:?}");
    assert_eq!(
        srv.data(),
        [
            "1 1 443 10-46-24-90.addr.wasd.internal.",
            "1 1 8443 127-0-0-1.addr.wasd.internal."
        ]
    );
    let mut additional: Vec<_> = srv
        .additional
        .iter()
        .map(|r| (r.0.as_str(), r.2.as_str(), r.3.as_str()))
        .collect();
    additional.sort();
    assert_eq!(
        additional,
        [
            ("10-46-24-90.addr.wasd.internal.", "A", "10.46.24.90"),
            ("127-0-0-1.addr.wasd.internal.", "A", "127.0.0.1")
        ]
    );
    let target = served.dig("127-0-0-1.addr.wasd.internal", "A", &[]);
    assert_eq!(target.data(), ["127.0.0.1"]);
    // SRV by endpoint name, and `_default` for the unnamed ones.
    let named = served.dig("_dashboard._tcp.basket.wasd.internal", "SRV", &[]);
    assert_eq!(named.data(), ["1 1 9999 10-2-3-4.addr.wasd.internal."]);
    let default = served.dig("_default._tcp.basket.wasd.internal", "SRV", &[]);
    assert_eq!(default.data(), ["1 1 80 10-0-0-1.addr.wasd.internal."]);
    // A name no endpoint has.
    let none = served.dig("_nothing._tcp.basket.wasd.internal", "SRV", &[]);
    assert_eq!(none.status, "NXDOMAIN", "{none:?}");

    // AAAA of a service with only IPv4 endpoints: the name exists, that type does not.
    let nodata = served.dig("catalog.wasd.internal", "AAAA", &[]);
    assert_eq!(nodata.status, "NOERROR", "{nodata:?}");
    assert!(nodata.answer.is_empty(), "{nodata:?}");
    assert_eq!(nodata.authority.len(), 1, "the zone's SOA: {nodata:?}");
    assert_eq!(nodata.authority[0].2, "SOA");
    let v6 = served.dig("v6.wasd.internal", "AAAA", &[]);
    assert_eq!(v6.data(), ["fd00::1"]);

    // Nobody knows the service.
    let unknown = served.dig("nosuch.wasd.internal", "A", &[]);
    assert_eq!(unknown.status, "NXDOMAIN", "{unknown:?}");
    assert_eq!(unknown.authority.first().map(|r| r.2.as_str()), Some("SOA"));
    // Outside the zone.
    let outside = served.dig("example.com", "A", &[]);
    assert_eq!(outside.status, "REFUSED", "{outside:?}");
    // The apex.
    let soa = served.dig("wasd.internal", "SOA", &[]);
    assert_eq!(soa.answer.len(), 1, "{soa:?}");
}

#[test]
fn dns_answers_with_many_endpoints_are_truncated_over_udp_and_whole_over_tcp() {
    let sandbox = Sandbox::new();
    let urls: Vec<String> = (1..=80).map(|i| format!("\"http://10.1.0.{i}:80\"")).collect();
    sandbox.write(
        "appsettings.json",
        format!(
            r#"{{"Services": {{"many": {{"default": [{}]}}}}}}"#,
            urls.join(", ")
        ),
    );
    sandbox.write("wasd.toml", CONFIG_ONLY);
    let served = Served::start(&sandbox);
    // Without EDNS the answer must fit 512 bytes: dig sees TC and, told to, retries
    // over TCP and gets them all.
    let udp = served.dig("many.wasd.internal", "A", &["+noedns", "+ignore"]);
    assert!(udp.flags.split_whitespace().any(|f| f == "tc"), "{udp:?}");
    assert!(udp.answer.len() < 80, "{}", udp.answer.len());
    let tcp = served.dig("many.wasd.internal", "A", &["+tcp"]);
    assert_eq!(tcp.answer.len(), 80);
    // With EDNS and a 4096-byte buffer, all 80 fit over UDP.
    let edns = served.dig("many.wasd.internal", "A", &["+bufsize=4096"]);
    assert_eq!(edns.answer.len(), 80, "{:?}", edns.flags);
}

#[test]
fn http_resolve_serves_the_cli_json_and_says_what_failed_with_its_status() {
    let sandbox = sandbox(CONFIG_ONLY);
    let served = Served::start(&sandbox);

    let (status, body) = served.get("/v1/resolve?query=https%2Bhttp://catalog");
    assert_eq!(status, 200, "{body}");
    let mut served_json = json(&body);
    let cli = run(sandbox.wasd().args([
        "resolve",
        "https+http://catalog",
        "--json",
        "--config",
        "wasd.toml",
    ]));
    assert_eq!(cli.code, 0, "{}", cli.stderr);
    let mut cli_json = json(&cli.stdout);
    // The index is the process's own change number; everything else is the same.
    assert!(served_json["index"].as_u64().unwrap() > 0);
    served_json.as_object_mut().unwrap().remove("index");
    cli_json.as_object_mut().unwrap().remove("index");
    assert_eq!(served_json, cli_json);

    // Filters, repeated.
    let (status, body) = served.get("/v1/resolve?query=basket&filter=zone%3Deu");
    assert_eq!(status, 404, "{body}");
    assert_eq!(json(&body)["error"], "no endpoints for service 'basket'");

    let (status, body) = served.get("/v1/resolve?query=nosuch");
    assert_eq!(
        (status, json(&body)["error"].clone()),
        (404, "no endpoints for service 'nosuch'".into())
    );
    let (status, body) = served.get("/v1/resolve?query=https%2B://catalog");
    assert_eq!(status, 400, "{body}");
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .contains("https+://catalog"),
        "{body}"
    );
    let (status, body) = served.get("/v1/resolve");
    assert_eq!(status, 400, "{body}");
    let (status, body) = served.get("/v1/nothing");
    assert_eq!(status, 404, "{body}");

    let (status, body) = served.get("/healthz");
    assert_eq!((status, json(&body)["status"].clone()), (200, "ok".into()));
    let (status, body) = served.get("/v1/status");
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["providers"][0]["name"], "config");
    assert_eq!(json(&body)["providers"][0]["state"], "serving");
    let (status, body) = served.get("/metrics");
    assert_eq!(status, 200);
    assert!(
        body.lines().any(|l| l.starts_with("wasd_provider_calls_total{")),
        "{body}"
    );
}

#[test]
fn http_pick_turns_through_the_configured_policy_across_requests() {
    let config = format!("{CONFIG_ONLY}[[policy]]\nservice = \"basket\"\nstrategy = \"consistent-hash\"\n");
    let sandbox = sandbox(&config);
    let served = Served::start(&sandbox);
    let pick = |path: &str| {
        let (status, body) = served.get(path);
        assert_eq!(status, 200, "{body}");
        json(&body)
    };
    // catalog has no policy: round-robin, whose turn the server keeps across requests
    // (one balancer per query): three requests, its three endpoints.
    let picks: Vec<Value> = (0..3).map(|_| pick("/v1/pick?query=catalog")).collect();
    assert_eq!(picks[0]["strategy"], "round-robin");
    assert_eq!(picks[0]["health"], "healthy");
    let mut endpoints: Vec<&str> = picks.iter().map(|p| p["endpoint"].as_str().unwrap()).collect();
    endpoints.sort();
    assert_eq!(
        endpoints,
        [
            "http://10.0.0.7:8080",
            "https://10.46.24.90:443",
            "https://127.0.0.1:8443"
        ]
    );
    let one = picks
        .iter()
        .find(|p| p["endpoint"] == "https://127.0.0.1:8443")
        .unwrap();
    assert_eq!(
        (one["host"].clone(), one["port"].clone()),
        ("127.0.0.1".into(), 8443.into())
    );
    // basket's policy: consistent hashing, one key to one endpoint every time.
    let keyed: Vec<Value> = (0..5).map(|_| pick("/v1/pick?query=basket&key=user-1")).collect();
    assert_eq!(keyed[0]["strategy"], "consistent-hash");
    assert!(
        keyed.iter().all(|p| p["endpoint"] == "http://10.0.0.1:80"),
        "{keyed:?}"
    );
    // As /v1/resolve: 404 without endpoints (filters apply), 400 for a bad query.
    let (status, body) = served.get("/v1/pick?query=catalog&filter=zone%3Deu");
    assert_eq!(status, 404, "{body}");
    let (status, body) = served.get("/v1/pick?query=https%2B://catalog");
    assert_eq!(status, 400, "{body}");
}

#[test]
fn a_failing_provider_is_503_in_http_and_servfail_in_dns_never_a_later_answer() {
    // etcd first, on a port where nothing listens; config after it knows catalog.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let sandbox = sandbox(&format!(
        r#"
pass-through = false
[[provider]]
builtin = "etcd"
settings = {{ endpoints = ["http://{closed}"] }}
grants = {{ http = ["http://{closed}"] }}
[[provider]]
builtin = "config"
grants = {{ files = ["appsettings.json"] }}
"#
    ));
    let served = Served::start(&sandbox);
    let (status, body) = served.get("/v1/resolve?query=catalog");
    assert_eq!(status, 503, "{body}");
    let error = json(&body)["error"].as_str().unwrap().to_owned();
    assert!(
        error.contains("provider 'etcd'") && error.contains(&closed.to_string()),
        "{error}"
    );
    let dns = served.dig("catalog.wasd.internal", "A", &[]);
    assert_eq!(dns.status, "SERVFAIL", "{dns:?}");
}

#[test]
fn a_blocking_watch_returns_when_the_endpoints_change_and_after_wait_when_not() {
    let sandbox = sandbox(CONFIG_ONLY);
    let served = Served::start(&sandbox);
    let (status, body) = served.get("/v1/watch?query=basket&index=0");
    assert_eq!(status, 200, "{body}");
    let index = json(&body)["index"].as_u64().unwrap();

    // Unchanged: back after `wait` with the same index.
    let began = Instant::now();
    let (status, body) = served.get(&format!("/v1/watch?query=basket&index={index}&wait=1s"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["index"].as_u64(), Some(index));
    assert!(
        began.elapsed() >= Duration::from_millis(900),
        "{:?}",
        began.elapsed()
    );

    // A change to appsettings.json reaches a blocked watch, made once the server
    // holds the request (its status counts it).
    let began = Instant::now();
    let waiting = served.blocked_watch("basket", index, &["-D", "-"]);
    sandbox.write(
        "appsettings.json",
        APPSETTINGS.replace("http://10.0.0.1:80", "http://10.0.0.2:80"),
    );
    let changed_at = Instant::now();
    let ((status, response), answered) = waiting.join().unwrap();
    let took = answered - began;
    assert_eq!(status, 200, "{response}");
    let (headers, body) = response.split_once("\r\n\r\n").unwrap();
    let changed = json(body);
    assert_eq!(
        changed["endpoints"][0]["endpoint"], "http://10.0.0.2:80",
        "{body}"
    );
    let new_index = changed["index"].as_u64().unwrap();
    assert!(new_index > index);
    assert!(
        headers
            .lines()
            .any(|l| l.eq_ignore_ascii_case(&format!("x-wasd-index: {new_index}"))),
        "{headers}"
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert!(
        changed_at.elapsed() < Duration::from_secs(3),
        "the change took {:?}",
        changed_at.elapsed()
    );
}

#[test]
fn serve_exits_0_on_sigterm_and_refuses_an_unguarded_public_address() {
    let sandbox = sandbox(CONFIG_ONLY);
    let mut served = Served::start(&sandbox);
    // A watch blocked when the signal comes is answered, not cut off.
    let (_, body) = served.get("/v1/watch?query=basket&index=0");
    let index = json(&body)["index"].as_u64().unwrap();
    let waiting = served.blocked_watch("basket", index, &[]);
    // A second server on the same DNS port fails at start (the UDP sockets share
    // the port within one server only).
    let second = run(sandbox.wasd().args([
        "serve",
        "--config",
        "wasd.toml",
        "--http",
        "127.0.0.1:0",
        "--dns",
        &format!("127.0.0.1:{}", served.dns_port),
    ]));
    assert_eq!(second.code, 1, "{}", second.stderr);
    assert!(
        second.stderr.starts_with(&format!(
            "wasd: cannot listen for DNS (TCP) on 127.0.0.1:{}: ",
            served.dns_port
        )),
        "{}",
        second.stderr
    );
    let mut child = served.child.take().unwrap();
    let pid = child.id().to_string();
    let (tx, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = exited
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            panic!("wasd serve did not exit within 10 s of SIGTERM")
        })
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let ((status, body), _) = waiting.join().unwrap();
    assert_eq!(
        (status, json(&body)["index"].as_u64()),
        (200, Some(index)),
        "{body}"
    );

    let out = run(sandbox
        .wasd()
        .args(["serve", "--config", "wasd.toml", "--http", "0.0.0.0:0"]));
    assert_eq!(out.code, 1);
    assert_eq!(
        out.stderr,
        "wasd: refusing to serve the HTTP API on 0.0.0.0:0 without a token: set [serve] token-env, or listen on a loopback address\n"
    );
}

/// Endpoint strings of a `/v1/watch` or `/v1/resolve` answer.
fn endpoints(answer: &Value) -> Vec<String> {
    answer["endpoints"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|e| e["endpoint"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Registers, renews every 0.5 s for `RENEWALS` times, then stops: a client of the
/// HTTP API in Python's standard library, printing a line per PUT.
const RENEWING_CLIENT: &str = r#"
import json, sys, time, urllib.request
base, token, renewals = sys.argv[1], sys.argv[2], int(sys.argv[3])
body = json.dumps({"endpoints": ["http://10.9.0.1:80"], "version": "v1", "ttl": "2s"}).encode()
for i in range(renewals):
    request = urllib.request.Request(base + "/v1/instances/basket/one", data=body, method="PUT",
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = json.load(response)
    print("put", answer["state"], flush=True)
    time.sleep(0.5)
print("stopped", flush=True)
"#;

#[test]
fn an_instance_lives_while_its_client_renews_it_and_a_delete_reaches_a_blocked_watch_within_1s() {
    let etcd = EtcdServer::start();
    let sandbox = Sandbox::new();
    sandbox.write(
        "wasd.toml",
        format!(
            "{}\n[serve]\ntoken-env = \"WASD_TOKEN\"\n",
            etcd.only_provider_config()
        ),
    );
    let served = Served::start_with(&sandbox, &[("WASD_TOKEN", "s3cret")]);
    let instance_url = format!("{}/v1/instances/basket/one", served.http);
    let body = r#"{"endpoints": ["http://10.9.0.1:80"], "ttl": "2s"}"#;

    // Without the token, or with another, mutating calls are refused.
    let (status, answer) = curl(&["-X", "PUT", "-d", body, &instance_url]);
    assert_eq!(status, 401, "{answer}");
    let (status, _) = curl(&[
        "-X",
        "PUT",
        "-H",
        "Authorization: Bearer s3cre7",
        "-d",
        body,
        &instance_url,
    ]);
    assert_eq!(status, 401);
    let (status, answer) = curl(&[
        "-X",
        "PUT",
        "-H",
        "Authorization: Bearer s3cret",
        "-d",
        "{\"endpoints\": 1}",
        &instance_url,
    ]);
    assert_eq!(status, 400, "{answer}");
    assert!(
        json(&answer)["error"]
            .as_str()
            .unwrap()
            .starts_with("the body is not an instance"),
        "{answer}"
    );

    // A client that renews eight times, 0.5 s apart, with a TTL of 2 s.
    let mut client = Command::new("python3")
        .args(["-c", RENEWING_CLIENT, &served.http, "s3cret", "8"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let said = Lines::new(client.stdout.take().unwrap());
    assert_eq!(
        said.next(Duration::from_secs(20), "the first PUT")
            .split_whitespace()
            .next(),
        Some("put")
    );
    served.watch_until("basket", Duration::from_secs(20), "the instance in etcd", |a| {
        endpoints(a) == ["http://10.9.0.1:80"]
    });
    let (_, status) = served.get("/v1/status");
    let held = &json(&status)["instances"][0];
    assert_eq!(
        (held["service"].as_str(), held["id"].as_str()),
        (Some("basket"), Some("one"))
    );
    assert_eq!(held["ttl_ms"], 2000);
    // It renews past its first TTL: still there after the client's last PUT...
    let rest = said.rest(Duration::from_secs(30));
    assert_eq!(rest.last().map(String::as_str), Some("stopped"), "{rest:?}");
    let stopped = Instant::now();
    let (status, answer) = served.get("/v1/resolve?query=basket");
    assert_eq!(
        (status, endpoints(&json(&answer))),
        (200, vec!["http://10.9.0.1:80".to_owned()])
    );
    // ...and gone once 2 s pass without one.
    served.watch_until("basket", Duration::from_secs(20), "the instance to go", |a| {
        endpoints(a).is_empty()
    });
    let gone = stopped.elapsed();
    assert!(
        gone >= Duration::from_millis(1000),
        "deregistered too early: {gone:?}"
    );
    assert!(gone <= Duration::from_secs(5), "deregistered too late: {gone:?}");
    let _ = client.wait();

    // DELETE: a watch blocked on the registered set hears of it within 1 s.
    let (status, answer) = curl(&[
        "-X",
        "PUT",
        "-H",
        "Authorization: Bearer s3cret",
        "-d",
        body,
        &instance_url,
    ]);
    assert_eq!(status, 200, "{answer}");
    let registered = served.watch_until("basket", Duration::from_secs(20), "the instance again", |a| {
        !endpoints(a).is_empty()
    });
    let index = registered["index"].as_u64().unwrap();
    let waiting = served.blocked_watch("basket", index, &[]);
    let (status, answer) = curl(&[
        "-X",
        "DELETE",
        "-H",
        "Authorization: Bearer s3cret",
        &instance_url,
    ]);
    assert_eq!(status, 200, "{answer}");
    let deleted = Instant::now();
    let ((status, answer), heard) = waiting.join().unwrap();
    assert_eq!(status, 200, "{answer}");
    assert!(endpoints(&json(&answer)).is_empty(), "{answer}");
    let took = heard.saturating_duration_since(deleted);
    assert!(
        took < Duration::from_secs(1),
        "the delete reached the watch after {took:?}"
    );
    let (status, _) = curl(&[
        "-X",
        "DELETE",
        "-H",
        "Authorization: Bearer s3cret",
        &instance_url,
    ]);
    assert_eq!(status, 404);
}

/// Config first (it answers `basket`), etcd after it (the registrar), on `url`.
fn config_then_etcd(url: &str) -> String {
    format!(
        r#"
pass-through = false
[[provider]]
builtin = "config"
grants = {{ files = ["appsettings.json"] }}
[[provider]]
builtin = "etcd"
settings = {{ endpoints = ["{url}"] }}
grants = {{ http = ["{url}"] }}
"#
    )
}

#[test]
fn the_status_page_shows_providers_services_and_registrations_and_follows_a_file_change_in_chromium() {
    let python = python_clients();
    let etcd = EtcdServer::start();
    let sandbox = sandbox(&config_then_etcd(&etcd.url()));
    let served = Served::start(&sandbox);
    // A service asked for, and an instance registered through the sidecar.
    let (status, body) = served.get("/v1/resolve?query=basket");
    assert_eq!(status, 200, "{body}");
    let (status, body) = curl(&[
        "-X",
        "PUT",
        "-d",
        r#"{"endpoints": ["http://10.9.0.1:80"], "ttl": "1h"}"#,
        &format!("{}/v1/instances/basket/one", served.http),
    ]);
    assert_eq!(status, 200, "{body}");

    // The page is served whole from the binary, with a policy that loads nothing
    // from elsewhere.
    let (status, page) = served.get("/");
    assert_eq!(status, 200);
    assert!(page.contains("<script src=\"/status.js\""), "{page}");
    let headers = run_within(
        Command::new("curl").args(["-s", "-D", "-", "-o", "/dev/null", &format!("{}/", served.http)]),
        Duration::from_secs(20),
    );
    assert!(
        headers
            .stdout
            .to_ascii_lowercase()
            .contains("content-security-policy: default-src 'none'; script-src 'self'"),
        "{}",
        headers.stdout
    );

    let artifacts = workspace_root().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("status-page.png");
    let _ = std::fs::remove_file(&screenshot);
    let mut browser = Reaped(
        Command::new(&python)
            .arg(workspace_root().join("tests/clients/status_page.py"))
            .arg(&served.http)
            .arg(&screenshot)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the browser client"),
    );
    let said = Lines::new(browser.0.stdout.take().unwrap());
    assert_eq!(
        said.next(
            Duration::from_secs(90),
            "the page showing basket and its registration"
        ),
        "shown"
    );

    sandbox.write(
        "appsettings.json",
        APPSETTINGS.replace("http://10.0.0.1:80", "http://10.0.0.2:80"),
    );
    let changed_at = Instant::now();
    writeln!(browser.0.stdin.as_mut().unwrap(), "changed").unwrap();
    let changed = said.next(Duration::from_secs(30), "the page showing the change");
    let took = changed_at.elapsed();
    assert!(changed.starts_with("changed "), "{changed}");
    assert!(
        took < Duration::from_secs(3),
        "the page showed the change after {took:?}"
    );
    // No console error or warning, no page error, no failed request.
    let rest = said.rest(Duration::from_secs(30));
    assert_eq!(rest, ["done"], "the browser saw problems");
    assert!(browser.0.wait().unwrap().success());
    let mut png = Vec::new();
    std::fs::File::open(&screenshot)
        .and_then(|mut f| f.read_to_end(&mut png))
        .unwrap_or_else(|e| panic!("no screenshot at {}: {e}", screenshot.display()));
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    eprintln!("the status page's screenshot: {}", screenshot.display());
}

/// Asks the sidecar's DNS server with dnspython (a resolver and raw queries) and prints
/// what it read as JSON; a bad packet's rcode too, and an answer after it.
const DNSPYTHON_CLIENT: &str = r#"
import json, socket, sys
import dns.message, dns.query, dns.rcode, dns.resolver
port = int(sys.argv[1])
resolver = dns.resolver.Resolver(configure=False)
resolver.nameservers = ["127.0.0.1"]
resolver.port = port
resolver.lifetime = 5
out = {}
a = resolver.resolve("catalog.wasd.internal", "A")
out["a"] = sorted(r.address for r in a)
out["a_ttl"] = a.rrset.ttl
srv = resolver.resolve("_https._tcp.catalog.wasd.internal", "SRV")
out["srv"] = sorted(f"{r.priority} {r.weight} {r.port} {r.target}" for r in srv)
out["additional"] = sorted(f"{rrset.name} {r.address}" for rrset in srv.response.additional for r in rrset)
try:
    resolver.resolve("nosuch.wasd.internal", "A")
    out["unknown"] = "answered"
except dns.resolver.NXDOMAIN:
    out["unknown"] = "NXDOMAIN"
try:
    resolver.resolve("catalog.wasd.internal", "AAAA")
    out["nodata"] = "answered"
except dns.resolver.NoAnswer:
    out["nodata"] = "NoAnswer"
tcp = dns.query.tcp(dns.message.make_query("catalog.wasd.internal", "A"), "127.0.0.1", port=port, timeout=5)
out["tcp"] = sorted(r.address for rrset in tcp.answer for r in rrset)
outside = dns.query.udp(dns.message.make_query("example.com", "A"), "127.0.0.1", port=port, timeout=5)
out["outside"] = dns.rcode.to_text(outside.rcode())
# A header that promises a question the packet does not hold.
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(5)
sock.sendto(bytes.fromhex("abcd01000001000000000000") + b"\x07catal", ("127.0.0.1", port))
reply, _ = sock.recvfrom(512)
out["bad_packet"] = dns.rcode.to_text(reply[3] & 0x0F) if reply[:2] == b"\xab\xcd" else "wrong id"
after = resolver.resolve("basket.wasd.internal", "A")
out["after"] = [r.address for r in after]
print(json.dumps(out))
"#;

#[test]
fn dnspython_reads_a_srv_with_additional_nxdomain_nodata_refused_and_formerr() {
    let python = python_clients();
    let sandbox = sandbox(CONFIG_ONLY);
    let served = Served::start(&sandbox);
    let out = run_within(
        Command::new(python).args(["-c", DNSPYTHON_CLIENT, &served.dns_port]),
        Duration::from_secs(60),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let read = json(&out.stdout);
    assert_eq!(
        read["a"],
        serde_json::json!(["10.0.0.7", "10.46.24.90", "127.0.0.1"])
    );
    assert!(read["a_ttl"].as_u64().unwrap() <= 5, "{read}");
    assert_eq!(
        read["srv"],
        serde_json::json!([
            "1 1 443 10-46-24-90.addr.wasd.internal.",
            "1 1 8443 127-0-0-1.addr.wasd.internal."
        ])
    );
    assert_eq!(
        read["additional"],
        serde_json::json!([
            "10-46-24-90.addr.wasd.internal. 10.46.24.90",
            "127-0-0-1.addr.wasd.internal. 127.0.0.1"
        ])
    );
    assert_eq!(read["unknown"], "NXDOMAIN");
    assert_eq!(read["nodata"], "NoAnswer");
    assert_eq!(read["tcp"], read["a"]);
    assert_eq!(read["outside"], "REFUSED");
    assert_eq!(read["bad_packet"], "FORMERR");
    assert_eq!(read["after"], serde_json::json!(["10.0.0.1"]));
}

#[test]
fn a_change_written_to_etcd_reaches_a_blocked_watch_within_1s() {
    let etcd = EtcdServer::start();
    let sandbox = Sandbox::new();
    sandbox.write("wasd.toml", etcd.only_provider_config());
    let served = Served::start(&sandbox);
    etcd.put_instance("catalog", "one", "v1", &["http://10.8.0.1:80"], None);
    let first = served.watch_until("catalog", Duration::from_secs(20), "the first instance", |a| {
        endpoints(a) == ["http://10.8.0.1:80"]
    });
    let index = first["index"].as_u64().unwrap();

    // Measured five times: each write made once the watch is held, each heard within 1 s.
    let mut took = Vec::new();
    let mut index = index;
    for round in 2..=6 {
        let waiting = served.blocked_watch("catalog", index, &[]);
        let endpoint = format!("http://10.8.0.{round}:80");
        etcd.put_instance("catalog", &format!("n{round}"), "v1", &[&endpoint], None);
        let written = Instant::now();
        let ((status, answer), heard) = waiting.join().unwrap();
        assert_eq!(status, 200, "{answer}");
        let answer = json(&answer);
        assert!(endpoints(&answer).contains(&endpoint), "{answer}");
        index = answer["index"].as_u64().unwrap();
        took.push(heard.saturating_duration_since(written));
    }
    eprintln!("etcd write → blocked watch answered: {took:?}");
    assert!(took.iter().all(|t| *t < Duration::from_secs(1)), "{took:?}");
}

#[test]
fn the_http_api_bounds_headers_bodies_and_time_and_answers_json() {
    let sandbox = sandbox(CONFIG_ONLY);
    let served = Served::start(&sandbox);
    let address = served.http.strip_prefix("http://").unwrap().to_owned();

    // A client that never finishes its headers is cut off; one that never sends the
    // body it announced gets 408. Both started first: each takes the 10 s limit.
    let slow_head = {
        let address = address.clone();
        std::thread::spawn(move || {
            let mut stream = std::net::TcpStream::connect(&address).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
            let began = Instant::now();
            let mut reply = Vec::new();
            let read = stream.read_to_end(&mut reply);
            (read.map_err(|e| e.kind()), reply, began.elapsed())
        })
    };
    let slow_body = std::thread::spawn(move || {
        let mut stream = std::net::TcpStream::connect(&address).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        stream
            .write_all(b"PUT /v1/instances/basket/one HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{\"endpoints\"")
            .unwrap();
        let began = Instant::now();
        let mut reply = [0; 4096];
        let n = stream.read(&mut reply).unwrap();
        (String::from_utf8_lossy(&reply[..n]).into_owned(), began.elapsed())
    });

    // Headers: too large, too many.
    let big = format!("X-Big: {}", "x".repeat(20_000));
    let (status, _) = curl(&["-H", &big, &format!("{}/healthz", served.http)]);
    assert_eq!(status, 431);
    let mut many = Vec::new();
    for i in 0..70 {
        many.push("-H".to_owned());
        many.push(format!("X-Header-{i}: v"));
    }
    let mut args: Vec<&str> = many.iter().map(String::as_str).collect();
    let healthz = format!("{}/healthz", served.http);
    args.push(&healthz);
    let (status, _) = curl(&args);
    assert_eq!(status, 431);
    // Bodies over 64 KiB, with a length and chunked.
    let instance = format!("{}/v1/instances/basket/one", served.http);
    let large = sandbox.write("large.json", "x".repeat(70_000));
    let at_large = format!("@{}", large.display());
    let (status, body) = curl(&["-X", "PUT", "--data-binary", &at_large, &instance]);
    assert_eq!(
        (status, json(&body)["error"].as_str()),
        (413, Some("the body is larger than 64 KiB"))
    );
    let (status, body) = curl(&[
        "-X",
        "PUT",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &at_large,
        &instance,
    ]);
    assert_eq!(
        (status, json(&body)["error"].as_str()),
        (413, Some("the body is larger than 64 KiB"))
    );
    // A method the path does not take, a path that is not UTF-8: JSON reasons.
    let (status, body) = curl(&["-X", "POST", &format!("{}/v1/resolve", served.http)]);
    assert_eq!(
        (status, json(&body)["error"].as_str()),
        (405, Some("this path does not take that method"))
    );
    let (status, body) = curl(&["-X", "DELETE", &format!("{}/v1/instances/a%FF/b", served.http)]);
    assert_eq!(status, 400, "{body}");
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .starts_with("the path is not /v1/instances/SERVICE/ID"),
        "{body}"
    );

    let (read, reply, took) = slow_head.join().unwrap();
    assert_eq!(read, Ok(0), "the connection was not closed: {reply:?}");
    assert!(reply.is_empty(), "{}", String::from_utf8_lossy(&reply));
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(20)).contains(&took),
        "cut off after {took:?}"
    );
    let (reply, took) = slow_body.join().unwrap();
    assert!(reply.starts_with("HTTP/1.1 408 "), "{reply}");
    assert!(
        reply.ends_with("{\"error\":\"the body did not arrive within 10s\"}"),
        "{reply}"
    );
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(20)).contains(&took),
        "answered after {took:?}"
    );
    // The server serves on.
    assert_eq!(served.get("/healthz").0, 200);
}

fn servers_of(calls: &Calls) -> Vec<&str> {
    calls.ok.keys().map(String::as_str).collect()
}

#[test]
fn grpc_clients_find_servers_through_xds_and_follow_a_configuration_change() {
    let python = python_clients();
    let grpc = GrpcServers::start(&python, 3);
    let sandbox = Sandbox::new();
    sandbox.write(
        "appsettings.json",
        format!(
            r#"{{"Services": {{"echo": {{"default": ["{}", "{}"]}}}}}}"#,
            grpc.url(0),
            grpc.url(1)
        ),
    );
    sandbox.write("wasd.toml", CONFIG_ONLY);
    let served = Served::start_with_args(&sandbox, &[], &["--xds", "127.0.0.1:0"]);
    let mut client = XdsClient::start(&python, &sandbox, served.xds.as_deref().unwrap());

    // Round robin over both discovered servers.
    let calls = client.call("echo", 20);
    assert_eq!(calls.errors, Default::default(), "{calls:?}");
    assert_eq!(servers_of(&calls), ["s0", "s1"], "{calls:?}");
    // What the client accepted, as its own CSDS service reports it.
    let held: Vec<String> = client
        .resources()
        .iter()
        .map(|[kind, name, status, _]| format!("{kind} {name} {status}"))
        .collect();
    assert_eq!(
        held,
        [
            "Cluster echo ACKED",
            "ClusterLoadAssignment echo ACKED",
            "Listener echo ACKED"
        ]
    );

    // s2 added, s0 removed in appsettings.json: the client follows within seconds.
    sandbox.write(
        "appsettings.json",
        format!(
            r#"{{"Services": {{"echo": {{"default": ["{}", "{}"]}}}}}}"#,
            grpc.url(1),
            grpc.url(2)
        ),
    );
    let (calls, took) = client.call_until("echo", 10, Duration::from_secs(10), "s2 in, s0 out", |c| {
        servers_of(c) == ["s1", "s2"] && c.errors.is_empty()
    });
    eprintln!("appsettings.json change → calls on the new set after {took:?}: {calls:?}");

    // A service nobody knows: calls fail UNAVAILABLE, and succeed once it appears.
    let calls = client.call("lonely", 2);
    assert_eq!(calls.ok, Default::default(), "{calls:?}");
    assert_eq!(
        calls.errors.keys().collect::<Vec<_>>(),
        ["UNAVAILABLE"],
        "{calls:?}"
    );
    sandbox.write(
        "appsettings.json",
        format!(
            r#"{{"Services": {{"echo": {{"default": ["{}", "{}"]}}, "lonely": {{"default": ["{}"]}}}}}}"#,
            grpc.url(1),
            grpc.url(2),
            grpc.url(0)
        ),
    );
    client.call_until(
        "lonely",
        2,
        Duration::from_secs(10),
        "lonely to be served by s0",
        |c| servers_of(c) == ["s0"] && c.errors.is_empty(),
    );
}

#[test]
fn grpc_clients_follow_instances_registered_and_deleted_in_etcd_through_xds() {
    let python = python_clients();
    let grpc = GrpcServers::start(&python, 2);
    let etcd = EtcdServer::start();
    let sandbox = Sandbox::new();
    sandbox.write("wasd.toml", etcd.only_provider_config());
    etcd.put_instance("echo", "one", "v1", &[&grpc.url(0)], None);
    let served = Served::start_with_args(&sandbox, &[], &["--xds", "127.0.0.1:0"]);
    let mut client = XdsClient::start(&python, &sandbox, served.xds.as_deref().unwrap());
    let calls = client.call("echo", 6);
    assert_eq!(
        (servers_of(&calls), calls.errors.len()),
        (vec!["s0"], 0),
        "{calls:?}"
    );

    // A second instance registered in etcd starts receiving calls...
    etcd.put_instance("echo", "two", "v1", &[&grpc.url(1)], None);
    let (_, took) = client.call_until("echo", 6, Duration::from_secs(10), "s1 to receive calls", |c| {
        servers_of(c) == ["s0", "s1"]
    });
    eprintln!("etcd put → calls on the new instance after {took:?}");
    // ...and the first, deleted, stops receiving them.
    etcd.delete("/microservices/echo/one");
    client.call_until(
        "echo",
        6,
        Duration::from_secs(10),
        "s0 to stop receiving calls",
        |c| servers_of(c) == ["s1"] && c.errors.is_empty(),
    );
}

mod protocol {
    //! The ADS protocol's edge cases, with a client of our own (envoy-types' tonic
    //! client): grpcio never NACKs or answers a stale nonce on purpose.

    use std::time::Duration;

    use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
    use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
    use envoy_types::pb::google::rpc::Status;
    use prost::Message;
    use tokio::sync::mpsc;
    use tonic::codegen::tokio_stream::wrappers::ReceiverStream;

    use super::{APPSETTINGS, Served, json};
    use wasd_tests::Sandbox;

    const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

    fn request(
        kind: &str,
        names: &[&str],
        version: &str,
        nonce: &str,
        nack: Option<&str>,
    ) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.to_owned(),
            resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
            type_url: kind.to_owned(),
            response_nonce: nonce.to_owned(),
            error_detail: nack.map(|message| Status {
                code: 3,
                message: message.to_owned(),
                details: Vec::new(),
            }),
            ..Default::default()
        }
    }

    /// An ADS stream to `xds`: the client (which holds the connection), the requests'
    /// sender and the responses.
    async fn open(
        xds: String,
    ) -> (
        AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
        mpsc::Sender<DiscoveryRequest>,
        tonic::Streaming<DiscoveryResponse>,
    ) {
        let mut client = AggregatedDiscoveryServiceClient::connect(xds).await.unwrap();
        let (requests, outgoing) = mpsc::channel(8);
        let responses = client
            .stream_aggregated_resources(ReceiverStream::new(outgoing))
            .await
            .unwrap()
            .into_inner();
        (client, requests, responses)
    }

    /// The stream's next response, within 10 s.
    async fn next(responses: &mut tonic::Streaming<DiscoveryResponse>) -> DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(10), responses.message())
            .await
            .expect("a response within 10 s")
            .unwrap()
            .expect("the stream is open")
    }

    fn listeners(response: &DiscoveryResponse) -> Vec<String> {
        response
            .resources
            .iter()
            .map(|any| Listener::decode(any.value.as_slice()).unwrap().name)
            .collect()
    }

    fn addresses(response: &DiscoveryResponse) -> Vec<String> {
        health(response).into_iter().map(|(address, _)| address).collect()
    }

    #[test]
    fn acks_nacks_stale_nonces_pushes_and_a_closed_stream_follow_the_protocol() {
        let sandbox = Sandbox::new();
        sandbox.write("appsettings.json", APPSETTINGS);
        // `catalog` over xDS is its https endpoints.
        sandbox.write(
            "wasd.toml",
            format!(
                "{}\n[serve.xds-services.catalog]\nquery = \"https://catalog\"\n",
                super::CONFIG_ONLY
            ),
        );
        let served = Served::start_full(&sandbox, &[], &["--xds", "127.0.0.1:0"], true);
        let xds = format!("http://{}", served.xds.as_deref().unwrap());
        let status = |key: &str| json(&served.get("/v1/status").1)["xds"][key].as_u64().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (client, requests, mut responses) = open(xds).await;

            requests.send(request(LISTENER, &["basket"], "", "", None)).await.unwrap();
            let first = next(&mut responses).await;
            assert_eq!((first.type_url.as_str(), first.version_info.as_str()), (LISTENER, "1"));
            assert_eq!(listeners(&first), ["basket"]);
            // A NACK is not answered; an answer to a nonce never sent is stale and
            // ignored (its names too); an ACK with new names is answered with them.
            requests
                .send(request(LISTENER, &["basket"], "", &first.nonce, Some("rejected by the test")))
                .await
                .unwrap();
            requests
                .send(request(LISTENER, &["basket", "stale"], "1", "no-such-nonce", None))
                .await
                .unwrap();
            requests
                .send(request(LISTENER, &["basket", "catalog"], "1", &first.nonce, None))
                .await
                .unwrap();
            let second = next(&mut responses).await;
            // The NACK was logged, naming the client and its reason, in one line.
            let log = served.stderr.as_ref().unwrap();
            let nack = log.next(Duration::from_secs(10), "the NACK's log line");
            assert!(
                nack.contains("WARN")
                    && nack.contains("xDS: the client rejected Listener version 1: rejected by the test; it keeps version none")
                    && nack.contains("peer=127.0.0.1:"),
                "{nack}"
            );
            assert_eq!(second.version_info, "2");
            assert_ne!(second.nonce, first.nonce);
            assert_eq!(listeners(&second), ["basket", "catalog"]);

            // Endpoints: the configured query's, then a change pushed as it happens.
            requests.send(request(ENDPOINTS, &["catalog"], "", "", None)).await.unwrap();
            let endpoints = next(&mut responses).await;
            assert_eq!(endpoints.type_url, ENDPOINTS);
            assert_eq!(addresses(&endpoints), ["10.46.24.90:443", "127.0.0.1:8443"]);
            requests
                .send(request(ENDPOINTS, &["catalog"], &endpoints.version_info, &endpoints.nonce, None))
                .await
                .unwrap();
            assert_eq!((status("streams"), status("followed")), (1, 1));
            sandbox.write(
                "appsettings.json",
                APPSETTINGS.replace("https://10.46.24.90:443", "https://10.46.24.91:443"),
            );
            let pushed = next(&mut responses).await;
            assert_eq!(pushed.version_info, "2");
            assert_eq!(addresses(&pushed), ["10.46.24.91:443", "127.0.0.1:8443"]);

            // The client goes: its stream and what it followed are freed.
            drop(requests);
            drop(responses);
            drop(client);
        });
        // With the runtime go the connection's tasks, and so the connection.
        drop(runtime);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while (status("streams"), status("followed")) != (0, 0) {
            assert!(
                std::time::Instant::now() < deadline,
                "the closed stream was not freed"
            );
        }
    }

    /// Each endpoint's address and whether it is sent HEALTHY, sorted (every locality
    /// weighted: gRPC ignores one without a weight).
    fn health(response: &DiscoveryResponse) -> Vec<(String, bool)> {
        use envoy_types::pb::envoy::config::core::v3::HealthStatus;
        let mut all = Vec::new();
        for any in &response.resources {
            let assignment = ClusterLoadAssignment::decode(any.value.as_slice()).unwrap();
            for locality in assignment.endpoints {
                assert!(locality.load_balancing_weight.is_some_and(|w| w.value > 0));
                for endpoint in locality.lb_endpoints {
                    let healthy = endpoint.health_status == HealthStatus::Healthy as i32;
                    let Some(HostIdentifier::Endpoint(lb)) = endpoint.host_identifier else {
                        panic!("no endpoint")
                    };
                    let Some(AddressKind::SocketAddress(socket)) = lb.address.unwrap().address else {
                        panic!("no socket address")
                    };
                    let Some(PortSpecifier::PortValue(port)) = socket.port_specifier else {
                        panic!("no port")
                    };
                    all.push((format!("{}:{port}", socket.address), healthy));
                }
            }
        }
        all.sort();
        all
    }

    #[test]
    fn an_endpoint_failing_its_policys_grpc_health_check_is_sent_unhealthy() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // Two tonic servers with the standard health service, whose status the test sets.
        let servers = runtime.block_on(wasd_tests::servers::Instances::grpc("greeter", 2));
        let urls = servers.urls("grpc");
        let sandbox = Sandbox::new();
        sandbox.write_services("greeter", "grpc", &urls);
        sandbox.write(
            "wasd.toml",
            format!(
                "{}\n[[policy]]\nservice = \"greeter\"\nhealth = {{ grpc = \"\", interval = \"50ms\", healthy-threshold = 1, unhealthy-threshold = 1 }}\n",
                super::CONFIG_ONLY
            ),
        );
        let served = Served::start_with_args(&sandbox, &[], &["--xds", "127.0.0.1:0"]);
        let xds = format!("http://{}", served.xds.as_deref().unwrap());
        let addresses: Vec<String> = urls
            .iter()
            .map(|u| u.trim_start_matches("grpc://").to_owned())
            .collect();
        runtime.block_on(async {
            let (_client, requests, mut responses) = open(xds).await;
            requests
                .send(request(ENDPOINTS, &["greeter"], "", "", None))
                .await
                .unwrap();
            // Answers until `want`, ACKing each; fails after 10 s.
            let mut until = async |want: Vec<(String, bool)>| {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                loop {
                    assert!(tokio::time::Instant::now() < deadline, "never sent {want:?}");
                    let answer = next(&mut responses).await;
                    requests
                        .send(request(
                            ENDPOINTS,
                            &["greeter"],
                            &answer.version_info,
                            &answer.nonce,
                            None,
                        ))
                        .await
                        .unwrap();
                    if health(&answer) == want {
                        return;
                    }
                }
            };
            let both = |first: bool| {
                let mut want = vec![(addresses[0].clone(), first), (addresses[1].clone(), true)];
                want.sort();
                want
            };
            until(both(true)).await;
            servers.set_healthy(0, false).await;
            until(both(false)).await;
            servers.set_healthy(0, true).await;
            until(both(true)).await;
        });
    }

    #[test]
    fn a_plugin_swapped_in_the_plugin_folder_reaches_a_subscribed_client_within_1s() {
        let sandbox = Sandbox::new();
        let plugin = sandbox.write(
            "plugins/fixed.wasm",
            std::fs::read(wasd_tests::fixtures::FIXED_A).unwrap(),
        );
        // The fixture answers `fixed` with one http endpoint: served over xDS as is.
        sandbox.write(
            "wasd.toml",
            "pass-through = false\nplugin-dir = \"plugins\"\n[serve.xds-services.fixed]\nquery = \"http://fixed\"\n",
        );
        let served = Served::start_with_args(&sandbox, &[], &["--xds", "127.0.0.1:0"]);
        let xds = format!("http://{}", served.xds.as_deref().unwrap());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (_client, requests, mut responses) = open(xds).await;
            requests
                .send(request(ENDPOINTS, &["fixed"], "", "", None))
                .await
                .unwrap();
            let first = next(&mut responses).await;
            assert_eq!(addresses(&first), ["10.1.0.1:80"]);
            requests
                .send(request(
                    ENDPOINTS,
                    &["fixed"],
                    &first.version_info,
                    &first.nonce,
                    None,
                ))
                .await
                .unwrap();

            // Version B written beside and renamed over A, as deployments do.
            let beside = plugin.with_extension("wasm.new");
            std::fs::write(&beside, std::fs::read(wasd_tests::fixtures::FIXED_B).unwrap()).unwrap();
            std::fs::rename(&beside, &plugin).unwrap();
            let swapped = std::time::Instant::now();
            let pushed = next(&mut responses).await;
            let took = swapped.elapsed();
            assert_eq!(addresses(&pushed), ["10.1.0.2:80"]);
            assert_ne!(pushed.version_info, first.version_info);
            assert!(
                took < Duration::from_secs(1),
                "the swap reached the client after {took:?}"
            );
        });
    }
}
