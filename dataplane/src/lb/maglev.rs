//! Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
//! Balancer", NSDI 2016, section 3.4).
//!
//! Each backend prefers the table slots of its own permutation, `offset + j * skip (mod M)`,
//! with offset and skip from two hashes of its stable key ([`super::hash`]); the population
//! loop lets backends take turns claiming their next preferred free slot until the table is
//! full. A weight of `w` gives a backend `w` turns per round. The table is a pure function of
//! the backend set, the weights, the table size and [`super::hash::HASH_VERSION`]: backends are
//! ordered by their stable key before the loop, so every xlb instance builds the same table
//! whatever order the backends arrived in.
//!
//! Table sizes come from a ladder of primes, the smallest at least 100 times the backend
//! count: a Service of a few backends costs a few hundred slots, and the size changes only
//! when the backend count crosses a rung, so a backend leaving rarely reshuffles the table.

use std::sync::Arc;

use crate::packet::Endpoint;

use super::hash::{backend_hashes, backend_key};

/// The primes table sizes are chosen from (each about twice the previous one).
pub const SIZE_LADDER: [u32; 10] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
];
/// Table slots per backend the automatic size aims for at least.
pub const SLOTS_PER_BACKEND: u64 = 100;
/// The largest number of backends a table holds (slots store a 16-bit backend index).
pub const MAX_BACKENDS: usize = u16::MAX as usize;

/// Why a table cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaglevError {
    /// No backend has a weight above zero.
    NoBackends,
    /// More backends than [`MAX_BACKENDS`].
    TooManyBackends,
    /// The requested size is not a prime between 251 and 131 071.
    BadTableSize(u32),
    /// Fewer slots than backends with a weight.
    TableTooSmall,
}

impl core::fmt::Display for MaglevError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoBackends => f.write_str("no backend has a weight above zero"),
            Self::TooManyBackends => write!(f, "more than {MAX_BACKENDS} backends"),
            Self::BadTableSize(m) => write!(
                f,
                "table size {m} is not a prime between {} and {}",
                SIZE_LADDER[0],
                SIZE_LADDER[SIZE_LADDER.len() - 1]
            ),
            Self::TableTooSmall => f.write_str("fewer table slots than weighted backends"),
        }
    }
}

impl std::error::Error for MaglevError {}

/// The automatic table size for `backends` backends: the smallest rung of [`SIZE_LADDER`] with
/// at least [`SLOTS_PER_BACKEND`] slots per backend, or the largest rung.
#[must_use]
pub fn table_size_for(backends: usize) -> u32 {
    let wanted = SLOTS_PER_BACKEND.saturating_mul(u64::try_from(backends).unwrap_or(u64::MAX));
    SIZE_LADDER
        .iter()
        .copied()
        .find(|&m| u64::from(m) >= wanted)
        .unwrap_or(SIZE_LADDER[SIZE_LADDER.len() - 1])
}

/// Whether `m` is an acceptable explicit table size.
#[must_use]
pub fn is_valid_table_size(m: u32) -> bool {
    (SIZE_LADDER[0]..=SIZE_LADDER[SIZE_LADDER.len() - 1]).contains(&m) && is_prime(m)
}

fn is_prime(m: u32) -> bool {
    m >= 2 && (2..).take_while(|d| d * d <= m).all(|d| m % d != 0)
}

/// A built Maglev table: slot -> index of a backend in the slice it was built from. Cloning
/// shares the slots (Services with the same backends share one table: [`TableCache`]).
#[derive(Clone, PartialEq, Eq)]
pub struct MaglevTable {
    slots: Arc<[u16]>,
    /// Lemire's fastmod constant for the table size: `u64::MAX / M + 1`.
    fastmod: u64,
}

impl MaglevTable {
    /// Builds the table for `backends` (endpoint and weight; weight 0 takes no slots) with
    /// `size` slots, or the automatic size when `None`.
    ///
    /// # Errors
    /// See [`MaglevError`].
    pub fn build(backends: &[(Endpoint, u32)], size: Option<u32>) -> Result<Self, MaglevError> {
        if backends.len() > MAX_BACKENDS {
            return Err(MaglevError::TooManyBackends);
        }
        let weighted: Vec<usize> = (0..backends.len()).filter(|&i| backends[i].1 > 0).collect();
        if weighted.is_empty() {
            return Err(MaglevError::NoBackends);
        }
        let m = match size {
            Some(m) if !is_valid_table_size(m) => return Err(MaglevError::BadTableSize(m)),
            Some(m) => m,
            None => table_size_for(weighted.len()),
        };
        if (m as usize) < weighted.len() {
            return Err(MaglevError::TableTooSmall);
        }

        // Stable order: by backend key, never by arrival. Equal keys keep input order.
        let mut order: Vec<(usize, [u8; 19])> = weighted
            .iter()
            .map(|&i| (i, backend_key(&backends[i].0)))
            .collect();
        order.sort_by_key(|&(_, key)| key);

        let m64 = u64::from(m);
        let mut cursors: Vec<Cursor> = order
            .iter()
            .map(|&(i, key)| {
                let (h_offset, h_skip) = backend_hashes(&key);
                Cursor::new(
                    u32::try_from(h_offset % m64).unwrap_or(0),
                    u32::try_from(h_skip % (m64 - 1) + 1).unwrap_or(1),
                    backends[i].1,
                    u16::try_from(i).unwrap_or(u16::MAX),
                    m,
                )
            })
            .collect();
        let mut slots = vec![EMPTY; m as usize];
        fill(&mut slots, &mut cursors);
        Ok(Self {
            slots: slots.into(),
            fastmod: u64::MAX / m64 + 1,
        })
    }

    /// The number of slots.
    #[must_use]
    pub fn size(&self) -> u32 {
        u32::try_from(self.slots.len()).unwrap_or(u32::MAX)
    }

    /// The backend (index into the slice the table was built from) for a flow hash.
    ///
    /// Uses the hash's high 32 bits, reduced modulo the size with Lemire's fastmod (a
    /// multiplication instead of a division).
    #[inline]
    #[must_use]
    pub fn lookup(&self, hash: u64) -> usize {
        usize::from(self.slots.get(self.slot_of(hash)).copied().unwrap_or(0))
    }

    /// Starts fetching the slot [`Self::lookup`] reads for `hash`.
    #[inline]
    pub fn prefetch(&self, hash: u64) {
        if let Some(slot) = self.slots.get(self.slot_of(hash)) {
            crate::prefetch::prefetch_read(slot);
        }
    }

    /// The position of `hash`'s slot.
    #[inline]
    fn slot_of(&self, hash: u64) -> usize {
        let h = hash >> 32;
        let low = self.fastmod.wrapping_mul(h);
        ((u128::from(low) * self.slots.len() as u128) >> 64) as usize
    }

    /// The slots, for inspection and tests.
    #[must_use]
    pub fn slots(&self) -> &[u16] {
        &self.slots
    }

    /// How many slots each backend index holds (indices up to `backends - 1`).
    #[must_use]
    pub fn counts(&self, backends: usize) -> Vec<u32> {
        let mut counts = vec![0; backends];
        for &s in self.slots.iter() {
            if let Some(c) = counts.get_mut(usize::from(s)) {
                *c += 1;
            }
        }
        counts
    }
}

/// A slot no backend holds yet. A real backend index is below MAX_BACKENDS = u16::MAX, so
/// EMPTY is never one.
const EMPTY: u16 = u16::MAX;

/// What a table is built from: the size asked for, and the backends with their weights.
type TableKey = (Option<u32>, Vec<(Endpoint, u32)>);

/// How many of the tables built last a [`TableCache`] remembers.
const RECENT: usize = 4;

/// The tables built last, by what each was built from: Services with the same backends that
/// come together - a Service's several ports, its cluster IP, node ports and load-balancer
/// IPs, which the sources list one after another - share one table instead of building it
/// again. A few recent tables compared in turn, not a map of all of them: a map cost 1.2 us
/// a Service (its key copied and hashed) when no two share, 15% of a first snapshot of
/// 10 000 distinct Services. A table is a pure function of its key: sharing changes no pick.
#[derive(Debug, Default)]
pub struct TableCache {
    recent: Vec<(TableKey, MaglevTable)>,
    built: usize,
}

impl TableCache {
    /// The table for `backends` and `size` ([`MaglevTable::build`]), shared with a recent
    /// Service's when it was built from the same.
    ///
    /// # Errors
    /// See [`MaglevError`] (an error is not kept).
    pub fn get(
        &mut self,
        backends: &[(Endpoint, u32)],
        size: Option<u32>,
    ) -> Result<MaglevTable, MaglevError> {
        if let Some((_, table)) = self
            .recent
            .iter()
            .find(|((s, b), _)| *s == size && b.as_slice() == backends)
        {
            return Ok(table.clone());
        }
        let table = MaglevTable::build(backends, size)?;
        self.built += 1;
        if self.recent.len() == RECENT {
            self.recent.remove(0);
        }
        self.recent.push(((size, backends.to_vec()), table.clone()));
        Ok(table)
    }

    /// How many tables it built (the rest of its answers were shared).
    #[must_use]
    pub fn built(&self) -> usize {
        self.built
    }
}

/// A backend's walk through its permutation of the slots.
#[derive(Clone, Copy, Debug)]
struct Cursor {
    /// The slot it took last (before its first turn: the one before its first choice along
    /// its permutation); it tries the slots after it.
    next: u32,
    /// Its permutation's step (0 < skip < M).
    skip: u32,
    /// Slots it takes per round.
    weight: u32,
    /// Its index in the caller's backend list.
    index: u16,
    /// `(t + 1) * skip mod M` for t in 0..LANES: the offsets of the next LANES slots it
    /// would try.
    ahead: [u32; LANES],
    /// `LANES * skip mod M`: from one group of LANES slots to the next.
    leap: u32,
}

/// How many slots along a permutation the walk looks at at once.
const LANES: usize = 4;

impl Cursor {
    /// The cursor of a backend whose permutation starts at `offset`.
    fn new(offset: u32, skip: u32, weight: u32, index: u16, m: u32) -> Self {
        let mut ahead = [0u32; LANES];
        let mut at = 0u32;
        for a in &mut ahead {
            at = add_mod(at, skip, m);
            *a = at;
        }
        Self {
            next: add_mod(offset, m - skip, m),
            skip,
            weight,
            index,
            ahead,
            leap: at,
        }
    }
}

/// `(a + b) mod m` for `a, b < m` (a conditional subtraction, which compiles to a move
/// rather than a branch).
#[inline(always)]
fn add_mod(a: u32, b: u32, m: u32) -> u32 {
    let x = a + b;
    if x >= m {
        x - m
    } else {
        x
    }
}

/// Fills every slot: round after round, each backend takes `weight` slots, each the next
/// free one along its permutation (offset, offset + skip, offset + 2 skip, ... mod M).
///
/// The walk looks at [`LANES`] slots along the permutation at once and takes the first free
/// one: whether each is free is computed without a branch, so the walk costs one
/// well-predicted branch per group instead of a mispredicted one per placement (walking a
/// table of 1021 slots for 10 backends took 13 us a table with distinct backends, most of it
/// branch misses).
///
/// The last few free slots are the costly ones to find by walking (a walk of M / free
/// steps on average), so once `free` is small each backend's next free slot is computed
/// instead: the free slot `f` it reaches first is the one with the fewest steps
/// `(f - next) * skip^-1 mod M` from its cursor. Both ways pick the same slot, so the table
/// is the same (the golden table pins it).
#[inline(never)]
fn fill(slots: &mut [u16], cursors: &mut [Cursor]) {
    let m = u32::try_from(slots.len()).unwrap_or(u32::MAX);
    let endgame = endgame_at(m);
    let mut free = slots.len();
    // Walking: while many slots are free.
    'walk: loop {
        for c in cursors.iter_mut() {
            for _ in 0..c.weight {
                if free <= endgame {
                    break 'walk;
                }
                // The permutation visits every slot (skip < M, M prime), so a free one is
                // found while any remains.
                let mut from = c.next;
                let next = loop {
                    let mut tried = [0u32; LANES];
                    let mut free_mask = 0u32;
                    for (t, slot) in tried.iter_mut().enumerate() {
                        *slot = add_mod(from, c.ahead[t], m);
                        free_mask |= u32::from(slots[*slot as usize] == EMPTY) << t;
                    }
                    if free_mask != 0 {
                        break tried[free_mask.trailing_zeros() as usize];
                    }
                    from = add_mod(from, c.leap, m);
                };
                slots[next as usize] = c.index;
                c.next = next;
                free -= 1;
            }
        }
    }
    // Computing: the round resumes where the walk stopped, at the same backend and turn.
    let mut free_slots: Vec<u32> = (0..m).filter(|&s| slots[s as usize] == EMPTY).collect();
    let modulus = Modulus::new(m);
    let inverses: Vec<u64> = cursors
        .iter()
        .map(|c| modulus.inverse(u64::from(c.skip)))
        .collect();
    let (mut backend, mut turn) = resume_point(cursors, slots.len() - free);
    while !free_slots.is_empty() {
        let c = &mut cursors[backend];
        let inverse = inverses[backend];
        // Its first try is the slot after the one it took last.
        let start = add_mod(c.next, c.skip, m);
        let (at, _) = free_slots
            .iter()
            .enumerate()
            .map(|(i, &f)| {
                let ahead = if f >= start { f - start } else { f + m - start };
                (i, modulus.reduce(u64::from(ahead) * inverse))
            })
            .min_by_key(|&(_, steps)| steps)
            .unwrap_or((0, 0));
        let slot = free_slots.swap_remove(at);
        slots[slot as usize] = c.index;
        c.next = slot;
        turn += 1;
        if turn >= c.weight {
            turn = 0;
            backend = (backend + 1) % cursors.len();
        }
    }
}

/// The number of free slots below which computing beats walking: a walk costs about
/// M / free probes, computing costs `free` multiplications and reductions, each about a
/// probe's worth.
fn endgame_at(m: u32) -> usize {
    let mut e = 1usize;
    while (e * e * 4) < m as usize {
        e += 1;
    }
    e
}

/// Which backend takes the next slot after `placed` slots, and how many of its turn it has
/// used: rounds go through the backends in order, each taking `weight` slots.
fn resume_point(cursors: &[Cursor], placed: usize) -> (usize, u32) {
    let round: u64 = cursors.iter().map(|c| u64::from(c.weight)).sum();
    let mut left = (placed as u64) % round.max(1);
    for (i, c) in cursors.iter().enumerate() {
        if left < u64::from(c.weight) {
            return (i, u32::try_from(left).unwrap_or(0));
        }
        left -= u64::from(c.weight);
    }
    (0, 0)
}

/// Arithmetic modulo a table size M (below 2^32), with Barrett reduction: a multiplication
/// and a conditional subtraction instead of a division, which the endgame does for every
/// free slot and backend.
#[derive(Clone, Copy, Debug)]
struct Modulus {
    m: u64,
    /// `floor(2^64 / M)`.
    r: u64,
}

impl Modulus {
    fn new(m: u32) -> Self {
        let m = u64::from(m.max(2));
        Self {
            m,
            r: u64::try_from((1u128 << 64) / u128::from(m)).unwrap_or(u64::MAX),
        }
    }

    /// `a mod M`. The estimated quotient `a * r / 2^64` is at most one below the true one.
    #[inline(always)]
    fn reduce(self, a: u64) -> u64 {
        let q = u64::try_from((u128::from(a) * u128::from(self.r)) >> 64).unwrap_or(0);
        let rest = a - q * self.m;
        if rest >= self.m {
            rest - self.m
        } else {
            rest
        }
    }

    /// `a^-1 mod M` for a prime M and `0 < a < M` (Fermat: a^(M-2)).
    fn inverse(self, a: u64) -> u64 {
        let (mut base, mut exp, mut acc) = (self.reduce(a), self.m - 2, 1u64);
        while exp > 0 {
            if exp & 1 == 1 {
                acc = self.reduce(acc * base);
            }
            base = self.reduce(base * base);
            exp >>= 1;
        }
        acc
    }
}

impl core::fmt::Debug for MaglevTable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "MaglevTable(M = {})", self.slots.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u8) -> Vec<(Endpoint, u32)> {
        (0..n)
            .map(|i| (Endpoint::new([198, 19, i, 2].into(), 8080), 1))
            .collect()
    }

    /// Run-length encoding of a table as (backend index, run) pairs.
    fn rle(slots: &[u16]) -> Vec<(u16, u32)> {
        let mut out: Vec<(u16, u32)> = Vec::new();
        for &s in slots {
            match out.last_mut() {
                Some((b, run)) if *b == s => *run += 1,
                _ => out.push((s, 1)),
            }
        }
        out
    }

    #[test]
    fn table_sizes_follow_the_ladder() {
        assert_eq!(table_size_for(1), 251);
        assert_eq!(table_size_for(3), 509);
        assert_eq!(table_size_for(10), 1021);
        assert_eq!(table_size_for(655), 65521);
        assert_eq!(table_size_for(100_000), 131071);
        assert!(SIZE_LADDER.iter().all(|&m| is_prime(m)));
        assert!(is_valid_table_size(65537));
        assert!(!is_valid_table_size(65536));
        assert!(!is_valid_table_size(13));
    }

    #[test]
    fn a_table_of_weightless_backends_is_refused() {
        let none = [(Endpoint::new([198, 19, 0, 2].into(), 80), 0)];
        assert_eq!(
            MaglevTable::build(&none, None),
            Err(MaglevError::NoBackends)
        );
        assert_eq!(MaglevTable::build(&[], None), Err(MaglevError::NoBackends));
        assert_eq!(
            MaglevTable::build(&backends(3), Some(1000)),
            Err(MaglevError::BadTableSize(1000))
        );
    }

    #[test]
    fn lookup_stays_inside_the_table_for_every_hash() {
        let table = MaglevTable::build(&backends(3), None).unwrap();
        for hash in [0, 1, u64::MAX, u64::MAX / 3, 0xdead_beef_0000_0000] {
            assert!(table.lookup(hash) < 3);
        }
    }

    /// The golden table of hash contract v1: a change to the hash, its seeds, the key layout
    /// or the population loop changes this, and must come with a new `HASH_VERSION`.
    #[test]
    fn golden_table_is_pinned_for_hash_version_v1() {
        assert_eq!(super::super::hash::HASH_VERSION, "xlb-hash-v1");
        let table = MaglevTable::build(&backends(3), Some(251)).unwrap();
        let encoded: Vec<String> = rle(table.slots())
            .iter()
            .map(|(b, run)| format!("{b}:{run}"))
            .collect();
        let golden: Vec<&str> = GOLDEN
            .lines()
            .filter(|l| !l.starts_with('#'))
            .flat_map(str::split_whitespace)
            .collect();
        assert_eq!(encoded, golden);
    }

    const GOLDEN: &str = include_str!("golden/maglev-v1-m251-n3.txt");

    /// The population loop walking to the very end, as Maglev's paper has it.
    fn walk_only(slots: &mut [u16], cursors: &mut [Cursor]) {
        let m = slots.len() as u32;
        let mut filled = 0;
        'fill: loop {
            for c in cursors.iter_mut() {
                for _ in 0..c.weight {
                    c.next = (c.next + c.skip) % m;
                    while slots[c.next as usize] != EMPTY {
                        c.next = (c.next + c.skip) % m;
                    }
                    slots[c.next as usize] = c.index;
                    filled += 1;
                    if filled == slots.len() {
                        break 'fill;
                    }
                }
            }
        }
    }

    #[test]
    fn barrett_reduction_and_inverses_agree_with_division_for_every_table_size() {
        for &m in SIZE_LADDER.iter().chain(&[65537, 2, 3]) {
            let modulus = Modulus::new(m);
            let m64 = u64::from(m);
            for a in [
                0,
                1,
                m64 - 1,
                m64,
                m64 + 1,
                m64 * m64 - 1,
                (m64 - 1) * (m64 - 1),
                1 << 40,
            ] {
                assert_eq!(modulus.reduce(a), a % m64, "{a} mod {m}");
            }
            for a in [1, 2, m64 / 2, m64 - 1] {
                if a > 0 && a < m64 {
                    assert_eq!(modulus.reduce(modulus.inverse(a) * a), 1, "{a}^-1 mod {m}");
                }
            }
        }
    }

    #[test]
    fn computing_the_last_free_slots_gives_the_same_table_as_walking_to_them() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for &m in &[251u32, 509, 1021, 4093, 16381] {
            for n in [1usize, 2, 3, 7, 10, 31, 100] {
                if n > m as usize {
                    continue;
                }
                let cursors: Vec<Cursor> = (0..n)
                    .map(|i| {
                        Cursor::new(
                            (random() % u64::from(m)) as u32,
                            (random() % u64::from(m - 1)) as u32 + 1,
                            1 + (random() % 3) as u32 * u32::from(i % 2 == 0),
                            i as u16,
                            m,
                        )
                    })
                    .collect();
                let mut expected = vec![EMPTY; m as usize];
                walk_only(&mut expected, &mut cursors.clone());
                let mut got = vec![EMPTY; m as usize];
                fill(&mut got, &mut cursors.clone());
                assert_eq!(got, expected, "M = {m}, N = {n}");
            }
        }
    }

    #[test]
    fn services_with_the_same_backends_share_one_table_built_once() {
        let mut cache = TableCache::default();
        let a = cache.get(&backends(10), None).unwrap();
        let b = cache.get(&backends(10), None).unwrap();
        assert!(
            core::ptr::eq(a.slots().as_ptr(), b.slots().as_ptr()),
            "shared"
        );
        assert_eq!(a, MaglevTable::build(&backends(10), None).unwrap());
        assert_eq!(cache.built(), 1);
        // Another backend set, another size, another weight: each its own table.
        let c = cache.get(&backends(9), None).unwrap();
        let d = cache.get(&backends(10), Some(2039)).unwrap();
        let mut heavier = backends(10);
        heavier[0].1 = 2;
        let e = cache.get(&heavier, None).unwrap();
        assert_eq!(cache.built(), 4);
        assert_ne!(c, a);
        assert_eq!(d.size(), 2039);
        assert_ne!(e, a);
        assert!(cache.get(&[], None).is_err(), "errors are not kept");
        assert_eq!(cache.built(), 4);
    }
}
