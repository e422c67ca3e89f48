//! Catching up after an outage. A cached answer whose refresh failed because of a
//! source backs off (1 s doubling to 30 s), so that a thousand entries do not hammer a
//! server that is down. Alone, that back-off would also decide how late the entries
//! notice the server's return: up to 30 s. Here one entry per failing source, its
//! prober, retries at least every [`PROBE_PERIOD`]; when a refresh finds the source
//! answering again, every entry backing off for it is woken at once. A returning
//! server is followed within [`PROBE_PERIOD`] (plus one call), whatever the back-off
//! had reached, for one extra call per period per failing source.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;

/// Longest wait of a failing source's prober between two retries.
pub(crate) const PROBE_PERIOD: Duration = Duration::from_secs(4);

/// The sources that are failing, and who waits for them.
#[derive(Default)]
pub(crate) struct Recovery {
    failing: Mutex<HashMap<Arc<str>, Failing>>,
    /// The map's length, read without the lock on every successful refresh.
    count: AtomicUsize,
}

struct Failing {
    /// The refresh loop that retries at least every [`PROBE_PERIOD`]: its ticket. A
    /// loop that ends (its entry idled out) frees the role for the next waiter.
    prober: Weak<()>,
    /// Dropped when the source answers again, which wakes every receiver.
    recovered: watch::Sender<()>,
}

/// Woken when the source it was taken for answers again (or the cache goes).
pub(crate) struct Recovered(watch::Receiver<()>);

impl Recovered {
    pub(crate) async fn wait(&mut self) {
        // The sender is only ever dropped: `changed` returns when it is.
        let _ = self.0.changed().await;
    }
}

impl Recovery {
    /// A refresh loop (holding `ticket`) failed because of `source` and would wait
    /// `delay`. The wait it should use (at most [`PROBE_PERIOD`] for the source's
    /// prober), and what wakes it when the source answers again.
    pub(crate) fn after_failure(
        &self,
        source: &str,
        ticket: &Arc<()>,
        delay: Duration,
    ) -> (Duration, Recovered) {
        let mut failing = self.failing.lock().expect("recovery lock");
        let entry = match failing.get_mut(source) {
            Some(entry) => entry,
            None => {
                failing.insert(
                    source.into(),
                    Failing {
                        prober: Weak::new(),
                        recovered: watch::channel(()).0,
                    },
                );
                self.count.store(failing.len(), Ordering::Release);
                failing.get_mut(source).expect("just inserted")
            }
        };
        let probing = match entry.prober.upgrade() {
            Some(prober) => Arc::ptr_eq(&prober, ticket),
            None => {
                entry.prober = Arc::downgrade(ticket);
                true
            }
        };
        let delay = if probing { delay.min(PROBE_PERIOD) } else { delay };
        (delay, Recovered(entry.recovered.subscribe()))
    }

    /// `source` answered (cleanly, or with an answer): wake whoever waits for it.
    pub(crate) fn answered(&self, source: &str) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut failing = self.failing.lock().expect("recovery lock");
        if failing.remove(source).is_some() {
            self.count.store(failing.len(), Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_prober_per_source_and_everyone_woken_when_it_answers() {
        let recovery = Recovery::default();
        let (first, second) = (Arc::new(()), Arc::new(()));
        let long = Duration::from_secs(30);
        let (delay, mut woken_first) = recovery.after_failure("etcd", &first, long);
        assert_eq!(delay, PROBE_PERIOD, "the first to fail probes");
        let (delay, mut woken_second) = recovery.after_failure("etcd", &second, long);
        assert_eq!(delay, long, "the others keep their back-off");
        // Another source has its own prober.
        assert_eq!(recovery.after_failure("dns", &second, long).0, PROBE_PERIOD);

        recovery.answered("dns");
        assert!(
            tokio::time::timeout(Duration::from_millis(10), woken_first.wait())
                .await
                .is_err(),
            "woken by another source"
        );
        recovery.answered("etcd");
        woken_first.wait().await;
        woken_second.wait().await;

        // A prober that is gone hands the role on.
        recovery.after_failure("etcd", &first, long);
        drop(first);
        assert_eq!(recovery.after_failure("etcd", &second, long).0, PROBE_PERIOD);
    }
}
