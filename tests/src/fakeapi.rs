//! A Kubernetes API server double for tests: enough of the real protocol for kube-rs watchers,
//! patches and TokenReviews, driven by the test.
//!
//! - Lists (`GET /api/v1/pods`, `/apis/<group>/<version>/<plural>`) answer with the objects
//!   and the current `resourceVersion`, in pages of `limit` with a `continue` token as the API
//!   server does (kube-rs watchers ask for 500 at a time, as client-go's pager does).
//! - Watches (`?watch=true&resourceVersion=N`) replay the recorded events after N, then stream
//!   new ones as newline-delimited JSON, as the API server does. A resourceVersion older than
//!   the compaction point gets an `ERROR` event with a 410 `Expired` Status, and
//!   [`FakeApi::expire_watches`] ends every open watch that way (what etcd compaction does), so
//!   clients must re-list.
//! - [`FakeApi::fail_with`] makes every request answer with an HTTP error (an API outage);
//!   [`FakeApi::not_served`] makes a resource 404 (a CRD that is not installed).
//! - `PATCH` (merge patch) on an object updates it and emits `MODIFIED`; a server-side apply
//!   patch (`application/apply-patch+yaml`) also creates a missing object (approximated as a
//!   merge); `.../status` patches the object itself; `DELETE` removes it. Every request is
//!   recorded for assertions.
//! - `labelSelector` (`k=v`, `k!=v`, `k`, comma-separated) filters lists and watches.
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews` answers from a table of tokens.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, body::Frame, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// One recorded request.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: String,
}

/// Who a TokenReview says a token belongs to.
#[derive(Clone, Debug)]
pub struct TokenUser {
    /// `system:serviceaccount:<ns>:<sa>`.
    pub username: String,
    /// Audiences the token is valid for.
    pub audiences: Vec<String>,
    /// `authentication.kubernetes.io/pod-name` etc.
    pub extra: BTreeMap<String, Vec<String>>,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// resource -> (namespace, name) -> object
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    /// (rv, resource, event type, object)
    history: Vec<(u64, String, &'static str, Value)>,
    compacted_below: u64,
    fail: Option<u16>,
    not_served: BTreeSet<String>,
    requests: Vec<Recorded>,
    tokens: HashMap<String, TokenUser>,
    /// Tokens the API server knows but rejects (expired, revoked), with its error text.
    rejected: HashMap<String, String>,
}

#[derive(Clone, Debug)]
enum Live {
    Event(String, Value),
    Expire,
}

/// The running double.
pub struct FakeApi {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    live: broadcast::Sender<Live>,
    _runtime: std::thread::JoinHandle<()>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

/// `(resource, list kind)` from a resource's plural.
fn list_kind(resource: &str) -> String {
    let kind = match resource {
        "pods" => "Pod",
        "namespaces" => "Namespace",
        "services" => "Service",
        "endpointslices" => "EndpointSlice",
        "authorizationpolicies" => "AuthorizationPolicy",
        "peerauthentications" => "PeerAuthentication",
        "requestauthentications" => "RequestAuthentication",
        "secrets" => "Secret",
        "configmaps" => "ConfigMap",
        other => other,
    };
    format!("{kind}List")
}

fn api_version_of(obj: &Value) -> String {
    obj["apiVersion"].as_str().unwrap_or("v1").to_owned()
}

/// The resource plural from an object's kind.
pub fn resource_of(obj: &Value) -> String {
    match obj["kind"].as_str().unwrap_or("") {
        "Pod" => "pods".into(),
        "Namespace" => "namespaces".into(),
        "Service" => "services".into(),
        "EndpointSlice" => "endpointslices".into(),
        "AuthorizationPolicy" => "authorizationpolicies".into(),
        "PeerAuthentication" => "peerauthentications".into(),
        "RequestAuthentication" => "requestauthentications".into(),
        "Secret" => "secrets".into(),
        "ConfigMap" => "configmaps".into(),
        k => format!("{}s", k.to_lowercase()),
    }
}

fn key_of(obj: &Value) -> (String, String) {
    (
        obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned(),
        obj["metadata"]["name"].as_str().unwrap_or("").to_owned(),
    )
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

type Body = BoxBody<Bytes, Infallible>;

fn reply(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .expect("static parts")
}

/// Merges `patch` into `target` (JSON merge patch, RFC 7386).
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

impl State {
    fn record_event(&mut self, resource: &str, kind: &'static str, mut obj: Value) -> Value {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = json!(format!("uid-{}", self.rv));
        }
        if obj["metadata"]["creationTimestamp"].is_null() {
            obj["metadata"]["creationTimestamp"] = json!("2026-12-01T00:00:00Z");
        }
        let key = key_of(&obj);
        let objects = self.objects.entry(resource.to_owned()).or_default();
        if kind == "DELETED" {
            objects.remove(&key);
        } else {
            objects.insert(key, obj.clone());
        }
        self.history
            .push((self.rv, resource.to_owned(), kind, obj.clone()));
        obj
    }
}

impl FakeApi {
    /// Starts the server on a loopback port.
    pub fn start() -> Self {
        Self::start_on(std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
    }

    /// Starts the server on `listener` (which may belong to another network namespace: a
    /// socket stays in the namespace it was created in).
    pub fn start_on(listener: std::net::TcpListener) -> Self {
        listener.set_nonblocking(true).expect("nonblocking");
        let state = Arc::new(Mutex::new(State {
            rv: 100,
            ..State::default()
        }));
        let (live, _) = broadcast::channel(4096);
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (st, lv) = (Arc::clone(&state), live.clone());
        let runtime = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                addr_tx
                    .send(listener.local_addr().expect("addr"))
                    .expect("send");
                let serve = async {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        let (st, lv) = (Arc::clone(&st), lv.clone());
                        tokio::spawn(async move {
                            let svc = service_fn(move |req| {
                                let (st, lv) = (Arc::clone(&st), lv.clone());
                                async move { Ok::<_, Infallible>(handle(st, lv, req).await) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tcp), svc)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    () = serve => {}
                    _ = stop_rx => {}
                }
            });
        });
        let addr = addr_rx.recv().expect("fake API server address");
        Self {
            addr,
            state,
            live,
            _runtime: runtime,
            shutdown: Some(stop_tx),
        }
    }

    /// The URL clients connect to.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes `dir/kubeconfig` pointing at this server (no credentials), for processes under
    /// test (`--kubeconfig`).
    pub fn write_kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let server = self.url();
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{server}\"}}\nusers:\n- name: test\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: test}}\ncurrent-context: fake\n"
            ),
        )
        .expect("writing the kubeconfig");
        path
    }

    /// Creates or replaces an object (ADDED or MODIFIED), as a controller would.
    pub fn apply(&self, obj: Value) -> Value {
        let resource = resource_of(&obj);
        let mut st = self.state.lock().unwrap();
        let exists = st
            .objects
            .get(&resource)
            .is_some_and(|m| m.contains_key(&key_of(&obj)));
        let kind = if exists { "MODIFIED" } else { "ADDED" };
        let obj = st.record_event(&resource, kind, obj);
        let _ = self
            .live
            .send(Live::Event(resource, json!({"type": kind, "object": obj})));
        obj
    }

    /// Deletes an object (DELETED).
    pub fn delete(&self, obj: &Value) {
        let resource = resource_of(obj);
        let mut st = self.state.lock().unwrap();
        let Some(current) = st
            .objects
            .get(&resource)
            .and_then(|m| m.get(&key_of(obj)))
            .cloned()
        else {
            return;
        };
        let obj = st.record_event(&resource, "DELETED", current);
        let _ = self.live.send(Live::Event(
            resource,
            json!({"type": "DELETED", "object": obj}),
        ));
    }

    /// The object as the server holds it.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .objects
            .get(resource)?
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Forgets history (etcd compaction) and ends every open watch with 410 Gone.
    pub fn expire_watches(&self) {
        let mut st = self.state.lock().unwrap();
        st.compacted_below = st.rv + 1;
        let _ = self.live.send(Live::Expire);
    }

    /// Every request answers `code` from now on (None: back to normal). Open watches end.
    pub fn fail_with(&self, code: Option<u16>) {
        self.state.lock().unwrap().fail = code;
        if code.is_some() {
            let _ = self.live.send(Live::Expire);
        }
    }

    /// `resource` answers 404 (its CRD is not installed).
    pub fn not_served(&self, resource: &str) {
        self.state
            .lock()
            .unwrap()
            .not_served
            .insert(resource.to_owned());
    }

    /// Registers a token for TokenReview.
    pub fn add_token(&self, token: &str, user: TokenUser) {
        self.state
            .lock()
            .unwrap()
            .tokens
            .insert(token.to_owned(), user);
    }

    /// Registers a token TokenReview rejects with `error` (e.g. an expired one).
    pub fn reject_token(&self, token: &str, error: &str) {
        self.state
            .lock()
            .unwrap()
            .rejected
            .insert(token.to_owned(), error.to_owned());
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
    }
}

/// Splits `/api/v1/...` or `/apis/<g>/<v>/...` into (namespace, resource, name).
fn parse_path(path: &str) -> Option<(Option<String>, String, Option<String>)> {
    let mut parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // The status subresource is patched on the object itself.
    if parts.len() >= 2 && parts.last() == Some(&"status") {
        parts.pop();
    }
    let rest = match parts.as_slice() {
        ["api", "v1", rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => return None,
    };
    match rest {
        [resource] => Some((None, (*resource).to_owned(), None)),
        [resource, name] => Some((None, (*resource).to_owned(), Some((*name).to_owned()))),
        ["namespaces", ns, resource] => {
            Some((Some((*ns).to_owned()), (*resource).to_owned(), None))
        }
        ["namespaces", ns, resource, name] => Some((
            Some((*ns).to_owned()),
            (*resource).to_owned(),
            Some((*name).to_owned()),
        )),
        _ => None,
    }
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

/// `%2F` and friends (and `+` as a space), as a query string carries a label selector.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(
    state: Arc<Mutex<State>>,
    live: broadcast::Sender<Live>,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let method = req.method().as_str().to_owned();
    let server_side_apply = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/apply-patch"));
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    let mut st = state.lock().unwrap();
    st.requests.push(Recorded {
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
        body: body.clone(),
    });
    if let Some(code) = st.fail {
        return reply(
            code,
            &status(
                code,
                "InternalError",
                "the fake API server is failing on purpose",
            ),
        );
    }
    if path == "/apis/authentication.k8s.io/v1/tokenreviews" && method == "POST" {
        let review: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let token = review["spec"]["token"].as_str().unwrap_or("");
        let wanted: Vec<String> = review["spec"]["audiences"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let status_v = if let Some(why) = st.rejected.get(token) {
            json!({"authenticated": false, "error": why})
        } else {
            match st.tokens.get(token) {
                Some(u) if wanted.iter().all(|a| u.audiences.contains(a)) => json!({
                    "authenticated": true,
                    "user": {"username": u.username, "extra": u.extra},
                    "audiences": wanted,
                }),
                Some(_) => json!({"authenticated": false, "error": "token audiences do not match"}),
                None => json!({"authenticated": false, "error": "invalid bearer token"}),
            }
        };
        let mut out = review.clone();
        out["status"] = status_v;
        return reply(201, &out);
    }
    let Some((ns, resource, name)) = parse_path(&path) else {
        return reply(404, &status(404, "NotFound", "no such path"));
    };
    if st.not_served.contains(&resource) {
        return reply(
            404,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    }
    match (method.as_str(), name) {
        ("GET", Some(name)) => {
            let key = (ns.unwrap_or_default(), name.clone());
            match st.objects.get(&resource).and_then(|m| m.get(&key)) {
                Some(o) => reply(200, o),
                None => reply(
                    404,
                    &status(404, "NotFound", &format!("{resource} {name:?} not found")),
                ),
            }
        }
        ("PATCH", Some(name)) => {
            let key = (ns.unwrap_or_default(), name.clone());
            let patch: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let (mut obj, kind) = match st.objects.get(&resource).and_then(|m| m.get(&key)).cloned()
            {
                Some(obj) => (obj, "MODIFIED"),
                None if server_side_apply => {
                    let mut obj = json!({});
                    if !key.0.is_empty() {
                        obj["metadata"]["namespace"] = json!(key.0);
                    }
                    (obj, "ADDED")
                }
                None => {
                    return reply(
                        404,
                        &status(404, "NotFound", &format!("{resource} {name:?} not found")),
                    );
                }
            };
            merge(&mut obj, &patch);
            let obj = st.record_event(&resource, kind, obj);
            let _ = live.send(Live::Event(resource, json!({"type": kind, "object": obj})));
            reply(if kind == "ADDED" { 201 } else { 200 }, &obj)
        }
        ("DELETE", Some(name)) => {
            let key = (ns.unwrap_or_default(), name.clone());
            let Some(obj) = st.objects.get(&resource).and_then(|m| m.get(&key)).cloned() else {
                return reply(
                    404,
                    &status(404, "NotFound", &format!("{resource} {name:?} not found")),
                );
            };
            let obj = st.record_event(&resource, "DELETED", obj);
            let _ = live.send(Live::Event(
                resource,
                json!({"type": "DELETED", "object": obj}),
            ));
            reply(200, &obj)
        }
        ("POST", None) | ("PUT", Some(_)) => {
            let mut obj: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            if let Some(ns) = &ns {
                obj["metadata"]["namespace"] = json!(ns);
            }
            let exists = st
                .objects
                .get(&resource)
                .is_some_and(|m| m.contains_key(&key_of(&obj)));
            if method == "POST" && exists {
                return reply(409, &status(409, "AlreadyExists", "already exists"));
            }
            let kind = if exists { "MODIFIED" } else { "ADDED" };
            let obj = st.record_event(&resource, kind, obj);
            let _ = live.send(Live::Event(resource, json!({"type": kind, "object": obj})));
            reply(if exists { 200 } else { 201 }, &obj)
        }
        ("GET", None) => {
            let selector = percent_decode(query_param(&query, "labelSelector").unwrap_or(""));
            let selector = selector.as_str();
            if !matches!(query_param(&query, "watch"), Some("true" | "1")) {
                return list_page(&st, &resource, ns.as_deref(), selector, &query);
            }
            let from: u64 = query_param(&query, "resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(st.rv);
            if from < st.compacted_below {
                let expired = json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
                return stream_response(vec![expired], None);
            }
            let replay: Vec<Value> = st
                .history
                .iter()
                .filter(|(rv, r, _, o)| {
                    *rv > from
                        && *r == resource
                        && ns
                            .as_ref()
                            .is_none_or(|n| o["metadata"]["namespace"] == json!(n))
                        && selected(o, selector)
                })
                .map(|(_, _, t, o)| json!({"type": t, "object": o}))
                .collect();
            let rx = live.subscribe();
            drop(st);
            let filter = Filter {
                resource,
                namespace: ns,
                selector: selector.to_owned(),
            };
            stream_response(replay, Some((rx, filter)))
        }
        _ => reply(
            405,
            &status(405, "MethodNotAllowed", "not supported by the fake"),
        ),
    }
}

/// One page of a list, as the API server pages one: at most `limit` objects (every one when
/// absent) after the `continue` token's position, with a token for the rest. The token carries
/// the resourceVersion of the first page, which every page reports (the client watches from
/// it); later pages are read from the current objects, so an object changed meanwhile is
/// listed as it is now and its event is replayed to the watch too (the client applies both).
fn list_page(
    st: &State,
    resource: &str,
    ns: Option<&str>,
    selector: &str,
    query: &str,
) -> Response<Body> {
    let limit = query_param(query, "limit")
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let token = query_param(query, "continue").map(percent_decode);
    let (rv, after) = match token.as_deref().filter(|t| !t.is_empty()) {
        None => (st.rv, None),
        Some(t) => {
            let mut parts = t.splitn(3, '/');
            match (
                parts.next().and_then(|rv| rv.parse::<u64>().ok()),
                parts.next(),
                parts.next(),
            ) {
                (Some(rv), Some(ns), Some(name)) => (rv, Some((ns.to_owned(), name.to_owned()))),
                _ => return reply(400, &status(400, "BadRequest", "malformed continue token")),
            }
        }
    };
    let mut items = Vec::new();
    let mut next = None;
    if let Some(objects) = st.objects.get(resource) {
        let range = match &after {
            Some(key) => objects.range((
                std::ops::Bound::Excluded(key.clone()),
                std::ops::Bound::Unbounded,
            )),
            None => objects.range::<(String, String), _>(..),
        };
        let mut listed = range
            .filter(|((o_ns, _), _)| ns.is_none_or(|n| n == o_ns))
            .filter(|(_, o)| selected(o, selector));
        for (key, o) in listed.by_ref().take(limit) {
            items.push(o.clone());
            next = Some(key);
        }
        if listed.next().is_none() {
            next = None;
        }
    }
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some((n, name)) = next {
        metadata["continue"] = json!(format!("{rv}/{n}/{name}"));
    }
    let api_version = items.first().map_or_else(|| "v1".into(), api_version_of);
    reply(
        200,
        &json!({"apiVersion": api_version, "kind": list_kind(resource),
                "metadata": metadata, "items": items}),
    )
}

/// A watch response: `first` events, then live ones for `resource` until expiry.
/// What one watch streams: events of `resource` in `namespace` (all when None) whose object
/// matches `selector`.
struct Filter {
    resource: String,
    namespace: Option<String>,
    selector: String,
}

/// The `labelSelector` subset controllers use: `k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-joined.
fn selected(obj: &Value, selector: &str) -> bool {
    let labels = &obj["metadata"]["labels"];
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                labels[k.trim()].as_str() != Some(v.trim())
            } else if let Some((k, v)) = term.split_once('=') {
                labels[k.trim()].as_str() == Some(v.trim_start_matches('=').trim())
            } else if let Some(k) = term.strip_prefix('!') {
                labels[k].is_null()
            } else {
                !labels[term].is_null()
            }
        })
}

fn stream_response(
    first: Vec<Value>,
    live: Option<(broadcast::Receiver<Live>, Filter)>,
) -> Response<Body> {
    let stream = async_stream(first, live);
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed())
        .expect("static parts")
}

fn async_stream(
    first: Vec<Value>,
    live: Option<(broadcast::Receiver<Live>, Filter)>,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send {
    let line = |v: &Value| Ok(Frame::data(Bytes::from(format!("{v}\n"))));
    let head = futures::stream::iter(first.iter().map(line).collect::<Vec<_>>());
    let tail = futures::stream::unfold(live, move |state| async move {
        let (mut rx, f) = state?;
        loop {
            match rx.recv().await {
                Ok(Live::Event(r, ev))
                    if r == f.resource
                        && f.namespace
                            .as_ref()
                            .is_none_or(|n| ev["object"]["metadata"]["namespace"] == json!(n))
                        && selected(&ev["object"], &f.selector) =>
                {
                    let frame: Result<Frame<Bytes>, Infallible> =
                        Ok(Frame::data(Bytes::from(format!("{ev}\n"))));
                    return Some((frame, Some((rx, f))));
                }
                Ok(Live::Event(..)) => continue,
                Ok(Live::Expire) => {
                    let ev = json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
                    let frame: Result<Frame<Bytes>, Infallible> =
                        Ok(Frame::data(Bytes::from(format!("{ev}\n"))));
                    return Some((frame, None));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    futures::StreamExt::chain(head, tail)
}
