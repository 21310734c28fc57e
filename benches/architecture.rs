//! The architecture check: the same end-to-end churn workload against glockd's shard-mailbox
//! server (one pinned-style single-threaded runtime per shard, tables without locks) and against
//! the obvious alternative, a sharded-mutex table served by a tokio multi-thread runtime
//! (`support::mutex_server`). Both run in this process with as many threads as cores, unpinned,
//! and share the cores with the client threads, so read the ratio between them, not the
//! absolute numbers.

mod support;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use support::{churn, mutex_server, start_glockd};

/// Client connections (each on its own thread).
const CONNS: usize = 8;

fn architecture(c: &mut Criterion) {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut group = c.benchmark_group("architecture: churn, 8 connections");
    let (glockd, glockd_addr) = start_glockd(Some(cores as u16));
    let (defaults, defaults_addr) = start_glockd(None);
    let default_shards = glockd::config::default_shards(cores);
    let baseline = mutex_server::start(cores);
    for pipeline in [1usize, 32] {
        group.throughput(Throughput::Elements((CONNS * pipeline) as u64));
        group.bench_function(BenchmarkId::new("glockd shard mailboxes", pipeline), |b| {
            b.iter_custom(|windows| churn(glockd_addr, CONNS, windows, pipeline))
        });
        group.bench_function(
            BenchmarkId::new(
                format!("glockd defaults ({default_shards} shards)"),
                pipeline,
            ),
            |b| b.iter_custom(|windows| churn(defaults_addr, CONNS, windows, pipeline)),
        );
        group.bench_function(
            BenchmarkId::new("sharded mutex, multi-thread runtime", pipeline),
            |b| b.iter_custom(|windows| churn(baseline.addr, CONNS, windows, pipeline)),
        );
    }
    group.finish();
    drop(glockd);
    drop(defaults);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = architecture
}
criterion_main!(benches);
