//! Encapsulation for direct server return to backends that are not on xlb's own segment
//! (Katran's design): the packet, unchanged, inside a new IP header from xlb to the backend —
//! IPv4 in IPv4 (protocol 4) or IPv6 in IPv6 (next header 41). The backend decapsulates (an
//! `ipip` or `ip6tnl` device holding the VIP) and answers the client from the VIP directly.
//!
//! The frame grows by the outer header: the packet is moved up within the frame buffer and the
//! header written in front of it, fresh (its checksum computed in full: 20 bytes).
//! [`overhead`] says by how much, so that the caller can check the path MTU first.

use super::checksum::checksum;
use super::parse::Parsed;
use super::rewrite::RewriteError;
use super::wire::{Family, IPV4_MIN_HEADER_LEN, IPV6_HEADER_LEN};

/// Hop limit of the outer header.
const TTL: u8 = 64;
/// IP protocol numbers of the inner packet.
const IPIP: u8 = 4;
const IPV6_IN_IPV6: u8 = 41;

/// How many bytes encapsulation adds to a packet of `family`.
#[must_use]
pub const fn overhead(family: Family) -> usize {
    match family {
        Family::Ipv4 => IPV4_MIN_HEADER_LEN,
        Family::Ipv6 => IPV6_HEADER_LEN,
    }
}

/// Encapsulates the IP packet of the frame in `buf[..frame_len]` (parsed as `parsed`, without
/// a VLAN tag) in an outer header from `from` to `to` (key form, the packet's family). The
/// outer IPv4 header copies the inner one's DSCP and don't-fragment bit; the outer IPv6
/// header its traffic class. Returns the frame's new length.
///
/// # Errors
/// [`RewriteError::FrameMismatch`] if `buf` has no room for the outer header or is not the
/// frame parsed.
pub fn encapsulate(
    buf: &mut [u8],
    frame_len: usize,
    parsed: &Parsed,
    from: &[u8; 16],
    to: &[u8; 16],
) -> Result<usize, RewriteError> {
    let mismatch = RewriteError::FrameMismatch;
    let l3 = usize::from(parsed.l3_offset);
    let end = usize::from(parsed.l3_end);
    if end > frame_len || l3 >= end {
        return Err(mismatch);
    }
    let family = parsed.key.family;
    let outer = overhead(family);
    let inner_len = end - l3;
    if buf.len() < end + outer {
        return Err(mismatch);
    }
    buf.copy_within(l3..end, l3 + outer);
    let inner = l3 + outer;
    match family {
        Family::Ipv4 => {
            let (tos, df) = (buf[inner + 1], buf[inner + 6] & 0x40);
            let total = u16::try_from(outer + inner_len).map_err(|_| mismatch)?;
            let header = buf.get_mut(l3..inner).ok_or(mismatch)?;
            header.fill(0);
            header[0] = 0x45;
            header[1] = tos & 0xfc; // DSCP, not ECN
            header[2..4].copy_from_slice(&total.to_be_bytes());
            header[6] = df;
            header[8] = TTL;
            header[9] = IPIP;
            header[12..16].copy_from_slice(&from[..4]);
            header[16..20].copy_from_slice(&to[..4]);
            let csum = checksum(header);
            header[10..12].copy_from_slice(&csum.to_be_bytes());
        }
        Family::Ipv6 => {
            let class = [buf[inner], buf[inner + 1]];
            let plen = u16::try_from(inner_len).map_err(|_| mismatch)?;
            let header = buf.get_mut(l3..inner).ok_or(mismatch)?;
            header.fill(0);
            header[0] = 0x60 | (class[0] & 0x0f);
            header[1] = class[1] & 0xf0;
            header[4..6].copy_from_slice(&plen.to_be_bytes());
            header[6] = IPV6_IN_IPV6;
            header[7] = TTL;
            header[8..24].copy_from_slice(from);
            header[24..40].copy_from_slice(to);
        }
    }
    Ok(end + outer)
}
