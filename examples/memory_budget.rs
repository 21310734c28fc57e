//! Measures the memory budget against the attacks it is there for, one per run (so each starts
//! from a fresh process): the resident memory the attack adds next to the bytes the budget
//! counts, what the attacker was told, and how a canary client fares meanwhile.
//!
//! `cargo run --release --example memory_budget -- ATTACK [COUNT] [-max-memory SIZE]`
//!
//! - `rl COUNT`: COUNT distinct `rl` names with one-day periods (default 2 000 000).
//! - `g COUNT LEN`: COUNT exclusive locks with LEN-byte names (default 1500 of 262 144 bytes,
//!   the longest lock name the defaults accept).
//! - `sg COUNT`: COUNT shared locks from one connection (default 6 000 000; the default
//!   `-max-locks-per-conn` stops it at a million).
//! - `fill LEN`: exclusive locks with LEN-byte names until the budget refuses one, then prints
//!   the accounted bytes against the resident memory they took: the check of the estimates.
//!
//! The budget is 256 MiB unless `-max-memory` says otherwise, one shard.

#[path = "support/rss.rs"]
mod rss;

use std::collections::BTreeMap;
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut budget = 256u64 << 20;
    if let Some(at) = args.iter().position(|a| a == "-max-memory") {
        budget = glockd::memory::parse_size(&args[at + 1]).expect("a size");
        args.drain(at..at + 2);
    }
    let attack = args.first().cloned().unwrap_or_else(|| "rl".into());
    let number =
        |at: usize, default: u64| args.get(at).and_then(|n| n.parse().ok()).unwrap_or(default);
    let config = glockd::Config {
        shards: Some(1),
        max_memory: Some(budget),
        pin: false,
        ..glockd::Config::default()
    };
    let server = glockd::start_with(config, Some(std::net::TcpListener::bind("127.0.0.1:0")?))?;
    let addr = server.tcp_addr().expect("tcp");
    let rss_before = rss::rss_kib();
    let mut attacker = BufReader::new(TcpStream::connect(addr).await?);
    let started = Instant::now();
    let (count, lines): (u64, Box<dyn Fn(u64) -> String>) = match attack.as_str() {
        "rl" => (
            number(1, 2_000_000),
            Box::new(|i| format!("rl rl-name-{i:08} 0 1 86400000\n")),
        ),
        "g" => {
            let len = number(2, 262_144) as usize;
            (
                number(1, 1500),
                Box::new(move |i| format!("g {i:08}{}\n", "x".repeat(len - 8))),
            )
        }
        "sg" => (
            number(1, 6_000_000),
            Box::new(|i| format!("sg sg-name-{i:08}\n")),
        ),
        "fill" => {
            let len = number(1, 16) as usize;
            (
                u64::MAX,
                Box::new(move |i| format!("g {i:0len$}\n", len = len)),
            )
        }
        other => panic!("unknown attack {other}"),
    };
    // Pipelined in slices; the replies tallied by their text (rl's by its first word).
    let mut replies: BTreeMap<String, u64> = BTreeMap::new();
    let mut line = String::new();
    let mut sent = 0u64;
    'attack: while sent < count {
        let slice = (count - sent).min(if attack == "g" { 16 } else { 10_000 });
        let batch: String = (sent..sent + slice).map(&lines).collect();
        attacker.get_mut().write_all(batch.as_bytes()).await?;
        for _ in 0..slice {
            line.clear();
            attacker.read_line(&mut line).await?;
            let key = line.trim_end().to_owned();
            *replies.entry(key).or_default() += 1;
            if attack == "fill" && line.starts_with("0 ") {
                break 'attack;
            }
        }
        sent += slice;
    }
    let took = started.elapsed();
    let rss_after = rss::rss_kib();
    let accounted = server.memory_used();
    let grown = (rss_after - rss_before) as f64 * 1024.0;
    println!("attack {attack}: {:?} in {took:.1?}", replies);
    println!(
        "budget {} MiB; accounted {:.1} MiB; resident memory +{:.1} MiB ({:.2}x accounted); \
         held: {} locks, {} shared",
        budget >> 20,
        accounted as f64 / 1048576.0,
        grown / 1048576.0,
        grown / accounted.max(1) as f64,
        server.stats().locks,
        server.stats().shared_locks,
    );
    if attack == "fill" {
        let held = server.stats().locks.max(1) as f64;
        println!(
            "per lock: {:.1} bytes accounted, {:.1} bytes resident",
            accounted as f64 / held,
            grown / held
        );
    }
    // A canary after the attack: still served.
    let mut canary = BufReader::new(TcpStream::connect(addr).await?);
    let asked = Instant::now();
    canary
        .get_mut()
        .write_all(b"i canary\nr nothing\nq\n")
        .await?;
    line.clear();
    canary.read_line(&mut line).await?;
    println!(
        "canary: {:?} after {:.1?}",
        line.trim_end(),
        asked.elapsed()
    );
    Ok(())
}
