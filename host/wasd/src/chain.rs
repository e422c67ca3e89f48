//! The chain a configuration describes: the listed providers in order, then modules
//! in the plugin folder that no entry lists (by file name), then pass-through; and
//! loading it into sandboxed providers.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use wasd_core::{
    Answer, Chain, ConfigError, Error, ProviderError, ProviderErrorKind, ReloadError, Source, SourceQuery,
};
use wasd_sandbox::{Builtin, ModuleSource, Provider, ProviderSpec, Runtime};

use crate::config::Config;

/// Load every provider of the config, in order. A listed provider that fails to load
/// fails the whole load; a plugin-folder module that fails is left out and reported
/// (it may be half-copied; the file watcher retries it on its next change). With
/// `awaiting_files` (a resolver that watches files), a listed module whose file does
/// not exist yet is reported too, and holds its place with [`Missing`]: it joins when
/// the file appears.
pub(crate) async fn load_chain(
    runtime: &Arc<Runtime>,
    config: &Config,
    awaiting_files: bool,
) -> Result<(Chain, Vec<ReloadError>), Error> {
    let mut sources: Vec<Arc<dyn Source>> = Vec::new();
    let mut skipped = Vec::new();
    for spec in chain_specs(config)? {
        if awaiting_files
            && let ModuleSource::File(path) = &spec.module
            && !path.exists()
        {
            tracing::warn!(provider = %spec.name, module = %path.display(), "{MODULE_MISSING}");
            skipped.push(ReloadError::new(
                &spec.name,
                spec.module.to_string(),
                MODULE_MISSING,
            ));
            sources.push(Arc::new(Missing {
                name: spec.name.as_str().into(),
                module: path.display().to_string(),
            }));
            continue;
        }
        match Provider::load(runtime, &spec).await {
            Ok(provider) => sources.push(Arc::new(provider)),
            Err(e) if spec.unlisted => {
                tracing::warn!("{e}");
                skipped.push(reload_error(&spec, e));
            }
            Err(e) => return Err(e),
        }
    }
    Ok((Chain::new(sources), skipped))
}

/// Why a listed provider is not loaded while its module file is missing.
pub(crate) const MODULE_MISSING: &str =
    "the module does not exist yet; it joins the chain when the file appears";

/// A listed provider whose module file does not exist yet. It holds the provider's
/// place in the chain and fails every call, so that no later provider (pass-through)
/// answers in its place; the reload that finds the file replaces it.
struct Missing {
    name: Arc<str>,
    module: String,
}

#[async_trait]
impl Source for Missing {
    fn name(&self) -> &Arc<str> {
        &self.name
    }

    async fn resolve(&self, _query: &SourceQuery) -> Result<Answer, ProviderError> {
        Err(ProviderError::new(
            &*self.name,
            ProviderErrorKind::Unavailable(format!("its module {} does not exist yet", self.module)),
        ))
    }
}

/// A load failure as a reload reports it.
pub(crate) fn reload_error(spec: &ProviderSpec, e: Error) -> ReloadError {
    let reason = match e {
        Error::Load { reason, .. } => reason,
        other => other.to_string(),
    };
    ReloadError::new(&spec.name, spec.module.to_string(), reason)
}

/// The specs of the whole chain, in order.
pub(crate) fn chain_specs(config: &Config) -> Result<Vec<ProviderSpec>, Error> {
    let mut specs = config.providers.clone();
    if let Some(dir) = &config.plugin_dir {
        for path in unlisted_plugins(dir, &specs)? {
            specs.push(ProviderSpec::unlisted(path));
        }
    }
    if config.pass_through {
        specs.push(ProviderSpec::builtin(Builtin::PassThrough));
    }
    Ok(specs)
}

fn unlisted_plugins(dir: &Path, listed: &[ProviderSpec]) -> Result<Vec<std::path::PathBuf>, Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::Config(ConfigError::new(
                Some(dir.to_path_buf()),
                format!("cannot read the plugin folder: {e}"),
            )));
        }
    };
    let mut found: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wasm") && !p.is_dir())
        .filter(|p| {
            let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned());
            !listed
                .iter()
                .any(|spec| spec.module == ModuleSource::File(p.clone()) || Some(&spec.name) == stem.as_ref())
        })
        .collect();
    found.sort();
    Ok(found)
}
