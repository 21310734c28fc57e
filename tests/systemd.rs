//! systemd: the shipped units pass `systemd-analyze verify`, and the binary serves the sockets
//! socket activation hands it (`LISTEN_FDS`), run through systemd's own
//! `systemd-socket-activate`, as systemd would start it from `glockd.socket`.
//!
//! The tools come with Debian's `systemd` package, which `.ci/run` installs. Each test is
//! skipped with a note when they are missing, unless GLOCKD_REQUIRE_SYSTEMD=1 (as in CI), which
//! makes a missing tool a failure.

mod process;

use process::{free_port, temp_dir};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_glockd");
const TIMEOUT: Duration = Duration::from_secs(20);

/// The path of `tool` if it is installed; a failure when it is not and GLOCKD_REQUIRE_SYSTEMD
/// is set; otherwise `None` and a note.
fn tool(tool: &str) -> Option<PathBuf> {
    let found = ["/usr/bin", "/bin", "/usr/local/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(tool))
        .find(|path| path.is_file());
    if found.is_none() {
        if std::env::var_os("GLOCKD_REQUIRE_SYSTEMD").is_some() {
            panic!("{tool} is required (GLOCKD_REQUIRE_SYSTEMD is set) but not installed");
        }
        eprintln!("skipping: {tool} is not installed (Debian package `systemd`)");
    }
    found
}

#[test]
fn the_shipped_units_verify() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    let dir = temp_dir("systemd", "verify");
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let service = std::fs::read_to_string(units.join("glockd.service")).expect("glockd.service");
    assert!(service.contains("ExecStart=/usr/local/bin/glockd "));
    // verify checks that ExecStart's program exists: point it at the binary under test.
    std::fs::write(
        dir.join("glockd.service"),
        service.replace("/usr/local/bin/glockd", BIN),
    )
    .expect("write unit");
    std::fs::copy(units.join("glockd.socket"), dir.join("glockd.socket")).expect("copy unit");
    let out = Command::new(analyze)
        .args(["verify", "--man=no", "glockd.socket", "glockd.service"])
        .current_dir(&dir)
        .output()
        .expect("run systemd-analyze");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "systemd-analyze verify: {text}");
    // verify only warns about some mistakes (an unknown key, a bad value): none are allowed.
    assert!(text.trim().is_empty(), "systemd-analyze verify: {text}");
    // The socket unit's ports are the ones the service's command line names, so every socket
    // systemd passes has its door.
    let socket = std::fs::read_to_string(units.join("glockd.socket")).expect("glockd.socket");
    for line in socket.lines().filter(|l| l.starts_with("ListenStream=")) {
        let port = line.trim_start_matches("ListenStream=").rsplit(':').next();
        let port = port.expect("a port");
        assert!(
            service.contains(&format!("-port {port} "))
                || service.contains(&format!("-ws {port} ")),
            "{line} has no door in glockd.service"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A started program, killed if the test ends (or fails) before it exits.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Reads one line from `stream` (a reply).
fn line(stream: &mut impl Read) -> String {
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while reply.last() != Some(&b'\n') {
        match stream.read(&mut byte) {
            Ok(1) => reply.push(byte[0]),
            other => panic!("no reply: {other:?} after {reply:?}"),
        }
    }
    String::from_utf8_lossy(&reply).into_owned()
}

#[test]
fn socket_activation_serves_the_passed_sockets_and_leaves_their_file() {
    let Some(activate) = tool("systemd-socket-activate") else {
        return;
    };
    let dir = temp_dir("systemd", "activation");
    let port = free_port();
    let socket = dir.join("glockd.sock");
    let tcp = format!("127.0.0.1:{port}");
    let child = Command::new(activate)
        .args(["-l", &tcp, "-l"])
        .arg(&socket)
        .arg(BIN)
        .args([
            "-port",
            &port.to_string(),
            "-ws=0",
            "-metrics",
            "off",
            "-shards",
            "2",
        ])
        .args(["-pin=false"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start systemd-socket-activate");
    let mut child = Running(child);
    let stderr = child.0.stderr.take().expect("stderr");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    // The first connection starts the server (as systemd's Accept=no socket does); it waits in
    // the socket's backlog meanwhile and is then served.
    let mut holder = loop {
        match TcpStream::connect(&tcp) {
            Ok(stream) => break stream,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    holder.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    holder.write_all(b"g held\n").expect("send");
    assert_eq!(line(&mut holder), "1 Got Lock\n");
    let mut unix = UnixStream::connect(&socket).expect("the passed unix socket");
    unix.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    unix.write_all(b"i held\ng held\n").expect("send");
    assert_eq!(line(&mut unix), "1 Locked\n");
    assert_eq!(line(&mut unix), "0 Cannot Get Lock\n");
    let start = lines_rx
        .iter()
        .find(|l| l.contains("listening on"))
        .expect("a start line");
    assert!(
        start.contains(&format!("tcp 127.0.0.1:{port}")) && start.contains("unix"),
        "{start}"
    );
    // The exec'd server has the activator's pid: SIGTERM stops it cleanly.
    let pid = Pid::from_raw(i32::try_from(child.0.id()).expect("pid"));
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let status = child.0.wait().expect("exit");
    assert!(status.success(), "{status}");
    // systemd owns the socket file, for the next start: the server leaves it.
    assert!(socket.exists(), "the passed unix socket's file was removed");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_passed_socket_without_a_door_stops_the_start_in_one_line() {
    let Some(activate) = tool("systemd-socket-activate") else {
        return;
    };
    let passed = free_port();
    let other = free_port();
    let tcp = format!("127.0.0.1:{passed}");
    let child = Command::new(activate)
        .args(["-l", &tcp])
        .arg(BIN)
        .args(["-port", &other.to_string(), "-ws=0", "-metrics", "off"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start systemd-socket-activate");
    let mut client = loop {
        match TcpStream::connect(&tcp) {
            Ok(stream) => break stream,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    client.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut rest = Vec::new();
    // Closed (or reset) without an answer: the server never started.
    let _ = client.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{rest:?}");
    let out = child.wait_with_output().expect("exit");
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    let last = text.lines().last().expect("an error line");
    assert!(
        last.contains(&format!(
            "socket activation passed a socket on 127.0.0.1:{passed}"
        )) && last.contains("no door"),
        "{text}"
    );
}
