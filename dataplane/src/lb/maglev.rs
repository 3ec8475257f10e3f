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

/// A built Maglev table: slot -> index of a backend in the slice it was built from.
#[derive(Clone, PartialEq, Eq)]
pub struct MaglevTable {
    slots: Box<[u16]>,
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
        // Per backend: next preferred slot, skip, weight.
        let mut cursor: Vec<(u32, u32, u32, u16)> = order
            .iter()
            .map(|&(i, key)| {
                let (h_offset, h_skip) = backend_hashes(&key);
                let offset = u32::try_from(h_offset % m64).unwrap_or(0);
                let skip = u32::try_from(h_skip % (m64 - 1) + 1).unwrap_or(1);
                let index = u16::try_from(i).unwrap_or(u16::MAX);
                (offset, skip, backends[i].1, index)
            })
            .collect();

        const EMPTY: u16 = u16::MAX;
        // A real backend index is below MAX_BACKENDS = u16::MAX, so EMPTY is never one.
        let mut slots = vec![EMPTY; m as usize].into_boxed_slice();
        let mut filled = 0;
        'fill: loop {
            for (next, skip, weight, index) in &mut cursor {
                for _ in 0..*weight {
                    // The permutation visits every slot (skip < M, M prime), so a free one
                    // is found while any remains.
                    while slots[*next as usize] != EMPTY {
                        *next += *skip;
                        if *next >= m {
                            *next -= m;
                        }
                    }
                    slots[*next as usize] = *index;
                    filled += 1;
                    if filled == m as usize {
                        break 'fill;
                    }
                }
            }
        }
        Ok(Self {
            slots,
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
        let h = hash >> 32;
        let low = self.fastmod.wrapping_mul(h);
        let slot = (u128::from(low) * self.slots.len() as u128) >> 64;
        usize::from(self.slots.get(slot as usize).copied().unwrap_or(0))
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
}
