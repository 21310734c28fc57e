//! Counted shared locks: a small holder set per name, and per connection the names it holds.

use super::holders::Holders;
use super::{holdings_of, unix_micros, Quota, ShardTable, SHARED_HOLDER_BYTES, SHARED_NAME_BYTES};
use crate::memory::{name_heap, name_heap_of};
use crate::name::LockName;
use crate::protocol::{LockKind, Reply};
use crate::ConnId;

impl ShardTable {
    /// Takes a shared lock; returns the holder count afterwards (a holder is counted once), or
    /// the refusal: `conn` is at its lock limit, or a new holder does not fit in the memory
    /// budget.
    pub fn shared_get(
        &mut self,
        conn: ConnId,
        name: &LockName,
        quota: Option<&Quota>,
    ) -> Result<u64, Reply> {
        self.shared_take(conn, name, quota, true)
    }

    /// [`Self::shared_get`], checking the memory budget only if `budgeted` (not for a waiter
    /// let in: it takes the place of the holder that just left, and of its own wait).
    pub(super) fn shared_take(
        &mut self,
        conn: ConnId,
        name: &LockName,
        quota: Option<&Quota>,
        budgeted: bool,
    ) -> Result<u64, Reply> {
        let known = self.shared.get(name.as_bytes());
        if let Some(holders) = known {
            if holders.contains(conn) {
                return Ok(holders.len() as u64);
            }
        }
        let mut cost = SHARED_HOLDER_BYTES + name_heap(name);
        if known.is_none() {
            cost += SHARED_NAME_BYTES + name_heap(name);
        }
        if budgeted && !self.fits(cost) {
            return Err(Reply::OutOfMemory);
        }
        if quota.is_some_and(|q| !q.try_take()) {
            return Err(Reply::LimitReached);
        }
        Ok(self.add_shared_holder(conn, name, unix_micros()))
    }

    /// Makes `conn` a holder of the shared lock `name` since `since` (Unix microseconds), as
    /// it was in another process before a live upgrade: counted like any grant, but not
    /// checked against the memory budget (the state already existed) nor any quota (the
    /// caller carries those over). False, and nothing changed, if it holds it already.
    pub fn restore_shared(&mut self, conn: ConnId, name: &LockName, since: u64) -> bool {
        if self
            .shared
            .get(name.as_bytes())
            .is_some_and(|holders| holders.contains(conn))
        {
            return false;
        }
        self.add_shared_holder(conn, name, since);
        true
    }

    /// Adds `conn`, not a holder yet, to `name`'s holders and counts its bytes; returns the
    /// holder count.
    fn add_shared_holder(&mut self, conn: ConnId, name: &LockName, since: u64) -> u64 {
        self.bytes += SHARED_HOLDER_BYTES + name_heap(name);
        let holders = match self.shared.get_mut(name.as_bytes()) {
            Some(holders) => holders,
            None => {
                self.bytes += SHARED_NAME_BYTES + name_heap(name);
                self.shared.entry(name.clone()).or_insert_with(Holders::new)
            }
        };
        holders.insert(conn, since);
        let count = holders.len() as u64;
        holdings_of(&mut self.holdings, &mut self.bytes, conn)
            .shared
            .insert(name.clone());
        count
    }

    /// Releases a shared lock if `conn` holds it, and lets waiters in while there is room.
    pub fn shared_release(&mut self, conn: ConnId, name: &[u8]) -> bool {
        if !self.shared_release_quietly(conn, name) {
            return false;
        }
        if self.waits.has(LockKind::Shared, name) {
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
        self.bytes -= SHARED_HOLDER_BYTES + name_heap_of(name);
        if holders.len() == 0 {
            self.shared.remove(name);
            self.bytes -= SHARED_NAME_BYTES + name_heap_of(name);
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
}
