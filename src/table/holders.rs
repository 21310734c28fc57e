//! The holders of shared locks, and the lock allowance of a connection.

use std::sync::atomic::{AtomicU64, Ordering};

use smallvec::SmallVec;

use crate::{ConnId, NameHasher};

/// The connections sharing one shared lock. Almost always a handful, kept inline; a name that
/// thousands of connections hold (a popular rate limit) moves to a hash set.
/// Each holder comes with the time it took the lock (Unix microseconds), for listings.
pub(crate) enum Holders {
    Few(SmallVec<[(ConnId, u64); 4]>),
    Many(hashbrown::HashMap<ConnId, u64, NameHasher>),
}

/// A `Few` set grows into a `Many` set past this many holders.
const FEW_HOLDERS: usize = 32;

impl Holders {
    pub fn new() -> Self {
        Holders::Few(SmallVec::new())
    }

    pub fn len(&self) -> usize {
        match self {
            Holders::Few(v) => v.len(),
            Holders::Many(s) => s.len(),
        }
    }

    /// Adds `conn`, holding since `since`; false if it was already a holder.
    pub fn insert(&mut self, conn: ConnId, since: u64) -> bool {
        match self {
            Holders::Few(v) => {
                if v.iter().any(|&(c, _)| c == conn) {
                    return false;
                }
                if v.len() < FEW_HOLDERS {
                    v.push((conn, since));
                } else {
                    let mut set: hashbrown::HashMap<ConnId, u64, NameHasher> =
                        v.iter().copied().collect();
                    set.insert(conn, since);
                    *self = Holders::Many(set);
                }
                true
            }
            Holders::Many(s) => s.insert(conn, since).is_none(),
        }
    }

    /// Removes `conn`; false if it was not a holder.
    pub fn remove(&mut self, conn: ConnId) -> bool {
        match self {
            Holders::Few(v) => match v.iter().position(|&(c, _)| c == conn) {
                Some(at) => {
                    v.swap_remove(at);
                    true
                }
                None => false,
            },
            Holders::Many(s) => s.remove(&conn).is_some(),
        }
    }

    pub fn contains(&self, conn: ConnId) -> bool {
        match self {
            Holders::Few(v) => v.iter().any(|&(c, _)| c == conn),
            Holders::Many(s) => s.contains_key(&conn),
        }
    }

    /// Every (holder, since).
    pub fn iter(&self) -> Box<dyn Iterator<Item = (ConnId, u64)> + '_> {
        match self {
            Holders::Few(v) => Box::new(v.iter().copied()),
            Holders::Many(s) => Box::new(s.iter().map(|(&c, &t)| (c, t))),
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
    pub fn try_take(&self) -> bool {
        if self.held.fetch_add(1, Ordering::AcqRel) >= self.limit {
            self.held.fetch_sub(1, Ordering::AcqRel);
            false
        } else {
            true
        }
    }

    pub fn give_back(&self) {
        self.held.fetch_sub(1, Ordering::AcqRel);
    }

    /// Whether `pending` more grants could reach the limit: only then does the order of a
    /// connection's commands on different shards change what they answer.
    #[inline]
    pub fn may_reach(&self, pending: usize) -> bool {
        self.held().saturating_add(pending as u64) >= self.limit
    }

    /// A live upgrade's successor: the connection holds `held` locks already.
    pub fn restore_held(&self, held: u64) {
        self.held.store(held, Ordering::Release);
    }

    /// Locks held now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }
}
