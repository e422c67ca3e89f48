//! A balancer's picture of one set under one policy: the endpoints that pass the filters
//! (and the subset), each with its shared health entry, and what the strategy needs
//! made once per set — the weighted schedule, the hash ring, the zone's share. A pick
//! is O(1) for every strategy but pick-first: one atomic counter or random number, one
//! or two health reads, a probe onward past endpoints left out.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use wasd_core::{Endpoint, EndpointSet};

use super::Predicate;
use super::health::{EndpointHealth, HealthTable};
use super::policy::{Policy, Strategy, Subset};

/// The longest weighted schedule; larger weight sums are scaled down to it.
const MAX_SCHEDULE: u64 = 1 << 16;
/// Ring points per unit of weight. An endpoint's points depend on its own weight alone,
/// so that one leaving or joining moves no other endpoint's keys.
const RING_POINTS_PER_WEIGHT: u64 = 128;
/// The most points on a ring; beyond it every endpoint's points are scaled down (and
/// that stability is lost for such sets).
const MAX_RING: u64 = 1 << 17;
/// Random draws a pick makes before it walks to a usable endpoint.
const RANDOM_TRIES: usize = 4;

/// One endpoint as a balancer holds it.
pub(crate) struct Slot {
    pub(crate) endpoint: Endpoint,
    pub(crate) health: Arc<EndpointHealth>,
    pub(crate) weight: u32,
}

/// The endpoints a pick chooses among (all, or the caller's zone), with what the
/// strategy made of them.
#[derive(Default)]
struct View {
    /// Indexes into `Snapshot::slots`.
    members: Vec<u32>,
    /// Weighted round-robin: members in their smooth order over one cycle.
    schedule: Vec<u32>,
    /// Consistent hashing: (point, member) sorted by point.
    ring: Vec<(u64, u32)>,
    /// Where each range of points starts in `ring`, by a point's top `64 - ring_shift`
    /// bits: a lookup reads two entries of this and searches a few of `ring`, instead of
    /// a binary search over all of it (cache misses at 1 000 endpoints).
    ring_index: Vec<u32>,
    ring_shift: u32,
    /// Turns that found their endpoint left out: each goes on from a further point, so
    /// that a left-out endpoint's turns are shared evenly rather than all given to the
    /// endpoint after it.
    skips: AtomicU64,
}

/// What one pick asks of a view.
pub(crate) struct Pick {
    /// A counter's value (round-robin), taken once per pick.
    pub(crate) sequence: u64,
    /// Random bits, taken once per pick.
    pub(crate) random: u64,
    /// The request's key hash, for consistent hashing.
    pub(crate) key: Option<u64>,
    pub(crate) now: u64,
}

/// The endpoints that pass the filters under one policy.
pub(crate) struct Snapshot {
    /// The query's service: the label of the balancer's metrics.
    pub(crate) service: Arc<str>,
    pub(crate) policy: Arc<Policy>,
    pub(crate) slots: Vec<Slot>,
    all: View,
    /// The caller's zone, when it has endpoints.
    local: Option<View>,
    /// The cached zone decision: (health generation + 1) << 1 | use the zone.
    zone_decision: AtomicU64,
    /// ... valid until this time (the first ejection in the zone to end).
    zone_until: AtomicU64,
}

impl Snapshot {
    /// The snapshot of `set` under `policy`: its endpoints that pass the filters (and
    /// fall in the subset), each with its health entry from `table` (so that counters
    /// and failure marks survive a change), checked actively if the policy says so.
    /// `stop_checks`: the policy stopped asking for active checks, so the endpoints'
    /// checkers stop (otherwise a checker runs while any balancer holds its endpoint,
    /// whatever the others' policies). `None` when none pass: like Kratos, a balancer
    /// never drops to an empty set.
    pub(crate) fn new(
        service: Arc<str>,
        set: &EndpointSet,
        filters: &[Predicate],
        policy: Arc<Policy>,
        table: &HealthTable,
        stop_checks: bool,
    ) -> Option<Snapshot> {
        let mut endpoints: Vec<&Endpoint> = set
            .iter()
            .filter(|e| filters.iter().all(|keep| keep(e)))
            .collect();
        if endpoints.is_empty() {
            return None;
        }
        if let Some(subset) = &policy.subset {
            endpoints = deterministic_subset(endpoints, subset);
        }
        let slots: Vec<Slot> = endpoints
            .into_iter()
            .map(|e| {
                let health = table.entry(e);
                match &policy.health {
                    Some(check) => table.check(&health, e, check),
                    None if stop_checks => table.uncheck(&health),
                    None => {}
                }
                Slot {
                    endpoint: e.clone(),
                    health,
                    weight: weight_of(e),
                }
            })
            .collect();
        let all: Vec<u32> = (0..slots.len() as u32).collect();
        let local: Option<Vec<u32>> = policy.zone.as_deref().and_then(|zone| {
            let members: Vec<u32> = all
                .iter()
                .copied()
                .filter(|&i| slots[i as usize].endpoint.metadata_value("zone") == Some(zone))
                .collect();
            // A zone with every endpoint is no preference.
            (!members.is_empty() && members.len() < slots.len()).then_some(members)
        });
        let view = |members: Vec<u32>| View::new(members, &slots, policy.strategy);
        Some(Snapshot {
            service,
            all: view(all),
            local: local.map(view),
            slots,
            policy,
            zone_decision: AtomicU64::new(0),
            zone_until: AtomicU64::new(0),
        })
    }

    /// The slot a pick goes to.
    #[inline]
    pub(crate) fn pick(&self, pick: &Pick, table: &HealthTable) -> usize {
        let view = match &self.local {
            Some(local) if self.stay_local(local, pick.now, table) => local,
            _ => &self.all,
        };
        view.pick(self.policy.strategy, &self.slots, pick) as usize
    }

    /// Whether the caller's zone has enough healthy endpoints; decided again only when
    /// some endpoint's health changed or an ejection in the zone ended.
    fn stay_local(&self, local: &View, now: u64, table: &HealthTable) -> bool {
        let generation = table.generation() + 1;
        let decision = self.zone_decision.load(Ordering::Acquire);
        if decision >> 1 == generation && now < self.zone_until.load(Ordering::Relaxed) {
            return decision & 1 == 1;
        }
        let mut healthy = 0;
        let mut until = u64::MAX;
        for &i in &local.members {
            let health = &self.slots[i as usize].health;
            if health.usable(now) {
                healthy += 1;
            } else if let Some(end) = health.ejected_until(now) {
                until = until.min(end);
            }
        }
        let share = healthy as f64 / local.members.len() as f64;
        let stay = healthy > 0 && share >= self.policy.zone_min_healthy;
        // The deadline before the decision (Release), read after it (Acquire): a pick
        // that sees a decision sees its deadline or a later one.
        self.zone_until.store(until, Ordering::Relaxed);
        self.zone_decision
            .store(generation << 1 | u64::from(stay), Ordering::Release);
        stay
    }

    /// Endpoints ejected now, of this snapshot's.
    pub(crate) fn ejected(&self, now: u64) -> usize {
        self.slots
            .iter()
            .filter(|s| s.health.ejected_until(now).is_some())
            .count()
    }
}

impl View {
    fn new(members: Vec<u32>, slots: &[Slot], strategy: Strategy) -> View {
        let weights: Vec<u64> = members
            .iter()
            .map(|&i| u64::from(slots[i as usize].weight))
            .collect();
        let schedule = match strategy {
            Strategy::WeightedRoundRobin => smooth_schedule(&weights)
                .into_iter()
                .map(|k| members[k])
                .collect(),
            _ => Vec::new(),
        };
        let ring = match strategy {
            Strategy::ConsistentHash => {
                let names: Vec<String> = members
                    .iter()
                    .map(|&i| slots[i as usize].endpoint.to_string())
                    .collect();
                hash_ring(&names, &weights)
                    .into_iter()
                    .map(|(point, k)| (point, members[k]))
                    .collect()
            }
            _ => Vec::new(),
        };
        // About one index entry per point, at most 2^16.
        let bits = (ring.len().max(2).next_power_of_two().trailing_zeros()).clamp(1, 16);
        let ring_shift = 64 - bits;
        let ring_index = if ring.is_empty() {
            Vec::new()
        } else {
            (0..=(1u64 << bits))
                .map(|bucket| {
                    let from = bucket << ring_shift;
                    if bucket == 1 << bits {
                        ring.len() as u32
                    } else {
                        ring.partition_point(|&(p, _)| p < from) as u32
                    }
                })
                .collect()
        };
        View {
            members,
            schedule,
            ring,
            ring_index,
            ring_shift,
            skips: AtomicU64::new(0),
        }
    }

    #[inline]
    fn pick(&self, strategy: Strategy, slots: &[Slot], pick: &Pick) -> u32 {
        let usable = |i: u32| slots[i as usize].health.usable(pick.now);
        let n = self.members.len();
        match strategy {
            Strategy::RoundRobin => {
                let start = (pick.sequence % n as u64) as usize;
                let first = self.members[start];
                if usable(first) {
                    return first;
                }
                walk(&self.members, self.skip(start, n), usable)
            }
            Strategy::WeightedRoundRobin => {
                let len = self.schedule.len();
                let start = (pick.sequence % len as u64) as usize;
                let first = self.schedule[start];
                if usable(first) {
                    return first;
                }
                // Probe the schedule a little way from a further point, then any member.
                let from = self.skip(start, len);
                let probe = len.min(2 * n + 16);
                (0..probe)
                    .map(|k| self.schedule[(from + k) % len])
                    .find(|&i| usable(i))
                    .or_else(|| self.members.iter().copied().find(|&i| usable(i)))
                    // None usable: the weighted turn's own endpoint.
                    .unwrap_or(first)
            }
            Strategy::Random => self.random(pick.random, usable),
            Strategy::PickFirst => walk(&self.members, 0, usable),
            Strategy::PowerOfTwoChoices | Strategy::PowerOfTwoEwma if n > 1 => {
                // Two different members: the second a non-zero step from the first.
                let a = below(pick.random, n as u64) as usize;
                let b = a + 1 + below(pick.random.rotate_left(32), n as u64 - 1) as usize;
                let b = if b >= n { b - n } else { b };
                let (a, b) = (self.members[a], self.members[b]);
                let score = |i: u32| {
                    let health = &slots[i as usize].health;
                    match strategy {
                        Strategy::PowerOfTwoEwma => health.load_score(),
                        _ => health.outstanding.load(Ordering::Relaxed) as u64,
                    }
                };
                match (usable(a), usable(b)) {
                    (true, true) if score(b) < score(a) => b,
                    (true, _) => a,
                    (false, true) => b,
                    (false, false) => self.random(pick.random.rotate_left(17), usable),
                }
            }
            Strategy::PowerOfTwoChoices | Strategy::PowerOfTwoEwma => self.members[0],
            Strategy::ConsistentHash => {
                let point = pick.key.unwrap_or(pick.random);
                let len = self.ring.len();
                let bucket = (point >> self.ring_shift) as usize;
                let (lo, hi) = (
                    self.ring_index[bucket] as usize,
                    self.ring_index[bucket + 1] as usize,
                );
                // Past the last point wraps to the first. No `%` on the way: a division
                // was a tenth of this pick.
                let at = lo + self.ring[lo..hi].partition_point(|&(p, _)| p < point);
                let start = if at == len { 0 } else { at };
                let first = self.ring[start].1;
                if usable(first) {
                    return first;
                }
                let (wrapped, onward) = self.ring.split_at(start);
                onward[1..]
                    .iter()
                    .chain(wrapped)
                    .map(|&(_, i)| i)
                    .find(|&i| usable(i))
                    .unwrap_or(first)
            }
        }
    }

    /// Where a turn whose endpoint is left out goes on from: 1, 2, ... places further
    /// in turn (of `len`), so that its turns are spread over the others.
    #[cold]
    fn skip(&self, start: usize, len: usize) -> usize {
        if len < 2 {
            return start;
        }
        let k = self.skips.fetch_add(1, Ordering::Relaxed) as usize;
        (start + 1 + k % (len - 1)) % len
    }

    /// A random usable member: a few draws, then a walk from the last.
    fn random(&self, mut random: u64, usable: impl Fn(u32) -> bool) -> u32 {
        let n = self.members.len() as u64;
        for _ in 0..RANDOM_TRIES {
            let i = self.members[below(random, n) as usize];
            if usable(i) {
                return i;
            }
            random = random.rotate_left(13).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
        walk(&self.members, below(random, n) as usize, usable)
    }
}

/// `random` reduced to `0..n` without a division (Lemire's multiply-shift: the high
/// bits of the product; a division is most of a pick's arithmetic). Its bias over 64
/// random bits is at most n / 2^64.
#[inline]
fn below(random: u64, n: u64) -> u64 {
    ((u128::from(random) * u128::from(n)) >> 64) as u64
}

/// The first usable member from `start` on (wrapping); `start`'s when none is.
#[inline]
fn walk(members: &[u32], start: usize, usable: impl Fn(u32) -> bool) -> u32 {
    let n = members.len();
    (0..n)
        .map(|k| members[(start + k) % n])
        .find(|&i| usable(i))
        .unwrap_or(members[start])
}

/// An endpoint's `weight` metadata (Kratos's, or SRV's weight from dns-srv); 1 when
/// absent or not a positive number.
fn weight_of(endpoint: &Endpoint) -> u32 {
    endpoint
        .metadata_value("weight")
        .and_then(|w| w.trim().parse::<u32>().ok())
        .filter(|&w| w > 0)
        .unwrap_or(1)
}

/// One cycle of smooth weighted round-robin, nginx's: each turn every endpoint gains
/// its weight, the one with the most goes and pays the total. Each endpoint's turns are
/// spread evenly (within one turn of its share at every point of the cycle). Weights are
/// reduced by their common divisor, and scaled down when their sum passes
/// [`MAX_SCHEDULE`]; for large sets (endpoints × cycle past 2^20, about a millisecond of
/// work) the cycle is made earliest-deadline-first instead (O(cycle · log n), within 1.5
/// turns).
fn smooth_schedule(weights: &[u64]) -> Vec<usize> {
    let total: u64 = weights.iter().sum();
    let weights: Vec<u64> = if total > MAX_SCHEDULE {
        weights
            .iter()
            .map(|&w| (w * MAX_SCHEDULE / total).max(1))
            .collect()
    } else {
        let gcd = weights.iter().fold(0, |g, &w| gcd(g, w)).max(1);
        weights.iter().map(|&w| w / gcd).collect()
    };
    let length: u64 = weights.iter().sum();
    if (weights.len() as u64).saturating_mul(length) <= 1 << 20 {
        let total = length as i64;
        let mut current = vec![0i64; weights.len()];
        let mut schedule = Vec::with_capacity(length as usize);
        for _ in 0..length {
            let mut best = 0;
            for (k, &w) in weights.iter().enumerate() {
                current[k] += w as i64;
                if current[k] > current[best] {
                    best = k;
                }
            }
            current[best] -= total;
            schedule.push(best);
        }
        return schedule;
    }
    earliest_deadline_first(&weights)
}

/// Turn `turn` of endpoint `k` of weight `w` due at (2·turn + 1) / 2w of the cycle.
fn earliest_deadline_first(weights: &[u64]) -> Vec<usize> {
    #[derive(PartialEq, Eq)]
    struct Due {
        turn: u64,
        weight: u64,
        k: usize,
    }
    impl Ord for Due {
        fn cmp(&self, other: &Due) -> CmpOrdering {
            // Earliest first (BinaryHeap is a max-heap), ties to the earlier endpoint.
            let mine = u128::from(2 * self.turn + 1) * u128::from(other.weight);
            let theirs = u128::from(2 * other.turn + 1) * u128::from(self.weight);
            theirs.cmp(&mine).then(other.k.cmp(&self.k))
        }
    }
    impl PartialOrd for Due {
        fn partial_cmp(&self, other: &Due) -> Option<CmpOrdering> {
            Some(self.cmp(other))
        }
    }
    let length: u64 = weights.iter().sum();
    let mut heap: BinaryHeap<Due> = weights
        .iter()
        .enumerate()
        .map(|(k, &weight)| Due { turn: 0, weight, k })
        .collect();
    let mut schedule = Vec::with_capacity(length as usize);
    while schedule.len() < length as usize {
        let Some(mut due) = heap.pop() else { break };
        schedule.push(due.k);
        due.turn += 1;
        heap.push(due);
    }
    schedule
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// A hash ring: each endpoint at points `xxh64("{name}_{i}")`, [`RING_POINTS_PER_WEIGHT`]
/// per unit of its weight (scaled down when the ring would pass [`MAX_RING`]), sorted.
fn hash_ring(names: &[String], weights: &[u64]) -> Vec<(u64, usize)> {
    let total: u64 = weights
        .iter()
        .map(|w| w.saturating_mul(RING_POINTS_PER_WEIGHT))
        .sum();
    let scale = |points: u64| {
        if total > MAX_RING {
            (u128::from(points) * u128::from(MAX_RING) / u128::from(total)).max(1) as u64
        } else {
            points
        }
    };
    let mut ring = Vec::with_capacity(total.min(MAX_RING) as usize + names.len());
    let mut label = String::new();
    for (k, name) in names.iter().enumerate() {
        let points = scale(weights[k].saturating_mul(RING_POINTS_PER_WEIGHT));
        for i in 0..points {
            use std::fmt::Write;
            label.clear();
            let _ = write!(label, "{name}_{i}");
            ring.push((key_hash(label.as_bytes()), k));
        }
    }
    ring.sort_unstable();
    ring
}

/// A request key's point on the ring (and a ring point's, from its label): rapidhash
/// v3, stable across versions and platforms, so that every client of a service puts a
/// key at the same point.
#[inline]
pub(crate) fn key_hash(key: &[u8]) -> u64 {
    rapidhash::v3::rapidhash_v3(key)
}

/// Google's deterministic subsetting: clients are grouped in rounds of
/// `endpoints / size`; each round shuffles the endpoints (sorted first, so that every
/// client sees the same order) with the round as seed, and each client of the round
/// takes its own slice of `size`.
fn deterministic_subset<'a>(mut endpoints: Vec<&'a Endpoint>, subset: &Subset) -> Vec<&'a Endpoint> {
    let size = subset.size.max(1);
    if endpoints.len() <= size {
        return endpoints;
    }
    let mut order = endpoints.clone();
    order.sort_by_cached_key(|e| e.to_string());
    let per_round = (order.len() / size) as u64;
    let round = subset.client_id / per_round;
    fastrand::Rng::with_seed(round).shuffle(&mut order);
    let start = (subset.client_id % per_round) as usize * size;
    let chosen = &order[start..start + size];
    // In the provider's order (SRV priority for pick-first).
    endpoints.retain(|e| chosen.contains(e));
    endpoints
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasd_core::Clock;

    fn set(hosts: &[&str]) -> EndpointSet {
        EndpointSet::new("test".into(), hosts.iter().map(|h| Endpoint::new(*h)).collect())
    }

    fn hosts(snapshot: &Snapshot) -> Vec<&str> {
        snapshot.slots.iter().map(|s| s.endpoint.host()).collect()
    }

    fn policy(strategy: Strategy) -> Arc<Policy> {
        Arc::new(Policy::default().with_strategy(strategy))
    }

    #[test]
    fn below_spreads_evenly_without_a_division() {
        let mut rng = fastrand::Rng::with_seed(11);
        for n in [1u64, 2, 3, 7, 1000] {
            let mut counts = vec![0u32; n as usize];
            let draws = 3000 * n as u32;
            for _ in 0..draws {
                let k = below(rng.u64(..), n);
                assert!(k < n);
                counts[k as usize] += 1;
            }
            // Each of n buckets near its 3 000 (a binomial's spread is ~55).
            assert!(
                counts.iter().all(|&c| (2700..3300).contains(&c)),
                "{n}: {counts:?}"
            );
        }
        assert_eq!(below(u64::MAX, 3), 2);
        assert_eq!(below(0, 3), 0);
    }

    #[test]
    fn an_empty_set_is_refused_and_a_new_one_keeps_known_health() {
        let table = HealthTable::new(Clock::exact(), None);
        let rr = policy(Strategy::RoundRobin);
        let first = Snapshot::new("test".into(), &set(&["a", "b"]), &[], rr.clone(), &table, false).unwrap();
        assert_eq!(hosts(&first), ["a", "b"]);
        first.slots[1].health.outstanding.store(3, Ordering::Relaxed);

        // An empty set never replaces endpoints: the update is refused.
        assert!(Snapshot::new("test".into(), &set(&[]), &[], rr.clone(), &table, false).is_none());
        // Nor does a set none of whose endpoints pass the filters.
        let only_c: Predicate = Arc::new(|e: &Endpoint| e.host() == "c");
        assert!(
            Snapshot::new(
                "test".into(),
                &set(&["a", "b"]),
                std::slice::from_ref(&only_c),
                rr.clone(),
                &table,
                false
            )
            .is_none()
        );

        // An endpoint that stays keeps what is known of it; a new one starts fresh.
        let next = Snapshot::new("test".into(), &set(&["b", "c"]), &[], rr.clone(), &table, false).unwrap();
        assert_eq!(hosts(&next), ["b", "c"]);
        assert!(Arc::ptr_eq(&next.slots[0].health, &first.slots[1].health));
        assert_eq!(next.slots[1].health.outstanding.load(Ordering::Relaxed), 0);
        let filtered = Snapshot::new("test".into(), &set(&["b", "c"]), &[only_c], rr, &table, false).unwrap();
        assert_eq!(hosts(&filtered), ["c"]);
    }

    #[test]
    fn a_left_out_endpoints_turns_are_shared_evenly() {
        let table = HealthTable::new(Clock::exact(), None);
        for strategy in [Strategy::RoundRobin, Strategy::WeightedRoundRobin] {
            let snapshot = Snapshot::new(
                "test".into(),
                &set(&["a", "b", "c", "d"]),
                &[],
                policy(strategy),
                &table,
                false,
            )
            .unwrap();
            snapshot.slots[0].health.failed(&Default::default(), || true);
            let now = table.common().now_ms();
            let mut counts = [0; 4];
            for sequence in 0..48 {
                let pick = Pick {
                    sequence,
                    random: 0,
                    key: None,
                    now,
                };
                counts[snapshot.pick(&pick, &table)] += 1;
            }
            // a's twelve turns went four to each of the others, not all to b.
            assert_eq!(counts, [0, 16, 16, 16], "{strategy}");
            snapshot.slots[0].health.succeeded();
        }
    }

    #[test]
    fn the_smooth_schedule_spreads_each_endpoint_evenly() {
        // nginx's own example.
        assert_eq!(smooth_schedule(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_schedule(&[2, 2, 2]), [0, 1, 2]);
        assert_eq!(earliest_deadline_first(&[5, 1, 1]), [0, 0, 0, 1, 2, 0, 0]);
        let mut rng = fastrand::Rng::with_seed(7);
        for round in 0..400 {
            let weights: Vec<u64> = (0..rng.usize(2..9)).map(|_| rng.u64(1..21)).collect();
            let (schedule, bound) = if round % 2 == 0 {
                (smooth_schedule(&weights), 1.0)
            } else {
                (earliest_deadline_first(&weights), 1.5)
            };
            let reduced_total = schedule.len() as f64;
            let total: u64 = weights.iter().sum();
            let mut counts = vec![0u64; weights.len()];
            for (t, &k) in schedule.iter().enumerate() {
                counts[k] += 1;
                for (j, &w) in weights.iter().enumerate() {
                    let ideal = (t + 1) as f64 * w as f64 / total as f64;
                    assert!(
                        (counts[j] as f64 - ideal).abs() <= bound,
                        "{weights:?}: {schedule:?} at {t}"
                    );
                }
            }
            // Exactly each endpoint's share over the cycle.
            for (j, &w) in weights.iter().enumerate() {
                assert!((counts[j] as f64 - reduced_total * w as f64 / total as f64).abs() < 1e-9);
            }
        }
        // A huge sum is scaled down to the cap, keeping the proportions.
        let big = smooth_schedule(&[1 << 20, 1 << 19]);
        assert_eq!(big.iter().filter(|&&k| k == 0).count(), 43_690);
        assert_eq!(big.iter().filter(|&&k| k == 1).count(), 21_845);
    }

    #[test]
    fn the_ring_moves_only_the_keys_of_an_endpoint_that_leaves() {
        let names: Vec<String> = (0..10).map(|i| format!("http://10.0.0.{i}:80")).collect();
        let ones = vec![1; 10];
        let ring = hash_ring(&names, &ones);
        let owner = |ring: &[(u64, usize)], names: &[String], key: u64| {
            let i = ring.partition_point(|&(p, _)| p < key) % ring.len();
            names[ring[i].1].clone()
        };
        let keys: Vec<u64> = (0..10_000u32).map(|k| key_hash(&k.to_le_bytes())).collect();
        let before: Vec<String> = keys.iter().map(|&k| owner(&ring, &names, k)).collect();
        let fewer: Vec<String> = names.iter().filter(|n| !n.contains(".3:")).cloned().collect();
        let ring = hash_ring(&fewer, &ones[..9]);
        let after: Vec<String> = keys.iter().map(|&k| owner(&ring, &fewer, k)).collect();
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        // Only the gone endpoint's keys move: about 1/10 of them.
        assert!(
            before
                .iter()
                .zip(&after)
                .all(|(b, a)| b == a || b.contains(".3:")),
            "a key of a staying endpoint moved"
        );
        assert!((700..1300).contains(&moved), "{moved} of 10 000 keys moved");
    }

    #[test]
    fn the_ring_index_finds_what_a_search_finds_and_a_left_out_endpoints_keys_move_on() {
        let table = HealthTable::new(Clock::exact(), None);
        for size in [1usize, 3, 50, 1000] {
            let hosts: Vec<String> = (0..size)
                .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
                .collect();
            let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
            let snapshot = Snapshot::new(
                "test".into(),
                &set(&hosts),
                &[],
                policy(Strategy::ConsistentHash),
                &table,
                false,
            )
            .unwrap();
            let ring = &snapshot.all.ring;
            let mut rng = fastrand::Rng::with_seed(3);
            // Random points, and the ring's own points and their neighbours.
            let points = (0..5000)
                .map(|_| rng.u64(..))
                .chain(
                    ring.iter()
                        .flat_map(|&(p, _)| [p.wrapping_sub(1), p, p.wrapping_add(1)])
                        .take(3000),
                )
                .chain([0, u64::MAX]);
            let points: Vec<u64> = points.collect();
            let pick = |point| {
                let pick = Pick {
                    sequence: 0,
                    random: 0,
                    key: Some(point),
                    now: table.common().now_ms(),
                };
                snapshot.pick(&pick, &table) as u32
            };
            for &point in &points {
                let searched = ring[ring.partition_point(|&(p, _)| p < point) % ring.len()].1;
                assert_eq!(pick(point), searched, "{size} endpoints, point {point}");
            }
            // An endpoint left out: its keys go on to the next point of another (wrapping
            // past the last point), the others' keys stay.
            if size > 1 {
                snapshot.slots[0].health.failed(&Default::default(), || true);
                for &point in &points {
                    let at = ring.partition_point(|&(p, _)| p < point);
                    let next = (0..ring.len())
                        .map(|k| ring[(at + k) % ring.len()].1)
                        .find(|&i| i != 0)
                        .unwrap();
                    assert_eq!(pick(point), next, "{size} endpoints, point {point}");
                }
            }
        }
    }

    #[test]
    fn subsets_are_stable_and_consecutive_clients_share_nothing() {
        let endpoints: Vec<Endpoint> = (0..12).map(|i| Endpoint::new(format!("10.0.0.{i}"))).collect();
        let refs: Vec<&Endpoint> = endpoints.iter().collect();
        let of = |id: u64| {
            let mut s: Vec<String> = deterministic_subset(refs.clone(), &Subset::new(3, id))
                .into_iter()
                .map(|e| e.to_string())
                .collect();
            s.sort();
            s
        };
        assert_eq!(of(5), of(5));
        // The four clients of a round cover the twelve endpoints once.
        let mut round: Vec<String> = (4..8).flat_map(of).collect();
        round.sort();
        round.dedup();
        assert_eq!(round.len(), 12);
        // The order endpoints arrive in does not matter.
        let reversed: Vec<&Endpoint> = endpoints.iter().rev().collect();
        let mut s: Vec<String> = deterministic_subset(reversed, &Subset::new(3, 5))
            .into_iter()
            .map(|e| e.to_string())
            .collect();
        s.sort();
        assert_eq!(s, of(5));
    }
}
