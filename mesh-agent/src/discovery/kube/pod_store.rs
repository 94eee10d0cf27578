//! The pods discovery knows, as [`PodRecord`]s keyed by namespace and name, kept from the Pod
//! watcher's events in place of a kube-rs reflector store: a reflector keeps every object whole
//! (its `ObjectMeta` alone is ~400 bytes, its key another copy of the names), which at 100,000
//! pods was most of the agent's memory in Kubernetes mode (issue #19). A re-list is buffered
//! and replaces the store when complete, as the reflector does: pods absent from the new list
//! are gone.
use std::{
    hash::BuildHasher as _,
    sync::{Mutex, PoisonError},
};

use hashbrown::HashTable;
use kube::runtime::watcher::Event;

use super::pod::{PodRecord, PodView};

/// The records, shared between the Pod watcher (writes) and the snapshot builder (reads).
pub struct PodStore {
    /// The agent's node: only its pods keep their uid (see [`PodRecord::of`]).
    node: String,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    hasher: std::hash::RandomState,
    pods: HashTable<PodRecord>,
    /// A re-list in progress: the records listed so far.
    relisting: Option<HashTable<PodRecord>>,
}

impl Inner {
    fn hash(&self, namespace: &str, name: &str) -> u64 {
        self.hasher.hash_one((namespace, name))
    }
}

fn same(namespace: &str, name: &str) -> impl Fn(&PodRecord) -> bool {
    move |r| r.namespace == namespace && r.name == name
}

/// Sets (or with None removes) the record of `namespace/name` in `table`.
fn set(
    table: &mut HashTable<PodRecord>,
    hash: u64,
    rehash: impl Fn(&PodRecord) -> u64,
    namespace: &str,
    name: &str,
    record: Option<PodRecord>,
) {
    let entry = table.entry(hash, same(namespace, name), rehash);
    match (entry, record) {
        (hashbrown::hash_table::Entry::Occupied(mut o), Some(r)) => *o.get_mut() = r,
        (hashbrown::hash_table::Entry::Occupied(o), None) => {
            o.remove();
        }
        (hashbrown::hash_table::Entry::Vacant(v), Some(r)) => {
            v.insert(r);
        }
        (hashbrown::hash_table::Entry::Vacant(_), None) => {}
    }
}

impl PodStore {
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies one watcher event.
    pub fn apply(&self, event: &Event<PodView>) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let rehash = {
            let hasher = inner.hasher.clone();
            move |r: &PodRecord| hasher.hash_one((r.namespace.as_str(), r.name.as_str()))
        };
        let (view, table, delete) = match event {
            Event::Init => {
                inner.relisting = Some(HashTable::new());
                return;
            }
            Event::InitDone => {
                if let Some(mut listed) = inner.relisting.take() {
                    listed.shrink_to_fit(&rehash);
                    inner.pods = listed;
                }
                return;
            }
            Event::InitApply(view) => {
                let Some(listed) = inner.relisting.as_mut() else {
                    return;
                };
                (view, listed, false)
            }
            Event::Apply(view) => (view, &mut inner.pods, false),
            Event::Delete(view) => (view, &mut inner.pods, true),
        };
        let meta = &view.metadata;
        let (namespace, name) = (
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default(),
        );
        let record = if delete {
            None
        } else {
            PodRecord::of(view, &self.node)
        };
        let hash = inner.hasher.hash_one((namespace, name));
        set(table, hash, rehash, namespace, name, record);
    }

    /// The record of `namespace/name` (None: no such pod, or one that makes no workload).
    pub fn get(&self, namespace: &str, name: &str) -> Option<PodRecord> {
        let inner = self.lock();
        let hash = inner.hash(namespace, name);
        inner.pods.find(hash, same(namespace, name)).cloned()
    }

    /// Every record (copies: the names and labels they hold are shared, not copied).
    pub fn state(&self) -> Vec<PodRecord> {
        self.lock().pods.iter().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        let store = PodStore::new("node1");
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
        let store = PodStore::new("node1");
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
