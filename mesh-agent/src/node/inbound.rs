//! Inbound: HBONE for a pod of this node (TLS as the pod that was dialled, then the HBONE
//! server's CONNECT handling and policy), and plaintext captured on 15006 (PeerAuthentication
//! and AuthorizationPolicy without an identity).
use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;
use tracing::warn;

use super::{
    admission::SetupPermit,
    direct::{closed, splice_tcp},
    mesh::MeshContext,
    sockets::{Upstream, connect_direct},
};
use crate::{
    hbone::server::{self, Target},
    metrics::ResponseFlags,
    policy::{ConnectionAttrs, InboundKind},
};

/// Inbound HBONE for the pod at `local` (the dialled address). `handshake` (an admission
/// permit) is given back as soon as the TLS handshake ends.
pub async fn inbound_hbone(
    ctx: &MeshContext,
    tcp: TcpStream,
    local: SocketAddr,
    handshake: Option<SetupPermit>,
) {
    let pod = match ctx.lookup(local.ip()) {
        Some(w) if w.enrolled && w.node == ctx.local_node() => w,
        _ => {
            warn!(%local, "HBONE for an address that is not an enrolled pod of this node");
            super::sockets::reset(tcp);
            return;
        }
    };
    let cert = match ctx.certs.get(&pod.identity).await {
        Ok(c) => c,
        Err(e) => {
            warn!(pod = %pod.key(), error = %e, "no certificate for the destination workload");
            super::sockets::reset(tcp);
            return;
        }
    };
    let target = Target {
        ip: local.ip(),
        identity: (*pod.identity).clone(),
        cert: Arc::clone(&cert.key),
        baggage: pod.baggage(),
    };
    server::serve(Arc::clone(&ctx.server), tcp, target, handshake).await;
}

/// Plaintext captured on 15006 for the pod at `original_dst`: refused where PeerAuthentication
/// is STRICT, otherwise authorized without identity and delivered from the client's address.
/// `connecting` (an admission permit) is given back once the upstream connect ends.
pub async fn inbound_plaintext(
    ctx: &super::handler::HandlerContext,
    tcp: TcpStream,
    client: SocketAddr,
    original_dst: SocketAddr,
    connecting: Option<SetupPermit>,
) {
    let attrs = ConnectionAttrs {
        source: None,
        source_ip: client.ip(),
        destination_ip: original_dst.ip(),
        destination_port: original_dst.port(),
        service_host: None,
    };
    let mut telemetry = ctx.telemetry.inbound_plaintext(client, original_dst);
    let mut admission = match ctx.enforcer.admit(attrs, InboundKind::Plaintext) {
        Ok(a) => a,
        Err(d) => {
            telemetry.set_policy(d.policy.as_deref(), d.reason.as_str());
            telemetry.fail(ResponseFlags::Denied, "denied by policy");
            super::sockets::reset(tcp);
            return;
        }
    };
    telemetry.set_policy(
        admission.decision.policy.as_deref(),
        admission.decision.reason.as_str(),
    );
    let connected = connect_direct(client, original_dst, Upstream::Dialled).await;
    drop(connecting);
    match connected {
        Ok(upstream) => {
            telemetry.opened();
            let result = splice_tcp(tcp, upstream, &telemetry, admission.revoked()).await;
            closed([telemetry], &result);
        }
        Err(e) => {
            telemetry.fail(ResponseFlags::ConnectFailed, &e.to_string());
            super::sockets::reset(tcp);
        }
    }
}
