//! Counted shared locks: a small holder set per name, and per connection the names it holds.

use super::holders::Holders;
use super::{unix_micros, Holdings, Quota, ShardTable};
use crate::name::LockName;
use crate::protocol::LockKind;
use crate::ConnId;

impl ShardTable {
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
}
