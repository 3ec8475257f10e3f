//! A readable packet builder for fixtures, property tests, benchmarks and the demo.
//!
//! `pkt().ipv4(C, VIP).tcp(40000, 80).syn().build()` gives a whole Ethernet frame with every
//! length and checksum computed from scratch, so a frame the rewrite primitives produced can be
//! compared byte for byte with one built directly. Overrides (`ihl`, `total_len`, `udp_len`,
//! `truncate`, ...) produce the malformed frames the parser must reject.
//!
//! Compiled only with the `test-util` feature (and in this crate's tests): it allocates.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::checksum::{add_bytes, checksum, fold, pseudo_header_v4, pseudo_header_v6};
use super::wire::{IpProto, MacAddr, TcpFlags, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN};

/// Starts a frame: Ethernet from 02:00:00:00:00:01 to 02:00:00:00:00:02, no IP yet.
#[must_use]
pub fn pkt() -> PacketBuilder {
    PacketBuilder::default()
}

/// How the transport checksum is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum L4Checksum {
    /// The correct checksum.
    #[default]
    Valid,
    /// Only the folded pseudo-header sum, as a sender with transmit offload leaves it.
    PseudoHeaderOnly,
    /// This exact value.
    Raw(u16),
}

#[derive(Clone, Debug)]
enum Transport {
    None(IpProto),
    Tcp {
        src: u16,
        dst: u16,
        flags: TcpFlags,
        seq: u32,
        options: usize,
        data_offset: Option<u8>,
    },
    Udp {
        src: u16,
        dst: u16,
        len: Option<u16>,
    },
    Icmp {
        ty: u8,
        code: u8,
        rest: [u8; 4],
    },
    Sctp {
        src: u16,
        dst: u16,
        tag: u32,
    },
}

/// A frame under construction. Every setter returns the builder.
#[derive(Clone, Debug)]
pub struct PacketBuilder {
    eth_src: MacAddr,
    eth_dst: MacAddr,
    vlan: Option<u16>,
    ethertype: Option<u16>,
    src: IpAddr,
    dst: IpAddr,
    has_ip: bool,
    ttl: u8,
    ip_id: u32,
    dont_fragment: bool,
    fragment: Option<(u16, bool)>,
    ipv4_options: usize,
    ihl: Option<u8>,
    version: Option<u8>,
    total_len: Option<u16>,
    bad_ip_checksum: bool,
    extensions: Vec<(IpProto, Vec<u8>)>,
    transport: Transport,
    l4_checksum: L4Checksum,
    payload: Vec<u8>,
    truncate: Option<usize>,
    pad_to: Option<usize>,
}

impl Default for PacketBuilder {
    fn default() -> Self {
        Self {
            eth_src: MacAddr([2, 0, 0, 0, 0, 1]),
            eth_dst: MacAddr([2, 0, 0, 0, 0, 2]),
            vlan: None,
            ethertype: None,
            src: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            has_ip: false,
            ttl: 64,
            ip_id: 0x1234,
            dont_fragment: false,
            fragment: None,
            ipv4_options: 0,
            ihl: None,
            version: None,
            total_len: None,
            bad_ip_checksum: false,
            extensions: Vec::new(),
            transport: Transport::None(IpProto::NO_NEXT_HEADER),
            l4_checksum: L4Checksum::Valid,
            payload: Vec::new(),
            truncate: None,
            pad_to: None,
        }
    }
}

impl PacketBuilder {
    /// Sets the Ethernet source and destination.
    #[must_use]
    pub fn eth(mut self, src: MacAddr, dst: MacAddr) -> Self {
        self.eth_src = src;
        self.eth_dst = dst;
        self
    }

    /// Adds one 802.1Q tag with this VLAN id.
    #[must_use]
    pub fn vlan(mut self, id: u16) -> Self {
        self.vlan = Some(id);
        self
    }

    /// A frame with this EtherType and the payload as its body (no IP header).
    #[must_use]
    pub fn ethertype(mut self, ethertype: u16) -> Self {
        self.ethertype = Some(ethertype);
        self
    }

    /// An IPv4 header from `src` to `dst`.
    #[must_use]
    pub fn ipv4(self, src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        self.ip(IpAddr::V4(src), IpAddr::V4(dst))
    }

    /// An IPv6 header from `src` to `dst`.
    #[must_use]
    pub fn ipv6(self, src: Ipv6Addr, dst: Ipv6Addr) -> Self {
        self.ip(IpAddr::V6(src), IpAddr::V6(dst))
    }

    /// An IP header of the addresses' family (both must be of one family).
    #[must_use]
    pub fn ip(mut self, src: IpAddr, dst: IpAddr) -> Self {
        self.src = src;
        self.dst = dst;
        self.has_ip = true;
        self
    }

    /// Sets the TTL or hop limit.
    #[must_use]
    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets the IPv4 "don't fragment" flag.
    #[must_use]
    pub fn dont_fragment(mut self) -> Self {
        self.dont_fragment = true;
        self
    }

    /// Makes the packet a fragment at `offset` bytes (a multiple of 8) with this identifier;
    /// for IPv6 a fragment header is appended to the extension headers.
    #[must_use]
    pub fn fragment(mut self, id: u32, offset: u16, more: bool) -> Self {
        self.ip_id = id;
        self.fragment = Some((offset, more));
        self
    }

    /// Adds this many bytes of IPv4 options (no-ops; a multiple of 4).
    #[must_use]
    pub fn ipv4_options(mut self, len: usize) -> Self {
        self.ipv4_options = len;
        self
    }

    /// Overrides the IPv4 IHL field.
    #[must_use]
    pub fn ihl(mut self, ihl: u8) -> Self {
        self.ihl = Some(ihl);
        self
    }

    /// Overrides the IP version field.
    #[must_use]
    pub fn version(mut self, version: u8) -> Self {
        self.version = Some(version);
        self
    }

    /// Overrides the IPv4 total length or the IPv6 payload length.
    #[must_use]
    pub fn total_len(mut self, len: u16) -> Self {
        self.total_len = Some(len);
        self
    }

    /// Writes a wrong IPv4 header checksum.
    #[must_use]
    pub fn bad_ip_checksum(mut self) -> Self {
        self.bad_ip_checksum = true;
        self
    }

    /// Appends an IPv6 extension header of this type whose body (after next-header and length)
    /// is `body` zero bytes; `body + 2` is rounded up to a multiple of 8. A routing header gets
    /// segments left zero; see [`Self::routing_segments_left`].
    #[must_use]
    pub fn ipv6_ext(mut self, kind: IpProto, body: usize) -> Self {
        let len = (body + 2).div_ceil(8) * 8;
        self.extensions.push((kind, vec![0; len - 2]));
        self
    }

    /// Sets "segments left" of the last routing header added.
    #[must_use]
    pub fn routing_segments_left(mut self, left: u8) -> Self {
        if let Some((_, body)) = self
            .extensions
            .iter_mut()
            .rev()
            .find(|(k, _)| *k == IpProto::ROUTING)
        {
            body[1] = left;
        }
        self
    }

    /// A TCP header with no flags; add them with [`Self::syn`], [`Self::ack`], ...
    #[must_use]
    pub fn tcp(mut self, src: u16, dst: u16) -> Self {
        self.transport = Transport::Tcp {
            src,
            dst,
            flags: TcpFlags::default(),
            seq: 1,
            options: 0,
            data_offset: None,
        };
        self
    }

    /// Adds TCP flags.
    #[must_use]
    pub fn flags(mut self, add: TcpFlags) -> Self {
        if let Transport::Tcp { flags, .. } = &mut self.transport {
            *flags = *flags | add;
        }
        self
    }

    /// Adds SYN.
    #[must_use]
    pub fn syn(self) -> Self {
        self.flags(TcpFlags::SYN)
    }

    /// Adds ACK.
    #[must_use]
    pub fn ack(self) -> Self {
        self.flags(TcpFlags::ACK)
    }

    /// Adds FIN.
    #[must_use]
    pub fn fin(self) -> Self {
        self.flags(TcpFlags::FIN)
    }

    /// Adds RST.
    #[must_use]
    pub fn rst(self) -> Self {
        self.flags(TcpFlags::RST)
    }

    /// Sets the TCP sequence number.
    #[must_use]
    pub fn seq(mut self, value: u32) -> Self {
        if let Transport::Tcp { seq, .. } = &mut self.transport {
            *seq = value;
        }
        self
    }

    /// Adds this many bytes of TCP options (no-ops; a multiple of 4).
    #[must_use]
    pub fn tcp_options(mut self, len: usize) -> Self {
        if let Transport::Tcp { options, .. } = &mut self.transport {
            *options = len;
        }
        self
    }

    /// Overrides the TCP data offset field (in 32-bit words).
    #[must_use]
    pub fn data_offset(mut self, words: u8) -> Self {
        if let Transport::Tcp { data_offset, .. } = &mut self.transport {
            *data_offset = Some(words);
        }
        self
    }

    /// A UDP header.
    #[must_use]
    pub fn udp(mut self, src: u16, dst: u16) -> Self {
        self.transport = Transport::Udp {
            src,
            dst,
            len: None,
        };
        self
    }

    /// Overrides the UDP length field.
    #[must_use]
    pub fn udp_len(mut self, value: u16) -> Self {
        if let Transport::Udp { len, .. } = &mut self.transport {
            *len = Some(value);
        }
        self
    }

    /// An SCTP common header with this verification tag; give the chunks as the payload.
    #[must_use]
    pub fn sctp(mut self, src: u16, dst: u16, tag: u32) -> Self {
        self.transport = Transport::Sctp { src, dst, tag };
        self
    }

    /// An ICMP (or ICMPv6, by family) echo request.
    #[must_use]
    pub fn echo_request(self, id: u16, seq: u16) -> Self {
        let ty = if self.src.is_ipv6() { 128 } else { 8 };
        self.icmp(ty, 0, echo_rest(id, seq))
    }

    /// An ICMP (or ICMPv6, by family) echo reply.
    #[must_use]
    pub fn echo_reply(self, id: u16, seq: u16) -> Self {
        let ty = if self.src.is_ipv6() { 129 } else { 0 };
        self.icmp(ty, 0, echo_rest(id, seq))
    }

    /// Any ICMP (or ICMPv6, by family) message: type, code and the four rest-of-header bytes.
    /// For an error, give the quoted packet ([`Self::ip_packet`] of another builder, cut to
    /// size) as the payload.
    #[must_use]
    pub fn icmp(mut self, ty: u8, code: u8, rest: [u8; 4]) -> Self {
        self.transport = Transport::Icmp { ty, code, rest };
        self
    }

    /// An IP payload of this protocol with no transport header of ours.
    #[must_use]
    pub fn proto(mut self, proto: IpProto) -> Self {
        self.transport = Transport::None(proto);
        self
    }

    /// Sets the payload after the transport header.
    #[must_use]
    pub fn payload(mut self, bytes: &[u8]) -> Self {
        self.payload = bytes.to_vec();
        self
    }

    /// Sets how the transport checksum is written.
    #[must_use]
    pub fn l4_checksum(mut self, how: L4Checksum) -> Self {
        self.l4_checksum = how;
        self
    }

    /// Cuts the finished frame to `len` bytes.
    #[must_use]
    pub fn truncate(mut self, len: usize) -> Self {
        self.truncate = Some(len);
        self
    }

    /// Pads the finished frame with zeros to `len` bytes (Ethernet padding).
    #[must_use]
    pub fn pad_to(mut self, len: usize) -> Self {
        self.pad_to = Some(len);
        self
    }

    /// The whole Ethernet frame.
    #[must_use]
    pub fn build(&self) -> Vec<u8> {
        let mut frame = Vec::with_capacity(128);
        frame.extend_from_slice(&self.eth_dst.0);
        frame.extend_from_slice(&self.eth_src.0);
        if let Some(id) = self.vlan {
            frame.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
            frame.extend_from_slice(&id.to_be_bytes());
        }
        let ethertype = match (self.ethertype, self.src) {
            (Some(t), _) => t,
            (None, IpAddr::V4(_)) => ETHERTYPE_IPV4,
            (None, IpAddr::V6(_)) => ETHERTYPE_IPV6,
        };
        frame.extend_from_slice(&ethertype.to_be_bytes());
        if self.has_ip && self.ethertype.is_none() {
            frame.extend_from_slice(&self.ip_packet());
        } else {
            frame.extend_from_slice(&self.payload);
        }
        if let Some(len) = self.truncate {
            frame.truncate(len);
        }
        if let Some(len) = self.pad_to {
            if frame.len() < len {
                frame.resize(len, 0);
            }
        }
        frame
    }

    /// The IP packet alone (for quoting in an ICMP error).
    #[must_use]
    pub fn ip_packet(&self) -> Vec<u8> {
        let mut l4 = self.transport_bytes();
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                self.finish_l4(&mut l4, |proto, len| {
                    pseudo_header_v4(src.octets(), dst.octets(), proto, len)
                });
                let mut ip = self.ipv4_header(src, dst, l4.len());
                ip.extend_from_slice(&l4);
                ip
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                self.finish_l4(&mut l4, |proto, len| {
                    pseudo_header_v6(&src.octets(), &dst.octets(), proto, len.into())
                });
                let mut ip = self.ipv6_headers(src, dst, l4.len());
                ip.extend_from_slice(&l4);
                ip
            }
            _ => Vec::new(),
        }
    }

    fn proto_number(&self) -> IpProto {
        match self.transport {
            Transport::None(p) => p,
            Transport::Tcp { .. } => IpProto::TCP,
            Transport::Udp { .. } => IpProto::UDP,
            Transport::Icmp { .. } if self.src.is_ipv6() => IpProto::ICMPV6,
            Transport::Icmp { .. } => IpProto::ICMP,
            Transport::Sctp { .. } => IpProto::SCTP,
        }
    }

    /// The transport header and payload, checksum zero.
    fn transport_bytes(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        match self.transport {
            Transport::None(_) => {}
            Transport::Tcp {
                src,
                dst,
                flags,
                seq,
                options,
                data_offset,
            } => {
                l4.extend_from_slice(&src.to_be_bytes());
                l4.extend_from_slice(&dst.to_be_bytes());
                l4.extend_from_slice(&seq.to_be_bytes());
                let ack: u32 = if flags.contains(TcpFlags::ACK) { 1 } else { 0 };
                l4.extend_from_slice(&ack.to_be_bytes());
                let words = data_offset.unwrap_or(u8::try_from(5 + options / 4).unwrap_or(15));
                l4.push(words << 4);
                l4.push(flags.0);
                l4.extend_from_slice(&0xffffu16.to_be_bytes());
                l4.extend_from_slice(&[0, 0, 0, 0]);
                l4.resize(l4.len() + options, 1);
            }
            Transport::Udp { src, dst, len } => {
                l4.extend_from_slice(&src.to_be_bytes());
                l4.extend_from_slice(&dst.to_be_bytes());
                let real = u16::try_from(8 + self.payload.len()).unwrap_or(u16::MAX);
                l4.extend_from_slice(&len.unwrap_or(real).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
            }
            Transport::Icmp { ty, code, rest } => {
                l4.extend_from_slice(&[ty, code, 0, 0]);
                l4.extend_from_slice(&rest);
            }
            Transport::Sctp { src, dst, tag } => {
                l4.extend_from_slice(&src.to_be_bytes());
                l4.extend_from_slice(&dst.to_be_bytes());
                l4.extend_from_slice(&tag.to_be_bytes());
                l4.extend_from_slice(&[0; 4]);
            }
        }
        l4.extend_from_slice(&self.payload);
        l4
    }

    /// Writes the transport checksum, given the pseudo-header sum for (protocol, length).
    fn finish_l4(&self, l4: &mut [u8], pseudo: impl Fn(u8, u16) -> u64) {
        let proto = self.proto_number();
        if let Transport::Sctp { .. } = self.transport {
            // CRC32c over the packet with the field zero, least significant byte first.
            let crc = match self.l4_checksum {
                L4Checksum::Raw(v) => u32::from(v),
                _ => crc32c::crc32c(l4),
            };
            if let Some(field) = l4.get_mut(8..12) {
                field.copy_from_slice(&crc.to_le_bytes());
            }
            return;
        }
        let off = match self.transport {
            Transport::None(_) | Transport::Sctp { .. } => return,
            Transport::Tcp { .. } => 16,
            Transport::Udp { .. } => 6,
            Transport::Icmp { .. } => 2,
        };
        let len = u16::try_from(l4.len()).unwrap_or(u16::MAX);
        let pseudo = if proto == IpProto::ICMP {
            0
        } else {
            pseudo(proto.0, len)
        };
        let value = match self.l4_checksum {
            L4Checksum::Raw(v) => v,
            L4Checksum::PseudoHeaderOnly => fold(pseudo),
            L4Checksum::Valid => {
                let c = !fold(add_bytes(pseudo, l4));
                if c == 0 && proto == IpProto::UDP {
                    0xffff
                } else {
                    c
                }
            }
        };
        if let Some(field) = l4.get_mut(off..off + 2) {
            field.copy_from_slice(&value.to_be_bytes());
        }
    }

    fn ipv4_header(&self, src: Ipv4Addr, dst: Ipv4Addr, l4_len: usize) -> Vec<u8> {
        let hlen = 20 + self.ipv4_options;
        let ihl = self.ihl.unwrap_or(u8::try_from(hlen / 4).unwrap_or(15));
        let total = self
            .total_len
            .unwrap_or(u16::try_from(hlen + l4_len).unwrap_or(u16::MAX));
        let (offset, more) = self.fragment.unwrap_or((0, false));
        let flags = (offset / 8)
            | if more { 0x2000 } else { 0 }
            | if self.dont_fragment { 0x4000 } else { 0 };
        let mut ip = vec![(self.version.unwrap_or(4) << 4) | (ihl & 0x0f), 0];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(
            &u16::try_from(self.ip_id & 0xffff)
                .unwrap_or(0)
                .to_be_bytes(),
        );
        ip.extend_from_slice(&flags.to_be_bytes());
        ip.extend_from_slice(&[self.ttl, self.proto_number().0, 0, 0]);
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        ip.resize(hlen, 1);
        let mut csum = checksum(&ip);
        if self.bad_ip_checksum {
            csum ^= 0x5a5a;
        }
        ip[10..12].copy_from_slice(&csum.to_be_bytes());
        ip
    }

    fn ipv6_headers(&self, src: Ipv6Addr, dst: Ipv6Addr, l4_len: usize) -> Vec<u8> {
        let mut exts = self.extensions.clone();
        if let Some((offset, more)) = self.fragment {
            let mut body = vec![0; 6];
            body[..2].copy_from_slice(&(offset | u16::from(more)).to_be_bytes());
            body[2..].copy_from_slice(&self.ip_id.to_be_bytes());
            exts.push((IpProto::FRAGMENT, body));
        }
        let ext_len: usize = exts.iter().map(|(_, body)| body.len() + 2).sum();
        let plen = self
            .total_len
            .unwrap_or(u16::try_from(ext_len + l4_len).unwrap_or(u16::MAX));
        let first = exts.first().map_or(self.proto_number(), |(k, _)| *k);
        let mut ip = vec![self.version.unwrap_or(6) << 4, 0, 0, 0];
        ip.extend_from_slice(&plen.to_be_bytes());
        ip.extend_from_slice(&[first.0, self.ttl]);
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        for (i, (kind, body)) in exts.iter().enumerate() {
            let next = exts.get(i + 1).map_or(self.proto_number(), |(k, _)| *k);
            ip.push(next.0);
            let units = if *kind == IpProto::FRAGMENT {
                0
            } else {
                (body.len() + 2) / 8 - 1
            };
            ip.push(u8::try_from(units).unwrap_or(u8::MAX));
            ip.extend_from_slice(body);
        }
        ip
    }
}

fn echo_rest(id: u16, seq: u16) -> [u8; 4] {
    let [a, b] = id.to_be_bytes();
    let [c, d] = seq.to_be_bytes();
    [a, b, c, d]
}
