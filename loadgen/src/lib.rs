//! glockd's load generator: drives glockd (or Redis, or the no-op line server, for comparison on
//! the same machine) with closed- or open-loop load and checks every reply.
//!
//! The modules:
//! - [`cli`]: the command line and the checked settings of a run.
//! - [`keys`]: the key space (uniform or Zipf) and fixed-size lock names.
//! - [`wire`]: command encoding and a hand-rolled reply parser for both protocols.
//! - [`resp`]: the Redis (RESP) half of the reply parser.
//! - [`session`]: one connection's workload as a small state machine.
//! - [`shared`]: what all connections of a run share (progress, budget, exclusion record).
//! - [`wait`]: the wait workload, groups of connections handing one lock on.
//! - [`conn`]: the I/O loop of one connection, generic over the byte stream.
//! - [`tls`]: `--tls`, the client side of TLS.
//! - [`run`]: client threads, the common start, the progress line.
//! - [`report`]: latency histograms, counters, and the table or JSON at the end.
//! - [`noop`]: the no-op line server, the I/O ceiling a lock server is measured against.

pub mod cli;
pub mod conn;
pub mod keys;
pub mod noop;
pub mod report;
pub mod resp;
pub mod run;
pub mod session;
pub mod shards;
pub mod shared;
pub mod tls;
pub mod wait;
pub mod wire;

pub use cli::{Args, Config, Mode, Workload};
pub use report::Report;
pub use run::run;
pub use wire::Target;
