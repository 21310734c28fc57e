//! Measures what a mass disconnect costs the other clients of a shard.
//!
//! `cargo run --release --example mass_orphan [LOCKS]`: one connection takes LOCKS (a million)
//! exclusive locks and vanishes, while another client keeps sending `i` to the same shard.
//! Prints how long the release took and the other client's worst latency meanwhile.
//!
//! `cargo run --release --example mass_orphan many CONNS LOCKS [g|sg]`: CONNS connections each
//! take LOCKS locks (`g`: exclusive, names of their own; `sg`: shared, the same LOCKS names for
//! every connection), then all of them reset at once (RST) while another client sends `i x`
//! every 5 ms. Prints how long the release took and that client's worst latency meanwhile.

#[path = "support/rss.rs"]
mod rss;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = glockd::Config {
        shards: Some(1),
        ..glockd::Config::default()
    };
    let server = glockd::start_with(config, Some(std::net::TcpListener::bind("127.0.0.1:0")?))?;
    let addr = server.tcp_addr().expect("tcp");
    if args.first().map(String::as_str) == Some("many") {
        let number = |at: usize, default: usize| {
            args.get(at).and_then(|n| n.parse().ok()).unwrap_or(default)
        };
        let shared = args.get(3).map(String::as_str) == Some("sg");
        many(&server, addr, number(1, 500), number(2, 2000), shared).await?;
    } else {
        let locks = args
            .first()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1_000_000);
        one(&server, addr, locks).await?;
    }
    server.shutdown();
    Ok(())
}

/// One connection holding `locks` exclusive locks disconnects.
async fn one(server: &glockd::ServerHandle, addr: SocketAddr, locks: usize) -> std::io::Result<()> {
    // Take the locks, pipelined in chunks.
    let rss_before = rss::rss_kib();
    let mut big = TcpStream::connect(addr).await?;
    let chunk = 10_000;
    let mut reply = vec![0u8; chunk * "1 Got Lock\n".len()];
    for c in 0..locks.div_ceil(chunk) {
        // 16-byte names: "o" + 5-digit chunk + 10-digit index.
        let batch: String = (0..chunk).map(|i| format!("g o{c:05}{i:010}\n")).collect();
        big.write_all(batch.as_bytes()).await?;
        big.read_exact(&mut reply).await?;
    }
    assert_eq!(server.stats().locks as usize, locks.div_ceil(chunk) * chunk);
    let held = server.stats().locks;
    let rss_after = rss::rss_kib();
    println!(
        "{held} held locks with 16-byte names: resident memory +{} KiB, {:.1} bytes per lock",
        rss_after - rss_before,
        (rss_after - rss_before) as f64 * 1024.0 / held as f64
    );

    let other = TcpStream::connect(addr).await?;
    let mut other = BufReader::new(other);
    let mut line = String::new();
    let mut worst = Duration::ZERO;
    let mut probes = 0u64;

    let start = Instant::now();
    drop(big);
    loop {
        let sent = Instant::now();
        other.get_mut().write_all(b"i probe\n").await?;
        line.clear();
        other.read_line(&mut line).await?;
        worst = worst.max(sent.elapsed());
        probes += 1;
        if server.stats().orphans == held {
            break;
        }
    }
    let took = start.elapsed();
    println!(
        "orphaned {held} locks in {:.1} ms; other client: {probes} requests answered meanwhile, worst latency {:.2} ms",
        took.as_secs_f64() * 1e3,
        worst.as_secs_f64() * 1e3
    );
    Ok(())
}

/// `conns` connections holding `locks` locks each reset at once.
async fn many(
    server: &glockd::ServerHandle,
    addr: SocketAddr,
    conns: usize,
    locks: usize,
    shared: bool,
) -> std::io::Result<()> {
    let mut holders = Vec::with_capacity(conns);
    for c in 0..conns {
        let mut holder = TcpStream::connect(addr).await?;
        let batch: String = (0..locks)
            .map(|i| match shared {
                true => format!("sg s{i:010}\n"),
                false => format!("g c{c:05}-{i:010}\n"),
            })
            .collect();
        holder.write_all(batch.as_bytes()).await?;
        // Every reply ends in "Lock\n": count them until all are in.
        let mut reader = BufReader::new(holder);
        let mut line = String::new();
        for _ in 0..locks {
            line.clear();
            reader.read_line(&mut line).await?;
            if !line.contains("Got") {
                return Err(std::io::Error::other(format!("refused: {line}")));
            }
        }
        holders.push(reader.into_inner());
    }
    let total = (conns * locks) as u64;
    let released = || {
        let stats = server.stats();
        stats.orphans + stats.shared_orphans
    };
    let kind = if shared { "shared" } else { "exclusive" };
    println!("{conns} connections hold {locks} {kind} locks each");

    let other = TcpStream::connect(addr).await?;
    let mut other = BufReader::new(other);
    let mut line = String::new();
    other.get_mut().write_all(b"i x\n").await?;
    other.read_line(&mut line).await?;

    let mut worst = Duration::ZERO;
    let mut probes = 0u64;
    let start = Instant::now();
    for holder in holders {
        // RST instead of FIN: what a crashed client's kernel, or a killed pod, sends.
        socket2::SockRef::from(&holder).set_linger(Some(Duration::ZERO))?;
        drop(holder);
    }
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let took = loop {
        tick.tick().await;
        let sent = Instant::now();
        other.get_mut().write_all(b"i x\n").await?;
        line.clear();
        other.read_line(&mut line).await?;
        worst = worst.max(sent.elapsed());
        probes += 1;
        if released() == total {
            break start.elapsed();
        }
    };
    println!(
        "released {total} locks of {conns} connections in {:.1} ms; other client (`i x` every \
         5 ms): {probes} requests answered meanwhile, worst latency {:.2} ms",
        took.as_secs_f64() * 1e3,
        worst.as_secs_f64() * 1e3
    );
    Ok(())
}
