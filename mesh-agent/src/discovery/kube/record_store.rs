//! Pods and Services as discovery keeps them: records (`PodRecord`, `ServiceRecord`) of what
//! the configuration is made of, keyed by namespace and name, kept from the watcher's events
//! in place of a kube-rs reflector store. A reflector keeps every object whole (its
//! `ObjectMeta` alone is ~400 bytes, its key another copy of the names), which at 100,000 pods
//! was most of the agent's memory in Kubernetes mode (issue #19). A re-list is buffered and
//! replaces the store when complete, as the reflector does: objects absent from the new list
//! are gone.
use std::{
    hash::BuildHasher as _,
    sync::{Mutex, PoisonError},
};

use hashbrown::{HashTable, hash_table::Entry};
use kube::runtime::watcher::Event;

use super::pod::{PodRecord, PodView};
use super::service::{ServiceRecord, ServiceView};

/// A record's key.
pub trait Keyed {
    fn namespace(&self) -> &str;
    fn name(&self) -> &str;
}

/// The pods that make workloads.
pub type PodStore = RecordStore<PodView, PodRecord>;
/// The Services.
pub type ServiceStore = RecordStore<ServiceView, ServiceRecord>;

type Make<V, R> = Box<dyn Fn(&V) -> Option<R> + Send + Sync>;

/// The records, shared between a watcher (writes) and the snapshot builder (reads).
pub struct RecordStore<V, R> {
    /// A view's record (None: nothing of it is kept).
    make: Make<V, R>,
    inner: Mutex<Inner<R>>,
}

struct Inner<R> {
    hasher: std::hash::RandomState,
    live: HashTable<R>,
    /// A re-list in progress: the records listed so far.
    relisting: Option<HashTable<R>>,
}

fn same<R: Keyed>(namespace: &str, name: &str) -> impl Fn(&R) -> bool {
    move |r| r.namespace() == namespace && r.name() == name
}

impl<V: kube::Resource, R: Keyed + Clone> RecordStore<V, R> {
    pub fn new(make: impl Fn(&V) -> Option<R> + Send + Sync + 'static) -> Self {
        Self {
            make: Box::new(make),
            inner: Mutex::new(Inner {
                hasher: std::hash::RandomState::new(),
                live: HashTable::new(),
                relisting: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<R>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies one watcher event.
    pub fn apply(&self, event: &Event<V>) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let rehash = {
            let hasher = inner.hasher.clone();
            move |r: &R| hasher.hash_one((r.namespace(), r.name()))
        };
        let (view, table, delete) = match event {
            Event::Init => {
                inner.relisting = Some(HashTable::new());
                return;
            }
            Event::InitDone => {
                if let Some(mut listed) = inner.relisting.take() {
                    listed.shrink_to_fit(&rehash);
                    inner.live = listed;
                }
                return;
            }
            Event::InitApply(view) => {
                let Some(listed) = inner.relisting.as_mut() else {
                    return;
                };
                (view, listed, false)
            }
            Event::Apply(view) => (view, &mut inner.live, false),
            Event::Delete(view) => (view, &mut inner.live, true),
        };
        let meta = view.meta();
        let (namespace, name) = (
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default(),
        );
        let record = if delete { None } else { (self.make)(view) };
        let hash = inner.hasher.hash_one((namespace, name));
        match (table.entry(hash, same(namespace, name), rehash), record) {
            (Entry::Occupied(mut o), Some(r)) => *o.get_mut() = r,
            (Entry::Occupied(o), None) => {
                o.remove();
            }
            (Entry::Vacant(v), Some(r)) => {
                v.insert(r);
            }
            (Entry::Vacant(_), None) => {}
        }
    }

    /// The record of `namespace/name` (None: no such object, or one not kept).
    pub fn get(&self, namespace: &str, name: &str) -> Option<R> {
        let inner = self.lock();
        let hash = inner.hasher.hash_one((namespace, name));
        inner.live.find(hash, same(namespace, name)).cloned()
    }

    /// Every record (copies: the names and labels they hold are shared, not copied).
    pub fn state(&self) -> Vec<R> {
        self.lock().live.iter().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PodStore {
    /// The pod store of the agent on `node` (only its own pods keep their uid).
    pub fn for_node(node: &str) -> Self {
        let node = node.to_owned();
        Self::new(move |view| PodRecord::of(view, &node))
    }
}

impl ServiceStore {
    pub fn services() -> Self {
        Self::new(ServiceRecord::of)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, phase: &str) -> PodView {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "n"},
            "spec": {"nodeName": "node2"},
            "status": {"phase": phase, "podIP": "10.0.0.1"}
        }))
        .unwrap()
    }

    fn names(store: &PodStore) -> Vec<String> {
        let mut all: Vec<String> = store.state().iter().map(PodRecord::key).collect();
        all.sort();
        all
    }

    /// Applies, deletes and pods that stop making a workload, as the watcher reports them.
    #[test]
    fn events_keep_the_records_of_live_pods() {
        let store = PodStore::for_node("node1");
        store.apply(&Event::Apply(pod("a", "Running")));
        store.apply(&Event::Apply(pod("b", "Running")));
        assert_eq!(names(&store), ["n/a", "n/b"]);
        assert_eq!(store.get("n", "a").unwrap().node, "node2");
        assert!(store.get("n", "c").is_none() && store.get("m", "a").is_none());
        // Finished: no longer a workload, so no longer kept.
        store.apply(&Event::Apply(pod("a", "Succeeded")));
        assert_eq!(names(&store), ["n/b"]);
        store.apply(&Event::Delete(pod("b", "Running")));
        assert!(store.is_empty());
        // Deleting what is not there is nothing.
        store.apply(&Event::Delete(pod("z", "Running")));
        assert!(store.is_empty());
    }

    /// A re-list replaces the store when it is done: pods missing from it are gone, and until
    /// it is done readers see the previous contents.
    #[test]
    fn a_relist_replaces_the_store_when_done() {
        let store = PodStore::for_node("node1");
        for name in ["a", "b"] {
            store.apply(&Event::Apply(pod(name, "Running")));
        }
        store.apply(&Event::Init);
        store.apply(&Event::InitApply(pod("b", "Running")));
        store.apply(&Event::InitApply(pod("c", "Running")));
        store.apply(&Event::InitApply(pod("d", "Failed")));
        assert_eq!(names(&store), ["n/a", "n/b"], "the old contents until done");
        store.apply(&Event::InitDone);
        assert_eq!(names(&store), ["n/b", "n/c"]);
        // An InitApply outside a re-list (never sent) is ignored rather than half-applied.
        store.apply(&Event::InitApply(pod("e", "Running")));
        assert_eq!(names(&store), ["n/b", "n/c"]);
    }
}
