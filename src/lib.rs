//! glockd: a network lock server whose locks live exactly as long as the connection that holds
//! them. A drop-in replacement for the original Go glockd, sharded across pinned threads.
//!
//! The modules, from the wire inwards:
//! - [`config`]: the command line, Go-style flags included.
//! - [`server`]: starts one pinned shard thread per core and shuts them down in order.
//! - [`doors`]: the TCP, websocket and unix socket listeners; accepts connections and deals them
//!   out to the shards.
//! - [`websocket`]: a websocket client: one command per message, one reply per message.
//! - [`connection`]: one client's I/O: reads lines, writes replies, enforces the per-connection
//!   limits and timeouts.
//! - [`session`]: runs a connection's commands, locally or via the owning shard's mailbox,
//!   keeps replies in order, and orphans the connection's locks when it ends.
//! - [`protocol`]: parsing a request line and writing a reply line.
//! - [`shard`]: a shard thread's state, its mailbox and the routing of names to shards.
//! - [`table`]: one shard's lock table, the authority on who holds what, with its wait queues
//!   and fencing tokens.
//! - [`fencing`]: the fencing token clock and the durable ceiling that keeps tokens increasing
//!   across restarts and clock steps.
//! - [`ratelimit`]: the GCRA limiter behind `rl`.
//! - [`name`]: `LockName`, bytes stored inline when short.
//! - [`registry`]: connection ids and the names they registered with `iam`.
//! - [`stats`]: the lock-free per-shard counters behind `q` and the latency histograms.
//! - [`exporter`]: the Prometheus `/metrics` endpoint.
//! - [`pidfile`]: the flock'ed pidfile.
//! - [`client`]: an async client, used by the tests and the load generator.

pub mod client;
pub mod config;
mod connection;
pub mod doors;
pub mod exporter;
pub mod fencing;
pub mod name;
pub mod pidfile;
pub mod protocol;
pub mod ratelimit;
pub mod registry;
pub mod server;
mod session;
pub mod shard;
pub mod stats;
pub mod table;
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
