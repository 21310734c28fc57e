//! Live upgrades from the command line's side: what SIGUSR2 does in the running server
//! ([`Upgrader`]), what the new process does to take over ([`Handover`]), and
//! `glockd upgrade -pidfile FILE [FLAGS…]`, which asks a running server for one and reports
//! how it went.

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use glockd::doors::Inherited;
use glockd::pidfile::Pidfile;
use glockd::upgrade::wire::{Channel, Kind};
use glockd::upgrade::{image, ListenersImage, Request, CHANNEL_ENV};
use glockd::{Config, Listeners, ServerHandle};
use tracing::{info, warn};

/// `PIDFILE.upgrade`: the flags `glockd upgrade` adds, NUL-separated; it exists while an
/// upgrade it asked for is in progress.
fn request_path(pidfile: &Path) -> PathBuf {
    with_suffix(pidfile, ".upgrade")
}

/// `PIDFILE.upgrade-result`: how the upgrade went, one line, for `glockd upgrade` to print.
fn result_path(pidfile: &Path) -> PathBuf {
    with_suffix(pidfile, ".upgrade-result")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The running server's side: SIGUSR2 starts the binary at the path this server was started
/// from, with its flags (and any `glockd upgrade` added), and hands everything over.
pub struct Upgrader {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
    pub pidfile: Option<PathBuf>,
    pub timeout: Duration,
    pub max_pause: Duration,
}

impl Upgrader {
    /// Runs one upgrade; true once the successor serves everything (this process then exits
    /// without releasing anything), false if it was called off (everything runs here again).
    pub fn run(
        &self,
        server: &mut ServerHandle,
        held: Vec<(PathBuf, RawFd)>,
        abort: std::sync::Arc<glockd::upgrade::Abort>,
    ) -> bool {
        // Asked by `glockd upgrade` (which waits for the outcome), or by a bare SIGUSR2.
        let asked = self.request();
        let extra = asked.clone().unwrap_or_default();
        let mut args = self.args.clone();
        args.extend(extra.iter().cloned());
        info!(
            event = "upgrade_start",
            exe = %self.exe.display(),
            added = %extra.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "),
            "live upgrade: starting the new binary"
        );
        let request = Request {
            exe: self.exe.clone(),
            args,
            held,
            timeout: self.timeout,
            max_pause: self.max_pause,
            abort: abort.clone(),
        };
        let outcome = server.upgrade(&request);
        let line = match &outcome {
            Ok(summary) => {
                info!(
                    event = "upgrade_done",
                    pid = summary.pid,
                    pause_ms = summary.pause.as_secs_f64() * 1e3,
                    total_ms = summary.total.as_secs_f64() * 1e3,
                    connections = summary.connections,
                    locks = summary.locks,
                    shared_locks = summary.shared,
                    closed = summary.closed,
                    "live upgrade done: the new process serves every connection; exiting"
                );
                format!(
                    "upgraded: pid {} serves {} connections, {} locks and {} shared lock \
                     holders (paused {:.1} ms, {} TLS connections closed)",
                    summary.pid,
                    summary.connections,
                    summary.locks,
                    summary.shared,
                    summary.pause.as_secs_f64() * 1e3,
                    summary.closed
                )
            }
            Err(why) => match abort.why() {
                // Called off by a stopping signal: the server does not carry on.
                Some(signalled) => {
                    warn!(event = "upgrade_rolled_back", reason = %signalled, "live upgrade called off");
                    format!("upgrade called off: {signalled}")
                }
                None => {
                    warn!(
                        event = "upgrade_rolled_back",
                        reason = %why,
                        "live upgrade called off; this server carries on with every connection"
                    );
                    format!("upgrade called off, the running server carries on: {why}")
                }
            },
        };
        if let Ok(summary) = &outcome {
            // Under systemd, the successor is the service's main process now: said before this
            // one exits (systemd reads notifications before exits), so the service is not
            // taken for stopped. The successor says so too once it serves.
            let _ = sd_notify::notify(&[sd_notify::NotifyState::MainPid(summary.pid)]);
        }
        if asked.is_some() {
            self.report(&line);
        }
        outcome.is_ok()
    }

    /// A request that cannot be taken now (`signal` came during shutdown): logged, and
    /// `glockd upgrade`, if it asked, told why at once.
    pub fn refuse(&self, signal: &str, why: &str) {
        warn!(event = "upgrade_refused", signal = %signal, "live upgrade refused: {why}");
        if self.request().is_some() {
            self.report(&format!("upgrade refused: {why}"));
        }
    }

    /// The flags `glockd upgrade` added, if it asked: `PIDFILE.upgrade`, a regular file of
    /// this process's user (one anybody else left beside the pidfile is not obeyed).
    fn request(&self) -> Option<Vec<OsString>> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let pidfile = self.pidfile.as_ref()?;
        let path = request_path(pidfile);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(&path)
            .ok()?;
        let meta = file.metadata().ok()?;
        if !meta.is_file() || meta.uid() != nix::unistd::geteuid().as_raw() {
            warn!(
                event = "upgrade_request_ignored",
                path = %path.display(),
                "not a regular file of this server's user: its flags are not used"
            );
            return None;
        }
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut bytes).ok()?;
        Some(
            bytes
                .split(|b| *b == 0)
                .filter(|arg| !arg.is_empty())
                .map(|arg| OsString::from_vec(arg.to_vec()))
                .collect(),
        )
    }

    /// Leaves the outcome for `glockd upgrade`, and ends the request.
    fn report(&self, line: &str) {
        let Some(pidfile) = &self.pidfile else {
            return;
        };
        let result = result_path(pidfile);
        let temp = with_suffix(&result, ".tmp");
        if std::fs::write(&temp, format!("{line}\n")).is_ok() {
            let _ = std::fs::rename(&temp, &result);
        }
        let _ = std::fs::remove_file(request_path(pidfile));
    }
}

/// The successor's side of a live upgrade.
pub struct Handover {
    channel: Channel,
    fail_at: Option<String>,
    /// The unix socket's path, when the predecessor owned its file (it is removed at exit).
    unix_owned: Option<PathBuf>,
    /// The predecessor's upgrade counters.
    stats: [u64; 4],
}

impl Handover {
    /// This process is a live upgrade's successor if its predecessor left it the channel.
    pub fn from_env() -> Option<Handover> {
        let fd: RawFd = std::env::var(CHANNEL_ENV).ok()?.parse().ok()?;
        std::env::remove_var(CHANNEL_ENV);
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).ok()?;
        // SAFETY: the predecessor started this process with `fd` open and named it in
        // `CHANNEL_ENV` (checked open just above); nothing else in this process knows of it,
        // and the variable is gone, so it is owned here exactly once.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Not passed on to any process this one starts.
        let _ = nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        Some(Handover {
            channel: Channel::from_fd(fd),
            fail_at: None,
            unix_owned: None,
            stats: [0; 4],
        })
    }

    /// Says it is ready (the flags parsed).
    pub fn ready(mut self, config: &Config) -> std::io::Result<Handover> {
        self.fail_at = config.upgrade_fail_at.clone();
        self.fail("ready");
        self.channel
            .send(Kind::Ready, image::VERSION.to_string().as_bytes(), &[])?;
        Ok(self)
    }

    /// Test switch: fails here if asked to.
    fn fail(&mut self, step: &str) {
        match self.fail_at.as_deref() {
            Some(at) if at == step => {
                eprintln!("glockd: failing the upgrade at step {step} (-upgrade-fail-at)");
                std::process::exit(3);
            }
            Some("refuse") if step == "adopt" => {
                self.refuse("refused by -upgrade-fail-at");
                std::process::exit(3);
            }
            Some("hang") if step == "adopt" => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            _ => {}
        }
    }

    /// Tells the predecessor this process will not take over (it carries on).
    pub fn refuse(&mut self, why: &str) {
        let _ = self.channel.send(Kind::Refused, why.as_bytes(), &[]);
    }

    /// The listening sockets and locked files the predecessor hands over.
    pub fn listeners(&mut self) -> std::io::Result<Inherited> {
        let msg = self.channel.expect(Kind::Listeners)?;
        self.fail("listeners");
        let description: ListenersImage = postcard::from_bytes(&msg.body)
            .map_err(|e| std::io::Error::other(format!("listeners: {e}")))?;
        let expected =
            description.tcp + usize::from(description.unix.is_some()) + description.held.len();
        if msg.fds.len() != expected {
            return Err(std::io::Error::other(format!(
                "{} descriptors described, {} received",
                expected,
                msg.fds.len()
            )));
        }
        let mut fds = msg.fds.into_iter();
        let mut inherited = Inherited {
            from: Some(
                "the running server (a live upgrade keeps its doors; changing a port or \
                 -metrics needs a restart)",
            ),
            ..Inherited::default()
        };
        for fd in fds.by_ref().take(description.tcp) {
            inherited.tcp.push(std::net::TcpListener::from(fd));
        }
        if let Some((path, owned)) = description.unix {
            if let Some(fd) = fds.next() {
                inherited.unix = Some((std::os::unix::net::UnixListener::from(fd), path.clone()));
                self.unix_owned = owned.then_some(path);
            }
        }
        for (path, fd) in description.held.into_iter().zip(fds) {
            glockd::files::inherit_locked(path, std::fs::File::from(fd));
        }
        self.stats = description.stats;
        Ok(inherited)
    }

    /// A unix socket whose file the predecessor owned is this process's to remove at exit.
    pub fn own_unix(&self, listeners: &mut Listeners) {
        if let (Some(path), Some((_, bound))) = (&self.unix_owned, &listeners.unix) {
            if path == bound {
                listeners.unix_inherited = false;
                listeners.unix_file = glockd::files::Pinned::open(path).ok();
            }
        }
    }

    /// Takes the image and the connections in, says so, and on the commit serves them; the
    /// pidfile is this process's from then on.
    pub fn take_over(
        mut self,
        server: &mut ServerHandle,
        config: &Config,
    ) -> Result<Option<Pidfile>, String> {
        let started = Instant::now();
        let msg = self
            .channel
            .expect(Kind::Image)
            .map_err(|e| e.to_string())?;
        self.fail("image");
        let state = match image::decode(&msg.body) {
            Ok(state) => state,
            Err(why) => {
                self.refuse(&why);
                return Err(why);
            }
        };
        let mut fds = Vec::with_capacity(state.conns.len());
        while fds.len() < state.conns.len() {
            let msg = self.channel.expect(Kind::Fds).map_err(|e| e.to_string())?;
            fds.extend(msg.fds);
        }
        let prepared = match server.adopt(state, fds) {
            Ok(prepared) => prepared,
            Err(why) => {
                self.refuse(&why);
                return Err(why);
            }
        };
        self.fail("adopt");
        self.channel
            .send(Kind::Adopted, b"", &[])
            .map_err(|e| e.to_string())?;
        // The predecessor may still call it off (it then kills this process).
        let commit = self
            .channel
            .expect(Kind::Commit)
            .map_err(|e| format!("the running server did not commit: {e}"))?;
        let times: [u64; 2] = postcard::from_bytes(&commit.body).unwrap_or_default();
        let pidfile = config
            .pidfile
            .as_deref()
            .map(Pidfile::acquire)
            .transpose()
            .map_err(|e| e.to_string())?;
        let connections = prepared.connections();
        let locks = prepared.locks;
        server.serve_carried(prepared, self.stats, times);
        info!(
            event = "upgraded",
            connections,
            locks,
            adopt_ms = started.elapsed().as_secs_f64() * 1e3,
            "took over from the previous process: serving its connections and locks"
        );
        Ok(pidfile)
    }
}

/// `glockd upgrade -pidfile FILE [FLAGS…]`: asks the server whose pid FILE holds for a live
/// upgrade, adding FLAGS to its command line for the new process, waits for the outcome and
/// prints it. Exit status 0: upgraded; 1: called off (the server carries on) or no answer;
/// 2: a usage error.
pub fn command() -> ExitCode {
    let mut args = std::env::args_os().skip(2);
    let mut pidfile = None;
    let mut wait = Duration::from_secs(120);
    let mut extra: Vec<OsString> = Vec::new();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy().into_owned();
        let flag = text.trim_start_matches('-');
        let (name, inline) = match flag.split_once('=') {
            Some((name, value)) => (name.to_owned(), Some(value.to_owned())),
            None => (flag.to_owned(), None),
        };
        match name.as_str() {
            "pidfile" | "wait" if text.starts_with('-') => {
                let value = match inline.map(OsString::from).or_else(|| args.next()) {
                    Some(value) => value,
                    None => return usage(&format!("-{name} needs a value")),
                };
                if name == "pidfile" {
                    pidfile = Some(PathBuf::from(value));
                } else {
                    match value.to_string_lossy().parse::<u64>() {
                        Ok(secs) if secs > 0 => wait = Duration::from_secs(secs),
                        _ => return usage("-wait takes a number of seconds"),
                    }
                }
            }
            "h" | "help" if text.starts_with('-') => {
                println!(
                    "usage: glockd upgrade -pidfile FILE [-wait SECONDS] [FLAGS…]\n\
                     Asks the glockd whose pid FILE holds to replace itself with the binary \
                     now at its path, keeping every connection and lock; FLAGS are added to \
                     its command line (e.g. -shards 4)."
                );
                return ExitCode::SUCCESS;
            }
            _ => extra.push(arg),
        }
    }
    let Some(pidfile) = pidfile else {
        return usage("-pidfile FILE is required (the running server's -pidfile)");
    };
    let pid = match std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|text| text.trim().parse::<i32>().ok())
    {
        Some(pid) if pid > 0 => nix::unistd::Pid::from_raw(pid),
        _ => {
            eprintln!(
                "glockd upgrade: {} holds no pid (is the server running with -pidfile?)",
                pidfile.display()
            );
            return ExitCode::from(1);
        }
    };
    // The server holds the pidfile locked while it runs: a pidfile nobody holds is a stale one,
    // and its pid may be another process's by now.
    if let Ok(file) = std::fs::File::open(&pidfile) {
        use nix::fcntl::{Flock, FlockArg};
        if Flock::lock(file, FlockArg::LockSharedNonblock).is_ok() {
            eprintln!(
                "glockd upgrade: no server holds {} (pid {pid} is not a glockd serving on it); \
                 nothing signalled",
                pidfile.display()
            );
            return ExitCode::from(1);
        }
    }
    let request = request_path(&pidfile);
    let result = result_path(&pidfile);
    let _ = std::fs::remove_file(&result);
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&request)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            eprintln!(
                "glockd upgrade: an upgrade is already in progress ({} exists; remove it if \
                 no upgrade is running)",
                request.display()
            );
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("glockd upgrade: {}: {e}", request.display());
            return ExitCode::from(1);
        }
    };
    let mut bytes = Vec::new();
    for arg in &extra {
        bytes.extend_from_slice(arg.as_bytes());
        bytes.push(0);
    }
    if let Err(e) = file.write_all(&bytes) {
        let _ = std::fs::remove_file(&request);
        eprintln!("glockd upgrade: {}: {e}", request.display());
        return ExitCode::from(1);
    }
    drop(file);
    if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR2) {
        let _ = std::fs::remove_file(&request);
        eprintln!("glockd upgrade: cannot signal pid {pid}: {e}");
        return ExitCode::from(1);
    }
    let until = Instant::now() + wait;
    while Instant::now() < until {
        if let Ok(line) = std::fs::read_to_string(&result) {
            let _ = std::fs::remove_file(&result);
            let line = line.trim();
            println!("{line}");
            return if line.starts_with("upgraded") {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "glockd upgrade: no outcome within {} s (see the server's log)",
        wait.as_secs()
    );
    ExitCode::from(1)
}

fn usage(why: &str) -> ExitCode {
    eprintln!(
        "glockd upgrade: {why} (usage: glockd upgrade -pidfile FILE [-wait SECONDS] [FLAGS…])"
    );
    ExitCode::from(2)
}
