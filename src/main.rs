//! The `glockd` binary: flags, pidfile, start, wait for a signal, shut down.

use std::process::ExitCode;

use glockd::pidfile::Pidfile;
use glockd::Config;
use tokio::signal::unix::{signal, SignalKind};

fn main() -> ExitCode {
    let config = Config::from_args();
    let pidfile = match config.pidfile.as_deref().map(Pidfile::acquire).transpose() {
        Ok(pidfile) => pidfile,
        Err(e) => {
            eprintln!("glockd: {e}");
            return ExitCode::from(4);
        }
    };
    // Every connection is a file descriptor: raise the soft limit to the hard one, as Redis
    // does, and say so if that still cannot hold --max-connections.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < config.max_connections + 32 => eprintln!(
            "glockd: warning: open-file limit is {limit}, below --max-connections {}; \
             connections past it will be refused by the OS",
            config.max_connections
        ),
        Ok(_) => {}
        Err(e) => eprintln!("glockd: warning: could not raise the open-file limit: {e}"),
    }
    let shards = config.shard_count();
    let server = match glockd::start(config) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("glockd: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    match server.tcp_addr() {
        Some(addr) => eprintln!("glockd: listening on tcp {addr} with {shards} shards"),
        None => eprintln!("glockd: tcp disabled; running with {shards} shards"),
    }

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("glockd: cannot wait for signals: {e}");
            return ExitCode::from(1);
        }
    };
    let clean = runtime.block_on(async move {
        let (mut term, mut int) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => (term, int),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("glockd: cannot install signal handlers: {e}");
                return false;
            }
        };
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
    });
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
