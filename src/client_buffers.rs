//! The total budget for client buffers (`--max-client-buffers`), as Redis bounds its clients
//! with `maxmemory-clients`.
//!
//! Every connection's limits hold on their own (`--max-line-bytes` of unfinished input,
//! `--max-unsent-bytes` of unread replies), but ten thousand connections each at its limit would
//! be tens of gigabytes. So every connection reports the bytes its buffers hold (input not yet
//! run, replies not yet written, what it read while a command waited) through a
//! [`BufferMeter`]; each shard thread keeps the sum for its connections in a counter of its own
//! (no lock, published for readers: the metrics endpoint shows the total). When a connection's
//! buffers grow and the total passes the budget, the connections holding the most are told to
//! close, biggest first, until what they hold covers the excess: a few hogs go, everyone else
//! is untouched. Their locks are orphaned as on any close, and each is counted in
//! `glockd_connections_closed_total{reason="client_buffers"}`.
//!
//! A meter only reports when its buffers' size changes (when they grow or give memory back,
//! not per command), so the accounting costs nothing measurable on the hot path; and the
//! registry of meters that the closing uses is kept only when a budget is set.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::Context;

use crossbeam_utils::CachePadded;
use futures_util::task::AtomicWaker;

/// Client buffers of the whole server: the budget, and each shard thread's share.
pub struct ClientBuffers {
    /// `--max-client-buffers` in bytes; 0: no budget (accounted, never enforced).
    limit: usize,
    /// Per shard thread, its connections' bytes and meters.
    parts: Box<[CachePadded<Part>]>,
    /// Held while closing connections over the budget, so two threads that see the excess at
    /// once do not both close connections for it.
    enforcing: Mutex<()>,
}

/// One shard thread's connections.
#[derive(Default)]
struct Part {
    /// Bytes its connections' buffers hold now.
    bytes: AtomicUsize,
    /// Its connections' accounts, for choosing whom to close (only with a budget). Dead ones
    /// are dropped when the list has grown to twice the live ones, and on every enforcement.
    accounts: Mutex<Vec<Weak<Account>>>,
    /// Accounts alive in `accounts`.
    live: AtomicUsize,
}

/// What one connection holds, as the closing sees it.
struct Account {
    /// Bytes its buffers hold (the meter's last report).
    bytes: AtomicUsize,
    /// Set when it is to close for the budget.
    doomed: AtomicBool,
    /// Its task, woken when it is doomed.
    waker: AtomicWaker,
}

impl ClientBuffers {
    pub fn new(limit: usize, shards: usize) -> Self {
        ClientBuffers {
            limit,
            parts: (0..shards).map(|_| Default::default()).collect(),
            enforcing: Mutex::new(()),
        }
    }

    /// Bytes every connection's buffers hold now (a sum of per-thread counters, each exact at
    /// some instant).
    pub fn total(&self) -> usize {
        self.parts
            .iter()
            .map(|part| part.bytes.load(Ordering::Relaxed))
            .sum()
    }

    /// The budget in bytes (0: none).
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A meter for a new connection on shard thread `shard`.
    pub fn meter(self: &Arc<Self>, shard: usize) -> BufferMeter {
        let account = (self.limit > 0).then(|| {
            let account = Arc::new(Account {
                bytes: AtomicUsize::new(0),
                doomed: AtomicBool::new(false),
                waker: AtomicWaker::new(),
            });
            let part = &self.parts[shard];
            let mut accounts = lock(&part.accounts);
            let live = part.live.fetch_add(1, Ordering::Relaxed) + 1;
            if accounts.len() >= 2 * live + 64 {
                accounts.retain(|a| a.strong_count() > 0);
            }
            accounts.push(Arc::downgrade(&account));
            account
        });
        BufferMeter {
            buffers: self.clone(),
            shard,
            account,
            reported: 0,
        }
    }

    /// Past the budget: dooms the connections holding the most, biggest first, until what they
    /// hold covers the excess (connections already doomed and not yet gone count as covering
    /// their share). Another thread already at it is enough.
    fn enforce(&self) {
        let Ok(_turn) = self.enforcing.try_lock() else {
            return;
        };
        let Some(mut excess) = self.total().checked_sub(self.limit).filter(|&e| e > 0) else {
            return;
        };
        let mut candidates = Vec::new();
        for part in self.parts.iter() {
            let mut accounts = lock(&part.accounts);
            accounts.retain(|a| a.strong_count() > 0);
            for account in accounts.iter().filter_map(Weak::upgrade) {
                let bytes = account.bytes.load(Ordering::Relaxed);
                if account.doomed.load(Ordering::Relaxed) {
                    excess = excess.saturating_sub(bytes);
                } else if bytes > 0 {
                    candidates.push((bytes, account));
                }
            }
        }
        if excess == 0 {
            return;
        }
        candidates.sort_unstable_by_key(|c| std::cmp::Reverse(c.0));
        for (bytes, account) in candidates {
            account.doomed.store(true, Ordering::Relaxed);
            account.waker.wake();
            excess = excess.saturating_sub(bytes);
            if excess == 0 {
                break;
            }
        }
    }
}

// Every update under these locks is a single push or retain: a poisoned lock is still whole.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// One connection's report of its buffers' size (see the module's comment). Dropping it (the
/// connection ends) takes its bytes off the total.
pub struct BufferMeter {
    buffers: Arc<ClientBuffers>,
    /// The shard thread the connection lives on (whose counter it adds to).
    shard: usize,
    /// Its account, when there is a budget to enforce.
    account: Option<Arc<Account>>,
    /// Bytes last reported.
    reported: usize,
}

impl BufferMeter {
    /// Reports that the connection's buffers hold `bytes` now. Does nothing unless that
    /// changed; when they grew past the budget, closes the biggest connections.
    #[inline]
    pub fn report(&mut self, bytes: usize) {
        if bytes != self.reported {
            self.changed(bytes);
        }
    }

    #[cold]
    fn changed(&mut self, bytes: usize) {
        let part = &self.buffers.parts[self.shard];
        let grew = bytes > self.reported;
        if grew {
            part.bytes
                .fetch_add(bytes - self.reported, Ordering::Relaxed);
        } else {
            part.bytes
                .fetch_sub(self.reported - bytes, Ordering::Relaxed);
        }
        self.reported = bytes;
        if let Some(account) = &self.account {
            account.bytes.store(bytes, Ordering::Relaxed);
            if grew && self.buffers.total() > self.buffers.limit {
                self.buffers.enforce();
            }
        }
    }

    /// Whether the connection is to close for the budget; if not, `cx`'s task is woken when
    /// it is.
    pub fn poll_doomed(&self, cx: &mut Context<'_>) -> bool {
        let Some(account) = &self.account else {
            return false;
        };
        if account.doomed.load(Ordering::Relaxed) {
            return true;
        }
        account.waker.register(cx.waker());
        account.doomed.load(Ordering::Relaxed)
    }

    /// Whether the connection is to close for the budget.
    pub fn is_doomed(&self) -> bool {
        self.account
            .as_ref()
            .is_some_and(|a| a.doomed.load(Ordering::Relaxed))
    }
}

impl Drop for BufferMeter {
    fn drop(&mut self) {
        self.report(0);
        if self.account.is_some() {
            self.buffers.parts[self.shard]
                .live
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_biggest_go_first_and_only_as_many_as_the_excess_needs() {
        let buffers = Arc::new(ClientBuffers::new(1000, 2));
        let mut small = buffers.meter(0);
        let mut middle = buffers.meter(1);
        small.report(100);
        middle.report(400);
        assert_eq!(buffers.total(), 500);
        assert!(!small.is_doomed() && !middle.is_doomed());
        let mut big = buffers.meter(0);
        big.report(700);
        // 1200 > 1000: the biggest (700) covers the excess of 200.
        assert!(big.is_doomed());
        assert!(!small.is_doomed() && !middle.is_doomed());
        // Growing again while the doomed one is still there closes no one else.
        small.report(150);
        assert!(!small.is_doomed() && !middle.is_doomed());
        drop(big);
        assert_eq!(buffers.total(), 550);
        middle.report(0);
        small.report(0);
        assert_eq!(buffers.total(), 0);
    }

    #[test]
    fn without_a_budget_bytes_are_counted_and_no_one_is_closed() {
        let buffers = Arc::new(ClientBuffers::new(0, 1));
        let mut meter = buffers.meter(0);
        meter.report(1 << 30);
        assert_eq!(buffers.total(), 1 << 30);
        assert!(!meter.is_doomed());
        drop(meter);
        assert_eq!(buffers.total(), 0);
    }
}
