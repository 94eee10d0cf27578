//! The HBONE server: TLS with the certificate of the pod the client dialled (the connection's
//! original destination), then one CONNECT per stream, answered as ztunnel does: 200 once the
//! upstream connection is up, 400 for a non-CONNECT method, a malformed authority or an authority
//! that is not the pod this connection was accepted for, 401 when authorization denies, 503 when
//! the upstream connect fails.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::{CONNECTION_WINDOW, Connector, MAX_FRAME, STREAM_WINDOW, relay};
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
    ) -> Result<Admission, Decision>;
}

/// Any authenticated mesh identity (the TLS layer already required the trust domain): for
/// tests of the HBONE layer alone.
pub struct AllowMesh;

impl Authorizer for AllowMesh {
    fn admit(&self, _: &SpiffeId, _: SocketAddr, _: SocketAddr) -> Result<Admission, Decision> {
        Ok(Admission::unconditional())
    }
}

/// Builds the telemetry of one inbound stream (the destination reporter): the peer's
/// certificate identity, the client address, the CONNECT authority and the dialled
/// `<pod>:15008`.
pub type InboundTelemetry =
    Arc<dyn Fn(&SpiffeId, SocketAddr, SocketAddr, SocketAddr) -> ConnectionTelemetry + Send + Sync>;

/// No telemetry (tests of the HBONE layer alone).
pub fn no_telemetry() -> InboundTelemetry {
    Arc::new(|_, _, _, _| ConnectionTelemetry::disabled())
}

/// Everything a connection needs, shared.
pub struct ServerContext {
    pub roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub trust_domain: String,
    pub authorizer: Arc<dyn Authorizer>,
    pub connector: Connector,
    pub telemetry: InboundTelemetry,
}

/// Serves one accepted connection (already known to be for `target`) to its end.
/// `handshake_permit` (the caller's admission slot) is dropped as soon as the TLS handshake ends.
pub async fn serve(
    ctx: Arc<ServerContext>,
    tcp: TcpStream,
    target: Target,
    handshake_permit: impl Send,
) {
    let (Ok(outer_peer), Ok(outer_local)) = (tcp.peer_addr(), tcp.local_addr()) else {
        return;
    };
    let outer_local = SocketAddr::new(outer_local.ip().to_canonical(), outer_local.port());
    // HTTP/2 writes small frames (HEADERS, then DATA): Nagle would hold them for an ACK.
    let _ = tcp.set_nodelay(true);
    let outer_peer = SocketAddr::new(outer_peer.ip().to_canonical(), outer_peer.port());
    let config = match tls::server_config(Arc::clone(&target.cert), &ctx.roots, &ctx.trust_domain) {
        Ok(c) => c,
        Err(e) => {
            warn!(pod = %target.identity, error = %e, "HBONE: no TLS configuration");
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
            info!(client = %outer_peer, pod = %target.identity, error = %e, "HBONE: TLS handshake refused");
            return;
        }
        Err(_) => return,
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
    let mut conn = match h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(1000)
        .handshake::<_, Bytes>(tls)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            debug!(client = %outer_peer, error = %e, "HBONE: HTTP/2 handshake failed");
            return;
        }
    };
    let target = Arc::new(target);
    let peer = Arc::new(peer);
    while let Some(req) = conn.accept().await {
        let Ok((req, respond)) = req else { break };
        let (ctx, target, peer) = (Arc::clone(&ctx), Arc::clone(&target), Arc::clone(&peer));
        tokio::spawn(async move {
            stream(ctx, req, respond, &target, &peer, (outer_peer, outer_local)).await
        });
    }
}

async fn stream(
    ctx: Arc<ServerContext>,
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    target: &Target,
    peer: &SpiffeId,
    (outer_peer, outer_local): (SocketAddr, SocketAddr),
) {
    let reply = |respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode| {
        let resp = Response::builder()
            .status(status)
            .body(())
            .expect("static response");
        respond.send_response(resp, true).map(drop)
    };
    if req.method() != Method::CONNECT {
        let _ = reply(&mut respond, StatusCode::BAD_REQUEST);
        return;
    }
    let Some(dst) = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        let _ = reply(&mut respond, StatusCode::BAD_REQUEST);
        return;
    };
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    if dst.ip() != target.ip {
        info!(peer = %peer, %dst, pod_ip = %target.ip, "HBONE: authority is not the dialled pod");
        let _ = reply(&mut respond, StatusCode::BAD_REQUEST);
        return;
    }
    // The client address: the outer connection's source (the source agent connects from the
    // client pod's address); the port from `forwarded` when present.
    let client = SocketAddr::new(outer_peer.ip(), forwarded_port(req.headers()).unwrap_or(0));
    let mut telemetry = (ctx.telemetry)(peer, client, dst, outer_local);
    // The enforcer logs and counts the decision.
    let mut admission = match ctx.authorizer.admit(peer, client, dst) {
        Ok(a) => a,
        Err(d) => {
            let _ = reply(&mut respond, StatusCode::UNAUTHORIZED);
            telemetry.set_policy(d.policy.as_deref(), d.reason.as_str());
            telemetry.fail(ResponseFlags::Denied, "denied by policy");
            return;
        }
    };
    telemetry.set_policy(
        admission.decision.policy.as_deref(),
        admission.decision.reason.as_str(),
    );
    let upstream = match tokio::time::timeout(
        Duration::from_secs(10),
        (ctx.connector)(client.ip(), dst),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            info!(peer = %peer, %dst, error = %e, "HBONE: upstream connect failed");
            let _ = reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            telemetry.fail(ResponseFlags::ConnectFailed, &e.to_string());
            return;
        }
        Err(_) => {
            let _ = reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            telemetry.fail(ResponseFlags::ConnectFailed, "upstream connect timed out");
            return;
        }
    };
    let ok = Response::builder()
        .status(StatusCode::OK)
        .header("baggage", &target.baggage)
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

/// The port of `forwarded: for="<ip>:<port>"` (or `for="[v6]:port"`).
fn forwarded_port(headers: &http::HeaderMap) -> Option<u16> {
    let v = headers.get("forwarded")?.to_str().ok()?;
    let for_ = v.split(';').find_map(|p| p.trim().strip_prefix("for="))?;
    let for_ = for_.trim_matches('"');
    for_.parse::<SocketAddr>().ok().map(|a| a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_port_of_forwarded() {
        let mut h = http::HeaderMap::new();
        h.insert("forwarded", "for=\"10.0.0.1:4242\"".parse().unwrap());
        assert_eq!(forwarded_port(&h), Some(4242));
        h.insert("forwarded", "for=\"[fd00::1]:80\"".parse().unwrap());
        assert_eq!(forwarded_port(&h), Some(80));
        h.insert("forwarded", "for=junk".parse().unwrap());
        assert_eq!(forwarded_port(&h), None);
    }
}
