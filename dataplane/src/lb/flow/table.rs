//! One family's table: the buckets, the entries and the insert protocol the module
//! documentation ([`super`]) describes. [`super::FlowTable`] holds one per address family and
//! sends each key to its family's; this module knows nothing of families beyond the number of
//! key words its entries store (the length of [`Body::key`]).
//!
//! Entry indices are global: a table's first entry has the index it was made with
//! (`first`), so that an [`EntryRef`] names one entry of the whole [`super::FlowTable`].

use crate::memory::huge_page_slice;
use crate::packet::{FlowKey, IpProto};
use crate::sync::{fence, AtomicU64, Ordering};

use super::words::{
    eviction_rank, key_from_words, key_words, meta_proto, meta_seen, meta_seen_at, same_key,
    same_occupant, seq_born, seq_flow_state, seq_stamp, seq_tag, seq_with_state, seq_word,
    value_from_words, value_words, KeyWords, COUNTER_MASK, COUNTER_ONE, FREE, STATE_MASK, VALID,
    WRITING,
};
use super::{
    EntryRef, FlowState, FlowValue, Hit, Insert, Place, Second, Tick, Timeouts, MAX_CAPACITY, WAYS,
};

/// The `seq` words of one bucket, together in one cache line: a lookup reads the tags of a
/// whole bucket with one memory access, and touches an entry's body only on a tag match.
#[repr(align(64))]
pub(super) struct SeqLine([AtomicU64; WAYS]);

impl SeqLine {
    fn new() -> Self {
        Self([(); WAYS].map(|()| AtomicU64::new(FREE)))
    }
}

/// The rest of an entry, beside its `seq` word: the key words, the value and the meta word
/// (last seen, port, protocol, flags). Aligned to its size, so that reading a body is one
/// cache miss, never two.
pub(super) trait Body: Send + Sync {
    fn new() -> Self;
    /// The first words of a key's [`KeyWords`]; the others are zero in every key of the
    /// body's family.
    fn key(&self) -> &[AtomicU64];
    fn value(&self) -> &AtomicU64;
    fn meta(&self) -> &AtomicU64;
}

/// An IPv4 entry's body: two key words, 32 bytes (40 with its `seq` word), two to a cache line.
#[repr(C, align(32))]
pub(super) struct Body4 {
    key: [AtomicU64; 2],
    value: AtomicU64,
    meta: AtomicU64,
}

/// An IPv6 entry's body: five key words, 56 bytes padded to a cache line of its own (72 with
/// its `seq` word). Unaligned, seven in eight such bodies straddled two lines.
#[repr(C, align(64))]
pub(super) struct Body6 {
    key: [AtomicU64; 5],
    value: AtomicU64,
    meta: AtomicU64,
}

macro_rules! body {
    ($body:ident, $words:literal) => {
        impl Body for $body {
            fn new() -> Self {
                Self {
                    key: [(); $words].map(|()| AtomicU64::new(0)),
                    value: AtomicU64::new(0),
                    meta: AtomicU64::new(0),
                }
            }
            #[inline(always)]
            fn key(&self) -> &[AtomicU64] {
                &self.key
            }
            #[inline(always)]
            fn value(&self) -> &AtomicU64 {
                &self.value
            }
            #[inline(always)]
            fn meta(&self) -> &AtomicU64 {
                &self.meta
            }
        }
    };
}
body!(Body4, 2);
body!(Body6, 5);

/// One entry read as a consistent whole.
pub(super) struct Read {
    seq: u64,
    key: KeyWords,
    value: u64,
    meta: u64,
}

/// The entries of one family.
pub(super) struct Table<B> {
    seqs: Box<[SeqLine]>,
    bodies: Box<[B]>,
    bucket_mask: usize,
    /// The global index of this table's first entry.
    first: usize,
    timeouts: Timeouts,
    /// Live (not yet expired) entries that were not established, taken for another flow.
    evictions: AtomicU64,
    /// Inserts that found no entry to take.
    full: AtomicU64,
}

impl<B: Body> Table<B> {
    /// A table of at least `capacity` entries (rounded up to a power of two of buckets, at
    /// most [`MAX_CAPACITY`]), the first of which has the global index `first`. Its memory
    /// ([`Self::memory_for`]) is allocated here, once.
    pub(super) fn new(capacity: usize, timeouts: Timeouts, first: usize) -> Self {
        let buckets = Self::buckets_for(capacity);
        Self {
            seqs: huge_page_slice(buckets, SeqLine::new),
            bodies: huge_page_slice(buckets * WAYS, B::new),
            bucket_mask: buckets - 1,
            first,
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
    pub(super) fn memory_for(capacity: usize) -> usize {
        Self::buckets_for(capacity) * WAYS * Self::entry_bytes()
    }

    /// Bytes one entry takes: its `seq` word and its body.
    pub(super) const fn entry_bytes() -> usize {
        core::mem::size_of::<u64>() + core::mem::size_of::<B>()
    }

    pub(super) fn evictions(&self) -> u64 {
        // Relaxed: a statistic read on its own.
        self.evictions.load(Ordering::Relaxed)
    }

    pub(super) fn full_inserts(&self) -> u64 {
        // Relaxed: a statistic read on its own.
        self.full.load(Ordering::Relaxed)
    }

    /// The number of entries.
    pub(super) fn capacity(&self) -> usize {
        self.bodies.len()
    }

    /// Whether the global index `index` is one of this table's.
    pub(super) fn holds(&self, index: u32) -> bool {
        (index as usize)
            .checked_sub(self.first)
            .is_some_and(|i| i < self.bodies.len())
    }

    /// Bytes of entry memory.
    pub(super) fn memory_bytes(&self) -> usize {
        self.seqs.len() * core::mem::size_of::<SeqLine>()
            + self.bodies.len() * core::mem::size_of::<B>()
    }

    /// The local index of the global `index` (out of range, so unreachable, when it is not
    /// this table's).
    fn local(&self, index: u32) -> usize {
        (index as usize).wrapping_sub(self.first)
    }

    /// The reference to local entry `i` with `seq`'s stamp.
    fn entry_ref(&self, i: usize, seq: u64) -> EntryRef {
        EntryRef {
            index: u32::try_from(i + self.first).unwrap_or(u32::MAX),
            stamp: seq_stamp(seq),
        }
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
    fn find(&self, hash: u64, tag: u32, words: &KeyWords, now: Second) -> Option<Hit> {
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
        let mut key = KeyWords::default();
        for (word, atomic) in key.iter_mut().zip(body.key()) {
            *word = atomic.load(Ordering::Relaxed);
        }
        let value = body.value().load(Ordering::Relaxed);
        let meta = body.meta().load(Ordering::Relaxed);
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
    pub(super) fn prefetch(&self, hash: u64) {
        for bucket in self.buckets(hash) {
            if let Some(line) = self.seqs.get(bucket) {
                crate::prefetch::prefetch_read(line);
            }
        }
    }

    /// The second prefetch stage of a batch: with the tag lines in cache (after
    /// [`Self::prefetch`]), prefetches the body of every entry whose tag matches the flow's,
    /// or where none does (a new flow, most likely) the body an insert at `tick` would claim
    /// (`prefetch_claim`), and returns that place.
    #[inline]
    pub(super) fn prefetch_entry(&self, hash: u64, tick: Tick) -> Option<Place> {
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
        if matched {
            None
        } else {
            self.prefetch_claim(hash, tick)
        }
    }

    /// Prefetches the body of the entry an insert of a flow with this hash at `tick` would
    /// claim (the first it would try), its tag lines being in cache. An insert writes that
    /// body and then fences, and the fence waits for the body's cache miss: with a table much
    /// larger than the cache, end to end, 71% of `insert_at`'s samples were that wait (a
    /// criterion table of 16 MiB stays in this machine's cache and barely shows it).
    /// Returns the place, which an insert soon after may try first instead of choosing again.
    #[inline(never)]
    fn prefetch_claim(&self, hash: u64, tick: Tick) -> Option<Place> {
        let ways = self.ways(hash);
        let j = ways
            .free_in_order()
            .next()
            .or_else(|| ways.most_evictable(tick))?;
        let i = ways.index(j);
        // A read brings a line no other core holds in the exclusive state, which the insert's
        // stores then take without another miss.
        crate::prefetch::prefetch_read(self.bodies.get(i)?);
        Some(Place {
            index: u32::try_from(i + self.first).ok()?,
            seq: ways.seq[j],
        })
    }

    /// Finds a live entry for `key` (whose flow hash is `hash`).
    #[must_use]
    pub(super) fn lookup(&self, key: &FlowKey, hash: u64, now: Second) -> Option<Hit> {
        let words = key_words(key);
        let tag = seq_tag(hash);
        self.find(hash, tag, &words, now)
    }

    fn hit_at(&self, index: usize, tag: u32, words: &KeyWords, now: Second) -> Option<Hit> {
        let read = self.read(index)?;
        if seq_tag(read.seq) != tag
            || !same_key(&read.key, words)
            || self.expired(read.seq, read.meta, now)
        {
            return None;
        }
        Some(self.hit_of(index, &read))
    }

    fn hit_of(&self, index: usize, read: &Read) -> Hit {
        Hit {
            entry: self.entry_ref(index, read.seq),
            value: value_from_words(read.value, read.meta),
            state: seq_flow_state(read.seq),
            last_seen: meta_seen(read.meta),
        }
    }

    /// The live entry `entry` refers to, if it is still the one referred to.
    fn read_ref(&self, entry: EntryRef, now: Second) -> Option<Read> {
        let read = self.read(self.local(entry.index))?;
        (seq_stamp(read.seq) == entry.stamp && !self.expired(read.seq, read.meta, now))
            .then_some(read)
    }

    /// The forward entry a reverse entry refers to, with its key, if it is still that flow's:
    /// live, a forward entry, of the same Service. `None` for a forward `hit`, or when the
    /// forward entry expired or was evicted (its place perhaps taken by another flow).
    #[must_use]
    pub(super) fn forward_of(&self, reverse: &Hit, now: Second) -> Option<(FlowKey, Hit)> {
        let FlowValue::Reverse {
            service, forward, ..
        } = reverse.value
        else {
            return None;
        };
        let read = self.read_ref(forward, now)?;
        let hit = self.hit_of(self.local(forward.index), &read);
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
    pub(super) fn touch(&self, entry: EntryRef, now: Second, state: Option<FlowState>) {
        let index = self.local(entry.index);
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
        let old = body.meta().load(Ordering::Relaxed);
        if meta_seen(old) < now {
            let _ = body.meta().compare_exchange(
                old,
                meta_seen_at(old, now),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// Inserts `key` -> `value` in `state` unless it is there already, at second `now` and
    /// tick `tick` (which orders evictions), trying `place` first if given.
    #[expect(
        clippy::too_many_arguments,
        reason = "an insert's parts are distinct; the facade names them"
    )]
    pub(super) fn insert_at(
        &self,
        key: &FlowKey,
        hash: u64,
        value: FlowValue,
        state: FlowState,
        now: Second,
        tick: Tick,
        place: Option<Place>,
    ) -> Insert {
        let words = key_words(key);
        let tag = seq_tag(hash);
        // A place is offered only where none of the flow's ways showed its tag a moment ago
        // (`prefetch_entry`): the key was not there, and one inserted since is found after
        // publication, as a racing insert is.
        if place.is_none() {
            if let Some(hit) = self.find(hash, tag, &words, now) {
                return Insert::Existing(hit);
            }
        }
        let claimed = place
            .and_then(|p| self.claim_place(hash, tag, p))
            .or_else(|| self.claim(hash, tag, now, tick));
        let Some(index) = claimed else {
            return Insert::Full;
        };
        let stamp = self.publish(index, &words, value, key.proto, state, now, tick);
        self.resolve_duplicates(hash, index, stamp, tag, &words, now)
    }

    /// Claims `place` (chosen by [`Self::prefetch_claim`] for this hash) if its entry is still
    /// as it was seen then: the choice is not made twice. Any change since (another insert
    /// took it, a flow was seen there) leaves it, and the caller chooses again.
    fn claim_place(&self, hash: u64, tag: u32, place: Place) -> Option<usize> {
        let i = self.local(place.index);
        if i >= self.bodies.len() || !self.buckets(hash).contains(&(i / WAYS)) {
            return None;
        }
        let claimed = seq_word(tag, (place.seq & COUNTER_MASK) + COUNTER_ONE, WRITING);
        // Acquire on success: this writer's later stores follow the claim.
        // Relaxed on failure: the caller chooses again.
        self.seq(i)
            .compare_exchange(place.seq, claimed, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        if place.seq & STATE_MASK == VALID {
            // Relaxed: a statistic, as in `claim`.
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
        Some(i)
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
                let meta = self.bodies[ways.index(j)].meta().load(Ordering::Relaxed);
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
        words: &KeyWords,
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
        for (slot, w) in entry.key().iter().zip(words) {
            // Relaxed: published by the Release store of `seq` below.
            slot.store(*w, Ordering::Relaxed);
        }
        let (value, meta) = value_words(value, proto, now);
        entry.value().store(value, Ordering::Relaxed);
        entry.meta().store(meta, Ordering::Relaxed);
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
        words: &KeyWords,
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
            index: u32::try_from(mine + self.first).unwrap_or(u32::MAX),
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
    pub(super) fn remove(&self, entry: EntryRef, key: &FlowKey) {
        let index = self.local(entry.index);
        if let Some(read) = self.read(index) {
            if seq_stamp(read.seq) == entry.stamp && same_key(&read.key, &key_words(key)) {
                self.withdraw_if(index, read.seq);
            }
        }
    }

    /// Every live entry from global index `start` on, in index order, read consistently one
    /// by one (the table keeps changing meanwhile).
    pub(super) fn iter_from(
        &self,
        start: usize,
        now: Second,
    ) -> impl Iterator<Item = (FlowKey, Hit)> + '_ {
        (start.saturating_sub(self.first)..self.bodies.len()).filter_map(move |i| {
            let read = self.read(i)?;
            if self.expired(read.seq, read.meta, now) {
                return None;
            }
            Some((key_from_words(&read.key), self.hit_of(i, &read)))
        })
    }
}

/// The bits of a `seq` word that [`Table::find`] compares: the tag and the entry state.
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
        // Ways past `n` read as free: rank 0. Ranks first, then their maximum and where it is:
        // passes of fixed length without branches, which the compiler turns into vector
        // instructions (about 500 scalar ones for one loop that kept the best as it went).
        let mut ranks = [0; 2 * WAYS];
        for (rank, &seq) in ranks.iter_mut().zip(&self.seq) {
            *rank = eviction_rank(seq, tick);
        }
        let best = ranks.iter().copied().fold(0, u16::max);
        (best != 0).then(|| ranks.iter().take_while(|&&r| r != best).count())
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

#[cfg(test)]
mod tests {
    use super::super::words::seq_age;
    use super::*;

    /// Random `seq` words over every entry state, flow state and birth a table shows.
    fn random_ways(random: &mut u64, n: usize) -> Ways {
        let mut seq = [FREE; 2 * WAYS];
        for word in seq.iter_mut().take(n) {
            *random ^= *random << 13;
            *random ^= *random >> 7;
            *random ^= *random << 17;
            let state = [FREE, WRITING, VALID, VALID][usize::from(*random as u8 & 3)];
            let flow = [
                FlowState::New,
                FlowState::Replied,
                FlowState::Established,
                FlowState::Closing,
            ][usize::from((*random >> 8) as u8 & 3)];
            // A few births only, so that equal ages (and the tie rule) are common.
            let born = (*random >> 16) as u16 & 3;
            *word = seq_with_state(seq_born(seq_word(7, 0, state), born), flow);
        }
        Ways {
            buckets: [0, 1],
            n,
            seq,
        }
    }

    /// The eviction rule as the module states it, entry by entry: the valid entries of
    /// flows that are not established; of those, new and replied ones before closing ones;
    /// then the oldest; then the lowest way.
    fn most_evictable_by_rule(ways: &Ways, tick: Tick) -> Option<usize> {
        let flow = |j: usize| seq_flow_state(ways.seq[j]);
        let rank = |j: usize| (flow(j) != FlowState::Closing, seq_age(ways.seq[j], tick));
        (0..ways.n)
            .filter(|&j| ways.seq[j] & STATE_MASK == VALID && flow(j) != FlowState::Established)
            .max_by(|&a, &b| rank(a).cmp(&rank(b)).then(b.cmp(&a)))
    }

    #[test]
    fn an_insert_into_full_buckets_evicts_the_oldest_half_open_flow_else_the_oldest_closing_one() {
        let mut random = 0x2545_f491_4f6c_dd1d;
        for round in 0..20_000 {
            let ways = random_ways(&mut random, if round % 4 == 0 { WAYS } else { 2 * WAYS });
            let tick = 3;
            assert_eq!(
                ways.most_evictable(tick),
                most_evictable_by_rule(&ways, tick),
                "{:x?}",
                ways.seq
            );
        }
    }
}
