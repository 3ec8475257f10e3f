//! `decide()`: the one decision every packet needs, in pure code.
//!
//! From a snapshot, the flow table, a parsed packet and the time, it says what to do with the
//! packet: forward it to a backend, un-NAT a backend's reply, reset or reject, pass it to the
//! kernel, or drop it with a reason. It records new flows (both directions) and moves the ones
//! it sees through their states as conntrack does: a TCP flow is established only when the
//! client acknowledges the backend's answer (a SYN flood's half-open flows stay evictable), a
//! UDP flow when it goes on after its first reply.
//!
//! In the source-preserving `dnat` mode the destination becomes the backend, and replies, which
//! route back through xlb, get the VIP back as their source. In snat mode ([`Mode::Snat`]) the
//! source also becomes an xlb address and a port from the worker's [`SnatPool`], and replies
//! (to that address and port) are translated back to the VIP and the client, whom only the
//! forward entry knows. A pool may translate only some flows ([`Masquerade`]), as kube-proxy's
//! detect-local does: those of clients outside the cluster's prefixes, and hairpin flows (a
//! client whose pick is itself, which would otherwise answer itself directly); the others
//! keep their source as in dnat mode.
//!
//! What happens at the edges:
//! * A backend's packet that no flow explains (xlb restarted, or the flow was evicted, or the
//!   table was full) is recognised as a reply in dnat mode when its source is a backend of a
//!   Service and the Service's Maglev pick for the reverse flow is that backend — or, where the
//!   pick differs, when the backend serves exactly one Service port (counted apart). Its flow
//!   is recreated: a restart loses no connection in either direction. A backend of more than
//!   [`RECOGNISED_UP_TO`] Service ports is not tried, so that such a packet costs a bounded
//!   number of picks.
//! * A full table never locks new flows out: in dnat mode a new flow that cannot be recorded is
//!   forwarded to its pick (counted) and its replies are recognised as above; in snat mode,
//!   where only the table knows the client, it is dropped and counted.
//! * A flow whose backend has left the Service: a client's TCP segment is rejected with a reset,
//!   a backend's TCP reply (steered for a grace period after the removal) is turned into a
//!   reset towards the client, so the client learns at once instead of stalling; UDP and ICMP
//!   flows move to a newly picked backend.
//! * A SYN on a closing flow, or on a flow whose backend left, starts a new flow with a fresh
//!   pick (a client reusing its port), as conntrack does.
//! * A new flow from a martian source (unspecified, loopback, multicast, broadcast, the
//!   destination itself), or from outside a Service's allowed source ranges, is dropped and
//!   counted (flows already established are not re-checked, as with conntrack).
//!
//! Session affinity (`ClientIP`) sends a client's new flows to the backend of its previous
//! one while that is younger than the Service's timeout and the backend still takes new
//! flows; it works with every scheduler.
//!
//! Fragments: a datagram's first fragment (which carries the ports) is decided as any packet,
//! and its translation recorded in the shared [`Fragments`] table; its later fragments, which
//! carry no ports, repeat that translation (addresses only). A later fragment that arrives
//! before its first is dropped as [`DecideDrop::FragmentBeforeFirst`] (the worker holds it a
//! moment first, see `worker`).
//! A [`Verdict::Reject`] is answered with [`crate::packet::reject_with_tcp_reset`] or
//! [`crate::packet::reject_with_port_unreachable`], a [`Verdict::ResetReply`] with
//! [`crate::packet::reset_in_place`].

use core::num::NonZeroU32;

use crate::counted::counted_enum;
use crate::packet::{Class, Endpoint, Family, FlowKey, IpProto, Parsed, TcpFlags};

use super::flow::{
    EntryRef, FlowState, FlowTable, FlowValue, Hit, Insert, Place, Second, Tick, AFFINITY,
};
use super::fragments::{FragmentKey, Fragments};
use super::hash::flow_hash;
use super::snapshot::{Backend, BackendId, NoBackend, Service, ServiceId, ServiceKey, Snapshot};

/// What to do with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Rewrite the destination to this backend and send it on.
    Forward(Endpoint),
    /// dsr mode: send the packet unchanged to this backend (its Ethernet addresses aside):
    /// the backend holds the VIP itself and answers the client directly.
    ForwardDsr(Endpoint),
    /// A backend's reply: rewrite the source to this VIP and send it on.
    Reply(Endpoint),
    /// snat mode: rewrite the destination to the backend `to` and the source to `from` (an
    /// xlb address and port).
    ForwardSnat {
        /// The backend.
        to: Endpoint,
        /// The translated source.
        from: Endpoint,
    },
    /// snat mode: a backend's reply; rewrite the source to the VIP `from` and the destination
    /// to the client `to`.
    ReplySnat {
        /// The VIP.
        from: Endpoint,
        /// The client.
        to: Endpoint,
    },
    /// A backend's TCP reply of a flow whose backend has left its Service: turn it into a
    /// reset and send it to the client, from the VIP `from` (and in snat mode to the client
    /// `to`), so that the client stops waiting at once.
    ResetReply {
        /// The VIP.
        from: Endpoint,
        /// snat mode: the client; dnat mode: none (the destination is the client already).
        to: Option<Endpoint>,
    },
    /// Refuse: answer with a TCP reset or an ICMP port unreachable.
    Reject(Refusal),
    /// Not for the load balancer: give it to the kernel.
    Pass,
    /// Drop it.
    Drop(DecideDrop),
}

/// Why a packet is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A new flow to a Service with no usable backend (policy: reject).
    NoBackend,
    /// A TCP segment of a flow whose backend has left its Service.
    BackendLeft,
}

counted_enum! {
    /// Why `decide()` drops a packet. Each has its counter.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    #[repr(u8)]
    pub enum DecideDrop {
        /// A new flow to a Service whose policy for "no usable backend" is drop.
        NoBackend,
        /// A reply of a flow whose Service has left the snapshot.
        ServiceGone,
        /// An snat reply whose forward entry (which knows the client) has gone.
        FlowGone,
        /// A backend's packet that no flow explains and that serves several Service ports,
        /// none of whose picks is that backend, or more than [`RECOGNISED_UP_TO`] of them:
        /// which VIP to answer from is unknown.
        UnknownReply,
        /// snat mode: a new flow that the full flow table could not record (its replies
        /// could not be translated back).
        TableFull,
        /// snat mode: no translated port was free for a new flow.
        NoSnatPort,
        /// A new flow from a martian source: unspecified, loopback, multicast, broadcast,
        /// reserved, IPv4-mapped, or the destination itself.
        MartianSource,
        /// A new flow from outside the Service's allowed source ranges
        /// (`loadBalancerSourceRanges`).
        SourceNotAllowed,
        /// A fragment after the first whose first fragment has not been seen (yet): its
        /// translation is unknown.
        FragmentBeforeFirst,
    }
}

counted_enum! {
    /// What `decide()` did besides its verdict, counted because an operator asks about it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    #[repr(u8)]
    pub enum Event {
        /// dnat mode: a new flow forwarded to its pick without an entry, because both of its
        /// buckets held only established flows.
        Untracked,
        /// A flow recreated from a backend's packet that no entry explained, where the
        /// Service's pick for it is that backend.
        Recreated,
        /// A flow recreated from a backend's packet although the Service's pick differs (the
        /// backend serves exactly one Service port).
        RecreatedUnpicked,
        /// A SYN on a closing flow, or on a flow whose backend left: a new connection on a
        /// reused port, given a fresh pick.
        PortReused,
        /// A UDP or ICMP flow whose backend left, moved to a new pick.
        Repicked,
        /// A flow whose backend left, reset (a client's segment rejected, or a backend's
        /// reply turned into a reset towards the client).
        BackendLeftReset,
        /// snat mode: a port taken back from a flow that never had a reply and went quiet
        /// (or lost its forward entry), for a new flow.
        SnatPortReclaimed,
    }
}

/// How flows are translated.
#[derive(Clone, Copy, Debug)]
pub enum Mode<'a> {
    /// Source-preserving: only the destination changes; replies must route back through xlb.
    Dnat,
    /// Full NAT: the source also becomes an xlb address and port, so replies come back to
    /// xlb in any topology.
    Snat(&'a SnatPool),
    /// Direct server return: packets go to the backend unchanged (Ethernet aside); replies
    /// never come through xlb. A TCP flow is established by the client's acknowledgment of
    /// the handshake, the only sign of the backend's answer xlb sees.
    Dsr,
}

/// Which flows an [`SnatPool`] translates.
#[derive(Clone, Debug, Default)]
pub enum Masquerade {
    /// Every flow of a family the pool has an address for (snat mode).
    #[default]
    All,
    /// Hairpin flows (the client is its own pick), and flows from clients outside these
    /// prefixes (kube-proxy's detect-local; empty: hairpin flows only) — but not flows
    /// whose client has the pool's address already (the node's own connections).
    Outside(super::prefix::PrefixMap<()>),
}

/// The source addresses and ports of snat mode, one pool per worker (its own port range, so
/// that workers never hand out the same port).
#[derive(Debug)]
pub struct SnatPool {
    v4: Option<[u8; 16]>,
    v6: Option<[u8; 16]>,
    first_port: u16,
    ports: u16,
    next: crate::sync::AtomicU64,
    masquerade: Masquerade,
}

impl SnatPool {
    /// A pool translating to `v4` and `v6` (either may be absent: that family is then not
    /// translated) with ports `first_port .. first_port + ports`.
    #[must_use]
    pub fn new(
        v4: Option<core::net::Ipv4Addr>,
        v6: Option<core::net::Ipv6Addr>,
        first_port: u16,
        ports: u16,
    ) -> Self {
        Self {
            v4: v4.map(|a| crate::packet::key_addr(a.into())),
            v6: v6.map(|a| crate::packet::key_addr(a.into())),
            first_port,
            ports: ports.max(1),
            next: crate::sync::AtomicU64::new(0),
            masquerade: Masquerade::All,
        }
    }

    /// The same pool translating only the flows `masquerade` names.
    #[must_use]
    pub fn masquerading(mut self, masquerade: Masquerade) -> Self {
        self.masquerade = masquerade;
        self
    }

    fn addr(&self, family: Family) -> Option<[u8; 16]> {
        match family {
            Family::Ipv4 => self.v4,
            Family::Ipv6 => self.v6,
        }
    }

    /// Whether every flow of `family` is translated (so that a reply no flow explains cannot
    /// be a source-preserving flow's).
    fn translates_all(&self, family: Family) -> bool {
        matches!(self.masquerade, Masquerade::All) && self.addr(family).is_some()
    }

    /// The address a new flow from `key`'s source to `backend` is translated to, if it is.
    #[inline]
    fn translation(&self, key: &FlowKey, backend: &Endpoint) -> Option<[u8; 16]> {
        let addr = self.addr(key.family)?;
        let translated = match &self.masquerade {
            Masquerade::All => true,
            // A client that already has the pool's address (the node itself) keeps its
            // port: translating it would change nothing that routes the reply, and would
            // make its flow one that a restart cannot recreate.
            Masquerade::Outside(_) if key.src_addr == addr => false,
            Masquerade::Outside(local) => {
                *backend.key_addr() == key.src_addr
                    || local.longest_match(key.family, &key.src_addr).is_none()
            }
        };
        translated.then_some(addr)
    }

    fn next_port(&self) -> u16 {
        // Relaxed: the counter only spreads ports; collisions are checked in the flow table.
        let n = self.next.fetch_add(1, crate::sync::Ordering::Relaxed);
        let offset = u16::try_from(n % u64::from(self.ports)).unwrap_or(0);
        self.first_port.wrapping_add(offset)
    }
}

/// Per-worker counts of what happened to packets: each verdict, each drop reason of
/// `decide()`, each malformed-packet reason of the parser, and `decide()`'s events. Plain
/// integers: a worker owns its counters and the admin side sums them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counters {
    /// Forwarded to a backend.
    pub forwarded: u64,
    /// Replies un-NATed.
    pub replied: u64,
    /// Replies turned into resets towards the client (their backend left).
    pub reset: u64,
    /// Refused (new flows without a backend, segments of flows whose backend left).
    pub rejected: u64,
    /// Passed to the kernel.
    pub passed: u64,
    /// Dropped by `decide()`, by [`DecideDrop`] (index: [`DecideDrop::index`]).
    pub dropped: [u64; DecideDrop::COUNT],
    /// Malformed, by [`crate::packet::DropReason`] (index: its `index()`).
    pub malformed: [u64; crate::packet::DropReason::COUNT],
    /// `decide()`'s events, by [`Event`] (index: [`Event::index`]).
    pub events: [u64; Event::COUNT],
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            forwarded: 0,
            replied: 0,
            reset: 0,
            rejected: 0,
            passed: 0,
            dropped: [0; DecideDrop::COUNT],
            malformed: [0; crate::packet::DropReason::COUNT],
            events: [0; Event::COUNT],
        }
    }
}

impl Counters {
    /// Counts a verdict.
    #[inline]
    pub fn record(&mut self, verdict: &Verdict) {
        match verdict {
            Verdict::Forward(_) | Verdict::ForwardSnat { .. } | Verdict::ForwardDsr(_) => {
                self.forwarded += 1;
            }
            Verdict::Reply(_) | Verdict::ReplySnat { .. } => self.replied += 1,
            Verdict::ResetReply { .. } => self.reset += 1,
            Verdict::Reject(_) => self.rejected += 1,
            Verdict::Pass => self.passed += 1,
            Verdict::Drop(reason) => self.dropped[reason.index()] += 1,
        }
    }

    /// Counts a frame the parser rejected.
    #[cold]
    pub fn record_malformed(&mut self, reason: crate::packet::DropReason) {
        self.malformed[reason.index()] += 1;
    }

    #[cold]
    fn event(&mut self, event: Event) {
        self.events[event.index()] += 1;
    }
}

/// What `decide()` reads and writes besides the packet: the snapshot of this batch, the
/// shared flow table, the time and the translation mode.
#[derive(Clone, Copy, Debug)]
pub struct Env<'a> {
    /// Services and backends.
    pub snapshot: &'a Snapshot,
    /// The flow table of all workers.
    pub flows: &'a FlowTable,
    /// Now, in the flow table's seconds.
    pub now: Second,
    /// Now, in the flow table's ticks (orders evictions).
    pub tick: Tick,
    /// dnat or snat.
    pub mode: Mode<'a>,
    /// The translations of fragmented datagrams, shared by all workers.
    pub fragments: &'a Fragments,
}

/// Decides what to do with one packet (see the module documentation), counting its events
/// (not its verdict) in `counters`, and records what it decided in the flow table before it
/// returns.
///
/// `hash` is [`super::hash::flow_hash`] of `parsed.key`; `random` a fresh random number from
/// the worker, for the random scheduler.
pub fn decide(
    env: &Env<'_>,
    parsed: &Parsed,
    hash: u64,
    random: u64,
    counters: &mut Counters,
) -> Verdict {
    let mut later = Reverses::default();
    let verdict = decide_in_batch(env, parsed, hash, None, random, counters, &mut later);
    later.record(env);
    verdict
}

/// [`decide`] for one packet of a batch: the reverse entries of new dnat flows are left in
/// `later`, which the caller records with [`Reverses::record`] once the batch is decided and
/// before any of its packets is sent (so no reply can come before its entry). `place` is
/// what the batch's [`FlowTable::prefetch_entry`] returned for this packet: a new flow's
/// entry goes there if it still can.
pub fn decide_in_batch(
    env: &Env<'_>,
    parsed: &Parsed,
    hash: u64,
    place: Option<Place>,
    random: u64,
    counters: &mut Counters,
    later: &mut Reverses,
) -> Verdict {
    if let Class::Fragment(f) = parsed.class {
        if !f.first {
            return follow_first_fragment(env, parsed)
                .unwrap_or(Verdict::Drop(DecideDrop::FragmentBeforeFirst));
        }
    }
    let verdict = decide_packet(env, parsed, hash, place, random, counters, later);
    if let Class::Fragment(f) = parsed.class {
        record_first_fragment(env, parsed, f.id, &verdict);
    }
    verdict
}

#[cold]
fn record_first_fragment(env: &Env<'_>, parsed: &Parsed, id: u32, verdict: &Verdict) {
    env.fragments
        .record(&FragmentKey::of(&parsed.key, id), verdict, env.now);
}

/// The translation of the first fragment of `parsed`'s datagram (a fragment after the
/// first), if it was seen.
#[cold]
#[must_use]
pub fn follow_first_fragment(env: &Env<'_>, parsed: &Parsed) -> Option<Verdict> {
    let Class::Fragment(f) = parsed.class else {
        return None;
    };
    env.fragments
        .lookup(&FragmentKey::of(&parsed.key, f.id), env.now)
}

/// `decide()` for a packet with its transport header.
fn decide_packet(
    env: &Env<'_>,
    parsed: &Parsed,
    hash: u64,
    place: Option<Place>,
    random: u64,
    counters: &mut Counters,
    later: &mut Reverses,
) -> Verdict {
    match parsed.class {
        Class::NotForUs(_) => return Verdict::Pass,
        Class::IcmpError(_) => return icmp_error(env, &parsed.key, hash),
        Class::Ordinary | Class::Fragment(_) => {}
    }
    let key = &parsed.key;
    if let Some(hit) = env.flows.lookup(key, hash, env.now) {
        match hit.value {
            FlowValue::Reverse { .. } => return reply(env, parsed, &hit, counters),
            FlowValue::Forward {
                service,
                backend,
                snat_port,
            } => {
                let flow = Forwarding {
                    hit,
                    service,
                    backend,
                    snat_port,
                };
                if let Some(verdict) = forward(env, parsed, &flow, counters) {
                    return verdict;
                }
                // The flow ended here: this packet starts a new one.
            }
        }
    }
    if let Some(service) = env.snapshot.service(&ServiceKey::of_destination(key)) {
        let new = NewFlow {
            hash,
            place,
            random,
        };
        return new_flow(env, service, parsed, new, counters, later);
    }
    unexplained(env, key, counters)
}

/// A forward entry found for a packet.
struct Forwarding {
    hit: Hit,
    service: u32,
    backend: u32,
    snat_port: u16,
}

/// A packet of a known flow in its forward direction. `None` when the flow ended with this
/// packet (a SYN reusing its port, or its backend left for UDP): the caller starts a new one.
fn forward(
    env: &Env<'_>,
    parsed: &Parsed,
    flow: &Forwarding,
    counters: &mut Counters,
) -> Option<Verdict> {
    let key = &parsed.key;
    // A flow whose Service left: whatever now serves the key (nothing, usually) decides.
    let service = service_of(env.snapshot, flow.service)?;
    let opens = opens(parsed);
    let Some(backend) = backend_of(service, flow.backend) else {
        env.flows.remove(flow.hit.entry, key);
        if key.proto == IpProto::TCP && !opens {
            counters.event(Event::BackendLeftReset);
            return Some(Verdict::Reject(Refusal::BackendLeft));
        }
        counters.event(if opens {
            Event::PortReused
        } else {
            Event::Repicked
        });
        return None;
    };
    if opens && flow.hit.state == FlowState::Closing {
        // The client reuses the port of a connection that ended: a new connection.
        env.flows.remove(flow.hit.entry, key);
        counters.event(Event::PortReused);
        return None;
    }
    // In dsr mode the answer is never seen: a flow counts as answered once it has started.
    let seen = match (env.mode, flow.hit.state) {
        (Mode::Dsr, FlowState::New) => FlowState::Replied,
        (_, state) => state,
    };
    let next = forward_state(parsed, seen);
    env.flows.touch(flow.hit.entry, env.now, next);
    if next == Some(FlowState::Established) {
        // The reverse entry is protected from eviction from now on too.
        let to = reply_destination(env.mode, key, flow.snat_port);
        let reverse = reverse_key(key, &backend.endpoint, to);
        if let Some(hit) = env.flows.lookup(&reverse, flow_hash(&reverse), env.now) {
            env.flows.touch(hit.entry, env.now, next);
        }
    }
    Some(forward_verdict(
        backend.endpoint,
        env.mode,
        key,
        flow.snat_port,
    ))
}

/// The state a forward packet moves its flow to: closing on FIN or RST; established when the
/// client acknowledges an answered handshake (TCP), or sends again after a reply (UDP, ICMP).
fn forward_state(parsed: &Parsed, current: FlowState) -> Option<FlowState> {
    if closes(parsed) {
        return Some(FlowState::Closing);
    }
    let acknowledges = parsed.key.proto != IpProto::TCP
        || (parsed.tcp_flags.contains(TcpFlags::ACK) && !parsed.tcp_flags.contains(TcpFlags::SYN));
    (current == FlowState::Replied && acknowledges).then_some(FlowState::Established)
}

/// A backend's reply, found by its reverse entry.
fn reply(env: &Env<'_>, parsed: &Parsed, hit: &Hit, counters: &mut Counters) -> Verdict {
    let key = &parsed.key;
    let FlowValue::Reverse { service, snat, .. } = hit.value else {
        return Verdict::Pass;
    };
    let Some(service) = service_of(env.snapshot, service) else {
        return Verdict::Drop(DecideDrop::ServiceGone);
    };
    let Some((forward_key, forward)) = env.flows.forward_of(hit, env.now) else {
        // The forward entry expired or was evicted (its place perhaps another flow's).
        env.flows.remove(hit.entry, key);
        if snat {
            return Verdict::Drop(DecideDrop::FlowGone);
        }
        // dnat: the reply names the client; recreate the flow as after a restart.
        return unexplained(env, key, counters);
    };
    let FlowValue::Forward {
        backend, snat_port, ..
    } = forward.value
    else {
        return Verdict::Drop(DecideDrop::FlowGone);
    };
    if snat && snat_port != key.dst_port {
        return Verdict::Drop(DecideDrop::FlowGone);
    }
    let (vip, client) = reply_ends(&forward_key, snat);
    if backend_of(service, backend).is_none() {
        // The backend left the Service; its replies are still steered for a grace period.
        // The entries stay: the client's next segment is rejected with the reset that
        // matches its own sequence numbers exactly.
        if key.proto == IpProto::TCP {
            counters.event(Event::BackendLeftReset);
            return Verdict::ResetReply {
                from: vip,
                to: client,
            };
        }
        // A UDP or ICMP answer is still an answer; the next request picks again.
    } else {
        let next = reply_state(parsed, forward.state);
        env.flows.touch(forward.entry, env.now, next);
        // The reverse entry follows its forward entry's state.
        let state = next.map_or(forward.state, |n| n.max(forward.state));
        env.flows.touch(hit.entry, env.now, Some(state));
    }
    match client {
        Some(to) => Verdict::ReplySnat { from: vip, to },
        None => Verdict::Reply(vip),
    }
}

/// The state a reply moves its flow to: closing on FIN or RST; replied after a new flow's
/// first answer.
fn reply_state(parsed: &Parsed, current: FlowState) -> Option<FlowState> {
    if closes(parsed) {
        return Some(FlowState::Closing);
    }
    (current == FlowState::New).then_some(FlowState::Replied)
}

/// The VIP a reply comes from, and in snat mode the client it goes to, from its flow's
/// forward key.
fn reply_ends(forward_key: &FlowKey, snat: bool) -> (Endpoint, Option<Endpoint>) {
    let family = forward_key.family;
    let vip = Endpoint::from_key_form(family, forward_key.dst_addr, forward_key.dst_port);
    let client =
        snat.then(|| Endpoint::from_key_form(family, forward_key.src_addr, forward_key.src_port));
    (vip, client)
}

/// An ICMP error travelling along a flow: translated as the flow's packets are, without
/// changing the flow's state; an error about a flow xlb does not know is the kernel's.
fn icmp_error(env: &Env<'_>, key: &FlowKey, hash: u64) -> Verdict {
    let Some(hit) = env.flows.lookup(key, hash, env.now) else {
        return Verdict::Pass;
    };
    match hit.value {
        FlowValue::Forward {
            service,
            backend,
            snat_port,
        } => service_of(env.snapshot, service)
            .and_then(|s| backend_of(s, backend))
            .map_or(Verdict::Pass, |b| {
                forward_verdict(b.endpoint, env.mode, key, snat_port)
            }),
        FlowValue::Reverse { service, snat, .. } => match env.flows.forward_of(&hit, env.now) {
            Some((forward_key, _)) => match reply_ends(&forward_key, snat) {
                (from, Some(to)) => Verdict::ReplySnat { from, to },
                (vip, None) => Verdict::Reply(vip),
            },
            None if !snat => service_of(env.snapshot, service)
                .map_or(Verdict::Drop(DecideDrop::ServiceGone), |s| {
                    Verdict::Reply(s.spec().key.vip)
                }),
            None => Verdict::Drop(DecideDrop::FlowGone),
        },
    }
}

/// A packet no flow explains and no Service is addressed by: a backend's reply whose flow
/// xlb lost (recreated in dnat mode, see the module documentation), an snat reply without its
/// flow, or something the kernel should have had.
fn unexplained(env: &Env<'_>, key: &FlowKey, counters: &mut Counters) -> Verdict {
    if matches!(env.mode, Mode::Dsr) {
        // No reply comes through xlb in dsr mode.
        return Verdict::Pass;
    }
    if let Mode::Snat(pool) = env.mode {
        if pool.addr(key.family) == Some(key.dst_addr) {
            return Verdict::Drop(DecideDrop::FlowGone);
        }
        if pool.translates_all(key.family) {
            return Verdict::Pass;
        }
    }
    let from = Endpoint::from_key_form(key.family, key.src_addr, key.src_port);
    if env
        .snapshot
        .services_with_backend(&from, key.proto)
        .nth(RECOGNISED_UP_TO)
        .is_some()
    {
        return Verdict::Drop(DecideDrop::UnknownReply);
    }
    let mut serving = 0;
    let mut only = None;
    for service in env.snapshot.services_with_backend(&from, key.proto) {
        let vip = service.spec().key.vip;
        let forward_key = FlowKey::new(
            key.family,
            key.proto,
            (key.dst_addr, key.dst_port),
            (*vip.key_addr(), vip.port()),
        );
        let hash = flow_hash(&forward_key);
        if let Some(backend) = service.maglev_pick(hash).filter(|b| b.endpoint == from) {
            counters.event(Event::Recreated);
            return recreate(env, service, backend, &forward_key, hash, key);
        }
        serving += 1;
        only = Some((service, forward_key, hash));
    }
    match only {
        None => Verdict::Pass,
        Some((service, forward_key, hash)) if serving == 1 => match service.backend_at(&from) {
            Some(backend) => {
                counters.event(Event::RecreatedUnpicked);
                recreate(env, service, backend, &forward_key, hash, key)
            }
            None => Verdict::Drop(DecideDrop::UnknownReply),
        },
        Some(_) => Verdict::Drop(DecideDrop::UnknownReply),
    }
}

/// How many Services a backend may serve (at one address, port and protocol) for a packet of
/// it that no flow explains to be tried as a reply of each: every try is a Maglev pick, and
/// without a bound a flood of such packets (stray, or spoofed from a backend's address) cost a
/// pick per Service each (25 000 for a backend of 100 000 Services on four backends). A
/// backend shared by more Services is never recognised so: its packets are dropped as
/// [`DecideDrop::UnknownReply`] until the client's next packet recreates the flow (to the same
/// backend, which Maglev picks again). Kubernetes gives a backend a few Service keys (a
/// cluster IP, node ports, load-balancer IPs, per Service that selects it).
pub const RECOGNISED_UP_TO: usize = 32;

/// Records a dnat flow found from its reply (`reply_key`), in the replied state (the client's
/// next acknowledgment establishes it), and un-NATs the reply.
fn recreate(
    env: &Env<'_>,
    service: &Service,
    backend: &Backend,
    forward_key: &FlowKey,
    forward_hash: u64,
    reply_key: &FlowKey,
) -> Verdict {
    let vip = service.spec().key.vip;
    if forward_key.martian_source() {
        return Verdict::Drop(DecideDrop::MartianSource);
    }
    let value = FlowValue::Forward {
        service: service.spec().id.0.get(),
        backend: backend.id.0.get(),
        snat_port: 0,
    };
    let state = FlowState::Replied;
    if let Insert::Inserted(entry) =
        env.flows
            .insert_at(forward_key, forward_hash, value, state, env.now, env.tick)
    {
        let _ = Reverse::new(*reply_key, reverse_value(service, entry, false), state).record(env);
        service.flow_started(backend.id);
    }
    Verdict::Reply(vip)
}

/// The forward verdict for a flow translated to `backend`, with `snat_port` as its source
/// port in snat mode (0: not translated).
fn forward_verdict(backend: Endpoint, mode: Mode<'_>, key: &FlowKey, snat_port: u16) -> Verdict {
    match mode {
        Mode::Dsr => Verdict::ForwardDsr(backend),
        Mode::Snat(pool) if snat_port != 0 => match pool.addr(key.family) {
            Some(addr) => Verdict::ForwardSnat {
                to: backend,
                from: Endpoint::from_key_form(key.family, addr, snat_port),
            },
            None => Verdict::Forward(backend),
        },
        _ => Verdict::Forward(backend),
    }
}

/// Where a flow's replies are addressed: its translated source in snat mode, its client in
/// dnat mode.
fn reply_destination(mode: Mode<'_>, key: &FlowKey, snat_port: u16) -> ([u8; 16], u16) {
    match mode {
        Mode::Snat(pool) if snat_port != 0 => pool
            .addr(key.family)
            .map_or((key.src_addr, key.src_port), |addr| (addr, snat_port)),
        _ => (key.src_addr, key.src_port),
    }
}

/// How long (in whole seconds of the flow table's clock: 2 is at least one full second) a
/// flow that never had a reply must have been quiet before its snat port is taken back for a
/// new flow (1 took the ports of flows seen a millisecond before, in the previous second:
/// flows still waiting for their first reply were torn down and started again, and replies
/// through snat fell from 425 000 to 12 000 pps). Without it, a flood of unanswered SYNs or
/// datagrams held every port of the pool for the New timeout (120 s for TCP, 30 s for UDP) and
/// every new flow after it was dropped (`NoSnatPort`): 256 000 flows to 4 backends exhausted
/// one address's ports in a third of a second of a benchmark's new-flow traffic.
pub const RECLAIM_QUIET: Second = 2;

/// Takes back the snat port of the flow whose reverse entry `reverse` (at `key`) holds it,
/// if that flow never had a reply and has been quiet [`RECLAIM_QUIET`] seconds, or has lost
/// its forward entry (its replies cannot be translated any more): removes its entries and
/// says whether the port is free now.
fn reclaim_port(env: &Env<'_>, key: &FlowKey, reverse: &Hit, counters: &mut Counters) -> bool {
    match env.flows.forward_of(reverse, env.now) {
        Some((forward_key, forward))
            if forward.state == FlowState::New
                && env.now.saturating_sub(forward.last_seen) >= RECLAIM_QUIET =>
        {
            env.flows.remove(forward.entry, &forward_key);
        }
        Some(_) => return false,
        None => {}
    }
    env.flows.remove(reverse.entry, key);
    counters.event(Event::SnatPortReclaimed);
    true
}

/// What picks and places a new flow: its hash, the place its batch's prefetch chose, and a
/// fresh random number for the random scheduler.
struct NewFlow {
    hash: u64,
    place: Option<Place>,
    random: u64,
}

/// Picks a backend for a new flow and records both directions.
fn new_flow(
    env: &Env<'_>,
    service: &Service,
    parsed: &Parsed,
    new: NewFlow,
    counters: &mut Counters,
    later: &mut Reverses,
) -> Verdict {
    let NewFlow {
        hash,
        place,
        random,
    } = new;
    let key = &parsed.key;
    if key.martian_source() || key.src_addr == key.dst_addr {
        return Verdict::Drop(DecideDrop::MartianSource);
    }
    let spec = service.spec();
    if let Some(ranges) = &spec.source_ranges {
        if ranges.longest_match(key.family, &key.src_addr).is_none() {
            return Verdict::Drop(DecideDrop::SourceNotAllowed);
        }
    }
    let affinity = spec
        .affinity_timeout
        .map(|timeout| Affinity::of(service, parsed, timeout));
    let remembered = affinity
        .as_ref()
        .and_then(|a| a.remembered(service, env.flows, env.now));
    let Some(backend) = remembered.or_else(|| service.pick(hash, random)) else {
        return match spec.no_backend {
            NoBackend::Reject => Verdict::Reject(Refusal::NoBackend),
            NoBackend::Drop => Verdict::Drop(DecideDrop::NoBackend),
        };
    };
    let state = if closes(parsed) {
        FlowState::Closing
    } else {
        FlowState::New
    };
    // In snat mode the flow's source becomes an xlb address and a port whose reverse key
    // (backend -> that address and port) is not taken, or is taken by a flow that never had
    // a reply and has gone quiet (a flood's).
    let snat_port = match env.mode {
        Mode::Snat(pool) => match pool.translation(key, &backend.endpoint) {
            Some(addr) => {
                let free = (0..4).map(|_| pool.next_port()).find(|&port| {
                    let reverse = reverse_key(key, &backend.endpoint, (addr, port));
                    match env.flows.lookup(&reverse, flow_hash(&reverse), env.now) {
                        None => true,
                        Some(hit) => reclaim_port(env, &reverse, &hit, counters),
                    }
                });
                match free {
                    Some(port) => port,
                    None => return Verdict::Drop(DecideDrop::NoSnatPort),
                }
            }
            None => 0,
        },
        Mode::Dnat | Mode::Dsr => 0,
    };
    if let Some(affinity) = &affinity {
        affinity.remember(service, env.flows, backend.id, env.now);
    }
    let forward = FlowValue::Forward {
        service: spec.id.0.get(),
        backend: backend.id.0.get(),
        snat_port,
    };
    match env
        .flows
        .insert_placed(key, hash, forward, state, env.now, env.tick, place)
    {
        // dsr: no reply comes back, so no reverse entry.
        Insert::Inserted(_) if matches!(env.mode, Mode::Dsr) => {
            service.flow_started(backend.id);
            forward_verdict(backend.endpoint, env.mode, key, snat_port)
        }
        Insert::Inserted(entry) => {
            let to = reply_destination(env.mode, key, snat_port);
            let reverse = Reverse::new(
                reverse_key(key, &backend.endpoint, to),
                reverse_value(service, entry, snat_port != 0),
                state,
            );
            if snat_port == 0 {
                // dnat: the replies name the client, so a reverse entry that cannot be
                // recorded costs nothing but a recreation; recorded with the batch's others.
                later.push(reverse);
            } else if !reverse.record(env) {
                // Only the table knows the client of an snat flow.
                env.flows.remove(entry, key);
                return Verdict::Drop(DecideDrop::TableFull);
            }
            service.flow_started(backend.id);
            forward_verdict(backend.endpoint, env.mode, key, snat_port)
        }
        // Another worker recorded this flow first: follow its choice.
        Insert::Existing(hit) => match hit.value {
            FlowValue::Forward {
                backend: chosen,
                snat_port,
                ..
            } => {
                let to = backend_of(service, chosen).map_or(backend.endpoint, |b| b.endpoint);
                forward_verdict(to, env.mode, key, snat_port)
            }
            FlowValue::Reverse { .. } => Verdict::Pass,
        },
        // Another worker is recording it: this packet goes to the pick, which the other
        // worker's choice equals unless the scheduler is not Maglev.
        Insert::Pending => forward_verdict(backend.endpoint, env.mode, key, snat_port),
        // Both buckets hold only established flows.
        Insert::Full if snat_port == 0 => {
            counters.event(Event::Untracked);
            forward_verdict(backend.endpoint, env.mode, key, 0)
        }
        Insert::Full => Verdict::Drop(DecideDrop::TableFull),
    }
}

fn reverse_value(service: &Service, forward: EntryRef, snat: bool) -> FlowValue {
    FlowValue::Reverse {
        service: service.spec().id.0.get(),
        forward,
        snat,
    }
}

/// A flow's reverse entry, to be recorded.
#[derive(Clone, Copy, Debug)]
struct Reverse {
    key: FlowKey,
    /// The flow hash of `key`.
    hash: u64,
    value: FlowValue,
    state: FlowState,
    /// Where its insert may go, as [`Reverses::record`]'s prefetch chose.
    place: Option<Place>,
}

impl Reverse {
    fn new(key: FlowKey, value: FlowValue, state: FlowState) -> Self {
        Self {
            hash: flow_hash(&key),
            key,
            value,
            state,
            place: None,
        }
    }

    /// Records the entry. An entry already at its key is an earlier flow's whose forward
    /// entry is gone (a client reusing its port towards the same backend): it is replaced.
    /// Returns whether the entry is recorded (or another worker is recording it).
    fn record(&self, env: &Env<'_>) -> bool {
        let insert = |place| {
            let (key, hash, value, state) = (&self.key, self.hash, self.value, self.state);
            env.flows
                .insert_placed(key, hash, value, state, env.now, env.tick, place)
        };
        match insert(self.place) {
            Insert::Inserted(_) | Insert::Pending => true,
            Insert::Existing(old) if old.value == self.value => true,
            Insert::Existing(old) => {
                env.flows.remove(old.entry, &self.key);
                matches!(insert(None), Insert::Inserted(_) | Insert::Pending)
            }
            Insert::Full => false,
        }
    }
}

/// The reverse entries of a batch's new dnat flows, recorded together after the batch is
/// decided: their buckets depend on the backend picked, so the batch's prefetch stages could
/// not fetch them, and recorded one by one each waited for its two cache misses in turn (its
/// tag lines, then the body it writes). Here every entry's tag lines are requested first, then
/// the bodies they will write (or replace), then the entries are written, so the misses of a
/// batch overlap.
#[derive(Debug, Default)]
pub struct Reverses {
    pending: Vec<Reverse>,
}

impl Reverses {
    /// Room for `n` entries (a batch's), allocated once.
    #[must_use]
    pub fn with_capacity(n: usize) -> Self {
        Self {
            pending: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, reverse: Reverse) {
        self.pending.push(reverse);
    }

    /// Records every pending entry in `env`'s flow table (a full table leaves a dnat flow
    /// without its reverse entry: its replies recreate it).
    pub fn record(&mut self, env: &Env<'_>) {
        if self.pending.is_empty() {
            return;
        }
        for r in &self.pending {
            env.flows.prefetch(r.key.family, r.hash);
        }
        for r in &mut self.pending {
            r.place = env.flows.prefetch_entry(r.key.family, r.hash, env.tick);
        }
        for r in self.pending.drain(..) {
            let _ = r.record(env);
        }
    }
}

/// The key of a flow's replies: from the backend to the flow's (translated) source `to`.
fn reverse_key(key: &FlowKey, backend: &Endpoint, to: ([u8; 16], u16)) -> FlowKey {
    FlowKey::new(
        key.family,
        key.proto,
        (*backend.key_addr(), backend.port()),
        to,
    )
}

/// Session affinity by client address (Kubernetes `sessionAffinity: ClientIP`): the backend a
/// client's last new flow to this Service went to, kept in the flow table under a key of the
/// client address and the Service, and honoured while younger than the Service's timeout.
/// The records are evictable: losing one loses stickiness, never a connection.
struct Affinity {
    key: FlowKey,
    hash: u64,
    timeout: Second,
}

impl Affinity {
    fn of(service: &Service, parsed: &Parsed, timeout: u32) -> Self {
        let vip = service.spec().key;
        let key = FlowKey::new(
            parsed.key.family,
            AFFINITY,
            (parsed.key.src_addr, u16::from(vip.proto.0)),
            (*vip.vip.key_addr(), vip.vip.port()),
        );
        Self {
            hash: flow_hash(&key),
            key,
            timeout,
        }
    }

    /// The remembered backend, if recent enough and still taking new flows.
    fn remembered<'s>(
        &self,
        service: &'s Service,
        flows: &FlowTable,
        now: Second,
    ) -> Option<&'s Backend> {
        let hit = flows.lookup(&self.key, self.hash, now)?;
        if now.saturating_sub(hit.last_seen) > self.timeout {
            return None;
        }
        let FlowValue::Forward { backend, .. } = hit.value else {
            return None;
        };
        backend_of(service, backend).filter(|b| service.takes_new_flows(b.id))
    }

    /// Records `backend` as the client's, replacing an older record.
    fn remember(&self, service: &Service, flows: &FlowTable, backend: BackendId, now: Second) {
        let value = FlowValue::Forward {
            service: service.spec().id.0.get(),
            backend: backend.0.get(),
            snat_port: 0,
        };
        if let Insert::Existing(hit) =
            flows.insert(&self.key, self.hash, value, FlowState::New, now)
        {
            if hit.value == value {
                flows.touch(hit.entry, now, None);
            } else {
                flows.remove(hit.entry, &self.key);
                let _ = flows.insert(&self.key, self.hash, value, FlowState::New, now);
            }
        }
    }
}

fn service_of(snapshot: &Snapshot, id: u32) -> Option<&Service> {
    NonZeroU32::new(id).and_then(|id| snapshot.service_by_id(ServiceId(id)))
}

/// The backend a flow entry names (its id as the entry stores it), if still in the Service.
fn backend_of(service: &Service, id: u32) -> Option<&Backend> {
    NonZeroU32::new(id).and_then(|id| service.backend(BackendId(id)))
}

/// Whether the packet ends its flow (FIN or RST).
fn closes(parsed: &Parsed) -> bool {
    parsed.tcp_flags.intersects(TcpFlags::FIN | TcpFlags::RST)
}

/// Whether the packet opens a TCP connection (SYN without ACK).
fn opens(parsed: &Parsed) -> bool {
    parsed.key.proto == IpProto::TCP
        && parsed.tcp_flags.contains(TcpFlags::SYN)
        && !parsed.tcp_flags.contains(TcpFlags::ACK)
}
