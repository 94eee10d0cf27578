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
pub mod feed;
pub mod host;
pub mod snapshot;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{reflector, watcher},
};
use tokio::sync::{Notify, watch};
use tracing::info;

pub use feed::{Feed, drive, keep, slim_pod};
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
pub const ROUTING_KINDS: [(&str, &str, &str, &str); 5] = [
    ("gateway.networking.k8s.io", "v1", "Gateway", "gateways"),
    ("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
    ("gateway.networking.k8s.io", "v1", "GRPCRoute", "grpcroutes"),
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

/// The running watchers.
pub struct KubeDiscovery {
    /// The latest snapshot (None until every watcher has listed).
    pub snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    pub client: Client,
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
            ($ty:ty, $name:expr) => {
                core_store!($ty, $name, keep)
            };
            ($ty:ty, $name:expr, $slim:expr) => {{
                let (reader, writer) = reflector::store::<$ty>();
                let feed = Feed::new($name);
                feeds.push(Arc::clone(&feed));
                drive(
                    Api::<$ty>::all(client.clone()),
                    watcher::Config::default(),
                    writer,
                    feed,
                    Arc::clone(&changed),
                    false,
                    $slim,
                );
                reader
            }};
        }
        let namespaces = core_store!(Namespace, "namespaces");
        let pods = core_store!(Pod, "pods", slim_pod);
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
                watcher::Config::default(),
                writer,
                feed,
                Arc::clone(&changed),
                true,
                keep,
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
