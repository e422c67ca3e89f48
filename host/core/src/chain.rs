//! The ordered chain of sources: ask each in turn, stop at the first with endpoints of
//! an acceptable scheme. Which sources there are, and in what order, is the caller's
//! business (the `wasd` crate puts pass-through last).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::endpoint::{Endpoint, EndpointSet, filter_by_metadata, select_by_scheme};
use crate::error::ProviderError;
use crate::source::{Source, SourceQuery};

/// Sources in the order they are asked.
#[derive(Clone, Default)]
pub struct Chain {
    sources: Vec<Arc<dyn Source>>,
}

/// The first useful answer in a chain.
#[non_exhaustive]
pub struct ChainAnswer {
    /// The endpoints that won.
    pub set: EndpointSet,
    /// How long they may be cached.
    pub ttl: Option<Duration>,
    /// Sources ahead of the one that answered that failed: their answer, had they had
    /// one, would have won.
    pub failures: Vec<ProviderError>,
    /// The source that answered.
    pub source: Arc<dyn Source>,
    /// The version of its answer, when it can push changes.
    pub version: Option<String>,
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

    /// Ask the sources in order. `Err` carries the failures met on the way; an empty
    /// list means every source answered cleanly that it has nothing.
    pub async fn resolve(
        &self,
        query: &SourceQuery,
        filters: &[(String, String)],
    ) -> Result<ChainAnswer, Vec<ProviderError>> {
        let mut failures = Vec::new();
        for source in &self.sources {
            match source.resolve(query).await {
                Ok(answer) => {
                    let endpoints = select(answer.endpoints, query, filters);
                    if !endpoints.is_empty() {
                        return Ok(ChainAnswer {
                            set: EndpointSet::new(source.name().clone(), endpoints),
                            ttl: answer.ttl,
                            failures,
                            source: source.clone(),
                            version: answer.version,
                        });
                    }
                }
                Err(failure) => {
                    tracing::debug!(service = %query.service, "{failure}");
                    failures.push(failure);
                }
            }
        }
        Err(failures)
    }
}

/// The endpoints of one answer that the query accepts: its metadata filters, then the
/// most preferred scheme present.
pub(crate) fn select(
    endpoints: Vec<Endpoint>,
    query: &SourceQuery,
    filters: &[(String, String)],
) -> Vec<Endpoint> {
    select_by_scheme(filter_by_metadata(endpoints, filters), &query.schemes)
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
