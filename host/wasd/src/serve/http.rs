//! The sidecar's HTTP API (axum): JSON over the resolver.
//!
//! - `GET /v1/resolve?query=Q[&filter=KEY=VALUE…]`: 200 with the object `wasd resolve
//!   Q --json` prints; 404 when no provider has endpoints; 400 for a bad query; 503
//!   when a provider failed and there is no last good set.
//! - `GET /v1/watch?query=Q&index=N&wait=30s`: a blocking query, as Consul's: the set
//!   (with its `index`, also in `X-Wasd-Index`) as soon as its index differs from `N`,
//!   or after `wait` (at most 5 minutes) unchanged; `index=0` answers at once.
//! - `PUT /v1/instances/SERVICE/ID` (`{"endpoints": [...], "version": "...",
//!   "metadata": {...}, "ttl": "15s"}`) registers through the registrar provider and
//!   holds the instance while the client repeats the PUT within `ttl`; `DELETE`
//!   deregisters it at once. With a token, both need `Authorization: Bearer TOKEN`.
//! - `GET /v1/status`: providers in order with their health, the last reload, the
//!   instances held.
//! - `GET /healthz`, `GET /metrics` (Prometheus text).
//!
//! Errors are JSON `{"error": "..."}` on one line.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::Path;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};

use super::instances::{InstanceBody, Instances};
use crate::{EndpointSet, Error, Query, Resolver};

/// The longest a blocking `/v1/watch` waits, and its default.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(300);
/// The largest request body accepted (the API's bodies are small JSON objects).
const MAX_BODY: usize = 64 * 1024;

pub(crate) struct Api {
    pub(crate) resolver: Resolver,
    pub(crate) metrics: Option<PrometheusHandle>,
    /// `/v1/watch` requests waiting for a change now.
    pub(crate) blocked: AtomicUsize,
    /// Instances registered through the API.
    pub(crate) instances: Instances,
    /// The bearer token mutating calls need, if any.
    pub(crate) token: Option<String>,
}

/// Counts a blocked watch while it waits.
struct Blocked<'a>(&'a AtomicUsize);

impl<'a> Blocked<'a> {
    fn new(count: &'a AtomicUsize) -> Blocked<'a> {
        count.fetch_add(1, Ordering::Relaxed);
        Blocked(count)
    }
}

impl Drop for Blocked<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/v1/resolve", get(resolve))
        .route("/v1/watch", get(watch))
        .route("/v1/status", get(status))
        .route(
            "/v1/instances/{service}/{id}",
            put(put_instance).delete(delete_instance),
        )
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(api)
}

/// A JSON error with its status.
fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    let message = message.to_string();
    let one_line = message.split_whitespace().collect::<Vec<_>>().join(" ");
    (status, axum::Json(json!({ "error": one_line }))).into_response()
}

/// The status a failed resolve is answered with.
fn error_status(e: &Error) -> StatusCode {
    match e {
        Error::NoEndpoints { failures, .. } if failures.is_empty() => StatusCode::NOT_FOUND,
        Error::NoEndpoints { .. } => StatusCode::SERVICE_UNAVAILABLE,
        Error::InvalidQuery { .. } | Error::SchemeNotAllowed { .. } | Error::InvalidInstance { .. } => {
            StatusCode::BAD_REQUEST
        }
        // No provider registers: the sidecar cannot do what was asked.
        Error::NoRegistrar(_) => StatusCode::NOT_IMPLEMENTED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The parameters of a resolve or watch: `query`, repeated `filter=KEY=VALUE`, and the
/// watch's `index` and `wait`.
struct Params {
    query: Query,
    index: u64,
    wait: Duration,
}

/// `Err`: why the parameters are refused (a 400).
fn params(raw: Option<&str>) -> Result<Params, String> {
    let mut query = None;
    let mut filters = Vec::new();
    let mut index = 0;
    let mut wait = MAX_WAIT;
    for (key, value) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        match &*key {
            "query" => query = Some(value.into_owned()),
            "filter" => match value.split_once('=') {
                Some((k, v)) if !k.is_empty() => filters.push((k.to_owned(), v.to_owned())),
                _ => return Err(format!("filter '{}' is not KEY=VALUE", value.escape_default())),
            },
            "index" => {
                index = value
                    .parse()
                    .map_err(|_| format!("index '{}' is not a number", value.escape_default()))?;
            }
            "wait" => {
                wait = humantime::parse_duration(&value)
                    .map_err(|e| {
                        format!(
                            "wait '{}' is not a duration like \"30s\" ({e})",
                            value.escape_default()
                        )
                    })?
                    .min(MAX_WAIT);
            }
            // Unknown parameters are ignored, as HTTP APIs usually do.
            _ => {}
        }
    }
    let Some(text) = query else {
        return Err("the query parameter is missing (?query=catalog)".to_owned());
    };
    let mut query = Query::parse(&text).map_err(|e| e.to_string())?;
    for (key, value) in filters {
        query = query.with_filter(key, value);
    }
    Ok(Params { query, index, wait })
}

/// A set as JSON, with its index in `X-Wasd-Index`.
fn set_response(query: &Query, set: &EndpointSet) -> Response {
    let mut response = axum::Json(crate::json::set(query, set)).into_response();
    response
        .headers_mut()
        .insert("x-wasd-index", HeaderValue::from(set.index()));
    response
}

async fn resolve(State(api): State<Arc<Api>>, RawQuery(raw): RawQuery) -> Response {
    let params = match params(raw.as_deref()) {
        Ok(params) => params,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    match api.resolver.resolve_query(&params.query).await {
        Ok(set) => set_response(&params.query, &set),
        Err(e) => error(error_status(&e), e),
    }
}

async fn watch(State(api): State<Arc<Api>>, RawQuery(raw): RawQuery) -> Response {
    let params = match params(raw.as_deref()) {
        Ok(params) => params,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    let mut watch = match api.resolver.watch_query(&params.query).await {
        Ok(watch) => watch,
        Err(e) => return error(error_status(&e), e),
    };
    let current = watch.current();
    if params.index == 0 || current.index() != params.index {
        return set_response(&params.query, &current);
    }
    // Unchanged: wait for a change, at most `wait`. A set whose endpoints did not
    // change keeps its index, so a change is always a new index.
    let blocked = Blocked::new(&api.blocked);
    let changed = tokio::time::timeout(params.wait, watch.changed()).await;
    drop(blocked);
    let set = match changed {
        Ok(Some(set)) => set,
        // The resolver is going away, or nothing changed in time: the set as it is.
        Ok(None) | Err(_) => watch.current(),
    };
    set_response(&params.query, &set)
}

async fn status(State(api): State<Arc<Api>>) -> Response {
    let reload = api.resolver.reload_status();
    let millis = |d: Duration| d.as_secs_f64() * 1000.0;
    let providers: Vec<Value> = api
        .resolver
        .provider_status()
        .into_iter()
        .map(|p| {
            json!({
                "name": p.name,
                "state": if p.quarantined_for.is_some() { "quarantined" } else { "serving" },
                "faults": p.faults,
                "faults_in_a_row": p.faults_in_a_row,
                "quarantined_for_ms": p.quarantined_for.map(millis),
                "instances": p.instances,
            })
        })
        .collect();
    let instances = api.instances.status().await;
    axum::Json(json!({
        "instances": instances,
        "providers": providers,
        "blocked_watches": api.blocked.load(Ordering::Relaxed),
        "reload": {
            "generation": reload.generation,
            "reloads": reload.reloads,
            "errors": reload.errors.iter().map(|e| json!({
                "provider": e.provider,
                "source": e.source,
                "reason": e.reason,
            })).collect::<Vec<_>>(),
            "draining": reload.draining,
        },
    }))
    .into_response()
}

/// `None` when the call may go on; else the 401 to answer.
fn unauthorized(api: &Api, headers: &HeaderMap) -> Option<Response> {
    let token = api.token.as_deref()?;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compared in full whatever the first difference, so the time taken says nothing
    // about how much of a guess was right.
    let matches = given.is_some_and(|given| {
        given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0, |d, (a, b)| d | (a ^ b)) == 0
    });
    if matches {
        return None;
    }
    let mut response = error(
        StatusCode::UNAUTHORIZED,
        "this call needs the header Authorization: Bearer <token> ([serve] token-env)",
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(response)
}

async fn put_instance(
    State(api): State<Arc<Api>>,
    Path((service, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = unauthorized(&api, &headers) {
        return refused;
    }
    let body: InstanceBody = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not an instance: {e}"),
            );
        }
    };
    let (instance, ttl) = match body.instance(&service, &id) {
        Ok(instance) => instance,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    match api.instances.put(&api.resolver, instance, ttl).await {
        Ok(state) => axum::Json(state).into_response(),
        Err(e) => error(error_status(&e), e),
    }
}

async fn delete_instance(
    State(api): State<Arc<Api>>,
    Path((service, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = unauthorized(&api, &headers) {
        return refused;
    }
    if api.instances.delete(&service, &id).await {
        axum::Json(json!({ "service": service, "id": id, "state": "deregistered" })).into_response()
    } else {
        error(
            StatusCode::NOT_FOUND,
            format!(
                "no instance {}/{} is registered through this server",
                service.escape_default(),
                id.escape_default()
            ),
        )
    }
}

async fn healthz() -> Response {
    axum::Json(json!({ "status": "ok" })).into_response()
}

async fn metrics(State(api): State<Arc<Api>>) -> Response {
    match &api.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            handle.render(),
        )
            .into_response(),
        None => error(StatusCode::NOT_FOUND, "metrics are not recorded by this server"),
    }
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such path; the API is under /v1/")
}
