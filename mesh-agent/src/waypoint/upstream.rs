//! How the waypoint reaches a route's destination: the service's endpoints (narrowed to the
//! subset's labels), one chosen by the DestinationRule's load balancer among those outlier
//! detection has not ejected, then HBONE to `<pod IP>:15008` with authority `<pod IP>:<target
//! port>` and the waypoint's own identity, expecting the pod's. HTTP connections through those
//! tunnels are kept and reused (HTTP/1.1 one request at a time, HTTP/2 multiplexed).
use std::{
    collections::HashMap,
    future::Future,
    hash::{Hash as _, Hasher as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    time::Instant,
};

use http::{HeaderValue, Request, Response, Uri, Version, header};
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_common::capture::PORT_INBOUND_HBONE;
use tracing::debug;

use super::state::{Endpoint, WaypointState};
use crate::{
    hbone::{
        client::{HboneError, Pool, StreamRequest},
        stream_io::StreamIo,
    },
    identity::{CertManager, SpiffeId},
    l7::{
        protocol::Protocol,
        proxy::{Body, Upstream, UpstreamError},
        resilience::{Balancer, Outliers},
        route::{
            destination::{HashKey, LoadBalancer},
            model::{AttemptOutcome, Target},
        },
    },
};

/// Idle HTTP/1.1 connections kept per endpoint.
const IDLE_PER_ENDPOINT: usize = 64;

/// The client's address, put on each request by the waypoint's inbound side (consistent
/// hashing on the source IP reads it).
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

/// Which pod answered, put on the response for telemetry.
#[derive(Clone, Debug)]
pub struct ServedBy {
    /// `namespace/name`.
    pub key: String,
    pub namespace: String,
    pub principal: String,
    pub canonical_service: String,
}

/// A service host and a subset of it.
type ServiceSubset = (String, Option<String>);

enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Body>),
    Http2(hyper::client::conn::http2::SendRequest<Body>),
}

/// Reaches endpoints over HBONE.
pub struct HboneUpstream {
    state: Arc<arc_swap::ArcSwap<WaypointState>>,
    pool: Arc<Pool>,
    certs: Arc<CertManager>,
    me: SpiffeId,
    baggage: String,
    /// By (service host, subset).
    balancers: Mutex<HashMap<ServiceSubset, Arc<Balancer>>>,
    outliers: Mutex<HashMap<String, Arc<Outliers>>>,
    http1: Mutex<HashMap<SocketAddr, Vec<hyper::client::conn::http1::SendRequest<Body>>>>,
    http2: Mutex<HashMap<SocketAddr, hyper::client::conn::http2::SendRequest<Body>>>,
}

impl HboneUpstream {
    pub fn new(
        state: Arc<arc_swap::ArcSwap<WaypointState>>,
        pool: Arc<Pool>,
        certs: Arc<CertManager>,
        me: SpiffeId,
        baggage: String,
    ) -> Self {
        Self {
            state,
            pool,
            certs,
            me,
            baggage,
            balancers: Mutex::default(),
            outliers: Mutex::default(),
            http1: Mutex::default(),
            http2: Mutex::default(),
        }
    }

    fn state(&self) -> Arc<WaypointState> {
        self.state.load_full()
    }

    /// Opens an HBONE stream to `ep` on `port` as the waypoint.
    pub async fn tunnel(
        &self,
        ep: &Endpoint,
        port: u16,
        service_host: Option<&str>,
    ) -> Result<StreamIo, UpstreamError> {
        let cert = self
            .certs
            .get(&self.me)
            .await
            .map_err(|e| UpstreamError::Connect(format!("the waypoint's certificate: {e}")))?;
        let authority = SocketAddr::new(ep.ip, port);
        let req = StreamRequest {
            client: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            source: self.me.clone(),
            source_cert: Arc::clone(&cert.key),
            destination: ep.identity.clone(),
            hbone_addr: SocketAddr::new(ep.ip, PORT_INBOUND_HBONE),
            authority,
            baggage: self.baggage.clone(),
            service_host: service_host.map(str::to_owned),
            early: bytes::Bytes::new(),
        };
        let stream = self.pool.open(&req).await.map_err(|e| match e {
            HboneError::Status { status, .. } => {
                UpstreamError::Connect(format!("{authority}: the destination answered {status}"))
            }
            other => UpstreamError::Connect(other.to_string()),
        })?;
        Ok(StreamIo::new(stream.send, stream.recv).holding(stream.slot))
    }

    /// A TCP tunnel to one endpoint of `target` (a `tcp[]` route's destination) on service port
    /// `port`: the subset's endpoints, the DestinationRule's load balancer (a consistent hash
    /// has no request to hash, so it balances as its fallback does).
    pub async fn tunnel_to(&self, target: &Target, port: u16) -> Result<StreamIo, UpstreamError> {
        let state = self.state();
        let mut rng = fastrand::Rng::new();
        let (ep, target_port, _, _) = self.choose(&state, target, port, None, &mut rng)?;
        self.tunnel(&ep, target_port, Some(&target.host)).await
    }

    /// The endpoint for a request to `target` on service port `port`, and the port to reach it on.
    fn choose(
        &self,
        state: &WaypointState,
        target: &Target,
        port: u16,
        request: Option<&Request<Body>>,
        rng: &mut fastrand::Rng,
    ) -> Result<(Endpoint, u16, Option<Protocol>, Arc<Balancer>), UpstreamError> {
        // A pod-addressed request: that pod, on the port asked for.
        if let Ok(ip) = target.host.parse::<IpAddr>() {
            let ep = state
                .bound_pod(ip)
                .ok_or_else(|| UpstreamError::NoHealthyUpstream(format!("{ip} is not served")))?;
            return Ok((ep.clone(), port, None, self.balancer(&target.host, None)));
        }
        let svc = state.service(&target.host).ok_or_else(|| {
            UpstreamError::NoHealthyUpstream(format!("unknown service {}", target.host))
        })?;
        let svc_port = svc.port(port);
        let target_port = svc_port.and_then(|p| p.target_port).unwrap_or(port);
        let rule = state.destinations.for_host(&target.host);
        let subset = match (&target.subset, rule) {
            (None, _) => None,
            (Some(name), Some(r)) => Some(r.subset(name).ok_or_else(|| {
                UpstreamError::NoHealthyUpstream(format!(
                    "subset {name} of {} is not defined",
                    target.host
                ))
            })?),
            (Some(name), None) => {
                return Err(UpstreamError::NoHealthyUpstream(format!(
                    "subset {name} of {}: no DestinationRule",
                    target.host
                )));
            }
        };
        let endpoints: Vec<&Endpoint> = svc
            .endpoints
            .iter()
            .filter(|e| subset.is_none_or(|s| s.labels.iter().all(|(k, v)| e.labels.has(k, v))))
            .collect();
        let addrs: Vec<SocketAddr> = endpoints
            .iter()
            .map(|e| SocketAddr::new(e.ip, target_port))
            .collect();
        let policy = rule
            .map(|r| r.resolve(target.subset.as_deref(), port))
            .unwrap_or_default();
        let lb = policy.load_balancer().clone();
        let hash = match &lb {
            LoadBalancer::ConsistentHash(key) => request.and_then(|r| hash_of(key, r)),
            _ => None,
        };
        let outliers = self.outliers(&target.host);
        let balancer = self.balancer(&target.host, target.subset.as_deref());
        let od = policy
            .outlier_detection
            .as_ref()
            .map(|o| (outliers.as_ref(), o.min_health_percent));
        let chosen = balancer
            .pick(&addrs, &lb, hash, od, rng, Instant::now())
            .ok_or_else(|| {
                UpstreamError::NoHealthyUpstream(format!("{} has no endpoints", target.host))
            })?;
        let ep = endpoints
            .into_iter()
            .find(|e| e.ip == chosen.ip())
            .expect("picked among them");
        Ok((
            ep.clone(),
            target_port,
            svc_port.and_then(|p| p.protocol),
            balancer,
        ))
    }

    fn balancer(&self, host: &str, subset: Option<&str>) -> Arc<Balancer> {
        let mut m = self.balancers.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            m.entry((host.to_owned(), subset.map(str::to_owned)))
                .or_default(),
        )
    }

    fn outliers(&self, host: &str) -> Arc<Outliers> {
        let mut m = self.outliers.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(m.entry(host.to_owned()).or_default())
    }

    /// An HTTP connection to `addr` (reused when one is idle, else a new tunnel).
    async fn sender(
        &self,
        ep: &Endpoint,
        addr: SocketAddr,
        http2: bool,
        service_host: Option<&str>,
    ) -> Result<Sender, UpstreamError> {
        if http2 {
            if let Some(s) = self
                .http2
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&addr)
                .filter(|s| !s.is_closed())
            {
                return Ok(Sender::Http2(s.clone()));
            }
        } else {
            let mut idle = self.http1.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(list) = idle.get_mut(&addr) {
                list.retain(|s| !s.is_closed());
                if let Some(i) = list.iter().position(|s| s.is_ready()) {
                    return Ok(Sender::Http1(list.swap_remove(i)));
                }
            }
        }
        let io = TokioIo::new(self.tunnel(ep, addr.port(), service_host).await?);
        if http2 {
            let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await
                .map_err(|e| UpstreamError::Connect(format!("HTTP/2 to {addr}: {e}")))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
                }
            });
            self.http2
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(addr, send.clone());
            Ok(Sender::Http2(send))
        } else {
            let (send, conn) = hyper::client::conn::http1::Builder::new()
                .handshake(io)
                .await
                .map_err(|e| UpstreamError::Connect(format!("HTTP/1.1 to {addr}: {e}")))?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    debug!(%addr, error = %e, "upstream HTTP/1.1 connection ended");
                }
            });
            Ok(Sender::Http1(send))
        }
    }

    fn keep_idle(&self, addr: SocketAddr, send: hyper::client::conn::http1::SendRequest<Body>) {
        let mut idle = self.http1.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(addr).or_default();
        if list.len() < IDLE_PER_ENDPOINT {
            list.push(send);
        }
    }

    async fn send_one(
        &self,
        target: &Target,
        port: u16,
        request: Request<Body>,
    ) -> Result<Response<Body>, UpstreamError> {
        let state = self.state();
        let mut rng = fastrand::Rng::new();
        let (ep, target_port, protocol, balancer) =
            self.choose(&state, target, port, Some(&request), &mut rng)?;
        let addr = SocketAddr::new(ep.ip, target_port);
        let _in_flight = balancer.start(addr);
        // HTTP/2 upstream for ports declared HTTP/2 or gRPC, HTTP/1.1 for ports declared
        // HTTP; undeclared ports keep the client's protocol (as Istio does).
        let http2 = match protocol {
            Some(Protocol::Http2 | Protocol::Grpc) => true,
            Some(_) => false,
            None => request.version() == Version::HTTP_2,
        };
        let service_host = target
            .host
            .parse::<IpAddr>()
            .is_err()
            .then_some(target.host.as_str());
        let request = prepare(request, http2);
        let outliers = self.outliers(&target.host);
        let od = state
            .destinations
            .for_host(&target.host)
            .map(|r| r.resolve(target.subset.as_deref(), port))
            .and_then(|p| p.outlier_detection);
        let total = state.service(&target.host).map_or(1, |s| s.endpoints.len());
        let record = |outcome: AttemptOutcome| {
            if let Some(od) = &od {
                outliers.record(addr, outcome, od, total, Instant::now());
            }
        };
        let sender = match self.sender(&ep, addr, http2, service_host).await {
            Ok(s) => s,
            Err(e) => {
                record(AttemptOutcome::ConnectFailure);
                return Err(e);
            }
        };
        let result = match sender {
            Sender::Http2(mut s) => s.send_request(request).await,
            Sender::Http1(mut s) => {
                let r = s.send_request(request).await;
                if r.is_ok() {
                    // Ready again once this response's body is read.
                    self.keep_idle(addr, s);
                }
                r
            }
        };
        match result {
            Ok(resp) => {
                record(AttemptOutcome::Response {
                    status: resp.status().as_u16(),
                    grpc_status: None,
                });
                let mut resp = resp.map(|b| b.map_err(Into::into).boxed());
                resp.extensions_mut().insert(ServedBy {
                    key: ep.key.clone(),
                    namespace: ep.namespace.to_string(),
                    principal: ep.identity.uri(),
                    canonical_service: ep.canonical_service.to_string(),
                });
                Ok(resp)
            }
            Err(e) => {
                record(AttemptOutcome::Reset);
                Err(UpstreamError::Reset(format!("{addr}: {e}")))
            }
        }
    }
}

impl Upstream for HboneUpstream {
    fn send(
        &self,
        target: &Target,
        port: u16,
        request: Request<Body>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Body>, UpstreamError>> + Send + '_>> {
        let target = target.clone();
        Box::pin(async move { self.send_one(&target, port, request).await })
    }
}

/// Headers that belong to one hop (RFC 9110 §7.6.1), never forwarded; HTTP/2 forbids them.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// The request as the next hop wants it: hop-by-hop headers dropped (`te: trailers` kept for
/// gRPC), and for HTTP/2 an absolute URI carrying the authority instead of `Host`.
fn prepare(mut request: Request<Body>, http2: bool) -> Request<Body> {
    let keep_te = request
        .headers()
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    let upgrade = request.headers().contains_key(header::UPGRADE);
    let h = request.headers_mut();
    for name in HOP_BY_HOP {
        h.remove(name);
    }
    if keep_te {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade && !http2 {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if http2 {
        h.remove(header::UPGRADE);
        let authority = h
            .remove(header::HOST)
            .and_then(|v| v.to_str().ok().map(str::to_owned));
        if let Some(a) = authority {
            let pq = request
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            if let Ok(uri) = Uri::builder()
                .scheme("http")
                .authority(a.as_str())
                .path_and_query(pq)
                .build()
            {
                *request.uri_mut() = uri;
            }
        }
        *request.version_mut() = Version::HTTP_2;
    } else {
        *request.version_mut() = Version::HTTP_11;
    }
    request
}

/// The consistent-hash key's hash, when the request has the attribute.
fn hash_of(key: &HashKey, request: &Request<Body>) -> Option<u64> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match key {
        HashKey::Header(name) => request
            .headers()
            .get(name.as_str())?
            .as_bytes()
            .hash(&mut h),
        HashKey::Cookie { name, .. } => {
            let value = request
                .headers()
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|c| {
                    let (k, v) = c.trim().split_once('=')?;
                    (k == name).then_some(v)
                })?;
            value.hash(&mut h);
        }
        HashKey::SourceIp => request
            .extensions()
            .get::<ClientAddr>()?
            .0
            .ip()
            .hash(&mut h),
        HashKey::QueryParameter(name) => {
            let q = request.uri().query()?;
            let value = q.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k == name).then_some(v)
            })?;
            value.hash(&mut h);
        }
    }
    Some(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)], uri: &str) -> Request<Body> {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(crate::l7::proxy::empty_body()).unwrap()
    }

    #[test]
    fn hop_by_hop_headers_do_not_cross_and_http2_carries_the_authority() {
        let r = prepare(
            req(
                &[
                    ("host", "reviews:9080"),
                    ("connection", "keep-alive"),
                    ("keep-alive", "timeout=5"),
                    ("te", "trailers"),
                    ("transfer-encoding", "chunked"),
                    ("x-keep", "1"),
                ],
                "/a?b=c",
            ),
            true,
        );
        assert_eq!(r.uri().to_string(), "http://reviews:9080/a?b=c");
        assert_eq!(r.version(), Version::HTTP_2);
        for gone in ["host", "connection", "keep-alive", "transfer-encoding"] {
            assert!(!r.headers().contains_key(gone), "{gone}");
        }
        assert_eq!(r.headers()["te"], "trailers");
        assert_eq!(r.headers()["x-keep"], "1");
        let r = prepare(req(&[("host", "reviews"), ("te", "gzip")], "/"), false);
        assert_eq!(r.headers()["host"], "reviews");
        assert!(!r.headers().contains_key("te"));
        assert_eq!(r.version(), Version::HTTP_11);
    }

    #[test]
    fn hash_keys_read_the_attribute_and_are_stable() {
        let a = req(&[("cookie", "a=1; user=jason"), ("x-user", "j")], "/?u=7&v");
        let b = req(&[("cookie", "user=jason"), ("x-user", "j")], "/?v&u=7");
        for key in [
            HashKey::Header("x-user".into()),
            HashKey::Cookie {
                name: "user".into(),
                ttl: None,
            },
            HashKey::QueryParameter("u".into()),
        ] {
            let (ha, hb) = (hash_of(&key, &a), hash_of(&key, &b));
            assert!(ha.is_some(), "{key:?}");
            assert_eq!(ha, hb, "{key:?}");
        }
        assert_eq!(hash_of(&HashKey::Header("x-none".into()), &a), None);
        assert_eq!(hash_of(&HashKey::SourceIp, &a), None);
        let mut c = req(&[], "/");
        c.extensions_mut()
            .insert(ClientAddr("10.0.0.1:5".parse().unwrap()));
        assert!(hash_of(&HashKey::SourceIp, &c).is_some());
    }
}
