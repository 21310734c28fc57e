//! Shared test harness: a real server on an ephemeral loopback port, and a raw client that
//! asserts exact bytes.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use glockd::{Config, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long any single expected reply may take before the test fails (a hang is a failure, not
/// a timing assertion).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// A server running in this process, stopped when dropped.
pub struct TestServer {
    handle: Option<ServerHandle>,
    pub addr: SocketAddr,
}

impl TestServer {
    pub fn start(shards: u16) -> Self {
        Self::start_with(shards, |_| {})
    }

    pub fn start_with(shards: u16, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config {
            shards: Some(shards),
            pin: false,
            ..Config::default()
        };
        tweak(&mut config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let handle = glockd::start_with(config, Some(listener)).expect("server starts");
        let addr = handle.tcp_addr().expect("tcp enabled");
        TestServer {
            handle: Some(handle),
            addr,
        }
    }

    pub async fn connect(&self) -> Raw {
        Raw::connect(self.addr).await
    }

    pub async fn client(&self) -> glockd::client::Client {
        glockd::client::Client::connect(self.addr)
            .await
            .expect("connect")
    }

    /// The stats read in-process (the same cells `q` reads).
    pub fn stats(&self) -> glockd::stats::Snapshot {
        self.handle.as_ref().expect("running").stats()
    }

    /// Waits (bounded) until `done(stats)` holds; panics with the last stats otherwise.
    pub async fn wait_for_stats(&self, what: &str, done: impl Fn(&BTreeMap<String, u64>) -> bool) {
        let mut client = self.client().await;
        wait_for_stats_on(&mut client, what, done).await
    }
}

async fn wait_for_stats_on(
    client: &mut glockd::client::Client,
    what: &str,
    done: impl Fn(&BTreeMap<String, u64>) -> bool,
) {
    let deadline = Instant::now() + REPLY_TIMEOUT;
    loop {
        let stats = client.stats().await.expect("q");
        if done(&stats) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown();
        }
    }
}

/// A raw protocol connection.
pub struct Raw {
    pub stream: TcpStream,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Raw { stream }
    }

    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream
            .write_all(bytes.as_ref())
            .await
            .expect("write to server");
    }

    /// Reads exactly `expected.len()` bytes and asserts they are `expected` (on a timeout, shows
    /// what did arrive).
    pub async fn expect(&mut self, expected: impl AsRef<[u8]>) {
        let expected = expected.as_ref();
        let mut got = Vec::with_capacity(expected.len());
        let deadline = tokio::time::Instant::now() + REPLY_TIMEOUT;
        while got.len() < expected.len() {
            let mut chunk = vec![0u8; expected.len() - got.len()];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Err(_) => break,
                Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => panic!("read reply: {e}"),
            }
        }
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(expected)
        );
    }

    /// Sends `command` and asserts the exact reply bytes.
    pub async fn check(&mut self, command: &str, reply: &str) {
        self.send(command).await;
        self.expect(reply).await;
    }

    /// Reads one line (with its `\n`).
    pub async fn line(&mut self) -> String {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            tokio::time::timeout(REPLY_TIMEOUT, self.stream.read_exact(&mut byte))
                .await
                .expect("reply in time")
                .expect("read reply");
            line.push(byte[0]);
            if byte[0] == b'\n' {
                return String::from_utf8_lossy(&line).into_owned();
            }
        }
    }

    /// Asserts the server sends nothing more and closes the connection.
    pub async fn expect_closed(&mut self) {
        let mut rest = Vec::new();
        tokio::time::timeout(REPLY_TIMEOUT, self.stream.read_to_end(&mut rest))
            .await
            .expect("server closes in time")
            .expect("read to end");
        assert!(
            rest.is_empty(),
            "unexpected bytes: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }

    /// `q` over this connection.
    pub async fn stats(&mut self) -> BTreeMap<String, u64> {
        self.send("q\n").await;
        let mut stats = BTreeMap::new();
        loop {
            let line = self.line().await;
            let (key, value) = line.trim_end().split_once(": ").expect("a stats line");
            stats.insert(key.to_owned(), value.parse().expect("a number"));
            if key == "shared_orphans" {
                return stats;
            }
        }
    }

    /// This connection's protocol id (`ip:port`), as the server sees it.
    pub fn id(&self) -> String {
        self.stream.local_addr().expect("local addr").to_string()
    }

    /// Closes with a TCP reset instead of a FIN.
    pub fn reset(self) {
        let std = self.stream.into_std().expect("into std");
        socket2::SockRef::from(&std)
            .set_linger(Some(Duration::ZERO))
            .expect("linger 0");
        drop(std);
    }
}

/// Generates `mod shards_1 { #[tokio::test] fn name() }` and the same for 4 shards, for every
/// listed `async fn name(shards: u16)`: every behaviour is checked with one shard (everything
/// local) and with several (most commands cross a mailbox).
#[macro_export]
macro_rules! for_each_shard_count {
    ($($name:ident),* $(,)?) => {
        mod shards_1 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(1).await
                }
            )*
        }
        mod shards_4 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(4).await
                }
            )*
        }
    };
}
