//! `decide()` over real frames: new flows, established flows, replies, Services without
//! backends, and backends that terminate or leave.

mod common;

use std::num::NonZeroU32;
use std::sync::Arc;

use common::*;
use xlb_dataplane::lb::decide::{
    decide, recount_live_flows, Counters, DecideDrop, Mode, SnatPool, Verdict,
};
use xlb_dataplane::lb::flow::{FlowState, FlowTable, Timeouts};
use xlb_dataplane::lb::hash::flow_hash;
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
    let (p, h) = parsed(frame);
    decide(snap, flows, &p, h, now, 12345, Mode::Dnat)
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
    assert_eq!(
        decide(&snap, &flows, &p, h, 10, 0, Mode::Dnat),
        Verdict::Forward(expected)
    );
    let entries: Vec<_> = flows.iter(10).collect();
    assert_eq!(entries.len(), 2, "forward and reverse entries");
    assert!(entries.iter().any(|(_, hit)| hit.value.reverse));
}

#[test]
fn later_packets_of_a_flow_follow_it_and_replies_get_the_vip_back() {
    let snap = two_ready(IpProto::TCP);
    let flows = table();
    let Verdict::Forward(to) = run(&snap, &flows, &syn(40000), 10) else {
        panic!("not forwarded")
    };
    let ack = pkt().ipv4(CLIENT, VIP).tcp(40000, 80).ack().build();
    assert_eq!(run(&snap, &flows, &ack, 11), Verdict::Forward(to));
    let reply = pkt()
        .ip(to.ip(), CLIENT.into())
        .tcp(to.port(), 40000)
        .syn()
        .ack()
        .build();
    assert_eq!(
        run(&snap, &flows, &reply, 12),
        Verdict::Reply(Endpoint::new(VIP.into(), 80))
    );
    // The reply established the flow.
    let (p, h) = parsed(&ack);
    assert_eq!(
        flows.lookup(&p.key, h, 12).unwrap().state,
        FlowState::Established
    );
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
    assert_eq!(run(&reject, &flows, &syn(1), 1), Verdict::Reject);
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
        Verdict::Reject
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
    assert_eq!(
        run(&snap, &flows, &error, 2),
        Verdict::Reply(Endpoint::new(VIP.into(), 80))
    );
}

#[test]
fn every_verdict_and_reason_has_its_counter() {
    let mut c = Counters::default();
    let to = Endpoint::new(BACKEND.into(), 8080);
    for v in [
        Verdict::Forward(to),
        Verdict::Reply(to),
        Verdict::Reject,
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
    assert_eq!((c.forwarded, c.replied, c.rejected, c.passed), (1, 1, 1, 1));
    assert!(c.dropped.iter().all(|&n| n == 1));
    assert!(c.malformed.iter().all(|&n| n == 1));
    // ALL lists every variant in declaration order, so `as usize` indexes it.
    assert!(DecideDrop::ALL
        .iter()
        .enumerate()
        .all(|(i, r)| *r as usize == i));
    assert!(xlb_dataplane::packet::DropReason::ALL
        .iter()
        .enumerate()
        .all(|(i, r)| *r as usize == i));
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
fn snat_translates_the_source_and_brings_replies_back_to_the_client() {
    let snap = two_ready(IpProto::TCP);
    let flows = table();
    let pool = SnatPool::new(Some(SNAT), None, 61000, 100);
    let go = |frame: &[u8], now| {
        let (p, h) = parsed(frame);
        decide(&snap, &flows, &p, h, now, 0, Mode::Snat(&pool))
    };
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
    let (p, h) = parsed(&pkt().ipv6(CLIENT6, VIP6).tcp(1, 80).syn().build());
    assert_eq!(
        decide(&v6, &flows, &p, h, 5, 0, Mode::Snat(&pool)),
        Verdict::Forward(backend6.endpoint)
    );
}

#[test]
fn an_snat_reply_whose_forward_entry_expired_is_dropped() {
    let snap = two_ready(IpProto::TCP);
    let flows = table();
    let pool = SnatPool::new(Some(SNAT), None, 61000, 100);
    let (p, h) = parsed(&syn(40000));
    let Verdict::ForwardSnat { to, from } = decide(&snap, &flows, &p, h, 1, 0, Mode::Snat(&pool))
    else {
        panic!()
    };
    let reply = pkt()
        .ip(to.ip(), from.ip())
        .tcp(to.port(), from.port())
        .ack()
        .build();
    let (p, h) = parsed(&reply);
    // The forward entry goes; the reverse one is still there (removed directly here).
    let (fp, fh) = parsed(&syn(40000));
    let hit = flows.lookup(&fp.key, fh, 2).unwrap();
    flows.remove(hit.index, &fp.key);
    assert_eq!(
        decide(&snap, &flows, &p, h, 2, 0, Mode::Snat(&pool)),
        Verdict::Drop(DecideDrop::FlowGone)
    );
}
