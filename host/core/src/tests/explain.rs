//! Explanations: every provider's step, the imports it made, the endpoints dropped
//! and why, and the cache entry's state.

use std::sync::Arc;

use super::fake::{Fake, answer, bare, cache_of, down, ep, ms, secs, set};
use crate::{
    DropReason, Endpoint, Error, Import, ImportKind, ProviderError, ProviderErrorKind, Query, Settings,
    StepOutcome,
};

fn tagged(scheme: &str, host: &str, zone: &str) -> Endpoint {
    ep(scheme, host).with_metadata("zone", zone)
}

#[tokio::test(start_paused = true)]
async fn every_provider_is_reported_with_its_outcome_time_imports_and_dropped_endpoints() {
    let empty = Arc::new(Fake::new("empty").slow(ms(5)));
    let dns = Arc::new(Fake::new("dns").slow(ms(20)).answering(answer(&[
        tagged("https", "10.0.0.1", "eu"),
        tagged("https", "10.0.0.2", "us"),
        tagged("http", "10.0.0.3", "eu"),
        tagged("grpc", "10.0.0.4", "eu"),
        tagged("ftp", "10.0.0.5", "eu"),
    ])));
    let later = Arc::new(Fake::new("later").answering(answer(&[bare("10.9.9.9")])));
    let settings =
        Settings::default().with_allowed_schemes(vec!["https".into(), "http".into(), "ftp".into()]);
    let cache = cache_of(&[&empty, &dns, &later], settings);
    let query = Query::parse("https+http+grpc://svc")
        .unwrap()
        .with_filter("zone", "eu");

    let explained = cache.explain(&query).await;

    // grpc is asked for but not allowed: the providers are asked for https, http.
    assert_eq!(explained.schemes, ["https", "http"]);
    assert_eq!(explained.allowed_schemes, ["https", "http", "ftp"]);
    assert!(explained.cache.is_none(), "nothing was resolved before");
    let steps: Vec<_> = explained
        .steps
        .iter()
        .map(|s| (s.provider.as_str(), s.outcome.clone(), s.elapsed))
        .collect();
    assert_eq!(
        steps,
        [
            ("empty", StepOutcome::Declined, ms(5)),
            (
                "dns",
                StepOutcome::Answered {
                    endpoints: 5,
                    kept: 1
                },
                ms(20)
            ),
            (
                "later",
                StepOutcome::Skipped {
                    answered_by: "dns".into()
                },
                ms(0)
            ),
        ]
    );
    assert_eq!(later.calls(), 0, "a skipped provider is not called");
    assert_eq!(
        explained.steps[1].imports,
        [Import::new(
            ImportKind::Dns,
            "svc.dns",
            "SRV",
            "5 records",
            ms(20)
        )]
    );
    assert!(explained.steps[2].imports.is_empty());
    let dropped: Vec<_> = explained
        .dropped
        .iter()
        .map(|d| (d.provider.as_str(), d.endpoint.host(), d.reason.clone()))
        .collect();
    assert_eq!(
        dropped,
        [
            (
                "dns",
                "10.0.0.2",
                DropReason::Metadata {
                    key: "zone".into(),
                    value: "eu".into()
                }
            ),
            (
                "dns",
                "10.0.0.3",
                DropReason::SchemePreference {
                    scheme: "http".into(),
                    preferred: "https".into()
                }
            ),
            (
                "dns",
                "10.0.0.4",
                DropReason::SchemeNotAllowed {
                    scheme: "grpc".into()
                }
            ),
            (
                "dns",
                "10.0.0.5",
                DropReason::SchemeNotAsked { scheme: "ftp".into() }
            ),
        ]
    );
    let Ok(answered) = &explained.result else {
        panic!("no answer: {:?}", explained.result)
    };
    assert_eq!(*answered, set("dns", &[tagged("https", "10.0.0.1", "eu")]));
    // Explaining fills no cache.
    assert!(cache.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_failure_stops_the_walk_and_the_rest_is_reported_not_asked() {
    let broken = Arc::new(Fake::new("broken").failing());
    let later = Arc::new(Fake::new("later").answering(answer(&[bare("10.9.9.9")])));
    let cache = cache_of(&[&broken, &later], Settings::default());
    let explained = cache.explain(&Query::parse("svc").unwrap()).await;
    let outcomes: Vec<_> = explained.steps.iter().map(|s| s.outcome.clone()).collect();
    assert_eq!(
        outcomes,
        [
            StepOutcome::Failed(down("broken")),
            StepOutcome::NotAsked {
                failed: "broken".into()
            }
        ]
    );
    assert_eq!(
        (outcomes[0].label(), outcomes[1].label()),
        ("failed", "not_asked")
    );
    assert_eq!(later.calls(), 0);
    assert!(matches!(
        &explained.result,
        Err(Error::NoEndpoints { failures, .. }) if *failures == [down("broken")]
    ));
    let quarantined = StepOutcome::Failed(ProviderError::new(
        "p",
        ProviderErrorKind::Quarantined("3 faults in a row".into()),
    ));
    assert_eq!(quarantined.label(), "quarantined");
}

#[tokio::test(start_paused = true)]
async fn a_query_whose_schemes_are_not_allowed_is_explained_without_asking_anyone() {
    let a = Arc::new(Fake::new("a").answering(answer(&[ep("http", "10.0.0.1")])));
    let cache = cache_of(
        &[&a],
        Settings::default().with_allowed_schemes(vec!["https".into()]),
    );
    let explained = cache.explain(&Query::parse("http://svc").unwrap()).await;
    assert!(matches!(explained.result, Err(Error::SchemeNotAllowed { .. })));
    assert!(explained.steps.is_empty());
    assert_eq!(a.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_cache_entry_says_how_fresh_it_is_and_which_failure_kept_the_last_good_answer() {
    let a = Arc::new(Fake::new("a").answering(answer(&[bare("10.0.0.1")]).with_ttl(secs(30))));
    let b = Arc::new(Fake::new("b").answering(answer(&[bare("10.0.0.2")])));
    let cache = cache_of(&[&a, &b], Settings::default());
    let query = Query::parse("svc").unwrap();
    cache.resolve_query(&query).await.unwrap();
    // Slept, not advanced: the paused clock moves once every task is idle, so the
    // refresh task starts its 30 s wait at 0 s.
    tokio::time::sleep(secs(10)).await;

    let explained = cache.explain(&query).await;
    let Some(state) = &explained.cache else {
        panic!("the resolved query has no cache entry")
    };
    assert_eq!(state.set, set("a", &[bare("10.0.0.1")]));
    assert_eq!((state.age, state.refresh_in), (secs(10), Some(secs(20))));
    assert!(!state.is_stale() && state.long_poll.is_none());

    // The refresh at 30 s fails: the last good answer stays, stale, naming why. (The
    // paused clock stops at 30 s until the refresh task is idle again.)
    a.fail();
    tokio::time::sleep(secs(21)).await;
    assert_eq!(
        a.calls(),
        3,
        "the first resolve, the explanation, the refresh at 30 s"
    );
    let explained = cache.explain(&query).await;
    let Some(state) = &explained.cache else {
        panic!("the entry went away")
    };
    assert_eq!(state.set.endpoints(), [bare("10.0.0.1")]);
    assert_eq!(state.set.failures(), [down("a")]);
    assert_eq!(state.stale_for, Some(secs(1)));
    assert_eq!(state.age, secs(31));
    assert!(state.refresh_in.is_some());
    // The walk asks as a refresh would: past a's failure, b may not stand in.
    let outcomes: Vec<_> = explained.steps.iter().map(|s| s.outcome.label()).collect();
    assert_eq!(outcomes, ["failed", "not_asked"]);
    assert_eq!(b.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_cache_lists_every_answered_query_as_written_with_its_state() {
    let a = Arc::new(Fake::new("a").answering(answer(&[bare("10.0.0.1")]).with_ttl(secs(30))));
    let cache = cache_of(&[&a], Settings::default());
    assert!(cache.states().is_empty());
    for text in ["svc", "https://other/api", "https://other"] {
        cache.resolve_query(&Query::parse(text).unwrap()).await.unwrap();
    }
    tokio::time::sleep(secs(4)).await;

    let states = cache.states();
    let listed: Vec<_> = states
        .iter()
        .map(|(query, state)| (query.as_str(), state.set.endpoints().len(), state.age))
        .collect();
    // A path is not the entry's business: `https://other` shares the entry
    // `https://other/api` made, listed once as first written; ordered by text.
    assert_eq!(listed, [("https://other/api", 1, secs(4)), ("svc", 1, secs(4))]);
    assert_eq!(states[1].1.set.provider(), Some("a"));
    assert_eq!(states[1].1.refresh_in, Some(secs(26)));
}
