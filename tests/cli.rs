//! The `glockd` binary: Go-style command lines, the pidfile, and signals.

mod process;

use process::{ask, ask_unix, free_port, temp_dir};

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_glockd");
/// A running `glockd` process, killed if the test fails.
struct Glockd {
    child: Option<Child>,
}

impl Glockd {
    /// Starts the binary on loopback, with 2 unpinned shards, no websocket door and no
    /// metrics, and waits for its "listening" line.
    fn start(args: &[&str]) -> Glockd {
        let mut all = vec![
            "-bind",
            "127.0.0.1",
            "-pin=false",
            "-shards",
            "2",
            "-ws=0",
            "-metrics=off",
        ];
        all.extend_from_slice(args);
        Glockd::start_exact(&all)
    }

    /// Starts the binary with exactly `args` (a flag may be given only once) and waits for its
    /// "listening" line.
    fn start_exact(args: &[&str]) -> Glockd {
        let mut child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn glockd");
        // Warnings (a low open-file limit, say) may come first.
        process::wait_until_listening(&mut child);
        Glockd { child: Some(child) }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    /// Sends `signal` and waits (bounded) for the exit code.
    fn stop_with(self, signal: Signal) -> Option<i32> {
        kill(self.pid(), signal).expect("signal");
        self.exit_code()
    }

    /// Whether the process is still running.
    fn running(&mut self) -> bool {
        let child = self.child.as_mut().expect("started");
        child.try_wait().expect("wait").is_none()
    }

    /// Waits (bounded) for the process to end, and returns its exit code.
    fn exit_code(mut self) -> Option<i32> {
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
        "--tls-port",
        "--tls-ws",
        "--tls-cert",
        "--tls-key",
        "--tls-client-ca",
        "--tls-handshake-timeout",
        "--max-tls-handshakes",
        "--users",
        "--auth-fail-delay-ms",
        "--auth-max-failures",
        "glockd hash-token",
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
    let dir = temp_dir("cli", "go-style");
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
    let dir = temp_dir("cli", "pidfile");
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
fn a_pidfile_that_is_a_symbolic_link_is_refused_and_its_target_untouched() {
    let dir = temp_dir("cli", "pidfile-link");
    let target = dir.join("precious.conf");
    std::fs::write(&target, "keep me\n").expect("target written");
    let link = dir.join("glockd.pid");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&target, &link).expect("symlink");

    let refused = Command::new(BIN)
        .args([
            "-bind",
            "127.0.0.1",
            "-ws=0",
            "-metrics=off",
            "-pidfile",
            link.to_str().unwrap(),
            "-port",
            &free_port().to_string(),
        ])
        .output()
        .expect("run");
    assert!(
        !refused.status.success(),
        "started through a symlinked pidfile"
    );
    let reason = String::from_utf8_lossy(&refused.stderr);
    assert!(
        reason.contains("symbolic link"),
        "no reason given: {reason}"
    );
    assert_eq!(
        reason.trim().lines().count(),
        1,
        "one-line reason: {reason}"
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me\n");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link is left alone"
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
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot start: -port {port}: ")),
        "{stderr}"
    );
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

/// Sends `command` as one websocket message and returns the text of the next `replies`
/// messages.
fn ask_ws(port: u16, command: &str, replies: usize) -> Vec<String> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/"))
            .await
            .expect("websocket handshake");
        ws.send(Message::text(command)).await.expect("send");
        let mut got = Vec::new();
        while got.len() < replies {
            let message = tokio::time::timeout(Duration::from_secs(20), ws.next())
                .await
                .expect("a reply in time")
                .expect("the connection stays open")
                .expect("a message");
            got.push(message.into_text().expect("text").to_string());
        }
        got
    })
}

/// Runs the binary with `args` (and every door off, should it start after all), expecting it
/// to exit at once; its exit code and stderr. A server that starts is killed and fails the
/// test instead of hanging it.
fn run_refused(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(["-bind", "127.0.0.1", "-port=0", "-ws=0", "-metrics=off"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn glockd");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} was accepted: the server started");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    (status.code(), stderr)
}

/// Every numeric flag, with the values just outside its range. Each must be refused before
/// anything starts: exit status 2 and one line on stderr naming the flag.
#[test]
fn numeric_flags_out_of_range_are_refused_in_one_line() {
    let refused: &[(&str, &[&str])] = &[
        ("port", &["65536"]),
        ("ws", &["65536"]),
        ("unix-mode", &["10000"]),
        ("shards", &["0", "1025"]),
        ("max-line-bytes", &["63", "1073741825"]),
        ("max-unsent-bytes", &["4095", "1099511627777"]),
        (
            "max-client-buffers",
            &["1", "1048575", "1023KiB", "1025GiB", "2TiB", "1.5MiB"],
        ),
        ("max-connections", &["0", "1073741825"]),
        ("max-locks-per-conn", &["-1", "18446744073709551616"]),
        ("max-lock-name-bytes", &["0", "1073741825"]),
        (
            "max-memory",
            &["1", "1048575", "1125899906842625", "2048TiB", "12MB", "-1"],
        ),
        ("write-timeout", &["31536001"]),
        ("idle-timeout", &["31536001", "18446744073709551615"]),
        ("keepalive-idle", &["32768"]),
        ("keepalive-interval", &["0", "32768"]),
        ("keepalive-count", &["0", "128"]),
        ("shutdown-timeout", &["31536001"]),
        ("max-wait-ms", &["31536000001"]),
        ("tls-port", &["65536"]),
        ("tls-ws", &["65536"]),
        ("tls-handshake-timeout", &["0", "301"]),
        ("max-tls-handshakes", &["0", "1073741825"]),
        ("auth-fail-delay-ms", &["10001", "-1"]),
        ("auth-max-failures", &["0", "1001"]),
    ];
    for (flag, values) in refused {
        for value in *values {
            // `-flag=value`: a value starting with `-` is still the flag's value.
            let arg = format!("-{flag}={value}");
            let (code, stderr) = run_refused(&[&arg]);
            assert_eq!(code, Some(2), "{arg}: {stderr}");
            assert_eq!(stderr.trim_end().lines().count(), 1, "{arg}: {stderr}");
            assert!(
                stderr.starts_with("glockd: ") && stderr.contains(&format!("--{flag}")),
                "{arg}: {stderr}"
            );
        }
    }
    // Each in range, but together past what the kernel takes as the time to give up on a
    // silent peer (TCP_USER_TIMEOUT): every connection would log an error.
    let (code, stderr) = run_refused(&[
        "-keepalive-idle=32767",
        "-keepalive-interval=32767",
        "-keepalive-count=127",
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--keepalive-count"), "{stderr}");
}

/// The lowest value of every numeric flag at once: the server starts and serves, over TCP and
/// over websockets (whose write buffer must fit under 4 KiB of unread replies).
#[test]
fn every_numeric_flag_at_its_lowest_starts_and_serves() {
    let (port, ws) = (free_port(), free_port());
    let (port_arg, ws_arg) = (port.to_string(), ws.to_string());
    let server = Glockd::start_exact(&[
        "-bind",
        "127.0.0.1",
        "-pin=false",
        "-metrics=off",
        "-port",
        &port_arg,
        "-ws",
        &ws_arg,
        "-shards",
        "1",
        "-max-line-bytes",
        "64",
        "-max-unsent-bytes",
        "4096",
        "-max-client-buffers",
        "1MiB",
        "-max-connections",
        "1",
        "-max-locks-per-conn",
        "0",
        "-max-lock-name-bytes",
        "1",
        "-max-memory",
        "1048576",
        "-write-timeout",
        "0",
        "-idle-timeout",
        "0",
        "-keepalive-idle",
        "1",
        "-keepalive-interval",
        "1",
        "-keepalive-count",
        "1",
        "-shutdown-timeout",
        "0",
        "-max-wait-ms",
        "0",
        "-auth-fail-delay-ms",
        "0",
        "-auth-max-failures",
        "1",
    ]);
    assert_eq!(
        ask(port, "g x\ngw 0 y\ni x\n"),
        "1 Got Lock\n1 Got Lock\n1 Locked\n"
    );
    // One connection at a time: the TCP one's place is given back when it closes.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if ask(port, "i x\n") == "0 Not Locked\n" {
            break;
        }
        assert!(Instant::now() < deadline, "the first connection never left");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(ask_ws(ws, "g x\ni x", 2), ["1 Got Lock\n", "1 Locked\n"]);
    assert_eq!(server.stop_with(Signal::SIGTERM), Some(0));
}

/// The highest value of every numeric flag at once (timeouts of a year, the idle timeout
/// included): the server starts, serves, and shuts down.
#[test]
fn every_numeric_flag_at_its_highest_starts_and_serves() {
    let port = free_port();
    let port_arg = port.to_string();
    let server = Glockd::start(&[
        "-port",
        &port_arg,
        "-max-line-bytes",
        "1073741824",
        "-max-unsent-bytes",
        "1099511627776",
        "-max-client-buffers",
        "1TiB",
        "-max-connections",
        "1073741824",
        "-max-locks-per-conn",
        "18446744073709551615",
        "-max-lock-name-bytes",
        "1073741824",
        "-max-memory",
        "1024TiB",
        "-write-timeout",
        "31536000",
        "-idle-timeout",
        "31536000",
        "-keepalive-idle",
        "32767",
        "-keepalive-interval",
        "32767",
        // The three keepalive flags also add up to at most 2147483 s (checked below).
        "-keepalive-count",
        "64",
        "-shutdown-timeout",
        "31536000",
        "-max-wait-ms",
        "31536000000",
        "-auth-fail-delay-ms",
        "10000",
        "-auth-max-failures",
        "1000",
    ]);
    assert_eq!(
        ask(port, "g x\ngw 31536000000 y\nsgw 31536000000 1 z\ni x\n"),
        "1 Got Lock\n1 Got Lock\n1 Got Shared Lock\n1 Locked\n"
    );
    assert_eq!(server.stop_with(Signal::SIGTERM), Some(0));
    // The most shards start too (parsing alone is checked in the unit tests; this starts them).
    let port = free_port();
    let port_arg = port.to_string();
    let server = Glockd::start_exact(&[
        "-bind",
        "127.0.0.1",
        "-pin=false",
        "-ws=0",
        "-metrics=off",
        "-port",
        &port_arg,
        "-shards",
        "1024",
        "-keepalive-count",
        "127",
    ]);
    assert_eq!(ask(port, "g x\ni x\n"), "1 Got Lock\n1 Locked\n");
    assert_eq!(server.stop_with(Signal::SIGTERM), Some(0));
}

/// Unread websocket replies bounded below the websocket library's own 128 KiB write buffer:
/// every connection used to panic in the library's configuration check.
#[test]
fn a_small_max_unsent_bytes_serves_websockets() {
    let (port, ws) = (free_port(), free_port());
    let (port_arg, ws_arg) = (port.to_string(), ws.to_string());
    let server = Glockd::start_exact(&[
        "-bind",
        "127.0.0.1",
        "-pin=false",
        "-shards",
        "2",
        "-metrics=off",
        "-keepalive-idle",
        "0",
        "-port",
        &port_arg,
        "-ws",
        &ws_arg,
        "-max-unsent-bytes",
        "65536",
    ]);
    assert_eq!(ask_ws(ws, "g x", 1), ["1 Got Lock\n"]);
    // 3000 replies to one message: past the 32 KiB at which the door starts writing, within
    // the 64 KiB limit.
    let many: Vec<String> = (0..3000).map(|i| format!("g many-{i}")).collect();
    let replies = ask_ws(ws, &many.join("\n"), 3000);
    assert!(replies.iter().all(|r| r == "1 Got Lock\n"), "{replies:?}");
    assert_eq!(ask(port, "i x\n"), "0 Not Locked\n", "x was orphaned");
    assert_eq!(server.stop_with(Signal::SIGTERM), Some(0));
}

/// An operator removed a running server's unix socket and pidfile, and a second server made its
/// own on the same paths: the first one's clean exit leaves them to the second, which keeps its
/// unix door and its pidfile lock (a third server on the pidfile is still refused).
#[test]
fn a_clean_exit_leaves_files_that_now_belong_to_another_server() {
    let dir = temp_dir("cli", "successor");
    let (socket, pidfile) = (dir.join("glockd.sock"), dir.join("glockd.pid"));
    let (s, f) = (socket.to_str().unwrap(), pidfile.to_str().unwrap());
    let first = Glockd::start(&["-unix", s, "-pidfile", f, "-port", &free_port().to_string()]);
    std::fs::remove_file(&socket).expect("socket removed");
    std::fs::remove_file(&pidfile).expect("pidfile removed");
    let second = Glockd::start(&["-unix", s, "-pidfile", f, "-port", &free_port().to_string()]);
    assert_eq!(first.stop_with(Signal::SIGTERM), Some(0));

    assert!(socket.exists(), "the second server's socket was removed");
    assert_eq!(ask_unix(&socket, "i x\n"), "0 Not Locked\n");
    assert_eq!(
        std::fs::read_to_string(&pidfile).expect("the second server's pidfile"),
        second.pid().to_string()
    );
    let (code, stderr) = run_refused(&["-pidfile", f]);
    assert_eq!(code, Some(4), "{stderr}");
    assert!(stderr.contains("pidfile"), "{stderr}");

    // The second server's own exit removes both.
    assert_eq!(second.stop_with(Signal::SIGTERM), Some(0));
    assert!(!socket.exists() && !pidfile.exists());
    let _ = std::fs::remove_dir_all(dir);
}

/// A rolling restart on one unix socket: the old server, still draining a client that does not
/// read its replies, has closed its doors; the new one finds nobody answering on the socket,
/// replaces it and serves there. The old server's exit leaves the new one's socket in place.
#[test]
fn a_draining_server_leaves_the_socket_its_successor_bound() {
    use std::io::Write;
    let dir = temp_dir("cli", "rolling");
    let socket = dir.join("glockd.sock");
    let s = socket.to_str().unwrap();
    let port = free_port();
    let mut first = Glockd::start(&[
        "-unix",
        s,
        "-shutdown-timeout",
        "4",
        "-port",
        &port.to_string(),
    ]);

    // A client whose listing (64 locks with 200 KB names, about 13 MB) far outgrows what the
    // kernel's socket buffers take: unread, it holds the drain for the whole shutdown timeout.
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut batch = Vec::new();
    for k in 0..64 {
        batch.extend_from_slice(format!("g {k:03}").as_bytes());
        batch.extend(std::iter::repeat_n(b'n', 200_000));
        batch.push(b'\n');
    }
    slow.write_all(&batch).expect("write locks");
    let mut granted = vec![0u8; 64 * "1 Got Lock\n".len()];
    slow.read_exact(&mut granted).expect("grants");
    assert!(String::from_utf8_lossy(&granted)
        .lines()
        .all(|l| l == "1 Got Lock"));
    slow.write_all(b"d\n").expect("ask for the listing");

    kill(first.pid(), Signal::SIGTERM).expect("signal");
    // The doors close at once; the drain goes on.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        assert!(Instant::now() < deadline, "the unix door stayed open");
        std::thread::sleep(Duration::from_millis(10));
    }
    let second = Glockd::start(&["-unix", s, "-port", &free_port().to_string()]);
    assert_eq!(ask_unix(&socket, "i x\n"), "0 Not Locked\n");
    assert!(
        first.running(),
        "the old server did not wait for its slow client"
    );
    // Out of time for the slow client, the old server closes it and exits.
    assert_eq!(first.exit_code(), Some(0));
    drop(slow);

    assert!(socket.exists(), "the new server's socket was removed");
    assert_eq!(ask_unix(&socket, "i x\n"), "0 Not Locked\n");
    assert_eq!(second.stop_with(Signal::SIGTERM), Some(0));
    assert!(!socket.exists());
    let _ = std::fs::remove_dir_all(dir);
}

/// A mistyped Go-style flag is named whole in the one line, with the flag meant when there is
/// one; a negative number is that flag's invalid value, not an unknown flag.
#[test]
fn a_mistyped_flag_is_named_whole() {
    let cases: &[(&[&str], &str)] = &[
        (&["-pidfle", "x"], "'--pidfle'"),
        (&["-verbos"], "'--verbos'"),
        (&["-max-conections", "5"], "'--max-conections'"),
        (&["-bogus"], "'--bogus'"),
        (&["-bogus=1"], "'--bogus'"),
    ];
    for (args, named) in cases {
        let (code, stderr) = run_refused(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("glockd: ") && stderr.contains(named),
            "{args:?}: {stderr}"
        );
    }
    let (_, stderr) = run_refused(&["-pidfle", "x"]);
    assert!(stderr.contains("'--pidfile'"), "no suggestion: {stderr}");

    for args in [
        &["-max-connections-per-ip", "-1"][..],
        &["--max-connections-per-ip", "-1"][..],
        &["-max-connections-per-ip=-1"][..],
    ] {
        let (code, stderr) = run_refused(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains("invalid value '-1'") && stderr.contains("--max-connections-per-ip"),
            "{args:?}: {stderr}"
        );
    }
}
