//! One health table per resolver: what every client and the active checker know of
//! each endpoint (by its address), shared by every balancer that picks it. A pick reads
//! two atomics per endpoint it considers; everything else happens when a request ends
//! or a check returns.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use wasd_core::{Backoff, Clock, Endpoint};

use super::policy::{HealthCheck, Outlier};

/// What a balancer knows of an endpoint's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Health {
    /// Picked: nothing against it (or its active checks pass).
    Healthy,
    /// Picked: active checks are configured and have not answered yet.
    Unchecked,
    /// Left out: its active checks fail.
    Unhealthy,
    /// Left out for a while: requests to it failed (passive outlier detection).
    Ejected {
        /// How much longer.
        remaining: Duration,
    },
}

impl Health {
    /// `healthy`, `unchecked`, `unhealthy` or `ejected`: its name in JSON.
    pub fn name(&self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Unchecked => "unchecked",
            Health::Unhealthy => "unhealthy",
            Health::Ejected { .. } => "ejected",
        }
    }

    /// Whether picks use it (while any endpoint does).
    pub fn is_usable(&self) -> bool {
        matches!(self, Health::Healthy | Health::Unchecked)
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Health::Ejected { remaining } => write!(f, "ejected for {} ms", remaining.as_millis()),
            other => f.write_str(other.name()),
        }
    }
}

const UNCHECKED: u8 = 0;
const PASSING: u8 = 1;
const FAILING: u8 = 2;
/// No active checks.
const NOT_CHECKED: u8 = 3;

/// The latency a failed request counts as, for the EWMA strategy.
const FAILURE_PENALTY: Duration = Duration::from_secs(1);
/// The EWMA's decay time (Linkerd's default).
const DECAY: Duration = Duration::from_secs(10);

/// What the entries share: the clock and a generation that moves whenever an
/// endpoint's usability changes, so that cached zone decisions know to look again.
pub(crate) struct Common {
    clock: Clock,
    generation: AtomicU64,
    /// Woken with every generation.
    notify: tokio::sync::Notify,
    /// Held while deciding whether to eject and ejecting, so that failures arriving
    /// together cannot all pass the ejection cap (the cold path only).
    ejecting: Mutex<()>,
}

impl Common {
    /// The clock's coarse milliseconds, never 0 (which means "not ejected").
    pub(crate) fn now_ms(&self) -> u64 {
        self.clock.coarse_now_ms() + 1
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.notify.notify_waiters();
    }

    /// Woken whenever an endpoint's health changes.
    pub(crate) fn notify(&self) -> &tokio::sync::Notify {
        &self.notify
    }
}

/// Every endpoint some balancer holds, by address.
pub(crate) struct HealthTable {
    common: Arc<Common>,
    /// Weak: an entry lives while a balancer's snapshot holds it.
    entries: Mutex<Entries>,
    /// Where active checks run: the resolver's runtime, not a caller's.
    runtime: Option<tokio::runtime::Handle>,
    /// The HTTP checks' client, made on first use.
    http: std::sync::OnceLock<super::check::HttpClient>,
}

#[derive(Default)]
struct Entries {
    by_address: HashMap<String, Weak<EndpointHealth>>,
    /// Dead entries are swept when the map doubles past this.
    swept_at: usize,
}

impl HealthTable {
    pub(crate) fn new(clock: Clock, runtime: Option<tokio::runtime::Handle>) -> HealthTable {
        HealthTable {
            common: Arc::new(Common {
                clock,
                generation: AtomicU64::new(0),
                notify: tokio::sync::Notify::new(),
                ejecting: Mutex::new(()),
            }),
            entries: Mutex::default(),
            runtime,
            http: std::sync::OnceLock::new(),
        }
    }

    pub(crate) fn common(&self) -> &Arc<Common> {
        &self.common
    }

    pub(crate) fn generation(&self) -> u64 {
        self.common.generation.load(Ordering::Relaxed)
    }

    /// The entry for an endpoint's address (scheme, host and port: two queries naming
    /// the same server share what is known of it), made on first use.
    pub(crate) fn entry(&self, endpoint: &Endpoint) -> Arc<EndpointHealth> {
        let address = address_of(endpoint);
        let mut entries = self.entries.lock().expect("health table lock");
        if let Some(existing) = entries.by_address.get(&address).and_then(Weak::upgrade) {
            return existing;
        }
        let entry = Arc::new(EndpointHealth {
            common: self.common.clone(),
            outstanding: AtomicUsize::new(0),
            ejected_until: AtomicU64::new(0),
            failures_in_a_row: AtomicU32::new(0),
            ewma_ns: AtomicU64::new(0),
            ewma_at_ms: AtomicU64::new(0),
            timed_at_ms: AtomicU64::new(0),
            active: AtomicU8::new(NOT_CHECKED),
            checker: Mutex::new(None),
        });
        entries.by_address.insert(address, Arc::downgrade(&entry));
        let len = entries.by_address.len();
        if len > 2 * entries.swept_at.max(64) {
            entries.by_address.retain(|_, e| e.strong_count() > 0);
            entries.swept_at = entries.by_address.len();
        }
        entry
    }

    /// Check the endpoint actively (one checker per endpoint: the latest policy's).
    pub(crate) fn check(&self, entry: &Arc<EndpointHealth>, endpoint: &Endpoint, check: &HealthCheck) {
        let mut checker = entry.checker.lock().expect("checker lock");
        if checker.as_ref().is_some_and(|(running, _)| running == check) {
            return;
        }
        let Some(runtime) = self
            .runtime
            .clone()
            .or_else(|| tokio::runtime::Handle::try_current().ok())
        else {
            return;
        };
        if let Some((_, old)) = checker.take() {
            old.abort();
        }
        // A new check starts from "not answered yet" only if the endpoint had none; a
        // changed check keeps the state the last one reached until it answers.
        let _ = entry
            .active
            .compare_exchange(NOT_CHECKED, UNCHECKED, Ordering::Relaxed, Ordering::Relaxed);
        let http = self.http.get_or_init(super::check::http_client).clone();
        let task = runtime.spawn(super::check::run(
            Arc::downgrade(entry),
            endpoint.clone(),
            check.clone(),
            http,
        ));
        *checker = Some((check.clone(), task.abort_handle()));
    }

    /// Stop checking the endpoint actively (its policy no longer asks).
    pub(crate) fn uncheck(&self, entry: &EndpointHealth) {
        if let Some((_, task)) = entry.checker.lock().expect("checker lock").take() {
            task.abort();
        }
        if entry.active.swap(NOT_CHECKED, Ordering::Relaxed) == FAILING {
            self.common.changed();
        }
    }
}

/// `scheme://host:port` (no path, no metadata).
fn address_of(endpoint: &Endpoint) -> String {
    Endpoint::from_parts(
        endpoint.scheme().map(str::to_owned),
        endpoint.host().to_owned(),
        endpoint.port(),
        None,
        Vec::new(),
    )
    .to_string()
}

/// What is known of one endpoint.
pub(crate) struct EndpointHealth {
    common: Arc<Common>,
    /// Requests picked and not yet finished (their `Picked` alive).
    pub(crate) outstanding: AtomicUsize,
    /// Left out until this time (the clock's milliseconds); 0 = not ejected.
    ejected_until: AtomicU64,
    failures_in_a_row: AtomicU32,
    /// The peak EWMA of request latency in nanoseconds; 0 = not measured.
    ewma_ns: AtomicU64,
    ewma_at_ms: AtomicU64,
    /// The coarse millisecond (`Common::now_ms`) of the last request whose latency is
    /// measured: one per tick (10 ms) at most.
    timed_at_ms: AtomicU64,
    /// Active checks: unchecked, passing, failing, or none configured.
    active: AtomicU8,
    checker: Mutex<Option<(HealthCheck, tokio::task::AbortHandle)>>,
}

impl Drop for EndpointHealth {
    fn drop(&mut self) {
        if let Ok(Some((_, task))) = self.checker.get_mut().map(Option::take) {
            task.abort();
        }
    }
}

impl EndpointHealth {
    /// Whether picks may use it at `now` (the clock's milliseconds, as `Common::now_ms`).
    #[inline]
    pub(crate) fn usable(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) <= now && self.active.load(Ordering::Relaxed) != FAILING
    }

    /// The clock's coarse milliseconds, as [`Common::now_ms`].
    pub(crate) fn now_ms(&self) -> u64 {
        self.common.now_ms()
    }

    /// Whether its active checks (if any) pass, or have not answered yet.
    pub(crate) fn checks_pass(&self) -> bool {
        self.active.load(Ordering::Relaxed) != FAILING
    }

    /// When its ejection ends, if it is ejected at `now`.
    pub(crate) fn ejected_until(&self, now: u64) -> Option<u64> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until > now).then_some(until)
    }

    pub(crate) fn state(&self, now: u64) -> Health {
        if let Some(until) = self.ejected_until(now) {
            return Health::Ejected {
                remaining: Duration::from_millis(until - now),
            };
        }
        match self.active.load(Ordering::Relaxed) {
            FAILING => Health::Unhealthy,
            UNCHECKED => Health::Unchecked,
            _ => Health::Healthy,
        }
    }

    /// A request to it failed. Ejects it once `outlier.consecutive_failures` failed in a
    /// row (for longer with each further failure) when `may_eject` allows; true if it
    /// was ejected.
    pub(crate) fn failed(&self, outlier: &Outlier, may_eject: impl FnOnce() -> bool) -> bool {
        self.record_latency(FAILURE_PENALTY);
        let in_a_row = self
            .failures_in_a_row
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let threshold = outlier.consecutive_failures.max(1);
        if in_a_row < threshold || outlier.max_ejection_percent == 0 {
            return false;
        }
        let _deciding = self.common.ejecting.lock().expect("ejection lock");
        let now = self.common.now_ms();
        let already = self.ejected_until.load(Ordering::Relaxed) > now;
        if !already && !may_eject() {
            return false;
        }
        let nth = (in_a_row - threshold).min(32);
        let length = Backoff::new(outlier.base_ejection, outlier.max_ejection).nth(nth);
        self.ejected_until
            .store(now + length.as_millis() as u64, Ordering::Relaxed);
        self.common.changed();
        true
    }

    /// It was reached (a TCP connection opened), which says nothing of its answers:
    /// its failures in a row start again, an ejection runs its course.
    #[cfg(feature = "tonic")]
    pub(crate) fn reached(&self) {
        if self.failures_in_a_row.load(Ordering::Relaxed) != 0 {
            self.failures_in_a_row.store(0, Ordering::Relaxed);
        }
    }

    /// A request to it succeeded: its failures start again, and an ejection ends.
    pub(crate) fn succeeded(&self) {
        if self.failures_in_a_row.load(Ordering::Relaxed) != 0 {
            self.failures_in_a_row.store(0, Ordering::Relaxed);
        }
        if self.ejected_until.load(Ordering::Relaxed) != 0 {
            self.ejected_until.store(0, Ordering::Relaxed);
            self.common.changed();
        }
    }

    /// Fold a request's latency into the peak EWMA: a slower sample is taken at once, a
    /// faster one decays in over [`DECAY`].
    pub(crate) fn record_latency(&self, latency: Duration) {
        let sample = latency.as_nanos().min(u64::MAX as u128) as u64;
        let now = self.common.clock.now_ms();
        let then = self.ewma_at_ms.swap(now, Ordering::Relaxed);
        let old = self.ewma_ns.load(Ordering::Relaxed);
        let next = if old == 0 || sample >= old {
            sample
        } else {
            let elapsed = now.saturating_sub(then) as f64;
            let w = (-elapsed / DECAY.as_millis() as f64).exp();
            (old as f64 * w + sample as f64 * (1.0 - w)) as u64
        };
        self.ewma_ns.store(next.max(1), Ordering::Relaxed);
    }

    /// Whether a request picked at `now` (coarse milliseconds) should have its latency
    /// measured: the first of each tick is. Reading the clock costs ~12 ns of a ~45 ns
    /// pick; under load, one sample per endpoint per tick (100 a second) is plenty for
    /// an average that decays over 10 s and takes a slower sample at once, and at low
    /// rates every request is a tick's first. Plain loads and stores: two threads
    /// timing the same tick is harmless.
    #[inline]
    pub(crate) fn time_request(&self, now: u64) -> bool {
        if self.timed_at_ms.load(Ordering::Relaxed) == now {
            return false;
        }
        self.timed_at_ms.store(now, Ordering::Relaxed);
        true
    }

    /// The EWMA strategy's cost of sending it one more request. Not measured yet: 0
    /// while it has no request outstanding (so it is tried), the failure penalty per
    /// request otherwise (so a new endpoint that never answers is not sent everything).
    #[inline]
    pub(crate) fn load_score(&self) -> u64 {
        let outstanding = self.outstanding.load(Ordering::Relaxed) as u64;
        match self.ewma_ns.load(Ordering::Relaxed) {
            0 => outstanding.saturating_mul(FAILURE_PENALTY.as_nanos() as u64),
            ewma => ewma.saturating_mul(outstanding + 1),
        }
    }

    /// The latency average, if measured.
    #[cfg(test)]
    pub(crate) fn latency(&self) -> Option<Duration> {
        let ns = self.ewma_ns.load(Ordering::Relaxed);
        (ns != 0).then(|| Duration::from_nanos(ns))
    }

    /// An active check's verdict, after `passing` or `failing` checks in a row.
    pub(crate) fn checked(&self, passed: bool, in_a_row: u32, check: &HealthCheck) {
        let state = self.active.load(Ordering::Relaxed);
        let next = match (state, passed) {
            // The first answer decides alone.
            (UNCHECKED | NOT_CHECKED, true) => PASSING,
            (UNCHECKED | NOT_CHECKED, false) => FAILING,
            (FAILING, true) if in_a_row >= check.healthy_threshold => PASSING,
            (PASSING, false) if in_a_row >= check.unhealthy_threshold => FAILING,
            (state, _) => state,
        };
        if next != state {
            self.active.store(next, Ordering::Relaxed);
            self.common.changed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ejections_need_failures_in_a_row_grow_and_end_on_success() {
        let table = HealthTable::new(Clock::exact(), None);
        let e = table.entry(&Endpoint::new("10.0.0.1").with_port(80));
        // Another query naming the same server shares the entry.
        assert!(Arc::ptr_eq(
            &e,
            &table.entry(&Endpoint::new("10.0.0.1").with_port(80).with_path("/x"))
        ));
        let outlier = Outlier::default()
            .with_consecutive_failures(3)
            .with_base_ejection(Duration::from_secs(1));
        let now = || table.common().now_ms();
        assert!(!e.failed(&outlier, || true));
        assert!(!e.failed(&outlier, || true));
        assert!(e.usable(now()));
        let before = table.generation();
        assert!(e.failed(&outlier, || true));
        assert!(!e.usable(now()));
        assert!(table.generation() > before);
        assert_eq!(
            e.state(now()),
            Health::Ejected {
                remaining: Duration::from_secs(1)
            }
        );
        // The next failure doubles it.
        assert!(e.failed(&outlier, || true));
        assert_eq!(
            e.state(now()),
            Health::Ejected {
                remaining: Duration::from_secs(2)
            }
        );
        tokio::time::advance(Duration::from_millis(2001)).await;
        assert!(e.usable(now()));
        // A success starts the count again.
        e.succeeded();
        assert!(!e.failed(&outlier, || true));
        assert!(e.usable(now()));

        // Refused by the caller (the service's ejection cap): counted, not ejected.
        let f = table.entry(&Endpoint::new("10.0.0.2").with_port(80));
        let once = Outlier::default();
        assert!(!f.failed(&once, || false));
        assert!(f.usable(now()));
        assert!(!f.failed(&once.clone().with_max_ejection_percent(0), || true));
    }

    #[test]
    fn active_checks_follow_their_thresholds_and_the_first_answer_decides() {
        let table = HealthTable::new(Clock::exact(), None);
        let e = table.entry(&Endpoint::new("10.0.0.1"));
        let check = HealthCheck::tcp().with_thresholds(2, 3);
        e.active.store(UNCHECKED, Ordering::Relaxed);
        assert_eq!(e.state(1), Health::Unchecked);
        assert!(e.usable(1));
        e.checked(false, 1, &check);
        assert_eq!(e.state(1), Health::Unhealthy);
        assert!(!e.usable(1));
        e.checked(true, 1, &check);
        assert_eq!(e.state(1), Health::Unhealthy);
        e.checked(true, 2, &check);
        assert_eq!(e.state(1), Health::Healthy);
        e.checked(false, 1, &check);
        e.checked(false, 2, &check);
        assert!(e.usable(1));
        e.checked(false, 3, &check);
        assert!(!e.usable(1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_latency_average_takes_peaks_at_once_and_decays_slowly() {
        let table = HealthTable::new(Clock::exact(), None);
        let e = table.entry(&Endpoint::new("10.0.0.1"));
        assert_eq!(e.load_score(), 0);
        e.record_latency(Duration::from_millis(10));
        assert_eq!(e.latency(), Some(Duration::from_millis(10)));
        e.record_latency(Duration::from_millis(50));
        assert_eq!(e.latency(), Some(Duration::from_millis(50)));
        // One decay time later a faster sample has pulled it ~63 % of the way.
        tokio::time::advance(DECAY).await;
        e.record_latency(Duration::from_millis(10));
        let ms = e.latency().unwrap().as_secs_f64() * 1000.0;
        assert!((ms - (10.0 + 40.0 / std::f64::consts::E)).abs() < 0.5, "{ms}");
        e.outstanding.store(2, Ordering::Relaxed);
        assert_eq!(e.load_score(), e.latency().unwrap().as_nanos() as u64 * 3);
    }

    #[test]
    fn the_first_request_of_each_tick_is_timed() {
        let table = HealthTable::new(Clock::exact(), None);
        let (a, b) = (
            table.entry(&Endpoint::new("10.0.0.1")),
            table.entry(&Endpoint::new("10.0.0.2")),
        );
        let now = table.common().now_ms();
        assert!(a.time_request(now), "an endpoint's first request");
        assert!(!a.time_request(now) && !a.time_request(now));
        // Per endpoint.
        assert!(b.time_request(now));
        assert!(a.time_request(now + 10) && !a.time_request(now + 10));
    }
}
