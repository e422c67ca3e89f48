//! The public entry point: [`Resolver`] and its builder. It puts the pieces together —
//! the configuration, the sandboxed providers (`wasd-sandbox`), the discovery core's
//! cache and reloader (`wasd-core`), and the file watcher — and adds nothing of its own
//! to a query's path.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::watch;
use tracing::Instrument;
use wasd_core::{
    Cache, CacheState, ChainCell, Clock, ConfigError, DEFAULT_REGISTRATION_TTL, EndpointSet, Error,
    Explanation, Latest, Planned, ProviderStatus, Query, Registration, ReloadError, ReloadReport,
    ReloadStatus, Reloader, ServiceInstance, Settings, Source, Watch,
};
use wasd_sandbox::{ModuleSource, Prepared, Provider, Runtime};

use crate::balance::Balancing;
use crate::chain::{MODULE_MISSING, chain_specs, load_chain, reload_error};
use crate::config::Config;
use crate::files::FileWatcher;

/// Resolves service queries through the configured provider chain.
///
/// Cheap to clone; all clones share the cache and the providers. Dropping the last
/// clone stops the background refreshes and ends every [`Watch`].
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) cache: Cache,
    /// The balancers' health table and the configured policies.
    balancing: Arc<Balancing>,
    reloader: Reloader,
    runtime: Arc<Runtime>,
    loader: ConfigLoader,
    /// The provider named by the config's `registrar`, if any.
    registrar: ArcSwapOption<String>,
    /// Serialises reloads from reading the config to applying its settings.
    reloading: tokio::sync::Mutex<()>,
    watcher: Mutex<Option<FileWatcher>>,
    /// Dropped with `Inner`: ends the file watcher's task.
    shutdown: watch::Sender<()>,
}

/// The cache settings a config asks for.
fn settings_of(config: &Config) -> Settings {
    Settings::default()
        .with_allowed_schemes(config.allowed_schemes.clone())
        .with_refresh_period(config.refresh_period)
        .with_idle_timeout(config.idle_timeout)
        .with_max_long_polls(config.max_watches)
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
    pub(crate) fn load(&self) -> Result<Config, Error> {
        let mut config = match &self.source {
            ConfigSource::Discover => Config::discover()?,
            ConfigSource::File(path) => Config::from_file(path)?,
            ConfigSource::Toml(text) => {
                let cwd = std::env::current_dir()
                    .map_err(|e| ConfigError::new(None, format!("cannot read the current folder: {e}")))?;
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
        // The process's zone: the environment over the config file, so that one file
        // serves a fleet whose hosts each say where they are.
        if let Some(zone) = std::env::var("WASD_ZONE").ok().filter(|z| !z.trim().is_empty()) {
            config.policies.zone = Some(zone.trim().to_owned());
        }
        Ok(config)
    }

    /// The config file, when it is one.
    pub(crate) fn path(&self) -> Option<&Path> {
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
    environment: Option<Vec<(String, String)>>,
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

    /// Give providers their granted environment variables from `vars` instead of the
    /// process environment (grants still apply: a provider sees only the variables its
    /// `grants.env` names).
    pub fn environment(
        mut self,
        vars: impl IntoIterator<Item = (impl Into<String>, impl Into<String>)>,
    ) -> Self {
        self.environment = Some(vars.into_iter().map(|(k, v)| (k.into(), v.into())).collect());
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
        let clock = Clock::ticked();
        let runtime = Runtime::new(
            config.cache_dir.clone(),
            config.dns.clone(),
            clock.clone(),
            self.environment,
        )?;
        let (chain, skipped) = load_chain(&runtime, &config, self.watch_files).await?;
        let waiting_for_files = !skipped.is_empty();
        let cell = Arc::new(ChainCell::new(chain));
        let cache = Cache::new(cell.clone(), settings_of(&config), clock.clone());
        let balancing = Arc::new(Balancing::new(
            clock,
            cache.runtime().cloned(),
            config.policies.clone(),
        ));
        let inner = Arc::new(Inner {
            cache,
            balancing,
            reloader: Reloader::new(cell, skipped),
            runtime,
            loader: self.loader,
            registrar: ArcSwapOption::from_pointee(config.registrar.clone()),
            reloading: tokio::sync::Mutex::new(()),
            watcher: Mutex::new(None),
            shutdown: watch::channel(()).0,
        });
        crate::observe::spawn_reporter(Arc::downgrade(&inner), config.metrics_max_services);
        if self.watch_files {
            let mut watcher = crate::files::start(Arc::downgrade(&inner), inner.shutdown.subscribe())?;
            watcher.watch(&config);
            *inner.watcher.lock().expect("watcher lock") = Some(watcher);
            // A module that appeared while the chain was loading (before the watcher
            // was armed) sent no event: look once more.
            if waiting_for_files {
                let inner = inner.clone();
                tokio::spawn(async move { inner.reload().await });
            }
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
            environment: None,
        }
    }

    /// The names of the providers in the chain, in the order they are asked.
    pub fn providers(&self) -> Vec<String> {
        self.inner
            .cache
            .chain()
            .load()
            .names()
            .map(str::to_owned)
            .collect()
    }

    /// What the resolver's balancers share: the health table and the policies.
    pub(crate) fn balancing(&self) -> &Arc<Balancing> {
        &self.inner.balancing
    }

    /// Reload now, as a change to a watched file does: read the config and every
    /// provider's module and files, load what changed (off the resolve path), and swap
    /// the new chain in. What fails to load keeps its previous version serving.
    pub async fn reload(&self) -> ReloadReport {
        self.inner.reload().await
    }

    /// Each provider's faults and quarantine, in chain order.
    pub fn provider_status(&self) -> Vec<ProviderStatus> {
        self.inner
            .cache
            .chain()
            .load()
            .sources()
            .iter()
            .map(|p| p.status())
            .collect()
    }

    /// Where reloading stands: the generation, the providers serving, and what failed
    /// in the last reload.
    pub fn reload_status(&self) -> ReloadStatus {
        self.inner.reloader.status()
    }

    /// Every reload's report, as it happens.
    pub fn reload_events(&self) -> tokio::sync::broadcast::Receiver<ReloadReport> {
        self.inner.reloader.subscribe()
    }

    /// Resolve a query such as `https+http://catalog` to endpoints.
    pub async fn resolve(&self, query: &str) -> Result<EndpointSet, Error> {
        self.inner.cache.resolve(query).await
    }

    /// Resolve an already parsed query.
    pub async fn resolve_query(&self, query: &Query) -> Result<EndpointSet, Error> {
        self.inner.cache.resolve_query(query).await
    }

    /// Ask the providers now, bypassing (and not filling) the cache: what a cold
    /// resolve costs, or a diagnostic that must not be served from the cache.
    pub async fn resolve_uncached(&self, query: &Query) -> Result<EndpointSet, Error> {
        self.inner.cache.resolve_uncached(query).await
    }

    /// The query's cache entry as it stands (its set, age, next refresh, staleness), if
    /// it is cached; no provider is asked.
    pub fn cache_state(&self, query: &Query) -> Option<CacheState> {
        self.inner.cache.state(query)
    }

    /// Every query in the cache with its state (set, age, next refresh, staleness),
    /// ordered by the query's text; no provider is asked. What `wasd serve`'s status
    /// page lists.
    pub fn cached(&self) -> Vec<(Query, CacheState)> {
        self.inner.cache.states()
    }

    /// Explain a query's answer: the parsed query and the schemes asked for, each
    /// provider in chain order with what it said, how long it took and the DNS names
    /// and HTTP origins it asked, the endpoints dropped and why, and the state of the
    /// query's cache entry. The providers are asked afresh, as a refresh of the entry
    /// would ask them; the cache is neither filled nor changed. `Err` only for a query
    /// that does not parse: a failed resolve is explained like an answered one.
    pub async fn explain(&self, query: &str) -> Result<Explanation, Error> {
        Ok(self.explain_query(&Query::parse(query)?).await)
    }

    /// [`Resolver::explain`] for an already parsed query (with its filters).
    pub async fn explain_query(&self, query: &Query) -> Explanation {
        self.inner.cache.explain(query).await
    }

    /// Follow a query: the current endpoints, then every change. A query with no
    /// endpoints yet is watched too (its current set is empty).
    pub async fn watch(&self, query: &str) -> Result<Watch, Error> {
        self.inner.cache.watch(query).await
    }

    /// Follow an already parsed query.
    pub async fn watch_query(&self, query: &Query) -> Result<Watch, Error> {
        self.inner.cache.watch_query(query).await
    }

    /// A watch of `query` and a lock-free view of its current set, for a balancer that
    /// checks for a change on each pick (so it follows one at once, with no task).
    pub(crate) async fn watch_latest(&self, query: &Query) -> Result<(Watch, Latest), Error> {
        self.inner.cache.watch_latest(query).await
    }

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
        let provider = self.inner.registrar()?;
        let inner = Arc::downgrade(&self.inner);
        let current = Arc::new(move || inner.upgrade()?.registrar().ok());
        // The lease is kept on the resolver's runtime, as its refreshes are: a caller's
        // own runtime may end before the registration does.
        let _on = self.inner.cache.runtime().map(tokio::runtime::Handle::enter);
        Registration::start(provider, current, instance, ttl)
    }

    /// Delete an instance from the registry without a [`Registration`] (one made by
    /// another process, say). A live `Registration` is ended with its own
    /// [`Registration::deregister`].
    pub async fn deregister(&self, instance: &ServiceInstance) -> Result<(), Error> {
        let provider = self.inner.registrar()?;
        provider
            .deregister(instance, None)
            .await
            .map_err(Error::Deregister)
    }
}

impl Inner {
    fn registrar(&self) -> Result<Arc<dyn Source>, Error> {
        let chain = self.cache.chain().load();
        let name = self.registrar.load();
        match chain.registrar(name.as_deref().map(String::as_str)) {
            Some(p) if p.is_registrar() => Ok(p),
            Some(p) => Err(Error::NoRegistrar(format!(
                "provider '{}' does not export wasd:provider/registrar",
                p.name()
            ))),
            None => Err(Error::NoRegistrar(
                "no provider in the chain exports wasd:provider/registrar (configure the etcd provider)"
                    .into(),
            )),
        }
    }

    /// Read the config and every provider's inputs, load what changed, swap; then
    /// apply the config's settings and watch what it names.
    pub(crate) async fn reload(&self) -> ReloadReport {
        self.reload_serially()
            .instrument(tracing::debug_span!("reload"))
            .await
    }

    async fn reload_serially(&self) -> ReloadReport {
        let _serial = self.reloading.lock().await;
        let config = self.loader.load().map_err(|e| {
            let source = self
                .loader
                .path()
                .map_or_else(|| "config".to_owned(), |p| p.display().to_string());
            ReloadError::new("config", source, e.to_string())
        });
        let plan = match &config {
            Ok(config) => self.plan(config).await,
            Err(e) => Err(e.clone()),
        };
        let runtime = &self.runtime;
        let report = self
            .reloader
            .reload(plan, async |prepared: Prepared| {
                let spec = prepared.spec().clone();
                Provider::load_prepared(runtime, prepared)
                    .await
                    .map(|p| Arc::new(p) as Arc<dyn Source>)
                    .map_err(|e| reload_error(&spec, e).reason)
            })
            .await;
        if let Ok(config) = &config {
            self.cache.set_settings(settings_of(config));
            self.balancing.set_policies(config.policies.clone());
            self.registrar.store(config.registrar.clone().map(Arc::new));
            if let Some(watcher) = self.watcher.lock().expect("watcher lock").as_mut() {
                watcher.watch(config);
            }
        }
        self.reloader.announce(&report);
        report
    }

    /// Every provider of `config`, its inputs read and fingerprinted.
    async fn plan(
        &self,
        config: &Config,
    ) -> Result<Vec<Result<Planned<Prepared>, ReloadError>>, ReloadError> {
        let specs = chain_specs(config).map_err(|e| {
            let source = config
                .plugin_dir
                .as_ref()
                .map_or_else(String::new, |p| p.display().to_string());
            ReloadError::new("config", source, e.to_string())
        })?;
        let mut planned = Vec::with_capacity(specs.len());
        for spec in &specs {
            if let ModuleSource::File(path) = &spec.module
                && !path.exists()
            {
                planned.push(Err(ReloadError::new(
                    &spec.name,
                    spec.module.to_string(),
                    MODULE_MISSING,
                )));
                continue;
            }
            planned.push(match Prepared::read(spec).await {
                Ok(prepared) => Ok(Planned::new(
                    &spec.name,
                    spec.module.to_string(),
                    prepared.fingerprint(),
                    prepared,
                )),
                Err(e) => Err(reload_error(spec, e)),
            });
        }
        Ok(planned)
    }
}

/// Reload after the file watcher saw a change; `false` once the resolver is gone.
pub(crate) async fn reload_from_files(inner: &Weak<Inner>) -> bool {
    match inner.upgrade() {
        Some(inner) => {
            inner.reload().await;
            true
        }
        None => false,
    }
}
