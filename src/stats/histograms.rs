//! Fixed-bucket histograms, one per shard thread and single writer like every other counter:
//! recording is a few plain stores, memory never grows, and the endpoint merges the shards'
//! buckets when it is scraped.
//!
//! Two shapes: command latency, in powers of two from 2 µs (a command is microseconds; only a
//! slow batch takes seconds), and lock waits, in 1-2.5-5 steps from 100 µs to days (a `gw` may
//! wait as long as `-max-wait-ms`, an hour by default), so that a wait of any allowed length
//! lands in a finite bucket.

use super::Counter;

/// Finite latency buckets: bucket `i` counts durations up to 2^(i+11) ns, from 2.048 µs to
/// 17.2 s; one more bucket counts everything slower. Waiting for a lock is not part of a
/// command's latency (see [`super::ShardCell::waited`]), so only a pathological batch (a listing
/// of millions of locks, a shard stalled at the fencing ceiling) reaches the top.
pub const LATENCY_BUCKETS: usize = 24;

/// The upper bound of latency bucket `i`, in nanoseconds.
pub fn latency_bucket_ns(i: usize) -> u64 {
    1 << (i + 11)
}

/// The bucket a duration of `ns` nanoseconds falls in (`LATENCY_BUCKETS` for the overflow).
#[inline]
pub(super) fn latency_bucket(ns: u64) -> usize {
    // ceil(log2(ns)) - 11, clamped: one instruction, no search.
    let ceil_log2 = 64 - ns.saturating_sub(1).leading_zeros() as usize;
    ceil_log2.saturating_sub(11).min(LATENCY_BUCKETS)
}

/// One command word's latency histogram in one shard.
#[derive(Default)]
pub struct Latency {
    /// Per bucket (not cumulative); the last one is the overflow.
    pub buckets: [Counter; LATENCY_BUCKETS + 1],
    /// Total of all recorded durations, in nanoseconds.
    pub sum_ns: Counter,
}

impl Latency {
    /// Records `count` commands that each took `ns` nanoseconds.
    #[inline]
    pub fn record(&self, count: u64, ns: u64) {
        self.buckets[latency_bucket(ns)].add(count);
        self.sum_ns.add(count.saturating_mul(ns));
    }
}

/// One command word's latency summed over every shard.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LatencySnapshot {
    pub buckets: [u64; LATENCY_BUCKETS + 1],
    pub sum_ns: u64,
}

impl LatencySnapshot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// Finite lock wait buckets: 1, 2.5 and 5 times every power of ten from 100 µs, up to 10^6 s
/// (11.6 days, past any sensible `-max-wait-ms`). Round numbers, so that an alert or a query
/// can name a bucket (`le="1"`, `le="10"`).
pub const WAIT_BUCKETS: usize = 31;

/// The upper bounds of the lock wait buckets, in nanoseconds.
pub const WAIT_BUCKETS_NS: [u64; WAIT_BUCKETS] = wait_bounds();

const fn wait_bounds() -> [u64; WAIT_BUCKETS] {
    let mut out = [0; WAIT_BUCKETS];
    let mut decade = 100_000;
    let mut i = 0;
    while i < WAIT_BUCKETS {
        out[i] = match i % 3 {
            0 => decade,
            1 => decade * 5 / 2,
            _ => decade * 5,
        };
        if i % 3 == 2 {
            decade *= 10;
        }
        i += 1;
    }
    out
}

/// How many wait buckets a server whose longest wait is `max_wait_ms` exports: every bucket up
/// to the first that holds a wait of that length, so the slowest allowed wait is still in a
/// finite bucket and nothing longer is exported for nothing.
pub fn wait_buckets_for(max_wait_ms: u64) -> usize {
    let max_ns = max_wait_ms.saturating_mul(1_000_000);
    (WAIT_BUCKETS_NS.partition_point(|&bound| bound < max_ns) + 1).min(WAIT_BUCKETS)
}

/// How long one kind of wait (`gw` or `sgw`) took, in one shard.
#[derive(Default)]
pub struct WaitTime {
    /// Per bucket (not cumulative); the last one is the overflow.
    pub buckets: [Counter; WAIT_BUCKETS + 1],
    /// Total of all recorded waits, in nanoseconds.
    pub sum_ns: Counter,
}

impl WaitTime {
    /// Records one wait of `ns` nanoseconds. A binary search over 31 bounds: waits are rare
    /// next to commands, and this keeps the bounds round.
    pub fn record(&self, ns: u64) {
        self.buckets[WAIT_BUCKETS_NS.partition_point(|&bound| bound < ns)].add(1);
        self.sum_ns.add(ns);
    }
}

/// One kind of wait summed over every shard.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WaitSnapshot {
    pub buckets: [u64; WAIT_BUCKETS + 1],
    pub sum_ns: u64,
}

impl WaitSnapshot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_powers_of_two_from_two_microseconds() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(2048), 0);
        assert_eq!(latency_bucket(2049), 1);
        assert_eq!(latency_bucket(4096), 1);
        assert_eq!(latency_bucket(1 << 34), LATENCY_BUCKETS - 1);
        assert_eq!(latency_bucket((1 << 34) + 1), LATENCY_BUCKETS);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS);
        for i in 0..LATENCY_BUCKETS {
            assert_eq!(latency_bucket(latency_bucket_ns(i)), i);
            assert_eq!(latency_bucket(latency_bucket_ns(i) + 1), i + 1);
        }
        // A wait of 2.5 s, had it been counted as latency, is no longer in the overflow.
        assert!(latency_bucket(2_500_000_000) < LATENCY_BUCKETS);
    }

    #[test]
    fn wait_buckets_are_round_and_reach_the_longest_wait() {
        assert_eq!(WAIT_BUCKETS_NS[0], 100_000);
        assert_eq!(WAIT_BUCKETS_NS[1], 250_000);
        assert_eq!(WAIT_BUCKETS_NS[2], 500_000);
        assert_eq!(WAIT_BUCKETS_NS[3], 1_000_000);
        assert_eq!(WAIT_BUCKETS_NS[WAIT_BUCKETS - 1], 1_000_000_000_000_000);
        assert!(WAIT_BUCKETS_NS.windows(2).all(|w| w[0] < w[1]));
        // The default -max-wait-ms (an hour) ends at the 5000 s bucket.
        let n = wait_buckets_for(3_600_000);
        assert_eq!(WAIT_BUCKETS_NS[n - 1], 5_000_000_000_000);
        // A bound equal to the longest wait is enough.
        assert_eq!(WAIT_BUCKETS_NS[wait_buckets_for(1000) - 1], 1_000_000_000);
        assert_eq!(wait_buckets_for(0), 1);
        assert_eq!(wait_buckets_for(u64::MAX), WAIT_BUCKETS);
        let wait = WaitTime::default();
        wait.record(1);
        wait.record(100_000);
        wait.record(100_001);
        wait.record(u64::MAX / 2);
        let buckets: Vec<u64> = wait.buckets.iter().map(Counter::get).collect();
        assert_eq!(buckets[0], 2);
        assert_eq!(buckets[1], 1);
        assert_eq!(buckets[WAIT_BUCKETS], 1);
    }
}
