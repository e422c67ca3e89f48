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
//! - `GET /`: the status page for operators (`status.html`, `status.js`: no external
//!   assets; it polls `/v1/status`).
//!
//! Errors are JSON `{"error": "..."}` on one line, the extractors' rejections
//! included. Requests are bounded: header size and count, the time to send the
//! headers and the body, the body's size, the time to answer, and the connections
//! open at once ([`serve`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::HeaderMap;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use super::instances::{InstanceBody, Instances};
use crate::{EndpointSet, Error, Query, Resolver};

/// The longest a blocking `/v1/watch` waits, and its default.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(300);
/// The largest request body accepted (the API's bodies are small JSON objects).
const MAX_BODY: usize = 64 * 1024;
/// The largest request head (request line and headers), and the most headers: a
/// larger one is answered 431. Browsers' cookies are not expected here.
const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
/// How long a client may take to send a request's head, and how long a kept-alive
/// connection may sit idle before its next one (hyper times both as one).
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a body.
pub(crate) const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request may take to be answered (a watch: its wait and this).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more wait in the listen queue. Blocked watches hold
/// theirs for up to [`MAX_WAIT`].
const MAX_CONNECTIONS: usize = 4096;
/// How long in-flight requests may finish once the server is told to stop.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Api {
    pub(crate) resolver: Resolver,
    pub(crate) metrics: Option<PrometheusHandle>,
    /// `/v1/watch` requests waiting for a change now.
    pub(crate) blocked: AtomicUsize,
    /// Instances registered through the API.
    pub(crate) instances: Instances,
    /// The bearer token mutating calls need, if any.
    pub(crate) token: Option<String>,
    /// Set once the server stops: blocked watches answer at once.
    pub(crate) stopping: watch::Sender<bool>,
    /// `/v1/pick`'s balancers, by query and filters, with when each was last used: each
    /// keeps its position, counters and zone decision across requests.
    pub(crate) balancers:
        std::sync::Mutex<std::collections::HashMap<String, (crate::Balancer, std::time::Instant)>>,
    /// The xDS server's open streams and followed services, when it runs.
    #[cfg(feature = "xds")]
    pub(crate) xds: Option<Arc<super::xds::XdsCounts>>,
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
        .route("/", get(page))
        .route("/status.js", get(script))
        .route("/v1/resolve", get(resolve))
        .route("/v1/pick", get(pick))
        .route("/v1/watch", get(watch))
        .route("/v1/status", get(status))
        .route(
            "/v1/instances/{service}/{id}",
            put(put_instance).delete(delete_instance),
        )
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(deadline))
        .with_state(api)
}

/// Serve `router` on `listener` over HTTP/1.1 until `stop` completes, then let the
/// requests in flight finish for at most [`DRAIN_TIMEOUT`].
///
/// axum's own `serve` sets no header timeout (hyper needs a timer for one), no head
/// size limit and no connection cap, so a slow or flooding client could hold the
/// sidecar's memory and sockets: this loop sets all three.
pub(crate) async fn serve(listener: TcpListener, router: Router, stop: impl Future<Output = ()>) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_header_size(MAX_HEAD)
        .max_headers(MAX_HEADERS);
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut stop = std::pin::pin!(stop);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut stop => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // The peer gave up before the accept: nothing to do.
                Err(e) if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                ) => continue,
                // Out of file descriptors, or the like: say so and let it ease
                // rather than spin.
                Err(e) => {
                    tracing::warn!("accepting an HTTP connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let connection =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // A client that breaks the protocol or times out: hyper has answered it
            // (400, 408 or 431) where it could.
            if let Err(e) = connection.await {
                tracing::debug!("HTTP connection ended: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "requests still in flight {} after the stop; closing them",
            humantime::format_duration(DRAIN_TIMEOUT)
        );
    }
}

/// Bounds the time to answer: [`ANSWER_TIMEOUT`], a watch's longest wait more.
async fn deadline(request: Request, next: Next) -> Response {
    let limit = if request.uri().path() == "/v1/watch" {
        MAX_WAIT + ANSWER_TIMEOUT
    } else {
        ANSWER_TIMEOUT
    };
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "no answer within {}; the providers did not answer in time",
                humantime::format_duration(limit)
            ),
        ),
    }
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

/// The parameters of a resolve, pick or watch: `query`, repeated `filter=KEY=VALUE`,
/// the watch's `index` and `wait`, the pick's `key`.
struct Params {
    query: Query,
    index: u64,
    wait: Duration,
    key: Option<String>,
}

/// Balancers `/v1/pick` keeps; past it the least recently used one goes (with its watch
/// and active checks).
const MAX_BALANCERS: usize = 1024;

/// `Err`: why the parameters are refused (a 400).
fn params(raw: Option<&str>) -> Result<Params, String> {
    let mut query = None;
    let mut filters = Vec::new();
    let mut index = 0;
    let mut wait = MAX_WAIT;
    let mut pick_key = None;
    for (key, value) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        match &*key {
            "query" => query = Some(value.into_owned()),
            "key" => pick_key = Some(value.into_owned()),
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
    Ok(Params {
        query,
        index,
        wait,
        key: pick_key,
    })
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

/// One endpoint through the configured policy for the query (`[[policy]]`), with the
/// request's `key` for consistent hashing.
async fn pick(State(api): State<Arc<Api>>, RawQuery(raw): RawQuery) -> Response {
    let params = match params(raw.as_deref()) {
        Ok(params) => params,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    let name = format!("{} {:?}", params.query, params.query.filters());
    let now = std::time::Instant::now();
    let existing = api
        .balancers
        .lock()
        .expect("balancers lock")
        .get_mut(&name)
        .map(|(balancer, used)| {
            *used = now;
            balancer.clone()
        });
    let balancer = match existing {
        Some(balancer) => balancer,
        None => match api.resolver.balancer_for_query(&params.query).build().await {
            Ok(balancer) => {
                let mut balancers = api.balancers.lock().expect("balancers lock");
                if balancers.len() >= MAX_BALANCERS
                    && let Some(oldest) = balancers
                        .iter()
                        .min_by_key(|(_, (_, used))| *used)
                        .map(|(k, _)| k.clone())
                {
                    balancers.remove(&oldest);
                }
                balancers.entry(name).or_insert((balancer, now)).0.clone()
            }
            Err(e) => return error(error_status(&e), e),
        },
    };
    let picked = match &params.key {
        Some(key) => balancer.pick_key(key),
        None => balancer.pick(),
    };
    axum::Json(crate::json::pick(
        &params.query,
        balancer.strategy(),
        picked.endpoint(),
        picked.health(),
    ))
    .into_response()
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
    let mut stopping = api.stopping.subscribe();
    let changed = tokio::select! {
        changed = tokio::time::timeout(params.wait, watch.changed()) => changed.ok().flatten(),
        // The server is stopping: the set as it is, so the client is not cut off.
        _ = stopping.wait_for(|stopping| *stopping) => None,
    };
    drop(blocked);
    // `None`: the resolver is going away, nothing changed in time, or the server
    // stops; the set as it is.
    let set = changed.unwrap_or_else(|| watch.current());
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
    let services: Vec<Value> = api
        .resolver
        .cached()
        .iter()
        .map(|(query, state)| crate::json::cached(query, state))
        .collect();
    #[cfg(feature = "xds")]
    let xds = api.xds.as_ref().map(|counts| {
        json!({
            "streams": counts.streams.load(Ordering::Relaxed),
            "followed": counts.followed.load(Ordering::Relaxed),
        })
    });
    #[cfg(not(feature = "xds"))]
    let xds: Option<Value> = None;
    axum::Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "xds": xds,
        "services": services,
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

/// A request refused before it reaches the resolver: the status and the reason.
type Refused = (StatusCode, String);

/// The instance path's service and id.
fn instance_path(path: Result<Path<(String, String)>, PathRejection>) -> Result<(String, String), Refused> {
    path.map(|Path(parts)| parts).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("the path is not /v1/instances/SERVICE/ID: {e}"),
        )
    })
}

/// The request's body, read within [`BODY_TIMEOUT`] and [`MAX_BODY`].
async fn read_body(headers: &HeaderMap, body: Body) -> Result<axum::body::Bytes, Refused> {
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {} KiB", MAX_BODY / 1024),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        // Only a body sent without a length can overrun the limit while read.
        Ok(Err(_)) if declared.is_none() => Err(too_large()),
        Ok(Err(e)) => Err((
            StatusCode::BAD_REQUEST,
            format!("the body could not be read: {e}"),
        )),
        Err(_) => Err((
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the body did not arrive within {}",
                humantime::format_duration(BODY_TIMEOUT)
            ),
        )),
    }
}

async fn put_instance(
    State(api): State<Arc<Api>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(refused) = unauthorized(&api, &headers) {
        return refused;
    }
    let (service, id) = match instance_path(path) {
        Ok(parts) => parts,
        Err((status, reason)) => return error(status, reason),
    };
    let body = match read_body(&headers, body).await {
        Ok(body) => body,
        Err((status, reason)) => return error(status, reason),
    };
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
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = unauthorized(&api, &headers) {
        return refused;
    }
    let (service, id) = match instance_path(path) {
        Ok(parts) => parts,
        Err((status, reason)) => return error(status, reason),
    };
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

async fn method_not_allowed() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "this path does not take that method",
    )
}

/// The status page: one HTML file and its script, compiled in. Everything it shows
/// comes from `/v1/status` and `/v1/resolve`, written with `textContent` (provider
/// text never becomes markup); the policy lets it load nothing from elsewhere.
const PAGE: &str = include_str!("status.html");
const SCRIPT: &str = include_str!("status.js");
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; \
    style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, PAGE_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        SCRIPT,
    )
        .into_response()
}
