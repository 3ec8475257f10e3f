//! Golden fixtures for frames xlb must not translate: malformed ones (each with its drop
//! reason) and valid ones it passes to the kernel (each with its pass reason).

mod common;

use common::fixture::{case, run_table, Case, Expect};
use common::*;
use xlb_dataplane::packet::builder::pkt;
use xlb_dataplane::packet::{DropReason, IpProto, PassReason, MAX_IPV6_EXTENSION_HEADERS};

/// Malformed frames, one or more per drop reason.
fn drop_cases() -> Vec<Case> {
    use DropReason::*;
    let tcp = tcp_client_to_vip();
    let udp = pkt().ipv4(CLIENT, VIP).udp(5353, 53);
    let tcp6 = pkt().ipv6(CLIENT6, VIP6).tcp(40000, 80).syn();
    let mut too_many = pkt().ipv6(CLIENT6, VIP6);
    for _ in 0..=MAX_IPV6_EXTENSION_HEADERS {
        too_many = too_many.ipv6_ext(IpProto::DESTINATION_OPTIONS, 6);
    }
    vec![
        Case::raw("a frame shorter than an ethernet header", vec![0; 13]).drops(EthernetTruncated),
        case("a vlan tag cut short", &tcp.clone().vlan(3).truncate(16)).drops(VlanTruncated),
        case("an ipv4 header cut short", &tcp.clone().truncate(14 + 19)).drops(Ipv4Truncated),
        case("ethertype ipv4 with version 6", &tcp.clone().version(6)).drops(Ipv4BadVersion),
        case("ihl below five", &tcp.clone().ihl(4)).drops(Ipv4BadIhl),
        case("total length past the frame", &tcp.clone().total_len(1000)).drops(Ipv4BadTotalLength),
        case(
            "total length shorter than the header",
            &tcp.clone().total_len(12),
        )
        .drops(Ipv4BadTotalLength),
        case("ihl past the total length", &tcp.clone().ihl(15)).drops(Ipv4BadTotalLength),
        case(
            "a wrong ipv4 header checksum",
            &tcp.clone().bad_ip_checksum(),
        )
        .drops(Ipv4BadHeaderChecksum),
        case("an ipv6 header cut short", &tcp6.clone().truncate(14 + 39)).drops(Ipv6Truncated),
        case("ethertype ipv6 with version 4", &tcp6.clone().version(4)).drops(Ipv6BadVersion),
        case(
            "ipv6 payload length past the frame",
            &tcp6.clone().total_len(500),
        )
        .drops(Ipv6BadPayloadLength),
        case(
            "an extension header past the payload",
            &tcp6
                .clone()
                .ipv6_ext(IpProto::DESTINATION_OPTIONS, 14)
                .total_len(8),
        )
        .drops(Ipv6ExtensionHeaderTruncated),
        case(
            "a jumbogram's empty payload",
            &tcp6.clone().ipv6_ext(IpProto::HOP_BY_HOP, 6).total_len(0),
        )
        .drops(Ipv6ExtensionHeaderTruncated),
        case(
            "a crafted long extension header chain",
            &too_many.tcp(40000, 80),
        )
        .drops(Ipv6ExtensionChainTooLong),
        case(
            "hop-by-hop after another extension header",
            &tcp6
                .clone()
                .ipv6_ext(IpProto::DESTINATION_OPTIONS, 6)
                .ipv6_ext(IpProto::HOP_BY_HOP, 6),
        )
        .drops(Ipv6HopByHopNotFirst),
        case(
            "a tcp header cut by the ip total length",
            &tcp.clone().total_len(20 + 19),
        )
        .drops(TcpTruncated),
        case(
            "a tcp header in a first fragment too small to hold it",
            &tcp.clone().fragment(1, 0, true).total_len(20 + 8),
        )
        .drops(TcpTruncated),
        case("tcp data offset below five", &tcp.clone().data_offset(4)).drops(TcpBadDataOffset),
        case(
            "tcp data offset past the segment",
            &tcp.clone().data_offset(15),
        )
        .drops(TcpBadDataOffset),
        case(
            "tcp data offset past an ipv6 segment",
            &tcp6.clone().data_offset(6),
        )
        .drops(TcpBadDataOffset),
        case("a udp header cut short", &udp.clone().total_len(20 + 7)).drops(UdpTruncated),
        case("zero-length udp", &udp.clone().udp_len(0)).drops(UdpLengthTooShort),
        case("udp length below its header", &udp.clone().udp_len(7)).drops(UdpLengthTooShort),
        case(
            "udp length past the ip payload",
            &udp.clone().payload(b"abc").udp_len(12),
        )
        .drops(UdpLengthOverrun),
        case(
            "an sctp common header cut short",
            &pkt()
                .ipv4(CLIENT, VIP)
                .proto(IpProto::SCTP)
                .payload(&[0; 11]),
        )
        .drops(SctpTruncated),
        case(
            "an icmp header cut short",
            &pkt().ipv4(CLIENT, VIP).echo_request(1, 1).total_len(20 + 7),
        )
        .drops(IcmpTruncated),
        case(
            "an icmp error quoting less than an ip header",
            &pkt()
                .ipv4(ROUTER, CLIENT)
                .icmp(3, 1, [0; 4])
                .payload(&[0x45; 12]),
        )
        .drops(IcmpErrorBadQuote),
        case(
            "an icmp error quoting fewer than eight transport bytes",
            &pkt()
                .ipv4(ROUTER, CLIENT)
                .icmp(3, 1, [0; 4])
                .payload(&tcp.ip_packet()[..24]),
        )
        .drops(IcmpErrorBadQuote),
        case(
            "an icmpv6 error quoting ipv4",
            &pkt()
                .ipv6(ROUTER6, CLIENT6)
                .icmp(1, 4, [0; 4])
                .payload(&tcp.ip_packet()),
        )
        .drops(IcmpErrorBadQuote),
    ]
}

/// Valid frames that are not translated, and classification details.
fn pass_cases() -> Vec<Case> {
    use PassReason::*;
    vec![
        case(
            "arp goes to the kernel",
            &pkt().ethertype(0x0806).payload(&[0; 28]),
        )
        .passes(NotIp),
        case(
            "a second vlan tag goes to the kernel",
            &pkt().vlan(1).ethertype(0x8100).payload(&[0; 46]),
        )
        .passes(NotIp),
        case(
            "gre is not translated",
            &pkt().ipv4(CLIENT, VIP).proto(IpProto(47)).payload(&[0; 12]),
        )
        .passes(UnsupportedProtocol),
        case(
            "icmp in ipv6 is not icmpv6",
            &pkt()
                .ipv6(CLIENT6, VIP6)
                .proto(IpProto::ICMP)
                .payload(&[8, 0, 0, 0, 0, 0, 0, 0]),
        )
        .passes(UnsupportedProtocol),
        case(
            "no next header is not translated",
            &pkt().ipv6(CLIENT6, VIP6),
        )
        .passes(UnsupportedProtocol),
        case(
            "neighbour solicitation goes to the kernel",
            &pkt()
                .ipv6(CLIENT6, VIP6)
                .icmp(135, 0, [0; 4])
                .payload(&[0; 16]),
        )
        .passes(IcmpNotTranslated),
        case(
            "an icmp error about an icmp error is not translated",
            &pkt()
                .ipv4(ROUTER, CLIENT)
                .icmp(3, 1, [0; 4])
                .payload(&pkt().ipv4(CLIENT, BACKEND).icmp(3, 3, [0; 4]).ip_packet()),
        )
        .passes(IcmpNotTranslated),
        case(
            "an icmp error quoting a non-first fragment is not translated",
            &pkt().ipv4(ROUTER, CLIENT).icmp(11, 1, [0; 4]).payload(
                &pkt()
                    .ipv4(CLIENT, VIP)
                    .proto(IpProto::UDP)
                    .payload(&[0; 8])
                    .fragment(3, 64, false)
                    .ip_packet(),
            ),
        )
        .passes(IcmpNotTranslated),
        case(
            "a routing header with segments left goes to the kernel",
            &pkt()
                .ipv6(CLIENT6, VIP6)
                .ipv6_ext(IpProto::ROUTING, 22)
                .routing_segments_left(1)
                .tcp(40000, 80)
                .syn(),
        )
        .passes(Ipv6RoutingHeader),
    ]
}

#[test]
fn malformed_fixtures_are_dropped_with_their_reason() {
    run_table(&drop_cases());
}

#[test]
fn pass_fixtures_are_passed_to_the_kernel_with_their_reason() {
    run_table(&pass_cases());
}

#[test]
fn every_drop_reason_is_produced_by_some_fixture() {
    let cases = drop_cases();
    for reason in DropReason::ALL {
        let produced = cases
            .iter()
            .any(|c| matches!(c.expect, Expect::Drop(r) if r == reason) && c.run().is_ok());
        assert!(produced, "no passing fixture produces {reason:?}");
    }
}

#[test]
fn every_pass_reason_is_produced_by_some_fixture() {
    let cases = pass_cases();
    let all = [
        PassReason::NotIp,
        PassReason::UnsupportedProtocol,
        PassReason::IcmpNotTranslated,
        PassReason::Ipv6RoutingHeader,
    ];
    for reason in all {
        assert!(
            cases
                .iter()
                .any(|c| matches!(c.expect, Expect::Pass(r) if r == reason) && c.run().is_ok()),
            "{reason:?}"
        );
    }
}
