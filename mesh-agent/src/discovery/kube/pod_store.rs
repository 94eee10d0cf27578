//! The pods discovery knows, kept only where the configuration in force does not already say
//! them (issue #19). A remote pod's workload is a function of its record alone
//! ([`PodRecord::standalone_workload`]), so once the agent holds that workload the record is
//! dropped and read back from the workload whenever a build needs it: at 100,000 pods, records
//! kept beside the workloads built from them cost ~140 bytes a pod. Kept: this node's pods
//! (their interface is found by uid), pods being deleted, pods whose workload is not their
//! record's (a label ignored, an address lost to another pod), and every change the agent has
//! not applied yet.
//!
//! So the store is an overlay on the configuration in force: a pod is its kept record, else
//! nothing if it went away since (`gone`), else its workload there. After a re-list the kept
//! records are the whole truth (the configuration may hold pods the list no longer has) until
//! a configuration built from that list is in force.
use std::sync::{Mutex, MutexGuard, PoisonError};

use kube::runtime::watcher::Event;

use super::{
    pod::{PodRecord, PodView, needs_locating},
    record_store::{Table, key_of},
};
use crate::{
    discovery::{LocalConfig, Workload},
    names::{Name, intern},
};

/// A pod's namespace and name.
#[derive(Clone, Debug, PartialEq)]
struct PodKey {
    namespace: Name,
    name: Name,
}

keyed_by_fields!(PodKey);

impl PodKey {
    fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: intern(namespace),
            name: name.into(),
        }
    }
}

/// The pods, shared between the Pod watcher (writes) and the discovery's rounds (reads).
pub struct PodStore {
    /// This node: its pods' records are always kept.
    node: Name,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The records the configuration in force does not stand in for (see the module).
    kept: Table<PodRecord>,
    /// Pods deleted (or no longer making a workload) whose workload the configuration in force
    /// may still hold: they are not read back from it.
    gone: Table<PodKey>,
    /// Pods changed since the configuration in force was last compared with the store.
    unsettled: Table<PodKey>,
    /// The pods the last full build left out because another pod won their address.
    lost_address: Vec<PodKey>,
    /// A re-list in progress: the records listed so far.
    relisting: Option<Table<PodRecord>>,
    /// Whether the configuration in force stands in for pods not kept. False after a list,
    /// until a configuration built from it is in force.
    overlay: bool,
    /// Lists completed so far.
    lists: u64,
    /// The list the last full build read the records of (while not overlaid).
    built_from: Option<u64>,
}

impl Inner {
    /// Pod `view` changed (its record now `record`; None: deleted, or no longer a workload).
    fn changed(&mut self, view: &PodView, record: Option<PodRecord>) {
        let (namespace, name) = key_of(view);
        let key = PodKey::new(namespace, name);
        let gone = record.is_none().then(|| key.clone());
        self.gone.put(namespace, name, gone);
        self.kept.put(namespace, name, record);
        self.unsettled.put(namespace, name, Some(key));
    }
}

impl PodStore {
    /// The pod store of the agent on `node`.
    pub fn for_node(node: &str) -> Self {
        Self {
            node: intern(node),
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies one watcher event.
    pub fn apply(&self, event: &Event<PodView>) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        match event {
            Event::Init => inner.relisting = Some(Table::default()),
            Event::InitApply(view) => {
                if let Some(listed) = inner.relisting.as_mut() {
                    let (namespace, name) = key_of(view);
                    listed.put(namespace, name, PodRecord::of(view, &self.node));
                }
            }
            Event::InitDone => {
                if let Some(mut listed) = inner.relisting.take() {
                    listed.shrink_to_fit();
                    inner.kept = listed;
                    inner.gone = Table::default();
                    inner.unsettled = Table::default();
                    inner.overlay = false;
                    inner.lists += 1;
                }
            }
            Event::Apply(view) => inner.changed(view, PodRecord::of(view, &self.node)),
            Event::Delete(view) => inner.changed(view, None),
        }
    }

    /// The record of `namespace/name` (None: no such pod, or one that makes no workload), with
    /// `config` the configuration in force.
    pub fn get(
        &self,
        namespace: &str,
        name: &str,
        config: Option<&LocalConfig>,
    ) -> Option<PodRecord> {
        let inner = self.lock();
        if let Some(r) = inner.kept.get(namespace, name) {
            return Some(r.clone());
        }
        if !inner.overlay || inner.gone.get(namespace, name).is_some() {
            return None;
        }
        let w = config?.workload_named(namespace, name)?;
        self.stands_in(w).then(|| PodRecord::from_workload(w))
    }

    /// Whether `w` is of a pod whose record its workload can stand in for.
    fn stands_in(&self, w: &Workload) -> bool {
        !needs_locating(&w.node, w.host_network, &self.node)
    }

    /// Every pod's record, with `config` the configuration in force. The caller builds a
    /// configuration from them and publishes it.
    pub fn state(&self, config: Option<&LocalConfig>) -> Vec<PodRecord> {
        let mut inner = self.lock();
        let mut out: Vec<PodRecord> = inner.kept.iter().cloned().collect();
        if !inner.overlay {
            inner.built_from = Some(inner.lists);
            return out;
        }
        let Some(config) = config else { return out };
        out.extend(
            config
                .workloads
                .iter()
                .filter(|w| {
                    self.stands_in(w)
                        && inner.kept.get(&w.namespace, &w.name).is_none()
                        && inner.gone.get(&w.namespace, &w.name).is_none()
                })
                .map(PodRecord::from_workload),
        );
        out
    }

    /// Notes the pods a full build left out because another pod won their address, and keeps
    /// their records: the configuration it makes does not have them, so it cannot stand in
    /// for them.
    pub fn lost_address<'a>(&self, left_out: impl IntoIterator<Item = &'a PodRecord>) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        // The pods that lost before may have their address now: compared again at the next
        // settle, as the new ones are.
        for key in std::mem::take(&mut inner.lost_address) {
            inner
                .unsettled
                .put(&key.namespace, &key.name, Some(key.clone()));
        }
        for r in left_out {
            let (namespace, name) = (&*r.namespace, &*r.name);
            let key = PodKey::new(namespace, name);
            inner.lost_address.push(key.clone());
            inner.unsettled.put(namespace, name, Some(key));
            if inner.kept.get(namespace, name).is_none()
                && inner.gone.get(namespace, name).is_none()
            {
                inner.kept.put(namespace, name, Some(r.clone()));
            }
            // Otherwise kept already, or changed since it was read: the newer state stays.
        }
    }

    /// The addresses of pods the last full build left out because another pod won them: a
    /// delta that frees one needs a full build to hand it over.
    pub fn lost_addresses(&self) -> Vec<std::net::IpAddr> {
        let inner = self.lock();
        inner
            .lost_address
            .iter()
            .filter_map(|k| inner.kept.get(&k.namespace, &k.name))
            .flat_map(|r| r.ips.iter().copied())
            .collect()
    }

    /// Drops what `config`, the configuration in force with everything published applied,
    /// now says: records its workloads stand in for, and pods gone from it.
    pub fn settle(&self, config: &LocalConfig) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let node = &self.node;
        // The configuration says `r` as it is.
        let said = |r: &PodRecord, standalone: &Workload| {
            config.workload_named(&r.namespace, &r.name) == Some(standalone)
        };
        if !inner.overlay {
            if inner.built_from != Some(inner.lists) {
                return; // no configuration built from the latest list is in force yet
            }
            // The first settle after a list: every record is compared once.
            inner.kept.retain(|r| {
                !r.standalone_workload(node)
                    .is_some_and(|standalone| said(r, &standalone))
            });
            inner.overlay = true;
        }
        let unsettled = std::mem::take(&mut inner.unsettled);
        for key in unsettled.iter() {
            let (namespace, name) = (&*key.namespace, &*key.name);
            let settled = match inner.kept.get(namespace, name) {
                Some(r) => match r.standalone_workload(node) {
                    // This node's pods and the like are kept for good.
                    None => true,
                    Some(standalone) => {
                        let said = said(r, &standalone);
                        if said {
                            inner.kept.put(namespace, name, None);
                        }
                        // Otherwise a change not applied yet, or an address lost: again next
                        // time.
                        said
                    }
                },
                None => {
                    let left = config.workload_named(namespace, name).is_none();
                    if left {
                        inner.gone.put(namespace, name, None);
                    }
                    left
                }
            };
            if !settled {
                inner.unsettled.put(namespace, name, Some(key.clone()));
            }
        }
        inner.kept.shrink_if_sparse();
        inner.gone.shrink_if_sparse();
        inner.unsettled.shrink_if_sparse();
    }

    /// How many records are kept (the rest are the configuration's workloads).
    pub fn kept(&self) -> usize {
        self.lock().kept.len()
    }
}

#[cfg(test)]
#[path = "pod_store_tests.rs"]
mod tests;
