//! `wasd check`: load every provider of a configuration, and any extra modules, one by
//! one, and say what is wrong with each instead of stopping at the first problem.

use std::path::PathBuf;

use wasd_core::{Clock, Error};
use wasd_sandbox::{CheckReport, ProviderSpec, Runtime};

use crate::chain::chain_specs;
use crate::config::Config;

/// Load each provider of `config` (the chain, including plugin-folder modules and
/// pass-through) and each of `modules` (with no settings and no grants), and report on
/// each. Fails only when the config itself is unusable.
pub async fn check(config: &Config, modules: &[PathBuf]) -> Result<Vec<CheckReport>, Error> {
    let runtime = Runtime::new(config.cache_dir.clone(), config.dns.clone(), Clock::exact(), None)?;
    let mut specs = chain_specs(config)?;
    specs.extend(modules.iter().cloned().map(ProviderSpec::unlisted));
    let mut reports = Vec::with_capacity(specs.len());
    for spec in specs {
        reports.push(wasd_sandbox::check(&runtime, &spec).await);
    }
    Ok(reports)
}
