//! `decide()` over real frames: new flows, established flows, replies, Services without
//! backends, backends that terminate or leave, and what production traffic does at the
//! edges (issue 11): SYN floods, a full table, restarts, port reuse, stale references.

mod common;

use std::num::NonZeroU32;
use std::sync::Arc;

use common::*;
use xlb_dataplane::lb::decide::{
    decide, Counters, DecideDrop, Env, Event, Mode, Refusal, SnatPool, Verdict, RECOGNISED_UP_TO,
};
use xlb_dataplane::lb::flow::{tick_of, FlowState, FlowTable, FlowValue, Timeouts};
use xlb_dataplane::lb::fragments::Fragments;
use xlb_dataplane::lb::hash::flow_hash;
use xlb_dataplane::lb::recount::recount_live_flows;
use xlb_dataplane::lb::snapshot::{
    Backend, BackendId, BackendState, NoBackend, Service, ServiceId, ServiceKey, ServiceSpec,
    Snapshot,
};
use xlb_dataplane::packet::builder::pkt;
use xlb_dataplane::packet::{parse, Endpoint, IpProto, Parsed};

fn id(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

fn backend(n: u8, state: BackendState) -> Backend {
    Backend {
        id: BackendId(id(u32::from(n))),
        endpoint: Endpoint::new([198, 18, 128, n].into(), 8080),
        state,
        weight: 1,
    }
}

fn service(proto: IpProto, backends: Vec<Backend>, no_backend: NoBackend) -> Arc<Service> {
    let key = ServiceKey {
        vip: Endpoint::new(VIP.into(), 80),
        proto,
    };
    let mut spec = ServiceSpec::new(
        ServiceId(id(if proto == IpProto::TCP { 1 } else { 2 })),
        key,
        backends,
    );
    spec.no_backend = no_backend;
    Arc::new(Service::new(spec).unwrap())
}

fn snapshot(services: Vec<Arc<Service>>) -> Snapshot {
    Snapshot::new(1, services).unwrap()
}

fn two_ready(proto: IpProto) -> Snapshot {
    snapshot(vec![service(
        proto,
        vec![
            backend(1, BackendState::Ready),
            backend(2, BackendState::Ready),
        ],
        NoBackend::Reject,
    )])
}

fn parsed(frame: &[u8]) -> (Parsed, u64) {
    let p = parse(frame).unwrap();
    let h = flow_hash(&p.key);
    (p, h)
}

fn run(snap: &Snapshot, flows: &FlowTable, frame: &[u8], now: u32) -> Verdict {
    run_counted(
        snap,
        flows,
        frame,
        now,
        Mode::Dnat,
        &mut Counters::default(),
    )
}

/// `decide()` in snat mode with `pool`.
fn snat(snap: &Snapshot, flows: &FlowTable, pool: &SnatPool, frame: &[u8], now: u32) -> Verdict {
    run_counted(
        snap,
        flows,
        frame,
        now,
        Mode::Snat(pool),
        &mut Counters::default(),
    )
}

fn run_counted(
    snapshot: &Snapshot,
    flows: &FlowTable,
    frame: &[u8],
    now: u32,
    mode: Mode<'_>,
    counters: &mut Counters,
) -> Verdict {
    run_fragmented(
        snapshot,
        flows,
        &Fragments::new(1),
        frame,
        now,
        mode,
        counters,
    )
}

/// `run_counted` with the fragment table `fragments`.
fn run_fragmented(
    snapshot: &Snapshot,
    flows: &FlowTable,
    fragments: &Fragments,
    frame: &[u8],
    now: u32,
    mode: Mode<'_>,
    counters: &mut Counters,
) -> Verdict {
    let (p, h) = parsed(frame);
    let env = Env {
        snapshot,
        flows,
        now,
        tick: tick_of(now),
        mode,
        fragments,
    };
    decide(&env, &p, h, 12345, counters)
}

/// The backend number `n` of an endpoint 198.18.128.n (see `backend`).
fn backend_number(e: &Endpoint) -> u8 {
    e.key_addr()[3]
}

fn table() -> FlowTable {
    FlowTable::new(1024, Timeouts::default())
}

fn syn(port: u16) -> Vec<u8> {
    pkt().ipv4(CLIENT, VIP).tcp(port, 80).syn().build()
}

#[test]
fn a_syn_to_a_vip_is_forwarded_to_the_maglev_pick_and_recorded_both_ways() {
    let snap = two_ready(IpProto::TCP);
    let flows = table();
    let (p, h) = parsed(&syn(40000));
    let expected = snap
        .service(&ServiceKey::of_destination(&p.key))
        .unwrap()
        .maglev_pick(h)
        .unwrap()
        .endpoint;
    let env = Env {
        snapshot: &snap,
        flows: &flows,
        now: 10,
        tick: tick_of(10),
        mode: Mode::Dnat,
        fragments: &Fragments::new(1),
    };
    assert_eq!(
        decide(&env, &p, h, 0, &mut Counters::default()),
        Verdict::Forward(expected)
    );
    let entries: Vec<_> = flows.iter(10).collect();
    assert_eq!(entries.len(), 2, "forward and reverse entries");
    assert!(entries
        .iter()
        .any(|(_, hit)| matches!(hit.value, FlowValue::Reverse { .. })));
}

fn ack(port: u16) -> Vec<u8> {
    pkt().ipv4(CLIENT, VIP).tcp(port, 80).ack().build()
}

fn syn_ack_from(to: &Endpoint, port: u16) -> Vec<u8> {
    pkt()
        .ip(to.ip(), CLIENT.into())
        .tcp(to.port(), port)
        .syn()
        .ack()
        .build()
}

fn data_from(to: &Endpoint, port: u16) -> Vec<u8> {
    pkt()
        .ip(to.ip(), CLIENT.into())
        .tcp(to.port(), port)
        .ack()
        .payload(b"data")
        .build()
}

fn state_of(flows: &FlowTable, frame: &[u8], now: u32) -> Option<FlowState> {
    let (p, h) = parsed(frame);
    flows.lookup(&p.key, h, now).map(|hit| hit.state)
}

fn vip() -> Endpoint {
    Endpoint::new(VIP.into(), 80)
}

#[test]
fn later_packets_of_a_flow_follow_it_and_replies_get_the_vip_back() {
    let snap = two_ready(IpProto::TCP);
    let flows = table();
    let Verdict::Forward(to) = run(&snap, &flows, &syn(40000), 10) else {
        panic!("not forwarded")
    };
    assert_eq!(run(&snap, &flows, &syn(40000), 11), Verdict::Forward(to));
    assert_eq!(
        run(&snap, &flows, &syn_ack_from(&to, 40000), 12),
        Verdict::Reply(vip())
    );
    assert_eq!(run(&snap, &flows, &ack(40000), 13), Verdict::Forward(to));
}

/// Fault 1 of issue 11: a backend's SYN-ACK made a half-open flow established (never
/// evictable), so a SYN flood answered by the backends filled the table for a day.
#[test]
fn only_the_clients_acknowledgment_of_the_answer_establishes_a_tcp_flow() {
    let snap = two_ready(IpProto::TCP);
    let flows = table();
    let Verdict::Forward(to) = run(&snap, &flows, &syn(40000), 10) else {
        panic!("not forwarded")
    };
    assert_eq!(state_of(&flows, &ack(40000), 10), Some(FlowState::New));
    let _ = run(&snap, &flows, &syn_ack_from(&to, 40000), 11);
    assert_eq!(
        state_of(&flows, &ack(40000), 11),
        Some(FlowState::Replied),
        "answered but not acknowledged: still evictable"
    );
    let reverse = syn_ack_from(&to, 40000);
    assert_eq!(state_of(&flows, &reverse, 11), Some(FlowState::Replied));
    let _ = run(&snap, &flows, &ack(40000), 12);
    assert_eq!(
        state_of(&flows, &ack(40000), 12),
        Some(FlowState::Established)
    );
    assert_eq!(
        state_of(&flows, &reverse, 12),
        Some(FlowState::Established),
        "the reverse entry is protected with it"
    );
}

#[test]
fn a_udp_flow_is_established_only_when_it_goes_on_after_its_first_reply() {
    let snap = two_ready(IpProto::UDP);
    let flows = table();
    let query = pkt().ipv4(CLIENT, VIP).udp(5000, 80).payload(b"q").build();
    let Verdict::Forward(to) = run(&snap, &flows, &query, 1) else {
        panic!()
    };
    let answer = pkt()
        .ip(to.ip(), CLIENT.into())
        .udp(to.port(), 5000)
        .payload(b"a")
        .build();
    assert_eq!(run(&snap, &flows, &answer, 2), Verdict::Reply(vip()));
    assert_eq!(state_of(&flows, &query, 2), Some(FlowState::Replied));
    let _ = run(&snap, &flows, &query, 3);
    assert_eq!(state_of(&flows, &query, 3), Some(FlowState::Established));
}

/// Fault 1 of issue 11: with the table full of answered SYNs from a flood, a real client's
/// connection still gets in (the flood's entries are evicted), and established connections
/// are never pushed out.
#[test]
fn a_syn_flood_answered_by_the_backends_never_locks_out_new_connections() {
    let snap = two_ready(IpProto::TCP);
    let flows = FlowTable::new(64, Timeouts::default());
    // Two real connections, established.
    for port in [1, 2] {
        let Verdict::Forward(to) = run(&snap, &flows, &syn(port), 1) else {
            panic!()
        };
        let _ = run(&snap, &flows, &syn_ack_from(&to, port), 1);
        let _ = run(&snap, &flows, &ack(port), 1);
    }
    // A flood from many sources, each SYN answered by its backend, none acknowledged.
    for n in 0..3000u32 {
        let src = std::net::Ipv4Addr::from(0xc612_1000 + (n % 256));
        let port = 1000 + (n / 256) as u16;
        let frame = pkt().ipv4(src, VIP).tcp(port, 80).syn().build();
        if let Verdict::Forward(to) = run(&snap, &flows, &frame, 2) {
            let answer = pkt()
                .ip(to.ip(), src.into())
                .tcp(to.port(), port)
                .syn()
                .ack()
                .build();
            let _ = run(&snap, &flows, &answer, 2);
        }
    }
    // New connections after the flood: every one is recorded and answered.
    for port in 100..110 {
        let Verdict::Forward(to) = run(&snap, &flows, &syn(port), 3) else {
            panic!("refused")
        };
        assert_eq!(state_of(&flows, &syn(port), 3), Some(FlowState::New));
        assert_eq!(
            run(&snap, &flows, &syn_ack_from(&to, port), 3),
            Verdict::Reply(vip())
        );
    }
    for port in [1, 2] {
        assert_eq!(
            state_of(&flows, &ack(port), 3),
            Some(FlowState::Established)
        );
    }
    assert!(flows.evictions() > 0);
}

/// Fault 1 of issue 11: a table full of established flows forwards new flows by their pick
/// without state (dnat) and recognises their replies; snat, which needs the table to know the
/// client, drops and counts them.
#[test]
fn a_table_full_of_established_flows_forwards_new_flows_without_state_in_dnat_mode() {
    let snap = two_ready(IpProto::TCP);
    let flows = FlowTable::new(8, Timeouts::default());
    let mut port = 1;
    while flows.iter(1).count() < 8 {
        if let Verdict::Forward(to) = run(&snap, &flows, &syn(port), 1) {
            let _ = run(&snap, &flows, &syn_ack_from(&to, port), 1);
            let _ = run(&snap, &flows, &ack(port), 1);
        }
        port += 1;
    }
    let mut counters = Counters::default();
    let late = 5000;
    let Verdict::Forward(to) = run_counted(&snap, &flows, &syn(late), 2, Mode::Dnat, &mut counters)
    else {
        panic!("a new flow was refused")
    };
    assert_eq!(counters.events[Event::Untracked.index()], 1);
    assert_eq!(state_of(&flows, &syn(late), 2), None, "not recorded");
    assert_eq!(
        run_counted(
            &snap,
            &flows,
            &syn_ack_from(&to, late),
            2,
            Mode::Dnat,
            &mut counters
        ),
        Verdict::Reply(vip()),
        "its reply is recognised without state"
    );
    let pool = SnatPool::new(Some(SNAT), None, 61000, 100);
    assert_eq!(
        snat(&snap, &flows, &pool, &syn(late + 1), 2),
        Verdict::Drop(DecideDrop::TableFull)
    );
}

/// Fault 3 of issue 11: after a restart (an empty flow table), a backend's retransmission
/// was dropped, and a download whose client only reads stalled for good.
#[test]
fn a_backends_packet_without_a_flow_is_recognised_as_a_reply_and_its_flow_recreated() {
    let snap = two_ready(IpProto::TCP);
    let before = table();
    let Verdict::Forward(to) = run(&snap, &before, &syn(40000), 1) else {
        panic!()
    };
    // xlb restarts: its flow table is new and empty.
    let flows = table();
    let mut counters = Counters::default();
    assert_eq!(
        run_counted(
            &snap,
            &flows,
            &data_from(&to, 40000),
            5,
            Mode::Dnat,
            &mut counters
        ),
        Verdict::Reply(vip())
    );
    assert_eq!(counters.events[Event::Recreated.index()], 1);
    assert_eq!(state_of(&flows, &ack(40000), 5), Some(FlowState::Replied));
    // The client's next acknowledgment goes to the same backend and establishes the flow.
    assert_eq!(run(&snap, &flows, &ack(40000), 6), Verdict::Forward(to));
    assert_eq!(
        state_of(&flows, &ack(40000), 6),
        Some(FlowState::Established)
    );
    // Something that is not a backend of any Service is still the kernel's.
    let other = pkt().ipv4(ROUTER, CLIENT).tcp(8080, 40000).ack().build();
    assert_eq!(run(&snap, &flows, &other, 6), Verdict::Pass);
}

#[test]
fn a_backends_packet_the_pick_does_not_explain_is_recreated_only_when_one_service_has_it() {
    // A non-Maglev scheduler: the pick cannot be recomputed.
    use xlb_dataplane::lb::snapshot::Scheduler;
    let key = |port| ServiceKey {
        vip: Endpoint::new(VIP.into(), port),
        proto: IpProto::TCP,
    };
    let random = |sid: u32, port| {
        let mut spec = ServiceSpec::new(
            ServiceId(id(sid)),
            key(port),
            vec![
                backend(1, BackendState::Ready),
                backend(2, BackendState::Ready),
            ],
        );
        spec.scheduler = Scheduler::Random;
        Arc::new(Service::new(spec).unwrap())
    };
    let b1 = backend(1, BackendState::Ready).endpoint;
    let one = snapshot(vec![random(1, 80)]);
    let flows = table();
    let mut counters = Counters::default();
    assert_eq!(
        run_counted(
            &one,
            &flows,
            &data_from(&b1, 40000),
            1,
            Mode::Dnat,
            &mut counters
        ),
        Verdict::Reply(vip())
    );
    assert_eq!(counters.events[Event::RecreatedUnpicked.index()], 1);
    // Two Service ports share the backend: which VIP to answer from is unknown.
    let two = snapshot(vec![random(1, 80), random(2, 81)]);
    let flows = table();
    assert_eq!(
        run(&two, &flows, &data_from(&b1, 40000), 1),
        Verdict::Drop(DecideDrop::UnknownReply)
    );
}

/// Each Service a backend serves is one Maglev pick for its packet that no flow explains: a
/// flood of such packets (spoofed from a backend's address) must cost a bounded number each.
#[test]
fn a_backends_packet_without_a_flow_is_tried_against_a_bounded_number_of_its_services() {
    let sharing = |n: usize| {
        let services = (0..n)
            .map(|i| {
                let i = u16::try_from(i).unwrap();
                let key = ServiceKey {
                    vip: Endpoint::new(VIP.into(), 1000 + i),
                    proto: IpProto::TCP,
                };
                let one = vec![backend(1, BackendState::Ready)];
                let spec = ServiceSpec::new(ServiceId(id(u32::from(i) + 1)), key, one);
                Arc::new(Service::new(spec).unwrap())
            })
            .collect();
        snapshot(services)
    };
    let b1 = backend(1, BackendState::Ready).endpoint;
    let mut counters = Counters::default();
    let shared_by_the_most = sharing(RECOGNISED_UP_TO);
    let verdict = run_counted(
        &shared_by_the_most,
        &table(),
        &data_from(&b1, 40000),
        1,
        Mode::Dnat,
        &mut counters,
    );
    assert!(matches!(verdict, Verdict::Reply(_)), "{verdict:?}");
    assert_eq!(counters.events[Event::Recreated.index()], 1);
    let shared_by_more = sharing(RECOGNISED_UP_TO + 1);
    assert_eq!(
        run(&shared_by_more, &table(), &data_from(&b1, 40000), 1),
        Verdict::Drop(DecideDrop::UnknownReply)
    );
}

/// Fault 4 of issue 11: a connection whose backend was removed stalled silently.
#[test]
fn a_reply_from_a_backend_that_left_becomes_a_reset_towards_the_client() {
    let flows = table();
    let Verdict::Forward(to) = run(&two_ready(IpProto::TCP), &flows, &syn(40000), 1) else {
        panic!()
    };
    let n = backend_number(&to);
    let without = snapshot(vec![service(
        IpProto::TCP,
        vec![backend(3 - n, BackendState::Ready)],
        NoBackend::Reject,
    )]);
    let mut counters = Counters::default();
    assert_eq!(
        run_counted(
            &without,
            &flows,
            &data_from(&to, 40000),
            2,
            Mode::Dnat,
            &mut counters
        ),
        Verdict::ResetReply {
            from: vip(),
            to: None
        }
    );
    assert_eq!(counters.events[Event::BackendLeftReset.index()], 1);
    // The client's own next segment is rejected with the reset that matches it.
    assert_eq!(
        run(&without, &flows, &ack(40000), 3),
        Verdict::Reject(Refusal::BackendLeft)
    );
}

/// Fault 5 of issue 11: a client reusing its source port got a reset from the VIP.
#[test]
fn a_syn_on_a_closing_flow_or_one_whose_backend_left_starts_a_new_flow() {
    let snap = two_ready(IpProto::TCP);
    let flows = table();
    let Verdict::Forward(to) = run(&snap, &flows, &syn(40000), 1) else {
        panic!()
    };
    let fin = pkt().ipv4(CLIENT, VIP).tcp(40000, 80).ack().fin().build();
    let _ = run(&snap, &flows, &fin, 2);
    assert_eq!(state_of(&flows, &fin, 2), Some(FlowState::Closing));
    let mut counters = Counters::default();
    assert_eq!(
        run_counted(&snap, &flows, &syn(40000), 20, Mode::Dnat, &mut counters),
        Verdict::Forward(to),
        "Maglev picks the same backend again"
    );
    assert_eq!(counters.events[Event::PortReused.index()], 1);
    assert_eq!(state_of(&flows, &syn(40000), 20), Some(FlowState::New));
    // Its reply finds the new flow (the old reverse entry was replaced).
    assert_eq!(
        run(&snap, &flows, &syn_ack_from(&to, 40000), 21),
        Verdict::Reply(vip())
    );

    // The backend leaves; the port is reused: a fresh pick, not a reset.
    let n = backend_number(&to);
    let without = snapshot(vec![service(
        IpProto::TCP,
        vec![backend(3 - n, BackendState::Ready)],
        NoBackend::Reject,
    )]);
    let Verdict::Forward(new) = run(&without, &flows, &syn(40000), 30) else {
        panic!("the reused port was refused")
    };
    assert_eq!(backend_number(&new), 3 - n);
}

/// Fault 7 of issue 11: a reverse entry referred to its forward entry by index, unchecked;
/// when the forward entry was evicted and its place reused, an snat reply was rewritten to
/// the newcomer's client.
#[test]
fn an_snat_reply_whose_forward_entrys_place_was_reused_is_not_sent_to_another_client() {
    let snap = two_ready(IpProto::TCP);
    // One bucket: evictions reuse places.
    let flows = FlowTable::new(8, Timeouts::default());
    let pool = SnatPool::new(Some(SNAT), None, 61000, 1000);
    let go = |frame: &[u8], now| snat(&snap, &flows, &pool, frame, now);
    let Verdict::ForwardSnat { to, from } = go(&syn(40000), 1) else {
        panic!()
    };
    let reply = pkt()
        .ip(to.ip(), from.ip())
        .tcp(to.port(), from.port())
        .ack()
        .build();
    // Evict the first flow's forward entry and let a newcomer from another client take
    // places until one lands on it.
    let (fp, fh) = parsed(&syn(40000));
    let forward = flows.lookup(&fp.key, fh, 1).unwrap();
    flows.remove(forward.entry, &fp.key);
    for port in 1..200 {
        let other = pkt().ipv4(ROUTER, VIP).tcp(port, 80).syn().build();
        let _ = go(&other, 2);
        let (op, oh) = parsed(&other);
        if flows
            .lookup(&op.key, oh, 2)
            .is_some_and(|h| h.entry.index == forward.entry.index)
        {
            break;
        }
    }
    match go(&reply, 3) {
        Verdict::Drop(DecideDrop::FlowGone) => {}
        other => panic!("the reply went elsewhere: {other:?}"),
    }
}

#[test]
fn new_flows_from_martian_sources_are_dropped_and_counted() {
    let snap = two_ready(IpProto::TCP);
    let flows = table();
    for src in [
        "0.0.0.0",
        "127.0.0.1",
        "224.0.0.5",
        "255.255.255.255",
        "198.18.64.1",
    ] {
        let src: std::net::Ipv4Addr = src.parse().unwrap();
        let frame = pkt().ipv4(src, VIP).tcp(40000, 80).syn().build();
        assert_eq!(
            run(&snap, &flows, &frame, 1),
            Verdict::Drop(DecideDrop::MartianSource),
            "{src}"
        );
    }
    assert_eq!(flows.iter(1).count(), 0);
}

#[test]
fn traffic_to_other_addresses_and_unknown_icmp_errors_pass_to_the_kernel() {
    let snap = two_ready(IpProto::TCP);
    let flows = table();
    let other = pkt().ipv4(CLIENT, ROUTER).tcp(40000, 22).syn().build();
    assert_eq!(run(&snap, &flows, &other, 1), Verdict::Pass);
    let other_port = pkt().ipv4(CLIENT, VIP).tcp(40000, 443).syn().build();
    assert_eq!(run(&snap, &flows, &other_port, 1), Verdict::Pass);
    let quote = pkt().ipv4(CLIENT, BACKEND).tcp(40000, 8080).ip_packet();
    let error = pkt()
        .ipv4(ROUTER, CLIENT)
        .icmp(3, 4, [0, 0, 5, 0])
        .payload(&quote)
        .build();
    assert_eq!(run(&snap, &flows, &error, 1), Verdict::Pass);
    assert_eq!(flows.iter(1).count(), 0);
}

#[test]
fn a_service_without_usable_backends_rejects_or_drops_by_policy() {
    let flows = table();
    let draining = vec![backend(1, BackendState::Draining)];
    let reject = snapshot(vec![service(
        IpProto::TCP,
        draining.clone(),
        NoBackend::Reject,
    )]);
    assert_eq!(
        run(&reject, &flows, &syn(1), 1),
        Verdict::Reject(Refusal::NoBackend)
    );
    let drop = snapshot(vec![service(IpProto::TCP, draining, NoBackend::Drop)]);
    assert_eq!(
        run(&drop, &flows, &syn(1), 1),
        Verdict::Drop(DecideDrop::NoBackend)
    );
    assert_eq!(flows.iter(1).count(), 0, "nothing recorded");
}

#[test]
fn a_terminating_backend_keeps_its_flows_but_takes_no_new_ones() {
    let flows = table();
    let before = two_ready(IpProto::TCP);
    let Verdict::Forward(to) = run(&before, &flows, &syn(40000), 1) else {
        panic!()
    };
    let n = backend_number(&to);
    let other = 3 - n;
    let after = snapshot(vec![service(
        IpProto::TCP,
        vec![
            backend(n, BackendState::Terminating),
            backend(other, BackendState::Ready),
        ],
        NoBackend::Reject,
    )]);
    let ack = pkt().ipv4(CLIENT, VIP).tcp(40000, 80).ack().build();
    assert_eq!(run(&after, &flows, &ack, 2), Verdict::Forward(to));
    for port in 1..50 {
        let Verdict::Forward(new) = run(&after, &flows, &syn(port), 2) else {
            panic!()
        };
        assert_ne!(new, to, "a new flow went to the terminating backend");
    }
}

#[test]
fn a_tcp_flow_whose_backend_left_is_reset_and_a_udp_flow_is_moved() {
    // TCP: reset.
    let flows = table();
    let Verdict::Forward(to) = run(&two_ready(IpProto::TCP), &flows, &syn(40000), 1) else {
        panic!()
    };
    let n: u8 = backend_number(&to);
    let without = |proto| {
        snapshot(vec![service(
            proto,
            vec![backend(3 - n, BackendState::Ready)],
            NoBackend::Reject,
        )])
    };
    let ack = pkt().ipv4(CLIENT, VIP).tcp(40000, 80).ack().build();
    assert_eq!(
        run(&without(IpProto::TCP), &flows, &ack, 2),
        Verdict::Reject(Refusal::BackendLeft)
    );

    // UDP: the stale flow moves to a backend that exists.
    let flows = table();
    let query = |p| pkt().ipv4(CLIENT, VIP).udp(p, 80).payload(b"q").build();
    let mut port = 1;
    let stale = loop {
        if let Verdict::Forward(to) = run(&two_ready(IpProto::UDP), &flows, &query(port), 1) {
            if to == Endpoint::new([198, 18, 128, 1].into(), 8080) {
                break port;
            }
        }
        port += 1;
    };
    let only_two = snapshot(vec![service(
        IpProto::UDP,
        vec![backend(2, BackendState::Ready)],
        NoBackend::Reject,
    )]);
    assert_eq!(
        run(&only_two, &flows, &query(stale), 2),
        Verdict::Forward(Endpoint::new([198, 18, 128, 2].into(), 8080))
    );
}

#[test]
fn a_reply_whose_service_left_is_dropped() {
    let flows = table();
    let Verdict::Forward(to) = run(&two_ready(IpProto::TCP), &flows, &syn(40000), 1) else {
        panic!()
    };
    let empty = snapshot(Vec::new());
    let reply = pkt()
        .ip(to.ip(), CLIENT.into())
        .tcp(to.port(), 40000)
        .ack()
        .build();
    assert_eq!(
        run(&empty, &flows, &reply, 2),
        Verdict::Drop(DecideDrop::ServiceGone)
    );
}

#[test]
fn an_icmp_error_along_a_known_flow_follows_it() {
    let snap = two_ready(IpProto::TCP);
    let flows = table();
    let Verdict::Forward(to) = run(&snap, &flows, &syn(40000), 1) else {
        panic!()
    };
    // A router between xlb and the backend: the quoted packet is the DNATed SYN.
    let quote = pkt()
        .ip(CLIENT.into(), to.ip())
        .tcp(40000, to.port())
        .syn()
        .ip_packet();
    let error = pkt()
        .ipv4(ROUTER, CLIENT)
        .icmp(3, 4, [0, 0, 5, 0])
        .payload(&quote)
        .build();
    assert_eq!(run(&snap, &flows, &error, 2), Verdict::Reply(vip()));
}

#[test]
fn every_verdict_and_reason_has_its_counter() {
    let mut c = Counters::default();
    let to = Endpoint::new(BACKEND.into(), 8080);
    for v in [
        Verdict::Forward(to),
        Verdict::Reply(to),
        Verdict::ResetReply { from: to, to: None },
        Verdict::Reject(Refusal::NoBackend),
        Verdict::Pass,
    ] {
        c.record(&v);
    }
    for reason in DecideDrop::ALL {
        c.record(&Verdict::Drop(reason));
    }
    for reason in xlb_dataplane::packet::DropReason::ALL {
        c.record_malformed(reason);
    }
    assert_eq!(
        (c.forwarded, c.replied, c.reset, c.rejected, c.passed),
        (1, 1, 1, 1, 1)
    );
    assert!(c.dropped.iter().all(|&n| n == 1));
    assert!(c.malformed.iter().all(|&n| n == 1));
}

fn with_affinity(
    scheduler: xlb_dataplane::lb::snapshot::Scheduler,
    backends: Vec<Backend>,
    timeout: u32,
) -> Snapshot {
    let key = ServiceKey {
        vip: Endpoint::new(VIP.into(), 80),
        proto: IpProto::TCP,
    };
    let mut spec = ServiceSpec::new(ServiceId(id(1)), key, backends);
    spec.scheduler = scheduler;
    spec.affinity_timeout = Some(timeout);
    snapshot(vec![Arc::new(Service::new(spec).unwrap())])
}

fn forwarded(v: Verdict) -> Endpoint {
    match v {
        Verdict::Forward(to) => to,
        other => panic!("{other:?}"),
    }
}

#[test]
fn session_affinity_keeps_a_client_on_one_backend_until_its_timeout() {
    use xlb_dataplane::lb::snapshot::Scheduler;
    let backends: Vec<Backend> = (1..=4).map(|n| backend(n, BackendState::Ready)).collect();
    let snap = with_affinity(Scheduler::RoundRobin, backends.clone(), 100);
    let flows = table();
    let first = forwarded(run(&snap, &flows, &syn(1000), 10));
    for port in 1001..1020 {
        // Round-robin alone would rotate through all four.
        assert_eq!(forwarded(run(&snap, &flows, &syn(port), 20)), first);
    }
    // Another client is not bound by it.
    let other_client = pkt().ipv4(ROUTER, VIP).tcp(5000, 80).syn().build();
    let _ = forwarded(run(&snap, &flows, &other_client, 20));
    // Past the timeout (100 s after the last new flow), round-robin picks again.
    let mut seen = std::collections::HashSet::new();
    for (i, port) in (2000..2004).enumerate() {
        seen.insert(forwarded(run(
            &snap,
            &flows,
            &syn(port),
            200 + 200 * i as u32,
        )));
    }
    assert!(seen.len() > 1, "affinity outlived its timeout: {seen:?}");
}

#[test]
fn session_affinity_lets_go_of_a_backend_that_stops_taking_new_flows() {
    use xlb_dataplane::lb::snapshot::Scheduler;
    let backends: Vec<Backend> = (1..=2).map(|n| backend(n, BackendState::Ready)).collect();
    let flows = table();
    let first = forwarded(run(
        &with_affinity(Scheduler::Random, backends.clone(), 1000),
        &flows,
        &syn(1),
        1,
    ));
    let n: u8 = backend_number(&first);
    let mut changed = backends;
    changed[usize::from(n) - 1].state = BackendState::Terminating;
    let after = with_affinity(Scheduler::Random, changed, 1000);
    let next = forwarded(run(&after, &flows, &syn(2), 2));
    assert_ne!(next, first);
    assert_eq!(
        forwarded(run(&after, &flows, &syn(3), 3)),
        next,
        "and sticks to the new one"
    );
}

#[test]
fn a_recount_gives_least_connections_the_live_flows_including_ended_ones() {
    use xlb_dataplane::lb::snapshot::Scheduler;
    let key = ServiceKey {
        vip: Endpoint::new(VIP.into(), 80),
        proto: IpProto::TCP,
    };
    let backends: Vec<Backend> = (1..=3).map(|n| backend(n, BackendState::Ready)).collect();
    let mut spec = ServiceSpec::new(ServiceId(id(1)), key, backends);
    spec.scheduler = Scheduler::LeastConnections;
    let snap = snapshot(vec![Arc::new(Service::new(spec).unwrap())]);
    let flows = table();
    for port in 0..9 {
        let _ = forwarded(run(&snap, &flows, &syn(port), 1));
    }
    let service = snap.service(&key).unwrap();
    let live = |n: u32| service.live_flows(BackendId(id(n))).unwrap();
    assert_eq!(
        (live(1), live(2), live(3)),
        (3, 3, 3),
        "least-connections spreads evenly"
    );
    // Long after, every new TCP flow has expired (120 s): a recount sees none.
    recount_live_flows(&snap, &flows, 1000);
    assert_eq!((live(1), live(2), live(3)), (0, 0, 0));
    // And at the time they were live, it counts them back.
    recount_live_flows(&snap, &flows, 2);
    assert_eq!(live(1) + live(2) + live(3), 9);
}

#[test]
fn a_maglev_services_live_flows_come_from_the_recount_and_new_flows_write_no_shared_counter() {
    let snap = two_ready(IpProto::TCP);
    let flows = table();
    for port in 0..6 {
        let _ = forwarded(run(&snap, &flows, &syn(port), 1));
    }
    let service = snap.services().next().unwrap();
    let live = |n: u32| service.live_flows(BackendId(id(n))).unwrap();
    assert_eq!(
        live(1) + live(2),
        0,
        "no counter written by the packet path"
    );
    recount_live_flows(&snap, &flows, 2);
    assert_eq!(live(1) + live(2), 6);
    // Long after, every new TCP flow has expired (120 s): what `xlb status` shows drops too.
    recount_live_flows(&snap, &flows, 1000);
    assert_eq!(live(1) + live(2), 0);
}

#[test]
fn snat_translates_the_source_and_brings_replies_back_to_the_client() {
    let snap = two_ready(IpProto::TCP);
    let flows = table();
    let pool = SnatPool::new(Some(SNAT), None, 61000, 100);
    let go = |frame: &[u8], now| snat(&snap, &flows, &pool, frame, now);
    let Verdict::ForwardSnat { to, from } = go(&syn(40000), 1) else {
        panic!("not translated")
    };
    assert_eq!(from.ip(), std::net::IpAddr::from(SNAT));
    assert!((61000..61100).contains(&from.port()));
    // Later packets keep the same translation.
    let ack = pkt().ipv4(CLIENT, VIP).tcp(40000, 80).ack().build();
    assert_eq!(go(&ack, 2), Verdict::ForwardSnat { to, from });
    // The backend answers the xlb address; the reply goes back to the client from the VIP.
    let reply = pkt()
        .ip(to.ip(), from.ip())
        .tcp(to.port(), from.port())
        .syn()
        .ack()
        .build();
    assert_eq!(
        go(&reply, 3),
        Verdict::ReplySnat {
            from: Endpoint::new(VIP.into(), 80),
            to: Endpoint::new(CLIENT.into(), 40000),
        }
    );
    // Another flow gets another port.
    let Verdict::ForwardSnat { from: other, .. } = go(&syn(40001), 4) else {
        panic!()
    };
    assert_ne!(other.port(), from.port());
    // A family without an snat address (this pool has no IPv6 one) is translated as dnat.
    let backend6 = Backend {
        id: BackendId(id(1)),
        endpoint: Endpoint::new(BACKEND6.into(), 8080),
        state: BackendState::Ready,
        weight: 1,
    };
    let key6 = ServiceKey {
        vip: Endpoint::new(VIP6.into(), 80),
        proto: IpProto::TCP,
    };
    let v6 = snapshot(vec![Arc::new(
        Service::new(ServiceSpec::new(ServiceId(id(6)), key6, vec![backend6])).unwrap(),
    )]);
    let frame = pkt().ipv6(CLIENT6, VIP6).tcp(1, 80).syn().build();
    assert_eq!(
        snat(&v6, &flows, &pool, &frame, 5),
        Verdict::Forward(backend6.endpoint)
    );
}

#[test]
fn an_snat_reply_whose_forward_entry_expired_is_dropped() {
    let snap = two_ready(IpProto::TCP);
    let flows = table();
    let pool = SnatPool::new(Some(SNAT), None, 61000, 100);
    let go = |frame: &[u8], now| snat(&snap, &flows, &pool, frame, now);
    let Verdict::ForwardSnat { to, from } = go(&syn(40000), 1) else {
        panic!()
    };
    let reply = pkt()
        .ip(to.ip(), from.ip())
        .tcp(to.port(), from.port())
        .ack()
        .build();
    // The forward entry goes; the reverse one is still there (removed directly here).
    let (fp, fh) = parsed(&syn(40000));
    let hit = flows.lookup(&fp.key, fh, 2).unwrap();
    flows.remove(hit.entry, &fp.key);
    assert_eq!(go(&reply, 2), Verdict::Drop(DecideDrop::FlowGone));
}

/// Issue 12, item 1: `loadBalancerSourceRanges` was ignored. New flows from outside a
/// Service's allowed prefixes are dropped and counted; other Services are not affected.
#[test]
fn new_flows_from_outside_the_allowed_source_ranges_are_dropped() {
    use xlb_dataplane::lb::prefix::{Prefix, PrefixMap};
    use xlb_dataplane::packet::{key_addr, Family};
    let key = ServiceKey {
        vip: Endpoint::new(VIP.into(), 80),
        proto: IpProto::TCP,
    };
    let mut spec = ServiceSpec::new(ServiceId(id(1)), key, vec![backend(1, BackendState::Ready)]);
    let ranges = [
        ([198, 18, 0, 0], 24),
        ([203, 0, 113, 0], 24),
        ([198, 51, 100, 7], 32),
    ];
    spec.source_ranges = Some(Arc::new(PrefixMap::new(ranges.iter().map(|(a, len)| {
        (
            Prefix::new(
                Family::Ipv4,
                key_addr(std::net::Ipv4Addr::from(*a).into()),
                *len,
            ),
            (),
        )
    }))));
    let snap = snapshot(vec![Arc::new(Service::new(spec).unwrap())]);
    let flows = table();
    let from = |src: [u8; 4], port| pkt().ipv4(src.into(), VIP).tcp(port, 80).syn().build();
    assert!(matches!(
        run(&snap, &flows, &from([198, 18, 0, 1], 1), 1),
        Verdict::Forward(_)
    ));
    assert!(matches!(
        run(&snap, &flows, &from([198, 51, 100, 7], 2), 1),
        Verdict::Forward(_)
    ));
    for outside in [[198, 18, 1, 1], [198, 51, 100, 8], [10, 0, 0, 1]] {
        assert_eq!(
            run(&snap, &flows, &from(outside, 3), 1),
            Verdict::Drop(DecideDrop::SourceNotAllowed),
            "{outside:?}"
        );
    }
}

/// kube-proxy's detect-local (issue 13): a pool that masquerades only clients outside the
/// cluster's prefixes keeps an in-cluster client's address, translates an outside client's,
/// and always translates a hairpin flow (a client whose pick is itself), whose replies then
/// come back through xlb instead of straight from the client to itself.
#[test]
fn a_detect_local_pool_masquerades_outside_clients_and_hairpin_flows_only() {
    use xlb_dataplane::lb::decide::Masquerade;
    use xlb_dataplane::lb::prefix::{Prefix, PrefixMap};
    use xlb_dataplane::packet::Family;

    let snap = two_ready(IpProto::TCP);
    let flows = table();
    // The cluster: 198.18.128.0/24 (where the backends are); CLIENT is outside it.
    let cluster = PrefixMap::new([(
        Prefix::new(
            Family::Ipv4,
            [198, 18, 128, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            24,
        ),
        (),
    )]);
    let pool =
        SnatPool::new(Some(SNAT), None, 61000, 100).masquerading(Masquerade::Outside(cluster));
    let go = |frame: &[u8], now| snat(&snap, &flows, &pool, frame, now);

    // An outside client is masqueraded.
    let Verdict::ForwardSnat { from, .. } = go(&syn(40000), 1) else {
        panic!("an outside client is not masqueraded")
    };
    assert_eq!(from.ip(), std::net::IpAddr::from(SNAT));

    // The node itself (the pool's own address) keeps its address and its port.
    let from_node = pkt().ipv4(SNAT, VIP).tcp(40002, 80).syn().build();
    assert!(
        matches!(go(&from_node, 1), Verdict::Forward(_)),
        "the pool's own address is translated"
    );

    // A pod of the cluster keeps its address, and its backend's reply is un-NATed to it.
    let pod: std::net::Ipv4Addr = [198, 18, 128, 77].into();
    let from_pod = |port| pkt().ipv4(pod, VIP).tcp(port, 80).syn().build();
    let Verdict::Forward(to) = go(&from_pod(40001), 2) else {
        panic!("an in-cluster client is translated")
    };
    let reply = pkt()
        .ip(to.ip(), pod.into())
        .tcp(to.port(), 40001)
        .syn()
        .ack()
        .build();
    assert_eq!(go(&reply, 3), Verdict::Reply(vip()));

    // A backend connecting to its own Service: whichever port lands on itself is hairpinned
    // through the pool, the others keep the source.
    let (mut hairpin, mut direct) = (0, 0);
    for port in 41000..41064 {
        let b1: std::net::Ipv4Addr = [198, 18, 128, 1].into();
        let frame = pkt().ipv4(b1, VIP).tcp(port, 80).syn().build();
        match go(&frame, 4) {
            Verdict::ForwardSnat { to, from } => {
                assert_eq!(to.ip(), std::net::IpAddr::from(b1), "only hairpin flows");
                assert_eq!(from.ip(), std::net::IpAddr::from(SNAT));
                // The backend answers the pool's address; the reply goes back from the VIP.
                let answer = pkt()
                    .ip(to.ip(), from.ip())
                    .tcp(to.port(), from.port())
                    .syn()
                    .ack()
                    .build();
                assert_eq!(
                    go(&answer, 5),
                    Verdict::ReplySnat {
                        from: vip(),
                        to: Endpoint::new(b1.into(), port),
                    }
                );
                hairpin += 1;
            }
            Verdict::Forward(to) => {
                assert_ne!(to.ip(), std::net::IpAddr::from(b1));
                direct += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        hairpin > 0 && direct > 0,
        "{hairpin} hairpin, {direct} direct"
    );
}

/// Issue 14: a fragmented datagram to a VIP. Its first fragment (with the ports) picks the
/// backend; its later fragments, which carry no ports, get the same translation (in either
/// order after the first), and so do the fragments of the backend's fragmented answer; a
/// later fragment whose first has not come is dropped, counted, until it does.
#[test]
fn the_later_fragments_of_a_datagram_follow_its_first_both_ways_and_not_before_it() {
    let snap = two_ready(IpProto::UDP);
    let flows = table();
    let fragments = Fragments::default();
    let go = |frame: &[u8], now| {
        run_fragmented(
            &snap,
            &flows,
            &fragments,
            frame,
            now,
            Mode::Dnat,
            &mut Counters::default(),
        )
    };
    let piece = |offset: u16, more: bool| {
        let builder = pkt().ipv4(CLIENT, VIP);
        let builder = if offset == 0 {
            builder.udp(5000, 80).payload(&[7; 1472])
        } else {
            builder.proto(IpProto::UDP).payload(&[7; 1480])
        };
        builder.fragment(0x1234, offset, more).build()
    };
    // The middle fragment overtakes the first: unknown yet.
    assert_eq!(
        go(&piece(1480, true), 1),
        Verdict::Drop(DecideDrop::FragmentBeforeFirst)
    );
    let Verdict::Forward(to) = go(&piece(0, true), 1) else {
        panic!("the first fragment is not forwarded")
    };
    for offset in [2960, 1480] {
        assert_eq!(go(&piece(offset, offset == 1480), 1), Verdict::Forward(to));
    }
    // Another datagram of the same flow (another identification) is not this one.
    let other = pkt()
        .ipv4(CLIENT, VIP)
        .proto(IpProto::UDP)
        .payload(&[7; 8])
        .fragment(0x1235, 1480, false)
        .build();
    assert_eq!(
        go(&other, 1),
        Verdict::Drop(DecideDrop::FragmentBeforeFirst)
    );
    // The backend's answer is fragmented too: its later fragments are un-NATed as its first.
    let answer = |offset: u16| {
        let builder = pkt().ip(to.ip(), CLIENT.into());
        let builder = if offset == 0 {
            builder.udp(to.port(), 5000).payload(&[9; 1472])
        } else {
            builder.proto(IpProto::UDP).payload(&[9; 100])
        };
        builder.fragment(0x99, offset, offset == 0).build()
    };
    assert_eq!(go(&answer(0), 2), Verdict::Reply(vip()));
    assert_eq!(go(&answer(1480), 2), Verdict::Reply(vip()));
}

/// Issue 14: direct server return. A new flow goes to its pick unchanged (the worker sets
/// only its Ethernet addresses), recorded in one direction only (no reply comes back); the
/// client's acknowledgment of the handshake establishes it (the answer is never seen); and a
/// backend added later moves no flow that has one.
#[test]
fn dsr_forwards_to_the_pick_records_one_direction_and_keeps_flows_across_backend_changes() {
    let snap = two_ready(IpProto::TCP);
    let three = snapshot(vec![service(
        IpProto::TCP,
        vec![
            backend(1, BackendState::Ready),
            backend(2, BackendState::Ready),
            backend(3, BackendState::Ready),
        ],
        NoBackend::Reject,
    )]);
    // A client port whose Maglev pick moves when the third backend joins.
    let pick = |snap: &Snapshot, port| {
        let (p, h) = parsed(&syn(port));
        let service = snap.service(&ServiceKey::of_destination(&p.key)).unwrap();
        service.maglev_pick(h).unwrap().endpoint
    };
    let port = (40000..41000)
        .find(|&p| pick(&snap, p) != pick(&three, p))
        .unwrap();
    let flows = table();
    let go = |snap: &Snapshot, frame: &[u8], now| {
        run_counted(
            snap,
            &flows,
            frame,
            now,
            Mode::Dsr,
            &mut Counters::default(),
        )
    };
    let Verdict::ForwardDsr(to) = go(&snap, &syn(port), 1) else {
        panic!("not forwarded for dsr")
    };
    assert_eq!(to, pick(&snap, port));
    assert_eq!(flows.iter(1).count(), 1, "no reverse entry");
    assert_eq!(go(&snap, &ack(port), 2), Verdict::ForwardDsr(to));
    assert_eq!(
        state_of(&flows, &ack(port), 2),
        Some(FlowState::Established)
    );
    // The third backend joins: the flow stays where it is, though its pick moved.
    for now in 3..10 {
        assert_eq!(go(&three, &ack(port), now), Verdict::ForwardDsr(to));
    }
    // A new flow whose pick moved goes to the new pick.
    let Verdict::ForwardDsr(moved) = go(&three, &syn(port + 1000), 10) else {
        panic!()
    };
    assert_eq!(moved, pick(&three, port + 1000));
    // Something no flow and no Service explains is the kernel's (no reply to recognise).
    let other = pkt().ipv4(ROUTER, CLIENT).tcp(8080, 40000).ack().build();
    assert_eq!(go(&three, &other, 10), Verdict::Pass);
}

/// A flood of unanswered SYNs through snat held every port of the pool for TCP's New timeout
/// (120 s), and every new flow after it was dropped (`NoSnatPort`). The port of a flow that
/// never had a reply and has been quiet a whole second is taken back for a new flow; a flow
/// that was answered, or one still sending, keeps its port.
#[test]
fn snat_ports_of_quiet_unanswered_flows_are_taken_back_for_new_ones() {
    let key = ServiceKey {
        vip: Endpoint::new(VIP.into(), 80),
        proto: IpProto::TCP,
    };
    let spec = ServiceSpec::new(ServiceId(id(1)), key, vec![backend(1, BackendState::Ready)]);
    let snap = snapshot(vec![Arc::new(Service::new(spec).unwrap())]);
    let flows = table();
    let pool = SnatPool::new(Some(SNAT), None, 61000, 2);
    let mut counters = Counters::default();
    let mut go = |frame: &[u8], now| {
        run_counted(&snap, &flows, frame, now, Mode::Snat(&pool), &mut counters)
    };
    // Two flows take both ports; one of them is answered.
    let Verdict::ForwardSnat { to, from: answered } = go(&syn(40000), 10) else {
        panic!("not translated")
    };
    assert!(matches!(go(&syn(40001), 10), Verdict::ForwardSnat { .. }));
    let reply = pkt()
        .ip(to.ip(), answered.ip())
        .tcp(to.port(), answered.port())
        .syn()
        .ack()
        .build();
    assert!(matches!(go(&reply, 10), Verdict::ReplySnat { .. }));
    // In the same second a third finds no port.
    assert_eq!(go(&syn(40002), 10), Verdict::Drop(DecideDrop::NoSnatPort));
    // In the next second it may have been seen a moment ago: it keeps its port.
    assert_eq!(go(&syn(40002), 11), Verdict::Drop(DecideDrop::NoSnatPort));
    // A whole second later its port is taken back; the answered one keeps its own.
    let Verdict::ForwardSnat { from, .. } = go(&syn(40003), 12) else {
        panic!("no port taken back")
    };
    assert_ne!(from.port(), answered.port());
    // The new holder keeps sending: its port is not quiet, so nothing is free.
    let more = pkt().ipv4(CLIENT, VIP).tcp(40003, 80).ack().build();
    assert!(matches!(go(&more, 14), Verdict::ForwardSnat { .. }));
    assert_eq!(go(&syn(40004), 15), Verdict::Drop(DecideDrop::NoSnatPort));
    // The answered flow's replies still find their client.
    assert!(matches!(go(&reply, 15), Verdict::ReplySnat { .. }));
    assert_eq!(counters.events[Event::SnatPortReclaimed.index()], 1);
}
