//! Answers that refuse a flow, built in place in the frame that asked: a TCP reset, or an
//! ICMP port unreachable for anything else; and the ICMP "too big" of path-MTU discovery. This is what a Service without a usable backend
//! answers when its policy is to reject (kube-proxy's behaviour): the client learns at once
//! instead of retrying into silence.
//!
//! The answer comes from the address the packet was sent to (the VIP), goes back to its
//! sender, and leaves on the link it came from (the Ethernet addresses are swapped; a VLAN
//! tag is kept). Headers are written fresh, so their checksums are computed in full: they
//! are a few dozen bytes, never the payload.

use super::checksum::{add_bytes, checksum, fold, pseudo_header_v4, pseudo_header_v6};
use super::parse::{ChecksumState, Class, Parsed};
use super::rewrite::RewriteError;
use super::wire::{
    Family, IpProto, TcpFlags, IPV4_MIN_HEADER_LEN, IPV6_HEADER_LEN, TCP_MIN_HEADER_LEN,
};

/// Hop limit of the answers.
const TTL: u8 = 64;
/// IPv6 errors quote as much of the offending packet as fits in the minimum MTU (RFC 4443
/// section 2.4 (c)).
const IPV6_MIN_MTU: usize = 1280;

/// Turns the TCP segment in `frame` into the reset that answers it (RFC 9293 section 3.10.7.1:
/// a segment with ACK gets `SEQ = SEG.ACK`; one without gets `ACK = SEG.SEQ + SEG.LEN` with
/// SYN and FIN counted). Returns the answer's length; the frame's bytes past it are unused.
///
/// # Errors
/// [`RewriteError::NotTranslatable`] if the packet is not TCP, [`RewriteError::FrameMismatch`]
/// if the frame is not the one parsed.
pub fn reject_with_tcp_reset(frame: &mut [u8], parsed: &Parsed) -> Result<usize, RewriteError> {
    let mismatch = RewriteError::FrameMismatch;
    if parsed.key.proto != IpProto::TCP {
        return Err(RewriteError::NotTranslatable);
    }
    let l3 = usize::from(parsed.l3_offset);
    let l4 = usize::from(parsed.l4_offset);
    let end = usize::from(parsed.l3_end);
    let tcp = frame.get(l4..end).ok_or(mismatch)?;
    let header = tcp.first_chunk::<TCP_MIN_HEADER_LEN>().ok_or(mismatch)?;
    let seq = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let ack = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
    let flags = TcpFlags(header[13]);
    let data_len = tcp.len().saturating_sub(usize::from(header[12] >> 4) * 4);
    let segment_len = u32::try_from(data_len).unwrap_or(u32::MAX)
        + u32::from(flags.contains(TcpFlags::SYN))
        + u32::from(flags.contains(TcpFlags::FIN));
    let (reset_seq, reset_ack, reset_flags) = if flags.contains(TcpFlags::ACK) {
        (ack, 0, TcpFlags::RST)
    } else {
        (
            0,
            seq.wrapping_add(segment_len),
            TcpFlags::RST | TcpFlags::ACK,
        )
    };
    let (src_port, dst_port) = (parsed.key.src_port, parsed.key.dst_port);

    let l4 = answer_ip_header(frame, parsed, IpProto::TCP, TCP_MIN_HEADER_LEN)?;
    let segment = frame.get_mut(l4..l4 + TCP_MIN_HEADER_LEN).ok_or(mismatch)?;
    segment.fill(0);
    segment[0..2].copy_from_slice(&dst_port.to_be_bytes());
    segment[2..4].copy_from_slice(&src_port.to_be_bytes());
    segment[4..8].copy_from_slice(&reset_seq.to_be_bytes());
    segment[8..12].copy_from_slice(&reset_ack.to_be_bytes());
    segment[12] = 5 << 4;
    segment[13] = reset_flags.0;
    finish_l4_checksum(frame, parsed.key.family, l3, l4, TCP_MIN_HEADER_LEN, 16)?;
    swap_ethernet(frame)?;
    Ok(l4 + TCP_MIN_HEADER_LEN)
}

/// Turns the TCP segment in `frame` into a reset travelling the same way, from the same
/// source to the same destination: its sequence and acknowledgment numbers kept (RFC 9293
/// section 3.10.7.4: a reset whose sequence number is the receiver's next expected one is
/// accepted at once, RFC 5961 section 3.2), its options and data dropped, its checksums
/// computed afresh. For a backend's reply of a flow whose backend left: the client stops
/// waiting at once. `parsed` is updated to describe the reset; the frame's bytes past the
/// returned length are unused.
///
/// # Errors
/// [`RewriteError::NotTranslatable`] if the packet is not an unfragmented TCP segment,
/// [`RewriteError::FrameMismatch`] if the frame is not the one parsed.
pub fn reset_in_place(frame: &mut [u8], parsed: &mut Parsed) -> Result<usize, RewriteError> {
    let mismatch = RewriteError::FrameMismatch;
    if parsed.key.proto != IpProto::TCP || parsed.class != Class::Ordinary {
        return Err(RewriteError::NotTranslatable);
    }
    let l3 = usize::from(parsed.l3_offset);
    let l4 = usize::from(parsed.l4_offset);
    let header = frame.get_mut(l4..l4 + TCP_MIN_HEADER_LEN).ok_or(mismatch)?;
    let flags = TcpFlags::RST.0 | (header[13] & TcpFlags::ACK.0);
    header[12] = 5 << 4;
    header[13] = flags;
    header[14..TCP_MIN_HEADER_LEN].fill(0); // window, checksum, urgent pointer
    let end = l4 + TCP_MIN_HEADER_LEN;
    let ip = frame.get_mut(l3..l4).ok_or(mismatch)?;
    let ip_len = u16::try_from(end - l3).map_err(|_| mismatch)?;
    let segment_len = u16::try_from(TCP_MIN_HEADER_LEN).map_err(|_| mismatch)?;
    let key = &parsed.key;
    let pseudo = match key.family {
        Family::Ipv4 => {
            ip.get_mut(2..4)
                .ok_or(mismatch)?
                .copy_from_slice(&ip_len.to_be_bytes());
            ip.get_mut(10..12).ok_or(mismatch)?.fill(0);
            let csum = checksum(ip);
            ip[10..12].copy_from_slice(&csum.to_be_bytes());
            let v4 = |a: &[u8; 16]| [a[0], a[1], a[2], a[3]];
            pseudo_header_v4(v4(&key.src_addr), v4(&key.dst_addr), 6, segment_len)
        }
        Family::Ipv6 => {
            let payload = ip_len
                .checked_sub(u16::try_from(IPV6_HEADER_LEN).map_err(|_| mismatch)?)
                .ok_or(mismatch)?;
            ip.get_mut(4..6)
                .ok_or(mismatch)?
                .copy_from_slice(&payload.to_be_bytes());
            pseudo_header_v6(&key.src_addr, &key.dst_addr, 6, segment_len.into())
        }
    };
    let segment = frame.get_mut(l4..end).ok_or(mismatch)?;
    let csum = !fold(add_bytes(pseudo, segment));
    segment[16..18].copy_from_slice(&csum.to_be_bytes());
    parsed.l3_end = u16::try_from(end).map_err(|_| mismatch)?;
    parsed.tcp_flags = TcpFlags(flags);
    parsed.checksum = ChecksumState::Complete;
    Ok(end)
}

/// Turns the packet in `buf[..frame_len]` into an ICMP (or ICMPv6) port unreachable sent
/// back to its sender, quoting the packet's IP header and first 8 payload bytes (IPv4, RFC
/// 792) or as much of it as fits in 1280 bytes (IPv6). `buf` is the whole frame buffer: the
/// answer is longer than the headers it quotes. Returns the answer's length.
///
/// # Errors
/// [`RewriteError::FrameMismatch`] if `buf` has no room for the answer or is not the frame
/// parsed.
pub fn reject_with_port_unreachable(
    buf: &mut [u8],
    frame_len: usize,
    parsed: &Parsed,
) -> Result<usize, RewriteError> {
    let (ty, code) = match parsed.key.family {
        Family::Ipv4 => (3, 3),
        Family::Ipv6 => (1, 4),
    };
    icmp_error_answer(buf, frame_len, parsed, [ty, code], [0; 4])
}

/// Turns the packet in `buf[..frame_len]` into the ICMP "fragmentation needed" (IPv4, RFC 1191)
/// or ICMPv6 "packet too big" (RFC 4443) that tells its sender the path takes packets of at
/// most `mtu` bytes, from the address it was sent to (path-MTU discovery of a flow whose
/// packets xlb must make larger). Returns the answer's length.
///
/// # Errors
/// As [`reject_with_port_unreachable`].
pub fn answer_too_big(
    buf: &mut [u8],
    frame_len: usize,
    parsed: &Parsed,
    mtu: u16,
) -> Result<usize, RewriteError> {
    match parsed.key.family {
        Family::Ipv4 => {
            let [hi, lo] = mtu.to_be_bytes();
            icmp_error_answer(buf, frame_len, parsed, [3, 4], [0, 0, hi, lo])
        }
        Family::Ipv6 => {
            icmp_error_answer(buf, frame_len, parsed, [2, 0], u32::from(mtu).to_be_bytes())
        }
    }
}

/// An ICMP error of `kind` (type, code) with the 4 bytes `rest` after its checksum, quoting
/// the packet, sent back to its sender.
fn icmp_error_answer(
    buf: &mut [u8],
    frame_len: usize,
    parsed: &Parsed,
    [ty, code]: [u8; 2],
    rest: [u8; 4],
) -> Result<usize, RewriteError> {
    let mismatch = RewriteError::FrameMismatch;
    let l3 = usize::from(parsed.l3_offset);
    let end = usize::from(parsed.l3_end).min(frame_len);
    let family = parsed.key.family;
    let (ip_len, icmp_proto) = match family {
        Family::Ipv4 => (IPV4_MIN_HEADER_LEN, IpProto::ICMP),
        Family::Ipv6 => (IPV6_HEADER_LEN, IpProto::ICMPV6),
    };
    let available = end.saturating_sub(l3);
    let quote_len = match family {
        Family::Ipv4 => (usize::from(parsed.l4_offset).saturating_sub(l3) + 8).min(available),
        Family::Ipv6 => available.min(IPV6_MIN_MTU - IPV6_HEADER_LEN - 8),
    };
    let icmp = l3 + ip_len;
    let quote_at = icmp + 8;
    if buf.len() < quote_at + quote_len || quote_len == 0 {
        return Err(mismatch);
    }
    // Move the packet's beginning down to where the quote goes, before anything above it is
    // overwritten.
    buf.copy_within(l3..l3 + quote_len, quote_at);
    answer_ip_header(buf, parsed, icmp_proto, 8 + quote_len)?;
    let header = buf.get_mut(icmp..icmp + 8).ok_or(mismatch)?;
    header.copy_from_slice(&[ty, code, 0, 0, rest[0], rest[1], rest[2], rest[3]]);
    match family {
        Family::Ipv4 => {
            let message = buf.get_mut(icmp..quote_at + quote_len).ok_or(mismatch)?;
            let csum = checksum(message);
            message[2..4].copy_from_slice(&csum.to_be_bytes());
        }
        Family::Ipv6 => finish_l4_checksum(buf, family, l3, icmp, 8 + quote_len, 2)?,
    }
    swap_ethernet(buf)?;
    Ok(quote_at + quote_len)
}

/// Writes a fresh IP header at the packet's L3 offset, from the packet's destination back to
/// its source, for `payload` bytes of `proto`; returns the offset of the payload.
fn answer_ip_header(
    frame: &mut [u8],
    parsed: &Parsed,
    proto: IpProto,
    payload: usize,
) -> Result<usize, RewriteError> {
    let mismatch = RewriteError::FrameMismatch;
    let l3 = usize::from(parsed.l3_offset);
    let key = &parsed.key;
    match key.family {
        Family::Ipv4 => {
            let header = frame
                .get_mut(l3..l3 + IPV4_MIN_HEADER_LEN)
                .ok_or(mismatch)?;
            let total = u16::try_from(IPV4_MIN_HEADER_LEN + payload).map_err(|_| mismatch)?;
            header.fill(0);
            header[0] = 0x45;
            header[2..4].copy_from_slice(&total.to_be_bytes());
            header[6] = 0x40; // don't fragment
            header[8] = TTL;
            header[9] = proto.0;
            header[12..16].copy_from_slice(&key.dst_addr[..4]);
            header[16..20].copy_from_slice(&key.src_addr[..4]);
            let csum = checksum(header);
            header[10..12].copy_from_slice(&csum.to_be_bytes());
            Ok(l3 + IPV4_MIN_HEADER_LEN)
        }
        Family::Ipv6 => {
            let header = frame.get_mut(l3..l3 + IPV6_HEADER_LEN).ok_or(mismatch)?;
            let plen = u16::try_from(payload).map_err(|_| mismatch)?;
            header.fill(0);
            header[0] = 0x60;
            header[4..6].copy_from_slice(&plen.to_be_bytes());
            header[6] = proto.0;
            header[7] = TTL;
            header[8..24].copy_from_slice(&key.dst_addr);
            header[24..40].copy_from_slice(&key.src_addr);
            Ok(l3 + IPV6_HEADER_LEN)
        }
    }
}

/// Computes the checksum of the `len` bytes at `l4` (with the pseudo-header of the IP header
/// at `l3`) into the field at `l4 + field`.
fn finish_l4_checksum(
    frame: &mut [u8],
    family: Family,
    l3: usize,
    l4: usize,
    len: usize,
    field: usize,
) -> Result<(), RewriteError> {
    let mismatch = RewriteError::FrameMismatch;
    let ip = frame.get(l3..l4).ok_or(mismatch)?;
    let len16 = u16::try_from(len).map_err(|_| mismatch)?;
    let pseudo = match family {
        Family::Ipv4 => {
            let a = ip
                .get(12..16)
                .and_then(|a| <[u8; 4]>::try_from(a).ok())
                .ok_or(mismatch)?;
            let b = ip
                .get(16..20)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .ok_or(mismatch)?;
            pseudo_header_v4(a, b, ip[9], len16)
        }
        Family::Ipv6 => {
            let a = ip
                .get(8..24)
                .and_then(|a| <&[u8; 16]>::try_from(a).ok())
                .ok_or(mismatch)?;
            let b = ip
                .get(24..40)
                .and_then(|b| <&[u8; 16]>::try_from(b).ok())
                .ok_or(mismatch)?;
            pseudo_header_v6(a, b, ip[6], len16.into())
        }
    };
    let data = frame.get(l4..l4 + len).ok_or(mismatch)?;
    let csum = !fold(add_bytes(pseudo, data));
    frame
        .get_mut(l4 + field..l4 + field + 2)
        .ok_or(mismatch)?
        .copy_from_slice(&csum.to_be_bytes());
    Ok(())
}

fn swap_ethernet(frame: &mut [u8]) -> Result<(), RewriteError> {
    let addrs = frame
        .first_chunk_mut::<12>()
        .ok_or(RewriteError::FrameMismatch)?;
    let (dst, src) = addrs.split_at_mut(6);
    dst.swap_with_slice(src);
    Ok(())
}
