//! xlb-pktgen: the traffic generator's frame streams.
//!
//! Layer: uses `xlb_dataplane::packet` (and, later, `xlb_dataplane::xsk`); knows nothing of
//! the load balancer. A [`Stream`] turns one template frame into a sequence of frames whose
//! source address and port walk a range of flows — few long flows or a new flow per packet —
//! by rewriting the template in place with the dataplane's incremental-checksum primitives,
//! so each frame costs a copy and a few additions, never a checksum over the payload.
//!
//! The AF_XDP sender and receiver, rates, sizes and latency arrive with the pktgen issue.

use std::net::IpAddr;

use xlb_dataplane::packet::{parse, set_source, DropReason, Endpoint, Parsed, RewriteError};

/// Which flows a stream cycles through: `sources` consecutive source addresses times
/// `ports` consecutive source ports, starting at the template's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowRange {
    /// How many source addresses (at least 1).
    pub sources: u32,
    /// How many source ports (1 to 65 536 minus the template's port).
    pub ports: u32,
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
    base_addr: IpAddr,
    base_port: u16,
    range: FlowRange,
    next: u64,
}

impl Stream {
    /// Makes a stream from a template frame.
    ///
    /// # Errors
    /// See [`StreamError`].
    pub fn new(template: Vec<u8>, range: FlowRange) -> Result<Self, StreamError> {
        let parsed = parse(&template).map_err(StreamError::BadTemplate)?;
        let base_addr = parsed.key.src_ip();
        let base_port = parsed.key.src_port;
        let ports_fit = u32::from(base_port) + range.ports <= 1 << 16;
        let addrs_fit = match base_addr {
            IpAddr::V4(a) => u64::from(a.to_bits()) + u64::from(range.sources) <= 1 << 32,
            IpAddr::V6(a) => a.to_bits().checked_add(u128::from(range.sources)).is_some(),
        };
        if range.sources == 0 || range.ports == 0 || !ports_fit || !addrs_fit {
            return Err(StreamError::BadRange);
        }
        let stream = Self {
            template,
            parsed,
            base_addr,
            base_port,
            range,
            next: 0,
        };
        // Prove once that the template can be rewritten, so `next_into` cannot fail.
        let mut probe = stream.template.clone();
        set_source(
            &mut probe,
            &mut stream.parsed.clone(),
            &Endpoint::new(base_addr, base_port),
        )
        .map_err(StreamError::NotTranslatable)?;
        Ok(stream)
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
        let flows = u64::from(self.range.sources) * u64::from(self.range.ports);
        let index = self.next % flows;
        self.next = self.next.wrapping_add(1);
        let port_step = u16::try_from(index % u64::from(self.range.ports)).unwrap_or(0);
        let addr_step = index / u64::from(self.range.ports);
        let addr = match self.base_addr {
            IpAddr::V4(a) => {
                let bits = u64::from(a.to_bits()) + addr_step;
                IpAddr::V4(u32::try_from(bits).unwrap_or(u32::MAX).into())
            }
            IpAddr::V6(a) => IpAddr::V6((a.to_bits() + u128::from(addr_step)).into()),
        };
        let mut parsed = self.parsed;
        // `new` proved the template rewritable and the range in bounds.
        let to = Endpoint::new(addr, self.base_port.wrapping_add(port_step));
        set_source(frame, &mut parsed, &to).ok()?;
        Some(frame.len())
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
        let mut stream = Stream::new(
            template(),
            FlowRange {
                sources: 2,
                ports: 3,
            },
        )
        .unwrap();
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
        let err = Stream::new(
            template(),
            FlowRange {
                sources: 1,
                ports: 60000,
            },
        )
        .unwrap_err();
        assert_eq!(err, StreamError::BadRange);
    }

    #[test]
    fn a_malformed_template_is_refused() {
        let err = Stream::new(
            vec![0; 10],
            FlowRange {
                sources: 1,
                ports: 1,
            },
        )
        .unwrap_err();
        assert_eq!(err, StreamError::BadTemplate(DropReason::EthernetTruncated));
    }

    #[test]
    fn a_short_buffer_gets_no_frame() {
        let mut stream = Stream::new(
            template(),
            FlowRange {
                sources: 1,
                ports: 1,
            },
        )
        .unwrap();
        assert_eq!(stream.next_into(&mut [0; 10]), None);
    }
}
