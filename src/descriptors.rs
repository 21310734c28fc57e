//! File descriptors, and how many connections they allow.
//!
//! Every connection is a descriptor, and so is every listener, runtime, scrape and log file. A
//! server whose connections take the last descriptor can no longer accept anything: new clients
//! wait in the kernel's backlog with no reply, and `/metrics` stops answering. So the server
//! serves at most as many connections as the open-file limit leaves after its own descriptors
//! and a small reserve ([`RESERVE`]); with the reserve it can still accept one more client to
//! answer `0 Too Many Connections` and close it, and still answer a scrape.

use std::io;

use crate::config::Config;

/// Descriptors kept free beyond the connections: one for accepting (and refusing) a client over
/// the limit, a few for concurrent `/metrics` scrapes and the `/proc` files a scrape reads, two
/// for a fencing ceiling write (the new file and its directory), one for reopening the log file.
pub const RESERVE: u64 = 16;

/// Descriptors one tokio runtime holds on Linux (measured with tokio 1.x: two epoll instances,
/// an eventfd, and its copy of the signal pipe). A server runs one per shard thread and one for
/// the metrics endpoint.
const PER_RUNTIME: u64 = 4;

/// Used in place of a count of open descriptors where the system cannot list them.
const UNKNOWN_IN_USE: u64 = 64;

/// Raises the soft open-file limit to the hard limit, as Redis does, and returns it.
pub fn raise_limit() -> io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// Descriptors this process has open now, if the system can list them.
pub fn open_now() -> Option<u64> {
    let listing = std::fs::read_dir("/proc/self/fd")
        .or_else(|_| std::fs::read_dir("/dev/fd"))
        .ok()?;
    // The listing itself holds a descriptor while it is read.
    Some((listing.count() as u64).saturating_sub(1))
}

/// Descriptors that starting a server with `config` will open once its listeners are bound: its
/// runtimes.
pub fn server_needs(config: &Config) -> u64 {
    let runtimes = config.shard_count() as u64 + u64::from(config.metrics_addr().is_some());
    PER_RUNTIME * runtimes
}

/// How the open-file limit is shared out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The open-file limit (soft, after raising it).
    pub limit: u64,
    /// Open before the server starts: stdio, listeners, pidfile, log file, the main runtime.
    pub in_use: u64,
    /// What the server will open as it starts.
    pub server: u64,
    /// `-max-connections`.
    pub wanted: u64,
    /// Connections served at once: `wanted`, or what the limit leaves if that is fewer.
    pub connections: u64,
}

impl Budget {
    /// Shares `limit` out: what is in use, what the server needs, [`RESERVE`], and the rest for
    /// connections, up to `wanted`.
    pub fn new(limit: u64, in_use: u64, server: u64, wanted: u64) -> Budget {
        let left = limit
            .saturating_sub(in_use)
            .saturating_sub(server)
            .saturating_sub(RESERVE);
        Budget {
            limit,
            in_use,
            server,
            wanted,
            connections: wanted.min(left),
        }
    }

    /// The budget for a server about to start with `config` under `limit`, counting what this
    /// process has open now (call it once the listeners are bound).
    pub fn measure(limit: u64, config: &Config) -> Budget {
        let in_use = open_now().unwrap_or(UNKNOWN_IN_USE);
        Budget::new(limit, in_use, server_needs(config), config.max_connections)
    }

    /// Whether the open-file limit, not `-max-connections`, sets the number of connections.
    pub fn limited_by_descriptors(&self) -> bool {
        self.connections < self.wanted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_high_limit_leaves_max_connections_alone() {
        let budget = Budget::new(1 << 20, 20, 12, 10_000);
        assert_eq!(budget.connections, 10_000);
        assert!(!budget.limited_by_descriptors());
    }

    #[test]
    fn a_low_limit_keeps_the_reserve_free() {
        let budget = Budget::new(256, 20, 12, 10_000);
        assert_eq!(budget.connections, 256 - 20 - 12 - RESERVE);
        assert!(budget.limited_by_descriptors());
    }

    #[test]
    fn a_limit_too_low_for_the_server_leaves_no_connections() {
        assert_eq!(Budget::new(30, 20, 12, 10_000).connections, 0);
    }

    #[test]
    fn this_process_can_count_its_descriptors() {
        let before = open_now().expect("a listing of open descriptors");
        let file = std::fs::File::open("/dev/null").expect("open /dev/null");
        // Other tests open and close files meanwhile: only check it is plausible.
        assert!(open_now().expect("count") >= 1 && before >= 3);
        drop(file);
    }
}
