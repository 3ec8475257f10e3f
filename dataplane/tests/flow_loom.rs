//! Loom models of the flow table's insert, lookup and eviction protocol.
//!
//! Run with `make loom` (`RUSTFLAGS="--cfg loom" cargo test --release --test flow_loom`);
//! `make test` runs it. Each model is one bucket (every key lands in it) and two threads.
//! Every racing operation runs in a spawned thread: loom did not explore interleavings
//! against operations of the model's main thread (one execution instead of dozens).
//! The models were checked against broken variants of the protocol (a reader that skips
//! its second `seq` read; a writer that publishes before writing): each broken variant
//! fails here.
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use xlb_dataplane::lb::flow::{FlowState, FlowTable, FlowValue, Insert, Timeouts, WAYS};
use xlb_dataplane::lb::hash::flow_hash;
use xlb_dataplane::packet::{key_addr, Family, FlowKey, IpProto};

fn key(port: u16) -> FlowKey {
    FlowKey::new(
        Family::Ipv4,
        IpProto::TCP,
        (key_addr([198, 18, 0, 1].into()), port),
        (key_addr([198, 18, 64, 1].into()), 80),
    )
}

fn value(backend: u32) -> FlowValue {
    FlowValue::Forward {
        service: 7,
        backend,
        snat_port: 0,
    }
}

fn one_bucket() -> Arc<FlowTable> {
    Arc::new(FlowTable::new(WAYS, Timeouts::default()))
}

/// Runs `f` on the table in a new loom thread.
fn on<T: Send + 'static>(
    table: &Arc<FlowTable>,
    f: impl FnOnce(&FlowTable) -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let table = Arc::clone(table);
    thread::spawn(move || f(&table))
}

/// After two inserts of `k` (values 1 and 2) raced: neither found the table full, and exactly
/// one entry of `k` stays, holding either value, which a lookup finds.
fn assert_one_entry_of_either(table: &FlowTable, k: &FlowKey, results: &[Insert; 2]) {
    assert!(
        results.iter().all(|r| !matches!(r, Insert::Full)),
        "{results:?}"
    );
    let entries: Vec<_> = table.iter(0).filter(|(key, _)| key == k).collect();
    assert_eq!(entries.len(), 1, "{results:?}");
    let kept = entries[0].1.value;
    assert!(kept == value(1) || kept == value(2));
    assert_eq!(
        table.lookup(k, flow_hash(k), 0).map(|hit| hit.value),
        Some(kept)
    );
}

#[test]
fn two_inserts_of_one_flow_leave_exactly_one_entry() {
    loom::model(|| {
        let table = one_bucket();
        let k = key(1);
        let h = flow_hash(&k);
        let a = on(&table, move |t| {
            t.insert(&k, h, value(1), FlowState::New, 0)
        });
        let b = on(&table, move |t| {
            t.insert(&k, h, value(2), FlowState::New, 0)
        });
        let results = [a.join().unwrap(), b.join().unwrap()];
        assert_one_entry_of_either(&table, &k, &results);
    });
}

/// A batch's insert takes the place its prefetch chose and does not look for its key first
/// (the place says it was absent): raced by an insert of the same flow that does look, and
/// by one that was offered the same place, exactly one entry stays.
#[test]
fn an_insert_at_a_place_racing_an_insert_of_the_same_flow_leaves_exactly_one_entry() {
    for other_placed in [false, true] {
        loom::model(move || {
            let table = one_bucket();
            let k = key(1);
            let h = flow_hash(&k);
            let place = table.prefetch_entry(Family::Ipv4, h, 0);
            assert!(place.is_some(), "an empty bucket offers a place");
            let a = on(&table, move |t| {
                t.insert_placed(&k, h, value(1), FlowState::New, 0, 0, place)
            });
            let b = on(&table, move |t| {
                let place = if other_placed { place } else { None };
                t.insert_placed(&k, h, value(2), FlowState::New, 0, 0, place)
            });
            let results = [a.join().unwrap(), b.join().unwrap()];
            assert_one_entry_of_either(&table, &k, &results);
        });
    }
}

#[test]
fn a_lookup_racing_an_insert_sees_the_whole_entry_or_none() {
    loom::model(|| {
        let table = one_bucket();
        let k = key(1);
        let h = flow_hash(&k);
        let writer = on(&table, move |t| {
            t.insert(&k, h, value(42), FlowState::New, 0)
        });
        let reader = on(&table, move |t| t.lookup(&k, h, 0).map(|hit| hit.value));
        assert!(matches!(writer.join().unwrap(), Insert::Inserted(_)));
        let seen = reader.join().unwrap();
        assert!(seen.is_none() || seen == Some(value(42)), "{seen:?}");
    });
}

#[test]
fn a_lookup_racing_an_eviction_sees_the_old_entry_or_none() {
    loom::model(|| {
        let table = one_bucket();
        for p in 0..WAYS as u16 {
            let k = key(p);
            let _ = table.insert(
                &k,
                flow_hash(&k),
                value(u32::from(p)),
                FlowState::New,
                u32::from(p),
            );
        }
        // key(0) is the least recently seen new flow: the insert evicts it.
        let newcomer = key(100);
        let writer = on(&table, move |t| {
            t.insert(
                &newcomer,
                flow_hash(&newcomer),
                value(100),
                FlowState::New,
                10,
            )
        });
        let old = key(0);
        let reader = on(&table, move |t| {
            t.lookup(&old, flow_hash(&old), 10).map(|hit| hit.value)
        });
        assert!(matches!(writer.join().unwrap(), Insert::Inserted(_)));
        let seen = reader.join().unwrap();
        assert!(seen.is_none() || seen == Some(value(0)), "{seen:?}");
        assert!(table.lookup(&old, flow_hash(&old), 10).is_none());
    });
}

/// Issue 11, fault 7: a reply (following its reverse entry's reference to the forward entry)
/// racing the eviction of that forward entry by another flow. The reply sees its own flow or
/// nothing, and its state change never reaches the newcomer.
#[test]
fn a_reply_racing_the_eviction_of_its_forward_entry_never_reaches_the_newcomer() {
    loom::model(|| {
        let table = one_bucket();
        let old = key(1);
        let Insert::Inserted(forward) =
            table.insert(&old, flow_hash(&old), value(1), FlowState::New, 0)
        else {
            panic!()
        };
        // The rest of the bucket established: the forward entry is the only victim.
        for p in 2..=WAYS as u16 {
            let k = key(p);
            let _ = table.insert(&k, flow_hash(&k), value(1), FlowState::Established, 0);
        }
        let reverse = xlb_dataplane::lb::flow::Hit {
            entry: forward,
            value: FlowValue::Reverse {
                service: 7,
                forward,
                snat: true,
            },
            state: FlowState::New,
            last_seen: 0,
        };
        let newcomer = key(100);
        let evictor = on(&table, move |t| {
            t.insert(
                &newcomer,
                flow_hash(&newcomer),
                value(100),
                FlowState::New,
                1,
            )
        });
        let reply = on(&table, move |t| {
            let found = t.forward_of(&reverse, 1).map(|(k, _)| k);
            t.touch(forward, 1, Some(FlowState::Replied));
            found
        });
        assert!(matches!(evictor.join().unwrap(), Insert::Inserted(_)));
        let found = reply.join().unwrap();
        assert!(found.is_none() || found == Some(old), "{found:?}");
        let hit = table.lookup(&newcomer, flow_hash(&newcomer), 1).unwrap();
        assert_eq!(hit.state, FlowState::New, "the newcomer was promoted");
        assert!(table.forward_of(&reverse, 1).is_none());
    });
}
