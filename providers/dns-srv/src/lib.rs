//! The DNS SRV provider (Microsoft.Extensions.ServiceDiscovery.Dns compatible).
//!
//! `https://_dashboard.basket` asks `_dashboard._tcp.basket.<suffix>`; a query without
//! an endpoint name asks `_default._tcp.basket.<suffix>`, or, with `scheme-form`, one
//! name per acceptable scheme (`_https._tcp.basket.<suffix>`, then `_http...`). Each SRV
//! record becomes one endpoint per target address (from the additional section, or
//! looked up), in priority order, keeping the target name as `host-name` metadata for
//! TLS. The host does the lookups, inside the zones it granted.

use serde::Deserialize;
use wasd_sdk::dns::{self, DnsError, SrvRecord};
use wasd_sdk::{Configuration, Endpoint, Error, Provider, Query, Resolution};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Settings {
    /// Appended to `_{endpoint}._tcp.{service}.`; auto-detected inside Kubernetes.
    suffix: Option<String>,
    /// A full query name with `{endpoint}`, `{service}` and `{suffix}` placeholders.
    template: Option<String>,
    /// Ask `_{scheme}._tcp` for queries without an endpoint name.
    #[serde(default)]
    scheme_form: bool,
    /// The endpoint name for queries without one.
    default_endpoint: Option<String>,
}

struct DnsSrv {
    settings: Settings,
}

impl Provider for DnsSrv {
    fn configure(config: Configuration) -> Result<Self, Error> {
        let settings: Settings = serde_json::from_str(&config.settings)
            .map_err(|e| Error::InvalidSettings(format!("settings: {e}")))?;
        if let Some(template) = &settings.template
            && !template.contains("{service}")
        {
            return Err(Error::InvalidSettings(format!(
                "template '{template}' must contain {{service}}"
            )));
        }
        Ok(DnsSrv { settings })
    }

    fn resolve(&self, query: Query) -> Result<Resolution, Error> {
        let suffix = match &self.settings.suffix {
            Some(suffix) => Some(suffix.trim_matches('.').to_owned()),
            None => dns::kubernetes_suffix(),
        };
        if suffix.is_none()
            && self
                .settings
                .template
                .as_deref()
                .is_none_or(|t| t.contains("{suffix}"))
        {
            wasd_sdk::debug!("no DNS suffix configured or detected; declining");
            return Ok(Resolution::empty());
        }
        let suffix = suffix.unwrap_or_default();

        // (endpoint label, scheme the answer implies)
        let single_scheme = (query.schemes.len() == 1).then(|| query.schemes[0].clone());
        let candidates: Vec<(String, Option<String>)> = match &query.endpoint_name {
            Some(name) => vec![(name.clone(), single_scheme)],
            None if self.settings.scheme_form && !query.schemes.is_empty() => query
                .schemes
                .iter()
                .map(|s| (s.clone(), Some(s.clone())))
                .collect(),
            None => vec![(
                self.settings
                    .default_endpoint
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                single_scheme,
            )],
        };
        for (label, scheme) in candidates {
            let name = match &self.settings.template {
                Some(template) => template
                    .replace("{endpoint}", &label)
                    .replace("{service}", &query.service)
                    .replace("{suffix}", &suffix),
                None => format!("_{label}._tcp.{}.{suffix}", query.service),
            };
            match dns::lookup_srv(&name) {
                Ok(records) => return endpoints(records, scheme),
                Err(DnsError::NotFound | DnsError::NoRecords) => continue,
                Err(e) => return Err(lookup_error(&name, e)),
            }
        }
        Ok(Resolution::empty())
    }
}

fn lookup_error(name: &str, e: DnsError) -> Error {
    match e {
        DnsError::Denied(m) => Error::Denied(m),
        DnsError::Unavailable(m) => Error::Unavailable(format!("{name}: {m}")),
        DnsError::InvalidName(m) => Error::InvalidQuery(m),
        DnsError::NotFound | DnsError::NoRecords => Error::NotFound(name.to_owned()),
    }
}

fn endpoints(mut records: Vec<SrvRecord>, scheme: Option<String>) -> Result<Resolution, Error> {
    // Lowest priority first; within one priority, heavier weight first (RFC 2782).
    records.sort_by(|a, b| a.priority.cmp(&b.priority).then(b.weight.cmp(&a.weight)));
    let mut ttl = u32::MAX;
    let mut endpoints = Vec::new();
    for record in records {
        ttl = ttl.min(record.ttl);
        let mut addresses = record.addresses.clone();
        if addresses.is_empty() {
            match dns::lookup_addresses(&record.target) {
                Ok(answer) => {
                    ttl = ttl.min(answer.ttl);
                    addresses = answer.addresses;
                }
                // Not resolvable here (or not granted): the caller connects by name.
                Err(DnsError::NotFound | DnsError::NoRecords | DnsError::Denied(_)) => {}
                Err(e) => return Err(lookup_error(&record.target, e)),
            }
        }
        let hosts = if addresses.is_empty() {
            vec![record.target.clone()]
        } else {
            addresses
        };
        for host in hosts {
            let mut endpoint = Endpoint::new(host, Some(record.port))
                .with_metadata("host-name", record.target.clone())
                .with_metadata("priority", record.priority.to_string())
                .with_metadata("weight", record.weight.to_string());
            endpoint.scheme = scheme.clone();
            endpoints.push(endpoint);
        }
    }
    Ok(Resolution::new(endpoints).with_ttl_ms(u64::from(ttl) * 1000))
}

wasd_sdk::export!(DnsSrv);
