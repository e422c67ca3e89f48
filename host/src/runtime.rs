//! The wasmtime engine shared by all providers: configuration, the epoch ticker that
//! enforces call deadlines, the linker with every import the host offers, and the
//! cache of precompiled components.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine};

use crate::bindings;
use crate::dns::{DnsClient, DnsSettings};
use crate::provider::ProviderState;

/// How often the epoch advances: the granularity of call deadlines, and how often a
/// long-running guest yields to the tokio scheduler.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(10);

pub(crate) struct Runtime {
    pub engine: Engine,
    pub linker: Linker<ProviderState>,
    pub dns: Arc<DnsClient>,
    cache_dir: Option<PathBuf>,
    ticker: EpochTicker,
}

impl Runtime {
    pub fn new(cache_dir: Option<PathBuf>, dns: DnsSettings) -> wasmtime::Result<Arc<Runtime>> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        bindings::Registry::add_to_linker::<_, HasSelf<ProviderState>>(&mut linker, |s| s)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        let ticker = EpochTicker::start(engine.clone());
        Ok(Arc::new(Runtime {
            engine,
            linker,
            dns: DnsClient::new(dns),
            cache_dir,
            ticker,
        }))
    }

    /// Milliseconds since the runtime started, as of the last epoch tick: a clock read
    /// with one relaxed load, for bookkeeping on the cached-resolve path (`Instant::now`
    /// costs a quarter of a cached resolve). Behind by a tick (10 ms), more when the
    /// ticker thread is starved: never ahead of [`Runtime::now_ms`].
    pub fn coarse_now_ms(&self) -> u64 {
        self.ticker.now_ms.load(Ordering::Relaxed)
    }

    /// Milliseconds since the runtime started, exactly: the same clock as
    /// [`Runtime::coarse_now_ms`].
    pub fn now_ms(&self) -> u64 {
        self.ticker.started.elapsed().as_millis() as u64
    }

    /// Compile a component, or load it precompiled from the cache. Compiling takes tens
    /// of milliseconds of CPU, so it runs on the blocking pool, off the resolve path.
    /// `digest` is the module's sha256 (the caller has it already: pins and reload
    /// fingerprints use it too).
    pub async fn compile(self: &Arc<Self>, bytes: Arc<[u8]>, digest: [u8; 32]) -> Result<Component, String> {
        let runtime = self.clone();
        tokio::task::spawn_blocking(move || runtime.compile_blocking(&bytes, &digest))
            .await
            .map_err(|e| format!("compilation task failed: {e}"))?
    }

    fn compile_blocking(&self, bytes: &[u8], digest: &[u8; 32]) -> Result<Component, String> {
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
        let hex: String = digest.iter().take(20).map(|b| format!("{b:02x}")).collect();
        format!("{hex}.cwasm")
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

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped, and keeps the coarse
/// clock.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    now_ms: Arc<AtomicU64>,
    started: Instant,
}

impl EpochTicker {
    fn start(engine: Engine) -> EpochTicker {
        let stop = Arc::new(AtomicBool::new(false));
        let now_ms = Arc::new(AtomicU64::new(0));
        let (flag, clock) = (stop.clone(), now_ms.clone());
        let started = Instant::now();
        std::thread::Builder::new()
            .name("wasd-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                    clock.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
            })
            .expect("spawning the epoch thread");
        EpochTicker {
            stop,
            now_ms,
            started,
        }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
