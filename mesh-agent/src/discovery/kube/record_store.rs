//! Services as discovery keeps them: records (`ServiceRecord`) of what the configuration is
//! made of, keyed by namespace and name, kept from the watcher's events in place of a kube-rs
//! reflector store; the table of records is the pod store's too (`pod_store.rs`). A reflector keeps every object whole (its
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

use super::service::{ServiceRecord, ServiceView};

/// A record's key.
pub trait Keyed {
    fn namespace(&self) -> &str;
    fn name(&self) -> &str;
}

/// The Services.
pub type ServiceStore = RecordStore<ServiceView, ServiceRecord>;

type Make<V, R> = Box<dyn Fn(&V) -> Option<R> + Send + Sync>;

/// Records by namespace and name, without a stored key (the record's own fields are it).
pub struct Table<R> {
    hasher: std::hash::RandomState,
    records: HashTable<R>,
}

impl<R: Keyed> Default for Table<R> {
    fn default() -> Self {
        Self {
            hasher: std::hash::RandomState::new(),
            records: HashTable::new(),
        }
    }
}

fn same<R: Keyed>(namespace: &str, name: &str) -> impl Fn(&R) -> bool {
    move |r| r.namespace() == namespace && r.name() == name
}

impl<R: Keyed> Table<R> {
    /// Puts `record` as `namespace/name`'s (None: removes it); whether there was one before.
    pub fn put(&mut self, namespace: &str, name: &str, record: Option<R>) -> bool {
        let hasher = self.hasher.clone();
        let rehash = move |r: &R| hasher.hash_one((r.namespace(), r.name()));
        let hash = self.hasher.hash_one((namespace, name));
        match (
            self.records.entry(hash, same(namespace, name), rehash),
            record,
        ) {
            (Entry::Occupied(mut o), Some(r)) => *o.get_mut() = r,
            (Entry::Occupied(o), None) => {
                o.remove();
            }
            (Entry::Vacant(v), Some(r)) => {
                v.insert(r);
                return false;
            }
            (Entry::Vacant(_), None) => return false,
        }
        true
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&R> {
        let hash = self.hasher.hash_one((namespace, name));
        self.records.find(hash, same(namespace, name))
    }

    pub fn iter(&self) -> impl Iterator<Item = &R> {
        self.records.iter()
    }

    /// Keeps the records `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&R) -> bool) {
        self.records.retain(|r| keep(r));
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Shrinks the table once it uses less than a quarter of its room (a burst of changes
    /// kept for a moment, then dropped).
    pub fn shrink_if_sparse(&mut self) {
        if self.records.capacity() > 64 && self.records.len() * 4 < self.records.capacity() {
            self.shrink_to_fit();
        }
    }

    /// Gives back what a table grown by a list or emptied by pruning no longer uses.
    pub fn shrink_to_fit(&mut self) {
        let hasher = self.hasher.clone();
        self.records
            .shrink_to_fit(move |r| hasher.hash_one((r.namespace(), r.name())));
    }
}

/// The records, shared between a watcher (writes) and the snapshot builder (reads).
pub struct RecordStore<V, R> {
    /// A view's record (None: nothing of it is kept).
    make: Make<V, R>,
    inner: Mutex<Inner<R>>,
}

struct Inner<R> {
    live: Table<R>,
    /// A re-list in progress: the records listed so far.
    relisting: Option<Table<R>>,
}

/// A watched object's namespace and name.
pub fn key_of<V: kube::Resource>(view: &V) -> (&str, &str) {
    let meta = view.meta();
    (
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
    )
}

impl<V: kube::Resource, R: Keyed + Clone> RecordStore<V, R> {
    pub fn new(make: impl Fn(&V) -> Option<R> + Send + Sync + 'static) -> Self {
        Self {
            make: Box::new(make),
            inner: Mutex::new(Inner {
                live: Table::default(),
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
        let (view, table, delete) = match event {
            Event::Init => {
                inner.relisting = Some(Table::default());
                return;
            }
            Event::InitDone => {
                if let Some(mut listed) = inner.relisting.take() {
                    listed.shrink_to_fit();
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
        let (namespace, name) = key_of(view);
        let record = if delete { None } else { (self.make)(view) };
        table.put(namespace, name, record);
    }

    /// The record of `namespace/name` (None: no such object, or one not kept).
    pub fn get(&self, namespace: &str, name: &str) -> Option<R> {
        self.lock().live.get(namespace, name).cloned()
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

impl ServiceStore {
    pub fn services() -> Self {
        Self::new(ServiceRecord::of)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::kube::{PodRecord, PodView};

    /// The generic store, on pods (whose own store, `pod_store.rs`, adds to it).
    type PodStore = RecordStore<PodView, PodRecord>;

    fn store() -> PodStore {
        PodStore::new(|v| PodRecord::of(v, "node1"))
    }

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
        let store = store();
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
        let store = store();
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
