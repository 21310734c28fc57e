//! `rl`: a generic cell rate algorithm (GCRA) limiter, as redis-cell's `CL.THROTTLE`.
//!
//! A name allows `count` requests per `period`, with bursts of up to `burst` requests beyond the
//! steady rate. The whole state of a name is one number, its theoretical arrival time (TAT): the
//! time at which the limiter would be back to full burst capacity. A request of `quantity` is
//! allowed if, after adding `quantity` emission intervals to the TAT, the TAT is still within the
//! burst tolerance of now. Names whose TAT has passed are back to their initial state, so they are
//! dropped ([`RateLimits::evict`]) and memory does not grow with the names ever seen.

use std::collections::HashMap;

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

/// One shard's limiters: name -> TAT (nanoseconds since the shard's clock origin).
pub struct RateLimits {
    tats: HashMap<LockName, u128, NameHasher>,
}

impl RateLimits {
    pub fn new(hasher: NameHasher) -> Self {
        RateLimits {
            tats: HashMap::with_hasher(hasher),
        }
    }

    /// Applies one request at time `now`.
    pub fn apply(&mut self, name: &LockName, now: u128, limit: Limit) -> Decision {
        let stored = self.tats.get(name.as_bytes()).copied();
        let (decision, tat) = decide(stored, now, limit);
        if tat > now {
            match self.tats.get_mut(name.as_bytes()) {
                Some(slot) => *slot = tat,
                None => {
                    self.tats.insert(name.clone(), tat);
                }
            }
        } else if stored.is_some() {
            self.tats.remove(name.as_bytes());
        }
        decision
    }

    /// Drops every name whose limiter is back to full capacity at `now`.
    pub fn evict(&mut self, now: u128) {
        self.tats.retain(|_, tat| *tat > now);
    }

    /// Names with state.
    pub fn len(&self) -> usize {
        self.tats.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tats.is_empty()
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
        limits.evict(50 * MS);
        assert_eq!(limits.len(), 100);
        limits.evict(100 * MS);
        assert!(limits.is_empty());
    }
}
