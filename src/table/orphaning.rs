//! Releasing what a departed connection held, all at once or a slice at a time, and handing
//! each released lock to its first waiter.

use super::Orphaned;
use super::{
    ShardTable, EXCLUSIVE_BYTES, FREE, HOLDINGS_BYTES, NIL, SHARED_HOLDER_BYTES, SHARED_NAME_BYTES,
    WAIT_ENTRY_BYTES,
};
use crate::memory::name_heap;
use crate::name::LockName;
use crate::protocol::LockKind;
use crate::ConnId;

impl ShardTable {
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
        let mut handovers: Vec<(LockKind, LockName)> = Vec::new();
        // (A waiter leaving frees no slot and holds back nobody: no hand-over for it.)
        for (kind, name, id) in holdings.waits.drain(..) {
            self.bytes -= WAIT_ENTRY_BYTES + name_heap(&name);
            self.waits.remove(kind, name.as_bytes(), id);
        }
        let mut budget = budget;
        let mut at = holdings.exclusive_head;
        while at != NIL && budget > 0 {
            let slot = &mut self.slots[at as usize];
            let next = slot.next;
            on_exclusive(&slot.name);
            let hash = self.hasher.hash_one(slot.name.as_bytes());
            if self.waits.has(LockKind::Exclusive, slot.name.as_bytes()) {
                handovers.push((LockKind::Exclusive, slot.name.clone()));
            }
            // Free the slot in place (`self.free` would borrow all of `self`).
            self.bytes -= EXCLUSIVE_BYTES + name_heap(&slot.name);
            slot.name = LockName::empty();
            slot.holder = FREE;
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
                self.bytes -= SHARED_HOLDER_BYTES + name_heap(&name);
                if let Some(holders) = self.shared.get_mut(name.as_bytes()) {
                    if holders.remove(conn) {
                        orphaned.shared += 1;
                    }
                    if holders.len() == 0 {
                        self.shared.remove(name.as_bytes());
                        self.bytes -= SHARED_NAME_BYTES + name_heap(&name);
                    }
                }
                if self.waits.has(LockKind::Shared, name.as_bytes()) {
                    handovers.push((LockKind::Shared, name));
                }
            }
        }
        let done = holdings.is_empty();
        if done {
            self.holdings.remove(&conn);
            self.bytes -= HOLDINGS_BYTES;
        }
        for (kind, name) in handovers {
            match kind {
                LockKind::Shared => self.grant_shared_waiters(name.as_bytes()),
                LockKind::Exclusive => {
                    let hash = self.hash(name.as_bytes());
                    self.grant_exclusive_waiters(hash, name.as_bytes());
                }
            }
        }
        (orphaned, done)
    }
}
