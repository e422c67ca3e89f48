//! `wasd check`: load every provider of a configuration, and any extra modules, one by
//! one, and say what is wrong with each instead of stopping at the first problem.

use std::path::PathBuf;

use crate::chain::{chain_specs, plugin_spec};
use crate::config::Config;
use crate::error::Error;
use crate::provider::Provider;
use crate::runtime::Runtime;

/// The outcome of loading one provider.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// The provider's name.
    pub provider: String,
    /// `builtin:config` or the module's path.
    pub source: String,
    /// `None` when it loaded and accepted its configuration; otherwise why not.
    pub problem: Option<String>,
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
        let problem = match Provider::load(&runtime, &spec).await {
            Ok(_) => None,
            Err(Error::Load { reason, .. }) => Some(reason),
            Err(other) => Some(other.to_string()),
        };
        reports.push(CheckReport {
            provider: spec.name,
            source: spec.module.to_string(),
            problem,
        });
    }
    Ok(reports)
}
