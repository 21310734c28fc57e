//! Lock-free stats: one cache-padded cell of counters per shard thread, summed when read.
//!
//! Every cell has exactly one writer, the shard thread that owns it (a connection's commands
//! are counted by the thread the connection lives on; lock and orphan counts by the thread that
//! owns the table shard). A single writer needs no read-modify-write instruction: a counter is
//! bumped with a plain load and store, and readers on other threads see each store whole. `q`
//! reads every cell without sending any message, so it never waits behind a busy shard.

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

use crate::protocol::Verb;

/// A counter written by one thread only (see the module docs), read by any.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Must only be called from the cell's owning thread: two writers would lose
    /// updates (never memory safety, only counts).
    #[inline]
    pub fn add(&self, n: u64) {
        let now = self.0.load(Ordering::Relaxed);
        self.0.store(now.wrapping_add(n), Ordering::Release);
    }

    /// Sets the value (for gauges the owner recomputes, like table sizes).
    #[inline]
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Release);
    }

    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// Finite latency buckets: bucket `i` counts durations up to 2^(i+11) ns, from 2.048 µs to
/// 1.07 s; one more bucket counts everything slower.
pub const LATENCY_BUCKETS: usize = 20;

/// The upper bound of latency bucket `i`, in nanoseconds.
pub fn latency_bucket_ns(i: usize) -> u64 {
    1 << (i + 11)
}

/// The bucket a duration of `ns` nanoseconds falls in (`LATENCY_BUCKETS` for the overflow).
#[inline]
fn latency_bucket(ns: u64) -> usize {
    // ceil(log2(ns)) - 11, clamped: one instruction, no search.
    let ceil_log2 = 64 - ns.saturating_sub(1).leading_zeros() as usize;
    ceil_log2.saturating_sub(11).min(LATENCY_BUCKETS)
}

/// One command word's latency histogram in one shard: fixed buckets, single writer, so
/// recording is a few plain stores and memory never grows.
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

/// The counters one shard thread owns.
#[derive(Default)]
pub struct ShardCell {
    /// Commands by verb, counted where they were read.
    pub commands: [Counter; Verb::COUNT],
    /// Lines whose command word is unknown.
    pub invalid_commands: Counter,
    /// Connections that began on this thread.
    pub connections_opened: Counter,
    /// Connections that ended on this thread.
    pub connections_closed: Counter,
    /// Exclusive locks held in this shard's table (a gauge the shard sets after each change).
    pub locks: Counter,
    /// Shared lock names with holders in this shard's table (a gauge).
    pub shared_locks: Counter,
    /// Exclusive locks this shard released because their holder went away.
    pub orphans: Counter,
    /// Shared locks this shard released because their holder went away.
    pub shared_orphans: Counter,
    /// Lock commands from connections on this thread run on this thread's own shard.
    pub local_commands: Counter,
    /// Lock commands from connections on this thread sent to another shard's mailbox.
    pub remote_commands: Counter,
    /// Batches this shard's mailbox received.
    pub mailbox_messages: Counter,
    /// Lock commands in those batches (divided by the messages: the batching factor).
    pub mailbox_commands: Counter,
    /// Connections waiting for a lock of this shard now (a gauge).
    pub lock_waiters: Counter,
    /// `gw`/`sgw` requests this shard took.
    pub lock_waits_started: Counter,
    /// Of those, granted (at once or later).
    pub lock_waits_granted: Counter,
    /// Of those, timed out.
    pub lock_waits_timed_out: Counter,
    /// `rl` decisions of this shard, allowed and limited.
    pub rate_limit_allowed: Counter,
    pub rate_limit_limited: Counter,
    /// Per command word, the time from reading a command to its reply being ready, for
    /// connections on this thread (recorded only while the metrics endpoint is on).
    pub latency: [Latency; Verb::COUNT],
}

/// All shards' cells.
pub struct Stats {
    cells: Box<[CachePadded<ShardCell>]>,
}

/// The stats summed over every shard at one moment.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub commands: [u64; Verb::COUNT],
    pub invalid_commands: u64,
    /// Connections open now.
    pub connections: u64,
    /// Connections accepted since start.
    pub connections_total: u64,
    pub locks: u64,
    pub shared_locks: u64,
    pub orphans: u64,
    pub shared_orphans: u64,
    pub lock_waiters: u64,
    pub lock_waits_started: u64,
    pub lock_waits_granted: u64,
    pub lock_waits_timed_out: u64,
    pub rate_limit_allowed: u64,
    pub rate_limit_limited: u64,
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

impl Stats {
    pub fn new(shards: usize) -> Self {
        Stats {
            cells: (0..shards).map(|_| CachePadded::default()).collect(),
        }
    }

    /// Shard `shard`'s cell. Only that shard's thread may write to it.
    #[inline]
    pub fn cell(&self, shard: usize) -> &ShardCell {
        &self.cells[shard]
    }

    /// Number of cells (shards).
    pub fn shards(&self) -> usize {
        self.cells.len()
    }

    /// Every cell, in shard order.
    pub fn cells(&self) -> impl Iterator<Item = &ShardCell> {
        self.cells.iter().map(|c| &**c)
    }

    /// Latency histograms per command word, summed over every shard.
    pub fn latency(&self) -> [LatencySnapshot; Verb::COUNT] {
        let mut out = [LatencySnapshot::default(); Verb::COUNT];
        for cell in self.cells.iter() {
            for (sum, latency) in out.iter_mut().zip(cell.latency.iter()) {
                for (b, counter) in sum.buckets.iter_mut().zip(latency.buckets.iter()) {
                    *b += counter.get();
                }
                sum.sum_ns += latency.sum_ns.get();
            }
        }
        out
    }

    /// Sums every cell.
    pub fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        let mut closed = 0u64;
        for cell in self.cells.iter() {
            for (sum, counter) in s.commands.iter_mut().zip(cell.commands.iter()) {
                *sum += counter.get();
            }
            s.invalid_commands += cell.invalid_commands.get();
            // Read "closed" before "opened" everywhere so a connection that opens and closes
            // during the read can only make the open count look higher, never underflow.
            closed += cell.connections_closed.get();
            s.connections_total += cell.connections_opened.get();
            s.locks += cell.locks.get();
            s.shared_locks += cell.shared_locks.get();
            s.orphans += cell.orphans.get();
            s.shared_orphans += cell.shared_orphans.get();
            s.lock_waiters += cell.lock_waiters.get();
            s.lock_waits_started += cell.lock_waits_started.get();
            s.lock_waits_granted += cell.lock_waits_granted.get();
            s.lock_waits_timed_out += cell.lock_waits_timed_out.get();
            s.rate_limit_allowed += cell.rate_limit_allowed.get();
            s.rate_limit_limited += cell.rate_limit_limited.get();
        }
        s.connections = s.connections_total.saturating_sub(closed);
        s
    }
}

impl Snapshot {
    /// The `q` reply: sorted `key: value` lines.
    pub fn render(&self, out: &mut Vec<u8>) {
        let mut line = |prefix: &str, key: &str, value: u64| {
            out.extend_from_slice(prefix.as_bytes());
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
            out.push(b'\n');
        };
        // Verb::ALL is sorted by word, and every "command_" key sorts before the others.
        for verb in Verb::ALL {
            line("command_", verb.word(), self.commands[verb.index()]);
        }
        line("", "connections", self.connections);
        line("", "invalid_commands", self.invalid_commands);
        line("", "lock_waiters", self.lock_waiters);
        line("", "lock_waits_granted", self.lock_waits_granted);
        line("", "lock_waits_started", self.lock_waits_started);
        line("", "lock_waits_timed_out", self.lock_waits_timed_out);
        line("", "locks", self.locks);
        line("", "orphans", self.orphans);
        line("", "rate_limit_allowed", self.rate_limit_allowed);
        line("", "rate_limit_limited", self.rate_limit_limited);
        // Last, as in the original: clients read `q` up to this line.
        line("", "shared_locks", self.shared_locks);
        line("", "shared_orphans", self.shared_orphans);
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
        assert_eq!(latency_bucket(1 << 30), LATENCY_BUCKETS - 1);
        assert_eq!(latency_bucket((1 << 30) + 1), LATENCY_BUCKETS);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS);
        for i in 0..LATENCY_BUCKETS {
            assert_eq!(latency_bucket(latency_bucket_ns(i)), i);
            assert_eq!(latency_bucket(latency_bucket_ns(i) + 1), i + 1);
        }
        let stats = Stats::new(2);
        stats.cell(0).latency[Verb::Get.index()].record(3, 3000);
        stats.cell(1).latency[Verb::Get.index()].record(1, 5_000_000_000);
        let get = stats.latency()[Verb::Get.index()];
        assert_eq!(get.count(), 4);
        assert_eq!(get.buckets[1], 3);
        assert_eq!(get.buckets[LATENCY_BUCKETS], 1);
        assert_eq!(get.sum_ns, 5_000_009_000);
    }

    #[test]
    fn q_lists_every_key_sorted() {
        let stats = Stats::new(2);
        stats.cell(0).commands[Verb::Get.index()].add(2);
        stats.cell(1).commands[Verb::Get.index()].add(3);
        stats.cell(1).connections_opened.add(2);
        stats.cell(1).connections_closed.add(1);
        stats.cell(0).locks.set(7);
        let mut out = Vec::new();
        stats.snapshot().render(&mut out);
        let text = String::from_utf8(out).unwrap();
        let keys: Vec<&str> = text.lines().map(|l| l.split(':').next().unwrap()).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(keys.len(), Verb::COUNT + 12);
        assert_eq!(keys.last(), Some(&"shared_orphans"));
        assert!(text.contains("command_g: 5\n"));
        assert!(text.contains("connections: 1\n"));
        assert!(text.contains("locks: 7\n"));
    }
}
