//! The file watcher: the host config file, the plugin folder and every file a provider
//! reads (its module, granted files, TLS files) are watched; after a burst of changes
//! the resolver reloads.
//!
//! Editors and deploy tools write files every way (in place, write-then-rename,
//! delete-then-create, Kubernetes' `..data` symlink flips), so events only say "look
//! again": the watcher watches folders, waits for a quiet moment, and the reload reads
//! everything and compares content fingerprints (`wasd_core::Reloader`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::{mpsc, watch};
use wasd_core::Error;

use crate::config::Config;
use crate::resolver::{Inner, reload_from_files};

/// Quiet time after the last file event before reloading.
const DEBOUNCE: Duration = Duration::from_millis(150);
/// A burst of events never delays a reload longer than this.
const MAX_DEBOUNCE: Duration = Duration::from_secs(2);
/// How often inputs that do not exist yet are looked for. Events are the fast path;
/// this is the floor under them: a folder made and written into before its watch
/// began, or an event queue that overflowed, must not leave a module waiting for ever.
const MISSING_POLL: Duration = Duration::from_secs(1);

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
    /// Inputs and folders that did not exist at the last look: looked at every
    /// [`MISSING_POLL`] as well, in case their creation sent no event we heard.
    missing: HashSet<PathBuf>,
}

impl Inputs {
    fn of(config: &Config) -> Inputs {
        let mut inputs = Inputs::default();
        if let Some(path) = config.path() {
            inputs.file(path);
        }
        for spec in &config.providers {
            for input in spec.input_files() {
                inputs.file(input.path());
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
        if !path.exists() {
            self.missing.insert(path.clone());
        }
        self.files.insert(path);
    }

    /// Watch `folder`, or, until it exists, its nearest existing ancestor (whose
    /// events on the missing parts count).
    fn folder(&mut self, folder: &Path) {
        let mut existing = folder;
        while !existing.is_dir() {
            self.files.insert(existing.to_path_buf());
            self.missing.insert(existing.to_path_buf());
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
    /// Asks the reload task for a reload, as a concerning event does.
    poke: mpsc::UnboundedSender<()>,
}

impl FileWatcher {
    /// Watch what `config` reads. Every wanted folder is watched again each time, so
    /// one that was deleted and made again is not lost.
    pub(crate) fn watch(&mut self, config: &Config) {
        let inputs = Inputs::of(config);
        // Never hold the lock while calling notify: its event thread takes the same
        // lock in the handler, and `watch` waits for that thread.
        let (old, old_files) = {
            let mut current = self.inputs.lock().expect("inputs lock");
            (std::mem::take(&mut current.folders), current.files.clone())
        };
        // Only folders no longer wanted are unwatched: unwatching and watching again
        // a folder that stays would lose the events of a write made in between (a
        // reload re-arms while a deploy tool is still writing). Watching one again is
        // harmless, and needed for a folder deleted and made again.
        for folder in old.difference(&inputs.folders) {
            let _ = self.watcher.unwatch(folder);
        }
        for folder in &inputs.folders {
            if let Err(e) = self.watcher.watch(folder, RecursiveMode::NonRecursive) {
                tracing::warn!(folder = %folder.display(), "cannot watch for changes: {e}");
            }
        }
        // A folder that did not exist at the last look and does now was not watched
        // until this moment: a file written in it meanwhile (a module dropped into a
        // folder just made) sent no event we heard. Look once more.
        let appeared = inputs.folders.iter().any(|folder| old_files.contains(folder));
        *self.inputs.lock().expect("inputs lock") = inputs;
        if appeared {
            let _ = self.poke.send(());
        }
    }
}

/// Start the watcher (watching nothing until [`FileWatcher::watch`]); its task reloads
/// after each burst of changes and ends with the resolver.
pub(crate) fn start(weak: Weak<Inner>, mut shutdown: watch::Receiver<()>) -> Result<FileWatcher, Error> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let poke = tx.clone();
    let inputs = Arc::new(Mutex::new(Inputs::default()));
    let concerned = inputs.clone();
    let awaited = inputs.clone();
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
    .map_err(|e| Error::engine("watch files", e))?;
    tokio::spawn(async move {
        let mut poll = tokio::time::interval(MISSING_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = rx.recv() => if event.is_none() { return },
                _ = poll.tick() => {
                    // Each path that appeared counts once (a reload that fails on it
                    // must not be retried every second); the reload's re-arming
                    // recomputes what is missing.
                    let mut inputs = awaited.lock().expect("inputs lock");
                    let before = inputs.missing.len();
                    inputs.missing.retain(|path| !path.exists());
                    if inputs.missing.len() == before {
                        continue;
                    }
                }
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
            if !reload_from_files(&weak).await {
                return;
            }
        }
    });
    Ok(FileWatcher {
        watcher,
        inputs,
        poke,
    })
}
