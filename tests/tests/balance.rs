//! Balancers and the tower::discover adapter over real providers: how each strategy
//! spreads picks, filters, failed endpoints, live changes, and never dropping to empty.

use std::collections::HashMap;
use std::future::poll_fn;
use std::pin::Pin;
use std::time::Duration;

use tower::discover::Change;
use wasd::{Resolver, Strategy};
use wasd_tests::Sandbox;

/// A config provider serving `catalog` from an appsettings.json the test rewrites.
async fn catalog(endpoints: &[&str]) -> (Sandbox, Resolver) {
    let sandbox = Sandbox::new();
    write_catalog(&sandbox, endpoints);
    let resolver = sandbox.config_resolver().await;
    (sandbox, resolver)
}

fn write_catalog(sandbox: &Sandbox, endpoints: &[&str]) {
    sandbox.write_services("catalog", "http", endpoints);
}

const THREE: &[&str] = &["http://10.0.0.1:80", "http://10.0.0.2:80", "http://10.0.0.3:80"];

fn counts(picks: impl IntoIterator<Item = String>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for p in picks {
        *counts.entry(p).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread")]
async fn round_robin_takes_each_endpoint_in_turn() {
    let (_sandbox, resolver) = catalog(THREE).await;
    let balancer = resolver.balancer("http://catalog").await.unwrap();
    assert_eq!(balancer.strategy(), Strategy::RoundRobin);
    let picks: Vec<String> = (0..6).map(|_| balancer.pick().endpoint().to_string()).collect();
    // Some rotation of the three, twice.
    assert_eq!(picks[..3], picks[3..]);
    let mut first = picks[..3].to_vec();
    first.sort();
    assert_eq!(first, THREE);
}

#[tokio::test(flavor = "multi_thread")]
async fn random_spreads_picks_over_all_endpoints() {
    let (_sandbox, resolver) = catalog(THREE).await;
    let balancer = resolver
        .balancer_builder("http://catalog")
        .strategy(Strategy::Random)
        .build()
        .await
        .unwrap();
    let counts = counts((0..3000).map(|_| balancer.pick().endpoint().to_string()));
    assert_eq!(counts.len(), 3, "{counts:?}");
    // Expected 1000 each; 800 is more than six standard deviations away.
    assert!(counts.values().all(|&n| n > 800), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn power_of_two_choices_avoids_the_busy_endpoint() {
    let (_sandbox, resolver) = catalog(&THREE[..2]).await;
    let balancer = resolver
        .balancer_builder("http://catalog")
        .strategy(Strategy::PowerOfTwoChoices)
        .build()
        .await
        .unwrap();
    // One request outstanding on whichever endpoint comes first.
    let busy = balancer.pick();
    let busy_endpoint = busy.endpoint().to_string();
    // With two endpoints both are always compared: every pick (finished at once) goes
    // to the idle one.
    for _ in 0..50 {
        let picked = balancer.pick();
        assert_ne!(picked.endpoint().to_string(), busy_endpoint);
    }
    // Finished requests no longer count: picks spread again.
    drop(busy);
    let counts = counts((0..200).map(|_| {
        let picked = balancer.pick();
        picked.endpoint().to_string()
    }));
    assert_eq!(counts.len(), 2, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pick_first_moves_on_from_a_failed_endpoint_and_comes_back() {
    let (_sandbox, resolver) = catalog(THREE).await;
    let balancer = resolver
        .balancer_builder("http://catalog")
        .strategy(Strategy::PickFirst)
        .ejection(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let first = balancer.pick().endpoint().to_string();
    assert_eq!(first, THREE[0]);
    balancer.pick().failed();
    assert_eq!(balancer.pick().endpoint().to_string(), THREE[1]);
    // The failed endpoint is tried last, and picked again after its ejection.
    assert_eq!(balancer.endpoints().last().unwrap().to_string(), THREE[0]);
    // Its 300 ms ejection passes (the scenario's time, not a wait for an event).
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(balancer.pick().endpoint().to_string(), THREE[0]);
    // Every endpoint failed: picks still return one rather than nothing.
    for _ in 0..3 {
        let picked = balancer.pick();
        picked.failed();
    }
    let picked = balancer.pick().endpoint().to_string();
    assert!(THREE.contains(&picked.as_str()), "{picked}");
}

#[tokio::test(flavor = "multi_thread")]
async fn filters_pick_one_version_and_a_set_without_it_is_not_taken() {
    let module = wasd_tests::example_provider("rust");
    let sandbox = Sandbox::new();
    let toml = |v2_hosts: &str| {
        format!(
            r#"
pass-through = false
refresh-period = "1s"
[[provider]]
name = "table"
module = {module:?}
settings = {{ services = {{ hello = [
  {{ host = "10.0.0.1", port = 8000, scheme = "http", metadata = {{ version = "v1" }} }},
  {v2_hosts}
] }} }}
"#,
            module = module.display().to_string()
        )
    };
    let v2 = r#"{ host = "10.0.0.2", port = 8000, scheme = "http", metadata = { version = "v2" } },
  { host = "10.0.0.3", port = 8000, scheme = "http", metadata = { version = "v2" } },"#;
    let resolver = sandbox.resolver(&toml(v2)).await.unwrap();
    let balancer = resolver
        .balancer_builder("http://hello")
        .version("v2")
        .build()
        .await
        .unwrap();
    let picked = counts((0..10).map(|_| balancer.pick().endpoint().to_string()));
    assert_eq!(
        picked
            .keys()
            .map(String::as_str)
            .collect::<std::collections::BTreeSet<_>>(),
        ["http://10.0.0.2:8000", "http://10.0.0.3:8000"].into()
    );
    // The v2 instances disappear: the balancer keeps them rather than pick nothing.
    // Once the set without them has been published (the watcher sees it) and the
    // balancer has followed it (a pick looks), it still has the two.
    let mut watch = resolver.watch("http://hello").await.unwrap();
    sandbox.write("wasd.toml", toml(""));
    let without_v2 = tokio::time::timeout(Duration::from_secs(10), watch.changed())
        .await
        .expect("the set without v2 was never published")
        .unwrap();
    assert_eq!(wasd_tests::strings(&without_v2), ["http://10.0.0.1:8000"]);
    let picked = balancer.pick().endpoint().to_string();
    assert_ne!(picked, "http://10.0.0.1:8000");
    assert_eq!(balancer.endpoints().len(), 2);
    // No v2 at all from the start: building fails.
    let err = resolver
        .balancer_builder("http://hello")
        .version("v3")
        .build()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("hello"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_endpoint_stops_receiving_picks_after_one_change() {
    let (sandbox, resolver) = catalog(THREE).await;
    let balancer = resolver.balancer("http://catalog").await.unwrap();
    let mut watch = resolver.watch("http://catalog").await.unwrap();
    write_catalog(&sandbox, &THREE[..2]);
    tokio::time::timeout(Duration::from_secs(10), watch.changed())
        .await
        .expect("the change reached the watcher")
        .unwrap();
    // The balancer follows the same change (its own task; give it a moment).
    wasd_tests::eventually(
        Duration::from_secs(5),
        "the balancer kept the removed endpoint",
        || balancer.endpoints().len() == 2,
    )
    .await;
    let picks = counts((0..30).map(|_| balancer.pick().endpoint().to_string()));
    assert!(!picks.contains_key(THREE[2]), "{picks:?}");
    assert_eq!(picks.len(), 2);
    // Removing everything does not empty the balancer: once the empty set has been
    // published (the watcher sees it) and the balancer has followed it (a pick looks),
    // the balancer still has the two it had.
    write_catalog(&sandbox, &[]);
    let empty = tokio::time::timeout(Duration::from_secs(10), watch.changed())
        .await
        .expect("the empty set was never published")
        .unwrap();
    assert!(empty.is_empty(), "{empty:?}");
    let picked = balancer.pick().endpoint().to_string();
    assert!(THREE[..2].contains(&picked.as_str()), "{picked}");
    assert_eq!(balancer.endpoints().len(), 2);
}

async fn next_change<S>(
    discover: &mut wasd::Discover<S, impl FnMut(&wasd::Endpoint) -> S>,
) -> Change<wasd::Endpoint, S> {
    use futures_core::Stream;
    tokio::time::timeout(
        Duration::from_secs(10),
        poll_fn(|cx| Pin::new(&mut *discover).poll_next(cx)),
    )
    .await
    .expect("no change in time")
    .expect("the stream ended")
    .unwrap()
}

fn describe<S>(change: &Change<wasd::Endpoint, S>) -> String {
    match change {
        Change::Insert(key, _) => format!("+{key}"),
        Change::Remove(key) => format!("-{key}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn discover_streams_inserts_and_removes_and_never_empties() {
    let (sandbox, resolver) = catalog(&THREE[..2]).await;
    // The "service" for each endpoint is its address: what a client would connect to.
    let mut discover = resolver
        .discover("http://catalog", |e: &wasd::Endpoint| {
            format!("{}:{}", e.host(), e.port().unwrap_or(80))
        })
        .await
        .unwrap();
    let mut first = vec![
        describe(&next_change(&mut discover).await),
        describe(&next_change(&mut discover).await),
    ];
    first.sort();
    assert_eq!(first, ["+http://10.0.0.1:80", "+http://10.0.0.2:80"]);
    write_catalog(&sandbox, &THREE[1..]);
    assert_eq!(describe(&next_change(&mut discover).await), "-http://10.0.0.1:80");
    let added = next_change(&mut discover).await;
    assert_eq!(describe(&added), "+http://10.0.0.3:80");
    let Change::Insert(_, service) = added else {
        unreachable!()
    };
    assert_eq!(service, "10.0.0.3:80");
    // Emptied: once the empty set has been published (a watcher sees it), the stream,
    // polled with it already there, streams nothing...
    let mut watch = resolver.watch("http://catalog").await.unwrap();
    write_catalog(&sandbox, &[]);
    let empty = tokio::time::timeout(Duration::from_secs(10), watch.changed())
        .await
        .expect("the empty set was never published")
        .unwrap();
    assert!(empty.is_empty(), "{empty:?}");
    let quiet = tokio::time::timeout(Duration::from_millis(200), next_change(&mut discover)).await;
    assert!(quiet.is_err(), "an emptied set must not remove every service");
    // ...and the services of the set before it are removed only when endpoints come
    // back: had the empty set removed them, only the insert would come now.
    write_catalog(&sandbox, &THREE[..1]);
    let mut changes = Vec::new();
    for _ in 0..3 {
        changes.push(describe(&next_change(&mut discover).await));
    }
    changes.sort();
    assert_eq!(
        changes,
        [
            "+http://10.0.0.1:80",
            "-http://10.0.0.2:80",
            "-http://10.0.0.3:80"
        ]
    );
}
