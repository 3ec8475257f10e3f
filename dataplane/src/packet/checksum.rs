//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! Every checksum xlb writes on the forwarding path is updated with [`CsumDelta`]: the cost
//! depends on the fields changed, never on the payload. Full sums exist for the IPv4 header
//! check at parse time and for the rare frames whose L4 checksum was never finished by the
//! sender (CHECKSUM_PARTIAL, see [`super::ChecksumState`]).

/// Adds `data` to a running ones-complement sum of 16-bit big-endian words.
///
/// The accumulator is unfolded; call [`fold`] once at the end. Odd-length data is padded with
/// a zero byte, as RFC 1071 section 4.1 does. Four bytes are added per step: a 32-bit word is
/// congruent to the sum of its two 16-bit halves modulo 0xFFFF, so the folded result is the
/// same as a word-by-word sum.
#[must_use]
#[inline]
pub fn add_bytes(mut acc: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        acc += u64::from(u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]));
    }
    // Spelled out per length: a copy into a padded buffer became a memcpy call per sum.
    match *chunks.remainder() {
        [a] => acc + (u64::from(a) << 24),
        [a, b] => acc + (u64::from(u16::from_be_bytes([a, b])) << 16),
        [a, b, c] => acc + (u64::from(u16::from_be_bytes([a, b])) << 16) + (u64::from(c) << 8),
        _ => acc,
    }
}

/// Folds an unfolded ones-complement sum to 16 bits with end-around carry.
#[must_use]
#[inline(always)]
pub fn fold(acc: u64) -> u16 {
    // 64 -> 32 bits with end-around carry, then 32 -> 17 -> 16 bits: a carry out of the
    // second step is added back by the third, which cannot carry again.
    let (low, carry) = low32(acc).overflowing_add(high32(acc));
    let acc = low + u32::from(carry);
    let acc = (acc & 0xFFFF) + (acc >> 16);
    let acc = acc + (acc >> 16);
    low16(acc)
}

#[inline(always)]
fn low32(x: u64) -> u32 {
    u32::try_from(x & 0xFFFF_FFFF).unwrap_or(0)
}

#[inline(always)]
fn high32(x: u64) -> u32 {
    u32::try_from(x >> 32).unwrap_or(0)
}

#[inline(always)]
fn low16(x: u32) -> u16 {
    u16::try_from(x & 0xFFFF).unwrap_or(0)
}

/// The checksum of `data` alone: the complement of its folded sum.
#[must_use]
pub fn checksum(data: &[u8]) -> u16 {
    !fold(add_bytes(0, data))
}

/// The unfolded sum of the IPv4 pseudo-header (RFC 793 section 3.1, RFC 768).
#[must_use]
#[inline(always)]
pub fn pseudo_header_v4(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: u16) -> u64 {
    u64::from(u32::from_be_bytes(src))
        + u64::from(u32::from_be_bytes(dst))
        + u64::from(proto)
        + u64::from(l4_len)
}

/// The unfolded sum of the IPv6 pseudo-header (RFC 8200 section 8.1).
#[must_use]
#[inline(always)]
pub fn pseudo_header_v6(src: &[u8; 16], dst: &[u8; 16], next_header: u8, l4_len: u32) -> u64 {
    let acc = add_bytes(0, src);
    add_bytes(acc, dst) + u64::from(next_header) + u64::from(l4_len)
}

/// The accumulated difference between old and new field values, ready to be applied to any
/// checksum that covers those fields (RFC 1624, equation 3: `HC' = ~(~HC + ~m + m')`).
///
/// Fields must sit at even offsets from the start of the checksummed data; every NAT field
/// does (addresses, ports, identifiers and checksums of nested headers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CsumDelta(u64);

impl CsumDelta {
    /// No change yet.
    #[must_use]
    pub const fn new() -> Self {
        Self(0)
    }

    /// Records that a 16-bit word changed from `old` to `new`.
    #[must_use]
    #[inline(always)]
    pub fn swap16(self, old: u16, new: u16) -> Self {
        Self(self.0 + u64::from(!old) + u64::from(new))
    }

    /// Records that the field `old` became `new` (an even number of bytes: an address, a port).
    ///
    /// Generic over the length so that the loop unrolls into straight-line additions: over
    /// slices, and out of line, it cost a loop and a call per field (`bench/callgrind.sh`).
    #[must_use]
    #[inline(always)]
    pub fn swap<const N: usize>(self, old: &[u8; N], new: &[u8; N]) -> Self {
        const { assert!(N % 2 == 0, "checksummed fields are whole 16-bit words") };
        if N == 16 {
            // An IPv6 address: as a field swap of its folded sums, each taken as two 64-bit
            // words with end-around carry (2^64 = 1 modulo 0xFFFF). Word by word, the
            // compiler spilled and reloaded the pieces and stalled (perf, `make bench` dnat/tcp6).
            return self.swap16(fold(sum128(old)), fold(sum128(new)));
        }
        let mut acc = self.0;
        let mut i = 0;
        while i + 1 < N {
            acc += u64::from(!u16::from_be_bytes([old[i], old[i + 1]]));
            acc += u64::from(u16::from_be_bytes([new[i], new[i + 1]]));
            i += 2;
        }
        Self(acc)
    }

    /// Combines two deltas (for a checksum that covers the fields of both).
    #[must_use]
    #[inline(always)]
    pub fn merge(self, other: Self) -> Self {
        Self(self.0 + other.0)
    }

    /// Applies the delta to a checksum field's value and returns the new value.
    ///
    /// The result of a real change is never 0xFFFF, exactly as for a full recomputation: the
    /// folded sum of changed data is non-zero, so its complement is below 0xFFFF.
    #[must_use]
    #[inline(always)]
    pub fn apply(self, csum: u16) -> u16 {
        !fold(u64::from(!csum) + self.0)
    }
}

/// The ones-complement sum of the first 16 bytes of `bytes` (unfolded; zero if shorter).
#[inline(always)]
fn sum128<const N: usize>(bytes: &[u8; N]) -> u64 {
    let (Some(hi), Some(lo)) = (
        bytes.first_chunk::<8>(),
        bytes.get(8..).and_then(<[u8]>::first_chunk::<8>),
    ) else {
        return 0;
    };
    let (sum, carry) = u64::from_be_bytes(*hi).overflowing_add(u64::from_be_bytes(*lo));
    sum + u64::from(carry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_rfc1071_example_matches_the_rfc() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (folded).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(add_bytes(0, &data)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn fold_handles_carries_at_every_step() {
        for (acc, want) in [
            (0, 0),
            (0xFFFF, 0xFFFF),
            (0x1_0000, 1),
            (0x1_FFFE, 0xFFFF),
            (0xFFFF_FFFF, 0xFFFF),
            (0x1_0000_0000, 1),
            (u64::MAX, 0xFFFF),
            (0xFFFF_FFFF_0000_0001, 1),
        ] {
            // Reference: repeated end-around folding.
            let mut slow = acc;
            while slow > 0xFFFF {
                slow = (slow & 0xFFFF) + (slow >> 16);
            }
            assert_eq!(u64::from(fold(acc)), slow, "{acc:#x}");
            assert_eq!(fold(acc), want, "{acc:#x}");
        }
    }

    #[test]
    fn odd_length_data_is_padded_with_a_zero_byte() {
        assert_eq!(fold(add_bytes(0, &[0x12, 0x34, 0x56])), 0x1234 + 0x5600);
    }

    #[test]
    fn data_with_its_checksum_sums_to_negative_zero() {
        let mut data = [
            0x45, 0x00, 0x00, 0x54, 0x12, 0x34, 0x40, 0x00, 0x40, 0x01, 0, 0,
        ];
        let csum = checksum(&data);
        data[10..12].copy_from_slice(&csum.to_be_bytes());
        assert_eq!(fold(add_bytes(0, &data)), 0xFFFF);
    }

    #[test]
    fn delta_of_an_unchanged_word_leaves_the_checksum_alone() {
        for csum in [0x0000, 0x1234, 0xFFFE] {
            assert_eq!(CsumDelta::new().swap16(0xabcd, 0xabcd).apply(csum), csum);
        }
        // 0xFFFF and 0x0000 are the two ones-complement zeros: equivalent to every receiver.
        assert_eq!(
            CsumDelta::new().swap16(0xabcd, 0xabcd).apply(0xFFFF),
            0x0000
        );
    }

    #[test]
    fn delta_of_an_ipv6_address_matches_recomputation() {
        let old = [0xff; 16];
        let mut new = [0u8; 16];
        for (i, b) in new.iter_mut().enumerate() {
            *b = u8::try_from(i * 37 % 256).unwrap();
        }
        let mut data = [0xff; 20];
        let before = checksum(&data);
        data[2..18].copy_from_slice(&new);
        assert_eq!(
            CsumDelta::new().swap(&old, &new).apply(before),
            checksum(&data)
        );
    }

    #[test]
    fn delta_matches_recomputation_for_a_changed_word() {
        let mut data = [0x11, 0x22, 0x33, 0x44, 0x55, 0x66];
        let before = checksum(&data);
        data[2..4].copy_from_slice(&[0xde, 0xad]);
        let after = CsumDelta::new().swap16(0x3344, 0xdead).apply(before);
        assert_eq!(after, checksum(&data));
    }
}
