//! IP prefixes and a longest-prefix-match map over them: one hash probe per distinct prefix
//! length present, longest first, so a lookup costs what the set's shape costs, not its
//! size (a Service with a thousand source ranges of three lengths probes three times).
//!
//! Addresses are in the flow key's 16-byte form (IPv4 in the first four bytes), so one mask
//! serves both families; a prefix of one family never matches an address of the other.

use hashbrown::HashMap;

use crate::packet::Family;

/// An IP prefix in key form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix {
    /// IPv4 or IPv6.
    pub family: Family,
    /// The address, bits past `len` cleared.
    pub addr: [u8; 16],
    /// The prefix length in bits (at most 32 for IPv4, 128 for IPv6).
    pub len: u8,
}

impl Prefix {
    /// The prefix of `addr` (key form) with `len` bits; bits past `len` are cleared and a
    /// length past the family's is cut to it.
    #[must_use]
    pub fn new(family: Family, addr: [u8; 16], len: u8) -> Self {
        let len = match family {
            Family::Ipv4 => len.min(32),
            Family::Ipv6 => len.min(128),
        };
        Self {
            family,
            addr: masked(&addr, len),
            len,
        }
    }

    /// Whether `addr` (key form, of `family`) lies in the prefix.
    #[must_use]
    pub fn contains(&self, family: Family, addr: &[u8; 16]) -> bool {
        family == self.family && masked(addr, self.len) == self.addr
    }
}

/// `addr` with every bit past the first `len` cleared.
fn masked(addr: &[u8; 16], len: u8) -> [u8; 16] {
    let len = u32::from(len.min(128));
    let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
    (u128::from_be_bytes(*addr) & mask).to_be_bytes()
}

/// The prefixes of one family and one length.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Length<V> {
    family: Family,
    len: u8,
    prefixes: HashMap<[u8; 16], V>,
}

/// Values found by the longest prefix that contains an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefixMap<V> {
    /// Longest first.
    lengths: Vec<Length<V>>,
}

impl<V> Default for PrefixMap<V> {
    fn default() -> Self {
        Self {
            lengths: Vec::new(),
        }
    }
}

impl<V> PrefixMap<V> {
    /// A map of `entries`; of two entries for one prefix, the first is kept.
    pub fn new(entries: impl IntoIterator<Item = (Prefix, V)>) -> Self {
        let mut lengths: Vec<Length<V>> = Vec::new();
        for (prefix, value) in entries {
            let at = match lengths
                .iter()
                .position(|l| l.len == prefix.len && l.family == prefix.family)
            {
                Some(at) => at,
                None => {
                    lengths.push(Length {
                        family: prefix.family,
                        len: prefix.len,
                        prefixes: HashMap::new(),
                    });
                    lengths.len() - 1
                }
            };
            lengths[at].prefixes.entry(prefix.addr).or_insert(value);
        }
        lengths.sort_by_key(|l| core::cmp::Reverse(l.len));
        Self { lengths }
    }

    /// The value of the longest prefix containing `addr` (key form, of `family`).
    #[inline]
    #[must_use]
    pub fn longest_match(&self, family: Family, addr: &[u8; 16]) -> Option<&V> {
        self.lengths
            .iter()
            .filter(|l| l.family == family)
            .find_map(|l| l.prefixes.get(&masked(addr, l.len)))
    }

    /// How many prefixes it holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lengths.iter().map(|l| l.prefixes.len()).sum()
    }

    /// Whether it holds none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// Every prefix and its value, longest first.
    pub fn iter(&self) -> impl Iterator<Item = (Prefix, &V)> + '_ {
        self.lengths.iter().flat_map(|l| {
            l.prefixes.iter().map(|(addr, v)| {
                (
                    Prefix {
                        family: l.family,
                        addr: *addr,
                        len: l.len,
                    },
                    v,
                )
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::key_addr;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        key_addr(std::net::Ipv4Addr::from(a).into())
    }

    #[test]
    fn lookups_agree_with_a_scan_for_the_longest_match() {
        let mut prefixes = Vec::new();
        let mut x = 0x9e37_79b9u32;
        for i in 0..200u32 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let len = u8::try_from(8 + x % 25).unwrap();
            let base = 0xc612_0000u32 | (x & 0x0001_ffff);
            prefixes.push((Prefix::new(Family::Ipv4, v4(base.to_be_bytes()), len), i));
        }
        let map = PrefixMap::new(prefixes.clone());
        for a in (0xc611_f000u32..0xc614_1000).step_by(97) {
            let addr = v4(a.to_be_bytes());
            let expected = prefixes
                .iter()
                .filter(|(p, _)| p.contains(Family::Ipv4, &addr))
                .max_by_key(|(p, i)| (p.len, core::cmp::Reverse(*i)))
                .map(|(_, i)| i);
            assert_eq!(map.longest_match(Family::Ipv4, &addr), expected, "{a:#x}");
        }
    }

    #[test]
    fn prefixes_are_masked_and_families_never_mix() {
        let p = Prefix::new(Family::Ipv4, v4([198, 18, 255, 255]), 17);
        assert_eq!(p.addr, v4([198, 18, 128, 0]));
        assert!(p.contains(Family::Ipv4, &v4([198, 18, 200, 1])));
        assert!(!p.contains(Family::Ipv6, &v4([198, 18, 200, 1])));
        let any = Prefix::new(Family::Ipv4, v4([1, 2, 3, 4]), 0);
        assert_eq!(any.addr, [0; 16]);
        assert!(any.contains(Family::Ipv4, &v4([9, 9, 9, 9])));
        let map = PrefixMap::new([(any, ())]);
        assert!(map.longest_match(Family::Ipv6, &[0; 16]).is_none());
        assert_eq!(Prefix::new(Family::Ipv4, v4([1, 2, 3, 4]), 99).len, 32);
    }
}
