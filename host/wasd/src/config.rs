//! The host configuration (`wasd.toml`): which providers, in which order, with which
//! settings, grants and limits.
//!
//! ```toml
//! allowed-schemes = ["https", "http"]   # default: every scheme
//! pass-through = true                    # default: true; always runs last
//! refresh-period = "60s"
//! plugin-dir = "plugins"
//!
//! [[provider]]
//! builtin = "config"                     # or: module = "plugins/mine.wasm"
//! settings = { section = "Services" }
//! grants = { files = ["appsettings.json"], env = ["services__*"] }
//! limits = { max-memory = "64MiB", timeout = "1s" }
//! ```
//!
//! Unknown keys are errors, reported with file, line and column.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::balance::{HealthCheck, Outlier, Policies, Policy, Selector, Subset};
use crate::observe::DEFAULT_MAX_SERVICES;
use wasd_core::{ConfigError, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_LONG_POLLS, DEFAULT_REFRESH_PERIOD};
use wasd_sandbox::{
    Builtin, DEFAULT_MAX_ENDPOINTS, DEFAULT_MAX_MEMORY, DEFAULT_TIMEOUT, DnsSettings, Grants, Limits,
    ModuleSource, ProviderSpec, TlsSpec, normalize_origin, normalize_tcp_target,
};

/// A validated host configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) path: Option<PathBuf>,
    pub(crate) plugin_dir: Option<PathBuf>,
    pub(crate) cache_dir: Option<PathBuf>,
    pub(crate) allowed_schemes: Vec<String>,
    pub(crate) pass_through: bool,
    pub(crate) refresh_period: Duration,
    pub(crate) idle_timeout: Duration,
    /// Most unwatched queries followed by long-poll at once (`max-watches`).
    pub(crate) max_watches: usize,
    pub(crate) dns: DnsSettings,
    pub(crate) providers: Vec<ProviderSpec>,
    /// The provider that registers instances; none: the first one that can.
    pub(crate) registrar: Option<String>,
    /// Distinct services `wasd_endpoints` gets a series for (`[metrics] max-services`).
    pub(crate) metrics_max_services: usize,
    /// `[serve]`: where `wasd serve` listens.
    pub(crate) serve: ServeSettings,
    /// `[[policy]]` and `zone`: how balancers pick.
    pub(crate) policies: Policies,
}

/// The `[serve]` table: `wasd serve`'s listeners (its flags override them). Read when
/// the server starts; a reload does not move listeners.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServeSettings {
    /// `http`: the HTTP API's address.
    pub http: Option<std::net::SocketAddr>,
    /// `dns`: the DNS server's address.
    pub dns: Option<std::net::SocketAddr>,
    /// `dns-zone`: the zone the DNS server answers for.
    pub dns_zone: Option<String>,
    /// `dns-ttl`: the most a DNS record's TTL may be.
    pub dns_ttl: Option<Duration>,
    /// `token-env`: the environment variable holding the bearer token that mutating
    /// HTTP calls need.
    pub token_env: Option<String>,
    /// `xds`: the xDS (ADS) server's address; none unless set here or by `--xds`.
    pub xds: Option<std::net::SocketAddr>,
    /// `[serve.xds-services.NAME]`: the query an xDS service name stands for, where it
    /// is not `grpc://NAME`.
    pub xds_services: std::collections::HashMap<String, XdsService>,
}

/// The query an xDS service name stands for (`[serve.xds-services.NAME]`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct XdsService {
    /// `query`: the query's text (default `grpc://NAME`).
    pub query: String,
    /// `filters`: metadata filters, `KEY = "VALUE"` each.
    pub filters: Vec<(String, String)>,
}

impl XdsService {
    /// What `NAME` stands for unless configured: `grpc://NAME`.
    pub fn default_for(name: &str) -> XdsService {
        XdsService {
            query: format!("grpc://{name}"),
            filters: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    plugin_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    #[serde(default = "yes")]
    cache: bool,
    #[serde(default)]
    allowed_schemes: Vec<Spanned<String>>,
    #[serde(default = "yes")]
    pass_through: bool,
    refresh_period: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    max_watches: Option<usize>,
    #[serde(default)]
    dns: RawDns,
    #[serde(default, rename = "provider")]
    providers: Vec<Spanned<RawProvider>>,
    registrar: Option<Spanned<String>>,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    serve: RawServe,
    /// This process's zone (`WASD_ZONE` overrides it).
    zone: Option<Spanned<String>>,
    #[serde(default, rename = "policy")]
    policies: Vec<Spanned<RawPolicy>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawPolicy {
    service: Option<Spanned<String>>,
    query: Option<Spanned<String>>,
    strategy: Option<Spanned<String>>,
    zone: Option<Spanned<String>>,
    zone_min_healthy: Option<Spanned<f64>>,
    subset: Option<Spanned<RawSubset>>,
    health: Option<Spanned<RawHealth>>,
    outlier: Option<Spanned<RawOutlier>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawSubset {
    size: Spanned<usize>,
    /// An integer, or a text whose hash is taken; default: the host name's.
    client_id: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawHealth {
    http: Option<String>,
    grpc: Option<String>,
    tcp: Option<bool>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    healthy_threshold: Option<Spanned<u32>>,
    unhealthy_threshold: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawOutlier {
    consecutive_failures: Option<Spanned<u32>>,
    base_ejection: Option<Spanned<String>>,
    max_ejection: Option<Spanned<String>>,
    max_ejection_percent: Option<Spanned<u32>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawServe {
    http: Option<Spanned<String>>,
    dns: Option<Spanned<String>>,
    dns_zone: Option<Spanned<String>>,
    dns_ttl: Option<Spanned<String>>,
    token_env: Option<Spanned<String>>,
    xds: Option<Spanned<String>>,
    #[serde(default)]
    xds_services: std::collections::BTreeMap<String, Spanned<RawXdsService>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawXdsService {
    query: Option<Spanned<String>>,
    #[serde(default)]
    filters: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawMetrics {
    max_services: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawDns {
    #[serde(default)]
    servers: Vec<Spanned<String>>,
    timeout: Option<Spanned<String>>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawProvider {
    name: Option<Spanned<String>>,
    builtin: Option<Spanned<String>>,
    module: Option<Spanned<PathBuf>>,
    #[serde(default)]
    settings: toml::Table,
    #[serde(default)]
    grants: RawGrants,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    tls: RawTls,
    sha256: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawTls {
    ca_file: Option<PathBuf>,
    client_cert_file: Option<Spanned<PathBuf>>,
    client_key_file: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawGrants {
    #[serde(default)]
    files: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    dns: Vec<String>,
    #[serde(default)]
    http: Vec<Spanned<String>>,
    #[serde(default)]
    tcp: Vec<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawLimits {
    max_memory: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    max_endpoints: Option<usize>,
}

/// Turns byte offsets into the line/column of a [`ConfigError`].
struct Source<'a> {
    path: Option<&'a Path>,
    text: &'a str,
}

impl Source<'_> {
    fn error(&self, span: Option<std::ops::Range<usize>>, message: impl Into<String>) -> ConfigError {
        let path = self.path.map(Path::to_path_buf);
        match span {
            Some(span) => {
                let before = &self.text[..span.start.min(self.text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                ConfigError::at(path, line, column, message)
            }
            None => ConfigError::new(path, message),
        }
    }

    fn at<T>(&self, spanned: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        self.error(Some(spanned.span()), message)
    }
}

impl Config {
    /// The configuration used when there is no config file: the configuration provider
    /// reading `./appsettings.json` (if present) and `services__*` environment
    /// variables, then pass-through.
    pub fn builtin_defaults() -> Config {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        Config {
            path: None,
            plugin_dir: Some(cwd.join("plugins")),
            cache_dir: default_cache_dir(),
            allowed_schemes: Vec::new(),
            pass_through: true,
            refresh_period: DEFAULT_REFRESH_PERIOD,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_watches: DEFAULT_MAX_LONG_POLLS,
            dns: DnsSettings::default(),
            providers: vec![ProviderSpec {
                name: Builtin::Config.name().to_owned(),
                module: ModuleSource::Builtin(Builtin::Config),
                settings: "{}".to_owned(),
                grants: Grants {
                    files: vec![("appsettings.json".to_owned(), cwd.join("appsettings.json"))],
                    env: vec!["services__*".to_owned()],
                    ..Grants::default()
                },
                limits: Limits::default(),
                tls: TlsSpec::default(),
                unlisted: false,
                sha256: None,
            }],
            registrar: None,
            metrics_max_services: DEFAULT_MAX_SERVICES,
            serve: ServeSettings::default(),
            policies: Policies::default(),
        }
    }

    /// Where the CLI and embedders look for configuration, in order: the file named by
    /// `WASD_CONFIG`, `./wasd.toml`, then [`Config::builtin_defaults`].
    pub fn discover() -> Result<Config, ConfigError> {
        if let Some(path) = std::env::var_os("WASD_CONFIG").filter(|p| !p.is_empty()) {
            return Config::from_file(Path::new(&path));
        }
        let local = Path::new("wasd.toml");
        if local.is_file() {
            return Config::from_file(local);
        }
        Ok(Config::builtin_defaults())
    }

    /// Read and validate a TOML config file. Relative paths in it are relative to the
    /// file's folder.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(
                Some(path.to_path_buf()),
                format!("cannot read the config file: {e}"),
            )
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        Config::parse(&text, Some(path), &base)
    }

    /// Parse a TOML config given as text. Relative paths are relative to `base_dir`.
    pub fn from_toml(text: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        Config::parse(text, None, base_dir)
    }

    fn parse(text: &str, path: Option<&Path>, base: &Path) -> Result<Config, ConfigError> {
        let src = Source { path, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| src.error(e.span(), e.message()))?;
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };

        let mut allowed_schemes = Vec::new();
        for scheme in &raw.allowed_schemes {
            let s = scheme.get_ref();
            if s.is_empty()
                || !s
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            {
                return Err(src.at(scheme, format!("'{s}' is not a valid scheme")));
            }
            allowed_schemes.push(s.to_ascii_lowercase());
        }
        let duration = |value: &Option<Spanned<String>>, default| match value {
            None => Ok(default),
            Some(v) => parse_duration(v.get_ref()).map_err(|e| src.at(v, e)),
        };
        let plugin_dir = resolve(raw.plugin_dir.as_deref().unwrap_or(Path::new("plugins")));
        let mut config = Config {
            path: path.map(Path::to_path_buf),
            plugin_dir: Some(plugin_dir),
            cache_dir: if raw.cache {
                raw.cache_dir.as_deref().map(resolve).or_else(default_cache_dir)
            } else {
                None
            },
            allowed_schemes,
            pass_through: raw.pass_through,
            refresh_period: duration(&raw.refresh_period, DEFAULT_REFRESH_PERIOD)?,
            idle_timeout: duration(&raw.idle_timeout, DEFAULT_IDLE_TIMEOUT)?,
            max_watches: raw.max_watches.unwrap_or(DEFAULT_MAX_LONG_POLLS),
            dns: DnsSettings {
                servers: raw
                    .dns
                    .servers
                    .iter()
                    .map(|s| {
                        s.get_ref().parse().map_err(|_| {
                            src.at(
                                s,
                                format!(
                                    "'{}' is not a name server address like \"127.0.0.1:53\"",
                                    s.get_ref()
                                ),
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?,
                timeout: raw
                    .dns
                    .timeout
                    .as_ref()
                    .map(|t| parse_duration(t.get_ref()).map_err(|e| src.at(t, e)))
                    .transpose()?,
            },
            providers: Vec::new(),
            registrar: None,
            metrics_max_services: raw.metrics.max_services.unwrap_or(DEFAULT_MAX_SERVICES),
            serve: ServeSettings::default(),
            policies: Policies {
                rules: {
                    let mut rules: Vec<(Selector, Policy)> = Vec::new();
                    for spanned in &raw.policies {
                        let (selector, policy) = policy(&src, spanned)?;
                        if rules.iter().any(|(s, _)| *s == selector) {
                            return Err(src.at(
                                spanned,
                                "another [[policy]] names the same service or query; one would never apply",
                            ));
                        }
                        rules.push((selector, policy));
                    }
                    rules
                },
                zone: match &raw.zone {
                    Some(zone) if zone.get_ref().trim().is_empty() => {
                        return Err(src.at(zone, "zone names no zone"));
                    }
                    Some(zone) => Some(zone.get_ref().trim().to_owned()),
                    None => None,
                },
            },
        };
        let address = |value: &Option<Spanned<String>>| {
            value
                .as_ref()
                .map(|v| {
                    v.get_ref().parse().map_err(|_| {
                        src.at(
                            v,
                            format!(
                                "'{}' is not an address like \"127.0.0.1:8585\"",
                                v.get_ref().escape_default()
                            ),
                        )
                    })
                })
                .transpose()
        };
        config.serve = ServeSettings {
            http: address(&raw.serve.http)?,
            dns: address(&raw.serve.dns)?,
            dns_zone: raw.serve.dns_zone.as_ref().map(|z| z.get_ref().clone()),
            dns_ttl: raw
                .serve
                .dns_ttl
                .as_ref()
                .map(|t| parse_duration(t.get_ref()).map_err(|e| src.at(t, e)))
                .transpose()?,
            token_env: match &raw.serve.token_env {
                Some(name) if name.get_ref().is_empty() => {
                    return Err(src.at(name, "token-env names no variable"));
                }
                Some(name) => Some(name.get_ref().clone()),
                None => None,
            },
            xds: address(&raw.serve.xds)?,
            xds_services: raw
                .serve
                .xds_services
                .iter()
                .map(|(name, spanned)| {
                    let service = spanned.get_ref();
                    let query = match &service.query {
                        Some(query) => {
                            crate::Query::parse(query.get_ref()).map_err(|e| src.at(query, e.to_string()))?;
                            query.get_ref().clone()
                        }
                        None => XdsService::default_for(name).query,
                    };
                    Ok((
                        name.clone(),
                        XdsService {
                            query,
                            filters: service.filters.clone().into_iter().collect(),
                        },
                    ))
                })
                .collect::<Result<_, ConfigError>>()?,
        };
        for spanned in &raw.providers {
            let spec = provider_spec(&src, spanned, &config, &resolve)?;
            if config.providers.iter().any(|p| p.name == spec.name) {
                return Err(src.at(
                    spanned,
                    format!("two providers are named '{}'; names must be unique", spec.name),
                ));
            }
            config.providers.push(spec);
        }
        if let Some(name) = &raw.registrar {
            if !config.providers.iter().any(|p| &p.name == name.get_ref()) {
                return Err(src.at(name, format!("no provider is named '{}'", name.get_ref())));
            }
            config.registrar = Some(name.get_ref().clone());
        }
        Ok(config)
    }

    /// The `[serve]` table.
    pub fn serve(&self) -> &ServeSettings {
        &self.serve
    }

    /// The `[[policy]]` tables and the process's zone.
    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    /// The config file this came from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Override the plugin folder (`None`: no plugin folder).
    pub fn set_plugin_dir(&mut self, dir: Option<PathBuf>) {
        self.plugin_dir = dir;
    }

    /// Override the folder of precompiled components (`None`: compile every time).
    pub fn set_cache_dir(&mut self, dir: Option<PathBuf>) {
        self.cache_dir = dir;
    }
}

fn provider_spec(
    src: &Source<'_>,
    spanned: &Spanned<RawProvider>,
    config: &Config,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<ProviderSpec, ConfigError> {
    let raw = spanned.get_ref();
    let module = match (&raw.builtin, &raw.module) {
        (Some(_), Some(module)) => {
            return Err(src.at(module, "a provider takes `builtin` or `module`, not both"));
        }
        (Some(builtin), None) => {
            let b = Builtin::from_name(builtin.get_ref()).ok_or_else(|| {
                src.at(
                    builtin,
                    format!(
                        "unknown builtin provider '{}' (known: {})",
                        builtin.get_ref(),
                        Builtin::ALL_CONFIGURABLE
                            .iter()
                            .map(|b| b.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?;
            if b == Builtin::PassThrough {
                return Err(src.at(
                    builtin,
                    "pass-through always runs last; switch it with the top-level `pass-through = true|false`",
                ));
            }
            ModuleSource::Builtin(b)
        }
        (None, Some(module)) => ModuleSource::File(resolve(module.get_ref())),
        (None, None) => match &raw.name {
            // A provider listed by name only lives in the plugin folder.
            Some(name) => match &config.plugin_dir {
                Some(dir) => ModuleSource::File(dir.join(format!("{}.wasm", name.get_ref()))),
                None => return Err(src.at(name, "no plugin folder to find this provider in; give `module`")),
            },
            None => {
                return Err(src.at(
                    spanned,
                    "a provider needs `builtin`, `module`, or a `name` found in the plugin folder",
                ));
            }
        },
    };
    let name = match (&raw.name, &module) {
        (Some(name), _) => {
            let n = name.get_ref();
            if n.is_empty()
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(src.at(
                    name,
                    format!("provider name '{n}' may only use letters, digits, '-', '_' and '.'"),
                ));
            }
            n.clone()
        }
        (None, ModuleSource::Builtin(b)) => b.name().to_owned(),
        (None, ModuleSource::File(path)) => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let mut http = Vec::new();
    for origin in &raw.grants.http {
        http.push(normalize_origin(origin.get_ref()).map_err(|e| src.at(origin, e))?);
    }
    let mut tcp = Vec::new();
    for target in &raw.grants.tcp {
        tcp.push(
            normalize_tcp_target(target.get_ref()).map_err(|e| src.at(target, format!("grants.tcp: {e}")))?,
        );
    }
    let limits = Limits {
        max_memory: match &raw.limits.max_memory {
            None => DEFAULT_MAX_MEMORY,
            Some(v) => parse_size(v.get_ref()).map_err(|e| src.at(v, e))?,
        },
        timeout: match &raw.limits.timeout {
            None => DEFAULT_TIMEOUT,
            Some(v) => parse_duration(v.get_ref()).map_err(|e| src.at(v, e))?,
        },
        max_endpoints: raw.limits.max_endpoints.unwrap_or(DEFAULT_MAX_ENDPOINTS),
    };
    let client = match (&raw.tls.client_cert_file, &raw.tls.client_key_file) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some((resolve(cert.get_ref()), resolve(key.get_ref()))),
        (Some(one), None) | (None, Some(one)) => {
            return Err(src.at(one, "tls needs both `client-cert-file` and `client-key-file`"));
        }
    };
    let tls = TlsSpec {
        ca_file: raw.tls.ca_file.as_deref().map(resolve),
        client,
    };
    let sha256 = match &raw.sha256 {
        None => None,
        Some(pin) => {
            let hex = pin.get_ref().trim().to_ascii_lowercase();
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(src.at(
                    pin,
                    "sha256 must be 64 hexadecimal digits (`sha256sum module.wasm`)",
                ));
            }
            Some(hex)
        }
    };
    Ok(ProviderSpec {
        name,
        module,
        settings: serde_json::to_string(&raw.settings)
            .map_err(|e| src.at(spanned, format!("settings: {e}")))?,
        grants: Grants {
            files: raw
                .grants
                .files
                .iter()
                .map(|f| (f.clone(), resolve(Path::new(f))))
                .collect(),
            env: raw.grants.env.clone(),
            dns: raw.grants.dns.iter().map(|z| z.to_ascii_lowercase()).collect(),
            http,
            tcp,
        },
        limits,
        tls,
        unlisted: false,
        sha256,
    })
}

/// One `[[policy]]` table: which queries it names, and the policy.
fn policy(src: &Source<'_>, spanned: &Spanned<RawPolicy>) -> Result<(Selector, Policy), ConfigError> {
    let raw = spanned.get_ref();
    let selector = match (&raw.service, &raw.query) {
        (Some(_), Some(query)) => {
            return Err(src.at(query, "a policy names a `service` or a `query`, not both"));
        }
        (Some(service), None) if service.get_ref() == "*" => Selector::Any,
        (Some(service), None) => {
            let name = service.get_ref();
            crate::Query::parse(name)
                .ok()
                .filter(|q| q.service() == name)
                .ok_or_else(|| src.at(service, format!("'{name}' is not a service name (or \"*\")")))?;
            Selector::Service(name.clone())
        }
        (None, Some(query)) => {
            let parsed = crate::Query::parse(query.get_ref()).map_err(|e| src.at(query, e.to_string()))?;
            Selector::Query(parsed.as_str().to_owned())
        }
        (None, None) => {
            return Err(src.at(
                spanned,
                "a policy needs `service = \"NAME\"` (or \"*\") or `query = \"...\"`",
            ));
        }
    };
    let duration = |value: &Option<Spanned<String>>| {
        value
            .as_ref()
            .map(|v| parse_duration(v.get_ref()).map_err(|e| src.at(v, e)))
            .transpose()
    };
    // A duration that must be more than nothing, and a count that must be at least 1.
    let nonzero = |value: &Option<Spanned<String>>, what: &str| match (duration(value)?, value) {
        (Some(d), Some(v)) if d.is_zero() => Err(src.at(v, format!("{what} must be more than 0"))),
        (d, _) => Ok(d),
    };
    let count = |value: &Option<Spanned<u32>>, what: &str| match value {
        Some(v) if *v.get_ref() == 0 => Err(src.at(v, format!("{what} must be at least 1"))),
        Some(v) => Ok(Some(*v.get_ref())),
        None => Ok(None),
    };
    let mut policy = Policy::default();
    if let Some(strategy) = &raw.strategy {
        policy.strategy = strategy
            .get_ref()
            .parse()
            .map_err(|e: String| src.at(strategy, e))?;
    }
    if let Some(zone) = &raw.zone {
        if zone.get_ref().trim().is_empty() {
            return Err(src.at(zone, "zone names no zone"));
        }
        policy.zone = Some(zone.get_ref().trim().to_owned());
    }
    if let Some(share) = &raw.zone_min_healthy {
        let value = *share.get_ref();
        if !(0.0..=1.0).contains(&value) {
            return Err(src.at(
                share,
                format!("zone-min-healthy is a share from 0 to 1, not {value}"),
            ));
        }
        policy.zone_min_healthy = value;
    }
    if let Some(subset) = &raw.subset {
        let s = subset.get_ref();
        if *s.size.get_ref() == 0 {
            return Err(src.at(&s.size, "a subset needs at least one endpoint"));
        }
        let client_id = match &s.client_id {
            None => Subset::id_of(&host_name()),
            Some(toml::Value::Integer(n)) if *n >= 0 => *n as u64,
            Some(toml::Value::String(text)) => Subset::id_of(text),
            Some(_) => {
                return Err(src.at(subset, "subset client-id is a whole number or a text"));
            }
        };
        policy.subset = Some(Subset::new(*s.size.get_ref(), client_id));
    }
    if let Some(health) = &raw.health {
        let h = health.get_ref();
        let mut check = match (&h.http, &h.grpc, h.tcp) {
            (Some(path), None, None | Some(false)) => HealthCheck::http(path.clone()),
            (None, Some(service), None | Some(false)) => HealthCheck::grpc(service.clone()),
            (None, None, Some(true)) => HealthCheck::tcp(),
            _ => {
                return Err(src.at(
                    health,
                    "a health check is one of `http = \"/path\"`, `grpc = \"service\"` or `tcp = true`",
                ));
            }
        };
        #[cfg(not(feature = "health-grpc"))]
        if h.grpc.is_some() {
            return Err(src.at(health, "gRPC health checks need wasd's `health-grpc` feature"));
        }
        if let Some(interval) = nonzero(&h.interval, "a check's interval")? {
            check = check.with_interval(interval);
        }
        if let Some(timeout) = nonzero(&h.timeout, "a check's timeout")? {
            check = check.with_timeout(timeout);
        }
        let healthy = count(&h.healthy_threshold, "healthy-threshold")?.unwrap_or(check.healthy_threshold);
        let unhealthy =
            count(&h.unhealthy_threshold, "unhealthy-threshold")?.unwrap_or(check.unhealthy_threshold);
        check = check.with_thresholds(healthy, unhealthy);
        policy.health = Some(check);
    }
    if let Some(outlier) = &raw.outlier {
        let o = outlier.get_ref();
        let mut set = Outlier::default();
        if let Some(n) = count(&o.consecutive_failures, "consecutive-failures")? {
            set = set.with_consecutive_failures(n);
        }
        if let Some(base) = duration(&o.base_ejection)? {
            set = set.with_base_ejection(base);
        }
        if let Some(max) = duration(&o.max_ejection)? {
            set = set.with_max_ejection(max);
        }
        if let Some(percent) = &o.max_ejection_percent {
            let value = *percent.get_ref();
            if value > 100 {
                return Err(src.at(
                    percent,
                    format!("max-ejection-percent is at most 100, not {value}"),
                ));
            }
            set = set.with_max_ejection_percent(value as u8);
        }
        policy.outlier = set;
    }
    Ok((selector, policy))
}

/// This machine's name, for a subset's default client id.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_owned())
        .unwrap_or_default()
}

fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("wasd"))
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("'{text}' is not a duration like \"500ms\", \"15s\" or \"5m\" ({e})"))
}

fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let unit_size: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => {
            return Err(format!(
                "'{text}' is not a size like \"64MiB\" (units: B, KiB, MiB, GiB)"
            ));
        }
    };
    number
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(unit_size))
        .ok_or_else(|| format!("'{text}' is not a size like \"64MiB\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Some(Path::new("wasd.toml")), Path::new("/srv"))
    }

    #[test]
    fn full_config() {
        let c = parse(
            r#"
allowed-schemes = ["HTTPS"]
pass-through = false
refresh-period = "30s"

[[provider]]
builtin = "config"
settings = { section = "Endpoints" }
grants = { files = ["appsettings.json"], env = ["endpoints__*"], http = ["HTTP://127.0.0.1:2379/"], tcp = ["ZK-1.Internal:2181"] }
limits = { max-memory = "16MiB", timeout = "250ms", max-endpoints = 5 }

[[provider]]
name = "mine"
module = "/opt/mine.wasm"
"#,
        )
        .unwrap();
        assert_eq!(c.allowed_schemes, ["https"]);
        assert!(!c.pass_through);
        assert_eq!(c.refresh_period, Duration::from_secs(30));
        assert_eq!(c.plugin_dir.as_deref(), Some(Path::new("/srv/plugins")));
        let p = &c.providers[0];
        assert_eq!(p.name, "config");
        assert_eq!(p.settings, r#"{"section":"Endpoints"}"#);
        assert_eq!(
            p.grants.files,
            [(
                "appsettings.json".to_owned(),
                PathBuf::from("/srv/appsettings.json")
            )]
        );
        assert_eq!(p.grants.http, ["http://127.0.0.1:2379"]);
        assert_eq!(p.grants.tcp, ["zk-1.internal:2181"]);
        assert_eq!(
            p.limits,
            Limits {
                max_memory: 16 << 20,
                timeout: Duration::from_millis(250),
                max_endpoints: 5
            }
        );
        assert_eq!(c.providers[1].module, ModuleSource::File("/opt/mine.wasm".into()));
        assert_eq!(c.providers[1].name, "mine");
    }

    #[test]
    fn limits_left_out_are_the_documented_defaults() {
        // README and docs/SECURITY.md promise these; a change must be a decision.
        let c = parse(
            "[[provider]]\nname = \"mine\"\nlimits = { timeout = \"2s\" }\n[[provider]]\nname = \"other\"\n",
        )
        .unwrap();
        let documented = Limits {
            max_memory: 64 << 20,
            timeout: Duration::from_secs(1),
            max_endpoints: 10_000,
        };
        assert_eq!(c.providers[1].limits, documented);
        // One limit given, the others keep their defaults.
        assert_eq!(
            c.providers[0].limits,
            Limits {
                timeout: Duration::from_secs(2),
                ..documented
            }
        );
    }

    #[test]
    fn provider_by_name_lives_in_plugin_folder() {
        let c = parse("plugin-dir = \"mods\"\n[[provider]]\nname = \"static\"\n").unwrap();
        assert_eq!(
            c.providers[0].module,
            ModuleSource::File("/srv/mods/static.wasm".into())
        );
    }

    #[test]
    fn errors_name_file_line_and_reason() {
        for (text, expected) in [
            ("pass-thru = true", "wasd.toml:1:1: unknown field `pass-thru`"),
            (
                "[[provider]]\nbuiltin = \"conifg\"",
                "wasd.toml:2:11: unknown builtin provider 'conifg'",
            ),
            (
                "[[provider]]\nbuiltin = \"pass-through\"",
                "wasd.toml:2:11: pass-through always runs last",
            ),
            (
                "[[provider]]\nbuiltin = \"config\"\nlimits = { timeout = \"soon\" }",
                "wasd.toml:3:22: 'soon' is not a duration",
            ),
            (
                "[[provider]]\nbuiltin = \"config\"\nlimits = { max-memory = \"lots\" }",
                "wasd.toml:3:25: 'lots' is not a size",
            ),
            (
                "[[provider]]\nbuiltin = \"config\"\n[[provider]]\nbuiltin = \"config\"",
                "wasd.toml:3:1: two providers are named 'config'",
            ),
            (
                "[[provider]]\nbuiltin = \"config\"\ngrants = { http = [\"etcd:2379\"] }",
                "wasd.toml:3:20: 'etcd:2379' is not an origin",
            ),
            (
                "[[provider]]\nbuiltin = \"config\"\ngrants = { tcp = [\"zk-1\"] }",
                "wasd.toml:3:19: grants.tcp: 'zk-1' is not an address like \"127.0.0.1:2181\"",
            ),
            (
                "[[provider]]\nbuiltin = \"config\"\ngrants = { tcp = [\"zk-1:99999\"] }",
                "wasd.toml:3:19: grants.tcp: 'zk-1:99999': the port must be 1-65535",
            ),
            (
                "[[provider]]\nsettings = {}",
                "wasd.toml:1:1: a provider needs `builtin`, `module`",
            ),
            (
                "allowed-schemes = [\"ht tp\"]",
                "wasd.toml:1:20: 'ht tp' is not a valid scheme",
            ),
            ("refresh-period = ", "wasd.toml:1:18: "),
        ] {
            let err = parse(text).expect_err(text).to_string();
            assert!(
                err.starts_with(expected),
                "{text:?}\n  got: {err}\n want: {expected}"
            );
        }
    }

    #[test]
    fn grants_match_env_and_dns() {
        let g = Grants {
            env: vec!["services__*".into(), "HOME".into()],
            dns: vec!["cluster.local".into(), "*.example.org".into()],
            ..Grants::default()
        };
        assert!(g.allows_env("SERVICES__catalog__https__0"));
        assert!(g.allows_env("home"));
        assert!(!g.allows_env("HOMEPATH"));
        assert!(!g.allows_env("service"));
        assert!(g.allows_dns("_default._tcp.basket.default.svc.cluster.local."));
        assert!(g.allows_dns("cluster.local"));
        assert!(g.allows_dns("a.example.org"));
        assert!(!g.allows_dns("evilcluster.local"));
        assert!(!g.allows_dns("example.com"));
        assert!(
            Grants {
                dns: vec!["*".into()],
                ..Grants::default()
            }
            .allows_dns("anything")
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("64MB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn example_configs_parse() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        for name in ["full-config.toml", "etcd.toml", "zookeeper.toml"] {
            let c = Config::from_file(&examples.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!c.providers.is_empty(), "{name}");
        }
        let etcd = Config::from_file(&examples.join("etcd.toml")).unwrap();
        assert_eq!(etcd.registrar.as_deref(), Some("etcd"));
        assert_eq!(etcd.providers[0].grants.http, ["http://127.0.0.1:2379"]);
        let zookeeper = Config::from_file(&examples.join("zookeeper.toml")).unwrap();
        assert_eq!(zookeeper.registrar.as_deref(), Some("zookeeper"));
        assert_eq!(zookeeper.providers[0].grants.tcp, ["127.0.0.1:2181"]);
    }

    #[test]
    fn debug_output_hides_settings() {
        let c = parse("[[provider]]\nbuiltin = \"etcd\"\nsettings = { password = \"hunter2\" }").unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2") && shown.contains("bytes>"), "{shown}");
    }

    #[test]
    fn tls_and_registrar() {
        let c = parse(
            r#"
registrar = "reg"
[[provider]]
name = "reg"
builtin = "etcd"
tls = { ca-file = "ca.pem", client-cert-file = "/etc/c.pem", client-key-file = "c.key" }
"#,
        )
        .unwrap();
        let tls = &c.providers[0].tls;
        assert_eq!(tls.ca_file.as_deref(), Some(Path::new("/srv/ca.pem")));
        assert_eq!(
            tls.client,
            Some((PathBuf::from("/etc/c.pem"), PathBuf::from("/srv/c.key")))
        );
        for (text, expected) in [
            (
                "[[provider]]\nbuiltin = \"etcd\"\ntls = { client-cert-file = \"c.pem\" }",
                "wasd.toml:3:28: tls needs both",
            ),
            (
                "registrar = \"etcd\"",
                "wasd.toml:1:13: no provider is named 'etcd'",
            ),
            (
                "[[provider]]\nbuiltin = \"etcd\"\ntls = { ca = \"x\" }",
                "unknown field `ca`",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(expected), "{text}: {e}");
        }
    }

    #[test]
    fn policies_parse_with_their_defaults_and_bad_ones_say_where() {
        let c = parse(
            r#"
zone = "a"
[[policy]]
service = "catalog"
strategy = "weighted-round-robin"
zone-min-healthy = 0.25
health = { http = "healthz", interval = "2s", healthy-threshold = 1 }
outlier = { consecutive-failures = 5, base-ejection = "30s", max-ejection-percent = 50 }
[[policy]]
query = "grpc://greeter"
strategy = "p2c"
subset = { size = 3, client-id = 7 }
health = { grpc = "greeter" }
[[policy]]
service = "*"
health = { tcp = true }
"#,
        )
        .unwrap();
        let policies = c.policies();
        assert_eq!(policies.zone(), Some("a"));
        let catalog = policies.for_query(&crate::Query::parse("https://catalog").unwrap());
        assert_eq!(catalog.strategy, crate::Strategy::WeightedRoundRobin);
        assert_eq!(catalog.zone.as_deref(), Some("a"));
        assert_eq!(catalog.zone_min_healthy, 0.25);
        let health = catalog.health.unwrap();
        assert_eq!(
            health.probe,
            crate::Probe::Http {
                path: "/healthz".into()
            }
        );
        assert_eq!(
            (
                health.interval,
                health.timeout,
                health.healthy_threshold,
                health.unhealthy_threshold
            ),
            (Duration::from_secs(2), Duration::from_secs(1), 1, 3)
        );
        assert_eq!(
            catalog.outlier,
            Outlier::default()
                .with_consecutive_failures(5)
                .with_base_ejection(Duration::from_secs(30))
                .with_max_ejection_percent(50)
        );
        let greeter = policies.for_query(&crate::Query::parse("grpc://greeter").unwrap());
        assert_eq!(greeter.strategy, crate::Strategy::PowerOfTwoChoices);
        assert_eq!(greeter.subset, Some(Subset::new(3, 7)));
        let other = policies.for_query(&crate::Query::parse("basket").unwrap());
        assert_eq!(other.health.unwrap().probe, crate::Probe::Tcp);
        assert_eq!(other.outlier, Outlier::default());

        for (text, expected) in [
            (
                "[[policy]]\nstrategy = \"rr\"",
                "wasd.toml:1:1: a policy needs `service",
            ),
            (
                "[[policy]]\nservice = \"a\"\nstrategy = \"fastest\"",
                "wasd.toml:3:12: unknown strategy 'fastest' (known: round-robin,",
            ),
            (
                "[[policy]]\nservice = \"a\"\nquery = \"b\"",
                "wasd.toml:3:9: a policy names a `service` or a `query`, not both",
            ),
            (
                "[[policy]]\nservice = \"a\"\nzone-min-healthy = 2.0",
                "wasd.toml:3:20: zone-min-healthy is a share from 0 to 1, not 2",
            ),
            (
                "[[policy]]\nservice = \"a\"\nhealth = { http = \"/\", tcp = true }",
                "wasd.toml:3:10: a health check is one of",
            ),
            (
                "[[policy]]\nservice = \"a\"\noutlier = { max-ejection-percent = 150 }",
                "wasd.toml:3:36: max-ejection-percent is at most 100, not 150",
            ),
            (
                "[[policy]]\nservice = \"a\"\nhealth = { tcp = true, interval = \"often\" }",
                "wasd.toml:3:35: 'often' is not a duration",
            ),
            (
                "[[policy]]\nservice = \"a\"\nweight = 1",
                "unknown field `weight`",
            ),
            ("zone = \" \"", "wasd.toml:1:8: zone names no zone"),
            (
                "[[policy]]\nservice = \"a\"\nhealth = { tcp = true, timeout = \"0s\" }",
                "wasd.toml:3:34: a check's timeout must be more than 0",
            ),
            (
                "[[policy]]\nservice = \"a\"\nhealth = { tcp = true, healthy-threshold = 0 }",
                "wasd.toml:3:44: healthy-threshold must be at least 1",
            ),
            (
                "[[policy]]\nservice = \"a\"\noutlier = { consecutive-failures = 0 }",
                "wasd.toml:3:36: consecutive-failures must be at least 1",
            ),
            (
                "[[policy]]\nservice = \"a\"\n[[policy]]\nservice = \"a\"",
                "wasd.toml:3:1: another [[policy]] names the same service or query",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(
                e.starts_with(expected) || e.contains(expected),
                "{text}\n  got: {e}\n want: {expected}"
            );
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn the_serve_table_with_xds_and_its_services() {
        let c = parse(
            "[serve]\nxds = \"127.0.0.1:18000\"\n[serve.xds-services.catalog]\nquery = \"https://catalog\"\nfilters = { zone = \"eu\" }\n[serve.xds-services.basket]\nfilters = { zone = \"us\" }\n",
        )
        .unwrap();
        assert_eq!(c.serve().xds, Some("127.0.0.1:18000".parse().unwrap()));
        let catalog = &c.serve().xds_services["catalog"];
        assert_eq!(catalog.query, "https://catalog");
        assert_eq!(catalog.filters, [("zone".to_owned(), "eu".to_owned())]);
        // Filters alone: the default query.
        assert_eq!(c.serve().xds_services["basket"].query, "grpc://basket");
        for (text, expected) in [
            (
                "[serve]\nxds = \"localhost\"",
                "wasd.toml:2:7: 'localhost' is not an address",
            ),
            (
                "[serve.xds-services.catalog]\nquery = \"https+://catalog\"",
                "wasd.toml:2:9: invalid query 'https+://catalog'",
            ),
            ("[serve.xds-services.catalog]\nport = 1", "unknown field `port`"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(expected), "{text}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }
}
