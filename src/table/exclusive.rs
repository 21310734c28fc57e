//! Exclusive locks: one slot per held lock in a slab, found by name through the index, and
//! linked into its holder's list so release and orphaning need no second copy of the name.

use std::collections::HashMap;

use hashbrown::hash_table::Entry;

use super::{
    holdings_of, GetOutcome, Holdings, Quota, ShardTable, Slot, EXCLUSIVE_BYTES, FREE, NIL,
};
use crate::memory::name_heap;
use crate::name::LockName;
use crate::protocol::LockKind;
use crate::{ConnId, NameHasher};

impl ShardTable {
    /// The fencing token of the current grant of `name`.
    pub fn token(&self, hash: u64, name: &[u8]) -> Option<u64> {
        self.find(hash, name)
            .map(|at| self.slots[at as usize].token)
    }

    pub(super) fn find(&self, hash: u64, name: &[u8]) -> Option<u32> {
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
    /// original), if it fits in the memory budget.
    pub fn get(
        &mut self,
        conn: ConnId,
        hash: u64,
        name: &LockName,
        quota: Option<&Quota>,
    ) -> GetOutcome {
        self.take(conn, hash, name, quota, true)
    }

    /// [`Self::get`], checking the memory budget only if `budgeted`: a lock handed to a waiter
    /// takes the place of the lock just released and of the waiter, so it is never refused.
    pub(super) fn take(
        &mut self,
        conn: ConnId,
        hash: u64,
        name: &LockName,
        quota: Option<&Quota>,
        budgeted: bool,
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
        let cost = EXCLUSIVE_BYTES + name_heap(name);
        if budgeted {
            // (Fields, not `self.fits`: the vacant entry holds the index.)
            let used = self.bytes + self.waits.bytes() + self.limits.bytes();
            if !self.budget.fits(self.shard, used, cost) {
                return GetOutcome::OutOfMemory;
            }
        }
        if quota.is_some_and(|q| !q.try_take()) {
            return GetOutcome::OverLimit;
        }
        // Taken before anything changes: at the ceiling this waits for a durable new one.
        let token = self.tokens.issue();
        let at = place(
            &mut self.slots,
            &mut self.free_head,
            &mut self.holdings,
            &mut self.bytes,
            conn,
            name,
            token,
        );
        vacant.insert(at);
        GetOutcome::Granted
    }

    /// Makes `conn` the holder of the exclusive lock `name` with fencing token `token`, as
    /// granted by another process before a live upgrade: counted like any grant, but not
    /// checked against the memory budget (the state already existed) nor any quota (the
    /// caller carries those over). Tokens issued from now on are above `token`. False, and
    /// nothing changed, if `name` is held already.
    pub fn restore_exclusive(&mut self, conn: ConnId, name: &LockName, token: u64) -> bool {
        let hash = self.hash(name.as_bytes());
        if self.find(hash, name.as_bytes()).is_some() {
            return false;
        }
        self.tokens.advance_past(token);
        let at = place(
            &mut self.slots,
            &mut self.free_head,
            &mut self.holdings,
            &mut self.bytes,
            conn,
            name,
            token,
        );
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.index.insert_unique(hash, at, |&other| {
            hasher.hash_one(slots[other as usize].name.as_bytes())
        });
        true
    }

    /// Releases the exclusive lock if `conn` holds it, and hands it to the first waiter.
    pub fn release(&mut self, conn: ConnId, hash: u64, name: &[u8]) -> bool {
        if !self.release_quietly(conn, hash, name) {
            return false;
        }
        if self.waits.has(LockKind::Exclusive, name) {
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
        self.bytes -= EXCLUSIVE_BYTES + name_heap(&slot.name);
        slot.name = LockName::empty();
        slot.holder = FREE;
        slot.next = self.free_head;
        self.free_head = at;
    }
}

/// Stores a new held lock in a free slot (or a new one) at the head of its holder's list and
/// counts its bytes; returns the slot, for the caller to enter in the index. (Fields, not
/// `self`: a grant holds the index's vacant entry meanwhile.)
fn place(
    slots: &mut Vec<Slot>,
    free_head: &mut u32,
    holdings: &mut HashMap<ConnId, Holdings, NameHasher>,
    bytes: &mut u64,
    conn: ConnId,
    name: &LockName,
    token: u64,
) -> u32 {
    *bytes += EXCLUSIVE_BYTES + name_heap(name);
    let holdings = holdings_of(holdings, bytes, conn);
    let head = holdings.exclusive_head;
    let slot = Slot {
        name: name.clone(),
        holder: conn,
        token,
        prev: NIL,
        next: head,
    };
    let at = if *free_head != NIL {
        let at = *free_head;
        *free_head = slots[at as usize].next;
        slots[at as usize] = slot;
        at
    } else {
        slots.push(slot);
        u32::try_from(slots.len() - 1).expect("more than 4 billion locks in one shard")
    };
    if head != NIL {
        slots[head as usize].prev = at;
    }
    holdings.exclusive_head = at;
    at
}
