//! Who a connection is between, for its metrics and access log: workloads looked up in the
//! mesh state, identities from the TLS handshake (never from an address alone).
use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
};

use super::mesh::{CLUSTER_NAME, MeshState, MeshWorkload};
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
    state: Arc<RwLock<MeshState>>,
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
        workload: Some(w.name.clone()),
        namespace: Some(w.namespace.clone()),
        principal: principal.map(SpiffeId::uri),
        canonical_service: Some(w.canonical_service.clone()),
        canonical_revision: Some(w.canonical_revision.clone()),
        cluster: Some(CLUSTER_NAME.to_owned()),
    }
}

/// What an identity alone says: its namespace and principal.
fn peer_of_identity(id: &SpiffeId) -> PeerInfo {
    PeerInfo {
        namespace: Some(id.namespace.clone()),
        principal: Some(id.uri()),
        ..PeerInfo::default()
    }
}

impl Telemetry {
    pub fn new(metrics: Arc<Metrics>, state: Arc<RwLock<MeshState>>) -> Arc<Self> {
        Arc::new(Self { metrics, state })
    }

    fn lookup(&self, addr: SocketAddr) -> Option<MeshWorkload> {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_ip
            .get(&addr.ip())
            .cloned()
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

    /// The server's agent, for an HBONE stream from `peer` (its certificate's identity).
    pub fn inbound_hbone(
        &self,
        peer: &SpiffeId,
        client: SocketAddr,
        dst: SocketAddr,
        hbone: SocketAddr,
    ) -> ConnectionTelemetry {
        // The client's workload only if the address belongs to a workload of that identity.
        let source = self
            .lookup(client)
            .filter(|w| &w.identity == peer)
            .map_or_else(|| peer_of_identity(peer), |w| peer_of(&w, Some(peer)));
        let destination = self
            .lookup(dst)
            .map_or_else(PeerInfo::default, |w| peer_of(&w, Some(&w.identity)));
        self.build(
            Reporter::destination,
            source,
            destination,
            None,
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
