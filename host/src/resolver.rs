//! The public entry point: [`Resolver`], its builder, and [`Watch`].
//!
//! Answers are cached per normalised query. The first resolve of a query runs the
//! provider chain (concurrent first resolves share that one run); afterwards resolves
//! read the cache, and a background task per cached query refreshes it on the answer's
//! TTL (at most the refresh period), publishes changes to watchers, keeps the last good
//! answer when providers fail, and drops the entry once nobody has used it for the
//! idle timeout. When the answering provider can push changes (its answer carries a
//! version), the task long-polls the provider's `watch` instead of sleeping, so changes
//! arrive as they happen; a quiet watch still ends in a periodic refresh of the chain.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use dashmap::DashMap;
use tokio::sync::{OnceCell, watch};

use crate::bindings::Query as WitQuery;
use crate::chain::{ChainAnswer, ProviderChain, select};
use crate::config::Config;
use crate::endpoint::{EndpointSet, SetInner};
use crate::error::{ConfigError, Error, ProviderErrorKind};
use crate::provider::Provider;
use crate::query::{Query, effective_schemes};
use crate::registry::{DEFAULT_REGISTRATION_TTL, Registration, ServiceInstance};
use crate::reload::{self, ReloadError, ReloadReport, ReloadStatus, Reloading};
use crate::runtime::Runtime;
use crate::sandbox::ProviderStatus;

/// Shortest interval between two refreshes of one answer, whatever its TTL says.
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Most query texts remembered for `resolve(&str)`'s fast path.
const MAX_TEXT_INDEX: usize = 16_384;

// Shared keys: each new text copies the map (copy-on-write), which then costs two
// reference counts per text rather than an allocation.
type TextIndex = HashMap<Arc<str>, Arc<Entry>, foldhash::fast::RandomState>;

/// A resolve's answer: an empty set (the service is gone) is `NoEndpoints`.
fn non_empty(service: &str, set: EndpointSet) -> Result<EndpointSet, Error> {
    if set.is_empty() {
        return Err(Error::NoEndpoints {
            service: service.to_owned(),
            failures: Vec::new(),
        });
    }
    Ok(set)
}

/// Least time between the starts of two watch calls of one entry, once more than
/// `WATCH_BURST` calls in a row have returned sooner.
const WATCH_GAP: Duration = Duration::from_millis(100);
const WATCH_BURST: u32 = 10;
/// Retry back-off after a failed refresh: doubles from the first to the second.
const BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// Resolves service queries through the configured provider chain.
///
/// Cheap to clone; all clones share the cache and the providers. Dropping the last
/// clone stops the background refreshes and ends every [`Watch`].
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) chain: ArcSwap<ProviderChain>,
    /// The config settings a reload may change (everything but the providers).
    settings: ArcSwap<Settings>,
    entries: DashMap<Key, Arc<Entry>>,
    /// Query text → entry, for `resolve(&str)`: a hit skips parsing and key building.
    /// Read-mostly and copied on write, so reads from every core never contend.
    by_text: ArcSwap<TextIndex>,
    /// Dropped with `Inner`: wakes every refresh task so it can exit at once.
    pub(crate) shutdown: watch::Sender<()>,
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) loader: ConfigLoader,
    pub(crate) reloading: Reloading,
}

/// Host settings that take effect on reload. (DNS servers and the cache folder are
/// read at start only.)
struct Settings {
    allowed_schemes: Vec<String>,
    refresh_period: Duration,
    idle_timeout: Duration,
    /// The provider named by the config's `registrar`, if any.
    registrar: Option<String>,
}

impl Settings {
    fn of(config: &Config) -> Settings {
        Settings {
            allowed_schemes: config.allowed_schemes.clone(),
            refresh_period: config.refresh_period,
            idle_timeout: config.idle_timeout,
            registrar: config.registrar.clone(),
        }
    }
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

struct Entry {
    key: Key,
    query: WitQuery,
    /// `None` until the first answer; an empty set once the service has disappeared.
    state: watch::Sender<Option<EndpointSet>>,
    /// The same set as `state`, for the read path: an `ArcSwap` load takes no lock.
    /// Shared with balancers ([`Latest`]) without sharing the entry, whose sender must
    /// go with the resolver so that watches end.
    current: Arc<ArcSwapOption<SetInner>>,
    /// Cleared when the entry leaves the cache (idle), so `by_text` never serves it.
    live: AtomicBool,
    init: OnceCell<()>,
    last_used_ms: AtomicU64,
}

impl Entry {
    fn has_endpoints(&self) -> bool {
        self.state.borrow().as_ref().is_some_and(|set| !set.is_empty())
    }

    /// Publish an answer; watchers hear of it only if it differs.
    fn publish(&self, set: EndpointSet) {
        self.state.send_if_modified(|current| {
            if current.as_ref() == Some(&set) {
                return false;
            }
            self.current.store(Some(set.shared()));
            *current = Some(set);
            true
        });
    }
}

/// Where the builder takes its configuration from.
#[derive(Clone)]
enum ConfigSource {
    Discover,
    File(PathBuf),
    Toml(String),
    Value(Box<Config>),
}

/// Reads the configuration the same way at start and on every reload.
#[derive(Clone)]
pub(crate) struct ConfigLoader {
    source: ConfigSource,
    plugin_dir: Option<Option<PathBuf>>,
    cache_dir: Option<Option<PathBuf>>,
}

impl ConfigLoader {
    pub fn load(&self) -> Result<Config, Error> {
        let mut config = match &self.source {
            ConfigSource::Discover => Config::discover()?,
            ConfigSource::File(path) => Config::from_file(path)?,
            ConfigSource::Toml(text) => {
                let cwd = std::env::current_dir().map_err(|e| ConfigError {
                    path: None,
                    line: None,
                    column: None,
                    message: format!("cannot read the current folder: {e}"),
                })?;
                Config::from_toml(text, &cwd)?
            }
            ConfigSource::Value(config) => (**config).clone(),
        };
        if let Some(dir) = &self.plugin_dir {
            config.set_plugin_dir(dir.clone());
        }
        if let Some(dir) = &self.cache_dir {
            config.set_cache_dir(dir.clone());
        }
        Ok(config)
    }

    /// The config file, when it is one.
    pub fn path(&self) -> Option<&std::path::Path> {
        match &self.source {
            ConfigSource::File(path) => Some(path),
            _ => None,
        }
    }
}

/// Builds a [`Resolver`]. Created by [`Resolver::builder`].
pub struct ResolverBuilder {
    loader: ConfigLoader,
    watch_files: bool,
}

impl ResolverBuilder {
    /// Read the configuration from this TOML file.
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.loader.source = ConfigSource::File(path.into());
        self
    }

    /// Use this TOML text as the configuration (relative paths: the current folder).
    pub fn config_toml(mut self, toml: impl Into<String>) -> Self {
        self.loader.source = ConfigSource::Toml(toml.into());
        self
    }

    /// Use an already loaded configuration.
    pub fn config(mut self, config: Config) -> Self {
        self.loader.source = ConfigSource::Value(Box::new(config));
        self
    }

    /// Load unlisted provider modules from this folder (`None`: no plugin folder).
    pub fn plugin_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.loader.plugin_dir = Some(dir);
        self
    }

    /// Keep precompiled components in this folder (`None`: compile on every start).
    pub fn cache_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.loader.cache_dir = Some(dir);
        self
    }

    /// Watch the config file, the plugin folder and the providers' granted files, and
    /// reload on change (default: on). Off, [`Resolver::reload`] still reloads.
    pub fn watch_files(mut self, on: bool) -> Self {
        self.watch_files = on;
        self
    }

    /// The configuration this builder would use.
    pub fn load_config(&self) -> Result<Config, Error> {
        self.loader.load()
    }

    /// Load every provider (compiling or loading precompiled components, and calling
    /// each provider's `configure`) and start the resolver. Must run inside a tokio
    /// runtime.
    pub async fn build(self) -> Result<Resolver, Error> {
        let config = self.load_config()?;
        let runtime = Runtime::new(config.cache_dir.clone(), config.dns.clone())
            .map_err(|e| Error::Engine(format!("{e:#}")))?;
        let (chain, skipped) = ProviderChain::load(&runtime, &config).await?;
        let errors = skipped
            .into_iter()
            .map(|(spec, e)| ReloadError {
                provider: spec.name,
                source: spec.module.to_string(),
                reason: match e {
                    Error::Load { reason, .. } => reason,
                    other => other.to_string(),
                },
            })
            .collect();
        let inner = Arc::new(Inner {
            reloading: Reloading::new(errors),
            chain: ArcSwap::from_pointee(chain),
            settings: ArcSwap::from_pointee(Settings::of(&config)),
            entries: DashMap::new(),
            by_text: ArcSwap::default(),
            shutdown: watch::channel(()).0,
            runtime,
            loader: self.loader,
        });
        if self.watch_files {
            reload::start(&inner, &config)?;
        }
        Ok(Resolver { inner })
    }
}

impl Resolver {
    /// A builder that, unless told otherwise, finds its configuration the way the CLI
    /// does ([`Config::discover`]).
    pub fn builder() -> ResolverBuilder {
        ResolverBuilder {
            loader: ConfigLoader {
                source: ConfigSource::Discover,
                plugin_dir: None,
                cache_dir: None,
            },
            watch_files: true,
        }
    }

    /// The names of the providers in the chain, in the order they are asked.
    pub fn providers(&self) -> Vec<String> {
        self.inner.chain.load().names().map(str::to_owned).collect()
    }

    /// The wasmtime runtime, for modules that share its clock.
    pub(crate) fn runtime(&self) -> &Arc<Runtime> {
        &self.inner.runtime
    }

    /// Reload now, as a change to a watched file does: read the config and every
    /// provider's module and files, load what changed (off the resolve path), and swap
    /// the new chain in. What fails to load keeps its previous version serving.
    pub async fn reload(&self) -> ReloadReport {
        reload::reload(&self.inner).await
    }

    /// Each provider's faults and quarantine, in chain order.
    pub fn provider_status(&self) -> Vec<ProviderStatus> {
        self.inner
            .chain
            .load()
            .providers()
            .iter()
            .map(|p| p.status())
            .collect()
    }

    /// Where reloading stands: the generation, the providers serving, and what failed
    /// in the last reload.
    pub fn reload_status(&self) -> ReloadStatus {
        self.inner.reloading.status(&self.inner.chain.load())
    }

    /// Every reload's report, as it happens.
    pub fn reload_events(&self) -> tokio::sync::broadcast::Receiver<ReloadReport> {
        self.inner.reloading.events.subscribe()
    }

    /// Resolve a query such as `https+http://catalog` to endpoints.
    pub async fn resolve(&self, query: &str) -> Result<EndpointSet, Error> {
        // The hot path: a query seen before, answered from its entry without parsing.
        if let Some(entry) = self.inner.by_text.load().get(query)
            && entry.live.load(Ordering::Acquire)
            && let Some(set) = &*entry.current.load()
        {
            self.inner.touch(entry);
            return non_empty(&entry.key.service, EndpointSet::from_shared(Arc::clone(set)));
        }
        let parsed = Query::parse(query)?;
        let entry = self.inner.entry(&parsed)?;
        let set = self.inner.ready(&entry, false).await;
        if set.is_ok() {
            self.inner.index_text(query, &entry);
        }
        non_empty(parsed.service(), set?)
    }

    /// Resolve an already parsed query.
    pub async fn resolve_query(&self, query: &Query) -> Result<EndpointSet, Error> {
        let entry = self.inner.entry(query)?;
        let set = self.inner.ready(&entry, false).await?;
        non_empty(query.service(), set)
    }

    /// Ask the providers now, bypassing (and not filling) the cache: what a cold
    /// resolve costs, or a diagnostic that must not be served from the cache.
    pub async fn resolve_uncached(&self, query: &Query) -> Result<EndpointSet, Error> {
        let schemes = self.inner.schemes_for(query)?;
        let wit = WitQuery {
            service: query.service().to_owned(),
            endpoint_name: query.endpoint_name().map(str::to_owned),
            schemes,
            port: query.port(),
        };
        let chain = self.inner.chain.load_full();
        match chain.resolve(&wit, query.filters()).await {
            Ok(answer) => Ok(answer.set),
            Err(failures) => Err(Error::NoEndpoints {
                service: query.service().to_owned(),
                failures,
            }),
        }
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
    pub(crate) async fn watch_latest(&self, query: &Query) -> Result<(Watch, Latest), Error> {
        let entry = self.inner.entry(query)?;
        let mut receiver = entry.state.subscribe();
        self.inner.ready(&entry, true).await?;
        // The first answer is the current set, not a change.
        receiver.borrow_and_update();
        Ok((Watch { receiver }, Latest(entry.current.clone())))
    }
}

impl Resolver {
    /// Register a service instance with the configured registrar (the config's
    /// `registrar`, or the first provider that can), under a lease of
    /// [`DEFAULT_REGISTRATION_TTL`]. Returns at once: the registration keeps trying
    /// in the background until it succeeds (see [`Registration::registered`]).
    pub async fn register(&self, instance: ServiceInstance) -> Result<Registration, Error> {
        self.register_with_ttl(instance, DEFAULT_REGISTRATION_TTL).await
    }

    /// Register under a lease of `ttl` (kept alive every `ttl / 3`).
    pub async fn register_with_ttl(
        &self,
        instance: ServiceInstance,
        ttl: Duration,
    ) -> Result<Registration, Error> {
        let provider = self.registrar()?;
        let inner = Arc::downgrade(&self.inner);
        let current = Arc::new(move || {
            let inner = inner.upgrade()?;
            Resolver { inner }.registrar().ok()
        });
        Registration::start(provider, current, instance, ttl)
    }

    /// Delete an instance from the registry without a [`Registration`] (one made by
    /// another process, say). A live `Registration` is ended with its own
    /// [`Registration::deregister`].
    pub async fn deregister(&self, instance: &ServiceInstance) -> Result<(), Error> {
        let provider = self.registrar()?;
        provider
            .deregister(&instance.to_guest(), None)
            .await
            .map_err(Error::Deregister)
    }

    fn registrar(&self) -> Result<Arc<Provider>, Error> {
        let chain = self.inner.chain.load();
        let settings = self.inner.settings.load();
        let name = settings.registrar.as_deref();
        match chain.registrar(name) {
            Some(p) if p.is_registrar() => Ok(p),
            Some(p) => Err(Error::NoRegistrar(format!(
                "provider '{}' does not export wasd:provider/registrar",
                p.name
            ))),
            None => Err(Error::NoRegistrar(
                "no provider in the chain exports wasd:provider/registrar (configure the etcd provider)"
                    .into(),
            )),
        }
    }
}

impl Inner {
    pub(crate) fn apply_settings(&self, config: &Config) {
        self.settings.store(Arc::new(Settings::of(config)));
        // Allowed schemes may have changed what a query text means.
        self.by_text.store(Arc::default());
    }

    /// The schemes a query accepts under the config's `allowed-schemes`.
    fn schemes_for(&self, query: &Query) -> Result<Vec<String>, Error> {
        let settings = self.settings.load();
        effective_schemes(query, &settings.allowed_schemes).ok_or_else(|| Error::SchemeNotAllowed {
            query: query.as_str().to_owned(),
            allowed: settings.allowed_schemes.clone(),
        })
    }

    fn entry(self: &Arc<Self>, query: &Query) -> Result<Arc<Entry>, Error> {
        let schemes = self.schemes_for(query)?;
        let key = Key {
            service: query.service().to_owned(),
            endpoint_name: query.endpoint_name().map(str::to_owned),
            schemes,
            port: query.port(),
            filters: query.filters().to_vec(),
        };
        let entry = match self.entries.get(&key) {
            Some(entry) => entry.clone(),
            None => self
                .entries
                .entry(key.clone())
                .or_insert_with(|| {
                    Arc::new(Entry {
                        query: WitQuery {
                            service: key.service.clone(),
                            endpoint_name: key.endpoint_name.clone(),
                            schemes: key.schemes.clone(),
                            port: key.port,
                        },
                        key,
                        state: watch::channel(None).0,
                        current: Arc::new(ArcSwapOption::empty()),
                        live: AtomicBool::new(true),
                        init: OnceCell::new(),
                        last_used_ms: AtomicU64::new(0),
                    })
                })
                .clone(),
        };
        self.touch(&entry);
        Ok(entry)
    }

    /// Mark an entry used. Written only when the second changes, so resolving the same
    /// query on every core does not bounce its cache line.
    fn touch(&self, entry: &Entry) {
        // The coarse clock: this runs on every cached resolve.
        let now = self.runtime.coarse_now_ms();
        if now.saturating_sub(entry.last_used_ms.load(Ordering::Relaxed)) >= 1000 {
            entry.last_used_ms.store(now, Ordering::Relaxed);
        }
    }

    /// Remember `text` → `entry` for `resolve(&str)`.
    fn index_text(&self, text: &str, entry: &Arc<Entry>) {
        self.by_text.rcu(|index| {
            if index.len() >= MAX_TEXT_INDEX
                || index.contains_key(text)
                || !entry.live.load(Ordering::Acquire)
            {
                return Arc::clone(index);
            }
            let mut copy = HashMap::clone(index);
            copy.insert(text.into(), entry.clone());
            Arc::new(copy)
        });
    }

    fn unindex(&self, entry: &Arc<Entry>) {
        entry.live.store(false, Ordering::Release);
        self.by_text.rcu(|index| {
            // Most expiring entries were never indexed (parsed queries, watches).
            if !index.values().any(|e| Arc::ptr_eq(e, entry)) {
                return Arc::clone(index);
            }
            let mut copy = HashMap::clone(index);
            copy.retain(|_, e| !Arc::ptr_eq(e, entry));
            Arc::new(copy)
        });
    }

    /// The entry's current set, running the chain first if nobody has yet. With
    /// `keep_empty`, a query without endpoints stays cached (and refreshed) as an
    /// empty set instead of failing.
    async fn ready(self: &Arc<Self>, entry: &Arc<Entry>, keep_empty: bool) -> Result<EndpointSet, Error> {
        if let Some(set) = &*entry.current.load() {
            return Ok(EndpointSet::from_shared(Arc::clone(set)));
        }
        let init = entry
            .init
            .get_or_try_init(|| async {
                // Subscribed before the chain is read: a reload during this first
                // resolve wakes the refresh task at once.
                let wake = Wake {
                    shutdown: self.shutdown.subscribe(),
                    reload: self.reloading.generation.subscribe(),
                };
                let chain = self.chain.load_full();
                let (set, next) = match chain.resolve(&entry.query, &entry.key.filters).await {
                    Ok(answer) if !answer.failures.is_empty() => (answer.set, Next::Sleep(BACKOFF.0)),
                    Ok(answer) => {
                        let next = self.next_after(&answer);
                        (answer.set, next)
                    }
                    Err(_) if keep_empty => (EndpointSet::default(), Next::Sleep(BACKOFF.0)),
                    Err(failures) => {
                        return Err(Error::NoEndpoints {
                            service: entry.key.service.clone(),
                            failures,
                        });
                    }
                };
                entry.publish(set);
                tokio::spawn(refresh_loop(Arc::downgrade(self), entry.clone(), wake, next));
                Ok(())
            })
            .await;
        if let Err(e) = init {
            // Not cached: the next resolve asks the providers again.
            if self
                .entries
                .remove_if(&entry.key, |_, e| Arc::ptr_eq(e, entry))
                .is_some()
            {
                self.unindex(entry);
            }
            return Err(e);
        }
        Ok(entry.state.borrow().clone().unwrap_or_default())
    }

    fn next_refresh(&self, ttl: Option<Duration>) -> Duration {
        let period = self.settings.load().refresh_period;
        ttl.map_or(period, |ttl| ttl.min(period)).max(MIN_REFRESH)
    }

    /// After a clean answer: watch the provider if it tagged the answer with a
    /// version, else refresh on the TTL.
    fn next_after(&self, answer: &ChainAnswer) -> Next {
        match &answer.version {
            Some(version) if answer.provider.can_watch() => Next::Watch {
                provider: answer.provider.clone(),
                version: version.clone(),
            },
            _ => Next::Sleep(self.next_refresh(answer.ttl)),
        }
    }
}

/// What a refresh task does before it next asks the chain.
enum Next {
    Sleep(Duration),
    /// Long-poll this provider for a change to the answer tagged `version`.
    Watch {
        provider: Arc<Provider>,
        version: String,
    },
}

/// The outcome of one watch call.
enum Watched {
    /// The provider pushed a new non-empty answer; watch on from this version, or
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

async fn watch_once(
    entry: &Entry,
    provider: &Arc<Provider>,
    version: &str,
    wait: Duration,
    wake: &mut Wake,
    backoff: &mut Duration,
) -> Watched {
    // A reload cancels the watch (and frees the old provider): the chain decides anew.
    let result = tokio::select! {
        result = provider.watch(&entry.query, version, wait) => result,
        woken = wake.wait() => return match woken {
            Woken::Shutdown => Watched::Shutdown,
            Woken::Reload => Watched::AskChain,
        },
    };
    match result {
        Ok(Some(answer)) => {
            *backoff = BACKOFF.0;
            let endpoints = select(answer.endpoints, &entry.query, &entry.key.filters);
            if endpoints.is_empty() {
                return Watched::AskChain;
            }
            entry.publish(EndpointSet::new(provider.name.clone(), endpoints));
            Watched::Changed(answer.version)
        }
        Ok(None) => {
            *backoff = BACKOFF.0;
            Watched::AskChain
        }
        Err(failure) => {
            if matches!(failure.kind, ProviderErrorKind::Unsupported(_)) {
                provider.set_cannot_watch();
            } else {
                warn_keeping(entry, std::slice::from_ref(&failure), *backoff);
                tokio::select! {
                    _ = tokio::time::sleep(*backoff) => {}
                    woken = wake.wait() => if let Woken::Shutdown = woken {
                        return Watched::Shutdown;
                    },
                }
                *backoff = (*backoff * 2).min(BACKOFF.1);
            }
            Watched::AskChain
        }
    }
}

/// Keeps one cached answer fresh until the resolver is dropped or the entry idles out.
async fn refresh_loop(inner: Weak<Inner>, entry: Arc<Entry>, mut wake: Wake, mut next: Next) {
    let mut backoff = BACKOFF.0;
    // Failing watches back off on their own: a chain refresh that succeeds in between
    // (etcd answers ranges but a proxy cuts its streams) must not reset it.
    let mut watch_backoff = BACKOFF.0;
    let mut last_chain = Instant::now();
    let mut quick_returns = 0;
    loop {
        match next {
            Next::Sleep(delay) => {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    woken = wake.wait() => if let Woken::Shutdown = woken {
                        return;
                    },
                }
            }
            Next::Watch { provider, version } => {
                let Some(period) = inner.upgrade().map(|i| i.settings.load().refresh_period) else {
                    return;
                };
                // Watch until the next periodic chain refresh is due.
                let wait = period.saturating_sub(last_chain.elapsed()).max(MIN_REFRESH);
                let called = Instant::now();
                match watch_once(&entry, &provider, &version, wait, &mut wake, &mut watch_backoff).await {
                    Watched::Changed(Some(version)) => {
                        let Some(inner) = inner.upgrade() else { return };
                        if expire_if_idle(&inner, &entry) {
                            return;
                        }
                        if last_chain.elapsed() < period {
                            // A burst of changes goes straight through; past
                            // WATCH_BURST quick returns in a row, calls are paced, so a
                            // provider that answers at once cannot spin. A reload
                            // meanwhile sends us to the (new) chain instead.
                            quick_returns = if called.elapsed() < WATCH_GAP {
                                quick_returns + 1
                            } else {
                                0
                            };
                            let pause = if quick_returns > WATCH_BURST {
                                WATCH_GAP.saturating_sub(called.elapsed())
                            } else {
                                Duration::ZERO
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
                                next = Next::Watch { provider, version };
                                continue;
                            }
                        }
                    }
                    Watched::Changed(None) | Watched::AskChain => {}
                    Watched::Shutdown => return,
                }
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        if expire_if_idle(&inner, &entry) {
            return;
        }
        last_chain = Instant::now();
        let chain = inner.chain.load_full();
        match chain.resolve(&entry.query, &entry.key.filters).await {
            // A provider ahead of the one that answered failed (etcd down, pass-through
            // answering instead): its last answer still stands.
            Ok(answer) if !answer.failures.is_empty() && entry.has_endpoints() => {
                warn_keeping(&entry, &answer.failures, backoff);
                next = Next::Sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF.1);
            }
            Ok(answer) => {
                next = if answer.failures.is_empty() {
                    backoff = BACKOFF.0;
                    inner.next_after(&answer)
                } else {
                    Next::Sleep(backoff)
                };
                entry.publish(answer.set);
            }
            // Every provider answered cleanly that the service is gone; look again
            // soon, then less often.
            Err(failures) if failures.is_empty() => {
                next = Next::Sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF.1);
                entry.publish(EndpointSet::default());
            }
            Err(failures) => {
                warn_keeping(&entry, &failures, backoff);
                next = Next::Sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF.1);
            }
        }
    }
}

/// Drop the entry if nobody has used or watched it for the idle timeout.
fn expire_if_idle(inner: &Inner, entry: &Arc<Entry>) -> bool {
    let idle = |inner: &Inner| {
        // The exact clock: a lagging one would keep an idle entry one refresh longer.
        let idle_ms = inner
            .runtime
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

fn warn_keeping(entry: &Entry, failures: &[crate::ProviderError], retry_in: Duration) {
    tracing::warn!(
        service = %entry.key.service,
        ?retry_in,
        "refresh failed; serving the last good endpoints: {}",
        failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    );
}

/// A stream of endpoint sets for one query, from [`Resolver::watch`].
pub struct Watch {
    receiver: watch::Receiver<Option<EndpointSet>>,
}

/// A query's current set as the cache holds it (stored before watchers are woken).
/// Only the set's cell, not the entry: watches still end when the resolver goes.
pub(crate) struct Latest(Arc<ArcSwapOption<SetInner>>);

impl Latest {
    /// The set as of now: one `ArcSwap` load, no lock.
    pub(crate) fn load(&self) -> arc_swap::Guard<Option<Arc<SetInner>>> {
        self.0.load()
    }

    /// The same, as an owned reference.
    pub(crate) fn load_full(&self) -> Option<Arc<SetInner>> {
        self.0.load_full()
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
