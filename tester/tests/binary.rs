//! The built binary: exit status, the summary line, `--json`, Go-style flags.

mod support;

use std::process::{Command, Output};

use support::fake::{Fake, Faults};
use support::RealServer;

fn tester(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_glockd-tester"))
        .args(args)
        .output()
        .expect("run glockd-tester")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `N passed, N failed, N skipped` alone on the last line: (passed, failed, skipped).
fn summary(output: &Output) -> (usize, usize, usize) {
    let text = stdout(output);
    let last = text.lines().last().expect("some output");
    let numbers: Vec<usize> = last
        .split(", ")
        .zip(["passed", "failed", "skipped"])
        .map(|(part, word)| {
            let (n, w) = part.split_once(' ').expect("`N word`");
            assert_eq!(w, word, "summary line {last:?}");
            n.parse().expect("a count")
        })
        .collect();
    assert_eq!(numbers.len(), 3, "summary line {last:?}");
    (numbers[0], numbers[1], numbers[2])
}

#[test]
fn passes_against_the_real_server_with_exit_status_0() {
    let server = RealServer::start(2, |_| {});
    let host = server.addr().to_string();
    let output = tester(&["--host", &host]);
    let text = stdout(&output);
    assert!(output.status.success(), "{text}");
    let (passed, failed, skipped) = summary(&output);
    assert_eq!((failed, skipped), (0, 0), "{text}");
    // One line per check, then the summary.
    assert_eq!(text.lines().count(), passed + 1, "{text}");
    assert!(
        text.lines()
            .all(|l| l.starts_with("PASS ") || l.contains(" passed, ")),
        "{text}"
    );
}

#[test]
fn passes_over_the_websocket_door_with_exit_status_0() {
    let server = RealServer::start_ws(2, |_| {});
    // Go style, as the server's own flags: `-ws URL`.
    let output = tester(&["-ws", &server.ws_url()]);
    let text = stdout(&output);
    assert!(output.status.success(), "{text}");
    let (passed, failed, skipped) = summary(&output);
    assert_eq!((failed, skipped), (0, 0), "{text}");
    assert_eq!(text.lines().count(), passed + 1, "{text}");
}

#[test]
fn accepts_the_original_testers_go_style_flags() {
    let server = RealServer::start(1, |_| {});
    let host = server.addr().to_string();
    let output = tester(&["-host", &host, "-compat", "-timeout-ms=5000"]);
    assert!(output.status.success(), "{}", stdout(&output));
    let (_, failed, skipped) = summary(&output);
    assert_eq!((failed, skipped), (0, 5));
}

#[test]
fn json_report_is_machine_readable() {
    let server = RealServer::start(2, |_| {});
    let host = server.addr().to_string();
    let output = tester(&["--host", &host, "--json"]);
    assert!(output.status.success());
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(report["failed"], 0);
    assert_eq!(report["compat"], false);
    let checks = report["checks"].as_array().expect("checks");
    assert_eq!(checks.len() as u64, report["passed"].as_u64().unwrap());
    assert!(checks.iter().all(|c| c["status"] == "pass"), "{report}");
    assert!(report["prefix"]
        .as_str()
        .unwrap()
        .starts_with("glockd-tester:"));
}

#[test]
fn a_failed_check_makes_the_exit_status_1() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fake = runtime.block_on(Fake::start(Faults {
        reget_answers_0: true,
        ..Faults::default()
    }));
    let host = fake.addr.to_string();
    let output = tester(&["--host", &host, "--timeout-ms", "300"]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL exclusive_reget_answers_1: ")),
        "{text}"
    );
    assert_eq!(summary(&output).1, 1, "{text}");
    drop(fake);
}

#[test]
fn an_unreachable_server_is_a_failure() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let output = tester(&["--host", &addr.to_string(), "--timeout-ms", "300"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stdout(&output).starts_with("FAIL connect: "),
        "{}",
        stdout(&output)
    );
}

#[test]
fn bad_flags_are_a_usage_error() {
    assert_eq!(tester(&["--no-such-flag"]).status.code(), Some(2));
    assert_eq!(tester(&["--timeout-ms", "0"]).status.code(), Some(2));
    // The tester's websocket door is plain `ws://`; anything else is refused before any check
    // runs (TLS is `--tls`, to the line door).
    for url in [
        "http://127.0.0.1:9998/",
        "127.0.0.1:9998",
        "wss://127.0.0.1:9998/",
    ] {
        let output = tester(&["--ws", url]);
        assert_eq!(output.status.code(), Some(2), "{url}");
    }
    let output = tester(&["--ws", "wss://127.0.0.1:9998/"]);
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(error.contains("wss:// is not supported"), "{error}");
    // TLS needs a CA, and a CA file that is not there is one line before any check.
    assert_eq!(tester(&["--tls"]).status.code(), Some(2));
    let output = tester(&["--tls", "--ca", "/nonexistent/ca.pem"]);
    assert_eq!(output.status.code(), Some(2));
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.starts_with("glockd-tester: /nonexistent/ca.pem"),
        "{error}"
    );
    // One door at a time.
    let both = ["--ws", "ws://127.0.0.1:9998/", "--unix", "/tmp/glockd.sock"];
    assert_eq!(tester(&both).status.code(), Some(2));
    assert_eq!(tester(&["--help"]).status.code(), Some(0));
}
