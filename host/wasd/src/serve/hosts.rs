//! Endpoints given as host names, looked up with the host's resolver (hickory's, from
//! /etc/resolv.conf): the DNS and xDS servers answer with addresses only.

use std::net::IpAddr;
use std::time::Duration;

use hickory_resolver::TokioResolver;

/// How long a host name's lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a host name has no addresses.
pub(crate) enum Lookup {
    /// The name does not exist, or has no addresses: left out of an answer.
    NotFound,
    /// The lookup failed (timed out, the resolver is away): the answer would be
    /// wrong without it, so there is none; the reason says why.
    Failed(String),
}

/// Looks up host names; clones share one resolver.
#[derive(Clone)]
pub(crate) struct Hosts {
    resolver: Option<TokioResolver>,
}

impl Hosts {
    pub(crate) fn new() -> Hosts {
        let resolver = TokioResolver::builder_tokio()
            .ok()
            .map(|builder| builder.build())
            .and_then(Result::ok);
        Hosts { resolver }
    }

    /// The addresses of `host`: itself when it is one.
    pub(crate) async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, Lookup> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let Some(resolver) = &self.resolver else {
            return Err(Lookup::Failed(
                "the host's resolver configuration could not be read".into(),
            ));
        };
        match tokio::time::timeout(LOOKUP_TIMEOUT, resolver.lookup_ip(host)).await {
            Ok(Ok(found)) => Ok(found.iter().collect()),
            Ok(Err(e)) if e.is_no_records_found() || e.is_nx_domain() => Err(Lookup::NotFound),
            Ok(Err(e)) => Err(Lookup::Failed(format!(
                "looking up '{}' failed: {e}",
                host.escape_default()
            ))),
            Err(_) => Err(Lookup::Failed(format!(
                "looking up '{}' took longer than {}",
                host.escape_default(),
                humantime::format_duration(LOOKUP_TIMEOUT)
            ))),
        }
    }
}
