//! The worker: one pinned thread's poll loop over its ports.
//!
//! Owns: the batch loop (receive → parse → hash → `decide()` → rewrite → next hop →
//! transmit → recycle), the per-worker counters, and the [`PacketIo`] trait the loop is
//! generic over, so the same loop runs over AF_XDP rings ([`crate::xsk::XskIo`]) and over
//! in-memory rings in tests ([`crate::xsk::MemRing`]).
//!
//! Must not know: where snapshots come from (it reads whatever [`Tables`] were last
//! published), sockets or the kernel (only [`PacketIo`]), YAML or Kubernetes.
//!
//! Per packet there is no allocation (the batch vectors are sized at start), no lock, no log
//! line and no syscall; [`PacketIo::flush`] does at most the ring wakeups, once per loop.
//! The snapshot is loaded once per loop.
//!
//! A packet `decide()` says is not for xlb ([`Verdict::Pass`]) is counted and dropped: an
//! AF_XDP socket cannot hand a frame back to the kernel, so the XDP filter must not redirect
//! such packets in the first place; the `passed` counter shows when it does.

mod hops;
mod stats;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::lb::decide::{decide, Env, Mode, SnatPool, Verdict};
use crate::lb::flow::{FlowTable, Second};
use crate::lb::hash::flow_hash;
use crate::lb::snapshot::Snapshot;
use crate::packet::{
    parse, reject_with_port_unreachable, reject_with_tcp_reset, reset_in_place, set_destination,
    set_ethernet, set_source, DropReason, Family, IpProto, Parsed, RewriteError,
};

pub use hops::{prefix_matches, NextHop, NextHops, Route};
pub use stats::{IoCounters, WorkerCounters, WorkerStats};

/// Frames received per port per loop.
pub const BATCH: usize = 64;

/// Frame I/O for a worker: receive, transmit and give back frames on a set of ports that
/// share one frame pool.
pub trait PacketIo {
    /// A frame descriptor. It names a frame of the pool and carries its length.
    type Desc: Copy + Default;

    /// How many ports there are (ports are numbered from 0).
    fn port_count(&self) -> usize;

    /// Takes up to `descs.len()` received frames of `port`; returns how many.
    fn receive(&mut self, port: usize, descs: &mut [Self::Desc]) -> usize;

    /// Gives `f` the frame's whole buffer and its current length; `f` returns the frame's
    /// new length (at most the buffer's) and a result.
    fn with_frame<R>(
        &mut self,
        desc: &mut Self::Desc,
        f: impl FnOnce(&mut [u8], usize) -> (usize, R),
    ) -> R;

    /// Queues frames for transmission on `port`, in order, as many as fit; returns how many.
    /// The frames it did not take stay the caller's.
    fn transmit(&mut self, port: usize, descs: &[Self::Desc]) -> usize;

    /// Gives frames the worker no longer needs back to the pool.
    fn recycle(&mut self, descs: &[Self::Desc]);

    /// Once per loop: starts the transmission of what was queued, takes completed frames
    /// back and refills the receive side.
    fn flush(&mut self);

    /// Waits up to `timeout` for a port to have frames to receive (an idle worker's sleep).
    fn wait(&mut self, timeout: Duration);
}

/// What workers read: the snapshot and the next hops that go with it, published together.
#[derive(Debug)]
pub struct Tables {
    /// Services and backends.
    pub snapshot: Arc<Snapshot>,
    /// Next hops of the ports.
    pub hops: NextHops,
}

impl Tables {
    /// No Services, no next hops.
    #[must_use]
    pub fn empty() -> Self {
        Self {
            snapshot: Arc::new(Snapshot::default()),
            hops: NextHops::default(),
        }
    }
}

/// The time base shared by workers and the control thread: seconds since start, the unit of
/// the flow table's ages.
#[derive(Clone, Copy, Debug)]
pub struct Clock(Instant);

impl Clock {
    /// A clock starting now.
    #[must_use]
    pub fn start() -> Self {
        Self(Instant::now())
    }

    /// Seconds since the start (wrapping after 136 years).
    #[must_use]
    pub fn now(&self) -> Second {
        u32::try_from(self.0.elapsed().as_secs()).unwrap_or(u32::MAX)
    }
}

/// Addresses a worker found no next hop for, for the control thread to resolve. Bounded;
/// when full, further reports are dropped (the counter still counts the packets).
pub type Unresolved = crossbeam_queue::ArrayQueue<(Family, [u8; 16])>;

/// What one worker shares with the rest of the process.
#[derive(Clone, Debug)]
pub struct Shared {
    /// The published tables.
    pub tables: Arc<ArcSwap<Tables>>,
    /// The flow table of all workers.
    pub flows: Arc<FlowTable>,
    /// The time base.
    pub clock: Clock,
    /// Where unresolved next hops are reported.
    pub unresolved: Arc<Unresolved>,
}

/// One worker's loop state.
pub struct Worker<D> {
    shared: Shared,
    snat: Option<SnatPool>,
    stats: Arc<WorkerStats>,
    counters: WorkerCounters,
    random: u64,
    rx: Vec<D>,
    /// Stage 1's result for each frame of the batch being processed.
    parsed: Vec<Result<(Parsed, u64), DropReason>>,
    tx: Vec<Vec<D>>,
    drops: Vec<D>,
}

/// Where a processed frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Out {
    Transmit(u16),
    Drop,
}

impl<D: Copy + Default> Worker<D> {
    /// A worker over `ports` ports, translating sources with `snat` in snat mode (none: dnat
    /// mode), publishing its counters into `stats`. `seed` seeds its random scheduler.
    #[must_use]
    pub fn new(
        shared: Shared,
        ports: usize,
        snat: Option<SnatPool>,
        stats: Arc<WorkerStats>,
        seed: u64,
    ) -> Self {
        Self {
            shared,
            snat,
            stats,
            counters: WorkerCounters::default(),
            random: seed | 1,
            rx: vec![D::default(); BATCH],
            parsed: vec![Err(DropReason::EthernetTruncated); BATCH],
            tx: (0..ports)
                .map(|_| Vec::with_capacity(BATCH * ports))
                .collect(),
            drops: Vec::with_capacity(BATCH * ports),
        }
    }

    /// One pass over every port: receives a batch on each, processes it, transmits and
    /// recycles, then flushes the I/O. Returns how many frames it received.
    pub fn poll<I: PacketIo<Desc = D>>(&mut self, io: &mut I) -> usize {
        let tables = self.shared.tables.load();
        let now = self.shared.clock.now();
        let mode = match &self.snat {
            Some(pool) => Mode::Snat(pool),
            None => Mode::Dnat,
        };
        let mut ctx = Context {
            tables: &tables,
            flows: &self.shared.flows,
            unresolved: &self.shared.unresolved,
            counters: &mut self.counters,
            random: &mut self.random,
            mode,
            now,
        };
        let ports = io.port_count().min(self.tx.len());
        let mut received = 0;
        for port in 0..ports {
            let n = io.receive(port, &mut self.rx);
            received += n;
            let ingress = u16::try_from(port).unwrap_or(u16::MAX);
            let (descs, parsed) = (&mut self.rx[..n], &mut self.parsed[..n]);
            // Stage 1: parse and hash every frame, and start fetching its flow buckets.
            for (desc, slot) in descs.iter_mut().zip(parsed.iter_mut()) {
                *slot = io.with_frame(desc, |buf, len| (len, classify(buf, len)));
                if let Ok((_, hash)) = slot {
                    ctx.flows.prefetch(*hash);
                }
            }
            // Stage 2: the buckets' tag lines have had time to arrive; fetch the matching
            // entries' bodies.
            for (_, hash) in parsed.iter().flatten() {
                ctx.flows.prefetch_entry(*hash);
            }
            // Stage 3: decide, rewrite, pick the next hop.
            for (desc, slot) in descs.iter_mut().zip(parsed.iter()) {
                let out = match slot {
                    Ok((p, hash)) => {
                        io.with_frame(desc, |buf, len| ctx.process(buf, len, *p, *hash, ingress))
                    }
                    Err(reason) => {
                        ctx.counters.decide.record_malformed(*reason);
                        Out::Drop
                    }
                };
                match out {
                    Out::Transmit(p) => match self.tx.get_mut(usize::from(p)) {
                        Some(queue) => queue.push(*desc),
                        None => self.drops.push(*desc),
                    },
                    Out::Drop => self.drops.push(*desc),
                }
            }
        }
        for (port, queue) in self.tx.iter_mut().enumerate() {
            if queue.is_empty() {
                continue;
            }
            let sent = io.transmit(port, queue);
            self.counters.io.transmitted += sent as u64;
            if sent < queue.len() {
                self.counters.io.tx_ring_full += (queue.len() - sent) as u64;
                self.drops.extend_from_slice(&queue[sent..]);
            }
            queue.clear();
        }
        if !self.drops.is_empty() {
            io.recycle(&self.drops);
            self.drops.clear();
        }
        io.flush();
        if received > 0 {
            self.counters.io.received += received as u64;
            self.counters.io.busy_polls += 1;
            self.stats.store(&self.counters);
        }
        received
    }

    /// Polls until `stop` returns true, sleeping in [`PacketIo::wait`] when idle.
    pub fn run<I: PacketIo<Desc = D>>(&mut self, io: &mut I, mut stop: impl FnMut() -> bool) {
        let mut idle = 0u32;
        while !stop() {
            if self.poll(io) > 0 {
                idle = 0;
                continue;
            }
            idle = idle.saturating_add(1);
            // Spin a little for back-to-back batches, then sleep in the kernel until a frame
            // arrives so that an idle worker leaves its core to others.
            if idle > 64 {
                io.wait(Duration::from_millis(10));
            }
        }
        self.stats.store(&self.counters);
    }

    /// The counters so far.
    #[must_use]
    pub fn counters(&self) -> &WorkerCounters {
        &self.counters
    }
}

impl<D> core::fmt::Debug for Worker<D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Worker")
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// Stage 1 for one frame: its parse and flow hash, or why it is malformed.
#[inline]
fn classify(buf: &[u8], len: usize) -> Result<(Parsed, u64), DropReason> {
    let frame = buf.get(..len).ok_or(DropReason::EthernetTruncated)?;
    let parsed = parse(frame)?;
    let hash = flow_hash(&parsed.key);
    Ok((parsed, hash))
}

/// The per-loop view one packet is processed with.
struct Context<'a> {
    tables: &'a Tables,
    flows: &'a FlowTable,
    unresolved: &'a Unresolved,
    counters: &'a mut WorkerCounters,
    random: &'a mut u64,
    mode: Mode<'a>,
    now: Second,
}

impl Context<'_> {
    /// Decides and applies the verdict to the frame in `buf[..len]`, parsed as `parsed` with
    /// flow hash `hash`, which arrived on `ingress`. Returns the frame's new length and where
    /// it goes.
    #[inline]
    fn process(
        &mut self,
        buf: &mut [u8],
        len: usize,
        mut parsed: Parsed,
        hash: u64,
        ingress: u16,
    ) -> (usize, Out) {
        let Some(frame) = buf.get_mut(..len) else {
            return self.failed(len);
        };
        let random = self.next_random();
        let env = Env {
            snapshot: &self.tables.snapshot,
            flows: self.flows,
            now: self.now,
            mode: self.mode,
        };
        let verdict = decide(&env, &parsed, hash, random, &mut self.counters.decide);
        self.counters.decide.record(&verdict);
        let mut len = len;
        let rewritten: Result<(), RewriteError> = match verdict {
            Verdict::Forward(to) => set_destination(frame, &mut parsed, &to),
            Verdict::Reply(from) => set_source(frame, &mut parsed, &from),
            Verdict::ForwardSnat { to, from } => set_destination(frame, &mut parsed, &to)
                .and_then(|()| set_source(frame, &mut parsed, &from)),
            Verdict::ReplySnat { from, to } => set_source(frame, &mut parsed, &from)
                .and_then(|()| set_destination(frame, &mut parsed, &to)),
            Verdict::ResetReply { from, to } => reset_in_place(frame, &mut parsed)
                .and_then(|reset_len| {
                    len = reset_len;
                    set_source(frame, &mut parsed, &from)
                })
                .and_then(|()| to.map_or(Ok(()), |to| set_destination(frame, &mut parsed, &to))),
            Verdict::Reject(_) => {
                let answer = if parsed.key.proto == IpProto::TCP {
                    reject_with_tcp_reset(frame, &parsed)
                } else {
                    reject_with_port_unreachable(buf, len, &parsed)
                };
                // The answer goes back out of the port it came in by (Ethernet swapped).
                return match answer {
                    Ok(answer_len) => (answer_len, Out::Transmit(ingress)),
                    Err(_) => self.failed(len),
                };
            }
            Verdict::Pass | Verdict::Drop(_) => return (len, Out::Drop),
        };
        if rewritten.is_err() {
            return self.failed(len);
        }
        let key = &parsed.key;
        let Some(hop) = self.tables.hops.lookup(key.family, &key.dst_addr) else {
            self.counters.io.no_next_hop += 1;
            // Full: the control thread has plenty to resolve already; the counter counts.
            let _ = self.unresolved.push((key.family, key.dst_addr));
            return (len, Out::Drop);
        };
        if set_ethernet(frame, hop.src_mac, hop.dst_mac).is_err() {
            return self.failed(len);
        }
        (len, Out::Transmit(hop.port))
    }

    #[cold]
    fn failed(&mut self, len: usize) -> (usize, Out) {
        self.counters.io.rewrite_failed += 1;
        (len, Out::Drop)
    }

    /// xorshift64*: the random scheduler's numbers (not for anything secret).
    #[inline]
    fn next_random(&mut self) -> u64 {
        let mut x = *self.random;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *self.random = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}
