//! xlb-pktgen: the traffic generator's frame streams.
//!
//! Layer: uses `xlb_dataplane::packet` and `xlb_dataplane::xsk`; knows nothing of the load
//! balancer. A [`Stream`] turns one template frame into a sequence of frames over a range of
//! flows — destinations (addresses × ports) fastest, then source ports, then source addresses
//! — by rewriting the template in place with the dataplane's incremental-checksum primitives,
//! so each frame costs a copy and a few additions, never a checksum over the payload. Few long
//! flows: a small range cycled; a new flow per packet: a range larger than the run.

use std::net::IpAddr;

use xlb_dataplane::packet::{
    parse, set_destination, set_source, DropReason, Endpoint, Parsed, RewriteError,
};

/// Which flows a stream cycles through, each range consecutive from the template's own
/// address or port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowRange {
    /// How many source addresses (at least 1).
    pub sources: u32,
    /// How many source ports (1 to 65 536 minus the template's port).
    pub ports: u32,
    /// How many destination addresses (at least 1).
    pub destinations: u32,
    /// How many destination ports (at least 1).
    pub dst_ports: u32,
}

impl FlowRange {
    /// `sources` addresses × `ports` source ports to one destination.
    #[must_use]
    pub fn sources(sources: u32, ports: u32) -> Self {
        Self {
            sources,
            ports,
            destinations: 1,
            dst_ports: 1,
        }
    }

    /// How many distinct flows the range holds.
    #[must_use]
    pub fn flows(&self) -> u64 {
        u64::from(self.sources)
            * u64::from(self.ports)
            * u64::from(self.destinations)
            * u64::from(self.dst_ports)
    }
}

/// Why a stream cannot be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamError {
    /// The template frame is malformed.
    BadTemplate(DropReason),
    /// The template frame is not a TCP, UDP or ICMP echo packet.
    NotTranslatable(RewriteError),
    /// The range is empty or runs past the last port or address.
    BadRange,
}

/// An endless sequence of frames over a [`FlowRange`].
#[derive(Clone, Debug)]
pub struct Stream {
    template: Vec<u8>,
    parsed: Parsed,
    src: (IpAddr, u16),
    dst: (IpAddr, u16),
    range: FlowRange,
    next: u64,
    step: u64,
}

fn addr_fits(base: IpAddr, count: u32) -> bool {
    match base {
        IpAddr::V4(a) => u64::from(a.to_bits()) + u64::from(count) <= 1 << 32,
        IpAddr::V6(a) => a.to_bits().checked_add(u128::from(count)).is_some(),
    }
}

fn addr_plus(base: IpAddr, step: u64) -> IpAddr {
    match base {
        IpAddr::V4(a) => {
            let bits = u64::from(a.to_bits()) + step;
            IpAddr::V4(u32::try_from(bits).unwrap_or(u32::MAX).into())
        }
        IpAddr::V6(a) => IpAddr::V6((a.to_bits() + u128::from(step)).into()),
    }
}

impl Stream {
    /// Makes a stream from a template frame.
    ///
    /// # Errors
    /// See [`StreamError`].
    pub fn new(template: Vec<u8>, range: FlowRange) -> Result<Self, StreamError> {
        let parsed = parse(&template).map_err(StreamError::BadTemplate)?;
        let src = (parsed.key.src_ip(), parsed.key.src_port);
        let dst = (parsed.key.dst_ip(), parsed.key.dst_port);
        let fits = u32::from(src.1) + range.ports <= 1 << 16
            && u32::from(dst.1) + range.dst_ports <= 1 << 16
            && addr_fits(src.0, range.sources)
            && addr_fits(dst.0, range.destinations);
        if range.flows() == 0 || !fits {
            return Err(StreamError::BadRange);
        }
        let stream = Self {
            template,
            parsed,
            src,
            dst,
            range,
            next: 0,
            step: 1,
        };
        // Prove once that the template can be rewritten, so `next_into` cannot fail.
        let mut probe = stream.template.clone();
        let mut parsed = stream.parsed;
        set_source(&mut probe, &mut parsed, &Endpoint::new(src.0, src.1))
            .and_then(|()| set_destination(&mut probe, &mut parsed, &Endpoint::new(dst.0, dst.1)))
            .map_err(StreamError::NotTranslatable)?;
        Ok(stream)
    }

    /// This stream's share when `of` senders split it: flows `index`, `index + of`, ...
    #[must_use]
    pub fn share(mut self, index: u64, of: u64) -> Self {
        self.next = index;
        self.step = of.max(1);
        self
    }

    /// The length of every frame of the stream.
    #[must_use]
    pub fn frame_len(&self) -> usize {
        self.template.len()
    }

    /// Writes the next frame into the front of `buf` and returns its length, or `None` if
    /// `buf` is shorter than [`Self::frame_len`].
    pub fn next_into(&mut self, buf: &mut [u8]) -> Option<usize> {
        let frame = buf.get_mut(..self.template.len())?;
        frame.copy_from_slice(&self.template);
        let r = &self.range;
        let mut index = self.next % r.flows();
        self.next = self.next.wrapping_add(self.step);
        let mut take = |n: u32| {
            let part = index % u64::from(n);
            index /= u64::from(n);
            part
        };
        let dst_addr = take(r.destinations);
        let dst_port = take(r.dst_ports);
        let src_port = take(r.ports);
        let src_addr = take(r.sources);
        let port = |base: u16, step: u64| base.wrapping_add(u16::try_from(step).unwrap_or(0));
        let mut parsed = self.parsed;
        // `new` proved the template rewritable and the ranges in bounds.
        let from = Endpoint::new(addr_plus(self.src.0, src_addr), port(self.src.1, src_port));
        let to = Endpoint::new(addr_plus(self.dst.0, dst_addr), port(self.dst.1, dst_port));
        set_source(frame, &mut parsed, &from).ok()?;
        if r.destinations > 1 || r.dst_ports > 1 {
            set_destination(frame, &mut parsed, &to).ok()?;
        }
        Some(frame.len())
    }
}

/// What `--latency` writes at the start of a UDP payload: when the frame was queued and which
/// frame of which sender it is, so that the receiver can measure latency and loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// Nanoseconds since the Unix epoch (both ends share the host's clock).
    pub sent_ns: u64,
    /// The sender's frame counter.
    pub seq: u32,
    /// Which sender (core index).
    pub sender: u16,
}

/// Marks a stamped payload.
const STAMP_MAGIC: u16 = 0x786c; // "xl"
/// Bytes a stamp takes at the start of the payload.
pub const STAMP_LEN: usize = 16;

impl Stamp {
    fn bytes(&self) -> [u8; STAMP_LEN] {
        let mut b = [0u8; STAMP_LEN];
        b[..8].copy_from_slice(&self.sent_ns.to_be_bytes());
        b[8..12].copy_from_slice(&self.seq.to_be_bytes());
        b[12..14].copy_from_slice(&self.sender.to_be_bytes());
        b[14..16].copy_from_slice(&STAMP_MAGIC.to_be_bytes());
        b
    }

    /// Writes the stamp into a UDP frame's payload and updates its checksum incrementally.
    /// Returns false (and leaves the frame alone) for a frame that is not UDP or is too short.
    pub fn write(&self, frame: &mut [u8]) -> bool {
        let Ok(parsed) = parse(frame) else {
            return false;
        };
        if parsed.key.proto != xlb_dataplane::packet::IpProto::UDP {
            return false;
        }
        let l4 = usize::from(parsed.l4_offset);
        let at = l4 + xlb_dataplane::packet::UDP_HEADER_LEN;
        let Some(old) = frame
            .get(at..at + STAMP_LEN)
            .and_then(|b| <[u8; STAMP_LEN]>::try_from(b).ok())
        else {
            return false;
        };
        let new = self.bytes();
        frame[at..at + STAMP_LEN].copy_from_slice(&new);
        let csum = u16::from_be_bytes([frame[l4 + 6], frame[l4 + 7]]);
        // IPv4 UDP without a checksum stays without one.
        if csum != 0 || parsed.key.family == xlb_dataplane::packet::Family::Ipv6 {
            let mut updated = xlb_dataplane::packet::CsumDelta::new()
                .swap(&old, &new)
                .apply(csum);
            if updated == 0 {
                updated = 0xFFFF; // a computed zero is sent as all ones (RFC 768)
            }
            frame[l4 + 6..l4 + 8].copy_from_slice(&updated.to_be_bytes());
        }
        true
    }

    /// Reads the stamp of a received UDP frame, if it has one.
    #[must_use]
    pub fn read(frame: &[u8]) -> Option<Self> {
        let parsed = parse(frame).ok()?;
        let at = usize::from(parsed.l4_offset) + xlb_dataplane::packet::UDP_HEADER_LEN;
        let b = frame.get(at..at + STAMP_LEN)?;
        if u16::from_be_bytes([b[14], b[15]]) != STAMP_MAGIC {
            return None;
        }
        Some(Self {
            sent_ns: u64::from_be_bytes(b[..8].try_into().ok()?),
            seq: u32::from_be_bytes(b[8..12].try_into().ok()?),
            sender: u16::from_be_bytes([b[12], b[13]]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xlb_dataplane::packet::builder::pkt;
    use xlb_dataplane::packet::Layers;

    fn template() -> Vec<u8> {
        pkt()
            .ipv4([198, 18, 0, 1].into(), [198, 18, 64, 1].into())
            .udp(10000, 53)
            .payload(&[0xab; 18])
            .build()
    }

    #[test]
    fn a_stream_walks_ports_then_addresses_and_wraps() {
        let mut stream = Stream::new(template(), FlowRange::sources(2, 3)).unwrap();
        let mut buf = [0; 128];
        let mut keys = Vec::new();
        for _ in 0..7 {
            let len = stream.next_into(&mut buf).unwrap();
            let frame = &buf[..len];
            assert!(
                !Layers(frame).to_string().contains("BAD"),
                "{}",
                Layers(frame)
            );
            let key = parse(frame).unwrap().key;
            keys.push(format!("{}:{}", key.src_ip(), key.src_port));
        }
        let want = [
            "198.18.0.1:10000",
            "198.18.0.1:10001",
            "198.18.0.1:10002",
            "198.18.0.2:10000",
            "198.18.0.2:10001",
            "198.18.0.2:10002",
            "198.18.0.1:10000",
        ];
        assert_eq!(keys, want);
    }

    #[test]
    fn a_range_past_the_last_port_is_refused() {
        let err = Stream::new(template(), FlowRange::sources(1, 60000)).unwrap_err();
        assert_eq!(err, StreamError::BadRange);
    }

    #[test]
    fn a_malformed_template_is_refused() {
        let err = Stream::new(vec![0; 10], FlowRange::sources(1, 1)).unwrap_err();
        assert_eq!(err, StreamError::BadTemplate(DropReason::EthernetTruncated));
    }

    #[test]
    fn a_short_buffer_gets_no_frame() {
        let mut stream = Stream::new(template(), FlowRange::sources(1, 1)).unwrap();
        assert_eq!(stream.next_into(&mut [0; 10]), None);
    }

    #[test]
    fn destinations_walk_fastest_and_shares_split_the_flows() {
        let range = FlowRange {
            sources: 1,
            ports: 2,
            destinations: 3,
            dst_ports: 1,
        };
        let keys = |mut stream: Stream, n: usize| -> Vec<String> {
            let mut buf = [0; 128];
            (0..n)
                .map(|_| {
                    let len = stream.next_into(&mut buf).unwrap();
                    assert!(!Layers(&buf[..len]).to_string().contains("BAD"));
                    let key = parse(&buf[..len]).unwrap().key;
                    format!("{}>{}", key.src_port, key.dst_ip())
                })
                .collect()
        };
        let all = keys(Stream::new(template(), range).unwrap(), 6);
        assert_eq!(
            all,
            [
                "10000>198.18.64.1",
                "10000>198.18.64.2",
                "10000>198.18.64.3",
                "10001>198.18.64.1",
                "10001>198.18.64.2",
                "10001>198.18.64.3"
            ]
        );
        let first = keys(Stream::new(template(), range).unwrap().share(0, 2), 3);
        let second = keys(Stream::new(template(), range).unwrap().share(1, 2), 3);
        let mut both: Vec<String> = first.into_iter().chain(second).collect();
        both.sort();
        let mut want = all.clone();
        want.sort();
        assert_eq!(both, want, "two shares cover the flows once");
    }

    #[test]
    fn a_stamp_reads_back_and_keeps_the_udp_checksum_valid() {
        for frame in [
            template(),
            pkt()
                .ipv6("2001:2::1".parse().unwrap(), "2001:2::2".parse().unwrap())
                .udp(1, 2)
                .payload(&[0; 32])
                .build(),
        ] {
            let mut frame = frame;
            let stamp = Stamp {
                sent_ns: 0x0123_4567_89ab_cdef,
                seq: 77,
                sender: 1,
            };
            assert!(stamp.write(&mut frame));
            assert_eq!(Stamp::read(&frame), Some(stamp));
            assert!(
                !Layers(&frame).to_string().contains("BAD"),
                "{}",
                Layers(&frame)
            );
        }
    }

    #[test]
    fn a_frame_without_a_stamp_reads_none() {
        assert_eq!(Stamp::read(&template()), None);
    }
}
