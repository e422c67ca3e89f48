//! What a component imports and exports, read from its type before linking, so a load
//! failure or `wasd check` says in one line what is wrong instead of relaying the
//! linker's first complaint.

use wasmtime::Engine;
use wasmtime::component::Component;

use crate::spec::Grants;

/// The WIT package this host speaks.
pub(crate) const WIT_PACKAGE: &str = "wasd:provider@0.1.0";
/// The export every provider has.
pub(crate) const RESOLVER_EXPORT: &str = "wasd:provider/resolver@0.1.0";

const OFFERED: &str = "WASI 0.2 (cli, clocks, filesystem, io, random, sockets), wasi:http 0.2 and \
                       wasd:provider@0.1.0 (types, log, dns)";

/// A component's imports and exports by name.
pub(crate) struct Surface {
    imports: Vec<String>,
    exports: Vec<String>,
}

impl Surface {
    pub(crate) fn of(component: &Component, engine: &Engine) -> Surface {
        let ty = component.component_type();
        Surface {
            imports: ty.imports(engine).map(|(name, _)| name.to_owned()).collect(),
            exports: ty.exports(engine).map(|(name, _)| name.to_owned()).collect(),
        }
    }

    /// Everything that stops the component from loading as a provider, one line each.
    pub(crate) fn problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = self
            .imports
            .iter()
            .filter(|name| !offered(name))
            .map(|name| format!("imports {name}, which this host does not offer (it offers {OFFERED})"))
            .collect();
        problems.extend(self.export_problem());
        problems
    }

    fn export_problem(&self) -> Option<String> {
        if self.exports.iter().any(|name| name == RESOLVER_EXPORT) {
            return None;
        }
        if let Some(other) = self
            .exports
            .iter()
            .find(|name| name.starts_with("wasd:provider/resolver@"))
        {
            return Some(format!(
                "exports {other}, a WIT version this host does not support (it speaks {WIT_PACKAGE}; \
                 rebuild against this host's wit/)"
            ));
        }
        let exports = if self.exports.is_empty() {
            "nothing".to_owned()
        } else {
            self.exports.join(", ")
        };
        Some(format!(
            "does not export {RESOLVER_EXPORT}, so it is not a provider (it exports {exports})"
        ))
    }

    /// Capabilities the component imports that `grants` leaves closed: it loads, but
    /// every use will be refused.
    pub(crate) fn ungranted(&self, grants: &Grants) -> Vec<String> {
        let imports = |interface: &str| {
            self.imports
                .iter()
                .any(|name| name.split('@').next() == Some(interface))
        };
        let mut notes = Vec::new();
        if imports("wasi:http/outgoing-handler") && grants.http.is_empty() {
            notes.push(
                "imports wasi:http/outgoing-handler but grants.http is empty: any request it makes will be refused"
                    .to_owned(),
            );
        }
        if imports("wasd:provider/dns") && grants.dns.is_empty() {
            notes.push(
                "imports wasd:provider/dns but grants.dns is empty: any lookup it makes will be denied"
                    .to_owned(),
            );
        }
        notes
    }
}

/// Whether the host's linker defines this import (any 0.2 WASI version links: wasmtime
/// matches semver-compatible versions).
fn offered(import: &str) -> bool {
    let Some((path, version)) = import.split_once('@') else {
        return false;
    };
    let package = path.split_once('/').map_or(path, |(package, _)| package);
    match package {
        "wasi:cli" | "wasi:clocks" | "wasi:filesystem" | "wasi:io" | "wasi:random" | "wasi:sockets" => {
            version.starts_with("0.2.")
        }
        "wasi:http" => {
            version.starts_with("0.2.") && matches!(path, "wasi:http/types" | "wasi:http/outgoing-handler")
        }
        "wasd:provider" => {
            version.starts_with("0.1.")
                && matches!(
                    path,
                    "wasd:provider/types" | "wasd:provider/log" | "wasd:provider/dns"
                )
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn surface(imports: &[&str], exports: &[&str]) -> Surface {
        Surface {
            imports: imports.iter().map(|s| s.to_string()).collect(),
            exports: exports.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_provider_has_no_problems() {
        let s = surface(
            &[
                "wasi:io/streams@0.2.12",
                "wasd:provider/log@0.1.0",
                "wasi:http/outgoing-handler@0.2.0",
            ],
            &[RESOLVER_EXPORT],
        );
        assert!(s.problems().is_empty());
    }

    #[test]
    fn each_problem_is_one_line_naming_it() {
        let s = surface(
            &[
                "acme:cache/store@1.0.0",
                "wasi:http/incoming-handler@0.2.0",
                "wasd:provider/dns@0.2.0",
            ],
            &["wasd:provider/resolver@0.2.0"],
        );
        let problems = s.problems();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].starts_with("imports acme:cache/store@1.0.0, which this host does not offer"));
        assert!(problems[1].starts_with("imports wasi:http/incoming-handler@0.2.0,"));
        assert!(problems[2].starts_with("imports wasd:provider/dns@0.2.0,"));
        assert!(problems[3].starts_with("exports wasd:provider/resolver@0.2.0, a WIT version"));
        assert!(problems.iter().all(|p| !p.contains('\n')));
        let none = surface(&[], &["wasi:cli/run@0.2.0"]);
        assert_eq!(
            none.problems(),
            [
                "does not export wasd:provider/resolver@0.1.0, so it is not a provider (it exports wasi:cli/run@0.2.0)"
            ]
        );
    }

    #[test]
    fn closed_capabilities_are_noted() {
        let s = surface(
            &["wasi:http/outgoing-handler@0.2.0", "wasd:provider/dns@0.1.0"],
            &[RESOLVER_EXPORT],
        );
        let mut grants = Grants::default();
        assert_eq!(s.ungranted(&grants).len(), 2);
        grants.http.push("http://127.0.0.1:2379".into());
        grants.dns.push("cluster.local".into());
        assert!(s.ungranted(&grants).is_empty());
    }
}

/// The outcome of loading one provider on its own.
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

/// Load `spec` as a provider would be loaded, and say what is wrong with it instead of
/// stopping at the first problem.
pub async fn check(runtime: &std::sync::Arc<crate::Runtime>, spec: &crate::ProviderSpec) -> CheckReport {
    use crate::provider::{Prepared, Provider};
    let mut report = CheckReport {
        provider: spec.name.clone(),
        source: spec.module.to_string(),
        problems: Vec::new(),
        notes: Vec::new(),
    };
    let loaded = async {
        let prepared = Prepared::read(spec).await?;
        let component = Provider::compile(runtime, &prepared).await?;
        report.notes = Surface::of(&component, &runtime.engine).ungranted(&spec.grants);
        match Provider::link_exports(runtime, &component) {
            Err(problems) => report.problems = problems,
            Ok(linked) => drop(Provider::start(runtime, prepared, linked).await?),
        }
        Ok::<_, wasd_core::Error>(())
    };
    match loaded.await {
        Ok(()) => {}
        Err(wasd_core::Error::Load { reason, .. }) => report.problems.push(reason),
        Err(other) => report.problems.push(other.to_string()),
    }
    report
}
