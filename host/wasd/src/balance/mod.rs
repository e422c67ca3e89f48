//! Client-side load balancing over a watched query: pick one endpoint per request.
//!
//! A [`Balancer`] holds a [`Resolver::watch`] of its query and picks from the current
//! endpoints under a [`Policy`]: a [`Strategy`] (round-robin, weighted round-robin,
//! random, power of two choices on outstanding requests or on latency, pick-first,
//! consistent hashing), the caller's zone, deterministic subsetting, active health
//! checks and passive outlier ejection. Policies come from wasd.toml's `[[policy]]`
//! tables (hot-reloaded) with the builder's settings over them.
//!
//! What is known of an endpoint's health lives in one table per resolver, by address,
//! fed by every client ([`Picked::failed`] from reqwest, the gRPC channel's
//! reachability checks) and the active checker, and read by every balancer.
//! Each pick first looks whether the query's set or the policies changed (two or three
//! lock-free loads), so a change applies from the next pick. Filters apply to every set.
//! Like Kratos, a balancer never drops to an empty set: a new set with no endpoint that
//! passes the filters keeps the last one that had, and when every endpoint is left out
//! (ejected, failing its checks) picks use them all.

mod check;
mod health;
mod policy;
mod snapshot;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use wasd_core::{Clock, Endpoint, EndpointSet, Error, Latest, Query, Watch};

use crate::resolver::Resolver;
#[cfg(feature = "tonic")]
pub(crate) use check::{error_chain, port_of};
#[cfg(any(feature = "tonic", feature = "xds"))]
pub(crate) use health::EndpointHealth;
pub use health::Health;
use health::HealthTable;
use policy::Overrides;
pub(crate) use policy::Selector;
pub use policy::{HealthCheck, Outlier, Policies, Policy, Probe, Strategy, Subset};
use snapshot::{Pick, Snapshot};

/// How long an endpoint marked failed is left out, at first; doubling on each failure
/// in a row up to 30 s (the default [`Outlier`]).
pub const DEFAULT_EJECTION: Duration = Duration::from_secs(1);

/// Metric names: ejections by a balancer's outlier detection, active health checks.
pub(crate) const EJECTIONS: &str = "wasd_balancer_ejections_total";
pub(crate) const HEALTH_CHECKS: &str = "wasd_health_checks_total";

pub(crate) type Predicate = Arc<dyn Fn(&Endpoint) -> bool + Send + Sync>;

/// What a resolver's balancers share: the health table and the configured policies.
pub(crate) struct Balancing {
    table: HealthTable,
    policies: ArcSwap<Policies>,
    /// Moves when the policies change, so that balancers know to look again.
    generation: AtomicU64,
}

impl Balancing {
    pub(crate) fn new(
        clock: Clock,
        runtime: Option<tokio::runtime::Handle>,
        policies: Policies,
    ) -> Balancing {
        Balancing {
            table: HealthTable::new(clock, runtime),
            policies: ArcSwap::from_pointee(policies),
            generation: AtomicU64::new(0),
        }
    }

    /// Take the policies of a reloaded config (balancers follow from their next pick).
    pub(crate) fn set_policies(&self, policies: Policies) {
        if **self.policies.load() != policies {
            self.policies.store(Arc::new(policies));
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    pub(crate) fn policies(&self) -> Arc<Policies> {
        self.policies.load_full()
    }

    #[cfg(any(feature = "tonic", feature = "xds"))]
    pub(crate) fn table(&self) -> &HealthTable {
        &self.table
    }
}

/// How a balancer picks: what [`BalancerBuilder`] and the HTTP client's discovery set.
#[derive(Clone, Default)]
pub(crate) struct Options {
    filters: Vec<Predicate>,
    pub(crate) overrides: Overrides,
    seed: Option<u64>,
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
        self.overrides.ejection = Some(first);
    }

    pub(crate) fn strategy(&mut self, strategy: Strategy) {
        self.overrides.strategy = Some(strategy);
    }
}

/// Builds a [`Balancer`]; from [`Resolver::balancer_builder`]. Unless told otherwise it
/// follows the configured policy for its query (`[[policy]]` in wasd.toml); each method
/// here sets one thing over it.
#[must_use]
pub struct BalancerBuilder {
    resolver: Resolver,
    query: String,
    /// The query parsed already (with its filters), when the caller had it so.
    parsed: Option<Query>,
    options: Options,
}

impl BalancerBuilder {
    /// The picking strategy.
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.options.strategy(strategy);
        self
    }

    /// This policy instead of the configured one (the other methods still apply over it).
    pub fn policy(mut self, policy: Policy) -> Self {
        self.options.overrides.policy = Some(policy);
        self
    }

    /// Prefer endpoints whose `zone` metadata is `zone`.
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.options.overrides.zone = Some(zone.into());
        self
    }

    /// Pick from a deterministic subset of the endpoints.
    pub fn subset(mut self, subset: Subset) -> Self {
        self.options.overrides.subset = Some(subset);
        self
    }

    /// Check every endpoint actively; failing ones are left out.
    pub fn health_check(mut self, check: HealthCheck) -> Self {
        self.options.overrides.health = Some(check);
        self
    }

    /// Eject endpoints whose requests fail this way.
    pub fn outlier(mut self, outlier: Outlier) -> Self {
        self.options.overrides.outlier = Some(outlier);
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

    /// How long an endpoint marked failed is left out at first (the outlier's base
    /// ejection; default 1 s).
    pub fn ejection(mut self, first: Duration) -> Self {
        self.options.ejection(first);
        self
    }

    /// Seed the random choices (random, power of two choices, consistent hashing
    /// without a key), for picks that repeat from run to run.
    pub fn seed(mut self, seed: u64) -> Self {
        self.options.seed = Some(seed);
        self
    }

    /// Resolve the query (failing as [`Resolver::resolve`] does when nothing answers)
    /// and start following it.
    pub async fn build(self) -> Result<Balancer, Error> {
        let query = match self.parsed {
            Some(query) => query,
            None => Query::parse(&self.query)?,
        };
        let (watch, latest) = self.resolver.watch_latest(&query).await?;
        LazyLock::force(&CLOCK);
        let balancing = self.resolver.balancing().clone();
        let generation = balancing.generation.load(Ordering::Acquire);
        let Options {
            filters,
            overrides,
            seed,
        } = self.options;
        let policy = Arc::new(overrides.apply(&balancing.policies(), &query));
        // The version before the set (see `Latest::version`).
        let seen = AtomicU64::new(latest.version());
        let first = latest.load_full();
        let snapshot = first.as_ref().and_then(|set| {
            Snapshot::new(
                query.service().into(),
                &EndpointSet::from_shared(set.clone()),
                &filters,
                policy.clone(),
                &balancing.table,
                false,
            )
        });
        let Some(snapshot) = snapshot else {
            return Err(Error::NoEndpoints {
                service: query.service().to_owned(),
                // Who failed, when the set is empty because of a failure.
                failures: first
                    .map(|set| EndpointSet::from_shared(set).failures().to_vec())
                    .unwrap_or_default(),
            });
        };
        let shared = Arc::new(Shared {
            query,
            filters,
            overrides,
            balancing,
            next: AtomicU64::new(0),
            seeded: seed.map(AtomicU64::new),
            snapshot: ArcSwap::from_pointee(snapshot),
            policy: ArcSwap::new(policy),
            seen,
            policy_generation: AtomicU64::new(generation),
            latest,
            rebuild: Mutex::new(()),
            _watch: watch,
        });
        Ok(Balancer { shared })
    }
}

/// Picks endpoints of one query, following its changes. Cheap to clone; the clones
/// share the endpoints, counters and position.
#[derive(Clone)]
pub struct Balancer {
    shared: Arc<Shared>,
}

struct Shared {
    query: Query,
    filters: Vec<Predicate>,
    overrides: Overrides,
    balancing: Arc<Balancing>,
    /// The round-robin position.
    next: AtomicU64,
    /// The random choices' state (wyrand) when the builder gave a seed, for repeatable
    /// picks. Unseeded picks draw from their thread's own generator: no cache line
    /// shared between threads, no locked instruction.
    seeded: Option<AtomicU64>,
    snapshot: ArcSwap<Snapshot>,
    /// The policy in force: the next snapshot is made under it (a new policy whose set
    /// could not be taken still applies to the next set).
    policy: ArcSwap<Policy>,
    /// The version of the query's set that `snapshot` was made from (or skipped).
    seen: AtomicU64,
    /// The policies' generation `snapshot` was made under.
    policy_generation: AtomicU64,
    latest: Latest,
    /// Held while a new set is made into the snapshot.
    rebuild: Mutex<()>,
    /// Keeps the query watched (refreshed, pushed by watching providers).
    _watch: Watch,
}

impl Shared {
    /// Take up the query's current set, or a changed policy, if not taken yet.
    #[inline]
    fn follow(&self) {
        if self.balancing.generation.load(Ordering::Relaxed) == self.policy_generation.load(Ordering::Relaxed)
            && self.latest.version() == self.seen.load(Ordering::Acquire)
        {
            return;
        }
        self.follow_slow();
    }

    #[cold]
    fn follow_slow(&self) {
        // One rebuild at a time. A pick that finds one under way goes on with the
        // snapshot it has and looks again next time: `seen` is only written after its
        // snapshot, so no change is passed over.
        let Ok(_rebuilding) = self.rebuild.try_lock() else {
            return;
        };
        let generation = self.balancing.generation.load(Ordering::Acquire);
        let policy_changed = generation != self.policy_generation.load(Ordering::Relaxed);
        let version = self.latest.version();
        if !policy_changed && version == self.seen.load(Ordering::Relaxed) {
            return;
        }
        let latest = self.latest.load_full();
        if policy_changed {
            let policy = self.overrides.apply(&self.balancing.policies(), &self.query);
            self.policy.store(Arc::new(policy));
        }
        if let Some(set) = &latest {
            self.update(&EndpointSet::from_shared(set.clone()), self.policy.load_full());
        }
        self.policy_generation.store(generation, Ordering::Relaxed);
        // Last, so that a pick that finds it current finds the snapshot made from it.
        self.seen.store(version, Ordering::Release);
    }

    /// Take a new set; false (keeping the old one) when no endpoint passes the filters.
    fn update(&self, set: &EndpointSet, policy: Arc<Policy>) -> bool {
        let stop_checks = policy.health.is_none() && self.snapshot.load().policy.health.is_some();
        let service = self.snapshot.load().service.clone();
        match Snapshot::new(
            service,
            set,
            &self.filters,
            policy,
            &self.balancing.table,
            stop_checks,
        ) {
            Some(next) => {
                self.snapshot.store(Arc::new(next));
                true
            }
            None => {
                tracing::warn!(
                    query = %self.query,
                    "no endpoint passes the balancer's filters in the new set; keeping the {} it had",
                    self.snapshot.load().slots.len()
                );
                false
            }
        }
    }

    /// Random bits: the thread's generator, or wyrand over the seeded state (lock-free,
    /// and repeatable from the seed).
    #[inline]
    fn random(&self) -> u64 {
        const STEP: u64 = 0xa076_1d64_78bd_642f;
        let Some(state) = &self.seeded else {
            return fastrand::u64(..);
        };
        let s = state.fetch_add(STEP, Ordering::Relaxed).wrapping_add(STEP);
        let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
        (t >> 64) as u64 ^ t as u64
    }

    fn now_ms(&self) -> u64 {
        self.balancing.table.common().now_ms()
    }
}

impl Balancer {
    /// Pick an endpoint for one request. Hold the returned guard for as long as the
    /// request is outstanding (the power-of-two strategies count them), and call
    /// [`Picked::failed`] if the request failed (or [`Picked::succeeded`]).
    #[inline]
    pub fn pick(&self) -> Picked {
        self.pick_with(None)
    }

    /// Pick for a request with this key (a user id, a session, a cache key): with
    /// [`Strategy::ConsistentHash`], the same key goes to the same endpoint while it is
    /// there. Other strategies ignore the key.
    pub fn pick_key(&self, key: impl AsRef<[u8]>) -> Picked {
        self.pick_with(Some(snapshot::key_hash(key.as_ref())))
    }

    /// Pick for a request with this already hashed key (see [`PickKey`]).
    #[cfg(any(feature = "tonic", feature = "reqwest"))]
    pub(crate) fn pick_hashed(&self, key: PickKey) -> Picked {
        self.pick_with(Some(key.0))
    }

    /// The version of the query's set the balancer picks from: it changes when the set
    /// does (read on a pick; taken up by the next one).
    #[cfg(feature = "tonic")]
    pub(crate) fn set_version(&self) -> u64 {
        self.shared.follow();
        self.shared.seen.load(Ordering::Acquire)
    }

    fn pick_with(&self, key: Option<u64>) -> Picked {
        let shared = &self.shared;
        shared.follow();
        let snapshot = shared.snapshot.load_full();
        let strategy = snapshot.policy.strategy;
        let pick = Pick {
            sequence: match strategy {
                Strategy::RoundRobin | Strategy::WeightedRoundRobin => {
                    shared.next.fetch_add(1, Ordering::Relaxed)
                }
                _ => 0,
            },
            random: match (strategy, key) {
                (Strategy::RoundRobin | Strategy::WeightedRoundRobin | Strategy::PickFirst, _)
                | (Strategy::ConsistentHash, Some(_)) => 0,
                _ => shared.random(),
            },
            key,
            now: shared.now_ms(),
        };
        let index = snapshot.pick(&pick, &shared.balancing.table);
        // Only the power-of-two strategies read the count: the others spare its two
        // locked instructions. (After a policy change to one of them, requests picked
        // before it are not counted; the count is right again once they end.)
        if counts_outstanding(strategy) {
            snapshot.slots[index]
                .health
                .outstanding
                .fetch_add(1, Ordering::Relaxed);
        }
        let started = (strategy == Strategy::PowerOfTwoEwma
            && snapshot.slots[index].health.time_request(pick.now))
        .then(|| CLOCK.raw());
        Picked {
            snapshot,
            index,
            started,
        }
    }

    /// Every endpoint the balancer picks from now, in the provider's order, with the
    /// ones left out (ejected, failing their checks) last: the order to try them in
    /// when one fails.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.shared.follow();
        let snapshot = self.shared.snapshot.load();
        let now = self.shared.now_ms();
        let (live, out): (Vec<_>, Vec<_>) = snapshot.slots.iter().partition(|s| s.health.usable(now));
        live.into_iter().chain(out).map(|s| s.endpoint.clone()).collect()
    }

    /// Every endpoint with what is known of its health, in the provider's order.
    pub fn health(&self) -> Vec<(Endpoint, Health)> {
        self.shared.follow();
        let snapshot = self.shared.snapshot.load();
        let now = self.shared.now_ms();
        snapshot
            .slots
            .iter()
            .map(|s| (s.endpoint.clone(), s.health.state(now)))
            .collect()
    }

    /// Wait (at most `within`) until every endpoint's active health checks have
    /// answered once, so that picks avoid the unhealthy ones from the first; at once
    /// without active checks.
    pub async fn checked(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        let notify = self.shared.balancing.table.common().notify();
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.health().iter().any(|(_, h)| *h == Health::Unchecked) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    /// The strategy in force.
    pub fn strategy(&self) -> Strategy {
        self.policy().strategy
    }

    /// The policy in force (the configured one with the builder's settings over it).
    pub fn policy(&self) -> Policy {
        self.shared.follow();
        (*self.shared.policy.load_full()).clone()
    }
}

/// Whether picks under `strategy` count their requests outstanding: only the strategies
/// that read the count do.
fn counts_outstanding(strategy: Strategy) -> bool {
    matches!(strategy, Strategy::PowerOfTwoChoices | Strategy::PowerOfTwoEwma)
}

/// A request's key for [`Strategy::ConsistentHash`], carried as a request extension:
/// the balanced gRPC channel ([`crate::grpc::BalancedChannel`]) and the HTTP client
/// ([`crate::http::Discovery`]) pick by it, as [`Balancer::pick_key`] does. Hashed once,
/// when made.
///
/// ```
/// let mut request = http::Request::new(());
/// request.extensions_mut().insert(wasd::PickKey::new("user-42"));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PickKey(u64);

impl PickKey {
    /// The key of `key` (a user id, a session, a cache key).
    pub fn new(key: impl AsRef<[u8]>) -> PickKey {
        PickKey(snapshot::key_hash(key.as_ref()))
    }
}

/// One picked endpoint; under the power-of-two strategies it counts as an outstanding
/// request until dropped.
pub struct Picked {
    /// The snapshot it was picked from: its endpoint, health entry, policy and service.
    snapshot: Arc<Snapshot>,
    index: usize,
    /// When it was picked, if the latency strategy measures it: [`CLOCK`]'s raw reading.
    started: Option<u64>,
}

/// The clock latencies are measured with: the CPU's time-stamp counter where it is
/// invariant (one `rdtsc`, ~13 ns here, where `Instant::now` costs ~40 ns: most of a
/// pick), else the monotonic clock. Real time, not tokio's: a latency is real, and
/// tokio's clock costs a check per read. Calibrated (under 1 ms) when the first balancer
/// is built, not on a pick.
pub(crate) static CLOCK: LazyLock<quanta::Clock> = LazyLock::new(quanta::Clock::new);

impl Picked {
    /// The endpoint to send to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.snapshot.slots[self.index].endpoint
    }

    /// What is known of its health now.
    pub fn health(&self) -> Health {
        let health = &self.snapshot.slots[self.index].health;
        health.state(health.now_ms())
    }

    /// The request failed (a refused connection, a 5xx, UNAVAILABLE): counts toward
    /// ejecting the endpoint (by default at once, for 1 s, doubling with each failure in
    /// a row up to 30 s), within the policy's ejection cap.
    pub fn failed(&self) {
        // The cap over the snapshot it was picked from (the set as the pick saw it).
        let snapshot = &self.snapshot;
        let slot = &snapshot.slots[self.index];
        let outlier = &snapshot.policy.outlier;
        let ejected = slot.health.failed(outlier, || {
            let (n, out) = (snapshot.slots.len(), snapshot.ejected(slot.health.now_ms()));
            out == 0 || (out + 1) * 100 <= usize::from(outlier.max_ejection_percent) * n
        });
        if ejected {
            metrics::counter!(EJECTIONS, "service" => snapshot.service.to_string()).increment(1);
            tracing::debug!(endpoint = %slot.endpoint, service = %snapshot.service, "endpoint ejected");
        }
    }

    /// The request succeeded: the endpoint's failure count starts again (an ejection
    /// ends), and its latency counts for [`Strategy::PowerOfTwoEwma`].
    pub fn succeeded(&self) {
        let health = &self.snapshot.slots[self.index].health;
        if let Some(started) = self.started {
            health.record_latency(Duration::from_nanos(CLOCK.delta_as_nanos(started, CLOCK.raw())));
        }
        health.succeeded();
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        // The snapshot's strategy is the one it was picked under.
        if counts_outstanding(self.snapshot.policy.strategy) {
            self.snapshot.slots[self.index]
                .health
                .outstanding
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for Picked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Picked")
            .field("endpoint", self.endpoint())
            .finish()
    }
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("query", &self.shared.query.as_str())
            .field("strategy", &self.strategy())
            .field("endpoints", &self.endpoints())
            .finish()
    }
}

impl Resolver {
    /// A [`Balancer`] over a query's endpoints under the configured policy (round-robin
    /// unless a `[[policy]]` says otherwise), following its changes.
    pub async fn balancer(&self, query: &str) -> Result<Balancer, Error> {
        self.balancer_builder(query).build().await
    }

    /// A [`Balancer`] with a strategy, filters, zone, checks or ejection of your choice.
    pub fn balancer_builder(&self, query: impl Into<String>) -> BalancerBuilder {
        self.balancer_with(query.into(), Options::default())
    }

    /// A [`BalancerBuilder`] with options set already.
    pub(crate) fn balancer_with(&self, query: String, options: Options) -> BalancerBuilder {
        BalancerBuilder {
            resolver: self.clone(),
            query,
            parsed: None,
            options,
        }
    }

    /// A [`BalancerBuilder`] for an already parsed query (its filters apply).
    pub fn balancer_for_query(&self, query: &Query) -> BalancerBuilder {
        BalancerBuilder {
            resolver: self.clone(),
            query: query.as_str().to_owned(),
            parsed: Some(query.clone()),
            options: Options::default(),
        }
    }

    /// The policies the configuration sets (`[[policy]]`), as they stand.
    pub fn policies(&self) -> Arc<Policies> {
        self.balancing().policies()
    }
}
