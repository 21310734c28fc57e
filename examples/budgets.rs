//! Measures what crowds of clients cost a running server: its resident memory and descriptors
//! (read from `/proc/PID`), and a quiet client's worst latency. Each scenario is an attack the
//! connection budgets are there to bound; run it against two builds to compare them.
//!
//! `cargo run --release --example budgets -- SCENARIO PID TCP_ADDR WS_ADDR [N]`, with the server
//! started as `glockd -port P -ws W` (loopback is exempt from the per-address limit):
//! - `q-crowd` (N = 400): N connections each pipeline 30 KB of `q` lines and read the replies,
//!   while another client sends `i x` every 5 ms; prints that client's worst latency.
//! - `ws-waiters` (N = 2000): one client holds `L`; N websocket clients each send
//!   `gw 3600000 L` and 64 small messages, then reset; prints the server's descriptors and
//!   memory 5 seconds later, and whether a new client is served.
//! - `idle` (N = 2000): N idle TCP connections, then N idle websocket connections; prints the
//!   memory each costs the server.
//! - `flood` (N = 500): N connections each send 1 MiB without a newline, then N connections
//!   pipeline `q` without reading the replies; prints the server's memory after each.

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A server process's resident memory (KiB) and open descriptors.
fn usage(pid: u32) -> (u64, usize) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss, fds)
}

fn print_usage(what: &str, pid: u32) -> (u64, usize) {
    let (rss, fds) = usage(pid);
    println!(
        "{what}: server RSS {:.1} MB, {fds} descriptors",
        rss as f64 / 1024.0
    );
    (rss, fds)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        return Err("usage: budgets SCENARIO PID TCP_ADDR WS_ADDR [N]".into());
    }
    let pid: u32 = args[1].parse()?;
    let tcp = args[2].clone();
    let ws = format!("ws://{}/", args[3]);
    let n = |default: usize| args.get(4).and_then(|n| n.parse().ok()).unwrap_or(default);
    match args[0].as_str() {
        "q-crowd" => q_crowd(&tcp, n(400)).await,
        "ws-waiters" => ws_waiters(pid, &tcp, &ws, n(2000)).await,
        "idle" => idle(pid, &tcp, &ws, n(2000)).await,
        "flood" => flood(pid, &tcp, n(500)).await,
        other => Err(format!("unknown scenario {other}").into()),
    }
}

/// Sends `i x` every 5 ms until `done`, and returns its latencies, sorted.
async fn canary(tcp: &str, done: impl Fn() -> bool) -> Result<Vec<Duration>> {
    let mut canary = BufReader::new(TcpStream::connect(tcp).await?);
    let mut line = String::new();
    let mut latencies = Vec::new();
    while !done() {
        let sent = Instant::now();
        canary.get_mut().write_all(b"i x\n").await?;
        line.clear();
        canary.read_line(&mut line).await?;
        latencies.push(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    latencies.sort();
    Ok(latencies)
}

async fn q_crowd(tcp: &str, conns: usize) -> Result<()> {
    let lines = 30_000 / 2;
    let batch = "q\n".repeat(lines);
    let remaining = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(conns));
    let mut crowd = Vec::new();
    for _ in 0..conns {
        let mut stream = TcpStream::connect(tcp).await?;
        let batch = batch.clone();
        let remaining = remaining.clone();
        crowd.push(tokio::spawn(async move {
            let (mut read, mut write) = stream.split();
            let reader = async {
                // Every `q` reply ends with its `shared_orphans` line.
                let mut seen = 0;
                let mut buf = vec![0u8; 1 << 16];
                let mut tail = Vec::new();
                while seen < lines {
                    let n = read.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    tail.extend_from_slice(&buf[..n]);
                    seen += memchr_count(&tail, b"shared_orphans");
                    // Less than the word, so that no match is counted twice.
                    let keep = tail.len().min(b"shared_orphans".len() - 1);
                    tail.drain(..tail.len() - keep);
                }
                Ok::<_, std::io::Error>(())
            };
            let writer = write.write_all(batch.as_bytes());
            let _ = tokio::join!(reader, writer);
            remaining.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }));
    }
    let started = Instant::now();
    let left = remaining.clone();
    // The canary on a thread of its own, so that reading the crowd's replies does not delay it.
    let tcp_addr = tcp.to_owned();
    let canary = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(canary(&tcp_addr, move || {
                left.load(std::sync::atomic::Ordering::Relaxed) == 0
            }))
    });
    let joined = tokio::task::spawn_blocking(move || canary.join()).await?;
    let latencies = joined.map_err(|_| "canary panicked")??;
    let at = |q: f64| {
        let i = ((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1));
        latencies.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    for task in crowd {
        let _ = task.await;
    }
    println!(
        "{conns} connections x {lines} pipelined q: done in {:.1} s; canary: {} answers, \
         latency median {:.1} ms, p99 {:.1} ms, worst {:.1} ms",
        started.elapsed().as_secs_f64(),
        latencies.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
    Ok(())
}

/// Occurrences of `word` in `text` (a word split over two reads is found by the caller's
/// keeping the tail).
fn memchr_count(text: &[u8], word: &[u8]) -> usize {
    text.windows(word.len()).filter(|w| *w == word).count()
}

async fn ws_waiters(pid: u32, tcp: &str, ws: &str, conns: usize) -> Result<()> {
    print_usage("before", pid);
    let mut holder = BufReader::new(TcpStream::connect(tcp).await?);
    holder.get_mut().write_all(b"g L\n").await?;
    let mut line = String::new();
    holder.read_line(&mut line).await?;
    let mut sockets = Vec::new();
    for _ in 0..conns {
        let stream =
            TcpStream::connect(ws.trim_start_matches("ws://").trim_end_matches('/')).await?;
        let (mut client, _) = tokio_tungstenite::client_async(ws, stream).await?;
        client.send(Message::text("gw 3600000 L")).await?;
        for _ in 0..64 {
            client.feed(Message::text("i x")).await?;
        }
        client.flush().await?;
        sockets.push(client);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    print_usage(&format!("{conns} websocket waiters"), pid);
    for client in sockets {
        // A reset, not a close: SO_LINGER 0 and drop.
        let _ = socket2::SockRef::from(client.get_ref()).set_linger(Some(Duration::ZERO));
        drop(client);
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    print_usage("5 s after they reset", pid);
    let served = async {
        let mut fresh = BufReader::new(TcpStream::connect(tcp).await?);
        fresh.get_mut().write_all(b"i x\n").await?;
        let mut line = String::new();
        fresh.read_line(&mut line).await?;
        Ok::<_, std::io::Error>(line)
    };
    match tokio::time::timeout(Duration::from_secs(5), served).await {
        Ok(Ok(line)) => println!("a new client gets: {}", line.trim_end()),
        other => println!("a new client is not served: {other:?}"),
    }
    Ok(())
}

async fn idle(pid: u32, tcp: &str, ws: &str, conns: usize) -> Result<()> {
    let settle = || tokio::time::sleep(Duration::from_millis(500));
    settle().await;
    let (base, _) = print_usage("before", pid);
    let mut tcp_conns = Vec::new();
    for _ in 0..conns {
        let mut stream = BufReader::new(TcpStream::connect(tcp).await?);
        // One command each, so every connection has been served once.
        stream.get_mut().write_all(b"i x\n").await?;
        let mut line = String::new();
        stream.read_line(&mut line).await?;
        tcp_conns.push(stream);
    }
    settle().await;
    let (with_tcp, _) = print_usage(&format!("{conns} idle TCP"), pid);
    let mut ws_conns = Vec::new();
    let host = ws.trim_start_matches("ws://").trim_end_matches('/');
    for _ in 0..conns {
        let stream = TcpStream::connect(host).await?;
        let (mut client, _) = tokio_tungstenite::client_async(ws, stream).await?;
        client.send(Message::text("i x")).await?;
        let _ = futures_util::StreamExt::next(&mut client).await;
        ws_conns.push(client);
    }
    settle().await;
    let (with_ws, _) = print_usage(&format!("and {conns} idle websocket"), pid);
    println!(
        "per idle connection: TCP {:.1} KB, websocket {:.1} KB",
        with_tcp.saturating_sub(base) as f64 * 1.024 / conns as f64,
        with_ws.saturating_sub(with_tcp) as f64 * 1.024 / conns as f64
    );
    Ok(())
}

async fn flood(pid: u32, tcp: &str, conns: usize) -> Result<()> {
    print_usage("before", pid);
    let unfinished = vec![b'x'; (1 << 20) - 16];
    let mut held = Vec::new();
    for _ in 0..conns {
        let mut stream = TcpStream::connect(tcp).await?;
        let _ = stream.write_all(b"g ").await;
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&unfinished)).await;
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    print_usage(&format!("{conns} x 1 MiB without a newline"), pid);
    drop(held);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let batch = "q\n".repeat(16 * 1024);
    let mut held = Vec::new();
    for _ in 0..conns {
        let mut stream = TcpStream::connect(tcp).await?;
        // Keep sending `q` without reading, until the server stops taking them.
        for _ in 0..64 {
            let sent = tokio::time::timeout(
                Duration::from_millis(20),
                stream.write_all(batch.as_bytes()),
            )
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                break;
            }
        }
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    print_usage(&format!("{conns} sending q without reading"), pid);
    Ok(())
}
