//! The flow table: the one concurrent structure on the packet path.
//!
//! Every worker reads and writes it (a reply can arrive on another queue than its request),
//! so nothing here waits for anything: no lock, no spin. The table is two, one per address
//! family, each a fixed array of buckets set at start (in huge pages where the kernel gives
//! them), each bucket of [`WAYS`] entries; a flow may live in either of two buckets of its
//! family's table, chosen by its hash. An entry is atomic words, so the table needs no unsafe
//! code (`crate::memory` asks for its huge pages): its `seq` word sits with those of its bucket
//! in one cache line (a lookup checks a bucket's tags with one memory access), the others in
//! the entry's body, aligned so that reading it is one cache miss. An IPv4 key fits in two
//! words, an IPv6 key takes five: an IPv4 entry is 40 bytes ([`ENTRY_BYTES_IPV4`]), an IPv6
//! one 72 ([`ENTRY_BYTES_IPV6`]), and each family has its own capacity. A flow's entries are
//! all of its family's table (xlb does not translate between families). How the words are
//! packed is `words`' business; `table` holds one family's entries and their protocol.
//!
//! ## Entry protocol (a per-entry seqlock whose writers never wait)
//! The first word, `seq`, holds the entry's state (free, writing, valid), a counter bumped by
//! every claim and every freeing, and a 32-bit tag of the flow hash. The key and value words
//! are written only between a claim (a compare-and-swap to *writing*) and the publication (a
//! store of *valid*).
//! * A lookup reads `seq`, the words, then `seq` again, and believes the words only if both
//!   reads are the same valid state: it sees a whole entry or none of it. An entry being
//!   written is simply not there yet; the reader never waits for it.
//! * An insert claims a free, expired or evictable entry with one compare-and-swap; when it
//!   loses the race for that entry it tries the next candidate, and when none is left it
//!   reports the bucket full. It never waits either.
//! * Two workers may insert the same new flow at once. After publishing, an insert looks at
//!   the rest of the flow's entries: of two valid entries for one key, the lower index wins
//!   (the other removes itself, or is removed); an entry still being written for the same tag
//!   in a lower way makes the later insert withdraw and report [`Insert::Pending`]. The store
//!   of the publication and the loads of that check are separated by a sequentially
//!   consistent fence on both sides, so of two racing inserts at least one sees the other.
//!
//! ## References between entries
//! A flow has two entries: its forward direction (client to Service) and its reverse one
//! (the backend's replies), which names its forward entry with an [`EntryRef`]: the entry's
//! index and a stamp of its claim counter. The forward entry may be evicted or expire and
//! its place be taken by another flow; a reference to it is then stale, and every operation
//! through it ([`FlowTable::forward_of`], [`FlowTable::touch`], [`FlowTable::remove`]) checks
//! the stamp and does nothing with an entry that is not the one referred to.
//!
//! ## Ageing and eviction
//! Entries carry the second they were last seen and a [`FlowState`], which moves one way,
//! as conntrack's does: new (one direction seen), replied (both directions, but a TCP
//! handshake not completed or one UDP exchange), established (the client acknowledged the
//! handshake, or a UDP flow went on after its first reply), closing (FIN or RST). An entry
//! past its state's timeout is invisible to lookups and free for reuse. When both buckets
//! are full, an insert may evict any entry that is not established (marked so in its `seq`
//! word, so the choice needs no body read): a flood of SYNs, answered or not, or of one-packet
//! UDP flows, takes only places that other such flows held, and cannot push out an established
//! connection. When every entry is established and fresh, the insert reports
//! [`Insert::Full`] and the caller forwards without state where it can (counted).
//!
//! `tests/flow_loom.rs` models two racing inserts of one flow, a lookup racing an insert, a
//! lookup racing an eviction, and a reply racing the eviction of its forward entry (`make
//! loom`). Loom cannot see: the real cost of the fences, races of more than two threads, or
//! interleavings beyond its bound of two preemptions per execution. The stress test in
//! `tests/flow_stress.rs` runs many threads on real hardware.

mod table;
mod words;

use crate::packet::{Family, FlowKey, IpProto};

use table::{Body4, Body6, Table};

/// Entries per bucket (their `seq` words fill one cache line).
pub const WAYS: usize = 8;

/// The most entries a family's table may have: 2^27 IPv4 entries are 5 GiB, IPv6 ones 9 GiB.
/// Larger capacities are clamped (the configuration refuses them first, naming the field).
pub const MAX_CAPACITY: usize = 1 << 27;

/// Bytes one IPv4 entry takes (a connection has two).
pub const ENTRY_BYTES_IPV4: usize = 40;

/// Bytes one IPv6 entry takes.
pub const ENTRY_BYTES_IPV6: usize = 72;

/// A second on the caller's monotonic clock; the table never reads time itself.
pub type Second = u32;

/// A finer time, 1/64 s per tick, modulo 2^16, on the same clock as [`Second`]: when an entry
/// was published, so that an insert into a full bucket pair evicts the oldest entry first. A
/// new connection's entries then last as long as the table takes to turn over under a flood
/// (about 25 ms for 1 024 entries and 40 000 new flows a second), and a handshake quicker than
/// that completes and is protected; with whole seconds every entry of a flood was equally old.
pub type Tick = u16;

/// Ticks per second.
pub const TICKS_PER_SECOND: u32 = 64;

/// The tick at the start of `second` (for callers that keep only seconds).
#[must_use]
pub fn tick_of(second: Second) -> Tick {
    u16::try_from(second.wrapping_mul(TICKS_PER_SECOND) & 0xFFFF).unwrap_or(0)
}

/// A flow's lifecycle, for ageing and eviction. States only move forward, in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FlowState {
    /// Seen in one direction only (a TCP SYN, a UDP request): evictable.
    New,
    /// Seen in both directions, but not yet established: a TCP handshake answered but not
    /// acknowledged by the client (a SYN flood's flows end here), or one UDP request and its
    /// reply. Evictable.
    Replied,
    /// A TCP handshake acknowledged by the client (or data both ways), or a UDP flow that went
    /// on after its reply: never evicted before its timeout.
    Established,
    /// A FIN or RST was seen: evictable, short timeout.
    Closing,
}

/// Timeouts per state and protocol, in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP seen in one direction only (conntrack's SYN_SENT).
    pub tcp_new: Second,
    /// TCP answered but not acknowledged (conntrack's SYN_RECV).
    pub tcp_replied: Second,
    /// TCP established.
    pub tcp_established: Second,
    /// TCP after FIN or RST.
    pub tcp_closing: Second,
    /// UDP and ICMP, new or replied once.
    pub udp: Second,
    /// UDP and ICMP established (a stream).
    pub udp_stream: Second,
    /// SCTP established (an association that went on after its first answer); before that,
    /// SCTP has UDP's timeout.
    pub sctp_established: Second,
}

impl Default for Timeouts {
    /// The Linux conntrack defaults kube-proxy users know: SYN_SENT 120 s, SYN_RECV 60 s,
    /// ESTABLISHED as kube-proxy sets it (86 400 s), TIME_WAIT 120 s, UDP 30 s, UDP stream
    /// 120 s, SCTP ESTABLISHED 210 s (`nf_conntrack_sctp_timeout_established`).
    fn default() -> Self {
        Self {
            tcp_new: 120,
            tcp_replied: 60,
            tcp_established: 86_400,
            tcp_closing: 120,
            udp: 30,
            udp_stream: 120,
            sctp_established: 210,
        }
    }
}

impl Timeouts {
    fn of(&self, proto: IpProto, state: FlowState) -> Second {
        match (proto, state) {
            // Session-affinity records: kept for the longest timeout Kubernetes allows; the
            // Service's own timeout is applied where they are read.
            (AFFINITY, _) => 86_400,
            (IpProto::TCP, FlowState::New) => self.tcp_new,
            (IpProto::TCP, FlowState::Replied) => self.tcp_replied,
            (IpProto::TCP, FlowState::Established) => self.tcp_established,
            (IpProto::TCP, FlowState::Closing) => self.tcp_closing,
            (IpProto::SCTP, FlowState::Established) => self.sctp_established,
            (_, FlowState::Established) => self.udp_stream,
            _ => self.udp,
        }
    }
}

/// The protocol number of session-affinity records (an experimentation value, RFC 3692,
/// which the parser never hands to the load balancer, so no real flow has it).
pub const AFFINITY: IpProto = IpProto(0xFD);

/// Where an entry is, and which of its successive occupants: a reference that goes stale
/// when the entry is freed and its place taken again (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct EntryRef {
    /// bucket * WAYS + way.
    pub index: u32,
    /// The entry's claim counter (16 bits) when it was published. A reference
    /// survives 65 535 reuses of its place without being mistaken for a later occupant;
    /// [`FlowTable::forward_of`] also checks the Service, so a mistake needs both to match.
    pub stamp: u16,
}

/// What an entry maps its key to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowValue {
    /// A flow's forward direction (client to Service), or a session-affinity record.
    Forward {
        /// The Service's id.
        service: u32,
        /// The backend's id.
        backend: u32,
        /// snat mode: the flow's translated source port; 0 when not translated.
        snat_port: u16,
    },
    /// A flow's reverse direction (the backend's replies).
    Reverse {
        /// The Service's id.
        service: u32,
        /// The flow's forward entry (it knows the backend and, in snat mode, the client).
        forward: EntryRef,
        /// Whether the flow's source was translated (the client is known only to the forward
        /// entry).
        snat: bool,
    },
}

impl FlowValue {
    /// The Service id either direction carries.
    #[must_use]
    pub fn service(&self) -> u32 {
        match *self {
            Self::Forward { service, .. } | Self::Reverse { service, .. } => service,
        }
    }
}

/// A found entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    /// Where it is.
    pub entry: EntryRef,
    /// What it maps to.
    pub value: FlowValue,
    /// Its state.
    pub state: FlowState,
    /// When it was last seen.
    pub last_seen: Second,
}

/// Where an insert would go, chosen by [`FlowTable::prefetch_entry`] (whose prefetch brought
/// its body to the cache) and offered to [`FlowTable::insert_placed`], which takes it if its
/// entry has not changed since, instead of choosing again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    /// The entry's index.
    index: u32,
    /// Its `seq` word when it was chosen.
    seq: u64,
}

/// The outcome of an insert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insert {
    /// Recorded here.
    Inserted(EntryRef),
    /// The key was already there (another worker inserted it first): use its entry.
    Existing(Hit),
    /// Another worker is writing an entry that is probably this key: not recorded; forward
    /// this packet with the caller's own choice, the next one will find the entry.
    Pending,
    /// Every entry of both buckets is established and fresh: not recorded.
    Full,
}

/// Live entries of each family: what a scan of the table counts, and what the admin side
/// reports (each family's table fills on its own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Live {
    /// IPv4 entries.
    pub ipv4: u64,
    /// IPv6 entries.
    pub ipv6: u64,
}

impl Live {
    /// Counts one live entry of `family`.
    pub fn count(&mut self, family: Family) {
        match family {
            Family::Ipv4 => self.ipv4 += 1,
            Family::Ipv6 => self.ipv6 += 1,
        }
    }
}

/// The shared flow table: one table (`table::Table`) per address family, each key sent to its
/// family's. Entry indices ([`EntryRef::index`]) run over both: the IPv4 table's first, then
/// the IPv6 table's, so a reference names its table too.
pub struct FlowTable {
    v4: Table<Body4>,
    v6: Table<Body6>,
}

/// Calls `$f` on the table of `$family`.
macro_rules! of_family {
    ($self:ident, $family:expr, |$t:ident| $f:expr) => {
        match $family {
            Family::Ipv4 => {
                let $t = &$self.v4;
                $f
            }
            Family::Ipv6 => {
                let $t = &$self.v6;
                $f
            }
        }
    };
}

/// Calls `$f` on the table that holds entry `$index`.
macro_rules! of_index {
    ($self:ident, $index:expr, |$t:ident| $f:expr) => {
        if $self.v4.holds($index) {
            let $t = &$self.v4;
            $f
        } else {
            let $t = &$self.v6;
            $f
        }
    };
}

impl FlowTable {
    /// A table of at least `capacity` IPv4 entries and a quarter as many IPv6 ones (see
    /// [`Self::with_capacities`]).
    #[must_use]
    pub fn new(capacity: usize, timeouts: Timeouts) -> Self {
        Self::with_capacities(capacity, capacity / 4, timeouts)
    }

    /// A table of at least `ipv4` IPv4 entries and `ipv6` IPv6 ones (each rounded up to a
    /// power of two of buckets, at least one, at most [`MAX_CAPACITY`]). Its memory
    /// ([`Self::memory_for`]) is allocated here, once.
    #[must_use]
    pub fn with_capacities(ipv4: usize, ipv6: usize, timeouts: Timeouts) -> Self {
        let v4 = Table::new(ipv4, timeouts, 0);
        let v6 = Table::new(ipv6, timeouts, v4.capacity());
        Self { v4, v6 }
    }

    /// The bytes a table of `ipv4` and `ipv6` entries takes, without building it.
    #[must_use]
    pub fn memory_for(ipv4: usize, ipv6: usize) -> usize {
        Table::<Body4>::memory_for(ipv4) + Table::<Body6>::memory_for(ipv6)
    }

    /// Live entries that were not established, evicted for other flows so far. The counters
    /// are shared by all workers but touched only when a bucket pair is full, so they cost
    /// nothing in ordinary operation.
    #[must_use]
    pub fn evictions(&self) -> u64 {
        self.v4.evictions() + self.v6.evictions()
    }

    /// Inserts refused because both candidate buckets held only live established flows.
    #[must_use]
    pub fn full_inserts(&self) -> u64 {
        self.v4.full_inserts() + self.v6.full_inserts()
    }

    /// The number of entries, of both families.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.v4.capacity() + self.v6.capacity()
    }

    /// The number of entries of one family.
    #[must_use]
    pub fn capacity_of(&self, family: Family) -> usize {
        of_family!(self, family, |t| t.capacity())
    }

    /// Bytes of entry memory.
    #[must_use]
    pub fn memory_bytes(&self) -> usize {
        self.v4.memory_bytes() + self.v6.memory_bytes()
    }

    /// Starts loading the tag lines of a flow's buckets, so that a lookup issued a little
    /// later finds them in cache. A batch prefetches all its flows first, then looks them up:
    /// the misses overlap instead of each lookup waiting for its own.
    #[inline]
    pub fn prefetch(&self, family: Family, hash: u64) {
        of_family!(self, family, |t| t.prefetch(hash));
    }

    /// The second prefetch stage of a batch: with the tag lines in cache (after
    /// [`Self::prefetch`]), prefetches the body of every entry whose tag matches the flow's,
    /// or where none does (a new flow, most likely) the body an insert at `tick` would claim,
    /// and returns that [`Place`]. An insert writes that body and then fences, and the fence
    /// waits for the body's cache miss: with a table much larger than the cache, end to end,
    /// 71% of an insert's samples were that wait.
    #[inline]
    pub fn prefetch_entry(&self, family: Family, hash: u64, tick: Tick) -> Option<Place> {
        of_family!(self, family, |t| t.prefetch_entry(hash, tick))
    }

    /// Finds a live entry for `key` (whose flow hash is `hash`).
    #[must_use]
    pub fn lookup(&self, key: &FlowKey, hash: u64, now: Second) -> Option<Hit> {
        of_family!(self, key.family, |t| t.lookup(key, hash, now))
    }

    /// The forward entry a reverse entry refers to, with its key, if it is still that flow's:
    /// live, a forward entry, of the same Service. `None` for a forward `hit`, or when the
    /// forward entry expired or was evicted (its place perhaps taken by another flow).
    #[must_use]
    pub fn forward_of(&self, reverse: &Hit, now: Second) -> Option<(FlowKey, Hit)> {
        of_index!(self, reverse.entry.index, |t| t.forward_of(reverse, now))
    }

    /// Records that `entry` was seen at `now`, and moves its state forward to `state` (states
    /// never move back: a closing flow stays closing). Does nothing to an entry that is no
    /// longer the one referred to.
    pub fn touch(&self, entry: EntryRef, now: Second, state: Option<FlowState>) {
        of_index!(self, entry.index, |t| t.touch(entry, now, state));
    }

    /// Inserts `key` -> `value` in `state` unless it is there already, at the start of second
    /// `now` (see [`Self::insert_at`]).
    pub fn insert(
        &self,
        key: &FlowKey,
        hash: u64,
        value: FlowValue,
        state: FlowState,
        now: Second,
    ) -> Insert {
        self.insert_at(key, hash, value, state, now, tick_of(now))
    }

    /// Inserts `key` -> `value` in `state` unless it is there already, at second `now` and
    /// tick `tick` (which orders evictions).
    pub fn insert_at(
        &self,
        key: &FlowKey,
        hash: u64,
        value: FlowValue,
        state: FlowState,
        now: Second,
        tick: Tick,
    ) -> Insert {
        self.insert_placed(key, hash, value, state, now, tick, None)
    }

    /// [`Self::insert_at`], trying `place` first (from [`Self::prefetch_entry`] for this key's
    /// hash, a moment earlier): an insert that takes it skips choosing its entry, about 300
    /// instructions (callgrind, `decide/new-flow`). A place says that the key was absent when
    /// it was chosen, so the insert does not look for the key before it claims (about 90
    /// more); an entry of the key recorded since is found after publication, as one of a
    /// racing insert is, and one of the two stays.
    #[expect(
        clippy::too_many_arguments,
        reason = "an insert's parts are distinct; a place is one more"
    )]
    pub fn insert_placed(
        &self,
        key: &FlowKey,
        hash: u64,
        value: FlowValue,
        state: FlowState,
        now: Second,
        tick: Tick,
        place: Option<Place>,
    ) -> Insert {
        of_family!(self, key.family, |t| t
            .insert_at(key, hash, value, state, now, tick, place))
    }

    /// Removes `entry` if it is still the one referred to and holds `key`.
    pub fn remove(&self, entry: EntryRef, key: &FlowKey) {
        of_index!(self, entry.index, |t| t.remove(entry, key));
    }

    /// Every live entry, read consistently one by one (the table keeps changing meanwhile).
    pub fn iter(&self, now: Second) -> impl Iterator<Item = (FlowKey, Hit)> + '_ {
        self.iter_from(0, now)
    }

    /// Every live entry from index `start` on, in index order (for a dump in pages: the next
    /// page starts after the last index seen).
    pub fn iter_from(
        &self,
        start: usize,
        now: Second,
    ) -> impl Iterator<Item = (FlowKey, Hit)> + '_ {
        self.v4
            .iter_from(start, now)
            .chain(self.v6.iter_from(start, now))
    }
}

impl core::fmt::Debug for FlowTable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "FlowTable({} IPv4 entries, {} IPv6)",
            self.v4.capacity(),
            self.v6.capacity()
        )
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
