//! What the XDP filter steers to xlb and what it leaves to the kernel, decided by the filter
//! itself in the kernel (`BPF_PROG_TEST_RUN`) on fixture frames: Service traffic and the
//! replies of its flows, IPv6 behind extension headers, fragments after the first to a VIP or
//! from a backend, and malformed packets to a VIP (which xlb's parser counts by reason) are
//! xlb's; other traffic, other fragments, routed IPv6 and malformed packets to other
//! addresses are the kernel's. Loads the
//! filter (attaches it nowhere), so it needs root; without it, it says why and skips.

mod common;

use common::*;
use xlb_dataplane::packet::builder::pkt;
use xlb_dataplane::packet::{key_addr, Endpoint, Family, IpProto};
use xlb_dataplane::xsk::{FilterAction, SteerKey, XdpFilter};

/// The steering a dnat snapshot with one Service per family gives: the VIP and port, the
/// VIP's address, and the backend's replies.
fn steered(filter: &mut XdpFilter) {
    let keys = [
        SteerKey::destination(&Endpoint::new(VIP.into(), 80), IpProto::TCP),
        SteerKey::vip_address(Family::Ipv4, key_addr(VIP.into())),
        SteerKey::source(&Endpoint::new(BACKEND.into(), 8080), IpProto::TCP),
        SteerKey::source_address(Family::Ipv4, key_addr(BACKEND.into())),
        SteerKey::destination(&Endpoint::new(VIP6.into(), 80), IpProto::TCP),
        SteerKey::destination(&Endpoint::new(VIP6.into(), 53), IpProto::UDP),
        SteerKey::vip_address(Family::Ipv6, key_addr(VIP6.into())),
        SteerKey::destination(&Endpoint::new(VIP.into(), 3868), IpProto::SCTP),
        SteerKey::source(&Endpoint::new(BACKEND.into(), 3868), IpProto::SCTP),
    ];
    filter.change(&keys, &[]).expect("keys added");
}

/// Frames and what the filter must do with each.
fn cases() -> Vec<(&'static str, Vec<u8>, FilterAction)> {
    use FilterAction::{Pass, Steer};
    let syn = || pkt().ipv4(CLIENT, VIP).tcp(40000, 80).syn();
    let syn6 = || pkt().ipv6(CLIENT6, VIP6);
    let tcp_len = 14 + 20 + 20;
    vec![
        ("tcp to the vip's port", syn().build(), Steer),
        (
            "tcp to the vip behind a vlan tag",
            pkt().vlan(7).ipv4(CLIENT, VIP).tcp(40000, 80).syn().build(),
            Steer,
        ),
        (
            "tcp to another port of the vip",
            pkt().ipv4(CLIENT, VIP).tcp(40000, 22).syn().build(),
            Pass,
        ),
        (
            "tcp to the node",
            pkt().ipv4(CLIENT, ROUTER).tcp(40000, 22).syn().build(),
            Pass,
        ),
        (
            "a backend's reply",
            pkt().ipv4(BACKEND, CLIENT).tcp(8080, 40000).ack().build(),
            Steer,
        ),
        (
            "an ipv4 fragment after the first, to the vip",
            pkt()
                .ipv4(CLIENT, VIP)
                .proto(IpProto::TCP)
                .payload(b"tail")
                .fragment(5, 1480, false)
                .build(),
            Steer,
        ),
        (
            "an ipv4 fragment after the first, from a backend",
            pkt()
                .ipv4(BACKEND, CLIENT)
                .proto(IpProto::UDP)
                .payload(b"tail")
                .fragment(5, 1480, false)
                .build(),
            Steer,
        ),
        (
            "an ipv4 fragment after the first, between others",
            pkt()
                .ipv4(CLIENT, ROUTER)
                .proto(IpProto::UDP)
                .payload(b"tail")
                .fragment(5, 1480, false)
                .build(),
            Pass,
        ),
        (
            "an ipv6 fragment after the first, to the vip",
            pkt()
                .ipv6(CLIENT6, VIP6)
                .proto(IpProto::UDP)
                .payload(b"tail")
                .fragment(5, 1448, false)
                .build(),
            Steer,
        ),
        (
            "an ipv6 fragment after the first, between others",
            pkt()
                .ipv6(CLIENT6, ROUTER6)
                .proto(IpProto::UDP)
                .payload(b"tail")
                .fragment(5, 1448, false)
                .build(),
            Pass,
        ),
        // Malformed IPv4 to the VIP: xlb's parser counts it by reason.
        ("ihl below 5, to the vip", syn().ihl(4).build(), Steer),
        (
            "ihl below 5, to the node",
            pkt()
                .ipv4(CLIENT, ROUTER)
                .tcp(40000, 80)
                .syn()
                .ihl(4)
                .build(),
            Pass,
        ),
        (
            "a tcp header cut short, to the vip",
            syn().truncate(tcp_len - 18).build(),
            Steer,
        ),
        (
            "a tcp header cut short, to the node",
            pkt()
                .ipv4(CLIENT, ROUTER)
                .tcp(40000, 80)
                .truncate(tcp_len - 18)
                .build(),
            Pass,
        ),
        // IPv6 behind extension headers.
        (
            "ipv6 hop-by-hop and destination options, then tcp to the vip's port",
            syn6()
                .ipv6_ext(IpProto::HOP_BY_HOP, 6)
                .ipv6_ext(IpProto::DESTINATION_OPTIONS, 14)
                .tcp(40000, 80)
                .syn()
                .build(),
            Steer,
        ),
        (
            "ipv6 first fragment with the tcp header",
            syn6()
                .tcp(40000, 80)
                .syn()
                .payload(b"head")
                .fragment(9, 0, true)
                .build(),
            Steer,
        ),
        (
            "ipv6 tcp fragment after the first, to the vip",
            syn6()
                .proto(IpProto::TCP)
                .payload(b"tail")
                .fragment(9, 1448, false)
                .build(),
            Steer,
        ),
        (
            "ipv6 routing header with segments left",
            syn6()
                .ipv6_ext(IpProto::ROUTING, 22)
                .routing_segments_left(1)
                .tcp(40000, 80)
                .syn()
                .build(),
            Pass,
        ),
        (
            "ipv6 routing header with no segment left, then tcp to the vip's port",
            syn6()
                .ipv6_ext(IpProto::ROUTING, 22)
                .tcp(40000, 80)
                .syn()
                .build(),
            Steer,
        ),
        (
            "ipv6 with more extension headers than the filter walks, to the vip",
            (0..5)
                .fold(syn6(), |b, _| b.ipv6_ext(IpProto::DESTINATION_OPTIONS, 6))
                .tcp(40000, 80)
                .syn()
                .build(),
            Steer,
        ),
        (
            "ipv6 extension header cut short, to the vip",
            syn6()
                .ipv6_ext(IpProto::DESTINATION_OPTIONS, 30)
                .tcp(40000, 80)
                .truncate(14 + 40 + 12)
                .build(),
            Steer,
        ),
        (
            "ipv6 udp to the vip's dns port",
            syn6().udp(5000, 53).payload(b"q").build(),
            Steer,
        ),
        (
            "ipv6 tcp to another port of the vip",
            syn6().tcp(40000, 22).syn().build(),
            Pass,
        ),
        (
            "not ip",
            pkt().ethertype(0x0806).payload(&[0; 28]).build(),
            Pass,
        ),
        (
            "sctp to the vip's sctp port",
            pkt().ipv4(CLIENT, VIP).sctp(40000, 3868, 0).build(),
            Steer,
        ),
        (
            "a backend's sctp reply",
            pkt().ipv4(BACKEND, CLIENT).sctp(3868, 40000, 1).build(),
            Steer,
        ),
        (
            "sctp to another address",
            pkt().ipv4(CLIENT, ROUTER).sctp(40000, 3868, 0).build(),
            Pass,
        ),
        (
            "an icmp error about an sctp packet forwarded to a backend",
            pkt()
                .ipv4(ROUTER, CLIENT)
                .icmp(3, 1, [0; 4])
                .payload(&pkt().ipv4(CLIENT, BACKEND).sctp(40000, 3868, 0).ip_packet()[..28])
                .build(),
            Steer,
        ),
    ]
}

#[test]
#[ignore = "kernel test (root, BPF, network namespaces): make test runs it as root"]
fn the_filter_steers_service_traffic_replies_and_malformed_packets_to_a_vip_and_passes_the_rest() {
    let Some(mut filter) = filter_or_skip() else {
        return;
    };
    steered(&mut filter);
    let mut failures = Vec::new();
    for (name, frame, want) in cases() {
        let got = filter.classify(&frame).expect("the kernel runs the filter");
        if got != want {
            failures.push(format!("{name}: {got:?}, expected {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// On a node's link (issue 13) the kernel routed every packet there for xlb: all unicast IP
/// is xlb's, whatever `steer` says, while multicast and IPv6 from link-local addresses
/// (neighbour discovery, MLD) stay the kernel's. Other ports are unchanged. The loopback
/// port (ifindex 1) stands in for the link.
#[test]
#[ignore = "kernel test (root, BPF, network namespaces): make test runs it as root"]
fn on_a_nodes_link_every_unicast_ip_packet_is_xlbs_and_multicast_and_link_local_are_not() {
    use FilterAction::{Pass, Steer};
    let Some(filter) = filter_or_skip() else {
        return;
    };
    let link = 1;
    let anything = pkt().ipv4(CLIENT, ROUTER).tcp(40000, 22).syn().build();
    let cases = [
        (
            "tcp to an address steer does not name",
            anything.clone(),
            Steer,
        ),
        (
            "udp from a pod to another pod",
            pkt()
                .ipv4(CLIENT, BACKEND)
                .udp(5000, 53)
                .payload(b"q")
                .build(),
            Steer,
        ),
        (
            "ipv6 to a global address",
            pkt().ipv6(CLIENT6, VIP6).tcp(40000, 22).syn().build(),
            Steer,
        ),
        (
            "ipv4 multicast",
            pkt()
                .ipv4(CLIENT, [224, 0, 0, 251].into())
                .udp(5353, 5353)
                .payload(b"m")
                .build(),
            Pass,
        ),
        (
            "ipv6 multicast",
            pkt()
                .ipv6(CLIENT6, "ff02::1".parse().unwrap())
                .udp(5353, 5353)
                .payload(b"m")
                .build(),
            Pass,
        ),
        (
            "ipv6 from a link-local address",
            pkt()
                .ipv6("fe80::1".parse().unwrap(), CLIENT6)
                .udp(5353, 5353)
                .payload(b"m")
                .build(),
            Pass,
        ),
    ];
    // Another port being a link changes nothing here (a test run without a port runs on
    // the loopback port).
    filter.mark_link(999_999).expect("another link is marked");
    assert_eq!(
        filter.classify(&anything).unwrap(),
        Pass,
        "not a link: the steer map decides"
    );
    filter.mark_link(link).expect("the link is marked");
    let mut failures = Vec::new();
    for (name, frame, want) in cases {
        let got = filter
            .classify_on(&frame, Some(link))
            .expect("the kernel runs the filter");
        if got != want {
            failures.push(format!("{name}: {got:?}, expected {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `make bench-budget` times the filter with the kernel's own clock: many runs of one frame
/// give a mean run time, and the runs are the filter's ordinary runs (they count, and decide
/// as one run does).
#[test]
#[ignore = "kernel test (root, BPF, network namespaces): make test runs it as root"]
fn timing_the_filter_gives_the_mean_of_many_ordinary_runs() {
    let Some(mut filter) = filter_or_skip() else {
        return;
    };
    steered(&mut filter);
    let syn = pkt().ipv4(CLIENT, VIP).tcp(40000, 80).syn().build();
    let before = filter.counts();
    let mean = filter.time(&syn, 1000).expect("the kernel runs the filter");
    let after = filter.counts();
    assert!(mean.as_nanos() > 0, "the kernel reports the runs' time");
    assert_eq!(
        (after.redirected + after.unbound) - (before.redirected + before.unbound),
        1000,
        "every run steered the frame, as one run does"
    );
    assert_eq!(filter.classify(&syn).unwrap(), FilterAction::Steer);
}
