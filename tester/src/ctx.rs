//! What every check gets: fresh connections, fresh names, the mode, and bounded polling.
//!
//! Safety against a production server starts here: every lock and registered name is
//! `glockd-tester:<random hex>:<tag>:<n>`, so the run can never touch anybody else's lock, and
//! every name it locks is remembered so the last check can prove nothing is left held.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::conn::{Conn, Connector, Settings};
use crate::verdict::Verdict;

/// Shared state of one run.
pub struct Ctx {
    /// Opens connections to the server under test.
    connector: Arc<dyn Connector>,
    /// Timeouts and mode, the same for every connection.
    settings: Settings,
    /// `glockd-tester:<random hex>:`, the start of every name this run uses.
    prefix: String,
    /// A name of this run that nobody ever locks: `i` on it ends listings (see
    /// [`Conn::listing`]) and proves a connection still answers.
    marker: String,
    /// Every lock name handed out, for the final "nothing left held" check.
    names: Mutex<Vec<String>>,
    /// Makes every name of the run unique.
    next: AtomicU32,
}

impl Ctx {
    /// A context for one run against `connector`.
    pub fn new(connector: Arc<dyn Connector>, settings: Settings) -> Self {
        let prefix = format!("glockd-tester:{}:", random_hex());
        Ctx {
            connector,
            settings,
            marker: format!("{prefix}marker"),
            prefix,
            names: Mutex::new(Vec::new()),
            next: AtomicU32::new(0),
        }
    }

    /// The prefix of every name this run uses.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The name nobody locks (see the field).
    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// The target, for messages.
    pub fn target(&self) -> String {
        self.connector.describe()
    }

    /// Whether only the original server's behaviour is checked.
    pub fn compat(&self) -> bool {
        self.settings.compat
    }

    /// The reply timeout, also the bound on every poll.
    pub fn timeout(&self) -> Duration {
        self.settings.timeout
    }

    /// Longest `dump` line read.
    pub fn max_dump_bytes(&self) -> usize {
        self.settings.max_dump_bytes
    }

    /// Skips the check in compat mode (the original server did not do this).
    pub fn strict_only(&self, why: &str) -> Result<(), Verdict> {
        if self.compat() {
            Err(Verdict::skip(format!("compat mode: {why}")))
        } else {
            Ok(())
        }
    }

    /// Opens a new connection (authenticated, with `--auth`).
    pub async fn connect(&self) -> Result<Conn, Verdict> {
        Conn::open_authenticated(self.connector.as_ref(), &self.settings).await
    }

    /// Opens a new connection that does not authenticate, even with `--auth`.
    pub async fn connect_unauthenticated(&self) -> Result<Conn, Verdict> {
        Conn::open(self.connector.as_ref(), &self.settings).await
    }

    /// A fresh lock name of this run, remembered for the final cleanup check.
    pub fn lock_name(&self, tag: &str) -> String {
        let name = self.fresh(tag);
        self.remember(&name);
        name
    }

    /// Remembers a lock name built from a fresh one (with a suffix), for the cleanup check.
    pub fn remember(&self, name: &str) {
        if let Ok(mut names) = self.names.lock() {
            names.push(name.to_owned());
        }
    }

    /// A fresh name that is never locked: registered names, and the marker after listings.
    pub fn fresh(&self, tag: &str) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}{tag}:{n}", self.prefix)
    }

    /// Every lock name handed out so far.
    pub fn lock_names(&self) -> Vec<String> {
        self.names.lock().map(|n| n.clone()).unwrap_or_default()
    }
}

/// Bounded polling for things the server does in its own time (releasing a closed connection's
/// locks, stats of the original that lag): short pauses at first, never past the timeout.
pub struct Poll {
    /// When to give up.
    deadline: Instant,
    /// The next pause; doubles up to [`Poll::MAX_PAUSE`].
    pause: Duration,
}

impl Poll {
    /// Longest pause between two looks, so a production server sees few extra commands.
    const MAX_PAUSE: Duration = Duration::from_millis(200);

    /// Polls for at most `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Poll {
            deadline: Instant::now() + timeout,
            pause: Duration::from_millis(5),
        }
    }

    /// Waits before the next look; false once the time is up.
    pub async fn again(&mut self) -> bool {
        let now = Instant::now();
        if now >= self.deadline {
            return false;
        }
        tokio::time::sleep(self.pause.min(self.deadline - now)).await;
        self.pause = (self.pause * 2).min(Self::MAX_PAUSE);
        true
    }
}

/// 16 random hex digits: the standard library's randomly keyed hasher over the clock and the
/// process id. Uniqueness between runs is all that is needed, not secrecy.
fn random_hex() -> String {
    let mut hasher = RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    format!("{:016x}", hasher.finish())
}
