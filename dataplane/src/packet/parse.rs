//! One pass over a frame's headers: validation, classification and the flow key.
//!
//! [`parse`] checks every length it relies on once, against the frame and against the length
//! fields of the headers that enclose it, and records frame offsets that later stages (the
//! rewrite primitives) can trust. IP lengths bound everything inside them, so Ethernet padding
//! of short frames is never mistaken for payload.

use super::checksum::{add_bytes, fold, pseudo_header_v4, pseudo_header_v6};
use super::key::FlowKey;
use super::wire::{
    be16, Family, IpProto, TcpFlags, ETHERNET_HEADER_LEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6,
    ETHERTYPE_VLAN, ICMP_HEADER_LEN, IPV4_MIN_HEADER_LEN, IPV6_HEADER_LEN, SCTP_HEADER_LEN,
    TCP_MIN_HEADER_LEN, UDP_HEADER_LEN, VLAN_TAG_LEN,
};

/// Frames are parsed up to this length; offsets then fit in `u16`. No link xlb runs on carries
/// larger frames, and an IPv4 or IPv6 length field cannot describe more.
pub const MAX_FRAME_LEN: usize = u16::MAX as usize;

/// At most this many IPv6 extension headers are walked before the packet is dropped: real
/// traffic carries zero to two, and a bound keeps a crafted chain from costing more.
pub const MAX_IPV6_EXTENSION_HEADERS: usize = 8;

/// What the parser learnt about a frame it accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// The flow key (meaningful unless `class` is [`Class::NotForUs`]).
    pub key: FlowKey,
    /// What kind of packet this is, for the load balancer.
    pub class: Class,
    /// Offset of the IP header in the frame.
    pub l3_offset: u16,
    /// Offset of the transport header in the frame (or of the first byte after the last IPv6
    /// extension header walked, for a non-first fragment).
    pub l4_offset: u16,
    /// Offset one past the IP packet's last byte (Ethernet padding lies beyond it).
    pub l3_end: u16,
    /// TCP flags (empty for other protocols).
    pub tcp_flags: TcpFlags,
    /// Whether the TCP or UDP checksum is finished, unfinished or absent.
    pub checksum: ChecksumState,
}

/// The classification the load balancer acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A TCP segment, UDP datagram, SCTP packet or ICMP echo message, not fragmented.
    Ordinary,
    /// A fragment of an IP packet. The first fragment has the full key; a non-first fragment
    /// has no transport header, so its ports are zero.
    Fragment(Fragment),
    /// An ICMP or ICMPv6 error quoting a TCP, UDP or echo packet. The key is the quoted
    /// packet's key reversed: the flow the error travels along.
    IcmpError(IcmpError),
    /// Valid, but nothing a load balancer translates: pass it to the kernel.
    NotForUs(PassReason),
}

/// Fragment details.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment {
    /// Whether this fragment carries offset zero (and so the transport header).
    pub first: bool,
    /// The IP identification (16 bits for IPv4, 32 for IPv6).
    pub id: u32,
}

/// Where the quoted packet of an ICMP error lies, and what kind of error it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpError {
    /// The kind of error.
    pub kind: IcmpErrorKind,
    /// Offset of the quoted IP header in the frame.
    pub inner_l3_offset: u16,
    /// Offset of the quoted transport header in the frame.
    pub inner_l4_offset: u16,
}

/// ICMP errors that xlb translates (RFC 792, RFC 4443).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpErrorKind {
    /// Destination unreachable, other than fragmentation needed.
    DestinationUnreachable,
    /// IPv4 destination unreachable, fragmentation needed (RFC 1191): carries the next-hop MTU.
    FragmentationNeeded {
        /// The MTU of the next hop.
        mtu: u16,
    },
    /// IPv6 packet too big (RFC 8201): carries the MTU.
    PacketTooBig {
        /// The MTU of the next hop.
        mtu: u32,
    },
    /// Time exceeded (TTL or hop limit, or reassembly).
    TimeExceeded,
    /// Parameter problem.
    ParameterProblem,
}

/// The state of a TCP or UDP checksum field as the frame arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChecksumState {
    /// A checksum the sender finished (or a protocol whose checksum xlb only updates).
    Complete,
    /// Only the pseudo-header sum, not complemented: the sender asked for transmit checksum
    /// offload (Linux CHECKSUM_PARTIAL) and the frame reached us before any device finished
    /// it. Rewrites complete it.
    PseudoHeaderOnly,
    /// UDP checksum zero: "no checksum" over IPv4 (kept), invalid over IPv6 (computed).
    Absent,
}

/// Why a valid packet is passed to the kernel instead of translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PassReason {
    /// Not IPv4 or IPv6 (ARP, LLDP, a second VLAN tag, ...).
    NotIp,
    /// An IP protocol xlb does not translate (ESP, GRE, no next header, ...).
    UnsupportedProtocol,
    /// An ICMP message that is neither echo nor a translatable error (neighbour discovery,
    /// router advertisements, an error quoting an error or a non-first fragment, ...).
    IcmpNotTranslated,
    /// An IPv6 routing header with segments left: the destination address is a waypoint.
    Ipv6RoutingHeader,
}

crate::counted::counted_enum! {
    /// Why a malformed frame is dropped. Each bad input has its own reason and counter.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
    #[repr(u8)]
    pub enum DropReason {
        /// Shorter than an Ethernet header.
        EthernetTruncated,
        /// An 802.1Q tag cut short.
        VlanTruncated,
        /// Shorter than an IPv4 header.
        Ipv4Truncated,
        /// EtherType IPv4 but the version field says otherwise.
        Ipv4BadVersion,
        /// IHL below 5.
        Ipv4BadIhl,
        /// Total length shorter than the header or longer than the frame.
        Ipv4BadTotalLength,
        /// IPv4 header checksum wrong (RFC 1812 section 5.2.2).
        Ipv4BadHeaderChecksum,
        /// Shorter than the fixed IPv6 header.
        Ipv6Truncated,
        /// EtherType IPv6 but the version field says otherwise.
        Ipv6BadVersion,
        /// Payload length longer than the frame.
        Ipv6BadPayloadLength,
        /// An extension header runs past the end of the packet.
        Ipv6ExtensionHeaderTruncated,
        /// More extension headers than [`MAX_IPV6_EXTENSION_HEADERS`].
        Ipv6ExtensionChainTooLong,
        /// A hop-by-hop header anywhere but first (RFC 8200 section 4.1).
        Ipv6HopByHopNotFirst,
        /// Shorter than a TCP header.
        TcpTruncated,
        /// Data offset below 5 or beyond the segment.
        TcpBadDataOffset,
        /// Shorter than a UDP header.
        UdpTruncated,
        /// UDP length field below 8, zero included.
        UdpLengthTooShort,
        /// UDP length field beyond the IP payload.
        UdpLengthOverrun,
        /// Shorter than the SCTP common header.
        SctpTruncated,
        /// Shorter than an ICMP header.
        IcmpTruncated,
        /// An ICMP error whose quoted packet is cut short or malformed.
        IcmpErrorBadQuote,
    }
}

/// Parses a frame from its Ethernet header down to its transport header.
///
/// Always inlined: called through a function boundary, the 64-byte result was written field
/// by field and read back whole, and the stalled store forwarding doubled the cost
/// (`make bench`, parse tcp4: 19.8 ns called, 9.2 ns inlined).
///
/// # Errors
/// A [`DropReason`] when the frame is malformed in a way no host would accept.
#[inline(always)]
pub fn parse(frame: &[u8]) -> Result<Parsed, DropReason> {
    let frame = frame.get(..MAX_FRAME_LEN).unwrap_or(frame);
    let eth = frame
        .first_chunk::<ETHERNET_HEADER_LEN>()
        .ok_or(DropReason::EthernetTruncated)?;
    let mut ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    let mut l3 = ETHERNET_HEADER_LEN;
    if ethertype == ETHERTYPE_VLAN {
        ethertype = be16(frame, l3 + 2).ok_or(DropReason::VlanTruncated)?;
        l3 += VLAN_TAG_LEN;
    }
    let Some(packet) = frame.get(l3..) else {
        return Err(DropReason::VlanTruncated);
    };
    match ethertype {
        ETHERTYPE_IPV4 => ipv4(packet, l3),
        ETHERTYPE_IPV6 => ipv6(packet, l3),
        _ => Ok(Parsed::passed(PassReason::NotIp, l3)),
    }
}

impl Parsed {
    fn passed(reason: PassReason, l3: usize) -> Self {
        let l3 = offset(l3);
        Self {
            key: FlowKey::default(),
            class: Class::NotForUs(reason),
            l3_offset: l3,
            l4_offset: l3,
            l3_end: l3,
            tcp_flags: TcpFlags::default(),
            checksum: ChecksumState::Complete,
        }
    }
}

/// Converts an offset already bounded by [`MAX_FRAME_LEN`] to `u16`.
fn offset(off: usize) -> u16 {
    u16::try_from(off).unwrap_or(u16::MAX)
}

/// What the transport layer contributes to [`Parsed`].
#[derive(Clone, Copy)]
struct Transport {
    src_port: u16,
    dst_port: u16,
    flags: TcpFlags,
    /// For TCP and UDP: the checksum field and the length the pseudo-header covers.
    checksum: Option<(u16, u16)>,
}

impl Transport {
    /// No transport header (yet): ports and flags zero.
    const NONE: Self = Self {
        src_port: 0,
        dst_port: 0,
        flags: TcpFlags(0),
        checksum: None,
    };
}

#[inline(always)]
fn ipv4(packet: &[u8], l3: usize) -> Result<Parsed, DropReason> {
    let hdr = packet
        .first_chunk::<IPV4_MIN_HEADER_LEN>()
        .ok_or(DropReason::Ipv4Truncated)?;
    if hdr[0] >> 4 != 4 {
        return Err(DropReason::Ipv4BadVersion);
    }
    let ihl = usize::from(hdr[0] & 0x0f) * 4;
    if ihl < IPV4_MIN_HEADER_LEN {
        return Err(DropReason::Ipv4BadIhl);
    }
    let total = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
    let Some(packet) = packet.get(..total).filter(|_| total >= ihl) else {
        return Err(DropReason::Ipv4BadTotalLength);
    };
    let Some((header, segment)) = packet.split_at_checked(ihl) else {
        return Err(DropReason::Ipv4BadTotalLength);
    };
    if fold(add_bytes(0, header)) != 0xFFFF {
        return Err(DropReason::Ipv4BadHeaderChecksum);
    }
    let src = [hdr[12], hdr[13], hdr[14], hdr[15]];
    let dst = [hdr[16], hdr[17], hdr[18], hdr[19]];
    let proto = IpProto(hdr[9]);
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    let fragment = (frag & 0x3fff != 0).then(|| Fragment {
        first: frag & 0x1fff == 0,
        id: u32::from(u16::from_be_bytes([hdr[4], hdr[5]])),
    });
    let layout = Layout {
        family: Family::Ipv4,
        src: v4_in_key(src),
        dst: v4_in_key(dst),
        proto,
        fragment,
        l3,
        l4: l3 + ihl,
        end: l3 + total,
    };
    finish(&layout, segment, |len| {
        pseudo_header_v4(src, dst, proto.0, len)
    })
}

/// An IPv4 address in the key's 16-byte form, built in a register: one wide store instead
/// of a zeroed array patched by a narrow one.
#[inline(always)]
fn v4_in_key(addr: [u8; 4]) -> [u8; 16] {
    (u128::from(u32::from_be_bytes(addr)) << 96).to_be_bytes()
}

/// What the IP layer learnt, for [`finish`].
struct Layout {
    family: Family,
    src: [u8; 16],
    dst: [u8; 16],
    /// The transport protocol (after any IPv6 extension headers).
    proto: IpProto,
    fragment: Option<Fragment>,
    /// Frame offsets of the IP header, the transport header and the end of the IP packet.
    l3: usize,
    l4: usize,
    end: usize,
}

/// Parses the transport layer and builds the result, writing every field once.
///
/// Measured: building the result by patching a default value (a zeroed key, then its
/// addresses and ports) made each caller's wide loads wait on narrow stores that could not
/// be forwarded, and cost 20 ns of a 38 ns parse.
#[inline(always)]
fn finish(
    at: &Layout,
    segment: &[u8],
    pseudo: impl FnOnce(u16) -> u64,
) -> Result<Parsed, DropReason> {
    let class = at.fragment.map_or(Class::Ordinary, Class::Fragment);
    if at.fragment.is_some_and(|f| !f.first) {
        return Ok(at.parsed(class, Transport::NONE, ChecksumState::Complete));
    }
    let fragmented = at.fragment.is_some();
    match at.proto {
        IpProto::TCP | IpProto::UDP | IpProto::SCTP => {
            let t = transport(at.proto, segment, fragmented)?;
            let checksum = match t.checksum {
                Some((field, len)) if !fragmented => checksum_state(at.proto, field, pseudo(len)),
                _ => ChecksumState::Complete,
            };
            Ok(at.parsed(class, t, checksum))
        }
        proto if proto == icmp_proto(at.family) => {
            let mut parsed = at.parsed(class, Transport::NONE, ChecksumState::Complete);
            icmp(&mut parsed, at.family, segment, at.l4)?;
            Ok(parsed)
        }
        _ => {
            let pass = Class::NotForUs(PassReason::UnsupportedProtocol);
            Ok(at.parsed(pass, Transport::NONE, ChecksumState::Complete))
        }
    }
}

impl Layout {
    /// The whole result in one expression, every field written once.
    #[inline(always)]
    fn parsed(&self, class: Class, t: Transport, checksum: ChecksumState) -> Parsed {
        Parsed {
            key: FlowKey::new(
                self.family,
                self.proto,
                (self.src, t.src_port),
                (self.dst, t.dst_port),
            ),
            class,
            l3_offset: offset(self.l3),
            l4_offset: offset(self.l4),
            l3_end: offset(self.end),
            tcp_flags: t.flags,
            checksum,
        }
    }
}

#[inline(always)]
fn ipv6(packet: &[u8], l3: usize) -> Result<Parsed, DropReason> {
    let hdr = packet
        .first_chunk::<IPV6_HEADER_LEN>()
        .ok_or(DropReason::Ipv6Truncated)?;
    if hdr[0] >> 4 != 6 {
        return Err(DropReason::Ipv6BadVersion);
    }
    let total = IPV6_HEADER_LEN + usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
    let packet = packet
        .get(..total)
        .ok_or(DropReason::Ipv6BadPayloadLength)?;
    let mut src = [0; 16];
    src.copy_from_slice(&hdr[8..24]);
    let mut dst = [0; 16];
    dst.copy_from_slice(&hdr[24..40]);

    let walk = walk_extension_headers(packet, hdr[6])?;
    if walk.routed {
        let mut parsed = Parsed::passed(PassReason::Ipv6RoutingHeader, l3);
        parsed.key.family = Family::Ipv6;
        return Ok(parsed);
    }
    let layout = Layout {
        family: Family::Ipv6,
        src,
        dst,
        proto: walk.proto,
        fragment: walk.fragment,
        l3,
        l4: l3 + walk.l4,
        end: l3 + total,
    };
    let segment = packet.get(walk.l4..).unwrap_or_default();
    finish(&layout, segment, |len| {
        pseudo_header_v6(&src, &dst, walk.proto.0, u32::from(len))
    })
}

/// The end of an IPv6 extension header walk.
struct Ipv6Walk {
    /// The transport protocol (the last next-header value).
    proto: IpProto,
    /// Offset of the transport header from the start of the IPv6 header.
    l4: usize,
    fragment: Option<Fragment>,
    /// A routing header with segments left was seen.
    routed: bool,
}

/// Walks hop-by-hop, routing, destination-options and fragment headers (RFC 8200 section 4),
/// stopping at a non-first fragment, whose payload is not a header.
fn walk_extension_headers(packet: &[u8], first: u8) -> Result<Ipv6Walk, DropReason> {
    let mut walk = Ipv6Walk {
        proto: IpProto(first),
        l4: IPV6_HEADER_LEN,
        fragment: None,
        routed: false,
    };
    for seen in 0..=MAX_IPV6_EXTENSION_HEADERS {
        let ext = packet.get(walk.l4..).unwrap_or_default();
        let len = match walk.proto {
            IpProto::HOP_BY_HOP | IpProto::ROUTING | IpProto::DESTINATION_OPTIONS => {
                if walk.proto == IpProto::HOP_BY_HOP && seen != 0 {
                    return Err(DropReason::Ipv6HopByHopNotFirst);
                }
                let head = ext
                    .first_chunk::<4>()
                    .ok_or(DropReason::Ipv6ExtensionHeaderTruncated)?;
                if walk.proto == IpProto::ROUTING && head[3] != 0 {
                    walk.routed = true;
                }
                (usize::from(head[1]) + 1) * 8
            }
            IpProto::FRAGMENT => {
                let head = ext
                    .first_chunk::<8>()
                    .ok_or(DropReason::Ipv6ExtensionHeaderTruncated)?;
                let off_flags = u16::from_be_bytes([head[2], head[3]]);
                let first = off_flags >> 3 == 0;
                // An atomic fragment (offset 0, no more fragments; RFC 6946) is a whole packet.
                if !first || off_flags & 1 != 0 {
                    walk.fragment = Some(Fragment {
                        first,
                        id: u32::from_be_bytes([head[4], head[5], head[6], head[7]]),
                    });
                }
                8
            }
            _ => return Ok(walk),
        };
        if ext.len() < len {
            return Err(DropReason::Ipv6ExtensionHeaderTruncated);
        }
        walk.proto = IpProto(ext[0]);
        walk.l4 += len;
        if walk.fragment.is_some_and(|f| !f.first) {
            return Ok(walk);
        }
    }
    Err(DropReason::Ipv6ExtensionChainTooLong)
}

/// Parses a TCP, UDP or SCTP header within `segment` (bounded by the IP length).
#[inline(always)]
fn transport(proto: IpProto, segment: &[u8], fragmented: bool) -> Result<Transport, DropReason> {
    if proto == IpProto::TCP {
        let hdr = segment
            .first_chunk::<TCP_MIN_HEADER_LEN>()
            .ok_or(DropReason::TcpTruncated)?;
        let data_offset = usize::from(hdr[12] >> 4) * 4;
        if data_offset < TCP_MIN_HEADER_LEN || data_offset > segment.len() {
            return Err(DropReason::TcpBadDataOffset);
        }
        Ok(Transport {
            src_port: u16::from_be_bytes([hdr[0], hdr[1]]),
            dst_port: u16::from_be_bytes([hdr[2], hdr[3]]),
            flags: TcpFlags(hdr[13]),
            checksum: Some((
                u16::from_be_bytes([hdr[16], hdr[17]]),
                offset(segment.len()),
            )),
        })
    } else if proto == IpProto::SCTP {
        sctp(segment)
    } else {
        let hdr = segment
            .first_chunk::<UDP_HEADER_LEN>()
            .ok_or(DropReason::UdpTruncated)?;
        let len = u16::from_be_bytes([hdr[4], hdr[5]]);
        if usize::from(len) < UDP_HEADER_LEN {
            return Err(DropReason::UdpLengthTooShort);
        }
        // A first fragment carries only part of the datagram the length describes.
        if !fragmented && usize::from(len) > segment.len() {
            return Err(DropReason::UdpLengthOverrun);
        }
        Ok(Transport {
            src_port: u16::from_be_bytes([hdr[0], hdr[1]]),
            dst_port: u16::from_be_bytes([hdr[2], hdr[3]]),
            flags: TcpFlags::default(),
            checksum: Some((u16::from_be_bytes([hdr[6], hdr[7]]), len)),
        })
    }
}

/// Parses an SCTP common header; its CRC32c is not verified here: a rewrite that must
/// recompute it keeps an incoming error (see `rewrite`), and one that need not leaves it.
#[cold]
fn sctp(segment: &[u8]) -> Result<Transport, DropReason> {
    let hdr = segment
        .first_chunk::<SCTP_HEADER_LEN>()
        .ok_or(DropReason::SctpTruncated)?;
    Ok(Transport {
        src_port: u16::from_be_bytes([hdr[0], hdr[1]]),
        dst_port: u16::from_be_bytes([hdr[2], hdr[3]]),
        flags: TcpFlags::default(),
        checksum: None,
    })
}

/// Tells a finished checksum from a pseudo-header-only one (CHECKSUM_PARTIAL).
///
/// An unfinished field holds the folded pseudo-header sum itself. A finished checksum equals
/// it by chance once in 65 535 packets; treating such a packet as unfinished costs one full
/// checksum computation and still leaves a valid checksum, so the test is safe both ways.
#[inline(always)]
fn checksum_state(proto: IpProto, field: u16, pseudo: u64) -> ChecksumState {
    if field == 0 && proto == IpProto::UDP {
        return ChecksumState::Absent;
    }
    let folded = fold(pseudo);
    if field == folded || (folded == 0xFFFF && field == 0) {
        ChecksumState::PseudoHeaderOnly
    } else {
        ChecksumState::Complete
    }
}

/// Whether an ICMP (IPv4) or ICMPv6 type is echo request or echo reply.
fn is_echo(family: Family, ty: u8) -> bool {
    match family {
        Family::Ipv4 => ty == 8 || ty == 0,
        Family::Ipv6 => ty == 128 || ty == 129,
    }
}

/// The ICMP protocol of a family.
pub(crate) fn icmp_proto(family: Family) -> IpProto {
    match family {
        Family::Ipv4 => IpProto::ICMP,
        Family::Ipv6 => IpProto::ICMPV6,
    }
}

/// Classifies the error types that carry a quoted packet xlb can translate.
fn icmp_error_kind(family: Family, hdr: &[u8; ICMP_HEADER_LEN]) -> Option<IcmpErrorKind> {
    let [ty, code, _, _, b4, b5, b6, b7] = *hdr;
    match (family, ty) {
        (Family::Ipv4, 3) if code == 4 => Some(IcmpErrorKind::FragmentationNeeded {
            mtu: u16::from_be_bytes([b6, b7]),
        }),
        (Family::Ipv4, 3) | (Family::Ipv6, 1) => Some(IcmpErrorKind::DestinationUnreachable),
        (Family::Ipv4, 11) | (Family::Ipv6, 3) => Some(IcmpErrorKind::TimeExceeded),
        (Family::Ipv4, 12) | (Family::Ipv6, 4) => Some(IcmpErrorKind::ParameterProblem),
        (Family::Ipv6, 2) => Some(IcmpErrorKind::PacketTooBig {
            mtu: u32::from_be_bytes([b4, b5, b6, b7]),
        }),
        _ => None,
    }
}

/// Parses an ICMP or ICMPv6 message at frame offset `l4` (or the start of one, in a first
/// fragment).
fn icmp(parsed: &mut Parsed, family: Family, segment: &[u8], l4: usize) -> Result<(), DropReason> {
    let hdr = segment
        .first_chunk::<ICMP_HEADER_LEN>()
        .ok_or(DropReason::IcmpTruncated)?;
    if is_echo(family, hdr[0]) {
        let id = u16::from_be_bytes([hdr[4], hdr[5]]);
        parsed.key.src_port = id;
        parsed.key.dst_port = id;
        return Ok(());
    }
    // Errors are small and never fragmented by honest senders; a fragmented one is not ours.
    let kind = icmp_error_kind(family, hdr).filter(|_| parsed.class == Class::Ordinary);
    let Some(kind) = kind else {
        parsed.class = Class::NotForUs(PassReason::IcmpNotTranslated);
        return Ok(());
    };
    let quote = segment.get(ICMP_HEADER_LEN..).unwrap_or_default();
    let inner_l3 = l4 + ICMP_HEADER_LEN;
    match quoted_packet(family, quote)? {
        Some(q) => {
            parsed.key = FlowKey::new(
                family,
                q.proto,
                (q.dst_addr, q.dst_port),
                (q.src_addr, q.src_port),
            );
            parsed.class = Class::IcmpError(IcmpError {
                kind,
                inner_l3_offset: offset(inner_l3),
                inner_l4_offset: offset(inner_l3 + q.l4),
            });
        }
        None => parsed.class = Class::NotForUs(PassReason::IcmpNotTranslated),
    }
    Ok(())
}

/// The parts of a quoted packet that matter for translation.
struct Quoted {
    src_addr: [u8; 16],
    dst_addr: [u8; 16],
    src_port: u16,
    dst_port: u16,
    proto: IpProto,
    /// Offset of the quoted transport header from the quoted IP header.
    l4: usize,
}

/// Parses the packet quoted by an ICMP error. A quote is usually cut short (RFC 792 asks for
/// the IP header and 8 bytes, RFC 1812 and 4443 for as much as fits), so its own length fields
/// are not checked against what is present; the IP header and the first 8 transport bytes
/// (ports, and the UDP checksum) must be. `Ok(None)` means a valid quote xlb does not
/// translate: a non-first fragment, an unsupported protocol, or an ICMP message other than echo.
fn quoted_packet(family: Family, quote: &[u8]) -> Result<Option<Quoted>, DropReason> {
    let bad = DropReason::IcmpErrorBadQuote;
    let mut q = Quoted {
        src_addr: [0; 16],
        dst_addr: [0; 16],
        src_port: 0,
        dst_port: 0,
        proto: IpProto::default(),
        l4: 0,
    };
    match family {
        Family::Ipv4 => {
            let hdr = quote.first_chunk::<IPV4_MIN_HEADER_LEN>().ok_or(bad)?;
            let ihl = usize::from(hdr[0] & 0x0f) * 4;
            if hdr[0] >> 4 != 4 || ihl < IPV4_MIN_HEADER_LEN {
                return Err(bad);
            }
            if u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff != 0 {
                return Ok(None);
            }
            q.src_addr[..4].copy_from_slice(&hdr[12..16]);
            q.dst_addr[..4].copy_from_slice(&hdr[16..20]);
            q.proto = IpProto(hdr[9]);
            q.l4 = ihl;
        }
        Family::Ipv6 => {
            let hdr = quote.first_chunk::<IPV6_HEADER_LEN>().ok_or(bad)?;
            if hdr[0] >> 4 != 6 {
                return Err(bad);
            }
            q.src_addr.copy_from_slice(&hdr[8..24]);
            q.dst_addr.copy_from_slice(&hdr[24..40]);
            let walk = walk_extension_headers(quote, hdr[6]).map_err(|_| bad)?;
            if walk.fragment.is_some_and(|f| !f.first) || walk.routed {
                return Ok(None);
            }
            q.proto = walk.proto;
            q.l4 = walk.l4;
        }
    }
    let l4 = quote
        .get(q.l4..)
        .and_then(<[u8]>::first_chunk::<8>)
        .ok_or(bad)?;
    if matches!(q.proto, IpProto::TCP | IpProto::UDP | IpProto::SCTP) {
        q.src_port = u16::from_be_bytes([l4[0], l4[1]]);
        q.dst_port = u16::from_be_bytes([l4[2], l4[3]]);
    } else if q.proto == icmp_proto(family) && is_echo(family, l4[0]) {
        q.src_port = u16::from_be_bytes([l4[4], l4[5]]);
        q.dst_port = q.src_port;
    } else {
        return Ok(None);
    }
    Ok(Some(q))
}
