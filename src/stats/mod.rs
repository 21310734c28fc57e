//! Lock-free stats: one cache-padded cell of counters per shard thread, summed when read.
//!
//! Every cell has exactly one writer, the shard thread that owns it (a connection's commands
//! are counted by the thread the connection lives on; lock and orphan counts by the thread that
//! owns the table shard). A single writer needs no read-modify-write instruction: a counter is
//! bumped with a plain load and store, and readers on other threads see each store whole. `q`
//! reads every cell without sending any message, so it never waits behind a busy shard.
//!
//! - [`histograms`]: command latency and lock wait buckets.
//! - [`outcomes`]: replies to lock commands by result, and why connections were turned away
//!   or closed by the server.

mod histograms;
mod outcomes;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use crate::peer::DoorKind;
use crate::protocol::{Class, Reply, Verb, WaitKind};
use crate::users::AuthResult;

pub use histograms::{
    latency_bucket_ns, wait_buckets_for, Latency, LatencySnapshot, WaitSnapshot, WaitTime,
    LATENCY_BUCKETS, WAIT_BUCKETS, WAIT_BUCKETS_NS,
};
pub use outcomes::{CloseReason, LockResult, RefuseReason};

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
    /// `rl` limiters this shard dropped before their time to make room under `--max-memory`.
    pub rate_limit_evictions: Counter,
    /// Bytes this shard's table holds, exactly as accounted (a gauge; see [`crate::memory`]).
    pub memory_used: Counter,
    /// `iam` names refused by connections on this thread because they did not fit in
    /// `--max-memory`.
    pub iam_out_of_memory: Counter,
    /// Per command word, the time from reading a command to its reply being ready, for
    /// connections on this thread (recorded only while the metrics endpoint is on). Time spent
    /// waiting for a lock is left out: it is in `lock_wait`.
    pub latency: [Latency; Verb::COUNT],
    /// Replies to lock commands by command word and [`LockResult`]. Counted by the thread that
    /// produced the reply: the shard that owns the name, except for waits and usage errors,
    /// which the connection's thread answers.
    pub lock_results: [[Counter; LockResult::COUNT]; Verb::COUNT],
    /// How long answered `gw` (0) and `sgw` (1) waits took, for connections on this thread.
    pub lock_wait: [WaitTime; 2],
    /// Connections this thread turned away as they arrived, by [`RefuseReason`].
    pub connections_refused: [Counter; RefuseReason::COUNT],
    /// Connections on this thread the server closed, by [`CloseReason`].
    pub connections_closed_by: [Counter; CloseReason::COUNT],
    /// Accepts that failed on this thread (out of file descriptors, mostly).
    pub accept_errors: Counter,
    /// With a users file: `auth` results and connections their door mapped to a user, for
    /// connections on this thread, by door and [`AuthResult`].
    pub auth: [[Counter; AuthResult::COUNT]; DoorKind::COUNT],
    /// With a users file: commands answered `0 Permission Denied`, by door and class.
    pub permission_denied: [[Counter; Class::COUNT]; DoorKind::COUNT],
    /// With a users file: commands answered `0 Auth Required`, by door.
    pub auth_required: [Counter; DoorKind::COUNT],
}

impl ShardCell {
    /// Counts the reply to a lock command and hands it back, so the count sits where the reply
    /// is made. Two array indexes and a plain store: cheap at millions of commands a second.
    #[inline]
    pub fn counted(&self, verb: Verb, reply: Reply) -> Reply {
        self.lock_results[verb.index()][LockResult::of(reply) as usize].add(1);
        reply
    }

    /// A `gw`/`sgw` asked at `asked` was answered `reply` just now: counts the reply, records
    /// the wait, and returns its length, which the caller leaves out of its batch's latency
    /// (an `i` pipelined behind a long `gw` did not take that long to run).
    pub fn waited(&self, kind: WaitKind, reply: Reply, asked: Instant) -> Duration {
        let waited = asked.elapsed();
        let (verb, at) = match kind {
            WaitKind::Exclusive => (Verb::GetWait, 0),
            WaitKind::Shared { .. } => (Verb::SharedGetWait, 1),
        };
        self.counted(verb, reply);
        self.lock_wait[at].record(u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX));
        waited
    }

    /// Counts a connection the server closed, and why.
    pub fn closed_because(&self, reason: CloseReason) {
        self.connections_closed_by[reason as usize].add(1);
    }

    /// Counts a connection turned away as it arrived, and why.
    pub fn refused(&self, reason: RefuseReason) {
        self.connections_refused[reason as usize].add(1);
    }

    /// Lock operations this shard's table applied: every lock command routed here (counted by
    /// result, which is always counted on the owning shard) and every wait started here. What
    /// a hot shard shows up in.
    pub fn operations(&self) -> u64 {
        let applied: u64 = Verb::ALL
            .iter()
            .filter(|verb| !matches!(verb, Verb::GetWait | Verb::SharedGetWait))
            .flat_map(|verb| {
                // Usage errors are answered by the connection's thread, not by a shard.
                self.lock_results[verb.index()][..LockResult::Usage as usize].iter()
            })
            .map(Counter::get)
            .sum();
        applied + self.lock_waits_started.get()
    }
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

/// What became of requests and connections, summed over every shard (not part of `q`, whose
/// keys stay those of the original server and its extensions).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcomes {
    /// Replies to lock commands, by command word and result.
    pub lock_results: [[u64; LockResult::COUNT]; Verb::COUNT],
    pub connections_refused: [u64; RefuseReason::COUNT],
    pub connections_closed_by: [u64; CloseReason::COUNT],
    /// Every connection that ended, for whatever reason.
    pub connections_closed: u64,
    pub accept_errors: u64,
}

/// What the users file decided, summed over every shard (see [`ShardCell::auth`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UsersCounts {
    pub auth: [[u64; AuthResult::COUNT]; DoorKind::COUNT],
    pub permission_denied: [[u64; Class::COUNT]; DoorKind::COUNT],
    pub auth_required: [u64; DoorKind::COUNT],
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

    /// `gw` (0) and `sgw` (1) wait times, summed over every shard.
    pub fn lock_waits(&self) -> [WaitSnapshot; 2] {
        let mut out = [WaitSnapshot::default(); 2];
        for cell in self.cells.iter() {
            for (sum, wait) in out.iter_mut().zip(cell.lock_wait.iter()) {
                for (b, counter) in sum.buckets.iter_mut().zip(wait.buckets.iter()) {
                    *b += counter.get();
                }
                sum.sum_ns += wait.sum_ns.get();
            }
        }
        out
    }

    /// Replies by result and the fates of connections, summed over every shard.
    pub fn outcomes(&self) -> Outcomes {
        let mut out = Outcomes::default();
        for cell in self.cells.iter() {
            for (sums, counters) in out.lock_results.iter_mut().zip(cell.lock_results.iter()) {
                for (sum, counter) in sums.iter_mut().zip(counters.iter()) {
                    *sum += counter.get();
                }
            }
            for (sum, counter) in out
                .connections_refused
                .iter_mut()
                .zip(cell.connections_refused.iter())
            {
                *sum += counter.get();
            }
            for (sum, counter) in out
                .connections_closed_by
                .iter_mut()
                .zip(cell.connections_closed_by.iter())
            {
                *sum += counter.get();
            }
            out.connections_closed += cell.connections_closed.get();
            out.accept_errors += cell.accept_errors.get();
        }
        out
    }

    /// The users counters, summed over every shard.
    pub fn users(&self) -> UsersCounts {
        let mut out = UsersCounts::default();
        for cell in self.cells.iter() {
            for door in DoorKind::ALL {
                let at = door.index();
                for result in AuthResult::ALL {
                    out.auth[at][result as usize] += cell.auth[at][result as usize].get();
                }
                for class in Class::ALL {
                    out.permission_denied[at][class.index()] +=
                        cell.permission_denied[at][class.index()].get();
                }
                out.auth_required[at] += cell.auth_required[at].get();
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
        // About 40 lines of 20 bytes: one reservation, not a growth check that reallocates.
        out.reserve(1024);
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
    fn latency_is_summed_over_shards() {
        let stats = Stats::new(2);
        stats.cell(0).latency[Verb::Get.index()].record(3, 3000);
        stats.cell(1).latency[Verb::Get.index()].record(1, 50_000_000_000);
        let get = stats.latency()[Verb::Get.index()];
        assert_eq!(get.count(), 4);
        assert_eq!(get.buckets[1], 3);
        assert_eq!(get.buckets[LATENCY_BUCKETS], 1);
        assert_eq!(get.sum_ns, 50_000_009_000);
    }

    #[test]
    fn replies_are_counted_by_result_and_a_shard_counts_what_it_applied() {
        let stats = Stats::new(2);
        let (a, b) = (stats.cell(0), stats.cell(1));
        assert_eq!(a.counted(Verb::Get, Reply::NotGot), Reply::NotGot);
        a.counted(Verb::Get, Reply::Got);
        b.counted(Verb::Get, Reply::NotGot);
        b.counted(Verb::SharedGetLimit, Reply::SharedFull);
        // Answered by the connection's thread: not operations of its shard.
        b.counted(Verb::RateLimit, Reply::Usage(Verb::RateLimit));
        let asked = Instant::now() - Duration::from_millis(30);
        let waited = a.waited(WaitKind::Exclusive, Reply::TimedOut, asked);
        assert!(waited >= Duration::from_millis(30));
        b.lock_waits_started.add(1);
        let outcomes = stats.outcomes();
        let get = outcomes.lock_results[Verb::Get.index()];
        assert_eq!(get[LockResult::Refused as usize], 2);
        assert_eq!(get[LockResult::Granted as usize], 1);
        let gw = outcomes.lock_results[Verb::GetWait.index()];
        assert_eq!(gw[LockResult::TimedOut as usize], 1);
        assert_eq!(a.operations(), 2);
        assert_eq!(b.operations(), 3);
        let waits = stats.lock_waits();
        assert_eq!(waits[0].count(), 1);
        assert_eq!(waits[1].count(), 0);
        // 30 ms and a little: the 50 ms bucket.
        assert_eq!(waits[0].buckets[8], 1, "{:?}", waits[0]);
        a.refused(RefuseReason::MaxConnections);
        b.closed_because(CloseReason::IdleTimeout);
        b.connections_closed.add(2);
        let outcomes = stats.outcomes();
        assert_eq!(outcomes.connections_refused, [1, 0]);
        assert_eq!(outcomes.connections_closed_by, [0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(outcomes.connections_closed, 2);
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
