//! The hashes that are a contract between xlb instances.
//!
//! Every instance must pick the same backend for the same flow, so the functions here, their
//! seeds and the byte layout they hash are versioned: a change to any of them is a new
//! [`HASH_VERSION`], and the golden tests in this module and in [`super::maglev`] fail until
//! the version is changed with them.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::packet::{Endpoint, Family, FlowKey};

/// The name of the hash contract: xxh3-64 over the documented byte layouts, with the seeds
/// below.
pub const HASH_VERSION: &str = "xlb-hash-v1";

/// Seed of the hash that gives a backend's Maglev offset.
const OFFSET_SEED: u64 = 0x786c_622d_6f66_6673; // "xlb-offs"
/// Seed of the hash that gives a backend's Maglev skip.
const SKIP_SEED: u64 = 0x786c_622d_736b_6970; // "xlb-skip"

/// Seed of the flow hash.
const FLOW_SEED: u64 = 0x786c_622d_666c_6f77; // "xlb-flow"

/// The hash of a flow, computed once per packet and used for the flow table (low bits: the
/// bucket; high 32 bits: the entry tag) and the Maglev slot (high 32 bits).
///
/// Layout hashed: source address (16 bytes), destination address (16), source port,
/// destination port (big-endian), protocol, family (4 or 6): 38 bytes.
#[inline]
#[must_use]
pub fn flow_hash(key: &FlowKey) -> u64 {
    let mut bytes = [0u8; 38];
    bytes[..16].copy_from_slice(&key.src_addr);
    bytes[16..32].copy_from_slice(&key.dst_addr);
    bytes[32..34].copy_from_slice(&key.src_port.to_be_bytes());
    bytes[34..36].copy_from_slice(&key.dst_port.to_be_bytes());
    bytes[36] = key.proto.0;
    bytes[37] = match key.family {
        Family::Ipv4 => 4,
        Family::Ipv6 => 6,
    };
    xxh3_64_with_seed(&bytes, FLOW_SEED)
}

/// The stable key of a backend: family (4 or 6), the 16-byte address, the port big-endian.
#[must_use]
pub fn backend_key(endpoint: &Endpoint) -> [u8; 19] {
    let mut key = [0; 19];
    key[0] = match endpoint.family() {
        Family::Ipv4 => 4,
        Family::Ipv6 => 6,
    };
    key[1..17].copy_from_slice(endpoint.key_addr());
    key[17..].copy_from_slice(&endpoint.port().to_be_bytes());
    key
}

/// The two hashes of a backend key that place it in a Maglev table (offset, skip).
#[must_use]
pub fn backend_hashes(key: &[u8; 19]) -> (u64, u64) {
    (
        xxh3_64_with_seed(key, OFFSET_SEED),
        xxh3_64_with_seed(key, SKIP_SEED),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the contract: these values may only change together with [`HASH_VERSION`].
    #[test]
    fn backend_hashes_are_pinned_for_hash_version_v1() {
        assert_eq!(HASH_VERSION, "xlb-hash-v1");
        let endpoint = Endpoint::new([198, 18, 128, 2].into(), 8080);
        let key = backend_key(&endpoint);
        assert_eq!(
            key,
            [4, 198, 18, 128, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x1f, 0x90]
        );
        assert_eq!(backend_hashes(&key), PINNED);
    }

    #[test]
    fn the_flow_hash_is_pinned_for_hash_version_v1() {
        let key = FlowKey::new(
            Family::Ipv4,
            crate::packet::IpProto::TCP,
            (crate::packet::key_addr([198, 18, 0, 1].into()), 40000),
            (crate::packet::key_addr([198, 18, 64, 1].into()), 80),
        );
        assert_eq!(flow_hash(&key), 16_437_077_235_361_137_221);
    }

    const PINNED: (u64, u64) = (12_309_481_090_547_688_606, 15_875_722_395_761_595_462);
}
