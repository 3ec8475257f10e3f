//! Offline frame tools: decode a frame given as hex, or apply NAT rewrites to it, with the
//! same parse and rewrite code the workers run.

use std::fmt::Write as _;
use std::net::SocketAddr;

use xlb_dataplane::packet::{
    parse, set_destination, set_ethernet, set_source, Endpoint, Layers, MacAddr,
};

/// An error in the user's input, phrased for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

/// The rewrites to apply, in the order destination, source, Ethernet.
#[derive(Debug, Clone, Default)]
pub struct Rewrites {
    /// New destination (DNAT).
    pub dst: Option<SocketAddr>,
    /// New source (SNAT or un-DNAT).
    pub src: Option<SocketAddr>,
    /// New Ethernet source and destination.
    pub eth: Option<(MacAddr, MacAddr)>,
}

/// Decodes hex (whitespace, `:` and `-` between digits are ignored).
///
/// # Errors
/// A message naming the first bad character, or an odd digit count.
pub fn frame_from_hex(text: &str) -> Result<Vec<u8>, InputError> {
    let digits: Vec<u8> = text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b':' && *b != b'-')
        .collect();
    if digits.len() % 2 != 0 {
        return Err(InputError(format!(
            "odd number of hex digits ({})",
            digits.len()
        )));
    }
    digits
        .chunks_exact(2)
        .map(|pair| {
            let text = std::str::from_utf8(pair).unwrap_or("??");
            u8::from_str_radix(text, 16)
                .map_err(|_| InputError(format!("'{text}' is not a hex byte")))
        })
        .collect()
}

/// Formats bytes as lowercase hex.
#[must_use]
pub fn to_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Parses a MAC address written as six colon-separated hex bytes.
///
/// # Errors
/// A message quoting the bad text.
pub fn parse_mac(text: &str) -> Result<MacAddr, InputError> {
    text.parse()
        .map_err(|e| InputError(format!("'{text}' is {e}")))
}

/// Describes a frame: its layers, then what the load balancer would see.
#[must_use]
pub fn decode(frame: &[u8]) -> String {
    let mut out = Layers(frame).to_string();
    if let Ok(p) = parse(frame) {
        let _ = write!(out, "\nclass {:?}\nflow  {}", p.class, p.key);
    }
    out
}

/// Applies `rewrites` and returns the rewritten frame.
///
/// # Errors
/// The frame is malformed or not translatable, or an address is of the wrong family.
pub fn rewrite(frame: &[u8], rewrites: &Rewrites) -> Result<Vec<u8>, InputError> {
    let mut out = frame.to_vec();
    let mut parsed = parse(frame).map_err(|r| InputError(format!("frame dropped: {r:?}")))?;
    let refused = |what: &str, e| InputError(format!("{what} refused: {e:?}"));
    if let Some(dst) = rewrites.dst {
        set_destination(&mut out, &mut parsed, &Endpoint::from(dst))
            .map_err(|e| refused("destination rewrite", e))?;
    }
    if let Some(src) = rewrites.src {
        set_source(&mut out, &mut parsed, &Endpoint::from(src))
            .map_err(|e| refused("source rewrite", e))?;
    }
    if let Some((src, dst)) = rewrites.eth {
        set_ethernet(&mut out, src, dst).map_err(|e| refused("ethernet rewrite", e))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use xlb_dataplane::packet::builder::{pkt, L4Checksum};

    const CLIENT: [u8; 4] = [198, 18, 0, 1];
    const VIP: [u8; 4] = [198, 18, 64, 1];
    const ROUTER: [u8; 4] = [198, 18, 0, 254];
    const BACKEND: [u8; 4] = [198, 18, 128, 2];

    /// The frames `make demo` translates, built here so that the committed hex cannot rot.
    fn sample_frames() -> Vec<(&'static str, Vec<u8>)> {
        let quote = pkt()
            .ipv4(CLIENT.into(), BACKEND.into())
            .dont_fragment()
            .tcp(40000, 8080)
            .ack()
            .payload(&[0; 1400])
            .ip_packet();
        vec![
            (
                "tcp-syn-to-vip",
                pkt()
                    .ipv4(CLIENT.into(), VIP.into())
                    .tcp(40000, 80)
                    .syn()
                    .build(),
            ),
            (
                "udp-partial-checksum",
                pkt()
                    .ipv4(CLIENT.into(), VIP.into())
                    .udp(5353, 53)
                    .payload(b"xlb demo query")
                    .l4_checksum(L4Checksum::PseudoHeaderOnly)
                    .build(),
            ),
            (
                "icmp-frag-needed",
                pkt()
                    .ipv4(ROUTER.into(), CLIENT.into())
                    .icmp(3, 4, [0, 0, 0x05, 0x78])
                    .payload(&quote[..68])
                    .build(),
            ),
        ]
    }

    #[test]
    fn demo_sample_frames_match_their_builders() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/frames");
        for (name, frame) in sample_frames() {
            let path = dir.join(format!("{name}.hex"));
            if std::env::var_os("XLB_WRITE_SAMPLES").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, to_hex(&frame) + "\n").unwrap();
            }
            let text = std::fs::read_to_string(&path).unwrap();
            assert_eq!(frame_from_hex(&text).unwrap(), frame, "{name}");
        }
    }

    #[test]
    fn hex_round_trips_and_bad_hex_is_an_error() {
        assert_eq!(frame_from_hex("0a:ff 10").unwrap(), vec![0x0a, 0xff, 0x10]);
        assert_eq!(to_hex(&[0x0a, 0xff]), "0aff");
        assert!(frame_from_hex("abc").unwrap_err().0.contains("odd"));
        assert!(frame_from_hex("zz").unwrap_err().0.contains("'zz'"));
    }

    #[test]
    fn mac_addresses_parse_and_bad_ones_are_errors() {
        assert_eq!(
            parse_mac("02:00:00:00:00:0a").unwrap(),
            MacAddr([2, 0, 0, 0, 0, 10])
        );
        assert!(parse_mac("02:00:00").is_err());
        assert!(parse_mac("02:00:00:00:00:zz").is_err());
    }

    #[test]
    fn rewrite_dnats_the_sample_syn_and_decode_shows_the_new_flow() {
        let frame = pkt()
            .ipv4(CLIENT.into(), VIP.into())
            .tcp(40000, 80)
            .syn()
            .build();
        let rewrites = Rewrites {
            dst: Some("198.18.128.2:8080".parse().unwrap()),
            ..Rewrites::default()
        };
        let out = rewrite(&frame, &rewrites).unwrap();
        let text = decode(&out);
        assert!(
            text.contains("flow  tcp 198.18.0.1:40000 -> 198.18.128.2:8080"),
            "{text}"
        );
        assert!(!text.contains("BAD"), "{text}");
    }

    #[test]
    fn rewrite_of_a_malformed_frame_is_an_error_naming_the_reason() {
        let err = rewrite(&[0; 10], &Rewrites::default()).unwrap_err();
        assert_eq!(err.0, "frame dropped: EthernetTruncated");
    }
}
