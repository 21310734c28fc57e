//! The cost of one command end to end over loopback, through a connection's own shard (inline)
//! versus through another shard's mailbox, at pipeline batch sizes 1, 8 and 32; and a pipelined
//! churn run against an in-process server with 1 and 2 shards.
//!
//! Routing keys are random per server process, so the names each path uses are picked with
//! `ServerHandle::shard_of`; the bench's one connection is the server's first, which lives on
//! shard 0.

mod support;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use support::{churn, split_by_shard, start_glockd, start_glockd_ws, ws_churn, Conn};

/// `batch` inspections of names taken round-robin from `names`: `i` is routed exactly like `g`
/// and `r` but leaves the table as it is, so every iteration does the same work.
fn inspect_batch(names: &[String], batch: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..batch {
        out.extend_from_slice(format!("i {}\n", names[i % names.len()]).as_bytes());
    }
    out
}

fn local_vs_remote(c: &mut Criterion) {
    let (server, addr) = start_glockd(Some(2));
    let mut conn = Conn::connect(addr);
    let (local, remote) = split_by_shard(&server, 32);
    let mut group = c.benchmark_group("one command, own shard vs another shard's mailbox");
    for batch in [1usize, 8, 32] {
        group.throughput(Throughput::Elements(batch as u64));
        for (path, names) in [("own shard", &local), ("other shard", &remote)] {
            let bytes = inspect_batch(names, batch);
            group.bench_with_input(BenchmarkId::new(path, batch), &batch, |b, &batch| {
                b.iter(|| conn.roundtrip(&bytes, batch))
            });
        }
    }
    group.finish();
}

fn pipelined_churn(c: &mut Criterion) {
    let mut group = c.benchmark_group("pipelined churn over loopback, 4 connections");
    for shards in [1u16, 2] {
        let (_server, addr) = start_glockd(Some(shards));
        for pipeline in [1usize, 32] {
            group.throughput(Throughput::Elements(4 * pipeline as u64));
            group.bench_function(
                BenchmarkId::new(format!("glockd {shards} shard(s)"), pipeline),
                |b| b.iter_custom(|windows| churn(addr, 4, windows, pipeline)),
            );
        }
    }
    group.finish();
}

fn websocket_churn(c: &mut Criterion) {
    let mut group = c.benchmark_group("websocket churn over loopback, 4 connections");
    let (_server, addr) = start_glockd_ws(Some(1));
    for pipeline in [1usize, 32] {
        group.throughput(Throughput::Elements(4 * pipeline as u64));
        group.bench_function(BenchmarkId::new("glockd 1 shard", pipeline), |b| {
            b.iter_custom(|windows| ws_churn(addr, 4, windows, pipeline))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = local_vs_remote, pipelined_churn, websocket_churn
}
criterion_main!(benches);
