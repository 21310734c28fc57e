//! Helpers shared by the end-to-end benches: in-process servers and a blocking pipelining client.
#![allow(dead_code)]

pub mod mutex_server;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A glockd server in this process, on an ephemeral loopback port, unpinned (the bench shares
/// the machine's cores with its client threads).
pub fn start_glockd(shards: Option<u16>) -> (glockd::ServerHandle, SocketAddr) {
    let config = glockd::Config {
        shards,
        pin: false,
        ..glockd::Config::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let server = glockd::start_with(config, Some(listener)).expect("glockd starts");
    let addr = server.tcp_addr().expect("tcp enabled");
    (server, addr)
}

/// A blocking connection that writes a whole batch at once and reads its replies.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Conn {
            stream,
            buf: vec![0; 64 * 1024],
        }
    }

    /// Sends `batch` (complete lines) and waits for `replies` reply lines; returns how many of
    /// them start with `1`.
    pub fn roundtrip(&mut self, batch: &[u8], replies: usize) -> usize {
        self.stream.write_all(batch).expect("write");
        let mut lines = 0;
        let mut ones = 0;
        let mut line_start = true;
        while lines < replies {
            let n = self.stream.read(&mut self.buf).expect("read");
            assert!(n > 0, "server closed the connection");
            for &b in &self.buf[..n] {
                if line_start && b == b'1' {
                    ones += 1;
                }
                line_start = b == b'\n';
                lines += usize::from(line_start);
            }
        }
        ones
    }
}

/// A churn window of `pipeline` commands: `g` and `r` of distinct names, in pairs, so every `g`
/// is granted and every `r` releases (a pipeline of 1 re-takes one name this connection holds).
pub fn churn_window(prefix: &str, pipeline: usize) -> Vec<u8> {
    let mut batch = Vec::new();
    if pipeline == 1 {
        batch.extend_from_slice(format!("g {prefix}-0\n").as_bytes());
        return batch;
    }
    for i in 0..pipeline / 2 {
        batch.extend_from_slice(format!("g {prefix}-{i:08}\nr {prefix}-{i:08}\n").as_bytes());
    }
    batch
}

/// `conns` client threads, each on its own connection, each sending `windows` churn windows of
/// `pipeline` commands and waiting for their replies; returns the wall time of the whole.
pub fn churn(addr: SocketAddr, conns: usize, windows: u64, pipeline: usize) -> Duration {
    // Fresh names for every call: the connections of the previous call are closed, but their
    // locks are released by the server asynchronously, and may still be held.
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let barrier = std::sync::Barrier::new(conns + 1);
    std::thread::scope(|scope| {
        for c in 0..conns {
            let barrier = &barrier;
            scope.spawn(move || {
                let mut conn = Conn::connect(addr);
                let batch = churn_window(&format!("c{call}-{c:03}"), pipeline);
                let expect = pipeline.max(1);
                barrier.wait();
                for _ in 0..windows {
                    let ones = conn.roundtrip(&batch, expect);
                    assert_eq!(ones, expect, "every command of a churn window succeeds");
                }
                barrier.wait();
            });
        }
        barrier.wait();
        let start = Instant::now();
        barrier.wait();
        start.elapsed()
    })
}

/// Names owned by shard 0 (served inline for the server's first connection, which lives on
/// shard 0) and names owned by other shards (served through a mailbox), `count` of each.
pub fn split_by_shard(server: &glockd::ServerHandle, count: usize) -> (Vec<String>, Vec<String>) {
    let (mut local, mut remote) = (Vec::new(), Vec::new());
    for i in 0.. {
        if local.len() == count && remote.len() == count {
            break;
        }
        let name = format!("probe-{i:010}");
        let side = if server.shard_of(name.as_bytes()) == 0 {
            &mut local
        } else {
            &mut remote
        };
        if side.len() < count {
            side.push(name);
        }
    }
    (local, remote)
}

/// A glockd server in this process with its websocket door on an ephemeral loopback port.
pub fn start_glockd_ws(shards: Option<u16>) -> (glockd::ServerHandle, SocketAddr) {
    let config = glockd::Config {
        shards,
        pin: false,
        ..glockd::Config::default()
    };
    let listeners = glockd::Listeners {
        ws: Some(TcpListener::bind("127.0.0.1:0").expect("bind loopback")),
        ..glockd::Listeners::default()
    };
    let server = glockd::start_with_listeners(config, listeners).expect("glockd starts");
    let addr = server.ws_addr().expect("websockets enabled");
    (server, addr)
}

/// Like [`churn`], over websockets: each window is one message of `pipeline` commands (one
/// command per message when `pipeline` is 1), answered by one message per command.
pub fn ws_churn(addr: SocketAddr, conns: usize, windows: u64, pipeline: usize) -> Duration {
    use tokio_tungstenite::tungstenite::{client, Message};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let barrier = std::sync::Barrier::new(conns + 1);
    std::thread::scope(|scope| {
        for c in 0..conns {
            let barrier = &barrier;
            scope.spawn(move || {
                let stream = TcpStream::connect(addr).expect("connect");
                stream.set_nodelay(true).expect("nodelay");
                let url = format!("ws://{addr}/");
                let (mut ws, _) = client::client(url.as_str(), stream).expect("handshake");
                let batch = churn_window(&format!("w{call}-{c:03}"), pipeline);
                let batch = String::from_utf8(batch).expect("ASCII");
                let expect = pipeline.max(1);
                barrier.wait();
                for _ in 0..windows {
                    ws.send(Message::text(batch.as_str())).expect("send");
                    for _ in 0..expect {
                        let reply = ws.read().expect("reply");
                        assert!(reply.to_text().is_ok_and(|t| t.starts_with('1')), "{reply}");
                    }
                }
                barrier.wait();
            });
        }
        barrier.wait();
        let start = Instant::now();
        barrier.wait();
        start.elapsed()
    })
}
