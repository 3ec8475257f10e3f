//! The store: what translation reads of each watched object (compact digests, not the
//! objects), indexed by Service; which Services are stale and since when; what each object
//! is currently refused for.
//!
//! Owns: applying watch events (per kind, in the `kind` submodule: a relist replaces a kind's
//! objects at once, so a relist never shows a moment without the objects it lists again; a
//! malformed object keeps its last good version), translating stale Services into a [`Change`] that holds only the Services whose
//! translation differs from what was last produced, and the complaints about objects (each
//! counted once when it appears, not again on every relist).
//!
//! Must not know: the API server, watches and their failures (that is `watch`); snapshots.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::BuildHasher;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use hashbrown::{DefaultHashBuilder, HashMap};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use xlb_dataplane::lb::snapshot::ServiceKey;

mod kind;

use kind::{Kind, Owned};

use super::KubeMetrics;
use crate::claims::Claims;
use crate::desired::DesiredService;
use crate::health::ServiceHealth;
use crate::kubernetes::{self, NodeContext, SliceView, Warning, Zones};
use crate::translate::{key, Change};

/// The zone label of Nodes.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// An object as watched: its metadata always, the object itself when it decoded. A malformed
/// object (a port that is not a number, say) fails alone instead of failing the whole list
/// it came in.
#[derive(Clone, Debug)]
pub struct Lenient<K> {
    meta: ObjectMeta,
    object: Result<K, String>,
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Lenient<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct MetaOnly {
            #[serde(default)]
            metadata: ObjectMeta,
        }
        let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
        match serde_json::from_str::<K>(raw.get()) {
            Ok(object) => Ok(Self {
                meta: ObjectMeta::default(),
                object: Ok(object),
            }),
            Err(e) => {
                // Without readable metadata there is nothing to skip by name: a list error.
                let meta = serde_json::from_str::<MetaOnly>(raw.get())
                    .map_err(serde::de::Error::custom)?
                    .metadata;
                Ok(Self {
                    meta,
                    object: Err(e.to_string()),
                })
            }
        }
    }
}

impl<K: Resource<DynamicType = ()>> Resource for Lenient<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> std::borrow::Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &()) -> std::borrow::Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &()) -> std::borrow::Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &()) -> std::borrow::Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        match &self.object {
            Ok(o) => o.meta(),
            Err(_) => &self.meta,
        }
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match &mut self.object {
            Ok(o) => o.meta_mut(),
            Err(_) => &mut self.meta,
        }
    }
}

/// A watch event, as the store applies it.
#[derive(Debug)]
pub enum Event<K> {
    /// An object was added or changed.
    Apply(K),
    /// An object was deleted.
    Delete(K),
    /// A relist starts: the objects that follow replace the kind's objects.
    Init,
    /// An object of the relist.
    InitApply(K),
    /// The relist is whole.
    InitDone,
}

/// What a watch delivered to the store.
#[derive(Debug)]
pub enum Watched {
    /// A Service event.
    Service(Box<Event<Lenient<Service>>>),
    /// An EndpointSlice event.
    Slice(Box<Event<Lenient<EndpointSlice>>>),
    /// An event about this node.
    Node(Box<Event<Lenient<Node>>>),
}

/// A namespaced object's name, `namespace/name` (shared, not copied, between the maps that
/// refer to it).
type ObjKey = Arc<str>;

fn obj_key(meta: &ObjectMeta) -> ObjKey {
    Arc::from(kubernetes::object_name(meta))
}

/// Where a complaint about an object comes from: its kind, or the claims on Service keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Source {
    Service,
    Slice,
    Node,
    Claim,
}

/// What is currently wrong with each object. A complaint is counted (and handed out to be
/// logged) when it appears, not again while it stays; the gauge of objects refused by kind
/// follows the current set.
#[derive(Debug, Default)]
struct Complaints {
    current: HashMap<(Source, ObjKey), Vec<Warning>>,
    fresh: Vec<Warning>,
}

impl Complaints {
    /// Sets what is wrong with `key` (nothing: `warnings` empty).
    fn set(&mut self, source: Source, key: &ObjKey, warnings: Vec<Warning>, m: &KubeMetrics) {
        let slot = (source, Arc::clone(key));
        let old = if warnings.is_empty() {
            self.current.remove(&slot).unwrap_or_default()
        } else {
            self.current
                .insert(slot, warnings.clone())
                .unwrap_or_default()
        };
        if old == warnings {
            return;
        }
        for w in &warnings {
            if !old.contains(w) {
                m.error(w.kind);
                self.fresh.push(w.clone());
            }
        }
        m.refusing(kinds(&old), -1);
        m.refusing(kinds(&warnings), 1);
    }

    /// Forgets the complaints from `source` about objects `keep` does not hold.
    fn retain(&mut self, source: Source, keep: impl Fn(&ObjKey) -> bool, m: &KubeMetrics) {
        self.current.retain(|(s, k), warnings| {
            let stays = *s != source || keep(k);
            if !stays {
                m.refusing(kinds(warnings), -1);
            }
            stays
        });
    }
}

/// The distinct kinds among `warnings`.
fn kinds(warnings: &[Warning]) -> impl Iterator<Item = &'static str> + '_ {
    warnings
        .iter()
        .enumerate()
        .filter(|(i, w)| !warnings[..*i].iter().any(|p| p.kind == w.kind))
        .map(|(_, w)| w.kind)
}

/// A Service's view (`None`: xlb does not handle it); it belongs to itself.
#[derive(Debug)]
struct ServiceEntry(Option<kubernetes::ServiceView>);

impl Owned for ServiceEntry {
    fn owner(&self, key: &ObjKey) -> Option<ObjKey> {
        Some(Arc::clone(key))
    }
}

/// A slice's view (`None`: an address type xlb does not forward to) and its Service.
#[derive(Debug)]
struct SliceEntry {
    service: Option<ObjKey>,
    view: Option<SliceView>,
}

impl Owned for SliceEntry {
    fn owner(&self, _: &ObjKey) -> Option<ObjKey> {
        self.service.clone()
    }
}

/// A Node's zone label, and whether it may take load balancer traffic: not being deleted
/// and not tainted for deletion by the cluster autoscaler (kube-proxy's `nodeEligible`).
#[derive(Debug)]
struct NodeEntry {
    zone: Option<String>,
    eligible: bool,
}

/// The taint the cluster autoscaler puts on a node it is about to delete.
const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

impl Owned for NodeEntry {
    fn owner(&self, _: &ObjKey) -> Option<ObjKey> {
        None
    }
}

/// What a Service's last translation produced: its keys, and a digest of the whole
/// translation (an unchanged translation is not published again; `None`: publish the next
/// one whatever it is, a key it was refused has been released).
#[derive(Debug)]
struct Produced {
    keys: Vec<ServiceKey>,
    digest: Option<u64>,
}

/// The stale Services, translated.
#[derive(Debug, Default)]
pub struct Translated {
    /// What changed in the desired state.
    pub change: Change,
    /// Every Service with a healthCheckNodePort, when that set or a count changed.
    pub health: Option<Vec<ServiceHealth>>,
    /// When the events behind it arrived, each instant once (a relist is one arrival, when
    /// it started); only events whose Services' translations changed.
    pub arrivals: Vec<Instant>,
}

/// The watched objects' digests, indexed by Service, and which Services are stale.
#[derive(Debug)]
pub struct Store {
    services: Kind<ServiceEntry>,
    slices: Kind<SliceEntry>,
    nodes: Kind<NodeEntry>,
    /// EndpointSlices by the Service they belong to.
    slices_of: HashMap<ObjKey, BTreeSet<ObjKey>>,
    node: NodeContext,
    zones: Zones,
    /// Services to translate again, with the arrival of the first event that made each stale.
    dirty: BTreeMap<ObjKey, Instant>,
    complaints: Complaints,
    /// What each Service's last translation produced.
    produced: HashMap<ObjKey, Produced>,
    /// Which Service holds each key (two Services cannot share one), and the Services
    /// refused each held key, translated again when it is released.
    claims: Claims<ObjKey>,
    /// Hashes translations into digests (seeded at random, like every map here: names
    /// come from the API).
    digests: DefaultHashBuilder,
    /// The digest of an empty translation.
    nothing: u64,
    /// The Services with a healthCheckNodePort: its port and their local ready endpoints.
    health: BTreeMap<ObjKey, (u16, u32)>,
    /// Whether `health` changed since the last [`Store::take_change`].
    health_changed: bool,
    /// Whether this node may take load balancer traffic (true until its Node says not).
    node_eligible: bool,
}

impl Store {
    /// An empty store for `node` (its zone is then learnt from its Node object).
    #[must_use]
    pub fn new(node: NodeContext) -> Self {
        let digests = DefaultHashBuilder::default();
        Self {
            services: Kind::new(Source::Service),
            slices: Kind::new(Source::Slice),
            nodes: Kind::new(Source::Node),
            slices_of: HashMap::new(),
            node,
            zones: Zones::default(),
            dirty: BTreeMap::new(),
            complaints: Complaints::default(),
            produced: HashMap::new(),
            claims: Claims::default(),
            nothing: digests.hash_one::<&[DesiredService]>(&[]),
            digests,
            health: BTreeMap::new(),
            health_changed: false,
            node_eligible: true,
        }
    }

    /// Whether this node may take load balancer traffic: its Node is neither being deleted
    /// nor tainted `ToBeDeletedByClusterAutoscaler` (true while it is unknown).
    #[must_use]
    pub fn node_eligible(&self) -> bool {
        self.node_eligible
    }

    /// Whether Services and EndpointSlices have both been listed (a snapshot before that
    /// would show Services without their endpoints).
    #[must_use]
    pub fn listed(&self) -> bool {
        self.services.listed && self.slices.listed
    }

    /// Whether some Service must be translated again.
    #[must_use]
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    fn stale(&mut self, service: Option<ObjKey>, since: Instant) {
        if let Some(s) = service {
            self.dirty.entry(s).or_insert(since);
        }
    }

    /// Applies one watched event that arrived at `now`; complaints about objects are
    /// counted in `m`.
    pub fn apply(&mut self, watched: Watched, now: Instant, m: &KubeMetrics) {
        match watched {
            Watched::Service(event) => {
                let (moved, since) = self.services.event(
                    *event,
                    now,
                    |s: &Service| {
                        let mut warnings = Vec::new();
                        let view = kubernetes::ServiceView::of(s, &mut warnings);
                        (ServiceEntry(view), warnings)
                    },
                    &mut self.complaints,
                    m,
                );
                for (_, before, after) in moved {
                    self.stale(before, since);
                    self.stale(after, since);
                }
            }
            Watched::Slice(event) => {
                let (node, zones) = (&self.node.name, &mut self.zones);
                let (moved, since) = self.slices.event(
                    *event,
                    now,
                    |s: &EndpointSlice| {
                        let entry = SliceEntry {
                            service: kubernetes::service_of(s).map(|name| {
                                Arc::from(format!(
                                    "{}/{name}",
                                    s.metadata.namespace.as_deref().unwrap_or("default")
                                ))
                            }),
                            view: SliceView::of(s, node, zones),
                        };
                        (entry, Vec::new())
                    },
                    &mut self.complaints,
                    m,
                );
                for (slice, before, after) in moved {
                    if let Some(b) = &before {
                        if let Some(set) = self.slices_of.get_mut(b) {
                            set.remove(&slice);
                            if set.is_empty() {
                                self.slices_of.remove(b);
                            }
                        }
                    }
                    if let Some(a) = &after {
                        self.slices_of
                            .entry(Arc::clone(a))
                            .or_default()
                            .insert(Arc::clone(&slice));
                    }
                    self.stale(before, since);
                    self.stale(after, since);
                }
            }
            Watched::Node(event) => {
                self.nodes.event(
                    *event,
                    now,
                    |n: &Node| {
                        let zone = n
                            .metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(ZONE_LABEL))
                            .cloned();
                        let tainted = n
                            .spec
                            .as_ref()
                            .and_then(|s| s.taints.as_ref())
                            .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
                        let eligible = n.metadata.deletion_timestamp.is_none() && !tainted;
                        (NodeEntry { zone, eligible }, Vec::new())
                    },
                    &mut self.complaints,
                    m,
                );
                // Nodes are cluster-scoped: stored under "default/<name>".
                let this = self
                    .nodes
                    .objects
                    .iter()
                    .find(|(k, _)| k.rsplit('/').next() == Some(self.node.name.as_str()))
                    .map(|(_, n)| &n.view);
                self.node_eligible = this.is_none_or(|n| n.eligible);
                let zone = this.and_then(|n| n.zone.clone());
                if zone != self.node.zone {
                    self.node.zone = zone;
                    // Topology choices may change for every Service.
                    for k in self.services.objects.keys() {
                        self.dirty.entry(Arc::clone(k)).or_insert(now);
                    }
                }
            }
        }
        // Relaxed: gauges read on their own.
        m.services
            .store(self.services.objects.len() as u64, Ordering::Relaxed);
        m.slices
            .store(self.slices.objects.len() as u64, Ordering::Relaxed);
        m.nodes
            .store(self.nodes.objects.len() as u64, Ordering::Relaxed);
    }

    /// Translates the stale Services: the change to publish (only the Services whose
    /// translation differs from the last one), when the events behind it arrived, and the
    /// complaints that appeared.
    pub fn take_change(&mut self, m: &KubeMetrics) -> Translated {
        let mut out = Translated::default();
        let no_slices = BTreeSet::new();
        // Rounds: a key released in one round hands it to the Services that waited for it,
        // translated in the next round of this same call, so that the removal and the
        // hand-over are published together.
        while !self.dirty.is_empty() {
            for (name, since) in std::mem::take(&mut self.dirty) {
                let view = self
                    .services
                    .objects
                    .get(&name)
                    .and_then(|s| s.view.0.as_ref());
                let mut health = None;
                let desired: Vec<DesiredService> = match view {
                    Some(view) => {
                        let slices: Vec<&SliceView> = self
                            .slices_of
                            .get(&name)
                            .unwrap_or(&no_slices)
                            .iter()
                            .filter_map(|k| self.slices.objects.get(k)?.view.view.as_ref())
                            .collect();
                        health = view
                            .health_check_port()
                            .map(|p| (p, kubernetes::local_ready_endpoints(view, &slices)));
                        kubernetes::translate_views(view, &slices, &self.node)
                    }
                    None => Vec::new(),
                };
                let was = match health {
                    Some(h) => self.health.insert(Arc::clone(&name), h),
                    None => self.health.remove(&name),
                };
                self.health_changed |= was != health;
                let digest = self.digests.hash_one(&desired);
                let before = self
                    .produced
                    .get(&name)
                    .map_or(Some(self.nothing), |p| p.digest);
                if Some(digest) == before {
                    continue;
                }
                out.arrivals.push(since);
                let mut keys = Vec::with_capacity(desired.len());
                let mut conflicts = Vec::new();
                for d in desired {
                    let k = key(&d);
                    match self.claims.claim(k, &name, ()) {
                        Err(holder) => conflicts.push(Warning {
                            object: name.to_string(),
                            kind: "conflict",
                            message: format!(
                                "{} {} is already served for {holder}",
                                k.proto, k.vip
                            ),
                        }),
                        Ok(()) => {
                            self.claims.hold(k, Arc::clone(&name));
                            keys.push(k);
                            out.change.upsert.push(d);
                        }
                    }
                }
                self.complaints.set(Source::Claim, &name, conflicts, m);
                for old in self
                    .produced
                    .remove(&name)
                    .map(|p| p.keys)
                    .unwrap_or_default()
                {
                    if !keys.contains(&old) {
                        for (w, ()) in self.claims.release(&old, &name) {
                            if let Some(p) = self.produced.get_mut(&w) {
                                p.digest = None;
                            }
                            self.dirty.entry(w).or_insert(since);
                        }
                        out.change.remove.push(old);
                    }
                }
                if digest != self.nothing {
                    self.produced.insert(
                        name,
                        Produced {
                            keys,
                            digest: Some(digest),
                        },
                    );
                }
            }
        }
        out.arrivals.sort_unstable();
        out.arrivals.dedup();
        if std::mem::take(&mut self.health_changed) {
            out.health = Some(
                self.health
                    .iter()
                    .map(|(name, &(port, local_endpoints))| ServiceHealth {
                        name: Arc::clone(name),
                        port,
                        local_endpoints,
                    })
                    .collect(),
            );
        }
        out
    }

    /// The complaints about objects that appeared since the last call (each counted in the
    /// metrics when it appeared), to be logged.
    pub fn take_complaints(&mut self) -> Vec<Warning> {
        std::mem::take(&mut self.complaints.fresh)
    }
}
