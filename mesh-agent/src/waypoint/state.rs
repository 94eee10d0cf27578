//! What one waypoint serves, built from the config: the services and pods bound to it (by
//! VIP:port and by hostname), their endpoints with the identities to expect, and the compiled
//! routes. Rebuilt whole on every config change and swapped in; requests in flight keep the
//! state they started with.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::attach;
use crate::{
    discovery::{Labels, LocalConfig, Name, ServicePort},
    identity::SpiffeId,
    l7::{
        authz::WaypointAuthz,
        binding::{Binding, WaypointRef, Waypoints},
        protocol::Protocol,
        route::{RouteTable, compile::qualify, destination::DestinationRules},
    },
};

/// A pod as the waypoint needs it: where to reach it and who it must prove to be.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub identity: SpiffeId,
    /// `namespace/name`.
    pub key: String,
    pub namespace: Name,
    pub labels: Labels,
    /// Istio's canonical service and revision (telemetry).
    pub canonical_service: Name,
    pub canonical_revision: Name,
}

/// A service bound to this waypoint.
#[derive(Debug)]
pub struct ServiceEntry {
    /// `name.namespace.svc.cluster.local`.
    pub host: String,
    pub name: String,
    pub namespace: String,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
}

impl ServiceEntry {
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}

/// How the client addressed what it reached us for.
#[derive(Clone, Debug)]
pub enum Addressed {
    /// A service VIP and port.
    Service(Arc<ServiceEntry>, ServicePort),
    /// A pod's own address (a pod bound to this waypoint).
    Workload(Endpoint),
}

/// Everything a request needs, for one config.
#[derive(Debug, Default)]
pub struct WaypointState {
    by_vip: HashMap<SocketAddr, (Arc<ServiceEntry>, ServicePort)>,
    /// Every service of the mesh by hostname (routes may send anywhere).
    by_host: HashMap<String, Arc<ServiceEntry>>,
    /// Every pod of the mesh by address (sources, and pods bound to us).
    pods: HashMap<IpAddr, Endpoint>,
    /// Addresses of pods bound to this waypoint (workload-addressed traffic).
    bound_pods: std::collections::HashSet<IpAddr>,
    pub routes: Arc<RouteTable>,
    pub destinations: Arc<DestinationRules>,
    /// AuthorizationPolicies attached to this waypoint or to the Services bound to it.
    pub authz: WaypointAuthz,
    /// Objects rejected, with the field that is wrong (logged at each change).
    pub errors: Vec<String>,
}

impl WaypointState {
    /// The state of waypoint `me` in `config`.
    pub fn build(config: &LocalConfig, me: &WaypointRef) -> Self {
        let mut errors = Vec::new();
        let (waypoints, e) = Waypoints::of_config(config);
        errors.extend(e.iter().map(ToString::to_string));
        let myself = waypoints.get(me).cloned();
        if myself.is_none() {
            errors.push(format!(
                "Gateway {}/{}: not in the config as a waypoint (gatewayClassName mesh-waypoint, an HBONE listener on 15008): this waypoint serves nothing",
                me.namespace, me.name
            ));
        }
        // Routes attached to this waypoint's Gateway apply to the Services bound to it.
        let bound_services: Vec<attach::BoundService> = config
            .services
            .iter()
            .filter(|s| waypoints.of_service(config, s) == Binding::Waypoint(me.clone()))
            .map(|s| (s.name.to_string(), s.namespace.to_string()))
            .collect();
        let policies = attach::attach(&config.policies, me, &bound_services);
        let (routes, e) = RouteTable::build(&policies);
        errors.extend(e.iter().map(ToString::to_string));
        let (destinations, e) = DestinationRules::build(&config.policies);
        errors.extend(e.iter().map(ToString::to_string));
        let authz = match &myself {
            Some(w) => {
                let bound: Vec<(String, String)> = bound_services
                    .iter()
                    .map(|(name, ns)| (ns.clone(), name.clone()))
                    .collect();
                let (authz, e) =
                    WaypointAuthz::build(&config.policies, w, &bound, &config.mesh.root_namespace);
                errors.extend(e);
                authz
            }
            None => WaypointAuthz::default(),
        };
        let mut pods = HashMap::new();
        let mut bound_pods = std::collections::HashSet::new();
        for w in config.workloads.iter().filter(|w| !w.host_network) {
            let (canonical_service, canonical_revision) = w.canonical_names();
            let ep = Endpoint {
                ip: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                identity: config.identity_of(w),
                key: format!("{}/{}", w.namespace, w.name),
                namespace: w.namespace.clone(),
                labels: w.labels.clone(),
                canonical_service,
                canonical_revision,
            };
            let bound = waypoints.of_workload(config, w) == Binding::Waypoint(me.clone());
            for ip in &w.ips {
                pods.insert(
                    *ip,
                    Endpoint {
                        ip: *ip,
                        ..ep.clone()
                    },
                );
                if bound {
                    bound_pods.insert(*ip);
                }
            }
        }
        let mut by_vip = HashMap::new();
        let mut by_host = HashMap::new();
        // Every service can be a route's destination; only those bound to us are served.
        for svc in &config.services {
            let bound = waypoints.of_service(config, svc) == Binding::Waypoint(me.clone());
            // One address per pod (its first: dual-stack pods list IPv4 first), as Envoy
            // takes one address per endpoint.
            let mut seen = std::collections::HashSet::new();
            let endpoints = config
                .endpoint_ips(svc)
                .into_iter()
                .filter_map(|ip| pods.get(&ip).cloned())
                .filter(|ep| seen.insert(ep.key.clone()))
                .collect();
            let entry = Arc::new(ServiceEntry {
                host: qualify(&svc.name, &svc.namespace),
                name: svc.name.to_string(),
                namespace: svc.namespace.to_string(),
                ports: svc.ports.clone(),
                endpoints,
            });
            for vip in svc.vips.iter().filter(|_| bound) {
                for p in &svc.ports {
                    by_vip.insert(SocketAddr::new(*vip, p.port), (Arc::clone(&entry), *p));
                }
            }
            by_host.insert(entry.host.clone(), entry);
        }
        Self {
            by_vip,
            by_host,
            pods,
            bound_pods,
            routes: Arc::new(routes),
            destinations: Arc::new(destinations),
            authz,
            errors,
        }
    }

    /// What a CONNECT authority names, if it is ours to serve.
    pub fn addressed(&self, authority: SocketAddr) -> Option<Addressed> {
        if let Some((svc, port)) = self.by_vip.get(&authority) {
            return Some(Addressed::Service(Arc::clone(svc), *port));
        }
        if self.bound_pods.contains(&authority.ip()) {
            return self
                .pods
                .get(&authority.ip())
                .cloned()
                .map(Addressed::Workload);
        }
        None
    }

    /// A service by hostname (a route's destination).
    pub fn service(&self, host: &str) -> Option<&Arc<ServiceEntry>> {
        self.by_host.get(host)
    }

    /// A pod by address.
    pub fn pod(&self, ip: IpAddr) -> Option<&Endpoint> {
        self.pods.get(&ip)
    }

    /// A pod bound to us (workload-addressed traffic), by address.
    pub fn bound_pod(&self, ip: IpAddr) -> Option<&Endpoint> {
        self.bound_pods.contains(&ip).then(|| self.pods.get(&ip))?
    }

    /// Service ports and pods served (for the log line at each change).
    pub fn served(&self) -> (usize, usize) {
        (self.by_vip.len(), self.bound_pods.len())
    }
}

/// The protocol of a port: declared, or `None` (detect).
pub fn declared(port: &ServicePort) -> Option<Protocol> {
    port.protocol
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
node: {name: n1}
namespaces:
  - {name: shop, labels: {istio.io/dataplane-mode: ambient}}
workloads:
  - {name: wp, namespace: shop, serviceAccount: wp, node: n2, ips: [10.0.0.9],
     labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
  - {name: r1, namespace: shop, serviceAccount: reviews, node: n2, ips: [10.0.0.1], labels: {app: reviews}}
  - {name: p1, namespace: shop, node: n2, ips: [10.0.0.2], labels: {app: pay, istio.io/use-waypoint: waypoint}}
services:
  - {name: reviews, namespace: shop, vips: [10.96.0.1], selector: {app: reviews},
     labels: {istio.io/use-waypoint: waypoint}, ports: [{name: http, port: 9080, targetPort: 8080}]}
  - {name: pay, namespace: shop, vips: [10.96.0.2], selector: {app: pay}, ports: [{port: 80}]}
policies:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: Gateway
    metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: all}}
    spec: {gatewayClassName: mesh-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
  - apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: reviews, namespace: shop}
    spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews}}]}]}
  - apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: broken, namespace: shop}
    spec: {hosts: [reviews], http: [{timeout: soon, route: [{destination: {host: reviews}}]}]}
"#;

    fn me() -> WaypointRef {
        WaypointRef {
            name: "waypoint".into(),
            namespace: "shop".into(),
        }
    }

    #[test]
    fn serves_what_is_bound_to_it_and_reaches_every_service() {
        let config = LocalConfig::parse(CONFIG).unwrap();
        let s = WaypointState::build(&config, &me());
        // The bound service's VIP:port, with its declared protocol.
        match s.addressed("10.96.0.1:9080".parse().unwrap()) {
            Some(Addressed::Service(svc, port)) => {
                assert_eq!(svc.host, "reviews.shop.svc.cluster.local");
                assert_eq!(port.protocol, Some(Protocol::Http));
                assert_eq!(svc.endpoints.len(), 1);
                assert_eq!(svc.endpoints[0].identity.service_account, "reviews");
            }
            other => panic!("{other:?}"),
        }
        // Not bound (the pod is, the Service is not): its VIP is not ours ...
        assert!(s.addressed("10.96.0.2:80".parse().unwrap()).is_none());
        // ... but the pod bound itself is, and any service is a route destination.
        assert!(matches!(
            s.addressed("10.0.0.2:80".parse().unwrap()),
            Some(Addressed::Workload(ep)) if ep.key == "shop/p1"
        ));
        assert!(s.addressed("10.0.0.1:8080".parse().unwrap()).is_none());
        assert!(s.service("pay.shop.svc.cluster.local").is_some());
        assert_eq!(s.served(), (1, 1));
        // The rejected VirtualService is reported with its field; the good one is served.
        assert_eq!(s.routes.len(), 1);
        assert!(
            s.errors
                .iter()
                .any(|e| e.contains("shop/broken") && e.contains("timeout")),
            "{:?}",
            s.errors
        );
    }

    #[test]
    fn another_waypoint_or_a_missing_gateway_serves_nothing() {
        let config = LocalConfig::parse(CONFIG).unwrap();
        let other = WaypointRef {
            name: "other".into(),
            namespace: "shop".into(),
        };
        let s = WaypointState::build(&config, &other);
        assert_eq!(s.served(), (0, 0));
        assert!(
            s.errors.iter().any(|e| e.contains("shop/other")),
            "{:?}",
            s.errors
        );
    }
}
