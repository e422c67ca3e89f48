//! The ordered chain of sources: ask each in turn, stop at the first with endpoints of
//! an acceptable scheme. Which sources there are, and in what order, is the caller's
//! business (the `wasd` crate puts pass-through last).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use tokio::time::Instant;

use crate::endpoint::{Endpoint, EndpointSet, filter_by_metadata, select_by_scheme};
use crate::error::ProviderError;
use crate::explain::{DropReason, Dropped, Import, Imports, Step, StepOutcome, Trace};
use crate::source::{Source, SourceQuery};

/// Sources in the order they are asked.
#[derive(Clone, Default)]
pub struct Chain {
    sources: Vec<Arc<dyn Source>>,
}

/// The answer a chain walk settled on.
#[non_exhaustive]
pub struct ChainAnswer {
    /// The endpoints that won, with the failures met before them.
    pub set: EndpointSet,
    /// How long they may be cached.
    pub ttl: Option<Duration>,
    /// Sources ahead of the one that answered that failed. Non-empty only when the
    /// walk was allowed past a failure (see [`Chain::resolve`]).
    pub failures: Vec<ProviderError>,
    /// The source that answered.
    pub source: Arc<dyn Source>,
    /// The version of its answer, when it can push changes.
    pub version: Option<String>,
    /// A source ahead of the one that answered that had nothing but can push a change
    /// (an etcd with no instance right now, tagged with its revision): long-polled, so
    /// that its next instances win at once instead of at the next refresh.
    pub pushing: Option<(Arc<dyn Source>, String)>,
}

impl Chain {
    /// A chain of these sources, asked in this order.
    pub fn new(sources: Vec<Arc<dyn Source>>) -> Chain {
        Chain { sources }
    }

    /// The sources, in order.
    pub fn sources(&self) -> &[Arc<dyn Source>] {
        &self.sources
    }

    /// The source named `name`.
    pub fn by_name(&self, name: &str) -> Option<&Arc<dyn Source>> {
        self.sources.iter().find(|s| &**s.name() == name)
    }

    /// The names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.sources.iter().map(|s| &**s.name())
    }

    /// The source that registers instances: the one named, or else the first that can.
    pub fn registrar(&self, name: Option<&str>) -> Option<Arc<dyn Source>> {
        self.sources
            .iter()
            .find(|s| match name {
                Some(name) => &**s.name() == name,
                None => s.is_registrar(),
            })
            .cloned()
    }

    /// Ask the sources in order; the first with endpoints the query accepts wins.
    ///
    /// A failure is never papered over: past a source that failed, an answer is taken
    /// only from the source named `served` (the one whose answer is being served now)
    /// or one ahead of it, so a refresh can publish a fresh answer from the source that
    /// answered last time while an earlier one is down, but never fall to a later one
    /// (pass-through standing in for etcd). With `served` `None` (a first resolve) the
    /// walk stops at the first failure.
    ///
    /// `Err` carries the failures met; an empty list means every source asked answered
    /// cleanly that it has nothing.
    ///
    /// (Not an `async fn`: that would wrap the walk's future in one more, larger one.)
    pub fn resolve<'a>(
        &'a self,
        query: &'a SourceQuery,
        filters: &'a [(String, String)],
        served: Option<&'a str>,
    ) -> impl Future<Output = Result<ChainAnswer, Vec<ProviderError>>> + Send + 'a {
        self.walk(query, filters, served, None)
    }

    /// [`Chain::resolve`], recording every step in `trace`: each source's outcome, time
    /// and imports (through [`Source::resolve_explained`]), the sources not asked and
    /// why, and the endpoints the query dropped.
    pub async fn explain(
        &self,
        query: &SourceQuery,
        filters: &[(String, String)],
        served: Option<&str>,
        trace: &mut Trace,
    ) -> Result<ChainAnswer, Vec<ProviderError>> {
        self.walk(query, filters, served, Some(trace)).await
    }

    /// The one walk behind [`Chain::resolve`] and [`Chain::explain`], so that an
    /// explanation follows exactly the rules a resolve does.
    async fn walk(
        &self,
        query: &SourceQuery,
        filters: &[(String, String)],
        served: Option<&str>,
        mut trace: Option<&mut Trace>,
    ) -> Result<ChainAnswer, Vec<ProviderError>> {
        // Past a failure, sources up to this position may still answer.
        let limit = served.and_then(|name| self.sources.iter().position(|s| &**s.name() == name));
        let mut failures: Vec<ProviderError> = Vec::new();
        let mut pushing = None;
        for (position, source) in self.sources.iter().enumerate() {
            if !failures.is_empty() && limit.is_none_or(|limit| position > limit) {
                if let Some(trace) = trace {
                    let failed = &failures[0].provider;
                    for rest in &self.sources[position..] {
                        let outcome = StepOutcome::NotAsked {
                            failed: failed.clone(),
                        };
                        trace.steps.push(step(rest, outcome, Duration::ZERO, Vec::new()));
                    }
                }
                break;
            }
            // One call awaited either way (both are boxed by async-trait), so an
            // explanation adds little to the walk's future.
            let journal = trace.is_some().then(|| (Imports::new(), Instant::now()));
            let call = match &journal {
                None => source.resolve(query),
                Some((imports, _)) => source.resolve_explained(query, imports),
            };
            let result = call.await;
            let (imports, elapsed) = journal.map_or((Vec::new(), Duration::ZERO), |(imports, started)| {
                (imports.take(), started.elapsed())
            });
            match result {
                Ok(answer) => {
                    let answered = answer.endpoints.len();
                    let endpoints = match trace.as_deref_mut() {
                        None => select(answer.endpoints, query, filters),
                        Some(trace) => {
                            let provider = source.name();
                            let endpoints =
                                select_with(answer.endpoints, query, filters, |endpoint, reason| {
                                    trace.dropped.push(Dropped {
                                        provider: provider.to_string(),
                                        endpoint,
                                        reason,
                                    });
                                });
                            let outcome = if answered == 0 {
                                StepOutcome::Declined
                            } else {
                                StepOutcome::Answered {
                                    endpoints: answered,
                                    kept: endpoints.len(),
                                }
                            };
                            trace.steps.push(step(source, outcome, elapsed, imports));
                            endpoints
                        }
                    };
                    if !endpoints.is_empty() {
                        // Returned at once, the rest recorded without an await: the
                        // answer is never held across one, which would make every
                        // walk's future (a resolve miss's) larger.
                        if let Some(trace) = trace {
                            for rest in &self.sources[position + 1..] {
                                let outcome = StepOutcome::Skipped {
                                    answered_by: source.name().to_string(),
                                };
                                trace.steps.push(step(rest, outcome, Duration::ZERO, Vec::new()));
                            }
                        }
                        return Ok(ChainAnswer {
                            set: EndpointSet::new(source.name().clone(), endpoints)
                                .with_failures(failures.clone()),
                            ttl: answer.ttl,
                            failures,
                            source: source.clone(),
                            version: answer.version,
                            pushing,
                        });
                    }
                    if pushing.is_none()
                        && let Some(version) = answer.version
                        && source.can_watch()
                    {
                        pushing = Some((source.clone(), version));
                    }
                }
                Err(failure) => {
                    tracing::debug!(service = %query.service, "{failure}");
                    if let Some(trace) = trace.as_deref_mut() {
                        trace.steps.push(step(
                            source,
                            StepOutcome::Failed(failure.clone()),
                            elapsed,
                            imports,
                        ));
                    }
                    failures.push(failure);
                }
            }
        }
        Err(failures)
    }
}

fn step(source: &Arc<dyn Source>, outcome: StepOutcome, elapsed: Duration, imports: Vec<Import>) -> Step {
    Step {
        provider: source.name().to_string(),
        outcome,
        elapsed,
        imports,
    }
}

/// The endpoints of one answer that the query accepts: its metadata filters, then the
/// most preferred scheme present.
pub(crate) fn select(
    endpoints: Vec<Endpoint>,
    query: &SourceQuery,
    filters: &[(String, String)],
) -> Vec<Endpoint> {
    select_with(endpoints, query, filters, |_, _| {})
}

/// [`select`], telling `dropped` each endpoint left out and why.
fn select_with(
    endpoints: Vec<Endpoint>,
    query: &SourceQuery,
    filters: &[(String, String)],
    mut dropped: impl FnMut(Endpoint, DropReason),
) -> Vec<Endpoint> {
    let endpoints = filter_by_metadata(endpoints, filters, &mut dropped);
    select_by_scheme(endpoints, &query.schemes, &mut dropped)
}

/// The chain serving now, and its generation. Resolves load it without a lock; a
/// reload stores a new one and bumps the generation, which wakes every refresh loop.
pub struct ChainCell {
    chain: ArcSwap<Chain>,
    generation: watch::Sender<u64>,
}

impl ChainCell {
    /// A cell serving `chain` as generation 0.
    pub fn new(chain: Chain) -> ChainCell {
        ChainCell {
            chain: ArcSwap::from_pointee(chain),
            generation: watch::channel(0).0,
        }
    }

    /// The chain serving now; a call in flight keeps its chain alive through the `Arc`.
    pub fn load(&self) -> Arc<Chain> {
        self.chain.load_full()
    }

    /// Serve `chain` from now on; the new generation.
    pub fn store(&self, chain: Chain) -> u64 {
        self.chain.store(Arc::new(chain));
        let mut next = 0;
        self.generation.send_modify(|generation| {
            *generation += 1;
            next = *generation;
        });
        next
    }

    /// The generation serving now (0: the chain built at start).
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Wakes on every new generation.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}
