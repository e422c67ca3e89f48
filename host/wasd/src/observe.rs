//! Metrics, through the `metrics` facade: the embedder installs a recorder (the CLI a
//! Prometheus one) *before* building the resolver, since providers register their
//! handles as they load.
//!
//! Most metrics are counted where things happen (the core: misses, refreshes,
//! changes, reloads, registrations; the sandbox: provider calls, DNS and HTTP
//! imports). What is cheaper to read now and then than to count as it happens is
//! published here, once a second, by a task each resolver runs: cache hits (counted
//! per thread on the cached path), cache size, endpoints per service, and each
//! provider's quarantine and instances.

use std::sync::Weak;
use std::time::Duration;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use wasd_core::metrics::names as core_names;
use wasd_sandbox::metrics::names as sandbox_names;

use crate::resolver::Inner;

/// Distinct services `wasd_endpoints` has a series for, unless the config says
/// otherwise (`[metrics] max-services`); the rest are summed under `service="_other"`.
pub const DEFAULT_MAX_SERVICES: usize = 100;

/// The `service` label of the endpoints of services past the cap.
pub const OTHER_SERVICES: &str = "_other";

/// How often the reporter publishes.
const REPORT_PERIOD: Duration = Duration::from_secs(1);

/// Describe every wasd metric (help text and unit) to the installed recorder. The CLI
/// calls it after installing its exporter; embedders may too.
pub fn describe_metrics() {
    describe_counter!(
        core_names::RESOLVES,
        "Resolves by outcome: hit (from the cache), miss (the chain ran), error"
    );
    describe_gauge!(core_names::CACHE_ENTRIES, "Queries cached now");
    describe_counter!(
        core_names::REFRESHES,
        "Periodic refreshes of cached queries by outcome: changed, unchanged, failed"
    );
    describe_counter!(
        core_names::WATCH_CHANGES,
        "New endpoint sets published to a cached query's watchers"
    );
    describe_gauge!(
        core_names::ENDPOINTS,
        "Endpoints served per service (the largest set among its cached queries); services past the cap are summed under service=\"_other\""
    );
    describe_counter!(core_names::RELOADS, "Reloads by result: applied, failed");
    describe_gauge!(
        core_names::REGISTRATIONS,
        "Registrations of this process by service and state"
    );
    describe_counter!(
        core_names::REGISTRATION_RETRIES,
        "Registration attempts (register or keep-alive) after a failure"
    );
    describe_counter!(
        sandbox_names::PROVIDER_CALLS,
        "Provider calls by provider, call and outcome"
    );
    describe_histogram!(
        sandbox_names::PROVIDER_CALL_DURATION,
        Unit::Seconds,
        "Provider call duration, sandbox entry to answer checked"
    );
    describe_gauge!(
        sandbox_names::PROVIDER_QUARANTINED,
        "1 while the provider is quarantined after repeated faults"
    );
    describe_gauge!(
        sandbox_names::PROVIDER_INSTANCES,
        "Live instances of the provider, pooled or in a call"
    );
    describe_histogram!(
        sandbox_names::DNS_LOOKUP_DURATION,
        Unit::Seconds,
        "DNS lookups made for a provider, by provider"
    );
    describe_histogram!(
        sandbox_names::HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "Outgoing HTTP requests of a provider to the response head, by provider and origin"
    );
    describe_counter!(
        crate::balance::EJECTIONS,
        "Endpoints ejected by a balancer's outlier detection (failed requests), by service"
    );
    describe_counter!(
        crate::balance::HEALTH_CHECKS,
        "Active health checks by kind (http, grpc, tcp) and outcome (pass, fail)"
    );
}

/// Publish, once a second, until the resolver is dropped.
pub(crate) fn spawn_reporter(inner: Weak<Inner>, max_services: usize) {
    tokio::spawn(async move {
        let mut reporter = Reporter {
            max_services,
            admitted: Vec::new(),
            others: false,
        };
        let mut tick = tokio::time::interval(REPORT_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = inner.upgrade() else { return };
            reporter.report(&inner);
        }
    });
}

struct Reporter {
    max_services: usize,
    /// Services with a series of their own, in the order they came (they keep it).
    admitted: Vec<String>,
    /// Whether the `_other` series exists.
    others: bool,
}

impl Reporter {
    fn report(&mut self, inner: &Inner) {
        wasd_core::metrics::report();
        metrics::gauge!(core_names::CACHE_ENTRIES).set(inner.cache.len() as f64);
        self.report_endpoints(inner.cache.endpoint_counts());
        for status in inner.cache.chain().load().sources().iter().map(|s| s.status()) {
            let quarantined = if status.quarantined_for.is_some() {
                1.0
            } else {
                0.0
            };
            metrics::gauge!(sandbox_names::PROVIDER_QUARANTINED, "provider" => status.name.clone())
                .set(quarantined);
            if let Some(instances) = status.instances {
                metrics::gauge!(sandbox_names::PROVIDER_INSTANCES, "provider" => status.name)
                    .set(instances as f64);
            }
        }
    }

    /// `counts`: each cached service and its endpoints.
    fn report_endpoints(&mut self, counts: Vec<(String, usize)>) {
        let (series, others) = self.series(counts);
        for (service, count) in series {
            metrics::gauge!(core_names::ENDPOINTS, "service" => service).set(count as f64);
        }
        if let Some(others) = others {
            metrics::gauge!(core_names::ENDPOINTS, "service" => OTHER_SERVICES).set(others as f64);
        }
    }

    /// The value of every series: admitted services (0 when no longer cached, since
    /// a series cannot be taken back), and the sum of the rest once there are any.
    fn series(&mut self, counts: Vec<(String, usize)>) -> (Vec<(String, usize)>, Option<usize>) {
        let mut others = 0;
        let mut values: Vec<(String, usize)> = self.admitted.iter().map(|s| (s.clone(), 0)).collect();
        for (service, count) in counts {
            match self.admitted.iter().position(|s| *s == service) {
                Some(i) => values[i].1 = count,
                None if self.admitted.len() < self.max_services => {
                    self.admitted.push(service.clone());
                    values.push((service, count));
                }
                None => {
                    others += count;
                    self.others = true;
                }
            }
        }
        (values, self.others.then_some(others))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_past_the_cap_are_summed_and_gone_ones_read_zero() {
        let mut reporter = Reporter {
            max_services: 2,
            admitted: Vec::new(),
            others: false,
        };
        let counts = |pairs: &[(&str, usize)]| pairs.iter().map(|(s, n)| (s.to_string(), *n)).collect();
        let (series, others) = reporter.series(counts(&[("a", 1), ("b", 2)]));
        assert_eq!(series, counts(&[("a", 1), ("b", 2)]));
        assert_eq!(others, None);
        // Two services past the cap: summed.
        let (series, others) = reporter.series(counts(&[("a", 3), ("c", 4), ("d", 5), ("b", 2)]));
        assert_eq!(series, counts(&[("a", 3), ("b", 2)]));
        assert_eq!(others, Some(9));
        // An admitted service gone from the cache reads 0, and keeps its place: `c`
        // stays with the others.
        let (series, others) = reporter.series(counts(&[("b", 2), ("c", 1)]));
        assert_eq!(series, counts(&[("a", 0), ("b", 2)]));
        assert_eq!(others, Some(1));
    }
}
