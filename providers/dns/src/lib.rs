//! The DNS provider: A/AAAA records of the service name (Microsoft's
//! DnsServiceEndpointProvider). The port comes from the query or the `port` setting.
//! Named endpoints cannot be expressed in A records, so such queries are declined.

use serde::Deserialize;
use wasd_sdk::dns::{self, DnsError};
use wasd_sdk::{Configuration, Endpoint, Error, Provider, Query, Resolution};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Settings {
    /// Port when the query has none.
    port: Option<u16>,
    /// Appended to the service name (`basket` → `basket.<suffix>`).
    suffix: Option<String>,
}

struct Dns {
    settings: Settings,
}

impl Provider for Dns {
    fn configure(config: Configuration) -> Result<Self, Error> {
        let settings = serde_json::from_str(&config.settings)
            .map_err(|e| Error::InvalidSettings(format!("settings: {e}")))?;
        Ok(Dns { settings })
    }

    fn resolve(&self, query: Query) -> Result<Resolution, Error> {
        if query.endpoint_name.is_some() {
            return Ok(Resolution::empty());
        }
        let name = match &self.settings.suffix {
            Some(suffix) => format!("{}.{}", query.service, suffix.trim_matches('.')),
            None => query.service.clone(),
        };
        let answer = match dns::lookup_addresses(&name) {
            Ok(answer) => answer,
            Err(DnsError::NotFound | DnsError::NoRecords) => return Ok(Resolution::empty()),
            Err(DnsError::Denied(m)) => return Err(Error::Denied(m)),
            Err(DnsError::Unavailable(m)) => return Err(Error::Unavailable(format!("{name}: {m}"))),
            Err(DnsError::InvalidName(m)) => return Err(Error::InvalidQuery(m)),
        };
        let port = query.port.or(self.settings.port);
        let scheme = (query.schemes.len() == 1).then(|| query.schemes[0].clone());
        let endpoints = answer
            .addresses
            .into_iter()
            .map(|address| {
                let mut endpoint = Endpoint::new(address, port).with_metadata("host-name", name.clone());
                endpoint.scheme = scheme.clone();
                endpoint
            })
            .collect();
        Ok(Resolution::new(endpoints).with_ttl_ms(u64::from(answer.ttl) * 1000))
    }
}

wasd_sdk::export!(Dns);
