//! Hot reload: the host config file, the plugin folder and every file a provider was
//! granted (or its TLS files) are watched; on a change the chain is rebuilt off the
//! resolve path and swapped in atomically.
//!
//! Editors and deploy tools write files every way (in place, write-then-rename,
//! delete-then-create, Kubernetes' `..data` symlink flips), so events only say "look
//! again": the watcher watches folders, waits for a quiet moment, and the reload reads
//! everything and compares content fingerprints. A provider whose inputs hash the same
//! is kept as it is (its instances, its cache); one whose inputs changed is loaded
//! anew; one that fails to load keeps its previous version serving, and the failure is
//! reported and retried on the file's next change.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::{mpsc, watch};

use crate::chain::{ProviderChain, chain_specs};
use crate::config::{Config, ModuleSource};
use crate::error::Error;
use crate::provider::{Prepared, Provider};
use crate::resolver::Inner;

/// Quiet time after the last file event before reloading.
const DEBOUNCE: Duration = Duration::from_millis(150);
/// A burst of events never delays a reload longer than this.
const MAX_DEBOUNCE: Duration = Duration::from_secs(2);
/// Failed fingerprints remembered (so an unchanged broken file is not reloaded again).
const MAX_REMEMBERED_FAILURES: usize = 256;

/// One thing that failed to load: which file or provider, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadError {
    /// The provider's name, or `config` for the host config itself.
    pub provider: String,
    /// The file (a module path, `builtin:NAME`, or the config file).
    pub source: String,
    /// What went wrong.
    pub reason: String,
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.provider, self.source, self.reason)
    }
}

/// What one reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// The generation serving after it (bumped only when the chain changed).
    pub generation: u64,
    /// Providers that joined the chain.
    pub added: Vec<String>,
    /// Providers loaded anew because their module, settings or files changed.
    pub replaced: Vec<String>,
    /// Providers that left the chain.
    pub removed: Vec<String>,
    /// What failed to load; their previous versions (if any) keep serving.
    pub errors: Vec<ReloadError>,
}

impl ReloadReport {
    /// Whether the chain changed.
    pub fn changed(&self) -> bool {
        !(self.added.is_empty() && self.replaced.is_empty() && self.removed.is_empty())
    }
}

/// Where reloading stands, from [`Resolver::reload_status`](crate::Resolver::reload_status).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadStatus {
    /// Bumped each time a new chain is swapped in; 0 is the one built at start.
    pub generation: u64,
    /// Reloads run (by file events or [`Resolver::reload`](crate::Resolver::reload)).
    pub reloads: u64,
    /// The providers serving, in order.
    pub providers: Vec<String>,
    /// What failed in the last reload (empty when everything loaded).
    pub errors: Vec<ReloadError>,
    /// Replaced or removed providers still held by a call in flight; they are freed
    /// when it ends.
    pub draining: usize,
}

/// The reload side of the resolver's state.
pub(crate) struct Reloading {
    /// Serialises reloads; holds fingerprints of inputs that failed to load.
    lock: tokio::sync::Mutex<HashMap<[u8; 32], Error>>,
    status: Mutex<ReloadStatus>,
    /// Replaced providers, until their last call ends.
    retired: Mutex<Vec<Weak<Provider>>>,
    /// The current generation; refresh tasks wake on it to re-resolve.
    pub generation: watch::Sender<u64>,
    pub events: tokio::sync::broadcast::Sender<ReloadReport>,
    watcher: Mutex<Option<FileWatcher>>,
}

impl Reloading {
    pub fn new(errors: Vec<ReloadError>) -> Reloading {
        Reloading {
            lock: tokio::sync::Mutex::new(HashMap::new()),
            status: Mutex::new(ReloadStatus {
                errors,
                ..ReloadStatus::default()
            }),
            retired: Mutex::new(Vec::new()),
            generation: watch::channel(0).0,
            events: tokio::sync::broadcast::channel(64).0,
            watcher: Mutex::new(None),
        }
    }

    /// The status, with the providers of `chain` (the one serving).
    pub fn status(&self, chain: &ProviderChain) -> ReloadStatus {
        let mut status = self.status.lock().expect("status lock").clone();
        status.providers = chain.names().map(str::to_owned).collect();
        let mut retired = self.retired.lock().expect("retired lock");
        retired.retain(|p| p.strong_count() > 0);
        status.draining = retired.len();
        status
    }
}

/// Reload now: read the config and every provider's inputs, load what changed, swap.
pub(crate) async fn reload(inner: &Arc<Inner>) -> ReloadReport {
    let reloading = &inner.reloading;
    let mut failed = reloading.lock.lock().await;
    let generation = *reloading.generation.borrow();
    let mut report = ReloadReport {
        generation,
        ..ReloadReport::default()
    };
    let config = match inner.loader.load() {
        Ok(config) => config,
        Err(e) => {
            let source = inner
                .loader
                .path()
                .map_or_else(|| "config".to_owned(), |p| p.display().to_string());
            report.errors.push(ReloadError {
                provider: "config".into(),
                source,
                reason: e.to_string(),
            });
            return finish(inner, report, None);
        }
    };
    let specs = match chain_specs(&config) {
        Ok(specs) => specs,
        Err(e) => {
            report.errors.push(ReloadError {
                provider: "config".into(),
                source: config
                    .plugin_dir
                    .as_ref()
                    .map_or_else(String::new, |p| p.display().to_string()),
                reason: e.to_string(),
            });
            return finish(inner, report, None);
        }
    };
    let old = inner.chain.load_full();
    let mut next: Vec<Arc<Provider>> = Vec::with_capacity(specs.len());
    for spec in &specs {
        let fail = |report: &mut ReloadReport, next: &mut Vec<Arc<Provider>>, e: &Error| {
            report.errors.push(ReloadError {
                provider: spec.name.clone(),
                source: spec.module.to_string(),
                reason: match e {
                    Error::Load { reason, .. } => reason.clone(),
                    other => other.to_string(),
                },
            });
            // The last good version of this provider keeps its place.
            if let Some(previous) = old.by_name(&spec.name) {
                next.push(previous.clone());
            }
        };
        let prepared = match Prepared::read(spec).await {
            Ok(prepared) => prepared,
            Err(e) => {
                fail(&mut report, &mut next, &e);
                continue;
            }
        };
        if let Some(same) = old
            .providers()
            .iter()
            .find(|p| p.fingerprint == prepared.fingerprint)
        {
            next.push(same.clone());
            continue;
        }
        if let Some(e) = failed.get(&prepared.fingerprint) {
            fail(&mut report, &mut next, e);
            continue;
        }
        let fingerprint = prepared.fingerprint;
        match Provider::load_prepared(&inner.runtime, prepared).await {
            Ok(provider) => next.push(Arc::new(provider)),
            Err(e) => {
                tracing::warn!("reload: {e}; the previous version keeps serving");
                fail(&mut report, &mut next, &e);
                if failed.len() >= MAX_REMEMBERED_FAILURES {
                    failed.clear();
                }
                failed.insert(fingerprint, e);
            }
        }
    }
    for p in &next {
        match old.by_name(&p.name) {
            None => report.added.push(p.name.to_string()),
            Some(previous) if !Arc::ptr_eq(previous, p) => report.replaced.push(p.name.to_string()),
            Some(_) => {}
        }
    }
    for p in old.providers() {
        if !next.iter().any(|n| n.name == p.name) {
            report.removed.push(p.name.to_string());
        }
    }
    let order_changed = old.providers().len() != next.len()
        || old.providers().iter().zip(&next).any(|(a, b)| !Arc::ptr_eq(a, b));
    if !order_changed {
        return finish(inner, report, Some(&config));
    }
    {
        let mut retired = reloading.retired.lock().expect("retired lock");
        retired.retain(|p| p.strong_count() > 0);
        for p in old.providers() {
            if !next.iter().any(|n| Arc::ptr_eq(n, p)) {
                retired.push(Arc::downgrade(p));
            }
        }
    }
    inner.chain.store(Arc::new(ProviderChain::new(next)));
    drop(old);
    report.generation = generation + 1;
    tracing::info!(
        generation = report.generation,
        added = ?report.added,
        replaced = ?report.replaced,
        removed = ?report.removed,
        "reloaded the provider chain"
    );
    // Wakes every refresh task: cached answers are re-resolved on the new chain and
    // watchers hear of those that changed.
    reloading.generation.send_replace(report.generation);
    finish(inner, report, Some(&config))
}

fn finish(inner: &Arc<Inner>, report: ReloadReport, config: Option<&Config>) -> ReloadReport {
    let reloading = &inner.reloading;
    {
        let mut status = reloading.status.lock().expect("status lock");
        status.generation = report.generation;
        status.reloads += 1;
        status.errors = report.errors.clone();
    }
    for e in &report.errors {
        tracing::warn!("reload: {e}");
    }
    if let Some(config) = config {
        inner.apply_settings(config);
        if let Some(watcher) = reloading.watcher.lock().expect("watcher lock").as_mut() {
            watcher.watch(config);
        }
    }
    let _ = reloading.events.send(report.clone());
    report
}

/// What can change the chain: the files to react to, and the folders to watch for
/// them.
#[derive(Default)]
struct Inputs {
    /// Input files (as written and, for symlinks, their targets), and folders that do
    /// not exist yet.
    files: HashSet<PathBuf>,
    /// Folders any change in which counts (the plugin folder).
    any_in: HashSet<PathBuf>,
    /// Folders to watch (each existing, or the nearest existing ancestor).
    folders: HashSet<PathBuf>,
}

impl Inputs {
    fn of(config: &Config) -> Inputs {
        let mut inputs = Inputs::default();
        if let Some(path) = config.path() {
            inputs.file(path);
        }
        for spec in &config.providers {
            if let ModuleSource::File(path) = &spec.module {
                inputs.file(path);
            }
            for (_, path) in &spec.grants.files {
                inputs.file(path);
            }
            for path in spec
                .tls
                .ca_file
                .iter()
                .chain(spec.tls.client.iter().flat_map(|(c, k)| [c, k]))
            {
                inputs.file(path);
            }
        }
        if let Some(dir) = &config.plugin_dir {
            let dir = absolute(dir);
            inputs.folder(&dir);
            inputs.any_in.insert(dir);
        }
        inputs
    }

    fn file(&mut self, path: &Path) {
        let path = absolute(path);
        // A symlinked file (a ConfigMap's) changes where its target lives, too.
        if let Ok(target) = std::fs::canonicalize(&path)
            && target != path
        {
            if let Some(parent) = target.parent() {
                self.folder(parent);
            }
            self.files.insert(target);
        }
        if let Some(parent) = path.parent() {
            self.folder(parent);
        }
        self.files.insert(path);
    }

    /// Watch `folder`, or, until it exists, its nearest existing ancestor (whose
    /// events on the missing parts count).
    fn folder(&mut self, folder: &Path) {
        let mut existing = folder;
        while !existing.is_dir() {
            self.files.insert(existing.to_path_buf());
            match existing.parent() {
                Some(parent) => existing = parent,
                None => return,
            }
        }
        self.folders.insert(existing.to_path_buf());
    }

    /// Whether an event on these paths can change the chain.
    fn concerns(&self, paths: &[PathBuf]) -> bool {
        paths.iter().any(|path| {
            self.files.contains(path)
                || path.parent().is_some_and(|parent| self.any_in.contains(parent))
                // Kubernetes flips `..data` (and writes `..2024_...` folders) next to
                // the symlinks it updates.
                || path.file_name().is_some_and(|name| name.as_encoded_bytes().starts_with(b".."))
        })
    }
}

fn absolute(path: &Path) -> PathBuf {
    let path = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Watches folders with `notify` and tells the reload task when an input changed.
pub(crate) struct FileWatcher {
    watcher: notify::RecommendedWatcher,
    inputs: Arc<Mutex<Inputs>>,
}

impl FileWatcher {
    /// Watch what `config` reads. Every folder is watched afresh each time, so one
    /// that was deleted and made again is not lost.
    fn watch(&mut self, config: &Config) {
        let inputs = Inputs::of(config);
        // Never hold the lock while calling notify: its event thread takes the same
        // lock in the handler, and `watch` waits for that thread.
        let old = std::mem::take(&mut self.inputs.lock().expect("inputs lock").folders);
        for folder in &old {
            let _ = self.watcher.unwatch(folder);
        }
        for folder in &inputs.folders {
            if let Err(e) = self.watcher.watch(folder, RecursiveMode::NonRecursive) {
                tracing::warn!(folder = %folder.display(), "cannot watch for changes: {e}");
            }
        }
        *self.inputs.lock().expect("inputs lock") = inputs;
    }
}

/// Start watching files; the task reloads after each burst of changes and ends with
/// the resolver.
pub(crate) fn start(inner: &Arc<Inner>, config: &Config) -> Result<(), Error> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let inputs = Arc::new(Mutex::new(Inputs::default()));
    let concerned = inputs.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
        // Reading files (ours included, during a reload) must not trigger a reload,
        // nor may changes to files wasd does not read (logs next to the config).
        Ok(event) if matches!(event.kind, EventKind::Access(_)) => {}
        Ok(event) => {
            if concerned.lock().expect("inputs lock").concerns(&event.paths) {
                let _ = tx.send(());
            }
        }
        Err(e) => tracing::warn!("file watcher: {e}"),
    })
    .map_err(|e| Error::Engine(format!("cannot watch files: {e}")))?;
    let mut watcher = FileWatcher { watcher, inputs };
    watcher.watch(config);
    *inner.reloading.watcher.lock().expect("watcher lock") = Some(watcher);

    let weak: Weak<Inner> = Arc::downgrade(inner);
    let mut shutdown = inner.shutdown.subscribe();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                event = rx.recv() => if event.is_none() { return },
                _ = shutdown.changed() => return,
            }
            // Wait for a quiet moment: a copy in progress sends many events.
            let burst = tokio::time::Instant::now();
            loop {
                let quiet = tokio::time::sleep(DEBOUNCE);
                tokio::select! {
                    event = rx.recv() => if event.is_none() { return },
                    _ = quiet => break,
                    _ = shutdown.changed() => return,
                }
                if burst.elapsed() >= MAX_DEBOUNCE {
                    break;
                }
            }
            let Some(inner) = weak.upgrade() else { return };
            reload(&inner).await;
        }
    });
    Ok(())
}
