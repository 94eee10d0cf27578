//! Who a connection is between, for its metrics and access log: workloads looked up in the
//! mesh state, identities from the TLS handshake (never from an address alone).
use std::{net::SocketAddr, sync::Arc};

use super::state::{CLUSTER_NAME, MeshWorkload, SharedMeshState};
use crate::{
    identity::SpiffeId,
    metrics::{
        AccessInfo, ConnectionTelemetry, Metrics, PeerInfo, Reporter, SecurityPolicy, ServiceInfo,
        TrafficLabels,
    },
};

/// The DNS domain of service hostnames (Kubernetes' default cluster domain).
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Builds every connection's telemetry on this node.
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    state: SharedMeshState,
}

/// A service from its `namespace/name` key.
pub fn service_info(key: &str) -> ServiceInfo {
    let (namespace, name) = key.split_once('/').unwrap_or(("unknown", key));
    ServiceInfo {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        hostname: format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}"),
    }
}

fn peer_of(w: &MeshWorkload, principal: Option<&SpiffeId>) -> PeerInfo {
    PeerInfo {
        workload: Some(w.name.to_string()),
        namespace: Some(w.namespace().to_string()),
        principal: principal.map(SpiffeId::uri),
        canonical_service: Some(w.canonical_service.to_string()),
        canonical_revision: Some(w.canonical_revision.to_string()),
        cluster: Some(CLUSTER_NAME.to_owned()),
    }
}

/// What an identity alone says: its namespace and principal.
fn peer_of_identity(id: &SpiffeId) -> PeerInfo {
    PeerInfo {
        namespace: Some(id.namespace.to_string()),
        principal: Some(id.uri()),
        ..PeerInfo::default()
    }
}

impl Telemetry {
    pub fn new(metrics: Arc<Metrics>, state: SharedMeshState) -> Arc<Self> {
        Arc::new(Self { metrics, state })
    }

    fn lookup(&self, addr: SocketAddr) -> Option<Arc<MeshWorkload>> {
        self.state.load().by_ip.get(&addr.ip()).cloned()
    }

    fn build(
        &self,
        reporter: Reporter,
        source: PeerInfo,
        destination: PeerInfo,
        service: Option<&ServiceInfo>,
        security: SecurityPolicy,
        access: AccessInfo,
    ) -> ConnectionTelemetry {
        let labels = TrafficLabels::new(reporter, &source, &destination, service, security);
        ConnectionTelemetry::new(&self.metrics.traffic, labels, access)
    }

    /// The client's agent: `client` is an enrolled pod of this node (attributed by the capture),
    /// `dst` where it goes; `mtls` when it travels in HBONE.
    pub fn outbound(
        &self,
        client: SocketAddr,
        dst: SocketAddr,
        service: Option<&ServiceInfo>,
        hbone: Option<SocketAddr>,
    ) -> ConnectionTelemetry {
        let source = self.lookup(client);
        let destination = self.lookup(dst);
        let security = if hbone.is_some() {
            SecurityPolicy::mutual_tls
        } else {
            SecurityPolicy::unknown
        };
        let src = source
            .as_ref()
            .map_or_else(PeerInfo::default, |w| peer_of(w, Some(&w.identity)));
        // The destination's principal is the one its agent proved (HBONE), or none.
        let dst_peer = destination.as_ref().map_or_else(PeerInfo::default, |w| {
            peer_of(w, hbone.is_some().then_some(&w.identity))
        });
        self.build(
            Reporter::source,
            src,
            dst_peer,
            service,
            security,
            AccessInfo {
                client: Some(client),
                destination: Some(dst),
                hbone,
                ..AccessInfo::default()
            },
        )
    }

    /// The service `host` names (`forwarded: ...;host=` of the CONNECT, a hostname with or
    /// without `:port`), only if `dst`'s pod is one of its endpoints: a client cannot label
    /// traffic to a pod with a service the pod is not part of.
    fn service_by_host(&self, host: &str, dst: SocketAddr) -> Option<ServiceInfo> {
        let host = host.split_once(':').map_or(host, |(n, _)| n);
        let host = host.to_ascii_lowercase();
        let (name, namespace) = host
            .strip_suffix(&format!(".svc.{CLUSTER_DOMAIN}"))?
            .split_once('.')?;
        let state = self.state.load();
        let targets = state.service_named(namespace, name)?;
        targets
            .iter()
            .any(|t| t.endpoints.contains(&dst.ip()))
            .then(|| service_info(&targets[0].key))
    }

    /// The server's agent, for an HBONE stream from `peer` (its certificate's identity);
    /// `service_host` is the hostname the client addressed, as ztunnel sends it (the
    /// destination agent cannot tell a VIP's traffic from a pod's otherwise).
    pub fn inbound_hbone(
        &self,
        peer: &SpiffeId,
        client: SocketAddr,
        dst: SocketAddr,
        hbone: SocketAddr,
        service_host: Option<&str>,
    ) -> ConnectionTelemetry {
        // The client's workload only if the address belongs to a workload of that identity.
        let source = self
            .lookup(client)
            .filter(|w| *w.identity == *peer)
            .map_or_else(|| peer_of_identity(peer), |w| peer_of(&w, Some(peer)));
        let destination = self
            .lookup(dst)
            .map_or_else(PeerInfo::default, |w| peer_of(&w, Some(&w.identity)));
        let service = service_host.and_then(|h| self.service_by_host(h, dst));
        self.build(
            Reporter::destination,
            source,
            destination,
            service.as_ref(),
            SecurityPolicy::mutual_tls,
            AccessInfo {
                client: Some(client),
                destination: Some(dst),
                hbone: Some(hbone),
                ..AccessInfo::default()
            },
        )
    }

    /// The server's agent, for plaintext (no identity: the source is named by address only,
    /// and has no principal).
    pub fn inbound_plaintext(&self, client: SocketAddr, dst: SocketAddr) -> ConnectionTelemetry {
        let source = self
            .lookup(client)
            .map_or_else(PeerInfo::default, |w| peer_of(&w, None));
        let destination = self
            .lookup(dst)
            .map_or_else(PeerInfo::default, |w| peer_of(&w, Some(&w.identity)));
        self.build(
            Reporter::destination,
            source,
            destination,
            None,
            SecurityPolicy::unknown,
            AccessInfo {
                client: Some(client),
                destination: Some(dst),
                ..AccessInfo::default()
            },
        )
    }

    /// Same node, enrolled to enrolled: this agent reports as source and as destination. The
    /// source identity is the one the capture attributed (the pod's veth, not its address).
    pub fn same_node(&self, client: SocketAddr, dst: SocketAddr) -> [ConnectionTelemetry; 2] {
        let source = self
            .lookup(client)
            .map_or_else(PeerInfo::default, |w| peer_of(&w, Some(&w.identity)));
        let destination = self
            .lookup(dst)
            .map_or_else(PeerInfo::default, |w| peer_of(&w, Some(&w.identity)));
        let access = AccessInfo {
            client: Some(client),
            destination: Some(dst),
            ..AccessInfo::default()
        };
        [Reporter::source, Reporter::destination].map(|r| {
            self.build(
                r,
                source.clone(),
                destination.clone(),
                None,
                SecurityPolicy::unknown,
                access.clone(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::LocalConfig;
    use crate::node::state::MeshState;

    const CONFIG: &str = "node: {name: n1}\nworkloads:\n  - {name: a, namespace: x, node: n2, ips: [10.0.0.1], labels: {app: web}}\n  - {name: b, namespace: x, node: n1, ips: [10.0.0.2], hostInterface: veth-b, labels: {app: db}}\nservices:\n  - {name: web, namespace: x, vips: [10.96.0.1], ports: [{port: 80, targetPort: 8080}], selector: {app: web}}\n  - {name: db, namespace: x, vips: [10.96.0.2], ports: [{port: 5432}], selector: {app: db}}\n";

    /// The `destination_service` of the destination reporter's opened-connection series.
    fn inbound_service(host: Option<&str>, dst: &str) -> String {
        let config = LocalConfig::parse(CONFIG).unwrap();
        let state = MeshState::shared(&config);
        let metrics = Metrics::new(None);
        let t = Telemetry::new(Arc::clone(&metrics), state);
        let peer = SpiffeId::new("cluster.local", "x", "default").unwrap();
        let mut c = t.inbound_hbone(
            &peer,
            "10.0.0.9:4000".parse().unwrap(),
            dst.parse().unwrap(),
            "10.0.0.2:15008".parse().unwrap(),
            host,
        );
        c.opened();
        let text = metrics.encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .unwrap_or_else(|| panic!("{text}"));
        let v = line
            .split("destination_service=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap();
        v.to_owned()
    }

    #[test]
    fn forwarded_host_names_the_destination_service_of_its_endpoints_only() {
        assert_eq!(
            inbound_service(Some("db.x.svc.cluster.local"), "10.0.0.2:5432"),
            "db.x.svc.cluster.local"
        );
        assert_eq!(
            inbound_service(Some("db.x.svc.cluster.local:5432"), "10.0.0.2:5432"),
            "db.x.svc.cluster.local",
            "with a port"
        );
        assert_eq!(inbound_service(None, "10.0.0.2:5432"), "unknown");
        // A service the pod is not an endpoint of, or that does not exist: not trusted.
        assert_eq!(
            inbound_service(Some("web.x.svc.cluster.local"), "10.0.0.2:5432"),
            "unknown"
        );
        assert_eq!(
            inbound_service(Some("nope.x.svc.cluster.local"), "10.0.0.2:5432"),
            "unknown"
        );
        // Hostnames compare without case; other shapes name no service.
        assert_eq!(
            inbound_service(Some("DB.X.svc.Cluster.Local"), "10.0.0.2:5432"),
            "db.x.svc.cluster.local"
        );
        for host in [
            "db.x",
            "db.x.svc",
            "x.svc.cluster.local",
            "db.x.y.svc.cluster.local",
        ] {
            assert_eq!(
                inbound_service(Some(host), "10.0.0.2:5432"),
                "unknown",
                "{host}"
            );
        }
    }
}
