//! The `glockd` binary: flags, pidfile, logging, descriptors, start, serve until a signal says
//! otherwise.
//!
//! Errors that stop the server from starting go straight to stderr as one `glockd: …` line
//! (nothing else is being served, so waiting on stderr costs nothing); everything else goes
//! through the logger, which never makes the server wait.

use std::path::PathBuf;
use std::process::ExitCode;

use glockd::config::{COMMIT, VERSION};
use glockd::descriptors::{self, Budget};
use glockd::files::{FileId, Held};
use glockd::logging;
use glockd::pidfile::Pidfile;
use glockd::signals::{Action, Signals};
use glockd::{Config, Listeners, ServerHandle};
use tracing::{info, warn};

#[path = "main/upgrade.rs"]
mod upgrade;

/// Exit status when a file this server must hold alone (the pidfile, the state file) cannot be
/// had: another server holds it, or it is not a regular file.
const HELD: u8 = 4;

/// Exit status after SIGQUIT, or a second stopping signal during shutdown (128 + SIGINT, as a
/// shell reports an interrupted program).
const AT_ONCE: i32 = 130;

fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|arg| arg == "hash-token")
    {
        return hash_token();
    }
    if std::env::args_os()
        .nth(1)
        .is_some_and(|arg| arg == "upgrade")
    {
        return upgrade::command();
    }
    // Captured before anything can replace the binary: a live upgrade starts the binary at
    // this path (the new one, once the package manager has put it there) with these flags.
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("glockd"));
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let handover = upgrade::Handover::from_env();
    // Sockets systemd passed (socket activation) are taken first, while the process has one
    // thread: taking them clears LISTEN_FDS and LISTEN_PID from the environment.
    let inherited = glockd::doors::Inherited::from_env();
    let mut handover = handover;
    // A successor whose flags do not parse tells the running server why (which carries on).
    let mut config = Config::from_args_or(|why| {
        if let Some(handover) = handover.as_mut() {
            handover.refuse(why);
        }
    });
    let mut handover = match handover.map(|h| h.ready(&config)).transpose() {
        Ok(handover) => handover,
        Err(e) => return fail(1, &format!("cannot take over: {e}")),
    };
    // Debug builds only: the binary's tests make ceiling writes slow to show that grants wait
    // for them. A release build never reads this variable.
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("GLOCKD_TEST_SLOW_CEILING_WRITE_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
    {
        config.slow_ceiling_write = Some(std::time::Duration::from_millis(ms));
    }
    // A live upgrade's successor takes the pidfile once the upgrade commits.
    let pidfile = match config
        .pidfile
        .as_deref()
        .filter(|_| handover.is_none())
        .map(Pidfile::acquire)
        .transpose()
    {
        Ok(pidfile) => pidfile,
        Err(e) => return fail(HELD, &e),
    };
    if let Err(e) = logging::start(config.log_format, config.log_file_path()) {
        return fail(1, &e);
    }
    let fd_limit = raise_open_file_limit();

    // Signal handlers go in before anything is served, so a SIGTERM that arrives the moment
    // the server is up still shuts it down cleanly.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(1, &format!("cannot start: {e}")),
    };
    let mut signals = match runtime.block_on(async { Signals::install() }) {
        Ok(signals) => signals,
        Err(e) => return fail(1, &format!("cannot install signal handlers: {e}")),
    };

    let inherited = match handover.as_mut() {
        Some(handover) => handover.listeners(),
        None => inherited,
    };
    let listeners = match inherited.and_then(|inherited| Listeners::bind_with(&config, inherited)) {
        Ok(mut listeners) => {
            if let Some(handover) = &handover {
                handover.own_unix(&mut listeners);
            }
            listeners
        }
        Err(e) => return refuse(handover.as_mut(), &format!("cannot start: {e}")),
    };
    let budget = Budget::measure(fd_limit, &config);
    if budget.connections == 0 {
        return fail(
            1,
            &format!(
                "cannot start: the open-file limit {} leaves no descriptor for connections \
                 ({} open, {} for the server's threads, {} kept in reserve)",
                budget.limit,
                budget.in_use,
                budget.server,
                descriptors::RESERVE
            ),
        );
    }
    if budget.limited_by_descriptors() {
        warn!(
            event = "fd_limit",
            fd_limit = budget.limit,
            max_connections = budget.connections,
            wanted = budget.wanted,
            "the open-file limit allows fewer connections than -max-connections; serving at \
             most max_connections at once, and the next client gets `0 Too Many Connections` \
             (raise the limit, e.g. LimitNOFILE= in a systemd unit, to serve more)"
        );
    }
    config.max_connections = budget.connections;
    // The memory budget is worked out once, here, so the start-up line shows the one in force.
    config.max_memory = Some(config.memory_budget());

    config.start_paused = handover.is_some();
    let settings = config.clone();
    let mut server = match glockd::start_with_listeners(config, listeners) {
        Ok(server) => server,
        // Another server holds the state file: refused as a held pidfile is.
        Err(e) if Held::is(&e) => return fail(HELD, &e),
        Err(e) => return refuse(handover.as_mut(), &format!("cannot start: {e}")),
    };
    let mut pidfile = pidfile;
    let took_over = handover.is_some();
    if let Some(handover) = handover.take() {
        match handover.take_over(&mut server, &settings) {
            Ok(held) => pidfile = held,
            Err(e) => {
                // Nothing of the predecessor's is served here: it carries on (or has gone).
                // Its sockets must not be shut down from here, so the server is not stopped.
                std::mem::forget(server);
                return fail(1, &format!("cannot take over: {e}"));
            }
        }
    }
    if settings.state_file_path().is_none() {
        warn!(
            event = "fencing",
            "without -state-file, fencing tokens only increase while the system clock does (a \
             restart with the clock set back hands out smaller ones)"
        );
    }
    announce(&server, &settings, &budget);
    // Under systemd (`Type=notify`): serving now; after a live upgrade this process is the
    // service's main process from here on (`NotifyAccess=all` lets it say so).
    let mut ready = vec![sd_notify::NotifyState::Ready];
    if took_over {
        ready.insert(0, sd_notify::NotifyState::MainPid(std::process::id()));
    }
    if let Err(e) = sd_notify::notify(&ready) {
        warn!(event = "sd_notify", error = %e, "could not tell systemd the server is ready");
    }
    let plain: Vec<(&str, std::net::SocketAddr)> =
        [("tcp", server.tcp_addr()), ("ws", server.ws_addr())]
            .into_iter()
            .filter_map(|(door, addr)| Some((door, addr?)))
            .chain(
                server
                    .shard_addrs()
                    .iter()
                    .map(|addr| ("shard port", *addr)),
            )
            .collect();
    if let Some(warning) = glockd::users::exposure_warning(&settings, &plain) {
        warn!(event = "exposed", "{warning}");
    }

    let exit = Exit {
        pidfile,
        unix: server
            .owned_unix_file()
            .map(|(path, file)| (path.to_owned(), file)),
    };
    let upgrade = upgrade::Upgrader {
        exe,
        args,
        pidfile: settings.pidfile.clone(),
        timeout: std::time::Duration::from_secs(settings.upgrade_timeout),
        max_pause: std::time::Duration::from_millis(settings.upgrade_max_pause_ms),
    };
    runtime.block_on(serve_until_signalled(server, &mut signals, exit, upgrade))
}

/// A successor that cannot take over says why to its predecessor (which carries on), then
/// fails as any start does.
fn refuse(handover: Option<&mut upgrade::Handover>, error: &str) -> ExitCode {
    if let Some(handover) = handover {
        handover.refuse(error);
    }
    fail(1, &error)
}

/// The exit after a start-up error: the logger's lines first (bounded), then one line straight
/// to stderr.
fn fail(status: u8, error: &dyn std::fmt::Display) -> ExitCode {
    logging::finish(logging::FINISH_WITHIN);
    eprintln!("glockd: {error}");
    ExitCode::from(status)
}

/// Every connection is a file descriptor: raise the soft limit to the hard one, as Redis does.
/// Returns the limit in force.
fn raise_open_file_limit() -> u64 {
    match descriptors::raise_limit() {
        Ok(limit) => limit,
        Err(e) => {
            let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024));
            warn!(
                event = "fd_limit",
                fd_limit = soft,
                error = %e,
                "could not raise the open-file limit"
            );
            soft
        }
    }
}

/// One line saying what runs where and under which limits (tests and scripts wait for its
/// `listening on`).
fn announce(server: &ServerHandle, config: &Config, budget: &Budget) {
    let mut doors = Vec::new();
    if let Some(addr) = server.tcp_addr() {
        doors.push(format!("tcp {addr}"));
    }
    if let Some(addr) = server.ws_addr() {
        doors.push(format!("ws {addr}"));
    }
    if let Some(addr) = server.tls_addr() {
        doors.push(format!("tls {addr}"));
    }
    if let Some(addr) = server.tls_ws_addr() {
        doors.push(format!("wss {addr}"));
    }
    if let Some(path) = server.unix_path() {
        // Quoted and escaped: a path may hold any byte.
        doors.push(format!("unix {path:?}"));
    }
    if let Some(addr) = server.metrics_addr() {
        doors.push(format!("metrics http://{addr}/metrics"));
    }
    if doors.is_empty() {
        warn!(
            event = "no_doors",
            "every door is disabled (-port=0 -ws=0, no -unix, -tls-port, -tls-ws)"
        );
    }
    info!(
        event = "start",
        version = %VERSION,
        commit = %COMMIT,
        shards = config.shard_count(),
        fd_limit = budget.limit,
        fd_reserve = descriptors::RESERVE,
        max_connections = config.max_connections,
        max_connections_per_ip = config.max_connections_per_ip,
        metrics_max_connections = config.metrics_max_connections,
        max_line_bytes = config.max_line_bytes,
        max_unsent_bytes = config.max_unsent_bytes,
        max_name_bytes = config.max_name_bytes,
        max_locks_per_conn = config.max_locks_per_conn,
        max_lock_name_bytes = config.max_lock_name_bytes,
        max_memory = config.max_memory.unwrap_or(0),
        max_client_buffers = config.max_client_buffers,
        max_wait_ms = config.max_wait_ms,
        write_timeout = config.write_timeout,
        idle_timeout = config.idle_timeout,
        line_timeout = config.line_timeout,
        ws_handshake_timeout = config.ws_handshake_timeout,
        tls_handshake_timeout = config.tls_handshake_timeout,
        max_tls_handshakes = config.max_tls_handshakes,
        tls_client_certificates = config.tls_client_ca.is_some(),
        keepalive_idle = config.keepalive_idle,
        keepalive_interval = config.keepalive_interval,
        keepalive_count = config.keepalive_count,
        shutdown_timeout = config.shutdown_timeout,
        verbose = config.verbose,
        "listening on {}",
        doors.join(", ")
    );
}

/// What must not be left behind however the process ends: the pidfile and the unix socket
/// (each only while its path still names the file this server made).
struct Exit {
    pidfile: Option<Pidfile>,
    unix: Option<(PathBuf, FileId)>,
}

impl Exit {
    /// Ends the process now, without waiting for connections (their locks go with it).
    fn now(self, status: i32) -> ! {
        if let Some((path, file)) = &self.unix {
            glockd::doors::remove_unix(path, *file);
        }
        drop(self.pidfile);
        logging::finish(logging::FINISH_WITHIN);
        std::process::exit(status)
    }

    /// A live upgrade committed: the successor serves everything, holds the pidfile and the
    /// unix socket; this process leaves them all as they are.
    fn handed_over(self) -> ! {
        if let Some(pidfile) = self.pidfile {
            pidfile.keep();
        }
        logging::finish(logging::FINISH_WITHIN);
        std::process::exit(0)
    }

    /// Ends the process after a clean shutdown (the server already removed its socket).
    fn clean(self) -> ExitCode {
        drop(self.pidfile);
        logging::finish(logging::FINISH_WITHIN);
        ExitCode::SUCCESS
    }
}

/// Serves until a signal says stop (see [`glockd::signals`]), then shuts down gracefully, or at
/// once on SIGQUIT or a second stopping signal.
async fn serve_until_signalled(
    mut server: ServerHandle,
    signals: &mut Signals,
    exit: Exit,
    upgrade: upgrade::Upgrader,
) -> ExitCode {
    let upgrade = std::sync::Arc::new(upgrade);
    let stopped_by = loop {
        let (name, action) = signals.recv().await;
        match action {
            Action::Shutdown => break name,
            Action::Quit => {
                warn!(
                    event = "quit",
                    signal = %name,
                    "exiting at once, without draining connections"
                );
                exit.now(AT_ONCE);
            }
            Action::Status => log_status(name, Some(&server)),
            Action::Upgrade => {
                let held: Vec<_> = exit.pidfile.iter().map(Pidfile::handed).collect();
                let (back, then) = upgrading(server, held, &upgrade, signals).await;
                server = back;
                match then {
                    AfterUpgrade::HandedOver => exit.handed_over(),
                    AfterUpgrade::Serve => {}
                    AfterUpgrade::Shutdown(name) => break name,
                    AfterUpgrade::Quit(name) => {
                        warn!(event = "quit", signal = %name, "exiting at once, without draining connections");
                        exit.now(AT_ONCE);
                    }
                }
            }
            Action::Reload => {
                on_signal(name, Action::Reload, Some(&server));
                reload_users(&server);
            }
            action => on_signal(name, action, Some(&server)),
        }
    };
    info!(event = "shutdown", signal = %stopped_by, "shutting down");
    let stopping = tokio::task::spawn_blocking(move || server.shutdown());
    tokio::pin!(stopping);
    loop {
        tokio::select! {
            _ = &mut stopping => return exit.clean(),
            (name, action) = signals.recv() => match action {
                Action::Shutdown | Action::Quit => {
                    // A second signal means "now": do not wait for the shards (returning would
                    // wait for the shutdown still running on the blocking pool).
                    warn!(event = "quit", signal = %name, "second signal; exiting at once");
                    exit.now(AT_ONCE);
                }
                Action::Status => log_status(name, None),
                Action::Upgrade => upgrade.refuse(name, "the server is shutting down"),
                action => on_signal(name, action, None),
            }
        }
    }
}

/// What comes after a live upgrade.
enum AfterUpgrade {
    /// The successor serves everything: this process exits.
    HandedOver,
    /// Called off: serve on.
    Serve,
    /// A stopping signal came meanwhile (the upgrade was called off for it): shut down.
    Shutdown(&'static str),
    /// SIGQUIT came meanwhile: exit at once.
    Quit(&'static str),
}

/// Runs a live upgrade off the signal loop, so that signals meanwhile are answered: a stopping
/// signal calls the upgrade off (or, once it committed, is passed on to the new process) and
/// then stops this server; another SIGUSR2 is refused; the rest wait for the upgrade's end.
async fn upgrading(
    server: ServerHandle,
    held: Vec<(PathBuf, std::os::fd::RawFd)>,
    upgrade: &std::sync::Arc<upgrade::Upgrader>,
    signals: &mut Signals,
) -> (ServerHandle, AfterUpgrade) {
    let abort = glockd::upgrade::Abort::new();
    let task = {
        let (upgrade, abort) = (upgrade.clone(), abort.clone());
        let mut server = server;
        tokio::task::spawn_blocking(move || {
            let handed = upgrade.run(&mut server, held, abort);
            (server, handed)
        })
    };
    tokio::pin!(task);
    let mut stop: Option<(&'static str, bool)> = None;
    let mut reload = None;
    let (server, handed) = loop {
        tokio::select! {
            done = &mut task => match done {
                Ok(done) => break done,
                // The upgrade panicked on the blocking pool: the server is gone with it.
                Err(e) => {
                    warn!(event = "upgrade_failed", error = %e, "the live upgrade failed; exiting");
                    logging::finish(logging::FINISH_WITHIN);
                    std::process::exit(1);
                }
            },
            (name, action) = signals.recv() => match action {
                Action::Shutdown | Action::Quit => {
                    info!(event = "upgrade_interrupted", signal = %name, "a stopping signal during a live upgrade: calling it off");
                    // A second stopping signal means "now", as it does during shutdown.
                    let now = action == Action::Quit || stop.is_some();
                    stop = Some((name, now));
                    let then = if now { "exits at once" } else { "shuts down" };
                    abort.call_off(&format!("{name} came: the server {then}"));
                }
                Action::Upgrade => warn!(
                    event = "upgrade_refused",
                    signal = %name,
                    "live upgrade refused: one is in progress"
                ),
                Action::Status => log_status(name, None),
                Action::Reload => reload = Some(name),
                action => on_signal(name, action, None),
            }
        }
    };
    if handed {
        if let Some((name, _)) = stop {
            // It committed before the signal could call it off: the new process gets it.
            info!(event = "signal_passed_on", signal = %name, "passing the signal on to the new process");
            abort.pass_on(if stop.is_some_and(|(_, quit)| quit) {
                nix::sys::signal::Signal::SIGQUIT
            } else {
                nix::sys::signal::Signal::SIGTERM
            });
        }
        return (server, AfterUpgrade::HandedOver);
    }
    if let Some(name) = reload {
        on_signal(name, Action::Reload, Some(&server));
        reload_users(&server);
    }
    let then = match stop {
        None => AfterUpgrade::Serve,
        Some((name, false)) => AfterUpgrade::Shutdown(name),
        Some((name, true)) => AfterUpgrade::Quit(name),
    };
    (server, then)
}

/// The signals that neither stop the server nor ask for its status. A reload reopens the log
/// file and re-reads the TLS files (not during shutdown, `server` None): a certificate or key
/// that does not load is refused with one line, and the old ones stay in use.
fn on_signal(name: &'static str, action: Action, server: Option<&ServerHandle>) {
    match action {
        Action::Reload => {
            let log_file = logging::reopen();
            match server.and_then(ServerHandle::reload_tls) {
                Some(Err(e)) => {
                    warn!(event = "tls_reload_failed", signal = %name, error = %e, "TLS files not reloaded; keeping the ones in use");
                    info!(event = "reload", signal = %name, log_file, tls = false, "reloaded");
                }
                Some(Ok(())) => {
                    info!(event = "reload", signal = %name, log_file, tls = true, "reloaded")
                }
                None => info!(event = "reload", signal = %name, log_file, "reloaded"),
            }
        }
        Action::Ignore => info!(event = "signal", signal = %name, "ignored"),
        _ => {}
    }
}

/// SIGHUP: reads the users file again, if there is one. A file that does not load is refused
/// with a log line, and the users in force stay.
fn reload_users(server: &ServerHandle) {
    match server.reload_users() {
        None => {}
        Some(Ok(users)) => info!(event = "users_reloaded", users, "users file reloaded"),
        Some(Err(e)) => warn!(
            event = "users_reload_failed",
            error = %e,
            "users file refused; the users in force stay"
        ),
    }
}

/// `glockd hash-token`: reads a token on standard input (never from the command line, where
/// other users of the machine could read it) and prints the users file line with its digest.
/// Tokens shorter than this draw a warning from `glockd hash-token`.
const WEAK_TOKEN_BYTES: usize = 20;

fn hash_token() -> ExitCode {
    use std::io::Read;
    if std::env::args_os().count() > 2 {
        eprintln!("glockd: hash-token takes no arguments; it reads the token on standard input");
        return ExitCode::from(2);
    }
    let mut input = Vec::new();
    // A token is short: read a little more than any token, and refuse the rest.
    let limit = 64 * 1024;
    if let Err(e) = std::io::stdin().take(limit + 1).read_to_end(&mut input) {
        eprintln!("glockd: hash-token: cannot read standard input: {e}");
        return ExitCode::from(1);
    }
    if input.len() as u64 > limit {
        eprintln!("glockd: hash-token: a token is at most {limit} bytes");
        return ExitCode::from(2);
    }
    match glockd::users::token::hash_token_line(&input) {
        Ok(line) => {
            // Failed `auth`s are slowed per connection, but a client may open many
            // connections: only a token no one can guess keeps it out.
            let trimmed = input.trim_ascii_end().len();
            if trimmed < WEAK_TOKEN_BYTES {
                eprintln!(
                    "glockd: hash-token: warning: a token of {trimmed} bytes can be guessed; \
                     use at least {WEAK_TOKEN_BYTES} random bytes (e.g. `openssl rand -hex 24`)"
                );
            }
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("glockd: hash-token: {e}");
            ExitCode::from(2)
        }
    }
}

/// SIGUSR1: one line with the numbers an operator checks first.
fn log_status(name: &'static str, server: Option<&ServerHandle>) {
    let Some(server) = server else {
        info!(event = "status", signal = %name, "shutting down");
        return;
    };
    let stats = server.stats();
    info!(
        event = "status",
        signal = %name,
        connections = stats.connections,
        connections_total = stats.connections_total,
        locks = stats.locks,
        shared_locks = stats.shared_locks,
        orphans = stats.orphans,
        shared_orphans = stats.shared_orphans,
        lock_waiters = stats.lock_waiters,
        invalid_commands = stats.invalid_commands,
        log_dropped = logging::dropped_lines(),
        fds_open = descriptors::open_now().unwrap_or(0),
    );
}
