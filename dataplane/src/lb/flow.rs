//! The flow table: the one concurrent structure on the packet path.
//!
//! Every worker reads and writes it (a reply can arrive on another queue than its request),
//! so nothing here waits for anything: no lock, no spin. A fixed array of buckets, set at
//! start, each of [`WAYS`] entries; a flow may live in either of two buckets chosen by its
//! hash. An entry is eight atomic words (64 bytes), so the table needs no unsafe code: its
//! `seq` word sits with those of its bucket in one cache line (a lookup checks a bucket's
//! tags with one memory access), the other seven in the entry's body.
//!
//! ## Entry protocol (a per-entry seqlock whose writers never wait)
//! The first word, `seq`, holds the entry's state (free, writing, valid), a counter bumped by
//! every claim, and a 32-bit tag of the flow hash. The key and value words are written only
//! between a claim (a compare-and-swap to *writing*) and the publication (a store of *valid*).
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
//! ## Ageing and eviction
//! Entries carry the second they were last seen and a state ([`FlowState`]). An entry past
//! its state's timeout is invisible to lookups and free for reuse. When both buckets are
//! full, an insert may evict an entry that is [`FlowState::New`] or [`FlowState::Closing`]
//! (marked so in its `seq` word, so the choice needs no body read), never a fresh
//! established one: a flood of new flows cannot push out established connections, it can
//! only fail to be recorded (counted by the caller).
//!
//! `tests/flow_loom.rs` models two racing inserts of one flow, a lookup racing an insert, and
//! a lookup racing an eviction (`make loom`). Loom cannot see: the real cost of the fences,
//! races of more than two threads, or interleavings beyond its bound of two preemptions per
//! execution. The stress test in `tests/flow_stress.rs` runs many threads on real hardware.

use crate::packet::{Family, FlowKey, IpProto};
use crate::sync::{fence, AtomicU64, Ordering};

/// Entries per bucket (their `seq` words fill one cache line).
pub const WAYS: usize = 8;

/// A second on the caller's monotonic clock; the table never reads time itself.
pub type Second = u32;

/// A flow's lifecycle, for ageing and eviction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowState {
    /// Seen in one direction only (a TCP SYN, a UDP request): evictable.
    New,
    /// Seen in both directions: never evicted before its timeout.
    Established,
    /// A FIN or RST was seen: evictable, short timeout.
    Closing,
}

/// Timeouts per state and protocol, in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP seen in one direction only.
    pub tcp_new: Second,
    /// TCP established.
    pub tcp_established: Second,
    /// TCP after FIN or RST.
    pub tcp_closing: Second,
    /// UDP and ICMP, any state.
    pub udp: Second,
}

impl Default for Timeouts {
    /// The Linux conntrack defaults kube-proxy users know: SYN_SENT 120 s, ESTABLISHED
    /// 5 days (kube-proxy sets 86 400 s), TIME_WAIT 120 s, UDP 30 s (stream 120 s).
    fn default() -> Self {
        Self {
            tcp_new: 120,
            tcp_established: 86_400,
            tcp_closing: 120,
            udp: 120,
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
            (IpProto::TCP, FlowState::Established) => self.tcp_established,
            (IpProto::TCP, FlowState::Closing) => self.tcp_closing,
            _ => self.udp,
        }
    }
}

/// The protocol number of session-affinity records (an experimentation value, RFC 3692,
/// which the parser never hands to the load balancer, so no real flow has it).
pub const AFFINITY: IpProto = IpProto(0xFD);

/// What an entry maps its key to. The meaning of the two halves is the caller's (the
/// forward entry of a flow: Service and backend; the reverse entry: Service and the way of
/// its forward entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowValue {
    /// First half (a Service id).
    pub a: u32,
    /// Second half (a backend id, or an entry index).
    pub b: u32,
    /// A port the entry remembers (the SNAT source port), or zero.
    pub port: u16,
    /// Whether the entry is a flow's reverse direction (replies), not its forward one.
    pub reverse: bool,
}

/// A found entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    /// Where it is (bucket * WAYS + way), stable while the entry lives.
    pub index: u32,
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
    /// Recorded at this index.
    Inserted(u32),
    /// The key was already there (another worker inserted it first): use its entry.
    Existing(Hit),
    /// Another worker is writing an entry that is probably this key: not recorded; forward
    /// this packet with the caller's own choice, the next one will find the entry.
    Pending,
    /// Every entry of the bucket is established and fresh: not recorded.
    Full,
}

const FREE: u64 = 0;
const WRITING: u64 = 1;
const VALID: u64 = 2;
const STATE_MASK: u64 = 0b11;
/// Set in the `seq` word of a valid entry that may be evicted (new or closing), so that an
/// insert into a full bucket pair can choose a victim from the tag lines alone.
const EVICTABLE: u64 = 0b100;
const COUNTER_ONE: u64 = 0b1000;
const COUNTER_MASK: u64 = 0xFFFF_FFF8;

fn seq_word(tag: u32, counter: u64, state: u64) -> u64 {
    (u64::from(tag) << 32) | (counter & COUNTER_MASK) | state
}

fn seq_tag(seq: u64) -> u32 {
    u32::try_from(seq >> 32).unwrap_or(0)
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

/// The rest of an entry: five key words, the value, and the meta word (last seen, SNAT port,
/// protocol, state). 56 bytes; with its `seq` word, 64 bytes per entry.
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

/// Whether two keys in word form are equal: five XORs, where `==` on the arrays became a
/// `memcmp` call (6% of the established path's samples).
#[inline(always)]
fn same_key(a: &[u64; 5], b: &[u64; 5]) -> bool {
    a.iter().zip(b).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The key in five words.
fn key_words(key: &FlowKey) -> [u64; 5] {
    let half = |b: &[u8; 16], i: usize| {
        let mut w = [0; 8];
        w.copy_from_slice(&b[i * 8..i * 8 + 8]);
        u64::from_le_bytes(w)
    };
    let family = match key.family {
        Family::Ipv4 => 4u64,
        Family::Ipv6 => 6,
    };
    [
        half(&key.src_addr, 0),
        half(&key.src_addr, 1),
        half(&key.dst_addr, 0),
        half(&key.dst_addr, 1),
        u64::from(key.src_port)
            | u64::from(key.dst_port) << 16
            | u64::from(key.proto.0) << 32
            | family << 40,
    ]
}

fn key_from_words(w: &[u64; 5]) -> FlowKey {
    let mut src = [0; 16];
    src[..8].copy_from_slice(&w[0].to_le_bytes());
    src[8..].copy_from_slice(&w[1].to_le_bytes());
    let mut dst = [0; 16];
    dst[..8].copy_from_slice(&w[2].to_le_bytes());
    dst[8..].copy_from_slice(&w[3].to_le_bytes());
    let bytes = w[4].to_le_bytes();
    let family = if bytes[5] == 6 {
        Family::Ipv6
    } else {
        Family::Ipv4
    };
    FlowKey::new(
        family,
        IpProto(bytes[4]),
        (src, u16::from_le_bytes([bytes[0], bytes[1]])),
        (dst, u16::from_le_bytes([bytes[2], bytes[3]])),
    )
}

fn value_word(v: FlowValue) -> u64 {
    u64::from(v.a) | u64::from(v.b) << 32
}

fn value_from_word(word: u64, meta: u64) -> FlowValue {
    FlowValue {
        a: u32::try_from(word & 0xFFFF_FFFF).unwrap_or(0),
        b: u32::try_from(word >> 32).unwrap_or(0),
        port: meta_port(meta),
        reverse: meta & REVERSE != 0,
    }
}

/// The meta word's flag of a reverse entry (in the state byte).
const REVERSE: u64 = 0x80;

/// meta: last seen (32 bits) | SNAT port (16) | proto (8) | reverse flag and state (8).
fn meta_word(last_seen: Second, port: u16, reverse: bool, proto: IpProto, state: FlowState) -> u64 {
    let state = match state {
        FlowState::New => 0u64,
        FlowState::Established => 1,
        FlowState::Closing => 2,
    };
    let reverse = if reverse { REVERSE } else { 0 };
    u64::from(last_seen) << 32 | u64::from(port) << 16 | u64::from(proto.0) << 8 | reverse | state
}

fn meta_seen(meta: u64) -> Second {
    u32::try_from(meta >> 32).unwrap_or(0)
}

fn meta_port(meta: u64) -> u16 {
    u16::try_from((meta >> 16) & 0xFFFF).unwrap_or(0)
}

fn meta_proto(meta: u64) -> IpProto {
    IpProto(u8::try_from((meta >> 8) & 0xFF).unwrap_or(0))
}

fn meta_state(meta: u64) -> FlowState {
    match meta & 0x7F {
        1 => FlowState::Established,
        2 => FlowState::Closing,
        _ => FlowState::New,
    }
}

/// The shared flow table.
pub struct FlowTable {
    seqs: Box<[SeqLine]>,
    bodies: Box<[Body]>,
    bucket_mask: usize,
    timeouts: Timeouts,
    /// Live (not yet expired) new or closing entries taken for another flow.
    evictions: AtomicU64,
    /// Inserts that found no entry to take.
    full: AtomicU64,
}

impl FlowTable {
    /// A table of at least `capacity` entries (rounded up to a power of two of buckets).
    /// Its memory is allocated here, once: 64 bytes per entry.
    #[must_use]
    pub fn new(capacity: usize, timeouts: Timeouts) -> Self {
        let buckets = capacity.div_ceil(WAYS).max(1).next_power_of_two();
        Self {
            seqs: (0..buckets).map(|_| SeqLine::new()).collect(),
            bodies: (0..buckets * WAYS).map(|_| Body::new()).collect(),
            bucket_mask: buckets - 1,
            timeouts,
            evictions: AtomicU64::new(0),
            full: AtomicU64::new(0),
        }
    }

    /// Live new or closing entries evicted for other flows so far. The counters are shared
    /// by all workers but touched only when a bucket pair is full, so they cost nothing in
    /// ordinary operation.
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

    /// The entry indices of a flow's two candidate buckets ("power of two choices": with one
    /// bucket per flow, 4-way buckets overflow at 15% load; with two, past 90%). The low 32
    /// bits of the hash pick the buckets; the high 32 are the tag (and the Maglev slot).
    fn candidates(&self, hash: u64) -> impl Iterator<Item = usize> + Clone {
        let [a, b] = self.buckets(hash);
        let (a, b) = (a * WAYS, b * WAYS);
        (a..a + WAYS).chain(if a == b { b..b } else { b..b + WAYS })
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

    /// Scans the tags of the flow's buckets (one cache line each) and reads the body of an
    /// entry only where the tag matches.
    fn find(&self, hash: u64, tag: u32, words: &[u64; 5], now: Second) -> Option<Hit> {
        let [a, b] = self.buckets(hash);
        let buckets = if a == b { &[a][..] } else { &[a, b][..] };
        for &bucket in buckets {
            let line = self.seqs.get(bucket)?;
            for (way, seq) in line.0.iter().enumerate() {
                // Relaxed: a filter only; `hit_at` validates with Acquire.
                let seq = seq.load(Ordering::Relaxed);
                if seq_tag(seq) == tag && seq & STATE_MASK == VALID {
                    if let Some(hit) = self.hit_at(bucket * WAYS + way, tag, words, now) {
                        return Some(hit);
                    }
                }
            }
        }
        None
    }

    /// The `seq` word of entry `i` (in range: every caller's index comes from `candidates`
    /// or was checked against the capacity).
    fn seq(&self, i: usize) -> &AtomicU64 {
        &self.seqs[i / WAYS].0[i % WAYS]
    }

    /// Reads entry `i` as one consistent whole, or `None` if it is not valid or changed while
    /// being read.
    fn read(&self, i: usize) -> Option<(u64, [u64; 5], u64, u64)> {
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
        (before == after).then_some((before, key, value, meta))
    }

    fn expired(&self, meta: u64, now: Second) -> bool {
        let timeout = self.timeouts.of(meta_proto(meta), meta_state(meta));
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
    /// [`Self::prefetch`]), prefetches the body of every entry whose tag matches the flow's.
    #[inline]
    pub fn prefetch_entry(&self, hash: u64) {
        let tag = seq_tag(hash);
        for bucket in self.buckets(hash) {
            let Some(line) = self.seqs.get(bucket) else {
                continue;
            };
            for (way, seq) in line.0.iter().enumerate() {
                // Relaxed: a filter for a cache hint only.
                if seq_tag(seq.load(Ordering::Relaxed)) == tag {
                    if let Some(body) = self.bodies.get(bucket * WAYS + way) {
                        crate::prefetch::prefetch_read(body);
                    }
                }
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
        let (seq, key, value, meta) = self.read(index)?;
        if seq_tag(seq) != tag || !same_key(&key, words) || self.expired(meta, now) {
            return None;
        }
        Some(Hit {
            index: u32::try_from(index).unwrap_or(u32::MAX),
            value: value_from_word(value, meta),
            state: meta_state(meta),
            last_seen: meta_seen(meta),
        })
    }

    /// The key of the live entry at `index` (a reverse entry's way to its forward entry).
    #[must_use]
    pub fn key_at(&self, index: u32, now: Second) -> Option<FlowKey> {
        let (_, words, _, meta) = self.read(index as usize)?;
        (!self.expired(meta, now)).then(|| key_from_words(&words))
    }

    /// Records that the entry at `index` was seen at `now`, and moves it to `state` unless it
    /// is closing already (closing is final). A no-op when the entry changed in between.
    pub fn touch(&self, index: u32, now: Second, state: Option<FlowState>) {
        let Some(entry) = self.bodies.get(index as usize) else {
            return;
        };
        // Relaxed: the meta word is one value; a lost race leaves a still-valid meta.
        let old = entry.meta.load(Ordering::Relaxed);
        let mut new_state = meta_state(old);
        if let Some(s) = state {
            if new_state != FlowState::Closing {
                new_state = s;
            }
        }
        if meta_seen(old) >= now && new_state == meta_state(old) {
            return; // Nothing to write: keep the cache line shared.
        }
        let new = meta_word(
            now.max(meta_seen(old)),
            meta_port(old),
            old & REVERSE != 0,
            meta_proto(old),
            new_state,
        );
        // Relaxed: a failure means someone else updated it, which is as good.
        let updated = entry
            .meta
            .compare_exchange(old, new, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        let protected = new_state == FlowState::Established;
        if updated && protected != (meta_state(old) == FlowState::Established) {
            self.set_evictable(index as usize, !protected);
        }
    }

    /// Keeps the `seq` word's eviction hint in step with the entry's state. A reader racing
    /// this sees the `seq` word change and misses once; this happens once or twice per flow.
    fn set_evictable(&self, index: usize, evictable: bool) {
        let seq = self.seq(index);
        // Relaxed load: the CAS below only succeeds on the exact word seen.
        let old = seq.load(Ordering::Relaxed);
        if old & STATE_MASK != VALID {
            return;
        }
        let new = if evictable {
            old | EVICTABLE
        } else {
            old & !EVICTABLE
        };
        // Release on success: it stays a publication of the same words. Relaxed on failure:
        // the entry changed, and its new owner set its own hint.
        let _ = seq.compare_exchange(old, new, Ordering::Release, Ordering::Relaxed);
    }

    /// Inserts `key` -> `value` in `state` unless it is there already.
    pub fn insert(
        &self,
        key: &FlowKey,
        hash: u64,
        value: FlowValue,
        state: FlowState,
        now: Second,
    ) -> Insert {
        let words = key_words(key);
        let tag = seq_tag(hash);
        if let Some(hit) = self.find(hash, tag, &words, now) {
            return Insert::Existing(hit);
        }
        let candidates = self.candidates(hash);
        let Some(index) = self.claim(candidates.clone(), tag, now) else {
            return Insert::Full;
        };
        self.publish(index, &words, value, key.proto, state, now);
        self.resolve_duplicates(candidates, index, tag, &words, now)
    }

    /// Claims one of the `entries` (it is then *writing*, showing `tag` so that a racing
    /// insert of the same flow can see it): a free one, else a new or closing one, else an
    /// expired one.
    fn claim(
        &self,
        entries: impl Iterator<Item = usize> + Clone,
        tag: u32,
        now: Second,
    ) -> Option<usize> {
        let try_claim = |i: usize, seq: u64| {
            let claimed = seq_word(tag, (seq & COUNTER_MASK) + COUNTER_ONE, WRITING);
            // Acquire on success: this writer's later stores follow the claim.
            // Relaxed on failure: the entry is simply skipped.
            self.seq(i)
                .compare_exchange(seq, claimed, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        };
        for _ in 0..2 {
            let mut seen = [(0usize, 0u64); 2 * WAYS];
            let mut n = 0;
            for (slot, i) in seen.iter_mut().zip(entries.clone()) {
                // Acquire: pairs with the publication, so a meta read below is current.
                *slot = (i, self.seq(i).load(Ordering::Acquire));
                n += 1;
            }
            let seen = &seen[..n];
            // A free entry, in the emptier bucket first ("least loaded of two choices": first
            // fit into the first bucket overflowed 0.6% of inserts at half load). Only the
            // buckets' seq lines are read.
            let first_bucket = seen[0].0 / WAYS;
            let is_free = |&&(_, seq): &&(usize, u64)| seq & STATE_MASK == FREE;
            let in_first = |&&(i, _): &&(usize, u64)| i / WAYS == first_bucket;
            let free_in_first = seen.iter().filter(is_free).filter(in_first).count();
            let free_in_second = seen.iter().filter(is_free).count() - free_in_first;
            let second_first = free_in_second > free_in_first;
            // The preferred bucket's free entries, then the other's.
            let free = seen
                .iter()
                .filter(is_free)
                .filter(|e| in_first(e) != second_first)
                .chain(
                    seen.iter()
                        .filter(is_free)
                        .filter(|e| in_first(e) == second_first),
                );
            for &(i, seq) in free {
                if try_claim(i, seq) {
                    return Some(i);
                }
            }
            // Else a new or closing entry, chosen from the tag lines alone (the first one in
            // way order): reading bodies to find the least recently seen made every insert
            // into a full bucket pair wait on up to 16 cache misses (`make bench`
            // decide/new-flow: 1193 ns per packet).
            let evictable = seen
                .iter()
                .find(|(_, seq)| seq & STATE_MASK == VALID && seq & EVICTABLE != 0);
            if let Some(&(i, seq)) = evictable {
                if try_claim(i, seq) {
                    // Relaxed: a statistic (an expired entry may be counted too: the tag line
                    // does not carry ages).
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                    return Some(i);
                }
                continue; // lost the race for it: look again
            }
            // Else an expired entry (established ones expire too: read their ages).
            let mut best: Option<(u8, Second, usize, u64)> = None;
            for &(i, seq) in seen {
                if seq & STATE_MASK != VALID {
                    continue;
                }
                // Relaxed: ranking only; the claim CAS decides.
                let meta = self.bodies[i].meta.load(Ordering::Relaxed);
                let rank = if self.expired(meta, now) {
                    (1, 0)
                } else if meta_state(meta) != FlowState::Established {
                    (2, meta_seen(meta))
                } else {
                    continue;
                };
                if best.is_none_or(|b| rank < (b.0, b.1)) {
                    best = Some((rank.0, rank.1, i, seq));
                }
            }
            match best {
                Some((rank, _, i, seq)) if try_claim(i, seq) => {
                    if rank == 2 {
                        // Relaxed: a statistic.
                        self.evictions.fetch_add(1, Ordering::Relaxed);
                    }
                    return Some(i);
                }
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

    /// Writes the claimed entry at `index` and makes it valid.
    fn publish(
        &self,
        index: usize,
        words: &[u64; 5],
        value: FlowValue,
        proto: IpProto,
        state: FlowState,
        now: Second,
    ) {
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
        entry.value.store(value_word(value), Ordering::Relaxed);
        entry.meta.store(
            meta_word(now, value.port, value.reverse, proto, state),
            Ordering::Relaxed,
        );
        // Release: readers that see *valid* see the words above.
        let hint = if state == FlowState::Established {
            0
        } else {
            EVICTABLE
        };
        seq.store(
            (claimed & !(STATE_MASK | EVICTABLE)) | hint | VALID,
            Ordering::Release,
        );
    }

    /// After publishing at `mine`: keeps one entry per key in the flow's buckets (see the
    /// module docs).
    fn resolve_duplicates(
        &self,
        entries: impl Iterator<Item = usize>,
        mine: usize,
        tag: u32,
        words: &[u64; 5],
        now: Second,
    ) -> Insert {
        // SeqCst fence: of two inserts of one key, each publishes, fences, then looks at the
        // other's entry; the fences order the two publications, so at least one insert sees
        // the other's.
        fence(Ordering::SeqCst);
        let own = u32::try_from(mine).unwrap_or(u32::MAX);
        for i in entries {
            if i == mine {
                continue;
            }
            // Acquire: pairs with the other insert's publication.
            let seq = self.seq(i).load(Ordering::Acquire);
            if seq_tag(seq) != tag {
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
        Insert::Inserted(own)
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

    /// Removes the entry at `index` if it still holds `key`.
    pub fn remove(&self, index: u32, key: &FlowKey) {
        if let Some((seq, words, _, _)) = self.read(index as usize) {
            if same_key(&words, &key_words(key)) {
                self.withdraw_if(index as usize, seq);
            }
        }
    }

    /// Every live entry, read consistently one by one (the table keeps changing meanwhile).
    pub fn iter(&self, now: Second) -> impl Iterator<Item = (FlowKey, Hit)> + '_ {
        (0..self.bodies.len()).filter_map(move |i| {
            let (_, words, value, meta) = self.read(i)?;
            if self.expired(meta, now) {
                return None;
            }
            let hit = Hit {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                value: value_from_word(value, meta),
                state: meta_state(meta),
                last_seen: meta_seen(meta),
            };
            Some((key_from_words(&words), hit))
        })
    }
}

impl core::fmt::Debug for FlowTable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "FlowTable({} entries)", self.bodies.len())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::lb::hash::flow_hash;
    use crate::packet::key_addr;

    fn key(port: u16) -> FlowKey {
        FlowKey::new(
            Family::Ipv4,
            IpProto::TCP,
            (key_addr([198, 18, 0, 1].into()), port),
            (key_addr([198, 18, 64, 1].into()), 80),
        )
    }

    fn value(b: u32) -> FlowValue {
        FlowValue {
            a: 1,
            b,
            ..FlowValue::default()
        }
    }

    #[test]
    fn an_entry_takes_64_bytes_and_a_bucket_of_tags_one_cache_line() {
        assert_eq!(core::mem::size_of::<SeqLine>(), 64);
        assert_eq!(core::mem::align_of::<SeqLine>(), 64);
        assert_eq!(core::mem::size_of::<Body>() + 8, 64);
        let t = FlowTable::new(1024, Timeouts::default());
        assert_eq!(t.memory_bytes(), t.capacity() * 64);
    }

    #[test]
    fn keys_survive_their_packing_into_words() {
        let k = FlowKey::new(
            Family::Ipv6,
            IpProto::UDP,
            (key_addr("2001:2::1".parse().unwrap()), 5353),
            (key_addr("2001:2::40:1".parse().unwrap()), 53),
        );
        assert_eq!(key_from_words(&key_words(&k)), k);
    }

    #[test]
    fn an_inserted_flow_is_found_until_it_expires() {
        let t = FlowTable::new(64, Timeouts::default());
        let k = key(40000);
        let h = flow_hash(&k);
        assert!(matches!(
            t.insert(&k, h, value(7), FlowState::New, 100),
            Insert::Inserted(_)
        ));
        let hit = t.lookup(&k, h, 150).unwrap();
        assert_eq!((hit.value.b, hit.state), (7, FlowState::New));
        assert!(
            t.lookup(&k, h, 100 + 121).is_none(),
            "TCP new times out after 120 s"
        );
        assert!(t.lookup(&key(40001), flow_hash(&key(40001)), 150).is_none());
    }

    #[test]
    fn a_second_insert_of_a_key_returns_the_first() {
        let t = FlowTable::new(64, Timeouts::default());
        let k = key(1);
        let h = flow_hash(&k);
        let _ = t.insert(&k, h, value(1), FlowState::New, 0);
        match t.insert(&k, h, value(2), FlowState::New, 0) {
            Insert::Existing(hit) => assert_eq!(hit.value.b, 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn touching_moves_state_and_closing_is_final() {
        let t = FlowTable::new(64, Timeouts::default());
        let k = key(1);
        let h = flow_hash(&k);
        let Insert::Inserted(i) = t.insert(&k, h, value(1), FlowState::New, 0) else {
            panic!()
        };
        t.touch(i, 5, Some(FlowState::Established));
        assert_eq!(t.lookup(&k, h, 5).unwrap().state, FlowState::Established);
        assert!(t.lookup(&k, h, 86_000).is_some(), "established lives long");
        t.touch(i, 6, Some(FlowState::Closing));
        t.touch(i, 7, Some(FlowState::Established));
        let hit = t.lookup(&k, h, 7).unwrap();
        assert_eq!((hit.state, hit.last_seen), (FlowState::Closing, 7));
    }

    #[test]
    fn a_full_bucket_evicts_new_flows_but_never_established_ones() {
        // One bucket: every key lands in it.
        let t = FlowTable::new(WAYS, Timeouts::default());
        let keys: Vec<FlowKey> = (0..WAYS as u16).map(key).collect();
        for (n, k) in keys.iter().enumerate() {
            let Insert::Inserted(i) = t.insert(k, flow_hash(k), value(1), FlowState::New, n as u32)
            else {
                panic!()
            };
            t.touch(i, n as u32, Some(FlowState::Established));
        }
        let flood = key(999);
        assert_eq!(
            t.insert(&flood, flow_hash(&flood), value(2), FlowState::New, 10),
            Insert::Full
        );
        assert!(keys.iter().all(|k| t.lookup(k, flow_hash(k), 10).is_some()));
        assert_eq!((t.full_inserts(), t.evictions()), (1, 0));

        // With one of them new again (closing), the flood takes its place.
        let hit = t.lookup(&keys[2], flow_hash(&keys[2]), 10).unwrap();
        t.touch(hit.index, 10, Some(FlowState::Closing));
        assert!(matches!(
            t.insert(&flood, flow_hash(&flood), value(2), FlowState::New, 11),
            Insert::Inserted(_)
        ));
        assert!(t.lookup(&keys[2], flow_hash(&keys[2]), 11).is_none());
        assert!(t.lookup(&keys[0], flow_hash(&keys[0]), 11).is_some());
        assert_eq!((t.full_inserts(), t.evictions()), (1, 1));
    }

    #[test]
    fn expired_entries_are_reused_first() {
        let t = FlowTable::new(WAYS, Timeouts::default());
        for p in 0..WAYS as u16 {
            let k = key(p);
            let _ = t.insert(&k, flow_hash(&k), value(1), FlowState::Established, 0);
        }
        let k = key(500);
        // UDP-like short timeouts do not apply: these are TCP established, fresh until 86 400.
        assert_eq!(
            t.insert(&k, flow_hash(&k), value(1), FlowState::New, 1000),
            Insert::Full
        );
        assert!(matches!(
            t.insert(&k, flow_hash(&k), value(1), FlowState::New, 90_000),
            Insert::Inserted(_)
        ));
    }

    #[test]
    fn removal_and_iteration_see_what_is_there() {
        let t = FlowTable::new(1024, Timeouts::default());
        let mut indices = Vec::new();
        for p in 0..100 {
            let k = key(p);
            if let Insert::Inserted(i) =
                t.insert(&k, flow_hash(&k), value(u32::from(p)), FlowState::New, 0)
            {
                indices.push((i, k));
            }
        }
        assert_eq!(t.iter(0).count(), indices.len());
        let (i, k) = indices[0];
        t.remove(i, &k);
        assert!(t.lookup(&k, flow_hash(&k), 0).is_none());
        assert_eq!(t.iter(0).count(), indices.len() - 1);
        assert!(t
            .iter(0)
            .all(|(k, hit)| u32::from(k.src_port) == hit.value.b));
    }
}
