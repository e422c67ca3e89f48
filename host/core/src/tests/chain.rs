//! The chain: order, "first with endpoints wins", failures; scheme selection.

use std::sync::Arc;

use super::fake::{Fake, answer, bare, cache_of, down, ep, set};
use crate::{Chain, ChainAnswer, Error, ProviderError, Settings, Source, SourceQuery};

fn chain(sources: &[&Arc<Fake>]) -> Chain {
    Chain::new(sources.iter().map(|s| Arc::clone(s) as Arc<dyn Source>).collect())
}

async fn ask(chain: &Chain) -> Result<ChainAnswer, Vec<ProviderError>> {
    chain.resolve(&SourceQuery::new("svc"), &[], None).await
}

// Rule 7: chain order.

#[tokio::test(start_paused = true)]
async fn the_first_source_with_endpoints_answers_and_later_ones_are_not_asked() {
    let a = Arc::new(Fake::new("a").answering(answer(&[bare("10.0.0.1")])));
    let b = Arc::new(Fake::new("b").answering(answer(&[bare("10.0.0.2")])));
    let Ok(won) = ask(&chain(&[&a, &b])).await else {
        panic!("no answer")
    };
    assert_eq!(won.set, set("a", &[bare("10.0.0.1")]));
    assert_eq!(&**won.source.name(), "a");
    assert!(won.failures.is_empty());
    assert_eq!((a.calls(), b.calls()), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn an_empty_answer_passes_to_the_next_source() {
    let a = Arc::new(Fake::new("a")); // not-found
    let b = Arc::new(Fake::new("b").answering(answer(&[bare("10.0.0.2")])));
    let c = Arc::new(Fake::new("c").answering(answer(&[bare("10.0.0.3")])));
    let Ok(won) = ask(&chain(&[&a, &b, &c])).await else {
        panic!("no answer")
    };
    assert_eq!(won.set, set("b", &[bare("10.0.0.2")]));
    // "Nothing here" is no failure.
    assert!(won.failures.is_empty());
    assert_eq!((a.calls(), b.calls(), c.calls()), (1, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn a_failure_is_never_papered_over_by_a_later_source() {
    let a = Arc::new(Fake::new("a").failing());
    let b = Arc::new(Fake::new("b"));
    let c = Arc::new(Fake::new("c").answering(answer(&[bare("10.0.0.3")])));
    // With nothing served yet, the walk stops at the failure: c is not even asked.
    let Err(failures) = ask(&chain(&[&a, &b, &c])).await else {
        panic!("a later source stood in for a failed one")
    };
    assert_eq!(failures, [down("a")]);
    assert_eq!((a.calls(), b.calls(), c.calls()), (1, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn past_a_failure_only_the_served_source_or_one_ahead_of_it_may_answer() {
    let a = Arc::new(Fake::new("a").failing());
    let b = Arc::new(Fake::new("b"));
    let c = Arc::new(Fake::new("c").answering(answer(&[bare("10.0.0.3")])));
    let d = Arc::new(Fake::new("d").answering(answer(&[bare("10.0.0.4")])));
    let chain = chain(&[&a, &b, &c, &d]);
    let query = SourceQuery::new("svc");
    // c's answer is being served: its fresh answer is taken, a's failure recorded.
    let Ok(won) = chain.resolve(&query, &[], Some("c")).await else {
        panic!("the served source's fresh answer was refused")
    };
    assert_eq!(won.set, set("c", &[bare("10.0.0.3")]));
    assert_eq!(won.failures, [down("a")]);
    assert_eq!(won.set.failures(), [down("a")]);
    // b's answer is being served and b has nothing now: c and d, after the failure,
    // may not stand in.
    let Err(failures) = chain.resolve(&query, &[], Some("b")).await else {
        panic!("a source past the served one stood in after a failure")
    };
    assert_eq!(failures, [down("a")]);
    assert_eq!((c.calls(), d.calls()), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn a_first_resolve_fails_with_the_failed_source_named() {
    let a = Arc::new(Fake::new("a"));
    let b = Arc::new(Fake::new("b").failing());
    let c = Arc::new(Fake::new("pass-through").answering(answer(&[bare("svc")])));
    let cache = cache_of(&[&a, &b, &c], Settings::default());
    match cache.resolve("svc").await {
        Err(e @ Error::NoEndpoints { .. }) => {
            let Error::NoEndpoints { service, failures } = &e else {
                unreachable!()
            };
            assert_eq!(service, "svc");
            assert_eq!(failures, &[down("b")]);
            assert_eq!(
                e.to_string(),
                "no endpoints for service 'svc'; provider 'b': upstream unavailable: upstream down"
            );
        }
        other => panic!("expected NoEndpoints naming b, got {other:?}"),
    }
    assert_eq!((a.calls(), b.calls(), c.calls()), (1, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn no_endpoints_lists_no_failures_when_every_source_answered_cleanly() {
    let a = Arc::new(Fake::new("a"));
    let b = Arc::new(Fake::new("b"));
    let cache = cache_of(&[&a, &b], Settings::default());
    match cache.resolve("svc").await {
        Err(Error::NoEndpoints { service, failures }) => {
            assert_eq!(service, "svc");
            assert!(failures.is_empty(), "{failures:?}");
        }
        other => panic!("expected NoEndpoints, got {other:?}"),
    }
    assert_eq!((a.calls(), b.calls()), (1, 1));
}

// Rule 8: scheme selection.

#[tokio::test(start_paused = true)]
async fn the_most_preferred_scheme_present_wins_and_schemes_never_mix() {
    let mixed = [
        ep("http", "a"),
        ep("https", "b"),
        ep("grpc", "c"),
        ep("https", "d"),
    ];
    let s = Arc::new(Fake::new("s").answering(answer(&mixed)));
    let cache = cache_of(&[&s], Settings::default());
    assert_eq!(
        cache.resolve("https+http://svc").await.unwrap(),
        set("s", &[ep("https", "b"), ep("https", "d")])
    );
    assert_eq!(
        cache.resolve("http+https://svc").await.unwrap(),
        set("s", &[ep("http", "a")])
    );
    // The source was told the schemes, most preferred first.
    assert_eq!(s.queries()[0].schemes, ["https", "http"]);
    assert_eq!(s.queries()[1].schemes, ["http", "https"]);
}

#[tokio::test(start_paused = true)]
async fn without_the_preferred_scheme_the_next_one_is_used() {
    let s = Arc::new(Fake::new("s").answering(answer(&[ep("http", "a"), ep("grpc", "c"), ep("http", "b")])));
    let cache = cache_of(&[&s], Settings::default());
    assert_eq!(
        cache.resolve("https+http://svc").await.unwrap(),
        set("s", &[ep("http", "a"), ep("http", "b")])
    );
}

#[tokio::test(start_paused = true)]
async fn a_source_with_no_endpoint_of_an_acceptable_scheme_passes_to_the_next() {
    let a = Arc::new(Fake::new("a").answering(answer(&[ep("grpc", "a")])));
    let b = Arc::new(Fake::new("b").answering(answer(&[ep("http", "b")])));
    let cache = cache_of(&[&a, &b], Settings::default());
    assert_eq!(
        cache.resolve("https+http://svc").await.unwrap(),
        set("b", &[ep("http", "b")])
    );
}

#[tokio::test(start_paused = true)]
async fn allowed_schemes_refuse_a_query_and_narrow_another() {
    let s = Arc::new(Fake::new("s").answering(answer(&[ep("https", "a"), ep("http", "b")])));
    let settings = Settings::default().with_allowed_schemes(vec!["http".into()]);
    let cache = cache_of(&[&s], settings);
    match cache.resolve("https://svc").await {
        Err(Error::SchemeNotAllowed { query, allowed }) => {
            assert_eq!(query, "https://svc");
            assert_eq!(allowed, ["http"]);
        }
        other => panic!("expected SchemeNotAllowed, got {other:?}"),
    }
    // Refused before any source was asked, and not cached.
    assert_eq!(s.calls(), 0);
    assert_eq!(cache.len(), 0);
    // A query naming an allowed scheme among others keeps only the allowed ones.
    assert_eq!(
        cache.resolve("https+http://svc").await.unwrap(),
        set("s", &[ep("http", "b")])
    );
    assert_eq!(s.queries()[0].schemes, ["http"]);
}
