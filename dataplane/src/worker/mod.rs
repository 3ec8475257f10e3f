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
//! line and no syscall; [`PacketIo::flush`] does at most the ring wakeups, once per loop, and
//! the sockets' kernel counters are read once a second. The snapshot is loaded once per loop.
//!
//! A rewritten packet whose next hop is not resolved yet is held (`hold`) and the address
//! reported to the control thread ([`Reports`]), which resolves it and publishes new next
//! hops; the held frames leave as soon as the worker sees them. Drops and resets that an
//! operator asks about are reported as [`Notice`]s (at most one per kind per second) for the
//! control thread to log with their addresses. A frame that arrived with an 802.1Q tag
//! leaves untagged (xlb's ports are untagged links); refusals answer on the link they came
//! from, tag kept.
//!
//! A packet `decide()` says is not for xlb ([`Verdict::Pass`]) is counted and dropped: an
//! AF_XDP socket cannot hand a frame back to the kernel, so the XDP filter must not redirect
//! such packets in the first place; the `passed` counter shows when it does. On a node, where
//! xlb owns a veth pair whose far end is the kernel's (see [`Worker::handing_back`]), such a
//! packet is handed back to the kernel unchanged through it instead.

mod hold;
mod hops;
mod reports;
mod stats;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::lb::decide::{
    decide_in_batch, follow_first_fragment, DecideDrop, Env, Event, Mode, Refusal, Reverses,
    SnatPool, Verdict,
};
use crate::lb::flow::{FlowTable, Place, Second, Tick, TICKS_PER_SECOND};
use crate::lb::fragments::Fragments;
use crate::lb::hash::flow_hash;
use crate::lb::snapshot::Snapshot;
use crate::packet::{
    answer_too_big, encapsulate, overhead, parse, reject_with_port_unreachable,
    reject_with_tcp_reset, reset_in_place, set_destination, set_ethernet, set_source, strip_vlan,
    ChecksumState, Class, DropReason, Endpoint, Family, FlowKey, IpProto, Parsed, RewriteError,
};

use hold::{Held, HoldQueue};
pub use hold::{HELD, HOLD_SECONDS, PER_ADDRESS};
pub use hops::{prefix_matches, NextHop, NextHops, Route};
pub use reports::{Notice, NoticeKind, Reports};
pub use stats::{IoCounters, SocketStats, WorkerCounters, WorkerStats};

/// Frames received per port per loop.
pub const BATCH: usize = 64;

/// Frame I/O for a worker: receive, transmit and give back frames on a set of ports that
/// share one frame pool.
pub trait PacketIo {
    /// A frame in the worker's hands: a token only the I/O makes (in `receive`), neither
    /// `Copy` nor `Clone`, which `transmit` and `recycle` consume, so that a frame can be
    /// neither given back twice nor made up.
    type Frame;

    /// How many ports there are (ports are numbered from 0).
    fn port_count(&self) -> usize;

    /// Appends up to `max` received frames of `port` to `into`; returns how many.
    fn receive(&mut self, port: usize, into: &mut Vec<Self::Frame>, max: usize) -> usize;

    /// Gives `f` the frame's whole buffer and its current length; `f` returns the frame's
    /// new length (at most the buffer's) and a result.
    fn with_frame<R>(
        &mut self,
        frame: &mut Self::Frame,
        f: impl FnOnce(&mut [u8], usize) -> (usize, R),
    ) -> R;

    /// Queues frames of `queue` for transmission on `port`, in order, as many as fit, taking
    /// them out of `queue`; returns how many. The frames that did not fit stay in `queue`.
    fn transmit(&mut self, port: usize, queue: &mut Vec<Self::Frame>) -> usize;

    /// Gives the frames of `frames` back to the pool, emptying it.
    fn recycle(&mut self, frames: &mut Vec<Self::Frame>);

    /// Once per loop: starts the transmission of what was queued, takes completed frames
    /// back and refills the receive side.
    fn flush(&mut self);

    /// Waits up to `timeout` for a port to have frames to receive (an idle worker's sleep).
    fn wait(&mut self, timeout: Duration);

    /// The kernel's counters of `port`'s socket, if it has a socket (one syscall: the worker
    /// asks once a second).
    fn socket_stats(&self, port: usize) -> Option<SocketStats>;
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

    /// Seconds and ticks since the start (ticks wrap; see [`Tick`]).
    #[must_use]
    pub fn now_and_tick(&self) -> (Second, Tick) {
        let elapsed = self.0.elapsed();
        let second = u32::try_from(elapsed.as_secs()).unwrap_or(u32::MAX);
        let ticks = elapsed.as_millis() * u128::from(TICKS_PER_SECOND) / 1000;
        (second, u16::try_from(ticks & 0xFFFF).unwrap_or(0))
    }
}

/// What one worker shares with the rest of the process.
#[derive(Clone, Debug)]
pub struct Shared {
    /// The published tables.
    pub tables: Arc<ArcSwap<Tables>>,
    /// The flow table of all workers.
    pub flows: Arc<FlowTable>,
    /// The time base.
    pub clock: Clock,
    /// Where unresolved next hops and notices are reported.
    pub reports: Arc<Reports>,
    /// The translations of fragmented datagrams, for their later fragments.
    pub fragments: Arc<Fragments>,
}

/// One worker's loop state.
pub struct Worker<F> {
    shared: Shared,
    snat: Option<SnatPool>,
    /// Where packets that are the kernel's go back to it (a node's link), if anywhere.
    kernel: Option<NextHop>,
    /// Direct server return: packets go to their backend unchanged.
    dsr: bool,
    /// dsr to routed backends: the outer header's source and the path's MTU.
    encap: Option<Encapsulation>,
    stats: Arc<WorkerStats>,
    counters: WorkerCounters,
    random: u64,
    rx: Vec<F>,
    /// Stage 1's result for each frame of the batch being processed.
    parsed: Vec<Result<(Parsed, u64), DropReason>>,
    /// Where each frame's new flow would be inserted, as the batch's prefetch chose.
    places: Vec<Option<Place>>,
    /// The reverse entries of the batch's new flows, recorded before it is sent.
    reverses: Reverses,
    tx: Vec<Vec<F>>,
    drops: Vec<F>,
    hold: HoldQueue<F>,
    /// Fragments that came before their first fragment.
    early: Vec<Early<F>>,
    /// Scratch for frames leaving the hold queue.
    released: Vec<Held<F>>,
    /// The tables, and the second, the held frames were last tried against.
    held_against: (usize, Second),
    /// The second each notice kind was last reported (at most one a second each).
    noticed: [Option<Second>; NoticeKind::COUNT],
    /// The second the socket counters were last read.
    sockets_read: Option<Second>,
}

/// Where a processed frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Out {
    Transmit(u16),
    /// Rewritten, but its next hop is not resolved yet.
    Hold(Family, [u8; 16]),
    /// A fragment that came before its datagram's first fragment: held a moment.
    Early,
    Drop,
}

/// A fragment held until its datagram's first fragment shows the translation.
struct Early<F> {
    frame: F,
    parsed: Parsed,
    hash: u64,
    ingress: u16,
    since: Second,
}

/// dsr to routed backends: each packet in an outer IP header from xlb to its backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encapsulation {
    /// The outer source of IPv4 packets (key form), if any.
    pub ipv4: Option<[u8; 16]>,
    /// The outer source of IPv6 packets (key form), if any.
    pub ipv6: Option<[u8; 16]>,
    /// The largest IP packet the path to the backends takes, outer header included.
    pub mtu: u16,
}

impl Encapsulation {
    fn source(&self, family: Family) -> Option<[u8; 16]> {
        match family {
            Family::Ipv4 => self.ipv4,
            Family::Ipv6 => self.ipv6,
        }
    }
}

/// Fragments held per worker for their first fragment, at most; and for how long.
pub const EARLY_FRAGMENTS: usize = 64;
const EARLY_SECONDS: Second = 1;

impl<F> Worker<F> {
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
            kernel: None,
            dsr: false,
            encap: None,
            stats,
            counters: WorkerCounters::default(),
            random: seed | 1,
            rx: Vec::with_capacity(BATCH),
            parsed: Vec::with_capacity(BATCH),
            places: Vec::with_capacity(BATCH),
            reverses: Reverses::with_capacity(BATCH),
            tx: (0..ports)
                .map(|_| Vec::with_capacity(BATCH * ports + HELD))
                .collect(),
            drops: Vec::with_capacity(BATCH * ports + HELD),
            hold: HoldQueue::new(),
            early: Vec::with_capacity(EARLY_FRAGMENTS),
            released: Vec::with_capacity(HELD),
            held_against: (0, 0),
            noticed: [None; NoticeKind::COUNT],
            sockets_read: None,
        }
    }

    /// The same worker handing packets that are the kernel's ([`Verdict::Pass`]) back to it
    /// through `kernel`: a node's link, whose peer the kernel receives on (as if from a
    /// neighbour), instead of dropping them.
    #[must_use]
    pub fn handing_back(mut self, kernel: NextHop) -> Self {
        self.kernel = Some(kernel);
        self
    }

    /// The same worker in direct-server-return mode ([`Mode::Dsr`]): packets go to their
    /// backend unchanged but for their Ethernet addresses (its SNAT pool, if any, unused).
    #[must_use]
    pub fn direct_server_return(mut self) -> Self {
        self.dsr = true;
        self
    }

    /// The same worker in direct-server-return mode with each packet encapsulated to its
    /// backend ([`crate::packet::encapsulate`]): backends routed, not on xlb's segment.
    #[must_use]
    pub fn encapsulating(mut self, encap: Encapsulation) -> Self {
        self.dsr = true;
        self.encap = Some(encap);
        self
    }

    /// One pass over every port: receives a batch on each, processes it, transmits and
    /// recycles, then flushes the I/O. Returns how many frames it received.
    pub fn poll<I: PacketIo<Frame = F>>(&mut self, io: &mut I) -> usize {
        let tables = self.shared.tables.load();
        let (now, tick) = self.shared.clock.now_and_tick();
        if !self.hold.is_empty() {
            self.release_held(io, &tables, now);
        }
        let mode = match &self.snat {
            _ if self.dsr => Mode::Dsr,
            Some(pool) => Mode::Snat(pool),
            None => Mode::Dnat,
        };
        let mut ctx = Context {
            tables: &tables,
            flows: &self.shared.flows,
            fragments: &self.shared.fragments,
            counters: &mut self.counters,
            reverses: &mut self.reverses,
            random: &mut self.random,
            mode,
            kernel: self.kernel,
            encap: self.encap,
            now,
            tick,
        };
        let mut reported = false;
        let ports = io.port_count().min(self.tx.len());
        let mut received = 0;
        for port in 0..ports {
            let n = io.receive(port, &mut self.rx, BATCH);
            received += n;
            let ingress = u16::try_from(port).unwrap_or(u16::MAX);
            // Stage 1: parse and hash every frame, and start fetching its flow buckets.
            self.parsed.clear();
            for frame in &mut self.rx {
                let slot = io.with_frame(frame, |buf, len| (len, classify(buf, len)));
                if let Ok((parsed, hash)) = &slot {
                    ctx.flows.prefetch(parsed.key.family, *hash);
                }
                self.parsed.push(slot);
            }
            // Stage 2: the buckets' tag lines have had time to arrive; fetch the matching
            // entries' bodies, or the one a new flow would take.
            self.places.clear();
            for slot in &self.parsed {
                self.places.push(match slot {
                    Ok((parsed, hash)) => ctx.flows.prefetch_entry(parsed.key.family, *hash, tick),
                    Err(_) => None,
                });
            }
            // Stage 2b: a probable new flow (no entry showed its tag) finds its Service and
            // fetches what its pick reads: in a large snapshot, misses the batch overlaps.
            for (slot, place) in self.parsed.iter().zip(&self.places) {
                if let (Ok((parsed, hash)), Some(_)) = (slot, place) {
                    tables.snapshot.prefetch_new_flow(&parsed.key, *hash);
                }
            }
            // Stage 3: decide, rewrite, pick the next hop.
            let slots = self.parsed.iter().zip(&self.places);
            for (mut frame, (slot, place)) in self.rx.drain(..).zip(slots) {
                let (out, notice) = match slot {
                    Ok((p, hash)) => io.with_frame(&mut frame, |buf, len| {
                        ctx.process(buf, len, *p, *hash, *place, ingress)
                    }),
                    Err(reason) => {
                        ctx.counters.decide.record_malformed(*reason);
                        (Out::Drop, None)
                    }
                };
                if let Some(notice) = notice {
                    reported |= notify(&self.shared.reports, &mut self.noticed, notice, now);
                }
                match out {
                    Out::Transmit(p) => match self.tx.get_mut(usize::from(p)) {
                        Some(queue) => queue.push(frame),
                        None => self.drops.push(frame),
                    },
                    Out::Hold(family, addr) => {
                        let (first, given_up) = self.hold.hold(frame, family, addr, now);
                        // The control thread resolves it and publishes new next hops.
                        if first {
                            reported |= self.shared.reports.unresolved(family, addr);
                        }
                        if let Some(frame) = given_up {
                            ctx.counters.io.no_next_hop += 1;
                            self.drops.push(frame);
                            let notice = unresolved_notice(family, addr);
                            reported |=
                                notify(&self.shared.reports, &mut self.noticed, notice, now);
                        }
                    }
                    Out::Early => match slot {
                        Ok((parsed, hash)) if self.early.len() < EARLY_FRAGMENTS => {
                            self.early.push(Early {
                                frame,
                                parsed: *parsed,
                                hash: *hash,
                                ingress,
                                since: now,
                            });
                        }
                        _ => {
                            ctx.counters.io.fragments_expired += 1;
                            self.drops.push(frame);
                        }
                    },
                    Out::Drop => self.drops.push(frame),
                }
            }
            // The batch's new flows' reverse entries, together (at most a batch of them, so
            // the vector sized at start never grows); before anything is sent, so that no
            // reply comes before its entry.
            ctx.reverses.record(&ctx.env());
        }
        if !self.early.is_empty() {
            release_early(
                &mut self.early,
                &mut self.tx,
                &mut self.drops,
                io,
                &mut ctx,
                now,
            );
        }
        // A fragment held for its first fragment follows that one's flow (it never starts
        // one), but whatever `decide()` left is recorded before the frames leave.
        ctx.reverses.record(&ctx.env());
        if reported {
            self.shared.reports.wake();
        }
        self.transmit_and_recycle(io);
        io.flush();
        if self.sockets_read != Some(now) {
            self.sockets_read = Some(now);
            for port in 0..ports {
                if let Some(s) = io.socket_stats(port) {
                    self.stats.store_socket(port, &s);
                }
            }
        }
        if received > 0 {
            self.counters.io.received += received as u64;
            self.counters.io.busy_polls += 1;
            self.stats.store(&self.counters);
        }
        received
    }

    /// Sends what was queued; what does not fit, and what was dropped, goes back to the pool.
    fn transmit_and_recycle<I: PacketIo<Frame = F>>(&mut self, io: &mut I) {
        for (port, queue) in self.tx.iter_mut().enumerate() {
            if queue.is_empty() {
                continue;
            }
            let sent = io.transmit(port, queue);
            self.counters.io.transmitted += sent as u64;
            self.counters.io.tx_ring_full += queue.len() as u64;
            self.drops.append(queue);
        }
        if !self.drops.is_empty() {
            io.recycle(&mut self.drops);
        }
    }

    /// Sends the held frames whose next hop is now known (tried when new tables were
    /// published, and once a second for the ones held too long).
    fn release_held<I: PacketIo<Frame = F>>(&mut self, io: &mut I, tables: &Tables, now: Second) {
        let against = (core::ptr::from_ref(tables) as usize, now);
        if against == self.held_against {
            return;
        }
        self.held_against = against;
        let dropped = self.drops.len();
        let mut last_given_up = None;
        self.hold.release(
            now,
            |family, addr| {
                let resolved = tables.hops.lookup(family, addr).is_some();
                if !resolved {
                    last_given_up = Some((family, *addr));
                }
                resolved
            },
            &mut self.released,
            &mut self.drops,
        );
        let given_up = self.drops.len() - dropped;
        self.counters.io.no_next_hop += given_up as u64;
        if let (true, Some((family, addr))) = (given_up > 0, last_given_up) {
            let notice = unresolved_notice(family, addr);
            if notify(&self.shared.reports, &mut self.noticed, notice, now) {
                self.shared.reports.wake();
            }
        }
        for mut held in self.released.drain(..) {
            let hop = tables.hops.lookup(held.family, &held.addr);
            let sent = hop.is_some_and(|hop| {
                io.with_frame(&mut held.frame, |buf, len| {
                    (len, set_ethernet(buf, hop.src_mac, hop.dst_mac).is_ok())
                })
            });
            match (
                hop,
                self.tx
                    .get_mut(usize::from(hop.map_or(u16::MAX, |h| h.port))),
            ) {
                (Some(_), Some(queue)) if sent => {
                    self.counters.io.held += 1;
                    queue.push(held.frame);
                }
                _ => {
                    self.counters.io.rewrite_failed += 1;
                    self.drops.push(held.frame);
                }
            }
        }
    }

    /// Polls until `stop` returns true, sleeping in [`PacketIo::wait`] when idle; then gives
    /// back every frame it still holds.
    pub fn run<I: PacketIo<Frame = F>>(&mut self, io: &mut I, mut stop: impl FnMut() -> bool) {
        let mut idle = 0u32;
        while !stop() {
            if self.poll(io) > 0 {
                idle = 0;
                continue;
            }
            idle = idle.saturating_add(1);
            // Spin a little for back-to-back batches, then sleep in the kernel until a frame
            // arrives so that an idle worker leaves its core to others; held frames are
            // retried at least every 10 ms.
            if idle > 64 {
                io.wait(Duration::from_millis(10));
            }
        }
        self.drops.extend(self.hold.drain());
        self.drops.extend(self.early.drain(..).map(|e| e.frame));
        io.recycle(&mut self.drops);
        self.stats.store(&self.counters);
    }

    /// The counters so far.
    #[must_use]
    pub fn counters(&self) -> &WorkerCounters {
        &self.counters
    }
}

/// Sends the held fragments whose first fragment has been seen since (on any worker), and
/// drops, counted, those held for [`EARLY_SECONDS`].
fn release_early<F, I: PacketIo<Frame = F>>(
    early: &mut Vec<Early<F>>,
    tx: &mut [Vec<F>],
    drops: &mut Vec<F>,
    io: &mut I,
    ctx: &mut Context<'_>,
    now: Second,
) {
    let mut i = 0;
    while i < early.len() {
        let held = &early[i];
        if !ctx.first_fragment_seen(&held.parsed) {
            if now.wrapping_sub(held.since) < EARLY_SECONDS {
                i += 1;
                continue;
            }
            ctx.counters.io.fragments_expired += 1;
            drops.push(early.swap_remove(i).frame);
            continue;
        }
        let Early {
            mut frame,
            parsed,
            hash,
            ingress,
            ..
        } = early.swap_remove(i);
        let (out, _) = io.with_frame(&mut frame, |buf, len| {
            ctx.process(buf, len, parsed, hash, None, ingress)
        });
        match out {
            Out::Transmit(port) => match tx.get_mut(usize::from(port)) {
                Some(queue) => queue.push(frame),
                None => drops.push(frame),
            },
            // Its next hop is unknown (the first fragment's is held too): given up.
            Out::Hold(..) | Out::Early | Out::Drop => {
                ctx.counters.io.no_next_hop += u64::from(matches!(out, Out::Hold(..)));
                drops.push(frame);
            }
        }
    }
}

/// The notice of frames to `addr` given up for want of a next hop.
#[cold]
fn unresolved_notice(family: Family, addr: [u8; 16]) -> Notice {
    Notice {
        kind: NoticeKind::NoNextHop,
        key: FlowKey::new(family, IpProto(0), ([0; 16], 0), (addr, 0)),
    }
}

/// Sends `notice` unless one of its kind went out this second. Returns whether it was sent.
#[cold]
fn notify(
    reports: &Reports,
    noticed: &mut [Option<Second>; NoticeKind::COUNT],
    notice: Notice,
    now: Second,
) -> bool {
    let last = &mut noticed[notice.kind.index()];
    if *last == Some(now) {
        return false;
    }
    *last = Some(now);
    reports.notice(notice)
}

impl<F> core::fmt::Debug for Worker<F> {
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
    fragments: &'a Fragments,
    counters: &'a mut WorkerCounters,
    reverses: &'a mut Reverses,
    random: &'a mut u64,
    mode: Mode<'a>,
    kernel: Option<NextHop>,
    encap: Option<Encapsulation>,
    now: Second,
    tick: Tick,
}

impl<'a> Context<'a> {
    /// Whether the first fragment of `parsed`'s datagram (a later fragment) has been seen.
    fn first_fragment_seen(&self, parsed: &Parsed) -> bool {
        follow_first_fragment(&self.env(), parsed).is_some()
    }

    /// What `decide()` reads, for this loop.
    fn env(&self) -> Env<'a> {
        let tables: &'a Tables = self.tables;
        Env {
            snapshot: &tables.snapshot,
            flows: self.flows,
            now: self.now,
            tick: self.tick,
            mode: self.mode,
            fragments: self.fragments,
        }
    }

    /// Decides and applies the verdict to the frame in `buf[..len]`, parsed as `parsed` with
    /// flow hash `hash` (and, if it starts a flow, the entry `place` the prefetch chose),
    /// which arrived on `ingress`. Returns the frame's new length, where it goes, and what to
    /// tell the control thread about it.
    #[inline]
    fn process(
        &mut self,
        buf: &mut [u8],
        len: usize,
        mut parsed: Parsed,
        hash: u64,
        place: Option<Place>,
        ingress: u16,
    ) -> (usize, (Out, Option<Notice>)) {
        if buf.len() < len {
            return self.failed(len);
        }
        let random = self.next_random();
        let untracked = self.counters.decide.events[Event::Untracked.index()];
        let verdict = decide_in_batch(
            &self.env(),
            &parsed,
            hash,
            place,
            random,
            &mut self.counters.decide,
            self.reverses,
        );
        self.counters.decide.record(&verdict);
        let notice = notice_of(&verdict, &parsed.key).or_else(|| {
            (self.counters.decide.events[Event::Untracked.index()] != untracked).then_some(Notice {
                kind: NoticeKind::TableFull,
                key: parsed.key,
            })
        });
        let mut len = len;
        let rewritten: Result<(), RewriteError> = match verdict {
            Verdict::Reject(_) => {
                let answer = if parsed.key.proto == IpProto::TCP {
                    reject_with_tcp_reset(&mut buf[..len], &parsed)
                } else {
                    reject_with_port_unreachable(buf, len, &parsed)
                };
                // The answer goes back out of the port it came in by (Ethernet swapped, any
                // VLAN tag kept: it answers on the link it came from).
                return match answer {
                    Ok(answer_len) => (answer_len, (Out::Transmit(ingress), notice)),
                    Err(_) => self.failed(len),
                };
            }
            Verdict::Pass => return self.hand_back(buf, len, &mut parsed, notice),
            Verdict::Drop(DecideDrop::FragmentBeforeFirst) => return (len, (Out::Early, notice)),
            Verdict::Drop(_) => return (len, (Out::Drop, notice)),
            // Everything else leaves by an untagged port.
            _ => strip_vlan(buf, len, &mut parsed).map(|stripped| len = stripped),
        };
        let frame = &mut buf[..len];
        let rewritten = rewritten.and_then(|()| match verdict {
            Verdict::Forward(to) => set_destination(frame, &mut parsed, &to),
            Verdict::Reply(from) => set_source(frame, &mut parsed, &from),
            Verdict::ForwardSnat { to, from } => set_destination(frame, &mut parsed, &to)
                .and_then(|()| set_source(frame, &mut parsed, &from)),
            Verdict::ReplySnat { from, to } => set_source(frame, &mut parsed, &from)
                .and_then(|()| set_destination(frame, &mut parsed, &to)),
            // The packet stays as it is; only its next hop is the backend's.
            Verdict::ForwardDsr(_) => finish_checksum(frame, &mut parsed),
            Verdict::ResetReply { from, to } => reset_in_place(frame, &mut parsed)
                .and_then(|reset_len| {
                    len = reset_len;
                    set_source(frame, &mut parsed, &from)
                })
                .and_then(|()| to.map_or(Ok(()), |to| set_destination(frame, &mut parsed, &to))),
            Verdict::Reject(_) | Verdict::Pass | Verdict::Drop(_) => Ok(()),
        });
        if rewritten.is_err() {
            return self.failed(len);
        }
        if let (Verdict::ForwardDsr(to), Some(encap)) = (verdict, self.encap) {
            match self.encapsulate(buf, len, &parsed, &to, encap, ingress) {
                Ok(grown) => len = grown,
                Err(answer) => return (answer.0, (answer.1, notice)),
            }
        }
        let key = &parsed.key;
        let towards = match verdict {
            Verdict::ForwardDsr(to) => *to.key_addr(),
            _ => key.dst_addr,
        };
        let Some(hop) = self.tables.hops.lookup(key.family, &towards) else {
            // Held until the control thread resolves it (or given up, counted and noticed).
            return (len, (Out::Hold(key.family, towards), notice));
        };
        if set_ethernet(&mut buf[..len], hop.src_mac, hop.dst_mac).is_err() {
            return self.failed(len);
        }
        (len, (Out::Transmit(hop.port), notice))
    }

    /// dsr to a routed backend: the packet in an outer header from xlb to `to`, if it fits
    /// the path's MTU. One that does not is answered with ICMP "too big" from the VIP (IPv6,
    /// and IPv4 with don't-fragment: the sender's path-MTU discovery) or dropped (IPv4 that
    /// may be fragmented: xlb does not fragment), counted either way. Returns the frame's new
    /// length, or where what is left of it goes.
    #[cold]
    fn encapsulate(
        &mut self,
        buf: &mut [u8],
        len: usize,
        parsed: &Parsed,
        to: &Endpoint,
        encap: Encapsulation,
        ingress: u16,
    ) -> Result<usize, (usize, Out)> {
        let family = parsed.key.family;
        let Some(from) = encap.source(family) else {
            self.counters.io.rewrite_failed += 1;
            return Err((len, Out::Drop));
        };
        let l3 = usize::from(parsed.l3_offset);
        let packet = usize::from(parsed.l3_end).saturating_sub(l3);
        let outer = overhead(family);
        if packet + outer > usize::from(encap.mtu) {
            self.counters.io.too_big += 1;
            let may_fragment =
                family == Family::Ipv4 && buf.get(l3 + 6).is_some_and(|flags| flags & 0x40 == 0);
            if may_fragment {
                return Err((len, Out::Drop));
            }
            let mtu = encap.mtu.saturating_sub(u16::try_from(outer).unwrap_or(0));
            return match answer_too_big(buf, len, parsed, mtu) {
                Ok(answer) => Err((answer, Out::Transmit(ingress))),
                Err(_) => Err((len, Out::Drop)),
            };
        }
        encapsulate(buf, len, parsed, &from, to.key_addr()).map_err(|_| {
            self.counters.io.rewrite_failed += 1;
            (len, Out::Drop)
        })
    }

    /// A packet that is the kernel's, unchanged: back to the kernel through the node's link,
    /// or dropped where there is none. A TCP or UDP checksum its sender left unfinished
    /// (offload) is finished first: the kernel that receives the frame from the link cannot
    /// know it is unfinished, and neither can the host it forwards it to.
    #[cold]
    fn hand_back(
        &mut self,
        buf: &mut [u8],
        len: usize,
        parsed: &mut Parsed,
        notice: Option<Notice>,
    ) -> (usize, (Out, Option<Notice>)) {
        let Some(hop) = self.kernel else {
            return (len, (Out::Drop, notice));
        };
        let frame = &mut buf[..len];
        if finish_checksum(frame, parsed).is_err() {
            return self.failed(len);
        }
        if set_ethernet(frame, hop.src_mac, hop.dst_mac).is_err() {
            return self.failed(len);
        }
        self.counters.io.handed_back += 1;
        (len, (Out::Transmit(hop.port), notice))
    }

    #[cold]
    fn failed(&mut self, len: usize) -> (usize, (Out, Option<Notice>)) {
        self.counters.io.rewrite_failed += 1;
        (len, (Out::Drop, None))
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

/// Finishes a TCP or UDP checksum its sender left unfinished (offload) in a packet that leaves
/// otherwise unchanged (handed back to the kernel, or forwarded in dsr mode): whoever receives
/// the frame next cannot know it is unfinished.
fn finish_checksum(frame: &mut [u8], parsed: &mut Parsed) -> Result<(), RewriteError> {
    if parsed.checksum == ChecksumState::PseudoHeaderOnly
        && matches!(parsed.class, Class::Ordinary)
        && (parsed.key.proto == IpProto::TCP || parsed.key.proto == IpProto::UDP)
    {
        // Rewriting the destination to itself finishes the checksum, changing nothing else.
        let key = &parsed.key;
        let same = Endpoint::from_key_form(key.family, key.dst_addr, key.dst_port);
        return set_destination(frame, parsed, &same);
    }
    Ok(())
}

/// What the logs should hear about a verdict.
#[inline]
fn notice_of(verdict: &Verdict, key: &FlowKey) -> Option<Notice> {
    let kind = match verdict {
        Verdict::ResetReply { .. } | Verdict::Reject(Refusal::BackendLeft) => {
            NoticeKind::BackendLeftReset
        }
        Verdict::Drop(DecideDrop::TableFull) => NoticeKind::TableFull,
        Verdict::Drop(DecideDrop::NoSnatPort) => NoticeKind::NoSnatPort,
        _ => return None,
    };
    Some(Notice { kind, key: *key })
}
