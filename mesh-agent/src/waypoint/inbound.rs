//! One HBONE stream into the waypoint: the CONNECT's authority names a service VIP:port (or a
//! pod) bound to this waypoint; the stream then carries HTTP (served by hyper, each request
//! through the L7 engine) or opaque TCP (relayed to one endpoint), as the port's protocol
//! says or, undeclared, as its first bytes show.
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Buf as _, Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tracing::info;

use super::{
    Waypoint,
    state::{Addressed, Endpoint},
    upstream::{ClientAddr, ServedBy},
};
use crate::{
    hbone::{
        forwarded,
        server::{connect_authority, reply},
        stream_io::StreamIo,
    },
    identity::SpiffeId,
    l7::{
        authz,
        protocol::{self, Detected},
        proxy::{Body, Destination, Outcome, Source},
        route::matching::ConnectionView,
    },
    metrics::requests::RequestLabels,
    policy::{ConnectionAttrs, RequestView, model::normalize_path},
};

/// How long the waypoint waits for a client's first bytes on a port that declares no protocol
/// before treating it as server-first TCP (Istio's protocol detection timeout is similar).
const DETECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Bytes read while detecting.
const DETECT_MAX: usize = 64;

/// Serves one stream to its end.
pub async fn stream(
    wp: Arc<Waypoint>,
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    peer: Arc<SpiffeId>,
    (outer_peer, _outer_local): (SocketAddr, SocketAddr),
) {
    let Some(authority) = connect_authority(&req, &mut respond) else {
        return;
    };
    let state = wp.state();
    let Some(addressed) = state.addressed(authority) else {
        info!(%peer, %authority, "waypoint: not a service or pod bound to this waypoint (400)");
        reply(&mut respond, StatusCode::BAD_REQUEST);
        return;
    };
    // The client: the outer connection's source address (the client's agent connects from
    // the client pod's address), its port from `forwarded`.
    let fwd = forwarded::from_headers(req.headers());
    let client = SocketAddr::new(outer_peer.ip(), fwd.for_addr.map_or(0, |a| a.port()));
    let source = state
        .pod(client.ip())
        .filter(|p| p.identity == *peer)
        .cloned();
    let ok = Response::builder()
        .status(StatusCode::OK)
        .body(())
        .expect("static response");
    let Ok(send) = respond.send_response(ok, false) else {
        return;
    };
    let io = StreamIo::new(send, req.into_body());
    let declared = match &addressed {
        Addressed::Service(_, port) => port.protocol,
        Addressed::Workload(_) => None,
    };
    let (io, http) = match declared {
        Some(p) => (Prefixed::new(Bytes::new(), io), p.is_http()),
        None => detect(io).await,
    };
    let conn = Connection {
        wp,
        authority,
        peer,
        client,
        source,
        addressed,
    };
    if http {
        conn.serve_http(io).await;
    } else {
        conn.relay_tcp(io).await;
    }
}

/// Reads the first bytes and decides: HTTP, or opaque (including a client that says nothing
/// within [`DETECT_TIMEOUT`]).
async fn detect(mut io: StreamIo) -> (Prefixed<StreamIo>, bool) {
    let mut buf = BytesMut::with_capacity(DETECT_MAX);
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    let http = loop {
        match protocol::detect(&buf) {
            Detected::Http1 | Detected::Http2 => break true,
            Detected::Opaque => break false,
            Detected::NeedMore if buf.len() >= DETECT_MAX => break false,
            Detected::NeedMore => {}
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => break false,
        }
    };
    (Prefixed::new(buf.freeze(), io), http)
}

/// One client connection's context.
struct Connection {
    wp: Arc<Waypoint>,
    /// The CONNECT authority (the original destination).
    authority: SocketAddr,
    peer: Arc<SpiffeId>,
    client: SocketAddr,
    /// The client pod, when its address and certificate agree.
    source: Option<Endpoint>,
    addressed: Addressed,
}

impl Connection {
    fn destination(&self) -> Destination {
        match &self.addressed {
            Addressed::Service(svc, port) => Destination {
                host: svc.host.clone(),
                port: port.port,
            },
            Addressed::Workload(ep) => Destination {
                host: ep.ip.to_string(),
                port: self.authority.port(),
            },
        }
    }

    /// Serves the client's HTTP connection; once the waypoint drains, asks it to close after
    /// a request (see [`super::drain`]).
    async fn serve_http(self, io: Prefixed<StreamIo>) {
        let drain = Arc::clone(&self.wp.drain);
        let requests = Arc::new(tokio::sync::Notify::new());
        let this = Arc::new(self);
        let service = {
            let requests = Arc::clone(&requests);
            hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                requests.notify_one();
                let this = Arc::clone(&this);
                async move { Ok::<_, std::convert::Infallible>(this.request(req).await) }
            })
        };
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let ended = tokio::select! {
            r = conn.as_mut() => r,
            () = drain.close_after_a_request(&requests) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "waypoint: client connection ended");
        }
    }

    /// One request through the engine, counted and logged.
    async fn request(&self, mut req: Request<hyper::body::Incoming>) -> Response<Body> {
        let started = Instant::now();
        let dst = self.destination();
        req.extensions_mut().insert(ClientAddr(self.client));
        let protocol = if req.version() == http::Version::HTTP_2 {
            if req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
            {
                "grpc"
            } else {
                "http"
            }
        } else {
            "http"
        };
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let source = Source {
            namespace: self.source.as_ref().map(|s| s.namespace.clone()),
            labels: self.source.as_ref().map(|s| s.labels.clone()),
        };
        // WebSocket and other HTTP/1.1 upgrades: the engine routes the request; once the
        // upstream agrees (101) the two upgraded connections are joined byte for byte.
        let client_upgrade = req
            .headers()
            .contains_key(http::header::UPGRADE)
            .then(|| hyper::upgrade::on(&mut req));
        let denied = self.authorize(Some(&req));
        let (mut resp, outcome) = match &denied {
            Some(_) => (authz::denied(protocol == "grpc"), Outcome::default()),
            None => {
                let mut rng = fastrand::Rng::new();
                let engine = Arc::clone(&self.wp.engine);
                engine.handle_from(&dst, &source, req, &mut rng).await
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client) = client_upgrade
        {
            let server = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(c), Ok(s)) = tokio::join!(client, server) {
                    let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                }
            });
        }
        let served_by = resp.extensions().get::<ServedBy>().cloned();
        let millis = started.elapsed().as_secs_f64() * 1000.0;
        self.record(
            &dst,
            protocol,
            resp.status(),
            &outcome,
            served_by.as_ref(),
            millis,
        );
        info!(
            target: "access",
            reporter = "waypoint",
            src.addr = %self.client,
            src.identity = %self.peer,
            method = %method,
            path = %path,
            dst.service = %dst.host,
            dst.workload = served_by.as_ref().map_or("-", |s| s.key.as_str()),
            status = resp.status().as_u16(),
            flags = %outcome.flags(),
            route = outcome.rule.as_deref().unwrap_or("-"),
            attempts = outcome.attempts,
            details = denied.as_deref().unwrap_or("-"),
            duration_ms = format_args!("{millis:.1}"),
            "request"
        );
        resp
    }

    /// The waypoint's AuthorizationPolicies for this request (`None`: opaque TCP): `None` when
    /// allowed, else Envoy's response detail naming the policy that denied.
    fn authorize(&self, request: Option<&Request<hyper::body::Incoming>>) -> Option<String> {
        let state = self.wp.state();
        if state.authz.is_empty() {
            return None;
        }
        let service = match &self.addressed {
            Addressed::Service(svc, _) => Some((svc.namespace.as_str(), svc.name.as_str())),
            Addressed::Workload(_) => None,
        };
        let attrs = ConnectionAttrs {
            source: Some((*self.peer).clone()),
            source_ip: self.client.ip(),
            destination_ip: self.authority.ip(),
            destination_port: self.authority.port(),
            service_host: None,
        };
        let path = request.map(|r| normalize_path(r.uri().path()));
        let view = request.zip(path.as_deref()).map(|(r, path)| RequestView {
            method: r.method().as_str(),
            path,
            host: r
                .uri()
                .authority()
                .map(|a| a.as_str())
                .or_else(|| r.headers().get(http::header::HOST)?.to_str().ok())
                .unwrap_or(""),
            headers: r.headers(),
        });
        let decision = state.authz.decide(service, &attrs, view.as_ref());
        (!decision.allowed).then(|| {
            format!(
                "rbac_access_denied_matched_policy[{}]",
                decision.policy.as_deref().unwrap_or("none")
            )
        })
    }

    fn record(
        &self,
        dst: &Destination,
        protocol: &'static str,
        status: StatusCode,
        outcome: &Outcome,
        served_by: Option<&ServedBy>,
        millis: f64,
    ) {
        let unknown = || "unknown".to_owned();
        let (svc_name, svc_ns) = match &self.addressed {
            Addressed::Service(s, _) => (s.name.clone(), s.namespace.clone()),
            Addressed::Workload(_) => (unknown(), unknown()),
        };
        let labels = RequestLabels {
            reporter: "waypoint",
            source_workload: self.source.as_ref().map_or_else(unknown, |s| {
                s.key.rsplit('/').next().unwrap_or("").to_owned()
            }),
            source_workload_namespace: self.peer.namespace.to_string(),
            source_principal: self.peer.uri(),
            source_canonical_service: self
                .source
                .as_ref()
                .map_or_else(unknown, |s| s.canonical_service.to_string()),
            destination_workload: served_by.map_or_else(unknown, |s| {
                s.key.rsplit('/').next().unwrap_or("").to_owned()
            }),
            destination_workload_namespace: served_by.map_or_else(unknown, |s| s.namespace.clone()),
            destination_principal: served_by.map_or_else(unknown, |s| s.principal.clone()),
            destination_canonical_service: served_by
                .map_or_else(unknown, |s| s.canonical_service.to_string()),
            destination_service: dst.host.clone(),
            destination_service_name: svc_name,
            destination_service_namespace: svc_ns,
            request_protocol: protocol,
            response_code: status.as_u16(),
            response_flags: outcome.flags(),
            connection_security_policy: "mutual_tls",
        };
        self.wp.metrics.record(labels, millis);
    }

    /// Opaque TCP: to the destination of the first matching `tcp[]` route (by weight, then the
    /// DestinationRule's balancer), else to one endpoint of the service (round robin), or to
    /// the addressed pod.
    async fn relay_tcp(self, mut io: Prefixed<StreamIo>) {
        if let Some(details) = self.authorize(None) {
            info!(
                target: "access",
                reporter = "waypoint",
                src.addr = %self.client,
                src.identity = %self.peer,
                authority = %self.authority,
                details,
                "connection denied"
            );
            return;
        }
        let upstream = match &self.addressed {
            Addressed::Workload(ep) => {
                self.wp
                    .upstream
                    .tunnel(ep, self.authority.port(), None)
                    .await
            }
            Addressed::Service(svc, port) => {
                let view = ConnectionView {
                    port: port.port,
                    destination: self.authority.ip(),
                    source_labels: self.source.as_ref().map(|s| &s.labels),
                    source_namespace: self.source.as_ref().map(|s| s.namespace.as_str()),
                };
                let routing = self.wp.engine.routing();
                let roll = fastrand::u64(..);
                match routing.routes.tcp_route(&svc.host, &view, roll) {
                    Some(route) => {
                        let port = route.target.port.unwrap_or(port.port);
                        self.wp.upstream.tunnel_to(&route.target, port).await
                    }
                    None => {
                        let n = svc.endpoints.len();
                        if n == 0 {
                            info!(service = %svc.host, "waypoint: TCP to a service without endpoints");
                            return;
                        }
                        let i = self
                            .wp
                            .tcp_next
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                            % n;
                        let target_port = port.target_port.unwrap_or(port.port);
                        self.wp
                            .upstream
                            .tunnel(&svc.endpoints[i], target_port, Some(&svc.host))
                            .await
                    }
                }
            }
        };
        match upstream {
            Ok(mut up) => {
                if let Err(e) = tokio::io::copy_bidirectional(&mut io, &mut up).await {
                    tracing::debug!(error = %e, "waypoint: TCP relay ended");
                }
            }
            Err(e) => {
                info!(authority = %self.authority, error = %e, "waypoint: TCP upstream failed")
            }
        }
    }
}

/// A stream with bytes already read put back in front.
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
