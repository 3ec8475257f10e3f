//! xlb's benchmarks: criterion benches of every hot-path stage (`benches/`), and what they
//! share.
//!
//! Layer: on top of everything; nothing depends on it.
//!
//! [`etherparse_key`] is the contender the hand-written parser was measured against: the
//! same flow key, extracted with etherparse's header walk.

use std::net::IpAddr;

use xlb_dataplane::packet::builder::pkt;
use xlb_dataplane::packet::{key_addr, Endpoint, Family, FlowKey, IpProto};

/// The frame kinds every packet benchmark covers.
pub const KINDS: [&str; 4] = ["tcp4", "udp4", "tcp6", "udp6"];

/// Frames per batch, as a worker receives them.
pub const BATCH: usize = 64;

/// A batch of minimum-size frames of one kind (see [`KINDS`]) from a client to a VIP, with
/// distinct source ports: 64 bytes, or the 74-byte minimum of IPv6 TCP.
#[must_use]
pub fn frames(kind: &str) -> Vec<Vec<u8>> {
    let (c4, v4) = ([198, 18, 0, 1].into(), [198, 18, 64, 1].into());
    let c6 = "2001:2::1"
        .parse()
        .unwrap_or(core::net::Ipv6Addr::LOCALHOST);
    let v6 = "2001:2::40:1"
        .parse()
        .unwrap_or(core::net::Ipv6Addr::LOCALHOST);
    (0..BATCH)
        .map(|i| {
            let sport = 40000 + u16::try_from(i).unwrap_or(0);
            let b = match kind {
                "tcp4" => pkt().ipv4(c4, v4).tcp(sport, 80).ack(),
                "udp4" => pkt().ipv4(c4, v4).udp(sport, 53),
                "tcp6" => pkt().ipv6(c6, v6).tcp(sport, 80).ack(),
                _ => pkt().ipv6(c6, v6).udp(sport, 53),
            };
            b.pad_to(64).build()
        })
        .collect()
}

/// Two backends (port 8080) of the kind's family, to DNAT to in turn.
#[must_use]
pub fn backends(kind: &str) -> [Endpoint; 2] {
    let addrs: [IpAddr; 2] = if kind.ends_with('4') {
        [[198, 18, 128, 2].into(), [198, 18, 128, 3].into()]
    } else {
        [
            core::net::Ipv6Addr::new(0x2001, 2, 0, 0x80, 0, 0, 0, 2).into(),
            core::net::Ipv6Addr::new(0x2001, 2, 0, 0x80, 0, 0, 0, 3).into(),
        ]
    };
    addrs.map(|a| Endpoint::new(a, 8080))
}

/// The flow key of a TCP or UDP frame, walked with etherparse's `SlicedPacket`; `None` for
/// anything else or anything etherparse rejects.
#[must_use]
pub fn etherparse_key(frame: &[u8]) -> Option<FlowKey> {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let sliced = SlicedPacket::from_ethernet(frame).ok()?;
    let (family, src, dst) = match sliced.net? {
        NetSlice::Ipv4(ip) => {
            let h = ip.header();
            let src = key_addr(h.source_addr().into());
            (Family::Ipv4, src, key_addr(h.destination_addr().into()))
        }
        NetSlice::Ipv6(ip) => {
            let h = ip.header();
            (Family::Ipv6, h.source(), h.destination())
        }
        _ => return None,
    };
    let (proto, src_port, dst_port) = match sliced.transport? {
        TransportSlice::Tcp(tcp) => (IpProto::TCP, tcp.source_port(), tcp.destination_port()),
        TransportSlice::Udp(udp) => (IpProto::UDP, udp.source_port(), udp.destination_port()),
        _ => return None,
    };
    let key = FlowKey::new(family, proto, (src, src_port), (dst, dst_port));
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use xlb_dataplane::packet::parse;

    #[test]
    fn etherparse_and_xlb_agree_on_the_benchmark_frames() {
        let frames = [
            pkt()
                .ipv4([198, 18, 0, 1].into(), [198, 18, 64, 1].into())
                .tcp(40000, 80)
                .syn()
                .pad_to(60),
            pkt()
                .ipv4([198, 18, 0, 1].into(), [198, 18, 64, 1].into())
                .udp(40000, 53)
                .pad_to(60),
            pkt()
                .ipv6(
                    "2001:2::1".parse().unwrap(),
                    "2001:2::40:1".parse().unwrap(),
                )
                .tcp(40000, 80),
            pkt()
                .ipv6(
                    "2001:2::1".parse().unwrap(),
                    "2001:2::40:1".parse().unwrap(),
                )
                .udp(40000, 53),
        ];
        for f in frames {
            let frame = f.build();
            assert_eq!(etherparse_key(&frame), Some(parse(&frame).unwrap().key));
        }
    }
}

/// This process's memory, in bytes (0 where /proc cannot tell).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// Resident now (VmRSS).
    pub resident: u64,
    /// The most ever resident (VmHWM).
    pub peak: u64,
}

/// This process's resident memory now and at its peak, from /proc/self/status.
#[must_use]
pub fn memory() -> Memory {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    Memory {
        resident: field("VmRSS:"),
        peak: field("VmHWM:"),
    }
}
