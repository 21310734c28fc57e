//! The command line of `loadgen`, and the checks that turn it into a run's settings.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::keys::{Dist, Keys};
use crate::wire::Target;

/// What each connection does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Take a lock on a random name, release it if granted (Redis: `SET NX` / `DEL`).
    Churn,
    /// Like churn, on few names shared by many connections; mutual exclusion is checked.
    Contention,
    /// Ask whether a random name is locked (`i` / `EXISTS`).
    Inspect,
    /// Take a counted shared lock (`sg` / `INCR`); release it at once when the count is over
    /// `--limit`, else after `--think-ms` (`sr` / `DECR`). `--mode sgl` and `--mode rl` let the
    /// server decide instead (glockd only).
    Ratelimit,
    /// Connect, take `--locks-per-conn` locks, disconnect without releasing, repeat (glockd only:
    /// the server releases them).
    OrphanStorm,
    /// Take every one of `--keys` locks once, spread over the connections, hold them for
    /// `--duration`, then disconnect: for measuring the server's memory per held lock.
    Hold,
    /// Open `--conns` connections, send one inspection on each, and keep them idle for
    /// `--duration`: for measuring the server's memory per connection.
    Idle,
    /// Groups of connections take turns on one name each: the holder releases it (`r`) while
    /// the others wait for it (`gw`); measures the hand-off latency from the release to the
    /// next waiter's grant, and checks mutual exclusion (glockd only).
    Wait,
}

/// How the ratelimit workload limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// `sg` a name, give it back at once when the count is over `--limit` (the client decides).
    Sg,
    /// `sgl LIMIT NAME`: the server refuses a slot when `--limit` hold it already.
    Sgl,
    /// `rl NAME BURST COUNT PERIOD_MS 1`: the server's GCRA rate limit decides.
    Rl,
}

/// Drives a glockd server (or Redis, or the no-op server) with a closed- or open-loop load and
/// reports throughput, latency percentiles and every unexpected reply.
#[derive(Parser, Debug, Clone)]
#[command(name = "loadgen", version, args_override_self = true)]
pub struct Args {
    /// The server's protocol.
    #[arg(long, value_enum, default_value_t = Target::Glockd)]
    pub target: Target,

    /// Shorthand for `--target redis`.
    #[arg(long, conflicts_with = "target")]
    pub redis: bool,

    /// Server address, HOST:PORT with a host name or an IP address (default 127.0.0.1:9999, or
    /// 127.0.0.1:6379 for Redis). A name is resolved once, at start; its first address is used.
    #[arg(long, value_parser = parse_addr)]
    pub addr: Option<SocketAddr>,

    /// Connect to this unix socket instead of TCP.
    #[arg(long, conflicts_with = "addr")]
    pub unix: Option<PathBuf>,

    /// Speak TLS (glockd's `-tls-port`, Redis' `--tls-port`); needs `--ca`. Each connection's
    /// handshake is part of connecting, so with `--workload orphan-storm --locks-per-conn 1`
    /// the run measures handshakes per second.
    #[arg(long, conflicts_with = "unix", requires = "ca")]
    pub tls: bool,

    /// `--tls`: CA certificates (PEM) the server's certificate must chain to.
    #[arg(long)]
    pub ca: Option<PathBuf>,

    /// `--tls`: a client certificate (PEM), for a server that requires one (`--key` too).
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,

    /// `--tls`: the client certificate's private key (PEM).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,

    /// `--tls`: the name the server's certificate must carry.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,

    /// What each connection does.
    #[arg(long, value_enum, default_value_t = Workload::Churn)]
    pub workload: Workload,

    /// Connections, spread over the client threads.
    #[arg(long, default_value_t = 50)]
    pub conns: usize,

    /// Commands in flight per connection (closed loop), or the pipeline window per connection
    /// for orphan-storm and hold.
    #[arg(long, default_value_t = 1)]
    pub pipeline: usize,

    /// Send each name to the server's port for the shard that owns it (glockd's `shards` and
    /// `-shard-port`), so no command crosses the server's threads: connection i uses shard
    /// i mod N and picks only names that shard owns. A server without shard ports gets an
    /// ordinary run (said on stderr).
    #[arg(long)]
    pub shard_aware: bool,

    /// Client threads, each with its own single-threaded runtime.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,

    /// Open loop: send this many commands per second in total, on a fixed schedule, and measure
    /// latency from each command's scheduled time (no coordinated omission).
    #[arg(long)]
    pub rate: Option<f64>,

    /// Measured run time (e.g. `10s`, `500ms`, `2m`); the hold time for hold and idle. Default
    /// 10s, or a 300s safety bound when `--requests` is given.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Stop after this many commands (measured ones, after the warm-up).
    #[arg(long)]
    pub requests: Option<u64>,

    /// Unmeasured run time before the measured part.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub warmup: Duration,

    /// Number of distinct lock names. Wait: at most this many groups, one name each, of
    /// `--conns` / `--keys` connections (rounded up, at least 2).
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,

    /// How names are drawn from the key space.
    #[arg(long, value_enum, default_value_t = Dist::Uniform)]
    pub dist: Dist,

    /// Zipf exponent for `--dist zipf`.
    #[arg(long, default_value_t = 0.99)]
    pub zipf_s: f64,

    /// Bytes in every lock name.
    #[arg(long, default_value_t = 16)]
    pub key_size: usize,

    /// Ratelimit: how the limit is applied.
    #[arg(long, value_enum, default_value_t = Mode::Sg)]
    pub mode: Mode,

    /// Ratelimit: holder count above which a shared lock is given back at once (sg), or the
    /// most holders the server lets in (sgl).
    #[arg(long, default_value_t = 10)]
    pub limit: u64,

    /// How long a lock is held: a shared lock within the limit (ratelimit sg, sgl; default 1),
    /// the exclusive lock by each holder in turn (wait; default 0).
    #[arg(long)]
    pub think_ms: Option<u64>,

    /// Ratelimit rl: requests allowed at once beyond the steady rate.
    #[arg(long, default_value_t = 10)]
    pub burst: u32,

    /// Ratelimit rl: requests allowed per `--period-ms` at the steady rate, per name.
    #[arg(long, default_value_t = 100)]
    pub count: u32,

    /// Ratelimit rl: the period of `--count`, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub period_ms: u32,

    /// Wait: how long each `gw` may wait, in milliseconds. A waiter that times out is an error:
    /// in a group that keeps handing the lock on, nobody should wait this long.
    #[arg(long, default_value_t = 5000)]
    pub wait_ms: u64,

    /// Orphan-storm: locks taken per connection before it disconnects.
    #[arg(long, default_value_t = 10)]
    pub locks_per_conn: u64,

    /// Seed for the key choices (default: from the clock), for repeatable runs.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,

    /// No progress line, even on a terminal.
    #[arg(long)]
    pub quiet: bool,

    /// Every connection sends `auth USER TOKEN` first (a glockd started with -users) and
    /// stops the run if it is refused.
    #[arg(long, value_name = "USER:TOKEN")]
    pub auth: Option<String>,
}

/// The `auth USER TOKEN\n` line of `--auth`; its `Debug` form hides the token.
#[derive(Clone)]
pub struct AuthLine(pub std::sync::Arc<[u8]>);

impl std::fmt::Debug for AuthLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthLine(..)")
    }
}

/// `auth USER TOKEN\n` from `--auth USER:TOKEN`, each one word.
fn auth_line(text: &str) -> Result<AuthLine, String> {
    let (user, token) = text.split_once(':').ok_or("--auth: expected USER:TOKEN")?;
    let word = |w: &str| !w.is_empty() && !w.chars().any(char::is_whitespace);
    if !word(user) || !word(token) {
        return Err("--auth: USER and TOKEN must each be one word without whitespace".into());
    }
    Ok(AuthLine(
        format!("auth {user} {token}\n").into_bytes().into(),
    ))
}

/// Where the server listens.
#[derive(Clone, Debug)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "tcp {addr}"),
            Endpoint::Unix(path) => write!(f, "unix {}", path.display()),
        }
    }
}

/// A run's settings, checked.
#[derive(Clone, Debug)]
pub struct Config {
    /// The server's protocol.
    pub target: Target,
    /// Where it listens.
    pub endpoint: Endpoint,
    /// What each connection does.
    pub workload: Workload,
    /// Number of connections.
    pub conns: usize,
    /// `--tls`: every connection does a TLS handshake first.
    pub tls: Option<crate::tls::Tls>,
    /// Commands in flight per connection.
    pub pipeline: usize,
    /// Client threads.
    pub threads: usize,
    /// Open-loop rate in commands per second, if open loop.
    pub rate: Option<f64>,
    /// Measured time (hold time for hold and idle).
    pub duration: Duration,
    /// Command budget, if bounded by count.
    pub requests: Option<u64>,
    /// Unmeasured lead-in.
    pub warmup: Duration,
    /// The key space.
    pub keys: Keys,
    /// Ratelimit: sg, sgl or rl.
    pub mode: Mode,
    /// Ratelimit threshold (sg), or the server-side slot limit (sgl).
    pub limit: u64,
    /// Hold time: ratelimit's shared locks, wait's exclusive lock.
    pub think: Duration,
    /// Ratelimit rl: the burst, sent with every `rl`.
    pub burst: u32,
    /// Ratelimit rl: the steady count per period, sent with every `rl`.
    pub count: u32,
    /// Ratelimit rl: the period in milliseconds, sent with every `rl`.
    pub period_ms: u32,
    /// Wait: the `MS` of every `gw`.
    pub wait_ms: u64,
    /// Orphan-storm locks per connection.
    pub locks_per_conn: u64,
    /// Seed for every connection's key choices.
    pub seed: u64,
    /// `--shard-aware`: asked of the server at start.
    pub shard_aware: bool,
    /// Each shard's own address, in shard order, once asked (empty: not shard-aware).
    pub shard_addrs: Vec<std::net::SocketAddr>,
    /// Show a progress line (only honoured on a terminal).
    pub progress: bool,
    /// `--auth`: the `auth USER TOKEN` line every connection sends first.
    pub auth_line: Option<AuthLine>,
}

impl Config {
    /// Checks the command line.
    pub fn from_args(args: Args) -> Result<Self, String> {
        let target = if args.redis {
            Target::Redis
        } else {
            args.target
        };
        let endpoint = match (args.unix, args.addr) {
            (Some(path), _) => Endpoint::Unix(path),
            (None, Some(addr)) => Endpoint::Tcp(addr),
            (None, None) => Endpoint::Tcp(SocketAddr::from((
                [127, 0, 0, 1],
                if target == Target::Redis { 6379 } else { 9999 },
            ))),
        };
        let keys = Keys::new(args.keys, args.key_size, args.dist, args.zipf_s)?;
        let seed = args.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
        let duration = args.duration.unwrap_or(if args.requests.is_some() {
            Duration::from_secs(300)
        } else {
            Duration::from_secs(10)
        });
        let config = Config {
            target,
            endpoint,
            workload: args.workload,
            conns: args.conns,
            tls: match (args.tls, args.ca) {
                (true, Some(ca)) => Some(crate::tls::Tls::new(&crate::tls::TlsSettings {
                    ca,
                    cert: args.cert.zip(args.key),
                    server_name: args.server_name,
                })?),
                (true, None) => return Err("--tls needs --ca".into()),
                (false, _) => None,
            },
            pipeline: args.pipeline,
            threads: args.threads,
            rate: args.rate,
            duration,
            requests: args.requests,
            warmup: args.warmup,
            keys,
            mode: args.mode,
            limit: args.limit,
            // A ratelimit slot is held for a moment, as a request would; a wait workload
            // hands the lock on at once, so that the run measures hand-offs, not sleeps.
            think: Duration::from_millis(args.think_ms.unwrap_or(
                if args.workload == Workload::Wait {
                    0
                } else {
                    1
                },
            )),
            burst: args.burst,
            count: args.count,
            period_ms: args.period_ms,
            wait_ms: args.wait_ms,
            locks_per_conn: args.locks_per_conn,
            seed,
            shard_aware: args.shard_aware,
            shard_addrs: Vec::new(),
            progress: !args.quiet,
            auth_line: args.auth.as_deref().map(auth_line).transpose()?,
        };
        config.check()?;
        Ok(config)
    }

    /// The numbers the new commands carry, for the wire encoder.
    pub fn params(&self) -> crate::wire::Params {
        crate::wire::Params {
            wait_ms: self.wait_ms,
            limit: self.limit,
            burst: self.burst,
            count: self.count,
            period_ms: self.period_ms,
        }
    }

    /// The rules that no single flag can check by itself.
    pub fn check(&self) -> Result<(), String> {
        if self.auth_line.is_some() && self.target != Target::Glockd {
            return Err("--auth is glockd's `auth`; it needs --target glockd".into());
        }
        if self.conns == 0 || self.pipeline == 0 || self.threads == 0 {
            return Err("--conns, --pipeline and --threads must be at least 1".into());
        }
        if let Some(rate) = self.rate {
            if !(rate > 0.0 && rate.is_finite()) {
                return Err("--rate must be a positive number".into());
            }
            if matches!(
                self.workload,
                Workload::OrphanStorm | Workload::Hold | Workload::Idle | Workload::Wait
            ) {
                return Err("--rate applies to churn, contention, inspect and ratelimit".into());
            }
        }
        self.check_new_commands()?;
        if self.target == Target::Redis && self.workload == Workload::OrphanStorm {
            return Err(
                "orphan-storm needs a server that releases a connection's locks when it \
                        goes away; Redis does not"
                    .into(),
            );
        }
        // A connection never runs two operations on one key at once (glockd would answer the
        // second `g` with 1, since the connection already holds the lock), so it needs at least
        // as many keys as operations in flight.
        let per_conn = match self.workload {
            Workload::OrphanStorm => self.locks_per_conn,
            _ => self.pipeline as u64,
        };
        let own_keys = matches!(self.workload, Workload::Hold | Workload::Wait);
        if !own_keys && self.keys.count() < per_conn {
            return Err(format!(
                "--keys {} is fewer than the {per_conn} operations a connection runs at once",
                self.keys.count()
            ));
        }
        if self.workload == Workload::Hold && self.keys.count() < self.conns as u64 {
            return Err("hold needs at least one key per connection".into());
        }
        Ok(())
    }

    /// The rules of the commands beyond the original protocol (`sgl`, `rl`, `gw`).
    fn check_new_commands(&self) -> Result<(), String> {
        let uses_mode = self.workload == Workload::Ratelimit && self.mode != Mode::Sg;
        if uses_mode || self.workload == Workload::Wait {
            // Redis has no such commands. The no-op server is allowed for wait: it grants every
            // `gw`, which the exclusion check must catch.
            let ok = match self.target {
                Target::Glockd => true,
                Target::Noop => self.workload == Workload::Wait,
                Target::Redis => false,
            };
            if !ok {
                return Err(format!(
                    "{} needs --target glockd",
                    if uses_mode {
                        "--mode sgl and --mode rl"
                    } else {
                        "the wait workload"
                    }
                ));
            }
        }
        if self.workload == Workload::Ratelimit && self.mode == Mode::Sgl && self.limit == 0 {
            return Err("--mode sgl needs --limit of at least 1".into());
        }
        if self.workload == Workload::Ratelimit
            && self.mode == Mode::Rl
            && (self.count == 0 || self.period_ms == 0)
        {
            return Err("--count and --period-ms must be at least 1".into());
        }
        if self.workload == Workload::Wait {
            crate::wait::plan(self)?;
        }
        Ok(())
    }
}

/// Parses `HOST:PORT` (`localhost:9999`, `10.0.0.5:9999`, `[::1]:9999`): an address as it is,
/// a host name resolved to its first address (every connection of a run goes to the same one,
/// so runs compare). clap names the option in front of the reason.
pub fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("{text} resolves to no address")),
        Err(e) => Err(format!("cannot resolve {text} (use HOST:PORT): {e}")),
    }
}

/// Parses `10s`, `250ms`, `2m`, `1.5s`, `100us` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("bad duration {text:?} (try 10s or 500ms)"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "bad duration unit in {text:?} (use s, ms, us, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("bad duration {text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn flags_are_checked_together() {
        let parse = |line: &str| {
            Args::try_parse_from(line.split_whitespace())
                .map_err(|e| e.to_string())
                .and_then(Config::from_args)
        };
        assert!(parse("loadgen --redis --workload orphan-storm").is_err());
        assert!(parse("loadgen --keys 4 --pipeline 8").is_err());
        assert!(parse("loadgen --conns 0").is_err());
        assert!(parse("loadgen --redis --workload ratelimit --mode rl").is_err());
        assert!(parse("loadgen --redis --workload wait").is_err());
        assert!(parse("loadgen --workload ratelimit --mode sgl --limit 0").is_err());
        assert!(parse("loadgen --workload ratelimit --mode rl --count 0").is_err());
        assert!(parse("loadgen --workload wait --conns 3 --threads 2").is_err());
        let config = parse("loadgen --workload ratelimit --mode rl --burst 5").unwrap();
        assert_eq!((config.mode, config.burst), (Mode::Rl, 5));
        assert_eq!(config.think, Duration::from_millis(1));
        let config = parse("loadgen --workload wait").unwrap();
        assert_eq!(config.think, Duration::ZERO);
        let config = parse("loadgen --redis").unwrap();
        assert_eq!(config.target, Target::Redis);
        assert!(matches!(config.endpoint, Endpoint::Tcp(a) if a.port() == 6379));
    }
}
