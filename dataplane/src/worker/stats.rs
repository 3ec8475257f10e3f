//! A worker's counters: plain integers the worker owns and increments, published once per
//! loop into a cache-padded block of atomics that the admin side reads without ever making
//! the worker wait.

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

/// The number of `u64`s in [`WorkerCounters`] (checked against [`flatten`] by a test).
const FIELDS: usize = 5 + DecideDrop::COUNT + DropReason::COUNT + Event::COUNT + IoCounters::FIELDS;

impl IoCounters {
    const FIELDS: usize = 6;
}

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
                rewrite_failed,
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
            rewrite_failed,
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
        let stats = WorkerStats::default();
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
        let stats = WorkerStats::default();
        stats.store(&c);
        assert_eq!(stats.load(), c);
    }
}
