//! The etcd provider against a real etcd (Debian's etcd-server on loopback): Kratos
//! discovery, watch, registration, auth and TLS, grants, and malformed answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wasd::{Query, RegistrationState, ServiceInstance};
use wasd_tests::{EtcdServer, Sandbox, TlsFiles, eventually, register, run, strings};

const WAIT: Duration = Duration::from_secs(10);

/// A chain of just the etcd provider (no pass-through, so misses are errors).
fn config(url: &str, settings: &str, extra: &str) -> String {
    format!(
        r#"
pass-through = false
refresh-period = "5s"

[[provider]]
builtin = "etcd"
settings = {{ endpoints = ["{url}"] {settings} }}
grants = {{ http = ["{url}"] }}
limits = {{ timeout = "3s" }}
{extra}
"#
    )
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

async fn changed(watch: &mut wasd::Watch) -> Vec<String> {
    let set = tokio::time::timeout(WAIT, watch.changed())
        .await
        .expect("no change reached the watcher in time")
        .expect("the resolver is alive");
    sorted(strings(&set))
}

#[tokio::test(flavor = "multi_thread")]
async fn discovers_kratos_instances_written_directly() {
    let etcd = EtcdServer::start();
    etcd.put_instance(
        "hello",
        "a",
        "v1",
        &["grpc://10.0.0.1:9000", "http://10.0.0.1:8000"],
        None,
    );
    etcd.put_instance("hello", "b", "v2", &["http://10.0.0.2:8000?isSecure=true"], None);
    // `helloworld` shares the prefix `/microservices/hello` but is another service.
    etcd.put_instance("helloworld", "c", "v1", &["http://10.0.0.9:8000"], None);
    // Under hello's prefix but naming another service, and a broken value: skipped.
    etcd.put(
        "/microservices/hello/odd",
        br#"{"id":"odd","name":"other","endpoints":["http://10.9.9.9:1"]}"#,
        None,
    );
    etcd.put("/microservices/hello/broken", b"{not json", None);
    // Kratos writes extra fields and `"metadata": null`; metadata maps are kept.
    etcd.put(
        "/microservices/hello/d",
        br#"{"id":"d","name":"hello","version":"v2","metadata":{"zone":"eu"},"endpoints":["http://10.0.0.4:8000"],"weight":3}"#,
        None,
    );
    let sandbox = Sandbox::new();
    let resolver = sandbox.resolver(&config(&etcd.url(), "", "")).await.unwrap();

    let all = resolver.resolve("hello").await.unwrap();
    assert_eq!(all.provider(), Some("etcd"));
    assert_eq!(
        sorted(strings(&all)),
        [
            "grpc://10.0.0.1:9000",
            "http://10.0.0.1:8000",
            "http://10.0.0.4:8000",
            "https://10.0.0.2:8000"
        ]
    );
    let world = resolver.resolve("helloworld").await.unwrap();
    assert_eq!(strings(&world), ["http://10.0.0.9:8000"]);

    // Scheme preference: https wins if any instance has it; a named endpoint is a scheme.
    let https = resolver.resolve("https+http://hello").await.unwrap();
    assert_eq!(strings(&https), ["https://10.0.0.2:8000"]);
    let grpc = resolver.resolve("_grpc.hello").await.unwrap();
    assert_eq!(strings(&grpc), ["grpc://10.0.0.1:9000"]);

    // Instance version and metadata are on every endpoint, and usable as filters.
    let d = all.iter().find(|e| e.host() == "10.0.0.4").unwrap();
    assert_eq!(d.metadata_value("version"), Some("v2"));
    assert_eq!(d.metadata_value("zone"), Some("eu"));
    assert_eq!(d.metadata_value("instance-id"), Some("d"));
    let v2 = Query::parse("http://hello").unwrap().with_filter("version", "v2");
    assert_eq!(
        strings(&resolver.resolve_query(&v2).await.unwrap()),
        ["http://10.0.0.4:8000"]
    );
    let v1 = Query::parse("hello").unwrap().with_filter("version", "v1");
    assert_eq!(
        sorted(strings(&resolver.resolve_query(&v1).await.unwrap())),
        ["grpc://10.0.0.1:9000", "http://10.0.0.1:8000"]
    );
    let none = Query::parse("hello").unwrap().with_filter("version", "v9");
    let err = resolver.resolve_query(&none).await.unwrap_err().to_string();
    assert!(err.contains("no endpoints for service 'hello'"), "{err}");

    // An unknown service is a clean miss, not a failure.
    let err = resolver.resolve("nobody").await.unwrap_err();
    assert!(
        matches!(&err, wasd::Error::NoEndpoints { failures, .. } if failures.is_empty()),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_sees_put_delete_and_lease_expiry() {
    let etcd = EtcdServer::start();
    etcd.put_instance("hello", "a", "v1", &["http://10.0.0.1:8000"], None);
    let sandbox = Sandbox::new();
    let resolver = sandbox.resolver(&config(&etcd.url(), "", "")).await.unwrap();
    let mut watch = resolver.watch("hello").await.unwrap();
    assert_eq!(strings(&watch.current()), ["http://10.0.0.1:8000"]);

    etcd.put_instance("hello", "b", "v1", &["http://10.0.0.2:8000"], None);
    assert_eq!(
        changed(&mut watch).await,
        ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    );

    etcd.delete("/microservices/hello/a");
    assert_eq!(changed(&mut watch).await, ["http://10.0.0.2:8000"]);

    // An instance under a 2 s lease that nobody keeps alive disappears by itself.
    let lease = etcd.grant(2);
    etcd.put_instance("hello", "c", "v1", &["http://10.0.0.3:8000"], Some(&lease));
    assert_eq!(
        changed(&mut watch).await,
        ["http://10.0.0.2:8000", "http://10.0.0.3:8000"]
    );
    assert_eq!(changed(&mut watch).await, ["http://10.0.0.2:8000"]);

    // A write to another service is no change for this one.
    etcd.put_instance("helloworld", "x", "v1", &["http://10.0.0.8:8000"], None);
    etcd.put_instance("hello", "e", "v1", &["http://10.0.0.5:8000"], None);
    assert_eq!(
        changed(&mut watch).await,
        ["http://10.0.0.2:8000", "http://10.0.0.5:8000"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_down_mid_watch_serves_last_good_then_recovers() {
    let mut etcd = EtcdServer::start();
    etcd.put_instance("hello", "a", "v1", &["http://10.0.0.1:8000"], None);
    let sandbox = Sandbox::new();
    let resolver = sandbox.resolver(&config(&etcd.url(), "", "")).await.unwrap();
    let mut watch = resolver.watch("hello").await.unwrap();

    etcd.kill();
    // Once a refresh has failed (the set served records it), the last good set still
    // stands, for resolves and the watcher.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while resolver.resolve("hello").await.unwrap().failures().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no refresh failed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(strings(&watch.current()), ["http://10.0.0.1:8000"]);
    assert_eq!(
        strings(&resolver.resolve("hello").await.unwrap()),
        ["http://10.0.0.1:8000"]
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(100), watch.changed())
            .await
            .is_err(),
        "an unreachable etcd must not change the set"
    );

    etcd.restart();
    etcd.put_instance("hello", "b", "v1", &["http://10.0.0.2:8000"], None);
    let set = tokio::time::timeout(Duration::from_secs(40), watch.changed())
        .await
        .expect("recovered after etcd came back")
        .unwrap();
    assert_eq!(
        sorted(strings(&set)),
        ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn registration_round_trips_and_survives_data_loss() {
    let mut etcd = EtcdServer::start();
    let sandbox = Sandbox::new();
    let resolver = sandbox.resolver(&config(&etcd.url(), "", "")).await.unwrap();
    let mut instance = ServiceInstance::new("hello", ["grpc://10.0.0.1:9000", "http://10.0.0.1:8000"]);
    instance.version = "v3".into();
    instance.metadata.insert("zone".into(), "eu".into());
    let id = instance.id.clone();
    let mut registration = resolver
        .register_with_ttl(instance, Duration::from_secs(3))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, registration.registered())
        .await
        .unwrap()
        .unwrap();

    // Written exactly where and how Kratos writes it.
    let stored = etcd.get_prefix("/microservices/hello/");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].0, format!("/microservices/hello/{id}"));
    let value: serde_json::Value = serde_json::from_str(&stored[0].1).unwrap();
    assert_eq!(value["name"], "hello");
    assert_eq!(value["id"], id.as_str());
    assert_eq!(value["version"], "v3");
    assert_eq!(value["metadata"]["zone"], "eu");
    assert_eq!(value["endpoints"][0], "grpc://10.0.0.1:9000");
    // And discovered by the same resolver.
    let set = resolver.resolve("_grpc.hello").await.unwrap();
    assert_eq!(strings(&set), ["grpc://10.0.0.1:9000"]);

    // Kept alive well past its TTL.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(etcd.get_prefix("/microservices/hello/").len(), 1);

    // Deleted by hand while its lease lives: the keep-alive notices and writes it again.
    etcd.delete(&format!("/microservices/hello/{id}"));
    eventually(
        Duration::from_secs(10),
        "the deleted instance never came back",
        || !etcd.get_prefix("/microservices/hello/").is_empty(),
    )
    .await;

    // etcd loses everything (a new data folder): the lease is unknown, so the host
    // registers again.
    etcd.restart_empty();
    eventually(Duration::from_secs(20), "the instance never came back", || {
        !etcd.get_prefix("/microservices/hello/").is_empty()
    })
    .await;

    // etcd down for far longer than Kratos's 5 retries would last, then back empty.
    etcd.kill();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        matches!(registration.state(), RegistrationState::Retrying { .. }),
        "{:?}",
        registration.state()
    );
    etcd.restart_empty();
    eventually(Duration::from_secs(40), "the instance never came back", || {
        !etcd.get_prefix("/microservices/hello/").is_empty()
    })
    .await;
    tokio::time::timeout(WAIT, registration.registered())
        .await
        .unwrap()
        .unwrap();

    registration.deregister().await.unwrap();
    assert!(etcd.get_prefix("/microservices/hello/").is_empty());

    // A successor took the same id over (under its own lease): deregistering the old
    // registration leaves it alone.
    let old = resolver
        .register_with_ttl(
            ServiceInstance {
                id: "fixed-id".into(),
                ..ServiceInstance::new("hello", ["http://10.0.0.7:8000"])
            },
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let mut old = old;
    tokio::time::timeout(WAIT, old.registered())
        .await
        .unwrap()
        .unwrap();
    let successor = etcd.grant(30);
    etcd.put_instance(
        "hello",
        "fixed-id",
        "v4",
        &["http://10.0.0.8:8000"],
        Some(&successor),
    );
    old.deregister().await.unwrap();
    let stored = etcd.get_prefix("/microservices/hello/");
    assert_eq!(stored.len(), 1);
    assert!(stored[0].1.contains("10.0.0.8"), "{stored:?}");
}

/// A service that registers from synchronous code, on a runtime of its own that ends
/// right after: the lease is kept on the resolver's runtime, not the caller's.
#[test]
fn a_registration_made_from_a_runtime_that_ends_keeps_its_lease() {
    let etcd = EtcdServer::start();
    let sandbox = Sandbox::new();
    let home = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let resolver = home
        .block_on(sandbox.resolver(&config(&etcd.url(), "", "")))
        .unwrap();

    let caller = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let instance = ServiceInstance::new("hello", ["http://10.0.0.1:8000"]);
    // Six seconds, renewed every two: the whole seconds etcd reports fall between
    // renewals, so a renewal shows as a rise.
    let registration = caller.block_on(register(&resolver, instance, Duration::from_secs(6)));
    drop(caller);

    // The lease is renewed after the caller's runtime ended: its time to live, which
    // only falls otherwise, goes back up.
    let leases = etcd.post("/v3/lease/leases", serde_json::json!({}));
    let id = leases["leases"][0]["ID"].as_str().unwrap().to_owned();
    let time_to_live = || {
        let answer = etcd.post("/v3/lease/timetolive", serde_json::json!({ "ID": id }));
        answer["TTL"]
            .as_str()
            .and_then(|t| t.parse::<i64>().ok())
            .unwrap_or(-1)
    };
    let mut lowest = time_to_live();
    home.block_on(eventually(
        Duration::from_secs(10),
        "the lease was never renewed",
        || {
            let now = time_to_live();
            let renewed = now > lowest;
            lowest = lowest.min(now);
            renewed
        },
    ));
    assert_eq!(etcd.get_prefix("/microservices/hello/").len(), 1);
    assert!(
        matches!(registration.state(), RegistrationState::Registered { .. }),
        "{:?}",
        registration.state()
    );
    home.block_on(registration.deregister()).unwrap();
    assert!(etcd.get_prefix("/microservices/hello/").is_empty());
}

#[test]
fn wasd_register_deregisters_on_sigterm() {
    let etcd = EtcdServer::start();
    let sandbox = Sandbox::new();
    sandbox.write("wasd.toml", config(&etcd.url(), "", ""));
    let mut child = sandbox
        .wasd()
        .args([
            "register",
            "hello",
            "--endpoint",
            "http://10.0.0.1:8000",
            "--endpoint",
        ])
        .args([
            "grpc://10.0.0.1:9000",
            "--id",
            "cli-1",
            "--version",
            "v2",
            "--metadata",
            "zone=eu",
        ])
        .args(["--ttl", "30s", "--config", "wasd.toml"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = wasd_tests::Lines::new(child.stdout.take().unwrap());
    let line = stdout.next(Duration::from_secs(30), "the registration");
    assert!(line.starts_with("registered hello/cli-1 (lease "), "{line}");

    let stored = etcd.get_prefix("/microservices/hello/");
    assert_eq!(stored.len(), 1, "{stored:?}");
    let value: serde_json::Value = serde_json::from_str(&stored[0].1).unwrap();
    assert_eq!(value["version"], "v2");
    assert_eq!(value["metadata"]["zone"], "eu");

    // Other tools see it through `wasd resolve --filter`.
    let out = run(sandbox.wasd().args([
        "resolve",
        "hello",
        "--filter",
        "version=v2",
        "--json",
        "--config",
        "wasd.toml",
    ]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(json["endpoints"].as_array().unwrap().len(), 2);
    assert_eq!(json["endpoints"][0]["metadata"]["instance-id"], "cli-1");

    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest = stdout.rest(Duration::from_secs(10)).join("\n");
    let exit = child.wait().unwrap();
    assert!(exit.success(), "wasd register exited with {exit}");
    assert!(rest.contains("deregistered hello/cli-1"), "{rest}");
    // Deleted at once, not left to expire with its 30 s lease.
    assert!(etcd.get_prefix("/microservices/hello/").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_and_tls_with_a_private_ca() {
    let tls = TlsFiles::generate();
    // Tokens live one second, so the provider must re-authenticate mid-test.
    let etcd = EtcdServer::start_with(Some(&tls), &["--auth-token-ttl=1"]);
    etcd.enable_auth("root", "s3cret-pw");
    etcd.put_instance("hello", "a", "v1", &["http://10.0.0.1:8000"], None);
    assert_eq!(
        etcd.anonymous_status("/v3/kv/range", serde_json::json!({ "key": "YQ==" })),
        400
    );

    // The password arrives through a granted environment variable.
    let env = [("WASD_TEST_ETCD_PASSWORD", "s3cret-pw")];
    let ca = tls.ca.display().to_string();
    let sandbox = Sandbox::new();
    let good = config(
        &etcd.url(),
        r#", username = "root", password-env = "WASD_TEST_ETCD_PASSWORD""#,
        &format!("tls = {{ ca-file = \"{ca}\" }}"),
    )
    .replace(
        "grants = { http = [",
        "grants = { env = [\"WASD_TEST_ETCD_PASSWORD\"], http = [",
    );
    let resolver = sandbox.resolver_with_env(&good, &env).await.unwrap();
    assert_eq!(
        strings(&resolver.resolve("hello").await.unwrap()),
        ["http://10.0.0.1:8000"]
    );

    // Past the token's TTL (the scenario's time passing, not a wait for an event), the
    // same (pooled) provider instance re-authenticates.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let err = resolver.resolve("helloworld").await.unwrap_err();
    assert!(
        matches!(&err, wasd::Error::NoEndpoints { failures, .. } if failures.is_empty()),
        "{err}"
    );
    let registration = register(
        &resolver,
        ServiceInstance::new("hello", ["http://10.0.0.2:8000"]),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(etcd.get_prefix("/microservices/hello/").len(), 2);
    registration.deregister().await.unwrap();

    // A wrong password is refused with a clear error that does not echo it.
    let wrong = good.replace(
        r#"password-env = "WASD_TEST_ETCD_PASSWORD""#,
        r#"password = "not-the-password""#,
    );
    let resolver = sandbox.resolver_with_env(&wrong, &env).await.unwrap();
    let err = resolver.resolve("hello").await.unwrap_err().to_string();
    assert!(err.contains("refused to authenticate user 'root'"), "{err}");
    assert!(
        !err.contains("not-the-password") && !err.contains("s3cret"),
        "{err}"
    );

    // Without the CA, the host's TLS refuses etcd's certificate.
    let no_ca = good.replace(&format!("tls = {{ ca-file = \"{ca}\" }}"), "");
    let resolver = sandbox.resolver_with_env(&no_ca, &env).await.unwrap();
    let err = resolver.resolve("hello").await.unwrap_err().to_string();
    assert!(
        err.contains("provider 'etcd': upstream unavailable") && err.contains("Tls"),
        "{err}"
    );

    // A CA file that is not a certificate stops the provider from loading.
    sandbox.write("bad-ca.pem", "not a certificate");
    let bad_ca = good.replace(&ca, &sandbox.path().join("bad-ca.pem").display().to_string());
    let err = sandbox
        .resolver_with_env(&bad_ca, &env)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("provider 'etcd'") && err.contains("the CA file holds no certificate"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_against_an_etcd_that_requires_client_certificates() {
    let tls = TlsFiles::generate();
    let etcd = EtcdServer::start_mutual_tls(&tls);
    etcd.put_instance("hello", "a", "v1", &["http://10.0.0.1:8000"], None);
    let file = |p: &std::path::Path| p.display().to_string();
    let tls_line = |cert: &str, key: &str| {
        format!(
            "tls = {{ ca-file = \"{}\", client-cert-file = \"{cert}\", client-key-file = \"{key}\" }}",
            file(&tls.ca)
        )
    };
    let sandbox = Sandbox::new();

    // With the client certificate: discovery and registration both go through.
    let good = config(
        &etcd.url(),
        "",
        &tls_line(&file(&tls.client_cert), &file(&tls.client_key)),
    );
    let resolver = sandbox.resolver(&good).await.unwrap();
    assert_eq!(
        strings(&resolver.resolve("hello").await.unwrap()),
        ["http://10.0.0.1:8000"]
    );
    let registration = register(
        &resolver,
        ServiceInstance::new("hello", ["http://10.0.0.2:8000"]),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(etcd.get_prefix("/microservices/hello/").len(), 2);
    registration.deregister().await.unwrap();

    // Without one, etcd refuses the handshake: the server's TLS alert reaches the
    // error, naming the provider (Go sends `bad_certificate`; TLS 1.3 servers may send
    // `certificate_required`).
    let no_client = config(
        &etcd.url(),
        "",
        &format!("tls = {{ ca-file = \"{}\" }}", file(&tls.ca)),
    );
    let resolver = sandbox.resolver(&no_client).await.unwrap();
    let err = resolver.resolve("hello").await.unwrap_err().to_string();
    assert!(
        err.contains("provider 'etcd': upstream unavailable")
            && err.contains("TlsAlertReceived")
            && (err.contains("BadCertificate") || err.contains("CertificateRequired")),
        "{err}"
    );

    // A key that is not the certificate's, or not a key at all, stops the load.
    let mismatched = config(
        &etcd.url(),
        "",
        &tls_line(&file(&tls.client_cert), &file(&tls.key)),
    );
    let err = sandbox.resolver(&mismatched).await.err().unwrap().to_string();
    assert!(
        err.contains("provider 'etcd'") && err.contains("the client certificate and key do not fit"),
        "{err}"
    );
    let not_a_key = config(
        &etcd.url(),
        "",
        &tls_line(&file(&tls.client_cert), &file(&tls.ca)),
    );
    let err = sandbox.resolver(&not_a_key).await.err().unwrap().to_string();
    assert!(
        err.contains("provider 'etcd'") && err.contains("the client key is not a PEM private key"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http_to_an_origin_not_granted_is_denied() {
    let etcd = EtcdServer::start();
    etcd.put_instance("hello", "a", "v1", &["http://10.0.0.1:8000"], None);
    let sandbox = Sandbox::new();
    // Granted another port on the same host: still denied, before any connection.
    let toml = config(&etcd.url(), "", "").replace(
        &format!("grants = {{ http = [\"{}\"] }}", etcd.url()),
        "grants = { http = [\"http://127.0.0.1:1\"] }",
    );
    let resolver = sandbox.resolver(&toml).await.unwrap();
    let err = resolver.resolve("hello").await.unwrap_err().to_string();
    assert!(
        err.contains("provider 'etcd': capability denied: HTTP request denied by the host"),
        "{err}"
    );
    assert!(err.contains(&etcd.url()), "{err}");
}

/// Serve each connection one canned HTTP response.
async fn fake_gateway(body: &'static str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                // Read the whole request (head and body) before answering.
                let mut request = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = socket.read(&mut chunk).await.unwrap_or(0);
                    request.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&request).to_ascii_lowercase();
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let length: usize = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if request.len() >= head_end + 4 + length {
                            break;
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    url
}

/// Serve one canned response per request, keeping connections open; count them.
async fn keep_alive_gateway(body: &'static str) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // One whole request (head and body) per answer.
                    let text = String::from_utf8_lossy(&buffer).to_ascii_lowercase();
                    let complete = text.find("\r\n\r\n").and_then(|head_end| {
                        let length: usize = text[..head_end]
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        (buffer.len() >= head_end + 4 + length).then_some(head_end + 4 + length)
                    });
                    if let Some(end) = complete {
                        buffer.drain(..end);
                        let response = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if socket.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (url, connections)
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_reuse_kept_alive_connections() {
    let value = r#"{"id":"a","name":"hello","version":"v1","endpoints":["http://10.0.0.1:8000"]}"#;
    let body: &'static str = Box::leak(
        format!(
            r#"{{"header":{{"revision":"3"}},"kvs":[{{"key":"{}","value":"{}"}}],"count":"1"}}"#,
            B64.encode("/microservices/hello/a"),
            B64.encode(value)
        )
        .into_boxed_str(),
    );
    let (url, connections) = keep_alive_gateway(body).await;
    let sandbox = Sandbox::new();
    let resolver = sandbox.resolver(&config(&url, "", "")).await.unwrap();
    let query = Query::parse("http://hello").unwrap();
    for _ in 0..20 {
        let set = resolver.resolve_uncached(&query).await.unwrap();
        assert_eq!(strings(&set), ["http://10.0.0.1:8000"]);
    }
    // One connection, kept alive across calls and instances (the load's `configure`
    // makes no request).
    assert_eq!(connections.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_gateway_answers_are_clear_errors() {
    let sandbox = Sandbox::new();
    for (body, expected) in [
        (
            "<html>oops</html>",
            "malformed response to /v3/kv/range: not a range response",
        ),
        (
            r#"{"header":{"revision":"3"},"kvs":[{"key":"%%%","value":"e30="}]}"#,
            "a key is not valid base64",
        ),
        (
            r#"{"header":{"revision":"3"},"kvs":[{"key":"YQ==","value":"***"}]}"#,
            "the value of 'a' is not valid base64",
        ),
        (r#"{"kvs":[]}"#, "a range response without a header"),
    ] {
        let url = fake_gateway(body).await;
        let resolver = sandbox.resolver(&config(&url, "", "")).await.unwrap();
        let err = resolver.resolve("hello").await.unwrap_err().to_string();
        assert!(
            err.contains("provider 'etcd': upstream unavailable") && err.contains(expected),
            "{err}"
        );
        assert!(!err.contains("trapped"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_settings_refuse_the_provider() {
    let sandbox = Sandbox::new();
    for (settings, expected) in [
        (r#"endpoints = []"#, "give at least one etcd gateway URL"),
        (
            r#"endpoints = ["127.0.0.1:2379"]"#,
            "is not an http:// or https:// URL",
        ),
        (
            r#"endpoints = ["http://127.0.0.1:2379"], namespace = "services""#,
            "must start with '/'",
        ),
        (
            r#"endpoints = ["http://127.0.0.1:2379"], username = "root""#,
            "go together",
        ),
        (
            r#"endpoints = ["http://127.0.0.1:2379"], timeout = "soon""#,
            "settings.timeout",
        ),
        (
            r#"endpoints = ["http://127.0.0.1:2379"], watch-keepalive = "0s""#,
            "settings.watch-keepalive: '0s' is not a positive duration",
        ),
        (
            r#"endpoints = ["http://127.0.0.1:2379"], retry-for = "a while""#,
            "settings.retry-for: 'a while'",
        ),
        (
            r#"endpoints = ["http://127.0.0.1:2379"], max-response = "16MB""#,
            "settings.max-response: '16MB' is not a size",
        ),
    ] {
        let toml = format!("[[provider]]\nbuiltin = \"etcd\"\nsettings = {{ {settings} }}\n");
        let err = sandbox.resolver(&toml).await.err().unwrap().to_string();
        assert!(
            err.contains("provider 'etcd'") && err.contains(expected),
            "{settings}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kratos_services_with_mixed_case_names_are_found_and_registered() {
    let etcd = EtcdServer::start();
    // Kratos writes the name verbatim: /microservices/HelloWorld/{id}.
    etcd.put_instance("HelloWorld", "a", "v1", &["http://10.0.0.1:8000"], None);
    let sandbox = Sandbox::new();
    let resolver = sandbox.resolver(&config(&etcd.url(), "", "")).await.unwrap();
    let set = resolver.resolve("http://HelloWorld").await.unwrap();
    assert_eq!(strings(&set), ["http://10.0.0.1:8000"]);
    // Another name to Kratos, another name here: etcd answers cleanly that it has none.
    match resolver.resolve("http://helloworld").await {
        Err(wasd::Error::NoEndpoints { failures, .. }) => assert!(failures.is_empty(), "{failures:?}"),
        other => panic!("expected no endpoints and no failure, got {other:?}"),
    }
    // And an instance registered under a mixed-case name lands under that key.
    let instance = ServiceInstance::new("OrderService", ["grpc://10.0.0.2:9000"]);
    let id = instance.id.clone();
    let mut registration = resolver.register(instance).await.unwrap();
    tokio::time::timeout(WAIT, registration.registered())
        .await
        .expect("registered in time")
        .unwrap();
    let stored = etcd.get_prefix("/microservices/OrderService/");
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].0, format!("/microservices/OrderService/{id}"));
    registration.deregister().await.unwrap();
}

/// A range of 100 000 instances: each limit it meets is named in its error, in the
/// order a user raising them meets them, until the whole answer comes through.
#[tokio::test(flavor = "multi_thread")]
async fn a_range_of_100_000_instances_names_each_limit_to_raise() {
    let etcd = EtcdServer::start();
    let puts: Vec<serde_json::Value> = (0..100_000)
        .map(|i| {
            let value = serde_json::json!({
                "id": format!("big-{i}"), "name": "big", "version": "v1", "metadata": null,
                "endpoints": [format!("http://10.{}.{}.{}:8080", i >> 16, (i >> 8) & 255, i & 255)],
            });
            serde_json::json!({ "request_put": {
                "key": B64.encode(format!("/microservices/big/big-{i}")),
                "value": B64.encode(value.to_string()),
            } })
        })
        .collect();
    // 128 puts a transaction: etcd's limit.
    for batch in puts.chunks(128) {
        etcd.post("/v3/kv/txn", serde_json::json!({ "success": batch }));
    }
    let url = etcd.url();
    let sandbox = Sandbox::new();
    let query = Query::parse("big").unwrap();
    let toml = |settings: &str, limits: &str| {
        format!(
            "pass-through = false\n[[provider]]\nbuiltin = \"etcd\"\n\
             settings = {{ endpoints = [\"{url}\"], timeout = \"30s\" {settings} }}\n\
             grants = {{ http = [\"{url}\"] }}\nlimits = {{ timeout = \"60s\" {limits} }}\n"
        )
    };
    let raise_response = r#", max-response = "64MiB""#;
    for (settings, limits, expected) in [
        // ~25 MB of JSON: past the 16 MiB the provider reads by default.
        (
            "",
            "",
            "is larger than settings.max-response (16384 KiB): raise it",
        ),
        // Read whole and parsed, it takes about 70 MiB of the provider's memory (the
        // default 64 MiB may or may not hold it): not 32.
        (
            raise_response,
            r#", max-memory = "32MiB""#,
            ": raise limits.max-memory",
        ),
        // 128 MiB does, and it is more endpoints than an answer may have by default.
        (
            raise_response,
            r#", max-memory = "128MiB""#,
            "100000 endpoints, more than its limit of 10000 (limits.max-endpoints)",
        ),
    ] {
        let resolver = sandbox.resolver(&toml(settings, limits)).await.unwrap();
        let err = resolver.resolve_uncached(&query).await.unwrap_err().to_string();
        assert!(err.contains(expected), "{settings} {limits}: {err}");
        assert!(err.len() < 1000, "{err}");
    }
    // All three raised: the whole answer.
    let resolver = sandbox
        .resolver(&toml(
            raise_response,
            r#", max-memory = "128MiB", max-endpoints = 100000"#,
        ))
        .await
        .unwrap();
    assert_eq!(resolver.resolve_uncached(&query).await.unwrap().len(), 100_000);
}
