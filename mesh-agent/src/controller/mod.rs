//! The control plane's controllers (run by `mesh-agent ca serve`, as istiod runs its own):
//! - **waypoints**: every Gateway of class `mesh-waypoint` / `istio-waypoint` gets a
//!   ServiceAccount, Deployment and Service named after it (owned by it), kept in step, and its
//!   status (Accepted, Programmed, address); one ClusterRoleBinding lists the waypoints'
//!   accounts for their read-only watches;
//! - **root certificates**: ConfigMap `istio-ca-root-cert` in every namespace.
//!
//! Level-triggered: any change (or a periodic resync) recomputes everything from the watched
//! stores and writes only differences, by server-side apply. Nothing is deleted before the
//! Gateways have been listed, and what carries no `mesh-agent.io/managed-by` label is never
//! changed: a Gateway named like an existing ServiceAccount of a workload is refused (it would
//! otherwise run the waypoint with that workload's identity).
pub mod apply;
pub mod root_cert;
pub mod waypoint;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Namespace, Service, ServiceAccount},
    rbac::v1::ClusterRoleBinding,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
    runtime::{reflector, watcher},
};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tracing::{info, warn};

use self::waypoint::{
    GatewayStatus, MANAGED_BY, MANAGED_BY_LABEL, WAYPOINT_ROLE_BINDING, WaypointGateway,
    WaypointTemplate,
};
use crate::{
    discovery::kube::{Feed, drive, into_reflector},
    l7::binding::GATEWAY_NAME_LABEL,
};

/// Changes are gathered this long before a reconcile.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// Everything is recomputed this often even without events (drift the watches cannot see).
const RESYNC: Duration = Duration::from_secs(60);
/// A failed reconcile is retried after this.
const RETRY: Duration = Duration::from_secs(5);

/// What the controllers need to know.
#[derive(Clone, Debug)]
pub struct ControllerSettings {
    /// The CA's namespace (its own root ConfigMap is published by `ca::root`).
    pub ca_namespace: String,
    /// How waypoint pods are made; None: waypoints are not provisioned (the reason was logged).
    pub waypoints: Option<WaypointTemplate>,
    /// The mesh roots, PEM.
    pub roots_pem: String,
}

/// How waypoints are made: `image` if given, else this pod's own image and pull policy (the
/// control plane and waypoints are one binary, one version). None, with the reason logged,
/// when neither is known: waypoints are then not provisioned, everything else runs.
pub async fn waypoint_template(
    client: &Client,
    namespace: &str,
    ca_port: u16,
    trust_domain: &str,
    image: Option<String>,
    pod_name: Option<&str>,
) -> Option<WaypointTemplate> {
    let template = |image: String, image_pull_policy: Option<String>| WaypointTemplate {
        image,
        image_pull_policy,
        ca_address: format!("https://mesh-ca.{namespace}.svc:{ca_port}"),
        trust_domain: trust_domain.to_owned(),
    };
    if let Some(image) = image {
        return Some(template(image, None));
    }
    let Some(pod_name) = pod_name else {
        warn!(
            "waypoints will not be provisioned: set --waypoint-image (or POD_NAME, to use this pod's image)"
        );
        return None;
    };
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), namespace);
    match pods.get(pod_name).await {
        Ok(pod) => {
            let container = pod.spec.and_then(|s| s.containers.into_iter().next());
            match container.and_then(|c| Some((c.image?, c.image_pull_policy))) {
                Some((image, policy)) => {
                    info!(%image, "waypoints run this pod's image");
                    Some(template(image, policy))
                }
                None => {
                    warn!(pod = %format!("{namespace}/{pod_name}"), "waypoints will not be provisioned: this pod names no image; set --waypoint-image");
                    None
                }
            }
        }
        Err(e) => {
            warn!(pod = %format!("{namespace}/{pod_name}"), error = %e, "waypoints will not be provisioned: cannot read this pod to find its image; set --waypoint-image");
            None
        }
    }
}

/// The kinds written, as API resources.
struct Kinds {
    gateway_class: ApiResource,
    gateway: ApiResource,
    deployment: ApiResource,
    service: ApiResource,
    service_account: ApiResource,
    config_map: ApiResource,
    role_binding: ApiResource,
}

impl Kinds {
    fn new() -> Self {
        Self {
            gateway_class: ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "GatewayClass"),
                "gatewayclasses",
            ),
            gateway: ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway"),
                "gateways",
            ),
            deployment: ApiResource::erase::<Deployment>(&()),
            service: ApiResource::erase::<Service>(&()),
            service_account: ApiResource::erase::<ServiceAccount>(&()),
            config_map: ApiResource::erase::<ConfigMap>(&()),
            role_binding: ApiResource::erase::<ClusterRoleBinding>(&()),
        }
    }

    /// The resource of a desired object, by its `kind`.
    fn of(&self, obj: &Value) -> &ApiResource {
        match obj["kind"].as_str() {
            Some("Deployment") => &self.deployment,
            Some("Service") => &self.service,
            Some("ServiceAccount") => &self.service_account,
            Some("ConfigMap") => &self.config_map,
            _ => &self.role_binding,
        }
    }
}

/// The watched stores.
struct Stores {
    gateways: reflector::Store<DynamicObject>,
    namespaces: reflector::Store<Namespace>,
    /// Our Deployments, Services and ServiceAccounts (label-selected), by kind.
    managed: Vec<reflector::Store<DynamicObject>>,
    config_maps: reflector::Store<DynamicObject>,
    role_bindings: reflector::Store<DynamicObject>,
    gateway_feed: Arc<Feed>,
    feeds: Vec<Arc<Feed>>,
}

/// Runs the controllers until the process ends.
pub async fn run(client: Client, settings: ControllerSettings) {
    let kinds = Kinds::new();
    let changed = Arc::new(Notify::new());
    let mut feeds = Vec::new();
    let mut dynamic = |ar: &ApiResource, config: watcher::Config, optional: bool| {
        let writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
        let reader = writer.as_reader();
        let feed = Feed::new(&format!("{}.{}", ar.plural, ar.group));
        feeds.push(Arc::clone(&feed));
        drive(
            Api::<DynamicObject>::all_with(client.clone(), ar),
            config,
            into_reflector(writer),
            Arc::clone(&feed),
            Arc::clone(&changed),
            optional,
        );
        (reader, feed)
    };
    let ours = || watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let (gateways, gateway_feed) = dynamic(&kinds.gateway, watcher::Config::default(), true);
    let managed = [&kinds.deployment, &kinds.service, &kinds.service_account]
        .into_iter()
        .map(|ar| dynamic(ar, ours(), false).0)
        .collect();
    let named = |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
    let (config_maps, _) = dynamic(&kinds.config_map, named(root_cert::ROOT_CONFIGMAP), false);
    let (role_bindings, _) = dynamic(&kinds.role_binding, named(WAYPOINT_ROLE_BINDING), false);
    let (namespaces, writer) = reflector::store::<Namespace>();
    let namespace_feed = Feed::new("namespaces");
    feeds.push(Arc::clone(&namespace_feed));
    drive(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
        into_reflector(writer),
        namespace_feed,
        Arc::clone(&changed),
        false,
    );
    let stores = Stores {
        gateways,
        namespaces,
        managed,
        config_maps,
        role_bindings,
        gateway_feed,
        feeds,
    };
    let mut reconciler = Reconciler {
        client,
        settings,
        kinds,
        refused: BTreeSet::new(),
        class_applied: false,
    };
    let mut retry = false;
    loop {
        tokio::select! {
            () = changed.notified() => {}
            () = tokio::time::sleep(if retry { RETRY } else { RESYNC }) => {}
        }
        tokio::time::sleep(DEBOUNCE).await;
        if stores.feeds.iter().any(|f| !f.usable()) {
            continue;
        }
        let errors = reconciler.reconcile(&stores).await;
        retry = !errors.is_empty();
        for e in errors {
            warn!(error = %e, "controller: not done; retrying in {}s", RETRY.as_secs());
        }
    }
}

struct Reconciler {
    client: Client,
    settings: ControllerSettings,
    kinds: Kinds,
    /// Objects already reported as not ours (logged once, not per resync).
    refused: BTreeSet<String>,
    /// The GatewayClass was written by this process.
    class_applied: bool,
}

/// `Kind namespace/name` of an object, for logs and maps.
fn object_key(obj: &Value) -> String {
    format!(
        "{} {}/{}",
        obj["kind"].as_str().unwrap_or("?"),
        obj["metadata"]["namespace"].as_str().unwrap_or(""),
        obj["metadata"]["name"].as_str().unwrap_or("?"),
    )
}

fn is_ours(obj: &Value) -> bool {
    obj["metadata"]["labels"][MANAGED_BY_LABEL].as_str() == Some(MANAGED_BY)
}

fn as_json(obj: &DynamicObject, ar: &ApiResource) -> Value {
    let mut v = serde_json::to_value(obj).unwrap_or(Value::Null);
    v["kind"] = json!(ar.kind);
    v
}

impl Reconciler {
    /// One pass over everything; the errors of what could not be done.
    async fn reconcile(&mut self, stores: &Stores) -> Vec<String> {
        let mut errors = Vec::new();
        let mut observed: BTreeMap<String, Value> = BTreeMap::new();
        for (store, ar) in stores.managed.iter().zip([
            &self.kinds.deployment,
            &self.kinds.service,
            &self.kinds.service_account,
        ]) {
            for o in store.state() {
                let v = as_json(&o, ar);
                observed.insert(object_key(&v), v);
            }
        }
        let mut provisioned = Vec::new();
        let mut waypoint_names = BTreeSet::new();
        if let Some(template) = self.settings.waypoints.clone() {
            for gw_obj in stores.gateways.state() {
                let Some(parsed) = waypoint::waypoint_gateway(&gw_obj) else {
                    continue;
                };
                let ns = gw_obj.metadata.namespace.clone().unwrap_or_default();
                let name = gw_obj.metadata.name.clone().unwrap_or_default();
                waypoint_names.insert((ns.clone(), name.clone()));
                let status = match parsed {
                    Err(why) => {
                        if self.refused.insert(format!("Gateway {ns}/{name}: {why}")) {
                            warn!(gateway = %format!("{ns}/{name}"), error = %why, "waypoint Gateway refused");
                        }
                        GatewayStatus {
                            programmed: Err(("Invalid", why)),
                            address: None,
                        }
                    }
                    Ok(gw) => match self.provision(&gw, &template, &observed).await {
                        Ok(status) => {
                            if status.programmed.as_ref().err().map(|e| e.0) != Some("Invalid") {
                                provisioned.push(gw);
                            }
                            status
                        }
                        Err(e) => {
                            errors.push(format!("Gateway {ns}/{name}: {e}"));
                            continue;
                        }
                    },
                };
                if let Err(e) = self.write_status(&gw_obj, &status).await {
                    errors.push(format!("status of Gateway {ns}/{name}: {e}"));
                }
            }
        }
        // Objects of Gateways that are gone (Kubernetes' garbage collector also removes them
        // through their owner; this covers a collector that is slow or a Gateway whose class
        // changed). Only once the Gateways are known.
        if stores.gateway_feed.listed() && self.settings.waypoints.is_some() {
            if !self.class_applied {
                let class = waypoint::gateway_class();
                match apply::apply(&self.client, &self.kinds.gateway_class, &class).await {
                    Ok(()) => {
                        info!(class = waypoint::WAYPOINT_CLASS, "GatewayClass applied");
                        self.class_applied = true;
                    }
                    Err(e) => {
                        errors.push(format!("GatewayClass {}: {e}", waypoint::WAYPOINT_CLASS))
                    }
                }
            }
            for (key, obj) in &observed {
                let ns = obj["metadata"]["namespace"].as_str().unwrap_or_default();
                let gw = obj["metadata"]["labels"][GATEWAY_NAME_LABEL]
                    .as_str()
                    .unwrap_or_default();
                if waypoint_names.contains(&(ns.to_owned(), gw.to_owned())) {
                    continue;
                }
                let name = obj["metadata"]["name"].as_str().unwrap_or_default();
                match apply::delete(&self.client, self.kinds.of(obj), Some(ns), name).await {
                    Ok(()) => info!(object = %key, "deleted: its waypoint Gateway is gone"),
                    Err(e) => errors.push(format!("deleting {key}: {e}")),
                }
            }
            if let Err(e) = self.bind_accounts(stores, &provisioned).await {
                errors.push(format!("ClusterRoleBinding {WAYPOINT_ROLE_BINDING}: {e}"));
            }
        }
        errors.extend(self.publish_roots(stores).await);
        errors
    }

    /// Applies what `gw` needs; the status to report.
    async fn provision(
        &mut self,
        gw: &WaypointGateway,
        template: &WaypointTemplate,
        observed: &BTreeMap<String, Value>,
    ) -> anyhow::Result<GatewayStatus> {
        let desired = gw.objects(template);
        for obj in &desired {
            let key = object_key(obj);
            match observed.get(&key) {
                Some(current) if apply::covers(current, obj) => continue,
                Some(_) => {}
                None => {
                    // Not one of ours: a same-named object someone else made is left alone.
                    let ar = self.kinds.of(obj);
                    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
                    let existing = apply::api(&self.client, ar, Some(&gw.namespace))
                        .get_opt(name)
                        .await?;
                    if existing.is_some_and(|e| !is_ours(&as_json(&e, ar))) {
                        let why = format!(
                            "{key} exists and is not managed by mesh-agent: rename the Gateway or remove it"
                        );
                        if self.refused.insert(why.clone()) {
                            warn!(gateway = %gw.key(), error = %why, "waypoint not provisioned");
                        }
                        return Ok(GatewayStatus {
                            programmed: Err(("Invalid", why)),
                            address: None,
                        });
                    }
                }
            }
            apply::apply(&self.client, self.kinds.of(obj), obj).await?;
            info!(object = %key, gateway = %gw.key(), "applied");
        }
        let deployment = observed.get(&object_key(&desired[2]));
        let available = deployment
            .and_then(|d| d["status"]["availableReplicas"].as_i64())
            .unwrap_or(0);
        let address = observed
            .get(&object_key(&desired[1]))
            .and_then(|s| s["spec"]["clusterIP"].as_str())
            .filter(|ip| *ip != "None")
            .map(str::to_owned);
        Ok(GatewayStatus {
            programmed: if available > 0 {
                Ok(())
            } else {
                Err((
                    "Pending",
                    format!("Deployment {} has no available pod yet", gw.key()),
                ))
            },
            address,
        })
    }

    async fn write_status(&self, gw: &DynamicObject, status: &GatewayStatus) -> anyhow::Result<()> {
        let generation = gw.metadata.generation;
        if status.matches(&gw.data["status"], generation) {
            return Ok(());
        }
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)?;
        let ns = gw.metadata.namespace.clone().unwrap_or_default();
        let name = gw.metadata.name.clone().unwrap_or_default();
        Api::<DynamicObject>::namespaced_with(self.client.clone(), &ns, &self.kinds.gateway)
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status.to_json(generation, &now)})),
            )
            .await?;
        info!(gateway = %format!("{ns}/{name}"), programmed = status.programmed.is_ok(), "status written");
        Ok(())
    }

    /// Keeps the ClusterRoleBinding's subjects = the provisioned waypoints' accounts.
    async fn bind_accounts(
        &self,
        stores: &Stores,
        provisioned: &[WaypointGateway],
    ) -> anyhow::Result<()> {
        let desired = waypoint::role_binding(provisioned);
        let current = stores
            .role_bindings
            .state()
            .into_iter()
            .find(|o| o.metadata.name.as_deref() == Some(WAYPOINT_ROLE_BINDING))
            .map(|o| as_json(&o, &self.kinds.role_binding));
        let subjects = |v: &Value| -> Vec<(String, String)> {
            v["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    (
                        s["namespace"].as_str().unwrap_or_default().to_owned(),
                        s["name"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        };
        let same = current.as_ref().is_some_and(|c| {
            subjects(c) == subjects(&desired) && c["roleRef"] == desired["roleRef"]
        });
        // No waypoints and no binding yet: nothing to write.
        if same || (current.is_none() && provisioned.is_empty()) {
            return Ok(());
        }
        apply::apply(&self.client, &self.kinds.role_binding, &desired).await?;
        info!(
            binding = WAYPOINT_ROLE_BINDING,
            waypoints = provisioned.len(),
            "applied"
        );
        Ok(())
    }

    /// The root ConfigMap in every namespace that wants one.
    async fn publish_roots(&mut self, stores: &Stores) -> Vec<String> {
        let current: BTreeMap<String, Value> = stores
            .config_maps
            .state()
            .iter()
            .filter(|o| o.metadata.name.as_deref() == Some(root_cert::ROOT_CONFIGMAP))
            .map(|o| {
                (
                    o.metadata.namespace.clone().unwrap_or_default(),
                    as_json(o, &self.kinds.config_map),
                )
            })
            .collect();
        let mut errors = Vec::new();
        for ns in stores.namespaces.state() {
            let name = ns.metadata.name.clone().unwrap_or_default();
            let terminating = ns.metadata.deletion_timestamp.is_some();
            if !root_cert::wanted(&name, terminating, &self.settings.ca_namespace) {
                continue;
            }
            let desired = root_cert::config_map(&name, &self.settings.roots_pem);
            match current.get(&name) {
                Some(c) if !is_ours(c) => {
                    let why = format!(
                        "ConfigMap {name}/{} exists and is not managed by mesh-agent; left as it is",
                        root_cert::ROOT_CONFIGMAP
                    );
                    if self.refused.insert(why.clone()) {
                        warn!("{why}");
                    }
                    continue;
                }
                Some(c) if apply::covers(c, &desired) => continue,
                _ => {}
            }
            match apply::apply(&self.client, &self.kinds.config_map, &desired).await {
                Ok(()) => {
                    info!(namespace = %name, configmap = root_cert::ROOT_CONFIGMAP, "root published")
                }
                Err(e) => errors.push(format!(
                    "ConfigMap {name}/{}: {e}",
                    root_cert::ROOT_CONFIGMAP
                )),
            }
        }
        errors
    }
}
