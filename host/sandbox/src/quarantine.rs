//! Quarantine: a provider that keeps faulting (traps, limits, broken answers) is not
//! called for a while, so a crashing provider costs nothing and the chain goes straight
//! to the next one.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use wasd_core::{Backoff, ProviderStatus};

/// Faults (traps, limits, broken answers) in a row before a provider is quarantined.
const QUARANTINE_AFTER: u32 = 3;
/// Quarantine length: 1 s, doubling with each new quarantine up to 60 s.
pub const QUARANTINE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));
/// Healthy this long after its last quarantine began, a provider's next quarantine
/// starts at the first length again.
const HEALTHY_RESET: Duration = Duration::from_secs(600);

/// When a call started, as far as quarantines go: see [`Health::mark`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mark(u64);

/// A provider's fault record. After [`QUARANTINE_AFTER`] faults in a row it is not
/// called for a while (doubling each time, as proxy-wasm's restart limits do), so a
/// crashing provider costs nothing and the chain goes straight to the next one.
#[derive(Debug)]
pub(crate) struct Health {
    inner: Mutex<HealthState>,
}

#[derive(Debug, Clone)]
struct HealthState {
    in_a_row: u32,
    total: u64,
    until: Option<Instant>,
    quarantined_at: Option<Instant>,
    /// Quarantines begun so far: a call's [`Mark`].
    quarantines: u64,
    /// The length of the next quarantine.
    lengths: Backoff,
}

impl Default for HealthState {
    fn default() -> HealthState {
        HealthState {
            in_a_row: 0,
            total: 0,
            until: None,
            quarantined_at: None,
            quarantines: 0,
            lengths: Backoff::new(QUARANTINE.0, QUARANTINE.1),
        }
    }
}

impl Health {
    pub(crate) fn new() -> Health {
        Health {
            inner: Mutex::new(HealthState::default()),
        }
    }

    /// `Some(time left)` while quarantined.
    pub(crate) fn quarantined(&self) -> Option<(Duration, u32)> {
        let state = self.inner.lock().expect("health lock");
        let left = state.until?.checked_duration_since(Instant::now())?;
        Some((left, state.in_a_row))
    }

    /// Taken as a call starts, to tell [`Health::success`] which quarantines began
    /// after it (a count, not a time: no clock read per call).
    pub(crate) fn mark(&self) -> Mark {
        Mark(self.inner.lock().expect("health lock").quarantines)
    }

    /// A call that started at `started` went well. It ends the fault streak, but
    /// not a quarantine that began after it started (a long watch coming back).
    pub(crate) fn success(&self, started: Mark) {
        self.success_at(started, Instant::now);
    }

    /// [`Health::success`] at the time `now` returns (read only after a quarantine).
    fn success_at(&self, started: Mark, now: impl FnOnce() -> Instant) {
        let mut state = self.inner.lock().expect("health lock");
        if state.quarantines != started.0 {
            return;
        }
        state.in_a_row = 0;
        state.until = None;
        // Healthy for a long while: the next quarantine starts short again.
        if state
            .quarantined_at
            .is_some_and(|at| now().saturating_duration_since(at) > HEALTHY_RESET)
        {
            state.lengths.reset();
            state.quarantined_at = None;
        }
    }

    /// Record a fault; `Some(quarantine)` when this one starts a quarantine.
    pub(crate) fn fault(&self) -> Option<Duration> {
        self.fault_at(Instant::now())
    }

    fn fault_at(&self, now: Instant) -> Option<Duration> {
        let mut state = self.inner.lock().expect("health lock");
        state.in_a_row += 1;
        state.total += 1;
        if state.in_a_row < QUARANTINE_AFTER || state.until.is_some_and(|u| u > now) {
            return None;
        }
        let length = state.lengths.next_delay();
        state.quarantined_at = Some(now);
        state.until = Some(now + length);
        state.quarantines += 1;
        Some(length)
    }

    pub(crate) fn status(&self, name: &str) -> ProviderStatus {
        let state = self.inner.lock().expect("health lock").clone();
        let mut status = ProviderStatus::healthy(name);
        status.faults = state.total;
        status.faults_in_a_row = state.in_a_row;
        status.quarantined_for = state.until.and_then(|u| u.checked_duration_since(Instant::now()));
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarantine_starts_after_faults_in_a_row_and_grows() {
        let health = Health::new();
        assert_eq!(health.fault(), None);
        assert_eq!(health.fault(), None);
        assert_eq!(health.fault(), Some(Duration::from_secs(1)));
        assert!(health.quarantined().is_some());
        // Faults during a quarantine do not extend it.
        assert_eq!(health.fault(), None);
        let before = health.mark();
        health.inner.lock().unwrap().until = Some(Instant::now());
        assert_eq!(health.fault(), Some(Duration::from_secs(2)));
        // A call that began before the quarantine does not end it.
        health.success(before);
        assert!(health.quarantined().is_some());
        health.success(health.mark());
        assert!(health.quarantined().is_none());
        assert_eq!(health.status("p").faults, 5);
        assert_eq!(health.status("p").faults_in_a_row, 0);
    }

    #[test]
    fn quarantines_double_to_60s_and_start_short_again_after_10_minutes_healthy() {
        let health = Health::new();
        let mut now = Instant::now();
        // Three faults in a row start the first quarantine; once one is over, the next
        // fault starts another at once, twice as long, up to 60 s.
        assert_eq!(health.fault_at(now), None);
        assert_eq!(health.fault_at(now), None);
        let mut lengths = Vec::new();
        for _ in 0..8 {
            let length = health
                .fault_at(now)
                .expect("a fault past a quarantine starts one");
            lengths.push(length.as_secs());
            // Faults during it neither extend nor restart it.
            assert_eq!(health.fault_at(now + length - Duration::from_millis(1)), None);
            now += length;
        }
        assert_eq!(lengths, [1, 2, 4, 8, 16, 32, 60, 60]);

        // A success soon after (599 s after the last quarantine began) ends the fault
        // streak but keeps the length: three new faults bring 60 s again.
        let began = now - Duration::from_secs(60);
        health.success_at(health.mark(), || began + Duration::from_secs(599));
        assert_eq!(health.fault_at(now), None);
        assert_eq!(health.fault_at(now), None);
        assert_eq!(health.fault_at(now), Some(Duration::from_secs(60)));

        // Healthy for more than 10 minutes since that one began: back to 1 s, 2 s.
        let began = now;
        now += Duration::from_secs(60);
        health.success_at(health.mark(), || began + Duration::from_secs(601));
        assert_eq!(health.fault_at(now), None);
        assert_eq!(health.fault_at(now), None);
        assert_eq!(health.fault_at(now), Some(Duration::from_secs(1)));
        now += Duration::from_secs(1);
        assert_eq!(health.fault_at(now), Some(Duration::from_secs(2)));
    }
}
