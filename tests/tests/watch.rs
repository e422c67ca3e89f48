//! Refresh and watch: TTL-driven refreshes publish changes, unchanged answers publish
//! nothing, failures keep the last good set, a cleanly empty answer clears it.

use std::time::Duration;

use wasd_tests::{Sandbox, eventually, strings};

#[tokio::test]
async fn watch_follows_refreshes() {
    let sandbox = Sandbox::new();
    let toml = format!(
        r#"
pass-through = false
[[provider]]
name = "script"
module = "{}"
settings = {{ service = "seq", answers = [
  {{ endpoints = ["http://a:1"], ttl_ms = 1000 }},
  {{ endpoints = ["http://a:1"], ttl_ms = 1000 }},
  {{ endpoints = ["http://b:2", "http://c:3"], ttl_ms = 1000 }},
  {{ error = "unavailable" }},
  {{ endpoints = [] }},
] }}
"#,
        wasd_tests::fixtures::SEQUENCE
    );
    let resolver = sandbox.resolver(&toml).await.unwrap();
    let mut watch = resolver.watch("http://seq").await.unwrap();
    assert_eq!(strings(&watch.current()), ["http://a:1"]);

    // Call 1 repeats call 0 and must not be reported: the first change is call 2.
    let started = std::time::Instant::now();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(strings(&next), ["http://b:2", "http://c:3"]);
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(next.provider(), Some("script"));

    // Call 3 (about 1 s after call 2) fails; call 4 comes 1 s later (back-off). In
    // between, the last good set is still served, and says why it may be stale.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let served = loop {
        let served = resolver.resolve("http://seq").await.unwrap();
        if !served.failures().is_empty() {
            break served;
        }
        assert!(tokio::time::Instant::now() < deadline, "call 3 never failed");
        // Polling the resolver for the failure, not waiting for it to happen.
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(strings(&served), ["http://b:2", "http://c:3"]);
    assert_eq!(served.failures()[0].provider, "script");

    // Call 4 answers cleanly with nothing: the service is gone.
    let gone = tokio::time::timeout(Duration::from_secs(5), watch.changed())
        .await
        .unwrap()
        .unwrap();
    assert!(gone.is_empty());
    assert!(matches!(
        resolver.resolve("http://seq").await,
        Err(wasd::Error::NoEndpoints { .. })
    ));
}

#[tokio::test]
async fn a_failing_provider_is_not_replaced_by_pass_through() {
    let sandbox = Sandbox::new();
    let toml = format!(
        r#"
[[provider]]
name = "script"
module = "{}"
settings = {{ service = "seq", answers = [
  {{ endpoints = ["http://a:1"], ttl_ms = 1000 }},
  {{ error = "unavailable" }},
  {{ error = "unavailable" }},
  {{ endpoints = ["http://d:4"], ttl_ms = 1000 }},
] }}
"#,
        wasd_tests::fixtures::SEQUENCE
    );
    let resolver = sandbox.resolver(&toml).await.unwrap();
    let mut watch = resolver.watch("http://seq").await.unwrap();
    assert_eq!(strings(&watch.current()), ["http://a:1"]);
    // Calls 1 and 2 fail; pass-through would answer `http://seq`, but the provider's
    // last answer stands until call 3 brings a new one.
    let next = tokio::time::timeout(Duration::from_secs(10), watch.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(strings(&next), ["http://d:4"]);
    assert_eq!(next.provider(), Some("script"));
}

#[tokio::test]
async fn watch_ends_when_the_resolver_is_dropped() {
    let sandbox = Sandbox::new();
    let resolver = sandbox.resolver("").await.unwrap();
    let mut watch = resolver.watch("basket").await.unwrap();
    assert_eq!(strings(&watch.current()), ["basket"]);
    drop(resolver);
    let end = tokio::time::timeout(Duration::from_secs(2), watch.changed())
        .await
        .unwrap();
    assert!(end.is_none());
}

#[tokio::test]
async fn watch_ends_when_the_resolver_is_dropped_while_a_balancer_follows_the_query() {
    let sandbox = Sandbox::new();
    let resolver = sandbox.resolver("").await.unwrap();
    let balancer = resolver.balancer("basket").await.unwrap();
    let mut watch = resolver.watch("basket").await.unwrap();
    drop(resolver);
    let end = tokio::time::timeout(Duration::from_secs(2), watch.changed())
        .await
        .unwrap();
    assert!(end.is_none());
    // The balancer goes on with the endpoints it has.
    assert_eq!(balancer.pick().endpoint().to_string(), "basket");
}

#[tokio::test]
async fn watching_a_service_with_no_endpoints_yet() {
    let sandbox = Sandbox::new();
    let resolver = sandbox.resolver("pass-through = false").await.unwrap();
    let watch = resolver.watch("http://nowhere").await.unwrap();
    assert!(watch.current().is_empty());
}

#[tokio::test]
async fn unused_answers_expire() {
    let sandbox = Sandbox::new();
    let toml = format!(
        r#"
pass-through = false
idle-timeout = "1s"
[[provider]]
module = "{}"
settings = {{ service = "seq", tag_calls = true, answers = [{{ endpoints = ["http://a:1"], ttl_ms = 1000 }}] }}
"#,
        wasd_tests::fixtures::SEQUENCE
    );
    let resolver = sandbox.resolver(&toml).await.unwrap();
    let call = |set: wasd::EndpointSet| set.endpoints()[0].metadata_value("call").unwrap().to_owned();
    assert_eq!(call(resolver.resolve("http://seq").await.unwrap()), "0");
    // Unused for a second, the entry is dropped at its first refresh (no call); had it
    // stayed, refreshes would have made calls 1, 2 and 3 by now.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(call(resolver.resolve("http://seq").await.unwrap()), "1");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_whose_watch_answers_at_once_is_paced() {
    let sandbox = Sandbox::new();
    let toml = format!(
        r#"
pass-through = false
[[provider]]
module = "{}"
settings = {{ service = "seq", tag_calls = true, watch_at_once = true, answers = [{{ endpoints = ["http://a:1"] }}] }}
"#,
        wasd_tests::fixtures::SEQUENCE
    );
    let resolver = sandbox.resolver(&toml).await.unwrap();
    let mut watch = resolver.watch("http://seq").await.unwrap();
    // Every watch call returns a changed answer (a new `call` tag) at once: a burst
    // goes straight through, then calls are paced to one per 100 ms.
    let mut changes = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::timeout_at(deadline, watch.changed()).await.is_ok() {
        changes += 1;
    }
    assert!((11..=40).contains(&changes), "{changes} changes in 2 s");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_call_that_never_returns_is_stopped_at_its_deadline() {
    // The provider's `watch` spins for ever. A watch call may last the time to the
    // next refresh (2 s) plus the provider's time limit (200 ms): then it is a
    // `timeout` fault, and the last answer is still served.
    let sandbox = Sandbox::new();
    let toml = format!(
        r#"
pass-through = false
refresh-period = "2s"
[[provider]]
module = "{}"
settings = {{ service = "seq", watch_loop = true, answers = [{{ endpoints = ["http://a:1"] }}] }}
limits = {{ timeout = "200ms" }}
"#,
        wasd_tests::fixtures::SEQUENCE
    );
    let resolver = sandbox.resolver(&toml).await.unwrap();
    let started = std::time::Instant::now();
    let _watch = resolver.watch("http://seq").await.unwrap();
    eventually(
        Duration::from_secs(6),
        "the spinning watch call to be stopped",
        || resolver.provider_status()[0].faults >= 1,
    )
    .await;
    let stopped = started.elapsed();
    // Not at the bare time limit (200 ms), and not much past 2.2 s (the poll above
    // looks every 100 ms).
    assert!(
        (Duration::from_millis(1900)..Duration::from_millis(3500)).contains(&stopped),
        "stopped after {stopped:?}"
    );
    assert_eq!(
        strings(&resolver.resolve("http://seq").await.unwrap()),
        ["http://a:1"]
    );
}
