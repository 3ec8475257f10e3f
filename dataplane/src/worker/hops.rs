//! Next hops: which port a rewritten packet leaves by and which Ethernet addresses it gets.
//!
//! The control thread builds a [`NextHops`] from the kernel's routes and neighbours (read over
//! netlink) for the ports xlb serves, and publishes it with each snapshot. Workers only look
//! addresses up: a host entry (a resolved neighbour) first, then the longest matching route
//! through a resolved gateway — one hash lookup per distinct prefix length present, longest
//! first, not a scan of the routes. An address with neither is unresolved: the worker holds
//! the packet a moment and reports the address, so the control thread can ask the kernel to
//! resolve it (never a silent blackhole).

use hashbrown::HashMap;

use crate::lb::prefix::{Prefix, PrefixMap};
use crate::packet::{Family, MacAddr};

/// Where a packet to some address goes next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    /// The index of the egress port in the worker's port list.
    pub port: u16,
    /// The egress port's own address.
    pub src_mac: MacAddr,
    /// The neighbour's address (the host itself, or the gateway towards it).
    pub dst_mac: MacAddr,
}

/// A route: through a gateway whose neighbour entry is resolved, or a connected prefix whose
/// addresses are neighbours themselves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The destination prefix, in key form (IPv4 in the first four bytes).
    pub prefix: [u8; 16],
    /// Prefix length in bits.
    pub len: u8,
    /// IPv4 or IPv6.
    pub family: Family,
    /// The gateway's next hop; `None` for a connected prefix: an address in it has a next
    /// hop only as a resolved host, never through a shorter route.
    pub hop: Option<NextHop>,
}

/// The next-hop table of one snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NextHops {
    hosts: HashMap<(Family, [u8; 16]), NextHop>,
    routes: PrefixMap<Option<NextHop>>,
}

impl NextHops {
    /// A table from resolved neighbours (`hosts`) and gatewayed routes. Of two routes to
    /// one prefix, the first given wins.
    #[must_use]
    pub fn new(
        hosts: impl IntoIterator<Item = (Family, [u8; 16], NextHop)>,
        routes: Vec<Route>,
    ) -> Self {
        Self {
            hosts: hosts.into_iter().map(|(f, a, h)| ((f, a), h)).collect(),
            routes: PrefixMap::new(
                routes
                    .into_iter()
                    .map(|r| (Prefix::new(r.family, r.prefix, r.len), r.hop)),
            ),
        }
    }

    /// The next hop towards `addr` (key form), if resolved.
    #[inline]
    #[must_use]
    pub fn lookup(&self, family: Family, addr: &[u8; 16]) -> Option<NextHop> {
        if let Some(hop) = self.hosts.get(&(family, *addr)) {
            return Some(*hop);
        }
        self.routes.longest_match(family, addr).copied().flatten()
    }

    /// How many resolved hosts and routes it holds.
    #[must_use]
    pub fn len(&self) -> (usize, usize) {
        (self.hosts.len(), self.routes.len())
    }
}

/// Whether `addr` lies in `prefix`/`len` (addresses in key form).
#[must_use]
pub fn prefix_matches(prefix: &[u8; 16], len: u8, addr: &[u8; 16]) -> bool {
    let bits = usize::from(len.min(128));
    let (whole, rest) = (bits / 8, bits % 8);
    if prefix[..whole] != addr[..whole] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (prefix[whole] ^ addr[whole]) & mask == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(port: u16) -> NextHop {
        NextHop {
            port,
            src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            dst_mac: MacAddr([2, 0, 0, 0, 0, port as u8 + 2]),
        }
    }

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut k = [0; 16];
        k[..4].copy_from_slice(&a);
        k
    }

    #[test]
    fn a_resolved_host_wins_over_any_route() {
        let hops = NextHops::new(
            [(Family::Ipv4, v4([198, 18, 1, 2]), hop(1))],
            vec![Route {
                prefix: v4([198, 18, 0, 0]),
                len: 15,
                family: Family::Ipv4,
                hop: Some(hop(0)),
            }],
        );
        assert_eq!(
            hops.lookup(Family::Ipv4, &v4([198, 18, 1, 2])),
            Some(hop(1))
        );
        assert_eq!(
            hops.lookup(Family::Ipv4, &v4([198, 19, 9, 9])),
            Some(hop(0))
        );
    }

    #[test]
    fn the_longest_matching_prefix_is_taken_and_other_families_never_match() {
        let hops = NextHops::new(
            [],
            vec![
                Route {
                    prefix: v4([198, 18, 0, 0]),
                    len: 15,
                    family: Family::Ipv4,
                    hop: Some(hop(0)),
                },
                Route {
                    prefix: v4([198, 18, 64, 0]),
                    len: 20,
                    family: Family::Ipv4,
                    hop: Some(hop(1)),
                },
            ],
        );
        assert_eq!(
            hops.lookup(Family::Ipv4, &v4([198, 18, 70, 1])),
            Some(hop(1))
        );
        assert_eq!(
            hops.lookup(Family::Ipv4, &v4([198, 18, 80, 1])),
            Some(hop(0))
        );
        assert_eq!(hops.lookup(Family::Ipv4, &v4([10, 0, 0, 1])), None);
        assert_eq!(hops.lookup(Family::Ipv6, &v4([198, 18, 70, 1])), None);
    }

    /// An address on a connected prefix without a neighbour entry is unresolved, not sent
    /// through a shorter route (a default route through a router on the same link): it is
    /// held and resolved.
    #[test]
    fn an_unresolved_neighbour_on_a_connected_prefix_does_not_fall_through_to_the_default() {
        let hops = NextHops::new(
            [(Family::Ipv4, v4([198, 18, 50, 11]), hop(1))],
            vec![
                Route {
                    prefix: v4([0, 0, 0, 0]),
                    len: 0,
                    family: Family::Ipv4,
                    hop: Some(hop(0)),
                },
                Route {
                    prefix: v4([198, 18, 50, 0]),
                    len: 24,
                    family: Family::Ipv4,
                    hop: None,
                },
            ],
        );
        assert_eq!(
            hops.lookup(Family::Ipv4, &v4([198, 18, 50, 11])),
            Some(hop(1))
        );
        assert_eq!(hops.lookup(Family::Ipv4, &v4([198, 18, 50, 13])), None);
        assert_eq!(
            hops.lookup(Family::Ipv4, &v4([198, 19, 0, 1])),
            Some(hop(0))
        );
    }
}
