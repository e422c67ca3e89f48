//! The zookeeper provider against a real ZooKeeper (Debian's 3.8 on loopback), with
//! kazoo, a Python client nobody here wrote, as the other services: Kratos discovery,
//! watches, registration with the session as the lease, digest ACLs, failover, and
//! ZooKeeper going away.

use std::time::{Duration, Instant};

use wasd::{Query, ServiceInstance};
use wasd_tests::{Sandbox, ZkClient, ZooKeeperEnsemble, ZooKeeperServer, eventually, register, run, strings};

const WAIT: Duration = Duration::from_secs(10);

/// A chain of just the zookeeper provider (no pass-through, so misses are errors), on
/// these servers, each granted.
fn config(servers: &[String], settings: &str, extra: &str) -> String {
    let list = servers
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"
pass-through = false
refresh-period = "5s"

[[provider]]
builtin = "zookeeper"
settings = {{ servers = [{list}] {settings} }}
grants = {{ tcp = [{list}] }}
limits = {{ timeout = "3s" }}
{extra}
"#
    )
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// The next set the watcher sees, and how long it took to come.
async fn changed(watch: &mut wasd::Watch) -> (Vec<String>, Duration) {
    let started = Instant::now();
    let set = tokio::time::timeout(WAIT, watch.changed())
        .await
        .expect("no change reached the watcher in time")
        .expect("the resolver is alive");
    (sorted(strings(&set)), started.elapsed())
}

#[tokio::test(flavor = "multi_thread")]
async fn discovers_instances_registered_the_way_kratos_does() {
    let zk = ZooKeeperServer::start();
    let mut kratos = zk.client(None);
    kratos.register_kratos(
        "hello",
        "a",
        "v1",
        &["grpc://10.0.0.1:9000", "http://10.0.0.1:8000"],
    );
    kratos.register_kratos("hello", "b", "v2", &["http://10.0.0.2:8000?isSecure=true"]);
    // Another service, a node naming another service, and a broken value: skipped.
    kratos.register_kratos("helloworld", "c", "v1", &["http://10.0.0.9:8000"]);
    kratos.create(
        "/microservices/hello/other",
        r#"{"id":"o","name":"bye","endpoints":["http://10.0.0.8:80"]}"#,
        true,
    );
    kratos.create("/microservices/hello/broken", "not json", true);

    let sandbox = Sandbox::new();
    let resolver = sandbox.resolver(&config(&[zk.address()], "", "")).await.unwrap();
    let set = resolver.resolve("hello").await.unwrap();
    assert_eq!(
        sorted(strings(&set)),
        [
            "grpc://10.0.0.1:9000",
            "http://10.0.0.1:8000",
            "https://10.0.0.2:8000"
        ]
    );
    let grpc = set.iter().find(|e| e.scheme() == Some("grpc")).unwrap();
    assert_eq!(grpc.metadata_value("instance-id"), Some("a"));
    assert_eq!(grpc.metadata_value("version"), Some("v1"));
    // A named endpoint is a scheme, as in Kratos.
    let set = resolver.resolve("_grpc.hello").await.unwrap();
    assert_eq!(strings(&set), ["grpc://10.0.0.1:9000"]);
    // A service nobody registered is unknown, not an error of ZooKeeper's.
    let error = resolver
        .resolve_uncached(&Query::parse("nobody").unwrap())
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("no endpoints for service 'nobody'"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn watches_follow_creates_changes_deletes_and_sessions_ending_within_a_second() {
    let zk = ZooKeeperServer::start();
    let mut kratos = zk.client(None);
    kratos.register_kratos("hello", "a", "v1", &["http://10.0.0.1:8000"]);
    let sandbox = Sandbox::new();
    let resolver = sandbox.resolver(&config(&[zk.address()], "", "")).await.unwrap();
    let mut watch = resolver.watch("hello").await.unwrap();
    assert_eq!(strings(&watch.current()), ["http://10.0.0.1:8000"]);
    let mut slowest = Duration::ZERO;

    // A new instance (a child watch).
    kratos.register_kratos("hello", "b", "v1", &["http://10.0.0.2:8000"]);
    let (set, took) = changed(&mut watch).await;
    assert_eq!(set, ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]);
    slowest = slowest.max(took);

    // An instance's data rewritten in place (a data watch).
    kratos.set(
        "/microservices/hello/a",
        r#"{"id":"a","name":"hello","version":"v2","metadata":null,"endpoints":["http://10.0.0.3:8000"]}"#,
    );
    let (set, took) = changed(&mut watch).await;
    assert_eq!(set, ["http://10.0.0.2:8000", "http://10.0.0.3:8000"]);
    slowest = slowest.max(took);

    // Deleted.
    kratos.delete("/microservices/hello/b");
    let (set, took) = changed(&mut watch).await;
    assert_eq!(set, ["http://10.0.0.3:8000"]);
    slowest = slowest.max(took);

    // Another service changing is no change for this one; the next one for hello is.
    let mut other = zk.client(None);
    other.register_kratos("helloworld", "x", "v1", &["http://10.0.0.8:8000"]);
    other.register_kratos("hello", "e", "v1", &["http://10.0.0.5:8000"]);
    let (set, took) = changed(&mut watch).await;
    assert_eq!(set, ["http://10.0.0.3:8000", "http://10.0.0.5:8000"]);
    slowest = slowest.max(took);

    // The other client's session ends: its ephemeral instance goes with it.
    other.close();
    let (set, took) = changed(&mut watch).await;
    assert_eq!(set, ["http://10.0.0.3:8000"]);
    slowest = slowest.max(took);

    assert!(
        slowest < Duration::from_secs(1),
        "a change took {slowest:?} to reach the watcher"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn registration_is_an_ephemeral_node_whose_session_is_the_lease() {
    let mut zk = ZooKeeperServer::start();
    let sandbox = Sandbox::new();
    let resolver = sandbox.resolver(&config(&[zk.address()], "", "")).await.unwrap();
    let mut instance = ServiceInstance::new("hello", ["grpc://10.0.0.1:9000", "http://10.0.0.1:8000"]);
    instance.version = "v3".into();
    instance.metadata.insert("zone".into(), "eu".into());
    let id = instance.id.clone();
    let path = format!("/microservices/hello/{id}");
    let mut registration = register(&resolver, instance, Duration::from_secs(2)).await;

    // Written exactly where and how Kratos writes it, as an ephemeral node.
    let mut reader = zk.client(None);
    assert_eq!(reader.children("/microservices/hello").unwrap(), [id.as_str()]);
    let (data, owner) = reader.get(&path).unwrap();
    assert_ne!(owner, 0, "an ephemeral node has an owning session");
    let value: serde_json::Value = serde_json::from_str(&data).unwrap();
    assert_eq!(value["name"], "hello");
    assert_eq!(value["id"], id.as_str());
    assert_eq!(value["version"], "v3");
    assert_eq!(value["metadata"]["zone"], "eu");
    assert_eq!(value["endpoints"][0], "grpc://10.0.0.1:9000");
    assert_eq!(reader.acl(&path), ["world:anyone:31"]);
    // And discovered by the same resolver.
    let set = resolver.resolve("_grpc.hello").await.unwrap();
    assert_eq!(strings(&set), ["grpc://10.0.0.1:9000"]);

    // Kept alive for three times its 2 s session timeout: the same session owns it.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(reader.get(&path).map(|(_, owner)| owner), Some(owner));

    // Deleted by hand while the session lives: the keep-alive notices and writes it
    // again, under the same session.
    reader.delete(&path);
    eventually(WAIT, "the deleted instance never came back", || {
        reader.get(&path).is_some()
    })
    .await;

    // ZooKeeper loses everything (a new data folder): the session is unknown, so it
    // has expired, and the host registers again under a new one.
    zk.restart_empty();
    let mut reader = zk.client(None);
    eventually(Duration::from_secs(20), "the instance never came back", || {
        reader.get(&path).is_some()
    })
    .await;
    let (_, new_owner) = reader.get(&path).unwrap();
    assert_ne!(new_owner, owner);
    tokio::time::timeout(WAIT, registration.registered())
        .await
        .unwrap()
        .unwrap();

    // Deregistered: deleted at once, and the session closed.
    registration.deregister().await.unwrap();
    assert_eq!(reader.get(&path), None);

    // A successor took the same id over (its own session): deregistering the old
    // registration leaves it alone.
    let old = register(
        &resolver,
        ServiceInstance {
            id: "fixed-id".into(),
            ..ServiceInstance::new("hello", ["http://10.0.0.7:8000"])
        },
        Duration::from_secs(30),
    )
    .await;
    reader.delete("/microservices/hello/fixed-id");
    reader.register_kratos("hello", "fixed-id", "v4", &["http://10.0.0.8:8000"]);
    old.deregister().await.unwrap();
    let (data, owner) = reader.get("/microservices/hello/fixed-id").unwrap();
    assert!(data.contains("10.0.0.8"), "{data}");
    assert_eq!(owner, reader.session);
}

#[test]
fn wasd_register_is_seen_by_kazoo_and_comes_back_after_its_session_expired() {
    let zk = ZooKeeperServer::start();
    let sandbox = Sandbox::new();
    sandbox.write("wasd.toml", config(&[zk.address()], "", ""));
    let mut child = sandbox
        .wasd()
        .args(["register", "hello", "--endpoint", "http://10.0.0.1:8000"])
        .args(["--id", "cli-1", "--version", "v2", "--metadata", "zone=eu"])
        .args(["--ttl", "2s", "--config", "wasd.toml"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = wasd_tests::Lines::new(child.stdout.take().unwrap());
    let line = stdout.next(Duration::from_secs(30), "the registration");
    assert!(line.starts_with("registered hello/cli-1 (lease "), "{line}");

    let mut reader = zk.client(None);
    let (data, owner) = reader.get("/microservices/hello/cli-1").unwrap();
    let value: serde_json::Value = serde_json::from_str(&data).unwrap();
    assert_eq!(value["version"], "v2");
    assert_eq!(value["metadata"]["zone"], "eu");
    assert_eq!(value["endpoints"], serde_json::json!(["http://10.0.0.1:8000"]));

    // The process stops (SIGSTOP) for longer than its 2 s session: ZooKeeper expires
    // the session and deletes the node. Resumed, it registers again.
    let signal = |name: &str| {
        let status = std::process::Command::new("kill")
            .args([name, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    let rt = wasd_tests::runtime();
    let path = "/microservices/hello/cli-1";
    signal("-STOP");
    rt.block_on(eventually(
        Duration::from_secs(20),
        "the session never expired",
        || reader.get(path).is_none(),
    ));
    signal("-CONT");
    rt.block_on(eventually(
        Duration::from_secs(20),
        "never registered again",
        || reader.get(path).is_some(),
    ));
    let (_, new_owner) = reader.get(path).unwrap();
    assert_ne!(new_owner, owner, "registered again under a new session");

    signal("-TERM");
    let rest = stdout.rest(Duration::from_secs(10)).join("\n");
    let exit = child.wait().unwrap();
    assert!(exit.success(), "wasd register exited with {exit}");
    assert!(rest.contains("deregistered hello/cli-1"), "{rest}");
    // Deleted at once, not left for the session to expire.
    assert_eq!(reader.get("/microservices/hello/cli-1"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn zookeeper_down_keeps_the_last_good_answer_then_recovers() {
    let mut zk = ZooKeeperServer::start();
    let mut kratos = zk.client(None);
    kratos.register_kratos("hello", "a", "v1", &["http://10.0.0.1:8000"]);
    // A persistent instance, so it outlives the writer's session across the restart.
    kratos.create(
        "/microservices/hello/p",
        r#"{"id":"p","name":"hello","endpoints":["http://10.0.0.2:8000"]}"#,
        false,
    );
    let sandbox = Sandbox::new();
    let resolver = sandbox.resolver(&config(&[zk.address()], "", "")).await.unwrap();
    let mut watch = resolver.watch("hello").await.unwrap();
    let both = ["http://10.0.0.1:8000", "http://10.0.0.2:8000"];
    assert_eq!(sorted(strings(&watch.current())), both);

    zk.kill();
    drop(kratos);
    // Once a refresh has failed (the set served records it, naming the provider and
    // the server), the last good set still stands, for resolves and the watcher.
    let deadline = Instant::now() + Duration::from_secs(20);
    let set = loop {
        let set = resolver.resolve("hello").await.unwrap();
        if !set.failures().is_empty() {
            break set;
        }
        assert!(Instant::now() < deadline, "no refresh failed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(sorted(strings(&set)), both);
    let failure = set.failures()[0].to_string();
    assert!(
        failure.contains("zookeeper") && failure.contains(&zk.address()),
        "{failure}"
    );
    assert_eq!(sorted(strings(&watch.current())), both);
    assert!(
        tokio::time::timeout(Duration::from_millis(100), watch.changed())
            .await
            .is_err(),
        "an unreachable ZooKeeper must not change the set"
    );

    // Back with its data: the writer's session expired meanwhile (or expires now), so
    // its ephemeral instance goes, and the watcher hears of it.
    zk.restart();
    let mut kratos = zk.client(None);
    kratos.register_kratos("hello", "b", "v1", &["http://10.0.0.3:8000"]);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let set = tokio::time::timeout(Duration::from_secs(40), watch.changed())
            .await
            .expect("recovered after ZooKeeper came back")
            .unwrap();
        if sorted(strings(&set)) == ["http://10.0.0.2:8000", "http://10.0.0.3:8000"] {
            break;
        }
        assert!(Instant::now() < deadline, "never saw the state after the restart");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_digest_acl_guards_registrations_as_kratos_with_digest_acl() {
    let zk = ZooKeeperServer::start();
    let sandbox = Sandbox::new();
    let settings = r#", user = "svc", password-env = "ZK_PASSWORD""#;
    // The password is read from a granted environment variable.
    let toml =
        config(&[zk.address()], settings, "").replace("grants = {", "grants = { env = [\"ZK_PASSWORD\"],");
    let resolver = sandbox
        .resolver_with_env(&toml, &[("ZK_PASSWORD", "s3cret")])
        .await
        .unwrap();
    let instance = ServiceInstance::new("hello", ["http://10.0.0.1:8000"]);
    let id = instance.id.clone();
    let registration = register(&resolver, instance, Duration::from_secs(10)).await;
    assert_eq!(
        strings(&resolver.resolve("hello").await.unwrap()),
        ["http://10.0.0.1:8000"]
    );

    // Every node it made carries the digest ACL, as Kratos's WithDigestACL makes them.
    let mut owner = zk.client(Some("svc:s3cret"));
    let digest = "digest:svc:".to_owned();
    for path in [
        "/microservices",
        "/microservices/hello",
        &format!("/microservices/hello/{id}"),
    ] {
        let acl = owner.acl(path);
        assert_eq!(acl.len(), 1, "{path}: {acl:?}");
        assert!(
            acl[0].starts_with(&digest) && acl[0].ends_with(":31"),
            "{path}: {acl:?}"
        );
    }
    assert!(owner.get(&format!("/microservices/hello/{id}")).is_some());
    // Anyone else is refused.
    let mut stranger = zk.client(None);
    let refused = stranger
        .call(serde_json::json!(["children", "/microservices/hello"]))
        .unwrap_err();
    assert!(refused.contains("NoAuth"), "{refused}");

    // The provider with the wrong password is refused too, and says what to fix.
    let wrong = Sandbox::new()
        .resolver_with_env(&toml, &[("ZK_PASSWORD", "wrong")])
        .await
        .unwrap();
    let error = wrong
        .resolve_uncached(&Query::parse("hello").unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("ACL") && error.contains("settings.user"),
        "{error}"
    );
    registration.deregister().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn servers_are_tried_in_turn_and_ungranted_ones_are_refused() {
    let zk = ZooKeeperServer::start();
    let mut kratos = zk.client(None);
    kratos.register_kratos("hello", "a", "v1", &["http://10.0.0.1:8000"]);
    // The first server listed is down (nothing listens there).
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let sandbox = Sandbox::new();
    let resolver = sandbox
        .resolver(&config(&[dead.clone(), zk.address()], "", ""))
        .await
        .unwrap();
    assert_eq!(
        strings(&resolver.resolve("hello").await.unwrap()),
        ["http://10.0.0.1:8000"]
    );
    let instance = ServiceInstance::new("hello", ["http://10.0.0.2:8000"]);
    let registration = register(&resolver, instance, Duration::from_secs(10)).await;
    assert_eq!(kratos.children("/microservices/hello").unwrap().len(), 2);
    registration.deregister().await.unwrap();

    // A server outside grants.tcp: the sandbox refuses the connection, and the error
    // names the provider, the server and why.
    let toml = config(&[zk.address()], "", "").replace(
        &format!("tcp = [\"{}\"]", zk.address()),
        &format!("tcp = [\"{dead}\"]"),
    );
    let resolver = Sandbox::new().resolver(&toml).await.unwrap();
    let error = resolver
        .resolve_uncached(&Query::parse("hello").unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("zookeeper") && error.contains(&zk.address()),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_settings_refuse_the_provider_in_one_line() {
    for (settings, expected) in [
        (r#"servers = []"#, "settings.servers: give at least one"),
        (r#"servers = ["zk"]"#, "settings.servers: 'zk' is not a host:port"),
        (
            r#"servers = ["zk:2181"], root = "microservices""#,
            "settings.root",
        ),
        (r#"servers = ["zk:2181"], timeout = "soon""#, "settings.timeout"),
        (
            r#"servers = ["zk:2181"], user = "u""#,
            "`user` and a password go together",
        ),
        (
            r#"servers = ["zk:2181"], max-response = "1MB""#,
            "settings.max-response",
        ),
        (r#"servers = ["zk:2181"], bogus = 1"#, "unknown field `bogus`"),
    ] {
        let toml = format!(
            "pass-through = false\n[[provider]]\nbuiltin = \"zookeeper\"\nsettings = {{ {settings} }}\ngrants = {{ tcp = [\"zk:2181\"] }}\n"
        );
        let error = match Sandbox::new().resolver(&toml).await {
            Ok(_) => panic!("{settings}: accepted"),
            Err(e) => e.to_string(),
        };
        assert!(error.contains(expected), "{settings}: {error}");
        assert!(!error.contains('\n'), "{error}");
    }
}

/// `wasd check` says which configured server its grants leave out.
#[test]
fn wasd_check_names_a_server_outside_the_grant() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "wasd.toml",
        "[[provider]]\nbuiltin = \"zookeeper\"\nsettings = { servers = [\"127.0.0.1:2181\", \"zk-2:2181\"] }\ngrants = { tcp = [\"127.0.0.1:2181\"] }\n",
    );
    let out = run(sandbox.wasd().args(["check", "--config", "wasd.toml"]));
    assert!(
        out.stdout
            .contains("settings.servers names zk-2:2181, which grants.tcp [127.0.0.1:2181] does not cover")
            || out.stderr.contains(
                "settings.servers names zk-2:2181, which grants.tcp [127.0.0.1:2181] does not cover"
            ),
        "{}{}",
        out.stdout,
        out.stderr
    );
}

/// Three members; the provider is given all three and talks to the first. That member
/// dies mid-watch: the watch and resolves go on through the others, and a member that
/// returns is used again.
#[tokio::test(flavor = "multi_thread")]
async fn an_ensemble_member_dying_mid_watch_is_left_for_the_next() {
    let mut zk = ZooKeeperEnsemble::start(3);
    let servers = zk.addresses();
    // The other services' client talks to the members that stay.
    let mut kratos = ZkClient::start(&servers[1..], None);
    kratos.register_kratos("hello", "a", "v1", &["http://10.0.0.1:8000"]);
    let sandbox = Sandbox::new();
    let resolver = sandbox.resolver(&config(&servers, "", "")).await.unwrap();
    let mut watch = resolver.watch("hello").await.unwrap();
    assert_eq!(strings(&watch.current()), ["http://10.0.0.1:8000"]);

    zk.kill(0);
    kratos.register_kratos("hello", "b", "v1", &["http://10.0.0.2:8000"]);
    let (set, took) = changed(&mut watch).await;
    assert_eq!(set, ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]);
    // Within the provider's time limit (3 s) and a second, election included.
    assert!(took < Duration::from_secs(4), "the watch took {took:?} to move");
    let started = Instant::now();
    let set = resolver
        .resolve_uncached(&Query::parse("hello").unwrap())
        .await
        .unwrap();
    assert_eq!(
        sorted(strings(&set)),
        ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    );
    assert!(started.elapsed() < Duration::from_secs(4));

    // The first member returns and the second dies: the provider is back on the first
    // (or on the third), and nothing written meanwhile is missed.
    zk.restart(0);
    zk.kill(1);
    kratos.register_kratos("hello", "c", "v1", &["http://10.0.0.3:8000"]);
    let deadline = Instant::now() + WAIT;
    loop {
        let (set, _) = changed(&mut watch).await;
        if set.len() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "never saw c: {set:?}");
    }
    let set = resolver
        .resolve_uncached(&Query::parse("hello").unwrap())
        .await
        .unwrap();
    assert_eq!(set.len(), 3);
}
