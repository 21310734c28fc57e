//! Waiting for a lock: `gw` and `sgw` queue here when the lock is not free, and the table
//! hands the lock to the first live waiter the moment it is released or orphaned.
//!
//! A grant that races the waiter's disconnect is safe either way: a waiter whose connection is
//! gone is skipped (its reply channel is closed); one that vanishes right after its grant, or
//! whose answer cannot be delivered, holds the lock like any other holder until its orphan
//! message (always sent when a connection ends, behind its wait request) releases it and serves
//! the next waiter. Answers are announced after the table change is complete and published.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::{unix_micros, GetOutcome, Holdings, Quota, ShardTable, Waiter};
use crate::name::LockName;
use crate::protocol::{LockKind, Reply, WaitKind};
use crate::ConnId;

impl ShardTable {
    /// `gw`/`sgw`: takes the lock for `conn` now if it can (answering on `reply`), else queues
    /// it and returns the waiter id, which the caller times out with [`Self::expire`].
    pub fn wait(
        &mut self,
        conn: ConnId,
        quota: Option<Arc<Quota>>,
        kind: WaitKind,
        hash: u64,
        name: &LockName,
        reply: oneshot::Sender<Reply>,
    ) -> Option<u64> {
        self.counts.waits_started += 1;
        let now = match kind {
            WaitKind::Exclusive => match self.get(conn, hash, name, quota.as_deref()) {
                GetOutcome::Granted | GetOutcome::AlreadyHeld => Some(Reply::Got),
                GetOutcome::OverLimit => Some(Reply::LimitReached),
                GetOutcome::Busy => None,
            },
            WaitKind::Shared { limit } => {
                let holders = self.shared.get(name.as_bytes());
                let count = holders.map_or(0, |h| h.len() as u64);
                if holders.is_some_and(|h| h.contains(conn)) {
                    Some(Reply::SharedGot(count))
                } else if count < limit && !self.waits.has(LockKind::Shared, name.as_bytes()) {
                    Some(match self.shared_get(conn, name, quota.as_deref()) {
                        Some(count) => Reply::SharedGot(count),
                        None => Reply::LimitReached,
                    })
                } else {
                    None
                }
            }
        };
        if let Some(answer) = now {
            if matches!(answer, Reply::Got | Reply::SharedGot(_)) {
                self.counts.waits_granted += 1;
            }
            // The connection waits on the other end; if it is already gone, its orphan
            // message (behind this request) releases what was just granted.
            self.announce(reply, answer);
            return None;
        }
        let id = self.waits.next_id();
        self.waits.push(
            name,
            Waiter {
                id,
                conn,
                kind,
                quota,
                since: unix_micros(),
                reply,
                timer: None,
            },
        );
        self.holdings
            .entry(conn)
            .or_insert_with(Holdings::new)
            .waits
            .push((kind.lock_kind(), name.clone(), id));
        Some(id)
    }

    /// Attaches the timeout task of waiter `id`, so it is cancelled if the waiter is served.
    pub fn set_wait_timer(
        &mut self,
        kind: WaitKind,
        name: &LockName,
        id: u64,
        timer: tokio::task::AbortHandle,
    ) {
        self.waits
            .set_timer(kind.lock_kind(), name.as_bytes(), id, timer);
    }

    /// The waiter `id` ran out of time: if it is still queued, answers it `0 Timed Out`.
    pub fn expire(&mut self, kind: LockKind, name: &LockName, id: u64) {
        if let Some(waiter) = self.waits.remove(kind, name.as_bytes(), id) {
            self.forget_wait(waiter.conn, id);
            self.counts.waits_timed_out += 1;
            self.announce(waiter.reply, Reply::TimedOut);
            if kind == LockKind::Shared {
                // A waiter at the head with a low limit may have held back others behind it.
                self.grant_shared_waiters(name.as_bytes());
            }
        }
    }

    /// Queues a waiter's answer, sent by [`Self::take_announcements`]'s caller once the
    /// change that decided it is complete and published, so a client that reads the answer and
    /// then asks `q` sees the change counted.
    fn announce(&mut self, to: oneshot::Sender<Reply>, reply: Reply) {
        self.announcements.push((to, reply));
    }

    /// Whether any waiter's answer waits to be sent (checked on every change: cheaper than
    /// taking an empty vector).
    #[inline]
    pub fn has_announcements(&self) -> bool {
        !self.announcements.is_empty()
    }

    /// The waiters' answers decided since the last call, to send now.
    pub fn take_announcements(&mut self) -> Vec<(oneshot::Sender<Reply>, Reply)> {
        std::mem::take(&mut self.announcements)
    }

    /// Removes waiter `id` from its connection's list.
    fn forget_wait(&mut self, conn: ConnId, id: u64) {
        if let Some(holdings) = self.holdings.get_mut(&conn) {
            holdings.waits.retain(|(_, _, w)| *w != id);
        }
    }

    /// `name`'s exclusive lock was just released: hands it to the first live waiter.
    pub(super) fn grant_exclusive_waiters(&mut self, hash: u64, name: &[u8]) {
        while let Some(waiter) = self.waits.pop_front(LockKind::Exclusive, name) {
            self.forget_wait(waiter.conn, waiter.id);
            if waiter.reply.is_closed() {
                continue; // the waiting connection is gone
            }
            let lock = LockName::new(name);
            match self.get(waiter.conn, hash, &lock, waiter.quota.as_deref()) {
                GetOutcome::Granted | GetOutcome::AlreadyHeld => {
                    self.counts.waits_granted += 1;
                    self.announce(waiter.reply, Reply::Got);
                    return;
                }
                GetOutcome::OverLimit => self.announce(waiter.reply, Reply::LimitReached),
                GetOutcome::Busy => {
                    // Cannot happen (the lock was just freed); keep the waiter first in line.
                    self.waits.push_front(&lock, waiter);
                    return;
                }
            }
        }
    }

    /// Room was just made in `name`'s shared lock: lets waiters in, in order, while they fit
    /// under their limits.
    pub(super) fn grant_shared_waiters(&mut self, name: &[u8]) {
        loop {
            let Some(front) = self.waits.front(LockKind::Shared, name) else {
                return;
            };
            let limit = match front.kind {
                WaitKind::Shared { limit } => limit,
                WaitKind::Exclusive => u64::MAX,
            };
            let closed = front.reply.is_closed();
            if !closed && self.shared_count(name) >= limit {
                return; // first come, first served: the head waits, and so does everyone else
            }
            let Some(waiter) = self.waits.pop_front(LockKind::Shared, name) else {
                return;
            };
            self.forget_wait(waiter.conn, waiter.id);
            if closed {
                continue;
            }
            let lock = LockName::new(name);
            match self.shared_get(waiter.conn, &lock, waiter.quota.as_deref()) {
                Some(count) => {
                    self.counts.waits_granted += 1;
                    self.announce(waiter.reply, Reply::SharedGot(count));
                }
                None => self.announce(waiter.reply, Reply::LimitReached),
            }
        }
    }
}
