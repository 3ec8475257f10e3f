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
//! Backends carry stable [`BackendId`]s (assigned by the control plane, the same for the same
//! backend of a Service in every snapshot) so that the flow table can remember a flow's
//! backend across snapshots and tell when that backend has left.

use std::num::NonZeroU32;
use std::sync::Arc;

use core::hash::BuildHasher;

use foldhash::fast::FixedState;
use hashbrown::hash_table::Entry;
use hashbrown::HashTable;

use crate::sync::{AtomicU64, Ordering};

use crate::packet::{Endpoint, FlowKey, IpProto};

use super::maglev::{MaglevError, MaglevTable};
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
    /// Live flows per pickable backend (same order as `pickable`), for least-connections.
    live: Box<[AtomicU64]>,
}

impl Service {
    /// Prepares a Service: validates it, orders its backends by id and builds its table.
    ///
    /// # Errors
    /// See [`SnapshotError`].
    pub fn new(mut spec: ServiceSpec) -> Result<Self, SnapshotError> {
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
                MaglevTable::build(&weighted, spec.table_size)
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

    /// Counts a flow that started on `backend` (for least-connections).
    pub fn flow_started(&self, backend: BackendId) {
        if let Some(count) = self.live_count(backend) {
            // Relaxed: an independent counter.
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a flow on `backend` that ended (closed, expired or evicted).
    pub fn flow_ended(&self, backend: BackendId) {
        if let Some(count) = self.live_count(backend) {
            // Relaxed: an independent counter; never below zero.
            let _ = count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_sub(1));
        }
    }

    /// Sets the live flows counted on `backend` (a recount from the flow table, which also
    /// catches flows that ended by expiry or eviction, which no packet reports).
    pub fn set_live_flows(&self, backend: BackendId, flows: u64) {
        if let Some(count) = self.live_count(backend) {
            // Relaxed: an independent counter.
            count.store(flows, Ordering::Relaxed);
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

/// Services per snapshot shard: a change copies the shards it touches, not the table.
const SHARDS: usize = 256;

/// One shard of an index: Services found by a hash computed once (shard and bucket).
type Shard = HashTable<Arc<Service>>;

/// Services indexed by one key, split into [`SHARDS`] shards shared between snapshots
/// (copy on write), so that a snapshot changing a few Services copies a few shards.
#[derive(Clone, Debug)]
struct Index {
    shards: Box<[Arc<Shard>]>,
}

impl Default for Index {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Arc::new(Shard::new())).collect(),
        }
    }
}

/// Which Services have a backend at an address, port and protocol, sharded and shared
/// between snapshots like [`Index`]. It lets a backend's packet that no flow explains (after
/// a restart, or when the flow table was full) be recognised as a reply.
///
/// Every entry is plain data (`Copy`, nothing to drop), so copying a shard on write is a
/// copy of bytes and dropping one frees one allocation: with a `Vec` per entry, a change at
/// 100 000 Services x 10 endpoints took 1.7 ms instead of 0.8 ms, most of it cloning and
/// dropping shards element by element. A key is found once in `heads`, with one Service that
/// has it; a key that several Services have keeps them in a doubly linked list in `links`
/// (keyed by key and Service), so adding or removing a holder costs O(1) however many share
/// the backend (one entry per (backend, Service) pair, all under the key's hash, made 10 000
/// Services on four backends take 475 ms to index).
#[derive(Clone, Debug)]
struct BackendIndex {
    heads: Box<[Arc<HashTable<Head>>]>,
    links: Box<[Arc<HashTable<Link>>]>,
}

/// A backend key and one Service that has it.
#[derive(Clone, Copy, Debug)]
struct Head {
    key: ServiceKey,
    id: ServiceId,
}

/// A Service's place in the list of the Services that share a backend key.
#[derive(Clone, Copy, Debug)]
struct Link {
    key: ServiceKey,
    id: ServiceId,
    prev: Option<ServiceId>,
    next: Option<ServiceId>,
}

/// Shards of the backend index: ten backends a Service make it ten times the Service index,
/// so it is split finer (at 10^6 backends, ~1 000 entries a shard).
const BACKEND_SHARDS: usize = 1024;

impl Default for BackendIndex {
    fn default() -> Self {
        Self {
            heads: (0..BACKEND_SHARDS)
                .map(|_| Arc::new(HashTable::new()))
                .collect(),
            links: (0..BACKEND_SHARDS)
                .map(|_| Arc::new(HashTable::new()))
                .collect(),
        }
    }
}

fn link_hash(key: &ServiceKey, id: ServiceId) -> u64 {
    HASHER.hash_one((key, id))
}

fn backend_shard(hash: u64) -> usize {
    (hash >> 48) as usize % BACKEND_SHARDS
}

impl BackendIndex {
    /// The backend keys of `service`, each once.
    fn keys(service: &Service) -> Vec<ServiceKey> {
        let spec = service.spec();
        let mut keys: Vec<ServiceKey> = spec
            .backends
            .iter()
            .map(|b| ServiceKey {
                vip: b.endpoint,
                proto: spec.key.proto,
            })
            .collect();
        keys.sort_unstable_by_key(|k| k.vip);
        keys.dedup();
        keys
    }

    fn link(&self, key: &ServiceKey, id: ServiceId) -> Option<Link> {
        let hash = link_hash(key, id);
        self.links[backend_shard(hash)]
            .find(hash, |l| l.key == *key && l.id == id)
            .copied()
    }

    /// Inserts or replaces `link`.
    fn set_link(&mut self, link: Link) {
        let hash = link_hash(&link.key, link.id);
        let shard = Arc::make_mut(&mut self.links[backend_shard(hash)]);
        match shard.entry(
            hash,
            |l| l.key == link.key && l.id == link.id,
            |l| link_hash(&l.key, l.id),
        ) {
            Entry::Occupied(mut e) => *e.get_mut() = link,
            Entry::Vacant(e) => {
                e.insert(link);
            }
        }
    }

    fn remove_link(&mut self, key: &ServiceKey, id: ServiceId) {
        let hash = link_hash(key, id);
        let shard = Arc::make_mut(&mut self.links[backend_shard(hash)]);
        if let Ok(e) = shard.find_entry(hash, |l| l.key == *key && l.id == id) {
            e.remove();
        }
    }

    /// Makes `id` the head of `key`'s list.
    fn set_head(&mut self, key: ServiceKey, id: ServiceId) {
        let hash = key_hash(&key);
        let shard = Arc::make_mut(&mut self.heads[backend_shard(hash)]);
        match shard.entry(hash, |h| h.key == key, |h| key_hash(&h.key)) {
            Entry::Occupied(mut e) => e.get_mut().id = id,
            Entry::Vacant(e) => {
                e.insert(Head { key, id });
            }
        }
    }

    fn head(&self, key: &ServiceKey) -> Option<ServiceId> {
        let hash = key_hash(key);
        self.heads[backend_shard(hash)]
            .find(hash, |h| h.key == *key)
            .map(|h| h.id)
    }

    fn add(&mut self, service: &Service) {
        let id = service.spec().id;
        for key in Self::keys(service) {
            if let Some(old) = self.head(&key) {
                // The new holder goes first; a list of one had no links yet.
                let next = self.link(&key, old).map_or(
                    Link {
                        key,
                        id: old,
                        prev: None,
                        next: None,
                    },
                    |l| l,
                );
                self.set_link(Link {
                    prev: Some(id),
                    ..next
                });
                self.set_link(Link {
                    key,
                    id,
                    prev: None,
                    next: Some(old),
                });
            }
            self.set_head(key, id);
        }
    }

    fn remove(&mut self, service: &Service) {
        let id = service.spec().id;
        for key in Self::keys(service) {
            let Some(link) = self.link(&key, id) else {
                // A sole holder (no list) is the head.
                if self.head(&key) == Some(id) {
                    let hash = key_hash(&key);
                    let shard = Arc::make_mut(&mut self.heads[backend_shard(hash)]);
                    if let Ok(e) = shard.find_entry(hash, |h| h.key == key) {
                        e.remove();
                    }
                }
                continue;
            };
            self.remove_link(&key, id);
            match link.prev {
                Some(prev) => {
                    if let Some(p) = self.link(&key, prev) {
                        self.set_link(Link {
                            next: link.next,
                            ..p
                        });
                    }
                }
                None => {
                    if let Some(next) = link.next {
                        self.set_head(key, next);
                    }
                }
            }
            if let Some(next) = link.next {
                if let Some(n) = self.link(&key, next) {
                    self.set_link(Link {
                        prev: link.prev,
                        ..n
                    });
                }
            }
            // A list down to one holder keeps no links.
            if let Some(head) = self.head(&key) {
                if self
                    .link(&key, head)
                    .is_some_and(|h| h.prev.is_none() && h.next.is_none())
                {
                    self.remove_link(&key, head);
                }
            }
        }
    }

    fn services(&self, key: ServiceKey) -> impl Iterator<Item = ServiceId> + '_ {
        let mut next = self.head(&key);
        core::iter::from_fn(move || {
            let id = next?;
            next = self.link(&key, id).and_then(|l| l.next);
            Some(id)
        })
    }
}

/// The hasher of the indexes: fixed, so that shards built for one snapshot serve the next
/// (keys come from the control plane, not from packets, so there is nothing to flood).
const HASHER: FixedState = FixedState::with_seed(0x786c_625f_736e_6170);

/// The shard of a hash: bits hashbrown uses neither for the bucket (low bits) nor for the
/// tag (top seven bits).
#[inline]
fn shard_of(hash: u64) -> usize {
    (hash >> 48) as usize % SHARDS
}

fn key_hash(key: &ServiceKey) -> u64 {
    HASHER.hash_one(key)
}

fn id_hash(id: ServiceId) -> u64 {
    HASHER.hash_one(id)
}

impl Index {
    #[inline]
    fn get(&self, hash: u64, eq: impl Fn(&Service) -> bool) -> Option<&Arc<Service>> {
        self.shards[shard_of(hash)].find(hash, |s| eq(s))
    }

    /// Inserts `service`, returning the one it replaced (equal by `eq`).
    fn insert(
        &mut self,
        hash: u64,
        service: Arc<Service>,
        eq: impl Fn(&Service) -> bool,
        rehash: impl Fn(&Service) -> u64,
    ) -> Option<Arc<Service>> {
        let shard = Arc::make_mut(&mut self.shards[shard_of(hash)]);
        match shard.entry(hash, |s| eq(s), |s| rehash(s)) {
            Entry::Occupied(mut o) => Some(core::mem::replace(o.get_mut(), service)),
            Entry::Vacant(v) => {
                v.insert(service);
                None
            }
        }
    }

    fn remove(&mut self, hash: u64, eq: impl Fn(&Service) -> bool) -> Option<Arc<Service>> {
        let shard = &mut self.shards[shard_of(hash)];
        // Look before copying the shard: removing what is absent copies nothing.
        shard.find(hash, |s| eq(s))?;
        let shard = Arc::make_mut(shard);
        shard.find_entry(hash, |s| eq(s)).ok().map(|o| o.remove().0)
    }

    fn values(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.shards.iter().flat_map(|s| s.iter())
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
mod tests {
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
        s.flow_ended(b(1));
        s.flow_ended(b(1));
        s.flow_ended(b(1)); // never below zero
        assert_eq!(s.live_flows(b(1)), Some(0));
        assert_eq!(s.pick(0, 0).unwrap().id, b(1));
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
        let old =
            Snapshot::new(1, vec![service_at(1, 1, &[1, 2]), service_at(2, 2, &[2])]).unwrap();
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
                let mut backends: Vec<u8> =
                    (0..2 + random(3)).map(|_| 1 + random(6) as u8).collect();
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
}
