//! Publication: changes from the sources become live snapshots, one atomic swap each.
//!
//! Owns: the one [`Builder`] every source shares, which source owns each Service key (the
//! file and Kubernetes may both be configured; the rule is [`crate::claims`]': a key both
//! want stays with the source that claimed it first, the other's claim is reported as a
//! conflict and waits, and is published in the same snapshot that removes the owner's
//! Service), the steering of the XDP filter in step with each snapshot (new keys before the
//! swap, stale ones after), and the generation count.
//! A published snapshot is never changed afterwards; readers never wait.
//!
//! It is the one writer of the workers' `Tables`: snapshots and next hops (which the netlink
//! module computes) are published here, each with the other's live version.
//!
//! Must not know: where changes come from (files, watches), packets, how next hops are
//! found.

use std::sync::Arc;

use arc_swap::ArcSwap;
use xlb_dataplane::lb::snapshot::{ServiceKey, Snapshot};
use xlb_dataplane::worker::{NextHops, Tables};
use xlb_dataplane::xsk::{SteerKey, XdpFilter};

use crate::claims::Claims;
use crate::config::{Config, ConfigError};
use crate::desired::DesiredService;
use crate::steering::{SteerChange, Steering};
use crate::translate::{key, BuildStats, Builder, Change, OnRefusal};

/// Where the XDP filter's steering keys go (the filter itself, or nowhere in tests and
/// benchmarks that have no kernel).
pub trait SteerMap {
    /// Adds `add`, then removes `remove`.
    ///
    /// # Errors
    /// Why the map refused.
    fn change(&mut self, add: &[SteerKey], remove: &[SteerKey]) -> Result<(), String>;
}

impl SteerMap for XdpFilter {
    fn change(&mut self, add: &[SteerKey], remove: &[SteerKey]) -> Result<(), String> {
        XdpFilter::change(self, add, remove).map_err(|e| e.to_string())
    }
}

/// No filter (tests, benchmarks, `xlb check`).
#[derive(Debug, Default)]
pub struct NoSteering;

impl SteerMap for NoSteering {
    fn change(&mut self, _: &[SteerKey], _: &[SteerKey]) -> Result<(), String> {
        Ok(())
    }
}

/// A source of desired state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The configuration file's `services`.
    File,
    /// Services and EndpointSlices from the Kubernetes API.
    Kubernetes,
}

/// What one publication did.
#[derive(Debug, Default)]
pub struct Published {
    /// The generation now live (unchanged when nothing changed).
    pub generation: u64,
    /// Services built, reused, removed.
    pub stats: BuildStats,
    /// Upserts the dataplane refused (their key keeps its previous Service).
    pub failed: Vec<ConfigError>,
    /// Upserts at a key another source owns (left out).
    pub conflicts: Vec<String>,
    /// Whether the filter refused a steering change (logged by the caller).
    pub steer_error: Option<String>,
    /// Services new in the live snapshot (their backends may need next hops).
    pub added: Vec<Arc<xlb_dataplane::lb::snapshot::Service>>,
}

/// Publishes the sources' changes as snapshots.
#[derive(Debug)]
pub struct Publisher {
    builder: Builder,
    steering: Steering,
    /// Which source owns each key; a claim refused because the other source owns the key
    /// waits with its Service (the latest of each), published as soon as the owner lets go.
    claims: Claims<Source, DesiredService>,
    /// dsr mode: a Service whose backends serve another port than its own cannot be served
    /// (packets are not rewritten).
    dsr: bool,
    tables: Arc<ArcSwap<Tables>>,
    generation: u64,
}

impl Publisher {
    /// A publisher into `tables`, which must hold an empty snapshot, for `config`'s mode.
    #[must_use]
    pub fn new(config: &Config, tables: Arc<ArcSwap<Tables>>) -> Self {
        Self {
            builder: Builder::for_config(config),
            steering: Steering::new(config),
            claims: Claims::default(),
            dsr: config.mode == crate::config::ModeConfig::Dsr,
            generation: tables.load().snapshot.generation(),
            tables,
        }
    }

    /// The live snapshot.
    #[must_use]
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.tables.load().snapshot)
    }

    /// The generation live now.
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Publishes `hops` with the live snapshot, unless they are the next hops already live.
    pub fn publish_hops(&mut self, hops: NextHops) {
        let current = self.tables.load();
        if current.hops != hops {
            self.tables.store(Arc::new(Tables {
                snapshot: Arc::clone(&current.snapshot),
                hops,
            }));
        }
    }

    /// Removes from the filter the retired reply keys whose grace period ended by `now`
    /// (see [`crate::steering`]).
    ///
    /// # Errors
    /// Why the filter refused; the keys stay retired and are removed at the next call.
    pub fn expire_steering(
        &mut self,
        now: std::time::Instant,
        steer: &mut dyn SteerMap,
    ) -> Result<usize, String> {
        let expired = self.steering.expire(now);
        steer.change(&[], &expired)?;
        Ok(expired.len())
    }

    /// Makes the file's Services exactly `desired`, all or nothing.
    ///
    /// # Errors
    /// The first Service the dataplane refused; nothing is published then.
    pub fn publish_file(
        &mut self,
        desired: Vec<DesiredService>,
        steer: &mut dyn SteerMap,
    ) -> Result<Published, ConfigError> {
        let wanted: hashbrown::HashSet<ServiceKey> = desired.iter().map(key).collect();
        let remove = self
            .claims
            .held_by(&Source::File)
            .filter(|k| !wanted.contains(k))
            .collect();
        let change = Change {
            remove,
            upsert: desired,
        };
        self.publish(Source::File, change, OnRefusal::RefuseAll, steer)
    }

    /// Applies a change from Kubernetes: a Service the dataplane refuses keeps its previous
    /// version and does not hold up the others.
    ///
    /// # Errors
    /// An inconsistent change (two upserts at one key); nothing is published then.
    pub fn publish_kubernetes(
        &mut self,
        change: Change,
        steer: &mut dyn SteerMap,
    ) -> Result<Published, ConfigError> {
        self.publish(Source::Kubernetes, change, OnRefusal::KeepPrevious, steer)
    }

    /// Applies a change from `source`: its removals of keys it owns, its upserts at keys no
    /// other source owns; the dataplane's refusals handled as `on_refusal` says.
    ///
    /// # Errors
    /// A refused upsert under [`OnRefusal::RefuseAll`], or an inconsistent change (two
    /// upserts at one key); nothing is published then.
    pub fn publish(
        &mut self,
        source: Source,
        mut change: Change,
        on_refusal: OnRefusal,
        steer: &mut dyn SteerMap,
    ) -> Result<Published, ConfigError> {
        let mut out = Published {
            generation: self.generation,
            ..Published::default()
        };
        // A removal of a key this source does not own withdraws its waiting claim, if any.
        change.remove.retain(|k| {
            if self.claims.holder(k) == Some(&source) {
                return true;
            }
            self.claims.release(k, &source);
            false
        });
        change
            .upsert
            .retain(|d| match self.claims.claim(key(d), &source, d.clone()) {
                Ok(()) => true,
                Err(owner) => {
                    let k = key(d);
                    out.conflicts.push(format!(
                        "{}: {} {} is already served from the {owner:?} source",
                        d.name, k.proto, k.vip
                    ));
                    false
                }
            });
        // dsr sends packets unchanged: a backend must serve the Service's own port (the
        // file's are checked when it is read; Kubernetes' targetPort may differ).
        if self.dsr {
            change.upsert.retain(|d| {
                let moved = d.backends.iter().find(|b| b.port != d.port);
                if let Some(b) = moved {
                    out.failed.push(ConfigError::DsrPortChange {
                        service: d.name.clone(),
                        backend: b.address,
                        backend_port: b.port,
                        port: d.port,
                    });
                }
                moved.is_none()
            });
        }
        // A key let go with another source's claim waiting: that claim, now.
        let mut promoted = hashbrown::HashMap::new();
        for k in &change.remove {
            if let Some((waiter, d)) = self.claims.waiting(k).find(|(w, _)| *w != source) {
                promoted.insert(*k, *waiter);
                change.upsert.push(d.clone());
            }
        }
        if change.is_empty() {
            return Ok(out);
        }
        let current = self.tables.load_full();
        let removed_keys = change.remove.clone();
        let applied =
            self.builder
                .apply(&current.snapshot, change, self.generation + 1, on_refusal)?;
        for k in &removed_keys {
            self.claims.release(k, &source);
        }
        for s in &applied.added {
            let k = s.spec().key;
            self.claims
                .hold(k, promoted.get(&k).copied().unwrap_or(source));
        }
        out.stats = self.builder.last_build();
        out.failed.extend(applied.failed);
        if applied.added.is_empty() && applied.removed.is_empty() {
            return Ok(out);
        }
        let SteerChange { add, remove } =
            self.steering
                .change(&applied.removed, &applied.added, std::time::Instant::now());
        // New keys before the snapshot that needs them, stale ones after it is gone.
        if let Err(e) = steer.change(&add, &[]) {
            out.steer_error = Some(e);
        }
        self.generation += 1;
        self.tables.store(Arc::new(Tables {
            snapshot: Arc::new(applied.snapshot),
            hops: current.hops.clone(),
        }));
        if let Err(e) = steer.change(&[], &remove) {
            out.steer_error = Some(e);
        }
        out.generation = self.generation;
        out.added = applied.added;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "
interfaces: [a]
services:
  - name: web
    vip: 198.18.64.1
    ports: [{ port: 80 }]
    backends: [{ address: 198.18.128.1 }]
";

    #[derive(Default)]
    struct Recorded(Vec<(usize, usize)>);

    impl SteerMap for Recorded {
        fn change(&mut self, add: &[SteerKey], remove: &[SteerKey]) -> Result<(), String> {
            self.0.push((add.len(), remove.len()));
            Ok(())
        }
    }

    fn publisher(config: &Config) -> Publisher {
        let tables = Arc::new(ArcSwap::from_pointee(Tables::empty()));
        Publisher::new(config, tables)
    }

    #[test]
    fn a_key_both_sources_want_stays_with_its_first_claimant_and_passes_to_the_other_when_let_go() {
        let config = Config::parse(FILE).unwrap();
        let mut p = publisher(&config);
        let mut steer = Recorded::default();
        let file = config.desired();
        let published = p.publish_file(file.clone(), &mut steer).unwrap();
        assert_eq!(published.generation, 1);
        assert_eq!(
            steer.0,
            vec![(4, 0), (0, 0)],
            "VIP, VIP address, backend and backend address keys first"
        );
        let mut theirs = file[0].clone();
        theirs.name = "default/web:".into();
        let mut other = theirs.clone();
        other.port = 81;
        let change = Change {
            remove: vec![key(&file[0])],
            upsert: vec![theirs, other],
        };
        let published = p.publish_kubernetes(change, &mut steer).unwrap();
        assert_eq!(published.conflicts.len(), 1);
        assert_eq!(published.generation, 2);
        let snapshot = p.snapshot();
        assert_eq!(snapshot.len(), 2, "the file's Service stays, port 81 joins");
        // The file dropping its Service hands the key to Kubernetes' waiting claim at once
        // (issue 16), in the same snapshot.
        let published = p.publish_file(Vec::new(), &mut steer).unwrap();
        assert_eq!(published.stats.removed, 1);
        assert_eq!(published.generation, 3);
        assert_eq!(p.snapshot().len(), 2);
        let served = p.snapshot();
        let web = served
            .service(&key(&file[0]))
            .expect("Kubernetes' claim is live");
        let origin = web.spec().origin.get::<DesiredService>().unwrap();
        assert_eq!(origin.name, "default/web:");
        // Now Kubernetes owns it: its removal removes it, and the file's claim would wait.
        let published = p.publish_file(file.clone(), &mut steer).unwrap();
        assert_eq!(published.conflicts.len(), 1, "the file waits now");
        let gone = Change {
            remove: vec![key(&file[0])],
            upsert: Vec::new(),
        };
        p.publish_kubernetes(gone, &mut steer).unwrap();
        let origin = p.snapshot();
        let web = origin
            .service(&key(&file[0]))
            .expect("the file's claim is live");
        assert_eq!(
            web.spec().origin.get::<DesiredService>().unwrap().name,
            "services[0] (web)"
        );
    }

    #[test]
    fn an_unchanged_restatement_publishes_nothing() {
        let config = Config::parse(FILE).unwrap();
        let mut p = publisher(&config);
        let mut steer = NoSteering;
        p.publish_file(config.desired(), &mut steer).unwrap();
        let before = p.snapshot();
        let again = p.publish_file(config.desired(), &mut steer).unwrap();
        assert_eq!(again.generation, 1);
        assert!(Arc::ptr_eq(&before, &p.snapshot()));
    }

    /// Issue 14: in dsr mode a Kubernetes Service whose targetPort differs from its port is
    /// refused (reported, the others published): its packets would reach a port nobody serves.
    #[test]
    fn dsr_refuses_a_service_whose_backends_serve_another_port() {
        let config = Config::parse(&format!("mode: dsr\n{FILE}")).unwrap();
        let mut p = publisher(&config);
        let mut steer = NoSteering;
        let good = config.desired()[0].clone();
        let mut moved = good.clone();
        moved.name = "default/moved:".into();
        moved.port = 81;
        let change = Change {
            remove: Vec::new(),
            upsert: vec![good, moved],
        };
        let published = p.publish_kubernetes(change, &mut steer).unwrap();
        assert_eq!(published.failed.len(), 1);
        assert!(published.failed[0]
            .to_string()
            .contains("dsr mode cannot change ports"));
        assert_eq!(p.snapshot().len(), 1, "the other Service is published");
    }
}
