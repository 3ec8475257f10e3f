//! The flow table: the one concurrent structure on the packet path.
//!
//! Every worker reads and writes it (a reply can arrive on another queue than its request),
//! so nothing here waits for anything: no lock, no spin. A fixed array of buckets, set at
//! start (in huge pages where the kernel gives them), each of [`WAYS`] entries; a flow may
//! live in either of two buckets chosen by its hash. An entry is eight atomic words (64
//! bytes), so the table needs no unsafe code (`crate::memory` asks for its huge pages): its
//! `seq` word sits with those of its bucket in one cache line (a lookup checks a bucket's
//! tags with one memory access), the other seven in the entry's body. How the words are
//! packed is `words`' business.
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

mod words;

use crate::memory::huge_page_slice;
use crate::packet::{FlowKey, IpProto};
use crate::sync::{fence, AtomicU64, Ordering};

use words::{
    eviction_rank, key_from_words, key_words, meta_proto, meta_seen, meta_seen_at, same_key,
    same_occupant, seq_born, seq_flow_state, seq_stamp, seq_tag, seq_with_state, seq_word,
    value_from_words, value_words, COUNTER_MASK, COUNTER_ONE, FREE, STATE_MASK, VALID, WRITING,
};

/// Entries per bucket (their `seq` words fill one cache line).
pub const WAYS: usize = 8;

/// The most entries a table may have: 2^27 entries are 8 GiB. Larger capacities are
/// clamped (the configuration refuses them first, naming the field).
pub const MAX_CAPACITY: usize = 1 << 27;

/// Bytes one entry takes.
pub const ENTRY_BYTES: usize = 64;

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

/// The `seq` words of one bucket, together in one cache line: a lookup reads the tags of a
/// whole bucket with one memory access, and touches an entry's body only on a tag match.
#[repr(align(64))]
struct SeqLine([AtomicU64; WAYS]);

impl SeqLine {
    fn new() -> Self {
        Self([(); WAYS].map(|()| AtomicU64::new(FREE)))
    }
}

/// The rest of an entry: five key words, the value, and the meta word (last seen, port,
/// protocol, flags). 56 bytes; with its `seq` word, 64 bytes per entry.
struct Body {
    key: [AtomicU64; 5],
    value: AtomicU64,
    meta: AtomicU64,
}

impl Body {
    fn new() -> Self {
        Self {
            key: [(); 5].map(|()| AtomicU64::new(0)),
            value: AtomicU64::new(0),
            meta: AtomicU64::new(0),
        }
    }
}

/// One entry read as a consistent whole.
struct Read {
    seq: u64,
    key: [u64; 5],
    value: u64,
    meta: u64,
}

/// The shared flow table.
pub struct FlowTable {
    seqs: Box<[SeqLine]>,
    bodies: Box<[Body]>,
    bucket_mask: usize,
    timeouts: Timeouts,
    /// Live (not yet expired) entries that were not established, taken for another flow.
    evictions: AtomicU64,
    /// Inserts that found no entry to take.
    full: AtomicU64,
}

impl FlowTable {
    /// A table of at least `capacity` entries (rounded up to a power of two of buckets, at
    /// most [`MAX_CAPACITY`]). Its memory ([`Self::memory_for`]) is allocated here, once.
    #[must_use]
    pub fn new(capacity: usize, timeouts: Timeouts) -> Self {
        let buckets = Self::buckets_for(capacity);
        Self {
            seqs: huge_page_slice(buckets, SeqLine::new),
            bodies: huge_page_slice(buckets * WAYS, Body::new),
            bucket_mask: buckets - 1,
            timeouts,
            evictions: AtomicU64::new(0),
            full: AtomicU64::new(0),
        }
    }

    fn buckets_for(capacity: usize) -> usize {
        capacity
            .clamp(WAYS, MAX_CAPACITY)
            .div_ceil(WAYS)
            .next_power_of_two()
    }

    /// The bytes a table asked for `capacity` entries takes, without building it.
    #[must_use]
    pub fn memory_for(capacity: usize) -> usize {
        Self::buckets_for(capacity) * WAYS * ENTRY_BYTES
    }

    /// Live entries that were not established, evicted for other flows so far. The counters
    /// are shared by all workers but touched only when a bucket pair is full, so they cost
    /// nothing in ordinary operation.
    #[must_use]
    pub fn evictions(&self) -> u64 {
        // Relaxed: a statistic read on its own.
        self.evictions.load(Ordering::Relaxed)
    }

    /// Inserts refused because both candidate buckets held only live established flows.
    #[must_use]
    pub fn full_inserts(&self) -> u64 {
        // Relaxed: a statistic read on its own.
        self.full.load(Ordering::Relaxed)
    }

    /// The number of entries.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.bodies.len()
    }

    /// Bytes of entry memory.
    #[must_use]
    pub fn memory_bytes(&self) -> usize {
        self.seqs.len() * core::mem::size_of::<SeqLine>()
            + self.bodies.len() * core::mem::size_of::<Body>()
    }

    /// The `seq` words of a flow's two candidate buckets ("power of two choices": with one
    /// bucket per flow, 8-way buckets overflow long before the table is full; with two, past
    /// 90% load), read once. The low 32 bits of the hash pick the buckets; the high 32 are
    /// the tag (and the Maglev slot).
    fn ways(&self, hash: u64) -> Ways {
        let buckets = self.buckets(hash);
        let n = if buckets[0] == buckets[1] {
            WAYS
        } else {
            2 * WAYS
        };
        let mut seq = [FREE; 2 * WAYS];
        let (first, second) = seq.split_at_mut(WAYS);
        for (half, bucket) in [first, second].into_iter().zip(buckets).take(n / WAYS) {
            for (word, atomic) in half.iter_mut().zip(&self.seqs[bucket].0) {
                // Acquire: pairs with the publication, so a body read after it is current.
                *word = atomic.load(Ordering::Acquire);
            }
        }
        Ways { buckets, n, seq }
    }

    /// The two bucket numbers of a flow, lower first (equal in a one-bucket table).
    fn buckets(&self, hash: u64) -> [usize; 2] {
        let low = hash & 0xFFFF_FFFF;
        let first = usize::try_from(low).unwrap_or(0) & self.bucket_mask;
        let mixed = low.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
        let mut second = usize::try_from(mixed).unwrap_or(0) & self.bucket_mask;
        if second == first {
            second ^= 1 & self.bucket_mask;
        }
        [first.min(second), first.max(second)]
    }

    /// Scans the tags of the flow's buckets (one cache line each; the second only when the
    /// first has no match) and reads the body of an entry only where the tag matches.
    fn find(&self, hash: u64, tag: u32, words: &[u64; 5], now: Second) -> Option<Hit> {
        let [a, b] = self.buckets(hash);
        let buckets = if a == b { &[a][..] } else { &[a, b][..] };
        // A valid entry showing `tag`, in one comparison.
        let shown = seq_word(tag, 0, VALID);
        for &bucket in buckets {
            let line = self.seqs.get(bucket)?;
            for (way, seq) in line.0.iter().enumerate() {
                // Relaxed: a filter only; `hit_at` validates with Acquire.
                let seq = seq.load(Ordering::Relaxed);
                if seq & TAG_AND_STATE == shown {
                    if let Some(hit) = self.hit_at(bucket * WAYS + way, tag, words, now) {
                        return Some(hit);
                    }
                }
            }
        }
        None
    }

    /// The `seq` word of entry `i` (in range: every caller's index comes from [`Ways`] or
    /// was checked against the capacity).
    fn seq(&self, i: usize) -> &AtomicU64 {
        &self.seqs[i / WAYS].0[i % WAYS]
    }

    /// Reads entry `i` as one consistent whole, or `None` if it is not valid or changed while
    /// being read.
    fn read(&self, i: usize) -> Option<Read> {
        let body = self.bodies.get(i)?;
        let seq = self.seq(i);
        // Acquire: the key and value stores of the publication this load sees are visible.
        let before = seq.load(Ordering::Acquire);
        if before & STATE_MASK != VALID {
            return None;
        }
        // Relaxed: validated by the second load of `seq` below.
        let key = [0, 1, 2, 3, 4].map(|w| body.key[w].load(Ordering::Relaxed));
        let value = body.value.load(Ordering::Relaxed);
        let meta = body.meta.load(Ordering::Relaxed);
        // Acquire fence: the word loads above are ordered before the re-read of `seq`, so a
        // writer's claim that preceded any of them is seen below (Boehm, seqlocks, 2012).
        fence(Ordering::Acquire);
        // Relaxed: ordered by the fence above.
        let after = seq.load(Ordering::Relaxed);
        // A flow-state change in between leaves the words as they were (and must not make a
        // lookup miss a live flow, which an insert would then duplicate).
        same_occupant(before, after).then_some(Read {
            seq: after,
            key,
            value,
            meta,
        })
    }

    fn expired(&self, seq: u64, meta: u64, now: Second) -> bool {
        let timeout = self.timeouts.of(meta_proto(meta), seq_flow_state(seq));
        now.saturating_sub(meta_seen(meta)) > timeout
    }

    /// Starts loading the tag lines of a flow's buckets, so that a lookup issued a little
    /// later finds them in cache. A batch prefetches all its flows first, then looks them up:
    /// the misses overlap instead of each lookup waiting for its own.
    #[inline]
    pub fn prefetch(&self, hash: u64) {
        for bucket in self.buckets(hash) {
            if let Some(line) = self.seqs.get(bucket) {
                crate::prefetch::prefetch_read(line);
            }
        }
    }

    /// The second prefetch stage of a batch: with the tag lines in cache (after
    /// [`Self::prefetch`]), prefetches the body of every entry whose tag matches the flow's,
    /// or where none does (a new flow, most likely) the body an insert at `tick` would claim
    /// (`prefetch_claim`).
    #[inline]
    pub fn prefetch_entry(&self, hash: u64, tick: Tick) {
        let tag = seq_tag(hash);
        let mut matched = false;
        for bucket in self.buckets(hash) {
            let Some(line) = self.seqs.get(bucket) else {
                continue;
            };
            for (way, seq) in line.0.iter().enumerate() {
                // Relaxed: a filter for a cache hint only.
                if seq_tag(seq.load(Ordering::Relaxed)) == tag {
                    matched = true;
                    if let Some(body) = self.bodies.get(bucket * WAYS + way) {
                        crate::prefetch::prefetch_read(body);
                    }
                }
            }
        }
        if !matched {
            self.prefetch_claim(hash, tick);
        }
    }

    /// Prefetches the body of the entry an insert of a flow with this hash at `tick` would
    /// claim (the first it would try), its tag lines being in cache. An insert writes that
    /// body and then fences, and the fence waits for the body's cache miss: with a table much
    /// larger than the cache, end to end, 71% of `insert_at`'s samples were that wait (a
    /// criterion table of 16 MiB stays in this machine's cache and barely shows it).
    #[inline(never)]
    fn prefetch_claim(&self, hash: u64, tick: Tick) {
        let ways = self.ways(hash);
        if let Some(j) = ways
            .free_in_order()
            .next()
            .or_else(|| ways.most_evictable(tick))
        {
            if let Some(body) = self.bodies.get(ways.index(j)) {
                // A read brings a line no other core holds in the exclusive state, which the
                // insert's stores then take without another miss.
                crate::prefetch::prefetch_read(body);
            }
        }
    }

    /// Finds a live entry for `key` (whose flow hash is `hash`).
    #[must_use]
    pub fn lookup(&self, key: &FlowKey, hash: u64, now: Second) -> Option<Hit> {
        let words = key_words(key);
        let tag = seq_tag(hash);
        self.find(hash, tag, &words, now)
    }

    fn hit_at(&self, index: usize, tag: u32, words: &[u64; 5], now: Second) -> Option<Hit> {
        let read = self.read(index)?;
        if seq_tag(read.seq) != tag
            || !same_key(&read.key, words)
            || self.expired(read.seq, read.meta, now)
        {
            return None;
        }
        Some(Self::hit_of(index, &read))
    }

    fn hit_of(index: usize, read: &Read) -> Hit {
        Hit {
            entry: EntryRef {
                index: u32::try_from(index).unwrap_or(u32::MAX),
                stamp: seq_stamp(read.seq),
            },
            value: value_from_words(read.value, read.meta),
            state: seq_flow_state(read.seq),
            last_seen: meta_seen(read.meta),
        }
    }

    /// The live entry `entry` refers to, if it is still the one referred to.
    fn read_ref(&self, entry: EntryRef, now: Second) -> Option<Read> {
        let read = self.read(entry.index as usize)?;
        (seq_stamp(read.seq) == entry.stamp && !self.expired(read.seq, read.meta, now))
            .then_some(read)
    }

    /// The forward entry a reverse entry refers to, with its key, if it is still that flow's:
    /// live, a forward entry, of the same Service. `None` for a forward `hit`, or when the
    /// forward entry expired or was evicted (its place perhaps taken by another flow).
    #[must_use]
    pub fn forward_of(&self, reverse: &Hit, now: Second) -> Option<(FlowKey, Hit)> {
        let FlowValue::Reverse {
            service, forward, ..
        } = reverse.value
        else {
            return None;
        };
        let read = self.read_ref(forward, now)?;
        let hit = Self::hit_of(forward.index as usize, &read);
        match hit.value {
            FlowValue::Forward { service: s, .. } if s == service => {
                Some((key_from_words(&read.key), hit))
            }
            _ => None,
        }
    }

    /// Records that `entry` was seen at `now`, and moves its state forward to `state` (states
    /// never move back: a closing flow stays closing). Does nothing to an entry that is no
    /// longer the one referred to.
    pub fn touch(&self, entry: EntryRef, now: Second, state: Option<FlowState>) {
        let index = entry.index as usize;
        let Some(body) = self.bodies.get(index) else {
            return;
        };
        let seq = self.seq(index);
        // Acquire: pairs with the publication, so the meta word read below is this entry's.
        let mut current = seq.load(Ordering::Acquire);
        if let Some(state) = state {
            loop {
                if current & STATE_MASK != VALID || seq_stamp(current) != entry.stamp {
                    return;
                }
                if state <= seq_flow_state(current) {
                    break;
                }
                // The state moves by a compare-and-swap of the whole `seq` word, which fails
                // when the place was freed or reused since (its counter moved).
                // Release on success: it stays a publication of the same words; Acquire on
                // failure: the next round reads a current word.
                match seq.compare_exchange(
                    current,
                    seq_with_state(current, state),
                    Ordering::Release,
                    Ordering::Acquire,
                ) {
                    Ok(_) => break,
                    Err(seen) => current = seen,
                }
            }
        } else if current & STATE_MASK != VALID || seq_stamp(current) != entry.stamp {
            return;
        }
        // Relaxed: the time is one value; a lost race leaves a time as recent. A reuse of the
        // place between the check above and this store can only refresh the new occupant's
        // time, which its publication overwrites or which is already as recent.
        let old = body.meta.load(Ordering::Relaxed);
        if meta_seen(old) < now {
            let _ = body.meta.compare_exchange(
                old,
                meta_seen_at(old, now),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
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
        let words = key_words(key);
        let tag = seq_tag(hash);
        if let Some(hit) = self.find(hash, tag, &words, now) {
            return Insert::Existing(hit);
        }
        let Some(index) = self.claim(hash, tag, now, tick) else {
            return Insert::Full;
        };
        let stamp = self.publish(index, &words, value, key.proto, state, now, tick);
        self.resolve_duplicates(hash, index, stamp, tag, &words, now)
    }

    /// Claims one of the flow's candidate entries (it is then *writing*, showing `tag` so that
    /// a racing insert of the same flow can see it): a free one, else one that is not
    /// established, else an expired one.
    fn claim(&self, hash: u64, tag: u32, now: Second, tick: Tick) -> Option<usize> {
        let try_claim = |i: usize, seq: u64| {
            let claimed = seq_word(tag, (seq & COUNTER_MASK) + COUNTER_ONE, WRITING);
            // Acquire on success: this writer's later stores follow the claim.
            // Relaxed on failure: the entry is simply skipped.
            self.seq(i)
                .compare_exchange(seq, claimed, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        };
        for _ in 0..2 {
            let ways = self.ways(hash);
            for j in ways.free_in_order() {
                if try_claim(ways.index(j), ways.seq[j]) {
                    return Some(ways.index(j));
                }
            }
            if let Some(j) = ways.most_evictable(tick) {
                if try_claim(ways.index(j), ways.seq[j]) {
                    // Relaxed: a statistic (an expired entry may be counted too: the tag line
                    // does not carry ages).
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                    return Some(ways.index(j));
                }
                continue; // lost the race for it: look again
            }
            // Else an expired entry (established ones expire too: read their ages).
            let expired = bits(ways.mask(|seq| seq & STATE_MASK == VALID)).find(|&j| {
                // Relaxed: a candidate only; the claim CAS decides.
                let meta = self.bodies[ways.index(j)].meta.load(Ordering::Relaxed);
                self.expired(ways.seq[j], meta, now)
            });
            match expired {
                Some(j) if try_claim(ways.index(j), ways.seq[j]) => return Some(ways.index(j)),
                Some(_) => continue, // lost the race for it: look again
                None => {
                    // Relaxed: a statistic.
                    self.full.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        }
        None
    }

    /// Writes the claimed entry at `index` and makes it valid; returns its stamp.
    #[expect(
        clippy::too_many_arguments,
        reason = "an insert's step; the entry's parts are distinct"
    )]
    fn publish(
        &self,
        index: usize,
        words: &[u64; 5],
        value: FlowValue,
        proto: IpProto,
        state: FlowState,
        now: Second,
        tick: Tick,
    ) -> u16 {
        let entry = &self.bodies[index];
        let seq = self.seq(index);
        // Relaxed: this entry is ours since our claim; nobody else writes `seq` now.
        let claimed = seq.load(Ordering::Relaxed);
        // Release fence: a reader that sees any of the stores below also sees *writing*
        // on its second read of `seq` (Boehm's seqlock writer).
        fence(Ordering::Release);
        for (slot, w) in entry.key.iter().zip(words) {
            // Relaxed: published by the Release store of `seq` below.
            slot.store(*w, Ordering::Relaxed);
        }
        let (value, meta) = value_words(value, proto, now);
        entry.value.store(value, Ordering::Relaxed);
        entry.meta.store(meta, Ordering::Relaxed);
        // Release: readers that see *valid* see the words above.
        seq.store(
            seq_with_state(seq_born((claimed & !STATE_MASK) | VALID, tick), state),
            Ordering::Release,
        );
        seq_stamp(claimed)
    }

    /// After publishing at `mine`: keeps one entry per key in the flow's buckets (see the
    /// module docs).
    fn resolve_duplicates(
        &self,
        hash: u64,
        mine: usize,
        stamp: u16,
        tag: u32,
        words: &[u64; 5],
        now: Second,
    ) -> Insert {
        // SeqCst fence: of two inserts of one key, each publishes, fences, then looks at the
        // other's entry; the fences order the two publications, so at least one insert sees
        // the other's.
        fence(Ordering::SeqCst);
        let ways = self.ways(hash);
        for j in bits(ways.mask(|seq| seq_tag(seq) == tag)) {
            let (i, seq) = (ways.index(j), ways.seq[j]);
            if i == mine {
                continue;
            }
            match seq & STATE_MASK {
                WRITING if i < mine => {
                    self.withdraw(mine);
                    return Insert::Pending;
                }
                VALID => {
                    let Some(hit) = self.hit_at(i, tag, words, now) else {
                        continue;
                    };
                    if i < mine {
                        self.withdraw(mine);
                        return Insert::Existing(hit);
                    }
                    self.withdraw_if(i, seq);
                }
                _ => {}
            }
        }
        Insert::Inserted(EntryRef {
            index: u32::try_from(mine).unwrap_or(u32::MAX),
            stamp,
        })
    }

    /// Frees our own entry.
    fn withdraw(&self, index: usize) {
        let seq_word_ref = self.seq(index);
        // Relaxed load: the entry is ours; Release store: a later claimer sees it free.
        let seq = seq_word_ref.load(Ordering::Relaxed);
        seq_word_ref.store(
            seq_word(0, (seq & COUNTER_MASK) + COUNTER_ONE, FREE),
            Ordering::Release,
        );
    }

    /// Frees another insert's entry if it is still the one seen as `seq`.
    fn withdraw_if(&self, index: usize, seq: u64) {
        let free = seq_word(0, (seq & COUNTER_MASK) + COUNTER_ONE, FREE);
        // Release on success: like any freeing; Relaxed on failure: it changed, leave it.
        let _ = self
            .seq(index)
            .compare_exchange(seq, free, Ordering::Release, Ordering::Relaxed);
    }

    /// Removes `entry` if it is still the one referred to and holds `key`.
    pub fn remove(&self, entry: EntryRef, key: &FlowKey) {
        let index = entry.index as usize;
        if let Some(read) = self.read(index) {
            if seq_stamp(read.seq) == entry.stamp && same_key(&read.key, &key_words(key)) {
                self.withdraw_if(index, read.seq);
            }
        }
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
        (start..self.bodies.len()).filter_map(move |i| {
            let read = self.read(i)?;
            if self.expired(read.seq, read.meta, now) {
                return None;
            }
            Some((key_from_words(&read.key), Self::hit_of(i, &read)))
        })
    }
}

/// The bits of a `seq` word that [`FlowTable::find`] compares: the tag and the entry state.
const TAG_AND_STATE: u64 = !0xFFFF_FFFF | STATE_MASK;

/// The bits of [`Ways`]' masks that are the first bucket's ways.
const FIRST_BUCKET: u32 = (1 << WAYS) - 1;

/// A flow's candidate entries (the ways of its two buckets, the lower bucket's first) with
/// their `seq` words as read at one moment: one pass over the two tag lines, after which each
/// question an insert asks (which ways show this tag, which are free, which to evict) is a bit
/// mask of ways. Asked of the entries one by one through iterator chains, they cost an insert
/// about 1 900 instructions (callgrind, `decide/new-flow`).
struct Ways {
    /// The two buckets (equal in a one-bucket table).
    buckets: [usize; 2],
    /// How many ways there are: one bucket's or two.
    n: usize,
    seq: [u64; 2 * WAYS],
}

impl Ways {
    /// The entry index of way `j`.
    fn index(&self, j: usize) -> usize {
        self.buckets[j / WAYS] * WAYS + j % WAYS
    }

    /// The ways whose `seq` word satisfies `f`, as bits (way `j` is bit `j`).
    #[inline(always)]
    fn mask(&self, f: impl Fn(u64) -> bool) -> u32 {
        let mut mask = 0;
        for (j, &seq) in self.seq.iter().enumerate() {
            mask |= u32::from(f(seq)) << j;
        }
        mask & ((1 << self.n) - 1)
    }

    /// The free ways, in the order an insert tries them: the emptier bucket's first ("least
    /// loaded of two choices": first fit into the first bucket overflowed 0.6% of inserts at
    /// half load).
    fn free_in_order(&self) -> impl Iterator<Item = usize> {
        let free = self.mask(|seq| seq & STATE_MASK == FREE);
        let (first, second) = (free & FIRST_BUCKET, free & !FIRST_BUCKET);
        let order = if second.count_ones() > first.count_ones() {
            [second, first]
        } else {
            [first, second]
        };
        order.into_iter().flat_map(bits)
    }

    /// The oldest way that is not established, chosen from the tag lines alone: a new or
    /// replied one (half-open TCP, one-exchange UDP) before a closing one; the first of
    /// equals. Reading bodies to rank them by last use made every insert into a full bucket
    /// pair wait on up to 16 cache misses (`make bench` decide/new-flow: 1193 ns per packet);
    /// taking the first in way order made a new flow's reverse insert evict its own forward
    /// entry, just published in the same bucket. One branch-free pass over the tag lines.
    fn most_evictable(&self, tick: Tick) -> Option<usize> {
        let mut evictable = None;
        let mut best = 0;
        for (j, &seq) in self.seq.iter().enumerate().take(self.n) {
            let rank = eviction_rank(seq, tick);
            if rank > best {
                best = rank;
                evictable = Some(j);
            }
        }
        evictable
    }
}

/// The positions of the set bits of `mask`, lowest first.
fn bits(mut mask: u32) -> impl Iterator<Item = usize> {
    core::iter::from_fn(move || {
        (mask != 0).then(|| {
            let j = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            j
        })
    })
}

impl core::fmt::Debug for FlowTable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "FlowTable({} entries)", self.bodies.len())
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
