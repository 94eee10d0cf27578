//! Outbound: a connection captured from a pod of this node, to its end — through a waypoint
//! when its destination is bound to one, over HBONE to a remote enrolled pod, directly (no
//! TLS) to an enrolled pod of this node (whose inbound policy we enforce), or passed through
//! to anything outside the mesh.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use bytes::Bytes;
use mesh_common::capture::PORT_INBOUND_HBONE;
use tokio::{io::AsyncWriteExt as _, net::TcpStream};
use tracing::{info, warn};

use super::{
    direct::{Moved, closed, splice_tcp},
    mesh::{MeshContext, MeshWorkload, WaypointRoute},
    sockets::{Upstream, connect_direct},
};
use crate::{
    hbone::{
        EARLY_DATA_MAX,
        client::{HboneError, StreamRequest},
        relay,
    },
    identity::SpiffeId,
    metrics::{ConnectionTelemetry, Meter, Outcome, ResponseFlags},
    policy::{ConnectionAttrs, InboundKind},
};

/// What to do with an outbound connection from `client` to `original_dst`.
pub enum Route {
    /// HBONE to a remote enrolled pod.
    Hbone {
        source: SpiffeId,
        destination: Arc<MeshWorkload>,
    },
    /// Same node, both enrolled: direct, transparent, no TLS.
    SameNode,
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
        Some(dst) if dst.enrolled && dst.node == ctx.local_node() => Ok(Route::SameNode),
        Some(dst) if dst.enrolled => Ok(Route::Hbone {
            source: (*source.identity).clone(),
            destination: dst,
        }),
        _ => Ok(Route::Passthrough),
    }
}

/// An outbound connection from `client` (the attributed pod `pod`) to `original_dst`, to its end.
/// A service VIP tries its endpoints in round-robin order until one answers.
pub async fn outbound(
    ctx: &MeshContext,
    mut tcp: TcpStream,
    client: SocketAddr,
    original_dst: SocketAddr,
    pod: &str,
) {
    let service_target = ctx.service(original_dst);
    let service = service_target
        .as_ref()
        .map(|s| super::telemetry::service_info(&s.key));
    let mut early = Early::default();
    if let Some(route) = ctx.waypoint_for(client, original_dst, service_target.as_deref()) {
        via_waypoint(
            ctx,
            (tcp, &mut early),
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
            let tcp = (tcp, &mut early);
            via_waypoint(ctx, tcp, client, dst, &route, service.as_ref(), pod).await;
            return;
        }
        match route(ctx, client, dst) {
            Ok(Route::Hbone {
                source,
                destination,
            }) => {
                let target = HboneTarget {
                    hbone: SocketAddr::new(dst.ip(), PORT_INBOUND_HBONE),
                    authority: dst,
                    source: &source,
                    destination: &destination.identity,
                    service: service.as_ref(),
                };
                match attempt_hbone(ctx, (tcp, &mut early), client, target).await {
                    Ok(()) => return,
                    Err((given_back, e)) => (tcp, last_error) = (given_back, e),
                }
            }
            Ok(Route::SameNode) => {
                // We are the destination's agent too: its inbound policy is ours to enforce,
                // for the source identity the capture attributed.
                let source = ctx.lookup(client.ip()).map(|w| (*w.identity).clone());
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
                            relay_direct((tcp, &mut early), upstream, &both, admission.revoked())
                                .await;
                        closed([src_t, dst_t], &result);
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
                        let tcp = (tcp, &mut early);
                        let result =
                            relay_direct(tcp, upstream, &telemetry, std::future::pending()).await;
                        closed([telemetry], &result);
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
    (mut tcp, early): (TcpStream, &mut Early),
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
    let mut last_error = String::new();
    for i in 0..pods.len() {
        let (ip, identity) = pods[(start + i) % pods.len()];
        let target = HboneTarget {
            hbone: SocketAddr::new(*ip, PORT_INBOUND_HBONE),
            authority: original_dst,
            source: &source.identity,
            destination: identity,
            service,
        };
        match attempt_hbone(ctx, (tcp, &mut *early), client, target).await {
            Ok(()) => return,
            Err((given_back, e)) => (tcp, last_error) = (given_back, e),
        }
    }
    info!(%client, %original_dst, pod, waypoint = route.name(), error = last_error,
        "no waypoint pod answered: refused, not bypassed");
    super::sockets::reset(tcp);
}

/// The client's first bytes: read once, without waiting, by the first HBONE attempt (they
/// travel with its CONNECT, see [`StreamRequest::early`]) and kept for every later attempt,
/// whatever its route.
#[derive(Default)]
struct Early(Option<Bytes>);

impl Early {
    /// What the client had sent when first asked (empty if nothing yet); an error is the
    /// client's connection failing, which a later read would no longer report.
    fn read(&mut self, tcp: &TcpStream) -> std::io::Result<Bytes> {
        if let Some(b) = &self.0 {
            return Ok(b.clone());
        }
        let b = super::sockets::read_ready(tcp, EARLY_DATA_MAX)?;
        self.0 = Some(b.clone());
        Ok(b)
    }

    /// The bytes went with an opened stream: not kept for the connection's life.
    fn sent(&mut self) {
        self.0 = Some(Bytes::new());
    }
}

/// [`splice_tcp`] after writing to `upstream` what an HBONE attempt read from the client first.
async fn relay_direct(
    (tcp, early): (TcpStream, &mut Early),
    mut upstream: TcpStream,
    meter: &dyn Meter,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Moved, String> {
    if let Some(b) = early.0.take().filter(|b| !b.is_empty()) {
        if let Err(e) = upstream.write_all(&b).await {
            super::sockets::reset(tcp);
            super::sockets::reset(upstream);
            return Err(format!("upstream: {e}"));
        }
        meter.request(b.len() as u64);
    }
    splice_tcp(tcp, upstream, meter, stop).await
}

/// Where one HBONE attempt goes: the `hbone` address (`<pod>:15008`) with `authority` as the
/// CONNECT's `:authority`, as `source`, to a server proving `destination`.
struct HboneTarget<'a> {
    hbone: SocketAddr,
    authority: SocketAddr,
    source: &'a SpiffeId,
    destination: &'a SpiffeId,
    service: Option<&'a crate::metrics::ServiceInfo>,
}

/// One HBONE attempt for a captured connection: `Ok` once the connection has been carried to
/// its end or ended, `Err` with the connection given back and the reason when another
/// endpoint may be tried.
async fn attempt_hbone(
    ctx: &MeshContext,
    (tcp, early): (TcpStream, &mut Early),
    client: SocketAddr,
    to: HboneTarget<'_>,
) -> Result<(), (TcpStream, String)> {
    let first_bytes = match early.read(&tcp) {
        Ok(b) => b,
        Err(e) => {
            // Nothing was opened on its behalf yet: not a failure of the destination's.
            info!(%client, authority = %to.authority, error = %e,
                "client connection failed before its stream opened");
            super::sockets::reset(tcp);
            return Ok(());
        }
    };
    let telemetry = ctx
        .telemetry
        .outbound(client, to.authority, to.service, Some(to.hbone));
    match open_hbone(ctx, client, &to, first_bytes).await {
        Ok((stream, sent)) => {
            early.sent();
            relay_hbone(tcp, stream, telemetry, sent).await;
            Ok(())
        }
        Err(failed) => {
            telemetry.fail(failed.flags, &failed.message);
            if failed.in_doubt {
                // The first bytes may already be with this destination: another one must not
                // get them too (a request would run twice).
                info!(%client, authority = %to.authority, error = failed.message,
                    "HBONE stream lost after the client's first bytes were sent: not tried elsewhere");
                super::sockets::reset(tcp);
                return Ok(());
            }
            Err((tcp, failed.message))
        }
    }
}

/// Carries a captured connection over an open HBONE stream to its end; `sent` bytes of the
/// client's went with the stream's opening.
async fn relay_hbone(
    tcp: TcpStream,
    stream: crate::hbone::client::PooledStream,
    mut telemetry: ConnectionTelemetry,
    sent: usize,
) {
    telemetry.opened();
    telemetry.request(sent as u64);
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

/// Why an HBONE stream did not open: in Istio's response flags (401: denied by the
/// destination's policy, anything else: the connection could not be made) and in words, and
/// whether the client's first bytes may have reached the destination anyway.
struct OpenFailed {
    flags: ResponseFlags,
    message: String,
    in_doubt: bool,
}

/// Opens the HBONE stream, which carries `early` (the client's first bytes; their length is
/// returned with the stream).
async fn open_hbone(
    ctx: &MeshContext,
    client: SocketAddr,
    to: &HboneTarget<'_>,
    early: Bytes,
) -> Result<(crate::hbone::client::PooledStream, usize), OpenFailed> {
    let source = to.source;
    let cert = ctx.certs.get(source).await.map_err(|e| OpenFailed {
        flags: ResponseFlags::ConnectFailed,
        message: format!("certificate of {source}: {e}"),
        in_doubt: false,
    })?;
    let req = StreamRequest {
        client,
        source: source.clone(),
        source_cert: Arc::clone(&cert.key),
        destination: to.destination.clone(),
        hbone_addr: to.hbone,
        authority: to.authority,
        baggage: ctx
            .lookup(client.ip())
            .map(|w| w.baggage())
            .unwrap_or_default(),
        service_host: to.service.map(|s| s.hostname.clone()),
        early,
    };
    let sent = req.early.len();
    let stream = ctx.pool.open(&req).await.map_err(|e| {
        let flags = match &e {
            HboneError::Status { status, .. } if *status == http::StatusCode::UNAUTHORIZED => {
                ResponseFlags::Denied
            }
            _ => ResponseFlags::ConnectFailed,
        };
        OpenFailed {
            flags,
            message: e.to_string(),
            in_doubt: e.may_have_delivered(),
        }
    })?;
    Ok((stream, sent))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    #[derive(Default)]
    struct Counted(AtomicU64, AtomicU64);

    impl Meter for Counted {
        fn request(&self, n: u64) {
            self.0.fetch_add(n, Ordering::Relaxed);
        }
        fn response(&self, n: u64) {
            self.1.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// A connected pair: (the side we dial, the side we accept).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (c, l.accept().await.unwrap().0)
    }

    /// Bytes a failed HBONE attempt read from the client reach a direct upstream before
    /// everything else, once, and count once.
    #[tokio::test]
    async fn early_bytes_reach_a_direct_upstream_first_and_count_once() {
        let (mut client, tcp) = pair().await;
        let (upstream, mut server) = pair().await;
        let mut early = Early(Some(Bytes::from_static(b"first-")));
        let server = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            server.write_all(b"answer").await.unwrap();
            server.shutdown().await.unwrap();
            got
        });
        client.write_all(b"then").await.unwrap();
        client.shutdown().await.unwrap();
        let meter = Counted::default();
        let relayed = relay_direct((tcp, &mut early), upstream, &meter, std::future::pending());
        let (moved, got) = tokio::join!(relayed, server);
        moved.unwrap();
        assert_eq!(got.unwrap(), b"first-then");
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer");
        assert_eq!(meter.0.load(Ordering::Relaxed), 10);
        assert_eq!(meter.1.load(Ordering::Relaxed), 6);
        assert!(early.0.is_none(), "not kept for the connection's life");
    }

    /// Read once, then the same bytes for every later attempt; once sent, not kept.
    #[tokio::test]
    async fn early_bytes_are_read_once_and_kept_until_sent() {
        let (mut client, tcp) = pair().await;
        client.write_all(b"hello").await.unwrap();
        tcp.readable().await.unwrap();
        let mut early = Early::default();
        assert_eq!(&early.read(&tcp).unwrap()[..], b"hello");
        client.write_all(b" again").await.unwrap();
        assert_eq!(
            &early.read(&tcp).unwrap()[..],
            b"hello",
            "kept, not read again"
        );
        early.sent();
        assert!(early.read(&tcp).unwrap().is_empty());
    }
}
