//! The cache: single-flight first resolves, TTL refresh, back-off, last good answers,
//! idle expiry and long-polls.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, timeout};

use super::fake::{Fake, WatchCall, WatchMode, answer, bare, cache_of, down, ms, secs, set};
use crate::{EndpointSet, Error, Query, Settings};

/// Lets every task run and time advance (on the paused clock) by `d`.
async fn run_for(d: Duration) {
    sleep(d).await;
}

/// The gaps between consecutive call times.
fn gaps(times: &[Duration]) -> Vec<Duration> {
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

// Rule 1: single flight.

#[tokio::test(start_paused = true)]
async fn concurrent_first_resolves_run_the_chain_once() {
    let a = Arc::new(
        Fake::new("a")
            .answering(answer(&[bare("10.0.0.1")]))
            .slow(ms(100)),
    );
    let cache = Arc::new(cache_of(&[&a], Settings::default()));
    let mut resolves = JoinSet::new();
    for _ in 0..8 {
        let cache = cache.clone();
        resolves.spawn(async move { cache.resolve("svc").await });
    }
    let results = resolves.join_all().await;
    // Every caller gets the answer...
    assert_eq!(results.len(), 8);
    for result in results {
        assert_eq!(result.unwrap(), set("a", &[bare("10.0.0.1")]));
    }
    // ...from one call of the source, made when the first resolve started.
    assert_eq!(a.call_times(), [Duration::ZERO]);
    // A later resolve is served from the cache.
    cache.resolve("svc").await.unwrap();
    assert_eq!(a.calls(), 1);
}

// Concurrent first resolves of a failing query share its one failure (tokio's
// `OnceCell::get_or_try_init` alone would let each waiter run the chain in turn).
#[tokio::test(start_paused = true)]
async fn concurrent_first_resolves_share_one_failure() {
    let a = Arc::new(Fake::new("a").failing().slow(ms(100)));
    let cache = Arc::new(cache_of(&[&a], Settings::default()));
    let mut resolves = JoinSet::new();
    for _ in 0..4 {
        let cache = cache.clone();
        resolves.spawn(async move { cache.resolve("svc").await });
    }
    for result in resolves.join_all().await {
        // Each caller gets the failure, naming the source...
        match result {
            Err(Error::NoEndpoints { service, failures }) => {
                assert_eq!(service, "svc");
                assert_eq!(failures, [down("a")]);
            }
            other => panic!("expected NoEndpoints, got {other:?}"),
        }
    }
    // ...from one call of the source.
    assert_eq!(a.calls(), 1, "calls at {:?}", a.call_times());
}

/// A resolve that joined a first run which failed gets that failure and leaves nothing
/// behind: no entry, no refresh loop. The next resolve asks again, and its answer is
/// cached, refreshed and idles out like any other.
#[tokio::test(start_paused = true)]
async fn a_shared_failure_leaves_no_refresh_loop_behind() {
    let a = Arc::new(Fake::new("a").failing().slow(ms(100)));
    let settings = Settings::default().with_idle_timeout(secs(10));
    let cache = Arc::new(cache_of(&[&a], settings));
    let (first, second, ()) = tokio::join!(
        cache.resolve("svc"),
        async {
            // Joins the first resolve in flight.
            run_for(ms(50)).await;
            cache.resolve("svc").await
        },
        async {
            // The source recovers after the first call failed (at 100 ms).
            run_for(ms(150)).await;
            a.answer(answer(&[bare("10.0.0.1")]).with_ttl(secs(1)));
        }
    );
    assert!(first.is_err());
    assert!(
        second.is_err(),
        "the joined resolve shares the failure: {second:?}"
    );
    assert_eq!(cache.len(), 0);
    // Nothing refreshes the failed query.
    run_for(secs(5)).await;
    assert_eq!(a.call_times(), [ms(0)]);
    // Asked again, it is answered, cached and refreshed on its TTL...
    assert_eq!(cache.resolve("svc").await.unwrap(), set("a", &[bare("10.0.0.1")]));
    assert_eq!(cache.len(), 1);
    // (each 1 s after a 100 ms call).
    run_for(ms(3_500)).await;
    assert_eq!(a.call_times(), [0, 5_150, 6_250, 7_350, 8_450].map(ms));
    // ...until it idles out (10 s after its last use), when its refreshes stop.
    run_for(secs(30)).await;
    assert_eq!(cache.len(), 0);
    let calls = a.calls();
    run_for(secs(30)).await;
    assert_eq!(a.calls(), calls, "still refreshing: {:?}", a.call_times());
}

#[tokio::test(start_paused = true)]
async fn a_failed_first_resolve_is_not_cached() {
    let a = Arc::new(Fake::new("a").failing());
    let cache = cache_of(&[&a], Settings::default());
    let err = cache.resolve("svc").await.unwrap_err();
    assert!(
        matches!(&err, Error::NoEndpoints { failures, .. } if failures == &[down("a")]),
        "{err:?}"
    );
    // Nothing cached, nothing refreshing.
    assert_eq!(cache.len(), 0);
    run_for(secs(120)).await;
    assert_eq!(a.calls(), 1);
    // The next resolve asks the source again, and gets its answer.
    a.answer(answer(&[bare("10.0.0.1")]));
    assert_eq!(cache.resolve("svc").await.unwrap(), set("a", &[bare("10.0.0.1")]));
    assert_eq!(a.calls(), 2);
    assert_eq!(cache.len(), 1);
}

// Rule 2: refresh on the TTL.

#[tokio::test(start_paused = true)]
async fn an_answer_is_asked_again_after_its_ttl() {
    let a = Arc::new(Fake::new("a").answering(answer(&[bare("10.0.0.1")]).with_ttl(secs(5))));
    let cache = cache_of(&[&a], Settings::default());
    cache.resolve("svc").await.unwrap();
    run_for(ms(4_999)).await;
    // Not before the TTL...
    assert_eq!(a.call_times(), [secs(0)]);
    run_for(ms(10_002)).await;
    // ...and every TTL after it.
    assert_eq!(a.call_times(), [secs(0), secs(5), secs(10), secs(15)]);
}

#[tokio::test(start_paused = true)]
async fn a_zero_ttl_is_refreshed_once_a_second() {
    let a = Arc::new(Fake::new("a").answering(answer(&[bare("10.0.0.1")]).with_ttl(Duration::ZERO)));
    let cache = cache_of(&[&a], Settings::default());
    cache.resolve("svc").await.unwrap();
    run_for(ms(3_500)).await;
    assert_eq!(a.call_times(), [secs(0), secs(1), secs(2), secs(3)]);
}

#[tokio::test(start_paused = true)]
async fn a_long_ttl_is_refreshed_every_refresh_period() {
    let a = Arc::new(Fake::new("a").answering(answer(&[bare("10.0.0.1")]).with_ttl(secs(3600))));
    let settings = Settings::default()
        .with_refresh_period(secs(10))
        .with_idle_timeout(secs(3600));
    let cache = cache_of(&[&a], settings);
    cache.resolve("svc").await.unwrap();
    run_for(secs(35)).await;
    assert_eq!(a.call_times(), [secs(0), secs(10), secs(20), secs(30)]);
}

#[tokio::test(start_paused = true)]
async fn a_changed_answer_is_published_to_watches_and_an_unchanged_one_is_not() {
    let start = Instant::now();
    let a = Arc::new(Fake::new("a").answering(answer(&[bare("10.0.0.1")]).with_ttl(secs(5))));
    let cache = cache_of(&[&a], Settings::default());
    let mut watch = cache.watch("svc").await.unwrap();
    assert_eq!(watch.current(), set("a", &[bare("10.0.0.1")]));
    // Two refreshes with the same answer: no change reported.
    assert!(timeout(ms(12_000), watch.changed()).await.is_err());
    assert_eq!(a.calls(), 3);
    // The answer changes at 12 s; the refresh at 15 s publishes it.
    a.answer(answer(&[bare("10.0.0.2")]).with_ttl(secs(5)));
    let changed = timeout(secs(60), watch.changed())
        .await
        .expect("no change published");
    assert_eq!(changed, Some(set("a", &[bare("10.0.0.2")])));
    assert_eq!(start.elapsed(), secs(15));
    // Resolves see it too.
    assert_eq!(cache.resolve("svc").await.unwrap(), set("a", &[bare("10.0.0.2")]));
}

#[tokio::test(start_paused = true)]
async fn a_set_is_numbered_anew_only_when_its_endpoints_change() {
    let a = Arc::new(Fake::new("a").answering(answer(&[bare("10.0.0.1")]).with_ttl(secs(5))));
    let b = Arc::new(Fake::new("b").answering(answer(&[bare("10.0.0.9")])));
    let cache = cache_of(&[&a, &b], Settings::default());
    let mut watch = cache.watch("svc").await.unwrap();
    let first = watch.current().index();
    assert!(first > 0, "a published set has a number");
    // Another query's set has a number of its own.
    let other = cache.resolve("_named.svc").await.unwrap().index();
    assert_ne!(other, first);
    // Refreshes with the same endpoints keep the number...
    assert!(timeout(ms(12_000), watch.changed()).await.is_err());
    assert_eq!(cache.resolve("svc").await.unwrap().index(), first);
    // ...and so does a failed refresh that keeps the last good set (its failures
    // recorded, its endpoints the same).
    a.fail();
    tokio::time::sleep(secs(5)).await;
    let kept = cache.resolve("svc").await.unwrap();
    assert_eq!((kept.failures(), kept.index()), (&[down("a")][..], first));
    // New endpoints: a higher number than any before.
    a.answer(answer(&[bare("10.0.0.2")]).with_ttl(secs(5)));
    let changed = timeout(secs(60), watch.changed()).await.unwrap().unwrap();
    assert!(
        changed.index() > first.max(other),
        "{} after {first}, {other}",
        changed.index()
    );
    assert_eq!(cache.resolve("svc").await.unwrap().index(), changed.index());
}

#[tokio::test(start_paused = true)]
async fn the_latest_sets_version_rises_with_each_set_stored_and_only_then() {
    let a = Arc::new(Fake::new("a").answering(answer(&[bare("10.0.0.1")]).with_ttl(secs(5))));
    let b = Arc::new(Fake::new("b").answering(answer(&[bare("10.0.0.9")])));
    let cache = cache_of(&[&a, &b], Settings::default());
    let (_watch, latest) = cache.watch_latest(&Query::parse("svc").unwrap()).await.unwrap();
    let first = latest.version();
    let endpoints = |latest: &crate::Latest| {
        EndpointSet::from_shared(latest.load_full().expect("a set"))
            .iter()
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(endpoints(&latest), vec![bare("10.0.0.1")]);
    // Refreshes with the same answer store nothing: the version stays.
    run_for(ms(12_000)).await;
    assert_eq!(latest.version(), first);
    // A failed refresh keeps the endpoints but stores the set with its failure.
    a.fail();
    run_for(secs(5)).await;
    let failed = latest.version();
    assert!(failed > first, "{failed} after {first}");
    assert_eq!(
        EndpointSet::from_shared(latest.load_full().unwrap()).failures(),
        &[down("a")][..]
    );
    // New endpoints: a higher version, and the set stored before it is visible.
    a.answer(answer(&[bare("10.0.0.2")]).with_ttl(secs(5)));
    run_for(secs(60)).await;
    assert!(latest.version() > failed);
    assert_eq!(endpoints(&latest), vec![bare("10.0.0.2")]);
}

// Rule 3: back-off after failures.

#[tokio::test(start_paused = true)]
async fn failed_refreshes_back_off_to_30s_and_reset_after_a_success() {
    let a = Arc::new(Fake::new("a").answering(answer(&[bare("10.0.0.1")]).with_ttl(secs(1))));
    let cache = cache_of(&[&a], Settings::default().with_idle_timeout(secs(3600)));
    // Two entries: the first to fail becomes the source's prober, which retries at
    // least every 4 s (the next test); the other backs off.
    cache.resolve("prober").await.unwrap();
    run_for(ms(500)).await;
    cache.resolve("svc").await.unwrap();
    // Fails from the first refreshes (at 1 s and 1.5 s) on.
    a.fail();
    run_for(secs(100)).await; // t = 100.5 s
    let times = a.call_times_for("svc");
    assert_eq!(times, [0, 1, 2, 4, 8, 16, 32, 62, 92].map(|s| secs(s) + ms(500)));
    // After the first failure: 1 s, doubling, capped at REFRESH_BACKOFF's 30 s.
    assert_eq!(crate::REFRESH_BACKOFF, (secs(1), secs(30)));
    assert_eq!(gaps(&times[1..]), [1, 2, 4, 8, 16, 30, 30].map(secs));
    // The prober: the same back-off, capped at PROBE_PERIOD.
    let probes = a.call_times_for("prober");
    assert_eq!(probes[..6], [0, 1, 2, 4, 8, 12].map(secs));
    assert!(gaps(&probes[4..]).iter().all(|gap| *gap == secs(4)), "{probes:?}");

    // The source recovers; the prober's retry at 104 s succeeds and wakes svc at
    // once (not at its own retry, 122.5 s); then the TTL (1 s) applies.
    a.answer(answer(&[bare("10.0.0.1")]).with_ttl(secs(1)));
    run_for(ms(3_750)).await; // t = 104.25 s
    assert_eq!(a.call_times_for("svc").last(), Some(&secs(104)));
    // It fails again: the back-off starts over at 1 s.
    a.fail();
    run_for(secs(8)).await; // t = 112.25 s
    assert_eq!(a.call_times_for("svc")[9..], [104, 105, 106, 108, 112].map(secs));
}

#[tokio::test(start_paused = true)]
async fn every_entry_follows_a_returning_source_within_the_probe_period() {
    let a = Arc::new(Fake::new("a").answering(answer(&[bare("10.0.0.1")]).with_ttl(secs(1))));
    let cache = cache_of(&[&a], Settings::default().with_idle_timeout(secs(3600)));
    let services = ["s1", "s2", "s3", "s4"];
    let mut watches = Vec::new();
    for service in services {
        cache.resolve(service).await.unwrap();
        watches.push(cache.watch(service).await.unwrap());
        run_for(ms(100)).await;
    }
    a.fail(); // t = 0.4 s
    // Every back-off reaches 30 s: the entries retry at 1, 2, 4, 8, 16, 32, 62 and 92 s
    // (plus 0.1 s per entry), the prober every 4 s from 8 s on.
    run_for(secs(92)).await; // t = 92.4 s
    // While it failed: each entry's own back-off, plus one probe per 4 s at most.
    assert!(a.calls() <= 4 * 9 + 92 / 4 + 1, "{} calls", a.calls());
    // Back, right after the entries' last retries: alone, they would look again at
    // 122 s, ~30 s from now.
    a.answer(answer(&[bare("10.0.0.2")]).with_ttl(secs(1)));
    let back = Instant::now();
    for (service, watch) in services.iter().zip(&mut watches) {
        let changed = timeout(secs(60), watch.changed()).await.expect("no change");
        assert_eq!(changed, Some(set("a", &[bare("10.0.0.2")])), "{service}");
        assert!(
            back.elapsed() <= secs(4),
            "{service} followed after {:?}",
            back.elapsed()
        );
    }
}

// Rule 4: the last good answer stands while sources fail.

#[tokio::test(start_paused = true)]
async fn a_failing_source_leaves_its_last_good_answer_in_place() {
    let a = Arc::new(Fake::new("a").answering(answer(&[bare("10.0.0.1")]).with_ttl(secs(1))));
    let cache = cache_of(&[&a], Settings::default());
    let good = cache.resolve("svc").await.unwrap();
    let mut watch = cache.watch("svc").await.unwrap();
    a.fail();
    // Nothing is published while it fails...
    assert!(timeout(secs(20), watch.changed()).await.is_err());
    // ...though it was asked again (at 1, 2, 4 and 8 s, then every 4 s: the only
    // entry is the source's prober) ...
    assert_eq!(a.call_times(), [0, 1, 2, 4, 8, 12, 16].map(secs));
    // ...and resolves keep getting the last good set.
    assert_eq!(cache.resolve("svc").await.unwrap(), good);
    assert_eq!(watch.current(), good);
}

#[tokio::test(start_paused = true)]
async fn a_later_source_does_not_replace_the_last_good_answer_of_a_failing_earlier_one() {
    let a = Arc::new(Fake::new("a").answering(answer(&[bare("10.0.0.1")]).with_ttl(secs(1))));
    // Stands in for pass-through: always has an answer.
    let pass = Arc::new(Fake::new("pass-through").answering(answer(&[bare("svc")])));
    let cache = cache_of(&[&a, &pass], Settings::default());
    let good = cache.resolve("svc").await.unwrap();
    assert_eq!(good, set("a", &[bare("10.0.0.1")]));
    assert_eq!(pass.calls(), 0);
    let mut watch = cache.watch("svc").await.unwrap();
    a.fail();
    assert!(
        timeout(secs(20), watch.changed()).await.is_err(),
        "a's set was replaced"
    );
    // a was asked again on each refresh (1, 2, 4, 8, then every 4 s as the prober),
    // pass-through never: its answer could not be used while a, ahead of it, fails...
    assert_eq!(a.call_times(), [0, 1, 2, 4, 8, 12, 16].map(secs));
    assert_eq!(pass.calls(), 0);
    // ...so a's last good set stands, and says why it may be stale.
    let served = cache.resolve("svc").await.unwrap();
    assert_eq!(served, good);
    assert_eq!(served.failures(), [down("a")]);
    // Once a answers again, its new set is published.
    a.answer(answer(&[bare("10.0.0.2")]).with_ttl(secs(1)));
    let changed = timeout(secs(60), watch.changed()).await.expect("no change");
    assert_eq!(changed, Some(set("a", &[bare("10.0.0.2")])));
}

// Rule 5: idle expiry.

#[tokio::test(start_paused = true)]
async fn an_unused_entry_is_dropped_after_the_idle_timeout() {
    let a = Arc::new(Fake::new("a").answering(answer(&[bare("10.0.0.1")]).with_ttl(secs(1))));
    let cache = cache_of(&[&a], Settings::default().with_idle_timeout(secs(10)));
    cache.resolve("svc").await.unwrap();
    run_for(ms(9_500)).await;
    assert_eq!(cache.len(), 1);
    run_for(secs(1)).await; // t = 10.5 s
    // Dropped at 10 s, when its refresh found it idle: refreshed until then only.
    assert_eq!(cache.len(), 0);
    assert_eq!(a.call_times(), (0..10).map(secs).collect::<Vec<_>>());
    run_for(secs(60)).await;
    assert_eq!(a.calls(), 10, "the source is still called");
    // The next resolve starts over.
    cache.resolve("svc").await.unwrap();
    assert_eq!(a.calls(), 11);
    assert_eq!(cache.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_held_watch_keeps_an_entry_alive() {
    let a = Arc::new(Fake::new("a").answering(answer(&[bare("10.0.0.1")]).with_ttl(secs(1))));
    let cache = cache_of(&[&a], Settings::default().with_idle_timeout(secs(10)));
    let watch = cache.watch("svc").await.unwrap();
    run_for(ms(30_500)).await;
    assert_eq!(cache.len(), 1);
    assert_eq!(a.calls(), 31);
    // Let go of it: the entry idles out at its next refresh.
    drop(watch);
    run_for(secs(1)).await;
    assert_eq!(cache.len(), 0);
    assert_eq!(a.calls(), 31);
}

// Rule 6: long-polls.

#[tokio::test(start_paused = true)]
async fn a_versioned_answer_is_long_polled_and_a_pushed_change_is_published_at_once() {
    let start = Instant::now();
    let a = Arc::new(
        Fake::new("a")
            .answering(answer(&[bare("10.0.0.1")]).with_version("v1"))
            .watching(WatchMode::Hold),
    );
    let cache = cache_of(&[&a], Settings::default().with_refresh_period(secs(60)));
    let mut watch = cache.watch("svc").await.unwrap();
    run_for(secs(10)).await;
    // Watching since the first answer, for that version, until the next refresh is due;
    // no sleep and no second resolve.
    let first = WatchCall {
        at: secs(0),
        version: "v1".into(),
        wait: secs(60),
    };
    assert_eq!(a.watch_calls(), std::slice::from_ref(&first));
    assert_eq!(a.calls(), 1);
    // A change pushed at 10 s reaches the watcher at 10 s.
    a.push(answer(&[bare("10.0.0.2")]).with_version("v2"));
    let changed = timeout(secs(1), watch.changed())
        .await
        .expect("not published at once");
    assert_eq!(changed, Some(set("a", &[bare("10.0.0.2")])));
    assert_eq!(start.elapsed(), secs(10));
    // The long-poll goes on from the new version, until the same refresh time.
    run_for(ms(1)).await;
    let second = WatchCall {
        at: secs(10),
        version: "v2".into(),
        wait: secs(50),
    };
    assert_eq!(a.watch_calls(), [first, second]);
    assert_eq!(a.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_quiet_long_poll_ends_in_a_chain_refresh() {
    let a = Arc::new(
        Fake::new("a")
            .answering(answer(&[bare("10.0.0.1")]).with_version("v1"))
            .watching(WatchMode::Hold),
    );
    let settings = Settings::default()
        .with_refresh_period(secs(20))
        .with_idle_timeout(secs(3600));
    let cache = cache_of(&[&a], settings);
    cache.resolve("svc").await.unwrap();
    run_for(secs(45)).await;
    // Each long-poll waits out the refresh period, says nothing changed, and the chain
    // is asked again...
    assert_eq!(a.call_times(), [0, 20, 40].map(secs));
    // ...whose answer is long-polled again.
    let watches: Vec<_> = a.watch_calls().iter().map(|w| (w.at, w.wait)).collect();
    assert_eq!(watches, [0, 20, 40].map(|t| (secs(t), secs(20))));
}

#[tokio::test(start_paused = true)]
async fn a_source_that_cannot_watch_is_polled_on_the_ttl() {
    let a = Arc::new(
        Fake::new("a")
            .answering(answer(&[bare("10.0.0.1")]).with_version("v1").with_ttl(secs(5)))
            .watching(WatchMode::Unsupported),
    );
    let cache = cache_of(&[&a], Settings::default());
    cache.resolve("svc").await.unwrap();
    // Let the refresh task run without time moving: one long-poll, answered
    // `unsupported`, then the chain is asked again at once (no back-off)...
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(a.watch_calls().len(), 1);
    assert_eq!(a.call_times(), [0, 0].map(secs));
    // ...and from then on polled on the TTL, never long-polled again.
    run_for(secs(17)).await;
    assert_eq!(a.watch_calls().len(), 1);
    assert_eq!(a.call_times(), [0, 0, 5, 10, 15].map(secs));
}

#[tokio::test(start_paused = true)]
async fn a_watch_that_always_returns_at_once_is_paced() {
    let a = Arc::new(
        Fake::new("a")
            .answering(answer(&[bare("10.0.0.1")]).with_version("v0"))
            .watching(WatchMode::Immediate),
    );
    let cache = cache_of(&[&a], Settings::default().with_refresh_period(secs(60)));
    cache.resolve("svc").await.unwrap();
    run_for(secs(2)).await;
    let watches = a.watch_calls();
    // A burst of LONG_POLL_BURST + 1 = 11 calls goes straight through...
    let at_once = watches.iter().filter(|w| w.at == Duration::ZERO).count();
    assert_eq!(at_once, 11);
    // ...then one per LONG_POLL_GAP (100 ms): at most 11 + 20 over 2 s.
    assert!(
        (29..=31).contains(&watches.len()),
        "{} watch calls in 2 s",
        watches.len()
    );
    assert!(
        gaps(&watches.iter().map(|w| w.at).collect::<Vec<_>>()[10..])
            .iter()
            .all(|g| *g == ms(100))
    );
    // Each change was watched on from its own version.
    assert_eq!(watches[1].version, "w1");
    assert_eq!(a.calls(), 1);
}

// Not only pushed changes are paced: a long-poll that says "nothing changed" at once
// (a source that ignores `wait`) goes to the chain and back to the long-poll, and
// without pacing would hammer the source (and, on the paused clock, never let time
// move again).
#[tokio::test(start_paused = true)]
async fn a_watch_that_always_returns_nothing_at_once_is_paced() {
    let a = Arc::new(
        Fake::new("a")
            .answering(answer(&[bare("10.0.0.1")]).with_version("v1"))
            .watching(WatchMode::QuietAtOnce),
    );
    let cache = cache_of(&[&a], Settings::default().with_refresh_period(secs(60)));
    cache.resolve("svc").await.unwrap();
    // Let the refresh task run for a while without time moving (run_for would never
    // return: the paused clock only advances when every task is idle).
    for _ in 0..1_000 {
        tokio::task::yield_now().await;
    }
    let (watches, resolves) = (a.watch_calls().len(), a.calls());
    assert!(
        watches <= 11 && resolves <= 12,
        "{watches} watch calls and {resolves} resolves without time moving"
    );
}

// Failure semantics (issue 16): a failing source never freezes the answer of the one
// serving, and a push source that went empty keeps pushing.

#[tokio::test(start_paused = true)]
async fn a_failing_source_ahead_never_freezes_the_served_answer() {
    // a had nothing for the query; b (the config provider, say) answers.
    let a = Arc::new(Fake::new("a"));
    let b = Arc::new(Fake::new("b").answering(answer(&[bare("10.0.0.1")]).with_ttl(secs(1))));
    let cache = cache_of(&[&a, &b], Settings::default());
    assert_eq!(cache.resolve("svc").await.unwrap(), set("b", &[bare("10.0.0.1")]));
    let mut watch = cache.watch("svc").await.unwrap();
    // a starts failing (loops, is quarantined) and b's answer changes: b's fresh answer
    // is published at its next refresh, 1 s later, not frozen behind a.
    a.fail();
    b.answer(answer(&[bare("10.0.0.2")]).with_ttl(secs(1)));
    let started = Instant::now();
    let changed = timeout(secs(2), watch.changed())
        .await
        .expect("b's fresh answer was held back by a's failure");
    assert_eq!(changed, Some(set("b", &[bare("10.0.0.2")])));
    assert!(started.elapsed() <= secs(1), "{:?}", started.elapsed());
    // ...and says that a, ahead of it, is failing.
    assert_eq!(cache.resolve("svc").await.unwrap().failures(), [down("a")]);
    // Once a answers cleanly again, the record of its failure goes.
    a.answer(answer(&[]));
    run_for(secs(30)).await;
    assert!(cache.resolve("svc").await.unwrap().failures().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_push_source_that_went_empty_keeps_pushing_while_a_later_one_stands_in() {
    // a (etcd) serves its one replica, and can push changes.
    let a = Arc::new(
        Fake::new("a")
            .answering(answer(&[bare("10.0.0.1")]).with_version("v1"))
            .watching(WatchMode::Hold),
    );
    let pass = Arc::new(Fake::new("pass-through").answering(answer(&[bare("svc")])));
    let cache = cache_of(&[&a, &pass], Settings::default().with_refresh_period(secs(60)));
    assert_eq!(cache.resolve("svc").await.unwrap(), set("a", &[bare("10.0.0.1")]));
    let mut watch = cache.watch("svc").await.unwrap();
    // The replica goes (a rolling restart): a has nothing, pass-through stands in...
    a.answer(answer(&[]).with_version("v2"));
    a.push(answer(&[]).with_version("v2"));
    let gone = timeout(ms(10), watch.changed())
        .await
        .expect("the deletion was not followed");
    assert_eq!(gone, Some(set("pass-through", &[bare("svc")])));
    run_for(ms(300)).await;
    // ...and a is still long-polled, from its new version...
    assert_eq!(a.watch_calls().last().map(|c| c.version.as_str()), Some("v2"));
    // ...so the new replica, registered 0.3 s later, wins at once.
    a.push(answer(&[bare("10.0.0.9")]).with_version("v3"));
    let changed = timeout(ms(10), watch.changed())
        .await
        .expect("a's new instance waited for the refresh period");
    assert_eq!(changed, Some(set("a", &[bare("10.0.0.9")])));
}

#[tokio::test(start_paused = true)]
async fn a_push_source_that_never_had_the_service_is_not_long_polled() {
    // a (etcd) has nothing for this query and never had: what pass-through answers
    // is refreshed on its own TTL, and a is not held in a long-poll for it.
    let a = Arc::new(
        Fake::new("a")
            .answering(answer(&[]).with_version("v1"))
            .watching(WatchMode::Hold),
    );
    let pass = Arc::new(Fake::new("pass-through").answering(answer(&[bare("svc")]).with_ttl(secs(5))));
    let cache = cache_of(&[&a, &pass], Settings::default().with_refresh_period(secs(60)));
    assert_eq!(
        cache.resolve("svc").await.unwrap(),
        set("pass-through", &[bare("svc")])
    );
    run_for(ms(10_500)).await;
    assert!(a.watch_calls().is_empty(), "{:?}", a.watch_calls());
    assert_eq!(pass.call_times(), [0, 5, 10].map(secs));
}

#[tokio::test(start_paused = true)]
async fn a_parsed_query_found_by_its_text_keeps_its_filters_and_the_allowed_schemes() {
    let a = Arc::new(Fake::new("a").answering(answer(&[
        super::fake::ep("https", "10.0.0.1").with_metadata("zone", "eu"),
        super::fake::ep("http", "10.0.0.2").with_metadata("zone", "us"),
    ])));
    let cache = cache_of(&[&a], Settings::default());
    let plain = crate::Query::parse("svc").unwrap();
    assert_eq!(cache.resolve_query(&plain).await.unwrap().len(), 2);
    // Again: found under its text now, the same set, no call.
    assert_eq!(cache.resolve_query(&plain).await.unwrap().len(), 2);
    assert_eq!(a.calls(), 1);
    // The same text with a filter is another entry, never the indexed one.
    let filtered = plain.clone().with_filter("zone", "eu");
    let eu = cache.resolve_query(&filtered).await.unwrap();
    assert_eq!(eu.iter().map(|e| e.host()).collect::<Vec<_>>(), ["10.0.0.1"]);
    assert_eq!(cache.state(&filtered).unwrap().set.len(), 1);
    assert_eq!(cache.state(&plain).unwrap().set.len(), 2);
    // Allowed schemes that leave out http: the text means https only now.
    cache.set_settings(Settings::default().with_allowed_schemes(vec!["https".into()]));
    let https = cache.resolve_query(&plain).await.unwrap();
    assert_eq!(https.iter().map(|e| e.host()).collect::<Vec<_>>(), ["10.0.0.1"]);
}

/// Real time, two runtimes: the cache's, and a caller's that ends after one resolve.
#[test]
fn an_entry_first_resolved_from_a_runtime_that_ends_keeps_refreshing() {
    // A current-thread runtime runs its tasks only inside `block_on`: the wait for
    // the change below is when the refresh loop may run.
    let home = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let a = Arc::new(Fake::new("a").answering(answer(&[bare("10.0.0.1")]).with_ttl(Duration::ZERO)));
    let cache = home.block_on(async { cache_of(&[&a], Settings::default()) });

    // Synchronous code resolving on a runtime of its own, gone right after.
    let caller = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let first = caller.block_on(cache.resolve("svc")).unwrap();
    assert_eq!(first.endpoints(), [bare("10.0.0.1")]);
    drop(caller);

    // The refresh (once a second, for a zero TTL) goes on: a change is served.
    a.answer(answer(&[bare("10.0.0.2")]).with_ttl(Duration::ZERO));
    home.block_on(async {
        let mut watch = cache.watch("svc").await.unwrap();
        let changed = timeout(secs(5), async {
            loop {
                if watch.current().endpoints() == [bare("10.0.0.2")] {
                    return;
                }
                if watch.changed().await.is_none() {
                    panic!("the watch ended");
                }
            }
        })
        .await;
        assert!(changed.is_ok(), "the entry froze: {:?}", watch.current());
    });
}

#[tokio::test(start_paused = true)]
async fn past_the_long_poll_cap_unwatched_queries_are_refreshed_on_the_period() {
    let a = Arc::new(
        Fake::new("a")
            .answering(answer(&[bare("10.0.0.1")]).with_version("v1"))
            .watching(WatchMode::Hold),
    );
    let cache = cache_of(
        &[&a],
        Settings::default()
            .with_refresh_period(secs(60))
            .with_max_long_polls(2),
    );
    for service in ["svc-a", "svc-b", "svc-c"] {
        cache.resolve(service).await.unwrap();
    }
    // Watched: followed whatever the cap.
    let _watch = cache.watch("svc-d").await.unwrap();
    run_for(secs(10)).await;
    // Three long-polls: two of the three resolved queries, and the watched one.
    assert_eq!(a.watch_calls().len(), 3, "{:?}", a.watch_calls());
    assert_eq!(a.calls(), 4);
    run_for(secs(51)).await;
    // At 60 s the resolved query without a turn asked the chain (it slept to the
    // period), and so did the long-poll that ended on it. (The fake holds one watch
    // call at a time: the others only started waiting when it let go.)
    assert_eq!(a.calls(), 6, "{:?}", a.watch_calls());
}

// The text index is copied on write: one copy per new text would cost O(n²) while
// thousands of services are first resolved. New texts go in by batches.
#[tokio::test(start_paused = true)]
async fn many_new_texts_copy_the_text_index_in_batches_and_all_get_in() {
    let a = Arc::new(Fake::new("a").answering(answer(&[bare("10.0.0.1")])));
    let cache = cache_of(&[&a], Settings::default());
    let texts: Vec<String> = (0..4000).map(|i| format!("svc{i}")).collect();
    for text in &texts {
        assert_eq!(cache.resolve(text).await.unwrap(), set("a", &[bare("10.0.0.1")]));
    }
    // The first 256 one by one, then one copy whenever the waiting texts are an
    // eighth of the index: ~24 more up to 4 000 (4 000 copies without batching).
    let (indexed, copies) = cache.text_index();
    assert!(copies <= 300, "{copies} copies of the index for 4 000 texts");
    assert!(indexed >= 3000, "{indexed} texts indexed");
    // A waiting text is answered from its cache entry meanwhile (the source was asked
    // once per text), and its own next resolve after the wait copies it in.
    run_for(ms(100)).await;
    for text in &texts {
        assert_eq!(cache.resolve(text).await.unwrap(), set("a", &[bare("10.0.0.1")]));
    }
    assert_eq!(a.calls(), 4000);
    assert_eq!(cache.text_index().0, 4000);
}

// ...and leave it by batches: thousands of entries idling out together must not copy
// the index once each, and none is served once it has left, swept out or not yet.
#[tokio::test(start_paused = true)]
async fn many_entries_idling_out_leave_the_text_index_in_batches() {
    let a = Arc::new(Fake::new("a").answering(answer(&[bare("10.0.0.1")]).with_ttl(secs(1))));
    let cache = cache_of(&[&a], Settings::default().with_idle_timeout(secs(10)));
    let texts: Vec<String> = (0..4000).map(|i| format!("svc{i}")).collect();
    for text in &texts {
        cache.resolve(text).await.unwrap();
    }
    run_for(ms(100)).await;
    for text in &texts {
        cache.resolve(text).await.unwrap();
    }
    let (indexed, before) = cache.text_index();
    assert_eq!(indexed, 4000);
    // The first 1 000 idle out together (at their refresh after 10 s unused); the
    // others stay in use.
    let (idle, used) = texts.split_at(1000);
    for _ in 0..6 {
        run_for(secs(2)).await;
        for text in used {
            cache.resolve(text).await.unwrap();
        }
    }
    assert_eq!(cache.len(), 3000);
    let (indexed, after) = cache.text_index();
    // Swept out by eighths of the index: a couple of copies, 1 000 without batching.
    assert!(
        after - before <= 5,
        "{} copies of the index for 1 000 leaving",
        after - before
    );
    // Some are still in the index, waiting for the next sweep...
    assert!(indexed > 3000, "{indexed} texts indexed");
    // ...and are never served: every idled-out text's next resolve asks the source.
    // Last gone first: those are the ones not swept yet (new texts going in would
    // sweep them).
    let calls = a.calls();
    for text in idle.iter().rev() {
        cache.resolve(text).await.unwrap();
    }
    assert_eq!(a.calls(), calls + 1000);
}
