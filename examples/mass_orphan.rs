//! Measures what a mass disconnect costs: one connection takes a million exclusive locks and
//! vanishes, while another client keeps sending `i` to the same shard. Prints how long the
//! release took and the other client's worst latency meanwhile.
//!
//! `cargo run --release --example mass_orphan [LOCKS]`

#[path = "support/rss.rs"]
mod rss;

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let locks: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let config = glockd::Config {
        shards: Some(1),
        ..glockd::Config::default()
    };
    let server = glockd::start_with(config, Some(std::net::TcpListener::bind("127.0.0.1:0")?))?;
    let addr = server.tcp_addr().expect("tcp");

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
    server.shutdown();
    Ok(())
}
