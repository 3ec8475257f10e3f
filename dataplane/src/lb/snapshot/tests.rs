use super::index::SHARDS;
use super::*;
use crate::packet::Family;

fn id(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

fn backend(n: u8, state: BackendState) -> Backend {
    Backend {
        id: BackendId(id(u32::from(n))),
        endpoint: Endpoint::new([198, 19, n, 2].into(), 8080),
        state,
        weight: 1,
    }
}

fn spec(backends: Vec<Backend>) -> ServiceSpec {
    let key = ServiceKey {
        vip: Endpoint::new([198, 18, 64, 1].into(), 80),
        proto: IpProto::TCP,
    };
    ServiceSpec::new(ServiceId(id(1)), key, backends)
}

#[test]
fn only_ready_backends_take_new_flows_while_one_is_ready() {
    let s = Service::new(spec(vec![
        backend(3, BackendState::Terminating),
        backend(1, BackendState::Ready),
        backend(2, BackendState::Draining),
    ]))
    .unwrap();
    let picked: Vec<_> = s
        .pickable()
        .iter()
        .map(|&i| s.spec().backends[usize::from(i)].id)
        .collect();
    assert_eq!(picked, vec![BackendId(id(1))]);
    for hash in [0, u64::MAX, 0x1234_5678_9abc_def0] {
        assert_eq!(s.maglev_pick(hash).unwrap().id, BackendId(id(1)));
    }
}

#[test]
fn terminating_backends_take_new_flows_when_none_is_ready() {
    let s = Service::new(spec(vec![
        backend(1, BackendState::Terminating),
        backend(2, BackendState::Draining),
    ]))
    .unwrap();
    assert_eq!(s.pickable().len(), 1);
    assert_eq!(s.maglev_pick(7).unwrap().id, BackendId(id(1)));
}

#[test]
fn a_service_without_usable_backends_has_no_pick() {
    let s = Service::new(spec(vec![backend(1, BackendState::Draining)])).unwrap();
    assert!(s.pickable().is_empty());
    assert!(s.maglev_pick(7).is_none());
    assert!(
        s.backend(BackendId(id(1))).is_some(),
        "its flows still find it"
    );
    assert!(s.backend(BackendId(id(9))).is_none());
}

fn with(scheduler: Scheduler, n: u8) -> Service {
    let mut s = spec((1..=n).map(|i| backend(i, BackendState::Ready)).collect());
    s.scheduler = scheduler;
    Service::new(s).unwrap()
}

#[test]
fn round_robin_takes_the_backends_in_turn() {
    let s = with(Scheduler::RoundRobin, 3);
    let ids: Vec<u32> = (0..6).map(|_| s.pick(0, 0).unwrap().id.0.get()).collect();
    assert_eq!(ids, vec![1, 2, 3, 1, 2, 3]);
}

#[test]
fn random_spreads_new_flows_evenly() {
    let s = with(Scheduler::Random, 4);
    let mut counts = [0u32; 4];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..40_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        counts[s.pick(0, x).unwrap().id.0.get() as usize - 1] += 1;
    }
    assert!(
        counts.iter().all(|&c| (9_000..11_000).contains(&c)),
        "{counts:?}"
    );
}

#[test]
fn least_connections_picks_the_backend_with_fewest_live_flows() {
    let s = with(Scheduler::LeastConnections, 3);
    let b = |n: u32| BackendId(id(n));
    s.flow_started(b(1));
    s.flow_started(b(1));
    s.flow_started(b(2));
    assert_eq!(s.pick(0, 0).unwrap().id, b(3));
    s.flow_started(b(3));
    s.flow_started(b(3));
    assert_eq!(s.pick(0, 0).unwrap().id, b(2));
    // A recount finds that backend 1's flows have ended.
    s.recounted(|backend| if backend == b(1) { 0 } else { 2 });
    assert_eq!(s.live_flows(b(1)), Some(0));
    assert_eq!(s.pick(0, 0).unwrap().id, b(1));
}

#[test]
fn only_least_connections_counts_flows_as_they_start_and_a_recount_sets_every_count() {
    let b = |n: u32| BackendId(id(n));
    for scheduler in [Scheduler::Maglev, Scheduler::Random, Scheduler::RoundRobin] {
        let s = with(scheduler, 2);
        s.flow_started(b(1));
        assert_eq!(s.live_flows(b(1)), Some(0), "{scheduler:?}");
        s.recounted(|backend| u64::from(backend.0.get()) * 10);
        assert_eq!(
            (s.live_flows(b(1)), s.live_flows(b(2))),
            (Some(10), Some(20))
        );
    }
    let s = with(Scheduler::LeastConnections, 2);
    s.flow_started(b(1));
    assert_eq!(s.live_flows(b(1)), Some(1));
}

#[test]
fn maglev_pick_is_the_default_and_follows_the_flow_hash() {
    let s = with(Scheduler::default(), 5);
    for h in [1, 2, 3, u64::MAX] {
        assert_eq!(s.pick(h, 0).map(|b| b.id), s.maglev_pick(h).map(|b| b.id));
    }
    let none = Service::new(spec(vec![backend(1, BackendState::Draining)])).unwrap();
    assert!(none.pick(1, 1).is_none());
}

#[test]
fn bad_specs_are_errors() {
    let dup = spec(vec![
        backend(1, BackendState::Ready),
        backend(1, BackendState::Ready),
    ]);
    assert!(matches!(
        Service::new(dup),
        Err(SnapshotError::DuplicateBackendId(..))
    ));
    let mut v6 = backend(2, BackendState::Ready);
    v6.endpoint = Endpoint::new("2001:2::1".parse().unwrap(), 80);
    assert!(matches!(
        Service::new(spec(vec![v6])),
        Err(SnapshotError::FamilyMismatch(_))
    ));
    let one = Arc::new(Service::new(spec(vec![backend(1, BackendState::Ready)])).unwrap());
    let err = Snapshot::new(1, vec![one.clone(), one]).unwrap_err();
    assert!(matches!(err, SnapshotError::DuplicateService(_)));
}

#[test]
fn a_packet_finds_its_service_by_destination() {
    let s = Arc::new(Service::new(spec(vec![backend(1, BackendState::Ready)])).unwrap());
    let snap = Snapshot::new(7, vec![s]).unwrap();
    let key = FlowKey::new(
        Family::Ipv4,
        IpProto::TCP,
        (crate::packet::key_addr([198, 18, 0, 1].into()), 40000),
        (crate::packet::key_addr([198, 18, 64, 1].into()), 80),
    );
    let found = snap.service(&ServiceKey::of_destination(&key)).unwrap();
    assert_eq!(found.spec().id, ServiceId(id(1)));
    let other_port = ServiceKey {
        vip: Endpoint::new([198, 18, 64, 1].into(), 81),
        proto: IpProto::TCP,
    };
    assert!(snap.service(&other_port).is_none());
    assert_eq!(snap.generation(), 7);
    assert_eq!(snap.len(), 1);
}

fn service_at(port: u16, service_id: u32, backend_ids: &[u8]) -> Arc<Service> {
    let key = ServiceKey {
        vip: Endpoint::new([198, 18, 64, 1].into(), port),
        proto: IpProto::TCP,
    };
    let backends = backend_ids
        .iter()
        .map(|&n| backend(n, BackendState::Ready))
        .collect();
    Arc::new(Service::new(ServiceSpec::new(ServiceId(id(service_id)), key, backends)).unwrap())
}

#[test]
fn an_update_replaces_and_removes_services_and_leaves_the_old_snapshot_as_it_was() {
    let services: Vec<_> = (1..=1000)
        .map(|n| service_at(n, u32::from(n), &[1]))
        .collect();
    let old = Snapshot::new(1, services).unwrap();
    let replaced = service_at(7, 7, &[1, 2]);
    let gone = old.service_by_id(ServiceId(id(9))).unwrap().spec().key;
    let new = old
        .update(
            2,
            [gone],
            vec![Arc::clone(&replaced), service_at(2000, 2000, &[3])],
        )
        .unwrap();
    assert_eq!((old.len(), new.len()), (1000, 1000));
    assert_eq!(new.generation(), 2);
    assert!(new.service(&gone).is_none() && new.service_by_id(ServiceId(id(9))).is_none());
    assert!(
        old.service(&gone).is_some(),
        "the old snapshot is untouched"
    );
    let seven = replaced.spec().key;
    assert_eq!(new.service(&seven).unwrap().spec().backends.len(), 2);
    assert_eq!(old.service(&seven).unwrap().spec().backends.len(), 1);
    assert!(std::ptr::eq(
        new.service_by_id(ServiceId(id(7))).unwrap(),
        new.service(&seven).unwrap()
    ));
    assert_eq!(new.services().count(), 1000);
    // Shards the update did not touch are shared, not copied.
    let shared = old
        .by_key
        .shards
        .iter()
        .zip(new.by_key.shards.iter())
        .filter(|(a, b)| Arc::ptr_eq(a, b))
        .count();
    assert!(shared >= SHARDS - 3, "{shared} of {SHARDS} shards shared");
}

#[test]
fn an_update_refuses_an_id_another_service_keeps() {
    let old = Snapshot::new(1, vec![service_at(1, 1, &[1])]).unwrap();
    let err = old.update(2, [], vec![service_at(2, 1, &[1])]).unwrap_err();
    assert_eq!(err, SnapshotError::DuplicateServiceId(ServiceId(id(1))));
    let err = old
        .update(2, [], vec![service_at(3, 3, &[1]), service_at(3, 4, &[1])])
        .unwrap_err();
    assert!(matches!(err, SnapshotError::DuplicateService(_)));
}

#[test]
fn a_backend_is_found_with_the_services_that_have_it_through_updates() {
    let with = |snap: &Snapshot, n: u8| {
        let mut ids: Vec<u32> = snap
            .services_with_backend(&backend(n, BackendState::Ready).endpoint, IpProto::TCP)
            .map(|s| s.spec().id.0.get())
            .collect();
        ids.sort_unstable();
        ids
    };
    let old = Snapshot::new(1, vec![service_at(1, 1, &[1, 2]), service_at(2, 2, &[2])]).unwrap();
    assert_eq!((with(&old, 1), with(&old, 2)), (vec![1], vec![1, 2]));
    assert!(old
        .services_with_backend(&backend(1, BackendState::Ready).endpoint, IpProto::UDP)
        .next()
        .is_none());
    // Service 1 loses backend 2; service 2 goes.
    let gone = service_at(2, 2, &[2]).spec().key;
    let new = old
        .update(2, [gone], vec![service_at(1, 1, &[1, 3])])
        .unwrap();
    assert_eq!(
        (with(&new, 1), with(&new, 2), with(&new, 3)),
        (vec![1], vec![], vec![1])
    );
    assert_eq!(with(&old, 2), vec![1, 2], "the old snapshot is untouched");
}

#[test]
fn a_backend_many_services_share_stays_found_whichever_of_them_leaves_first() {
    let shared = backend(7, BackendState::Ready).endpoint;
    let holders = |snap: &Snapshot| {
        let mut ids: Vec<u32> = snap
            .services_with_backend(&shared, IpProto::TCP)
            .map(|s| s.spec().id.0.get())
            .collect();
        ids.sort_unstable();
        ids
    };
    let all: Vec<_> = (1..=300u16)
        .map(|n| service_at(n, u32::from(n), &[7]))
        .collect();
    let mut snap = Snapshot::new(1, all.clone()).unwrap();
    assert_eq!(holders(&snap), (1..=300).collect::<Vec<_>>());
    // The first holder leaves, then every third, then all but the last.
    let key = |n: u16| all[usize::from(n) - 1].spec().key;
    snap = snap.update(2, [key(1)], Vec::new()).unwrap();
    assert_eq!(holders(&snap), (2..=300).collect::<Vec<_>>());
    snap = snap
        .update(3, (3..=300).step_by(3).map(key), Vec::new())
        .unwrap();
    let left: Vec<u32> = (2..=300).filter(|n| n % 3 != 0).collect();
    assert_eq!(holders(&snap), left);
    snap = snap
        .update(4, (2..299).filter(|n| n % 3 != 0).map(key), Vec::new())
        .unwrap();
    assert_eq!(holders(&snap), vec![299]);
    snap = snap.update(5, [key(299)], Vec::new()).unwrap();
    assert!(holders(&snap).is_empty());
    // Back again, once each.
    snap = snap
        .update(6, [], vec![all[0].clone(), all[1].clone()])
        .unwrap();
    assert_eq!(holders(&snap), vec![1, 2]);
}

#[test]
fn the_backend_index_agrees_with_a_plain_model_through_random_adds_and_removes() {
    use std::collections::{BTreeMap, BTreeSet};
    // Services 1..=40 over backends 1..=6 (each Service has two to four of them).
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let mut random = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut index = BackendIndex::default();
    let mut present: BTreeMap<u32, Arc<Service>> = BTreeMap::new();
    for step in 0..4000 {
        let n = u32::try_from(random(40)).unwrap() + 1;
        if let Some(s) = present.remove(&n) {
            index.remove(&s);
        } else {
            let mut backends: Vec<u8> = (0..2 + random(3)).map(|_| 1 + random(6) as u8).collect();
            backends.sort_unstable();
            backends.dedup();
            let s = service_at(u16::try_from(n).unwrap(), n, &backends);
            index.add(&s);
            present.insert(n, s);
        }
        let mut model: BTreeMap<u8, BTreeSet<u32>> = BTreeMap::new();
        for (id, s) in &present {
            for b in &s.spec().backends {
                model
                    .entry(b.endpoint.key_addr()[2])
                    .or_default()
                    .insert(*id);
            }
        }
        for b in 1..=6u8 {
            let key = ServiceKey {
                vip: backend(b, BackendState::Ready).endpoint,
                proto: IpProto::TCP,
            };
            let listed: Vec<u32> = index.services(key).map(|i| i.0.get()).collect();
            let set: BTreeSet<u32> = listed.iter().copied().collect();
            assert_eq!(set.len(), listed.len(), "step {step}: each once");
            assert_eq!(
                set,
                model.get(&b).cloned().unwrap_or_default(),
                "step {step}"
            );
        }
        // Links only for keys several Services share.
        let links: usize = index.links.iter().map(|s| s.len()).sum();
        let shared: usize = model
            .values()
            .filter(|s| s.len() > 1)
            .map(BTreeSet::len)
            .sum();
        assert_eq!(links, shared, "step {step}");
    }
}
