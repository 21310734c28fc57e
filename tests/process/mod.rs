//! What the tests that run the `glockd` binary share: free ports, fresh scratch directories,
//! waiting until a started server says it listens, and one-shot exchanges with it.

#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

/// How long a one-shot exchange waits for the server's next bytes before failing the test.
const ASK_TIMEOUT: Duration = Duration::from_secs(20);

/// Sends `commands` on a new TCP connection to the server on loopback `port`, half-closes it,
/// and returns every reply until the server closes it (its locks then released).
pub fn ask(port: u16, commands: &str) -> String {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(ASK_TIMEOUT)).expect("timeout");
    exchange(stream, |s| s.shutdown(Shutdown::Write), commands)
}

/// [`ask`] over the unix socket at `path`.
pub fn ask_unix(path: &Path, commands: &str) -> String {
    let stream = UnixStream::connect(path).expect("connect unix");
    stream.set_read_timeout(Some(ASK_TIMEOUT)).expect("timeout");
    exchange(stream, |s| s.shutdown(Shutdown::Write), commands)
}

/// Writes `commands`, shuts the writing side with `half_close`, reads to the end.
fn exchange<S: Read + Write>(
    mut stream: S,
    half_close: impl FnOnce(&S) -> io::Result<()>,
    commands: &str,
) -> String {
    stream.write_all(commands.as_bytes()).expect("write");
    half_close(&stream).expect("half-close");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read");
    reply
}

/// A TCP port nobody listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A fresh, empty directory for one test of `suite`.
pub fn temp_dir(suite: &str, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("glockd-{suite}-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Reads the child's stderr (piped) until its "listening on tcp" line and returns the lines
/// before it (warnings, notes); stderr is then drained on a thread of its own, so the server
/// never blocks on it.
pub fn wait_until_listening(child: &mut Child) -> Vec<String> {
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let mut before = Vec::new();
    loop {
        let line = lines.next().expect("a line").expect("read stderr");
        if line.contains("listening on tcp") {
            break;
        }
        before.push(line);
        assert!(before.len() < 10, "no listening line: {before:?}");
    }
    std::thread::spawn(move || lines.for_each(drop));
    before
}
