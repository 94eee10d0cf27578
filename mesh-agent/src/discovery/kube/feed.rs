//! One kube-rs watcher feeding a store, with the state readiness and logs need:
//! shared by discovery (the agents' view of the cluster) and the control plane's controllers.
use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api,
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use tokio::sync::Notify;
use tracing::{info, warn};

/// One watcher's state, for readiness and logs, and (when tracking) what changed since asked.
pub struct Feed {
    pub name: String,
    listed: AtomicBool,
    /// The resource is not served (an Istio CRD that is not installed).
    absent: AtomicBool,
    changes: Option<(KeyBy, Mutex<Changes>)>,
}

/// How a tracking feed names a changed object.
#[derive(Clone, Copy, Debug)]
pub enum KeyBy {
    /// `(namespace, name)`.
    Name,
    /// `(namespace, value of this label)`: an EndpointSlice names its Service so.
    Label(&'static str),
}

/// What changed since the last [`Feed::take_changes`].
#[derive(Debug, Default)]
pub struct Changes {
    /// A (re-)list: anything may have changed.
    pub all: bool,
    pub keys: HashSet<(String, String)>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        !self.all && self.keys.is_empty()
    }

    /// `other` too.
    pub fn merge(&mut self, other: Changes) {
        self.all |= other.all;
        self.keys.extend(other.keys);
    }
}

impl Feed {
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            listed: AtomicBool::new(false),
            absent: AtomicBool::new(false),
            changes: None,
        })
    }

    /// A feed that also records which objects changed, named as `key_by` says (for a reader
    /// that takes them: nobody else should track, the record would only grow).
    pub fn tracking(name: &str, key_by: KeyBy) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            listed: AtomicBool::new(false),
            absent: AtomicBool::new(false),
            changes: Some((key_by, Mutex::new(Changes::default()))),
        })
    }

    fn record(&self, meta: Option<&ObjectMeta>) {
        let Some((key_by, changes)) = &self.changes else {
            return;
        };
        let mut changes = changes.lock().unwrap_or_else(|e| e.into_inner());
        let key = meta.and_then(|m| {
            let ns = m.namespace.clone().unwrap_or_default();
            match key_by {
                KeyBy::Name => Some((ns, m.name.clone()?)),
                KeyBy::Label(l) => Some((ns, m.labels.as_ref()?.get(*l)?.clone())),
            }
        });
        match (meta, key) {
            (None, _) => changes.all = true,
            (Some(_), Some(key)) => {
                changes.keys.insert(key);
            }
            // Names nothing (a slice without its Service's label): nothing depends on it.
            (Some(_), None) => {}
        }
    }

    /// Records `(namespace, name)` as changed: for a store that knows more than the event
    /// says (the Service a slice left).
    pub fn record_key(&self, namespace: String, name: String) {
        if let Some((_, changes)) = &self.changes {
            let mut changes = changes.lock().unwrap_or_else(|e| e.into_inner());
            changes.keys.insert((namespace, name));
        }
    }

    /// What changed since the last call (nothing for a feed that does not track).
    pub fn take_changes(&self) -> Changes {
        self.changes
            .as_ref()
            .map_or_else(Changes::default, |(_, c)| {
                std::mem::take(&mut *c.lock().unwrap_or_else(|e| e.into_inner()))
            })
    }

    /// Listed, or known to be absent: its (empty) store can be trusted.
    pub fn usable(&self) -> bool {
        self.listed.load(Ordering::Acquire) || self.absent.load(Ordering::Acquire)
    }

    /// Listed (not merely absent): an empty store means there are none.
    pub fn listed(&self) -> bool {
        self.listed.load(Ordering::Acquire)
    }
}

/// A reflector store's writer as [`drive`]'s store.
pub fn into_reflector<K>(
    mut writer: reflector::store::Writer<K>,
) -> impl FnMut(&watcher::Event<K>) + Send + 'static
where
    K: kube::Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    move |event| writer.apply_watcher_event(event)
}

/// Drives one watcher, handing each event to `store` (a reflector store's writer, or a store
/// of its own such as [`super::record_store::PodStore`]) and waking `changed`. Objects arrive
/// without `metadata.managedFields` (often the bulk of an object, never read here).
pub fn drive<K>(
    api: Api<K>,
    config: watcher::Config,
    mut store: impl FnMut(&watcher::Event<K>) + Send + 'static,
    feed: Arc<Feed>,
    changed: Arc<Notify>,
    optional: bool,
) where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + Send
        + Sync
        + serde::de::DeserializeOwned
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    tokio::spawn(async move {
        let stream = watcher(api, config)
            .default_backoff()
            .modify(|obj| obj.meta_mut().managed_fields = None)
            .inspect_ok(move |event| store(event));
        futures::pin_mut!(stream);
        let mut last_error_log = None::<Instant>;
        while let Some(item) = stream.next().await {
            match item {
                Ok(watcher::Event::InitDone) => {
                    feed.record(None);
                    if !feed.listed.swap(true, Ordering::AcqRel) {
                        info!(resource = %feed.name, "listed");
                    }
                    feed.absent.store(false, Ordering::Release);
                    changed.notify_one();
                }
                Ok(watcher::Event::Apply(obj) | watcher::Event::Delete(obj)) => {
                    feed.record(Some(obj.meta()));
                    changed.notify_one();
                }
                Ok(_) => {
                    feed.record(None);
                    changed.notify_one();
                }
                Err(e) => {
                    let not_served = matches!(
                        &e,
                        watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.is_not_found()
                    );
                    if optional && not_served && !feed.absent.swap(true, Ordering::AcqRel) {
                        feed.record(None);
                        info!(resource = %feed.name, "not served by this cluster (CRD not installed); treated as empty");
                        changed.notify_one();
                    }
                    // The watcher retries with backoff; say so now and then, not per retry.
                    if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                        warn!(resource = %feed.name, error = %e, "watch failed; retrying, the last known state stays in force");
                        last_error_log = Some(Instant::now());
                    }
                }
            }
        }
    });
}
