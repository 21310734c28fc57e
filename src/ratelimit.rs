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
//! has an entry in a min-heap of expiry times, made when the name is stored. An entry that
//! comes due for a name whose TAT has moved on since is pushed back with the new TAT (lazy
//! deletion), so a busy name costs one heap move per expiry it escapes, never one per request.

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

/// One name's limiter.
struct Limiter {
    /// The name, stored once (the expiry heap finds it by its hash).
    name: LockName,
    /// Its TAT, in nanoseconds since the shard's clock origin (a u64 lasts 584 years).
    tat: u64,
}

/// One shard's limiters: name -> TAT, and when each comes due for eviction.
pub struct RateLimits {
    /// The table's hasher: the expiry heap keeps the hash, not the name.
    hasher: NameHasher,
    /// Every name with state.
    limiters: HashTable<Limiter>,
    /// (TAT when pushed, name's hash): at least one entry per stored name, due no later than
    /// its TAT. The hash finds the name again without a copy of it.
    expiry: BinaryHeap<Reverse<(u64, u64)>>,
}

/// A TAT as stored (saturating: a TAT past 584 years is as good as never).
fn stored_tat(tat: u128) -> u64 {
    u64::try_from(tat).unwrap_or(u64::MAX)
}

impl RateLimits {
    pub fn new(hasher: NameHasher) -> Self {
        RateLimits {
            hasher,
            limiters: HashTable::new(),
            expiry: BinaryHeap::new(),
        }
    }

    /// Applies one request at time `now`.
    pub fn apply(&mut self, name: &LockName, now: u128, limit: Limit) -> Decision {
        let hash = self.hasher.hash_one(name.as_bytes());
        let same = |l: &Limiter| l.name.as_bytes() == name.as_bytes();
        let stored = self.limiters.find(hash, same).map(|l| u128::from(l.tat));
        let (decision, tat) = decide(stored, now, limit);
        if tat > now {
            let tat = stored_tat(tat);
            match self.limiters.find_mut(hash, same) {
                Some(limiter) => limiter.tat = tat,
                None => {
                    let hasher = &self.hasher;
                    self.limiters.insert_unique(
                        hash,
                        Limiter {
                            name: name.clone(),
                            tat,
                        },
                        |l| hasher.hash_one(l.name.as_bytes()),
                    );
                    self.expiry.push(Reverse((tat, hash)));
                }
            }
        } else if stored.is_some() {
            // Back to full capacity: as good as never seen. Its heap entry finds nothing.
            if let Ok(entry) = self.limiters.find_entry(hash, same) {
                entry.remove();
            }
        }
        decision
    }

    /// Drops names whose limiter is back to full capacity at `now`, looking at no more than
    /// `budget` heap entries. Returns whether more are due (call again, after letting others
    /// run).
    pub fn evict_some(&mut self, now: u128, budget: usize) -> bool {
        let now = stored_tat(now);
        for _ in 0..budget {
            let Some(&Reverse((due, hash))) = self.expiry.peek() else {
                return false;
            };
            if due > now {
                return false;
            }
            self.expiry.pop();
            let hasher = &self.hasher;
            // The name that pushed this entry, if it is still stored (another name of the same
            // 64-bit hash has its own entry, and is as good a find).
            let found = self
                .limiters
                .find_entry(hash, |l| hasher.hash_one(l.name.as_bytes()) == hash);
            if let Ok(entry) = found {
                let tat = entry.get().tat;
                if tat <= now {
                    entry.remove();
                } else {
                    // Used since: due again at its new TAT.
                    self.expiry.push(Reverse((tat, hash)));
                }
            }
        }
        self.expiry
            .peek()
            .is_some_and(|&Reverse((due, _))| due <= now)
    }

    /// Names with state.
    pub fn len(&self) -> usize {
        self.limiters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiters.is_empty()
    }

    /// Gives back memory once most names are gone (called when nothing is due, so never in
    /// the middle of a mass expiry): a burst of names does not pin its peak for ever.
    pub fn shrink_if_sparse(&mut self) {
        if self.limiters.capacity() > 1024 && self.limiters.len() < self.limiters.capacity() / 4 {
            let hasher = &self.hasher;
            self.limiters
                .shrink_to_fit(|l| hasher.hash_one(l.name.as_bytes()));
            self.expiry.shrink_to_fit();
        }
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

    #[test]
    fn reset_names_are_evicted() {
        let mut limits = RateLimits::new(crate::name_hasher());
        let l = limit(1, 1, 100, 1);
        for i in 0..100 {
            limits.apply(&LockName::from(format!("n{i}").as_str()), 0, l);
        }
        assert_eq!(limits.len(), 100);
        assert!(!limits.evict_some(50 * MS, EVICT_SLICE));
        assert_eq!(limits.len(), 100);
        assert!(!limits.evict_some(100 * MS, EVICT_SLICE));
        assert!(limits.is_empty());
    }

    #[test]
    fn eviction_is_sliced_and_spares_names_used_since() {
        let mut limits = RateLimits::new(crate::name_hasher());
        let l = limit(0, 1, 100, 1);
        for i in 0..1000 {
            limits.apply(&LockName::from(format!("n{i}").as_str()), 0, l);
        }
        // n0 is used again at 90 ms: its TAT moves to 200 ms.
        assert!(
            limits
                .apply(&LockName::from("n0"), 90 * MS, limit(1, 1, 100, 1))
                .allowed
        );
        // At 150 ms all but n0 are due; slices of 300 take four calls.
        let mut calls = 0;
        while limits.evict_some(150 * MS, 300) {
            calls += 1;
            assert!(calls < 10);
        }
        assert_eq!(calls, 3);
        assert_eq!(limits.len(), 1);
        // n0 kept its state: one more is refused.
        assert!(
            !limits
                .apply(&LockName::from("n0"), 150 * MS, limit(0, 1, 100, 1))
                .allowed
        );
        assert!(!limits.evict_some(300 * MS, 300));
        assert!(limits.is_empty());
        // A name dropped by a request and stored again is evicted once, not twice.
        limits.apply(&LockName::from("again"), 400 * MS, l);
        limits.apply(&LockName::from("again"), 500 * MS, limit(0, 1, 100, 0));
        assert!(limits.is_empty());
        limits.apply(&LockName::from("again"), 500 * MS, l);
        assert!(!limits.evict_some(550 * MS, 300));
        assert_eq!(limits.len(), 1);
        assert!(!limits.evict_some(600 * MS, 300));
        assert!(limits.is_empty());
        limits.shrink_if_sparse();
    }
}
