//! The command line, compatible with the original's Go `flag` syntax.
//!
//! Go accepts `-port 9999`, `--port 9999`, `-port=9999` and, for booleans, `-dump`,
//! `-dump=false`. clap speaks GNU style, so [`go_style_args`] first rewrites a single-dash long
//! flag (`-port`) to its double-dash form; boolean flags take an optional `=value` exactly as Go
//! does. Command lines written for the original keep working.

use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;

use clap::{CommandFactory, Parser, ValueEnum};

/// The release, from Cargo.toml.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit the binary was built from (`unknown` outside a git checkout; see `build.rs`).
pub const COMMIT: &str = env!("GLOCKD_COMMIT");

/// What `--version` prints after the program's name.
const VERSION_LINE: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("GLOCKD_COMMIT"),
    ")"
);

// The range of every numeric flag. A value outside is refused at start with one line naming
// the flag: a value that cannot work (a timeout so long the clock overflows, a keepalive the
// kernel refuses) must stop the server at start, not fail every connection later.

/// The longest a timeout flag may be, in seconds: a year. Longer is of no use to anyone, and
/// keeps every deadline made from a flag far from overflowing the clock.
pub const MAX_TIMEOUT_SECS: u64 = 365 * 24 * 60 * 60;
/// `--max-wait-ms`: at most a year, like the timeouts.
pub const MAX_WAIT_MS: u64 = MAX_TIMEOUT_SECS * 1000;
/// `--max-line-bytes`: room for a command word and a short name at least; at most 1 GiB, so
/// one client cannot make the server buffer more than that for a single line.
pub const MIN_LINE_BYTES: u64 = 64;
pub const MAX_LINE_BYTES: u64 = 1 << 30;
/// `--max-unsent-bytes`: a page of replies at least; at most 1 TiB, far past any memory the
/// server could have (so it means "no limit") and still a `usize` wherever it is used.
pub const MIN_UNSENT_BYTES: u64 = 4096;
pub const MAX_UNSENT_BYTES: u64 = 1 << 40;
/// `--max-client-buffers`: 0 (no budget), or at least 1 MiB (less would close clients for
/// their ordinary read room); at most 1 TiB, like `--max-unsent-bytes`.
pub const MIN_CLIENT_BUFFERS: u64 = 1 << 20;
pub const MAX_CLIENT_BUFFERS: u64 = 1 << 40;
/// `--max-client-buffers` by default: 512 MiB. Ten thousand quiet connections hold about 20 MB
/// of buffers and a big listing tens of megabytes, so real use stays far below it, while a
/// crowd of clients each filling its per-connection limits (1 MiB of unfinished line, 8 MiB of
/// unread replies: some 90 GiB at ten thousand connections) is stopped at a size any host
/// running a lock server can spare. A fixed size, not a share of the machine's memory, so the
/// same flags behave the same on every host.
pub const DEFAULT_CLIENT_BUFFERS: u64 = 512 << 20;
/// `--max-connections`: at most 2^30, a thousand times Linux's default ceiling on one
/// process's open files (`fs.nr_open`, 2^20); any real machine runs out of descriptors first.
pub const MAX_CONNECTIONS: u64 = 1 << 30;
/// `--keepalive-idle` and `--keepalive-interval`: the largest values Linux accepts
/// (`TCP_KEEPIDLE`, `TCP_KEEPINTVL`); past them every connection's setsockopt fails.
pub const MAX_KEEPALIVE_SECS: u64 = 32_767;
/// `--keepalive-count`: the largest Linux accepts (`TCP_KEEPCNT`).
pub const MAX_KEEPALIVE_COUNT: u32 = 127;
/// The most `--keepalive-idle` + `--keepalive-interval` x `--keepalive-count` may add up to:
/// the server gives up on unacknowledged data after that long (`TCP_USER_TIMEOUT`), which
/// Linux takes in milliseconds as a C `int`, so 2^31 - 1 ms (about 24.8 days) at most.
pub const MAX_KEEPALIVE_GIVE_UP_SECS: u64 = i32::MAX as u64 / 1000;
/// `--line-timeout`: at most a day; a line still unfinished after that is not coming.
pub const MAX_LINE_TIMEOUT_SECS: u64 = 24 * 60 * 60;
/// `--ws-handshake-timeout`: at least a second, at most five minutes (a handshake is one
/// request and one response).
pub const MAX_HANDSHAKE_SECS: u64 = 300;
/// `--metrics-max-connections`: scrapers are a handful of Prometheus servers; a few thousand
/// is already far past any real need.
pub const MAX_METRICS_CONNECTIONS: u64 = 4096;
/// `--auth-fail-delay-ms`: at most ten seconds; a failed `auth` holds only its own connection.
pub const MAX_AUTH_FAIL_DELAY_MS: u64 = 10_000;
/// `--auth-max-failures`: at most a thousand failed `auth`s in a row on one connection.
pub const MAX_AUTH_FAILURES: u32 = 1000;
/// `--shards`: one thread each; more than this is a mistake, not a configuration.
pub const MAX_SHARDS: u16 = 1024;
/// `--max-memory`: at least 1 MiB (the budget is checked against counts published in 16 KiB
/// steps per shard, so a smaller one would mean little); at most 1 PiB, past any machine.
pub const MIN_MEMORY: u64 = 1 << 20;
pub const MAX_MEMORY: u64 = 1 << 50;
/// `--max-lock-name-bytes`: at least one byte, at most the longest line there can be.
pub const MAX_LOCK_NAME_BYTES: u64 = MAX_LINE_BYTES;

/// The server's settings. Every limit is here, named and documented.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "glockd",
    // A flag given twice takes its last value: a live upgrade adds flags to the running
    // server's command line (`glockd upgrade -pidfile F -shards 4`).
    args_override_self = true,
    version = VERSION_LINE,
    about = "A lock server: exclusive and counted shared locks that live exactly as long as the connection holding them.",
    after_help = "`glockd hash-token` reads a token on standard input and prints the line for a -users file."
)]
pub struct Config {
    /// TCP port to listen on; 0 disables TCP.
    #[arg(long, default_value_t = 9999)]
    pub port: u16,

    /// Address to listen on (TCP and websocket).
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: IpAddr,

    /// Websocket port (`ws://HOST:PORT/`, one command per message); 0 disables websockets.
    #[arg(long, default_value_t = 9998)]
    pub ws: u16,

    /// Origins allowed to open websocket connections, comma-separated (e.g.
    /// `https://ops.example.com`). Empty (the default, as in the original) allows every origin;
    /// set it so that a page on another site cannot take locks through a user's browser.
    #[arg(long, value_delimiter = ',', default_value = "")]
    pub ws_origins: Vec<String>,

    /// Where to serve Prometheus metrics (`http://ADDR/metrics`); `off` or `0` disables the
    /// endpoint (and the latency timing behind it).
    #[arg(long, default_value = "127.0.0.1:9997", value_parser = metrics_addr)]
    pub metrics: MetricsAddr,

    /// Most `/metrics` connections served at once; the next is answered 503 and closed at
    /// once (counted in `glockd_metrics_connections_refused_total`), so idle sockets opened at
    /// the endpoint cannot pile up. Prometheus opens one per scrape target.
    #[arg(long, default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=MAX_METRICS_CONNECTIONS))]
    pub metrics_max_connections: u64,

    /// Unix socket path to listen on; empty (the default) disables it. A stale socket file
    /// is replaced; any other file at that path is an error.
    #[arg(long, value_parser = clap::value_parser!(std::ffi::OsString))]
    pub unix: Option<OsString>,

    /// Permissions of the unix socket file, in octal. The default lets every local user
    /// connect, as the original did; `0660` limits it to the owner and group.
    #[arg(long, default_value = "0666", value_parser = octal_mode)]
    pub unix_mode: u32,

    /// Write the process id here and hold an exclusive lock (flock) on the file, so two servers
    /// cannot share it. Removed on clean exit. Optional.
    #[arg(long)]
    pub pidfile: Option<PathBuf>,

    /// Allow the registry commands `iam` and `who` (`-registry=false` answers `0 disabled`).
    #[arg(long, value_parser = go_bool, num_args = 0..=1, require_equals = true,
          default_value = "true", default_missing_value = "true")]
    pub registry: bool,

    /// Allow the listing commands `d`, `sd`, `dump` and `who` (`-dump=false` answers
    /// `0 disabled`).
    #[arg(long, value_parser = go_bool, num_args = 0..=1, require_equals = true,
          default_value = "true", default_missing_value = "true")]
    pub dump: bool,

    /// Log connects, disconnects (with the reason), name changes and orphaned locks.
    #[arg(long, value_parser = go_bool, num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true")]
    pub verbose: bool,

    /// Log line format: `text` (timestamp, level, message, key=value fields) or `json` (one
    /// object per line).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Append log lines to this file instead of stderr; SIGHUP reopens it (after a rotation).
    /// Fatal start-up errors still go to stderr.
    #[arg(long, value_parser = clap::value_parser!(std::ffi::OsString))]
    pub log_file: Option<OsString>,

    /// Number of shard threads (each owns a slice of the lock table). Default: one per two
    /// cores, at least one (see `default_shards`).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_SHARDS)))]
    pub shards: Option<u16>,

    /// First of the shard ports: port BASE + k serves the line protocol on shard k's own
    /// thread, for shard-aware clients (see `shards`); 0 (the default) turns them off.
    #[arg(long, default_value_t = 0)]
    pub shard_port: u16,

    /// Microseconds a shard thread keeps polling its sockets and mailbox after work before it
    /// parks; 0 parks at once. Polling saves the wake-ups of cross-shard traffic at the cost
    /// of CPU time while the server is lightly loaded.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub poll_us: u64,

    /// Pin each shard thread to its own core (`-pin=false` lets the OS schedule them).
    #[arg(long, value_parser = go_bool, num_args = 0..=1, require_equals = true,
          default_value = "true", default_missing_value = "true")]
    pub pin: bool,

    /// Longest accepted request line in bytes, newline included. A longer line gets
    /// `0 Line Too Long` and the connection is closed (its locks are orphaned as usual).
    #[arg(long, default_value_t = 1 << 20,
          value_parser = clap::value_parser!(u64).range(MIN_LINE_BYTES..=MAX_LINE_BYTES))]
    pub max_line_bytes: u64,

    /// Most connections served at once. The next one gets `0 Too Many Connections` and is
    /// closed; the rest are served as usual.
    #[arg(long, default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_CONNECTIONS))]
    pub max_connections: u64,

    /// Most connections served at once from one client address, across the TCP and websocket
    /// doors; 0 means no limit. The next one gets
    /// `0 Too Many Connections` (HTTP 503 on the websocket door) and is closed, so one address
    /// cannot take every place under `--max-connections`.
    #[arg(long, default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(0..=MAX_CONNECTIONS))]
    pub max_connections_per_ip: u64,

    /// Leave loopback clients (127.0.0.0/8, ::1) out of `--max-connections-per-ip`: a proxy,
    /// sidecar or test on the same machine is many clients behind one address.
    #[arg(long, value_parser = go_bool, num_args = 0..=1, require_equals = true,
          default_value = "true", default_missing_value = "true")]
    pub per_ip_exempt_loopback: bool,

    /// Longest name a connection may register with `iam`, in bytes; a longer one answers
    /// `0 Name Too Long`. Every listing row shows its holder's name, so this bounds what one
    /// client can make a listing cost.
    #[arg(long, default_value_t = 4096)]
    pub max_name_bytes: u64,

    /// Longest lock name accepted, in bytes; a command with a longer one answers
    /// `0 Name Too Long` and changes nothing. The default leaves room for the long names real
    /// clients use (the original's users have 10 000-byte names and more) while a single lock
    /// cannot take a megabyte.
    #[arg(long, default_value_t = 256 << 10,
          value_parser = clap::value_parser!(u64).range(1..=MAX_LOCK_NAME_BYTES))]
    pub max_lock_name_bytes: u64,

    /// Most locks (exclusive plus shared) one connection may hold; 0 means no limit. Beyond it
    /// `g` and `sg` answer `0 Lock Limit Reached`. The default, a million, is past what any real
    /// client holds on one connection, yet keeps one client from filling the memory budget with
    /// small locks on its own. Any count is accepted: it is only compared with what a
    /// connection holds, and one past what memory can hold is simply no limit.
    #[arg(long, default_value_t = 1_000_000)]
    pub max_locks_per_conn: u64,

    /// The memory budget for lock state (locks, names, shared holders, waiters, rate limiters,
    /// registered names): bytes, or a number with KiB, MiB, GiB or TiB; 0 means no budget.
    /// Near it, commands that would store something new answer `0 Out Of Memory` and `rl`
    /// evicts the limiters soonest back to full capacity. Default: half of the lower of the
    /// machine's memory and the cgroup's limit.
    #[arg(long, value_parser = memory_size)]
    pub max_memory: Option<u64>,

    /// Most reply bytes a connection may leave unread. A client that keeps sending while its
    /// unread replies pass this is disconnected (and its locks orphaned); one that has stopped
    /// sending (waiting on a big listing, say) is simply not read from until it catches up.
    #[arg(long, default_value_t = 8 << 20,
          value_parser = clap::value_parser!(u64).range(MIN_UNSENT_BYTES..=MAX_UNSENT_BYTES))]
    pub max_unsent_bytes: u64,

    /// Most bytes all connections' buffers may hold together (input not yet run, replies not
    /// yet written), as bytes or with a unit: `256MiB`, `1GiB`, `65536`, `512KiB`; 0: no
    /// budget. Past it, the connections holding the most are closed, biggest first (their
    /// locks orphaned), until the total is back under it.
    #[arg(long, default_value = "512MiB", value_parser = client_buffers_size)]
    pub max_client_buffers: u64,

    /// Seconds a reply write may make no progress before the connection is closed as dead;
    /// 0 waits forever.
    #[arg(long, default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=MAX_TIMEOUT_SECS))]
    pub write_timeout: u64,

    /// Seconds a connection may send nothing before it is closed; 0 (the default) never closes
    /// an idle connection, since holding a lock quietly is the normal case.
    #[arg(long, default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=MAX_TIMEOUT_SECS))]
    pub idle_timeout: u64,

    /// Seconds an unfinished line (bytes without a newline; over a websocket, a message not
    /// yet complete) may wait for the rest before the connection is closed (its locks
    /// orphaned); 0 turns this off. A client that dribbles a line, or sends a huge one and
    /// stops, holds its buffer no longer than this.
    #[arg(long, default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(0..=MAX_LINE_TIMEOUT_SECS))]
    pub line_timeout: u64,

    /// Seconds a websocket client may take to finish its opening handshake; until then it holds
    /// a connection place without being a client.
    #[arg(long, default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=MAX_HANDSHAKE_SECS))]
    pub ws_handshake_timeout: u64,

    /// TLS port: the line protocol over TLS (1.2 or 1.3); 0 (the default) turns it off. Needs
    /// `-tls-cert` and `-tls-key`. Plain `-port` keeps working beside it (`-port 0` turns
    /// plain TCP off).
    #[arg(long, default_value_t = 0)]
    pub tls_port: u16,

    /// Secure websocket port (`wss://HOST:PORT/`), with the same certificate; 0 (the default)
    /// turns it off.
    #[arg(long, default_value_t = 0)]
    pub tls_ws: u16,

    /// The server's certificate chain (PEM, leaf first), for the TLS doors; re-read on SIGHUP.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,

    /// The private key of `-tls-cert` (PEM: PKCS#8, PKCS#1 or SEC1); re-read on SIGHUP.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,

    /// CA certificates (PEM) that client certificates must chain to: with it, every TLS client
    /// must present a valid certificate, and its subject becomes the connection's name.
    /// Re-read on SIGHUP.
    #[arg(long)]
    pub tls_client_ca: Option<PathBuf>,

    /// Seconds a TLS client may take to finish its handshake before it is closed; until then it
    /// holds a connection place and a handshake place without being a client.
    #[arg(long, default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=MAX_HANDSHAKE_SECS))]
    pub tls_handshake_timeout: u64,

    /// Most TLS handshakes in progress at once, across the server and both TLS doors; past it
    /// a new TLS connection is closed at once (counted as `busy`), so a flood of slow
    /// handshakes costs bounded memory and CPU.
    #[arg(long, default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=MAX_CONNECTIONS))]
    pub max_tls_handshakes: u64,

    /// TCP keepalive: seconds of silence before the first probe; 0 turns keepalive off. With
    /// the interval and count below, a holder whose machine vanished is found and its locks
    /// released after idle + interval x count seconds.
    #[arg(long, default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(0..=MAX_KEEPALIVE_SECS))]
    pub keepalive_idle: u64,

    /// TCP keepalive: seconds between probes.
    #[arg(long, default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=MAX_KEEPALIVE_SECS))]
    pub keepalive_interval: u64,

    /// TCP keepalive: unanswered probes before the connection is dropped.
    #[arg(long, default_value_t = 6,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_KEEPALIVE_COUNT)))]
    pub keepalive_count: u32,

    /// Longest wait `gw` and `sgw` accept, in milliseconds (0: only waits of 0 ms, a plain
    /// try).
    #[arg(long, default_value_t = 3_600_000,
          value_parser = clap::value_parser!(u64).range(0..=MAX_WAIT_MS))]
    pub max_wait_ms: u64,

    /// Seconds shutdown waits for connections to receive the replies to what they already sent
    /// before closing them anyway.
    #[arg(long, default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(0..=MAX_TIMEOUT_SECS))]
    pub shutdown_timeout: u64,

    /// Keep the fencing token ceiling in this file, so tokens stay above every earlier grant
    /// across restarts and clock steps (see the README's fencing tokens). Without it tokens only
    /// increase while the system clock does. Give each server a file of its own.
    #[arg(long, value_parser = clap::value_parser!(std::ffi::OsString))]
    pub state_file: Option<OsString>,

    /// How far ahead of the clock the saved fencing token ceiling is kept, in milliseconds. It
    /// is renewed when half is used; a restart skips at most this much of the token range.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub token_reserve_ms: u64,

    /// Users, their tokens and permissions (a TOML file; see the README's Users section). With
    /// it every connection must `auth USER TOKEN` (or be mapped to a user by its client
    /// certificate or unix uid) before anything else, and may use only its user's command
    /// classes and lock names. SIGHUP reads it again (a bad file is refused, the old one kept).
    /// Without it (the default) the server is open to every client, as the original was.
    #[arg(long, value_parser = clap::value_parser!(std::ffi::OsString))]
    pub users: Option<OsString>,

    /// Milliseconds a failed `auth` waits before its reply (only that connection waits), to
    /// slow down guessing.
    #[arg(long, default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(0..=MAX_AUTH_FAIL_DELAY_MS))]
    pub auth_fail_delay_ms: u64,

    /// Failed `auth`s in a row after which the connection gets `0 Too Many Auth Failures` and
    /// is closed.
    #[arg(long, default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_AUTH_FAILURES)))]
    pub auth_max_failures: u32,

    /// Most time a live upgrade may take, in seconds, from starting the new binary to its
    /// confirming it serves everything; past it the upgrade is called off and this server
    /// carries on (connections stopped meanwhile run again).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub upgrade_timeout: u64,

    /// Longest a live upgrade may keep clients waiting, in milliseconds: from stopping the
    /// connections to the new process taking them over; past it the upgrade is called off and
    /// this server serves on.
    #[arg(long, default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub upgrade_max_pause_ms: u64,

    /// For tests of live upgrades only: the new process fails at this step of the hand-over
    /// (ready, listeners, image, adopt, refuse, hang).
    #[arg(long, hide = true)]
    pub upgrade_fail_at: Option<String>,

    /// A live upgrade's successor starts with its accept loops paused (not a flag).
    #[arg(skip)]
    pub start_paused: bool,

    /// Fault injection for tests only (not a flag): a connection that sends exactly this line
    /// panics while handling it.
    #[arg(skip)]
    pub panic_on_line: Option<Vec<u8>>,

    /// Fault injection for tests only (not a flag): every fencing ceiling write waits this long
    /// before its new file takes the old one's place, so tests can watch grants wait at the
    /// ceiling instead of passing it.
    #[arg(skip)]
    pub slow_ceiling_write: Option<std::time::Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Config::parse_from(["glockd"])
    }
}

impl Config {
    /// Parses the process's command line (Go or GNU style). On a bad flag or value it exits
    /// with clap's status (2) and one line on stderr naming the flag, so that a service
    /// manager's log shows the reason in one entry.
    pub fn from_args() -> Self {
        Config::from_args_or(|_| {})
    }

    /// [`Self::from_args`], telling `refused` the one-line reason before exiting on a bad
    /// command line (a live upgrade's successor passes it on to the running server).
    pub fn from_args_or(refused: impl FnOnce(&str)) -> Self {
        match Config::try_from_args(std::env::args_os()) {
            Ok(config) => config,
            Err(e) => {
                if !matches!(
                    e.kind(),
                    clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
                ) {
                    refused(&one_line(&e));
                }
                exit_on(e)
            }
        }
    }

    /// Parses an explicit command line (first item is the program name).
    pub fn try_from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        let config = Config::try_parse_from(go_style_args(args))?;
        config.check_together()?;
        // A users file that does not load stops the server here, as a bad flag value does
        // (the server reads it again when it starts).
        if let Some(path) = config.users_path() {
            crate::users::Users::load(path)
                .map_err(|e| Config::command().error(clap::error::ErrorKind::ValueValidation, e))?;
        }
        Ok(config)
    }

    /// What no one flag's range can check: a TLS door's certificate and key, the shard ports'
    /// last port, and the keepalive flags' sum, when keepalive is on.
    fn check_together(&self) -> Result<(), clap::Error> {
        if self.tls_enabled() && (self.tls_cert.is_none() || self.tls_key.is_none()) {
            return Err(Config::command().error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--tls-port and --tls-ws need --tls-cert and --tls-key",
            ));
        }
        // A client CA without a TLS door would let an operator believe certificates are
        // required while every client gets in over plain TCP.
        let tls_files: Vec<&str> = [
            ("--tls-cert", self.tls_cert.is_some()),
            ("--tls-key", self.tls_key.is_some()),
            ("--tls-client-ca", self.tls_client_ca.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect();
        if !self.tls_enabled() && !tls_files.is_empty() {
            return Err(Config::command().error(
                clap::error::ErrorKind::ArgumentConflict,
                format!(
                    "{} given without a TLS door: add --tls-port or --tls-ws, or drop them",
                    tls_files.join(", ")
                ),
            ));
        }
        let last_shard_port = usize::from(self.shard_port) + self.shard_count() - 1;
        if self.shard_port != 0 && last_shard_port > usize::from(u16::MAX) {
            return Err(Config::command().error(
                clap::error::ErrorKind::ValueValidation,
                format!(
                    "--shard-port {} with {} shards needs ports up to {last_shard_port}, past \
                     65535",
                    self.shard_port,
                    self.shard_count()
                ),
            ));
        }
        if self.keepalive_idle == 0 {
            return Ok(());
        }
        // Within the flags' ranges this is at most 32767 x 128: no overflow.
        let give_up =
            self.keepalive_idle + self.keepalive_interval * u64::from(self.keepalive_count);
        if give_up <= MAX_KEEPALIVE_GIVE_UP_SECS {
            return Ok(());
        }
        Err(Config::command().error(
            clap::error::ErrorKind::ValueValidation,
            format!(
                "--keepalive-idle + --keepalive-interval x --keepalive-count is {give_up} \
                 seconds, more than the {MAX_KEEPALIVE_GIVE_UP_SECS} the kernel accepts for \
                 giving up on a silent peer"
            ),
        ))
    }

    /// Whether a TLS door (`-tls-port`, `-tls-ws`) is on.
    pub fn tls_enabled(&self) -> bool {
        self.tls_port != 0 || self.tls_ws != 0
    }

    /// The metrics endpoint's address, if enabled.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.0
    }

    /// The unix socket path, if enabled (`-unix ''` disables it, as in the original).
    pub fn unix_path(&self) -> Option<&std::path::Path> {
        self.unix
            .as_deref()
            .filter(|path| !path.is_empty())
            .map(std::path::Path::new)
    }

    /// The log file, if set (`-log-file ''` means stderr).
    pub fn log_file_path(&self) -> Option<&std::path::Path> {
        self.log_file
            .as_deref()
            .filter(|path| !path.is_empty())
            .map(std::path::Path::new)
    }

    /// The users file, if set (`-users ''` means none).
    pub fn users_path(&self) -> Option<&std::path::Path> {
        self.users
            .as_deref()
            .filter(|path| !path.is_empty())
            .map(std::path::Path::new)
    }

    /// The state file, if set (`-state-file ''` means none).
    pub fn state_file_path(&self) -> Option<&std::path::Path> {
        self.state_file
            .as_deref()
            .filter(|path| !path.is_empty())
            .map(std::path::Path::new)
    }

    /// The allowed websocket origins (empty: any).
    pub fn allowed_origins(&self) -> impl Iterator<Item = &str> {
        self.ws_origins
            .iter()
            .map(|o| o.trim())
            .filter(|o| !o.is_empty())
    }

    /// The limits every connection lives under, whichever door it came through.
    pub fn conn_limits(&self) -> ConnLimits {
        let secs = |s: u64| (s > 0).then(|| std::time::Duration::from_secs(s));
        ConnLimits {
            max_line: usize::try_from(self.max_line_bytes).unwrap_or(usize::MAX),
            max_unsent: usize::try_from(self.max_unsent_bytes).unwrap_or(usize::MAX),
            write_timeout: secs(self.write_timeout),
            idle_timeout: secs(self.idle_timeout),
            line_timeout: secs(self.line_timeout),
            ws_handshake_timeout: std::time::Duration::from_secs(self.ws_handshake_timeout),
        }
    }

    /// The memory budget in force: `--max-memory`, or the default for this machine (0: none).
    pub fn memory_budget(&self) -> u64 {
        match self.max_memory {
            Some(bytes) => bytes,
            None => crate::memory::default_budget().unwrap_or(0),
        }
    }

    /// The number of shard threads to run.
    pub fn shard_count(&self) -> usize {
        match self.shards {
            Some(n) => usize::from(n),
            None => default_shards(std::thread::available_parallelism().map_or(1, |n| n.get())),
        }
    }
}

/// The shard count when `-shards` is not given: one shard thread per two cores, at least one.
///
/// A command whose name another thread owns costs a message each way, so more shards only
/// pay when there are cores to spare for them: on a machine of one or two cores, which also
/// runs its clients or a load generator, one shard is fastest (measured: see the README's
/// Performance section), and from four cores on the shards' added capacity outgrows the
/// cross-thread cost (the README's cost model). Half the cores leaves the rest to the kernel's
/// network work and to clients on the same machine.
pub fn default_shards(cores: usize) -> usize {
    (cores / 2).max(1)
}

/// A connection's limits, from the flags of the same names; shared by TCP, unix socket and
/// websocket connections so that every door enforces the same ones.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// `--max-line-bytes`: the longest line (or websocket message) accepted.
    pub max_line: usize,
    /// `--max-unsent-bytes`: unread replies past which a client that keeps sending is cut off.
    pub max_unsent: usize,
    /// `--write-timeout`: how long a write may make no progress (None: forever).
    pub write_timeout: Option<std::time::Duration>,
    /// `--idle-timeout`: how long a connection may send nothing (None: forever).
    pub idle_timeout: Option<std::time::Duration>,
    /// `--line-timeout`: how long an unfinished line may wait for its newline (None: forever).
    pub line_timeout: Option<std::time::Duration>,
    /// `--ws-handshake-timeout`: how long a websocket client may take over its handshake.
    pub ws_handshake_timeout: std::time::Duration,
}

/// Exits for a command line clap refused: `--help` and `--version` print as usual; an error is
/// one line, `glockd: <what clap said> (see --help)`.
fn exit_on(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    eprintln!("glockd: {} (see --help)", one_line(&e));
    std::process::exit(e.exit_code());
}

/// clap's message for `e` on one line: its first line without the `error: ` prefix, and its
/// tips (`a similar argument exists: '--pidfile'`) after it; the usage lines are left out.
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default();
    let mut line = first
        .strip_prefix("error: ")
        .unwrap_or(first)
        .trim()
        .to_owned();
    // A negative number for a count fails in the integer parser, whose own words ("invalid
    // digit found in string") do not say what is wrong with `-1`.
    let negative = matches!(
        e.get(clap::error::ContextKind::InvalidValue),
        Some(clap::error::ContextValue::String(value))
            if value.strip_prefix('-').is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
    );
    if negative {
        if let Some(head) = line.strip_suffix("invalid digit found in string") {
            line = format!("{head}a negative number is not allowed");
        }
    }
    for tip in lines.filter_map(|l| l.trim().strip_prefix("tip: ")) {
        line.push_str("; ");
        line.push_str(tip);
    }
    line
}

/// How log lines are written (see [`crate::logging`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `2025-01-02T03:04:05.678901Z  INFO event=disconnect conn=127.0.0.1:50312 reason=eof`
    Text,
    /// `{"timestamp":"2025-01-02T03:04:05.678901Z","level":"INFO","event":"disconnect",…}`
    Json,
}

/// The metrics endpoint's address, or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<std::net::SocketAddr>);

fn metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    match s {
        "off" | "0" | "" | "false" => Ok(MetricsAddr(None)),
        _ => s
            .parse()
            .map(|addr| MetricsAddr(Some(addr)))
            .map_err(|_| format!("invalid metrics address {s:?} (use HOST:PORT, or off)")),
    }
}

/// A size in bytes: a number with an optional unit, `B`, `KiB`, `MiB`, `GiB` or `TiB` (powers
/// of 1024; `K`, `M`, `G`, `T`, `KB`… are read the same way).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("invalid size {s:?} (use bytes, or KiB, MiB, GiB)")),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("invalid size {s:?} (use bytes, or KiB, MiB, GiB)"))
}

/// `--max-client-buffers`: a size, 0 or within its range.
fn client_buffers_size(s: &str) -> Result<u64, String> {
    let size = parse_size(s)?;
    if size != 0 && !(MIN_CLIENT_BUFFERS..=MAX_CLIENT_BUFFERS).contains(&size) {
        return Err(format!(
            "{s} is out of range: 0 (no budget) or 1MiB to 1TiB"
        ));
    }
    Ok(size)
}

/// A file mode in octal (`0660`, `660`).
/// `--max-memory`: a size (see [`crate::memory::parse_size`]), 0 or within its range.
fn memory_size(s: &str) -> Result<u64, String> {
    let bytes = crate::memory::parse_size(s)?;
    if bytes != 0 && !(MIN_MEMORY..=MAX_MEMORY).contains(&bytes) {
        return Err(format!(
            "{bytes} bytes is not 0 or in {MIN_MEMORY}..={MAX_MEMORY} (1 MiB to 1 PiB)"
        ));
    }
    Ok(bytes)
}

fn octal_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|mode| *mode <= 0o7777)
        .ok_or_else(|| format!("invalid file mode {s:?} (use octal, like 0660)"))
}

/// Go's `strconv.ParseBool`.
fn go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("invalid boolean value {s:?} (use true or false)")),
    }
}

/// Rewrites Go-style single-dash long flags (`-port`, `-dump=false`) to clap's `--port`.
///
/// Every single-dash word of more than one letter is taken for a long flag, known or not: Go
/// has no clusters of one-letter flags, and clap would report a mistyped `-pidfle` by its
/// first letter (`-p`), as if it were one; as `--pidfle` it is named whole, with clap's
/// suggestion of the flag meant. Only a negative number (a dash and a digit) is left as it is,
/// and joined to a flag before it that takes a value (`--max-connections-per-ip=-1`), so clap
/// reports it as that flag's invalid value, not as an unexpected argument. `--` ends flag
/// processing as in both conventions.
pub fn go_style_args<I, T>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let command = Config::command();
    // Flags that take a separate value: booleans take theirs only after `=`.
    let valued: Vec<String> = command
        .get_arguments()
        .filter(|a| a.get_action().takes_values() && !a.is_require_equals_set())
        .filter_map(|a| a.get_long().map(str::to_owned))
        .collect();
    let negative = |text: &str| {
        text.strip_prefix('-')
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
    };
    let mut out: Vec<OsString> = Vec::new();
    let mut done = false;
    for arg in args.into_iter().map(Into::into) {
        let Some(text) = arg.to_str().filter(|_| !done) else {
            out.push(arg);
            continue;
        };
        if text == "--" {
            done = true;
            out.push(arg);
            continue;
        }
        if negative(text) {
            let flag = out.last().and_then(|last| last.to_str()).and_then(|last| {
                let name = last.strip_prefix("--")?;
                (!name.contains('=') && valued.iter().any(|v| v == name)).then_some(last)
            });
            if let Some(flag) = flag {
                let joined = OsString::from(format!("{flag}={text}"));
                out.pop();
                out.push(joined);
            } else {
                out.push(arg);
            }
            continue;
        }
        match text.strip_prefix('-') {
            Some(rest) if !rest.starts_with('-') && rest.chars().count() > 1 => {
                out.push(OsString::from(format!("-{text}")));
            }
            _ => out.push(arg),
        }
    }
    out
}

#[cfg(test)]
mod size_tests {
    use super::*;

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert!(parse_size("").is_err());
        assert!(parse_size("1.5GiB").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("16777216TiB").is_err());
        assert_eq!(client_buffers_size("0"), Ok(0));
        assert!(client_buffers_size("1023KiB").is_err());
        assert!(client_buffers_size("1025GiB").is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(args: &[&str]) -> Config {
        let mut all = vec!["glockd"];
        all.extend_from_slice(args);
        Config::try_from_args(all).expect("parses")
    }

    #[test]
    fn defaults_match_the_original() {
        let c = parse(&[]);
        assert_eq!(c.port, 9999);
        assert!(c.registry && c.dump && !c.verbose && c.pin);
        assert!(c.pidfile.is_none());
        assert_eq!(c.bind.to_string(), "0.0.0.0");
        assert_eq!(c.ws, 9998);
        assert!(c.unix_path().is_none());
        assert_eq!(c.allowed_origins().count(), 0);
        assert_eq!(c.unix_mode, 0o666);
        assert_eq!(c.metrics_addr(), Some("127.0.0.1:9997".parse().unwrap()));
        assert_eq!(parse(&["-metrics", "off"]).metrics_addr(), None);
        assert_eq!(parse(&["--metrics=0"]).metrics_addr(), None);
        assert_eq!(
            parse(&["-metrics", "0.0.0.0:9100"]).metrics_addr(),
            Some("0.0.0.0:9100".parse().unwrap())
        );
    }

    #[test]
    fn doors_are_configured_like_the_original() {
        let c = parse(&["-ws=0", "-unix", "/run/glockd.sock", "-unix-mode", "0660"]);
        assert_eq!(c.ws, 0);
        assert_eq!(
            c.unix_path(),
            Some(std::path::Path::new("/run/glockd.sock"))
        );
        assert_eq!(c.unix_mode, 0o660);
        assert!(parse(&["-unix", ""]).unix_path().is_none());
        let c = parse(&["-ws-origins", "https://a.example, https://b.example"]);
        assert_eq!(
            c.allowed_origins().collect::<Vec<_>>(),
            ["https://a.example", "https://b.example"]
        );
    }

    #[test]
    fn go_and_gnu_spellings_all_work() {
        assert_eq!(parse(&["-port", "1234"]).port, 1234);
        assert_eq!(parse(&["--port", "1234"]).port, 1234);
        assert_eq!(parse(&["-port=1234"]).port, 1234);
        assert_eq!(parse(&["--port=1234"]).port, 1234);
        let c = parse(&["-pidfile", "my.pid", "--port", "9999"]);
        assert_eq!(c.pidfile.as_deref(), Some(std::path::Path::new("my.pid")));
        assert!(!parse(&["-dump=false"]).dump);
        assert!(!parse(&["--dump=false"]).dump);
        assert!(parse(&["-dump"]).dump);
        assert!(!parse(&["-registry=0"]).registry);
        assert!(parse(&["-verbose"]).verbose);
        assert_eq!(parse(&[]).log_format, LogFormat::Text);
        assert_eq!(parse(&["-log-format", "json"]).log_format, LogFormat::Json);
        assert_eq!(parse(&["-log-format=json"]).log_format, LogFormat::Json);
        assert!(parse(&[]).log_file_path().is_none());
        assert_eq!(
            parse(&["-log-file", "/var/log/glockd.log"]).log_file_path(),
            Some(std::path::Path::new("/var/log/glockd.log"))
        );
        assert!(!parse(&["-pin=false"]).pin);
        assert_eq!(parse(&["-shards", "4"]).shard_count(), 4);
        assert_eq!(
            (1..=8).map(default_shards).collect::<Vec<_>>(),
            [1, 1, 1, 2, 2, 3, 3, 4]
        );
    }

    #[test]
    fn a_tls_door_needs_a_certificate_and_key() {
        let c = parse(&[]);
        assert!(!c.tls_enabled());
        assert_eq!((c.tls_port, c.tls_ws), (0, 0));
        assert_eq!((c.tls_handshake_timeout, c.max_tls_handshakes), (5, 1024));
        let refused = |args: &[&str]| {
            let mut all = vec!["glockd"];
            all.extend_from_slice(args);
            one_line(&Config::try_from_args(all).expect_err("refused"))
        };
        for args in [
            &["-tls-client-ca", "ca.pem"][..],
            &["-tls-cert", "c.pem", "-tls-key", "k.pem"],
        ] {
            assert!(refused(args).contains("without a TLS door"), "{args:?}");
        }
        for args in [
            &["-tls-port", "9996"][..],
            &["-tls-ws", "9995", "-tls-cert", "c.pem"],
            &["-tls-port=9996", "-tls-key", "k.pem"],
        ] {
            assert!(
                refused(args).contains("--tls-cert and --tls-key"),
                "{args:?}"
            );
        }
        let c = parse(&[
            "-tls-port",
            "9996",
            "-tls-ws=9995",
            "-tls-cert",
            "c.pem",
            "--tls-key=k.pem",
            "-tls-client-ca",
            "ca.pem",
        ]);
        assert!(c.tls_enabled());
        assert_eq!((c.tls_port, c.tls_ws), (9996, 9995));
        assert_eq!(c.tls_client_ca.as_deref(), Some(Path::new("ca.pem")));
    }

    #[test]
    fn the_state_file_and_token_reserve() {
        let c = parse(&[]);
        assert!(c.state_file_path().is_none());
        assert_eq!(c.token_reserve_ms, 3000);
        let c = parse(&[
            "-state-file",
            "/var/lib/glockd/state",
            "-token-reserve-ms=500",
        ]);
        assert_eq!(
            c.state_file_path(),
            Some(std::path::Path::new("/var/lib/glockd/state"))
        );
        assert_eq!(c.token_reserve_ms, 500);
        assert!(parse(&["--state-file="]).state_file_path().is_none());
    }

    #[test]
    fn bad_values_are_errors_not_guesses() {
        let bad = |args: &[&str]| {
            let mut all = vec!["glockd"];
            all.extend_from_slice(args);
            Config::try_from_args(all).is_err()
        };
        assert!(bad(&["-port", "99999"]));
        assert!(bad(&["-dump=maybe"]));
        assert!(bad(&["-shards", "0"]));
        assert!(bad(&["-nosuchflag"]));
        assert!(bad(&["-token-reserve-ms", "0"]));
        assert!(bad(&["-token-reserve-ms", "9"]));
        assert!(bad(&["-token-reserve-ms", "600001"]));
        assert!(bad(&["-token-reserve-ms", "soon"]));
        assert!(bad(&["-log-format", "xml"]));
    }

    #[test]
    fn every_numeric_flag_has_a_range() {
        let ok = |args: &[&str]| {
            let mut all = vec!["glockd"];
            all.extend_from_slice(args);
            Config::try_from_args(all).is_ok()
        };
        // Flag, lowest accepted, highest accepted, just below, just above; "" where the
        // number's type is the bound (below 0, above u64::MAX).
        let ranges = [
            ["-shards", "1", "1024", "0", "1025"],
            ["-max-line-bytes", "64", "1073741824", "63", "1073741825"],
            [
                "-max-unsent-bytes",
                "4096",
                "1099511627776",
                "4095",
                "1099511627777",
            ],
            ["-max-connections", "1", "1073741824", "0", "1073741825"],
            [
                "-max-connections-per-ip",
                "0",
                "1073741824",
                "",
                "1073741825",
            ],
            ["-max-locks-per-conn", "0", "18446744073709551615", "", ""],
            ["-write-timeout", "0", "31536000", "", "31536001"],
            ["-idle-timeout", "0", "31536000", "", "31536001"],
            ["-line-timeout", "0", "86400", "", "86401"],
            ["-metrics-max-connections", "1", "4096", "0", "4097"],
            ["-ws-handshake-timeout", "1", "300", "0", "301"],
            ["-tls-handshake-timeout", "1", "300", "0", "301"],
            ["-max-tls-handshakes", "1", "1073741824", "0", "1073741825"],
            ["-shutdown-timeout", "0", "31536000", "", "31536001"],
            ["-keepalive-idle", "0", "32767", "", "32768"],
            ["-keepalive-interval", "1", "32767", "0", "32768"],
            ["-keepalive-count", "1", "127", "0", "128"],
            ["-max-wait-ms", "0", "31536000000", "", "31536000001"],
            ["-auth-fail-delay-ms", "0", "10000", "", "10001"],
            ["-auth-max-failures", "1", "1000", "0", "1001"],
        ];
        assert_eq!(MAX_TIMEOUT_SECS, 31_536_000);
        for [flag, low, high, below, above] in ranges {
            assert!(ok(&[flag, low]), "{flag} {low}");
            assert!(ok(&[flag, high]), "{flag} {high}");
            for out in [below, above].into_iter().filter(|v| !v.is_empty()) {
                assert!(!ok(&[flag, out]), "{flag} {out}");
            }
        }
        // The defaults are all in range.
        let c = parse(&[]);
        assert_eq!(
            (c.max_line_bytes, c.max_unsent_bytes, c.max_connections),
            (1 << 20, 8 << 20, 10_000)
        );
        assert_eq!(
            (c.write_timeout, c.idle_timeout, c.shutdown_timeout),
            (30, 0, 5)
        );
        assert_eq!(
            (c.keepalive_idle, c.keepalive_interval, c.keepalive_count),
            (60, 10, 6)
        );
        assert_eq!(c.max_wait_ms, 3_600_000);
        assert_eq!((c.line_timeout, c.ws_handshake_timeout), (10, 5));
        assert_eq!(c.max_client_buffers, DEFAULT_CLIENT_BUFFERS);
        assert_eq!(c.max_connections_per_ip, 1000);
        assert_eq!(c.metrics_max_connections, 64);
        assert!(c.per_ip_exempt_loopback);
        assert!(!parse(&["-per-ip-exempt-loopback=false"]).per_ip_exempt_loopback);
    }

    #[test]
    fn keepalive_flags_together_fit_the_kernels_user_timeout() {
        let ok = |idle: &str, interval: &str, count: &str| {
            Config::try_from_args([
                "glockd",
                "-keepalive-idle",
                idle,
                "-keepalive-interval",
                interval,
                "-keepalive-count",
                count,
            ])
            .is_ok()
        };
        // 17628 + 32767 x 65 is exactly the most.
        assert!(ok("17628", "32767", "65"));
        assert!(!ok("17629", "32767", "65"));
        assert!(!ok("32767", "32767", "127"));
        // Keepalive off: the others are not used.
        assert!(ok("0", "32767", "127"));
        let e = Config::try_from_args([
            "glockd",
            "-keepalive-idle",
            "17629",
            "-keepalive-interval",
            "32767",
            "-keepalive-count",
            "65",
        ])
        .expect_err("refused");
        assert!(
            one_line(&e).contains("--keepalive-count"),
            "{}",
            one_line(&e)
        );
    }
}
