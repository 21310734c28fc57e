//! The tester against the real server, started in this process on an ephemeral loopback port:
//! everything passes with one shard and with several, in strict and in compat mode, over TCP,
//! the unix socket and the websocket door, and the checks a server has turned off are skipped,
//! not failed.

mod support;

use std::time::{Duration, Instant};

use glockd_tester::report::Status;
use support::{
    assert_no_failures, assert_status, run, run_args, run_ws, RealServer, REAL_TIMEOUT_MS,
};

/// Checks that need `d`, `sd`, `dump` or `who`.
const NEED_DUMP: [&str; 9] = [
    "d_name_lists_holder",
    "framed_listing_counts_rows",
    "sd_name_lists_holders",
    "dump_contains_lock",
    "dump_shared_contains_lock",
    "registry_who_lists_name",
    "registry_name_in_listings",
    "registry_dump_shows_raw_id",
    "pipelining_get_then_list",
];

/// Checks that need `iam`.
const NEED_REGISTRY: [&str; 5] = [
    "registry_iam",
    "registry_who_lists_name",
    "registry_name_in_listings",
    "registry_dump_shows_raw_id",
    "registry_empty_iam_clears",
];

async fn passes(shards: u16, extra: &[&str]) {
    let server = RealServer::start(shards, |_| {});
    let report = run(server.addr(), REAL_TIMEOUT_MS, extra).await;
    assert_no_failures(&report);
    assert!(
        report.passed >= 25,
        "too few checks ran:\n{}",
        support::shown(&report)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_check_passes_against_the_real_server_with_one_shard() {
    let server = RealServer::start(1, |_| {});
    let report = run(server.addr(), REAL_TIMEOUT_MS, &[]).await;
    assert_no_failures(&report);
    assert_eq!(report.skipped, 0, "{}", support::shown(&report));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_check_passes_against_the_real_server_with_four_shards() {
    let server = RealServer::start(4, |_| {});
    let report = run(server.addr(), REAL_TIMEOUT_MS, &[]).await;
    assert_no_failures(&report);
    assert_eq!(report.skipped, 0, "{}", support::shown(&report));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compat_mode_passes_against_the_real_server() {
    passes(1, &["--compat"]).await;
    passes(4, &["--compat"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compat_mode_skips_what_the_original_did_not_do() {
    let server = RealServer::start(2, |_| {});
    let report = run(server.addr(), REAL_TIMEOUT_MS, &["--compat"]).await;
    for name in [
        "pipelining_replies_in_order",
        "pipelining_get_then_list",
        "unknown_command_answered_0",
        "empty_line_no_reply",
    ] {
        assert_status(&report, name, Status::Skip);
    }
    // The invalid-command counter is still checked, without waiting for a reply.
    assert_status(&report, "stats_invalid_commands", Status::Pass);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_checks_are_skipped_when_dump_is_disabled() {
    for shards in [1, 4] {
        let server = RealServer::start(shards, |c| c.dump = false);
        let report = run(server.addr(), REAL_TIMEOUT_MS, &[]).await;
        assert_no_failures(&report);
        for name in NEED_DUMP {
            assert_status(&report, name, Status::Skip);
        }
        assert_eq!(
            report.skipped,
            NEED_DUMP.len(),
            "{}",
            support::shown(&report)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_checks_are_skipped_when_the_registry_is_disabled() {
    for shards in [1, 4] {
        let server = RealServer::start(shards, |c| c.registry = false);
        let report = run(server.addr(), REAL_TIMEOUT_MS, &[]).await;
        assert_no_failures(&report);
        for name in NEED_REGISTRY {
            assert_status(&report, name, Status::Skip);
        }
        // `me` is not part of the registry switch.
        assert_status(&report, "registry_me", Status::Pass);
        assert_eq!(
            report.skipped,
            NEED_REGISTRY.len(),
            "{}",
            support::shown(&report)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_leaves_no_lock_held_and_no_connection_open() {
    let server = RealServer::start(4, |_| {});
    let report = run(server.addr(), REAL_TIMEOUT_MS, &[]).await;
    assert_no_failures(&report);
    // The tester's last connections close as it returns; the server notices in its own time.
    let mut client = glockd::client::Client::connect(server.addr())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = client.stats().await.unwrap();
        let clean = stats["locks"] == 0 && stats["shared_locks"] == 0 && stats["connections"] == 1;
        if clean {
            return;
        }
        assert!(Instant::now() < deadline, "left behind: {stats:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_longer_than_the_cap_is_skipped_not_read() {
    let server = RealServer::start(2, |_| {});
    // 16 bytes: the table (one lock) might fit, so `dump` is sent, but its line does not.
    let report = run(server.addr(), REAL_TIMEOUT_MS, &["--max-dump-bytes", "16"]).await;
    assert_no_failures(&report);
    for name in [
        "dump_contains_lock",
        "dump_shared_contains_lock",
        "registry_dump_shows_raw_id",
    ] {
        assert_status(&report, name, Status::Skip);
        let detail = &report.get(name).unwrap().detail;
        assert!(
            detail.contains("is longer than --max-dump-bytes 16"),
            "{detail}"
        );
    }
    // 8 bytes: even one entry cannot fit, so `dump` is not even sent.
    let report = run(server.addr(), REAL_TIMEOUT_MS, &["--max-dump-bytes", "8"]).await;
    assert_no_failures(&report);
    let detail = &report.get("dump_contains_lock").unwrap().detail;
    assert!(detail.contains("`dump` not sent"), "{detail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_check_passes_over_the_unix_socket() {
    let path = std::env::temp_dir().join(format!("glockd-tester-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = glockd::doors::bind_unix(&path, 0o600).expect("bind unix");
    let config = glockd::Config {
        shards: Some(2),
        pin: false,
        ..glockd::Config::default()
    };
    let listeners = glockd::Listeners {
        unix: Some((listener, path.clone())),
        ..glockd::Listeners::default()
    };
    let server = glockd::start_with_listeners(config, listeners).expect("server starts");
    let unix = path.to_str().expect("utf-8 path").to_owned();
    let report = run_args(&["--unix", &unix, "--timeout-ms", REAL_TIMEOUT_MS]).await;
    drop(server);
    let _ = std::fs::remove_file(&path);
    assert_no_failures(&report);
    assert_eq!(report.skipped, 0, "{}", support::shown(&report));
    assert!(report.target.starts_with("unix "), "{}", report.target);
}

async fn every_check_passes_over_the_websocket_door(shards: u16) {
    let server = RealServer::start_ws(shards, |_| {});
    let report = run_ws(&server.ws_url(), REAL_TIMEOUT_MS, &[]).await;
    assert_no_failures(&report);
    assert_eq!(report.skipped, 0, "{}", support::shown(&report));
    assert!(report.target.starts_with("ws ws://"), "{}", report.target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_check_passes_over_the_websocket_door_with_one_shard() {
    every_check_passes_over_the_websocket_door(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_check_passes_over_the_websocket_door_with_four_shards() {
    every_check_passes_over_the_websocket_door(4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compat_mode_passes_over_the_websocket_door() {
    for shards in [1, 4] {
        let server = RealServer::start_ws(shards, |_| {});
        let report = run_ws(&server.ws_url(), REAL_TIMEOUT_MS, &["--compat"]).await;
        assert_no_failures(&report);
        // The same four as over TCP: pipelining, the unknown command's reply, empty lines.
        assert_eq!(report.skipped, 5, "{}", support::shown(&report));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_checks_are_skipped_over_the_websocket_door_when_dump_is_disabled() {
    let server = RealServer::start_ws(4, |c| c.dump = false);
    let report = run_ws(&server.ws_url(), REAL_TIMEOUT_MS, &[]).await;
    assert_no_failures(&report);
    for name in NEED_DUMP {
        assert_status(&report, name, Status::Skip);
    }
    assert_eq!(
        report.skipped,
        NEED_DUMP.len(),
        "{}",
        support::shown(&report)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_longer_than_the_cap_is_skipped_over_the_websocket_door() {
    let server = RealServer::start_ws(2, |_| {});
    let report = run_ws(
        &server.ws_url(),
        REAL_TIMEOUT_MS,
        &["--max-dump-bytes", "16"],
    )
    .await;
    assert_no_failures(&report);
    for name in [
        "dump_contains_lock",
        "dump_shared_contains_lock",
        "registry_dump_shows_raw_id",
    ] {
        assert_status(&report, name, Status::Skip);
        let detail = &report.get(name).unwrap().detail;
        assert!(
            detail.contains("is longer than --max-dump-bytes 16"),
            "{detail}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_run_leaves_no_lock_held_and_no_connection_open() {
    let server = RealServer::start_ws(4, |_| {});
    let report = run_ws(&server.ws_url(), REAL_TIMEOUT_MS, &[]).await;
    assert_no_failures(&report);
    // Every websocket the tester opened was closed with a close frame; the server ends each
    // in its own time. Looked at through the TCP door, which shares the table.
    let mut client = glockd::client::Client::connect(server.addr())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = client.stats().await.unwrap();
        let clean = stats["locks"] == 0 && stats["shared_locks"] == 0 && stats["connections"] == 1;
        if clean {
            return;
        }
        assert!(Instant::now() < deadline, "left behind: {stats:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Writes a throwaway CA and a server certificate for `localhost` (PEM) into `dir`.
fn certificates(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("dir");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("ca");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("cert");
    std::fs::write(dir.join("server.pem"), cert.pem()).expect("write");
    std::fs::write(dir.join("server.key"), key.serialize_pem()).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_check_passes_over_the_tls_door() {
    let dir = std::env::temp_dir().join(format!("glockd-tester-tls-{}", std::process::id()));
    certificates(&dir);
    let config = glockd::Config {
        shards: Some(2),
        pin: false,
        tls_cert: Some(dir.join("server.pem")),
        tls_key: Some(dir.join("server.key")),
        ..glockd::Config::default()
    };
    let listeners = glockd::Listeners {
        tls: Some(std::net::TcpListener::bind("127.0.0.1:0").expect("bind")),
        ..glockd::Listeners::default()
    };
    let server = glockd::start_with_listeners(config, listeners).expect("server starts");
    let host = format!("localhost:{}", server.tls_addr().expect("tls").port());
    let ca = dir.join("ca.pem");
    let ca = ca.to_str().expect("utf-8 path");
    let report = run_args(&[
        "--host",
        &host,
        "--tls",
        "--ca",
        ca,
        "--timeout-ms",
        REAL_TIMEOUT_MS,
    ])
    .await;
    assert_no_failures(&report);
    assert_eq!(report.skipped, 0, "{}", support::shown(&report));
    assert!(report.target.starts_with("tls "), "{}", report.target);
    // A CA the server's certificate does not chain to: nothing passes `connect`.
    let other = dir.join("other");
    certificates(&other);
    let other_ca = other.join("ca.pem");
    let report = run_args(&[
        "--host",
        &host,
        "--tls",
        "--ca",
        other_ca.to_str().expect("utf-8 path"),
        "--timeout-ms",
        REAL_TIMEOUT_MS,
    ])
    .await;
    assert!(report.failed > 0, "{}", support::shown(&report));
}

/// A server with a users file: with `--auth` every check passes, and `--expect-auth` checks
/// that a connection that has not authenticated is refused; without `--auth` nothing gets in;
/// and a server that lets everyone in fails `--expect-auth`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_users_file_the_tester_authenticates_and_checks_the_refusal() {
    let dir = std::env::temp_dir().join(format!("glockd-tester-users-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let path = dir.join("users.toml");
    let line = glockd::users::token::hash_token_line(b"tester-token").expect("a token");
    std::fs::write(
        &path,
        format!(
            "[[user]]\nname = \"tester\"\n{line}\nprefixes = ['glockd-tester:*']\n\
             classes = [\"all\"]\n"
        ),
    )
    .expect("users file");
    let server = RealServer::start_ws(2, |c| c.users = Some(path.clone().into()));
    let auth = ["--auth", "tester:tester-token", "--expect-auth"];
    for report in [
        run(server.addr(), REAL_TIMEOUT_MS, &auth).await,
        run_ws(&server.ws_url(), REAL_TIMEOUT_MS, &auth).await,
    ] {
        assert_no_failures(&report);
        assert_eq!(report.skipped, 0, "{}", support::shown(&report));
        assert_status(&report, "auth_required_without_auth", Status::Pass);
    }
    let report = run(server.addr(), REAL_TIMEOUT_MS, &["--expect-auth"]).await;
    assert_status(&report, "connect", Status::Fail);
    let report = run(
        server.addr(),
        REAL_TIMEOUT_MS,
        &["--auth", "tester:wrong", "--only", "connect"],
    )
    .await;
    assert_status(&report, "connect", Status::Fail);
    let open = RealServer::start(1, |_| {});
    let report = run(open.addr(), REAL_TIMEOUT_MS, &["--expect-auth"]).await;
    assert_status(&report, "auth_required_without_auth", Status::Fail);
    // Without --expect-auth the check is not in the run at all.
    let report = run(open.addr(), REAL_TIMEOUT_MS, &[]).await;
    assert!(report
        .checks
        .iter()
        .all(|c| c.name != "auth_required_without_auth"));
    let _ = std::fs::remove_dir_all(&dir);
}
