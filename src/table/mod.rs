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

mod holders;
mod listing;
mod waiters;
mod waiting;

use std::collections::HashMap;
use std::time::Instant;

use hashbrown::hash_table::{Entry, HashTable};

use crate::fencing::TokenClock;
use crate::name::LockName;
use crate::protocol::{LockOp, Reply};
use crate::ratelimit::RateLimits;
use crate::{ConnId, NameHasher};

use holders::Holders;
pub use holders::Quota;
pub use listing::{HolderRow, Role};
pub use waiters::{WaitKind, WaitQueues, Waiter};

/// "No slot": the end of a list.
const NIL: u32 = u32::MAX;

/// One held exclusive lock.
struct Slot {
    /// The lock's name (empty while the slot is free).
    name: LockName,
    /// The connection holding it.
    holder: ConnId,
    /// The grant's fencing token (also when it was taken, in Unix microseconds).
    token: u64,
    /// Previous slot in the holder's list (NIL at the head). Unused while free.
    prev: u32,
    /// Next slot in the holder's list, or in the free list while free.
    next: u32,
}

/// What one connection holds in this shard.
struct Holdings {
    /// Head of the list of its exclusive slots (NIL when none).
    exclusive_head: u32,
    /// The shared locks it holds here.
    shared: hashbrown::HashSet<LockName, NameHasher>,
    /// The queues it waits in here: (shared?, name, waiter id).
    waits: Vec<(bool, LockName, u64)>,
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
}

impl ShardTable {
    /// A table whose tokens come from the clock alone.
    pub fn new(hasher: NameHasher) -> Self {
        ShardTable::with_tokens(hasher, TokenClock::default())
    }

    /// A table whose fencing tokens come from `tokens`.
    pub fn with_tokens(hasher: NameHasher, tokens: TokenClock) -> Self {
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
        }
    }

    /// Nanoseconds on the rate limiters' monotonic clock.
    fn monotonic_ns(&self) -> u128 {
        self.started.elapsed().as_nanos()
    }

    /// Forgets rate limiters that are back to full capacity.
    pub fn evict_rate_limits(&mut self) {
        let now = self.monotonic_ns();
        self.limits.evict(now);
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
                Some(count) => Reply::SharedGot(count),
                None => Reply::LimitReached,
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
                        Some(count) => Reply::SharedGot(count),
                        None => Reply::LimitReached,
                    }
                }
            }
            LockOp::RateLimit(limit) => {
                let now = self.monotonic_ns();
                let decision = self.limits.apply(name, now, limit.into());
                if decision.allowed {
                    self.counts.rate_limit_allowed += 1;
                } else {
                    self.counts.rate_limit_limited += 1;
                }
                Reply::RateLimit(decision)
            }
        }
    }

    /// The fencing token of the current grant of `name`.
    pub fn token(&self, hash: u64, name: &[u8]) -> Option<u64> {
        self.find(hash, name)
            .map(|at| self.slots[at as usize].token)
    }

    fn find(&self, hash: u64, name: &[u8]) -> Option<u32> {
        let slots = &self.slots;
        self.index
            .find(hash, |&at| slots[at as usize].name.as_bytes() == name)
            .copied()
    }

    /// Who holds the exclusive lock `name`.
    pub fn holder(&self, hash: u64, name: &[u8]) -> Option<ConnId> {
        self.find(hash, name)
            .map(|at| self.slots[at as usize].holder)
    }

    /// Takes the exclusive lock for `conn` (re-getting a lock you hold succeeds, as in the
    /// original).
    pub fn get(
        &mut self,
        conn: ConnId,
        hash: u64,
        name: &LockName,
        quota: Option<&Quota>,
    ) -> GetOutcome {
        let slots = &self.slots;
        let hasher = &self.hasher;
        let entry = self.index.entry(
            hash,
            |&at| slots[at as usize].name == *name,
            |&at| hasher.hash_one(slots[at as usize].name.as_bytes()),
        );
        let vacant = match entry {
            Entry::Occupied(found) if self.slots[*found.get() as usize].holder == conn => {
                return GetOutcome::AlreadyHeld
            }
            Entry::Occupied(_) => return GetOutcome::Busy,
            Entry::Vacant(vacant) => vacant,
        };
        if quota.is_some_and(|q| !q.try_take()) {
            return GetOutcome::OverLimit;
        }
        // Taken before anything changes: at the ceiling this waits for a durable new one.
        let token = self.tokens.issue();
        let holdings = self.holdings.entry(conn).or_insert_with(Holdings::new);
        let head = holdings.exclusive_head;
        let slot = Slot {
            name: name.clone(),
            holder: conn,
            token,
            prev: NIL,
            next: head,
        };
        let at = if self.free_head != NIL {
            let at = self.free_head;
            self.free_head = self.slots[at as usize].next;
            self.slots[at as usize] = slot;
            at
        } else {
            self.slots.push(slot);
            u32::try_from(self.slots.len() - 1).expect("more than 4 billion locks in one shard")
        };
        vacant.insert(at);
        if head != NIL {
            self.slots[head as usize].prev = at;
        }
        holdings.exclusive_head = at;
        GetOutcome::Granted
    }

    /// Releases the exclusive lock if `conn` holds it, and hands it to the first waiter.
    pub fn release(&mut self, conn: ConnId, hash: u64, name: &[u8]) -> bool {
        if !self.release_quietly(conn, hash, name) {
            return false;
        }
        if self.waits.has(false, name) {
            self.grant_exclusive_waiters(hash, name);
        }
        true
    }

    /// Releases the exclusive lock if `conn` holds it, without serving waiters.
    fn release_quietly(&mut self, conn: ConnId, hash: u64, name: &[u8]) -> bool {
        let slots = &self.slots;
        let Ok(found) = self
            .index
            .find_entry(hash, |&at| slots[at as usize].name.as_bytes() == name)
        else {
            return false;
        };
        let at = *found.get();
        if self.slots[at as usize].holder != conn {
            return false;
        }
        found.remove();
        self.unlink(at);
        self.free(at);
        true
    }

    /// Takes `at` out of its holder's list.
    fn unlink(&mut self, at: u32) {
        let (prev, next, holder) = {
            let slot = &self.slots[at as usize];
            (slot.prev, slot.next, slot.holder)
        };
        if prev != NIL {
            self.slots[prev as usize].next = next;
        } else if let Some(holdings) = self.holdings.get_mut(&holder) {
            holdings.exclusive_head = next;
        }
        if next != NIL {
            self.slots[next as usize].prev = prev;
        }
    }

    /// Returns `at` to the free list (dropping its name).
    fn free(&mut self, at: u32) {
        let slot = &mut self.slots[at as usize];
        slot.name = LockName::empty();
        slot.next = self.free_head;
        self.free_head = at;
    }

    /// Takes a shared lock; returns the holder count afterwards (a holder is counted once), or
    /// None if `conn` is at its lock limit.
    pub fn shared_get(
        &mut self,
        conn: ConnId,
        name: &LockName,
        quota: Option<&Quota>,
    ) -> Option<u64> {
        if let Some(holders) = self.shared.get(name.as_bytes()) {
            if holders.contains(conn) {
                return Some(holders.len() as u64);
            }
        }
        if quota.is_some_and(|q| !q.try_take()) {
            return None;
        }
        let since = unix_micros();
        let holders = match self.shared.get_mut(name.as_bytes()) {
            Some(holders) => holders,
            None => self.shared.entry(name.clone()).or_insert_with(Holders::new),
        };
        holders.insert(conn, since);
        let count = holders.len() as u64;
        self.holdings
            .entry(conn)
            .or_insert_with(Holdings::new)
            .shared
            .insert(name.clone());
        Some(count)
    }

    /// Releases a shared lock if `conn` holds it, and lets waiters in while there is room.
    pub fn shared_release(&mut self, conn: ConnId, name: &[u8]) -> bool {
        if !self.shared_release_quietly(conn, name) {
            return false;
        }
        if self.waits.has(true, name) {
            self.grant_shared_waiters(name);
        }
        true
    }

    /// Releases a shared lock if `conn` holds it, without serving waiters.
    fn shared_release_quietly(&mut self, conn: ConnId, name: &[u8]) -> bool {
        let Some(holders) = self.shared.get_mut(name) else {
            return false;
        };
        if !holders.remove(conn) {
            return false;
        }
        if holders.len() == 0 {
            self.shared.remove(name);
        }
        if let Some(holdings) = self.holdings.get_mut(&conn) {
            holdings.shared.remove(name);
        }
        true
    }

    /// The number of connections holding the shared lock `name`.
    pub fn shared_count(&self, name: &[u8]) -> u64 {
        self.shared.get(name).map_or(0, |h| h.len() as u64)
    }

    /// Releases everything `conn` holds in this shard, because it is gone.
    pub fn orphan_all(&mut self, conn: ConnId) -> Orphaned {
        self.orphan_some(conn, usize::MAX, |_| {}).0
    }

    /// Releases at most `budget` of the locks `conn` holds here (exclusive first), calling
    /// `on_exclusive` with the name of each exclusive lock released. Returns what it released and
    /// whether `conn` now holds nothing here. Orphaning a million locks in slices lets the shard
    /// serve other clients in between; `conn` is gone, so nothing is added to its set meanwhile.
    pub fn orphan_some(
        &mut self,
        conn: ConnId,
        budget: usize,
        mut on_exclusive: impl FnMut(&LockName),
    ) -> (Orphaned, bool) {
        let mut orphaned = Orphaned::default();
        let Some(holdings) = self.holdings.get_mut(&conn) else {
            return (orphaned, true);
        };
        // A connection that is gone waits for nothing.
        // Names someone waits for, to hand over once this slice is released.
        let mut handovers: Vec<(bool, LockName)> = Vec::new();
        for (shared, name, id) in holdings.waits.drain(..) {
            self.waits.remove(shared, name.as_bytes(), id);
            if shared {
                // It may have stood first in line with a low limit, holding back the others.
                handovers.push((true, name));
            }
        }
        let mut budget = budget;
        let mut at = holdings.exclusive_head;
        while at != NIL && budget > 0 {
            let slot = &mut self.slots[at as usize];
            let next = slot.next;
            on_exclusive(&slot.name);
            let hash = self.hasher.hash_one(slot.name.as_bytes());
            if self.waits.has(false, slot.name.as_bytes()) {
                handovers.push((false, slot.name.clone()));
            }
            // Free the slot in place (`self.free` would borrow all of `self`).
            slot.name = LockName::empty();
            slot.next = self.free_head;
            self.free_head = at;
            if let Ok(found) = self.index.find_entry(hash, |&other| other == at) {
                found.remove();
            }
            orphaned.exclusive += 1;
            budget -= 1;
            at = next;
        }
        holdings.exclusive_head = at;
        if at != NIL {
            self.slots[at as usize].prev = NIL;
        }
        if at == NIL && budget > 0 {
            let names: Vec<LockName> = holdings.shared.iter().take(budget).cloned().collect();
            for name in names {
                holdings.shared.remove(name.as_bytes());
                if let Some(holders) = self.shared.get_mut(name.as_bytes()) {
                    if holders.remove(conn) {
                        orphaned.shared += 1;
                    }
                    if holders.len() == 0 {
                        self.shared.remove(name.as_bytes());
                    }
                }
                if self.waits.has(true, name.as_bytes()) {
                    handovers.push((true, name));
                }
            }
        }
        let done = holdings.is_empty();
        if done {
            self.holdings.remove(&conn);
        }
        for (shared, name) in handovers {
            if shared {
                self.grant_shared_waiters(name.as_bytes());
            } else {
                let hash = self.hash(name.as_bytes());
                self.grant_exclusive_waiters(hash, name.as_bytes());
            }
        }
        (orphaned, done)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> ShardTable {
        ShardTable::new(crate::name_hasher())
    }

    fn get(t: &mut ShardTable, conn: ConnId, name: &str) -> bool {
        let hash = t.hash(name.as_bytes());
        matches!(
            t.get(conn, hash, &LockName::from(name), None),
            GetOutcome::Granted | GetOutcome::AlreadyHeld
        )
    }

    fn sg(t: &mut ShardTable, conn: ConnId, name: &str) -> u64 {
        t.shared_get(conn, &LockName::from(name), None)
            .expect("no quota")
    }

    fn release(t: &mut ShardTable, conn: ConnId, name: &str) -> bool {
        let hash = t.hash(name.as_bytes());
        t.release(conn, hash, name.as_bytes())
    }

    fn holder(t: &ShardTable, name: &str) -> Option<ConnId> {
        t.holder(t.hash(name.as_bytes()), name.as_bytes())
    }

    #[test]
    fn exclusive_lock_has_one_holder_and_regets_succeed() {
        let mut t = table();
        assert!(get(&mut t, 1, "a"));
        assert!(get(&mut t, 1, "a"), "re-getting a held lock answers 1");
        assert!(!get(&mut t, 2, "a"));
        assert_eq!(holder(&t, "a"), Some(1));
        assert_eq!(t.exclusive_len(), 1);
    }

    #[test]
    fn only_the_holder_releases() {
        let mut t = table();
        assert!(get(&mut t, 1, "a"));
        assert!(!release(&mut t, 2, "a"));
        assert!(!release(&mut t, 1, "b"));
        assert!(release(&mut t, 1, "a"));
        assert!(!release(&mut t, 1, "a"));
        assert_eq!(holder(&t, "a"), None);
        assert!(get(&mut t, 2, "a"));
    }

    #[test]
    fn orphaning_releases_exactly_the_connections_locks() {
        let mut t = table();
        for i in 0..100 {
            assert!(get(&mut t, 1, &format!("one-{i}")));
            assert!(get(&mut t, 2, &format!("two-{i}")));
        }
        // Release some from the middle, head and tail of conn 1's list.
        for i in [0, 50, 99] {
            assert!(release(&mut t, 1, &format!("one-{i}")));
        }
        sg(&mut t, 1, "s");
        sg(&mut t, 2, "s");
        let orphaned = t.orphan_all(1);
        assert_eq!(
            orphaned,
            Orphaned {
                exclusive: 97,
                shared: 1
            }
        );
        assert_eq!(t.exclusive_len(), 100);
        assert_eq!(t.shared_count(b"s"), 1);
        for i in 0..100 {
            assert_eq!(holder(&t, &format!("one-{i}")), None);
            assert_eq!(holder(&t, &format!("two-{i}")), Some(2));
        }
        assert_eq!(t.orphan_all(1), Orphaned::default());
        // Freed slots are reused.
        let slots = t.slots.len();
        for i in 0..97 {
            assert!(get(&mut t, 3, &format!("three-{i}")));
        }
        assert_eq!(t.slots.len(), slots);
        assert_eq!(t.orphan_all(2).exclusive, 100);
        assert_eq!(t.orphan_all(3).exclusive, 97);
        assert_eq!(t.exclusive_len(), 0);
    }

    #[test]
    fn orphaning_in_slices_releases_everything_once() {
        let mut t = table();
        for i in 0..1000 {
            assert!(get(&mut t, 1, &format!("x{i}")));
            sg(&mut t, 1, &format!("s{i}"));
        }
        assert!(get(&mut t, 2, "other"));
        let mut total = Orphaned::default();
        let mut names = 0;
        let mut slices = 0;
        loop {
            let (orphaned, done) = t.orphan_some(1, 300, |_| names += 1);
            total.exclusive += orphaned.exclusive;
            total.shared += orphaned.shared;
            slices += 1;
            // Between slices the table stays consistent and serves others.
            assert_eq!(holder(&t, "other"), Some(2));
            if done {
                break;
            }
        }
        assert_eq!(
            total,
            Orphaned {
                exclusive: 1000,
                shared: 1000
            }
        );
        assert_eq!(names, 1000);
        assert_eq!(slices, 7);
        assert_eq!(t.exclusive_len(), 1);
        assert_eq!(t.shared_len(), 0);
    }

    #[test]
    fn shared_locks_count_each_holder_once() {
        let mut t = table();
        assert_eq!(sg(&mut t, 1, "s"), 1);
        assert_eq!(sg(&mut t, 1, "s"), 1);
        assert_eq!(sg(&mut t, 2, "s"), 2);
        assert_eq!(t.shared_count(b"s"), 2);
        assert!(!t.shared_release(3, b"s"));
        assert!(t.shared_release(1, b"s"));
        assert!(!t.shared_release(1, b"s"));
        assert_eq!(t.shared_count(b"s"), 1);
        assert!(t.shared_release(2, b"s"));
        assert_eq!(t.shared_len(), 0);
    }

    #[test]
    fn shared_holder_sets_grow_past_the_inline_size() {
        let mut t = table();
        for conn in 0..1000 {
            assert_eq!(sg(&mut t, conn, "popular"), conn + 1);
        }
        assert_eq!(sg(&mut t, 5, "popular"), 1000);
        for conn in (0..1000).step_by(2) {
            assert!(t.shared_release(conn, b"popular"));
        }
        assert_eq!(t.shared_count(b"popular"), 500);
        assert_eq!(t.list_shared(Some(b"popular")).len(), 500);
        for conn in (1..1000).step_by(2) {
            assert_eq!(t.orphan_all(conn).shared, 1);
        }
        assert_eq!(t.shared_len(), 0);
    }

    #[test]
    fn a_quota_limits_new_locks_but_not_regets() {
        let mut t = table();
        let quota = Quota::new(2);
        let name = |n: &str| LockName::from(n);
        let get_q = |t: &mut ShardTable, n: &str| {
            let hash = t.hash(n.as_bytes());
            t.get(1, hash, &name(n), Some(&quota))
        };
        assert_eq!(get_q(&mut t, "a"), GetOutcome::Granted);
        assert_eq!(t.shared_get(1, &name("s"), Some(&quota)), Some(1));
        assert_eq!(get_q(&mut t, "b"), GetOutcome::OverLimit);
        assert_eq!(t.shared_get(1, &name("t"), Some(&quota)), None);
        assert_eq!(get_q(&mut t, "a"), GetOutcome::AlreadyHeld);
        assert_eq!(t.shared_get(1, &name("s"), Some(&quota)), Some(1));
        assert!(!t.shared.contains_key(b"t".as_slice()));
        let hash = t.hash(b"a");
        assert_eq!(
            t.apply(1, LockOp::Release, hash, &name("a"), Some(&quota)),
            Reply::Released
        );
        assert_eq!(quota.held(), 1);
        assert_eq!(get_q(&mut t, "b"), GetOutcome::Granted);
    }

    #[test]
    fn exclusive_and_shared_are_separate_namespaces() {
        let mut t = table();
        assert!(get(&mut t, 1, "x"));
        assert_eq!(sg(&mut t, 2, "x"), 1);
        assert_eq!(holder(&t, "x"), Some(1));
    }

    #[test]
    fn listings_show_names_and_holders() {
        let mut t = table();
        get(&mut t, 1, "a");
        get(&mut t, 2, "b");
        let mut all = t.list_exclusive(None);
        all.sort();
        assert_eq!(
            all,
            vec![(LockName::from("a"), 1), (LockName::from("b"), 2)]
        );
        let one = t.list_exclusive(Some((t.hash(b"b"), b"b")));
        assert_eq!(one, vec![(LockName::from("b"), 2)]);
        assert!(t.list_exclusive(Some((t.hash(b"c"), b"c"))).is_empty());
    }
}
