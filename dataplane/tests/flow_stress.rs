//! Many threads on one flow table: no entry is lost, torn or duplicated.
//!
//! Every key's value is a function of the key, so a lookup that returns anything else has
//! read a torn or foreign entry. Bounded in keys and rounds, it runs in about a second.
#![cfg(not(loom))]

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use xlb_dataplane::lb::flow::{FlowState, FlowTable, FlowValue, Insert, Timeouts};
use xlb_dataplane::lb::hash::flow_hash;
use xlb_dataplane::packet::{key_addr, Family, FlowKey, IpProto};

const THREADS: u32 = 4;

fn key(n: u32) -> FlowKey {
    FlowKey::new(
        Family::Ipv4,
        IpProto::UDP,
        (
            key_addr(std::net::Ipv4Addr::from(0xc612_0000 | (n >> 16)).into()),
            n as u16,
        ),
        (key_addr([198, 18, 64, 1].into()), 53),
    )
}

/// The value every thread inserts for key `n`.
fn value_of(n: u32) -> FlowValue {
    FlowValue::Forward {
        service: n.wrapping_mul(2_654_435_761),
        backend: !n,
        snat_port: (n % 65_521) as u16,
    }
}

#[test]
fn racing_inserts_and_lookups_never_lose_tear_or_duplicate_an_entry() {
    let keys = 20_000u32;
    // Room for every key without eviction: 4x the keys.
    let table = Arc::new(FlowTable::new(keys as usize * 4, Timeouts::default()));
    let torn = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let table = Arc::clone(&table);
            let torn = Arc::clone(&torn);
            thread::spawn(move || {
                // Each thread walks all keys from a different start: every key is inserted
                // by several threads, racing.
                let mut pending = Vec::new();
                for i in 0..keys {
                    let n = (i + t * keys / THREADS) % keys;
                    let k = key(n);
                    let h = flow_hash(&k);
                    match table.insert(&k, h, value_of(n), FlowState::Established, 1) {
                        Insert::Inserted(_) => {}
                        Insert::Existing(hit) if hit.value == value_of(n) => {}
                        Insert::Existing(_) => {
                            torn.fetch_add(1, Ordering::Relaxed);
                        }
                        // Racing inserts of one key hold several entries for a moment, so a
                        // bucket pair can be full transiently: retried below, like Pending.
                        Insert::Pending | Insert::Full => pending.push(n),
                    }
                    let probe = (n * 7 + 3) % keys;
                    let pk = key(probe);
                    if let Some(hit) = table.lookup(&pk, flow_hash(&pk), 1) {
                        if hit.value != value_of(probe) {
                            torn.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                // A pending insert is retried, as the next packet of the flow would.
                for n in pending {
                    let k = key(n);
                    for _ in 0..100 {
                        let r =
                            table.insert(&k, flow_hash(&k), value_of(n), FlowState::Established, 1);
                        if matches!(r, Insert::Inserted(_) | Insert::Existing(_)) {
                            break;
                        }
                        thread::yield_now();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(
        torn.load(Ordering::Relaxed),
        0,
        "a lookup returned another key's value"
    );
    let mut seen = HashSet::new();
    for (k, hit) in table.iter(1) {
        assert!(seen.insert(k), "{k} is in the table twice");
        let n = u32::from(k.src_port) | (u32::from(k.src_addr[3]) << 16);
        assert_eq!(hit.value, value_of(n), "{k} holds a torn value");
    }
    for n in 0..keys {
        let k = key(n);
        assert!(
            table.lookup(&k, flow_hash(&k), 1).is_some(),
            "key {n} was lost"
        );
    }
    assert_eq!(seen.len(), keys as usize);
}

#[test]
fn lookups_racing_evictions_see_whole_entries_or_none() {
    // A small table and many more new flows than it holds: constant eviction.
    let table = Arc::new(FlowTable::new(256, Timeouts::default()));
    let torn = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let table = Arc::clone(&table);
            let torn = Arc::clone(&torn);
            thread::spawn(move || {
                for i in 0..50_000u32 {
                    let n = (i * THREADS + t) % 4096;
                    let k = key(n);
                    let h = flow_hash(&k);
                    let _ = table.insert(&k, h, value_of(n), FlowState::New, i / 1000);
                    let probe = (n * 13 + 1) % 4096;
                    let pk = key(probe);
                    if let Some(hit) = table.lookup(&pk, flow_hash(&pk), i / 1000) {
                        if hit.value != value_of(probe) {
                            torn.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(torn.load(Ordering::Relaxed), 0);
    let mut seen = HashSet::new();
    for (k, _) in table.iter(50) {
        assert!(seen.insert(k), "{k} is in the table twice");
    }
}

/// Fault 7 of issue 11, under real concurrency: references kept across evictions (as a
/// reverse entry keeps one to its forward entry) must never change another flow. Threads
/// insert flows into a small table under constant eviction and promote, through references
/// they kept, only the flows whose number is even; no odd flow may ever be established.
#[test]
fn promotions_through_stale_references_never_reach_another_flow() {
    let table = Arc::new(FlowTable::new(256, Timeouts::default()));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let table = Arc::clone(&table);
            thread::spawn(move || {
                let mut kept = Vec::new();
                for i in 0..40_000u32 {
                    let n = (i * THREADS + t) % 8192;
                    let k = key(n);
                    if let Insert::Inserted(entry) =
                        table.insert(&k, flow_hash(&k), value_of(n), FlowState::New, 1)
                    {
                        if n % 2 == 0 {
                            kept.push(entry);
                        }
                    }
                    // Promote through a reference taken long ago: most are stale by now.
                    if let Some(old) = kept.get(i as usize / 2) {
                        table.touch(*old, 1, Some(FlowState::Replied));
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let promoted: Vec<u32> = table
        .iter(1)
        .filter(|(_, hit)| hit.state == FlowState::Replied)
        .map(|(k, _)| u32::from(k.src_port) | (u32::from(k.src_addr[3]) << 16))
        .collect();
    assert!(
        promoted.iter().all(|n| n % 2 == 0),
        "an odd flow was promoted through another flow's reference: {promoted:?}"
    );
}
