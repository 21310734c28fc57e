//! What the connections of a run share: the progress counter, the `--requests` budget, and the
//! contention workload's record of who holds which lock.

use std::hash::Hasher;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use crate::cli::{Config, Workload};

/// Commands a connection takes from the shared `--requests` budget at a time, so connections
/// on different threads do not fight over one counter for every command.
const BUDGET_CHUNK: i64 = 64;

/// State shared by every connection of a run.
pub struct RunShared {
    /// Replies received so far, for the progress line.
    pub progress: AtomicU64,
    /// Commands left to send, when the run is bounded by `--requests`.
    pub(crate) budget: Option<AtomicI64>,
    /// Contention: for each key, the connection that was told it holds the lock (0: nobody).
    pub(crate) holders: Vec<AtomicU64>,
    /// Hold and idle: set when the connections should let go.
    pub stop: AtomicBool,
    /// Source of connection numbers for the exclusion check (0 means "nobody").
    pub(crate) next_conn: AtomicU64,
}

impl RunShared {
    pub fn new(config: &Config) -> Self {
        let holders = if config.workload == Workload::Contention {
            (0..config.keys.count())
                .map(|_| AtomicU64::new(0))
                .collect()
        } else {
            Vec::new()
        };
        RunShared {
            progress: AtomicU64::new(0),
            budget: config.requests.map(|n| AtomicI64::new(n as i64)),
            holders,
            stop: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
        }
    }
}

impl RunShared {
    /// Takes one command from the `--requests` budget straight from the run's counter (for
    /// wait, whose commands are far too rare to contend on it); false when it is spent.
    pub fn claim_one(&self) -> bool {
        self.budget
            .as_ref()
            .is_none_or(|budget| budget.fetch_sub(1, Ordering::Relaxed) > 0)
    }

    /// Whether the `--requests` budget is used up (never, without one).
    pub fn budget_spent(&self) -> bool {
        self.budget
            .as_ref()
            .is_some_and(|budget| budget.load(Ordering::Relaxed) <= 0)
    }
}

/// A hasher for key ids: they are already well spread (or small), so one multiply will do.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ (n >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// One connection's share of the `--requests` budget: taken from the run's counter
/// [`BUDGET_CHUNK`] commands at a time.
#[derive(Default)]
pub struct LocalBudget {
    /// Commands taken from the run's counter and not yet spent.
    left: i64,
}

impl LocalBudget {
    /// Takes one command from the budget; false when it is spent (always true without one).
    pub fn claim(&mut self, run: &RunShared) -> bool {
        let Some(budget) = &run.budget else {
            return true;
        };
        if self.left == 0 {
            let before = budget.fetch_sub(BUDGET_CHUNK, Ordering::Relaxed);
            if before <= 0 {
                return false;
            }
            self.left = before.min(BUDGET_CHUNK);
        }
        self.left -= 1;
        true
    }

    /// Returns one claimed command that was not sent after all.
    pub fn give_back(&mut self, run: &RunShared) {
        self.left += i64::from(run.budget.is_some());
    }
}
