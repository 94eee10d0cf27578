//! One HTTP request through the route table: faults, redirects and direct answers, rewrites
//! and header edits, the weighted pick, the timeout and the retries, mirrors — and the answer
//! Istio's Envoy would give when something fails (404 NR, 503 UF/URX/UH, 504 UT, DI/FI). How the
//! request arrived and how an upstream is reached are the caller's ([`Upstream`]): the waypoint
//! carries both over HBONE, tests over plain TCP.
use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Empty, Full, combinators::BoxBody};

use super::cors::{self, CorsStep};
use super::resilience::Breakers;
use super::route::{
    Decision, RequestView, RouteTable,
    compile::default_retries,
    destination::DestinationRules,
    model::{Abort, AttemptOutcome, HttpRule, RetryPolicy, RuleAction, Target},
};

/// Response bodies: whatever the upstream streams, or our own answers.
pub type Body = BoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why an upstream attempt produced no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No endpoint could be chosen (none ready, or the subset selects none).
    #[error("no healthy upstream: {0}")]
    NoHealthyUpstream(String),
    #[error("connect failed: {0}")]
    Connect(String),
    /// The upstream reset or closed before the response headers.
    #[error("upstream reset: {0}")]
    Reset(String),
}

/// Reaches a service's endpoints: the waypoint opens HBONE to a chosen pod.
pub trait Upstream: Send + Sync {
    fn send(
        &self,
        target: &Target,
        port: u16,
        request: Request<Body>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Body>, UpstreamError>> + Send + '_>>;
}

/// What happened to a request, for the access log and `response_flags` (Envoy's letters).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub flags: Vec<&'static str>,
    /// The rule that applied (`None`: no route object for the host).
    pub rule: Option<String>,
    pub target: Option<String>,
    pub attempts: u32,
}

impl Outcome {
    /// `-` when nothing went wrong, as Istio writes it.
    pub fn flags(&self) -> String {
        if self.flags.is_empty() {
            "-".into()
        } else {
            self.flags.join(",")
        }
    }
}

/// Request bodies are buffered for retries and mirrors up to this size; larger or streaming
/// bodies are sent once (as Envoy does beyond its buffer limit).
pub const RETRY_BODY_LIMIT: u64 = 64 * 1024;
/// Envoy's retry back-off: base 25 ms, at most 250 ms, fully jittered.
const BACKOFF_BASE: Duration = Duration::from_millis(25);
const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// The request as the engine forwards it: head and a body that is either held (replayable)
/// or a one-shot stream.
struct Outgoing {
    head: http::request::Parts,
    body: OutgoingBody,
}

enum OutgoingBody {
    Held(Bytes),
    Stream(Option<Body>),
}

impl Outgoing {
    /// A copy to send, if the body allows another one.
    fn take(&mut self) -> Option<Request<Body>> {
        let body = match &mut self.body {
            OutgoingBody::Held(b) => full(b.clone()),
            OutgoingBody::Stream(s) => s.take()?,
        };
        Some(Request::from_parts(clone_parts(&self.head), body))
    }

    fn replayable(&self) -> bool {
        matches!(self.body, OutgoingBody::Held(_))
    }
}

fn clone_parts(p: &http::request::Parts) -> http::request::Parts {
    let mut r = Request::builder()
        .method(p.method.clone())
        .uri(p.uri.clone())
        .version(p.version)
        .body(())
        .expect("copied from a valid request")
        .into_parts()
        .0;
    r.headers = p.headers.clone();
    r.extensions = p.extensions.clone();
    r
}

fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|e| match e {}).boxed()
}

/// An empty body (requests and answers without content).
pub fn empty_body() -> Body {
    empty()
}

fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed()
}

/// A local answer (no upstream), with Envoy's plain-text body.
pub fn local(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(text.to_owned())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// The request's addressing: the service host (fully qualified) and port the client meant.
#[derive(Clone, Debug)]
pub struct Destination {
    pub host: String,
    pub port: u16,
}

/// The route objects one request is handled with (swapped whole on a config change, so a
/// request never sees half of one).
pub struct Routing {
    pub routes: Arc<RouteTable>,
    pub destinations: Arc<DestinationRules>,
}

/// Who sent a request (the waypoint's first hop), for `sourceLabels` matches.
#[derive(Clone, Debug, Default)]
pub struct Source {
    pub namespace: Option<crate::names::Name>,
    pub labels: Option<crate::names::Labels>,
}

/// Routes and forwards requests for one proxy.
pub struct Engine {
    routing: arc_swap::ArcSwap<Routing>,
    pub upstream: Arc<dyn Upstream>,
    /// Circuit breakers outlive config changes: requests in flight keep their slots.
    breakers: Breakers,
}

impl Engine {
    pub fn new(
        routes: Arc<RouteTable>,
        destinations: Arc<DestinationRules>,
        upstream: Arc<dyn Upstream>,
    ) -> Self {
        Self {
            routing: arc_swap::ArcSwap::from_pointee(Routing {
                routes,
                destinations,
            }),
            upstream,
            breakers: Breakers::default(),
        }
    }

    /// Serves new requests with `routing`; requests in flight finish with what they started with.
    pub fn reconfigure(&self, routing: Routing) {
        self.routing.store(Arc::new(routing));
    }

    /// The routing new requests get.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing.load_full()
    }

    /// Handles one request to `dst`. `rng` draws weights, faults and mirrors.
    pub async fn handle<B>(
        &self,
        dst: &Destination,
        request: Request<B>,
        rng: &mut fastrand::Rng,
    ) -> (Response<Body>, Outcome)
    where
        B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        self.handle_from(dst, &Source::default(), request, rng)
            .await
    }

    /// [`Self::handle`] for a request from a known `source`.
    pub async fn handle_from<B>(
        &self,
        dst: &Destination,
        source: &Source,
        request: Request<B>,
        rng: &mut fastrand::Rng,
    ) -> (Response<Body>, Outcome)
    where
        B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let routing = self.routing();
        let mut outcome = Outcome::default();
        let (head, body) = request.into_parts();
        let path_and_query = head
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let authority = head
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                head.headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| dst.host.clone());
        let scheme = head.uri.scheme_str().unwrap_or("http").to_owned();
        let view = RequestView {
            method: head.method.as_str(),
            scheme: &scheme,
            path_and_query: &path_and_query,
            authority: &authority,
            headers: &head.headers,
            port: dst.port,
            source_labels: source.labels.as_ref(),
            source_namespace: source.namespace.as_deref(),
        };
        let default_rule;
        let (rule, matched, target) = match routing.routes.route(&dst.host, &view, rng.u64(..)) {
            Decision::NoRoute { .. } => {
                outcome.flags.push("NR");
                return (local(StatusCode::NOT_FOUND, "route not found"), outcome);
            }
            Decision::Default => {
                default_rule = DefaultRoute::new(&dst.host);
                (&default_rule.rule, None, Some(&default_rule.target))
            }
            Decision::Rule {
                rule,
                matched,
                target,
                ..
            } => (rule, matched, target),
        };
        outcome.rule = Some(rule.name.clone());
        // CORS runs before faults and routing, as Envoy's filter chain orders them.
        let cors_headers = match rule.cors.as_ref() {
            Some(c) => match cors::evaluate(c, &head.method, &head.headers) {
                CorsStep::Answer(headers) => {
                    let mut resp = Response::new(empty());
                    *resp.headers_mut() = headers;
                    return (resp, outcome);
                }
                CorsStep::Forward(headers) => headers,
            },
            None => HeaderMap::new(),
        };
        if let Some(fault) = &rule.fault {
            let (delay, abort) = fault.sample(rng);
            if let Some(d) = delay {
                outcome.flags.push("DI");
                tokio::time::sleep(d).await;
            }
            if let Some(a) = abort {
                outcome.flags.push("FI");
                return (aborted(a), outcome);
            }
        }
        match &rule.action {
            RuleAction::Redirect(r) => {
                let location = r.location(&scheme, &authority, &path_and_query, dst.port);
                let mut resp = Response::new(empty());
                *resp.status_mut() = r.status;
                if let Ok(v) = HeaderValue::from_str(&location) {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
                return (resp, outcome);
            }
            RuleAction::Direct { status, body } => {
                let mut resp = Response::new(full(body.clone()));
                *resp.status_mut() = *status;
                return (resp, outcome);
            }
            RuleAction::Route(_) => {}
        }
        let Some(target) = target else {
            outcome.flags.push("UH");
            return (
                local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"),
                outcome,
            );
        };
        outcome.target = Some(target.target.host.clone());
        // The forwarded request: rewritten path and authority, the rule's header edits.
        let mut head = head;
        let new_path = match &rule.rewrite {
            Some(rw) => rw.path(&path_and_query, matched),
            None => path_and_query.clone(),
        };
        let new_authority = rule
            .rewrite
            .as_ref()
            .and_then(|rw| rw.authority())
            .map_or_else(|| authority.clone(), str::to_owned);
        head.uri = match http::Uri::builder()
            .path_and_query(new_path.as_str())
            .build()
        {
            Ok(u) => u,
            Err(_) => {
                return (
                    local(StatusCode::BAD_REQUEST, "bad path after rewrite"),
                    outcome,
                );
            }
        };
        if let Ok(v) = HeaderValue::from_str(&new_authority) {
            head.headers.insert(header::HOST, v);
        }
        for edit in rule.header_edits(Some(target), false) {
            edit.apply(&mut head.headers);
        }
        let body = hold_or_stream(&head.headers, body).await;
        let mut outgoing = Outgoing { head, body };
        // Mirrors get a copy (held bodies only) with `-shadow` on the authority; their answers
        // are dropped.
        for m in &rule.mirrors {
            if outgoing.replayable()
                && m.sample(rng)
                && let Some(mut copy) = outgoing.take()
            {
                if let Ok(v) = HeaderValue::from_str(&shadow(&new_authority)) {
                    copy.headers_mut().insert(header::HOST, v);
                }
                let upstream = Arc::clone(&self.upstream);
                let t = m.target.clone();
                let port = dst.port;
                tokio::spawn(async move {
                    let _ = upstream.send(&t, port, copy).await;
                });
            }
        }
        let port = target.target.port.unwrap_or(dst.port);
        // Circuit breaking: the service's (subset's) connection pool thresholds.
        let policy = routing
            .destinations
            .for_host(&target.target.host)
            .map(|d| d.resolve(target.target.subset.as_deref(), port))
            .unwrap_or_default();
        let breaker = self
            .breakers
            .get(&target.target.host, target.target.subset.as_deref());
        let permit = match rule.timeout {
            Some(t) => {
                match tokio::time::timeout(t, breaker.admit(&policy.connection_pool)).await {
                    Ok(p) => p,
                    Err(_) => {
                        outcome.flags.push("UT");
                        return (
                            local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
                            outcome,
                        );
                    }
                }
            }
            None => breaker.admit(&policy.connection_pool).await,
        };
        let Ok(permit) = permit else {
            outcome.flags.push("UO");
            return (
                local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                ),
                outcome,
            );
        };
        let attempts = self.attempts(
            &target.target,
            port,
            &mut outgoing,
            &rule.retries,
            rng,
            &mut outcome,
        );
        let result = match rule.timeout {
            Some(t) => match tokio::time::timeout(t, attempts).await {
                Ok(r) => r,
                Err(_) => {
                    outcome.flags.push("UT");
                    return (
                        local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
                        outcome,
                    );
                }
            },
            None => attempts.await,
        };
        // The slot is held until the response body ends (or is dropped).
        let response = result.map(|body| {
            body.map_frame(move |frame| {
                let _held = &permit;
                frame
            })
            .boxed()
        });
        let mut response = response;
        for edit in rule.header_edits(Some(target), true) {
            edit.apply(response.headers_mut());
        }
        response.headers_mut().extend(cors_headers);
        (response, outcome)
    }

    /// Tries, and retries as the policy says; the last answer when retries run out.
    async fn attempts(
        &self,
        target: &Target,
        port: u16,
        outgoing: &mut Outgoing,
        policy: &RetryPolicy,
        rng: &mut fastrand::Rng,
        outcome: &mut Outcome,
    ) -> Response<Body> {
        let mut tried = 0u32;
        loop {
            let Some(request) = outgoing.take() else {
                outcome.flags.push("URX");
                return local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream request not replayable",
                );
            };
            tried += 1;
            outcome.attempts = tried;
            let send = self.upstream.send(target, port, request);
            let result = match policy.per_try_timeout {
                Some(t) => tokio::time::timeout(t, send).await.map_err(|_| ()),
                None => Ok(send.await),
            };
            let (outcome_kind, answer) = match result {
                Err(()) => (
                    AttemptOutcome::PerTryTimeout,
                    Err((
                        "UT",
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream request timeout",
                    )),
                ),
                Ok(Ok(resp)) => {
                    let grpc_status = grpc_status(resp.headers());
                    (
                        AttemptOutcome::Response {
                            status: resp.status().as_u16(),
                            grpc_status,
                        },
                        Ok(resp),
                    )
                }
                Ok(Err(UpstreamError::NoHealthyUpstream(_))) => {
                    outcome.flags.push("UH");
                    return local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
                }
                Ok(Err(UpstreamError::Connect(_))) => (
                    AttemptOutcome::ConnectFailure,
                    Err((
                        "UF",
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream connect error",
                    )),
                ),
                Ok(Err(UpstreamError::Reset(_))) => (
                    AttemptOutcome::Reset,
                    Err((
                        "UC",
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream reset before headers",
                    )),
                ),
            };
            let retry = tried <= policy.attempts
                && policy.on.retries(outcome_kind)
                && outgoing.replayable();
            if !retry {
                if tried > 1 && policy.on.retries(outcome_kind) {
                    outcome.flags.push("URX");
                }
                return match answer {
                    Ok(resp) => resp,
                    Err((flag, status, text)) => {
                        outcome.flags.push(flag);
                        local(status, text)
                    }
                };
            }
            // Full jitter over an exponential back-off.
            let ceiling = (BACKOFF_BASE * 2u32.saturating_pow(tried - 1)).min(BACKOFF_MAX);
            let wait = ceiling.mul_f64(rng.f64());
            tokio::time::sleep(wait).await;
        }
    }
}

/// The route for a host no route object claims: the service itself, Istio's default retries.
struct DefaultRoute {
    rule: HttpRule,
    target: super::route::model::RouteTarget,
}

impl DefaultRoute {
    fn new(host: &str) -> Self {
        let target = super::route::model::RouteTarget {
            target: Target {
                host: host.to_owned(),
                subset: None,
                port: None,
            },
            weight: 1,
            headers: Default::default(),
        };
        Self {
            rule: HttpRule {
                name: "default".into(),
                matches: Vec::new(),
                action: RuleAction::Route(super::route::model::WeightedDestinations {
                    destinations: vec![target.clone()],
                    total_weight: 1,
                }),
                rewrite: None,
                headers: Default::default(),
                timeout: None,
                retries: default_retries(),
                fault: None,
                mirrors: Vec::new(),
                cors: None,
            },
            target,
        }
    }
}

/// Holds a small body (Content-Length within [`RETRY_BODY_LIMIT`], or none at all) so that it
/// can be sent again; anything else is streamed once.
async fn hold_or_stream<B>(headers: &HeaderMap, body: B) -> OutgoingBody
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let chunked = headers.contains_key(header::TRANSFER_ENCODING);
    let small = match length {
        Some(n) => n <= RETRY_BODY_LIMIT,
        None => !chunked && body.is_end_stream(),
    };
    if small {
        match body.collect().await {
            Ok(b) => OutgoingBody::Held(b.to_bytes()),
            Err(_) => OutgoingBody::Held(Bytes::new()),
        }
    } else {
        OutgoingBody::Stream(Some(body.map_err(Into::into).boxed()))
    }
}

fn grpc_status(h: &HeaderMap) -> Option<u32> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// The answer to an injected abort: the HTTP status, or a trailers-only gRPC response.
fn aborted(a: &Abort) -> Response<Body> {
    match a {
        Abort::Http(status) => local(*status, "fault filter abort"),
        Abort::Grpc(code) => grpc_local(*code, "fault filter abort"),
    }
}

/// A local gRPC answer: trailers-only (HTTP 200, `grpc-status` and `grpc-message` in the
/// head), as Envoy answers gRPC requests it does not forward.
pub fn grpc_local(code: u32, message: &'static str) -> Response<Body> {
    let mut r = Response::new(empty());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code));
    h.insert("grpc-message", HeaderValue::from_static(message));
    r
}

/// The mirror's authority: `-shadow` after the host (before any port), as Envoy does.
fn shadow(authority: &str) -> String {
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.parse::<u16>().is_ok() => format!("{h}-shadow:{p}"),
        _ => format!("{authority}-shadow"),
    }
}

#[cfg(test)]
#[path = "proxy_tests.rs"]
mod tests;
