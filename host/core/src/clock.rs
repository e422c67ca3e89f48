//! The clock the core and the clients read: exact time for decisions, and a coarse
//! one (a relaxed load) for bookkeeping on the cached-resolve path, where
//! `Instant::now` would cost a quarter of the resolve.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

/// Milliseconds since the clock started. Built on tokio's `Instant`, so a test with
/// tokio's paused clock drives it.
#[derive(Debug, Clone)]
pub struct Clock {
    started: Instant,
    /// Advanced by [`Clock::tick`] (the sandbox's epoch thread does, every 10 ms);
    /// `None`: the coarse clock reads the exact one.
    coarse: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// A clock whose coarse reading is advanced by [`Clock::tick`]: call it from a
    /// thread that wakes regularly.
    pub fn ticked() -> Clock {
        Clock {
            started: Instant::now(),
            coarse: Some(Arc::new(AtomicU64::new(0))),
        }
    }

    /// A clock whose coarse reading is the exact one (tests, tools).
    pub fn exact() -> Clock {
        Clock {
            started: Instant::now(),
            coarse: None,
        }
    }

    /// Milliseconds since the clock started, exactly.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Milliseconds since the clock started, as of the last tick: never ahead of
    /// [`Clock::now_ms`], behind by up to a tick (more when the ticking thread is
    /// starved).
    pub fn coarse_now_ms(&self) -> u64 {
        match &self.coarse {
            Some(coarse) => coarse.load(Ordering::Relaxed),
            None => self.now_ms(),
        }
    }

    /// Bring the coarse reading up to now.
    pub fn tick(&self) {
        if let Some(coarse) = &self.coarse {
            coarse.store(self.now_ms(), Ordering::Relaxed);
        }
    }
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::exact()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn coarse_lags_until_ticked() {
        let clock = Clock::ticked();
        tokio::time::advance(Duration::from_millis(250)).await;
        assert_eq!(clock.now_ms(), 250);
        assert_eq!(clock.coarse_now_ms(), 0);
        clock.tick();
        assert_eq!(clock.coarse_now_ms(), 250);
        let exact = Clock::exact();
        tokio::time::advance(Duration::from_millis(5)).await;
        assert_eq!(exact.coarse_now_ms(), 5);
    }
}
