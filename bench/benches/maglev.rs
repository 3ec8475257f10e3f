//! Maglev: table build for M = 65537 with 10, 100 and 1000 backends, and lookup.

use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use xlb_dataplane::lb::maglev::MaglevTable;
use xlb_dataplane::packet::Endpoint;

fn backends(n: u32) -> Vec<(Endpoint, u32)> {
    (0..n)
        .map(|i| {
            (
                Endpoint::new(Ipv4Addr::from(0xc613_0000 + i).into(), 8080),
                1,
            )
        })
        .collect()
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev-build-m65537");
    group.sample_size(20);
    for n in [10, 100, 1000] {
        let set = backends(n);
        group.bench_function(format!("n{n}"), |b| {
            b.iter(|| MaglevTable::build(black_box(&set), Some(65537)).ok());
        });
    }
    group.finish();
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev-lookup");
    const BATCH: u64 = 64;
    group.throughput(Throughput::Elements(BATCH));
    for n in [10, 1000] {
        let table = MaglevTable::build(&backends(n), Some(65537)).unwrap();
        let mut seed = 0u64;
        group.bench_function(format!("n{n}"), |b| {
            b.iter(|| {
                for i in 0..BATCH {
                    seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15 ^ i);
                    black_box(table.lookup(black_box(seed)));
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, build, lookup);
criterion_main!(benches);
