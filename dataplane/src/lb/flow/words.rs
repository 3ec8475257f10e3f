//! How a flow entry is packed into atomic words: the `seq` word (entry state, flow state,
//! claim counter, tag), the key words (two for IPv4, five for IPv6), the value word and the
//! meta word. Pure functions, no atomics: the table ([`super`]) decides when words are read and
//! written.
//!
//! Layouts (bit 0 is the least significant):
//! * `seq`: entry state (bits 0–1: free, writing, valid) | flow state (bits 2–3) | birth
//!   (bits 4–15: the [`Tick`] the entry was published at, modulo 4096) | claim counter (bits
//!   16–31, bumped by every claim and every freeing) | tag (bits 32–63, the high half of the
//!   flow hash). The flow state is here, not in the body, so that a state change is a
//!   compare-and-swap that fails when the entry's place was reused (the counter moved); state
//!   and birth are here so that an insert into a full bucket pair chooses its victim (the
//!   oldest entry that is not established) from the tag lines alone.
//! * key, IPv4: source address | destination address << 32, then the ports word: source port |
//!   destination port << 16 | protocol << 32 | family << 40 (never zero). IPv6: source address
//!   (two words), destination address (two), then the ports word. Both in five words
//!   ([`KeyWords`]), an IPv4 key's last three zero, which its table does not store.
//! * value: the Service id (low half) | the backend id, or for a reverse entry the index of its
//!   forward entry (high half).
//! * meta: SNAT flag (bit 6) | reverse flag (bit 7) | protocol (bits 8–15) | port (bits 16–31:
//!   a forward entry's SNAT port, or a reverse entry's stamp of its forward entry) | last seen
//!   (bits 32–63).

use crate::packet::{Family, FlowKey, IpProto};

use super::{EntryRef, FlowState, FlowValue, Second, Tick};

pub(super) const FREE: u64 = 0;
pub(super) const WRITING: u64 = 1;
pub(super) const VALID: u64 = 2;
pub(super) const STATE_MASK: u64 = 0b11;
const FLOW_STATE_SHIFT: u32 = 2;
const FLOW_STATE_MASK: u64 = 0b1100;
const ESTABLISHED_BITS: u64 = 2 << FLOW_STATE_SHIFT;
const CLOSING_BITS: u64 = 3 << FLOW_STATE_SHIFT;
const BIRTH_SHIFT: u32 = 4;
const BIRTH_MASK: u64 = 0xFFF << BIRTH_SHIFT;
const COUNTER_SHIFT: u32 = 16;
pub(super) const COUNTER_ONE: u64 = 1 << COUNTER_SHIFT;
pub(super) const COUNTER_MASK: u64 = 0xFFFF_0000;

pub(super) fn seq_word(tag: u32, counter: u64, state: u64) -> u64 {
    (u64::from(tag) << 32) | (counter & COUNTER_MASK) | state
}

pub(super) fn seq_tag(seq: u64) -> u32 {
    u32::try_from(seq >> 32).unwrap_or(0)
}

/// The claim counter: what an [`EntryRef`] checks the entry against.
pub(super) fn seq_stamp(seq: u64) -> u16 {
    u16::try_from((seq >> COUNTER_SHIFT) & 0xFFFF).unwrap_or(0)
}

/// The `seq` word with the birth tick `at` (modulo 4096).
pub(super) fn seq_born(seq: u64, at: Tick) -> u64 {
    (seq & !BIRTH_MASK) | (u64::from(at) & 0xFFF) << BIRTH_SHIFT
}

/// How many ticks ago (modulo 4096, 64 s) the entry was published. Under a flood, when
/// evictions happen, every evictable entry is far younger than that; when it wraps, an old
/// entry looks young and is evicted later than it could have been.
#[inline(always)]
pub(super) fn seq_age(seq: u64, now: Tick) -> u16 {
    let born = u16::try_from((seq & BIRTH_MASK) >> BIRTH_SHIFT).unwrap_or(0);
    now.wrapping_sub(born) & 0xFFF
}

/// The flow state of a valid entry.
pub(super) fn seq_flow_state(seq: u64) -> FlowState {
    match (seq & FLOW_STATE_MASK) >> FLOW_STATE_SHIFT {
        1 => FlowState::Replied,
        2 => FlowState::Established,
        3 => FlowState::Closing,
        _ => FlowState::New,
    }
}

/// How much an entry should be evicted before others, from its `seq` word alone: 0 for one
/// that may not be (not valid, or established); else new and replied entries (half-open TCP,
/// one-exchange UDP) above closing ones, and older above younger. In 16 bits and branch-free
/// (it reads only the low 16 bits of the word), so that the ranks of a bucket pair's sixteen
/// entries are computed side by side in two vector registers.
#[inline(always)]
pub(super) fn eviction_rank(seq: u64, now: Tick) -> u16 {
    // Entry state, flow state and birth; the truncation keeps them.
    let low = seq as u16;
    let flow = low & FLOW_STATE_MASK as u16;
    let candidate = u16::from(low & STATE_MASK as u16 == VALID as u16)
        & u16::from(flow != ESTABLISHED_BITS as u16);
    let class = 2 - u16::from(flow == CLOSING_BITS as u16);
    candidate * ((class << 12) | seq_age(seq, now))
}

/// Whether two `seq` words show the same occupant of a place, in the same entry state: equal
/// but perhaps for the flow state, whose changes leave the body's words as they were.
pub(super) fn same_occupant(a: u64, b: u64) -> bool {
    (a ^ b) & !FLOW_STATE_MASK == 0
}

/// The `seq` word with another flow state (everything else kept).
pub(super) fn seq_with_state(seq: u64, state: FlowState) -> u64 {
    let bits: u64 = match state {
        FlowState::New => 0,
        FlowState::Replied => 1,
        FlowState::Established => 2,
        FlowState::Closing => 3,
    };
    (seq & !FLOW_STATE_MASK) | bits << FLOW_STATE_SHIFT
}

/// A key in word form (see the module's layouts).
pub(super) type KeyWords = [u64; 5];

/// Whether two keys in word form are equal: five XORs, where `==` on the arrays became a
/// `memcmp` call (6% of the established path's samples).
#[inline(always)]
pub(super) fn same_key(a: &KeyWords, b: &KeyWords) -> bool {
    a.iter().zip(b).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The key in word form.
pub(super) fn key_words(key: &FlowKey) -> KeyWords {
    let word = |b: &[u8; 16], at: usize| {
        let mut w = [0; 8];
        w.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let family = match key.family {
        Family::Ipv4 => 4u64,
        Family::Ipv6 => 6,
    };
    let ports = u64::from(key.src_port)
        | u64::from(key.dst_port) << 16
        | u64::from(key.proto.0) << 32
        | family << 40;
    match key.family {
        Family::Ipv4 => {
            let address = |b: &[u8; 16]| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            [
                address(&key.src_addr) | address(&key.dst_addr) << 32,
                ports,
                0,
                0,
                0,
            ]
        }
        Family::Ipv6 => [
            word(&key.src_addr, 0),
            word(&key.src_addr, 8),
            word(&key.dst_addr, 0),
            word(&key.dst_addr, 8),
            ports,
        ],
    }
}

pub(super) fn key_from_words(w: &KeyWords) -> FlowKey {
    let mut src = [0; 16];
    let mut dst = [0; 16];
    // An IPv6 key's ports word is last and never zero (it holds the family).
    let ports = if w[4] == 0 {
        src[..4].copy_from_slice(&w[0].to_le_bytes()[..4]);
        dst[..4].copy_from_slice(&w[0].to_le_bytes()[4..]);
        w[1].to_le_bytes()
    } else {
        src[..8].copy_from_slice(&w[0].to_le_bytes());
        src[8..].copy_from_slice(&w[1].to_le_bytes());
        dst[..8].copy_from_slice(&w[2].to_le_bytes());
        dst[8..].copy_from_slice(&w[3].to_le_bytes());
        w[4].to_le_bytes()
    };
    let family = if ports[5] == 6 {
        Family::Ipv6
    } else {
        Family::Ipv4
    };
    FlowKey::new(
        family,
        IpProto(ports[4]),
        (src, u16::from_le_bytes([ports[0], ports[1]])),
        (dst, u16::from_le_bytes([ports[2], ports[3]])),
    )
}

/// The meta word's flag of a reverse entry.
const REVERSE: u64 = 0x80;
/// The meta word's flag of a reverse entry whose flow is source-translated (snat mode).
const SNAT: u64 = 0x40;

/// The value and meta words of an entry.
pub(super) fn value_words(value: FlowValue, proto: IpProto, last_seen: Second) -> (u64, u64) {
    let (low, high, port, flags) = match value {
        FlowValue::Forward {
            service,
            backend,
            snat_port,
        } => (service, backend, snat_port, 0),
        FlowValue::Reverse {
            service,
            forward,
            snat,
        } => (
            service,
            forward.index,
            forward.stamp,
            REVERSE | if snat { SNAT } else { 0 },
        ),
    };
    let value = u64::from(low) | u64::from(high) << 32;
    let meta = u64::from(last_seen) << 32 | u64::from(port) << 16 | u64::from(proto.0) << 8 | flags;
    (value, meta)
}

pub(super) fn value_from_words(value: u64, meta: u64) -> FlowValue {
    let low = u32::try_from(value & 0xFFFF_FFFF).unwrap_or(0);
    let high = u32::try_from(value >> 32).unwrap_or(0);
    let port = u16::try_from((meta >> 16) & 0xFFFF).unwrap_or(0);
    if meta & REVERSE == 0 {
        FlowValue::Forward {
            service: low,
            backend: high,
            snat_port: port,
        }
    } else {
        FlowValue::Reverse {
            service: low,
            forward: EntryRef {
                index: high,
                stamp: port,
            },
            snat: meta & SNAT != 0,
        }
    }
}

/// The meta word with another last-seen time (everything else kept).
pub(super) fn meta_seen_at(meta: u64, last_seen: Second) -> u64 {
    (meta & 0xFFFF_FFFF) | u64::from(last_seen) << 32
}

pub(super) fn meta_seen(meta: u64) -> Second {
    u32::try_from(meta >> 32).unwrap_or(0)
}

pub(super) fn meta_proto(meta: u64) -> IpProto {
    IpProto(u8::try_from((meta >> 8) & 0xFF).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::key_addr;

    #[test]
    fn keys_of_both_families_survive_their_packing_into_words() {
        let k = FlowKey::new(
            Family::Ipv6,
            IpProto::UDP,
            (key_addr("2001:2::1".parse().unwrap()), 5353),
            (key_addr("2001:2::40:1".parse().unwrap()), 53),
        );
        assert_eq!(key_from_words(&key_words(&k)), k);
        let k = FlowKey::new(
            Family::Ipv4,
            IpProto::TCP,
            (key_addr([198, 18, 0, 1].into()), 0),
            (key_addr([198, 19, 255, 254].into()), 65535),
        );
        let words = key_words(&k);
        assert_eq!(words[2..], [0, 0, 0], "an IPv4 key fits in two words");
        assert_eq!(key_from_words(&words), k);
    }

    #[test]
    fn values_states_and_times_survive_their_packing_into_words() {
        let values = [
            FlowValue::Forward {
                service: 7,
                backend: u32::MAX,
                snat_port: 61_000,
            },
            FlowValue::Reverse {
                service: u32::MAX,
                forward: EntryRef {
                    index: 123_456,
                    stamp: 0xBEEF,
                },
                snat: true,
            },
            FlowValue::Reverse {
                service: 1,
                forward: EntryRef { index: 0, stamp: 0 },
                snat: false,
            },
        ];
        let states = [
            FlowState::New,
            FlowState::Replied,
            FlowState::Established,
            FlowState::Closing,
        ];
        for value in values {
            let (v, m) = value_words(value, IpProto::TCP, 0xFFFF_FFF0);
            assert_eq!(value_from_words(v, m), value);
            assert_eq!((meta_seen(m), meta_proto(m)), (0xFFFF_FFF0, IpProto::TCP));
            let later = meta_seen_at(m, 5);
            assert_eq!(value_from_words(v, later), value);
            assert_eq!((meta_seen(later), meta_proto(later)), (5, IpProto::TCP));
        }
        let seq = seq_born(seq_word(0xABCD, 9 * COUNTER_ONE, VALID), 7);
        for state in states {
            let with = seq_with_state(seq, state);
            assert_eq!(seq_age(with, 7), 0);
            assert_eq!(seq_flow_state(with), state);
            assert_eq!(
                (seq_tag(with), seq_stamp(with), with & STATE_MASK),
                (0xABCD, 9, VALID)
            );
        }
    }

    #[test]
    fn half_open_flows_rank_above_closing_ones_and_older_above_younger() {
        let at = |state, born| seq_with_state(seq_born(seq_word(1, 0, VALID), born), state);
        let rank = |state, born| eviction_rank(at(state, born), 100);
        assert_eq!(rank(FlowState::Established, 0), 0);
        assert_eq!(eviction_rank(seq_word(1, 0, WRITING), 100), 0);
        assert_eq!(eviction_rank(seq_word(1, 0, FREE), 100), 0);
        assert!(rank(FlowState::New, 90) > rank(FlowState::New, 95));
        assert_eq!(rank(FlowState::Replied, 90), rank(FlowState::New, 90));
        assert!(rank(FlowState::New, 99) > rank(FlowState::Closing, 4000));
        assert!(rank(FlowState::Closing, 100) > 0);
        assert_eq!(
            rank(FlowState::New, 4090),
            rank(FlowState::New, 100) + 106,
            "across the wrap"
        );
    }

    #[test]
    fn a_stamp_is_the_claim_counter_and_an_age_the_ticks_since_birth() {
        let seq = seq_word(0xABCD, 5 * COUNTER_ONE, VALID);
        assert_eq!(seq_stamp(seq), 5);
        let wrapped = seq_word(0xABCD, 0x1_0005 * COUNTER_ONE, VALID);
        assert_eq!(seq_stamp(wrapped), 5, "the 16-bit counter wraps");
        let born = seq_born(seq, 1000);
        assert_eq!(seq_stamp(born), 5);
        assert_eq!((seq_age(born, 1000), seq_age(born, 1010)), (0, 10));
        assert_eq!(seq_age(born, 1000 + 4095), 4095);
        assert_eq!(seq_age(seq_born(seq, 4090), 3), 9, "across the wrap");
    }
}
