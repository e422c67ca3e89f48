//! The etcd provider: Kratos-compatible discovery, watch and registration over etcd's
//! v3 HTTP/JSON gateway, through `wasi:http` (the host sends the requests, only to the
//! origins it granted, with the TLS roots it was given).
//!
//! Instances live under `{namespace}/{service}/{id}` (namespace `/microservices`), each
//! value a Kratos ServiceInstance in JSON. A query for `hello` reads the range
//! `{namespace}/hello/` (so `helloworld` never matches) and keeps instances whose
//! `name` is `hello`. Answers carry the etcd revision as their version; `watch` streams
//! `/v3/watch` from the next revision and reads the range again on the first change.

// Pure parsers, also compiled into the fuzz targets (fuzz/) by path.
mod gateway;

use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;
use wasd_sdk::http::HttpError;
use wasd_sdk::{Configuration, Endpoint, Error, Provider, Query, Registrar, Resolution, ServiceInstance};

use crate::gateway::{Gateway, WatchMessage, b64, malformed, prefix_end, shorten};
use wasd_registry::{Instance, credentials, matches_name, parse_duration, parse_size, push_endpoints};

/// Longest watch line read (one event batch).
const MAX_WATCH_LINE: usize = 16 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Settings {
    /// Gateway URLs, tried in order: `http://127.0.0.1:2379`.
    endpoints: Vec<String>,
    #[serde(default = "default_namespace")]
    namespace: String,
    /// Per-request timeout ("500ms", "2s"); keep it under the provider's time limit.
    timeout: Option<String>,
    username: Option<String>,
    password: Option<String>,
    /// Read the password from this (granted) environment variable instead.
    password_env: Option<String>,
    /// How long a watch stream may stay quiet before the member is asked whether it
    /// is still there ("5s"); a frozen member is left for another after this plus
    /// `timeout`.
    watch_keepalive: Option<String>,
    /// How long to go on trying the endpoints, round after round, when none answers
    /// ("2s"; default: one round). An election takes 1-2 s with etcd's defaults;
    /// keep this plus a round of `timeout`s under the provider's time limit.
    retry_for: Option<String>,
    /// Largest answer read ("16MiB"); a range past it is an error naming this setting.
    max_response: Option<String>,
}

fn default_namespace() -> String {
    "/microservices".into()
}

struct Etcd {
    gateway: Gateway,
    namespace: String,
    watch_keepalive: Duration,
}

impl Etcd {
    fn prefix(&self, service: &str) -> Vec<u8> {
        format!("{}/{service}/", self.namespace).into_bytes()
    }

    fn range_body(&self, service: &str) -> serde_json::Value {
        let prefix = self.prefix(service);
        json!({ "key": b64(&prefix), "range_end": b64(&prefix_end(&prefix)) })
    }

    /// Read every instance of the service: the answer and the revision it was read at.
    fn read(&self, query: &Query) -> Result<Resolution, Error> {
        let body = self
            .gateway
            .call("/v3/kv/range", &self.range_body(&query.service))?;
        let range = gateway::parse_range(&body).map_err(|e| malformed("etcd", "/v3/kv/range", &e))?;
        let mut endpoints = Vec::new();
        for kv in range.kvs {
            let key = String::from_utf8_lossy(&kv.key);
            push_endpoints(&kv.value, &query.service, &shorten(&key, 200), &mut endpoints);
        }
        if let Some(name) = &query.endpoint_name {
            endpoints.retain(|e: &Endpoint| matches_name(e, name));
        }
        Ok(Resolution::new(endpoints).with_version(range.revision.to_string()))
    }
}

impl Provider for Etcd {
    fn configure(config: Configuration) -> Result<Self, Error> {
        let settings: Settings = serde_json::from_str(&config.settings)
            .map_err(|e| Error::InvalidSettings(format!("settings: {e}")))?;
        if settings.endpoints.is_empty() {
            return Err(Error::InvalidSettings(
                "settings.endpoints: give at least one etcd gateway URL, like \"http://127.0.0.1:2379\""
                    .into(),
            ));
        }
        let mut endpoints = Vec::new();
        for url in &settings.endpoints {
            let url = url.trim_end_matches('/');
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(Error::InvalidSettings(format!(
                    "settings.endpoints: '{url}' is not an http:// or https:// URL"
                )));
            }
            endpoints.push(url.to_owned());
        }
        let namespace = settings.namespace.trim_end_matches('/').to_owned();
        if !namespace.starts_with('/') {
            return Err(Error::InvalidSettings(format!(
                "settings.namespace: '{namespace}' must start with '/'"
            )));
        }
        let timeout = match &settings.timeout {
            None => Duration::from_millis(500),
            Some(t) => parse_duration(t).ok_or_else(|| {
                Error::InvalidSettings(format!(
                    "settings.timeout: '{t}' is not a duration like \"500ms\" or \"2s\""
                ))
            })?,
        };
        let watch_keepalive = match &settings.watch_keepalive {
            None => Duration::from_secs(5),
            Some(t) => parse_duration(t).filter(|d| !d.is_zero()).ok_or_else(|| {
                Error::InvalidSettings(format!(
                    "settings.watch-keepalive: '{t}' is not a positive duration like \"5s\""
                ))
            })?,
        };
        let retry_for = match &settings.retry_for {
            None => Duration::ZERO,
            Some(t) => parse_duration(t).ok_or_else(|| {
                Error::InvalidSettings(format!("settings.retry-for: '{t}' is not a duration like \"2s\""))
            })?,
        };
        let max_response = match &settings.max_response {
            None => gateway::DEFAULT_MAX_RESPONSE,
            Some(t) => parse_size(t).ok_or_else(|| {
                Error::InvalidSettings(format!(
                    "settings.max-response: '{t}' is not a size like \"16MiB\" or \"512KiB\""
                ))
            })?,
        };
        let credentials = credentials(
            settings.username,
            settings.password,
            settings.password_env,
            "username",
        )?;
        Ok(Etcd {
            gateway: Gateway::new(endpoints, timeout, retry_for, max_response, credentials),
            namespace,
            watch_keepalive,
        })
    }

    fn resolve(&self, query: Query) -> Result<Resolution, Error> {
        self.read(&query)
    }

    fn watch(&self, query: Query, version: String, timeout_ms: u64) -> Result<Option<Resolution>, Error> {
        let revision: i64 = version
            .parse()
            .map_err(|_| Error::InvalidQuery(format!("'{version}' is not an etcd revision")))?;
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        let mut body = self.range_body(&query.service);
        body["start_revision"] = json!((revision + 1).to_string());
        let request = json!({ "create_request": body });
        let gateway = &self.gateway;
        let mut stream = gateway.stream("/v3/watch", &request, Duration::from_millis(timeout_ms))?;
        let mut member = gateway.current();
        // Moves to another member since the last sign of life; past one round of the
        // cluster, the failure is the host's to back off from.
        let mut moves = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // With one endpoint there is nowhere to move: no probes, only the wait.
            let quiet = if gateway.members() > 1 {
                left.min(self.watch_keepalive)
            } else {
                left
            };
            let lost = match stream.next_line(quiet, MAX_WATCH_LINE) {
                Ok(Some(line)) if line.iter().all(u8::is_ascii_whitespace) => continue,
                Ok(Some(line)) => {
                    match gateway::parse_watch_line(&line).map_err(|e| malformed("etcd", "/v3/watch", &e))? {
                        WatchMessage::Created | WatchMessage::Events(0) => {
                            moves = 0;
                            continue;
                        }
                        // A change, or history compacted past our revision: read it all again.
                        WatchMessage::Events(_) | WatchMessage::Compacted(_) => {
                            return self.read(&query).map(Some);
                        }
                        WatchMessage::Canceled(reason) => {
                            return Err(Error::Unavailable(format!("etcd canceled the watch: {reason}")));
                        }
                        // "no leader" (see the gateway's require-leader header), or a
                        // member shutting down: another member may serve the watch.
                        WatchMessage::Error(message) => format!("etcd watch failed: {message}"),
                    }
                }
                Ok(None) => "etcd closed the watch stream".to_owned(),
                Err(HttpError::Timeout) if Instant::now() >= deadline => return Ok(None),
                // Quiet for a while: idle, or a member that froze? Ask it.
                Err(HttpError::Timeout) => match gateway.probe(member) {
                    Ok(()) => continue,
                    Err(e) => format!("the watch went quiet and the member does not answer: {e}"),
                },
                // An event batch past the limit is no member's fault.
                Err(e @ HttpError::TooLarge(_)) => return Err(e.into()),
                Err(e) => format!("the watch stream failed: {e}"),
            };
            let from = gateway.endpoint(member);
            moves += 1;
            if moves > gateway.members() {
                return Err(Error::Unavailable(format!("etcd at {from}: {lost}")));
            }
            // The same watch on the next member, from the same revision: etcd keeps
            // history, so nothing written meanwhile is missed.
            wasd_sdk::debug!("etcd at {from}: {lost}; watching from another member");
            gateway.skip(member);
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Out of time: the host asks the chain next, which reads from whichever
                // member answers.
                return Ok(None);
            }
            stream = gateway.stream("/v3/watch", &request, left)?;
            member = gateway.current();
        }
    }
}

impl Registrar for Etcd {
    fn register(&self, instance: ServiceInstance, ttl_ms: u64) -> Result<String, Error> {
        let ttl_s = ttl_ms.div_ceil(1000).max(1);
        let body = self
            .gateway
            .call("/v3/lease/grant", &json!({ "TTL": ttl_s.to_string() }))?;
        let lease =
            gateway::parse_lease_grant(&body).map_err(|e| malformed("etcd", "/v3/lease/grant", &e))?;
        let value = Instance {
            id: instance.id.clone(),
            name: instance.name.clone(),
            version: instance.version,
            metadata: instance.metadata.into_iter().collect(),
            endpoints: instance.endpoints,
        };
        let key = self.key(&instance.name, &instance.id);
        self.gateway.call(
            "/v3/kv/put",
            &json!({ "key": b64(&key), "value": b64(&value.to_json()), "lease": lease }),
        )?;
        Ok(lease)
    }

    fn keep_alive(&self, instance: ServiceInstance, lease: String) -> Result<bool, Error> {
        let body = self
            .gateway
            .call("/v3/lease/keepalive", &json!({ "ID": lease }))?;
        let first = body.split(|&b| b == b'\n').next().unwrap_or_default();
        if !gateway::parse_keep_alive(first).map_err(|e| malformed("etcd", "/v3/lease/keepalive", &e))? {
            return Ok(false);
        }
        // The lease lives; is the instance still ours? (Deleted by hand, or taken
        // over by a successor with the same id: then register again.)
        let key = self.key(&instance.name, &instance.id);
        let body = self.gateway.call("/v3/kv/range", &json!({ "key": b64(&key) }))?;
        let range = gateway::parse_range(&body).map_err(|e| malformed("etcd", "/v3/kv/range", &e))?;
        Ok(range.kvs.first().is_some_and(|kv| kv.lease.to_string() == lease))
    }

    fn deregister(&self, instance: ServiceInstance, lease: Option<String>) -> Result<(), Error> {
        let key = self.key(&instance.name, &instance.id);
        match &lease {
            // Only if still under our lease: a successor with the same id stays.
            Some(lease) => {
                let txn = json!({
                    "compare": [{ "key": b64(&key), "target": "LEASE", "result": "EQUAL", "lease": lease }],
                    "success": [{ "request_delete_range": { "key": b64(&key) } }],
                });
                self.gateway.call("/v3/kv/txn", &txn)?;
            }
            None => {
                self.gateway
                    .call("/v3/kv/deleterange", &json!({ "key": b64(&key) }))?;
            }
        }
        if let Some(lease) = lease {
            // The key is gone already; a lease etcd has lost is not an error.
            if let Err(e) = self.gateway.call("/v3/lease/revoke", &json!({ "ID": lease })) {
                wasd_sdk::debug!("revoking lease {lease}: {e:?}");
            }
        }
        Ok(())
    }
}

impl Etcd {
    fn key(&self, service: &str, id: &str) -> Vec<u8> {
        format!("{}/{service}/{id}", self.namespace).into_bytes()
    }
}

wasd_sdk::export!(Etcd, registrar);
