//! The engine against a scripted upstream: what reaches it, how often, and what the client gets.
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody};

use super::*;
use crate::{l7::route::destination::DestinationRules, policy::RawObject};

/// What the fake upstream does with the next request.
#[derive(Clone, Copy)]
enum Step {
    Status(u16),
    Connect,
    Reset,
    /// Answers 200 after this long.
    Slow(Duration),
}

/// One request the upstream saw.
#[derive(Clone, Debug)]
struct Seen {
    target: String,
    path: String,
    host: String,
    headers: http::HeaderMap,
}

#[derive(Default)]
struct Fake {
    script: Mutex<VecDeque<Step>>,
    seen: Mutex<Vec<Seen>>,
}

impl Fake {
    fn with(steps: &[Step]) -> Arc<Self> {
        let f = Arc::new(Self::default());
        f.script.lock().unwrap().extend(steps.iter().copied());
        f
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn name(t: &Target) -> String {
    match &t.subset {
        Some(s) => format!("{}/{s}", t.host),
        None => t.host.clone(),
    }
}

impl Upstream for Fake {
    fn send(
        &self,
        target: &Target,
        _port: u16,
        request: Request<Body>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Body>, UpstreamError>> + Send + '_>> {
        let seen = Seen {
            target: name(target),
            path: request.uri().to_string(),
            host: request
                .headers()
                .get(header::HOST)
                .map(|h| h.to_str().unwrap().to_owned())
                .unwrap_or_default(),
            headers: request.headers().clone(),
        };
        self.seen.lock().unwrap().push(seen.clone());
        let step = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Step::Status(200));
        Box::pin(async move {
            let ok = |status: u16| {
                let mut r = Response::new(full(Bytes::from(seen.target.clone())));
                *r.status_mut() = StatusCode::from_u16(status).unwrap();
                Ok(r)
            };
            match step {
                Step::Status(s) => ok(s),
                Step::Connect => Err(UpstreamError::Connect("refused".into())),
                Step::Reset => Err(UpstreamError::Reset("reset".into())),
                Step::Slow(d) => {
                    tokio::time::sleep(d).await;
                    ok(200)
                }
            }
        })
    }
}

const R: &str = "reviews.default.svc.cluster.local";

fn engine(objects: &str, fake: &Arc<Fake>) -> Engine {
    let objects: Vec<RawObject> = serde_yaml::from_str(objects).unwrap();
    let (routes, errors) = RouteTable::build(&objects);
    assert!(errors.is_empty(), "{errors:?}");
    let (destinations, errors) = DestinationRules::build(&objects);
    assert!(errors.is_empty(), "{errors:?}");
    Engine::new(
        Arc::new(routes),
        Arc::new(destinations),
        Arc::clone(fake) as Arc<dyn Upstream>,
    )
}

fn vs(http: &str) -> String {
    format!(
        "[{{apiVersion: networking.istio.io/v1, kind: VirtualService, metadata: {{name: reviews, namespace: default}}, spec: {{hosts: [reviews], http: {http}}}}}]"
    )
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(path)
        .header(header::HOST, "reviews:9080")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

const DST: fn() -> Destination = || Destination {
    host: R.into(),
    port: 9080,
};

async fn run(
    e: &Engine,
    req: Request<Full<Bytes>>,
) -> (StatusCode, String, Outcome, http::HeaderMap) {
    let mut rng = fastrand::Rng::with_seed(3);
    let (resp, outcome) = e.handle(&DST(), req, &mut rng).await;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        String::from_utf8_lossy(&body).into_owned(),
        outcome,
        headers,
    )
}

#[tokio::test]
async fn weights_split_requests_80_20() {
    let fake = Fake::with(&[]);
    let e = engine(
        &vs(
            "[{route: [{destination: {host: reviews, subset: v1}, weight: 80}, {destination: {host: reviews, subset: v2}, weight: 20}]}]",
        ),
        &fake,
    );
    let mut rng = fastrand::Rng::with_seed(42);
    for _ in 0..1000 {
        let (resp, _) = e.handle(&DST(), get("/"), &mut rng).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let v2 = fake
        .seen()
        .iter()
        .filter(|s| s.target.ends_with("/v2"))
        .count();
    assert!((150..=250).contains(&v2), "v2 got {v2} of 1000");
}

#[tokio::test]
async fn a_header_routes_one_user_and_no_match_is_404_nr() {
    let fake = Fake::with(&[]);
    let e = engine(
        &vs(
            "[{match: [{headers: {end-user: {exact: jason}}}], route: [{destination: {host: reviews, subset: v3}}]}, {match: [{uri: {prefix: /reviews}}], route: [{destination: {host: reviews, subset: v1}}]}]",
        ),
        &fake,
    );
    let mut req = get("/anything");
    req.headers_mut()
        .insert("end-user", "jason".parse().unwrap());
    let (status, body, _, _) = run(&e, req).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "reviews.default.svc.cluster.local/v3")
    );
    let (status, _, outcome, _) = run(&e, get("/other")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(outcome.flags(), "NR");
    assert_eq!(fake.seen().len(), 1, "the unrouted request reached nobody");
}

#[tokio::test]
async fn an_injected_abort_never_reaches_the_upstream() {
    let fake = Fake::with(&[]);
    let e = engine(
        &vs(
            "[{fault: {abort: {httpStatus: 500, percentage: {value: 100}}}, route: [{destination: {host: reviews}}]}]",
        ),
        &fake,
    );
    let (status, _, outcome, _) = run(&e, get("/")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(outcome.flags(), "FI");
    assert!(fake.seen().is_empty());
}

#[tokio::test]
async fn a_grpc_abort_is_a_trailers_only_answer() {
    let fake = Fake::with(&[]);
    let e = engine(
        &vs(
            "[{fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}, route: [{destination: {host: reviews}}]}]",
        ),
        &fake,
    );
    let (status, _, _, headers) = run(&e, get("/pkg.Svc/Call")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["grpc-status"], "14");
}

#[tokio::test(start_paused = true)]
async fn an_injected_delay_waits_then_forwards() {
    let fake = Fake::with(&[]);
    let e = engine(
        &vs(
            "[{fault: {delay: {fixedDelay: 7s, percentage: {value: 100}}}, route: [{destination: {host: reviews}}]}]",
        ),
        &fake,
    );
    let started = tokio::time::Instant::now();
    let (status, _, outcome, _) = run(&e, get("/")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_secs(7));
    assert_eq!(outcome.flags(), "DI");
}

#[tokio::test(start_paused = true)]
async fn the_route_timeout_answers_504_ut() {
    let fake = Fake::with(&[Step::Slow(Duration::from_secs(2))]);
    let e = engine(
        &vs("[{timeout: 0.5s, route: [{destination: {host: reviews}}]}]"),
        &fake,
    );
    let started = tokio::time::Instant::now();
    let (status, _, outcome, _) = run(&e, get("/")).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(outcome.flags(), "UT");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn retries_recover_from_5xx_and_report_exhaustion() {
    let fake = Fake::with(&[Step::Status(503), Step::Status(503), Step::Status(200)]);
    let policy =
        "[{retries: {attempts: 2, retryOn: 5xx}, route: [{destination: {host: reviews}}]}]";
    let e = engine(&vs(policy), &fake);
    let (status, _, outcome, _) = run(&e, get("/")).await;
    assert_eq!((status, outcome.attempts), (StatusCode::OK, 3));
    assert_eq!(outcome.flags(), "-");

    let fake = Fake::with(&[Step::Status(503), Step::Status(502), Step::Status(500)]);
    let e = engine(&vs(policy), &fake);
    let (status, _, outcome, _) = run(&e, get("/")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "the last answer");
    assert_eq!((outcome.attempts, outcome.flags().as_str()), (3, "URX"));
}

#[tokio::test(start_paused = true)]
async fn istios_default_retries_cover_connect_failures_not_503() {
    let fake = Fake::with(&[Step::Connect, Step::Status(200)]);
    let e = engine(&vs("[{route: [{destination: {host: reviews}}]}]"), &fake);
    let (status, _, outcome, _) = run(&e, get("/")).await;
    assert_eq!((status, outcome.attempts), (StatusCode::OK, 2));

    let fake = Fake::with(&[Step::Status(503)]);
    let e = engine(&vs("[{route: [{destination: {host: reviews}}]}]"), &fake);
    let (status, _, outcome, _) = run(&e, get("/")).await;
    assert_eq!(
        (status, outcome.attempts),
        (StatusCode::SERVICE_UNAVAILABLE, 1)
    );

    let fake = Fake::with(&[Step::Connect, Step::Connect, Step::Connect]);
    let e = engine(&vs("[{route: [{destination: {host: reviews}}]}]"), &fake);
    let (status, _, outcome, _) = run(&e, get("/")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!((outcome.attempts, outcome.flags().as_str()), (3, "URX,UF"));

    let fake = Fake::with(&[Step::Reset]);
    let e = engine(&vs("[{route: [{destination: {host: reviews}}]}]"), &fake);
    let (status, _, outcome, _) = run(&e, get("/")).await;
    assert_eq!(
        (status, outcome.flags().as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "UC")
    );
}

#[tokio::test]
async fn without_a_virtualservice_the_service_itself_is_the_target() {
    let fake = Fake::with(&[]);
    let e = engine("[]", &fake);
    let (status, body, outcome, _) = run(&e, get("/x?y=1")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, R));
    assert_eq!(outcome.rule.as_deref(), Some("default"));
    assert_eq!(fake.seen()[0].path, "/x?y=1");
}

#[tokio::test]
async fn rewrites_and_header_edits_reach_the_upstream_and_the_client() {
    let fake = Fake::with(&[]);
    let e = engine(
        &vs(
            "[{match: [{uri: {prefix: /api}}], rewrite: {uri: /v1, authority: reviews.internal}, headers: {request: {set: {x-route: api}, remove: [x-secret]}, response: {add: {x-served-by: waypoint}}}, route: [{destination: {host: reviews}}]}]",
        ),
        &fake,
    );
    let mut req = get("/api/items?page=2");
    req.headers_mut().insert("x-secret", "s".parse().unwrap());
    let (status, _, _, headers) = run(&e, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-served-by"], "waypoint");
    let seen = &fake.seen()[0];
    assert_eq!(seen.path, "/v1/items?page=2");
    assert_eq!(seen.host, "reviews.internal");
    assert_eq!(seen.headers["x-route"], "api");
    assert!(!seen.headers.contains_key("x-secret"));
}

#[tokio::test]
async fn redirects_and_direct_responses_are_answered_locally() {
    let fake = Fake::with(&[]);
    let e = engine(
        &vs(
            "[{match: [{uri: {exact: /old}}], redirect: {uri: /new}}, {match: [{uri: {exact: /down}}], directResponse: {status: 503, body: {string: maintenance}}}]",
        ),
        &fake,
    );
    let (status, _, _, headers) = run(&e, get("/old?a=1")).await;
    assert_eq!(status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(headers[header::LOCATION], "http://reviews:9080/new?a=1");
    let (status, body, _, _) = run(&e, get("/down")).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "maintenance")
    );
    assert!(fake.seen().is_empty());
}

#[tokio::test]
async fn mirrors_get_a_shadow_copy() {
    let fake = Fake::with(&[]);
    let e = engine(
        &vs(
            "[{route: [{destination: {host: reviews, subset: v1}}], mirror: {host: reviews, subset: v2}}]",
        ),
        &fake,
    );
    let (status, body, _, _) = run(&e, get("/")).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "reviews.default.svc.cluster.local/v1")
    );
    for _ in 0..100 {
        if fake.seen().len() == 2 {
            break;
        }
        tokio::task::yield_now().await;
    }
    let seen = fake.seen();
    let mirror = seen
        .iter()
        .find(|s| s.target.ends_with("/v2"))
        .expect("the mirror's copy");
    assert_eq!(mirror.host, "reviews-shadow:9080");
}

#[tokio::test(start_paused = true)]
async fn a_streamed_body_is_sent_once() {
    let fake = Fake::with(&[Step::Status(503), Step::Status(200)]);
    let e = engine(
        &vs("[{retries: {attempts: 3, retryOn: 5xx}, route: [{destination: {host: reviews}}]}]"),
        &fake,
    );
    let chunks = futures::stream::iter(vec![Ok::<_, std::convert::Infallible>(
        hyper::body::Frame::data(Bytes::from_static(b"part")),
    )]);
    let req = Request::builder()
        .method("POST")
        .uri("/upload")
        .header(header::TRANSFER_ENCODING, "chunked")
        .body(StreamBody::new(chunks))
        .unwrap();
    let mut rng = fastrand::Rng::with_seed(1);
    let (resp, outcome) = e.handle(&DST(), req, &mut rng).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        outcome.attempts, 1,
        "a body that cannot be replayed is not retried"
    );
    assert_eq!(fake.seen().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_tripped_circuit_breaker_answers_503_uo() {
    let fake = Fake::with(&[
        Step::Slow(Duration::from_secs(1)),
        Step::Slow(Duration::from_secs(1)),
    ]);
    let objects = format!(
        "{}\n",
        vs("[{route: [{destination: {host: reviews}}]}]")
            .trim_end_matches(']')
            .to_owned()
            + ", {apiVersion: networking.istio.io/v1, kind: DestinationRule, metadata: {name: reviews, namespace: default}, spec: {host: reviews, trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}}}}]"
    );
    let e = Arc::new(engine(&objects, &fake));
    let mut running = Vec::new();
    for i in 0..3u64 {
        let e = Arc::clone(&e);
        running.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(i);
            let (resp, outcome) = e.handle(&DST(), get("/"), &mut rng).await;
            let _ = resp.into_body().collect().await;
            outcome.flags()
        }));
        tokio::task::yield_now().await;
    }
    let mut flags = Vec::new();
    for r in running {
        flags.push(r.await.unwrap());
    }
    flags.sort();
    assert_eq!(
        flags,
        ["-", "-", "UO"],
        "one in flight, one pending, one overflow"
    );
    assert_eq!(fake.seen().len(), 2);
}

#[tokio::test]
async fn cors_preflights_are_answered_here_and_responses_carry_the_origin() {
    let fake = Fake::with(&[]);
    let e = engine(
        &vs(
            "[{route: [{destination: {host: reviews, subset: v1}}], corsPolicy: {allowOrigins: [{exact: 'https://app.example'}], allowMethods: [GET, POST], exposeHeaders: [x-trace]}, fault: {abort: {httpStatus: 500, percentage: {value: 0}}}}]",
        ),
        &fake,
    );
    let preflight = |origin: &str| {
        Request::builder()
            .method("OPTIONS")
            .uri("/reviews")
            .header(header::HOST, "reviews:9080")
            .header(header::ORIGIN, origin)
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let (status, _, _, headers) = run(&e, preflight("https://app.example")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(headers["access-control-allow-methods"], "GET,POST");
    assert!(
        fake.seen().is_empty(),
        "an allowed preflight is not forwarded"
    );
    // Another origin's preflight goes to the service (unmatchedPreflights: FORWARD).
    let (_, _, _, headers) = run(&e, preflight("https://evil.example")).await;
    assert!(!headers.contains_key("access-control-allow-origin"));
    assert_eq!(fake.seen().len(), 1);
    // A real request from the allowed origin: forwarded, the answer names the origin.
    let mut req = get("/reviews");
    req.headers_mut()
        .insert(header::ORIGIN, "https://app.example".parse().unwrap());
    let (status, _, _, headers) = run(&e, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(headers["access-control-expose-headers"], "x-trace");
    assert_eq!(fake.seen().len(), 2);
}
