//! DNS, one home for the capability: the grant (`grants.dns` zones), the host's client
//! (one hickory resolver shared by every provider, talking to the system's name servers
//! or to the ones the host config names), and the `wasd:provider/dns` import that
//! checks the grant before any lookup.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RData};
use tokio::sync::OnceCell;
use tracing::Instrument;

use crate::bindings::wasd::provider::dns::{AddressAnswer, DnsError, Host, SrvRecord};
use crate::provider::ProviderState;
use crate::spec::Grants;
use wasd_core::{Import, ImportKind};

/// Most SRV records passed back for one lookup.
const MAX_SRV_RECORDS: usize = 1024;

impl Grants {
    /// Whether a DNS name lies inside a granted zone.
    pub fn allows_dns(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.dns.iter().any(|zone| {
            let zone = zone.trim_start_matches("*.").trim_end_matches('.');
            zone == "*"
                || name == zone
                || (name.len() > zone.len()
                    && name.ends_with(zone)
                    && name.as_bytes()[name.len() - zone.len() - 1] == b'.')
        })
    }
}

/// Where DNS lookups go, from the host config's `[dns]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsSettings {
    /// Name servers (`127.0.0.1:5353`); empty means the system's (`/etc/resolv.conf`).
    pub servers: Vec<SocketAddr>,
    /// Per-attempt timeout; `None` keeps hickory's default.
    pub timeout: Option<Duration>,
}

/// One SRV record with its target's addresses from the additional section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Srv {
    pub(crate) priority: u16,
    pub(crate) weight: u16,
    pub(crate) port: u16,
    pub(crate) target: String,
    pub(crate) addresses: Vec<String>,
    pub(crate) ttl: u32,
}

/// Why a lookup gave no records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LookupError {
    NotFound,
    NoRecords,
    Unavailable(String),
    InvalidName(String),
}

/// Per-attempt timeout when the config sets none, and attempts per lookup: both
/// attempts fit inside a provider call's default time limit (1 s), so a server that
/// does not answer is what the error names, not the provider's clock.
pub const DEFAULT_DNS_TIMEOUT: Duration = Duration::from_millis(400);
const DNS_ATTEMPTS: usize = 2;

pub(crate) struct DnsClient {
    settings: DnsSettings,
    resolver: OnceCell<TokioResolver>,
}

impl DnsClient {
    pub(crate) fn new(settings: DnsSettings) -> Arc<DnsClient> {
        Arc::new(DnsClient {
            settings,
            resolver: OnceCell::new(),
        })
    }

    /// Built on first use, so a host whose providers never look anything up never
    /// reads the system configuration.
    async fn resolver(&self) -> Result<&TokioResolver, LookupError> {
        self.resolver
            .get_or_try_init(|| async {
                let provider = TokioRuntimeProvider::default();
                let mut builder = if self.settings.servers.is_empty() {
                    TokioResolver::builder(provider)
                        .map_err(|e| LookupError::Unavailable(format!("no system DNS configuration: {e}")))?
                } else {
                    let servers = self
                        .settings
                        .servers
                        .iter()
                        .map(|addr| {
                            // UDP first, TCP when an answer is truncated.
                            let mut udp = ConnectionConfig::udp();
                            udp.port = addr.port();
                            let mut tcp = ConnectionConfig::tcp();
                            tcp.port = addr.port();
                            let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                            server.connections = vec![udp, tcp];
                            server
                        })
                        .collect();
                    TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
                };
                let options: &mut ResolverOpts = builder.options_mut();
                options.timeout = self.timeout();
                options.attempts = DNS_ATTEMPTS;
                // The host caches answers itself and refreshes them on their TTL; a
                // missing name must be noticed when it appears, not minutes later.
                options.negative_max_ttl = Some(Duration::from_secs(1));
                builder
                    .build()
                    .map_err(|e| LookupError::Unavailable(format!("cannot start the DNS resolver: {e}")))
            })
            .await
    }

    fn timeout(&self) -> Duration {
        self.settings.timeout.unwrap_or(DEFAULT_DNS_TIMEOUT)
    }

    /// Why a lookup failed, naming the servers that were asked.
    fn error(&self, e: hickory_resolver::net::NetError) -> LookupError {
        if e.is_nx_domain() {
            return LookupError::NotFound;
        }
        if e.is_no_records_found() {
            return LookupError::NoRecords;
        }
        let servers = match self.settings.servers.as_slice() {
            [] => "the system's DNS servers".to_owned(),
            [one] => format!("DNS server {one}"),
            many => format!(
                "DNS servers {}",
                many.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let timeout = self.timeout().as_millis();
        match e {
            hickory_resolver::net::NetError::Timeout | hickory_resolver::net::NetError::NoConnections => {
                LookupError::Unavailable(format!(
                    "{servers} did not answer ({DNS_ATTEMPTS} attempts of {timeout} ms)"
                ))
            }
            e => LookupError::Unavailable(format!("{servers}: {e}")),
        }
    }

    /// A lookup's whole time: its attempts (hickory may also try TCP after UDP, and
    /// each server in turn; the error must say what the caller waited for).
    fn budget(&self) -> Duration {
        self.timeout() * DNS_ATTEMPTS as u32
    }

    pub(crate) async fn lookup_srv(&self, name: &str) -> Result<Vec<Srv>, LookupError> {
        let name = fqdn(name)?;
        let resolver = self.resolver().await?;
        let lookup = tokio::time::timeout(self.budget(), resolver.srv_lookup(name))
            .await
            .unwrap_or(Err(hickory_resolver::net::NetError::Timeout))
            .map_err(|e| self.error(e))?;
        let max_ttl = remaining_ttl(&lookup);
        let mut records = Vec::new();
        for record in lookup.answers() {
            if let RData::SRV(srv) = &record.data {
                let target = srv.target.to_ascii().trim_end_matches('.').to_owned();
                let addresses = lookup
                    .additionals()
                    .iter()
                    .filter(|extra| extra.name == srv.target)
                    .filter_map(|extra| match &extra.data {
                        RData::A(a) => Some(a.0.to_string()),
                        RData::AAAA(aaaa) => Some(aaaa.0.to_string()),
                        _ => None,
                    })
                    .collect();
                records.push(Srv {
                    priority: srv.priority,
                    weight: srv.weight,
                    port: srv.port,
                    target,
                    addresses,
                    ttl: record.ttl.min(max_ttl),
                });
            }
        }
        if records.is_empty() {
            return Err(LookupError::NoRecords);
        }
        Ok(records)
    }

    /// A and AAAA records of a name, with the smallest TTL.
    pub(crate) async fn lookup_addresses(&self, name: &str) -> Result<(Vec<String>, u32), LookupError> {
        let name = fqdn(name)?;
        let resolver = self.resolver().await?;
        let lookup = tokio::time::timeout(self.budget(), resolver.lookup_ip(name))
            .await
            .unwrap_or(Err(hickory_resolver::net::NetError::Timeout))
            .map_err(|e| self.error(e))?;
        let ttl = lookup
            .as_lookup()
            .answers()
            .iter()
            .map(|r| r.ttl)
            .min()
            .unwrap_or(0)
            .min(remaining_ttl(lookup.as_lookup()));
        let addresses: Vec<String> = lookup.iter().map(|ip| ip.to_string()).collect();
        if addresses.is_empty() {
            return Err(LookupError::NoRecords);
        }
        Ok((addresses, ttl))
    }
}

/// Names from providers are always complete: no search-domain expansion.
fn fqdn(name: &str) -> Result<Name, LookupError> {
    let mut name = Name::from_ascii(name).map_err(|e| LookupError::InvalidName(format!("'{name}': {e}")))?;
    name.set_fqdn(true);
    Ok(name)
}

fn remaining_ttl(lookup: &Lookup) -> u32 {
    let left = lookup.valid_until().saturating_duration_since(Instant::now());
    u32::try_from(left.as_secs()).unwrap_or(u32::MAX)
}

/// The cluster DNS suffix inside Kubernetes: the first `search` domain of
/// /etc/resolv.conf, when KUBERNETES_SERVICE_HOST is set and a service-account token
/// exists (Microsoft's rule).
pub(crate) fn kubernetes_suffix() -> Option<String> {
    const TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|h| !h.is_empty())
        && std::path::Path::new(TOKEN).exists();
    if !in_cluster {
        return None;
    }
    first_search_domain(&std::fs::read_to_string("/etc/resolv.conf").ok()?)
}

fn first_search_domain(resolv_conf: &str) -> Option<String> {
    resolv_conf
        .lines()
        .map(str::trim)
        .filter_map(|line| line.strip_prefix("search"))
        .rfind(|rest| rest.starts_with([' ', '\t']))
        .and_then(|rest| rest.split_whitespace().next())
        .map(|domain| domain.trim_end_matches('.').to_owned())
}

// The import: what a guest calls.

impl ProviderState {
    /// Run a lookup for `name` as every DNS import does: the grant first, then the
    /// lookup with its time not counted against the provider's own time limit (it is
    /// bounded by the DNS client's timeouts, and a server that does not answer is
    /// reported as such), at most as long again as that limit per call.
    async fn guarded<T>(
        &mut self,
        name: &str,
        record_type: &'static str,
        lookup: impl Future<Output = Result<T, LookupError>>,
        count: impl Fn(&T) -> usize,
    ) -> Result<T, DnsError> {
        let began = Instant::now();
        let result = self.guarded_lookup(name, lookup).await;
        if let Some(journal) = &self.journal {
            let said = match &result {
                Ok(records) => match count(records) {
                    1 => "1 record".to_owned(),
                    n => format!("{n} records"),
                },
                Err(e) => dns_error_text(e),
            };
            journal.push(Import::new(
                ImportKind::Dns,
                name.escape_default().to_string(),
                record_type,
                said,
                began.elapsed(),
            ));
        }
        result
    }

    async fn guarded_lookup<T>(
        &mut self,
        name: &str,
        lookup: impl Future<Output = Result<T, LookupError>>,
    ) -> Result<T, DnsError> {
        self.check_dns_grant(name)?;
        let imports = self.imports.clone();
        if imports.used_up() {
            return Err(DnsError::Unavailable(
                "this call's DNS lookups used up their time (as long as the call's own limit)".into(),
            ));
        }
        let span = tracing::debug_span!("dns_lookup", lookup = %name.escape_default());
        let (result, spent) = imports.exempt(lookup.instrument(span)).await;
        metrics::histogram!(crate::metrics::names::DNS_LOOKUP_DURATION, "provider" => self.name.to_string())
            .record(spent.as_secs_f64());
        // The epoch deadline (for time the guest itself runs) moves on as much.
        self.deadline += spent;
        result.map_err(wit_error)
    }

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

/// A DNS error as an explanation shows it.
fn dns_error_text(e: &DnsError) -> String {
    match e {
        DnsError::NotFound => "no such name".to_owned(),
        DnsError::NoRecords => "no records of that type".to_owned(),
        DnsError::Unavailable(m) => format!("unavailable: {m}"),
        DnsError::InvalidName(m) => format!("invalid name: {m}"),
        DnsError::Denied(m) => format!("denied: {m}"),
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
        let dns = self.dns.clone();
        Ok(self
            .guarded(&name, "SRV", dns.lookup_srv(&name), Vec::len)
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
            }))
    }

    async fn lookup_addresses(&mut self, name: String) -> wasmtime::Result<Result<AddressAnswer, DnsError>> {
        let dns = self.dns.clone();
        Ok(self
            .guarded(&name, "A/AAAA", dns.lookup_addresses(&name), |(addresses, _)| {
                addresses.len()
            })
            .await
            .map(|(addresses, ttl)| AddressAnswer { addresses, ttl }))
    }

    async fn kubernetes_suffix(&mut self) -> wasmtime::Result<Option<String>> {
        Ok(kubernetes_suffix())
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_domain_from_resolv_conf() {
        let conf = "nameserver 10.96.0.10\nsearch shop.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n";
        assert_eq!(
            first_search_domain(conf).as_deref(),
            Some("shop.svc.cluster.local")
        );
        // The last `search` line wins, as in resolv.conf(5).
        assert_eq!(
            first_search_domain("search a.example\nsearch b.example.\n").as_deref(),
            Some("b.example")
        );
        assert_eq!(first_search_domain("nameserver 1.1.1.1\nsearchx y\n"), None);
    }

    #[test]
    fn names_are_complete_and_checked() {
        assert!(fqdn("_default._tcp.basket.cluster.local").unwrap().is_fqdn());
        assert!(matches!(fqdn(&"a".repeat(300)), Err(LookupError::InvalidName(_))));
    }
}
