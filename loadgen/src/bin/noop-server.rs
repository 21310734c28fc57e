//! `noop-server`: the no-op line server (see the `noop` module). Runs until killed.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Answers every line with `1 Got Lock` at once: the I/O ceiling a lock server is compared with.
#[derive(Parser, Debug)]
#[command(name = "noop-server", version)]
struct Args {
    /// TCP port (0: pick a free one and print it).
    #[arg(long, default_value_t = 9997)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Server threads, each with its own single-threaded runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Also listen on this unix socket.
    #[arg(long)]
    unix: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let tcp = match TcpListener::bind(SocketAddr::new(args.bind, args.port)) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!(
                "noop-server: cannot listen on {}:{}: {e}",
                args.bind, args.port
            );
            return ExitCode::FAILURE;
        }
    };
    let unix = match &args.unix {
        Some(path) => match UnixListener::bind(path) {
            Ok(listener) => Some(listener),
            Err(e) => {
                eprintln!("noop-server: cannot listen on {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let server = match glockd_loadgen::noop::start(Some(tcp), unix, args.threads) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("noop-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(addr) = server.tcp_addr() {
        eprintln!(
            "noop-server: listening on tcp {addr} with {} threads",
            args.threads
        );
    }
    loop {
        std::thread::park();
    }
}
