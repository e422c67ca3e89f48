//! The etcd provider against a three-member etcd cluster on loopback (Debian's
//! etcd-server): the leader killed (SIGKILL) during a watch and during a registration,
//! a member frozen (SIGSTOP) as a partition, and a member that returns.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use wasd::{Query, RegistrationState, ServiceInstance};
use wasd_tests::{EtcdClient, EtcdCluster, Sandbox, eventually, strings};

/// The provider's time limit in `EtcdCluster::config` (5 s), plus the second the
/// cluster's promise allows.
const ANSWER_WITHIN: Duration = Duration::from_secs(6);

/// The endpoint of the `i`th instance written.
fn endpoint(i: usize) -> String {
    format!("http://10.1.{}.{}:80", i / 256, i % 256)
}

/// Which instance an endpoint belongs to.
fn index_of(url: &str) -> usize {
    let host = url.trim_start_matches("http://10.1.").trim_end_matches(":80");
    let (high, low) = host.split_once('.').unwrap();
    high.parse::<usize>().unwrap() * 256 + low.parse::<usize>().unwrap()
}

/// The cluster's members with `first` first, then the others in member order.
fn starting_at(cluster: &EtcdCluster, first: usize) -> Vec<String> {
    (0..3).map(|k| cluster.url((first + k) % 3)).collect()
}

/// Wait (under a deadline) until the writer has had `more` puts acknowledged.
async fn puts_acknowledged(acked: &AtomicUsize, more: usize) {
    let target = acked.load(Ordering::SeqCst) + more;
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.load(Ordering::SeqCst) < target {
        assert!(Instant::now() < deadline, "the cluster stopped taking writes");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A blocking call on the cluster (starting, stopping members) from the test's task.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_sees_every_put_in_order_through_a_leader_kill_and_a_frozen_member() {
    let mut cluster = EtcdCluster::start(3);
    let leader = cluster.leader();
    let client = cluster.client();
    client.put_instance("seq", "i0000", "v1", &[&endpoint(0)]);
    let sandbox = Sandbox::new();
    // The leader first: the first watch is on the member that dies. The periodic
    // refresh is far off, so only the watch can bring the changes in time.
    let toml = cluster
        .config(&starting_at(&cluster, leader), r#", watch-keepalive = "1s""#)
        .replace(
            "pass-through = false",
            "pass-through = false\nrefresh-period = \"60s\"",
        );
    let resolver = sandbox.resolver(&toml).await.unwrap();
    let mut watch = resolver.watch("seq").await.unwrap();
    assert_eq!(strings(&watch.current()), [endpoint(0)]);

    // One writer puts instance after instance, each once the last was acknowledged
    // (so their order is etcd's order), paced at 25 a second.
    let writing = Arc::new(AtomicBool::new(true));
    let paused = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let writer = std::thread::spawn({
        let (client, writing, paused, acked) =
            (client.clone(), writing.clone(), paused.clone(), acked.clone());
        move || {
            let mut times = vec![Instant::now()];
            while writing.load(Ordering::SeqCst) {
                if paused.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                let i = times.len();
                client.put_instance("seq", &format!("i{i:04}"), "v1", &[&endpoint(i)]);
                times.push(Instant::now());
                acked.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(40));
            }
            times
        }
    });

    // Meanwhile every published set is kept, and resolves (cached and not) are timed.
    // (Until a set holds the last put, `last`, once the writer has stopped; or 20 s
    // without a change.) `newest` is the highest instance published so far.
    let last = Arc::new(AtomicUsize::new(usize::MAX));
    let newest = Arc::new(AtomicUsize::new(0));
    let sets = tokio::spawn({
        let (last, newest) = (last.clone(), newest.clone());
        async move {
            let mut sets: Vec<(Instant, BTreeSet<usize>)> = Vec::new();
            let mut quiet_since = Instant::now();
            while quiet_since.elapsed() < Duration::from_secs(20) {
                let highest = sets.last().and_then(|(_, set)| set.last().copied());
                if highest == Some(last.load(Ordering::SeqCst)) {
                    break;
                }
                if let Ok(set) = tokio::time::timeout(Duration::from_millis(100), watch.changed()).await {
                    let set = set.expect("the resolver is alive");
                    let set: BTreeSet<usize> = strings(&set).iter().map(|u| index_of(u)).collect();
                    newest.store(set.last().copied().unwrap_or(0), Ordering::SeqCst);
                    sets.push((Instant::now(), set));
                    quiet_since = Instant::now();
                }
            }
            sets
        }
    });
    // Uncached resolves (each a call to the provider) on a resolver of their own: on
    // the watcher's, a resolve of a set whose long-poll is stuck would refresh it and
    // stand in for the watch.
    let resolving = Arc::new(AtomicBool::new(true));
    let resolves = tokio::spawn({
        let resolver = sandbox.resolver(&toml).await.unwrap();
        let resolving = resolving.clone();
        async move {
            let query = Query::parse("seq").unwrap();
            let mut timings = Vec::new();
            while resolving.load(Ordering::SeqCst) {
                let started = Instant::now();
                let set = resolver.resolve_uncached(&query).await;
                timings.push((set, started.elapsed()));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            timings
        }
    });

    puts_acknowledged(&acked, 15).await;
    blocking(|| cluster.kill(leader));
    puts_acknowledged(&acked, 25).await; // through the election
    blocking(|| cluster.restart(leader));
    puts_acknowledged(&acked, 10).await;
    // Quiet: the watcher catches up and its watch waits on one member. Freeze that
    // one (the stream just goes quiet; only the keep-alive probe can tell), then
    // write again.
    paused.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while newest.load(Ordering::SeqCst) < acked.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the watcher did not catch up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let holder = blocking(|| cluster.watch_holder());
    blocking(|| cluster.freeze(holder));
    paused.store(false, Ordering::SeqCst);
    puts_acknowledged(&acked, 100).await; // 4 s and more: far past the keep-alive

    blocking(|| cluster.thaw(holder));
    puts_acknowledged(&acked, 10).await;
    writing.store(false, Ordering::SeqCst);
    let times = writer.join().unwrap();
    last.store(times.len() - 1, Ordering::SeqCst);
    let last = times.len() - 1;
    resolving.store(false, Ordering::SeqCst);

    // Every put reaches the watcher, in order: each published set is the instances
    // 0..=k for a growing k (a set with a gap would have lost or reordered a put),
    // and the last one has them all.
    let sets = sets.await.unwrap();
    let mut seen = 0;
    let mut delays = Vec::new();
    for (at, set) in &sets {
        let k = *set.last().unwrap();
        assert_eq!(set.len(), k + 1, "a published set skipped a put: {set:?}");
        assert!(k >= seen, "the published sets went back from {seen} to {k}");
        delays.extend(
            times[seen + 1..=k]
                .iter()
                .map(|put| at.saturating_duration_since(*put)),
        );
        seen = k;
    }
    assert_eq!(seen, last, "the watcher never saw the last of {last} puts");
    delays.sort();
    // And soon: a dead member's stream ends at once, a frozen one's is given up after
    // the keep-alive (1 s) and a request's timeout (0.5 s); the margin is for load.
    assert!(
        *delays.last().unwrap() <= Duration::from_secs(3),
        "a put took {:?} to reach the watcher",
        delays.last().unwrap()
    );
    eprintln!(
        "{last} puts, {} sets published; put -> watcher p50 {:?}, p99 {:?}, max {:?}",
        sets.len(),
        delays[delays.len() / 2],
        delays[delays.len() * 99 / 100],
        delays.last().unwrap()
    );

    // Resolves kept answering within the provider's limit plus a second: through the
    // election, the provider goes on asking (`retry-for`).
    let timings = resolves.await.unwrap();
    assert!(timings.len() > 20, "only {} resolves", timings.len());
    for (set, took) in &timings {
        assert!(*took <= ANSWER_WITHIN, "a resolve took {took:?}");
        assert!(!set.as_ref().unwrap().is_empty());
    }
    eprintln!(
        "{} uncached resolves; slowest {:?}",
        timings.len(),
        timings.iter().map(|t| t.1).max().unwrap()
    );
}

/// Keep-alives handled so far by the members other than `away`.
fn keep_alives_without(cluster: &EtcdCluster, away: usize) -> u64 {
    blocking(|| {
        (0..3)
            .filter(|&i| i != away)
            .map(|i| cluster.served(i, "LeaseKeepAlive"))
            .sum()
    })
}

/// Wait (30 s at most) until the members other than `away` have handled `n` more
/// keep-alives than `before`.
async fn renewed_without(cluster: &EtcdCluster, away: usize, before: u64, n: u64) {
    let what = format!("fewer than {n} keep-alives reached the members other than {away}");
    eventually(Duration::from_secs(30), &what, || {
        keep_alives_without(cluster, away) - before >= n
    })
    .await;
}

/// Poll the instance's key from another client until `done`; how many polls missed it.
fn watch_key(
    client: EtcdClient,
    key: String,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(usize, usize)> {
    std::thread::spawn(move || {
        let (mut polls, mut missing) = (0, 0);
        while !done.load(Ordering::SeqCst) {
            polls += 1;
            if client.get_prefix(&key).is_empty() {
                missing += 1;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        (polls, missing)
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registration_keeps_its_lease_through_a_leader_kill_and_a_frozen_member() {
    let mut cluster = EtcdCluster::start(3);
    let leader = cluster.leader();
    let sandbox = Sandbox::new();
    let resolver = sandbox
        .resolver(&cluster.config(&starting_at(&cluster, leader), ""))
        .await
        .unwrap();
    let instance = ServiceInstance::new("web", ["http://10.2.0.1:80"]);
    let key = format!("/microservices/web/{}", instance.id);
    // A lease of 2 s, kept alive every 2/3 s: an outage of the keep-alives longer than
    // the lease would let etcd delete the key.
    let ttl = Duration::from_secs(2);
    let mut registration = resolver.register_with_ttl(instance, ttl).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), registration.registered())
        .await
        .unwrap()
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let poller = watch_key(cluster.client(), key.clone(), done.clone());

    // The leader (which the provider talks to first) dies; the lease must be renewed
    // through the others for three TTLs' worth of keep-alives (one every TTL / 3).
    let renewals = 9;
    let before = keep_alives_without(&cluster, leader);
    blocking(|| cluster.kill(leader));
    renewed_without(&cluster, leader, before, renewals).await;
    blocking(|| cluster.restart(leader));

    // The new leader freezes: keep-alives time out there and go elsewhere.
    let frozen = blocking(|| cluster.leader());
    let before = keep_alives_without(&cluster, frozen);
    blocking(|| cluster.freeze(frozen));
    renewed_without(&cluster, frozen, before, renewals).await;
    blocking(|| cluster.thaw(frozen));
    done.store(true, Ordering::SeqCst);
    let (polls, missing) = blocking(|| poller.join().unwrap());

    assert_eq!(missing, 0, "the instance was gone in {missing} of {polls} polls");
    assert!(polls > 50, "only {polls} polls");
    assert!(
        matches!(registration.state(), RegistrationState::Registered { .. }),
        "{:?}",
        registration.state()
    );
    registration.deregister().await.unwrap();
    assert!(cluster.client().get_prefix(&key).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_member_that_returns_is_used_again() {
    let mut cluster = EtcdCluster::start(3);
    cluster
        .client()
        .put_instance("hello", "a", "v1", &["http://10.3.0.1:80"]);
    let sandbox = Sandbox::new();
    let resolver = sandbox
        .resolver(&cluster.config(&starting_at(&cluster, 0), ""))
        .await
        .unwrap();
    let query = Query::parse("hello").unwrap();
    let resolve = || async {
        let started = Instant::now();
        let set = resolver.resolve_uncached(&query).await.unwrap();
        assert_eq!(strings(&set), ["http://10.3.0.1:80"]);
        assert!(started.elapsed() <= ANSWER_WITHIN, "took {:?}", started.elapsed());
    };

    // Member 0 goes away and comes back; then 1 and 2 go away in turn (one at a time,
    // keeping a quorum). The provider moved on from 0 while it was down; when the
    // members it moved to fail, 0 must serve it again.
    blocking(|| cluster.kill(0));
    resolve().await;
    blocking(|| cluster.restart(0));
    let back = blocking(|| cluster.served(0, "Range"));
    for gone in [1, 2] {
        blocking(|| cluster.kill(gone));
        for _ in 0..5 {
            resolve().await;
        }
        blocking(|| cluster.restart(gone));
    }
    let served = blocking(|| cluster.served(0, "Range"));
    assert!(
        served > back,
        "member 0 served no range since it returned ({back} -> {served})"
    );
}
