//! The HBONE server: TLS with the certificate of the pod the client dialled (the connection's
//! original destination), then one CONNECT per stream, answered as ztunnel does: 200 once the
//! upstream connection is up, 400 for a non-CONNECT method, a malformed authority or an authority
//! that is not the pod this connection was accepted for, 401 when authorization denies, 503 when
//! the upstream connect fails or the peer holds too many upstream connections.
//!
//! HTTP/2 settings as ztunnel's server (`src/proxy/h2/server.rs`): 4 MiB stream and 16 MiB
//! connection windows, 1 MiB frames, 200 concurrent streams, a 64 KiB header list. Past TLS a
//! peer is bounded by [`super::limits`]: the preface within 10 s, a connection without streams
//! closed after 10 min, 4096 upstream connections per peer.
use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use tokio::{net::TcpStream, time::Instant};
use tracing::{debug, info, warn};

use super::{
    CONNECTION_WINDOW, Connector, MAX_FRAME, SERVER_MAX_CONCURRENT_STREAMS, SERVER_MAX_HEADER_LIST,
    STREAM_WINDOW, forwarded,
    limits::{PeerUpstreams, Refusal, ServerCounters, ServerLimits},
    relay,
};
use crate::{
    identity::SpiffeId,
    metrics::{ConnectionTelemetry, Outcome, ResponseFlags},
    policy::{Admission, Decision},
    tls,
};

/// What the server needs to know about the pod a connection is for.
pub struct Target {
    pub ip: IpAddr,
    pub identity: SpiffeId,
    /// Certificate and key of `identity`.
    pub cert: Arc<rustls::sign::CertifiedKey>,
    /// W3C `baggage` describing the destination workload, returned with the 200 (as ztunnel).
    pub baggage: String,
}

/// Decides whether `peer` may open a stream to `dst`; an admitted stream lives as long as its
/// [`Admission`], which also tells when a policy change revokes it.
pub trait Authorizer: Send + Sync {
    fn admit(
        &self,
        peer: &SpiffeId,
        client: SocketAddr,
        dst: SocketAddr,
        service_host: Option<&str>,
    ) -> Result<Admission, Decision>;
}

/// Any authenticated mesh identity (the TLS layer already required the trust domain): for
/// tests of the HBONE layer alone.
pub struct AllowMesh;

impl Authorizer for AllowMesh {
    fn admit(
        &self,
        _: &SpiffeId,
        _: SocketAddr,
        _: SocketAddr,
        _: Option<&str>,
    ) -> Result<Admission, Decision> {
        Ok(Admission::unconditional())
    }
}

/// Builds the telemetry of one inbound stream (the destination reporter): the peer's
/// certificate identity, the client address, the CONNECT authority, the dialled `<pod>:15008`
/// and the service hostname the client addressed (`forwarded: ...;host=`), if it said.
pub type InboundTelemetry = Arc<
    dyn Fn(&SpiffeId, SocketAddr, SocketAddr, SocketAddr, Option<&str>) -> ConnectionTelemetry
        + Send
        + Sync,
>;

/// No telemetry (tests of the HBONE layer alone).
pub fn no_telemetry() -> InboundTelemetry {
    Arc::new(|_, _, _, _, _| ConnectionTelemetry::disabled())
}

/// Everything a connection needs, shared.
pub struct ServerContext {
    pub roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub trust_domain: String,
    pub authorizer: Arc<dyn Authorizer>,
    pub connector: Connector,
    pub telemetry: InboundTelemetry,
    pub limits: ServerLimits,
    pub counters: Arc<ServerCounters>,
    /// Upstream connections per peer, across all connections.
    pub upstreams: Arc<PeerUpstreams>,
    /// Fired when the agent hands over to a successor.
    pub goaway: GoawaySignal,
    /// Above it, new streams are refused (503) and open ones kept.
    pub memory: Arc<crate::memory_cap::MemoryCap>,
}

/// Tells every connection of a server to send GOAWAY and finish the streams it has: the peers
/// then open their new streams on new connections, which reach the agent that took over (see
/// `capture::handover`; fired once the successor's listeners are registered) or, for a
/// draining waypoint, the pods their agents list (`waypoint::drain`). Latches: connections
/// accepted afterwards are told at once.
#[derive(Default)]
pub struct GoawaySignal(tokio::sync::watch::Sender<bool>);

impl GoawaySignal {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }

    /// Whether it has fired.
    pub fn is_fired(&self) -> bool {
        *self.0.borrow()
    }

    /// Its state (`true` once fired), for those that act on it beyond the HBONE layer.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<bool> {
        self.0.subscribe()
    }

    /// Tests: connections accepted from now on are not told, as if they reached the agent that
    /// took over (the connections told already stay told).
    #[cfg(test)]
    pub fn stand_in_for_successor(&self) {
        self.0.send_replace(false);
    }

    /// Resolves once fired; never when there is no signal.
    async fn fired(rx: &mut Option<tokio::sync::watch::Receiver<bool>>) {
        if let Some(rx) = rx
            && rx.wait_for(|fired| *fired).await.is_ok()
        {
            return;
        }
        std::future::pending().await
    }
}

/// Serves one accepted connection (already known to be for `target`) to its end.
/// `handshake_permit` (the caller's admission slot) is dropped as soon as the TLS handshake ends.
pub async fn serve(
    ctx: Arc<ServerContext>,
    tcp: TcpStream,
    target: Target,
    handshake_permit: impl Send,
) {
    let layer = ConnectionLayer {
        roots: &ctx.roots,
        trust_domain: &ctx.trust_domain,
        limits: &ctx.limits,
        counters: &ctx.counters,
        goaway: Some(&ctx.goaway),
    };
    let cert = Arc::clone(&target.cert);
    let identity = target.identity.clone();
    let target = Arc::new(target);
    let on_stream = |req, respond, peer: Arc<SpiffeId>, addrs| {
        let (ctx, target) = (Arc::clone(&ctx), Arc::clone(&target));
        async move { stream(ctx, req, respond, &target, &peer, addrs).await }
    };
    serve_connection(layer, tcp, cert, &identity, handshake_permit, on_stream).await;
}

/// What the connection layer of an HBONE server needs (the node agent's and the waypoint's).
pub struct ConnectionLayer<'a> {
    pub roots: &'a [rustls::pki_types::CertificateDer<'static>],
    pub trust_domain: &'a str,
    pub limits: &'a ServerLimits,
    pub counters: &'a Arc<ServerCounters>,
    /// When to send every peer a GOAWAY (None: only the idle GOAWAY).
    pub goaway: Option<&'a GoawaySignal>,
}

/// The connection layer alone: TLS as `identity` (client certificates chained to `roots`, in
/// the trust domain), the HTTP/2 handshake with ztunnel's settings and the limits, then every
/// stream handed to `on_stream` with the peer's identity and the outer connection's
/// (peer, local) addresses, each on a task of its own.
pub async fn serve_connection<F, Fut>(
    layer: ConnectionLayer<'_>,
    tcp: TcpStream,
    cert: Arc<rustls::sign::CertifiedKey>,
    identity: &SpiffeId,
    handshake_permit: impl Send,
    on_stream: F,
) where
    F: Fn(
        Request<h2::RecvStream>,
        h2::server::SendResponse<Bytes>,
        Arc<SpiffeId>,
        (SocketAddr, SocketAddr),
    ) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (Ok(outer_peer), Ok(outer_local)) = (tcp.peer_addr(), tcp.local_addr()) else {
        return;
    };
    let outer_local = SocketAddr::new(outer_local.ip().to_canonical(), outer_local.port());
    // HTTP/2 writes small frames (HEADERS, then DATA): Nagle would hold them for an ACK.
    let _ = tcp.set_nodelay(true);
    let outer_peer = SocketAddr::new(outer_peer.ip().to_canonical(), outer_peer.port());
    let config = match tls::server_config(cert, layer.roots, layer.trust_domain) {
        Ok(c) => c,
        Err(e) => {
            warn!(pod = %identity, error = %e, "HBONE: no TLS configuration");
            return;
        }
    };
    let tls = match tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsAcceptor::from(config).accept(tcp),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            if let Some(suppressed) = layer.counters.refuse(Refusal::TlsHandshakeError) {
                info!(client = %outer_peer, pod = %identity, error = %e, suppressed, "HBONE: TLS handshake refused");
            }
            return;
        }
        Err(_) => {
            if let Some(suppressed) = layer.counters.refuse(Refusal::TlsHandshakeTimeout) {
                info!(client = %outer_peer, pod = %identity, suppressed, "HBONE: no TLS handshake within 10 s, closing");
            }
            return;
        }
    };
    drop(handshake_permit);
    let Some(peer) = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(tls::identity_of)
    else {
        return;
    };
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(SERVER_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(SERVER_MAX_HEADER_LIST)
        .handshake::<_, Bytes>(tls);
    let mut conn = match tokio::time::timeout(layer.limits.h2_handshake_timeout, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            if let Some(suppressed) = layer.counters.refuse(Refusal::H2HandshakeError) {
                info!(client = %outer_peer, %peer, error = %e, suppressed, "HBONE: HTTP/2 handshake failed");
            }
            return;
        }
        Err(_) => {
            if let Some(suppressed) = layer.counters.refuse(Refusal::H2HandshakeTimeout) {
                info!(client = %outer_peer, %peer, timeout = ?layer.limits.h2_handshake_timeout, suppressed,
                    "HBONE: no HTTP/2 preface after TLS, closing");
            }
            return;
        }
    };
    let peer = Arc::new(peer);
    let streams = Arc::new(OpenStreams::new());
    let mut draining = false;
    let mut goaway = layer.goaway.map(|g| g.0.subscribe());
    // Armed by a GOAWAY: a peer that has not closed by then is not reading.
    let drain_deadline = tokio::time::sleep(Duration::MAX);
    tokio::pin!(drain_deadline);
    loop {
        tokio::select! {
            req = conn.accept() => {
                let (req, respond) = match req {
                    Some(Ok(accepted)) => accepted,
                    Some(Err(e)) if e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) => {
                        if let Some(suppressed) = layer.counters.refuse(Refusal::H2Abuse) {
                            warn!(client = %outer_peer, %peer, error = %e, suppressed,
                                "HBONE: connection closed for HTTP/2 abuse (GOAWAY ENHANCE_YOUR_CALM)");
                        }
                        break;
                    }
                    _ => break,
                };
                let open = OpenStreams::enter(&streams);
                let work = on_stream(req, respond, Arc::clone(&peer), (outer_peer, outer_local));
                tokio::spawn(async move {
                    work.await;
                    drop(open);
                });
            }
            why = goaway_due(&streams, layer.limits.idle_timeout, &mut goaway), if !draining => {
                match why {
                    GoawayReason::Idle => {
                        if let Some(suppressed) = layer.counters.refuse(Refusal::IdleTimeout) {
                            debug!(client = %outer_peer, %peer, suppressed, "HBONE: connection idle, closing");
                        }
                    }
                    GoawayReason::HandOver => {
                        debug!(client = %outer_peer, %peer, open = streams.open(),
                            "HBONE: handing over, GOAWAY (the peer's open streams finish here)");
                    }
                }
                // GOAWAY; streams the client opened meanwhile are still served, then accept()
                // ends.
                conn.graceful_shutdown();
                draining = true;
                drain_deadline.as_mut().reset(tokio::time::Instant::now() + layer.limits.drain_timeout);
            }
            () = &mut drain_deadline, if draining => {
                if streams.open() > 0 {
                    // Streams opened before our GOAWAY reached the peer: theirs to finish.
                    drain_deadline.as_mut().reset(tokio::time::Instant::now() + layer.limits.drain_timeout);
                    continue;
                }
                if let Some(suppressed) = layer.counters.refuse(Refusal::DrainTimeout) {
                    info!(client = %outer_peer, %peer, timeout = ?layer.limits.drain_timeout, suppressed,
                        "HBONE: the peer did not take the GOAWAY (not reading), dropping the connection");
                }
                break;
            }
        }
    }
}

/// Why a connection is told GOAWAY.
enum GoawayReason {
    /// No stream for the idle timeout.
    Idle,
    /// The agent is handing over to its successor.
    HandOver,
}

/// Resolves when the connection should be told GOAWAY, and why.
async fn goaway_due(
    streams: &OpenStreams,
    idle: Duration,
    handover: &mut Option<tokio::sync::watch::Receiver<bool>>,
) -> GoawayReason {
    tokio::select! {
        () = streams.idle_for(idle) => GoawayReason::Idle,
        () = GoawaySignal::fired(handover) => GoawayReason::HandOver,
    }
}

/// Streams open on one connection and since when it has none, for the idle timeout.
struct OpenStreams {
    open: AtomicUsize,
    idle_since: Mutex<Instant>,
}

/// One stream's presence on its connection.
struct StreamPresence(Arc<OpenStreams>);

impl OpenStreams {
    fn new() -> Self {
        Self {
            open: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        }
    }

    fn enter(this: &Arc<Self>) -> StreamPresence {
        this.open.fetch_add(1, Ordering::AcqRel);
        StreamPresence(Arc::clone(this))
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Resolves once the connection has had no stream for `idle` (re-checked as streams come
    /// and go: a stream that opens meanwhile postpones it).
    async fn idle_for(&self, idle: Duration) {
        loop {
            let deadline = if self.open.load(Ordering::Acquire) == 0 {
                *self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) + idle
            } else {
                Instant::now() + idle
            };
            tokio::time::sleep_until(deadline).await;
            let since = *self.idle_since.lock().unwrap_or_else(|e| e.into_inner());
            if self.open.load(Ordering::Acquire) == 0 && since.elapsed() >= idle {
                return;
            }
        }
    }
}

impl Drop for StreamPresence {
    fn drop(&mut self) {
        // Under the lock, so idle_for never sees the count at 0 with an old idle_since.
        let mut since = self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            *since = Instant::now();
        }
    }
}

/// Ends a stream with `status` and no body.
pub fn reply(respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode) {
    let resp = Response::builder()
        .status(status)
        .body(())
        .expect("static response");
    let _ = respond.send_response(resp, true);
}

/// The address a CONNECT stream asks for (IPv4 as IPv4); anything else — another method, an
/// authority that is not `ip:port` — is answered 400 here, as ztunnel does.
pub fn connect_authority(
    req: &Request<h2::RecvStream>,
    respond: &mut h2::server::SendResponse<Bytes>,
) -> Option<SocketAddr> {
    let dst = connect_target(req.method(), req.uri());
    if dst.is_none() {
        reply(respond, StatusCode::BAD_REQUEST);
    }
    dst
}

/// The address a CONNECT asks for: its authority as `ip:port` (an IPv4-mapped IPv6 address
/// as the IPv4 one); None for another method or any other authority (a name is not resolved).
pub fn connect_target(method: &Method, uri: &http::Uri) -> Option<SocketAddr> {
    let dst = (method == Method::CONNECT)
        .then(|| uri.authority())
        .flatten()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())?;
    Some(SocketAddr::new(dst.ip().to_canonical(), dst.port()))
}

async fn stream(
    ctx: Arc<ServerContext>,
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    target: &Target,
    peer: &SpiffeId,
    (outer_peer, outer_local): (SocketAddr, SocketAddr),
) {
    let Some(dst) = connect_authority(&req, &mut respond) else {
        return;
    };
    if dst.ip() != target.ip {
        info!(peer = %peer, %dst, pod_ip = %target.ip, "HBONE: authority is not the dialled pod");
        reply(&mut respond, StatusCode::BAD_REQUEST);
        return;
    }
    // The client address: the outer connection's source (the source agent connects from the
    // client pod's address); the port from `forwarded` when present.
    let fwd = forwarded::from_headers(req.headers());
    let client = SocketAddr::new(outer_peer.ip(), fwd.for_addr.map_or(0, |a| a.port()));
    let mut telemetry = (ctx.telemetry)(peer, client, dst, outer_local, fwd.host.as_deref());
    // The enforcer logs and counts the decision.
    let mut admission = match ctx.authorizer.admit(peer, client, dst, fwd.host.as_deref()) {
        Ok(a) => a,
        Err(d) => {
            reply(&mut respond, StatusCode::UNAUTHORIZED);
            telemetry.set_policy(d.policy.as_deref(), d.reason.as_str());
            telemetry.fail(ResponseFlags::Denied, "denied by policy");
            return;
        }
    };
    telemetry.set_policy(
        admission.decision.policy.as_deref(),
        admission.decision.reason.as_str(),
    );
    if ctx.memory.over() {
        if let Some(suppressed) = ctx.counters.refuse(Refusal::MemoryCap) {
            warn!(%peer, client = %client.ip(), suppressed,
                "HBONE: memory above the agent's cap, refusing new streams (503)");
        }
        reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        telemetry.fail(ResponseFlags::ConnectFailed, "memory above the agent's cap");
        return;
    }
    let Some(_slot) = ctx
        .upstreams
        .acquire(peer, client.ip(), ctx.limits.max_upstreams_per_peer)
    else {
        refuse_peer_limit(&ctx, peer, client.ip());
        reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        telemetry.fail(
            ResponseFlags::ConnectFailed,
            "too many connections from this peer",
        );
        return;
    };
    let upstream = match tokio::time::timeout(
        Duration::from_secs(10),
        (ctx.connector)(client.ip(), dst),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            info!(peer = %peer, %dst, error = %e, "HBONE: upstream connect failed");
            reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            telemetry.fail(ResponseFlags::ConnectFailed, &e.to_string());
            return;
        }
        Err(_) => {
            reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            telemetry.fail(ResponseFlags::ConnectFailed, "upstream connect timed out");
            return;
        }
    };
    // Bytes the client sent before this 200 wait in the stream until the relay reads them.
    let ok = Response::builder()
        .status(StatusCode::OK)
        .header("baggage", &target.baggage)
        .header(super::EARLY_DATA_HEADER, "1")
        .body(())
        .expect("static response");
    let Ok(send) = respond.send_response(ok, false) else {
        telemetry.fail(
            ResponseFlags::ConnectFailed,
            "the client went away before the 200",
        );
        return;
    };
    telemetry.opened();
    let end = relay::relay_until(
        upstream,
        send,
        req.into_body(),
        (&telemetry, relay::TcpSide::Server),
        admission.revoked(),
    )
    .await;
    match &end {
        relay::RelayEnd::Closed(_) => telemetry.close(Outcome::Closed),
        relay::RelayEnd::Reset(_, why) => telemetry.close(Outcome::Reset(why)),
    }
}

fn refuse_peer_limit(ctx: &ServerContext, peer: &SpiffeId, ip: IpAddr) {
    if let Some(suppressed) = ctx.counters.refuse(Refusal::PeerUpstreamLimit) {
        warn!(%peer, client = %ip, limit = ctx.limits.max_upstreams_per_peer, suppressed,
            "HBONE: peer holds too many upstream connections, refusing (503)");
    }
}
