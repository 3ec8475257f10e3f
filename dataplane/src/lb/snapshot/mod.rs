//! The immutable service table the workers read: (VIP, port, protocol) -> Service.
//!
//! A [`Snapshot`] is built beside the current one and published whole; its Services, their
//! tables and its indexes never change afterwards (only the counters workers keep in a
//! Service do: the round-robin turn and live-flow counts, atomics). Services are shared between consecutive snapshots (`Arc`), so a snapshot that
//! changes one Service rebuilds one Maglev table, not all of them.
//!
//! A Service picks a backend for a new flow with its [`Scheduler`] ([`Service::pick`]):
//! Maglev (the default), random, round-robin or least-connections.
//!
//! Lookups go through indexes (by key, by id, by backend) kept in the `index` submodule, in
//! shards shared between snapshots.
//!
//! Backends carry stable [`BackendId`]s (assigned by the control plane, the same for the same
//! backend of a Service in every snapshot) so that the flow table can remember a flow's
//! backend across snapshots and tell when that backend has left.

use std::num::NonZeroU32;
use std::sync::Arc;

use crate::sync::{AtomicU64, Ordering};

use crate::packet::{Endpoint, FlowKey, IpProto};

mod index;

use index::{id_hash, key_hash, BackendIndex, Index};

use super::maglev::{MaglevError, MaglevTable, TableCache};
use super::prefix::PrefixMap;

/// A Service's stable identity across snapshots. Zero is reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId(pub NonZeroU32);

/// A backend's stable identity within its Service across snapshots. Zero is reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(pub NonZeroU32);

/// What a Service is found by: its virtual address, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// The VIP and port.
    pub vip: Endpoint,
    /// TCP or UDP (ICMP echo to a VIP uses port 0).
    pub proto: IpProto,
}

impl ServiceKey {
    /// The Service a packet with this flow key is addressed to.
    #[must_use]
    pub fn of_destination(key: &FlowKey) -> Self {
        Self {
            vip: Endpoint::from_key_form(key.family, key.dst_addr, key.dst_port),
            proto: key.proto,
        }
    }
}

/// A backend's condition, from the EndpointSlice conditions (KEP-1669).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendState {
    /// Ready: takes new flows.
    Ready,
    /// Serving but terminating: keeps its flows, takes new ones only when no backend of the
    /// Service is ready.
    Terminating,
    /// Neither ready nor serving: keeps the flows it has (they end on their own), takes no new
    /// one.
    Draining,
}

/// How a Service picks a backend for a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Scheduler {
    /// Maglev consistent hashing of the five-tuple (the default).
    #[default]
    Maglev,
    /// Uniformly at random (kube-proxy's iptables mode).
    Random,
    /// In turn (IPVS `rr`).
    RoundRobin,
    /// The backend with the fewest live flows (IPVS `lc`).
    LeastConnections,
}

/// What a Service with no usable backend does with a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum NoBackend {
    /// Answer with a TCP reset or an ICMP unreachable (kube-proxy's behaviour).
    #[default]
    Reject,
    /// Drop silently.
    Drop,
}

/// One backend of a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Stable identity.
    pub id: BackendId,
    /// Where its flows are sent.
    pub endpoint: Endpoint,
    /// Its condition.
    pub state: BackendState,
    /// Relative share of new flows (0 takes none).
    pub weight: u32,
}

/// What a Service is made of, as the control plane describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Stable identity.
    pub id: ServiceId,
    /// VIP, port and protocol.
    pub key: ServiceKey,
    /// Its backends, in any order.
    pub backends: Vec<Backend>,
    /// How new flows pick a backend.
    pub scheduler: Scheduler,
    /// Session affinity by client address: the timeout in seconds, or none.
    pub affinity_timeout: Option<u32>,
    /// What happens when no backend can take a new flow.
    pub no_backend: NoBackend,
    /// An explicit Maglev table size (a prime), or automatic.
    pub table_size: Option<u32>,
    /// The client prefixes allowed to open flows (Kubernetes' `loadBalancerSourceRanges`, on
    /// a load balancer's ingress address), or anyone.
    pub source_ranges: Option<Arc<PrefixMap<()>>>,
    /// What the control plane built it from, for its reports; never read here.
    pub origin: Origin,
}

/// What the control plane built a Service from (its desired state, for `/services`), carried
/// with the Service so that a report reads the live snapshot alone. The dataplane neither
/// reads nor knows its type. Two origins are equal when they are the same object.
#[derive(Clone, Default)]
pub struct Origin(Option<Arc<dyn core::any::Any + Send + Sync>>);

impl Origin {
    /// An origin holding `what`.
    #[must_use]
    pub fn new<T: core::any::Any + Send + Sync>(what: Arc<T>) -> Self {
        Self(Some(what))
    }

    /// What it holds, if it is a `T`.
    #[must_use]
    pub fn get<T: core::any::Any>(&self) -> Option<&T> {
        self.0.as_deref()?.downcast_ref()
    }
}

impl core::fmt::Debug for Origin {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Origin(..)"
        } else {
            "Origin(none)"
        })
    }
}

impl PartialEq for Origin {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

impl Eq for Origin {}

impl ServiceSpec {
    /// A Service with the defaults: Maglev, no session affinity, reject when no backend is
    /// usable, automatic table size.
    #[must_use]
    pub fn new(id: ServiceId, key: ServiceKey, backends: Vec<Backend>) -> Self {
        Self {
            id,
            key,
            backends,
            scheduler: Scheduler::default(),
            affinity_timeout: None,
            no_backend: NoBackend::default(),
            table_size: None,
            source_ranges: None,
            origin: Origin::default(),
        }
    }
}

/// Why a snapshot cannot be built. The control plane keeps its previous snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotError {
    /// Two Services have the same VIP, port and protocol.
    DuplicateService(ServiceKey),
    /// Two Services have the same id.
    DuplicateServiceId(ServiceId),
    /// Two backends of a Service have the same id.
    DuplicateBackendId(ServiceId, BackendId),
    /// A backend's address family differs from its Service's.
    FamilyMismatch(ServiceId),
    /// The Maglev table could not be built.
    Maglev(ServiceId, MaglevError),
}

impl core::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::DuplicateService(k) => write!(f, "two Services at {} {}", k.proto, k.vip),
            Self::DuplicateServiceId(id) => write!(f, "two Services with id {}", id.0),
            Self::DuplicateBackendId(s, b) => {
                write!(f, "Service {} has two backends with id {}", s.0, b.0)
            }
            Self::FamilyMismatch(s) => {
                write!(
                    f,
                    "Service {} has a backend of the other address family",
                    s.0
                )
            }
            Self::Maglev(s, e) => write!(f, "Service {}: {e}", s.0),
        }
    }
}

impl std::error::Error for SnapshotError {}

/// A Service ready for the packet path.
#[derive(Debug)]
pub struct Service {
    spec: ServiceSpec,
    /// Indices (into `spec.backends`, sorted by id) of the backends that take new flows:
    /// the ready ones, or the terminating ones when none is ready.
    pickable: Box<[u16]>,
    /// Over `pickable`, for the Maglev scheduler; `None` when nothing is pickable.
    maglev: Option<MaglevTable>,
    /// Round-robin position, shared by the workers.
    turn: AtomicU64,
    /// Live flows per pickable backend (same order as `pickable`): counted as flows start for
    /// least-connections, and set by every recount for all schedulers.
    live: Box<[AtomicU64]>,
}

impl Service {
    /// Prepares a Service: validates it, orders its backends by id and builds its table.
    ///
    /// # Errors
    /// See [`SnapshotError`].
    pub fn new(spec: ServiceSpec) -> Result<Self, SnapshotError> {
        Self::sharing(spec, &mut TableCache::default())
    }

    /// As [`Service::new`], taking its Maglev table from `tables` when a Service with the
    /// same backends built one already (and leaving its own there for the next).
    ///
    /// # Errors
    /// See [`SnapshotError`].
    pub fn sharing(mut spec: ServiceSpec, tables: &mut TableCache) -> Result<Self, SnapshotError> {
        spec.backends.sort_by_key(|b| b.id);
        if let Some(pair) = spec.backends.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(SnapshotError::DuplicateBackendId(spec.id, pair[0].id));
        }
        let family = spec.key.vip.family();
        if spec.backends.iter().any(|b| b.endpoint.family() != family) {
            return Err(SnapshotError::FamilyMismatch(spec.id));
        }
        let usable = |state| {
            spec.backends
                .iter()
                .enumerate()
                .filter(move |(_, b)| b.state == state && b.weight > 0)
                .filter_map(|(i, _)| u16::try_from(i).ok())
        };
        let mut pickable: Vec<u16> = usable(BackendState::Ready).collect();
        if pickable.is_empty() {
            pickable = usable(BackendState::Terminating).collect();
        }
        let maglev = if pickable.is_empty() || spec.scheduler != Scheduler::Maglev {
            None
        } else {
            let weighted: Vec<(Endpoint, u32)> = pickable
                .iter()
                .map(|&i| {
                    let b = &spec.backends[usize::from(i)];
                    (b.endpoint, b.weight)
                })
                .collect();
            Some(
                tables
                    .get(&weighted, spec.table_size)
                    .map_err(|e| SnapshotError::Maglev(spec.id, e))?,
            )
        };
        let live = pickable.iter().map(|_| AtomicU64::new(0)).collect();
        Ok(Self {
            spec,
            pickable: pickable.into_boxed_slice(),
            maglev,
            turn: AtomicU64::new(0),
            live,
        })
    }

    /// The Service as described by the control plane (backends sorted by id).
    #[must_use]
    pub fn spec(&self) -> &ServiceSpec {
        &self.spec
    }

    /// The backend with this id, if it is still part of the Service.
    #[must_use]
    pub fn backend(&self, id: BackendId) -> Option<&Backend> {
        let i = self
            .spec
            .backends
            .binary_search_by_key(&id, |b| b.id)
            .ok()?;
        self.spec.backends.get(i)
    }

    /// The backend at this address and port, if it is part of the Service (a linear search,
    /// for the rare packet that no flow explains).
    #[must_use]
    pub fn backend_at(&self, endpoint: &Endpoint) -> Option<&Backend> {
        self.spec.backends.iter().find(|b| b.endpoint == *endpoint)
    }

    /// The backends that take new flows (indices into `spec().backends`).
    #[must_use]
    pub fn pickable(&self) -> &[u16] {
        &self.pickable
    }

    /// The Maglev pick for a flow hash, if the Service uses Maglev and has a usable backend.
    #[inline]
    #[must_use]
    pub fn maglev_pick(&self, hash: u64) -> Option<&Backend> {
        let slot = self.maglev.as_ref()?.lookup(hash);
        let index = self.pickable.get(slot)?;
        self.spec.backends.get(usize::from(*index))
    }

    /// Starts fetching what [`Self::pick`] and the count of a started flow read for a new
    /// flow with this hash: the Maglev slot, the pick list, the backends and their counters.
    #[inline]
    pub fn prefetch_pick(&self, flow_hash: u64) {
        if let Some(table) = &self.maglev {
            table.prefetch(flow_hash);
        }
        if let (Some(pickable), Some(backend), Some(live)) = (
            self.pickable.first(),
            self.spec.backends.first(),
            self.live.first(),
        ) {
            crate::prefetch::prefetch_read(pickable);
            crate::prefetch::prefetch_read(backend);
            crate::prefetch::prefetch_read(live);
        }
    }

    /// Picks the backend for a new flow with the Service's scheduler, or `None` when no
    /// backend takes new flows.
    ///
    /// `flow_hash` is the packet's [`super::hash::flow_hash`] (Maglev); `random` a fresh
    /// random number from the worker (random). Round-robin and least-connections follow IPVS
    /// `rr` and `lc`, and random follows kube-proxy's iptables mode: all three ignore weights
    /// (weight 0 still excludes a backend).
    #[inline]
    #[must_use]
    pub fn pick(&self, flow_hash: u64, random: u64) -> Option<&Backend> {
        let n = self.pickable.len() as u64;
        if n == 0 {
            return None;
        }
        let slot = match self.spec.scheduler {
            Scheduler::Maglev => return self.maglev_pick(flow_hash),
            // The high 32 bits scaled to [0, n): no modulo bias worth a division.
            Scheduler::Random => ((random >> 32) * n) >> 32,
            // Relaxed: the counter only spreads picks; no other memory depends on it.
            Scheduler::RoundRobin => self.turn.fetch_add(1, Ordering::Relaxed) % n,
            Scheduler::LeastConnections => self
                .live
                .iter()
                .enumerate()
                // Relaxed: a momentary count is all least-connections promises.
                .min_by_key(|(_, c)| c.load(Ordering::Relaxed))
                .map_or(0, |(i, _)| i as u64),
        };
        let index = self.pickable.get(usize::try_from(slot).unwrap_or(0))?;
        self.spec.backends.get(usize::from(*index))
    }

    /// Counts a flow that started on `backend`, for least-connections' next picks. Other
    /// schedulers count nothing here (their counts come from the recount alone), so that
    /// their new flows write no counter that every worker writes.
    #[inline]
    pub fn flow_started(&self, backend: BackendId) {
        if self.spec.scheduler != Scheduler::LeastConnections {
            return;
        }
        if let Some(count) = self.live_count(backend) {
            // Relaxed: an independent counter.
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sets the live flows of every backend that takes new flows to `count` of its id (a
    /// recount from the flow table, which also catches the flows that ended, by a packet, by
    /// expiry or by eviction: no packet path counts those).
    pub fn recounted(&self, count: impl Fn(BackendId) -> u64) {
        for (&i, live) in self.pickable.iter().zip(self.live.iter()) {
            if let Some(backend) = self.spec.backends.get(usize::from(i)) {
                // Relaxed: an independent counter.
                live.store(count(backend.id), Ordering::Relaxed);
            }
        }
    }

    /// The live flows counted on `backend`, if it takes new flows.
    #[must_use]
    pub fn live_flows(&self, backend: BackendId) -> Option<u64> {
        // Relaxed: a momentary reading.
        self.live_count(backend).map(|c| c.load(Ordering::Relaxed))
    }

    /// Whether `backend` takes new flows (is among the pickable ones).
    #[must_use]
    pub fn takes_new_flows(&self, backend: BackendId) -> bool {
        self.pickable_slot(backend).is_some()
    }

    fn live_count(&self, backend: BackendId) -> Option<&AtomicU64> {
        self.live.get(self.pickable_slot(backend)?)
    }

    /// The position of `backend` in `pickable`.
    fn pickable_slot(&self, backend: BackendId) -> Option<usize> {
        let i = self
            .spec
            .backends
            .binary_search_by_key(&backend, |b| b.id)
            .ok()?;
        self.pickable.iter().position(|&p| usize::from(p) == i)
    }

    /// Approximate heap bytes this Service holds (backends, pick list, Maglev slots).
    #[must_use]
    pub fn heap_bytes(&self) -> usize {
        self.spec.backends.capacity() * core::mem::size_of::<Backend>()
            + self.pickable.len() * (2 + core::mem::size_of::<AtomicU64>())
            + self.maglev.as_ref().map_or(0, |m| m.slots().len() * 2)
    }
}

/// The whole service table at one moment.
///
/// Built whole with [`Snapshot::new`], or from the previous one with [`Snapshot::update`],
/// which shares every shard the update does not touch: publishing one changed Service among
/// 100 000 copies two shards of a few hundred pointers each.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    generation: u64,
    by_key: Index,
    by_id: Index,
    by_backend: BackendIndex,
    len: usize,
    /// How many Services use least-connections (whose counts need a periodic recount).
    least_connections: usize,
}

impl Snapshot {
    /// Builds a snapshot from prepared Services (shared with earlier snapshots where they
    /// did not change).
    ///
    /// # Errors
    /// Duplicate Service keys or ids.
    pub fn new(generation: u64, services: Vec<Arc<Service>>) -> Result<Self, SnapshotError> {
        Self::default().update(generation, [], services)
    }

    /// The next snapshot: this one without the Services at `remove`, with `add` (which
    /// replace Services at the same key). This one is left as it was.
    ///
    /// # Errors
    /// Two Services of `add` at the same key, or a Service whose id another Service of the
    /// result already has.
    pub fn update(
        &self,
        generation: u64,
        remove: impl IntoIterator<Item = ServiceKey>,
        add: Vec<Arc<Service>>,
    ) -> Result<Self, SnapshotError> {
        let mut next = self.clone();
        next.generation = generation;
        for key in remove {
            next.remove(&key);
        }
        let mut added = hashbrown::HashSet::with_capacity(add.len());
        for service in add {
            let spec = service.spec();
            let (key, id) = (spec.key, spec.id);
            if !added.insert(key) {
                return Err(SnapshotError::DuplicateService(key));
            }
            // A Service replaced at its key gives up its id (the same id, for stable ids).
            next.remove(&key);
            if next.by_id.get(id_hash(id), |s| s.spec.id == id).is_some() {
                return Err(SnapshotError::DuplicateServiceId(id));
            }
            next.by_backend.add(&service);
            if spec.scheduler == Scheduler::LeastConnections {
                next.least_connections += 1;
            }
            next.by_id.insert(
                id_hash(id),
                Arc::clone(&service),
                |s| s.spec.id == id,
                |s| id_hash(s.spec.id),
            );
            next.by_key.insert(
                key_hash(&key),
                service,
                |s| s.spec.key == key,
                |s| key_hash(&s.spec.key),
            );
            next.len += 1;
        }
        Ok(next)
    }

    fn remove(&mut self, key: &ServiceKey) {
        if let Some(old) = self.by_key.remove(key_hash(key), |s| s.spec.key == *key) {
            self.by_backend.remove(&old);
            if old.spec.scheduler == Scheduler::LeastConnections {
                self.least_connections -= 1;
            }
            let id = old.spec.id;
            self.by_id.remove(id_hash(id), |s| s.spec.id == id);
            self.len -= 1;
        }
    }

    /// The snapshot's generation (increases with every publication).
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The Service at a VIP, port and protocol.
    #[inline]
    #[must_use]
    pub fn service(&self, key: &ServiceKey) -> Option<&Service> {
        self.by_key
            .get(key_hash(key), |s| s.spec.key == *key)
            .map(|s| &**s)
    }

    /// For a packet that is probably a new flow (no flow entry showed its tag): finds its
    /// Service and starts fetching what its pick reads. In a large snapshot these are cache
    /// misses in a chain; a batch's new flows take them together, before any is decided.
    #[inline]
    pub fn prefetch_new_flow(&self, key: &FlowKey, flow_hash: u64) {
        if let Some(service) = self.service(&ServiceKey::of_destination(key)) {
            service.prefetch_pick(flow_hash);
        }
    }

    /// The Service with this id.
    #[inline]
    #[must_use]
    pub fn service_by_id(&self, id: ServiceId) -> Option<&Service> {
        self.by_id
            .get(id_hash(id), |s| s.spec.id == id)
            .map(|s| &**s)
    }

    /// The Services that have a backend at `backend` for `proto`.
    pub fn services_with_backend(
        &self,
        backend: &Endpoint,
        proto: IpProto,
    ) -> impl Iterator<Item = &Service> + '_ {
        let key = ServiceKey {
            vip: *backend,
            proto,
        };
        self.by_backend
            .services(key)
            .filter_map(|id| self.service_by_id(id))
    }

    /// The shared Service at a key (for a control plane that builds the next snapshot).
    #[must_use]
    pub fn service_arc(&self, key: &ServiceKey) -> Option<&Arc<Service>> {
        self.by_key.get(key_hash(key), |s| s.spec.key == *key)
    }

    /// Whether some Service uses least-connections (and so needs live-flow recounts).
    #[must_use]
    pub fn has_least_connections(&self) -> bool {
        self.least_connections > 0
    }

    /// The number of Services.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is no Service.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// All Services, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.by_key.values().map(|s| &**s)
    }
}

#[cfg(test)]
mod tests;
