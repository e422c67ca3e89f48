//! `grants.tcp`: outgoing TCP connections through `wasi:sockets`, to the granted
//! addresses only (`127.0.0.1:2181`, `zk-2.internal:2181`). Everything else the
//! interface offers stays closed: listening and accepting, binding anything but the
//! implicit bind a connect makes, UDP, and looking up any name but the granted ones.
//!
//! A name in the grant is looked up by the host, on each connect the guest makes: the
//! connection is let through when the address it asks for is one the name has now (so
//! a name that moves keeps working, and one address of a round-robin name is not
//! granted for ever). The guest may look that name up itself (it needs an address to
//! connect to), and no other: an open lookup would let it send anything out as DNS
//! questions.
//!
//! Bounds: at most [`MAX_CONNECTS_PER_CALL`] connections opened in one call; the
//! call's time limit interrupts a guest blocked on a socket like any other; what it
//! reads lands in its memory, under its memory limit.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use wasmtime::component::{HasData, Resource};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p2::SocketError;
use wasmtime_wasi::p2::bindings::sockets::ip_name_lookup::{
    Host, HostResolveAddressStream, ResolveAddressStream,
};
use wasmtime_wasi::p2::bindings::sockets::network::{self, ErrorCode, IpAddress, Network};
use wasmtime_wasi::sockets::{SocketAddrUse, WasiSocketsCtxView};

use crate::provider::ProviderState;

/// Connections one call may open.
pub(crate) const MAX_CONNECTS_PER_CALL: u32 = 16;

/// A granted `host:port`, as the config writes it, normalised: the host lower-case
/// (an IPv6 address in brackets), the port explicit.
pub fn normalize_tcp_target(target: &str) -> Result<String, String> {
    let (host, port) = split_target(target)?;
    Ok(match host {
        TargetHost::Ip(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        TargetHost::Ip(ip) => format!("{ip}:{port}"),
        TargetHost::Name(name) => format!("{name}:{port}"),
    })
}

enum TargetHost {
    Ip(IpAddr),
    Name(String),
}

fn split_target(target: &str) -> Result<(TargetHost, u16), String> {
    let bad = || format!("'{target}' is not an address like \"127.0.0.1:2181\" or \"zk-1.internal:2181\"");
    let (host, port) = target.trim().rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("'{target}': the port must be 1-65535"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = host.parse::<IpAddr>() {
        if ip.is_unspecified() {
            return Err(format!("'{target}': an unspecified address grants nothing"));
        }
        return Ok((TargetHost::Ip(ip), port));
    }
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !valid {
        return Err(bad());
    }
    Ok((TargetHost::Name(name), port))
}

/// The granted targets, parsed once per provider.
#[derive(Debug, Default)]
pub(crate) struct TcpGrant {
    addresses: Vec<SocketAddr>,
    names: Vec<(String, u16)>,
}

impl TcpGrant {
    /// From normalised grants (the config checked them; one that fails here is skipped).
    pub(crate) fn new(granted: &[String]) -> TcpGrant {
        let mut grant = TcpGrant::default();
        for target in granted {
            match split_target(target) {
                Ok((TargetHost::Ip(ip), port)) => grant.addresses.push(SocketAddr::new(ip, port)),
                Ok((TargetHost::Name(name), port)) => grant.names.push((name, port)),
                Err(_) => {}
            }
        }
        grant
    }

    fn is_empty(&self) -> bool {
        self.addresses.is_empty() && self.names.is_empty()
    }

    /// Whether the guest may look `name` up.
    fn allows_lookup(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.');
        self.names
            .iter()
            .any(|(granted, _)| granted.eq_ignore_ascii_case(name))
    }

    /// Whether a connection to `addr` is granted: a granted address, or an address a
    /// granted name with that port has now.
    async fn allows_connect(&self, addr: SocketAddr) -> bool {
        let addr = canonical(addr);
        if self.addresses.iter().any(|a| canonical(*a) == addr) {
            return true;
        }
        for (name, port) in &self.names {
            if *port != addr.port() {
                continue;
            }
            if let Ok(found) = tokio::net::lookup_host((name.as_str(), *port)).await
                && found.map(canonical).any(|a| a == addr)
            {
                return true;
            }
        }
        false
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 one, so either spelling matches.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Connections opened by the current call; reset when a call starts.
#[derive(Debug, Default)]
pub(crate) struct Connects(AtomicU32);

impl Connects {
    pub(crate) fn reset(&self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// Open what the grant allows in a new instance's WASI context. Without a grant,
/// wasmtime-wasi's defaults stand: no TCP, no UDP, no lookups, no address passes.
pub(crate) fn configure(builder: &mut WasiCtxBuilder, grant: &Arc<TcpGrant>, connects: &Arc<Connects>) {
    if grant.is_empty() {
        return;
    }
    builder.allow_tcp(true);
    builder.allow_udp(false);
    // Filtered name by name in `GrantedLookup`.
    builder.allow_ip_name_lookup(!grant.names.is_empty());
    let (grant, connects) = (grant.clone(), connects.clone());
    builder.socket_addr_check(move |addr, using| {
        let (grant, connects) = (grant.clone(), connects.clone());
        Box::pin(async move {
            match using {
                // The bind a connect makes on an unbound socket: to the unspecified
                // address, port 0. Any other bind could only serve to listen.
                SocketAddrUse::TcpBind => addr.ip().is_unspecified() && addr.port() == 0,
                SocketAddrUse::TcpConnect => {
                    if connects.0.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTS_PER_CALL {
                        tracing::debug!(%addr, "tcp connect refused: {MAX_CONNECTS_PER_CALL} connections this call");
                        return false;
                    }
                    let allowed = grant.allows_connect(addr).await;
                    if !allowed {
                        tracing::debug!(%addr, "tcp connect refused: not in grants.tcp");
                    }
                    allowed
                }
                _ => false,
            }
        })
    });
}

/// `wasi:sockets/ip-name-lookup` for a provider: wasmtime-wasi's lookup, for the
/// names `grants.tcp` names only.
pub(crate) struct GrantedLookup<'a> {
    sockets: WasiSocketsCtxView<'a>,
    grant: &'a TcpGrant,
}

pub(crate) struct GrantedLookups;

impl HasData for GrantedLookups {
    type Data<'a> = GrantedLookup<'a>;
}

impl ProviderState {
    /// The linker's getter for [`GrantedLookups`].
    pub(crate) fn granted_lookup(&mut self) -> GrantedLookup<'_> {
        let (sockets, grant) = self.sockets_and_grant();
        GrantedLookup { sockets, grant }
    }
}

// The lookup interface's error conversions: wasmtime-wasi's.
impl network::Host for GrantedLookup<'_> {
    fn convert_error_code(&mut self, error: SocketError) -> wasmtime::Result<ErrorCode> {
        network::Host::convert_error_code(&mut self.sockets, error)
    }

    fn network_error_code(
        &mut self,
        err: Resource<wasmtime_wasi::p2::bindings::io::error::Error>,
    ) -> wasmtime::Result<Option<ErrorCode>> {
        network::Host::network_error_code(&mut self.sockets, err)
    }
}

impl network::HostNetwork for GrantedLookup<'_> {
    fn drop(&mut self, network: Resource<Network>) -> wasmtime::Result<()> {
        network::HostNetwork::drop(&mut self.sockets, network)
    }
}

impl Host for GrantedLookup<'_> {
    fn resolve_addresses(
        &mut self,
        network: Resource<Network>,
        name: String,
    ) -> Result<Resource<ResolveAddressStream>, SocketError> {
        if !self.grant.allows_lookup(&name) {
            tracing::debug!(name = %name.escape_debug(), "name lookup refused: not in grants.tcp");
            return Err(ErrorCode::PermanentResolverFailure.into());
        }
        Host::resolve_addresses(&mut self.sockets, network, name)
    }
}

impl HostResolveAddressStream for GrantedLookup<'_> {
    fn resolve_next_address(
        &mut self,
        resource: Resource<ResolveAddressStream>,
    ) -> Result<Option<IpAddress>, SocketError> {
        HostResolveAddressStream::resolve_next_address(&mut self.sockets, resource)
    }

    fn subscribe(
        &mut self,
        resource: Resource<ResolveAddressStream>,
    ) -> wasmtime::Result<Resource<wasmtime_wasi::p2::DynPollable>> {
        HostResolveAddressStream::subscribe(&mut self.sockets, resource)
    }

    fn drop(&mut self, resource: Resource<ResolveAddressStream>) -> wasmtime::Result<()> {
        HostResolveAddressStream::drop(&mut self.sockets, resource)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_normalise_and_bad_ones_say_why() {
        assert_eq!(normalize_tcp_target("127.0.0.1:2181").unwrap(), "127.0.0.1:2181");
        assert_eq!(
            normalize_tcp_target("ZK-2.Internal.:2181").unwrap(),
            "zk-2.internal:2181"
        );
        assert_eq!(normalize_tcp_target("[::1]:2181").unwrap(), "[::1]:2181");
        assert!(normalize_tcp_target("zk:0").unwrap_err().contains("1-65535"));
        assert!(
            normalize_tcp_target("zk")
                .unwrap_err()
                .contains("is not an address")
        );
        assert!(
            normalize_tcp_target("http://zk:2181")
                .unwrap_err()
                .contains("is not an address")
        );
        assert!(
            normalize_tcp_target("0.0.0.0:2181")
                .unwrap_err()
                .contains("grants nothing")
        );
        assert!(normalize_tcp_target("zk 1:2181").is_err());
    }

    #[tokio::test]
    async fn connects_are_granted_by_address_or_by_a_name_with_its_port() {
        let grant = TcpGrant::new(&["10.0.0.5:2181".into(), "localhost:2182".into()]);
        assert!(grant.allows_connect("10.0.0.5:2181".parse().unwrap()).await);
        assert!(
            grant
                .allows_connect("[::ffff:10.0.0.5]:2181".parse().unwrap())
                .await
        );
        assert!(!grant.allows_connect("10.0.0.5:2182".parse().unwrap()).await);
        assert!(!grant.allows_connect("10.0.0.6:2181".parse().unwrap()).await);
        assert!(grant.allows_connect("127.0.0.1:2182".parse().unwrap()).await);
        assert!(!grant.allows_connect("127.0.0.1:2181".parse().unwrap()).await);
        assert!(grant.allows_lookup("LOCALHOST."));
        assert!(!grant.allows_lookup("example.internal"));
    }
}
