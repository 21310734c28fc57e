//! A table's whole state as plain data, for a live upgrade: the running server takes each
//! shard's image ([`ShardTable::take_image`]) and the new process restores the images into its
//! own tables, which may be sharded differently, so each entry is routed on its own by the
//! caller and every `restore_*` method takes entries from any image.
//!
//! Times are carried so they mean the same in the new process: Unix times as they are, and
//! what is measured on a monotonic clock (waiters' timeouts, rate limiters' TATs) as the time
//! left from the moment the image was taken, since each process's monotonic clock has its own
//! origin.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{Quota, ShardTable, NIL};
use crate::name::LockName;
use crate::protocol::{Reply, WaitKind};
use crate::ratelimit::RateLimits;
use crate::ConnId;

/// One shard table's state as carried across a live upgrade.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableImage {
    /// Every held exclusive lock.
    pub exclusive: Vec<HeldImage>,
    /// Every shared lock name with its holders.
    pub shared: Vec<SharedImage>,
    /// Every queued waiter; the waiters of one queue (same kind and name) in queue order,
    /// first to be served first.
    pub waiters: Vec<WaiterImage>,
    /// Every rate limiter not back to full capacity (one that is decides as no limiter).
    pub limiters: Vec<LimiterImage>,
    /// The last fencing token the table's clock issued.
    pub last_token: u64,
    /// The running totals published as stats.
    pub counts: CountsImage,
}

/// A held exclusive lock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldImage {
    pub name: Vec<u8>,
    /// The holding connection.
    pub holder: ConnId,
    /// The grant's fencing token (also when it was taken, in Unix microseconds).
    pub token: u64,
}

/// A shared lock and its holders.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedImage {
    pub name: Vec<u8>,
    /// (connection, since when in Unix microseconds), in no particular order.
    pub holders: Vec<(ConnId, u64)>,
}

/// A queued waiter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaiterImage {
    pub conn: ConnId,
    /// None: `gw`, the exclusive lock; Some(limit): `sgw` with that limit.
    pub shared_limit: Option<u64>,
    pub name: Vec<u8>,
    /// When it started waiting, in Unix microseconds.
    pub since: u64,
    /// Milliseconds left until it times out, when the image was taken (0: none, or past).
    pub remaining_ms: u64,
}

impl WaiterImage {
    /// What the waiter waits for.
    pub fn kind(&self) -> WaitKind {
        match self.shared_limit {
            None => WaitKind::Exclusive,
            Some(limit) => WaitKind::Shared { limit },
        }
    }
}

/// A rate limiter's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimiterImage {
    pub name: Vec<u8>,
    /// Nanoseconds its theoretical arrival time (TAT, when it is back to full capacity) was
    /// ahead of the time the image was taken. The TAT is its whole state: the limit comes with
    /// every request.
    pub tat_ahead_ns: u64,
}

/// A table's running totals ([`super::TableCounts`], and the rate limiters evicted for memory).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountsImage {
    pub waits_started: u64,
    pub waits_granted: u64,
    pub waits_timed_out: u64,
    pub rate_limit_allowed: u64,
    pub rate_limit_limited: u64,
    pub rate_limit_evictions: u64,
}

/// A restored waiter whose timeout the caller arms: what it waits for, its new id, and the
/// milliseconds it has left.
pub type RestoredWaiter = (WaitKind, LockName, u64, u64);

impl ShardTable {
    /// Takes this table's whole state out as an image, leaving it as a fresh table: no locks,
    /// no waiters (their answer channels are dropped unanswered and their timeout tasks
    /// aborted), no rate limiters, counts at zero, and no memory used (published to the
    /// budget). The token clock runs on: the image has its last token. Quotas are not given
    /// back; the caller carries them over. Answers already decided and not yet taken stay.
    pub fn take_image(&mut self) -> TableImage {
        let now = Instant::now();
        let mut image = TableImage {
            last_token: self.tokens.last(),
            ..TableImage::default()
        };
        image.exclusive = self
            .index
            .iter()
            .filter_map(|&at| self.slots.get(at as usize))
            .map(|slot| HeldImage {
                name: slot.name.as_bytes().to_vec(),
                holder: slot.holder,
                token: slot.token,
            })
            .collect();
        image.shared = self
            .shared
            .iter()
            .map(|(name, holders)| SharedImage {
                name: name.as_bytes().to_vec(),
                holders: holders.iter().collect(),
            })
            .collect();
        // Dropping each waiter drops its timer guard, which aborts its timeout task.
        image.waiters = self
            .waits
            .take_all()
            .into_iter()
            .map(|(name, waiter)| WaiterImage {
                conn: waiter.conn,
                shared_limit: match waiter.kind {
                    WaitKind::Exclusive => None,
                    WaitKind::Shared { limit } => Some(limit),
                },
                name: name.as_bytes().to_vec(),
                since: waiter.since,
                remaining_ms: waiter.deadline.map_or(0, |deadline| {
                    let left = deadline.saturating_duration_since(now).as_millis();
                    u64::try_from(left).unwrap_or(u64::MAX)
                }),
            })
            .collect();
        let evicted = self.limits.evicted();
        image.limiters = self
            .limits
            .take_all(self.monotonic_ns())
            .into_iter()
            .map(|(name, tat_ahead_ns)| LimiterImage {
                name: name.as_bytes().to_vec(),
                tat_ahead_ns,
            })
            .collect();
        self.limits = RateLimits::new(self.hasher.clone());
        let counts = std::mem::take(&mut self.counts);
        image.counts = CountsImage {
            waits_started: counts.waits_started,
            waits_granted: counts.waits_granted,
            waits_timed_out: counts.waits_timed_out,
            rate_limit_allowed: counts.rate_limit_allowed,
            rate_limit_limited: counts.rate_limit_limited,
            rate_limit_evictions: evicted,
        };
        self.index = Default::default();
        self.slots = Vec::new();
        self.free_head = NIL;
        self.shared = std::collections::HashMap::with_hasher(self.hasher.clone());
        self.holdings = std::collections::HashMap::with_hasher(self.hasher.clone());
        self.bytes = 0;
        self.publish_memory();
        image
    }

    /// Stores the rate limiter of `image` so it decides from now on exactly as it would have
    /// in the process that took the image: its TAT is as far ahead of now as it was then.
    /// Counted in memory (outside the budget: the state already existed) and due for eviction
    /// like any other. A name stored already keeps the later TAT.
    pub fn restore_limiter(&mut self, image: &LimiterImage) {
        let now = self.monotonic_ns();
        let tat = now.saturating_add(u128::from(image.tat_ahead_ns));
        let tat = u64::try_from(tat).unwrap_or(u64::MAX);
        self.limits.restore(&LockName::new(&image.name), tat, now);
    }

    /// Every token issued from now on is above `last_token` (the last one another table
    /// issued).
    pub fn restore_tokens(&mut self, last_token: u64) {
        self.tokens.advance_past(last_token);
    }

    /// Tokens go on from `last_token`, the last one a stopped process issued (see
    /// [`crate::fencing::TokenClock::continue_from`]); restoring its locks afterwards keeps the
    /// clock above each of their tokens.
    pub fn continue_tokens(&mut self, last_token: u64) {
        self.tokens.continue_from(last_token);
    }

    /// Adds another table's running totals to this one's.
    pub fn add_counts(&mut self, counts: &CountsImage) {
        let own = &mut self.counts;
        own.waits_started = own.waits_started.saturating_add(counts.waits_started);
        own.waits_granted = own.waits_granted.saturating_add(counts.waits_granted);
        own.waits_timed_out = own.waits_timed_out.saturating_add(counts.waits_timed_out);
        own.rate_limit_allowed = own
            .rate_limit_allowed
            .saturating_add(counts.rate_limit_allowed);
        own.rate_limit_limited = own
            .rate_limit_limited
            .saturating_add(counts.rate_limit_limited);
        self.limits.add_evicted(counts.rate_limit_evictions);
    }

    /// Restores all of `image` into this table (every entry, unrouted: for an image taken
    /// from a table of the same shard): exclusive holders, shared holders, then the waiters in
    /// image order (so each queue keeps its order; one for which `reply_of` gives no answer
    /// channel is left out), the rate limiters, the token clock and the counts. A waiter's
    /// quota comes from `quota_of` (its connection). Returns the waiters restored, with the
    /// milliseconds each has left, for the caller to arm their timeouts
    /// ([`Self::set_wait_timer`]).
    pub fn restore_image(
        &mut self,
        image: TableImage,
        mut quota_of: impl FnMut(ConnId) -> Option<Arc<Quota>>,
        mut reply_of: impl FnMut(&WaiterImage) -> Option<oneshot::Sender<Reply>>,
    ) -> Vec<RestoredWaiter> {
        for held in &image.exclusive {
            self.restore_exclusive(held.holder, &LockName::new(&held.name), held.token);
        }
        for shared in &image.shared {
            let name = LockName::new(&shared.name);
            for &(conn, since) in &shared.holders {
                self.restore_shared(conn, &name, since);
            }
        }
        let mut restored = Vec::with_capacity(image.waiters.len());
        for waiter in &image.waiters {
            let Some(reply) = reply_of(waiter) else {
                continue;
            };
            let kind = waiter.kind();
            let name = LockName::new(&waiter.name);
            let quota = quota_of(waiter.conn);
            let id = self.restore_waiter(waiter.conn, kind, &name, waiter.since, quota, reply);
            restored.push((kind, name, id, waiter.remaining_ms));
        }
        for limiter in &image.limiters {
            self.restore_limiter(limiter);
        }
        self.restore_tokens(image.last_token);
        self.add_counts(&image.counts);
        self.publish_memory();
        restored
    }
}

#[cfg(test)]
mod tests;
