//! Short, bounded runs of the load generator against an in-process glockd and the no-op server:
//! every workload must finish with zero errors and a nonzero throughput.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use clap::Parser;
use glockd_loadgen::{noop, run, Args, Config, Report};

fn glockd(shards: u16) -> (glockd::ServerHandle, SocketAddr) {
    let config = glockd::Config {
        shards: Some(shards),
        pin: false,
        ..glockd::Config::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = glockd::start_with(config, Some(listener)).unwrap();
    let addr = server.tcp_addr().unwrap();
    (server, addr)
}

/// The no-op server on a loopback TCP port, with one thread.
/// An in-process server of two unpinned shards (else as `config` says) on a TCP port and a
/// port per shard (`-shard-port`), for shard-aware runs.
fn with_shard_ports(config: glockd::Config) -> glockd::ServerHandle {
    let bind = || Some(TcpListener::bind("127.0.0.1:0").unwrap());
    let config = glockd::Config {
        shards: Some(2),
        pin: false,
        ..config
    };
    let listeners = glockd::Listeners {
        tcp: bind(),
        shard_ports: vec![bind().unwrap(), bind().unwrap()],
        ..glockd::Listeners::default()
    };
    glockd::start_with_listeners(config, listeners).unwrap()
}

fn noop_server() -> (noop::NoopServer, SocketAddr) {
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = noop::start(Some(tcp), None, 1).unwrap();
    let addr = server.tcp_addr().unwrap();
    (server, addr)
}

/// Runs `loadgen` with these flags (bounded: a small request count and a 2 s cap).
fn loadgen(flags: &str) -> Report {
    let line = format!("loadgen --quiet --duration 2s --threads 2 {flags}");
    let args = Args::try_parse_from(line.split_whitespace()).unwrap();
    let config = Config::from_args(args).unwrap();
    run(config).unwrap()
}

fn assert_clean(report: &Report) {
    assert_eq!(report.errors, 0, "{}", report.table());
    assert!(report.commands > 0, "{}", report.table());
    assert!(report.ops_per_sec > 0.0, "{}", report.table());
}

#[test]
fn churn_pipelined_and_not() {
    let (_server, addr) = glockd(2);
    // Bounded by the request count (with a wide time cap: a busy machine running the other
    // tests at once may take more than the usual 2 s).
    for pipeline in [1, 16] {
        let report = loadgen(&format!(
            "--addr {addr} --workload churn --conns 8 --pipeline {pipeline} --requests 20000 \
             --duration 30s"
        ));
        assert_clean(&report);
        assert!(report.counts.granted > 0);
        assert!(report.commands >= 20_000, "{}", report.table());
    }
}

#[test]
fn contention_keeps_mutual_exclusion() {
    let (_server, addr) = glockd(2);
    let report = loadgen(&format!(
        "--addr {addr} --workload contention --conns 24 --keys 4 --pipeline 2 --requests 20000"
    ));
    assert_clean(&report);
    assert_eq!(report.counts.violations, 0);
    assert!(
        report.counts.granted > 0 && report.counts.refused > 0,
        "{}",
        report.table()
    );
}

#[test]
fn ratelimit_and_inspect() {
    let (_server, addr) = glockd(2);
    let report = loadgen(&format!(
        "--addr {addr} --workload ratelimit --conns 16 --keys 8 --limit 3 --think-ms 1 \
         --pipeline 4 --requests 5000"
    ));
    assert_clean(&report);
    let report = loadgen(&format!(
        "--addr {addr} --workload inspect --conns 4 --pipeline 8 --dist zipf --requests 5000"
    ));
    assert_clean(&report);
}

/// Waits (up to 10 s) until the server's table agrees with `done`.
fn eventually(
    server: &glockd::ServerHandle,
    what: &str,
    done: impl Fn(&glockd::stats::Snapshot) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = server.stats();
        if done(&stats) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {stats:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn ratelimit_sgl_lets_in_at_most_the_limit() {
    let (server, addr) = glockd(2);
    // 16 connections, two operations each, on 4 names with 3 slots: some are turned away.
    let report = loadgen(&format!(
        "--addr {addr} --workload ratelimit --mode sgl --conns 16 --keys 4 --limit 3 \
         --think-ms 1 --pipeline 2 --duration 1s"
    ));
    assert_clean(&report);
    assert!(
        report.counts.allowed > 0 && report.counts.limited > 0,
        "{}",
        report.table()
    );
    assert!(report.table().contains("slots "), "{}", report.table());
    eventually(&server, "every slot given back", |s| s.shared_locks == 0);
}

#[test]
fn ratelimit_rl_allows_bursts_then_limits() {
    let (server, addr) = glockd(2);
    let report = loadgen(&format!(
        "--addr {addr} --workload ratelimit --mode rl --conns 4 --keys 8 --pipeline 8 \
         --burst 4 --count 10 --period-ms 1000 --duration 1s"
    ));
    assert_clean(&report);
    assert!(report.counts.limited > 0, "{}", report.table());
    // Per name: a burst of 5 at once, then 10 a second, over about a second of run.
    assert!(
        (8 * 5..=8 * (5 + 10 * 3)).contains(&report.counts.allowed),
        "{}",
        report.table()
    );
    // Every decision the server made was seen and counted, and no other.
    let stats = server.stats();
    assert_eq!(stats.rate_limit_allowed, report.counts.allowed);
    assert_eq!(stats.rate_limit_limited, report.counts.limited);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["mode"], "rl");
    assert_eq!(json["allowed"], report.counts.allowed);
}

#[test]
fn wait_hands_the_lock_on_in_groups() {
    let (server, addr) = glockd(2);
    // Groups of 3 on 4 names (2 per client thread).
    let report = loadgen(&format!(
        "--addr {addr} --workload wait --conns 12 --keys 4 --duration 1s"
    ));
    assert_clean(&report);
    assert_eq!(report.keys, 4, "{}", report.table());
    assert_eq!(report.counts.violations, 0);
    assert!(report.handoffs > 0, "{}", report.table());
    let handoff = report.handoff_us.as_ref().expect("hand-off percentiles");
    assert!(handoff.p50 > 0.0 && handoff.p99 >= handoff.p50);
    assert!(report.table().contains("hand-off µs"), "{}", report.table());
    eventually(&server, "the group drained", |s| {
        s.locks == 0 && s.lock_waiters == 0
    });
    let stats = server.stats();
    assert_eq!(stats.lock_waits_granted, report.counts.granted);
    assert_eq!(stats.lock_waits_timed_out, 0);
}

#[test]
fn wait_in_pairs_bounded_by_requests() {
    let (server, addr) = glockd(1);
    let report = loadgen(&format!(
        "--addr {addr} --workload wait --conns 4 --requests 400"
    ));
    assert_clean(&report);
    assert!(report.handoffs > 0, "{}", report.table());
    assert!(report.commands >= 400, "{}", report.table());
    eventually(&server, "the pairs drained", |s| {
        s.locks == 0 && s.lock_waiters == 0
    });
}

#[test]
fn wait_catches_a_server_that_grants_every_waiter() {
    // The no-op server answers every `gw` with `1 Got Lock` at once: two members of a group
    // are told they hold the name together.
    let (_server, addr) = noop_server();
    let report = loadgen(&format!(
        "--target noop --workload wait --addr {addr} --conns 4 --duration 200ms"
    ));
    assert!(report.counts.violations > 0, "{}", report.table());
    assert!(report.errors >= report.counts.violations);
}

#[test]
fn orphan_storm_leaves_no_lock_behind() {
    let (server, addr) = glockd(2);
    let report = loadgen(&format!(
        "--addr {addr} --workload orphan-storm --conns 8 --locks-per-conn 20 --pipeline 8 \
         --keys 1000 --requests 8000"
    ));
    assert_clean(&report);
    assert!(report.counts.connections > 8, "{}", report.table());
    eventually(&server, "every lock released", |s| s.locks == 0);
    assert!(server.stats().orphans > 0);
}

#[test]
fn open_loop_at_a_fixed_rate() {
    let (_server, addr) = glockd(1);
    let report = loadgen(&format!(
        "--addr {addr} --workload churn --conns 4 --rate 4000 --duration 1s"
    ));
    assert_clean(&report);
    // About 4000 commands in one second; allow for a slow machine.
    assert!(report.commands > 1000, "{}", report.table());
    assert!(report.commands < 6000, "{}", report.table());
}

#[test]
fn hold_takes_every_key_once() {
    let (server, addr) = glockd(2);
    let report = loadgen(&format!(
        "--addr {addr} --workload hold --conns 4 --keys 2000 --pipeline 64 --duration 100ms"
    ));
    assert_eq!(report.errors, 0, "{}", report.table());
    assert_eq!(report.counts.granted, 2000);
    eventually(&server, "every lock released", |s| s.locks == 0);
}

#[test]
fn noop_server_over_tcp_and_unix() {
    let dir = std::env::temp_dir().join(format!("loadgen-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("noop.sock");
    let _ = std::fs::remove_file(&path);
    let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = noop::start(Some(tcp), Some(unix), 2).unwrap();
    let addr = server.tcp_addr().unwrap();
    let report = loadgen(&format!(
        "--target noop --addr {addr} --conns 8 --pipeline 32 --requests 50000"
    ));
    assert_clean(&report);
    let report = loadgen(&format!(
        "--target noop --unix {} --conns 4 --pipeline 8 --requests 20000",
        path.display()
    ));
    assert_clean(&report);
    assert!(report.endpoint.starts_with("unix"));
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_wrong_reply_is_an_error() {
    // The no-op server's `1 Got Lock` is not what glockd answers to `r`.
    let (_server, addr) = noop_server();
    let report = loadgen(&format!(
        "--target glockd --addr {addr} --conns 2 --requests 200"
    ));
    assert!(report.errors > 0, "{}", report.table());
    assert!(
        report.error_examples[0].contains("unexpected reply"),
        "{:?}",
        report.error_examples
    );
}

#[test]
fn a_server_that_grants_everything_is_caught() {
    // The no-op server says `1 Got Lock` to everyone: contention must see two holders at once.
    // Open loop, so that a connection holds each grant until its next tick (a few ms) and the
    // overlap is seen on one client thread; in a closed loop the release follows the grant
    // with no other connection running in between, and only a race between threads shows it.
    let (_server, addr) = noop_server();
    let report = loadgen(&format!(
        "--target noop --workload contention --addr {addr} --conns 8 --keys 2 --rate 4000 \
         --duration 500ms"
    ));
    assert!(report.counts.violations > 0, "{}", report.table());
    assert!(report.errors >= report.counts.violations);
}

#[test]
fn shard_aware_churn_crosses_no_thread() {
    let server = with_shard_ports(glockd::Config::default());
    let addr = server.tcp_addr().unwrap();
    let report = loadgen(&format!(
        "--addr {addr} --workload churn --conns 8 --pipeline 4 --requests 20000 --duration 30s \
         --shard-aware"
    ));
    assert_clean(&report);
    assert_eq!(report.counts.violations, 0);
    let (local, remote) = server.local_and_remote_commands();
    assert_eq!(remote, 0, "every name went to its owner's port");
    assert!(local >= 20_000);
    // Against a server without shard ports it is an ordinary run.
    let (_plain, plain_addr) = glockd(2);
    let report = loadgen(&format!(
        "--addr {plain_addr} --workload churn --conns 4 --requests 2000 --duration 30s \
         --shard-aware"
    ));
    assert_clean(&report);
}

/// The open loop keeps its schedule to microseconds at any rate: a slow schedule must not
/// send late (the runtime's timers tick in milliseconds), or its latency, counted from the
/// scheduled time, would grow as the rate falls. Against the no-op server, whose work per
/// command does not depend on the rate, the median at a low rate must not exceed the median
/// at a high one by more than the noise of a shared machine, far below the millisecond a late
/// timer costs.
#[test]
fn the_open_loop_keeps_its_schedule_at_low_rates() {
    let (_server, addr) = noop_server();
    let median = |rate: u32| {
        let report = loadgen(&format!(
            "--target noop --addr {addr} --threads 1 --conns 10 --rate {rate} --duration 1s \
             --warmup 0.2s"
        ));
        assert_clean(&report);
        eprintln!("{rate}/s: {}", report.table());
        report.latency_us.p50
    };
    let high = median(10_000);
    let low = median(500);
    assert!(
        low <= high * 1.5 + 200.0,
        "median {low:.1} µs at 500/s against {high:.1} µs at 10000/s"
    );
}

/// A throwaway CA, a server certificate for `localhost` and a client certificate, as PEM files
/// in a fresh directory (removed by the caller).
fn certificates(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (name, sans) in [("server", vec!["localhost".to_owned()]), ("client", vec![])] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("loadgen {name}"));
        let cert = params.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

#[test]
fn churn_and_handshakes_over_tls_with_a_client_certificate() {
    let dir = std::env::temp_dir().join(format!("glockd-loadgen-tls-{}", std::process::id()));
    certificates(&dir);
    let config = glockd::Config {
        shards: Some(2),
        pin: false,
        tls_cert: Some(dir.join("server.pem")),
        tls_key: Some(dir.join("server.key")),
        tls_client_ca: Some(dir.join("ca.pem")),
        ..glockd::Config::default()
    };
    let listeners = glockd::Listeners {
        tls: Some(TcpListener::bind("127.0.0.1:0").unwrap()),
        ..glockd::Listeners::default()
    };
    let server = glockd::start_with_listeners(config, listeners).unwrap();
    let addr = server.tls_addr().unwrap();
    let tls = format!(
        "--tls --ca {ca} --cert {cert} --key {key}",
        ca = dir.join("ca.pem").display(),
        cert = dir.join("client.pem").display(),
        key = dir.join("client.key").display()
    );
    let report = loadgen(&format!(
        "--addr {addr} {tls} --workload churn --conns 4 --pipeline 8 --requests 4000 \
         --duration 30s"
    ));
    assert_clean(&report);
    assert!(report.counts.granted > 0);
    // One lock per connection: each connection is one handshake.
    let report = loadgen(&format!(
        "--addr {addr} {tls} --workload orphan-storm --conns 4 --locks-per-conn 1 \
         --requests 200 --duration 30s"
    ));
    assert_clean(&report);
    let ok = server
        .tls()
        .unwrap()
        .handshakes(glockd::tls::TlsDoor::Line, glockd::tls::HandshakeResult::Ok);
    assert!(ok >= report.counts.connections, "{ok} {}", report.table());
    // Without the client certificate the server refuses every connection.
    let line = format!(
        "loadgen --quiet --duration 2s --addr {addr} --tls --ca {} --requests 10",
        dir.join("ca.pem").display()
    );
    let config = Config::from_args(Args::try_parse_from(line.split_whitespace()).unwrap()).unwrap();
    let report = run(config).unwrap();
    assert!(report.errors > 0, "{}", report.table());
}

/// `--auth`: against a server with a users file every connection authenticates first (the
/// shard ports and the `shards` question included); a wrong token fails every connection,
/// and a server that needs auth refuses a run without it.
#[test]
fn auth_authenticates_every_connection() {
    let dir = std::env::temp_dir().join(format!("glockd-loadgen-users-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("users.toml");
    let line = glockd::users::token::hash_token_line(b"bench-token").unwrap();
    std::fs::write(
        &path,
        format!("[[user]]\nname = \"bench\"\n{line}\nprefixes = ['*']\nclasses = [\"all\"]\n"),
    )
    .unwrap();
    let server = with_shard_ports(glockd::Config {
        users: Some(path.clone().into()),
        auth_fail_delay_ms: 0,
        ..glockd::Config::default()
    });
    let addr = server.tcp_addr().unwrap();
    for extra in ["", "--shard-aware"] {
        let report = loadgen(&format!(
            "--addr {addr} --workload churn --conns 4 --pipeline 4 --requests 4000 \
             --duration 30s --auth bench:bench-token {extra}"
        ));
        assert_clean(&report);
    }
    let report = loadgen(&format!(
        "--addr {addr} --conns 2 --requests 200 --auth bench:wrong"
    ));
    assert!(report.errors > 0, "{}", report.table());
    assert!(
        report.error_examples[0].contains("auth refused: 0 Auth Failed"),
        "{:?}",
        report.error_examples
    );
    let report = loadgen(&format!("--addr {addr} --conns 2 --requests 200"));
    assert!(report.errors > 0, "{}", report.table());
    let args = Args::try_parse_from(["loadgen", "--redis", "--auth", "a:b"]).unwrap();
    assert!(Config::from_args(args).unwrap_err().contains("--auth"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--addr` takes a host name, as the tester does: the `loadgen` binary runs against a server
/// found by `localhost:PORT`, and a name that does not resolve (or no port) is refused with a
/// line naming `--addr`.
#[test]
fn addr_takes_a_host_name() {
    use std::net::ToSocketAddrs;
    use std::process::Command;
    // The server listens where `localhost` resolves first (127.0.0.1, or ::1 on a machine
    // that lists it first), which is the address loadgen picks.
    let local = ("localhost", 0)
        .to_socket_addrs()
        .expect("localhost resolves")
        .next()
        .expect("localhost has an address");
    let config = glockd::Config {
        shards: Some(1),
        pin: false,
        ..glockd::Config::default()
    };
    let server = glockd::start_with(config, Some(TcpListener::bind(local).unwrap())).unwrap();
    let port = server.tcp_addr().unwrap().port();
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["--quiet", "--json", "--addr", &format!("localhost:{port}")])
        .args(["--conns", "2", "--requests", "2000", "--duration", "30s"])
        .output()
        .expect("run loadgen");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["commands"].as_u64().unwrap_or(0) >= 2000, "{report}");
    drop(server);

    for bad in ["no-such-host.invalid:9999", "localhost", "localhost:port"] {
        let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
            .args(["--addr", bad, "--duration", "1s"])
            .output()
            .expect("run loadgen");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        let first = stderr.lines().next().unwrap_or_default();
        assert!(
            first.contains("--addr") && first.contains(bad),
            "{bad}: {stderr}"
        );
    }
}
