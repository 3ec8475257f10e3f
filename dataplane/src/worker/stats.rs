//! A worker's counters: plain integers the worker owns and increments, published once per
//! loop into a cache-padded block of atomics that the admin side reads without ever making
//! the worker wait.

use crate::lb::decide::{Counters, DecideDrop};
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
    /// Packets dropped because their next hop was not resolved.
    pub no_next_hop: u64,
    /// Packets a verdict could not be applied to (a rewrite or refusal that did not fit).
    pub rewrite_failed: u64,
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

const IO_FIELDS: usize = 6;
const FIELDS: usize = 4 + DecideDrop::ALL.len() + DropReason::COUNT + IO_FIELDS;

/// The published copy of one worker's counters. One per worker, aligned to its own cache
/// lines so that workers never share a line.
#[derive(Debug)]
#[repr(align(128))]
pub struct WorkerStats {
    values: [AtomicU64; FIELDS],
}

impl Default for WorkerStats {
    fn default() -> Self {
        Self {
            values: core::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl WorkerStats {
    /// Publishes `counters` (called by the owning worker only).
    pub fn store(&self, counters: &WorkerCounters) {
        for (slot, value) in self.values.iter().zip(flatten(counters)) {
            // Relaxed: each counter is read on its own; no other memory depends on it.
            slot.store(value, Ordering::Relaxed);
        }
    }

    /// The counters as last published.
    #[must_use]
    pub fn load(&self) -> WorkerCounters {
        // Relaxed: see `store`.
        let v: [u64; FIELDS] = core::array::from_fn(|i| self.values[i].load(Ordering::Relaxed));
        let mut c = WorkerCounters::default();
        let d = &mut c.decide;
        d.forwarded = v[0];
        d.replied = v[1];
        d.rejected = v[2];
        d.passed = v[3];
        let mut i = 4;
        for slot in &mut d.dropped {
            *slot = v[i];
            i += 1;
        }
        for slot in &mut d.malformed {
            *slot = v[i];
            i += 1;
        }
        let io = &mut c.io;
        for slot in [
            &mut io.received,
            &mut io.transmitted,
            &mut io.tx_ring_full,
            &mut io.no_next_hop,
            &mut io.rewrite_failed,
            &mut io.busy_polls,
        ] {
            *slot = v[i];
            i += 1;
        }
        c
    }
}

fn flatten(c: &WorkerCounters) -> impl Iterator<Item = u64> + '_ {
    let d = &c.decide;
    let io = &c.io;
    [d.forwarded, d.replied, d.rejected, d.passed]
        .into_iter()
        .chain(d.dropped.iter().copied())
        .chain(d.malformed.iter().copied())
        .chain([
            io.received,
            io.transmitted,
            io.tx_ring_full,
            io.no_next_hop,
            io.rewrite_failed,
            io.busy_polls,
        ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_counters_read_back_field_for_field() {
        let mut c = WorkerCounters::default();
        c.decide.forwarded = 1;
        c.decide.replied = 2;
        c.decide.rejected = 3;
        c.decide.passed = 4;
        c.decide.dropped[2] = 5;
        c.decide.malformed[DropReason::COUNT - 1] = 6;
        c.io.received = 7;
        c.io.busy_polls = 8;
        c.io.no_next_hop = 9;
        let stats = WorkerStats::default();
        stats.store(&c);
        assert_eq!(stats.load(), c);
    }
}
