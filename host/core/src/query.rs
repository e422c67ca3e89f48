//! Query syntax, as Microsoft.Extensions.ServiceDiscovery defines it.
//!
//! `basket`, `http://basket`, `https+http://basket` (schemes in order of preference),
//! `https://_dashboard.basket` (endpoint `dashboard` of service `basket`), each with an
//! optional port and path.

use std::fmt;
use std::str::FromStr;

use crate::Error;
use crate::text::sanitize;

/// Longest query accepted; anything longer is not a service name.
const MAX_QUERY_LEN: usize = 2048;

/// A parsed service query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    original: String,
    schemes: Vec<String>,
    service: String,
    endpoint_name: Option<String>,
    port: Option<u16>,
    path: String,
    filters: Vec<(String, String)>,
}

impl Query {
    /// Parse a query such as `https+http://_dashboard.basket:8080/path`.
    pub fn parse(input: &str) -> Result<Query, Error> {
        // Parts of the input appear in the reason: one line, bounded, whatever they hold.
        let invalid = |reason: String| Error::InvalidQuery {
            query: sanitize(input, 120),
            reason: sanitize(&reason, 300),
        };
        if input.len() > MAX_QUERY_LEN {
            return Err(invalid(format!("longer than {MAX_QUERY_LEN} bytes")));
        }
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(invalid("the query is empty".into()));
        }
        let (schemes, rest) = match trimmed.split_once("://") {
            Some((schemes, rest)) => (parse_schemes(schemes).map_err(invalid)?, rest),
            None => (Vec::new(), trimmed),
        };
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(invalid("user information (`user@`) is not allowed".into()));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => {
                let port = port
                    .parse::<u16>()
                    .map_err(|_| invalid(format!("the port '{port}' is not a number from 0 to 65535")))?;
                (host, Some(port))
            }
            None => (authority, None),
        };
        if host.is_empty() {
            return Err(invalid("the service name is empty".into()));
        }
        // The service name keeps its case: registries key services by name verbatim
        // (Kratos writes `/microservices/Hello/...`), while DNS and the configuration
        // provider compare names case-insensitively. Endpoint names are lower-cased.
        let host = host.to_owned();
        // `_name.service`: the part between `_` and the first dot names the endpoint.
        let (endpoint_name, service) = match host.find('.') {
            Some(dot) if host.starts_with('_') && dot > 1 && !host.ends_with('.') => (
                Some(host[1..dot].to_ascii_lowercase()),
                host[dot + 1..].to_owned(),
            ),
            _ => (None, host),
        };
        if let Some(bad) = service
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
        {
            return Err(invalid(format!(
                "the service name '{service}' contains '{}', which a host name cannot",
                bad.escape_default()
            )));
        }
        if let Some(name) = &endpoint_name
            && let Some(bad) = name
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
        {
            return Err(invalid(format!(
                "the endpoint name '{name}' contains '{}'",
                bad.escape_default()
            )));
        }
        Ok(Query {
            original: input.to_owned(),
            schemes,
            service,
            endpoint_name,
            port,
            path: path.to_owned(),
            filters: Vec::new(),
        })
    }

    /// Keep only endpoints whose metadata has `key` = `value` (an instance's
    /// `version`, a `zone`...). Filters add up; a provider whose endpoints all fail
    /// them counts as having none, so the next provider is asked.
    pub fn with_filter(mut self, key: impl Into<String>, value: impl Into<String>) -> Query {
        let filter = (key.into(), value.into());
        if !self.filters.contains(&filter) {
            self.filters.push(filter);
            self.filters.sort();
        }
        self
    }

    /// The metadata filters, sorted.
    pub fn filters(&self) -> &[(String, String)] {
        &self.filters
    }

    /// The query as written.
    pub fn as_str(&self) -> &str {
        &self.original
    }

    /// The service name, as written (`basket`, `Hello`).
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The named endpoint (`dashboard` for `_dashboard.basket`).
    pub fn endpoint_name(&self) -> Option<&str> {
        self.endpoint_name.as_deref()
    }

    /// The schemes written, most preferred first (`["https", "http"]`).
    pub fn schemes(&self) -> &[String] {
        &self.schemes
    }

    /// The port written, if any.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The path, query string and fragment written after the service (`/api/items`),
    /// or an empty string.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl FromStr for Query {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Query::parse(s)
    }
}

impl fmt::Display for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.original)
    }
}

fn parse_schemes(written: &str) -> Result<Vec<String>, String> {
    written
        .split('+')
        .map(|scheme| {
            let valid = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'));
            if valid {
                Ok(scheme.to_ascii_lowercase())
            } else if scheme.is_empty() {
                Err(format!("the scheme list '{written}' has an empty scheme"))
            } else {
                Err(format!("'{scheme}' is not a valid scheme"))
            }
        })
        .collect()
}

/// The schemes a query accepts once the host's allowed schemes are applied, following
/// Microsoft's `ApplyAllowedSchemes`: the query's schemes that are allowed, in the
/// query's order; for a query without schemes, the allowed schemes themselves.
///
/// Returns `None` when the query names schemes and none of them is allowed.
pub(crate) fn effective_schemes(query: &Query, allowed: &[String]) -> Option<Vec<String>> {
    if allowed.is_empty() {
        return Some(query.schemes.clone());
    }
    if query.schemes.is_empty() {
        return Some(allowed.to_vec());
    }
    let kept: Vec<String> = query
        .schemes
        .iter()
        .filter(|s| allowed.iter().any(|a| a.eq_ignore_ascii_case(s)))
        .cloned()
        .collect();
    (!kept.is_empty()).then_some(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(q: &str) -> (Vec<String>, String, Option<String>, Option<u16>, String) {
        let q = Query::parse(q).unwrap();
        (
            q.schemes.clone(),
            q.service.clone(),
            q.endpoint_name.clone(),
            q.port,
            q.path.clone(),
        )
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn plain_service_name() {
        assert_eq!(parts("basket"), (vec![], "basket".into(), None, None, "".into()));
        assert_eq!(
            parts("Basket:8080"),
            (vec![], "Basket".into(), None, Some(8080), "".into())
        );
    }

    #[test]
    fn schemes_in_order_of_preference() {
        assert_eq!(parts("http://basket").0, s(&["http"]));
        assert_eq!(parts("https+http://basket").0, s(&["https", "http"]));
        assert_eq!(parts("HTTPS+Http://basket").0, s(&["https", "http"]));
    }

    #[test]
    fn named_endpoints() {
        assert_eq!(
            parts("https://_dashboard.basket"),
            (
                s(&["https"]),
                "basket".into(),
                Some("dashboard".into()),
                None,
                "".into()
            )
        );
        assert_eq!(parts("_grpc.catalog.svc:81").2, Some("grpc".into()));
        assert_eq!(parts("_grpc.catalog.svc:81").1, "catalog.svc");
        // Microsoft's rule: `_` alone before the dot, or a trailing dot, is no name.
        assert_eq!(parts("_.basket").2, None);
        assert_eq!(parts("_x.basket.").2, None);
        assert_eq!(parts("_basket").2, None);
    }

    #[test]
    fn ports_and_paths() {
        assert_eq!(
            parts("https+http://catalog:8443/api/items?x=1"),
            (
                s(&["https", "http"]),
                "catalog".into(),
                None,
                Some(8443),
                "/api/items?x=1".into()
            )
        );
        assert_eq!(parts("http://catalog/").4, "/");
    }

    #[test]
    fn bad_queries_say_why() {
        for (query, why) in [
            ("", "empty"),
            ("   ", "empty"),
            ("http://", "service name is empty"),
            ("http://:80", "service name is empty"),
            ("+http://x", "empty scheme"),
            ("ht tp://x", "not a valid scheme"),
            ("1http://x", "not a valid scheme"),
            ("http://basket:http", "port 'http'"),
            ("http://basket:70000", "port '70000'"),
            ("http://user@basket", "user information"),
            ("bas ket", "contains ' '"),
            ("bäsket", "contains"),
            ("_da$h.basket", "endpoint name"),
        ] {
            let err = Query::parse(query).expect_err(query).to_string();
            assert!(err.contains(why), "{query:?}: {err}");
        }
        let long = "a".repeat(5000);
        assert!(
            Query::parse(&long)
                .unwrap_err()
                .to_string()
                .contains("longer than")
        );
    }

    #[test]
    fn allowed_schemes_follow_microsoft() {
        let q = Query::parse("https+http://basket").unwrap();
        assert_eq!(effective_schemes(&q, &[]), Some(s(&["https", "http"])));
        assert_eq!(effective_schemes(&q, &s(&["http"])), Some(s(&["http"])));
        assert_eq!(effective_schemes(&q, &s(&["grpc"])), None);
        let bare = Query::parse("basket").unwrap();
        assert_eq!(effective_schemes(&bare, &[]), Some(vec![]));
        assert_eq!(effective_schemes(&bare, &s(&["https"])), Some(s(&["https"])));
    }

    #[test]
    fn errors_stay_on_one_line() {
        // Found by fuzz/fuzz_targets/query.rs: a newline in the service name.
        for input in [
            "a\naTTCt\u{0}a.\u{0}\u{0}g",
            "http://x:\n1",
            "ht\ntp://x",
            &"\n".repeat(3000),
        ] {
            let message = Query::parse(input).unwrap_err().to_string();
            assert!(!message.contains('\n'), "{message:?}");
            assert!(message.len() < 1200, "{} bytes", message.len());
        }
    }
}
