//! Packet-layer stages on minimum-size frames: parse (xlb's hand-written walk against
//! etherparse's), DNAT rewrite with checksum update, and the three together.
//!
//! Each iteration handles a batch of 64 frames of one kind (distinct source ports), so
//! criterion's throughput is packets per second; ns per packet is the time divided by 64.
//! Frames are 64 bytes (IPv4 TCP and UDP, IPv6 UDP) or the 74-byte minimum of IPv6 TCP.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use xlb_bench::{backends, etherparse_key, frames, BATCH, KINDS};
use xlb_dataplane::packet::{parse, set_destination, Parsed};

fn parse_stage(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Elements(BATCH as u64));
    for kind in KINDS {
        let batch = frames(kind);
        // Stage by stage, as the worker runs: the batch's results land in an array first.
        let mut keys = [None; BATCH];
        group.bench_function(format!("xlb/{kind}"), |b| {
            b.iter(|| {
                for (frame, key) in batch.iter().zip(keys.iter_mut()) {
                    *key = parse(black_box(frame)).ok().map(|p| p.key);
                }
                black_box(&keys);
            });
        });
        group.bench_function(format!("etherparse/{kind}"), |b| {
            b.iter(|| {
                for (frame, key) in batch.iter().zip(keys.iter_mut()) {
                    *key = etherparse_key(black_box(frame));
                }
                black_box(&keys);
            });
        });
    }
    group.finish();
}

fn dnat_stage(c: &mut Criterion) {
    let mut group = c.benchmark_group("dnat");
    group.throughput(Throughput::Elements(BATCH as u64));
    for kind in KINDS {
        let mut batch = frames(kind);
        let mut parsed: Vec<Parsed> = batch.iter().map(|f| parse(f).unwrap()).collect();
        let backends = backends(kind);
        let mut turn = 0;
        group.bench_function(kind, |b| {
            b.iter(|| {
                turn ^= 1;
                // The backend comes from memory written long before, as from a snapshot: a
                // black_box of the value itself would store and reload it per packet.
                let backends = black_box(&backends);
                for (frame, p) in batch.iter_mut().zip(parsed.iter_mut()) {
                    let r = set_destination(frame, p, &backends[turn]);
                    black_box(r).ok();
                }
            });
        });
    }
    group.finish();
}

fn pipeline(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse+key+dnat");
    group.throughput(Throughput::Elements(BATCH as u64));
    for kind in KINDS {
        let mut batch = frames(kind);
        let backends = backends(kind);
        let mut turn = 0;
        group.bench_function(kind, |b| {
            b.iter(|| {
                turn ^= 1;
                let backends = black_box(&backends);
                for frame in &mut batch {
                    if let Ok(mut p) = parse(black_box(frame)) {
                        black_box(&p.key);
                        let r = set_destination(frame, &mut p, &backends[turn]);
                        black_box(r).ok();
                    }
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, parse_stage, dnat_stage, pipeline);
criterion_main!(benches);
