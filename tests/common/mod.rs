//! Shared test harness: a real server on ephemeral loopback doors, and a raw client of any
//! transport that asserts exact bytes.
#![allow(dead_code)]

pub mod model;
pub mod pki;
pub mod transport;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use glockd::{Config, Listeners, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use transport::{Stream, Transport};

/// How long any single expected reply may take before the test fails (a hang is a failure, not
/// a timing assertion).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// How a test server is set up: its shard count, and the door test connections use.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    pub shards: u16,
    pub transport: Transport,
}

impl From<u16> for Setup {
    fn from(shards: u16) -> Self {
        Setup {
            shards,
            transport: Transport::Tcp,
        }
    }
}

/// A server running in this process, stopped when dropped. It always listens on TCP (used by
/// the stats helpers); test connections use the setup's transport.
pub struct TestServer {
    handle: Option<ServerHandle>,
    pub addr: SocketAddr,
    pub ws_addr: Option<SocketAddr>,
    pub tls_addr: Option<SocketAddr>,
    pub tls_ws_addr: Option<SocketAddr>,
    pub unix_path: Option<PathBuf>,
    pub transport: Transport,
    /// Unix connections made so far: the server numbers them `unix:1`, `unix:2`… in order.
    unix_connections: AtomicU64,
}

static SOCKETS: AtomicU64 = AtomicU64::new(0);

/// A fresh unix socket path for this test process.
pub fn socket_path() -> PathBuf {
    std::env::temp_dir().join(format!(
        "glockd-test-{}-{}.sock",
        std::process::id(),
        SOCKETS.fetch_add(1, Ordering::Relaxed)
    ))
}

impl TestServer {
    pub fn start(setup: impl Into<Setup>) -> Self {
        Self::start_with(setup, |_| {})
    }

    pub fn start_with(setup: impl Into<Setup>, tweak: impl FnOnce(&mut Config)) -> Self {
        let setup = setup.into();
        Self::start_doors(setup, &[setup.transport], tweak)
    }

    /// A server with every door open; test connections default to `setup.transport`.
    pub fn start_all_doors(setup: impl Into<Setup>, tweak: impl FnOnce(&mut Config)) -> Self {
        let setup = setup.into();
        Self::start_doors(
            setup,
            &[Transport::Tcp, Transport::Unix, Transport::Ws],
            tweak,
        )
    }

    fn start_doors(setup: Setup, doors: &[Transport], tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config {
            shards: Some(setup.shards),
            pin: false,
            ..Config::default()
        };
        if doors
            .iter()
            .any(|d| matches!(d, Transport::Tls | Transport::Wss))
        {
            let (_, server) = pki::shared();
            config.tls_cert = Some(server.cert.clone());
            config.tls_key = Some(server.key.clone());
        }
        tweak(&mut config);
        let bind = || std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let mut listeners = Listeners {
            tcp: Some(bind()),
            ..Listeners::default()
        };
        for door in doors {
            match door {
                Transport::Tcp => {}
                Transport::Ws => listeners.ws = Some(bind()),
                Transport::Tls => listeners.tls = Some(bind()),
                Transport::Wss => listeners.tls_ws = Some(bind()),
                Transport::Unix => {
                    let path = socket_path();
                    let listener = glockd::doors::bind_unix(&path, 0o600).expect("bind unix");
                    listeners.unix = Some((listener, path));
                }
            }
        }
        let handle = glockd::start_with_listeners(config, listeners).expect("server starts");
        TestServer {
            addr: handle.tcp_addr().expect("tcp enabled"),
            ws_addr: handle.ws_addr(),
            tls_addr: handle.tls_addr(),
            tls_ws_addr: handle.tls_ws_addr(),
            unix_path: handle.unix_path().map(PathBuf::from),
            transport: setup.transport,
            unix_connections: AtomicU64::new(0),
            handle: Some(handle),
        }
    }

    /// A raw connection through the setup's door.
    pub async fn connect(&self) -> Raw {
        self.connect_via(self.transport).await
    }

    /// A raw connection through a given door (which this server must have).
    pub async fn connect_via(&self, transport: Transport) -> Raw {
        match transport {
            Transport::Tcp => Raw::connect(self.addr).await,
            Transport::Unix => {
                let path = self.unix_path.as_ref().expect("unix door");
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .expect("connect unix");
                let n = self.unix_connections.fetch_add(1, Ordering::SeqCst) + 1;
                Raw {
                    stream: Stream::Unix(stream),
                    id: format!("unix:{n}"),
                }
            }
            Transport::Ws => {
                let addr = self.ws_addr.expect("websocket door");
                let tcp = TcpStream::connect(addr).await.expect("connect ws");
                let (ws, _) = tokio_tungstenite::client_async(
                    format!("ws://{addr}/"),
                    tokio_util::either::Either::Left(tcp),
                )
                .await
                .expect("websocket handshake");
                let bytes = transport::WsBytes::new(ws);
                let id = bytes.tcp().local_addr().expect("local addr").to_string();
                Raw {
                    stream: Stream::Ws(Box::new(bytes)),
                    id,
                }
            }
            Transport::Tls => {
                let tcp = TcpStream::connect(self.tls_addr.expect("tls door"))
                    .await
                    .expect("connect tls");
                tcp.set_nodelay(true).expect("nodelay");
                let id = tcp.local_addr().expect("local addr").to_string();
                let tls = pki::client(&pki::shared().0.ca, None)
                    .connect(tcp)
                    .await
                    .expect("tls handshake");
                Raw {
                    stream: Stream::Tls(Box::new(tls)),
                    id,
                }
            }
            Transport::Wss => {
                let addr = self.tls_ws_addr.expect("wss door");
                let tcp = TcpStream::connect(addr).await.expect("connect wss");
                let id = tcp.local_addr().expect("local addr").to_string();
                let tls = pki::client(&pki::shared().0.ca, None)
                    .connect(tcp)
                    .await
                    .expect("tls handshake");
                let under = tokio_util::either::Either::Right(Box::new(tls));
                let (ws, _) = tokio_tungstenite::client_async(
                    format!("wss://localhost:{}/", addr.port()),
                    under,
                )
                .await
                .expect("websocket handshake");
                Raw {
                    stream: Stream::Ws(Box::new(transport::WsBytes::new(ws))),
                    id,
                }
            }
        }
    }

    pub async fn client(&self) -> glockd::client::Client {
        glockd::client::Client::connect(self.addr)
            .await
            .expect("connect")
    }

    /// Requests' and connections' outcomes, read in-process (what `/metrics` counts).
    pub fn outcomes(&self) -> glockd::stats::Outcomes {
        self.handle.as_ref().expect("running").outcomes()
    }

    /// The stats read in-process (the same cells `q` reads).
    pub fn stats(&self) -> glockd::stats::Snapshot {
        self.handle.as_ref().expect("running").stats()
    }

    /// Waits (bounded) until `done(stats)` holds; panics with the last stats otherwise. The
    /// connection it asks on is closed, and gone from `connections`, when it returns, so the
    /// caller's next `q` does not count it.
    pub async fn wait_for_stats(&self, what: &str, done: impl Fn(&BTreeMap<String, u64>) -> bool) {
        let mut asking = Raw::connect(self.addr).await;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let stats = asking.stats().await;
            if done(&stats) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        asking.close().await;
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
    pub stream: Stream,
    /// Its protocol id as the server shows it.
    id: String,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let id = stream.local_addr().expect("local addr").to_string();
        Raw {
            stream: Stream::Tcp(stream),
            id,
        }
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

    /// Closes the connection and waits for the server to close its side. The server counts a
    /// connection closed before it closes the socket, so once this returns, `q` no longer
    /// counts it (dropping a connection gives no such guarantee: the server may not have read
    /// the close yet when the next command arrives elsewhere).
    pub async fn close(mut self) {
        self.stream.shutdown().await.expect("half-close");
        self.expect_closed().await;
    }

    /// Reads until the server closes the connection (by FIN or reset), discarding what comes;
    /// fails if it stays open.
    pub async fn expect_closed_or_reset(&mut self) {
        let mut sink = vec![0u8; 1 << 16];
        let deadline = tokio::time::Instant::now() + REPLY_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut sink)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(_)) => {}
                Err(_) => panic!("the server kept the connection open"),
            }
        }
    }

    /// `q` over this connection.
    pub async fn stats(&mut self) -> BTreeMap<String, u64> {
        self.send("q\n").await;
        self.read_stats().await
    }

    /// Reads the reply to a `q` already sent.
    pub async fn read_stats(&mut self) -> BTreeMap<String, u64> {
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

    /// This connection's protocol id (`ip:port`, `unix:N`), as the server sees it.
    pub fn id(&self) -> String {
        self.id.clone()
    }

    /// Vanishes without a goodbye: a TCP reset (for a websocket, under it: no close frame);
    /// a unix socket just closes.
    pub fn reset(self) {
        if let Some(tcp) = self.stream.tcp() {
            socket2::SockRef::from(tcp)
                .set_linger(Some(Duration::ZERO))
                .expect("linger 0");
        }
        drop(self);
    }
}

/// Generates, for every listed `async fn name(setup: Setup)`, a test per door (TCP, unix socket,
/// websocket) and per shard count (1: everything local; 4: most commands cross a mailbox), and
/// over TLS (with one shard) and secure websockets (with four).
#[macro_export]
macro_rules! for_each_transport {
    ($($name:ident),* $(,)?) => {
        $crate::for_each_transport!(@mod tcp_1, Tcp, 1; $($name),*);
        $crate::for_each_transport!(@mod tcp_4, Tcp, 4; $($name),*);
        $crate::for_each_transport!(@mod unix_1, Unix, 1; $($name),*);
        $crate::for_each_transport!(@mod unix_4, Unix, 4; $($name),*);
        $crate::for_each_transport!(@mod ws_1, Ws, 1; $($name),*);
        $crate::for_each_transport!(@mod ws_4, Ws, 4; $($name),*);
        $crate::for_each_transport!(@mod tls_1, Tls, 1; $($name),*);
        $crate::for_each_transport!(@mod wss_4, Wss, 4; $($name),*);
    };
    (@mod $module:ident, $transport:ident, $shards:expr; $($name:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::common::Setup {
                        shards: $shards,
                        transport: super::common::Transport::$transport,
                    })
                    .await
                }
            )*
        }
    };
}

/// Like `for_each_transport!`, for behaviour of byte streams only (TCP, unix sockets and TLS):
/// how a line split over writes, or input ending without a newline, is read.
#[macro_export]
macro_rules! for_each_byte_stream {
    ($($name:ident),* $(,)?) => {
        $crate::for_each_transport!(@mod tcp_1, Tcp, 1; $($name),*);
        $crate::for_each_transport!(@mod tcp_4, Tcp, 4; $($name),*);
        $crate::for_each_transport!(@mod unix_1, Unix, 1; $($name),*);
        $crate::for_each_transport!(@mod unix_4, Unix, 4; $($name),*);
        $crate::for_each_transport!(@mod tls_4, Tls, 4; $($name),*);
    };
}

/// Generates `mod shards_1` and `mod shards_4` tests for every listed `async fn name(setup:
/// Setup)`, with TCP as the default door.
#[macro_export]
macro_rules! for_each_shard_count_setup {
    ($($name:ident),* $(,)?) => {
        $crate::for_each_transport!(@mod shards_1, Tcp, 1; $($name),*);
        $crate::for_each_transport!(@mod shards_4, Tcp, 4; $($name),*);
    };
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
