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

use super::{holdings_of, unix_micros, GetOutcome, Quota, ShardTable, Waiter, WAIT_ENTRY_BYTES};
use crate::memory::name_heap;
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
                GetOutcome::OutOfMemory => Some(Reply::OutOfMemory),
                GetOutcome::Busy => None,
            },
            WaitKind::Shared { limit } => {
                let holders = self.shared.get(name.as_bytes());
                let count = holders.map_or(0, |h| h.len() as u64);
                if holders.is_some_and(|h| h.contains(conn)) {
                    Some(Reply::SharedGot(count))
                } else if count < limit {
                    // Granted at once even if others wait: every grant pass leaves no queued
                    // waiter that fits under its limit, so those still queued could not have
                    // been served now, and this does not overtake any of them.
                    Some(match self.shared_get(conn, name, quota.as_deref()) {
                        Ok(count) => Reply::SharedGot(count),
                        Err(refused) => refused,
                    })
                } else {
                    None
                }
            }
        };
        // Queueing stores a waiter: only within the memory budget.
        let now = now.or_else(|| {
            let cost =
                self.waits.cost_of(kind.lock_kind(), name) + WAIT_ENTRY_BYTES + name_heap(name);
            (!self.fits(cost)).then_some(Reply::OutOfMemory)
        });
        if let Some(answer) = now {
            if matches!(answer, Reply::Got | Reply::SharedGot(_)) {
                self.counts.waits_granted += 1;
            }
            // The connection waits on the other end; if it is already gone, its orphan
            // message (behind this request) releases what was just granted.
            self.announce(reply, answer);
            return None;
        }
        Some(self.queue(conn, quota, kind, name, unix_micros(), reply))
    }

    /// Queues `conn` at the back of `name`'s queue, as it waited in another process before a
    /// live upgrade (since `since`, Unix microseconds), and returns its new waiter id; the
    /// caller arms its timeout with [`Self::set_wait_timer`]. Counted like any queued waiter,
    /// but not checked against the memory budget (the state already existed), not counted as
    /// a wait started, and never granted here: restored holders and waiters were consistent.
    pub fn restore_waiter(
        &mut self,
        conn: ConnId,
        kind: WaitKind,
        name: &LockName,
        since: u64,
        quota: Option<Arc<Quota>>,
        reply: oneshot::Sender<Reply>,
    ) -> u64 {
        self.queue(conn, quota, kind, name, since, reply)
    }

    /// Queues a waiter behind everyone waiting for `name` and counts its bytes; returns its id.
    fn queue(
        &mut self,
        conn: ConnId,
        quota: Option<Arc<Quota>>,
        kind: WaitKind,
        name: &LockName,
        since: u64,
        reply: oneshot::Sender<Reply>,
    ) -> u64 {
        let id = self.waits.next_id();
        self.waits.push(
            name,
            Waiter {
                id,
                conn,
                kind,
                quota,
                since,
                reply,
                deadline: None,
                timer: None,
            },
        );
        self.bytes += WAIT_ENTRY_BYTES + name_heap(name);
        holdings_of(&mut self.holdings, &mut self.bytes, conn)
            .waits
            .push((kind.lock_kind(), name.clone(), id));
        id
    }

    /// Attaches the timeout task of waiter `id`, which fires at `deadline`, so it is
    /// cancelled if the waiter is served.
    pub fn set_wait_timer(
        &mut self,
        kind: WaitKind,
        name: &LockName,
        id: u64,
        timer: tokio::task::AbortHandle,
        deadline: std::time::Instant,
    ) {
        self.waits
            .set_timer(kind.lock_kind(), name.as_bytes(), id, timer, deadline);
    }

    /// The waiter `id` ran out of time: if it is still queued, answers it `0 Timed Out`.
    pub fn expire(&mut self, kind: LockKind, name: &LockName, id: u64) {
        if let Some(waiter) = self.waits.remove(kind, name.as_bytes(), id) {
            self.forget_wait(waiter.conn, id);
            self.counts.waits_timed_out += 1;
            self.announce(waiter.reply, Reply::TimedOut);
            // No grant pass: a waiter leaving changes no holder count, and a shared waiter
            // never holds back the ones behind it (see `grant_shared_waiters`), so nobody
            // could be let in now who was not let in already.
        }
    }

    /// Shutdown: answers every waiter queued here `0 Timed Out`, as if its time were up, so
    /// that its connection goes on to answer the commands it sent behind the wait before it
    /// closes.
    pub fn expire_all(&mut self) {
        for kind in [LockKind::Exclusive, LockKind::Shared] {
            let queued: Vec<(LockName, u64)> = self
                .waits
                .iter(kind, None)
                .map(|(name, waiter)| (name.clone(), waiter.id))
                .collect();
            for (name, id) in queued {
                self.expire(kind, &name, id);
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
            if let Some(at) = holdings.waits.iter().position(|(_, _, w)| *w == id) {
                let (_, name, _) = holdings.waits.remove(at);
                self.bytes -= WAIT_ENTRY_BYTES + name_heap(&name);
            }
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
            match self.take(waiter.conn, hash, &lock, waiter.quota.as_deref(), false) {
                GetOutcome::Granted | GetOutcome::AlreadyHeld => {
                    self.counts.waits_granted += 1;
                    self.announce(waiter.reply, Reply::Got);
                    return;
                }
                GetOutcome::OverLimit => self.announce(waiter.reply, Reply::LimitReached),
                GetOutcome::OutOfMemory => self.announce(waiter.reply, Reply::OutOfMemory),
                GetOutcome::Busy => {
                    // Cannot happen (the lock was just freed); keep the waiter first in line.
                    self.waits.push_front(&lock, waiter);
                    return;
                }
            }
        }
    }

    /// Room was just made in `name`'s shared lock: walks the queue in order and lets in every
    /// waiter that fits under its own limit. One that does not fit keeps its place without
    /// holding back those behind it, so a waiter whose limit is not met (a low limit, or a
    /// client that half-closed and waits for its turn) never blocks one that can be served
    /// now; among those that fit, first come, first served.
    ///
    /// One pass is enough: the holder count only grows during the walk, so a waiter passed over stays unable to fit until the next release,
    /// which walks again. After the pass no queued waiter fits.
    pub(super) fn grant_shared_waiters(&mut self, name: &[u8]) {
        // How many waiters at the front were passed over; they stay queued, in order.
        let mut passed = 0;
        loop {
            let count = self.shared_count(name);
            // The next waiter to take out: one whose connection is gone, or one that fits.
            let next = self
                .waits
                .iter(LockKind::Shared, Some(name))
                .skip(passed)
                .enumerate()
                .find(|(_, (_, w))| w.reply.is_closed() || count < shared_limit(w.kind))
                .map(|(skipped, (_, w))| (skipped, w.id));
            let Some((skipped, id)) = next else {
                return;
            };
            passed += skipped;
            let Some(waiter) = self.waits.remove(LockKind::Shared, name, id) else {
                return;
            };
            self.forget_wait(waiter.conn, waiter.id);
            if waiter.reply.is_closed() {
                continue; // the waiting connection is gone
            }
            let lock = LockName::new(name);
            match self.shared_take(waiter.conn, &lock, waiter.quota.as_deref(), false) {
                Ok(count) => {
                    self.counts.waits_granted += 1;
                    self.announce(waiter.reply, Reply::SharedGot(count));
                }
                Err(refused) => self.announce(waiter.reply, refused),
            }
        }
    }
}

/// The most holders a shared waiter accepts before it takes its slot (`sgw`'s LIMIT).
fn shared_limit(kind: WaitKind) -> u64 {
    match kind {
        WaitKind::Shared { limit } => limit,
        // Not queued for a shared lock; were it there, nothing would stop it.
        WaitKind::Exclusive => u64::MAX,
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot::{self, error::TryRecvError, Receiver};

    use super::*;

    /// `sgw` for `conn` with `limit`: the receiver of its answer, and its waiter id if queued.
    fn sgw(t: &mut ShardTable, conn: ConnId, limit: u64) -> (Receiver<Reply>, Option<u64>) {
        let (tx, rx) = oneshot::channel();
        let name = LockName::from("pool");
        let hash = t.hash(name.as_bytes());
        let id = t.wait(conn, None, WaitKind::Shared { limit }, hash, &name, tx);
        (rx, id)
    }

    fn sg(t: &mut ShardTable, conn: ConnId) {
        t.shared_get(conn, &LockName::from("pool"), None)
            .expect("no quota");
    }

    /// The answer `rx` got, once the table's decisions are announced (as the shard does after
    /// every change).
    fn answer(t: &mut ShardTable, rx: &mut Receiver<Reply>) -> Option<Reply> {
        for (to, reply) in t.take_announcements() {
            let _ = to.send(reply);
        }
        match rx.try_recv() {
            Ok(reply) => Some(reply),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Closed) => panic!("the waiter was dropped unanswered"),
        }
    }

    #[test]
    fn a_waiter_that_fits_is_served_past_one_that_does_not() {
        let mut t = table_with_holders(3);
        let (mut low, id) = sgw(&mut t, 10, 3);
        assert!(id.is_some(), "3 holders, limit 3: it waits");
        // Fits under its own limit: granted at once, though another waits.
        let (mut high, id) = sgw(&mut t, 11, 5);
        assert_eq!(
            (id, answer(&mut t, &mut high)),
            (None, Some(Reply::SharedGot(4)))
        );
        let (mut later, id) = sgw(&mut t, 12, 5);
        assert_eq!(
            (id, answer(&mut t, &mut later)),
            (None, Some(Reply::SharedGot(5)))
        );
        let (mut queued, id) = sgw(&mut t, 13, 5);
        assert!(id.is_some());
        // One slot frees: the walk passes over the low limit and serves the one behind it.
        assert!(t.shared_release(1, b"pool"));
        assert_eq!(answer(&mut t, &mut queued), Some(Reply::SharedGot(5)));
        assert_eq!(answer(&mut t, &mut low), None);
        assert_eq!(t.waiters(), 1);
        // The low limit is served once the count is below it.
        for conn in [2, 3, 11] {
            assert!(t.shared_release(conn, b"pool"));
        }
        assert_eq!(answer(&mut t, &mut low), Some(Reply::SharedGot(3)));
        assert_eq!(t.waiters(), 0);
    }

    #[test]
    fn waiters_that_fit_are_served_in_order() {
        let mut t = table_with_holders(3);
        let (mut first, _) = sgw(&mut t, 10, 3);
        let (mut strict, _) = sgw(&mut t, 11, 1);
        let (mut second, _) = sgw(&mut t, 12, 3);
        assert_eq!(t.waiters(), 3);
        // Room for one: the first that fits, not the second.
        assert!(t.shared_release(1, b"pool"));
        assert_eq!(answer(&mut t, &mut first), Some(Reply::SharedGot(3)));
        assert_eq!(answer(&mut t, &mut second), None);
        assert!(t.shared_release(2, b"pool"));
        assert_eq!(answer(&mut t, &mut second), Some(Reply::SharedGot(3)));
        assert_eq!(answer(&mut t, &mut strict), None);
        assert_eq!(t.waiters(), 1);
    }

    #[test]
    fn waiters_that_are_gone_leave_the_queue_wherever_they_stand() {
        let mut t = table_with_holders(2);
        let (_kept, _) = sgw(&mut t, 10, 1);
        let (gone, _) = sgw(&mut t, 11, 2);
        let (mut next, _) = sgw(&mut t, 12, 2);
        drop(gone);
        assert!(t.shared_release(1, b"pool"));
        assert_eq!(answer(&mut t, &mut next), Some(Reply::SharedGot(2)));
        assert_eq!(t.waiters(), 1, "only the waiter with limit 1 is left");
    }

    fn table_with_holders(n: ConnId) -> ShardTable {
        let mut t = ShardTable::new(crate::name_hasher());
        for conn in 1..=n {
            sg(&mut t, conn);
        }
        t
    }
}
