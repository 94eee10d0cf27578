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
//! - Inbound plaintext: PERMISSIVE pass-through (the policy issue adds STRICT).
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use mesh_common::capture::PORT_INBOUND_HBONE;
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::{
    capture::listeners::connect_transparent,
    discovery::LocalConfig,
    hbone::{
        client::{Pool, StreamRequest},
        relay,
        server::{self, ServerContext, Target},
    },
    identity::{CertManager, SpiffeId},
};

/// A workload as the mesh handler needs it.
#[derive(Clone, Debug)]
pub struct MeshWorkload {
    pub key: String,
    pub identity: SpiffeId,
    pub node: String,
    pub enrolled: bool,
}

/// Workloads of the whole mesh by address, and which node we are.
#[derive(Clone, Debug, Default)]
pub struct MeshState {
    pub node: String,
    pub by_ip: HashMap<IpAddr, MeshWorkload>,
}

impl MeshState {
    pub fn from_config(config: &LocalConfig) -> Self {
        let mut by_ip = HashMap::new();
        for w in config.workloads.iter().filter(|w| !w.host_network) {
            let mw = MeshWorkload {
                key: format!("{}/{}", w.namespace, w.name),
                identity: config.identity_of(w),
                node: w.node.clone(),
                enrolled: config.is_enrolled(w),
            };
            for ip in &w.ips {
                by_ip.insert(*ip, mw.clone());
            }
        }
        Self {
            node: config.node.name.clone(),
            by_ip,
        }
    }
}

/// Shared by every connection of the mesh handler.
pub struct MeshContext {
    pub state: Arc<RwLock<MeshState>>,
    pub certs: Arc<CertManager>,
    pub pool: Arc<Pool>,
    pub server: Arc<ServerContext>,
}

impl MeshContext {
    fn lookup(&self, ip: IpAddr) -> Option<MeshWorkload> {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_ip
            .get(&ip)
            .cloned()
    }

    fn local_node(&self) -> String {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .node
            .clone()
    }
}

/// What to do with an outbound connection from `client` to `original_dst`.
pub enum Route {
    /// HBONE to a remote enrolled pod.
    Hbone {
        source: SpiffeId,
        destination: MeshWorkload,
    },
    /// Same node, both enrolled: direct, transparent, no TLS.
    SameNode { destination: MeshWorkload },
    /// Not a mesh destination: plaintext pass-through.
    Passthrough,
}

/// Classifies an outbound connection.
pub fn route(
    ctx: &MeshContext,
    client: SocketAddr,
    original_dst: SocketAddr,
) -> Result<Route, &'static str> {
    let source = ctx
        .lookup(client.ip())
        .ok_or("client is not a known workload")?;
    match ctx.lookup(original_dst.ip()) {
        Some(dst) if dst.enrolled && dst.node == ctx.local_node() => {
            Ok(Route::SameNode { destination: dst })
        }
        Some(dst) if dst.enrolled => Ok(Route::Hbone {
            source: source.identity,
            destination: dst,
        }),
        _ => Ok(Route::Passthrough),
    }
}

/// Outbound over HBONE: returns once the connection is done.
pub async fn outbound_hbone(
    ctx: &MeshContext,
    tcp: TcpStream,
    client: SocketAddr,
    original_dst: SocketAddr,
    source: SpiffeId,
    destination: MeshWorkload,
) {
    let cert = match ctx.certs.get(&source).await {
        Ok(c) => c,
        Err(e) => {
            warn!(%client, %original_dst, source = %source, error = %e, "no certificate for the source workload");
            super::handler::reset(tcp);
            return;
        }
    };
    let req = StreamRequest {
        client,
        source: source.clone(),
        source_cert: Arc::clone(&cert.key),
        destination: destination.identity.clone(),
        hbone_addr: SocketAddr::new(original_dst.ip(), PORT_INBOUND_HBONE),
        authority: original_dst,
    };
    let stream = match ctx.pool.open(&req).await {
        Ok(s) => s,
        Err(e) => {
            info!(%client, %original_dst, source = %source, destination = %destination.identity, error = %e, "HBONE stream failed");
            super::handler::reset(tcp);
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let end = relay::relay(tcp, stream.send, stream.recv).await;
    drop(stream.slot);
    info!(%client, %original_dst, source = %source, destination = %destination.identity, end = ?end, "outbound HBONE connection closed");
}

/// Inbound HBONE for the pod at `local` (the dialled address).
pub async fn inbound_hbone(ctx: &MeshContext, tcp: TcpStream, local: SocketAddr) {
    let pod = match ctx.lookup(local.ip()) {
        Some(w) if w.enrolled && w.node == ctx.local_node() => w,
        _ => {
            warn!(%local, "HBONE for an address that is not an enrolled pod of this node");
            super::handler::reset(tcp);
            return;
        }
    };
    let cert = match ctx.certs.get(&pod.identity).await {
        Ok(c) => c,
        Err(e) => {
            warn!(pod = %pod.key, error = %e, "no certificate for the destination workload");
            super::handler::reset(tcp);
            return;
        }
    };
    let target = Target {
        ip: local.ip(),
        identity: pod.identity.clone(),
        cert: Arc::clone(&cert.key),
    };
    server::serve(Arc::clone(&ctx.server), tcp, target).await;
}

/// The connectors both HBONE ends use: transparent, from the client's address.
pub fn transparent_connector() -> crate::hbone::client::Connector {
    Arc::new(|client_ip, dst| Box::pin(connect_transparent(client_ip, dst)))
}
