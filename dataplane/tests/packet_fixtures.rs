//! Golden packet-in/packet-out fixtures: translations (NAT rewrites and ICMP errors).
//! The runner is `common/fixture.rs`; malformed and passed frames are in `packet_rejects.rs`.

mod common;

use common::fixture::{case, run_table, Case, ClassIs};
use common::*;
use xlb_dataplane::packet::builder::{pkt, L4Checksum};
use xlb_dataplane::packet::{
    parse, set_destination, ChecksumState, Endpoint, IcmpErrorKind, IpProto,
};

fn rewrite_cases() -> Vec<Case> {
    let payload = b"GET / HTTP/1.1\r\n\r\n";
    vec![
        case(
            "tcp syn to the vip is dnatted to the backend",
            &tcp_client_to_vip(),
        )
        .dst(BACKEND, 8080)
        .eth(NODE_OUT_MAC, BACKEND_MAC)
        .gives(
            ClassIs::Ordinary,
            &pkt()
                .eth(NODE_OUT_MAC, BACKEND_MAC)
                .ipv4(CLIENT, BACKEND)
                .tcp(40000, 8080)
                .syn(),
        ),
        case(
            "tcp data with options behind a vlan tag is dnatted",
            &tcp_client_to_vip()
                .vlan(7)
                .ack()
                .tcp_options(12)
                .payload(payload),
        )
        .dst(BACKEND, 8080)
        .gives(
            ClassIs::Ordinary,
            &pkt()
                .vlan(7)
                .ipv4(CLIENT, BACKEND)
                .tcp(40000, 8080)
                .syn()
                .ack()
                .tcp_options(12)
                .payload(payload),
        ),
        case(
            "ipv4 options do not move the transport header rewrite",
            &tcp_client_to_vip().ipv4_options(8),
        )
        .dst(BACKEND, 8080)
        .gives(
            ClassIs::Ordinary,
            &pkt()
                .ipv4(CLIENT, BACKEND)
                .ipv4_options(8)
                .tcp(40000, 8080)
                .syn(),
        ),
        case(
            "backend reply is un-dnatted back to the vip",
            &pkt().ipv4(BACKEND, CLIENT).tcp(8080, 40000).syn().ack(),
        )
        .src(VIP, 80)
        .gives(
            ClassIs::Ordinary,
            &pkt().ipv4(VIP, CLIENT).tcp(80, 40000).syn().ack(),
        ),
        case("snat rewrites both ends", &tcp_client_to_vip())
            .dst(BACKEND, 8080)
            .src(SNAT, 61000)
            .gives(
                ClassIs::Ordinary,
                &pkt().ipv4(SNAT, BACKEND).tcp(61000, 8080).syn(),
            ),
        case(
            "udp datagram is dnatted",
            &pkt().ipv4(CLIENT, VIP).udp(5353, 53).payload(payload),
        )
        .dst(BACKEND, 5353)
        .gives(
            ClassIs::Ordinary,
            &pkt().ipv4(CLIENT, BACKEND).udp(5353, 5353).payload(payload),
        ),
        case(
            "udp over ipv4 without checksum keeps checksum zero",
            &pkt()
                .ipv4(CLIENT, VIP)
                .udp(5353, 53)
                .payload(payload)
                .l4_checksum(L4Checksum::Raw(0)),
        )
        .dst(BACKEND, 5353)
        .gives(
            ClassIs::Ordinary,
            &pkt()
                .ipv4(CLIENT, BACKEND)
                .udp(5353, 5353)
                .payload(payload)
                .l4_checksum(L4Checksum::Raw(0)),
        ),
        case(
            "udp with a pseudo-header-only checksum leaves with a full one",
            &pkt()
                .ipv4(CLIENT, VIP)
                .udp(5353, 53)
                .payload(payload)
                .l4_checksum(L4Checksum::PseudoHeaderOnly),
        )
        .dst(BACKEND, 5353)
        .gives(
            ClassIs::Ordinary,
            &pkt().ipv4(CLIENT, BACKEND).udp(5353, 5353).payload(payload),
        ),
        case(
            "tcp with a pseudo-header-only checksum leaves with a full one",
            &tcp_client_to_vip()
                .payload(payload)
                .l4_checksum(L4Checksum::PseudoHeaderOnly),
        )
        .dst(BACKEND, 8080)
        .src(SNAT, 61000)
        .gives(
            ClassIs::Ordinary,
            &pkt()
                .ipv4(SNAT, BACKEND)
                .tcp(61000, 8080)
                .syn()
                .payload(payload),
        ),
        case(
            "ethernet padding of a short frame is left alone",
            &pkt()
                .ipv4(CLIENT, VIP)
                .udp(5353, 53)
                .payload(b"x")
                .pad_to(60),
        )
        .dst(BACKEND, 5353)
        .gives(
            ClassIs::Ordinary,
            &pkt()
                .ipv4(CLIENT, BACKEND)
                .udp(5353, 5353)
                .payload(b"x")
                .pad_to(60),
        ),
        case(
            "tcp over ipv6 is dnatted",
            &pkt().ipv6(CLIENT6, VIP6).tcp(40000, 80).syn(),
        )
        .dst(BACKEND6, 8080)
        .gives(
            ClassIs::Ordinary,
            &pkt().ipv6(CLIENT6, BACKEND6).tcp(40000, 8080).syn(),
        ),
        case(
            "udp over ipv6 is dnatted",
            &pkt().ipv6(CLIENT6, VIP6).udp(5353, 53).payload(payload),
        )
        .dst(BACKEND6, 5353)
        .gives(
            ClassIs::Ordinary,
            &pkt()
                .ipv6(CLIENT6, BACKEND6)
                .udp(5353, 5353)
                .payload(payload),
        ),
        case(
            "udp over ipv6 with checksum zero leaves with a valid checksum",
            &pkt()
                .ipv6(CLIENT6, VIP6)
                .udp(5353, 53)
                .payload(payload)
                .l4_checksum(L4Checksum::Raw(0)),
        )
        .dst(BACKEND6, 5353)
        .gives(
            ClassIs::Ordinary,
            &pkt()
                .ipv6(CLIENT6, BACKEND6)
                .udp(5353, 5353)
                .payload(payload),
        ),
        case(
            "udp over ipv6 with a pseudo-header-only checksum leaves with a full one",
            &pkt()
                .ipv6(CLIENT6, VIP6)
                .udp(5353, 53)
                .payload(payload)
                .l4_checksum(L4Checksum::PseudoHeaderOnly),
        )
        .dst(BACKEND6, 5353)
        .gives(
            ClassIs::Ordinary,
            &pkt()
                .ipv6(CLIENT6, BACKEND6)
                .udp(5353, 5353)
                .payload(payload),
        ),
        case(
            "ipv6 extension headers are walked to the transport header",
            &pkt()
                .ipv6(CLIENT6, VIP6)
                .ipv6_ext(IpProto::HOP_BY_HOP, 6)
                .ipv6_ext(IpProto::DESTINATION_OPTIONS, 14)
                .ipv6_ext(IpProto::ROUTING, 6)
                .tcp(40000, 80)
                .syn(),
        )
        .dst(BACKEND6, 8080)
        .gives(
            ClassIs::Ordinary,
            &pkt()
                .ipv6(CLIENT6, BACKEND6)
                .ipv6_ext(IpProto::HOP_BY_HOP, 6)
                .ipv6_ext(IpProto::DESTINATION_OPTIONS, 14)
                .ipv6_ext(IpProto::ROUTING, 6)
                .tcp(40000, 8080)
                .syn(),
        ),
        case(
            "an atomic ipv6 fragment is an ordinary packet",
            &pkt()
                .ipv6(CLIENT6, VIP6)
                .fragment(9, 0, false)
                .udp(5353, 53),
        )
        .dst(BACKEND6, 5353)
        .gives(
            ClassIs::Ordinary,
            &pkt()
                .ipv6(CLIENT6, BACKEND6)
                .fragment(9, 0, false)
                .udp(5353, 5353),
        ),
        case(
            "icmp echo request is dnatted with its identifier kept",
            &pkt().ipv4(CLIENT, VIP).echo_request(77, 1).payload(payload),
        )
        .dst(BACKEND, 77)
        .gives(
            ClassIs::Ordinary,
            &pkt()
                .ipv4(CLIENT, BACKEND)
                .echo_request(77, 1)
                .payload(payload),
        ),
        case(
            "icmp echo request under snat gets a new identifier",
            &pkt().ipv4(CLIENT, VIP).echo_request(77, 1),
        )
        .dst(BACKEND, 77)
        .src(SNAT, 3000)
        .gives(
            ClassIs::Ordinary,
            &pkt().ipv4(SNAT, BACKEND).echo_request(3000, 1),
        ),
        case(
            "icmpv6 echo request is dnatted",
            &pkt().ipv6(CLIENT6, VIP6).echo_request(77, 1),
        )
        .dst(BACKEND6, 77)
        .gives(
            ClassIs::Ordinary,
            &pkt().ipv6(CLIENT6, BACKEND6).echo_request(77, 1),
        ),
        case(
            "first ipv4 fragment is dnatted with its port",
            &tcp_client_to_vip().payload(payload).fragment(5, 0, true),
        )
        .dst(BACKEND, 8080)
        .gives(
            ClassIs::FirstFragment,
            &pkt()
                .ipv4(CLIENT, BACKEND)
                .tcp(40000, 8080)
                .syn()
                .payload(payload)
                .fragment(5, 0, true),
        ),
        // Issue 11, fault 11: the primitives recorded a port these frames do not carry (the
        // fuzz target's assertion fired within ~40 executions). Issue 14: a later fragment
        // follows its first fragment's translation, its addresses only.
        case(
            "non-first ipv4 fragment gets its address only: it has no port",
            &pkt()
                .ipv4(CLIENT, VIP)
                .proto(IpProto::TCP)
                .payload(payload)
                .fragment(5, 1480, false),
        )
        .dst(BACKEND, 8080)
        .gives(
            ClassIs::NonFirstFragment,
            &pkt()
                .ipv4(CLIENT, BACKEND)
                .proto(IpProto::TCP)
                .payload(payload)
                .fragment(5, 1480, false),
        ),
        case(
            "non-first ipv6 fragment gets its address only: it has no port",
            &pkt()
                .ipv6(CLIENT6, VIP6)
                .proto(IpProto::UDP)
                .payload(payload)
                .fragment(5, 1448, true),
        )
        .src(BACKEND6, 5353)
        .gives(
            ClassIs::NonFirstFragment,
            &pkt()
                .ipv6(BACKEND6, VIP6)
                .proto(IpProto::UDP)
                .payload(payload)
                .fragment(5, 1448, true),
        ),
        case(
            "non-first ipv4 fragment of an icmp echo gets its address only (the fuzz crash 22fb5ace)",
            &pkt()
                .ipv4(ROUTER, CLIENT)
                .proto(IpProto::ICMP)
                .payload(payload)
                .fragment(0x34, 0x1000, false),
        )
        .dst(BACKEND, 8080)
        .gives(
            ClassIs::NonFirstFragment,
            &pkt()
                .ipv4(ROUTER, BACKEND)
                .proto(IpProto::ICMP)
                .payload(payload)
                .fragment(0x34, 0x1000, false),
        ),
    ]
}

/// ICMP errors: the outer and the quoted headers are both translated.
fn icmp_error_cases() -> Vec<Case> {
    let frag_needed = |mtu: u16| {
        let [a, b] = mtu.to_be_bytes();
        (3, 4, [0, 0, a, b])
    };
    let (ty, code, rest) = frag_needed(1400);
    // A router between xlb and the backend cannot forward the client's DNATted segment.
    let quote_to_backend = pkt()
        .ipv4(CLIENT, BACKEND)
        .dont_fragment()
        .tcp(40000, 8080)
        .ack()
        .payload(&[0; 1400])
        .ip_packet();
    let quote_to_vip = pkt()
        .ipv4(CLIENT, VIP)
        .dont_fragment()
        .tcp(40000, 80)
        .ack()
        .payload(&[0; 1400])
        .ip_packet();
    // A router between xlb and the client cannot forward the backend's reply (sent as the VIP).
    let quote_from_vip = pkt()
        .ipv4(VIP, CLIENT)
        .dont_fragment()
        .tcp(80, 40000)
        .ack()
        .payload(&[0; 64])
        .ip_packet();
    let quote_from_backend = pkt()
        .ipv4(BACKEND, CLIENT)
        .dont_fragment()
        .tcp(8080, 40000)
        .ack()
        .payload(&[0; 64])
        .ip_packet();
    let udp_to_backend = pkt()
        .ipv4(CLIENT, BACKEND)
        .udp(5353, 5353)
        .payload(b"query")
        .ip_packet();
    let udp_to_vip = pkt()
        .ipv4(CLIENT, VIP)
        .udp(5353, 53)
        .payload(b"query")
        .ip_packet();
    let ptb = |mtu: u32| (2, 0, mtu.to_be_bytes());
    let (ty6, code6, rest6) = ptb(1280);
    let quote6_from_vip = pkt()
        .ipv6(VIP6, CLIENT6)
        .tcp(80, 40000)
        .ack()
        .payload(&[0; 1200])
        .ip_packet();
    let quote6_from_backend = pkt()
        .ipv6(BACKEND6, CLIENT6)
        .tcp(8080, 40000)
        .ack()
        .payload(&[0; 1200])
        .ip_packet();
    vec![
        case(
            "fragmentation needed from a router on the backend side is un-dnatted, router kept",
            &pkt()
                .ipv4(ROUTER, CLIENT)
                .icmp(ty, code, rest)
                .payload(&quote_to_backend[..576 - 28]),
        )
        .src(VIP, 80)
        .gives(
            ClassIs::IcmpError(IcmpErrorKind::FragmentationNeeded { mtu: 1400 }),
            &pkt()
                .ipv4(ROUTER, CLIENT)
                .icmp(ty, code, rest)
                .payload(&quote_to_vip[..576 - 28]),
        ),
        case(
            "fragmentation needed for a reply reaches the backend that sent it",
            &pkt()
                .ipv4(ROUTER, VIP)
                .icmp(ty, code, rest)
                .payload(&quote_from_vip),
        )
        .dst(BACKEND, 8080)
        .gives(
            ClassIs::IcmpError(IcmpErrorKind::FragmentationNeeded { mtu: 1400 }),
            &pkt()
                .ipv4(ROUTER, BACKEND)
                .icmp(ty, code, rest)
                .payload(&quote_from_backend),
        ),
        case(
            "port unreachable from the backend itself shows the vip as its source",
            &pkt()
                .ipv4(BACKEND, CLIENT)
                .icmp(3, 3, [0; 4])
                .payload(&udp_to_backend),
        )
        .src(VIP, 53)
        .gives(
            ClassIs::IcmpError(IcmpErrorKind::DestinationUnreachable),
            &pkt()
                .ipv4(VIP, CLIENT)
                .icmp(3, 3, [0; 4])
                .payload(&udp_to_vip),
        ),
        case(
            "time exceeded quoting only eight transport bytes is translated",
            &pkt()
                .ipv4(ROUTER, CLIENT)
                .icmp(11, 0, [0; 4])
                .payload(&quote_to_backend[..28]),
        )
        .src(VIP, 80)
        .gives(
            ClassIs::IcmpError(IcmpErrorKind::TimeExceeded),
            &pkt()
                .ipv4(ROUTER, CLIENT)
                .icmp(11, 0, [0; 4])
                .payload(&quote_to_vip[..28]),
        ),
        case(
            "snat reply path: an error to the snat address returns to the client",
            &pkt()
                .ipv4(ROUTER, SNAT)
                .icmp(ty, code, rest)
                .payload(&pkt().ipv4(SNAT, BACKEND).tcp(61000, 8080).ack().ip_packet()),
        )
        .dst(CLIENT, 40000)
        .src(VIP, 80)
        .gives(
            ClassIs::IcmpError(IcmpErrorKind::FragmentationNeeded { mtu: 1400 }),
            &pkt()
                .ipv4(ROUTER, CLIENT)
                .icmp(ty, code, rest)
                .payload(&pkt().ipv4(CLIENT, VIP).tcp(40000, 80).ack().ip_packet()),
        ),
        case(
            "ipv6 packet too big for a reply reaches the backend that sent it",
            &pkt()
                .ipv6(ROUTER6, VIP6)
                .icmp(ty6, code6, rest6)
                .payload(&quote6_from_vip[..1232]),
        )
        .dst(BACKEND6, 8080)
        .gives(
            ClassIs::IcmpError(IcmpErrorKind::PacketTooBig { mtu: 1280 }),
            &pkt()
                .ipv6(ROUTER6, BACKEND6)
                .icmp(ty6, code6, rest6)
                .payload(&quote6_from_backend[..1232]),
        ),
        case(
            "ipv6 time exceeded quoting a udp datagram is un-dnatted",
            &pkt()
                .ipv6(ROUTER6, CLIENT6)
                .icmp(3, 0, [0; 4])
                .payload(&pkt().ipv6(CLIENT6, BACKEND6).udp(5353, 5353).ip_packet()),
        )
        .src(VIP6, 53)
        .gives(
            ClassIs::IcmpError(IcmpErrorKind::TimeExceeded),
            &pkt()
                .ipv6(ROUTER6, CLIENT6)
                .icmp(3, 0, [0; 4])
                .payload(&pkt().ipv6(CLIENT6, VIP6).udp(5353, 53).ip_packet()),
        ),
        case(
            "icmp error quoting an echo request is translated",
            &pkt()
                .ipv4(ROUTER, CLIENT)
                .icmp(11, 0, [0; 4])
                .payload(&pkt().ipv4(CLIENT, BACKEND).echo_request(9, 1).ip_packet()),
        )
        .src(VIP, 9)
        .gives(
            ClassIs::IcmpError(IcmpErrorKind::TimeExceeded),
            &pkt()
                .ipv4(ROUTER, CLIENT)
                .icmp(11, 0, [0; 4])
                .payload(&pkt().ipv4(CLIENT, VIP).echo_request(9, 1).ip_packet()),
        ),
    ]
}

#[test]
fn rewrite_fixtures_produce_their_golden_output() {
    run_table(&rewrite_cases());
}

#[test]
fn icmp_error_fixtures_translate_outer_and_quoted_headers() {
    run_table(&icmp_error_cases());
}

#[test]
fn parse_reports_offsets_flags_and_key_of_a_tagged_segment() {
    let frame = tcp_client_to_vip().vlan(5).ack().tcp_options(4).build();
    let p = parse(&frame).unwrap();
    assert_eq!((p.l3_offset, p.l4_offset, p.l3_end), (18, 38, 38 + 24));
    assert_eq!(p.tcp_flags.0, 0x12);
    assert_eq!(p.checksum, ChecksumState::Complete);
    assert_eq!(p.key.to_string(), "tcp 198.18.0.1:40000 -> 198.18.64.1:80");
}

#[test]
fn parse_detects_pseudo_header_only_and_absent_checksums() {
    let partial = pkt()
        .ipv4(CLIENT, VIP)
        .udp(1, 2)
        .l4_checksum(L4Checksum::PseudoHeaderOnly)
        .build();
    assert_eq!(
        parse(&partial).unwrap().checksum,
        ChecksumState::PseudoHeaderOnly
    );
    let none = pkt()
        .ipv4(CLIENT, VIP)
        .udp(1, 2)
        .l4_checksum(L4Checksum::Raw(0))
        .build();
    assert_eq!(parse(&none).unwrap().checksum, ChecksumState::Absent);
}

#[test]
fn icmp_error_key_is_the_quoted_flow_reversed() {
    let quote = pkt().ipv4(VIP, CLIENT).tcp(80, 40000).ack().ip_packet();
    let frame = pkt()
        .ipv4(ROUTER, VIP)
        .icmp(3, 4, [0, 0, 5, 0xdc])
        .payload(&quote)
        .build();
    let p = parse(&frame).unwrap();
    assert_eq!(p.key.to_string(), "tcp 198.18.0.1:40000 -> 198.18.64.1:80");
}

#[test]
fn rewriting_a_packet_passed_to_the_kernel_is_refused() {
    let mut frame = pkt().ethertype(0x0806).payload(&[0; 28]).build();
    let mut p = parse(&frame).unwrap();
    let err = set_destination(&mut frame, &mut p, &Endpoint::new(BACKEND.into(), 1)).unwrap_err();
    assert_eq!(err, xlb_dataplane::packet::RewriteError::NotTranslatable);
}

#[test]
fn rewriting_with_an_address_of_the_other_family_is_refused() {
    let mut frame = tcp_client_to_vip().build();
    let before = frame.clone();
    let mut p = parse(&frame).unwrap();
    let err = set_destination(&mut frame, &mut p, &Endpoint::new(BACKEND6.into(), 1)).unwrap_err();
    assert_eq!(err, xlb_dataplane::packet::RewriteError::FamilyMismatch);
    assert_eq!(frame, before);
}

#[test]
fn a_rewrite_of_a_shorter_frame_than_parsed_is_refused_not_a_panic() {
    let frame = tcp_client_to_vip().build();
    let mut p = parse(&frame).unwrap();
    let mut short = frame[..30].to_vec();
    let err = set_destination(&mut short, &mut p, &Endpoint::new(BACKEND.into(), 1)).unwrap_err();
    assert_eq!(err, xlb_dataplane::packet::RewriteError::FrameMismatch);
}
