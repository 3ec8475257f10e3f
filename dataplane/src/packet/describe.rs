//! A human-readable decode of a frame, one line per layer, with every checksum verified.
//!
//! Used by failing fixture tests (a per-layer diff instead of hex) and by `xlb decode`. It is
//! not on the packet path: it reads every byte it reports, and checks L4 checksums in full.

use core::fmt;
use core::net::{Ipv4Addr, Ipv6Addr};

use super::checksum::{add_bytes, fold, pseudo_header_v4, pseudo_header_v6};
use super::parse::{icmp_proto, parse, ChecksumState, Class, Parsed};
use super::wire::{be16, Family, IpProto, MacAddr, TcpFlags, ETHERTYPE_VLAN};

/// Formats a frame layer by layer: `format!("{}", Layers(&frame))`.
pub struct Layers<'a>(pub &'a [u8]);

impl fmt::Display for Layers<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let frame = self.0;
        if let Some(eth) = frame.first_chunk::<14>() {
            let mac = |b: &[u8]| {
                let mut m = [0; 6];
                m.copy_from_slice(b);
                MacAddr(m)
            };
            write!(f, "eth   {} > {}", mac(&eth[6..12]), mac(&eth[..6]))?;
            if be16(frame, 12) == Some(ETHERTYPE_VLAN) {
                let tci = be16(frame, 14).unwrap_or(0);
                write!(f, " vlan {} prio {}", tci & 0x0fff, tci >> 13)?;
            }
        }
        match parse(frame) {
            Err(reason) => {
                writeln!(f, " ({} bytes)", frame.len())?;
                write!(f, "drop  {reason:?}")
            }
            Ok(p) => {
                write!(f, " ({} bytes)", frame.len())?;
                let packet = frame
                    .get(usize::from(p.l3_offset)..usize::from(p.l3_end))
                    .unwrap_or_default();
                if let Class::NotForUs(reason) = p.class {
                    if packet.is_empty() {
                        return write!(f, "\npass  {reason:?}");
                    }
                }
                ip_layers(f, &p, packet)?;
                let padding = frame.len().saturating_sub(usize::from(p.l3_end));
                if padding > 0 {
                    write!(f, "\npad   {padding} bytes")?;
                }
                Ok(())
            }
        }
    }
}

fn ip_layers(f: &mut fmt::Formatter<'_>, p: &Parsed, packet: &[u8]) -> fmt::Result {
    let l4 = usize::from(p.l4_offset - p.l3_offset);
    ip_line(f, p.key.family, packet, l4, "")?;
    match p.class {
        Class::NotForUs(reason) => write!(f, "\npass  {reason:?}"),
        Class::Fragment(frag) if !frag.first => {
            write!(f, "\nfrag  id {:#x} (non-first)", frag.id)?;
            write!(f, "\ndata  {} bytes", packet.len().saturating_sub(l4))
        }
        _ => {
            let segment = packet.get(l4..).unwrap_or_default();
            let proto = match p.class {
                Class::IcmpError(_) => icmp_proto(p.key.family),
                _ => p.key.proto,
            };
            let csum = l4_checksum_status(p, proto, packet, l4);
            transport_line(f, proto, segment, csum, "")?;
            if let Class::Fragment(frag) = p.class {
                write!(f, "\nfrag  id {:#x} (first)", frag.id)?;
            }
            if let Class::IcmpError(e) = p.class {
                write!(f, "\nerror {:?}", e.kind)?;
                let inner = usize::from(e.inner_l3_offset - p.l3_offset);
                let inner_l4 = usize::from(e.inner_l4_offset - e.inner_l3_offset);
                let quote = packet.get(inner..).unwrap_or_default();
                ip_line(f, p.key.family, quote, inner_l4, "  quoted ")?;
                let quoted_segment = quote.get(inner_l4..).unwrap_or_default();
                transport_line(f, p.key.proto, quoted_segment, "unverifiable", "  quoted ")?;
            }
            Ok(())
        }
    }
}

fn ip_line(
    f: &mut fmt::Formatter<'_>,
    family: Family,
    packet: &[u8],
    l4: usize,
    prefix: &str,
) -> fmt::Result {
    match family {
        Family::Ipv4 => {
            let Some(h) = packet.first_chunk::<20>() else {
                return write!(f, "\n{prefix}ipv4  truncated");
            };
            let header = packet.get(..l4).unwrap_or_default();
            let ok = if fold(add_bytes(0, header)) == 0xFFFF {
                "ok"
            } else {
                "BAD"
            };
            let frag = u16::from_be_bytes([h[6], h[7]]);
            write!(
                f,
                "\n{prefix}ipv4  {} > {} proto {} ttl {} id {:#06x} len {} hl {}{}{} off {} csum {:#06x} {ok}",
                Ipv4Addr::new(h[12], h[13], h[14], h[15]),
                Ipv4Addr::new(h[16], h[17], h[18], h[19]),
                IpProto(h[9]),
                h[8],
                u16::from_be_bytes([h[4], h[5]]),
                u16::from_be_bytes([h[2], h[3]]),
                (h[0] & 0x0f) * 4,
                if frag & 0x4000 != 0 { " DF" } else { "" },
                if frag & 0x2000 != 0 { " MF" } else { "" },
                (frag & 0x1fff) * 8,
                u16::from_be_bytes([h[10], h[11]]),
            )
        }
        Family::Ipv6 => {
            let Some(h) = packet.first_chunk::<40>() else {
                return write!(f, "\n{prefix}ipv6  truncated");
            };
            let mut src = [0; 16];
            src.copy_from_slice(&h[8..24]);
            let mut dst = [0; 16];
            dst.copy_from_slice(&h[24..40]);
            write!(
                f,
                "\n{prefix}ipv6  {} > {} next {} hlim {} plen {} ext {} bytes",
                Ipv6Addr::from(src),
                Ipv6Addr::from(dst),
                IpProto(h[6]),
                h[7],
                u16::from_be_bytes([h[4], h[5]]),
                l4.saturating_sub(40),
            )
        }
    }
}

fn transport_line(
    f: &mut fmt::Formatter<'_>,
    proto: IpProto,
    seg: &[u8],
    csum: &str,
    prefix: &str,
) -> fmt::Result {
    let word = |off: usize| be16(seg, off).unwrap_or(0);
    let long = |off: usize| u32::from(word(off)) << 16 | u32::from(word(off + 2));
    match proto {
        IpProto::TCP => {
            let hlen = usize::from(seg.get(12).map_or(0, |b| b >> 4)) * 4;
            write!(
                f,
                "\n{prefix}tcp   {} > {} [{}] seq {} ack {} win {} hl {} csum {:#06x} {csum}",
                word(0),
                word(2),
                TcpFlags(seg.get(13).copied().unwrap_or(0)),
                long(4),
                long(8),
                word(14),
                hlen,
                word(16),
            )?;
            payload_line(f, seg.len().saturating_sub(hlen), prefix)
        }
        IpProto::SCTP => {
            write!(
                f,
                "\n{prefix}sctp  {} > {} tag {:#010x} crc32c {:#010x} {csum}",
                word(0),
                word(2),
                long(4),
                seg.get(8..12)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map_or(0, u32::from_le_bytes),
            )?;
            payload_line(f, seg.len().saturating_sub(12), prefix)
        }
        IpProto::UDP => {
            write!(
                f,
                "\n{prefix}udp   {} > {} len {} csum {:#06x} {csum}",
                word(0),
                word(2),
                word(4),
                word(6),
            )?;
            payload_line(f, seg.len().saturating_sub(8), prefix)
        }
        _ => {
            write!(
                f,
                "\n{prefix}{:<5} type {} code {} rest {:#010x} csum {:#06x} {csum}",
                proto.to_string(),
                seg.first().copied().unwrap_or(0),
                seg.get(1).copied().unwrap_or(0),
                long(4),
                word(2),
            )?;
            payload_line(f, seg.len().saturating_sub(8), prefix)
        }
    }
}

fn payload_line(f: &mut fmt::Formatter<'_>, len: usize, prefix: &str) -> fmt::Result {
    if prefix.is_empty() {
        write!(f, "\ndata  {len} bytes")
    } else {
        Ok(())
    }
}

/// Verifies the transport checksum of a whole (non-fragment) packet.
fn l4_checksum_status(p: &Parsed, proto: IpProto, packet: &[u8], l4: usize) -> &'static str {
    if matches!(p.class, Class::Fragment(_)) {
        return "unverifiable";
    }
    match p.checksum {
        ChecksumState::Absent => return "none",
        ChecksumState::PseudoHeaderOnly => return "partial",
        ChecksumState::Complete => {}
    }
    let segment = packet.get(l4..).unwrap_or_default();
    if proto == IpProto::SCTP {
        let field = segment.get(8..12).and_then(|b| <[u8; 4]>::try_from(b).ok());
        return match (super::rewrite::sctp_crc(segment), field) {
            (Some(crc), Some(field)) if crc == u32::from_le_bytes(field) => "ok",
            _ => "BAD",
        };
    }
    let segment = if proto == IpProto::UDP {
        let len = usize::from(be16(segment, 4).unwrap_or(0));
        segment.get(..len).unwrap_or(segment)
    } else {
        segment
    };
    let len = u16::try_from(segment.len()).unwrap_or(u16::MAX);
    let pseudo = match (p.key.family, proto) {
        (Family::Ipv4, IpProto::ICMP) => 0,
        (Family::Ipv4, proto) => {
            let addr = |off: usize| {
                let mut a = [0; 4];
                a.copy_from_slice(packet.get(off..off + 4).unwrap_or(&[0; 4]));
                a
            };
            pseudo_header_v4(addr(12), addr(16), proto.0, len)
        }
        (Family::Ipv6, proto) => {
            let addr = |off: usize| {
                let mut a = [0; 16];
                a.copy_from_slice(packet.get(off..off + 16).unwrap_or(&[0; 16]));
                a
            };
            pseudo_header_v6(&addr(8), &addr(24), proto.0, len.into())
        }
    };
    if fold(add_bytes(pseudo, segment)) == 0xFFFF {
        "ok"
    } else {
        "BAD"
    }
}
