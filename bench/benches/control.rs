//! Building snapshots from desired state: a full build of N Services (each with four
//! backends and its Maglev table); the whole desired state restated with one Service changed
//! (the file source: an O(N) comparison, one Service built); and one Service's change applied
//! on its own (the Kubernetes source: one Service built, two snapshot shards copied).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion};
use xlb_control::desired::{BackendState, NoBackend, Protocol, Scheduler};
use xlb_control::desired::{DesiredBackend, DesiredService, TrafficPolicy, VipKind};
use xlb_control::translate::{translate_desired, Builder, Change, OnRefusal};
use xlb_dataplane::lb::snapshot::Snapshot;

/// N Services of 10 endpoints each, every endpoint its own (as Kubernetes Services have).
fn desired_distinct(n: u32) -> Vec<DesiredService> {
    let mut d = desired(n);
    for (i, s) in (0u32..).zip(d.iter_mut()) {
        s.backends = (0..10u32)
            .map(|j| DesiredBackend {
                address: IpAddr::V4(Ipv4Addr::from(0xc613_0000 + (i * 10 + j) % 65_536)),
                port: 8080 + ((i * 10 + j) / 65_536) as u16,
                weight: 1,
                state: BackendState::Ready,
                local: false,
            })
            .collect();
    }
    d
}

fn desired(n: u32) -> Vec<DesiredService> {
    (0..n)
        .map(|i| DesiredService {
            name: format!("s{i}"),
            vip: IpAddr::V4(Ipv4Addr::from(0xc613_0001 + i / 4)),
            port: 80 + (i % 4) as u16,
            protocol: Protocol::Udp,
            backends: (1..=4u8)
                .map(|b| DesiredBackend {
                    address: IpAddr::V4(Ipv4Addr::new(198, 18, 128 + b, 1)),
                    port: 5353,
                    weight: 1,
                    state: BackendState::Ready,
                    local: false,
                })
                .collect(),
            scheduler: Scheduler::Maglev,
            affinity_timeout: None,
            no_backend: NoBackend::Reject,
            table_size: None,
            kind: VipKind::Configured,
            source_ranges: Vec::new().into(),
            traffic_policy: TrafficPolicy::Cluster,
        })
        .collect()
}

fn snapshots(c: &mut Criterion) {
    let mut group = c.benchmark_group("snapshot");
    group.sample_size(10);
    let k8s = desired_distinct(10_000);
    group.bench_function("full-build-10-endpoints/10000", |bench| {
        bench.iter(|| {
            let mut builder = Builder::default();
            black_box(
                translate_desired(&k8s, &mut builder, &Snapshot::default(), 1).expect("valid"),
            )
        });
    });
    for n in [10_000u32, 100_000] {
        let a = desired(n);
        let mut b = a.clone();
        b[(n / 2) as usize].backends[0].weight = 2;
        group.bench_function(format!("full-build/{n}"), |bench| {
            bench.iter(|| {
                let mut builder = Builder::default();
                black_box(
                    translate_desired(&a, &mut builder, &Snapshot::default(), 1).expect("valid"),
                )
            });
        });
        let mut builder = Builder::default();
        let mut base = translate_desired(&a, &mut builder, &Snapshot::default(), 1)
            .expect("valid")
            .snapshot;
        let mut flip = false;
        group.bench_function(format!("one-restated/{n}"), |bench| {
            bench.iter(|| {
                flip = !flip;
                let d = if flip { &b } else { &a };
                base = translate_desired(d, &mut builder, &base, 2)
                    .expect("valid")
                    .snapshot;
            });
        });
        group.bench_function(format!("one-changed/{n}"), |bench| {
            bench.iter(|| {
                flip = !flip;
                let d = if flip { &b } else { &a };
                let change = Change {
                    remove: Vec::new(),
                    upsert: vec![d[(n / 2) as usize].clone()],
                };
                base = builder
                    .apply(&base, change, 2, OnRefusal::KeepPrevious)
                    .expect("valid")
                    .snapshot;
            });
        });
    }
    group.finish();
}

criterion_group!(benches, snapshots);
criterion_main!(benches);
