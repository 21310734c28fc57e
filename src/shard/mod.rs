//! Shard threads: what every thread of one server shares ([`ServerState`]), what one shard
//! thread owns ([`ShardCore`]), and what its mailbox carries ([`ShardMsg`]).
//!
//! A lock name is hashed onto one shard (see [`crate::routing`]); only that shard's thread ever
//! touches the name. The lock table and the messages that work on it are in [`locks`]; the
//! connections living on the thread and their life-cycle messages are in
//! [`crate::lifecycle`]. The thread's loop that hands each message to one or the other is in
//! [`crate::server`], so this module never calls into the doors that feed it.

pub mod handover;
pub mod locks;

use std::cell::RefCell;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

use crate::config::Config;
use crate::lifecycle::{ConnMsg, ThreadConns};
use crate::registry::Registry;
use crate::routing::{Gone, Mailboxes, Router};
use crate::stats::{ShardCell, Stats};
use crate::table::ShardTable;
use crate::ConnId;

pub use locks::{
    BatchDone, ConnBatch, Departure, Listing, LockMsg, Outgoing, Replies, RoutedOp, WaitRequest,
};

/// Locks released per slice when orphaning: what departed connections held is released a slice
/// at a time, with the shard serving everyone else in between, whether one connection held a
/// million locks or five hundred connections held two thousand each and left together.
pub const ORPHAN_SLICE: usize = 4096;

/// What a shard's mailbox carries.
pub enum ShardMsg {
    /// Work on this shard's lock table.
    Locks(LockMsg),
    /// Replies from another shard for connections on this thread.
    Replies(Replies),
    /// A connection's life on this thread: adopt a new one, or close them all.
    Conns(ConnMsg),
    /// Live upgrade: give up this shard's table (its connections are stopped already).
    Export(std::sync::mpsc::Sender<handover::Exported>),
    /// Live upgrade: take in this part of the state; say so on the channel when done.
    Restore(Box<handover::TablePart>, std::sync::mpsc::Sender<()>),
    /// Shutdown, last step: leave the mailbox loop.
    Stop,
}

/// State shared by every thread of one server.
pub struct ServerState {
    pub config: Config,
    pub router: Router,
    pub mailboxes: Mailboxes<ShardMsg>,
    pub stats: Stats,
    pub registry: Registry,
    /// The fencing token ceiling every shard's token clock stays below.
    pub fencing: Arc<crate::fencing::Fencing>,
    /// `--max-memory`: what every shard's table and the registry's names count against.
    pub memory: Arc<crate::memory::MemoryBudget>,
    /// Source of connection ids; never reused, so a late orphan cannot hit a newer connection.
    next_conn: AtomicU64,
    /// Connections open now, for `--max-connections` (see [`crate::lifecycle::Admission`]).
    pub live_connections: AtomicU64,
    /// Connections open now per client address, for `--max-connections-per-ip`.
    pub per_ip: crate::lifecycle::PerIp,
    /// Every connection's buffers, against `--max-client-buffers`.
    pub client_buffers: Arc<crate::client_buffers::ClientBuffers>,
    /// Unix socket connections so far: their ids are `unix:1`, `unix:2`… as in the original.
    unix_connections: AtomicU64,
    /// Each shard's own port (`-shard-port`), in shard order, for the `shards` reply.
    pub shard_ports: Vec<u16>,
    /// Whether connections time their commands (only while the metrics endpoint is on, so a
    /// server without it pays nothing for it).
    pub measure_latency: bool,
    /// The TLS doors' certificates and handshakes, when a TLS door is on.
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// The users file in force (`-users`); None: no users, every client may do anything.
    pub users: Option<Arc<crate::users::Directory>>,
    /// Live upgrades so far (continued from the predecessor's).
    pub upgrades: crate::upgrade::UpgradeStats,
}

impl ServerState {
    pub fn new(
        config: Config,
        mailboxes: Mailboxes<ShardMsg>,
        measure_latency: bool,
        fencing: Arc<crate::fencing::Fencing>,
        shard_ports: Vec<u16>,
    ) -> Self {
        let shards = mailboxes.len();
        let memory = Arc::new(crate::memory::MemoryBudget::new(
            config.memory_budget(),
            shards,
        ));
        let client_buffers = Arc::new(crate::client_buffers::ClientBuffers::new(
            usize::try_from(config.max_client_buffers).unwrap_or(usize::MAX),
            shards,
        ));
        ServerState {
            config,
            router: Router::new(shards, crate::name_hasher()),
            mailboxes,
            stats: Stats::new(shards),
            registry: Registry::new(memory.clone()),
            fencing,
            memory,
            next_conn: AtomicU64::new(1),
            live_connections: AtomicU64::new(0),
            per_ip: crate::lifecycle::PerIp::default(),
            client_buffers,
            unix_connections: AtomicU64::new(0),
            measure_latency,
            shard_ports,
            tls: None,
            users: None,
            upgrades: Default::default(),
        }
    }

    /// The id the next connection will get (a live upgrade's successor goes on from it).
    pub fn peek_next_conn(&self) -> ConnId {
        self.next_conn.load(Ordering::Relaxed)
    }

    /// Unix socket connections so far.
    pub fn unix_connections(&self) -> u64 {
        self.unix_connections.load(Ordering::Relaxed)
    }

    /// A live upgrade's successor: goes on from the predecessor's connection ids and counters,
    /// so `q` continues where it was.
    pub fn continue_counters(
        &self,
        counters: &crate::upgrade::image::CountersImage,
        next_conn: ConnId,
        unix_connections: u64,
    ) {
        self.next_conn.fetch_max(next_conn, Ordering::Relaxed);
        self.unix_connections
            .fetch_max(unix_connections, Ordering::Relaxed);
        let cell = self.stats.cell(0);
        for (counter, n) in cell.commands.iter().zip(&counters.commands) {
            counter.add(*n);
        }
        cell.invalid_commands.add(counters.invalid_commands);
        cell.connections_opened.add(counters.connections_opened);
        cell.connections_closed.add(counters.connections_closed);
        cell.orphans.add(counters.orphans);
        cell.shared_orphans.add(counters.shared_orphans);
    }

    /// The same state, serving the TLS doors with `tls`.
    pub fn with_tls(mut self, tls: Option<crate::tls::Tls>) -> Self {
        self.tls = tls.map(Arc::new);
        self
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

    /// Posts work on `shard`'s lock table.
    pub fn post_locks(&self, shard: usize, msg: LockMsg) -> Result<(), Gone> {
        self.mailboxes.post(shard, ShardMsg::Locks(msg))
    }
}

/// One shard thread's state, shared by the tasks on that thread (hence `RefCell`: nothing here
/// crosses threads except through `server`).
pub struct ShardCore {
    pub id: usize,
    pub server: Arc<ServerState>,
    /// This shard's slice of the lock table; see [`locks`] for everything that touches it.
    table: RefCell<ShardTable>,
    /// The connections living on this thread, and shutdown's progress through them.
    pub conns: ThreadConns,
    /// Per shard, the operations this thread's connections queued for it in this scheduler
    /// pass (see [`ShardCore::send_later`]).
    outbox: RefCell<Vec<Vec<Outgoing>>>,
    /// Wakes the task that flushes `outbox`.
    outbox_ready: Notify,
    /// Connections gone whose locks this shard has still to release, in the order their
    /// orphan messages came (see [`ShardCore::orphan`]).
    departed: RefCell<std::collections::VecDeque<(ConnId, Arc<Departure>)>>,
    /// Wakes the task that releases them.
    departed_ready: Notify,
    /// Locks that may still be released before this thread next lets its other tasks run:
    /// shared by the releasing task and the releases done at once (see [`ShardCore::orphan`]),
    /// so that together they never release more than a slice between two turns.
    orphan_budget: std::cell::Cell<usize>,
    /// `-poll-us`: how long to keep polling after work before parking (None: park at once).
    poll: Option<std::time::Duration>,
    /// When this thread last had work, while polling busily.
    last_work: std::cell::Cell<std::time::Instant>,
    /// Wakes the busy-polling task.
    working: Notify,
}

impl ShardCore {
    pub fn new(id: usize, server: Arc<ServerState>) -> Self {
        let conns = ThreadConns::default();
        if server.config.start_paused {
            // A live upgrade's successor accepts only once the upgrade commits.
            conns.set_accept_paused(true);
        }
        ShardCore {
            id,
            table: RefCell::new(ShardTable::with_budget(
                server.router.hasher().clone(),
                server.fencing.clock(),
                server.memory.clone(),
                id,
            )),
            outbox: RefCell::new((0..server.router.shards()).map(|_| Vec::new()).collect()),
            outbox_ready: Notify::new(),
            departed: RefCell::default(),
            departed_ready: Notify::new(),
            orphan_budget: std::cell::Cell::new(ORPHAN_SLICE),
            poll: (server.config.poll_us > 0)
                .then(|| std::time::Duration::from_micros(server.config.poll_us)),
            last_work: std::cell::Cell::new(std::time::Instant::now()),
            working: Notify::new(),
            server,
            conns,
        }
    }

    /// This thread's stats cell.
    #[inline]
    pub fn cell(&self) -> &ShardCell {
        self.server.stats.cell(self.id)
    }

    /// Lets the other tasks of this thread have a turn in the middle of long work (a listing,
    /// a mass orphaning), taking any mail that came in meanwhile.
    pub async fn pause(&self) {
        self.check_mail();
        tokio::task::yield_now().await;
    }

    /// Takes this shard's mail if any came in: senders do not wake a thread that is running
    /// (see [`crate::routing::Mailbox`]), so a running thread looks itself, after every batch
    /// of a connection and between slices of long work.
    #[inline]
    pub fn check_mail(&self) {
        self.server.mailboxes.get(self.id).check();
        self.note_work();
    }

    /// This thread just had work: with `-poll-us`, it keeps polling for a while.
    #[inline]
    pub fn note_work(&self) {
        if self.poll.is_some() {
            self.last_work.set(std::time::Instant::now());
            self.working.notify_one();
        }
    }

    /// With `-poll-us`: keeps this thread polling its sockets and mailbox, instead of parking,
    /// for that long after its last work, so that a reply or a command arriving meanwhile
    /// costs no wake-up (as Seastar's reactors do).
    pub async fn busy_poll(self: std::rc::Rc<Self>) {
        let Some(window) = self.poll else {
            return;
        };
        loop {
            self.working.notified().await;
            while self.last_work.get().elapsed() < window {
                self.server.mailboxes.get(self.id).check();
                // Each turn polls the sockets without blocking, then runs what is ready.
                tokio::task::yield_now().await;
            }
        }
    }

    /// Whether shutdown has begun on this thread.
    pub fn is_closing(&self) -> bool {
        self.conns.is_closing()
    }
}
