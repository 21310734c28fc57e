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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use hashbrown::hash_table::{Entry, HashTable};
use smallvec::SmallVec;

use crate::name::LockName;
use crate::protocol::{LockOp, Reply};
use crate::{ConnId, NameHasher};

/// "No slot": the end of a list.
const NIL: u32 = u32::MAX;

/// One held exclusive lock.
struct Slot {
    /// The lock's name (empty while the slot is free).
    name: LockName,
    /// The connection holding it.
    holder: ConnId,
    /// Previous slot in the holder's list (NIL at the head). Unused while free.
    prev: u32,
    /// Next slot in the holder's list, or in the free list while free.
    next: u32,
}

/// The connections sharing one shared lock. Almost always a handful, kept inline; a name that
/// thousands of connections hold (a popular rate limit) moves to a hash set.
enum Holders {
    Few(SmallVec<[ConnId; 4]>),
    Many(hashbrown::HashSet<ConnId, NameHasher>),
}

/// A `Few` set grows into a `Many` set past this many holders.
const FEW_HOLDERS: usize = 32;

impl Holders {
    fn len(&self) -> usize {
        match self {
            Holders::Few(v) => v.len(),
            Holders::Many(s) => s.len(),
        }
    }

    /// Adds `conn`; false if it was already a holder.
    fn insert(&mut self, conn: ConnId) -> bool {
        match self {
            Holders::Few(v) => {
                if v.contains(&conn) {
                    return false;
                }
                if v.len() < FEW_HOLDERS {
                    v.push(conn);
                } else {
                    let mut set: hashbrown::HashSet<ConnId, NameHasher> =
                        v.iter().copied().collect();
                    set.insert(conn);
                    *self = Holders::Many(set);
                }
                true
            }
            Holders::Many(s) => s.insert(conn),
        }
    }

    /// Removes `conn`; false if it was not a holder.
    fn remove(&mut self, conn: ConnId) -> bool {
        match self {
            Holders::Few(v) => match v.iter().position(|&c| c == conn) {
                Some(at) => {
                    v.swap_remove(at);
                    true
                }
                None => false,
            },
            Holders::Many(s) => s.remove(&conn),
        }
    }

    fn contains(&self, conn: ConnId) -> bool {
        match self {
            Holders::Few(v) => v.contains(&conn),
            Holders::Many(s) => s.contains(&conn),
        }
    }

    fn iter(&self) -> Box<dyn Iterator<Item = ConnId> + '_> {
        match self {
            Holders::Few(v) => Box::new(v.iter().copied()),
            Holders::Many(s) => Box::new(s.iter().copied()),
        }
    }
}

/// What one connection holds in this shard.
struct Holdings {
    /// Head of the list of its exclusive slots (NIL when none).
    exclusive_head: u32,
    /// The shared locks it holds here.
    shared: hashbrown::HashSet<LockName, NameHasher>,
}

impl Holdings {
    fn new() -> Self {
        Holdings {
            exclusive_head: NIL,
            shared: Default::default(),
        }
    }
}

/// A connection's allowance of locks (`--max-locks-per-conn`), shared by every shard the
/// connection sends to, so the limit holds across shards exactly: a grant first takes one unit,
/// and gives it back if the limit was already reached.
#[derive(Debug)]
pub struct Quota {
    /// Locks the connection holds now, over all shards.
    held: AtomicU64,
    /// The most it may hold.
    limit: u64,
}

impl Quota {
    pub fn new(limit: u64) -> Self {
        Quota {
            held: AtomicU64::new(0),
            limit,
        }
    }

    /// Takes one unit; false (and nothing taken) at the limit.
    fn try_take(&self) -> bool {
        if self.held.fetch_add(1, Ordering::AcqRel) >= self.limit {
            self.held.fetch_sub(1, Ordering::AcqRel);
            false
        } else {
            true
        }
    }

    fn give_back(&self) {
        self.held.fetch_sub(1, Ordering::AcqRel);
    }

    /// Locks held now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }
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
}

impl ShardTable {
    pub fn new(hasher: NameHasher) -> Self {
        ShardTable {
            hasher: hasher.clone(),
            index: HashTable::new(),
            slots: Vec::new(),
            free_head: NIL,
            shared: HashMap::with_hasher(hasher.clone()),
            holdings: HashMap::with_hasher(hasher),
        }
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
        }
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
        let holdings = self.holdings.entry(conn).or_insert_with(Holdings::new);
        let head = holdings.exclusive_head;
        let slot = Slot {
            name: name.clone(),
            holder: conn,
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

    /// Releases the exclusive lock if `conn` holds it.
    pub fn release(&mut self, conn: ConnId, hash: u64, name: &[u8]) -> bool {
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
        let holders = match self.shared.get_mut(name.as_bytes()) {
            Some(holders) => holders,
            None => self
                .shared
                .entry(name.clone())
                .or_insert_with(|| Holders::Few(SmallVec::new())),
        };
        holders.insert(conn);
        let count = holders.len() as u64;
        self.holdings
            .entry(conn)
            .or_insert_with(Holdings::new)
            .shared
            .insert(name.clone());
        Some(count)
    }

    /// Releases a shared lock if `conn` holds it.
    pub fn shared_release(&mut self, conn: ConnId, name: &[u8]) -> bool {
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
        let mut budget = budget;
        let mut at = holdings.exclusive_head;
        while at != NIL && budget > 0 {
            let slot = &mut self.slots[at as usize];
            let next = slot.next;
            on_exclusive(&slot.name);
            let hash = self.hasher.hash_one(slot.name.as_bytes());
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
            }
        }
        let done = holdings.exclusive_head == NIL && holdings.shared.is_empty();
        if done {
            self.holdings.remove(&conn);
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

    /// Every exclusive lock and its holder (or only `name`'s), unsorted.
    pub fn list_exclusive(&self, name: Option<(u64, &[u8])>) -> Vec<(LockName, ConnId)> {
        match name {
            Some((hash, name)) => self
                .find(hash, name)
                .map(|at| {
                    let slot = &self.slots[at as usize];
                    vec![(slot.name.clone(), slot.holder)]
                })
                .unwrap_or_default(),
            None => self
                .index
                .iter()
                .map(|&at| {
                    let slot = &self.slots[at as usize];
                    (slot.name.clone(), slot.holder)
                })
                .collect(),
        }
    }

    /// Every (shared lock, holder) pair (or only `name`'s), unsorted.
    pub fn list_shared(&self, name: Option<&[u8]>) -> Vec<(LockName, ConnId)> {
        let mut out = Vec::new();
        let mut push = |name: &LockName, holders: &Holders| {
            out.extend(holders.iter().map(|conn| (name.clone(), conn)));
        };
        match name {
            Some(name) => {
                if let Some((name, holders)) = self.shared.get_key_value(name) {
                    push(name, holders);
                }
            }
            None => self.shared.iter().for_each(|(n, h)| push(n, h)),
        }
        out
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
