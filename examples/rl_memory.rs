//! Measures what `rl` state costs per name, and what clearing it costs: one shard's limiters
//! for N distinct 16-byte names with a long period (so none expires while they are made), the
//! resident memory they add next to the bytes the memory budget counts for them, then the time
//! each eviction pass takes once they have all expired, and last how fast new names come in
//! when the budget is full and every one must evict another.
//!
//! `cargo run --release --example rl_memory [NAMES]`

#[path = "support/rss.rs"]
mod rss;

use std::time::Instant;

use glockd::ratelimit::{Limit, RateLimits};
use glockd::LockName;

fn main() {
    let names: u64 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let day_ms = 24 * 60 * 60 * 1000;
    let limit = Limit {
        burst: 1,
        count: 1,
        period_ms: day_ms,
        quantity: 1,
    };
    let rss_before = rss::rss_kib();
    let mut limits = RateLimits::new(glockd::name_hasher());
    for i in 0..names {
        let name = LockName::from(format!("rl-name-{i:08}").as_str());
        limits.apply(&name, 0, limit, |_| true);
    }
    let rss_after = rss::rss_kib();
    let bytes = (rss_after - rss_before) as f64 * 1024.0 / names as f64;
    println!(
        "{names} limiters: {} KiB resident, {bytes:.1} bytes per name resident, {:.1} accounted",
        rss_after - rss_before,
        limits.bytes() as f64 / names as f64
    );
    // Every limiter is back to full capacity after two days: evict them, pass by pass.
    let later = u128::from(2 * day_ms) * 1_000_000;
    let started = Instant::now();
    let mut passes = 0u64;
    let mut worst = std::time::Duration::ZERO;
    while !limits.is_empty() {
        let pass = Instant::now();
        limits.evict_some(later, glockd::ratelimit::EVICT_SLICE);
        worst = worst.max(pass.elapsed());
        passes += 1;
    }
    println!(
        "evicted in {:?} over {passes} passes, longest pass {worst:?}",
        started.elapsed()
    );
    // A full budget: room for half the names, so from then on every new name evicts one.
    let room = names / 2 * glockd::ratelimit::LIMITER_BYTES;
    let mut limits = RateLimits::new(glockd::name_hasher());
    let fits = |bytes: u64| bytes <= room;
    for i in 0..names / 2 {
        let name = LockName::from(format!("rl-name-{i:08}").as_str());
        limits.apply(&name, 0, limit, fits);
    }
    let started = Instant::now();
    for i in names / 2..names {
        let name = LockName::from(format!("rl-name-{i:08}").as_str());
        if limits.apply(&name, 0, limit, fits).is_none() {
            println!("refused at {i}");
            break;
        }
    }
    let took = started.elapsed();
    println!(
        "full budget: {} new names, {} evictions in {took:?} ({:.0} evictions per second)",
        names - names / 2,
        limits.evicted(),
        limits.evicted() as f64 / took.as_secs_f64()
    );
}
