//! The one back-off every retry loop uses: refresh, long-poll, registration,
//! quarantine, balancer ejection, gRPC admission.

use std::time::Duration;

/// Exponential back-off: the first delay, doubling up to a cap, optionally with
/// jitter. Each loop owns one; [`Backoff::reset`] after a success.
///
/// Jitter is symmetric (±`jitter` of the delay), so that many clients restarting
/// together spread out around the schedule instead of only ever retrying later.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    jitter: f64,
    next: Duration,
    attempts: u32,
}

impl Backoff {
    /// Delays of `first`, doubling up to `max`, without jitter.
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max: max.max(first),
            jitter: 0.0,
            next: first,
            attempts: 0,
        }
    }

    /// Spread each delay uniformly over ±`fraction` of it (clamped to 0..=1).
    pub fn with_jitter(mut self, fraction: f64) -> Backoff {
        self.jitter = fraction.clamp(0.0, 1.0);
        self
    }

    /// The delay before the next attempt; the one after it doubles (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.peek();
        self.next = self.next.saturating_mul(2).min(self.max);
        self.attempts = self.attempts.saturating_add(1);
        if self.jitter == 0.0 {
            return delay;
        }
        delay.mul_f64(1.0 - self.jitter + 2.0 * self.jitter * fastrand::f64())
    }

    /// The delay [`Backoff::next_delay`] would return, before jitter.
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// The delay before attempt `n` (0: the first delay) of a fresh back-off, before
    /// jitter: for callers that keep only a failure count, lock-free.
    pub fn nth(&self, n: u32) -> Duration {
        self.first.saturating_mul(1 << n.min(31)).min(self.max)
    }

    /// Delays handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Start again from the first delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.first;
        self.attempts = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(S, 30 * S);
        let delays: Vec<u64> = (0..8).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(b.attempts(), 8);
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert_eq!(b.next_delay(), S);
    }

    #[test]
    fn jitter_stays_within_its_fraction_and_varies() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let mut b = Backoff::new(10 * S, 10 * S).with_jitter(0.2);
            let d = b.next_delay();
            assert!(d >= 8 * S && d <= 12 * S, "{d:?}");
            seen.insert(d.as_millis());
        }
        assert!(seen.len() > 10, "jitter should vary: {seen:?}");
    }

    #[test]
    fn nth_matches_the_sequence() {
        let mut b = Backoff::new(S, 30 * S);
        let fresh = b.clone();
        for n in 0..40 {
            assert_eq!(fresh.nth(n), b.next_delay(), "attempt {n}");
        }
    }

    #[test]
    fn a_cap_below_the_first_delay_is_the_first_delay() {
        let mut b = Backoff::new(5 * S, S);
        assert_eq!(b.next_delay(), 5 * S);
        assert_eq!(b.next_delay(), 5 * S);
    }
}
