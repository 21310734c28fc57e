//! The `glockd` binary: Go-style command lines, the pidfile, and signals.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_glockd");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("glockd-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A running `glockd` process, killed if the test fails.
struct Glockd {
    child: Option<Child>,
}

impl Glockd {
    /// Starts the binary and waits for its "listening" line.
    fn start(args: &[&str]) -> Glockd {
        let mut child = Command::new(BIN)
            .args([
                "-bind",
                "127.0.0.1",
                "-pin=false",
                "-shards",
                "2",
                "-ws=0",
                "-metrics=off",
            ])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn glockd");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        // Warnings (a low open-file limit, say) may come first.
        let mut seen = Vec::new();
        loop {
            let line = lines.next().expect("a line").expect("read stderr");
            if line.contains("listening on tcp") {
                break;
            }
            seen.push(line);
            assert!(seen.len() < 10, "no listening line: {seen:?}");
        }
        // Keep draining stderr so the server never blocks on it.
        std::thread::spawn(move || lines.for_each(drop));
        Glockd { child: Some(child) }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    /// Sends `signal` and waits (bounded) for the exit code.
    fn stop_with(mut self, signal: Signal) -> Option<i32> {
        kill(self.pid(), signal).expect("signal");
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(Instant::now() < deadline, "glockd did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Glockd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn ask(port: u16, command: &str) -> String {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream.write_all(command.as_bytes()).expect("write");
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read");
    reply
}

#[test]
fn help_lists_the_flags() {
    let out = Command::new(BIN).arg("--help").output().expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--port",
        "--bind",
        "--pidfile",
        "--registry",
        "--dump",
        "--verbose",
        "--shards",
        "--pin",
        "--state-file",
        "--token-reserve-ms",
        "--log-format",
        "--log-file",
    ] {
        assert!(
            text.contains(flag),
            "--help does not mention {flag}:\n{text}"
        );
    }
    let go_style = Command::new(BIN).arg("-help").output().expect("run");
    assert!(go_style.status.success());
}

#[test]
fn version_names_the_release_and_the_commit() {
    for flag in ["--version", "-version"] {
        let out = Command::new(BIN).arg(flag).output().expect("run");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        let expected = format!("glockd {} (commit ", env!("CARGO_PKG_VERSION"));
        assert!(text.starts_with(&expected), "{text}");
        let commit = text.trim_end().trim_start_matches(&expected);
        let commit = commit.strip_suffix(')').expect("closing parenthesis");
        assert!(
            commit == "unknown" || commit.chars().all(|c| c.is_ascii_hexdigit()),
            "{text}"
        );
    }
}

#[test]
fn bad_flags_exit_non_zero_with_a_reason() {
    let out = Command::new(BIN)
        .args(["-port", "many"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(!out.stderr.is_empty());
    let out = Command::new(BIN).arg("-nosuchflag").output().expect("run");
    assert!(!out.status.success());
}

#[test]
fn go_style_command_lines_of_the_original_work() {
    let dir = temp_dir("go-style");
    let pid = dir.join("my.pid");
    let port = free_port();
    let server = Glockd::start(&[
        "-pidfile",
        pid.to_str().unwrap(),
        "--port",
        &port.to_string(),
    ]);
    assert_eq!(ask(port, "g a\ni a\n"), "1 Got Lock\n1 Locked\n");
    assert_eq!(server.stop_with(Signal::SIGTERM), Some(0));

    let port = free_port();
    let server = Glockd::start(&[&format!("--port={port}"), "-dump=false", "-registry=false"]);
    assert_eq!(
        ask(port, "d\nwho\niam x\ng a\n"),
        "0 disabled\n0 disabled\n0 disabled\n1 Got Lock\n"
    );
    assert_eq!(server.stop_with(Signal::SIGINT), Some(0));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_second_server_on_the_same_pidfile_refuses_to_start() {
    let dir = temp_dir("pidfile");
    let pidfile = dir.join("glockd.pid");
    let path = pidfile.to_str().unwrap();
    let port = free_port();
    let first = Glockd::start(&["-pidfile", path, "-port", &port.to_string()]);
    let written = std::fs::read_to_string(&pidfile).expect("pidfile written");
    assert_eq!(written, first.pid().to_string());

    let second = Command::new(BIN)
        .args([
            "-bind",
            "127.0.0.1",
            "-pidfile",
            path,
            "-port",
            &free_port().to_string(),
        ])
        .output()
        .expect("run");
    assert!(!second.status.success());
    let reason = String::from_utf8_lossy(&second.stderr);
    assert!(reason.contains("pidfile"), "no reason given: {reason}");
    assert_eq!(
        reason.trim().lines().count(),
        1,
        "one-line reason: {reason}"
    );
    // The first server is untouched and still serving.
    assert_eq!(std::fs::read_to_string(&pidfile).unwrap(), written);
    assert_eq!(ask(port, "i x\n"), "0 Not Locked\n");

    assert_eq!(first.stop_with(Signal::SIGTERM), Some(0));
    assert!(
        !Path::new(&pidfile).exists(),
        "pidfile removed on clean exit"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sigterm_with_clients_connected_exits_cleanly() {
    use std::io::Write;
    let port = free_port();
    let server = Glockd::start(&["-port", &port.to_string()]);
    let mut holder = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    holder.write_all(b"g held\n").expect("write");
    let mut reply = [0u8; 11];
    holder.read_exact(&mut reply).expect("reply");
    assert_eq!(&reply, b"1 Got Lock\n");
    assert_eq!(server.stop_with(Signal::SIGTERM), Some(0));
    // The server closed the connection on its way out.
    holder
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = holder.read_to_end(&mut rest);
    assert!(rest.is_empty());
}

#[test]
fn an_address_in_use_is_a_startup_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = Command::new(BIN)
        .args(["-bind", "127.0.0.1", "-port", &port.to_string()])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot start"));
}

#[test]
fn a_second_signal_during_shutdown_exits_at_once() {
    use std::io::Write;
    let port = free_port();
    // A client that never reads keeps the graceful shutdown waiting for up to a minute.
    let server = Glockd::start(&[
        "-port",
        &port.to_string(),
        "-shutdown-timeout",
        "60",
        "-write-timeout",
        "0",
    ]);
    let mut stuck = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    // Many long-named locks, then a listing far bigger than the socket buffers, never read.
    let pad = "p".repeat(300);
    for chunk in 0..5 {
        let batch: String = (0..10_000)
            .map(|i| format!("g {pad}-{chunk}-{i}\n"))
            .collect();
        stuck.write_all(batch.as_bytes()).unwrap();
        let mut replies = vec![0u8; 10_000 * 11];
        stuck.read_exact(&mut replies).unwrap();
    }
    stuck.write_all(b"d\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    kill(server.pid(), Signal::SIGTERM).expect("first signal");
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(server.stop_with(Signal::SIGTERM), Some(130));
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn fencing_tokens_keep_growing_across_a_restart() {
    let token = |port: u16| -> u64 {
        let reply = ask(port, "gt fenced-across-restarts\n");
        let mut words = reply.split(' ');
        assert_eq!(words.next(), Some("1"), "{reply:?}");
        words.next().unwrap().parse().unwrap()
    };
    let port = free_port();
    let first = Glockd::start(&["-port", &port.to_string()]);
    let before = [token(port), token(port)];
    assert!(before[1] > before[0]);
    assert_eq!(first.stop_with(Signal::SIGTERM), Some(0));
    let port = free_port();
    let second = Glockd::start(&["-port", &port.to_string()]);
    let after = token(port);
    assert!(
        after > before[1],
        "{after} after a restart, {} before",
        before[1]
    );
    assert_eq!(second.stop_with(Signal::SIGTERM), Some(0));
}
