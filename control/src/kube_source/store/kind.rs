//! One kind of watched object as stored (Services, EndpointSlices or Nodes): each object's
//! digest with its resourceVersion, and a relist in progress that replaces them whole when it
//! is done, so that a relist never shows a moment without the objects it lists again; a
//! malformed object keeps its last good version.

use std::sync::Arc;
use std::time::Instant;

use hashbrown::{HashMap, HashSet};
use kube::Resource;

use super::{obj_key, Complaints, Event, Lenient, ObjKey, Source};
use crate::kube_source::KubeMetrics;
use crate::kubernetes::Warning;

/// An object as stored: its resourceVersion (to tell a relisted object from a changed one)
/// and its digest.
#[derive(Debug)]
pub(super) struct Stored<V> {
    pub(super) version: Option<Box<str>>,
    pub(super) view: V,
}

/// One kind of object as stored: the current digests, and those of a relist in progress
/// (which replace them whole when the relist is done).
#[derive(Debug)]
pub(super) struct Kind<V> {
    pub(super) source: Source,
    pub(super) objects: HashMap<ObjKey, Stored<V>>,
    pub(super) relist: Option<Relist<V>>,
    pub(super) listed: bool,
}

/// A relist in progress: when it started, what it has listed, and the malformed objects it
/// met that had no good version to keep.
#[derive(Debug)]
pub(super) struct Relist<V> {
    pub(super) started: Instant,
    pub(super) objects: HashMap<ObjKey, Stored<V>>,
    pub(super) malformed: HashSet<ObjKey>,
}

impl<V> Kind<V> {
    pub(super) fn new(source: Source) -> Self {
        Self {
            source,
            objects: HashMap::new(),
            relist: None,
            listed: false,
        }
    }
}

/// A stored object changed: its key, and the Service it belonged to before and belongs to
/// after (for a Service, itself; for an EndpointSlice, the Service its label names).
pub(super) type Moved = (ObjKey, Option<ObjKey>, Option<ObjKey>);

/// A digest that knows the Service its object (stored under `key`) belongs to.
pub(super) trait Owned {
    fn owner(&self, key: &ObjKey) -> Option<ObjKey>;
}

impl<V: Owned> Kind<V> {
    /// Applies a watch event that arrived at `now` to the store and says what changed, and
    /// since when (for a relist, since it started). `digest` makes an object's digest and
    /// says what is wrong with it; an object that did not decode keeps its last good version.
    pub(super) fn event<K: Resource<DynamicType = ()>>(
        &mut self,
        event: Event<Lenient<K>>,
        now: Instant,
        mut digest: impl FnMut(&K) -> (V, Vec<Warning>),
        complaints: &mut Complaints,
        m: &KubeMetrics,
    ) -> (Vec<Moved>, Instant) {
        let source = self.source;
        let mut decode = |l: Lenient<K>| -> Result<(ObjKey, Stored<V>), ObjKey> {
            match l.object {
                Ok(o) => {
                    let (view, warnings) = digest(&o);
                    let k = obj_key(o.meta());
                    complaints.set(source, &k, warnings, m);
                    let version = o.meta().resource_version.as_deref().map(Box::from);
                    Ok((k, Stored { version, view }))
                }
                Err(e) => {
                    let k = obj_key(&l.meta);
                    let warning = Warning {
                        object: k.to_string(),
                        kind: "malformed",
                        message: format!(
                            "malformed object skipped; its last good version stays: {e}"
                        ),
                    };
                    complaints.set(source, &k, vec![warning], m);
                    Err(k)
                }
            }
        };
        match event {
            Event::Apply(l) => match decode(l) {
                Ok((k, stored)) => {
                    let after = stored.view.owner(&k);
                    let before = self.objects.insert(Arc::clone(&k), stored);
                    (
                        vec![(k.clone(), before.and_then(|b| b.view.owner(&k)), after)],
                        now,
                    )
                }
                Err(_) => (Vec::new(), now),
            },
            Event::Delete(l) => {
                let k = obj_key(Resource::meta(&l));
                complaints.set(source, &k, Vec::new(), m);
                match self.objects.remove(&k) {
                    Some(before) => (vec![(k.clone(), before.view.owner(&k), None)], now),
                    None => (Vec::new(), now),
                }
            }
            Event::Init => {
                self.relist = Some(Relist {
                    started: now,
                    objects: HashMap::new(),
                    malformed: HashSet::new(),
                });
                (Vec::new(), now)
            }
            Event::InitApply(l) => {
                let decoded = decode(l);
                let relist = self.relist.get_or_insert_with(|| Relist {
                    started: now,
                    objects: HashMap::new(),
                    malformed: HashSet::new(),
                });
                match decoded {
                    Ok((k, stored)) => {
                        relist.objects.insert(k, stored);
                    }
                    Err(k) => match self.objects.remove(&k) {
                        // A malformed object keeps its last good version through a relist.
                        Some(old) => {
                            relist.objects.insert(k, old);
                        }
                        None => {
                            relist.malformed.insert(k);
                        }
                    },
                }
                (Vec::new(), now)
            }
            Event::InitDone => {
                self.listed = true;
                let Relist {
                    started,
                    objects: fresh,
                    malformed,
                } = self.relist.take().unwrap_or(Relist {
                    started: now,
                    objects: HashMap::new(),
                    malformed: HashSet::new(),
                });
                complaints.retain(
                    source,
                    |k| fresh.contains_key(k) || malformed.contains(k),
                    m,
                );
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
                (changed, started)
            }
        }
    }
}
