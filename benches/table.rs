//! One shard's lock table (`glockd::table::ShardTable`): taking, releasing, sharing and orphaning
//! 1000 locks, without any I/O; and the cost of fencing tokens kept below a durable ceiling.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use glockd::fencing::{Fencing, TimeSource};
use glockd::protocol::LockOp;
use glockd::table::ShardTable;
use glockd::LockName;

const LOCKS: usize = 1000;

/// 1000 distinct 16-byte names and their hashes in `table`.
fn names(table: &ShardTable) -> Vec<(u64, LockName)> {
    (0..LOCKS)
        .map(|i| {
            let name = format!("k{i:015}");
            (table.hash(name.as_bytes()), LockName::new(name.as_bytes()))
        })
        .collect()
}

/// An empty table, and the names to take in it.
fn empty() -> (ShardTable, Vec<(u64, LockName)>) {
    let table = ShardTable::new(glockd::name_hasher());
    let names = names(&table);
    (table, names)
}

/// A table in which connection 1 holds every name, exclusively and shared.
fn held() -> (ShardTable, Vec<(u64, LockName)>) {
    let (mut table, names) = empty();
    for (hash, name) in &names {
        table.get(1, *hash, name, None);
        let _ = table.shared_get(1, name, None);
    }
    (table, names)
}

fn table(c: &mut Criterion) {
    let mut group = c.benchmark_group("shard table, 1000 locks");
    group.throughput(Throughput::Elements(LOCKS as u64));

    group.bench_function("get", |b| {
        b.iter_batched(
            empty,
            |(mut table, names)| {
                for (hash, name) in &names {
                    black_box(table.get(1, *hash, name, None));
                }
                table
            },
            BatchSize::SmallInput,
        )
    });

    group.bench_function("get then release (warm table)", |b| {
        let (mut table, names) = empty();
        b.iter(|| {
            for (hash, name) in &names {
                black_box(table.get(1, *hash, name, None));
            }
            for (hash, name) in &names {
                black_box(table.release(1, *hash, name.as_bytes()));
            }
        })
    });

    group.bench_function("release", |b| {
        b.iter_batched(
            held,
            |(mut table, names)| {
                for (hash, name) in &names {
                    black_box(table.release(1, *hash, name.as_bytes()));
                }
                table
            },
            BatchSize::SmallInput,
        )
    });

    group.bench_function("get refused (held by another)", |b| {
        let (mut table, names) = held();
        b.iter(|| {
            for (hash, name) in &names {
                black_box(table.get(2, *hash, name, None));
            }
        })
    });

    group.bench_function("shared get", |b| {
        b.iter_batched(
            empty,
            |(mut table, names)| {
                for (_, name) in &names {
                    let _ = black_box(table.shared_get(1, name, None));
                }
                table
            },
            BatchSize::SmallInput,
        )
    });

    group.bench_function("orphan_all (1000 exclusive + 1000 shared)", |b| {
        b.iter_batched(
            held,
            |(mut table, _names)| {
                black_box(table.orphan_all(1));
                table
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// `g` against `gt` (take then release 1000 locks, through `apply` as a shard does), on tables
/// whose tokens come from the clock alone and from a clock kept below a durable ceiling, with
/// the renewer thread writing a real state file meanwhile.
fn fencing(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("glockd-bench-fencing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ceiling = Fencing::open(
        &dir.join("state"),
        Duration::from_millis(3000),
        TimeSource::System,
        None,
    )
    .expect("a state file");
    let renewer = ceiling.start_renewer().expect("renewer thread");
    let mut group = c.benchmark_group("fencing tokens, 1000 grants");
    group.throughput(Throughput::Elements(LOCKS as u64));
    for (label, bounded) in [("clock only", false), ("durable ceiling", true)] {
        for (word, op) in [("g", LockOp::Get), ("gt", LockOp::GetToken)] {
            let hasher = glockd::name_hasher();
            let mut table = if bounded {
                ShardTable::with_tokens(hasher, ceiling.clock())
            } else {
                ShardTable::new(hasher)
            };
            let names = names(&table);
            group.bench_function(format!("{word} then r, {label}"), |b| {
                b.iter(|| {
                    for (hash, name) in &names {
                        black_box(table.apply(1, op, *hash, name, None));
                    }
                    for (hash, name) in &names {
                        black_box(table.apply(1, LockOp::Release, *hash, name, None));
                    }
                })
            });
        }
    }
    group.finish();
    drop(renewer);
    // Zero in this bench: the renewer keeps the ceiling ahead of the clock.
    eprintln!(
        "fencing: {} ceiling writes, {:?} waited at the ceiling",
        ceiling.writes(),
        ceiling.waited()
    );
    let _ = std::fs::remove_dir_all(dir);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = table, fencing
}
criterion_main!(benches);
