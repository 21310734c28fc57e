//! Parser throughput: `glockd::protocol::parse` on the lines real clients send, alone and as the
//! connection loop sees them (a pipelined buffer split at newlines).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use glockd::protocol::{parse, Request};

fn lines(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    let cases: [(&str, &[u8]); 5] = [
        ("g 16-byte name", b"g k000000000000042"),
        ("sg 16-byte name", b"sg k000000000000042"),
        ("go client spacing", b" g  k000000000000042\r"),
        ("collapsed spaces", b"g  a   lock  name  with  spaces "),
        ("unknown word", b"get k000000000000042"),
    ];
    for (name, line) in cases {
        group.throughput(Throughput::Bytes(line.len() as u64 + 1));
        group.bench_function(name, |b| b.iter(|| parse(black_box(line))));
    }
    let long = [b"g ".as_slice(), &[b'n'; 10_000]].concat();
    group.throughput(Throughput::Bytes(long.len() as u64 + 1));
    group.bench_function("g 10000-byte name", |b| b.iter(|| parse(black_box(&long))));
    group.finish();
}

fn pipelined_buffer(c: &mut Criterion) {
    // 1000 churn lines, as one read of a pipelining client brings them.
    let mut buf = Vec::new();
    for i in 0..500 {
        buf.extend_from_slice(format!("g k{i:015}\nr k{i:015}\n").as_bytes());
    }
    let mut group = c.benchmark_group("parse buffer");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("1000 lines split and parsed", |b| {
        b.iter(|| {
            let mut commands = 0;
            for line in memchr::memchr_iter(b'\n', black_box(&buf)).scan(0, |start, end| {
                let line = &buf[*start..end];
                *start = end + 1;
                Some(line)
            }) {
                if let Request::Lock { .. } = parse(line) {
                    commands += 1;
                }
            }
            commands
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = lines, pipelined_buffer
}
criterion_main!(benches);
