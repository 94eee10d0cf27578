//! The `mesh` handler: what ztunnel does with a captured connection.
//!
//! - Outbound to an enrolled pod on another node: an HBONE stream to `<pod IP>:15008` with the
//!   source pod's certificate, expecting the destination pod's identity; the outer connection
//!   leaves from the source pod's address (transparently), so the destination agent learns the
//!   client address from it.
//! - Outbound to an enrolled pod on this node: no TLS (nothing leaves the node); delivered
//!   transparently, spliced in the kernel where the capture can.
//! - Outbound to anything else: passed through directly, in plaintext, as ztunnel does.
//! - Inbound HBONE: TLS as the pod that was dialled, CONNECT, delivery from the client address.
//! - Inbound plaintext: refused where PeerAuthentication is STRICT, otherwise authorized
//!   without an identity and delivered.
//!
//! Every connection to a workload of this node (HBONE, plaintext or same-node) is admitted by
//! the policy [`Enforcer`] and closed if a later policy set denies it. The flows live in
//! `outbound.rs` and `inbound.rs`, what they know of the mesh in `state.rs`.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

pub use super::state::{
    CLUSTER_NAME, MeshState, MeshWorkload, ServiceTarget, SharedMeshState, WaypointRoute,
};
use crate::{
    hbone::{client::Pool, server::ServerContext},
    identity::CertManager,
    policy::Enforcer,
};

/// Shared by every connection of the mesh handler.
pub struct MeshContext {
    pub state: SharedMeshState,
    pub certs: Arc<CertManager>,
    pub pool: Arc<Pool>,
    pub server: Arc<ServerContext>,
    pub enforcer: Arc<Enforcer>,
    pub telemetry: Arc<super::telemetry::Telemetry>,
}

impl MeshContext {
    pub(super) fn lookup(&self, ip: IpAddr) -> Option<Arc<MeshWorkload>> {
        self.state.load().by_ip.get(&ip).cloned()
    }

    pub(super) fn service(&self, dst: SocketAddr) -> Option<Arc<ServiceTarget>> {
        self.state
            .load()
            .services
            .get(&(dst.ip(), dst.port()))
            .cloned()
    }

    /// The waypoint a connection from `client` to `dst` goes through: the service's (when
    /// `dst` is a VIP) or the pod's own binding. A waypoint's own pods are never sent back to it.
    pub(super) fn waypoint_for(
        &self,
        client: SocketAddr,
        dst: SocketAddr,
        service: Option<&ServiceTarget>,
    ) -> Option<Arc<WaypointRoute>> {
        let route = match service {
            Some(s) => s.waypoint.clone(),
            None => self.lookup(dst.ip()).and_then(|w| w.waypoint.clone()),
        }?;
        match &*route {
            WaypointRoute::Via { pods, .. } if pods.iter().any(|(ip, _)| *ip == client.ip()) => {
                None
            }
            _ => Some(route),
        }
    }

    pub(super) fn local_node(&self) -> String {
        self.state.load().node.clone()
    }
}

/// The connectors both HBONE ends use: transparent, from the client's address, retried on
/// silence (see [`super::sockets::connect_soon`]).
pub fn transparent_connector() -> crate::hbone::Connector {
    Arc::new(|client_ip, dst| Box::pin(super::sockets::connect_soon(client_ip, dst)))
}
