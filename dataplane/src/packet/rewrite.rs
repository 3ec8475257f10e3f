//! In-place NAT rewrite primitives.
//!
//! Each primitive changes a few fields of a frame that [`super::parse`] accepted and updates
//! every checksum that covers them with [`CsumDelta`] (RFC 1624): the IPv4 header checksum,
//! the TCP, UDP or ICMP checksum, and for ICMP errors also the quoted packet's checksums. The
//! cost depends on the fields changed, never on the payload, with one exception: a TCP or UDP
//! checksum the sender never finished ([`ChecksumState::PseudoHeaderOnly`]), or an IPv6 UDP
//! checksum of zero, is computed in full once, because forwarding it as it is would deliver a
//! broken checksum.
//!
//! An incoming checksum that is simply wrong stays wrong by exactly the same amount: the
//! receiver still detects the corruption, as RFC 1624 intends for a forwarding node.
//!
//! SCTP's checksum is a CRC32c over the SCTP packet alone (RFC 9260 section 6.8, no
//! pseudo-header): an address change leaves it valid, and a port change recomputes it over the
//! whole packet (two passes, one before and one after, so that an incoming error stays the
//! same error: CRCs are linear, and the new field is the new CRC XOR the old syndrome). A
//! first fragment whose port changes is refused: its CRC covers fragments that are not here.
//!
//! Translating an ICMP error (RFC 5508 section 4.2, RFC 4443 section 2.4) follows the flow the
//! error travels along, whose key is the quoted packet's key reversed:
//! * [`set_destination`] rewrites the quoted packet's source address and port, and the outer
//!   destination address (the error must reach whoever now owns the quoted packet's source);
//! * [`set_source`] rewrites the quoted packet's destination address and port, and the outer
//!   source address only when the error came from the quoted packet's destination itself (a
//!   port unreachable from a backend); an error from a router on the path keeps the router's
//!   address, so path-MTU discovery still sees who sent it.

use super::checksum::{add_bytes, fold, pseudo_header_v4, pseudo_header_v6, CsumDelta};
use super::key::Endpoint;
use super::parse::{icmp_proto, ChecksumState, Class, IcmpError, Parsed};
use super::wire::{Family, IpProto, MacAddr, ETHERNET_HEADER_LEN, VLAN_TAG_LEN};

/// Why a rewrite was refused. The frame is unchanged when one is returned, except for
/// [`RewriteError::FrameMismatch`], which only a caller bug can cause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RewriteError {
    /// The new address belongs to the other IP family.
    FamilyMismatch,
    /// The packet was classified [`Class::NotForUs`]: there is nothing to translate.
    NotTranslatable,
    /// The frame is shorter than the offsets recorded when it was parsed: it is not the frame
    /// that was parsed.
    FrameMismatch,
    /// An SCTP first fragment whose port would change: its checksum covers the whole packet,
    /// which is not here to compute it over.
    SctpFragmentPort,
}

/// Which end of the flow a rewrite changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

impl Side {
    fn opposite(self) -> Self {
        match self {
            Self::Source => Self::Destination,
            Self::Destination => Self::Source,
        }
    }
}

/// Rewrites the destination address and port (DNAT), or the quoted source of an ICMP error.
///
/// For ICMP echo the port is the echo identifier. A fragment after the first has no port:
/// only its address changes (with the IPv4 header checksum). `parsed` is updated to describe
/// the rewritten frame.
///
/// # Errors
/// See [`RewriteError`].
#[inline(always)]
pub fn set_destination(
    frame: &mut [u8],
    parsed: &mut Parsed,
    to: &Endpoint,
) -> Result<(), RewriteError> {
    rewrite(frame, parsed, Side::Destination, to)
}

/// Rewrites the source address and port (SNAT), or the quoted destination of an ICMP error.
/// The same rules as [`set_destination`] apply.
///
/// # Errors
/// See [`RewriteError`].
#[inline(always)]
pub fn set_source(
    frame: &mut [u8],
    parsed: &mut Parsed,
    to: &Endpoint,
) -> Result<(), RewriteError> {
    rewrite(frame, parsed, Side::Source, to)
}

/// Rewrites the Ethernet source and destination addresses.
///
/// # Errors
/// [`RewriteError::FrameMismatch`] if the frame is shorter than an Ethernet header's addresses.
pub fn set_ethernet(frame: &mut [u8], src: MacAddr, dst: MacAddr) -> Result<(), RewriteError> {
    let addrs = frame
        .first_chunk_mut::<12>()
        .ok_or(RewriteError::FrameMismatch)?;
    addrs[..6].copy_from_slice(&dst.0);
    addrs[6..].copy_from_slice(&src.0);
    Ok(())
}

/// Removes the frame's 802.1Q tag, if it has one: xlb's ports are untagged links, so a frame
/// forwarded from a tagged one leaves untagged (refusals answer on the link they came from and
/// keep their tag). The packet moves 4 bytes towards the frame's start; `parsed` is updated to
/// describe it. Returns the frame's new length.
///
/// # Errors
/// [`RewriteError::FrameMismatch`] if the frame is not the one parsed.
pub fn strip_vlan(
    frame: &mut [u8],
    len: usize,
    parsed: &mut Parsed,
) -> Result<usize, RewriteError> {
    let tagged = ETHERNET_HEADER_LEN + VLAN_TAG_LEN;
    if usize::from(parsed.l3_offset) != tagged {
        return Ok(len);
    }
    let tag = u16::try_from(VLAN_TAG_LEN).map_err(|_| RewriteError::FrameMismatch)?;
    if len < tagged || len > frame.len() {
        return Err(RewriteError::FrameMismatch);
    }
    // The inner EtherType and everything after it move over the tag.
    frame.copy_within(12 + VLAN_TAG_LEN..len, 12);
    parsed.l3_offset -= tag;
    parsed.l4_offset = parsed.l4_offset.saturating_sub(tag);
    parsed.l3_end = parsed.l3_end.saturating_sub(tag);
    if let Class::IcmpError(e) = &mut parsed.class {
        e.inner_l3_offset = e.inner_l3_offset.saturating_sub(tag);
        e.inner_l4_offset = e.inner_l4_offset.saturating_sub(tag);
    }
    Ok(len - VLAN_TAG_LEN)
}

#[inline(always)]
fn rewrite(
    frame: &mut [u8],
    parsed: &mut Parsed,
    side: Side,
    to: &Endpoint,
) -> Result<(), RewriteError> {
    // Fixed-size addresses from here on: slices of run-time length cost a memcpy call each.
    match (parsed.key.family, to.family()) {
        (Family::Ipv4, Family::Ipv4) => {
            let Some(v4) = to.key_addr().first_chunk::<4>() else {
                return Err(RewriteError::FamilyMismatch);
            };
            rewrite_as(frame, parsed, side, v4, to)
        }
        (Family::Ipv6, Family::Ipv6) => rewrite_as(frame, parsed, side, to.key_addr(), to),
        _ => Err(RewriteError::FamilyMismatch),
    }
}

#[inline(always)]
fn rewrite_as<const N: usize>(
    frame: &mut [u8],
    parsed: &mut Parsed,
    side: Side,
    new_addr: &[u8; N],
    to: &Endpoint,
) -> Result<(), RewriteError> {
    let port = to.port();
    if let Class::NotForUs(_) = parsed.class {
        return Err(RewriteError::NotTranslatable);
    }
    let family = parsed.key.family;
    let l3 = usize::from(parsed.l3_offset);
    let packet = frame
        .get_mut(l3..usize::from(parsed.l3_end))
        .ok_or(RewriteError::FrameMismatch)?;
    let l4 = usize::from(parsed.l4_offset)
        .checked_sub(l3)
        .ok_or(RewriteError::FrameMismatch)?;
    let ip = IpFields::of(family);
    match parsed.class {
        Class::NotForUs(_) => return Err(RewriteError::NotTranslatable),
        // A later fragment: its addresses only (the first fragment carries the ports, and the
        // transport checksum, updated there for the whole datagram).
        Class::Fragment(f) if !f.first => {
            let delta = replace(packet, ip.addr(side), new_addr)?;
            ip.update_header_checksum(packet, delta)?;
        }
        Class::Ordinary | Class::Fragment(_) => {
            translate(packet, parsed, ip, l4, side, new_addr, port)?;
        }
        Class::IcmpError(e) => {
            translate_icmp_error(packet, parsed, ip, l3, e, side, new_addr, port)?
        }
    }

    let is_echo = parsed.key.proto == icmp_proto(family);
    let (key_addr, key_port) = match side {
        Side::Source => (&mut parsed.key.src_addr, &mut parsed.key.src_port),
        Side::Destination => (&mut parsed.key.dst_addr, &mut parsed.key.dst_port),
    };
    *key_addr = *to.key_addr();
    if matches!(parsed.class, Class::Fragment(f) if !f.first) {
        // No port in the frame: the key keeps none.
        return Ok(());
    }
    *key_port = port;
    if is_echo {
        parsed.key.src_port = port;
        parsed.key.dst_port = port;
    }
    Ok(())
}

/// Rewrites an ordinary packet or a first fragment: address, port, and their checksums.
#[inline(always)]
fn translate<const N: usize>(
    packet: &mut [u8],
    parsed: &mut Parsed,
    ip: IpFields,
    l4: usize,
    side: Side,
    new_addr: &[u8; N],
    port: u16,
) -> Result<(), RewriteError> {
    if parsed.key.proto == IpProto::SCTP {
        return translate_sctp(packet, parsed, ip, l4, side, new_addr, port);
    }
    let addr_delta = replace(packet, ip.addr(side), new_addr)?;
    ip.update_header_checksum(packet, addr_delta)?;
    let l4_fields = L4Fields::of(parsed.key.proto, ip.family);
    let port_delta = replace(packet, l4 + l4_fields.port(side), &port.to_be_bytes())?;
    let delta = port_delta.merge(if l4_fields.pseudo_header {
        addr_delta
    } else {
        CsumDelta::new()
    });
    let csum = l4 + l4_fields.checksum;
    match parsed.checksum {
        ChecksumState::Complete => {
            update_checksum(packet, csum, delta, l4_fields.udp)?;
        }
        ChecksumState::Absent if ip.family == Family::Ipv4 => {}
        ChecksumState::Absent | ChecksumState::PseudoHeaderOnly => {
            complete_checksum(packet, ip, l4, parsed.key.proto, csum)?;
            parsed.checksum = ChecksumState::Complete;
        }
    }
    Ok(())
}

/// Rewrites an SCTP packet or first fragment: address (its CRC32c does not cover it), port,
/// and the CRC32c when the port changes (see the module documentation).
#[cold]
fn translate_sctp<const N: usize>(
    packet: &mut [u8],
    parsed: &Parsed,
    ip: IpFields,
    l4: usize,
    side: Side,
    new_addr: &[u8; N],
    port: u16,
) -> Result<(), RewriteError> {
    let mismatch = RewriteError::FrameMismatch;
    let port_at = l4 + L4Fields::of(IpProto::SCTP, ip.family).port(side);
    let moves = crate::packet::wire::be16(packet, port_at).ok_or(mismatch)? != port;
    if moves && matches!(parsed.class, Class::Fragment(_)) {
        return Err(RewriteError::SctpFragmentPort);
    }
    // What the incoming CRC is off by (zero for an intact packet), kept through the rewrite.
    let syndrome = if moves {
        let segment = packet.get(l4..).ok_or(mismatch)?;
        Some(sctp_field(segment).ok_or(mismatch)? ^ sctp_crc(segment).ok_or(mismatch)?)
    } else {
        None
    };
    let addr_delta = replace(packet, ip.addr(side), new_addr)?;
    ip.update_header_checksum(packet, addr_delta)?;
    if let Some(syndrome) = syndrome {
        replace(packet, port_at, &port.to_be_bytes())?;
        let segment = packet.get(l4..).ok_or(mismatch)?;
        let crc = sctp_crc(segment).ok_or(mismatch)? ^ syndrome;
        let field = packet
            .get_mut(l4 + SCTP_CHECKSUM..)
            .and_then(<[u8]>::first_chunk_mut::<4>)
            .ok_or(mismatch)?;
        *field = crc.to_le_bytes();
    }
    Ok(())
}

/// Offset of the checksum in the SCTP common header.
const SCTP_CHECKSUM: usize = 8;

/// The CRC32c an SCTP packet should carry: over the packet with its checksum field as zero
/// (RFC 9260 appendix A). `None` if it is shorter than the common header.
pub(super) fn sctp_crc(segment: &[u8]) -> Option<u32> {
    let head = segment.get(..SCTP_CHECKSUM)?;
    let rest = segment.get(SCTP_CHECKSUM + 4..)?;
    let crc = crc32c::crc32c_append(crc32c::crc32c(head), &[0; 4]);
    Some(crc32c::crc32c_append(crc, rest))
}

/// The CRC32c an SCTP packet carries (stored least significant byte first, as RFC 9260's
/// reference code and Linux do).
fn sctp_field(segment: &[u8]) -> Option<u32> {
    let field = segment.get(SCTP_CHECKSUM..)?.first_chunk::<4>()?;
    Some(u32::from_le_bytes(*field))
}

/// Rewrites an ICMP error and the packet it quotes (see the module documentation).
#[expect(
    clippy::too_many_arguments,
    reason = "internal step of `rewrite`, all inputs distinct"
)]
fn translate_icmp_error<const N: usize>(
    packet: &mut [u8],
    parsed: &Parsed,
    ip: IpFields,
    l3: usize,
    error: IcmpError,
    side: Side,
    new_addr: &[u8; N],
    port: u16,
) -> Result<(), RewriteError> {
    let mismatch = RewriteError::FrameMismatch;
    let icmp = usize::from(parsed.l4_offset)
        .checked_sub(l3)
        .ok_or(mismatch)?;
    let inner_l3 = usize::from(error.inner_l3_offset)
        .checked_sub(l3)
        .ok_or(mismatch)?;
    let inner_l4 = usize::from(error.inner_l4_offset)
        .checked_sub(l3)
        .ok_or(mismatch)?;
    let inner_side = side.opposite();

    // The quoted packet: its address, its IPv4 header checksum, its port and its L4 checksum.
    let inner_addr_off = inner_l3 + ip.addr(inner_side);
    let old_inner_addr: [u8; N] = *packet
        .get(inner_addr_off..)
        .and_then(<[u8]>::first_chunk)
        .ok_or(mismatch)?;
    let inner_addr_delta = replace(packet, inner_addr_off, new_addr)?;
    let mut message_delta = inner_addr_delta;
    if ip.family == Family::Ipv4 {
        message_delta = message_delta.merge(update_checksum(
            packet,
            inner_l3 + 10,
            inner_addr_delta,
            false,
        )?);
    }
    let l4_fields = L4Fields::of(parsed.key.proto, ip.family);
    let port_delta = replace(
        packet,
        inner_l4 + l4_fields.port(inner_side),
        &port.to_be_bytes(),
    )?;
    message_delta = message_delta.merge(port_delta);
    let inner_csum = inner_l4 + l4_fields.checksum;
    // A quote of only 8 transport bytes holds no TCP checksum, and one cut through it holds
    // half, which stays as it is; a UDP checksum of zero is "none" and stays so (the quote is
    // truncated, so it cannot be computed anyway).
    // A quoted SCTP packet's CRC32c cannot be computed from a quote; it stays as it was.
    let quoted_csum =
        crate::packet::wire::be16(packet, inner_csum).filter(|_| parsed.key.proto != IpProto::SCTP);
    if quoted_csum.is_some_and(|c| !(l4_fields.udp && c == 0)) {
        let delta = port_delta.merge(if l4_fields.pseudo_header {
            inner_addr_delta
        } else {
            CsumDelta::new()
        });
        message_delta =
            message_delta.merge(update_checksum(packet, inner_csum, delta, l4_fields.udp)?);
    }

    // The outer header.
    let outer_addr_off = ip.addr(side);
    let outer_delta = match side {
        Side::Destination => replace(packet, outer_addr_off, new_addr)?,
        Side::Source => {
            let from_endpoint = packet
                .get(outer_addr_off..)
                .and_then(<[u8]>::first_chunk::<N>)
                .is_some_and(|a| *a == old_inner_addr);
            if from_endpoint {
                replace(packet, outer_addr_off, new_addr)?
            } else {
                CsumDelta::new()
            }
        }
    };
    ip.update_header_checksum(packet, outer_delta)?;
    // ICMPv6 checksums cover the pseudo-header (RFC 4443 section 2.3); ICMPv4 ones do not.
    if ip.family == Family::Ipv6 {
        message_delta = message_delta.merge(outer_delta);
    }
    update_checksum(packet, icmp + 2, message_delta, false)?;
    Ok(())
}

/// Computes a TCP or UDP checksum from scratch (pseudo-header, header and payload).
#[cold]
fn complete_checksum(
    packet: &mut [u8],
    ip: IpFields,
    l4: usize,
    proto: IpProto,
    csum: usize,
) -> Result<(), RewriteError> {
    let mismatch = RewriteError::FrameMismatch;
    write16(packet, csum, 0)?;
    let udp = proto == IpProto::UDP;
    let segment = packet.get(l4..).ok_or(mismatch)?;
    // The UDP length bounds the datagram; TCP runs to the end of the IP packet.
    let len = if udp {
        usize::from(crate::packet::wire::be16(segment, 4).ok_or(mismatch)?)
    } else {
        segment.len()
    };
    let segment = segment.get(..len).ok_or(mismatch)?;
    let len = u16::try_from(len).map_err(|_| mismatch)?;
    let pseudo = match ip.family {
        Family::Ipv4 => {
            let src = packet.get(12..16).and_then(|a| <[u8; 4]>::try_from(a).ok());
            let dst = packet.get(16..20).and_then(|a| <[u8; 4]>::try_from(a).ok());
            pseudo_header_v4(src.ok_or(mismatch)?, dst.ok_or(mismatch)?, proto.0, len)
        }
        Family::Ipv6 => {
            let src = packet
                .get(8..24)
                .and_then(|a| <&[u8; 16]>::try_from(a).ok());
            let dst = packet
                .get(24..40)
                .and_then(|a| <&[u8; 16]>::try_from(a).ok());
            pseudo_header_v6(
                src.ok_or(mismatch)?,
                dst.ok_or(mismatch)?,
                proto.0,
                len.into(),
            )
        }
    };
    let mut sum = !fold(add_bytes(pseudo, segment));
    if udp && sum == 0 {
        sum = 0xFFFF;
    }
    write16(packet, csum, sum)
}

/// Where the address fields and header checksum of an IP header are.
#[derive(Clone, Copy)]
struct IpFields {
    family: Family,
}

impl IpFields {
    fn of(family: Family) -> Self {
        Self { family }
    }

    fn addr(self, side: Side) -> usize {
        match (self.family, side) {
            (Family::Ipv4, Side::Source) => 12,
            (Family::Ipv4, Side::Destination) => 16,
            (Family::Ipv6, Side::Source) => 8,
            (Family::Ipv6, Side::Destination) => 24,
        }
    }

    /// Applies `delta` to the IPv4 header checksum; IPv6 has none.
    #[inline(always)]
    fn update_header_checksum(
        self,
        packet: &mut [u8],
        delta: CsumDelta,
    ) -> Result<(), RewriteError> {
        if self.family == Family::Ipv4 {
            update_checksum(packet, 10, delta, false)?;
        }
        Ok(())
    }
}

/// Where the port-like fields and checksum of a transport header are.
#[derive(Clone, Copy)]
struct L4Fields {
    /// Offsets of the source and destination port (both the echo identifier for ICMP).
    ports: [usize; 2],
    checksum: usize,
    /// Whether the checksum covers the IP pseudo-header.
    pseudo_header: bool,
    /// UDP's zero-means-none rule applies.
    udp: bool,
}

impl L4Fields {
    fn of(proto: IpProto, family: Family) -> Self {
        match proto {
            IpProto::TCP => Self {
                ports: [0, 2],
                checksum: 16,
                pseudo_header: true,
                udp: false,
            },
            IpProto::UDP => Self {
                ports: [0, 2],
                checksum: 6,
                pseudo_header: true,
                udp: true,
            },
            // Its CRC32c is not a ones'-complement sum: `translate_sctp` recomputes it.
            IpProto::SCTP => Self {
                ports: [0, 2],
                checksum: SCTP_CHECKSUM,
                pseudo_header: false,
                udp: false,
            },
            // ICMP echo: the identifier at offset 4 (parse admits nothing else here).
            _ => Self {
                ports: [4, 4],
                checksum: 2,
                pseudo_header: family == Family::Ipv6,
                udp: false,
            },
        }
    }

    fn port(self, side: Side) -> usize {
        match side {
            Side::Source => self.ports[0],
            Side::Destination => self.ports[1],
        }
    }
}

/// Overwrites the bytes at `off` with `new` and returns the checksum delta of the change.
#[inline(always)]
fn replace<const N: usize>(
    buf: &mut [u8],
    off: usize,
    new: &[u8; N],
) -> Result<CsumDelta, RewriteError> {
    let field = buf
        .get_mut(off..)
        .and_then(<[u8]>::first_chunk_mut::<N>)
        .ok_or(RewriteError::FrameMismatch)?;
    let delta = CsumDelta::new().swap(field, new);
    *field = *new;
    Ok(delta)
}

fn write16(buf: &mut [u8], off: usize, value: u16) -> Result<(), RewriteError> {
    let field = buf
        .get_mut(off..)
        .and_then(<[u8]>::first_chunk_mut::<2>)
        .ok_or(RewriteError::FrameMismatch)?;
    *field = value.to_be_bytes();
    Ok(())
}

/// Applies `delta` to the checksum at `off`; returns the delta of the checksum field itself,
/// for a checksum that encloses this one (an ICMP error's, around a quoted packet).
#[inline(always)]
fn update_checksum(
    buf: &mut [u8],
    off: usize,
    delta: CsumDelta,
    udp: bool,
) -> Result<CsumDelta, RewriteError> {
    let field = buf
        .get_mut(off..)
        .and_then(<[u8]>::first_chunk_mut::<2>)
        .ok_or(RewriteError::FrameMismatch)?;
    let old = u16::from_be_bytes(*field);
    let mut new = delta.apply(old);
    // RFC 768: a computed UDP checksum of zero is sent as all ones.
    if udp && new == 0 {
        new = 0xFFFF;
    }
    *field = new.to_be_bytes();
    Ok(CsumDelta::new().swap16(old, new))
}
