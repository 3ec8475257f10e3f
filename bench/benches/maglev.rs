//! The policy layer's lookups: Maglev table build for M = 65537 with 10, 100 and 1000
//! backends, at the automatic size for 10 and 100 (the same set again and again, and 1000
//! distinct sets in turn, as a Kubernetes snapshot build meets them: the branch predictor
//! cannot learn one table), Maglev lookup, and Service lookup in a snapshot of 1 and
//! 100 000 Services.

use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::num::NonZeroU32;
use std::sync::Arc;

use xlb_dataplane::lb::maglev::MaglevTable;
use xlb_dataplane::lb::snapshot::{
    Backend, BackendId, BackendState, Service, ServiceId, ServiceKey, ServiceSpec, Snapshot,
};
use xlb_dataplane::packet::{Endpoint, IpProto};

fn backends(n: u32) -> Vec<(Endpoint, u32)> {
    backends_from(0, n)
}

fn backends_from(first: u32, n: u32) -> Vec<(Endpoint, u32)> {
    (first..first + n)
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
    // The automatic size (at least 100 slots per backend): what a Kubernetes Service of
    // 10 endpoints gets (M = 1021).
    let mut group = c.benchmark_group("maglev-build-auto");
    for n in [10, 100] {
        let set = backends(n);
        group.bench_function(format!("n{n}"), |b| {
            b.iter(|| MaglevTable::build(black_box(&set), None).ok());
        });
    }
    let distinct: Vec<Vec<(Endpoint, u32)>> =
        (0..1000).map(|s| backends_from(s * 10, 10)).collect();
    group.bench_function("n10-distinct-sets", |b| {
        let mut turn = 0;
        b.iter(|| {
            turn = (turn + 1) % distinct.len();
            MaglevTable::build(black_box(&distinct[turn]), None).ok()
        });
    });
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

fn snapshot_of(services: u32) -> Snapshot {
    let built = (0..services)
        .map(|n| {
            let backends = vec![Backend {
                id: BackendId(NonZeroU32::MIN),
                endpoint: Endpoint::new(Ipv4Addr::from(0xc613_0000 + n).into(), 8080),
                state: BackendState::Ready,
                weight: 1,
            }];
            let spec = ServiceSpec::new(
                ServiceId(NonZeroU32::MIN.saturating_add(n)),
                service_key(n),
                backends,
            );
            Arc::new(Service::new(spec).expect("valid Service"))
        })
        .collect();
    Snapshot::new(1, built).expect("distinct Services")
}

fn service_key(n: u32) -> ServiceKey {
    ServiceKey {
        vip: Endpoint::new(Ipv4Addr::from(0xc612_0000 + n).into(), 80),
        proto: IpProto::TCP,
    }
}

fn service_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("snapshot-lookup");
    const BATCH: u32 = 64;
    group.throughput(Throughput::Elements(u64::from(BATCH)));
    for services in [1, 100_000] {
        let snapshot = snapshot_of(services);
        // 64 keys spread over the whole table (warm in cache after the first batch).
        let keys: Vec<ServiceKey> = (0..BATCH)
            .map(|i| service_key(i.wrapping_mul(7919) % services))
            .collect();
        group.bench_function(format!("services{services}"), |b| {
            b.iter(|| {
                for key in &keys {
                    black_box(snapshot.service(black_box(key)).map(|s| s.spec().id));
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, build, lookup, service_lookup);
criterion_main!(benches);
