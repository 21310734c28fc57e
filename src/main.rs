//! The `glockd` binary: flags, pidfile, start, wait for a signal, shut down.

use std::process::ExitCode;

use glockd::pidfile::Pidfile;
use glockd::{Config, ServerHandle};
use tokio::signal::unix::{signal, Signal, SignalKind};

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
        Err(e) => {
            eprintln!("glockd: {e}");
            return ExitCode::from(4);
        }
    };
    raise_open_file_limit(&config);

    // Signal handlers go in before anything is served, so a SIGTERM that arrives the moment
    // the server is up still shuts it down cleanly.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("glockd: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    let signals = runtime.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        ))
    });
    let (term, int) = match signals {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("glockd: cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };

    let shards = config.shard_count();
    let durable_tokens = config.state_file_path().is_some();
    let server = match glockd::start(config) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("glockd: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    if !durable_tokens {
        eprintln!(
            "glockd: note: without -state-file, fencing tokens only increase while the system \
             clock does (a restart with the clock set back hands out smaller ones)"
        );
    }
    announce(&server, shards);

    let clean = runtime.block_on(serve_until_signalled(server, term, int));
    drop(pidfile);
    if clean {
        ExitCode::SUCCESS
    } else {
        // A second signal means "now": do not wait for the shards (dropping the runtime would
        // wait for the shutdown still running on its blocking pool).
        eprintln!("glockd: second signal; exiting at once");
        std::process::exit(130);
    }
}

/// Every connection is a file descriptor: raise the soft limit to the hard one, as Redis does,
/// and say so if that still cannot hold --max-connections.
fn raise_open_file_limit(config: &Config) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < config.max_connections + 32 => eprintln!(
            "glockd: warning: open-file limit is {limit}, below --max-connections {}; \
             connections past it will be refused by the OS",
            config.max_connections
        ),
        Ok(_) => {}
        Err(e) => eprintln!("glockd: warning: could not raise the open-file limit: {e}"),
    }
}

/// One line on stderr saying where the server listens (tests and scripts wait for it).
fn announce(server: &ServerHandle, shards: usize) {
    let mut doors = Vec::new();
    if let Some(addr) = server.tcp_addr() {
        doors.push(format!("tcp {addr}"));
    }
    if let Some(addr) = server.ws_addr() {
        doors.push(format!("ws {addr}"));
    }
    if let Some(path) = server.unix_path() {
        doors.push(format!("unix {}", path.display()));
    }
    if let Some(addr) = server.metrics_addr() {
        doors.push(format!("metrics http://{addr}/metrics"));
    }
    if doors.is_empty() {
        eprintln!("glockd: warning: every door is disabled (-port=0 -ws=0, no -unix)");
    }
    eprintln!(
        "glockd: listening on {} with {shards} shards",
        doors.join(", ")
    );
}

/// Waits for SIGTERM or SIGINT, then shuts down gracefully; true unless a second signal cut
/// the shutdown short.
async fn serve_until_signalled(server: ServerHandle, mut term: Signal, mut int: Signal) -> bool {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    eprintln!("glockd: shutting down");
    let stopping = tokio::task::spawn_blocking(move || server.shutdown());
    tokio::select! {
        _ = stopping => true,
        _ = term.recv() => false,
        _ = int.recv() => false,
    }
}
