//! `wasd:provider/dns`: DNS lookups done by the host, only inside granted zones.

use crate::bindings::wasd::provider::dns::{AddressAnswer, DnsError, Host, SrvRecord};
use crate::dns::{LookupError, kubernetes_suffix};
use crate::provider::ProviderState;

/// Most SRV records passed back for one lookup.
const MAX_SRV_RECORDS: usize = 1024;

impl ProviderState {
    fn check_dns_grant(&self, name: &str) -> Result<(), DnsError> {
        if self.grants.allows_dns(name) {
            Ok(())
        } else {
            Err(DnsError::Denied(format!(
                "provider '{}' may not look up '{}': its grants.dns does not cover that name",
                self.name,
                name.escape_default()
            )))
        }
    }
}

fn wit_error(e: LookupError) -> DnsError {
    match e {
        LookupError::NotFound => DnsError::NotFound,
        LookupError::NoRecords => DnsError::NoRecords,
        LookupError::Unavailable(m) => DnsError::Unavailable(m),
        LookupError::InvalidName(m) => DnsError::InvalidName(m),
    }
}

impl Host for ProviderState {
    async fn lookup_srv(&mut self, name: String) -> wasmtime::Result<Result<Vec<SrvRecord>, DnsError>> {
        if let Err(denied) = self.check_dns_grant(&name) {
            return Ok(Err(denied));
        }
        Ok(self
            .dns
            .lookup_srv(&name)
            .await
            .map(|records| {
                records
                    .into_iter()
                    .take(MAX_SRV_RECORDS)
                    .map(|r| SrvRecord {
                        priority: r.priority,
                        weight: r.weight,
                        port: r.port,
                        target: r.target,
                        addresses: r.addresses,
                        ttl: r.ttl,
                    })
                    .collect()
            })
            .map_err(wit_error))
    }

    async fn lookup_addresses(&mut self, name: String) -> wasmtime::Result<Result<AddressAnswer, DnsError>> {
        if let Err(denied) = self.check_dns_grant(&name) {
            return Ok(Err(denied));
        }
        Ok(self
            .dns
            .lookup_addresses(&name)
            .await
            .map(|(addresses, ttl)| AddressAnswer { addresses, ttl })
            .map_err(wit_error))
    }

    async fn kubernetes_suffix(&mut self) -> wasmtime::Result<Option<String>> {
        Ok(kubernetes_suffix())
    }
}
