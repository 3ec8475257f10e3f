#!/usr/bin/env python3
"""Prints the SCTP frames of dataplane/tests/sctp.rs, built by scapy (an implementation of SCTP
independent of xlb's): an INIT to the VIP, the same INIT as DNAT must deliver it to the
backend, and an IPv6 DATA chunk. Run with scapy installed (`pip install scapy`); the tests
embed its output, so they do not need scapy.
"""
from scapy.all import IP, SCTP, Ether, IPv6, SCTPChunkData, SCTPChunkInit, raw

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def init(dst, dport):
    return ETH / IP(src="198.18.0.1", dst=dst, id=1, flags=0, ttl=64) / SCTP(
        sport=40000, dport=dport, tag=0
    ) / SCTPChunkInit(init_tag=0x01020304, a_rwnd=65535, n_out_streams=10,
                      n_in_streams=10, init_tsn=1)


print("INIT_TO_VIP", raw(init("198.18.64.1", 80)).hex())
print("INIT_TO_BACKEND", raw(init("198.18.128.1", 8080)).hex())
data = ETH / IPv6(src="2001:2::1", dst="2001:2:0:40::1", hlim=64) / SCTP(
    sport=40000, dport=80, tag=0x0A0B0C0D
) / SCTPChunkData(tsn=7, stream_id=0, stream_seq=0, proto_id=0, data=b"hello")
print("DATA_V6", raw(data).hex())
