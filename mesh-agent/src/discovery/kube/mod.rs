//! Kubernetes mode: watchers (kube-rs reflectors) for Namespaces, Pods, Services,
//! EndpointSlices, Istio's security objects and the routing objects waypoints use (Gateways,
//! VirtualServices, DestinationRules, HTTPRoutes), turned into the same [`LocalConfig`] the
//! local mode reads from a file, published whenever something changed.
//!
//! - A snapshot is published only once every watcher has listed (no half-known cluster), and
//!   for the Istio kinds only once listed or known to be absent (no CRD installed): a policy
//!   that exists is never missed by an agent that just started. Fail closed.
//! - Watch expiry and API server restarts are the watchers' business (re-list with backoff,
//!   resume from the last resourceVersion); while the API is unreachable the stores keep their
//!   last contents and no snapshot changes: the agent keeps serving its last good state.
//! - Enrolled local pods carry `ambient.istio.io/redirection: enabled` while the agent captures
//!   them (`annotate.rs`).
pub mod annotate;
pub mod host;
pub mod snapshot;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

pub use host::{HostLocator, Located, PodLocator};
pub use snapshot::{Objects, Snapshot, SnapshotSettings};

/// Istio's security kinds the agent reads (`security.istio.io/v1`).
pub const ISTIO_KINDS: [(&str, &str); 3] = [
    ("AuthorizationPolicy", "authorizationpolicies"),
    ("PeerAuthentication", "peerauthentications"),
    ("RequestAuthentication", "requestauthentications"),
];

/// The routing kinds read beside them (group, version, kind, plural): waypoint bindings need
/// the Gateways, waypoints the routes. Each may be absent (CRD not installed).
pub const ROUTING_KINDS: [(&str, &str, &str, &str); 4] = [
    ("gateway.networking.k8s.io", "v1", "Gateway", "gateways"),
    ("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
    (
        "networking.istio.io",
        "v1",
        "VirtualService",
        "virtualservices",
    ),
    (
        "networking.istio.io",
        "v1",
        "DestinationRule",
        "destinationrules",
    ),
];

/// Snapshots are built at most this often (a burst of pod events makes one snapshot).
const DEBOUNCE: Duration = Duration::from_millis(100);
/// How often local pods without a located interface are looked for again.
const RETRY_LOCATE: Duration = Duration::from_secs(1);

/// One watcher's state, for readiness and logs.
struct Feed {
    name: String,
    listed: AtomicBool,
    /// The resource is not served (an Istio CRD that is not installed).
    absent: AtomicBool,
}

impl Feed {
    fn new(name: &str) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            listed: AtomicBool::new(false),
            absent: AtomicBool::new(false),
        })
    }

    fn usable(&self) -> bool {
        self.listed.load(Ordering::Acquire) || self.absent.load(Ordering::Acquire)
    }
}

/// The running watchers.
pub struct KubeDiscovery {
    /// The latest snapshot (None until every watcher has listed).
    pub snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    pub client: Client,
}

/// Drives one watcher into a reflector store, waking `changed` on every event.
fn drive<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
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
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(writer);
        futures::pin_mut!(stream);
        let mut last_error_log = None::<Instant>;
        while let Some(item) = stream.next().await {
            match item {
                Ok(watcher::Event::InitDone) => {
                    if !feed.listed.swap(true, Ordering::AcqRel) {
                        info!(resource = %feed.name, "listed");
                    }
                    feed.absent.store(false, Ordering::Release);
                    changed.notify_one();
                }
                Ok(_) => changed.notify_one(),
                Err(e) => {
                    let not_served = matches!(
                        &e,
                        watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.is_not_found()
                    );
                    if optional && not_served && !feed.absent.swap(true, Ordering::AcqRel) {
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

impl KubeDiscovery {
    /// Starts the watchers and the snapshot builder.
    pub fn start(
        client: Client,
        settings: SnapshotSettings,
        locator: Arc<dyn PodLocator>,
        interfaces: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
    ) -> Self {
        let changed = Arc::new(Notify::new());
        let mut feeds = Vec::new();

        macro_rules! core_store {
            ($ty:ty, $name:expr) => {{
                let (reader, writer) = reflector::store::<$ty>();
                let feed = Feed::new($name);
                feeds.push(Arc::clone(&feed));
                drive(
                    Api::<$ty>::all(client.clone()),
                    writer,
                    feed,
                    Arc::clone(&changed),
                    false,
                );
                reader
            }};
        }
        let namespaces = core_store!(Namespace, "namespaces");
        let pods = core_store!(Pod, "pods");
        let services = core_store!(Service, "services");
        let slices = core_store!(EndpointSlice, "endpointslices");
        let mut policy_stores = Vec::new();
        let kinds = ISTIO_KINDS
            .iter()
            .map(|(kind, plural)| ("security.istio.io", "v1", *kind, *plural))
            .chain(ROUTING_KINDS);
        for (group, version, kind, plural) in kinds {
            let gvk = GroupVersionKind::gvk(group, version, kind);
            let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
            let writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
            let reader = writer.as_reader();
            let feed = Feed::new(&format!("{kind}.{group}"));
            feeds.push(Arc::clone(&feed));
            drive(
                Api::<DynamicObject>::all_with(client.clone(), &ar),
                writer,
                feed,
                Arc::clone(&changed),
                true,
            );
            policy_stores.push(reader);
        }

        let (tx, rx) = watch::channel::<Option<Arc<Snapshot>>>(None);
        tokio::spawn(async move {
            let mut waiting_logged = Instant::now();
            // Local pods whose interface was not found yet are looked for again on a timer
            // (their routes appear without any API event).
            let mut retry = false;
            loop {
                tokio::select! {
                    () = changed.notified() => {}
                    () = tokio::time::sleep(RETRY_LOCATE), if retry => {}
                }
                tokio::time::sleep(DEBOUNCE).await;
                if let Some(f) = feeds.iter().find(|f| !f.usable()) {
                    if waiting_logged.elapsed() > Duration::from_secs(10) {
                        info!(resource = %f.name, "waiting for the first list before publishing state");
                        waiting_logged = Instant::now();
                    }
                    continue;
                }
                let objects = Objects {
                    namespaces: namespaces.state().iter().map(|o| (**o).clone()).collect(),
                    pods: pods.state().iter().map(|o| (**o).clone()).collect(),
                    services: services.state().iter().map(|o| (**o).clone()).collect(),
                    slices: slices.state().iter().map(|o| (**o).clone()).collect(),
                    policies: policy_stores
                        .iter()
                        .flat_map(|s| s.state())
                        .map(|o| (*o).clone())
                        .collect(),
                };
                let snap = snapshot::build(&settings, &objects, &*locator, &interfaces());
                retry = snap.skipped.iter().any(|s| s.contains("no host interface"));
                let same = tx
                    .borrow()
                    .as_ref()
                    .is_some_and(|old| old.config == snap.config);
                if !same {
                    let _ = tx.send(Some(Arc::new(snap)));
                }
            }
        });
        Self {
            snapshots: rx,
            client,
        }
    }
}
