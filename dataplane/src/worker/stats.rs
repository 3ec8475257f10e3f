//! A worker's counters: plain integers the worker owns and increments, published once per
//! loop into a cache-padded block of atomics that the admin side reads without ever making
//! the worker wait; and the kernel's counters of its AF_XDP sockets, which the worker reads
//! once a second (one `getsockopt` per port) and publishes beside them.

use crate::lb::decide::{Counters, DecideDrop, Event};
use crate::packet::DropReason;
// std's atomics, not `crate::sync`'s: these counters are not part of the loom models.
use std::sync::atomic::{AtomicU64, Ordering};

/// What a worker counts beyond `decide()`'s verdicts: its I/O and the packets it had to drop
/// after a verdict.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoCounters {
    /// Frames received.
    pub received: u64,
    /// Frames queued for transmission.
    pub transmitted: u64,
    /// Frames dropped because a transmit ring was full.
    pub tx_ring_full: u64,
    /// Packets dropped because their next hop was not resolved in time (or the hold queue
    /// was full).
    pub no_next_hop: u64,
    /// Packets held until their next hop was resolved, then sent.
    pub held: u64,
    /// Packets a verdict could not be applied to (a rewrite or refusal that did not fit).
    pub rewrite_failed: u64,
    /// Packets that were the kernel's, handed back to it through a node's link.
    pub handed_back: u64,
    /// Fragments dropped because their datagram's first fragment did not come within a
    /// second (or too many waited).
    pub fragments_expired: u64,
    /// Packets too big for the path once encapsulated (dsr to routed backends): answered
    /// with ICMP "too big", or dropped when IPv4 may fragment them.
    pub too_big: u64,
    /// Loop iterations that found work.
    pub busy_polls: u64,
}

/// Everything a worker counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerCounters {
    /// Verdicts and drop reasons.
    pub decide: Counters,
    /// I/O.
    pub io: IoCounters,
}

/// The number of `u64`s in [`WorkerCounters`] (checked against [`flatten`] by a test).
const FIELDS: usize = 5 + DecideDrop::COUNT + DropReason::COUNT + Event::COUNT + IoCounters::FIELDS;

impl IoCounters {
    const FIELDS: usize = 10;
}

/// The kernel's counters of one AF_XDP socket (`XDP_STATISTICS`, `struct xdp_statistics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketStats {
    /// Frames dropped for reasons other than a full ring or an invalid descriptor.
    pub rx_dropped: u64,
    /// Invalid descriptors on the receive side.
    pub rx_invalid_descs: u64,
    /// Frames dropped because the receive ring was full: the worker did not keep up.
    pub rx_ring_full: u64,
    /// Times the fill ring was empty when the kernel needed a frame.
    pub rx_fill_ring_empty_descs: u64,
    /// Invalid descriptors on the transmit ring.
    pub tx_invalid_descs: u64,
    /// Times the kernel found the transmit ring empty when woken.
    pub tx_ring_empty_descs: u64,
}

impl SocketStats {
    /// The counters with their Prometheus names (without the `xlb_socket_` prefix).
    #[must_use]
    pub fn named(&self) -> [(&'static str, u64); 6] {
        [
            ("rx_dropped", self.rx_dropped),
            ("rx_invalid_descs", self.rx_invalid_descs),
            ("rx_ring_full", self.rx_ring_full),
            ("rx_fill_ring_empty_descs", self.rx_fill_ring_empty_descs),
            ("tx_invalid_descs", self.tx_invalid_descs),
            ("tx_ring_empty_descs", self.tx_ring_empty_descs),
        ]
    }
}

/// The published copy of one worker's counters. One per worker, aligned to its own cache
/// lines so that workers never share a line.
#[derive(Debug)]
#[repr(align(128))]
pub struct WorkerStats {
    values: [AtomicU64; FIELDS],
    /// Per port, the socket counters in [`SocketStats::named`] order.
    sockets: Box<[[AtomicU64; 6]]>,
}

impl WorkerStats {
    /// Counters for a worker with `ports` ports.
    #[must_use]
    pub fn new(ports: usize) -> Self {
        Self {
            values: core::array::from_fn(|_| AtomicU64::new(0)),
            sockets: (0..ports)
                .map(|_| core::array::from_fn(|_| AtomicU64::new(0)))
                .collect(),
        }
    }

    /// Publishes the socket counters of `port` (called by the owning worker only).
    pub fn store_socket(&self, port: usize, stats: &SocketStats) {
        if let Some(slots) = self.sockets.get(port) {
            for (slot, (_, value)) in slots.iter().zip(stats.named()) {
                // Relaxed: see `store`.
                slot.store(value, Ordering::Relaxed);
            }
        }
    }

    /// The socket counters of each port, as last published.
    #[must_use]
    pub fn sockets(&self) -> Vec<SocketStats> {
        self.sockets
            .iter()
            .map(|slots| {
                // Relaxed: see `store`.
                let v: [u64; 6] = core::array::from_fn(|i| slots[i].load(Ordering::Relaxed));
                SocketStats {
                    rx_dropped: v[0],
                    rx_invalid_descs: v[1],
                    rx_ring_full: v[2],
                    rx_fill_ring_empty_descs: v[3],
                    tx_invalid_descs: v[4],
                    tx_ring_empty_descs: v[5],
                }
            })
            .collect()
    }

    /// Publishes `counters` (called by the owning worker only).
    pub fn store(&self, counters: &WorkerCounters) {
        let mut values = [0; FIELDS];
        flatten(counters, &mut values);
        for (slot, value) in self.values.iter().zip(values) {
            // Relaxed: each counter is read on its own; no other memory depends on it.
            slot.store(value, Ordering::Relaxed);
        }
    }

    /// The counters as last published.
    #[must_use]
    pub fn load(&self) -> WorkerCounters {
        // Relaxed: see `store`.
        let values: [u64; FIELDS] =
            core::array::from_fn(|i| self.values[i].load(Ordering::Relaxed));
        let mut c = WorkerCounters::default();
        for (slot, value) in fields(&mut c).zip(values) {
            *slot = value;
        }
        c
    }
}

/// Every counter of `c`, in one fixed order. The struct patterns name every field (no `..`),
/// so a counter added to [`Counters`] or [`IoCounters`] does not compile until it is listed
/// here, and the arrays indexed by reason follow their enums by construction.
fn fields(c: &mut WorkerCounters) -> impl Iterator<Item = &mut u64> {
    let WorkerCounters {
        decide:
            Counters {
                forwarded,
                replied,
                reset,
                rejected,
                passed,
                dropped,
                malformed,
                events,
            },
        io:
            IoCounters {
                received,
                transmitted,
                tx_ring_full,
                no_next_hop,
                held,
                rewrite_failed,
                handed_back,
                fragments_expired,
                too_big,
                busy_polls,
            },
    } = c;
    [forwarded, replied, reset, rejected, passed]
        .into_iter()
        .chain(dropped.iter_mut())
        .chain(malformed.iter_mut())
        .chain(events.iter_mut())
        .chain([
            received,
            transmitted,
            tx_ring_full,
            no_next_hop,
            held,
            rewrite_failed,
            handed_back,
            fragments_expired,
            too_big,
            busy_polls,
        ])
}

fn flatten(c: &WorkerCounters, out: &mut [u64; FIELDS]) {
    let mut copy = c.clone();
    for (slot, value) in out.iter_mut().zip(fields(&mut copy)) {
        *slot = *value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_has_its_own_published_slot() {
        let mut c = WorkerCounters::default();
        assert_eq!(fields(&mut c).count(), FIELDS);
        for (n, slot) in fields(&mut c).enumerate() {
            *slot = n as u64 + 1;
        }
        let stats = WorkerStats::new(1);
        stats.store(&c);
        assert_eq!(stats.load(), c);
    }

    #[test]
    fn published_counters_read_back_field_for_field() {
        let mut c = WorkerCounters::default();
        c.decide.forwarded = 1;
        c.decide.replied = 2;
        c.decide.rejected = 3;
        c.decide.passed = 4;
        c.decide.dropped[2] = 5;
        c.decide.malformed[DropReason::COUNT - 1] = 6;
        c.decide.events[Event::COUNT - 1] = 10;
        c.decide.reset = 11;
        c.io.received = 7;
        c.io.busy_polls = 8;
        c.io.no_next_hop = 9;
        let stats = WorkerStats::new(1);
        stats.store(&c);
        assert_eq!(stats.load(), c);
    }

    #[test]
    fn socket_counters_read_back_per_port() {
        let stats = WorkerStats::new(2);
        let s = SocketStats {
            rx_dropped: 1,
            rx_invalid_descs: 2,
            rx_ring_full: 3,
            rx_fill_ring_empty_descs: 4,
            tx_invalid_descs: 5,
            tx_ring_empty_descs: 6,
        };
        stats.store_socket(1, &s);
        stats.store_socket(7, &s);
        assert_eq!(stats.sockets(), vec![SocketStats::default(), s]);
    }
}
