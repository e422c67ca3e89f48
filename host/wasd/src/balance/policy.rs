//! What a balancer does with a service's endpoints: the strategy, the caller's zone,
//! subsetting, active health checks and outlier ejection. The `[[policy]]` tables of
//! wasd.toml make [`Policies`]; [`BalancerBuilder`](super::BalancerBuilder) methods
//! override single fields.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use wasd_core::Query;

use super::DEFAULT_EJECTION;

/// How a [`Balancer`](super::Balancer) chooses among the endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[non_exhaustive]
pub enum Strategy {
    /// Each endpoint in turn (Microsoft's only strategy).
    #[default]
    RoundRobin,
    /// Each endpoint in turn, as often as its `weight` metadata says (etcd/Kratos
    /// metadata; SRV weight from `dns-srv`), spread evenly through the cycle: nginx's
    /// smooth weighted round-robin over a schedule made once per set
    /// (earliest-deadline-first for very large sets).
    WeightedRoundRobin,
    /// Uniformly at random.
    Random,
    /// Two endpoints at random, the one with fewer requests outstanding (those whose
    /// [`Picked`](super::Picked) guard is alive).
    PowerOfTwoChoices,
    /// Two endpoints at random, the one with the lower latency × (outstanding + 1),
    /// latency being a peak-sensitive moving average of the times between a pick and its
    /// [`Picked::succeeded`](super::Picked::succeeded) (Kratos's p2c, Linkerd's peak
    /// EWMA). An endpoint not measured yet scores 0, so it is tried.
    PowerOfTwoEwma,
    /// The first endpoint in the provider's order (priority order for DNS SRV); the
    /// next while it is left out.
    PickFirst,
    /// A ring of the endpoints' hashes (rapidhash v3: stable across versions), weighted; a
    /// request's key ([`Balancer::pick_key`](super::Balancer::pick_key)) goes to the
    /// first endpoint at or after its own hash, so that when one of N endpoints leaves
    /// only the keys it had (~1/N) move. Without a key, a random point.
    ConsistentHash,
}

impl Strategy {
    /// Every strategy, in the order `wasd pick --help` lists them.
    pub const ALL: &'static [Strategy] = &[
        Strategy::RoundRobin,
        Strategy::WeightedRoundRobin,
        Strategy::Random,
        Strategy::PowerOfTwoChoices,
        Strategy::PowerOfTwoEwma,
        Strategy::PickFirst,
        Strategy::ConsistentHash,
    ];

    /// Its name in wasd.toml, the CLI and JSON (`weighted-round-robin`).
    pub fn name(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round-robin",
            Strategy::WeightedRoundRobin => "weighted-round-robin",
            Strategy::Random => "random",
            Strategy::PowerOfTwoChoices => "power-of-two-choices",
            Strategy::PowerOfTwoEwma => "power-of-two-ewma",
            Strategy::PickFirst => "pick-first",
            Strategy::ConsistentHash => "consistent-hash",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Strategy {
    type Err = String;

    /// A name, or a common short one (`rr`, `wrr`, `p2c`, `p2c-ewma`, `ring-hash`).
    fn from_str(text: &str) -> Result<Strategy, String> {
        let alias = match text {
            "rr" => Some(Strategy::RoundRobin),
            "wrr" => Some(Strategy::WeightedRoundRobin),
            "p2c" => Some(Strategy::PowerOfTwoChoices),
            "p2c-ewma" | "ewma" => Some(Strategy::PowerOfTwoEwma),
            "ring-hash" => Some(Strategy::ConsistentHash),
            _ => None,
        };
        alias
            .or_else(|| Strategy::ALL.iter().copied().find(|s| s.name() == text))
            .ok_or_else(|| {
                let names: Vec<&str> = Strategy::ALL.iter().map(|s| s.name()).collect();
                format!("unknown strategy '{text}' (known: {})", names.join(", "))
            })
    }
}

/// Passive outlier detection: requests that fail (a refused connection, a 5xx or
/// UNAVAILABLE reported with [`Picked::failed`](super::Picked::failed)) eject an
/// endpoint for a while. One health table per resolver, fed by every client.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Outlier {
    /// Failures in a row that eject the endpoint (default 1: a refused connection is
    /// reason enough). Each further failure ejects it again, for longer.
    pub consecutive_failures: u32,
    /// The first ejection's length (default 1 s); doubling with each ejection in a row
    /// (the one back-off type).
    pub base_ejection: Duration,
    /// The longest ejection (default 30 s).
    pub max_ejection: Duration,
    /// The most of a service's endpoints that may be ejected at once, in percent
    /// (default 100); one may always be, unless it is 0 (never eject). Never an empty
    /// set: with every endpoint left out, picks use them all.
    pub max_ejection_percent: u8,
}

impl Default for Outlier {
    fn default() -> Outlier {
        Outlier {
            consecutive_failures: 1,
            base_ejection: DEFAULT_EJECTION,
            max_ejection: Duration::from_secs(30),
            max_ejection_percent: 100,
        }
    }
}

impl Outlier {
    /// Failures in a row that eject an endpoint (at least 1).
    pub fn with_consecutive_failures(mut self, failures: u32) -> Outlier {
        self.consecutive_failures = failures.max(1);
        self
    }

    /// The first ejection's length.
    pub fn with_base_ejection(mut self, base: Duration) -> Outlier {
        self.base_ejection = base;
        self
    }

    /// The longest ejection.
    pub fn with_max_ejection(mut self, max: Duration) -> Outlier {
        self.max_ejection = max;
        self
    }

    /// The most endpoints ejected at once, in percent (0: never eject).
    pub fn with_max_ejection_percent(mut self, percent: u8) -> Outlier {
        self.max_ejection_percent = percent.min(100);
        self
    }
}

/// What an active health check asks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Probe {
    /// `GET path` on the endpoint (http or https, as its scheme says), expecting 2xx.
    Http {
        /// The path, with its leading `/`.
        path: String,
    },
    /// gRPC health v1 `Check` for this service name (`""`: the server as a whole),
    /// expecting SERVING.
    Grpc {
        /// The service name asked about.
        service: String,
    },
    /// A TCP connection that opens.
    Tcp,
}

impl Probe {
    /// `http`, `grpc` or `tcp`: the label of its metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Probe::Http { .. } => "http",
            Probe::Grpc { .. } => "grpc",
            Probe::Tcp => "tcp",
        }
    }
}

/// Active health checks of every endpoint of a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct HealthCheck {
    /// What is asked.
    pub probe: Probe,
    /// Between the end of one check and the next (default 5 s).
    pub interval: Duration,
    /// How long a check may take before it counts as failed (default 1 s).
    pub timeout: Duration,
    /// Passing checks in a row that make an unhealthy endpoint healthy (default 2).
    pub healthy_threshold: u32,
    /// Failing checks in a row that make a healthy endpoint unhealthy (default 3). The
    /// first check of a new endpoint decides alone, either way.
    pub unhealthy_threshold: u32,
}

impl HealthCheck {
    fn new(probe: Probe) -> HealthCheck {
        HealthCheck {
            probe,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }

    /// `GET path`, expecting 2xx.
    pub fn http(path: impl Into<String>) -> HealthCheck {
        let mut path = path.into();
        if !path.starts_with('/') {
            path.insert(0, '/');
        }
        HealthCheck::new(Probe::Http { path })
    }

    /// gRPC health v1 `Check` of `service` (`""`: the whole server).
    pub fn grpc(service: impl Into<String>) -> HealthCheck {
        HealthCheck::new(Probe::Grpc {
            service: service.into(),
        })
    }

    /// A TCP connect.
    pub fn tcp() -> HealthCheck {
        HealthCheck::new(Probe::Tcp)
    }

    /// Between checks (at least 10 ms).
    pub fn with_interval(mut self, interval: Duration) -> HealthCheck {
        self.interval = interval.max(Duration::from_millis(10));
        self
    }

    /// How long a check may take.
    pub fn with_timeout(mut self, timeout: Duration) -> HealthCheck {
        self.timeout = timeout;
        self
    }

    /// Checks in a row that change an endpoint's state (each at least 1).
    pub fn with_thresholds(mut self, healthy: u32, unhealthy: u32) -> HealthCheck {
        self.healthy_threshold = healthy.max(1);
        self.unhealthy_threshold = unhealthy.max(1);
        self
    }
}

/// Deterministic subsetting (Google's, as Kratos's subset): each client uses a stable
/// subset of `size` endpoints chosen by its id, so that many clients spread evenly over
/// many endpoints and each keeps few connections.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Subset {
    /// Endpoints per client.
    pub size: usize,
    /// This client's id; clients with consecutive ids get disjoint subsets while there
    /// are enough endpoints.
    pub client_id: u64,
}

impl Subset {
    /// `size` endpoints for the client `client_id`.
    pub fn new(size: usize, client_id: u64) -> Subset {
        Subset {
            size: size.max(1),
            client_id,
        }
    }

    /// A client id from a text (a host name, a pod name): its xxHash64.
    pub fn id_of(text: &str) -> u64 {
        xxhash_rust::xxh64::xxh64(text.as_bytes(), 0)
    }
}

/// Everything a balancer does with one service's endpoints.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Policy {
    /// How an endpoint is chosen.
    pub strategy: Strategy,
    /// The caller's zone: endpoints whose `zone` metadata equals it are preferred.
    pub zone: Option<String>,
    /// The share (0 to 1) of the zone's endpoints that must be healthy for picks to
    /// stay in it (default 0.5); below it, and when it has none, every zone is used
    /// (Kubernetes' PreferSameZone, with a threshold).
    pub zone_min_healthy: f64,
    /// Deterministic subsetting, if any.
    pub subset: Option<Subset>,
    /// Active health checks, if any.
    pub health: Option<HealthCheck>,
    /// Passive outlier ejection.
    pub outlier: Outlier,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            strategy: Strategy::default(),
            zone: None,
            zone_min_healthy: 0.5,
            subset: None,
            health: None,
            outlier: Outlier::default(),
        }
    }
}

impl Policy {
    /// This strategy.
    pub fn with_strategy(mut self, strategy: Strategy) -> Policy {
        self.strategy = strategy;
        self
    }

    /// Prefer this zone.
    pub fn with_zone(mut self, zone: impl Into<String>) -> Policy {
        self.zone = Some(zone.into());
        self
    }

    /// Stay in the zone while at least this share (0 to 1) of its endpoints is healthy.
    pub fn with_zone_min_healthy(mut self, share: f64) -> Policy {
        self.zone_min_healthy = share.clamp(0.0, 1.0);
        self
    }

    /// Use a deterministic subset.
    pub fn with_subset(mut self, subset: Subset) -> Policy {
        self.subset = Some(subset);
        self
    }

    /// Check endpoints actively.
    pub fn with_health(mut self, check: HealthCheck) -> Policy {
        self.health = Some(check);
        self
    }

    /// Eject outliers this way.
    pub fn with_outlier(mut self, outlier: Outlier) -> Policy {
        self.outlier = outlier;
        self
    }
}

impl fmt::Display for Policy {
    /// One line: `round-robin; zone a (while 50 % healthy); checks http /healthz every
    /// 5s; ejects after 1 failure for 1s, doubling to 30s, at most 100 %`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.strategy)?;
        if let Some(zone) = &self.zone {
            write!(
                f,
                "; zone {zone} (while {:.0} % healthy)",
                self.zone_min_healthy * 100.0
            )?;
        }
        if let Some(subset) = &self.subset {
            write!(f, "; subset of {} (client {})", subset.size, subset.client_id)?;
        }
        if let Some(health) = &self.health {
            let what = match &health.probe {
                Probe::Http { path } => format!("http {path}"),
                Probe::Grpc { service } if service.is_empty() => "grpc".to_owned(),
                Probe::Grpc { service } => format!("grpc {service}"),
                Probe::Tcp => "tcp".to_owned(),
            };
            write!(
                f,
                "; checks {what} every {}",
                humantime::format_duration(health.interval)
            )?;
        }
        let o = &self.outlier;
        write!(
            f,
            "; ejects after {} failure{} for {}, doubling to {}, at most {} %",
            o.consecutive_failures,
            if o.consecutive_failures == 1 { "" } else { "s" },
            humantime::format_duration(o.base_ejection),
            humantime::format_duration(o.max_ejection),
            o.max_ejection_percent
        )
    }
}

/// Which queries a `[[policy]]` applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Selector {
    /// `query = "https://catalog"`: that query's text exactly.
    Query(String),
    /// `service = "catalog"`: every query of the service.
    Service(String),
    /// `service = "*"`: every query no other policy names.
    Any,
}

/// The configured policies, in config order, and the process's zone.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policies {
    pub(crate) rules: Vec<(Selector, Policy)>,
    /// `zone` at the top of wasd.toml, or `WASD_ZONE`.
    pub(crate) zone: Option<String>,
}

impl Policies {
    /// The policy for a query: the first naming its exact text, else the first naming
    /// its service, else `service = "*"`, else the default; its zone, where it sets
    /// none, the process's.
    pub fn for_query(&self, query: &Query) -> Policy {
        let text = query.as_str();
        let rule =
            |wanted: &dyn Fn(&Selector) -> bool| self.rules.iter().find(|(s, _)| wanted(s)).map(|(_, p)| p);
        let mut policy = rule(&|s| matches!(s, Selector::Query(q) if q == text))
            .or_else(|| rule(&|s| matches!(s, Selector::Service(n) if n == query.service())))
            .or_else(|| rule(&|s| matches!(s, Selector::Any)))
            .cloned()
            .unwrap_or_default();
        if policy.zone.is_none() {
            policy.zone.clone_from(&self.zone);
        }
        policy
    }

    /// The process's zone, if set.
    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }
}

/// What a [`BalancerBuilder`](super::BalancerBuilder) sets over the configured policy.
#[derive(Debug, Clone, Default)]
pub(crate) struct Overrides {
    /// A whole policy, instead of the configured one.
    pub(crate) policy: Option<Policy>,
    pub(crate) strategy: Option<Strategy>,
    pub(crate) zone: Option<String>,
    pub(crate) subset: Option<Subset>,
    pub(crate) health: Option<HealthCheck>,
    pub(crate) outlier: Option<Outlier>,
    pub(crate) ejection: Option<Duration>,
}

impl Overrides {
    /// The configured policy for `query` with these set over it.
    pub(crate) fn apply(&self, policies: &Policies, query: &Query) -> Policy {
        let mut policy = match &self.policy {
            Some(policy) => policy.clone(),
            None => policies.for_query(query),
        };
        if let Some(strategy) = self.strategy {
            policy.strategy = strategy;
        }
        if let Some(zone) = &self.zone {
            policy.zone = Some(zone.clone());
        }
        if let Some(subset) = &self.subset {
            policy.subset = Some(subset.clone());
        }
        if let Some(health) = &self.health {
            policy.health = Some(health.clone());
        }
        if let Some(outlier) = &self.outlier {
            policy.outlier = outlier.clone();
        }
        if let Some(first) = self.ejection {
            policy.outlier.base_ejection = first;
        }
        policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategy_names_round_trip_and_unknown_ones_list_the_known() {
        for &s in Strategy::ALL {
            assert_eq!(s.name().parse::<Strategy>(), Ok(s));
        }
        assert_eq!("p2c".parse::<Strategy>(), Ok(Strategy::PowerOfTwoChoices));
        let e = "fastest".parse::<Strategy>().unwrap_err();
        assert!(
            e.starts_with("unknown strategy 'fastest' (known: round-robin, weighted-round-robin"),
            "{e}"
        );
    }

    #[test]
    fn a_query_takes_its_own_policy_then_its_services_then_the_default() {
        let exact = Policy::default().with_strategy(Strategy::PickFirst);
        let service = Policy::default().with_strategy(Strategy::Random).with_zone("b");
        let any = Policy::default().with_strategy(Strategy::ConsistentHash);
        let policies = Policies {
            rules: vec![
                (Selector::Service("catalog".into()), service.clone()),
                (Selector::Query("https://catalog".into()), exact.clone()),
                (Selector::Any, any.clone()),
            ],
            zone: Some("a".into()),
        };
        let q = |t: &str| Query::parse(t).unwrap();
        // The exact query wins over an earlier service rule; the process's zone fills in.
        assert_eq!(
            policies.for_query(&q("https://catalog")),
            exact.clone().with_zone("a")
        );
        // The service's own zone stays.
        assert_eq!(policies.for_query(&q("http://catalog")), service);
        assert_eq!(policies.for_query(&q("basket")), any.with_zone("a"));
        assert_eq!(Policies::default().for_query(&q("basket")), Policy::default());

        let overrides = Overrides {
            strategy: Some(Strategy::WeightedRoundRobin),
            ejection: Some(Duration::from_millis(5)),
            ..Overrides::default()
        };
        assert_eq!(
            Policy::default()
                .with_zone("a")
                .with_health(HealthCheck::http("/healthz"))
                .to_string(),
            "round-robin; zone a (while 50 % healthy); checks http /healthz every 5s; \
             ejects after 1 failure for 1s, doubling to 30s, at most 100 %"
        );
        let applied = overrides.apply(&policies, &q("http://catalog"));
        assert_eq!(applied.strategy, Strategy::WeightedRoundRobin);
        assert_eq!(applied.zone.as_deref(), Some("b"));
        assert_eq!(applied.outlier.base_ejection, Duration::from_millis(5));
    }
}
