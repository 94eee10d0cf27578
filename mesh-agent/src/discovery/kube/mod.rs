//! Kubernetes mode: watchers (kube-rs reflectors) for Namespaces, Pods, Services,
//! EndpointSlices, Istio's security objects and the routing objects waypoints use (Gateways,
//! VirtualServices, DestinationRules, HTTPRoutes), turned into the same [`LocalConfig`] the
//! local mode reads from a file, published whenever something changed: whole after a list or a
//! change beyond pods and Services, otherwise as a delta of the pods and Services that changed
//! (`incremental.rs`), so that a large cluster's pod churn costs in proportion to it.
//!
//! - A snapshot is published only once every watcher has listed (no half-known cluster), and
//!   for the Istio kinds only once listed or known to be absent (no CRD installed): a policy
//!   that exists is never missed by an agent that just started. Fail closed.
//! - Watch expiry and API server restarts are the watchers' business (re-list with backoff,
//!   resume from the last resourceVersion); while the API is unreachable the stores keep their
//!   last contents and no snapshot changes: the agent keeps serving its last good state.
//! - Enrolled local pods carry `ambient.istio.io/redirection: enabled` while the agent captures
//!   them (`annotate.rs`).
/// `kube::Resource` for a view type (a namespaced API kind decoded into fewer fields, with its
/// `metadata`), so watchers and reflector stores take it in place of `k8s_openapi`'s type.
macro_rules! namespaced_view {
    ($ty:ty, $kind:literal, $group:literal, $version:literal, $plural:literal) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = k8s_openapi::NamespaceResourceScope;

            fn kind(_: &()) -> std::borrow::Cow<'_, str> {
                $kind.into()
            }

            fn group(_: &()) -> std::borrow::Cow<'_, str> {
                $group.into()
            }

            fn version(_: &()) -> std::borrow::Cow<'_, str> {
                $version.into()
            }

            fn plural(_: &()) -> std::borrow::Cow<'_, str> {
                $plural.into()
            }

            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// `record_store::Keyed` for a record with `namespace` and `name` fields.
macro_rules! keyed_by_fields {
    ($ty:ty) => {
        impl super::record_store::Keyed for $ty {
            fn namespace(&self) -> &str {
                &self.namespace
            }

            fn name(&self) -> &str {
                &self.name
            }
        }
    };
}

/// The metadata a view keeps: name, namespace, uid, resource version (the watcher resumes from
/// it) and timestamps; its labels are read as `L` and handed back apart. Annotations, owner
/// references, managed fields and the rest are skipped while decoding.
#[derive(Default, serde::Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct MetaView<L> {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    creation_timestamp: Option<Time>,
    deletion_timestamp: Option<Time>,
    labels: Option<L>,
}

impl<L> MetaView<L> {
    /// The metadata without labels, and the labels.
    fn split(self) -> (ObjectMeta, Option<L>) {
        let meta = ObjectMeta {
            name: self.name,
            namespace: self.namespace,
            uid: self.uid,
            resource_version: self.resource_version,
            creation_timestamp: self.creation_timestamp,
            deletion_timestamp: self.deletion_timestamp,
            ..ObjectMeta::default()
        };
        (meta, self.labels)
    }
}

pub mod annotate;
pub mod feed;
pub mod host;
pub mod incremental;
pub mod pod;
pub mod pod_store;
pub mod published;
pub mod record_store;
pub mod service;
pub mod slice;
pub mod slice_store;
pub mod snapshot;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::Namespace,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{reflector, watcher},
};
use tokio::sync::{Notify, watch};
use tracing::info;

pub use feed::{Feed, KeyBy, drive, into_reflector};
pub use host::{HostLocator, Located, PodLocator};
pub use pod::{PodRecord, PodView};
pub use pod_store::PodStore;
pub use published::{ConfigInForce, Published};
pub use record_store::ServiceStore;
pub use service::{ServiceRecord, ServiceView};
pub use slice::EndpointSliceView;
pub use slice_store::SliceStore;
pub use snapshot::{Objects, Snapshot, SnapshotSettings};

use crate::discovery::{ConfigUpdate, LocalConfig, local::ConfigError};
use feed::Changes;

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
    /// What was published (nothing until every watcher has listed).
    published: Arc<Published>,
    versions: watch::Receiver<u64>,
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
                core_store!($ty, $name, Feed::tracking($name, KeyBy::Name))
            };
            ($ty:ty, $name:expr, $feed:expr) => {{
                let (reader, writer) = reflector::store::<$ty>();
                let feed = $feed;
                feeds.push(Arc::clone(&feed));
                drive(
                    Api::<$ty>::all(client.clone()),
                    watcher::Config::default(),
                    into_reflector(writer),
                    feed,
                    Arc::clone(&changed),
                    false,
                );
                reader
            }};
        }
        let namespaces = core_store!(Namespace, "namespaces");
        // Pods, Services and EndpointSlices churn: their changes are tracked, so a round can be
        // a delta. Anything else changing makes a full build.
        let pod_feed = Feed::tracking("pods", KeyBy::Name);
        let service_feed = Feed::tracking("services", KeyBy::Name);
        let slice_feed = Feed::tracking("endpointslices", KeyBy::Label(slice::SERVICE_NAME_LABEL));
        // Pods and Services are kept as records, not whole (`record_store.rs`). The watchers'
        // default configuration lists in pages of 500 (`ListSemantic::MostRecent`): `Any`
        // (resourceVersion=0, served from the API server's cache, unpaged on many versions)
        // would decode a large cluster in one body and leave ~240 B per pod of heap holes
        // (issue #19, measured at 100,000 pods).
        let pods = Arc::new(PodStore::for_node(&settings.node_name));
        let services = Arc::new(ServiceStore::services());
        macro_rules! record_store {
            ($view:ty, $store:expr, $feed:expr) => {{
                let store = Arc::clone($store);
                feeds.push(Arc::clone($feed));
                drive(
                    Api::<$view>::all(client.clone()),
                    watcher::Config::default(),
                    move |event| store.apply(event),
                    Arc::clone($feed),
                    Arc::clone(&changed),
                    false,
                );
            }};
        }
        record_store!(PodView, &pods, &pod_feed);
        record_store!(ServiceView, &services, &service_feed);
        // EndpointSlices are filed under their Service (`slice_store.rs`).
        let slices = Arc::new(SliceStore::default());
        feeds.push(Arc::clone(&slice_feed));
        drive(
            Api::<EndpointSliceView>::all(client.clone()),
            watcher::Config::default(),
            {
                let (slices, feed) = (Arc::clone(&slices), Arc::clone(&slice_feed));
                // A slice that left a Service (relabelled, or its label removed) changes that
                // Service too, which the event's own label does not name.
                move |event| {
                    if let Some((namespace, service)) = slices.apply(event) {
                        feed.record_key(namespace.to_string(), service.to_string());
                    }
                }
            },
            Arc::clone(&slice_feed),
            Arc::clone(&changed),
            false,
        );
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
            let feed = Feed::tracking(&format!("{kind}.{group}"), KeyBy::Name);
            feeds.push(Arc::clone(&feed));
            drive(
                Api::<DynamicObject>::all_with(client.clone(), &ar),
                watcher::Config::default(),
                into_reflector(writer),
                feed,
                Arc::clone(&changed),
                true,
            );
            policy_stores.push(reader);
        }

        let published = Arc::new(Published::new(Arc::default()));
        let versions = published.subscribe();
        let out = Arc::clone(&published);
        tokio::spawn(async move {
            let mut waiting_logged = Instant::now();
            // Local pods whose interface was not found yet are looked for again on a timer
            // (their routes appear without any API event).
            let mut retry = false;
            // Changes seen but not yet published (a round waiting for a first list keeps them).
            let (mut pod_changes, mut service_changes) = (Changes::default(), Changes::default());
            // The agent refused an update: the next round builds whole.
            let mut rebuild = false;
            loop {
                // Deltas are computed against the configuration in force: it must include
                // everything published before (this task is the only publisher).
                out.settled().await;
                rebuild |= out.take_rebuild();
                if !rebuild {
                    // What the configuration now says need not be kept beside it.
                    out.with_config(|c| c.map(|c| pods.settle(c)));
                }
                tokio::select! {
                    () = changed.notified() => {}
                    () = tokio::time::sleep(RETRY_LOCATE), if retry => {}
                }
                tokio::time::sleep(DEBOUNCE).await;
                // Everything else than pods, Services and slices: any change means a full build.
                let mut other = false;
                for f in &feeds {
                    let c = f.take_changes();
                    if Arc::ptr_eq(f, &pod_feed) {
                        pod_changes.merge(c);
                    } else if Arc::ptr_eq(f, &service_feed) || Arc::ptr_eq(f, &slice_feed) {
                        service_changes.merge(c);
                    } else {
                        other |= !c.is_empty();
                    }
                }
                if let Some(f) = feeds.iter().find(|f| !f.usable()) {
                    if waiting_logged.elapsed() > Duration::from_secs(10) {
                        info!(resource = %f.name, "waiting for the first list before publishing state");
                        waiting_logged = Instant::now();
                    }
                    continue;
                }
                let (pods_changed, services_changed) = (
                    std::mem::take(&mut pod_changes),
                    std::mem::take(&mut service_changes),
                );
                let why = if !out.in_force() {
                    "first configuration"
                } else if std::mem::take(&mut rebuild) {
                    "the agent refused the last update"
                } else if other {
                    "a change beyond pods and Services"
                } else if retry {
                    "looking for pod interfaces again"
                } else {
                    let stores = incremental::Stores {
                        pods: &pods,
                        services: &services,
                        slices: &slices,
                    };
                    let delta = out.with_config(|c| {
                        let c = c.ok_or("first configuration")?;
                        incremental::delta(
                            &settings,
                            c,
                            &stores,
                            &pods_changed,
                            &services_changed,
                            &*locator,
                            &*interfaces,
                        )
                    });
                    match delta.and_then(|d| out.delta(d)) {
                        Ok(()) => continue,
                        Err(why) => why,
                    }
                };
                let started = Instant::now();
                let objects = Objects {
                    namespaces: namespaces.state(),
                    pods: out.with_config(|c| pods.state(c)),
                    services: services.state(),
                    slices: slices.state(),
                    policies: policy_stores.iter().flat_map(|s| s.state()).collect(),
                };
                let snap = snapshot::build(&settings, &objects, &*locator, &interfaces());
                pods.lost_address(snap.lost_address.iter().map(|&at| &objects.pods[at]));
                retry = snap.skipped.iter().any(|s| s.contains("no host interface"));
                info!(
                    why,
                    workloads = snap.config.workloads.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "configuration built whole"
                );
                out.full(snap.config, snap.skipped);
            }
        });
        Self {
            published,
            versions,
            client,
        }
    }

    /// The configuration in force: the agent applies each update to it (the only copy, see
    /// `published.rs`), and the next delta is computed against it.
    pub fn config(&self) -> Arc<ConfigInForce> {
        Arc::clone(self.published.config())
    }

    /// The next update not yet taken (waits for one), and what the configuration left out.
    /// Calling it again says the previous one was dealt with: applied to [`Self::config`],
    /// or refused (then say so first, with [`Self::refused`]).
    pub async fn next_update(&mut self) -> (ConfigUpdate, Vec<String>) {
        self.published.dealt_with();
        loop {
            if let Some(taken) = self.published.take() {
                return taken;
            }
            if self.versions.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Takes the next update and applies it to [`Self::config`] as an agent would (checked,
    /// without the agent's derived state): for tools and tests that follow the cluster without
    /// an agent. Returns the update, or why it was refused.
    pub async fn apply_next(&mut self) -> Result<ConfigUpdate, ConfigError> {
        let (update, _) = self.next_update().await;
        let config = self.config();
        let mut config = config.write().unwrap_or_else(|e| e.into_inner());
        let applied = match &update {
            ConfigUpdate::Full(new) => LocalConfig::parse_checked((**new).clone())
                .map(|checked| *config = Arc::new(checked)),
            ConfigUpdate::Delta(delta) => {
                let config = Arc::make_mut(&mut config);
                config.check_delta(delta).map(|()| {
                    config.apply(delta);
                })
            }
        };
        drop(config);
        if applied.is_err() {
            self.refused();
        }
        self.published.dealt_with();
        applied.map(|()| update)
    }

    /// The agent refused the update it took last (its configuration in force did not change):
    /// the next round builds whole.
    pub fn refused(&self) {
        self.published.refused();
    }

    /// A copy of the configuration in force (None before the agent applied one of ours).
    pub fn current(&self) -> Option<LocalConfig> {
        self.published.current()
    }
}
