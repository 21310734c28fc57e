//! The table handler: everything a shard thread does to its slice of the lock table, whether
//! a connection on this thread asks directly or another thread asks through the mailbox
//! ([`LockMsg`]).
//!
//! Every change to the table goes through [`ShardCore::with_table`], which holds the one
//! borrow, aborts the process if the change panics half-way, and publishes the table's sizes to
//! the stats cell afterwards.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::{ServerState, ShardCore, ORPHAN_SLICE};
use crate::name::LockName;
use crate::protocol::{ListKind, LockKind, LockOp, Reply, WaitKind};
use crate::table::{Quota, ShardTable};
use crate::ConnId;

/// One lock operation on its way to the owning shard.
pub struct RoutedOp {
    pub op: LockOp,
    /// `Router::route`'s hash of `name`.
    pub hash: u64,
    pub name: LockName,
}

/// What a shard sends back for a [`LockMsg::Batch`]: the replies, and the op vector (emptied)
/// so the connection can reuse its capacity.
pub struct BatchDone {
    pub ops: Vec<RoutedOp>,
    pub replies: Vec<Reply>,
}

/// A listing of (name, holder text) pairs from one shard. The holder text is shared with the
/// registry (see [`crate::registry::Registry::holder_text`]), not copied per row.
pub type Listing = Vec<(LockName, Arc<[u8]>)>;

/// Slab slots scanned per slice of a listing of every exclusive lock: a shard holding half a
/// million locks lists them in slices, serving everyone else in between, as orphaning does.
const LIST_SLICE: usize = 4096;

/// `gw`/`sgw`: take the lock for `conn`, or queue it for up to `ms` milliseconds; the answer
/// goes to `reply` whenever it is decided.
pub struct WaitRequest {
    pub conn: ConnId,
    /// The connection's lock allowance, if limited.
    pub quota: Option<Arc<Quota>>,
    pub kind: WaitKind,
    /// The routing hash of `name`.
    pub hash: u64,
    pub name: LockName,
    pub ms: u64,
    pub reply: oneshot::Sender<Reply>,
}

/// A connection that has gone, while its locks are being released. Until every shard is done,
/// listings still show its locks under its real id (or registered name); when the last shard
/// drops its reference, the registry forgets the connection.
pub struct Departure {
    pub server: Arc<ServerState>,
    pub conn: ConnId,
    /// The connection's protocol id, for `-verbose` logging (None when not verbose).
    pub label: Option<Arc<str>>,
}

impl Drop for Departure {
    fn drop(&mut self) {
        self.server.registry.remove(self.conn);
    }
}

/// One connection's operations for one shard, from one batch of its pipelined lines.
pub struct ConnBatch {
    pub conn: ConnId,
    /// The connection's lock allowance, when `--max-locks-per-conn` is set.
    pub quota: Option<Arc<Quota>>,
    pub ops: Vec<RoutedOp>,
    /// Reply buffer to fill (sent empty, reused across batches).
    pub replies: Vec<Reply>,
    /// Where the connection waits for its replies. Answered on the connection's own thread,
    /// which gets them back in one [`super::ShardMsg::Replies`] per batch message.
    pub done: oneshot::Sender<BatchDone>,
}

/// What a thread's connections send a shard in one scheduler pass, in the order they sent it.
pub enum Outgoing {
    /// A connection's operations.
    Ops(ConnBatch),
    /// `conn` is gone: release everything it holds here. It travels the same way as the
    /// connection's operations, behind them, so a lock granted by a batch still in flight is
    /// released too.
    Orphan {
        conn: ConnId,
        /// Held until this shard has released everything; the last holder forgets the
        /// connection's registry record.
        departure: Arc<Departure>,
    },
}

/// Replies on their way back to the thread whose connections asked.
pub type Replies = Vec<(oneshot::Sender<BatchDone>, BatchDone)>;

/// Work on a shard's lock table, sent by connections on other threads.
pub enum LockMsg {
    /// Apply each connection's operations in order. Every connection of the thread `origin`
    /// that had work for this shard in one scheduler pass is in the one message, so the
    /// wake-up it costs is shared; the replies go back to `origin` the same way.
    Batches {
        origin: usize,
        batches: Vec<Outgoing>,
    },
    /// `gw`/`sgw`: take the lock, or queue for it.
    Wait(WaitRequest),
    /// A listing of this shard's locks (all, or one name's).
    List {
        kind: ListKind,
        name: Option<(u64, LockName)>,
        done: oneshot::Sender<Listing>,
    },
    /// A health check (`/healthz`): answered at once, which shows the shard's loop is serving.
    Ping(oneshot::Sender<()>),
}

impl ShardCore {
    /// Runs `change` on the table: the one place the table is borrowed for writing. A panic
    /// inside aborts the process (see [`AbortOnPanic`]); the table's sizes are published to the
    /// stats cell after every change, so `q` never waits on a mailbox, and only then are the
    /// waiters the change answered told, so what they read next (`q`) includes it.
    #[inline]
    pub(super) fn with_table<R>(&self, change: impl FnOnce(&mut ShardTable) -> R) -> R {
        let mut table = self.table.borrow_mut();
        let guard = AbortOnPanic;
        let result = change(&mut table);
        std::mem::forget(guard);
        self.publish_sizes(&mut table);
        if table.has_announcements() {
            for (to, reply) in table.take_announcements() {
                // A waiter gone since is released by its orphan message.
                let _ = to.send(reply);
            }
        }
        result
    }

    pub(super) fn publish_sizes(&self, table: &mut ShardTable) {
        let cell = self.cell();
        cell.memory_used.set(table.publish_memory());
        cell.rate_limit_evictions.set(table.rate_limit_evictions());
        cell.locks.set(table.exclusive_len() as u64);
        cell.shared_locks.set(table.shared_len() as u64);
        let counts = &table.counts;
        cell.lock_waiters.set(table.waiters() as u64);
        cell.lock_waits_started.set(counts.waits_started);
        cell.lock_waits_granted.set(counts.waits_granted);
        cell.lock_waits_timed_out.set(counts.waits_timed_out);
        cell.rate_limit_allowed.set(counts.rate_limit_allowed);
        cell.rate_limit_limited.set(counts.rate_limit_limited);
    }

    /// Applies one operation to this shard's table.
    #[inline]
    pub fn apply(
        &self,
        conn: ConnId,
        quota: Option<&Quota>,
        op: LockOp,
        hash: u64,
        name: &LockName,
    ) -> Reply {
        let reply = self.with_table(|table| table.apply(conn, op, hash, name, quota));
        self.cell().counted(op.verb(), reply)
    }

    /// Applies `ops` in order, appending a reply for each.
    pub fn apply_batch(
        &self,
        conn: ConnId,
        quota: Option<&Quota>,
        ops: &[RoutedOp],
        replies: &mut Vec<Reply>,
    ) {
        let cell = self.cell();
        self.with_table(|table| {
            replies.extend(ops.iter().map(|op| {
                cell.counted(
                    op.op.verb(),
                    table.apply(conn, op.op, op.hash, &op.name, quota),
                )
            }))
        });
    }

    /// `gw`/`sgw` on this shard: grant now, or queue and arm the timeout.
    pub fn start_wait(self: &Rc<Self>, request: WaitRequest) {
        let WaitRequest {
            conn,
            quota,
            kind,
            hash,
            name,
            ms,
            reply,
        } = request;
        // While the server shuts down, a wait that cannot be granted at once times out at once
        // (see [`Self::expire_waits`]).
        let closing = self.is_closing();
        let Some(id) = self.with_table(|table| {
            let id = table.wait(conn, quota, kind, hash, &name, reply)?;
            if closing {
                table.expire(kind.lock_kind(), &name, id);
                return None;
            }
            Some(id)
        }) else {
            return;
        };
        let deadline = crate::table::deadline_in(ms);
        let core = self.clone();
        let timed = name.clone();
        let timer = tokio::task::spawn_local(async move {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            core.with_table(|table| table.expire(kind.lock_kind(), &timed, id));
        });
        self.table
            .borrow_mut()
            .set_wait_timer(kind, &name, id, timer.abort_handle(), deadline);
    }

    /// Shutdown: every waiter queued on this shard is answered `0 Timed Out` now, wherever its
    /// connection lives, instead of being dropped unanswered, so that it and the commands it
    /// pipelined behind the wait are answered before its connection closes. Waits that come
    /// later are timed out as they come (see [`Self::start_wait`]).
    pub fn expire_waits(&self) {
        self.with_table(|table| table.expire_all());
    }

    /// Forgets rate limiters that are back to full capacity, for the life of the shard: once
    /// a second, a slice at a time, letting this thread's clients run between slices until
    /// nothing more is due (the work is what expired, never a scan of every name).
    pub async fn evict_rate_limits(self: Rc<Self>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            loop {
                let more = {
                    let mut table = self.table.borrow_mut();
                    let more = table.evict_rate_limits();
                    self.publish_sizes(&mut table);
                    more
                };
                if !more {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
    }

    /// Releases up to `budget` of the locks `conn` held in this shard. Returns the work done,
    /// counted in locks (at least one: a connection with nothing left here still costs a
    /// look-up, so a crowd of them is bounded per turn too), and whether nothing is left.
    fn orphan_slice(&self, conn: ConnId, label: Option<&str>, budget: usize) -> (usize, bool) {
        let cell = self.cell();
        let (orphaned, done) = self.with_table(|table| {
            let (orphaned, done) = table.orphan_some(conn, budget, |name| {
                if let Some(label) = label {
                    tracing::info!(
                        event = "orphan",
                        conn = %label,
                        name = crate::logging::printable(name.as_bytes()).as_ref()
                    );
                }
            });
            // Counted inside the change, so a waiter handed one of these locks, and told so
            // once the change is published, sees the orphan counted in its next `q`.
            cell.orphans.add(orphaned.exclusive);
            cell.shared_orphans.add(orphaned.shared);
            (orphaned, done)
        });
        if let Some(label) = label {
            if orphaned.shared > 0 {
                tracing::info!(event = "orphan", conn = %label, shared = orphaned.shared);
            }
        }
        let released = usize::try_from(orphaned.exclusive + orphaned.shared).unwrap_or(usize::MAX);
        (released.max(1), done)
    }

    /// `conn` is gone: releases everything it held in this shard. Nothing queued before it and
    /// budget left in this turn (the usual disconnect, a handful of locks): at once, as its
    /// orphan message comes, so that a client reconnecting right away finds its locks free.
    /// Otherwise the release is queued for [`Self::release_departed`], which works through
    /// every departed connection a slice per turn: releasing each connection's first slice as
    /// its message came cost another client 100 to 470 ms when five hundred connections holding
    /// two thousand locks each reset at once, since their messages come together. Until its
    /// release, a lock stays held by its departed holder: nobody else is granted it.
    pub fn orphan(&self, conn: ConnId, departure: Arc<Departure>) {
        if self.departed.borrow().is_empty() {
            let budget = self.orphan_budget.get();
            if budget > 0 {
                let (spent, done) = self.orphan_slice(conn, departure.label.as_deref(), budget);
                self.orphan_budget.set(budget.saturating_sub(spent));
                if done {
                    return;
                }
            }
        }
        let mut departed = self.departed.borrow_mut();
        if departed.is_empty() {
            self.departed_ready.notify_one();
        }
        departed.push_back((conn, departure));
    }

    /// Releases what departed connections held, for the life of the shard: oldest first, at
    /// most [`ORPHAN_SLICE`] locks per turn over all of them (releases done at once by
    /// [`Self::orphan`] included), letting this thread's clients run between turns until none
    /// is left.
    pub async fn release_departed(self: Rc<Self>) {
        loop {
            self.departed_ready.notified().await;
            loop {
                if self.orphan_budget.get() < ORPHAN_SLICE {
                    // Some of this turn's share went on releases done at once: let the other
                    // clients have their turn before another slice.
                    self.pause().await;
                }
                self.orphan_budget.set(ORPHAN_SLICE);
                while self.orphan_budget.get() > 0 {
                    let Some((conn, label)) = self
                        .departed
                        .borrow()
                        .front()
                        .map(|(conn, departure)| (*conn, departure.label.clone()))
                    else {
                        break;
                    };
                    let budget = self.orphan_budget.get();
                    let (spent, done) = self.orphan_slice(conn, label.as_deref(), budget);
                    self.orphan_budget.set(budget.saturating_sub(spent));
                    if done {
                        // Its last shard done, the registry forgets it (see `Departure`).
                        self.departed.borrow_mut().pop_front();
                    }
                }
                if self.departed.borrow().is_empty() {
                    break;
                }
            }
        }
    }

    /// A listing of this shard's locks, holders as text, unsorted. The text is looked up here,
    /// on the shard, while the table still holds the locks: a departing holder's registry
    /// record outlives its locks in this shard (see [`Departure`]), so it is always found. A
    /// listing of every exclusive lock is built in slices, yielding between them.
    pub async fn list(self: Rc<Self>, kind: ListKind, name: Option<(u64, LockName)>) -> Listing {
        let registry = &self.server.registry;
        let ListKind::Locks {
            kind: LockKind::Exclusive,
            raw,
        } = kind
        else {
            return self.list_now(kind, name.as_ref().map(|(h, n)| (*h, n.as_bytes())));
        };
        if name.is_some() {
            return self.list_now(kind, name.as_ref().map(|(h, n)| (*h, n.as_bytes())));
        }
        // One lookup per holder, not per lock: most listings show few holders of many locks.
        let mut texts: HashMap<ConnId, Arc<[u8]>> = HashMap::new();
        let mut rows = Vec::new();
        let mut slice = Vec::new();
        let mut next = Some(0);
        while let Some(from) = next {
            next = self
                .table
                .borrow()
                .list_exclusive_slots(from, LIST_SLICE, &mut slice);
            for (name, holder) in slice.drain(..) {
                let text = texts
                    .entry(holder)
                    .or_insert_with(|| registry.holder_text(holder, raw));
                rows.push((name, text.clone()));
            }
            if next.is_some() {
                self.pause().await;
            }
        }
        rows
    }

    /// A listing built in one step: one name's, the shared locks, or `h`.
    fn list_now(&self, kind: ListKind, name: Option<(u64, &[u8])>) -> Listing {
        let table = self.table.borrow();
        let registry = &self.server.registry;
        match kind {
            ListKind::Locks { kind, raw } => {
                let rows = match kind {
                    LockKind::Exclusive => table.list_exclusive(name),
                    LockKind::Shared => table.list_shared(name.map(|(_, n)| n)),
                };
                let mut texts: HashMap<ConnId, Arc<[u8]>> = HashMap::new();
                rows.into_iter()
                    .map(|(name, holder)| {
                        let text = texts
                            .entry(holder)
                            .or_insert_with(|| registry.holder_text(holder, raw));
                        (name, text.clone())
                    })
                    .collect()
            }
            // `h`: rows `name: role id age_ms display`.
            ListKind::Holders => {
                let now = crate::table::unix_micros();
                table
                    .list_holders(name)
                    .into_iter()
                    .map(|row| {
                        let mut text = Vec::new();
                        text.extend_from_slice(row.role.word().as_bytes());
                        text.push(b' ');
                        registry.write_holder(row.conn, true, &mut text);
                        text.push(b' ');
                        let age_ms = now.saturating_sub(row.since) / 1000;
                        text.extend_from_slice(itoa::Buffer::new().format(age_ms).as_bytes());
                        text.extend_from_slice(b"ms ");
                        registry.write_holder(row.conn, false, &mut text);
                        (row.name, Arc::from(text))
                    })
                    .collect()
            }
        }
    }

    /// Queues one connection's operations for `shard`: they leave with every other
    /// connection's of this thread when the outbox is flushed, at the end of this scheduler
    /// pass (see [`Self::flush_outbox`]).
    pub fn send_later(&self, shard: usize, batch: Outgoing) {
        let mut outbox = self.outbox.borrow_mut();
        if outbox.iter().all(Vec::is_empty) {
            self.outbox_ready.notify_one();
        }
        outbox[shard].push(batch);
    }

    /// Sends what this thread's connections queued for other shards, one message per shard,
    /// whenever there is any. This task is woken by the first connection that queues work and
    /// runs after the other tasks that were ready at that moment, so everything this thread's
    /// connections produce in one scheduler pass travels together.
    pub async fn flush_outbox(self: Rc<Self>) {
        let shards = self.server.router.shards();
        let mut spare: Vec<Vec<Outgoing>> = (0..shards).map(|_| Vec::new()).collect();
        loop {
            self.outbox_ready.notified().await;
            std::mem::swap(&mut *self.outbox.borrow_mut(), &mut spare);
            for (shard, batches) in spare.iter_mut().enumerate() {
                if batches.is_empty() {
                    continue;
                }
                let batches = std::mem::take(batches);
                let msg = LockMsg::Batches {
                    origin: self.id,
                    batches,
                };
                // A stopped shard is a server shutting down; the connections waiting on it see
                // their reply channels close.
                let _ = self.server.post_locks(shard, msg);
            }
        }
    }

    /// Sends what this thread's connections queued for other shards now, without waiting for
    /// the task that usually does (a live upgrade wants it posted before it goes on).
    pub fn flush_outbox_now(&self) {
        let queued: Vec<Vec<Outgoing>> = {
            let mut outbox = self.outbox.borrow_mut();
            outbox.iter_mut().map(std::mem::take).collect()
        };
        for (shard, batches) in queued.into_iter().enumerate() {
            if !batches.is_empty() {
                let msg = LockMsg::Batches {
                    origin: self.id,
                    batches,
                };
                let _ = self.server.post_locks(shard, msg);
            }
        }
    }

    /// Hands replies from another shard to the connections of this thread that wait for them.
    pub fn deliver(&self, replies: Replies) {
        for (done, batch) in replies {
            // The connection may be gone (its orphan message follows); nobody wants these.
            let _ = done.send(batch);
        }
    }

    /// Handles one message about this shard's table.
    pub fn handle_locks(self: &Rc<Self>, msg: LockMsg) {
        match msg {
            LockMsg::Batches { origin, batches } => {
                let cell = self.cell();
                cell.mailbox_messages.add(1);
                let mut answers = Vec::with_capacity(batches.len());
                for outgoing in batches {
                    match outgoing {
                        Outgoing::Ops(ConnBatch {
                            conn,
                            quota,
                            mut ops,
                            mut replies,
                            done,
                        }) => {
                            cell.mailbox_commands.add(ops.len() as u64);
                            self.apply_batch(conn, quota.as_deref(), &ops, &mut replies);
                            ops.clear();
                            answers.push((done, BatchDone { ops, replies }));
                        }
                        Outgoing::Orphan { conn, departure } => self.orphan(conn, departure),
                    }
                }
                if !answers.is_empty() {
                    // A stopped origin is a server shutting down: nobody wants the replies.
                    let _ = self
                        .server
                        .mailboxes
                        .post(origin, super::ShardMsg::Replies(answers));
                }
            }
            LockMsg::Wait(request) => self.start_wait(request),
            LockMsg::Ping(done) => {
                let _ = done.send(());
            }
            LockMsg::List { kind, name, done } => {
                let core = self.clone();
                tokio::task::spawn_local(async move {
                    // The asker may have gone meanwhile; then nobody wants the rows.
                    let _ = done.send(core.list(kind, name).await);
                });
            }
        }
    }
}

/// Aborts the process if dropped, which only happens when a panic unwinds out of a lock table
/// operation. A table interrupted half-way through an update cannot be trusted to tell who holds
/// what, and a lock server that might grant one lock twice must not keep serving: exit loudly
/// (the panic message is already on stderr) and let the supervisor restart it, which releases
/// every lock exactly as if every client had disconnected.
struct AbortOnPanic;

impl Drop for AbortOnPanic {
    fn drop(&mut self) {
        crate::logging::fatal("a lock table operation panicked; aborting");
        std::process::abort();
    }
}
