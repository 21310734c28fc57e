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

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
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

    /// Reads the ceiling saved at `path` (a missing file is a first start), then writes the
    /// first ceiling of this run and makes it durable, so it is in place before any grant.
    /// A file that cannot be read or parsed, or a location that cannot be written, is an error
    /// whose text names the file and the reason on one line. `slow_write` delays every write
    /// between syncing the temporary file and renaming it (for tests only).
    pub fn open(
        path: &Path,
        reserve: Duration,
        time: TimeSource,
        slow_write: Option<Duration>,
    ) -> io::Result<Arc<Fencing>> {
        let file = StateFile::new(path, slow_write);
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
                        eprintln!(
                            "glockd: the fencing token ceiling is saved again (after {failures} failed writes)"
                        );
                        failures = 0;
                    }
                    self.until_due()
                }
                Err(e) => {
                    if failures == 0 {
                        eprintln!(
                            "glockd: error: {e}; retrying, and exclusive grants wait at the current ceiling until a write succeeds"
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

/// The file that keeps the ceiling.
struct StateFile {
    path: PathBuf,
    /// Written first, then renamed over `path`.
    temp: PathBuf,
    /// `path`'s directory, synced after the rename so the new name survives a crash.
    dir: PathBuf,
    slow_write: Option<Duration>,
}

impl StateFile {
    fn new(path: &Path, slow_write: Option<Duration>) -> Self {
        let mut temp = path.as_os_str().to_owned();
        temp.push(".tmp");
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        StateFile {
            path: path.to_path_buf(),
            temp: PathBuf::from(temp),
            dir,
            slow_write,
        }
    }

    /// An error naming the file, on one line.
    fn error(&self, what: &str, e: impl std::fmt::Display) -> io::Error {
        io::Error::other(format!("state file {}: {what}: {e}", self.path.display()))
    }

    /// The saved ceiling, or None when there is no file yet.
    fn read(&self) -> io::Result<Option<u64>> {
        let mut text = Vec::new();
        match File::open(&self.path) {
            Ok(file) => file
                .take(MAX_STATE_BYTES + 1)
                .read_to_end(&mut text)
                .map_err(|e| self.error("cannot read", e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.error("cannot read", e)),
        };
        if text.len() as u64 > MAX_STATE_BYTES {
            return Err(self.error(
                "not a glockd state file",
                format!("longer than {MAX_STATE_BYTES} bytes"),
            ));
        }
        parse_state(&text)
            .map(Some)
            .map_err(|reason| self.error("not a valid glockd state file", reason))
    }

    /// Replaces the file with one holding `ceiling`, durably: temporary file, fsync, rename,
    /// fsync of the directory. A crash at any point leaves either the old file or the new one.
    fn write(&self, ceiling: u64) -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&self.temp)?;
        file.write_all(render_state(ceiling).as_bytes())?;
        file.sync_all()?;
        drop(file);
        if let Some(delay) = self.slow_write {
            std::thread::sleep(delay);
        }
        std::fs::rename(&self.temp, &self.path)?;
        File::open(&self.dir)?.sync_all()
    }
}

/// The state file's text for `ceiling`.
pub fn render_state(ceiling: u64) -> String {
    format!(
        "# glockd state: every fencing token this server has issued is below the ceiling.\n\
         glockd-state {STATE_VERSION}\n\
         ceiling {ceiling}\n"
    )
}

/// The ceiling in a state file's text, or why the text is not a state file.
pub fn parse_state(text: &[u8]) -> Result<u64, String> {
    if text.iter().all(u8::is_ascii_whitespace) {
        return Err("the file is empty".into());
    }
    let text = std::str::from_utf8(text).map_err(|_| "the file is not text".to_owned())?;
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(at, line)| (at + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'));
    let number = |at: usize, key: &str, value: &str| -> Result<u64, String> {
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "line {at}: `{key}` needs a whole number, not {value:?}"
            ));
        }
        value
            .parse::<u64>()
            .map_err(|_| format!("line {at}: {key} {value} is too large"))
    };
    let split = |line: &'_ str| -> (String, String) {
        let (key, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        (key.to_owned(), value.trim().to_owned())
    };
    let Some((at, first)) = lines.next() else {
        return Err("no `glockd-state` line".into());
    };
    let (key, value) = split(first);
    if key != "glockd-state" {
        return Err(format!(
            "line {at}: expected `glockd-state {STATE_VERSION}`, found {:?}",
            truncated(first)
        ));
    }
    let version = number(at, "glockd-state", &value)?;
    if version != STATE_VERSION {
        return Err(format!(
            "version {version} is not supported (this glockd reads version {STATE_VERSION})"
        ));
    }
    let mut ceiling = None;
    for (at, line) in lines {
        let (key, value) = split(line);
        match key.as_str() {
            "ceiling" if ceiling.is_none() => ceiling = Some(number(at, "ceiling", &value)?),
            "ceiling" => return Err(format!("line {at}: a second `ceiling`")),
            _ => return Err(format!("line {at}: unknown setting {:?}", truncated(line))),
        }
    }
    let ceiling = ceiling.ok_or_else(|| "no `ceiling` line".to_owned())?;
    if ceiling > MAX_CEILING {
        return Err(format!("ceiling {ceiling} leaves no room for more tokens"));
    }
    Ok(ceiling)
}

/// At most 40 characters of `line`, for an error message.
fn truncated(line: &str) -> String {
    line.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2025-11-26 10:00:34 UTC, in microseconds.
    const T0: u64 = 1_764_151_234_000_000;
    const HOUR: u64 = 3_600_000_000;
    const RESERVE: Duration = Duration::from_millis(3000);

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "glockd-fencing-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn saved(path: &Path) -> u64 {
        parse_state(&std::fs::read(path).expect("state file")).expect("valid")
    }

    fn open(path: &Path, clock: &ManualClock) -> Arc<Fencing> {
        Fencing::open(path, RESERVE, clock.source(), None).expect("opens")
    }

    #[test]
    fn tokens_keep_increasing_when_the_clock_steps_back() {
        for bounded in [false, true] {
            let dir = temp_dir("back");
            let clock = ManualClock::new(T0);
            let fencing = if bounded {
                open(&dir.join("state"), &clock)
            } else {
                Fencing::unbounded(clock.source())
            };
            let mut tokens = fencing.clock();
            let first = tokens.issue();
            assert_eq!(first, T0);
            clock.set(T0 - HOUR);
            let after: Vec<u64> = (0..1000).map(|_| tokens.issue()).collect();
            assert_eq!(after[0], first + 1);
            assert!(after.windows(2).all(|w| w[1] == w[0] + 1));
            // Once the clock is past the last token again, tokens follow it.
            clock.set(T0 + 5000);
            assert_eq!(tokens.issue(), T0 + 5000);
            assert_eq!(fencing.waiting(), 0);
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    #[test]
    fn tokens_follow_the_clock_forward() {
        let dir = temp_dir("forward");
        let clock = ManualClock::new(T0);
        let fencing = open(&dir.join("state"), &clock);
        let mut tokens = fencing.clock();
        assert_eq!(tokens.issue(), T0);
        clock.set(T0 + 1_000_000);
        assert_eq!(
            tokens.issue(),
            T0 + 1_000_000,
            "within the reserve: no wait"
        );
        assert_eq!(fencing.waited(), Duration::ZERO);
        // A step far forward, past the ceiling, is served once a new ceiling is durable.
        clock.set(T0 + HOUR);
        let renewer = fencing.start_renewer().expect("thread").expect("a renewer");
        let token = tokens.issue();
        assert_eq!(token, T0 + HOUR);
        assert!(saved(fencing.path().unwrap()) > token);
        drop(renewer);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn renewal_is_due_when_half_the_reserve_is_used() {
        let dir = temp_dir("due");
        let path = dir.join("state");
        let clock = ManualClock::new(T0);
        let fencing = open(&path, &clock);
        let reserve = 3_000_000;
        assert_eq!(fencing.ceiling(), Some(T0 + reserve));
        assert_eq!(saved(&path), T0 + reserve);
        assert_eq!(fencing.writes(), 1);
        clock.set(T0 + reserve / 2 - 1);
        assert!(!fencing.renew_if_due().unwrap());
        clock.set(T0 + reserve / 2);
        assert!(fencing.renew_if_due().unwrap());
        assert_eq!(fencing.ceiling(), Some(T0 + reserve / 2 + reserve));
        assert_eq!(saved(&path), T0 + reserve / 2 + reserve);
        assert_eq!(fencing.writes(), 2);
        assert!(!fencing.renew_if_due().unwrap());
        assert!(
            !dir.join("state.tmp").exists(),
            "the temporary file is renamed"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_burst_past_the_ceiling_waits_for_the_renewal() {
        let dir = temp_dir("burst");
        let path = dir.join("state");
        // The clock stands still, so only the burst moves the tokens (one each).
        let clock = ManualClock::new(T0);
        let fencing =
            Fencing::open(&path, Duration::from_millis(1), clock.source(), None).expect("opens");
        let ceiling = fencing.ceiling().unwrap();
        assert_eq!(ceiling, T0 + 1000);
        let issued = Arc::new(AtomicU64::new(0));
        let shard = {
            let (fencing, issued) = (fencing.clone(), issued.clone());
            std::thread::spawn(move || {
                let mut tokens = fencing.clock();
                let burst: Vec<u64> = (0..3000)
                    .map(|_| {
                        let token = tokens.issue();
                        issued.store(token, Ordering::Release);
                        token
                    })
                    .collect();
                burst
            })
        };
        // No renewer runs: the shard must stop at the ceiling and wait there.
        let deadline = Instant::now() + Duration::from_secs(60);
        while fencing.waiting() == 0 {
            assert!(
                Instant::now() < deadline,
                "the shard never reached the ceiling"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(issued.load(Ordering::Acquire), ceiling - 1);
        assert_eq!(saved(&path), ceiling, "nothing was written behind its back");
        // Each renewal lets it run on to the next ceiling and no further.
        let mut renewals = 0;
        while !shard.is_finished() {
            if fencing.renew_if_due().unwrap() {
                renewals += 1;
                assert!(issued.load(Ordering::Acquire) < saved(&path));
            }
            std::thread::yield_now();
        }
        let burst = shard.join().unwrap();
        assert!(burst.windows(2).all(|w| w[1] == w[0] + 1));
        assert_eq!(burst[0], T0);
        assert!(*burst.last().unwrap() < saved(&path));
        assert!(
            renewals >= 2,
            "{renewals} renewals for 3000 tokens of 1000 each"
        );
        assert!(fencing.waited() > Duration::ZERO);
        assert_eq!(fencing.waiting(), 0);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_restart_starts_above_the_saved_ceiling() {
        let dir = temp_dir("restart");
        let path = dir.join("state");
        let clock = ManualClock::new(T0);
        let before = {
            let fencing = open(&path, &clock);
            let mut shards: Vec<TokenClock> = (0..4).map(|_| fencing.clock()).collect();
            let tokens: Vec<u64> = shards.iter_mut().map(|s| s.issue()).collect();
            *tokens.iter().max().unwrap()
        };
        let saved_ceiling = saved(&path);
        assert!(saved_ceiling > before);
        // Back an hour, and with another shard count: every shard starts above the ceiling.
        clock.set(T0 - HOUR);
        let fencing = open(&path, &clock);
        for mut shard in (0..3).map(|_| fencing.clock()) {
            assert_eq!(shard.issue(), saved_ceiling + 1);
        }
        assert!(fencing.ceiling().unwrap() > saved_ceiling + 1);
        assert_eq!(saved(&path), fencing.ceiling().unwrap());
        // With the clock behind, the shards' demand drives the renewals.
        let mut shard = fencing.clock();
        let ceiling = fencing.ceiling().unwrap();
        let mut last = 0;
        while last < fencing.mark_for(ceiling) {
            last = shard.issue();
        }
        assert!(fencing.renew_if_due().unwrap());
        assert!(fencing.ceiling().unwrap() >= last + 3_000_000);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_ceiling_in_the_future_is_honoured() {
        let dir = temp_dir("future");
        let path = dir.join("state");
        std::fs::write(&path, render_state(T0 + HOUR)).unwrap();
        let clock = ManualClock::new(T0);
        let fencing = open(&path, &clock);
        assert_eq!(fencing.clock().issue(), T0 + HOUR + 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_state_file_round_trips_and_bad_ones_are_refused() {
        assert_eq!(parse_state(render_state(T0).as_bytes()), Ok(T0));
        assert_eq!(
            parse_state(b"glockd-state 1\r\n\r\n  ceiling   42  \n# note\n"),
            Ok(42)
        );
        let bad = |text: &str| parse_state(text.as_bytes()).expect_err(text);
        assert!(bad("").contains("empty"));
        assert!(bad("\n \n").contains("empty"));
        assert!(bad("# only a comment\n").contains("no `glockd-state`"));
        assert!(bad("ceiling 5\n").contains("expected `glockd-state 1`"));
        assert!(bad("glockd-state 2\nceiling 5\n").contains("version 2"));
        assert!(bad("glockd-state 1\n").contains("no `ceiling`"));
        assert!(bad("glockd-state 1\nceiling\n").contains("whole number"));
        assert!(bad("glockd-state 1\nceiling -5\n").contains("whole number"));
        assert!(bad("glockd-state 1\nceiling 5x\n").contains("whole number"));
        assert!(bad("glockd-state 1\nceiling 99999999999999999999\n").contains("too large"));
        assert!(bad("glockd-state 1\nceiling 18446744073709551615\n").contains("no room"));
        assert!(bad("glockd-state 1\nceiling 5\nceiling 6\n").contains("second"));
        assert!(bad("glockd-state 1\nceiling 5\nmore 6\n").contains("unknown"));
        assert!(parse_state(b"glockd-state 1\nceiling \xff\n")
            .unwrap_err()
            .contains("not text"));
        assert!(bad("glockd-state 1\nceiling 5\n\0\0\0").contains("unknown"));
        for text in ["", "garbage", "glockd-state 1\nceiling\n"] {
            assert!(!bad(text).contains('\n'), "one line");
        }
    }

    #[test]
    fn unusable_state_files_are_start_up_errors() {
        let dir = temp_dir("errors");
        let clock = ManualClock::new(T0);
        let fails = |path: &Path| -> String {
            match Fencing::open(path, RESERVE, clock.source(), None) {
                Ok(_) => panic!("{} opened", path.display()),
                Err(e) => e.to_string(),
            }
        };
        let empty = dir.join("empty");
        std::fs::write(&empty, "").unwrap();
        let reason = fails(&empty);
        assert!(reason.contains("empty") && reason.contains(&*empty.to_string_lossy()));
        assert_eq!(
            std::fs::read(&empty).unwrap(),
            b"",
            "a bad file is left alone"
        );
        let corrupt = dir.join("corrupt");
        std::fs::write(&corrupt, "glockd-state 1\nceiling 12ab\n").unwrap();
        assert!(fails(&corrupt).contains("whole number"));
        let big = dir.join("big");
        std::fs::write(&big, "#".repeat(10_000)).unwrap();
        assert!(fails(&big).contains("longer than"));
        let directory = dir.join("a-directory");
        std::fs::create_dir(&directory).unwrap();
        assert!(fails(&directory).contains("cannot read"));
        let nowhere = dir.join("missing-dir").join("state");
        assert!(fails(&nowhere).contains("cannot write"));
        let under_a_file = empty.join("state");
        assert!(fails(&under_a_file).contains("state file"));
        // A missing file in a writable place is a first start.
        let fresh = dir.join("fresh");
        let fencing = Fencing::open(&fresh, RESERVE, clock.source(), None).unwrap();
        assert_eq!(saved(&fresh), fencing.ceiling().unwrap());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_slow_write_is_not_visible_until_it_is_durable() {
        let dir = temp_dir("slow");
        let path = dir.join("state");
        let clock = ManualClock::new(T0);
        let fencing = Fencing::open(
            &path,
            RESERVE,
            clock.source(),
            Some(Duration::from_millis(500)),
        )
        .unwrap();
        let first = fencing.ceiling().unwrap();
        clock.set(T0 + 2_000_000);
        let writer = {
            let fencing = fencing.clone();
            std::thread::spawn(move || fencing.renew_if_due())
        };
        // While the write is in progress (its temporary file not yet renamed) the old ceiling
        // stands, in memory and on disk.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !writer.is_finished() {
            assert!(Instant::now() < deadline);
            let (on_disk, in_memory) = (saved(&path), fencing.ceiling());
            if dir.join("state.tmp").exists() {
                assert_eq!((on_disk, in_memory), (first, Some(first)));
            }
            std::thread::yield_now();
        }
        assert!(writer.join().unwrap().unwrap());
        assert_eq!(saved(&path), T0 + 5_000_000);
        assert_eq!(fencing.ceiling(), Some(T0 + 5_000_000));
        let _ = std::fs::remove_dir_all(dir);
    }
}
