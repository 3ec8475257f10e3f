//! The flow table: lookup hit, lookup miss and insert of new flows, with 1 000, 100 000 and
//! 1 000 000 live flows in a table sized for them (capacity twice the flows), one thread; and
//! hits and inserts at 100 000 flows with a second thread working the same table; and a scan
//! of 1 000 000 live flows, counted and recounted per backend (the chores thread's).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use xlb_dataplane::lb::flow::{FlowState, FlowTable, FlowValue, Insert, Timeouts};
use xlb_dataplane::lb::hash::flow_hash;
use xlb_dataplane::packet::{key_addr, Family, FlowKey, IpProto};

const BATCH: usize = 64;

fn key(n: u32) -> FlowKey {
    FlowKey::new(
        Family::Ipv4,
        IpProto::TCP,
        (
            key_addr(std::net::Ipv4Addr::from(0xc612_0000 | (n >> 16)).into()),
            n as u16,
        ),
        (key_addr([198, 18, 64, 1].into()), 80),
    )
}

/// The value new flows are inserted with.
const NEW_FLOW: FlowValue = FlowValue::Forward {
    service: 1,
    backend: 1,
    snat_port: 0,
};

/// A table holding `flows` established flows, and their keys with hashes.
fn filled(flows: u32) -> (FlowTable, Vec<(FlowKey, u64)>) {
    let table = FlowTable::new(flows as usize * 2, Timeouts::default());
    let keys: Vec<(FlowKey, u64)> = (0..flows).map(|n| (key(n), flow_hash(&key(n)))).collect();
    for (n, (k, h)) in keys.iter().enumerate() {
        let v = FlowValue::Forward {
            service: 1,
            backend: n as u32,
            snat_port: 0,
        };
        let _ = table.insert(k, *h, v, FlowState::Established, 0);
    }
    (table, keys)
}

fn flow_table(c: &mut Criterion) {
    let mut group = c.benchmark_group("flow");
    group.throughput(Throughput::Elements(BATCH as u64));
    for flows in [1_000u32, 100_000, 1_000_000] {
        let (table, keys) = filled(flows);
        // Batches walk the keys with a stride, so large tables miss the cache as traffic does.
        let mut at = 0usize;
        group.bench_function(format!("hit/{flows}"), |b| {
            b.iter(|| {
                for _ in 0..BATCH {
                    at = (at + 7919) % keys.len();
                    let (k, h) = &keys[at];
                    black_box(table.lookup(k, *h, 1));
                }
            });
        });
        // The same, stage by stage as a worker runs a batch: prefetch all, then look up all.
        // (A middle stage prefetching the matching bodies measured slower: 92 against 64 ns
        // at 100 000 flows.)
        let mut at = 0usize;
        group.bench_function(format!("hit-batched/{flows}"), |b| {
            b.iter(|| {
                let mut batch = [0usize; BATCH];
                for slot in &mut batch {
                    at = (at + 7919) % keys.len();
                    *slot = at;
                    table.prefetch(keys[at].0.family, keys[at].1);
                }
                for &i in &batch {
                    let (k, h) = &keys[i];
                    black_box(table.lookup(k, *h, 1));
                }
            });
        });
        let absent: Vec<(FlowKey, u64)> = (0..BATCH as u32)
            .map(|i| {
                let k = key(flows + 1 + i * 31);
                (k, flow_hash(&k))
            })
            .collect();
        group.bench_function(format!("miss/{flows}"), |b| {
            b.iter(|| {
                for (k, h) in &absent {
                    black_box(table.lookup(k, *h, 1));
                }
            });
        });
        // New flows into the filled table (new state: they evict each other, never the
        // established ones); a fresh batch of keys each iteration.
        let mut next = flows + 10_000_000;
        group.bench_function(format!("insert/{flows}"), |b| {
            b.iter_batched(
                || {
                    next = next.wrapping_add(BATCH as u32);
                    (0..BATCH as u32)
                        .map(|i| {
                            let k = key(next + i);
                            (k, flow_hash(&k))
                        })
                        .collect::<Vec<_>>()
                },
                |batch| {
                    for (k, h) in &batch {
                        let r = table.insert(k, *h, NEW_FLOW, FlowState::New, 2);
                        black_box(matches!(r, Insert::Inserted(_)));
                    }
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

/// Hits and inserts on one thread while a second thread does the same on the same table (the
/// two cores of this machine): the cost of sharing, cache lines moving between cores.
fn two_threads(c: &mut Criterion) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut group = c.benchmark_group("flow-2threads");
    group.throughput(Throughput::Elements(BATCH as u64));
    let flows = 100_000u32;
    let (table, keys) = filled(flows);
    let table = Arc::new(table);
    let keys = Arc::new(keys);
    let stop = Arc::new(AtomicBool::new(false));
    let other = {
        let (table, keys, stop) = (Arc::clone(&table), Arc::clone(&keys), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut at = 1usize;
            let mut next = 50_000_000u32;
            while !stop.load(Ordering::Relaxed) {
                at = (at + 104_729) % keys.len();
                let (k, h) = &keys[at];
                black_box(table.lookup(k, *h, 1));
                next = next.wrapping_add(1);
                let fresh = key(next);
                let _ = table.insert(&fresh, flow_hash(&fresh), NEW_FLOW, FlowState::New, 2);
            }
        })
    };
    let mut at = 0usize;
    group.bench_function("hit/100000", |b| {
        b.iter(|| {
            for _ in 0..BATCH {
                at = (at + 7919) % keys.len();
                let (k, h) = &keys[at];
                black_box(table.lookup(k, *h, 1));
            }
        });
    });
    let mut next = 10_000_000u32;
    group.bench_function("insert/100000", |b| {
        b.iter(|| {
            for _ in 0..BATCH {
                next = next.wrapping_add(1);
                let k = key(next);
                black_box(table.insert(&k, flow_hash(&k), NEW_FLOW, FlowState::New, 2));
            }
        });
    });
    group.finish();
    stop.store(true, Ordering::Relaxed);
    let _ = other.join();
}

/// A whole-table scan: 1 000 000 live flows in a table of 2 000 000, counted, and recounted
/// per backend as the chores thread does it (`control::chores` says how often) for 100 000
/// Services of 10 backends each, the flows spread over them.
fn scan(c: &mut Criterion) {
    use std::num::NonZeroU32;
    use std::sync::Arc;
    use xlb_dataplane::lb::maglev::TableCache;
    use xlb_dataplane::lb::recount::recount_live_flows;
    use xlb_dataplane::lb::snapshot::{
        Backend, BackendId, BackendState, Service, ServiceId, ServiceKey, ServiceSpec, Snapshot,
    };
    use xlb_dataplane::packet::Endpoint;
    let mut group = c.benchmark_group("flow-scan");
    group.sample_size(10);
    let (table, _) = filled(1_000_000);
    group.bench_function("count/1000000", |b| {
        b.iter(|| black_box(table.iter(1).count()));
    });
    let id = |n: u32| NonZeroU32::MIN.saturating_add(n);
    let backends: Vec<Backend> = (0..10u8)
        .map(|n| Backend {
            id: BackendId(id(u32::from(n))),
            endpoint: Endpoint::new([198, 19, 0, n].into(), 8080),
            state: BackendState::Ready,
            weight: 1,
        })
        .collect();
    let mut tables = TableCache::default();
    let services = (0..100_000u32)
        .map(|n| {
            let key = ServiceKey {
                vip: Endpoint::new(std::net::Ipv4Addr::from(0xc613_0000 + n).into(), 80),
                proto: IpProto::TCP,
            };
            let spec = ServiceSpec::new(ServiceId(id(n)), key, backends.clone());
            Arc::new(Service::sharing(spec, &mut tables).expect("valid"))
        })
        .collect();
    let snapshot = Snapshot::new(1, services).expect("distinct Services");
    let spread = FlowTable::new(2_000_000, Timeouts::default());
    for n in 0..1_000_000u32 {
        let v = FlowValue::Forward {
            service: id(n % 100_000).get(),
            backend: id(n % 10).get(),
            snat_port: 0,
        };
        let _ = spread.insert(&key(n), flow_hash(&key(n)), v, FlowState::Established, 0);
    }
    group.bench_function("recount/1000000-flows-100000-services", |b| {
        b.iter(|| black_box(recount_live_flows(&snapshot, &spread, 1)));
    });
    group.finish();
}

criterion_group!(benches, flow_table, two_threads, scan);
criterion_main!(benches);
