//! The JSON shapes of `wasd resolve --json` and `--explain --json`, which the sidecar's
//! HTTP API serves too. Other tools parse them: fields are only ever added.

use std::time::Duration;

use serde_json::json;

use crate::{
    CacheState, Endpoint, EndpointSet, Explanation, Health, Policy, Probe, Query, RegistrationState, Strategy,
};

/// A query's endpoints as `wasd resolve --json` prints them and `GET /v1/resolve`
/// serves them; `index` is the set's [`EndpointSet::index`].
pub fn set(query: &Query, set: &EndpointSet) -> serde_json::Value {
    let provider = set.provider();
    json!({
        "query": query.as_str(),
        "service": query.service(),
        "endpoint_name": query.endpoint_name(),
        "schemes": query.schemes(),
        "provider": provider,
        "endpoints": set.iter().map(|e| json!({
            "endpoint": e.to_string(),
            "provider": provider,
            "scheme": e.scheme(),
            "host": e.host(),
            "port": e.port(),
            "path": e.path(),
            "metadata": e.metadata().iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        })).collect::<Vec<_>>(),
        // Providers ahead of the one that answered that failed: the answer is served
        // all the same (the last good one, or a fresh one from the provider that gave
        // it), and this says why it may be stale.
        "failures": set.failures().iter().map(|f| json!({
            "provider": f.provider,
            "error": f.kind.to_string(),
        })).collect::<Vec<_>>(),
        "index": set.index(),
    })
}

/// A cached query as the sidecar's `/v1/status` lists it: its set as [`set`] gives
/// it, with how fresh it is (`state`, `age_ms`, `refresh_in_ms`, `long_poll`,
/// `stale_for_ms`).
pub fn cached(query: &Query, cache: &CacheState) -> serde_json::Value {
    let mut value = set(query, &cache.set);
    if let Some(fields) = value.as_object_mut() {
        fields.insert("state".into(), json!(freshness(cache)));
        fields.insert("age_ms".into(), json!(millis(cache.age)));
        fields.insert("refresh_in_ms".into(), json!(cache.refresh_in.map(millis)));
        fields.insert("long_poll".into(), json!(cache.long_poll));
        fields.insert("stale_for_ms".into(), json!(cache.stale_for.map(millis)));
    }
    value
}

/// `fresh`, or `stale` when a refresh failed and the last good set is served.
fn freshness(cache: &CacheState) -> &'static str {
    if cache.is_stale() { "stale" } else { "fresh" }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// An explanation as `wasd resolve --explain --json` prints it.
pub fn explanation(explanation: &Explanation) -> serde_json::Value {
    let failure = |f: &crate::ProviderError| json!({ "provider": f.provider, "error": f.kind.to_string() });
    let query = &explanation.query;
    json!({
        "query": query.as_str(),
        "service": query.service(),
        "endpoint_name": query.endpoint_name(),
        "port": query.port(),
        "query_schemes": query.schemes(),
        "filters": query.filters().iter().map(|(k, v)| json!({ "key": k, "value": v })).collect::<Vec<_>>(),
        "allowed_schemes": explanation.allowed_schemes,
        // What the providers were asked for: the query's schemes that are allowed.
        "schemes": explanation.schemes,
        "cache": explanation.cache.as_ref().map(|cache| json!({
            "state": freshness(cache),
            "provider": cache.set.provider(),
            "endpoints": cache.set.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "age_ms": millis(cache.age),
            "refresh_in_ms": cache.refresh_in.map(millis),
            "long_poll": cache.long_poll,
            "stale_for_ms": cache.stale_for.map(millis),
            "failures": cache.set.failures().iter().map(failure).collect::<Vec<_>>(),
        })),
        "providers": explanation.steps.iter().map(|step| {
            let mut line = json!({
                "provider": step.provider,
                "outcome": step.outcome.label(),
                "detail": step.outcome.to_string(),
                "elapsed_ms": millis(step.elapsed),
                "imports": step.imports.iter().map(|import| json!({
                    "kind": import.kind.label(),
                    "target": import.target,
                    "detail": import.detail,
                    "result": import.result,
                    "elapsed_ms": millis(import.elapsed),
                })).collect::<Vec<_>>(),
            });
            if let (Some(line), crate::StepOutcome::Answered { endpoints, kept }) = (line.as_object_mut(), &step.outcome) {
                line.insert("endpoints".into(), json!(endpoints));
                line.insert("kept".into(), json!(kept));
            }
            if let (Some(line), crate::StepOutcome::Failed(f)) = (line.as_object_mut(), &step.outcome) {
                line.insert("error".into(), json!(f.kind.to_string()));
            }
            line
        }).collect::<Vec<_>>(),
        "dropped": explanation.dropped.iter().map(|dropped| json!({
            "endpoint": dropped.endpoint.to_string(),
            "provider": dropped.provider,
            "reason": dropped.reason.label(),
            "detail": dropped.reason.to_string(),
        })).collect::<Vec<_>>(),
        "answer": match &explanation.result {
            Ok(answer) => set(query, answer),
            Err(e) => json!({ "error": e.to_string() }),
        },
    })
}

/// A registration's state as `wasd register --json` and the sidecar's `/v1/status`
/// name it (`registering`, `registered` with `lease`, `retrying` with `error`,
/// `attempts`, `retry_in_ms`, `deregistered`), with its fields.
pub fn registration_state(
    state: &RegistrationState,
) -> (&'static str, serde_json::Map<String, serde_json::Value>) {
    let (name, fields) = match state {
        RegistrationState::Registering => ("registering", json!({})),
        RegistrationState::Registered { lease } => ("registered", json!({ "lease": lease })),
        RegistrationState::Retrying {
            error,
            attempts,
            retry_in,
        } => (
            "retrying",
            json!({ "error": error, "attempts": attempts, "retry_in_ms": retry_in.as_millis() as u64 }),
        ),
        RegistrationState::Stopped => ("deregistered", json!({})),
        _ => ("unknown", json!({})),
    };
    match fields {
        serde_json::Value::Object(fields) => (name, fields),
        _ => (name, serde_json::Map::new()),
    }
}

/// Picks through a balancer as `wasd pick --json` prints them: every endpoint the
/// balancer holds, in the provider's order, with how often it was picked and its health.
pub fn picks(query: &Query, strategy: Strategy, picks: &[(Endpoint, usize, Health)]) -> serde_json::Value {
    json!({
        "query": query.as_str(),
        "strategy": strategy.name(),
        "picks": picks.iter().map(|(endpoint, count, health)| json!({
            "endpoint": endpoint.to_string(),
            "count": count,
            "health": health.name(),
        })).collect::<Vec<_>>(),
    })
}

/// One pick as the sidecar's `GET /v1/pick` answers it.
pub fn pick(query: &Query, strategy: Strategy, endpoint: &Endpoint, health: Health) -> serde_json::Value {
    json!({
        "query": query.as_str(),
        "strategy": strategy.name(),
        "endpoint": endpoint.to_string(),
        "scheme": endpoint.scheme(),
        "host": endpoint.host(),
        "port": endpoint.port(),
        "metadata": endpoint.metadata().iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "health": health.name(),
    })
}

/// A query's policy as `wasd resolve --explain --json` shows it (`policy`).
pub fn policy(policy: &Policy) -> serde_json::Value {
    let health = policy.health.as_ref().map(|h| {
        let (kind, target) = match &h.probe {
            Probe::Http { path } => ("http", json!(path)),
            Probe::Grpc { service } => ("grpc", json!(service)),
            Probe::Tcp => ("tcp", json!(null)),
        };
        json!({
            "kind": kind,
            "target": target,
            "interval_ms": millis(h.interval),
            "timeout_ms": millis(h.timeout),
            "healthy_threshold": h.healthy_threshold,
            "unhealthy_threshold": h.unhealthy_threshold,
        })
    });
    json!({
        "strategy": policy.strategy.name(),
        "zone": policy.zone,
        "zone_min_healthy": policy.zone_min_healthy,
        "subset": policy.subset.as_ref().map(|s| json!({"size": s.size, "client_id": s.client_id})),
        "health": health,
        "outlier": {
            "consecutive_failures": policy.outlier.consecutive_failures,
            "base_ejection_ms": millis(policy.outlier.base_ejection),
            "max_ejection_ms": millis(policy.outlier.max_ejection),
            "max_ejection_percent": policy.outlier.max_ejection_percent,
        },
    })
}
