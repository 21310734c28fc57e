//! Chaos soak against the real binary: hundreds of connections doing random lock work, some
//! vanishing by RST or FIN at random moments, some never reading, while invariants are checked
//! continuously. At the end nothing is held, the connection count is back to where it started,
//! and the server's memory is back near its starting level.
//!
//! Runs about 30 s by default; set GLOCKD_SOAK_SECS for longer.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NAMES: u64 = 64;
const WORKERS: u64 = 200;
const NEVER_READERS: u64 = 10;

struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start() -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_glockd"))
            .args([
                "-bind",
                "127.0.0.1",
                "-port",
                &port.to_string(),
                "-shards",
                "2",
                "-pin=false",
                "-ws=0",
                "-metrics=off",
            ])
            .args(["-max-unsent-bytes", "65536", "-write-timeout", "2"])
            // Shard threads that poll busily instead of parking: the other tests cover parking.
            .args(["-poll-us", "20"])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn glockd");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        loop {
            let line = lines.next().expect("stderr line").unwrap();
            if line.contains("listening on tcp") {
                break;
            }
        }
        std::thread::spawn(move || lines.for_each(drop));
        Server { child, port }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Who the clients believe holds each exclusive name. A client records a grant when told
/// `1 Got Lock` and forgets it *before* it sends `r` or disconnects, so a grant to anyone else
/// while the record stands is a real double grant.
#[derive(Default)]
struct Beliefs {
    holders: Mutex<HashMap<u64, u64>>,
    violations: AtomicU64,
    grants: AtomicU64,
    commands: AtomicU64,
}

struct Conn {
    stream: tokio::io::BufReader<TcpStream>,
    held: Vec<u64>,
    id: u64,
}

async fn command(conn: &mut Conn, line: &str) -> Option<String> {
    conn.stream
        .get_mut()
        .write_all(line.as_bytes())
        .await
        .ok()?;
    let mut reply = String::new();
    match tokio::time::timeout(Duration::from_secs(20), conn.stream.read_line(&mut reply)).await {
        Ok(Ok(n)) if n > 0 => Some(reply),
        Ok(_) => None,
        Err(_) => panic!("no reply to {line:?} within 20 s: the server stalled"),
    }
}

async fn worker(
    port: u16,
    seed: u64,
    deadline: Instant,
    beliefs: Arc<Beliefs>,
    ids: Arc<AtomicU64>,
) {
    let mut rng = Rng(seed | 1);
    while Instant::now() < deadline {
        let Ok(stream) = TcpStream::connect(("127.0.0.1", port)).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let mut conn = Conn {
            stream: tokio::io::BufReader::new(stream),
            held: Vec::new(),
            id: ids.fetch_add(1, Ordering::Relaxed),
        };
        let life = 20 + rng.next() % 200;
        for _ in 0..life {
            if Instant::now() >= deadline {
                break;
            }
            let name = rng.next() % NAMES;
            let verb = ["g", "r", "i", "sg", "sr", "si"][(rng.next() % 6) as usize];
            if verb == "r" {
                if let Some(at) = conn.held.iter().position(|&n| n == name) {
                    conn.held.swap_remove(at);
                    beliefs.holders.lock().unwrap().remove(&name);
                }
            }
            let Some(reply) = command(&mut conn, &format!("{verb} n{name}\n")).await else {
                break;
            };
            beliefs.commands.fetch_add(1, Ordering::Relaxed);
            assert!(
                reply.ends_with('\n')
                    && reply
                        .split(' ')
                        .next()
                        .is_some_and(|n| n.parse::<u64>().is_ok()),
                "malformed reply {reply:?}"
            );
            if verb == "g" && reply == "1 Got Lock\n" && !conn.held.contains(&name) {
                let previous = beliefs.holders.lock().unwrap().insert(name, conn.id);
                if previous.is_some_and(|p| p != conn.id) {
                    beliefs.violations.fetch_add(1, Ordering::Relaxed);
                }
                conn.held.push(name);
                beliefs.grants.fetch_add(1, Ordering::Relaxed);
            }
            if verb == "sg" {
                let count: u64 = reply.split(' ').next().unwrap().parse().unwrap();
                assert!(
                    (1..=WORKERS).contains(&count),
                    "impossible holder count {count}"
                );
            }
        }
        // Forget the holdings first, then vanish in one of three ways.
        {
            let mut holders = beliefs.holders.lock().unwrap();
            for name in conn.held.drain(..) {
                holders.remove(&name);
            }
        }
        let stream = conn.stream.into_inner();
        match rng.next() % 3 {
            0 => {
                let std = stream.into_std().unwrap();
                let _ = socket2::SockRef::from(&std).set_linger(Some(Duration::ZERO));
            }
            1 => {
                let mut stream = stream;
                let _ = stream.shutdown().await;
            }
            _ => drop(stream),
        }
    }
}

/// Sends floods of commands with big replies and never reads; the server must cut it off.
/// Comes back a moment after each cut-off (a broken client, not a denial-of-service attack).
async fn never_reader(port: u16, deadline: Instant) {
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
            continue;
        };
        let _ = stream
            .write_all(b"g never-reader-lock\nsg never-reader-shared\n")
            .await;
        let flood = "q\n".repeat(20_000);
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until.min(deadline) {
            match tokio::time::timeout(
                Duration::from_millis(500),
                stream.write_all(flood.as_bytes()),
            )
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break, // cut off, as it should be
                Err(_) => {}
            }
        }
    }
}

async fn stats(port: u16) -> HashMap<String, u64> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut stream = tokio::io::BufReader::new(stream);
    stream.get_mut().write_all(b"q\n").await.unwrap();
    let mut out = HashMap::new();
    loop {
        let mut line = String::new();
        stream.read_line(&mut line).await.unwrap();
        let (k, v) = line.trim_end().split_once(": ").unwrap();
        out.insert(k.to_owned(), v.parse().unwrap());
        if k == "shared_orphans" {
            return out;
        }
    }
}

#[test]
fn chaos_soak_loses_and_leaks_nothing() {
    let secs: u64 = std::env::var("GLOCKD_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let server = Server::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let port = server.port;
    // Warm up allocator arenas and tables once, so the baseline is a served server's.
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for seed in 0..WORKERS {
            let beliefs = Arc::new(Beliefs::default());
            let deadline = Instant::now() + Duration::from_secs(1);
            tasks.push(tokio::spawn(worker(
                port,
                seed * 7919 + 1,
                deadline,
                beliefs,
                Arc::new(AtomicU64::new(seed << 32)),
            )));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let rss_start = server.rss_kib();

    let beliefs = Arc::new(Beliefs::default());
    let ids = Arc::new(AtomicU64::new(1));
    let deadline = Instant::now() + Duration::from_secs(secs);
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for seed in 0..WORKERS {
            tasks.push(tokio::spawn(worker(
                port,
                seed * 104_729 + 17,
                deadline,
                beliefs.clone(),
                ids.clone(),
            )));
        }
        for _ in 0..NEVER_READERS {
            tasks.push(tokio::spawn(never_reader(port, deadline)));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    assert_eq!(
        beliefs.violations.load(Ordering::Relaxed),
        0,
        "an exclusive lock was granted twice"
    );
    assert!(beliefs.grants.load(Ordering::Relaxed) > 0);

    // Everything is released and every connection accounted for.
    let end = Instant::now() + Duration::from_secs(30);
    let last = runtime.block_on(async {
        loop {
            let s = stats(port).await;
            if s["locks"] == 0 && s["shared_locks"] == 0 && s["connections"] == 1 {
                return s;
            }
            assert!(Instant::now() < end, "locks or connections leaked: {s:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let rss_end = server.rss_kib();
    eprintln!(
        "soak: {secs} s, {} commands, {} grants, {} orphans, {} shared orphans, rss {} KiB -> {} KiB",
        beliefs.commands.load(Ordering::Relaxed),
        beliefs.grants.load(Ordering::Relaxed),
        last["orphans"],
        last["shared_orphans"],
        rss_start,
        rss_end
    );
    assert!(
        rss_end <= rss_start + rss_start / 2 + 16 * 1024,
        "memory did not return near its start: {rss_start} KiB -> {rss_end} KiB"
    );
}
