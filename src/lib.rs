//! glockd: a network lock server whose locks live exactly as long as the connection that holds
//! them. A drop-in replacement for the original Go glockd, sharded across pinned threads.
//!
//! The modules, from the wire inwards:
//! - [`config`]: the command line, Go-style flags included, and the limits every connection
//!   lives under.
//! - [`server`]: starts one pinned shard thread per core, runs each thread's mailbox loop, and
//!   shuts them down in order.
//! - [`doors`]: the TCP, TLS, websocket and unix socket listeners and the accept loop.
//! - [`lifecycle`]: a connection's life on its thread: admission, hand-over to a shard thread,
//!   the presence whose end orphans its locks, shutdown's drain.
//! - [`connection`] / [`websocket`]: one client's I/O over a byte stream or a websocket: read,
//!   run, write replies, enforce the limits and timeouts.
//! - [`tls`]: TLS on the `-tls-port` and `-tls-ws` doors: certificates, their reload, the
//!   handshake, client certificate identities; and the client side.
//! - [`peer`]: what a connection's door knows of who is at the other end.
//! - [`framer`]: bytes to lines, the same for every door.
//! - [`client_buffers`]: every connection's buffers counted against one budget, the biggest
//!   closed first past it.
//! - [`protocol`]: a line parsed into a typed request (and written back out by the client), the
//!   facts about each command word, and the reply lines.
//! - [`session`]: routes a connection's requests, inline on this thread's shard or batched
//!   through the owning shard's mailbox, and keeps replies in order.
//! - [`routing`]: names to shards, and mailboxes between threads; knows nothing of what a shard
//!   does with a message.
//! - [`shard`]: what every thread shares, what one shard thread owns, and (in
//!   [`shard::locks`]) everything a shard does to its lock table.
//! - [`table`]: one shard's lock table, the authority on who holds what, with its wait queues
//!   and fencing tokens.
//! - [`fencing`]: the fencing token clock and the durable ceiling that keeps tokens increasing
//!   across restarts and clock steps.
//! - [`ratelimit`]: the GCRA limiter behind `rl`.
//! - [`memory`]: the memory budget (`-max-memory`) every shard accounts its state against.
//! - [`name`]: `LockName`, bytes stored inline when short.
//! - [`registry`]: connection ids and the names they registered with `iam`.
//! - [`users`]: the users file, tokens, and what each user may do and see.
//! - [`stats`]: the lock-free per-shard counters behind `q` and the latency histograms.
//! - [`exporter`]: the Prometheus `/metrics` endpoint and the `/healthz` check.
//! - [`pidfile`]: the flock'ed pidfile.
//! - [`files`]: files known by device and inode, so exit removes only what this server made,
//!   and the exclusive locks behind the pidfile and the state file.
//! - [`logging`]: log lines through a bounded queue and a writer thread of their own, so a
//!   stuck stderr costs lines (counted), never service.
//! - [`signals`]: what each signal does to a running server.
//! - [`descriptors`]: the open-file limit, shared out between the server, a reserve and the
//!   connections.
//! - [`client`]: an async client, used by the tests and the tester's tests.

pub mod client;
pub mod client_buffers;
pub mod config;
mod connection;
pub mod descriptors;
pub mod doors;
pub mod exporter;
pub mod fencing;
pub mod files;
pub mod framer;
pub mod lifecycle;
pub mod logging;
pub mod memory;
pub mod name;
pub mod peer;
pub mod pidfile;
pub mod protocol;
pub mod ratelimit;
pub mod registry;
pub mod routing;
pub mod server;
mod session;
pub mod shard;
pub mod signals;
pub mod stats;
pub mod table;
pub mod tls;
pub mod upgrade;
pub mod users;
mod websocket;

pub use config::Config;
pub use doors::Listeners;
pub use name::LockName;
pub use server::{start, start_with, start_with_listeners, ServerHandle};

/// A connection's internal id: unique for the life of the server, never reused.
pub type ConnId = u64;

/// The hasher for lock names (routing and table indexes).
pub type NameHasher = ahash::RandomState;

/// A fresh keyed hasher for lock names. One is made per server at start and shared by the router
/// and every shard's table, so a name routes and indexes the same way on every thread; the keys
/// are random per process, so a client cannot precompute names that collide in the tables.
pub fn name_hasher() -> NameHasher {
    ahash::RandomState::new()
}
