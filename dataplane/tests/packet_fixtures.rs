//! Golden packet-in/packet-out fixtures for the wire layer.
//!
//! Each row names a case, builds an input frame, lists the rewrites to apply and the expected
//! result: a drop reason, a pass reason, or a class and an output frame built from scratch by
//! the builder (so every checksum in it is a full recomputation). A failing row prints a
//! per-layer decoded diff; `XLB_FIXTURE_PCAP_DIR=/tmp/x` also dumps its frames as pcap.

mod common;

use std::net::IpAddr;

use common::*;
use xlb_dataplane::packet::builder::{pkt, L4Checksum, PacketBuilder};
use xlb_dataplane::packet::{
    parse, set_destination, set_ethernet, set_source, ChecksumState, Class, DropReason, Endpoint,
    IcmpErrorKind, IpProto, MacAddr, PassReason, MAX_IPV6_EXTENSION_HEADERS,
};

/// One rewrite step.
#[derive(Clone, Copy, Debug)]
enum Op {
    Dst(IpAddr, u16),
    Src(IpAddr, u16),
    Eth(MacAddr, MacAddr),
}

/// What a row expects.
enum Expect {
    Drop(DropReason),
    Pass(PassReason),
    /// The class after parsing, and the frame after the rewrites.
    Output(ClassIs, Vec<u8>),
}

/// The class, without the offsets (those are checked through the output frame).
#[derive(Debug, PartialEq)]
enum ClassIs {
    Ordinary,
    FirstFragment,
    NonFirstFragment,
    IcmpError(IcmpErrorKind),
}

struct Case {
    name: &'static str,
    input: Vec<u8>,
    ops: Vec<Op>,
    expect: Expect,
}

fn case(name: &'static str, input: &PacketBuilder) -> Case {
    Case {
        name,
        input: input.build(),
        ops: Vec::new(),
        expect: Expect::Drop(DropReason::EthernetTruncated),
    }
}

impl Case {
    fn raw(name: &'static str, input: Vec<u8>) -> Self {
        Self {
            name,
            input,
            ops: Vec::new(),
            expect: Expect::Drop(DropReason::EthernetTruncated),
        }
    }
    fn dst(mut self, addr: impl Into<IpAddr>, port: u16) -> Self {
        self.ops.push(Op::Dst(addr.into(), port));
        self
    }
    fn src(mut self, addr: impl Into<IpAddr>, port: u16) -> Self {
        self.ops.push(Op::Src(addr.into(), port));
        self
    }
    fn eth(mut self, src: MacAddr, dst: MacAddr) -> Self {
        self.ops.push(Op::Eth(src, dst));
        self
    }
    fn drops(mut self, reason: DropReason) -> Self {
        self.expect = Expect::Drop(reason);
        self
    }
    fn passes(mut self, reason: PassReason) -> Self {
        self.expect = Expect::Pass(reason);
        self
    }
    fn gives(mut self, class: ClassIs, output: &PacketBuilder) -> Self {
        self.expect = Expect::Output(class, output.build());
        self
    }

    /// Runs the row; returns a failure description.
    fn run(&self) -> Result<(), String> {
        let parsed = parse(&self.input);
        match (&self.expect, parsed) {
            (Expect::Drop(want), Err(got)) if *want == got => Ok(()),
            (Expect::Drop(want), other) => Err(format!("expected drop {want:?}, got {other:?}")),
            (Expect::Pass(want), Ok(p)) if p.class == Class::NotForUs(*want) => Ok(()),
            (Expect::Pass(want), other) => Err(format!("expected pass {want:?}, got {other:?}")),
            (Expect::Output(_, _), Err(reason)) => Err(format!("dropped as {reason:?}")),
            (Expect::Output(class, want), Ok(mut p)) => {
                let got_class = match p.class {
                    Class::Ordinary => ClassIs::Ordinary,
                    Class::Fragment(f) if f.first => ClassIs::FirstFragment,
                    Class::Fragment(_) => ClassIs::NonFirstFragment,
                    Class::IcmpError(e) => ClassIs::IcmpError(e.kind),
                    Class::NotForUs(r) => return Err(format!("passed as {r:?}")),
                };
                if got_class != *class {
                    return Err(format!("class {got_class:?}, expected {class:?}"));
                }
                let mut frame = self.input.clone();
                for op in &self.ops {
                    let result = match *op {
                        Op::Dst(a, port) => {
                            set_destination(&mut frame, &mut p, &Endpoint::new(a, port))
                        }
                        Op::Src(a, port) => set_source(&mut frame, &mut p, &Endpoint::new(a, port)),
                        Op::Eth(s, d) => set_ethernet(&mut frame, s, d),
                    };
                    result.map_err(|e| format!("{op:?} refused: {e:?}"))?;
                }
                if frame != *want {
                    dump_pcap(self.name, &[&self.input, &frame, want]);
                    return Err(format!(
                        "output differs (- expected, + actual):\n{}",
                        layer_diff(want, &frame)
                    ));
                }
                // The Parsed value kept up with the rewrites: it describes the output frame.
                let reparsed = parse(&frame).map_err(|r| format!("output dropped: {r:?}"))?;
                if reparsed.key != p.key {
                    return Err(format!(
                        "key after rewrite {:?}, output parses as {:?}",
                        p.key, reparsed.key
                    ));
                }
                Ok(())
            }
        }
    }
}

fn run_table(cases: &[Case]) {
    // `XLB_FIXTURE_CORPUS_DIR` collects every input as a seed for the fuzz target, with 18
    // bytes appended for its rewrite choice.
    if let Some(dir) = std::env::var_os("XLB_FIXTURE_CORPUS_DIR") {
        std::fs::create_dir_all(&dir).unwrap();
        for c in cases {
            let mut seed = c.input.clone();
            seed.extend_from_slice(&[
                198, 18, 128, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x1f, 0x90,
            ]);
            let name: String = c
                .name
                .chars()
                .map(|ch| if ch.is_ascii_alphanumeric() { ch } else { '_' })
                .collect();
            std::fs::write(std::path::Path::new(&dir).join(name), seed).unwrap();
        }
    }
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| c.run().err().map(|e| format!("case '{}': {e}", c.name)))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn tcp_client_to_vip() -> PacketBuilder {
    pkt().ipv4(CLIENT, VIP).tcp(40000, 80).syn()
}

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
        case(
            "non-first ipv4 fragment gets the address only",
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
            "non-first ipv6 fragment gets the address only",
            &pkt()
                .ipv6(CLIENT6, VIP6)
                .proto(IpProto::UDP)
                .payload(payload)
                .fragment(5, 1448, true),
        )
        .dst(BACKEND6, 5353)
        .gives(
            ClassIs::NonFirstFragment,
            &pkt()
                .ipv6(CLIENT6, BACKEND6)
                .proto(IpProto::UDP)
                .payload(payload)
                .fragment(5, 1448, true),
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
            "sctp is not translated",
            &pkt()
                .ipv4(CLIENT, VIP)
                .proto(IpProto::SCTP)
                .payload(&[0; 12]),
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
fn rewrite_fixtures_produce_their_golden_output() {
    run_table(&rewrite_cases());
}

#[test]
fn icmp_error_fixtures_translate_outer_and_quoted_headers() {
    run_table(&icmp_error_cases());
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
