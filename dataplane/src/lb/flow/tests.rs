use super::*;
use crate::lb::hash::flow_hash;
use crate::packet::key_addr;

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
        service: 1,
        backend,
        snat_port: 0,
    }
}

fn insert(t: &FlowTable, k: &FlowKey, v: FlowValue, state: FlowState, now: Second) -> EntryRef {
    match t.insert(k, flow_hash(k), v, state, now) {
        Insert::Inserted(e) => e,
        other => panic!("{other:?}"),
    }
}

fn backend_of(hit: &Hit) -> u32 {
    match hit.value {
        FlowValue::Forward { backend, .. } => backend,
        FlowValue::Reverse { .. } => panic!("a reverse entry"),
    }
}

/// The memory target: a connection (two entries) at 80% load in at most 128 bytes.
/// IPv4, the common case, takes 100; IPv6 180.
#[test]
fn an_ipv4_entry_takes_40_bytes_an_ipv6_one_72_and_a_bucket_of_tags_one_cache_line() {
    use table::{Body4, Body6, SeqLine};
    assert_eq!(core::mem::size_of::<SeqLine>(), 64);
    assert_eq!(core::mem::align_of::<SeqLine>(), 64);
    assert_eq!(Table::<Body4>::entry_bytes(), ENTRY_BYTES_IPV4);
    assert_eq!(Table::<Body6>::entry_bytes(), ENTRY_BYTES_IPV6);
    // A body is aligned to its size: reading it is one cache miss.
    assert_eq!(
        core::mem::align_of::<Body4>(),
        core::mem::size_of::<Body4>()
    );
    assert_eq!(
        core::mem::align_of::<Body6>(),
        core::mem::size_of::<Body6>()
    );
    const { assert!(2 * ENTRY_BYTES_IPV4 * 10 / 8 <= 128) };
    let t = FlowTable::with_capacities(1000, 100, Timeouts::default());
    assert_eq!(
        (t.capacity_of(Family::Ipv4), t.capacity_of(Family::Ipv6)),
        (1024, 128),
        "rounded up to a power of two of buckets"
    );
    assert_eq!(
        t.memory_bytes(),
        1024 * ENTRY_BYTES_IPV4 + 128 * ENTRY_BYTES_IPV6
    );
    assert_eq!(FlowTable::memory_for(1000, 100), t.memory_bytes());
    assert_eq!(
        FlowTable::new(1000, Timeouts::default()).capacity_of(Family::Ipv6),
        256,
        "IPv6 gets a quarter by default"
    );
}

#[test]
fn capacities_beyond_the_maximum_are_clamped_not_allocated() {
    assert_eq!(
        FlowTable::memory_for(usize::MAX, usize::MAX),
        MAX_CAPACITY * (ENTRY_BYTES_IPV4 + ENTRY_BYTES_IPV6)
    );
    assert_eq!(
        FlowTable::memory_for(0, 0),
        WAYS * (ENTRY_BYTES_IPV4 + ENTRY_BYTES_IPV6)
    );
}

fn key6(port: u16) -> FlowKey {
    FlowKey::new(
        Family::Ipv6,
        IpProto::TCP,
        (key_addr("2001:2::1".parse().unwrap()), port),
        (key_addr("2001:2::40:1".parse().unwrap()), 80),
    )
}

/// Each family has its own table; an entry reference names the table too, so a reverse
/// entry reaches its forward one and a removal or a touch reaches only its own entry.
#[test]
fn ipv6_flows_live_in_their_own_table_and_work_as_ipv4_ones_do() {
    let t = FlowTable::with_capacities(WAYS, WAYS, Timeouts::default());
    let (k4, k6) = (key(1), key6(1));
    let e4 = insert(&t, &k4, value(4), FlowState::New, 0);
    let e6 = insert(&t, &k6, value(6), FlowState::New, 0);
    assert!(usize::try_from(e4.index).unwrap() < t.capacity_of(Family::Ipv4));
    assert!(usize::try_from(e6.index).unwrap() >= t.capacity_of(Family::Ipv4));
    assert_eq!(backend_of(&t.lookup(&k6, flow_hash(&k6), 0).unwrap()), 6);
    assert_eq!(backend_of(&t.lookup(&k4, flow_hash(&k4), 0).unwrap()), 4);
    let r6 = k6.reversed();
    let reverse = FlowValue::Reverse {
        service: 1,
        forward: e6,
        snat: false,
    };
    let _ = insert(&t, &r6, reverse, FlowState::New, 0);
    let hit = t.lookup(&r6, flow_hash(&r6), 0).unwrap();
    assert_eq!(t.forward_of(&hit, 0).unwrap().0, k6);
    t.touch(e6, 5, Some(FlowState::Established));
    let hit = t.lookup(&k6, flow_hash(&k6), 5).unwrap();
    assert_eq!((hit.state, hit.last_seen), (FlowState::Established, 5));
    assert_eq!(
        t.lookup(&k4, flow_hash(&k4), 5).unwrap().state,
        FlowState::New
    );
    // Both families are iterated, IPv4 first, and a page starting in IPv6 sees only IPv6.
    let keys: Vec<_> = t.iter(5).map(|(k, _)| k).collect();
    assert_eq!(keys, [k4, k6, r6]);
    assert_eq!(t.iter_from(e6.index as usize, 5).count(), 2);
    // A full IPv4 table leaves IPv6 inserts alone.
    for p in 2..2 + WAYS as u16 {
        let _ = insert(&t, &key(p), value(4), FlowState::Established, 5);
    }
    assert!(matches!(
        t.insert(&key(100), flow_hash(&key(100)), value(4), FlowState::New, 5),
        Insert::Full
    ));
    let _ = insert(&t, &key6(2), value(6), FlowState::New, 5);
    t.remove(e6, &k6);
    assert!(t.lookup(&k6, flow_hash(&k6), 5).is_none());
    assert!(t.lookup(&key6(2), flow_hash(&key6(2)), 5).is_some());
}

#[test]
fn an_inserted_flow_is_found_until_it_expires() {
    let t = FlowTable::new(64, Timeouts::default());
    let k = key(40000);
    let h = flow_hash(&k);
    let _ = insert(&t, &k, value(7), FlowState::New, 100);
    let hit = t.lookup(&k, h, 150).unwrap();
    assert_eq!((backend_of(&hit), hit.state), (7, FlowState::New));
    assert!(
        t.lookup(&k, h, 100 + 121).is_none(),
        "TCP new times out after 120 s"
    );
    assert!(t.lookup(&key(40001), flow_hash(&key(40001)), 150).is_none());
}

#[test]
fn a_second_insert_of_a_key_returns_the_first() {
    let t = FlowTable::new(64, Timeouts::default());
    let k = key(1);
    let h = flow_hash(&k);
    let _ = t.insert(&k, h, value(1), FlowState::New, 0);
    match t.insert(&k, h, value(2), FlowState::New, 0) {
        Insert::Existing(hit) => assert_eq!(backend_of(&hit), 1),
        other => panic!("{other:?}"),
    }
}

#[test]
fn states_only_move_forward_and_closing_is_final() {
    let t = FlowTable::new(64, Timeouts::default());
    let k = key(1);
    let h = flow_hash(&k);
    let e = insert(&t, &k, value(1), FlowState::New, 0);
    t.touch(e, 5, Some(FlowState::Replied));
    assert_eq!(t.lookup(&k, h, 5).unwrap().state, FlowState::Replied);
    assert!(
        t.lookup(&k, h, 5 + 61).is_none(),
        "a TCP flow answered but never acknowledged lives 60 s"
    );
    t.touch(e, 6, Some(FlowState::Established));
    t.touch(e, 6, Some(FlowState::Replied));
    assert_eq!(t.lookup(&k, h, 6).unwrap().state, FlowState::Established);
    assert!(t.lookup(&k, h, 86_000).is_some(), "established lives long");
    t.touch(e, 7, Some(FlowState::Closing));
    t.touch(e, 8, Some(FlowState::Established));
    let hit = t.lookup(&k, h, 8).unwrap();
    assert_eq!((hit.state, hit.last_seen), (FlowState::Closing, 8));
}

#[test]
fn udp_flows_time_out_in_30_s_unless_they_became_a_stream() {
    let t = FlowTable::new(64, Timeouts::default());
    let mut k = key(53);
    k.proto = IpProto::UDP;
    let h = flow_hash(&k);
    let e = insert(&t, &k, value(1), FlowState::New, 0);
    t.touch(e, 1, Some(FlowState::Replied));
    assert!(t.lookup(&k, h, 31).is_some());
    assert!(t.lookup(&k, h, 32).is_none());
    let mut k2 = k;
    k2.src_port = 54;
    let e = insert(&t, &k2, value(1), FlowState::New, 0);
    t.touch(e, 1, Some(FlowState::Established));
    assert!(t.lookup(&k2, flow_hash(&k2), 121).is_some());
    assert!(t.lookup(&k2, flow_hash(&k2), 122).is_none());
}

#[test]
fn a_full_bucket_evicts_flows_that_are_not_established_but_never_established_ones() {
    // One bucket: every key lands in it.
    let t = FlowTable::new(WAYS, Timeouts::default());
    let keys: Vec<FlowKey> = (0..WAYS as u16).map(key).collect();
    for (n, k) in keys.iter().enumerate() {
        let e = insert(&t, k, value(1), FlowState::New, n as u32);
        // Answered, then acknowledged: a completed handshake.
        t.touch(e, n as u32, Some(FlowState::Replied));
        t.touch(e, n as u32, Some(FlowState::Established));
    }
    let flood = key(999);
    assert_eq!(
        t.insert(&flood, flow_hash(&flood), value(2), FlowState::New, 10),
        Insert::Full
    );
    assert!(keys.iter().all(|k| t.lookup(k, flow_hash(k), 10).is_some()));
    assert_eq!((t.full_inserts(), t.evictions()), (1, 0));

    // One of them closing: the flood takes its place.
    let hit = t.lookup(&keys[2], flow_hash(&keys[2]), 10).unwrap();
    t.touch(hit.entry, 10, Some(FlowState::Closing));
    let _ = insert(&t, &flood, value(2), FlowState::New, 11);
    assert!(t.lookup(&keys[2], flow_hash(&keys[2]), 11).is_none());
    assert!(t.lookup(&keys[0], flow_hash(&keys[0]), 11).is_some());
    assert_eq!((t.full_inserts(), t.evictions()), (1, 1));
}

#[test]
fn half_open_flows_are_evicted_before_closing_ones() {
    let t = FlowTable::new(WAYS, Timeouts::default());
    let keys: Vec<FlowKey> = (0..WAYS as u16).map(key).collect();
    for (n, k) in keys.iter().enumerate() {
        let e = insert(&t, k, value(1), FlowState::New, 0);
        // The first half closing, the last one answered but never acknowledged (a SYN flood).
        let state = if n < WAYS / 2 {
            FlowState::Closing
        } else {
            FlowState::Replied
        };
        t.touch(e, 0, Some(state));
    }
    let newcomer = key(500);
    let _ = insert(&t, &newcomer, value(2), FlowState::New, 1);
    let gone: Vec<usize> = (0..WAYS)
        .filter(|&n| t.lookup(&keys[n], flow_hash(&keys[n]), 1).is_none())
        .collect();
    assert_eq!(gone.len(), 1);
    assert!(gone[0] >= WAYS / 2, "a closing flow went first: {gone:?}");
}

#[test]
fn expired_entries_are_reused_first() {
    let t = FlowTable::new(WAYS, Timeouts::default());
    for p in 0..WAYS as u16 {
        let k = key(p);
        let _ = t.insert(&k, flow_hash(&k), value(1), FlowState::Established, 0);
    }
    let k = key(500);
    // These are TCP established: fresh until 86 400.
    assert_eq!(
        t.insert(&k, flow_hash(&k), value(1), FlowState::New, 1000),
        Insert::Full
    );
    assert!(matches!(
        t.insert(&k, flow_hash(&k), value(1), FlowState::New, 90_000),
        Insert::Inserted(_)
    ));
}

#[test]
fn removal_and_iteration_see_what_is_there() {
    let t = FlowTable::new(1024, Timeouts::default());
    let mut entries = Vec::new();
    for p in 0..100 {
        let k = key(p);
        if let Insert::Inserted(e) =
            t.insert(&k, flow_hash(&k), value(u32::from(p)), FlowState::New, 0)
        {
            entries.push((e, k));
        }
    }
    assert_eq!(t.iter(0).count(), entries.len());
    let (e, k) = entries[0];
    t.remove(e, &k);
    assert!(t.lookup(&k, flow_hash(&k), 0).is_none());
    assert_eq!(t.iter(0).count(), entries.len() - 1);
    assert!(t
        .iter(0)
        .all(|(k, hit)| u32::from(k.src_port) == backend_of(&hit)));
    // A dump in pages: from an index on.
    let last = t.iter(0).map(|(_, hit)| hit.entry.index).max().unwrap();
    assert_eq!(t.iter_from(last as usize, 0).count(), 1);
}

/// The reply of a flow whose forward entry was evicted, and whose place another flow took:
/// the reverse entry's reference must not reach the newcomer.
#[test]
fn a_reference_to_an_entry_whose_place_was_reused_reaches_nothing() {
    let t = FlowTable::new(WAYS, Timeouts::default());
    let old = key(1);
    let old_entry = insert(&t, &old, value(1), FlowState::New, 0);
    let reverse_key = old.reversed();
    let reverse = FlowValue::Reverse {
        service: 1,
        forward: old_entry,
        snat: true,
    };
    let _ = t.insert(
        &reverse_key,
        flow_hash(&reverse_key),
        reverse,
        FlowState::New,
        0,
    );
    let reverse_hit = t.lookup(&reverse_key, flow_hash(&reverse_key), 0).unwrap();
    assert_eq!(t.forward_of(&reverse_hit, 0).unwrap().0, old);

    // The forward entry goes (evicted, expired) and another flow takes its place.
    t.remove(old_entry, &old);
    let mut taken = None;
    for port in 2..200 {
        let k = key(port);
        let e = insert(&t, &k, value(9), FlowState::New, 1);
        if e.index == old_entry.index {
            taken = Some((k, e));
            break;
        }
        t.remove(e, &k);
    }
    let (newcomer, entry) = taken.expect("the place is reused");
    assert_ne!(entry.stamp, old_entry.stamp);
    assert!(t.forward_of(&reverse_hit, 1).is_none(), "not the same flow");
    // A reply's touch through the stale reference neither promotes nor refreshes it.
    t.touch(old_entry, 50, Some(FlowState::Established));
    let hit = t.lookup(&newcomer, flow_hash(&newcomer), 50).unwrap();
    assert_eq!((hit.state, hit.last_seen), (FlowState::New, 1));
    // Nor removes it.
    t.remove(old_entry, &newcomer);
    assert!(t.lookup(&newcomer, flow_hash(&newcomer), 50).is_some());
}

#[test]
fn a_forward_entry_of_another_service_is_not_a_reverse_entrys_flow() {
    let t = FlowTable::new(64, Timeouts::default());
    let k = key(1);
    let e = insert(&t, &k, value(1), FlowState::New, 0);
    let reverse = Hit {
        entry: EntryRef::default(),
        value: FlowValue::Reverse {
            service: 2,
            forward: e,
            snat: false,
        },
        state: FlowState::New,
        last_seen: 0,
    };
    assert!(t.forward_of(&reverse, 0).is_none());
}

/// Under a flood every evictable entry is seconds young; eviction still takes the oldest by
/// tick, so a new connection's entry lasts as long as the table takes to turn over, not
/// until the next insert that lands in its bucket.
#[test]
fn eviction_takes_the_oldest_entry_by_tick_so_a_new_flow_outlives_the_flood_behind_it() {
    let t = FlowTable::new(WAYS, Timeouts::default());
    for p in 0..WAYS as u16 {
        let k = key(p);
        let tick = 100 + p;
        assert!(matches!(
            t.insert_at(&k, flow_hash(&k), value(1), FlowState::New, 1, tick),
            Insert::Inserted(_)
        ));
    }
    let legit = key(1000);
    let _ = t.insert_at(&legit, flow_hash(&legit), value(2), FlowState::New, 1, 200);
    assert!(
        t.lookup(&key(0), flow_hash(&key(0)), 1).is_none(),
        "the oldest went"
    );
    // The flood goes on: seven more inserts take the seven older entries, not the newcomer.
    for p in 0..7u16 {
        let k = key(2000 + p);
        let _ = t.insert_at(&k, flow_hash(&k), value(1), FlowState::New, 1, 201 + p);
        assert!(
            t.lookup(&legit, flow_hash(&legit), 1).is_some(),
            "after {p}"
        );
    }
    // Only then is it the oldest.
    let k = key(3000);
    let _ = t.insert_at(&k, flow_hash(&k), value(1), FlowState::New, 1, 300);
    assert!(t.lookup(&legit, flow_hash(&legit), 1).is_none());
}

#[test]
fn sctp_has_udps_timeout_until_established_then_conntracks_210_seconds() {
    let t = Timeouts::default();
    assert_eq!(t.of(IpProto::SCTP, FlowState::New), t.udp);
    assert_eq!(t.of(IpProto::SCTP, FlowState::Replied), t.udp);
    assert_eq!(t.of(IpProto::SCTP, FlowState::Established), 210);
    assert_eq!(t.of(IpProto::UDP, FlowState::Established), t.udp_stream);
}

/// Huge pages, where the kernel has them (transparent huge pages not `never`): a table of a
/// million entries (64 MiB) is mostly backed by 2 MiB pages, measured by the process's
/// `AnonHugePages` before and after it is built.
#[test]
fn a_big_table_lives_in_huge_pages_where_the_kernel_gives_them() {
    let setting =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if !setting.contains("[always]") && !setting.contains("[madvise]") {
        eprintln!(
            "SKIPPED: transparent huge pages are off here ({})",
            setting.trim()
        );
        return;
    }
    let huge = || {
        std::fs::read_to_string("/proc/self/smaps_rollup")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("AnonHugePages:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    let before = huge();
    let table = FlowTable::new(1 << 20, Timeouts::default());
    let gained = huge().saturating_sub(before);
    assert!(
        gained >= table.memory_bytes() / 4,
        "{gained} bytes in huge pages for a table of {}",
        table.memory_bytes()
    );
}

/// A batch's insert takes the place its prefetch chose, without choosing again; a place whose
/// entry changed since, or that is not one of the flow's, is passed over.
#[test]
fn an_insert_takes_the_place_offered_unless_its_entry_changed_or_is_not_the_flows() {
    let t = FlowTable::with_capacities(WAYS, WAYS, Timeouts::default());
    let (a, b) = (key(1), key(2));
    let ha = flow_hash(&a);
    let chosen = t.prefetch_entry(Family::Ipv4, ha, 0).expect("a free way");
    assert_eq!(chosen.index, 0, "the first free way");
    // A place that is not the first choice shows that the offered place is the one taken.
    let third = Place {
        index: 3,
        seq: chosen.seq,
    };
    let placed = t.insert_placed(&a, ha, value(1), FlowState::New, 0, 0, Some(third));
    assert!(
        matches!(placed, Insert::Inserted(e) if e.index == 3),
        "{placed:?}"
    );
    // The same place again: its entry changed (a is there now), so b goes elsewhere.
    let hb = flow_hash(&b);
    let placed = t.insert_placed(&b, hb, value(2), FlowState::New, 0, 0, Some(third));
    assert!(
        matches!(placed, Insert::Inserted(e) if e.index == 0),
        "{placed:?}"
    );
    assert_eq!(backend_of(&t.lookup(&a, ha, 0).unwrap()), 1);
    assert_eq!(backend_of(&t.lookup(&b, hb, 0).unwrap()), 2);
    // A place outside the flow's buckets (here: in the IPv6 table) is not taken.
    let elsewhere = Place {
        index: u32::try_from(t.capacity_of(Family::Ipv4)).unwrap(),
        seq: chosen.seq,
    };
    let c = key(3);
    let placed = t.insert_placed(
        &c,
        flow_hash(&c),
        value(3),
        FlowState::New,
        0,
        0,
        Some(elsewhere),
    );
    assert!(
        matches!(placed, Insert::Inserted(e) if e.index < 8),
        "{placed:?}"
    );
}

/// A place is chosen a moment before its insert; if the flow was recorded in between (the
/// insert does not look first), the two entries are resolved as a race is: one stays, and
/// the flow's later packets find it.
#[test]
fn an_insert_at_a_place_chosen_before_its_flow_was_recorded_leaves_one_entry() {
    for (recorded_at, placed_at) in [(1, 5), (5, 1)] {
        let t = FlowTable::with_capacities(WAYS, WAYS, Timeouts::default());
        let (a, ha) = (key(1), flow_hash(&key(1)));
        let first = t.prefetch_entry(Family::Ipv4, ha, 0).expect("a free way");
        let at = |index| Place {
            index,
            seq: first.seq,
        };
        // The earlier insert went to `recorded_at` (its place), the later one's place is
        // `placed_at`.
        let earlier = t.insert_placed(
            &a,
            ha,
            value(1),
            FlowState::New,
            0,
            0,
            Some(at(recorded_at)),
        );
        assert!(matches!(earlier, Insert::Inserted(e) if e.index == recorded_at));
        let later = t.insert_placed(&a, ha, value(2), FlowState::New, 0, 0, Some(at(placed_at)));
        let entries: Vec<_> = t.iter_from(0, 0).filter(|(k, _)| *k == a).collect();
        assert_eq!(entries.len(), 1, "{later:?}");
        let kept = backend_of(&entries[0].1);
        match later {
            Insert::Existing(hit) => assert_eq!((backend_of(&hit), kept), (1, 1)),
            Insert::Inserted(e) => assert_eq!((e.index, kept), (placed_at, 2)),
            other => panic!("{other:?}"),
        }
        assert_eq!(backend_of(&t.lookup(&a, ha, 0).unwrap()), kept);
    }
}

/// The IPv6 table is a quarter of the IPv4 one by default, so a flood of new IPv6 flows fills
/// it first: it must evict only flows that are not established, as the IPv4 table does, and
/// leave the IPv4 table alone.
#[test]
fn a_flood_of_new_ipv6_flows_never_evicts_an_established_ipv6_or_any_ipv4_flow() {
    let t = FlowTable::new(4 * WAYS, Timeouts::default());
    assert_eq!(t.capacity_of(Family::Ipv6), WAYS, "one bucket");
    let kept = key6(1);
    let e = insert(&t, &kept, value(6), FlowState::New, 0);
    t.touch(e, 0, Some(FlowState::Replied));
    t.touch(e, 0, Some(FlowState::Established));
    let k4 = key(1);
    let _ = insert(&t, &k4, value(4), FlowState::New, 0);
    let mut inserted = 0;
    for port in 2..2000 {
        let k = key6(port);
        if let Insert::Inserted(_) = t.insert(&k, flow_hash(&k), value(7), FlowState::New, 1) {
            inserted += 1;
        }
    }
    assert_eq!(inserted, 1998, "every flood flow took a place of another");
    assert!(t.evictions() >= 1998 - WAYS as u64);
    assert!(t.lookup(&kept, flow_hash(&kept), 1).is_some());
    assert!(t.lookup(&k4, flow_hash(&k4), 1).is_some());
}
