//! The `glockd` binary: flags, pidfile, logging, start, wait for a signal, shut down.
//!
//! Errors that stop the server from starting go straight to stderr as one `glockd: …` line
//! (nothing else is being served, so waiting on stderr costs nothing); everything else goes
//! through the logger, which never makes the server wait.

use std::process::ExitCode;

use glockd::config::{COMMIT, VERSION};
use glockd::logging;
use glockd::pidfile::Pidfile;
use glockd::{Config, ServerHandle};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{info, warn};

fn main() -> ExitCode {
    #[allow(unused_mut)] // only debug builds change it
    let mut config = Config::from_args();
    // Debug builds only: the binary's tests make ceiling writes slow to show that grants wait
    // for them. A release build never reads this variable.
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("GLOCKD_TEST_SLOW_CEILING_WRITE_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
    {
        config.slow_ceiling_write = Some(std::time::Duration::from_millis(ms));
    }
    let pidfile = match config.pidfile.as_deref().map(Pidfile::acquire).transpose() {
        Ok(pidfile) => pidfile,
        Err(e) => return fail(4, &e),
    };
    if let Err(e) = logging::start(config.log_format, config.log_file_path()) {
        return fail(1, &e);
    }
    let fd_limit = raise_open_file_limit(&config);

    // Signal handlers go in before anything is served, so a SIGTERM that arrives the moment
    // the server is up still shuts it down cleanly.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(1, &format!("cannot start: {e}")),
    };
    let signals = runtime.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        ))
    });
    let (term, int) = match signals {
        Ok(signals) => signals,
        Err(e) => return fail(1, &format!("cannot install signal handlers: {e}")),
    };

    let settings = config.clone();
    let server = match glockd::start(config) {
        Ok(server) => server,
        Err(e) => return fail(1, &format!("cannot start: {e}")),
    };
    if settings.state_file_path().is_none() {
        warn!(
            event = "fencing",
            "without -state-file, fencing tokens only increase while the system clock does (a \
             restart with the clock set back hands out smaller ones)"
        );
    }
    announce(&server, &settings, fd_limit);

    let clean = runtime.block_on(serve_until_signalled(server, term, int));
    drop(pidfile);
    logging::finish(logging::FINISH_WITHIN);
    if clean {
        ExitCode::SUCCESS
    } else {
        // A second signal means "now": do not wait for the shards (dropping the runtime would
        // wait for the shutdown still running on its blocking pool).
        std::process::exit(130);
    }
}

/// The exit after a start-up error: the logger's lines first (bounded), then one line straight
/// to stderr.
fn fail(status: u8, error: &dyn std::fmt::Display) -> ExitCode {
    logging::finish(logging::FINISH_WITHIN);
    eprintln!("glockd: {error}");
    ExitCode::from(status)
}

/// Every connection is a file descriptor: raise the soft limit to the hard one, as Redis does,
/// and say so if that still cannot hold --max-connections. Returns the limit in force.
fn raise_open_file_limit(config: &Config) -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            if limit < config.max_connections + 32 {
                warn!(
                    event = "fd_limit",
                    fd_limit = limit,
                    max_connections = config.max_connections,
                    "the open-file limit is below -max-connections; connections past it will be \
                     refused by the OS"
                );
            }
            limit
        }
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
fn announce(server: &ServerHandle, config: &Config, fd_limit: u64) {
    let mut doors = Vec::new();
    if let Some(addr) = server.tcp_addr() {
        doors.push(format!("tcp {addr}"));
    }
    if let Some(addr) = server.ws_addr() {
        doors.push(format!("ws {addr}"));
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
            "every door is disabled (-port=0 -ws=0, no -unix)"
        );
    }
    info!(
        event = "start",
        version = %VERSION,
        commit = %COMMIT,
        shards = config.shard_count(),
        fd_limit,
        max_connections = config.max_connections,
        max_line_bytes = config.max_line_bytes,
        max_unsent_bytes = config.max_unsent_bytes,
        max_name_bytes = config.max_name_bytes,
        max_locks_per_conn = config.max_locks_per_conn,
        max_wait_ms = config.max_wait_ms,
        write_timeout = config.write_timeout,
        idle_timeout = config.idle_timeout,
        keepalive_idle = config.keepalive_idle,
        keepalive_interval = config.keepalive_interval,
        keepalive_count = config.keepalive_count,
        shutdown_timeout = config.shutdown_timeout,
        verbose = config.verbose,
        "listening on {}",
        doors.join(", ")
    );
}

/// Waits for SIGTERM or SIGINT, then shuts down gracefully; true unless a second signal cut
/// the shutdown short.
async fn serve_until_signalled(server: ServerHandle, mut term: Signal, mut int: Signal) -> bool {
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(event = "shutdown", signal = %name, "shutting down");
    let stopping = tokio::task::spawn_blocking(move || server.shutdown());
    let second = tokio::select! {
        _ = stopping => return true,
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    warn!(event = "quit", signal = %second, "second signal; exiting at once");
    false
}
