//! `decide()`: the one decision every packet needs, in pure code.
//!
//! From a snapshot, the flow table, a parsed packet and the time, it says what to do with the
//! packet: forward it to a backend, un-NAT a backend's reply, reject a new flow, pass it to
//! the kernel, or drop it with a reason. It records new flows (both directions) and ages the
//! ones it sees. This is the source-preserving `dnat` mode: the destination becomes the
//! backend, and replies, which route back through xlb, get the VIP back as their source.
//!
//! Backend changes, per the snapshot: a flow keeps a backend that is terminating or
//! draining; a flow whose backend has left the Service is answered with a reset (TCP) or
//! moved to a newly picked backend (UDP and ICMP: a stale UDP flow cannot outlive its
//! backend).
//!
//! Session affinity (`ClientIP`) sends a client's new flows to the backend of its previous
//! one while that is younger than the Service's timeout and the backend still takes new
//! flows; it works with every scheduler.
//!
//! In snat mode ([`Mode::Snat`]) the source also becomes an xlb address and a port from the
//! worker's [`SnatPool`], and replies (to that address and port) are translated back to the
//! VIP and the client, whom only the forward entry knows.
//!
//! Known gaps, for the LB-core issue: fragments after the
//! first (passed to the kernel: they carry no ports). A [`Verdict::Reject`] is answered with
//! [`crate::packet::reject_with_tcp_reset`] or [`crate::packet::reject_with_port_unreachable`].

use core::num::NonZeroU32;

use crate::packet::{Class, Endpoint, FlowKey, IpProto, Parsed, TcpFlags};

use super::flow::{FlowState, FlowTable, FlowValue, Insert, Second, AFFINITY};
use super::snapshot::{Backend, BackendId, NoBackend, Service, ServiceId, ServiceKey, Snapshot};

/// What to do with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Rewrite the destination to this backend and send it on.
    Forward(Endpoint),
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
    /// Refuse: answer with a TCP reset or an ICMP port unreachable.
    Reject,
    /// Not for the load balancer: give it to the kernel.
    Pass,
    /// Drop it.
    Drop(DecideDrop),
}

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
}

/// How flows are translated.
#[derive(Clone, Copy, Debug)]
pub enum Mode<'a> {
    /// Source-preserving: only the destination changes; replies must route back through xlb.
    Dnat,
    /// Full NAT: the source also becomes an xlb address and port, so replies come back to
    /// xlb in any topology.
    Snat(&'a SnatPool),
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
        }
    }

    fn addr(&self, family: crate::packet::Family) -> Option<[u8; 16]> {
        match family {
            crate::packet::Family::Ipv4 => self.v4,
            crate::packet::Family::Ipv6 => self.v6,
        }
    }

    fn next_port(&self) -> u16 {
        // Relaxed: the counter only spreads ports; collisions are checked in the flow table.
        let n = self.next.fetch_add(1, crate::sync::Ordering::Relaxed);
        let offset = u16::try_from(n % u64::from(self.ports)).unwrap_or(0);
        self.first_port.wrapping_add(offset)
    }
}

impl DecideDrop {
    /// Every reason, in counter order.
    pub const ALL: [Self; 3] = [Self::NoBackend, Self::ServiceGone, Self::FlowGone];
}

/// Per-worker counts of what happened to packets: each verdict, each drop reason of
/// `decide()`, and each malformed-packet reason of the parser. Plain integers: a worker owns
/// its counters and the admin side sums them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counters {
    /// Forwarded to a backend.
    pub forwarded: u64,
    /// Replies un-NATed.
    pub replied: u64,
    /// New flows refused.
    pub rejected: u64,
    /// Passed to the kernel.
    pub passed: u64,
    /// Dropped by `decide()`, by [`DecideDrop`] (index: position in [`DecideDrop::ALL`]).
    pub dropped: [u64; DecideDrop::ALL.len()],
    /// Malformed, by [`crate::packet::DropReason`] (index: position in its `ALL`).
    pub malformed: [u64; crate::packet::DropReason::COUNT],
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            forwarded: 0,
            replied: 0,
            rejected: 0,
            passed: 0,
            dropped: [0; DecideDrop::ALL.len()],
            malformed: [0; crate::packet::DropReason::COUNT],
        }
    }
}

impl Counters {
    /// Counts a verdict.
    #[inline]
    pub fn record(&mut self, verdict: &Verdict) {
        match verdict {
            Verdict::Forward(_) | Verdict::ForwardSnat { .. } => self.forwarded += 1,
            Verdict::Reply(_) | Verdict::ReplySnat { .. } => self.replied += 1,
            Verdict::Reject => self.rejected += 1,
            Verdict::Pass => self.passed += 1,
            Verdict::Drop(reason) => self.dropped[*reason as usize] += 1,
        }
    }

    /// Counts a frame the parser rejected.
    #[cold]
    pub fn record_malformed(&mut self, reason: crate::packet::DropReason) {
        self.malformed[reason as usize] += 1;
    }
}

/// Decides what to do with one packet (see the module documentation).
///
/// `hash` is [`super::hash::flow_hash`] of `parsed.key`; `random` a fresh random number from
/// the worker, for the random scheduler.
pub fn decide(
    snapshot: &Snapshot,
    flows: &FlowTable,
    parsed: &Parsed,
    hash: u64,
    now: Second,
    random: u64,
    mode: Mode<'_>,
) -> Verdict {
    match parsed.class {
        Class::NotForUs(_) => return Verdict::Pass,
        Class::Fragment(f) if !f.first => return Verdict::Pass,
        Class::Ordinary | Class::Fragment(_) | Class::IcmpError(_) => {}
    }
    let key = &parsed.key;
    let closing = closes(parsed);
    if let Some(hit) = flows.lookup(key, hash, now) {
        let service = service_of(snapshot, hit.value.a);
        if hit.value.reverse {
            let Some(service) = service else {
                return Verdict::Drop(DecideDrop::ServiceGone);
            };
            // A reply establishes the flow (its reverse entry points at its forward entry);
            // an ICMP error travelling along it does not.
            let state = match parsed.class {
                Class::IcmpError(_) => None,
                _ if closing => Some(FlowState::Closing),
                _ => Some(FlowState::Established),
            };
            let vip = service.spec().key.vip;
            let client = if hit.value.port == 0 {
                None
            } else {
                // snat: the client is known only to the forward entry.
                let Some(forward) = flows.key_at(hit.value.b, now) else {
                    return Verdict::Drop(DecideDrop::FlowGone);
                };
                Some(Endpoint::from_key_form(
                    key.family,
                    forward.src_addr,
                    forward.src_port,
                ))
            };
            flows.touch(hit.index, now, state);
            if state.is_some() {
                flows.touch(hit.value.b, now, state);
            }
            return match client {
                Some(to) => Verdict::ReplySnat { from: vip, to },
                None => Verdict::Reply(vip),
            };
        }
        if let Some(service) = service {
            if let Some(backend) = backend_of(service, hit.value.b) {
                flows.touch(hit.index, now, closing.then_some(FlowState::Closing));
                return forward_verdict(backend.endpoint, mode, key, hit.value.port);
            }
            // The backend left the Service.
            flows.remove(hit.index, key);
            if key.proto == IpProto::TCP {
                return Verdict::Reject;
            }
        }
    }
    if let Class::IcmpError(_) = parsed.class {
        // An error about a flow xlb does not know is the kernel's business.
        return Verdict::Pass;
    }
    let Some(service) = snapshot.service(&ServiceKey::of_destination(key)) else {
        return Verdict::Pass;
    };
    new_flow(service, flows, parsed, hash, now, random, mode)
}

/// The forward verdict for a flow translated to `backend`, with `snat_port` as its source
/// port in snat mode (0: not translated).
fn forward_verdict(backend: Endpoint, mode: Mode<'_>, key: &FlowKey, snat_port: u16) -> Verdict {
    match mode {
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

/// Picks a backend for a new flow and records both directions.
fn new_flow(
    service: &Service,
    flows: &FlowTable,
    parsed: &Parsed,
    hash: u64,
    now: Second,
    random: u64,
    mode: Mode<'_>,
) -> Verdict {
    let spec = service.spec();
    let affinity = spec
        .affinity_timeout
        .map(|timeout| Affinity::of(service, parsed, timeout));
    let remembered = affinity
        .as_ref()
        .and_then(|a| a.remembered(service, flows, now));
    let Some(backend) = remembered.or_else(|| service.pick(hash, random)) else {
        return match spec.no_backend {
            NoBackend::Reject => Verdict::Reject,
            NoBackend::Drop => Verdict::Drop(DecideDrop::NoBackend),
        };
    };
    let key = &parsed.key;
    let state = if closes(parsed) {
        FlowState::Closing
    } else {
        FlowState::New
    };
    // In snat mode the flow's source becomes an xlb address and a port whose reverse key
    // (backend -> that address and port) is not taken.
    let snat = match mode {
        Mode::Snat(pool) => pool.addr(key.family).and_then(|addr| {
            (0..4).map(|_| pool.next_port()).find_map(|port| {
                let reverse = reverse_key(key, &backend.endpoint, addr, port);
                let taken = flows.lookup(&reverse, super::hash::flow_hash(&reverse), now);
                taken.is_none().then_some((addr, port))
            })
        }),
        Mode::Dnat => None,
    };
    let (back_addr, back_port, snat_port) = match snat {
        Some((addr, port)) => (addr, port, port),
        None => (key.src_addr, key.src_port, 0),
    };
    let forward = FlowValue {
        a: spec.id.0.get(),
        b: backend.id.0.get(),
        port: snat_port,
        reverse: false,
    };
    if let Some(affinity) = &affinity {
        affinity.remember(service, flows, backend.id, now);
    }
    match flows.insert(key, hash, forward, state, now) {
        Insert::Inserted(index) => {
            let reverse_key = reverse_key(key, &backend.endpoint, back_addr, back_port);
            let reverse = FlowValue {
                a: spec.id.0.get(),
                b: index,
                port: snat_port,
                reverse: true,
            };
            let reverse_hash = super::hash::flow_hash(&reverse_key);
            let _ = flows.insert(&reverse_key, reverse_hash, reverse, state, now);
            service.flow_started(backend.id);
            forward_verdict(backend.endpoint, mode, key, snat_port)
        }
        // Another worker recorded this flow first: follow its choice.
        Insert::Existing(hit) => {
            let chosen = backend_of(service, hit.value.b).map_or(backend.endpoint, |b| b.endpoint);
            forward_verdict(chosen, mode, key, hit.value.port)
        }
        // Not recorded (a racing insert, or a bucket full of established flows): this
        // packet still goes to the pick; Maglev gives the next one the same backend.
        Insert::Pending | Insert::Full => forward_verdict(backend.endpoint, mode, key, snat_port),
    }
}

/// The key of a flow's replies: from the backend to the flow's (translated) source.
fn reverse_key(key: &FlowKey, backend: &Endpoint, to_addr: [u8; 16], to_port: u16) -> FlowKey {
    FlowKey::new(
        key.family,
        key.proto,
        (*backend.key_addr(), backend.port()),
        (to_addr, to_port),
    )
}

/// Recounts the live flows of every backend from the flow table and stores the counts in the
/// snapshot's Services, for least-connections. The control thread runs it periodically: flows
/// that end by expiry or eviction are seen by no packet. Reads the whole table, off the
/// packet path.
pub fn recount_live_flows(snapshot: &Snapshot, flows: &FlowTable, now: Second) {
    let mut counts: hashbrown::HashMap<(u32, u32), u64> = hashbrown::HashMap::new();
    for (key, hit) in flows.iter(now) {
        if !hit.value.reverse && key.proto != AFFINITY {
            *counts.entry((hit.value.a, hit.value.b)).or_default() += 1;
        }
    }
    for service in snapshot.services() {
        let id = service.spec().id.0.get();
        for backend in &service.spec().backends {
            let n = counts.get(&(id, backend.id.0.get())).copied().unwrap_or(0);
            service.set_live_flows(backend.id, n);
        }
    }
}

/// Session affinity by client address (Kubernetes `sessionAffinity: ClientIP`): the backend a
/// client's last new flow to this Service went to, kept in the flow table under a key of the
/// client address and the Service, and honoured while younger than the Service's timeout.
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
            hash: super::hash::flow_hash(&key),
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
        backend_of(service, hit.value.b).filter(|b| service.takes_new_flows(b.id))
    }

    /// Records `backend` as the client's, replacing an older record.
    fn remember(&self, service: &Service, flows: &FlowTable, backend: BackendId, now: Second) {
        let value = FlowValue {
            a: service.spec().id.0.get(),
            b: backend.0.get(),
            ..FlowValue::default()
        };
        if let Insert::Existing(hit) =
            flows.insert(&self.key, self.hash, value, FlowState::Established, now)
        {
            if hit.value == value {
                flows.touch(hit.index, now, None);
            } else {
                flows.remove(hit.index, &self.key);
                let _ = flows.insert(&self.key, self.hash, value, FlowState::Established, now);
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
