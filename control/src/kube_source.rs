//! The Kubernetes source: watches Services, EndpointSlices and this node, and turns what
//! changed into [`Change`]s for the publisher.
//!
//! Owns: the watches (kube-rs `watcher`s, which list, then watch from the list's
//! resourceVersion, follow bookmarks, relist after 410 Gone, and retry with backoff), the
//! store of what translation reads of each object (compact views, not the objects) indexed
//! by Service, the Services whose translation is stale, coalescing (at most one publication
//! per minimum sync period, bursts drained first), and relists that replace the store at
//! once, so that a relist never shows a moment without the objects it lists again. A malformed object is
//! skipped (its last good version stays) with a warning and a counter; nothing is published
//! before Services and EndpointSlices are both listed, so the first snapshot is whole.
//!
//! Must not know: snapshots, the dataplane, the daemon; what translation means (that is
//! `kubernetes`).

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{BoxStream, StreamExt};
use futures::FutureExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use tracing::warn;
use xlb_dataplane::lb::snapshot::ServiceKey;

use crate::desired::DesiredService;
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

/// Counters of the Kubernetes source, for `/metrics`.
#[derive(Debug, Default)]
pub struct KubeMetrics {
    /// Services in the store.
    pub services: AtomicU64,
    /// EndpointSlices in the store.
    pub slices: AtomicU64,
    /// Nodes in the store (this node: 0 or 1).
    pub nodes: AtomicU64,
    /// Watch and list errors (the watch retries with backoff).
    pub watch_errors: AtomicU64,
    /// Translation errors and skipped objects, by kind (as [`ERROR_KINDS`]).
    pub errors: [AtomicU64; ERROR_KINDS.len()],
    /// Whether Services and EndpointSlices have both been listed once.
    pub synced: std::sync::atomic::AtomicBool,
}

/// The kinds of translation error counted (the last one takes any other).
pub const ERROR_KINDS: [&str; 8] = [
    "malformed",
    "bad-address",
    "bad-annotation",
    "bad-port",
    "unsupported-protocol",
    "conflict",
    "refused",
    "other",
];

impl KubeMetrics {
    /// Counts one error of `kind`.
    pub fn error(&self, kind: &str) {
        let i = ERROR_KINDS
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(ERROR_KINDS.len() - 1);
        // Relaxed: a counter read on its own.
        self.errors[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// A namespaced object's name, `namespace/name` (shared, not copied, between the maps that
/// refer to it).
type ObjKey = Arc<str>;

fn obj_key(meta: &ObjectMeta) -> ObjKey {
    Arc::from(kubernetes::object_name(meta))
}

/// What a watch delivered.
#[derive(Debug)]
pub enum Watched {
    /// A Service event.
    Service(Box<Event<Lenient<Service>>>),
    /// An EndpointSlice event.
    Slice(Box<Event<Lenient<EndpointSlice>>>),
    /// An event about this node.
    Node(Box<Event<Lenient<Node>>>),
    /// A watch failed (it retries by itself, with backoff).
    Error(&'static str, String),
}

/// An object as stored: its resourceVersion (to tell a relisted object from a changed one)
/// and its digest.
#[derive(Debug)]
struct Stored<V> {
    version: Option<Box<str>>,
    view: V,
}

/// One kind of object as stored: the current digests, and those of a relist in progress
/// (which replace them whole when the relist is done).
#[derive(Debug)]
struct Kind<V> {
    objects: HashMap<ObjKey, Stored<V>>,
    relist: Option<HashMap<ObjKey, Stored<V>>>,
    listed: bool,
}

impl<V> Default for Kind<V> {
    fn default() -> Self {
        Self {
            objects: HashMap::new(),
            relist: None,
            listed: false,
        }
    }
}

/// A stored object changed: its key, and the Service it belonged to before and belongs to
/// after (for a Service, itself; for an EndpointSlice, the Service its label names).
type Moved = (ObjKey, Option<ObjKey>, Option<ObjKey>);

/// A digest that knows the Service its object (stored under `key`) belongs to.
trait Owned {
    fn owner(&self, key: &ObjKey) -> Option<ObjKey>;
}

impl<V: Owned> Kind<V> {
    /// Applies a watch event to the store and says what changed. `digest` makes an object's
    /// digest; `on_malformed` is told of each object that did not decode, whose last good
    /// version stays.
    fn event<K: Resource<DynamicType = ()>>(
        &mut self,
        event: Event<Lenient<K>>,
        mut digest: impl FnMut(&K) -> V,
        mut on_malformed: impl FnMut(&ObjKey, &str),
    ) -> Vec<Moved> {
        let mut decode = |l: Lenient<K>| -> Result<(ObjKey, Stored<V>), ObjKey> {
            match l.object {
                Ok(o) => {
                    let view = digest(&o);
                    let version = o.meta().resource_version.as_deref().map(Box::from);
                    Ok((obj_key(o.meta()), Stored { version, view }))
                }
                Err(e) => {
                    let k = obj_key(&l.meta);
                    on_malformed(&k, &e);
                    Err(k)
                }
            }
        };
        match event {
            Event::Apply(l) => match decode(l) {
                Ok((k, stored)) => {
                    let after = stored.view.owner(&k);
                    let before = self.objects.insert(Arc::clone(&k), stored);
                    vec![(k.clone(), before.and_then(|b| b.view.owner(&k)), after)]
                }
                Err(_) => Vec::new(),
            },
            Event::Delete(l) => {
                let k = obj_key(Resource::meta(&l));
                match self.objects.remove(&k) {
                    Some(before) => vec![(k.clone(), before.view.owner(&k), None)],
                    None => Vec::new(),
                }
            }
            Event::Init => {
                self.relist = Some(HashMap::new());
                Vec::new()
            }
            Event::InitApply(l) => {
                let decoded = decode(l);
                let relist = self.relist.get_or_insert_with(HashMap::new);
                match decoded {
                    Ok((k, stored)) => {
                        relist.insert(k, stored);
                    }
                    Err(k) => {
                        // A malformed object keeps its last good version through a relist.
                        if let Some(old) = self.objects.remove(&k) {
                            relist.insert(k, old);
                        }
                    }
                }
                Vec::new()
            }
            Event::InitDone => {
                self.listed = true;
                let fresh = self.relist.take().unwrap_or_default();
                let mut old = std::mem::replace(&mut self.objects, fresh);
                let mut changed = Vec::new();
                for (k, after) in &self.objects {
                    match old.remove(k) {
                        Some(before)
                            if before.version.is_some() && before.version == after.version => {}
                        before => changed.push((
                            Arc::clone(k),
                            before.and_then(|b| b.view.owner(k)),
                            after.view.owner(k),
                        )),
                    }
                }
                changed.extend(old.into_iter().map(|(k, before)| {
                    let was = before.view.owner(&k);
                    (k, was, None)
                }));
                changed
            }
        }
    }
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

/// A Node's zone label.
#[derive(Debug)]
struct NodeEntry(Option<String>);

impl Owned for NodeEntry {
    fn owner(&self, _: &ObjKey) -> Option<ObjKey> {
        None
    }
}

/// The watched objects' digests, indexed by Service, and which Services are stale.
#[derive(Debug, Default)]
pub struct Store {
    services: Kind<ServiceEntry>,
    slices: Kind<SliceEntry>,
    nodes: Kind<NodeEntry>,
    /// EndpointSlices by the Service they belong to.
    slices_of: HashMap<ObjKey, BTreeSet<ObjKey>>,
    node: NodeContext,
    zones: Zones,
    /// Services to translate again.
    dirty: BTreeSet<ObjKey>,
    /// What Services said was wrong with them when they were read, for the next batch.
    warnings: Vec<Warning>,
    /// The keys each Service's last translation produced.
    produced: HashMap<ObjKey, Vec<ServiceKey>>,
    /// Which Service holds each key (two Services cannot share one).
    claims: HashMap<ServiceKey, ObjKey>,
}

impl Store {
    /// An empty store for `node` (its zone is then learnt from its Node object).
    #[must_use]
    pub fn new(node: NodeContext) -> Self {
        Self {
            node,
            ..Self::default()
        }
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

    /// Applies one watched event; malformed objects and watch errors are counted in
    /// `metrics` and logged.
    pub fn apply(&mut self, watched: Watched, metrics: &KubeMetrics) {
        let malformed = |resource: &'static str| {
            move |k: &ObjKey, e: &str| {
                warn!(resource, object = %k, error = %e, "malformed object skipped; its last good version stays");
                metrics.error("malformed");
            }
        };
        match watched {
            Watched::Service(event) => {
                let warnings = &mut self.warnings;
                let moved = self.services.event(
                    *event,
                    |s: &Service| ServiceEntry(kubernetes::ServiceView::of(s, warnings)),
                    malformed("service"),
                );
                for (_, before, after) in moved {
                    self.dirty.extend(before.into_iter().chain(after));
                }
            }
            Watched::Slice(event) => {
                let (node, zones) = (&self.node.name, &mut self.zones);
                let moved = self.slices.event(
                    *event,
                    |s: &EndpointSlice| SliceEntry {
                        service: kubernetes::service_of(s).map(|name| {
                            Arc::from(format!(
                                "{}/{name}",
                                s.metadata.namespace.as_deref().unwrap_or("default")
                            ))
                        }),
                        view: SliceView::of(s, node, zones),
                    },
                    malformed("endpointslice"),
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
                    self.dirty.extend(before.into_iter().chain(after));
                }
            }
            Watched::Node(event) => {
                self.nodes.event(
                    *event,
                    |n: &Node| {
                        NodeEntry(
                            n.metadata
                                .labels
                                .as_ref()
                                .and_then(|l| l.get(ZONE_LABEL))
                                .cloned(),
                        )
                    },
                    malformed("node"),
                );
                // Nodes are cluster-scoped: stored under "default/<name>".
                let zone = self
                    .nodes
                    .objects
                    .iter()
                    .find(|(k, _)| k.rsplit('/').next() == Some(self.node.name.as_str()))
                    .and_then(|(_, n)| n.view.0.clone());
                if zone != self.node.zone {
                    self.node.zone = zone;
                    // Topology choices may change for every Service.
                    self.dirty.extend(self.services.objects.keys().cloned());
                }
            }
            Watched::Error(resource, e) => {
                warn!(resource, error = %e, "Kubernetes watch failed; retrying with backoff, the last good snapshot stays");
                // Relaxed: a counter read on its own.
                metrics.watch_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Relaxed: gauges read on their own.
        metrics
            .services
            .store(self.services.objects.len() as u64, Ordering::Relaxed);
        metrics
            .slices
            .store(self.slices.objects.len() as u64, Ordering::Relaxed);
        metrics
            .nodes
            .store(self.nodes.objects.len() as u64, Ordering::Relaxed);
    }

    /// Translates the stale Services: the change to publish, and the warnings (also counted
    /// in `metrics` by kind).
    pub fn take_change(&mut self, metrics: &KubeMetrics) -> (Change, Vec<Warning>) {
        let mut change = Change::default();
        let mut warnings = std::mem::take(&mut self.warnings);
        let no_slices = BTreeSet::new();
        for name in std::mem::take(&mut self.dirty) {
            let view = self
                .services
                .objects
                .get(&name)
                .and_then(|s| s.view.0.as_ref());
            let desired: Vec<DesiredService> = match view {
                Some(view) => {
                    let slices: Vec<&SliceView> = self
                        .slices_of
                        .get(&name)
                        .unwrap_or(&no_slices)
                        .iter()
                        .filter_map(|k| self.slices.objects.get(k)?.view.view.as_ref())
                        .collect();
                    kubernetes::translate_views(view, &slices, &self.node)
                }
                None => Vec::new(),
            };
            let mut keys = Vec::with_capacity(desired.len());
            for d in desired {
                let k = key(&d);
                match self.claims.get(&k) {
                    Some(holder) if *holder != name => warnings.push(Warning {
                        object: name.to_string(),
                        kind: "conflict",
                        message: format!("{} {} is already served for {holder}", k.proto, k.vip),
                    }),
                    _ => {
                        self.claims.insert(k, Arc::clone(&name));
                        keys.push(k);
                        change.upsert.push(d);
                    }
                }
            }
            for old in self.produced.remove(&name).unwrap_or_default() {
                if !keys.contains(&old) {
                    self.claims.remove(&old);
                    change.remove.push(old);
                }
            }
            if !keys.is_empty() {
                self.produced.insert(name, keys);
            }
        }
        for w in &warnings {
            metrics.error(w.kind);
        }
        (change, warnings)
    }
}

/// The Kubernetes source: the watches, the store, and coalescing.
pub struct KubeSource {
    events: BoxStream<'static, Watched>,
    store: Store,
    min_sync: Duration,
    last_publish: Option<Instant>,
    arrivals: Vec<Instant>,
    metrics: Arc<KubeMetrics>,
}

impl Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("min_sync", &self.min_sync)
            .finish_non_exhaustive()
    }
}

/// A batch of changes ready to publish.
#[derive(Debug)]
pub struct Batch {
    /// What changed.
    pub change: Change,
    /// When each event in it arrived (for the event-to-live histogram).
    pub arrivals: Vec<Instant>,
    /// What translation skipped or defaulted.
    pub warnings: Vec<Warning>,
}

fn watch<K>(
    client: &Client,
    config: watcher::Config,
) -> BoxStream<'static, Result<Event<Lenient<K>>, watcher::Error>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
    K::Scope: Send,
{
    let api: Api<Lenient<K>> = Api::all(client.clone());
    watcher::watcher(api, config).default_backoff().boxed()
}

impl KubeSource {
    /// Starts watching through `client` as `node`: Services and EndpointSlices in every
    /// namespace and this node's Node object. Nothing is requested before the first
    /// [`KubeSource::next_batch`].
    #[must_use]
    pub fn new(
        client: &Client,
        node: NodeContext,
        min_sync: Duration,
        metrics: Arc<KubeMetrics>,
    ) -> Self {
        let node_name = node.name.clone();
        let services = watch::<Service>(client, watcher::Config::default()).map(|e| match e {
            Ok(e) => Watched::Service(Box::new(e)),
            Err(e) => Watched::Error("service", e.to_string()),
        });
        let slices = watch::<EndpointSlice>(client, watcher::Config::default()).map(|e| match e {
            Ok(e) => Watched::Slice(Box::new(e)),
            Err(e) => Watched::Error("endpointslice", e.to_string()),
        });
        let node_config = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
        let nodes = watch::<Node>(client, node_config).map(|e| match e {
            Ok(e) => Watched::Node(Box::new(e)),
            Err(e) => Watched::Error("node", e.to_string()),
        });
        let events =
            futures::stream::select_all([services.boxed(), slices.boxed(), nodes.boxed()]).boxed();
        Self {
            events,
            store: Store::new(node),
            min_sync,
            last_publish: None,
            arrivals: Vec::new(),
            metrics,
        }
    }

    /// The source's counters.
    #[must_use]
    pub fn metrics(&self) -> &Arc<KubeMetrics> {
        &self.metrics
    }

    /// Waits for the next batch of changes: events are applied as they arrive; once some
    /// Service is stale (and both lists are in), what is already waiting is drained, and the
    /// batch is returned no sooner than the minimum sync period after the previous one.
    /// Cancel-safe: what a dropped call applied stays applied.
    pub async fn next_batch(&mut self) -> Batch {
        loop {
            let ready = self.store.listed() && self.store.is_dirty();
            if ready {
                // Drain what has already arrived: a burst is one batch.
                while let Some(Some(event)) = self.events.next().now_or_never() {
                    self.arrived(event);
                }
                let due = self
                    .last_publish
                    .map_or_else(Instant::now, |t| t + self.min_sync);
                let now = Instant::now();
                if due <= now {
                    return self.batch(now);
                }
                tokio::select! {
                    () = tokio::time::sleep_until(due.into()) => {}
                    event = self.events.next() => match event {
                        Some(event) => self.arrived(event),
                        None => std::future::pending::<()>().await,
                    },
                }
            } else {
                match self.events.next().await {
                    Some(event) => self.arrived(event),
                    // The watchers never end; if they did, there is nothing more to publish.
                    None => std::future::pending::<()>().await,
                }
            }
        }
    }

    fn arrived(&mut self, event: Watched) {
        let counts = !matches!(event, Watched::Error(..));
        if counts {
            self.arrivals.push(Instant::now());
        }
        self.store.apply(event, &self.metrics);
        // Relaxed: a flag read on its own.
        self.metrics
            .synced
            .store(self.store.listed(), Ordering::Relaxed);
    }

    fn batch(&mut self, now: Instant) -> Batch {
        self.last_publish = Some(now);
        let (change, warnings) = self.store.take_change(&self.metrics);
        Batch {
            change,
            arrivals: std::mem::take(&mut self.arrivals),
            warnings,
        }
    }
}
