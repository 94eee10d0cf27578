//! The EndpointSlices discovery knows, filed under the Service each belongs to, kept from the
//! watcher's events in place of a kube-rs reflector store: a Service's slices are found
//! without scanning them all (a change to one Service's endpoints costs that Service, not the
//! cluster's), and a slice costs its endpoints and ports, not a whole object with its metadata
//! and labels (issue #19). Slices without a Service label are not kept: nothing reads them.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Mutex, PoisonError},
};

use kube::runtime::watcher::Event;

use super::slice::{EndpointSliceView, SlicePort};
use crate::names::{Name, intern};

/// A Service, `(namespace, name)`.
pub type ServiceKey = (Name, Name);

/// What a Service's endpoints are read from: one slice's ready addresses, its terminating but
/// serving ones (the fallback when no slice of the Service has a ready one) and its ports.
/// Other endpoints are not kept (nothing reads them), and addresses are kept flat: an endpoint
/// with its conditions took ~40 bytes, an address takes 17 (issue #19).
#[derive(Clone, Debug, PartialEq)]
pub struct SliceRecord {
    /// The slice's own name.
    pub name: Name,
    /// The addresses of its endpoints that are ready (or do not say).
    pub ready: Box<[IpAddr]>,
    /// The addresses of its endpoints that terminate but still serve.
    pub terminating: Box<[IpAddr]>,
    pub ports: Box<[SlicePort]>,
}

impl SliceRecord {
    fn of(name: Name, view: &EndpointSliceView) -> Self {
        Self {
            name,
            ready: view
                .endpoints
                .iter()
                .filter(|e| e.is_ready())
                .flat_map(|e| e.addresses.iter().copied())
                .collect(),
            terminating: view
                .endpoints
                .iter()
                .filter(|e| !e.is_ready() && e.is_serving_terminating())
                .flat_map(|e| e.addresses.iter().copied())
                .collect(),
            ports: view.ports.clone().into_boxed_slice(),
        }
    }
}

#[derive(Default)]
struct Tables {
    by_service: HashMap<ServiceKey, Vec<SliceRecord>>,
    /// `(namespace, slice)` → its Service: a slice is removed (or moves) by its own name.
    service_of: HashMap<(Name, Name), Name>,
}

impl Tables {
    /// Removes the slice `namespace/slice`; the Service it belonged to.
    fn remove(&mut self, namespace: &Name, slice: &Name) -> Option<Name> {
        let service = self
            .service_of
            .remove(&(namespace.clone(), slice.clone()))?;
        let key = (namespace.clone(), service);
        if let Some(list) = self.by_service.get_mut(&key) {
            list.retain(|r| r.name != *slice);
            if list.is_empty() {
                self.by_service.remove(&key);
            }
        }
        Some(key.1)
    }

    /// Files `view` under its Service (replacing its earlier version); the Service it left,
    /// if it belonged to another one before (or now to none).
    fn put(&mut self, view: &EndpointSliceView) -> Option<ServiceKey> {
        let meta = &view.metadata;
        let namespace = intern(meta.namespace.as_deref().unwrap_or_default());
        let name = Name::from(meta.name.as_deref().unwrap_or_default());
        let before = self.remove(&namespace, &name);
        let service = view.service().map(|(_, service)| intern(&service));
        let left = before
            .filter(|b| service.as_ref() != Some(b))
            .map(|b| (namespace.clone(), b));
        let Some(service) = service else {
            return left;
        };
        let record = SliceRecord::of(name.clone(), view);
        let list = self
            .by_service
            .entry((namespace.clone(), service.clone()))
            .or_default();
        // Most Services have one slice: no room for four (what a first push reserves).
        list.reserve_exact(1);
        list.push(record);
        self.service_of.insert((namespace, name), service);
        left
    }
}

#[derive(Default)]
struct Inner {
    live: Tables,
    /// A re-list in progress: what was listed so far (replaces `live` when done).
    relisting: Option<Tables>,
}

/// The slices, shared between the EndpointSlice watcher (writes) and the builders (reads).
#[derive(Default)]
pub struct SliceStore {
    inner: Mutex<Inner>,
}

impl SliceStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies one watcher event; the Service a slice left (relabelled, label removed or
    /// deleted), which the event itself may not name.
    pub fn apply(&self, event: &Event<EndpointSliceView>) -> Option<ServiceKey> {
        let mut inner = self.lock();
        match event {
            Event::Init => inner.relisting = Some(Tables::default()),
            Event::InitApply(view) => {
                if let Some(listed) = inner.relisting.as_mut() {
                    listed.put(view);
                }
            }
            Event::InitDone => {
                if let Some(mut listed) = inner.relisting.take() {
                    listed.by_service.shrink_to_fit();
                    listed.service_of.shrink_to_fit();
                    inner.live = listed;
                }
            }
            Event::Apply(view) => return inner.live.put(view),
            Event::Delete(view) => {
                let meta = &view.metadata;
                let namespace = intern(meta.namespace.as_deref().unwrap_or_default());
                let name = Name::from(meta.name.as_deref().unwrap_or_default());
                return inner
                    .live
                    .remove(&namespace, &name)
                    .map(|service| (namespace, service));
            }
        }
        None
    }

    /// The slices of the Service `namespace/name`.
    pub fn of(&self, namespace: &str, name: &str) -> Vec<SliceRecord> {
        let key = (Name::from(namespace), Name::from(name));
        self.lock()
            .live
            .by_service
            .get(&key)
            .cloned()
            .unwrap_or_default()
    }

    /// Every Service's slices (copies).
    pub fn state(&self) -> HashMap<ServiceKey, Vec<SliceRecord>> {
        self.lock().live.by_service.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, service: Option<&str>, ip: &str) -> EndpointSliceView {
        let labels = service.map(|s| serde_json::json!({"kubernetes.io/service-name": s}));
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "n", "labels": labels},
            "endpoints": [{"addresses": [ip]}],
            "ports": [{"name": "http", "port": 8080}]
        }))
        .unwrap()
    }

    fn addresses(store: &SliceStore, service: &str) -> Vec<String> {
        let mut all: Vec<String> = store
            .of("n", service)
            .iter()
            .flat_map(|s| s.ready.iter())
            .map(ToString::to_string)
            .collect();
        all.sort();
        all
    }

    /// A record keeps the ready (or unsaid) addresses of every endpoint, flat, and the ports.
    #[test]
    fn a_record_keeps_the_ready_addresses() {
        let view: EndpointSliceView = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "n",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.3", "fd00::3"]},
                {"addresses": ["10.0.0.4"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.0.0.5"], "conditions": {"ready": false, "serving": false, "terminating": true}},
                {"addresses": ["not-an-address"], "conditions": {"ready": true}}
            ],
            "ports": [{"name": "http", "port": 8080}]
        }))
        .unwrap();
        let store = SliceStore::default();
        store.apply(&Event::Apply(view));
        let records = store.of("n", "web");
        let ready: Vec<String> = records[0].ready.iter().map(ToString::to_string).collect();
        assert_eq!(ready, ["10.0.0.1", "10.0.0.3", "fd00::3"]);
        let fallback: Vec<String> = records[0]
            .terminating
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            fallback,
            ["10.0.0.4"],
            "terminating and serving, kept apart"
        );
        assert_eq!(records[0].ports[0].port, Some(8080));
    }

    /// Slices are filed under their Service, replaced, moved and removed by their own name.
    #[test]
    fn slices_are_found_by_their_service() {
        let store = SliceStore::default();
        store.apply(&Event::Apply(slice("web-1", Some("web"), "10.0.0.1")));
        store.apply(&Event::Apply(slice("web-2", Some("web"), "10.0.0.2")));
        store.apply(&Event::Apply(slice("db-1", Some("db"), "10.0.0.3")));
        store.apply(&Event::Apply(slice("stray", None, "10.0.0.9")));
        assert_eq!(addresses(&store, "web"), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(addresses(&store, "db"), ["10.0.0.3"]);
        assert_eq!(
            store.state().len(),
            2,
            "a slice without a Service is not kept"
        );
        // Replaced in place.
        store.apply(&Event::Apply(slice("web-2", Some("web"), "10.0.0.4")));
        assert_eq!(addresses(&store, "web"), ["10.0.0.1", "10.0.0.4"]);
        // Replaced in place: it left no Service.
        assert_eq!(
            store.apply(&Event::Apply(slice("web-2", Some("web"), "10.0.0.4"))),
            None
        );
        // A slice relabelled to another Service moves (never seen from the controller, but
        // the store stays right), and says which Service it left.
        let left = store.apply(&Event::Apply(slice("web-2", Some("db"), "10.0.0.4")));
        assert_eq!(left, Some((intern("n"), intern("web"))));
        assert_eq!(addresses(&store, "web"), ["10.0.0.1"]);
        assert_eq!(addresses(&store, "db"), ["10.0.0.3", "10.0.0.4"]);
        store.apply(&Event::Delete(slice("web-1", Some("web"), "10.0.0.1")));
        assert!(store.of("n", "web").is_empty());
        // A slice whose label is removed leaves its Service.
        let left = store.apply(&Event::Apply(slice("web-2", None, "10.0.0.4")));
        assert_eq!(left, Some((intern("n"), intern("db"))));
        assert_eq!(addresses(&store, "db"), ["10.0.0.3"]);
        store.apply(&Event::Apply(slice("web-2", Some("db"), "10.0.0.4")));
        assert!(!store.state().contains_key(&(intern("n"), intern("web"))));
        // A re-list replaces everything when done.
        store.apply(&Event::Init);
        store.apply(&Event::InitApply(slice("api-1", Some("api"), "10.0.0.5")));
        assert_eq!(addresses(&store, "db"), ["10.0.0.3", "10.0.0.4"]);
        store.apply(&Event::InitDone);
        assert!(store.of("n", "db").is_empty());
        assert_eq!(addresses(&store, "api"), ["10.0.0.5"]);
    }
}
