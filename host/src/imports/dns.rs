//! `wasd:provider/dns`: DNS lookups done by the host, only inside granted zones.

use crate::bindings::wasd::provider::dns::{AddressAnswer, DnsError, Host, SrvRecord};
use crate::provider::ProviderState;

impl ProviderState {
    fn check_dns_grant(&self, name: &str) -> Result<(), DnsError> {
        if self.grants.allows_dns(name) {
            Ok(())
        } else {
            Err(DnsError::Denied(format!(
                "provider '{}' may not look up '{name}': add its zone to grants.dns",
                self.name
            )))
        }
    }
}

impl Host for ProviderState {
    async fn lookup_srv(&mut self, name: String) -> wasmtime::Result<Result<Vec<SrvRecord>, DnsError>> {
        if let Err(denied) = self.check_dns_grant(&name) {
            return Ok(Err(denied));
        }
        Ok(Err(DnsError::Unavailable(
            "this host has no DNS resolver configured".into(),
        )))
    }

    async fn lookup_addresses(&mut self, name: String) -> wasmtime::Result<Result<AddressAnswer, DnsError>> {
        if let Err(denied) = self.check_dns_grant(&name) {
            return Ok(Err(denied));
        }
        Ok(Err(DnsError::Unavailable(
            "this host has no DNS resolver configured".into(),
        )))
    }

    async fn kubernetes_suffix(&mut self) -> wasmtime::Result<Option<String>> {
        Ok(None)
    }
}
