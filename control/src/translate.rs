//! Desired state → `Snapshot`: the pure translation every source ends in.
//!
//! Owns: turning desired Services into the dataplane's `Service`s with ids that stay the same
//! across reloads (flows remember ids, so a reload must not renumber), incrementally: a
//! Service whose desired state did not change keeps its built `Service` (Maglev table and live
//! flow counts included), so an update costs in proportion to what changed.
//!
//! Must not know: where the desired state came from, packets, the kernel.

use hashbrown::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use xlb_dataplane::lb::maglev::TableCache;
use xlb_dataplane::lb::prefix::PrefixMap;
use xlb_dataplane::lb::snapshot::{
    Backend, BackendId, Origin, Service, ServiceId, ServiceKey, ServiceSpec, Snapshot,
    SnapshotError,
};
use xlb_dataplane::packet::{Endpoint, IpProto};

use crate::config::{Config, ConfigError};
use crate::desired::{self, DesiredService};

/// What one build did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BuildStats {
    /// Services whose desired state was unchanged (the built Service stays).
    pub reused: usize,
    /// Services built anew.
    pub built: usize,
    /// Services removed.
    pub removed: usize,
}

/// A change to the desired state: Services to remove (by key) and Services to add or
/// replace. A source says what changed; it does not restate everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// Keys whose Service goes.
    pub remove: Vec<ServiceKey>,
    /// Services to add, or to replace the Service at their key.
    pub upsert: Vec<DesiredService>,
}

impl Change {
    /// Whether it changes nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.upsert.is_empty()
    }
}

/// The outcome of [`Builder::apply`]: the next snapshot, what it removed and added (for the
/// XDP filter), and the Services that could not be built (they keep their previous version).
#[derive(Debug)]
pub struct Applied {
    /// The next snapshot.
    pub snapshot: Snapshot,
    /// Services no longer in it (replaced ones included).
    pub removed: Vec<Arc<Service>>,
    /// Services new in it (replacements included).
    pub added: Vec<Arc<Service>>,
    /// Upserts the dataplane refused, with why.
    pub failed: Vec<ConfigError>,
}

/// What [`Builder::apply`] does with an upsert the dataplane refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnRefusal {
    /// Refuse the whole change (the file: an edit is taken whole or not at all).
    RefuseAll,
    /// Keep that key's previous Service and apply the rest (Kubernetes: one bad object must
    /// not hold up the others).
    KeepPrevious,
}

/// Builds snapshots from changes to the desired state, keeping ids stable and leaving every
/// unchanged Service as it is (its Maglev table, its live flow counts).
///
/// Ids are never handed out twice (a flow remembers its Service's and backend's ids across
/// snapshots), but an id nothing built uses any more is forgotten, so that the maps stay the
/// size of the desired state however many pods come and go: a backend address that returns
/// gets a new id (its old flows ended when it left).
#[derive(Debug, Default)]
pub struct Builder {
    services: HashMap<ServiceKey, ServiceId>,
    /// Backend ids, with how many Services of `built` have the backend.
    backends: HashMap<(Endpoint, IpProto), (BackendId, u32)>,
    next_service: u32,
    next_backend: u32,
    /// The desired state each Service of the last snapshot was built from (hashbrown with
    /// foldhash: std's SipHash was 17% of a 100 000-Service rebuild).
    built: hashbrown::HashMap<ServiceKey, Arc<DesiredService>>,
    last: BuildStats,
    /// The Maglev table size of Services that name none (`maglev_table_size`); none: the
    /// automatic size.
    table_size: Option<u32>,
}

impl Builder {
    /// A builder giving Services that name no Maglev table size `config`'s
    /// `maglev_table_size`.
    #[must_use]
    pub fn for_config(config: &Config) -> Self {
        Self {
            table_size: config.maglev_table_size,
            ..Self::default()
        }
    }

    /// What the last build did.
    #[must_use]
    pub fn last_build(&self) -> BuildStats {
        self.last
    }

    fn service(&mut self, key: ServiceKey) -> ServiceId {
        let next = &mut self.next_service;
        *self.services.entry(key).or_insert_with(|| {
            *next += 1;
            ServiceId(NonZeroU32::new(*next).unwrap_or(NonZeroU32::MIN))
        })
    }

    /// The id of a backend, counted as used by the Service being built (see [`Self::release`]).
    fn backend(&mut self, endpoint: Endpoint, proto: IpProto) -> BackendId {
        let next = &mut self.next_backend;
        let (id, uses) = self.backends.entry((endpoint, proto)).or_insert_with(|| {
            *next += 1;
            (
                BackendId(NonZeroU32::new(*next).unwrap_or(NonZeroU32::MIN)),
                0,
            )
        });
        *uses += 1;
        *id
    }

    /// Takes back the uses of `d`'s backends (a Service removed, replaced or never built),
    /// forgetting the ids no Service uses any more.
    fn release(&mut self, d: &DesiredService) {
        let proto = key(d).proto;
        for b in &d.backends {
            let at = (Endpoint::new(b.address, b.port), proto);
            if let Some((_, uses)) = self.backends.get_mut(&at) {
                *uses = uses.saturating_sub(1);
                if *uses == 0 {
                    self.backends.remove(&at);
                }
            }
        }
    }

    /// [`Self::release`] for Services that were not built, forgetting also the id of a key
    /// that has no built Service.
    fn unbuilt<'d>(&mut self, ds: impl IntoIterator<Item = &'d Arc<DesiredService>>) {
        for d in ds {
            self.release(d);
            let k = key(d);
            if !self.built.contains_key(&k) {
                self.services.remove(&k);
            }
        }
    }

    /// The change that turns the last build into exactly `desired` (for a source that
    /// restates everything, like the file).
    #[must_use]
    pub fn change_to(&self, desired: &[DesiredService]) -> Change {
        let wanted: hashbrown::HashSet<ServiceKey> = desired.iter().map(key).collect();
        Change {
            remove: self
                .built
                .keys()
                .filter(|k| !wanted.contains(*k))
                .copied()
                .collect(),
            upsert: desired
                .iter()
                .filter(|d| self.built.get(&key(d)).map(|b| &**b) != Some(*d))
                .cloned()
                .collect(),
        }
    }

    /// Applies `change` to `base` (the snapshot this builder built last) as the snapshot
    /// numbered `generation`. Only upserts whose desired state differs from what their
    /// Service was built from are built; an upsert the dataplane refuses is reported in
    /// [`Applied::failed`] and its key keeps its previous Service (or, with
    /// [`OnRefusal::RefuseAll`], the whole change is refused).
    ///
    /// # Errors
    /// A [`ConfigError`] when the change is inconsistent (two upserts at one key), or the
    /// first refused upsert under [`OnRefusal::RefuseAll`]. Nothing is applied then.
    pub fn apply(
        &mut self,
        base: &Snapshot,
        change: Change,
        generation: u64,
        on_refusal: OnRefusal,
    ) -> Result<Applied, ConfigError> {
        let mut stats = BuildStats::default();
        let mut failed = Vec::new();
        let mut added = Vec::with_capacity(change.upsert.len());
        let mut kept = Vec::with_capacity(change.upsert.len());
        // Ids are handed out in order, here; building (Maglev tables) needs nothing shared.
        let mut specs = Vec::with_capacity(change.upsert.len());
        // Room for new ids, so that a first build does not grow the maps as it goes.
        self.services.reserve(change.upsert.len());
        self.backends
            .reserve(change.upsert.iter().map(|d| d.backends.len()).sum());
        for d in change.upsert {
            let k = key(&d);
            if self.built.get(&k).map(|b| &**b) == Some(&d) && base.service_arc(&k).is_some() {
                stats.reused += 1;
                continue;
            }
            let d = Arc::new(d);
            specs.push((spec(&d, self), d));
        }
        let mut refused = Vec::new();
        for (result, d) in build_all(specs) {
            match result {
                Ok(service) => {
                    stats.built += 1;
                    added.push(Arc::new(service));
                    kept.push((key(&d), d));
                }
                Err(error) => {
                    failed.push(ConfigError::Refused {
                        service: d.name.clone(),
                        error,
                    });
                    refused.push(d);
                }
            }
        }
        // What was not built gives back the ids it was handed.
        self.unbuilt(&refused);
        if on_refusal == OnRefusal::RefuseAll && !failed.is_empty() {
            self.unbuilt(kept.iter().map(|(_, d)| d));
            return Err(failed.swap_remove(0));
        }
        let mut removed: Vec<Arc<Service>> = change
            .remove
            .iter()
            .filter_map(|k| base.service_arc(k).cloned())
            .collect();
        stats.removed = removed.len();
        removed.extend(
            added
                .iter()
                .filter_map(|s| base.service_arc(&s.spec().key).cloned()),
        );
        let snapshot = match base.update(generation, change.remove.iter().copied(), added.clone()) {
            Ok(snapshot) => snapshot,
            Err(e) => {
                self.unbuilt(kept.iter().map(|(_, d)| d));
                return Err(ConfigError::Snapshot(e));
            }
        };
        // The new Services' backends were counted as their specs were made, before the old
        // ones' are taken back: a backend a replaced Service keeps never reaches zero uses.
        for k in &change.remove {
            if let Some(old) = self.built.remove(k) {
                self.release(&old);
            }
        }
        for (k, d) in kept {
            if let Some(old) = self.built.insert(k, d) {
                self.release(&old);
            }
        }
        for k in &change.remove {
            if !self.built.contains_key(k) {
                self.services.remove(k);
            }
        }
        self.last = stats;
        Ok(Applied {
            snapshot,
            removed,
            added,
            failed,
        })
    }
}

/// The key a desired Service is served at.
#[must_use]
pub fn key(d: &DesiredService) -> ServiceKey {
    ServiceKey {
        vip: Endpoint::new(d.vip, d.port),
        proto: proto(d.protocol),
    }
}

/// The protocol number of a Service's protocol.
#[must_use]
pub fn proto(p: desired::Protocol) -> IpProto {
    match p {
        desired::Protocol::Tcp => IpProto::TCP,
        desired::Protocol::Udp => IpProto::UDP,
        desired::Protocol::Sctp => IpProto::SCTP,
    }
}

/// Builds the snapshot numbered `generation` for `config`'s Services, from `base` (the
/// snapshot `builder` built last; an empty one at first).
///
/// # Errors
/// A [`ConfigError`] naming the Service the dataplane refused (a table size that is not a
/// prime, say); nothing is applied then.
pub fn translate(
    config: &Config,
    builder: &mut Builder,
    base: &Snapshot,
    generation: u64,
) -> Result<Applied, ConfigError> {
    translate_desired(&config.desired(), builder, base, generation)
}

/// The snapshot of `config`'s Services on their own (generation 1), for the offline tools.
///
/// # Errors
/// A [`ConfigError`] naming a Service the dataplane refused.
pub fn snapshot_of(config: &Config) -> Result<Snapshot, ConfigError> {
    translate(
        config,
        &mut Builder::for_config(config),
        &Snapshot::default(),
        1,
    )
    .map(|a| a.snapshot)
}

/// Builds the snapshot numbered `generation` holding exactly `desired`, from `base` (the
/// snapshot `builder` built last), reusing the Services whose desired state is unchanged.
///
/// # Errors
/// A [`ConfigError`] naming a Service the dataplane refused; nothing is applied then.
pub fn translate_desired(
    desired: &[DesiredService],
    builder: &mut Builder,
    base: &Snapshot,
    generation: u64,
) -> Result<Applied, ConfigError> {
    let change = builder.change_to(desired);
    builder.apply(base, change, generation, OnRefusal::RefuseAll)
}

/// Services built at once from which the work is split over the machine's cores: below it,
/// starting threads costs more than it saves.
const PARALLEL_FROM: usize = 512;

/// Builds Services (their Maglev tables, mostly: ~10 us each at 10 backends; Services with
/// the same backends share one), on every core for a large batch (a first snapshot, a
/// relist), in order.
fn build_all(
    specs: Vec<(ServiceSpec, Arc<DesiredService>)>,
) -> Vec<(Result<Service, SnapshotError>, Arc<DesiredService>)> {
    // available_parallelism reads cgroup files (~80 us): only for a large batch.
    let threads = if specs.len() < PARALLEL_FROM {
        1
    } else {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    };
    if threads < 2 {
        let mut tables = TableCache::default();
        return specs
            .into_iter()
            .map(|(spec, d)| (Service::sharing(spec, &mut tables), d))
            .collect();
    }
    let per = specs.len().div_ceil(threads);
    let mut chunks = Vec::with_capacity(threads);
    let mut rest = specs;
    while rest.len() > per {
        let tail = rest.split_off(per);
        chunks.push(rest);
        rest = tail;
    }
    chunks.push(rest);
    std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                scope.spawn(move || {
                    // Services with the same backends share a table (within a chunk: a
                    // source lists a Service's ports and addresses together).
                    let mut tables = TableCache::default();
                    chunk
                        .into_iter()
                        .map(|(spec, d)| (Service::sharing(spec, &mut tables), d))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                // A panic in Service::new would be a bug; pass it on rather than lose Services.
                h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
            })
            .collect()
    })
}

/// The dataplane's spec of a desired Service, with its stable ids (and the desired Service
/// itself as its origin, for `/services`).
fn spec(d: &Arc<DesiredService>, ids: &mut Builder) -> ServiceSpec {
    let key = key(d);
    let proto = key.proto;
    let backends = d
        .backends
        .iter()
        .map(|b| {
            let endpoint = Endpoint::new(b.address, b.port);
            Backend {
                id: ids.backend(endpoint, proto),
                endpoint,
                state: b.state,
                weight: b.weight,
            }
        })
        .collect();
    let mut spec = ServiceSpec::new(ids.service(key), key, backends);
    spec.scheduler = d.scheduler;
    spec.affinity_timeout = d.affinity_timeout;
    spec.no_backend = d.no_backend;
    spec.table_size = d.table_size.or(ids.table_size);
    spec.origin = Origin::new(Arc::clone(d));
    if !d.source_ranges.is_empty() {
        spec.source_ranges = Some(Arc::new(PrefixMap::new(
            d.source_ranges.iter().map(|c| (c.prefix(), ())),
        )));
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build_all(config: &Config, builder: &mut Builder) -> Snapshot {
        build_next(config, builder, &Snapshot::default())
    }

    fn build_next(config: &Config, builder: &mut Builder, base: &Snapshot) -> Snapshot {
        translate(config, builder, base, base.generation() + 1)
            .unwrap()
            .snapshot
    }

    const TWO: &str = "
interfaces: [a]
services:
  - name: web
    vip: 198.18.64.1
    ports: [{ port: 80, target_port: 8080 }, { port: 53, protocol: udp }]
    backends: [{ address: 198.18.128.1 }, { address: 198.18.128.2 }]
";

    #[test]
    fn an_sctp_port_becomes_an_sctp_service() {
        let config = Config::parse(&TWO.replace("protocol: udp", "protocol: sctp")).unwrap();
        let snap = build_all(&config, &mut Builder::default());
        let key = ServiceKey {
            vip: Endpoint::new([198, 18, 64, 1].into(), 53),
            proto: IpProto::SCTP,
        };
        assert_eq!(snap.service(&key).unwrap().spec().backends.len(), 2);
    }

    #[test]
    fn a_change_refused_whole_names_its_first_refused_service() {
        let config = Config::parse(TWO).unwrap();
        let mut desired = config.desired();
        for d in &mut desired {
            d.table_size = Some(1000); // not a prime: both refused
        }
        let e = translate_desired(&desired, &mut Builder::default(), &Snapshot::default(), 1)
            .unwrap_err();
        assert!(e.to_string().starts_with(&desired[0].name), "{e:?}");
    }

    #[test]
    fn each_port_of_a_service_becomes_a_dataplane_service_with_its_target_port() {
        let config = Config::parse(TWO).unwrap();
        let snap = build_all(&config, &mut Builder::default());
        assert_eq!(snap.len(), 2);
        let web = snap
            .service(&ServiceKey {
                vip: Endpoint::new([198, 18, 64, 1].into(), 80),
                proto: IpProto::TCP,
            })
            .unwrap();
        assert!(web
            .spec()
            .backends
            .iter()
            .all(|b| b.endpoint.port() == 8080));
    }

    #[test]
    fn ids_survive_a_reload_that_reorders_and_adds() {
        let mut ids = Builder::default();
        let first = build_all(&Config::parse(TWO).unwrap(), &mut ids);
        let reordered = TWO.replace(
            "[{ address: 198.18.128.1 }, { address: 198.18.128.2 }]",
            "[{ address: 198.18.128.3 }, { address: 198.18.128.2 }, { address: 198.18.128.1 }]",
        );
        let second = build_next(&Config::parse(&reordered).unwrap(), &mut ids, &first);
        for s in first.services() {
            let again = second.service(&s.spec().key).unwrap();
            assert_eq!(again.spec().id, s.spec().id);
            for b in &s.spec().backends {
                let same = again
                    .spec()
                    .backends
                    .iter()
                    .find(|x| x.endpoint == b.endpoint)
                    .unwrap();
                assert_eq!(same.id, b.id);
            }
        }
    }

    /// Pods come and go for as long as xlb runs: the ids of backends and Services that
    /// nothing uses any more are forgotten, and never handed out again.
    #[test]
    fn ids_nothing_uses_are_forgotten_and_never_handed_out_again() {
        let mut ids = Builder::default();
        let with = |backends: &str| {
            Config::parse(&TWO.replace(
                "[{ address: 198.18.128.1 }, { address: 198.18.128.2 }]",
                backends,
            ))
            .unwrap()
        };
        let id_of = |snap: &Snapshot, address: [u8; 4]| {
            let web = snap
                .services()
                .find(|s| s.spec().key.vip.port() == 80)
                .unwrap();
            web.spec()
                .backends
                .iter()
                .find(|b| b.endpoint.key_addr()[..4] == address)
                .map(|b| b.id)
        };
        let first = build_all(&with("[{ address: 198.18.128.1 }]"), &mut ids);
        let one = id_of(&first, [198, 18, 128, 1]).unwrap();
        // Backend 1 leaves both ports for backend 2: its ids (TCP and UDP) are forgotten.
        let second = build_next(&with("[{ address: 198.18.128.2 }]"), &mut ids, &first);
        let two = id_of(&second, [198, 18, 128, 2]).unwrap();
        assert_eq!(ids.backends.len(), 2, "backend 2's two ports only");
        // A replaced Service keeps the id of a backend it still has.
        let both = with("[{ address: 198.18.128.2 }, { address: 198.18.128.1 }]");
        let third = build_next(&both, &mut ids, &second);
        assert_eq!(id_of(&third, [198, 18, 128, 2]), Some(two));
        let again = id_of(&third, [198, 18, 128, 1]).unwrap();
        assert!(
            again != one && again != two,
            "an id is never handed out twice"
        );
        assert_eq!(ids.backends.len(), 4);
        // A Service removed gives up its id and its backends'.
        let none = Config::parse("interfaces: [a]\nservices: []\n").unwrap();
        let _ = build_next(&none, &mut ids, &third);
        assert_eq!((ids.services.len(), ids.backends.len()), (0, 0));
    }

    #[test]
    fn a_refused_change_leaves_no_ids_behind() {
        let mut ids = Builder::default();
        let first = build_all(&Config::parse(TWO).unwrap(), &mut ids);
        let known = (ids.services.clone(), ids.backends.clone());
        // Both ports moved to a new backend, with a table size that is not a prime: refused.
        let moved = TWO.replace("198.18.128.1 }, { address: 198.18.128.2", "198.18.128.7");
        let mut desired = Config::parse(&moved).unwrap().desired();
        for d in &mut desired {
            d.table_size = Some(1000);
        }
        assert!(translate_desired(&desired, &mut ids, &first, 2).is_err());
        assert_eq!((ids.services.clone(), ids.backends.clone()), known);
    }

    #[test]
    fn an_unchanged_service_is_reused_and_only_the_changed_one_is_built() {
        let mut builder = Builder::default();
        let config = Config::parse(TWO).unwrap();
        let first = build_all(&config, &mut builder);
        assert_eq!(
            builder.last_build(),
            BuildStats {
                reused: 0,
                built: 2,
                removed: 0
            }
        );
        // The UDP port gets a new target port; the TCP port is untouched.
        let edited = TWO.replace(
            "{ port: 53, protocol: udp }",
            "{ port: 53, protocol: udp, target_port: 5353 }",
        );
        let second = build_next(&Config::parse(&edited).unwrap(), &mut builder, &first);
        assert_eq!(
            builder.last_build(),
            BuildStats {
                reused: 0,
                built: 1,
                removed: 0
            }
        );
        let tcp = ServiceKey {
            vip: Endpoint::new([198, 18, 64, 1].into(), 80),
            proto: IpProto::TCP,
        };
        assert!(
            std::ptr::eq(first.service(&tcp).unwrap(), second.service(&tcp).unwrap()),
            "the same built Service"
        );
    }

    #[test]
    fn a_change_the_dataplane_refuses_in_part_keeps_the_refused_services_previous_version() {
        let config = Config::parse(TWO).unwrap();
        let mut builder = Builder::default();
        let first = build_all(&config, &mut builder);
        let mut desired = config.desired();
        for d in &mut desired {
            d.table_size = Some(if d.port == 80 { 1000 } else { 251 });
        }
        let applied = builder
            .apply(
                &first,
                Change {
                    remove: Vec::new(),
                    upsert: desired,
                },
                2,
                OnRefusal::KeepPrevious,
            )
            .unwrap();
        assert_eq!(applied.failed.len(), 1, "1000 is not a prime");
        assert_eq!((applied.added.len(), applied.removed.len()), (1, 1));
        let tcp = ServiceKey {
            vip: Endpoint::new([198, 18, 64, 1].into(), 80),
            proto: IpProto::TCP,
        };
        assert!(std::ptr::eq(
            first.service(&tcp).unwrap(),
            applied.snapshot.service(&tcp).unwrap()
        ));
        // The file source refuses such an edit whole.
        let mut bad = config.desired();
        bad[0].table_size = Some(1000);
        bad[1].port = 54;
        assert!(translate_desired(&bad, &mut builder, &applied.snapshot, 3).is_err());
        assert_eq!(
            builder.change_to(&config.desired()).upsert.len(),
            1,
            "only the UDP Service was taken (table size 251), nothing of the refused edit"
        );
    }

    /// Issue 14's finding: the automatic table size grows with the backend count (and a new
    /// size moves most flows); `maglev_table_size` fixes it for every Service that names
    /// none, and a Service's own size still wins.
    #[test]
    fn maglev_table_size_is_the_size_of_every_service_that_names_none() {
        let text = "
interfaces: [a]
maglev_table_size: 4093
services:
  - { name: a, vip: 198.18.64.1, ports: [{ port: 80 }], backends: [{ address: 198.18.128.1 }] }
  - { name: b, vip: 198.18.64.2, ports: [{ port: 80 }], backends: [{ address: 198.18.128.1 }], table_size: 251 }
";
        let config = Config::parse(text).unwrap();
        let snapshot = snapshot_of(&config).unwrap();
        let size = |vip: [u8; 4]| {
            let key = ServiceKey {
                vip: Endpoint::new(vip.into(), 80),
                proto: IpProto::TCP,
            };
            snapshot.service(&key).unwrap().spec().table_size
        };
        assert_eq!(size([198, 18, 64, 1]), Some(4093));
        assert_eq!(size([198, 18, 64, 2]), Some(251));
        let bad = text.replace("4093", "4096");
        assert!(Config::parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("maglev_table_size: 4096 is not a prime"));
    }
}
