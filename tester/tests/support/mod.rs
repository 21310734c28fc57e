//! What the tester's tests share: the breakable fake server, the real server in-process, and
//! running the checks with a bounded total time.
#![allow(dead_code)]

pub mod fake;

use std::net::SocketAddr;
use std::time::Duration;

use glockd_tester::report::{Report, Status};
use glockd_tester::Options;

/// Reply timeout against the fake: it answers at once, so a missing reply is known quickly.
pub const FAKE_TIMEOUT_MS: &str = "300";

/// Reply timeout for runs against the fake that must pass: nothing should time out there, so
/// a generous bound only matters on a slow, busy machine.
pub const CALM_TIMEOUT_MS: &str = "2000";

/// Reply timeout against the real server (generous: CI machines are slow and busy).
pub const REAL_TIMEOUT_MS: &str = "5000";

/// The longest a whole run may take in a test: a hang is a failure, not a wait.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// The real server on an ephemeral loopback port, stopped when dropped.
pub struct RealServer {
    /// The running server; dropping it shuts the server down.
    handle: glockd::ServerHandle,
}

impl RealServer {
    pub fn start(shards: u16, tweak: impl FnOnce(&mut glockd::Config)) -> Self {
        let mut config = glockd::Config {
            shards: Some(shards),
            pin: false,
            ..glockd::Config::default()
        };
        tweak(&mut config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let handle = glockd::start_with(config, Some(listener)).expect("server starts");
        RealServer { handle }
    }

    /// The real server with its TCP door and its websocket door, each on an ephemeral
    /// loopback port.
    pub fn start_ws(shards: u16, tweak: impl FnOnce(&mut glockd::Config)) -> Self {
        let mut config = glockd::Config {
            shards: Some(shards),
            pin: false,
            ..glockd::Config::default()
        };
        tweak(&mut config);
        let bind = || std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let listeners = glockd::Listeners {
            tcp: Some(bind()),
            ws: Some(bind()),
            ..glockd::Listeners::default()
        };
        let handle = glockd::start_with_listeners(config, listeners).expect("server starts");
        RealServer { handle }
    }

    pub fn addr(&self) -> SocketAddr {
        self.handle.tcp_addr().expect("tcp enabled")
    }

    /// The websocket door's URL (servers from [`RealServer::start_ws`]).
    pub fn ws_url(&self) -> String {
        format!("ws://{}/", self.handle.ws_addr().expect("ws enabled"))
    }
}

/// Runs every check against `addr` with the given timeout and extra flags.
pub async fn run(addr: SocketAddr, timeout_ms: &str, extra: &[&str]) -> Report {
    let host = addr.to_string();
    let mut args = vec!["--host", &host, "--timeout-ms", timeout_ms];
    args.extend_from_slice(extra);
    run_args(&args).await
}

/// Runs every check against the websocket door at `url` with the given timeout and extra flags.
pub async fn run_ws(url: &str, timeout_ms: &str, extra: &[&str]) -> Report {
    let mut args = vec!["--ws", url, "--timeout-ms", timeout_ms];
    args.extend_from_slice(extra);
    run_args(&args).await
}

/// Runs every check with these flags, in bounded time.
pub async fn run_args(args: &[&str]) -> Report {
    let options =
        Options::try_from_args(std::iter::once(&"glockd-tester").chain(args)).expect("valid flags");
    tokio::time::timeout(RUN_LIMIT, glockd_tester::run(&options, |_| {}))
        .await
        .expect("the run ends in bounded time")
        .expect("the options' files load")
}

/// The whole report, for assertion messages.
pub fn shown(report: &Report) -> String {
    let mut text = format!("target {}\n", report.target);
    text.extend(report.checks.iter().map(|c| format!("{c}\n")));
    text.push_str(&report.summary());
    text
}

/// Asserts the named check ended with `status`.
pub fn assert_status(report: &Report, name: &str, status: Status) {
    assert_eq!(
        report.status(name),
        Some(status),
        "{name} should be {status:?}:\n{}",
        shown(report)
    );
}

/// Asserts that nothing failed.
pub fn assert_no_failures(report: &Report) {
    assert_eq!(report.failed, 0, "expected no failures:\n{}", shown(report));
}
