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
    /// A module built for another WIT version is one problem, not one per import of
    /// that version.
    pub(crate) fn problems(&self) -> Vec<String> {
        let foreign = self.foreign_version();
        let mut problems: Vec<String> = self
            .imports
            .iter()
            .filter(|name| !offered(name))
            .filter(|name| {
                foreign.is_none_or(|version| {
                    !(name.starts_with("wasd:provider/") && name.ends_with(&format!("@{version}")))
                })
            })
            .map(|name| format!("imports {name}, which this host does not offer (it offers {OFFERED})"))
            .collect();
        problems.extend(self.export_problem());
        problems
    }

    /// The `wasd:provider` version the component targets, when it is not this host's.
    fn foreign_version(&self) -> Option<&str> {
        self.exports
            .iter()
            .filter_map(|name| name.strip_prefix("wasd:provider/resolver@"))
            .find(|version| format!("wasd:provider/resolver@{version}") != RESOLVER_EXPORT)
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
            let version = other.rsplit('@').next().unwrap_or_default();
            return Some(format!(
                "exports {other}, a WIT version this host does not support: it was built for \
                 wasd:provider@{version}, this host speaks {WIT_PACKAGE} (rebuild it against this host's wit/)"
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
        if imports("wasi:sockets/tcp") && grants.tcp.is_empty() {
            notes.push(
                "imports wasi:sockets/tcp but grants.tcp is empty: any connection it opens will be refused"
                    .to_owned(),
            );
        }
        if imports("wasi:sockets/udp") {
            notes.push("imports wasi:sockets/udp: UDP is never granted, any use will be refused".to_owned());
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

    fn builtin(builtin: crate::Builtin, settings: &str, http: &[&str], dns: &[&str]) -> crate::ProviderSpec {
        let mut spec = crate::ProviderSpec::builtin(builtin);
        spec.settings = settings.to_owned();
        spec.grants.http = http.iter().map(|s| s.to_string()).collect();
        spec.grants.dns = dns.iter().map(|s| s.to_string()).collect();
        spec
    }

    #[test]
    fn builtin_settings_outside_their_grants_are_problems() {
        use crate::Builtin::{Dns, DnsSrv, Etcd};
        let etcd = r#"{"endpoints": ["http://10.0.0.5:2379", "http://etcd:80"]}"#;
        // Covered, with the default port made explicit on either side.
        assert!(
            builtin_grant_problems(&builtin(
                Etcd,
                etcd,
                &["http://10.0.0.5:2379", "http://etcd"],
                &[]
            ))
            .is_empty()
        );
        let problems = builtin_grant_problems(&builtin(Etcd, etcd, &["http://10.0.0.5:2379"], &[]));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("settings.endpoints names http://etcd:80, which grants.http"),
            "{problems:?}"
        );
        assert_eq!(builtin_grant_problems(&builtin(Etcd, etcd, &[], &[])).len(), 2);

        let srv = r#"{"suffix": "cluster.local"}"#;
        assert!(builtin_grant_problems(&builtin(DnsSrv, srv, &[], &["cluster.local"])).is_empty());
        let problems = builtin_grant_problems(&builtin(DnsSrv, srv, &[], &["example.org"]));
        assert_eq!(
            problems,
            [
                "settings.suffix asks for names like _default._tcp.svc.cluster.local, which grants.dns [example.org] does not cover: every lookup will be denied"
            ]
        );
        let template = r#"{"template": "_{endpoint}._tcp.{service}.consul"}"#;
        assert!(builtin_grant_problems(&builtin(DnsSrv, template, &[], &["consul"])).is_empty());
        assert_eq!(
            builtin_grant_problems(&builtin(DnsSrv, template, &[], &["cluster.local"])).len(),
            1
        );
        assert_eq!(builtin_grant_problems(&builtin(Dns, srv, &[], &[])).len(), 1);
        // No suffix (detected in Kubernetes at run time): nothing to check.
        assert!(builtin_grant_problems(&builtin(DnsSrv, "{}", &[], &[])).is_empty());

        let zookeeper = r#"{"servers": ["127.0.0.1:2181", "ZK-2.internal:2181"]}"#;
        let mut spec = builtin(crate::Builtin::ZooKeeper, zookeeper, &[], &[]);
        // Grants are stored normalised (the config does it): the name lower-cased.
        spec.grants.tcp = vec!["127.0.0.1:2181".into(), "zk-2.internal:2181".into()];
        assert!(builtin_grant_problems(&spec).is_empty());
        spec.grants.tcp.pop();
        assert_eq!(
            builtin_grant_problems(&spec),
            [
                "settings.servers names ZK-2.internal:2181, which grants.tcp [127.0.0.1:2181] does not cover: every connection to it will be refused"
            ]
        );
    }

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
        // The foreign WIT version is one problem: its own imports are not listed again.
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("imports acme:cache/store@1.0.0, which this host does not offer"));
        assert!(problems[1].starts_with("imports wasi:http/incoming-handler@0.2.0,"));
        assert_eq!(
            problems[2],
            "exports wasd:provider/resolver@0.2.0, a WIT version this host does not support: it was built for \
             wasd:provider@0.2.0, this host speaks wasd:provider@0.1.0 (rebuild it against this host's wit/)"
        );
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
            &[
                "wasi:http/outgoing-handler@0.2.0",
                "wasd:provider/dns@0.1.0",
                "wasi:sockets/tcp@0.2.3",
            ],
            &[RESOLVER_EXPORT],
        );
        let mut grants = Grants::default();
        let notes = s.ungranted(&grants);
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(
            notes[1].starts_with("imports wasi:sockets/tcp but grants.tcp is empty"),
            "{notes:?}"
        );
        grants.http.push("http://127.0.0.1:2379".into());
        grants.dns.push("cluster.local".into());
        grants.tcp.push("127.0.0.1:2181".into());
        assert!(s.ungranted(&grants).is_empty());
        // UDP is never granted.
        let udp = surface(&["wasi:sockets/udp@0.2.3"], &[RESOLVER_EXPORT]);
        assert_eq!(udp.ungranted(&grants).len(), 1);
    }
}

/// What a standard provider's settings will ask of its grants, checked before it runs:
/// the etcd `endpoints` against `grants.http`, the zookeeper `servers` against
/// `grants.tcp`, the `dns-srv`/`dns` `suffix` or
/// `template` against `grants.dns`. Each is a failure at run time, so each is a problem
/// here, one line each.
pub(crate) fn builtin_grant_problems(spec: &crate::ProviderSpec) -> Vec<String> {
    use crate::{Builtin, ModuleSource};
    let ModuleSource::Builtin(builtin) = &spec.module else {
        return Vec::new();
    };
    let Ok(settings) = serde_json::from_str::<serde_json::Value>(&spec.settings) else {
        return Vec::new();
    };
    let text = |key: &str| settings.get(key).and_then(serde_json::Value::as_str);
    let zones = || format!("[{}]", spec.grants.dns.join(", "));
    let mut problems = Vec::new();
    match builtin {
        Builtin::Etcd => {
            let endpoints: Vec<String> = settings
                .get("endpoints")
                .and_then(serde_json::Value::as_array)
                .map(|list| {
                    list.iter()
                        .filter_map(|e| e.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            for origin in crate::capability::http::ungranted_origins(&spec.grants.http, &endpoints) {
                problems.push(format!(
                    "settings.endpoints names {origin}, which grants.http [{}] does not cover: every request to it will be refused",
                    spec.grants.http.join(", ")
                ));
            }
        }
        Builtin::ZooKeeper => {
            let servers = settings
                .get("servers")
                .and_then(serde_json::Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(serde_json::Value::as_str);
            for server in servers {
                // Granted targets are stored normalised; a server that does not
                // normalise is the provider's own error to report.
                let Ok(target) = crate::capability::tcp::normalize_tcp_target(server) else {
                    continue;
                };
                if !spec.grants.tcp.contains(&target) {
                    problems.push(format!(
                        "settings.servers names {server}, which grants.tcp [{}] does not cover: every connection to it will be refused",
                        spec.grants.tcp.join(", ")
                    ));
                }
            }
        }
        Builtin::DnsSrv | Builtin::Dns => {
            let suffix = text("suffix").map(|s| s.trim_matches('.'));
            // A name the provider would look up, with sample labels.
            let (field, name) = match (text("template"), suffix) {
                (Some(template), suffix) if !template.contains("{suffix}") || suffix.is_some() => (
                    "template",
                    template
                        .replace("{endpoint}", "default")
                        .replace("{service}", "svc")
                        .replace("{suffix}", suffix.unwrap_or_default()),
                ),
                (None, Some(suffix)) if *builtin == Builtin::DnsSrv => {
                    ("suffix", format!("_default._tcp.svc.{suffix}"))
                }
                (None, Some(suffix)) => ("suffix", format!("svc.{suffix}")),
                _ => return problems,
            };
            if !spec.grants.allows_dns(&name) {
                problems.push(format!(
                    "settings.{field} asks for names like {name}, which grants.dns {} does not cover: every lookup will be denied",
                    zones()
                ));
            }
        }
        Builtin::Config | Builtin::PassThrough => {}
    }
    problems
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
        problems: builtin_grant_problems(spec),
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
    // Notes say what will not work although it loads: beside problems, they are noise.
    if !report.problems.is_empty() {
        report.notes.clear();
    }
    report
}
