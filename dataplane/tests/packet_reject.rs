//! Refusals built in place: the answer is addressed back to the sender from the VIP, is
//! well formed (it parses, every checksum verifies), and says what the RFCs say.

mod common;

use common::*;
use xlb_dataplane::packet::builder::pkt;
use xlb_dataplane::packet::{
    parse, reject_with_port_unreachable, reject_with_tcp_reset, Class, IpProto, Layers, TcpFlags,
};

/// The frame after `reject`, checked for well-formedness, and its decode.
fn answer(mut buf: Vec<u8>, len: usize) -> (Vec<u8>, String) {
    buf.truncate(len);
    let text = Layers(&buf).to_string();
    assert!(!text.contains("BAD"), "{text}");
    assert!(parse(&buf).is_ok(), "{text}");
    (buf, text)
}

fn seq_ack_flags(frame: &[u8]) -> (u32, u32, TcpFlags) {
    let p = parse(frame).unwrap();
    let tcp = &frame[usize::from(p.l4_offset)..];
    let word = |i: usize| u32::from_be_bytes([tcp[i], tcp[i + 1], tcp[i + 2], tcp[i + 3]]);
    (word(4), word(8), p.tcp_flags)
}

#[test]
fn a_syn_is_answered_with_a_reset_acknowledging_it() {
    let mut frame = pkt()
        .eth(CLIENT_MAC, NODE_MAC)
        .ipv4(CLIENT, VIP)
        .ipv4_options(8)
        .tcp(40000, 80)
        .syn()
        .seq(1000)
        .tcp_options(12)
        .build();
    let p = parse(&frame).unwrap();
    let len = reject_with_tcp_reset(&mut frame, &p).unwrap();
    let (out, text) = answer(frame, len);
    let q = parse(&out).unwrap();
    assert_eq!(
        q.key.to_string(),
        "tcp 198.18.64.1:80 -> 198.18.0.1:40000",
        "{text}"
    );
    assert_eq!(
        seq_ack_flags(&out),
        (0, 1001, TcpFlags::RST | TcpFlags::ACK)
    );
    assert_eq!(&out[..6], &CLIENT_MAC.0, "back to the sender's MAC");
    assert_eq!(out.len(), 14 + 20 + 20);
}

#[test]
fn a_segment_with_ack_is_answered_with_a_reset_at_its_ack_number() {
    let mut frame = pkt()
        .ipv6(CLIENT6, VIP6)
        .tcp(40000, 80)
        .ack()
        .seq(77)
        .payload(b"GET / HTTP/1.1\r\n")
        .build();
    let p = parse(&frame).unwrap();
    let len = reject_with_tcp_reset(&mut frame, &p).unwrap();
    let (out, _) = answer(frame, len);
    // The builder acknowledges 1 when ACK is set.
    assert_eq!(seq_ack_flags(&out), (1, 0, TcpFlags::RST));
    assert_eq!(out.len(), 14 + 40 + 20);
}

#[test]
fn a_udp_datagram_is_answered_with_a_port_unreachable_quoting_it() {
    let frame = pkt()
        .vlan(7)
        .ipv4(CLIENT, VIP)
        .udp(5353, 53)
        .payload(&[0xab; 100])
        .build();
    let p = parse(&frame).unwrap();
    let mut buf = frame.clone();
    buf.resize(2048, 0);
    let len = reject_with_port_unreachable(&mut buf, frame.len(), &p).unwrap();
    let (out, text) = answer(buf, len);
    let q = parse(&out).unwrap();
    assert!(matches!(q.class, Class::IcmpError(_)), "{text}");
    // The error travels back along the refused flow: its key is the original's, reversed.
    assert_eq!(q.key, p.key.reversed(), "{text}");
    assert_eq!(q.key.proto, IpProto::UDP);
    // IP header and 8 bytes quoted, behind the 18-byte tagged Ethernet header.
    assert_eq!(out.len(), 18 + 20 + 8 + 20 + 8);
    assert_eq!(&out[18 + 28..], &frame[18..18 + 28]);
}

#[test]
fn an_ipv6_datagram_is_answered_with_a_port_unreachable_within_the_minimum_mtu() {
    let frame = pkt()
        .ipv6(CLIENT6, VIP6)
        .udp(5353, 53)
        .payload(&[7; 1400])
        .build();
    let p = parse(&frame).unwrap();
    let mut buf = frame.clone();
    buf.resize(2048, 0);
    let len = reject_with_port_unreachable(&mut buf, frame.len(), &p).unwrap();
    let (out, text) = answer(buf, len);
    assert_eq!(out.len() - 14, 1280, "{text}");
    assert_eq!(parse(&out).unwrap().key, p.key.reversed());
}

#[test]
fn a_buffer_without_room_for_the_answer_is_an_error_not_a_panic() {
    let frame = pkt().ipv4(CLIENT, VIP).udp(5353, 53).build();
    let p = parse(&frame).unwrap();
    let mut tight = frame.clone();
    assert!(reject_with_port_unreachable(&mut tight, frame.len(), &p).is_err());
    let mut udp = frame.clone();
    assert!(
        reject_with_tcp_reset(&mut udp, &p).is_err(),
        "a reset answers TCP only"
    );
}
