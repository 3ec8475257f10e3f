//! Protocol numbers, field offsets and the small value types of the wire layer.
//!
//! Constants are written in hex as they appear on the wire; conversion to host order happens
//! where a field is read, with `from_be_bytes`, and nowhere else.

use core::fmt;

/// EtherType of IPv4 (RFC 894).
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of IPv6 (RFC 2464).
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// EtherType of an IEEE 802.1Q VLAN tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// EtherType of ARP, named because it is the most common frame xlb passes to the kernel.
pub const ETHERTYPE_ARP: u16 = 0x0806;

/// Length of an Ethernet II header without a VLAN tag.
pub const ETHERNET_HEADER_LEN: usize = 14;
/// Length of one 802.1Q tag.
pub const VLAN_TAG_LEN: usize = 4;
/// Length of an IPv4 header without options.
pub const IPV4_MIN_HEADER_LEN: usize = 20;
/// Length of the fixed IPv6 header.
pub const IPV6_HEADER_LEN: usize = 40;
/// Length of a TCP header without options.
pub const TCP_MIN_HEADER_LEN: usize = 20;
/// Length of a UDP header.
pub const UDP_HEADER_LEN: usize = 8;
/// Length of the SCTP common header (ports, verification tag, checksum).
pub(super) const SCTP_HEADER_LEN: usize = 12;
/// Length of the ICMP and ICMPv6 header (type, code, checksum, four bytes of rest-of-header).
pub const ICMP_HEADER_LEN: usize = 8;

/// An IP protocol number (IPv4 protocol field, IPv6 next header).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct IpProto(pub u8);

impl IpProto {
    /// IPv6 hop-by-hop options extension header.
    pub const HOP_BY_HOP: Self = Self(0x00);
    /// ICMP for IPv4 (RFC 792).
    pub const ICMP: Self = Self(0x01);
    /// TCP.
    pub const TCP: Self = Self(0x06);
    /// UDP.
    pub const UDP: Self = Self(0x11);
    /// IPv6 routing extension header.
    pub const ROUTING: Self = Self(0x2b);
    /// IPv6 fragment extension header.
    pub const FRAGMENT: Self = Self(0x2c);
    /// ICMPv6 (RFC 4443).
    pub const ICMPV6: Self = Self(0x3a);
    /// IPv6 "no next header".
    pub const NO_NEXT_HEADER: Self = Self(0x3b);
    /// IPv6 destination options extension header.
    pub const DESTINATION_OPTIONS: Self = Self(0x3c);
    /// SCTP (RFC 9260): ports like TCP and UDP, a CRC32c checksum without pseudo-header.
    pub const SCTP: Self = Self(0x84);
}

impl fmt::Debug for IpProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::ICMP => f.write_str("icmp"),
            Self::TCP => f.write_str("tcp"),
            Self::UDP => f.write_str("udp"),
            Self::ICMPV6 => f.write_str("icmpv6"),
            Self::SCTP => f.write_str("sctp"),
            Self(other) => write!(f, "proto-{other}"),
        }
    }
}

impl fmt::Display for IpProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The IP version of a packet or flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[repr(u8)]
pub enum Family {
    /// IPv4.
    #[default]
    Ipv4 = 4,
    /// IPv6.
    Ipv6 = 6,
}

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

/// A MAC address that is not six colon-separated hex bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadMacAddr;

impl fmt::Display for BadMacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a MAC address (like 02:00:00:00:00:01)")
    }
}

impl std::error::Error for BadMacAddr {}

impl core::str::FromStr for MacAddr {
    type Err = BadMacAddr;

    /// Parses `02:00:00:00:00:01` (surrounding whitespace ignored).
    fn from_str(text: &str) -> Result<Self, BadMacAddr> {
        let mut mac = [0u8; 6];
        let mut parts = text.trim().split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or(BadMacAddr)?;
            if part.is_empty() || part.len() > 2 {
                return Err(BadMacAddr);
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| BadMacAddr)?;
        }
        if parts.next().is_some() {
            return Err(BadMacAddr);
        }
        Ok(Self(mac))
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The flags byte of a TCP header (RFC 9293 section 3.1, with ECE and CWR of RFC 3168).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    /// No more data from sender.
    pub const FIN: Self = Self(0x01);
    /// Synchronise sequence numbers.
    pub const SYN: Self = Self(0x02);
    /// Reset the connection.
    pub const RST: Self = Self(0x04);
    /// Push function.
    pub const PSH: Self = Self(0x08);
    /// Acknowledgment field is significant.
    pub const ACK: Self = Self(0x10);
    /// Urgent pointer field is significant.
    pub const URG: Self = Self(0x20);
    /// ECN echo.
    pub const ECE: Self = Self(0x40);
    /// Congestion window reduced.
    pub const CWR: Self = Self(0x80);

    /// Whether every flag of `other` is set in `self`.
    #[must_use]
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether any flag of `other` is set in `self`.
    #[must_use]
    pub const fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }
}

impl core::ops::BitOr for TcpFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl fmt::Debug for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];
        let mut first = true;
        for (bit, name) in NAMES.iter().enumerate() {
            if self.0 & (1 << bit) != 0 {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("-")?;
        }
        Ok(())
    }
}

impl fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Reads a big-endian u16 at `off`, or `None` past the end of `buf`.
#[inline]
pub(crate) fn be16(buf: &[u8], off: usize) -> Option<u16> {
    let bytes = buf.get(off..)?.first_chunk::<2>()?;
    Some(u16::from_be_bytes(*bytes))
}

#[cfg(test)]
mod mac_tests {
    use super::*;

    #[test]
    fn mac_addresses_parse_and_malformed_ones_are_refused() {
        assert_eq!(
            " 02:00:0a:ff:00:01\n".parse(),
            Ok(MacAddr([2, 0, 0x0a, 0xff, 0, 1]))
        );
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "02:00:00:00:00:1g",
            "002:0:0:0:0:1",
            "02::00:00:00:01",
        ] {
            assert_eq!(bad.parse::<MacAddr>(), Err(BadMacAddr), "{bad:?}");
        }
    }
}
