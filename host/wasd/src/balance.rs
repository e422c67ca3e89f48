//! Client-side load balancing over a watched query: pick one endpoint per request.
//!
//! A [`Balancer`] holds a [`Resolver::watch`] of its query and picks from the current
//! endpoints with a [`Strategy`]: round-robin (Microsoft's only one), random, power of
//! two choices on outstanding requests, or pick-first. Each pick first looks whether the
//! query's set changed (two lock-free loads), so a change applies from the next pick.
//! Filters (metadata, the instance version, any predicate) apply to every set, Kratos's
//! `filter.Version("v2")`.
//! An endpoint that failed (a refused connection, say) is left out for a while, unless
//! every endpoint has failed. Like Kratos, a balancer never drops to an empty set: when a
//! new set has no endpoint that passes the filters, it keeps the last one that had.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};

use wasd_core::{Backoff, Clock, Endpoint, EndpointSet, Error, Latest, Query, SetInner, Watch};

use crate::resolver::Resolver;

/// How a [`Balancer`] chooses among the endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Strategy {
    /// Each endpoint in turn.
    #[default]
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// Two endpoints at random, the one with fewer requests outstanding (those whose
    /// [`Picked`] guard is alive).
    PowerOfTwoChoices,
    /// The first endpoint in the provider's order (priority order for DNS SRV); the
    /// next while it is marked failed.
    PickFirst,
}

/// How long an endpoint marked failed is left out, at first; doubling on each failure
/// in a row up to 30 s.
pub const DEFAULT_EJECTION: Duration = Duration::from_secs(1);
const MAX_EJECTION: Duration = Duration::from_secs(30);

pub(crate) type Predicate = Arc<dyn Fn(&Endpoint) -> bool + Send + Sync>;

/// How a balancer picks: what [`BalancerBuilder`] and the HTTP client's discovery set.
#[derive(Clone)]
pub(crate) struct Options {
    pub(crate) strategy: Strategy,
    filters: Vec<Predicate>,
    ejection: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            strategy: Strategy::default(),
            filters: Vec::new(),
            ejection: DEFAULT_EJECTION,
        }
    }
}

impl Options {
    pub(crate) fn metadata(&mut self, key: String, value: String) {
        self.filter(Arc::new(move |e: &Endpoint| {
            e.metadata_value(&key) == Some(value.as_str())
        }));
    }

    pub(crate) fn filter(&mut self, keep: Predicate) {
        self.filters.push(keep);
    }

    pub(crate) fn ejection(&mut self, first: Duration) {
        self.ejection = first;
    }
}

/// Builds a [`Balancer`]; from [`Resolver::balancer_builder`].
#[must_use]
pub struct BalancerBuilder {
    resolver: Resolver,
    query: String,
    options: Options,
}

impl BalancerBuilder {
    /// The picking strategy (default: round-robin).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.options.strategy = strategy;
        self
    }

    /// Only endpoints whose metadata has `key` = `value`.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.metadata(key.into(), value.into());
        self
    }

    /// Only endpoints of instances of this version (the `version` metadata, as the etcd
    /// provider sets it): Kratos's `filter.Version`.
    pub fn version(self, version: impl Into<String>) -> Self {
        self.metadata("version", version)
    }

    /// Only endpoints for which `keep` holds. Filters add up.
    pub fn filter(mut self, keep: impl Fn(&Endpoint) -> bool + Send + Sync + 'static) -> Self {
        self.options.filter(Arc::new(keep));
        self
    }

    /// How long an endpoint marked failed is left out at first (default 1 s).
    pub fn ejection(mut self, first: Duration) -> Self {
        self.options.ejection(first);
        self
    }

    /// Resolve the query (failing as [`Resolver::resolve`] does when nothing answers)
    /// and start following it.
    pub async fn build(self) -> Result<Balancer, Error> {
        let query = Query::parse(&self.query)?;
        let (watch, latest) = self.resolver.watch_latest(&query).await?;
        let first = latest.load_full();
        let Options {
            strategy,
            filters,
            ejection,
        } = self.options;
        let shared = Arc::new(Shared {
            strategy,
            filters,
            ejection,
            next: AtomicUsize::new(0),
            clock: self.resolver.clock().clone(),
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            seen: ArcSwapOption::new(first.clone()),
            latest,
            rebuild: Mutex::new(()),
            _watch: watch,
        });
        let first = first.map(EndpointSet::from_shared);
        let applied = first.as_ref().is_some_and(|set| shared.update(set));
        if !applied {
            return Err(Error::NoEndpoints {
                service: query.service().to_owned(),
                // Who failed, when the set is empty because of a failure.
                failures: first.map(|set| set.failures().to_vec()).unwrap_or_default(),
            });
        }
        Ok(Balancer { shared })
    }
}

/// Picks endpoints of one query, following its changes. Cheap to clone; the clones
/// share the endpoints, counters and failure marks.
#[derive(Clone)]
pub struct Balancer {
    shared: Arc<Shared>,
}

struct Shared {
    strategy: Strategy,
    filters: Vec<Predicate>,
    ejection: Duration,
    /// The round-robin position.
    next: AtomicUsize,
    /// Its coarse clock times failure marks (a load per pick, not a clock read).
    clock: Clock,
    snapshot: ArcSwap<Snapshot>,
    /// The query's set `snapshot` was made from (or skipped): held, so that its address
    /// cannot be reused by a later set and mistaken for it.
    seen: ArcSwapOption<SetInner>,
    latest: Latest,
    /// Held while a new set is made into the snapshot.
    rebuild: Mutex<()>,
    /// Keeps the query watched (refreshed, pushed by watching providers).
    _watch: Watch,
}

/// The endpoints that pass the filters, each with its counters.
#[derive(Default)]
struct Snapshot {
    endpoints: Vec<Arc<Slot>>,
}

impl Snapshot {
    /// The snapshot for a new set: its endpoints that pass the filters, keeping the
    /// slots (counters, failure marks) of those already known. `None` when none pass:
    /// like Kratos, a balancer never drops to an empty set.
    fn next(old: &Snapshot, set: &EndpointSet, filters: &[Predicate]) -> Option<Snapshot> {
        let mut kept: HashMap<&Endpoint, &Arc<Slot>> =
            old.endpoints.iter().map(|s| (&s.endpoint, s)).collect();
        let endpoints: Vec<Arc<Slot>> = set
            .iter()
            .filter(|e| filters.iter().all(|keep| keep(e)))
            .map(|e| match kept.remove(e) {
                Some(slot) => slot.clone(),
                None => Arc::new(Slot {
                    endpoint: e.clone(),
                    outstanding: AtomicUsize::new(0),
                    ejected_until: AtomicU64::new(0),
                    failures_in_a_row: AtomicU64::new(0),
                }),
            })
            .collect();
        (!endpoints.is_empty()).then_some(Snapshot { endpoints })
    }
}

/// One endpoint and what the balancer knows of it; kept across sets while the endpoint
/// stays, so counters and failure marks survive changes.
struct Slot {
    endpoint: Endpoint,
    outstanding: AtomicUsize,
    /// Left out until this time (the clock's milliseconds); 0 = not failed.
    ejected_until: AtomicU64,
    failures_in_a_row: AtomicU64,
}

fn same_set(a: &Option<Arc<SetInner>>, b: &Option<Arc<SetInner>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

impl Shared {
    /// Take up the query's current set if it is not the one last seen.
    fn follow(&self) {
        if same_set(&self.latest.load(), &self.seen.load()) {
            return;
        }
        // One rebuild at a time. A pick that finds one under way goes on with the
        // snapshot it has and looks again next time: `seen` is only written after its
        // snapshot, so no change is passed over.
        let Ok(_rebuilding) = self.rebuild.try_lock() else {
            return;
        };
        let latest = self.latest.load_full();
        if same_set(&latest, &self.seen.load()) {
            return;
        }
        if let Some(set) = &latest {
            self.update(&EndpointSet::from_shared(set.clone()));
        }
        self.seen.store(latest);
    }

    /// Take a new set; false (keeping the old one) when no endpoint passes the filters.
    fn update(&self, set: &EndpointSet) -> bool {
        let old = self.snapshot.load();
        match Snapshot::next(&old, set, &self.filters) {
            Some(next) => {
                self.snapshot.store(Arc::new(next));
                true
            }
            None => {
                if !old.endpoints.is_empty() {
                    tracing::warn!(
                        "no endpoint passes the balancer's filters in the new set; keeping the {} it had",
                        old.endpoints.len()
                    );
                }
                false
            }
        }
    }

    fn now_ms(&self) -> u64 {
        // Never 0, which means "not ejected".
        self.clock.coarse_now_ms() + 1
    }
}

impl Balancer {
    /// Pick an endpoint for one request. Hold the returned guard for as long as the
    /// request is outstanding (power of two choices counts them), and call
    /// [`Picked::failed`] if the endpoint could not be reached.
    pub fn pick(&self) -> Picked {
        self.shared.follow();
        let snapshot = self.shared.snapshot.load();
        let slots = &snapshot.endpoints;
        let now = self.shared.now_ms();
        let live = |slot: &Arc<Slot>| slot.ejected_until.load(Ordering::Relaxed) <= now;
        let live_count = slots.iter().filter(|s| live(s)).count();
        // The k-th candidate: the live endpoints, or all of them when every one failed
        // lately (trying them anyway beats failing the request). No allocation per pick.
        let (n, nth) = if live_count == 0 {
            (slots.len(), None)
        } else {
            (live_count, Some(live))
        };
        let candidate = |k: usize| match nth {
            None => k,
            Some(live) => slots
                .iter()
                .enumerate()
                .filter(|(_, s)| live(s))
                .nth(k)
                .map_or(0, |(i, _)| i),
        };
        let chosen = match self.shared.strategy {
            Strategy::RoundRobin => candidate(self.shared.next.fetch_add(1, Ordering::Relaxed) % n),
            Strategy::Random => candidate(fastrand::usize(..n)),
            Strategy::PickFirst => candidate(0),
            Strategy::PowerOfTwoChoices if n == 1 => candidate(0),
            Strategy::PowerOfTwoChoices => {
                // Two different candidates at random; the less busy one.
                let first = fastrand::usize(..n);
                let second = (first + 1 + fastrand::usize(..n - 1)) % n;
                let (a, b) = (candidate(first), candidate(second));
                let load = |i: usize| slots[i].outstanding.load(Ordering::Relaxed);
                if load(b) < load(a) { b } else { a }
            }
        };
        let slot = slots[chosen].clone();
        slot.outstanding.fetch_add(1, Ordering::Relaxed);
        Picked {
            slot,
            shared: self.shared.clone(),
        }
    }

    /// Every endpoint the balancer picks from now, in the provider's order, with the
    /// ones marked failed last: the order to try them in when one fails.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.shared.follow();
        let snapshot = self.shared.snapshot.load();
        let now = self.shared.now_ms();
        let (live, failed): (Vec<&Arc<Slot>>, Vec<&Arc<Slot>>) = snapshot
            .endpoints
            .iter()
            .partition(|s| s.ejected_until.load(Ordering::Relaxed) <= now);
        live.into_iter()
            .chain(failed)
            .map(|s| s.endpoint.clone())
            .collect()
    }

    /// The picking strategy.
    pub fn strategy(&self) -> Strategy {
        self.shared.strategy
    }
}

/// One picked endpoint; counts as an outstanding request until dropped.
pub struct Picked {
    slot: Arc<Slot>,
    shared: Arc<Shared>,
}

impl Picked {
    /// The endpoint to send to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.slot.endpoint
    }

    /// The endpoint could not be reached: leave it out of picks for a while (1 s,
    /// doubling with each failure in a row, up to 30 s).
    pub fn failed(&self) {
        let in_a_row = self
            .slot
            .failures_in_a_row
            .fetch_add(1, Ordering::Relaxed)
            .min(32) as u32;
        let ejection = Backoff::new(self.shared.ejection, MAX_EJECTION).nth(in_a_row);
        let until = self.shared.now_ms() + ejection.as_millis() as u64;
        self.slot.ejected_until.store(until, Ordering::Relaxed);
    }

    /// The endpoint answered: its failure count starts again.
    pub fn succeeded(&self) {
        self.slot.failures_in_a_row.store(0, Ordering::Relaxed);
        self.slot.ejected_until.store(0, Ordering::Relaxed);
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.slot.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Picked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Picked")
            .field("endpoint", &self.slot.endpoint)
            .finish()
    }
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("strategy", &self.shared.strategy)
            .field("endpoints", &self.endpoints())
            .finish()
    }
}

impl Resolver {
    /// A round-robin [`Balancer`] over a query's endpoints, following its changes.
    pub async fn balancer(&self, query: &str) -> Result<Balancer, Error> {
        self.balancer_builder(query).build().await
    }

    /// A [`Balancer`] with a strategy, filters and ejection time of your choice.
    pub fn balancer_builder(&self, query: impl Into<String>) -> BalancerBuilder {
        self.balancer_with(query.into(), Options::default())
    }

    /// A [`BalancerBuilder`] with options set already.
    pub(crate) fn balancer_with(&self, query: String, options: Options) -> BalancerBuilder {
        BalancerBuilder {
            resolver: self.clone(),
            query,
            options,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(hosts: &[&str]) -> EndpointSet {
        EndpointSet::new("test".into(), hosts.iter().map(|h| Endpoint::new(*h)).collect())
    }

    fn hosts(snapshot: &Snapshot) -> Vec<&str> {
        snapshot.endpoints.iter().map(|s| s.endpoint.host()).collect()
    }

    #[test]
    fn an_empty_set_is_refused_and_a_new_one_keeps_known_slots() {
        let first = Snapshot::next(&Snapshot::default(), &set(&["a", "b"]), &[]).unwrap();
        assert_eq!(hosts(&first), ["a", "b"]);
        first.endpoints[1].failures_in_a_row.store(3, Ordering::Relaxed);

        // An empty set never replaces endpoints: the update is refused.
        assert!(Snapshot::next(&first, &set(&[]), &[]).is_none());
        // Nor does a set none of whose endpoints pass the filters.
        let only_c: Predicate = Arc::new(|e: &Endpoint| e.host() == "c");
        assert!(Snapshot::next(&first, &set(&["a", "b"]), std::slice::from_ref(&only_c)).is_none());

        // A non-empty set is taken; an endpoint that stays keeps its slot (and its
        // failure count), a new one starts fresh, a gone one is dropped.
        let next = Snapshot::next(&first, &set(&["b", "c"]), &[]).unwrap();
        assert_eq!(hosts(&next), ["b", "c"]);
        assert!(Arc::ptr_eq(&next.endpoints[0], &first.endpoints[1]));
        assert_eq!(next.endpoints[0].failures_in_a_row.load(Ordering::Relaxed), 3);
        assert_eq!(next.endpoints[1].failures_in_a_row.load(Ordering::Relaxed), 0);
        // The filters apply to what is taken.
        let filtered = Snapshot::next(&next, &set(&["b", "c"]), &[only_c]).unwrap();
        assert_eq!(hosts(&filtered), ["c"]);
    }
}
