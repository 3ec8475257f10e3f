//! Desired state → `Snapshot`: the pure translation every source ends in.
//!
//! Owns: turning desired Services into the dataplane's `Service`s with ids that stay the same
//! across reloads (flows remember ids, so a reload must not renumber), incrementally: a
//! Service whose desired state did not change keeps its built `Service` (Maglev table and live
//! flow counts included), so an update costs in proportion to what changed. Also the set of
//! keys the XDP filter must steer to xlb for a snapshot.
//!
//! Must not know: where the desired state came from, packets, the kernel.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::Arc;

use xlb_dataplane::lb::snapshot::{
    Backend, BackendId, BackendState, NoBackend, Scheduler, Service, ServiceId, ServiceKey,
    ServiceSpec, Snapshot,
};
use xlb_dataplane::packet::{key_addr, Endpoint, Family, IpProto};
use xlb_dataplane::xsk::SteerKey;

use crate::config::{
    BackendStateConfig, Config, ConfigError, ModeConfig, NoBackendConfig, ProtocolConfig,
    SchedulerConfig,
};
use crate::desired::DesiredService;

/// What one build did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BuildStats {
    /// Services reused from the previous build unchanged.
    pub reused: usize,
    /// Services built anew.
    pub built: usize,
}

/// Builds snapshots from desired states, keeping ids stable and reusing unchanged Services.
#[derive(Debug, Default)]
pub struct Builder {
    services: HashMap<ServiceKey, ServiceId>,
    backends: HashMap<(Endpoint, IpProto), BackendId>,
    next_service: u32,
    next_backend: u32,
    /// Built Services by their desired state (hashbrown with foldhash: std's SipHash was 17%
    /// of a 100 000-Service rebuild).
    built: hashbrown::HashMap<DesiredService, Arc<Service>>,
    last: BuildStats,
}

impl Builder {
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

    fn backend(&mut self, endpoint: Endpoint, proto: IpProto) -> BackendId {
        let next = &mut self.next_backend;
        *self.backends.entry((endpoint, proto)).or_insert_with(|| {
            *next += 1;
            BackendId(NonZeroU32::new(*next).unwrap_or(NonZeroU32::MIN))
        })
    }
}

/// The protocol number of a configured protocol.
#[must_use]
pub fn proto(p: ProtocolConfig) -> IpProto {
    match p {
        ProtocolConfig::Tcp => IpProto::TCP,
        ProtocolConfig::Udp => IpProto::UDP,
    }
}

/// Builds the snapshot numbered `generation` for `config`'s Services.
///
/// # Errors
/// A [`ConfigError`] naming the Service the dataplane refused (a table size that is not a
/// prime, say).
pub fn translate(
    config: &Config,
    builder: &mut Builder,
    generation: u64,
) -> Result<Snapshot, ConfigError> {
    translate_desired(&config.desired(), builder, generation)
}

/// Builds the snapshot numbered `generation` for a desired state, from any source, reusing
/// the Services whose desired state is unchanged since the previous build.
///
/// # Errors
/// A [`ConfigError`] naming the Service the dataplane refused.
pub fn translate_desired(
    desired: &[DesiredService],
    builder: &mut Builder,
    generation: u64,
) -> Result<Snapshot, ConfigError> {
    let mut services = Vec::with_capacity(desired.len());
    let mut kept = hashbrown::HashMap::with_capacity(desired.len());
    let mut old = std::mem::take(&mut builder.built);
    let mut stats = BuildStats::default();
    let mut failed = None;
    for d in desired {
        // An unchanged Service moves from the old cache to the new one, key and all: no
        // clone, no allocation.
        let (key, service) = match old.remove_entry(d) {
            Some(entry) => {
                stats.reused += 1;
                entry
            }
            None => match build(d, builder) {
                Ok(service) => {
                    stats.built += 1;
                    (d.clone(), Arc::new(service))
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            },
        };
        services.push(Arc::clone(&service));
        kept.insert(key, service);
    }
    if let Some(e) = failed {
        // Keep everything built so far for the next attempt.
        kept.extend(old);
        builder.built = kept;
        return Err(e);
    }
    let snapshot = Snapshot::new(generation, services).map_err(|e| ConfigError(e.to_string()))?;
    builder.built = kept;
    builder.last = stats;
    Ok(snapshot)
}

fn build(d: &DesiredService, ids: &mut Builder) -> Result<Service, ConfigError> {
    let proto = proto(d.protocol);
    let key = ServiceKey {
        vip: Endpoint::new(d.vip, d.port),
        proto,
    };
    let backends = d
        .backends
        .iter()
        .map(|b| {
            let endpoint = Endpoint::new(b.address, b.port);
            Backend {
                id: ids.backend(endpoint, proto),
                endpoint,
                state: match b.state {
                    BackendStateConfig::Ready => BackendState::Ready,
                    BackendStateConfig::Terminating => BackendState::Terminating,
                    BackendStateConfig::Draining => BackendState::Draining,
                },
                weight: b.weight,
            }
        })
        .collect();
    let mut spec = ServiceSpec::new(ids.service(key), key, backends);
    spec.scheduler = match d.scheduler {
        SchedulerConfig::Maglev => Scheduler::Maglev,
        SchedulerConfig::Random => Scheduler::Random,
        SchedulerConfig::RoundRobin => Scheduler::RoundRobin,
        SchedulerConfig::LeastConnections => Scheduler::LeastConnections,
    };
    spec.affinity_timeout = d.affinity_timeout;
    spec.no_backend = match d.no_backend {
        NoBackendConfig::Reject => NoBackend::Reject,
        NoBackendConfig::Drop => NoBackend::Drop,
    };
    spec.table_size = d.table_size;
    Service::new(spec).map_err(|e| ConfigError(format!("{}: {e}", d.name)))
}

/// What the XDP filter must steer to xlb for `snapshot` in `config`'s mode: traffic to each
/// Service, and the replies of its flows (from backends in dnat mode, to the SNAT addresses in
/// snat mode).
#[must_use]
pub fn steer_keys(snapshot: &Snapshot, config: &Config) -> HashSet<SteerKey> {
    let mut keys = HashSet::new();
    let mut protos = HashSet::new();
    for service in snapshot.services() {
        let spec = service.spec();
        keys.insert(SteerKey::destination(&spec.key.vip, spec.key.proto));
        protos.insert(spec.key.proto);
        if config.mode == ModeConfig::Dnat {
            for backend in &spec.backends {
                keys.insert(SteerKey::source(&backend.endpoint, spec.key.proto));
            }
        }
    }
    if let (ModeConfig::Snat, Some(snat)) = (config.mode, &config.snat) {
        for proto in protos {
            if let Some(v4) = snat.ipv4 {
                keys.insert(SteerKey::any_port(Family::Ipv4, key_addr(v4.into()), proto));
            }
            if let Some(v6) = snat.ipv6 {
                keys.insert(SteerKey::any_port(Family::Ipv6, key_addr(v6.into()), proto));
            }
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = "
interfaces: [a]
services:
  - name: web
    vip: 198.18.64.1
    ports: [{ port: 80, target_port: 8080 }, { port: 53, protocol: udp }]
    backends: [{ address: 198.18.128.1 }, { address: 198.18.128.2 }]
";

    #[test]
    fn each_port_of_a_service_becomes_a_dataplane_service_with_its_target_port() {
        let config = Config::parse(TWO).unwrap();
        let snap = translate(&config, &mut Builder::default(), 1).unwrap();
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
        let first = translate(&Config::parse(TWO).unwrap(), &mut ids, 1).unwrap();
        let reordered = TWO.replace(
            "[{ address: 198.18.128.1 }, { address: 198.18.128.2 }]",
            "[{ address: 198.18.128.3 }, { address: 198.18.128.2 }, { address: 198.18.128.1 }]",
        );
        let second = translate(&Config::parse(&reordered).unwrap(), &mut ids, 2).unwrap();
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

    #[test]
    fn an_unchanged_service_is_reused_and_only_the_changed_one_is_built() {
        let mut builder = Builder::default();
        let config = Config::parse(TWO).unwrap();
        let first = translate(&config, &mut builder, 1).unwrap();
        assert_eq!(
            builder.last_build(),
            BuildStats {
                reused: 0,
                built: 2
            }
        );
        // The UDP port gets a new target port; the TCP port is untouched.
        let edited = TWO.replace(
            "{ port: 53, protocol: udp }",
            "{ port: 53, protocol: udp, target_port: 5353 }",
        );
        let second = translate(&Config::parse(&edited).unwrap(), &mut builder, 2).unwrap();
        assert_eq!(
            builder.last_build(),
            BuildStats {
                reused: 1,
                built: 1
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
    fn dnat_steers_vips_and_backend_replies_and_snat_steers_its_address() {
        let config = Config::parse(TWO).unwrap();
        let snap = translate(&config, &mut Builder::default(), 1).unwrap();
        let keys = steer_keys(&snap, &config);
        assert_eq!(
            keys.len(),
            2 + 4,
            "two Service keys, two backends on two protocols"
        );
        let snat = format!("mode: snat\nsnat: {{ ipv4: 198.18.64.100 }}\n{TWO}");
        let config = Config::parse(&snat).unwrap();
        let keys = steer_keys(&snap, &config);
        assert!(keys.contains(&SteerKey::any_port(
            Family::Ipv4,
            key_addr([198, 18, 64, 100].into()),
            IpProto::UDP
        )));
        assert_eq!(keys.len(), 2 + 2, "no backend keys in snat mode");
    }
}
