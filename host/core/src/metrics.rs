//! What the core counts, through the `metrics` facade (the embedder installs the
//! recorder; the CLI installs a Prometheus one).
//!
//! Everything off the hot path (misses, errors, refreshes, changes) goes to the facade
//! as it happens. A cached resolve costs ~40 ns, and a counter shared by every thread
//! would bounce its cache line between cores on each one and cost more than the
//! lookup: cached hits are counted per thread instead ([`count_hit`]: a plain load and
//! store on the thread's own cache line) and published as a sum by [`report`], which
//! the `wasd` crate calls every second.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Metric names, shared with the `wasd` crate's descriptions.
pub mod names {
    /// Counter, label `outcome`: `hit`, `miss`, `error`.
    pub const RESOLVES: &str = "wasd_resolves_total";
    /// Gauge: queries cached now.
    pub const CACHE_ENTRIES: &str = "wasd_cache_entries";
    /// Counter, label `outcome`: `changed`, `unchanged`, `failed`.
    pub const REFRESHES: &str = "wasd_refreshes_total";
    /// Counter: new endpoint sets published to watchers.
    pub const WATCH_CHANGES: &str = "wasd_watch_changes_total";
    /// Gauge, label `service`: endpoints served.
    pub const ENDPOINTS: &str = "wasd_endpoints";
    /// Counter, label `result`: `applied`, `failed`.
    pub const RELOADS: &str = "wasd_reloads_total";
    /// Gauge, labels `service`, `state`: registrations in each state.
    pub const REGISTRATIONS: &str = "wasd_registrations";
    /// Counter: registration attempts after a failure.
    pub const REGISTRATION_RETRIES: &str = "wasd_registration_retries_total";
}

/// Threads with a slot of their own at once; more share the last slot (atomically).
const SLOTS: usize = 64;

/// One thread's count, on a cache line of its own.
#[repr(align(128))]
struct Slot(AtomicU64);

static HITS: [Slot; SLOTS + 1] = [const { Slot(AtomicU64::new(0)) }; SLOTS + 1];
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);
/// Slots whose threads have ended, for new threads. A slot keeps its count: only the
/// sum is ever read. Without this, a process whose threads come and go (tokio's
/// blocking pool, a benchmark's threads) ran out of slots, and every thread then
/// counted on the shared one: a contended atomic on every cached resolve.
static FREE: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());

/// A thread's claim on a slot, given back when the thread ends.
struct Claim(usize);

impl Claim {
    fn new() -> Claim {
        let free = FREE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        Claim(free.unwrap_or_else(|| NEXT_SLOT.fetch_add(1, Ordering::Relaxed).min(SLOTS)))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.0 < SLOTS {
            // The lock orders this thread's last count before the next owner's first.
            FREE.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(self.0);
        }
    }
}

thread_local! {
    /// This thread's slot in [`HITS`], claimed on its first hit.
    static SLOT: Claim = Claim::new();
}

/// This thread's slot; the shared one while its own is being given back (a count from
/// another thread-local's destructor).
#[inline]
fn slot() -> usize {
    SLOT.try_with(|claim| claim.0).unwrap_or(SLOTS)
}

/// Count a resolve served from the cache.
#[inline]
pub(crate) fn count_hit() {
    let slot = slot();
    let counter = &HITS[slot].0;
    if slot < SLOTS {
        // Only this thread writes its slot: no read-modify-write needed.
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    } else {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Resolves served from the cache so far, in this process.
pub fn resolve_hits() -> u64 {
    HITS.iter().map(|slot| slot.0.load(Ordering::Relaxed)).sum()
}

/// A counter handle registered on first use and kept: counting is then an atomic
/// add, not a label lookup. The recorder must be installed before (the embedder
/// installs it before building its resolver, as the CLI does).
macro_rules! counter {
    ($name:expr $(, $key:literal => $value:literal)*) => {{
        static HANDLE: OnceLock<metrics::Counter> = OnceLock::new();
        HANDLE.get_or_init(|| metrics::counter!($name $(, $key => $value)*))
    }};
}

/// Count a resolve that ran the chain.
pub(crate) fn count_miss() {
    counter!(names::RESOLVES, "outcome" => "miss").increment(1);
}

/// Count a resolve that failed.
pub(crate) fn count_error() {
    counter!(names::RESOLVES, "outcome" => "error").increment(1);
}

/// How a periodic refresh went.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refresh {
    Changed,
    Unchanged,
    Failed,
}

/// Count a periodic refresh.
pub(crate) fn count_refresh(refresh: Refresh) {
    match refresh {
        Refresh::Changed => counter!(names::REFRESHES, "outcome" => "changed"),
        Refresh::Unchanged => counter!(names::REFRESHES, "outcome" => "unchanged"),
        Refresh::Failed => counter!(names::REFRESHES, "outcome" => "failed"),
    }
    .increment(1);
}

/// Count a new set published to watchers.
pub(crate) fn count_watch_change() {
    counter!(names::WATCH_CHANGES).increment(1);
}

/// Count a registration step tried again after a failure.
pub(crate) fn count_registration_retry() {
    counter!(names::REGISTRATION_RETRIES).increment(1);
}

/// Publish the hot-path counts to the facade.
pub fn report() {
    metrics::counter!(names::RESOLVES, "outcome" => "hit").absolute(resolve_hits());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_from_many_threads_all_count() {
        let before = resolve_hits();
        // More threads than slots: the last ones share the overflow slot.
        let threads: Vec<_> = (0..SLOTS + 8)
            .map(|_| {
                std::thread::spawn(|| {
                    for _ in 0..1000 {
                        count_hit();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        // Other tests in this process may count hits too: at least ours.
        assert!(resolve_hits() - before >= (SLOTS as u64 + 8) * 1000);
    }

    #[test]
    fn threads_that_end_give_their_slot_back_and_their_counts_stay() {
        let before = resolve_hits();
        // Many more threads than slots, one after the other.
        for _ in 0..4 * SLOTS {
            std::thread::spawn(count_hit).join().unwrap();
        }
        let slot = std::thread::spawn(|| {
            count_hit();
            slot()
        })
        .join()
        .unwrap();
        assert!(slot < SLOTS, "a new thread counts on the shared slot");
        assert!(resolve_hits() - before > 4 * SLOTS as u64);
    }
}
