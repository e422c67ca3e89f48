//! The sidecar's DNS server: authoritative for one zone, answering from the resolver.
//!
//! Names under the zone (`wasd.internal` by default):
//!
//! - `SERVICE.ZONE` A/AAAA: the addresses of the service's endpoints; an endpoint given
//!   as a host name is looked up with the host's resolver first.
//! - `_NAME._tcp.SERVICE.ZONE` SRV: `_default` for the unnamed endpoints (as Microsoft's
//!   SRV provider asks), a scheme the service's endpoints carry (`_https`) for those
//!   endpoints, else the named endpoint `_NAME.SERVICE`. Each target is
//!   `ADDRESS.addr.ZONE` (dashes for dots or colons), which this server answers with
//!   A/AAAA, and those records go in the additional section.
//! - The zone's apex answers SOA.
//!
//! TTLs are the time the cached answer has left before its next refresh, capped.
//! NXDOMAIN when no provider knows the service, NODATA (NOERROR, SOA in the authority
//! section) when the name exists without that type, SERVFAIL when a provider failed
//! and there is no last good answer, REFUSED outside the zone. hickory-server frames
//! UDP and TCP, answers FORMERR to what does not parse, and truncates (TC) to the
//! client's EDNS payload size or 512 bytes.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

use super::hosts::{Hosts, Lookup};
use crate::{Endpoint, EndpointSet, Error, Query, Resolver};

/// The label under the zone that holds the SRV targets' address names.
const ADDRESS_LABEL: &str = "addr";

/// Answers DNS queries for one zone from a [`Resolver`].
pub(crate) struct DnsHandler {
    resolver: Resolver,
    zone: LowerName,
    zone_name: Name,
    /// The most a record's TTL may be.
    ttl_cap: Duration,
    /// Looks up endpoints given as host names.
    hosts: Hosts,
    soa: Record,
}

impl DnsHandler {
    pub(crate) fn new(resolver: Resolver, zone: Name, ttl_cap: Duration) -> DnsHandler {
        let ttl = ttl_secs(ttl_cap);
        let soa = Record::from_rdata(
            zone.clone(),
            ttl,
            RData::SOA(SOA::new(
                Name::from_ascii("ns")
                    .and_then(|ns| ns.append_domain(&zone))
                    .unwrap_or_else(|_| zone.clone()),
                Name::from_ascii("hostmaster")
                    .and_then(|h| h.append_domain(&zone))
                    .unwrap_or_else(|_| zone.clone()),
                1,
                ttl as i32,
                ttl as i32,
                ttl as i32,
                // Negative answers are cached as long as positive ones may be.
                ttl,
            )),
        );
        DnsHandler {
            resolver,
            zone: LowerName::new(&zone),
            zone_name: zone,
            ttl_cap,
            hosts: Hosts::new(),
            soa,
        }
    }

    /// The answer to one question.
    async fn answer(&self, name: &LowerName, qtype: RecordType) -> Answer {
        let labels = relative_labels(name, &self.zone);
        match labels.as_slice() {
            [] => self.apex(qtype),
            [address, label] if label == ADDRESS_LABEL => self.address_name(name, address, qtype),
            [endpoint, tcp, service @ ..]
                if endpoint.starts_with('_') && tcp == "_tcp" && !service.is_empty() =>
            {
                self.srv(name, &endpoint[1..], &service.join("."), qtype).await
            }
            service => self.addresses(name, &service.join("."), qtype).await,
        }
    }

    fn apex(&self, qtype: RecordType) -> Answer {
        match qtype {
            RecordType::SOA | RecordType::ANY => Answer::records(vec![self.soa.clone()], Vec::new()),
            _ => Answer::no_data(),
        }
    }

    /// `ADDRESS.addr.ZONE`: the address its first label spells.
    fn address_name(&self, name: &LowerName, address: &str, qtype: RecordType) -> Answer {
        let Some(ip) = parse_address_label(address) else {
            return Answer::code(ResponseCode::NXDomain);
        };
        let owner = Name::from(name);
        match address_record(&owner, ip, qtype, ttl_secs(self.ttl_cap)) {
            Some(record) => Answer::records(vec![record], Vec::new()),
            None => Answer::no_data(),
        }
    }

    /// `SERVICE.ZONE`: the addresses of the service's endpoints.
    async fn addresses(&self, name: &LowerName, service: &str, qtype: RecordType) -> Answer {
        let query = match Query::parse(service) {
            Ok(query) => query,
            Err(_) => return Answer::code(ResponseCode::NXDomain),
        };
        let set = match self.resolver.resolve_query(&query).await {
            Ok(set) => set,
            Err(e) => return Answer::failed(&e),
        };
        let ttl = self.ttl(&query);
        let ips = match self.endpoint_addresses(set.endpoints()).await {
            Ok(ips) => ips,
            Err(code) => return Answer::code(code),
        };
        let owner = Name::from(name);
        let records: Vec<Record> = ips
            .into_iter()
            .filter_map(|ip| address_record(&owner, ip, qtype, ttl))
            .collect();
        if records.is_empty() {
            return Answer::no_data();
        }
        Answer::records(records, Vec::new())
    }

    /// `_NAME._tcp.SERVICE.ZONE`: SRV records for the endpoints `NAME` selects.
    async fn srv(&self, name: &LowerName, selector: &str, service: &str, qtype: RecordType) -> Answer {
        let Ok(plain) = Query::parse(service) else {
            return Answer::code(ResponseCode::NXDomain);
        };
        // `_default`: the unnamed endpoints.
        let unnamed = match self.resolver.resolve_query(&plain).await {
            Ok(set) => Some(set),
            Err(Error::NoEndpoints { failures, .. }) if failures.is_empty() && selector != "default" => None,
            Err(e) => return Answer::failed(&e),
        };
        if selector == "default" {
            let set = unnamed.unwrap_or_default();
            return self.srv_answer(name, &plain, set.endpoints(), qtype).await;
        }
        // A scheme the service's endpoints carry: those endpoints.
        let by_scheme: Vec<Endpoint> = unnamed
            .iter()
            .flat_map(EndpointSet::iter)
            .filter(|e| e.scheme().is_some_and(|s| s.eq_ignore_ascii_case(selector)))
            .cloned()
            .collect();
        if !by_scheme.is_empty() {
            return self.srv_answer(name, &plain, &by_scheme, qtype).await;
        }
        // Otherwise the named endpoint `_NAME.SERVICE`.
        let Ok(named) = Query::parse(&format!("_{selector}.{service}")) else {
            return Answer::code(ResponseCode::NXDomain);
        };
        match self.resolver.resolve_query(&named).await {
            Ok(set) => self.srv_answer(name, &named, set.endpoints(), qtype).await,
            Err(e) => Answer::failed(&e),
        }
    }

    async fn srv_answer(
        &self,
        name: &LowerName,
        query: &Query,
        endpoints: &[Endpoint],
        qtype: RecordType,
    ) -> Answer {
        if !matches!(qtype, RecordType::SRV | RecordType::ANY) {
            return Answer::no_data();
        }
        let ttl = self.ttl(query);
        let owner = Name::from(name);
        let mut answers = Vec::new();
        let mut additionals = Vec::new();
        let mut targets = BTreeSet::new();
        for endpoint in endpoints {
            let Some(port) = endpoint.port().or_else(|| default_port(endpoint.scheme())) else {
                continue;
            };
            let priority = metadata_u16(endpoint, "priority").unwrap_or(1);
            let weight = metadata_u16(endpoint, "weight").unwrap_or(1);
            let ips = match self.endpoint_addresses(std::slice::from_ref(endpoint)).await {
                Ok(ips) => ips,
                Err(code) => return Answer::code(code),
            };
            for ip in ips {
                let Some(target) = self.address_target(ip) else {
                    continue;
                };
                answers.push(Record::from_rdata(
                    owner.clone(),
                    ttl,
                    RData::SRV(SRV::new(priority, weight, port, target.clone())),
                ));
                if targets.insert(target.clone())
                    && let Some(record) = address_record(&target, ip, RecordType::ANY, ttl)
                {
                    additionals.push(record);
                }
            }
        }
        if answers.is_empty() {
            return Answer::no_data();
        }
        Answer::records(answers, additionals)
    }

    /// `ADDRESS.addr.ZONE` for an address.
    fn address_target(&self, ip: IpAddr) -> Option<Name> {
        let label = match ip {
            IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
            IpAddr::V6(v6) => v6.to_string().replace(':', "-"),
        };
        Name::from_ascii(format!("{label}.{ADDRESS_LABEL}"))
            .ok()?
            .append_domain(&self.zone_name)
            .ok()
    }

    /// The addresses of endpoints: IPs as they are, host names looked up. A host name
    /// that does not exist is left out; a lookup that fails is a failure (SERVFAIL),
    /// never an answer with fewer addresses than there are. No address at all from
    /// names that do not exist is NXDOMAIN (pass-through's answer for an unknown name).
    async fn endpoint_addresses(&self, endpoints: &[Endpoint]) -> Result<Vec<IpAddr>, ResponseCode> {
        let mut ips = Vec::new();
        let mut missing = false;
        for endpoint in endpoints {
            match self.hosts.addresses(endpoint.host()).await {
                Ok(found) => {
                    for ip in found {
                        if !ips.contains(&ip) {
                            ips.push(ip);
                        }
                    }
                }
                Err(Lookup::NotFound) => missing = true,
                Err(Lookup::Failed(reason)) => {
                    tracing::warn!("DNS: an endpoint's host name: {reason}");
                    return Err(ResponseCode::ServFail);
                }
            }
        }
        if ips.is_empty() && missing {
            return Err(ResponseCode::NXDomain);
        }
        Ok(ips)
    }

    /// The TTL of records answered from `query`'s cached set: the time it has left
    /// before its next refresh, at most the cap.
    fn ttl(&self, query: &Query) -> u32 {
        let left = self
            .resolver
            .cache_state(query)
            .and_then(|state| state.refresh_in)
            .unwrap_or(self.ttl_cap);
        ttl_secs(left.min(self.ttl_cap))
    }
}

/// Records for one question, or a response code.
struct Answer {
    code: ResponseCode,
    answers: Vec<Record>,
    additionals: Vec<Record>,
    /// Put the zone's SOA in the authority section (NXDOMAIN, NODATA).
    soa: bool,
}

impl Answer {
    fn records(answers: Vec<Record>, additionals: Vec<Record>) -> Answer {
        Answer {
            code: ResponseCode::NoError,
            answers,
            additionals,
            soa: false,
        }
    }

    fn no_data() -> Answer {
        Answer {
            code: ResponseCode::NoError,
            answers: Vec::new(),
            additionals: Vec::new(),
            soa: true,
        }
    }

    fn code(code: ResponseCode) -> Answer {
        Answer {
            code,
            answers: Vec::new(),
            additionals: Vec::new(),
            soa: code == ResponseCode::NXDomain,
        }
    }

    /// A resolve that failed: nothing known is NXDOMAIN; a provider failure with no
    /// last good answer is SERVFAIL (never an empty answer); a query the host's
    /// allowed schemes refuse is REFUSED.
    fn failed(error: &Error) -> Answer {
        match error {
            Error::NoEndpoints { failures, .. } if failures.is_empty() => {
                Answer::code(ResponseCode::NXDomain)
            }
            Error::NoEndpoints { .. } => {
                tracing::warn!("DNS: {error}");
                Answer::code(ResponseCode::ServFail)
            }
            Error::InvalidQuery { .. } => Answer::code(ResponseCode::NXDomain),
            Error::SchemeNotAllowed { .. } => Answer::code(ResponseCode::Refused),
            _ => Answer::code(ResponseCode::ServFail),
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        // EDNS: answer with the client's payload size (at least 512), so that
        // hickory-server truncates a UDP answer to what the client can take.
        let edns = request.edns.as_ref().map(|asked| {
            let mut edns = Edns::new();
            edns.set_max_payload(asked.max_payload().max(512));
            edns.set_version(0);
            edns
        });
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
        let code = if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            Some(ResponseCode::BADVERS)
        } else if request.metadata.message_type != MessageType::Query
            || request.metadata.op_code != OpCode::Query
        {
            Some(ResponseCode::NotImp)
        } else {
            None
        };
        let question = match (code, request.request_info()) {
            (Some(code), _) => Err(code),
            (None, Ok(info)) => Ok(info.query.clone()),
            // Not exactly one question.
            (None, Err(_)) => Err(ResponseCode::FormErr),
        };
        let answer = match question {
            Err(code) => Answer::code(code),
            Ok(question) if !self.zone.zone_of(question.name()) => Answer::code(ResponseCode::Refused),
            Ok(question) => self.answer(question.name(), question.query_type()).await,
        };
        metadata.authoritative = !matches!(answer.code, ResponseCode::Refused | ResponseCode::FormErr);
        metadata.response_code = answer.code;
        let soa = answer.soa.then_some(&self.soa);
        let message = builder.build(
            metadata,
            answer.answers.iter(),
            std::iter::empty(),
            soa,
            answer.additionals.iter(),
        );
        match response.send_response(message).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!("DNS: sending a response failed: {e}");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

/// The labels of `name` below `zone`, outermost last, lower-case: `_https._tcp.catalog`
/// → `["_https", "_tcp", "catalog"]`.
fn relative_labels(name: &LowerName, zone: &LowerName) -> Vec<String> {
    let name = Name::from(name);
    let keep = name.num_labels().saturating_sub(zone.num_labels()) as usize;
    name.iter()
        .take(keep)
        .map(|label| String::from_utf8_lossy(label).to_ascii_lowercase())
        .collect()
}

/// `10-0-0-1` → 10.0.0.1, `fd00--1` → fd00::1.
fn parse_address_label(label: &str) -> Option<IpAddr> {
    label
        .replace('-', ".")
        .parse()
        .ok()
        .or_else(|| label.replace('-', ":").parse().ok())
}

/// An A or AAAA record for `ip` when the question asks for that type (`ANY`: either).
fn address_record(owner: &Name, ip: IpAddr, qtype: RecordType, ttl: u32) -> Option<Record> {
    match (ip, qtype) {
        (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => {
            Some(Record::from_rdata(owner.clone(), ttl, RData::A(A(v4))))
        }
        (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => {
            Some(Record::from_rdata(owner.clone(), ttl, RData::AAAA(AAAA(v6))))
        }
        _ => None,
    }
}

fn default_port(scheme: Option<&str>) -> Option<u16> {
    match scheme? {
        s if s.eq_ignore_ascii_case("http") => Some(80),
        s if s.eq_ignore_ascii_case("https") => Some(443),
        _ => None,
    }
}

fn metadata_u16(endpoint: &Endpoint, key: &str) -> Option<u16> {
    endpoint.metadata_value(key)?.parse().ok()
}

fn ttl_secs(ttl: Duration) -> u32 {
    u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX)
}

/// The zone as configured, checked: `wasd.internal`.
pub(crate) fn parse_zone(zone: &str) -> Result<Name, String> {
    let trimmed = zone.trim_end_matches('.');
    if trimmed.is_empty() {
        return Err("the DNS zone is empty".into());
    }
    let name = Name::from_ascii(trimmed)
        .map_err(|e| format!("'{}' is not a DNS zone name: {e}", zone.escape_default()))?;
    let mut name = name.to_lowercase();
    name.set_fqdn(true);
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_labels_round_trip() {
        assert_eq!(parse_address_label("10-0-0-1"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(parse_address_label("fd00--1"), Some("fd00::1".parse().unwrap()));
        assert_eq!(parse_address_label("basket"), None);
    }

    #[test]
    fn labels_are_taken_below_the_zone() {
        let zone = LowerName::new(&parse_zone("wasd.internal").unwrap());
        let name = LowerName::new(&Name::from_ascii("_https._tcp.Catalog.wasd.internal.").unwrap());
        assert_eq!(relative_labels(&name, &zone), ["_https", "_tcp", "catalog"]);
        assert!(relative_labels(&zone, &zone).is_empty());
        assert!(parse_zone("").is_err());
        assert!(parse_zone("bad..zone").is_err());
    }
}
