//! Reload orchestration: given the chain's entries read anew (each with a fingerprint of
//! its inputs) and a way to load one, build the next chain and swap it in.
//!
//! A source whose inputs hash the same as a serving one is kept as it is (its
//! instances, its cache); one whose inputs changed is loaded anew; one that fails to
//! load keeps its previous version serving, and the failure is reported and remembered,
//! so an unchanged broken input is not loaded again. What the inputs are and how a
//! source is loaded is the caller's business (the sandbox's, for WebAssembly
//! providers); the file watcher that triggers a reload lives with the caller too.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::broadcast;

use crate::chain::{Chain, ChainCell};
use crate::source::Source;

/// Failed fingerprints remembered (so an unchanged broken file is not reloaded again).
const MAX_REMEMBERED_FAILURES: usize = 256;

/// One thing that failed to load: which file or provider, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReloadError {
    /// The provider's name, or `config` for the host config itself.
    pub provider: String,
    /// The file (a module path, `builtin:NAME`, or the config file).
    pub source: String,
    /// What went wrong.
    pub reason: String,
}

impl ReloadError {
    /// `provider`, read from `source`, failed for `reason`.
    pub fn new(
        provider: impl Into<String>,
        source: impl Into<String>,
        reason: impl Into<String>,
    ) -> ReloadError {
        ReloadError {
            provider: provider.into(),
            source: source.into(),
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.provider, self.source, self.reason)
    }
}

impl std::error::Error for ReloadError {}

/// What one reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
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

/// Where reloading stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReloadStatus {
    /// Bumped each time a new chain is swapped in; 0 is the one built at start.
    pub generation: u64,
    /// Reloads run (by file events or an explicit reload).
    pub reloads: u64,
    /// The providers serving, in order.
    pub providers: Vec<String>,
    /// What failed in the last reload (empty when everything loaded).
    pub errors: Vec<ReloadError>,
    /// Replaced or removed providers still held by a call in flight; they are freed
    /// when it ends.
    pub draining: usize,
}

/// One entry of the chain as a reload reads it: its inputs, already read, and their
/// fingerprint.
#[derive(Debug)]
#[non_exhaustive]
pub struct Planned<I> {
    /// The provider's name.
    pub name: String,
    /// Where it comes from (`builtin:config`, a module path), for reports.
    pub source: String,
    /// A hash of everything it is made from; equal hashes make equal sources.
    pub fingerprint: [u8; 32],
    /// What the loader needs to make it.
    pub input: I,
}

impl<I> Planned<I> {
    /// An entry named `name` from `source`, fingerprinted.
    pub fn new(
        name: impl Into<String>,
        source: impl Into<String>,
        fingerprint: [u8; 32],
        input: I,
    ) -> Planned<I> {
        Planned {
            name: name.into(),
            source: source.into(),
            fingerprint,
            input,
        }
    }
}

/// Swaps chains into a [`ChainCell`] and keeps the reload status and events.
pub struct Reloader {
    cell: Arc<ChainCell>,
    /// Serialises reloads; holds the reasons of fingerprints that failed to load.
    failed: tokio::sync::Mutex<HashMap<[u8; 32], String>>,
    status: Mutex<ReloadStatus>,
    /// Replaced sources, until their last call ends.
    retired: Mutex<Vec<Weak<dyn Source>>>,
    events: broadcast::Sender<ReloadReport>,
}

impl Reloader {
    /// A reloader for `cell`; `errors` are what failed when the first chain was built.
    pub fn new(cell: Arc<ChainCell>, errors: Vec<ReloadError>) -> Reloader {
        Reloader {
            cell,
            failed: tokio::sync::Mutex::new(HashMap::new()),
            status: Mutex::new(ReloadStatus {
                errors,
                ..ReloadStatus::default()
            }),
            retired: Mutex::new(Vec::new()),
            events: broadcast::channel(64).0,
        }
    }

    /// The cell it swaps chains into.
    pub fn cell(&self) -> &Arc<ChainCell> {
        &self.cell
    }

    /// Where reloading stands now.
    pub fn status(&self) -> ReloadStatus {
        let mut status = self.status.lock().expect("status lock").clone();
        status.generation = self.cell.generation();
        status.providers = self.cell.load().names().map(str::to_owned).collect();
        let mut retired = self.retired.lock().expect("retired lock");
        retired.retain(|p| p.strong_count() > 0);
        status.draining = retired.len();
        status
    }

    /// Every reload's report, as [`Reloader::announce`] sends it.
    pub fn subscribe(&self) -> broadcast::Receiver<ReloadReport> {
        self.events.subscribe()
    }

    /// Send a reload's report to the subscribers. Separate from [`Reloader::reload`] so
    /// that the caller can finish its own part first (the file watcher re-armed for
    /// what the new config names): whoever reacts to the report by changing a file
    /// again must find the watcher watching.
    pub fn announce(&self, report: &ReloadReport) {
        let _ = self.events.send(report.clone());
    }

    /// Build the next chain from `planned` (in chain order; `Err` for an entry whose
    /// inputs could not be read) and swap it in if it differs. `planned` itself is
    /// `Err` when the configuration could not be read: nothing changes. `load` makes a
    /// source from an entry's input, or says why it cannot.
    ///
    /// Callers serialise reloads that read configuration around this call; the reload
    /// itself also holds a lock for its whole run. The report is returned, not yet
    /// sent to subscribers: see [`Reloader::announce`].
    pub async fn reload<I, F, Fut>(
        &self,
        planned: Result<Vec<Result<Planned<I>, ReloadError>>, ReloadError>,
        load: F,
    ) -> ReloadReport
    where
        F: Fn(I) -> Fut,
        Fut: Future<Output = Result<Arc<dyn Source>, String>>,
    {
        let mut failed = self.failed.lock().await;
        let mut report = ReloadReport {
            generation: self.cell.generation(),
            ..ReloadReport::default()
        };
        let planned = match planned {
            Ok(planned) => planned,
            Err(e) => {
                report.errors.push(e);
                return self.finish(report);
            }
        };
        let old = self.cell.load();
        let mut next: Vec<Arc<dyn Source>> = Vec::with_capacity(planned.len());
        // The last good version of a provider that failed keeps its place.
        let keep_previous = |name: &str, next: &mut Vec<Arc<dyn Source>>| {
            if let Some(previous) = old.by_name(name) {
                next.push(previous.clone());
            }
        };
        for entry in planned {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    keep_previous(&e.provider, &mut next);
                    report.errors.push(e);
                    continue;
                }
            };
            if let Some(same) = old
                .sources()
                .iter()
                .find(|s| s.fingerprint() == Some(entry.fingerprint))
            {
                next.push(same.clone());
                continue;
            }
            let error = |reason: &str| ReloadError::new(&entry.name, &entry.source, reason);
            if let Some(reason) = failed.get(&entry.fingerprint) {
                report.errors.push(error(reason));
                keep_previous(&entry.name, &mut next);
                continue;
            }
            let (name, source, fingerprint) = (entry.name.clone(), entry.source.clone(), entry.fingerprint);
            match load(entry.input).await {
                Ok(loaded) => next.push(loaded),
                Err(reason) => {
                    report.errors.push(ReloadError::new(&name, source, &reason));
                    keep_previous(&name, &mut next);
                    if failed.len() >= MAX_REMEMBERED_FAILURES {
                        failed.clear();
                    }
                    failed.insert(fingerprint, reason);
                }
            }
        }
        for s in &next {
            match old.by_name(s.name()) {
                None => report.added.push(s.name().to_string()),
                Some(previous) if !Arc::ptr_eq(previous, s) => report.replaced.push(s.name().to_string()),
                Some(_) => {}
            }
        }
        for s in old.sources() {
            if !next.iter().any(|n| n.name() == s.name()) {
                report.removed.push(s.name().to_string());
            }
        }
        let order_changed = old.sources().len() != next.len()
            || old.sources().iter().zip(&next).any(|(a, b)| !Arc::ptr_eq(a, b));
        if !order_changed {
            return self.finish(report);
        }
        {
            let mut retired = self.retired.lock().expect("retired lock");
            retired.retain(|p| p.strong_count() > 0);
            for s in old.sources() {
                if !next.iter().any(|n| Arc::ptr_eq(n, s)) {
                    retired.push(Arc::downgrade(s));
                }
            }
        }
        drop(old);
        // Wakes every refresh loop: cached answers are re-resolved on the new chain
        // and watchers hear of those that changed.
        report.generation = self.cell.store(Chain::new(next));
        tracing::info!(
            generation = report.generation,
            added = ?report.added,
            replaced = ?report.replaced,
            removed = ?report.removed,
            "reloaded the provider chain"
        );
        self.finish(report)
    }

    fn finish(&self, report: ReloadReport) -> ReloadReport {
        {
            let mut status = self.status.lock().expect("status lock");
            status.reloads += 1;
            status.errors = report.errors.clone();
        }
        let result = if report.errors.is_empty() {
            "applied"
        } else {
            "failed"
        };
        metrics::counter!(crate::metrics::names::RELOADS, "result" => result).increment(1);
        for e in &report.errors {
            tracing::warn!("reload: {e}; the previous version keeps serving");
        }
        report
    }
}
