//! Property tests of the wire layer: no input panics it, parse gives back what was built, and
//! every incremental checksum update equals a full recomputation.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use common::{equal_up_to_checksum_zero, layer_diff};
use proptest::prelude::*;
use xlb_dataplane::packet::builder::{pkt, L4Checksum, PacketBuilder};
use xlb_dataplane::packet::{
    parse, set_destination, set_source, Class, Endpoint, IpProto, Layers, TcpFlags,
};

/// A random, valid packet.
#[derive(Clone, Debug)]
struct Spec {
    v6: bool,
    /// 0 TCP, 1 UDP, 2 ICMP echo request.
    proto: u8,
    src: u128,
    dst: u128,
    sport: u16,
    dport: u16,
    vlan: Option<u16>,
    ip_options: usize,
    tcp_options: usize,
    flags: u8,
    extensions: Vec<(u8, usize)>,
    payload: Vec<u8>,
    /// 0 valid, 1 pseudo-header only, 2 zero (UDP only; else valid).
    csum: u8,
    pad: bool,
}

fn spec() -> impl Strategy<Value = Spec> {
    let header = (
        any::<bool>(),
        0u8..3,
        any::<u128>(),
        any::<u128>(),
        any::<u16>(),
        any::<u16>(),
        proptest::option::of(0u16..4096),
    );
    let shape = (
        0usize..=10,
        0usize..=10,
        any::<u8>(),
        proptest::collection::vec((0u8..3, 0usize..30), 0..3),
        proptest::collection::vec(any::<u8>(), 0..80),
        0u8..3,
        any::<bool>(),
    );
    (header, shape).prop_map(
        |(
            (v6, proto, src, dst, sport, dport, vlan),
            (io, to, flags, extensions, payload, csum, pad),
        )| {
            Spec {
                v6,
                proto,
                src,
                dst,
                sport,
                dport,
                vlan,
                ip_options: io * 4,
                tcp_options: to * 4,
                flags,
                extensions,
                payload,
                csum,
                pad,
            }
        },
    )
}

fn addr(v6: bool, bits: u128) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from_bits(bits))
    } else {
        IpAddr::V4(Ipv4Addr::from_bits(bits as u32))
    }
}

impl Spec {
    fn src_ip(&self) -> IpAddr {
        addr(self.v6, self.src)
    }
    fn dst_ip(&self) -> IpAddr {
        addr(self.v6, self.dst)
    }

    /// The frame, with the given addresses and ports (for echo, the identifier is `sport`).
    fn builder(
        &self,
        src: IpAddr,
        dst: IpAddr,
        sport: u16,
        dport: u16,
        csum: L4Checksum,
    ) -> PacketBuilder {
        let mut b = pkt().ip(src, dst);
        if let Some(v) = self.vlan {
            b = b.vlan(v);
        }
        if self.v6 {
            for (i, &(kind, len)) in self.extensions.iter().enumerate() {
                let kind = [
                    IpProto::HOP_BY_HOP,
                    IpProto::DESTINATION_OPTIONS,
                    IpProto::ROUTING,
                ][usize::from(kind)];
                // Hop-by-hop may only come first.
                if kind != IpProto::HOP_BY_HOP || i == 0 {
                    b = b.ipv6_ext(kind, len);
                }
            }
        } else {
            b = b.ipv4_options(self.ip_options);
        }
        b = match self.proto {
            0 => b
                .tcp(sport, dport)
                .flags(TcpFlags(self.flags))
                .tcp_options(self.tcp_options),
            1 => b.udp(sport, dport),
            _ => b.echo_request(sport, 7),
        };
        b = b.payload(&self.payload).l4_checksum(csum);
        if self.pad {
            b = b.pad_to(64);
        }
        b
    }

    fn input_checksum(&self) -> L4Checksum {
        match (self.csum, self.proto) {
            (1, 0 | 1) => L4Checksum::PseudoHeaderOnly,
            (2, 1) => L4Checksum::Raw(0),
            _ => L4Checksum::Valid,
        }
    }

    /// How the rewritten frame's checksum must look: valid, except UDP over IPv4 without one.
    fn output_checksum(&self) -> L4Checksum {
        match (self.csum, self.proto, self.v6) {
            (2, 1, false) => L4Checksum::Raw(0),
            _ => L4Checksum::Valid,
        }
    }

    fn echo_ports(&self, sport: u16, dport: u16) -> (u16, u16) {
        if self.proto == 2 {
            (sport, sport)
        } else {
            (sport, dport)
        }
    }
}

/// Sets the first payload word so that the frame's transport checksum becomes a ones-complement
/// zero: with that word zero, the checksum c is the complement of the rest's sum S, and adding
/// c to S gives all ones.
fn tune_to_zero_checksum(spec: &mut Spec, frame: &[u8]) {
    let p = parse(frame).unwrap();
    let off = usize::from(p.l4_offset)
        + match spec.proto {
            0 => 16,
            1 => 6,
            _ => 2,
        };
    spec.payload[..2].copy_from_slice(&frame[off..off + 2]);
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn parsing_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256), a in any::<u128>(), port in any::<u16>()) {
        exercise(&bytes, a, port);
    }

    #[test]
    fn parsing_and_rewriting_mutated_valid_frames_never_panics(
        s in spec(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
        a in any::<u128>(),
        port in any::<u16>(),
    ) {
        let mut frame = s.builder(s.src_ip(), s.dst_ip(), s.sport, s.dport, s.input_checksum()).build();
        for (at, value) in flips {
            let len = frame.len();
            frame[at % len] = value;
        }
        frame.truncate(cut % (frame.len() + 1));
        exercise(&frame, a, port);
    }

    #[test]
    fn parse_of_a_built_frame_gives_back_its_fields(s in spec()) {
        let frame = s.builder(s.src_ip(), s.dst_ip(), s.sport, s.dport, s.input_checksum()).build();
        let p = parse(&frame).map_err(|r| TestCaseError::fail(format!("{r:?}\n{}", Layers(&frame))))?;
        prop_assert_eq!(p.class, Class::Ordinary);
        prop_assert_eq!(p.key.src_ip(), s.src_ip());
        prop_assert_eq!(p.key.dst_ip(), s.dst_ip());
        let (sport, dport) = s.echo_ports(s.sport, s.dport);
        prop_assert_eq!((p.key.src_port, p.key.dst_port), (sport, dport));
        prop_assert_eq!(p.key.proto, [IpProto::TCP, IpProto::UDP, if s.v6 { IpProto::ICMPV6 } else { IpProto::ICMP }][usize::from(s.proto)]);
        prop_assert_eq!(p.l3_offset, if s.vlan.is_some() { 18 } else { 14 });
        if s.proto == 0 {
            prop_assert_eq!(p.tcp_flags.0, s.flags);
        }
        let unpadded = Spec { pad: false, ..s.clone() };
        let unpadded = unpadded.builder(s.src_ip(), s.dst_ip(), s.sport, s.dport, s.input_checksum()).build();
        prop_assert_eq!(usize::from(p.l3_end), unpadded.len());
    }

    #[test]
    fn incremental_checksum_updates_equal_full_recomputation(
        mut s in spec(),
        new_dst in any::<u128>(),
        new_dport in any::<u16>(),
        new_src in any::<u128>(),
        new_sport in any::<u16>(),
        which in 0u8..3,
        edge in 0u8..3,
    ) {
        let (dst, src) = (addr(s.v6, new_dst), addr(s.v6, new_src));
        let (out_src, out_sport) = if which >= 1 { (src, new_sport) } else { (s.src_ip(), s.sport) };
        let (out_dst, out_dport) = if which != 1 { (dst, new_dport) } else { (s.dst_ip(), s.dport) };
        // Echo has one identifier: the last rewrite that touches it wins.
        let (out_sport, out_dport) = if s.proto == 2 {
            let id = match which { 0 => new_dport, _ => new_sport };
            (id, id)
        } else {
            (out_sport, out_dport)
        };
        // Steer the input's or the output's checksum onto a ones-complement zero.
        if edge > 0 && s.payload.len() >= 2 && s.input_checksum() == L4Checksum::Valid {
            s.payload[0] = 0;
            s.payload[1] = 0;
            let frame = if edge == 1 {
                s.builder(s.src_ip(), s.dst_ip(), s.sport, s.dport, L4Checksum::Valid).build()
            } else {
                s.builder(out_src, out_dst, out_sport, out_dport, L4Checksum::Valid).build()
            };
            tune_to_zero_checksum(&mut s, &frame);
        }
        let input = s.builder(s.src_ip(), s.dst_ip(), s.sport, s.dport, s.input_checksum()).build();
        let expected = s.builder(out_src, out_dst, out_sport, out_dport, s.output_checksum()).build();

        let mut frame = input.clone();
        let mut p = parse(&frame).unwrap();
        if which != 1 {
            set_destination(&mut frame, &mut p, &Endpoint::new(dst, new_dport)).unwrap();
        }
        if which >= 1 {
            set_source(&mut frame, &mut p, &Endpoint::new(src, new_sport)).unwrap();
        }
        prop_assert!(!Layers(&frame).to_string().contains("BAD"), "{}", Layers(&frame));
        prop_assert!(
            equal_up_to_checksum_zero(&frame, &expected),
            "- expected, + actual:\n{}", layer_diff(&expected, &frame)
        );
        if s.proto == 1 && s.output_checksum() == L4Checksum::Valid {
            let csum_at = usize::from(p.l4_offset) + 6;
            prop_assert_ne!(&frame[csum_at..csum_at + 2], &[0, 0], "a UDP checksum never becomes zero");
        }
        prop_assert_eq!(parse(&frame).unwrap().key, p.key);
    }

    #[test]
    fn translated_icmp_errors_equal_errors_built_for_the_new_flow(
        s in spec(),
        quote_len in 28usize..200,
        from_endpoint in any::<bool>(),
        router in any::<u128>(),
        new_addr in any::<u128>(),
        new_port in any::<u16>(),
        source_side in any::<bool>(),
    ) {
        let plain = Spec { vlan: None, pad: false, csum: 0, ..s.clone() };
        let quoted = |src: IpAddr, dst: IpAddr, sport: u16, dport: u16| {
            let ip = plain.builder(src, dst, sport, dport, L4Checksum::Valid).ip_packet();
            let header = ip.len() - plain.payload.len() - match s.proto { 0 => 20 + s.tcp_options, _ => 8 };
            let mut cut = quote_len.max(header + 8).min(ip.len());
            // A quote cut through the quoted TCP checksum leaves half of it stale (nobody can
            // verify a truncated checksum, and its other half is unknown): not compared.
            if s.proto == 0 && cut == header + 17 {
                cut += 1;
            }
            ip[..cut].to_vec()
        };
        let new = addr(s.v6, new_addr);
        // The error travels from `origin` back to the quoted packet's source.
        let origin = if from_endpoint { s.dst_ip() } else { addr(s.v6, router) };
        let (ty, code) = if s.v6 { (1, 4) } else { (3, 3) };
        let error = |outer_src: IpAddr, outer_dst: IpAddr, quote: &[u8]| {
            pkt().ip(outer_src, outer_dst).icmp(ty, code, [0; 4]).payload(quote).build()
        };
        let input = error(origin, s.src_ip(), &quoted(s.src_ip(), s.dst_ip(), s.sport, s.dport));
        let echo = s.proto == 2;
        let expected = if source_side {
            // Quoted destination changes; the outer source only if the endpoint sent the error.
            let sport = if echo { new_port } else { s.sport };
            let outer_src = if origin == s.dst_ip() { new } else { origin };
            error(outer_src, s.src_ip(), &quoted(s.src_ip(), new, sport, new_port))
        } else {
            let dport = if echo { new_port } else { s.dport };
            error(origin, new, &quoted(new, s.dst_ip(), new_port, dport))
        };
        let mut frame = input.clone();
        let mut p = parse(&frame).unwrap();
        prop_assert!(matches!(p.class, Class::IcmpError(_)), "{:?}", p.class);
        if source_side {
            set_source(&mut frame, &mut p, &Endpoint::new(new, new_port)).unwrap();
        } else {
            set_destination(&mut frame, &mut p, &Endpoint::new(new, new_port)).unwrap();
        }
        prop_assert!(
            equal_up_to_checksum_zero(&frame, &expected),
            "- expected, + actual:\n{}", layer_diff(&expected, &frame)
        );
        prop_assert_eq!(parse(&frame).unwrap().key, p.key);
    }
}

/// 1024 cases per property, or `PROPTEST_CASES` for a longer search.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok());
    ProptestConfig::with_cases(cases.unwrap_or(1024))
}

/// Parses, describes and rewrites arbitrary bytes: none of it may panic.
fn exercise(bytes: &[u8], a: u128, port: u16) {
    let _ = Layers(bytes).to_string();
    if let Ok(p) = parse(bytes) {
        let v6 = p.key.family == xlb_dataplane::packet::Family::Ipv6;
        let mut frame = bytes.to_vec();
        let mut q = p;
        let _ = set_destination(&mut frame, &mut q, &Endpoint::new(addr(v6, a), port));
        let _ = set_source(
            &mut frame,
            &mut q,
            &Endpoint::new(addr(v6, a.rotate_left(7)), port),
        );
        let _ = set_destination(&mut frame, &mut q, &Endpoint::new(addr(!v6, a), port));
        let _ = Layers(&frame).to_string();
        let mut answer = bytes.to_vec();
        let _ = xlb_dataplane::packet::reject_with_tcp_reset(&mut answer, &p);
        let mut room = bytes.to_vec();
        room.resize(bytes.len() + 128, 0);
        let _ = xlb_dataplane::packet::reject_with_port_unreachable(&mut room, bytes.len(), &p);
        let _ =
            xlb_dataplane::packet::reject_with_port_unreachable(&mut answer, bytes.len() / 2, &p);
    }
}
