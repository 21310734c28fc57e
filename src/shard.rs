//! Shard threads: each owns one slice of the lock table, its mailbox, and the connections that
//! were handed to it.
//!
//! A lock name is hashed (keyed ahash, fixed keys) onto one shard; only that shard's thread ever
//! touches the name. A connection applies commands for its own thread's shard directly and sends
//! the rest as one [`ShardMsg::Batch`] per shard per batch of pipelined lines. The mailbox loop
//! drains every queued message per wake-up (`recv_many`), because the cost that matters in
//! cross-thread messaging is the wake-up, not the copy.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Notify};

use crate::config::Config;
use crate::name::LockName;
use crate::protocol::{LockOp, Reply};
use crate::registry::Registry;
use crate::stats::{ShardCell, Stats};
use crate::table::WaitKind;
use crate::table::{Quota, ShardTable};
use crate::{ConnId, NameHasher};

/// Messages drained per wake-up of a shard's mailbox loop.
const DRAIN: usize = 256;

/// Locks released per slice when orphaning: a connection that held a million locks is released
/// a slice at a time, with the shard serving everyone else in between.
pub const ORPHAN_SLICE: usize = 4096;

/// Where a lock name lives.
#[derive(Clone)]
pub struct Router {
    /// The server's one name hasher (its keys are fixed for the life of the process), so a name
    /// always lands on the same shard and the shard's table can reuse the hash.
    hasher: NameHasher,
    /// Number of shards.
    shards: u64,
}

impl Router {
    pub fn new(shards: usize, hasher: NameHasher) -> Self {
        Router {
            hasher,
            shards: shards as u64,
        }
    }

    /// The hasher, for tables that must index names with the routing hash.
    pub fn hasher(&self) -> &NameHasher {
        &self.hasher
    }

    /// The owning shard of `name`, and its hash (reused by the table's index).
    ///
    /// The shard comes from the hash's low 32 bits by multiply-shift; the table's index uses the
    /// low bits of the same hash and its tags the top 7 bits, so within a shard the index still
    /// sees well-spread hashes for any table smaller than 2^31 buckets.
    #[inline]
    pub fn route(&self, name: &[u8]) -> (usize, u64) {
        let hash = self.hasher.hash_one(name);
        let shard = ((hash & 0xffff_ffff) * self.shards) >> 32;
        (shard as usize, hash)
    }

    pub fn shards(&self) -> usize {
        self.shards as usize
    }
}

/// One lock operation on its way to the owning shard.
pub struct RoutedOp {
    pub op: LockOp,
    /// `Router::route`'s hash of `name`.
    pub hash: u64,
    pub name: LockName,
}

/// What a shard sends back for a [`ShardMsg::Batch`]: the replies, and the op vector (emptied)
/// so the connection can reuse its capacity.
pub struct BatchDone {
    pub ops: Vec<RoutedOp>,
    pub replies: Vec<Reply>,
}

/// A listing of (name, holder text) pairs from one shard.
pub type Listing = Vec<(LockName, Vec<u8>)>;

/// A connection's place under `--max-connections`: taken when the connection is accepted,
/// given back when it ends (whichever thread that happens on).
pub struct Admission {
    shared: Arc<Shared>,
}

impl Admission {
    /// Takes a place, or None when the server is full.
    pub fn try_new(shared: &Arc<Shared>) -> Option<Admission> {
        let max = shared.config.max_connections;
        let mut live = shared.live_connections.load(Ordering::Relaxed);
        loop {
            if live >= max {
                return None;
            }
            match shared.live_connections.compare_exchange_weak(
                live,
                live + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(Admission {
                        shared: shared.clone(),
                    })
                }
                Err(now) => live = now,
            }
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.shared.live_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

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

/// Which listing a shard is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    /// `d` (holders by registered name) or `dump` (`raw`: by connection id).
    Exclusive { raw: bool },
    /// `sd` or `dump shared`.
    Shared { raw: bool },
    /// `h`: holders and waiters with their ages.
    Holders,
}

/// A connection that has gone, while its locks are being released. Until every shard is done,
/// listings still show its locks under its real id (or registered name); when the last shard
/// drops its reference, the registry forgets the connection.
pub struct Departure {
    pub shared: Arc<Shared>,
    pub conn: ConnId,
    /// The connection's protocol id, for `-verbose` logging (None when not verbose).
    pub label: Option<Arc<str>>,
}

impl Drop for Departure {
    fn drop(&mut self) {
        self.shared.registry.remove(self.conn);
    }
}

/// A stream handed from the accepting thread to the shard that will serve it, with its
/// protocol id (`ip:port`, `unix:N`) and its place under `--max-connections`.
pub enum Incoming {
    Tcp(std::net::TcpStream, String, Admission),
    Ws(std::net::TcpStream, String, Admission),
    Unix(std::os::unix::net::UnixStream, String, Admission),
}

/// What a shard's mailbox carries.
pub enum ShardMsg {
    /// Apply `ops` in order for `conn` and send back the replies.
    Batch {
        conn: ConnId,
        /// The connection's lock allowance, when `--max-locks-per-conn` is set.
        quota: Option<Arc<Quota>>,
        ops: Vec<RoutedOp>,
        /// Reply buffer to fill (sent empty, reused across batches).
        replies: Vec<Reply>,
        done: oneshot::Sender<BatchDone>,
    },
    /// `conn` is gone: release everything it holds here. Sent after every batch of that
    /// connection, through the same FIFO, so a lock granted by an in-flight batch is released too.
    Orphan {
        conn: ConnId,
        /// Held until this shard has released everything; the last holder forgets the
        /// connection's registry record.
        departure: Arc<Departure>,
    },
    /// `gw`/`sgw`: take the lock, or queue for it.
    Wait(WaitRequest),
    /// A listing of this shard's locks (all, or one name's).
    List {
        kind: ListKind,
        name: Option<(u64, LockName)>,
        done: oneshot::Sender<Listing>,
    },
    /// Serve a new connection on this thread.
    Adopt(Incoming),
    /// Shutdown, first step: stop accepting, let every connection on this thread answer what
    /// it already read and close; report on `drained` when none is left. Mailboxes keep
    /// running meanwhile, since a closing connection may still wait on another shard.
    Close {
        drained: std::sync::mpsc::Sender<()>,
    },
    /// Shutdown, last step: leave the mailbox loop.
    Stop,
}

pub type Mailbox = mpsc::UnboundedSender<ShardMsg>;

/// State shared by every thread of one server.
pub struct Shared {
    pub config: Config,
    pub router: Router,
    pub mailboxes: Box<[Mailbox]>,
    pub stats: Stats,
    pub registry: Registry,
    /// The fencing token ceiling every shard's token clock stays below.
    pub fencing: Arc<crate::fencing::Fencing>,
    /// Source of connection ids; never reused, so a late orphan cannot hit a newer connection.
    next_conn: AtomicU64,
    /// Connections open now, for `--max-connections` (see [`Admission`]).
    live_connections: AtomicU64,
    /// Unix socket connections so far: their ids are `unix:1`, `unix:2`… as in the original.
    unix_connections: AtomicU64,
    /// Whether connections time their commands (only while the metrics endpoint is on, so a
    /// server without it pays nothing for it).
    pub measure_latency: bool,
}

impl Shared {
    pub fn new(
        config: Config,
        mailboxes: Vec<Mailbox>,
        measure_latency: bool,
        fencing: Arc<crate::fencing::Fencing>,
    ) -> Self {
        let shards = mailboxes.len();
        Shared {
            config,
            router: Router::new(shards, crate::name_hasher()),
            mailboxes: mailboxes.into(),
            stats: Stats::new(shards),
            registry: Registry::default(),
            fencing,
            next_conn: AtomicU64::new(1),
            live_connections: AtomicU64::new(0),
            unix_connections: AtomicU64::new(0),
            measure_latency,
        }
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// The protocol id of the next unix socket connection.
    pub fn next_unix_id(&self) -> String {
        format!(
            "unix:{}",
            self.unix_connections.fetch_add(1, Ordering::Relaxed) + 1
        )
    }

    /// Posts `msg` to `shard`. False if that shard has stopped (the server is shutting down).
    pub fn post(&self, shard: usize, msg: ShardMsg) -> bool {
        self.mailboxes[shard].send(msg).is_ok()
    }
}

/// One shard thread's state, shared by the tasks on that thread (hence `Rc`/`RefCell`: nothing
/// here crosses threads except through `shared`).
pub struct ShardCore {
    pub id: usize,
    pub shared: Arc<Shared>,
    table: RefCell<ShardTable>,
    /// Set once shutdown begins: connections answer what they read, then close.
    closing: Cell<bool>,
    /// Wakes connections (and the accept loop) when `closing` is set.
    closing_notify: Notify,
    /// Connections living on this thread.
    live: Cell<usize>,
    /// Wakes the shutdown drain when `live` drops to zero.
    drained_notify: Notify,
}

impl ShardCore {
    pub fn new(id: usize, shared: Arc<Shared>) -> Self {
        ShardCore {
            id,
            table: RefCell::new(ShardTable::with_tokens(
                shared.router.hasher().clone(),
                shared.fencing.clock(),
            )),
            shared,
            closing: Cell::new(false),
            closing_notify: Notify::new(),
            live: Cell::new(0),
            drained_notify: Notify::new(),
        }
    }

    /// Whether shutdown has begun.
    pub fn is_closing(&self) -> bool {
        self.closing.get()
    }

    /// Completes when shutdown begins (check [`Self::is_closing`] first: this only sees the
    /// start of shutdown if it happens after the call).
    pub fn closing(&self) -> tokio::sync::futures::Notified<'_> {
        self.closing_notify.notified()
    }

    /// A connection began on this thread.
    pub fn connection_opened(&self) {
        self.live.set(self.live.get() + 1);
    }

    /// A connection on this thread ended.
    pub fn connection_closed(&self) {
        self.live.set(self.live.get() - 1);
        if self.live.get() == 0 {
            self.drained_notify.notify_waiters();
        }
    }

    /// This thread's stats cell.
    #[inline]
    pub fn cell(&self) -> &ShardCell {
        self.shared.stats.cell(self.id)
    }

    fn publish_sizes(&self, table: &ShardTable) {
        let cell = self.cell();
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
        let queued = {
            let mut table = self.table.borrow_mut();
            let guard = AbortOnPanic;
            let queued = table.wait(conn, quota, kind, hash, &name, reply);
            std::mem::forget(guard);
            self.publish_sizes(&table);
            queued
        };
        if let Some(id) = queued {
            let core = self.clone();
            let timed = name.clone();
            let timer = tokio::task::spawn_local(async move {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                let mut table = core.table.borrow_mut();
                let guard = AbortOnPanic;
                table.expire(kind.is_shared(), &timed, id);
                std::mem::forget(guard);
                core.publish_sizes(&table);
            });
            self.table
                .borrow_mut()
                .set_wait_timer(kind, &name, id, timer.abort_handle());
        }
    }

    /// Forgets rate limiters that are back to full capacity, once a second, for the life of
    /// the shard.
    pub async fn evict_rate_limits(self: Rc<Self>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mut table = self.table.borrow_mut();
            if table.rate_limit_len() > 0 {
                table.evict_rate_limits();
            }
        }
    }

    /// `h`: holders and waiters here, as rows `name: role id age_ms display`.
    fn list_holders(&self, name: Option<(u64, &[u8])>) -> Listing {
        let table = self.table.borrow();
        let now = crate::table::unix_micros();
        table
            .list_holders(name)
            .into_iter()
            .map(|row| {
                let mut text = Vec::new();
                text.extend_from_slice(row.role.word().as_bytes());
                text.push(b' ');
                self.shared.registry.write_holder(row.conn, true, &mut text);
                text.push(b' ');
                let age_ms = now.saturating_sub(row.since) / 1000;
                text.extend_from_slice(itoa::Buffer::new().format(age_ms).as_bytes());
                text.extend_from_slice(b"ms ");
                self.shared
                    .registry
                    .write_holder(row.conn, false, &mut text);
                (row.name, text)
            })
            .collect()
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
        let mut table = self.table.borrow_mut();
        let guard = AbortOnPanic;
        let reply = table.apply(conn, op, hash, name, quota);
        std::mem::forget(guard);
        self.publish_sizes(&table);
        reply
    }

    /// Applies `ops` in order, appending a reply for each.
    pub fn apply_batch(
        &self,
        conn: ConnId,
        quota: Option<&Quota>,
        ops: &[RoutedOp],
        replies: &mut Vec<Reply>,
    ) {
        let mut table = self.table.borrow_mut();
        let guard = AbortOnPanic;
        replies.extend(
            ops.iter()
                .map(|op| table.apply(conn, op.op, op.hash, &op.name, quota)),
        );
        std::mem::forget(guard);
        self.publish_sizes(&table);
    }

    /// Releases up to one slice of what `conn` held in this shard; true when nothing is left.
    fn orphan_slice(&self, conn: ConnId, label: Option<&str>) -> bool {
        let mut table = self.table.borrow_mut();
        let guard = AbortOnPanic;
        let (orphaned, done) = table.orphan_some(conn, ORPHAN_SLICE, |name| {
            if let Some(label) = label {
                eprintln!(
                    "{label} orphaned lock {}",
                    String::from_utf8_lossy(name.as_bytes())
                );
            }
        });
        std::mem::forget(guard);
        let cell = self.cell();
        cell.orphans.add(orphaned.exclusive);
        cell.shared_orphans.add(orphaned.shared);
        if let Some(label) = label {
            if orphaned.shared > 0 {
                eprintln!("{label} orphaned {} shared locks", orphaned.shared);
            }
        }
        self.publish_sizes(&table);
        done
    }

    /// Releases everything `conn` held in this shard: the first slice now, the rest (if any) in
    /// a task that yields between slices so other clients keep being served.
    pub fn orphan(self: &Rc<Self>, conn: ConnId, departure: Arc<Departure>) {
        if self.orphan_slice(conn, departure.label.as_deref()) {
            return;
        }
        let core = self.clone();
        tokio::task::spawn_local(async move {
            loop {
                tokio::task::yield_now().await;
                if core.orphan_slice(conn, departure.label.as_deref()) {
                    return;
                }
            }
        });
    }

    /// A listing of this shard's locks, holders as text. The text is looked up here, on the
    /// shard, while the table still holds the locks: a departing holder's registry record
    /// outlives its locks in this shard (see [`Departure`]), so it is always found.
    pub fn list(&self, kind: ListKind, name: Option<(u64, &[u8])>) -> Listing {
        match kind {
            ListKind::Exclusive { raw } => self.list_locks(false, name, raw),
            ListKind::Shared { raw } => self.list_locks(true, name, raw),
            ListKind::Holders => self.list_holders(name),
        }
    }

    fn list_locks(&self, shared: bool, name: Option<(u64, &[u8])>, raw: bool) -> Listing {
        let table = self.table.borrow();
        let rows = if shared {
            table.list_shared(name.map(|(_, n)| n))
        } else {
            table.list_exclusive(name)
        };
        rows.into_iter()
            .map(|(name, holder)| {
                let mut text = Vec::new();
                self.shared.registry.write_holder(holder, raw, &mut text);
                (name, text)
            })
            .collect()
    }

    /// Handles one mailbox message. Returns false on `Stop`.
    pub fn handle(self: &Rc<Self>, msg: ShardMsg) -> bool {
        match msg {
            ShardMsg::Batch {
                conn,
                quota,
                mut ops,
                mut replies,
                done,
            } => {
                let cell = self.cell();
                cell.mailbox_messages.add(1);
                cell.mailbox_commands.add(ops.len() as u64);
                self.apply_batch(conn, quota.as_deref(), &ops, &mut replies);
                ops.clear();
                // The connection may be gone (its orphan message is queued behind this one);
                // then nobody wants the replies.
                let _ = done.send(BatchDone { ops, replies });
            }
            ShardMsg::Orphan { conn, departure } => self.orphan(conn, departure),
            ShardMsg::Wait(request) => self.start_wait(request),
            ShardMsg::List { kind, name, done } => {
                let _ = done.send(self.list(kind, name.as_ref().map(|(h, n)| (*h, n.as_bytes()))));
            }
            ShardMsg::Adopt(incoming) => crate::doors::adopt(self, incoming),
            ShardMsg::Close { drained } => self.close(drained),
            ShardMsg::Stop => return false,
        }
        true
    }

    /// Begins shutdown on this thread: wakes every connection (and the accept loop) to finish
    /// up, and reports on `drained` once the last connection here has gone.
    fn close(self: &Rc<Self>, drained: std::sync::mpsc::Sender<()>) {
        self.closing.set(true);
        self.closing_notify.notify_waiters();
        let core = self.clone();
        tokio::task::spawn_local(async move {
            while core.live.get() > 0 {
                let notified = core.drained_notify.notified();
                if core.live.get() == 0 {
                    break;
                }
                notified.await;
            }
            let _ = drained.send(());
        });
    }

    /// The mailbox loop: drains every queued message per wake-up until `Stop`.
    pub async fn run_mailbox(self: Rc<Self>, mut inbox: mpsc::UnboundedReceiver<ShardMsg>) {
        let mut msgs = Vec::with_capacity(DRAIN);
        loop {
            if inbox.recv_many(&mut msgs, DRAIN).await == 0 {
                return;
            }
            for msg in msgs.drain(..) {
                if !self.handle(msg) {
                    return;
                }
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
        eprintln!("glockd: a lock table operation panicked; aborting");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_is_stable_and_spreads_names() {
        let router = Router::new(4, crate::name_hasher());
        let mut per_shard = [0usize; 4];
        for i in 0..10_000 {
            let name = format!("lock-{i}");
            let (shard, hash) = router.route(name.as_bytes());
            assert_eq!(router.route(name.as_bytes()), (shard, hash));
            per_shard[shard] += 1;
        }
        for count in per_shard {
            assert!((2_000..3_000).contains(&count), "{per_shard:?}");
        }
        assert_eq!(Router::new(1, crate::name_hasher()).route(b"x").0, 0);
    }
}
