//! The cache: one entry per normalised query, filled by the chain and kept fresh.
//!
//! The first resolve of a query runs the chain (concurrent first resolves share that
//! one run); afterwards resolves read the cache, and a background task per cached query
//! refreshes it on the answer's TTL (at most the refresh period), publishes changes to
//! watchers, keeps the last good answer when sources fail, and drops the entry once
//! nobody has used it for the idle timeout. When the answering source can push changes
//! (its answer carries a version), the task long-polls the source's `watch` instead of
//! sleeping, so changes arrive as they happen; a quiet long-poll still ends in a
//! periodic refresh of the chain.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use dashmap::DashMap;
use tokio::sync::{OnceCell, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::chain::{ChainAnswer, ChainCell, select};
use crate::clock::Clock;
use crate::endpoint::{EndpointSet, SetInner};
use crate::error::{Error, ProviderError, ProviderErrorKind};
use crate::explain::{CacheState, DropReason, Explanation, Trace};
use crate::metrics;
use crate::query::{Query, effective_schemes};
use crate::recovery::{Recovered, Recovery};
use crate::source::{Source, SourceQuery};

/// Shortest interval between two refreshes of one answer, whatever its TTL says.
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// The next [`EndpointSet::index`]: one counter for every query, so that a number is
/// never reused, not even by a query cached anew after it idled out.
static NEXT_INDEX: AtomicU64 = AtomicU64::new(1);
/// Most query texts remembered for `resolve(&str)`'s fast path.
const MAX_TEXT_INDEX: usize = 16_384;
/// An index smaller than this takes each new text at once (copying it is cheap).
const PENDING_ALWAYS: usize = 256;
/// Longest a new text waits for the next copy of a larger index, in milliseconds.
const PENDING_WAIT_MS: u64 = 100;

/// Changes waiting for the next copy of the text index: new texts, and indexed
/// entries that left the cache (swept out by the same copy).
#[derive(Default)]
struct PendingTexts {
    texts: HashMap<Arc<str>, Weak<Entry>, foldhash::fast::RandomState>,
    gone: usize,
    /// When the first waiting change came (the coarse clock).
    since_ms: u64,
}

impl PendingTexts {
    /// Note that a change came at `now`, before the caller adds it.
    fn arrive(&mut self, now: u64) {
        if self.texts.is_empty() && self.gone == 0 {
            self.since_ms = now;
        }
    }

    /// The texts to copy into an index of `len` texts now, if the waiting changes are
    /// due: at once while the index is small, else once they are an eighth of it or
    /// the first has waited `PENDING_WAIT_MS`.
    fn due(
        &mut self,
        now: u64,
        len: usize,
    ) -> Option<HashMap<Arc<str>, Weak<Entry>, foldhash::fast::RandomState>> {
        let waiting = self.texts.len() + self.gone;
        let due = len < PENDING_ALWAYS
            || waiting >= len / 8
            || now.saturating_sub(self.since_ms) >= PENDING_WAIT_MS;
        due.then(|| {
            self.gone = 0;
            std::mem::take(&mut self.texts)
        })
    }
}

// Shared keys: each copy of the map (copy-on-write, once per batch of new texts) then
// costs two reference counts per text rather than an allocation.
type TextIndex = HashMap<Arc<str>, Arc<Entry>, foldhash::fast::RandomState>;

/// A resolve's answer: an empty set (the service is gone) is `NoEndpoints`.
fn non_empty(service: &str, set: EndpointSet) -> Result<EndpointSet, Error> {
    if set.is_empty() {
        return Err(Error::NoEndpoints {
            service: service.to_owned(),
            // An empty set may record why (a watch that started while a provider
            // failed): the caller is told who failed.
            failures: set.failures().to_vec(),
        });
    }
    Ok(set)
}

/// Count a resolve's outcome: `hit` when its entry already had a set, `miss` when the
/// chain ran, `error` when it failed.
#[inline]
fn count(answered: bool, cached: bool) {
    match (answered, cached) {
        (true, true) => metrics::count_hit(),
        (true, false) => metrics::count_miss(),
        (false, _) => metrics::count_error(),
    }
}

/// Least time between the starts of two long-polls of one entry, once more than
/// `LONG_POLL_BURST` calls in a row have returned sooner.
const LONG_POLL_GAP: Duration = Duration::from_millis(100);
const LONG_POLL_BURST: u32 = 10;
/// Retry back-off after a failed refresh or long-poll: 1 s doubling to 30 s.
pub const REFRESH_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

fn refresh_backoff() -> Backoff {
    Backoff::new(REFRESH_BACKOFF.0, REFRESH_BACKOFF.1)
}

/// The settings of the cache that a reload may change.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settings {
    /// Schemes a query may ask for; empty allows all.
    pub allowed_schemes: Vec<String>,
    /// Cached answers are refreshed at most this far apart.
    pub refresh_period: Duration,
    /// An entry nobody resolved or watched for this long is dropped.
    pub idle_timeout: Duration,
    /// Most queries nobody watches followed by long-poll at once (each holds a
    /// provider call and, for etcd, a watch stream); the others are refreshed every
    /// `refresh_period` until a turn is free. A watched query is always followed.
    /// Read when the cache is made.
    pub max_long_polls: usize,
}

/// Default `refresh-period`.
pub const DEFAULT_REFRESH_PERIOD: Duration = Duration::from_secs(60);
/// Default `idle-timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default `max-watches`: enough for the services a process talks to; 10 000 resolved
/// services followed one long-poll each would hold 10 000 provider calls and streams.
pub const DEFAULT_MAX_LONG_POLLS: usize = 1024;

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            allowed_schemes: Vec::new(),
            refresh_period: DEFAULT_REFRESH_PERIOD,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_long_polls: DEFAULT_MAX_LONG_POLLS,
        }
    }
}

impl Settings {
    /// The same settings allowing only `schemes` (empty: all).
    pub fn with_allowed_schemes(mut self, schemes: Vec<String>) -> Settings {
        self.allowed_schemes = schemes;
        self
    }

    /// The same settings with another refresh period.
    pub fn with_refresh_period(mut self, period: Duration) -> Settings {
        self.refresh_period = period;
        self
    }

    /// The same settings with another idle timeout.
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Settings {
        self.idle_timeout = timeout;
        self
    }

    /// The same settings with another cap on queries followed by long-poll at once.
    pub fn with_max_long_polls(mut self, max: usize) -> Settings {
        self.max_long_polls = max;
        self
    }
}

/// Answers queries from a [`ChainCell`], caching and refreshing them.
///
/// Dropping it stops every refresh loop and ends every [`Watch`].
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    chain: Arc<ChainCell>,
    settings: ArcSwap<Settings>,
    entries: DashMap<Key, Arc<Entry>>,
    /// Query text → entry, for `resolve(&str)`: a hit skips parsing and key building.
    /// Read-mostly and copied on write, so reads from every core never contend.
    by_text: ArcSwap<TextIndex>,
    /// Texts answered but not in `by_text` yet, copied in together (see `index_text`).
    pending: Mutex<PendingTexts>,
    /// Copies of `by_text` made so far (what batching saves; tests read it).
    index_copies: AtomicU64,
    /// Dropped with `Inner`: wakes every refresh task so it can exit at once.
    shutdown: watch::Sender<()>,
    clock: Clock,
    /// Sources failing now, and the entries waiting for them to answer again (shared
    /// with the refresh loops, which hold the cache only weakly).
    recovery: Arc<Recovery>,
    /// The runtime the cache was made on, where its refresh loops run whoever asked
    /// first: a loop spawned on a caller's own short-lived runtime (a `block_on` in
    /// synchronous code, another runtime's thread) would end with it, and its entry
    /// would serve the same set for ever.
    runtime: Option<tokio::runtime::Handle>,
    /// One permit per long-poll of an unwatched query ([`Settings::max_long_polls`]).
    long_polls: Arc<tokio::sync::Semaphore>,
}

/// A query reduced to what can change its answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    service: String,
    endpoint_name: Option<String>,
    schemes: Vec<String>,
    port: Option<u16>,
    filters: Vec<(String, String)>,
}

/// A query as the sources are asked it, with the schemes allowed.
fn source_query(query: &Query, schemes: Vec<String>) -> SourceQuery {
    SourceQuery {
        service: query.service().to_owned(),
        endpoint_name: query.endpoint_name().map(str::to_owned),
        schemes,
        port: query.port(),
    }
}

impl Key {
    fn of(query: &Query, schemes: Vec<String>) -> Key {
        Key {
            service: query.service().to_owned(),
            endpoint_name: query.endpoint_name().map(str::to_owned),
            schemes,
            port: query.port(),
            filters: query.filters().to_vec(),
        }
    }
}

struct Entry {
    key: Key,
    /// The query that made the entry, as it was written (for listings).
    asked: Query,
    query: SourceQuery,
    /// `None` until the first answer; an empty set once the service has disappeared.
    state: watch::Sender<Option<EndpointSet>>,
    /// The same set as `state`, for the read path: an `ArcSwap` load takes no lock.
    /// Shared with balancers ([`Latest`]) without sharing the entry, whose sender must
    /// go with the resolver so that watches end.
    current: Arc<Current>,
    /// Cleared when the entry leaves the cache (idle), so `by_text` never serves it.
    live: AtomicBool,
    /// Set once a text of it is in `by_text`: only then does its leaving count
    /// towards the index's next sweep.
    indexed: AtomicBool,
    /// The first run of the chain, shared by everyone who asked before it ended: its
    /// failures too, so concurrent first resolves of a failing query cost one run.
    init: OnceCell<Result<(), Vec<ProviderError>>>,
    last_used_ms: AtomicU64,
    /// When the set was last given or confirmed, and what the refresh task does next.
    times: Mutex<Times>,
}

/// An entry's timeline, for explanations: written by the refresh task as it goes,
/// never on the cached path.
#[derive(Default)]
struct Times {
    /// A provider last gave or confirmed the set served.
    answered: Option<Instant>,
    /// The next refresh from the chain, while the task sleeps.
    refresh_at: Option<Instant>,
    /// The source long-polled for a change, while the task long-polls.
    long_poll: Option<Arc<str>>,
    /// The first of the refreshes in a row that failed, the set served being the last
    /// good one.
    stale_since: Option<Instant>,
}

impl Entry {
    /// Publish an answer; watchers hear of it only if its endpoints differ. The same
    /// endpoints with other failures recorded replace the set silently, so resolves
    /// report what failed now. Whether watchers were told.
    fn publish(&self, set: EndpointSet) -> bool {
        let changed = self.state.send_if_modified(|current| {
            let changed = current.as_ref() != Some(&set);
            if changed || current.as_ref().is_none_or(|c| c.failures() != set.failures()) {
                let index = match current {
                    Some(current) if !changed => current.index(),
                    _ => NEXT_INDEX.fetch_add(1, Ordering::Relaxed),
                };
                let set = set.with_index(index);
                self.current.set.store(Some(set.shared()));
                // After the set: whoever sees the new version finds this set or a later one.
                self.current.version.fetch_add(1, Ordering::Release);
                *current = Some(set);
            }
            changed
        });
        if changed {
            metrics::count_watch_change();
        }
        changed
    }

    /// The set served was given (or confirmed) now; `next` is what the refresh task
    /// does next.
    fn answered(&self, next: &Next) {
        let now = Instant::now();
        let mut times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        times.answered = Some(now);
        times.stale_since = None;
        match next {
            Next::Sleep(delay) => {
                times.refresh_at = Some(now + *delay);
                times.long_poll = None;
            }
            Next::LongPoll { source, .. } => {
                times.refresh_at = None;
                times.long_poll = Some(source.name().clone());
            }
        }
    }

    /// A long-poll gave a new set, or said the set had not changed.
    fn confirmed(&self) {
        let mut times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        times.answered = Some(Instant::now());
        times.stale_since = None;
    }

    /// A refresh failed: the last good set stays, and the chain is asked again in
    /// `retry_in`.
    fn kept(&self, retry_in: Duration) {
        let now = Instant::now();
        let mut times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        times.stale_since.get_or_insert(now);
        times.refresh_at = Some(now + retry_in);
        times.long_poll = None;
    }

    /// The entry as an explanation reports it; `None` before its first answer.
    fn cache_state(&self) -> Option<CacheState> {
        if !self.live.load(Ordering::Acquire) {
            return None;
        }
        let set = self.state.borrow().clone()?;
        let now = Instant::now();
        let times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        Some(CacheState {
            set,
            age: times.answered.map_or(Duration::ZERO, |at| now - at),
            refresh_in: times.refresh_at.map(|at| at.saturating_duration_since(now)),
            long_poll: times.long_poll.as_deref().map(str::to_owned),
            stale_for: times.stale_since.map(|since| now - since),
        })
    }

    /// The provider whose answer is served now, if any.
    fn served(&self) -> Option<String> {
        self.state.borrow().as_ref()?.provider().map(str::to_owned)
    }

    /// Keep the set served now, recording what failed.
    fn keep_with_failures(&self, failures: &[ProviderError]) {
        // Cloned out first: `publish` takes the lock `borrow` holds.
        let served = self.state.borrow().clone();
        if let Some(set) = served {
            self.publish(set.with_failures(failures.to_vec()));
        }
    }
}

impl Cache {
    /// A cache over the chain in `chain`, with `settings`, timed by `clock`. Made
    /// inside a tokio runtime, its refresh loops run on that runtime, whichever
    /// runtime resolves; made outside one, on the runtime of the first resolve of each
    /// query.
    pub fn new(chain: Arc<ChainCell>, settings: Settings, clock: Clock) -> Cache {
        let long_polls = Arc::new(tokio::sync::Semaphore::new(settings.max_long_polls));
        Cache {
            inner: Arc::new(Inner {
                long_polls,
                chain,
                settings: ArcSwap::from_pointee(settings),
                entries: DashMap::new(),
                by_text: ArcSwap::default(),
                pending: Mutex::default(),
                index_copies: AtomicU64::new(0),
                shutdown: watch::channel(()).0,
                clock,
                recovery: Arc::default(),
                runtime: tokio::runtime::Handle::try_current().ok(),
            }),
        }
    }

    /// The runtime the cache runs its refresh loops on (the one it was made on).
    pub fn runtime(&self) -> Option<&tokio::runtime::Handle> {
        self.inner.runtime.as_ref()
    }

    /// The chain it answers from.
    pub fn chain(&self) -> &Arc<ChainCell> {
        &self.inner.chain
    }

    /// The clock it runs on.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<Settings> {
        self.inner.settings.load_full()
    }

    /// Apply new settings (after a reload): refresh loops read them on their next turn.
    pub fn set_settings(&self, settings: Settings) {
        self.inner.settings.store(Arc::new(settings));
        // Allowed schemes may have changed what a query text means.
        let mut pending = self.inner.pending.lock().expect("pending texts lock");
        pending.texts.clear();
        pending.gone = 0;
        self.inner.by_text.store(Arc::default());
    }

    /// Texts in the index now, and the copies of it made so far.
    #[cfg(test)]
    pub(crate) fn text_index(&self) -> (usize, u64) {
        (
            self.inner.by_text.load().len(),
            self.inner.index_copies.load(Ordering::Relaxed),
        )
    }

    /// Queries cached now.
    pub fn len(&self) -> usize {
        self.inner.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.inner.entries.is_empty()
    }
    /// Resolve a query such as `https+http://catalog` to endpoints.
    pub async fn resolve(&self, query: &str) -> Result<EndpointSet, Error> {
        // The hot path: a query seen before, answered from its entry without parsing.
        if let Some(entry) = self.inner.by_text.load().get(query)
            && entry.live.load(Ordering::Acquire)
            && let Some(set) = &*entry.current.set.load()
        {
            self.inner.touch(entry);
            let result = non_empty(&entry.key.service, EndpointSet::from_shared(Arc::clone(set)));
            count(result.is_ok(), true);
            return result;
        }
        // Boxed: the miss's future (the chain walk and its spans) would otherwise be
        // part of every resolve's future, hit or not, and a hit would pay to move it.
        let (result, cached) = Box::pin(self.resolve_text(query)).await;
        count(result.is_ok(), cached);
        result
    }

    /// [`Cache::resolve`] of a query text not indexed yet; whether its entry had a set.
    async fn resolve_text(&self, query: &str) -> (Result<EndpointSet, Error>, bool) {
        let parsed = match Query::parse(query) {
            Ok(parsed) => parsed,
            Err(e) => return (Err(e), false),
        };
        let entry = match self.inner.entry(&parsed) {
            Ok(entry) => entry,
            Err(e) => return (Err(e), false),
        };
        match self.inner.ready(&entry, false).await {
            Ok((set, cached)) => {
                self.inner.index_text(query, &entry);
                (non_empty(parsed.service(), set), cached)
            }
            Err(e) => (Err(e), false),
        }
    }

    /// Resolve an already parsed query.
    pub async fn resolve_query(&self, query: &Query) -> Result<EndpointSet, Error> {
        let result = async {
            // Found by its text, as `resolve(&str)` finds it, once answered: a
            // sidecar's every DNS question and HTTP call is a parsed query.
            let (entry, indexed) = match self.inner.indexed(query) {
                Some(entry) => {
                    self.inner.touch(&entry);
                    (entry, true)
                }
                None => (self.inner.entry(query)?, false),
            };
            let (set, cached) = match &*entry.current.set.load() {
                Some(set) => (EndpointSet::from_shared(Arc::clone(set)), true),
                // Boxed, as in `resolve`: a hit does not carry the miss's future.
                None => Box::pin(self.inner.ready(&entry, false)).await?,
            };
            if !indexed && query.filters().is_empty() {
                self.inner.index_text(query.as_str(), &entry);
            }
            Ok((non_empty(query.service(), set)?, cached))
        }
        .await;
        count(result.is_ok(), matches!(result, Ok((_, true))));
        result.map(|(set, _)| set)
    }

    /// Each cached service with the endpoints it is served (the largest set among its
    /// cached queries), for the `wasd_endpoints` gauge.
    pub fn endpoint_counts(&self) -> Vec<(String, usize)> {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for entry in self.inner.entries.iter() {
            let len = entry
                .current
                .set
                .load_full()
                .map_or(0, |set| EndpointSet::from_shared(set).len());
            let count = counts.entry(entry.key.service.clone()).or_default();
            *count = (*count).max(len);
        }
        counts.into_iter().collect()
    }

    /// Ask the providers now, bypassing (and not filling) the cache: what a cold
    /// resolve costs, or a diagnostic that must not be served from the cache.
    pub async fn resolve_uncached(&self, query: &Query) -> Result<EndpointSet, Error> {
        let source_query = source_query(query, self.inner.schemes_for(query)?);
        let chain = self.inner.chain.load();
        let span = tracing::debug_span!("resolve", service = %query.service(), uncached = true);
        let walk = chain
            .resolve(&source_query, query.filters(), None)
            .instrument(span);
        let result = match walk.await {
            Ok(answer) => Ok(answer.set),
            Err(failures) => Err(Error::NoEndpoints {
                service: query.service().to_owned(),
                failures,
            }),
        };
        count(result.is_ok(), false);
        result
    }

    /// The query's cache entry as it stands (its set, age, next refresh, staleness), if
    /// it is cached; the providers are not asked. What a DNS answer's TTL comes from.
    pub fn state(&self, query: &Query) -> Option<CacheState> {
        let entry = match self.inner.indexed(query) {
            Some(entry) => entry,
            None => {
                let key = Key::of(query, self.inner.schemes_for(query).ok()?);
                self.inner.entries.get(&key).map(|entry| entry.clone())?
            }
        };
        entry.cache_state()
    }

    /// Every cached query with its entry's state, in the order of the queries' text:
    /// what a sidecar's status page lists. A query still waiting for its first
    /// answer is left out. Queries that share an entry (`https://catalog/api` and
    /// `https://catalog`) appear once, as first written.
    pub fn states(&self) -> Vec<(Query, CacheState)> {
        let mut states: Vec<(Query, CacheState)> = self
            .inner
            .entries
            .iter()
            .filter_map(|entry| Some((entry.asked.clone(), entry.cache_state()?)))
            .collect();
        states.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        states
    }

    /// Explain a query's answer: a walk of the chain recorded step by step (see
    /// [`Explanation`]), with the state of the query's cache entry before it. The walk
    /// follows the rules a refresh of that entry would (past a failure, only the
    /// provider serving now may answer); it neither fills nor changes the cache.
    pub async fn explain(&self, query: &Query) -> Explanation {
        let allowed_schemes = self.inner.settings.load().allowed_schemes.clone();
        let mut explanation = Explanation {
            query: query.clone(),
            schemes: Vec::new(),
            allowed_schemes,
            cache: None,
            steps: Vec::new(),
            dropped: Vec::new(),
            result: Ok(EndpointSet::default()),
        };
        let schemes = match self.inner.schemes_for(query) {
            Ok(schemes) => schemes,
            Err(e) => {
                explanation.result = Err(e);
                return explanation;
            }
        };
        explanation.schemes.clone_from(&schemes);
        let asked = source_query(query, schemes.clone());
        let key = Key::of(query, schemes);
        let entry = self.inner.entries.get(&key).map(|entry| entry.clone());
        explanation.cache = entry.as_ref().and_then(|entry| entry.cache_state());
        let served = entry.as_ref().and_then(|entry| entry.served());
        let mut trace = Trace::default();
        let span = tracing::debug_span!("explain", service = %query.service());
        let walk = self
            .inner
            .chain
            .load()
            .explain(&asked, query.filters(), served.as_deref(), &mut trace)
            .instrument(span)
            .await;
        explanation.result = match walk {
            Ok(answer) => Ok(answer.set),
            Err(failures) => Err(Error::NoEndpoints {
                service: query.service().to_owned(),
                failures,
            }),
        };
        explanation.steps = trace.steps;
        explanation.dropped = trace.dropped;
        // The chain knows only the schemes it was given: one the query asked for, or
        // any for a query without schemes, was left out by allowed-schemes.
        for dropped in &mut explanation.dropped {
            if let DropReason::SchemeNotAsked { scheme } = &dropped.reason
                && (query.schemes().is_empty()
                    || query.schemes().iter().any(|s| s.eq_ignore_ascii_case(scheme)))
            {
                dropped.reason = DropReason::SchemeNotAllowed {
                    scheme: scheme.clone(),
                };
            }
        }
        explanation
    }

    /// Follow a query: the current endpoints, then every change. A query with no
    /// endpoints yet is watched too (its current set is empty).
    pub async fn watch(&self, query: &str) -> Result<Watch, Error> {
        self.watch_query(&Query::parse(query)?).await
    }

    /// Follow an already parsed query.
    pub async fn watch_query(&self, query: &Query) -> Result<Watch, Error> {
        Ok(self.watch_latest(query).await?.0)
    }

    /// A watch of `query` and a lock-free view of its current set, for a balancer that
    /// checks for a change on each pick (so it follows one at once, with no task).
    pub async fn watch_latest(&self, query: &Query) -> Result<(Watch, Latest), Error> {
        loop {
            let entry = self.inner.entry(query)?;
            let mut receiver = entry.state.subscribe();
            // Idle expiry removes an entry under the map's lock once nobody watches it;
            // if it did so between our lookup and our subscription, this entry is dead
            // (its watchers would never hear of a change): look it up again.
            if !self
                .inner
                .entries
                .get(&entry.key)
                .is_some_and(|current| Arc::ptr_eq(&current, &entry))
            {
                continue;
            }
            let ready = self.inner.ready(&entry, true).await;
            let retry =
                matches!(&ready, Err(Error::NoEndpoints { .. }) if !entry.live.load(Ordering::Acquire));
            if !retry {
                // A watch starts with a resolve (one that keeps an empty answer).
                count(ready.is_ok(), matches!(ready, Ok((_, true))));
            }
            match ready {
                Ok(_) => {
                    // The first answer is the current set, not a change.
                    receiver.borrow_and_update();
                    return Ok((Watch { receiver }, Latest(entry.current.clone())));
                }
                // A resolve that got there first failed and dropped the entry; a watch
                // keeps a query with no answer, so it runs the chain itself on a new
                // entry.
                Err(_) if retry => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Inner {
    /// The schemes a query accepts under the config's `allowed-schemes`.
    fn schemes_for(&self, query: &Query) -> Result<Vec<String>, Error> {
        let settings = self.settings.load();
        effective_schemes(query, &settings.allowed_schemes).ok_or_else(|| Error::SchemeNotAllowed {
            query: query.as_str().to_owned(),
            allowed: settings.allowed_schemes.clone(),
        })
    }

    fn entry(self: &Arc<Self>, query: &Query) -> Result<Arc<Entry>, Error> {
        let key = Key::of(query, self.schemes_for(query)?);
        let entry = match self.entries.get(&key) {
            Some(entry) => entry.clone(),
            None => self
                .entries
                .entry(key.clone())
                .or_insert_with(|| {
                    Arc::new(Entry {
                        asked: query.clone(),
                        query: source_query(query, key.schemes.clone()),
                        key,
                        state: watch::channel(None).0,
                        current: Arc::default(),
                        live: AtomicBool::new(true),
                        indexed: AtomicBool::new(false),
                        init: OnceCell::new(),
                        last_used_ms: AtomicU64::new(0),
                        times: Mutex::default(),
                    })
                })
                .clone(),
        };
        self.touch(&entry);
        Ok(entry)
    }

    /// The live entry indexed under the query's text (by `resolve(&str)`, or by
    /// `resolve_query` once answered), if any: found without building its key. A
    /// query with filters is never indexed under its text, which does not hold them.
    fn indexed(&self, query: &Query) -> Option<Arc<Entry>> {
        if !query.filters().is_empty() {
            return None;
        }
        let index = self.by_text.load();
        let entry = index.get(query.as_str())?;
        entry.live.load(Ordering::Acquire).then(|| Arc::clone(entry))
    }

    /// Mark an entry used. Written only when the second changes, so resolving the same
    /// query on every core does not bounce its cache line.
    fn touch(&self, entry: &Entry) {
        // The coarse clock: this runs on every cached resolve.
        let now = self.clock.coarse_now_ms();
        if now.saturating_sub(entry.last_used_ms.load(Ordering::Relaxed)) >= 1000 {
            entry.last_used_ms.store(now, Ordering::Relaxed);
        }
    }

    /// Remember `text` → `entry` for `resolve(&str)`.
    ///
    /// The index is copied on write, so one copy per new text would cost O(n²) while
    /// n texts arrive (a sidecar's first minute at 10 000 services: 50 M slot copies).
    /// New texts wait in `pending` instead, and go in together (`PendingTexts::due`):
    /// copies grow the index geometrically. A waiting text is answered the slow way meanwhile (parsed, its
    /// entry found by key); its own next resolve after the wait copies it in.
    fn index_text(&self, text: &str, entry: &Arc<Entry>) {
        let indexed = self.by_text.load();
        if indexed.len() >= MAX_TEXT_INDEX || indexed.contains_key(text) {
            return;
        }
        let now = self.clock.coarse_now_ms();
        let batch = {
            let mut pending = self.pending.lock().expect("pending texts lock");
            pending.arrive(now);
            // Weak: a text waiting here must not keep an idled-out entry (and the
            // watch senders it holds) alive.
            pending
                .texts
                .entry(text.into())
                .or_insert_with(|| Arc::downgrade(entry));
            pending.due(now, indexed.len())
        };
        drop(indexed);
        if let Some(batch) = batch {
            self.copy_index(&batch);
        }
    }

    /// Copy the text index without the entries that left the cache and with `batch`
    /// added (the only way the index changes, but for `set_settings`'s reset).
    fn copy_index(&self, batch: &HashMap<Arc<str>, Weak<Entry>, foldhash::fast::RandomState>) {
        self.by_text.rcu(|index| {
            let mut copy = HashMap::clone(index);
            copy.retain(|_, entry| entry.live.load(Ordering::Acquire));
            for (text, entry) in batch {
                if copy.len() >= MAX_TEXT_INDEX {
                    break;
                }
                if let Some(entry) = entry.upgrade()
                    && entry.live.load(Ordering::Acquire)
                {
                    entry.indexed.store(true, Ordering::Release);
                    copy.entry(text.clone()).or_insert(entry);
                }
            }
            self.index_copies.fetch_add(1, Ordering::Relaxed);
            Arc::new(copy)
        });
    }

    /// The entry leaves the cache: `resolve(&str)` stops serving it at once (it reads
    /// `live`), and the index lets go of it at its next copy. Those copies are batched
    /// as `index_text`'s are: thousands of entries idling out together would otherwise
    /// copy the index once each.
    fn unindex(&self, entry: &Arc<Entry>) {
        entry.live.store(false, Ordering::Release);
        // Most expiring entries were never indexed (parsed queries, watches).
        if !entry.indexed.load(Ordering::Acquire) {
            return;
        }
        let now = self.clock.coarse_now_ms();
        let len = self.by_text.load().len();
        let batch = {
            let mut pending = self.pending.lock().expect("pending texts lock");
            pending.arrive(now);
            pending.gone += 1;
            pending.due(now, len)
        };
        // Texts waiting to go in ride along.
        if let Some(batch) = batch {
            self.copy_index(&batch);
        }
    }

    /// The entry's current set, running the chain first if nobody has yet, and whether
    /// it was there already (a cache hit). With `keep_empty`, a query without endpoints
    /// stays cached (and refreshed) as an empty set instead of failing.
    async fn ready(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        keep_empty: bool,
    ) -> Result<(EndpointSet, bool), Error> {
        if let Some(set) = &*entry.current.set.load() {
            return Ok((EndpointSet::from_shared(Arc::clone(set)), true));
        }
        let init = entry
            .init
            .get_or_init(|| async {
                // Subscribed before the chain is read: a reload during this first
                // resolve wakes the refresh task at once.
                let wake = Wake {
                    shutdown: self.shutdown.subscribe(),
                    reload: self.chain.subscribe(),
                };
                let chain = self.chain.load();
                // A first resolve has no last good answer: a failure is the answer.
                // A miss: the span the providers' calls (and their imports) nest under.
                let span = tracing::debug_span!("resolve", service = %entry.key.service);
                let walk = chain
                    .resolve(&entry.query, &entry.key.filters, None)
                    .instrument(span);
                let (set, next) = match walk.await {
                    Ok(answer) => {
                        let next = self.next_after(&answer, &[]);
                        entry.answered(&next);
                        (answer.set, next)
                    }
                    // A watch of a failing query starts empty (recording why) and
                    // retries.
                    Err(failures) if keep_empty => {
                        entry.kept(REFRESH_BACKOFF.0);
                        (
                            EndpointSet::default().with_failures(failures),
                            Next::Sleep(REFRESH_BACKOFF.0),
                        )
                    }
                    Err(failures) => {
                        // Not cached: the next resolve makes a new entry and asks the
                        // providers again. Done here, once, by the run that failed.
                        if self
                            .entries
                            .remove_if(&entry.key, |_, e| Arc::ptr_eq(e, entry))
                            .is_some()
                        {
                            self.unindex(entry);
                        }
                        entry.live.store(false, Ordering::Release);
                        return Err(failures);
                    }
                };
                entry.publish(set);
                let refresh = refresh_loop(Arc::downgrade(self), entry.clone(), wake, next);
                match &self.runtime {
                    Some(runtime) => runtime.spawn(refresh),
                    None => tokio::spawn(refresh),
                };
                Ok(())
            })
            .await;
        if let Err(failures) = init {
            return Err(Error::NoEndpoints {
                service: entry.key.service.clone(),
                failures: failures.clone(),
            });
        }
        Ok((entry.state.borrow().clone().unwrap_or_default(), false))
    }

    fn next_refresh(&self, ttl: Option<Duration>) -> Duration {
        let period = self.settings.load().refresh_period;
        ttl.map_or(period, |ttl| ttl.min(period)).max(MIN_REFRESH)
    }

    /// After a clean answer: long-poll a source ahead of the one that answered that
    /// can push its first instances (its answer would win), else the answering source
    /// if it tagged its answer with a version, else refresh on the TTL.
    ///
    /// `followed`: the source whose answer was served, or that was long-polled, before
    /// this one. Only such a source is long-polled ahead of the one answering (it went
    /// empty: etcd whose one replica was replaced); a source ahead that simply never
    /// had the service is not, or every query behind an empty registry would hold a
    /// long-poll. The stand-in's own TTL still bounds the wait.
    fn next_after(&self, answer: &ChainAnswer, followed: &[Option<&str>]) -> Next {
        if let Some((source, version)) = &answer.pushing
            && followed.contains(&Some(&**source.name()))
        {
            return Next::LongPoll {
                source: source.clone(),
                version: version.clone(),
                until: Some(self.next_refresh(answer.ttl)),
            };
        }
        match &answer.version {
            Some(version) if answer.source.can_watch() => Next::LongPoll {
                source: answer.source.clone(),
                version: version.clone(),
                until: None,
            },
            _ => Next::Sleep(self.next_refresh(answer.ttl)),
        }
    }
}

/// What a refresh task does before it next asks the chain.
enum Next {
    Sleep(Duration),
    /// Long-poll this source for a change to the answer tagged `version`, until the
    /// next periodic chain run (or `until` after the last one, if sooner).
    LongPoll {
        source: Arc<dyn Source>,
        version: String,
        until: Option<Duration>,
    },
}

/// The outcome of one long-poll.
enum Polled {
    /// The source pushed a new non-empty answer; long-poll on from this version, or
    /// (none) go back to polling.
    Changed(Option<String>),
    /// Quiet, or the provider has nothing any more, or it failed: ask the chain.
    AskChain,
    Shutdown,
}

/// What wakes a refresh task early: the resolver going away, or a reload.
struct Wake {
    shutdown: watch::Receiver<()>,
    reload: watch::Receiver<u64>,
}

enum Woken {
    Shutdown,
    Reload,
}

impl Wake {
    async fn wait(&mut self) -> Woken {
        tokio::select! {
            _ = self.shutdown.changed() => Woken::Shutdown,
            changed = self.reload.changed() => match changed {
                Ok(()) => Woken::Reload,
                Err(_) => Woken::Shutdown,
            },
        }
    }
}

async fn long_poll_once(
    entry: &Entry,
    source: &Arc<dyn Source>,
    version: &str,
    wait: Duration,
    wake: &mut Wake,
    backoff: &mut Backoff,
    catchup: &mut Catchup,
) -> Polled {
    // A reload cancels the long-poll (and frees the old source): the chain decides anew.
    let result = tokio::select! {
        result = source
            .watch(&entry.query, version, wait)
            .instrument(tracing::debug_span!("long_poll", service = %entry.key.service)) => result,
        woken = wake.wait() => return match woken {
            Woken::Shutdown => Polled::Shutdown,
            Woken::Reload => Polled::AskChain,
        },
    };
    match result {
        Ok(Some(answer)) => {
            backoff.reset();
            catchup.answered(source.name(), &[]);
            let endpoints = select(answer.endpoints, &entry.query, &entry.key.filters);
            if endpoints.is_empty() {
                return Polled::AskChain;
            }
            entry.publish(EndpointSet::new(source.name().clone(), endpoints));
            entry.confirmed();
            Polled::Changed(answer.version)
        }
        Ok(None) => {
            entry.confirmed();
            backoff.reset();
            catchup.answered(source.name(), &[]);
            Polled::AskChain
        }
        Err(failure) => {
            // `unsupported`: the source stops offering long-polls (`can_watch`), and
            // the loop polls it on the TTL from now on.
            if !matches!(failure.kind, ProviderErrorKind::Unsupported(_)) {
                let failures = std::slice::from_ref(&failure);
                let delay = catchup.failed(failures, backoff.next_delay());
                warn_failing(entry, failures, delay, "serving the last good endpoints");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    () = catchup.recovered() => {}
                    woken = wake.wait() => if let Woken::Shutdown = woken {
                        return Polled::Shutdown;
                    },
                }
            }
            Polled::AskChain
        }
    }
}

/// Whether `entry` may long-poll now: a query somebody watches always may (the
/// application asked for it); the others hold one of `max_long_polls` permits, or may
/// not (`None`).
fn long_poll_turn(inner: &Inner, entry: &Entry) -> Option<Option<tokio::sync::OwnedSemaphorePermit>> {
    if entry.state.receiver_count() > 0 {
        return Some(None);
    }
    inner.long_polls.clone().try_acquire_owned().ok().map(Some)
}

/// Keeps one cached answer fresh until the resolver is dropped or the entry idles out.
async fn refresh_loop(inner: Weak<Inner>, entry: Arc<Entry>, mut wake: Wake, mut next: Next) {
    let mut backoff = refresh_backoff();
    // Failing long-polls back off on their own: a chain refresh that succeeds in
    // between (etcd answers ranges but a proxy cuts its streams) must not reset it.
    let mut long_poll_backoff = refresh_backoff();
    let mut last_chain = Instant::now();
    let mut quick_returns = 0;
    let mut last_long_poll: Option<Instant> = None;
    // The source long-polled last, if any: it stays followed while it has nothing
    // and a later source stands in.
    let mut long_polled: Option<Arc<str>> = None;
    let Some(mut catchup) = inner.upgrade().map(|i| Catchup::new(i.recovery.clone())) else {
        return;
    };
    loop {
        // Held through this turn's long-poll, if it is one.
        let mut _turn = None;
        if let Next::LongPoll { until, .. } = &next {
            let Some(inner) = inner.upgrade() else { return };
            match long_poll_turn(&inner, &entry) {
                Some(turn) => _turn = turn,
                // Past the cap: wait for the periodic refresh instead, as for a source
                // that cannot long-poll, and try for a turn after it.
                None => {
                    let period = inner.settings.load().refresh_period;
                    let period = until.map_or(period, |until| until.min(period));
                    next = Next::Sleep(period.saturating_sub(last_chain.elapsed()).max(MIN_REFRESH));
                }
            }
        }
        match next {
            Next::Sleep(delay) => {
                quick_returns = 0;
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    () = catchup.recovered() => {}
                    woken = wake.wait() => if let Woken::Shutdown = woken {
                        return;
                    },
                }
            }
            Next::LongPoll {
                source,
                version,
                until,
            } => {
                let Some(period) = inner.upgrade().map(|i| i.settings.load().refresh_period) else {
                    return;
                };
                let period = until.map_or(period, |until| until.min(period));
                long_polled = Some(source.name().clone());
                // A burst of quick returns goes straight through; past LONG_POLL_BURST in a
                // row, long-polls start at most one per LONG_POLL_GAP, whatever they
                // returned (a change, or "nothing changed" from a source that ignores
                // the wait), so a source that answers at once cannot spin. A reload
                // meanwhile sends us to the (new) chain instead.
                let pause = match last_long_poll {
                    Some(called) if quick_returns > LONG_POLL_BURST => {
                        LONG_POLL_GAP.saturating_sub(called.elapsed())
                    }
                    _ => Duration::ZERO,
                };
                let reloaded = !pause.is_zero()
                    && tokio::select! {
                        _ = tokio::time::sleep(pause) => false,
                        woken = wake.wait() => match woken {
                            Woken::Shutdown => return,
                            Woken::Reload => true,
                        },
                    };
                if !reloaded {
                    // Long-poll until the next periodic chain refresh is due.
                    let wait = period.saturating_sub(last_chain.elapsed()).max(MIN_REFRESH);
                    let called = Instant::now();
                    last_long_poll = Some(called);
                    let polled = long_poll_once(
                        &entry,
                        &source,
                        &version,
                        wait,
                        &mut wake,
                        &mut long_poll_backoff,
                        &mut catchup,
                    )
                    .await;
                    quick_returns = if called.elapsed() < LONG_POLL_GAP {
                        quick_returns + 1
                    } else {
                        0
                    };
                    match polled {
                        Polled::Changed(Some(version)) => {
                            let Some(inner) = inner.upgrade() else { return };
                            if expire_if_idle(&inner, &entry) {
                                return;
                            }
                            if last_chain.elapsed() < period {
                                next = Next::LongPoll {
                                    source,
                                    version,
                                    until,
                                };
                                continue;
                            }
                        }
                        Polled::Changed(None) | Polled::AskChain => {}
                        Polled::Shutdown => return,
                    }
                }
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        if expire_if_idle(&inner, &entry) {
            return;
        }
        last_chain = Instant::now();
        let chain = inner.chain.load();
        let served = entry.served();
        let span = tracing::debug_span!("refresh", service = %entry.key.service);
        match chain
            .resolve(&entry.query, &entry.key.filters, served.as_deref())
            .instrument(span)
            .await
        {
            Ok(answer) if answer.failures.is_empty() => {
                backoff.reset();
                catchup.answered(answer.source.name(), &[]);
                next = inner.next_after(&answer, &[served.as_deref(), long_polled.as_deref()]);
                refreshed(entry.publish(answer.set));
                entry.answered(&next);
            }
            // A source ahead failed, but the one serving now (or one ahead of it)
            // answered afresh: publish that, and look again soon for the failed one.
            Ok(answer) => {
                catchup.answered(answer.source.name(), &answer.failures);
                let delay = catchup.failed(&answer.failures, backoff.next_delay());
                warn_failing(
                    &entry,
                    &answer.failures,
                    delay,
                    "serving a fresh answer from a later provider",
                );
                next = Next::Sleep(delay);
                entry.publish(answer.set);
                entry.answered(&next);
                metrics::count_refresh(metrics::Refresh::Failed);
            }
            // Every source answered cleanly that the service is gone; look again
            // soon, then less often.
            Err(failures) if failures.is_empty() => {
                catchup.answered("", &[]);
                next = Next::Sleep(backoff.next_delay());
                refreshed(entry.publish(EndpointSet::default()));
                entry.answered(&next);
            }
            // Nothing may stand in for the failed source: its last good answer stays.
            Err(failures) => {
                catchup.answered("", &failures);
                let delay = catchup.failed(&failures, backoff.next_delay());
                warn_failing(&entry, &failures, delay, "serving the last good endpoints");
                entry.keep_with_failures(&failures);
                entry.kept(delay);
                next = Next::Sleep(delay);
                metrics::count_refresh(metrics::Refresh::Failed);
            }
        }
    }
}

/// Count a refresh that failed nowhere.
fn refreshed(changed: bool) {
    metrics::count_refresh(if changed {
        metrics::Refresh::Changed
    } else {
        metrics::Refresh::Unchanged
    });
}

/// A refresh loop's part in catching up after an outage (see [`Recovery`]): the
/// source it waits for, and what wakes it when that source answers again.
struct Catchup {
    recovery: Arc<Recovery>,
    /// Identifies this loop as a source's prober.
    ticket: Arc<()>,
    waiting_on: Option<String>,
    recovered: Option<Recovered>,
}

impl Catchup {
    fn new(recovery: Arc<Recovery>) -> Catchup {
        Catchup {
            recovery,
            ticket: Arc::new(()),
            waiting_on: None,
            recovered: None,
        }
    }

    /// A refresh failed (the first of `failures` is the source to wait for) and would
    /// back off for `delay`: the delay to use.
    fn failed(&mut self, failures: &[ProviderError], delay: Duration) -> Duration {
        let Some(first) = failures.first() else {
            return delay;
        };
        let (delay, recovered) = self.recovery.after_failure(&first.provider, &self.ticket, delay);
        self.waiting_on = Some(first.provider.clone());
        self.recovered = Some(recovered);
        delay
    }

    /// `source` answered (empty: none did, but all asked answered cleanly); `failures`
    /// are the sources that did not. The source this loop waited for, if it is not
    /// among them, answered again: everyone waiting for it is woken.
    fn answered(&mut self, source: &str, failures: &[ProviderError]) {
        if !source.is_empty() {
            self.recovery.answered(source);
        }
        if let Some(waited) = self
            .waiting_on
            .take_if(|w| !failures.iter().any(|f| f.provider == *w))
        {
            self.recovery.answered(&waited);
            self.recovered = None;
        }
    }

    /// Returns when the source this loop waits for answers again; never if none.
    async fn recovered(&mut self) {
        match &mut self.recovered {
            Some(recovered) => recovered.wait().await,
            None => std::future::pending().await,
        }
    }
}

/// Drop the entry if nobody has used or watched it for the idle timeout.
fn expire_if_idle(inner: &Inner, entry: &Arc<Entry>) -> bool {
    let idle = |inner: &Inner| {
        // The exact clock: a lagging one would keep an idle entry one refresh longer.
        let idle_ms = inner
            .clock
            .now_ms()
            .saturating_sub(entry.last_used_ms.load(Ordering::Relaxed));
        entry.state.receiver_count() == 0
            && Duration::from_millis(idle_ms) >= inner.settings.load().idle_timeout
    };
    // Checked again under the map's lock, so a resolve or watch that just found the
    // entry keeps it.
    let expired = idle(inner)
        && inner
            .entries
            .remove_if(&entry.key, |_, e| Arc::ptr_eq(e, entry) && idle(inner))
            .is_some();
    if expired {
        inner.unindex(entry);
    }
    expired
}

fn warn_failing(entry: &Entry, failures: &[ProviderError], retry_in: Duration, serving: &str) {
    tracing::warn!(
        service = %entry.key.service,
        ?retry_in,
        "refresh failed; {serving}: {}",
        failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    );
}

/// A stream of endpoint sets for one query, from [`Cache::watch`].
pub struct Watch {
    receiver: watch::Receiver<Option<EndpointSet>>,
}

/// An entry's current set, with a count of its replacements: a balancer asks on every
/// pick whether the set changed, and one atomic load answers that where an `ArcSwap`
/// guard would cost two locked instructions.
#[derive(Default)]
struct Current {
    set: ArcSwapOption<SetInner>,
    /// Raised after each store of `set`.
    version: AtomicU64,
}

/// A query's current set as the cache holds it (stored before watchers are woken).
/// Only the set's cell, not the entry: watches still end when the cache goes.
pub struct Latest(Arc<Current>);

impl Latest {
    /// The set as of now: one `ArcSwap` load, no lock.
    pub fn load(&self) -> arc_swap::Guard<Option<Arc<SetInner>>> {
        self.0.set.load()
    }

    /// The same, as an owned reference.
    pub fn load_full(&self) -> Option<Arc<SetInner>> {
        self.0.set.load_full()
    }

    /// How many times the set was replaced. Read it before [`Latest::load`]: a version
    /// seen is then never newer than the set loaded after it, so a change is never
    /// missed (at worst taken twice).
    pub fn version(&self) -> u64 {
        self.0.version.load(Ordering::Acquire)
    }
}

impl Watch {
    /// The current endpoints (empty when the service has none).
    pub fn current(&self) -> EndpointSet {
        self.receiver.borrow().clone().unwrap_or_default()
    }

    /// Wait for the next change and return the new set; `None` once the resolver is
    /// gone. Sets equal to the previous one are never reported.
    pub async fn changed(&mut self) -> Option<EndpointSet> {
        self.receiver.changed().await.ok()?;
        Some(self.receiver.borrow_and_update().clone().unwrap_or_default())
    }
}
