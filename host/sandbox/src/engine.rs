//! The wasmtime engine shared by all providers: configuration, the epoch ticker that
//! enforces call deadlines (and ticks the core's coarse clock), the linker with every
//! import the host offers, and the cache of precompiled components.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasd_core::{Clock, Error};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine};

use crate::bindings;
use crate::capability::dns::{DnsClient, DnsSettings};
use crate::capability::tcp::GrantedLookups;
use crate::provider::ProviderState;

/// How often the epoch advances: the granularity of call deadlines, and how often a
/// long-running guest yields to the tokio scheduler.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(10);

/// What every provider shares: the engine, the linker, the DNS client, the component
/// cache. Dropping the last reference stops the epoch thread.
pub struct Runtime {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<ProviderState>,
    pub(crate) dns: Arc<DnsClient>,
    cache_dir: Option<PathBuf>,
    /// The environment providers' granted variables come from; `None`: the process's.
    environment: Option<Vec<(String, String)>>,
    _ticker: EpochTicker,
}

/// The tracing target of the `compile` span (fields `provider`, `megabytes`, `note`),
/// entered while a component is compiled because the cache did not have it.
pub const COMPILE_TARGET: &str = "wasd_sandbox::compile";

impl Runtime {
    /// Start the engine (and its epoch thread, which also ticks `clock`), caching
    /// precompiled components in `cache_dir`, looking DNS names up as `dns` says, and
    /// giving providers their granted variables from `environment` (`None`: the
    /// process's; an embedder's own settings, or tests, which must not change the
    /// process environment while threads run).
    pub fn new(
        cache_dir: Option<PathBuf>,
        dns: DnsSettings,
        clock: Clock,
        environment: Option<Vec<(String, String)>>,
    ) -> Result<Arc<Runtime>, Error> {
        Runtime::start(cache_dir, dns, clock, environment)
            .map_err(|e| Error::engine("start the WebAssembly engine", e))
    }

    fn start(
        cache_dir: Option<PathBuf>,
        dns: DnsSettings,
        clock: Clock,
        environment: Option<Vec<(String, String)>>,
    ) -> wasmtime::Result<Arc<Runtime>> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        // Name lookups only for the names `grants.tcp` names (wasmtime-wasi's own
        // switch is all or nothing).
        linker.allow_shadowing(true);
        wasmtime_wasi::p2::bindings::sockets::ip_name_lookup::add_to_linker::<_, GrantedLookups>(
            &mut linker,
            ProviderState::granted_lookup,
        )?;
        linker.allow_shadowing(false);
        bindings::Registry::add_to_linker::<_, HasSelf<ProviderState>>(&mut linker, |s| s)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        let ticker = EpochTicker::start(engine.clone(), clock);
        Ok(Arc::new(Runtime {
            engine,
            linker,
            dns: DnsClient::new(dns),
            cache_dir,
            environment,
            _ticker: ticker,
        }))
    }

    /// The variables a provider with `grants` sees: only granted ones, and only UTF-8
    /// ones (anything else cannot cross into WASI).
    pub(crate) fn environment_for(&self, grants: &crate::Grants) -> Vec<(String, String)> {
        match &self.environment {
            Some(environment) => environment
                .iter()
                .filter(|(name, _)| grants.allows_env(name))
                .cloned()
                .collect(),
            None => std::env::vars_os()
                .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
                .filter(|(name, _)| grants.allows_env(name))
                .collect(),
        }
    }

    /// Compile a component, or load it precompiled from the cache. Compiling takes tens
    /// of milliseconds of CPU, so it runs on the blocking pool, off the resolve path.
    /// `digest` is the module's sha256 (the caller has it already: pins and reload
    /// fingerprints use it too).
    /// `provider` names it in the `compile` span (see [`COMPILE_TARGET`]).
    pub(crate) async fn compile(
        self: &Arc<Self>,
        bytes: Arc<[u8]>,
        digest: [u8; 32],
        provider: &str,
    ) -> Result<Component, String> {
        let runtime = self.clone();
        let provider = provider.to_owned();
        tokio::task::spawn_blocking(move || runtime.compile_blocking(&bytes, &digest, &provider))
            .await
            .map_err(|e| format!("compilation task failed: {e}"))?
    }

    fn compile_blocking(&self, bytes: &[u8], digest: &[u8; 32], provider: &str) -> Result<Component, String> {
        let cached = self
            .cache_dir
            .as_ref()
            .map(|dir| dir.join(self.cache_key(digest)));
        if let Some(path) = &cached
            && path.is_file()
        {
            // SAFETY: the file was written by `Component::serialize` of an engine with
            // the same compatibility hash (it is in the file name) into the host's own
            // cache folder; wasmtime also checks its header before use.
            match unsafe { Component::deserialize_file(&self.engine, path) } {
                Ok(component) => return Ok(component),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "ignoring unusable precompiled component: {e}")
                }
            }
        }
        // Seconds for a Python or JavaScript provider: said (the CLI shows a spinner
        // for this span on a terminal), and timed.
        let megabytes = bytes.len() as f64 / 1e6;
        let when = if cached.is_some() {
            "first run only"
        } else {
            "no compile cache"
        };
        let _compiling = tracing::info_span!(
            target: COMPILE_TARGET,
            "compile",
            provider,
            megabytes,
            note = when
        )
        .entered();
        tracing::debug!(target: COMPILE_TARGET, "compiling provider '{provider}' ({megabytes:.1} MB, {when})");
        let component = Component::new(&self.engine, bytes).map_err(|e| format!("{e:#}"))?;
        if let Some(path) = &cached
            && let Err(e) = write_atomically(path, &component)
        {
            tracing::debug!(path = %path.display(), "could not cache the precompiled component: {e}");
        }
        Ok(component)
    }

    /// Content hash of the module plus the engine's compatibility hash: a different
    /// wasmtime version or configuration never picks up a stale artefact.
    fn cache_key(&self, digest: &[u8; 32]) -> String {
        struct Sha(Sha256);
        impl Hasher for Sha {
            fn finish(&self) -> u64 {
                unreachable!("only used to feed the digest")
            }
            fn write(&mut self, bytes: &[u8]) {
                self.0.update(bytes);
            }
        }
        let mut sha = Sha(Sha256::new());
        self.engine.precompile_compatibility_hash().hash(&mut sha);
        sha.0.update(digest);
        let digest = sha.0.finalize();
        format!("{}.cwasm", wasd_core::text::hex(&digest[..20]))
    }
}

fn write_atomically(path: &Path, component: &Component) -> std::io::Result<()> {
    let dir = path.parent().expect("cache files live in a folder");
    std::fs::create_dir_all(dir)?;
    let bytes = component.serialize().map_err(std::io::Error::other)?;
    let tmp = dir.join(format!(".{}.tmp{}", std::process::id(), rand_suffix()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

fn rand_suffix() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::BuildHasher;
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped, and ticks the core's
/// coarse clock (one thread for both).
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    fn start(engine: Engine, clock: Clock) -> EpochTicker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("wasd-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                    clock.tick();
                }
            })
            .expect("spawning the epoch thread");
        EpochTicker { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
