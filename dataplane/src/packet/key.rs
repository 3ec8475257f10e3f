//! The flow key: what identifies a connection for the flow table and the Maglev hash.

use core::fmt;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::wire::{Family, IpProto};

/// The five-tuple of a packet, in the direction the packet travels.
///
/// Addresses are stored as 16 bytes for both families (an IPv4 address fills the first four,
/// the rest stay zero) so that the key has one layout, one size (38 bytes) and one hash
/// routine. Ports are in host order. For ICMP echo request and reply, the echo identifier plays
/// both ports, so that a request and its reply have mirrored keys like any other flow. For an
/// ICMP error, the key is that of the embedded packet with source and destination swapped: the
/// key of the flow the error travels along (see [`super::Class::IcmpError`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(C, align(8))]
pub struct FlowKey {
    /// Source address (IPv4 in the first four bytes).
    pub src_addr: [u8; 16],
    /// Destination address (IPv4 in the first four bytes).
    pub dst_addr: [u8; 16],
    /// Source port, or the ICMP echo identifier.
    pub src_port: u16,
    /// Destination port, or the ICMP echo identifier.
    pub dst_port: u16,
    /// Transport protocol.
    pub proto: IpProto,
    /// Address family.
    pub family: Family,
    /// Always zero. Makes every byte of the key a field, so the key is copied and compared
    /// as five aligned words; without it, copies ended in an overlapping unaligned load that
    /// stalled on the narrow stores of the ports (measured with perf on `make bench`).
    reserved: u16,
}

impl FlowKey {
    /// The source address as a standard address.
    #[must_use]
    pub fn src_ip(&self) -> IpAddr {
        to_ip(self.family, &self.src_addr)
    }

    /// The destination address as a standard address.
    #[must_use]
    pub fn dst_ip(&self) -> IpAddr {
        to_ip(self.family, &self.dst_addr)
    }

    /// Whether the source address is one no host may send from (RFC 1812 section 5.3.7,
    /// RFC 4291 section 2.5): unspecified, loopback, multicast, the IPv4 limited broadcast or
    /// reserved block (240.0.0.0/4, which Linux also refuses), or an IPv4-mapped IPv6 address.
    #[must_use]
    pub fn martian_source(&self) -> bool {
        let a = &self.src_addr;
        match self.family {
            // 0.0.0.0/8, 127.0.0.0/8, 224.0.0.0/4 and 240.0.0.0/4 (broadcast included).
            Family::Ipv4 => a[0] == 0 || a[0] == 127 || a[0] >= 224,
            Family::Ipv6 => {
                let v = u128::from_be_bytes(*a);
                v <= 1 || a[0] == 0xff || v >> 32 == 0xffff
            }
        }
    }

    /// The key of the opposite direction of the same flow.
    #[must_use]
    pub fn reversed(&self) -> Self {
        Self {
            src_addr: self.dst_addr,
            dst_addr: self.src_addr,
            src_port: self.dst_port,
            dst_port: self.src_port,
            proto: self.proto,
            family: self.family,
            reserved: 0,
        }
    }

    /// A key from its parts.
    #[must_use]
    pub const fn new(
        family: Family,
        proto: IpProto,
        src: ([u8; 16], u16),
        dst: ([u8; 16], u16),
    ) -> Self {
        Self {
            src_addr: src.0,
            dst_addr: dst.0,
            src_port: src.1,
            dst_port: dst.1,
            proto,
            family,
            reserved: 0,
        }
    }
}

impl fmt::Debug for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} -> {}",
            self.proto,
            SocketFmt(self.src_ip(), self.src_port),
            SocketFmt(self.dst_ip(), self.dst_port)
        )
    }
}

impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// An address and port to rewrite a packet to, kept in the flow key's form so that the
/// rewrite copies it without conversion (and a snapshot can store backends this way).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(C, align(8))]
pub struct Endpoint {
    addr: [u8; 16],
    port: u16,
    family: Family,
}

impl Endpoint {
    /// An endpoint from an address and a port.
    #[must_use]
    pub fn new(addr: IpAddr, port: u16) -> Self {
        let family = match addr {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        };
        Self {
            addr: key_addr(addr),
            port,
            family,
        }
    }

    /// An endpoint from a flow key's address form (IPv4 in the first four bytes, the rest
    /// zero, as [`FlowKey`] holds it).
    #[must_use]
    pub const fn from_key_form(family: Family, addr: [u8; 16], port: u16) -> Self {
        Self { addr, port, family }
    }

    /// The address in the flow key's 16-byte form.
    #[must_use]
    pub const fn key_addr(&self) -> &[u8; 16] {
        &self.addr
    }

    /// The address.
    #[must_use]
    pub fn ip(&self) -> IpAddr {
        to_ip(self.family, &self.addr)
    }

    /// The port (or ICMP echo identifier).
    #[must_use]
    pub const fn port(&self) -> u16 {
        self.port
    }

    /// The address family.
    #[must_use]
    pub const fn family(&self) -> Family {
        self.family
    }
}

impl From<core::net::SocketAddr> for Endpoint {
    fn from(s: core::net::SocketAddr) -> Self {
        Self::new(s.ip(), s.port())
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", SocketFmt(self.ip(), self.port))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Formats an address and port the way `SocketAddr` does, without building one.
struct SocketFmt(IpAddr, u16);

impl fmt::Display for SocketFmt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.1),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.1),
        }
    }
}

/// Stores an address in the key's 16-byte form.
#[must_use]
pub fn key_addr(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => {
            let mut out = [0; 16];
            out[..4].copy_from_slice(&a.octets());
            out
        }
        IpAddr::V6(a) => a.octets(),
    }
}

fn to_ip(family: Family, bytes: &[u8; 16]) -> IpAddr {
    match family {
        Family::Ipv4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        Family::Ipv6 => IpAddr::V6(Ipv6Addr::from(*bytes)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_key_is_compact() {
        assert_eq!(core::mem::size_of::<FlowKey>(), 40);
    }

    #[test]
    fn martian_sources_are_told_from_host_addresses() {
        let src = |a: &str| {
            let ip: IpAddr = a.parse().unwrap();
            let family = if ip.is_ipv4() {
                Family::Ipv4
            } else {
                Family::Ipv6
            };
            FlowKey::new(family, IpProto::TCP, (key_addr(ip), 1), ([0; 16], 2))
        };
        for martian in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "ff02::1",
            "::ffff:198.18.0.1",
        ] {
            assert!(src(martian).martian_source(), "{martian}");
        }
        for host in [
            "198.18.0.1",
            "10.0.0.1",
            "223.255.255.254",
            "2001:2::1",
            "fe80::1",
            "::2",
        ] {
            assert!(!src(host).martian_source(), "{host}");
        }
    }

    #[test]
    fn reversing_twice_gives_the_same_key() {
        let key = FlowKey::new(
            Family::Ipv4,
            IpProto::TCP,
            (key_addr("198.18.0.1".parse().unwrap()), 40000),
            (key_addr("198.18.64.1".parse().unwrap()), 80),
        );
        assert_eq!(key.reversed().reversed(), key);
        assert_eq!(format!("{key}"), "tcp 198.18.0.1:40000 -> 198.18.64.1:80");
    }
}
