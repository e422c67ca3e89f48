//! `wasd check`: load every provider of a configuration, and any extra modules, one by
//! one, and say what is wrong with each instead of stopping at the first problem.

use std::path::PathBuf;

use crate::chain::{chain_specs, plugin_spec};
use crate::config::Config;
use crate::error::Error;
use crate::inspect::Surface;
use crate::provider::{Prepared, Provider};
use crate::runtime::Runtime;

/// The outcome of loading one provider.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CheckReport {
    /// The provider's name.
    pub provider: String,
    /// `builtin:config` or the module's path.
    pub source: String,
    /// Why it does not load, one line each: a missing export, a WIT version the host
    /// does not speak, an import the host does not offer, settings it refused...
    /// Empty when it loaded and accepted its configuration.
    pub problems: Vec<String>,
    /// Things that will not work although it loads: a capability it imports that the
    /// configuration does not grant.
    pub notes: Vec<String>,
}

/// Load each provider of `config` (the chain, including plugin-folder modules and
/// pass-through) and each of `modules` (with no settings and no grants), and report on
/// each. Fails only when the config itself is unusable.
pub async fn check(config: &Config, modules: &[PathBuf]) -> Result<Vec<CheckReport>, Error> {
    let runtime = Runtime::new(config.cache_dir.clone(), config.dns.clone())
        .map_err(|e| Error::Engine(format!("{e:#}")))?;
    let mut specs = chain_specs(config)?;
    specs.extend(modules.iter().cloned().map(plugin_spec));
    let mut reports = Vec::with_capacity(specs.len());
    for spec in specs {
        let mut report = CheckReport {
            provider: spec.name.clone(),
            source: spec.module.to_string(),
            problems: Vec::new(),
            notes: Vec::new(),
        };
        let loaded = async {
            let prepared = Prepared::read(&spec).await?;
            let component = Provider::compile(&runtime, &prepared).await?;
            report.notes = Surface::of(&component, &runtime.engine).ungranted(&spec.grants);
            match Provider::link_exports(&runtime, &component) {
                Err(problems) => report.problems = problems,
                Ok(linked) => drop(Provider::start(&runtime, prepared, linked).await?),
            }
            Ok::<_, Error>(())
        };
        match loaded.await {
            Ok(()) => {}
            Err(Error::Load { reason, .. }) => report.problems.push(reason),
            Err(other) => report.problems.push(other.to_string()),
        }
        reports.push(report);
    }
    Ok(reports)
}
