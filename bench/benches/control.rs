//! Building snapshots from desired state: a full build of N Services (each with four
//! backends and its Maglev table) against a rebuild after one Service changed, which reuses
//! the other N - 1 built Services.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion};
use xlb_control::config::{BackendStateConfig, NoBackendConfig, ProtocolConfig, SchedulerConfig};
use xlb_control::desired::{DesiredBackend, DesiredService};
use xlb_control::translate::{translate_desired, Builder};

fn desired(n: u32) -> Vec<DesiredService> {
    (0..n)
        .map(|i| DesiredService {
            name: format!("s{i}"),
            vip: IpAddr::V4(Ipv4Addr::from(0xc613_0001 + i / 4)),
            port: 80 + (i % 4) as u16,
            protocol: ProtocolConfig::Udp,
            backends: (1..=4u8)
                .map(|b| DesiredBackend {
                    address: IpAddr::V4(Ipv4Addr::new(198, 18, 128 + b, 1)),
                    port: 5353,
                    weight: 1,
                    state: BackendStateConfig::Ready,
                })
                .collect(),
            scheduler: SchedulerConfig::Maglev,
            affinity_timeout: None,
            no_backend: NoBackendConfig::Reject,
            table_size: None,
        })
        .collect()
}

fn snapshots(c: &mut Criterion) {
    let mut group = c.benchmark_group("snapshot");
    group.sample_size(10);
    for n in [10_000u32, 100_000] {
        let a = desired(n);
        let mut b = a.clone();
        b[(n / 2) as usize].backends[0].weight = 2;
        group.bench_function(format!("full-build/{n}"), |bench| {
            bench.iter(|| {
                let mut builder = Builder::default();
                black_box(translate_desired(&a, &mut builder, 1).expect("valid"))
            });
        });
        let mut builder = Builder::default();
        translate_desired(&a, &mut builder, 1).expect("valid");
        let mut flip = false;
        group.bench_function(format!("one-changed/{n}"), |bench| {
            bench.iter(|| {
                flip = !flip;
                let d = if flip { &b } else { &a };
                black_box(translate_desired(d, &mut builder, 2).expect("valid"))
            });
        });
    }
    group.finish();
}

criterion_group!(benches, snapshots);
criterion_main!(benches);
