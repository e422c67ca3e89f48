//! The ordered provider chain: ask each provider in turn, stop at the first that has
//! endpoints of an acceptable scheme; pass-through, when enabled, is always last.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::bindings::Query as WitQuery;
use crate::builtin::Builtin;
use crate::config::{Config, Grants, Limits, ModuleSource, ProviderSpec, TlsSpec};
use crate::endpoint::{Endpoint, EndpointSet, filter_by_metadata, select_by_scheme};
use crate::error::{Error, ProviderError};
use crate::provider::Provider;
use crate::runtime::Runtime;

pub(crate) struct ProviderChain {
    providers: Vec<Arc<Provider>>,
}

/// The first useful answer in the chain.
pub(crate) struct ChainAnswer {
    pub set: EndpointSet,
    pub ttl: Option<Duration>,
    /// Providers ahead of the one that answered that failed: their answer, had they
    /// had one, would have won, so a refresh keeps the last good set instead.
    pub failures: Vec<ProviderError>,
    /// The provider that answered, and the version of its answer when it can push
    /// changes (the resolver then watches it instead of polling).
    pub provider: Arc<Provider>,
    pub version: Option<String>,
}

impl ProviderChain {
    /// Load every provider of the config, in order: the listed ones, then modules in
    /// the plugin folder that no entry lists (by file name), then pass-through. A
    /// listed provider that fails to load fails the whole load; a plugin-folder module
    /// that fails is left out and reported (it may be half-copied; the file watcher
    /// retries it on its next change).
    pub async fn load(
        runtime: &Arc<Runtime>,
        config: &Config,
    ) -> Result<(ProviderChain, Vec<(ProviderSpec, Error)>), Error> {
        let mut providers = Vec::new();
        let mut skipped = Vec::new();
        for spec in chain_specs(config)? {
            match Provider::load(runtime, &spec).await {
                Ok(provider) => providers.push(Arc::new(provider)),
                Err(e) if spec.unlisted => {
                    tracing::warn!("{e}");
                    skipped.push((spec, e));
                }
                Err(e) => return Err(e),
            }
        }
        Ok((ProviderChain { providers }, skipped))
    }

    pub fn new(providers: Vec<Arc<Provider>>) -> ProviderChain {
        ProviderChain { providers }
    }

    pub fn providers(&self) -> &[Arc<Provider>] {
        &self.providers
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<Provider>> {
        self.providers.iter().find(|p| &*p.name == name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.providers.iter().map(|p| &*p.name)
    }

    /// The provider that registers instances: the one named, or else the first in the
    /// chain that exports `wasd:provider/registrar`.
    pub fn registrar(&self, name: Option<&str>) -> Option<Arc<Provider>> {
        self.providers
            .iter()
            .find(|p| match name {
                Some(name) => &*p.name == name,
                None => p.is_registrar(),
            })
            .cloned()
    }

    /// Ask the providers in order. `Err` carries the failures met on the way; an empty
    /// list means every provider answered cleanly that it has nothing.
    pub async fn resolve(
        &self,
        query: &WitQuery,
        filters: &[(String, String)],
    ) -> Result<ChainAnswer, Vec<ProviderError>> {
        let mut failures = Vec::new();
        for provider in &self.providers {
            match provider.resolve(query).await {
                Ok(answer) => {
                    let endpoints = select(answer.endpoints, query, filters);
                    if !endpoints.is_empty() {
                        return Ok(ChainAnswer {
                            set: EndpointSet::new(provider.name.clone(), endpoints),
                            ttl: answer.ttl,
                            failures,
                            provider: provider.clone(),
                            version: answer.version,
                        });
                    }
                }
                Err(failure) => {
                    tracing::debug!(service = %query.service, "{failure}");
                    failures.push(failure);
                }
            }
        }
        Err(failures)
    }
}

/// The endpoints of one answer that the query accepts: its metadata filters, then the
/// most preferred scheme present.
pub(crate) fn select(
    endpoints: Vec<Endpoint>,
    query: &WitQuery,
    filters: &[(String, String)],
) -> Vec<Endpoint> {
    select_by_scheme(filter_by_metadata(endpoints, filters), &query.schemes)
}

/// The specs of the whole chain, in order.
pub(crate) fn chain_specs(config: &Config) -> Result<Vec<ProviderSpec>, Error> {
    let mut specs = config.providers.clone();
    if let Some(dir) = &config.plugin_dir {
        for path in unlisted_plugins(dir, &specs)? {
            specs.push(plugin_spec(path));
        }
    }
    if config.pass_through {
        specs.push(ProviderSpec {
            name: Builtin::PassThrough.name().to_owned(),
            module: ModuleSource::Builtin(Builtin::PassThrough),
            settings: "{}".to_owned(),
            grants: Grants::default(),
            limits: Limits::default(),
            tls: TlsSpec::default(),
            unlisted: false,
            sha256: None,
        });
    }
    Ok(specs)
}

/// A module given without configuration: its file stem names it; no settings, no grants.
pub(crate) fn plugin_spec(path: std::path::PathBuf) -> ProviderSpec {
    ProviderSpec {
        name: path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        module: ModuleSource::File(path),
        settings: "{}".to_owned(),
        grants: Grants::default(),
        limits: Limits::default(),
        tls: TlsSpec::default(),
        unlisted: true,
        sha256: None,
    }
}

fn unlisted_plugins(dir: &Path, listed: &[ProviderSpec]) -> Result<Vec<std::path::PathBuf>, Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::Config(crate::ConfigError {
                path: Some(dir.to_path_buf()),
                line: None,
                column: None,
                message: format!("cannot read the plugin folder: {e}"),
            }));
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
