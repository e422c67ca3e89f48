//! Faults over time (issue 16, rule 7): servers killed, wiped and restarted, a provider
//! that starts looping mid-run, a config file rewritten every way editors and
//! Kubernetes do. All along, an [`Observer`] records what a watcher (`wasd watch`) and a
//! resolve loop with no cache (`wasd resolve`, a new process each time) see, and each
//! test asserts on the whole record: never an empty set, never an answer from a
//! provider that may not answer (pass-through standing in for a failing etcd), and the
//! new set within its bound.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasd::{Query, Resolver};
use wasd_tests::{DnsServer, EtcdServer, Sandbox, fixtures, strings};

/// What one observer saw, in order.
#[derive(Clone)]
struct Seen {
    at: Instant,
    /// Since the observer started, for the record printed when a test fails.
    ms: u128,
    /// `watch` or `resolve`.
    by: &'static str,
    /// The answering provider and the endpoints, or the error.
    answer: Result<(String, Vec<String>), String>,
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:>6} ms {:<7} {:?}", self.ms, self.by, self.answer)
    }
}

/// A watcher and a resolve loop on one query, recording everything they see.
struct Observer {
    seen: Arc<Mutex<Vec<Seen>>>,
    changed: tokio::sync::watch::Receiver<usize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Observer {
    async fn start(resolver: &Resolver, query: &str) -> Observer {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (count, changed) = tokio::sync::watch::channel(0);
        let started = Instant::now();
        let count = Arc::new(count);
        let record = {
            let seen = seen.clone();
            let count = count.clone();
            move |by, answer| {
                let mut seen = seen.lock().unwrap();
                seen.push(Seen {
                    at: Instant::now(),
                    ms: started.elapsed().as_millis(),
                    by,
                    answer,
                });
                count.send_replace(seen.len());
            }
        };
        let of = |set: &wasd::EndpointSet| (set.provider().unwrap_or_default().to_owned(), strings(set));
        let mut watch = resolver.watch(query).await.unwrap();
        record("watch", Ok(of(&watch.current())));
        let watcher = tokio::spawn({
            let record = record.clone();
            async move {
                while let Some(set) = watch.changed().await {
                    record("watch", Ok(of(&set)));
                }
            }
        });
        let parsed = Query::parse(query).unwrap();
        let resolver = resolver.clone();
        let looper = tokio::spawn(async move {
            loop {
                let answer = resolver
                    .resolve_uncached(&parsed)
                    .await
                    .map(|set| of(&set))
                    .map_err(|e| e.to_string());
                record("resolve", answer);
                // Pacing of the loop, not a wait for anything.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Observer {
            seen,
            changed,
            tasks: vec![watcher, looper],
        }
    }

    fn history(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Wait until `by` sees exactly `endpoints`, at most `bound`; how long it took.
    async fn sees(&mut self, by: &str, endpoints: &[&str], bound: Duration) -> Duration {
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let history = self.history();
            let matches = |s: &Seen| matches!(&s.answer, Ok((_, e)) if e == endpoints);
            // Seeing it now (its latest observation), or at any time since asked.
            let found = history.iter().rev().find(|s| s.by == by).is_some_and(matches)
                || history.iter().any(|s| s.by == by && s.at >= start && matches(s));
            if found {
                return start.elapsed();
            }
            if tokio::time::timeout_at(deadline, self.changed.changed())
                .await
                .is_err()
            {
                panic!(
                    "{by} did not see {endpoints:?} within {bound:?}; saw {:#?}",
                    self.tail()
                );
            }
        }
    }

    /// Wait until `by` has seen something more since now (the loop went round).
    async fn next(&mut self, by: &str) {
        let before = self.history().iter().filter(|s| s.by == by).count();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.history().iter().filter(|s| s.by == by).count() == before {
            tokio::time::timeout_at(deadline, self.changed.changed())
                .await
                .expect("the observer stopped")
                .unwrap();
        }
    }

    /// Wait until the resolve loop has failed `n` times in all, at most `within`.
    async fn failed(&mut self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.failures() < n {
            assert!(Instant::now() < deadline, "no failure: {:#?}", self.tail());
            self.next("resolve").await;
        }
    }

    fn failures(&self) -> usize {
        self.history().iter().filter(|s| s.answer.is_err()).count()
    }

    fn tail(&self) -> Vec<Seen> {
        let history = self.history();
        history[history.len().saturating_sub(8)..].to_vec()
    }

    /// Every answer anyone saw came from one of `allowed` and was not empty; every
    /// failure named `culprit`. Returns the number of answers and failures seen.
    fn check(&self, allowed: &[&str], culprit: &str) -> (usize, usize) {
        let (mut answers, mut failures) = (0, 0);
        for seen in self.history() {
            match &seen.answer {
                Ok((provider, endpoints)) => {
                    answers += 1;
                    assert!(
                        allowed.contains(&provider.as_str()),
                        "an answer from '{provider}': {seen:?}"
                    );
                    assert!(!endpoints.is_empty(), "an empty set: {seen:?}");
                }
                Err(error) => {
                    failures += 1;
                    assert!(
                        seen.by == "resolve" && error.contains(&format!("provider '{culprit}'")),
                        "{seen:?}"
                    );
                }
            }
        }
        (answers, failures)
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The etcd provider at `url`, then pass-through (on, as by default: the provider a
/// failure must never fall through to).
fn etcd_config(url: &str) -> String {
    format!(
        r#"
[[provider]]
builtin = "etcd"
settings = {{ endpoints = ["{url}"], timeout = "500ms" }}
grants = {{ http = ["{url}"] }}
limits = {{ timeout = "3s" }}
"#
    )
}

/// etcd serving `hello` (v1 at 10.0.0.1), a resolver on it with pass-through on, and
/// an observer of `http://hello` that has seen the loop go round once.
async fn etcd_observed() -> (EtcdServer, Sandbox, Resolver, Observer) {
    let etcd = EtcdServer::start();
    etcd.put_instance("hello", "a", "v1", &["http://10.0.0.1:8000"], None);
    let sandbox = Sandbox::new();
    let resolver = sandbox.resolver(&etcd_config(&etcd.url())).await.unwrap();
    let mut observer = Observer::start(&resolver, "http://hello").await;
    observer.next("resolve").await;
    (etcd, sandbox, resolver, observer)
}

/// etcd, back, gets `hello` v2 (10.0.0.2): the watcher and the resolve loop follow
/// within 5 s; how long the watcher took.
async fn back_with_v2(etcd: &mut EtcdServer, observer: &mut Observer) -> Duration {
    etcd.restart();
    etcd.put_instance("hello", "a", "v2", &["http://10.0.0.2:8000"], None);
    let took = observer
        .sees("watch", &["http://10.0.0.2:8000"], Duration::from_secs(5))
        .await;
    observer
        .sees("resolve", &["http://10.0.0.2:8000"], Duration::from_secs(5))
        .await;
    took
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_killed_and_restarted_on_its_data() {
    let (mut etcd, _sandbox, _resolver, mut observer) = etcd_observed().await;
    etcd.kill(); // SIGKILL
    // Down until the resolve loop has failed a few times.
    observer.failed(5, Duration::from_secs(15)).await;
    back_with_v2(&mut etcd, &mut observer).await;
    let (answers, failures) = observer.check(&["etcd"], "etcd");
    assert!(
        answers > 2 && failures >= 5,
        "{answers} answers, {failures} failures"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_away_for_60s() {
    let (mut etcd, _sandbox, _resolver, mut observer) = etcd_observed().await;
    etcd.kill();
    // Away for a minute (the scenario, not a wait for an event).
    tokio::time::sleep(Duration::from_secs(60)).await;
    // All that time the watcher kept the last good set: it saw nothing new.
    let watched: Vec<Seen> = observer
        .history()
        .into_iter()
        .filter(|s| s.by == "watch")
        .collect();
    assert_eq!(watched.len(), 1, "{watched:#?}");
    let took = back_with_v2(&mut etcd, &mut observer).await;
    eprintln!("the watcher followed {took:?} after etcd's return");
    observer.check(&["etcd"], "etcd");
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_wiped_registrations_return_within_10s_and_discovery_follows() {
    let mut etcd = EtcdServer::start();
    let sandbox = Sandbox::new();
    let resolver = sandbox.resolver(&etcd_config(&etcd.url())).await.unwrap();
    let instance = wasd::ServiceInstance::new("hello", ["http://10.0.0.1:8000"]);
    // Kept registered until the end of the test.
    let _registration = wasd_tests::register(&resolver, instance, Duration::from_secs(3)).await;
    let mut observer = Observer::start(&resolver, "http://hello").await;
    observer
        .sees("watch", &["http://10.0.0.1:8000"], Duration::from_secs(1))
        .await;

    // Down and back with an empty data folder: the lease and the key are gone.
    let down = Instant::now();
    // Back from the moment the new process starts: it can answer (empty) before it
    // reports healthy, and pass-through may then stand in for that clean "nothing".
    let back = etcd.restart_empty();
    let deadline = Instant::now() + Duration::from_secs(10);
    while etcd.get_prefix("/microservices/hello/").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the registration did not come back within 10 s"
        );
        observer.next("resolve").await;
    }
    eprintln!("registered again {:?} after etcd's return", back.elapsed());
    // Discovery follows: the watcher sees the instance (again).
    observer
        .sees("resolve", &["http://10.0.0.1:8000"], Duration::from_secs(5))
        .await;
    // While etcd was down nothing but etcd answered; once back and empty, before the
    // registration returned, pass-through may stand in for its clean "nothing" (rule 1).
    for seen in observer.history() {
        if let Ok((provider, endpoints)) = &seen.answer {
            assert!(!endpoints.is_empty(), "{seen:?}");
            let while_down = seen.at >= down && seen.at < back;
            assert!(
                provider == "etcd" || (!while_down && provider == "pass-through"),
                "{seen:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dnsmasq_killed_and_restarted() {
    const RECORDS: &[&str] = &[
        "--srv-host=_default._tcp.basket.cluster.local,basket-1.cluster.local,8080,0,10",
        "--host-record=basket-1.cluster.local,10.0.0.1",
    ];
    const CHANGED: &[&str] = &[
        "--srv-host=_default._tcp.basket.cluster.local,basket-2.cluster.local,8081,0,10",
        "--host-record=basket-2.cluster.local,10.0.0.2",
    ];
    let mut dns = DnsServer::start(1, RECORDS);
    let toml = format!(
        r#"
[dns]
servers = ["{}"]
timeout = "300ms"

[[provider]]
builtin = "dns-srv"
settings = {{ suffix = "cluster.local" }}
grants = {{ dns = ["*"] }}
"#,
        dns.address()
    );
    let sandbox = Sandbox::new();
    let resolver = sandbox.resolver(&toml).await.unwrap();
    let mut observer = Observer::start(&resolver, "basket").await;
    observer
        .sees("watch", &["10.0.0.1:8080"], Duration::from_secs(1))
        .await;

    dns.stop();
    // Down until the resolve loop has failed a few times (answers cached by the DNS
    // client for their TTL come first).
    observer.failed(3, Duration::from_secs(15)).await;
    dns.restart(CHANGED);
    // The TTL is 1 s; the refresh after the outage follows within its back-off's
    // probe period.
    observer
        .sees("watch", &["10.0.0.2:8081"], Duration::from_secs(6))
        .await;
    observer
        .sees("resolve", &["10.0.0.2:8081"], Duration::from_secs(2))
        .await;
    let (_, failures) = observer.check(&["dns-srv"], "dns-srv");
    assert!(failures >= 3, "{failures}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_that_starts_looping_mid_run() {
    let sandbox = Sandbox::new();
    sandbox.write_services("catalog", "http", &["http://10.0.9.9:80"]);
    // Answers until 3 s from now, then loops on every call (in every instance); the
    // config provider after it knows the service too, and must not stand in for it.
    let from = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 3_000;
    let toml = format!(
        r#"
[[provider]]
name = "looping"
module = "{}"
settings = {{ service = "catalog", loop_from_unix_ms = {from}, answers = [{{ endpoints = ["http://10.0.0.1:80"], ttl_ms = 1000 }}] }}
limits = {{ timeout = "200ms" }}

[[provider]]
builtin = "config"
grants = {{ files = ["appsettings.json"] }}
"#,
        fixtures::SEQUENCE
    );
    let resolver = sandbox.resolver(&toml).await.unwrap();
    let mut observer = Observer::start(&resolver, "http://catalog").await;
    // It starts looping; the resolve loop fails on its time limit, then finds it
    // quarantined (failing at once, not after 200 ms each time).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        observer.next("resolve").await;
        let history = observer.history();
        if history
            .iter()
            .any(|s| matches!(&s.answer, Err(e) if e.contains("quarantined")))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never quarantined: {:#?}",
            observer.tail()
        );
    }
    // Running on for a while after.
    for _ in 0..20 {
        observer.next("resolve").await;
    }
    let history = observer.history();
    assert!(
        history
            .iter()
            .any(|s| matches!(&s.answer, Err(e) if e.contains("time limit"))),
        "{history:#?}"
    );
    // The watcher kept the looping provider's last good set all along.
    let watched: Vec<Seen> = history.iter().filter(|s| s.by == "watch").cloned().collect();
    assert_eq!(watched.len(), 1, "{watched:#?}");
    observer.check(&["looping"], "looping");
}

/// Ways a config file gets replaced, each followed by a watcher and a resolve loop.
#[tokio::test(flavor = "multi_thread")]
async fn a_config_file_rewritten_every_way() {
    let sandbox = Sandbox::new();
    let dir = sandbox.path();
    // A ConfigMap-style folder: appsettings.json -> ..data/appsettings.json,
    // ..data -> ..v0.
    let services = |ip: &str| format!(r#"{{"Services": {{"basket": {{"http": ["http://{ip}:80"]}}}}}}"#);
    std::fs::create_dir(dir.join("..v0")).unwrap();
    std::fs::write(dir.join("..v0/appsettings.json"), services("10.0.0.1")).unwrap();
    std::os::unix::fs::symlink("..v0", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/appsettings.json", dir.join("appsettings.json")).unwrap();
    let resolver = sandbox
        .resolver("[[provider]]\nbuiltin = \"config\"\ngrants = { files = [\"appsettings.json\"] }\n")
        .await
        .unwrap();
    let mut observer = Observer::start(&resolver, "http://basket").await;
    let target = dir.join("appsettings.json");
    let bound = Duration::from_secs(5);

    // The ConfigMap flip: a new folder, `..data` renamed over in one step.
    std::fs::create_dir(dir.join("..v1")).unwrap();
    std::fs::write(dir.join("..v1/appsettings.json"), services("10.0.0.2")).unwrap();
    std::os::unix::fs::symlink("..v1", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    observer.sees("watch", &["http://10.0.0.2:80"], bound).await;

    // Out of Kubernetes: a plain file again, by rename over the symlink.
    write_then_rename(&target, &services("10.0.0.3"));
    observer.sees("watch", &["http://10.0.0.3:80"], bound).await;

    // Written in place (truncate, then write).
    std::fs::write(&target, services("10.0.0.4")).unwrap();
    observer.sees("watch", &["http://10.0.0.4:80"], bound).await;

    // Deleted, then created.
    std::fs::remove_file(&target).unwrap();
    std::fs::write(&target, services("10.0.0.5")).unwrap();
    observer.sees("watch", &["http://10.0.0.5:80"], bound).await;

    // A broken file, then a good one: the broken one changes nothing.
    std::fs::write(&target, "{ not json").unwrap();
    for _ in 0..10 {
        observer.next("resolve").await;
    }
    write_then_rename(&target, &services("10.0.0.6"));
    observer.sees("watch", &["http://10.0.0.6:80"], bound).await;
    observer.sees("resolve", &["http://10.0.0.6:80"], bound).await;

    // All along: only the config provider answered, never with an empty set, and the
    // watcher saw each version in order.
    observer.check(&["config"], "config");
    let watched: Vec<String> = observer
        .history()
        .into_iter()
        .filter(|s| s.by == "watch")
        .filter_map(|s| s.answer.ok().map(|(_, e)| e.join(",")))
        .collect();
    let mut deduped = watched.clone();
    deduped.dedup();
    assert_eq!(
        deduped,
        (1..=6)
            .map(|i| format!("http://10.0.0.{i}:80"))
            .collect::<Vec<_>>(),
        "{watched:?}"
    );
}

/// Write `bytes` to `path` through a temporary file and a rename, as deploy tools do.
fn write_then_rename(path: &Path, bytes: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
