//! A shard's part in a live upgrade: give up its table as an image, or take one in (the
//! successor's, or its own again when the upgrade is called off).

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{Departure, ShardCore};
use crate::name::LockName;
use crate::protocol::{Reply, WaitKind};
use crate::table::{HeldImage, LimiterImage, Quota, SharedImage, TableImage, WaiterImage};
use crate::ConnId;

/// What a shard gives up: its table, and the connections gone whose locks it had still to
/// release (their departures kept alive, so their registry records stay meanwhile).
pub struct Exported {
    /// The shard it came from (answers arrive in any order).
    pub shard: usize,
    pub table: TableImage,
    pub departed: Vec<(ConnId, Arc<Departure>)>,
}

/// The part of the state that belongs to one shard, routed by this server's keys.
#[derive(Default)]
pub struct TablePart {
    pub exclusive: Vec<HeldImage>,
    pub shared: Vec<SharedImage>,
    /// Waiters in queue order, each with the channel its connection will read the answer on.
    pub waiters: Vec<(WaiterImage, oneshot::Sender<Reply>)>,
    pub limiters: Vec<LimiterImage>,
    pub last_token: u64,
    pub counts: Option<crate::table::CountsImage>,
    /// Carried connections' lock allowances, by connection.
    pub quotas: Arc<HashMap<ConnId, Arc<Quota>>>,
    /// Connections gone whose locks are to be released once the table is in place.
    pub departed: Vec<(ConnId, Arc<Departure>)>,
}

impl ShardCore {
    /// Takes this shard's table (leaving it empty) and its queue of departed connections.
    pub fn export(&self) -> Exported {
        let table = self.with_table(|table| table.take_image());
        let departed = self.departed.borrow_mut().drain(..).collect();
        Exported {
            shard: self.id,
            table,
            departed,
        }
    }

    /// Takes `part` into this shard's table: holders first, then waiters in their queues'
    /// order (their timeouts armed for the time they had left), then rate limiters, the token
    /// clock and the counts; finally the departed connections' locks are queued for release.
    pub fn restore(self: &Rc<Self>, part: TablePart) {
        let TablePart {
            exclusive,
            shared,
            waiters,
            limiters,
            last_token,
            counts,
            quotas,
            departed,
        } = part;
        let armed = self.with_table(|table| {
            table.continue_tokens(last_token);
            for held in &exclusive {
                table.restore_exclusive(held.holder, &LockName::from(&held.name[..]), held.token);
            }
            for lock in &shared {
                let name = LockName::from(&lock.name[..]);
                for &(conn, since) in &lock.holders {
                    table.restore_shared(conn, &name, since);
                }
            }
            let mut armed = Vec::with_capacity(waiters.len());
            for (waiter, reply) in waiters {
                let kind = match waiter.shared_limit {
                    None => WaitKind::Exclusive,
                    Some(limit) => WaitKind::Shared { limit },
                };
                let name = LockName::from(&waiter.name[..]);
                let quota = quotas.get(&waiter.conn).cloned();
                let id = table.restore_waiter(waiter.conn, kind, &name, waiter.since, quota, reply);
                armed.push((kind, name, id, waiter.remaining_ms));
            }
            for limiter in &limiters {
                table.restore_limiter(limiter);
            }
            if let Some(counts) = &counts {
                table.add_counts(counts);
            }
            armed
        });
        for (kind, name, id, remaining_ms) in armed {
            self.arm_wait_timer(kind, name, id, remaining_ms);
        }
        for (conn, departure) in departed {
            self.orphan(conn, departure);
        }
    }

    /// Times out waiter `id` after `ms` unless it is served first.
    pub(super) fn arm_wait_timer(
        self: &Rc<Self>,
        kind: WaitKind,
        name: LockName,
        id: u64,
        ms: u64,
    ) {
        let core = self.clone();
        let timed = name.clone();
        let wait = Duration::from_millis(ms);
        let timer = tokio::task::spawn_local(async move {
            tokio::time::sleep(wait).await;
            core.with_table(|table| table.expire(kind.lock_kind(), &timed, id));
        });
        let now = Instant::now();
        let deadline = now
            .checked_add(wait)
            .unwrap_or(now + Duration::from_secs(86_400 * 365));
        self.table
            .borrow_mut()
            .set_wait_timer(kind, &name, id, timer.abort_handle(), deadline);
    }
}
