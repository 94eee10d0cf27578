//! What the mesh handler knows of the mesh, built from a config and updated by difference: workloads by address
//! (identity, node, enrolment, the waypoint a pod is bound to), services by VIP and port (target
//! port, endpoints, the waypoint a service is bound to). A leaf: the flows and telemetry read
//! it, it calls nothing of them.
//!
//! The data path reads it without a lock: the update loop publishes each new state whole
//! ([`SharedMeshState`]), built from a copy of the last that shares every entry it did not
//! change ([`SnapshotMap`]), so a reader sees one state or the next, never half of a change.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use arc_swap::ArcSwap;
use tracing::warn;

use super::snapshot_map::SnapshotMap;
use crate::{
    discovery::{ConfigDelta, LocalConfig, Service, Workload, delta::Replaced, selection},
    identity::SpiffeId,
    l7::binding::{Binding, GATEWAY_NAME_LABEL, Waypoints},
    names::Name,
};

/// A workload as the mesh handler needs it.
#[derive(Clone, Debug)]
/// Its strings are shared with the config and with other workloads (issue #19: this and the
/// config entry are most of what a remote pod costs).
pub struct MeshWorkload {
    pub name: Name,
    /// Its namespace is the identity's. Shared by the workloads of a service account.
    pub identity: Arc<SpiffeId>,
    pub node: Name,
    pub enrolled: bool,
    /// Istio's canonical service and revision (from its labels), for telemetry.
    pub canonical_service: Name,
    pub canonical_revision: Name,
    /// The waypoint traffic addressed to its own IP goes through (pod bound with
    /// `waypoint-for: workload` or `all`).
    pub waypoint: Option<Arc<WaypointRoute>>,
}

/// Where a waypoint-bound destination's traffic goes.
#[derive(Debug)]
pub enum WaypointRoute {
    /// The waypoint's pods: address and identity.
    Via {
        waypoint: String,
        pods: Vec<(IpAddr, SpiffeId)>,
        next: std::sync::atomic::AtomicUsize,
    },
    /// Bound to a waypoint that does not exist (or was rejected): refused, never bypassed.
    Missing { waypoint: String },
}

impl MeshWorkload {
    /// `namespace/name`, made when logged rather than kept for every workload.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace(), self.name)
    }

    pub fn namespace(&self) -> &Name {
        &self.identity.namespace
    }

    /// W3C baggage describing it (HBONE headers), built when a connection needs it rather than
    /// kept for every workload of the cluster.
    pub fn baggage(&self) -> String {
        format!(
            "k8s.cluster.name={CLUSTER_NAME},k8s.namespace.name={},k8s.pod.name={},service.name={},service.version={}",
            self.namespace(),
            self.name,
            self.canonical_service,
            self.canonical_revision
        )
    }
}

impl WaypointRoute {
    fn of_waypoint(config: &LocalConfig, binding: Binding) -> Option<Self> {
        Some(match binding {
            Binding::Direct => return None,
            Binding::Missing(r) => Self::Missing {
                waypoint: format!("{}/{}", r.namespace, r.name),
            },
            Binding::Waypoint(r) => Self::Via {
                waypoint: format!("{}/{}", r.namespace, r.name),
                pods: Waypoints::serving_pods(config, &r)
                    .into_iter()
                    .flat_map(|p| p.ips.iter().map(move |ip| (*ip, config.identity_of(p))))
                    .collect(),
                next: Default::default(),
            },
        })
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Via { waypoint, .. } | Self::Missing { waypoint } => waypoint,
        }
    }
}

static IDENTITIES: crate::names::Shared<SpiffeId> = crate::names::Shared::new();

/// The cluster name in baggage and telemetry (Istio's default cluster ID).
pub const CLUSTER_NAME: &str = "Kubernetes";

/// A service port: where its traffic goes.
#[derive(Debug)]
pub struct ServiceTarget {
    /// `namespace/name`, shared by the service's ports.
    pub key: Arc<str>,
    /// The waypoint the service is bound to, if any.
    pub waypoint: Option<Arc<WaypointRoute>>,
    pub target_port: u16,
    /// Endpoint addresses of the VIP's family.
    pub endpoints: Vec<IpAddr>,
    /// Round-robin position.
    next: std::sync::atomic::AtomicUsize,
}

impl ServiceTarget {
    /// Endpoints in the order to try them: starting one further each call, so load spreads.
    pub fn candidates(&self) -> Vec<IpAddr> {
        let n = self.endpoints.len();
        if n == 0 {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n;
        (0..n).map(|i| self.endpoints[(start + i) % n]).collect()
    }
}

/// The mesh state in force, read by the data path without a lock and replaced whole by the
/// update loop (the only writer).
pub type SharedMeshState = Arc<ArcSwap<MeshState>>;

/// Workloads of the whole mesh by address, services by (VIP, port), and which node we are.
/// A copy shares its entries with the original (see the module documentation).
#[derive(Clone, Debug, Default)]
pub struct MeshState {
    pub node: String,
    /// Shared by a dual-stack pod's addresses; lookups hand out the `Arc`.
    pub by_ip: SnapshotMap<IpAddr, Arc<MeshWorkload>>,
    pub services: SnapshotMap<(IpAddr, u16), Arc<ServiceTarget>>,
    /// Each service's targets by lowercase `namespace/name`: the service an HBONE request
    /// names by hostname, found without looking through every service.
    by_name: SnapshotMap<Arc<str>, Arc<[Arc<ServiceTarget>]>>,
    /// The config's waypoints, and the route to each, shared by everything bound to it.
    waypoints: Waypoints,
    routes: HashMap<Binding, Option<Arc<WaypointRoute>>>,
}

impl MeshState {
    /// A state to publish as the first: see [`SharedMeshState`].
    pub fn shared(config: &LocalConfig) -> SharedMeshState {
        Arc::new(ArcSwap::from_pointee(Self::from_config(config)))
    }

    pub fn from_config(config: &LocalConfig) -> Self {
        let (waypoints, errors) = Waypoints::of_config(config);
        for e in &errors {
            warn!(error = %e, "waypoint rejected: traffic bound to it is refused");
        }
        let mut state = Self {
            node: config.node.name.clone(),
            waypoints,
            ..Self::default()
        };
        for w in &config.workloads {
            state.add_workload(config, w);
        }
        for svc in &config.services {
            state.add_service(config, svc);
        }
        state
    }

    /// Updates the state after `delta` was applied to `config` (`replaced`: what it replaced).
    /// False when the change reaches beyond its own entries (a waypoint's pods, which every
    /// destination bound to that waypoint routes to): the caller rebuilds instead.
    pub fn apply(
        &mut self,
        config: &LocalConfig,
        delta: &ConfigDelta,
        replaced: &Replaced,
    ) -> bool {
        let waypoint_pod = |w: &Workload| w.labels.contains_key(GATEWAY_NAME_LABEL);
        if delta
            .new_workloads()
            .chain(&replaced.workloads)
            .any(waypoint_pod)
        {
            return false;
        }
        for old in replaced.workloads.iter().filter(|w| !w.host_network) {
            for ip in &old.ips {
                self.by_ip.remove(ip);
            }
        }
        for w in delta.new_workloads() {
            self.add_workload(config, w);
        }
        // Services whose endpoints may have changed: those changed, and those selecting a
        // changed workload before or after.
        let mut affected: HashSet<usize> = HashSet::new();
        for w in delta.new_workloads().chain(&replaced.workloads) {
            affected.extend(
                config
                    .selection
                    .services_in(config, &w.namespace)
                    .into_iter()
                    .filter(|&i| {
                        let s = &config.services[i];
                        s.endpoints.is_none() && selection::selects(s, w)
                    }),
            );
        }
        for old in &replaced.services {
            for vip in &old.vips {
                for p in &old.ports {
                    self.services.remove(&(*vip, p.port));
                }
            }
            self.by_name.remove(&*name_key(&old.namespace, &old.name));
        }
        affected.extend(
            delta
                .new_services()
                .filter_map(|s| config.selection.service(config, &s.namespace, &s.name)),
        );
        for i in affected {
            self.add_service(config, &config.services[i]);
        }
        true
    }

    fn route(&mut self, config: &LocalConfig, binding: Binding) -> Option<Arc<WaypointRoute>> {
        if binding == Binding::Direct {
            return None;
        }
        self.routes
            .entry(binding.clone())
            .or_insert_with(|| WaypointRoute::of_waypoint(config, binding).map(Arc::new))
            .clone()
    }

    fn add_workload(&mut self, config: &LocalConfig, w: &Workload) {
        if w.host_network {
            return;
        }
        let (service, version) = w.canonical_names();
        let binding = self.waypoints.of_workload(config, w);
        let mw = Arc::new(MeshWorkload {
            name: w.name.clone(),
            identity: IDENTITIES.share(&config.identity_of(w)),
            node: w.node.clone(),
            enrolled: config.is_enrolled(w),
            canonical_service: service,
            canonical_revision: version,
            waypoint: self.route(config, binding),
        });
        for ip in &w.ips {
            self.by_ip.insert(*ip, Arc::clone(&mw));
        }
    }

    /// The targets of the service `namespace/name` (any case), if it has a VIP.
    pub fn service_named(&self, namespace: &str, name: &str) -> Option<&[Arc<ServiceTarget>]> {
        self.by_name
            .get(&*name_key(namespace, name))
            .map(|targets| &targets[..])
    }

    /// (Re)places `svc`'s entries.
    fn add_service(&mut self, config: &LocalConfig, svc: &Service) {
        let endpoints = config.endpoint_ips(svc);
        let binding = self.waypoints.of_service(config, svc);
        let waypoint = self.route(config, binding);
        let key: Arc<str> = format!("{}/{}", svc.namespace, svc.name).into();
        let mut targets = Vec::with_capacity(svc.vips.len() * svc.ports.len());
        for vip in &svc.vips {
            let family: Vec<IpAddr> = endpoints
                .iter()
                .filter(|ip| ip.is_ipv4() == vip.is_ipv4())
                .copied()
                .collect();
            for p in &svc.ports {
                let target = Arc::new(ServiceTarget {
                    key: Arc::clone(&key),
                    waypoint: waypoint.clone(),
                    target_port: p.target_port.unwrap_or(p.port),
                    endpoints: family.clone(),
                    next: Default::default(),
                });
                self.services.insert((*vip, p.port), Arc::clone(&target));
                targets.push(target);
            }
        }
        if !targets.is_empty() {
            self.by_name
                .insert(name_key(&svc.namespace, &svc.name), targets.into());
        }
    }
}

/// The `by_name` key of a service.
fn name_key(namespace: &str, name: &str) -> Arc<str> {
    format!("{namespace}/{name}").to_ascii_lowercase().into()
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
