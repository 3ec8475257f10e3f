//! The fragment table: the translation a fragmented datagram's first fragment got, for its
//! later fragments, which carry no ports and so cannot find their flow.
//!
//! Owns: a small fixed array of slots shared by every worker (the first fragment may arrive on
//! one worker's queue and the rest on another's: NICs hash fragments by addresses only),
//! keyed by (family, protocol, source, destination, IP identification), each slot holding the
//! verdict to repeat and the second it was recorded. A datagram's set of [`WAYS`] slots is
//! found by hash; a new record takes a free or expired slot of the set, or else its oldest
//! (whose remaining fragments then go unmatched: counted by the caller). Four ways, not one:
//! with one slot per hash, datagrams in flight at once collided often enough to lose one in a
//! few thousand. Entries are good for [`FRAGMENT_SECONDS`], as long as the kernel waits to
//! reassemble (`ipfrag_time`).
//!
//! Must not know: packet bytes, sockets, threads.
//!
//! Concurrency: each slot is a sequence lock of atomics (no lock is ever held): a writer takes
//! the slot by moving its sequence word from even to odd (a writer that finds it odd, or
//! loses the race, gives its record up: the loser's fragments are unmatched, as after a
//! collision), writes the words, and publishes with the next even value; a reader keeps what it
//! read only if the sequence word was the same even value before and after.

use crate::packet::{Endpoint, Family, FlowKey, IpProto};
use crate::sync::{fence, AtomicU64, Ordering};

use super::decide::Verdict;
use super::flow::Second;
use super::hash::flow_hash;

/// How long a first fragment's translation is kept for its later fragments (Linux's
/// `net.ipv4.ipfrag_time` default).
pub const FRAGMENT_SECONDS: Second = 30;

/// The default number of slots: datagrams in flight at once, across all workers.
pub const FRAGMENT_SLOTS: usize = 4096;

/// Slots per set.
pub const WAYS: usize = 4;

/// Words per slot: key (2 + 2 address words and one of family, protocol, kind, id), the
/// second and the two ports, two endpoint addresses (2 words each), and the record's order.
const WORDS: usize = 11;

/// Which datagram a fragment belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentKey {
    /// IPv4 or IPv6.
    pub family: Family,
    /// The transport protocol.
    pub proto: IpProto,
    /// Source address (key form).
    pub src: [u8; 16],
    /// Destination address (key form).
    pub dst: [u8; 16],
    /// The IP identification.
    pub id: u32,
}

impl FragmentKey {
    /// The datagram of a fragment whose flow key (ports aside) is `key`.
    #[must_use]
    pub fn of(key: &FlowKey, id: u32) -> Self {
        Self {
            family: key.family,
            proto: key.proto,
            src: key.src_addr,
            dst: key.dst_addr,
            id,
        }
    }

    fn hash(&self) -> u64 {
        let as_flow = FlowKey::new(
            self.family,
            self.proto,
            (self.src, (self.id >> 16) as u16),
            (self.dst, self.id as u16),
        );
        flow_hash(&as_flow)
    }
}

struct Slot {
    seq: AtomicU64,
    words: [AtomicU64; WORDS],
}

impl Slot {
    fn new() -> Self {
        Self {
            seq: AtomicU64::new(0),
            words: core::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// The table. See the module documentation.
pub struct Fragments {
    slots: Box<[Slot]>,
    /// Sets - 1 (a power of two less one).
    mask: usize,
    /// Numbers records in the order they are made: a full set gives up its oldest record,
    /// never one of the datagrams in flight now.
    order: AtomicU64,
}

impl core::fmt::Debug for Fragments {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Fragments")
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl Default for Fragments {
    fn default() -> Self {
        Self::new(FRAGMENT_SLOTS)
    }
}

impl Fragments {
    /// A table of at least `slots` slots, in sets of [`WAYS`] (a power of two of them).
    #[must_use]
    pub fn new(slots: usize) -> Self {
        let sets = slots.div_ceil(WAYS).max(1).next_power_of_two();
        Self {
            slots: (0..sets * WAYS).map(|_| Slot::new()).collect(),
            mask: sets - 1,
            order: AtomicU64::new(0),
        }
    }

    fn set(&self, key: &FragmentKey) -> &[Slot] {
        // The mask keeps the index in range; the truncation only drops hash bits.
        #[allow(clippy::cast_possible_truncation)]
        let at = (key.hash() as usize) & self.mask;
        &self.slots[at * WAYS..(at + 1) * WAYS]
    }

    /// Records that the datagram `key`'s first fragment got `verdict` at `now`. Only
    /// translations are recorded (forward and reply, either mode); anything else is ignored.
    pub fn record(&self, key: &FragmentKey, verdict: &Verdict, now: Second) {
        // Relaxed: the number only orders records for eviction; nothing is published by it.
        let order = self.order.fetch_add(1, Ordering::Relaxed);
        let Some(words) = encode(key, verdict, now, order) else {
            return;
        };
        // The datagram's own slot if it has one, else a free or expired one, else the one
        // recorded first (the datagram least likely still in flight: a table full of records
        // of finished datagrams is the usual state under fragmented traffic).
        let set = self.set(key);
        let mut chosen = 0;
        let mut oldest = u64::MAX;
        for (i, slot) in set.iter().enumerate() {
            match read(slot) {
                Some(w) if same_datagram(key, &w) => {
                    chosen = i;
                    break;
                }
                Some(w) if now.wrapping_sub(recorded_at(&w)) <= FRAGMENT_SECONDS => {
                    if w[WORDS - 1] < oldest {
                        (chosen, oldest) = (i, w[WORDS - 1]);
                    }
                }
                // Free, expired, or being written (taken just after, or skipped below).
                _ => (chosen, oldest) = (i, 0),
            }
        }
        let slot = &set[chosen];
        let seq = slot.seq.load(Ordering::Relaxed);
        // Acquire: the words written below cannot move before the slot is taken.
        if seq & 1 == 1
            || slot
                .seq
                .compare_exchange(
                    seq,
                    seq.wrapping_add(1),
                    Ordering::Acquire,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        // Release: a reader that sees a word written below also sees the odd sequence word
        // (and so discards what it read).
        fence(Ordering::Release);
        for (word, value) in slot.words.iter().zip(words) {
            word.store(value, Ordering::Relaxed);
        }
        // Release: the words are visible to whoever reads this even value.
        slot.seq.store(seq.wrapping_add(2), Ordering::Release);
    }

    /// The verdict the datagram `key`'s first fragment got, if recorded within
    /// [`FRAGMENT_SECONDS`] of `now`.
    #[must_use]
    pub fn lookup(&self, key: &FragmentKey, now: Second) -> Option<Verdict> {
        self.set(key)
            .iter()
            .filter_map(read)
            .find(|w| same_datagram(key, w))
            .and_then(|w| decode(key, &w, now))
    }
}

/// A slot's words, if it holds a record that no writer is changing.
fn read(slot: &Slot) -> Option<[u64; WORDS]> {
    // Acquire: pairs with the writer's final Release store.
    let before = slot.seq.load(Ordering::Acquire);
    if before & 1 == 1 || before == 0 {
        return None;
    }
    let mut words = [0u64; WORDS];
    for (out, word) in words.iter_mut().zip(&slot.words) {
        *out = word.load(Ordering::Relaxed);
    }
    // Acquire: the loads above complete before the sequence word is read again.
    fence(Ordering::Acquire);
    (slot.seq.load(Ordering::Relaxed) == before).then_some(words)
}

/// The second a record was made.
fn recorded_at(w: &[u64; WORDS]) -> Second {
    // The top half of the word holds the second.
    (w[5] >> 32) as Second
}

/// Whether the record `w` is the datagram `key`'s.
fn same_datagram(key: &FragmentKey, w: &[u64; WORDS]) -> bool {
    let kind = (w[0] >> 40) & 0xff;
    let [s0, s1] = halves(&key.src);
    let [d0, d1] = halves(&key.dst);
    w[0] == head(key, kind) && [w[1], w[2], w[3], w[4]] == [s0, s1, d0, d1]
}

/// Verdict kinds as stored.
const FORWARD: u64 = 1;
const REPLY: u64 = 2;
const FORWARD_SNAT: u64 = 3;
const REPLY_SNAT: u64 = 4;
const FORWARD_DSR: u64 = 5;

fn family_code(family: Family) -> u64 {
    match family {
        Family::Ipv4 => 4,
        Family::Ipv6 => 6,
    }
}

fn halves(addr: &[u8; 16]) -> [u64; 2] {
    let (hi, lo) = addr.split_at(8);
    [
        u64::from_be_bytes(hi.try_into().unwrap_or_default()),
        u64::from_be_bytes(lo.try_into().unwrap_or_default()),
    ]
}

fn joined(hi: u64, lo: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&hi.to_be_bytes());
    out[8..].copy_from_slice(&lo.to_be_bytes());
    out
}

fn head(key: &FragmentKey, kind: u64) -> u64 {
    (family_code(key.family) << 56)
        | (u64::from(key.proto.0) << 48)
        | (kind << 40)
        | u64::from(key.id)
}

fn encode(key: &FragmentKey, verdict: &Verdict, now: Second, order: u64) -> Option<[u64; WORDS]> {
    let (kind, a, b) = match *verdict {
        Verdict::Forward(to) => (FORWARD, to, to),
        Verdict::Reply(from) => (REPLY, from, from),
        Verdict::ForwardSnat { to, from } => (FORWARD_SNAT, to, from),
        Verdict::ReplySnat { from, to } => (REPLY_SNAT, from, to),
        Verdict::ForwardDsr(to) => (FORWARD_DSR, to, to),
        _ => return None,
    };
    let [s0, s1] = halves(&key.src);
    let [d0, d1] = halves(&key.dst);
    let [a0, a1] = halves(a.key_addr());
    let [b0, b1] = halves(b.key_addr());
    let ports = (u64::from(now) << 32) | (u64::from(a.port()) << 16) | u64::from(b.port());
    Some([
        head(key, kind),
        s0,
        s1,
        d0,
        d1,
        ports,
        a0,
        a1,
        b0,
        b1,
        order,
    ])
}

fn decode(key: &FragmentKey, w: &[u64; WORDS], now: Second) -> Option<Verdict> {
    if !same_datagram(key, w) || now.wrapping_sub(recorded_at(w)) > FRAGMENT_SECONDS {
        return None;
    }
    let kind = (w[0] >> 40) & 0xff;
    let a = Endpoint::from_key_form(key.family, joined(w[6], w[7]), (w[5] >> 16) as u16);
    let b = Endpoint::from_key_form(key.family, joined(w[8], w[9]), w[5] as u16);
    match kind {
        FORWARD => Some(Verdict::Forward(a)),
        REPLY => Some(Verdict::Reply(a)),
        FORWARD_SNAT => Some(Verdict::ForwardSnat { to: a, from: b }),
        REPLY_SNAT => Some(Verdict::ReplySnat { from: a, to: b }),
        FORWARD_DSR => Some(Verdict::ForwardDsr(a)),
        _ => None,
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn key(id: u32) -> FragmentKey {
        FragmentKey {
            family: Family::Ipv4,
            proto: IpProto::UDP,
            src: crate::packet::key_addr([198, 18, 0, 1].into()),
            dst: crate::packet::key_addr([198, 18, 64, 1].into()),
            id,
        }
    }

    fn backend() -> Endpoint {
        Endpoint::new([198, 18, 128, 1].into(), 8080)
    }

    #[test]
    fn a_recorded_translation_is_found_for_its_datagram_only_and_only_while_fresh() {
        let table = Fragments::new(64);
        let forward = Verdict::Forward(backend());
        table.record(&key(7), &forward, 100);
        assert_eq!(table.lookup(&key(7), 100), Some(forward));
        assert_eq!(table.lookup(&key(7), 100 + FRAGMENT_SECONDS), Some(forward));
        assert_eq!(
            table.lookup(&key(7), 101 + FRAGMENT_SECONDS),
            None,
            "expired"
        );
        assert_eq!(table.lookup(&key(8), 100), None, "another datagram");
        let mut other_proto = key(7);
        other_proto.proto = IpProto::TCP;
        assert_eq!(table.lookup(&other_proto, 100), None);
    }

    #[test]
    fn every_translating_verdict_round_trips_and_others_are_not_recorded() {
        let table = Fragments::new(64);
        let snat = Endpoint::new([198, 18, 64, 100].into(), 61000);
        let client = Endpoint::new([198, 18, 0, 1].into(), 40000);
        let vip = Endpoint::new([198, 18, 64, 1].into(), 80);
        for (id, verdict) in [
            Verdict::Forward(backend()),
            Verdict::Reply(vip),
            Verdict::ForwardSnat {
                to: backend(),
                from: snat,
            },
            Verdict::ReplySnat {
                from: vip,
                to: client,
            },
            Verdict::ForwardDsr(backend()),
        ]
        .into_iter()
        .enumerate()
        {
            let id = u32::try_from(id).unwrap();
            table.record(&key(id), &verdict, 5);
            assert_eq!(table.lookup(&key(id), 5), Some(verdict));
        }
        table.record(&key(99), &Verdict::Pass, 5);
        assert_eq!(table.lookup(&key(99), 5), None);
    }

    /// One set of four: four datagrams share it; a fifth replaces the one recorded first,
    /// by the order of records, not by the second (make test lost a datagram in flight when
    /// ties in the recorded second let the first slot scanned go, however fresh).
    #[test]
    fn a_set_holds_four_datagrams_and_a_fifth_replaces_the_one_recorded_first() {
        let table = Fragments::new(WAYS);
        let forward = Verdict::Forward(backend());
        for id in 1..=4 {
            table.record(&key(id), &forward, 5);
        }
        assert!((1..=4).all(|id| table.lookup(&key(id), 5) == Some(forward)));
        // Datagram 1 is recorded again (its slot kept, its record now the newest).
        table.record(&key(1), &forward, 5);
        let other = Verdict::Forward(Endpoint::new([198, 18, 128, 2].into(), 8080));
        table.record(&key(5), &other, 5);
        assert_eq!(table.lookup(&key(2), 5), None, "the first recorded went");
        assert!([1, 3, 4]
            .iter()
            .all(|&id| table.lookup(&key(id), 5) == Some(forward)));
        assert_eq!(table.lookup(&key(5), 5), Some(other));
    }
}
