//! `rl`: a generic cell rate algorithm (GCRA) limiter, as redis-cell's `CL.THROTTLE`.
//!
//! A name allows `count` requests per `period`, with bursts of up to `burst` requests beyond the
//! steady rate. The whole state of a name is one number, its theoretical arrival time (TAT): the
//! time at which the limiter would be back to full burst capacity. A request of `quantity` is
//! allowed if, after adding `quantity` emission intervals to the TAT, the TAT is still within the
//! burst tolerance of now. Names whose TAT has passed are back to their initial state, so they are
//! dropped ([`RateLimits::evict_some`]) and memory does not grow with the names ever seen.
//!
//! Dropping them costs work in proportion to what expired, not to what is stored: each name
//! has one entry in a min-heap of expiry times, made when the name is stored.
//! An entry that comes due for a name whose TAT has moved on since is pushed back with the new
//! TAT (lazy deletion), so a busy name costs one heap move per expiry it escapes, never one per
//! request.
//!
//! A name costs [`LIMITER_BYTES`] (53) plus, for a name longer than 22 bytes, its heap block:
//! limiters live in a slab of 32-byte slots (the name stored once, inline when short, and a
//! 64-bit TAT), found through an index of 4-byte slot numbers, with a 16-byte heap entry
//! (TAT, slot). Under the memory budget a new name that does not fit first evicts the
//! limiters soonest back to full capacity (which resets them: their next request starts from
//! a full burst).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use hashbrown::HashTable;

use crate::name::LockName;
use crate::NameHasher;

/// The parameters of one `rl` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Requests allowed at once beyond the steady rate.
    pub burst: u64,
    /// Requests per period at the steady rate (at least 1).
    pub count: u64,
    /// The period, in milliseconds (at least 1).
    pub period_ms: u64,
    /// How many requests this one counts for (0 only asks).
    pub quantity: u64,
}

/// The answer to one `rl` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `burst + 1`: the most requests allowed at once from a full limiter.
    pub limit: u64,
    /// Requests still allowed right now after this one.
    pub remaining: u64,
    /// Milliseconds until this request would be allowed; 0 if allowed, -1 if it never can be
    /// (a quantity above the limit).
    pub retry_after_ms: i64,
    /// Milliseconds until the limiter is back to full capacity.
    pub reset_after_ms: u64,
}

/// Nanoseconds, saturating.
fn ns(ms: u64) -> u128 {
    u128::from(ms) * 1_000_000
}

fn ceil_ms(ns: u128) -> u64 {
    u64::try_from(ns.div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// One GCRA step: given the stored TAT (None: a fresh name) and the time now (both in
/// nanoseconds on the same clock), decides the request and returns the TAT to store.
pub fn decide(tat: Option<u128>, now: u128, limit: Limit) -> (Decision, u128) {
    let emission = ns(limit.period_ms) / u128::from(limit.count.max(1));
    let emission = emission.max(1);
    // Tolerance: a full limiter accepts burst + 1 requests at once.
    let tolerance = emission * u128::from(limit.burst + 1);
    let increment = emission * u128::from(limit.quantity);
    let tat = tat.unwrap_or(now).max(now);
    let new_tat = tat + increment;
    let allow_at = new_tat.saturating_sub(tolerance);
    let remaining_after = |stored_tat: u128| -> u64 {
        // Whole emission intervals of tolerance not yet used.
        let used = stored_tat.saturating_sub(now);
        u64::try_from(tolerance.saturating_sub(used) / emission).unwrap_or(u64::MAX)
    };
    if now >= allow_at {
        let decision = Decision {
            allowed: true,
            limit: limit.burst + 1,
            remaining: remaining_after(new_tat),
            retry_after_ms: 0,
            reset_after_ms: ceil_ms(new_tat - now),
        };
        (decision, new_tat)
    } else {
        let retry_after_ms = if increment > tolerance {
            -1
        } else {
            i64::try_from(ceil_ms(allow_at - now)).unwrap_or(i64::MAX)
        };
        let decision = Decision {
            allowed: false,
            limit: limit.burst + 1,
            remaining: remaining_after(tat),
            retry_after_ms,
            reset_after_ms: ceil_ms(tat - now),
        };
        (decision, tat)
    }
}

/// Heap entries looked at per eviction slice: bounds the time one slice keeps a shard from its
/// clients (a few hundred microseconds), whatever number of names expired at once.
pub const EVICT_SLICE: usize = 4096;

/// Heap entries one `rl` of a new name may look at to make room under the memory budget before
/// it is refused: bounds what one request can cost, whatever the heap holds.
const MAKE_ROOM_TRIES: usize = 64;

/// Past this many slots, a slab less than a quarter full is compacted once nothing is due, so
/// a burst of names does not pin its peak for ever.
const COMPACT_MIN_SLOTS: usize = 1024;

/// A slab this full or fuller is left alone: compacting it costs a pause in proportion to what
/// is still stored, and this many names are few enough to rebuild in a few milliseconds.
const COMPACT_MAX_LIVE: usize = 1 << 16;

/// One name's limiter.
struct Limiter {
    /// The name, stored once (the index and the expiry heap refer to the slot).
    name: LockName,
    /// Its TAT, in nanoseconds since the shard's clock origin (a u64 lasts 584 years).
    tat: u64,
}

// A free slot costs no more than a used one: `None` lives in the name's spare tag values.
const _: () = assert!(std::mem::size_of::<Option<Limiter>>() == 32);

/// The bytes one stored limiter costs, besides its name's heap block: its slot, its index
/// entry (a slot number and a control byte) and its expiry heap entry.
pub const LIMITER_BYTES: u64 = std::mem::size_of::<Option<Limiter>>() as u64
    + std::mem::size_of::<u32>() as u64
    + crate::memory::INDEX_CONTROL
    + std::mem::size_of::<Reverse<(u64, u32)>>() as u64;

/// The bytes a limiter for `name` costs.
fn limiter_cost(name: &[u8]) -> u64 {
    LIMITER_BYTES + crate::memory::name_heap_of(name)
}

/// One shard's limiters: a slab of (name, TAT), a name index into it, and when each comes due
/// for eviction.
pub struct RateLimits {
    /// The table's hasher, for the index.
    hasher: NameHasher,
    /// Name -> slot, for every stored limiter.
    index: HashTable<u32>,
    /// The limiters; a free slot is `None` and listed in `free`.
    slots: Vec<Option<Limiter>>,
    /// Free slots, reused first.
    free: Vec<u32>,
    /// (TAT when pushed, slot): exactly one entry per stored limiter, due no later than its
    /// TAT. A limiter used since its entry was pushed is pushed back with its new TAT when the
    /// entry comes due (lazy), so a busy name costs one heap move per expiry it escapes, never
    /// one per request.
    expiry: BinaryHeap<Reverse<(u64, u32)>>,
    /// Bytes the stored limiters cost (see [`LIMITER_BYTES`]).
    bytes: u64,
    /// Limiters dropped before their time to make room under the memory budget.
    evicted: u64,
}

/// A TAT as stored (saturating: a TAT past 584 years is as good as never).
fn stored_tat(tat: u128) -> u64 {
    u64::try_from(tat).unwrap_or(u64::MAX)
}

impl RateLimits {
    pub fn new(hasher: NameHasher) -> Self {
        RateLimits {
            hasher,
            index: HashTable::new(),
            slots: Vec::new(),
            free: Vec::new(),
            expiry: BinaryHeap::new(),
            bytes: 0,
            evicted: 0,
        }
    }

    fn find(&self, hash: u64, name: &[u8]) -> Option<u32> {
        let slots = &self.slots;
        self.index
            .find(hash, |&at| {
                slots[at as usize]
                    .as_ref()
                    .is_some_and(|l| l.name.as_bytes() == name)
            })
            .copied()
    }

    /// Applies one request at time `now`. A name not stored yet is stored only if `fits` says
    /// its bytes fit (given what the limiters would then hold in all); if not, limiters soonest
    /// back to full capacity are evicted to make room. None: no room could be made (the
    /// request changed nothing).
    pub fn apply(
        &mut self,
        name: &LockName,
        now: u128,
        limit: Limit,
        fits: impl Fn(u64) -> bool,
    ) -> Option<Decision> {
        let hash = self.hasher.hash_one(name.as_bytes());
        let found = self.find(hash, name.as_bytes());
        let stored = found.and_then(|at| self.slots[at as usize].as_ref().map(|l| l.tat));
        let (decision, tat) = decide(stored.map(u128::from), now, limit);
        let tat = stored_tat(tat);
        match found {
            // Stored even when back to full capacity: the next eviction pass drops it (and
            // its heap entry with it).
            Some(at) => {
                if let Some(limiter) = self.slots[at as usize].as_mut() {
                    limiter.tat = tat;
                }
            }
            // A fresh name left at full capacity (a request of 0, or one refused) needs no
            // state.
            None if u128::from(tat) <= now => {}
            None => {
                let cost = limiter_cost(name.as_bytes());
                let mut tries = MAKE_ROOM_TRIES;
                while !fits(self.bytes + cost) {
                    if tries == 0 || !self.evict_soonest(stored_tat(now), &mut tries) {
                        return None;
                    }
                }
                self.insert(hash, name, tat);
            }
        }
        Some(decision)
    }

    fn insert(&mut self, hash: u64, name: &LockName, tat: u64) {
        let limiter = Limiter {
            name: name.clone(),
            tat,
        };
        let at = match self.free.pop() {
            Some(at) => {
                self.slots[at as usize] = Some(limiter);
                at
            }
            None => {
                self.slots.push(Some(limiter));
                u32::try_from(self.slots.len() - 1).expect("more than 4 billion limiters")
            }
        };
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.index.insert_unique(hash, at, |&other| {
            slots[other as usize]
                .as_ref()
                .map_or(0, |l| hasher.hash_one(l.name.as_bytes()))
        });
        self.expiry.push(Reverse((tat, at)));
        self.bytes += limiter_cost(name.as_bytes());
    }

    /// Drops the limiter in slot `at` (its heap entry has just been popped).
    fn remove(&mut self, at: u32) {
        let Some(limiter) = self.slots[at as usize].take() else {
            return;
        };
        let hash = self.hasher.hash_one(limiter.name.as_bytes());
        if let Ok(entry) = self.index.find_entry(hash, |&other| other == at) {
            entry.remove();
        }
        self.bytes -= limiter_cost(limiter.name.as_bytes());
        self.free.push(at);
    }

    /// Pops heap entries (counting them off `tries`) until one limiter is dropped: the one
    /// soonest back to full capacity, which loses the least by being forgotten. False when
    /// the heap is empty or the tries ran out.
    fn evict_soonest(&mut self, now: u64, tries: &mut usize) -> bool {
        while *tries > 0 {
            *tries -= 1;
            let Some(Reverse((due, at))) = self.expiry.pop() else {
                return false;
            };
            let Some(tat) = self.slots[at as usize].as_ref().map(|l| l.tat) else {
                continue;
            };
            if tat > due {
                // Used since its entry was pushed: put it back where it now belongs.
                self.expiry.push(Reverse((tat, at)));
                continue;
            }
            if tat > now {
                self.evicted += 1;
            }
            self.remove(at);
            return true;
        }
        false
    }

    /// Drops names whose limiter is back to full capacity at `now`, looking at no more than
    /// `budget` heap entries. Returns whether more are due (call again, after letting others
    /// run).
    pub fn evict_some(&mut self, now: u128, budget: usize) -> bool {
        let now = stored_tat(now);
        for _ in 0..budget {
            let Some(&Reverse((due, at))) = self.expiry.peek() else {
                return false;
            };
            if due > now {
                return false;
            }
            self.expiry.pop();
            let Some(tat) = self.slots[at as usize].as_ref().map(|l| l.tat) else {
                continue;
            };
            if tat <= now {
                self.remove(at);
            } else {
                // Used since: due again at its new TAT.
                self.expiry.push(Reverse((tat, at)));
            }
        }
        self.expiry
            .peek()
            .is_some_and(|&Reverse((due, _))| due <= now)
    }

    /// Takes every limiter not yet back to full capacity at `now`, as (name, nanoseconds its
    /// TAT is ahead of `now`), and leaves no limiter stored: what a live upgrade hands to the
    /// new process, whose clock has another origin. Limiters already back to full capacity
    /// are left out: a name with no state decides exactly as they would.
    pub fn take_all(&mut self, now: u128) -> Vec<(LockName, u64)> {
        let now = stored_tat(now);
        let fresh = RateLimits {
            evicted: self.evicted,
            ..RateLimits::new(self.hasher.clone())
        };
        std::mem::replace(self, fresh)
            .slots
            .into_iter()
            .flatten()
            .filter(|l| l.tat > now)
            .map(|l| (l.name, l.tat - now))
            .collect()
    }

    /// Stores `name`'s limiter with TAT `tat` (as taken by [`Self::take_all`] in another
    /// process, moved to this clock), outside the memory budget: the state already existed.
    /// A name already stored keeps the later of the two TATs. A TAT not after `now` needs no
    /// state and is not stored.
    pub fn restore(&mut self, name: &LockName, tat: u64, now: u128) {
        if u128::from(tat) <= now {
            return;
        }
        let hash = self.hasher.hash_one(name.as_bytes());
        match self.find(hash, name.as_bytes()) {
            Some(at) => {
                if let Some(limiter) = self.slots[at as usize].as_mut() {
                    // Its heap entry is due no later than its old TAT: still valid (lazy).
                    limiter.tat = limiter.tat.max(tat);
                }
            }
            None => self.insert(hash, name, tat),
        }
    }

    /// Counts `evicted` more limiters evicted (by another process, before an upgrade).
    pub fn add_evicted(&mut self, evicted: u64) {
        self.evicted = self.evicted.saturating_add(evicted);
    }

    /// Names with state.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes the stored limiters cost.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Limiters dropped before their time to make room under the memory budget, so far.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// What [`Self::bytes`] should be, counted afresh (for tests of the accounting).
    pub fn recount(&self) -> u64 {
        self.slots
            .iter()
            .flatten()
            .map(|l| limiter_cost(l.name.as_bytes()))
            .sum()
    }

    /// Gives back memory once most names are gone (called when nothing is due, so never in
    /// the middle of a mass expiry): a burst of names does not pin its peak for ever. With no
    /// names left everything goes; with few left, they are moved into a fresh slab.
    pub fn shrink_if_sparse(&mut self) {
        let live = self.len();
        if live == 0 {
            if self.slots.capacity() > 0 {
                *self = RateLimits {
                    evicted: self.evicted,
                    ..RateLimits::new(self.hasher.clone())
                };
            }
            return;
        }
        if self.slots.len() <= COMPACT_MIN_SLOTS
            || live >= self.slots.len() / 4
            || live > COMPACT_MAX_LIVE
        {
            return;
        }
        let old = std::mem::take(&mut self.slots);
        let mut fresh = RateLimits {
            evicted: self.evicted,
            ..RateLimits::new(self.hasher.clone())
        };
        for limiter in old.into_iter().flatten() {
            let hash = fresh.hasher.hash_one(limiter.name.as_bytes());
            fresh.insert(hash, &limiter.name, limiter.tat);
        }
        *self = fresh;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u128 = 1_000_000;

    fn limit(burst: u64, count: u64, period_ms: u64, quantity: u64) -> Limit {
        Limit {
            burst,
            count,
            period_ms,
            quantity,
        }
    }

    /// The reference: a direct simulation of "burst + 1 tokens, one token back every period /
    /// count", evaluated only at token-boundary times (where GCRA and the bucket agree).
    struct Bucket {
        tokens: f64,
        capacity: f64,
        per_ns: f64,
        last: u128,
    }

    impl Bucket {
        fn new(l: Limit) -> Self {
            Bucket {
                tokens: (l.burst + 1) as f64,
                capacity: (l.burst + 1) as f64,
                per_ns: l.count as f64 / (l.period_ms as f64 * 1e6),
                last: 0,
            }
        }

        fn take(&mut self, now: u128, quantity: u64) -> bool {
            self.tokens = (self.tokens + (now - self.last) as f64 * self.per_ns).min(self.capacity);
            self.last = now;
            if self.tokens + 1e-9 >= quantity as f64 {
                self.tokens -= quantity as f64;
                true
            } else {
                false
            }
        }
    }

    #[test]
    fn a_full_limiter_allows_burst_plus_one_then_refuses() {
        let l = limit(4, 1, 1000, 1);
        let mut tat = None;
        for expected_remaining in (0..5).rev() {
            let (d, t) = decide(tat, 0, l);
            assert!(d.allowed);
            assert_eq!(d.limit, 5);
            assert_eq!(d.remaining, expected_remaining);
            tat = Some(t);
        }
        let (d, _) = decide(tat, 0, l);
        assert!(!d.allowed);
        assert_eq!(d.remaining, 0);
        assert_eq!(d.retry_after_ms, 1000);
        assert_eq!(d.reset_after_ms, 5000);
        // One period later, exactly one more.
        let (d, t) = decide(tat, 1000 * MS, l);
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
        let (d, _) = decide(Some(t), 1000 * MS, l);
        assert!(!d.allowed);
    }

    #[test]
    fn quantities_count_as_several_requests_and_can_never_exceed_the_limit() {
        let l = limit(9, 10, 1000, 4);
        let (d, t) = decide(None, 0, l);
        assert!(d.allowed);
        assert_eq!(d.remaining, 6);
        let (d, t) = decide(Some(t), 0, l);
        assert!(d.allowed);
        assert_eq!(d.remaining, 2);
        let (d, _) = decide(Some(t), 0, l);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ms, 200);
        let (d, _) = decide(None, 0, limit(9, 10, 1000, 11));
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ms, -1);
        // Quantity 0 only asks.
        let (d, t0) = decide(Some(t), 0, limit(9, 10, 1000, 0));
        assert!(d.allowed);
        assert_eq!(t0, t);
    }

    #[test]
    fn gcra_matches_a_token_bucket_over_a_scripted_timeline() {
        let l = limit(3, 5, 1000, 1);
        let mut state = None;
        let mut bucket = Bucket::new(l);
        // Requests at multiples of the 200 ms emission interval, in bursts and gaps.
        let script: Vec<u128> = [
            0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 7, 7, 7, 7, 7, 8, 20, 20, 20, 20, 20, 20,
        ]
        .iter()
        .map(|&k| k * 200 * MS)
        .collect();
        for (step, &now) in script.iter().enumerate() {
            let (d, tat) = decide(state, now, l);
            assert_eq!(
                d.allowed,
                bucket.take(now, 1),
                "step {step} at {} ms",
                now / MS
            );
            state = Some(tat);
        }
    }

    const S: u128 = 1_000 * MS;

    /// `rl` on `name` at `now` with no memory budget.
    fn put(limits: &mut RateLimits, name: &str, now: u128, l: Limit) -> Decision {
        limits
            .apply(&LockName::from(name), now, l, |_| true)
            .expect("no budget")
    }

    /// Every stored limiter has exactly one heap entry, and the bytes add up.
    fn check(limits: &RateLimits) {
        assert_eq!(limits.expiry.len(), limits.len());
        assert_eq!(limits.bytes(), limits.recount());
    }

    #[test]
    fn reset_names_are_evicted() {
        let mut limits = RateLimits::new(crate::name_hasher());
        let l = limit(1, 1, 100_000, 1);
        for i in 0..100 {
            put(&mut limits, &format!("n{i}"), 0, l);
        }
        assert_eq!(limits.len(), 100);
        assert_eq!(limits.bytes(), 100 * LIMITER_BYTES);
        check(&limits);
        assert!(!limits.evict_some(50 * S, EVICT_SLICE));
        assert_eq!(limits.len(), 100);
        assert!(!limits.evict_some(100 * S, EVICT_SLICE));
        assert!(limits.is_empty());
        assert_eq!(limits.bytes(), 0);
        check(&limits);
    }

    #[test]
    fn eviction_is_sliced_and_spares_names_used_since() {
        let mut limits = RateLimits::new(crate::name_hasher());
        let l = limit(0, 1, 100_000, 1);
        for i in 0..1000 {
            put(&mut limits, &format!("n{i}"), 0, l);
        }
        // n0 is used again at 90 s: its TAT moves to 200 s.
        assert!(put(&mut limits, "n0", 90 * S, limit(1, 1, 100_000, 1)).allowed);
        // At 150 s all but n0 are due; slices of 300 take four calls.
        let mut calls = 0;
        while limits.evict_some(150 * S, 300) {
            calls += 1;
            assert!(calls < 10);
        }
        assert_eq!(calls, 3);
        assert_eq!(limits.len(), 1);
        check(&limits);
        // n0 kept its state: one more is refused.
        assert!(!put(&mut limits, "n0", 150 * S, limit(0, 1, 100_000, 1)).allowed);
        assert!(!limits.evict_some(300 * S, 300));
        assert!(limits.is_empty());
        // A name a request leaves at full capacity stays until the next pass, once.
        put(&mut limits, "again", 400 * S, l);
        put(&mut limits, "again", 500 * S, limit(0, 1, 100_000, 0));
        assert_eq!(limits.len(), 1);
        check(&limits);
        assert!(!limits.evict_some(500 * S, 300));
        assert!(limits.is_empty());
        put(&mut limits, "again", 500 * S, l);
        assert!(!limits.evict_some(550 * S, 300));
        assert_eq!(limits.len(), 1);
        assert!(!limits.evict_some(600 * S, 300));
        assert!(limits.is_empty());
        check(&limits);
        limits.shrink_if_sparse();
        assert_eq!(limits.slots.capacity(), 0);
    }

    #[test]
    fn a_full_budget_evicts_the_limiter_soonest_back_to_full_first() {
        let mut limits = RateLimits::new(crate::name_hasher());
        let room = 3 * LIMITER_BYTES;
        let fits = |bytes: u64| bytes <= room;
        // Periods of 300 s, 100 s and 200 s: back to full at those times.
        for (name, period_s) in [("a", 300), ("b", 100), ("c", 200)] {
            let l = limit(5, 1, period_s * 1000, 1);
            assert!(limits.apply(&LockName::from(name), 0, l, fits).is_some());
        }
        // b is used again at 10 s: its TAT moves to 200 s, a's entry is still the latest.
        assert!(put(&mut limits, "b", 10 * S, limit(5, 1, 100_000, 1)).allowed);
        // A fourth name does not fit: c (or b, both at 200 s) goes, not a.
        let l = limit(5, 1, 1000, 1);
        assert!(limits
            .apply(&LockName::from("d"), 20 * S, l, fits)
            .is_some());
        assert_eq!(limits.evicted(), 1);
        assert_eq!(limits.len(), 3);
        assert!(limits.find(limits.hasher.hash_one(b"a"), b"a").is_some());
        check(&limits);
        // Nothing can be made room for: refused, nothing changed.
        assert!(limits
            .apply(&LockName::from("e"), 20 * S, l, |_| false)
            .is_none());
        assert_eq!(limits.len(), 0, "everything was evicted trying");
        assert_eq!(limits.evicted(), 4);
        check(&limits);
        // Names already stored are never refused.
        put(&mut limits, "f", 20 * S, l);
        assert!(limits
            .apply(&LockName::from("f"), 20 * S, l, |_| false)
            .is_some());
    }

    #[test]
    fn limiters_taken_and_restored_on_another_clock_decide_as_before() {
        let mut original = RateLimits::new(crate::name_hasher());
        let l = limit(2, 1, 10_000, 1);
        // "busy" is exhausted, "half" has room for one more, "done" is back to full.
        for _ in 0..3 {
            put(&mut original, "busy", 0, l);
        }
        put(&mut original, "half", 5 * S, l);
        put(&mut original, "half", 5 * S, l);
        put(&mut original, "done", 0, limit(0, 1, 1_000, 1));
        original.evicted = 7;
        // A reference that never moves: what the limiters would have decided.
        let mut reference = RateLimits::new(crate::name_hasher());
        for _ in 0..3 {
            put(&mut reference, "busy", 0, l);
        }
        put(&mut reference, "half", 5 * S, l);
        put(&mut reference, "half", 5 * S, l);
        let taken_at = 6 * S;
        let mut taken = original.take_all(taken_at);
        taken.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            taken,
            vec![
                (LockName::from("busy"), 24 * S as u64),
                (LockName::from("half"), 19 * S as u64)
            ]
        );
        assert!(original.is_empty());
        assert_eq!(original.bytes(), 0);
        assert_eq!(original.evicted(), 7, "a running total");
        check(&original);
        // The new clock's origin is 1000 s later.
        let offset = 1000 * S;
        let mut restored = RateLimits::new(crate::name_hasher());
        for (name, ahead) in &taken {
            restored.restore(
                name,
                stored_tat(offset + taken_at) + ahead,
                offset + taken_at,
            );
        }
        check(&restored);
        assert_eq!(restored.len(), 2);
        for step in 0..40u128 {
            let at = taken_at + step * S / 2;
            for name in ["busy", "half", "done"] {
                assert_eq!(
                    put(&mut restored, name, offset + at, l),
                    put(&mut reference, name, at, l),
                    "{name} at {} ms",
                    at / MS
                );
            }
        }
        check(&restored);
    }

    #[test]
    fn compaction_keeps_every_limiter_and_its_expiry() {
        let mut limits = RateLimits::new(crate::name_hasher());
        let short = limit(0, 1, 1_000, 1);
        let long = limit(0, 1, 1_000_000, 1);
        for i in 0..5000 {
            let l = if i % 10 == 0 { long } else { short };
            put(&mut limits, &format!("a long name, on the heap: {i}"), 0, l);
        }
        while limits.evict_some(2 * S, EVICT_SLICE) {}
        assert_eq!(limits.len(), 500);
        limits.shrink_if_sparse();
        assert_eq!(limits.slots.len(), 500);
        check(&limits);
        assert!(!put(&mut limits, "a long name, on the heap: 10", 3 * S, long).allowed);
        assert!(!limits.evict_some(1000 * S, EVICT_SLICE));
        assert!(limits.is_empty());
    }
}
