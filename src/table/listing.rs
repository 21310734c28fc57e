//! Listings of a shard's locks: for `d`/`sd`/`dump`, and, with ages and waiters, for `h`.

use super::{Holders, ShardTable};
use crate::name::LockName;
use crate::protocol::LockKind;
use crate::ConnId;

/// How a connection stands with a lock, in the `h` listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Holder,
    Waiter,
    SharedHolder,
    SharedWaiter,
}

impl Role {
    pub fn word(self) -> &'static str {
        match self {
            Role::Holder => "holder",
            Role::Waiter => "waiter",
            Role::SharedHolder => "shared-holder",
            Role::SharedWaiter => "shared-waiter",
        }
    }
}

/// One row of the `h` listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderRow {
    pub name: LockName,
    pub role: Role,
    pub conn: ConnId,
    /// Since when (Unix microseconds): when the lock was taken, or the wait began.
    pub since: u64,
}

impl ShardTable {
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

    /// The exclusive locks in slab slots `from..from + count`, for a listing built a slice at a
    /// time; returns where the next slice starts, or None when this was the last. A lock taken
    /// or released between slices may or may not be seen, and one released and taken again
    /// may be seen twice (the caller drops the repeat), as with any scan of a live table.
    pub fn list_exclusive_slots(
        &self,
        from: usize,
        count: usize,
        rows: &mut Vec<(LockName, ConnId)>,
    ) -> Option<usize> {
        let end = from.saturating_add(count).min(self.slots.len());
        for slot in self.slots.get(from..end).unwrap_or_default() {
            if slot.holder != super::FREE {
                rows.push((slot.name.clone(), slot.holder));
            }
        }
        (end < self.slots.len()).then_some(end)
    }

    /// Every (shared lock, holder) pair (or only `name`'s), unsorted.
    pub fn list_shared(&self, name: Option<&[u8]>) -> Vec<(LockName, ConnId)> {
        let mut out = Vec::new();
        let mut push = |name: &LockName, holders: &Holders| {
            out.extend(holders.iter().map(|(conn, _)| (name.clone(), conn)));
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

    /// Every holder and waiter of every lock here (or of `name`'s exclusive and shared locks),
    /// with the time each took the lock or began waiting.
    pub fn list_holders(&self, name: Option<(u64, &[u8])>) -> Vec<HolderRow> {
        let mut rows: Vec<HolderRow> = self
            .list_exclusive(name)
            .into_iter()
            .map(|(lock, conn)| {
                let hash = self.hasher.hash_one(lock.as_bytes());
                let since = self.token(hash, lock.as_bytes()).unwrap_or_default();
                HolderRow {
                    name: lock,
                    role: Role::Holder,
                    conn,
                    since,
                }
            })
            .collect();
        let bytes = name.map(|(_, n)| n);
        let mut shared = |lock: &LockName, holders: &Holders| {
            rows.extend(holders.iter().map(|(conn, since)| HolderRow {
                name: lock.clone(),
                role: Role::SharedHolder,
                conn,
                since,
            }));
        };
        match bytes {
            Some(n) => {
                if let Some((lock, holders)) = self.shared.get_key_value(n) {
                    shared(lock, holders);
                }
            }
            None => self.shared.iter().for_each(|(l, h)| shared(l, h)),
        }
        for (kind, role) in [
            (LockKind::Exclusive, Role::Waiter),
            (LockKind::Shared, Role::SharedWaiter),
        ] {
            rows.extend(self.waits.iter(kind, bytes).map(|(lock, w)| HolderRow {
                name: lock.clone(),
                role,
                conn: w.conn,
                since: w.since,
            }));
        }
        rows
    }
}
