//! A wasd provider that answers from a static table in its settings:
//!
//! ```toml
//! [provider.settings]
//! ttl-ms = 5000
//! services.basket = [{ host = "10.0.0.7", port = 8443, scheme = "https" },
//!                    { host = "10.0.0.8", port = 9000, scheme = "http", name = "dashboard" }]
//! ```
//!
//! Endpoint keys: `host` (required), `port`, `scheme`, `name`, `path`, `metadata`.
//! `_dashboard.basket` asks for the endpoints named `dashboard`, `basket` for the unnamed.

use std::collections::HashMap;

use serde_json::{Map, Value};
use wasd_sdk::{Configuration, Endpoint, Error, Provider, Query, Resolution};

struct StaticTable {
    /// Lower-cased service name -> its endpoints in table order, each with its
    /// lower-cased name, if any.
    services: HashMap<String, Vec<(Option<String>, Endpoint)>>,
    ttl_ms: Option<u64>,
}

impl Provider for StaticTable {
    fn configure(config: Configuration) -> Result<Self, Error> {
        parse_settings(&config.settings).map_err(Error::InvalidSettings)
    }

    fn resolve(&self, query: Query) -> Result<Resolution, Error> {
        let name = query.endpoint_name.map(|name| name.to_lowercase());
        // An endpoint without a scheme suits any; the host orders by preference.
        let scheme_ok = |scheme: &Option<String>| {
            query.schemes.is_empty() || scheme.as_ref().is_none_or(|s| query.schemes.contains(s))
        };
        let endpoints: Vec<Endpoint> = (self.services.get(&query.service.to_lowercase()).into_iter())
            .flatten()
            .filter(|(n, endpoint)| *n == name && scheme_ok(&endpoint.scheme))
            .map(|(_, endpoint)| endpoint.clone())
            .collect();
        wasd_sdk::debug!("{}: {} endpoints", query.service, endpoints.len());
        // No endpoints: the host asks the next provider.
        Ok(Resolution {
            endpoints,
            ttl_ms: self.ttl_ms,
            version: None,
        })
    }
}

/// The largest integer JSON parsers keep exact (JavaScript's `Number.MAX_SAFE_INTEGER`).
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Errors name the place: `services.basket[1].port: expected an integer 0..65535, got "x"`.
fn parse_settings(text: &str) -> Result<StaticTable, String> {
    let settings: Value = serde_json::from_str(text).map_err(|e| format!("settings: not valid JSON: {e}"))?;
    let mut table = StaticTable {
        services: HashMap::new(),
        ttl_ms: None,
    };
    for (key, value) in object(&settings, "settings")? {
        match key.as_str() {
            "ttl-ms" => table.ttl_ms = Some(integer(value, MAX_SAFE_INTEGER, "a non-negative integer", key)?),
            "services" => {
                for (service, list) in object(value, key)? {
                    let at = format!("services.{service}");
                    let Value::Array(items) = list else {
                        return Err(format!("{at}: expected a list of endpoints, got {}", got(list)));
                    };
                    let endpoints = items
                        .iter()
                        .enumerate()
                        .map(|(i, item)| endpoint(item, &format!("{at}[{i}]")));
                    if table
                        .services
                        .insert(service.to_lowercase(), endpoints.collect::<Result<_, _>>()?)
                        .is_some()
                    {
                        return Err(format!("{at}: duplicate service (names are case-insensitive)"));
                    }
                }
            }
            _ => {
                return Err(format!(
                    "{key}: unknown key (expected \"services\" or \"ttl-ms\")"
                ));
            }
        }
    }
    Ok(table)
}

fn endpoint(value: &Value, at: &str) -> Result<(Option<String>, Endpoint), String> {
    let fields = object(value, at)?;
    let host = fields
        .get("host")
        .ok_or_else(|| format!("{at}: missing \"host\""))?;
    let host = (host.as_str().filter(|h| !h.is_empty()))
        .ok_or_else(|| format!("{at}.host: expected a non-empty string, got {}", got(host)))?;
    let (mut name, mut endpoint) = (None, Endpoint::new(host, None));
    for (key, value) in fields {
        let at = format!("{at}.{key}");
        match key.as_str() {
            "host" => {}
            "port" => endpoint.port = Some(integer(value, 65535, "an integer 0..65535", &at)? as u16),
            "scheme" => endpoint.scheme = Some(string(value, &at)?.to_lowercase()),
            "name" => name = Some(string(value, &at)?.to_lowercase()),
            "path" => endpoint.path = Some(string(value, &at)?),
            "metadata" => {
                for (k, v) in object(value, &at)? {
                    endpoint
                        .metadata
                        .push((k.clone(), string(v, &format!("{at}.{k}"))?));
                }
            }
            _ => return Err(format!("{at}: unknown key")),
        }
    }
    Ok((name, endpoint))
}

fn object<'a>(value: &'a Value, at: &str) -> Result<&'a Map<String, Value>, String> {
    value
        .as_object()
        .ok_or_else(|| format!("{at}: expected an object, got {}", got(value)))
}

fn string(value: &Value, at: &str) -> Result<String, String> {
    let text = value.as_str().map(str::to_owned);
    text.ok_or_else(|| format!("{at}: expected a string, got {}", got(value)))
}

/// An integer in `0..=max`; `8443.0` counts as `8443`, as it does in JavaScript.
fn integer(value: &Value, max: u64, expected: &str, at: &str) -> Result<u64, String> {
    let n = value
        .as_f64()
        .filter(|n| n.trunc() == *n && (0.0..=max as f64).contains(n));
    n.map(|n| n as u64)
        .ok_or_else(|| format!("{at}: expected {expected}, got {}", got(value)))
}

/// How an error message shows a value: scalars as JSON, containers by kind.
fn got(value: &Value) -> String {
    match value {
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
        scalar => scalar.to_string(),
    }
}

wasd_sdk::export!(StaticTable);
