//! Shard threads: what every thread of one server shares ([`ServerState`]), what one shard
//! thread owns ([`ShardCore`]), and what its mailbox carries ([`ShardMsg`]).
//!
//! A lock name is hashed onto one shard (see [`crate::routing`]); only that shard's thread ever
//! touches the name. The lock table and the messages that work on it are in [`locks`]; the
//! connections living on the thread and their life-cycle messages are in
//! [`crate::lifecycle`]. The thread's loop that hands each message to one or the other is in
//! [`crate::server`], so this module never calls into the doors that feed it.

pub mod locks;

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::Config;
use crate::lifecycle::{ConnMsg, ThreadConns};
use crate::registry::Registry;
use crate::routing::{Gone, Mailboxes, Router};
use crate::stats::{ShardCell, Stats};
use crate::table::ShardTable;
use crate::ConnId;

pub use locks::{BatchDone, Departure, Listing, LockMsg, RoutedOp, WaitRequest};

/// Locks released per slice when orphaning: a connection that held a million locks is released
/// a slice at a time, with the shard serving everyone else in between.
pub const ORPHAN_SLICE: usize = 4096;

/// What a shard's mailbox carries.
pub enum ShardMsg {
    /// Work on this shard's lock table.
    Locks(LockMsg),
    /// A connection's life on this thread: adopt a new one, or close them all.
    Conns(ConnMsg),
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
    /// Source of connection ids; never reused, so a late orphan cannot hit a newer connection.
    next_conn: AtomicU64,
    /// Connections open now, for `--max-connections` (see [`crate::lifecycle::Admission`]).
    pub live_connections: AtomicU64,
    /// Unix socket connections so far: their ids are `unix:1`, `unix:2`… as in the original.
    unix_connections: AtomicU64,
    /// Whether connections time their commands (only while the metrics endpoint is on, so a
    /// server without it pays nothing for it).
    pub measure_latency: bool,
}

impl ServerState {
    pub fn new(
        config: Config,
        mailboxes: Mailboxes<ShardMsg>,
        measure_latency: bool,
        fencing: Arc<crate::fencing::Fencing>,
    ) -> Self {
        let shards = mailboxes.len();
        ServerState {
            config,
            router: Router::new(shards, crate::name_hasher()),
            mailboxes,
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
}

impl ShardCore {
    pub fn new(id: usize, server: Arc<ServerState>) -> Self {
        ShardCore {
            id,
            table: RefCell::new(ShardTable::with_tokens(
                server.router.hasher().clone(),
                server.fencing.clock(),
            )),
            server,
            conns: ThreadConns::default(),
        }
    }

    /// This thread's stats cell.
    #[inline]
    pub fn cell(&self) -> &ShardCell {
        self.server.stats.cell(self.id)
    }

    /// Whether shutdown has begun on this thread.
    pub fn is_closing(&self) -> bool {
        self.conns.is_closing()
    }
}
