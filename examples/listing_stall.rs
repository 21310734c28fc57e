//! Measures what a big listing costs everyone else: one connection holds LOCKS exclusive locks,
//! another asks `d` and reads the whole listing, while a third keeps sending `i` to the same
//! shard. Prints how long the listing took and the third client's worst latency meanwhile.
//!
//! `cargo run --release --example listing_stall [LOCKS] [HOST:PORT]`: with an address it
//! measures a server already running there (start it with `-shards 1`), else one of its own.

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let locks: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(300_000);
    let (_server, addr) = match args.next() {
        Some(addr) => (None, addr.parse().map_err(std::io::Error::other)?),
        None => {
            let config = glockd::Config {
                shards: Some(1),
                ..glockd::Config::default()
            };
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let server = glockd::start_with(config, Some(listener))?;
            let addr = server.tcp_addr().expect("tcp");
            (Some(server), addr)
        }
    };

    let mut holder = TcpStream::connect(addr).await?;
    let chunk = 10_000;
    let mut reply = vec![0u8; chunk * "1 Got Lock\n".len()];
    for c in 0..locks.div_ceil(chunk) {
        let batch: String = (0..chunk).map(|i| format!("g l{c:05}{i:010}\n")).collect();
        holder.write_all(batch.as_bytes()).await?;
        holder.read_exact(&mut reply).await?;
    }

    let canary = TcpStream::connect(addr).await?;
    let mut canary = BufReader::new(canary);
    let mut lister = TcpStream::connect(addr).await?;
    let mut line = String::new();
    // Warm up the canary's connection first.
    canary.get_mut().write_all(b"i probe\n").await?;
    canary.read_line(&mut line).await?;

    let start = Instant::now();
    lister.write_all(b"d\ni probe\n").await?;
    let reader = tokio::spawn(async move {
        // The listing, then the `i`'s reply: `0 Not Locked\n` ends it.
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while !got.ends_with(b"0 Not Locked\n") {
            let n = lister.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::Error::other("closed before the listing ended"));
            }
            got.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>((got.len(), start.elapsed()))
    });
    let mut worst = Duration::ZERO;
    let mut probes = 0u64;
    while !reader.is_finished() {
        let sent = Instant::now();
        canary.get_mut().write_all(b"i probe\n").await?;
        line.clear();
        canary.read_line(&mut line).await?;
        worst = worst.max(sent.elapsed());
        probes += 1;
    }
    let (bytes, took) = reader.await.map_err(std::io::Error::other)??;
    println!(
        "listed {locks} locks ({bytes} bytes) in {:.1} ms; other client: {probes} requests \
         answered meanwhile, worst latency {:.2} ms",
        took.as_secs_f64() * 1e3,
        worst.as_secs_f64() * 1e3
    );
    Ok(())
}
