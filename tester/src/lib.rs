//! glockd-tester: checks a live glockd (this one, the original, or any other implementation)
//! from the outside, over its own connections, and reports one line per check.
//!
//! It is safe to point at a production server: every name it uses is fresh and random
//! (`glockd-tester:<hex>:…`), it takes a handful of locks and releases them, it never lists a
//! whole table except `dump` (read as one line with a size cap), every reply has a timeout, and
//! its last check proves it left nothing held.
//!
//! The modules:
//! - [`conn`]: the transport-neutral connection factory and the line client with timeouts.
//! - [`ws`]: the websocket door, where every reply is one message.
//! - [`tls`]: the TLS line door (`--tls`).
//! - [`commands`]: replies, listings, `q` and `me` on top of a connection.
//! - [`ctx`]: what each check gets: connections, fresh names, the mode, bounded polling.
//! - [`checks`]: the checks themselves, in the order they run.
//! - [`verdict`], [`report`]: how a check ends, and the report of a run.

use std::ffi::OsString;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

pub mod checks;
pub mod commands;
pub mod conn;
pub mod ctx;
pub mod report;
pub mod tls;
pub mod verdict;
pub mod ws;

use conn::{Connector, Settings, TcpConnector};
use ctx::Ctx;
use report::{CheckResult, Report, Status};
use verdict::Verdict;
use ws::WsConnector;

/// The command line.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "glockd-tester",
    version,
    about = "Checks a running glockd server from the outside: locks, orphaning, listings, registry, stats."
)]
pub struct Options {
    /// The server's TCP address, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:9999")]
    pub host: String,

    /// Check the server's unix socket at this path instead of TCP (`--host` is then unused).
    #[cfg(unix)]
    #[arg(long, value_name = "PATH", conflicts_with = "ws")]
    pub unix: Option<std::path::PathBuf>,

    /// Check the server's websocket door at this URL (`ws://HOST:PORT/`) instead of TCP
    /// (`--host` is then unused): one command per message, one message per reply.
    #[arg(long, value_name = "URL", value_parser = ws_url)]
    pub ws: Option<String>,

    /// Check the server's TLS door (`-tls-port`) at `--host`; needs `--ca`.
    #[arg(long, requires = "ca", conflicts_with = "ws")]
    pub tls: bool,

    /// `--tls`: CA certificates (PEM) the server's certificate must chain to.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,

    /// `--tls`: a client certificate (PEM) for a server with `-tls-client-ca` (`--key` too).
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<std::path::PathBuf>,

    /// `--tls`: the client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<std::path::PathBuf>,

    /// `--tls`: the name the server's certificate must carry (default: the host of `--host`).
    #[arg(long)]
    pub server_name: Option<String>,

    /// Longest wait for any one reply, in milliseconds; also bounds every poll.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,

    /// Check only what the original Go server did: no pipelining, no reply to unknown
    /// commands, one command per write, replies read by their leading integer only.
    #[arg(long)]
    pub compat: bool,

    /// Print a JSON report instead of one line per check.
    #[arg(long)]
    pub json: bool,

    /// Longest `dump` line read (the whole table is on it); a bigger one skips the dump checks.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_dump_bytes: usize,

    /// Run only the checks whose name contains this text (`connect` and the final cleanup
    /// check always run).
    #[arg(long)]
    pub only: Option<String>,

    /// Authenticate every connection with `auth USER TOKEN` first, for a server started with
    /// `-users` (the user needs every class on the `glockd-tester:` names).
    #[arg(long, value_name = "USER:TOKEN")]
    pub auth: Option<conn::Credentials>,

    /// The server requires `auth`: also check that a connection that has not authenticated is
    /// refused (`0 Auth Required`).
    #[arg(long)]
    pub expect_auth: bool,
}

impl Options {
    /// Parses a command line in GNU style (`--host x`) or the Go style of the original tester
    /// (`-host x`, `-host=x`).
    pub fn try_from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        Options::try_parse_from(go_style_args(args))
    }

    /// The connection settings these options ask for.
    pub fn settings(&self) -> Settings {
        Settings {
            timeout: Duration::from_millis(self.timeout_ms),
            compat: self.compat,
            max_dump_bytes: self.max_dump_bytes,
            auth: self.auth.clone(),
            expect_auth: self.expect_auth,
        }
    }

    /// The connection factory for the chosen door; an error (a TLS file that does not load)
    /// is one line.
    pub fn connector(&self) -> Result<Arc<dyn Connector>, String> {
        if let Some(url) = &self.ws {
            return Ok(Arc::new(WsConnector {
                url: url.clone(),
                max_message: conn::max_message_bytes(&self.settings()),
            }));
        }
        if let (true, Some(ca)) = (self.tls, &self.ca) {
            let name = self
                .server_name
                .as_deref()
                .unwrap_or_else(|| tls::host_name(&self.host));
            let client = self.cert.clone().zip(self.key.clone());
            return Ok(Arc::new(tls::TlsConnector::new(
                self.host.clone(),
                ca,
                client,
                name,
            )?));
        }
        #[cfg(unix)]
        if let Some(path) = &self.unix {
            return Ok(Arc::new(conn::UnixConnector { path: path.clone() }));
        }
        Ok(Arc::new(TcpConnector {
            host: self.host.clone(),
        }))
    }
}

/// Accepts a `ws://` URL. `wss://` is refused here, with the reason, rather than failing every
/// check later: the tester speaks TLS to the line door only (`--tls`).
fn ws_url(url: &str) -> Result<String, String> {
    let scheme = url
        .split_once("://")
        .map(|(scheme, _)| scheme.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("ws") => Ok(url.to_owned()),
        Some("wss") => {
            Err("wss:// is not supported by the tester: check the TLS line door with --tls".into())
        }
        _ => Err("expected a URL like ws://127.0.0.1:9998/".into()),
    }
}

/// Rewrites Go-style single-dash long flags (`-host`) to clap's `--host`; the tester has no
/// short flags, so nothing else can start with a single dash.
pub fn go_style_args<I, T>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    args.into_iter()
        .map(Into::into)
        .map(|arg| match arg.to_str() {
            Some(s) if s.len() > 2 && s.starts_with('-') && !s.starts_with("--") => {
                OsString::from(format!("-{s}"))
            }
            _ => arg,
        })
        .collect()
}

/// Runs every check against the server the options name; an error (a TLS file that does not
/// load) before any check runs.
pub async fn run(options: &Options, on_result: impl FnMut(&CheckResult)) -> Result<Report, String> {
    Ok(run_with(options.connector()?, options, on_result).await)
}

/// Runs every check through `connector`, calling `on_result` as each one ends.
pub async fn run_with(
    connector: Arc<dyn Connector>,
    options: &Options,
    mut on_result: impl FnMut(&CheckResult),
) -> Report {
    let ctx = Ctx::new(connector, options.settings());
    let mut report = Report::new(ctx.target(), options.compat, ctx.prefix().to_owned());
    // A check makes a bounded number of requests, each bounded by the timeout; this is a
    // backstop against a check that would somehow wait on something else.
    let budget = Duration::from_millis(options.timeout_ms.saturating_mul(20));
    let mut unreachable = None;
    for check in checks::all() {
        let wanted = match &options.only {
            Some(only) => {
                check.name.contains(only.as_str())
                    || check.name == checks::CONNECT
                    || check.name == checks::CLEANUP
            }
            None => true,
        };
        // Only a server said to require auth is checked for it.
        if !wanted || (check.name == checks::AUTH_REQUIRED && !options.expect_auth) {
            continue;
        }
        let outcome = match &unreachable {
            Some(why) => Err(Verdict::skip(format!("`connect` failed ({why})"))),
            None => match tokio::time::timeout(budget, (check.run)(&ctx)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(Verdict::fail(format!(
                    "did not finish within {} ms",
                    budget.as_millis()
                ))),
            },
        };
        let result = match outcome {
            Ok(()) => CheckResult {
                name: check.name,
                status: Status::Pass,
                detail: String::new(),
            },
            Err(Verdict::Fail(detail)) => {
                if check.name == checks::CONNECT {
                    unreachable = Some(detail.clone());
                }
                CheckResult {
                    name: check.name,
                    status: Status::Fail,
                    detail,
                }
            }
            Err(Verdict::Skip(detail)) => CheckResult {
                name: check.name,
                status: Status::Skip,
                detail,
            },
        };
        on_result(&result);
        report.push(result);
    }
    report
}
