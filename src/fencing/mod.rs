//! Fencing tokens that never go backwards, even when the clock does.
//!
//! A token is the Unix time in microseconds, or one more than the shard's last token if that is
//! larger (a hybrid logical clock): it follows the clock forward and stands still, counting up
//! by one, while the clock is behind. That alone keeps tokens increasing for the life of one
//! process. Across a restart it is not enough: a server that comes back with its clock an hour
//! behind would hand out tokens smaller than the ones before it.
//!
//! With a state file (`-state-file`) the server keeps a **ceiling** there, as TiDB's timestamp
//! oracle does: a number no token has reached. On start it reads the saved ceiling and starts
//! every shard's clock above it; while it runs, a background thread writes a new ceiling
//! (`max(now, the largest token asked for) + reserve`) and makes it durable *before* any shard
//! may issue a token at or above the old one. It renews when half of the reserve is used, so in
//! normal operation a shard never meets the ceiling; a shard that does (a burst of grants, a
//! clock that jumped forward, a slow disk) waits for the write instead of passing it. One
//! ceiling covers every shard, so the shard count may change between runs.
//!
//! The file is small, versioned text, replaced atomically (temporary file, fsync, rename, fsync
//! of the directory):
//!
//! ```text
//! # glockd state: every fencing token this server has issued is below the ceiling.
//! glockd-state 1
//! ceiling 1764151237567890
//! ```
//!
//! Lines starting with `#` and blank lines are ignored; `glockd-state` (the format's version)
//! comes first and `ceiling` (Unix microseconds, like the tokens) once. Anything else, an empty
//! file included, is refused at start: guessing would risk handing out a token twice.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The state file format this server writes and reads.
pub const STATE_VERSION: u64 = 1;

/// A saved ceiling above this leaves no room to count up in a `u64`: the file is refused.
const MAX_CEILING: u64 = u64::MAX / 4;

/// Longest state file read; a real one is under a hundred bytes.
const MAX_STATE_BYTES: u64 = 4096;

/// Where tokens read the time. Tests step a [`ManualClock`] backwards and forwards; the server
/// reads the system's real-time clock.
#[derive(Clone, Debug, Default)]
pub enum TimeSource {
    /// The system's coarse real-time clock (a vDSO read of a few nanoseconds: tokens need
    /// order, not precision).
    #[default]
    System,
    /// A clock set by hand.
    Manual(ManualClock),
}

impl TimeSource {
    /// Now, in Unix microseconds.
    #[inline]
    pub fn now_micros(&self) -> u64 {
        match self {
            TimeSource::System => crate::table::unix_micros(),
            TimeSource::Manual(clock) => clock.get(),
        }
    }
}

/// A clock that only moves when told to, in Unix microseconds.
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn new(micros: u64) -> Self {
        ManualClock(Arc::new(AtomicU64::new(micros)))
    }

    pub fn set(&self, micros: u64) {
        self.0.store(micros, Ordering::Release);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// A time source reading this clock.
    pub fn source(&self) -> TimeSource {
        TimeSource::Manual(self.clone())
    }
}

/// The ceiling shared by every shard of one server, and the file that keeps it.
pub struct Fencing {
    time: TimeSource,
    /// How far ahead of the clock (or of the largest token asked for) a new ceiling is set, in
    /// microseconds.
    reserve: u64,
    /// None: no state file, no ceiling; tokens only follow the clock.
    file: Option<StateFile>,
    /// Every token issued is below this, and this is durable in the file. `u64::MAX` without a
    /// file.
    ceiling: AtomicU64,
    /// The saved ceiling found at start: every token of this run is above it.
    start_after: u64,
    /// The largest token a shard wanted when it asked for a new ceiling.
    demand: AtomicU64,
    /// Serialises renewals (only the renewer thread writes, but tests call `renew_if_due`).
    writer: Mutex<()>,
    /// The renewer's wake-up requests and stop flag; shards wait on `renewed` under it.
    sync: Mutex<Signals>,
    wake_renewer: Condvar,
    renewed: Condvar,
    /// Ceilings made durable since start (the first one included).
    writes: AtomicU64,
    /// Ceiling writes that failed while running (each is retried).
    write_errors: AtomicU64,
    /// Nanoseconds shards spent waiting at the ceiling, summed.
    waited_ns: AtomicU64,
    /// Shards waiting at the ceiling now.
    waiting: AtomicU64,
}

#[derive(Default)]
struct Signals {
    /// A shard asked for a new ceiling since the renewer last looked.
    requested: bool,
    /// The server is stopping: the renewer leaves.
    stopping: bool,
}

impl Fencing {
    /// No state file: tokens are the hybrid logical clock alone.
    pub fn unbounded(time: TimeSource) -> Arc<Fencing> {
        Arc::new(Fencing::new(time, 0, None, u64::MAX, 0))
    }

    /// The server's fencing state from its settings: [`Fencing::open`] with `-state-file`,
    /// [`Fencing::unbounded`] without.
    pub fn from_config(config: &crate::Config) -> io::Result<Arc<Fencing>> {
        match config.state_file_path() {
            Some(path) => Fencing::open(
                path,
                Duration::from_millis(config.token_reserve_ms),
                TimeSource::System,
                config.slow_ceiling_write,
            ),
            None => Ok(Fencing::unbounded(TimeSource::System)),
        }
    }

    /// Takes the state file at `path` for this server alone (an exclusive lock on `PATH.lock`,
    /// held while the returned `Fencing` lives; a file another server holds is an error for
    /// which [`crate::files::Held::is`] holds), reads the ceiling saved there (a missing file
    /// is a first start), then writes the first ceiling of this run and makes it durable, so it
    /// is in place before any grant. A file that cannot be read or parsed, or a location that
    /// cannot be written, is an error whose text names the file and the reason on one line. `slow_write` delays every write
    /// between syncing the temporary file and renaming it (for tests only).
    pub fn open(
        path: &Path,
        reserve: Duration,
        time: TimeSource,
        slow_write: Option<Duration>,
    ) -> io::Result<Arc<Fencing>> {
        let file = StateFile::open(path, slow_write)?;
        let saved = file.read()?.unwrap_or(0);
        let reserve = u64::try_from(reserve.as_micros())
            .unwrap_or(u64::MAX)
            .max(2);
        let base = time.now_micros().max(saved + 1);
        let first = base.saturating_add(reserve);
        file.write(first)
            .map_err(|e| file.error("cannot write", e))?;
        let fencing = Fencing::new(time, reserve, Some(file), first, saved);
        fencing.writes.store(1, Ordering::Relaxed);
        Ok(Arc::new(fencing))
    }

    fn new(
        time: TimeSource,
        reserve: u64,
        file: Option<StateFile>,
        ceiling: u64,
        start_after: u64,
    ) -> Fencing {
        Fencing {
            time,
            reserve,
            file,
            ceiling: AtomicU64::new(ceiling),
            start_after,
            demand: AtomicU64::new(0),
            writer: Mutex::new(()),
            sync: Mutex::new(Signals::default()),
            wake_renewer: Condvar::new(),
            renewed: Condvar::new(),
            writes: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            waited_ns: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
        }
    }

    /// A token clock for one shard, starting above the saved ceiling.
    pub fn clock(self: &Arc<Self>) -> TokenClock {
        TokenClock {
            time: self.time.clone(),
            last: self.start_after,
            mark: self.mark_for(self.ceiling.load(Ordering::Acquire)),
            fencing: self.file.is_some().then(|| self.clone()),
        }
    }

    /// The state file's lock (`PATH.lock`) and its path, to hand a live upgrade's successor.
    pub fn lock_file(&self) -> Option<(PathBuf, std::os::fd::RawFd)> {
        self.file.as_ref().map(StateFile::lock_file)
    }

    /// The durable ceiling, if there is a state file.
    pub fn ceiling(&self) -> Option<u64> {
        self.file
            .as_ref()
            .map(|_| self.ceiling.load(Ordering::Acquire))
    }

    /// The state file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(|f| f.path.as_path())
    }

    /// Ceilings made durable since start.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Ceiling writes that failed while running.
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }

    /// Total time shards have waited at the ceiling.
    pub fn waited(&self) -> Duration {
        Duration::from_nanos(self.waited_ns.load(Ordering::Relaxed))
    }

    /// Shards waiting at the ceiling now.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Acquire)
    }

    /// Where a shard next looks at the shared ceiling: when half the reserve below `ceiling` is
    /// reached, to ask for a new one in good time.
    fn mark_for(&self, ceiling: u64) -> u64 {
        ceiling.saturating_sub(self.reserve / 2)
    }

    fn signals(&self) -> MutexGuard<'_, Signals> {
        // The guarded flags stay meaningful whatever a panicking holder was doing.
        self.sync.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A shard wants tokens up to `token`: wake the renewer.
    fn request(&self, token: u64) {
        self.demand.fetch_max(token, Ordering::AcqRel);
        let mut signals = self.signals();
        signals.requested = true;
        self.wake_renewer.notify_one();
    }

    /// Blocks until a durable ceiling above `token` is in place, and returns it.
    fn wait_above(&self, token: u64) -> u64 {
        let started = Instant::now();
        self.waiting.fetch_add(1, Ordering::AcqRel);
        self.request(token);
        let mut signals = self.signals();
        let ceiling = loop {
            // Read under the lock the renewer publishes under, so no wake-up is lost.
            let ceiling = self.ceiling.load(Ordering::Acquire);
            if ceiling > token {
                break ceiling;
            }
            signals = self
                .renewed
                .wait(signals)
                .unwrap_or_else(|e| e.into_inner());
        };
        drop(signals);
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        let waited = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.waited_ns.fetch_add(waited, Ordering::Relaxed);
        ceiling
    }

    /// One step of the renewer: when half of the reserve is used (by the clock or by the
    /// tokens shards asked for), writes `max(now, demand) + reserve`, makes it durable, and only
    /// then lets shards use it. Returns whether it wrote.
    pub fn renew_if_due(&self) -> io::Result<bool> {
        let Some(file) = &self.file else {
            return Ok(false);
        };
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let ceiling = self.ceiling.load(Ordering::Acquire);
        let base = self
            .time
            .now_micros()
            .max(self.demand.load(Ordering::Acquire));
        if base < self.mark_for(ceiling) {
            return Ok(false);
        }
        // base >= ceiling - reserve/2, so this is above the old ceiling.
        let next = base
            .saturating_add(self.reserve)
            .max(ceiling.saturating_add(1));
        if let Err(e) = file.write(next) {
            self.write_errors.fetch_add(1, Ordering::Relaxed);
            return Err(file.error("cannot write", e));
        }
        {
            let _signals = self.signals();
            self.ceiling.store(next, Ordering::Release);
        }
        self.renewed.notify_all();
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Starts the thread that keeps the ceiling ahead of the tokens (none without a state
    /// file). Stop it only after the shards: a shard waiting at the ceiling needs it.
    pub fn start_renewer(self: &Arc<Self>) -> io::Result<Option<Renewer>> {
        if self.file.is_none() {
            return Ok(None);
        }
        // A renewer stopped for a live upgrade that was called off starts again.
        self.signals().stopping = false;
        let fencing = self.clone();
        let thread = std::thread::Builder::new()
            .name("glockd-fencing".into())
            .spawn(move || fencing.renew_until_stopped())?;
        Ok(Some(Renewer {
            fencing: self.clone(),
            thread: Some(thread),
        }))
    }

    fn renew_until_stopped(&self) {
        let mut failures = 0u32;
        loop {
            let pause = match self.renew_if_due() {
                Ok(wrote) => {
                    if failures > 0 && wrote {
                        tracing::info!(
                            event = "ceiling_saved",
                            failures,
                            "the fencing token ceiling is saved again"
                        );
                        failures = 0;
                    }
                    self.until_due()
                }
                Err(e) => {
                    if failures == 0 {
                        tracing::error!(
                            event = "ceiling_write_failed",
                            error = %e,
                            "retrying, and exclusive grants wait at the current ceiling until a write succeeds"
                        );
                    }
                    failures = failures.saturating_add(1);
                    // Retry soon, but do not spin on a full or broken disk.
                    Duration::from_millis(50u64 << failures.min(5))
                }
            };
            let mut signals = self.signals();
            if !signals.requested && !signals.stopping {
                signals = self
                    .wake_renewer
                    .wait_timeout(signals, pause)
                    .map(|(guard, _)| guard)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            if signals.stopping {
                return;
            }
            signals.requested = false;
        }
    }

    /// How long the renewer may sleep before the clock makes a renewal due. Capped at a quarter
    /// of the reserve, so a clock stepped forward is noticed without a shard having to ask.
    fn until_due(&self) -> Duration {
        let ceiling = self.ceiling.load(Ordering::Acquire);
        let base = self
            .time
            .now_micros()
            .max(self.demand.load(Ordering::Acquire));
        let left = self.mark_for(ceiling).saturating_sub(base);
        Duration::from_micros(left.min(self.reserve / 4).max(1000))
    }
}

/// The thread renewing the ceiling; stops (and is joined) when dropped.
pub struct Renewer {
    fencing: Arc<Fencing>,
    thread: Option<JoinHandle<()>>,
}

impl Renewer {
    pub fn stop(&mut self) {
        self.fencing.signals().stopping = true;
        self.fencing.wake_renewer.notify_all();
        if let Some(thread) = self.thread.take() {
            // A renewer that panicked has already said so on stderr.
            let _ = thread.join();
        }
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One shard's token clock: strictly increasing, never at or above the durable ceiling.
pub struct TokenClock {
    time: TimeSource,
    /// The last token issued (at start: the saved ceiling, so the first token is above it).
    last: u64,
    /// Tokens below this are issued without looking at the shared ceiling; from here on the
    /// shard asks for a new one, and at the ceiling itself it waits.
    mark: u64,
    /// None without a state file (and `mark` is then `u64::MAX`).
    fencing: Option<Arc<Fencing>>,
}

impl Default for TokenClock {
    fn default() -> Self {
        TokenClock::unbounded(TimeSource::System)
    }
}

impl TokenClock {
    /// Tokens from the clock alone, increasing only while this clock lives.
    pub fn unbounded(time: TimeSource) -> Self {
        TokenClock {
            time,
            last: 0,
            mark: u64::MAX,
            fencing: None,
        }
    }

    /// The next token: the clock or one more than the last, whichever is larger; if that
    /// reaches the durable ceiling, blocks until a higher ceiling is durable.
    #[inline]
    pub fn issue(&mut self) -> u64 {
        let token = self.last.saturating_add(1).max(self.time.now_micros());
        let token = if token < self.mark {
            token
        } else {
            self.near_ceiling(token)
        };
        self.last = token;
        token
    }

    /// The last token issued (0 before the first).
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Every token from now on is above `last` as well: a live upgrade hands the tokens the
    /// old process issued to the new one, whose clock may read earlier.
    pub fn advance_past(&mut self, last: u64) {
        self.last = self.last.max(last);
    }

    /// A live upgrade: tokens go on from `last`, the last one the old process issued, even if
    /// this clock started higher (at the saved ceiling, which lies a reserve ahead of it).
    /// Safe because the old process is stopped and `last` is its last token; starting at the
    /// ceiling instead would move tokens, and the lock ages they give, a reserve ahead of the
    /// clock at every upgrade.
    pub fn continue_from(&mut self, last: u64) {
        self.last = last;
    }

    #[cold]
    #[inline(never)]
    fn near_ceiling(&mut self, token: u64) -> u64 {
        let Some(fencing) = &self.fencing else {
            return token;
        };
        let mut ceiling = fencing.ceiling.load(Ordering::Acquire);
        let mark = fencing.mark_for(ceiling);
        if token >= mark {
            fencing.request(token);
        }
        if token >= ceiling {
            ceiling = fencing.wait_above(token);
        }
        // Asked already: run on to the ceiling itself before looking again.
        let mark = fencing.mark_for(ceiling);
        self.mark = if token >= mark { ceiling } else { mark };
        token
    }
}

mod state_file;
#[cfg(test)]
mod tests;

use state_file::StateFile;
pub use state_file::{parse_state, render_state};
