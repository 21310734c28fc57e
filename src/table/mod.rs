//! `ShardTable`: one shard's locks, and for every connection the locks it holds here.
//!
//! The table is owned by exactly one shard thread and is never shared, so nothing here is
//! synchronised. It is the authority on who holds what: a connection's locks are released by
//! asking the table (`orphan_all`), never from a list the connection kept itself, so a lock
//! granted while its holder was disconnecting cannot escape.
//!
//! Exclusive locks are the hot path and the bulk of memory, so they are stored compactly: every
//! held lock is one [`Slot`] (name, holder, and the links of its holder's list) in a slab, and
//! the name index is a `hashbrown::HashTable` of 4-byte slab indices. A connection's exclusive
//! locks form an intrusive doubly linked list through their slots, so release and orphaning need
//! no second copy of the name. Shared locks keep a small holder set per name and a name set per
//! connection.
//!
//! Every grant of an exclusive lock gets a fencing token from the shard's [`TokenClock`]: the
//! Unix time in microseconds, or one more than the last token if that is larger, kept below a
//! durable ceiling when the server has a state file (see [`crate::fencing`]). The token doubles
//! as the time the lock was taken.

mod exclusive;
mod holders;
mod image;
mod listing;
mod orphaning;
mod shared;
mod waiters;
mod waiting;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::mem::size_of;
use std::sync::Arc;
use std::time::Instant;

use hashbrown::hash_table::HashTable;

use crate::fencing::TokenClock;
use crate::memory::{name_heap, MemoryBudget, INDEX_CONTROL};
use crate::name::LockName;
use crate::protocol::{LockKind, LockOp, Reply};
use crate::ratelimit::RateLimits;
use crate::{ConnId, NameHasher};

use holders::Holders;
pub use holders::Quota;
pub use image::{
    CountsImage, HeldImage, LimiterImage, RestoredWaiter, SharedImage, TableImage, WaiterImage,
};
pub use listing::{HolderRow, Role};
pub use waiters::{deadline_in, WaitQueues, Waiter};

/// "No slot": the end of a list.
const NIL: u32 = u32::MAX;

/// The holder of a free slot: no connection ever has this id (they count up from 1), so a scan
/// of the slab can tell free slots from held locks, whatever their names.
const FREE: ConnId = ConnId::MAX;

/// One held exclusive lock.
struct Slot {
    /// The lock's name (empty while the slot is free).
    name: LockName,
    /// The connection holding it ([`FREE`] while the slot is free).
    holder: ConnId,
    /// The grant's fencing token (also when it was taken, in Unix microseconds).
    token: u64,
    /// Previous slot in the holder's list (NIL at the head). Unused while free.
    prev: u32,
    /// Next slot in the holder's list, or in the free list while free.
    next: u32,
}

// What each piece of a table costs in memory (see [`crate::memory`]), besides the heap blocks
// of names too long to be stored inline, which are added per copy of the name.

/// An exclusive lock: its slot and its index entry (a slot number and a control byte).
pub const EXCLUSIVE_BYTES: u64 = (size_of::<Slot>() + size_of::<u32>()) as u64 + INDEX_CONTROL;
/// A connection's entry in `holdings` (made by its first lock or wait here).
pub const HOLDINGS_BYTES: u64 = size_of::<(ConnId, Holdings)>() as u64 + INDEX_CONTROL;
/// A hash table's bucket array is between 7/16 and 7/8 full and all of it is resident, so an
/// entry stored in the table itself costs up to 2.3 times its size; the shared locks' tables,
/// whose entries are big and many, are counted at twice theirs (measured: resident memory
/// within about 10% of the count at a million shared locks, right after a doubling).
const TABLE_SLACK: u64 = 2;
/// A shared lock name's entry, with room for its first few holders.
pub const SHARED_NAME_BYTES: u64 =
    TABLE_SLACK * (size_of::<(LockName, Holders)>() as u64 + INDEX_CONTROL);
/// One holder of a shared lock: its (connection, since) pair and the name's entry in its
/// connection's set (a second copy of the name).
pub const SHARED_HOLDER_BYTES: u64 = size_of::<(ConnId, u64)>() as u64
    + TABLE_SLACK * (size_of::<LockName>() as u64 + INDEX_CONTROL);
/// A wait's entry in its connection's list (another copy of the name).
pub const WAIT_ENTRY_BYTES: u64 = size_of::<(LockKind, LockName, u64)>() as u64;

/// What one connection holds in this shard.
struct Holdings {
    /// Head of the list of its exclusive slots (NIL when none).
    exclusive_head: u32,
    /// The shared locks it holds here.
    shared: hashbrown::HashSet<LockName, NameHasher>,
    /// The queues it waits in here: (namespace, name, waiter id).
    waits: Vec<(LockKind, LockName, u64)>,
}

impl Holdings {
    fn new() -> Self {
        Holdings {
            exclusive_head: NIL,
            shared: Default::default(),
            waits: Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.exclusive_head == NIL && self.shared.is_empty() && self.waits.is_empty()
    }
}

/// `conn`'s holdings in `holdings`, made (and its bytes counted) if it has none yet.
fn holdings_of<'a>(
    holdings: &'a mut HashMap<ConnId, Holdings, NameHasher>,
    bytes: &mut u64,
    conn: ConnId,
) -> &'a mut Holdings {
    holdings.entry(conn).or_insert_with(|| {
        *bytes += HOLDINGS_BYTES;
        Holdings::new()
    })
}

/// The current Unix time in microseconds, from the coarse clock (a few nanoseconds to read;
/// tokens need order, not precision).
pub fn unix_micros() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_REALTIME_COARSE)
        .map(|t| (t.tv_sec() as u64).saturating_mul(1_000_000) + (t.tv_nsec() as u64) / 1_000)
        .unwrap_or(0)
}

/// Running totals a shard publishes as stats.
#[derive(Debug, Default, Clone, Copy)]
pub struct TableCounts {
    pub waits_started: u64,
    pub waits_granted: u64,
    pub waits_timed_out: u64,
    pub rate_limit_allowed: u64,
    pub rate_limit_limited: u64,
}

/// What `get` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetOutcome {
    /// The lock was free and is now held by the caller.
    Granted,
    /// The caller already held it.
    AlreadyHeld,
    /// Another connection holds it.
    Busy,
    /// The caller is at its lock limit.
    OverLimit,
    /// A new lock would not fit in the memory budget.
    OutOfMemory,
}

/// What `orphan_all` released.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Orphaned {
    pub exclusive: u64,
    pub shared: u64,
}

/// One shard's lock table.
pub struct ShardTable {
    /// Hashes names for the index (the same keyed hash that routed them here).
    hasher: NameHasher,
    /// Name -> slot index, for every held exclusive lock.
    index: HashTable<u32>,
    /// The slots; free ones are chained from `free_head` through `next`.
    slots: Vec<Slot>,
    /// First free slot, or NIL.
    free_head: u32,
    /// Shared locks: name -> holders. A name with no holders is removed.
    shared: HashMap<LockName, Holders, NameHasher>,
    /// Per connection, what it holds here. An entry stays (empty) until the connection goes, so
    /// a client that takes and releases the same lock in a loop does not allocate each time.
    holdings: HashMap<ConnId, Holdings, NameHasher>,
    /// Where fencing tokens come from.
    tokens: TokenClock,
    /// Connections waiting for locks of this shard.
    waits: WaitQueues,
    /// `rl` limiters of this shard's names.
    limits: RateLimits,
    /// The origin of the rate limiters' monotonic clock.
    started: Instant,
    /// Totals for the stats.
    pub counts: TableCounts,
    /// Waiters' answers decided by the current change, sent once it is published.
    announcements: Vec<(tokio::sync::oneshot::Sender<Reply>, Reply)>,
    /// The server's memory budget, which this table's state counts against.
    budget: Arc<MemoryBudget>,
    /// This table's shard, its place in the budget.
    shard: usize,
    /// Bytes of locks, shared holders and connections' entries here, exactly (the wait queues
    /// and the limiters count their own).
    bytes: u64,
    /// What this table last published to the budget.
    published: u64,
}

impl ShardTable {
    /// A table whose tokens come from the clock alone.
    pub fn new(hasher: NameHasher) -> Self {
        ShardTable::with_tokens(hasher, TokenClock::default())
    }

    /// A table whose fencing tokens come from `tokens`, with no memory budget.
    pub fn with_tokens(hasher: NameHasher, tokens: TokenClock) -> Self {
        ShardTable::with_budget(hasher, tokens, Arc::new(MemoryBudget::unlimited()), 0)
    }

    /// Shard `shard`'s table, its fencing tokens from `tokens`, its state counted in `budget`.
    pub fn with_budget(
        hasher: NameHasher,
        tokens: TokenClock,
        budget: Arc<MemoryBudget>,
        shard: usize,
    ) -> Self {
        ShardTable {
            hasher: hasher.clone(),
            index: HashTable::new(),
            slots: Vec::new(),
            free_head: NIL,
            shared: HashMap::with_hasher(hasher.clone()),
            holdings: HashMap::with_hasher(hasher.clone()),
            tokens,
            waits: WaitQueues::new(hasher.clone()),
            limits: RateLimits::new(hasher),
            started: Instant::now(),
            counts: TableCounts::default(),
            announcements: Vec::new(),
            budget,
            shard,
            bytes: 0,
            published: 0,
        }
    }

    /// Bytes this table's state takes, exactly as accounted (see [`crate::memory`]).
    pub fn memory_used(&self) -> u64 {
        self.bytes + self.waits.bytes() + self.limits.bytes()
    }

    /// Whether `extra` more bytes fit in the memory budget.
    #[inline]
    fn fits(&self, extra: u64) -> bool {
        self.budget.fits(self.shard, self.memory_used(), extra)
    }

    /// Publishes this table's memory use to the budget (when it moved by more than a grain)
    /// and returns it.
    #[inline]
    pub fn publish_memory(&mut self) -> u64 {
        let used = self.memory_used();
        self.budget.publish(self.shard, used, &mut self.published);
        used
    }

    /// Rate limiters evicted to make room under the memory budget, so far.
    pub fn rate_limit_evictions(&self) -> u64 {
        self.limits.evicted()
    }

    /// What [`Self::memory_used`] should be, counted afresh from every structure (for tests:
    /// every path that frees must take off exactly what was added).
    pub fn recount_memory(&self) -> u64 {
        let mut bytes = 0;
        for &at in self.index.iter() {
            bytes += EXCLUSIVE_BYTES + name_heap(&self.slots[at as usize].name);
        }
        for name in self.shared.keys() {
            bytes += SHARED_NAME_BYTES + name_heap(name);
        }
        for holdings in self.holdings.values() {
            bytes += HOLDINGS_BYTES;
            for name in &holdings.shared {
                bytes += SHARED_HOLDER_BYTES + name_heap(name);
            }
            for (_, name, _) in &holdings.waits {
                bytes += WAIT_ENTRY_BYTES + name_heap(name);
            }
        }
        bytes + self.waits.recount() + self.limits.recount()
    }

    /// Nanoseconds on the rate limiters' monotonic clock.
    fn monotonic_ns(&self) -> u128 {
        self.started.elapsed().as_nanos()
    }

    /// Forgets up to a slice of rate limiters that are back to full capacity; true if more
    /// are due. Gives memory back when nothing is due and most limiters are gone.
    pub fn evict_rate_limits(&mut self) -> bool {
        let now = self.monotonic_ns();
        let more = self.limits.evict_some(now, crate::ratelimit::EVICT_SLICE);
        if !more {
            self.limits.shrink_if_sparse();
        }
        more
    }

    /// Rate limiters with state.
    pub fn rate_limit_len(&self) -> usize {
        self.limits.len()
    }

    /// Connections waiting now.
    pub fn waiters(&self) -> usize {
        self.waits.depth()
    }

    /// The hash this table (and the router) uses for `name`.
    #[inline]
    pub fn hash(&self, name: &[u8]) -> u64 {
        self.hasher.hash_one(name)
    }

    /// Applies one lock operation for `conn`; `hash` is `self.hash(name)`, computed once by the
    /// router. `quota` is the connection's lock allowance, if limited.
    pub fn apply(
        &mut self,
        conn: ConnId,
        op: LockOp,
        hash: u64,
        name: &LockName,
        quota: Option<&Quota>,
    ) -> Reply {
        match op {
            LockOp::Get => match self.get(conn, hash, name, quota) {
                GetOutcome::Granted | GetOutcome::AlreadyHeld => Reply::Got,
                GetOutcome::Busy => Reply::NotGot,
                GetOutcome::OverLimit => Reply::LimitReached,
                GetOutcome::OutOfMemory => Reply::OutOfMemory,
            },
            LockOp::Release => {
                if self.release(conn, hash, name.as_bytes()) {
                    quota.inspect(|q| q.give_back());
                    Reply::Released
                } else {
                    Reply::NotReleased
                }
            }
            LockOp::Inspect => {
                if self.holder(hash, name.as_bytes()).is_some() {
                    Reply::Locked
                } else {
                    Reply::NotLocked
                }
            }
            LockOp::SharedGet => match self.shared_get(conn, name, quota) {
                Ok(count) => Reply::SharedGot(count),
                Err(refused) => refused,
            },
            LockOp::SharedRelease => {
                if self.shared_release(conn, name.as_bytes()) {
                    quota.inspect(|q| q.give_back());
                    Reply::SharedReleased
                } else {
                    Reply::SharedNotReleased
                }
            }
            LockOp::SharedInspect => Reply::SharedCount(self.shared_count(name.as_bytes())),
            LockOp::GetToken => match self.get(conn, hash, name, quota) {
                GetOutcome::Granted | GetOutcome::AlreadyHeld => {
                    Reply::GotToken(self.token(hash, name.as_bytes()).unwrap_or_default())
                }
                GetOutcome::Busy => Reply::NotGot,
                GetOutcome::OverLimit => Reply::LimitReached,
                GetOutcome::OutOfMemory => Reply::OutOfMemory,
            },
            LockOp::Token => match self.token(hash, name.as_bytes()) {
                Some(token) => Reply::Token(token),
                None => Reply::NotLocked,
            },
            LockOp::SharedGetLimit(limit) => {
                let holders = self.shared.get(name.as_bytes());
                let count = holders.map_or(0, |h| h.len() as u64);
                if holders.is_some_and(|h| h.contains(conn)) {
                    Reply::SharedGot(count)
                } else if count >= u64::from(limit) {
                    Reply::SharedFull
                } else {
                    match self.shared_get(conn, name, quota) {
                        Ok(count) => Reply::SharedGot(count),
                        Err(refused) => refused,
                    }
                }
            }
            LockOp::RateLimit(limit) => {
                let now = self.monotonic_ns();
                // Everything else this table holds, so the limiters can tell what fits.
                let others = self.bytes + self.waits.bytes();
                let (budget, shard) = (&self.budget, self.shard);
                // Limiters stay within their share, so they never take the room locks need.
                let share = budget.limiter_share();
                let fits =
                    |limiters: u64| limiters <= share && budget.fits(shard, others + limiters, 0);
                let Some(decision) = self.limits.apply(name, now, limit.into(), fits) else {
                    return Reply::OutOfMemory;
                };
                if decision.allowed {
                    self.counts.rate_limit_allowed += 1;
                } else {
                    self.counts.rate_limit_limited += 1;
                }
                Reply::RateLimit(decision)
            }
        }
    }

    /// How many exclusive locks are held.
    pub fn exclusive_len(&self) -> usize {
        self.index.len()
    }

    /// How many shared lock names have at least one holder.
    pub fn shared_len(&self) -> usize {
        self.shared.len()
    }
}
