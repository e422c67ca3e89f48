//! The configuration provider: endpoints written in configuration, the way
//! Microsoft.Extensions.ServiceDiscovery reads them.
//!
//! Sources, later overriding earlier key by key (as .NET layers configuration):
//! 1. the JSON files granted to the provider, in order (`appsettings.json`-style), and
//! 2. the environment variables granted to it (`services__catalog__https__0=...`, the
//!    form an Aspire AppHost passes references in; `__` separates keys).
//!
//! Under the section (default `Services`), each service maps endpoint names to one value
//! or a list: `{"Services": {"catalog": {"https": ["https://10.0.0.1:8443"]}}}`. Values
//! are URIs or `host:port`. Keys compare case-insensitively, as .NET configuration keys do.

use std::collections::HashMap;

use serde::Deserialize;
use wasd_sdk::{Configuration, Endpoint, Error, Provider, Query, Resolution};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// The configuration section holding the services.
    #[serde(default = "default_section")]
    section: String,
}

fn default_section() -> String {
    "Services".to_owned()
}

/// The endpoint name tried first when the query names none.
const DEFAULT_ENDPOINT: &str = "default";

/// Endpoint names and their values, in document order; `T` is an endpoint, or an
/// endpoint with its list index while the lists are being assembled.
type Named<T> = Vec<(String, Vec<T>)>;

struct ConfigProvider {
    /// service -> endpoint name -> endpoints; names lower-cased.
    services: HashMap<String, Named<Endpoint>>,
}

/// Configuration flattened to `a:b:c` keys, the .NET model: a later source overrides
/// an earlier one key by key, and keys compare case-insensitively.
#[derive(Default)]
struct FlatConfig {
    /// Lower-cased keys in the order first seen.
    order: Vec<String>,
    /// Lower-cased key -> (key as written, value, where it came from).
    values: HashMap<String, (String, String, String)>,
}

impl FlatConfig {
    fn insert(&mut self, key: String, value: String, source: &str) {
        let lower = key.to_lowercase();
        if !self.values.contains_key(&lower) {
            self.order.push(lower.clone());
        }
        self.values.insert(lower, (key, value, source.to_owned()));
    }

    fn add_json(&mut self, source: &str, prefix: &str, value: &serde_json::Value) {
        let join = |key: &str| {
            if prefix.is_empty() {
                key.to_owned()
            } else {
                format!("{prefix}:{key}")
            }
        };
        match value {
            serde_json::Value::Object(map) => {
                for (key, child) in map {
                    self.add_json(source, &join(key), child);
                }
            }
            serde_json::Value::Array(items) => {
                for (index, child) in items.iter().enumerate() {
                    self.add_json(source, &join(&index.to_string()), child);
                }
            }
            serde_json::Value::String(s) => self.insert(prefix.to_owned(), s.clone(), source),
            serde_json::Value::Number(n) => self.insert(prefix.to_owned(), n.to_string(), source),
            serde_json::Value::Bool(b) => self.insert(prefix.to_owned(), b.to_string(), source),
            serde_json::Value::Null => {}
        }
    }
}

fn invalid(message: String) -> Error {
    Error::InvalidSettings(message)
}

impl Provider for ConfigProvider {
    fn configure(config: Configuration) -> Result<Self, Error> {
        let settings: Settings =
            serde_json::from_str(&config.settings).map_err(|e| invalid(format!("settings: {e}")))?;
        let section = settings.section;

        let mut flat = FlatConfig::default();
        for file in &config.files {
            let json: serde_json::Value =
                serde_json::from_slice(&file.contents).map_err(|e| invalid(format!("{}: {e}", file.path)))?;
            if !json.is_object() {
                return Err(invalid(format!("{}: expected a JSON object", file.path)));
            }
            flat.add_json(&file.path, "", &json);
        }
        // The host passes only the variables granted to this provider.
        let mut vars: Vec<(String, String)> = std::env::vars().collect();
        vars.sort();
        for (name, value) in vars {
            let key = name.replace("__", ":");
            if key
                .to_lowercase()
                .starts_with(&format!("{}:", section.to_lowercase()))
            {
                flat.insert(key, value, &format!("environment variable {name}"));
            }
        }
        build_services(&flat, &section).map(|services| ConfigProvider { services })
    }

    fn resolve(&self, query: Query) -> Result<Resolution, Error> {
        // Service names compare case-insensitively, as .NET configuration keys do.
        let Some(named) = self.services.get(&query.service.to_lowercase()) else {
            return Ok(Resolution::empty());
        };
        let section = |name: &str| named.iter().find(|(n, _)| n == name);
        let chosen = match &query.endpoint_name {
            Some(name) => section(name),
            // Microsoft's order: the `default` endpoint, then a section named after each
            // acceptable scheme, most preferred first.
            None => std::iter::once(DEFAULT_ENDPOINT)
                .chain(query.schemes.iter().map(String::as_str))
                .find_map(section),
        };
        let Some((name, endpoints)) = chosen else {
            return Ok(Resolution::empty());
        };
        // A bare host:port under a section named after a scheme has that scheme.
        let implied_scheme = query.schemes.iter().find(|s| *s == name);
        let endpoints = endpoints
            .iter()
            .cloned()
            .map(|mut endpoint| {
                if endpoint.scheme.is_none() {
                    endpoint.scheme = implied_scheme.cloned();
                }
                endpoint
            })
            .collect();
        Ok(Resolution::new(endpoints))
    }
}

/// Group the section's keys into services and endpoint names, checking every value.
fn build_services(flat: &FlatConfig, section: &str) -> Result<HashMap<String, Named<Endpoint>>, Error> {
    let mut services: HashMap<String, Named<(Option<u64>, Endpoint)>> = HashMap::new();
    let lower_section = section.to_lowercase();
    let prefix = format!("{lower_section}:");
    for lower in &flat.order {
        let (key, value, source) = &flat.values[lower];
        if *lower == lower_section {
            return Err(invalid(format!(
                "{source}: {key} must be an object of services, not a value"
            )));
        }
        let Some(rest) = lower.strip_prefix(&prefix) else {
            continue;
        };
        let parts: Vec<&str> = rest.split(':').collect();
        // A single value has no index; as in .NET it wins over list items.
        let (service, endpoint_name, index) = match parts[..] {
            [service, name] => (service, name, None),
            [service, name, index] => {
                let index = index.parse::<u64>().map_err(|_| {
                    invalid(format!(
                        "{source}: {key}: expected a list index after the endpoint name, found '{index}'"
                    ))
                })?;
                (service, name, Some(index))
            }
            [_] => {
                return Err(invalid(format!(
                    "{source}: {key} must be an object of endpoint names (e.g. \"https\": [\"https://host:443\"]), not a value"
                )));
            }
            _ => {
                return Err(invalid(format!(
                    "{source}: {key} is nested too deeply; expected {section}:<service>:<endpoint>[:<index>]"
                )));
            }
        };
        if service.is_empty() || endpoint_name.is_empty() {
            return Err(invalid(format!("{source}: {key} has an empty name")));
        }
        let endpoint = Endpoint::parse(value).map_err(|e| invalid(format!("{source}: {key}: {e}")))?;
        let named = services.entry(service.to_owned()).or_default();
        let slot = match named.iter().position(|(n, _)| n == endpoint_name) {
            Some(at) => &mut named[at].1,
            None => {
                named.push((endpoint_name.to_owned(), Vec::new()));
                &mut named.last_mut().expect("just pushed").1
            }
        };
        slot.push((index, endpoint));
    }
    Ok(services
        .into_iter()
        .map(|(service, named)| {
            let named = named
                .into_iter()
                .map(|(name, mut endpoints)| {
                    if let Some(single) = endpoints.iter().position(|(index, _)| index.is_none()) {
                        return (name, vec![endpoints.swap_remove(single).1]);
                    }
                    // List order is index order, however the sources interleave.
                    endpoints.sort_by_key(|(index, _)| *index);
                    (name, endpoints.into_iter().map(|(_, e)| e).collect())
                })
                .collect();
            (service, named)
        })
        .collect())
}

wasd_sdk::export!(ConfigProvider);
