//! The snapshot's indexes: Services by key and by id, and the Services of each backend, in
//! shards shared between snapshots (copy on write), so that a snapshot changing a few
//! Services copies a few shards. Their hasher is fixed, so that shards built for one snapshot
//! serve the next.

use std::sync::Arc;

use core::hash::BuildHasher;

use foldhash::fast::FixedState;
use hashbrown::hash_table::Entry;
use hashbrown::HashTable;

use super::{Service, ServiceId, ServiceKey};

/// Services per snapshot shard: a change copies the shards it touches, not the table.
pub(super) const SHARDS: usize = 256;

/// One shard of an index: Services found by a hash computed once (shard and bucket).
pub(super) type Shard = HashTable<Arc<Service>>;

/// Services indexed by one key, split into [`SHARDS`] shards shared between snapshots
/// (copy on write), so that a snapshot changing a few Services copies a few shards.
#[derive(Clone, Debug)]
pub(super) struct Index {
    pub(super) shards: Box<[Arc<Shard>]>,
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
pub(super) struct BackendIndex {
    pub(super) heads: Box<[Arc<HashTable<Head>>]>,
    pub(super) links: Box<[Arc<HashTable<Link>>]>,
}

/// A backend key and one Service that has it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Head {
    key: ServiceKey,
    id: ServiceId,
}

/// A Service's place in the list of the Services that share a backend key.
#[derive(Clone, Copy, Debug)]
pub(super) struct Link {
    key: ServiceKey,
    id: ServiceId,
    prev: Option<ServiceId>,
    next: Option<ServiceId>,
}

/// Shards of the backend index: ten backends a Service make it ten times the Service index,
/// so it is split finer (at 10^6 backends, ~1 000 entries a shard).
pub(super) const BACKEND_SHARDS: usize = 1024;

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

pub(super) fn link_hash(key: &ServiceKey, id: ServiceId) -> u64 {
    HASHER.hash_one((key, id))
}

pub(super) fn backend_shard(hash: u64) -> usize {
    (hash >> 48) as usize % BACKEND_SHARDS
}

impl BackendIndex {
    /// The backend keys of `service`, each once.
    pub(super) fn keys(service: &Service) -> Vec<ServiceKey> {
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

    pub(super) fn link(&self, key: &ServiceKey, id: ServiceId) -> Option<Link> {
        let hash = link_hash(key, id);
        self.links[backend_shard(hash)]
            .find(hash, |l| l.key == *key && l.id == id)
            .copied()
    }

    /// Inserts or replaces `link`.
    pub(super) fn set_link(&mut self, link: Link) {
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

    pub(super) fn remove_link(&mut self, key: &ServiceKey, id: ServiceId) {
        let hash = link_hash(key, id);
        let shard = Arc::make_mut(&mut self.links[backend_shard(hash)]);
        if let Ok(e) = shard.find_entry(hash, |l| l.key == *key && l.id == id) {
            e.remove();
        }
    }

    /// Makes `id` the head of `key`'s list.
    pub(super) fn set_head(&mut self, key: ServiceKey, id: ServiceId) {
        let hash = key_hash(&key);
        let shard = Arc::make_mut(&mut self.heads[backend_shard(hash)]);
        match shard.entry(hash, |h| h.key == key, |h| key_hash(&h.key)) {
            Entry::Occupied(mut e) => e.get_mut().id = id,
            Entry::Vacant(e) => {
                e.insert(Head { key, id });
            }
        }
    }

    pub(super) fn head(&self, key: &ServiceKey) -> Option<ServiceId> {
        let hash = key_hash(key);
        self.heads[backend_shard(hash)]
            .find(hash, |h| h.key == *key)
            .map(|h| h.id)
    }

    pub(super) fn add(&mut self, service: &Service) {
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

    pub(super) fn remove(&mut self, service: &Service) {
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

    pub(super) fn services(&self, key: ServiceKey) -> impl Iterator<Item = ServiceId> + '_ {
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
pub(super) const HASHER: FixedState = FixedState::with_seed(0x786c_625f_736e_6170);

/// The shard of a hash: bits hashbrown uses neither for the bucket (low bits) nor for the
/// tag (top seven bits).
#[inline]
pub(super) fn shard_of(hash: u64) -> usize {
    (hash >> 48) as usize % SHARDS
}

pub(super) fn key_hash(key: &ServiceKey) -> u64 {
    HASHER.hash_one(key)
}

pub(super) fn id_hash(id: ServiceId) -> u64 {
    HASHER.hash_one(id)
}

impl Index {
    #[inline]
    pub(super) fn get(&self, hash: u64, eq: impl Fn(&Service) -> bool) -> Option<&Arc<Service>> {
        self.shards[shard_of(hash)].find(hash, |s| eq(s))
    }

    /// Inserts `service`, returning the one it replaced (equal by `eq`).
    pub(super) fn insert(
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

    pub(super) fn remove(
        &mut self,
        hash: u64,
        eq: impl Fn(&Service) -> bool,
    ) -> Option<Arc<Service>> {
        let shard = &mut self.shards[shard_of(hash)];
        // Look before copying the shard: removing what is absent copies nothing.
        shard.find(hash, |s| eq(s))?;
        let shard = Arc::make_mut(shard);
        shard.find_entry(hash, |s| eq(s)).ok().map(|o| o.remove().0)
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.shards.iter().flat_map(|s| s.iter())
    }
}
