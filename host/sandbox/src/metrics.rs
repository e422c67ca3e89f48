//! Provider-call metrics: `wasd_provider_calls_total{provider,call,outcome}` and
//! `wasd_provider_call_duration_seconds{provider,call}`.
//!
//! Each series' handle is registered on its first use and kept, so a call costs two
//! clock reads, an atomic add and a histogram sample, not a label lookup; the recorder
//! must be installed before the resolver is built (the CLI does so first).

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use metrics::{Counter, Histogram};
use wasd_core::{ProviderError, ProviderErrorKind};

/// Metric names.
pub mod names {
    /// Counter, labels `provider`, `call`, `outcome`.
    pub const PROVIDER_CALLS: &str = "wasd_provider_calls_total";
    /// Histogram (seconds), labels `provider`, `call`.
    pub const PROVIDER_CALL_DURATION: &str = "wasd_provider_call_duration_seconds";
    /// Gauge, label `provider`: 1 while quarantined.
    pub const PROVIDER_QUARANTINED: &str = "wasd_provider_quarantined";
    /// Gauge, label `provider`: instances alive (pooled or in a call).
    pub const PROVIDER_INSTANCES: &str = "wasd_provider_instances";
    /// Histogram (seconds), label `provider`: one DNS lookup import.
    pub const DNS_LOOKUP_DURATION: &str = "wasd_dns_lookup_duration_seconds";
    /// Histogram (seconds), labels `provider`, `origin`: one outgoing HTTP request, to
    /// its response head.
    pub const HTTP_REQUEST_DURATION: &str = "wasd_http_request_duration_seconds";
}

/// A provider export the host calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    Resolve,
    Watch,
    Register,
    KeepAlive,
    Deregister,
}

impl Call {
    const COUNT: usize = 5;

    fn label(self) -> &'static str {
        match self {
            Call::Resolve => "resolve",
            Call::Watch => "watch",
            Call::Register => "register",
            Call::KeepAlive => "keep_alive",
            Call::Deregister => "deregister",
        }
    }
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Endpoints (or, for a registrar, done).
    Answered,
    /// No endpoints, or a watch that saw no change.
    Empty,
    NotFound,
    InvalidQuery,
    InvalidSettings,
    Unavailable,
    Denied,
    Unsupported,
    Internal,
    Trap,
    /// Its time limit.
    Timeout,
    /// Its memory or table limit.
    Memory,
    /// Its stack limit, or too many calls at once.
    Limit,
    InvalidAnswer,
    Quarantined,
}

impl Outcome {
    const COUNT: usize = 15;
    #[cfg(test)]
    const ALL: [Outcome; Outcome::COUNT] = [
        Outcome::Answered,
        Outcome::Empty,
        Outcome::NotFound,
        Outcome::InvalidQuery,
        Outcome::InvalidSettings,
        Outcome::Unavailable,
        Outcome::Denied,
        Outcome::Unsupported,
        Outcome::Internal,
        Outcome::Trap,
        Outcome::Timeout,
        Outcome::Memory,
        Outcome::Limit,
        Outcome::InvalidAnswer,
        Outcome::Quarantined,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Empty => "empty",
            Outcome::NotFound => "not_found",
            Outcome::InvalidQuery => "invalid_query",
            Outcome::InvalidSettings => "invalid_settings",
            Outcome::Unavailable => "unavailable",
            Outcome::Denied => "denied",
            Outcome::Unsupported => "unsupported",
            Outcome::Internal => "internal",
            Outcome::Trap => "trap",
            Outcome::Timeout => "timeout",
            Outcome::Memory => "memory",
            Outcome::Limit => "limit",
            Outcome::InvalidAnswer => "invalid_answer",
            Outcome::Quarantined => "quarantined",
        }
    }

    /// The outcome of an answer the host accepted.
    pub(crate) fn of_answer(answer: &wasd_core::Answer) -> Outcome {
        if answer.endpoints.is_empty() {
            Outcome::Empty
        } else {
            Outcome::Answered
        }
    }

    /// The outcome of a failed call.
    pub(crate) fn of(failure: &ProviderError) -> Outcome {
        match &failure.kind {
            ProviderErrorKind::InvalidQuery(_) => Outcome::InvalidQuery,
            ProviderErrorKind::InvalidSettings(_) => Outcome::InvalidSettings,
            ProviderErrorKind::Unavailable(_) => Outcome::Unavailable,
            ProviderErrorKind::Denied(_) => Outcome::Denied,
            ProviderErrorKind::Unsupported(_) => Outcome::Unsupported,
            ProviderErrorKind::Trap(_) => Outcome::Trap,
            // The sandbox words its own limits (provider.rs, limits.rs).
            ProviderErrorKind::Limit(what) if what.starts_with("time limit") => Outcome::Timeout,
            ProviderErrorKind::Limit(what)
                if what.starts_with("memory limit") || what.starts_with("table limit") =>
            {
                Outcome::Memory
            }
            ProviderErrorKind::Limit(_) => Outcome::Limit,
            ProviderErrorKind::InvalidAnswer(_) => Outcome::InvalidAnswer,
            ProviderErrorKind::Quarantined(_) => Outcome::Quarantined,
            _ => Outcome::Internal,
        }
    }
}

/// The span of one provider call: the imports it makes (DNS lookups, HTTP requests)
/// nest under it, and it nests under the resolve or refresh that made it. Its
/// `outcome` is recorded as it ends.
pub(crate) fn call_span(provider: &str, call: Call) -> tracing::Span {
    tracing::debug_span!(
        "provider_call",
        provider = %provider,
        call = call.label(),
        outcome = tracing::field::Empty
    )
}

/// Record how the current provider call ended on its span.
pub(crate) fn record_outcome(outcome: Outcome) {
    // Spans are off unless debug logging is: then there is nothing to record.
    if tracing::enabled!(tracing::Level::DEBUG) {
        tracing::Span::current().record("outcome", outcome.label());
    }
}

/// One provider's call metrics.
pub(crate) struct CallMetrics {
    provider: String,
    /// `calls[call][outcome]`, each registered on first use: only series that
    /// happened are exported, and a call after the first costs no label lookup.
    calls: [[OnceLock<Counter>; Outcome::COUNT]; Call::COUNT],
    durations: [OnceLock<Histogram>; Call::COUNT],
}

impl CallMetrics {
    pub(crate) fn new(provider: &Arc<str>) -> CallMetrics {
        CallMetrics {
            provider: provider.to_string(),
            calls: Default::default(),
            durations: Default::default(),
        }
    }

    /// Record a call that began at `started`.
    pub(crate) fn record(&self, call: Call, outcome: Outcome, started: Instant) {
        let seconds = started.elapsed().as_secs_f64();
        self.calls[call as usize][outcome as usize]
            .get_or_init(|| {
                metrics::counter!(
                    names::PROVIDER_CALLS,
                    "provider" => self.provider.clone(),
                    "call" => call.label(),
                    "outcome" => outcome.label()
                )
            })
            .increment(1);
        self.durations[call as usize]
            .get_or_init(|| {
                metrics::histogram!(
                    names::PROVIDER_CALL_DURATION,
                    "provider" => self.provider.clone(),
                    "call" => call.label()
                )
            })
            .record(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_told_apart_by_kind() {
        let failure = |kind| ProviderError::new("p", kind);
        let limit = |what: &str| Outcome::of(&failure(ProviderErrorKind::Limit(what.into())));
        assert_eq!(limit("time limit (500 ms per call)"), Outcome::Timeout);
        assert_eq!(
            limit("memory limit (32 MiB; it asked for 33 MiB)"),
            Outcome::Memory
        );
        assert_eq!(limit("table limit (100000 elements)"), Outcome::Memory);
        assert_eq!(limit("stack limit (stack overflow)"), Outcome::Limit);
        assert_eq!(
            Outcome::of(&failure(ProviderErrorKind::Quarantined("x".into()))),
            Outcome::Quarantined
        );
        // Every outcome has its own label.
        let labels: std::collections::HashSet<_> = Outcome::ALL.iter().map(|o| o.label()).collect();
        assert_eq!(labels.len(), Outcome::COUNT);
    }
}
