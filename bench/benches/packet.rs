//! Packet-layer stages on minimum-size frames: parse (xlb's hand-written walk against
//! etherparse's), DNAT rewrite with checksum update, and the three together.
//!
//! Each iteration handles a batch of 64 frames of one kind (distinct source ports), so
//! criterion's throughput is packets per second; ns per packet is the time divided by 64.
//! Frames are 64 bytes (IPv4 TCP and UDP, IPv6 UDP) or the 74-byte minimum of IPv6 TCP.

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use xlb_bench::etherparse_key;
use xlb_dataplane::packet::builder::pkt;
use xlb_dataplane::packet::{parse, set_destination, Parsed};

const BATCH: usize = 64;

fn frames(kind: &str) -> Vec<Vec<u8>> {
    let (c4, v4) = ([198, 18, 0, 1].into(), [198, 18, 64, 1].into());
    let c6 = "2001:2::1".parse().unwrap();
    let v6 = "2001:2::40:1".parse().unwrap();
    (0..BATCH as u16)
        .map(|i| {
            let sport = 40000 + i;
            let b = match kind {
                "tcp4" => pkt().ipv4(c4, v4).tcp(sport, 80).ack(),
                "udp4" => pkt().ipv4(c4, v4).udp(sport, 53),
                "tcp6" => pkt().ipv6(c6, v6).tcp(sport, 80).ack(),
                _ => pkt().ipv6(c6, v6).udp(sport, 53),
            };
            b.pad_to(64).build()
        })
        .collect()
}

fn backends(kind: &str) -> [IpAddr; 2] {
    if kind.ends_with('4') {
        [[198, 18, 128, 2].into(), [198, 18, 128, 3].into()]
    } else {
        [
            "2001:2::80:2".parse().unwrap(),
            "2001:2::80:3".parse().unwrap(),
        ]
    }
}

const KINDS: [&str; 4] = ["tcp4", "udp4", "tcp6", "udp6"];

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
                for (frame, p) in batch.iter_mut().zip(parsed.iter_mut()) {
                    let r = set_destination(frame, p, black_box(backends[turn]), 8080);
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
                for frame in &mut batch {
                    if let Ok(mut p) = parse(black_box(frame)) {
                        black_box(p.key);
                        let r = set_destination(frame, &mut p, black_box(backends[turn]), 8080);
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
