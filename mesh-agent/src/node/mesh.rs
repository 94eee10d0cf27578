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
//! the policy [`Enforcer`] and closed if a later policy set denies it.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use mesh_common::capture::PORT_INBOUND_HBONE;
use tokio::net::TcpStream;
use tracing::{info, warn};

use super::{
    admission::SetupPermit,
    sockets::{Upstream, connect_direct},
};
use crate::{
    discovery::LocalConfig,
    hbone::{
        client::{HboneError, Pool, StreamRequest},
        relay,
        server::{self, ServerContext, Target},
    },
    identity::{CertManager, SpiffeId},
    l7::binding::{Binding, Waypoints},
    metrics::{ConnectionTelemetry, Meter, Outcome, ResponseFlags},
    policy::{ConnectionAttrs, Enforcer, InboundKind},
};

/// A workload as the mesh handler needs it.
#[derive(Clone, Debug)]
pub struct MeshWorkload {
    pub key: String,
    pub name: String,
    pub namespace: String,
    pub identity: SpiffeId,
    pub node: String,
    pub enrolled: bool,
    /// Istio's canonical service and revision (from its labels), for telemetry.
    pub canonical_service: String,
    pub canonical_revision: String,
    /// W3C baggage describing it (HBONE headers).
    pub baggage: String,
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

impl WaypointRoute {
    fn from_binding(config: &LocalConfig, binding: Binding) -> Option<Arc<Self>> {
        Some(Arc::new(match binding {
            Binding::Direct => return None,
            Binding::Missing(r) => Self::Missing {
                waypoint: format!("{}/{}", r.namespace, r.name),
            },
            Binding::Waypoint(r) => Self::Via {
                waypoint: format!("{}/{}", r.namespace, r.name),
                pods: Waypoints::pods(config, &r)
                    .into_iter()
                    .flat_map(|p| p.ips.iter().map(move |ip| (*ip, config.identity_of(p))))
                    .collect(),
                next: Default::default(),
            },
        }))
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Via { waypoint, .. } | Self::Missing { waypoint } => waypoint,
        }
    }
}

/// The cluster name in baggage and telemetry (Istio's default cluster ID).
pub const CLUSTER_NAME: &str = "Kubernetes";

/// A service port: where its traffic goes.
#[derive(Debug)]
pub struct ServiceTarget {
    pub key: String,
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

/// Workloads of the whole mesh by address, services by (VIP, port), and which node we are.
#[derive(Debug, Default)]
pub struct MeshState {
    pub node: String,
    pub by_ip: HashMap<IpAddr, MeshWorkload>,
    pub services: HashMap<(IpAddr, u16), Arc<ServiceTarget>>,
}

impl MeshState {
    pub fn from_config(config: &LocalConfig) -> Self {
        let (waypoints, errors) = Waypoints::of_config(config);
        for e in &errors {
            warn!(error = %e, "waypoint rejected: traffic bound to it is refused");
        }
        let mut by_ip = HashMap::new();
        for w in config.workloads.iter().filter(|w| !w.host_network) {
            let (service, version) = w.canonical_names();
            let mw = MeshWorkload {
                key: format!("{}/{}", w.namespace, w.name),
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                identity: config.identity_of(w),
                node: w.node.clone(),
                enrolled: config.is_enrolled(w),
                baggage: format!(
                    "k8s.cluster.name={CLUSTER_NAME},k8s.namespace.name={},k8s.pod.name={},service.name={service},service.version={version}",
                    w.namespace, w.name
                ),
                canonical_service: service,
                canonical_revision: version,
                waypoint: WaypointRoute::from_binding(config, waypoints.of_workload(config, w)),
            };
            for ip in &w.ips {
                by_ip.insert(*ip, mw.clone());
            }
        }
        let mut services = HashMap::new();
        for svc in &config.services {
            let endpoints = config.endpoint_ips(svc);
            let waypoint = WaypointRoute::from_binding(config, waypoints.of_service(config, svc));
            for vip in &svc.vips {
                let family: Vec<IpAddr> = endpoints
                    .iter()
                    .filter(|ip| ip.is_ipv4() == vip.is_ipv4())
                    .copied()
                    .collect();
                for p in &svc.ports {
                    services.insert(
                        (*vip, p.port),
                        Arc::new(ServiceTarget {
                            key: format!("{}/{}", svc.namespace, svc.name),
                            waypoint: waypoint.clone(),
                            target_port: p.target_port.unwrap_or(p.port),
                            endpoints: family.clone(),
                            next: Default::default(),
                        }),
                    );
                }
            }
        }
        Self {
            node: config.node.name.clone(),
            by_ip,
            services,
        }
    }
}

/// Shared by every connection of the mesh handler.
pub struct MeshContext {
    pub state: Arc<RwLock<MeshState>>,
    pub certs: Arc<CertManager>,
    pub pool: Arc<Pool>,
    pub server: Arc<ServerContext>,
    pub enforcer: Arc<Enforcer>,
    pub telemetry: Arc<super::telemetry::Telemetry>,
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

    fn service(&self, dst: SocketAddr) -> Option<Arc<ServiceTarget>> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.services.get(&(dst.ip(), dst.port())).cloned()
    }

    /// The waypoint a connection from `client` to `dst` goes through: the service's (when
    /// `dst` is a VIP) or the pod's own binding. A waypoint's own pods are never sent back to it.
    fn waypoint_for(
        &self,
        client: SocketAddr,
        dst: SocketAddr,
        service: Option<&ServiceTarget>,
    ) -> Option<Arc<WaypointRoute>> {
        let route = match service {
            Some(s) => s.waypoint.clone(),
            None => self.lookup(dst.ip()).and_then(|w| w.waypoint),
        }?;
        match &*route {
            WaypointRoute::Via { pods, .. } if pods.iter().any(|(ip, _)| *ip == client.ip()) => {
                None
            }
            _ => Some(route),
        }
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

/// Where a connection to `original_dst` goes: for a service VIP, its endpoints (target port) in
/// round-robin order; otherwise the destination itself.
pub fn destinations(
    ctx: &MeshContext,
    original_dst: SocketAddr,
) -> Result<Vec<SocketAddr>, &'static str> {
    match ctx.service(original_dst) {
        Some(svc) => {
            let c = svc.candidates();
            if c.is_empty() {
                return Err("service has no endpoints");
            }
            Ok(c.into_iter()
                .map(|ip| SocketAddr::new(ip, svc.target_port))
                .collect())
        }
        None => Ok(vec![original_dst]),
    }
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

/// An outbound connection from `client` (the attributed pod `pod`) to `original_dst`, to its end.
/// A service VIP tries its endpoints in round-robin order until one answers.
pub async fn outbound(
    ctx: &MeshContext,
    tcp: TcpStream,
    client: SocketAddr,
    original_dst: SocketAddr,
    pod: &str,
) {
    let service_target = ctx.service(original_dst);
    let service = service_target
        .as_ref()
        .map(|s| super::telemetry::service_info(&s.key));
    if let Some(route) = ctx.waypoint_for(client, original_dst, service_target.as_deref()) {
        via_waypoint(
            ctx,
            tcp,
            client,
            original_dst,
            &route,
            service.as_ref(),
            pod,
        )
        .await;
        return;
    }
    let candidates = match destinations(ctx, original_dst) {
        Ok(c) => c,
        Err(reason) => {
            info!(%client, %original_dst, pod, reason, "no destination");
            ctx.telemetry
                .outbound(client, original_dst, service.as_ref(), None)
                .fail(ResponseFlags::ConnectFailed, reason);
            super::sockets::reset(tcp);
            return;
        }
    };
    let mut last_error = String::new();
    for dst in candidates {
        // An endpoint bound to a waypoint itself (`waypoint-for: workload|all`) is reached
        // through it, also when the client addressed its Service.
        if service.is_some()
            && let Some(route) = ctx.waypoint_for(client, dst, None)
        {
            via_waypoint(ctx, tcp, client, dst, &route, service.as_ref(), pod).await;
            return;
        }
        match route(ctx, client, dst) {
            Ok(Route::Hbone {
                source,
                destination,
            }) => {
                let hbone = SocketAddr::new(dst.ip(), PORT_INBOUND_HBONE);
                let telemetry = ctx
                    .telemetry
                    .outbound(client, dst, service.as_ref(), Some(hbone));
                let host = service.as_ref().map(|s| s.hostname.clone());
                match open_hbone(
                    ctx,
                    client,
                    (hbone, dst),
                    &source,
                    &destination.identity,
                    host,
                )
                .await
                {
                    Ok(stream) => return relay_hbone(tcp, stream, telemetry).await,
                    Err((flags, e)) => {
                        telemetry.fail(flags, &e);
                        last_error = e;
                    }
                }
            }
            Ok(Route::SameNode { .. }) => {
                // We are the destination's agent too: its inbound policy is ours to enforce,
                // for the source identity the capture attributed.
                let source = ctx.lookup(client.ip()).map(|w| w.identity);
                let attrs = ConnectionAttrs {
                    source,
                    source_ip: client.ip(),
                    destination_ip: dst.ip(),
                    destination_port: dst.port(),
                    service_host: None,
                };
                let [mut src_t, mut dst_t] = ctx.telemetry.same_node(client, dst);
                let mut admission = match ctx.enforcer.admit(attrs, InboundKind::SameNode) {
                    Ok(a) => a,
                    Err(d) => {
                        for t in [src_t, dst_t] {
                            let mut t = t;
                            t.set_policy(d.policy.as_deref(), d.reason.as_str());
                            t.fail(ResponseFlags::Denied, "denied by policy");
                        }
                        super::sockets::reset(tcp);
                        return;
                    }
                };
                for t in [&mut src_t, &mut dst_t] {
                    t.set_policy(
                        admission.decision.policy.as_deref(),
                        admission.decision.reason.as_str(),
                    );
                }
                match connect_direct(client, dst, Upstream::Dialled).await {
                    Ok(upstream) => {
                        src_t.opened();
                        dst_t.opened();
                        let both = BothReporters(&src_t, &dst_t);
                        let result =
                            super::handler::splice_tcp(tcp, upstream, &both, admission.revoked())
                                .await;
                        super::handler::closed([src_t, dst_t], &result);
                        return;
                    }
                    Err(e) => {
                        last_error = e.to_string();
                        for t in [src_t, dst_t] {
                            t.fail(ResponseFlags::ConnectFailed, &last_error);
                        }
                    }
                }
            }
            Ok(Route::Passthrough) => {
                let mut telemetry = ctx.telemetry.outbound(client, dst, service.as_ref(), None);
                let how = if service.is_some() {
                    Upstream::ServiceEndpoint
                } else {
                    Upstream::Dialled
                };
                match connect_direct(client, dst, how).await {
                    Ok(upstream) => {
                        telemetry.opened();
                        let result = super::handler::splice_tcp(
                            tcp,
                            upstream,
                            &telemetry,
                            std::future::pending(),
                        )
                        .await;
                        super::handler::closed([telemetry], &result);
                        return;
                    }
                    Err(e) => {
                        last_error = e.to_string();
                        telemetry.fail(ResponseFlags::ConnectFailed, &last_error);
                    }
                }
            }
            Err(reason) => {
                warn!(%client, %original_dst, reason, "refusing captured connection");
                super::sockets::reset(tcp);
                return;
            }
        }
    }
    info!(%client, %original_dst, pod, error = last_error, "every destination failed");
    super::sockets::reset(tcp);
}

/// A connection to a waypoint-bound destination: HBONE to one of the waypoint's pods with the
/// original destination as authority and the client's identity; refused (RST) when the
/// waypoint is missing or none of its pods answers — never sent around it.
async fn via_waypoint(
    ctx: &MeshContext,
    tcp: TcpStream,
    client: SocketAddr,
    original_dst: SocketAddr,
    route: &WaypointRoute,
    service: Option<&crate::metrics::ServiceInfo>,
    pod: &str,
) {
    let refuse = |tcp, why: &str| {
        info!(%client, %original_dst, pod, waypoint = route.name(), reason = why, "refusing a waypoint-bound connection");
        ctx.telemetry
            .outbound(client, original_dst, service, None)
            .fail(ResponseFlags::ConnectFailed, why);
        super::sockets::reset(tcp);
    };
    let (pods, next) = match route {
        WaypointRoute::Missing { .. } => {
            return refuse(tcp, "bound to a waypoint that does not exist");
        }
        WaypointRoute::Via { pods, .. } if pods.is_empty() => {
            return refuse(tcp, "the waypoint has no pods");
        }
        WaypointRoute::Via { pods, next, .. } => (pods, next),
    };
    let Some(source) = ctx.lookup(client.ip()) else {
        return refuse(tcp, "client is not a known workload");
    };
    // The waypoint's addresses of the client's family (the outer connection leaves from the
    // client's address).
    let pods: Vec<&(IpAddr, SpiffeId)> = pods
        .iter()
        .filter(|(ip, _)| ip.is_ipv4() == client.ip().is_ipv4())
        .collect();
    if pods.is_empty() {
        return refuse(tcp, "the waypoint has no address of the client's family");
    }
    let start = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let host = service.map(|s| s.hostname.clone());
    let mut last_error = String::new();
    for i in 0..pods.len() {
        let (ip, identity) = pods[(start + i) % pods.len()];
        let hbone = SocketAddr::new(*ip, PORT_INBOUND_HBONE);
        let telemetry = ctx
            .telemetry
            .outbound(client, original_dst, service, Some(hbone));
        match open_hbone(
            ctx,
            client,
            (hbone, original_dst),
            &source.identity,
            identity,
            host.clone(),
        )
        .await
        {
            Ok(stream) => return relay_hbone(tcp, stream, telemetry).await,
            Err((flags, e)) => {
                telemetry.fail(flags, &e);
                last_error = e;
            }
        }
    }
    info!(%client, %original_dst, pod, waypoint = route.name(), error = last_error,
        "no waypoint pod answered: refused, not bypassed");
    super::sockets::reset(tcp);
}

/// Carries a captured connection over an open HBONE stream to its end.
async fn relay_hbone(
    tcp: TcpStream,
    stream: crate::hbone::client::PooledStream,
    mut telemetry: ConnectionTelemetry,
) {
    telemetry.opened();
    let _ = tcp.set_nodelay(true);
    let end = relay::relay(
        tcp,
        stream.send,
        stream.recv,
        (&telemetry, relay::TcpSide::Client),
    )
    .await;
    drop(stream.slot);
    match &end {
        relay::RelayEnd::Closed(_) => telemetry.close(Outcome::Closed),
        relay::RelayEnd::Reset(_, why) => telemetry.close(Outcome::Reset(why)),
    }
}

/// A same-node connection's bytes count for both of this agent's reports.
struct BothReporters<'a>(&'a ConnectionTelemetry, &'a ConnectionTelemetry);

impl Meter for BothReporters<'_> {
    fn request(&self, n: u64) {
        self.0.request(n);
        self.1.request(n);
    }

    fn response(&self, n: u64) {
        self.0.response(n);
        self.1.response(n);
    }
}

/// Opens the HBONE stream; an error says why in Istio's response flags too (401: denied by the
/// destination's policy, anything else: the connection could not be made).
async fn open_hbone(
    ctx: &MeshContext,
    client: SocketAddr,
    (hbone_addr, authority): (SocketAddr, SocketAddr),
    source: &SpiffeId,
    destination: &SpiffeId,
    service_host: Option<String>,
) -> Result<crate::hbone::client::PooledStream, (ResponseFlags, String)> {
    let cert = ctx.certs.get(source).await.map_err(|e| {
        (
            ResponseFlags::ConnectFailed,
            format!("certificate of {source}: {e}"),
        )
    })?;
    let req = StreamRequest {
        client,
        source: source.clone(),
        source_cert: Arc::clone(&cert.key),
        destination: destination.clone(),
        hbone_addr,
        authority,
        baggage: ctx
            .lookup(client.ip())
            .map(|w| w.baggage)
            .unwrap_or_default(),
        service_host,
    };
    ctx.pool.open(&req).await.map_err(|e| {
        let flags = match &e {
            HboneError::Status { status, .. } if *status == http::StatusCode::UNAUTHORIZED => {
                ResponseFlags::Denied
            }
            _ => ResponseFlags::ConnectFailed,
        };
        (flags, e.to_string())
    })
}

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
            warn!(pod = %pod.key, error = %e, "no certificate for the destination workload");
            super::sockets::reset(tcp);
            return;
        }
    };
    let target = Target {
        ip: local.ip(),
        identity: pod.identity.clone(),
        cert: Arc::clone(&cert.key),
        baggage: pod.baggage.clone(),
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
            let result =
                super::handler::splice_tcp(tcp, upstream, &telemetry, admission.revoked()).await;
            super::handler::closed([telemetry], &result);
        }
        Err(e) => {
            telemetry.fail(ResponseFlags::ConnectFailed, &e.to_string());
            super::sockets::reset(tcp);
        }
    }
}

/// The connectors both HBONE ends use: transparent, from the client's address, retried on
/// silence (see [`super::sockets::connect_soon`]).
pub fn transparent_connector() -> crate::hbone::Connector {
    Arc::new(|client_ip, dst| Box::pin(super::sockets::connect_soon(client_ip, dst)))
}
