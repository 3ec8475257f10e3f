#!/usr/bin/env python3
"""Prints the frames of dataplane/tests/encap.rs, built by scapy (independent of xlb): a TCP
SYN and a UDP datagram to a VIP, and the same packets as direct server return with IP-in-IP
must deliver them to a routed backend (IPv4 in IPv4, IPv6 in IPv6), and xlb's "too big"
answers. Run with scapy installed (`pip install scapy`); the tests embed its output, so they
do not need scapy.
"""
from scapy.all import ICMP, IP, TCP, UDP, Ether, ICMPv6PacketTooBig, IPv6, raw

IN = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
OUT = Ether(src="02:00:00:00:00:03", dst="02:00:00:00:00:04")
syn = IP(src="198.18.0.1", dst="198.18.64.1", id=7, flags="DF", ttl=63, tos=0xb8) / TCP(
    sport=40000, dport=80, flags="S", seq=1000, window=64240)
print("SYN_TO_VIP", raw(IN / syn).hex())
print("SYN_IPIP", raw(OUT / IP(src="198.18.64.100", dst="198.19.1.1", id=0, flags="DF", ttl=64,
                                 tos=0xb8, proto=4) / syn).hex())
dgram6 = IPv6(src="2001:2::1", dst="2001:2:0:40::1", hlim=63, tc=0x20) / UDP(
    sport=5000, dport=53) / (b"q" * 100)
print("UDP6_TO_VIP", raw(IN / dgram6).hex())
print("UDP6_IP6IP6", raw(OUT / IPv6(src="2001:2:0:40::100", dst="2001:2:1::1", hlim=64, tc=0x20,
                                     nh=41) / dgram6).hex())
big = IP(src="198.18.0.1", dst="198.18.64.1", id=9, flags="DF", ttl=63) / UDP(
    sport=5000, dport=53) / (b"x" * 1472)
print("BIG_TO_VIP", raw(IN / big).hex())
quote = raw(big)[:28]
print("BIG_TOO_BIG", raw(Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / IP(
    src="198.18.64.1", dst="198.18.0.1", id=0, flags="DF", ttl=64) / ICMP(
    type=3, code=4, nexthopmtu=1480) / quote).hex())
big6 = IPv6(src="2001:2::1", dst="2001:2:0:40::1", hlim=63) / UDP(sport=5000, dport=53) / (
    b"x" * 1452)
print("BIG6_TO_VIP", raw(IN / big6).hex())
print("BIG6_TOO_BIG", raw(Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / IPv6(
    src="2001:2:0:40::1", dst="2001:2::1", hlim=64) / ICMPv6PacketTooBig(mtu=1460) /
    raw(big6)[:1280 - 48]).hex())
