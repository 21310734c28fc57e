//! What the tests that run the `glockd` binary share: free ports, fresh scratch directories,
//! and waiting until a started server says it listens.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Child;

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
