//! SCTP through the parser and the rewrite primitives (this kernel has no SCTP stack, so
//! frames are generated): ports read like TCP's and UDP's, the CRC32c (RFC 9260 section 6.8,
//! no pseudo-header) untouched by an address change and recomputed for a port change, an
//! incoming error kept as the same error, and frames that an independent implementation
//! (scapy 2.6, `deploy/acceptance/sctp_fixtures.py`) built and rewrote compared byte for byte.

mod common;

use common::*;
use xlb_dataplane::packet::builder::pkt;
use xlb_dataplane::packet::{
    parse, set_destination, set_source, Class, DropReason, Endpoint, IpProto, RewriteError,
};

/// scapy: an SCTP INIT from 198.18.0.1:40000 to the VIP 198.18.64.1:80.
const INIT_TO_VIP: &str = "020000000002020000000001080045000034000100004084ae1ec6120001c61240019c40005000000000aef3b9dd01000014010203040000ffff000a000a00000001";
/// scapy: the same INIT sent to the backend 198.18.128.1:8080 (what DNAT must produce).
const INIT_TO_BACKEND: &str = "0200000000020200000000010800450000340001000040846e1ec6120001c61280019c401f9000000000effd943f01000014010203040000ffff000a000a00000001";
/// scapy: an SCTP DATA chunk ("hello", padded) from [2001:2::1]:40000 to [2001:2:0:40::1]:80.
const DATA_V6: &str = "02000000000202000000000186dd600000000024844020010002000000000000000000000001200100020000004000000000000000019c4000500a0b0c0dcceffae90000001500000007000000000000000068656c6c6f000000";

/// The SCTP packet of a frame (no VLAN tag, no IP options or extension headers).
fn sctp_part(frame: &[u8]) -> &[u8] {
    let l4 = usize::from(parse(frame).unwrap().l4_offset);
    &frame[l4..]
}

#[test]
fn an_independently_built_init_parses_with_its_ports_and_a_valid_checksum() {
    let frame = hex(INIT_TO_VIP);
    let p = parse(&frame).unwrap();
    assert_eq!(p.class, Class::Ordinary);
    assert_eq!(p.key.proto, IpProto::SCTP);
    assert_eq!((p.key.src_port, p.key.dst_port), (40000, 80));
    assert!(sctp_crc_is_valid(sctp_part(&frame)));
    assert!(sctp_crc_is_valid(sctp_part(&hex(DATA_V6))));
}

#[test]
fn the_builder_writes_the_checksum_scapy_writes() {
    let ours = pkt()
        .ipv6(CLIENT6, VIP6)
        .sctp(40000, 80, 0x0a0b_0c0d)
        .payload(&hex("0000001500000007000000000000000068656c6c6f000000"))
        .build();
    assert_eq!(sctp_part(&ours), sctp_part(&hex(DATA_V6)));
}

#[test]
fn dnat_of_an_init_is_byte_for_byte_what_scapy_builds_for_the_backend() {
    let mut frame = hex(INIT_TO_VIP);
    let mut p = parse(&frame).unwrap();
    set_destination(
        &mut frame,
        &mut p,
        &Endpoint::new([198, 18, 128, 1].into(), 8080),
    )
    .unwrap();
    assert_eq!(
        frame,
        hex(INIT_TO_BACKEND),
        "{}",
        layer_diff(&hex(INIT_TO_BACKEND), &frame)
    );
    assert_eq!(
        p,
        parse(&frame).unwrap(),
        "the parse describes the new frame"
    );
}

#[test]
fn an_address_change_alone_leaves_the_checksum_as_it_was() {
    let mut frame = hex(DATA_V6);
    let before: [u8; 4] = sctp_part(&frame)[8..12].try_into().unwrap();
    let mut p = parse(&frame).unwrap();
    set_destination(&mut frame, &mut p, &Endpoint::new(BACKEND6.into(), 80)).unwrap();
    assert_eq!(sctp_part(&frame)[8..12], before);
    assert!(sctp_crc_is_valid(sctp_part(&frame)));
    assert_eq!(p.key.dst_ip(), std::net::IpAddr::from(BACKEND6));
}

#[test]
fn snat_of_a_reply_over_ipv6_keeps_the_checksum_valid() {
    let mut frame = pkt()
        .ipv6(BACKEND6, CLIENT6)
        .sctp(8080, 40000, 7)
        .payload(&[3, 0, 0, 4, 0, 0, 0, 0x10]) // a SACK-sized chunk
        .build();
    let mut p = parse(&frame).unwrap();
    set_source(&mut frame, &mut p, &Endpoint::new(VIP6.into(), 80)).unwrap();
    assert!(sctp_crc_is_valid(sctp_part(&frame)));
    let again = parse(&frame).unwrap();
    assert_eq!((again.key.src_ip(), again.key.src_port), (VIP6.into(), 80));
}

#[test]
fn a_corrupted_packet_stays_corrupted_by_the_same_error_after_a_port_change() {
    let mut frame = hex(DATA_V6);
    let last = frame.len() - 4; // a byte of "hello"
    frame[last] ^= 0x20;
    assert!(!sctp_crc_is_valid(sctp_part(&frame)));
    let mut p = parse(&frame).unwrap();
    set_destination(&mut frame, &mut p, &Endpoint::new(BACKEND6.into(), 8080)).unwrap();
    assert!(
        !sctp_crc_is_valid(sctp_part(&frame)),
        "the receiver still sees it"
    );
    frame[last] ^= 0x20;
    assert!(
        sctp_crc_is_valid(sctp_part(&frame)),
        "and the error is exactly the one that came in"
    );
}

#[test]
fn a_first_fragment_whose_port_would_change_is_refused_unchanged() {
    let mut frame = pkt()
        .ipv4(CLIENT, VIP)
        .fragment(9, 0, true)
        .sctp(40000, 80, 0)
        .payload(&[0; 64])
        .build();
    let original = frame.clone();
    let mut p = parse(&frame).unwrap();
    assert!(matches!(p.class, Class::Fragment(f) if f.first));
    assert_eq!(
        set_destination(&mut frame, &mut p, &Endpoint::new(BACKEND.into(), 8080)),
        Err(RewriteError::SctpFragmentPort)
    );
    assert_eq!(frame, original);
    // Same port: only the address changes, which the checksum does not cover.
    set_destination(&mut frame, &mut p, &Endpoint::new(BACKEND.into(), 80)).unwrap();
}

#[test]
fn a_truncated_common_header_is_dropped_with_its_reason() {
    let frame = pkt().ipv4(CLIENT, VIP).sctp(40000, 80, 0).build();
    let short = pkt()
        .ipv4(CLIENT, VIP)
        .proto(IpProto::SCTP)
        .payload(&frame[34..34 + 11])
        .build();
    assert_eq!(parse(&short), Err(DropReason::SctpTruncated));
}

#[test]
fn an_icmp_error_quoting_sctp_follows_its_flow_and_leaves_the_quoted_checksum() {
    // The backend's port unreachable about a forwarded INIT: quoted 198.18.0.1:40000 ->
    // 198.18.128.1:8080; its flow runs backend -> client.
    let quoted = hex(INIT_TO_BACKEND)[14..].to_vec();
    let mut frame = pkt()
        .ipv4([198, 18, 128, 1].into(), CLIENT)
        .icmp(3, 3, [0; 4])
        .payload(&quoted)
        .build();
    let mut p = parse(&frame).unwrap();
    assert!(matches!(p.class, Class::IcmpError(_)));
    assert_eq!(p.key.proto, IpProto::SCTP);
    assert_eq!((p.key.src_port, p.key.dst_port), (8080, 40000));
    set_source(&mut frame, &mut p, &Endpoint::new(VIP.into(), 80)).unwrap();
    // The quote now reads as the client's packet to the VIP; its CRC is left as quoted.
    let quote = &frame[14 + 20 + 8..];
    assert_eq!(&quote[16..20], &VIP.octets());
    assert_eq!(&quote[22..24], &80u16.to_be_bytes());
    assert_eq!(quote[28..32], hex(INIT_TO_BACKEND)[14 + 28..14 + 32]);
}

#[test]
fn the_frame_description_names_sctp_and_verifies_its_crc() {
    use xlb_dataplane::packet::Layers;
    let mut frame = hex(DATA_V6);
    let text = Layers(&frame).to_string();
    assert!(text.contains("sctp  40000 > 80 tag 0x0a0b0c0d"), "{text}");
    assert!(text.contains(" ok"), "{text}");
    let last = frame.len() - 1;
    frame[last] ^= 1;
    assert!(Layers(&frame).to_string().contains("BAD"));
}
