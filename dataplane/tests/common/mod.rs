//! Helpers shared by the packet tests: test addresses, the per-layer diff, pcap dumps.

#![allow(dead_code, reason = "each test binary uses a different subset")]

pub(crate) mod fixture;

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use xlb_dataplane::packet::builder::{pkt, PacketBuilder};
use xlb_dataplane::packet::{Layers, MacAddr};

pub(crate) const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub(crate) const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
pub(crate) const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 64, 1);
pub(crate) const SNAT: Ipv4Addr = Ipv4Addr::new(198, 18, 64, 100);
pub(crate) const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 2);

pub(crate) const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
pub(crate) const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0xfe);
pub(crate) const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0x40, 0, 0, 0, 1);
pub(crate) const BACKEND6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0x80, 0, 0, 0, 2);

pub(crate) const CLIENT_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
pub(crate) const NODE_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);
pub(crate) const NODE_OUT_MAC: MacAddr = MacAddr([2, 0, 0, 0, 1, 2]);
pub(crate) const BACKEND_MAC: MacAddr = MacAddr([2, 0, 0, 0, 2, 2]);

/// The frame most fixtures start from: a client's TCP SYN to the VIP.
pub(crate) fn tcp_client_to_vip() -> PacketBuilder {
    pkt().ipv4(CLIENT, VIP).tcp(40000, 80).syn()
}

/// A per-layer diff of two frames: equal lines are indented, differing ones marked - and +.
pub(crate) fn layer_diff(expected: &[u8], actual: &[u8]) -> String {
    let expected = Layers(expected).to_string();
    let actual = Layers(actual).to_string();
    let exp: Vec<&str> = expected.lines().collect();
    let act: Vec<&str> = actual.lines().collect();
    let mut out = String::new();
    for i in 0..exp.len().max(act.len()) {
        match (exp.get(i), act.get(i)) {
            (Some(e), Some(a)) if e == a => writeln!(out, "    {e}").unwrap(),
            (e, a) => {
                if let Some(e) = e {
                    writeln!(out, "  - {e}").unwrap();
                }
                if let Some(a) = a {
                    writeln!(out, "  + {a}").unwrap();
                }
            }
        }
    }
    if expected == actual {
        out.push_str("  (layers decode alike: the difference is in payload bytes)\n");
    }
    out
}

/// Writes frames to `$XLB_FIXTURE_PCAP_DIR/<name>.pcap` when that variable is set, so a
/// failing case can be opened in a packet analyser.
pub(crate) fn dump_pcap(name: &str, frames: &[&[u8]]) {
    let Some(dir) = std::env::var_os("XLB_FIXTURE_PCAP_DIR") else {
        return;
    };
    let mut bytes = Vec::new();
    // pcap global header: magic, version 2.4, zone, sigfigs, snaplen, LINKTYPE_ETHERNET.
    bytes.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    bytes.extend_from_slice(&2u16.to_le_bytes());
    bytes.extend_from_slice(&4u16.to_le_bytes());
    for word in [0u32, 0, 65535, 1] {
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    for frame in frames {
        let len = u32::try_from(frame.len()).unwrap();
        for word in [0, 0, len, len] {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        bytes.extend_from_slice(frame);
    }
    let file: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let path = std::path::Path::new(&dir).join(format!("{file}.pcap"));
    std::fs::write(&path, bytes).unwrap();
}

/// Whether two frames are equal but for checksum fields holding the two ones-complement zeros
/// (0x0000 and 0xFFFF), which every receiver treats alike (except UDP, whose rewrite never
/// produces 0x0000).
pub(crate) fn equal_up_to_checksum_zero(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            let start = i & !1;
            let pair = |f: &[u8]| f.get(start..start + 2).map(|w| [w[0], w[1]]);
            match (pair(a), pair(b)) {
                (Some([0, 0]), Some([0xff, 0xff])) | (Some([0xff, 0xff]), Some([0, 0])) => {
                    i = start + 2;
                    continue;
                }
                _ => return false,
            }
        }
        i += 1;
    }
    true
}

/// The XDP filter loaded into the kernel (attached nowhere), or `None` after saying why the
/// test is skipped (no root or CAP_BPF). As root it must load.
pub(crate) fn filter_or_skip() -> Option<xlb_dataplane::xsk::XdpFilter> {
    match xlb_dataplane::xsk::XdpFilter::load() {
        Ok(f) => Some(f),
        Err(e) => {
            let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
                s.lines()
                    .any(|l| l.starts_with("Uid:") && l.contains("\t0\t"))
            });
            assert!(!root, "as root the filter must load: {e}");
            eprintln!("SKIPPED: loading an XDP program needs root or CAP_BPF: {e}");
            None
        }
    }
}

/// Whether an SCTP packet's CRC32c is right, computed bit by bit from RFC 9260 appendix A
/// (reflected polynomial 0x82F63B78, stored least significant byte first), independently of
/// the dataplane's.
pub(crate) fn sctp_crc_is_valid(sctp: &[u8]) -> bool {
    let mut crc = !0u32;
    for (i, &byte) in sctp.iter().enumerate() {
        crc ^= u32::from(if (8..12).contains(&i) { 0 } else { byte });
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    sctp.get(8..12) == Some(&(!crc).to_le_bytes()[..])
}

/// Bytes from hexadecimal text (the fixtures other implementations printed).
pub(crate) fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}
