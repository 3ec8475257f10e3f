//! The worker loop over in-memory rings: what goes in on the client port comes out on the
//! backend port rewritten (and back), refusals leave by the port they came in by, frames
//! for unresolved next hops are held, reported and sent once resolved, tagged frames leave
//! untagged, and no frame of the pool is ever lost.

mod common;

use std::num::NonZeroU32;
use std::sync::Arc;

use arc_swap::ArcSwap;
use common::*;
use xlb_dataplane::lb::flow::{FlowTable, Timeouts};
use xlb_dataplane::lb::snapshot::{
    Backend, BackendId, BackendState, Service, ServiceId, ServiceKey, ServiceSpec, Snapshot,
};
use xlb_dataplane::packet::builder::pkt;
use xlb_dataplane::packet::{key_addr, parse, Endpoint, Family, IpProto, MacAddr};
use xlb_dataplane::worker::{
    Clock, NextHop, NextHops, NoticeKind, Reports, Shared, Tables, Worker, WorkerStats, BATCH,
    PER_ADDRESS,
};
use xlb_dataplane::xsk::{MemFrame, MemRing};

const CLIENT_PORT: usize = 0;
const BACKEND_PORT: usize = 1;
const FRAMES: u32 = 512;

fn service(backends: &[u8]) -> Arc<Service> {
    service_of(IpProto::TCP, backends)
}

fn service_of(proto: IpProto, backends: &[u8]) -> Arc<Service> {
    let backends = backends
        .iter()
        .map(|&n| Backend {
            id: BackendId(NonZeroU32::new(u32::from(n)).unwrap()),
            endpoint: Endpoint::new([198, 18, 128, n].into(), 8080),
            state: BackendState::Ready,
            weight: 1,
        })
        .collect();
    let key = ServiceKey {
        vip: Endpoint::new(VIP.into(), 80),
        proto,
    };
    Arc::new(
        Service::new(ServiceSpec::new(
            ServiceId(NonZeroU32::new(1).unwrap()),
            key,
            backends,
        ))
        .unwrap(),
    )
}

fn hops(backends: &[u8]) -> NextHops {
    let client = NextHop {
        port: CLIENT_PORT as u16,
        src_mac: NODE_MAC,
        dst_mac: CLIENT_MAC,
    };
    let mut hosts = vec![(Family::Ipv4, key_addr(CLIENT.into()), client)];
    for &n in backends {
        hosts.push((
            Family::Ipv4,
            key_addr([198, 18, 128, n].into()),
            NextHop {
                port: BACKEND_PORT as u16,
                src_mac: NODE_OUT_MAC,
                dst_mac: MacAddr([2, 0, 0, 0, 2, n]),
            },
        ));
    }
    NextHops::new(hosts, Vec::new())
}

struct Rig {
    io: MemRing,
    worker: Worker<MemFrame>,
    reports: Arc<Reports>,
    tables: Arc<ArcSwap<Tables>>,
    stats: Arc<WorkerStats>,
}

fn rig(services: Vec<Arc<Service>>, hops: NextHops) -> Rig {
    rig_with(services, hops, None)
}

/// A rig whose worker translates sources from `snat` (snat mode) when given one.
fn rig_with(
    services: Vec<Arc<Service>>,
    hops: NextHops,
    snat: Option<xlb_dataplane::lb::decide::SnatPool>,
) -> Rig {
    rig_adjusted(services, hops, snat, |worker| worker)
}

/// A rig whose worker `adjust` configures further (dsr, a node's link).
fn rig_adjusted(
    services: Vec<Arc<Service>>,
    hops: NextHops,
    snat: Option<xlb_dataplane::lb::decide::SnatPool>,
    adjust: impl FnOnce(Worker<MemFrame>) -> Worker<MemFrame>,
) -> Rig {
    let tables = Arc::new(ArcSwap::from_pointee(Tables {
        snapshot: Arc::new(Snapshot::new(1, services).unwrap()),
        hops,
    }));
    let reports = Arc::new(Reports::unwatched(16));
    let shared = Shared {
        tables: Arc::clone(&tables),
        flows: Arc::new(FlowTable::new(4096, Timeouts::default())),
        clock: Clock::start(),
        reports: Arc::clone(&reports),
        fragments: Arc::default(),
    };
    let stats = Arc::new(WorkerStats::new(2));
    Rig {
        io: MemRing::new(2, FRAMES, 2048, 4096),
        worker: adjust(Worker::new(shared, 2, snat, Arc::clone(&stats), 7)),
        reports,
        tables,
        stats,
    }
}

fn syn(port: u16) -> Vec<u8> {
    pkt()
        .eth(CLIENT_MAC, NODE_MAC)
        .ipv4(CLIENT, VIP)
        .tcp(port, 80)
        .syn()
        .build()
}

#[test]
fn a_syn_leaves_by_the_backend_port_rewritten_and_its_reply_returns_with_the_vip() {
    let mut rig = rig(vec![service(&[1, 2])], hops(&[1, 2]));
    assert!(rig.io.inject(CLIENT_PORT, &syn(40000)));
    assert_eq!(rig.worker.poll(&mut rig.io), 1);
    let out = rig.io.transmitted(BACKEND_PORT);
    assert_eq!(out.len(), 1);
    let p = parse(&out[0]).unwrap();
    let backend = p.key.dst_addr[3];
    assert!(backend == 1 || backend == 2);
    assert_eq!(p.key.dst_port, 8080);
    assert_eq!(p.key.src_ip(), std::net::IpAddr::from(CLIENT));
    assert_eq!(
        &out[0][..6],
        &[2, 0, 0, 0, 2, backend],
        "next hop MAC of the backend"
    );
    assert_eq!(&out[0][6..12], &NODE_OUT_MAC.0, "the egress port's own MAC");

    let reply = pkt()
        .eth(MacAddr([2, 0, 0, 0, 2, backend]), NODE_OUT_MAC)
        .ipv4([198, 18, 128, backend].into(), CLIENT)
        .tcp(8080, 40000)
        .syn()
        .ack()
        .build();
    assert!(rig.io.inject(BACKEND_PORT, &reply));
    rig.worker.poll(&mut rig.io);
    let back = rig.io.transmitted(CLIENT_PORT);
    assert_eq!(back.len(), 1);
    let p = parse(&back[0]).unwrap();
    assert_eq!(p.key.src_ip(), std::net::IpAddr::from(VIP));
    assert_eq!(p.key.src_port, 80);
    assert_eq!(&back[0][..6], &CLIENT_MAC.0);
    assert_eq!(
        rig.io.free_frames(),
        FRAMES as usize,
        "every frame back in the pool"
    );
    let c = rig.stats.load();
    assert_eq!(
        (c.decide.forwarded, c.decide.replied, c.io.received),
        (1, 1, 2)
    );
}

/// A batch's reverse entries are recorded after its decisions (all together, so that their
/// cache misses overlap) but before anything is sent: the replies of a batch of new flows find
/// their entries, none is recreated from scratch.
#[test]
fn the_replies_of_a_batch_of_new_flows_find_the_entries_their_batch_recorded() {
    use xlb_dataplane::lb::decide::Event;
    let mut rig = rig(vec![service(&[1, 2])], hops(&[1, 2]));
    let flows = 40_000..40_032u16;
    for port in flows.clone() {
        assert!(rig.io.inject(CLIENT_PORT, &syn(port)));
    }
    assert_eq!(rig.worker.poll(&mut rig.io), flows.len());
    let out = rig.io.transmitted(BACKEND_PORT);
    assert_eq!(out.len(), flows.len());
    for frame in &out {
        let p = parse(frame).unwrap();
        let backend = p.key.dst_addr[3];
        let reply = pkt()
            .eth(MacAddr([2, 0, 0, 0, 2, backend]), NODE_OUT_MAC)
            .ipv4([198, 18, 128, backend].into(), CLIENT)
            .tcp(8080, p.key.src_port)
            .syn()
            .ack()
            .build();
        assert!(rig.io.inject(BACKEND_PORT, &reply));
    }
    rig.worker.poll(&mut rig.io);
    assert_eq!(rig.io.transmitted(CLIENT_PORT).len(), flows.len());
    let c = rig.stats.load();
    assert_eq!(c.decide.replied, flows.len() as u64);
    assert_eq!(
        c.decide.events[Event::Recreated.index()]
            + c.decide.events[Event::RecreatedUnpicked.index()],
        0,
        "every reply found its flow's reverse entry"
    );
}

#[test]
fn a_service_without_backends_is_answered_by_a_reset_out_of_the_client_port() {
    let mut rig = rig(vec![service(&[])], hops(&[]));
    rig.io.inject(CLIENT_PORT, &syn(40001));
    rig.worker.poll(&mut rig.io);
    let out = rig.io.transmitted(CLIENT_PORT);
    assert_eq!(out.len(), 1);
    let p = parse(&out[0]).unwrap();
    assert_eq!(p.key.src_ip(), std::net::IpAddr::from(VIP));
    assert!(p.tcp_flags.contains(xlb_dataplane::packet::TcpFlags::RST));
    assert_eq!(&out[0][..6], &CLIENT_MAC.0, "Ethernet addresses swapped");
    assert_eq!(rig.worker.counters().decide.rejected, 1);
}

/// Issue 11, fault 6: the first packet to a host whose neighbour entry xlb had not read yet
/// (a new client's SYN-ACK) was dropped, and the connection waited a whole retransmission.
#[test]
fn a_packet_without_a_next_hop_is_held_reported_and_sent_once_resolved() {
    let mut rig = rig(vec![service(&[1])], hops(&[]));
    rig.io.inject(CLIENT_PORT, &syn(40002));
    rig.worker.poll(&mut rig.io);
    assert!(rig.io.transmitted(BACKEND_PORT).is_empty());
    let (family, addr) = rig
        .reports
        .next_unresolved()
        .expect("reported to the control thread");
    assert_eq!(
        (family, addr),
        (Family::Ipv4, key_addr([198, 18, 128, 1].into()))
    );
    assert!(
        rig.reports.next_notice().is_none(),
        "held, not dropped: nothing to log yet"
    );
    // The control thread resolves it and publishes next hops: the held frame leaves at the
    // worker's next loop, with the backend's Ethernet address.
    let snapshot = Arc::clone(&rig.tables.load().snapshot);
    rig.tables.store(Arc::new(Tables {
        snapshot,
        hops: hops(&[1]),
    }));
    rig.worker.poll(&mut rig.io);
    let out = rig.io.transmitted(BACKEND_PORT);
    assert_eq!(out.len(), 1);
    assert_eq!(&out[0][..6], &[2, 0, 0, 0, 2, 1]);
    let c = rig.worker.counters();
    assert_eq!((c.io.held, c.io.no_next_hop), (1, 0));
    assert_eq!(rig.io.free_frames(), FRAMES as usize);
}

#[test]
fn only_the_last_few_frames_per_unresolved_address_are_held_and_the_rest_counted() {
    let mut rig = rig(vec![service(&[1])], hops(&[]));
    let sent = PER_ADDRESS as u16 + 2;
    for port in 0..sent {
        rig.io.inject(CLIENT_PORT, &syn(41000 + port));
    }
    rig.worker.poll(&mut rig.io);
    let c = rig.worker.counters();
    assert_eq!(c.io.no_next_hop, 2);
    assert!(rig.reports.next_unresolved().is_some());
    assert!(rig.reports.next_unresolved().is_none(), "reported once");
    let notice = rig.reports.next_notice().expect("the drops are noticed");
    assert_eq!(notice.kind, NoticeKind::NoNextHop);
    assert_eq!(notice.key.dst_addr, key_addr([198, 18, 128, 1].into()));
    assert!(rig.reports.next_notice().is_none(), "once a second");
    // At stop, held frames go back to the pool.
    rig.worker.run(&mut rig.io, || true);
    assert_eq!(rig.io.free_frames(), FRAMES as usize);
}

/// Issue 11, fault 10: a frame with one VLAN tag was forwarded still tagged, and the untagged
/// backend dropped it.
#[test]
fn a_tagged_frame_leaves_untagged_and_a_refusal_answers_on_its_tag() {
    let mut rig = rig(vec![service(&[1])], hops(&[1]));
    let tagged = pkt()
        .eth(CLIENT_MAC, NODE_MAC)
        .vlan(100)
        .ipv4(CLIENT, VIP)
        .tcp(40005, 80)
        .syn()
        .payload(b"hello")
        .build();
    rig.io.inject(CLIENT_PORT, &tagged);
    rig.worker.poll(&mut rig.io);
    let out = rig.io.transmitted(BACKEND_PORT);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].len(), tagged.len() - 4);
    let p = parse(&out[0]).unwrap();
    assert_eq!(p.l3_offset, 14, "no tag");
    assert_eq!(p.key.dst_addr, key_addr([198, 18, 128, 1].into()));
    assert!(out[0].ends_with(b"hello"));
    let described = xlb_dataplane::packet::Layers(&out[0]).to_string();
    assert!(!described.contains("BAD"), "{described}");

    let mut rig = rig_without_backends();
    let syn_tagged = pkt()
        .eth(CLIENT_MAC, NODE_MAC)
        .vlan(100)
        .ipv4(CLIENT, VIP)
        .tcp(40006, 80)
        .syn()
        .build();
    rig.io.inject(CLIENT_PORT, &syn_tagged);
    rig.worker.poll(&mut rig.io);
    let back = rig.io.transmitted(CLIENT_PORT);
    assert_eq!(back.len(), 1);
    assert_eq!(
        parse(&back[0]).unwrap().l3_offset,
        18,
        "the reset keeps the tag"
    );
}

/// A SYN to the node itself: nothing of xlb's.
fn not_for_xlb() -> Vec<u8> {
    pkt()
        .eth(CLIENT_MAC, NODE_MAC)
        .ipv4(CLIENT, ROUTER)
        .tcp(1, 22)
        .syn()
        .build()
}

fn rig_without_backends() -> Rig {
    rig(vec![service(&[])], hops(&[]))
}

#[test]
fn malformed_frames_and_traffic_not_for_xlb_are_counted_and_dropped() {
    let mut rig = rig(vec![service(&[1])], hops(&[1]));
    rig.io.inject(CLIENT_PORT, &syn(40004)[..20]);
    let other = not_for_xlb();
    rig.io.inject(CLIENT_PORT, &other);
    rig.worker.poll(&mut rig.io);
    let c = rig.worker.counters();
    assert_eq!(c.decide.malformed.iter().sum::<u64>(), 1);
    assert_eq!(c.decide.passed, 1);
    assert!(rig.io.transmitted(BACKEND_PORT).is_empty());
    assert_eq!(rig.io.free_frames(), FRAMES as usize);
}

#[test]
fn a_full_transmit_ring_drops_the_excess_without_losing_frames() {
    let mut rig = rig(vec![service(&[1])], hops(&[1]));
    rig.io = MemRing::new(2, FRAMES, 2048, 10);
    for port in 0..BATCH as u16 {
        assert!(rig.io.inject(CLIENT_PORT, &syn(30000 + port)));
    }
    assert_eq!(rig.worker.poll(&mut rig.io), BATCH);
    assert_eq!(rig.io.transmitted(BACKEND_PORT).len(), 10);
    assert_eq!(rig.worker.counters().io.tx_ring_full, BATCH as u64 - 10);
    assert_eq!(rig.io.free_frames(), FRAMES as usize);
}

#[test]
fn a_new_snapshot_is_picked_up_on_the_next_loop() {
    let tables = Arc::new(ArcSwap::from_pointee(Tables::empty()));
    let shared = Shared {
        tables: Arc::clone(&tables),
        flows: Arc::new(FlowTable::new(4096, Timeouts::default())),
        clock: Clock::start(),
        reports: Arc::new(Reports::unwatched(4)),
        fragments: Arc::default(),
    };
    let mut worker = Worker::new(shared, 2, None, Arc::new(WorkerStats::new(2)), 1);
    let mut io = MemRing::new(2, FRAMES, 2048, 4096);
    io.inject(CLIENT_PORT, &syn(40003));
    worker.poll(&mut io);
    assert_eq!(worker.counters().decide.passed, 1, "no Service yet");
    tables.store(Arc::new(Tables {
        snapshot: Arc::new(Snapshot::new(2, vec![service(&[1])]).unwrap()),
        hops: hops(&[1]),
    }));
    io.inject(CLIENT_PORT, &syn(40003));
    worker.poll(&mut io);
    assert_eq!(io.transmitted(BACKEND_PORT).len(), 1);
}

#[test]
fn in_snat_mode_the_backend_sees_the_snat_address_and_the_reply_finds_the_client() {
    let pool = xlb_dataplane::lb::decide::SnatPool::new(Some(SNAT), None, 40000, 100);
    let Rig {
        mut worker, mut io, ..
    } = rig_with(vec![service(&[1])], hops(&[1]), Some(pool));
    io.inject(CLIENT_PORT, &syn(50000));
    worker.poll(&mut io);
    let out = io.transmitted(BACKEND_PORT);
    assert_eq!(out.len(), 1);
    let p = parse(&out[0]).unwrap();
    assert_eq!(
        p.key.src_ip(),
        std::net::IpAddr::from(SNAT),
        "the source is xlb's"
    );
    let snat_port = p.key.src_port;
    assert!(
        (40000..40100).contains(&snat_port),
        "from the worker's range: {snat_port}"
    );

    let reply = pkt()
        .eth(MacAddr([2, 0, 0, 0, 2, 1]), NODE_OUT_MAC)
        .ipv4([198, 18, 128, 1].into(), SNAT)
        .tcp(8080, snat_port)
        .syn()
        .ack()
        .build();
    io.inject(BACKEND_PORT, &reply);
    worker.poll(&mut io);
    let back = io.transmitted(CLIENT_PORT);
    assert_eq!(back.len(), 1);
    let p = parse(&back[0]).unwrap();
    assert_eq!(
        (
            p.key.src_ip(),
            p.key.src_port,
            p.key.dst_ip(),
            p.key.dst_port
        ),
        (VIP.into(), 80, CLIENT.into(), 50000),
        "the reply comes from the VIP to the client's own port"
    );
    assert_eq!(io.free_frames(), FRAMES as usize);
}

#[test]
fn an_sctp_association_is_forwarded_with_valid_checksums_both_ways_in_dnat_and_snat() {
    for snat in [false, true] {
        let pool =
            snat.then(|| xlb_dataplane::lb::decide::SnatPool::new(Some(SNAT), None, 40000, 100));
        let Rig {
            mut worker,
            mut io,
            stats,
            ..
        } = rig_with(vec![service_of(IpProto::SCTP, &[1])], hops(&[1]), pool);
        // INIT (chunk type 1) from the client to the VIP.
        let init = pkt()
            .eth(CLIENT_MAC, NODE_MAC)
            .ipv4(CLIENT, VIP)
            .sctp(50000, 80, 0)
            .payload(&[
                1, 0, 0, 20, 1, 2, 3, 4, 0, 0, 0xff, 0xff, 0, 10, 0, 10, 0, 0, 0, 1,
            ])
            .build();
        io.inject(CLIENT_PORT, &init);
        worker.poll(&mut io);
        let out = io.transmitted(BACKEND_PORT);
        assert_eq!(out.len(), 1, "snat {snat}");
        let p = parse(&out[0]).unwrap();
        assert_eq!(p.key.proto, IpProto::SCTP);
        assert_eq!(
            (p.key.dst_ip(), p.key.dst_port),
            ([198, 18, 128, 1].into(), 8080)
        );
        let seen = (p.key.src_ip(), p.key.src_port);
        if snat {
            assert_eq!(seen.0, std::net::IpAddr::from(SNAT));
        } else {
            assert_eq!(seen, (CLIENT.into(), 50000));
        }
        assert!(
            sctp_crc_is_valid(&out[0][usize::from(p.l4_offset)..]),
            "snat {snat}"
        );

        // INIT ACK (chunk type 2) back from the backend.
        let to = match seen.0 {
            std::net::IpAddr::V4(a) => a,
            std::net::IpAddr::V6(_) => unreachable!(),
        };
        let ack = pkt()
            .eth(MacAddr([2, 0, 0, 0, 2, 1]), NODE_OUT_MAC)
            .ipv4([198, 18, 128, 1].into(), to)
            .sctp(8080, seen.1, 0x0102_0304)
            .payload(&[
                2, 0, 0, 20, 5, 6, 7, 8, 0, 0, 0xff, 0xff, 0, 10, 0, 10, 0, 0, 0, 1,
            ])
            .build();
        io.inject(BACKEND_PORT, &ack);
        worker.poll(&mut io);
        let back = io.transmitted(CLIENT_PORT);
        assert_eq!(back.len(), 1, "snat {snat}");
        let p = parse(&back[0]).unwrap();
        assert_eq!(
            (
                p.key.src_ip(),
                p.key.src_port,
                p.key.dst_ip(),
                p.key.dst_port
            ),
            (VIP.into(), 80, CLIENT.into(), 50000),
            "snat {snat}"
        );
        assert!(
            sctp_crc_is_valid(&back[0][usize::from(p.l4_offset)..]),
            "snat {snat}"
        );
        let c = stats.load();
        assert_eq!(
            (c.decide.forwarded, c.decide.replied),
            (1, 1),
            "snat {snat}"
        );
        assert_eq!(io.free_frames(), FRAMES as usize);
    }
}

/// On a node (issue 13) the kernel routes traffic into xlb's link and xlb is the only way
/// back: a packet that is the kernel's after all leaves by the link unchanged but for its
/// Ethernet addresses (the link's peer, the kernel's side), counted; Service traffic is
/// still translated.
#[test]
fn with_a_node_link_packets_that_are_the_kernels_are_handed_back_through_it_unchanged() {
    let link = NextHop {
        port: BACKEND_PORT as u16,
        src_mac: NODE_OUT_MAC,
        dst_mac: MacAddr([2, 0, 0, 0, 9, 9]),
    };
    let mut rig = rig_adjusted(vec![service(&[1])], hops(&[1]), None, |w| {
        w.handing_back(link)
    });
    let other = not_for_xlb();
    // A datagram whose sender left its checksum to offload: handed back finished.
    let datagram = || {
        pkt()
            .eth(CLIENT_MAC, NODE_MAC)
            .ipv4(CLIENT, ROUTER)
            .udp(5000, 53)
            .payload(b"query")
    };
    let unfinished = datagram()
        .l4_checksum(xlb_dataplane::packet::builder::L4Checksum::PseudoHeaderOnly)
        .build();
    rig.io.inject(CLIENT_PORT, &other);
    rig.io.inject(CLIENT_PORT, &syn(40000));
    rig.io.inject(CLIENT_PORT, &unfinished);
    rig.worker.poll(&mut rig.io);
    let c = rig.worker.counters();
    assert_eq!((c.decide.passed, c.io.handed_back), (2, 2));
    assert_eq!(c.decide.forwarded, 1);
    let out = rig.io.transmitted(BACKEND_PORT);
    assert_eq!(out.len(), 3);
    let finished = out
        .iter()
        .find(|f| parse(f).unwrap().key.dst_port == 53)
        .expect("the datagram left by the link");
    assert_eq!(
        &finished[12..],
        &datagram().build()[12..],
        "checksum finished"
    );
    let back = out
        .iter()
        .find(|f| parse(f).unwrap().key.dst_port == 22)
        .expect("the kernel's packet left by the link");
    assert_eq!(
        &back[..6],
        &link.dst_mac.0,
        "to the kernel's side of the link"
    );
    assert_eq!(&back[6..12], &link.src_mac.0);
    assert_eq!(&back[12..], &other[12..], "otherwise unchanged");
}

/// Issue 14: a later fragment that overtakes its datagram's first fragment is held (not
/// dropped) and leaves, translated, right after the first; one whose first never comes is
/// dropped after a second, counted, its frame back in the pool.
#[test]
fn a_fragment_ahead_of_its_first_is_held_until_it_comes_or_dropped_after_a_second() {
    let mut rig = rig(vec![service_of(IpProto::UDP, &[1])], hops(&[1]));
    let piece = |id: u32, offset: u16| {
        let builder = pkt().eth(CLIENT_MAC, NODE_MAC).ipv4(CLIENT, VIP);
        let builder = if offset == 0 {
            builder.udp(5000, 80).payload(&[7; 1472])
        } else {
            builder.proto(IpProto::UDP).payload(&[7; 200])
        };
        builder.fragment(id, offset, offset == 0).build()
    };
    rig.io.inject(CLIENT_PORT, &piece(1, 1480));
    rig.worker.poll(&mut rig.io);
    assert!(rig.io.transmitted(BACKEND_PORT).is_empty(), "held");
    rig.io.inject(CLIENT_PORT, &piece(1, 0));
    rig.worker.poll(&mut rig.io);
    let out = rig.io.transmitted(BACKEND_PORT);
    assert_eq!(out.len(), 2, "the first and the held one");
    let backend = key_addr([198, 18, 128, 1].into());
    for frame in &out {
        let p = parse(frame).unwrap();
        assert_eq!(p.key.dst_addr, backend, "both translated");
    }
    // A fragment whose first never comes.
    rig.io.inject(CLIENT_PORT, &piece(2, 1480));
    rig.worker.poll(&mut rig.io);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    rig.worker.poll(&mut rig.io);
    assert_eq!(rig.worker.counters().io.fragments_expired, 1);
    assert!(rig.io.transmitted(BACKEND_PORT).is_empty());
    assert_eq!(
        rig.io.free_frames(),
        FRAMES as usize,
        "every frame back in the pool"
    );
}

/// Issue 14: in dsr mode a packet to a VIP leaves for its backend's Ethernet address with
/// its IP packet untouched (the VIP stays its destination: the backend holds it).
#[test]
fn in_dsr_mode_a_packet_leaves_for_its_backends_mac_with_its_ip_packet_unchanged() {
    let mut rig = rig_adjusted(vec![service(&[1])], hops(&[1]), None, |w| {
        w.direct_server_return()
    });
    let frame = syn(40000);
    rig.io.inject(CLIENT_PORT, &frame);
    rig.worker.poll(&mut rig.io);
    let out = rig.io.transmitted(BACKEND_PORT);
    assert_eq!(out.len(), 1);
    assert_eq!(&out[0][..6], &[2, 0, 0, 0, 2, 1], "to the backend's MAC");
    assert_eq!(&out[0][6..12], &NODE_OUT_MAC.0, "from the egress port's");
    assert_eq!(&out[0][12..], &frame[12..], "the IP packet unchanged");
    assert_eq!(rig.worker.counters().decide.forwarded, 1);
}
